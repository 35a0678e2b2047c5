"""Discord (Gateway v10, JSON): DMs and guild messages that mention the bot, answered over REST.

The protocol, as this module speaks it (shared/PROTOCOLS.md "Telegram and Discord"; the
discord-api-docs pages events/gateway.mdx, events/gateway-events.mdx,
topics/opcodes-and-status-codes.mdx, topics/rate-limits.mdx, resources/message.mdx):

    prepare()        GET {api_base}/gateway/bot (Authorization: Bot TOKEN) -> url, or the
                     READY's resume_gateway_url when we hold a session; `?v=10&encoding=json`
    op 10 Hello      heartbeat_interval (ms): the first op 1 after interval * random(), then every
                     interval with d = last seq (null before any); then op 2 Identify
                     {token, intents, properties} or op 6 Resume {token, session_id, seq}
    op 11 ACK        answers a beat; none before the next beat = zombie: reconnect and resume
    op 1 (server)    beat at once
    op 0 READY       session_id, resume_gateway_url, user.id (saved for a restart)
    op 0 RESUMED     the missed dispatches came first, in order
    op 0 MESSAGE_CREATE  DMs (no guild_id) and guild messages mentioning us -> InboundMessage;
                     the seq advances only after the message is journaled (a failure replays it)
    op 7 Reconnect   reconnect and resume
    op 9 Invalid Session  d=true: resume; d=false: forget the session, identify after 1-5 s
    close codes      4004 and 4010-4014: fatal for this bot; 4007/4009: identify afresh; others
                     (and a close without a code): resume
    send(out)        POST /channels/{id}/messages {content <= 2000, message_reference, nonce,
                     enforce_nonce}: the nonce is derived from (message, part), so a re-send after
                     a timeout or restart returns the message already posted
    progress         typing (POST /channels/{id}/typing, lasts ~10 s) while a turn runs; the
                     answer so far posted as part 0 and edited (PATCH) at most once a second;
                     send() of part 0 turns that message into the final first part
    REST limits      every call goes through `RateLimits`: per-route buckets from the
                     X-RateLimit-* headers, 429 `retry_after`, the global limit
    leaving          a TCP cut, no close frame: a close with 1000/1001 would end the session
                     that a reconnect or a restart resumes (see `close_frame_on_leave`)

    media in         MESSAGE_CREATE `attachments[]` {id, filename, size, url, content_type}; a
                     voice message is an audio/ogg attachment (flags 1<<13). The CDN URL is
                     signed and needs no token; the declared size is checked before fetching.
    media out        POST /channels/{id}/messages as multipart/form-data: `payload_json` (the
                     usual body plus `attachments: [{id: 0, filename}]`) and `files[0]`, with the
                     part's nonce as for text (MSG "Uploading Files"); upload limit 10 MiB for
                     bots in unboosted guilds (*unverified*: Discord lowered it in 2024; config
                     `upload_limit_bytes`). A lone image URL in a text reply is shown as an image.

Facts not confirmed against the live platform are marked *unverified*.
"""
from __future__ import annotations

import hashlib
import json
import logging
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import gevent
import gevent.lock
from .. import rest
from pydantic import SecretStr

from ..models import Attachment, InboundMessage, OutboundMessage
from .base import ConnectionLost, Delivery, FatalPlatformError, JournalFailure, SendError
from .botconfig import BotConfig
from .kit import SkipFrame, clamp_interval, decode_json, http_session, is_int, json_object, \
    retry_after_s, spawn_owned
from .media import OutboundFile, read_file
from .registry import PlatformSpec
from .transports.websocket import CloseAction, WebSocketAdapter

OP_DISPATCH, OP_HEARTBEAT, OP_IDENTIFY, OP_RESUME = 0, 1, 2, 6
OP_RECONNECT, OP_INVALID_SESSION, OP_HELLO, OP_HEARTBEAT_ACK = 7, 9, 10, 11

INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15  # privileged: enable it for the app in the developer portal
INTENTS = INTENT_GUILD_MESSAGES | INTENT_DIRECT_MESSAGES | INTENT_MESSAGE_CONTENT

GATEWAY_QUERY = "?v=10&encoding=json"
FATAL_CLOSE_CODES = {
    4004: "authentication failed (the bot token is wrong or was reset)",
    4010: "invalid shard", 4011: "sharding required", 4012: "invalid API version",
    4013: "invalid intents", 4014: "disallowed intents (enable MESSAGE CONTENT for the app)",
}
REIDENTIFY_CLOSE_CODES = frozenset({4007, 4009})  # "Reconnect and start a new session"

