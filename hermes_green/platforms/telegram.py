"""Telegram Bot API over HTTP long polling: private chats, and group messages addressed to the bot.

The protocol, as this module speaks it (core.telegram.org/bots/api; the server's own source,
tdlib/telegram-bot-api telegram-bot-api/Client.cpp, for the rules the docs leave out):

    every call     POST {api_base}/bot{token}/METHOD with a JSON body -> {"ok": true, "result"}
                   or {"ok": false, "error_code", "description", "parameters"}. The token is in
                   every URL: URLs (and so the REST client's request lines, were they logged)
                   never reach a log line unredacted; its errors name the host only.
    prepare()      getMe (401/404: the token is refused -> fatal for this bot), deleteWebhook
                   (polling and a webhook exclude each other: 409), the saved offset
    poll()         getUpdates(offset, timeout=poll_timeout_s, allowed_updates=["message"]): held
                   by the server until an update arrives; the read timeout exceeds it.
                   409 (another poller took over, or a webhook is set): reported, and retried no
                   sooner than `conflict_retry_s`, with growing backoff -- never a tight loop.
                   429: no sooner than parameters.retry_after.
    on_update()    a `message` in a private chat, or in a group when it mentions @us, replies to
                   us, or is a command addressed to us (/cmd@us) -> deliver(); anything else
                   (edited messages, stickers, channel posts, unknown kinds) is logged, skipped
    commit()       offset = update_id + 1, saved with saved_state. The order is errbot's: the
                   offset moves only after the journal has the message, so a restart after a
                   crash sees the update again (the journal knows it: answered once) and never
                   skips one. Calling getUpdates with that offset confirms everything below it.
    send(out)      sendMessage(chat_id, text<=4096, reply_parameters={message_id,
                   allow_sending_without_reply}); the gateway splits longer answers
                   (reply_chunk_chars). The first part of an answer whose progress was shown
                   edits that message instead (editMessageText).
    progress()     sendChatAction("typing") every `typing_interval_s` while the turn runs (it
                   shows for 5 s or until our next message); the partial answer goes out as a
                   reply, then is edited at most once per `progress_interval_s`.

    media in       photo (largest size) / document / voice / audio / video: the file_id; the media
                   module's download asks getFile(file_id) -> file_path and fetches
                   {api_base}/file/bot{token}/{file_path}. Bots may download files up to 20 MB
                   (getFile answers 400 "file is too big" beyond): refused with that reason.
                   Telegram sends no transcript: voice goes to `agent.transcribe`.
    send_file      sendPhoto (images up to 10 MB) or sendDocument (up to 50 MB) as
                   multipart/form-data with chat_id, caption and reply_parameters (JSON text).
                   No idempotency key exists: a crash after Telegram accepted a file and
                   before the outbox row was deleted sends it again (as for text).

Message ids are unique per chat only, so the dedup key is "chat_id:message_id". `allow_from`
takes numeric Telegram user ids. Entity offsets count UTF-16 code units (docs: MessageEntity).
"""
from __future__ import annotations

import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.lock
from .. import rest
from pydantic import Field, SecretStr

from ..models import Attachment, InboundMessage, OutboundMessage
from .base import ConnectionLost, Delivery, FatalPlatformError, JournalFailure, SendError
from .botconfig import BotConfig
from .kit import SkipFrame, decode_json, http_session, is_int, retry_after_s, spawn_owned
from .media import MediaRefused, MediaSource, OutboundFile, read_file
from .registry import PlatformSpec
from .transports.longpoll import LongPollAdapter

TEXT_LIMIT = 4096  # sendMessage text, code points after trimming (tdlib/td MessageContent.cpp)
ALLOWED_UPDATES = ["message"]  # the only kind we answer; the server queues nothing else
OFFSET_KEY = "offset"
CONNECT_TIMEOUT_S = 10.0
READ_GRACE_S = 5.0  # a poll's read timeout is the long-poll timeout plus this
MAX_RESPONSE_BYTES = 16 * 1024 * 1024  # 100 updates of 4096 characters fit many times over
MAX_INBOUND_CHARS = 64 * 1024  # user text is capped at 4096 by Telegram; more is not Telegram
MAX_DRAFTS = 256  # answers whose progress we track at once
TYPING_IDLE_MAX_S = 300.0  # stop "typing" when no progress came for this long
DOWNLOAD_LIMIT = 20 * 1024 * 1024  # getFile: "files of up to 20MB in size" (Bot API)
UPLOAD_LIMITS = {"image": 10 * 1024 * 1024, "file": 50 * 1024 * 1024,
                 "voice": 50 * 1024 * 1024, "video": 50 * 1024 * 1024}  # Bot API sendPhoto/...
