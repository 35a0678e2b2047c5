"""The adapter contract and the life of a bot's connection, whatever carries it.

As in errbot's backends and slack_sdk's socket mode, three concerns stay apart:
- the connection's life (this module): `run()` loops over `serve_once()` with state, backoff,
  the fatal/retryable split, reconnect reasons and metrics; an adapter never sleeps-and-retries
  on its own;
- the transport (`transports/websocket.py`, `transports/longpoll.py`): reading, keepalive,
  zombie detection for one kind of wire;
- the meaning (a platform module): frames in, messages up, replies out.

And one inbound policy, answered here once: `deliver()` hands a normalized message up and says
what happened (`Delivery`); `Delivery.ack` tells the adapter whether it may acknowledge the frame.
When the store cannot journal a message it is never dropped silently: the adapter's
`on_journal_failure` says what its platform allows (see `JournalFailure`).
"""
from __future__ import annotations

import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ClassVar, Protocol

import gevent
import gevent.event
import gevent.pool

from .. import metrics
from ..models import Attachment, InboundMessage, OutboundMessage, bot_key
from .kit import Backoff, spawn_owned
from .media import MediaRefused, MediaSource, OutboundFile

log = logging.getLogger("hermes_green.platforms")

CONNECT_TIMEOUT_S = 10.0
HOLD_MAX = 10_000  # inbound messages held in memory while the store refuses them, per bot
HOLD_RETRY_S = (0.1, 5.0)  # first and longest wait between journaling attempts for held ones


# --- errors ----------------------------------------------------------------------------------

class PlatformError(Exception):
    """Base of every adapter error. Messages never contain secrets."""


class FatalPlatformError(PlatformError):
    """The platform refuses this bot for good (bad credentials, banned bot, another instance owns
    it). Next step: stop this bot, report it, keep every other bot running."""


class ConnectionLost(PlatformError):
    """The connection ended or must be dropped (socket closed, zombie, server asked us to).
    Next step: reconnect after the backoff delay (never sooner than `retry_after`, when the
    server named one); `reason` labels the metric; `resume` keeps the protocol session."""

    def __init__(self, reason: str, detail: str = "", *, resume: bool = True,
                 retry_after: float | None = None) -> None:
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason
        self.resume = resume
        self.retry_after = retry_after


