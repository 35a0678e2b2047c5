"""A strict fake of Discord for bots: `GET /gateway/bot`, the Gateway v10 WebSocket (JSON
encoding) and the REST calls a chat bot makes (create message, edit message, typing), with
per-route rate-limit buckets and the global limit.

Sources (cited per rule below): discord-api-docs `developers/events/gateway.mdx` (GW),
`developers/events/gateway-events.mdx` (EV), `developers/topics/opcodes-and-status-codes.mdx`
(CODES), `developers/topics/rate-limits.mdx` (RL), `developers/resources/message.mdx` (MSG),
`developers/resources/channel.mdx` (CH), `developers/reference.mdx` (REF); discord.py
`discord/gateway.py` and `discord/http.py` for what a well-behaved client does; discord-api-docs
issue threads where the docs are silent. Rules the docs do not state are marked *unverified*.

What it enforces (each rule is what the real gateway or API does to a client that breaks it):
- gateway URL: `?v=10` (else close 4012, CODES) and `encoding=json` (else 4002, *unverified*);
  `compress=zlib-stream` is spoken (one zlib context per connection, GW "Transport Compression");
  Hello (op 10) with an integer `heartbeat_interval` in ms first (EV "Hello").
- heartbeats: op 1 with `d` = last seq or null (EV "Heartbeat"), answered by op 11 (GW "Sending
  Heartbeats"); a client whose beat is more than `heartbeat_tolerance` intervals late is closed
  and must resume (GW: "If your app fails to send a heartbeat event in time, your connection will
  be closed and you will be forced to Resume"; the close code is not documented, so the fake
  closes without one, *unverified*). The session stays resumable.
- Identify (op 2) before anything but heartbeats (else 4003, CODES); a second one on the same
  connection 4005; token must be the bot token (else 4004); `properties` an object (else 4002);
  `intents` an integer of known bits (else 4013) with privileged bits only when enabled for the
  app (else 4014, GW "Gateway Restrictions"); `shard` [id, n] with 0 <= id < n (else 4010);
  more than `max_concurrency` identifies per 5 s -> op 9 (GW "Rate Limiting").
- READY (op 0, s=1) carries `session_id`, `resume_gateway_url`, `user` (EV "Ready").
- Resume (op 6) with the token (else 4004), a known, still-valid session (else op 9 d=false, the
  socket stays open: discord-api-docs issue #1805, "a reconnect is not actually required unless
  your connection was also closed by us") and a seq the session has reached (else 4007
  "Invalid seq", CODES); then every dispatch after that seq is replayed in order, then RESUMED
  (GW "Resuming"). Resumes on the plain gateway URL instead of `resume_gateway_url` work but are
  recorded (`wrong_url_resumes`): GW says they "experience disconnects at a higher rate".
- A detached session stays resumable for `session_ttl_s` (GW "Initiating a Disconnect": "the
  session will remain active and timeout after a few minutes"); a client close with 1000/1001
  invalidates it (same section).
- Payloads: JSON objects with an integer `op` (else 4002 decode error), at most 4096 bytes (else
  4002, GW "Sending Events"), known send opcodes (else 4001); at most 120 per connection per 60 s
  (else 4008, GW "Rate Limiting").
- Dispatches follow the intents (GW "List of Intents"): guild MESSAGE_CREATE needs GUILD_MESSAGES
  (1<<9), DMs need DIRECT_MESSAGES (1<<12); without MESSAGE_CONTENT (1<<15) a guild message that
  does not mention the bot arrives with empty `content` (GW "Message Content Intent").
- REST: `Authorization: Bot TOKEN` (else 401, REF "Authentication"; CODES 401); create message
  `content` up to 2000 characters (else 400 code 50035 Invalid Form Body, MSG "Create Message";
  the fake counts code points, whether Discord counts UTF-16 units is *unverified*), empty
  content 400 code 50006; `message_reference.message_id` must name a message of that channel
  (else 400 50035, MSG "Limitations": "The referenced message must exist"); edits only of the
  bot's own messages (403 50005) that exist (404 10008); a channel the bot cannot see answers
  403 50001 Missing Access; an unknown channel 404 10003 (CODES "JSON Error Codes").
  `nonce` + `enforce_nonce` within `nonce_window_s` returns the earlier message (MSG).
- Rate limits (RL): every answer carries X-RateLimit-Limit/-Remaining/-Reset/-Reset-After/
  -Bucket; buckets are per route and top-level channel id; past a bucket 429 with
  `{message, retry_after (float s), global: false}`, `Retry-After`, `X-RateLimit-Scope: user`;
  past the global limit (50/s) 429 with `global: true` and `X-RateLimit-Global: true`. 429s carry
  `Via` like Cloudflare-fronted answers (discord.py http.py reads a 429 without it as a ban).

Use from tests, the demo and benchmarks:
    fake = FakeDiscordServer(heartbeat_interval_ms=200).start()
    fake.api_base                                   # what the adapter's api_base is set to
    mid = fake.user_sends("hi", dm=True)           # a DM to the bot
    fake.user_sends("hey", guild_id="g1", channel_id="c1", mention=True)
    fake.sent_messages(channel_id=None)             # the bot's messages, in order
    fake.replies_to(mid), fake.edits, fake.typing, fake.rejected, fake.rate_limited
    faults: go_zombie(), send_reconnect(), invalidate_session(resumable=False),
            request_heartbeat(), close_with(code), drop(), send_garbage(data), hide_channel(cid),
            revoke_token(), force_429(times, retry_after, global_=False), user_edits(mid, text),
            dispatch(event, d) (anything, unknown events included)
Media: `user_sends_media(data, kind, ...)` posts a message whose attachment the fake serves (a
voice message: audio/ogg with flags 1<<13, MSG "Voice Messages"); a create-message request may be
multipart/form-data with `payload_json` and `files[n]`, each file announced in
`payload_json.attachments` by its index (MSG "Uploading Files"), at most `upload_limit` bytes
(else 413 code 40005 "Request entity too large"); `fake.files` records the files shown.
hold_file_sends()/release_file_sends() hold multipart creates unprocessed.
Events sent while a session exists but no connection is bound are kept and replayed on resume;
events sent before any (valid) session exists are delivered after the next identify (a test
convenience: the real gateway would drop them).
"""
from __future__ import annotations

import itertools
import json
import math
import re
import struct
import time
import uuid
import zlib
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import gevent
import gevent.event
from geventwebsocket.websocket import WebSocket

from .driver import Keepalive, PlatformDriver, ReplyRow, SentFile
from .harness import Conn, FakePlatformServer, parse_multipart

