"""YAML configuration to typed, validated objects.

Why pydantic: it gives us strict types, defaults, unknown-key rejection and a precise error
location for free; what we add is the user-facing part: `${VAR}` substitution, error lines that
name the key path (``platforms.wecom.bot_id: field required``), "did you mean" hints, YAML
line/column, and the guarantee that a secret value never appears in a repr, a log or an error:
an error shows a key only when it is shaped like ours (a key such as `secret:abc123`, where a
missing space glued the value on, is shown by its line and column). The YAML itself is bounded
(size, nesting, aliases) by `safe_yaml` before anything walks it.
"""
from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple, Optional

import yaml
from pydantic import (BaseModel, Field, SecretStr, ValidationError, create_model, field_validator,
                      model_validator)

from .platforms import registry
from .platforms.botconfig import BackoffConfig, BotConfig, RateLimitConfig, StrictModel

from . import safe_yaml

__all__ = [
    "ConfigError", "Config", "GatewayConfig", "StatusConfig", "AgentConfig", "AgentServiceConfig",
    "ExecutorsConfig", "MediaConfig", "TranscribeConfig", "PlatformsConfig", "BotConfig",
    "BotSection", "BackoffConfig", "BusyConfig", "RateLimitConfig",
    "load_config", "parse_config",
]


class ConfigError(Exception):
    """The configuration cannot be used. The message is one line, safe to print: it names the
    key path and what was expected and never contains a secret value. Caller: exit 2."""


_Strict = StrictModel


class BotSection(NamedTuple):
    """One enabled bot: its platform, its id (unique within the platform) and its section."""
    platform: str
    id: str
    config: BotConfig

    @property
    def label(self) -> str:
        """How logs, status cards and `check` name it: the platform alone for a single bot."""
        return self.platform if self.id == self.platform else f"{self.platform}/{self.id}"


class _PlatformsBase(StrictModel):
    """A platform absent from the file is off; a present one is on unless `enabled: false`. A
    platform takes one mapping (one bot, whose id is the platform's name) or a list of them,
    each with its own `id`."""

    @model_validator(mode="before")
    @classmethod
    def _one_or_many(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: [v] if isinstance(v, dict) else v for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _ids(self) -> "_PlatformsBase":
        for name in type(self).model_fields:
            bots = getattr(self, name)
            if not bots:
                continue
            if len(bots) == 1 and not bots[0].id:
                object.__setattr__(self, name, [bots[0].model_copy(update={"id": name})])
                continue
            seen: set[str] = set()
            for i, bot in enumerate(bots):
                if not bot.id:
                    raise ValueError(f"{name}.{i}.id: each bot in a list needs an id")
                if bot.id in seen:
                    raise ValueError(f"{name}.{i}.id: duplicate bot id {bot.id!r}")
                seen.add(bot.id)
        return self

    def bots(self) -> list[BotSection]:
        """Every enabled bot, in file order within each platform."""
        return [BotSection(name, bot.id, bot) for name in type(self).model_fields
                for bot in (getattr(self, name) or ()) if bot.enabled]

    def enabled(self) -> dict[str, BotConfig]:
        """Enabled bots by label (the platform's name for a single bot)."""
        return {b.label: b.config for b in self.bots()}


class PlatformsConfig(_PlatformsBase):
    """The `platforms:` section. Its model is made for the platforms the file names (see
    `_for_names`): a platform's module, and with it its config model, is imported only when its
    section is there, so a WeCom + QQ gateway never loads the other platforms. An unknown name
    stays in the data and is refused as an unknown key ("did you mean" reads the cheap name
    list). A known platform the file does not name reads as None, as a field left out would."""

    @model_validator(mode="wrap")
    @classmethod
    def _lazy_fields(cls, data: Any, handler) -> Any:
        if cls is PlatformsConfig and isinstance(data, dict) and data:
            known = frozenset(k for k in data if isinstance(k, str) and k in registry.names())
            if known:
                return _for_names(known).model_validate(data)
        return handler(data)

    def __getattr__(self, name: str) -> Any:
        if name in registry.names():
            return None
        return super().__getattr__(name)


@lru_cache(maxsize=64)
def _for_names(names: frozenset[str]) -> type[PlatformsConfig]:
    fields: dict[str, Any] = {name: (Optional[list[registry.spec(name).config]], None)
                              for name in sorted(names)}
    return create_model("PlatformsConfig", __base__=PlatformsConfig, **fields)


def _platform_model(name: str) -> type[BaseModel] | None:
    """The config model of one platform (imports its module), None for an unknown name."""
    return registry.spec(name).config if name in registry.names() else None


class StatusConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8765, ge=0, le=65535)
    token: Optional[SecretStr] = None
    enabled: bool = True

    @model_validator(mode="after")
    def _token_off_loopback(self) -> "StatusConfig":
        if self.enabled and self.host not in ("127.0.0.1", "localhost", "::1") and self.token is None:
            raise ValueError(f"a token is required when the status server listens on {self.host} "
                             "(set gateway.status.token)")
        return self


