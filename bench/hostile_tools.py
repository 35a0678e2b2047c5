"""How late a 10 ms timer on the hub gets while a built-in tool chews on a hostile input.

    python bench/hostile_tools.py [--cap-s 60] [--repeat 5] [--cases calc:0,page:lt_run,...]
                                  [--label TEXT]

Each case runs in its own child process (so a case that freezes the hub for good can be killed
and reported): the child is the production runtime (patched, hub watch off, requests loaded as
in a gateway) with the built-in tools registered and a warmed process pool. Under a 10 ms ticker
greenlet it makes the tool call `--repeat` times through `call_tool`, as the agent loop does,
and reports the longest call, whether the answer was an error, the ticker's lateness during the
calls, and the longest CPU time the hub's thread spent in one greenlet without switching (on a
busy machine the ticker is late on its own: the idle lateness of the same child, measured for as
long right after, is the noise floor). A child with no answer within `--cap-s` is killed; its
lateness is reported as at least the cap. The hostile inputs and the loopback page server are
tests/fakes/hostile_inputs.py. For "before" numbers run this script and that file in a checkout
of the older code (bench/results/hostile_tools-before.json: commit 7826500).

Prints JSON (results in bench/results/hostile_tools.json).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

from _common import emit, machine, ms_summary

import gevent  # noqa: E402

TICK_S = 0.010


def cases() -> dict[str, tuple[str, dict]]:
    from tests.fakes.hostile_inputs import (HOSTILE_CALCULATIONS, HOSTILE_PAGES,
                                            HOSTILE_TIMEZONES)
    out: dict[str, tuple[str, dict]] = {}
    for i, expr in enumerate(HOSTILE_CALCULATIONS):
        out[f"calc:{i}"] = ("calculate", {"expression": expr})
    for name in HOSTILE_PAGES:
        out[f"page:{name}"] = ("fetch_url", {"url": f"@WEB@/page/{name}"})
    for i, tz in enumerate(HOSTILE_TIMEZONES):
        out[f"tz:{i}"] = ("current_time", {"timezone": tz})
    return out


class HoldMeter:
    """The longest stretch of CPU the main thread spent in one greenlet without switching
    (greenlet.settrace; time.thread_time, so other processes on a busy machine do not count,
    unlike the ticker's wall-clock lateness)."""

    def __init__(self) -> None:
        import greenlet
        self.longest = 0.0
        self._last = time.thread_time()
        self._greenlet = greenlet
        greenlet.settrace(self._on_switch)

    def _on_switch(self, event, args) -> None:
        now = time.thread_time()
        self.longest = max(self.longest, now - self._last)
        self._last = now

    def take(self) -> float:
        self._on_switch(None, None)
        longest, self.longest = self.longest, 0.0
        return longest

    def stop(self) -> None:
        self._greenlet.settrace(None)


def run_one(tool: str, args: dict, repeat: int) -> dict:
    """In the child: `repeat` calls under a 10 ms ticker, after an idle stretch as long."""
    from hermes_green.agent import builtin_tools, demo_tools
    from hermes_green.agent.executors import Executors
    from hermes_green.agent.tools import ToolRegistry, call_tool

    import requests  # noqa: F401  (a gateway has it loaded: the LLM client uses it)

    builtin_tools.ALLOW_PRIVATE_ADDRESSES = True  # the pages come from loopback
    registry = ToolRegistry.from_modules(["hermes_green.agent.builtin_tools"])
    executors = Executors(processes=1)
    executors.run("process", demo_tools.count_primes, (10,), timeout_s=30)  # worker warm
    lateness: list[float] = []

    def tick():
        due = time.monotonic() + TICK_S
        while True:
            gevent.sleep(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            lateness.append(max(0.0, now - due))
            due = now + TICK_S if now - due > TICK_S else due + TICK_S

    ticker = gevent.spawn(tick)
    meter = HoldMeter()
    gevent.sleep(TICK_S * 3)
    calls, during, holds = [], [], []
    for _ in range(repeat):
        first = len(lateness)
        meter.take()
        started = time.monotonic()
        result = call_tool(registry, executors, tool, json.dumps(args))
        wall = time.monotonic() - started
        gevent.sleep(TICK_S * 2)  # the wake a blocked hub delayed is recorded only now
        holds.append(meter.take())
        during += lateness[first:]
        calls.append(wall)
        if wall > 5:
            break
    first = len(lateness)  # the same machine, idle hub, for as long: the noise floor
    gevent.sleep(max(0.2, sum(calls) + TICK_S * 2 * len(calls)))
    idle, idle_hold = lateness[first:], meter.take()
    meter.stop()
    ticker.kill()
    executors.close()
    return {"answered": True, "calls": len(calls), "wall_s": round(max(calls), 3),
            "error": not result.ok, "answer": result.content[:120],
            "lateness": ms_summary(during),
            "longest_hub_hold_cpu_ms": round(max(holds) * 1000, 3),
            "idle_lateness": ms_summary(idle),
            "idle_longest_hub_hold_cpu_ms": round(idle_hold * 1000, 3)}


def run_case(name: str, web_url: str, cap_s: float, repeat: int) -> dict:
    tool, args = cases()[name]
    args = json.loads(json.dumps(args).replace("@WEB@", web_url))
    started = time.monotonic()
    request = json.dumps([tool, args, repeat])
    child = subprocess.Popen([sys.executable, __file__, "--child", request],
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        out, _ = child.communicate(timeout=cap_s)
    except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        return {"tool": tool, "answered": False, "wall_s": f">{cap_s:g} (killed)",
                "lateness": {"max_ms": f">={cap_s * 1000:g} (hub frozen until killed)"}}
    lines = out.decode().strip().splitlines()
    if child.returncode != 0 or not lines:
        return {"tool": tool, "answered": False, "exit_code": child.returncode,
                "wall_s": round(time.monotonic() - started, 3)}
    return {"tool": tool, **json.loads(lines[-1])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cap-s", type=float, default=60.0)
    parser.add_argument("--cases", default="")
    parser.add_argument("--label", default="", help="what code this measures (for the JSON)")
    parser.add_argument("--repeat", type=int, default=5,
                        help="calls per case (a call over 5 s ends the case)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        tool, args, repeat = json.loads(opts.child)
        sys.stdout.write(json.dumps(run_one(tool, args, repeat)) + "\n")
        return
    from tests.fakes.hostile_inputs import (HOSTILE_CALCULATIONS, HOSTILE_TIMEZONES,
                                            HostileWeb)
    labels = {f"calc:{i}": e[:40] for i, e in enumerate(HOSTILE_CALCULATIONS)}
    labels.update({f"tz:{i}": t[:40] for i, t in enumerate(HOSTILE_TIMEZONES)})
    web = HostileWeb().start()
    try:
        names = [n for n in opts.cases.split(",") if n] or list(cases())
        results = {}
        for name in names:
            results[name] = {"input": labels.get(name, name), **run_case(name, web.base_url,
                                                                        opts.cap_s, opts.repeat)}
            sys.stderr.write(f"{name}: {json.dumps(results[name])}\n")
    finally:
        web.stop()
    emit({"label": opts.label, "machine": machine(), "tick_ms": TICK_S * 1000, "cap_s": opts.cap_s,
          "repeat": opts.repeat, "cases": results})


if __name__ == "__main__":
    main()
