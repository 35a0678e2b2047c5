"""DingTalk (钉钉) Stream mode: bot messages over the stream WebSocket, replies over HTTP.

The protocol, as this module speaks it (shared/PROTOCOLS.md, "Slack and DingTalk"; the stream
protocol as the open-dingtalk developerpedia `docs/learn/stream/protocol.md` describes it, and the
official SDKs dingtalk-stream-sdk-python `dingtalk_stream/{stream,frames,handlers,chatbot}.py`,
-go `client/client.go`, -java `DefaultSessionPool.java`):

    prepare()      POST {api_base}/v1.0/gateway/connections/open {clientId, clientSecret,
                   subscriptions: [{type: CALLBACK, topic: /v1.0/im/bot/messages/get}], ua}
                   -> {endpoint, ticket}; a ticket opens ONE connection and lives 90 s, so every
                   connect asks for a fresh one. 401 and other refusals of the credentials are
                   fatal for this bot; 429, 5xx and network errors are retried with backoff.
    connect        {endpoint}?ticket={ticket}; the server checks the ticket at the handshake,
                   so the session is up once the socket is (there is no hello frame).
    keepalive      WebSocket pings every `ping_interval_s` (as every SDK does: Python 60 s,
                   Java 60 s idle, Go 120 s idle, Node 8 s); two unanswered -> zombie. The
                   server's own SYSTEM `ping` frames are answered at once; when none (nor any
                   other data frame) came for `server_silence_s`, the link is a zombie too.
    frames         {specVersion, type: SYSTEM|EVENT|CALLBACK, headers {messageId, topic,
                   contentType, time, ...}, data: "<JSON text>"}, answered with
                   {code, headers {contentType, messageId}, message, data: "<JSON text>"}.
      SYSTEM ping        answered with the same data (its `opaque`), code 200
      SYSTEM disconnect  the server closes the socket ~10 s later and sends nothing meanwhile:
                         answered (when it has a messageId, as the Go SDK does) and left at once;
                         the base reconnects immediately with a fresh ticket
      CALLBACK bot msg   journaled, then answered {"response": null}. Bot messages are
                         fire-and-forget (never re-sent, developerpedia FAQ), so a store failure
                         is the kit's HOLD case: kept in memory and journaled later; acked now
      EVENT              not subscribed; one that comes anyway is answered {status: SUCCESS}
                         (unanswered events are re-sent, and may come twice even when answered)
      anything else      logged and skipped; answered 404 ("topic not supported", the protocol's
                         reserved code) when it carries a messageId
    send(out)      markdown through the message's `sessionWebhook` while it is valid (until
                   `sessionWebhookExpiredTime`, ms, minus a margin); after that, or when the
                   webhook answers errcode 300001 (session gone) or 130101 (too fast), through
                   the robot OpenAPI with an access token (POST /v1.0/oauth2/accessToken,
                   cached, renewed early, renewed once when refused): /v1.0/robot/oToMessages/
                   batchSend (single chat, by the sender's staff id) or /v1.0/robot/
                   groupMessages/send (group, by conversationId), msgKey sampleMarkdown.
    media in       picture / file / audio / video messages (and pictures in richText) carry a
                   `downloadCode` (dingtalk_stream chatbot.py: ImageContent / RichTextContent
                   `downloadCode`, `get_image_download_url` there). `media_source` trades it for
                   a short-lived URL: POST {api_base}/v1.0/robot/messageFiles/download
                   {downloadCode, robotCode} with the access token -> {downloadUrl}
                   (open.dingtalk.com/document/orgapp/download-the-file-content-of-the-robot-
                   receiving-message); the URL itself needs no token. An audio message's
                   `recognition` is DingTalk's own transcript: it rides on the voice attachment
                   (no audio is fetched then), and the gateway shows it as the message's text.
    send_file      upload: POST {oapi_base}/media/upload?access_token=&type=image|file, the file
                   as multipart part `media` -> {errcode 0, media_id} (the classic oapi media
                   API; that the new OpenAPI access token is accepted there is *unverified*, it
                   is the same app's token); then the robot OpenAPI as for text, msgKey
                   sampleImageMsg {photoURL: media_id} or sampleFile {mediaId, fileName,
                   fileType} (the robot message templates; photoURL taking a media id is
                   *unverified*). The session webhook takes no files, so files always go
                   through the OpenAPI.

Facts not verified against the live platform are marked *unverified*.
"""
from __future__ import annotations

