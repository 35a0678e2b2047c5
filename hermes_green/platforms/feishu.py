"""Feishu / Lark: event subscription over the long connection (shared/PROTOCOLS.md, "Feishu").

The protocol, as this module speaks it:

    prepare()       POST {domain}/callback/ws/endpoint {AppID, AppSecret} -> wss URL (device_id,
                    service_id, ticket) + ClientConfig {PingInterval, ...}; tenant token and the
                    bot's own open_id (to see group @-mentions) the first time
    heartbeat       a protobuf ping control frame right after connecting, then every
                    PingInterval s; the pong may carry a new ClientConfig: re-time the beat
    data frame      `type: event` (or `card`), split over `sum` frames joined by `message_id`;
                    journal the message (deliver() is synchronous), then ack at once with the
                    same frame + `biz_rt` and payload {"code": 200}. The agent runs later, in
                    another greenlet: an event not acked within ~3 s is delivered again.
    send(out)       POST /open-apis/im/v1/messages/{message_id}/reply with a `uuid` derived from
                    (message_id, seq): Feishu lets one uuid succeed once per hour, so an outbox
                    re-send after a crash or restart is not a second answer.

Media and progress (open.feishu.cn docs; lark-oapi's api/im/v1 and api/cardkit/v1 models for
the paths and fields):
    media in        GET /open-apis/im/v1/messages/{message_id}/resources/{file_key}?type=image|file
                    with the tenant token (image keys: type=image; file, audio and video keys:
                    type=file); stickers cannot be fetched by bots. No transcript is sent.
    send_file       POST /open-apis/im/v1/images (multipart image_type=message, image <= 10 MB)
                    -> image_key, or /open-apis/im/v1/files (file_type opus|mp4|pdf|doc|xls|
                    ppt|stream, file_name, file <= 30 MB) -> file_key; then the reply with
                    msg_type image|file and the part's uuid, as for text.
    progress        a streaming card (CardKit, cardkit-v1 streaming-updates-openapi-overview):
                    POST /open-apis/cardkit/v1/cards {type: card_json, data: JSON 2.0 card with
                    config.streaming_mode true and one markdown element} -> card_id; the card
                    is sent once, as the reply (msg_type interactive, content {"type": "card",
                    "data": {"card_id"}}); then PUT .../cards/{id}/elements/{element}/content
                    {content: the full text so far, sequence} at most every
                    `card_update_interval_s`; `sequence` strictly increases over every
                    operation on the card (300317 otherwise), so it is kept in saved_state with
                    the card id and a restart continues it. The outbox's first part finishes
                    the card: the exact final text, then PATCH .../cards/{id}/settings
                    {settings: {"config": {"streaming_mode": false}}, sequence}. The final text
                    goes out once, through the outbox, whatever happened to the updates: a card
                    that cannot be finished (expired, streaming closed after 10 minutes) leaves
                    the answer to a plain reply.

Frames are decoded with the `Frame` class lark-oapi generates (lark_oapi/ws/pb/pbbp2_pb2.py), but
loaded without the SDK's package `__init__` (see `load_frame_class`): on this machine the full
`import lark_oapi` costs 3.4-4.6 s CPU and +167 MB RSS, the frame module alone 0.02-0.03 s and
+4 MB. The SDK's own WebSocket client (asyncio) is never used; REST goes through the kit's client
(hermes_green/rest.py).
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.machinery
import importlib.util
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, quote, urlparse

from .. import rest
import websocket

import gevent
import gevent.lock
from pydantic import Field, SecretStr

from ..models import Attachment, InboundMessage, OutboundMessage
from .base import ConnectionLost, FatalPlatformError, JournalFailure, PlatformError, SendError, State
from .botconfig import BotConfig
from .kit import CachedToken, http_session, spawn_owned
from .media import MediaRefused, MediaSource, OutboundFile, read_file
from .registry import PlatformSpec
from .transports.websocket import MAX_FRAME_BYTES, WebSocketAdapter

# --- the Frame class, without importing the SDK ----------------------------------------------

_PB_MODULE = "lark_oapi.ws.pb.pbbp2_pb2"


def _package(name: str, path: str):
    spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
    spec.submodule_search_locations = [path]
    return importlib.util.module_from_spec(spec)


def _load_pb_without_sdk():
    """Import lark-oapi's generated frame module (and the protobuf runtime it vendors under
    lark_oapi/ws/pb/google) with empty stand-ins for the `lark_oapi` and `lark_oapi.ws` packages,
    whose `__init__` files pull in the whole SDK. The stand-ins are removed afterwards, so a later
    real `import lark_oapi` runs normally and finds these very modules already loaded (one Frame
    class per process). `lark_oapi.ws.pb.google` stays a plain package: its real `__init__` only
    declares a namespace through pkg_resources (0.1 s and a deprecation warning)."""
    spec = importlib.util.find_spec("lark_oapi")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("lark_oapi is not installed")
    root = list(spec.submodule_search_locations)[0]
    temporary = {"lark_oapi": root, "lark_oapi.ws": os.path.join(root, "ws")}
    kept = {"lark_oapi.ws.pb.google": os.path.join(root, "ws", "pb", "google")}
    before = set(sys.modules)
    try:
        for name, path in (*temporary.items(), *kept.items()):
            sys.modules.setdefault(name, _package(name, path))
        return importlib.import_module(_PB_MODULE)
    except BaseException:
        for name in [n for n in sys.modules if n.startswith("lark_oapi") and n not in before]:
            del sys.modules[name]
        raise
    finally:
        for name in temporary:
            if name not in before:
                sys.modules.pop(name, None)


def load_frame_class() -> type:
    """lark-oapi's protobuf `Frame`: loaded cheaply, or through the normal (slow) import when the
    SDK is already imported or the cheap path fails on some other SDK layout."""
    module = sys.modules.get(_PB_MODULE)
    if module is None and "lark_oapi" not in sys.modules:
        try:
            module = _load_pb_without_sdk()
        except Exception:  # an SDK layout we do not know: the slow path still works
            module = None
    if module is None:
        module = importlib.import_module(_PB_MODULE)
    return module.Frame


Frame = load_frame_class()

# --- protocol constants ----------------------------------------------------------------------

ENDPOINT_PATH = "/callback/ws/endpoint"
TOKEN_PATH = "/open-apis/auth/v3/tenant_access_token/internal"
BOT_INFO_PATH = "/open-apis/bot/v3/info"
MESSAGES_PATH = "/open-apis/im/v1/messages"
IMAGES_PATH = "/open-apis/im/v1/images"
FILES_PATH = "/open-apis/im/v1/files"
CARDS_PATH = "/open-apis/cardkit/v1/cards"
CARD_ELEMENT = "answer"  # the markdown element the streamed text goes into
IMAGE_LIMIT = 10 * 1024 * 1024  # im/v1/images
FILE_LIMIT = 30 * 1024 * 1024  # im/v1/files
FILE_TYPES = {".pdf": "pdf", ".doc": "doc", ".docx": "doc", ".xls": "xls", ".xlsx": "xls",
              ".ppt": "ppt", ".pptx": "ppt", ".mp4": "mp4", ".opus": "opus"}  # else "stream"
CARD_GONE_CODES = frozenset({200740, 200750, 200850, 300309})  # unknown, expired, closed
CARD_STATE_PREFIX = "card:"

METHOD_CONTROL, METHOD_DATA = 0, 1
ACK_PAYLOAD = b'{"code": 200}'
RECEIVE_EVENT = "im.message.receive_v1"

ENDPOINT_RETRY_CODES = frozenset({1, 1000040343})  # busy, internal error: retry; others: fatal
HANDSHAKE_AUTH_FAILED = "514"
HANDSHAKE_FORBIDDEN = "403"
EXCEED_CONN_LIMIT = "1000040350"
AUTH_ERROR_CODES = frozenset({99991661, 99991663, 99991668})  # missing / invalid / expired token
RATE_LIMIT_CODES = frozenset({99991400, 230020})  # app-wide / per-chat frequency limits

DEFAULT_PING_INTERVAL_S = 120.0
MIN_PING_INTERVAL_S = 0.05  # a garbage ClientConfig must not make the beat spin
MAX_PING_INTERVAL_S = 3600.0
PART_TIMEOUT_S = 5.0  # the SDK drops parts of a split payload not completed within 5 s
MAX_PARTS = 64
TOKEN_REFRESH_MARGIN_S = 300.0  # refresh the tenant token this long before it expires
UUID_NAMESPACE = uuid.UUID("5b0c8a1e-7f3d-4e52-9a61-0c2f3e4d5a6b")  # our replies' uuids


# --- REST ------------------------------------------------------------------------------------

class ApiError(Exception):
    """A Feishu REST call failed. `retryable`: worth trying again later (network, 5xx, 429,
    busy); otherwise the request itself is refused. Messages carry no secrets."""

    def __init__(self, what: str, *, status: int | None = None, code: int | None = None,
                 msg: str = "", retry_after: float | None = None, retryable: bool = False):
        detail = " ".join(f"{k}={v}" for k, v in (("status", status), ("code", code))
                          if v is not None)
        super().__init__(f"{what} failed {detail} {msg[:160]}".strip())
        self.status, self.code = status, code
        self.retry_after, self.retryable = retry_after, retryable

    @property
    def auth_error(self) -> bool:
        return self.status == 401 or self.code in AUTH_ERROR_CODES


def _retry_after(resp: rest.Response) -> float | None:
    for header in ("Retry-After", "x-ogw-ratelimit-reset"):
        try:
            return max(0.0, float(resp.headers[header]))
        except (KeyError, ValueError):
            continue
    return None


class FeishuApi:
    """The REST calls we make, with the tenant token cached and refreshed early."""

    def __init__(self, domain: str, app_id: str, app_secret, *, timeout_s: float = 10.0,
                 clock=time.monotonic) -> None:
        self.domain = domain.rstrip("/")
        self.app_id = app_id
        self._secret = app_secret  # SecretStr: unwrapped only into request bodies
        self.timeout_s = timeout_s
        self.http = http_session()
        self.http.headers["User-Agent"] = "hermes-green"
        self._token = CachedToken(self._fetch_tenant_token, clock=clock,
                                  renew_margin=lambda expire: min(TOKEN_REFRESH_MARGIN_S,
                                                                  expire / 2))

    def call(self, method: str, path: str, *, body: dict | None = None, params: dict | None = None,
             auth: bool = True, what: str | None = None) -> dict:
        """One JSON call; with `auth`, a rejected token is refreshed and the call repeated once."""
        what = what or path
        for attempt in (1, 2):
            token = self.tenant_token() if auth else None
            headers = {"Authorization": f"Bearer {token}"} if auth else {}
            try:
                return self._request(method, path, body, params, headers, what)
            except ApiError as e:
                if not (auth and e.auth_error and attempt == 1):
                    raise
                self.invalidate_token(token)
        raise AssertionError("unreachable")

    def upload(self, path: str, fields: dict, files: dict, *, what: str) -> dict:
        """A multipart POST with the tenant token (refreshed once on a refused token)."""
        for attempt in (1, 2):
            token = self.tenant_token()
            try:
                return self._request("POST", path, None, None,
                                     {"Authorization": f"Bearer {token}"}, what,
                                     data=fields, files=files)
            except ApiError as e:
                if not (e.auth_error and attempt == 1):
                    raise
                self.invalidate_token(token)
        raise AssertionError("unreachable")

    def _request(self, method, path, body, params, headers, what, *, data=None,
                 files=None) -> dict:
        try:
            if files is not None:
                resp = self.http.request(method, self.domain + path, data=data, files=files,
                                         params=params, headers=headers,
                                         timeout=max(self.timeout_s, 60.0))
            else:
                resp = self.http.request(method, self.domain + path, json=body, params=params,
                                         headers=headers, timeout=self.timeout_s)
        except rest.RequestException as e:
            raise ApiError(what, msg=type(e).__name__, retryable=True) from None
        try:
            data = resp.json()
        except ValueError:
            data = None
        code = data.get("code") if isinstance(data, dict) else None
        if resp.status_code == 200 and code == 0:
            return data
        msg = str(data.get("msg", "")) if isinstance(data, dict) else ""
        retryable = (resp.status_code == 429 or resp.status_code >= 500
                     or code in RATE_LIMIT_CODES or code in ENDPOINT_RETRY_CODES)
        raise ApiError(what, status=resp.status_code, code=code if isinstance(code, int) else None,
                       msg=msg, retry_after=_retry_after(resp), retryable=retryable)

    # tenant token ------------------------------------------------------------------------------
    def tenant_token(self) -> str:
        return self._token.get()

    def _fetch_tenant_token(self) -> tuple[str, float]:
        data = self._request("POST", TOKEN_PATH, {"app_id": self.app_id,
                                                  "app_secret": self._secret.get_secret_value()},
                             None, {}, "tenant_access_token")
        token, expire = data.get("tenant_access_token"), data.get("expire")
        if not isinstance(token, str) or not token or not isinstance(expire, (int, float)):
            raise ApiError("tenant_access_token", msg="malformed answer", retryable=True)
        return token, float(expire)

    def invalidate_token(self, refused: str | None = None) -> None:
        self._token.invalidate(refused)

    # the calls -----------------------------------------------------------------------------
    def endpoint(self) -> dict:
        data = self._request("POST", ENDPOINT_PATH,
                             {"AppID": self.app_id, "AppSecret": self._secret.get_secret_value()},
                             None, {"locale": "zh"}, "endpoint")
        endpoint = data.get("data")
        if not isinstance(endpoint, dict) or not isinstance(endpoint.get("URL"), str):
            raise ApiError("endpoint", msg="no URL in the answer", retryable=True)
        return endpoint

    def bot_open_id(self) -> str:
        data = self.call("GET", BOT_INFO_PATH, what="bot_info")
        open_id = (data.get("bot") or {}).get("open_id")
        if not isinstance(open_id, str) or not open_id:
            raise ApiError("bot_info", msg="no bot.open_id in the answer")
        return open_id


# --- split payloads --------------------------------------------------------------------------

@dataclass
class _Parts:
    chunks: list
    size: int
    touched: float


class PartJoiner:
    """Joins a payload split over `sum` frames (by the frame header `message_id`, in `seq` order).
    Parts not completed within `timeout_s` of the last one are dropped; the server redelivers the
    whole event, since nothing was acked."""

    def __init__(self, timeout_s: float = PART_TIMEOUT_S, *, max_pending: int = 256,
                 max_bytes: int = MAX_FRAME_BYTES, clock=time.monotonic) -> None:
        self.timeout_s, self.max_pending, self.max_bytes = timeout_s, max_pending, max_bytes
        self._clock = clock
        self._pending: dict[str, _Parts] = {}

    def add(self, key: str, total: int, seq: int, data: bytes) -> bytes | None:
        """The joined payload once the last part is in, else None. ValueError: bad part."""
        if not key or not 1 < total <= MAX_PARTS or not 0 <= seq < total:
            raise ValueError(f"bad part sum={total} seq={seq}")
        now = self._clock()
        for k in [k for k, p in self._pending.items() if now - p.touched > self.timeout_s]:
            del self._pending[k]
        parts = self._pending.get(key)
        if parts is None or len(parts.chunks) != total:
            while len(self._pending) >= self.max_pending:
                del self._pending[next(iter(self._pending))]
            parts = self._pending[key] = _Parts([None] * total, 0, now)
        old = parts.chunks[seq]
        parts.size += len(data) - (len(old) if old is not None else 0)
        parts.chunks[seq], parts.touched = data, now
        if parts.size > self.max_bytes:
            del self._pending[key]
            raise ValueError(f"split payload over {self.max_bytes} bytes")
        if any(c is None for c in parts.chunks):
            return None
        del self._pending[key]
        return b"".join(parts.chunks)

    def clear(self) -> None:
        self._pending.clear()

    def __len__(self) -> int:
        return len(self._pending)


# --- events -> InboundMessage ----------------------------------------------------------------

class Skip(Exception):
    """This event is deliberately not delivered (the reason is logged); it is still acked."""


def _text_of(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _post_parts(content: dict) -> tuple[list[str], list[Attachment]]:
    """Text and attachments of a rich-text (`post`) message, either shape:
    {"title", "content": [[elements]]} or wrapped by language {"zh_cn": {...}}."""
    body = content
    if "content" not in body:
        body = next((v for v in content.values() if isinstance(v, dict)), {})
    texts = [_text_of(body.get("title"))]
    atts: list[Attachment] = []
    rows = body.get("content")
    for row in rows if isinstance(rows, list) else ():
        for el in row if isinstance(row, list) else ():
            if not isinstance(el, dict):
                continue
            tag = el.get("tag")
            if tag in ("text", "a", "code_block", "md"):
                texts.append(_text_of(el.get("text")))
            elif tag == "at":
                texts.append(_text_of(el.get("user_id")))  # "@_user_1": mentions fix it below
            elif tag == "img" and _text_of(el.get("image_key")):
                atts.append(Attachment("image", el["image_key"]))
            elif tag == "media" and _text_of(el.get("file_key")):
                name = _text_of(el.get("file_name")) or None
                atts.append(Attachment("video", el["file_key"], name))
    return [t for t in texts if t], atts


_KEYED_ATTACHMENTS = {  # message_type -> (Attachment kind, content key of the reference)
    "image": ("image", "image_key"),
    "file": ("file", "file_key"),
    "audio": ("voice", "file_key"),
    "media": ("video", "file_key"),
    "sticker": ("image", "file_key"),
}


def _content_parts(message_type: str, content: dict, message_id: str
                   ) -> tuple[str, list[Attachment]]:
    if message_type == "text":
        return _text_of(content.get("text")), []
    if message_type == "post":
        texts, atts = _post_parts(content)
        return " ".join(texts), atts
    if message_type in _KEYED_ATTACHMENTS:
        kind, key = _KEYED_ATTACHMENTS[message_type]
        ref = content.get(key)
        if not isinstance(ref, str) or not ref:
            raise Skip(f"no_{key}")
        name = _text_of(content.get("file_name")) or None
        if message_type == "sticker":
            name = name or "sticker"
        return "", [Attachment(kind, ref, name)]
    # interactive cards, shared chats/users, merge_forward, location, ...: described, not parsed
    return "", [Attachment("other", message_id, message_type[:40] or "unknown")]


def _apply_mentions(text: str, mentions: Any, bot_open_id: str | None) -> tuple[str, bool]:
    """Remove the bot's "@_user_N" placeholder, spell out the others as "@name"."""
    bot_mentioned = False
    for m in mentions if isinstance(mentions, list) else ():
        if not isinstance(m, dict) or not isinstance(m.get("key"), str) or not m["key"]:
            continue
        ids = m.get("id") if isinstance(m.get("id"), dict) else {}
        if bot_open_id and ids.get("open_id") == bot_open_id:
            bot_mentioned = True
            text = text.replace(m["key"], "")
        else:
            text = text.replace(m["key"], "@" + (_text_of(m.get("name")) or "user"))
    return " ".join(text.split()), bot_mentioned


