"""Where the hub's time goes, and why a keepalive left late: an in-process tracer for a real
gateway under load (bench/cascade.py --trace runs the gateway through bench/_traced_gateway.py).

Every moment of the hub's thread is charged to one account, switched at each greenlet switch
(greenlet.settrace) and at the edges of a few wrapped calls:
    sqlite            Store methods (statements and commits, on the hub by design)
    json              json.dumps / json.loads (frames, reply_refs, the LLM's stream chunks)
    logging           Logger._log (record, format, redaction; the write is the writer thread's)
    pickle            pickle.dumps / loads (process-pool calls and results)
    gc                garbage collection (gc.callbacks)
    http              requests' Session.request (REST replies, token fetches)
    ssl               SSLSocket reads/writes (TLS; 0 on the loopback fakes, which speak plain)
    run:<greenlet>    anything else a greenlet ran (by the greenlet's name, digits dropped)
    poll              the hub inside the event loop's poll (between libev's prepare and check
                      watchers): asleep, or taking the GIL back after the poll returned
    hub               the hub greenlet's own work (libev callbacks, timers)
Each account has wall time, the thread's CPU time (time.thread_time) and its time on the OS run
queue (run_delay in /proc/thread-self/schedstat). Wall minus CPU is time the hub's thread was
not running: on the run queue (the OS ran another process: a pool worker, the fakes, other
load) or, for the rest, waiting for the GIL (a thread held it for up to the switch interval).

When a keepalive is recorded (PlatformAdapter.record_keepalive) with lateness L, the window
[woke - L, woke] (woke: when its heartbeat greenlet got the hub) is split by account, with the
not-running part split into run queue and GIL: that is the lateness by cause. The hub's own
account includes its idle waits, which never fall inside such a window (a beat due while the
hub sleeps wakes it). Overhead: about 4 us per switch and per wrapped call.
"""
from __future__ import annotations

import collections
import functools
import gc
import json
import os
import pickle
import re
import time
import weakref

import greenlet
from gevent import monkey

# threading.get_ident is patched to name greenlets; this is the OS thread's
_thread_ident = monkey.get_original("_thread", "get_ident")

_DIGITS = re.compile(r"\d+")
OS_WAIT = "waiting for a core (OS run queue)"
GIL_WAIT = "waiting for the GIL (a thread held it)"
POLL_WAIT = "asleep in the poll past due (ms timeouts, GIL re-take)"


def _account_name(glet) -> str:
    """`run:` + the greenlet's job: "turn:qqbot:<chat>" -> run:turn, "qqbot:qqbot:heartbeat" ->
    run:qqbot:heartbeat; the hub is "hub"."""
    from gevent.hub import Hub
    if isinstance(glet, Hub):
        return "hub"
    raw = str(getattr(glet, "name", None) or type(glet).__name__)
    parts = raw.split(":")
    if parts[0] in ("turn", "session", "outbox", "command", "supervisor") or len(parts) == 1:
        key = parts[0]
    else:
        key = f"{parts[0]}:{parts[-1]}"
    return "run:" + _DIGITS.sub("#", key)


