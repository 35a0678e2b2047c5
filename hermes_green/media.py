"""Files users send and files the agent sends: fetched, checked, stored, handed over, deleted.

In. Platform download URLs expire within minutes (WeCom: 5), so an attachment is fetched at
receipt, not when its turn runs. The order is chosen so that both platform rules hold:
    adapter reader: deliver() -> mark_pending() -> journal (attachments "pending") -> ack
    media:download:<bot>  (a greenlet this module owns) fetches, stores, rewrites the journal row
    the turn: ready(batch) waits for those downloads, at most `media.wait_s`
Journaling first keeps the ack inside the platform's window (Feishu redelivers after ~3 s) and
loses nothing: a crash during the download leaves a journaled message whose attachment is still
pending, and the recovered turn fetches it again (or says why it could not). Downloading before
journaling would hold the ack for the download's length, or hand a message nobody journaled to
a greenlet that dies with the process. The reader never waits on any of it.

Each download: the adapter names the source (`media_source`, off the reader: it may call REST),
then one streamed GET: a size the platform declared over `media.max_bytes` is refused before
any byte, a Content-Length over it too, and a body that grows past it is cut off; an encrypted
file (WeCom) is decrypted chunk by chunk; the type is sniffed from the bytes (an "image" that is
an HTML error page is refused) and checked against `media.allowed_types`. What fails keeps its
placeholder with the reason, which the model reads (and usually tells the user).

Voice: the platform's own transcript when it sends one; else, with `agent.transcribe`, the
stored audio goes to an OpenAI-compatible /audio/transcriptions endpoint when the turn starts.

Out: `OutboundFiles` is the send_file tool's way out of a turn: it checks the path (under
data_dir/media or `media.outbound_dirs`), copies the file into data_dir/media/out, and the
gateway writes the file rows into the outbox with the answer, in one transaction.

Retention: `media:cleanup` deletes stored files older than `media.retention_days`, except those
an unsent outbox row still needs. File system work runs in gevent's threadpool.
"""
from __future__ import annotations

import fnmatch
import hashlib
import logging
import mimetypes
import os
import re
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path
from typing import Callable

import gevent
import gevent.event
import gevent.lock
import gevent.pool

from . import rest
from .models import Attachment, InboundMessage
from .platforms.media import MEDIA_KINDS, MediaRefused, MediaSource, size_text

log = logging.getLogger("hermes_green.media")

CHUNK_BYTES = 64 * 1024
CONNECT_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 30.0
CLEANUP_EVERY_S = 3600.0
SNIFF_BYTES = 64
VISION_TYPES = ("image/png", "image/jpeg", "image/gif", "image/webp")


# --- what the bytes are -------------------------------------------------------------------

_MAGIC: list[tuple[bytes, int, str]] = [  # (signature, offset, type)
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"), (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"GIF87a", 0, "image/gif"), (b"GIF89a", 0, "image/gif"), (b"BM", 0, "image/bmp"),
    (b"II*\x00", 0, "image/tiff"), (b"MM\x00*", 0, "image/tiff"), (b"%PDF-", 0, "application/pdf"),
    (b"PK\x03\x04", 0, "application/zip"), (b"\x1f\x8b", 0, "application/gzip"),
    (b"OggS", 0, "audio/ogg"), (b"ID3", 0, "audio/mpeg"), (b"fLaC", 0, "audio/flac"),
    (b"#!AMR", 0, "audio/amr"), (b"#!SILK", 0, "audio/silk"), (b"\x02#!SILK", 0, "audio/silk"),
    (b"\x1a\x45\xdf\xa3", 0, "video/webm"), (b"ftyp", 4, "video/mp4"),
]