def parse_message_event(event: Any, bot_open_id: str | None) -> InboundMessage:
    """`event` of an im.message.receive_v1 envelope -> InboundMessage, or raise Skip(reason).
    Group messages are taken only when they @-mention the bot; DMs always."""
    if not isinstance(event, dict) or not isinstance(event.get("message"), dict):
        raise Skip("no_message")
    msg = event["message"]
    sender = event.get("sender") if isinstance(event.get("sender"), dict) else {}
    sender_ids = sender.get("sender_id") if isinstance(sender.get("sender_id"), dict) else {}
    message_id, chat_id = msg.get("message_id"), msg.get("chat_id")
    user_id, message_type = sender_ids.get("open_id"), msg.get("message_type")
    for field_name, value in (("message_id", message_id), ("chat_id", chat_id),
                              ("open_id", user_id), ("message_type", message_type)):
        if not isinstance(value, str) or not value:
            raise Skip(f"no_{field_name}")
    if bot_open_id and user_id == bot_open_id:
        raise Skip("own_message")
    chat_type = "dm" if msg.get("chat_type") == "p2p" else "group"
    try:
        content = json.loads(msg.get("content") or "{}")
    except (TypeError, ValueError, RecursionError):
        raise Skip("bad_content") from None
    if not isinstance(content, dict):
        raise Skip("bad_content")
    text, attachments = _content_parts(message_type, content, message_id)
    text, bot_mentioned = _apply_mentions(text, msg.get("mentions"), bot_open_id)
    if chat_type == "group" and not bot_mentioned:
        raise Skip("group_without_mention")
    if not text and not attachments:
        raise Skip("empty")
    return InboundMessage(
        platform=FeishuAdapter.name, message_id=message_id, chat_id=chat_id, user_id=user_id,
        text=text, chat_type=chat_type, attachments=tuple(attachments),
        reply_ref={"message_id": message_id, "chat_id": chat_id, "chat_type": chat_type})


