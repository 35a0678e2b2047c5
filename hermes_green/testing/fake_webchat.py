"""The web chat's page, played from Python: the same protocol and the same rules as
static/webchat.html (hermes_green/platforms/webchat.py documents the protocol).

    page = WebChatPage(status_server.url).open()       # hello, then waits for "ready"
    mid = page.say("hello")                            # kept until "received", resent on open()
    page.wait_for(lambda: page.answer(mid))            # reply parts are acked, shown once
    page.drop(); page.open()                           # a reconnect: same client, same chat

Unlike the platform fakes, the web chat has no server of its own to fake: the gateway's status
server serves it, so the "fake" is the client. `Driver` wraps pages in the fleet's Driver
interface (testing/driver.py) for code that drives platforms generically; it needs the status
server's address (`attach(url)`), which exists only once the gateway runs, so the web chat does
not name it as its PlatformSpec fake and the fleet does not start it on its own.
"""
from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import quote

import gevent
import gevent.event
import websocket

from .driver import Keepalive, PlatformDriver, ReplyRow


@dataclass
class Reply:
    id: str
    in_reply_to: str
    seq: int
    text: str
    at: float  # monotonic, when the page received it


class WebChatPage:
    """One browser tab: a client id and a conversation id that survive reconnects."""

    def __init__(self, base_url: str, *, path: str = "/chat", token: str | None = None,
                 conversation: str | None = None, client: str | None = None,
                 auto_ack: bool = True, origin: str | None = None,
                 changed: gevent.event.Event | None = None) -> None:
        base = base_url.rstrip("/").replace("http://", "ws://").replace("https://", "wss://")
        self.url = base + path + "/ws" + (f"?token={quote(token)}" if token else "")
        self.conversation = conversation or secrets.token_hex(16)
        self.client = client or secrets.token_hex(16)
        self.auto_ack = auto_ack
        self.origin = origin
        self.pending: dict[str, str] = {}  # id -> text, until "received"
        self.received: dict[str, str] = {}  # id -> status
        self.replies: list[Reply] = []  # every reply frame, duplicates included
        self.shown: dict[str, str] = {}  # reply id -> text, each part once
        self.progress: list[tuple[str, str, float]] = []  # (in_reply_to, text, monotonic)
        self.errors: list[str] = []
        self.closes: list[int | None] = []  # close codes the server sent
        self.changed = changed or gevent.event.Event()  # set whenever something arrives
        self.ready = gevent.event.Event()
        self._ws: websocket.WebSocket | None = None
        self._reader: gevent.Greenlet | None = None

    # -- connection -------------------------------------------------------------------------
    def open(self, timeout: float = 10.0) -> "WebChatPage":
        """Connect, say hello, wait for "ready", then send every message not yet received."""
        self.ready.clear()
        ws = websocket.WebSocket(enable_multithread=True)
        kw: dict[str, Any] = {"timeout": timeout}
        if self.origin is None:
            kw["suppress_origin"] = True
        else:
            kw["origin"] = self.origin
        ws.connect(self.url, **kw)
        ws.settimeout(None)
        self._ws = ws
        self._reader = gevent.spawn(self._read, ws)
        self._reader.name = "fake-webchat:page"
        self.send({"type": "hello", "client": self.client, "conversation": self.conversation})
        if not self.ready.wait(timeout):
            raise AssertionError(f"no ready from the web chat within {timeout}s: {self.errors}")
        for mid, text in list(self.pending.items()):
            self.send({"type": "message", "id": mid, "text": text})
        return self

    @property
    def connected(self) -> bool:
        return self._ws is not None and self._ws.connected and self.ready.is_set()

    def send(self, obj: Any) -> None:
        data = obj if isinstance(obj, (str, bytes)) else json.dumps(obj)
        ws = self._ws
        if ws is None:
            raise ConnectionError("page not open")
        if isinstance(data, bytes):
            ws.send_bytes(data)
        else:
            ws.send_text(data)

    def close(self) -> None:
        """The tab is closed (a clean WebSocket close)."""
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                ws.close(timeout=1)
            except Exception:
                pass
        self._stop_reader()

    def drop(self) -> None:
        """The network goes away: the TCP connection is cut without a close frame."""
        ws, self._ws = self._ws, None
        if ws is not None:
            ws.shutdown()
        self._stop_reader()

    def _stop_reader(self) -> None:
        self.ready.clear()
        if self._reader is not None:
            self._reader.kill(block=True, timeout=2)
            self._reader = None

    def _read(self, ws: websocket.WebSocket) -> None:
        while True:
            try:
                opcode, data = ws.recv_data(control_frame=True)
            except Exception:
                self._changed()
                return
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                self.closes.append(int.from_bytes(data[:2], "big") if len(data) >= 2 else None)
                self.ready.clear()
                self._changed()
                return
            if opcode != websocket.ABNF.OPCODE_TEXT:
                continue
            self._on_frame(json.loads(data.decode("utf-8")))
            self._changed()

    def _on_frame(self, msg: dict) -> None:
        kind = msg.get("type")
        if kind == "ready":
            self.ready.set()
        elif kind == "received":
            self.received[msg["id"]] = msg["status"]
            if msg["status"] != "retry":
                self.pending.pop(msg["id"], None)
        elif kind == "progress":
            self.progress.append((msg["in_reply_to"], msg["text"], time.monotonic()))
        elif kind == "reply":
            self.replies.append(Reply(msg["id"], msg["in_reply_to"], msg["seq"], msg["text"],
                                      time.monotonic()))
            self.shown.setdefault(msg["id"], msg["text"])
            if self.auto_ack:
                self.ack(msg["id"])
        elif kind == "error":
            self.errors.append(msg.get("message", ""))

    def _changed(self) -> None:
        self.changed.set()

    # -- the user -----------------------------------------------------------------------------
    def say(self, text: str, mid: str | None = None) -> str:
        mid = mid or secrets.token_hex(8)
        self.pending[mid] = text
        if self.connected:
            self.send({"type": "message", "id": mid, "text": text})
        return mid

    def ack(self, reply_id: str) -> None:
        try:
            self.send({"type": "ack", "id": reply_id})
        except Exception:  # gone: the part comes again after the next open()
            pass

    def answer(self, mid: str) -> str:
        """The reply parts shown for a message, joined in order ("" while none)."""
        parts = sorted({r.seq: r.text for r in self.replies if r.in_reply_to == mid}.items())
        return "\n".join(text for _, text in parts)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 15.0, what: str = ""):
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise AssertionError(f"{what or 'condition'} not met within {timeout}s; "
                                     f"received={self.received} replies={self.replies[-5:]} "
                                     f"errors={self.errors}")
            self.changed.clear()
            self.changed.wait(0.05)
        return value


