"""Past one host: CPU-bound turns per second with 1, 2 and 4 worker processes, and how long a
dead gateway node's bots take to serve again on another node.

    python bench/scale.py [--workers 1,2,4] [--rounds 3] [--turns 48] [--primes 3000000]
                          [--failovers 3] [--out bench/results/scale.json]

Everything is real and on this machine: a redis-server on loopback (no persistence), the fleet's
fakes and the fake LLM in this process, and `bin/hermes-green --role ...` processes.

Throughput, per worker count N: one gateway node (Telegram), N worker nodes, each with one tool
process (`executors.processes: 1`). Each turn asks the fake LLM something that makes it call
`count_primes(--primes)` (pure Python in the worker's process pool: ~0.35 s of one core at 3e6),
then answers with the result. A warm-up of 2 turns per worker (process pools start), then
--turns turns in --turns different chats sent at once; turns/s = turns / (last answer - first
send). Chats are spread over the work shards by hash, so workers do not get exactly equal shares.
The worker counts run in turn, --rounds times (1, 2, 4, 1, 2, 4, ...); `turns_per_s` is each
count's best round (on a machine shared with other work, the best round is the least disturbed
one), `throughput_runs` has every round.

Failover, --failovers times: two gateway nodes (WeCom and Telegram, both single-connection
bots) and one worker; the first node takes both bots; it is killed with -9, and a user writes on
each platform at once (WeCom: as soon as the fake has no live connection, since it drops what
arrives then). failover_s per platform = the first answer to those messages minus the kill: the
lease's TTL (5 s) at most, plus the next acquire round (0.5 s), the connect, and the turn.

Calibration, before and after: the same CPU task in 1 and 2 plain processes (no gateway), so
the JSON says how much parallel CPU the machine gave at the time (other load shows there).

Prints JSON and writes it to --out. Numbers are what was measured here; the machine is in it.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, machine

import gevent  # noqa: E402

from hermes_green.testing.fleet import FakeFleet  # noqa: E402
from hermes_green.testing.redis_server import RedisServer  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.cluster_support import Node  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_S = 60.0


def config(tmp: Path, name: str, redis_url: str, fleet: FakeFleet) -> Path:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({
        "gateway": {"data_dir": str(tmp / name), "store": redis_url, "log_level": "info",
                    "status": {"enabled": False}, "drain_timeout_s": 5},
        "agent": fleet.agent_config(tools=["hermes_green.agent.demo_tools"]),
        "executors": {"threads": 2, "processes": 1},
        "platforms": fleet.platforms_config(backoff={"initial_s": 0.2, "max_s": 1.0})}))
    return path


def wait(fleet: FakeFleet, predicate, timeout: float, what: str):
    return fleet.wait_for(predicate, timeout=timeout, what=lambda: what)


def wait_line(node: Node, pattern: str, timeout: float = START_TIMEOUT_S) -> None:
    node.wait_for(pattern, timeout=timeout)


def shares(workers: list[Node]) -> list[set[int]]:
    """The shards each worker says it holds now (its last `shards held` line)."""
    out = []
    for w in workers:
        lines = w.find(r"shards held node=\S+ shards=(\S+)")
        last = lines[-1].group(1) if lines else "none"
        out.append(set() if last == "none" else {int(x) for x in last.split(",")})
    return out


def shared_out(workers: list[Node], shards: int = 16) -> bool:
    held = shares(workers)
    sizes = [len(h) for h in held]
    return (sum(sizes) == shards and len(set().union(*held)) == shards
            and max(sizes) - min(sizes) <= 1)


def _cpu_task(limit: int) -> int:
    from hermes_green.agent.demo_tools import count_primes
    return count_primes(limit)


def calibrate(primes: int, calls: int = 8) -> dict:
    """The same CPU task in 1 and 2 plain processes, no gateway: how much parallel CPU this
    machine gives right now (other work on it shows here, not as a fault of the workers)."""
    import concurrent.futures
    import multiprocessing
    out = {}
    for procs in (1, 2):
        ctx = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(procs, mp_context=ctx) as pool:
            list(pool.map(_cpu_task, [1000] * procs))  # started
            t = time.perf_counter()
            list(pool.map(_cpu_task, [primes] * (calls * procs)))
            out[str(procs)] = round(calls * procs / (time.perf_counter() - t), 3)
    return {"tool_calls_per_s_by_processes": out,
            "parallel_speedup": round(out["2"] / out["1"], 2)}


def throughput(redis: RedisServer, tmp: Path, workers: int, turns: int, primes: int) -> dict:
    redis.flush()
    fleet = FakeFleet(("telegram",), llm_chunk_delay_s=0.005).start()
    nodes = []
    try:
        nodes.append(Node("g", config(tmp, f"tp{workers}-g", redis.url, fleet), "gateway"))
        nodes += [Node(f"w{i}", config(tmp, f"tp{workers}-w{i}", redis.url, fleet), "worker")
                  for i in range(workers)]
        wait(fleet, lambda: fleet.connected("telegram"), START_TIMEOUT_S, "telegram connected")
        deadline = time.monotonic() + START_TIMEOUT_S
        while not shared_out(nodes[1:]):  # the workers' balance rounds run every second
            if time.monotonic() > deadline:
                raise AssertionError(f"shards not shared out: {shares(nodes[1:])}")
            gevent.sleep(0.1)
        text = f"please compute the primes below {primes}"
        warm = [fleet.send("telegram", text, chat=1000 + i) for i in range(2 * workers)]
        wait(fleet, lambda: all(fleet.answers("telegram", m) for m in warm), 120, "warm-up")
        started = time.monotonic()
        mids = [fleet.send("telegram", text, chat=i) for i in range(turns)]
        wait(fleet, lambda: all(fleet.answers("telegram", m) for m in mids), 600, "turns")
        index = fleet.answer_index("telegram")
        last = max(index[m][1] for m in mids)
        elapsed = last - started
        answered_once = all(len(index[m][0]) == 1 for m in mids)
        return {"workers": workers, "turns": turns, "seconds": round(elapsed, 3),
                "turns_per_s": round(turns / elapsed, 3), "answered_once": answered_once}
    finally:
        for n in nodes:
            n.stop()
        fleet.stop()


def failover_once(redis: RedisServer, tmp: Path, round_: int) -> dict:
    redis.flush()
    fleet = FakeFleet(("wecom", "telegram"), llm_chunk_delay_s=0.005).start()
    nodes = []
    try:
        cfg = lambda name: config(tmp, f"fo{round_}-{name}", redis.url, fleet)  # noqa: E731
        first = Node("g1", cfg("g1"), "gateway")
        nodes.append(first)
        wait(fleet, lambda: fleet.connected("wecom") and fleet.connected("telegram"),
             START_TIMEOUT_S, "first node connected")
        old = fleet.fakes["wecom"].current_conn_id
        nodes += [Node("g2", cfg("g2"), "gateway"), Node("w", cfg("w"), "worker")]
        for n in nodes[1:]:
            wait_line(n, "node started")
        probe = fleet.send("telegram", "hello before", chat=1)
        wait(fleet, lambda: fleet.answers("telegram", probe), 60, "served before the kill")
        first.kill9()
        killed = first.killed_at
        tg = fleet.send("telegram", "hello after", chat=2)
        wait(fleet, lambda: fleet.fakes["wecom"].current_conn_id != old, 30, "wecom closed")
        wait(fleet, lambda: fleet.fakes["wecom"].current_conn_id not in (None, old), 30,
             "wecom taken over")
        reconnected = time.monotonic() - killed
        wc = fleet.send("wecom", "hello after", chat=2)
        wait(fleet, lambda: fleet.answers("telegram", tg) and fleet.answers("wecom", wc), 60,
             "answered after the kill")
        return {"telegram_s": round(fleet.first_answer_at("telegram", tg) - killed, 3),
                "wecom_s": round(fleet.first_answer_at("wecom", wc) - killed, 3),
                "wecom_reconnected_s": round(reconnected, 3)}
    finally:
        for n in nodes:
            n.stop()
        fleet.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", default="1,2,4")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--turns", type=int, default=48)
    ap.add_argument("--primes", type=int, default=3_000_000)
    ap.add_argument("--failovers", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "scale.json"))
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="hg-scale-"))
    load_before = os.getloadavg()
    redis = RedisServer(tmp / "redis").start()
    try:
        before = calibrate(args.primes)
        runs = [throughput(redis, tmp, int(n), args.turns, args.primes)
                for _ in range(args.rounds) for n in args.workers.split(",")]
        failovers = [failover_once(redis, tmp, i) for i in range(args.failovers)]
        after = calibrate(args.primes)
    finally:
        redis.stop()
    worst = [max(f["telegram_s"], f["wecom_s"]) for f in failovers]
    doc = {
        "benchmark": "scale",
        "machine": machine(),
        "note": (f"{os.cpu_count()} cores on this machine, shared with other work while this "
                 "ran (see cpu_calibration and load_avg_before): the gateway, the fakes, the "
                 "fake LLM and redis-server share them with the workers, so CPU-bound "
                 "throughput can grow only up to the free cores; turns_per_s is each worker "
                 "count's best round"),
        "turns_per_s": {n: max(r["turns_per_s"] for r in runs if str(r["workers"]) == n)
                        for n in args.workers.split(",")},
        "turns_per_s_median": {n: statistics.median(r["turns_per_s"] for r in runs
                                                    if str(r["workers"]) == n)
                               for n in args.workers.split(",")},
        "throughput_runs": runs,
        "failover_s": round(statistics.median(worst), 3) if worst else None,
        "failover_max_s": round(max(worst), 3) if worst else None,
        "failover_runs": failovers,
        "load_avg_before": [round(x, 2) for x in load_before],  # others' work on the machine
        "cpu_calibration": {"before": before, "after": after},
        "settings": {"primes": args.primes, "turns": args.turns, "lease_ttl_s": 5.0,
                     "acquire_every_s": 0.5, "tool_processes_per_worker": 1},
    }
    emit(doc)
    Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
