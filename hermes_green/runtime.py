"""The gevent runtime: the only place that monkey-patches, and the hub's own health watch.

Importing this module patches the standard library (socket, ssl, threading, time, select, ...)
so that every blocking call in plain-style code (websocket-client, requests, sqlite waits)
yields to the hub instead of stalling it. It must be the first import of any entry point, before
anything imports `requests`, `ssl` or `socket`; `bin/hermes-green` and `tests/conftest.py` do so.

`HubWatch` then tells us whether the one rule holds (nothing holds the hub for more than a few
milliseconds) from two angles, because each sees what the other cannot:
- gevent's blocking monitor (a native thread) notices a greenlet that keeps the hub from
  switching for longer than `max_blocking_time` and reports it with its stack;
- a lateness probe greenlet wakes every 50 ms and records how late it woke. GIL contention from
  pure-Python work in threads delays the hub without any greenlet "blocking", so only the probe
  sees it.
"""
from __future__ import annotations

from gevent import monkey

if not monkey.is_module_patched("socket"):
    # gevent looks up plugin entry points at each patch event, reading every installed
    # distribution's metadata: 55 ms of start-up and 3.3 MB of RSS (importlib.metadata) for its
    # one plugin, a warning about patching signal without os, which patch_all never does.
    # zope.event subscribers are still told of every event.
    import gevent.events as _events
    _scan = _events.notify_and_call_entry_points
    _events.notify_and_call_entry_points = _events.notify
    try:
        monkey.patch_all()
    finally:
        _events.notify_and_call_entry_points = _scan


def _without_pydantic_plugin_scan() -> None:
    """pydantic looks for plugins among the installed distributions when it builds its first
    model: its loader imports importlib.metadata (0.9 MB of a running gateway's RSS, with
    zipfile, csv and email, and ~19 ms of start-up). A gateway uses no pydantic plugin, so
    unless PYDANTIC_DISABLE_PLUGINS asks for some (pydantic's own switch: "__all__", "1" or
    "true" turn them all off, which is also what we assume when it is unset), the loader is one
    that finds none -- pydantic's own answer when plugins are off."""
    import os
    import sys as _sys
    import types
    if os.environ.get("PYDANTIC_DISABLE_PLUGINS", "__all__") not in ("__all__", "1", "true"):
        return
    if "pydantic.plugin._loader" not in _sys.modules:
        loader = types.ModuleType("pydantic.plugin._loader")
        loader.get_plugins = lambda: ()
        _sys.modules["pydantic.plugin._loader"] = loader


_without_pydantic_plugin_scan()
import collections  # noqa: E402
import gc  # noqa: E402  (everything below runs on a patched standard library)
import logging  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass  # noqa: E402

import gevent  # noqa: E402
import gevent.events  # noqa: E402
import zope.event  # noqa: E402

from . import metrics  # noqa: E402

log = logging.getLogger("hermes_green.runtime")

PROBE_INTERVAL_S = 0.05
# CPython hands the GIL to a waiting thread every `switchinterval`; the default 5 ms lets a
# CPU-bound thread in the pool keep the hub waiting several times that. 1 ms cut a 10 ms
# ticker's p99 lateness from 152 ms to 28 ms with four such threads (shared/DESIGN.md).
SWITCH_INTERVAL_S = 0.001


def freeze_startup_heap() -> None:
    """Move everything alive after start-up (modules, config, pools: hundreds of thousands of
    objects) out of the garbage collector's reach. A full collection otherwise walks all of
    them and held the hub for 50-70 ms under load (bench/throughput.py); what is created
    later is collected as usual."""
    gc.collect()
    gc.freeze()


def percentile(values, q: float) -> float:
    """Nearest-rank percentile of a sequence (0 for an empty one); q in [0, 100]."""
    data = sorted(values)
    if not data:
        return 0.0
    k = max(0, min(len(data) - 1, math.ceil(q / 100.0 * len(data)) - 1))
    return data[k]


@dataclass
class BlockedReport:
    at: float
    greenlet: str
    blocked_s: float
    stack: str