class BusyConfig(_Strict):
    """What a chat's waiting messages may cost (hermes_green/sessions.py)."""
    # Messages that arrive this close together (a user splitting one thought into several
    # messages) become one turn; 0: off.
    debounce_ms: int = Field(0, ge=0, le=60_000)
    # Messages waiting per chat; beyond it one is skipped (`drop`) and the user told once.
    queue_cap: int = Field(20, ge=1, le=10_000)
    drop: Literal["oldest", "newest"] = "oldest"


class GatewayConfig(_Strict):
    data_dir: Path = Path("./data")
    # Where the journal, outbox and history live: unset, the SQLite file in data_dir; a Redis
    # URL (redis://host:port/db, rediss:// for TLS, unix:///path.sock) shares them between
    # the processes of a deployment, which may then take roles (`--role`, SCALE.md).
    store: Optional[str] = None
    # A message sent while the chat's turn runs: waits (queue), ends the turn (interrupt), joins
    # the others into one next turn (merge), or reaches the running turn after its current tool
    # round (steer).
    busy_mode: Literal["queue", "interrupt", "merge", "steer"] = "queue"
    busy: BusyConfig = Field(default_factory=BusyConfig)
    drain_timeout_s: float = Field(30.0, ge=0)
    # A turn's progress (streamed text, a card, typing, edits) is shown once it has run this
    # long; an answer ready sooner arrives as one plain reply (hermes_green/progress.py).
    progress_after_s: float = Field(0.5, ge=0, le=60)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["kv", "json"] = "kv"
    status: StatusConfig = Field(default_factory=StatusConfig)
    # The hub is checked this often for greenlets that hold it; reported when held longer.
    max_blocking_time_s: float = Field(0.1, gt=0)

    @field_validator("store")
    @classmethod
    def _redis_url(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.fullmatch(r"(redis|rediss|unix)://\S+", value):
            raise ValueError("must be a Redis URL such as redis://127.0.0.1:6379/0 (or leave "
                             "it out for the SQLite file in data_dir)")
        return value


class AgentServiceConfig(_Strict):
    """`agent.backend: service`: how our conversation id reaches the agent service."""
    # hermes-agent's API server continues the session this header names (only for a client
    # that sends its API_SERVER_KEY); other services may name theirs differently.
    conversation_header: str = Field("X-Hermes-Session-Id", pattern=r"^[A-Za-z0-9-]{1,64}$")
    # Mixed into every conversation id, so two gateways sharing one agent service never share
    # a conversation because their chats happen to have equal ids.
    namespace: str = ""


# What `backend: service` changes in the defaults: hermes-agent's API server on its default
# port and model alias; no tools or system prompt of ours (the service has its own); no
# retries, since a retried message could run twice in an agent that acts on it.
_SERVICE_DEFAULTS = {"base_url": "http://127.0.0.1:8642/v1", "model": "hermes-agent",
                     "system_prompt": "", "tools": [], "max_retries": 0}


class TranscribeConfig(_Strict):
    """`agent.transcribe`: an OpenAI-compatible `/audio/transcriptions` endpoint for voice
    messages the platform did not transcribe itself. base_url / api_key default to the agent's."""
    base_url: Optional[str] = None
    api_key: Optional[SecretStr] = None
    model: str = "whisper-1"
    language: Optional[str] = None
    timeout_s: float = Field(60.0, gt=0)


class AgentConfig(_Strict):
    """An OpenAI-compatible endpoint (OpenAI, vLLM, Ollama, OpenRouter, ...), or with
    `backend: service` a remote agent behind one (hermes-agent's API server)."""
    # builtin: our loop with `tools`; service: only the new text and a stable conversation id
    # are sent, and the service keeps history, tools and memory (hermes_green/agent/service.py).
    backend: Literal["builtin", "service"] = "builtin"
    service: AgentServiceConfig = Field(default_factory=AgentServiceConfig)
    base_url: str = "https://api.openai.com/v1"
    api_key: Optional[SecretStr] = None
    model: str = "gpt-4o-mini"
    system_prompt: str = "You are a helpful assistant reachable through chat platforms."
    timeout_s: float = Field(120.0, gt=0)
    connect_timeout_s: float = Field(10.0, gt=0)
    max_retries: int = Field(3, ge=0)
    max_tool_rounds: int = Field(8, ge=0)
    max_history: int = Field(40, ge=0)
    tools: list[str] = Field(default_factory=lambda: ["hermes_green.agent.builtin_tools"])
    extra_headers: dict[str, str] = Field(default_factory=dict)
    # Images the user sent go to the model as image_url parts (the model must accept images);
    # off, they are files the tools may read. Larger images are handed over as files only.
    vision: bool = False
    vision_max_bytes: int = Field(5 * 1024 * 1024, gt=0)
    transcribe: Optional[TranscribeConfig] = None
    # The built-in send_file tool (files go to the chat through the outbox, after the answer).
    send_files: bool = True

    @model_validator(mode="before")
    @classmethod
    def _service_defaults(cls, data: Any) -> Any:
        if not (isinstance(data, dict) and data.get("backend") == "service"):
            return data
        if data.get("tools"):
            raise ValueError("tools are not used with backend: service (the agent service runs "
                             "its own; remove agent.tools or use backend: builtin)")
        return {**_SERVICE_DEFAULTS, **data}

    @model_validator(mode="after")
    def _service_needs_key(self) -> "AgentConfig":
        if self.backend == "service" and self.api_key is None:
            raise ValueError("backend: service needs api_key (hermes-agent continues a "
                             "conversation only for a client with its API_SERVER_KEY)")
        return self


class ExecutorsConfig(_Strict):
    threads: int = Field(4, ge=1, le=256)
    processes: int = Field(1, ge=1, le=64)


class MediaConfig(_Strict):
    """Files users send (fetched at receipt: platform URLs expire within minutes) and files the
    agent sends. Stored under `gateway.data_dir`/media (in/ and out/), deleted after
    `retention_days`."""
    max_bytes: int = Field(20 * 1024 * 1024, gt=0)
    retention_days: float = Field(7.0, gt=0)
    # A turn waits this long for its message's downloads, then goes on with a note.
    wait_s: float = Field(60.0, gt=0)
    download_timeout_s: float = Field(120.0, gt=0)
    concurrent_downloads: int = Field(4, ge=1, le=64)
    # What may be stored (fnmatch patterns of MIME types, checked against the sniffed type).
    allowed_types: list[str] = Field(default_factory=lambda: [
        "image/*", "audio/*", "video/*", "text/*", "application/pdf", "application/json",
        "application/zip", "application/gzip", "application/x-tar", "application/msword",
        "application/vnd.*", "application/octet-stream"])
    # send_file sends only files under these directories (besides data_dir/media itself).
    outbound_dirs: list[Path] = Field(default_factory=list)


class Config(_Strict):
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    media: MediaConfig = Field(default_factory=MediaConfig)
    # No `agent` section: the echo agent answers (useful to test platform wiring alone).
    agent: Optional[AgentConfig] = None
    executors: ExecutorsConfig = Field(default_factory=ExecutorsConfig)
    platforms: PlatformsConfig = Field(default_factory=PlatformsConfig)


# --- ${VAR} substitution -------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def _substitute(node: Any, loc: tuple, env: dict[str, str], where) -> Any:
    """`where(loc)` formats the key path for an error (see `_KeyPaths`)."""
    if isinstance(node, dict):
        return {k: _substitute(v, (*loc, k), env, where) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, (*loc, i), env, where) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        def repl(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"{where(loc)}: environment variable {name} is not set "
                              f"(set it, or write ${{{name}:-default}})")
        return _VAR.sub(repl, node)
    return node


# --- errors ---------------------------------------------------------------------------------

def _first_model(ann: Any) -> type[BaseModel] | None:
    """The model inside an annotation such as Optional[list[Model]]."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()):
        found = _first_model(arg)
        if found is not None:
            return found
    return None


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model class that owns the key at `loc` (for "did you mean")."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        if isinstance(model, type) and issubclass(model, PlatformsConfig):
            model = _platform_model(part) if isinstance(part, str) else None
            if model is None:
                return None
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        model = _first_model(field.annotation)
        if model is None:
            return None
    return model if isinstance(model, type) else None


# A key is shown in an error only when it is shaped like ours: short lowercase snake_case words
# with few digits. Anything else may carry a secret: `secret:abc123` (no space after the colon,
# so YAML reads one plain key), `Authorization=Bearer ...`, a token pasted in the key's place.
_PLAIN_KEY = re.compile(r"[a-z][a-z0-9]*(?:_[a-z0-9]+)*")
_GLUE = re.compile(r"[:=]")


def _plain(key: Any) -> bool:
    return (isinstance(key, str) and len(key) <= 40 and _PLAIN_KEY.fullmatch(key) is not None
            and sum(c.isdigit() for c in key) <= 2
            and all(len(word) <= 16 for word in key.split("_")))


class _KeyPaths:
    """Formats a location (keys and list indexes from the top) for an error: plain keys as they
    are, any other key masked as `<key at line L, column C>` (its place in the file, never its
    text)."""

    def __init__(self, root: yaml.Node | None) -> None:
        self.root = root

    def __call__(self, loc: tuple) -> str:
        parts, node = [], self.root
        for part in loc:
            in_list = isinstance(node, yaml.SequenceNode)
            node, mark = safe_yaml.child(node, part)
            if _plain(part) or (in_list and isinstance(part, int)):
                parts.append(str(part))
            elif mark is not None:
                parts.append(f"<key at line {mark.line + 1}, column {mark.column + 1}>")
            else:
                parts.append("<key>")
        return ".".join(parts) or "(top level)"


def _unknown_key_hint(loc: tuple) -> str:
    key, model = loc[-1], _model_at(loc)
    if _plain(key):
        if model is not None and issubclass(model, PlatformsConfig):
            fields = list(registry.names())  # every platform, none of them imported
        else:
            fields = list(model.model_fields) if model is not None else []
        import difflib  # a config with an unknown key only (0.2 MB a running gateway never needs)
        close = difflib.get_close_matches(key, fields, n=1, cutoff=0.6)
        return f" (did you mean '{close[0]}'?)" if close else ""
    glue = _GLUE.search(key) if isinstance(key, str) else None
    if glue is not None and _plain(head := key[:glue.start()].strip()):
        return (f" (is a space missing after '{head}{glue.group(0)}'? the rest of the key is "
                f"not shown)")
    return " (not shown: it may hold a secret)"


def _describe(err: dict, where: _KeyPaths, single: frozenset[str] = frozenset()) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    if len(loc) > 2 and loc[0] == "platforms" and loc[1] in single and loc[2] == 0:
        loc = loc[:2] + loc[3:]  # a platform written as one mapping: no list index to show
    path = where(loc)
    kind = err["type"]
    if kind == "missing":
        return f"{path}: field required"
    if kind == "extra_forbidden":
        return f"{path}: unknown key{_unknown_key_hint(loc)}"
    # pydantic's messages describe the expectation, not the input value, so they carry no secret.
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{path}: {msg[:1].lower()}{msg[1:]}"


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")


def _safe_problem(problem: str | None) -> str:
    """PyYAML's problem text quotes what it found (a character, an alias or tag name): keep short
    or plain ones, mask the rest."""
    def mask(m: re.Match) -> str:
        inner = m.group(0)[1:-1]
        return m.group(0) if len(inner) <= 4 or _plain(inner) else "'...'"
    return _QUOTED.sub(mask, problem or "")


def parse_config(text: str, *, source: str = "<config>", env: dict[str, str] | None = None) -> Config:
    """Parse YAML text into a Config, or raise ConfigError with one clear line. The input is
    bounded (size, nesting, aliases: see safe_yaml) before anything walks it."""
    limit = safe_yaml.MAX_BYTES  # characters first: a huge string is not encoded to be measured
    if len(text) > limit or len(text.encode("utf-8", "surrogatepass")) > limit:
        raise ConfigError(f"{source}: larger than {safe_yaml.MAX_BYTES // 1024} KiB; a config "
                          f"file is a few KiB")
    try:
        raw, root = safe_yaml.load(text)
    except safe_yaml.Refused as e:
        raise ConfigError(f"{source}: refused at line {e.mark.line + 1}, column "
                          f"{e.mark.column + 1}: {e.problem}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{source}: invalid YAML at {where}: "
                          f"{_safe_problem(e.problem or e.context)}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {type(e).__name__}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections "
                          f"(gateway, agent, executors, platforms)")
    where = _KeyPaths(root)
    raw = _substitute(raw, (), dict(os.environ) if env is None else env, where)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        errors = e.errors(include_input=False, include_url=False)
        # A mistyped key also makes its intended key "missing": name the typo first.
        errors.sort(key=lambda err: err["type"] != "extra_forbidden")
        platforms = raw.get("platforms")
        single = frozenset(k for k, v in platforms.items() if isinstance(v, dict)) \
            if isinstance(platforms, dict) else frozenset()
        first = _describe(errors[0], where, single)
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(first + more) from None


def load_config(path: str | os.PathLike, *, env: dict[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        with p.open("rb") as f:  # read one byte past the limit: /dev/zero or a growing file too
            data = f.read(safe_yaml.MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config file ({type(e).__name__})") from None
    if len(data) > safe_yaml.MAX_BYTES:
        raise ConfigError(f"{p}: larger than {safe_yaml.MAX_BYTES // 1024} KiB; a config file "
                          f"is a few KiB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: cannot read config file (not UTF-8)") from None
    return parse_config(text, source=str(p), env=env)
