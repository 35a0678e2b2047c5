"""The status server: `/healthz` for load balancers and probes, `/metrics` for Prometheus, and
`/` a live status page that a WebSocket (`/ws`) keeps up to date. Served by gevent's pywsgi with
gevent-websocket's handler, on the gateway's own hub: every request is a short greenlet.

Health (what `/healthz` answers and the page's banner shows):
    ok        every enabled platform is ready (connected); also when no platform is configured
    degraded  at least one platform is ready and at least one is not (connecting, in backoff,
              stopped, or fatally refused)
    down      platforms are configured and none is ready
HTTP 200 for ok, 503 otherwise, so a plain HTTP check alerts on anything less than ok.

Access: on a loopback address the server is open to local users unless a token is configured.
On any other address a token is required (start-up refuses otherwise) and every request must
carry it, as `Authorization: Bearer <token>` or `?token=<token>` (the page opened as
`/?token=...` passes it on to its socket). Tokens are compared in constant time on their SHA-256
digests, so neither the content nor the length leaks through timing; a refusal is a bare 401.
A browser WebSocket from another origin is refused (403), so a web page the operator happens to
visit cannot read the loopback status socket. On loopback without a token, the Host header must
name a loopback address (127.0.0.1, localhost, [::1] or the bound host, any port): a page on
evil.example that re-resolves its name to 127.0.0.1 (DNS rebinding) gets a bare 421 on every
path. Requests without a Host header are not from browsers and are served.

A platform mounted here (the web chat; see webmount.py) is served under these same rules, except
that a mount with a token of its own takes that token instead of the server's on its paths (so
chat users never hold the status token).

Abuse (before any token is looked at, connections are what an attacker spends):
- a connection that sends no request for `IDLE_TIMEOUT_S` (after connecting, or between keep-alive
  requests) is closed; a request must be read and answered within `READ_TIMEOUT_S` of its first
  byte, however slowly it trickles in (a page socket is exempt once upgraded);
- at most `MAX_CONNECTIONS_PER_ADDRESS` connections from one client address and `MAX_CONNECTIONS`
  in all. At a limit, the oldest connection under it that has no complete request in (idle, or
  its request still trickling in) is closed to make room, so such connections never lock out a
  prober, whose request arrives at once, even one from the same address (every local client is
  127.0.0.1). When every connection under the limit is being answered or is a page socket, the
  new one is closed at once. A flood from one address only ever closes that address's own
  connections. Admission runs in the accept loop: nothing waits in the listen backlog;
- bad request lines, junk bytes, TLS handshakes to this plain port and timeouts are the client's
  doing: one DEBUG line each, never ERROR, and never the bytes received (they may carry a token).

The page's socket pushes a JSON snapshot at connect and every `push_interval_s`; the page may
send "ping" or "refresh" to get one at once. Anything else (binary, another text, a message over
`MAX_WS_MESSAGE_BYTES`, a protocol error) closes that one socket; other sockets and the HTTP
endpoints keep working. Oversized frames are refused from their header, before the payload is
read.

Nothing secret leaves this module: request logs carry the path without its query string, errors
are logged without the WSGI environ (which holds the Authorization header), and the recent-errors
list shown on the page is formatted through `logs.REDACTOR`.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import ipaddress
import json
import logging
import socket
import struct
import time
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import parse_qs, urlsplit

import gevent
import gevent.event
import gevent.lock
import gevent.pool
from gevent import pywsgi
from geventwebsocket.exceptions import ProtocolError, WebSocketError
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import Header, Stream, WebSocket

from . import metrics
from .logs import REDACTOR
from .runtime import percentile
from .webmount import MOUNTS, MessageTooLarge, WebMount, mount_path_problem

log = logging.getLogger("hermes_green.status")

PAGE_PATH = Path(__file__).resolve().parent / "static" / "status.html"
MAX_WS_MESSAGE_BYTES = 4096  # the page only ever sends "ping" / "refresh"
MAX_PAGE_SOCKETS = 32  # more live status pages than this are refused (503)
MAX_CONNECTIONS = 128  # concurrent connections the server holds (see "Abuse" above)
# from one client address; above MAX_PAGE_SOCKETS so local pages never lock out a local prober
MAX_CONNECTIONS_PER_ADDRESS = 48
IDLE_TIMEOUT_S = 5.0  # no request on a connection this long: closed
READ_TIMEOUT_S = 10.0  # a request from its first byte to its answer (a page socket is exempt)
WS_SEND_TIMEOUT_S = 5.0  # a page that stops reading is dropped after this long
PAGE_MESSAGES = frozenset({"ping", "refresh"})
SPARK_POINTS = 60  # points in each sparkline
RECENT_ERRORS = 50
LOOPBACK_NAMES = frozenset({"localhost", "ip6-localhost"})
# what a browser on this machine puts in Host for a loopback server (with any port)
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

# WebSocket close codes (RFC 6455 section 7.4.1)
CLOSE_GOING_AWAY = 1001
CLOSE_UNSUPPORTED = 1003
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009


class StatusServerError(Exception):
    """The status server cannot start as configured (no token off loopback, port in use).
    Next step: fix `gateway.status` in the config; the message says which key."""


# --- recent errors ---------------------------------------------------------------------------

class RecentErrors(logging.Handler):
    """Keeps the last `capacity` WARNING+ log records for the status page, redacted."""

    def __init__(self, capacity: int = RECENT_ERRORS) -> None:
        super().__init__(logging.WARNING)
        self.records: collections.deque[dict[str, Any]] = collections.deque(maxlen=capacity)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
            if record.exc_info and record.exc_info[0] is not None:
                text += f" exc={record.exc_info[0].__name__}"
            self.records.append({"at": record.created, "level": record.levelname.lower(),
                                 "logger": record.name, "message": REDACTOR(text)[:500]})
        except Exception:  # a log handler must never raise into the code that logged
            self.handleError(record)

    def latest(self, n: int = 20) -> list[dict[str, Any]]:
        return list(self.records)[-n:][::-1]


# --- what the endpoints report ---------------------------------------------------------------

def _platform_names(gateway) -> list[str]:
    names = set(gateway.adapters) | set(gateway.fatal)
    try:
        names |= set(gateway.config.platforms.enabled())
    except Exception:  # a hand-built config in a test may have no platforms section
        pass
    return sorted(names)


def _platform_state(gateway, name: str) -> dict[str, Any]:
    adapter = gateway.adapters.get(name)
    if adapter is None:
        doc: dict[str, Any] = {"state": "fatal" if name in gateway.fatal else "starting",
                               "connected_since": None, "reconnects": 0,
                               "reconnects_by_reason": {}, "last_error": None,
                               "last_rtt_ms": None, "heartbeat_lateness_p99_ms": 0.0,
                               "heartbeat_lateness_max_ms": 0.0, "messages_in": 0,
                               "messages_out": 0}
    else:
        doc = adapter.stats.as_dict()
    error = doc.get("last_error") or gateway.fatal.get(name)
    doc["last_error"] = REDACTOR(str(error)) if error else None
    return doc


def health_status(states: Iterable[str]) -> str:
    """ok / degraded / down from the platforms' states (see the module docstring)."""
    states = list(states)
    ready = sum(1 for s in states if s == "ready")
    if ready == len(states):
        return "ok"
    return "degraded" if ready else "down"


