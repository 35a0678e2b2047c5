"""Logging: one line per event, key=value (default) or JSON, with secrets redacted everywhere.

Redaction happens on the formatted line, after every argument and traceback has been rendered,
so nothing a library logs (an HTTP header in an exception, a URL with a token) can slip past.
Two nets: every secret value from the config is replaced literally, and well-known credential
shapes (Authorization headers, Bearer/QQBot tokens, JSON fields named like secrets) are masked
even when their value never went through our config (tokens the platforms hand out).
"""
from __future__ import annotations

import json
import logging
import re
import sys
import time
from _queue import SimpleQueue  # the C queue: gevent does not patch it; get() releases the GIL
from typing import Iterable

from gevent import monkey

MASK = "***"

_PATTERNS = [
    # Authorization: Bearer xxx / QQBot xxx / Bot xxx / Basic xxx, in headers, reprs or dumps
    re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?(?:bearer|qqbot|bot|basic)?\s*)"
               r"([^\s'\",}]+)"),
    # the schemes as sent on the wire (case matters: "qqbot reason=..." is a log line, not a
    # credential); token characters, then optional base64 padding
    re.compile(r"\b(Bearer\s+|QQBot\s+|Bot\s+)([A-Za-z0-9._~+/-]{8,}=*)"),
    # one-time tickets and chat-scoped webhook sessions in URLs (whoever holds one can connect
    # as the bot, or post into that chat, for as long as it lives)
    re.compile(r"([?&](?:ticket|session|sign)=)([^&\s'\"]+)"),
    # "access_token": "...", app_secret=..., clientSecret: ..., api_key ...
    re.compile(r"(?i)((?:access_token|tenant_access_token|app_access_token|app_?secret|"
               r"client_?secret|api_?key|secret|token|password)['\"]?\s*[:=]\s*['\"]?)"
               r"([^\s'\",}&]{4,})"),
]


class Redactor:
    def __init__(self, secrets: Iterable[str] = ()) -> None:
        self._secrets: list[str] = []
        self.add(secrets)

    def add(self, secrets: Iterable[str]) -> None:
        for s in secrets:
            if s and len(s) >= 4 and s not in self._secrets:
                self._secrets.append(s)
        self._secrets.sort(key=len, reverse=True)  # longest first: no partial leftovers

    def __call__(self, text: str) -> str:
        for s in self._secrets:
            if s in text:
                text = text.replace(s, MASK)
        for pat in _PATTERNS:
            text = pat.sub(lambda m: m.group(1) + MASK, text)
        return text


REDACTOR = Redactor()


class KeyValueFormatter(logging.Formatter):
    """`2026-11-24T10:00:00.123Z level=info logger=... platform=wecom msg=...` style lines.
    Messages are already written as `event key=value ...`; we prefix time, level and logger."""

    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        line = (f"{ts}.{int(record.msecs):03d}Z level={record.levelname.lower()} "
                f"logger={record.name} {record.getMessage()}")
        if record.exc_info:
            line += " exc=" + json.dumps(self.formatException(record.exc_info))
        return REDACTOR(line.replace("\n", "\\n"))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": record.created, "level": record.levelname.lower(), "logger": record.name,
               "msg": record.getMessage()}
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return REDACTOR(json.dumps(doc, ensure_ascii=False))


class BackgroundStreamHandler(logging.Handler):
    """Formats on the caller's greenlet (cheap, and where redaction runs), writes from a native
    thread. A write to stderr blocks when the reader is slow (a pipe to journald or `tee`, an
    ssh terminal): seen holding the hub for 100 ms in bench/throughput.py. Here only the
    writer thread waits; the hub never does."""

    _STOP = object()

    def __init__(self, stream) -> None:
        super().__init__()
        self.stream = stream
        self._queue: SimpleQueue = SimpleQueue()
        self._allocate_lock = monkey.get_original("_thread", "allocate_lock")
        self._finished = self._allocate_lock()
        self._finished.acquire()
        monkey.get_original("_thread", "start_new_thread")(self._write_forever, ())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._queue.put(self.format(record) + "\n")
        except Exception:
            self.handleError(record)

    def _write_forever(self) -> None:
        while True:
            item = self._queue.get()
            if item is self._STOP:
                break
            if isinstance(item, str):
                try:
                    self.stream.write(item)
                    if self._queue.empty():
                        self.stream.flush()
                except Exception:
                    pass  # a closed or broken stderr loses log lines, never the gateway
            else:  # a flush marker: a native lock to release once everything before it is out
                item.release()
        self._finished.release()

    def flush(self) -> None:
        """Wait (briefly, at most 2 s) until every line logged so far is written."""
        marker = self._allocate_lock()
        marker.acquire()
        self._queue.put(marker)
        marker.acquire(True, 2.0)

    def close(self) -> None:
        self._queue.put(self._STOP)
        self._finished.acquire(True, 2.0)
        try:
            self.stream.flush()
        except Exception:
            pass
        super().close()


def setup_logging(level: str = "info", fmt: str = "kv", secrets: Iterable[str] = (),
                  stream=None) -> None:
    REDACTOR.add(secrets)
    handler = BackgroundStreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        if isinstance(h, BackgroundStreamHandler):
            h.close()
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Chatty libraries stay at warning, unless the user asked for debug (then everything goes
    # through the same redaction).
    for noisy in ("urllib3", "websocket", "geventwebsocket", "hpack", "httpx"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if level == "debug" else logging.WARNING)


def config_secrets(config) -> list[str]:
    """Every SecretStr value in a config tree."""
    from pydantic import BaseModel, SecretStr
    found: list[str] = []

    def walk(node) -> None:
        if isinstance(node, SecretStr):
            found.append(node.get_secret_value())
        elif isinstance(node, BaseModel):
            for name in type(node).model_fields:
                walk(getattr(node, name))
        elif isinstance(node, (list, tuple)):
            for item in node:
                walk(item)
        elif isinstance(node, dict):
            for item in node.values():
                walk(item)

    walk(config)
    return found