ROUTINE_SKIPS = frozenset({"own_message", "bot_author", "no_mention", "not_a_user_message"})
MESSAGE_TYPES = {0, 19}  # DEFAULT and REPLY; joins, pins, thread notices are not for us
MAX_CONTENT_CHARS = 2000
MAX_ATTACHMENTS = 10
MIN_HEARTBEAT_S, MAX_HEARTBEAT_S = 0.05, 300.0
INVALID_SESSION_WAIT_S = (1.0, 5.0)  # op 9 d=false: wait this long before a fresh identify
SAVED_SESSION_KEY = "gateway_session"
SAVED_SESSION_MAX_AGE_S = 600.0  # older saved sessions are not tried (*unverified* lifetime)
REST_TIMEOUT = (5.0, 20.0)
SEND_RATE_WAIT_MAX_S = 30.0  # a send waits this long for its bucket, then the outbox retries
SEND_ATTEMPTS = 3  # a send retried inline after a 429 (discord.py http.py tries 5 times)
TYPING_REFRESH_S = 8.0  # the indicator lasts ~10 s (CH "Trigger Typing Indicator")
TYPING_MAX_S = 120.0  # a turn that never answers stops typing after this
PROGRESS_EDIT_EVERY_S = 1.0
PROGRESS_IDLE_S = 300.0  # progress state of an answer never sent is dropped after this
MAX_ID_CHARS = 32
_SNOWFLAKE = re.compile(r"^[0-9]{1,32}$")


class DiscordConfig(BotConfig):
    token: SecretStr
    api_base: str = "https://discord.com/api/v10"
    upload_limit_bytes: int = 10 * 1024 * 1024  # per file, what the bot's guilds allow


def _snowflake(value: Any) -> str:
    """`value` as a snowflake string when it is one, else ""."""
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        value = str(value)
    return value if isinstance(value, str) and _SNOWFLAKE.match(value) else ""


def nonce_for(bot_id: str, in_reply_to: str, seq: int) -> str:
    """The 25-character nonce of one reply part: the same part always gets the same nonce, so
    with `enforce_nonce` Discord returns the message already created instead of a second one."""
    return hashlib.sha256(f"{bot_id}:{in_reply_to}:{seq}".encode()).hexdigest()[:25]


def attachment_kind(content_type: str) -> str:
    ct = content_type.lower()
    for prefix, kind in (("image/", "image"), ("audio/", "voice"), ("video/", "video")):
        if ct.startswith(prefix):
            return kind
    return "file" if ct else "other"


class RateLimited(Exception):
    """A REST call must wait `retry_after` seconds (a 429, or a bucket we know is empty)."""

    def __init__(self, retry_after: float, scope: str) -> None:
        super().__init__(f"rate limited ({scope}) for {retry_after:.2f}s")
        self.retry_after = retry_after
        self.scope = scope


@dataclass
class _Bucket:
    remaining: int = 1
    reset_at: float = 0.0  # monotonic


