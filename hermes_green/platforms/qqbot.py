"""QQ Bot (official open platform, gateway v2): C2C and group @-messages over the gateway
WebSocket, passive replies over REST.

The protocol, as this module speaks it (shared/PROTOCOLS.md, "QQ Bot"):

    prepare()      app access token (cached, renewed early, dropped once on a 401), then
                   GET {api_base}/gateway/bot -> the wss URL
    op 10 Hello    start the heartbeat on the interval it announces (never before: a default
                   timetable sends nothing until it expires), then op 2 Identify, or op 6 Resume
                   when we hold a session id and the last seq (kept in `saved_state`, so a
                   restart resumes too: the platform replays what came while we were away,
                   for as long as it keeps the session; the window is not published)
    op 0 READY / RESUMED                 -> ready
    op 0 C2C_MESSAGE_CREATE / GROUP_AT_MESSAGE_CREATE -> InboundMessage, then the seq advances
                   and is saved (after the journal took the message: resuming from an older seq
                   only replays what the journal recognizes; a newer one would skip messages)
    op 1 beat {"d": last seq}, op 11 ack -> keepalive answered
    op 7 Reconnect -> drop the socket and resume at once; op 9 Invalid Session -> identify fresh
                   (the server closes the socket behind both; we do not wait for it)
    leaving        cut the TCP connection without a close frame (see `close_frame_on_leave`)
    close codes    see `close_action`
    check()        the token, GET /users/@me (the bot's identity) and GET /gateway/bot
    send(out)      POST /v2/users/{openid}/messages or /v2/groups/{group_openid}/messages with
                   msg_seq = part index + 1, so a re-send repeats the pair and 40054005 means
                   "already delivered". A reply is passive (msg_id) only within the message's
                   window (60 min C2C, 5 min group, less a safety margin); an answer that comes
                   later goes out proactively (no msg_id), which QQ limits to a few a month per
                   chat. A refused proactive send is undeliverable: reported by the gateway (log
                   line, metric, /healthz count), never only buried in the dead outbox. A
                   proactive send has no dedupe key on the wire: a crash between the server
                   accepting it and the outbox row being deleted can repeat it.

Media (botpy api.py post_c2c_file / post_group_file and the platform's rich-media docs; users'
reports for `file_data` and `asr_refer_text`):
    in             message `attachments[]`: {content_type ("image/jpeg", "voice", "video/mp4",
                   "file"), url (sometimes "//host/..."), filename, size}; voice also carries
                   `asr_refer_text` (the platform's transcript: handed up as text, no audio
                   fetched) and `voice_wav_url` (the audio as WAV, fetched when there is no
                   transcript). URLs need no token.
    out            POST /v2/users|groups/{openid}/files {file_type 1 image (png/jpg) | 2 video
                   (mp4) | 3 voice (silk), file_data (base64), srv_send_msg: false} ->
                   {file_uuid, file_info, ttl}; then the reply {msg_type: 7, media: {file_info},
                   msg_id, msg_seq} like a text part (the same 5-replies rule and window).
                   file_type 4 (any file) is "not open" to bots (botpy's docs): other files
                   go out as a text line naming them.
Facts not verified against the live platform are marked *unverified*.
"""
from __future__ import annotations

import base64
import json
import math
import time
from typing import Any, Callable
from urllib.parse import quote

from .. import rest

from pydantic import Field, SecretStr

from ..models import Attachment, InboundMessage, OutboundMessage
from .base import ConnectionLost, FatalPlatformError, JournalFailure, SendError
from .botconfig import BotConfig
from .kit import CachedToken, http_session, is_int, json_object, retry_after_s
from .media import MediaRefused, MediaSource, OutboundFile, read_file
from .registry import PlatformSpec
from .transports.websocket import CloseAction, WebSocketAdapter

