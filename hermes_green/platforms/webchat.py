"""Web chat: a page served by the gateway's status server where a person chats with the agent,
through the same journal, sessions, agent and outbox as every other platform.

The protocol between the page (static/webchat.html; testing/fake_webchat.py speaks it from
Python) and this adapter: JSON text messages on the page's WebSocket at `<path>/ws`.

page -> gateway
    {"type": "hello", "client": C, "conversation": V}
                 first, within HELLO_TIMEOUT_S. The page made both ids up once and keeps them
                 (localStorage): V is the chat, C the user. Ids: 8-64 of [A-Za-z0-9_-].
    {"type": "message", "id": M, "text": T}
                 M is new per message and stays with it until the gateway said "received", so
                 a resend after a reconnect carries the same M: the journal key is "V:M" and
                 the message is answered once.
    {"type": "ack", "id": R}      the page shows reply part R (or already did)
    {"type": "ping"}              every PAGE_PING_S; a page silent for `page_timeout_s` is closed
gateway -> page
    {"type": "ready", "conversation": V}
    {"type": "received", "id": M, "status": S}   S: new, duplicate, refused, held, or retry (not
                 journaled: the store failed; the page sends M again later)
    {"type": "progress", "in_reply_to": M, "text": P}  the answer so far, while the agent works
    {"type": "reply", "id": R, "in_reply_to": M, "seq": n, "text": T}  R is "M:n": one part
                 always has one id, so a page drops a part it already shows (and acks it again)
    {"type": "pong"}
    {"type": "error", "message": E}, then close 1008 (bad hello or message), 1009 (too large)

Replies are kept until a page acknowledged them: send() pushes the part to every page open on
that conversation and returns only when one of them acked it, so the outbox row is deleted then
and not before. A conversation without a page gets a retryable SendError; the outbox tries again,
backing off up to `offline_retry_max_s`. The part is also remembered here, so a page that comes
back gets it at once, and its ack is remembered, so the outbox's next try completes without
sending it again. That memory is only a shortcut: after a gateway restart it is empty and the
outbox rows are what is owed (sent on the outbox's next try once the page is back).

The connection's life is the served transport's (transports/served.py): READY while the status
server serves the page. Access is the status server's (token required off loopback), or, with
`token` set here, that token on the chat's paths instead of the status token.
"""
from __future__ import annotations

import html
import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import gevent
import gevent.event
import gevent.queue
from pydantic import Field, SecretStr, field_validator

from ..models import InboundMessage, OutboundMessage
from ..webmount import PAGE_HEADERS, MessageTooLarge, WebMount, mount_path_problem
from .base import Delivery, JournalFailure, SendError
from .botconfig import BotConfig
from .kit import SkipFrame, decode_json, spawn_owned
from .registry import PlatformSpec
from .transports.served import ServedAdapter

PAGE_FILE = Path(__file__).resolve().parent.parent / "static" / "webchat.html"
CHAT_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")  # conversation and client ids
MESSAGE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
REPLY_ID_MAX = 140
HELLO_TIMEOUT_S = 10.0
PAGE_PING_S = 15.0  # what the page does (static/webchat.html); the timeout is in the config
SEND_TIMEOUT_S = 5.0  # a page that takes a frame no faster than this is dropped
PAGE_QUEUE_FRAMES = 512  # frames waiting for one page; more means it stopped reading
MAX_MESSAGE_BYTES = 256 * 1024  # one WebSocket message from a page (max_text_chars fits)
ACKED_MEMORY = 4096  # reply ids acked by a page, remembered for the outbox's next try
AWAY_MEMORY_PER_CHAT = 256  # parts remembered for a page that comes back
AWAY_MEMORY_CHATS = 1024
PROGRESS_MAX_CHARS = 64 * 1024

_SILENT = object()
CLOSE_POLICY = 1008
CLOSE_TOO_BIG = 1009
CLOSE_GOING_AWAY = 1001


