"""Where a tool runs: inline, in gevent's threadpool, or in a process pool.

Measured on this machine (shared/DESIGN.md, bench/executors.py): pure-Python work inline holds
the hub for its whole run; in threads it still holds the GIL, so four such tools make a 10 ms
timer tens of milliseconds late; in worker processes the timer stays within a few milliseconds.
Hence three executors, chosen per tool:

- `inline`: runs in the calling greenlet, on the hub. Network I/O through patched sockets only:
  everything it computes holds the hub, and its timeout fires only when it waits on I/O (a C
  call never yields, so an inline CPU tool's timeout can never fire). What such a tool must
  compute on what it received (parsing a page) goes to the process pool through `offload()`.
- `thread`: gevent's threadpool (`executors.threads`), for blocking C libraries that release
  the GIL. A thread cannot be killed: on timeout the caller gets `ToolTimeout` and the thread
  finishes in the background.
- `process`: `ProcessPool` (`executors.processes`), for pure-Python CPU work. A call that
  overruns its timeout, is interrupted, or whose worker dies, costs that worker: it is killed
  and a fresh one is started on the next call.

Waiting on any of them is cooperative: the hub keeps running while a tool works.

Why not `concurrent.futures.ProcessPoolExecutor` or `multiprocessing`: neither can kill the one
worker that overran; their result-handler threads and `waitpid` calls do not mix with gevent's
patched runtime (gevent's SIGCHLD handler may reap their children); and the spawn start method
re-runs the parent's `__main__` script in each child, which for `bin/hermes-green` or a bench
script means importing the runtime and monkey-patching the worker. So workers are plain
`subprocess.Popen` children (gevent's, which reaps them cooperatively) running
`hermes_green.agent._worker` over a socketpair that the parent reads with gevent sockets.
"""
from __future__ import annotations

import contextvars
import json
import logging
import pickle
import socket  # patched by hermes_green.runtime: the parent's ends are gevent sockets
import subprocess  # patched: gevent's Popen, reaped by the hub's child watcher
import sys
import time
from contextlib import contextmanager
from typing import Any, Callable, Literal

import gevent
import gevent.lock

from .. import metrics
from . import _worker

log = logging.getLogger("hermes_green.agent.executors")

ExecutorName = Literal["inline", "thread", "process"]
EXECUTORS: tuple[str, ...] = ("inline", "thread", "process")

# The Executors running the current inline tool (greenlets each have their own context), so
# that the tool can offload() its CPU work to the same process pool.
_running: contextvars.ContextVar["Executors | None"] = contextvars.ContextVar(
    "hermes_green_executors", default=None)

# How long a killed worker may take to be reaped before we stop waiting to describe its death.
_REAP_WAIT_S = 1.0


class ExecutorError(Exception):
    """A tool could not produce a result. The message is one line, safe to hand to the model."""


class ToolTimeout(ExecutorError):
    """The tool overran its timeout (a process worker was killed; a thread runs on)."""


class WorkerCrashed(ExecutorError):
    """The process worker died during the call (killed, segfault, os._exit). The pool replaces
    it; the next call works."""


class RemoteToolError(ExecutorError):
    """The tool raised inside a worker process. `type_name` and `remote_traceback` describe it."""

    def __init__(self, type_name: str, message: str, remote_traceback: str = "") -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.remote_traceback = remote_traceback


class ExecutorClosed(ExecutorError):
    """The executors were shut down (gateway stopping)."""


def target_of(fn: Callable) -> str:
    """The `module:qualname` a worker process imports `fn` by."""
    module, qualname = getattr(fn, "__module__", None), getattr(fn, "__qualname__", "")
    if not module or module == "__main__" or "<locals>" in qualname or "<lambda>" in qualname:
        raise ExecutorError(f"{module}:{qualname} cannot run in a process: a process tool must "
                            f"be a module-level function of an importable module")
    return f"{module}:{qualname}"


# -- process pool -----------------------------------------------------------------------------

