"""One agent turn: system prompt + bounded history + new message -> LLM -> tools -> ... -> text.

Each round streams a completion; its text goes to the adapter's progress callback as it arrives
(WeCom's stream updates use it). If the model asked for tools, they run (parallel calls
concurrently, each in the executor its author chose), their results are appended as `tool`
messages, and the next round starts. After `max_tool_rounds` rounds the model is asked to answer
without tools (`tool_choice: "none"`).

The answer is the text of every round joined, i.e. exactly what the progress callback showed.
The gateway saves the user's text and this answer into history (through the store) and delivers
it; tool messages stay inside the turn. Busy mode `steer`: after each tool round the loop asks
the turn for the user's follow-ups (`Turn.take_follow_ups`) and appends them as a user message,
so the next model call reads them in the same turn. An LLM failure after retries becomes a
short error reply: the user never meets silence. A turn killed by the gateway (GreenletExit) kills its tool
greenlets, which kill their process workers; the LLM response is closed by llm.py.
"""
from __future__ import annotations

import base64
import logging
import time
from typing import Callable

import gevent

from .base import Agent, EchoAgent, Message, ToolContext, Turn, TurnFailed
from .executors import Executors
from .llm import Completion, LLMClient, LLMError, ToolCall
from .tools import ToolRegistry, ToolResult, call_tool

log = logging.getLogger("hermes_green.agent.loop")

EMPTY_REPLY = "Sorry, the model returned an empty answer. Please try rephrasing your message."
TOO_MANY_ROUNDS_REPLY = "Sorry, this needed more tool steps than I am allowed to take."
_KILL_TOOLS_TIMEOUT_S = 5.0


def error_reply(error: LLMError, *, reason: str | None = None) -> str:
    return (f"Sorry, I could not get an answer: {reason or error.reason}. "
            "Please try again in a moment.")


class _Progress:
    """The answer so far across rounds; every change goes to the turn's callback."""

    def __init__(self, callback: Callable[[str], None]) -> None:
        self._callback = callback
        self._parts: list[str] = []
        self._current = ""

    @property
    def text(self) -> str:
        return "\n\n".join(p for p in (*self._parts, self._current) if p.strip())

    def update(self, round_text: str) -> None:
        self._current = round_text
        try:
            self._callback(self.text)
        except Exception:  # noqa: BLE001  (a failing adapter callback never stops the turn)
            log.exception("on_progress callback failed")

    def commit(self) -> None:
        if self._current.strip():
            self._parts.append(self._current)
        self._current = ""


