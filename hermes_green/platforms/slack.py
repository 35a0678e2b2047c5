"""Slack over Socket Mode: DMs and @-mentions in, threaded replies out through the Web API.

The protocol, as this module speaks it (api.slack.com/apis/socket-mode and
/apis/connections/socket-implement; slack_sdk `socket_mode/builtin/{client,connection}.py`,
`socket_mode/client.py`, `socket_mode/request.py`; @slack/socket-mode `SocketModeClient.ts`):

    prepare()      auth.test with the bot token (once: our user_id and bot_id, so our own
                   messages are skipped), then apps.connections.open with the app-level token
                   (xapp-) -> a fresh wss URL; each URL opens one connection only.
    hello          {"type": "hello", "num_connections", "debug_info": {...,
                   "approximate_connection_time"}}: the connection is ready.
    envelopes      {"envelope_id", "type": events_api|slash_commands|interactive, "payload",
                   "accepts_response_payload", "retry_attempt", "retry_reason"}. Each one is
                   acked with {"envelope_id"} on the connection that carried it, within 3 s or
                   Slack sends it again (retry_attempt + 1). An event is acked right after the
                   journal took it; when the store failed (`NOT_JOURNALED`) it is not acked, and
                   the redelivery brings it back (JournalFailure.REDELIVER). A redelivery of a
                   journaled event is recognized by its message id (channel:ts), never by the
                   envelope id, and not answered twice. Everything we skip is acked too.
    events         `message` with channel_type "im" (DMs) and `app_mention` (channels); skipped:
                   bot messages (`bot_id`), our own user, subtypes other than file_share /
                   thread_broadcast (edits, deletes, joins...), events without text or files,
                   unknown event and envelope types.
    disconnect     `refresh_requested` / `warning` (the server will close this connection soon):
                   a new connection is opened beside it and takes over at its hello, before the
                   old one closes (the kit's handover), so no event falls into a gap.
                   `link_disabled` (Socket Mode turned off): reconnect no sooner than a minute.
    keepalive      WebSocket ping every `ping_interval_s`, pong expected (slack_sdk's
                   Connection.check_state); the server's own pings are answered by the client.
    send(out)      chat.postMessage {channel, text, thread_ts} with the bot token, in the thread
                   of the message (its thread_ts, or its ts when it started none). 429 ->
                   SendError(retry_after = Retry-After). invalid_auth & co -> this bot stops.
    media in       `files` on the message event (subtype file_share): each file's `url_private`,
                   fetched with the bot token in `Authorization: Bearer` (api.slack.com/types/file,
                   "Authentication": url_private needs the token; scope files:read); the file's
                   declared `size` and `mimetype` are passed on, so a too-large one is refused
                   before any byte.
    send_file      the external upload flow slack_sdk's `WebClient.files_upload_v2` uses
                   (slack_sdk/web/client.py; api.slack.com/methods/files.getUploadURLExternal and
                   /files.completeUploadExternal): files.getUploadURLExternal {filename, length}
                   -> {upload_url, file_id}; POST the bytes to upload_url (no token: the URL is
                   the authorization); files.completeUploadExternal {files: [{id, title}],
                   channel_id, thread_ts, initial_comment} shares it in the thread. Both methods
                   take form arguments (`files` a JSON text), as slack_sdk sends them. A file
                   uploaded but never completed is not shown; a retry uploads again.
    progress()     the first partial answer is posted in the thread, then chat.update'd at most
                   once per `progress_interval_s`; the final answer's first part replaces it
                   (chat.update), so it still goes out exactly once through the outbox.

Facts not confirmed against the live platform are marked *unverified*.
"""
from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import gevent.lock
from .. import rest
from pydantic import Field, SecretStr, field_validator

from ..models import Attachment, InboundMessage, OutboundMessage
from .base import (ConnectionLost, Delivery, FatalPlatformError, JournalFailure, PlatformError,
                   SendError)
