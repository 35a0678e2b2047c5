"""Time from a lost connection to an established session again, per platform and fault, for a
real `bin/hermes-green` process; measured by the fake (fault injected -> subscribe answered /
READY or RESUMED sent / first ping received on the new connection).

    python bench/reconnect.py [--repeat 5]

Faults: a network drop (no close frame, or for Telegram's long poll a 502 on the poll in
flight) on every platform the fleet runs; on QQ also close 4008 (rate limit: resume), close 4009
(heartbeat timeout: resume) and op 7 (server asks to reconnect); on Discord op 7 and close 4000;
on Slack `disconnect` refresh_requested (the old connection closes 5 s later; the time measured
is until the successor's hello, which comes before that close: no gap); on DingTalk a SYSTEM
`disconnect` (the server's rotation notice).
The competitor measured 2.0 s after a drop and 62 s after a 4008. Prints JSON.

Each fault follows a healthy period, as real drops do: the gateway's backoff resets after
`healthy_after_s` (60 s in production, 2 s here to keep the run short), and faults come 2.5 s
after the previous session was up. Faults closer together than that are flapping, and there
the backoff grows on purpose (uniform(0, 1 s), (0, 2 s), ... up to 60 s).
"""
from _common import emit, machine, ms_summary  # noqa: I001  (first: sys.path, patching)

import argparse
import sys
import time

import gevent

from footprint import Gateway
from hermes_green.testing.fleet import FakeFleet, Keepalive, all_platforms

HEALTHY_S = 2.0
# Faults beyond a drop, per platform (each fake's own fault controls).
EXTRA_FAULTS = {"qqbot": ["close_4008", "close_4009", "op7"], "discord": ["op7", "close_4000"],
                "slack": ["refresh_requested"], "dingtalk": ["disconnect"]}


def faults_for(platforms) -> list[tuple[str, str]]:
    return [(p, f) for p in platforms for f in ["drop", *EXTRA_FAULTS.get(p, [])]]


def inject(driver, fault: str) -> None:
    fake = driver.fake
    if fault == "drop":
        driver.drop()
    elif fault.startswith("close_"):
        fake.close_with(int(fault.split("_")[1]), "bench")
    elif fault == "op7":
        (fake.send_op7 if hasattr(fake, "send_op7") else fake.send_reconnect)()
    elif fault == "refresh_requested":
        fake.refresh()
    elif fault == "disconnect":  # DingTalk's SYSTEM disconnect: the server closes ~10 s later
        fake.send_disconnect()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--only", help="comma-separated platform:fault pairs, e.g. wecom:drop")
    ap.add_argument("--log-level", default="warning")
    args = ap.parse_args()
    faults = [f for f in faults_for(all_platforms())
              if not args.only or f"{f[0]}:{f[1]}" in args.only.split(",")]
    fleet = FakeFleet(sorted({p for p, _ in faults}),  # only the platforms measured
                      keepalive=Keepalive(interval_s=1.0, deadline_s=1.5)).start()
    gw = Gateway({"gateway": {"status": {"enabled": False}, "log_level": args.log_level},
                  "platforms": fleet.platforms_config(backoff={"healthy_after_s": HEALTHY_S})})
    results = {}
    try:
        fleet.wait_for(lambda: all(d.sessions() for d in fleet.drivers.values()), timeout=30)
        gevent.sleep(HEALTHY_S + 0.5)  # the first fault, too, comes after a healthy period
        for platform, fault in faults:
            driver = fleet.drivers[platform]
            times = []
            for _ in range(args.repeat):
                before = {sid for sid, _ in driver.sessions()}
                t0 = time.monotonic()
                inject(driver, fault)
                new = fleet.wait_for(lambda: [(sid, up) for sid, up in driver.sessions()
                                              if sid not in before and up >= t0], timeout=30)
                times.append(new[0][1] - t0)
                if args.log_level == "debug":
                    sys.stderr.write(f"BENCH {platform}:{fault} {times[-1]:.3f}\n")
                gevent.sleep(HEALTHY_S + 0.5)  # a healthy period before the next fault
            results[f"{platform}:{fault}"] = ms_summary(times)
    finally:
        code = gw.stop()
        if args.log_level == "debug":
            sys.stderr.write("".join(line for _, line in gw.lines))
        fleet.stop()
    emit({"bench": "reconnect", "machine": machine(), "repeat": args.repeat,
          "gateway_exit_code": code, "reconnect": results})


if __name__ == "__main__":
    main()