class WebChatConfig(BotConfig):
    # "" serves /chat (or /chat/<id> for one of several web chat bots)
    path: str = ""
    # When set, the chat's paths take this token (Bearer or ?token=) instead of the status
    # server's; off loopback one of the two is always required.
    token: Optional[SecretStr] = None
    title: str = Field("hermes-green", max_length=80)
    ack_timeout_s: float = Field(10.0, gt=0)  # a pushed reply part not acked by then: retried
    offline_retry_max_s: float = Field(30.0, gt=0)  # longest outbox wait while no page is open
    progress_interval_s: float = Field(0.1, ge=0)  # streamed updates, at most this often
    max_text_chars: int = Field(16000, ge=1, le=100_000)
    page_timeout_s: float = Field(60.0, gt=PAGE_PING_S)  # nothing from a page this long: closed
    max_pages: int = Field(64, ge=1, le=1024)

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        problem = mount_path_problem(value) if value else None
        if problem is not None:
            raise ValueError(f"path {problem}")
        return value


class _PageGone(Exception):
    """Every page that was shown a reply part closed before acking it."""


@dataclass(eq=False)
class _Page:
    """One open page: its socket, its chat, and a writer greenlet draining `out`."""
    ws: Any
    conversation: str
    client: str
    out: gevent.queue.Queue = field(default_factory=lambda: gevent.queue.Queue(PAGE_QUEUE_FRAMES))
    pushed: set = field(default_factory=set)  # reply ids shown here, not acked yet
    closed: bool = False

    def push(self, frame: str) -> bool:
        if self.closed:
            return False
        try:
            self.out.put_nowait(frame)
            return True
        except gevent.queue.Full:  # it stopped reading: drop it, it comes back and catches up
            self.close(CLOSE_GOING_AWAY, "not reading")
            return False

    def close(self, code: int = 1000, reason: str = "") -> None:
        if self.closed:
            return
        self.closed = True
        try:
            self.out.put_nowait(None)
        except gevent.queue.Full:
            pass
        try:
            self.ws.close(code, reason.encode())
        except Exception:  # already gone; closing is all we wanted
            pass


