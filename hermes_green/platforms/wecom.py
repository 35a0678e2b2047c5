"""WeCom AI bot (企业微信 智能机器人), long-connection mode.

One WebSocket to `config.url`; every frame is JSON `{"cmd", "headers": {"req_id"}, "body"}` and
every command we send is answered by a frame with no `cmd` that echoes its `req_id` and carries
`errcode` / `errmsg`. The protocol, as this module speaks it:

    on_open          aibot_subscribe {bot_id, secret}; the answer (errcode 0) makes us ready and
                     starts the keepalive. Refusals are counted: below `max_subscribe_refusals`
                     in a row we reconnect with backoff, at it the platform stops (bad secret).
    heartbeat_frame  ping with a fresh req_id every `ping_interval_s`; two unanswered in a row
                     and the connection is a zombie (the official SDK's rule).
    on_frame         aibot_msg_callback -> InboundMessage (reply_ref keeps the callback req_id);
                     aibot_event_callback disconnected_event -> fatal: another instance
                     subscribed for this bot, and two instances would kick each other forever.
    progress         aibot_respond_msg stream frames (finish=false) reusing the callback req_id,
                     at most one per `stream_update_interval_s`; a stream open for `stream_max_s`
                     is finished with what it shows (the server refuses streams older than about
                     6 minutes with 846608) and the rest of the answer goes out proactively.
    send             seq 0: the final stream frame (finish=true, full text), or a proactive
                     aibot_send_msg when the req_id is no longer valid (846605) or the stream
                     was already finished; seq > 0: proactive. Every frame waits for its answer
                     (`ack_timeout_s`); no answer -> SendError(retryable) and the outbox retries.

Frames for one req_id go out one at a time, each after the previous one was answered, as in the
official SDK. The stream id is derived from the inbound msgid, so a re-send after a restart
updates the same stream instead of opening a second one.

Media (WecomTeam/aibot-node-sdk: src/crypto.ts, src/client.ts uploadMedia / sendMediaMessage,
src/types/message.ts; the Python SDK's crypto.py agrees):
    in       image / file / video bodies (and image items of `mixed`) carry `url` (valid 5
             minutes) and a per-URL `aeskey`: the bytes are AES-256-CBC encrypted, key =
             base64-decode(aeskey), IV = the key's first 16 bytes, PKCS#7 padding to a multiple
             of 32 bytes (decryptFile: "PKCS#7 填充至 32 字节的倍数"). `media_source` hands the
             URL and a stream decryptor to the gateway's media module. Voice arrives already
             transcribed (`voice.content`): no audio to fetch.
    out      send_file: aibot_upload_media_init {type, filename, total_size, total_chunks, md5}
             -> upload_id; aibot_upload_media_chunk {upload_id, chunk_index (0-based, as the
             SDK sends it; its type comment says 1-based: *unverified*), base64_data} per chunk
             of at most 512 KB before base64, at most 100 chunks; aibot_upload_media_finish
             {upload_id} -> media_id (valid 3 days); then aibot_send_msg {chatid, msgtype:
             image|file|voice|video, <msgtype>: {media_id}}. Each frame waits for its answer.
             Media messages carry no caption: a caption goes out as a markdown message first.

Facts from the official SDKs and docs (developer.work.weixin.qq.com path 101463, 101031):
content of stream and markdown messages at most 20480 bytes of UTF-8; image / file / video
bodies carry `url` (valid 5 minutes) and a per-URL `aeskey`; voice arrives already transcribed
(`voice.content`). *Unverified*: how long the server tolerates a silent client (hence the
configurable ping interval) and which errcodes besides 846605 / 846608 a reply may get; the
size limits of uploaded media per type (we keep to the classic API's: image 10 MB, voice 2 MB,
video 10 MB, file 20 MB).
"""
from __future__ import annotations

import base64
import hashlib
import json
import time
import uuid
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import gevent
import gevent.lock
import gevent.pool
import websocket

from pydantic import Field, SecretStr

