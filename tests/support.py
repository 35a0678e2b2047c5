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
