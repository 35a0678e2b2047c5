"""The server of the test-only platform whose keepalive is a WebSocket ping (adapter:
tests/fakes/pingchat_adapter.py), on the fake harness, with its contract `Driver`.

Rules, as a strict server keeps them:
- the handshake needs `Authorization: Bearer <token>`; a wrong one is closed with 4003;
- the client's WebSocket pings are the keepalive: each is answered with a pong, and a client
  whose last ping is older than `keepalive_deadline_s` is dropped (a zombie connection answers
  no ping and drops nobody);
- a `message` not acked within `ack_deadline_s` is sent again (a new connection gets every
  unacked one at once), up to `redeliver_limit` times;
- a `reply` longer than `max_text_chars` is refused, any other is accepted and recorded.
"""
from __future__ import annotations

import itertools
import time
from typing import Any

import gevent
import gevent.pool
from geventwebsocket.websocket import WebSocket

from hermes_green.testing.driver import Keepalive
from hermes_green.testing.harness import Conn, FakePlatformServer
from tests.fakes.example_driver import ExampleDriver
from tests.fakes.pingchat_adapter import PingChatAdapter, PingChatConfig


class _PingHookSocket(WebSocket):
    """Hands control-frame pings to the fake (WebSocket has __slots__: the hook lives in
    environ) instead of geventwebsocket's automatic pong."""
    __slots__ = ()

    def handle_ping(self, header, payload) -> None:
        self.environ["fake.on_ping"](payload)


class FakePingChat(FakePlatformServer):
    ws_path = "/ws"

    def __init__(self, *, token: str = "pingchat-token", keepalive_deadline_s: float = 60.0,
                 ack_deadline_s: float = 0.5, redeliver_limit: int = 5,
                 max_text_chars: int = 300) -> None:
        super().__init__()
        self.token, self.keepalive_deadline_s = token, keepalive_deadline_s
        self.ack_deadline_s, self.redeliver_limit = ack_deadline_s, redeliver_limit
        self.max_text_chars = max_text_chars
        self.messages: dict[str, dict] = {}
        self.acked: set[str] = set()
        self.replies: list[dict] = []
        self.refused: list[dict] = []
        self.keepalive_times: dict[int, list[float]] = {}
        self.ready_at: dict[int, float] = {}
        self._ids = itertools.count(1)
        self._pushers = gevent.pool.Group()

    def stop(self) -> None:
        self._pushers.kill(block=True, timeout=1)
        super().stop()

    # -- users ---------------------------------------------------------------------------------
    def user_sends(self, text: str, *, chat: str, user: str, group: bool = False,
                   to_bot: bool = True) -> str:
        mid = f"wm{next(self._ids)}"
        self.messages[mid] = {"type": "message", "id": mid, "chat": chat, "user": user,
                              "text": text, "group": group, "to_bot": to_bot}
        self._pushers.spawn(self._push, mid).name = "fake-pingchat:push"
        return mid

    def redeliver(self, mid: str) -> None:
        for conn in self.live_conns():
            conn.send(self.messages[mid])

    def _push(self, mid: str) -> None:
        for _ in range(1 + self.redeliver_limit):
            if mid in self.acked:
                return
            for conn in self.live_conns()[-1:]:
                conn.send(self.messages[mid])
            gevent.sleep(self.ack_deadline_s)

    # -- the socket ----------------------------------------------------------------------------
    def on_connect(self, conn: Conn, request: dict) -> bool:
        if request["headers"].get("Authorization") != f"Bearer {self.token}":
            conn.close(4003, "bad token", reason="bad_token")
            return True
        self.keepalive_times[conn.id] = []
        conn.ws.environ["fake.on_ping"] = lambda payload: self._on_ping(conn, payload)
        conn.ws.__class__ = _PingHookSocket
        conn.expect_keepalive(self.keepalive_deadline_s)
        if conn.send({"type": "ready"}):
            self.ready_at[conn.id] = time.monotonic()
        for mid, frame in self.messages.items():
            if mid not in self.acked:
                conn.send(frame)
        return True

    def _on_ping(self, conn: Conn, payload: bytes) -> None:
        if conn.silent or conn.closed.is_set():
            return  # a zombie: no pong
        conn.keepalive()
        self.keepalive_times[conn.id].append(time.monotonic())
        self.changed()
        try:
            conn.ws.send_frame(payload, WebSocket.OPCODE_PONG)
        except Exception:
            pass

    def on_frame(self, conn: Conn, data: Any) -> None:
        kind = data.get("type") if isinstance(data, dict) else None
        if kind == "ack":
            self.acked.add(data.get("id"))
        elif kind == "reply":
            text = data.get("text")
            if not isinstance(text, str) or len(text) > self.max_text_chars:
                self.refused.append(data)
                conn.send({"type": "refused", "ref": data.get("ref")})
                return
            self.replies.append({**data, "at": time.monotonic()})
            conn.send({"type": "accepted", "ref": data.get("ref")})
        else:
            self.log_event("client_sent_unknown", conn)


class Driver(ExampleDriver):
    platform = "pingchat"
    max_reply_chars = 300

    def __init__(self, keepalive: Keepalive | None = None, *, secret: str | None = None) -> None:
        super().__init__(keepalive, secret=secret)
        self.fake = FakePingChat(token=secret or "pingchat-token",
                                 keepalive_deadline_s=self.keepalive.deadline_s)

    def bot_config(self, **extra: Any) -> dict:
        return {"url": self.fake.ws_url, "token": self.fake.token,
                "ping_interval_s": self.keepalive.interval_s, **extra}

    def adapter_factory(self, section: dict):
        config = PingChatConfig.model_validate(section)
        return lambda cfg, on_message, **kw: PingChatAdapter(config, on_message, **kw)

    def redeliver(self, message_id: str) -> None:
        self.fake.redeliver(message_id)

    def go_silent(self, seconds: float) -> None:
        self.fake.go_silent(seconds, whole_server=False)

    def lateness(self) -> list[float]:
        """How late each ping came against a timetable from the `ready` frame."""
        interval, late = self.keepalive.interval_s, []
        for conn_id, times in list(self.fake.keepalive_times.items()):
            due = self.fake.ready_at.get(conn_id, 0.0)
            for t in times:
                due += interval
                late.append(max(0.0, t - due))
                if t - due > interval:  # one stall counts once: the table restarts there
                    due = t
        return late

    def session_up_at(self, conn_id: int) -> float | None:
        return self.fake.ready_at.get(conn_id)
