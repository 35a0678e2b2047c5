"""Tools the model may call: the `@tool` decorator, the registry, and one call from start to end.

    from hermes_green.agent.tools import tool

    @tool(executor="process", timeout_s=30)
    def count_primes(limit: int) -> int:
        '''Count the prime numbers below `limit`.

        Args:
            limit: exclusive upper bound, at most 10 million
        '''

The decorator returns the function itself (still callable as before) with a `ToolSpec` attached;
the JSON schema the model sees comes from the type hints and the docstring, and the model's
arguments are validated against the same hints before the call. The executor is the tool
author's choice (see executors.py); the default `thread` never blocks the hub even when the
author did not think about it. Pure-Python CPU work should say `process`. `inline` is for
network I/O through patched sockets only, because an inline tool runs on the hub and its
timeout cannot interrupt a computation: what it must compute on what it received goes to the
process pool with `executors.offload()` (fetch_url parses pages that way). A chat user picks
the arguments, so a tool must also refuse, with a clear error, an input it cannot handle
cheaply, whatever its executor.

Modules listed in `agent.tools` are imported at start-up and every tool found in them is
registered; a module that cannot be imported is a ConfigError.

This module is also imported by worker processes (tool modules import `tool` from here), so it
imports only the standard library at module level: pydantic is loaded when a schema is built.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger("hermes_green.agent.tools")

DEFAULT_TIMEOUT_S = 60.0
DEFAULT_MAX_RESULT_CHARS = 16_000
_EXECUTORS = ("inline", "thread", "process")
_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")  # what OpenAI accepts as a function name


class ToolDefinitionError(TypeError):
    """A `@tool` function cannot be offered to the model (bad name, executor, signature)."""


@dataclass(frozen=True)
class ToolResult:
    """What goes back to the model as the tool message, and whether the call worked."""
    content: str
    ok: bool


class ToolSpec:
    """A tool's name, executor, limits, and (built on first use) its schema and validator."""

    def __init__(self, fn: Callable, *, name: str, executor: str, timeout_s: float,
                 max_result_chars: int, description: str, takes_context: bool = False) -> None:
        self.fn = fn
        self.name = name
        self.executor = executor
        self.timeout_s = timeout_s
        self.max_result_chars = max_result_chars
        self.description = description
        # The tool's `context` parameter gets the turn's ToolContext (agent/base.py), never a
        # value from the model; it is not part of the schema.
        self.takes_context = takes_context

    def __repr__(self) -> str:
        return f"ToolSpec({self.name!r}, executor={self.executor!r}, timeout_s={self.timeout_s:g})"

    @functools.cached_property
    def _model(self):
        """A pydantic model of the parameters: the validator and the schema's source."""
        from pydantic import ConfigDict, Field, create_model

        try:
            hints = _type_hints(self.fn)
            fields: dict[str, Any] = {}
            docs = _param_docs(inspect.getdoc(self.fn) or "")
            for pname, param in inspect.signature(self.fn).parameters.items():
                if self.takes_context and pname == "context":
                    continue
                if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                    raise ToolDefinitionError(f"tool {self.name!r}: *args/**kwargs are not "
                                              f"supported; name every parameter")
                if pname not in hints:
                    raise ToolDefinitionError(f"tool {self.name!r}: parameter {pname!r} needs "
                                              f"a type hint")
                default = ... if param.default is param.empty else param.default
                fields[pname] = (hints[pname], Field(default, description=docs.get(pname)))
            return create_model(f"{self.name}_arguments",
                                __config__=ConfigDict(extra="forbid"), **fields)
        except ToolDefinitionError:
            raise
        except Exception as e:  # noqa: BLE001  (pydantic cannot handle some hint)
            raise ToolDefinitionError(f"tool {self.name!r}: cannot build a schema from its "
                                      f"type hints ({type(e).__name__}: {e})") from None

    @functools.cached_property
    def parameters_schema(self) -> dict:
        schema = self._model.model_json_schema()
        schema.pop("title", None)
        for prop in schema.get("properties", {}).values():
            prop.pop("title", None)
        schema.setdefault("properties", {})
        return schema

    def openai_schema(self) -> dict:
        """The entry for the request's `tools` list."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description,
            "parameters": self.parameters_schema}}

    def validate(self, arguments: dict) -> dict:
        """The model's arguments, checked and coerced by the type hints; ValueError if wrong."""
        from pydantic import ValidationError

        try:
            model = self._model.model_validate(arguments)
        except ValidationError as e:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(arguments)'}: {err['msg']}"
                for err in e.errors(include_url=False, include_input=False)[:5])
            raise ValueError(problems) from None
        return {k: getattr(model, k) for k in type(model).model_fields}


