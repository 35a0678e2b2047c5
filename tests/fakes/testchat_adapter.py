"""The client side of the test platform: a real `WebSocketAdapter`, so gateway tests run
the same connection, keepalive and reconnect code as production adapters."""
from __future__ import annotations

import json
from types import SimpleNamespace

from hermes_green.config import BackoffConfig
from hermes_green.models import InboundMessage, OutboundMessage
from hermes_green.platforms.base import SendError
from hermes_green.platforms.kit import Waiters
from hermes_green.platforms.transports.websocket import WebSocketAdapter


def testchat_config(url: str, **kw) -> SimpleNamespace:
    return SimpleNamespace(url=url, allow_from=kw.pop("allow_from", []),
                           backoff=BackoffConfig(initial_s=0.05, max_s=0.5), **kw)


class TestChatAdapter(WebSocketAdapter):
    name = "testchat"
    heartbeat_interval_s = 0.5
    __test__ = False  # not a pytest test class

    def __init__(self, config, on_message, **kw) -> None:
        super().__init__(config, on_message, **kw)
        self.waiters = Waiters()

    def prepare(self) -> str:
        return self.config.url

    def on_open(self) -> None:
        self.mark_ready()

    def heartbeat_frame(self) -> str:
        return '{"type": "ping"}'

    def on_frame(self, data) -> None:
        frame = json.loads(data)
        kind = frame.get("type")
        if kind == "pong":
            self.beat_answered()
        elif kind == "accepted":
            self.waiters.resolve(str(frame["outbox"]), True)
        elif kind == "message":
            self.deliver(InboundMessage(platform=self.name, message_id=frame["id"],
                                        chat_id=frame["chat"], user_id=frame["user"],
                                        text=frame["text"], reply_ref={"id": frame["id"]},
                                        chat_type=frame.get("chat_type", "dm"),
                                        mentioned=frame.get("mentioned")))
            self.send_frame(json.dumps({"type": "ack", "id": frame["id"]}))

    def on_disconnect(self, lost) -> None:
        self.waiters.fail_all(lost)

    def send(self, out: OutboundMessage) -> None:
        key = str(out.outbox_id)
        waiter = self.waiters.expect(key)
        try:
            self.send_frame(json.dumps({"type": "reply", "outbox": out.outbox_id,
                                        "reply_to": out.in_reply_to, "seq": out.seq,
                                        "chat": out.chat_id, "text": out.text}))
            waiter.get(timeout=5)
        except Exception as e:
            self.waiters.discard(key)
            raise SendError(f"reply not accepted: {type(e).__name__}") from None
