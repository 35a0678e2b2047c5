"""The cascade benchmark: the same chat load with heavy tools, against the same strict fakes, for
an asyncio gateway with tools on its loop, the same with tools in threads, and hermes-green.

    python bench/cascade.py [--seconds 60] [--turns 8] [--variants asyncio-inline,...]
                            [--settle 30] [--primes 3000000] [--logs DIR] [--trace]
                            [--platforms wecom,feishu,qqbot|all]

One FakeFleet (WeCom, Feishu, QQ Bot fakes and the fake LLM, in this process) serves every
variant, one after another; keepalive every 1 s, a client silent for 1.5 s is dropped. Each
variant is a subprocess:
    asyncio-inline    bench/baselines/main.py --tools inline   (tools run on the event loop)
    asyncio-threads   bench/baselines/main.py --tools threads  (tools in run_in_executor threads)
    hermes-green      bin/hermes-green --config ...            (the real gateway; threads 4,
                                                                 processes 2)
Scenario per variant: start it, wait until all three platforms are connected (connect time),
then for --seconds keep about --turns turns in flight (a turn ends when its answer arrives, or
is given up after 30 s), each a new message on the next platform, in a chat with no turn in
flight, its text cycling through CPU-tool, blocking-tool and plain-chat prompts; then wait up to
--settle s for the remaining answers; then SIGTERM the variant. A variant's numbers come only
from its own connections (ids opened after it started), its own message ids and records before
the SIGTERM. Feishu events the variant left unacked are cancelled before the next variant
(reported), so nothing it missed is delivered to the next one.

Per variant and platform: disconnects (the fake dropped or saw dropped a connection before the
stop), keepalive lateness p50/p99/max (measured by the fake at receipt against its timetable),
replies delivered / lost / duplicated (same text twice), reply latency p50/p99 (first answer at
the fake minus send time). Plus the connect time, exit code and counts from the variant's log
(hermes-green: `hub blocked` reports; baselines: reconnects and replies given up).

Prints JSON. Benchmarks, not tests: the numbers are what was measured on this machine.
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter

from _common import emit, machine, ms_summary

import gevent  # noqa: E402

from hermes_green.testing.fleet import FakeFleet, Keepalive, all_platforms  # noqa: E402

# The asyncio baselines speak these three protocols; hermes-green runs the same three here, or
# with --platforms every platform of the fleet (the baselines then still run their three).
PLATFORMS = ("wecom", "feishu", "qqbot")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VARIANTS = ("asyncio-inline", "asyncio-threads", "hermes-green")
KEEPALIVE = Keepalive(interval_s=1.0, deadline_s=1.5)
LLM_CHUNK_DELAY_S = 0.02
TEXTS = [  # what the fake LLM does with each: see hermes_green/testing/fake_llm.py (auto mode)
    "please compute the primes below {primes}",  # count_primes: 3e6 is ~0.35 s of pure Python
    "hash the word 'green' for me",  # hash_text: PBKDF2, releases the GIL
    "tell me about keepalives",  # plain chat: a long streamed answer (~2 s)
    "sleep for a moment, then answer",  # blocking_sleep 0.2 s (a blocking C call)
    "compute the primes below {primes} and hash the result",  # two tool rounds
    "hello! what can you do?",  # plain chat
]
GIVE_UP_S = 30.0  # a user stops waiting (the turn leaves the in-flight count, stays counted)
CONNECT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
POLL_S = 0.05
_BLOCKED = re.compile(r"hub blocked greenlet=(.*?) over_ms=(\d+)")


# -- variants -------------------------------------------------------------------------------------
def command(variant: str, fleet: FakeFleet, workdir: str, trace: bool = False,
            platforms: tuple = PLATFORMS) -> list[str]:
    sections = {name: section for name, section in fleet.platforms_config().items()
                if name in platforms}
    if variant == "hermes-green":
        path = os.path.join(workdir, "config.yaml")
        config = {"gateway": {"data_dir": os.path.join(workdir, "data"),
                              "status": {"enabled": False}},
                  "agent": fleet.agent_config(),
                  "executors": {"threads": 4, "processes": 2},
                  # the load reuses chats as soon as they are answered: no per-user limit
                  "platforms": {name: {**section, "rate_limit": {"messages": 0}}
                                for name, section in sections.items()}}
        with open(path, "w") as f:
            json.dump(config, f)  # JSON is YAML
        entry = (os.path.join(ROOT, "bench", "_traced_gateway.py") if trace
                 else os.path.join(ROOT, "bin", "hermes-green"))
        return [sys.executable, entry, "--config", path]
    path = os.path.join(workdir, "baseline.json")
    with open(path, "w") as f:
        json.dump({"agent": fleet.agent_config(), "platforms": sections}, f)
    tools = {"asyncio-inline": "inline", "asyncio-threads": "threads"}[variant]
    return [sys.executable, os.path.join(ROOT, "bench", "baselines", "main.py"),
            "--config", path, "--tools", tools]


def ready(fleet: FakeFleet, platform: str, mine: set[int]) -> bool:
    """The variant is connected on this platform: subscribed (WeCom), identified (QQ), or holding
    a live long connection (Feishu), on a connection it opened."""
    fake = fleet.fakes[platform]
    if platform not in PLATFORMS:  # only hermes-green speaks the others: any session is its own
        return bool(fleet.drivers[platform].sessions()) or fleet.connected(platform)
    if platform == "wecom":
        return fake.current_conn_id in mine
    if platform == "qqbot":
        conn = fake.current.conn if fake.current is not None else None
        return conn is not None and conn.id in mine and not conn.closed.is_set()
    return any(c.id in mine for c in fake.live_conns())


def texts(primes: int) -> list[str]:
    return [t.format(primes=primes) for t in TEXTS]


# -- load -----------------------------------------------------------------------------------------
class Users:
    """Keeps about `turns` turns in flight across the platforms, one chat per turn."""

    def __init__(self, fleet: FakeFleet, turns: int, texts: list[str],
                 platforms: tuple | None = None) -> None:
        self.fleet = fleet
        self.turns = turns
        platforms = tuple(platforms or fleet.platforms)
        self.sent: dict[str, list[tuple[str, float]]] = {p: [] for p in platforms}
        self.inflight: dict[tuple[str, str], float] = {}  # (platform, mid) -> sent at
        self.waiting: set[tuple[str, str]] = set()  # given up, unanswered: chat still busy
        self._chats: dict[tuple[str, str], int] = {}
        self._platforms = itertools.cycle(platforms)
        self._texts = itertools.cycle(texts)

    def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            self.reap()
            while len(self.inflight) < self.turns:
                self._send()
            gevent.sleep(POLL_S)

    def _busy_chats(self, platform: str) -> set[int]:
        keys = set(self.inflight) | self.waiting
        return {self._chats[k] for k in keys if k[0] == platform}

    def _send(self) -> None:
        platform = next(self._platforms)
        busy = self._busy_chats(platform)
        chat = next(i for i in itertools.count() if i not in busy)
        at = time.monotonic()
        mid = self.fleet.send(platform, next(self._texts), chat=chat)
        self.sent[platform].append((mid, at))
        self.inflight[(platform, mid)] = at
        self._chats[(platform, mid)] = chat

    def reap(self) -> None:
        """Answered turns leave the in-flight count; so do turns older than GIVE_UP_S."""
        now = time.monotonic()
        for key, at in list(self.inflight.items()):
            if self.fleet.answers(*key):
                del self.inflight[key]
            elif now - at > GIVE_UP_S:
                del self.inflight[key]
                self.waiting.add(key)
        self.waiting = {k for k in self.waiting if not self.fleet.answers(*k)}

    def all_answered(self) -> bool:
        return all(self.fleet.answers(p, mid) for p, rows in self.sent.items() for mid, _ in rows)


class Ticker:
    """The fakes' own process, measured: a 10 ms ticker in it. A keepalive is timed at the fake
    when the fake reads it, so whatever keeps this process from running (the fakes, the LLM
    fake, the load itself, other processes on its core) is added to every variant's lateness."""

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.late: list[float] = []
        self._g: gevent.Greenlet | None = None

    def start(self) -> "Ticker":
        self._g = gevent.spawn(self._run)
        return self

    def _run(self) -> None:
        due = time.monotonic() + self.interval_s
        while True:
            gevent.sleep(max(0.0, due - time.monotonic()))
            self.late.append(max(0.0, time.monotonic() - due))
            due = max(due + self.interval_s, time.monotonic())

    def stop(self) -> dict:
        if self._g is not None:
            self._g.kill()
        return ms_summary(self.late)


