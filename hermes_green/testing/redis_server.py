"""A real redis-server on a free loopback port, for tests and benchmarks (Debian's package;
.ci/test-deps installs it): started and waited for until it answers PING, stopped, or killed
with -9 and started again on the same port and directory (persistence tests).

    server = RedisServer(tmp_dir, appendonly=True).start()   # `--save ''` always
    server.url; server.kill(); server.start(); server.stop()
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path


class RedisServerError(Exception):
    """redis-server is missing, exited, or never answered. Next step: install it or read its
    log (in the server's directory)."""


START_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    def __init__(self, directory: Path, *, appendonly: bool = False, port: int | None = None):
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.port = port or free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> "RedisServer":
        exe = shutil.which("redis-server")
        if exe is None:
            raise RedisServerError("redis-server is not installed (bash .ci/test-deps "
                                   "installs it)")
        args = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--dir", str(self.dir), "--logfile", str(self.dir / "redis.log"),
                "--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.answers():
            if self.proc.poll() is not None:
                log = (self.dir / "redis.log")
                raise RedisServerError(f"redis-server exited ({self.proc.returncode}): "
                                   f"{log.read_text()[-500:] if log.exists() else ''}")
            if time.monotonic() > deadline:
                raise RedisServerError(f"redis-server did not answer within {START_TIMEOUT_S}s")
            time.sleep(0.02)  # waiting for an external process to listen: nothing to wait on
        return self

    def answers(self) -> bool:
        """PING answered with PONG (after an AOF load, not before)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def flush(self) -> None:
        """Empty every database (FLUSHALL)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(b"FLUSHALL\r\n")
            if not s.recv(64).startswith(b"+OK"):
                raise RedisServerError("FLUSHALL refused")

    def kill(self) -> None:
        """kill -9: no shutdown, no final fsync; what the AOF has is what survives."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
