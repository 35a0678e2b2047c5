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
from typing import Iterable

MASK = "***"

_PATTERNS = [
    # Authorization: Bearer xxx / QQBot xxx / Basic xxx, in headers, reprs or dict dumps
    re.compile(r"(?i)(authorization['\"]?\s*[:=]\s*['\"]?(?:bearer|qqbot|basic)?\s*)([^\s'\",}]+)"),
    # the schemes as sent on the wire (case matters: "qqbot reason=..." is a log line, not a
    # credential); token characters, then optional base64 padding
    re.compile(r"\b(Bearer\s+|QQBot\s+)([A-Za-z0-9._~+/-]{8,}=*)"),
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


def setup_logging(level: str = "info", fmt: str = "kv", secrets: Iterable[str] = (),
                  stream=None) -> None:
    REDACTOR.add(secrets)
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
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