# -- measurements ---------------------------------------------------------------------------------
def lateness(fleet: FakeFleet, platform: str, mine: set[int], t_stop: float) -> list[float]:
    if platform not in PLATFORMS:  # only hermes-green speaks these: every beat is its own
        return fleet.lateness(platform)
    fake = fleet.fakes[platform]
    out: list[float] = []
    for conn_id in sorted(mine):
        times = fake.keepalive_times.get(conn_id, [])
        if platform == "qqbot":
            late = fake.keepalive_lateness(conn_id) if conn_id in fake.hello_times else []
        else:
            late = fake.keepalive_lateness(conn_id, fleet.keepalive.interval_s)
        out += [max(0.0, x) for t, x in zip(times, late) if t < t_stop]
    return out


def platform_numbers(fleet: FakeFleet, users: Users, platform: str, mine: set[int],
                     t_stop: float) -> dict:
    rows = users.sent[platform]
    answers = {mid: fleet.answers(platform, mid) for mid, _ in rows}
    latency = [fleet.first_answer_at(platform, mid) - at for mid, at in rows if answers[mid]]
    late = lateness(fleet, platform, mine, t_stop)
    ours = (lambda conn_id: conn_id in mine) if platform in PLATFORMS else (lambda conn_id: True)
    drops = [d for d in fleet.disconnects(platform) if ours(d.conn_id) and d.at < t_stop]
    fake = fleet.fakes[platform]
    numbers = {
        "sent": len(rows),
        "delivered": sum(1 for a in answers.values() if a),
        "lost": sum(1 for a in answers.values() if not a),
        "duplicated": sum(1 for a in answers.values() if len(a) != len(set(a))),
        "disconnects": len(drops),
        "disconnect_reasons": dict(Counter(d.reason for d in drops)),
        "connections": sum(1 for c in (mine if platform in PLATFORMS else fake.conns)
                           if fake.conns[c].opened_at < t_stop),
        "keepalive_lateness": ms_summary(late),
        "reply_latency": {k: v for k, v in ms_summary(latency).items() if k != "max_ms"},
    }
    if platform == "wecom":  # pushed while no connection was subscribed: WeCom never replays
        numbers["sent_while_disconnected"] = len(set(fake.undelivered) & set(answers))
    return numbers


