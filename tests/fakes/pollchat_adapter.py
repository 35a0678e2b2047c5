"""A test-only platform over HTTP long polling, on the kit's LongPollAdapter: `GET /me` proves
the token, `GET /updates?offset&timeout` is held until updates come, `POST /send` answers. The
cursor moves only past what was handed up: a journal failure replays (fake: pollchat.py)."""
from __future__ import annotations

import requests
from pydantic import SecretStr

from hermes_green.models import InboundMessage, OutboundMessage
from hermes_green.platforms.base import (ConnectionLost, FatalPlatformError, JournalFailure,
                                         SendError)
from hermes_green.platforms.botconfig import BotConfig
from hermes_green.platforms.kit import SkipFrame, decode_json
from hermes_green.platforms.transports.longpoll import LongPollAdapter


class PollChatConfig(BotConfig):
    base_url: str
    token: SecretStr
    poll_timeout_s: float = 25.0


class PollChatAdapter(LongPollAdapter):
    name = "pollchat"
    on_journal_failure = JournalFailure.REPLAY
    poll_grace_s = 0.6  # a poll unanswered this long after its timeout is a zombie

    def __init__(self, config, on_message, **kw) -> None:
        super().__init__(config, on_message, **kw)
        self.poll_timeout_s = config.poll_timeout_s
        self.http = requests.Session()
        self.http.headers["Authorization"] = f"Bearer {config.token.get_secret_value()}"
        self.offset = int(self.saved_state.get("offset") or 0)

    def _call(self, method: str, path: str, **kw):
        try:
            resp = self.http.request(method, self.config.base_url + path, **kw,
                                     timeout=(5, self.poll_timeout_s + 5))
        except requests.RequestException as e:
            raise ConnectionLost("network", type(e).__name__) from None
        if resp.status_code == 401:
            raise FatalPlatformError("pollchat refused the token")
        if resp.status_code != 200:
            raise ConnectionLost("http", f"{path}: HTTP {resp.status_code}")
        try:
            return decode_json(resp.content)
        except SkipFrame as e:
            raise ConnectionLost("bad_response", str(e)) from None

    def prepare(self) -> None:
        self._call("GET", "/me")

    def poll(self, timeout_s: float) -> list:
        return self._call("GET", "/updates", params={"offset": self.offset,
                                                     "timeout": timeout_s})["updates"]

    def on_update(self, update: dict) -> None:
        m = update["message"]
        if m["group"] and not m["to_bot"]:
            return  # in a group, only what is addressed to the bot
        self.deliver(InboundMessage(
            platform=self.name, message_id=m["id"], chat_id=m["chat"], user_id=m["user"],
            text=m["text"], chat_type="group" if m["group"] else "dm",
            reply_ref={"id": m["id"]}))  # REPLAY: raises ConnectionLost if not journaled

    def commit(self, update) -> None:
        if isinstance(update, dict) and isinstance(update.get("id"), int):
            self.offset = max(self.offset, update["id"] + 1)
            self.saved_state.put("offset", str(self.offset))

    def send(self, out: OutboundMessage) -> None:
        try:
            self._call("POST", "/send", json={"chat": out.chat_id, "reply_to": out.in_reply_to,
                                              "text": out.text})
        except (FatalPlatformError, ConnectionLost) as e:
            raise SendError(str(e), retryable=isinstance(e, ConnectionLost)) from None

    def reply_chunk_chars(self) -> int:
        return 500
