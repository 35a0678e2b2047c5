"""Hot reload: what a new config changes, and how `hermes-green reload` finds the gateway.

The gateway reloads on SIGHUP (and so on `hermes-green reload`, which validates the file first,
sends the signal and waits for the outcome). A reload never half-applies: the new file is
parsed and validated, the new agent (if its settings changed) is built, and only then is
anything swapped. What changes, and how:
- a bot whose section changed, or that was added or removed, is stopped and started again (or
  only started / stopped); every other bot keeps its connection untouched;
- `agent` and `executors`: a new agent serves the next turn; running turns finish on the old
  one, which is closed when its last turn ends;
- `gateway.busy_mode` and `gateway.busy`: from the next message on;
- `gateway.data_dir` cannot change while running (the reload is refused); `gateway.status`,
  logging and hub settings are kept until the next start (the outcome says so).

The running gateway is found through a pid file in data_dir (written once the signal handlers
are installed, removed at exit); its process start time is recorded too, so a stale file
whose pid was reused by another process is not signalled. The outcome of each reload is kept
in the store's meta table (`last_reload`), where the CLI reads it.
"""
from __future__ import annotations

import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

PID_FILE = "hermes-green.pid"
LAST_RELOAD_KEY = "last_reload"
REPLY_WAIT_S = 30.0  # how long `hermes-green reload` waits for the gateway's outcome
_NEXT_START_ONLY = ("status", "log_level", "log_format", "max_blocking_time_s")


class ReloadError(Exception):
    """`hermes-green reload` cannot reach a gateway (no pid file, stale one). One line; exit 1."""


@dataclass
class ReloadPlan:
    start: dict = field(default_factory=dict)  # bot key -> its new section (added, changed)
    stop: list[str] = field(default_factory=list)  # removed and changed bots
    unchanged: list[str] = field(default_factory=list)
    agent_changed: bool = False
    busy_changed: bool = False
    next_start_only: list[str] = field(default_factory=list)  # keys kept until a restart
    refused: str | None = None

    def describe(self) -> str:
        restarted = sorted(k for k in self.start if k in self.stop)
        parts = [f"restarted={','.join(restarted) or '-'}",
                 f"started={','.join(sorted(k for k in self.start if k not in self.stop)) or '-'}",
                 f"stopped={','.join(sorted(k for k in self.stop if k not in self.start)) or '-'}",
                 f"unchanged={','.join(sorted(self.unchanged)) or '-'}",
                 f"agent={'new' if self.agent_changed else 'unchanged'}",
                 f"busy={'new' if self.busy_changed else 'unchanged'}"]
        if self.next_start_only:
            parts.append(f"needs_restart={','.join(self.next_start_only)}")
        return " ".join(parts)


def plan(old, new) -> ReloadPlan:
    """Compare two validated Configs."""
    p = ReloadPlan()
    if Path(old.gateway.data_dir).resolve() != Path(new.gateway.data_dir).resolve():
        p.refused = ("gateway.data_dir cannot change while the gateway runs (restart it to "
                     "use another data_dir)")
        return p
    p.next_start_only = [f"gateway.{k}" for k in _NEXT_START_ONLY
                         if getattr(old.gateway, k) != getattr(new.gateway, k)]
    p.agent_changed = old.agent != new.agent or old.executors != new.executors
    p.busy_changed = (old.gateway.busy_mode, old.gateway.busy) != \
        (new.gateway.busy_mode, new.gateway.busy)
    before, after = old.platforms.enabled(), new.platforms.enabled()
    for key, section in after.items():
        if key not in before:
            p.start[key] = section
        elif before[key] != section:
            p.start[key] = section
            p.stop.append(key)
        else:
            p.unchanged.append(key)
    p.stop += [key for key in before if key not in after]
    return p


# -- the pid file -------------------------------------------------------------------------------

def pid_path(data_dir) -> Path:
    return Path(data_dir) / PID_FILE


def write_pid_file(data_dir) -> Path:
    path = pid_path(data_dir)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "started": own_start_time()}))
    os.replace(tmp, path)
    return path


def own_start_time() -> float:
    """This process's start time as psutil gives it (what find_gateway compares with). On
    Linux it is read from /proc as psutil reads it, so that a gateway does not import psutil
    (0.4 MB, 8 ms of its start-up) to write its pid file."""
    try:
        with open("/proc/self/stat", "rb") as f:
            # starttime (clock ticks after boot) is field 22; the name in field 2 may hold
            # spaces and parentheses, so count from its closing parenthesis
            ticks = int(f.read().rsplit(b")", 1)[1].split()[19])
        with open("/proc/stat", "rb") as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith(b"btime"))
        return ticks / os.sysconf("SC_CLK_TCK") + boot
    except (OSError, ValueError, IndexError, StopIteration):
        import psutil  # not Linux (or no /proc): ask psutil
        return psutil.Process().create_time()


def remove_pid_file(path: Path) -> None:
    """Only our own: a newer gateway on the same data_dir may have replaced it."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


def find_gateway(data_dir) -> int:
    """The pid of the gateway running on data_dir, or ReloadError saying why not."""
    import psutil
    path = pid_path(data_dir)
    try:
        info = json.loads(path.read_text())
        pid, started = int(info["pid"]), float(info["started"])
    except FileNotFoundError:
        raise ReloadError(f"no gateway is running on {data_dir} (no {PID_FILE} there)") from None
    except (OSError, ValueError, KeyError, TypeError):
        raise ReloadError(f"{path}: unreadable pid file; is a gateway running?") from None
    try:
        if abs(psutil.Process(pid).create_time() - started) < 1.0:
            return pid
    except psutil.Error:
        pass
    raise ReloadError(f"no gateway is running on {data_dir} (stale {PID_FILE}, pid {pid})")


def request_reload(data_dir, read_outcome, *, wait_s: float = REPLY_WAIT_S) -> tuple[bool, str]:
    """Signal the gateway and wait for its outcome. `read_outcome()` returns the stored
    `last_reload` value (JSON text) or None. Returns (ok, detail)."""
    pid = find_gateway(data_dir)
    sent_at = time.time()
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        raw = read_outcome()
        if raw:
            outcome = json.loads(raw)
            if outcome.get("at", 0) >= sent_at:
                return bool(outcome.get("ok")), str(outcome.get("detail", ""))
        time.sleep(0.1)  # another process: nothing to wait on but its record
    raise ReloadError(f"the gateway (pid {pid}) did not report within {wait_s:.0f} s; see its log")


def outcome_record(ok: bool, detail: str) -> str:
    return json.dumps({"at": time.time(), "ok": ok, "detail": detail})