OP_DISPATCH = 0
OP_HEARTBEAT = 1
OP_IDENTIFY = 2
OP_RESUME = 6
OP_RECONNECT = 7
OP_INVALID_SESSION = 9
OP_HELLO = 10
OP_HEARTBEAT_ACK = 11
OP_HTTP_CALLBACK_ACK = 12

EVENT_C2C = "C2C_MESSAGE_CREATE"
EVENT_GROUP_AT = "GROUP_AT_MESSAGE_CREATE"

# A repeated (msg_id, msg_seq) pair: the reply went out before (we re-sent after a restart).
CODE_DUPLICATE_REPLY = 40054005
MAX_REPLY_PARTS = 5  # passive replies allowed per inbound message
PASSIVE_MARGIN_S = 15.0  # stop using msg_id this long before its window closes (request time)
# Our choice: the platform's limit for one text message is *unverified*; 2000 characters stays
# well inside what users report working and keeps 5 parts at 10,000 characters.
REPLY_CHUNK_CHARS = 2000

# The token endpoint hands out a new token only in the last 60 s of the old one (before that it
# returns the same token with its remaining life), and both stay valid during those 60 s. So we
# renew min(50 s, 20 % of the life) before expiry: inside that window, never after expiry.
TOKEN_RENEW_MARGIN_S = 50.0
TOKEN_RENEW_FRACTION = 0.2
# Token endpoint codes that mean the credentials are wrong for good; any other failure is
# retried with backoff (100001 too many requests, 100002 internal error, HTTP 5xx, timeouts).
FATAL_TOKEN_CODES = {
    100007: "appid invalid, or the bot is banned or deleted",
    100016: "invalid appid or secret",
    10004: "no bot with this appid",
}
REST_TIMEOUT = (5.0, 20.0)  # (connect, read) seconds
SESSION_KEY = "session"  # saved_state: {"session_id", "seq"} of the session to resume

# Gateway close codes (the platform's docs; see close_action).
FATAL_CLOSE_CODES = {
    4010: "invalid shard", 4011: "too many guilds for one shard", 4012: "invalid version",
    4013: "invalid intents", 4014: "intents not permitted", 4914: "bot offline (sandbox only)",
    4915: "bot banned",
}
CLOSE_BAD_TOKEN = 4004
REIDENTIFY_CLOSE_CODES = frozenset({4001, 4002, 4006, 4007, *range(4900, 4914)})

MIN_HEARTBEAT_S = 0.05  # a Hello announcing less is clamped (the platform says ~41 s)
HANDSHAKE_TIMEOUT_S = 20.0  # connect -> READY/RESUMED, else the connection is a zombie
MAX_ATTACHMENTS = 20
MAX_ID_CHARS = 512
FILE_TYPES = {"image": 1, "video": 2}  # rich media a bot may send (3 voice needs SILK)
UPLOAD_LIMITS = {"image": 10 * 1024 * 1024, "video": 10 * 1024 * 1024}  # *unverified*


def _nonempty_str(value: Any) -> str:
    """`value` when it is a usable identifier, else ""."""
    if isinstance(value, str) and value.strip() and len(value) <= MAX_ID_CHARS:
        return value
    return ""


def attachment_kind(content_type: str) -> str:
    """QQ's `content_type` ("image/jpeg", "voice", "video/mp4", "file") -> Attachment.kind."""
    ct = content_type.lower()
    if ct.startswith("image"):
        return "image"
    if ct.startswith(("voice", "audio")):
        return "voice"
    if ct.startswith("video"):
        return "video"
    if ct:
        return "file"
    return "other"


