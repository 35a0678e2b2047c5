"""Messages per second end to end, and what the gateway adds to each message.

    python bench/throughput.py [--platform NAME] [--messages 3000] [--rate 200]

NAME: any platform of the fleet (wecom, qqbot, feishu, telegram, discord, slack, dingtalk);
results per platform go to bench/results/throughput-NAME.json.

Path measured: fake platform -> adapter -> SQLite journal -> session -> zero-latency agent (the
echo agent: no `agent` section) -> outbox (SQLite) -> adapter -> fake platform, with durable
writes on. The gateway is a real `bin/hermes-green` child pinned to one core; the fake runs in
this process pinned to the other, so the gateway's number is not shared with the load.

- burst: `--messages` sent over 200 chats as fast as the fake can; throughput = messages /
  (last reply - first send);
- paced: `--rate` messages/s for 5 s; overhead per message = reply receipt - send, p50/p99.
Prints JSON.
"""
from _common import emit, machine, ms_summary  # noqa: I001  (first: sys.path, patching)

import argparse
import gc
import time

import gevent
import psutil

from footprint import Gateway
from hermes_green.testing.fleet import FakeFleet, Keepalive, all_platforms

CHATS = 200


def wait_replies(fleet: FakeFleet, platform: str, expected: int, *, timeout: float,
                 what=lambda: "") -> None:
    """Poll (every 20 ms) until the fake holds `expected` replies. Not fleet.wait_for: it
    re-reads every reply on every reply the fake records, which is O(n^2) in this process,
    on the fake's core. The times measured are the fake's own receipt times, not the poll's."""
    deadline = time.monotonic() + timeout
    while fleet.reply_count(platform) < expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{fleet.reply_count(platform)} of {expected} replies after "
                                 f"{timeout} s: {what()}")
        gevent.sleep(0.02)


def run(platform: str, messages: int, rate: float) -> dict:
    fleet = FakeFleet((platform,), keepalive=Keepalive(5.0, 30.0)).start()
    # queue_cap: a burst puts ~15 messages in each chat's queue at once; none may be skipped
    config = {"gateway": {"status": {"enabled": False}, "log_level": "warning",
                          "busy": {"queue_cap": 10_000}},
              # users here send far more than a person would: no per-user limit
              "platforms": {name: {**section, "rate_limit": {"messages": 0}}
                            for name, section in fleet.platforms_config().items()}}
    gw = Gateway(config)
    cores = list(range(psutil.cpu_count()))
    if len(cores) >= 2:
        psutil.Process(gw.proc.pid).cpu_affinity([cores[0]])
        psutil.Process().cpu_affinity([cores[1]])
    try:
        deadline = time.monotonic() + 60
        while not fleet.connected(platform):
            assert time.monotonic() < deadline, "platform never connected"
            gevent.sleep(0.01)
        fleet.wait_for(lambda: fleet.keepalives(platform) >= 1, timeout=30)
        # warm-up (imports, first SQLite pages, connection pools)
        warm = [fleet.send(platform, f"warm {i}", chat=i) for i in range(50)]
        fleet.wait_for(lambda: all(fleet.answers(platform, m) for m in warm), timeout=60)

        sent_at: dict[str, float] = {}
        expected = fleet.reply_count(platform) + messages
        gw_proc = psutil.Process(gw.proc.pid)
        cpu0 = sum(gw_proc.cpu_times()[:2])
        t0 = time.monotonic()
        for i in range(messages):
            mid = fleet.send(platform, f"burst {i}", chat=i % CHATS)
            sent_at[mid] = time.monotonic()
            if i % 50 == 49:
                gevent.sleep(0)  # let the fake's sockets drain
        sending_s = time.monotonic() - t0
        wait_replies(fleet, platform, expected, timeout=600)
        gw_cpu_s = sum(gw_proc.cpu_times()[:2]) - cpu0
        index = fleet.answer_index(platform)
        deadline = time.monotonic() + 60  # the count may include other replies: each message
        while any(m not in index for m in sent_at) and time.monotonic() < deadline:
            gevent.sleep(0.05)
            index = fleet.answer_index(platform)
        last = max(index[m][1] for m in sent_at if m in index)
        burst = {"messages": messages, "seconds": round(last - t0, 3),
                 "messages_per_s": round(messages / (last - t0), 1),
                 # how long the fake took to hand out the burst (an upper bound on what it
                 # can measure: messages / sending_s)
                 "sending_s": round(sending_s, 3),
                 # the gateway's CPU over the burst: its share of the one core it has, and
                 # what one message cost it
                 "gateway_cpu_busy": round(gw_cpu_s / (last - t0), 2),
                 "gateway_cpu_us_per_message": round(gw_cpu_s / messages * 1e6),
                 "lost": sum(1 for m in sent_at if m not in index),
                 "duplicated": sum(1 for m in sent_at if m in index and len(index[m][0]) != 1)}

        # The fakes keep every frame: a GC pass over that heap in this process would be
        # charged to the gateway. Freeze what exists and pause GC while timing.
        gc.collect()
        gc.freeze()
        gc.disable()
        paced: dict[str, float] = {}
        expected = fleet.reply_count(platform) + int(rate * 5)
        interval = 1.0 / rate
        start = time.monotonic()
        for i in range(int(rate * 5)):
            due = start + i * interval
            gevent.sleep(max(0.0, due - time.monotonic()))
            mid = fleet.send(platform, f"paced {i}", chat=i % CHATS)
            paced[mid] = time.monotonic()
        wait_replies(fleet, platform, expected, timeout=120,
                     what=lambda: "".join(line for _, line in gw.lines[-20:]))
        gc.enable()
        # a platform's fake may record other replies (notices, edits) too: wait for each message
        index = fleet.answer_index(platform)
        deadline = time.monotonic() + 60
        while any(m not in index for m in paced) and time.monotonic() < deadline:
            gevent.sleep(0.05)
            index = fleet.answer_index(platform)
        overhead = [index[m][1] - t for m, t in paced.items() if m in index]
        return {"platform": platform, "burst": burst,
                "paced": {"rate_per_s": rate, "unanswered": len(paced) - len(overhead),
                          **{f"overhead_{k}": v for k, v in ms_summary(overhead).items()}},
                "gateway_rss_mb": gw.rss_mb(), "exit_code": gw.stop()}
    finally:
        if gw.proc.poll() is None:
            gw.stop()
        fleet.stop()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--platform", default="wecom", choices=all_platforms())
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--rate", type=float, default=200.0)
    args = ap.parse_args()
    emit({"bench": "throughput", "machine": machine(), "gateway_cores": 1,
          "results": run(args.platform, args.messages, args.rate)})


if __name__ == "__main__":
    main()