_TOKEN_PATH = re.compile(r"/bot[^/\s]+/")
# Errors of a reply that will never be accepted as sent: retrying cannot help.
_PERMANENT_SEND_STATUS = {400, 403, 404}


class TelegramConfig(BotConfig):
    token: SecretStr
    api_base: str = "https://api.telegram.org"
    # getUpdates holds the call up to this long (the server allows 0..50 s, integers).
    poll_timeout_s: int = Field(25, ge=1, le=50)
    rest_timeout_s: float = Field(20.0, gt=0)
    # The least wait after a 409 (another poller on this token, or a webhook). The server
    # itself answers at most one 409 per 3 s (Client::fail_query_conflict).
    conflict_retry_s: float = Field(5.0, ge=0)
    progress_interval_s: float = Field(1.0, ge=0)  # edits of the partial answer, at most
    typing_interval_s: float = Field(4.0, gt=0)  # "typing" lasts 5 s: renew before it fades


class ApiError(Exception):
    """A Bot API call failed. `status` 0 means no answer (network); the text never holds the
    token (URLs are never part of it)."""

    def __init__(self, method: str, status: int, description: str, *,
                 retry_after: float | None = None, migrate_to: int | None = None) -> None:
        super().__init__(f"{method} {status or 'network'}: {description}")
        self.method, self.status, self.description = method, status, description
        self.retry_after, self.migrate_to = retry_after, migrate_to


