"""A strict fake of hermes-agent's API server `/v1/chat/completions` (gevent.pywsgi, loopback).

Modelled on NousResearch/hermes-agent, gateway/platforms/api_server_openai_routes.py
(`OpenAICompatRoutesMixin._handle_chat_completions`, `_write_sse_chat_completion`), with auth
and error bodies from gateway/platforms/api_server.py (`_check_auth`, `_openai_error`) and the
session-id guard from gateway/session.py (`_is_path_unsafe`). What it enforces, in that order:

- `Authorization: Bearer <API_SERVER_KEY>` when a key is configured, else 401
  `{"error": {"message": "Invalid API key", "type": "invalid_request_error",
  "code": "invalid_api_key"}}`. Without a key every request is let in.
- The body must be JSON (400 "Invalid JSON in request body") with a `messages` list (400
  "Missing or invalid 'messages' field"). `system` messages become the ephemeral system prompt;
  `user`/`assistant` messages are the conversation, whose last one is the new user message (400
  "No user message found in messages" when it has no text).
- `X-Hermes-Session-Id` continues a session: 403 "Session continuation requires API key
  authentication..." when the server has no key; 400 "Invalid session ID" for control
  characters or a path-unsafe id (`..`, `/`, `\\`, a leading drive letter `C:`); 400 "Session
  ID too long" over 256 characters. The history is then the session's stored transcript (the
  body's history is ignored); an unknown id starts an empty one. Without the header the id is
  derived: `"api-" + sha256(f"{system_prompt}\\n{first_user}")[:16]`.
- `stream: true`: `text/event-stream` with `X-Hermes-Session-Id` echoed; a role chunk, one
  `chat.completion.chunk` per delta, `event: hermes.tool.progress` events for tools (running,
  completed), a finish chunk carrying `usage` (on failure `finish_reason: "error"` plus `error`
  and `hermes` blocks), then `data: [DONE]`. A client that leaves mid-stream interrupts the
  agent (recorded in `interrupted`). Without `stream` one `chat.completion` JSON object.
- `GET /health` and `GET /v1/models` (model `hermes-agent`); any other path: plain-text 404.

The agent itself is scripted. By default it answers from the session's transcript, so a test
can see that the service, not the gateway, keeps the history:
    "(turn 2 of api-...) you said: <text>; before that: <previous user text>"
Scripted behaviours: `answer(text, tools=[...])`, `agent_error(message, partial=...)`,
`http_error(status)`, `malformed()`, `slow()` (headers and the role chunk, then nothing), and
`drop(after_chunks)`. Completed turns are appended to `sessions[session_id]`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Union

import gevent
import gevent.event

from hermes_green.testing.fake_llm import (_GONE, FakeLLM, RecordedRequest, _drop, _Handler,
                                           _json)

log = logging.getLogger("hermes_green.testing.fake_agent_service")

MAX_SESSION_HEADER_LEN = 256  # APIServerAdapter._MAX_SESSION_HEADER_LEN


@dataclass
class Answer:
    text: str
    chunk_chars: int = 8
    delay_s: float | None = None
    tools: list[str] = field(default_factory=list)  # tool names reported before the text


@dataclass
class AgentError:
    """The agent failed after streaming `partial`: the finish chunk says so."""
    message: str
    partial: str = ""


@dataclass
class HTTPError:
    status: int
    message: str = "Agent run did not produce a response."


@dataclass
class Malformed:
    good_chunks: int = 0


@dataclass
class Slow:
    """Headers and the role chunk, then nothing until the client leaves."""


@dataclass
class Drop:
    after_chunks: int = 1
    text: str = "this answer is cut off somewhere in the middle"


Behaviour = Union[Answer, AgentError, HTTPError, Malformed, Slow, Drop]


def answer(text: str, **kw) -> Answer:
    return Answer(text, **kw)


def agent_error(message: str, partial: str = "") -> AgentError:
    return AgentError(message, partial)


def http_error(status: int, message: str = "Agent run did not produce a response.") -> HTTPError:
    return HTTPError(status, message)


def malformed(good_chunks: int = 0) -> Malformed:
    return Malformed(good_chunks)


def slow() -> Slow:
    return Slow()


def drop(after_chunks: int = 1) -> Drop:
    return Drop(after_chunks)


def is_path_unsafe(value: str) -> bool:
    """gateway/session.py `_is_path_unsafe` (strict form): session ids become file names."""
    if not value:
        return False
    if ".." in value or "/" in value or "\\" in value:
        return True
    return len(value) >= 2 and value[0].isalpha() and value[1] == ":"


def derive_session_id(system_prompt: str | None, first_user: str) -> str:
    """api_server.py `_derive_chat_session_id`: the id of a header-less conversation."""
    seed = f"{system_prompt or ''}\n{first_user}"
    return "api-" + hashlib.sha256(seed.encode("utf-8")).hexdigest()[:16]


def _error(start_response, status: int, message: str, **extra):
    return _json(start_response, status, {"error": {"message": message,
                                                    "type": "invalid_request_error", **extra}})


class FakeAgentService:
    def __init__(self, *, api_key: str | None = None, model_name: str = "hermes-agent",
                 chunk_delay_s: float = 0.002, host: str = "127.0.0.1", port: int = 0) -> None:
        self.api_key = api_key
        self.model_name = model_name
        self.chunk_delay_s = chunk_delay_s
        self._host, self._port = host, port
        self._queue: deque[Behaviour] = deque()
        self.requests: list[RecordedRequest] = []
        self.sessions: dict[str, list[dict]] = {}  # state.db: completed turns per session id
        self.interrupted: list[str] = []  # session ids whose client left mid-answer
        self.disconnected = gevent.event.Event()
        self.streaming = gevent.event.Event()  # set once any answer chunk was sent
        self._stopping = gevent.event.Event()
        self._server = None
        self._count = 0

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self) -> "FakeAgentService":
        from gevent.pywsgi import LoggingLogAdapter, WSGIServer
        self._server = WSGIServer((self._host, self._port), self._app, handler_class=_Handler,
                                  log=None, error_log=LoggingLogAdapter(log, logging.DEBUG))
        self._server.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._server is not None:
            self._server.stop(timeout=1)
            self._server = None

    @property
    def port(self) -> int:
        return self._server.server_port

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _wait_gone(self, sock, timeout: float | None) -> bool:
        """FakeLLM's watch for a client that left (it reads only `_stopping`)."""
        return FakeLLM._wait_gone(self, sock, timeout)

    def script(self, *behaviours: Behaviour) -> "FakeAgentService":
        self._queue.extend(behaviours)
        return self

    @property
    def chat_requests(self) -> list[RecordedRequest]:
        return [r for r in self.requests if r.path == "/v1/chat/completions"]

    # -- WSGI ------------------------------------------------------------------------------------
    def _app(self, environ, start_response):
        method, path = environ["REQUEST_METHOD"], environ.get("PATH_INFO", "")
        raw = environ["wsgi.input"].read() if method == "POST" else b""
        headers = {k[5:].replace("_", "-").lower(): v for k, v in environ.items()
                   if k.startswith("HTTP_")}
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = ValueError
        self._count += 1
        self.requests.append(RecordedRequest(method, path, headers,
                                             None if body is ValueError else body, self._count))
        if method == "GET" and path == "/health":
            return _json(start_response, 200, {"status": "ok", "platform": "hermes-agent"})
        if not (method == "GET" and path == "/v1/models"
                or method == "POST" and path == "/v1/chat/completions"):
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"404: Not Found"]
        if self.api_key and headers.get("authorization", "") != f"Bearer {self.api_key}":
            return _error(start_response, 401, "Invalid API key", code="invalid_api_key")
        if path == "/v1/models":
            return _json(start_response, 200, {"object": "list", "data": [
                {"id": self.model_name, "object": "model", "created": int(time.time()),
                 "owned_by": "hermes", "permission": [], "root": self.model_name,
                 "parent": None}]})
        return self._chat(environ, start_response, headers, body)

    def _chat(self, environ, start_response, headers: dict, body: Any):
        if body is ValueError or not isinstance(body, dict):
            return _error(start_response, 400, "Invalid JSON in request body", param=None,
                          code=None)
        messages = body.get("messages")
        if not messages or not isinstance(messages, list):
            return _error(start_response, 400, "Missing or invalid 'messages' field")
        system_prompt, conversation = None, []
        for msg in messages:
            role, content = msg.get("role", ""), msg.get("content", "")
            if role == "system":
                system_prompt = content if system_prompt is None else f"{system_prompt}\n{content}"
            elif role in ("user", "assistant"):
                conversation.append({"role": role, "content": content})
        user_message = conversation[-1]["content"] if conversation else ""
        history = conversation[:-1]
        if not (isinstance(user_message, str) and user_message.strip()):
            return _error(start_response, 400, "No user message found in messages")
        provided = headers.get("x-hermes-session-id", "").strip()
        if provided:
            if not self.api_key:
                return _error(start_response, 403, "Session continuation requires API key "
                              "authentication. Configure API_SERVER_KEY to enable this feature.",
                              param=None, code=None)
            if re.search(r"[\r\n\x00]", provided) or is_path_unsafe(provided):
                return _error(start_response, 400, "Invalid session ID")
            if len(provided) > MAX_SESSION_HEADER_LEN:
                return _error(start_response, 400, "Session ID too long")
            session_id = provided
            history = list(self.sessions.get(session_id, []))  # the body's history is ignored
        else:
            first_user = next((m["content"] for m in conversation if m["role"] == "user"), "")
            session_id = derive_session_id(system_prompt, first_user)
        behaviour = self._queue.popleft() if self._queue else self._auto(session_id, history,
                                                                            user_message)
        if isinstance(behaviour, HTTPError):
            return _json(start_response, behaviour.status, {"error": {
                "message": behaviour.message, "type": "server_error", "param": None,
                "code": "agent_incomplete"}}, [("X-Hermes-Session-Id", session_id)])
        turn = (session_id, user_message)
        if not body.get("stream"):
            return self._whole(start_response, behaviour, turn)
        start_response("200 OK", [("Content-Type", "text/event-stream"),
                                  ("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no"),
                                  ("X-Hermes-Session-Id", session_id)])
        return self._guarded(turn, environ["fake_llm.socket"], behaviour)

    def _auto(self, session_id: str, history: list[dict], text: str) -> Answer:
        earlier = [m["content"] for m in history if m["role"] == "user"]
        said = f"(turn {len(earlier) + 1} of {session_id}) you said: {text}"
        return Answer(said + (f"; before that: {earlier[-1]}" if earlier else ""))

    def _complete(self, turn: tuple[str, str], text: str) -> None:
        session_id, user_message = turn
        self.sessions.setdefault(session_id, []).extend(
            [{"role": "user", "content": user_message}, {"role": "assistant", "content": text}])

    # -- responses -------------------------------------------------------------------------------
    def _guarded(self, turn, sock, behaviour):
        gone = False
        try:
            for item in self._events(turn, sock, behaviour):
                if item is _GONE:
                    gone = True
                    return
                yield item
                self.streaming.set()
        except GeneratorExit:  # pywsgi's write failed: the client left
            gone = True
            raise
        finally:
            if gone and not self._stopping.is_set():
                self.interrupted.append(turn[0])  # _abandon_agent_task: the agent is stopped
                self.disconnected.set()

    def _events(self, turn, sock, b: Behaviour):
        cid = f"chatcmpl-{uuid.uuid4().hex[:29]}"
        yield _frame(self._chunk(cid, {"role": "assistant"}))
        if isinstance(b, Slow):
            yield _GONE if self._wait_gone(sock, None) else b""
            return
        if isinstance(b, Malformed):
            for i in range(b.good_chunks):
                yield _frame(self._chunk(cid, {"content": f"piece{i} "}))
            yield b"data: {this is not json\n\n"
            return
        if isinstance(b, Drop):
            for i in range(b.after_chunks):
                yield _frame(self._chunk(cid, {"content": b.text[i * 8:(i + 1) * 8]}))
            if self._wait_gone(sock, self.chunk_delay_s):
                yield _GONE
                return
            _drop(sock)
            return
        if isinstance(b, AgentError):
            if b.partial:
                yield _frame(self._chunk(cid, {"content": b.partial}))
            finish = self._chunk(cid, {}, "error", usage=_usage())
            finish["error"] = {"message": b.message, "type": "agent_error"}
            finish["hermes"] = {"completed": False, "partial": bool(b.partial), "failed": True,
                                "error": b.message, "error_code": "agent_error"}
            yield _frame(finish)
            yield b"data: [DONE]\n\n"
            return
        for i, name in enumerate(b.tools):
            call = f"call_{name}_{i}"
            yield _frame({"tool": name, "emoji": "*", "label": name, "toolCallId": call,
                          "status": "running"}, event="hermes.tool.progress")
            yield _frame({"tool": name, "toolCallId": call, "status": "completed"},
                         event="hermes.tool.progress")
        delay = self.chunk_delay_s if b.delay_s is None else b.delay_s
        for n in range(0, len(b.text), b.chunk_chars):
            if n and self._wait_gone(sock, delay):
                yield _GONE
                return
            yield _frame(self._chunk(cid, {"content": b.text[n:n + b.chunk_chars]}))
        self._complete(turn, b.text)
        yield _frame(self._chunk(cid, {}, "stop", usage=_usage()))
        yield b"data: [DONE]\n\n"

    def _whole(self, start_response, b: Behaviour, turn):
        if not isinstance(b, Answer):
            return _json(start_response, 502, {"error": {
                "message": "Agent run did not produce a response.", "type": "server_error",
                "param": None, "code": "agent_incomplete"}}, [("X-Hermes-Session-Id", turn[0])])
        self._complete(turn, b.text)
        return _json(start_response, 200, {
            "id": f"chatcmpl-{uuid.uuid4().hex[:29]}", "object": "chat.completion",
            "created": int(time.time()), "model": self.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": b.text},
                         "finish_reason": "stop"}], "usage": _usage()},
            [("X-Hermes-Session-Id", turn[0])])

    def _chunk(self, cid: str, delta: dict, finish: str | None = None, **extra) -> dict:
        return {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                "model": self.model_name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def _usage() -> dict:
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}


def _frame(data: dict, event: str | None = None) -> bytes:
    """api_server.py `_sse_frame`: an optional `event:` line, then `data: <json>`."""
    prefix = f"event: {event}\n" if event else ""
    return f"{prefix}data: {json.dumps(data)}\n\n".encode()
