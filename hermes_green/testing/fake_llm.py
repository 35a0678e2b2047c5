"""A fake OpenAI-compatible LLM server (gevent.pywsgi on 127.0.0.1, port 0) with scripted answers.

Used by the agent tests, the demo and the benchmarks.

    fake = FakeLLM(api_key="k", chunk_delay_s=0.005).start()
    fake.script(
        http_error(429, retry_after=0.05),             # then
        tool_call("count_primes", limit=1000),          # a streamed tool call, then
        tool_calls(("hash_text", {"text": "a"}), ("blocking_sleep", {"seconds": 0.1})),
        text("The answer is 42.", chunk_chars=4),       # streamed text
        http_error(500), malformed(), hang(),           # failures
        stream_error("overloaded"),                     # an error event inside the stream
        lambda body: text(f"{len(body['messages'])} messages"),  # computed from the request
    )
    ... LLMClient(base_url=fake.base_url, ...) ...
    fake.requests[-1].body["messages"]; fake.chat_requests; fake.disconnected.wait(5)
    fake.stop()

Each chat request takes the next scripted response; when the script is empty the default mode
answers ("auto"): if the last user message mentions primes/compute, hashing or sleeping and the
request offers those tools, it calls them one round at a time (count_primes, hash_text,
blocking_sleep) and then streams a summary of the tool results; otherwise it streams a long
answer in small chunks with `chunk_delay_s` between them.

Client disconnects mid-stream are noticed at once (the handler watches its socket between
chunks) and recorded in `disconnects` (request numbers) and the `disconnected` event.
With `api_key`, every request must carry `Authorization: Bearer <key>` (401 otherwise).
`GET /v1/models` lists the model. `stream: false` requests get a whole chat.completion.

Content parts (vision): a user message's `content` may be a list of `{"type": "text", "text"}`
and `{"type": "image_url", "image_url": {"url": "data:<mime>;base64,..." | "https://..."}}`
parts, as the OpenAI API takes them; anything else in such a list is a 400, as a data: URL that
is not valid base64 is. `fake.images(request)` decodes a request's images; the auto mode reads
the text parts (and says how many images it saw).

Transcription: `POST /v1/audio/transcriptions` takes multipart/form-data with `file` and
`model` (OpenAI's audio API) and answers `{"text"}`: `fake.transcripts` maps audio bytes to
text; unknown audio that starts with b"SPEECH:" is transcribed as the rest of its bytes, other
audio as "(inaudible)". Recorded in `fake.transcriptions` (model, filename, bytes).
"""
from __future__ import annotations

import base64
import binascii
import json
import logging
import re
import socket
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Union

import gevent
import gevent.event
import gevent.select
from gevent.pywsgi import LoggingLogAdapter, WSGIHandler, WSGIServer

log = logging.getLogger("hermes_green.testing.fake_llm")

# -- scripted responses ---------------------------------------------------------------------------


@dataclass
class Text:
    """Stream `content` in pieces of `chunk_chars`, `delay_s` apart (None: the server's)."""
    content: str
    chunk_chars: int = 8
    delay_s: float | None = None
    hang_after_chunks: int | None = None  # stop sending (keep the connection open) after N
    drop_after_chunks: int | None = None  # close the connection abruptly after N
    finish_reason: str | None = "stop"
    send_done: bool = True


@dataclass
class ToolCalls:
    """Stream tool calls: [(name, arguments dict or raw JSON text)], arguments in fragments."""
    calls: list[tuple[str, Any]]
    content: str = ""
    delay_s: float | None = None
    arg_chunk_chars: int = 7


@dataclass
class HTTPError:
    status: int
    retry_after: float | str | None = None
    message: str = "scripted error"


@dataclass
class Malformed:
    """`good_chunks` good text chunks, then an event that is not JSON."""
    good_chunks: int = 0
    garbage: str = "{this is not json"


