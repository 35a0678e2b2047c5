"""The WebSocket transport: one connection's socket, reader, keepalive timetable and zombie watch.

`WebSocketAdapter` is what a platform module subclasses; it supplies the protocol as hooks and
the base class (`PlatformAdapter.run`) owns reconnects. Each `serve_once()` builds a fresh
`WebSocketConnection` (socket plus the greenlets that live exactly as long as it) and throws it
away when it ends, so nothing of a dead connection leaks into the next one.

    prepare()            REST steps before the socket: token, endpoint URL      -> ws URL
    connect_headers()    extra handshake headers
    on_open()            first frames: subscribe / identify / resume (the reader already runs)
    on_frame(data)       one inbound frame (text already decoded, or bytes)
    heartbeat_frame()    what a keepalive beat sends (keepalive = "frame")
    close_action(code)   what a close code means: RESUME, REIDENTIFY, FATAL
    on_disconnect(lost)  the connection is gone (fail reply waiters now)

Keepalive comes in two kinds: a protocol frame answered by a protocol frame (the adapter calls
`beat_answered()`), or a WebSocket ping control frame whose pong the reader sees itself
(`keepalive = "ping"`). Either way each beat's lateness against its timetable is recorded, and
`max_unanswered_beats` beats without an answer (or `silence_timeout_s` without a data frame: a
server that still answers pings but sends nothing else is silent too) make
the connection a zombie: it is dropped and the base reconnects.

Handover (for servers that announce a connection's end ahead of time and let a client hold a
second one meanwhile): `open_successor(reason)` opens a new connection beside the current one
(prepare(), connect, on_open(); its frames are read and handled at once). When the adapter calls
`mark_ready()` from one of its frames, it becomes the current connection without a gap, and the
old one keeps being read for `handover_grace_s` (frames already on their way there are handled
and answered on it), then is closed. A frame's answers always leave on the connection that
carried the frame: inside `on_frame`, `send_frame()` and `beat_answered()` act on that one.
"""
from __future__ import annotations

import logging
import time
from enum import Enum
from typing import ClassVar

import gevent
import gevent.event
import gevent.local
import gevent.pool
import websocket

from ... import metrics
from ...logs import REDACTOR
from ..base import (CONNECT_TIMEOUT_S, ConnectionLost, FatalPlatformError, PlatformAdapter,
                    PlatformError, State)
from ..kit import spawn_owned

# Frames larger than this are logged and skipped, never parsed (a 5 MB garbage frame must not
# cost the hub a 5 MB json.loads).
MAX_FRAME_BYTES = 1 << 20
TRACE_CHARS = 600  # how much of a frame a debug trace line shows


class CloseAction(str, Enum):
    RESUME = "resume"  # reconnect and resume the session where the protocol allows it
    REIDENTIFY = "reidentify"  # reconnect with a fresh session
    FATAL = "fatal"


class Keepalive(str, Enum):
    FRAME = "frame"  # heartbeat_frame(), answered by a protocol frame -> beat_answered()
    PING = "ping"  # a WebSocket ping; the pong is the answer