class _RedactTokenPaths(logging.Filter):
    """urllib3 logs each request line ("POST /bot<token>/getUpdates") at DEBUG: mask the token
    there, whatever formatter the process uses."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "/bot" in message:
            record.msg, record.args = _TOKEN_PATH.sub("/bot***/", message), ()
        return True


_URLLIB3_FILTER = _RedactTokenPaths()


def _install_log_filter() -> None:
    pool_log = logging.getLogger("urllib3.connectionpool")
    if _URLLIB3_FILTER not in pool_log.filters:
        pool_log.addFilter(_URLLIB3_FILTER)


@dataclass
class _Draft:
    """The answer being produced for one inbound message: its progress message and typing."""
    chat_id: int
    reply_to: int | None
    thread_id: int | None
    lock: gevent.lock.Semaphore = field(default_factory=gevent.lock.Semaphore)
    message_id: int | None = None  # our message showing the partial answer
    shown: str = ""
    last_update: float = float("-inf")  # monotonic time of the last progress send/edit
    last_progress: float = field(default_factory=time.monotonic)
    updating: bool = False
    finished: bool = False
    typing: gevent.Greenlet | None = None


class TelegramAdapter(LongPollAdapter):
    """One Telegram bot (one token). See the module docstring for the flow."""
    name = "telegram"
    # Until commit() moves the offset, getUpdates hands the update out again: a journal failure
    # drops the connection before the offset moves, and the next poll brings the update back.
    on_journal_failure = JournalFailure.REPLAY
    single_connection = True  # a second getUpdates poller gets 409 Conflict

    def __init__(self, config, on_message, **kw) -> None:
        super().__init__(config, on_message, **kw)
        _install_log_filter()
        self.poll_timeout_s = float(config.poll_timeout_s)
        self._token = config.token.get_secret_value()
        self._base = f"{config.api_base.rstrip('/')}/bot{self._token}/"
        self._http = http_session()  # sends, edits, typing
        self._poll_http: rest.Session | None = None  # one per connection
        self._me: dict | None = None
        self._offset: int | None = None
        self._drafts: OrderedDict[tuple[int, int | None], _Draft] = OrderedDict()

    # -- the Bot API ---------------------------------------------------------------------------
    def _call(self, method: str, params: dict | None = None, *, read_timeout: float | None = None,
              session: rest.Session | None = None, files: dict | None = None) -> Any:
        """One call; returns `result` or raises ApiError (never with the URL in it). With
        `files`, the call is multipart/form-data (object parameters as JSON text)."""
        timeout = (CONNECT_TIMEOUT_S, read_timeout or self.config.rest_timeout_s)
        try:
            if files:
                form = {k: json.dumps(v) if isinstance(v, (dict, list)) else str(v)
                        for k, v in (params or {}).items()}
                resp = (session or self._http).post(self._base + method, data=form,
                                                    files=files, timeout=timeout, stream=True)
            else:
                resp = (session or self._http).post(self._base + method, json=params or {},
                                                    timeout=timeout, stream=True)
            try:
                raw = _read_capped(resp)
            finally:
                resp.close()
        except rest.RequestException as e:  # its text holds the URL: keep the type only
            raise ApiError(method, 0, type(e).__name__) from None
        if raw is None:
            raise ApiError(method, resp.status_code, f"answer over {MAX_RESPONSE_BYTES} bytes")
        try:
            body = decode_json(raw)
        except SkipFrame as e:
            raise ApiError(method, resp.status_code, f"unreadable answer ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(method, resp.status_code, "answer is not a JSON object")
        if resp.status_code == 200 and body.get("ok") is True:
            return body.get("result")
        params_ = body.get("parameters") if isinstance(body.get("parameters"), dict) else {}
        retry_after = retry_after_s(params_.get("retry_after"))
        if retry_after is None and resp.status_code == 429:
            retry_after = retry_after_s(resp.headers, default=1.0)
        migrate = params_.get("migrate_to_chat_id")
        status = resp.status_code
        if status == 200:  # "ok": false on a 200: trust the error_code it names
            status = body["error_code"] if is_int(body.get("error_code")) else 500
        raise ApiError(method, status, self._redact(str(body.get("description", "")))[:200],
                       retry_after=retry_after, migrate_to=migrate if is_int(migrate) else None)

    def _redact(self, text: str) -> str:
        return text.replace(self._token, "***") if self._token else text

    def _get_me(self) -> dict:
        try:
            me = self._call("getMe")
        except ApiError as e:
            raise self._connection_error(e) from None
        if not isinstance(me, dict) or not is_int(me.get("id")) or not isinstance(
                me.get("username"), str) or not me["username"]:
            raise ConnectionLost("bad_response", "getMe answered without id/username")
        return me

    def _connection_error(self, e: ApiError) -> Exception:
        """What a failed getMe / deleteWebhook / getUpdates means for the connection."""
        if e.status in (401, 404):
            # 401: a revoked or unknown token; 404: a malformed one at api.telegram.org
            # (python-telegram-bot telegram/request/_baserequest.py _request_wrapper).
            return FatalPlatformError(f"Telegram refused the bot token ({e.status}: "
                                      f"{e.description or 'Unauthorized'})")
        if e.status == 409:
            self.log.warning("poll conflict platform=%s bot=%s: another getUpdates poller or a "
                             "webhook uses this bot token; retrying no sooner than %.0fs "
                             "detail=%s", self.name, self.bot_id, self.config.conflict_retry_s,
                             e.description)
            return ConnectionLost("conflict", e.description,
                                  retry_after=max(self.config.conflict_retry_s,
                                                  e.retry_after or 0.0))
        if e.status == 429:
            return ConnectionLost("rate_limited", e.description,
                                  retry_after=e.retry_after if e.retry_after is not None else 1.0)
        return ConnectionLost("network" if e.status == 0 else "api_error", str(e))

    # -- connection (LongPollAdapter hooks) ----------------------------------------------------
    @classmethod
    def check(cls, config, *, full: bool = False) -> str:
        """getMe only: polling here would end a running gateway's poll with a 409."""
        adapter = cls(config, lambda msg: Delivery.REFUSED)
        me = adapter._get_me()
        detail = f"bot @{me['username']} id={me['id']}"
        if full:
            try:
                info = adapter._call("getWebhookInfo")
            except ApiError as e:
                raise adapter._connection_error(e) from None
            if isinstance(info, dict):
                detail += (f" webhook={'set' if info.get('url') else 'none'}"
                           f" pending_updates={info.get('pending_update_count', '?')}")
        return detail

    def prepare(self) -> None:
        self._me = self._get_me()
        try:
            self._call("deleteWebhook", {"drop_pending_updates": False})
        except ApiError as e:
            raise self._connection_error(e) from None
        if self._offset is None:
            saved = self.saved_state.get(OFFSET_KEY)  # saved state holds strings
            self._offset = int(saved) if saved is not None and saved.isdigit() else 0
        if self._poll_http is not None:
            self._poll_http.close()
        self._poll_http = http_session()
        self.log.info("polling platform=%s bot=%s username=%s offset=%d", self.name,
                      self.bot_id, self._me["username"], self._offset)

    def poll(self, timeout_s: float) -> list[Any]:
        params: dict[str, Any] = {"timeout": int(timeout_s), "allowed_updates": ALLOWED_UPDATES}
        if self._offset:
            params["offset"] = self._offset
        try:
            result = self._call("getUpdates", params, read_timeout=timeout_s + READ_GRACE_S,
                                session=self._poll_http)
        except ApiError as e:
            raise self._connection_error(e) from None
        if not isinstance(result, list):
            raise ConnectionLost("bad_response", "getUpdates result is not a list")
        return result

    def describe_update(self, update: Any) -> str:
        if not isinstance(update, dict):
            return type(update).__name__
        kinds = [k for k in update if k != "update_id"][:1]
        return f"{update.get('update_id')}/{kinds[0] if kinds else 'none'}"[:80]

    def on_update(self, update: Any) -> None:
        uid = update.get("update_id") if isinstance(update, dict) else None
        if not is_int(uid):
            return self._skip(update, "no_update_id")
        if self._offset and uid < self._offset:
            return self._skip(update, "already_confirmed", level=logging.DEBUG)
        message = update.get("message")
        if not isinstance(message, dict):
            return self._skip(update, "kind")  # edited_message, channel_post, unknown kinds...
        inbound = self._inbound(update, message)
        if inbound is None:
            return
        if self.deliver(inbound) is Delivery.NOT_JOURNALED:
            raise ConnectionLost("not_journaled", inbound.message_id)  # keep the offset

    def commit(self, update: Any) -> None:
        uid = update.get("update_id") if isinstance(update, dict) else None
        if not is_int(uid) or (self._offset and uid + 1 <= self._offset):
            return
        self._offset = uid + 1
        try:
            self.saved_state.put(OFFSET_KEY, str(self._offset))
        except Exception as e:  # a restart may see this update again; the journal knows it
            self.log.error("offset not saved platform=%s bot=%s offset=%d error=%s", self.name,
                           self.bot_id, self._offset, type(e).__name__)

    # -- inbound -------------------------------------------------------------------------------
    def _skip(self, update: Any, reason: str, level: int = logging.INFO) -> None:
        self.log.log(level, "update skipped platform=%s bot=%s update=%s reason=%s", self.name,
                     self.bot_id, self.describe_update(update), reason)

    def _inbound(self, update: dict, msg: dict) -> InboundMessage | None:
        chat, sender, mid = msg.get("chat"), msg.get("from"), msg.get("message_id")
        if not isinstance(chat, dict) or not is_int(chat.get("id")) or not is_int(mid):
            return self._skip(update, "malformed")
        if not isinstance(sender, dict) or not is_int(sender.get("id")):
            return self._skip(update, "no_sender")
        if sender.get("is_bot") or sender["id"] == self._me["id"]:
            return self._skip(update, "from_bot")
        text = msg.get("text") if "text" in msg else msg.get("caption")
        entities = msg.get("entities") if "text" in msg else msg.get("caption_entities")
        text = _utf8_safe(text) if isinstance(text, str) else ""
        if len(text) > MAX_INBOUND_CHARS:
            return self._skip(update, f"too_long chars={len(text)}")
        attachments = _attachments(msg)
        if not text.strip() and not attachments:
            return self._skip(update, "no_text")  # stickers, service messages, empty text
        kind = chat.get("type")
        if kind == "private":
            chat_type = "dm"
            text = self._clean(text, entities)[1]
        elif kind in ("group", "supergroup"):
            chat_type = "group"
            addressed, cleaned = self._clean(text, entities)
            reply = msg.get("reply_to_message")
            if isinstance(reply, dict) and isinstance(reply.get("from"), dict) and \
                    reply["from"].get("id") == self._me["id"]:
                addressed = True
            if not addressed:
                return self._skip(update, "group_not_addressed", level=logging.DEBUG)
            text = cleaned if cleaned.strip() else text
        else:
            return self._skip(update, f"chat_type_{str(kind)[:20]}")
        ref: dict[str, Any] = {"chat_id": chat["id"], "message_id": mid}
        if msg.get("is_topic_message") and is_int(msg.get("message_thread_id")):
            ref["thread_id"] = msg["message_thread_id"]
        return InboundMessage(platform=self.name, message_id=f"{chat['id']}:{mid}",
                              chat_id=str(chat["id"]), user_id=str(sender["id"]),
                              text=text.strip(), chat_type=chat_type,
                              attachments=attachments, reply_ref=ref)

    def _clean(self, text: str, entities: Any) -> tuple[bool, str]:
        """Whether an entity addresses us (a `mention` of @us, a `text_mention` of our id, a
        `bot_command` ending in @us), and the text without our @username in those spans."""
        me, name = self._me["id"], "@" + self._me["username"].lower()
        units = text.encode("utf-16-le", "surrogatepass")
        cuts: list[tuple[int, int]] = []  # UTF-16 byte ranges to remove
        addressed = False
        for ent in entities if isinstance(entities, list) else ():
            if not isinstance(ent, dict):
                continue
            off, length, kind = ent.get("offset"), ent.get("length"), ent.get("type")
            if not (is_int(off) and is_int(length) and off >= 0 and length > 0
                    and 2 * (off + length) <= len(units)):
                continue
            piece = units[2 * off:2 * (off + length)].decode("utf-16-le", "replace")
            if kind == "mention" and piece.lower() == name:
                addressed = True
                cuts.append((2 * off, 2 * (off + length)))
            elif kind == "text_mention" and isinstance(ent.get("user"), dict) and \
                    ent["user"].get("id") == me:
                addressed = True
            elif kind == "bot_command" and piece.lower().endswith(name):
                addressed = True
                end = 2 * (off + length)
                cuts.append((end - 2 * len(name), end))  # usernames are ASCII
        if not cuts:
            return addressed, text
        kept: list[tuple[int, int]] = []
        for start, end in sorted(set(cuts)):
            if not kept or start >= kept[-1][1]:  # overlapping spans: the first one wins
                kept.append((start, end))
        for start, end in reversed(kept):
            units = units[:start] + units[end:]
        cleaned = _utf8_safe(units.decode("utf-16-le", "surrogatepass"))
        return addressed, re.sub(r"[ \t]{2,}", " ", cleaned).strip()

    # -- media -------------------------------------------------------------------------------
    def media_source(self, att: Attachment, msg: InboundMessage) -> MediaSource:
        if att.size is not None and att.size > DOWNLOAD_LIMIT:
            raise MediaRefused("larger than the 20 MB Telegram lets bots download")
        try:
            info = self._call("getFile", {"file_id": att.ref})
        except ApiError as e:
            if e.status == 400 and "too big" in e.description:
                raise MediaRefused("larger than the 20 MB Telegram lets bots download") from None
            raise MediaRefused(f"Telegram did not hand out the file ({e.status or 'network'})") \
                from None
        path = info.get("file_path") if isinstance(info, dict) else None
        if not isinstance(path, str) or not path:
            raise MediaRefused("Telegram did not hand out the file (no file_path)")
        size = info.get("file_size")
        return MediaSource(f"{self.config.api_base.rstrip('/')}/file/bot{self._token}/{path}",
                           size=size if is_int(size) else att.size, mime=att.mime,
                           name=att.name or path.rsplit("/", 1)[-1])

    def max_upload_bytes(self, media: str) -> int | None:
        return UPLOAD_LIMITS.get(media, UPLOAD_LIMITS["file"])

    def send_file(self, out: OutboundMessage) -> None:
        file = OutboundFile.from_row(out.file)
        chat_id, reply_to, thread_id = self._target(out)
        photo = file.media == "image" and file.size <= UPLOAD_LIMITS["image"]
        method, field_name = ("sendPhoto", "photo") if photo else ("sendDocument", "document")
        try:
            data = read_file(file.path, UPLOAD_LIMITS["file"])
        except (OSError, ValueError) as e:
            raise SendError(f"file unusable: {type(e).__name__}", retryable=False) from None
        params: dict[str, Any] = {"chat_id": chat_id}
        if out.text.strip():
            params["caption"] = out.text.strip()[:1024]
        if reply_to is not None:
            params["reply_parameters"] = {"message_id": reply_to,
                                          "allow_sending_without_reply": True}
        if thread_id is not None:
            params["message_thread_id"] = thread_id
        try:
            self._call(method, params, files={field_name: (file.name, data, file.mime)},
                       read_timeout=max(self.config.rest_timeout_s, 60.0))
        except ApiError as e:
            raise self._send_error(e, out) from None

    # -- outbound ------------------------------------------------------------------------------
    def reply_chunk_chars(self) -> int:
        return TEXT_LIMIT

    def send(self, out: OutboundMessage) -> None:
        chat_id, reply_to, thread_id = self._target(out)
        text = out.text.strip()
        if not text:  # Telegram refuses whitespace ("text must be non-empty"): nothing to show
            self.log.info("empty reply part skipped platform=%s chat=%s seq=%d", self.name,
                          chat_id, out.seq)
            return
        draft = self._drafts.get((chat_id, reply_to))
        if draft is not None and out.seq == 0:
            with draft.lock:  # after a progress send/edit that is on its way
                self._stop_draft(draft)
                # A retryable edit failure raises and keeps the draft: the retry edits again.
                edited = draft.message_id is not None and self._edit_final(draft, text)
                self._drafts.pop((chat_id, reply_to), None)
                if edited:
                    return
        try:
            self._send_message(chat_id, text, reply_to, thread_id)
        except ApiError as e:
            if e.migrate_to is not None:  # the group became a supergroup: write there
                self.log.info("chat migrated platform=%s chat=%s to=%s", self.name, chat_id,
                              e.migrate_to)
                try:
                    return self._send_message(e.migrate_to, text, None, None)
                except ApiError as e2:
                    e = e2
            raise self._send_error(e, out) from None

    def _target(self, out: OutboundMessage) -> tuple[int, int | None, int | None]:
        ref = out.reply_ref if isinstance(out.reply_ref, dict) else {}
        chat_id = ref.get("chat_id")
        if not is_int(chat_id):
            try:
                chat_id = int(out.chat_id)
            except (TypeError, ValueError):
                raise SendError(f"not a Telegram chat id: {out.chat_id[:40]!r}",
                                retryable=False) from None
        reply_to = ref.get("message_id") if is_int(ref.get("message_id")) else None
        thread_id = ref.get("thread_id") if is_int(ref.get("thread_id")) else None
        return chat_id, reply_to, thread_id

    def _send_message(self, chat_id: int, text: str, reply_to: int | None,
                      thread_id: int | None) -> int | None:
        params: dict[str, Any] = {"chat_id": chat_id, "text": text}
        if reply_to is not None:
            # The user may have deleted their message: answer anyway, without the quote.
            params["reply_parameters"] = {"message_id": reply_to,
                                          "allow_sending_without_reply": True}
        if thread_id is not None:
            params["message_thread_id"] = thread_id
        result = self._call("sendMessage", params)
        return result.get("message_id") if isinstance(result, dict) else None

    def _edit_final(self, draft: _Draft, text: str) -> bool:
        """Put the final first part into the progress message; False: send it anew instead."""
        try:
            self._call("editMessageText", {"chat_id": draft.chat_id,
                                           "message_id": draft.message_id, "text": text})
            return True
        except ApiError as e:
            if e.status == 400 and "not modified" in e.description:
                return True  # it already shows exactly this
            if e.status == 400 and ("to edit not found" in e.description
                                    or "can't be edited" in e.description):
                return False  # deleted meanwhile: a new message carries the answer
            raise self._send_error(e, None) from None

    def _send_error(self, e: ApiError, out: OutboundMessage | None) -> SendError:
        retryable = e.status not in _PERMANENT_SEND_STATUS
        if out is not None:
            self.log.warning("reply failed platform=%s chat=%s msg=%s seq=%d retryable=%s "
                             "error=%s", self.name, out.chat_id, out.in_reply_to, out.seq,
                             retryable, e)
        return SendError(str(e), retryable=retryable, retry_after=e.retry_after)

    # -- progress: typing and the partial answer -----------------------------------------------
    def progress(self, reply_ref: dict, text_so_far: str) -> None:
        ref = reply_ref if isinstance(reply_ref, dict) else {}
        if not is_int(ref.get("chat_id")) or not self.ready.is_set():
            return
        reply_to = ref.get("message_id") if is_int(ref.get("message_id")) else None
        key = (ref["chat_id"], reply_to)
        draft = self._drafts.get(key)
        if draft is None:
            draft = self._drafts[key] = _Draft(ref["chat_id"], reply_to,
                                               ref.get("thread_id") if is_int(
                                                   ref.get("thread_id")) else None)
            while len(self._drafts) > MAX_DRAFTS:
                self._stop_draft(self._drafts.popitem(last=False)[1])
        if draft.finished:
            return
        now = time.monotonic()
        draft.last_progress = now
        if draft.typing is None:
            draft.typing = spawn_owned(self.background, self._keep_typing, draft,
                                       name=f"{self.name}:{self.bot_id}:typing", log=self.log)
        shown = (text_so_far or "").strip()[:TEXT_LIMIT].strip()
        if (not shown or shown == draft.shown or draft.updating
                or now - draft.last_update < self.config.progress_interval_s):
            return
        draft.updating, draft.last_update = True, now
        spawn_owned(self.background, self._push_progress, draft, shown,
                    name=f"{self.name}:{self.bot_id}:progress", log=self.log)

    def _push_progress(self, draft: _Draft, text: str) -> None:
        try:
            with draft.lock:
                if draft.finished:
                    return
                if draft.message_id is None:
                    draft.message_id = self._send_message(draft.chat_id, text, draft.reply_to,
                                                          draft.thread_id)
                else:
                    self._call("editMessageText", {"chat_id": draft.chat_id,
                                                   "message_id": draft.message_id, "text": text})
                draft.shown = text
        except ApiError as e:
            if e.retry_after:
                draft.last_update = time.monotonic() + e.retry_after  # no edits until then
            self.log.info("progress not shown platform=%s chat=%s error=%s", self.name,
                          draft.chat_id, e)
        finally:
            draft.updating = False

    def _keep_typing(self, draft: _Draft) -> None:
        while not draft.finished and time.monotonic() - draft.last_progress < TYPING_IDLE_MAX_S:
            params: dict[str, Any] = {"chat_id": draft.chat_id, "action": "typing"}
            if draft.thread_id is not None:
                params["message_thread_id"] = draft.thread_id
            try:
                self._call("sendChatAction", params)
            except ApiError as e:
                self.log.info("typing not shown platform=%s chat=%s error=%s", self.name,
                              draft.chat_id, e)
                if e.status in _PERMANENT_SEND_STATUS or e.status in (401,):
                    return
                if e.retry_after:
                    gevent.sleep(e.retry_after)
            gevent.sleep(self.config.typing_interval_s)

    def _stop_draft(self, draft: _Draft) -> None:
        """No more progress edits or typing for this answer."""
        draft.finished = True
        if draft.typing is not None and not draft.typing.dead:
            draft.typing.kill(block=False)


