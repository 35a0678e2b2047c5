"""The server of the test-only long-polling platform (adapter: tests/fakes/pollchat_adapter.py),
on the fake harness, with its contract `Driver`.

Rules, as a strict long-poll server keeps them (Telegram's getUpdates is the model):
- every call needs `Authorization: Bearer <token>`, else 401;
- `GET /updates?offset=N&timeout=T` answers the updates with id >= N at once, or holds the call
  up to T seconds for one to come; an offset confirms (forgets) every update below it, so an
  update not yet confirmed comes again on the next poll;
- `POST /send {chat, reply_to, text}`: text over `max_text_chars` is refused with 400.
Faults: cut() ends the poll in flight (or the next) with 502; go_silent(s) parks polls unanswered
(the one in flight too) until s has passed, then answers them 502; send_garbage() answers the
poll in flight with a non-JSON body, the next with JSON of the wrong shape, and queues a
malformed update.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

import gevent
import gevent.event

from hermes_green.testing.driver import Keepalive
from hermes_green.testing.harness import FakePlatformServer
from tests.fakes.example_driver import ExampleDriver
from tests.fakes.pollchat_adapter import PollChatAdapter, PollChatConfig


@dataclass
class Poll:
    at: float
    offset: int
    answered_at: float | None = None
    status: int = 0


class FakePollChat(FakePlatformServer):
    def __init__(self, *, token: str = "pollchat-token", max_text_chars: int = 500) -> None:
        super().__init__()
        self.token, self.max_text_chars = token, max_text_chars
        self.updates: list[dict] = []  # not yet confirmed by an offset
        self.messages: dict[str, dict] = {}
        self.replies: list[dict] = []
        self.polls: list[Poll] = []
        self._update_ids = itertools.count(1)
        self._message_ids = itertools.count(1)
        self._news = gevent.event.Event()  # an update came or a fault wants the poll in flight
        self._cuts = 0
        self._garbage: list[Any] = []  # bodies the next polls get instead of updates
        self._parked_until = 0.0
        self._released = gevent.event.Event()
        self._released.set()
        self._release: gevent.Greenlet | None = None
        self._stopping = False

    def stop(self) -> None:
        self._stopping = True
        self._released.set()
        self._news.set()
        super().stop()

    # -- users and faults ----------------------------------------------------------------------
    def user_sends(self, text: str, *, chat: str, user: str, group: bool = False,
                   to_bot: bool = True) -> str:
        mid = f"pm{next(self._message_ids)}"
        self.messages[mid] = {"id": mid, "chat": chat, "user": user, "text": text,
                              "group": group, "to_bot": to_bot}
        self._queue(self.messages[mid])
        return mid

    def requeue(self, mid: str) -> None:
        """The same message as a new update (a platform's redelivery)."""
        self._queue(self.messages[mid])

    def _queue(self, message: Any) -> None:
        self.updates.append({"id": next(self._update_ids), "message": message})
        self._news.set()
        self.changed()

    def cut(self) -> None:
        self._cuts += 1
        self._news.set()

    def go_silent(self, seconds: float) -> None:
        if self._release is not None:
            self._release.kill(block=False)
        self._parked_until = time.monotonic() + seconds
        if seconds <= 0:
            self._released.set()
            return
        self._released.clear()
        self._news.set()
        self._release = gevent.spawn_later(seconds, self._released.set)
        self._release.name = "fake-pollchat:silence"

    def send_garbage(self) -> None:
        self._garbage += [b"<html>502 Bad Gateway</html>", {"result": "not the updates"}]
        self._queue("}{ not a message")

    # -- HTTP ----------------------------------------------------------------------------------
    def routes(self):
        return {("GET", "/me"): self._me, ("GET", "/updates"): self._poll,
                ("POST", "/send"): self._send}

    def _refused(self, request: dict) -> tuple | None:
        if request["headers"].get("Authorization") != f"Bearer {self.token}":
            return 401, {"error": "unauthorized"}
        return None

    def _me(self, request: dict) -> tuple:
        return self._refused(request) or (200, {"id": "bot", "name": "pollchat"})

    def _poll(self, request: dict) -> tuple:
        refused = self._refused(request)
        if refused:
            return refused
        query = parse_qs(request["query"])
        offset = int(query.get("offset", ["0"])[0])
        timeout = min(float(query.get("timeout", ["0"])[0]), 30.0)
        poll = Poll(time.monotonic(), offset)
        self.polls.append(poll)
        self.changed()
        poll.status, body = self._answer(offset, timeout)
        poll.answered_at = time.monotonic()
        self.changed()
        return poll.status, body

    def _answer(self, offset: int, timeout: float) -> tuple[int, Any]:
        self.updates = [u for u in self.updates if u["id"] >= offset]
        deadline = time.monotonic() + timeout
        while True:
            if self._parked_until > time.monotonic() and not self._stopping:
                self._released.wait()
                return 502, {"error": "bad gateway"}
            if self._cuts:
                self._cuts -= 1
                return 502, {"error": "bad gateway"}
            if self._garbage:
                return 200, self._garbage.pop(0)
            remaining = deadline - time.monotonic()
            if self.updates or remaining <= 0 or self._stopping:
                return 200, {"updates": list(self.updates)}
            self._news.clear()
            self._news.wait(remaining)

    def _send(self, request: dict) -> tuple:
        refused = self._refused(request)
        if refused:
            return refused
        body = request["json"] or {}
        if not isinstance(body.get("text"), str) or len(body["text"]) > self.max_text_chars:
            return 400, {"error": "text missing or too long"}
        self.replies.append({**body, "at": time.monotonic()})
        self.changed()
        return 200, {"ok": True}


class Driver(ExampleDriver):
    platform = "pollchat"
    max_reply_chars = 500

    def __init__(self, keepalive: Keepalive | None = None, *, secret: str | None = None) -> None:
        super().__init__(keepalive, secret=secret)
        self.fake = FakePollChat(token=secret or "pollchat-token")

    def bot_config(self, **extra: Any) -> dict:
        return {"base_url": self.fake.http_base, "token": self.fake.token,
                "poll_timeout_s": self.keepalive.interval_s, **extra}

    def adapter_factory(self, section: dict):
        config = PollChatConfig.model_validate(section)
        return lambda cfg, on_message, **kw: PollChatAdapter(config, on_message, **kw)

    def redeliver(self, message_id: str) -> None:
        self.fake.requeue(message_id)

    def drop(self) -> None:
        self.fake.cut()

    def send_garbage(self) -> None:
        self.fake.send_garbage()

    def lateness(self) -> list[float]:
        """How long after one poll's answer the next poll came."""
        polls = [p for p in self.fake.polls if p.answered_at is not None]
        return [max(0.0, b.at - a.answered_at) for a, b in zip(polls, polls[1:])]

    def session_up_at(self, conn_id: int) -> float | None:
        return self.fake.polls[0].at if self.fake.polls else None

    def connected(self) -> bool:
        last = self.fake.polls[-1] if self.fake.polls else None
        return last is not None and (last.answered_at is None
                                     or time.monotonic() - last.answered_at < 2.0)
