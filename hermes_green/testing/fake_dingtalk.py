"""A strict fake of DingTalk's stream gateway, its OpenAPI and the robot session webhooks.

What it enforces, and where each rule comes from (dp = open-dingtalk developerpedia
`docs/learn/stream/protocol.md`; py/go/java = the official dingtalk-stream SDKs):
- `POST /v1.0/gateway/connections/open`: clientId + clientSecret (else 401), `subscriptions` a
  list of {type: SYSTEM|EVENT|CALLBACK, topic}, EVENT only with topic "*" (dp, "消息类型");
  answers {endpoint, ticket}. A ticket opens ONE connection and only within `ticket_ttl_s` (90 s,
  dp: "ticket的有效期为90秒且只能用来建立一条连接"); a used, unknown or stale ticket is refused at
  the handshake (HTTP 400 *unverified status*).
- pushes go only to connections subscribed to their topic (dp FAQ: "只会推送 Stream Client 注册的
  Topic"), to one live connection (dp FAQ: one channel per push, chosen by the server);
- SYSTEM `ping` every `server_ping_interval_s` with {opaque}; its answer (code 200, the same
  messageId, data carrying the same opaque, dp "ping 请求处理") must come within
  `ping_deadline_s`, else the connection is closed (the deadline is *unverified*);
- SYSTEM `disconnect` (`send_disconnect`): nothing more is pushed on that connection, which is
  closed `disconnect_grace_s` later (dp: "服务端在静默10s之后会主动断开 tcp 连接");
- CALLBACK bot messages are fire-and-forget: never re-sent, acked or not (dp FAQ: "机器人消息当前
  是fire-forgot模式"); one sent while no connection is up is lost (the user gets the bot's offline
  prompt: py chatbot.py `set_off_duty_prompt`);
- EVENTs are re-sent every `event_ack_timeout_s` until answered with data {status: SUCCESS}
  (LATER asks for a re-send), and `duplicate_events` re-sends an answered one once more (dp FAQ:
  "依然可能出现重复推送");
- every answer must be {code: int, headers: {messageId, contentType: application/json},
  message: str, data: JSON text} (dp "客户端响应"); others are protocol errors;
- `POST /v1.0/oauth2/accessToken {appKey, appSecret}` -> {accessToken, expireIn}; a bad
  secret is 401 *unverified*; an unknown or expired token on the robot API is HTTP 400
  {code: InvalidAuthentication} (satorijs/satori#240);
- robot OpenAPI (`/v1.0/robot/oToMessages/batchSend`, `/v1.0/robot/groupMessages/send`):
  robotCode = the app's robot code, msgKey sampleMarkdown|sampleText with msgParam a JSON text,
  receivers the bot has seen (unknown staff ids -> invalidStaffIdList); `throttle(n)` answers 403
  Forbidden.AccessDenied.QpsLimitForAppkeyAndApi *unverified code*;
- session webhooks (`/robot/sendBySession?session=`): one per inbound message here, valid until
  its sessionWebhookExpiredTime (`webhook_ttl_s`, ~1.5 h in the wild *unverified*), then errcode
  300001 "session 不存在" (agentscope-ai/agentscope#1317); at most `webhook_rate_per_min` posts a
  minute per webhook, then 130101 (the robot webhooks' documented 20 a minute); bodies over 20,000
  bytes get 460101 (feiyu563/PrometheusAlert#318); msgtype text|markdown.
- files in: picture / file / audio messages carry a `downloadCode` (audio also `recognition`,
  DingTalk's transcript; developerpedia docs/learn/bot/message.md, dingtalk_stream chatbot.py);
  POST /v1.0/robot/messageFiles/download {downloadCode, robotCode} with a valid token ->
  {downloadUrl} (a URL of this fake that lives `download_url_ttl_s`, *unverified* life);
  an unknown code or another robotCode -> HTTP 400 {code: invalidParameter} *unverified code*.
- files out: POST /media/upload?access_token=&type=image|voice|video|file with the multipart
  part `media` (the classic oapi API; a bad token -> errcode 40014 *unverified*; a file over
  the type's limit, 20 MB here *unverified*, -> errcode 40004 *unverified*) -> {errcode 0,
  media_id, type, created_at}; then the robot OpenAPI with msgKey sampleImageMsg {photoURL:
  media_id} or sampleFile {mediaId, fileName, fileType}: an unknown media id -> 400
  invalidParameter. `files` records what users see (attributed like replies); `uploads`
  counts accepted uploads; `hold_file_sends()` holds those robot sends unprocessed.

Test and demo API:
    fake = FakeDingTalkServer(server_ping_interval_s=0.2, ping_deadline_s=0.5).start()
    DingTalkConfig(client_id=fake.client_id, client_secret=fake.client_secret,
                   api_base=fake.http_base)
    mid = fake.send_user_message("hi", conversation_type="1"|"2", staff_id=..., ...)
    fake.replies / replies_to(mid)   Reply(msg_id, conversation_id, text, title, via, at)
    fake.pushes                      Push per frame pushed (callbacks, events): ack time, code
    fake.acks_of(mid)                the answers to the callbacks that carried that message
    fake.keepalive_times[conn_id]    receipt times of the client's WebSocket pings
    fake.pings                       SYSTEM pings sent, with their answer times
    fake.protocol_errors, fake.refusals, fake.lost, fake.handshake_rejections
Faults: the harness's drop(), close_with(code), send_garbage(data), rest_delay_s, rest_429(n);
go_silent(s, pongs=False) makes the live connections zombies; send_disconnect(); redeliver(mid);
send_event(); fail_open(n, status); throttle(n); expire_webhooks(); expire_tokens();
advance_time(s) moves the fake's wall clock (webhook expiry).
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import gevent
import gevent.event
import gevent.pool

from geventwebsocket.websocket import WebSocket

from .driver import Keepalive, PlatformDriver, ReplyRow, SentFile
from .harness import Conn, FakePlatformServer, parse_multipart

BOT_TOPIC = "/v1.0/im/bot/messages/get"
TYPES = frozenset({"SYSTEM", "EVENT", "CALLBACK"})
WEBHOOK_GONE, WEBHOOK_TOO_FAST, WEBHOOK_TOO_LARGE, WEBHOOK_BAD = 300001, 130101, 460101, 40035
MAX_BODY_BYTES = 20000
THROTTLE_CODE = "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi"
UPLOAD_TYPES = {"image": 20 * 1024 * 1024, "voice": 2 * 1024 * 1024,
                "video": 20 * 1024 * 1024, "file": 20 * 1024 * 1024}
FILE_MSG_KEYS = ("sampleImageMsg", "sampleFile")


# gevent-websocket answers pings inside its reader, and its WebSocket has __slots__: the fake
# swaps in this subclass (same layout) to see each ping and to swallow it when a zombie.
_PING_HOOKS: dict[int, Any] = {}


class _PingAwareWebSocket(WebSocket):
    __slots__ = ()

    def handle_ping(self, header, payload):
        hook = _PING_HOOKS.get(id(self))
        if hook is None or hook():
            super().handle_ping(header, payload)


@dataclass
class Push:
    """One frame the fake pushed that expects an answer (callback or event)."""
    kind: str  # "CALLBACK" | "EVENT"
    message_id: str  # frame header messageId
    msg_id: str  # the bot message's msgId ("" for events)
    conn_id: int
    sent_at: float
    acked_at: float | None = None
    ack_code: int | None = None
    ack_data: Any = None


@dataclass
class Ping:
    message_id: str
    opaque: str
    conn_id: int
    sent_at: float
    answered_at: float | None = None


@dataclass
class Reply:
    """An answer the user sees, by the session webhook or the robot OpenAPI.

    The OpenAPI names no inbound message. The fake attributes such a reply to the oldest message
    of its conversation that has no reply yet, else to the message the conversation's last reply
    belonged to (the next part of the same answer): exact while one answer at a time is in
    flight per conversation, which is how the gateway sends."""
    msg_id: str | None
    conversation_id: str
    text: str
    title: str
    via: str  # "webhook" | "openapi"
    at: float = field(default_factory=time.monotonic)


@dataclass
class _Message:
    msg_id: str
    conversation_id: str
    conversation_type: str
    staff_id: str
    data: dict
    session: str


@dataclass
class _Event:
    data: dict
    headers: dict
    answered: gevent.event.Event = field(default_factory=gevent.event.Event)
    pushes: int = 0


class FakeDingTalkServer(FakePlatformServer):
    ws_path = "/connect"

    def __init__(self, client_id: str = "dingfakeclient", client_secret: str = "fake-dt-secret",
                 *, robot_code: str | None = None, ticket_ttl_s: float = 90.0,
                 server_ping_interval_s: float = 10.0, ping_deadline_s: float = 30.0,
                 keepalive_deadline_s: float | None = None, disconnect_grace_s: float = 10.0,
                 event_ack_timeout_s: float = 5.0, event_redeliver_limit: int = 5,
                 duplicate_events: bool = False, webhook_ttl_s: float = 5400.0,
                 webhook_rate_per_min: int = 20, token_expire_s: float = 7200.0,
                 download_url_ttl_s: float = 3600.0) -> None:
        super().__init__()
        self.client_id, self.client_secret = client_id, client_secret
        self.robot_code = robot_code or client_id
        self.app_id = str(uuid.uuid5(uuid.NAMESPACE_DNS, client_id))
        self.ticket_ttl_s = ticket_ttl_s
        self.server_ping_interval_s = server_ping_interval_s
        self.ping_deadline_s = ping_deadline_s
        self.keepalive_deadline_s = keepalive_deadline_s
        self.disconnect_grace_s = disconnect_grace_s
        self.event_ack_timeout_s = event_ack_timeout_s
        self.event_redeliver_limit = event_redeliver_limit
        self.duplicate_events = duplicate_events
        self.webhook_ttl_s = webhook_ttl_s
        self.webhook_rate_per_min = webhook_rate_per_min
        self.token_expire_s = token_expire_s
        self.download_url_ttl_s = download_url_ttl_s
        # files
        self.files: list[SentFile] = []  # files shown in a chat (sampleImageMsg / sampleFile)
        self.uploads = 0  # media/upload calls accepted
        self.held_sends = 0
        self.download_codes: dict[str, tuple[bytes, str]] = {}  # code -> (data, content type)
        self.media_ids: dict[str, tuple[str, str, bytes]] = {}  # id -> (type, filename, data)
        self._release = gevent.event.Event()
        self._release.set()
        # records
        self.replies: list[Reply] = []
        self.pushes: list[Push] = []
        self.pings: list[Ping] = []
        self.keepalive_times: dict[int, list[float]] = {}
        self.protocol_errors: list[tuple[float, str, int]] = []
        self.refusals: list[tuple[str, Any]] = []  # (what, code) of refused REST calls
        self.lost: list[str] = []  # msgIds pushed while no connection could take them
        self.handshake_rejections: list[tuple[float, str]] = []
        self.open_requests: list[dict] = []  # bodies of connections/open (secret masked)
        self.issued_tokens: list[str] = []
        self.disconnects_sent: list[tuple[float, int]] = []
        self.messages: dict[str, _Message] = {}
        # state
        self._tickets: dict[str, tuple[float, list]] = {}  # ticket -> (expires, subscriptions)
        self._accepted: dict[str, list] = {}  # ticket -> subscriptions, for on_connect
        self._tokens: dict[str, float] = {}  # token -> monotonic expiry
        self._sessions: dict[str, dict] = {}  # session -> {msg_id, expires_ms, posts}
        self._by_push: dict[str, Push] = {}
        self._events: dict[str, _Event] = {}  # messageId -> event
        self._pings: dict[str, Ping] = {}
        self._system_ids: set[str] = set()
        self._open_faults: list[tuple[int, dict]] = []
        self._throttle = 0
        self._time_offset = 0.0
        self._jobs = gevent.pool.Group()

    def stop(self) -> None:
        self._jobs.kill(block=True, timeout=2)
        super().stop()

    # -- clock -------------------------------------------------------------------------------
    def now_ms(self) -> int:
        """The fake's wall clock in ms (webhook expiry), moved by `advance_time`."""
        return int((time.time() + self._time_offset) * 1000)

    def advance_time(self, seconds: float) -> None:
        self._time_offset += seconds

    # -- users ---------------------------------------------------------------------------------
    def send_user_message(self, text: str = "hello", *, conversation_type: str = "1",
                          staff_id: str = "staff-1", conversation_id: str | None = None,
                          in_at_list: bool = True, msgtype: str = "text",
                          content: dict | None = None, msg_id: str | None = None,
                          sender_nick: str = "user") -> str:
        """A user writes to the bot (a single chat, or a group @-mentioning it); returns the
        msgId. The data follows developerpedia docs/learn/bot/message.md."""
        msg_id = msg_id or f"msg{uuid.uuid4().hex[:20]}=="
        conv = conversation_id or (f"cid-single-{staff_id}" if conversation_type == "1"
                                   else "cid-group-1")
        session = uuid.uuid4().hex
        expires = self.now_ms() + int(self.webhook_ttl_s * 1000)
        data: dict[str, Any] = {
            "conversationId": conv, "chatbotCorpId": "dingcorpfake",
            "chatbotUserId": "$:LWCP_v1:$bot", "msgId": msg_id, "senderNick": sender_nick,
            "isAdmin": False, "senderStaffId": staff_id, "sessionWebhookExpiredTime": expires,
            "createAt": self.now_ms(), "senderCorpId": "dingcorpfake",
            "conversationType": conversation_type, "senderId": f"$:LWCP_v1:${staff_id}",
            "sessionWebhook": f"{self.http_base}/robot/sendBySession?session={session}",
            "robotCode": self.robot_code, "msgtype": msgtype}
        if conversation_type == "2":
            data["isInAtList"] = in_at_list
            data["conversationTitle"] = "group"
            data["atUsers"] = [{"dingtalkId": "$:LWCP_v1:$bot"}]
        if msgtype == "text":
            data["text"] = {"content": (" " + text) if conversation_type == "2" else text}
        else:
            data["content"] = content if content is not None else {"downloadCode": "dl-fake"}
        self.messages[msg_id] = _Message(msg_id, conv, conversation_type, staff_id, data, session)
        self._sessions[session] = {"msg_id": msg_id, "expires_ms": expires, "posts": []}
        self._push_callback(data)
        return msg_id

    def send_media_message(self, data: bytes, *, kind: str, name: str, mime: str,
                           transcript: str | None = None, staff_id: str = "staff-1",
                           conversation_type: str = "1") -> str:
        """A user sends a picture / file / voice (audio) message: its bytes are behind a
        downloadCode; an audio message carries `recognition` when `transcript` is given."""
        code = f"dl{uuid.uuid4().hex}"
        self.download_codes[code] = (data, mime)
        if kind == "image":
            msgtype, content = "picture", {"downloadCode": code, "pictureDownloadCode": code}
        elif kind == "voice":
            msgtype, content = "audio", {"downloadCode": code, "duration": 2000}
            if transcript is not None:
                content["recognition"] = transcript
        else:
            msgtype, content = "file", {"downloadCode": code, "fileName": name,
                                        "spaceId": "fake-space", "fileId": uuid.uuid4().hex}
        return self.send_user_message(msgtype=msgtype, content=content, staff_id=staff_id,
                                      conversation_type=conversation_type)

    def hold_file_sends(self) -> None:
        """Robot sends of sampleImageMsg / sampleFile are held unanswered, never processed."""
        self._release.clear()

    def release_file_sends(self) -> None:
        self._release.set()

    def redeliver(self, msg_id: str) -> Push | None:
        """Push a bot message again (a fresh frame messageId, the same data), as after a
        restart of the gateway or a server-side retry."""
        return self._push_callback(self.messages[msg_id].data)

    def push_raw(self, frame: Any, conn: Conn | None = None) -> bool:
        """Send any frame (dict as JSON, or text) to a connection (default: the newest)."""
        conn = conn or self._target("CALLBACK", BOT_TOPIC)
        return bool(conn and conn.send(frame))

    def send_event(self, data: dict | None = None, *, event_type: str = "user_add_org",
                   force: bool = False) -> str:
        """An EVENT push (topic "*"), re-sent until answered SUCCESS. `force`: also to
        connections that did not subscribe to events (a misbehaving server). Returns the
        messageId of its first push."""
        headers = {"eventType": event_type, "eventId": uuid.uuid4().hex,
                   "eventCorpId": "dingcorpfake", "eventBornTime": str(self.now_ms()),
                   "eventUnifiedAppId": self.app_id}
        ev = _Event(data if data is not None else {"userId": ["staff-9"]}, headers)
        first = gevent.event.AsyncResult()
        g = self._jobs.spawn(self._event_loop, ev, force, first)
        g.name = "fake-dingtalk:event"
        return first.get(timeout=5)

    def send_disconnect(self, reason: str = "connection is expired", *,
                        with_message_id: bool = False) -> None:
        """Tell the live connections they are going away; close them `disconnect_grace_s`
        later. Nothing more is pushed on them meanwhile."""
        for conn in self.live_conns():
            if conn.state.get("going_away"):
                continue
            conn.state["going_away"] = True
            headers = {"topic": "disconnect", "contentType": "application/json"}
            if with_message_id:
                headers["messageId"] = self._message_id()
                self._system_ids.add(headers["messageId"])
            conn.send({"specVersion": "1.0", "type": "SYSTEM", "headers": headers,
                       "data": json.dumps({"reason": reason})})
            self.disconnects_sent.append((time.monotonic(), conn.id))
            self.log_event("disconnect_sent", conn)
            timer = gevent.spawn_later(self.disconnect_grace_s, conn.close, None,
                                       reason="disconnect_grace_over")
            self._jobs.add(timer)

    def replies_to(self, msg_id: str) -> list[Reply]:
        return [r for r in self.replies if r.msg_id == msg_id]

    def pushes_of(self, msg_id: str) -> list[Push]:
        return [p for p in self.pushes if p.msg_id == msg_id]

    def acks_of(self, msg_id: str) -> list[Push]:
        return [p for p in self.pushes_of(msg_id) if p.acked_at is not None]

    def keepalive_lateness(self, conn_id: int, interval_s: float) -> list[float]:
        """Seconds each client ping came after its slot on a timetable from the connection's
        opening (a ping later than a whole interval restarts the table from itself)."""
        conn = self.conns.get(conn_id)
        if conn is None:
            return []
        due, out = conn.opened_at, []
        for t in self.keepalive_times.get(conn_id, []):
            due += interval_s
            out.append(t - due)
            if t - due > interval_s:
                due = t
        return out

    # -- faults -------------------------------------------------------------------------------
    def go_silent(self, seconds: float, *, pongs: bool = False) -> None:
        """Make the live connections zombies for `seconds`: they swallow every frame both ways
        (nothing pushed arrives, no answers are taken) and drop nobody; with `pongs` the
        WebSocket layer still answers pings (only the application went quiet). Connections
        opened afterwards work."""
        until = time.monotonic() + seconds
        for conn in self.live_conns():
            conn.state["zombie_until"] = until
            conn.state["zombie_pongs"] = pongs
            if self.keepalive_deadline_s is not None:
                conn.expect_keepalive(seconds + self.keepalive_deadline_s)
        self.log_event("go_silent")

    def fail_open(self, times: int = 1, status: int = 500, body: dict | None = None) -> None:
        self._open_faults.extend([(status, body or {"code": "ServiceUnavailable",
                                                    "message": "fault injected"})] * times)

    def throttle(self, times: int = 1) -> None:
        """The next `times` robot OpenAPI sends are refused as over the QPS limit."""
        self._throttle += times

    def expire_webhooks(self) -> None:
        """Every session webhook issued so far is gone (the server's view only)."""
        for s in self._sessions.values():
            s["expires_ms"] = 0

    def expire_tokens(self) -> None:
        self._tokens.clear()

    # -- WebSocket ---------------------------------------------------------------------------
    def start(self) -> "FakeDingTalkServer":
        super().start()
        self._server.pre_start_hook = self._check_handshake
        return self

    def _check_handshake(self, handler) -> bool:
        """pywsgi pre-start hook: True refuses the upgrade (the GET route answers)."""
        env = handler.environ
        if env.get("PATH_INFO") != self.ws_path:
            return False
        ticket = parse_qs(env.get("QUERY_STRING", "")).get("ticket", [""])[0]
        issued = self._tickets.pop(ticket, None)  # one connection per ticket
        if issued is not None and issued[0] > time.monotonic():
            self._accepted[ticket] = issued[1]
            return False
        why = "unknown_or_used_ticket" if issued is None else "expired_ticket"
        self.handshake_rejections.append((time.monotonic(), why))
        self.log_event(f"handshake_rejected:{why}")
        return True

    def _handshake_refusal(self, request: dict):
        return 400, {"code": "invalidTicket", "message": "ticket is invalid or used"}

    def on_connect(self, conn: Conn, request: dict) -> bool:
        ticket = parse_qs(request["query"]).get("ticket", [""])[0]
        subs = self._accepted.pop(ticket, None)
        if subs is None:
            return False
        conn.state["subs"] = {(s["type"], s["topic"]) for s in subs}
        self.keepalive_times[conn.id] = []
        self._wrap_ping(conn)
        if self.keepalive_deadline_s is not None:
            conn.expect_keepalive(self.keepalive_deadline_s)
        g = self._jobs.spawn(self._ping_loop, conn)
        g.name = "fake-dingtalk:ping"
        return True

    def _wrap_ping(self, conn: Conn) -> None:
        """Record the client's WebSocket pings; a zombie without pongs swallows them."""
        def on_ping() -> bool:
            if self._zombie(conn) and not conn.state.get("zombie_pongs"):
                return False
            self.keepalive_times[conn.id].append(time.monotonic())
            conn.keepalive()
            self.changed()
            return True

        _PING_HOOKS[id(conn.ws)] = on_ping
        conn.ws.__class__ = _PingAwareWebSocket
        g = self._jobs.spawn(lambda: conn.closed.wait() and _PING_HOOKS.pop(id(conn.ws), None))
        g.name = "fake-dingtalk:ping-hook"

    def _zombie(self, conn: Conn) -> bool:
        return conn.state.get("zombie_until", 0.0) > time.monotonic()

    def _ping_loop(self, conn: Conn) -> None:
        while not conn.closed.wait(self.server_ping_interval_s):
            if conn.state.get("going_away") or self._zombie(conn):
                continue
            ping = Ping(self._message_id(), uuid.uuid4().hex, conn.id, time.monotonic())
            self._pings[ping.message_id] = ping
            self.pings.append(ping)
            conn.send({"specVersion": "1.0", "type": "SYSTEM",
                       "headers": {"topic": "ping", "messageId": ping.message_id,
                                   "contentType": "application/json",
                                   "time": str(self.now_ms())},
                       "data": json.dumps({"opaque": ping.opaque})})
            timer = gevent.spawn_later(self.ping_deadline_s, self._ping_deadline, conn, ping)
            self._jobs.add(timer)

    def _ping_deadline(self, conn: Conn, ping: Ping) -> None:
        if ping.answered_at is None and not conn.closed.is_set() and not self._zombie(conn):
            self.log_event("ping_unanswered", conn)
            conn.close(None, reason="ping_unanswered")

    def on_frame(self, conn: Conn, data: Any) -> None:
        if self._zombie(conn):
            return
        if not isinstance(data, dict):
            return self._protocol_error(conn, "answer_not_an_object")
        headers = data.get("headers")
        message_id = headers.get("messageId") if isinstance(headers, dict) else None
        code, text = data.get("code"), data.get("data")
        if (not isinstance(code, int) or isinstance(code, bool)
                or not isinstance(message_id, str)
                or headers.get("contentType") != "application/json"
                or not isinstance(data.get("message"), str) or not isinstance(text, str)):
            return self._protocol_error(conn, "malformed_answer")
        try:
            parsed = json.loads(text)
        except ValueError:
            return self._protocol_error(conn, "answer_data_not_json")
        now = time.monotonic()
        if message_id in self._pings:
            return self._on_ping_answer(conn, self._pings[message_id], code, parsed, now)
        if message_id in self._system_ids:
            return None  # an answer to a disconnect: optional (dp), the Go SDK sends one
        push = self._by_push.get(message_id)
        if push is None:
            return self._protocol_error(conn, "answer_for_unknown_message")
        if push.acked_at is not None:
            return self._protocol_error(conn, "answered_twice")
        push.acked_at, push.ack_code, push.ack_data = now, code, parsed
        if push.kind == "EVENT":
            ev = self._events.get(message_id)
            if ev is not None and code == 200 and isinstance(parsed, dict) \
                    and parsed.get("status") == "SUCCESS":
                ev.answered.set()
        self.changed()

    def _on_ping_answer(self, conn: Conn, ping: Ping, code: int, parsed: Any,
                        now: float) -> None:
        if code != 200 or not isinstance(parsed, dict) or parsed.get("opaque") != ping.opaque:
            return self._protocol_error(conn, "bad_ping_answer")
        if ping.answered_at is None:
            ping.answered_at = now
            conn.keepalive()
            self.changed()

    def _protocol_error(self, conn: Conn, what: str) -> None:
        self.protocol_errors.append((time.monotonic(), what, conn.id))
        self.log_event(f"protocol_error:{what}", conn)

    # -- pushes -------------------------------------------------------------------------------
    def _message_id(self) -> str:
        return f"{uuid.uuid4().hex[:8]}_{uuid.uuid4().hex[:4]}_{uuid.uuid4().hex[:11]}"

    def _target(self, kind: str, topic: str, force: bool = False) -> Conn | None:
        """The newest live connection that subscribed to the topic and is not going away."""
        for conn in reversed(self.live_conns()):
            if conn.state.get("going_away"):
                continue
            if force or (kind, topic) in conn.state.get("subs", ()):
                return conn
        return None

    def _frame(self, kind: str, topic: str, message_id: str, data: dict, conn: Conn,
               extra: dict | None = None) -> dict:
        return {"specVersion": "1.0", "type": kind,
                "headers": {"appId": self.app_id, "connectionId": f"conn-{conn.id}",
                            "contentType": "application/json", "messageId": message_id,
                            "time": str(self.now_ms()), "topic": topic, **(extra or {})},
                "data": json.dumps(data, ensure_ascii=False)}

    def _push_callback(self, data: dict) -> Push | None:
        msg_id = data.get("msgId", "")
        conn = self._target("CALLBACK", BOT_TOPIC)
        if conn is None:
            self.lost.append(msg_id)
            self.log_event("callback_lost_offline")
            return None
        push = Push("CALLBACK", self._message_id(), msg_id, conn.id, time.monotonic())
        self._by_push[push.message_id] = push
        self.pushes.append(push)
        if self._zombie(conn) or not conn.send(self._frame("CALLBACK", BOT_TOPIC,
                                                          push.message_id, data, conn)):
            self.lost.append(msg_id)  # fire-and-forget: a dead path loses it
            self.log_event("callback_lost_zombie", conn)
        return push

    def _event_loop(self, ev: _Event, force: bool, first: gevent.event.AsyncResult) -> None:
        extra_after_ack = 1 if self.duplicate_events else 0
        while ev.pushes <= self.event_redeliver_limit:
            conn = self._target("EVENT", "*", force)
            if conn is None:
                gevent.sleep(0.05)
                continue
            push = Push("EVENT", self._message_id(), "", conn.id, time.monotonic())
            self._by_push[push.message_id] = push
            self._events[push.message_id] = ev
            self.pushes.append(push)
            ev.pushes += 1
            if not self._zombie(conn):
                conn.send(self._frame("EVENT", "*", push.message_id, ev.data, conn, ev.headers))
            if not first.ready():
                first.set(push.message_id)
            if ev.answered.wait(self.event_ack_timeout_s):
                if extra_after_ack <= 0:
                    return
                extra_after_ack -= 1
                ev.answered.clear()
        self.log_event("event_given_up")

    # -- REST ---------------------------------------------------------------------------------
    def routes(self):
        return {
            ("POST", "/v1.0/gateway/connections/open"): self._open,
            ("POST", "/v1.0/oauth2/accessToken"): self._token,
            ("POST", "/v1.0/robot/oToMessages/batchSend"): self._robot_send,
            ("POST", "/v1.0/robot/groupMessages/send"): self._robot_send,
            ("POST", "/robot/sendBySession"): self._session_send,
            ("POST", "/v1.0/robot/messageFiles/download"): self._file_download,
            ("POST", "/media/upload"): self._media_upload,
            ("GET", self.ws_path): self._handshake_refusal,
        }

    def _open(self, request: dict):
        body = request["json"] if isinstance(request["json"], dict) else {}
        self.open_requests.append({**body, "clientSecret": "***"})
        if self._open_faults:
            return self._open_faults.pop(0)
        if body.get("clientId") != self.client_id or body.get("clientSecret") != self.client_secret:
            self.refusals.append(("open", 401))
            return 401, {"code": "InvalidAuthentication", "message": "clientId or secret invalid"}
        subs = body.get("subscriptions")
        if (not isinstance(subs, list) or not subs
                or not all(isinstance(s, dict) and s.get("type") in TYPES
                           and isinstance(s.get("topic"), str) and s["topic"] for s in subs)
                or any(s["type"] == "EVENT" and s["topic"] != "*" for s in subs)):
            self.refusals.append(("open", 400))
            return 400, {"code": "invalidParameter", "message": "bad subscriptions"}
        ticket = str(uuid.uuid4())
        self._tickets[ticket] = (time.monotonic() + self.ticket_ttl_s, subs)
        return 200, {"endpoint": f"ws://{self.host}:{self.port}{self.ws_path}", "ticket": ticket}

    def _token(self, request: dict):
        body = request["json"] if isinstance(request["json"], dict) else {}
        if body.get("appKey") != self.client_id or body.get("appSecret") != self.client_secret:
            self.refusals.append(("token", 401))
            return 401, {"code": "InvalidAuthentication", "message": "appKey or appSecret invalid"}
        token = uuid.uuid4().hex
        self._tokens[token] = time.monotonic() + self.token_expire_s
        self.issued_tokens.append(token)
        return 200, {"accessToken": token, "expireIn": int(self.token_expire_s)
                     if float(self.token_expire_s).is_integer() else self.token_expire_s}

    def _robot_send(self, request: dict):
        token = request["headers"].get("X-Acs-Dingtalk-Access-Token", "")
        if self._tokens.get(token, 0.0) <= time.monotonic():
            self.refusals.append(("openapi", "InvalidAuthentication"))
            return 400, {"code": "InvalidAuthentication", "message": "不合法的access_token"}
        if self._throttle > 0:
            self._throttle -= 1
            self.refusals.append(("openapi", THROTTLE_CODE))
            return 403, {"code": THROTTLE_CODE, "message": "QPS limit"}
        body = request["json"] if isinstance(request["json"], dict) else {}
        group = request["path"].endswith("/groupMessages/send")
        if body.get("msgKey") in FILE_MSG_KEYS:
            return self._robot_send_file(body, group)
        bad = self._bad_robot_body(body)
        if bad:
            self.refusals.append(("openapi", bad))
            return 400, {"code": "invalidParameter", "message": bad}
        param = json.loads(body["msgParam"])
        text = param.get("text", param.get("content", ""))
        title = param.get("title", "")
        if group:
            conv = body.get("openConversationId")
            if not any(m.conversation_id == conv for m in self.messages.values()):
                self.refusals.append(("openapi", "unknown_conversation"))
                return 400, {"code": "resource.not.found", "message": "conversation not found"}
            self._reply(conv, text, title, "openapi")
            return 200, {"processQueryKey": uuid.uuid4().hex}
        users = body.get("userIds")
        if not isinstance(users, list) or not 1 <= len(users) <= 20:
            self.refusals.append(("openapi", "bad_userIds"))
            return 400, {"code": "invalidParameter", "message": "userIds"}
        known = {m.staff_id: m for m in self.messages.values() if m.conversation_type == "1"}
        invalid = [u for u in users if u not in known]
        for u in users:
            if u in known:
                self._reply(known[u].conversation_id, text, title, "openapi")
        return 200, {"processQueryKey": uuid.uuid4().hex, "invalidStaffIdList": invalid,
                     "flowControlledStaffIdList": []}

    def _robot_send_file(self, body: dict, group: bool):
        if not self._release.is_set():
            self.held_sends += 1
            self.changed()
            self._release.wait()
            return 500, {"code": "ServiceUnavailable", "message": "dropped"}
        if body.get("robotCode") != self.robot_code or not isinstance(body.get("msgParam"), str):
            self.refusals.append(("openapi", "robotCode/msgParam"))
            return 400, {"code": "invalidParameter", "message": "robotCode/msgParam"}
        try:
            param = json.loads(body["msgParam"])
        except ValueError:
            param = None
        key = body["msgKey"]
        if not isinstance(param, dict):
            self.refusals.append(("openapi", "msgParam is not JSON"))
            return 400, {"code": "invalidParameter", "message": "msgParam"}
        media_id = param.get("photoURL" if key == "sampleImageMsg" else "mediaId")
        if key == "sampleFile" and not (isinstance(param.get("fileName"), str)
                                        and isinstance(param.get("fileType"), str)):
            self.refusals.append(("openapi", "msgParam fields"))
            return 400, {"code": "invalidParameter", "message": "msgParam fields"}
        media = self.media_ids.get(media_id) if isinstance(media_id, str) else None
        if media is None:
            self.refusals.append(("openapi", "unknown_media_id"))
            return 400, {"code": "invalidParameter", "message": "mediaId"}
        kind, filename, data = media
        name = param.get("fileName", "") if key == "sampleFile" else ""
        shown = "image" if key == "sampleImageMsg" else "file"
        if group:
            conv = body.get("openConversationId")
            if not any(m.conversation_id == conv for m in self.messages.values()):
                self.refusals.append(("openapi", "unknown_conversation"))
                return 400, {"code": "resource.not.found", "message": "conversation not found"}
            convs, invalid = [conv], []
        else:
            users = body.get("userIds")
            if not isinstance(users, list) or not 1 <= len(users) <= 20:
                self.refusals.append(("openapi", "bad_userIds"))
                return 400, {"code": "invalidParameter", "message": "userIds"}
            known = {m.staff_id: m for m in self.messages.values() if m.conversation_type == "1"}
            invalid = [u for u in users if u not in known]
            convs = [known[u].conversation_id for u in users if u in known]
        for conv in convs:
            self.files.append(SentFile(self._attribute(conv) or "", name, data, shown))
        self.changed()
        answer: dict = {"processQueryKey": uuid.uuid4().hex}
        if not group:
            answer.update(invalidStaffIdList=invalid, flowControlledStaffIdList=[])
        return 200, answer

    def _attribute(self, conv: str) -> str | None:
        """The message a file in that conversation answers: the one its last reply answered,
        else the oldest one (the OpenAPI names none; see Reply)."""
        last = next((r.msg_id for r in reversed(self.replies) if r.conversation_id == conv),
                    None)
        return last or next((m.msg_id for m in self.messages.values()
                             if m.conversation_id == conv), None)

    def _file_download(self, request: dict):
        token = request["headers"].get("X-Acs-Dingtalk-Access-Token", "")
        if self._tokens.get(token, 0.0) <= time.monotonic():
            self.refusals.append(("download", "InvalidAuthentication"))
            return 400, {"code": "InvalidAuthentication", "message": "不合法的access_token"}
        body = request["json"] if isinstance(request["json"], dict) else {}
        found = self.download_codes.get(body.get("downloadCode"))
        if body.get("robotCode") != self.robot_code or found is None:
            self.refusals.append(("download", "invalidParameter"))
            return 400, {"code": "invalidParameter", "message": "downloadCode/robotCode"}
        data, mime = found
        return 200, {"downloadUrl": self.host_media(data, mime, ttl_s=self.download_url_ttl_s)}

    def _media_upload(self, request: dict):
        query = parse_qs(request["query"])
        token, kind = query.get("access_token", [""])[0], query.get("type", [""])[0]
        if self._tokens.get(token, 0.0) <= time.monotonic():
            self.refusals.append(("upload", 40014))
            return 200, {"errcode": 40014, "errmsg": "不合法的access_token"}
        if kind not in UPLOAD_TYPES:
            self.refusals.append(("upload", "type"))
            return 200, {"errcode": 40005, "errmsg": "不合法的文件类型"}
        try:
            _, parts = parse_multipart(request)
        except ValueError:
            parts = {}
        part = parts.get("media")
        if part is None or not part.data:
            self.refusals.append(("upload", "no_media"))
            return 200, {"errcode": 41001, "errmsg": "缺少media参数"}
        if len(part.data) > UPLOAD_TYPES[kind]:
            self.refusals.append(("upload", 40004))
            return 200, {"errcode": 40004, "errmsg": "不合法的媒体文件大小"}
        media_id = f"@lA{uuid.uuid4().hex}"
        self.media_ids[media_id] = (kind, part.filename or "", part.data)
        self.uploads += 1
        self.changed()
        return 200, {"errcode": 0, "errmsg": "ok", "type": kind, "media_id": media_id,
                     "created_at": self.now_ms()}

    def _bad_robot_body(self, body: dict) -> str | None:
        if body.get("robotCode") != self.robot_code:
            return "robotCode"
        key, raw = body.get("msgKey"), body.get("msgParam")
        if key not in ("sampleMarkdown", "sampleText") or not isinstance(raw, str):
            return "msgKey/msgParam"
        try:
            param = json.loads(raw)
        except ValueError:
            return "msgParam is not JSON"
        field_name = "text" if key == "sampleMarkdown" else "content"
        if not isinstance(param, dict) or not isinstance(param.get(field_name), str) or (
                key == "sampleMarkdown" and not isinstance(param.get("title"), str)):
            return "msgParam fields"
        if len(param[field_name].encode("utf-8")) > MAX_BODY_BYTES:  # *unverified* for OpenAPI
            return "content too long"
        return None

    def _session_send(self, request: dict):
        session = parse_qs(request["query"]).get("session", [""])[0]
        s = self._sessions.get(session)
        if s is None or self.now_ms() >= s["expires_ms"]:
            return self._webhook_refused(WEBHOOK_GONE, "session 不存在")
        if len(request["body"]) > MAX_BODY_BYTES:
            return self._webhook_refused(WEBHOOK_TOO_LARGE, "description: body 大小不合法;"
                                         "solution:请保持大小在 20000bytes 以内;")
        now = time.monotonic()
        s["posts"] = [t for t in s["posts"] if now - t < 60.0]
        if len(s["posts"]) >= self.webhook_rate_per_min:
            return self._webhook_refused(WEBHOOK_TOO_FAST, "send too fast, exceed 20 times "
                                         "per minute")
        body = request["json"] if isinstance(request["json"], dict) else {}
        kind = body.get("msgtype")
        part = body.get(kind) if kind in ("text", "markdown") else None
        text = part.get("text" if kind == "markdown" else "content") \
            if isinstance(part, dict) else None
        title = part.get("title", "") if isinstance(part, dict) else ""
        if not isinstance(text, str) or (kind == "markdown" and not isinstance(title, str)):
            return self._webhook_refused(WEBHOOK_BAD, "缺少参数 json")
        s["posts"].append(now)
        message = self.messages[s["msg_id"]]
        self.replies.append(Reply(message.msg_id, message.conversation_id, text, title,
                                  "webhook"))
        self.changed()
        return 200, {"errcode": 0, "errmsg": "ok"}

    def _webhook_refused(self, errcode: int, errmsg: str):
        self.refusals.append(("webhook", errcode))
        self.changed()
        return 200, {"errcode": errcode, "errmsg": errmsg}

    def _reply(self, conv: str, text: str, title: str, via: str) -> None:
        answered = {r.msg_id for r in self.replies}
        mine = [m for m in self.messages.values() if m.conversation_id == conv]
        target = next((m.msg_id for m in mine if m.msg_id not in answered), None)
        if target is None:
            target = next((r.msg_id for r in reversed(self.replies)
                           if r.conversation_id == conv), None)
        self.replies.append(Reply(target, conv, text, title, via))
        self.changed()


