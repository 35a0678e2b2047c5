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


class Agent(Protocol):
    def run_turn(self, turn: Turn) -> str:
        """Return the final answer. Failures the user should hear about (LLM down after
        retries) come back as a short answer text, not an exception."""

    def close(self) -> None:
        """Release pools and connections at shutdown."""


class EchoAgent:
    """Answers with the message itself: wiring tests and configs without an `agent` section."""

    def run_turn(self, turn: Turn) -> str:
        answer = f"echo: {turn.text}"
        turn.on_progress(answer)
        return answer

    def close(self) -> None:
        pass