def _safe(fn, default=None):
    try:
        return fn()
    except Exception:  # the store closes during shutdown; health must still answer
        return default


def health(gateway) -> dict[str, Any]:
    """The `/healthz` document."""
    platforms = {}
    for name in _platform_names(gateway):
        doc = _platform_state(gateway, name)
        platforms[name] = {k: doc.get(k) for k in ("state", "connected_since", "reconnects",
                                                   "last_error", "heartbeat_lateness_p99_ms",
                                                   "undeliverable", "held")}
    hub = gateway.hub_watch
    # A store that lost its file (store.health()) makes the gateway degraded, and says why.
    store = _safe(gateway.store.health, {"ok": False, "error": "store unavailable"})
    status = health_status(p["state"] for p in platforms.values())
    return {
        "status": "degraded" if status == "ok" and not store["ok"] else status,
        "platforms": platforms,
        "hub": {"lateness_p99_ms": round(hub.lateness_p99_ms(), 2) if hub else None,
                "blocked_reports": hub.blocked_count if hub else 0},
        "outbox_pending": _safe(gateway.store.outbox_pending),
        # replies a platform refused for good (e.g. past QQ's passive window, proactive quota
        # used up): kept in the outbox as dead rows for inspection, counted here
        "undeliverable_replies": _safe(gateway.store.outbox_dead_count),
        **({} if store["ok"] else {"store": store}),
    }


