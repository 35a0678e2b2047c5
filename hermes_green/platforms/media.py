"""What every adapter needs for files, written once (the kit: no platform is named here).

In: an adapter says where one attachment's bytes are (`MediaSource`: a URL, the headers that
authorize it, the size the platform declared, and for encrypted files a stream decryptor); the
gateway's media module (hermes_green/media.py) downloads it off the reader greenlet, with the
size cap and type check, and stores it. An adapter that knows a file cannot be fetched raises
`MediaRefused` with the reason the model and the user will read.

Out: the outbox hands a file row to `adapter.send_file(out)`; `OutboundFile` is that row's file
as the adapter reads it, and `read_file` loads its bytes in the threadpool (a 20 MB read on the
hub would hold it for milliseconds).
"""
from __future__ import annotations

import mimetypes
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..files import read_file  # noqa: F401  (adapters upload with it)

MEDIA_KINDS = ("image", "file", "voice", "video")


class MediaRefused(Exception):
    """This attachment will not be fetched; the message is the reason, in words the model can
    repeat to the user ("larger than Telegram's 20 MB download limit"). Never a secret."""


class StreamDecryptor(Protocol):
    """Decrypts a download chunk by chunk (the file never sits in memory whole)."""

    def update(self, data: bytes) -> bytes: ...

    def finalize(self) -> bytes:
        """The rest, padding removed; raise ValueError when the data or key is wrong."""


@dataclass
class MediaSource:
    """Where one attachment's bytes are. `size`: what the platform declared (a larger one is
    refused before downloading); `decryptor`: a factory for files the platform encrypts."""
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    size: int | None = None
    mime: str | None = None
    name: str | None = None
    decryptor: Callable[[], StreamDecryptor] | None = None
    overhead: int = 0  # bytes the wire adds to the file (encryption padding) above the cap


@dataclass
class OutboundFile:
    """A file the agent sends, as the outbox row carries it (see OutboundMessage.file)."""
    path: str
    name: str
    mime: str
    media: str  # image | file | voice | video
    caption: str = ""
    size: int = 0

    @classmethod
    def from_row(cls, file: dict[str, Any] | None) -> "OutboundFile":
        if not isinstance(file, dict) or not isinstance(file.get("path"), str):
            raise ValueError("the outbox row carries no file")
        name = str(file.get("name") or os.path.basename(file["path"]))
        mime = str(file.get("mime") or mimetypes.guess_type(name)[0] or
                   "application/octet-stream")
        media = file.get("media") if file.get("media") in MEDIA_KINDS else "file"
        return cls(file["path"], name, mime, media, str(file.get("caption") or ""),
                   int(file.get("size") or 0))


def size_text(size: int) -> str:
    return f"{size / (1024 * 1024):.1f} MB" if size >= 1024 * 1024 else f"{size / 1024:.0f} KB"