class HubTrace:
    def __init__(self, late_threshold_s: float = 0.0005, keep: int = 20) -> None:
        self.hub_thread = _thread_ident()
        self.wall: collections.Counter = collections.Counter()  # account -> seconds
        self.cpu: collections.Counter = collections.Counter()
        self.longest: dict[str, float] = {}  # account -> longest uninterrupted stretch
        self.late_by_cause: collections.Counter = collections.Counter()
        self.beats: list[float] = []  # gateway-side lateness of every keepalive
        self.worst: list[tuple[float, dict]] = []  # (lateness, breakdown) of the worst beats
        self.switches = 0
        self.wrapped_calls = 0
        self._keep = keep
        self._threshold = late_threshold_s
        self._stacks = weakref.WeakKeyDictionary()  # greenlet -> accounts entered
        self._recent: collections.deque = collections.deque()  # (end, wall, cpu, account)
        self._woke = weakref.WeakKeyDictionary()  # greenlet -> when it last got the hub
        self._last_wall = time.perf_counter()
        self._last_cpu = time.thread_time()
        self._sched = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
        self._last_queued = self._queued()
        self._current = greenlet.getcurrent()
        self._stretch = 0.0
        self._names = weakref.WeakKeyDictionary()

    # -- accounting ------------------------------------------------------------------------
    def _account_of(self, glet) -> str:
        stack = self._stacks.get(glet)
        if stack:
            return stack[-1]
        name = self._names.get(glet)
        if name is None:
            name = self._names[glet] = _account_name(glet)
        return name

    def _queued(self) -> float:
        """Seconds this thread has spent on the OS run queue (runnable, not running)."""
        return int(os.pread(self._sched, 96, 0).split()[1]) / 1e9

    def _charge(self, glet, account: str | None = None, *, ends_stretch: bool = True) -> None:
        now = time.perf_counter()
        cpu_now = time.thread_time()
        queued_now = self._queued()
        wall, cpu = now - self._last_wall, cpu_now - self._last_cpu
        queued = queued_now - self._last_queued
        self._last_wall, self._last_cpu, self._last_queued = now, cpu_now, queued_now
        account = account or self._account_of(glet)
        self.wall[account] += wall
        self.cpu[account] += cpu
        self._stretch += wall
        if ends_stretch:
            if self._stretch > self.longest.get(account, 0.0):
                self.longest[account] = self._stretch
            self._stretch = 0.0
        recent = self._recent
        recent.append((now, wall, cpu, queued, account))
        while recent and now - recent[0][0] > 2.0:
            recent.popleft()

    def on_switch(self, event, args) -> None:
        if _thread_ident() != self.hub_thread or event not in ("switch", "throw"):
            return
        origin, target = args
        self.switches += 1
        self._charge(origin)
        self._current = target
        if target not in self._woke:  # its first wake since its last keepalive record
            self._woke[target] = self._last_wall

    def enter(self, account: str) -> None:
        if _thread_ident() != self.hub_thread:
            return
        glet = greenlet.getcurrent()
        self.wrapped_calls += 1
        self._charge(glet, ends_stretch=False)
        self._stacks.setdefault(glet, []).append(account)

    def leave(self) -> None:
        if _thread_ident() != self.hub_thread:
            return
        glet = greenlet.getcurrent()
        self._charge(glet)
        stack = self._stacks.get(glet)
        if stack:
            stack.pop()
            if not stack:
                del self._stacks[glet]

    def wrap(self, owner, attr: str, account: str) -> None:
        fn = getattr(owner, attr)
        if getattr(fn, "_hubtrace", False):
            return

        @functools.wraps(fn)
        def traced(*args, **kwargs):
            self.enter(account)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()
        traced._hubtrace = True
        setattr(owner, attr, traced)

    def on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self.enter("gc")
        else:
            self.leave()

    # -- keepalives ------------------------------------------------------------------------
    def keepalive(self, lateness_s: float) -> None:
        self.beats.append(lateness_s)
        if lateness_s < self._threshold:
            self._woke.pop(greenlet.getcurrent(), None)
            return
        glet = greenlet.getcurrent()
        woke = self._woke.pop(glet, self._last_wall)
        start = woke - lateness_s
        breakdown: collections.Counter = collections.Counter()
        for end, wall, cpu, queued, account in self._recent:
            begin = end - wall
            if end <= start or begin >= woke:
                continue
            overlap = min(end, woke) - max(begin, start)
            if overlap <= 0 or wall <= 0:
                continue
            share = overlap / wall
            breakdown[account] += cpu * share
            off_cpu = max(0.0, wall - cpu)
            breakdown[OS_WAIT] += min(queued, off_cpu) * share
            breakdown[POLL_WAIT if account == "poll" else GIL_WAIT] += \
                max(0.0, off_cpu - queued) * share
        for account, seconds in breakdown.items():
            self.late_by_cause[account] += seconds
        self.worst.append((lateness_s, dict(breakdown)))
        self.worst.sort(key=lambda x: -x[0])
        del self.worst[self._keep:]

    # -- report ----------------------------------------------------------------------------
    def report(self) -> dict:
        from hermes_green.runtime import percentile

        def ms(x: float) -> float:
            return round(x * 1000, 2)
        total_late = sum(self.late_by_cause.values()) or 1.0
        return {
            "switches": self.switches, "wrapped_calls": self.wrapped_calls,
            "keepalives": len(self.beats),
            "gateway_side_lateness_ms": {"p50": ms(percentile(self.beats, 50)),
                                         "p99": ms(percentile(self.beats, 99)),
                                         "max": ms(max(self.beats, default=0.0))},
            "late_beats_threshold_ms": ms(self._threshold),
            "lateness_by_cause_ms": {k: ms(v) for k, v in self.late_by_cause.most_common()},
            "lateness_by_cause_share": {k: round(v / total_late, 3)
                                        for k, v in self.late_by_cause.most_common()},
            "hub_time_by_account_ms": {
                k: {"wall": ms(v), "cpu": ms(self.cpu[k]), "longest": ms(self.longest.get(k, 0))}
                for k, v in self.wall.most_common(25)},
            "worst_beats": [{"late_ms": ms(late), "by_cause_ms": {
                k: ms(v) for k, v in sorted(b.items(), key=lambda kv: -kv[1]) if v >= 0.0001}}
                for late, b in self.worst],
        }


def install(late_threshold_s: float = 0.0005) -> HubTrace:
    """Trace the hub of this process (call before the gateway starts)."""
    import requests

    from hermes_green.platforms.base import PlatformAdapter
    from hermes_green.store import Store

    trace = HubTrace(late_threshold_s)
    greenlet.settrace(trace.on_switch)
    gc.callbacks.append(trace.on_gc)
    for name in [n for n, v in vars(Store).items() if callable(v) and not n.startswith("__")
                 and n not in ("db", "checkpoint", "_checkpoint_blocking", "_tx")]:
        trace.wrap(Store, name, "sqlite")
    trace.wrap(Store._Tx, "__exit__", "sqlite")
    trace.wrap(Store._Tx, "__enter__", "sqlite")
    trace.wrap(json, "dumps", "json")
    trace.wrap(json, "loads", "json")
    trace.wrap(pickle, "dumps", "pickle")
    trace.wrap(pickle, "loads", "pickle")
    import logging
    trace.wrap(logging.Logger, "_log", "logging")
    trace.wrap(requests.Session, "request", "http")
    import ssl
    for attr in ("recv", "recv_into", "send", "sendall", "read", "write", "do_handshake"):
        if hasattr(ssl.SSLSocket, attr):
            trace.wrap(ssl.SSLSocket, attr, "ssl")

    original = PlatformAdapter.record_keepalive

    def record_keepalive(adapter, lateness_s: float) -> None:
        trace.keepalive(lateness_s)
        original(adapter, lateness_s)
    PlatformAdapter.record_keepalive = record_keepalive

    import gevent
    loop = gevent.get_hub().loop
    before, after = loop.prepare(), loop.check()
    before.start(trace.enter, "poll")
    after.start(trace.leave)
    trace.watchers = (before, after)  # kept alive with the trace
    return trace
