"""A strict fake of the WeCom AI-bot long-connection server (wss://openws.work.weixin.qq.com).

It enforces what makes the real server drop, refuse or forget (shared/PROTOCOLS.md, WeCom):
- auth: the first useful frame is `aibot_subscribe` with the right bot_id/secret; any other
  command before it is refused;
- keepalive: a connection whose last `ping` is older than `keepalive_deadline_s` is closed
  (the real deadline is unverified; the default is 2.5 x the client's expected ping interval);
- one live connection per bot: a new subscribe sends the old connection `disconnected_event`
  and closes it;
- every command is answered with a frame that has no `cmd` and echoes its req_id;
- replies (`aibot_respond_msg`) must reuse a req_id issued in a callback that is still valid
  (`req_id_ttl_s`), else 846605; a stream open longer than `stream_max_s` gets 846608;
  content is limited to 20480 bytes; proactive messages (`aibot_send_msg`) only go to chats
  that have written to the bot.

Test and demo API:
    fake = FakeWeComServer(bot_id=..., secret=..., ping_interval_s=0.3).start()
    WeComConfig(..., url=fake.ws_url)
    msgid = fake.send_user_message("hi", chattype="single", userid="alice")
    fake.replies            Reply(msgid, chatid, content, kind "stream"|"proactive", ...) per
                            answer the user sees (a repeated identical finish is not a new one)
    fake.keepalive_times    conn_id -> monotonic receipt time of every ping
    fake.keepalive_lateness(conn_id, interval_s)   how late each ping was against the timetable
                            that starts at the subscribe answer
    faults: drop(), close_with(code), go_silent(s), send_garbage(data) (harness), kick(),
            refuse_subscribe(n, errcode), withhold_answers(n), answer_delay_s, expire_req_ids(),
            advance_time(s) (moves the fake's validity clock: req_id ttl, stream age)
The WeCom protocol has no REST step, so the harness's REST faults do not apply.

Media (WecomTeam/aibot-node-sdk src/crypto.ts and src/client.ts, see platforms/wecom.py):
    fake.send_user_media(data, kind="image"|"file"|"video", ...)   serves the file encrypted
        with a fresh aeskey (AES-256-CBC, IV = key[:16], PKCS#7 to 32 bytes) at a URL valid
        `media_ttl_s` (5 minutes), and sends the callback with url + aeskey
    uploads: aibot_upload_media_init / _chunk / _finish are checked (chunks <= 512 KB before
        base64, <= 100, indexes 0..n-1 once each, total size and md5 as announced); media ids
        are valid 3 days; aibot_send_msg with msgtype image|file|voice|video needs a media id
        of that type. fake.uploaded (media_id -> Upload), fake.files (SentFile per file shown)
    hold_file_sends() / release_file_sends(): media sends go unanswered and unprocessed
"""
from __future__ import annotations

import base64
import hashlib
import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import gevent

from .driver import Keepalive, PlatformDriver, ReplyRow, SentFile
from .harness import Conn, FakePlatformServer

ERR_OK = 0
ERR_REQ_ID_INVALID = 846605
ERR_STREAM_TOO_LONG = 846608
# The real codes for these refusals are not documented; the fake uses its own (99xxxx).
ERR_AUTH = 990001  # wrong bot_id / secret
ERR_NOT_SUBSCRIBED = 990002  # a command before a successful subscribe
ERR_BAD_REQUEST = 990003  # malformed body, unknown cmd, content too long
ERR_STREAM_FINISHED = 990004  # a different frame for a stream already finished
ERR_UNKNOWN_CHAT = 990005  # proactive message to a chat that never wrote to the bot

CONTENT_MAX_BYTES = 20480
UPLOAD_CHUNK_BYTES = 512 * 1024
UPLOAD_MAX_CHUNKS = 100
MEDIA_TYPES = ("image", "file", "voice", "video")


def encrypt_file(data: bytes, key: bytes) -> bytes:
    """What the WeCom server does to a file before handing out its URL."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
    pad = 32 - len(data) % 32
    enc = Cipher(algorithms.AES(key), modes.CBC(key[:16])).encryptor()
    return enc.update(data + bytes([pad]) * pad) + enc.finalize()


@dataclass
class Upload:
    type: str
    filename: str
    total_size: int
    total_chunks: int
    md5: str | None
    chunks: dict = field(default_factory=dict)
    media_id: str | None = None
    data: bytes = b""


@dataclass
class Callback:
    """One `aibot_msg_callback` the fake sent: what a reply's req_id must refer to."""
    req_id: str
    msgid: str
    chatid: str  # group chatid, or the user's id for a DM
    chattype: str
    userid: str
    issued_at: float  # fake clock
    conn_id: int
    stream_id: str | None = None
    stream_opened_at: float | None = None  # fake clock
    finished_content: str | None = None


