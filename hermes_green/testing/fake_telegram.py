"""A strict fake of the Telegram Bot API (long polling side), as the real server speaks it.

Every call is `{http_base}/bot{token}/{method}` (GET or POST; parameters in the query string, a
form body or a JSON body); every answer is `{"ok": true, "result": ...}` or `{"ok": false,
"error_code", "description"[, "parameters"]}`. The rules below are taken from the server's own
source, tdlib/telegram-bot-api (`telegram-bot-api/Client.cpp` unless named otherwise), and from
the Bot API reference (core.telegram.org/bots/api); each rule cites where it comes from.

What it enforces:
- auth: a malformed token -> 401 "Unauthorized: invalid token specified"; a well-formed unknown
  (or revoked) token -> 401 "Unauthorized" (ClientManager.cpp ClientManager::send;
  Client::get_closing_error). Unknown method -> 404 "Not Found: method not found". Method names
  are case-insensitive (Client::init_methods keys are lower case).
- getUpdates (Client::process_get_updates_query, Client::do_get_updates): `offset` confirms and
  forgets every update below it; unconfirmed updates come again; a negative offset keeps only
  the last -offset; `limit` clamped to 1..100; `timeout` clamped to 0..50 s and parsed as an
  integer; with nothing to return and timeout > 0 the call is held until an update arrives or the
  timeout passes. A new held poll terminates the one already held (one poller per token) with
  409 "Conflict: terminated by other getUpdates request; make sure that only one bot instance is
  running" (Client::abort_long_poll) -- the OLDER request gets it. A 409 answered within 3 s of
  the previous one is delayed 3 s (Client::fail_query_conflict; `conflict_throttle_s`).
  While a webhook is set: 409 "Conflict: can't use getUpdates method while webhook is active;
  use deleteWebhook to delete the webhook first"; setWebhook ends a held poll with 409
  "Conflict: terminated by setWebhook request". `allowed_updates` is remembered; updates of
  other kinds created after the call are not queued (docs: getUpdates.allowed_updates).
- 429 (Query.cpp Query::set_retry_after_error; HttpConnection.cpp send_response):
  {"error_code": 429, "description": "Too Many Requests: retry after N", "parameters":
  {"retry_after": N}} plus a `Retry-After: N` header. Injected with `flood()` / `rest_429()`,
  or produced by the optional per-chat send limit (`chat_limit`, the FAQ's ~1 message/s/chat).
- sendMessage / editMessageText text (Client::get_input_message_text; tdlib/td
  td/telegram/MessageContent.cpp, td/telegram/MessageEntity.cpp): missing/empty text -> 400
  "Bad Request: message text is empty"; only whitespace -> 400 "Bad Request: text must be
  non-empty"; more than `max_text_chars` (4096) code points after trimming -> 400 "Bad Request:
  message is too long" (td counts utf8_length, i.e. code points, for bots).
- chats: the bot can only write to chats it has seen (a user wrote there) -> else 400 "Bad
  Request: chat not found".
- replies (Client::check_reply_parameters / TdOnCheckMessageCallback): `reply_parameters
  .message_id` (or the old `reply_to_message_id`) unknown in that chat -> 400 "Bad Request:
  message to be replied not found", unless `allow_sending_without_reply` (then sent plain).
- editMessageText (tdlib/td MessagesManager.cpp can_edit_message; Client.cpp error mapping):
  unknown message -> 400 "Bad Request: message to edit not found"; not the bot's own -> 400
  "Bad Request: message can't be edited"; same text -> 400 "Bad Request: message is not
  modified: specified new message content and reply markup are exactly the same as a current
  content and reply markup of the message".
- sendChatAction (Client::process_send_chat_action_query): unknown action -> 400 "Bad Request:
  wrong parameter action in request"; the status shows for 5 s or until the bot's next message
  (docs: sendChatAction) -- `typing_visible(chat, at)` answers whether it was on.
- deleteWebhook(drop_pending_updates) forgets the queue when asked (docs: deleteWebhook).

Media (Bot API getFile / sendPhoto / sendDocument; Client.cpp for the errors):
- `user_sends_media(data, kind=photo|document|voice, ...)`: a message with `photo` (PhotoSize
  list), `document` {file_id, file_name, mime_type, file_size} or `voice` {file_id, duration,
  mime_type, file_size}; getFile(file_id) -> {file_id, file_unique_id, file_size, file_path},
  400 "Bad Request: file is too big" past 20 MB, 400 "Bad Request: invalid file_id" for an
  unknown one; the bytes at GET {http_base}/file/bot<token>/<file_path>.
- sendPhoto / sendDocument take multipart/form-data (or a file_id string): photos up to 10 MB,
  documents up to 50 MB (413 "Request Entity Too Large" beyond); `fake.files` records each;
  hold_file_sends()/release_file_sends() hold them unprocessed.

Not modelled: the server's anti-tight-loop clamps for repeated short polls with one offset
(Client::process_get_updates_query raises timeout to 3 s, limit to 1), the 24 h update TTL,
parse_mode markup (length counts the raw text), media, group -> supergroup migration.

Use from tests, the demo and benchmarks:
    fake = FakeTelegramServer().start()                 # one bot; fake.token, fake.username
    fake.add_bot("777:OTHER", "other_bot")              # more bots on the same server
    mid = fake.user_sends("hi")                         # a private message; returns message_id
    fake.user_sends("hey @hermes_test_bot", chat=fake.group(), user=fake.user(2))
    fake.user_sends("/ask@hermes_test_bot what?", chat=fake.group())
    fake.user_sends("sure", chat=fake.group(), reply_to=bot_message_id)
    fake.user_edits(chat, mid, "new text"); fake.user_sends_sticker(chat); fake.inject_update({...})
    fake.sent_messages(chat=None)  fake.replies_to(chat, mid)  fake.chat_actions  fake.edits
    fake.calls (every API call: ApiCall)  fake.poll_calls(token)  fake.conflicts
    faults: flood(n, retry_after, method=), rest_429(), fail_next(method, status, description, n),
            garbage_next(method, body, n), set_webhook(url), revoke(token), start_rival_poller()
            plus the harness's refuse_connections() / rest_delay_s.
"""
from __future__ import annotations