def reply_uuid(target: str, seq: int) -> str:
    """The same (message, part) always gets the same uuid (36 chars; Feishu allows 50)."""
    return str(uuid.uuid5(UUID_NAMESPACE, f"{target}:{seq}"))


def _idempotency_key(out: OutboundMessage, message_id: str | None) -> str | None:
    """What makes a re-send recognizable. A reply: the message answered (the gateway answers
    each inbound message in one batch, so (message_id, seq) names one part of one answer). A
    plain message: its outbox row, with the chat and text (SQLite may reuse a deleted row id);
    with no row there is no durable identity, so no uuid (Feishu would merge equal texts)."""
    if message_id:
        return str(message_id)
    if out.outbox_id is not None:
        digest = hashlib.sha1(out.text.encode("utf-8", "replace")).hexdigest()[:12]
        return f"chat:{out.chat_id}:outbox:{out.outbox_id}:{digest}"
    return None


def _headers(frame) -> dict[str, str]:
    return {h.key: h.value for h in frame.headers}


# --- the adapter -----------------------------------------------------------------------------

class FeishuConfig(BotConfig):
    app_id: str
    app_secret: SecretStr
    domain: str = "https://open.feishu.cn"
    # Progress as a streaming card (needs the app's cardkit:card:write permission; without it
    # the first refusal turns cards off for this bot and answers come as plain replies).
    streaming_card: bool = True
    card_update_interval_s: float = Field(0.5, ge=0.1)  # CardKit: at most 10 ops/s per card


