"""`hermes-green demo`: the whole gateway against strict fakes, on loopback, no credentials.

It starts fake WeCom, Feishu and QQ Bot servers (keepalive every second, a client silent for
1.5 s is dropped, as strict servers do) and a fake OpenAI-compatible LLM, connects a real
gateway to them, and plays users on every platform who chat and ask for heavy tool work
(pure-Python prime counting in the process pool, hashing and blocking sleeps in threads).
Every second it prints each platform's state, how late its keepalives arrived at the fake and
its message counts; at the end a summary (JSON with --json). Exit 0 when no message was lost
or answered twice and no connection dropped.

The fakes live in hermes_green/testing/ (the same servers the tests use), so the demo runs
wherever the package is installed.
"""
from __future__ import annotations

import itertools
import json
import logging
import sys
import tempfile
import time

import gevent

from .config import Config
from .gateway import Gateway
from .runtime import HubWatch, freeze_startup_heap, percentile

USER_SCRIPT = [
    "hello! what can you do?",
    "please compute the primes below 3000000",
    "hash the word green for me",
    "tell me about keepalives",
    "sleep for a second, then answer",
    "compute the primes below 2000000 and hash the result",
]
CHATS_PER_PLATFORM = 3
SEND_EVERY_S = 0.7
SETTLE_MAX_S = 60.0


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")  # cli-output
    sys.stdout.flush()


def _load_fleet():
    from .testing.fleet import FakeFleet, Keepalive  # shipped in the package
    return FakeFleet, Keepalive


def run_demo(seconds: float = 30.0, as_json: bool = False) -> int:
    logging.basicConfig(level=logging.ERROR, stream=sys.stderr)
    FakeFleet, Keepalive = _load_fleet()
    fleet = FakeFleet(keepalive=Keepalive(interval_s=1.0, deadline_s=1.5)).start()
    data_dir = tempfile.mkdtemp(prefix="hermes-green-demo-")
    config = Config.model_validate({
        "gateway": {"data_dir": data_dir, "status": {"host": "127.0.0.1", "port": 0}},
        "agent": fleet.agent_config(),
        "executors": {"threads": 4, "processes": 2},
        "platforms": fleet.platforms_config(),
    })
    hub = HubWatch(threads=config.executors.threads)
    gateway = Gateway(config, hub_watch=hub)
    started = time.monotonic()
    try:
        gateway.start()
        status_url = _start_status(gateway, config)
        freeze_startup_heap()
        while not (len(gateway.adapters) == len(fleet.platforms)
                   and all(a.ready.is_set() for a in gateway.adapters.values())):
            if time.monotonic() - started > 30:
                raise RuntimeError("platforms did not connect within 30 s")
            gevent.sleep(0.01)
        connect_s = time.monotonic() - started
        if not as_json:
            _out(f"hermes-green demo: {len(fleet.platforms)} platforms connected in "
                 f"{connect_s * 1000:.0f} ms; fake servers drop a client silent for 1.5 s")
            if status_url:
                _out(f"status page: {status_url}")
            _out(f"{'time':>5}  {'platform':<8} {'state':<10} {'keepalive p99':>13} "
                 f"{'in':>4} {'out':>4}")
        users = gevent.spawn(_play_users, fleet, seconds)
        users.name = "demo:users"
        ticker = gevent.spawn(_print_every_second, fleet, gateway, started, as_json)
        ticker.name = "demo:ticker"
        users.join()
        deadline = time.monotonic() + SETTLE_MAX_S
        while not fleet.all_answered() and time.monotonic() < deadline:
            gevent.sleep(0.1)
        ticker.kill()
        summary = _summary(fleet, gateway, hub, connect_s, time.monotonic() - started)
    finally:
        gateway.shutdown()
        fleet.stop()
    if as_json:
        _out(json.dumps(summary, indent=2))
    else:
        _out("summary:")
        for name, s in summary["platforms"].items():
            _out(f"  {name:<8} sent={s['sent']} answered={s['answered']} lost={s['lost']} "
                 f"duplicated={s['duplicated']} disconnects={s['disconnects']} keepalive "
                 f"p99={s['lateness_p99_ms']} ms max={s['lateness_max_ms']} ms")
        _out(f"  hub      lateness p99={summary['hub']['lateness_p99_ms']} ms "
             f"blocked_reports={summary['hub']['blocked_reports']}")
        _out("result: " + ("ok, nothing lost" if summary["ok"] else "FAILED"))
    return 0 if summary["ok"] else 1


def _start_status(gateway: Gateway, config: Config) -> str | None:
    try:
        from .status import StatusServer
        gateway.status_server = StatusServer(gateway, config.gateway.status).start()
        return gateway.status_server.url
    except Exception as e:  # the demo runs without its status page rather than not at all
        logging.getLogger("hermes_green.demo").warning("status page off error=%s", e)
        return None


def _play_users(fleet, seconds: float) -> None:
    texts = itertools.cycle(USER_SCRIPT)
    chats = itertools.cycle(range(CHATS_PER_PLATFORM))
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        chat = next(chats)
        for platform in fleet.platforms:
            fleet.send(platform, next(texts), chat=chat)
        gevent.sleep(SEND_EVERY_S * len(fleet.platforms))


def _print_every_second(fleet, gateway: Gateway, started: float, as_json: bool) -> None:
    seen = {p: 0 for p in fleet.platforms}
    while True:
        gevent.sleep(1.0)
        if as_json:
            continue
        elapsed = time.monotonic() - started
        for platform in fleet.platforms:
            late = fleet.lateness(platform)
            window, seen[platform] = late[seen[platform]:], len(late)
            adapter = gateway.adapters.get(platform)
            stats = adapter.stats if adapter else None
            state = stats.state.value if stats else "-"
            p99 = percentile(window, 99) * 1000 if window else 0.0
            _out(f"{elapsed:5.0f}s {platform:<8} {state:<10} {p99:10.1f} ms "
                 f"{stats.messages_in if stats else 0:>4} {stats.messages_out if stats else 0:>4}")


def _summary(fleet, gateway: Gateway, hub: HubWatch, connect_s: float, total_s: float) -> dict:
    platforms = {p: fleet.summary(p) for p in fleet.platforms}
    ok = all(s["lost"] == 0 and s["duplicated"] == 0 and s["disconnects"] == 0
             for s in platforms.values())
    return {"ok": ok, "seconds": round(total_s, 1), "connect_ms": round(connect_s * 1000, 1),
            "platforms": platforms,
            "hub": {"lateness_p99_ms": round(hub.lateness_p99_ms(), 2),
                    "lateness_max_ms": round(max(hub.lateness, default=0.0) * 1000, 2),
                    "blocked_reports": hub.blocked_count},
            "tool_calls": len([m for r in fleet.llm.chat_requests
                               for m in r.body.get("messages", []) if m.get("role") == "tool"])}