class WebSocketConnection:
    """One live WebSocket and the greenlets that belong to it (reader, heartbeat, session
    deadline). `serve()` blocks until the connection ends and returns why; `close()` tears it
    down once: clear the socket field first, stop the reader, then close the socket."""

    def __init__(self, owner: "WebSocketAdapter") -> None:
        self.owner = owner
        self.ws: websocket.WebSocket | None = None
        self.group = gevent.pool.Group()
        self.lost = gevent.event.AsyncResult()
        self.heartbeat: gevent.Greenlet | None = None
        self.interval_s: float | None = None
        self.unanswered = 0
        self.beat_sent_at: float | None = None
        self.last_rx = time.monotonic()
        self.established = gevent.event.Event()  # set when a successor takes over (handover)

    def open(self, url: str, headers: list[str]) -> None:
        ws = websocket.WebSocket(enable_multithread=True, skip_utf8_validation=True)
        ws.connect(url, header=headers, timeout=CONNECT_TIMEOUT_S, suppress_origin=True)
        ws.settimeout(None)
        self.ws = ws
        self.last_rx = time.monotonic()

    def spawn(self, fn, *args, job: str) -> gevent.Greenlet:
        g = self.group.spawn(fn, *args)
        g.name = f"{self.owner.name}:{self.owner.bot_id}:{job}"
        return g

    def end(self, outcome: PlatformError) -> None:
        if not self.lost.ready():
            self.lost.set(outcome)

    def send(self, data: str | bytes) -> None:
        ws = self.ws
        if ws is None or not ws.connected:
            raise ConnectionLost("not_connected")
        try:
            if isinstance(data, bytes):
                ws.send_bytes(data)
            else:
                ws.send_text(data)
        except (websocket.WebSocketException, OSError) as e:
            self.end(ConnectionLost("send_failed", type(e).__name__))
            raise ConnectionLost("send_failed", type(e).__name__) from None

    def ping(self) -> None:
        ws = self.ws
        if ws is None or not ws.connected:
            raise ConnectionLost("not_connected")
        try:
            ws.ping(str(time.monotonic()))
        except (websocket.WebSocketException, OSError) as e:
            self.end(ConnectionLost("send_failed", type(e).__name__))
            raise ConnectionLost("send_failed", type(e).__name__) from None

    def close(self, send_close_frame: bool = True) -> None:
        ws, self.ws = self.ws, None  # senders now see "not connected"
        self.group.kill(block=True, timeout=2)  # two greenlets may not read one socket
        self.heartbeat = None
        if ws is not None:
            try:
                if ws.connected and send_close_frame:
                    ws.send_close()
            except Exception:  # the socket may already be half gone; we are leaving anyway
                pass
            ws.shutdown()