@dataclass
class _Card:
    """The streaming card answering one message."""
    message_id: str
    lock: gevent.lock.Semaphore = field(default_factory=gevent.lock.Semaphore)
    card_id: str | None = None
    sequence: int = 0
    shown: str = ""
    text: str = ""
    last_update: float = float("-inf")
    done: bool = False
    worker: Any = None


class FeishuAdapter(WebSocketAdapter):
    # Events not acked within ~3 s are pushed again: a journal failure is simply not acked.
    on_journal_failure = JournalFailure.REDELIVER
    name = "feishu"
    first_beat_at_once = True  # the SDK pings as soon as the socket is up
    max_unanswered_beats = 2
    rest_timeout_s = 10.0
    part_timeout_s = PART_TIMEOUT_S

    def __init__(self, config, on_message, **kw) -> None:
        super().__init__(config, on_message, **kw)
        self.api = FeishuApi(config.domain, config.app_id, config.app_secret,
                             timeout_s=self.rest_timeout_s)
        self.parts = PartJoiner(self.part_timeout_s)
        self.bot_open_id: str | None = None
        self.client_config: dict[str, Any] = {}
        self.service_id = 0
        self.device_id = ""
        self._cards: dict[str, _Card] = {}
        self._cards_off = not config.streaming_card

    @classmethod
    def check(cls, config, *, full: bool = False) -> str:
        if full:
            return cls.check_session(config)
        adapter = cls(config, lambda msg: False)
        url = adapter.prepare()
        return (f"credentials accepted; bot open_id={adapter.bot_open_id}; "
                f"gateway {url.split('?')[0]}")

    # -- before the socket ----------------------------------------------------------------
    def prepare(self) -> str:
        self.api.timeout_s = self.rest_timeout_s
        try:
            endpoint = self.api.endpoint()
            if self.bot_open_id is None:
                self.bot_open_id = self.api.bot_open_id()
        except ApiError as e:
            if e.retryable:
                raise ConnectionLost("endpoint", str(e)) from None
            raise FatalPlatformError(f"feishu refused app {self.config.app_id}: {e}") from None
        url = endpoint["URL"]
        query = parse_qs(urlparse(url).query)
        try:
            self.service_id = int(query["service_id"][0])
            self.device_id = query.get("device_id", [""])[0]
            if not -2**31 <= self.service_id < 2**31:
                raise ValueError
        except (KeyError, ValueError):
            raise ConnectionLost("endpoint", "URL without a valid service_id") from None
        self.heartbeat_interval_s = None
        self._apply_client_config(endpoint.get("ClientConfig"))
        if self.heartbeat_interval_s is None:
            self.heartbeat_interval_s = DEFAULT_PING_INTERVAL_S
        self.log.info("endpoint ready platform=%s device=%s ping_interval_s=%g", self.name,
                      self.device_id, self.heartbeat_interval_s)
        return url

    def describe_handshake_error(self, exc: websocket.WebSocketBadStatusException) -> PlatformError:
        headers = {str(k).lower(): str(v) for k, v in (exc.resp_headers or {}).items()}
        status = headers.get("handshake-status", "")
        autherr = headers.get("handshake-autherrcode", "")
        detail = (f"HTTP {exc.status_code} handshake_status={status or '-'} "
                  f"autherrcode={autherr or '-'} msg={headers.get('handshake-msg', '')[:100]}")
        if status == HANDSHAKE_AUTH_FAILED and autherr == EXCEED_CONN_LIMIT:
            return ConnectionLost("too_many_connections", detail)
        if status == HANDSHAKE_FORBIDDEN:
            return FatalPlatformError(f"feishu refused the connection: {detail}")
        return ConnectionLost("handshake", detail)

    # -- keepalive ------------------------------------------------------------------------
    def heartbeat_frame(self) -> bytes:
        frame = Frame(SeqID=0, LogID=0, service=self.service_id, method=METHOD_CONTROL)
        frame.headers.add(key="type", value="ping")
        return frame.SerializeToString()

    def _apply_client_config(self, conf: Any) -> None:
        """Take a ClientConfig (endpoint answer or pong). Only PingInterval changes what we do;
        reconnect timing stays ours (immediate first retry, then jittered backoff)."""
        if not isinstance(conf, dict):
            return
        self.client_config = {k: conf[k] for k in ("PingInterval", "ReconnectCount",
                                                   "ReconnectInterval", "ReconnectNonce")
                              if k in conf}
        interval = conf.get("PingInterval")
        if isinstance(interval, bool) or not isinstance(interval, (int, float)):
            return
        try:
            interval = float(interval)
        except OverflowError:
            return
        if not math.isfinite(interval):  # json.loads takes NaN and Infinity
            return
        interval = min(max(interval, MIN_PING_INTERVAL_S), MAX_PING_INTERVAL_S)
        if interval == self.heartbeat_interval_s:
            return
        if self.heartbeat_running:
            self.log.info("ping interval changed platform=%s from_s=%g to_s=%g", self.name,
                          self.heartbeat_interval_s, interval)
            self.start_heartbeat(interval)
        else:
            self.heartbeat_interval_s = interval

    # -- frames ---------------------------------------------------------------------------
    def on_frame(self, data: str | bytes) -> None:
        if isinstance(data, str):
            self.log.warning("frame skipped platform=%s reason=text_frame chars=%d", self.name,
                             len(data))
            return
        frame = Frame()
        try:
            frame.ParseFromString(data)
            headers = _headers(frame)
            method = frame.method
            if not frame.IsInitialized():  # we could not echo it as an ack either
                raise ValueError("required fields missing")
        except Exception as e:  # the pure-Python protobuf raises assorted types on garbage
            self.log.warning("frame skipped platform=%s reason=bad_protobuf error=%s bytes=%d",
                             self.name, type(e).__name__, len(data))
            return
        if method == METHOD_CONTROL:
            self._on_control(frame, headers)
        elif method == METHOD_DATA:
            self._on_data(frame, headers)
        else:
            self.log.warning("frame skipped platform=%s reason=unknown_method method=%s",
                             self.name, method)

    def _alive(self) -> None:
        """The server answered on this connection: it is established."""
        if self.stats.state is not State.READY and self.connected:
            self.mark_ready()

    def _on_control(self, frame, headers: dict[str, str]) -> None:
        kind = headers.get("type")
        if kind != "pong":
            self.log.debug("control frame ignored platform=%s type=%s", self.name, kind)
            return
        self.beat_answered()
        self._alive()
        if frame.payload:
            try:
                conf = json.loads(frame.payload)
            except (ValueError, RecursionError):
                self.log.warning("pong skipped platform=%s reason=bad_client_config", self.name)
                return
            self._apply_client_config(conf)

    def _on_data(self, frame, headers: dict[str, str]) -> None:
        self._alive()
        received = time.monotonic()
        kind, frame_msg_id = headers.get("type", ""), headers.get("message_id", "")
        try:
            total, seq = int(headers.get("sum", "1")), int(headers.get("seq", "0"))
            payload = frame.payload
            if total != 1:
                payload = self.parts.add(frame_msg_id, total, seq, payload)
                if payload is None:
                    return  # more parts to come; acked once the message is whole
        except ValueError as e:
            self.log.warning("frame skipped platform=%s reason=bad_part frame_msg=%s error=%s",
                             self.name, frame_msg_id[:64], e)
            return
        if self._handle_payload(kind, payload, frame_msg_id):
            self._ack(frame, received)

    def _handle_payload(self, kind: str, payload: bytes, frame_msg_id: str) -> bool:
        """Journal what the payload carries. False: do not ack (the journal failed, so the
        server's redelivery is our retry); True: journaled, a duplicate, or deliberately skipped
        (acked, or the server would redeliver it forever)."""
        if kind != "event":
            self.log.info("data frame ignored platform=%s type=%s frame_msg=%s", self.name,
                          kind[:32], frame_msg_id[:64])
            return True
        try:
            envelope = json.loads(payload)
            if not isinstance(envelope, dict):
                raise ValueError("not an object")
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError too
            self.log.warning("event skipped platform=%s reason=bad_json frame_msg=%s error=%s",
                             self.name, frame_msg_id[:64], type(e).__name__)
            return True
        header = envelope.get("header") if isinstance(envelope.get("header"), dict) else {}
        event_type = header.get("event_type")
        if event_type != RECEIVE_EVENT:
            self.log.info("event ignored platform=%s event_type=%s", self.name,
                          str(event_type)[:64])
            return True
        try:
            msg = parse_message_event(envelope.get("event"), self.bot_open_id)
        except Skip as e:
            self.log.info("event skipped platform=%s reason=%s event_id=%s", self.name, e,
                          str(header.get("event_id"))[:64])
            return True
        outcome = self.deliver(msg)  # a journal failure: not acked, the server redelivers
        self.log.info("message in platform=%s chat=%s msg=%s outcome=%s", self.name, msg.chat_id,
                      msg.message_id, outcome.value)
        return outcome.ack

    def _ack(self, frame, received: float) -> None:
        """The frame back, with all its headers plus biz_rt (ms), payload {"code": 200}."""
        ack = Frame()
        ack.CopyFrom(frame)
        ack.headers.add(key="biz_rt", value=str(int((time.monotonic() - received) * 1000)))
        ack.payload = ACK_PAYLOAD
        try:
            data = ack.SerializeToString()
        except Exception as e:  # a frame missing required fields: nothing we can echo
            self.log.warning("ack skipped platform=%s reason=unserializable error=%s",
                             self.name, type(e).__name__)
            return
        self.send_frame(data)

    def on_disconnect(self, lost: ConnectionLost) -> None:
        self.parts.clear()  # unacked: the server sends the whole event again

    # -- media --------------------------------------------------------------------------------
    def media_source(self, att: Attachment, msg: InboundMessage) -> MediaSource:
        if att.kind == "other":
            raise MediaRefused("this kind of message has no file to fetch")
        if att.name == "sticker":
            raise MediaRefused("Feishu does not let bots download stickers")
        kind = "image" if att.kind == "image" else "file"
        token = self.api.tenant_token()
        path = (f"{self.config.domain.rstrip('/')}{MESSAGES_PATH}/"
                f"{quote(msg.message_id, safe='')}/resources/{quote(att.ref, safe='')}"
                f"?type={kind}")
        return MediaSource(path, headers={"Authorization": f"Bearer {token}"}, name=att.name,
                           mime=att.mime)

    def max_upload_bytes(self, media: str) -> int | None:
        return IMAGE_LIMIT if media == "image" else FILE_LIMIT

    def send_file(self, out: OutboundMessage) -> None:
        file = OutboundFile.from_row(out.file)
        try:
            data = read_file(file.path, FILE_LIMIT)
        except (OSError, ValueError) as e:
            raise SendError(f"file unusable: {type(e).__name__}", retryable=False) from None
        self.api.timeout_s = self.rest_timeout_s
        try:
            if file.media == "image" and len(data) <= IMAGE_LIMIT:
                answer = self.api.upload(IMAGES_PATH, {"image_type": "message"},
                                         {"image": (file.name, data, file.mime)}, what="image")
                msg_type, content = "image", {"image_key": answer["data"]["image_key"]}
            else:
                ext = os.path.splitext(file.name)[1].lower()
                answer = self.api.upload(FILES_PATH, {"file_type": FILE_TYPES.get(ext, "stream"),
                                                      "file_name": file.name},
                                         {"file": (file.name, data, file.mime)}, what="file")
                msg_type, content = "file", {"file_key": answer["data"]["file_key"]}
        except (KeyError, TypeError):
            raise SendError("upload answered without a key") from None
        except ApiError as e:
            raise SendError(str(e), retryable=e.retryable, retry_after=e.retry_after) from None
        self._post(out, msg_type, content, what="file")

    # -- progress: the streaming card ------------------------------------------------------
    def progress(self, reply_ref: dict, text_so_far: str) -> None:
        message_id = reply_ref.get("message_id") if isinstance(reply_ref, dict) else None
        if self._cards_off or not message_id or not self.ready.is_set():
            return
        text = (text_so_far or "").strip()[:self.reply_chunk_chars()]
        if not text:
            return
        card = self._cards.get(message_id)
        if card is None:
            card = self._cards[message_id] = _Card(message_id)
            while len(self._cards) > 512:
                self._cards.pop(next(iter(self._cards))).done = True
        if card.done:
            return
        card.text = text
        if card.worker is None or card.worker.dead:
            card.worker = spawn_owned(self.background, self._push_card, card,
                                      name=f"feishu:{self.bot_id}:card", log=self.log)

    def _push_card(self, card: _Card) -> None:
        """Show the newest text, at most every card_update_interval_s, until nothing is new."""
        while not card.done:
            gevent.sleep(max(0.0, card.last_update + self.config.card_update_interval_s
                             - time.monotonic()))
            text = card.text
            if text == card.shown:
                return
            with card.lock:
                if card.done:
                    return
                card.last_update = time.monotonic()
                try:
                    if card.card_id is None:
                        self._open_card(card, text)
                    else:
                        self._card_content(card, text)
                    card.shown = text
                except ApiError as e:
                    self.log.info("card update failed platform=feishu msg=%s code=%s error=%s",
                                  card.message_id, e.code, e)
                    if card.card_id is None and not e.retryable:
                        # no card at all (permission missing?): plain replies from now on
                        self._cards_off = True
                        self.log.warning("streaming cards off platform=feishu bot=%s reason=%s",
                                         self.bot_id, e)
                    card.done = card.card_id is None or e.code in CARD_GONE_CODES
                    return

    def _open_card(self, card: _Card, text: str) -> None:
        data = {"schema": "2.0",
                "config": {"streaming_mode": True, "update_multi": True,
                           "streaming_config": {"print_frequency_ms": {"default": 30},
                                                "print_step": {"default": 2},
                                                "print_strategy": "fast"}},
                "body": {"elements": [{"tag": "markdown", "content": text,
                                       "element_id": CARD_ELEMENT}]}}
        answer = self.api.call("POST", CARDS_PATH, what="card_create", body={
            "type": "card_json", "data": json.dumps(data, ensure_ascii=False)})
        card_id = (answer.get("data") or {}).get("card_id")
        if not isinstance(card_id, str) or not card_id:
            raise ApiError("card_create", msg="no card_id in the answer")
        path = f"{MESSAGES_PATH}/{quote(card.message_id, safe='')}/reply"
        self.api.call("POST", path, what="card_reply", body={
            "msg_type": "interactive", "uuid": reply_uuid(f"card:{card.message_id}", 0),
            "content": json.dumps({"type": "card", "data": {"card_id": card_id}})})
        card.card_id = card_id
        self._save_card(card)

    def _card_content(self, card: _Card, text: str) -> None:
        card.sequence += 1
        self._save_card(card)  # a sequence is never used twice, even across a crash
        self.api.call("PUT", f"{CARDS_PATH}/{card.card_id}/elements/{CARD_ELEMENT}/content",
                      what="card_content", body={"content": text, "sequence": card.sequence})

    def _close_card(self, card: _Card, text: str) -> None:
        self._card_content(card, text)
        card.sequence += 1
        self._save_card(card)
        settings = {"config": {"streaming_mode": False, "summary": {"content": text[:60]}}}
        self.api.call("PATCH", f"{CARDS_PATH}/{card.card_id}/settings", what="card_settings",
                      body={"settings": json.dumps(settings, ensure_ascii=False),
                            "sequence": card.sequence})

    def _save_card(self, card: _Card) -> None:
        value = None if card.card_id is None else json.dumps(
            {"card_id": card.card_id, "sequence": card.sequence})
        try:
            self.saved_state.put(CARD_STATE_PREFIX + card.message_id, value)
        except Exception as e:  # a restart then answers with a plain reply
            self.log.warning("card state not saved platform=feishu error=%s", type(e).__name__)

    def _card_for(self, message_id: str) -> _Card | None:
        """The card of an answer: this run's, or the one a previous run saved."""
        card = self._cards.get(message_id)
        if card is not None:
            return card if card.card_id is not None else None
        try:
            saved = json.loads(self.saved_state.get(CARD_STATE_PREFIX + message_id) or "null")
        except (ValueError, TypeError):
            saved = None
        if not isinstance(saved, dict) or not isinstance(saved.get("card_id"), str):
            return None
        card = _Card(message_id, card_id=saved["card_id"],
                     sequence=int(saved.get("sequence") or 0) + 1)  # +1: one may be in flight
        self._cards[message_id] = card
        return card

    def _finish_card(self, out: OutboundMessage, message_id: str) -> bool:
        """Part 0 of an answer that streamed: finish its card with the exact final text. False:
        no usable card (the caller sends a plain reply)."""
        card = self._card_for(message_id)
        if card is None:
            self._cards.pop(message_id, None)
            return False
        with card.lock:
            card.done = True
            try:
                self._close_card(card, out.text)
            except ApiError as e:
                if e.retryable:
                    card.done = False
                    raise SendError(str(e), retryable=True, retry_after=e.retry_after) from None
                self.log.info("card not finished platform=feishu msg=%s code=%s: plain reply",
                              message_id, e.code)
                self._forget_card(card)
                return False
        self._forget_card(card)
        return True

    def _forget_card(self, card: _Card) -> None:
        card.done = True
        self._cards.pop(card.message_id, None)
        try:
            self.saved_state.put(CARD_STATE_PREFIX + card.message_id, None)
        except Exception:
            pass

    # -- replies --------------------------------------------------------------------------
    def send(self, out: OutboundMessage) -> None:
        message_id = out.reply_ref.get("message_id") or out.in_reply_to
        if out.seq == 0 and message_id:
            card = self._cards.get(message_id)
            if card is not None:
                card.done = True  # no progress after the answer
                with card.lock:  # an update in flight (a card being opened) finishes first
                    pass
            if self._finish_card(out, message_id):
                return
        self._post(out, "text", {"text": out.text}, what="reply")

    def _post(self, out: OutboundMessage, msg_type: str, content_obj: dict, *, what: str) -> None:
        message_id = out.reply_ref.get("message_id") or out.in_reply_to
        content = json.dumps(content_obj, ensure_ascii=False)
        if message_id:
            path = f"{MESSAGES_PATH}/{quote(str(message_id), safe='')}/reply"
            body, params = {"msg_type": msg_type, "content": content}, None
        else:  # nothing to reply to: a plain message to the chat
            path, params = MESSAGES_PATH, {"receive_id_type": "chat_id"}
            body = {"receive_id": out.chat_id, "msg_type": msg_type, "content": content}
        key = _idempotency_key(out, message_id)
        if key is not None:
            body["uuid"] = reply_uuid(key, out.seq)
        self.api.timeout_s = self.rest_timeout_s
        try:
            self.api.call("POST", path, body=body, params=params, what=what)
        except ApiError as e:
            self.log.warning("%s failed platform=%s chat=%s msg=%s seq=%d retryable=%s "
                             "error=%s", what, self.name, out.chat_id, message_id, out.seq,
                             e.retryable, e)
            raise SendError(str(e), retryable=e.retryable, retry_after=e.retry_after) from None


PLATFORM = PlatformSpec(name="feishu", config=FeishuConfig, adapter="FeishuAdapter",
                        fake="hermes_green.testing.fake_feishu:FakeFeishuServer")
