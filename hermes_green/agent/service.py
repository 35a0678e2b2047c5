"""`agent.backend: service`: the answer comes from a remote agent that keeps the conversation.

Many people already run an agent they like, with its own tools, memory and skills, behind an
OpenAI-compatible `/v1/chat/completions` (hermes-agent's API server, default port 8642). This
backend hands it each turn and lets it keep everything else:

- We send only the new user text (one `user` message; a `system` message only when
  `agent.system_prompt` is set, which hermes-agent layers on top of its own prompt), never our
  history: the service loads its own transcript for the conversation.
- The conversation is named by a stable id in a request header (`agent.service.
  conversation_header`, `X-Hermes-Session-Id` for hermes-agent). The id is derived from the
  turn's chat key (platform/bot and chat) and `agent.service.namespace`, so it is the same for
  every turn of a chat, across restarts, and different per chat and per bot. It is path-safe and
  bounded (`hg-` + 32 hex digits), which hermes-agent requires: it rejects `/`, `\\`, `..`, a
  drive prefix, control characters and ids over 256 characters (400), and continues a
  conversation only for a client that sends its API_SERVER_KEY (403 otherwise), so
  `agent.api_key` is required (config.py). Source: NousResearch/hermes-agent,
  gateway/platforms/api_server_openai_routes.py `_handle_chat_completions`; the fake that drives
  our tests, hermes_green/testing/fake_agent_service.py, follows it.
- The answer streams back as server-sent events; its text goes to the turn's progress callback
  as it arrives, exactly as with the builtin loop. Tool calls run inside the service (hermes-agent
  reports them as `hermes.tool.progress` events, which we skip).
- The gateway journals, de-duplicates and delivers around this, as for any agent; the history it
  keeps is only for status and for switching backends.
- Interrupt and shutdown kill the turn's greenlet; llm.py closes the response in a `finally`, so
  the service sees the client leave and stops its agent (hermes-agent interrupts it).
- A service that is down, slow, refuses the key or sends a broken stream gives the user the same
  short error reply as the builtin loop (TurnFailed), and the message is marked failed.

The HTTP side is llm.py's client (streaming, timeouts, redacted errors). Retries are off unless
`agent.max_retries` is set: a message retried after the service began acting on it would run
twice.
"""
from __future__ import annotations

import hashlib
import logging
import time

from .base import Turn, TurnFailed
from .llm import (LLMClient, LLMConnectionError, LLMError, LLMHTTPError, LLMStreamError,
                  LLMTimeout)
from .loop import EMPTY_REPLY, error_reply

log = logging.getLogger("hermes_green.agent.service")

CONVERSATION_PREFIX = "hg-"
_ID_HEX_DIGITS = 32  # 128 bits: no two chats meet by chance


def conversation_id(chat_key: tuple[str, ...], namespace: str = "") -> str:
    """The service-side conversation for one chat: `hg-` + 32 hex digits, the same for every
    turn of the chat and different for every other chat, bot or namespace."""
    seed = "\0".join((namespace, *chat_key)).encode("utf-8")
    return CONVERSATION_PREFIX + hashlib.sha256(seed).hexdigest()[:_ID_HEX_DIGITS]


def service_reason(error: LLMError) -> str:
    """llm.py's user-facing reason, naming the agent service instead of a model server."""
    if isinstance(error, LLMConnectionError):
        return "the agent service cannot be reached"
    if isinstance(error, LLMTimeout):
        return "the agent service did not answer in time"
    if isinstance(error, LLMHTTPError):
        return f"the agent service answered HTTP {error.status}"
    if isinstance(error, LLMStreamError):
        return "the agent service sent a broken answer"
    return "the agent service failed"


class ServiceAgent:
    """The Agent contract over a remote agent service (see the module docstring)."""

    uses_history = False  # the service holds the transcript

    def __init__(self, config, *, llm: LLMClient | None = None) -> None:
        """`config` is an AgentConfig with `backend: service`."""
        self.config = config
        self.header = config.service.conversation_header
        self.namespace = config.service.namespace
        self.llm = llm if llm is not None else LLMClient.from_config(config)
        self._closed = False
        log.info("agent service ready base_url=%s model=%s header=%s", self.llm.base_url,
                 config.model, self.header)

    def conversation_id(self, chat_key: tuple[str, ...]) -> str:
        return conversation_id(chat_key, self.namespace)

    def build_messages(self, turn: Turn) -> list[dict]:
        """Only the new text: the service holds the history."""
        messages: list[dict] = []
        if self.config.system_prompt:
            messages.append({"role": "system", "content": self.config.system_prompt})
        messages.append({"role": "user", "content": turn.text})
        return messages

    def run_turn(self, turn: Turn) -> str:
        platform, chat = turn.chat_key
        conversation = self.conversation_id(turn.chat_key)
        started = time.monotonic()
        shown = [""]

        def on_text(text_so_far: str) -> None:
            shown[0] = text_so_far
            turn.on_progress(text_so_far)  # llm.py keeps a failing callback from the stream

        try:
            completion = self.llm.chat(self.build_messages(turn), on_text=on_text,
                                       headers={self.header: conversation})
        except LLMError as e:
            log.warning("turn failed platform=%s chat=%s conversation=%s error=%s", platform,
                        chat, conversation, e)
            reply = error_reply(e, reason=service_reason(e))
            raise TurnFailed(f"{shown[0]}\n\n({reply})" if shown[0] else reply) from None
        if completion.tool_calls:  # the service runs its tools; it should never hand us one
            log.warning("agent service asked the gateway to run tools (ignored) platform=%s "
                        "chat=%s tools=%s", platform, chat,
                        ",".join(c.name for c in completion.tool_calls))
        answer = completion.text if completion.text.strip() else EMPTY_REPLY
        log.info("turn done platform=%s chat=%s conversation=%s ms=%.0f chars=%d", platform,
                 chat, conversation, (time.monotonic() - started) * 1000, len(answer))
        return answer

    def close(self) -> None:
        """Drop pooled connections. Idempotent."""
        if not self._closed:
            self._closed = True
            self.llm.close()


__all__ = ["ServiceAgent", "conversation_id", "service_reason", "CONVERSATION_PREFIX"]