from ..models import Attachment, InboundMessage, OutboundMessage
from .base import ConnectionLost, FatalPlatformError, JournalFailure, SendError
from .botconfig import BotConfig
from .kit import Waiters
from .media import MediaRefused, MediaSource, OutboundFile, read_file
from .registry import PlatformSpec
from .transports.websocket import WebSocketAdapter

# Commands (developer -> WeCom, then WeCom -> developer).
CMD_SUBSCRIBE = "aibot_subscribe"
CMD_PING = "ping"
CMD_RESPOND = "aibot_respond_msg"
CMD_SEND = "aibot_send_msg"
CMD_UPLOAD_INIT = "aibot_upload_media_init"
CMD_UPLOAD_CHUNK = "aibot_upload_media_chunk"
CMD_UPLOAD_FINISH = "aibot_upload_media_finish"
CMD_MSG_CALLBACK = "aibot_msg_callback"
CMD_EVENT_CALLBACK = "aibot_event_callback"
EVENT_DISCONNECTED = "disconnected_event"

# Answer codes we act on.
ERR_REQ_ID_INVALID = 846605  # unknown or expired req_id: answer proactively instead
ERR_STREAM_TOO_LONG = 846608  # stream open longer than the server allows (~6 min)
# Worth another try later: WeCom's global "system busy" and "API frequency limit" codes
# (their use on the long connection is unverified; any other code is a permanent refusal).
RETRYABLE_ERRCODES = frozenset({-1, 45009})

CONTENT_MAX_BYTES = 20480  # stream.content and markdown.content, UTF-8
UPLOAD_CHUNK_BYTES = 512 * 1024  # before base64 (aibot-node-sdk uploadMedia)
UPLOAD_MAX_CHUNKS = 100
AES_BLOCK_PAD = 32  # WeCom pads files to a multiple of 32 bytes (PKCS#7)
UPLOAD_LIMITS = {"image": 10 * 1024 * 1024, "voice": 2 * 1024 * 1024,
                 "video": 10 * 1024 * 1024, "file": 20 * 1024 * 1024}  # *unverified*
MAX_TRACKED_STREAMS = 1024
_MAX_LOG_TEXT = 100


@dataclass
class _Stream:
    """What we know about the stream answering one callback (one req_id)."""
    req_id: str
    id: str
    opened_at: float | None = None  # monotonic time the first frame left
    last_update: float = float("-inf")  # monotonic time of the last progress attempt
    shown: str = ""  # text of the last frame the server accepted
    updating: bool = False  # a progress frame is on its way
    closed_early: bool = False  # finished at stream_max_s: the rest goes out proactively
    unusable: bool = False  # the server refused the req_id or the stream: go proactive
    closer: gevent.Greenlet | None = None


class WeComConfig(BotConfig):
    bot_id: str
    secret: SecretStr
    url: str = "wss://openws.work.weixin.qq.com"
    ping_interval_s: float = Field(30.0, gt=0)
    # How long to wait for the server's answer to a reply frame before the outbox retries it.
    ack_timeout_s: float = Field(5.0, gt=0)
    # Stream updates are throttled to about one a second; the stream is finished before the
    # server's ~6 minute limit and the rest goes out as a proactive message.
    stream_update_interval_s: float = Field(1.0, ge=0)
    stream_max_s: float = Field(300.0, gt=0)