@dataclass
class Hang:
    """Never answer. `after_headers`: send the 200 headers and a comment first."""
    after_headers: bool = False


Response = Union[Text, ToolCalls, HTTPError, Malformed, Hang, Callable[[dict], Any]]


def text(content: str, **kw) -> Text:
    return Text(content, **kw)


def tool_call(name: str, **arguments) -> ToolCalls:
    return ToolCalls([(name, arguments)])


def tool_calls(*calls: tuple[str, Any], content: str = "") -> ToolCalls:
    return ToolCalls(list(calls), content=content)


def http_error(status: int, retry_after: float | str | None = None,
               message: str = "scripted error") -> HTTPError:
    return HTTPError(status, retry_after, message)


def malformed(good_chunks: int = 0) -> Malformed:
    return Malformed(good_chunks)


def hang(after_headers: bool = False) -> Hang:
    return Hang(after_headers)


def stream_error(message: str, good_chunks: int = 0) -> Malformed:
    """An `{"error": ...}` event inside the stream (OpenRouter reports failures this way)."""
    return Malformed(good_chunks, json.dumps({"error": {"message": message, "code": 502}}))


@dataclass
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: Any = None
    number: int = 0
    remote_port: int = 0  # the same port on two requests: the client reused its connection


LONG_ANSWER = (
    "Here is a long answer, streamed in small pieces so that progress updates, throttling and "
    "interruptions can be watched. " * 6).strip()

_TRIGGERS = [
    (re.compile(r"prime|compute", re.I), "count_primes"),
    (re.compile(r"hash", re.I), "hash_text"),
    (re.compile(r"sleep|block", re.I), "blocking_sleep"),
]


class _Handler(WSGIHandler):
    def get_environ(self):
        env = super().get_environ()
        env["fake_llm.socket"] = self.socket  # to notice a client leaving, and to drop it
        return env