def log_counts(variant: str, path: str) -> dict:
    with open(path, errors="replace") as f:
        text = f.read()
    if variant == "hermes-green":
        blocked = [(g, int(ms)) for g, ms in _BLOCKED.findall(text)]
        by_greenlet = Counter(g for g, _ in blocked)
        return {"hub_blocked_reports": len(blocked),
                "hub_blocked_max_over_ms": max((ms for _, ms in blocked), default=0),
                "hub_blocked_by_greenlet": dict(by_greenlet.most_common(8)),
                "warnings": text.count(" level=warning") + text.count(" WARNING ")}
    return {"disconnected": text.count(" baseline disconnected "),
            "reply_failed": text.count(" baseline reply_failed "),
            "reply_lost": text.count(" baseline reply_lost "),
            "duplicates_dropped": text.count(" baseline duplicate_dropped "),
            "turn_failed": text.count(" baseline turn_failed ")}


def cancel_pending_feishu_events(fleet: FakeFleet) -> int:
    """Events the fake still redelivers (never acked) would go to the next variant: cancel them.
    (White-box: the fake keeps one pusher greenlet per unacked event.)"""
    fake = fleet.fakes.get("feishu")
    if fake is None:
        return 0
    pending = sum(1 for g in fake._pushers if not g.dead)
    fake._pushers.kill(block=True, timeout=2)
    return pending