import json
import logging
import re
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event

from .driver import Keepalive, PlatformDriver, ReplyRow, SentFile
from .harness import FakePlatformServer, parse_multipart

DEFAULT_TOKEN = "123456789:AAH-fake-telegram-token-for-tests-0001"
MAX_TEXT_CHARS = 4096  # tdlib/td OptionManager.cpp message_text_length_max default
LONG_POLL_MAX_TIMEOUT = 50  # telegram-bot-api/Client.h LONG_POLL_MAX_TIMEOUT
CONFLICT_OTHER_POLL = ("Conflict: terminated by other getUpdates request; make sure that only "
                       "one bot instance is running")
CONFLICT_WEBHOOK = ("Conflict: can't use getUpdates method while webhook is active; use "
                    "deleteWebhook to delete the webhook first")
CONFLICT_SET_WEBHOOK = "Conflict: terminated by setWebhook request"
NOT_MODIFIED = ("Bad Request: message is not modified: specified new message content and reply "
                "markup are exactly the same as a current content and reply markup of the message")
# docs: sendChatAction.action
CHAT_ACTIONS = {"typing", "upload_photo", "record_video", "upload_video", "record_voice",
                "upload_voice", "upload_document", "choose_sticker", "find_location",
                "record_video_note", "upload_video_note"}
# docs: getUpdates.allowed_updates -- "an empty list ... all update types except chat_member,
# message_reaction, and message_reaction_count (default)"
_NOT_BY_DEFAULT = {"chat_member", "message_reaction", "message_reaction_count"}
TYPING_SECONDS = 5.0  # docs: sendChatAction "The status is set for 5 seconds or less"
DOWNLOAD_LIMIT = 20 * 1024 * 1024  # docs: getFile "files of up to 20MB in size"
PHOTO_LIMIT = 10 * 1024 * 1024  # docs: sendPhoto "The photo must be at most 10 MB in size"
UPLOAD_LIMIT = 50 * 1024 * 1024  # docs: sendDocument "up to 50 MB in size"
_COMMAND = re.compile(r"(?<!\S)/[A-Za-z0-9_]{1,32}(?:@[A-Za-z0-9_]{3,32})?")
_MENTION = re.compile(r"(?<![\w@])@[A-Za-z0-9_]{3,32}")


class _Answer(Exception):
    """Ends a request early with an error answer."""

    def __init__(self, status: int, description: str, parameters: dict | None = None) -> None:
        super().__init__(description)
        self.status, self.description, self.parameters = status, description, parameters


@dataclass
class ApiCall:
    at: float  # time.monotonic() when the call arrived
    token: str = field(repr=False)
    method: str  # lower case, as the server dispatches it
    params: dict
    status: int = 0  # 0 while a long poll is still held
    description: str = ""
    rival: bool = False  # made by start_rival_poller(), not by the client under test
    answered_at: float = 0.0


@dataclass
class SentMessage:
    chat_id: int
    message_id: int
    text: str
    reply_to: int | None  # message_id it replies to (None: a plain message)
    at: float
    token: str = field(repr=False)
    edits: list[str] = field(default_factory=list)  # texts after each accepted edit


@dataclass
class _Poll:
    """The one held getUpdates of a bot (Client::long_poll_query_)."""
    event: gevent.event.Event = field(default_factory=gevent.event.Event)
    ended: bool = False
    conflict: str | None = None  # ended by another poller / setWebhook: answer 409
    failure: tuple[int, str] | None = None  # a fault: the held poll is answered with this


@dataclass
class Bot:
    token: str
    id: int
    username: str
    first_name: str
    queue: list[dict] = field(default_factory=list)  # unconfirmed updates, by update_id
    next_update_id: int = 0
    allowed: set[str] | None = None  # None: the default set
    webhook_url: str = ""
    poll: _Poll | None = None
    last_conflict_at: float = -1e9
    revoked: bool = False
    chats: dict[int, dict] = field(default_factory=dict)  # chat id -> Chat object
    messages: dict[tuple[int, int], dict] = field(default_factory=dict)  # (chat, mid) -> Message
    next_message_id: dict[int, int] = field(default_factory=dict)


