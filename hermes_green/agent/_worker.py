"""The process-pool worker: a fresh interpreter that runs pure-Python tools, one call at a time.

This module is the child's entry point, so it imports only the standard library: the child must
never import `hermes_green.runtime` (monkey-patching a worker would make its CPU loops yield to a
hub nobody runs). The parent (`executors.ProcessPool`) starts it as

    python -c BOOTSTRAP <fd> <json sys.path>

with one end of a socketpair as <fd>, and both sides speak frames on it: an 8-byte big-endian
length, then a pickle. Requests are `(target, args, kwargs)` with target `"module:qualname"`
(functions are imported by name in the child, never pickled); replies are `("ok", result)` or
`("error", type_name, message, traceback_text)`.

A worker exits when the parent closes its end (EOF). It lowers its own priority (SCHED_IDLE
where Linux offers it, else `os.nice`) so that when CPU tools fill every core the gateway
process still wins the CPU the moment its timers fire.
"""
from __future__ import annotations

import importlib
import os
import pickle
import signal
import socket
import struct
import sys
import traceback

_HEADER = struct.Struct("!Q")
NICE_INCREMENT = 10

# Run by the parent as `python -c BOOTSTRAP <fd> <sys.path as JSON>`; kept here so both sides
# agree on it. It replaces sys.path first so tool modules import exactly as in the parent.
BOOTSTRAP = (
    "import json, sys; sys.path[:] = json.loads(sys.argv[2]); "
    "from hermes_green.agent._worker import main; main(int(sys.argv[1]))"
)


def send_frame(sock, payload: bytes) -> None:
    header = _HEADER.pack(len(payload))
    if len(payload) < 65536:
        sock.sendall(header + payload)
    else:  # do not copy a big payload just to prepend 8 bytes
        sock.sendall(header)
        sock.sendall(payload)


def _recv_exact(sock, n: int) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            return None  # EOF: the peer is gone
        got += k
    return bytes(buf)


def recv_frame(sock) -> bytes | None:
    """One frame's payload, or None on a clean EOF before a frame started."""
    header = _recv_exact(sock, _HEADER.size)
    if header is None:
        return None
    (size,) = _HEADER.unpack(header)
    if size == 0:
        return b""
    payload = _recv_exact(sock, size)
    if payload is None:
        raise EOFError("connection closed in the middle of a frame")
    return payload


def resolve(target: str):
    """`"package.module:Outer.func"` -> the object."""
    module_name, _, qualname = target.partition(":")
    obj = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def _call(request: bytes) -> bytes:
    try:
        target, args, kwargs = pickle.loads(request)
        result = resolve(target)(*args, **kwargs)
        try:
            return pickle.dumps(("ok", result), protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001  (the result cannot cross the pipe)
            raise TypeError(f"the tool's result cannot be pickled ({type(e).__name__})") from None
    except Exception as e:  # noqa: BLE001  (every tool failure goes back to the parent)
        reply = ("error", type(e).__name__, str(e)[:2000], traceback.format_exc(limit=20)[-4000:])
        return pickle.dumps(reply, protocol=pickle.HIGHEST_PROTOCOL)


def _lower_priority() -> None:
    """Give the CPU to the gateway whenever it wants it. SCHED_IDLE (Linux): the scheduler runs
    us only when nothing else of normal priority wants the core, and a waking gateway preempts
    us at once; with nice 10 alone it still waited in the run queue for a scheduler slice (up
    to ~3 ms: bench/cascade.py --trace, "waiting for a core"). Elsewhere: nice."""
    try:
        os.nice(NICE_INCREMENT)
    except OSError:
        pass
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:
            pass


def main(fd: int) -> None:
    # Ctrl-C in a terminal signals the whole process group; the parent owns our lifecycle.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _lower_priority()
    sock = socket.socket(fileno=fd)
    sock.setblocking(True)  # the parent made the pair with gevent, which sets O_NONBLOCK
    try:
        while True:
            request = recv_frame(sock)
            if request is None:
                return
            send_frame(sock, _call(request))
    except (EOFError, OSError):
        return
    finally:
        sock.close()


if __name__ == "__main__":  # pragma: no cover  (the parent uses BOOTSTRAP)
    main(int(sys.argv[1]))