class AccessToken(CachedToken):
    """The app access token (see CachedToken): fetched with app id + client secret, renewed
    min(50 s, 20 % of its life) before expiry, since the platform hands out a new token only
    in the old one's last 60 s.

    `get()` raises FatalPlatformError for credentials the platform refuses for good and
    ConnectionLost for anything worth retrying later. Messages never contain the secret.
    """

    def __init__(self, http: rest.Session, url: str, app_id: str, secret, *,
                 clock: Callable[[], float], log) -> None:
        super().__init__(self._fetch_once, clock=clock, renew_margin=lambda life: min(
            TOKEN_RENEW_MARGIN_S, TOKEN_RENEW_FRACTION * life))
        self._http, self._url, self._app_id, self._secret = http, url, app_id, secret
        self.log = log

    def _fetch_once(self) -> tuple[str, float]:
        try:
            resp = self._http.post(self._url, timeout=REST_TIMEOUT, json={
                "appId": self._app_id, "clientSecret": self._secret.get_secret_value()})
        except rest.RequestException as e:
            raise ConnectionLost("token_unreachable", type(e).__name__) from None
        body = json_object(resp)
        token, expires_in = body.get("access_token"), body.get("expires_in")
        if resp.status_code == 200 and isinstance(token, str) and token:
            try:
                life = float(expires_in)  # a string of seconds, e.g. "7200"
            except (TypeError, ValueError):
                raise ConnectionLost("token_bad_answer", "expires_in is not a number") from None
            if not math.isfinite(life) or life <= 0:
                raise ConnectionLost("token_bad_answer", "expires_in is not positive")
            self.log.info("token fetched platform=qqbot expires_in_s=%.0f renew_in_s=%.0f",
                          life, life - self._renew_margin(life))
            return token, life
        code = body.get("code")
        if is_int(code) and code in FATAL_TOKEN_CODES:
            raise FatalPlatformError(f"token endpoint refused app {self._app_id}: "
                                     f"code {code} ({FATAL_TOKEN_CODES[code]})")
        if resp.status_code in (400, 401, 403):  # *unverified*: the endpoint answers 200 + code
            raise FatalPlatformError(f"token endpoint refused app {self._app_id}: "
                                     f"HTTP {resp.status_code} code {code}")
        raise ConnectionLost("token_failed", f"HTTP {resp.status_code} code {code}")


class QQBotConfig(BotConfig):
    app_id: str
    client_secret: SecretStr
    api_base: str = "https://api.sgroup.qq.com"
    token_url: str = "https://bots.qq.com/app/getAppAccessToken"
    # GROUP_AND_C2C_EVENT (1<<25); add 1<<30 / 1<<12 for guild channels and guild DMs.
    intents: int = 1 << 25
    # How long a passive reply (with msg_id) is accepted after the user's message (send.html:
    # 60 min in C2C, 5 min in groups); later answers go out proactively.
    passive_window_c2c_s: float = Field(3600.0, gt=0)
    passive_window_group_s: float = Field(300.0, gt=0)