class LLMAgent:
    """The Agent contract over an OpenAI-compatible LLM and the tools in `agent.tools`."""

    def __init__(self, config, executors_config=None, *, llm: LLMClient | None = None,
                 registry: ToolRegistry | None = None, executors: Executors | None = None) -> None:
        """`config` is an AgentConfig, `executors_config` an ExecutorsConfig. Tool modules are
        imported here: a missing one raises ConfigError."""
        self.config = config
        if registry is None:
            registry = ToolRegistry.from_modules(config.tools)
            if getattr(config, "send_files", False):
                from .file_tools import send_file
                registry.add(send_file)
        self.registry = registry
        if executors is None:
            threads = executors_config.threads if executors_config is not None else None
            processes = executors_config.processes if executors_config is not None else 1
            executors = Executors(threads=threads, processes=processes)
        self.executors = executors
        self.llm = llm if llm is not None else LLMClient.from_config(config)
        self._closed = False
        log.info("agent ready base_url=%s model=%s tools=%s", self.llm.base_url, config.model,
                 ",".join(self.registry.names()) or "-")

    # -- the contract ---------------------------------------------------------------------------
    def run_turn(self, turn: Turn) -> str:
        # (turn_seconds and turns_in_flight are the gateway's: it times every agent alike)
        return self._run(turn, time.monotonic())

    def close(self) -> None:
        """Kill the process workers and drop pooled connections. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.executors.close()
        self.llm.close()

    # -- the turn -------------------------------------------------------------------------------
    def build_messages(self, turn: Turn) -> list[dict]:
        """System prompt + the last `max_history` history messages + the new user message."""
        messages: list[dict] = []
        if self.config.system_prompt:
            messages.append({"role": "system", "content": self.config.system_prompt})
        history = [m for m in turn.history
                   if m.get("role") in ("user", "assistant") and isinstance(m.get("content"), str)]
        keep = self.config.max_history
        for m in (history[-keep:] if keep > 0 else []):
            messages.append({"role": m["role"], "content": m["content"]})
        parts = self._image_parts(turn) if getattr(self.config, "vision", False) else []
        if parts:
            messages.append({"role": "user",
                             "content": [{"type": "text", "text": turn.text}, *parts]})
        else:
            messages.append({"role": "user", "content": turn.text})
        return messages

    def _image_parts(self, turn: Turn) -> list[dict]:
        """OpenAI-style `image_url` parts with data: URLs for the turn's images (those over
        `vision_max_bytes` stay files: their placeholder in the text names the path)."""
        parts = []
        for image in turn.images:
            size = image.get("size") or 0
            if size > self.config.vision_max_bytes:
                continue
            try:
                data = _data_url(image["path"], image["mime"])
            except (OSError, KeyError, ValueError) as e:
                log.warning("image not shown to the model path=%s error=%s", image.get("path"),
                            type(e).__name__)
                continue
            parts.append({"type": "image_url", "image_url": {"url": data}})
        return parts

    def _run(self, turn: Turn, started: float) -> str:
        platform, chat = turn.chat_key
        messages = self.build_messages(turn)
        progress = _Progress(turn.on_progress)
        tools = self.registry.schemas() or None
        rounds = calls = 0
        while True:
            last = rounds >= self.config.max_tool_rounds
            try:
                completion = self.llm.chat(messages, tools=tools,
                                           tool_choice="none" if tools and last else None,
                                           on_text=progress.update)
            except LLMError as e:
                log.warning("turn failed platform=%s chat=%s rounds=%d error=%s", platform, chat,
                            rounds, e)
                reply = error_reply(e)
                so_far = progress.text
                raise TurnFailed(f"{so_far}\n\n({reply})" if so_far else reply) from None
            progress.commit()
            if not completion.tool_calls:
                break
            if last:
                log.warning("tool round limit reached platform=%s chat=%s rounds=%d", platform,
                            chat, rounds)
                if not progress.text:
                    return TOO_MANY_ROUNDS_REPLY
                break
            rounds += 1
            calls += len(completion.tool_calls)
            messages.append(_assistant_message(completion))
            results = self._run_tools(completion.tool_calls, turn.chat_key,
                                      ToolContext(turn.chat_key, turn.send_file))
            for call, result in zip(completion.tool_calls, results):
                messages.append({"role": "tool", "tool_call_id": call.id,
                                 "content": result.content})
            follow_ups = _follow_ups(turn)
            if follow_ups:  # steer: the user wrote while the tools ran; the model reads it now
                log.info("follow-up taken platform=%s chat=%s round=%d messages=%d", platform,
                         chat, rounds, len(follow_ups))
                messages.append({"role": "user", "content": "\n".join(follow_ups)})
        answer = progress.text or EMPTY_REPLY
        log.info("turn done platform=%s chat=%s rounds=%d tool_calls=%d ms=%.0f chars=%d",
                 platform, chat, rounds, calls, (time.monotonic() - started) * 1000, len(answer))
        return answer

    def _run_tools(self, calls: list[ToolCall], chat_key: tuple[str, str],
                   context: ToolContext | None = None) -> list[ToolResult]:
        """Run one round's calls concurrently; results in call order."""
        greenlets: list[gevent.Greenlet] = []
        try:
            for call in calls:
                g = gevent.spawn(call_tool, self.registry, self.executors, call.name,
                                 call.arguments, chat_key=chat_key, context=context)
                g.name = f"agent:tool:{call.name}"
                greenlets.append(g)
            gevent.joinall(greenlets)
        finally:  # turn interrupted: stop the tools too (their process workers are killed)
            pending = [g for g in greenlets if not g.dead]
            if pending:
                gevent.killall(pending, block=True, timeout=_KILL_TOOLS_TIMEOUT_S)
        results = []
        for call, g in zip(calls, greenlets):
            if g.successful():
                results.append(g.value)
            else:  # call_tool turns failures into results; this is a bug, still not fatal
                log.error("tool greenlet died tool=%s error=%r", call.name, g.exception)
                results.append(ToolResult(f"Error: {call.name} failed unexpectedly "
                                          f"({type(g.exception).__name__}).", ok=False))
        return results


def _follow_ups(turn: Turn) -> list[str]:
    try:
        return [t for t in turn.take_follow_ups() if t]
    except Exception:  # noqa: BLE001  (a failing gateway callback never ends the turn)
        log.exception("take_follow_ups failed")
        return []


_B64_CHUNK = 3 * 64 * 1024  # a multiple of 3: chunks encode to a prefix of the whole


def _data_url(path: str, mime: str) -> str:
    """`data:<mime>;base64,...` of a file: read in the threadpool, encoded in 192 KB pieces
    with a yield between them, so a 5 MB image never holds the hub for more than a moment."""
    from ..files import read_file
    raw = read_file(path)
    pieces = []
    for i in range(0, len(raw), _B64_CHUNK):
        pieces.append(base64.b64encode(raw[i:i + _B64_CHUNK]).decode("ascii"))
        gevent.sleep(0)
    return f"data:{mime};base64,{''.join(pieces)}"


def _assistant_message(completion: Completion) -> dict:
    return {"role": "assistant", "content": completion.text or None,
            "tool_calls": [call.to_message() for call in completion.tool_calls]}


def build_agent(config) -> Agent:
    """The agent for a whole `Config`: EchoAgent without an `agent` section, ServiceAgent for
    `agent.backend: service`, else LLMAgent. Raises ConfigError (one line) when a tool module
    cannot be imported."""
    if config.agent is None:
        return EchoAgent()
    if config.agent.backend == "service":
        from .service import ServiceAgent  # a remote agent that keeps history, tools and memory
        return ServiceAgent(config.agent)
    return LLMAgent(config.agent, config.executors)


__all__ = ["LLMAgent", "build_agent", "error_reply", "Message", "Turn"]
