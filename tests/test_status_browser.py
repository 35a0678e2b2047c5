"""The status page in a real browser: headless Debian chromium, driven by playwright in a
subprocess (tests/browser_check.py), against a running gateway and its status server here.

It checks that every platform's card shows "ready" (green), that a drop injected in a fake
turns that platform's card red within a few seconds, and that it turns green again once the
platform is reachable. Screenshots land in the test's tmp_path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import gevent
import pytest

from hermes_green.config import StatusConfig
from hermes_green.runtime import HubWatch
from hermes_green.status import StatusServer

CHROMIUM = os.environ.get("HERMES_CHROMIUM", "/usr/bin/chromium")
SCRIPT = Path(__file__).resolve().parent / "browser_check.py"
RED_WITHIN_S = 5.0


@dataclass
class FakesSetup:
    """A running gateway on fake platforms, as the browser sees it."""
    gateway: object
    platforms: list[str]  # every card the page must show
    target: str  # the platform that loses its connection
    outage: Callable[[], None]  # cut the target's connection and refuse new ones
    recover: Callable[[], None]  # accept connections again
    close: Callable[[], None]


def gateway_on_fakes(tmp_path) -> FakesSetup:
    """The one place that decides which fakes the browser test runs on: the demo's fleet
    (strict WeCom, Feishu and QQ Bot fakes and the fake LLM) and a real gateway on them."""
    from hermes_green.config import Config
    from hermes_green.gateway import Gateway
    from hermes_green.testing.fleet import FakeFleet
    from tests.support import wait_until

    fleet = FakeFleet(llm_chunk_delay_s=0.001).start()
    config = Config.model_validate({
        "gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False}},
        "agent": fleet.agent_config(),
        "platforms": fleet.platforms_config(backoff={"initial_s": 0.05, "max_s": 0.5})})
    gateway = Gateway(config, hub_watch=HubWatch()).start()
    wait_until(lambda: len(gateway.adapters) == len(fleet.platforms)
               and all(a.ready.is_set() for a in gateway.adapters.values()), timeout=20,
               what="every platform connected")
    for platform in fleet.platforms:
        mid = fleet.send(platform, "hello")
        wait_until(lambda: fleet.answers(platform, mid), timeout=20, what=f"{platform} answer")
    target = fleet.fakes["qqbot"]

    def outage() -> None:
        target.refuse_connections()  # reconnects (token, gateway URL, socket) wait unanswered
        target.drop()

    def close() -> None:
        gateway.shutdown()
        fleet.stop()

    return FakesSetup(gateway, list(fleet.platforms), "qqbot", outage,
                      target.accept_connections, close)


class BrowserCheck:
    """tests/browser_check.py as a child process whose JSON lines are read as they come."""

    def __init__(self, url: str, setup: FakesSetup, out: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, str(SCRIPT), "--url", url, "--platforms", ",".join(setup.platforms),
             "--target", setup.target, "--out", str(out), "--chromium", CHROMIUM,
             "--timeout", "20"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def next_event(self, expected: str, timeout: float = 30.0) -> dict:
        with gevent.Timeout(timeout, AssertionError(f"no {expected!r} from the browser")):
            line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=10)
            raise AssertionError(f"browser check ended before {expected!r}: "
                                 f"{self.proc.stderr.read()[-3000:]}")
        event = json.loads(line)
        assert event["event"] == expected, event
        return event

    def finish(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


@pytest.fixture
def setup(tmp_path):
    s = gateway_on_fakes(tmp_path)
    s.gateway.status_server = StatusServer(s.gateway, StatusConfig(port=0)).start()
    yield s
    try:
        s.recover()
    finally:
        s.close()


@pytest.mark.timeout(90)
def test_status_page_in_chromium(setup, tmp_path):
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"no chromium at {CHROMIUM}: `apt-get install chromium` (.ci/test-deps does it)")
    browser = BrowserCheck(setup.gateway.status_server.url, setup, tmp_path)
    try:
        ready = browser.next_event("ready", timeout=60)
        shown = {c["platform"]: c for c in ready["cards"]}
        assert set(shown) == set(setup.platforms)
        for card in shown.values():
            assert card["state"] == "ready" and "up" in card["classes"].split()
            assert "connected" in card["text"]
        assert ready["overall"] == "ok"

        dropped_at = time.monotonic()
        setup.outage()
        down = browser.next_event("down", timeout=30)
        reaction = time.monotonic() - dropped_at
        target = {c["platform"]: c for c in down["cards"]}[setup.target]
        assert "down" in target["classes"].split()
        assert target["state"] in ("connecting", "backoff")
        assert reaction < RED_WITHIN_S, f"card turned red after {reaction:.1f}s"
        assert down["overall"] == ("down" if len(setup.platforms) == 1 else "degraded")

        setup.recover()
        recovered = browser.next_event("recovered", timeout=30)
        target = {c["platform"]: c for c in recovered["cards"]}[setup.target]
        assert target["state"] == "ready" and "up" in target["classes"].split()
        assert recovered["problems"] == []  # no script error, no CSP violation
    finally:
        browser.finish()
    for name in ("status-ready.png", "status-down.png", "status-recovered.png"):
        assert (tmp_path / name).stat().st_size > 10_000, name