class Driver(PlatformDriver):
    """Pages in the fleet's Driver interface: one page per `chat`, opened on first use.
    Call `attach(status_server.url)` once the gateway serves the chat."""
    platform = "webchat"

    def __init__(self, keepalive: Keepalive | None = None, *, secret: str | None = None) -> None:
        super().__init__(keepalive, secret=secret)
        self.base_url: str | None = None
        self.pages: dict[int, WebChatPage] = {}
        self.changed = gevent.event.Event()  # shared by every page of this driver
        self.fake = self  # there is no server to start or stop

    def attach(self, base_url: str) -> "Driver":
        self.base_url = base_url
        return self

    def start(self) -> "Driver":
        return self

    def stop(self) -> None:
        for page in self.pages.values():
            page.close()

    def bot_config(self, **extra: Any) -> dict:
        return {**({"token": self.secret} if self.secret else {}), **extra}

    def bad_credentials_config(self, **extra: Any) -> dict:
        raise NotImplementedError("the web chat has no credentials of its own to refuse")

    def page(self, chat: int = 0) -> WebChatPage:
        if chat not in self.pages:
            if self.base_url is None:
                raise RuntimeError("attach(status_server.url) first")
            self.pages[chat] = WebChatPage(self.base_url, token=self.secret,
                                           conversation=f"fleetchat{chat:08d}",
                                           changed=self.changed).open()
        return self.pages[chat]

    def user_says(self, text: str, *, chat: int = 0, user: int | None = None,
                  group: bool = False) -> str:
        page = self.page(chat)
        return f"{page.conversation}:{page.say(text)}"

    def redeliver(self, message_id: str) -> None:
        conversation, _, mid = message_id.partition(":")
        for page in self.pages.values():
            if page.conversation == conversation:
                page.send({"type": "message", "id": mid, "text": page.pending.get(mid, "again")})

    def reply_rows(self) -> list[ReplyRow]:
        rows = [ReplyRow(f"{p.conversation}:{r.in_reply_to}", r.text, r.at)
                for p in self.pages.values() for r in p.replies]
        return sorted(rows, key=lambda r: r.at)

    def drop(self) -> None:
        for page in self.pages.values():
            page.drop()

    def go_silent(self, seconds: float) -> None:
        raise NotImplementedError("a page has no server side to silence")

    def send_garbage(self) -> None:
        for page in self.pages.values():
            page.send('{"not": "a frame')

    def lateness(self) -> list[float]:
        return []  # the page's pings are not on a server timetable

    def sessions(self) -> list[tuple[int, float]]:
        return []

    def disconnects(self) -> list:
        return []

    def connected(self) -> bool:
        return any(p.connected for p in self.pages.values())

    def wait_changed(self) -> Any:
        return self.changed
