"""A strict fake of the QQ Bot open platform: token endpoint, gateway URL, gateway v2 WebSocket
and passive-reply REST, as shared/PROTOCOLS.md describes them.

What it enforces (each rule makes the real server drop, reject or replay):
- token: wrong app id / secret -> code 100007 / 100016; `expires_in` is a string; the same
  token is handed out until the last `token_renew_window_s` of its life, then a new one (the old
  one stays valid until its own expiry); REST with an unknown or expired token -> 401.
- gateway: Hello first, its `heartbeat_interval` an integer of ms; no heartbeat within
  `heartbeat_deadline_s` (of the connection, then of the previous beat) -> close 4009; identify
  with a bad token -> 4004, bad intents -> 4013/4014, bad shard -> 4010; unknown op -> 4001;
  malformed payload -> 4002; resume with a seq from the future -> 4007; resume replays every
  event after the client's seq, then RESUMED.
- sessions: a session stays resumable for `resume_window_s` after its connection ends (any end:
  drop, close, our op 7); resuming it later, or an unknown or invalidated one, gets op 9 and the
  socket closed. Events sent to a session that has expired are lost (`lost_events`), as nothing
  could ever replay them.
- op 7 (`send_op7`) and op 9 are followed by the server closing the socket, as the real one does
  (botpy waits for that close before it reconnects).
- `GET /users/@me` answers the bot's identity (botpy reads it at login).
- replies: only to a known inbound message of that chat, within the passive window (60 min DM,
  5 min group), at most `max_replies_per_msg` per msg_id, and a repeated (msg_id, msg_seq) is
  rejected with 40054005 (HTTP 400) like the real one. A missing msg_seq counts as 1.

Use from tests, the demo and benchmarks:
    fake = FakeQQBotServer(heartbeat_interval_ms=200).start()
    msg_id = fake.send_user_message("hi")                       # a C2C message
    fake.send_user_message("hi all", kind="group", group_openid="g1", member_openid="m1")
    fake.replies            # accepted replies: Reply(msg_id, msg_seq, content, kind, openid, at)
    fake.rejected           # refused replies with their code
    fake.keepalive_times[conn_id], fake.keepalive_lateness(conn_id)
    faults: drop(), close_with(code), go_silent(s), send_garbage(data), send_raw_frame(bytes),
            rest_delay_s, rest_429(n, retry_after), fail_replies(n, status), send_op7(),
            send_op9(), expire_tokens(), reject_tokens = True
Events sent while no client is connected are kept in the session and replayed on a resume within
the window; events sent before any session exists (or after an op 9) are delivered after the next
identify.

Media: `send_user_media(data, kind, ...)` serves the file at a URL of the fake (QQ's CDN URLs need
no token) and sends it as an attachment {content_type, url, filename, size}, a voice with
`asr_refer_text` and `voice_wav_url`. Uploads: POST /v2/users|groups/{openid}/files {file_type 1
image | 2 video | 3 voice, file_data (base64) or url, srv_send_msg} -> {file_uuid, file_info,
ttl}; file_type 4 is refused ("not open", as botpy documents it). A reply with msg_type 7 needs a
`media.file_info` this fake issued for that chat. `fake.files` records each file shown;
hold_file_sends()/release_file_sends() hold msg_type 7 replies unprocessed.
"""
from __future__ import annotations

import base64
import binascii
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import gevent.event
from geventwebsocket.websocket import WebSocket

from .driver import Keepalive, PlatformDriver, ReplyRow, SentFile
from .harness import Conn, FakePlatformServer

INTENT_GROUP_AND_C2C = 1 << 25
INTENT_DIRECT_MESSAGE = 1 << 12
INTENT_PUBLIC_GUILD_MESSAGES = 1 << 30
ALL_INTENTS = (1 << 31) - 1