# -- one variant ----------------------------------------------------------------------------------
def run_variant(fleet: FakeFleet, variant: str, args, logs_dir: str) -> dict:
    workdir = tempfile.mkdtemp(prefix=f"cascade-{variant}-")
    platforms = tuple(p for p in fleet.platforms if variant == "hermes-green" or p in PLATFORMS)
    before = {p: set(fleet.fakes[p].conns) for p in platforms}
    mine = lambda p: set(fleet.fakes[p].conns) - before[p]  # noqa: E731
    log_path = os.path.join(logs_dir, f"{variant}.log")
    trace = args.trace and variant == "hermes-green"
    cmd = command(variant, fleet, workdir, trace, platforms)
    trace_path = os.path.join(workdir, "hubtrace.json")
    started = time.monotonic()
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT,
                                env={**os.environ, "HERMES_GREEN_HUBTRACE": trace_path})
    result: dict = {"command": " ".join(c.replace(workdir, "<tmp>").replace(ROOT + os.sep, "")
                                        for c in ["python"] + cmd[1:])}
    try:
        while not all(ready(fleet, p, mine(p)) for p in platforms):
            if proc.poll() is not None or time.monotonic() - started > CONNECT_TIMEOUT_S:
                raise RuntimeError(f"{variant} did not connect (exit={proc.poll()}); "
                                   f"see {log_path}")
            gevent.sleep(0.01)
        result["connect_s"] = round(time.monotonic() - started, 3)
        sys.stderr.write(f"cascade: {variant} connected in {result['connect_s']} s\n")
        users = Users(fleet, args.turns, texts(args.primes), platforms)
        # The fakes keep every frame of every variant: a full collection over that heap stalled
        # this process 75 ms in the third variant, late-stamping every keepalive it was reading.
        gc.collect()
        gc.freeze()
        ticker = Ticker().start()
        load_started = time.monotonic()
        users.run(args.seconds)
        sending_s = time.monotonic() - load_started
        settle_end = time.monotonic() + args.settle
        while not users.all_answered() and time.monotonic() < settle_end:
            users.reap()
            gevent.sleep(0.1)
        t_stop = time.monotonic()
        result["fake_process_lateness"] = ticker.stop()
        result["sending_s"] = round(sending_s, 1)
        result["settle_s"] = round(t_stop - load_started - sending_s, 1)
        result["platforms"] = {p: platform_numbers(fleet, users, p, mine(p), t_stop)
                               for p in platforms}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            result["exit_code"] = proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            result["exit_code"] = proc.wait()
            result["killed_after_s"] = STOP_TIMEOUT_S
    if trace and os.path.exists(trace_path):
        with open(trace_path) as f:
            result["hub_trace"] = json.load(f)
    result["feishu_events_left_unacked"] = cancel_pending_feishu_events(fleet)
    result["log"] = log_counts(variant, log_path)
    sys.stderr.write(f"cascade: {variant} done exit={result['exit_code']}\n")
    return result


def summary_rows(variants: dict) -> list[dict]:
    rows = []
    for name, v in variants.items():
        for p, n in v.get("platforms", {}).items():
            rows.append({"variant": name, "platform": p, "disconnects": n["disconnects"],
                         "lateness_p99_ms": n["keepalive_lateness"]["p99_ms"],
                         "lateness_max_ms": n["keepalive_lateness"]["max_ms"],
                         "sent": n["sent"], "delivered": n["delivered"], "lost": n["lost"],
                         "duplicated": n["duplicated"],
                         "latency_p99_ms": n["reply_latency"]["p99_ms"]})
    return rows