def _read_capped(resp: rest.Response) -> bytes | None:
    """The body, or None past MAX_RESPONSE_BYTES (a broken proxy, not the Bot API)."""
    chunks, size = [], 0
    for chunk in resp.iter_content(64 * 1024):
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _utf8_safe(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"): the store could not encode them, and a
    message that can never be journaled would come back on every poll. They become "?"."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _attachments(msg: dict) -> tuple[Attachment, ...]:
    """Media of a message, described by file_id (fetched by the gateway's media module through
    `media_source`)."""
    found: list[Attachment] = []
    photo = msg.get("photo")
    if isinstance(photo, list) and photo and isinstance(photo[-1], dict):
        file_id = photo[-1].get("file_id")  # sizes come smallest first
        if isinstance(file_id, str) and file_id:
            size = photo[-1].get("file_size")
            found.append(Attachment("image", _utf8_safe(file_id[:256]),
                                    size=size if is_int(size) else None))
    for key, kind in (("document", "file"), ("voice", "voice"), ("audio", "voice"),
                      ("video", "video"), ("video_note", "video")):
        item = msg.get(key)
        if isinstance(item, dict) and isinstance(item.get("file_id"), str) and item["file_id"]:
            name, size, mime = item.get("file_name"), item.get("file_size"), item.get("mime_type")
            found.append(Attachment(kind, _utf8_safe(item["file_id"][:256]),
                                    _utf8_safe(name[:200]) if isinstance(name, str) else None,
                                    mime=mime[:100] if isinstance(mime, str) else None,
                                    size=size if is_int(size) else None))
    return tuple(found)


PLATFORM = PlatformSpec(name="telegram", config=TelegramConfig, adapter="TelegramAdapter",
                        fake="hermes_green.testing.fake_telegram:FakeTelegramServer")
