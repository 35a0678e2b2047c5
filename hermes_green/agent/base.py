"""The contract between the gateway and whatever answers messages.

The gateway owns sessions, history storage and delivery; an agent only turns (history, new text)
into an answer, streaming partial text through `on_progress`. A turn may be cancelled at any
point by killing its greenlet (busy mode `interrupt`, shutdown): an agent must release what it
holds (close HTTP responses, drop tool results) in `finally` blocks and let GreenletExit pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

Message = dict  # {"role": "user" | "assistant", "content": str}


@dataclass
class Turn:
    chat_key: tuple[str, str]  # (platform, chat id)
    text: str  # the new user message, attachment placeholders included
    history: list[Message] = field(default_factory=list)  # oldest first, already bounded
    on_progress: Callable[[str], None] = lambda text_so_far: None
    # Busy mode `steer`: what the user wrote since the turn began (or last asked), one text per
    # message. An agent with rounds (the LLM loop) asks after each tool round and gives them to
    # its next model call; an agent that never asks leaves them for the next turn.
    take_follow_ups: Callable[[], list[str]] = lambda: []
    # Images the user sent, stored by the gateway: {"path", "mime", "name", "size"}; an agent
    # with vision shows them to the model, others read the placeholders in `text`.
    images: list[dict] = field(default_factory=list)
    # send_file(path, caption) -> a line for the model: queues a file for the chat (sent after
    # the answer, through the outbox); raises ValueError with the reason it refuses. None: the
    # gateway offers no way to send files.
    send_file: Callable[[str, str], str] | None = None


@dataclass
class ToolContext:
    """What a tool declared with `takes_context` receives: the turn's chat and its ways out."""
    chat_key: tuple[str, str]
    send_file: Callable[[str, str], str] | None = None


class TurnFailed(Exception):
    """The turn could not produce an answer (LLM down after retries). `reply` is the short text
    the user gets instead; the gateway sends it, marks the message failed and keeps it out of
    the chat history, so the model never reads its own error message back as an answer."""

    def __init__(self, reply: str) -> None:
        super().__init__(reply)
        self.reply = reply


class Agent(Protocol):
    # False: the agent never reads `turn.history` (it keeps its own, or needs none), and the
    # gateway does not read it from the store for each turn. Absent means True.
    uses_history: bool

    def run_turn(self, turn: Turn) -> str:
        """Return the final answer, or raise TurnFailed with the text the user should get."""

    def close(self) -> None:
        """Release pools and connections at shutdown."""


class EchoAgent:
    """Answers with the message itself: wiring tests and configs without an `agent` section."""

    uses_history = False

    def run_turn(self, turn: Turn) -> str:
        answer = f"echo: {turn.text}"
        turn.on_progress(answer)
        return answer

    def close(self) -> None:
        pass
