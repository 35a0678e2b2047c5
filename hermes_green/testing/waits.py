"""Waiting on a condition without sleeping for correctness: the one helper the package's test kit
(the contract, the fleet's users) needs, kept here so nothing in `hermes_green/` imports tests/.

A condition is re-checked whenever one of the given events is set (a fake's "something was
recorded" event) and at least every `poll_s` otherwise (gateway-internal state has no event).
"""
from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import gevent
import gevent.event

POLL_S = 0.01


def wait_until(predicate: Callable[[], Any], *, timeout: float = 10.0, what: str = "condition",
               events: Iterable[gevent.event.Event] = (), poll_s: float = POLL_S,
               describe: Callable[[], Any] | None = None) -> Any:
    """Return predicate()'s first truthy value; raise AssertionError naming `what` (and
    `describe()`, the state worth seeing in a failure) after `timeout` seconds."""
    events = list(events)
    deadline = time.monotonic() + timeout
    while True:
        for ev in events:
            ev.clear()
        value = predicate()
        if value:
            return value
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            detail = f": {describe()}" if describe is not None else ""
            raise AssertionError(f"{what} not met within {timeout:g}s{detail}")
        if events:
            gevent.wait(events, timeout=min(poll_s, remaining), count=1)
        else:
            gevent.sleep(min(poll_s, remaining))