def tool(fn: Callable | None = None, *, executor: str = "thread",
         timeout_s: float = DEFAULT_TIMEOUT_S, name: str | None = None,
         max_result_chars: int = DEFAULT_MAX_RESULT_CHARS, takes_context: bool = False):
    """Mark a plain function as a tool. Usable bare (`@tool`) or with options (`@tool(...)`).
    `takes_context`: the function's `context` parameter receives the turn's ToolContext (what
    the turn lets a tool do besides returning text, e.g. send a file); inline/thread only."""
    def mark(func: Callable) -> Callable:
        spec = _make_spec(func, executor=executor, timeout_s=timeout_s, name=name,
                          max_result_chars=max_result_chars, takes_context=takes_context)
        func.__hermes_tool__ = spec
        return func
    return mark(fn) if fn is not None else mark


def _make_spec(func, *, executor, timeout_s, name, max_result_chars,
               takes_context=False) -> ToolSpec:
    if not callable(func) or inspect.isclass(func):
        raise ToolDefinitionError(f"@tool expects a function, got {func!r}")
    tool_name = name or func.__name__
    if not _NAME.match(tool_name):
        raise ToolDefinitionError(f"tool name {tool_name!r}: use letters, digits, _ or -")
    if executor not in _EXECUTORS:
        raise ToolDefinitionError(f"tool {tool_name!r}: executor must be one of {_EXECUTORS}, "
                                  f"not {executor!r}")
    if not timeout_s > 0:
        raise ToolDefinitionError(f"tool {tool_name!r}: timeout_s must be > 0")
    if executor == "process" and ("<locals>" in func.__qualname__
                                  or "<lambda>" in func.__qualname__):
        raise ToolDefinitionError(f"tool {tool_name!r}: a process tool must be a module-level "
                                  f"function (the worker imports it by name)")
    if takes_context and (executor == "process"
                          or "context" not in inspect.signature(func).parameters):
        raise ToolDefinitionError(f"tool {tool_name!r}: takes_context needs a `context` "
                                  f"parameter and an inline or thread executor")
    doc = inspect.getdoc(func) or ""
    description = _description(doc) or tool_name.replace("_", " ")
    return ToolSpec(func, name=tool_name, executor=executor, timeout_s=float(timeout_s),
                    max_result_chars=max_result_chars, description=description,
                    takes_context=takes_context)


def get_spec(obj: Any) -> ToolSpec | None:
    spec = getattr(obj, "__hermes_tool__", None)
    return spec if isinstance(spec, ToolSpec) else None


# -- docstrings -------------------------------------------------------------------------------

_SECTION = re.compile(r"^(Args|Arguments|Parameters|Params|Returns|Raises|Example|Examples):\s*$")
_GOOGLE_ARG = re.compile(r"^\s+(\*{0,2}\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_SPHINX_ARG = re.compile(r"^\s*:param\s+(?:[\w\[\], |]+\s+)?(\w+)\s*:\s*(.*)$")


def _description(doc: str) -> str:
    """The docstring up to its first section header or `:param`, as one paragraph."""
    lines = []
    for line in doc.splitlines():
        if _SECTION.match(line.strip()) or line.strip().startswith(":param"):
            break
        lines.append(line.strip())
    return " ".join(" ".join(lines).split())[:1024]


def _param_docs(doc: str) -> dict[str, str]:
    """Per-parameter text from Google style (`Args:` / `    name: text`) or `:param name: text`."""
    out: dict[str, str] = {}
    in_args, current = False, None
    for line in doc.splitlines():
        m = _SPHINX_ARG.match(line)
        if m:
            current = m.group(1)
            out[current] = m.group(2).strip()
            continue
        header = _SECTION.match(line.strip())
        if header:
            in_args = header.group(1) in ("Args", "Arguments", "Parameters", "Params")
            current = None
            continue
        if in_args:
            m = _GOOGLE_ARG.match(line)
            if m and len(line) - len(line.lstrip()) <= 4:
                current = m.group(1).lstrip("*")
                out[current] = m.group(2).strip()
            elif current and line.strip():
                out[current] = f"{out[current]} {line.strip()}".strip()
            elif not line.strip():
                current = None
    return {k: v for k, v in out.items() if v}


def _type_hints(fn: Callable) -> dict[str, Any]:
    import typing
    return typing.get_type_hints(fn)


# -- the registry -----------------------------------------------------------------------------

class ToolRegistry:
    """The tools offered to the model, by name."""

    def __init__(self, tools: list[Callable | ToolSpec] = ()) -> None:
        self._specs: dict[str, ToolSpec] = {}
        for t in tools:
            self.add(t)

    def add(self, tool_or_spec: Callable | ToolSpec) -> ToolSpec:
        spec = tool_or_spec if isinstance(tool_or_spec, ToolSpec) else get_spec(tool_or_spec)
        if spec is None:
            raise ToolDefinitionError(f"{tool_or_spec!r} is not decorated with @tool")
        old = self._specs.get(spec.name)
        if old is not None and old.fn is not spec.fn:
            raise ToolDefinitionError(f"tool name {spec.name!r} is defined twice "
                                      f"({_where(old.fn)} and {_where(spec.fn)})")
        spec.parameters_schema  # noqa: B018  (build it now: a bad hint fails at start-up)
        self._specs[spec.name] = spec
        return spec

    @classmethod
    def from_modules(cls, modules: list[str]) -> "ToolRegistry":
        """Import each module and register every @tool found in it; ConfigError otherwise."""
        from hermes_green.config import ConfigError

        registry = cls()
        for module_name in modules:
            try:
                module = importlib.import_module(module_name)
            except Exception as e:  # noqa: BLE001  (any import failure is a config problem)
                detail = f"{type(e).__name__}"
                if not isinstance(e, ModuleNotFoundError):
                    detail += f": {str(e)[:200]}"
                raise ConfigError(f"agent.tools: cannot import module '{module_name}' "
                                  f"({detail})") from None
            found = [spec for value in vars(module).values() if (spec := get_spec(value))]
            if not found:
                log.warning("tool module has no @tool functions module=%s", module_name)
            for spec in found:
                try:
                    registry.add(spec)
                except ToolDefinitionError as e:
                    raise ConfigError(f"agent.tools: module '{module_name}': {e}") from None
        return registry

    def get(self, name: str) -> ToolSpec | None:
        return self._specs.get(name)

    def names(self) -> list[str]:
        return sorted(self._specs)

    def specs(self) -> list[ToolSpec]:
        return [self._specs[n] for n in self.names()]

    def schemas(self) -> list[dict]:
        return [spec.openai_schema() for spec in self.specs()]

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, name: str) -> bool:
        return name in self._specs


