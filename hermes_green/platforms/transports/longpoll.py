"""The HTTP long-poll transport: ask the server for updates after a cursor, wait up to a
timeout for some to arrive, hand each one up, then move the cursor past it.

`LongPollAdapter` is what a platform module subclasses; reconnects, backoff and fatal handling
are the base's (`PlatformAdapter.run`). The hooks:

    prepare()            REST steps before polling (who am I, drop a webhook); raise
                         FatalPlatformError for bad credentials
    poll(timeout_s)      one blocking long poll -> list of updates (raise ConnectionLost with
                         `retry_after` for conflicts and rate limits)
    on_update(update)    normalize and `deliver()`; return once it is safe to move past it
    commit(update)       move the cursor past it (persist it where a restart must not repeat)

The order is errbot's long-poll backend's, chosen on purpose: the cursor moves only after the
update was journaled, so a crash between the two repeats the update (the journal recognizes it)
and never skips one. A long poll is this transport's keepalive: the gap between the end of one
poll and the start of the next is recorded as keepalive lateness, and a poll that outlives its
timeout by `poll_grace_s` is a zombie (the connection is dropped and polling starts afresh).
"""
from __future__ import annotations

import time
from typing import Any

import gevent
import gevent.event
import gevent.pool

from ..base import ConnectionLost, FatalPlatformError, PlatformAdapter, PlatformError, State


class LongPollAdapter(PlatformAdapter):
    poll_timeout_s: float = 25.0  # how long the server may hold one poll open
    poll_grace_s: float = 10.0  # beyond timeout + grace, the poll is a zombie

    def __init__(self, config, on_message, **kw) -> None:
        super().__init__(config, on_message, **kw)
        self._lost: gevent.event.AsyncResult | None = None

    # -- protocol hooks ----------------------------------------------------------------------
    def prepare(self) -> None:
        """REST work before the first poll."""

    def poll(self, timeout_s: float) -> list[Any]:
        raise NotImplementedError

    def on_update(self, update: Any) -> None:
        raise NotImplementedError

    def commit(self, update: Any) -> None:
        raise NotImplementedError

    def describe_update(self, update: Any) -> str:
        """A short, secret-free label for log lines about one update."""
        return type(update).__name__

    # -- the loop ----------------------------------------------------------------------------
    def end_connection(self, outcome: PlatformError) -> None:
        lost = self._lost
        if lost is not None and not lost.ready():
            lost.set(outcome)

    def serve_once(self) -> None:
        self.set_state(State.CONNECTING)
        self._lost = lost = gevent.event.AsyncResult()
        group = gevent.pool.Group()
        try:
            if self.stopping:
                return
            self.prepare()
            self.stats.connects += 1
            self.mark_ready()
            poller = group.spawn(self._poll_loop, lost)
            poller.name = f"{self.name}:{self.bot_id}:poll"
            raise lost.get()
        finally:
            self._lost = None
            group.kill(block=True, timeout=2)
            if self.stats.state is not State.FATAL:
                self.set_state(State.STOPPED if self.stopping else State.CONNECTING)

    def _poll_loop(self, lost: gevent.event.AsyncResult) -> None:
        """Poll until the connection ends. A hook that fails unexpectedly (a poll() answer of a
        shape it did not expect, a commit() that raises) ends the connection with a log line:
        the bot reconnects, never sits READY with nobody polling."""
        try:
            self._poll_until_lost(lost)
        except Exception as e:
            self.log.error("polling failed platform=%s bot=%s error=%s: %s", self.name,
                           self.bot_id, type(e).__name__, str(e)[:200], exc_info=True)
            if not lost.ready():
                lost.set(ConnectionLost("poll_failed", type(e).__name__))

    def _poll_until_lost(self, lost: gevent.event.AsyncResult) -> None:
        previous_end: float | None = None
        limit = self.poll_timeout_s + self.poll_grace_s
        while not lost.ready():
            if previous_end is not None:
                self.record_keepalive(max(0.0, time.monotonic() - previous_end))
            try:
                with gevent.Timeout(limit, ConnectionLost("zombie", f"poll outlived {limit:g}s")):
                    updates = self.poll(self.poll_timeout_s)
            except (ConnectionLost, FatalPlatformError) as e:
                return lost.set(e)
            except OSError as e:  # requests' errors are OSErrors too
                return lost.set(ConnectionLost("poll_failed", type(e).__name__))
            previous_end = time.monotonic()
            for update in updates:
                try:
                    self.on_update(update)
                except (ConnectionLost, FatalPlatformError) as e:
                    return lost.set(e)  # the cursor stays before this update
                except Exception as e:  # one bad update never stops polling
                    self.log.warning("update skipped platform=%s bot=%s update=%s error=%s: %s",
                                     self.name, self.bot_id, self.describe_update(update),
                                     type(e).__name__, str(e)[:200])
                self.commit(update)
