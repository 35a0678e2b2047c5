"""How long `/stop` takes to end a running turn, through a real gateway on the test platform.

    python bench/stop_latency.py [--runs 20]

Two cases, each run `--runs` times on one gateway (LLM agent on the fake LLM, one process
worker):
- `process_tool`: the turn is inside a process tool that blocks forever (the worker reports its
  pid over a socket first). Measured from sending `/stop` to: the worker's socket closing (the
  worker is dead), the `/stop` answer reaching the platform fake (the turn has ended and its
  cleanup is done: the command waits for it), and the pid gone from the process table (reaped).
- `streaming`: the turn is streaming a long answer. Measured from sending `/stop` to the fake
  LLM seeing the client leave, and to the `/stop` answer reaching the platform.

Prints JSON: p50/p99/max per measure, and `within_1s` (every run ended the turn within a second).
"""
import argparse
import socket
import sys
import tempfile
import time
from pathlib import Path

from _common import emit, machine, ms_summary

import gevent  # noqa: E402
import psutil  # noqa: E402

from hermes_green.agent.llm import LLMClient  # noqa: E402
from hermes_green.agent.loop import LLMAgent  # noqa: E402
from hermes_green.config import AgentConfig, ExecutorsConfig, RateLimitConfig  # noqa: E402
from hermes_green.testing.fake_llm import FakeLLM, text, tool_call  # noqa: E402
from tests.fakes.fake_testchat import FakeTestChat  # noqa: E402
from tests.support import start_inprocess_gateway  # noqa: E402

KEY = "sk-bench-stop"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    args = ap.parse_args()
    llm = FakeLLM(api_key=KEY, chunk_delay_s=0.001).start()
    fake = FakeTestChat().start()
    section = {"base_url": llm.base_url, "api_key": KEY, "model": "fake-model",
               "tools": ["tests.fakes.sample_tools"], "max_retries": 0}
    cfg = AgentConfig(**section)
    agent = LLMAgent(cfg, ExecutorsConfig(threads=2, processes=1),
                     llm=LLMClient.from_config(cfg, read_timeout_s=30))
    gw = start_inprocess_gateway(Path(tempfile.mkdtemp()), fake, agent,
                                 config={"agent": section},
                                 testchat={"rate_limit": RateLimitConfig(messages=0)})
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(4)
    worker_dead, tool_answered, reaped = [], [], []
    stream_closed, stream_answered = [], []
    try:
        for i in range(args.runs):
            llm.script(tool_call("report_pid_and_block", port=listener.getsockname()[1]))
            fake.send_user_message(f"block {i}")
            with gevent.Timeout(30):
                conn, _ = listener.accept()
                pid = int(conn.makefile().readline())
            t0 = time.monotonic()
            stop = fake.send_user_message("/stop")
            with gevent.Timeout(10):
                conn.recv(1)  # EOF: the worker died
            worker_dead.append(time.monotonic() - t0)
            fake.wait_for(lambda: fake.replies_to(stop))
            tool_answered.append(time.monotonic() - t0)
            while psutil.pid_exists(pid):
                gevent.sleep(0.001)
            reaped.append(time.monotonic() - t0)
            conn.close()

            llm.disconnected.clear()
            llm.streaming.clear()
            llm.script(text("word " * 5000, chunk_chars=5, delay_s=0.005))
            fake.send_user_message(f"talk {i}")
            assert llm.streaming.wait(10)
            t0 = time.monotonic()
            stop = fake.send_user_message("/stop")
            assert llm.disconnected.wait(10)
            stream_closed.append(time.monotonic() - t0)
            fake.wait_for(lambda: fake.replies_to(stop))
            stream_answered.append(time.monotonic() - t0)
            gw.wait_idle(10)
    finally:
        gw.shutdown()
        fake.stop()
        llm.stop()
        listener.close()
    emit({"bench": "stop_latency", "machine": machine(), "runs": args.runs,
          "process_tool": {"worker_dead": ms_summary(worker_dead),
                           "stop_answered": ms_summary(tool_answered),
                           "worker_reaped": ms_summary(reaped)},
          "streaming": {"stream_closed": ms_summary(stream_closed),
                        "stop_answered": ms_summary(stream_answered)},
          "within_1s": max(tool_answered + reaped + stream_answered) < 1.0})
    return 0


if __name__ == "__main__":
    sys.exit(main())