class QQBotAdapter(WebSocketAdapter):
    # Resume replays dispatches after the last seq we recorded: a journal failure drops the
    # connection before the seq moves, and the resumed session brings the event again.
    on_journal_failure = JournalFailure.REPLAY
    single_connection = True  # one session per shard; identify budget shared
    """The QQ Bot gateway (v2) plus passive replies. See the module docstring for the flow."""

    name = "qqbot"
    max_unanswered_beats = 2  # two beats without an op 11 -> zombie, reconnect and resume
    # Discord's gateway, which this one mirrors, ends a session whose client closes with 1000 or
    # 1001 but keeps it resumable after a cut connection. Whether QQ does the same is
    # *unverified*; leaving with a cut is safe either way (a crash looks the same to it).
    close_frame_on_leave = False

    def __init__(self, config, on_message, *, clock: Callable[[], float] = time.monotonic,
                 handshake_timeout_s: float = HANDSHAKE_TIMEOUT_S, **kw) -> None:
        super().__init__(config, on_message, **kw)
        self.session_timeout_s = handshake_timeout_s  # Hello + READY/RESUMED, see base
        self._http = http_session()
        self._http.headers["X-Union-Appid"] = config.app_id
        self.token = AccessToken(self._http, config.token_url, config.app_id,
                                 config.client_secret, clock=clock, log=self.log)
        self._api_base = config.api_base.rstrip("/")
        # The gateway session we resume after a drop; None -> identify fresh.
        self.session_id: str | None = None
        self.seq: int | None = None  # last dispatch seq handled (what op 1 and op 6 carry)
        self._state_loaded = False  # saved_state is read once, before the first connection
        self._hello_seen = False
        self._ops: dict[int, Callable[[dict], None]] = {
            OP_DISPATCH: self._on_dispatch,
            OP_HELLO: self._on_hello,
            OP_HEARTBEAT_ACK: lambda frame: self.beat_answered(),
            OP_HEARTBEAT: lambda frame: self.send_frame(self.heartbeat_frame()),  # server asks
            OP_RECONNECT: self._on_reconnect,
            OP_INVALID_SESSION: self._on_invalid_session,
            OP_HTTP_CALLBACK_ACK: lambda frame: None,
        }
        self._events: dict[str, Callable[[Any], None]] = {
            "READY": self._on_ready,
            "RESUMED": self._on_resumed,
            EVENT_C2C: lambda d: self._on_message_event(d, "c2c"),
            EVENT_GROUP_AT: lambda d: self._on_message_event(d, "group"),
        }

    @classmethod
    def check(cls, config, *, full: bool = False) -> str:
        if full:
            return cls.check_session(config)
        adapter = cls(config, lambda msg: False)
        url = adapter.prepare()
        return f"credentials accepted; bot {adapter.bot_user()}; gateway {url.split('?')[0]}"

    def bot_user(self) -> str:
        """The bot's own user from GET /users/@me (as the official SDK reads it at login), as
        "username (id)"; raises ConnectionLost when the platform does not answer it."""
        try:
            resp = self._api("GET", "/users/@me", label="me")
        except rest.RequestException as e:
            raise ConnectionLost("me_unreachable", type(e).__name__) from None
        body = json_object(resp)
        user_id = _nonempty_str(body.get("id"))
        if resp.status_code != 200 or not user_id:
            raise ConnectionLost("me_failed", f"GET /users/@me: HTTP {resp.status_code}")
        username = body.get("username")
        return f"{username[:80] if isinstance(username, str) else '?'} ({user_id})"

    # -- before the socket ---------------------------------------------------------------------
    def prepare(self) -> str:
        # This connection's Hello decides the interval; never start on the last one's timetable.
        self.heartbeat_interval_s = None
        self._hello_seen = False
        if not self._state_loaded:
            self._state_loaded = True
            self._restore_session()
        try:
            resp = self._api("GET", "/gateway/bot", label="gateway")
        except rest.RequestException as e:
            raise ConnectionLost("gateway_unreachable", type(e).__name__) from None
        url = json_object(resp).get("url") if resp.status_code == 200 else None
        if not isinstance(url, str) or not url.startswith(("ws://", "wss://")):
            raise ConnectionLost("gateway_failed", f"GET /gateway/bot: HTTP {resp.status_code}")
        return url

    # -- frames --------------------------------------------------------------------------------
    def on_frame(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            self.log.warning("frame skipped platform=qqbot reason=binary bytes=%d", len(data))
            return
        try:
            frame = json.loads(data)
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            self.log.warning("frame skipped platform=qqbot reason=bad_json chars=%d", len(data))
            return
        op = frame.get("op") if isinstance(frame, dict) else None
        handler = self._ops.get(op) if is_int(op) else None
        if handler is None:
            self.log.warning("frame skipped platform=qqbot reason=unknown_op op=%.40r", op)
            return
        handler(frame)

    def heartbeat_frame(self) -> str:
        return json.dumps({"op": OP_HEARTBEAT, "d": self.seq})

    def _on_hello(self, frame: dict) -> None:
        d = frame.get("d")
        interval_ms = d.get("heartbeat_interval") if isinstance(d, dict) else None
        if (not isinstance(interval_ms, (int, float)) or isinstance(interval_ms, bool)
                or not math.isfinite(interval_ms) or interval_ms <= 0):
            raise ConnectionLost("bad_hello", "no usable heartbeat_interval")
        self.start_heartbeat(max(MIN_HEARTBEAT_S, interval_ms / 1000.0))
        if self._hello_seen:
            return  # a second Hello only re-times the heartbeat
        self._hello_seen = True
        if self.session_id is not None:
            self._send_resume()
        else:
            self._send_identify()

    def _send_identify(self) -> None:
        self.seq = None
        self.send_frame(json.dumps({"op": OP_IDENTIFY, "d": {
            "token": f"QQBot {self.token.get()}",
            "intents": self.config.intents,
            "shard": [0, 1],
            "properties": {"$os": "linux", "$browser": "hermes-green", "$device": "hermes-green"},
        }}))
        self.log.info("identify sent platform=qqbot intents=%d", self.config.intents)

    def _send_resume(self) -> None:
        self.send_frame(json.dumps({"op": OP_RESUME, "d": {
            "token": f"QQBot {self.token.get()}",
            "session_id": self.session_id,
            "seq": self.seq or 0,
        }}))
        self.log.info("resume sent platform=qqbot session=%s seq=%s", self.session_id, self.seq)

    def _on_reconnect(self, frame: dict) -> None:
        raise ConnectionLost("server_reconnect", "op 7", resume=True)

    def _on_invalid_session(self, frame: dict) -> None:
        self._forget_session("op 9 invalid session")
        raise ConnectionLost("invalid_session", "op 9", resume=False)

    def _on_dispatch(self, frame: dict) -> None:
        event = frame.get("t")
        handler = self._events.get(event) if isinstance(event, str) else None
        if handler is None:
            self.log.info("event skipped platform=qqbot event=%.60r reason=unhandled", event)
        else:
            handler(frame.get("d"))
        # Advance only once the event is handled: if handing a message up fails, the resume
        # that follows replays it.
        s = frame.get("s")
        if is_int(s) and s > 0 and (self.seq is None or s > self.seq):
            self.seq = s
            self._save_session(soon=True)  # an older saved seq only replays journaled events

    def _on_ready(self, d: Any) -> None:
        session_id = _nonempty_str(d.get("session_id")) if isinstance(d, dict) else ""
        if not session_id:
            raise ConnectionLost("bad_ready", "READY without session_id", resume=False)
        self.session_id, self.seq = session_id, None
        self._save_session()
        self.log.info("session started platform=qqbot session=%s", session_id)
        self.mark_ready()

    def _on_resumed(self, d: Any) -> None:
        self.log.info("session resumed platform=qqbot session=%s seq=%s",
                      self.session_id, self.seq)
        self.mark_ready()

    def _on_message_event(self, d: Any, kind: str) -> None:
        msg = self._normalize(d, kind)
        if msg is None:
            return
        # A journal failure raises ConnectionLost here (JournalFailure.REPLAY): the seq was not
        # advanced, so resuming makes the server replay the event.
        outcome = self.deliver(msg)
        self.log.info("inbound platform=qqbot chat=%s msg=%s kind=%s outcome=%s attachments=%d",
                      msg.chat_id, msg.message_id, kind, outcome.value, len(msg.attachments))

    def _normalize(self, d: Any, kind: str) -> InboundMessage | None:
        if not isinstance(d, dict):
            self.log.warning("event skipped platform=qqbot kind=%s reason=no_data", kind)
            return None
        author = d.get("author") if isinstance(d.get("author"), dict) else {}
        msg_id = _nonempty_str(d.get("id"))
        if kind == "c2c":
            user = chat = _nonempty_str(author.get("user_openid"))
        else:
            chat = _nonempty_str(d.get("group_openid"))
            user = _nonempty_str(author.get("member_openid"))
        if not (msg_id and chat and user):
            self.log.warning("event skipped platform=qqbot kind=%s msg=%.80r reason=missing_ids",
                             kind, msg_id or d.get("id"))
            return None
        content = d.get("content")
        # Group @-messages start with the space the mention left behind.
        text = content.strip() if isinstance(content, str) else ""
        attachments = self._attachments(d.get("attachments"), msg_id)
        if not text and not attachments:
            self.log.info("event skipped platform=qqbot chat=%s msg=%s reason=empty", chat, msg_id)
            return None
        return InboundMessage(
            platform=self.name, message_id=msg_id, chat_id=chat, user_id=user, text=text,
            chat_type="dm" if kind == "c2c" else "group", attachments=attachments,
            reply_ref={"msg_id": msg_id, "kind": kind, "openid": chat, "at": time.time()})

    def _attachments(self, raw: Any, msg_id: str) -> tuple[Attachment, ...]:
        if not isinstance(raw, list):
            return ()
        found = []
        for item in raw[:MAX_ATTACHMENTS]:
            url = item.get("url") if isinstance(item, dict) else None
            if not isinstance(url, str) or not url:
                self.log.warning("attachment skipped platform=qqbot msg=%s reason=no_url", msg_id)
                continue
            content_type = item.get("content_type")
            content_type = content_type if isinstance(content_type, str) else ""
            filename = item.get("filename")
            kind = attachment_kind(content_type)
            asr = item.get("asr_refer_text")
            wav = item.get("voice_wav_url")
            size = item.get("size")
            found.append(Attachment(
                kind=kind, ref=_absolute(url),
                name=filename if isinstance(filename, str) and filename else None,
                mime=content_type if "/" in content_type else None,
                size=size if is_int(size) and size >= 0 else None,
                transcript=asr.strip() if kind == "voice" and isinstance(asr, str)
                and asr.strip() else None,
                meta={"wav": _absolute(wav)} if isinstance(wav, str) and wav else {}))
        return tuple(found)

    # -- media ---------------------------------------------------------------------------------
    def media_source(self, att: Attachment, msg: InboundMessage) -> MediaSource:
        url = att.meta.get("wav") if att.kind == "voice" and att.meta.get("wav") else att.ref
        if not url.startswith(("https://", "http://")):
            raise MediaRefused("the attachment has no download link")
        return MediaSource(url, size=att.size, mime=att.mime, name=att.name)

    def max_upload_bytes(self, media: str) -> int | None:
        return UPLOAD_LIMITS.get(media, 0) or None

    def send_file(self, out: OutboundMessage) -> None:
        file = OutboundFile.from_row(out.file)
        file_type = FILE_TYPES.get(file.media)
        if file_type is None:  # QQ bots cannot send arbitrary files: say which one it was
            note = f"[{file.name}: QQ does not let bots send this kind of file]"
            return self.send(OutboundMessage(
                platform=out.platform, chat_id=out.chat_id, text=f"{out.text}\n{note}".strip(),
                in_reply_to=out.in_reply_to, reply_ref=out.reply_ref, seq=out.seq,
                outbox_id=out.outbox_id, bot=out.bot))
        ref = out.reply_ref or {}
        kind, openid = ref.get("kind"), _nonempty_str(ref.get("openid"))
        if not (openid and kind in ("c2c", "group")):
            raise SendError("reply_ref lacks kind/openid", retryable=False)
        try:
            data = read_file(file.path, UPLOAD_LIMITS[file.media])
        except (OSError, ValueError) as e:
            raise SendError(f"file unusable: {type(e).__name__}", retryable=False) from None
        base = f"/v2/users/{quote(openid, safe='')}" if kind == "c2c" \
            else f"/v2/groups/{quote(openid, safe='')}"
        resp = self._rest_call("POST", base + "/files", {
            "file_type": file_type, "file_data": base64.b64encode(data).decode("ascii"),
            "srv_send_msg": False}, "upload")
        info = json_object(resp).get("file_info")
        if resp.status_code >= 300 or not isinstance(info, str) or not info:
            raise self._send_error(resp, proactive=False, what="upload")
        body: dict[str, Any] = {"msg_type": 7, "media": {"file_info": info}}
        if out.text.strip():
            body["content"] = out.text
        self._deliver(out, body)

    # -- closes and session --------------------------------------------------------------------
    def close_action(self, code: int | None) -> CloseAction:
        """The platform's close codes: 4004 bad token (renew it, identify); 4006/4007 and
        4900-4913 identify fresh (4001/4002 too: we sent something it could not use); 4008 rate
        and 4009 timeout resume; 4010-4014, 4914 and 4915 are fatal. Anything else (network
        closes, unknown codes) resumes: a session the server no longer knows earns an op 9."""
        if code in FATAL_CLOSE_CODES:
            self.log.error("fatal close platform=qqbot code=%s meaning=%s",
                           code, FATAL_CLOSE_CODES[code])
            return CloseAction.FATAL
        if code == CLOSE_BAD_TOKEN:
            self.token.invalidate()
            return CloseAction.REIDENTIFY
        if code in REIDENTIFY_CLOSE_CODES:
            return CloseAction.REIDENTIFY
        return CloseAction.RESUME

    def on_disconnect(self, lost: ConnectionLost) -> None:
        if not lost.resume:
            self._forget_session(lost.reason)

    def _forget_session(self, why: str) -> None:
        self.seq = None
        if self.session_id is None:
            return
        self.log.info("session discarded platform=qqbot session=%s reason=%s",
                      self.session_id, why)
        self.session_id = None
        self._save_session()

    def _save_session(self, *, soon: bool = False) -> None:
        """Keep the session and seq where the next start finds them. A failed write is logged
        and costs nothing now: the saved seq stays older, and an older seq is always safe."""
        value = (None if self.session_id is None else
                 json.dumps({"session_id": self.session_id, "seq": self.seq}))
        try:
            (self.saved_state.put_soon if soon else self.saved_state.put)(SESSION_KEY, value)
        except Exception as e:  # the store's own errors; the connection goes on
            self.log.warning("session not saved platform=qqbot error=%s", type(e).__name__)

    def _restore_session(self) -> None:
        """The session the last run saved, if any: the first connection resumes it (the server
        answers op 9 if it is gone, and we identify fresh)."""
        try:
            raw = self.saved_state.get(SESSION_KEY)
            saved = json.loads(raw) if raw else None
        except Exception as e:  # unreadable: identify fresh, as without a saved session
            self.log.warning("saved session ignored platform=qqbot error=%s", type(e).__name__)
            return
        session_id = _nonempty_str(saved.get("session_id")) if isinstance(saved, dict) else ""
        seq = saved.get("seq") if isinstance(saved, dict) else None
        if not session_id or not (seq is None or (is_int(seq) and seq >= 0)):
            return
        self.session_id, self.seq = session_id, seq
        self.log.info("session restored platform=qqbot session=%s seq=%s", session_id, seq)

    # -- REST ----------------------------------------------------------------------------------
    def _api(self, method: str, path: str, body: dict | None = None, *,
             label: str) -> rest.Response:
        """One REST call with the token; on 401 the token is renewed once and the call repeated.
        Raises rest.RequestException, or what AccessToken.get() raises."""
        token = self.token.get()
        resp = self._call(method, path, token, body)
        if resp.status_code == 401:
            self.log.warning("token rejected platform=qqbot call=%s action=renew_once", label)
            self.token.invalidate(token)
            resp = self._call(method, path, self.token.get(), body)
        return resp

    def _call(self, method: str, path: str, token: str, body: dict | None) -> rest.Response:
        return self._http.request(method, self._api_base + path, json=body, timeout=REST_TIMEOUT,
                                  headers={"Authorization": f"QQBot {token}"})

    def _within_passive_window(self, ref: dict, kind: str) -> bool:
        """Whether a passive reply to this message is still accepted. Rows journaled before the
        receipt time was kept have none: they are tried passively, as before."""
        at = ref.get("at")
        if not isinstance(at, (int, float)) or isinstance(at, bool):
            return True
        window = (self.config.passive_window_c2c_s if kind == "c2c"
                  else self.config.passive_window_group_s)
        return time.time() - at < window - min(PASSIVE_MARGIN_S, window / 4)

    def max_reply_parts(self) -> int | None:
        return MAX_REPLY_PARTS

    def reply_chunk_chars(self) -> int:
        return REPLY_CHUNK_CHARS

    def send(self, out: OutboundMessage) -> None:
        self._deliver(out, {"msg_type": 0, "content": out.text})

    def _deliver(self, out: OutboundMessage, body: dict[str, Any]) -> None:
        """One reply part (text, or rich media by file_info): passive within the message's
        window with msg_seq = part + 1, proactive after it."""
        ref = out.reply_ref or {}
        msg_id, kind = _nonempty_str(ref.get("msg_id")), ref.get("kind")
        openid = _nonempty_str(ref.get("openid"))
        if not (msg_id and openid and kind in ("c2c", "group")):
            raise SendError("reply_ref lacks msg_id/kind/openid (QQ allows passive replies only)",
                            retryable=False)
        if not 0 <= out.seq < MAX_REPLY_PARTS:
            raise SendError(f"part {out.seq} is past the {MAX_REPLY_PARTS} replies QQ allows "
                            "per message", retryable=False)
        msg_seq = out.seq + 1
        path = (f"/v2/users/{quote(openid, safe='')}/messages" if kind == "c2c"
                else f"/v2/groups/{quote(openid, safe='')}/messages")
        body = dict(body)
        proactive = not self._within_passive_window(ref, kind)
        if proactive:
            self.log.info("reply past the passive window platform=qqbot chat=%s msg=%s "
                          "part=%d: sending proactively", out.chat_id, msg_id, out.seq)
        else:
            body.update(msg_id=msg_id, msg_seq=msg_seq)
        resp = self._rest_call("POST", path, body, "reply")
        status, answer = resp.status_code, json_object(resp)
        codes = {answer.get("code"), answer.get("err_code")}
        if 200 <= status < 300:
            return
        if CODE_DUPLICATE_REPLY in codes:
            self.log.info("reply already delivered platform=qqbot chat=%s msg=%s msg_seq=%d",
                          out.chat_id, msg_id, msg_seq)
            return
        if proactive and 400 <= status < 500 and status != 429:
            raise SendError(f"proactive reply refused ({_detail(resp)}): the passive window of "
                            f"{msg_id} had passed", retryable=False)
        raise self._send_error(resp, proactive=proactive, what="reply")

    def _rest_call(self, method: str, path: str, body: dict, label: str) -> rest.Response:
        try:
            return self._api(method, path, body, label=label)
        except rest.RequestException as e:
            raise SendError(f"{label} request failed: {type(e).__name__}") from None
        except ConnectionLost as e:
            raise SendError(f"no access token: {e}") from None
        except FatalPlatformError as e:
            raise SendError(str(e), retryable=False) from None

    @staticmethod
    def _send_error(resp: rest.Response, *, proactive: bool, what: str) -> SendError:
        status, detail = resp.status_code, _detail(resp)
        if status == 429:
            return SendError(f"rate limited ({detail})", retry_after=retry_after_s(resp.headers))
        if status >= 500 or status in (401, 408):
            return SendError(f"{what} not accepted ({detail})")
        return SendError(f"{what} refused ({detail})", retryable=False)


def _detail(resp: rest.Response) -> str:
    answer = json_object(resp)
    return (f"HTTP {resp.status_code} code {answer.get('code')}: "
            f"{str(answer.get('message'))[:120]}")


def _absolute(url: str) -> str:
    """QQ sends some attachment URLs without a scheme ("//multimedia.nt.qq.com/...")."""
    return "https:" + url if url.startswith("//") else url


PLATFORM = PlatformSpec(name="qqbot", config=QQBotConfig, adapter="QQBotAdapter",
                        fake="hermes_green.testing.fake_qqbot:FakeQQBotServer")