class WeComAdapter(WebSocketAdapter):
    # Callbacks are neither acked nor redelivered, and there is no cursor to resume from: a
    # message the store refuses is held in memory and journaled as soon as the store recovers.
    on_journal_failure = JournalFailure.HOLD
    single_connection = True  # a new subscribe kicks the old connection (SCALE.md)
    name = "wecom"
    max_unanswered_beats = 2  # the official SDK's rule
    heartbeat_after_ready = True  # pings start once the subscribe is answered
    max_subscribe_refusals = 5  # the official SDK gives up after 5 failed auths in a row

    def __init__(self, config, on_message, **kw) -> None:
        super().__init__(config, on_message, **kw)
        self.heartbeat_interval_s = config.ping_interval_s
        self.session_timeout_s = config.ack_timeout_s  # the subscribe answer's deadline
        self._answers = Waiters()  # req_id -> answer frame, for reply and send commands
        self._subscribe_req: str | None = None  # the subscribe still waiting for its answer
        self._pings: set[str] = set()  # req_ids of pings not yet answered (this connection)
        self._refusals = 0  # subscribe refusals in a row
        self._locks: dict[str, list] = {}  # req_id -> [semaphore, users]
        self._streams: OrderedDict[str, _Stream] = OrderedDict()
        self._background = gevent.pool.Group()  # progress frames and stream closers

    # -- connection --------------------------------------------------------------------------
    @classmethod
    def check(cls, config, *, full: bool = False) -> str:
        """WeCom has no REST auth step: credentials are proved only by subscribing, and a new
        subscribe takes the bot over from a running gateway (the old connection is kicked).
        So by default only the endpoint is reached; `full` subscribes."""
        if full:
            return cls.check_session(config)
        ws = websocket.create_connection(config.url, timeout=10, suppress_origin=True)
        ws.close()
        return ("endpoint reachable; credentials not verified (check --full subscribes, which "
                "takes the bot over from a running gateway)")

    def prepare(self) -> str:
        return self.config.url

    def on_open(self) -> None:
        req_id = _new_req_id(CMD_SUBSCRIBE)
        self._subscribe_req = req_id
        self._pings.clear()
        self.send_frame(_encode(CMD_SUBSCRIBE, req_id, {
            "bot_id": self.config.bot_id,
            "secret": self.config.secret.get_secret_value(),
        }))
        self.log.info("subscribe sent platform=%s bot=%s", self.name, self.config.bot_id)

    def _on_subscribe_answer(self, frame: dict) -> None:
        code = _errcode(frame)
        if code == 0:
            self._refusals = 0
            self.mark_ready()  # starts the keepalive (heartbeat_after_ready)
            return
        self._refusals += 1
        self.log.warning("subscribe refused platform=%s bot=%s errcode=%s errmsg=%s attempt=%d/%d",
                         self.name, self.config.bot_id, code, _errmsg(frame),
                         self._refusals, self.max_subscribe_refusals)
        if self._refusals >= self.max_subscribe_refusals:
            raise FatalPlatformError(f"subscribe refused {self._refusals} times in a row "
                                     f"(errcode {code}): check bot_id and secret")
        raise ConnectionLost("subscribe_refused", f"errcode {code}")

    def heartbeat_frame(self) -> str:
        req_id = _new_req_id(CMD_PING)
        self._pings.add(req_id)
        return _encode(CMD_PING, req_id, None)

    def on_disconnect(self, lost: ConnectionLost) -> None:
        self._subscribe_req = None
        self._pings.clear()
        self._answers.fail_all(ConnectionLost(lost.reason))

    def stop(self) -> None:
        super().stop()
        self._background.kill(block=False)

    # -- inbound -----------------------------------------------------------------------------
    def on_frame(self, data: str | bytes) -> None:
        frame = self._decode(data)
        if frame is None:
            return
        cmd = frame.get("cmd")
        headers = frame.get("headers")
        req_id = headers.get("req_id") if isinstance(headers, dict) else None
        if not isinstance(req_id, str):
            req_id = ""
        if cmd is None or cmd == "":
            self._on_answer(req_id, frame)
        elif cmd == CMD_MSG_CALLBACK:
            self._on_message_callback(req_id, frame.get("body"))
        elif cmd == CMD_EVENT_CALLBACK:
            self._on_event(frame.get("body"))
        else:
            self.log.warning("frame skipped platform=%s reason=unknown_cmd cmd=%r",
                             self.name, _short(cmd))

    def _decode(self, data: str | bytes) -> dict | None:
        if isinstance(data, (bytes, bytearray)):
            try:
                data = bytes(data).decode("utf-8")
            except UnicodeDecodeError:
                self.log.warning("frame skipped platform=%s reason=invalid_utf8 bytes=%d",
                                 self.name, len(data))
                return None
        try:
            frame = json.loads(data)
        except (ValueError, RecursionError):
            self.log.warning("frame skipped platform=%s reason=invalid_json chars=%d",
                             self.name, len(data))
            return None
        if not isinstance(frame, dict):
            self.log.warning("frame skipped platform=%s reason=not_an_object type=%s",
                             self.name, type(frame).__name__)
            return None
        return frame

    def _on_answer(self, req_id: str, frame: dict) -> None:
        if req_id and req_id == self._subscribe_req:
            self._subscribe_req = None
            self._on_subscribe_answer(frame)
        elif req_id in self._pings:
            self._pings.discard(req_id)
            code = _errcode(frame)
            if code == 0:
                self.beat_answered()
            else:  # an error answer does not count as a heartbeat (as in the official SDK)
                self.log.warning("ping refused platform=%s errcode=%s errmsg=%s",
                                 self.name, code, _errmsg(frame))
        elif not (req_id and self._answers.resolve(req_id, frame)):
            self.log.info("answer skipped platform=%s reason=unknown_req_id req=%s",
                          self.name, _short(req_id))

    def _on_event(self, body: Any) -> None:
        event = body.get("event") if isinstance(body, dict) else None
        kind = event.get("eventtype") if isinstance(event, dict) else None
        if kind == EVENT_DISCONNECTED:
            self.log.error("kicked platform=%s bot=%s reason=another connection subscribed "
                           "for this bot", self.name, self.config.bot_id)
            raise FatalPlatformError("another instance owns this bot: the server moved it to "
                                     "a newer connection (disconnected_event)")
        self.log.info("event ignored platform=%s event=%r", self.name, _short(kind))

    def _on_message_callback(self, req_id: str, body: Any) -> None:
        msg = self._parse_message(req_id, body)
        if msg is None:
            return
        self.log.info("inbound platform=%s chat=%s msg=%s type=%s", self.name, msg.chat_id,
                      msg.message_id, body.get("msgtype"))
        self.deliver(msg)

    def _parse_message(self, req_id: str, body: Any) -> InboundMessage | None:
        def skip(reason: str) -> None:
            self.log.warning("message skipped platform=%s reason=%s req=%s",
                             self.name, reason, _short(req_id))

        if not req_id:
            return skip("no_req_id")
        if not isinstance(body, dict):
            return skip("no_body")
        msgid = body.get("msgid")
        sender = body.get("from")
        user_id = sender.get("userid") if isinstance(sender, dict) else None
        chattype = body.get("chattype")
        if not _nonempty(msgid):
            return skip("no_msgid")
        if not _nonempty(user_id):
            return skip("no_sender")
        if chattype == "group":
            chat_id = body.get("chatid")
            if not _nonempty(chat_id):
                return skip("group_without_chatid")
        elif chattype == "single":
            chat_id = user_id
        else:
            return skip("unknown_chattype")
        if not all(map(_encodable, (req_id, msgid, user_id, chat_id))):
            return skip("invalid_id")  # echoed back on the wire and stored: must be UTF-8
        text, attachments = _content(body)
        if not text and not attachments:
            return skip("empty")
        return InboundMessage(
            platform=self.name, message_id=msgid, chat_id=chat_id, user_id=user_id,
            text=_clean(text), chat_type="group" if chattype == "group" else "dm",
            attachments=attachments,
            reply_ref={"req_id": req_id, "msgid": msgid, "chatid": chat_id,
                       "chattype": chattype},
        )

    # -- outbound ----------------------------------------------------------------------------
    def reply_chunk_chars(self) -> int:
        # 20480 bytes of UTF-8 hold at least this many characters of any script.
        return CONTENT_MAX_BYTES // 4

    def max_reply_parts(self) -> int | None:
        return None

    def send(self, out: OutboundMessage) -> None:
        ref = out.reply_ref if isinstance(out.reply_ref, dict) else {}
        chat_id = out.chat_id or ref.get("chatid")
        if not self.ready.wait(self.config.ack_timeout_s):
            raise SendError("wecom is not connected", retryable=True)
        text = _fit(out.text)
        if out.seq == 0 and _nonempty(ref.get("req_id")):
            st = self._stream(ref)
            rest = self._finish_stream(st, text)
            if rest:  # the stream could not carry (all of) it
                self._send_proactive(chat_id, rest)
            self._forget(st)
            return self._sent(chat_id, out, "proactive" if rest else "stream")
        if not text.strip():
            self.log.info("reply skipped platform=%s chat=%s msg=%s seq=%d reason=empty",
                          self.name, chat_id, out.in_reply_to, out.seq)
            return
        self._send_proactive(chat_id, text)
        self._sent(chat_id, out, "proactive")

    def _finish_stream(self, st: _Stream, text: str) -> str:
        """Finish the stream with the full text. Returns what is still to be sent proactively:
        "" when done, else all of it, or what the stream finished early does not show."""
        with self._serial(st.req_id):
            if not (st.closed_early or st.unusable):
                if st.opened_at is None:
                    st.opened_at = time.monotonic()
                answer = self._request(CMD_RESPOND, st.req_id, _stream_body(st.id, True, text))
                code = _errcode(answer)
                if code == 0:
                    return ""
                if code not in (ERR_REQ_ID_INVALID, ERR_STREAM_TOO_LONG):
                    raise _refused(CMD_RESPOND, answer)
                st.unusable = True
                self.log.info("reply falls back platform=%s req=%s errcode=%s to=proactive",
                              self.name, _short(st.req_id), code)
            if st.closed_early and st.shown and text.startswith(st.shown):
                return text[len(st.shown):].strip()
            return text

    def _send_proactive(self, chat_id: Any, text: str) -> None:
        if not _nonempty(chat_id):
            raise SendError("no chat to send a proactive message to", retryable=False)
        req_id = _new_req_id(CMD_SEND)
        body = {"chatid": chat_id, "msgtype": "markdown", "markdown": {"content": text}}
        answer = self._request(CMD_SEND, req_id, body)
        if _errcode(answer) != 0:
            raise _refused(CMD_SEND, answer)

    def _sent(self, chat_id: Any, out: OutboundMessage, kind: str) -> None:
        # The gateway counts and logs the accepted reply; this adds how it went out.
        self.log.debug("reply accepted platform=%s chat=%s msg=%s seq=%d kind=%s",
                       self.name, chat_id, out.in_reply_to, out.seq, kind)

    def progress(self, reply_ref: dict, text_so_far: str) -> None:
        req_id = reply_ref.get("req_id") if isinstance(reply_ref, dict) else None
        if not _nonempty(req_id) or not self.ready.is_set():
            return
        st = self._stream(reply_ref)
        now = time.monotonic()
        if (st.closed_early or st.unusable or st.updating
                or now - st.last_update < self.config.stream_update_interval_s):
            return
        st.updating = True
        st.last_update = now
        shown = _fit(text_so_far[:self.reply_chunk_chars()])
        g = self._background.spawn(self._push_progress, st, shown)
        g.name = f"{self.name}:progress"

    def _push_progress(self, st: _Stream, text: str) -> None:
        try:
            with self._serial(st.req_id):
                if st.closed_early or st.unusable or self._streams.get(st.req_id) is not st:
                    return  # finished (or given up) while this update waited
                first = st.opened_at is None
                if first:
                    st.opened_at = time.monotonic()
                    st.closer = self._background.spawn(self._close_stream_at_limit, st)
                    st.closer.name = f"{self.name}:stream-closer"
                answer = self._request(CMD_RESPOND, st.req_id, _stream_body(st.id, False, text))
                code = _errcode(answer)
                if code == 0:
                    st.shown = text
                elif code in (ERR_REQ_ID_INVALID, ERR_STREAM_TOO_LONG):
                    st.unusable = True
                else:
                    self.log.info("progress refused platform=%s req=%s errcode=%s",
                                  self.name, _short(st.req_id), code)
        except SendError as e:
            self.log.info("progress not sent platform=%s req=%s error=%s",
                          self.name, _short(st.req_id), e)
        finally:
            st.updating = False

    def _close_stream_at_limit(self, st: _Stream) -> None:
        """Finish a stream with what it shows before the server's limit; `send` posts the rest."""
        gevent.sleep(max(0.0, st.opened_at + self.config.stream_max_s - time.monotonic()))
        try:
            with self._serial(st.req_id):
                if st.unusable or self._streams.get(st.req_id) is not st:
                    return
                answer = self._request(CMD_RESPOND, st.req_id,
                                       _stream_body(st.id, True, st.shown))
                if _errcode(answer) == 0:
                    st.closed_early = True
                    self.log.info("stream finished early platform=%s req=%s reason=stream_max "
                                  "open_s=%.1f", self.name, _short(st.req_id),
                                  time.monotonic() - st.opened_at)
                else:
                    st.unusable = True
        except SendError as e:
            # Not closed: the final send tries the stream and falls back on 846608.
            self.log.info("stream not finished early platform=%s req=%s error=%s",
                          self.name, _short(st.req_id), e)

    # -- media -------------------------------------------------------------------------------
    image_links = "markdown"  # stream and markdown content render ![alt](url) (*unverified*)

    def media_source(self, att: Attachment, msg: InboundMessage) -> MediaSource:
        if not att.ref.startswith(("https://", "http://")):
            raise MediaRefused("the message carried no download link")
        aeskey = att.meta.get("aeskey") if isinstance(att.meta, dict) else None
        if not aeskey:  # the webhook mode's URLs are not encrypted per file
            return MediaSource(att.ref, name=att.name)
        key = _aes_key(aeskey)
        return MediaSource(att.ref, name=att.name, decryptor=lambda: _FileDecryptor(key),
                           overhead=AES_BLOCK_PAD)

    def max_upload_bytes(self, media: str) -> int | None:
        return UPLOAD_LIMITS.get(media, UPLOAD_LIMITS["file"])

    def send_file(self, out: OutboundMessage) -> None:
        file = OutboundFile.from_row(out.file)
        chat_id = out.chat_id or (out.reply_ref or {}).get("chatid")
        if not _nonempty(chat_id):
            raise SendError("no chat to send the file to", retryable=False)
        if not self.ready.wait(self.config.ack_timeout_s):
            raise SendError("wecom is not connected", retryable=True)
        media = file.media if file.media in UPLOAD_LIMITS else "file"
        try:
            data = read_file(file.path, UPLOAD_CHUNK_BYTES * UPLOAD_MAX_CHUNKS)
        except (OSError, ValueError) as e:
            raise SendError(f"file unusable: {type(e).__name__}", retryable=False) from None
        media_id = self._upload(media, file.name, data)
        if out.text.strip():
            self._send_proactive(chat_id, _fit(out.text))
        answer = self._request(CMD_SEND, _new_req_id(CMD_SEND),
                               {"chatid": chat_id, "msgtype": media, media: {"media_id": media_id}})
        if _errcode(answer) != 0:
            raise _refused(CMD_SEND, answer)
        self.log.debug("file accepted platform=%s chat=%s msg=%s seq=%d media=%s bytes=%d",
                       self.name, chat_id, out.in_reply_to, out.seq, media, len(data))

    def _upload(self, media: str, filename: str, data: bytes) -> str:
        """The three-step upload over the long connection; returns the media_id."""
        chunks = max(1, -(-len(data) // UPLOAD_CHUNK_BYTES))
        answer = self._request(CMD_UPLOAD_INIT, _new_req_id(CMD_UPLOAD_INIT), {
            "type": media, "filename": filename, "total_size": len(data), "total_chunks": chunks,
            "md5": hashlib.md5(data).hexdigest()})
        upload_id = (answer.get("body") or {}).get("upload_id") if _errcode(answer) == 0 else None
        if not _nonempty(upload_id):
            raise _refused(CMD_UPLOAD_INIT, answer)
        for i in range(chunks):
            piece = data[i * UPLOAD_CHUNK_BYTES:(i + 1) * UPLOAD_CHUNK_BYTES]
            answer = self._request(CMD_UPLOAD_CHUNK, _new_req_id(CMD_UPLOAD_CHUNK), {
                "upload_id": upload_id, "chunk_index": i,
                "base64_data": base64.b64encode(piece).decode("ascii")})
            if _errcode(answer) != 0:
                raise _refused(CMD_UPLOAD_CHUNK, answer)
        answer = self._request(CMD_UPLOAD_FINISH, _new_req_id(CMD_UPLOAD_FINISH),
                               {"upload_id": upload_id})
        media_id = (answer.get("body") or {}).get("media_id") if _errcode(answer) == 0 else None
        if not _nonempty(media_id):
            raise _refused(CMD_UPLOAD_FINISH, answer)
        return media_id

    # -- plumbing ----------------------------------------------------------------------------
    def _request(self, cmd: str, req_id: str, body: dict) -> dict:
        """Send one command and wait for the frame answering it (`ack_timeout_s`)."""
        waiter = self._answers.expect(req_id)
        try:
            self.send_frame(_encode(cmd, req_id, body))
            return waiter.get(timeout=self.config.ack_timeout_s)
        except gevent.Timeout:
            raise SendError(f"{cmd} not answered within {self.config.ack_timeout_s:g}s",
                            retryable=True) from None
        except ConnectionLost as e:
            raise SendError(f"{cmd} not answered: connection lost ({e.reason})",
                            retryable=True) from None
        finally:
            self._answers.discard(req_id)

    @contextmanager
    def _serial(self, req_id: str) -> Iterator[None]:
        """One frame at a time per req_id, each after the previous one was answered."""
        entry = self._locks.get(req_id)
        if entry is None:
            entry = self._locks[req_id] = [gevent.lock.Semaphore(), 0]
        entry[1] += 1
        try:
            with entry[0]:
                yield
        finally:
            entry[1] -= 1
            if entry[1] == 0:
                self._locks.pop(req_id, None)

    def _stream(self, ref: dict) -> _Stream:
        req_id = ref["req_id"]
        st = self._streams.get(req_id)
        if st is None:
            msgid = ref.get("msgid")
            st = self._streams[req_id] = _Stream(req_id, _stream_id(msgid if _nonempty(msgid)
                                                                   else req_id))
            while len(self._streams) > MAX_TRACKED_STREAMS:
                _, old = self._streams.popitem(last=False)
                if old.closer is not None:
                    old.closer.kill(block=False)
        return st

    def _forget(self, st: _Stream) -> None:
        self._streams.pop(st.req_id, None)
        if st.closer is not None and st.closer is not gevent.getcurrent():
            st.closer.kill(block=False)


# --- frames ----------------------------------------------------------------------------------

def _new_req_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _encode(cmd: str, req_id: str, body: dict | None) -> str:
    frame: dict[str, Any] = {"cmd": cmd, "headers": {"req_id": req_id}}
    if body is not None:
        frame["body"] = body
    return json.dumps(frame, ensure_ascii=False, separators=(",", ":"))


def _stream_body(stream_id: str, finish: bool, content: str) -> dict:
    return {"msgtype": "stream", "stream": {"id": stream_id, "finish": finish, "content": content}}


def _stream_id(msgid: str) -> str:
    """Deterministic per inbound message: a re-send after a restart reuses the stream."""
    return "hg" + hashlib.sha256(msgid.encode("utf-8", "surrogatepass")).hexdigest()[:30]


def _errcode(frame: Any) -> int | None:
    code = frame.get("errcode") if isinstance(frame, dict) else None
    return code if type(code) is int else None


def _errmsg(frame: dict) -> str:
    return _short(frame.get("errmsg"))


def _refused(cmd: str, answer: dict) -> SendError:
    code = _errcode(answer)
    return SendError(f"{cmd} refused: errcode {code} {_errmsg(answer)}",
                     retryable=code in RETRYABLE_ERRCODES)


def _fit(text: str) -> str:
    """Cut text to the content limit (20480 bytes of UTF-8) on a character boundary."""
    raw = _clean(text).encode("utf-8")
    return raw[:CONTENT_MAX_BYTES].decode("utf-8", "ignore") if len(raw) > CONTENT_MAX_BYTES \
        else raw.decode("utf-8")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _clean(text: str) -> str:
    """JSON may carry lone surrogates (\\ud800): make the text encodable as UTF-8."""
    return text.encode("utf-8", "replace").decode("utf-8")


def _nonempty(value: Any) -> bool:
    return isinstance(value, str) and value != ""


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text[:_MAX_LOG_TEXT]


# --- encrypted files ---------------------------------------------------------------------------

def _aes_key(aeskey: str) -> bytes:
    """The per-file key: base64 of 32 bytes (sent with or without its padding)."""
    try:
        key = base64.b64decode(aeskey + "=" * (-len(aeskey) % 4), validate=True)
    except (ValueError, TypeError):
        key = b""
    if len(key) != 32:
        raise MediaRefused("the file's decryption key is not valid")
    return key


class _FileDecryptor:
    """AES-256-CBC, IV = key[:16], PKCS#7 padding to 32 bytes, chunk by chunk (`cryptography`,
    whose CBC decryptor takes any chunk sizes). The last 32 bytes are held back until
    `finalize`, since they may be padding."""

    def __init__(self, key: bytes) -> None:
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        self._d = Cipher(algorithms.AES(key), modes.CBC(key[:16])).decryptor()
        self._held = b""

    def update(self, data: bytes) -> bytes:
        out = self._held + self._d.update(data)
        self._held, out = out[-AES_BLOCK_PAD:], out[:-AES_BLOCK_PAD]
        return out

    def finalize(self) -> bytes:
        out = self._held + self._d.finalize()  # ValueError when not whole blocks
        pad = out[-1] if out else 0
        if not 1 <= pad <= AES_BLOCK_PAD or pad > len(out) or out[-pad:] != bytes([pad]) * pad:
            raise ValueError("bad padding")
        return out[:-pad]


# --- message content -------------------------------------------------------------------------

_MEDIA_KINDS = {"image": "image", "file": "file", "video": "video"}


def _content(body: dict) -> tuple[str, tuple[Attachment, ...]]:
    """Text and attachments of one callback body; unknown parts become `other` attachments."""
    msgtype = body.get("msgtype")
    texts: list[str] = []
    attachments: list[Attachment] = []
    if msgtype == "mixed":
        mixed = body.get("mixed")
        items = mixed.get("msg_item") if isinstance(mixed, dict) else None
        for item in items if isinstance(items, list) else ():
            if isinstance(item, dict):
                _part(item.get("msgtype"), item, texts, attachments)
    else:
        _part(msgtype, body, texts, attachments)
    text = "\n".join(t for t in texts if t)
    return text, tuple(attachments)


def _part(msgtype: Any, holder: dict, texts: list[str], attachments: list[Attachment]) -> None:
    if not isinstance(msgtype, str) or not msgtype:
        attachments.append(Attachment("other", "", None))
        return
    value = holder.get(msgtype)
    value = value if isinstance(value, dict) else {}
    if msgtype == "text":
        content = value.get("content")
        if isinstance(content, str):
            texts.append(content)
    elif msgtype == "voice":  # the server sends the transcript, not the audio
        content = value.get("content")
        attachments.append(Attachment("voice", "", None, transcript=_clean(content) if
                                      isinstance(content, str) and content.strip() else None))
    elif msgtype in _MEDIA_KINDS:
        url = value.get("url")  # valid 5 minutes, encrypted with its own aeskey
        aeskey = value.get("aeskey")
        name = value.get("filename") or value.get("name")
        attachments.append(Attachment(
            _MEDIA_KINDS[msgtype], _clean(url) if isinstance(url, str) else "",
            _clean(name[:200]) if isinstance(name, str) and name else None,
            meta={"aeskey": aeskey} if isinstance(aeskey, str) and aeskey else {}))
    else:
        attachments.append(Attachment("other", "", _clean(msgtype[:_MAX_LOG_TEXT])))


PLATFORM = PlatformSpec(name="wecom", config=WeComConfig, adapter="WeComAdapter",
                        fake="hermes_green.testing.fake_wecom:FakeWeComServer")