from .media import MediaRefused, MediaSource, OutboundFile, read_file
from .botconfig import BotConfig
from .kit import SkipFrame, decode_json, http_session, retry_after_s, spawn_owned
from .registry import PlatformSpec
from .transports.websocket import Keepalive, WebSocketAdapter

# chat.postMessage reference ("Truncating content"): "For best results, limit the number of
# characters in the text field to 4,000 characters"; above 40,000 Slack truncates
# (api.slack.com/changelog/2018-04-truncating-really-long-messages). Answers are split at 4,000.
REPLY_CHUNK_CHARS = 4000
# Errors that mean the credentials will never work: stop this bot, never retry (the Web API's
# common errors; @slack/socket-mode UnrecoverableSocketModeStartError.ts).
FATAL_ERRORS = frozenset({"not_authed", "invalid_auth", "account_inactive", "token_revoked",
                          "token_expired", "not_allowed_token_type", "user_removed_from_team",
                          "team_disabled", "missing_scope", "no_permission"})
# chat.* errors a retry cannot fix (the methods' error lists).
PERMANENT_SEND_ERRORS = frozenset({
    "channel_not_found", "not_in_channel", "is_archived", "msg_too_long", "no_text",
    "thread_not_found", "restricted_action", "cant_update_message", "invalid_arguments",
    "invalid_blocks", "too_many_attachments", "missing_scope", "no_permission",
    "ekm_access_denied", "team_access_not_granted", "channel_type_not_supported"})
ANSWERED_SUBTYPES = frozenset({"file_share", "thread_broadcast"})  # user messages after all
LINK_DISABLED_RETRY_S = 60.0  # Socket Mode was turned off: ask again no sooner than this
MAX_PARSE_BYTES = 1 << 20  # larger frames are not parsed: their envelope_id is read and acked
MAX_INBOUND_CHARS = 100_000  # user text is truncated by Slack at 40,000
MAX_DRAFTS = 256  # answers whose progress message we track at once
MAX_ID_CHARS = 256
# files.getUploadURLExternal: files up to 1 GB (api.slack.com/methods/files.upload and the
# help centre's "upload files to Slack": 1 GB per file) *unverified for bot uploads*.
UPLOAD_LIMIT_BYTES = 1024 * 1024 * 1024
UPLOAD_TIMEOUT_S = 120.0  # the bytes' POST to upload_url (a large file on a slow link)
_ENVELOPE_ID = re.compile(r'"envelope_id"\s*:\s*"([^"\\]{1,200})"')


