"""Start-up time and memory of a real `bin/hermes-green --config` process.

    python bench/footprint.py [--quick]

Measured (RSS of the gateway process; process-pool workers are counted separately):
- start-up: exec -> `gateway started` (no platforms) or -> every platform `connected`;
  idle RSS 3 s after that; for: no platforms, WeCom + QQ Bot (no Feishu), all three;
- RSS after 100 and 1,000 chats each had a conversation and went idle: all at once (a burst:
  the figure holds the burst's high-water mark), and 50 at a time (what an idle chat keeps);
- RSS with 50 turns in flight (the fake LLM streams slowly, so all 50 are mid-answer).
The fakes run in this process; the gateway is a child process. Prints JSON.

The gateway loads hermes_green's bytecode, compiled first as `pip install` does (and as a
checkout's first run does, unless PYTHONDONTWRITEBYTECODE is set). `wecom_qqbot_from_source` is
the same start from a copy without bytecode and with PYTHONDONTWRITEBYTECODE=1, as in
deploy/Dockerfile today: every module is compiled at each start (about 60 ms and 1.3 MB more).
"""
from _common import emit, machine  # noqa: I001  (first: puts the repo on sys.path, patches)

import argparse
import compileall
import os
import shutil
import subprocess
import sys
import tempfile
import time

import gevent
import psutil
import yaml

from hermes_green.testing.fleet import FakeFleet, Keepalive

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "bin", "hermes-green")


class Gateway:
    """The gateway as a child process; its stderr log lines are collected as they arrive."""

    def __init__(self, config: dict, *, from_source: bool = False) -> None:
        self.dir = tempfile.mkdtemp(prefix="hg-footprint-")
        config["gateway"]["data_dir"] = os.path.join(self.dir, "data")
        path = os.path.join(self.dir, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(config, f)
        binary, env = BIN, None
        if from_source:  # a copy of the checkout without bytecode, and none written
            tree = os.path.join(self.dir, "src")
            shutil.copytree(os.path.join(ROOT, "hermes_green"), os.path.join(tree, "hermes_green"),
                            ignore=shutil.ignore_patterns("__pycache__"))
            binary = os.path.join(tree, "bin", "hermes-green")
            os.makedirs(os.path.dirname(binary))
            shutil.copy(BIN, binary)
            env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, binary, "--config", path], env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.lines: list[tuple[float, str]] = []
        self._reader = gevent.spawn(self._read)

    def _read(self) -> None:
        for raw in self.proc.stderr:
            self.lines.append((time.monotonic(), raw.decode(errors="replace")))

    def wait_for(self, needles: list[str], timeout: float = 60.0) -> float:
        """Seconds from exec until every needle appeared in some log line."""
        deadline = time.monotonic() + timeout
        while True:
            hits = [min((t for t, line in self.lines if n in line), default=None) for n in needles]
            if all(h is not None for h in hits):
                return max(hits) - self.started
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"gateway never logged {needles}: "
                                   f"{''.join(line for _, line in self.lines[-10:])}")
            gevent.sleep(0.005)

    def rss_mb(self) -> float:
        return round(psutil.Process(self.proc.pid).memory_info().rss / 2**20, 1)

    def workers_rss_mb(self) -> float:
        kids = psutil.Process(self.proc.pid).children(recursive=True)
        return round(sum(k.memory_info().rss for k in kids) / 2**20, 1)

    def stop(self) -> int:
        self.proc.terminate()
        code = self.proc.wait(timeout=60)
        self._reader.join(timeout=5)
        return code


def base_config(fleet: FakeFleet | None, platforms: tuple) -> dict:
    cfg = {"gateway": {"status": {"enabled": False}, "log_level": "info"},
           "executors": {"threads": 4, "processes": 1}}
    if fleet is not None:
        cfg["agent"] = fleet.agent_config(tools=["hermes_green.agent.builtin_tools"])
        cfg["platforms"] = {k: v for k, v in fleet.platforms_config().items() if k in platforms}
    return cfg


def compile_package() -> None:
    """hermes_green's bytecode in its __pycache__ directories (ignored by git)."""
    if not compileall.compile_dir(os.path.join(ROOT, "hermes_green"), quiet=1):
        raise RuntimeError("compileall failed on hermes_green")