import json
import math
import platform as _platform
import time
from typing import Any, Callable
from urllib.parse import quote_plus

from .. import rest
from pydantic import Field, SecretStr

from .. import __version__
from ..models import Attachment, InboundMessage, OutboundMessage
from .base import ConnectionLost, FatalPlatformError, JournalFailure, SendError
from .botconfig import BotConfig
from .kit import CachedToken, SkipFrame, TokenRefused, decode_json, http_session, \
    retry_after_s, with_token_renewal
from .media import MediaRefused, MediaSource, OutboundFile, read_file
from .registry import PlatformSpec
from .transports.websocket import Keepalive, WebSocketAdapter

OPEN_PATH = "/v1.0/gateway/connections/open"
TOKEN_PATH = "/v1.0/oauth2/accessToken"
OTO_PATH = "/v1.0/robot/oToMessages/batchSend"
GROUP_PATH = "/v1.0/robot/groupMessages/send"
BOT_TOPIC = "/v1.0/im/bot/messages/get"
DOWNLOAD_PATH = "/v1.0/robot/messageFiles/download"
UPLOAD_PATH = "/media/upload"  # on oapi_base
# media/upload limits (open.dingtalk.com "上传媒体文件": image 20 MB, file 20 MB, voice 2 MB,
# video 20 MB in the current page; older pages said image 1 MB / file 10 MB) *unverified*.
UPLOAD_LIMITS = {"image": 20 * 1024 * 1024, "file": 20 * 1024 * 1024,
                 "voice": 2 * 1024 * 1024, "video": 20 * 1024 * 1024}
# oapi errcodes for a bad / expired access token (40014 invalid, 42001 expired) *unverified*.
OAPI_TOKEN_ERRCODES = frozenset({40014, 42001})
UPLOAD_TIMEOUT = (5.0, 120.0)

TYPE_SYSTEM, TYPE_EVENT, TYPE_CALLBACK = "SYSTEM", "EVENT", "CALLBACK"
TOPIC_PING, TOPIC_DISCONNECT = "ping", "disconnect"
CONTENT_JSON = "application/json"
SINGLE_CHAT, GROUP_CHAT = "1", "2"

# Session webhook answers (HTTP 200 with an errcode). 300001 "session 不存在": the webhook expired
# (seen in the wild: agentscope-ai/agentscope#1317); 130101 "send too fast" is the robot
# webhooks' 20-per-minute limit; 460101 "body 大小不合法 ... 20000bytes" (feiyu563/PrometheusAlert
# #318). Both of the first two mean "not delivered": the OpenAPI takes the reply instead.
WEBHOOK_GONE = 300001
WEBHOOK_TOO_FAST = 130101
WEBHOOK_TOO_LARGE = 460101
WEBHOOK_MARGIN_S = 60.0  # a webhook this close to its expiry is not used (clock skew, latency)
# The robot webhooks take at most 20,000 bytes of body (errcode 460101 above). 3,000 characters
# of text stay under it even if every character were a 6-byte JSON escape, and under the ~3,500
# characters past which DingTalk stops rendering markdown (agentscope-ai/QwenPaw#3742).
REPLY_CHUNK_CHARS = 3000
TITLE_CHARS = 20  # the markdown `title` shows in notifications and the chat list