def sniff(head: bytes) -> str | None:
    """The type the first bytes prove, or None (plain text and unknown formats)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[:4] == b"RIFF" and head[8:12] == b"WAVE":
        return "audio/wav"
    for sig, offset, kind in _MAGIC:
        if head[offset:offset + len(sig)] == sig:
            if kind == "video/mp4" and head[8:11] in (b"M4A", b"M4B"):
                return "audio/mp4"
            return kind
    if len(head) >= 2 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:
        return "audio/mpeg"  # an MPEG audio frame without an ID3 tag
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "text/html"
    return None


def _declared(content_type: str | None) -> str | None:
    ct = (content_type or "").split(";")[0].strip().lower()
    return ct if ct and ct not in ("application/octet-stream", "binary/octet-stream") else None


def decide_type(att: Attachment, head: bytes, content_type: str | None,
                allowed: list[str]) -> str:
    """The stored file's type, or ValueError with the reason it is refused."""
    sniffed = sniff(head)
    guessed = mimetypes.guess_type(att.name or "")[0] if att.name else None
    mime = sniffed or _declared(content_type) or att.mime or guessed or \
        "application/octet-stream"
    if sniffed == "text/html" and att.kind != "file":
        raise ValueError("the server sent a web page instead of the file")
    if att.kind == "image" and not mime.startswith("image/"):
        raise ValueError(f"not an image (the content is {mime})")
    if not any(fnmatch.fnmatch(mime, pattern) for pattern in allowed):
        raise ValueError(f"files of type {mime} are not accepted (media.allowed_types)")
    return mime