class HubWatch:
    """Starts the blocking monitor and the lateness probe; keeps recent numbers for /healthz."""

    def __init__(self, *, threads: int = 4, max_blocking_time_s: float = 0.1,
                 window: int = 1200) -> None:
        self.threads = threads
        self.max_blocking_time_s = max_blocking_time_s
        self.lateness = collections.deque(maxlen=window)  # seconds, last `window` probe wakes
        self.blocked: collections.deque[BlockedReport] = collections.deque(maxlen=50)
        self.blocked_count = 0
        self._probe: gevent.Greenlet | None = None
        self._hub = None

    def start(self) -> None:
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        hub = gevent.get_hub()
        self._hub = hub
        hub.threadpool.maxsize = self.threads
        gevent.config.max_blocking_time = self.max_blocking_time_s
        gevent.config.monitor_thread = True
        gevent.config.print_blocking_reports = False  # we log it ourselves, one line
        zope.event.subscribers.append(self._on_event)
        _start_monitoring_thread(hub)
        self._probe = gevent.spawn(self._probe_loop)
        self._probe.name = "runtime:lateness-probe"

    def stop(self) -> None:
        if self._probe is not None:
            self._probe.kill(block=False)
            self._probe = None
        if self._on_event in zope.event.subscribers:
            zope.event.subscribers.remove(self._on_event)

    # -- lateness probe ----------------------------------------------------------------------
    def _probe_loop(self) -> None:
        interval = PROBE_INTERVAL_S
        due = time.monotonic() + interval
        while True:
            gevent.sleep(max(0.0, due - time.monotonic()))
            late = max(0.0, time.monotonic() - due)
            self.lateness.append(late)
            metrics.hub_lateness.observe(late)
            due += interval
            if late > interval:  # do not try to catch up a backlog of missed wakes
                due = time.monotonic() + interval

    def lateness_p99_ms(self) -> float:
        return percentile(self.lateness, 99) * 1000.0

    # -- blocking monitor --------------------------------------------------------------------
    def _on_event(self, event) -> None:
        # Called on gevent's monitor thread: hand the report to the hub, where logging and
        # metrics are safe; it runs as soon as the hub is free again.
        if isinstance(event, gevent.events.EventLoopBlocked) and self._hub is not None:
            self._hub.loop.run_callback_threadsafe(self._report, event)

    def _report(self, event) -> None:
        glet = event.greenlet
        name = getattr(glet, "name", None) or repr(glet)
        stack = _blocked_stack(event.info)
        report = BlockedReport(time.time(), str(name), float(event.blocking_time), stack)
        self.blocked.append(report)
        self.blocked_count += 1
        metrics.hub_blocked_total.inc()
        log.warning("hub blocked greenlet=%s over_ms=%.0f stack=%r", report.greenlet,
                    report.blocked_s * 1000, stack[-1500:])


def _start_monitoring_thread(hub) -> None:
    """gevent's monitor thread, without two start-up costs that buy nothing here (together
    0.6 MB and 15-20 ms): its memory watch imports psutil and reads /proc/self/smaps to test
    that it could measure memory, then every 5 s does nothing unless max_memory_usage is set
    (GEVENT_MAX_MEMORY_USAGE: then it is installed as gevent does it); and its start event
    looks up plugin entry points in every installed package's metadata, as patch_all does
    above (subscribers are still told)."""
    from gevent._monitor import PeriodicMonitoringThread
    install = PeriodicMonitoringThread.install_monitor_memory_usage
    scan = gevent.events.notify_and_call_entry_points
    if not gevent.config.max_memory_usage:
        PeriodicMonitoringThread.install_monitor_memory_usage = lambda self: None
    gevent.events.notify_and_call_entry_points = gevent.events.notify
    try:
        hub.start_periodic_monitoring_thread()
    finally:
        PeriodicMonitoringThread.install_monitor_memory_usage = install
        gevent.events.notify_and_call_entry_points = scan


def _blocked_stack(info: list[str]) -> str:
    """The "Blocked Stack" part of gevent's report (the rest is every thread and greenlet)."""
    lines, inside = [], False
    for line in info:
        for part in str(line).splitlines():
            if part.startswith("Blocked Stack"):
                inside = True
                continue
            if inside and part.startswith("Info:"):
                return "\n".join(lines)
            if inside:
                lines.append(part.rstrip())
    return "\n".join(lines)
