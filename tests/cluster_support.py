"""Helpers for tests that run several real gateway processes (`bin/hermes-green --role ...`) on
one real redis-server against the fleet's fakes: config files, and processes whose log lines
(stderr) can be waited on while they run."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import gevent
import gevent.event

from hermes_green.testing.fake_llm import text
from tests.support import BIN, ROOT


class Node:
    """One gateway process; `lines` has its stdout and stderr lines as they come."""

    def __init__(self, name: str, config: Path, role: str) -> None:
        self.name, self.role = name, role
        self.proc = subprocess.Popen([sys.executable, BIN, "--config", str(config), "--role",
                                      role], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     cwd=str(ROOT), env={**os.environ})
        self.lines: list[str] = []
        self.changed = gevent.event.Event()
        self._readers = [gevent.spawn(self._read, self.proc.stdout),
                         gevent.spawn(self._read, self.proc.stderr)]
        self.killed_at: float | None = None

    def _read(self, stream) -> None:
        for raw in stream:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))
            self.changed.set()
        self.changed.set()

    def find(self, pattern: str) -> list[re.Match]:
        rx = re.compile(pattern)
        return [m for line in list(self.lines) if (m := rx.search(line))]

    def wait_for(self, pattern: str, timeout: float = 20.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while not (hits := self.find(pattern)):
            if self.proc.poll() is not None and all(r.dead for r in self._readers):
                raise AssertionError(f"{self.name} exited ({self.proc.returncode}) before "
                                     f"{pattern!r}: {self.lines[-20:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name}: no {pattern!r} within {timeout}s: "
                                     f"{self.lines[-20:]}")
            self.changed.clear()
            self.changed.wait(0.1)
        return hits[0]

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.killed_at = time.monotonic()
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 30.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        gevent.joinall(self._readers, timeout=5)
        return self.proc.returncode


def node_config(tmp: Path, name: str, redis_url: str, fleet, **gateway) -> Path:
    """A node's own config: its own data_dir, the shared Redis, every fleet platform."""
    path = tmp / f"{name}.json"
    path.write_text(json.dumps({  # JSON is YAML
        "gateway": {"data_dir": str(tmp / name), "store": redis_url,
                    "status": {"enabled": False}, "drain_timeout_s": 5, **gateway},
        "agent": fleet.agent_config(tools=[], max_retries=0),
        "platforms": fleet.platforms_config(backoff={"initial_s": 0.2, "max_s": 1.0})}))
    return path


def echo(delay_s: float = 0.0, chunk_chars: int = 64):
    """A fake-LLM response that answers "echo: <the user's text>" (streamed in chunks `delay_s`
    apart), so each answer names the message it answers."""
    def answer(body: dict):
        users = [m["content"] for m in body["messages"] if m.get("role") == "user"]
        return text(f"echo: {users[-1]}", chunk_chars=chunk_chars, delay_s=delay_s)
    return answer


def stop_all(nodes) -> None:
    for n in nodes:
        n.stop()


class CuttableProxy:
    """A TCP proxy on loopback in front of Redis for one node: `cut()` is a network partition
    (every connection through it dropped, new ones closed at once), `heal()` ends it."""

    def __init__(self, upstream_port: int) -> None:
        from gevent.server import StreamServer
        self.upstream_port = upstream_port
        self.is_cut = False
        self._socks: list = []
        self.server = StreamServer(("127.0.0.1", 0), self._handle)
        self.server.start()

    @property
    def port(self) -> int:
        return self.server.server_port

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def _handle(self, client, _address) -> None:
        import socket
        if self.is_cut:
            client.close()
            return
        upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
        self._socks += [client, upstream]
        pumps = [gevent.spawn(self._pump, client, upstream),
                 gevent.spawn(self._pump, upstream, client)]
        gevent.joinall(pumps, count=1)
        for s in (client, upstream):
            s.close()

    @staticmethod
    def _pump(src, dst) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass

    def cut(self) -> None:
        self.is_cut = True
        for s in self._socks:
            try:
                s.close()
            except OSError:
                pass
        self._socks.clear()

    def heal(self) -> None:
        self.is_cut = False

    def stop(self) -> None:
        self.cut()
        self.server.stop()