def hermes_targets(v: dict | None) -> dict | None:
    """The issue's targets for hermes-green (60 s, 8 turns): 0 disconnects, keepalive lateness
    p99 < 20 ms and max < 50 ms, 0 lost, 0 duplicated, on every platform."""
    if not v or "platforms" not in v:
        return None
    checks = {}
    for p, n in v["platforms"].items():
        late = n["keepalive_lateness"]
        checks[p] = {"disconnects_0": n["disconnects"] == 0, "lateness_p99_lt_20ms":
                     late["p99_ms"] < 20, "lateness_max_lt_50ms": late["max_ms"] < 50,
                     "lost_0": n["lost"] == 0, "duplicated_0": n["duplicated"] == 0}
    return {"met": all(all(c.values()) for c in checks.values()), "checks": checks}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--turns", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--settle", type=float, default=30.0, help="max wait for answers after load")
    ap.add_argument("--primes", type=int, default=3_000_000,
                    help="the CPU tool's limit (3e6: ~0.35 s; 1e7: ~1.2 s on this machine)")
    ap.add_argument("--logs", default=None, help="keep each variant's log in this folder")
    ap.add_argument("--platforms", default=",".join(PLATFORMS),
                    help="comma-separated, or 'all': every fleet platform for hermes-green (the "
                         "baselines run the three they speak); the turns are spread over them")
    ap.add_argument("--trace", action="store_true",
                    help="run hermes-green under bench/hubtrace.py: hub time and keepalive "
                         "lateness by cause (adds ~2 us per greenlet switch)")
    args = ap.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(VARIANTS)}")
    logs_dir = args.logs or tempfile.mkdtemp(prefix="cascade-logs-")
    os.makedirs(logs_dir, exist_ok=True)

    platforms = all_platforms() if args.platforms == "all" else tuple(
        p.strip() for p in args.platforms.split(",") if p.strip())
    fleet = FakeFleet(platforms, keepalive=KEEPALIVE, llm_chunk_delay_s=LLM_CHUNK_DELAY_S).start()
    results: dict[str, dict] = {}
    try:
        for variant in variants:
            try:
                results[variant] = run_variant(fleet, variant, args, logs_dir)
            except RuntimeError as e:
                results[variant] = {"error": str(e)}
            gevent.sleep(1.0)  # let closed sockets settle before the next variant connects
    finally:
        fleet.stop()
    emit({"bench": "cascade", "machine": machine(),
          "params": {"seconds": args.seconds, "turns": args.turns, "settle_max_s": args.settle,
                     "keepalive_interval_s": KEEPALIVE.interval_s,
                     "keepalive_deadline_s": KEEPALIVE.deadline_s,
                     "llm_chunk_delay_s": LLM_CHUNK_DELAY_S, "give_up_s": GIVE_UP_S,
                     "primes": args.primes, "texts": texts(args.primes),
                     "hermes_green_executors": {"threads": 4, "processes": 2},
                     "baseline_reconnect_delay_s": 2.0},
          "fakes": "one FakeFleet for every variant, one variant after another; a variant's "
                   "numbers come from its own connection ids, message ids and time window",
          "notes": ["keepalive lateness covers the beats that reached the fake; a beat later "
                    "than the deadline finds its connection closed and shows up as a disconnect",
                    "delivered/lost are counted when the variant is stopped (after --settle); "
                    "duplicated = the same reply text twice for one message",
                    "reply latency: first answer at the fake minus the time the user sent"],
          "logs": logs_dir,
          "summary": summary_rows(results),
          "hermes_green_targets": hermes_targets(results.get("hermes-green")),
          "variants": results})


if __name__ == "__main__":
    main()