class FakeTelegramServer(FakePlatformServer):
    def __init__(self, *, token: str = DEFAULT_TOKEN, username: str = "hermes_test_bot",
                 first_name: str = "Hermes", privacy_mode: bool = False,
                 conflict_throttle_s: float = 3.0, max_text_chars: int = MAX_TEXT_CHARS,
                 chat_limit: tuple[int, float] | None = None,
                 first_update_id: int = 100_000_001) -> None:
        super().__init__()
        self.token = token
        self.username = username
        self.privacy_mode = privacy_mode  # reported by getMe; the fake delivers everything
        self.conflict_throttle_s = conflict_throttle_s
        self.max_text_chars = max_text_chars
        self.chat_limit = chat_limit  # (messages, per seconds) per chat, else no natural 429
        self.first_update_id = first_update_id
        self.bots: dict[str, Bot] = {}
        # records
        self.calls: list[ApiCall] = []
        self.sent: list[SentMessage] = []
        self.edits: list[tuple[float, int, int, str]] = []  # (at, chat, message_id, text)
        self.chat_actions: list[tuple[float, int, str]] = []  # (at, chat, action)
        self.conflicts: list[tuple[float, str, str]] = []  # (at, token, description)
        self.dropped_updates: list[dict] = []  # not queued: kind not in allowed_updates
        # faults
        self._flood: list[tuple[float, str | None]] = []
        self._fail: list[tuple[str, int, str]] = []
        self._garbage: list[tuple[str, bytes]] = []
        self._rivals: list[gevent.Greenlet] = []
        self._polls_open = gevent.event.Event()
        self._polls_open.set()
        self._hold_above: int | None = None
        self._polls_discard = False
        # media
        self.stored_files: dict[str, tuple[bytes, str]] = {}  # file_id -> (data, file_path)
        self.files: list[SentFile] = []
        self.file_uploads = 0
        self.held_sends = 0
        self._release = gevent.event.Event()
        self._release.set()
        self.add_bot(token, username, first_name)

    # -- bots, users and chats ---------------------------------------------------------------
    def add_bot(self, token: str, username: str, first_name: str = "Bot") -> Bot:
        bot = Bot(token=token, id=int(token.split(":", 1)[0]), username=username,
                  first_name=first_name, next_update_id=self.first_update_id)
        self.bots[token] = bot
        return bot

    def bot(self, token: str | None = None) -> Bot:
        return self.bots[token or self.token]

    def user(self, n: int = 1, *, username: str | None = None, first_name: str | None = None
             ) -> dict:
        """A Telegram User object (docs: User). Users 1.. have stable ids."""
        return {"id": 4_000_000 + n, "is_bot": False, "first_name": first_name or f"User{n}",
                "username": username or f"user{n}", "language_code": "en"}

    def private_chat(self, user: dict | None = None) -> dict:
        user = user or self.user()
        return {"id": user["id"], "type": "private", "first_name": user["first_name"],
                "username": user["username"]}

    def group(self, n: int = 1, *, supergroup: bool = True) -> dict:
        """A group chat (docs: Chat): supergroup ids look like -100xxxxxxxxxx."""
        if supergroup:
            return {"id": -1_001_000_000_000 - n, "type": "supergroup", "title": f"Group {n}"}
        return {"id": -4_000_000_000 - n, "type": "group", "title": f"Group {n}"}

    # -- what users do -----------------------------------------------------------------------
    def user_sends(self, text: str, *, chat: dict | None = None, user: dict | None = None,
                   reply_to: int | None = None, entities: list[dict] | None = None,
                   token: str | None = None, extra: dict | None = None) -> int:
        """A user writes `text` in `chat` (default: a private chat with user 1). `mention` and
        `bot_command` entities are found in the text as Telegram marks them (offsets in UTF-16
        code units, docs: MessageEntity); `reply_to` makes it a reply to that message of the
        chat (the bot's or a user's). Returns the new message_id."""
        user = user or self.user()
        chat = chat or self.private_chat(user)
        message = self._new_message(token, chat, user, extra)
        message["text"] = text
        ents = _entities(text) if entities is None else entities
        if ents:
            message["entities"] = ents
        if reply_to is not None:
            original = self.bot(token).messages.get((chat["id"], reply_to))
            if original is None:
                raise ValueError(f"no message {reply_to} in chat {chat['id']}")
            message["reply_to_message"] = {k: v for k, v in original.items()
                                           if k != "reply_to_message"}
        self._store_and_queue(token, message, "message")
        return message["message_id"]

    def user_sends_sticker(self, *, chat: dict | None = None, user: dict | None = None,
                           token: str | None = None) -> int:
        """A message without text (a sticker): bots must skip it."""
        user = user or self.user()
        chat = chat or self.private_chat(user)
        message = self._new_message(token, chat, user, {"sticker": {
            "file_id": "CAACAgIAAxkBAAEfake", "file_unique_id": "AgADfake", "type": "regular",
            "width": 512, "height": 512, "is_animated": False, "is_video": False,
            "emoji": "\U0001F44D"}})
        self._store_and_queue(token, message, "message")
        return message["message_id"]

    def user_sends_media(self, data: bytes, kind: str = "photo", *, chat: dict | None = None,
                         user: dict | None = None, file_name: str = "file",
                         mime_type: str = "application/octet-stream", caption: str = "",
                         token: str | None = None) -> int:
        file_id = f"AgAC{uuid.uuid4().hex}"
        folder = {"photo": "photos", "voice": "voice", "document": "documents"}[kind]
        self.stored_files[file_id] = (data, f"{folder}/file_{len(self.stored_files)}"
                                            f"{'.jpg' if kind == 'photo' else ''}")
        meta = {"file_id": file_id, "file_unique_id": file_id[-12:], "file_size": len(data)}
        if kind == "photo":
            extra: dict = {"photo": [dict(meta, width=640, height=480)]}
        elif kind == "voice":
            extra = {"voice": dict(meta, duration=2, mime_type=mime_type)}
        else:
            extra = {"document": dict(meta, file_name=file_name, mime_type=mime_type)}
        if caption:
            extra["caption"] = caption
        user = user or self.user()
        message = self._new_message(token, chat or self.private_chat(user), user, extra)
        self._store_and_queue(token, message, "message")
        return message["message_id"]

    def hold_file_sends(self) -> None:
        self._release.clear()

    def release_file_sends(self) -> None:
        self._release.set()

    def user_edits(self, chat: dict, message_id: int, text: str, *,
                   token: str | None = None) -> None:
        """An `edited_message` update for a user's message (docs: Update.edited_message)."""
        bot = self.bot(token)
        message = dict(bot.messages[(chat["id"], message_id)])
        message.update(text=text, edit_date=int(time.time()))
        ents = _entities(text)
        if ents:
            message["entities"] = ents
        bot.messages[(chat["id"], message_id)] = message
        self._queue(bot, {"edited_message": message})

    def inject_update(self, update: dict, *, token: str | None = None,
                      force: bool = False) -> int:
        """Queue any update object (an unknown kind, a malformed message...). update_id is added
        when missing. `force` bypasses allowed_updates, as a new kind of update would."""
        bot = self.bot(token)
        return self._queue(bot, dict(update), force=force)

    # -- records ------------------------------------------------------------------------------
    def sent_messages(self, chat: int | dict | None = None, token: str | None = None
                      ) -> list[SentMessage]:
        chat_id = chat["id"] if isinstance(chat, dict) else chat
        token = token or self.token
        return [m for m in self.sent if m.token == token
                and (chat_id is None or m.chat_id == chat_id)]

    def replies_to(self, chat: int | dict, message_id: int, token: str | None = None
                   ) -> list[SentMessage]:
        return [m for m in self.sent_messages(chat, token) if m.reply_to == message_id]

    def poll_calls(self, token: str | None = None, *, rival: bool | None = False
                   ) -> list[ApiCall]:
        token = token or self.token
        return [c for c in self.calls if c.method == "getupdates" and c.token == token
                and (rival is None or c.rival == rival)]

    def calls_of(self, method: str, token: str | None = None) -> list[ApiCall]:
        token = token or self.token
        return [c for c in self.calls if c.method == method.lower() and c.token == token]

    def pending_updates(self, token: str | None = None) -> list[dict]:
        """Updates not yet confirmed by an offset above them."""
        return list(self.bot(token).queue)

    def typing_visible(self, chat: int | dict, at: float) -> bool:
        """Whether the chat showed "typing" at monotonic time `at`: an action was sent within the
        5 s before it and no bot message to that chat came between (docs: sendChatAction)."""
        chat_id = chat["id"] if isinstance(chat, dict) else chat
        started = [t for t, c, a in self.chat_actions if c == chat_id and a == "typing"
                   and t <= at < t + TYPING_SECONDS]
        if not started:
            return False
        last = max(started)
        return not any(m.chat_id == chat_id and last < m.at <= at for m in self.sent)

    # -- faults -------------------------------------------------------------------------------
    def flood(self, times: int = 1, retry_after: float = 1, method: str | None = None) -> None:
        """The next `times` calls (of `method`, or any) answer 429 with retry_after."""
        self._flood.extend([(retry_after, method.lower() if method else None)] * times)

    def rest_429(self, times: int = 1, retry_after: float = 1.0) -> None:
        """The harness's generic fault, in Telegram's shape."""
        self.flood(times, retry_after)

    def fail_next(self, method: str, status: int = 500,
                  description: str = "Internal Server Error", times: int = 1) -> None:
        self._fail.extend([(method.lower(), status, description)] * times)

    def garbage_next(self, method: str, body: bytes = b"<html>502 Bad Gateway</html>",
                     times: int = 1) -> None:
        """The next calls of `method` get `body` (not JSON) with status 200."""
        self._garbage.extend([(method.lower(), body)] * times)

    def hold_polls(self, confirming: int = 0) -> None:
        """getUpdates calls arriving from now on whose offset would confirm update `confirming`
        (offset > it; 0: every call) are parked before the server reads them, confirming
        nothing, until release_polls()."""
        self._hold_above = confirming
        self._polls_discard = False
        self._polls_open.clear()

    def release_polls(self, *, discard: bool = False) -> None:
        """Let parked polls through; `discard`: drop them unread, as if they never arrived (the
        client died before sending them), answering 502."""
        self._polls_discard = discard
        self._polls_open.set()

    def parked_polls(self, token: str | None = None) -> list[ApiCall]:
        return [c for c in self.poll_calls(token) if c.status == 0 and c.description == "parked"]

    def fail_poll_in_flight(self, status: int = 502, description: str = "Bad Gateway",
                            token: str | None = None) -> bool:
        """The held poll ends at once with an error (a proxy in front of the API died), as a
        connection cut would end it for the client. False when no poll was held."""
        poll = self.bot(token).poll
        if poll is None:
            return False
        poll.failure, poll.ended = (status, description), True
        poll.event.set()
        return True

    def set_webhook(self, url: str, token: str | None = None) -> None:
        """Someone set a webhook for the bot (polling gets 409 until deleteWebhook)."""
        bot = self.bot(token)
        bot.webhook_url = url
        self._abort_poll(bot, CONFLICT_SET_WEBHOOK)

    def revoke(self, token: str | None = None) -> None:
        """The token was revoked in @BotFather: every later call gets 401."""
        bot = self.bot(token)
        bot.revoked = True
        self._abort_poll(bot, None)

    def start_rival_poller(self, token: str | None = None, *, timeout: int = 1,
                           rounds: int = 1_000_000) -> gevent.Greenlet:
        """Another bot instance on the same token: it long-polls in a loop (its own calls are
        recorded with rival=True). Stop it with stop_rivals()."""
        bot = self.bot(token)

        def rival() -> None:
            offset = 0
            for _ in range(rounds):
                params = {"offset": offset, "timeout": timeout}
                call = self._record(bot.token, "getupdates", params, rival=True)
                try:
                    _, body = self._get_updates(bot, params, call)
                except _Answer as exc:
                    self._error(call, exc)
                    gevent.sleep(0.05)
                    continue
                self._finish(call, 200, body)
                if body["result"]:
                    offset = body["result"][-1]["update_id"] + 1
        g = gevent.spawn(rival)
        g.name = "fake_telegram:rival_poller"
        self._rivals.append(g)
        return g

    def stop_rivals(self) -> None:
        gevent.killall(self._rivals, timeout=2)
        self._rivals.clear()

    def start(self) -> "FakeTelegramServer":
        super().start()
        # geventwebsocket's handler logs each request line ("POST /bot<token>/getUpdates") on
        # the server's `logger`: give it one that masks the token, like the product does.
        access = logging.getLogger("hermes_green.testing.fake_telegram.access")
        if not any(isinstance(f, _MaskTokenPaths) for f in access.filters):
            access.addFilter(_MaskTokenPaths())
        self._server.logger = access
        return self

    def stop(self) -> None:
        self.stop_rivals()
        for bot in self.bots.values():
            self._abort_poll(bot, None)
        super().stop()

    # -- HTTP ---------------------------------------------------------------------------------
    def routes(self):
        return {("GET", "/bot"): self._api, ("POST", "/bot"): self._api,
                ("GET", "/file/bot"): self._file}

    def _file(self, request: dict) -> tuple:
        """GET /file/bot<token>/<file_path>: the bytes getFile pointed at."""
        token, _, path = request["path"][len("/file/bot"):].partition("/")
        bot = self.bots.get(token)
        found = next((d for d, p in self.stored_files.values() if p == path), None)
        if bot is None or found is None:
            return 404, {"ok": False, "error_code": 404, "description": "Not Found"}
        return 200, found, {"Content-Type": "application/octet-stream"}

    def _api(self, request: dict) -> tuple:
        path = request["path"][len("/bot"):]
        token, _, method = path.partition("/")
        method = method.lower()
        try:
            params = _params(request)
        except _Answer as exc:
            return self._error(self._record(token, method, {}), exc)
        call = self._record(token, method, params)
        try:
            bot = self._auth(token)
            handler = self._methods().get(method)
            if handler is None:
                raise _Answer(404, "Not Found: method not found")
            for i, (m, body) in enumerate(self._garbage):
                if m == method:
                    del self._garbage[i]
                    return self._finish(call, 200, body)
            self._injected(method)
            status, body = handler(bot, params, call)
        except _Answer as exc:
            return self._error(call, exc)
        return self._finish(call, status, body)

    def _methods(self) -> dict:
        return {"getme": self._get_me, "getupdates": self._get_updates,
                "deletewebhook": self._delete_webhook, "setwebhook": self._set_webhook,
                "getwebhookinfo": self._get_webhook_info, "sendmessage": self._send_message,
                "editmessagetext": self._edit_message_text,
                "sendchataction": self._send_chat_action, "getfile": self._get_file,
                "sendphoto": self._send_photo, "senddocument": self._send_document}

    def _record(self, token: str, method: str, params: dict, *, rival: bool = False) -> ApiCall:
        call = ApiCall(time.monotonic(), token, method, params, rival=rival)
        self.calls.append(call)
        self.changed()
        return call

    def _finish(self, call: ApiCall, status: int, body: Any, headers: dict | None = None
                ) -> tuple:
        call.status, call.answered_at = status, time.monotonic()
        if isinstance(body, dict) and not body.get("ok", True):
            call.description = body.get("description", "")
        self.changed()
        return (status, body, headers or {})

    def _error(self, call: ApiCall, exc: _Answer) -> tuple:
        body: dict[str, Any] = {"ok": False, "error_code": exc.status,
                                "description": exc.description}
        headers = {}
        if exc.parameters:
            body["parameters"] = exc.parameters
            if "retry_after" in exc.parameters:
                headers["Retry-After"] = f"{exc.parameters['retry_after']:g}"
        return self._finish(call, exc.status, body, headers)

    def _auth(self, token: str) -> Bot:
        # ClientManager.cpp ClientManager::send: shape check first, then the bot must exist.
        if (not token or token[0] == "0" or len(token) > 80 or "/" in token
                or ":" not in token):
            raise _Answer(401, "Unauthorized: invalid token specified")
        bot = self.bots.get(token)
        if bot is None or bot.revoked:
            raise _Answer(401, "Unauthorized")
        return bot

    def _injected(self, method: str) -> None:
        for i, (retry_after, m) in enumerate(self._flood):
            if m is None or m == method:
                del self._flood[i]
                raise _Answer(429, f"Too Many Requests: retry after {retry_after:g}",
                              {"retry_after": retry_after})
        for i, (m, status, description) in enumerate(self._fail):
            if m == method:
                del self._fail[i]
                raise _Answer(status, description)

    # -- methods ------------------------------------------------------------------------------
    def _get_me(self, bot: Bot, params: dict, call: ApiCall) -> tuple:
        return 200, _ok({"id": bot.id, "is_bot": True, "first_name": bot.first_name,
                         "username": bot.username, "can_join_groups": True,
                         "can_read_all_group_messages": not self.privacy_mode,
                         "supports_inline_queries": False})

    def _get_updates(self, bot: Bot, params: dict, call: ApiCall) -> tuple:
        if not self._polls_open.is_set() and _int(params.get("offset"), 0) > self._hold_above:
            call.description = "parked"
            self.changed()
            self._polls_open.wait()
            call.description = ""
            if self._polls_discard:
                raise _Answer(502, "Bad Gateway")  # never read: it confirmed nothing
        if bot.webhook_url:
            self._conflict(bot, CONFLICT_WEBHOOK)
        offset = _int(params.get("offset"), 0)
        limit = min(max(_int(params.get("limit"), 100), 1), 100)
        timeout = min(max(_int(params.get("timeout"), 0), 0), LONG_POLL_MAX_TIMEOUT)
        if "allowed_updates" in params:
            allowed = params["allowed_updates"]
            if not isinstance(allowed, list):
                raise _Answer(400, "Bad Request: can't parse allowed updates")
            bot.allowed = set(allowed) if allowed else None
        self._confirm(bot, offset)
        deadline = time.monotonic() + timeout
        poll: _Poll | None = None
        try:
            while True:
                if bot.revoked:
                    raise _Answer(401, "Unauthorized")
                if bot.queue or timeout == 0:
                    return 200, _ok(bot.queue[:limit])
                if poll is None:  # Client::do_get_updates: a new held poll ends the old one
                    self._abort_poll(bot, CONFLICT_OTHER_POLL)
                    poll = bot.poll = _Poll()
                if poll.conflict is not None:
                    self._conflict(bot, poll.conflict)
                if poll.failure is not None:
                    raise _Answer(*poll.failure)
                remaining = deadline - time.monotonic()
                if remaining <= 0 or poll.ended:
                    return 200, _ok([])
                poll.event.clear()
                poll.event.wait(remaining)
        finally:
            if poll is not None and bot.poll is poll:
                bot.poll = None

    def _abort_poll(self, bot: Bot, conflict: str | None) -> None:
        """End the held poll: with a 409 `conflict`, or (None) with an empty answer."""
        poll, bot.poll = bot.poll, None
        if poll is not None:
            poll.conflict, poll.ended = conflict, True
            poll.event.set()

    def _conflict(self, bot: Bot, description: str) -> None:
        # Client::fail_query_conflict: at most one 409 per 3 s; later ones wait 3 s first.
        now = time.monotonic()
        if now < bot.last_conflict_at + self.conflict_throttle_s:
            gevent.sleep(self.conflict_throttle_s)
        else:
            bot.last_conflict_at = now
        self.conflicts.append((time.monotonic(), bot.token, description))
        raise _Answer(409, description)

    def _confirm(self, bot: Bot, offset: int) -> None:
        # Client::do_get_updates: offset < 0 keeps the last -offset; offset > 0 forgets below it
        if offset < 0:
            bot.queue = bot.queue[offset:]
        elif offset > 0:
            bot.queue = [u for u in bot.queue if u["update_id"] >= offset]

    def _delete_webhook(self, bot: Bot, params: dict, call: ApiCall) -> tuple:
        had = bool(bot.webhook_url)
        bot.webhook_url = ""
        if _bool(params.get("drop_pending_updates")):
            bot.queue.clear()
        return 200, {"ok": True, "result": True,
                     "description": "Webhook was deleted" if had else "Webhook is already deleted"}

    def _set_webhook(self, bot: Bot, params: dict, call: ApiCall) -> tuple:
        url = params.get("url") or ""
        if not url:
            return self._delete_webhook(bot, params, call)
        self.set_webhook(str(url), bot.token)
        return 200, {"ok": True, "result": True, "description": "Webhook was set"}

    def _get_webhook_info(self, bot: Bot, params: dict, call: ApiCall) -> tuple:
        return 200, _ok({"url": bot.webhook_url, "has_custom_certificate": False,
                         "pending_update_count": len(bot.queue)})

    def _send_message(self, bot: Bot, params: dict, call: ApiCall) -> tuple:
        chat = self._chat(bot, params)
        text = self._text(params)
        reply = params.get("reply_parameters")
        if reply is not None and not isinstance(reply, dict):
            raise _Answer(400, "Bad Request: can't parse reply parameters JSON object")
        reply = dict(reply or {})
        if "message_id" not in reply and params.get("reply_to_message_id") is not None:
            reply["message_id"] = params["reply_to_message_id"]
            reply.setdefault("allow_sending_without_reply",
                             params.get("allow_sending_without_reply"))
        reply_id = _int(reply.get("message_id"), 0)
        original = bot.messages.get((chat["id"], reply_id)) if reply_id > 0 else None
        if reply_id > 0 and original is None:
            if not _bool(reply.get("allow_sending_without_reply")):
                raise _Answer(400, "Bad Request: message to be replied not found")
            reply_id = 0
        self._chat_rate(bot, chat["id"])
        me = {"id": bot.id, "is_bot": True, "first_name": bot.first_name,
              "username": bot.username}
        message = self._new_message(bot.token, chat, me)
        message["text"] = text
        if original is not None:
            message["reply_to_message"] = {k: v for k, v in original.items()
                                           if k != "reply_to_message"}
        bot.messages[(chat["id"], message["message_id"])] = message
        self.sent.append(SentMessage(chat["id"], message["message_id"], text,
                                     reply_id or None, time.monotonic(), bot.token))
        return 200, _ok(message)

    def _edit_message_text(self, bot: Bot, params: dict, call: ApiCall) -> tuple:
        text = self._text(params)
        chat = self._chat(bot, params)
        key = (chat["id"], _int(params.get("message_id"), 0))
        message = bot.messages.get(key)
        if message is None:
            raise _Answer(400, "Bad Request: message to edit not found")
        if message.get("from", {}).get("id") != bot.id:
            raise _Answer(400, "Bad Request: message can't be edited")
        if message.get("text") == text:
            raise _Answer(400, NOT_MODIFIED)
        message = dict(message, text=text, edit_date=int(time.time()))
        bot.messages[key] = message
        self.edits.append((time.monotonic(), key[0], key[1], text))
        for sent in self.sent:
            if sent.token == bot.token and (sent.chat_id, sent.message_id) == key:
                sent.edits.append(text)
        return 200, _ok(message)

    def _get_file(self, bot: Bot, params: dict, call: ApiCall) -> tuple:
        stored = self.stored_files.get(str(params.get("file_id") or ""))
        if stored is None:
            raise _Answer(400, "Bad Request: invalid file_id")
        if len(stored[0]) > DOWNLOAD_LIMIT:
            raise _Answer(400, "Bad Request: file is too big")
        return 200, _ok({"file_id": params["file_id"], "file_unique_id": params["file_id"][-12:],
                         "file_size": len(stored[0]), "file_path": stored[1]})

    def _send_photo(self, bot: Bot, params: dict, call: ApiCall) -> tuple:
        return self._send_media(bot, params, "photo", PHOTO_LIMIT)

    def _send_document(self, bot: Bot, params: dict, call: ApiCall) -> tuple:
        return self._send_media(bot, params, "document", UPLOAD_LIMIT)

    def _send_media(self, bot: Bot, params: dict, field_name: str, limit: int) -> tuple:
        upload = params.get(field_name)
        if upload is None or upload == "":
            raise _Answer(400, f"Bad Request: there is no {field_name} in the request")
        if isinstance(upload, str):  # a file_id or URL: not what our bot sends
            raise _Answer(400, "Bad Request: wrong file identifier/HTTP URL specified")
        self.file_uploads += 1  # upload and send are one request here
        if not self._release.is_set():
            self.held_sends += 1
            self.changed()
            self._release.wait()
            raise _Answer(502, "Bad Gateway")
        if len(upload.data) > limit:
            raise _Answer(413, "Request Entity Too Large")
        chat = self._chat(bot, params)
        reply = params.get("reply_parameters") if isinstance(params.get("reply_parameters"),
                                                              dict) else {}
        reply_id = _int(reply.get("message_id"), 0)
        if reply_id and (chat["id"], reply_id) not in bot.messages:
            if not _bool(reply.get("allow_sending_without_reply")):
                raise _Answer(400, "Bad Request: message to be replied not found")
            reply_id = 0
        me = {"id": bot.id, "is_bot": True, "first_name": bot.first_name,
              "username": bot.username}
        message = self._new_message(bot.token, chat, me)
        file_id = f"BQAC{uuid.uuid4().hex}"
        message[field_name] = ([{"file_id": file_id, "file_size": len(upload.data)}]
                               if field_name == "photo" else
                               {"file_id": file_id, "file_name": upload.filename,
                                "file_size": len(upload.data)})
        if params.get("caption"):
            message["caption"] = str(params["caption"])
        bot.messages[(chat["id"], message["message_id"])] = message
        self.files.append(SentFile(f"{chat['id']}:{reply_id}" if reply_id else "",
                                   upload.filename or "", upload.data,
                                   "image" if field_name == "photo" else "file"))
        self.changed()
        return 200, _ok(message)

    def _send_chat_action(self, bot: Bot, params: dict, call: ApiCall) -> tuple:
        chat = self._chat(bot, params)
        action = params.get("action")
        if action not in CHAT_ACTIONS:
            raise _Answer(400, "Bad Request: wrong parameter action in request")
        self.chat_actions.append((time.monotonic(), chat["id"], action))
        return 200, _ok(True)

    # -- helpers ------------------------------------------------------------------------------
    def _chat(self, bot: Bot, params: dict) -> dict:
        raw = params.get("chat_id")
        if raw is None or raw == "":
            raise _Answer(400, "Bad Request: chat_id is empty")
        chat_id = _int(raw, None)
        chat = bot.chats.get(chat_id) if chat_id is not None else None
        if chat is None:
            raise _Answer(400, "Bad Request: chat not found")
        return chat

    def _text(self, params: dict) -> str:
        text = params.get("text")
        if text is None or text == "":
            raise _Answer(400, "Bad Request: message text is empty")
        text = str(text)
        trimmed = text.strip()
        if not trimmed:
            raise _Answer(400, "Bad Request: text must be non-empty")
        if len(trimmed) > self.max_text_chars:
            raise _Answer(400, "Bad Request: message is too long")
        return trimmed

    def _chat_rate(self, bot: Bot, chat_id: int) -> None:
        if self.chat_limit is None:
            return
        count, per_s = self.chat_limit
        now = time.monotonic()
        recent = [m.at for m in self.sent if m.token == bot.token and m.chat_id == chat_id
                  and m.at > now - per_s]
        if len(recent) >= count:
            retry = max(1, int(min(recent) + per_s - now + 0.999))
            raise _Answer(429, f"Too Many Requests: retry after {retry}", {"retry_after": retry})

    def _new_message(self, token: str | None, chat: dict, sender: dict,
                     extra: dict | None = None) -> dict:
        bot = self.bot(token)
        bot.chats.setdefault(chat["id"], dict(chat))
        mid = bot.next_message_id.get(chat["id"], 1)
        bot.next_message_id[chat["id"]] = mid + 1
        message = {"message_id": mid, "from": dict(sender), "chat": dict(chat),
                   "date": int(time.time())}
        message.update(extra or {})
        return message

    def _store_and_queue(self, token: str | None, message: dict, kind: str) -> None:
        bot = self.bot(token)
        bot.messages[(message["chat"]["id"], message["message_id"])] = message
        self._queue(bot, {kind: message})

    def _queue(self, bot: Bot, update: dict, *, force: bool = False) -> int:
        kinds = [k for k in update if k != "update_id"]
        kind = kinds[0] if kinds else ""
        allowed = bot.allowed
        if not force and ((allowed is not None and kind not in allowed)
                          or (allowed is None and kind in _NOT_BY_DEFAULT)):
            self.dropped_updates.append(update)
            self.changed()
            return -1
        if "update_id" not in update:
            update = {"update_id": bot.next_update_id, **update}
        bot.next_update_id = max(bot.next_update_id, int(update["update_id"])) + 1
        bot.queue.append(update)
        bot.queue.sort(key=lambda u: u["update_id"])
        if bot.poll is not None:
            bot.poll.event.set()
        self.changed()
        return update["update_id"]