class SendError(PlatformError):
    """A reply was not accepted. `retryable`: the outbox keeps it and tries again later
    (after `retry_after` seconds when the platform said so); otherwise it is given up as
    undeliverable (logged, counted, shown on /healthz)."""

    def __init__(self, message: str, *, retryable: bool = True, retry_after: float | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after


# --- state and numbers -----------------------------------------------------------------------

class State(str, Enum):
    STOPPED = "stopped"
    CONNECTING = "connecting"
    READY = "ready"
    BACKOFF = "backoff"
    FATAL = "fatal"


@dataclass
class AdapterStats:
    """What /healthz, /metrics and the demo read about one bot."""
    state: State = State.STOPPED
    connected_since: float | None = None  # wall clock
    connects: int = 0
    reconnects: Counter = field(default_factory=Counter)  # reason -> count
    last_error: str | None = None
    last_rtt_s: float | None = None
    heartbeat_lateness: deque = field(default_factory=lambda: deque(maxlen=512))  # seconds
    messages_in: int = 0
    messages_out: int = 0  # counted by the gateway when a reply was accepted
    journal_failures: int = 0
    held: int = 0
    undeliverable: int = 0

    def as_dict(self) -> dict[str, Any]:
        from ..runtime import percentile
        lat = list(self.heartbeat_lateness)
        return {
            "state": self.state.value,
            "connected_since": self.connected_since,
            "connects": self.connects,
            "reconnects": sum(self.reconnects.values()),
            "reconnects_by_reason": dict(self.reconnects),
            "last_error": self.last_error,
            "last_rtt_ms": None if self.last_rtt_s is None else round(self.last_rtt_s * 1000, 2),
            "heartbeat_lateness_p99_ms": round(percentile(lat, 99) * 1000, 2),
            "heartbeat_lateness_max_ms": round(max(lat, default=0.0) * 1000, 2),
            "messages_in": self.messages_in,
            "messages_out": self.messages_out,
            "journal_failures": self.journal_failures,
            "held": self.held,
            "undeliverable": self.undeliverable,
        }


class Delivery(str, Enum):
    """What became of one inbound message handed up by `deliver()`."""
    NEW = "new"  # journaled; a turn will answer it
    DUPLICATE = "duplicate"  # journaled before (a redelivery): not answered again
    REFUSED = "refused"  # not for us (allow list, access policy); acknowledged, never answered
    HELD = "held"  # the store failed; kept in memory and retried (platforms that cannot resend)
    NOT_JOURNALED = "not_journaled"  # the store failed; do not ack, the platform sends it again

    @property
    def ack(self) -> bool:
        """May the adapter acknowledge the frame now? Only when the message is safe."""
        return self is not Delivery.NOT_JOURNALED


class JournalFailure(str, Enum):
    """What a platform offers when we could not journal a message (the adapter declares one):
    REDELIVER: the platform sends an unacknowledged event again -> do not ack;
    REPLAY: the session can be resumed from a cursor -> drop the connection without advancing
        the cursor, reconnect and resume (the event comes again);
    HOLD: neither -> keep the message in memory and retry journaling until the store takes it."""
    REDELIVER = "redeliver"
    REPLAY = "replay"
    HOLD = "hold"


InboundHandler = Callable[[InboundMessage], "Delivery | bool"]


class SavedState(Protocol):
    """A bot's small durable key-value memory (resume cursors, session ids), kept by the gateway
    in its store (`Store.adapter_state`) so an adapter never imports the store. Values are
    strings; putting None deletes."""

    def get(self, key: str) -> str | None: ...

    def put(self, key: str, value: str | None) -> None: ...

    def put_soon(self, key: str, value: str | None) -> None:
        """Like put, written within a fraction of a second and coalesced with the next values
        for the key: for a resume cursor that advances with every event, where an older saved
        value only replays events the journal already de-duplicates."""
        ...


class MemoryState:
    """SavedState for adapters built without a gateway (tests, `check`)."""

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self._values.get(key)

    def put(self, key: str, value: str | None) -> None:
        if value is None:
            self._values.pop(key, None)
        else:
            self._values[key] = value

    put_soon = put


# --- the contract ----------------------------------------------------------------------------

class PlatformAdapter:
    """What the gateway needs from one bot on one platform.

    `run()` blocks until `stop()` or a fatal error (raised); an unexpected exception out of
    `run()` is a crash the gateway's supervisor restarts. Subclasses implement `serve_once()`
    (usually by inheriting a transport's adapter class), `send()` and their protocol hooks.
    """

    name: ClassVar[str] = "platform"
    on_journal_failure: ClassVar[JournalFailure] = JournalFailure.REDELIVER
    # True when the platform allows one connection per bot (a second one kicks the first, is
    # refused, or splits its events): with several gateway processes, only the holder of the
    # bot's lease connects it (cluster/node.py). False: events are spread over connections and
    # every process may hold one (the journal de-duplicates).
    single_connection: ClassVar[bool] = False

    def __init__(self, config, on_message: InboundHandler, *,
                 saved_state: SavedState | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.config = config
        self.bot_id: str = getattr(config, "id", "") or self.name
        self._on_message = on_message
        self.saved_state: SavedState = saved_state if saved_state is not None else MemoryState()
        self.log = logger or logging.getLogger(f"hermes_green.platforms.{self.name}")
        self.stats = AdapterStats()
        self.ready = gevent.event.Event()
        self._stopping = False
        self._allow = frozenset(getattr(config, "allow_from", ()) or ())
        cfg_backoff = getattr(config, "backoff", None)
        self.backoff = Backoff.from_config(cfg_backoff) if cfg_backoff is not None else Backoff()
        self._wakeup = gevent.event.Event()
        # Greenlets that outlive one connection (held-message retries, progress updates).
        self.background = gevent.pool.Group()
        self._held: deque[InboundMessage] = deque()
        self._held_worker: gevent.Greenlet | None = None

    @property
    def labels(self) -> tuple[str, str]:
        return (self.name, self.bot_id)

    @property
    def bot_key(self) -> str:
        return bot_key(self.name, self.bot_id)

    # -- lifecycle ---------------------------------------------------------------------------
    def serve_once(self) -> None:
        """One connection's life: connect, serve until it ends. Return or raise ConnectionLost
        to reconnect; raise FatalPlatformError to stop this bot."""
        raise NotImplementedError

    def end_connection(self, outcome: PlatformError) -> None:
        """Make a running `serve_once()` return with `outcome` (called from any greenlet)."""

    def run(self) -> None:
        while not self._stopping:
            started = time.monotonic()
            outcome: PlatformError
            try:
                self.serve_once()
                outcome = ConnectionLost("closed", "connection ended")
            except (FatalPlatformError, ConnectionLost) as e:
                outcome = e
            except (OSError, gevent.Timeout) as e:
                outcome = ConnectionLost("connect_failed", type(e).__name__)
            if self._stopping:
                break
            if isinstance(outcome, FatalPlatformError):
                self.stats.last_error = str(outcome)
                self.set_state(State.FATAL)
                self.log.error("bot stopped platform=%s bot=%s fatal=%s", self.name, self.bot_id,
                               outcome)
                raise outcome
            reason = getattr(outcome, "reason", "error")
            self.stats.last_error = str(outcome)
            self.stats.reconnects[reason] += 1
            metrics.reconnects_total.labels(*self.labels, reason).inc()
            self.backoff.connected_for(time.monotonic() - started)
            delay = self.backoff.next_delay(getattr(outcome, "retry_after", None) or 0.0)
            self.set_state(State.BACKOFF)
            self.log.warning("reconnecting platform=%s bot=%s reason=%s detail=%s delay_s=%.2f",
                             self.name, self.bot_id, reason, outcome, delay)
            self._wakeup.clear()
            self._wakeup.wait(delay)
        self.set_state(State.STOPPED)

    def stop(self) -> None:
        self._stopping = True
        self._wakeup.set()
        self.end_connection(ConnectionLost("stopping"))

    @property
    def stopping(self) -> bool:
        return self._stopping

    @classmethod
    def check(cls, config, *, full: bool = False) -> str:
        """`hermes-green check`: perform the real auth step, keep no connection, return a
        one-line detail; raise PlatformError (or any error) when it fails. `full` also runs
        steps that would disturb a running gateway (taking over a single-connection bot).
        Default: establish a session once, then close."""
        return cls.check_session(config)

    @classmethod
    def check_session(cls, config, timeout_s: float = 15.0) -> str:
        """Connect, establish the session, close. The first failure is reported as it is: no
        backoff and retry loop."""
        adapter = cls(config, lambda msg: Delivery.REFUSED)
        runner = gevent.spawn(adapter.run)
        runner.name = f"{cls.name}:check"
        try:
            deadline = time.monotonic() + timeout_s
            while not adapter.ready.is_set() and not runner.dead and not adapter.stats.reconnects:
                if time.monotonic() > deadline:
                    raise ConnectionLost("timeout", f"no session within {timeout_s:.0f}s")
                gevent.wait([adapter.ready, runner], timeout=0.05, count=1)
            if adapter.ready.is_set():
                return "session established, then closed"
            if runner.dead and runner.exception is not None:
                raise runner.exception
            raise ConnectionLost("refused", adapter.stats.last_error or "connection failed")
        finally:
            adapter.stop()
            runner.join(timeout=5)
            runner.kill(block=False)

    # -- delivery (called by the gateway's outbox) --------------------------------------------
    def send(self, out: OutboundMessage) -> None:
        """Deliver one reply; return only once the platform accepted it. Raise SendError."""
        raise NotImplementedError

    def progress(self, reply_ref: dict, text_so_far: str) -> None:
        """Best-effort sign of life while the agent works (a streamed partial answer, an edit,
        a typing indicator). The final text always goes through the outbox."""

    def max_reply_parts(self) -> int | None:
        """How many messages one answer may be split into (files included); None: unlimited."""
        return None

    # -- media (the gateway's media module calls these; see platforms/media.py) -----------------
    # How the platform shows a markdown image link `![alt](url)` in a text reply: "markdown"
    # (rendered as an image), "bare" (a URL alone is shown as an image: keep only the URL),
    # "text" (shown as text: "alt: url"). The gateway rewrites answers accordingly.
    image_links: ClassVar[str] = "text"

    def media_source(self, att: Attachment, msg: InboundMessage) -> MediaSource:
        """Where an attachment's bytes are. Runs in a download greenlet (never the reader), so
        it may make REST calls. Default: the attachment's ref when it is a URL. Raise
        MediaRefused(reason) for a file that cannot or must not be fetched."""
        if att.ref.startswith(("https://", "http://")):
            return MediaSource(att.ref, size=att.size, mime=att.mime, name=att.name)
        raise MediaRefused(f"{self.name} does not let bots fetch this {att.kind}")

    def max_upload_bytes(self, media: str) -> int | None:
        """The largest file of that kind (image | file | voice | video) the platform takes from
        a bot; None when unknown."""
        return None

    def send_file(self, out: OutboundMessage) -> None:
        """Deliver one file (out.kind == "file"; OutboundFile.from_row(out.file)); return once
        the platform accepted it, else raise SendError. Default, for platforms whose adapter
        uploads nothing yet: the file is named in a text message instead."""
        file = OutboundFile.from_row(out.file)
        note = f"[file not attached: {file.name} (this chat cannot receive files from the bot)]"
        self.send(OutboundMessage(
            platform=out.platform, chat_id=out.chat_id, text=f"{out.text}\n{note}".strip(),
            in_reply_to=out.in_reply_to, reply_ref=out.reply_ref, seq=out.seq,
            outbox_id=out.outbox_id, attempts=out.attempts, bot=out.bot))

    def reply_chunk_chars(self) -> int:
        """Longest text of one reply message; longer answers are split into parts."""
        return 4000

    # -- inbound policy ----------------------------------------------------------------------
    def deliver(self, msg: InboundMessage) -> Delivery:
        """Hand a normalized inbound message up and say what became of it. `allow_from` is
        enforced here, before anything is journaled. A store failure is handled by this bot's
        `on_journal_failure` (never dropped silently); with REPLAY this raises ConnectionLost,
        so the adapter must not have advanced its resume cursor before calling."""
        msg.platform, msg.bot = self.name, self.bot_id
        if self._allow and msg.user_id not in self._allow:
            self.log.info("inbound refused platform=%s bot=%s user=%s reason=allow_from",
                          self.name, self.bot_id, msg.user_id)
            return Delivery.REFUSED
        if self._held:  # keep arrival order: newer messages queue behind held ones
            return self._hold(msg, "earlier messages are held")
        try:
            outcome = _as_delivery(self._on_message(msg))
        except Exception as e:
            return self._journal_failed(msg, e)
        if outcome is Delivery.NEW:
            self.stats.messages_in += 1
        return outcome

    def _journal_failed(self, msg: InboundMessage, error: Exception) -> Delivery:
        policy = self.on_journal_failure
        self.stats.journal_failures += 1
        metrics.inbound_journal_failures.labels(*self.labels, policy.value).inc()
        self.log.error("inbound not journaled platform=%s bot=%s chat=%s msg=%s error=%s: %s "
                       "then=%s", self.name, self.bot_id, msg.chat_id, msg.message_id,
                       type(error).__name__, str(error)[:200], policy.value)
        if policy is JournalFailure.REDELIVER:
            return Delivery.NOT_JOURNALED
        if policy is JournalFailure.REPLAY:
            raise ConnectionLost("journal_failed", type(error).__name__, resume=True)
        return self._hold(msg, type(error).__name__)

    def _hold(self, msg: InboundMessage, why: str) -> Delivery:
        if len(self._held) >= HOLD_MAX:
            # Beyond this the process is in trouble anyway; say loudly which message it was.
            self.log.error("inbound dropped platform=%s bot=%s chat=%s msg=%s reason=hold_full",
                           self.name, self.bot_id, msg.chat_id, msg.message_id)
            return Delivery.NOT_JOURNALED
        self._held.append(msg)
        self._held_changed()
        self.log.warning("inbound held platform=%s bot=%s msg=%s held=%d reason=%s", self.name,
                         self.bot_id, msg.message_id, len(self._held), why)
        if self._held_worker is None or self._held_worker.dead:
            self._held_worker = spawn_owned(self.background, self._retry_held,
                                            name=f"{self.name}:{self.bot_id}:held", log=self.log)
        return Delivery.HELD

    def _held_changed(self) -> None:
        self.stats.held = len(self._held)
        metrics.inbound_held.labels(*self.labels).set(len(self._held))

    def _retry_held(self) -> None:
        wait = HOLD_RETRY_S[0]
        while self._held:
            msg = self._held[0]
            try:
                outcome = _as_delivery(self._on_message(msg))
            except Exception as e:
                self.log.warning("held message still not journaled platform=%s bot=%s msg=%s "
                                 "error=%s retry_s=%.1f", self.name, self.bot_id, msg.message_id,
                                 type(e).__name__, wait)
                gevent.sleep(wait)
                wait = min(wait * 2, HOLD_RETRY_S[1])
                continue
            self._held.popleft()
            self._held_changed()
            wait = HOLD_RETRY_S[0]
            if outcome is Delivery.NEW:
                self.stats.messages_in += 1
            self.log.info("held message journaled platform=%s bot=%s msg=%s outcome=%s",
                          self.name, self.bot_id, msg.message_id, outcome.value)

    # -- for transports and subclasses -------------------------------------------------------
    def mark_ready(self) -> None:
        self.set_state(State.READY)
        self.log.info("connected platform=%s bot=%s connects=%d", self.name, self.bot_id,
                      self.stats.connects)

    def record_keepalive(self, lateness_s: float) -> None:
        """One keepalive left (or one long poll began) `lateness_s` after it was due."""
        self.stats.heartbeat_lateness.append(lateness_s)
        metrics.heartbeat_lateness.labels(*self.labels).observe(lateness_s)

    def set_state(self, state: State) -> None:
        if self.stats.state is state:
            return
        self.stats.state = state
        metrics.platform_up.labels(*self.labels).set(1 if state is State.READY else 0)
        if state is State.READY:
            self.stats.connected_since = time.time()
            self.ready.set()
        else:
            self.stats.connected_since = None
            self.ready.clear()

    _set_state = set_state  # the gateway's supervisor marks crashed/fatal bots through this


def _as_delivery(value: "Delivery | bool | None") -> Delivery:
    """The gateway answers with a Delivery; simple handlers (tests, check) may answer a bool."""
    if isinstance(value, Delivery):
        return value
    return Delivery.NEW if value else Delivery.DUPLICATE
