"""The web chat in a real browser against a real gateway process: headless Debian chromium
driven by playwright in a subprocess (tests/webchat_browser.py), `bin/hermes-green --config`
in another, the fake LLM here.

One conversation: a message whose answer streams into the page; a gateway that crashes while it
streams the next answer (the page reconnects by itself and gets that answer, once); and a reply
made while the tab is closed, kept across a graceful restart and delivered when the tab is
opened again. Screenshots land in the test's tmp_path.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import gevent
import gevent.event
import pytest
import requests

from hermes_green.testing.fake_llm import FakeLLM, text
from tests.support import BIN, Process, wait_until, write_config

CHROMIUM = os.environ.get("HERMES_CHROMIUM", "/usr/bin/chromium")
SCRIPT = Path(__file__).resolve().parent / "webchat_browser.py"
LLM_KEY = "sk-webchat-browser-test"
FIRST = ("The first answer streams in small pieces, so the page shows it growing before it is "
         "final. " * 3).strip()
SECOND_PARTIAL = "This answer is cut off by a crash and never finishes " * 4
SECOND = "The second answer, made again after the gateway came back."
THIRD = "The third answer, made while the tab was closed."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Browser:
    """tests/webchat_browser.py as a child: a command in, an event out."""

    def __init__(self, url: str, out: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--url", url, "--out", str(out), "--chromium",
             CHROMIUM, "--timeout", "25"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def do(self, command: str, expected: str, timeout: float = 40.0) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        with gevent.Timeout(timeout, AssertionError(f"no {expected!r} from the browser")):
            line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise AssertionError(f"browser ended before {expected!r}: "
                                 f"{self.proc.stderr.read()[-3000:]}")
        event = json.loads(line)
        assert event["event"] == expected, event
        assert event["problems"] == [], event["problems"]  # no script error, no CSP violation
        return event

    def finish(self) -> None:
        if self.proc.poll() is None:
            try:
                self.do("quit", "bye", timeout=15)
                self.proc.wait(timeout=10)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=10)


class GatewayProcess:
    def __init__(self, config: Path, port: int) -> None:
        self.config, self.port = config, port
        self.proc: Process | None = None

    def start(self) -> "GatewayProcess":
        self.proc = Process([sys.executable, BIN, "--config", str(self.config)])
        wait_until(self._chat_ready, timeout=30, what="the gateway serving the chat")
        return self

    def health(self) -> dict | None:
        try:
            return requests.get(f"http://127.0.0.1:{self.port}/healthz", timeout=2).json()
        except (requests.RequestException, ValueError):
            return None

    def _chat_ready(self) -> bool:
        if self.proc.proc.poll() is not None:
            raise AssertionError(f"gateway exited: {self.proc.stderr[-2000:]}")
        doc = self.health()
        return bool(doc and doc["platforms"].get("webchat", {}).get("state") == "ready")

    def outbox_pending(self) -> int | None:
        doc = self.health()
        return None if doc is None else doc["outbox_pending"]

    def crash(self) -> None:
        self.proc.kill()  # SIGKILL: nothing is drained, nothing flushed

    def restart_gracefully(self) -> None:
        self.proc.signal(signal.SIGTERM)
        assert self.proc.wait(timeout=30) == 0, self.proc.stderr[-2000:]
        self.start()

    def stop(self) -> None:
        if self.proc is not None and self.proc.proc.poll() is None:
            self.proc.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@pytest.fixture
def llm():
    fake = FakeLLM(api_key=LLM_KEY, chunk_delay_s=0.05).start()
    yield fake
    fake.stop()


@pytest.mark.timeout(180)
def test_web_chat_in_chromium_streams_survives_restarts_and_delivers_missed_replies(tmp_path,
                                                                                     llm):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no chromium at {CHROMIUM}: `apt-get install chromium` "
                    "(.ci/test-deps does it)")
    gate = gevent.event.Event()

    def third(body):
        gate.wait(60)  # held until the tab is gone
        return text(THIRD, chunk_chars=8)

    llm.script(
        text(FIRST, chunk_chars=6, delay_s=0.06),
        text(SECOND_PARTIAL, chunk_chars=6, delay_s=0.06, hang_after_chunks=8),
        text(SECOND, chunk_chars=8),
        third)
    port = free_port()
    config = write_config(tmp_path / "config.yaml", {
        "gateway": {"data_dir": str(tmp_path / "data"), "drain_timeout_s": 5,
                    "status": {"port": port}},
        "agent": {"base_url": llm.base_url, "api_key": LLM_KEY, "model": "fake-model",
                  "tools": [], "max_retries": 0},
        "platforms": {"webchat": {"title": "hermes-green chat", "offline_retry_max_s": 1}}})
    gateway = GatewayProcess(config, port).start()
    browser = Browser(f"http://127.0.0.1:{port}/chat", tmp_path)
    try:
        browser.do("open", "opened")

        # 1. sent, streamed, final
        first = browser.do("send What is hermes-green?", "sent")["id"]
        partial = browser.do(f"streaming {first}", "streaming")["text"]
        final = browser.do(f"reply {first}", "reply")
        assert final["text"] == FIRST
        assert partial and FIRST.startswith(partial) and len(partial) < len(FIRST)
        assert final["user_state"] == "received"
        wait_until(lambda: gateway.outbox_pending() == 0, what="the first reply acked")
        browser.do("shot webchat-answered", "shot")

        # 2. the gateway crashes while the next answer streams; the page reconnects by itself
        second = browser.do("send And after a crash?", "sent")["id"]
        browser.do(f"streaming {second}", "streaming")
        gateway.crash()
        browser.do("down", "down")
        browser.do("shot webchat-down", "shot")
        gateway.start()  # the journal still holds the message: its turn runs again
        browser.do("live", "live")
        again = browser.do(f"reply {second}", "reply")
        assert again["text"] == SECOND
        assert again["bots"] == 1 and again["users"] == 1  # shown once, asked once
        wait_until(lambda: gateway.outbox_pending() == 0, what="the second reply acked")

        # 3. a reply made while the tab is closed, kept across a graceful restart
        third_id = browser.do("send One more, while I am away", "sent")["id"]
        wait_until(lambda: len(llm.chat_requests) == 4, timeout=20,
                   what="the third turn asked the LLM")
        browser.do("leave", "left")
        gate.set()
        wait_until(lambda: gateway.outbox_pending() == 1, timeout=20,
                   what="the third reply owed to a closed tab")
        gateway.restart_gracefully()
        assert gateway.outbox_pending() == 1  # still owed after the restart
        back = browser.do("return", "returned")
        assert back["bubbles"] >= 5  # the transcript came back from the page's storage
        missed = browser.do(f"reply {third_id}", "reply")
        assert missed["text"] == THIRD and missed["bots"] == 1
        wait_until(lambda: gateway.outbox_pending() == 0, what="the missed reply acked")
        browser.do("shot webchat-missed-reply", "shot")
    finally:
        browser.finish()
        gateway.stop()
    assert len(llm.chat_requests) == 4  # first, second (cut), second again, third
    for name in ("webchat-answered", "webchat-down", "webchat-missed-reply"):
        assert (tmp_path / f"{name}.png").stat().st_size > 5_000, name