def _spark(values, points: int = SPARK_POINTS) -> list[float]:
    """The latest values in ms, at most `points` of them: when there are more, each point is the
    max of a bucket of consecutive values, so a spike is never averaged away."""
    data = list(values)
    if len(data) > points:
        size = -(-len(data) // points)  # ceil
        buckets = [data[max(0, end - size):end] for end in range(len(data), 0, -size)]
        data = [max(b) for b in buckets[:points][::-1]]
    return [round(v * 1000.0, 2) for v in data]


def snapshot(gateway, errors: RecentErrors | None = None) -> dict[str, Any]:
    """Everything the status page shows, in one JSON-able dict."""
    now = time.time()
    platforms = {}
    for name in _platform_names(gateway):
        doc = _platform_state(gateway, name)
        adapter = gateway.adapters.get(name)
        since = doc.get("connected_since")
        doc["uptime_s"] = round(now - since, 1) if since else None
        doc["sparkline_ms"] = _spark(adapter.stats.heartbeat_lateness) if adapter else []
        platforms[name] = doc
    hub = gateway.hub_watch
    hub_doc: dict[str, Any] = {"lateness_p99_ms": None, "blocked_reports": 0,
                               "sparkline_ms": [], "recent_blocked": []}
    if hub is not None:
        lateness = list(hub.lateness)
        hub_doc.update({
            "lateness_p99_ms": round(percentile(lateness, 99) * 1000.0, 2),
            "lateness_max_ms": round(max(lateness, default=0.0) * 1000.0, 2),
            "blocked_reports": hub.blocked_count,
            "sparkline_ms": _spark(lateness),
            "recent_blocked": [{"at": r.at, "greenlet": r.greenlet,
                                "blocked_ms": round(r.blocked_s * 1000.0, 1)}
                               for r in list(hub.blocked)[-5:][::-1]],
        })
    started = gateway.started_at
    return {
        "now": now,
        "status": health_status(p["state"] for p in platforms.values()),
        "uptime_s": round(now - started, 1) if started else None,
        "platforms": platforms,
        "hub": hub_doc,
        "turns_in_flight": _safe(gateway.sessions.turns_in_flight, 0),
        "outbox_pending": _safe(gateway.store.outbox_pending),
        "errors": errors.latest() if errors is not None else [],
    }


# --- access ----------------------------------------------------------------------------------

def is_loopback(host: str) -> bool:
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()


class TokenCheck:
    """Does a request carry the token? Constant time on fixed-length digests."""

    def __init__(self, token: str | None) -> None:
        self._digest = _digest(token) if token else None

    @property
    def required(self) -> bool:
        return self._digest is not None

    def allows(self, environ) -> bool:
        if self._digest is None:
            return True
        header = environ.get("HTTP_AUTHORIZATION", "")
        scheme, _, value = header.partition(" ")
        from_header = value.strip() if scheme.lower() == "bearer" else ""
        from_query = (parse_qs(environ.get("QUERY_STRING", "")).get("token") or [""])[0]
        # Both candidates are always compared, so which one was given does not show in timing.
        ok_header = hmac.compare_digest(_digest(from_header), self._digest)
        ok_query = hmac.compare_digest(_digest(from_query), self._digest)
        return (ok_header and bool(from_header)) or (ok_query and bool(from_query))


def host_name(header: str) -> str | None:
    """The name in a Host header without its port ("[::1]:8765" -> "::1"), lower-cased; None
    when the header is not one host with an optional numeric port (two Host headers arrive
    joined by a comma and are refused too)."""
    header = header.strip().lower()
    if header.startswith("["):
        name, sep, rest = header[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else (None if rest else "")
        if not sep or port is None:
            return None
    else:
        name, _, port = header.partition(":")
    if not name or (port and not port.isdigit()) or any(c in name for c in ", /@[]"):
        return None
    return name


class HostCheck:
    """DNS rebinding guard for a loopback server without a token: Host must be a loopback name.
    Off loopback, or with a token, any Host is accepted (the token is the guard there, and a
    reverse proxy may pass the public name)."""

    def __init__(self, bound_host: str, token_required: bool) -> None:
        self.enabled = is_loopback(bound_host) and not token_required
        self.names = LOOPBACK_HOSTS | {bound_host.strip("[]").lower()}

    def allows(self, environ) -> bool:
        if not self.enabled:
            return True
        header = environ.get("HTTP_HOST")
        if header is None:  # every browser sends Host; a client without one is not a page
            return True
        return host_name(header) in self.names


def _same_origin(environ) -> bool:
    """A browser always sends Origin on a WebSocket; it must name this host. Clients that send
    no Origin (curl, websocket-client with origin suppressed) are not browsers."""
    origin = environ.get("HTTP_ORIGIN")
    if not origin:
        return True
    return urlsplit(origin).netloc.lower() == environ.get("HTTP_HOST", "").lower()


# --- the page's WebSocket --------------------------------------------------------------------

class MessageTooBig(MessageTooLarge):
    """A page sent a message over its socket's limit (MAX_WS_MESSAGE_BYTES for the status page,
    the mount's own for a mounted platform): its socket is closed with 1009. (Not a
    WebSocketError: gevent-websocket's `receive()` swallows those as socket errors.)"""


class PageSocket(WebSocket):
    """gevent-websocket's WebSocket, with three changes for the status page:
    - a size limit checked on each frame's header, before the payload is read (the stock class
      reads whatever length a frame declares);
    - writes are serialized (the pusher greenlet and the reader's close/pong never interleave);
    - `close(code)` sends that code (the stock one sends an empty close frame)."""

    __slots__ = ("_message_bytes", "_write_lock", "max_message_bytes")

    def __init__(self, environ, stream, handler) -> None:
        super().__init__(environ, stream, handler)
        self._message_bytes = 0
        self._write_lock = gevent.lock.Semaphore()
        self.max_message_bytes = MAX_WS_MESSAGE_BYTES

    def read_frame(self):
        header = Header.decode_header(self.stream)
        if header.flags:
            raise ProtocolError("reserved bits set")
        if header.opcode in (self.OPCODE_TEXT, self.OPCODE_BINARY):
            self._message_bytes = 0
        if header.opcode in (self.OPCODE_TEXT, self.OPCODE_BINARY, self.OPCODE_CONTINUATION):
            self._message_bytes += header.length
            if self._message_bytes > self.max_message_bytes:
                raise MessageTooBig(f"message over {self.max_message_bytes} bytes")
        if not header.length:
            return header, b""
        try:
            payload = self.raw_read(header.length)
        except OSError:
            payload = b""
        if len(payload) != header.length:
            raise WebSocketError("unexpected EOF reading frame payload")
        if header.mask:
            payload = header.unmask_payload(payload)
        return header, payload

    def send_frame(self, message, opcode):
        with self._write_lock:
            return super().send_frame(message, opcode)

    def close(self, code: int = 1000, message: bytes | str | None = b"") -> None:
        if self.closed:
            return
        reason = message.encode() if isinstance(message, str) else (message or b"")
        try:
            self.send_frame(struct.pack("!H", code) + reason[:123], self.OPCODE_CLOSE)
        except Exception:  # the peer may already be gone; we close anyway
            pass
        finally:
            self.closed = True
            self.stream = self.raw_write = self.raw_read = self.environ = None

    def abort(self) -> None:
        """Cut the TCP connection at once (after a frame was interrupted half-written, no
        close frame can follow)."""
        self.closed = True
        try:
            self.handler.socket.shutdown(2)
        except Exception:
            pass


_BAD_REQUEST = b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class _Evicted(gevent.GreenletExit):
    """Thrown into a connection's handler to close it and make room for a new one. A
    GreenletExit, so wherever it lands the greenlet ends quietly."""


class _Conn:
    """One accepted connection as admission control sees it: `evictable` from the moment its
    handler waits for a request until that request's head is in (see `_Handler`)."""

    __slots__ = ("address", "greenlet", "evictable")

    def __init__(self, address: str) -> None:
        self.address, self.greenlet, self.evictable = address, None, False

    def evict(self) -> None:
        if self.greenlet is not None:
            self.greenlet.kill(_Evicted, block=False)


class Admission:
    """The connection limits (see the module docstring). Runs in the accept loop on the hub:
    every call is a few dict operations, never a wait."""

    def __init__(self, total: int, per_address: int) -> None:
        self.total, self.per_address = total, per_address
        self._conns: dict[_Conn, None] = {}  # in accept order: the first found is the oldest
        self._per_address: collections.Counter[str] = collections.Counter()
        self.refused = self.evicted = 0

    def __len__(self) -> int:
        return len(self._conns)

    def held(self, address: str) -> tuple[int, int]:
        """(connections, evictable ones) from this client address."""
        evictable = sum(1 for c in self._conns if c.evictable and c.address == address)
        return self._per_address[address], evictable

    def admit(self, address: str) -> _Conn | None:
        """A `_Conn` to serve, or None: close this socket at once."""
        if self._per_address[address] >= self.per_address and not self._evict(address):
            self.refused += 1
            return None
        if len(self._conns) >= self.total and not self._evict(None):
            self.refused += 1
            return None
        conn = _Conn(address)
        self._conns[conn] = None
        self._per_address[address] += 1
        return conn

    def release(self, conn: _Conn | None) -> None:
        """The connection is gone (closed, or evicted); a second call is a no-op."""
        if conn is not None and self._conns.pop(conn, False) is None:
            self._per_address[conn.address] -= 1
            if not self._per_address[conn.address]:
                del self._per_address[conn.address]

    def _evict(self, address: str | None) -> bool:
        for conn in self._conns:
            if conn.evictable and (address is None or conn.address == address):
                self.release(conn)
                conn.evict()
                self.evicted += 1
                return True
        return False


class _QuietLog:
    """gevent-websocket's logger for our handler: what it reports (bad handshakes) is the
    client's doing, so it goes to DEBUG, like the rest of the pre-auth noise."""

    def debug(self, msg, *args, **kw):
        log.debug("status websocket: " + str(msg), *args)

    info = warning = error = debug


class _Handler(WebSocketHandler):
    """pywsgi handler: the idle and read timeouts, authorizes before any WebSocket upgrade, uses
    `PageSocket`, logs neither query strings nor the environ, and keeps client noise at DEBUG."""

    conn: _Conn | None = None  # set by _Server.handle
    _deadline: gevent.Timeout | None = None

    # timeouts ----------------------------------------------------------------------------
    def handle_one_request(self):
        # Evictable until the request's head is in (`get_environ`): a request that arrives at
        # once is read without a switch, so only idle or trickling connections are ever evicted.
        self._evictable(True)
        deadline = None
        try:
            if not self._await_request():
                return None
            deadline = self._deadline = gevent.Timeout(self.server.read_timeout_s)
            deadline.start()
            return super().handle_one_request()
        except gevent.Timeout as t:  # raised while the request line or headers trickled in
            if t is not deadline:
                raise
            self._noise("request not complete within the read timeout")
            return None
        except _Evicted:
            self._noise("closed to make room (no complete request)")
            return None
        finally:
            self._evictable(False)
            if deadline is not None:
                deadline.close()
                self._deadline = None

    def _await_request(self) -> bool:
        """Wait up to the idle timeout for the first byte of the next request. False: the peer
        closed or sent nothing in time; the connection ends."""
        rfile = self.rfile
        if rfile is None or rfile.closed:
            return False
        try:
            with gevent.Timeout(self.server.idle_timeout_s, False):
                return bool(rfile.peek(1))
            self._noise("idle timeout")
            return False
        except OSError:
            return False

    def _evictable(self, flag: bool) -> None:
        if self.conn is not None:
            self.conn.evictable = flag

    def get_environ(self):
        self._evictable(False)  # the head is in: from here on the request is being answered
        environ = super().get_environ()
        chunked = environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"
        if self.content_length or chunked:
            # Nothing here takes a body: answer without reading it, then close. (pywsgi would
            # read and discard it after the answer, however large or slow it is.)
            self.close_connection = True
            self.wsgi_input = pywsgi.Input(self.rfile, 0)
            environ["wsgi.input"] = self.wsgi_input
        return environ

    def run_websocket(self):
        # Upgraded: the page socket lives as long as the page (it has its own send timeout).
        if self._deadline is not None:
            self._deadline.close()
        return super().run_websocket()

    # WebSocket ---------------------------------------------------------------------------
    def run_application(self):
        if not self.application.may_upgrade(self.environ):
            # Answer as plain HTTP: the app replies 401 / 403 / 404 / 421 without upgrading.
            return pywsgi.WSGIHandler.run_application(self)
        return super().run_application()

    def upgrade_websocket(self):
        result = super().upgrade_websocket()
        # gevent-websocket answers a bad handshake with str bodies, which pywsgi cannot send.
        return [r.encode() if isinstance(r, str) else r for r in result] if result else result

    def upgrade_connection(self):
        result = super().upgrade_connection()
        stock = getattr(self, "websocket", None)
        if stock is not None:
            stock.closed = True  # so its __del__ sends nothing on the stream we take over
            self.websocket = PageSocket(self.environ, Stream(self), self)
            self.websocket.max_message_bytes = self.application.message_limit(self.environ)
            self.environ["wsgi.websocket"] = self.websocket
            try:  # small frames both ways: Nagle would hold the second of two for the peer's
                # delayed ACK (~40 ms), e.g. a chat reply right after its "received"
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except (OSError, AttributeError):
                pass
        return result

    @property
    def logger(self):
        return _QUIET_LOG

    # logging -----------------------------------------------------------------------------
    def log_request(self):
        if not self.environ:  # no request was parsed: `_noise` has said why
            return
        log.debug("status request path=%s status=%s", self.environ.get("PATH_INFO", "?"),
                  getattr(self, "code", None))

    def _noise(self, why: str) -> None:
        address = self.client_address[0] if isinstance(self.client_address, tuple) else "?"
        log.debug("status connection closed from=%s why=%s", address, why)

    def _handle_client_error(self, ex):
        # A bad request line or header (junk, a TLS handshake to this plain port): one DEBUG
        # line without the bytes (gevent's own message quotes them, and they may hold a token).
        self.close_connection = True
        self._noise(f"bad request ({type(ex).__name__})")
        return ("400", _BAD_REQUEST)

    def log_error(self, msg, *args):
        self._noise("client error")  # gevent's other client-side complaints; same rule

    def handle_error(self, t, v, tb):
        if issubclass(t, gevent.GreenletExit):
            # the server stopping, or an eviction that landed after the head was in: not an error
            self.close_connection = True
            return
        if v is not None and v is self._deadline:  # the answer could not be sent in time
            self.close_connection = True
            self._noise("answer not sent within the read timeout")
            return
        log.error("status request failed path=%s error=%s",
                  (self.environ or {}).get("PATH_INFO", "?"), t.__name__)
        self._send_error_response_if_possible(500)


_QUIET_LOG = _QuietLog()


class _Server(pywsgi.WSGIServer):
    """pywsgi's server with admission control in the accept loop (see `Admission`)."""

    def __init__(self, *args, admission: Admission, idle_timeout_s: float,
                 read_timeout_s: float, **kw) -> None:
        super().__init__(*args, **kw)
        self.admission = admission
        self.idle_timeout_s = idle_timeout_s
        self.read_timeout_s = read_timeout_s

    def do_handle(self, sock, address):
        host = address[0] if isinstance(address, tuple) else str(address)
        conn = self.admission.admit(host)
        if conn is None:
            log.debug("status connection refused from=%s why=connection limit", host)
            sock.close()
            return
        super().do_handle(sock, address, conn)

    def handle(self, sock, address, conn=None):
        try:
            if conn is not None:
                conn.greenlet = gevent.getcurrent()
            handler = self.handler_class(sock, address, self)
            handler.conn = conn
            handler.handle()
        finally:
            self.admission.release(conn)


# --- the server ------------------------------------------------------------------------------

def _json_response(start_response, status: str, doc: Any, headers=()) -> list[bytes]:
    body = json.dumps(doc).encode()
    start_response(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body))),
                            ("Cache-Control", "no-store"), *headers])
    return [body]