class _Worker:
    """One child process and the parent's end of its socketpair."""

    def __init__(self, sys_path: list[str], name: str) -> None:
        self.name = name
        parent_end, child_end = socket.socketpair()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _worker.BOOTSTRAP, str(child_end.fileno()),
                 json.dumps(sys_path)],
                pass_fds=(child_end.fileno(),), stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, close_fds=True)
        except BaseException:
            parent_end.close()
            raise
        finally:
            child_end.close()  # ours must go, or the child's death would never read as EOF
        self.sock = parent_end
        self.calls = 0

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def call(self, target: str, args: tuple, kwargs: dict) -> tuple:
        """Send one request and wait (cooperatively) for its reply; no timeout of its own."""
        self.calls += 1
        try:
            _worker.send_frame(self.sock, pickle.dumps((target, args, kwargs),
                                                       protocol=pickle.HIGHEST_PROTOCOL))
            frame = _worker.recv_frame(self.sock)
        except (OSError, EOFError):
            frame = None
        if frame is None:
            raise WorkerCrashed(f"the process worker died during the call ({self.describe_exit()})")
        return pickle.loads(frame)

    def describe_exit(self) -> str:
        try:
            code = self.proc.wait(timeout=_REAP_WAIT_S)
        except subprocess.TimeoutExpired:
            return "still running"
        return f"killed by signal {-code}" if code < 0 else f"exit code {code}"

    def kill(self) -> None:
        """Kill now; gevent's child watcher reaps it. Safe to call twice."""
        try:
            self.sock.close()
        finally:
            if self.proc.poll() is None:
                try:
                    self.proc.kill()
                except OSError:
                    pass


class ProcessPool:
    """Up to `size` worker processes, started on first use, one call per worker at a time."""

    def __init__(self, size: int = 1, *, sys_path: list[str] | None = None) -> None:
        if size < 1:
            raise ValueError("a process pool needs at least one worker")
        self.size = size
        self._sys_path = list(sys.path if sys_path is None else sys_path)
        self._slots = gevent.lock.BoundedSemaphore(size)
        self._idle: list[_Worker] = []
        self._busy: set[_Worker] = set()
        self._started = 0
        self.replaced = 0  # workers killed after a timeout, interrupt or crash
        self._closed = False

    @property
    def workers(self) -> list[_Worker]:
        """The live workers (idle and busy), for tests and the status page."""
        return [*self._idle, *self._busy]

    def call(self, target: str, args: tuple = (), kwargs: dict | None = None, *,
             timeout_s: float) -> Any:
        """Run `target(*args, **kwargs)` in a worker. Raises ToolTimeout (waiting for a free
        worker counts too), WorkerCrashed, RemoteToolError or ExecutorClosed."""
        if self._closed:
            raise ExecutorClosed("the process pool is shut down")
        deadline = time.monotonic() + timeout_s
        if not self._slots.acquire(timeout=timeout_s):
            raise ToolTimeout(f"no process worker became free within {timeout_s:g} s")
        try:
            reply = self._call_in_worker(target, args, kwargs or {}, deadline, timeout_s)
        finally:
            self._slots.release()
        if reply[0] == "ok":
            return reply[1]
        _, type_name, message, tb = reply
        raise RemoteToolError(type_name, message, tb)

    def _call_in_worker(self, target, args, kwargs, deadline, timeout_s) -> tuple:
        worker = self._take_worker()
        self._busy.add(worker)
        healthy = False
        try:
            with _deadline(max(0.0, deadline - time.monotonic()),
                           f"did not finish within {timeout_s:g} s (worker killed)"):
                reply = worker.call(target, args, kwargs)
            healthy = True
            return reply
        finally:
            self._busy.discard(worker)
            if healthy and not self._closed:
                self._idle.append(worker)
            else:  # timed out, interrupted (GreenletExit), crashed, or pool closed meanwhile
                worker.kill()
                if not self._closed:
                    self.replaced += 1
                    log.warning("process worker replaced worker=%s target=%s", worker.name, target)

    def _take_worker(self) -> _Worker:
        while self._idle:
            worker = self._idle.pop()
            if worker.alive:
                return worker
            worker.kill()  # died while idle (OOM killer, someone's kill -9): drop it quietly
            self.replaced += 1
        self._started += 1
        worker = _Worker(self._sys_path, name=f"proc-{self._started}")
        log.info("process worker started worker=%s pid=%s", worker.name, worker.proc.pid)
        return worker

    def close(self) -> None:
        """Kill every worker, busy ones too (their callers get WorkerCrashed). Idempotent."""
        if self._closed:
            return
        self._closed = True
        for worker in [*self._idle, *self._busy]:
            worker.kill()
        self._idle.clear()