class WebChatAdapter(ServedAdapter):
    """See the module docstring for the protocol and the delivery rule."""
    name = "webchat"
    # A message not journaled is answered "retry" and the page sends it again.
    on_journal_failure = JournalFailure.REDELIVER

    def __init__(self, config, on_message, **kw) -> None:
        super().__init__(config, on_message, **kw)
        default = "/chat" if self.bot_id == self.name else f"/chat/{self.bot_id}"
        self.path = config.path or default
        self.socket_path = self.path + "/ws"
        self._token = config.token.get_secret_value() if config.token is not None else None
        self._pages: dict[str, list[_Page]] = {}  # conversation -> open pages
        self._waiting: dict[str, gevent.event.AsyncResult] = {}  # reply id -> send() waiting
        self._acked: OrderedDict[str, None] = OrderedDict()
        self._away: OrderedDict[str, OrderedDict[str, str]] = OrderedDict()  # conv -> id -> frame
        self._progress_at: OrderedDict[tuple[str, str], float] = OrderedDict()
        self._page_html: bytes | None = None

    # -- the mount --------------------------------------------------------------------------------
    def web_mount(self) -> WebMount:
        if self._page_html is None:
            self._page_html = self._render_page()
        return WebMount(self.path, self._wsgi, frozenset({self.socket_path}), token=self._token,
                        max_message_bytes=MAX_MESSAGE_BYTES, max_sockets=self.config.max_pages)

    def _render_page(self) -> bytes:
        page = PAGE_FILE.read_text(encoding="utf-8")
        settings = json.dumps({"socket": self.socket_path, "storage": f"hg-webchat:{self.path}",
                               "pingMs": int(PAGE_PING_S * 1000)})
        page = page.replace("__HG_TITLE__", html.escape(self.config.title))
        return page.replace("__HG_SETTINGS__", settings.replace("<", "\\u003c")).encode()

    def _wsgi(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        ws = environ.get("wsgi.websocket")
        if path == self.socket_path and ws is not None:
            self._serve_page(ws)
            return []
        if path not in (self.path, self.path + "/"):
            return _plain(start_response, "404 Not Found", b"not found")
        if environ.get("REQUEST_METHOD") not in ("GET", "HEAD"):
            return _plain(start_response, "405 Method Not Allowed", b"method not allowed",
                          [("Allow", "GET, HEAD")])
        body = self._page_html or b""
        start_response("200 OK", [*PAGE_HEADERS, ("Content-Length", str(len(body)))])
        return [] if environ.get("REQUEST_METHOD") == "HEAD" else [body]

    def on_unmounted(self) -> None:
        for pages in list(self._pages.values()):
            for page in list(pages):
                page.close(CLOSE_GOING_AWAY, "chat stopped")

    # -- one page ---------------------------------------------------------------------------------
    def _serve_page(self, ws) -> None:
        """The host's request greenlet reads the page; a writer greenlet sends to it."""
        page = self._hello(ws)
        if page is None:
            return
        writer = spawn_owned(self.background, self._write, page,
                             name=f"{self.name}:{self.bot_id}:page-writer", log=self.log)
        self._pages.setdefault(page.conversation, []).append(page)
        self.log.info("page opened platform=%s bot=%s chat=%s pages=%d", self.name, self.bot_id,
                      page.conversation, len(self._pages[page.conversation]))
        try:
            page.push(_frame(type="ready", conversation=page.conversation))
            for frame in list(self._away.get(page.conversation, {}).values()):
                page.push(frame)  # what the outbox could not hand over while no page was open
            self._read(page)
        finally:
            page.close()
            self._forget(page)
            writer.join(timeout=SEND_TIMEOUT_S)
            writer.kill(block=False)

    def _hello(self, ws) -> _Page | None:
        try:
            with gevent.Timeout(HELLO_TIMEOUT_S, False):
                data = ws.receive()
                msg = decode_json(data) if isinstance(data, str) else None
                if not (isinstance(msg, dict) and msg.get("type") == "hello"
                        and _valid(CHAT_ID, msg.get("conversation"))
                        and _valid(CHAT_ID, msg.get("client"))):
                    _refuse(ws, CLOSE_POLICY, "the first message must be a valid hello")
                    return None
                return _Page(ws, msg["conversation"], msg["client"])
            _refuse(ws, CLOSE_POLICY, "no hello")
        except MessageTooLarge:
            _refuse(ws, CLOSE_TOO_BIG, "message too large")
        except SkipFrame:
            _refuse(ws, CLOSE_POLICY, "the first message must be a valid hello")
        except Exception as e:  # the socket broke during the handshake: nothing to serve
            self.log.debug("page left before hello platform=%s error=%s", self.name,
                           type(e).__name__)
        return None

    def _read(self, page: _Page) -> None:
        while not page.closed:
            try:
                data: Any = _SILENT
                with gevent.Timeout(self.config.page_timeout_s, False):
                    data = page.ws.receive()
                if data is _SILENT:
                    self.log.info("page silent platform=%s chat=%s timeout_s=%.0f", self.name,
                                  page.conversation, self.config.page_timeout_s)
                    return page.close(CLOSE_GOING_AWAY, "silent")
                if data is None:  # closed by the page, or a protocol error
                    return None
                self._on_page_message(page, data)
            except MessageTooLarge:
                return self._bad(page, CLOSE_TOO_BIG, "message too large")
            except SkipFrame:
                return self._bad(page, CLOSE_POLICY, "not a JSON object")
            except Exception as e:  # a broken socket ends this page only
                self.log.debug("page read ended platform=%s chat=%s error=%s", self.name,
                               page.conversation, type(e).__name__)
                return

    def _on_page_message(self, page: _Page, data: Any) -> None:
        msg = decode_json(data) if isinstance(data, str) else None
        kind = msg.get("type") if isinstance(msg, dict) else None
        if kind == "message":
            return self._on_message_from(page, msg)
        if kind == "ack" and isinstance(msg.get("id"), str) and len(msg["id"]) <= REPLY_ID_MAX:
            return self._on_ack(page, msg["id"])
        if kind == "ping":
            page.push(_frame(type="pong"))
            return None
        return self._bad(page, CLOSE_POLICY, "unknown message")

    def _on_message_from(self, page: _Page, msg: dict) -> None:
        mid, text = msg.get("id"), msg.get("text")
        if not _valid(MESSAGE_ID, mid) or not isinstance(text, str):
            return self._bad(page, CLOSE_POLICY, "a message needs an id and a text")
        text = _utf8_safe(text).strip()
        if not text or len(text) > self.config.max_text_chars:
            return self._bad(page, CLOSE_POLICY,
                             f"a message text is 1 to {self.config.max_text_chars} characters")
        inbound = InboundMessage(platform=self.name, message_id=f"{page.conversation}:{mid}",
                                 chat_id=page.conversation, user_id=page.client, text=text,
                                 chat_type="dm",
                                 reply_ref={"chat": page.conversation, "message_id": mid})
        outcome = self.deliver(inbound)
        status = "retry" if outcome is Delivery.NOT_JOURNALED else outcome.value
        page.push(_frame(type="received", id=mid, status=status))
        return None

    def _on_ack(self, page: _Page, reply_id: str) -> None:
        page.pushed.discard(reply_id)
        self._acked[reply_id] = None
        self._acked.move_to_end(reply_id)
        while len(self._acked) > ACKED_MEMORY:
            self._acked.popitem(last=False)
        away = self._away.get(page.conversation)
        if away is not None:
            away.pop(reply_id, None)
            if not away:
                del self._away[page.conversation]
        waiter = self._waiting.get(reply_id)
        if waiter is not None and not waiter.ready():
            waiter.set(True)

    def _bad(self, page: _Page, code: int, why: str) -> None:
        self.log.info("page refused platform=%s chat=%s code=%d why=%s", self.name,
                      page.conversation, code, why)
        try:
            with gevent.Timeout(SEND_TIMEOUT_S, False):
                page.ws.send(_frame(type="error", message=why))
        except Exception:  # it is going anyway
            pass
        page.close(code, why)

    def _write(self, page: _Page) -> None:
        while True:
            frame = page.out.get()
            if frame is None:
                return
            try:
                with gevent.Timeout(SEND_TIMEOUT_S):
                    page.ws.send(frame)
            except BaseException as e:
                if isinstance(e, gevent.GreenletExit):
                    raise
                self.log.info("page dropped platform=%s chat=%s why=%s", self.name,
                              page.conversation, "not reading" if isinstance(e, gevent.Timeout)
                              else type(e).__name__)
                abort = getattr(page.ws, "abort", None)
                if isinstance(e, gevent.Timeout) and abort is not None:
                    abort()  # a frame was cut half-way: no close frame can follow
                page.close(CLOSE_GOING_AWAY, "not reading")
                return

    def _forget(self, page: _Page) -> None:
        pages = self._pages.get(page.conversation, [])
        if page in pages:
            pages.remove(page)
        if not pages:
            self._pages.pop(page.conversation, None)
        self.log.info("page closed platform=%s bot=%s chat=%s pages=%d", self.name, self.bot_id,
                      page.conversation, len(pages))
        for reply_id in page.pushed:
            waiter = self._waiting.get(reply_id)
            if waiter is not None and not waiter.ready() and not any(
                    reply_id in p.pushed for p in pages):
                waiter.set_exception(_PageGone())

    # -- delivery (called by the gateway's outbox) ----------------------------------------------
    def reply_chunk_chars(self) -> int:
        return self.config.max_text_chars

    def send(self, out: OutboundMessage) -> None:
        ref = out.reply_ref if isinstance(out.reply_ref, dict) else {}
        conversation = out.chat_id
        mid = ref.get("message_id") if isinstance(ref.get("message_id"), str) else \
            str(out.in_reply_to or out.outbox_id)
        reply_id = f"{mid}:{out.seq}"
        if reply_id in self._acked:  # a page that came back has it already (see _remember)
            return
        frame = _frame(type="reply", id=reply_id, in_reply_to=mid, seq=out.seq, text=out.text)
        self._progress_at.pop((conversation, mid), None)
        pages = [p for p in self._pages.get(conversation, ()) if not p.closed]
        if not pages:
            self._remember(conversation, reply_id, frame)
            raise SendError("no page open for this conversation", retryable=True,
                            retry_after=self._offline_delay(out.attempts))
        waiter = self._waiting[reply_id] = gevent.event.AsyncResult()
        try:
            for page in pages:
                if page.push(frame):
                    page.pushed.add(reply_id)
            if not any(reply_id in p.pushed for p in pages):
                raise _PageGone()
            waiter.get(timeout=self.config.ack_timeout_s)
        except gevent.Timeout:
            raise SendError("the page did not acknowledge the reply", retryable=True,
                            retry_after=1.0) from None
        except _PageGone:
            self._remember(conversation, reply_id, frame)
            raise SendError("the page closed before acknowledging the reply", retryable=True,
                            retry_after=self._offline_delay(out.attempts)) from None
        finally:
            if self._waiting.get(reply_id) is waiter:
                del self._waiting[reply_id]

    def _offline_delay(self, attempts: int) -> float:
        return min(self.config.offline_retry_max_s, 0.5 * 2 ** min(attempts, 16))

    def _remember(self, conversation: str, reply_id: str, frame: str) -> None:
        away = self._away.setdefault(conversation, OrderedDict())
        self._away.move_to_end(conversation)
        away[reply_id] = frame
        while len(away) > AWAY_MEMORY_PER_CHAT:
            away.popitem(last=False)
        while len(self._away) > AWAY_MEMORY_CHATS:
            self._away.popitem(last=False)

    def progress(self, reply_ref: dict, text_so_far: str) -> None:
        ref = reply_ref if isinstance(reply_ref, dict) else {}
        conversation, mid = ref.get("chat"), ref.get("message_id")
        pages = self._pages.get(conversation) if isinstance(conversation, str) else None
        if not pages or not isinstance(mid, str):
            return
        key, now = (conversation, mid), time.monotonic()
        if now - self._progress_at.get(key, float("-inf")) < self.config.progress_interval_s:
            return
        self._progress_at[key] = now
        self._progress_at.move_to_end(key)
        while len(self._progress_at) > ACKED_MEMORY:
            self._progress_at.popitem(last=False)
        frame = _frame(type="progress", in_reply_to=mid, text=text_so_far[:PROGRESS_MAX_CHARS])
        for page in list(pages):
            page.push(frame)


def _frame(**fields: Any) -> str:
    return json.dumps(fields, ensure_ascii=False, separators=(",", ":"))


def _valid(pattern: re.Pattern, value: Any) -> bool:
    return isinstance(value, str) and pattern.match(value) is not None


def _utf8_safe(text: str) -> str:
    """Lone surrogates cannot be journaled: they become "?"."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _refuse(ws, code: int, why: str) -> None:
    try:
        ws.send(_frame(type="error", message=why))
        ws.close(code, why.encode())
    except Exception:  # the page is gone already
        pass


def _plain(start_response, status: str, body: bytes, headers=()) -> list[bytes]:
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
                            *headers])
    return [body]


PLATFORM = PlatformSpec(name="webchat", config=WebChatConfig, adapter="WebChatAdapter")