def _safe_name(name: str | None, mime: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", name or "")[-80:].strip("._") or "file"
    if "." not in stem:
        ext = mimetypes.guess_extension(mime) or ""
        stem += {".jpe": ".jpg"}.get(ext, ext)
    return stem


class _Cut(Exception):
    """A download refused midway (too large); the reason is its message."""


# --- the module -----------------------------------------------------------------------------

class MediaManager:
    """Owned by the gateway: one per process. `adapters` is the gateway's live bot -> adapter
    map; `spawn(fn, *args, name=)` spawns into the gateway's owned group."""

    def __init__(self, config, store, adapters: dict, spawn: Callable[..., gevent.Greenlet],
                 *, transcriber=None) -> None:
        self.cfg = config.media
        self.agent_cfg = config.agent
        self.store = store
        self.adapters = adapters
        self._spawn = spawn
        self.root = Path(config.gateway.data_dir).resolve() / "media"
        self.in_dir, self.out_dir = self.root / "in", self.root / "out"
        self.transcriber = transcriber
        self._tasks: dict[tuple[str, str], gevent.Greenlet] = {}
        self._slots = gevent.lock.BoundedSemaphore(self.cfg.concurrent_downloads)
        self._http = rest.Session(pool_size=max(rest.POOL_SIZE, self.cfg.concurrent_downloads))
        self.downloads = 0  # finished downloads (stored or failed), for tests and metrics

    def start(self) -> None:
        for d in (self.in_dir, self.out_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._spawn(self._cleanup_loop, name="media:cleanup", restart=True)

    def close(self) -> None:
        self._http.close()

    # -- inbound: at receipt ---------------------------------------------------------------
    def mark_pending(self, msg: InboundMessage) -> None:
        """Before the journal: attachments to fetch become "pending" (a voice message the
        platform transcribed needs no audio; a ref-less part cannot be fetched)."""
        if any(self._fetchable(a) for a in msg.attachments):
            msg.attachments = tuple(replace(a, status="pending") if self._fetchable(a) else a
                                    for a in msg.attachments)

    @staticmethod
    def _fetchable(a: Attachment) -> bool:
        return (a.status is None and a.kind in MEDIA_KINDS and bool(a.ref)
                and not (a.kind == "voice" and a.transcript))

    def on_journaled(self, msg: InboundMessage) -> None:
        """After the journal took the message: start its downloads (never waits)."""
        if any(a.status == "pending" for a in msg.attachments):
            self._ensure_task(msg)

    def _ensure_task(self, msg: InboundMessage) -> gevent.Greenlet:
        key = (msg.bot_key, msg.message_id)
        task = self._tasks.get(key)
        if task is None:
            task = self._spawn(self._download_message, msg, name=f"media:download:{msg.bot_key}")
            self._tasks[key] = task
        return task

    # -- the turn ----------------------------------------------------------------------------
    def ready(self, batch: list[InboundMessage]) -> list[InboundMessage]:
        """The batch with every attachment settled: waits for running downloads (starting
        those a restart left pending) at most `media.wait_s` in all, then transcribes voice
        messages the platform did not. A download still running then is given up with a note.
        The list is updated in place (the session manager knows a running turn by its batch)."""
        deadline = time.monotonic() + self.cfg.wait_s
        out = []
        for msg in batch:
            if any(a.status == "pending" for a in msg.attachments):
                task = self._ensure_task(msg)
                task.join(max(0.0, deadline - time.monotonic()))
                if task.dead and task.successful() and task.value is not None:
                    msg = task.value
                else:
                    task.kill(block=False)
                    msg = self._give_up(msg, f"the download did not finish within "
                                             f"{self.cfg.wait_s:g} s")
                self._tasks.pop((msg.bot_key, msg.message_id), None)
            out.append(self._transcribe(msg))
        batch[:] = out
        return batch

    def _give_up(self, msg: InboundMessage, note: str) -> InboundMessage:
        msg.attachments = tuple(replace(a, status="failed", note=note, meta={})
                                if a.status == "pending" else a for a in msg.attachments)
        self._save(msg)
        return msg

    def images(self, batch: list[InboundMessage]) -> list[dict]:
        """Stored images the model may see (the agent decides by `agent.vision`)."""
        return [{"path": a.path, "mime": a.mime, "name": a.name, "size": a.size}
                for m in batch for a in m.attachments
                if a.kind == "image" and a.status == "stored" and a.path
                and a.mime in VISION_TYPES]

    # -- downloading -------------------------------------------------------------------------
    def _download_message(self, msg: InboundMessage) -> InboundMessage:
        adapter = self.adapters.get(msg.bot_key)
        atts = list(msg.attachments)
        for i, att in enumerate(atts):
            if att.status != "pending":
                continue
            with self._slots:
                started = time.monotonic()
                result = self._download(adapter, msg, att, i)
            self.downloads += 1
            log.info("media %s platform=%s chat=%s msg=%s kind=%s bytes=%s ms=%.0f%s",
                     result.status, msg.platform, msg.chat_id, msg.message_id, att.kind,
                     result.size if result.status == "stored" else "-",
                     (time.monotonic() - started) * 1000,
                     f" reason={result.note!r}" if result.note else "")
            atts[i] = result
        msg.attachments = tuple(atts)
        self._save(msg)
        return msg

    def _save(self, msg: InboundMessage) -> None:
        try:
            self.store.update_inbound(msg)
        except Exception as e:  # the turn still gets the file; a restart would fetch again
            log.warning("media journal update failed platform=%s msg=%s error=%s",
                        msg.platform, msg.message_id, type(e).__name__)

    def _download(self, adapter, msg: InboundMessage, att: Attachment, index: int) -> Attachment:
        def failed(note: str) -> Attachment:
            return replace(att, status="failed", note=note, meta={})

        limit = self.cfg.max_bytes
        if adapter is None:
            return failed("the bot that received it is not running")
        try:
            src = adapter.media_source(att, msg)
        except MediaRefused as e:
            return failed(str(e))
        except gevent.GreenletExit:
            raise
        except Exception as e:  # the adapter's REST step failed (network, token)
            return failed(f"the platform did not hand out the file ({type(e).__name__})")
        if src.size is not None and src.size > limit:
            return failed(f"{size_text(src.size)}, larger than the {size_text(limit)} limit")
        name = att.name or src.name
        stored = self.in_dir / (hashlib.sha1(f"{msg.bot_key}:{msg.message_id}".encode(
            "utf-8", "replace")).hexdigest()[:16] + f"-{index}")
        part = stored.with_suffix(".part")
        try:
            with gevent.Timeout(self.cfg.download_timeout_s):
                size, head, ctype = self._fetch(src, part, limit)
            mime = decide_type(replace(att, name=name, mime=att.mime or src.mime), head, ctype,
                               self.cfg.allowed_types)
            final = stored.parent / f"{stored.name}-{_safe_name(name, mime)}"
            os.replace(part, final)
        except gevent.Timeout:
            return self._cleanup_failed(part, failed(
                f"the download took longer than {self.cfg.download_timeout_s:g} s"))
        except _Cut as e:
            return self._cleanup_failed(part, failed(str(e)))
        except ValueError as e:
            return self._cleanup_failed(part, failed(str(e)))
        except (rest.RequestException, OSError) as e:
            return self._cleanup_failed(part, failed(f"the download failed ({type(e).__name__})"))
        return replace(att, status="stored", path=str(final), size=size, mime=mime, name=name,
                       note=None, meta={})

    @staticmethod
    def _cleanup_failed(part: Path, result: Attachment) -> Attachment:
        try:
            part.unlink()
        except OSError:
            pass
        return result

    def _fetch(self, src: MediaSource, part: Path, limit: int) -> tuple[int, bytes, str | None]:
        """Stream the body into `part`; returns (bytes stored, first bytes, Content-Type).
        Errors never carry the URL (it may hold a token)."""
        resp = self._http.get(src.url, headers=src.headers, stream=True,
                              timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        try:
            if resp.status_code != 200:
                raise _Cut(f"the platform answered HTTP {resp.status_code}")
            wire_limit = limit + src.overhead
            length = resp.headers.get("Content-Length")
            if length and length.isdigit() and int(length) > wire_limit:
                raise _Cut(f"{size_text(int(length) - src.overhead)}, larger than the "
                           f"{size_text(limit)} limit")
            decryptor = src.decryptor() if src.decryptor is not None else None
            received = stored = 0
            head = b""
            with open(part, "wb") as f:
                for chunk in resp.iter_content(CHUNK_BYTES):
                    received += len(chunk)
                    if received > wire_limit:
                        raise _Cut(f"larger than the {size_text(limit)} limit")
                    data = decryptor.update(chunk) if decryptor is not None else chunk
                    if len(head) < SNIFF_BYTES:
                        head += data[:SNIFF_BYTES - len(head)]
                    f.write(data)
                    stored += len(data)
                    # A socket that always has data never blocks, so this loop would keep the
                    # hub for the whole download at loopback speed: let the loop turn.
                    gevent.sleep(0)
                if decryptor is not None:
                    try:
                        tail = decryptor.finalize()
                    except ValueError:
                        raise _Cut("the file could not be decrypted (wrong key or damaged "
                                   "data)") from None
                    f.write(tail)
                    stored += len(tail)
                    if len(head) < SNIFF_BYTES:
                        head = _reread_head(f, part)
            if stored == 0:
                raise _Cut("the file is empty")
            return stored, head, resp.headers.get("Content-Type")
        finally:
            resp.close()

    # -- voice ---------------------------------------------------------------------------------
    def _transcribe(self, msg: InboundMessage) -> InboundMessage:
        if self.transcriber is None:
            return msg
        changed = False
        atts = list(msg.attachments)
        for i, a in enumerate(atts):
            if a.kind == "voice" and a.status == "stored" and a.path and not a.transcript:
                try:
                    text = self.transcriber.transcribe(a.path, a.mime, a.name)
                except gevent.GreenletExit:
                    raise
                except Exception as e:
                    log.warning("transcription failed platform=%s msg=%s error=%s",
                                msg.platform, msg.message_id, e)
                    continue
                atts[i] = replace(a, transcript=text)
                changed = True
        if changed:
            msg.attachments = tuple(atts)
            self._save(msg)
        return msg

    # -- outbound ------------------------------------------------------------------------------
    def outbound(self, adapter=None) -> "OutboundFiles":
        roots = [self.root, *(Path(d).resolve() for d in self.cfg.outbound_dirs)]
        return OutboundFiles(self.out_dir, roots, self.cfg.max_bytes, adapter)

    # -- retention -----------------------------------------------------------------------------
    def _cleanup_loop(self) -> None:
        while True:
            self.cleanup_once()
            gevent.sleep(min(CLEANUP_EVERY_S, self.cfg.retention_days * 86400 / 4))

    def cleanup_once(self, now: float | None = None) -> int:
        """Delete stored files older than the retention, except what pending outbox rows
        need. Returns how many were deleted."""
        cutoff = (now if now is not None else time.time()) - self.cfg.retention_days * 86400
        try:
            keep = self.store.outbox_files()
        except Exception as e:
            log.warning("media cleanup skipped error=%s", type(e).__name__)
            return 0
        dirs = (self.in_dir, self.out_dir)

        def sweep() -> int:
            n = 0
            for d in dirs:
                try:
                    entries = list(os.scandir(d))
                except OSError:
                    continue
                for entry in entries:
                    try:
                        if (entry.is_file(follow_symlinks=False) and entry.path not in keep
                                and entry.stat(follow_symlinks=False).st_mtime < cutoff):
                            os.unlink(entry.path)
                            n += 1
                    except OSError:
                        continue
            return n

        deleted = gevent.get_hub().threadpool.apply(sweep)
        if deleted:
            log.info("media cleanup deleted=%d retention_days=%g", deleted,
                     self.cfg.retention_days)
        return deleted


def _reread_head(f, part: Path) -> bytes:
    f.flush()
    with open(part, "rb") as r:
        return r.read(SNIFF_BYTES)


class OutboundFiles:
    """One turn's files for the chat (the send_file tool's callback). Each accepted file is
    copied into data_dir/media/out, so the outbox row keeps a file the agent cannot move or
    delete, and written to the outbox with the answer."""

    def __init__(self, out_dir: Path, roots: list[Path], max_bytes: int, adapter) -> None:
        self.out_dir, self.roots, self.max_bytes, self.adapter = out_dir, roots, max_bytes, adapter
        self.files: list[dict] = []

    def __call__(self, path: str, caption: str = "") -> str:
        src = Path(path).expanduser()
        try:
            real = src.resolve(strict=True)
        except (OSError, RuntimeError):
            raise ValueError(f"no such file: {path}") from None
        if not any(real == r or r in real.parents for r in self.roots):
            raise ValueError(f"{path} is outside the directories files may be sent from "
                             f"(media.outbound_dirs)")
        if not real.is_file():
            raise ValueError(f"{path} is not a regular file")
        size = real.stat().st_size
        mime = sniff_file(real) or mimetypes.guess_type(real.name)[0] or \
            "application/octet-stream"
        media = "image" if mime in VISION_TYPES or mime == "image/bmp" else \
            "video" if mime.startswith("video/") else "file"
        limit = self.max_bytes
        platform_limit = self.adapter.max_upload_bytes(media) if self.adapter else None
        if media == "image" and platform_limit is not None and size > platform_limit:
            media = "file"  # too large to show as a picture: sent as a document
            platform_limit = self.adapter.max_upload_bytes(media)
        if platform_limit is not None:
            limit = min(limit, platform_limit)
        if size == 0:
            raise ValueError(f"{path} is empty")
        if size > limit:
            raise ValueError(f"{path} is {size_text(size)}, larger than the {size_text(limit)} "
                             f"this chat accepts")
        copy = self.out_dir / f"{uuid.uuid4().hex[:12]}-{_safe_name(real.name, mime)}"
        gevent.get_hub().threadpool.apply(shutil.copyfile, (real, copy))
        self.files.append({"path": str(copy), "name": real.name, "mime": mime, "media": media,
                           "caption": caption[:1000], "size": size})
        return (f"{real.name} ({size_text(size)}) will be sent to the chat after this answer "
                f"as {'an image' if media == 'image' else 'a file'}.")


def sniff_file(path: Path) -> str | None:
    try:
        with open(path, "rb") as f:
            return sniff(f.read(SNIFF_BYTES))
    except OSError:
        return None