CODE_DUPLICATE = 40054005  # real: "消息被去重，请检查请求msgseq"
CODE_TOKEN = 11244  # real code for a bad/expired token is *unverified*
# The codes below are the fake's own (the real ones are *unverified*); tests match on status.
CODE_BAD_MSG_ID = 40034024
CODE_WINDOW_EXPIRED = 40034025
CODE_REPLY_LIMIT = 40034026
CODE_BAD_REQUEST = 40034001
CODE_PROACTIVE_LIMIT = 40034029  # the fake's own code: the real one is *unverified*
# send.html (bot.q.qq.com wiki, api-v2 message send): passive replies 60 min in C2C, 5 min in
# groups, 5 per message; proactive messages 4 a month per user and per group.
PROACTIVE_QUOTA_PER_MONTH = 4

# The platform's docs say only that a connection resumed "within a short time" gets the events it
# missed (断开之后短时间内重连会补发中间遗漏的事件); the window is *unverified*. One minute is a
# conservative guess (Discord's gateway, which QQ's mirrors, keeps sessions "a few minutes").
RESUME_WINDOW_S = 60.0

_REPLY_PATH = re.compile(r"^/v2/(users|groups)/([^/]+)/messages$")
_FILES_PATH = re.compile(r"^/v2/(users|groups)/([^/]+)/files$")
CODE_FILE_TYPE_CLOSED = 40034030  # the fake's own code (file_type 4 "暂不开放")


@dataclass
class Reply:
    msg_id: str  # the message answered (for a proactive send: the chat's latest user message)
    msg_seq: int
    content: str
    kind: str  # "c2c" | "group"
    openid: str  # user openid or group openid
    at: float  # time.monotonic()
    reply_id: str
    proactive: bool = False  # sent without msg_id (past the passive window)


@dataclass
class Rejected:
    msg_id: Any
    msg_seq: Any
    status: int
    code: int
    at: float


@dataclass
class UserMessage:
    msg_id: str
    kind: str
    openid: str  # chat: user openid (c2c) or group openid
    text: str
    at: float


@dataclass
class Session:
    id: str
    seq: int = 0
    events: list[tuple[int, dict]] = field(default_factory=list)  # replayable dispatches
    conn: Conn | None = None
    valid: bool = True
    expired: bool = False  # past the resume window: its events can never be delivered


