"""Helpers shared by gateway-level tests: config files, a gateway subprocess whose output lines
can be waited on, and an in-process gateway on the test platform."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import gevent
import gevent.event
import yaml

ROOT = Path(__file__).resolve().parent.parent
BIN = str(ROOT / "bin" / "hermes-green")


def write_config(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def base_config(data_dir: Path, **gateway) -> dict:
    return {"gateway": {"data_dir": str(data_dir), "status": {"enabled": False}, **gateway}}


class Process:
    """A child process whose stdout lines are collected as they come and can be waited for."""

    def __init__(self, args: list[str], env: dict | None = None) -> None:
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, **(env or {})}, cwd=str(ROOT))
        self.lines: list[str] = []
        self.stderr = ""
        self._changed = gevent.event.Event()
        self._readers = [gevent.spawn(self._read_out), gevent.spawn(self._read_err)]

    def _read_out(self) -> None:
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    def _read_err(self) -> None:
        self.stderr = self.proc.stderr.read().decode(errors="replace")

    def wait_line(self, prefix: str, timeout: float = 20.0, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while True:
            hits = [line for line in self.lines if line.startswith(prefix)]
            if len(hits) >= count:
                return hits[count - 1]
            if self.proc.poll() is not None and not self._readers[0].dead:
                self._readers[0].join(1)
                continue
            if self.proc.poll() is not None:
                raise AssertionError(f"process exited ({self.proc.returncode}) before {prefix!r};"
                                     f" stderr: {self.stderr[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no line {prefix!r} within {timeout}s: {self.lines}")
            self._changed.clear()
            self._changed.wait(0.2)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        code = self.proc.wait(timeout=timeout)
        gevent.joinall(self._readers, timeout=5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)


def run_cli(*args: str, env: dict | None = None, timeout: float = 60.0,
            stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, BIN, *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})}, input=stdin,
                          cwd=str(ROOT))


class GateAgent:
    """A scripted agent: records every turn, and holds a turn whose text is in `gates` until
    the test opens that gate. Records turns that were cancelled (interrupted)."""

    def __init__(self) -> None:
        self.turns: list[str] = []
        self.cancelled: list[str] = []
        self.gates: dict[str, gevent.event.Event] = {}
        self.started = gevent.event.Event()

    def hold(self, text: str) -> gevent.event.Event:
        self.gates[text] = gevent.event.Event()
        return self.gates[text]

    def run_turn(self, turn) -> str:
        self.turns.append(turn.text)
        self.started.set()
        try:
            gate = self.gates.get(turn.text)
            if gate is not None:
                gate.wait()
        except gevent.GreenletExit:
            self.cancelled.append(turn.text)
            raise
        return f"answer: {turn.text}"

    def close(self) -> None:
        pass


def wait_until(predicate, timeout: float = 10.0, what: str = "condition"):
    """Wait on a condition that no fake signals (gateway-internal state)."""
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        gevent.sleep(0.005)
    return value


def start_inprocess_gateway(tmp_path, fake, agent, *, busy_mode="queue", extra_factories=None,
                            busy=None, testchat=None, config=None):
    """`busy`: the gateway.busy section; `testchat`: extra keys of the test bot's section
    (admins, rate_limit, dm_policy...); `config`: more top-level config sections."""
    from hermes_green.config import Config
    from hermes_green.gateway import Gateway
    from tests.fakes.testchat_adapter import TestChatAdapter, testchat_config

    data = base_config(tmp_path / "data", busy_mode=busy_mode, **({"busy": busy} if busy else {}))
    data.update(config or {})
    config = Config.model_validate(data)
    factories = {"testchat": lambda cfg, on_message, **kw: TestChatAdapter(
        testchat_config(fake.ws_url, **(testchat or {})), on_message, **kw)}
    factories.update(extra_factories or {})
    gw = Gateway(config, agent=agent, adapter_factories=factories).start()
    wait_until(lambda: "testchat" in gw.adapters and gw.adapters["testchat"].ready.is_set(),
               what="testchat connected")
    return gw


def start_feishu_llm_gateway(tmp_path, feishu, llm, *, api_key: str, progress_after_s: float):
    """An in-process gateway: the Feishu fake, an LLM agent on the fake LLM, cards updated every
    0.1 s; returns it once Feishu is ready (the caller shuts it down)."""
    from hermes_green.config import Config
    from hermes_green.gateway import Gateway
    config = Config.model_validate({
        "gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False},
                    "progress_after_s": progress_after_s},
        "agent": {"base_url": llm.base_url, "api_key": api_key, "model": "m", "tools": []},
        "platforms": {"feishu": {"app_id": feishu.app_id, "app_secret": feishu.app_secret,
                                 "domain": feishu.http_base, "card_update_interval_s": 0.1}}})
    gw = Gateway(config).start()
    wait_until(lambda: "feishu" in gw.adapters and gw.adapters["feishu"].ready.is_set(),
               what="feishu ready")
    return gw


class AdapterRuns:
    """The adapters one test started, each on its fake with its journal, each `run()` in a
    greenlet. `stop_all()` (the fixture's teardown) stops them, checks that every run()
    returned, and stops each fake once."""

    def __init__(self) -> None:
        self.started: list = []

    def start(self, fake, adapter, journal, *, run: bool = True):
        from types import SimpleNamespace

        from hermes_green.testing.journal import run_until_stopped
        h = SimpleNamespace(fake=fake, adapter=adapter, journal=journal, greenlet=None)
        if run:
            h.greenlet = gevent.spawn(run_until_stopped, adapter)
        self.started.append(h)
        return h

    def stop_all(self) -> None:
        for h in self.started:
            h.adapter.stop()
            if h.greenlet is not None:
                h.greenlet.join(timeout=5)
                assert h.greenlet.dead, "adapter.run() did not return after stop()"
        for fake in {id(h.fake): h.fake for h in self.started}.values():
            fake.stop()


def ready(h, *, timeout: float = 3.0):
    """`h` once its adapter is ready (its last error in the failure otherwise)."""
    assert h.adapter.ready.wait(timeout), f"not ready: {h.adapter.stats.last_error}"
    return h


def print_reconnect_times(measured: dict[str, float]):
    """A module fixture's body: after the module, print what its fault tests measured (-s)."""
    yield
    for name, seconds in sorted(measured.items()):
        print(f"\nreconnect fault={name} seconds={seconds:.3f}", end="")