# Gateway opcodes (CODES "Gateway Opcodes").
OP_DISPATCH, OP_HEARTBEAT, OP_IDENTIFY, OP_PRESENCE, OP_VOICE_STATE = 0, 1, 2, 3, 4
OP_RESUME, OP_RECONNECT, OP_REQUEST_MEMBERS, OP_INVALID_SESSION = 6, 7, 8, 9
OP_HELLO, OP_HEARTBEAT_ACK = 10, 11
CLIENT_OPS = {OP_HEARTBEAT, OP_IDENTIFY, OP_PRESENCE, OP_VOICE_STATE, OP_RESUME,
              OP_REQUEST_MEMBERS, 31, 43}

# Intents (GW "List of Intents"); privileged ones need enabling (GW "Privileged Intents").
INTENT_GUILDS = 1 << 0
INTENT_GUILD_MEMBERS = 1 << 1
INTENT_GUILD_PRESENCES = 1 << 8
INTENT_GUILD_MESSAGES = 1 << 9
INTENT_DIRECT_MESSAGES = 1 << 12
INTENT_MESSAGE_CONTENT = 1 << 15
KNOWN_INTENTS = sum(1 << b for b in (*range(0, 17), 20, 21, 24, 25))
PRIVILEGED_INTENTS = INTENT_GUILD_MEMBERS | INTENT_GUILD_PRESENCES | INTENT_MESSAGE_CONTENT

# Close codes (CODES "Gateway Close Event Codes").
CLOSE_UNKNOWN_OPCODE = 4001
CLOSE_DECODE_ERROR = 4002
CLOSE_NOT_AUTHENTICATED = 4003
CLOSE_AUTHENTICATION_FAILED = 4004
CLOSE_ALREADY_AUTHENTICATED = 4005
CLOSE_INVALID_SEQ = 4007
CLOSE_RATE_LIMITED = 4008
CLOSE_SESSION_TIMED_OUT = 4009
CLOSE_INVALID_SHARD = 4010
CLOSE_INVALID_API_VERSION = 4012
CLOSE_INVALID_INTENTS = 4013
CLOSE_DISALLOWED_INTENTS = 4014
# Codes after which the session cannot be resumed ("Reconnect and start a new session").
SESSION_ENDING_CLOSES = {CLOSE_AUTHENTICATION_FAILED, CLOSE_INVALID_SEQ, CLOSE_SESSION_TIMED_OUT,
                         *range(4010, 4015)}

# JSON error codes (CODES "JSON Error Codes").
CODE_UNKNOWN_CHANNEL = 10003
CODE_UNKNOWN_MESSAGE = 10008
CODE_MISSING_ACCESS = 50001
CODE_EDIT_OTHERS_MESSAGE = 50005
CODE_EMPTY_MESSAGE = 50006
CODE_TOO_LARGE = 40005
FLAG_VOICE_MESSAGE = 1 << 13
CODE_INVALID_FORM_BODY = 50035

MAX_PAYLOAD_BYTES = 4096  # GW "Sending Events"
MAX_CONTENT_CHARS = 2000  # MSG "Create Message" / "Edit Message"
DISCORD_EPOCH_MS = 1420070400000

_MESSAGES = re.compile(r"^/api/v10/channels/([^/]+)/messages$")
_MESSAGE = re.compile(r"^/api/v10/channels/([^/]+)/messages/([^/]+)$")
_TYPING = re.compile(r"^/api/v10/channels/([^/]+)/typing$")


@dataclass
class Channel:
    id: str
    guild_id: str | None  # None: a DM channel
    visible: bool = True  # False: the bot lacks VIEW_CHANNEL (REST answers 403 50001)


@dataclass
class Message:
    id: str
    channel_id: str
    guild_id: str | None
    author_id: str
    content: str
    at: float  # time.monotonic()
    reference: str | None = None  # message_reference.message_id
    nonce: Any = None
    edits: list[str] = field(default_factory=list)
    flags: int = 0
    files: list = field(default_factory=list)  # SentFile of each attachment


@dataclass
class Rejected:
    method: str
    path: str
    status: int
    code: int
    at: float
    body: Any


@dataclass
class RateLimitHit:
    at: float
    bucket: str  # bucket hash ("global" for the global limit)
    key: str  # bucket hash + top-level resource
    forced: bool  # injected with force_429(), not earned


@dataclass
class Session:
    id: str
    intents: int
    seq: int = 0
    events: list[tuple[int, dict]] = field(default_factory=list)  # replayable dispatches
    conn: Conn | None = None
    valid: bool = True
    detached_at: float | None = None


@dataclass
class _Bucket:
    limit: int
    per_s: float
    window_start: float = 0.0
    used: int = 0


