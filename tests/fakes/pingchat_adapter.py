"""A test-only platform whose keepalive is a WebSocket ping (Keepalive.PING), on the kit's
WebSocketAdapter: the server sends `ready`, then `message` frames the bot must `ack` (unacked
ones come again: JournalFailure.REDELIVER); a `reply` is answered `accepted` or `refused`; close
code 4003 means a bad token. Its fake: tests/fakes/pingchat.py."""
from __future__ import annotations

import json

from pydantic import SecretStr

from hermes_green.models import InboundMessage, OutboundMessage
from hermes_green.platforms.base import JournalFailure, SendError
from hermes_green.platforms.botconfig import BotConfig
from hermes_green.platforms.kit import Waiters, decode_json
from hermes_green.platforms.transports.websocket import CloseAction, Keepalive, WebSocketAdapter


class PingChatConfig(BotConfig):
    url: str
    token: SecretStr
    ping_interval_s: float = 30.0


class PingChatAdapter(WebSocketAdapter):
    name = "pingchat"
    keepalive = Keepalive.PING
    on_journal_failure = JournalFailure.REDELIVER
    heartbeat_after_ready = True

    def __init__(self, config, on_message, **kw) -> None:
        super().__init__(config, on_message, **kw)
        self.heartbeat_interval_s = config.ping_interval_s
        self.answers = Waiters()

    def prepare(self) -> str:
        return self.config.url

    def connect_headers(self) -> list[str]:
        return [f"Authorization: Bearer {self.config.token.get_secret_value()}"]

    def close_action(self, code: int | None) -> CloseAction:
        return CloseAction.FATAL if code == 4003 else CloseAction.RESUME

    def on_disconnect(self, lost) -> None:
        self.answers.fail_all(lost)

    def on_frame(self, data) -> None:
        frame = decode_json(data)  # garbage raises SkipFrame: logged and skipped by the reader
        kind = frame.get("type") if isinstance(frame, dict) else None
        if kind == "ready":
            self.mark_ready()
        elif kind in ("accepted", "refused"):
            self.answers.resolve(str(frame.get("ref")), kind == "accepted")
        elif kind == "message":
            m = frame
            if not m["group"] or m["to_bot"]:  # in a group, only what is addressed to the bot
                delivery = self.deliver(InboundMessage(
                    platform=self.name, message_id=m["id"], chat_id=m["chat"],
                    user_id=m["user"], text=m["text"], chat_type="group" if m["group"] else "dm"))
                if not delivery.ack:
                    return  # not journaled: the server sends it again
            self.send_frame(json.dumps({"type": "ack", "id": m["id"]}))

    def send(self, out: OutboundMessage) -> None:
        ref = f"{out.in_reply_to}:{out.seq}"
        waiter = self.answers.expect(ref)
        try:
            self.send_frame(json.dumps({"type": "reply", "ref": ref, "chat": out.chat_id,
                                        "reply_to": out.in_reply_to, "text": out.text}))
            accepted = waiter.get(timeout=5)
        except Exception as e:
            self.answers.discard(ref)
            raise SendError(f"reply not accepted: {type(e).__name__}") from None
        if not accepted:
            raise SendError("reply refused", retryable=False)

    def reply_chunk_chars(self) -> int:
        return 300