class Driver(PlatformDriver):
    """The fleet's and the contract kit's handle on this fake (see testing/driver.py). The
    keepalive timing applies both ways: the fake pings every `interval_s` and wants each answer
    within `deadline_s`, and drops a client whose own WebSocket pings stop for `deadline_s`."""
    platform = "dingtalk"
    max_reply_chars = 3000  # the adapter's REPLY_CHUNK_CHARS: under the 20,000-byte body

    def __init__(self, keepalive: Keepalive | None = None, *, secret: str | None = None) -> None:
        super().__init__(keepalive, secret=secret)
        k = self.keepalive
        self.fake = FakeDingTalkServer(client_id="dingfleet", client_secret=secret
                                       or "dingtalk-fleet-secret",
                                       server_ping_interval_s=k.interval_s,
                                       ping_deadline_s=k.deadline_s,
                                       keepalive_deadline_s=k.deadline_s)

    def bot_config(self, **extra: Any) -> dict:
        return {"client_id": self.fake.client_id, "client_secret": self.fake.client_secret,
                "api_base": self.fake.http_base, "oapi_base": self.fake.http_base,
                "ping_interval_s": self.keepalive.interval_s, **extra}

    def bad_credentials_config(self, **extra: Any) -> dict:
        return self.bot_config(client_secret="not-the-secret", **extra)

    def user_says(self, text: str, *, chat: int = 0, user: int | None = None,
                  group: bool = False) -> str:
        staff = f"user{chat if user is None else user}"
        if group:
            return self.fake.send_user_message(text, conversation_type="2", staff_id=staff,
                                               conversation_id=f"cid-group-{chat}")
        return self.fake.send_user_message(text, conversation_type="1", staff_id=staff)

    def redeliver(self, message_id: str) -> None:
        self.fake.redeliver(message_id)

    def reply_rows(self) -> list[ReplyRow]:
        return [ReplyRow(r.msg_id or "", r.text, r.at) for r in self.fake.replies]

    def lateness(self) -> list[float]:
        return [max(0.0, x) for conn_id in list(self.fake.keepalive_times)
                for x in self.fake.keepalive_lateness(conn_id, self.keepalive.interval_s)]

    # -- media -----------------------------------------------------------------------------
    transcribes_voice = True  # audio messages carry DingTalk's `recognition`

    def user_sends_media(self, data: bytes, *, kind: str, name: str, mime: str,
                         transcript: str | None = None, chat: int = 0) -> str:
        return self.fake.send_media_message(data, kind=kind, name=name, mime=mime,
                                            transcript=transcript, staff_id=f"user{chat}")

    # files_sent / hold / held / release: the PlatformDriver's (this fake keeps the same records)
    def uploads(self) -> int:
        return self.fake.uploads

    def session_up_at(self, conn_id: int) -> float | None:
        """The ticket is checked at the handshake: the session is up when the socket is."""
        conn = self.fake.conns.get(conn_id)
        return conn.opened_at if conn is not None and "subs" in conn.state else None
