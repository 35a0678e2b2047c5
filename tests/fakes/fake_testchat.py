"""A minimal chat platform for gateway tests: JSON over WebSocket, built on the same harness
as the real platform fakes, with the two rules that matter for delivery guarantees:

- an inbound message not acked by the client is delivered again on the next connection
  (and `redeliver(id)` delivers one again on demand, as Feishu does hours later);
- `replies` records every reply the fake accepted, duplicates too, so tests can assert
  "answered exactly once" from the record; with `accept_replies = False` it reads replies
  (kept in `unaccepted`) but never accepts them, like a platform that stopped answering.

Frames: server -> {"type": "message", "id", "chat", "user", "text", ["chat_type", "mentioned"]} |
{"type": "pong"} |
{"type": "accepted", "outbox"}; client -> {"type": "ack", "id"} | {"type": "ping"} |
{"type": "reply", "outbox", "reply_to", "seq", "chat", "text"}.
"""
from __future__ import annotations

import itertools

from hermes_green.testing.harness import Conn, FakePlatformServer


class FakeTestChat(FakePlatformServer):
    def __init__(self, *, keepalive_deadline_s: float = 5.0) -> None:
        super().__init__()
        self.keepalive_deadline_s = keepalive_deadline_s
        self.messages: dict[str, dict] = {}  # id -> message frame
        self.acked: set[str] = set()
        self.replies: list[dict] = []  # every reply accepted, duplicates included
        self.unaccepted: list[dict] = []
        self.accept_replies = True
        self._ids = itertools.count(1)

    def on_connect(self, conn: Conn, request: dict) -> bool:
        conn.expect_keepalive(self.keepalive_deadline_s)
        for mid, frame in self.messages.items():
            if mid not in self.acked:
                conn.send(frame)
        return True

    def on_frame(self, conn: Conn, data) -> None:
        kind = data.get("type")
        if kind == "ping":
            conn.keepalive()
            conn.send({"type": "pong"})
        elif kind == "ack":
            self.acked.add(data["id"])
        elif kind == "reply":
            if not self.accept_replies:
                self.unaccepted.append(data)
                return
            self.replies.append(data)
            conn.send({"type": "accepted", "outbox": data["outbox"]})

    def send_user_message(self, text: str, *, chat: str = "c1", user: str = "u1",
                          message_id: str | None = None, group: bool = False,
                          mentioned: bool | None = None) -> str:
        """`group`: a group chat; `mentioned`: whether it addresses the bot (None: unsaid)."""
        mid = message_id or f"m{next(self._ids)}"
        frame = {"type": "message", "id": mid, "chat": chat, "user": user, "text": text}
        if group:
            frame["chat_type"] = "group"
        if mentioned is not None:
            frame["mentioned"] = mentioned
        self.messages[mid] = frame
        for conn in self.live_conns():
            conn.send(frame)
        return mid

    def redeliver(self, message_id: str) -> None:
        for conn in self.live_conns():
            conn.send(self.messages[message_id])

    def replies_to(self, message_id: str) -> list[dict]:
        return [r for r in self.replies if r["reply_to"] == message_id]