# The new OpenAPI (api.dingtalk.com) refuses a bad token with HTTP 401, or with HTTP 400 and
# code InvalidAuthentication (satorijs/satori#240); throttling comes as 429 or as a 403 whose
# code names a QPS limit (DingTalk-Real-AI/dingtalk-openclaw-connector#410) *unverified codes*.
TOKEN_REFUSED_CODES = frozenset({"InvalidAuthentication", "InvalidAccessToken"})
REST_TIMEOUT = (5.0, 15.0)  # (connect, read) seconds
TOKEN_RENEW_MAX_S = 300.0  # the Python SDK renews 5 minutes before expiry
MAX_ID_CHARS = 512
MAX_ATTACHMENTS = 20


def _ids(value: Any) -> str:
    """`value` when it is a usable identifier, else ""."""
    if isinstance(value, str) and value.strip() and len(value) <= MAX_ID_CHARS:
        return value
    return ""


def _json_body(resp: rest.Response) -> dict:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _throttled(status: int, body: dict) -> bool:
    code = str(body.get("code", ""))
    return status == 429 or (status == 403 and ("QpsLimit" in code or "Throttl" in code))


def markdown_title(text: str) -> str:
    """A short title from the reply's first non-empty line, markdown marks stripped."""
    for line in text.splitlines():
        line = line.strip().lstrip("#>*-+` \t").strip()
        if line:
            return line[:TITLE_CHARS]
    return "reply"


class Skip(Exception):
    """This bot message is deliberately not delivered (the reason is logged); it is acked."""


class AccessToken(CachedToken):
    """The app's OpenAPI access token: POST /v1.0/oauth2/accessToken {appKey, appSecret} ->
    {accessToken, expireIn (s)}; renewed min(5 min, a quarter of its life) before expiry.
    `get()` raises FatalPlatformError for credentials refused, ConnectionLost otherwise."""

    def __init__(self, http: rest.Session, url: str, client_id: str, secret: SecretStr, *,
                 clock: Callable[[], float], log) -> None:
        super().__init__(self._fetch_once, clock=clock,
                         renew_margin=lambda life: min(TOKEN_RENEW_MAX_S, life / 4))
        self._http, self._url, self._client_id, self._secret = http, url, client_id, secret
        self.log = log

    def _fetch_once(self) -> tuple[str, float]:
        try:
            resp = self._http.post(self._url, timeout=REST_TIMEOUT, json={
                "appKey": self._client_id, "appSecret": self._secret.get_secret_value()})
        except rest.RequestException as e:
            raise ConnectionLost("token_unreachable", type(e).__name__) from None
        body = _json_body(resp)
        token, life = body.get("accessToken"), body.get("expireIn")
        if resp.status_code == 200 and isinstance(token, str) and token:
            if isinstance(life, bool) or not isinstance(life, (int, float)) \
                    or not math.isfinite(life) or life <= 0:
                raise ConnectionLost("token_bad_answer", "expireIn is not a positive number")
            self.log.info("token fetched platform=dingtalk expires_in_s=%.0f", life)
            return token, float(life)
        detail = f"HTTP {resp.status_code} code {str(body.get('code'))[:80]}"
        if resp.status_code in (400, 401, 403) and not _throttled(resp.status_code, body):
            raise FatalPlatformError(f"dingtalk refused the credentials of client {self._client_id}"
                                     f" for a token: {detail}")
        raise ConnectionLost("token_failed", detail,
                             retry_after=retry_after_s(resp.headers))


class DingTalkConfig(BotConfig):
    client_id: str  # the app's ClientID (formerly AppKey)
    client_secret: SecretStr
    api_base: str = "https://api.dingtalk.com"
    oapi_base: str = "https://oapi.dingtalk.com"  # the classic API: media/upload
    robot_code: str = ""  # empty: the client_id, as the SDK uses it
    ping_interval_s: float = Field(30.0, gt=0)
    # No data frame (server ping, message) for this long: the link is a zombie. The server's
    # ping interval is not published; keep this well above it. *unverified*
    server_silence_s: float = Field(300.0, gt=0)


