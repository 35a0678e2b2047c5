"""An OpenAI-compatible `/chat/completions` client: streaming, timeouts, retries.

Works with any server that speaks the OpenAI chat API (OpenAI, vLLM, Ollama, OpenRouter,
llama.cpp): `base_url`, `api_key` and `model` come from config, plus optional extra headers.

- One REST session per client (hermes_green/rest.py), so turns reuse connections; its sockets
  are gevent's, so a turn waiting for tokens never holds the hub.
- `stream: true`: server-sent events are parsed as they arrive; text deltas go to `on_text`
  with the full text so far; tool-call deltas (`index`, `id`, `function.name`, and
  `function.arguments` fragments) are assembled into whole calls.
- Timeouts: `connect_timeout_s` to connect, `read_timeout_s` between two reads, and `timeout_s`
  for the whole call, retries and backoff included (a `gevent.Timeout`), so no turn hangs.
- Retries with exponential backoff (full jitter) on connection errors, read timeouts, 429
  (honouring `Retry-After`, capped) and 5xx, but only before any token arrived: once text has
  reached the user a retry would repeat it.
- The response is closed in a `finally`, so a turn killed mid-stream (GreenletExit) drops the
  connection and the server sees the client go away.

Error messages never contain the api key or headers; they name the host, status and reason.
"""
from __future__ import annotations

import json
import logging
import random
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable
from urllib.parse import urlsplit

import gevent

from .. import rest

log = logging.getLogger("hermes_green.agent.llm")

RETRY_AFTER_CAP_S = 30.0
# Connections to the model server at once: one per running turn's stream. Past it a call waits
# for a free connection (inside its agent.timeout_s); connections open only as turns need them.
LLM_POOL_SIZE = 256
_DRAIN_MAX_BYTES = 65536
_DRAIN_TIMEOUT_S = 1.0


class LLMError(Exception):
    """The model gave no usable answer. The message is one line for logs (no secrets);
    `reason` is a short phrase fit for the user's error reply."""
    reason = "the model server failed"


class LLMConnectionError(LLMError):
    reason = "the model server cannot be reached"


class LLMTimeout(LLMError):
    reason = "the model server did not answer in time"


