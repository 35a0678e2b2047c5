"""What every fake platform server shares: a gevent-websocket app on pywsgi (loopback, port 0)
serving one WebSocket path and any number of REST routes, a record of every frame, and faults
that test code injects.

A platform fake subclasses `FakePlatformServer`, registers its REST routes in `routes()` and
implements `on_connect(conn)` / `on_frame(conn, data)`. Keepalive deadlines are enforced by the
subclass with `conn.expect_keepalive(deadline_s, close_code)` so a late client is dropped just
as a strict real server would drop it.

Faults (all take effect at once, on every live connection unless one is named):
    drop()                     close the TCP connection without a close frame
    close_with(code, reason)   send a close frame with that code, then close
    go_silent(seconds)         stop answering anything (a hung server): no acks, no pongs, no
                               events, on every connection, new ones too
    go_silent(s, whole_server=False)  only the live connections turn zombie (a dead network
                               path): nothing arrives on them either way, nobody is dropped for
                               them, and a new connection works
    send_garbage(data)         send raw text/bytes as a frame
    rest_delay_s               every REST reply waits this long first
    rest_429(n, retry_after)   the next n REST calls get 429 with Retry-After
    refuse_connections()       an outage: nothing new is accepted until accept_connections()

Media: `host_media(data, ...)` serves bytes at a URL of this fake (as a platform's CDN would),
optionally slowly (`rate_bps`), until `expires_at`; `media_requests` records each fetch.
`parse_multipart(request)` reads an upload the way the platform's server would.
"""
from __future__ import annotations

import email.parser
import email.policy
import json
import socket
import struct
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import gevent
import gevent.event
from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler
from geventwebsocket.websocket import WebSocket


@dataclass
class FrameRecord:
    at: float  # time.monotonic() at receipt / send
    direction: str  # "in" (client -> fake) or "out"
    conn_id: int
    data: Any  # decoded JSON (dict) when the protocol is JSON, else raw


@dataclass
class HostedMedia:
    data: bytes
    content_type: str
    rate_bps: float | None = None  # serve this slowly (bytes per second)
    expires_at: float | None = None  # monotonic; later fetches get 403, as expired CDN links do
    headers: dict = field(default_factory=dict)


@dataclass
class UploadedFile:
    field: str
    filename: str | None
    content_type: str | None
    data: bytes