@dataclass
class Reply:
    """An answer the user sees: a finished stream or an accepted proactive message.

    A proactive message names no inbound message on the wire. The fake attributes it to the
    answer in progress in its chat: the message whose stream was finished there last, else
    (no stream yet, e.g. after a 846605 fallback) the oldest unanswered message of the chat.
    Exact for one turn at a time per chat while streams work; a chain of fallback-only answers
    in one chat is attributed to its first message."""
    msgid: str | None  # the inbound message it answers
    chatid: str
    content: str
    kind: str  # "stream" | "proactive"
    req_id: str
    conn_id: int
    at: float = field(default_factory=time.monotonic)


class FakeWeComServer(FakePlatformServer):
    ws_path = "/"

    def __init__(self, *, bot_id: str = "bot-1", secret: str = "s3cret",
                 ping_interval_s: float = 30.0, keepalive_deadline_s: float | None = None,
                 stream_max_s: float = 360.0, req_id_ttl_s: float = 360.0,
                 req_ids_survive_reconnect: bool = True) -> None:
        super().__init__()
        self.bot_id = bot_id
        self.secret = secret
        self.ping_interval_s = ping_interval_s
        self.keepalive_deadline_s = (keepalive_deadline_s if keepalive_deadline_s is not None
                                     else 2.5 * ping_interval_s)
        self.stream_max_s = stream_max_s
        self.req_id_ttl_s = req_id_ttl_s
        self.req_ids_survive_reconnect = req_ids_survive_reconnect
        # records
        self.callbacks: dict[str, Callback] = {}  # req_id -> callback
        self.replies: list[Reply] = []
        self.stream_updates: list[tuple[str, str]] = []  # (req_id, content) of finish=false
        self.repeated_finishes: list[str] = []  # req_ids finished again with the same content
        self.refusals: list[tuple[str, str, int]] = []  # (cmd, req_id, errcode)
        self.undelivered: list[str] = []  # msgids sent while no connection was subscribed
        self.uploads: dict[str, Upload] = {}  # upload_id -> Upload
        self.uploaded: dict[str, Upload] = {}  # media_id -> finished Upload
        self.files: list[SentFile] = []
        self.media_ttl_s = 300.0  # download URLs are valid 5 minutes
        self._hold_sends = False
        self.held_sends = 0
        self.keepalive_times: dict[int, list[float]] = {}
        self.subscribed_at: dict[int, float] = {}  # conn_id -> monotonic time of the answer
        self.chats: set[str] = set()  # chats that wrote to the bot (proactive allowed)
        # faults
        self.answer_delay_s = 0.0
        self._withhold = 0
        self._refuse: list[int] = []
        self._time_offset = 0.0
        self._current: Conn | None = None  # the subscribed connection of the bot
        # chat -> the message whose answer is going out there (proactive parts belong to it)
        self._answering: dict[str, str | None] = {}

    # -- clock -------------------------------------------------------------------------------
    def now(self) -> float:
        """The fake's validity clock (monotonic + whatever `advance_time` added)."""
        return time.monotonic() + self._time_offset

    def advance_time(self, seconds: float) -> None:
        self._time_offset += seconds

    # -- faults ------------------------------------------------------------------------------
    def refuse_subscribe(self, times: int = 1, errcode: int = ERR_AUTH) -> None:
        self._refuse.extend([errcode] * times)

    def withhold_answers(self, times: int = 1) -> None:
        """Process the next `times` reply/send commands but never answer them (a lost ack)."""
        self._withhold += times

    def expire_req_ids(self) -> None:
        """Every req_id issued so far is now invalid (846605), as after a long pause."""
        for cb in self.callbacks.values():
            cb.issued_at = float("-inf")

    def kick(self) -> None:
        """Another instance subscribed for this bot: the current connection is told and closed."""
        conn = self._current
        if conn is not None:
            self._kick(conn)
            self._current = None

    # -- test API ----------------------------------------------------------------------------
    @property
    def current_conn_id(self) -> int | None:
        conn = self._current
        return conn.id if conn is not None and not conn.closed.is_set() else None

    def send_user_message(self, text: str = "hello", *, chattype: str = "single",
                          userid: str = "alice", chatid: str | None = None,
                          msgtype: str = "text", payload: Any = None,
                          msgid: str | None = None) -> str:
        """Push an `aibot_msg_callback` to the subscribed connection; returns the msgid.
        `payload` is the body's `msgtype` part (default: `{"content": text}` for text/voice, a
        fake url + aeskey for image/file/video, one text item for mixed)."""
        msgid = msgid or f"msg-{uuid.uuid4().hex[:16]}"
        req_id = f"cb-{uuid.uuid4().hex[:16]}"
        if chattype == "group":
            chatid = chatid or "group-1"
        conv = chatid if chattype == "group" else userid
        body: dict[str, Any] = {"msgid": msgid, "aibotid": self.bot_id, "chattype": chattype,
                                "from": {"userid": userid}, "msgtype": msgtype}
        if chattype == "group":
            body["chatid"] = chatid
        body[msgtype] = payload if payload is not None else _default_payload(msgtype, text)
        conn = self._current
        if conn is None or conn.closed.is_set():
            self.undelivered.append(msgid)
            return msgid
        self.callbacks[req_id] = Callback(req_id, msgid, conv, chattype, userid, self.now(),
                                          conn.id)
        self.chats.add(conv)
        if not conn.send({"cmd": "aibot_msg_callback", "headers": {"req_id": req_id},
                          "body": body}):
            self.undelivered.append(msgid)
        return msgid

    def send_user_media(self, data: bytes, kind: str = "image", *, chattype: str = "single",
                        userid: str = "alice", chatid: str | None = None,
                        filename: str | None = None, aeskey: str | None = None,
                        rate_bps: float | None = None) -> str:
        """A user sends an image / file / video: served encrypted (at `rate_bps` when given),
        the callback carries url + aeskey (without its base64 padding, as EncodingAESKey-style
        keys are written)."""
        key = os.urandom(32)
        url = self.host_media(encrypt_file(data, key), "application/octet-stream",
                              ttl_s=self.media_ttl_s, rate_bps=rate_bps)
        payload: dict[str, Any] = {
            "url": url, "aeskey": aeskey or base64.b64encode(key).decode().rstrip("=")}
        if filename:
            payload["filename"] = filename
        return self.send_user_message(chattype=chattype, userid=userid, chatid=chatid,
                                      msgtype=kind, payload=payload)

    def hold_file_sends(self) -> None:
        self._hold_sends = True

    def release_file_sends(self) -> None:
        self._hold_sends = False

    def send_event(self, eventtype: str, *, userid: str = "alice") -> None:
        conn = self._current
        if conn is not None:
            conn.send(_event_frame(self.bot_id, eventtype, userid))

    def replies_to(self, msgid: str) -> list[Reply]:
        return [r for r in self.replies if r.msgid == msgid]

    def keepalive_lateness(self, conn_id: int, interval_s: float) -> list[float]:
        """Seconds each ping arrived after its slot on the client's timetable: slots every
        `interval_s` from the subscribe answer; like the client (base.py), a ping later than a
        whole interval restarts the table from itself, so one stall is counted once."""
        due = self.subscribed_at.get(conn_id)
        if due is None:
            return []
        lateness = []
        for t in self.keepalive_times.get(conn_id, []):
            due += interval_s
            lateness.append(t - due)
            if t - due > interval_s:
                due = t
        return lateness

    def frames_in_cmd(self, cmd: str, conn_id: int | None = None) -> list[dict]:
        return [f for f in self.frames_in(conn_id) if isinstance(f, dict) and f.get("cmd") == cmd]

    # -- protocol ----------------------------------------------------------------------------
    def on_connect(self, conn: Conn, request: dict) -> bool:
        conn.state["subscribed"] = False
        self.keepalive_times[conn.id] = []
        conn.expect_keepalive(self.keepalive_deadline_s)
        return True

    def on_frame(self, conn: Conn, data: Any) -> None:
        if not isinstance(data, dict):
            self.log_event("client_sent_non_object", conn)
            return
        headers = data.get("headers")
        req_id = headers.get("req_id") if isinstance(headers, dict) else None
        if not isinstance(req_id, str) or not req_id:
            self.log_event("client_sent_no_req_id", conn)
            return
        cmd = data.get("cmd")
        body = data.get("body") if isinstance(data.get("body"), dict) else {}
        if cmd == "ping":
            conn.keepalive()
            self.keepalive_times[conn.id].append(time.monotonic())
            self.changed()
            return self._answer(conn, "ping", req_id, ERR_OK)
        if cmd == "aibot_subscribe":
            return self._subscribe(conn, req_id, body)
        if not conn.state["subscribed"]:
            return self._answer(conn, cmd, req_id, ERR_NOT_SUBSCRIBED, "not subscribed")
        if cmd == "aibot_respond_msg":
            return self._respond(conn, req_id, body)
        if cmd == "aibot_send_msg":
            return self._send_msg(conn, req_id, body)
        if cmd == "aibot_upload_media_init":
            return self._upload_init(conn, req_id, body)
        if cmd == "aibot_upload_media_chunk":
            return self._upload_chunk(conn, req_id, body)
        if cmd == "aibot_upload_media_finish":
            return self._upload_finish(conn, req_id, body)
        self._answer(conn, cmd, req_id, ERR_BAD_REQUEST, "unknown cmd")

    # -- media uploads ---------------------------------------------------------------------
    def _upload_init(self, conn: Conn, req_id: str, body: dict) -> None:
        cmd = "aibot_upload_media_init"
        size, chunks = body.get("total_size"), body.get("total_chunks")
        if (body.get("type") not in MEDIA_TYPES or not isinstance(body.get("filename"), str)
                or not body["filename"] or not isinstance(size, int) or size <= 0
                or not isinstance(chunks, int) or not 1 <= chunks <= UPLOAD_MAX_CHUNKS
                or chunks != -(-size // UPLOAD_CHUNK_BYTES)):
            return self._answer(conn, cmd, req_id, ERR_BAD_REQUEST, "invalid upload")
        upload_id = f"up-{uuid.uuid4().hex[:12]}"
        self.uploads[upload_id] = Upload(body["type"], body["filename"], size, chunks,
                                         body.get("md5"))
        self._answer(conn, cmd, req_id, ERR_OK, body={"upload_id": upload_id})

    def _upload_chunk(self, conn: Conn, req_id: str, body: dict) -> None:
        cmd = "aibot_upload_media_chunk"
        up = self.uploads.get(body.get("upload_id"))
        index = body.get("chunk_index")
        try:
            data = base64.b64decode(body.get("base64_data") or "", validate=True)
        except (ValueError, TypeError):
            data = b""
        if (up is None or up.media_id is not None or not isinstance(index, int)
                or not 0 <= index < up.total_chunks or not data
                or len(data) > UPLOAD_CHUNK_BYTES):
            return self._answer(conn, cmd, req_id, ERR_BAD_REQUEST, "invalid chunk")
        up.chunks[index] = data
        self._answer(conn, cmd, req_id, ERR_OK)

    def _upload_finish(self, conn: Conn, req_id: str, body: dict) -> None:
        cmd = "aibot_upload_media_finish"
        up = self.uploads.get(body.get("upload_id"))
        if up is None or sorted(up.chunks) != list(range(up.total_chunks)):
            return self._answer(conn, cmd, req_id, ERR_BAD_REQUEST, "chunks missing")
        data = b"".join(up.chunks[i] for i in range(up.total_chunks))
        if len(data) != up.total_size or (up.md5 and hashlib.md5(data).hexdigest() != up.md5):
            return self._answer(conn, cmd, req_id, ERR_BAD_REQUEST, "size or md5 mismatch")
        up.data, up.media_id = data, f"media-{uuid.uuid4().hex[:16]}"
        self.uploaded[up.media_id] = up
        self.changed()
        self._answer(conn, cmd, req_id, ERR_OK, body={
            "type": up.type, "media_id": up.media_id, "created_at": str(int(time.time()))})

    def _subscribe(self, conn: Conn, req_id: str, body: dict) -> None:
        if self._refuse:
            return self._answer(conn, "aibot_subscribe", req_id, self._refuse.pop(0),
                                "subscribe refused")
        if body.get("bot_id") != self.bot_id or body.get("secret") != self.secret:
            return self._answer(conn, "aibot_subscribe", req_id, ERR_AUTH, "invalid bot or secret")
        old = self._current
        conn.state["subscribed"] = True
        self._current = conn
        self.subscribed_at[conn.id] = time.monotonic()
        self._answer(conn, "aibot_subscribe", req_id, ERR_OK)
        if old is not None and old is not conn and not old.closed.is_set():
            self._kick(old)

    def _kick(self, conn: Conn) -> None:
        conn.send(_event_frame(self.bot_id, "disconnected_event", None))
        conn.close(None, reason="kicked")

    def _respond(self, conn: Conn, req_id: str, body: dict) -> None:
        cmd = "aibot_respond_msg"
        cb = self.callbacks.get(req_id)
        if (cb is None or self.now() - cb.issued_at > self.req_id_ttl_s
                or (not self.req_ids_survive_reconnect and cb.conn_id != conn.id)):
            return self._answer(conn, cmd, req_id, ERR_REQ_ID_INVALID, "invalid req_id")
        stream = body.get("stream")
        if (body.get("msgtype") != "stream" or not isinstance(stream, dict)
                or not isinstance(stream.get("id"), str) or not stream["id"]
                or not isinstance(stream.get("finish", False), bool)
                or not isinstance(stream.get("content", ""), str)):
            return self._answer(conn, cmd, req_id, ERR_BAD_REQUEST, "invalid stream body")
        content, finish = stream.get("content", ""), stream.get("finish", False)
        if len(content.encode("utf-8")) > CONTENT_MAX_BYTES:
            return self._answer(conn, cmd, req_id, ERR_BAD_REQUEST, "content too long")
        if cb.stream_id is None:
            cb.stream_id, cb.stream_opened_at = stream["id"], self.now()
        elif cb.stream_id != stream["id"]:
            return self._answer(conn, cmd, req_id, ERR_BAD_REQUEST, "one stream per callback")
        if cb.finished_content is not None:
            if finish and content == cb.finished_content:  # a re-send of the same finish
                self.repeated_finishes.append(req_id)
                return self._answer(conn, cmd, req_id, ERR_OK)
            return self._answer(conn, cmd, req_id, ERR_STREAM_FINISHED, "stream finished")
        if self.now() - cb.stream_opened_at > self.stream_max_s:
            return self._answer(conn, cmd, req_id, ERR_STREAM_TOO_LONG, "stream expired")
        if finish:
            cb.finished_content = content
            self._answering[cb.chatid] = cb.msgid
            self.replies.append(Reply(cb.msgid, cb.chatid, content, "stream", req_id, conn.id))
        else:
            self.stream_updates.append((req_id, content))
        self._answer(conn, cmd, req_id, ERR_OK)

    def _send_msg(self, conn: Conn, req_id: str, body: dict) -> None:
        cmd = "aibot_send_msg"
        chatid = body.get("chatid")
        if body.get("msgtype") in MEDIA_TYPES:
            return self._send_media(conn, req_id, body)
        markdown = body.get("markdown")
        content = markdown.get("content") if isinstance(markdown, dict) else None
        if (not isinstance(chatid, str) or body.get("msgtype") != "markdown"
                or not isinstance(content, str)
                or len(content.encode("utf-8")) > CONTENT_MAX_BYTES):
            return self._answer(conn, cmd, req_id, ERR_BAD_REQUEST, "invalid message")
        if chatid not in self.chats:
            return self._answer(conn, cmd, req_id, ERR_UNKNOWN_CHAT, "chat never wrote to the bot")
        msgid = self._answering.get(chatid)
        if msgid is None:  # no stream answered in this chat yet: the oldest unanswered message
            answered = {r.msgid for r in self.replies}
            msgid = next((cb.msgid for cb in self.callbacks.values()
                          if cb.chatid == chatid and cb.msgid not in answered), None)
            self._answering[chatid] = msgid
        self.replies.append(Reply(msgid, chatid, content, "proactive", req_id, conn.id))
        self._answer(conn, cmd, req_id, ERR_OK)

    def _send_media(self, conn: Conn, req_id: str, body: dict) -> None:
        cmd = "aibot_send_msg"
        if self._hold_sends:
            self.held_sends += 1
            self.log_event("file_send_held", conn)
            return
        chatid, kind = body.get("chatid"), body["msgtype"]
        part = body.get(kind) if isinstance(body.get(kind), dict) else {}
        up = self.uploaded.get(part.get("media_id"))
        if up is None or up.type != kind:
            return self._answer(conn, cmd, req_id, ERR_BAD_REQUEST, "invalid media_id")
        if chatid not in self.chats:
            return self._answer(conn, cmd, req_id, ERR_UNKNOWN_CHAT, "chat never wrote to the bot")
        msgid = self._answering.get(chatid)
        self.files.append(SentFile(msgid or "", up.filename, up.data, kind))
        self.changed()
        self._answer(conn, cmd, req_id, ERR_OK)

    def _answer(self, conn: Conn, cmd: Any, req_id: str, errcode: int, errmsg: str = "ok",
                body: dict | None = None) -> None:
        if errcode != ERR_OK:
            self.refusals.append((str(cmd), req_id, errcode))
        if cmd in ("aibot_respond_msg", "aibot_send_msg") and self._withhold > 0:
            self._withhold -= 1
            self.log_event("answer_withheld", conn)
            return
        frame = {"headers": {"req_id": req_id}, "errcode": errcode, "errmsg": errmsg}
        if body is not None:
            frame["body"] = body
        if self.answer_delay_s and cmd != "ping":
            gevent.spawn_later(self.answer_delay_s, conn.send, frame)
        else:
            conn.send(frame)


def _default_payload(msgtype: str, text: str) -> Any:
    if msgtype in ("text", "voice"):
        return {"content": text}
    if msgtype in ("image", "file", "video"):
        return {"url": f"https://fake.invalid/{msgtype}/{uuid.uuid4().hex[:8]}",
                "aeskey": "fake-aeskey"}
    if msgtype == "mixed":
        return {"msg_item": [{"msgtype": "text", "text": {"content": text}}]}
    return {}


def _event_frame(bot_id: str, eventtype: str, userid: str | None) -> dict:
    body: dict[str, Any] = {"msgid": f"ev-{uuid.uuid4().hex[:12]}", "create_time": int(time.time()),
                            "aibotid": bot_id, "msgtype": "event",
                            "event": {"eventtype": eventtype}}
    if userid is not None:
        body["from"] = {"userid": userid}
    return {"cmd": "aibot_event_callback", "headers": {"req_id": f"ev-{uuid.uuid4().hex[:12]}"},
            "body": body}


class Driver(PlatformDriver):
    """The fleet's and the contract kit's handle on this fake (see testing/driver.py)."""
    platform = "wecom"
    max_reply_chars = 20480 // 3  # CONTENT_MAX_BYTES of UTF-8, with room for any script

    def __init__(self, keepalive: Keepalive | None = None, *, secret: str | None = None) -> None:
        super().__init__(keepalive, secret=secret)
        k = self.keepalive
        self.fake = FakeWeComServer(bot_id="aib-fleet", secret=secret or "wecom-fleet-secret",
                                    ping_interval_s=k.interval_s,
                                    keepalive_deadline_s=k.deadline_s)

    def bot_config(self, **extra: Any) -> dict:
        return {"bot_id": self.fake.bot_id, "secret": self.fake.secret, "url": self.fake.ws_url,
                "ping_interval_s": self.keepalive.interval_s, **extra}

    def bad_credentials_config(self, **extra: Any) -> dict:
        return self.bot_config(secret="not-the-secret", **extra)

    def user_says(self, text: str, *, chat: int = 0, user: int | None = None,
                  group: bool = False) -> str:
        userid = f"user{chat if user is None else user}"
        if group:
            return self.fake.send_user_message(text, chattype="group", userid=userid,
                                               chatid=f"group-{chat}")
        return self.fake.send_user_message(text, chattype="single", userid=userid)

    def redeliver(self, message_id: str) -> None:
        cb = next(c for c in self.fake.callbacks.values() if c.msgid == message_id)
        self.fake.send_user_message("again", chattype=cb.chattype, userid=cb.userid,
                                    chatid=cb.chatid if cb.chattype == "group" else None,
                                    msgid=message_id)

    def go_silent(self, seconds: float) -> None:
        """The live connection turns zombie (its network path died); a new one works."""
        self.fake.go_silent(seconds, whole_server=False)

    def reply_rows(self) -> list[ReplyRow]:
        return [ReplyRow(r.msgid, r.content, r.at) for r in self.fake.replies]

    transcribes_voice = True

    def user_sends_media(self, data: bytes, *, kind: str, name: str, mime: str,
                         transcript: str | None = None, chat: int = 0) -> str:
        userid = f"user{chat}"
        if kind == "voice":  # WeCom sends the transcript, never the audio
            return self.fake.send_user_message(transcript or "", msgtype="voice", userid=userid)
        return self.fake.send_user_media(data, kind, userid=userid, filename=name)

    def uploads(self) -> int:
        return len(self.fake.uploaded)

    def lateness(self) -> list[float]:
        return [max(0.0, x) for conn_id in list(self.fake.keepalive_times)
                for x in self.fake.keepalive_lateness(conn_id, self.keepalive.interval_s)]

    def session_up_at(self, conn_id: int) -> float | None:
        return self.fake.subscribed_at.get(conn_id)