class LLMHTTPError(LLMError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = f"the model server answered HTTP {status}"


class LLMStreamError(LLMError):
    """The stream was malformed or cut short."""
    reason = "the model server sent a broken answer"


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text as the model wrote it; validated by the tool layer

    def to_message(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class Completion:
    text: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict | None = None
    attempts: int = 1


class _Retryable(Exception):
    def __init__(self, error: LLMError, retry_after: float | None = None) -> None:
        self.error = error
        self.retry_after = retry_after


# -- server-sent events -------------------------------------------------------------------------

class SSEParser:
    """Incremental server-sent-events parser: feed bytes, get each event's `data` text.

    Handles events split anywhere across reads, `\\r\\n` line ends, comment lines (`: ping`,
    OpenRouter's `: OPENROUTER PROCESSING`), `event:`/`id:` fields, and multi-line data.
    """

    def __init__(self) -> None:
        self._buf = b""
        self._data: list[str] = []

    def feed(self, chunk: bytes) -> list[str]:
        self._buf += chunk
        events = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line, self._buf = self._buf[:nl], self._buf[nl + 1:]
            event = self._line(line.rstrip(b"\r").decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
        return events

    def close(self) -> list[str]:
        """Flush at EOF: a last event without its blank line still counts."""
        events = self.feed(b"\n") if self._buf else []
        if self._data:
            events.append("\n".join(self._data))
            self._data = []
        return events

    def _line(self, line: str) -> str | None:
        if not line:
            if self._data:
                data, self._data = "\n".join(self._data), []
                return data
            return None
        if line.startswith(":"):
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None  # event:, id:, retry: carry nothing we use


# -- the client ---------------------------------------------------------------------------------

class LLMClient:
    """Chat completions against one OpenAI-compatible endpoint. Safe to share between turns."""

    def __init__(self, *, base_url: str, model: str, api_key: str | None = None,
                 timeout_s: float = 120.0, connect_timeout_s: float = 10.0,
                 read_timeout_s: float | None = None, max_retries: int = 3,
                 extra_headers: dict[str, str] | None = None, backoff_base_s: float = 0.5,
                 backoff_max_s: float = 8.0, retry_after_cap_s: float = RETRY_AFTER_CAP_S,
                 pool_size: int = LLM_POOL_SIZE,
                 sleep: Callable[[float], None] = gevent.sleep) -> None:
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.host = urlsplit(self.base_url).netloc or self.base_url
        self.model = model
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s if read_timeout_s is not None else timeout_s
        self.max_retries = max_retries
        self.backoff_base_s = backoff_base_s
        self.backoff_max_s = backoff_max_s
        self.retry_after_cap_s = retry_after_cap_s
        self._sleep = sleep
        self._api_key = api_key
        self._headers = {"Accept": "text/event-stream", "Accept-Encoding": "identity",
                         "Content-Type": "application/json", **(extra_headers or {})}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        # Retries are ours (they must stop at the first token); the pool is per host.
        self._session = rest.Session(pool_size=pool_size)

    @classmethod
    def from_config(cls, cfg, **overrides) -> "LLMClient":
        """From an `AgentConfig`; keyword overrides win (tests shorten timeouts and backoff)."""
        kwargs: dict[str, Any] = dict(
            base_url=cfg.base_url, model=cfg.model,
            api_key=cfg.api_key.get_secret_value() if cfg.api_key is not None else None,
            timeout_s=cfg.timeout_s, connect_timeout_s=cfg.connect_timeout_s,
            max_retries=cfg.max_retries, extra_headers=dict(cfg.extra_headers))
        kwargs.update(overrides)
        return cls(**kwargs)

    def __repr__(self) -> str:
        return f"LLMClient(base_url={self.base_url!r}, model={self.model!r})"

    def close(self) -> None:
        self._session.close()

    # -- one call -------------------------------------------------------------------------------
    def chat(self, messages: list[dict], *, tools: list[dict] | None = None,
             tool_choice: str | None = None, on_text: Callable[[str], None] | None = None,
             extra: dict | None = None, headers: dict[str, str] | None = None) -> Completion:
        """Stream one completion. `on_text(text_so_far)` is called as text arrives; `headers`
        are added to this request only (an agent service's conversation id travels this way).
        Raises LLMError (a subclass says which) once retries are used up."""
        payload: dict[str, Any] = {"model": self.model, "messages": messages, "stream": True}
        if tools:
            payload["tools"] = tools
            if tool_choice:
                payload["tool_choice"] = tool_choice
        payload.update(extra or {})
        request_headers = {**self._headers, **headers} if headers else self._headers
        deadline = time.monotonic() + self.timeout_s
        timer = gevent.Timeout(self.timeout_s)
        timer.start()
        try:
            attempt = 0
            while True:
                try:
                    completion = self._attempt(payload, on_text, request_headers)
                    completion.attempts = attempt + 1
                    return completion
                except _Retryable as r:
                    delay = self._delay(attempt, r.retry_after)
                    if attempt >= self.max_retries or time.monotonic() + delay >= deadline:
                        raise r.error from None
                    attempt += 1
                    log.warning("llm retry host=%s attempt=%d delay_s=%.2f error=%s", self.host,
                                attempt, delay, r.error)
                    self._sleep(delay)
        except gevent.Timeout as t:
            if t is not timer:
                raise
            raise LLMTimeout(f"{self.host}: no complete answer within {self.timeout_s:g} s "
                             f"(agent.timeout_s)") from None
        finally:
            timer.close()

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.retry_after_cap_s)
        return random.uniform(0.5, 1.0) * min(self.backoff_max_s,
                                              self.backoff_base_s * (2 ** attempt))

    def _attempt(self, payload: dict, on_text, headers: dict[str, str]) -> Completion:
        try:
            resp = self._session.post(self.url, json=payload, headers=headers, stream=True,
                                      timeout=(self.connect_timeout_s, self.read_timeout_s))
        except rest.ConnectionError as e:
            raise _Retryable(LLMConnectionError(
                f"{self.host}: cannot connect ({_short(e)})")) from None
        except rest.Timeout:
            raise _Retryable(LLMTimeout(f"{self.host}: no response within "
                                        f"{self.read_timeout_s:g} s")) from None
        except rest.RequestException as e:
            raise LLMError(f"{self.host}: request failed ({_short(e)})") from None
        try:
            status = resp.status_code
            if status == 429 or status >= 500:
                error = LLMHTTPError(status,
                                     f"{self.host}: HTTP {status}: {self._error_text(resp)}")
                raise _Retryable(error, _retry_after(resp) if status in (429, 503) else None)
            if status >= 400:
                raise LLMHTTPError(status, f"{self.host}: HTTP {status}: {self._error_text(resp)}")
            if "text/event-stream" not in resp.headers.get("Content-Type", ""):
                return self._read_whole(resp, on_text)  # a server that ignored stream: true
            return self._read_stream(resp, on_text)
        finally:
            resp.close()  # also on GreenletExit: closes the socket, the server sees us leave

    # -- responses ------------------------------------------------------------------------------
    def _read_stream(self, resp, on_text) -> Completion:
        acc = _Accumulator(on_text)
        parser = SSEParser()
        try:
            for chunk in resp.iter_lines():
                for data in parser.feed(chunk):
                    if acc.event(data, self.host):
                        _drain(resp)
                        return acc.completion()
            for data in parser.close():
                if acc.event(data, self.host):
                    return acc.completion()
        except (rest.RequestException, OSError) as e:
            timed_out = isinstance(e, (rest.Timeout, TimeoutError))
            what = (f"no data for {self.read_timeout_s:g} s" if timed_out
                    else f"connection lost ({_short(e)})")
            error_cls = LLMTimeout if timed_out else LLMStreamError
            error = error_cls(f"{self.host}: stream interrupted: {what}")
            if acc.started:
                raise error from None
            raise _Retryable(error) from None
        if acc.finish_reason is not None:
            return acc.completion()  # ended without [DONE] but complete (some servers do)
        error = LLMStreamError(f"{self.host}: the stream ended before the answer was complete")
        if acc.started:
            raise error
        raise _Retryable(error)

    def _read_whole(self, resp, on_text) -> Completion:
        try:
            body = resp.json()
            message = body["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise LLMStreamError(f"{self.host}: the answer is neither an event stream nor a "
                                 f"chat completion") from None
        acc = _Accumulator(on_text)
        text = message.get("content") or ""
        if text:
            acc.text_parts.append(text)
            acc.emit_text()
        for i, tc in enumerate(message.get("tool_calls") or []):
            acc.tool_delta({**tc, "index": i})
        acc.finish_reason = body["choices"][0].get("finish_reason")
        acc.usage = body.get("usage")
        return acc.completion()

    def _error_text(self, resp) -> str:
        """A short reason from an error body, without anything secret."""
        if resp.status_code in (401, 403):
            return "authentication failed (check agent.api_key)"
        try:
            raw = next(resp.iter_content(8192), b"")
            text = raw.decode("utf-8", errors="replace")
            try:
                body = json.loads(text)
                err = body.get("error", body) if isinstance(body, dict) else body
                text = err.get("message", "") if isinstance(err, dict) else str(err)
            except ValueError:
                pass
        except Exception:  # noqa: BLE001  (the status alone will do)
            text = ""
        return _scrub(" ".join(str(text).split()), self._api_key)[:200] or resp.reason or "error"


class _Accumulator:
    """Builds a Completion from stream events; `started` once any token arrived."""

    def __init__(self, on_text) -> None:
        self.on_text = on_text
        self.text_parts: list[str] = []
        self.calls: dict[int, dict] = {}
        self.finish_reason: str | None = None
        self.usage: dict | None = None
        self.started = False

    def event(self, data: str, host: str) -> bool:
        """Apply one event; True at `[DONE]`."""
        if data.strip() == "[DONE]":
            return True
        try:
            obj = json.loads(data)
        except ValueError:
            raise LLMStreamError(f"{host}: malformed stream (an event is not JSON: "
                                 f"{data[:60]!r})") from None
        if not isinstance(obj, dict):
            raise LLMStreamError(f"{host}: malformed stream (an event is not a JSON object)")
        if obj.get("error"):
            err = obj["error"]
            msg = err.get("message", "") if isinstance(err, dict) else str(err)
            raise LLMError(f"{host}: error in stream: {' '.join(str(msg).split())[:200]}")
        if obj.get("usage"):
            self.usage = obj["usage"]
        for choice in obj.get("choices") or []:
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if content:
                self.started = True
                self.text_parts.append(content)
                self.emit_text()
            for tc in delta.get("tool_calls") or []:
                self.started = True
                self.tool_delta(tc)
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return False

    def emit_text(self) -> None:
        if self.on_text is None:
            return
        try:
            self.on_text("".join(self.text_parts))
        except Exception:  # noqa: BLE001  (a failing listener never stops the stream)
            log.exception("on_text callback failed")

    def tool_delta(self, tc: dict) -> None:
        index = tc.get("index", len(self.calls))
        slot = self.calls.setdefault(index, {"id": "", "name": "", "arguments": []})
        if tc.get("id"):
            slot["id"] = tc["id"]
        fn = tc.get("function") or {}
        if fn.get("name") and not slot["name"]:
            slot["name"] = fn["name"]
        args = fn.get("arguments")
        if isinstance(args, dict):  # a few servers send an object instead of JSON text
            args = json.dumps(args)
        if args:
            slot["arguments"].append(args)

    def completion(self) -> Completion:
        calls = [ToolCall(id=slot["id"] or f"call_{i}_{uuid.uuid4().hex[:8]}",
                          name=slot["name"], arguments="".join(slot["arguments"]))
                 for i, slot in sorted(self.calls.items())]
        return Completion(text="".join(self.text_parts), tool_calls=calls,
                          finish_reason=self.finish_reason, usage=self.usage)


def _drain(resp: rest.Response) -> None:
    """Read what follows `[DONE]` (the chunked terminator) so the connection goes back to the
    pool; `resp.close()` would otherwise drop it. Bounded in bytes and time."""
    left = _DRAIN_MAX_BYTES
    with gevent.Timeout(_DRAIN_TIMEOUT_S, False):
        try:
            for chunk in resp.iter_lines():
                left -= len(chunk)
                if left < 0:
                    return
        except (rest.RequestException, OSError):
            return


def _retry_after(resp) -> float | None:
    value = resp.headers.get("Retry-After")
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        pass
    from email.utils import parsedate_to_datetime  # the HTTP-date form
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


_KEYLIKE = re.compile(r"\b(sk|key|token)-[A-Za-z0-9_\-*.]{6,}", re.IGNORECASE)


def _scrub(text: str, api_key: str | None) -> str:
    if api_key:
        text = text.replace(api_key, "[redacted]")
    return _KEYLIKE.sub("[redacted]", text)


def _short(e: BaseException) -> str:
    """An exception's class and the innermost reason, without URLs' query strings or headers."""
    inner: BaseException = e
    seen: set[int] = set()
    while True:
        nxt = getattr(inner, "reason", None) or inner.__cause__ or inner.__context__
        if not isinstance(nxt, BaseException) or id(nxt) in seen:
            break
        seen.add(id(inner))
        inner = nxt
    name = type(inner).__name__
    msg = str(inner)
    m = re.search(r"\[Errno -?\d+\][^'\")]*", msg)
    return f"{name}: {m.group(0).strip()}" if m else name