class SlackConfig(BotConfig):
    app_token: SecretStr  # app-level token (xapp-), scope connections:write
    # bot token (xoxb-), scopes chat:write, im:history, app_mentions:read; files:read (fetch
    # url_private) and files:write (send_file) for files
    bot_token: SecretStr
    api_base: str = "https://slack.com/api"
    ping_interval_s: float = Field(5.0, ge=0.05, le=60.0)  # slack_sdk's default ping_interval
    rest_timeout_s: float = Field(10.0, gt=0)
    progress_interval_s: float = Field(1.0, ge=0)  # chat.update of a partial answer, at most

    @field_validator("app_token")
    @classmethod
    def _app_level(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().startswith("xapp-"):
            raise ValueError("must be an app-level token (xapp-...), made under Basic "
                             "Information > App-Level Tokens with connections:write")
        return v

    @field_validator("bot_token")
    @classmethod
    def _bot(cls, v: SecretStr) -> SecretStr:
        if not v.get_secret_value().startswith("xoxb-"):
            raise ValueError("must be a bot token (xoxb-...), from OAuth & Permissions")
        return v


class ApiError(Exception):
    """A Web API call failed: `error` is Slack's error code ("network", "http_500" and
    "bad_response" are ours). The text never holds a token."""

    def __init__(self, method: str, error: str, *, retry_after: float | None = None,
                 detail: str = "") -> None:
        super().__init__(f"{method}: {error}{' ' + detail if detail else ''}")
        self.method, self.error, self.retry_after = method, error, retry_after


@dataclass
class _Draft:
    """The answer being produced for one inbound message: our message showing its progress."""
    channel: str
    thread_ts: str
    lock: gevent.lock.Semaphore = field(default_factory=gevent.lock.Semaphore)
    ts: str | None = None
    shown: str = ""
    last_update: float = float("-inf")
    updating: bool = False
    finished: bool = False


class SlackAdapter(WebSocketAdapter):
    """One Slack app (one app token + bot token). See the module docstring for the flow."""
    name = "slack"
    # Slack sends an envelope that was not acked again: not acking is how we ask for it back.
    on_journal_failure = JournalFailure.REDELIVER
    keepalive = Keepalive.PING
    # slack_sdk calls a connection stale after 4 intervals without a pong; we act after 3.
    max_unanswered_beats = 3
    handover_grace_s = 2.0
    # Frames up to this size are read; beyond MAX_PARSE_BYTES only their envelope_id is.
    max_frame_bytes = 16 << 20

    def __init__(self, config, on_message, *, hello_timeout_s: float = 20.0, **kw) -> None:
        super().__init__(config, on_message, **kw)
        self.heartbeat_interval_s = config.ping_interval_s
        self.session_timeout_s = hello_timeout_s
        self._api_base = config.api_base.rstrip("/")
        self._http = http_session()
        self._me: dict | None = None
        self._mention: re.Pattern | None = None
        self._drafts: OrderedDict[tuple[str, str], _Draft] = OrderedDict()
        self.hello: dict = {}  # the last hello's num_connections and debug_info

    # -- Web API -------------------------------------------------------------------------------
    def _call(self, method: str, args: dict | None = None, *, app: bool = False,
              form: bool = False) -> dict:
        """POST {api_base}/METHOD with the bot (or app-level) token; the body on success, else
        ApiError. JSON bodies carry the token in the header only, as the Web API requires;
        `form`: the arguments go form-encoded (methods that take no JSON, e.g. the files.*
        upload ones, which slack_sdk calls with form params)."""
        token = (self.config.app_token if app else self.config.bot_token).get_secret_value()
        headers = {"Authorization": f"Bearer {token}"}
        try:
            if args is None:
                resp = self._http.post(f"{self._api_base}/{method}", headers=headers,
                                       timeout=(5.0, self.config.rest_timeout_s))
            elif form:
                resp = self._http.post(f"{self._api_base}/{method}", headers=headers,
                                       data=args, timeout=(5.0, self.config.rest_timeout_s))
            else:
                resp = self._http.post(f"{self._api_base}/{method}", headers=headers,
                                       json=args, timeout=(5.0, self.config.rest_timeout_s))
        except rest.RequestException as e:
            raise ApiError(method, "network", detail=type(e).__name__) from None
        if resp.status_code == 429:
            raise ApiError(method, "ratelimited",
                           retry_after=retry_after_s(resp.headers, default=1.0))
        try:
            body = decode_json(resp.content, max_bytes=MAX_PARSE_BYTES)
        except SkipFrame:
            body = None
        if not isinstance(body, dict):
            raise ApiError(method, f"http_{resp.status_code}" if resp.status_code != 200
                           else "bad_response")
        if body.get("ok") is True:
            return body
        error = body.get("error")
        raise ApiError(method, error[:80] if isinstance(error, str) and error
                       else f"http_{resp.status_code}")

    def _connection_error(self, e: ApiError, which: str) -> PlatformError:
        if e.error in FATAL_ERRORS:
            return FatalPlatformError(f"Slack refused the {which} token ({e.method}: {e.error})")
        if e.error == "ratelimited":
            return ConnectionLost("rate_limited", e.method, retry_after=e.retry_after)
        return ConnectionLost("network" if e.error == "network" else "api_error", str(e))

    def _auth_test(self) -> dict:
        try:
            me = self._call("auth.test")
        except ApiError as e:
            raise self._connection_error(e, "bot") from None
        user_id = me.get("user_id")
        if not _ident(user_id):
            raise ConnectionLost("bad_response", "auth.test answered without user_id")
        return me

    def _open_url(self) -> str:
        try:
            answer = self._call("apps.connections.open", app=True)
        except ApiError as e:
            raise self._connection_error(e, "app-level") from None
        url = answer.get("url")
        if not isinstance(url, str) or not url.startswith(("wss://", "ws://")):
            raise ConnectionLost("bad_response", "apps.connections.open answered without a url")
        return url

    # -- connection (WebSocketAdapter hooks) ---------------------------------------------------
    @classmethod
    def check(cls, config, *, full: bool = False) -> str:
        """auth.test and apps.connections.open (a URL is issued, never used); `full` also
        connects and waits for hello."""
        if full:
            return cls.check_session(config)
        adapter = cls(config, lambda msg: Delivery.REFUSED)
        me = adapter._auth_test()
        adapter._open_url()
        return (f"credentials accepted; bot {str(me.get('user'))[:80]} ({me['user_id']}) "
                f"team {str(me.get('team'))[:80]}; socket URL issued")

    def prepare(self) -> str:
        if self._me is None:
            me = self._auth_test()
            self._me = me
            self._mention = re.compile(rf"<@{re.escape(me['user_id'])}(\|[^>]*)?>\s*")
            self.log.info("authenticated platform=slack bot=%s user=%s bot_id=%s team=%s",
                          self.bot_id, me["user_id"], me.get("bot_id"), me.get("team_id"))
        return self._open_url()

    def on_frame(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            return self._skip("binary", f"bytes={len(data)}")
        if len(data) > MAX_PARSE_BYTES:
            found = _ENVELOPE_ID.search(data[:65536])
            if found:
                self._ack(found.group(1))
            return self._skip("too_large", f"chars={len(data)} acked={bool(found)}")
        try:
            frame = decode_json(data)
        except SkipFrame as e:
            return self._skip("bad_json", str(e))
        if not isinstance(frame, dict):
            return self._skip("not_an_object", type(frame).__name__)
        kind = frame.get("type")
        if kind == "hello":
            return self._on_hello(frame)
        if kind == "disconnect":
            return self._on_disconnect_notice(frame)
        envelope_id = frame.get("envelope_id")
        if not _ident(envelope_id, 200):
            return self._skip("no_envelope_id", f"type={str(kind)[:40]}")
        if kind == "events_api":
            ack = self._on_event(frame)
        else:  # slash_commands, interactive, anything new: not ours, but Slack wants the ack
            self._skip("envelope_type", f"type={str(kind)[:40]}")
            ack = True
        if ack:
            self._ack(envelope_id)

    def _ack(self, envelope_id: str) -> None:
        self.send_frame(json.dumps({"envelope_id": envelope_id}))

    def _skip(self, reason: str, detail: str = "") -> None:
        self.log.info("frame skipped platform=slack bot=%s reason=%s %s", self.bot_id, reason,
                      detail)

    def _on_hello(self, frame: dict) -> None:
        debug = frame.get("debug_info") if isinstance(frame.get("debug_info"), dict) else {}
        self.hello = {"num_connections": frame.get("num_connections"),
                      "approximate_connection_time": debug.get("approximate_connection_time"),
                      "host": str(debug.get("host"))[:80]}
        self.log.info("hello platform=slack bot=%s num_connections=%s host=%s "
                      "approximate_connection_time_s=%s", self.bot_id,
                      self.hello["num_connections"], self.hello["host"],
                      self.hello["approximate_connection_time"])
        self.mark_ready()  # on a successor connection: the handover happens here

    def _on_disconnect_notice(self, frame: dict) -> None:
        reason = str(frame.get("reason"))[:40]
        self.log.info("disconnect notice platform=slack bot=%s reason=%s", self.bot_id, reason)
        if reason == "link_disabled":
            self.log.error("Socket Mode is turned off for this Slack app platform=slack bot=%s; "
                           "asking again in %.0fs", self.bot_id, LINK_DISABLED_RETRY_S)
            raise ConnectionLost("link_disabled", "Socket Mode turned off",
                                 retry_after=LINK_DISABLED_RETRY_S)
        # refresh_requested, warning, and reasons we do not know: slack_sdk reconnects on every
        # `disconnect`; we open the new connection before the old one goes.
        self.open_successor(reason)

    # -- inbound -------------------------------------------------------------------------------
    def _on_event(self, frame: dict) -> bool:
        """One events_api envelope; returns whether it may be acked."""
        payload = frame.get("payload")
        event = payload.get("event") if isinstance(payload, dict) else None
        if not isinstance(event, dict):
            self._skip("no_event")
            return True
        try:
            msg = self._normalize(event)
        except Exception as e:  # a poison event would fail the same way on every redelivery
            self.log.error("event skipped platform=slack bot=%s reason=normalize_error "
                           "error=%s: %s", self.bot_id, type(e).__name__, str(e)[:200])
            return True
        if msg is None:
            return True
        outcome = self.deliver(msg)
        self.log.info("inbound platform=slack bot=%s chat=%s msg=%s kind=%s outcome=%s "
                      "retry_attempt=%s", self.bot_id, msg.chat_id, msg.message_id,
                      event.get("type"), outcome.value, frame.get("retry_attempt"))
        return outcome.ack

    def _normalize(self, event: dict) -> InboundMessage | None:
        kind, subtype = event.get("type"), event.get("subtype")
        where = f"type={str(kind)[:40]} subtype={str(subtype)[:40]}"
        if kind not in ("message", "app_mention"):
            return self._skip("event_type", where)
        if subtype is not None and subtype not in ANSWERED_SUBTYPES:
            return self._skip("subtype", where)  # edits, deletes, joins, bot_message...
        user, channel, ts = event.get("user"), event.get("channel"), event.get("ts")
        if event.get("bot_id") or (self._me and user == self._me["user_id"]):
            return self._skip("from_bot", where)
        if not (_ident(user) and _ident(channel) and _ident(ts)):
            return self._skip("missing_ids", where)
        channel_type = event.get("channel_type")
        if kind == "message" and channel_type != "im":
            return self._skip("not_a_dm", f"{where} channel_type={str(channel_type)[:20]}")
        text = event.get("text") if isinstance(event.get("text"), str) else ""
        if len(text) > MAX_INBOUND_CHARS:
            return self._skip("too_long", f"chars={len(text)}")
        if kind == "app_mention" and self._mention is not None:
            text = self._mention.sub("", text)
        text = _utf8_safe(text).strip()
        attachments = _attachments(event.get("files"))
        if not text and not attachments:
            return self._skip("no_text", where)
        thread_ts = event.get("thread_ts") if _ident(event.get("thread_ts")) else ts
        return InboundMessage(
            platform=self.name, message_id=f"{channel}:{ts}", chat_id=channel, user_id=user,
            text=text, chat_type="dm" if channel_type == "im" else "group",
            attachments=attachments,
            reply_ref={"channel": channel, "thread_ts": thread_ts, "ts": ts})

    # -- media ---------------------------------------------------------------------------------
    def media_source(self, att: Attachment, msg: InboundMessage) -> MediaSource:
        """url_private with the bot token (api.slack.com/types/file: "requires an
        Authorization header with a bot token"); the size Slack declared comes along."""
        if not att.ref.startswith(("https://", "http://")):
            raise MediaRefused("Slack did not give the bot a download link for this file")
        token = self.config.bot_token.get_secret_value()
        return MediaSource(att.ref, headers={"Authorization": f"Bearer {token}"},
                           size=att.size, mime=att.mime, name=att.name)

    def max_upload_bytes(self, media: str) -> int | None:
        return UPLOAD_LIMIT_BYTES

    def send_file(self, out: OutboundMessage) -> None:
        """getUploadURLExternal -> POST the bytes -> completeUploadExternal (in the thread)."""
        file = OutboundFile.from_row(out.file)
        ref = out.reply_ref if isinstance(out.reply_ref, dict) else {}
        channel = ref.get("channel") if _ident(ref.get("channel")) else out.chat_id
        thread_ts = ref.get("thread_ts")
        if not _ident(channel) or not _ident(thread_ts):
            raise SendError("reply_ref lacks channel/thread_ts", retryable=False)
        try:
            data = read_file(file.path, UPLOAD_LIMIT_BYTES)
        except (OSError, ValueError) as e:
            raise SendError(f"file unusable: {type(e).__name__}", retryable=False) from None
        try:
            ticket = self._call("files.getUploadURLExternal",
                                {"filename": file.name, "length": str(len(data))}, form=True)
        except ApiError as e:
            raise self._send_error(e, out) from None
        upload_url, file_id = ticket.get("upload_url"), ticket.get("file_id")
        if not (isinstance(upload_url, str) and upload_url.startswith(("https://", "http://"))
                and _ident(file_id)):
            raise SendError("files.getUploadURLExternal answered without upload_url/file_id")
        self._upload_bytes(upload_url, file, data)
        args = {"files": json.dumps([{"id": file_id, "title": file.name}]),
                "channel_id": channel, "thread_ts": thread_ts}
        caption = (out.text or file.caption).strip()
        if caption:
            args["initial_comment"] = caption[:REPLY_CHUNK_CHARS]
        try:
            self._call("files.completeUploadExternal", args, form=True)
        except ApiError as e:
            raise self._send_error(e, out) from None
        self.log.info("file sent platform=slack bot=%s chat=%s msg=%s bytes=%d media=%s",
                      self.bot_id, channel, out.in_reply_to, len(data), file.media)

    def _upload_bytes(self, url: str, file: OutboundFile, data: bytes) -> None:
        """The file's bytes to the upload URL Slack issued (slack_sdk `_upload_file` posts
        them as the body; no token: the URL is signed). Errors never carry the URL."""
        try:
            resp = self._http.post(url, data=data,
                                   headers={"Content-Type": "application/octet-stream"},
                                   timeout=(5.0, UPLOAD_TIMEOUT_S))
        except rest.RequestException as e:
            raise SendError(f"file upload failed: {type(e).__name__}") from None
        if resp.status_code != 200:
            raise SendError(f"file upload refused: HTTP {resp.status_code}",
                            retryable=resp.status_code >= 500 or resp.status_code == 429,
                            retry_after=retry_after_s(resp.headers) if resp.status_code == 429
                            else None)

    # -- outbound ------------------------------------------------------------------------------
    def reply_chunk_chars(self) -> int:
        return REPLY_CHUNK_CHARS

    def send(self, out: OutboundMessage) -> None:
        ref = out.reply_ref if isinstance(out.reply_ref, dict) else {}
        channel = ref.get("channel") if _ident(ref.get("channel")) else out.chat_id
        thread_ts, ts = ref.get("thread_ts"), ref.get("ts")
        if not _ident(channel) or not _ident(thread_ts):
            raise SendError("reply_ref lacks channel/thread_ts", retryable=False)
        text = out.text
        if not text.strip():
            self.log.info("empty reply part skipped platform=slack chat=%s seq=%d", channel,
                          out.seq)
            return
        draft = self._drafts.get((channel, ts)) if _ident(ts) and out.seq == 0 else None
        if draft is not None:
            with draft.lock:  # after a progress post/update that is on its way
                draft.finished = True
                if draft.ts is not None and self._update_final(draft, text, out):
                    self._drafts.pop((channel, ts), None)
                    return
                self._drafts.pop((channel, ts), None)
        try:
            self._call("chat.postMessage", {"channel": channel, "text": text,
                                            "thread_ts": thread_ts})
        except ApiError as e:
            raise self._send_error(e, out) from None

    def _update_final(self, draft: _Draft, text: str, out: OutboundMessage) -> bool:
        """Put the answer's first part into the progress message; False: post it instead."""
        try:
            self._call("chat.update", {"channel": draft.channel, "ts": draft.ts, "text": text})
            return True
        except ApiError as e:
            if e.error in ("message_not_found", "cant_update_message"):
                return False  # deleted meanwhile: a new message carries the answer
            raise self._send_error(e, out) from None  # the draft stays: the retry updates

    def _send_error(self, e: ApiError, out: OutboundMessage) -> SendError:
        if e.error in FATAL_ERRORS - {"missing_scope", "no_permission"}:
            # The bot token stopped working: this bot stops; the reply stays in the outbox.
            self.fail(FatalPlatformError(f"Slack refused the bot token ({e.method}: {e.error})"))
            return SendError(str(e), retryable=True)
        retryable = e.error not in PERMANENT_SEND_ERRORS
        self.log.warning("reply failed platform=slack bot=%s chat=%s msg=%s seq=%d "
                         "retryable=%s error=%s", self.bot_id, out.chat_id, out.in_reply_to,
                         out.seq, retryable, e)
        return SendError(str(e), retryable=retryable, retry_after=e.retry_after)

    # -- progress ------------------------------------------------------------------------------
    def progress(self, reply_ref: dict, text_so_far: str) -> None:
        ref = reply_ref if isinstance(reply_ref, dict) else {}
        channel, thread_ts, ts = ref.get("channel"), ref.get("thread_ts"), ref.get("ts")
        if not (_ident(channel) and _ident(thread_ts) and _ident(ts)) or not self.ready.is_set():
            return
        draft = self._drafts.get((channel, ts))
        if draft is None:
            draft = self._drafts[(channel, ts)] = _Draft(channel, thread_ts)
            while len(self._drafts) > MAX_DRAFTS:
                self._drafts.popitem(last=False)[1].finished = True
        shown = (text_so_far or "").strip()[:REPLY_CHUNK_CHARS]
        now = time.monotonic()
        if (draft.finished or not shown or shown == draft.shown or draft.updating
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
                if draft.ts is None:
                    answer = self._call("chat.postMessage", {"channel": draft.channel,
                                                             "text": text,
                                                             "thread_ts": draft.thread_ts})
                    draft.ts = answer.get("ts") if _ident(answer.get("ts")) else None
                else:
                    self._call("chat.update", {"channel": draft.channel, "ts": draft.ts,
                                               "text": text})
                draft.shown = text
        except ApiError as e:
            if e.retry_after:
                draft.last_update = time.monotonic() + e.retry_after  # nothing until then
            self.log.info("progress not shown platform=slack bot=%s chat=%s error=%s",
                          self.bot_id, draft.channel, e)
        finally:
            draft.updating = False


def _ident(value: Any, limit: int = MAX_ID_CHARS) -> bool:
    """A usable id: a non-empty string of sane length."""
    return isinstance(value, str) and 0 < len(value) <= limit and value.strip() == value


def _utf8_safe(text: str) -> str:
    """JSON may carry lone surrogates ("\\ud800"): the store could not encode them, and an
    event that can never be journaled would come back on every redelivery."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace").decode("utf-8")


def _attachments(files: Any) -> tuple[Attachment, ...]:
    """Shared files, described (url_private needs the bot token to fetch; never fetched here:
    the gateway's media module does, through `media_source`). A file without url_private
    (Slack Connect's `file_access: check_file_info`) keeps its id and is refused there."""
    found = []
    for f in files[:20] if isinstance(files, list) else ():
        if not isinstance(f, dict):
            continue
        ref = f.get("url_private") or f.get("id")
        if not isinstance(ref, str) or not ref:
            continue
        mime = f.get("mimetype") if isinstance(f.get("mimetype"), str) else ""
        kind = ("image" if mime.startswith("image/") else "voice" if mime.startswith("audio/")
                else "video" if mime.startswith("video/") else "file")
        name, size = f.get("name"), f.get("size")
        found.append(Attachment(kind, _utf8_safe(ref[:1000]),
                                _utf8_safe(name[:200]) if isinstance(name, str) else None,
                                mime=_utf8_safe(mime[:100]) or None,
                                size=size if isinstance(size, int) and not isinstance(size, bool)
                                and size >= 0 else None))
    return tuple(found)


PLATFORM = PlatformSpec(name="slack", config=SlackConfig, adapter="SlackAdapter",
                        fake="hermes_green.testing.fake_slack:FakeSlackServer")
