"""One turn at a time per chat, and what happens to messages that arrive meanwhile.

A chat (platform, chat id) owns a small FIFO and at most one worker greenlet; the worker exits
when the FIFO is empty, so a thousand idle chats cost a thousand small objects, not a thousand
greenlets. `busy_mode` decides what a message arriving during a turn does:

- `queue`:     waits its turn (FIFO).
- `interrupt`: the running turn is killed (its greenlet gets GreenletExit, so the agent closes
               its HTTP stream), the user is told, and the new message starts at once.
- `merge`:     everything that arrived during the turn becomes one next turn.

The session layer knows nothing of agents or stores: it calls `run_turn(messages)` and, on
interrupt, `on_interrupted(messages)` (from the killed turn's greenlet, before it ends).
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Callable

import gevent
import gevent.event
import gevent.pool
from gevent import GreenletExit

from .models import InboundMessage

log = logging.getLogger("hermes_green.sessions")

TurnFn = Callable[[list[InboundMessage]], None]


class TurnInterrupted(GreenletExit):
    """Raised inside a turn's greenlet when a newer message interrupts it."""


class ChatSession:
    def __init__(self, key: tuple[str, str], manager: "SessionManager") -> None:
        self.key = key
        self.manager = manager
        self.pending: deque[InboundMessage] = deque()
        self.worker: gevent.Greenlet | None = None
        self.current: list[InboundMessage] | None = None
        self.turn: gevent.Greenlet | None = None

    @property
    def busy(self) -> bool:
        return self.worker is not None and not self.worker.dead

    def submit(self, msg: InboundMessage) -> None:
        self.pending.append(msg)
        if self.manager.busy_mode == "interrupt" and self.turn is not None and not self.turn.dead:
            self.turn.kill(TurnInterrupted, block=False)
        if not self.busy:
            self.worker = self.manager.group.spawn(self._work)
            self.worker.name = f"session:{self.key[0]}:{self.key[1]}"

    def _next_batch(self) -> list[InboundMessage]:
        mode = self.manager.busy_mode
        if mode == "merge":
            batch = list(self.pending)
            self.pending.clear()
            return batch
        if mode == "interrupt" and len(self.pending) > 1:
            # Several arrived while one was being interrupted: the newest wins; the others were
            # superseded before they started and are interrupted too.
            superseded = list(self.pending)[:-1]
            last = self.pending[-1]
            self.pending.clear()
            self.manager.on_interrupted(superseded)
            return [last]
        return [self.pending.popleft()]

    def _work(self) -> None:
        try:
            while self.pending and self.manager.accepting:
                batch = self._next_batch()
                self.current = batch
                self.turn = gevent.spawn(self._turn, batch)
                self.turn.name = f"turn:{self.key[0]}:{self.key[1]}"
                self.turn.join()
                self.current = None
                self.turn = None
        finally:
            self.manager._idle(self)

    def _turn(self, batch: list[InboundMessage]) -> None:
        try:
            self.manager.run_turn(batch)
        except TurnInterrupted:
            self.manager.on_interrupted(batch)
        except GreenletExit:
            raise
        except Exception:
            # run_turn owns error replies; anything escaping it is a bug we log, and the
            # message stays journaled as processing so recovery retries it after a restart.
            log.exception("turn crashed platform=%s chat=%s", *self.key)


class SessionManager:
    def __init__(self, busy_mode: str, run_turn: TurnFn,
                 on_interrupted: Callable[[list[InboundMessage]], None]) -> None:
        if busy_mode not in ("queue", "interrupt", "merge"):
            raise ValueError(f"busy_mode must be queue, interrupt or merge, not {busy_mode!r}")
        self.busy_mode = busy_mode
        self.run_turn = run_turn
        self.on_interrupted = on_interrupted
        self.sessions: dict[tuple[str, str], ChatSession] = {}
        self.group = gevent.pool.Group()
        self.accepting = True
        self._all_idle = gevent.event.Event()
        self._all_idle.set()

    def submit(self, msg: InboundMessage) -> None:
        key = msg.chat_key
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = ChatSession(key, self)
        self._all_idle.clear()
        session.submit(msg)

    def turns_in_flight(self) -> int:
        return sum(1 for s in self.sessions.values() if s.turn is not None and not s.turn.dead)

    def _idle(self, session: ChatSession) -> None:
        if not session.pending and self.sessions.get(session.key) is session:
            del self.sessions[session.key]
        if not any(s.busy and s.worker is not gevent.getcurrent()
                   for s in self.sessions.values()):
            self._all_idle.set()

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Wait until no chat has a running or queued turn."""
        return bool(self._all_idle.wait(timeout))

    def drain(self, timeout: float) -> bool:
        """Stop starting turns; wait for running ones up to `timeout`, then kill the rest.
        Returns True when every running turn finished by itself. Messages still queued stay
        journaled and are recovered on the next start."""
        self.accepting = False
        finished = self._all_idle.wait(timeout)
        if not finished:
            self.group.kill(block=True, timeout=2)
            for s in list(self.sessions.values()):
                if s.turn is not None:
                    s.turn.kill(block=True, timeout=1)
        return bool(finished)