class FakeDiscordServer(FakePlatformServer):
    ws_path = "/gateway"
    resume_path = "/resume-gateway"  # READY's resume_gateway_url points here

    def __init__(self, *, token: str = "fake-discord-bot-token", bot_id: str = "900000000000000001",
                 heartbeat_interval_ms: int = 41250, heartbeat_tolerance: float = 1.5,
                 session_ttl_s: float = 120.0, enabled_privileged: int = INTENT_MESSAGE_CONTENT,
                 max_concurrency: int = 1, reconnect_close_after_s: float = 2.0,
                 message_limit: tuple[int, float] = (5, 5.0),
                 edit_limit: tuple[int, float] = (5, 5.0),
                 typing_limit: tuple[int, float] = (5, 5.0),
                 gateway_bot_limit: tuple[int, float] = (2, 5.0),
                 global_limit: tuple[int, float] = (50, 1.0),
                 gateway_send_limit: tuple[int, float] = (120, 60.0),
                 nonce_window_s: float = 300.0,
                 upload_limit: int = 10 * 1024 * 1024) -> None:
        super().__init__()
        self.upload_limit = upload_limit
        self.files: list[SentFile] = []
        self.uploads = 0
        self.held_sends = 0
        self._release = gevent.event.Event()
        self._release.set()
        self.token = token
        self.bot_id = bot_id
        self.heartbeat_interval_ms = int(heartbeat_interval_ms)  # an integer on the wire (EV)
        # GW: "There is already tolerance in the heartbeat_interval"; its size is *unverified*.
        self.heartbeat_tolerance = heartbeat_tolerance
        self.session_ttl_s = session_ttl_s
        self.enabled_privileged = enabled_privileged
        self.max_concurrency = max_concurrency
        # EV "Reconnect": "A few seconds after the reconnect event is dispatched, the connection
        # may be closed by the server."
        self.reconnect_close_after_s = reconnect_close_after_s
        self.route_limits = {"messages": message_limit, "edit": edit_limit,
                             "typing": typing_limit, "gateway_bot": gateway_bot_limit}
        self.global_limit = global_limit
        self.gateway_send_limit = gateway_send_limit
        self.nonce_window_s = nonce_window_s
        # records
        self.messages: dict[str, Message] = {}
        self.order: list[str] = []  # message ids in creation order
        self.edits: list[tuple[str, str, float]] = []  # (message id, new content, at)
        self.typing: list[tuple[str, float]] = []  # (channel id, at)
        self.rejected: list[Rejected] = []
        self.rate_limited: list[RateLimitHit] = []
        self.rest_answers: list[tuple[float, str, str, int]] = []  # (at, method, path, status)
        self.keepalive_times: dict[int, list[float]] = {}
        self.hello_times: dict[int, tuple[float, float]] = {}  # conn -> (sent at, interval s)
        self.heartbeat_requests: list[tuple[int, float]] = []  # (conn, at) op 1 sent by us
        self.identifies: list[tuple[int, float, int]] = []  # (conn, at, intents)
        self.resumes: list[tuple[int, float, str, int]] = []  # (conn, at, session id, seq)
        self.wrong_url_resumes = 0
        self.client_close_codes: list[tuple[int, int | None]] = []  # (conn, code) sent by client
        self.nonce_hits = 0
        # state
        self.channels: dict[str, Channel] = {}
        self.dm_channels: dict[str, str] = {}  # author id -> DM channel id
        self.sessions: dict[str, Session] = {}
        self.current: Session | None = None
        self.pending: list[tuple[str, dict]] = []
        self.token_revoked = False
        self._snowflakes = itertools.count(1)
        self._buckets: dict[str, _Bucket] = {}
        self._forced_429: list[tuple[float, bool]] = []

    # -- URLs ----------------------------------------------------------------------------------
    @property
    def api_base(self) -> str:
        return f"{self.http_base}/api/v10"

    @property
    def resume_url(self) -> str:
        return f"ws://{self.host}:{self.port}{self.resume_path}"

    def snowflake(self) -> str:
        ms = int(time.time() * 1000) - DISCORD_EPOCH_MS
        return str((ms << 22) | (next(self._snowflakes) & 0x3FFFFF))

    # -- test controls: users ------------------------------------------------------------------
    def channel(self, channel_id: str, guild_id: str | None) -> Channel:
        ch = self.channels.get(channel_id)
        if ch is None:
            ch = self.channels[channel_id] = Channel(channel_id, guild_id)
        return ch

    def hide_channel(self, channel_id: str) -> None:
        """The bot loses VIEW_CHANNEL there: REST calls for it answer 403 50001."""
        self.channels[channel_id].visible = False

    def user_sends(self, text: str, *, dm: bool = False, guild_id: str = "800000000000000001",
                   channel_id: str | None = None, mention: bool = False,
                   author_id: str = "700000000000000001", author_name: str = "alice",
                   author_bot: bool = False, attachments: list[dict] | None = None,
                   reply_to: str | None = None, flags: int = 0) -> str:
        """A user (or another bot, with author_bot) posts a message; returns its id. DMs go to
        the author's DM channel (one snowflake per author, `dm_channels`); `mention` puts
        `<@bot>` in front and the bot in `mentions`."""
        if dm:
            if channel_id is None:
                channel_id = self.dm_channels.setdefault(author_id, self.snowflake())
            ch = self.channel(channel_id, None)
        else:
            ch = self.channel(channel_id or "810000000000000001", guild_id)
        content = f"<@{self.bot_id}> {text}" if mention else text
        msg = Message(self.snowflake(), ch.id, ch.guild_id, author_id, content,
                      time.monotonic(), reference=reply_to, flags=flags)
        self.messages[msg.id] = msg
        self.order.append(msg.id)
        author = {"id": author_id, "username": author_name, "global_name": author_name,
                  "discriminator": "0", "avatar": None}
        if author_bot:
            author["bot"] = True
        d = self._message_object(msg, author)
        d["mentions"] = [self._bot_user()] if mention else []
        if attachments:
            d["attachments"] = attachments
        if ch.guild_id is not None:
            d["guild_id"] = ch.guild_id
            d["member"] = {"roles": [], "joined_at": _iso(), "deaf": False, "mute": False}
        self.dispatch("MESSAGE_CREATE", d)
        return msg.id

    def user_sends_media(self, data: bytes, *, kind: str, filename: str, content_type: str,
                         text: str = "", dm: bool = True,
                         author_id: str = "700000000000000001") -> str:
        url = self.host_media(data, content_type)
        att = {"id": self.snowflake(), "filename": filename, "size": len(data), "url": url,
               "proxy_url": url, "content_type": content_type}
        if kind == "voice":
            att.update(duration_secs=2.5, waveform="AAAA")
        return self.user_sends(text, dm=dm, author_id=author_id, attachments=[att],
                               flags=FLAG_VOICE_MESSAGE if kind == "voice" else 0)

    def hold_file_sends(self) -> None:
        self._release.clear()

    def release_file_sends(self) -> None:
        self._release.set()

    def user_edits(self, msg_id: str, text: str) -> None:
        """The author edits a message: MESSAGE_UPDATE (a bot must not answer it again)."""
        msg = self.messages[msg_id]
        msg.content = text
        msg.edits.append(text)
        d = self._message_object(msg, {"id": msg.author_id, "username": "alice"})
        d["edited_timestamp"] = _iso()
        if msg.guild_id:
            d["guild_id"] = msg.guild_id
        self.dispatch("MESSAGE_UPDATE", d)

    def dispatch(self, event: str, d: Any) -> None:
        """Send any dispatch (unknown ones too) to the current session, or keep it for later."""
        session = self.current
        if session is None or not session.valid:
            self.pending.append((event, d))
            self.changed()
            return
        self._dispatch(session, event, d)

    # -- test controls: faults -----------------------------------------------------------------
    def go_zombie(self) -> None:
        """The link dies silently: nothing more reaches the client (no ACKs, no dispatches) and
        nothing from it reaches us. The session detaches (events are kept for a resume); the
        socket stays open until the client gives up on it."""
        for conn in self.live_conns():
            conn.state["zombie"] = True
            conn.expect_keepalive(1e9)  # our deadline close would never reach it either
            session = conn.state.get("session")
            if session is not None and session.conn is conn:
                self._detach(session)
        self.log_event("zombie")

    def send_reconnect(self) -> None:
        """op 7: the client should reconnect and resume; we close a few seconds later."""
        for conn in self.live_conns():
            if self._send(conn, {"op": OP_RECONNECT, "d": None}):
                gevent.spawn_later(self.reconnect_close_after_s, conn.close, None,
                                   reason="reconnect_requested")

    def invalidate_session(self, resumable: bool = False) -> None:
        """op 9 with `d` = resumable. With false the session is gone: the client must identify
        (on this socket or a new one); the socket stays open (issue #1805)."""
        for conn in self.live_conns():
            session = conn.state.get("session")
            if session is not None and not resumable:
                session.valid = False
                conn.state["session"] = None
                if session.conn is conn:
                    session.conn = None
            self._send(conn, {"op": OP_INVALID_SESSION, "d": resumable})

    def request_heartbeat(self) -> None:
        """op 1 from the server: the client must beat at once (GW "Heartbeat Requests")."""
        for conn in self.live_conns():
            if self._send(conn, {"op": OP_HEARTBEAT, "d": None}):
                self.heartbeat_requests.append((conn.id, time.monotonic()))

    def close_with(self, code: int, message: str = "") -> None:
        if code in SESSION_ENDING_CLOSES:
            for session in self.sessions.values():
                session.valid = False
        super().close_with(code, message)

    def revoke_token(self) -> None:
        """The token is reset: REST answers 401, identify/resume close 4004."""
        self.token_revoked = True

    def force_429(self, times: int = 1, retry_after: float = 1.0, global_: bool = False) -> None:
        """The next `times` rate-limited REST calls answer 429 whatever their bucket says."""
        self._forced_429.extend([(retry_after, global_)] * times)

    # -- records for tests and benchmarks ------------------------------------------------------
    def sent_messages(self, channel_id: str | None = None) -> list[Message]:
        return [self.messages[m] for m in self.order if self.messages[m].author_id == self.bot_id
                and (channel_id is None or self.messages[m].channel_id == channel_id)]

    def replies_to(self, msg_id: str) -> list[Message]:
        return [m for m in self.sent_messages() if m.reference == msg_id]

    def out_events(self, event: str | None = None, conn_id: int | None = None) -> list[dict]:
        return [f.data for f in self.frames if f.direction == "out" and isinstance(f.data, dict)
                and f.data.get("op") == OP_DISPATCH and (event is None or f.data.get("t") == event)
                and (conn_id is None or f.conn_id == conn_id)]

    def delivered_ids(self) -> list[str]:
        """MESSAGE_CREATE ids as often as they went out on the wire (replays count again)."""
        return [f["d"]["id"] for f in self.out_events("MESSAGE_CREATE")
                if isinstance(f.get("d"), dict)]

    def client_ops(self, conn_id: int | None = None) -> list[Any]:
        return [d.get("op") for d in self.frames_in(conn_id) if isinstance(d, dict)]

    def keepalive_lateness(self, conn_id: int) -> list[float]:
        """Seconds each heartbeat after the first came after its slot (first beat + k
        intervals; the first one is jittered by design, GW "Heartbeat Interval")."""
        beats = self.keepalive_times.get(conn_id, [])
        if not beats:
            return []
        interval = self.hello_times[conn_id][1]
        return [t - (beats[0] + k * interval) for k, t in enumerate(beats) if k > 0]

    # -- REST ----------------------------------------------------------------------------------
    def routes(self):
        return {
            ("GET", "/api/v10/gateway/bot"): self._gateway_bot,
            ("GET", "/api/v10/users/@me"): self._users_me,
            ("GET", "/api/v10/oauth2/applications/@me"): self._application_me,
            ("POST", "/api/v10/channels/"): self._channel_post,
            ("PATCH", "/api/v10/channels/"): self._channel_patch,
        }

    def _unauthorized(self, request: dict) -> tuple | None:
        if (not self.token_revoked
                and request["headers"].get("Authorization") == f"Bot {self.token}"):
            return None
        return self._answer(request, 401, {"message": "401: Unauthorized", "code": 0})

    def _answer(self, request: dict, status: int, body: Any, headers: dict | None = None,
                *, code: int | None = None) -> tuple:
        now = time.monotonic()
        self.rest_answers.append((now, request["method"], request["path"], status))
        if status >= 400 and status != 429:
            self.rejected.append(Rejected(request["method"], request["path"], status,
                                          code if code is not None else body.get("code", 0),
                                          now, request["json"]))
        self.changed()
        return status, body, headers or {}

    def _error(self, request: dict, status: int, code: int, message: str,
               errors: dict | None = None, headers: dict | None = None) -> tuple:
        body = {"message": message, "code": code}
        if errors:
            body["errors"] = errors
        return self._answer(request, status, body, headers, code=code)

    def _limited(self, request: dict, route: str, major: str) -> tuple[tuple | None, dict]:
        """Applies the global limit and the route's bucket; returns (a 429 answer or None,
        the X-RateLimit headers for a normal answer)."""
        now = time.monotonic()
        g = self._bucket("global", *self.global_limit, now)
        bucket_hash = f"{route}-bucket"
        key = f"{bucket_hash}:{major}"
        b = self._bucket(key, *self.route_limits[route], now)
        if self._forced_429:
            retry_after, global_ = self._forced_429.pop(0)
            return self._429(request, bucket_hash, key, b, retry_after, global_, True), {}
        if g.used >= g.limit:
            retry = g.window_start + g.per_s - now
            return self._429(request, "global", "global", g, retry, True, False), {}
        if b.used >= b.limit:
            retry = b.window_start + b.per_s - now
            return self._429(request, bucket_hash, key, b, retry, False, False), {}
        g.used += 1
        b.used += 1
        return None, self._rl_headers(bucket_hash, b, now)

    def _bucket(self, key: str, limit: int, per_s: float, now: float) -> _Bucket:
        b = self._buckets.get(key)
        if b is None:
            b = self._buckets[key] = _Bucket(limit, per_s, now)
        if now >= b.window_start + b.per_s:
            b.window_start, b.used = now, 0
        return b

    @staticmethod
    def _rl_headers(bucket_hash: str, b: _Bucket, now: float) -> dict:
        reset_after = max(0.0, b.window_start + b.per_s - now)
        return {"X-RateLimit-Limit": str(b.limit),
                "X-RateLimit-Remaining": str(max(0, b.limit - b.used)),
                "X-RateLimit-Reset": f"{time.time() + reset_after:.3f}",
                "X-RateLimit-Reset-After": f"{reset_after:.3f}",
                "X-RateLimit-Bucket": bucket_hash}

    def _429(self, request: dict, bucket_hash: str, key: str, b: _Bucket, retry_after: float,
             global_: bool, forced: bool) -> tuple:
        retry_after = round(max(0.001, retry_after), 3)
        self.rate_limited.append(RateLimitHit(time.monotonic(), bucket_hash, key, forced))
        headers = {"Retry-After": str(math.ceil(retry_after)), "Via": "1.1 google",
                   "X-RateLimit-Scope": "global" if global_ else "user"}
        if global_:
            headers["X-RateLimit-Global"] = "true"
        else:
            headers.update(self._rl_headers(bucket_hash, b, time.monotonic()))
            headers["X-RateLimit-Remaining"] = "0"
            headers["X-RateLimit-Reset-After"] = f"{retry_after:.3f}"
        body = {"message": "You are being rate limited.", "retry_after": retry_after,
                "global": global_}
        return self._answer(request, 429, body, headers)

    def _gateway_bot(self, request: dict) -> tuple:
        denied = self._unauthorized(request)
        if denied:
            return denied
        limited, headers = self._limited(request, "gateway_bot", "")
        if limited:
            return limited
        return self._answer(request, 200, {
            "url": self.ws_url, "shards": 1,
            "session_start_limit": {"total": 1000, "remaining": 1000 - len(self.identifies),
                                    "reset_after": 86_400_000,
                                    "max_concurrency": self.max_concurrency}}, headers)

    def _users_me(self, request: dict) -> tuple:
        """The bot's own user (discord.py's login asks for it before anything else)."""
        return self._unauthorized(request) or self._answer(request, 200, self._bot_user())

    def _application_me(self, request: dict) -> tuple:
        """The bot's application (discord.py's login asks for it too)."""
        return self._unauthorized(request) or self._answer(request, 200, {
            "id": self.bot_id, "name": "hermes-fake", "description": "", "icon": None,
            "bot_public": False, "bot_require_code_grant": False, "verify_key": "0" * 64,
            "owner": {"id": "700000000000000099", "username": "owner", "discriminator": "0",
                      "avatar": None}, "flags": 0})

    def _channel_for(self, request: dict, channel_id: str) -> tuple | Channel:
        ch = self.channels.get(channel_id)
        if ch is None:
            return self._error(request, 404, CODE_UNKNOWN_CHANNEL, "Unknown Channel")
        if not ch.visible:
            return self._error(request, 403, CODE_MISSING_ACCESS, "Missing Access")
        return ch

    def _channel_post(self, request: dict) -> tuple:
        denied = self._unauthorized(request)
        if denied:
            return denied
        path = request["path"]
        m = _MESSAGES.match(path)
        t = _TYPING.match(path) if m is None else None
        if m is None and t is None:
            return self._error(request, 404, 0, "404: Not Found")
        channel_id = (m or t).group(1)
        limited, headers = self._limited(request, "messages" if m else "typing", channel_id)
        if limited:
            return limited
        ch = self._channel_for(request, channel_id)
        if not isinstance(ch, Channel):
            return ch
        if t is not None:
            self.typing.append((ch.id, time.monotonic()))
            return self._answer(request, 204, b"", headers)  # CH: 204, no body
        return self._create_message(request, ch, headers)

    def _create_message(self, request: dict, ch: Channel, headers: dict) -> tuple:
        body = request["json"]
        files: list[SentFile] = []
        if request["headers"].get("Content-Type", "").startswith("multipart/"):
            self.uploads += 1  # upload and send are one request here
            if not self._release.is_set():
                self.held_sends += 1
                self.changed()
                self._release.wait()
                return self._error(request, 502, 0, "dropped")
            parsed = self._multipart_body(request)
            if isinstance(parsed, tuple) and len(parsed) == 3 and isinstance(parsed[0], int):
                return parsed  # an error answer
            body, files = parsed
        if not isinstance(body, dict):
            return self._error(request, 400, CODE_INVALID_FORM_BODY, "Invalid Form Body",
                               {"_errors": [{"code": "DICT_TYPE_CONVERT",
                                             "message": "Only dictionaries may be used"}]})
        content = body.get("content")
        if content is not None and not isinstance(content, str):
            return self._form_error(request, "content", "BASE_TYPE_STRING",
                                    "Could not interpret value as string.")
        if not content and not files:
            return self._error(request, 400, CODE_EMPTY_MESSAGE, "Cannot send an empty message")
        if len(content) > MAX_CONTENT_CHARS:
            return self._form_error(request, "content", "BASE_TYPE_MAX_LENGTH",
                                    f"Must be {MAX_CONTENT_CHARS} or fewer in length.")
        reference = body.get("message_reference")
        ref_id = None
        if reference is not None:
            reference = reference if isinstance(reference, dict) else {}
            ref_id = _snowflake(reference.get("message_id"))
            target = self.messages.get(ref_id) if ref_id else None
            fail = reference.get("fail_if_not_exists", True)
            if target is None or target.channel_id != ch.id:
                if fail is not False:
                    # Discord's inner error code here is *unverified*; the 50035 is documented.
                    return self._form_error(request, "message_reference",
                                            "MESSAGE_REFERENCE_UNKNOWN_MESSAGE", "Unknown message")
                ref_id = None
        nonce = body.get("nonce")
        if nonce is not None and (not isinstance(nonce, (str, int)) or isinstance(nonce, bool)
                                  or len(str(nonce)) > 25):
            return self._form_error(request, "nonce", "BASE_TYPE_MAX_LENGTH",
                                    "Must be 25 or fewer in length.")
        if nonce is not None and body.get("enforce_nonce"):
            now = time.monotonic()
            for mid in reversed(self.order):
                old = self.messages[mid]
                if now - old.at > self.nonce_window_s:
                    break
                if old.author_id == self.bot_id and old.nonce == nonce:
                    self.nonce_hits += 1
                    return self._answer(request, 200, self._message_object(old, self._bot_user()),
                                        headers)
        msg = Message(self.snowflake(), ch.id, ch.guild_id, self.bot_id, content or "",
                      time.monotonic(), reference=ref_id, nonce=nonce,
                      files=[SentFile(ref_id or "", f.name, f.data, f.media) for f in files])
        self.messages[msg.id] = msg
        self.order.append(msg.id)
        self.files.extend(msg.files)
        self.changed()
        return self._answer(request, 200, self._message_object(msg, self._bot_user()), headers)

    def _multipart_body(self, request: dict):
        """payload_json + files[n] -> (body, files) or an error answer (MSG "Uploading
        Files": every file part is named files[n] and announced as attachments[].id = n)."""
        try:
            fields, parts = parse_multipart(request)
            body = json.loads(fields.get("payload_json", "{}"))
        except ValueError:
            return self._error(request, 400, CODE_INVALID_FORM_BODY, "Invalid Form Body")
        announced = body.get("attachments") if isinstance(body, dict) else None
        if not isinstance(announced, list) or not announced:
            return self._form_error(request, "attachments", "BASE_TYPE_REQUIRED",
                                    "This field is required")
        files = []
        for item in announced:
            part = parts.get(f"files[{item.get('id')}]") if isinstance(item, dict) else None
            if part is None:
                return self._form_error(request, "attachments", "ATTACHMENT_NOT_FOUND",
                                        "Unknown attachment")
            if len(part.data) > self.upload_limit:
                return self._error(request, 413, CODE_TOO_LARGE, "Request entity too large")
            ctype = part.content_type or ""
            media = "image" if ctype.startswith("image/") else "file"
            files.append(SentFile("", item.get("filename") or part.filename or "", part.data,
                                  media))
        if len(parts) != len(files):
            return self._form_error(request, "files", "UNANNOUNCED_FILE",
                                    "Every file must be announced in attachments")
        return body, files

    def _form_error(self, request: dict, key: str, code: str, message: str) -> tuple:
        # REF "Error Messages": v8+ form errors name the key, an error code and a message.
        return self._error(request, 400, CODE_INVALID_FORM_BODY, "Invalid Form Body",
                           {key: {"_errors": [{"code": code, "message": message}]}})

    def _channel_patch(self, request: dict) -> tuple:
        denied = self._unauthorized(request)
        if denied:
            return denied
        m = _MESSAGE.match(request["path"])
        if m is None:
            return self._error(request, 404, 0, "404: Not Found")
        channel_id, msg_id = m.groups()
        limited, headers = self._limited(request, "edit", channel_id)
        if limited:
            return limited
        ch = self._channel_for(request, channel_id)
        if not isinstance(ch, Channel):
            return ch
        msg = self.messages.get(msg_id)
        if msg is None or msg.channel_id != ch.id:
            return self._error(request, 404, CODE_UNKNOWN_MESSAGE, "Unknown Message")
        if msg.author_id != self.bot_id:
            return self._error(request, 403, CODE_EDIT_OTHERS_MESSAGE,
                               "Cannot edit a message authored by another user")
        body = request["json"] if isinstance(request["json"], dict) else {}
        content = body.get("content")
        if content is not None:
            if not isinstance(content, str):
                return self._form_error(request, "content", "BASE_TYPE_STRING",
                                        "Could not interpret value as string.")
            if len(content) > MAX_CONTENT_CHARS:
                return self._form_error(request, "content", "BASE_TYPE_MAX_LENGTH",
                                        f"Must be {MAX_CONTENT_CHARS} or fewer in length.")
            msg.content = content
            msg.edits.append(content)
            self.edits.append((msg.id, content, time.monotonic()))
        return self._answer(request, 200, self._message_object(msg, self._bot_user()), headers)

    def _bot_user(self) -> dict:
        return {"id": self.bot_id, "username": "hermes-fake", "global_name": None,
                "discriminator": "0", "avatar": None, "bot": True}

    def _message_object(self, msg: Message, author: dict) -> dict:
        d = {"id": msg.id, "channel_id": msg.channel_id, "author": author,
             "content": msg.content, "timestamp": _iso(), "edited_timestamp": None,
             "tts": False, "mention_everyone": False, "mentions": [], "mention_roles": [],
             "attachments": [], "embeds": [], "pinned": False, "type": 0, "flags": 0}
        if msg.reference:
            d["type"] = 19  # REPLY
            d["message_reference"] = {"type": 0, "message_id": msg.reference,
                                      "channel_id": msg.channel_id}
            if msg.guild_id:
                d["message_reference"]["guild_id"] = msg.guild_id
        if msg.nonce is not None:
            d["nonce"] = msg.nonce
        if msg.flags:
            d["flags"] = msg.flags
        return d

    # -- gateway -------------------------------------------------------------------------------
    def decode(self, raw: str | bytes) -> Any:
        if len(raw if isinstance(raw, bytes) else raw.encode()) > MAX_PAYLOAD_BYTES:
            return _TooLarge()
        try:
            return json.loads(raw)
        except (ValueError, RecursionError):
            return _Undecodable()

    def _send(self, conn: Conn, data: dict) -> bool:
        if conn.state.get("zombie"):
            return False
        compressor = conn.state.get("zlib")
        if compressor is None:
            return conn.send(data)
        # GW "Transport Compression": one zlib context per connection, each payload ends
        # with a Z_SYNC_FLUSH (00 00 ff ff) and goes out as a binary frame.
        if conn.closed.is_set() or self.silent_until > time.monotonic():
            return False
        raw = json.dumps(data, ensure_ascii=False).encode()
        try:
            conn.ws.send(compressor.compress(raw) + compressor.flush(zlib.Z_SYNC_FLUSH),
                         binary=True)
        except Exception:
            conn.close(None, reason="send_failed")
            return False
        self.record("out", conn, data)
        return True

    def on_connect(self, conn: Conn, request: dict) -> bool:
        query = parse_qs(request.get("query") or "")
        conn.state.update(session=None, path=request["path"], sends=[],
                          resume_url=request["path"].rstrip("/") == self.resume_path)
        self.keepalive_times[conn.id] = []
        self._record_close_code(conn)
        if query.get("v") != ["10"]:
            conn.close(CLOSE_INVALID_API_VERSION, "Invalid API version", reason="bad_version")
            return True
        if query.get("encoding", ["json"]) != ["json"]:
            conn.close(CLOSE_DECODE_ERROR, "Only json encoding here", reason="bad_encoding")
            return True
        if query.get("compress") == ["zlib-stream"]:
            conn.state["zlib"] = zlib.compressobj()
        elif "compress" in query:  # zstd-stream exists (GW) but this fake does not speak it
            conn.close(CLOSE_DECODE_ERROR, "Unsupported compression", reason="bad_compress")
            return True
        interval_s = self.heartbeat_interval_ms / 1000.0
        # The first beat comes after interval * jitter (<= 1 interval), later ones every
        # interval: one deadline of interval * tolerance covers both.
        conn.expect_keepalive(interval_s * self.heartbeat_tolerance, None)
        hello = {"op": OP_HELLO, "d": {"heartbeat_interval": self.heartbeat_interval_ms},
                 "s": None, "t": None}
        if self._send(conn, hello):
            self.hello_times[conn.id] = (time.monotonic(), interval_s)
        return True

    def _record_close_code(self, conn: Conn) -> None:
        """Keeps the code of the client's close frame in conn.state["client_close_code"]
        (gevent-websocket reads it but does not keep it, and its WebSocket has __slots__)."""
        def record(code: int | None) -> None:
            conn.state["client_close_code"] = code
            self.client_close_codes.append((conn.id, code))

        _CLOSE_LISTENERS[id(conn.ws)] = record
        conn.ws.__class__ = _CloseCodeWebSocket
        gevent.spawn(lambda: (conn.closed.wait(), _CLOSE_LISTENERS.pop(id(conn.ws), None)))

    def on_frame(self, conn: Conn, data: Any) -> None:
        if conn.state.get("zombie"):
            return  # lost on the dead link
        if not self._within_send_limit(conn):
            return conn.close(CLOSE_RATE_LIMITED, "Rate limited.", reason="gateway_rate_limited")
        if isinstance(data, _TooLarge):
            return conn.close(CLOSE_DECODE_ERROR, "Payload too large", reason="payload_too_large")
        if isinstance(data, _Undecodable) or not isinstance(data, dict):
            return conn.close(CLOSE_DECODE_ERROR, "Error while decoding payload.",
                              reason="bad_payload")
        op = data.get("op")
        if not isinstance(op, int) or isinstance(op, bool) or op not in CLIENT_OPS:
            return conn.close(CLOSE_UNKNOWN_OPCODE, "Unknown opcode.", reason="bad_opcode")
        d = data.get("d")
        if op == OP_HEARTBEAT:
            return self._heartbeat(conn, d)
        if op == OP_IDENTIFY:
            return self._identify(conn, d)
        if op == OP_RESUME:
            return self._resume(conn, d)
        if conn.state["session"] is None:
            return conn.close(CLOSE_NOT_AUTHENTICATED, "Not authenticated.",
                              reason="not_authenticated")
        # presence / voice / member requests: accepted and ignored

    def _within_send_limit(self, conn: Conn) -> bool:
        limit, per_s = self.gateway_send_limit
        now = time.monotonic()
        sends = [t for t in conn.state["sends"] if now - t < per_s]
        sends.append(now)
        conn.state["sends"] = sends
        return len(sends) <= limit

    def _heartbeat(self, conn: Conn, d: Any) -> None:
        if d is not None and (not isinstance(d, int) or isinstance(d, bool)):
            return conn.close(CLOSE_UNKNOWN_OPCODE, "Invalid heartbeat payload.",
                              reason="bad_heartbeat")
        conn.keepalive()
        self.keepalive_times[conn.id].append(time.monotonic())
        self._send(conn, {"op": OP_HEARTBEAT_ACK, "d": None, "s": None, "t": None})

    def _token_ok(self, token: Any) -> bool:
        return not self.token_revoked and token == self.token

    def _identify(self, conn: Conn, d: Any) -> None:
        if conn.state["session"] is not None:
            return conn.close(CLOSE_ALREADY_AUTHENTICATED, "Already authenticated.",
                              reason="double_identify")
        if not isinstance(d, dict) or not isinstance(d.get("properties"), dict):
            return conn.close(CLOSE_DECODE_ERROR, "Invalid identify payload.",
                              reason="bad_identify")
        if not self._token_ok(d.get("token")):
            self.log_event("identify_bad_token", conn)
            return conn.close(CLOSE_AUTHENTICATION_FAILED, "Authentication failed.",
                              reason="bad_token")
        intents = d.get("intents")
        if (not isinstance(intents, int) or isinstance(intents, bool) or intents < 0
                or intents & ~KNOWN_INTENTS):
            return conn.close(CLOSE_INVALID_INTENTS, "Invalid intent(s).", reason="bad_intents")
        if intents & PRIVILEGED_INTENTS & ~self.enabled_privileged:
            return conn.close(CLOSE_DISALLOWED_INTENTS, "Disallowed intent(s).",
                              reason="disallowed_intents")
        shard = d.get("shard")
        if shard is not None and (
                not isinstance(shard, list) or len(shard) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in shard)
                or not 0 <= shard[0] < shard[1]):
            return conn.close(CLOSE_INVALID_SHARD, "Invalid shard.", reason="bad_shard")
        now = time.monotonic()
        recent = [t for _, t, _ in self.identifies if now - t < 5.0]
        if len(recent) >= self.max_concurrency:
            self.log_event("identify_too_fast", conn)
            self._send(conn, {"op": OP_INVALID_SESSION, "d": False, "s": None, "t": None})
            return
        self.identifies.append((conn.id, now, intents))
        session = Session(uuid.uuid4().hex, intents)
        self.sessions[session.id] = session
        self.current = session
        self._bind(session, conn)
        self.log_event("identify", conn)
        self._dispatch(session, "READY", {
            "v": 10, "user": self._bot_user(), "guilds": [], "session_id": session.id,
            "resume_gateway_url": self.resume_url, "shard": shard or [0, 1],
            "application": {"id": self.bot_id, "flags": 0}}, store=False)
        pending, self.pending = self.pending, []
        for event, payload in pending:
            self._dispatch(session, event, payload)

    def _resume(self, conn: Conn, d: Any) -> None:
        if conn.state["session"] is not None:
            return conn.close(CLOSE_ALREADY_AUTHENTICATED, "Already authenticated.",
                              reason="double_resume")
        if not isinstance(d, dict):
            return conn.close(CLOSE_DECODE_ERROR, "Invalid resume payload.", reason="bad_resume")
        if not self._token_ok(d.get("token")):
            self.log_event("resume_bad_token", conn)
            return conn.close(CLOSE_AUTHENTICATION_FAILED, "Authentication failed.",
                              reason="bad_token")
        session = self.sessions.get(d.get("session_id")) if isinstance(
            d.get("session_id"), str) else None
        if session is not None and session.conn is None and session.detached_at is not None \
                and time.monotonic() - session.detached_at > self.session_ttl_s:
            session.valid = False  # timed out while nobody was connected
        if session is None or not session.valid:
            self.log_event("resume_refused", conn)
            self._send(conn, {"op": OP_INVALID_SESSION, "d": False, "s": None, "t": None})
            return
        seq = d.get("seq")
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= session.seq:
            session.valid = False
            return conn.close(CLOSE_INVALID_SEQ, "Invalid seq.", reason="bad_seq")
        if not conn.state["resume_url"]:
            self.wrong_url_resumes += 1
        missed = [frame for s, frame in session.events if s > seq]  # snapshot, then bind
        self.resumes.append((conn.id, time.monotonic(), session.id, seq))
        self._bind(session, conn)
        self.log_event("resume", conn)
        for frame in missed:
            self._send(conn, frame)
        self._dispatch(session, "RESUMED", {}, store=False)  # d is an object (discord.py reads it)

    def _bind(self, session: Session, conn: Conn) -> None:
        old = session.conn
        if old is not None and old is not conn and not old.closed.is_set():
            old.close(None, reason="kicked")  # the code Discord uses here is *unverified*
        session.conn, session.detached_at = conn, None
        conn.state["session"] = session
        gevent.spawn(self._detach_when_closed, session, conn)

    def _detach_when_closed(self, session: Session, conn: Conn) -> None:
        conn.closed.wait()
        if session.conn is conn:
            self._detach(session)
        # GW "Initiating a Disconnect": a client close with 1000/1001 ends the session (unless
        # the link was dead: then that close frame never reached the server).
        if conn.state.get("client_close_code") in (1000, 1001) and not conn.state.get("zombie"):
            session.valid = False

    def _detach(self, session: Session) -> None:
        session.conn, session.detached_at = None, time.monotonic()
        self.changed()

    def _dispatch(self, session: Session, event: str, d: Any, *, store: bool = True) -> None:
        if event in ("MESSAGE_CREATE", "MESSAGE_UPDATE") and isinstance(d, dict):
            d = self._filter_for_intents(session, d)
            if d is None:
                return
        session.seq += 1
        frame = {"op": OP_DISPATCH, "s": session.seq, "t": event, "d": d}
        if store:
            session.events.append((session.seq, frame))
        conn = session.conn
        if conn is not None and not conn.closed.is_set():
            self._send(conn, frame)
        else:
            self.changed()

    def _filter_for_intents(self, session: Session, d: dict) -> dict | None:
        """GW "List of Intents" and "Message Content Intent"."""
        is_guild = "guild_id" in d
        needed = INTENT_GUILD_MESSAGES if is_guild else INTENT_DIRECT_MESSAGES
        if not session.intents & needed:
            return None
        mentioned = any(isinstance(u, dict) and u.get("id") == self.bot_id
                        for u in d.get("mentions") or [])
        if is_guild and not mentioned and not session.intents & INTENT_MESSAGE_CONTENT:
            d = {**d, "content": "", "attachments": [], "embeds": []}
        return d