class FakeLLM:
    def __init__(self, *, api_key: str | None = None, model: str = "fake-model",
                 chunk_delay_s: float = 0.01, host: str = "127.0.0.1", port: int = 0) -> None:
        self.api_key = api_key
        self.model = model
        self.chunk_delay_s = chunk_delay_s
        self._host, self._port = host, port
        self._queue: deque[Response] = deque()
        self.requests: list[RecordedRequest] = []
        self.disconnects: list[int] = []  # numbers of chat requests whose client left mid-answer
        self.disconnected = gevent.event.Event()
        self.streaming = gevent.event.Event()  # set when any answer chunk has been sent
        self._stopping = gevent.event.Event()
        self._arrived = gevent.event.Event()
        self._server: WSGIServer | None = None
        self._count = 0
        self.transcripts: dict[bytes, str] = {}
        self.transcriptions: list[tuple[str, str, bytes]] = []  # (model, filename, audio)

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "FakeLLM":
        self._server = WSGIServer((self._host, self._port), self._app, handler_class=_Handler,
                                  log=None, error_log=LoggingLogAdapter(log, logging.DEBUG))
        self._server.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.stop(timeout=1)
            self._server = None

    def __enter__(self) -> "FakeLLM":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self._server.server_port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # -- scripting and records -------------------------------------------------------------------
    def script(self, *responses: Response) -> "FakeLLM":
        """Queue responses; each chat request takes the next one, then default mode answers."""
        self._queue.extend(responses)
        return self

    @property
    def pending(self) -> int:
        return len(self._queue)

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path.endswith("/chat/completions")]

    @staticmethod
    def images(request: "RecordedRequest") -> list[tuple[str, bytes]]:
        """(mime, bytes) of every data: URL image in a chat request's messages."""
        found = []
        for m in request.body.get("messages", []):
            for part in m.get("content") if isinstance(m.get("content"), list) else ():
                url = (part.get("image_url") or {}).get("url", "") \
                    if part.get("type") == "image_url" else ""
                if url.startswith("data:"):
                    head, _, data = url.partition(",")
                    found.append((head[5:].split(";")[0], base64.b64decode(data)))
        return found

    @staticmethod
    def user_text(request: "RecordedRequest") -> str:
        """The text of the last user message (its text parts joined)."""
        users = [m for m in request.body.get("messages", []) if m.get("role") == "user"]
        return _text_of(users[-1].get("content")) if users else ""

    def wait_for_chat_requests(self, n: int, timeout: float = 5.0) -> bool:
        """Block (cooperatively) until n chat requests arrived."""
        deadline = time.monotonic() + timeout
        while len(self.chat_requests) < n:
            self._arrived.clear()
            if not self._arrived.wait(max(0.0, deadline - time.monotonic())):
                return False
        return True

    # -- WSGI ------------------------------------------------------------------------------------
    def _app(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        raw = environ["wsgi.input"].read() if method == "POST" else b""
        try:
            body = json.loads(raw) if raw and not path.endswith("/audio/transcriptions") \
                else None
        except ValueError:
            body = None
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items()
                   if k.startswith("HTTP_")}
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = environ["CONTENT_TYPE"]
        self._count += 1
        self.requests.append(RecordedRequest(method, path, headers, body, self._count,
                                             int(environ.get("REMOTE_PORT") or 0)))
        self._arrived.set()
        if self.api_key is not None and headers.get("authorization") != f"Bearer {self.api_key}":
            return _json(start_response, 401, {"error": {
                "message": "Incorrect API key provided", "type": "invalid_request_error",
                "code": "invalid_api_key"}})
        if method == "GET" and path.rstrip("/").endswith("/models"):
            return _json(start_response, 200, {"object": "list", "data": [
                {"id": self.model, "object": "model", "created": 0, "owned_by": "fake"}]})
        if method == "POST" and path.endswith("/chat/completions"):
            if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
                return _json(start_response, 400, {"error": {"message": "messages required"}})
            problem = _content_problem(body["messages"])
            if problem:
                return _json(start_response, 400, {"error": {"message": problem}})
            return self._chat(environ, start_response, body, self._count)
        if method == "POST" and path.endswith("/audio/transcriptions"):
            return self._transcribe(start_response, headers, raw)
        return _json(start_response, 404, {"error": {"message": f"no route {method} {path}"}})

    def _transcribe(self, start_response, headers: dict, raw: bytes):
        from .harness import parse_multipart
        try:
            fields, files = parse_multipart({"headers": {"Content-Type": headers.get(
                "content-type", "")}, "body": raw})
        except ValueError as e:
            return _json(start_response, 400, {"error": {"message": str(e)}})
        audio = files.get("file")
        if audio is None or not fields.get("model") or not audio.data:
            return _json(start_response, 400, {"error": {"message": "file and model required"}})
        self.transcriptions.append((fields["model"], audio.filename or "", audio.data))
        text = self.transcripts.get(audio.data)
        if text is None:
            text = (audio.data[7:].decode("utf-8", "replace") if audio.data.startswith(b"SPEECH:")
                    else "(inaudible)")
        return _json(start_response, 200, {"text": text})

    def _chat(self, environ, start_response, body: dict, number: int):
        response = self._queue.popleft() if self._queue else self._auto(body)
        while callable(response) and not isinstance(response, (Text, ToolCalls, HTTPError,
                                                               Malformed, Hang)):
            response = response(body)
        sock = environ["fake_llm.socket"]
        if isinstance(response, HTTPError):
            headers = []
            if response.retry_after is not None:
                headers.append(("Retry-After", str(response.retry_after)))
            return _json(start_response, response.status,
                         {"error": {"message": response.message, "type": "server_error"}},
                         headers)
        if isinstance(response, Hang) and not response.after_headers:
            if self._wait_gone(sock, None):  # until the client leaves or the server stops
                self._record_gone(number)
            return _json(start_response, 503, {"error": {"message": "hung"}})
        if not body.get("stream"):
            return self._whole(start_response, response)
        start_response("200 OK", [("Content-Type", "text/event-stream"),
                                  ("Cache-Control", "no-cache")])
        return self._guarded(number, sock, self._events(response, sock))

    def _guarded(self, number, sock, events):
        """Send events; record the client leaving before the end."""
        gone = False
        try:
            for item in events:
                if item is _GONE:
                    gone = True
                    return
                yield item
                self.streaming.set()
        except GeneratorExit:  # pywsgi's write failed: the client left
            gone = True
            raise
        finally:
            if gone:
                self._record_gone(number)

    def _record_gone(self, number: int) -> None:
        if not self._stopping.is_set():
            self.disconnects.append(number)
            self.disconnected.set()

    def _events(self, r, sock):
        cid = f"chatcmpl-{self._count}"
        if isinstance(r, Hang):
            yield b": waiting\n\n"
            yield _GONE if self._wait_gone(sock, None) else b""
            return
        if isinstance(r, Malformed):
            yield self._sse(cid, {"role": "assistant", "content": ""})
            for i in range(r.good_chunks):
                yield self._sse(cid, {"content": f"piece{i} "})
            yield f"data: {r.garbage}\n\n".encode()
            return
        if isinstance(r, ToolCalls):
            yield self._sse(cid, {"role": "assistant", "content": r.content or None})
            delay = self.chunk_delay_s if r.delay_s is None else r.delay_s
            for i, (name, args) in enumerate(r.calls):
                args_text = args if isinstance(args, str) else json.dumps(args)
                yield self._sse(cid, {"tool_calls": [{"index": i, "id": f"call_{self._count}_{i}",
                                                      "type": "function",
                                                      "function": {"name": name, "arguments": ""}}]})
                for k in range(0, len(args_text), r.arg_chunk_chars):
                    if self._wait_gone(sock, delay):
                        yield _GONE
                        return
                    frag = args_text[k:k + r.arg_chunk_chars]
                    yield self._sse(cid, {"tool_calls": [{"index": i,
                                                          "function": {"arguments": frag}}]})
            yield self._sse(cid, {}, "tool_calls")
            yield b"data: [DONE]\n\n"
            return
        # Text
        delay = self.chunk_delay_s if r.delay_s is None else r.delay_s
        yield self._sse(cid, {"role": "assistant", "content": ""})
        pieces = [r.content[i:i + r.chunk_chars] for i in range(0, len(r.content), r.chunk_chars)]
        for n, piece in enumerate(pieces):
            if r.hang_after_chunks is not None and n >= r.hang_after_chunks:
                yield _GONE if self._wait_gone(sock, None) else b""
                return
            if r.drop_after_chunks is not None and n >= r.drop_after_chunks:
                _drop(sock)
                return
            if n and self._wait_gone(sock, delay):
                yield _GONE
                return
            yield self._sse(cid, {"content": piece})
        if r.finish_reason:
            yield self._sse(cid, {}, r.finish_reason)
        if r.send_done:
            yield b"data: [DONE]\n\n"

    def _sse(self, cid: str, delta: dict, finish: str | None = None) -> bytes:
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                 "model": self.model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    def _wait_gone(self, sock, timeout: float | None) -> bool:
        """Wait up to `timeout` (None: until stop); True as soon as the client has left."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._stopping.is_set():
            left = 0.05 if deadline is None else min(0.05, deadline - time.monotonic())
            if left <= 0:
                return False
            readable, _, _ = gevent.select.select([sock], [], [], left)
            if readable:
                try:
                    if sock.recv(1, socket.MSG_PEEK) == b"":
                        return True
                except OSError:
                    return True
                gevent.sleep(left)  # pipelined bytes, not a close: keep waiting
        return False

    def _whole(self, start_response, r):
        if isinstance(r, (Malformed, Hang)):
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b"{not json"]
        message: dict[str, Any] = {"role": "assistant", "content": getattr(r, "content", "") or None}
        finish = "stop"
        if isinstance(r, ToolCalls):
            finish = "tool_calls"
            message["tool_calls"] = [
                {"id": f"call_{self._count}_{i}", "type": "function",
                 "function": {"name": name, "arguments": a if isinstance(a, str) else json.dumps(a)}}
                for i, (name, a) in enumerate(r.calls)]
        return _json(start_response, 200, {
            "id": f"chatcmpl-{self._count}", "object": "chat.completion", "created": int(time.time()),
            "model": self.model,
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

    # -- default mode ----------------------------------------------------------------------------
    def _auto(self, body: dict) -> Response:
        messages = body["messages"]
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
        user_text = _text_of(messages[last_user].get("content")) if last_user >= 0 else ""
        offered = {t.get("function", {}).get("name") for t in body.get("tools") or []}
        if body.get("tool_choice") == "none":
            offered = set()
        wanted = [name for pattern, name in _TRIGGERS if pattern.search(user_text)]
        since = messages[last_user + 1:]
        rounds = sum(1 for m in since if m.get("role") == "assistant" and m.get("tool_calls"))
        if rounds < len(wanted) and wanted[rounds] in offered:
            name = wanted[rounds]
            return ToolCalls([(name, _auto_arguments(name, user_text))])
        results = [str(m.get("content")) for m in since if m.get("role") == "tool"]
        if results:
            return Text("Tool results: " + "; ".join(results) + ".")
        content = messages[last_user].get("content") if last_user >= 0 else None
        images = sum(1 for p in content if p.get("type") == "image_url") \
            if isinstance(content, list) else 0
        seen = f" I see {images} image{'s' if images != 1 else ''}." if images else ""
        return Text(f"You said: {user_text[:200]}.{seen} {LONG_ANSWER}")


def _auto_arguments(name: str, user_text: str) -> dict:
    if name == "count_primes":
        m = re.search(r"\d[\d_,]*", user_text)
        return {"limit": int(re.sub(r"[_,]", "", m.group(0))) if m else 100_000}
    if name == "hash_text":
        m = re.search(r"['\"]([^'\"]+)['\"]", user_text)
        return {"text": m.group(1) if m else user_text[:100], "iterations": 100_000}
    return {"seconds": 0.2}


_GONE = object()  # marker from _events: the client left while we waited


def _text_of(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content
                        if isinstance(p, dict) and p.get("type") == "text")
    return str(content or "")


def _content_problem(messages: list) -> str | None:
    """What the OpenAI API would refuse in content-part lists (None: fine)."""
    for i, m in enumerate(messages):
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    return f"{where}.text must be a string"
            elif kind == "image_url":
                url = (part.get("image_url") or {}).get("url") \
                    if isinstance(part.get("image_url"), dict) else None
                if not isinstance(url, str):
                    return f"{where}.image_url.url is required"
                if url.startswith("data:"):
                    head, sep, data = url.partition(",")
                    if not sep or not head.endswith(";base64") or not head[5:].startswith("image/"):
                        return f"{where}: invalid image data URL"
                    try:
                        base64.b64decode(data, validate=True)
                    except (binascii.Error, ValueError):
                        return f"{where}: the image data is not valid base64"
                elif not url.startswith(("https://", "http://")):
                    return f"{where}: invalid image URL"
            else:
                return f"{where}: unknown content part type {kind!r}"
    return None


def _drop(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _json(start_response, status: int, payload: dict, headers: list | None = None):
    data = json.dumps(payload).encode()
    reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
              429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway",
              503: "Service Unavailable"}.get(status, "Error")
    start_response(f"{status} {reason}", [("Content-Type", "application/json"),
                                          ("Content-Length", str(len(data))), *(headers or [])])
    return [data]