class DingTalkAdapter(WebSocketAdapter):
    """The DingTalk stream client plus webhook / OpenAPI replies; see the module docstring."""

    name = "dingtalk"
    # Bot messages are never re-sent: a journaling failure keeps the message in memory.
    on_journal_failure = JournalFailure.HOLD
    keepalive = Keepalive.PING
    max_unanswered_beats = 2
    session_timeout_s = None  # the ticket is checked at the handshake: up once connected

    def __init__(self, config, on_message, *, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, **kw) -> None:
        super().__init__(config, on_message, **kw)
        self.heartbeat_interval_s = config.ping_interval_s
        self.silence_timeout_s = config.server_silence_s  # data frames only (the kit's rule)
        self._api_base = config.api_base.rstrip("/")
        self._oapi_base = config.oapi_base.rstrip("/")
        self._robot_code = config.robot_code or config.client_id
        self._wall = wall_clock
        self._http = http_session()
        self._http.headers.update({"Accept": CONTENT_JSON, "User-Agent": _user_agent()})
        self.token = AccessToken(self._http, self._api_base + TOKEN_PATH, config.client_id,
                                 config.client_secret, clock=clock, log=self.log)

    @classmethod
    def check(cls, config, *, full: bool = False) -> str:
        """The stream credentials (a ticket, left unused) and the OpenAPI token."""
        if full:
            return cls.check_session(config)
        adapter = cls(config, lambda msg: False)
        url = adapter.prepare()
        adapter.token.get()
        return f"credentials accepted (stream ticket and OpenAPI token); gateway {url.split('?')[0]}"

    # -- before the socket ---------------------------------------------------------------------
    def prepare(self) -> str:
        body = {"clientId": self.config.client_id,
                "clientSecret": self.config.client_secret.get_secret_value(),
                "subscriptions": [{"type": TYPE_CALLBACK, "topic": BOT_TOPIC}],
                "ua": f"hermes-green/{__version__}"}
        try:
            resp = self._http.post(self._api_base + OPEN_PATH, json=body, timeout=REST_TIMEOUT)
        except rest.RequestException as e:
            raise ConnectionLost("open_unreachable", type(e).__name__) from None
        answer = _json_body(resp)
        status = resp.status_code
        if status == 200:
            endpoint, ticket = answer.get("endpoint"), answer.get("ticket")
            if not (isinstance(endpoint, str) and endpoint.startswith(("ws://", "wss://"))
                    and _ids(ticket)):
                raise ConnectionLost("open_bad_answer", "no endpoint/ticket in the answer")
            return f"{endpoint}?ticket={quote_plus(ticket)}"
        detail = f"HTTP {status} code {str(answer.get('code'))[:80]}"
        if status in (400, 401, 403, 404) and not _throttled(status, answer):
            raise FatalPlatformError(f"dingtalk refused the stream connection of client "
                                     f"{self.config.client_id}: {detail}")
        raise ConnectionLost("open_failed", detail, retry_after=retry_after_s(resp.headers))

    def on_open(self) -> None:
        self.mark_ready()

    # -- frames --------------------------------------------------------------------------------
    def on_frame(self, data: str | bytes) -> None:
        if isinstance(data, bytes):
            self.log.warning("frame skipped platform=dingtalk reason=binary bytes=%d", len(data))
            return
        try:
            frame = decode_json(data)
        except SkipFrame as e:
            self.log.warning("frame skipped platform=dingtalk reason=%s chars=%d", e, len(data))
            return
        if not isinstance(frame, dict):
            self.log.warning("frame skipped platform=dingtalk reason=not_an_object")
            return
        headers = frame.get("headers") if isinstance(frame.get("headers"), dict) else {}
        kind, topic = frame.get("type"), headers.get("topic")
        message_id = _ids(headers.get("messageId"))
        if kind == TYPE_SYSTEM:
            return self._on_system(topic, frame, message_id)
        if kind == TYPE_CALLBACK and topic == BOT_TOPIC:
            return self._on_bot_message(frame, message_id)
        if kind == TYPE_EVENT:
            self.log.info("event ignored platform=dingtalk topic=%.80r msg=%s", topic, message_id)
            return self._ack(message_id, json.dumps({"status": "SUCCESS", "message": "ignored"}))
        self.log.warning("frame skipped platform=dingtalk reason=unknown_type_or_topic "
                         "type=%.40r topic=%.80r msg=%s", kind, topic, message_id)
        self._ack(message_id, json.dumps({"response": None}), code=404,
                  message="topic not supported")

    def _ack(self, message_id: str, data: str, *, code: int = 200, message: str = "OK") -> None:
        """The answer to one push; pushes without a messageId cannot be answered."""
        if not message_id:
            return
        self.send_frame(json.dumps({"code": code, "headers": {"contentType": CONTENT_JSON,
                                                              "messageId": message_id},
                                    "message": message, "data": data}, ensure_ascii=False))

    def _on_system(self, topic: Any, frame: dict, message_id: str) -> None:
        data = frame.get("data") if isinstance(frame.get("data"), str) else ""
        if topic == TOPIC_PING:
            return self._ack(message_id, data)  # the same data: its `opaque`
        if topic == TOPIC_DISCONNECT:
            try:
                reason = decode_json(data).get("reason") if data else None
            except (SkipFrame, AttributeError):
                reason = None
            self.log.info("server disconnect platform=dingtalk reason=%.120r", reason)
            self._ack(message_id, data)
            raise ConnectionLost("server_disconnect", str(reason or "")[:120])
        self.log.info("system frame ignored platform=dingtalk topic=%.80r", topic)
        self._ack(message_id, data)  # the Python SDK answers every SYSTEM push with OK

    def _on_bot_message(self, frame: dict, message_id: str) -> None:
        data = frame.get("data")
        try:
            if not isinstance(data, str):
                raise SkipFrame("data is not a string")
            payload = decode_json(data, max_bytes=self.max_frame_bytes)
            msg = self._normalize(payload)
        except SkipFrame as e:
            self.log.warning("bot message skipped platform=dingtalk reason=bad_data(%s) msg=%s",
                             e, message_id)
            return self._ack(message_id, json.dumps({"response": None}), code=400,
                             message="bad data")
        except Skip as e:
            self.log.info("bot message skipped platform=dingtalk reason=%s msg=%s", e,
                          message_id)
            return self._ack(message_id, json.dumps({"response": None}))
        outcome = self.deliver(msg)  # a store failure: HELD, kept and journaled later
        self.log.info("inbound platform=dingtalk chat=%s msg=%s kind=%s outcome=%s "
                      "attachments=%d", msg.chat_id, msg.message_id, msg.chat_type,
                      outcome.value, len(msg.attachments))
        if outcome.ack:
            self._ack(message_id, json.dumps({"response": None}))

    def _normalize(self, d: Any) -> InboundMessage:
        """One bot message (the ChatbotMessage fields of dingtalk_stream/chatbot.py)."""
        if not isinstance(d, dict):
            raise Skip("not_an_object")
        msg_id, conv = _ids(d.get("msgId")), _ids(d.get("conversationId"))
        staff = _ids(d.get("senderStaffId"))
        user = staff or _ids(d.get("senderId"))
        kind = d.get("conversationType")
        if not (msg_id and conv and user):
            raise Skip("missing_ids")
        if kind not in (SINGLE_CHAT, GROUP_CHAT):
            raise Skip(f"unknown_conversation_type {str(kind)[:20]}")
        if kind == GROUP_CHAT and d.get("isInAtList") is False:
            raise Skip("group_without_mention")  # the server sends only @-messages anyway
        if _ids(d.get("chatbotUserId")) and d.get("chatbotUserId") == d.get("senderId"):
            raise Skip("own_message")
        text, attachments = _content(d)
        if not text and not attachments:
            raise Skip(f"empty msgtype={str(d.get('msgtype'))[:40]}")
        webhook = d.get("sessionWebhook")
        expires = d.get("sessionWebhookExpiredTime")
        ref: dict[str, Any] = {"conversation_type": kind, "conversation_id": conv,
                               "staff_id": staff or None}
        if (isinstance(webhook, str) and webhook.startswith(("https://", "http://"))
                and isinstance(expires, (int, float)) and not isinstance(expires, bool)
                and math.isfinite(expires) and abs(expires) < 1e15):
            ref["webhook"], ref["webhook_expires_ms"] = webhook, int(expires)
        return InboundMessage(platform=self.name, message_id=msg_id, chat_id=conv, user_id=user,
                              text=text, chat_type="dm" if kind == SINGLE_CHAT else "group",
                              attachments=tuple(attachments[:MAX_ATTACHMENTS]), reply_ref=ref)

    # -- replies -------------------------------------------------------------------------------
    def reply_chunk_chars(self) -> int:
        return REPLY_CHUNK_CHARS


    def _send_with_token(self, call, what: str) -> rest.Response:
        """`call(token)` through `with_token_renewal`, its failures as the outbox's SendErrors:
        unreachable and no token are retried later; a fresh token refused, or credentials
        refused for good, are not."""
        try:
            return with_token_renewal(self.token, call)
        except rest.RequestException as e:
            raise SendError(f"{what} unreachable: {type(e).__name__}") from None
        except TokenRefused:
            raise SendError(f"{what} refused a fresh access token", retryable=False) from None
        except ConnectionLost as e:
            raise SendError(f"no access token: {e}", retry_after=e.retry_after) from None
        except FatalPlatformError as e:
            raise SendError(str(e), retryable=False) from None

    def send(self, out: OutboundMessage) -> None:
        ref = out.reply_ref or {}
        webhook, expires_ms = ref.get("webhook"), ref.get("webhook_expires_ms")
        markdown = {"title": markdown_title(out.text), "text": out.text}
        if (isinstance(webhook, str) and isinstance(expires_ms, (int, float))
                and self._wall() * 1000 < expires_ms - WEBHOOK_MARGIN_S * 1000):
            if self._send_webhook(webhook, markdown, out):
                return
        self._send_openapi(ref, "sampleMarkdown", markdown, out)

    def _send_webhook(self, url: str, markdown: dict, out: OutboundMessage) -> bool:
        """True: delivered. False: the webhook refused it without delivering (gone, throttled):
        the OpenAPI should take it. Raises SendError otherwise."""
        try:
            resp = self._http.post(url, timeout=REST_TIMEOUT, data=json.dumps(
                {"msgtype": "markdown", "markdown": markdown}, ensure_ascii=False).encode(),
                headers={"Content-Type": CONTENT_JSON})
        except rest.RequestException as e:
            raise SendError(f"session webhook unreachable: {type(e).__name__}") from None
        body = _json_body(resp)
        errcode = body.get("errcode")
        if resp.status_code == 200 and errcode == 0:
            return True
        detail = f"HTTP {resp.status_code} errcode {str(errcode)[:20]}"
        if errcode in (WEBHOOK_GONE, WEBHOOK_TOO_FAST):
            self.log.info("session webhook refused platform=dingtalk chat=%s msg=%s %s "
                          "then=openapi", out.chat_id, out.in_reply_to, detail)
            return False
        if resp.status_code >= 500 or resp.status_code == 429:
            raise SendError(f"session webhook failed ({detail})",
                            retry_after=retry_after_s(resp.headers))
        raise SendError(f"session webhook refused the reply ({detail})", retryable=False)

    def _send_openapi(self, ref: dict, msg_key: str, param: dict, out: OutboundMessage) -> None:
        kind, conv, staff = ref.get("conversation_type"), ref.get("conversation_id"), \
            ref.get("staff_id")
        body: dict[str, Any] = {"robotCode": self._robot_code, "msgKey": msg_key,
                                "msgParam": json.dumps(param, ensure_ascii=False)}
        if kind == GROUP_CHAT and _ids(conv):
            path, body["openConversationId"] = GROUP_PATH, conv
        elif kind == SINGLE_CHAT and _ids(staff):
            path, body["userIds"] = OTO_PATH, [staff]
        else:
            raise SendError("no valid session webhook and no staff id / conversation for the "
                            "OpenAPI", retryable=False)

        def call(token: str) -> rest.Response:
            resp = self._http.post(self._api_base + path, json=body, timeout=REST_TIMEOUT,
                                   headers={"x-acs-dingtalk-access-token": token})
            answer = _json_body(resp)
            if resp.status_code == 401 or answer.get("code") in TOKEN_REFUSED_CODES:
                self.log.warning("token refused platform=dingtalk call=robot_send "
                                 "action=renew_once")
                raise TokenRefused()
            return resp

        resp = self._send_with_token(call, "robot OpenAPI")
        answer = _json_body(resp)
        status = resp.status_code
        detail = f"HTTP {status} code {str(answer.get('code'))[:80]}"
        if status == 200:
            if staff and staff in (answer.get("flowControlledStaffIdList") or ()):
                raise SendError("robot OpenAPI flow-controlled the receiver", retry_after=60.0)
            if staff and staff in (answer.get("invalidStaffIdList") or ()):
                raise SendError("robot OpenAPI: the receiver's staff id is invalid",
                                retryable=False)
            return
        if _throttled(status, answer):
            raise SendError(f"robot OpenAPI throttled ({detail})",
                            retry_after=retry_after_s(resp.headers, default=1.0))
        if status >= 500:
            raise SendError(f"robot OpenAPI failed ({detail})")
        raise SendError(f"robot OpenAPI refused the reply ({detail})", retryable=False)


    # -- media ---------------------------------------------------------------------------------
    def media_source(self, att: Attachment, msg: InboundMessage) -> MediaSource:
        """downloadCode -> downloadUrl (robot messageFiles/download, with the access token)."""
        if not att.ref or att.ref.startswith(("https://", "http://")):
            raise MediaRefused("DingTalk sent no download code for this file")
        body = {"downloadCode": att.ref, "robotCode": self._robot_code}

        def call(token: str) -> rest.Response:
            resp = self._http.post(self._api_base + DOWNLOAD_PATH, json=body,
                                   timeout=REST_TIMEOUT,
                                   headers={"x-acs-dingtalk-access-token": token})
            if resp.status_code == 401 or \
                    _json_body(resp).get("code") in TOKEN_REFUSED_CODES:
                raise TokenRefused()
            return resp

        try:
            resp = with_token_renewal(self.token, call)
        except TokenRefused:
            raise MediaRefused("DingTalk refused the bot's access token for the download") \
                from None
        except (ConnectionLost, FatalPlatformError):
            raise MediaRefused("the bot has no DingTalk access token right now") from None
        answer = _json_body(resp)
        url = answer.get("downloadUrl")
        if resp.status_code != 200 or not isinstance(url, str) or \
                not url.startswith(("https://", "http://")):
            raise MediaRefused(f"DingTalk did not hand out the file (HTTP {resp.status_code} "
                               f"code {str(answer.get('code'))[:60]})")
        return MediaSource(url, size=att.size, mime=att.mime, name=att.name)

    def max_upload_bytes(self, media: str) -> int | None:
        return UPLOAD_LIMITS.get(media, UPLOAD_LIMITS["file"])

    def send_file(self, out: OutboundMessage) -> None:
        """media/upload, then a sampleImageMsg / sampleFile robot message (OpenAPI)."""
        file = OutboundFile.from_row(out.file)
        image = file.media == "image" and file.size <= UPLOAD_LIMITS["image"]
        kind = "image" if image else "file"
        try:
            data = read_file(file.path, UPLOAD_LIMITS[kind])
        except (OSError, ValueError) as e:
            raise SendError(f"file unusable: {type(e).__name__}", retryable=False) from None
        media_id = self._upload(kind, file, data)
        ext = file.name.rsplit(".", 1)[-1].lower() if "." in file.name else "file"
        if image:
            self._send_openapi(out.reply_ref or {}, "sampleImageMsg", {"photoURL": media_id}, out)
        else:
            self._send_openapi(out.reply_ref or {}, "sampleFile",
                               {"mediaId": media_id, "fileName": file.name, "fileType": ext},
                               out)
        self.log.info("file sent platform=dingtalk chat=%s msg=%s bytes=%d media=%s",
                      out.chat_id, out.in_reply_to, len(data), kind)

    def _upload(self, kind: str, file: OutboundFile, data: bytes) -> str:
        """POST oapi media/upload (multipart `media`) -> media_id. The token travels in the
        query string, as that API wants it: errors here never include the URL."""
        def call(token: str) -> rest.Response:
            resp = self._http.post(self._oapi_base + UPLOAD_PATH,
                                   params={"access_token": token, "type": kind},
                                   files={"media": (file.name, data, file.mime)},
                                   timeout=UPLOAD_TIMEOUT)
            if _json_body(resp).get("errcode") in OAPI_TOKEN_ERRCODES:
                raise TokenRefused()
            return resp

        resp = self._send_with_token(call, "media upload")
        answer = _json_body(resp)
        media_id = answer.get("media_id")
        if resp.status_code == 200 and answer.get("errcode") == 0 and _ids(media_id):
            return media_id
        detail = f"HTTP {resp.status_code} errcode {str(answer.get('errcode'))[:20]}"
        if resp.status_code >= 500 or resp.status_code == 429:
            raise SendError(f"media upload failed ({detail})",
                            retry_after=retry_after_s(resp.headers))
        raise SendError(f"media upload refused ({detail})", retryable=False)


