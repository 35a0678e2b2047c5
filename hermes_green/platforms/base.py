"""The adapter contract, and the long-connection helper every WebSocket platform is built on.

Three layers, as in slack_sdk's socket mode: the socket (websocket-client, blocking style on
patched sockets), the connection's life (connect, keepalive on a timetable, zombie detection,
reconnect with backoff, resume), and the meaning (a platform module's frame handlers). A platform
module subclasses `LongConnectionAdapter` and reads as a description of its protocol:

    prepare()            REST steps before the socket: token, endpoint URL      -> ws URL
    on_open()            first frames: subscribe / identify / resume
    on_frame(data)       one inbound frame (text already decoded, or bytes)
    heartbeat_frame()    what a keepalive beat sends
    close_action(code)   what a close code means: RETRY, FATAL, ...
    send(out)            deliver one reply (called by the gateway's outbox)

Error kinds decide what happens next (see each exception's docstring); an adapter never decides
to sleep-and-retry on its own.
"""
from __future__ import annotations

import logging
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Callable, ClassVar

import gevent
import gevent.event
import gevent.lock
import gevent.pool
import websocket

from .. import metrics
from ..logs import REDACTOR
from ..models import InboundMessage, OutboundMessage

log = logging.getLogger("hermes_green.platforms")

# Frames larger than this are logged and skipped, never parsed (a 5 MB garbage frame must not
# cost the hub a 5 MB json.loads).
MAX_FRAME_BYTES = 1 << 20
CONNECT_TIMEOUT_S = 10.0
TRACE_CHARS = 600  # how much of a frame a debug trace line shows


# --- errors ----------------------------------------------------------------------------------

class PlatformError(Exception):
    """Base of every adapter error. Messages never contain secrets."""


class FatalPlatformError(PlatformError):
    """The platform refuses us for good (bad credentials, banned bot, another instance owns the
    bot). Next step: stop this platform, report it, keep every other platform running."""


class ConnectionLost(PlatformError):
    """The connection ended or must be dropped (socket closed, zombie, server asked us to).
    Next step: reconnect after the backoff delay; `reason` labels the metric."""

    def __init__(self, reason: str, detail: str = "", *, resume: bool = True) -> None:
        super().__init__(f"{reason}{': ' + detail if detail else ''}")
        self.reason = reason
        self.resume = resume


class SendError(PlatformError):
    """A reply was not accepted. `retryable`: the outbox keeps it and tries again later
    (after `retry_after` seconds when the platform said so); otherwise it is dropped as failed."""

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
    """What /healthz, /metrics and the demo read about one adapter."""
    state: State = State.STOPPED
    connected_since: float | None = None  # wall clock
    connects: int = 0
    reconnects: Counter = field(default_factory=Counter)  # reason -> count
    last_error: str | None = None
    last_rtt_s: float | None = None
    heartbeat_lateness: deque = field(default_factory=lambda: deque(maxlen=512))  # seconds
    messages_in: int = 0
    messages_out: int = 0

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
        }


