"""The terminal as a platform: `hermes-green chat` talks to the configured agent through the
same journal -> session -> agent -> outbox path as every chat platform.

stdin is read through gevent's cooperative file object, so a waiting prompt never blocks the hub.
"""
from __future__ import annotations

import getpass
import sys
import uuid

import gevent.event
from gevent.fileobject import FileObject

from ..models import InboundMessage, OutboundMessage
from .base import PlatformAdapter, State

PROMPT = "you> "


class ConsoleAdapter(PlatformAdapter):
    name = "console"

    def __init__(self, config, on_message, *, stdin=None, stdout=None, **kw) -> None:
        super().__init__(config, on_message, **kw)
        self._stdin = stdin if stdin is not None else FileObject(sys.stdin.fileno(), "rb",
                                                                  close=False)
        self._stdout = stdout if stdout is not None else sys.stdout
        self.eof = gevent.event.Event()
        self._stopped = gevent.event.Event()
        self._user = getpass.getuser()

    def run(self) -> None:
        self._set_state(State.READY)
        self._write(PROMPT)
        try:
            while not self._stopping:
                raw = self._stdin.readline()
                if not raw:
                    break
                text = (raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw).strip()
                if not text:
                    self._write(PROMPT)
                    continue
                self.deliver(InboundMessage(platform=self.name, message_id=uuid.uuid4().hex,
                                            chat_id="terminal", user_id=self._user, text=text))
        finally:
            self.eof.set()
        # Stay "connected" after end of input so the last replies can still be written.
        self._stopped.wait()
        self._set_state(State.STOPPED)

    def stop(self) -> None:
        super().stop()
        self._stopped.set()

    def send(self, out: OutboundMessage) -> None:
        self._write(f"bot> {out.text}\n{PROMPT}")

    def _write(self, text: str) -> None:
        self._stdout.write(text)
        self._stdout.flush()