def _content(d: dict) -> tuple[str, list[Attachment]]:
    """Text and attachments of one bot message by `msgtype` (developerpedia
    docs/learn/bot/message.md): text, richText, picture, audio (with its recognition), video,
    file. Files are referenced by `downloadCode` (POST /v1.0/robot/messageFiles/download)."""
    kind = d.get("msgtype")
    content = d.get("content") if isinstance(d.get("content"), dict) else {}
    if kind == "text":
        text = d.get("text").get("content") if isinstance(d.get("text"), dict) else None
        # group @-messages keep the space the mention left behind
        return (text.strip() if isinstance(text, str) else ""), []
    code = _ids(content.get("downloadCode"))
    if kind == "picture":
        return "", [Attachment("image", code)] if code else []
    if kind == "audio":
        # DingTalk's own speech recognition: the transcript of the voice attachment (the
        # gateway shows it as the message's words and fetches no audio); without a download
        # code the words alone remain.
        said = content.get("recognition")
        said = said.strip() if isinstance(said, str) and said.strip() else None
        if not code:
            return said or "", []
        return "", [Attachment("voice", code, transcript=said)]
    if kind == "video":
        return "", [Attachment("video", code)] if code else []
    if kind == "file":
        name = content.get("fileName")
        return "", [Attachment("file", code, name if isinstance(name, str) and name else None)] \
            if code else []
    if kind == "richText":
        texts, atts = [], []
        items = content.get("richText")
        for item in items if isinstance(items, list) else ():
            if not isinstance(item, dict):
                continue
            if isinstance(item.get("text"), str):
                texts.append(item["text"])
            elif _ids(item.get("downloadCode")):
                atts.append(Attachment("image" if item.get("type") == "picture" else "file",
                                       item["downloadCode"]))
        return "\n".join(t for t in (s.strip() for s in texts) if t), atts
    return "", []


def _user_agent() -> str:
    return f"hermes-green/{__version__} Python/{_platform.python_version()}"


PLATFORM = PlatformSpec(name="dingtalk", config=DingTalkConfig, adapter="DingTalkAdapter",
                        fake="hermes_green.testing.fake_dingtalk:FakeDingTalkServer")