# -- the three executors behind one call ------------------------------------------------------

class Executors:
    """Runs a function in the executor a tool asked for; the one object the agent holds."""

    def __init__(self, *, threads: int | None = None, processes: int = 1,
                 sys_path: list[str] | None = None) -> None:
        if threads is not None:
            gevent.get_hub().threadpool.maxsize = threads
        self.processes = ProcessPool(processes, sys_path=sys_path)

    def run(self, executor: str, fn: Callable, args: tuple = (), kwargs: dict | None = None, *,
            timeout_s: float, label: str | None = None) -> Any:
        """`fn(*args, **kwargs)` in `executor`. Raises ToolTimeout, WorkerCrashed,
        RemoteToolError (process), or whatever `fn` raised (inline, thread)."""
        kwargs = kwargs or {}
        started = time.monotonic()
        try:
            if executor == "inline":
                token = _running.set(self)
                try:
                    return _with_timeout(timeout_s, fn, args, kwargs)
                finally:
                    _running.reset(token)
            if executor == "thread":
                return _in_thread(timeout_s, fn, args, kwargs)
            if executor == "process":
                return self.processes.call(target_of(fn), args, kwargs, timeout_s=timeout_s)
            raise ExecutorError(f"unknown executor {executor!r} (expected one of {EXECUTORS})")
        finally:
            metrics.tool_seconds.labels(tool=label or getattr(fn, "__name__", "?"),
                                        executor=executor).observe(time.monotonic() - started)

    def close(self) -> None:
        self.processes.close()


def offload(fn: Callable, *args: Any, timeout_s: float, **kwargs: Any) -> Any:
    """Run `fn(*args, **kwargs)` (a module-level function doing pure-Python CPU work) in the
    process pool of the Executors running the current inline tool, under `timeout_s`.

    This is how an inline (network I/O) tool keeps the rule for the part that computes: it
    fetches on the hub and parses in a worker. Raises ToolTimeout, WorkerCrashed,
    RemoteToolError or ExecutorClosed like a process tool. Called outside an inline tool run by
    Executors (a test or a script calling the tool function directly; a thread tool), it runs
    `fn` right here, as a plain call would.
    """
    executors = _running.get()
    if executors is None:
        return fn(*args, **kwargs)
    return executors.processes.call(target_of(fn), args, kwargs, timeout_s=timeout_s)


@contextmanager
def _deadline(timeout_s: float, message: str):
    """Raise ToolTimeout(message) when the block overruns; a Timeout that is not ours (an
    outer turn deadline) passes through untouched."""
    timer = gevent.Timeout(timeout_s)
    timer.start()
    try:
        yield
    except gevent.Timeout as t:
        if t is not timer:
            raise
        raise ToolTimeout(message) from None
    finally:
        timer.close()


def _with_timeout(timeout_s: float, fn: Callable, args: tuple, kwargs: dict) -> Any:
    # Only cooperative code can be timed out here: a CPU loop inline never yields to the timer.
    with _deadline(timeout_s, f"did not finish within {timeout_s:g} s"):
        return fn(*args, **kwargs)


def _in_thread(timeout_s: float, fn: Callable, args: tuple, kwargs: dict) -> Any:
    # The tool's exception comes back as a value: raised in the pool thread, gevent would print
    # its traceback to stderr as an unhandled error before handing it over.
    def guarded():
        try:
            return True, fn(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  (re-raised in the caller)
            return False, e

    # The timer also covers waiting for a free thread (spawn blocks cooperatively when full).
    def spawn_and_wait():
        ok, value = gevent.get_hub().threadpool.spawn(guarded).get()
        if not ok:
            raise value
        return value
    try:
        return _with_timeout(timeout_s, spawn_and_wait, (), {})
    except ToolTimeout:
        raise ToolTimeout(f"did not finish within {timeout_s:g} s "
                          f"(its thread runs on in the background)") from None
