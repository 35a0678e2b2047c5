"""The built-in `send_file` tool (on unless `agent.send_files: false`).

The agent never imports a platform: the gateway hands each turn a `send_file` callback
(Turn.send_file -> ToolContext.send_file) that checks the path, keeps a copy, and queues the
file; the file rows enter the outbox with the answer, in the same transaction, so a file is sent
once, after the text, across retries and restarts. A turn that fails or is interrupted sends
none of its files.
"""
from __future__ import annotations

from .tools import tool


@tool(executor="inline", timeout_s=60, takes_context=True)
def send_file(path: str, caption: str = "", context=None) -> str:
    """Send a file (an image, a document, ...) to the user in this chat. It is delivered after
    your answer. Only files under the directories the operator allowed can be sent; files the
    user sent you (their paths appear in the conversation) can be sent back.

    Args:
        path: the file's path on this machine
        caption: a short text shown with the file (optional)
    """
    if context is None or context.send_file is None:
        raise ValueError("files cannot be sent from this conversation")
    return context.send_file(path, caption)