def parse_multipart(request: dict) -> tuple[dict[str, str], dict[str, UploadedFile]]:
    """multipart/form-data -> (text fields, file parts by field name). ValueError when the body
    is not multipart or is malformed (a real server answers 400)."""
    ctype = request["headers"].get("Content-Type", "")
    if not ctype.lower().startswith("multipart/form-data") or "boundary=" not in ctype:
        raise ValueError("not multipart/form-data")
    raw = b"Content-Type: " + ctype.encode("latin-1") + b"\r\n\r\n" + request["body"]
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(raw)
    if not msg.is_multipart():
        raise ValueError("malformed multipart body")
    fields: dict[str, str] = {}
    files: dict[str, UploadedFile] = {}
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            raise ValueError("a part without a name")
        filename = part.get_param("filename", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if filename is not None:
            files[name] = UploadedFile(name, filename, part.get_content_type(), data)
        else:
            fields[name] = data.decode("utf-8")
    return fields, files


@dataclass
class Disconnect:
    at: float
    conn_id: int
    reason: str  # "client_closed", "keepalive_deadline", "fault_drop", "kicked", ...


class Conn:
    """One live WebSocket connection on the fake."""

    def __init__(self, server: "FakePlatformServer", ws: WebSocket, conn_id: int) -> None:
        self.server = server
        self.ws = ws
        self.id = conn_id
        self.opened_at = time.monotonic()
        self.closed = gevent.event.Event()
        self.state: dict[str, Any] = {}  # per-connection protocol state for the subclass
        self._deadline_s: float | None = None
        self._deadline_code: int | None = None
        self._last_keepalive = time.monotonic()
        self._watch: gevent.Greenlet | None = None
        self.close_reason: str | None = None
        self.silent_until = 0.0  # a zombie until then (go_silent(..., whole_server=False))

    @property
    def silent(self) -> bool:
        """Nothing arrives on this connection either way (the server hangs, or its path died)."""
        now = time.monotonic()
        return self.silent_until > now or self.server.silent_until > now

    # keepalive rule ---------------------------------------------------------------------
    def expect_keepalive(self, deadline_s: float, close_code: int | None = None) -> None:
        """Drop this client if no `keepalive()` arrives within `deadline_s` of the previous
        one (or of this call), closing with `close_code` when given (QQ: 4009)."""
        self._deadline_s = deadline_s
        self._deadline_code = close_code
        self._last_keepalive = time.monotonic()
        if self._watch is None:
            self._watch = gevent.spawn(self._watch_keepalive)

    def keepalive(self) -> None:
        self._last_keepalive = time.monotonic()

    def _watch_keepalive(self) -> None:
        while not self.closed.is_set():
            # A zombie's keepalives never arrive; the deadline counts from the end of it (the
            # server cannot tell the client anyway: nothing reaches it).
            last = max(self._last_keepalive, self.silent_until)
            remaining = last + self._deadline_s - time.monotonic()
            if remaining <= 0:
                self.server.log_event("keepalive_deadline", self)
                self.close(self._deadline_code, "keepalive deadline missed",
                           reason="keepalive_deadline")
                return
            self.closed.wait(remaining)

    # sending ----------------------------------------------------------------------------
    def send(self, data: Any) -> bool:
        """Send a dict (as JSON text), str or bytes. Returns False if the socket is gone."""
        if self.closed.is_set() or self.silent:
            return False
        raw = json.dumps(data, ensure_ascii=False) if isinstance(data, dict) else data
        try:
            self.ws.send(raw, binary=isinstance(raw, bytes))
        except Exception:
            self.close(None, reason="send_failed")
            return False
        self.server.record("out", self, data)
        return True

    def close(self, code: int | None = None, message: str = "", *, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        try:
            if code is not None:
                # gevent-websocket's ws.close(code) sends an empty close frame: write our own.
                payload = struct.pack("!H", code) + message.encode()[:100]
                self.ws.send_frame(payload, WebSocket.OPCODE_CLOSE)
            self.ws.close()
        except Exception:
            pass
        self._mark_closed(reason)

    def drop(self, *, reason: str = "fault_drop") -> None:
        """Close the TCP connection with no close frame (a network cut)."""
        if self.closed.is_set():
            return
        self.close_reason = reason
        try:
            self.ws.stream.handler.socket.shutdown(2)
        except Exception:
            pass
        self._mark_closed(reason)

    def _mark_closed(self, reason: str) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.server.disconnects.append(Disconnect(time.monotonic(), self.id, reason))
            self.server.changed()


def _no_nagle(handle: Callable) -> Callable:
    """Accepted sockets send small frames at once. Without TCP_NODELAY, a frame written while the
    client has not yet ACKed the previous one (a pong, say) waits for the client's delayed ACK:
    ~40 ms of latency that belongs to the fake, not to the adapter under test."""
    def handle_no_nagle(sock, address):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass
        return handle(sock, address)
    return handle_no_nagle


class FakePlatformServer:
    """Base class of the platform fakes. Start with `start()`, stop with `stop()`."""

    ws_path = "/ws"
    json_frames = True  # record frames as decoded JSON

    def __init__(self) -> None:
        self.frames: list[FrameRecord] = []
        self.disconnects: list[Disconnect] = []
        self.events: list[tuple[float, str, int]] = []
        self.conns: dict[int, Conn] = {}
        self.rest_calls: list[dict[str, Any]] = []
        self.rest_delay_s = 0.0
        self._rest_429: list[float] = []
        self.silent_until = 0.0
        self.media: dict[str, HostedMedia] = {}
        self.media_requests: list[tuple[float, str, dict]] = []  # (at, media id, headers)
        self._next_conn = 1
        self._changed = gevent.event.Event()
        self._server: pywsgi.WSGIServer | None = None
        self.host = "127.0.0.1"
        self.port = 0

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> "FakePlatformServer":
        self._server = pywsgi.WSGIServer((self.host, 0), self._app,
                                         handler_class=WebSocketHandler, log=None, error_log=None)
        self._server.set_handle(_no_nagle(self._server.handle))
        self._server.start()
        self.port = self._server.server_port
        return self

    def stop(self) -> None:
        for conn in list(self.conns.values()):
            conn.close(1001, "server stopping", reason="server_stopping")
        if self._server is not None:
            self._server.stop(timeout=1)
            self._server = None

    @property
    def http_base(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://{self.host}:{self.port}{self.ws_path}"

    # -- for subclasses ---------------------------------------------------------------------
    def routes(self) -> dict[tuple[str, str], Callable[[dict], tuple[int, Any]]]:
        """{(METHOD, path_prefix): handler(request) -> (status, json_body | (body, headers))}.
        request = {"method", "path", "query", "headers", "json", "body"}."""
        return {}

    def on_connect(self, conn: Conn, request: dict) -> bool:
        """A WebSocket opened; return False to refuse it (the socket is closed)."""
        return True

    def on_frame(self, conn: Conn, data: Any) -> None:
        raise NotImplementedError

    def decode(self, raw: str | bytes) -> Any:
        return json.loads(raw) if self.json_frames else raw

    # -- records ----------------------------------------------------------------------------
    def record(self, direction: str, conn: Conn, data: Any) -> None:
        self.frames.append(FrameRecord(time.monotonic(), direction, conn.id, data))
        self.changed()

    def log_event(self, name: str, conn: Conn | None = None) -> None:
        self.events.append((time.monotonic(), name, conn.id if conn else 0))
        self.changed()

    def changed(self) -> None:
        self._changed.set()

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        """Wait until predicate() is truthy (re-checked whenever the fake records anything)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"condition not met within {timeout}s")
            self._changed.clear()
            self._changed.wait(min(remaining, 0.05))

    def live_conns(self) -> list[Conn]:
        return [c for c in self.conns.values() if not c.closed.is_set()]

    def frames_in(self, conn_id: int | None = None) -> list[Any]:
        return [f.data for f in self.frames if f.direction == "in"
                and (conn_id is None or f.conn_id == conn_id)]

    # -- faults -----------------------------------------------------------------------------
    def drop(self) -> None:
        for conn in self.live_conns():
            conn.drop()

    def close_with(self, code: int, message: str = "") -> None:
        for conn in self.live_conns():
            conn.close(code, message, reason=f"fault_close_{code}")

    def go_silent(self, seconds: float, *, whole_server: bool = True) -> None:
        until = time.monotonic() + seconds
        if whole_server:
            self.silent_until = until
            return
        for conn in self.live_conns():
            conn.silent_until = until
        self.log_event("go_silent")

    def send_garbage(self, data: str | bytes) -> None:
        for conn in self.live_conns():
            try:
                conn.ws.send(data, binary=isinstance(data, bytes))
            except Exception:
                pass

    def refuse_connections(self) -> None:
        """An outage: new connections (and REST calls) wait unanswered in the listen backlog
        until `accept_connections()`; live ones are untouched (combine with `drop()`)."""
        if self._server is not None:
            self._server.stop_accepting()

    def accept_connections(self) -> None:
        if self._server is not None:
            self._server.start_accepting()

    def rest_429(self, times: int = 1, retry_after: float = 1.0) -> None:
        self._rest_429.extend([retry_after] * times)

    # -- media -------------------------------------------------------------------------------
    media_path = "/__media__/"

    def host_media(self, data: bytes, content_type: str = "application/octet-stream", *,
                   rate_bps: float | None = None, ttl_s: float | None = None,
                   headers: dict | None = None) -> str:
        """Serve `data` at a new URL of this fake; returns the URL."""
        media_id = uuid.uuid4().hex
        self.media[media_id] = HostedMedia(
            data, content_type, rate_bps,
            time.monotonic() + ttl_s if ttl_s is not None else None, dict(headers or {}))
        return f"{self.http_base}{self.media_path}{media_id}"

    def _serve_media(self, environ, start_response):
        media_id = environ.get("PATH_INFO", "")[len(self.media_path):]
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items()
                   if k.startswith("HTTP_")}
        self.media_requests.append((time.monotonic(), media_id, headers))
        self.changed()
        item = self.media.get(media_id)
        refusal = self.media_refusal(media_id, headers)
        if refusal is not None:
            return self._respond(start_response, *refusal)
        if item is None:
            return self._respond(start_response, 404, {"message": "no such file"})
        if item.expires_at is not None and time.monotonic() > item.expires_at:
            return self._respond(start_response, 403, {"message": "link expired"})
        start_response("200 OK", [("Content-Type", item.content_type),
                                  ("Content-Length", str(len(item.data))),
                                  *item.headers.items()])
        if item.rate_bps is None:
            return [item.data]
        return self._trickle(item.data, item.rate_bps)

    @staticmethod
    def _trickle(data: bytes, rate_bps: float):
        step = max(1024, int(rate_bps / 20))
        for i in range(0, len(data), step):
            yield data[i:i + step]
            gevent.sleep(step / rate_bps)

    def media_refusal(self, media_id: str, headers: dict) -> tuple | None:
        """A platform whose file URLs need authorization refuses here (override)."""
        return None

    # -- WSGI -------------------------------------------------------------------------------
    def _app(self, environ, start_response):
        ws = environ.get("wsgi.websocket")
        path = environ.get("PATH_INFO", "")
        if ws is not None:
            return self._serve_ws(ws, environ)
        if path.startswith(self.media_path) and environ["REQUEST_METHOD"] == "GET":
            return self._serve_media(environ, start_response)
        request = self._request(environ)
        self.rest_calls.append(request)
        self.changed()
        if self.rest_delay_s:
            gevent.sleep(self.rest_delay_s)
        if self._rest_429:
            retry_after = self._rest_429.pop(0)
            return self._respond(start_response, 429, {"code": 429, "message": "too many"},
                                 {"Retry-After": f"{retry_after:g}"})
        for (method, prefix), handler in self.routes().items():
            if request["method"] == method and path.startswith(prefix):
                result = handler(request)
                status, body = result[0], result[1]
                headers = result[2] if len(result) > 2 else {}
                return self._respond(start_response, status, body, headers)
        return self._respond(start_response, 404, {"code": 404, "message": "no such route"})

    def _respond(self, start_response, status: int, body: Any, headers: dict | None = None):
        raw = json.dumps(body).encode() if not isinstance(body, bytes) else body
        reason = {200: "OK", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
                  429: "Too Many Requests", 400: "Bad Request", 500: "Internal Server Error"}
        headers = dict(headers or {})
        ctype = next((headers.pop(k) for k in list(headers) if k.lower() == "content-type"),
                     "application/json")
        start_response(f"{status} {reason.get(status, 'Status')}",
                       [("Content-Type", ctype),
                        ("Content-Length", str(len(raw)))] + list(headers.items()))
        return [raw]

    @staticmethod
    def _request(environ) -> dict:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        try:
            parsed = json.loads(body) if body else None
        except ValueError:
            parsed = None
        headers = {k[5:].replace("_", "-").title(): v for k, v in environ.items()
                   if k.startswith("HTTP_")}
        if environ.get("CONTENT_TYPE"):  # WSGI keeps it out of the HTTP_* keys
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        return {"method": environ["REQUEST_METHOD"], "path": environ.get("PATH_INFO", ""),
                "query": environ.get("QUERY_STRING", ""), "headers": headers,
                "json": parsed, "body": body}

    def _serve_ws(self, ws: WebSocket, environ) -> list:
        conn = Conn(self, ws, self._next_conn)
        self._next_conn += 1
        self.conns[conn.id] = conn
        self.log_event("connect", conn)
        request = self._request(environ)
        if not self.on_connect(conn, request):
            conn.close(None, reason="refused")
            return []
        try:
            while not conn.closed.is_set():
                try:
                    raw = ws.receive()
                except Exception:
                    raw = None
                if raw is None:
                    break
                if conn.silent:
                    continue  # a zombie server reads and ignores
                try:
                    data = self.decode(raw)
                except Exception:
                    self.log_event("client_sent_garbage", conn)
                    continue
                self.record("in", conn, data)
                self.on_frame(conn, data)
        finally:
            conn._mark_closed(conn.close_reason or "client_closed")
        return []
