"""How late a 10 ms timer on the hub gets while K pure-Python CPU tools run in each executor.

    python bench/executors.py [--iterations 20000000] [--ks 1,2,4] [--executors inline,thread,process]
                              [--switch-interval 0.001]

The tool is `demo_tools.spin` (a pure-Python loop; 2e7 iterations is about 2 s on one core).
Each run starts K calls at once in one executor and records, for every wake of a 10 ms ticker
greenlet, how late it woke. Process workers are started (and warmed) before the clock starts.
`sys.setswitchinterval` is set as the runtime sets it (1 ms) unless told otherwise.

Prints JSON: p50/p99/max lateness (ms) and wall time per (executor, K), plus an idle baseline.
"""
import argparse
import sys
import time

from _common import emit, machine, ms_summary

import gevent  # noqa: E402

from hermes_green import runtime  # noqa: E402
from hermes_green.agent import demo_tools  # noqa: E402
from hermes_green.agent.executors import Executors  # noqa: E402

TICK_S = 0.010


class Ticker:
    """A greenlet that wants to wake every 10 ms and records how late each wake is."""

    def __init__(self) -> None:
        self.lateness: list[float] = []
        self._g = gevent.spawn(self._run)
        self._g.name = "bench:ticker"

    def _run(self) -> None:
        due = time.monotonic() + TICK_S
        while True:
            gevent.sleep(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            late = max(0.0, now - due)
            self.lateness.append(late)
            due = now + TICK_S if late > TICK_S else due + TICK_S  # no catch-up bursts

    def stop(self) -> list[float]:
        self._g.kill()
        return self.lateness


def measure(executors: Executors, executor: str, k: int, iterations: int) -> dict:
    ticker = Ticker()
    gevent.sleep(TICK_S * 3)  # let the ticker settle on its timetable
    first = len(ticker.lateness)
    started = time.monotonic()
    calls = [gevent.spawn(executors.run, executor, demo_tools.spin, (iterations,),
                          timeout_s=3600, label="bench_spin") for _ in range(k)]
    gevent.joinall(calls, raise_error=True)
    wall = time.monotonic() - started
    gevent.sleep(TICK_S * 2)  # the wake that an inline tool delayed is recorded only now
    lateness = ticker.stop()[first:]
    return {"executor": executor, "k": k, "wall_s": round(wall, 3), **ms_summary(lateness)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iterations", type=int, default=20_000_000)
    ap.add_argument("--ks", default="1,2,4")
    ap.add_argument("--executors", default="inline,thread,process")
    ap.add_argument("--switch-interval", type=float, default=runtime.SWITCH_INTERVAL_S)
    args = ap.parse_args()
    ks = [int(k) for k in args.ks.split(",")]
    kinds = args.executors.split(",")
    sys.setswitchinterval(args.switch_interval)

    executors = Executors(threads=max(ks), processes=max(ks))
    try:
        if "process" in kinds:  # start every worker now: spawn cost is not what we measure
            gevent.joinall([gevent.spawn(executors.run, "process", demo_tools.spin, (1,),
                                         timeout_s=60) for _ in range(max(ks))], raise_error=True)
        idle = Ticker()
        gevent.sleep(1.0)
        results = [{"executor": "idle", "k": 0, **ms_summary(idle.stop())}]
        for kind in kinds:
            for k in ks:
                results.append(measure(executors, kind, k, args.iterations))
                sys.stderr.write(f"{kind} k={k}: p99 {results[-1]['p99_ms']} ms\n")
    finally:
        executors.close()
    emit({"bench": "executors", "machine": machine(), "tool": "demo_tools.spin",
          "iterations": args.iterations, "tick_ms": TICK_S * 1000,
          "switch_interval_s": args.switch_interval,
          "process_workers": max(ks), "worker_nice": 10, "results": results})


if __name__ == "__main__":
    main()