def _where(fn: Callable) -> str:
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', '?')}"


# -- one call ---------------------------------------------------------------------------------

def call_tool(registry: ToolRegistry, executors, name: str, arguments: str | dict | None, *,
              chat_key: tuple[str, str] = ("-", "-"), context: Any = None) -> ToolResult:
    """Run one tool call from the model and turn every outcome into the tool message's text.

    A tool that raises, times out, crashes its worker or returns something huge gives the model
    an error or truncated text; only the turn's own cancellation (GreenletExit) escapes.
    """
    spec = registry.get(name)
    if spec is None:
        return ToolResult(f"Error: there is no tool named {name!r}. Available tools: "
                          f"{', '.join(registry.names()) or '(none)'}.", ok=False)
    try:
        args = _parse_arguments(arguments)
        kwargs = spec.validate(args)
    except ValueError as e:
        return ToolResult(f"Error: invalid arguments for {name}: {e}", ok=False)
    if spec.takes_context:
        kwargs["context"] = context
    started = time.monotonic()
    try:
        value = executors.run(spec.executor, spec.fn, (), kwargs, timeout_s=spec.timeout_s,
                              label=spec.name)
    except Exception as e:  # noqa: BLE001  (the model hears about it; the turn goes on)
        log.warning("tool failed platform=%s chat=%s tool=%s executor=%s ms=%.0f error=%s",
                    *chat_key, name, spec.executor, (time.monotonic() - started) * 1000,
                    type(e).__name__)
        return ToolResult(f"Error: {name} failed: {_describe_error(e)}", ok=False)
    log.info("tool done platform=%s chat=%s tool=%s executor=%s ms=%.0f", *chat_key, name,
             spec.executor, (time.monotonic() - started) * 1000)
    return ToolResult(_to_text(value, spec.max_result_chars), ok=True)


def _parse_arguments(arguments: str | dict | None) -> dict:
    if arguments is None or arguments == "":
        return {}
    if isinstance(arguments, dict):
        return arguments
    try:
        parsed = json.loads(arguments)
    except ValueError as e:
        raise ValueError(f"the arguments are not valid JSON ({e.msg} at char {e.pos})") from None
    if not isinstance(parsed, dict):
        raise ValueError("the arguments must be a JSON object")
    return parsed


def _describe_error(e: Exception) -> str:
    from .executors import ExecutorError  # deferred: workers import this module without gevent

    text = str(e) if isinstance(e, ExecutorError) else f"{type(e).__name__}: {e}"
    return text[:1000]


def _to_text(value: Any, limit: int) -> str:
    if isinstance(value, str):
        text = value
    elif isinstance(value, bytes):
        text = value.decode("utf-8", errors="replace")
    else:
        try:
            text = json.dumps(value, ensure_ascii=False, default=str)
        except (TypeError, ValueError):
            text = repr(value)
    if len(text) > limit:
        text = f"{text[:limit]}\n[truncated: the result had {len(text)} characters, " \
               f"only the first {limit} are shown]"
    return text
