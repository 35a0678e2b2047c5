"""When a turn's progress reaches the chat: not before the turn has run `after_s`.

Progress (WeCom's stream frames, Feishu's streaming card, Telegram's and Discord's typing and
edits, Slack's `chat.update`) is a sign of life for an answer that takes a while. An answer
ready within a fraction of a second needs none: the final reply arrives about as soon as the
first update would, and each update costs requests against the platform's rate limits (a Feishu
card is four calls where a plain reply is one) and hub time per message. So the first update
waits until the turn has run `after_s`; text the agent reported before then is shown at that
moment (a timer), unless the turn is over by then. Later updates pass straight through; each
adapter paces its own edits.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

import gevent

log = logging.getLogger(__name__)


class ProgressGate:
    """One turn's progress: held until `after_s` into the turn, then forwarded to `show`
    (best effort: an adapter's failure is logged at DEBUG, the final reply is durable)."""

    __slots__ = ("_show", "_spawn", "_due", "_open", "_latest", "_timer", "_closed", "_what")

    def __init__(self, show: Callable[[str], None], after_s: float, *,
                 spawn: Callable[[Callable[[], None]], object], what: str = "") -> None:
        """`spawn(fn)`: runs fn in a greenlet the caller owns (the held text is shown there)."""
        self._show = show
        self._spawn = spawn
        self._due = time.monotonic() + after_s
        self._open = after_s <= 0
        self._latest: str | None = None
        self._timer = None
        self._closed = False
        self._what = what

    def __call__(self, text_so_far: str) -> None:
        if self._closed:
            return
        if not self._open:
            wait = self._due - time.monotonic()
            if wait > 0:
                self._latest = text_so_far
                if self._timer is None:
                    # a libev timer, not a greenlet: most fast turns end before it fires
                    loop = gevent.get_hub().loop
                    self._timer = loop.timer(wait)
                    loop.update_now()  # from now, not from the loop's last wake-up (as sleep)
                    self._timer.start(self._fire)
                return
            self._open = True
        self._forward(text_so_far)

    def close(self) -> None:
        """The turn is over: nothing more is shown (the final reply follows)."""
        self._closed = True
        if self._timer is not None:
            self._timer.close()
            self._timer = None

    def _fire(self) -> None:
        # runs in the hub: an adapter's progress may block (a request), so in a greenlet
        self._timer = None
        if not self._closed:
            self._spawn(self._first)

    def _first(self) -> None:
        if self._open or self._closed:
            return  # a newer update went straight through meanwhile
        self._open = True
        self._forward(self._latest)

    def _forward(self, text_so_far: str) -> None:
        if self._closed:
            return
        try:
            self._show(text_so_far)
        except Exception as e:
            log.debug("progress failed %s error=%s", self._what, type(e).__name__)
