"""Tools used by the agent tests (no tests here). Worker processes import this module by name,
so it imports only the standard library and `tool`: never the gevent runtime."""
from __future__ import annotations

import os
import socket
import sys
import time

from hermes_green.agent.tools import tool


@tool(executor="process", timeout_s=10)
def whoami() -> dict:
    """Describe the process this runs in."""
    return {"pid": os.getpid(), "nice": os.nice(0),
            "policy": os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None,
            "runtime_imported": "hermes_green.runtime" in sys.modules,
            "gevent_imported": "gevent" in sys.modules}


@tool(executor="process", timeout_s=0.5)
def hang_forever() -> str:
    """Never return (the worker must be killed at the timeout)."""
    while True:
        time.sleep(60)


@tool(executor="process", timeout_s=30)
def report_pid_and_block(port: int) -> str:
    """Connect to 127.0.0.1:port, send our pid, then block until killed."""
    conn = socket.create_connection(("127.0.0.1", port))
    conn.sendall(f"{os.getpid()}\n".encode())
    while True:
        time.sleep(60)


@tool(executor="process", timeout_s=10)
def sleep_in_child(seconds: float) -> str:
    """Block the worker (not the gateway) for a while."""
    time.sleep(seconds)
    return "done"


@tool(executor="process", timeout_s=10)
def exit_now(code: int) -> str:
    """Kill the worker from inside."""
    os._exit(code)


@tool(executor="process", timeout_s=10)
def fail_in_child(message: str) -> str:
    """Raise inside the worker."""
    raise ValueError(message)


@tool(executor="thread", timeout_s=10)
def native_thread_id() -> int:
    """The id of the native thread this runs in."""
    import gevent.monkey
    return gevent.monkey.get_original("_thread", "get_ident")()


@tool(executor="thread", timeout_s=0.2)
def slow_thread(seconds: float) -> str:
    """Block a pool thread longer than the timeout."""
    import gevent.monkey
    gevent.monkey.get_original("time", "sleep")(seconds)
    return "finished"


@tool(executor="inline", timeout_s=0.2)
def slow_inline(seconds: float) -> str:
    """Cooperative wait longer than the timeout."""
    import gevent
    gevent.sleep(seconds)
    return "finished"


@tool
def huge_result(size: int) -> str:
    """Return `size` characters."""
    return "x" * size


@tool(executor="inline")
def raises(message: str) -> str:
    """Always fails."""
    raise RuntimeError(message)


@tool(executor="inline", timeout_s=5)
def meet(who: str) -> str:
    """Two calls meet only if they run at the same time (tests parallel tool calls)."""
    import gevent.event
    events = _MEETING.setdefault("events", {"a": gevent.event.Event(), "b": gevent.event.Event()})
    events[who].set()
    other = "b" if who == "a" else "a"
    return "met" if events[other].wait(2.0) else "alone"


_MEETING: dict = {}


@tool(executor="inline")
def typed(count: int, names: list[str], ratio: float = 0.5, mode: str = "fast") -> str:
    """Check argument validation and schemas.

    Args:
        count: how many
        names: who is involved;
            may be long
        ratio: a fraction
    """
    return f"{count}:{','.join(names)}:{ratio}:{mode}"


def worker_pid() -> int:
    """The pid of the process this runs in (a plain function, offloaded by `offloads`)."""
    return os.getpid()


@tool(executor="inline", timeout_s=10)
def offloads() -> dict:
    """An inline tool that sends its CPU part to the process pool: where did each part run?"""
    from hermes_green.agent.executors import offload
    return {"here": os.getpid(), "there": offload(worker_pid, timeout_s=5)}


@tool(executor="thread", timeout_s=5)
def thread_raises(message: str) -> str:
    """Raise inside a pool thread."""
    raise ValueError(message)


_GATE: dict = {}


def gate() -> dict:
    """The events of `wait_at_gate` (for tests in the gateway's own process): `entered` is set
    when the tool runs, `release` lets it return. `_GATE.clear()` makes fresh ones."""
    import gevent.event
    if not _GATE:
        _GATE.update(entered=gevent.event.Event(), release=gevent.event.Event())
    return _GATE


@tool(executor="inline", timeout_s=30)
def wait_at_gate() -> str:
    """Wait until the test opens the gate (a tool round that lasts as long as a test needs)."""
    events = gate()
    events["entered"].set()
    events["release"].wait(20)
    return "gate passed"
