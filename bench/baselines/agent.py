"""The baseline agent: streaming OpenAI-compatible chat completions over httpx on the loop, tool
calls run inline on the loop or in the loop's default thread pool, a short in-memory history."""
from __future__ import annotations

import asyncio
import functools
import json

import httpx

from hermes_green.agent.demo_tools import blocking_sleep, count_primes, hash_text

HISTORY_MESSAGES = 20
MAX_ROUNDS = 8


def _schema(name: str, description: str, props: dict, required: list[str]) -> dict:
    return {"type": "function", "function": {
        "name": name, "description": description,
        "parameters": {"type": "object", "properties": props, "required": required}}}


TOOLS = {
    "count_primes": (count_primes, _schema(
        "count_primes", "Count the prime numbers below a limit.",
        {"limit": {"type": "integer"}}, ["limit"])),
    "hash_text": (hash_text, _schema(
        "hash_text", "Derive a PBKDF2-SHA256 hash of a text.",
        {"text": {"type": "string"}, "iterations": {"type": "integer"}}, ["text"])),
    "blocking_sleep": (blocking_sleep, _schema(
        "blocking_sleep", "Block for a while, like a slow C library call.",
        {"seconds": {"type": "number"}}, ["seconds"])),
}


class Agent:
    def __init__(self, config: dict, http: httpx.AsyncClient, tools_mode: str) -> None:
        self.url = config["base_url"].rstrip("/") + "/chat/completions"
        self.headers = {"Authorization": f"Bearer {config['api_key']}"}
        self.model = config["model"]
        self.http = http
        self.tools_mode = tools_mode
        self.history: dict[str, list[dict]] = {}

    async def run_turn(self, chat: str, text: str) -> str:
        messages = self.history.get(chat, []) + [{"role": "user", "content": text}]
        content = ""
        for _ in range(MAX_ROUNDS):
            content, calls = await self._complete(messages)
            if not calls:
                break
            messages.append({"role": "assistant", "content": content or None,
                             "tool_calls": calls})
            for call in calls:
                result = await self._tool(call["function"]["name"],
                                          call["function"]["arguments"])
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": result})
        self.history[chat] = (self.history.get(chat, []) + [
            {"role": "user", "content": text},
            {"role": "assistant", "content": content}])[-HISTORY_MESSAGES:]
        return content

    async def _complete(self, messages: list[dict]) -> tuple[str, list[dict]]:
        body = {"model": self.model, "messages": messages, "stream": True,
                "tools": [schema for _, schema in TOOLS.values()]}
        content: list[str] = []
        calls: dict[int, dict] = {}
        async with self.http.stream("POST", self.url, json=body, headers=self.headers,
                                    timeout=120) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                delta = json.loads(line[6:])["choices"][0]["delta"]
                content.append(delta.get("content") or "")
                for tc in delta.get("tool_calls") or []:
                    call = calls.setdefault(tc["index"], {
                        "id": "", "type": "function", "function": {"name": "", "arguments": ""}})
                    call["id"] = tc.get("id") or call["id"]
                    fn = tc.get("function") or {}
                    call["function"]["name"] += fn.get("name") or ""
                    call["function"]["arguments"] += fn.get("arguments") or ""
        return "".join(content), [calls[i] for i in sorted(calls)]

    async def _tool(self, name: str, arguments: str) -> str:
        fn = TOOLS[name][0]
        call = functools.partial(fn, **json.loads(arguments or "{}"))
        try:
            if self.tools_mode == "inline":
                result = call()  # on the loop: nothing else runs until it returns
            else:
                result = await asyncio.get_running_loop().run_in_executor(None, call)
        except Exception as e:  # noqa: BLE001  (the model sees the error, as usual)
            return f"error: {e}"
        return str(result)