class _MaskTokenPaths(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "/bot" in message:
            record.msg, record.args = re.sub(r"/bot[^/\s]+/", "/bot***/", message), ()
        return True


def _ok(result: Any) -> dict:
    return {"ok": True, "result": result}


def _int(value: Any, default: Any) -> Any:
    """The server's integer parsing (td::to_integer: leading digits; junk -> default)."""
    if value is None or isinstance(value, bool):
        return default
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value)
    m = re.match(r"\s*(-?\d+)", str(value))
    return int(m.group(1)) if m else default


def _bool(value: Any) -> bool:
    # Client.cpp to_bool: "true" / "1" (any case) or a JSON true
    return value is True or str(value).lower() in ("true", "1")


_JSON_PARAMS = ("reply_parameters", "allowed_updates", "entities", "reply_markup",
                "link_preview_options")


def _params(request: dict) -> dict:
    """Query string, then a form or JSON body (the server merges them; HttpReader in td)."""
    params: dict[str, Any] = {k: v[-1] for k, v in
                              urllib.parse.parse_qs(request["query"] or "").items()}
    body = request["body"] or b""
    ctype = request["headers"].get("Content-Type", "").split(";")[0].strip().lower()
    if body and ctype == "application/json":
        try:
            parsed = json.loads(body)
        except ValueError:
            raise _Answer(400, "Bad Request: can't parse JSON object") from None
        if not isinstance(parsed, dict):
            raise _Answer(400, "Bad Request: JSON object expected")  # *unverified* wording
        params.update(parsed)
    elif body and ctype == "application/x-www-form-urlencoded":
        params.update({k: v[-1] for k, v in
                       urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()})
    elif body and ctype == "multipart/form-data":
        try:
            fields, files = parse_multipart(request)
        except ValueError:
            raise _Answer(400, "Bad Request: can't parse multipart form") from None
        params.update(fields)
        params.update(files)
    elif body:
        raise _Answer(400, "Bad Request: unsupported Content-Type")  # *unverified* wording
    for key in _JSON_PARAMS:  # form/query values of object parameters are JSON-serialized
        if isinstance(params.get(key), str):
            try:
                params[key] = json.loads(params[key])
            except ValueError:
                raise _Answer(400, f"Bad Request: can't parse {key} JSON object") from None
    return params