_CLOSE_LISTENERS: dict[int, Any] = {}  # id(ws) -> record(code), while the connection lives


class _CloseCodeWebSocket(WebSocket):
    """gevent-websocket's WebSocket that reports the code of the peer's close frame."""
    __slots__ = ()

    def handle_close(self, header, payload):
        listener = _CLOSE_LISTENERS.get(id(self))
        if listener is not None:
            listener(struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None)
        return super().handle_close(header, payload)


class _TooLarge:
    """A client payload over 4096 bytes (closed with 4002)."""


class _Undecodable:
    """A client payload that is not JSON (closed with 4002)."""


def _snowflake(value: Any) -> str | None:
    """Snowflakes arrive as strings or integers (discord.py sends integers): the string form."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return str(value)
    if isinstance(value, str) and value.isdigit():
        return value
    return None


def _iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000000+00:00", time.gmtime())


class Driver(PlatformDriver):
    """The fleet's and the contract kit's handle on this fake (see testing/driver.py)."""
    platform = "discord"
    max_reply_chars = 2000

    def __init__(self, keepalive: Keepalive | None = None, *, secret: str | None = None) -> None:
        super().__init__(keepalive, secret=secret)
        k = self.keepalive
        self.fake = FakeDiscordServer(
            **({"token": secret} if secret else {}),
            heartbeat_interval_ms=int(k.interval_s * 1000),
            heartbeat_tolerance=k.deadline_s / k.interval_s,
            # a fleet's users write faster than one channel's default bucket lets a bot answer
            message_limit=(50, 1.0), edit_limit=(50, 1.0), typing_limit=(50, 1.0),
            gateway_bot_limit=(50, 1.0))

    def bot_config(self, **extra: Any) -> dict:
        return {"token": self.fake.token, "api_base": self.fake.api_base, **extra}

    def bad_credentials_config(self, **extra: Any) -> dict:
        return self.bot_config(token="not-a-token-the-server-knows", **extra)

    def user_says(self, text: str, *, chat: int = 0, user: int | None = None,
                  group: bool = False) -> str:
        author = str(700000000000000001 + (chat if user is None else user))
        if group:
            return self.fake.user_sends(text, mention=True, author_id=author,
                                        channel_id=str(810000000000000001 + chat))
        return self.fake.user_sends(text, dm=True, author_id=author)

    def redeliver(self, message_id: str) -> None:
        msg = self.fake.messages[message_id]
        d = self.fake._message_object(msg, {"id": msg.author_id, "username": "again",
                                            "discriminator": "0", "avatar": None})
        d["mentions"] = [self.fake._bot_user()] if f"<@{self.fake.bot_id}>" in msg.content else []
        if msg.guild_id is not None:
            d["guild_id"] = msg.guild_id
        self.fake.dispatch("MESSAGE_CREATE", d)

    def reply_rows(self) -> list[ReplyRow]:
        return [ReplyRow(m.reference, m.edits[-1] if m.edits else m.content, m.at)
                for m in self.fake.sent_messages() if m.reference is not None
                and not m.files]  # a file message is in files_sent()

    def go_silent(self, seconds: float) -> None:
        """The live connections go silent for good (new ones work): the client must notice."""
        self.fake.go_zombie()

    def end_silence(self) -> None:
        """Nothing to end: only the connections that were live went silent, and they are gone."""

    def user_sends_media(self, data: bytes, *, kind: str, name: str, mime: str,
                         transcript: str | None = None, chat: int = 0) -> str:
        return self.fake.user_sends_media(data, kind=kind, filename=name, content_type=mime,
                                          author_id=str(700000000000000001 + chat))

    def uploads(self) -> int:
        return self.fake.uploads

    def lateness(self) -> list[float]:
        return [max(0.0, x) for conn_id in list(self.fake.keepalive_times)
                for x in self.fake.keepalive_lateness(conn_id)]

    def session_up_at(self, conn_id: int) -> float | None:
        return next((f.at for f in self.fake.frames if f.direction == "out"
                     and f.conn_id == conn_id and isinstance(f.data, dict)
                     and f.data.get("t") in ("READY", "RESUMED")), None)