def startup(platforms: tuple, *, from_source: bool = False) -> dict:
    fleet = FakeFleet(platforms, keepalive=Keepalive(5.0, 30.0)).start() if platforms else None
    gw = Gateway(base_config(fleet, platforms), from_source=from_source)
    try:
        needles = ([f"connected platform={p}" for p in platforms] if platforms
                   else ["gateway started"])
        ready_s = gw.wait_for(needles)
        gevent.sleep(3.0)  # idle: let start-up garbage settle before reading RSS
        return {"platforms": list(platforms), "startup_s": round(ready_s, 3),
                "idle_rss_mb": gw.rss_mb(), "exit_code": gw.stop()}
    finally:
        if fleet is not None:
            fleet.stop()


def idle_chats_paced(n_chats: list[int], at_once: int = 50) -> dict:
    """RSS per idle chat without a burst's high-water mark: chats come `at_once` at a time (each
    group answered before the next writes). Python's allocator keeps the arenas a burst of a
    thousand simultaneous turns touched (malloc_trim returns 0.3 MB of it), so the all-at-once
    figure below measures the burst, and this one what an idle chat keeps."""
    fleet = FakeFleet(("qqbot",), keepalive=Keepalive(5.0, 30.0), llm_chunk_delay_s=0.0).start()
    gw = Gateway(base_config(fleet, ("qqbot",)))
    out: dict = {"at_once": at_once}
    try:
        gw.wait_for(["connected platform=qqbot"])
        sent = 0
        for n in n_chats:
            while sent < n:
                for _ in range(min(at_once, n - sent)):
                    fleet.send("qqbot", f"hello from chat {sent}", chat=sent)
                    sent += 1
                fleet.wait_for(fleet.all_answered, timeout=300)
            gevent.sleep(2.0)
            out[f"rss_mb_after_{n}_idle_chats"] = gw.rss_mb()
        first, last = n_chats[0], n_chats[-1]
        if last > first:
            out[f"kb_per_idle_chat_{first}_to_{last}"] = round(
                (out[f"rss_mb_after_{last}_idle_chats"]
                 - out[f"rss_mb_after_{first}_idle_chats"]) * 1024 / (last - first), 1)
    finally:
        gw.stop()
        fleet.stop()
    return out


def chats_and_turns(n_chats: list[int], in_flight: int) -> dict:
    fleet = FakeFleet(("qqbot",), keepalive=Keepalive(5.0, 30.0), llm_chunk_delay_s=0.0).start()
    gw = Gateway(base_config(fleet, ("qqbot",)))
    out: dict = {}
    try:
        gw.wait_for(["connected platform=qqbot"])
        sent = 0
        for n in n_chats:
            while sent < n:
                fleet.send("qqbot", f"hello from chat {sent}", chat=sent)
                sent += 1
            fleet.wait_for(fleet.all_answered, timeout=300)
            gevent.sleep(2.0)
            out[f"rss_mb_after_{n}_idle_chats"] = gw.rss_mb()
        # turns in flight: the LLM now streams each answer over ~60 s
        from hermes_green.testing.fake_llm import text
        fleet.llm.script(*[text("slow " * 300, chunk_chars=5, delay_s=1.0)] * in_flight)
        base = len(fleet.llm.chat_requests)
        for i in range(in_flight):
            fleet.send("qqbot", "a slow question", chat=100_000 + i)
        fleet.wait_for(lambda: len(fleet.llm.chat_requests) >= base + in_flight, timeout=60)
        gevent.sleep(2.0)
        out[f"rss_mb_with_{in_flight}_turns_in_flight"] = gw.rss_mb()
        out["process_workers_rss_mb"] = gw.workers_rss_mb()
    finally:
        gw.stop()
        fleet.stop()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="skip the 1,000-chat step")
    args = ap.parse_args()
    compile_package()
    results = {
        "bytecode": "compiled before the runs (as pip install does)",
        "no_platforms": startup(()),
        "wecom_qqbot_no_feishu": startup(("wecom", "qqbot")),
        "wecom_qqbot_from_source": startup(("wecom", "qqbot"), from_source=True),
        "all_three_with_feishu": startup(("wecom", "feishu", "qqbot")),
        "sessions": chats_and_turns([100] if args.quick else [100, 1000], 50),
        "idle_chats_50_at_a_time": idle_chats_paced([100, 300] if args.quick else [100, 1000]),
    }
    emit({"bench": "footprint", "machine": machine(), "results": results})


if __name__ == "__main__":
    main()