class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog's "full jitter").

    The first retry after a connection that was up is immediate: a single drop (server restart,
    QQ op7, a 4008) should cost milliseconds, not a second. Consecutive failures then wait
    uniform(0, min(cap, initial * factor**(n-1))). The count resets once a connection has stayed
    healthy for `healthy_after_s`, so a server that accepts and drops at once cannot make us spin.
    """

    def __init__(self, initial_s: float = 1.0, max_s: float = 60.0, factor: float = 2.0,
                 healthy_after_s: float = 60.0, rng: random.Random | None = None) -> None:
        self.initial_s, self.max_s, self.factor = initial_s, max_s, factor
        self.healthy_after_s = healthy_after_s
        self.failures = 0
        self._rng = rng or random.Random()

    @classmethod
    def from_config(cls, cfg) -> "Backoff":
        return cls(cfg.initial_s, cfg.max_s, cfg.factor, cfg.healthy_after_s)

    def connected_for(self, seconds: float) -> None:
        if seconds >= self.healthy_after_s:
            self.failures = 0

    def next_delay(self) -> float:
        n = self.failures
        self.failures += 1
        if n == 0:
            return 0.0
        return self._rng.uniform(0, min(self.max_s, self.initial_s * self.factor ** (n - 1)))


class CachedToken:
    """An access token and its expiry, as the platforms' REST APIs hand them out.

    `get()` fetches on first use and again `renew_margin(life)` seconds before expiry; one
    fetch runs at a time and callers arriving meanwhile reuse its result. `invalidate(refused)`
    forgets the token after a 401 so the next `get()` fetches anew, but only while it is still
    the refused one: several senders refused at once cause one refresh, not one each.
    `fetch()` returns (token, lifetime in seconds) or raises the adapter's own errors.
    """

    def __init__(self, fetch: Callable[[], tuple[str, float]], *,
                 renew_margin: Callable[[float], float],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch, self._renew_margin, self._clock = fetch, renew_margin, clock
        self._value: str | None = None
        self._renew_at = 0.0
        self._lock = gevent.lock.Semaphore()
        self.fetches = 0

    def get(self) -> str:
        with self._lock:
            if self._value is None or self._clock() >= self._renew_at:
                self.fetches += 1
                token, life = self._fetch()
                self._value = token
                self._renew_at = self._clock() + life - self._renew_margin(life)
            return self._value

    def invalidate(self, refused: str | None = None) -> None:
        if refused is None or refused == self._value:
            self._value = None


class Waiters:
    """Request/answer correlation: `expect(key)` before sending, `resolve(key, value)` from the
    read loop, `AsyncResult.get(timeout=)` in the sender. Used for WeCom req_ids and the like."""

    def __init__(self) -> None:
        self._pending: dict[str, gevent.event.AsyncResult] = {}

    def expect(self, key: str) -> gevent.event.AsyncResult:
        result = gevent.event.AsyncResult()
        self._pending[key] = result
        return result

    def resolve(self, key: str, value: Any) -> bool:
        result = self._pending.pop(key, None)
        if result is None:
            return False
        result.set(value)
        return True

    def discard(self, key: str) -> None:
        self._pending.pop(key, None)

    def fail_all(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for result in pending.values():
            result.set_exception(exc)


# --- the contract ----------------------------------------------------------------------------

class MemoryState:
    """An adapter's saved state (`adapter.saved_state`) kept in memory: what an adapter has until
    the gateway hands in its durable, store-backed one with the same two calls. Values are
    strings; putting None deletes. For what must survive a restart (QQ's session and seq)."""

    def __init__(self) -> None:
        self._values: dict[str, str] = {}

    def get(self, key: str) -> str | None:
        return self._values.get(key)

    def put(self, key: str, value: str | None) -> None:
        if value is None:
            self._values.pop(key, None)
        else:
            self._values[key] = value


InboundHandler = Callable[[InboundMessage], bool]  # True: new, journaled; False: skip (dup, refused)


class PlatformAdapter:
    """What the gateway needs from a platform. `run()` blocks until `stop()` or a fatal error;
    an unexpected exception out of `run()` is a crash the gateway's supervisor restarts."""

    name: ClassVar[str] = "platform"

    def __init__(self, config, on_message: InboundHandler, *,
                 logger: logging.Logger | None = None) -> None:
        self.config = config
        self._on_message = on_message
        self.log = logger or logging.getLogger(f"hermes_green.platforms.{self.name}")
        self.stats = AdapterStats()
        self.ready = gevent.event.Event()
        self._stopping = False
        self._allow = frozenset(getattr(config, "allow_from", ()) or ())
        self.saved_state = MemoryState()  # the gateway sets a durable one before run()

    # lifecycle
    def run(self) -> None:
        raise NotImplementedError

    @classmethod
    def check(cls, config, *, full: bool = False) -> str:
        """`hermes-green check`: perform the real auth step, keep no connection, return a
        one-line detail; raise PlatformError (or any error) when it fails. `full` also runs
        steps that would disturb a running gateway (taking over a single-connection bot)."""
        raise NotImplementedError(f"{cls.name} has no check")

    def stop(self) -> None:
        self._stopping = True

    # delivery
    def send(self, out: OutboundMessage) -> None:
        """Deliver one reply; return only once the platform accepted it. Raise SendError."""
        raise NotImplementedError

    def progress(self, reply_ref: dict, text_so_far: str) -> None:
        """Best-effort partial answer while the agent streams (only some platforms show it)."""

    def max_reply_parts(self) -> int | None:
        """How many messages one answer may be split into (QQ: 5); None when unlimited."""
        return None

    def reply_chunk_chars(self) -> int:
        """Longest text of one reply message; longer answers are split into parts."""
        return 4000

    # for subclasses
    def deliver(self, msg: InboundMessage) -> bool:
        """Hand a normalized inbound message up. `allow_from` is enforced here, before the
        gateway journals anything. Returns True when it was new and taken."""
        if self._allow and msg.user_id not in self._allow:
            self.log.info("inbound refused platform=%s user=%s reason=allow_from",
                          self.name, msg.user_id)
            return False
        self.stats.messages_in += 1
        return self._on_message(msg)

    def _set_state(self, state: State) -> None:
        if self.stats.state is state:
            return
        self.stats.state = state
        metrics.platform_up.labels(self.name).set(1 if state is State.READY else 0)
        if state is State.READY:
            self.stats.connected_since = time.time()
            self.ready.set()
        else:
            self.stats.connected_since = None
            self.ready.clear()


class CloseAction(str, Enum):
    RESUME = "resume"  # reconnect and resume the session where the protocol allows it
    REIDENTIFY = "reidentify"  # reconnect with a fresh session
    FATAL = "fatal"


class LongConnectionAdapter(PlatformAdapter):
    """A WebSocket long connection with keepalive, zombie detection and reconnects.

    Subclasses set `heartbeat_interval_s` (or call `start_heartbeat()` when the protocol announces
    it), `max_unanswered_beats`, and call `beat_answered()` when a keepalive answer arrives and
    `mark_ready()` once the session is established.
    """

    heartbeat_interval_s: float | None = None  # None: wait for the protocol to announce it
    heartbeat_after_ready: bool = False  # WeCom: keepalives only once subscribed
    first_beat_at_once: bool = False  # Feishu pings right after connecting
    # The session (subscribe / identify answered) must be ready this long after the socket
    # opened: a server that accepts and then says nothing would otherwise leave us without a
    # heartbeat, and so without zombie detection. None: no deadline.
    session_timeout_s: float | None = 20.0
    max_unanswered_beats: int = 2  # this many beats without an answer -> zombie
    silence_timeout_s: float | None = None  # nothing at all received for this long -> zombie
    # False: leave by cutting the TCP connection, without a close frame (for protocols whose
    # servers end a resumable session on a normal close but keep it after a cut).
    close_frame_on_leave: bool = True

    def __init__(self, config, on_message: InboundHandler, **kw) -> None:
        super().__init__(config, on_message, **kw)
        self.backoff = Backoff.from_config(config.backoff) if hasattr(config, "backoff") else Backoff()
        self.ws: websocket.WebSocket | None = None
        self._session = gevent.pool.Group()  # greenlets that live as long as one connection
        self._lost: gevent.event.AsyncResult | None = None
        self._beat_sent_at: float | None = None
        self._unanswered = 0
        self._last_rx = 0.0
        self._heartbeat: gevent.Greenlet | None = None
        self._wakeup = gevent.event.Event()

    @classmethod
    def check(cls, config, *, full: bool = False) -> str:
        """Default: the REST steps before connecting (token, endpoint) are the auth step;
        `full` also opens the connection and waits for the session to be established."""
        if full:
            return cls.check_session(config)
        url = cls(config, lambda msg: False).prepare()
        return f"credentials accepted; gateway {url.split('?')[0]}"

    @classmethod
    def check_session(cls, config, timeout_s: float = 15.0) -> str:
        """Connect, establish the session (subscribe / identify), close. The first failure is
        reported as it is: no backoff and retry loop."""
        adapter = cls(config, lambda msg: False)
        runner = gevent.spawn(adapter.run)
        runner.name = f"{cls.name}:check"
        try:
            deadline = time.monotonic() + timeout_s
            while not adapter.ready.is_set() and not runner.dead and not adapter.stats.reconnects:
                if time.monotonic() > deadline:
                    raise ConnectionLost("timeout", f"no session within {timeout_s:.0f}s")
                gevent.wait([adapter.ready, runner], timeout=0.05, count=1)
            if adapter.ready.is_set():
                return "session established (subscribe/identify accepted), then closed"
            if runner.dead and runner.exception is not None:
                raise runner.exception
            raise ConnectionLost("refused", adapter.stats.last_error or "connection failed")
        finally:
            adapter.stop()
            runner.join(timeout=5)
            runner.kill(block=False)

    # -- protocol hooks ----------------------------------------------------------------------
    def prepare(self) -> str:
        """REST work before connecting (token, endpoint). Returns the WebSocket URL."""
        raise NotImplementedError

    def connect_headers(self) -> list[str]:
        return []

    def on_open(self) -> None:
        """Send the first frames (subscribe, identify, resume). Runs with the reader going."""

    def on_frame(self, data: str | bytes) -> None:
        raise NotImplementedError

    def heartbeat_frame(self) -> str | bytes | None:
        return None

    def close_action(self, code: int | None) -> CloseAction:
        return CloseAction.RESUME

    def on_disconnect(self, lost: ConnectionLost) -> None:
        """The connection is gone (reply waiters should fail now)."""

    def describe_handshake_error(self, exc: websocket.WebSocketBadStatusException) -> PlatformError:
        return ConnectionLost("handshake", f"HTTP {exc.status_code}")

    # -- helpers for subclasses --------------------------------------------------------------
    def send_frame(self, data: str | bytes) -> None:
        ws = self.ws
        if ws is None or not ws.connected:
            raise ConnectionLost("not_connected")
        if self.log.isEnabledFor(logging.DEBUG):
            self._trace("out", data)
        try:
            if isinstance(data, bytes):
                ws.send_bytes(data)
            else:
                ws.send_text(data)
        except (websocket.WebSocketException, OSError) as e:
            self.lose("send_failed", type(e).__name__)
            raise ConnectionLost("send_failed", type(e).__name__) from None

    def lose(self, reason: str, detail: str = "", *, resume: bool = True) -> None:
        """End this connection from any greenlet; the run loop reconnects (or stops if fatal)."""
        self._end(ConnectionLost(reason, detail, resume=resume))

    def fail(self, error: FatalPlatformError) -> None:
        """A fatal error seen from inside the session (subscribe refused, banned bot)."""
        self._end(error)

    def mark_ready(self) -> None:
        self._set_state(State.READY)
        self.log.info("connected platform=%s connects=%d", self.name, self.stats.connects)
        if self.heartbeat_after_ready and self.heartbeat_interval_s is not None:
            self.start_heartbeat(self.heartbeat_interval_s)

    def start_heartbeat(self, interval_s: float) -> None:
        """Start (or re-time) the keepalive on a timetable that begins now."""
        self.heartbeat_interval_s = interval_s
        if self._heartbeat is not None and not self._heartbeat.dead:
            self._heartbeat.kill(block=False)
        self._heartbeat = self._session.spawn(self._heartbeat_loop, interval_s)
        self._heartbeat.name = f"{self.name}:heartbeat"

    def beat_answered(self) -> None:
        self._unanswered = 0
        if self._beat_sent_at is not None:
            self.stats.last_rtt_s = time.monotonic() - self._beat_sent_at
            self._beat_sent_at = None

    # -- the loop ----------------------------------------------------------------------------
    def stop(self) -> None:
        super().stop()
        self._wakeup.set()
        self._end(ConnectionLost("stopping"))

    def run(self) -> None:
        while not self._stopping:
            started = time.monotonic()
            outcome: PlatformError
            try:
                outcome = self._run_session()
            except FatalPlatformError as e:
                outcome = e
            except ConnectionLost as e:
                outcome = e
            except websocket.WebSocketBadStatusException as e:
                outcome = self.describe_handshake_error(e)
            except (websocket.WebSocketException, OSError, gevent.Timeout) as e:
                outcome = ConnectionLost("connect_failed", type(e).__name__)
            finally:
                self._teardown()
            if self._stopping:
                break
            if isinstance(outcome, FatalPlatformError):
                self.stats.last_error = str(outcome)
                self._set_state(State.FATAL)
                self.log.error("platform stopped platform=%s fatal=%s", self.name, outcome)
                raise outcome
            reason = getattr(outcome, "reason", "error")
            self.stats.last_error = str(outcome)
            self.stats.reconnects[reason] += 1
            metrics.reconnects_total.labels(self.name, reason).inc()
            self.backoff.connected_for(time.monotonic() - started)
            delay = self.backoff.next_delay()
            self._set_state(State.BACKOFF)
            self.log.warning("reconnecting platform=%s reason=%s detail=%s delay_s=%.2f",
                             self.name, reason, outcome, delay)
            self._wakeup.clear()
            self._wakeup.wait(delay)
        self._set_state(State.STOPPED)

    def _run_session(self) -> PlatformError:
        self._set_state(State.CONNECTING)
        url = self.prepare()
        self._lost = gevent.event.AsyncResult()
        if self._stopping:  # stop() came during prepare(): it could not reach this new _lost
            return ConnectionLost("stopping")
        self._unanswered = 0
        self._beat_sent_at = None
        ws = websocket.WebSocket(enable_multithread=True, skip_utf8_validation=True)
        ws.connect(url, header=self.connect_headers(), timeout=CONNECT_TIMEOUT_S,
                   suppress_origin=True)
        ws.settimeout(None)
        self.ws = ws
        self._last_rx = time.monotonic()
        self.stats.connects += 1
        reader = self._session.spawn(self._read_loop, ws)
        reader.name = f"{self.name}:reader"
        if self.heartbeat_interval_s is not None and not self.heartbeat_after_ready:
            self.start_heartbeat(self.heartbeat_interval_s)
        self.on_open()
        if self.session_timeout_s is not None and not self.ready.is_set():
            self._session.spawn(self._session_deadline, self.session_timeout_s).name = \
                f"{self.name}:session-deadline"
        return self._lost.get()

    def _session_deadline(self, timeout_s: float) -> None:
        if not self.ready.wait(timeout_s):
            self.lose("session_timeout", f"not ready {timeout_s:g}s after connect")

    def _end(self, outcome: PlatformError) -> None:
        lost = self._lost
        if lost is not None and not lost.ready():
            lost.set(outcome)

    def _teardown(self) -> None:
        ws, self.ws = self.ws, None  # clear the field first: senders now see "not connected"
        outcome = self._lost.value if self._lost is not None and self._lost.ready() else None
        self._set_state(State.CONNECTING if not self._stopping else State.STOPPED)
        # Stop the reader before closing: two greenlets may not read one socket.
        self._session.kill(block=True, timeout=2)
        self._heartbeat = None
        if ws is not None:
            try:
                if ws.connected and self.close_frame_on_leave:
                    ws.send_close()
            except Exception:  # the socket may already be half gone; we are leaving anyway
                pass
            ws.shutdown()
        try:
            self.on_disconnect(outcome if isinstance(outcome, ConnectionLost)
                               else ConnectionLost("closed"))
        except Exception:
            self.log.exception("on_disconnect failed platform=%s", self.name)

    def _read_loop(self, ws: websocket.WebSocket) -> None:
        while True:
            try:
                opcode, data = ws.recv_data()
            except websocket.WebSocketConnectionClosedException:
                return self.lose("closed", "socket closed")
            except (websocket.WebSocketException, OSError) as e:
                return self.lose("read_failed", type(e).__name__)
            self._last_rx = time.monotonic()
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                return self._on_close_frame(code, data[2:].decode("utf-8", "replace"))
            if len(data) > MAX_FRAME_BYTES:
                self.log.warning("frame skipped platform=%s reason=too_large bytes=%d",
                                 self.name, len(data))
                continue
            if opcode == websocket.ABNF.OPCODE_TEXT:
                try:
                    data = data.decode("utf-8")
                except UnicodeDecodeError:
                    self.log.warning("frame skipped platform=%s reason=invalid_utf8 bytes=%d",
                                     self.name, len(data))
                    continue
            if self.log.isEnabledFor(logging.DEBUG):
                self._trace("in", data)
            try:
                self.on_frame(data)
            except (ConnectionLost, FatalPlatformError) as e:
                return self._end(e)
            except Exception as e:  # one bad frame never kills the connection
                self.log.warning("frame skipped platform=%s reason=handler_error error=%s: %s",
                                 self.name, type(e).__name__, str(e)[:200])

    def _trace(self, direction: str, data: str | bytes) -> None:
        """Wire trace at debug level (frames carry secrets and tokens: the log formatter
        redacts them, see hermes_green/logs.py)."""
        shown = data[:TRACE_CHARS] if isinstance(data, str) else repr(data[:TRACE_CHARS])
        # redacted here too, not only by our formatters: any handler may receive this record
        self.log.debug("frame %s platform=%s bytes=%d data=%s", direction, self.name, len(data),
                       REDACTOR(shown))

    def _on_close_frame(self, code: int | None, reason: str) -> None:
        action = self.close_action(code)
        self.log.info("server closed platform=%s code=%s action=%s", self.name, code, action.value)
        if action is CloseAction.FATAL:
            self._end(FatalPlatformError(f"server closed the connection with code {code}"))
        else:
            self._end(ConnectionLost(f"close_{code}", reason[:100],
                                     resume=action is CloseAction.RESUME))

    def _heartbeat_loop(self, interval: float) -> None:
        hist = metrics.heartbeat_lateness.labels(self.name)
        due = time.monotonic() + (0.0 if self.first_beat_at_once else interval)
        while True:
            gevent.sleep(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            late = max(0.0, now - due)
            if self._unanswered >= self.max_unanswered_beats:
                return self.lose("zombie", f"{self._unanswered} keepalives unanswered")
            if self.silence_timeout_s is not None and now - self._last_rx > self.silence_timeout_s:
                return self.lose("zombie", f"nothing received for {now - self._last_rx:.1f}s")
            frame = self.heartbeat_frame()
            if frame is not None:
                try:
                    self.send_frame(frame)
                except ConnectionLost:
                    return
                self._unanswered += 1
                if self._beat_sent_at is None:
                    self._beat_sent_at = time.monotonic()
            self.stats.heartbeat_lateness.append(late)
            hist.observe(late)
            due += interval
            if due < time.monotonic():  # we fell behind by a whole interval: restart the table
                due = time.monotonic() + interval