class RateLimits:
    """Discord's REST limits as its answers describe them (topics/rate-limits.mdx; discord.py
    http.py's Ratelimit is the model). A route ("POST /channels/{id}/messages") maps to the
    bucket hash its answers name in X-RateLimit-Bucket; a bucket counts per top-level resource
    (the channel id). Before a call, `wait_s()` says how long until its bucket (or the global
    limit) lets it through and `take()` reserves a slot; every answer updates the bucket from
    X-RateLimit-Remaining / -Reset-After; a 429 empties the bucket (or, with `global`, every
    bucket) for `retry_after` seconds. Nothing here knows what a route does."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._hashes: dict[str, str] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._global_until = 0.0

    def _key(self, route: str, major: str) -> str:
        return f"{self._hashes.get(route, route)}:{major}"

    def wait_s(self, route: str, major: str) -> float:
        now = self._clock()
        wait = max(0.0, self._global_until - now)
        b = self._buckets.get(self._key(route, major))
        if b is not None and b.remaining <= 0 and b.reset_at > now:
            wait = max(wait, b.reset_at - now)
        return wait

    def take(self, route: str, major: str) -> None:
        b = self._buckets.get(self._key(route, major))
        if b is not None and b.reset_at > self._clock():
            b.remaining -= 1

    def update(self, route: str, major: str, status: int, headers, body: dict) -> float | None:
        """Learn from one answer; returns the wait a 429 asks for (None for other answers)."""
        now = self._clock()
        bucket_hash = headers.get("X-RateLimit-Bucket")
        if bucket_hash and len(bucket_hash) <= 100:
            self._hashes[route] = bucket_hash
        b = self._buckets.setdefault(self._key(route, major), _Bucket())
        remaining = headers.get("X-RateLimit-Remaining")
        reset_after = retry_after_s(headers.get("X-RateLimit-Reset-After"))
        if remaining is not None and reset_after is not None:
            try:
                b.remaining = int(remaining)
            except ValueError:
                b.remaining = 1
            b.reset_at = now + reset_after
        if status != 429:
            return None
        wait = retry_after_s(body.get("retry_after"))
        if wait is None:
            wait = retry_after_s(headers, default=1.0)
        is_global = str(headers.get("X-RateLimit-Global", "")).lower() == "true"
        if body.get("global") is True or is_global:
            self._global_until = max(self._global_until, now + wait)
        else:
            b.remaining, b.reset_at = 0, max(b.reset_at, now + wait)
        return wait


@dataclass
class _Progress:
    """One answer being streamed: its first part as a message we post, then edit."""
    channel_id: str
    message_id: str  # the user's message this answers
    text: str = ""
    shown: str = ""
    posted_id: str | None = None
    last_edit: float = 0.0
    touched: float = field(default_factory=time.monotonic)
    done: bool = False
    lock: gevent.lock.Semaphore = field(default_factory=gevent.lock.Semaphore)
    worker: gevent.Greenlet | None = None


class DiscordAdapter(WebSocketAdapter):
    """A Discord bot on the gateway plus REST replies. See the module docstring for the flow."""

    name = "discord"
    # Resume replays every dispatch after the seq we send: the seq moves only after a message
    # is journaled, so a store failure drops the connection and the resume brings it again.
    on_journal_failure = JournalFailure.REPLAY
    single_connection = True  # one session per shard; 1000 IDENTIFY a day
    max_unanswered_beats = 1  # "no heartbeat ACK between its attempts at sending heartbeats"
    # "When you close the connection with close code 1000 or 1001, your session will be
    # invalidated ... If you simply close the TCP connection ... the session will remain active"
    # (GW "Initiating a Disconnect"): we leave by a cut, so a reconnect or restart can resume.
    close_frame_on_leave = False

    def __init__(self, config, on_message, *, handshake_timeout_s: float = 20.0,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None,
                 **kw) -> None:
        super().__init__(config, on_message, **kw)
        self._rng = rng or random.Random()
        self.session_timeout_s = handshake_timeout_s  # Hello + READY/RESUMED, see the kit
        self._api_base = config.api_base.rstrip("/")
        self._http = http_session()
        self._http.headers["User-Agent"] = "DiscordBot (https://github.com/hermes-green, 1)"
        self.limits = RateLimits(clock)
        self.user_id = ""
        self.session_id: str | None = None
        self.seq: int | None = None
        self.resume_url: str | None = None
        self._hello_seen = False
        self._seq_matters = False
        self._progress: dict[str, _Progress] = {}
        self._typing: dict[str, tuple[gevent.Greenlet, list[float]]] = {}
        self._load_session()
        self._ops: dict[int, Callable[[dict], None]] = {
            OP_DISPATCH: self._on_dispatch,
            OP_HELLO: self._on_hello,
            OP_HEARTBEAT_ACK: lambda frame: self.beat_answered(),
            OP_HEARTBEAT: lambda frame: self.send_frame(self.heartbeat_frame()),
            OP_RECONNECT: self._on_reconnect,
            OP_INVALID_SESSION: self._on_invalid_session,
        }
        self._events: dict[str, Callable[[Any], None]] = {
            "READY": self._on_ready,
            "RESUMED": self._on_resumed,
            "MESSAGE_CREATE": self._on_message_create,
        }

    # -- session memory ------------------------------------------------------------------------
    def _load_session(self) -> None:
        try:
            raw = self.saved_state.get(SAVED_SESSION_KEY)
            saved = json.loads(raw) if raw else None
        except (ValueError, TypeError) as e:
            self.log.warning("saved session unreadable platform=discord bot=%s error=%s",
                             self.bot_id, type(e).__name__)
            return
        if not isinstance(saved, dict):
            return
        age = time.time() - saved.get("at", 0) if isinstance(saved.get("at"), (int, float)) \
            else float("inf")
        sid, url, seq = saved.get("session_id"), saved.get("resume_url"), saved.get("seq")
        if (age > SAVED_SESSION_MAX_AGE_S or not isinstance(sid, str) or not sid
                or not isinstance(url, str) or not url.startswith(("ws://", "wss://"))
                or not (seq is None or is_int(seq))):
            return
        self.session_id, self.resume_url, self.seq = sid, url, seq
        self.user_id = _snowflake(saved.get("user_id"))
        self.log.info("saved session found platform=discord bot=%s session=%s seq=%s",
                      self.bot_id, sid, seq)

    def _save_session(self, *, soon: bool = False) -> None:
        value = None if self.session_id is None else json.dumps({
            "session_id": self.session_id, "seq": self.seq, "resume_url": self.resume_url,
            "user_id": self.user_id, "at": time.time()})
        try:
            (self.saved_state.put_soon if soon else self.saved_state.put)(SAVED_SESSION_KEY,
                                                                          value)
        except Exception as e:  # a restart then identifies afresh; the connection goes on
            self.log.warning("session not saved platform=discord bot=%s error=%s",
                             self.bot_id, type(e).__name__)

    def _forget_session(self, why: str) -> None:
        if self.session_id is not None:
            self.log.info("session discarded platform=discord bot=%s session=%s reason=%s",
                          self.bot_id, self.session_id, why)
        self.session_id = self.seq = self.resume_url = None
        self._save_session()

    # -- before the socket ---------------------------------------------------------------------
    def prepare(self) -> str:
        self.heartbeat_interval_s = None  # this connection's Hello sets the timetable
        self._hello_seen = False
        if self.session_id is not None and self.resume_url:
            return self.resume_url.rstrip("/") + "/" + GATEWAY_QUERY
        # No session (or its resume URL failed): ask for the gateway URL; a Resume is still
        # sent on it when we hold a session.
        try:
            resp = self._rest("GET", "GET /gateway/bot", "/gateway/bot", "",
                              max_wait_s=SEND_RATE_WAIT_MAX_S)
        except RateLimited as e:
            raise ConnectionLost("gateway_rate_limited", str(e), retry_after=e.retry_after) \
                from None
        except rest.RequestException as e:
            raise ConnectionLost("gateway_unreachable", type(e).__name__) from None
        if resp.status_code == 401:
            raise FatalPlatformError("Discord refused the bot token (GET /gateway/bot: 401)")
        url = json_object(resp).get("url") if resp.status_code == 200 else None
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise ConnectionLost("gateway_failed", f"GET /gateway/bot: HTTP {resp.status_code}")
        return url.rstrip("/") + "/" + GATEWAY_QUERY

    # -- frames --------------------------------------------------------------------------------
    def on_frame(self, data: str | bytes) -> None:
        if isinstance(data, bytes):  # we never ask for compression
            self.log.warning("frame skipped platform=discord bot=%s reason=binary bytes=%d",
                             self.bot_id, len(data))
            return
        try:
            frame = decode_json(data)
        except SkipFrame as e:
            self.log.warning("frame skipped platform=discord bot=%s reason=%s chars=%d",
                             self.bot_id, e, len(data))
            return
        op = frame.get("op") if isinstance(frame, dict) else None
        handler = self._ops.get(op) if is_int(op) else None
        if handler is None:
            self.log.warning("frame skipped platform=discord bot=%s reason=unknown_op op=%.40r",
                             self.bot_id, op)
            return
        handler(frame)

    def heartbeat_frame(self) -> str:
        return json.dumps({"op": OP_HEARTBEAT, "d": self.seq})

    def _on_hello(self, frame: dict) -> None:
        d = frame.get("d")
        interval_ms = d.get("heartbeat_interval") if isinstance(d, dict) else None
        if not isinstance(interval_ms, (int, float)) or isinstance(interval_ms, bool):
            raise ConnectionLost("bad_hello", "no usable heartbeat_interval")
        interval = clamp_interval(interval_ms / 1000.0, MIN_HEARTBEAT_S, MAX_HEARTBEAT_S,
                                  default=41.25)
        again = self._hello_seen
        self._hello_seen = True
        # The first beat after interval * jitter ("to prevent too many clients from reconnecting
        # at the exact same time"), then the kit's timetable every interval from there.
        self.start_heartbeat(interval, first_after_s=interval * self._rng.random())
        if again:
            return  # a second Hello only re-times the heartbeat
        if self.session_id is not None:
            self._send_resume()
        else:
            self._send_identify()

    def _send_identify(self) -> None:
        self.seq = None
        self.send_frame(json.dumps({"op": OP_IDENTIFY, "d": {
            "token": self.config.token.get_secret_value(),
            "intents": INTENTS,
            "properties": {"os": "linux", "browser": "hermes-green", "device": "hermes-green"},
        }}))
        self.log.info("identify sent platform=discord bot=%s intents=%d", self.bot_id, INTENTS)

    def _send_resume(self) -> None:
        self.send_frame(json.dumps({"op": OP_RESUME, "d": {
            "token": self.config.token.get_secret_value(),
            "session_id": self.session_id, "seq": self.seq or 0}}))
        self.log.info("resume sent platform=discord bot=%s session=%s seq=%s", self.bot_id,
                      self.session_id, self.seq)

    def _on_reconnect(self, frame: dict) -> None:
        raise ConnectionLost("server_reconnect", "op 7", resume=True)

    def _on_invalid_session(self, frame: dict) -> None:
        if frame.get("d") is True:
            raise ConnectionLost("invalid_session", "op 9 resumable", resume=True)
        self._forget_session("op 9 invalid session")
        # The earlier docs: "wait a random amount of time—between 1 and 5 seconds—then send a
        # fresh Opcode 2 Identify" (docs/topics/Gateway.md before the 2022 rewrite).
        raise ConnectionLost("invalid_session", "op 9", resume=False,
                             retry_after=self._rng.uniform(*INVALID_SESSION_WAIT_S))

    def _on_dispatch(self, frame: dict) -> None:
        event = frame.get("t")
        handler = self._events.get(event) if isinstance(event, str) else None
        if handler is None:
            self.log.debug("event skipped platform=discord bot=%s event=%.60r reason=unhandled",
                           self.bot_id, event)
        else:
            handler(frame.get("d"))
        # Only once the event is handled: if handing a message up failed, the resume that
        # follows replays it.
        s = frame.get("s")
        if is_int(s) and s > 0 and (self.seq is None or s > self.seq):
            self.seq = s
            if self._seq_matters:  # a message was handed up: a restart resumes after it
                self._seq_matters = False
                self._save_session(soon=True)  # older only replays journaled events

    def _on_ready(self, d: Any) -> None:
        d = d if isinstance(d, dict) else {}
        session_id, url = d.get("session_id"), d.get("resume_gateway_url")
        user = d.get("user") if isinstance(d.get("user"), dict) else {}
        user_id = _snowflake(user.get("id"))
        if not isinstance(session_id, str) or not session_id or len(session_id) > 200:
            raise ConnectionLost("bad_ready", "READY without session_id", resume=False)
        if not user_id:
            raise ConnectionLost("bad_ready", "READY without user.id", resume=False)
        self.session_id, self.user_id, self.seq = session_id, user_id, None
        self.resume_url = url if isinstance(url, str) and url.startswith(("ws://", "wss://")) \
            else None
        self._save_session()
        self.log.info("session started platform=discord bot=%s session=%s user=%s",
                      self.bot_id, session_id, user_id)
        self.mark_ready()

    def _on_resumed(self, d: Any) -> None:
        self.log.info("session resumed platform=discord bot=%s session=%s seq=%s",
                      self.bot_id, self.session_id, self.seq)
        self.mark_ready()

    def _on_message_create(self, d: Any) -> None:
        msg = self._normalize(d)
        if msg is None:
            return
        # A journal failure raises ConnectionLost here (JournalFailure.REPLAY).
        outcome = self.deliver(msg)
        self._seq_matters = True
        self.log.info("inbound platform=discord bot=%s chat=%s msg=%s kind=%s outcome=%s "
                      "attachments=%d", self.bot_id, msg.chat_id, msg.message_id, msg.chat_type,
                      outcome.value, len(msg.attachments))
        if outcome is Delivery.NEW:
            self._keep_typing(msg.chat_id)

    def _normalize(self, d: Any) -> InboundMessage | None:
        if not isinstance(d, dict):
            self.log.warning("event skipped platform=discord bot=%s reason=no_data", self.bot_id)
            return None
        msg_id, channel_id = _snowflake(d.get("id")), _snowflake(d.get("channel_id"))
        author = d.get("author") if isinstance(d.get("author"), dict) else {}
        user_id = _snowflake(author.get("id"))
        if not (msg_id and channel_id and user_id):
            self.log.warning("event skipped platform=discord bot=%s msg=%.40r reason=missing_ids",
                             self.bot_id, d.get("id"))
            return None
        why = None
        if user_id == self.user_id:
            why = "own_message"
        elif author.get("bot") is True or d.get("webhook_id") is not None:
            why = "bot_author"
        elif not is_int(d.get("type", 0)) or d.get("type", 0) not in MESSAGE_TYPES:
            why = "not_a_user_message"
        guild_id = _snowflake(d.get("guild_id"))
        mentions = d.get("mentions") if isinstance(d.get("mentions"), list) else []
        mentioned = bool(self.user_id) and any(
            isinstance(u, dict) and _snowflake(u.get("id")) == self.user_id for u in mentions)
        if why is None and d.get("guild_id") is not None and not mentioned:
            why = "no_mention"
        content = d.get("content")
        text = content if isinstance(content, str) else ""
        if self.user_id:
            text = re.sub(rf"<@!?{self.user_id}>", " ", text)
        text = text.strip()
        attachments = self._attachments(d.get("attachments"), msg_id)
        if why is None and not text and not attachments:
            why = "empty"  # stickers only, or MESSAGE_CONTENT not granted
        if why is not None:  # chatter not meant for us is routine: debug; the rest is news
            level = logging.DEBUG if why in ROUTINE_SKIPS else logging.INFO
            self.log.log(level, "event skipped platform=discord bot=%s chat=%s msg=%s reason=%s",
                         self.bot_id, channel_id, msg_id, why)
            return None
        ref = {"channel_id": channel_id, "message_id": msg_id}
        if guild_id:
            ref["guild_id"] = guild_id
        return InboundMessage(
            platform=self.name, message_id=msg_id, chat_id=channel_id, user_id=user_id,
            text=text, chat_type="group" if d.get("guild_id") is not None else "dm",
            attachments=attachments, reply_ref=ref)

    def _attachments(self, raw: Any, msg_id: str) -> tuple[Attachment, ...]:
        if not isinstance(raw, list):
            return ()
        found = []
        for item in raw[:MAX_ATTACHMENTS]:
            url = item.get("url") if isinstance(item, dict) else None
            if not isinstance(url, str) or not url.startswith(("https://", "http://")):
                self.log.warning("attachment skipped platform=discord msg=%s reason=no_url", msg_id)
                continue
            ctype, filename = item.get("content_type"), item.get("filename")
            ctype = ctype if isinstance(ctype, str) else ""
            size = item.get("size")
            found.append(Attachment(kind=attachment_kind(ctype), ref=url,
                                    name=filename if isinstance(filename, str) else None,
                                    mime=ctype.split(";")[0] or None,
                                    size=size if is_int(size) and size >= 0 else None))
        return tuple(found)

    # -- closes --------------------------------------------------------------------------------
    def close_action(self, code: int | None) -> CloseAction:
        if code in FATAL_CLOSE_CODES:
            self.log.error("fatal close platform=discord bot=%s code=%s meaning=%s",
                           self.bot_id, code, FATAL_CLOSE_CODES[code])
            return CloseAction.FATAL
        if code in REIDENTIFY_CLOSE_CODES:
            return CloseAction.REIDENTIFY
        return CloseAction.RESUME

    def on_disconnect(self, lost: ConnectionLost) -> None:
        if not lost.resume:
            self._forget_session(lost.reason)
        elif lost.reason in ("connect_failed", "handshake") and self.resume_url is not None:
            # "If you cannot reconnect or the reconnect fails, open a new connection using the
            # URL from Get Gateway Bot" (GW "Handling a Disconnect"); we still try to resume.
            self.resume_url = None

    # -- REST ----------------------------------------------------------------------------------
    def _rest(self, method: str, route: str, path: str, major: str, body: dict | None = None,
              *, max_wait_s: float, files: dict | None = None) -> rest.Response:
        """One REST call inside its rate limits: waits up to `max_wait_s` for the bucket, else
        raises RateLimited without calling; a 429 answer raises RateLimited too. Raises
        rest.RequestException for network failures. A 401 stops this bot (the token is
        wrong or was reset: Discord asks clients to stop calling after that)."""
        wait = self.limits.wait_s(route, major)
        if wait > max_wait_s:
            raise RateLimited(wait, "bucket")
        if wait > 0:
            gevent.sleep(wait)
        self.limits.take(route, major)
        auth = {"Authorization": f"Bot {self.config.token.get_secret_value()}"}
        if files:  # multipart: the JSON body travels as payload_json beside the files
            resp = self._http.request(method, self._api_base + path, headers=auth,
                                      data={"payload_json": json.dumps(body)}, files=files,
                                      timeout=REST_TIMEOUT)
        else:
            resp = self._http.request(method, self._api_base + path, json=body, headers=auth,
                                      timeout=REST_TIMEOUT)
        answer = json_object(resp) if resp.status_code >= 400 else {}
        retry = self.limits.update(route, major, resp.status_code, resp.headers, answer)
        if retry is not None:
            scope = "global" if answer.get("global") is True else "bucket"
            self.log.warning("rate limited platform=discord bot=%s route=%r scope=%s "
                             "retry_after_s=%.2f", self.bot_id, route, scope, retry)
            raise RateLimited(retry, scope)
        if resp.status_code == 401 and route != "GET /gateway/bot":
            self.log.error("token refused platform=discord bot=%s route=%r", self.bot_id, route)
            self.fail(FatalPlatformError("Discord refused the bot token (REST 401)"))
        return resp

    def max_reply_parts(self) -> int | None:
        return None

    def reply_chunk_chars(self) -> int:
        return MAX_CONTENT_CHARS

    image_links = "bare"  # a lone image URL is embedded as the image

    def max_upload_bytes(self, media: str) -> int | None:
        return self.config.upload_limit_bytes

    def send_file(self, out: OutboundMessage) -> None:
        file = OutboundFile.from_row(out.file)
        ref = out.reply_ref or {}
        channel_id = _snowflake(ref.get("channel_id")) or _snowflake(out.chat_id)
        reply_to = _snowflake(ref.get("message_id")) or _snowflake(out.in_reply_to)
        if not channel_id:
            raise SendError("no channel to send to", retryable=False)
        try:
            data = read_file(file.path, self.config.upload_limit_bytes)
        except (OSError, ValueError) as e:
            raise SendError(f"file unusable: {type(e).__name__}", retryable=False) from None
        body: dict[str, Any] = {"content": out.text[:MAX_CONTENT_CHARS],
                                "attachments": [{"id": 0, "filename": file.name}],
                                "allowed_mentions": {"parse": []}}
        part_of = reply_to or (f"outbox-{out.outbox_id}" if out.outbox_id is not None else "")
        if part_of:
            body.update(nonce=nonce_for(self.bot_id, part_of, out.seq), enforce_nonce=True)
        if reply_to:
            body["message_reference"] = {"message_id": reply_to, "fail_if_not_exists": False}
        self._call_for_send("POST", "POST /channels/{id}/messages",
                            f"/channels/{channel_id}/messages", channel_id, body,
                            files={"files[0]": (file.name, data, file.mime)})

    def send(self, out: OutboundMessage) -> None:
        ref = out.reply_ref or {}
        channel_id = _snowflake(ref.get("channel_id")) or _snowflake(out.chat_id)
        reply_to = _snowflake(ref.get("message_id")) or _snowflake(out.in_reply_to)
        if not channel_id:
            raise SendError("no channel to send to", retryable=False)
        if not out.text:
            raise SendError("empty reply", retryable=False)
        if len(out.text) > MAX_CONTENT_CHARS:
            raise SendError(f"part of {len(out.text)} characters is over Discord's "
                            f"{MAX_CONTENT_CHARS}", retryable=False)
        progress = self._progress.get(reply_to) if out.seq == 0 and reply_to else None
        if progress is not None:
            with progress.lock:
                progress.done = True
                posted = progress.posted_id
                if posted is not None:
                    self._finish_part(channel_id, posted, out.text, sent_as="edit")
                    self._end_progress(reply_to, channel_id)
                    return
        body: dict[str, Any] = {
            "content": out.text,
            "allowed_mentions": {"parse": ["users"], "replied_user": True}}
        part_of = reply_to or (f"outbox-{out.outbox_id}" if out.outbox_id is not None else "")
        if part_of:  # a message nothing identifies goes without: it could not be matched
            body.update(nonce=nonce_for(self.bot_id, part_of, out.seq), enforce_nonce=True)
        if reply_to:
            # fail_if_not_exists false: if the user deleted their message, the answer still
            # goes out, as a plain message (MSG "Message Reference Structure").
            body["message_reference"] = {"message_id": reply_to, "fail_if_not_exists": False}
        answer = self._call_for_send("POST", "POST /channels/{id}/messages",
                                     f"/channels/{channel_id}/messages", channel_id, body)
        posted_id = _snowflake(answer.get("id"))
        if out.seq == 0 and posted_id and answer.get("content") != out.text:
            # The nonce matched a message posted earlier for this part: a progress message from
            # before a restart. Turn it into the final text.
            self._finish_part(channel_id, posted_id, out.text, sent_as="nonce_edit")
        if out.seq == 0 and reply_to:
            self._end_progress(reply_to, channel_id)

    def _finish_part(self, channel_id: str, message_id: str, text: str, *, sent_as: str) -> None:
        self._call_for_send("PATCH", "PATCH /channels/{id}/messages/{mid}",
                            f"/channels/{channel_id}/messages/{message_id}", channel_id,
                            {"content": text, "allowed_mentions": {"parse": ["users"]}})
        self.log.debug("reply part platform=discord bot=%s chat=%s msg=%s via=%s", self.bot_id,
                       channel_id, message_id, sent_as)

    def _call_for_send(self, method: str, route: str, path: str, channel_id: str,
                       body: dict, files: dict | None = None) -> dict:
        """A REST call the outbox waits for: rate limits are waited out inline (up to
        SEND_RATE_WAIT_MAX_S, SEND_ATTEMPTS times), then handed back to the outbox."""
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                resp = self._rest(method, route, path, channel_id, body,
                                  max_wait_s=SEND_RATE_WAIT_MAX_S, files=files)
            except RateLimited as e:
                if attempt == SEND_ATTEMPTS or e.retry_after > SEND_RATE_WAIT_MAX_S:
                    raise SendError(str(e), retry_after=e.retry_after) from None
                continue  # the bucket now knows the wait; _rest sleeps it out
            except rest.RequestException as e:
                raise SendError(f"request failed: {type(e).__name__}") from None
            break
        status, answer = resp.status_code, json_object(resp)
        if 200 <= status < 300:
            return answer
        detail = f"HTTP {status} code {answer.get('code')}: {str(answer.get('message'))[:120]}"
        if status >= 500 or status in (401, 408):
            raise SendError(f"reply not accepted ({detail})")
        # 400 (form errors), 403 (no access to the channel), 404 (unknown channel/message).
        raise SendError(f"reply refused ({detail})", retryable=False)

    # -- progress: typing and the first part as it grows ---------------------------------------
    def progress(self, reply_ref: dict, text_so_far: str) -> None:
        ref = reply_ref if isinstance(reply_ref, dict) else {}
        channel_id, msg_id = _snowflake(ref.get("channel_id")), _snowflake(ref.get("message_id"))
        if not channel_id or not msg_id:
            return
        self._keep_typing(channel_id)
        if not isinstance(text_so_far, str) or not text_so_far.strip():
            return
        self._prune_progress()
        st = self._progress.get(msg_id)
        if st is None:
            st = self._progress[msg_id] = _Progress(channel_id, msg_id)
        if st.done:
            return
        st.text, st.touched = text_so_far, time.monotonic()
        if st.worker is None or st.worker.dead:
            st.worker = spawn_owned(self.background, self._push_progress, st,
                                    name=f"discord:{self.bot_id}:progress", log=self.log)

    def _push_progress(self, st: _Progress) -> None:
        while not st.done:
            gevent.sleep(max(0.0, st.last_edit + PROGRESS_EDIT_EVERY_S - time.monotonic()))
            shown = st.text[:MAX_CONTENT_CHARS]
            if shown == st.shown:
                return  # nothing new: progress() starts another push when text comes
            with st.lock:
                if st.done:
                    return
                st.last_edit = time.monotonic()
                try:
                    self._progress_call(st, shown)
                except (RateLimited, rest.RequestException) as e:
                    self.log.debug("progress not shown platform=discord bot=%s error=%s",
                                   self.bot_id, e)

    def _progress_call(self, st: _Progress, shown: str) -> None:
        if st.posted_id is None:
            body = {"content": shown, "allowed_mentions": {"parse": []},
                    "nonce": nonce_for(self.bot_id, st.message_id, 0), "enforce_nonce": True,
                    "message_reference": {"message_id": st.message_id,
                                          "fail_if_not_exists": False}}
            resp = self._rest("POST", "POST /channels/{id}/messages",
                              f"/channels/{st.channel_id}/messages", st.channel_id, body,
                              max_wait_s=0.0)
            if resp.status_code == 200:
                st.posted_id = _snowflake(json_object(resp).get("id")) or None
                st.shown = shown
        else:
            resp = self._rest("PATCH", "PATCH /channels/{id}/messages/{mid}",
                              f"/channels/{st.channel_id}/messages/{st.posted_id}",
                              st.channel_id, {"content": shown, "allowed_mentions": {"parse": []}},
                              max_wait_s=0.0)
            if resp.status_code == 200:
                st.shown = shown
        if resp.status_code != 200:
            self.log.info("progress refused platform=discord bot=%s chat=%s status=%d",
                          self.bot_id, st.channel_id, resp.status_code)
            if 400 <= resp.status_code < 500:
                st.done = True  # refused for good (no access...): the final send decides

    def _end_progress(self, msg_id: str, channel_id: str) -> None:
        st = self._progress.pop(msg_id, None)
        if st is not None:
            st.done = True
        self._stop_typing(channel_id)

    def _prune_progress(self) -> None:
        now = time.monotonic()
        for key in [k for k, st in self._progress.items() if now - st.touched > PROGRESS_IDLE_S]:
            self._progress.pop(key).done = True

    def _keep_typing(self, channel_id: str) -> None:
        """Show "typing..." in the channel until its answer starts (or TYPING_MAX_S)."""
        until = time.monotonic() + TYPING_MAX_S
        running = self._typing.get(channel_id)
        if running is not None and not running[0].dead:
            running[1][0] = until
            return
        deadline = [until]
        g = spawn_owned(self.background, self._typing_loop, channel_id, deadline,
                        name=f"discord:{self.bot_id}:typing", log=self.log)
        self._typing[channel_id] = (g, deadline)

    def _stop_typing(self, channel_id: str) -> None:
        running = self._typing.pop(channel_id, None)
        if running is not None:
            running[0].kill(block=False)

    def _typing_loop(self, channel_id: str, deadline: list[float]) -> None:
        while time.monotonic() < deadline[0] and not self.stopping:
            try:
                resp = self._rest("POST", "POST /channels/{id}/typing",
                                  f"/channels/{channel_id}/typing", channel_id, max_wait_s=0.0)
                if 400 <= resp.status_code < 500:  # no access: stop asking (invalid requests
                    break  # count towards Discord's 10,000 per 10 minutes ban threshold)
            except (RateLimited, rest.RequestException) as e:
                self.log.debug("typing not shown platform=discord bot=%s chat=%s error=%s",
                               self.bot_id, channel_id, e)
            gevent.sleep(TYPING_REFRESH_S)
        if self._typing.get(channel_id, (None,))[0] is gevent.getcurrent():
            self._typing.pop(channel_id, None)


PLATFORM = PlatformSpec(name="discord", config=DiscordConfig, adapter="DiscordAdapter",
                        fake="hermes_green.testing.fake_discord:FakeDiscordServer")
