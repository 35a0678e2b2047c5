"""Neutral message types shared by adapters, the store and the gateway.

Adapters translate platform frames into these and back; nothing above the adapters knows any
platform's wire format. `reply_ref` is the one opaque piece: whatever an adapter needs later to
answer this exact message (WeCom's callback req_id, QQ's msg_id and chat kind, Feishu's
message_id). It is JSON-serializable so the store can keep it across restarts.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields
from functools import lru_cache
from typing import Any, Literal

ChatType = Literal["dm", "group"]
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
AttachmentKind = Literal["image", "file", "voice", "video", "other"]


def bot_key(platform: str, bot: str = "") -> str:
    """The one string that names a bot in store keys and routing: the platform alone for its
    default bot (so a single-bot file from before multi-bot support keeps its keys), else
    "platform/id"."""
    return platform if not bot or bot == platform else f"{platform}/{bot}"


def split_bot_key(key: str) -> tuple[str, str]:
    platform, _, bot = key.partition("/")
    return platform, bot or platform


@dataclass(frozen=True)
class Attachment:
    """A non-text part of an inbound message, as the adapter saw it and, once the gateway's
    media module (hermes_green/media.py) fetched it, where its bytes are.

    The adapter fills `kind`, `ref` (the platform's reference: url, media id, file key), `name`,
    and what it knows besides: `mime` and `size` as declared, `transcript` when the platform
    transcribed a voice message itself, `meta` for what the download needs (WeCom's per-file
    aeskey). The gateway fills `status` ("pending" while the download runs, "stored" with `path`,
    "failed" with `note` saying why) and a `transcript` from the transcription endpoint. All of
    it is kept in the journal row, so a restart knows what was fetched and what was refused."""
    kind: str
    ref: str  # the platform's reference (url, media id, file key)
    name: str | None = None
    mime: str | None = None
    size: int | None = None
    transcript: str | None = None
    status: str | None = None  # None: only described | pending | stored | failed
    path: str | None = None  # the stored file (absolute), when status == "stored"
    note: str | None = None  # why it was not stored (failed), shown to the model
    meta: dict = field(default_factory=dict, hash=False)


@dataclass
class InboundMessage:
    platform: str
    message_id: str  # the platform's own id: the de-duplication key with `platform`
    chat_id: str  # conversation key: a user id for DMs, a group id for groups
    user_id: str
    text: str
    chat_type: ChatType = "dm"
    attachments: tuple[Attachment, ...] = ()
    reply_ref: dict[str, Any] = field(default_factory=dict)
    received_at: float = field(default_factory=time.time)
    bot: str = ""  # which bot of the platform received it (set by the adapter kit)
    # In a group: whether the message addresses this bot (a mention, a reply to it, /cmd@bot).
    # None: the adapter does not say (its platform delivers only addressed group messages).
    # `require_mention` refuses group messages marked False (hermes_green/access.py).
    mentioned: bool | None = None

    @property
    def bot_key(self) -> str:
        return bot_key(self.platform, self.bot)

    @property
    def chat_key(self) -> tuple[str, str]:
        """One conversation: this bot's chat (two bots in one group are two conversations)."""
        return (self.bot_key, self.chat_id)

    def to_json(self) -> str:
        # Not dataclasses.asdict: it deep-copies every value recursively and cost a third of
        # the journal write (bench/throughput.py profile). Attachments are the one nested type.
        doc = {name: getattr(self, name) for name in _inbound_fields()}
        doc["attachments"] = [vars(a) for a in self.attachments]
        return _ENCODER.encode(doc)

    @classmethod
    def from_json(cls, data: str) -> "InboundMessage":
        d = json.loads(data)
        d["attachments"] = tuple(Attachment(**a) for a in d.get("attachments", ()))
        return cls(**d)


@dataclass
class OutboundMessage:
    """One reply, as kept in the outbox until the platform accepted it.

    `seq` numbers the parts of one answer (0-based): adapters with per-reply sequence rules
    (QQ's msg_seq) derive them from it, so a re-send after a restart reuses the same number and
    the platform can recognize the duplicate.
    """
    platform: str
    chat_id: str
    text: str
    in_reply_to: str | None = None  # inbound platform message id
    reply_ref: dict[str, Any] = field(default_factory=dict)
    seq: int = 0
    outbox_id: int | None = None
    attempts: int = 0
    bot: str = ""
    # kind "file": `file` holds {"path" (absolute, a copy the gateway keeps until it is sent),
    # "name", "mime", "media" (image | file | voice | video), "caption", "size"}; `text` is the
    # caption, and what a platform that cannot take the file shows instead.
    kind: str = "text"
    file: dict[str, Any] | None = None

    @property
    def bot_key(self) -> str:
        return bot_key(self.platform, self.bot)


def _size_text(size: int | None) -> str:
    if size is None:
        return ""
    if size < 1024:
        return f"{size} B"
    if size < 1024 * 1024:
        return f"{size / 1024:.0f} KB"
    return f"{size / (1024 * 1024):.1f} MB"


def describe_attachment(a: Attachment) -> str:
    """What the agent reads in place of one non-text part. Only described (never fetched):
    `[image: a.png]`; stored: kind, name, size, type and the path its tools may read; refused or
    failed: why; a voice message with a transcript: the transcript as text."""
    label = f"{a.kind}{': ' + a.name if a.name else ''}"
    if a.transcript:
        return f"[voice message, transcript: {a.transcript}]"
    if a.status == "stored" and a.path:
        details = ", ".join(x for x in (_size_text(a.size), a.mime) if x)
        return f"[{label}{' (' + details + ')' if details else ''}, saved at {a.path}]"
    if a.status in ("failed", "pending"):
        return f"[{label}: not received: {a.note or 'download failed'}]"
    return f"[{label}]"


@lru_cache(maxsize=1)
def _inbound_fields() -> tuple[str, ...]:
    return tuple(f.name for f in fields(InboundMessage))


def attachment_placeholder(attachments: tuple[Attachment, ...] | list[Attachment]) -> str:
    """A short text the agent reads in place of the non-text parts, e.g. `[image: a.png]`."""
    return " ".join(describe_attachment(a) for a in attachments)