class FakeQQBotServer(FakePlatformServer):
    ws_path = "/websocket"

    def __init__(self, *, app_id: str = "102000001", client_secret: str = "fake-client-secret",
                 heartbeat_interval_ms: float = 41250, heartbeat_deadline_s: float | None = None,
                 token_ttl_s: float = 7200.0, token_renew_window_s: float = 60.0,
                 reply_window_dm_s: float = 3600.0, reply_window_group_s: float = 300.0,
                 max_replies_per_msg: int = 5, allowed_intents: int = ALL_INTENTS,
                 resume_window_s: float = RESUME_WINDOW_S,
                 proactive_quota: int = PROACTIVE_QUOTA_PER_MONTH) -> None:
        super().__init__()
        self.app_id, self.client_secret = app_id, client_secret
        self.heartbeat_interval_ms = heartbeat_interval_ms
        # The real server closes after ~60 s without a beat, with a ~41 s interval: 1.5x.
        self.heartbeat_deadline_s = (heartbeat_deadline_s if heartbeat_deadline_s is not None
                                     else heartbeat_interval_ms / 1000.0 * 1.5)
        self.token_ttl_s, self.token_renew_window_s = token_ttl_s, token_renew_window_s
        self.reply_window_s = {"c2c": reply_window_dm_s, "group": reply_window_group_s}
        self.max_replies_per_msg = max_replies_per_msg
        self.proactive_quota = proactive_quota  # per chat and month
        self.proactive_sent: dict[tuple[str, str], int] = {}  # (kind, openid) -> this month
        self.allowed_intents = allowed_intents
        self.resume_window_s = resume_window_s
        # botpy (botpy/robot.py Robot._update) reads the id as int(data["id"]): digits only.
        self.bot_id = str(144115218677000000 + sum(map(ord, app_id)))
        # records
        self.replies: list[Reply] = []
        # passive replies by msg_id (duplicate and limit checks: a list scan per reply made
        # the fake's own ceiling fall as a benchmark's replies piled up)
        self._replies_by_msg: dict[str, list[Reply]] = {}
        self.rejected: list[Rejected] = []
        self.user_messages: dict[str, UserMessage] = {}
        self.keepalive_times: dict[int, list[float]] = {}
        self.hello_times: dict[int, tuple[float, float]] = {}  # conn -> (sent at, interval s)
        self.token_requests = 0
        # state
        self.tokens: dict[str, float] = {}  # token -> expires at (monotonic)
        self._current_token: str | None = None
        self.sessions: dict[str, Session] = {}
        self.current: Session | None = None
        self.pending: list[tuple[str, dict]] = []  # events before any session exists
        self.lost_events: list[tuple[str, Any]] = []  # sent to a session past its window
        # media
        self.file_infos: dict[str, tuple[str, str, int, bytes, str]] = {}  # info -> (kind,
        #   openid, file_type, data, file_uuid)
        self.files: list[SentFile] = []
        self._file_replies: list[Reply] = []  # msg_type 7 replies (they count against 5)
        self.held_sends = 0
        self._release = gevent.event.Event()
        self._release.set()
        # faults
        self.reject_tokens = False  # every REST call with a token answers 401
        self._fail_replies: list[int] = []

    # -- URLs ----------------------------------------------------------------------------------
    @property
    def token_url(self) -> str:
        return f"{self.http_base}/app/getAppAccessToken"

    # -- test controls -------------------------------------------------------------------------
    def send_user_message(self, text: str, kind: str = "c2c", *, openid: str = "user-openid-1",
                          group_openid: str = "group-openid-1",
                          member_openid: str = "member-openid-1",
                          attachments: list[dict] | None = None) -> str:
        """A user writes to the bot (C2C) or @-mentions it in a group. Returns the message id."""
        msg_id = f"ROBOT1.0_{uuid.uuid4().hex}"
        now = time.monotonic()
        if kind == "c2c":
            event = "C2C_MESSAGE_CREATE"
            d = {"id": msg_id, "content": text, "timestamp": _iso(),
                 "author": {"user_openid": openid, "id": openid}}
            chat = openid
        elif kind == "group":
            event = "GROUP_AT_MESSAGE_CREATE"
            d = {"id": msg_id, "content": " " + text, "timestamp": _iso(),
                 "group_openid": group_openid, "group_id": group_openid,
                 "author": {"member_openid": member_openid, "id": member_openid}}
            chat = group_openid
        else:
            raise ValueError(f"kind must be c2c or group, not {kind!r}")
        if attachments:
            d["attachments"] = attachments
        self.user_messages[msg_id] = UserMessage(msg_id, kind, chat, text, now)
        self.dispatch(event, d)
        return msg_id

    def send_user_media(self, data: bytes, kind: str = "image", *, msg_kind: str = "c2c",
                        openid: str = "user-openid-1", filename: str = "file",
                        content_type: str = "", transcript: str | None = None,
                        text: str = "") -> str:
        url = self.host_media(data, content_type or "application/octet-stream")
        if kind == "voice":
            att = {"content_type": "voice", "url": url.replace("http:", "", 1),
                   "filename": filename, "size": len(data),
                   "voice_wav_url": self.host_media(data, "audio/wav")}
            if transcript:
                att["asr_refer_text"] = transcript
        else:
            att = {"content_type": content_type or ("file" if kind == "file" else kind),
                   "url": url, "filename": filename, "size": len(data)}
        return self.send_user_message(text, kind=msg_kind, openid=openid, attachments=[att])

    def hold_file_sends(self) -> None:
        self._release.clear()

    def release_file_sends(self) -> None:
        self._release.set()

    def dispatch(self, event: str, d: Any) -> None:
        """Send any dispatch event (unknown types included) to the current session."""
        session = self.current
        if session is not None:
            self._check_expiry(session)
        if session is not None and session.expired:
            self.lost_events.append((event, d))  # no connection can ever get it now
            self.changed()
        elif session is None or not session.valid:
            self.pending.append((event, d))
            self.changed()
        else:
            self._dispatch(session, event, d)

    def send_op7(self) -> None:
        """Server asks for a reconnect + resume, then closes the socket. botpy
        (botpy/gateway.py `_is_system_event`) only notes op 7 and reconnects once the server has
        closed; botgo (websocket/client/client.go) says the server sends it when the connection
        reached its maximum age."""
        for conn in self.live_conns():
            conn.send({"op": 7})
            conn.close(None, reason="op7")

    def send_op9(self) -> None:
        """Invalid session: the client must identify fresh. The server closes the socket after
        it (users report op 9 followed by EOF; botpy/gateway.py waits for the close)."""
        self.invalidate_sessions()
        for conn in self.live_conns():
            self._refuse_session(conn)

    def invalidate_sessions(self) -> None:
        for session in self.sessions.values():
            session.valid = False

    def expire_tokens(self) -> None:
        now = time.monotonic()
        for token in self.tokens:
            self.tokens[token] = now
        self._current_token = None

    def fail_replies(self, times: int = 1, status: int = 500) -> None:
        self._fail_replies.extend([status] * times)

    def send_raw_frame(self, payload: bytes, opcode: int = WebSocket.OPCODE_TEXT) -> None:
        """Bytes as one frame of `opcode`, unchecked (e.g. invalid UTF-8 in a text frame)."""
        for conn in self.live_conns():
            try:
                conn.ws.send_frame(payload, opcode)
            except Exception:
                pass

    # -- records for tests and benchmarks ------------------------------------------------------
    def keepalive_lateness(self, conn_id: int) -> list[float]:
        """Seconds each heartbeat came after its slot on the timetable Hello announced
        (beat k is due at hello + k * interval); negative means early."""
        sent_at, interval = self.hello_times[conn_id]
        return [t - (sent_at + k * interval)
                for k, t in enumerate(self.keepalive_times.get(conn_id, []), start=1)]

    def out_events(self, event: str | None = None, conn_id: int | None = None) -> list[dict]:
        return [f.data for f in self.frames if f.direction == "out" and isinstance(f.data, dict)
                and f.data.get("op") == 0 and (event is None or f.data.get("t") == event)
                and (conn_id is None or f.conn_id == conn_id)]

    def delivered_ids(self) -> list[str]:
        """Message ids as often as they went out on the wire (replays count again)."""
        return [f["d"]["id"] for f in self.out_events()
                if f.get("t") in ("C2C_MESSAGE_CREATE", "GROUP_AT_MESSAGE_CREATE")]

    def client_ops(self, conn_id: int | None = None) -> list[int]:
        return [d.get("op") for d in self.frames_in(conn_id) if isinstance(d, dict)]

    def conn_ids(self) -> list[int]:
        return sorted(self.conns)

    # -- REST ----------------------------------------------------------------------------------
    def routes(self):
        return {
            ("POST", "/app/getAppAccessToken"): self._token,
            ("GET", "/gateway/bot"): self._gateway,
            ("GET", "/users/@me"): self._me,
            ("POST", "/v2/"): self._v2_post,
        }

    def _v2_post(self, request: dict) -> tuple:
        return (self._upload if _FILES_PATH.match(request["path"]) else self._reply)(request)

    def _upload(self, request: dict) -> tuple:
        m = _FILES_PATH.match(request["path"])
        denied = self._unauthorized(request)
        if denied:
            return denied
        kind = "c2c" if m.group(1) == "users" else "group"
        body = request["json"] if isinstance(request["json"], dict) else {}
        file_type = body.get("file_type")
        if file_type == 4:
            return self._reject(None, None, 400, CODE_FILE_TYPE_CLOSED, "file_type 4 not open")
        if file_type not in (1, 2, 3) or not isinstance(body.get("srv_send_msg", False), bool):
            return self._reject(None, None, 400, CODE_BAD_REQUEST, "invalid file_type")
        if body.get("srv_send_msg"):
            return self._reject(None, None, 400, CODE_BAD_REQUEST, "srv_send_msg unsupported")
        try:
            data = base64.b64decode(body.get("file_data") or "", validate=True)
        except (binascii.Error, ValueError):
            data = b""
        if not data:
            return self._reject(None, None, 400, CODE_BAD_REQUEST, "file_data required")
        info, file_uuid = uuid.uuid4().hex + uuid.uuid4().hex, uuid.uuid4().hex
        self.file_infos[info] = (kind, m.group(2), file_type, data, file_uuid)
        self.changed()
        return 200, {"file_uuid": file_uuid, "file_info": info, "ttl": 3600}

    def _token(self, request: dict) -> tuple:
        self.token_requests += 1
        body = request["json"] if isinstance(request["json"], dict) else {}
        if body.get("appId") != self.app_id:
            return 200, {"code": 100007, "message": "appid invalid"}
        if body.get("clientSecret") != self.client_secret:
            return 200, {"code": 100016, "message": "invalid appid or secret"}
        now = time.monotonic()
        token = self._current_token
        if token is None or self.tokens[token] - now <= self.token_renew_window_s:
            token = uuid.uuid4().hex
            self.tokens[token] = now + self.token_ttl_s
            self._current_token = token
        remaining = self.tokens[token] - now
        return 200, {"access_token": token, "expires_in": f"{round(remaining, 3):g}"}

    def token_valid(self, header_or_token: Any, *, prefix: str = "QQBot ") -> bool:
        if self.reject_tokens or not isinstance(header_or_token, str):
            return False
        if not header_or_token.startswith(prefix):
            return False
        expires = self.tokens.get(header_or_token[len(prefix):])
        return expires is not None and expires > time.monotonic()

    def _unauthorized(self, request: dict) -> tuple | None:
        if self.token_valid(request["headers"].get("Authorization")):
            return None
        return 401, {"code": CODE_TOKEN, "err_code": CODE_TOKEN,
                     "message": "token not exist or expire"}

    def _gateway(self, request: dict) -> tuple:
        denied = self._unauthorized(request)
        if denied:
            return denied
        return 200, {"url": self.ws_url, "shards": 1,
                     "session_start_limit": {"total": 1000, "remaining": 999,
                                             "reset_after": 86400000, "max_concurrency": 1}}

    def _me(self, request: dict) -> tuple:
        """The bot's own user (botpy/http.py `login` GETs it first; botpy/types/robot.py:
        id, username, avatar)."""
        denied = self._unauthorized(request)
        if denied:
            return denied
        return 200, {"id": self.bot_id, "username": "fake-bot", "avatar": "",
                     "union_openid": f"union-{self.bot_id}", "union_user_account": ""}

    def _reply(self, request: dict) -> tuple:
        m = _REPLY_PATH.match(request["path"])
        if m is None:
            return 404, {"code": 404, "message": "no such route"}
        denied = self._unauthorized(request)
        if denied:
            return denied
        kind = "c2c" if m.group(1) == "users" else "group"
        openid = m.group(2)
        body = request["json"] if isinstance(request["json"], dict) else {}
        msg_id, msg_seq = body.get("msg_id"), body.get("msg_seq", 1)
        if self._fail_replies:
            status = self._fail_replies.pop(0)
            return self._reject(msg_id, msg_seq, status, status, "injected failure")
        if body.get("msg_type") == 7 and not self._release.is_set():
            self.held_sends += 1
            self.changed()
            self._release.wait()
            return 502, {"code": 502, "message": "dropped"}
        if msg_id is None and "event_id" not in body:
            return self._proactive(kind, openid, body)
        content = body.get("content")
        media = body.get("media") if isinstance(body.get("media"), dict) else {}
        stored = self.file_infos.get(media.get("file_info")) if body.get("msg_type") == 7 \
            else None
        if body.get("msg_type") == 7:
            if stored is None or stored[:2] != (kind, openid):
                return self._reject(msg_id, msg_seq, 400, CODE_BAD_REQUEST, "invalid file_info")
            content = content if isinstance(content, str) and content else " "
        if (body.get("msg_type") not in (0, 7) or not isinstance(content, str) or not content
                or not isinstance(msg_seq, int) or isinstance(msg_seq, bool) or msg_seq < 1):
            return self._reject(msg_id, msg_seq, 400, CODE_BAD_REQUEST, "invalid request")
        original = self.user_messages.get(msg_id) if isinstance(msg_id, str) else None
        if original is None or original.kind != kind or original.openid != openid:
            return self._reject(msg_id, msg_seq, 400, CODE_BAD_MSG_ID, "msg_id invalid")
        if time.monotonic() - original.at > self.reply_window_s[kind]:
            return self._reject(msg_id, msg_seq, 400, CODE_WINDOW_EXPIRED,
                                "passive reply window expired")
        earlier = self._replies_by_msg.get(msg_id, [])
        if any(r.msg_seq == msg_seq for r in earlier):
            return self._reject(msg_id, msg_seq, 400, CODE_DUPLICATE,
                                "消息被去重，请检查请求msgseq")
        if len(earlier) >= self.max_replies_per_msg:
            return self._reject(msg_id, msg_seq, 400, CODE_REPLY_LIMIT,
                                "passive reply limit reached")
        reply = Reply(msg_id, msg_seq, content, kind, openid, time.monotonic(),
                      uuid.uuid4().hex)
        if stored is not None:  # a file: shown as the file, not as a text reply
            self.files.append(SentFile(msg_id, "", stored[3],  # QQ carries no file name
                                       {1: "image", 2: "video", 3: "voice"}[stored[2]]))
            self._file_replies.append(reply)
        else:
            self.replies.append(reply)
        self._replies_by_msg.setdefault(reply.msg_id, []).append(reply)
        self.changed()
        return 200, {"id": reply.reply_id, "timestamp": _iso()}

    def _proactive(self, kind: str, openid: str, body: dict) -> tuple:
        """A message without msg_id: allowed only to a chat that wrote to the bot, within the
        monthly quota per chat (send.html: "主动消息每月 4 条,超额会发送失败", for users and
        groups alike; QQ has since reduced proactive sends further: *unconfirmed*)."""
        content = body.get("content")
        if body.get("msg_type") != 0 or not isinstance(content, str) or not content:
            return self._reject(None, None, 400, CODE_BAD_REQUEST, "invalid request")
        latest = max((m for m in self.user_messages.values()
                      if m.kind == kind and m.openid == openid), key=lambda m: m.at, default=None)
        if latest is None:
            return self._reject(None, None, 400, CODE_BAD_REQUEST, "chat never wrote to the bot")
        used = self.proactive_sent.get((kind, openid), 0)
        if used >= self.proactive_quota:
            return self._reject(None, None, 400, CODE_PROACTIVE_LIMIT,
                                "proactive message limit reached")
        self.proactive_sent[(kind, openid)] = used + 1
        reply = Reply(latest.msg_id, 0, content, kind, openid, time.monotonic(),
                      uuid.uuid4().hex, proactive=True)
        self.replies.append(reply)
        self._replies_by_msg.setdefault(reply.msg_id, []).append(reply)
        self.changed()
        return 200, {"id": reply.reply_id, "timestamp": _iso()}

    def _reject(self, msg_id, msg_seq, status: int, code: int, message: str) -> tuple:
        self.rejected.append(Rejected(msg_id, msg_seq, status, code, time.monotonic()))
        self.changed()
        return status, {"code": code, "err_code": code, "message": message,
                        "trace_id": uuid.uuid4().hex}

    # -- gateway -------------------------------------------------------------------------------
    def on_connect(self, conn: Conn, request: dict) -> bool:
        conn.state.update(session=None)
        self.keepalive_times[conn.id] = []
        conn.expect_keepalive(self.heartbeat_deadline_s, 4009)
        # An integer of ms, as the real Hello sends it (botgo dto/websocket_payload.go:
        # WSHelloData.HeartbeatInterval is an int; a float would not even decode there).
        interval_ms = max(1, round(self.heartbeat_interval_ms))
        if conn.send({"op": 10, "d": {"heartbeat_interval": interval_ms}}):
            self.hello_times[conn.id] = (time.monotonic(), interval_ms / 1000.0)
        return True

    def on_frame(self, conn: Conn, data: Any) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("op"), int):
            return conn.close(4002, "invalid payload", reason="bad_payload")
        op, d = data["op"], data.get("d")
        if op == 1:
            if d is not None and not isinstance(d, int):
                return conn.close(4002, "invalid heartbeat seq", reason="bad_payload")
            conn.keepalive()
            self.keepalive_times[conn.id].append(time.monotonic())
            conn.send({"op": 11})
        elif op == 2:
            self._identify(conn, d)
        elif op == 6:
            self._resume(conn, d)
        else:
            conn.close(4001, "invalid opcode", reason="bad_opcode")

    def _identify(self, conn: Conn, d: Any) -> None:
        if not isinstance(d, dict) or conn.state["session"] is not None:
            return conn.close(4002, "invalid payload", reason="bad_identify")
        if not self.token_valid(d.get("token")):
            self.log_event("identify_bad_token", conn)
            return conn.close(4004, "invalid token", reason="bad_token")
        intents = d.get("intents")
        if not isinstance(intents, int) or isinstance(intents, bool) or intents <= 0:
            return conn.close(4013, "invalid intent", reason="bad_intents")
        if intents & ~self.allowed_intents:
            return conn.close(4014, "intent no permission", reason="intents_not_allowed")
        shard = d.get("shard")
        if (not isinstance(shard, list) or len(shard) != 2
                or not all(isinstance(x, int) for x in shard) or not 0 <= shard[0] < shard[1]):
            return conn.close(4010, "invalid shard", reason="bad_shard")
        session = Session(uuid.uuid4().hex)
        self.sessions[session.id] = session
        self.current = session
        self._bind(session, conn)
        self.log_event("identify", conn)
        self._dispatch(session, "READY", {
            "version": 1, "session_id": session.id, "shard": shard,
            "user": {"id": self.bot_id, "username": "fake-bot", "bot": True}}, store=False)
        pending, self.pending = self.pending, []
        for event, payload in pending:
            self._dispatch(session, event, payload)

    def _resume(self, conn: Conn, d: Any) -> None:
        if not isinstance(d, dict) or conn.state["session"] is not None:
            return conn.close(4002, "invalid payload", reason="bad_resume")
        if not self.token_valid(d.get("token")):
            self.log_event("resume_bad_token", conn)
            return conn.close(4004, "invalid token", reason="bad_token")
        session = self.sessions.get(d.get("session_id"))
        seq = d.get("seq")
        if session is not None:
            self._check_expiry(session)
        if session is None or not session.valid:
            self.log_event("resume_refused", conn)
            return self._refuse_session(conn)
        if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= session.seq:
            return conn.close(4007, "invalid seq", reason="bad_seq")
        missed = [frame for s, frame in session.events if s > seq]  # snapshot, then bind
        self._bind(session, conn)
        self.log_event("resume", conn)
        for frame in missed:
            conn.send(frame)
        conn.send({"op": 0, "s": session.seq, "t": "RESUMED", "d": ""})

    def _refuse_session(self, conn: Conn) -> None:
        """op 9, then the socket closed (see send_op9)."""
        conn.send({"op": 9, "d": False})
        conn.close(None, reason="op9")

    def _check_expiry(self, session: Session) -> None:
        """A session whose connection has been gone longer than the resume window is over."""
        conn = session.conn
        if not session.valid or conn is None or not conn.closed.is_set():
            return
        ended = next((d.at for d in self.disconnects if d.conn_id == conn.id), None)
        if ended is not None and time.monotonic() - ended > self.resume_window_s:
            session.valid, session.expired = False, True
            self.log_event("session_expired")

    def _bind(self, session: Session, conn: Conn) -> None:
        old = session.conn
        if old is not None and old is not conn and not old.closed.is_set():
            old.close(4009, "session taken over", reason="kicked")
        session.conn = conn
        conn.state["session"] = session

    def _dispatch(self, session: Session, event: str, d: Any, *, store: bool = True) -> None:
        session.seq += 1
        frame = {"op": 0, "s": session.seq, "t": event, "d": d,
                 "id": f"{event}:{uuid.uuid4().hex[:16]}"}
        if store:
            session.events.append((session.seq, frame))
        conn = session.conn
        if conn is not None and not conn.closed.is_set():
            conn.send(frame)
        else:
            self.changed()