def _entities(text: str) -> list[dict]:
    """`bot_command` and `mention` entities with offsets/lengths in UTF-16 code units."""
    found = [("bot_command", m) for m in _COMMAND.finditer(text)]
    found += [("mention", m) for m in _MENTION.finditer(text)
              if not any(m.start() >= c.start() and m.end() <= c.end() for _, c in found)]
    found.sort(key=lambda item: item[1].start())
    return [{"type": kind, "offset": _utf16_len(text[:m.start()]),
             "length": _utf16_len(m.group(0))} for kind, m in found]


def _utf16_len(s: str) -> int:
    return len(s.encode("utf-16-le")) // 2


class Driver(PlatformDriver):
    """The fleet's and the contract kit's handle on this fake (see testing/driver.py). Telegram
    has no connection: its keepalive is the long poll, `keepalive.interval_s` its timeout."""
    platform = "telegram"
    max_reply_chars = MAX_TEXT_CHARS

    def __init__(self, keepalive: Keepalive | None = None, *, secret: str | None = None) -> None:
        super().__init__(keepalive, secret=secret)
        self.fake = FakeTelegramServer(**({"token": secret} if secret else {}))
        self._silent_until = 0.0

    def bot_config(self, **extra: Any) -> dict:
        return {"token": self.fake.token, "api_base": self.fake.http_base,
                "poll_timeout_s": max(1, round(self.keepalive.interval_s)), **extra}

    def bad_credentials_config(self, **extra: Any) -> dict:
        return self.bot_config(token="123456:not-a-token-the-server-knows", **extra)

    def user_says(self, text: str, *, chat: int = 0, user: int | None = None,
                  group: bool = False) -> str:
        sender = self.fake.user((chat if user is None else user) + 1)
        if group:
            where = self.fake.group(chat + 1)
            text = f"@{self.fake.username} {text}"
        else:
            where = self.fake.private_chat(sender)
        mid = self.fake.user_sends(text, chat=where, user=sender)
        return f"{where['id']}:{mid}"

    def redeliver(self, message_id: str) -> None:
        chat_id, _, mid = message_id.partition(":")
        original = self.fake.bot().messages[(int(chat_id), int(mid))]
        self.fake.inject_update({"message": dict(original)})

    def reply_rows(self) -> list[ReplyRow]:
        return [ReplyRow(f"{m.chat_id}:{m.reply_to}", m.edits[-1] if m.edits else m.text, m.at)
                for m in self.fake.sent_messages() if m.reply_to is not None]

    def user_sends_media(self, data: bytes, *, kind: str, name: str, mime: str,
                         transcript: str | None = None, chat: int = 0) -> str:
        sender = self.fake.user(chat + 1)
        where = self.fake.private_chat(sender)
        mid = self.fake.user_sends_media(
            data, {"image": "photo", "voice": "voice"}.get(kind, "document"), chat=where,
            user=sender, file_name=name, mime_type=mime)
        return f"{where['id']}:{mid}"

    def uploads(self) -> int:
        return self.fake.file_uploads

    def drop(self) -> None:
        """The poll in flight fails at once (a proxy or load balancer cut it); with none in
        flight, the next one does."""
        if not self.fake.fail_poll_in_flight():
            self.fake.fail_next("getUpdates", 502, "Bad Gateway")
        self.fake.release_polls(discard=True)

    def go_silent(self, seconds: float) -> None:
        """Polls are swallowed and never answered for `seconds` (a stuck connection)."""
        self.fake.hold_polls()
        gevent.spawn_later(seconds, self.fake.release_polls, discard=True)

    def send_garbage(self) -> None:
        self.fake.garbage_next("getUpdates")

    def lateness(self) -> list[float]:
        """The gap between one poll's answer and the next poll: how late the client polled."""
        polls = [c for c in self.fake.poll_calls() if c.answered_at]
        return [max(0.0, nxt.at - prev.answered_at) for prev, nxt in zip(polls, polls[1:])]

    def session_up_at(self, conn_id: int) -> float | None:
        polls = self.fake.poll_calls()
        return polls[0].at if polls else None

    def sessions(self) -> list[tuple[int, float]]:
        """Polling has no connection: a session starts with the first poll the server answered
        after one that failed (or with the very first one)."""
        out, broken = [], True
        for i, call in enumerate(self.fake.poll_calls()):
            if call.status == 200:
                if broken:
                    out.append((i, call.at))
                broken = False
            elif call.status != 0:
                broken = True
        return out

    def connected(self) -> bool:
        polls = self.fake.poll_calls()
        return bool(polls) and (polls[-1].status == 0
                                or time.monotonic() - polls[-1].answered_at < 2.0)
