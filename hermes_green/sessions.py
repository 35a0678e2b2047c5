"""One turn at a time per chat, and what happens to messages that arrive meanwhile.

A chat (bot, chat id) owns a small FIFO and at most one worker greenlet; the worker exits
when the FIFO is empty, so a thousand idle chats cost a thousand small objects, not a thousand
greenlets. The busy mode decides what a message arriving during a turn does:

- `queue`:     waits its turn (FIFO).
- `interrupt`: the running turn is killed (its greenlet gets GreenletExit, so the agent closes
               its HTTP stream), the user is told, and the new message starts at once.
- `merge`:     everything that arrived during the turn becomes one next turn.
- `steer`:     the running turn takes it after its current tool round, as the user's follow-up
               (`take_follow_ups`, called by the agent through the gateway); the turn's answer
               covers it. What the turn never took (it ended without another model call)
               becomes the next turn, joined.

Whatever the mode:
- debounce (`debounce_s`): before a turn starts, the worker waits until the chat has been quiet
  that long (at most DEBOUNCE_MAX_FACTOR times as long) and a burst of messages that arrived
  that close together becomes one turn: people split one thought into several messages.
- queue cap: at most `queue_cap` messages wait per chat; beyond it `drop` (`oldest` | `newest`)
  says which is skipped. Skipped messages go to `on_dropped(messages, notify)`, with `notify`
  true once per overflow (again only after the chat's queue has emptied).
- `stop(chat)` (the `/stop` and `/new` commands): the waiting messages are dropped and the
  running turn is killed with TurnStopped; the gateway keeps what was said.

The session layer knows nothing of agents or stores: it calls `run_turn(messages)` and, for a
turn ended early, `on_interrupted(messages)` / `on_stopped(messages)` (from the killed turn's
greenlet, or from the worker when the turn was killed before it began).
"""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import gevent
import gevent.event
import gevent.pool
from gevent import GreenletExit

from .models import InboundMessage

log = logging.getLogger("hermes_green.sessions")

TurnFn = Callable[[list[InboundMessage]], None]
BUSY_MODES = ("queue", "interrupt", "merge", "steer")
DEBOUNCE_MAX_FACTOR = 5  # a burst that never pauses starts its turn after 5 debounce windows
STOP_WAIT_S = 5.0  # how long stop() waits for the killed turn to finish its cleanup


class TurnInterrupted(GreenletExit):
    """Raised inside a turn's greenlet when a newer message interrupts it."""


class TurnStopped(GreenletExit):
    """Raised inside a turn's greenlet by `/stop` or `/new`: end now, keep what was said."""


@dataclass(frozen=True)
class BusyPolicy:
    mode: str = "queue"
    debounce_s: float = 0.0
    queue_cap: int = 20
    drop: str = "oldest"

    def __post_init__(self) -> None:
        if self.mode not in BUSY_MODES:
            raise ValueError(f"busy_mode must be one of {', '.join(BUSY_MODES)}, not {self.mode!r}")
        if self.drop not in ("oldest", "newest"):
            raise ValueError(f"drop must be oldest or newest, not {self.drop!r}")

    @classmethod
    def from_config(cls, gateway) -> "BusyPolicy":
        """From a GatewayConfig (`busy_mode` and the `busy` section)."""
        busy = gateway.busy
        return cls(gateway.busy_mode, busy.debounce_ms / 1000.0, busy.queue_cap, busy.drop)


@dataclass(frozen=True)
class ChatInfo:
    """What `/status` says about one chat."""
    running_for_s: float | None  # None: no turn running
    waiting: int


