"""Turning one answer into the reply parts a platform accepts.

Platforms cap the length of one message, and some cap how many replies one inbound message may
get (QQ: 5 passive replies). Splitting happens once, before the parts enter the outbox, so a
re-send after a restart sends exactly the same parts with the same sequence numbers.
"""
from __future__ import annotations

import re

TRUNCATED = "\n…(answer truncated)"


def split_reply(text: str, max_chars: int, max_parts: int | None = None) -> list[str]:
    """Split at paragraph, then line, then word boundaries; hard-cut only inside a long word.
    With `max_parts`, the last allowed part ends with a truncation marker."""
    if max_chars < 16:
        raise ValueError("max_chars must be at least 16")
    text = text.strip() or "(empty answer)"
    parts: list[str] = []
    rest = text
    while rest:
        if len(rest) <= max_chars:
            parts.append(rest)
            break
        window = rest[:max_chars]
        cut = max(window.rfind("\n\n"), -1)
        if cut < max_chars // 2:
            cut = window.rfind("\n")
        if cut < max_chars // 2:
            cut = window.rfind(" ")
        if cut < max_chars // 2:
            cut = max_chars
        parts.append(rest[:cut].rstrip())
        rest = rest[cut:].lstrip()
    if max_parts is not None and len(parts) > max_parts:
        keep = parts[:max_parts]
        last = keep[-1]
        keep[-1] = last[: max_chars - len(TRUNCATED)].rstrip() + TRUNCATED
        parts = keep
    return parts


_IMAGE_LINK = re.compile(r"!\[([^\]\n]*)\]\((https?://[^\s)]+)\)")


def render_image_links(text: str, style: str) -> str:
    """Markdown image links `![alt](https://...)` as the platform shows them best: "markdown"
    keeps them (rendered as images), "bare" keeps the URL alone on its line (Discord and
    Telegram show a preview of a lone link), "text" writes "alt: url"."""
    if style == "markdown" or "![" not in text:
        return text
    if style == "bare":
        return _IMAGE_LINK.sub(lambda m: m.group(2), text)
    return _IMAGE_LINK.sub(lambda m: f"{m.group(1)}: {m.group(2)}" if m.group(1).strip()
                           else m.group(2), text)
