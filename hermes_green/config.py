"""YAML configuration to typed, validated objects.

Why pydantic: it gives us strict types, defaults, unknown-key rejection and a precise error
location for free; what we add is the user-facing part: `${VAR}` substitution, error lines that
name the key path (``platforms.wecom.bot_id: field required``), "did you mean" hints, YAML
line/column, and the guarantee that a secret value never appears in a repr, a log or an error.
"""
from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any, Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

__all__ = [
    "ConfigError", "Config", "GatewayConfig", "StatusConfig", "AgentConfig", "AgentServiceConfig",
    "ExecutorsConfig",
    "PlatformsConfig", "PlatformConfig", "BackoffConfig", "WeComConfig", "FeishuConfig",
    "QQBotConfig", "load_config", "parse_config",
]


class ConfigError(Exception):
    """The configuration cannot be used. The message is one line, safe to print: it names the
    key path and what was expected and never contains a secret value. Caller: exit 2."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class BackoffConfig(_Strict):
    """Reconnect timing: exponential backoff with full jitter, reset after a healthy period."""
    initial_s: float = Field(1.0, gt=0)
    max_s: float = Field(60.0, gt=0)
    factor: float = Field(2.0, ge=1)
    healthy_after_s: float = Field(60.0, gt=0)


class PlatformConfig(_Strict):
    """Keys every platform takes."""
    enabled: bool = True
    allow_from: list[str] = Field(default_factory=list)
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)


class WeComConfig(PlatformConfig):
    bot_id: str
    secret: SecretStr
    url: str = "wss://openws.work.weixin.qq.com"
    ping_interval_s: float = Field(30.0, gt=0)
    # How long to wait for the server's answer to a reply frame before the outbox retries it.
    ack_timeout_s: float = Field(5.0, gt=0)
    # Stream updates are throttled to about one a second; the stream is finished before the
    # server's ~6 minute limit and the rest goes out as a proactive message.
    stream_update_interval_s: float = Field(1.0, ge=0)
    stream_max_s: float = Field(300.0, gt=0)


class FeishuConfig(PlatformConfig):
    app_id: str
    app_secret: SecretStr
    domain: str = "https://open.feishu.cn"


class QQBotConfig(PlatformConfig):
    app_id: str
    client_secret: SecretStr
    api_base: str = "https://api.sgroup.qq.com"
    token_url: str = "https://bots.qq.com/app/getAppAccessToken"
    # GROUP_AND_C2C_EVENT (1<<25); add 1<<30 / 1<<12 for guild channels and guild DMs.
    intents: int = 1 << 25


class PlatformsConfig(_Strict):
    """A platform absent from the file is off; present ones are on unless `enabled: false`."""
    wecom: Optional[WeComConfig] = None
    feishu: Optional[FeishuConfig] = None
    qqbot: Optional[QQBotConfig] = None

    def enabled(self) -> dict[str, PlatformConfig]:
        return {name: cfg for name in type(self).model_fields
                if (cfg := getattr(self, name)) is not None and cfg.enabled}


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


class GatewayConfig(_Strict):
    data_dir: Path = Path("./data")
    busy_mode: Literal["queue", "interrupt", "merge"] = "queue"
    drain_timeout_s: float = Field(30.0, ge=0)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["kv", "json"] = "kv"
    status: StatusConfig = Field(default_factory=StatusConfig)
    # The hub is checked this often for greenlets that hold it; reported when held longer.
    max_blocking_time_s: float = Field(0.1, gt=0)


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


class Config(_Strict):
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    # No `agent` section: the echo agent answers (useful to test platform wiring alone).
    agent: Optional[AgentConfig] = None
    executors: ExecutorsConfig = Field(default_factory=ExecutorsConfig)
    platforms: PlatformsConfig = Field(default_factory=PlatformsConfig)


# --- ${VAR} substitution -------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-(.*?))?\}")


def _substitute(node: Any, path: str, env: dict[str, str]) -> Any:
    if isinstance(node, dict):
        return {k: _substitute(v, f"{path}.{k}" if path else str(k), env) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute(v, f"{path}.{i}", env) for i, v in enumerate(node)]
    if isinstance(node, str) and "${" in node:
        def repl(m: re.Match) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(f"{path}: environment variable {name} is not set "
                              f"(set it, or write ${{{name}:-default}})")
        return _VAR.sub(repl, node)
    return node


# --- errors ---------------------------------------------------------------------------------

def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model class that owns the key at `loc` (for "did you mean")."""
    model: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        for cand in getattr(ann, "__args__", ()) or (ann,):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                model = cand
                break
        else:
            return None
    return model if isinstance(model, type) else None


def _describe(err: dict) -> str:
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    path = ".".join(str(p) for p in loc) or "(top level)"
    kind = err["type"]
    if kind == "missing":
        return f"{path}: field required"
    if kind == "extra_forbidden":
        model = _model_at(loc)
        hint = ""
        if model is not None:
            close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1, cutoff=0.6)
            if close:
                hint = f" (did you mean '{close[0]}'?)"
        return f"{path}: unknown key{hint}"
    # pydantic's messages describe the expectation, not the input value, so they carry no secret.
    msg = err["msg"]
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{path}: {msg[:1].lower()}{msg[1:]}"


def parse_config(text: str, *, source: str = "<config>", env: dict[str, str] | None = None) -> Config:
    """Parse YAML text into a Config, or raise ConfigError with one clear line."""
    try:
        raw = yaml.safe_load(text)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(f"{source}: invalid YAML at {where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: invalid YAML: {type(e).__name__}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections "
                          f"(gateway, agent, executors, platforms)")
    raw = _substitute(raw, "", dict(os.environ) if env is None else env)
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        errors = e.errors(include_input=False, include_url=False)
        # A mistyped key also makes its intended key "missing": name the typo first.
        errors.sort(key=lambda err: err["type"] != "extra_forbidden")
        first = _describe(errors[0])
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        raise ConfigError(first + more) from None


def load_config(path: str | os.PathLike, *, env: dict[str, str] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: cannot read config file ({type(e).__name__})") from None
    return parse_config(text, source=str(p), env=env)