class ChatSession:
    def __init__(self, key: tuple[str, str], manager: "SessionManager") -> None:
        self.key = key
        self.manager = manager
        self.pending: deque[tuple[InboundMessage, float]] = deque()  # (message, arrived)
        self.follow_ups: deque[tuple[InboundMessage, float]] = deque()  # steer: for the turn
        self.worker: gevent.Greenlet | None = None
        self.current: list[InboundMessage] | None = None
        self.turn: gevent.Greenlet | None = None
        self.turn_started_at: float | None = None
        self._began = False  # the turn greenlet has started running
        self._killed_by: str | None = None  # "interrupt" | "stop"
        self.cap_noticed = False

    @property
    def busy(self) -> bool:
        return self.worker is not None and not self.worker.dead

    @property
    def running(self) -> bool:
        return self.turn is not None and not self.turn.dead

    @property
    def waiting(self) -> int:
        return len(self.pending) + len(self.follow_ups)

    def submit(self, msg: InboundMessage) -> None:
        policy = self.manager.policy
        arrived = time.monotonic()
        if policy.mode == "steer" and self.running:
            self.follow_ups.append((msg, arrived))
        else:
            self.pending.append((msg, arrived))
        if policy.mode == "interrupt" and self.running:
            self._killed_by = "interrupt"
            self.turn.kill(TurnInterrupted, block=False)
        self._enforce_cap(policy)
        if not self.busy:
            self.worker = self.manager.group.spawn(self._work)
            self.worker.name = f"session:{self.key[0]}:{self.key[1]}"

    def _enforce_cap(self, policy: BusyPolicy) -> None:
        dropped: list[InboundMessage] = []
        while self.waiting > policy.queue_cap:
            if policy.drop == "newest":  # the newest wait at the end (steer: of follow_ups)
                victim = (self.follow_ups or self.pending).pop()
            else:
                victim = (self.pending or self.follow_ups).popleft()
            dropped.append(victim[0])
        if dropped:
            notify = not self.cap_noticed
            self.cap_noticed = True
            log.info("queue cap reached bot=%s chat=%s dropped=%d policy=%s", *self.key,
                     len(dropped), policy.drop)
            self.manager.on_dropped(dropped, notify)

    # -- the worker ----------------------------------------------------------------------------
    def _work(self) -> None:
        try:
            while self.pending and self.manager.accepting:
                self._debounce()
                if not self.pending or not self.manager.accepting:
                    break
                batch = self._next_batch()
                if not self.waiting:
                    self.cap_noticed = False  # the overflow is over: the next one is told again
                self._run(batch)
                # steer: follow-ups the turn never took become the next turn
                self.pending.extend(self.follow_ups)
                self.follow_ups.clear()
        finally:
            self.manager._idle(self)

    def _debounce(self) -> None:
        window = self.manager.policy.debounce_s
        if window <= 0:
            return
        give_up = time.monotonic() + window * DEBOUNCE_MAX_FACTOR
        while self.pending:
            wake = min(self.pending[-1][1] + window, give_up)
            now = time.monotonic()
            if now >= wake:
                return
            gevent.sleep(wake - now)

    def _next_batch(self) -> list[InboundMessage]:
        policy = self.manager.policy
        if policy.mode in ("merge", "steer"):
            batch = [m for m, _ in self.pending]
            self.pending.clear()
            return batch
        if policy.mode == "interrupt" and len(self.pending) > 1:
            # Several arrived while one was being interrupted: the newest (burst) wins; the
            # others were superseded before they started and are interrupted too.
            items = list(self.pending)
            self.pending.clear()
            start = len(items) - 1
            while start > 0 and policy.debounce_s > 0 and \
                    items[start][1] - items[start - 1][1] <= policy.debounce_s:
                start -= 1
            if start:
                self.manager.on_interrupted([m for m, _ in items[:start]])
            return [m for m, _ in items[start:]]
        batch = [self.pending.popleft()]
        while self.pending and policy.debounce_s > 0 and \
                self.pending[0][1] - batch[-1][1] <= policy.debounce_s:
            batch.append(self.pending.popleft())
        return [m for m, _ in batch]

    def _run(self, batch: list[InboundMessage]) -> None:
        self.current = batch
        self._began = False
        self._killed_by = None
        self.turn_started_at = time.monotonic()
        self.turn = self.manager.group.spawn(self._turn, batch)  # owned: killed with the rest
        self.turn.name = f"turn:{self.key[0]}:{self.key[1]}"
        self.turn.join()
        if not self._began:  # killed before it ran: still owed its ending
            if self._killed_by == "stop":
                self.manager.on_stopped(batch)
            elif self._killed_by == "interrupt":
                self.manager.on_interrupted(batch)
        self.current = None
        self.turn = None
        self.turn_started_at = None

    def _turn(self, batch: list[InboundMessage]) -> None:
        self._began = True
        try:
            self.manager.run_turn(batch)
        except TurnInterrupted:
            self.manager.on_interrupted(batch)
        except TurnStopped:
            self.manager.on_stopped(batch)
        except GreenletExit:
            raise
        except Exception:
            # run_turn owns error replies; anything escaping it is a bug we log, and the
            # message stays journaled as processing so recovery retries it after a restart.
            log.exception("turn crashed bot=%s chat=%s", *self.key)

    # -- from outside --------------------------------------------------------------------------
    def stop(self) -> tuple[bool, list[InboundMessage]]:
        dropped = [m for m, _ in self.pending] + [m for m, _ in self.follow_ups]
        self.pending.clear()
        self.follow_ups.clear()
        self.cap_noticed = False
        if not self.running:
            return False, dropped
        self._killed_by = "stop"
        self.turn.kill(TurnStopped, block=True, timeout=STOP_WAIT_S)
        return True, dropped


