"""What an adapter test hands its adapter instead of a gateway: a journal that takes each
platform message id once (as Store.journal_inbound does), records what came and when, counts the
redeliveries it recognized, and can fail or stall like a troubled store. Adapter-level tests use
it with the adapter's strict fake; scenarios that need the whole path use a real Gateway (the
contract kit, testing/contract.py)."""
from __future__ import annotations

import time
from typing import Callable

import gevent

from ..models import InboundMessage
from ..platforms.base import Delivery, PlatformAdapter


class Journal:
    def __init__(self, fail_first: int = 0, *, stall_first_s: float = 0.0,
                 delay_s: float = 0.0) -> None:
        self.messages: list[InboundMessage] = []
        self.seen: set[str] = set()
        self.at: dict[str, float] = {}  # message id -> monotonic time it was journaled
        self.duplicates = 0
        self.failures = 0
        self.fail_first = fail_first  # the next calls raise (a store outage)
        self.stall_first_s = stall_first_s  # the first write takes this long (once)
        self.delay_s = delay_s  # every write takes this long (a slow disk)
        self.hook: Callable[[InboundMessage], None] | None = None  # sees each call first

    def __call__(self, msg: InboundMessage) -> Delivery:
        if self.hook is not None:
            self.hook(msg)
        if self.fail_first:
            self.fail_first -= 1
            self.failures += 1
            raise OSError("disk I/O error")
        if self.stall_first_s:
            stall, self.stall_first_s = self.stall_first_s, 0.0
            gevent.sleep(stall)
        if msg.message_id in self.seen:
            self.duplicates += 1
            return Delivery.DUPLICATE
        if self.delay_s:
            gevent.sleep(self.delay_s)
        self.seen.add(msg.message_id)
        self.at[msg.message_id] = time.monotonic()
        self.messages.append(msg)
        return Delivery.NEW

    def by_id(self, msg_id: str) -> InboundMessage | None:
        return next((m for m in self.messages if m.message_id == msg_id), None)


def run_until_stopped(adapter: PlatformAdapter) -> BaseException | None:
    """adapter.run() for a test greenlet: returns the exception it ended with, if any."""
    try:
        adapter.run()
    except Exception as e:  # tests inspect how it ended
        return e
    return None