def _iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S+08:00", time.localtime())


class Driver(PlatformDriver):
    """The fleet's and the contract kit's handle on this fake (see testing/driver.py)."""
    platform = "qqbot"
    max_reply_chars = 2000

    def __init__(self, keepalive: Keepalive | None = None, *, secret: str | None = None) -> None:
        super().__init__(keepalive, secret=secret)
        k = self.keepalive
        self.fake = FakeQQBotServer(app_id="102000777", client_secret=secret or "qq-fleet-secret",
                                    heartbeat_interval_ms=int(k.interval_s * 1000),
                                    heartbeat_deadline_s=k.deadline_s)

    def bot_config(self, **extra: Any) -> dict:
        return {"app_id": self.fake.app_id, "client_secret": self.fake.client_secret,
                "api_base": self.fake.http_base, "token_url": self.fake.token_url, **extra}

    def bad_credentials_config(self, **extra: Any) -> dict:
        return self.bot_config(client_secret="not-the-secret", **extra)

    def user_says(self, text: str, *, chat: int = 0, user: int | None = None,
                  group: bool = False) -> str:
        who = chat if user is None else user
        if group:
            return self.fake.send_user_message(text, kind="group",
                                               group_openid=f"group-openid-{chat}",
                                               member_openid=f"member-openid-{who}")
        return self.fake.send_user_message(text, kind="c2c", openid=f"user-openid-{who}")

    def redeliver(self, message_id: str) -> None:
        m = self.fake.user_messages[message_id]
        if m.kind == "group":
            self.fake.dispatch("GROUP_AT_MESSAGE_CREATE", {
                "id": message_id, "content": " " + m.text, "timestamp": _iso(),
                "group_openid": m.openid, "group_id": m.openid,
                "author": {"member_openid": "member-openid-again", "id": "member-openid-again"}})
        else:
            self.fake.dispatch("C2C_MESSAGE_CREATE", {
                "id": message_id, "content": m.text, "timestamp": _iso(),
                "author": {"user_openid": m.openid, "id": m.openid}})

    def go_silent(self, seconds: float) -> None:
        """The live connection turns zombie (its network path died); a new one works."""
        self.fake.go_silent(seconds, whole_server=False)

    def reply_rows(self) -> list[ReplyRow]:
        return [ReplyRow(r.msg_id, r.content, r.at) for r in self.fake.replies]

    transcribes_voice = True  # asr_refer_text

    def user_sends_media(self, data: bytes, *, kind: str, name: str, mime: str,
                         transcript: str | None = None, chat: int = 0) -> str:
        return self.fake.send_user_media(data, kind, openid=f"user-openid-{chat}", filename=name,
                                         content_type=mime if kind == "image" else "",
                                         transcript=transcript)

    def uploads(self) -> int:
        return len(self.fake.file_infos)

    def lateness(self) -> list[float]:
        return [max(0.0, x) for conn_id in list(self.fake.keepalive_times)
                for x in self.fake.keepalive_lateness(conn_id)]

    def session_up_at(self, conn_id: int) -> float | None:
        return next((f.at for f in self.fake.frames if f.direction == "out"
                     and f.conn_id == conn_id and isinstance(f.data, dict)
                     and f.data.get("t") in ("READY", "RESUMED")), None)