class SessionManager:
    def __init__(self, policy: BusyPolicy | str, run_turn: TurnFn,
                 on_interrupted: Callable[[list[InboundMessage]], None], *,
                 on_stopped: Callable[[list[InboundMessage]], None] | None = None,
                 on_dropped: Callable[[list[InboundMessage], bool], None] | None = None) -> None:
        self.policy = BusyPolicy(policy) if isinstance(policy, str) else policy
        self.run_turn = run_turn
        self.on_interrupted = on_interrupted
        self.on_stopped = on_stopped or on_interrupted
        self.on_dropped = on_dropped or (lambda messages, notify: None)
        self.sessions: dict[tuple[str, str], ChatSession] = {}
        self.group = gevent.pool.Group()
        self.accepting = True
        self._all_idle = gevent.event.Event()
        self._all_idle.set()

    @property
    def busy_mode(self) -> str:
        return self.policy.mode

    def submit(self, msg: InboundMessage) -> None:
        key = msg.chat_key
        session = self.sessions.get(key)
        if session is None:
            session = self.sessions[key] = ChatSession(key, self)
        self._all_idle.clear()
        session.submit(msg)

    def take_follow_ups(self, batch: list[InboundMessage]) -> list[InboundMessage]:
        """Steer: the messages that arrived for this running turn since it last asked. They
        join `batch` (so the turn's answer closes them) and are returned for the agent."""
        session = self.sessions.get(batch[0].chat_key) if batch else None
        if session is None or session.current is not batch or not session.follow_ups:
            return []
        taken = [m for m, _ in session.follow_ups]
        session.follow_ups.clear()
        batch.extend(taken)
        if not session.waiting:
            session.cap_noticed = False
        return taken

    def stop(self, key: tuple[str, str]) -> tuple[bool, list[InboundMessage]]:
        """End the chat's running turn (waits for its cleanup, up to STOP_WAIT_S) and drop
        what waits. Returns (a turn was running, the dropped messages)."""
        session = self.sessions.get(key)
        if session is None:
            return False, []
        return session.stop()

    def chat_info(self, key: tuple[str, str]) -> ChatInfo:
        session = self.sessions.get(key)
        if session is None:
            return ChatInfo(None, 0)
        started = session.turn_started_at if session.running else None
        return ChatInfo(None if started is None else time.monotonic() - started,
                        session.waiting)

    def bot_info(self, bot: str) -> tuple[int, int]:
        """(turns running, messages waiting) over the bot's chats."""
        mine = [s for s in self.sessions.values() if s.key[0] == bot]
        return sum(1 for s in mine if s.running), sum(s.waiting for s in mine)

    def turns_in_flight(self) -> int:
        return sum(1 for s in self.sessions.values() if s.running)

    def _idle(self, session: ChatSession) -> None:
        if not session.waiting and self.sessions.get(session.key) is session:
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