_PAGE_HEADERS = [
    ("Content-Type", "text/html; charset=utf-8"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),  # the URL may carry ?token=
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                "script-src 'unsafe-inline'; connect-src 'self'; "
                                "img-src data:; base-uri 'none'; form-action 'none'"),
]


class _Mounted:
    """A platform's mount (webmount.WebMount) as this server serves it: whose it is, the token
    rule for its paths (its own token, else the server's), and its live sockets."""

    __slots__ = ("owner", "mount", "token", "sockets")

    def __init__(self, owner, mount: WebMount, server_token: TokenCheck) -> None:
        self.owner, self.mount = owner, mount
        self.token = TokenCheck(mount.token) if mount.token else server_token
        self.sockets: set[PageSocket] = set()


class StatusServer:
    """`StatusServer(gateway, status_config).start()`; `.stop()` is idempotent. With port 0 the
    bound port is in `.port` after start; `.url` is the page's address (without the token).
    The limits and timeouts default to the module's constants; tests pass small ones.

    Mount point: a platform served by this server (the web chat) publishes a WebMount on
    `webmount.MOUNTS`; the server claims those of its own gateway's adapters while it runs and
    serves them under the same rules as its own paths: the Host check first, then the token
    (the mount's own when it has one, else this server's: required off loopback), same-origin
    WebSockets with the mount's size and socket limits, and the connection limits and timeouts
    of every connection here (see the module docstring)."""

    routes = ("/", "/healthz", "/metrics", "/ws")

    def __init__(self, gateway, config, *, push_interval_s: float = 1.0,
                 idle_timeout_s: float = IDLE_TIMEOUT_S, read_timeout_s: float = READ_TIMEOUT_S,
                 max_connections: int = MAX_CONNECTIONS,
                 max_connections_per_address: int = MAX_CONNECTIONS_PER_ADDRESS) -> None:
        self.gateway = gateway
        self.host = config.host
        self.port = config.port
        token = config.token.get_secret_value() if config.token is not None else None
        self._token = TokenCheck(token or None)
        if token:
            REDACTOR.add([token])
        self._host = HostCheck(self.host, self._token.required)
        self.push_interval_s = push_interval_s
        self.idle_timeout_s = idle_timeout_s
        self.read_timeout_s = read_timeout_s
        self.admission = Admission(max_connections, max_connections_per_address)
        self.errors = RecentErrors()
        self._server: pywsgi.WSGIServer | None = None
        self._sockets: set[PageSocket] = set()
        self._page: bytes = b""
        self._stopped = False
        self._mounts: dict[str, _Mounted] = {}  # by path
        if not is_loopback(self.host) and not self._token.required:
            raise StatusServerError(
                f"refusing to serve status on {self.host or 'all interfaces'} without a token: "
                "set gateway.status.token, or keep gateway.status.host on 127.0.0.1")

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    # lifecycle -----------------------------------------------------------------------------
    def start(self) -> "StatusServer":
        self._page = PAGE_PATH.read_bytes()
        # The pool is only a backstop (admission keeps it far from full): a full pool would
        # stop the accept loop and leave new connections waiting in the backlog.
        server = _Server((self.host, self.port), self, handler_class=_Handler,
                         spawn=gevent.pool.Pool(2 * self.admission.total), log=None,
                         error_log=pywsgi.LoggingLogAdapter(log, logging.DEBUG),
                         admission=self.admission, idle_timeout_s=self.idle_timeout_s,
                         read_timeout_s=self.read_timeout_s)
        try:
            server.start()
        except OSError as e:
            raise StatusServerError(f"gateway.status: cannot listen on {self.host}:{self.port}: "
                                    f"{e.strerror or e}") from None
        self._server = server
        self.port = server.server_port
        logging.getLogger().addHandler(self.errors)
        log.info("status server listening url=%s auth=%s", self.url,
                 "bearer" if self._token.required else "none (loopback)")
        MOUNTS.subscribe(self)
        return self

    def stop(self) -> None:
        if self._stopped or self._server is None:
            return
        self._stopped = True
        logging.getLogger().removeHandler(self.errors)
        MOUNTS.unsubscribe(self)
        mounted, self._mounts = list(self._mounts.values()), {}
        for ws in [*self._sockets, *(s for m in mounted for s in m.sockets)]:
            try:
                ws.close(CLOSE_GOING_AWAY, b"server stopping")
            except Exception:
                pass
        for m in mounted:
            m.owner.detach(self)
        server, self._server = self._server, None
        server.stop(timeout=1)
        log.info("status server stopped")

    # mount point (webmount.MountHost) -------------------------------------------------------
    def offer(self, owner, mount: WebMount) -> None:
        """A platform's mount was published: serve it when the platform is one of this gateway's
        (another gateway in the same process has its own server) and its path is free."""
        if self._stopped or self._server is None:
            return
        if not any(owner is a for a in list(self.gateway.adapters.values())):
            return
        self.withdraw(owner)
        problem = mount_path_problem(mount.path) or next(
            (f"already served for {getattr(m.owner, 'bot_key', '?')}"
             for m in self._mounts.values()
             if m.mount.covers(mount.path) or mount.covers(m.mount.path)), None)
        if problem is not None:
            log.error("status cannot mount platform=%s path=%s why=%s",
                      getattr(owner, "bot_key", "?"), mount.path, problem)
            return
        if mount.token:
            REDACTOR.add([mount.token])
        self._mounts[mount.path] = _Mounted(owner, mount, self._token)
        log.info("status mounted platform=%s path=%s auth=%s", getattr(owner, "bot_key", "?"),
                 mount.path, "own token" if mount.token else
                 ("bearer" if self._token.required else "none (loopback)"))
        owner.attach(self)

    def withdraw(self, owner) -> None:
        for path in [p for p, m in self._mounts.items() if m.owner is owner]:
            del self._mounts[path]

    def _mount_for(self, path: str) -> _Mounted | None:
        for mounted in self._mounts.values():
            if mounted.mount.covers(path):
                return mounted
        return None

    def message_limit(self, environ) -> int:
        """The largest WebSocket message a socket on this path may send."""
        mounted = self._mount_for(environ.get("PATH_INFO", ""))
        return mounted.mount.max_message_bytes if mounted is not None else MAX_WS_MESSAGE_BYTES

    # WSGI ----------------------------------------------------------------------------------
    def may_upgrade(self, environ) -> bool:
        """Called by the handler before a WebSocket handshake."""
        path = environ.get("PATH_INFO")
        if path != "/ws":
            mounted = self._mount_for(path or "")
            return (mounted is not None and path in mounted.mount.socket_paths
                    and self._host.allows(environ) and mounted.token.allows(environ)
                    and _same_origin(environ)
                    and len(mounted.sockets) < mounted.mount.max_sockets)
        return (self._host.allows(environ)
                and self._token.allows(environ) and _same_origin(environ)
                and len(self._sockets) < MAX_PAGE_SOCKETS)

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        if not self._host.allows(environ):  # first: a rebinding page learns nothing, not even 404
            log.info("status refused a request for another host path=%s", path[:100])
            start_response("421 Misdirected Request", [("Content-Length", "0"),
                                                       ("Cache-Control", "no-store")])
            return []
        mounted = self._mount_for(path)
        if mounted is not None:
            return self._serve_mount(mounted, environ, start_response)
        if path not in self.routes:
            return _json_response(start_response, "404 Not Found", {"error": "not found"})
        if not self._token.allows(environ):
            log.info("status unauthorized path=%s", path)
            return _json_response(start_response, "401 Unauthorized", {"error": "unauthorized"},
                                  [("WWW-Authenticate", 'Bearer realm="hermes-green"')])
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _json_response(start_response, "405 Method Not Allowed",
                                  {"error": "method not allowed"}, [("Allow", "GET, HEAD")])
        ws = environ.get("wsgi.websocket")
        if path == "/ws":
            if ws is not None:
                self._serve_socket(ws)
                return []
            if not _same_origin(environ):
                return _json_response(start_response, "403 Forbidden", {"error": "forbidden"})
            if len(self._sockets) >= MAX_PAGE_SOCKETS:
                return _json_response(start_response, "503 Service Unavailable",
                                      {"error": "too many status pages open"})
            return _json_response(start_response, "400 Bad Request",
                                  {"error": "websocket upgrade expected"})
        if path == "/healthz":
            doc = health(self.gateway)
            code = "200 OK" if doc["status"] == "ok" else "503 Service Unavailable"
            return _json_response(start_response, code, doc)
        if path == "/metrics":
            return self._metrics(environ, start_response)
        start_response("200 OK", [*_PAGE_HEADERS, ("Content-Length", str(len(self._page)))])
        return [self._page]

    def _serve_mount(self, mounted: _Mounted, environ, start_response):
        """A mounted platform's path: its token rule, then its app (a WebSocket is counted
        against the mount's limit while the app serves it)."""
        path = environ.get("PATH_INFO", "")
        if not mounted.token.allows(environ):
            log.info("status unauthorized path=%s", path[:100])
            return _json_response(start_response, "401 Unauthorized", {"error": "unauthorized"},
                                  [("WWW-Authenticate", 'Bearer realm="hermes-green"')])
        if path not in mounted.mount.socket_paths:
            return mounted.mount.app(environ, start_response)
        ws = environ.get("wsgi.websocket")
        if ws is None:
            if not _same_origin(environ):
                return _json_response(start_response, "403 Forbidden", {"error": "forbidden"})
            if len(mounted.sockets) >= mounted.mount.max_sockets:
                return _json_response(start_response, "503 Service Unavailable",
                                      {"error": "too many pages open"})
            return _json_response(start_response, "400 Bad Request",
                                  {"error": "websocket upgrade expected"})
        mounted.sockets.add(ws)
        try:
            return mounted.mount.app(environ, start_response)
        finally:
            mounted.sockets.discard(ws)
            ws.close(1000)

    def _metrics(self, environ, start_response):
        """Prometheus text, or OpenMetrics when the scraper asks for it (as prometheus-client's
        own WSGI app negotiates)."""
        pending = _safe(self.gateway.store.outbox_pending)
        if pending is not None:
            metrics.outbox_pending.set(pending)  # exact at scrape time, whatever wrote last
        from prometheus_client.exposition import choose_encoder  # on the first scrape
        encode, content_type = choose_encoder(environ.get("HTTP_ACCEPT", ""))
        body = encode(metrics.REGISTRY)
        start_response("200 OK", [("Content-Type", content_type),
                                  ("Content-Length", str(len(body))),
                                  ("Cache-Control", "no-store")])
        return [body]

    # the page's socket ---------------------------------------------------------------------
    def _serve_socket(self, ws: PageSocket) -> None:
        """Reads the page's messages while a pusher greenlet sends snapshots. Returns when the
        socket is closed by either side or refused for a bad message."""
        self._sockets.add(ws)
        wake = gevent.event.Event()
        pusher = gevent.spawn(self._push_loop, ws, wake)
        pusher.name = "status:ws-push"
        try:
            while not ws.closed:
                try:
                    message = ws.receive()
                except MessageTooBig as e:
                    self._refuse(ws, CLOSE_TOO_BIG, str(e))
                    break
                except WebSocketError:
                    break
                if message is None:  # closed, or a protocol error gevent-websocket answered
                    break
                if isinstance(message, (bytes, bytearray)):
                    self._refuse(ws, CLOSE_UNSUPPORTED, "binary messages not accepted")
                    break
                if message.strip() not in PAGE_MESSAGES:
                    self._refuse(ws, CLOSE_POLICY, "unknown message")
                    break
                wake.set()
        finally:
            self._sockets.discard(ws)
            pusher.kill(block=False)
            ws.close(1000)

    @staticmethod
    def _refuse(ws: PageSocket, code: int, why: str) -> None:
        log.info("status socket refused code=%d why=%s", code, why)
        ws.close(code, why)

    def _push_loop(self, ws: PageSocket, wake: gevent.event.Event) -> None:
        while not ws.closed:
            wake.clear()
            data = json.dumps(snapshot(self.gateway, self.errors), separators=(",", ":"))
            timer = gevent.Timeout(WS_SEND_TIMEOUT_S)
            timer.start()
            try:
                ws.send(data)
            except gevent.Timeout as t:
                if t is not timer:
                    raise
                log.info("status socket dropped: page not reading")
                ws.abort()
                return
            except WebSocketError:
                return
            finally:
                timer.close()
            wake.wait(self.push_interval_s)