class WebSocketAdapter(PlatformAdapter):
    """A platform whose bot holds one WebSocket: the protocol as hooks, the life in the base."""

    keepalive: ClassVar[Keepalive] = Keepalive.FRAME
    heartbeat_interval_s: float | None = None  # None: wait for the protocol to announce it
    heartbeat_after_ready: bool = False  # keepalives only once the session is established
    first_beat_at_once: bool = False  # the first beat leaves right after connecting
    # The session (subscribe / identify answered) must be ready this long after the socket
    # opened: a server that accepts and then says nothing would otherwise leave us without a
    # heartbeat, and so without zombie detection. None: no deadline.
    session_timeout_s: float | None = 20.0
    max_unanswered_beats: int = 2  # this many beats without an answer -> zombie
    silence_timeout_s: float | None = None  # nothing at all received for this long -> zombie
    max_frame_bytes: int = MAX_FRAME_BYTES
    # False: leave by cutting the TCP connection, without a close frame (for protocols whose
    # servers end a resumable session on a normal close but keep it after a cut).
    close_frame_on_leave: bool = True
    # Handover: how long a replaced connection is still read (and its frames answered) after
    # its successor took over, before we close it.
    handover_grace_s: float = 2.0

    def __init__(self, config, on_message, **kw) -> None:
        super().__init__(config, on_message, **kw)
        self.conn: WebSocketConnection | None = None
        self._successor: WebSocketConnection | None = None  # opened, not yet established
        self._handovers = gevent.pool.Group()  # greenlets opening a successor
        self._retiring = gevent.pool.Group()  # replaced connections in their grace period
        # The connection a greenlet works for: a reader's own, or the successor being opened.
        self._bound = gevent.local.local()

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

    @classmethod
    def check(cls, config, *, full: bool = False) -> str:
        """Default: the REST steps before connecting (token, endpoint) are the auth step;
        `full` also opens the connection and waits for the session to be established."""
        if full:
            return cls.check_session(config)
        url = cls(config, lambda msg: False).prepare()
        return f"credentials accepted; gateway {url.split('?')[0]}"

    # -- helpers for subclasses --------------------------------------------------------------
    @property
    def connected(self) -> bool:
        conn = self.conn
        return conn is not None and conn.ws is not None

    def _working_conn(self) -> WebSocketConnection | None:
        """Inside on_frame (or while a successor is opened): the connection this greenlet
        works for; elsewhere the current one. Outside a handover every greenlet works for the
        current one, and the greenlet-local lookup (~5% of a message's hub time) is skipped."""
        if self._successor is None and not self._handovers and not self._retiring:
            return self.conn
        return getattr(self._bound, "conn", None) or self.conn

    def send_frame(self, data: str | bytes) -> None:
        conn = self._working_conn()
        if conn is None:
            raise ConnectionLost("not_connected")
        if self.log.isEnabledFor(logging.DEBUG):
            self._trace("out", data)
        conn.send(data)

    def lose(self, reason: str, detail: str = "", *, resume: bool = True) -> None:
        """End this connection from any greenlet; the run loop reconnects."""
        self.end_connection(ConnectionLost(reason, detail, resume=resume))

    def fail(self, error: FatalPlatformError) -> None:
        """A fatal error seen from inside the session (subscribe refused, banned bot)."""
        self.end_connection(error)

    def end_connection(self, outcome: PlatformError) -> None:
        for conn in (self.conn, self._successor):
            if conn is not None:
                conn.end(outcome)

    def mark_ready(self) -> None:
        conn = getattr(self._bound, "conn", None)
        if conn is not None and conn is self._successor:
            return self._hand_over(conn)
        super().mark_ready()
        if self.heartbeat_after_ready and self.heartbeat_interval_s is not None:
            self.start_heartbeat(self.heartbeat_interval_s)

    def start_heartbeat(self, interval_s: float, *, first_after_s: float | None = None) -> None:
        """Start (or re-time) the keepalive on a timetable that begins now: the first beat after
        `first_after_s` (a protocol's jitter), else at once with `first_beat_at_once`, else after
        one interval; then every interval from there."""
        self.heartbeat_interval_s = interval_s
        conn = self._working_conn()
        if conn is None:
            return
        if conn.heartbeat is not None and not conn.heartbeat.dead:
            conn.heartbeat.kill(block=False)
        conn.interval_s = interval_s
        conn.heartbeat = conn.spawn(self._heartbeat_loop, conn, interval_s, first_after_s,
                                    job="heartbeat")

    @property
    def heartbeat_running(self) -> bool:
        conn = self.conn
        return conn is not None and conn.heartbeat is not None and not conn.heartbeat.dead

    def beat_answered(self) -> None:
        conn = self._working_conn()
        if conn is None:
            return
        conn.unanswered = 0
        if conn.beat_sent_at is not None:
            self.stats.last_rtt_s = time.monotonic() - conn.beat_sent_at
            conn.beat_sent_at = None

    # -- one connection ----------------------------------------------------------------------
    def serve_once(self) -> None:
        self.set_state(State.CONNECTING)
        url = self.prepare()
        conn = WebSocketConnection(self)
        self.conn = conn
        outcome: PlatformError | None = None
        try:
            if self.stopping:  # stop() came during prepare(): it could not reach this conn
                return
            try:
                conn.open(url, self.connect_headers())
            except websocket.WebSocketBadStatusException as e:
                raise self.describe_handshake_error(e) from None
            except (websocket.WebSocketException, OSError, gevent.Timeout) as e:
                raise ConnectionLost("connect_failed", type(e).__name__) from None
            self.stats.connects += 1
            conn.spawn(self._read_loop, conn, job="reader")
            if self.heartbeat_interval_s is not None and not self.heartbeat_after_ready:
                self.start_heartbeat(self.heartbeat_interval_s)
            self.on_open()
            if self.session_timeout_s is not None and not self.ready.is_set():
                conn.spawn(self._session_deadline, conn, self.session_timeout_s,
                           job="session-deadline")
            while True:
                outcome = conn.lost.get()
                if isinstance(outcome, FatalPlatformError) or self.stopping:
                    raise outcome
                if self.conn is conn and len(self._handovers):
                    # A successor is on its way: serve on it if it takes over, else reconnect.
                    gevent.joinall(list(self._handovers))
                if self.conn is conn or self.conn is None:
                    raise outcome
                self._retire(conn)
                conn = self.conn
        except ConnectionLost as e:
            outcome = e
            raise
        finally:
            self.conn = None
            if self.stats.state is not State.FATAL:
                self.set_state(State.STOPPED if self.stopping else State.CONNECTING)
            self._handovers.kill(block=True, timeout=2)
            successor, self._successor = self._successor, None
            for leftover in [conn, successor] + [g.args[0] for g in list(self._retiring)]:
                if leftover is not None:
                    leftover.close(self.close_frame_on_leave)
            self._retiring.kill(block=False)
            try:
                self.on_disconnect(outcome if isinstance(outcome, ConnectionLost)
                                   else ConnectionLost("closed"))
            except Exception:
                self.log.exception("on_disconnect failed platform=%s bot=%s", self.name,
                                   self.bot_id)

    # -- handover: the new connection before the old one closes ------------------------------
    def open_successor(self, reason: str) -> None:
        """Open a second connection beside the current, established one (the server announced
        that the current one will end). It takes over when the adapter calls `mark_ready()`
        from one of its frames; if it fails or is not established within `session_timeout_s`,
        it is closed and the current one goes on (its end then reconnects as usual). One at a
        time: a second request while one is being opened, or a request from a connection that
        was already replaced (a late notice on it), is ignored."""
        current = self.conn
        requester = getattr(self._bound, "conn", None)
        if (current is None or self.stopping or not self.ready.is_set() or len(self._handovers)
                or requester not in (None, current)):
            self.log.info("handover not started platform=%s bot=%s reason=%s busy=%s", self.name,
                          self.bot_id, reason, bool(len(self._handovers)))
            return
        spawn_owned(self._handovers, self._open_successor, current, reason,
                    name=f"{self.name}:{self.bot_id}:handover", log=self.log)

    def _open_successor(self, current: WebSocketConnection, reason: str) -> None:
        started = time.monotonic()
        try:
            new = WebSocketConnection(self)
            new.open(self.prepare(), self.connect_headers())
        except FatalPlatformError as e:
            return self.end_connection(e)
        except (PlatformError, websocket.WebSocketException, OSError, gevent.Timeout) as e:
            self.log.warning("handover failed platform=%s bot=%s reason=%s error=%s: %s",
                             self.name, self.bot_id, reason, type(e).__name__, str(e)[:200])
            return
        if self.conn is not current or self.stopping:
            return new.close(self.close_frame_on_leave)
        self._successor = new
        self._bound.conn = new  # on_open's frames go out on the new connection
        self.stats.connects += 1
        try:
            new.spawn(self._read_loop, new, job="reader")
            self.on_open()
            gevent.wait([new.established, new.lost], count=1,
                        timeout=self.session_timeout_s or CONNECT_TIMEOUT_S)
        except ConnectionLost:
            pass
        if new.established.is_set():
            self.log.info("handover done platform=%s bot=%s reason=%s seconds=%.3f", self.name,
                          self.bot_id, reason, time.monotonic() - started)
            return
        if self._successor is new:
            self._successor = None
        outcome = new.lost.value if new.lost.ready() else None
        new.close(self.close_frame_on_leave)
        if isinstance(outcome, FatalPlatformError):
            return self.end_connection(outcome)
        self.log.warning("handover failed platform=%s bot=%s reason=%s error=%s", self.name,
                         self.bot_id, reason, outcome or "not established in time")

    def _hand_over(self, new: WebSocketConnection) -> None:
        """The successor is established: it becomes the current connection now."""
        old, self.conn, self._successor = self.conn, new, None
        new.established.set()
        self.stats.reconnects["handover"] += 1
        metrics.reconnects_total.labels(*self.labels, "handover").inc()
        if self.heartbeat_interval_s is not None:
            self.start_heartbeat(self.heartbeat_interval_s)
        if old is not None:
            old.end(ConnectionLost("handover", "a successor took over"))

    def _retire(self, old: WebSocketConnection) -> None:
        """Keep reading a replaced connection for the grace period, then close it."""
        if old.heartbeat is not None:
            old.heartbeat.kill(block=False)

        def close_later(conn: WebSocketConnection) -> None:
            gevent.sleep(self.handover_grace_s)
            conn.close(self.close_frame_on_leave)
        g = self._retiring.spawn(close_later, old)
        g.name = f"{self.name}:{self.bot_id}:retire"

    def _session_deadline(self, conn: WebSocketConnection, timeout_s: float) -> None:
        if not self.ready.wait(timeout_s):
            conn.end(ConnectionLost("session_timeout", f"not ready {timeout_s:g}s after connect"))

    def _read_loop(self, conn: WebSocketConnection) -> None:
        self._bound.conn = conn  # this reader's frames are answered on its own connection
        ws = conn.ws
        while ws is not None:
            try:
                opcode, data = ws.recv_data(control_frame=True)
            except websocket.WebSocketConnectionClosedException:
                return conn.end(ConnectionLost("closed", "socket closed"))
            except (websocket.WebSocketException, OSError) as e:
                return conn.end(ConnectionLost("read_failed", type(e).__name__))
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                code = int.from_bytes(data[:2], "big") if len(data) >= 2 else None
                return self._on_close_frame(conn, code, data[2:].decode("utf-8", "replace"))
            if opcode == websocket.ABNF.OPCODE_PONG:
                if self.keepalive is Keepalive.PING:
                    self.beat_answered()
                continue
            if opcode == websocket.ABNF.OPCODE_PING:
                continue  # websocket-client has already answered it with a pong
            conn.last_rx = time.monotonic()  # data frames only: see silence_timeout_s
            if len(data) > self.max_frame_bytes:
                self.log.warning("frame skipped platform=%s bot=%s reason=too_large bytes=%d",
                                 self.name, self.bot_id, len(data))
                continue
            if opcode == websocket.ABNF.OPCODE_TEXT:
                try:
                    data = data.decode("utf-8")
                except UnicodeDecodeError:
                    self.log.warning("frame skipped platform=%s bot=%s reason=invalid_utf8 "
                                     "bytes=%d", self.name, self.bot_id, len(data))
                    continue
            if self.log.isEnabledFor(logging.DEBUG):
                self._trace("in", data)
            try:
                self.on_frame(data)
            except (ConnectionLost, FatalPlatformError) as e:
                return conn.end(e)
            except Exception as e:  # one bad frame never kills the connection
                self.log.warning("frame skipped platform=%s bot=%s reason=handler_error "
                                 "error=%s: %s", self.name, self.bot_id, type(e).__name__,
                                 str(e)[:200])

    def _trace(self, direction: str, data: str | bytes) -> None:
        """Wire trace at debug level (frames carry secrets and tokens: redacted here too, not
        only by our formatters, since any handler may receive this record)."""
        shown = data[:TRACE_CHARS] if isinstance(data, str) else repr(data[:TRACE_CHARS])
        self.log.debug("frame %s platform=%s bot=%s bytes=%d data=%s", direction, self.name,
                       self.bot_id, len(data), REDACTOR(shown))

    def _on_close_frame(self, conn: WebSocketConnection, code: int | None, reason: str) -> None:
        action = self.close_action(code)
        self.log.info("server closed platform=%s bot=%s code=%s action=%s", self.name,
                      self.bot_id, code, action.value)
        if action is CloseAction.FATAL:
            conn.end(FatalPlatformError(f"server closed the connection with code {code}"))
        else:
            conn.end(ConnectionLost(f"close_{code}", reason[:100],
                                    resume=action is CloseAction.RESUME))

    def _heartbeat_loop(self, conn: WebSocketConnection, interval: float,
                        first_after_s: float | None = None) -> None:
        if first_after_s is None:
            first_after_s = 0.0 if self.first_beat_at_once else interval
        due = time.monotonic() + first_after_s
        while True:
            gevent.sleep(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            late = max(0.0, now - due)
            if conn.unanswered >= self.max_unanswered_beats:
                return conn.end(ConnectionLost("zombie", f"{conn.unanswered} keepalives unanswered"))
            if self.silence_timeout_s is not None and now - conn.last_rx > self.silence_timeout_s:
                return conn.end(ConnectionLost("zombie",
                                               f"no data frame for {now - conn.last_rx:.1f}s"))
            try:
                if self.keepalive is Keepalive.PING:
                    conn.ping()
                    sent = True
                else:
                    frame = self.heartbeat_frame()
                    sent = frame is not None
                    if sent:
                        self.send_frame(frame)
            except ConnectionLost:
                return
            if sent:
                conn.unanswered += 1
                if conn.beat_sent_at is None:
                    conn.beat_sent_at = time.monotonic()
            self.record_keepalive(late)
            due += interval
            if due < time.monotonic():  # we fell behind by a whole interval: restart the table
                due = time.monotonic() + interval
