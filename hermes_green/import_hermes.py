"""`hermes-green import-hermes [HERMES_HOME]`: hermes-agent's `config.yaml` and `.env` in,
a hermes-green config (`--out`) and an env file with its secrets (`--env-out`, mode 0600) out.

What it reads, and where hermes-agent defines it (NousResearch/hermes-agent):
- platforms and their credentials: gateway/config.py `_apply_env_overrides` (TELEGRAM_BOT_TOKEN,
  DISCORD_BOT_TOKEN, SLACK_BOT_TOKEN (+ SLACK_APP_TOKEN: .env.example), WECOM_BOT_ID,
  WECOM_SECRET, WECOM_WEBSOCKET_URL, FEISHU_APP_ID, FEISHU_APP_SECRET, FEISHU_DOMAIN,
  FEISHU_CONNECTION_MODE, QQ_APP_ID, QQ_CLIENT_SECRET, DINGTALK_CLIENT_ID,
  DINGTALK_CLIENT_SECRET; API_SERVER_KEY/PORT/HOST/MODEL_NAME) and `load_gateway_config`
  (config.yaml's `platforms.<p>`, `gateway.platforms.<p>` and top-level `<p>:` sections, their
  `token` / `extra` keys and `enabled`; environment variables win over config.yaml);
  website/docs/user-guide/messaging/{telegram,wecom,feishu,qqbot}.md for the meanings;
- who may talk to the bot: gateway/authorization.py `is_user_authorized`: `<P>_ALLOWED_USERS`
  (QQ: QQ_ALLOWED_USERS), GATEWAY_ALLOWED_USERS, `<P>_ALLOW_ALL_USERS`, GATEWAY_ALLOW_ALL_USERS,
  "*" for everyone, group chats in TELEGRAM_GROUP_ALLOWED_CHATS / QQ_GROUP_ALLOWED_USERS; with
  none of them hermes-agent lets nobody in but users approved by pairing, and an unknown user's
  DM gets a pairing code (gateway/config.py `unauthorized_dm_behavior`, default "pair";
  "ignore" does not). So: allow_from, dm_policy pairing (or allowlist), and with nobody allowed
  group_policy allowlist; an adapter's own `dm_policy` / `group_policy` / `group_allow_from`
  (messaging/wecom.md, qqbot.md), `require_mention` and `allow_admin_from` (load_gateway_config's
  bridged keys) map to ours. Users hermes-agent approved by pairing live in its own store and
  are not imported;
- busy mode: gateway/run.py `_load_busy_input_mode`: HERMES_GATEWAY_BUSY_INPUT_MODE, else
  `display.busy_input_mode`: queue, steer, or interrupt (the default), the same three here;
- the model: cli-config.yaml.example `model:` (`default`/`model`, `provider`, `base_url`,
  `api_key`) and .env.example's provider keys and base-URL overrides;
- its API server: website/docs/user-guide/features/api-server.md (API_SERVER_ENABLED,
  API_SERVER_KEY, port 8642 on 127.0.0.1, model `hermes-agent`) and gateway/config.py (it runs
  only with a key of 16+ characters).

What it writes: a section for every platform hermes-agent runs that this installation has an
adapter for (the registry decides at run time; the others are reported), with the credentials
as `${VAR}` references (the names are hermes-agent's, so its own .env would do too) and the
values in the env file, never printed; who may talk (above); `gateway.busy_mode`;
the agent: `backend: service` at hermes-agent's API server when its config runs one (the agent
keeps its tools, memory and skills), else the builtin agent on the same model and endpoint when
that endpoint speaks the OpenAI API. Every setting it cannot carry over gets one line. A home
with missing or odd files gets one line per problem and nothing is written; nor when an output
exists (without --force), or the result does not validate as a hermes-green config.
"""
from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import envfile, safe_yaml

EXIT_OK, EXIT_PROBLEMS = 0, 2
API_SERVER_DEFAULT_PORT = 8642
API_KEY_MIN_CHARS = 16  # gateway/config.py _has_usable_api_server_key
MODEL_KEY_VAR = "HERMES_MODEL_API_KEY"  # for a key written inline in config.yaml's model:
SERVICE_TIMEOUT_S = 600  # a whole agent turn through the API server, tools included
TRUTHY = frozenset({"1", "true", "yes", "on"})


class HomeProblems(Exception):
    """The hermes home cannot be imported as it is. `problems`: one line each, no values."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


# --- what hermes-agent has --------------------------------------------------------------------

@dataclass(frozen=True)
class Cred:
    """One credential: our key, hermes-agent's env variable, and where config.yaml may hold it
    instead ("token" on the section, "extra.x" under its extra)."""
    key: str
    env: str
    config: tuple[str, ...]
    secret: bool = True
    required: bool = True


@dataclass(frozen=True)
class Known:
    """A hermes-agent platform that hermes-green can run."""
    name: str
    creds: tuple[Cred, ...]
    allowed_env: str
    allow_all_env: str
    prefixes: tuple[str, ...]


KNOWN: dict[str, Known] = {k.name: k for k in (
    Known("telegram", (Cred("token", "TELEGRAM_BOT_TOKEN", ("token",)),),
          "TELEGRAM_ALLOWED_USERS", "TELEGRAM_ALLOW_ALL_USERS", ("TELEGRAM_",)),
    Known("discord", (Cred("token", "DISCORD_BOT_TOKEN", ("token",)),),
          "DISCORD_ALLOWED_USERS", "DISCORD_ALLOW_ALL_USERS", ("DISCORD_",)),
    Known("slack", (Cred("bot_token", "SLACK_BOT_TOKEN", ("token",)),
                    Cred("app_token", "SLACK_APP_TOKEN", ("extra.app_token",))),
          "SLACK_ALLOWED_USERS", "SLACK_ALLOW_ALL_USERS", ("SLACK_",)),
    Known("wecom", (Cred("bot_id", "WECOM_BOT_ID", ("extra.bot_id",), secret=False),
                    Cred("secret", "WECOM_SECRET", ("extra.secret",)),
                    Cred("url", "WECOM_WEBSOCKET_URL", ("extra.websocket_url",), secret=False,
                         required=False)),
          "WECOM_ALLOWED_USERS", "WECOM_ALLOW_ALL_USERS", ("WECOM_",)),
    Known("feishu", (Cred("app_id", "FEISHU_APP_ID", ("extra.app_id",), secret=False),
                     Cred("app_secret", "FEISHU_APP_SECRET", ("extra.app_secret",))),
          "FEISHU_ALLOWED_USERS", "FEISHU_ALLOW_ALL_USERS", ("FEISHU_",)),
    Known("qqbot", (Cred("app_id", "QQ_APP_ID", ("extra.app_id",), secret=False),
                    Cred("client_secret", "QQ_CLIENT_SECRET", ("extra.client_secret",))),
          "QQ_ALLOWED_USERS", "QQ_ALLOW_ALL_USERS", ("QQBOT_", "QQ_")),
    Known("dingtalk", (Cred("client_id", "DINGTALK_CLIENT_ID", ("extra.client_id",),
                            secret=False),
                       Cred("client_secret", "DINGTALK_CLIENT_SECRET", ("extra.client_secret",)),
                       Cred("robot_code", "DINGTALK_ROBOT_CODE", ("extra.robot_code",),
                            secret=False, required=False)),
          "DINGTALK_ALLOWED_USERS", "DINGTALK_ALLOW_ALL_USERS", ("DINGTALK_",)),
)}

# hermes-agent platforms hermes-green has no adapter for: their env prefixes, and the variables
# whose presence makes hermes-agent run them (gateway/config.py _apply_env_overrides).
OTHERS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "whatsapp_cloud": (("WHATSAPP_CLOUD_",), ("WHATSAPP_CLOUD_PHONE_NUMBER_ID",)),
    "whatsapp": (("WHATSAPP_",), ("WHATSAPP_ENABLED",)),
    "signal": (("SIGNAL_",), ("SIGNAL_HTTP_URL",)),
    "mattermost": (("MATTERMOST_",), ("MATTERMOST_TOKEN",)),
    "matrix": (("MATRIX_",), ("MATRIX_ACCESS_TOKEN", "MATRIX_PASSWORD")),
    "homeassistant": (("HASS_", "HOMEASSISTANT_"), ("HASS_TOKEN",)),
    "email": (("EMAIL_",), ("EMAIL_ADDRESS",)),
    "sms": (("SMS_", "TWILIO_"), ("TWILIO_ACCOUNT_SID",)),
    "msgraph_webhook": (("MSGRAPH_WEBHOOK_",), ("MSGRAPH_WEBHOOK_ENABLED",)),
    "webhook": (("WEBHOOK_",), ("WEBHOOK_ENABLED",)),
    "wecom_callback": (("WECOM_CALLBACK_",), ("WECOM_CALLBACK_CORP_ID",)),
    "weixin": (("WEIXIN_",), ("WEIXIN_TOKEN", "WEIXIN_ACCOUNT_ID")),
    "bluebubbles": (("BLUEBUBBLES_",), ("BLUEBUBBLES_SERVER_URL",)),
    "yuanbao": (("YUANBAO_",), ("YUANBAO_APP_ID", "YUANBAO_APP_KEY")),
    "teams": (("TEAMS_",), ("TEAMS_CLIENT_ID",)),
    "google_chat": (("GOOGLE_CHAT_",), ("GOOGLE_CHAT_PROJECT_ID",)),
    "relay": (("GATEWAY_RELAY_",), ("GATEWAY_RELAY_URL",)),
}

# config.yaml keys that are hermes-agent's gateway behaviour (replaced by ours, so reported),
# as opposed to the agent's own settings (kept by its API server, or reported with builtin).
GATEWAY_KEYS = frozenset({
    "group_sessions_per_user", "thread_sessions_per_user", "session_reset", "reset_triggers",
    "quick_commands", "streaming", "unauthorized_dm_behavior", "stt_echo_transcripts",
    "always_log_local", "filter_silence_narration", "write_sessions_json", "multiplex_profiles",
    "multiplex_profile_allowlist", "profile_routes", "max_concurrent_sessions",
    "require_mention", "session_store_max_age_days", "human_delay"})
IGNORED_KEYS = frozenset({"_config_version"})
# .env variables of hermes-agent's gateway that are not a platform's
GATEWAY_ENV_PREFIXES = ("GATEWAY_", "HERMES_GATEWAY_", "API_SERVER_")
USED_GATEWAY_ENV = frozenset({"GATEWAY_ALLOWED_USERS", "GATEWAY_ALLOW_ALL_USERS",
                              "HERMES_GATEWAY_BUSY_INPUT_MODE"})

REASONS = [
    (re.compile(r"_HOME_(CHANNEL|ROOM|ADDRESS)"), "home channels are where hermes-agent's cron "
                                                  "jobs deliver; hermes-green has no cron"),
    (re.compile(r"FREE_RESPONSE|MENTION_PATTERNS|free_response|mention_patterns"),
     "hermes-green has require_mention per bot and per group (groups:), not per pattern"),
    (re.compile(r"ALLOWED_CHATS|ALLOWED_ROLES|ALLOWED_CHANNELS|ALLOWED_TEAMS"),
     "allow_from lists users, groups are listed under groups: (ids), not roles or teams"),
    (re.compile(r"^groups$"), "per-group user lists: hermes-green's groups take require_mention "
                              "only"),
    (re.compile(r"TELEGRAM_WEBHOOK"), "hermes-green long-polls Telegram (and deletes the "
                                      "bot's webhook when it starts)"),
    (re.compile(r"webhook"), "hermes-green connects out (long polling, WebSocket); it serves "
                             "no webhook"),
    (re.compile(r"REPLY_TO_MODE|reply_to_mode"), "hermes-green replies to the message it "
                                                 "answers"),
    (re.compile(r"ALLOW_BOTS|allow_bots"), "messages from other bots are not answered"),
    (re.compile(r"STT|stt"), "voice transcription is hermes-agent's; attachments reach the "
                             "agent as placeholders"),
    (re.compile(r"streaming"), "hermes-green streams progress wherever the platform can show "
                               "it"),
]

# OpenAI-compatible providers of hermes-agent's model: provider -> (base URL, its override
# variable, key variable) from cli-config.yaml.example and .env.example.
PROVIDERS: dict[str, tuple[str | None, str | None, str | None]] = {
    "openrouter": ("https://openrouter.ai/api/v1", None, "OPENROUTER_API_KEY"),
    "custom": (None, None, "OPENAI_API_KEY"),
    "ollama": (None, None, "OPENAI_API_KEY"),
    "vllm": (None, None, "OPENAI_API_KEY"),
    "llamacpp": (None, None, "OPENAI_API_KEY"),
    "lmstudio": ("http://127.0.0.1:1234/v1", None, "LM_API_KEY"),
    "gemini": ("https://generativelanguage.googleapis.com/v1beta/openai", "GEMINI_BASE_URL",
               "GEMINI_API_KEY"),
    "zai": ("https://api.z.ai/api/paas/v4", "GLM_BASE_URL", "GLM_API_KEY"),
    "kimi-coding": ("https://api.kimi.com/coding/v1", "KIMI_BASE_URL", "KIMI_API_KEY"),
    "minimax": ("https://api.minimax.io/v1", "MINIMAX_BASE_URL", "MINIMAX_API_KEY"),
    "minimax-cn": ("https://api.minimaxi.com/v1", "MINIMAX_CN_BASE_URL", "MINIMAX_CN_API_KEY"),
    "ollama-cloud": ("https://ollama.com/v1", "OLLAMA_BASE_URL", "OLLAMA_API_KEY"),
}
FEISHU_DOMAINS = {"feishu": "https://open.feishu.cn", "lark": "https://open.larksuite.com"}


# --- reading the home --------------------------------------------------------------------------

@dataclass
class HermesHome:
    path: Path
    config: dict
    env: dict[str, str]


def read_home(path: Path) -> HermesHome:
    """config.yaml and .env, each bounded and checked; HomeProblems lists every problem."""
    problems: list[str] = []
    if not path.is_dir():
        raise HomeProblems([f"{path}: no such directory (pass the hermes home, e.g. ~/.hermes)"])
    config: dict = {}
    cfg_path = path / "config.yaml"
    try:
        config = _read_yaml(cfg_path)
    except HomeProblems as e:
        problems += e.problems
    env: dict[str, str] = {}
    try:
        env = envfile.read(path / ".env")
    except envfile.EnvFileError as e:
        problems += [p if p.startswith(str(path)) else f"{path / '.env'}: {p}"
                     for p in e.problems]
    if problems:
        raise HomeProblems(problems)
    return HermesHome(path, config, env)


def _read_yaml(path: Path) -> dict:
    try:
        with path.open("rb") as f:
            data = f.read(safe_yaml.MAX_BYTES + 1)
    except FileNotFoundError:
        raise HomeProblems([f"{path}: not found"]) from None
    except OSError as e:
        raise HomeProblems([f"{path}: cannot read it ({e.strerror or type(e).__name__})"]) \
            from None
    if len(data) > safe_yaml.MAX_BYTES:
        raise HomeProblems([f"{path}: larger than {safe_yaml.MAX_BYTES // 1024} KiB"])
    try:
        raw, _ = safe_yaml.load(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise HomeProblems([f"{path}: not UTF-8 text"]) from None
    except safe_yaml.Refused as e:
        raise HomeProblems([f"{path}: refused at line {e.mark.line + 1}: {e.problem}"]) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        raise HomeProblems([f"{path}: invalid YAML at {where}"]) from None
    except yaml.YAMLError as e:
        raise HomeProblems([f"{path}: invalid YAML ({type(e).__name__})"]) from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise HomeProblems([f"{path}: the top level is not a mapping of settings"])
    return raw


# --- the mapping -------------------------------------------------------------------------------

@dataclass
class Imported:
    config: dict = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # VAR -> value for the env file
    done: list[str] = field(default_factory=list)  # what was imported, one line each
    unmapped: list[str] = field(default_factory=list)  # what was not, one line each
    kept: list[str] = field(default_factory=list)  # agent settings hermes-agent keeps using


class _Convert:
    def __init__(self, home: HermesHome, available: set[str]) -> None:
        self.cfg, self.env, self.available = home.config, home.env, available
        self.out = Imported()
        self.problems: list[str] = []
        self.used_env: set[str] = set(USED_GATEWAY_ENV)
        self.used_keys: set[str] = set()  # config.yaml key paths taken
        self.skipped: set[str] = set()  # platforms not imported (reported once, as a whole)
        self.pairing_used = False  # some bot lets unknown users pair, as hermes-agent did
        self.service = False

    # config.yaml views -------------------------------------------------------------------
    def sections(self, name: str) -> list[tuple[str, dict]]:
        """Where config.yaml may configure platform `name`, lowest precedence first."""
        found: list[tuple[str, Any]] = []
        gateway = self.cfg.get("gateway")
        if isinstance(gateway, dict):
            nested = gateway.get("platforms")
            if isinstance(nested, dict) and name in nested:
                found.append((f"gateway.platforms.{name}", nested[name]))
            if name in gateway:
                found.append((f"gateway.{name}", gateway[name]))
        platforms = self.cfg.get("platforms")
        if isinstance(platforms, dict) and name in platforms:
            found.append((f"platforms.{name}", platforms[name]))
        if name in self.cfg:
            found.append((name, self.cfg[name]))
        out = []
        for where, value in found:
            if isinstance(value, dict):
                out.append((where, value))
            elif value is not None:
                self.problems.append(f"config.yaml: {where} is not a mapping")
        return out

    def lookup(self, name: str, key: str) -> tuple[Any, str | None]:
        """The value at `key` ("token", "extra.secret", "allow_from") across the sections,
        the highest precedence winning; (None, None) when absent."""
        value, where = None, None
        for path, section in self.sections(name):
            node: Any = section
            for part in key.split("."):
                node = node.get(part) if isinstance(node, dict) else None
            if node is not None:
                value, where = node, f"{path}.{key}"
        return value, where

    def explicit_enabled(self, name: str) -> bool | None:
        value, where = self.lookup(name, "enabled")
        if value is None:
            return None
        self.used_keys.add(where)
        if isinstance(value, bool):
            return value
        return str(value).strip().lower() in TRUTHY

    # helpers -------------------------------------------------------------------------------
    def env_value(self, var: str) -> str | None:
        value = self.env.get(var)
        if value is not None:
            self.used_env.add(var)
        return value if value else None

    def text_value(self, value: Any, where: str) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            self.problems.append(f"config.yaml: {where} is not a text value")
            return None
        return str(value).strip() or None

    def secret_ref(self, var: str, value: str) -> str:
        self.out.env[var] = value
        return f"${{{var}}}"

    def unmapped(self, setting: str, why: str) -> None:
        self.out.unmapped.append(f"{setting}: {why}")

    def run(self) -> Imported:
        platforms: dict[str, dict] = {}
        for known in KNOWN.values():
            section = self.platform(known)
            if section is not None:
                platforms[known.name] = section
        self.other_platforms()
        if self.pairing_used:
            self.unmapped("pairing approvals", "users hermes-agent approved by pairing are not "
                          "imported: they get a new code, and `hermes-green pairing approve "
                          "CODE` lets them in")
        agent = self.agent()
        gateway = self.busy_mode()
        self.leftover_env()
        self.leftover_config()
        if self.problems:
            raise HomeProblems(list(dict.fromkeys(self.problems)))
        if gateway:
            self.out.config["gateway"] = gateway
        if agent is not None:
            self.out.config["agent"] = agent
        self.out.config["platforms"] = platforms
        return self.out

    # platforms -----------------------------------------------------------------------------
    def platform(self, known: Known) -> dict | None:
        values: dict[str, tuple[str, str]] = {}  # our key -> (value, where it came from)
        for cred in known.creds:
            found = self.env_value(cred.env)
            source = cred.env
            if found is None:
                for key in cred.config:
                    value, where = self.lookup(known.name, key)
                    if value is not None:
                        self.used_keys.add(where)
                        found, source = self.text_value(value, where), f"config.yaml {where}"
            if found is not None:
                values[cred.key] = (found, source)
        explicit = self.explicit_enabled(known.name)
        required = [c for c in known.creds if c.required]
        have = [c for c in required if c.key in values]
        if not have:
            if explicit:
                self.problems.append(f"{known.name}: enabled in config.yaml but "
                                     f"{' and '.join(c.env for c in required)} are not set")
            self.not_imported(known.name, f"hermes-agent does not run {known.name} without "
                                          f"{' and '.join(c.env for c in required)}")
            return None
        if len(have) < len(required):
            missing = [c.env for c in required if c.key not in values]
            self.problems.append(f"{known.name}: {', '.join(values[c.key][1] for c in have)} "
                                 f"is set but {', '.join(missing)} is not")
            return None
        if known.name not in self.available:
            self.not_imported(known.name, "configured in hermes-agent, but this hermes-green "
                                          f"has no {known.name} adapter yet (not imported)",
                              configured=True)
            return None
        section: dict[str, Any] = {}
        for cred in known.creds:
            if cred.key in values:
                value = values[cred.key][0]
                section[cred.key] = self.secret_ref(cred.env, value) if cred.secret else value
        if known.name == "feishu":
            self.feishu(section)
        how = self.access(known, section)
        if explicit is False:
            section["enabled"] = False
        state = "disabled" if section.get("enabled") is False else "enabled"
        refs = ", ".join(f"{k} {v}" for k, v in section.items()
                         if isinstance(v, str) and v.startswith("${"))
        self.out.done.append(f"{known.name}: {state}; {refs or 'no secrets'}; {how}")
        return section

    def feishu(self, section: dict) -> None:
        domain = self.env_value("FEISHU_DOMAIN")
        if domain is None:
            value, where = self.lookup("feishu", "extra.domain")
            if value is not None:
                self.used_keys.add(where)
                domain = self.text_value(value, where)
        if domain:
            url = FEISHU_DOMAINS.get(domain.lower(), domain if domain.startswith("https://")
                                     else None)
            if url is None:
                self.problems.append("feishu: FEISHU_DOMAIN is neither feishu, lark nor an "
                                     "https:// URL")
            else:
                section["domain"] = url
        mode = self.env_value("FEISHU_CONNECTION_MODE")
        if mode is None:
            value, where = self.lookup("feishu", "extra.connection_mode")
            if value is not None:
                self.used_keys.add(where)
                mode = self.text_value(value, where)
        if mode and mode.lower() != "websocket":
            self.unmapped("FEISHU_CONNECTION_MODE", f"{mode}: hermes-green uses Feishu's long "
                          "connection (WebSocket); set the app's event mode to it")

    def ids_at(self, name: str, keys: tuple[str, ...], what: str) -> list[str]:
        """Ids listed in config.yaml under any of `keys` (a list, or a comma-separated text)."""
        ids: list[str] = []
        for key in keys:
            value, where = self.lookup(name, key)
            if value is None:
                continue
            self.used_keys.add(where)
            if isinstance(value, str):
                ids += [v.strip() for v in value.split(",") if v.strip()]
            elif isinstance(value, list) and all(isinstance(v, (str, int)) and not
                                                 isinstance(v, bool) for v in value):
                ids += [str(v).strip() for v in value if str(v).strip()]
            else:
                self.problems.append(f"config.yaml: {where} is not a list of {what}")
        return ids

    def env_ids(self, var: str) -> list[str]:
        return [v.strip() for v in (self.env_value(var) or "").split(",") if v.strip()]

    def setting(self, name: str, keys: tuple[str, ...]) -> Any:
        value = None
        for key in keys:
            found, where = self.lookup(name, key)
            if found is not None:
                self.used_keys.add(where)
                value = found
        return value

    def access(self, known: Known, section: dict) -> str:
        """Who may talk, as hermes-agent decides it (gateway/authorization.py), written as
        allow_from / dm_policy / group_policy / groups / admins / require_mention. Returns
        how it reads, for the summary line."""
        name = known.name
        users = self.env_ids(known.allowed_env) + self.env_ids("GATEWAY_ALLOWED_USERS")
        users += self.ids_at(name, ("allow_from", "extra.allow_from", "allowed_users",
                                    "extra.allowed_users"), "user ids")
        groups = self.ids_at(name, ("group_allow_from", "extra.group_allow_from"), "group ids")
        group_var = {"telegram": "TELEGRAM_GROUP_ALLOWED_CHATS",
                     "qqbot": "QQ_GROUP_ALLOWED_USERS"}.get(name)
        if group_var:
            groups += self.env_ids(group_var)
        if name == "telegram":  # old style: chat ids (negative) in the group *users* variable
            group_users = self.env_ids("TELEGRAM_GROUP_ALLOWED_USERS")
            groups += [g for g in group_users if g.startswith("-")]
            if any(not g.startswith("-") for g in group_users):
                self.unmapped("TELEGRAM_GROUP_ALLOWED_USERS", "users allowed in groups only; "
                              "allow_from admits a user everywhere")
        admins = self.ids_at(name, ("allow_admin_from", "extra.allow_admin_from"), "user ids")
        everyone = ((self.env_value(known.allow_all_env) or "").lower() in TRUTHY
                    or "*" in users
                    or (not users and (self.env_value("GATEWAY_ALLOW_ALL_USERS") or "").lower()
                        in TRUTHY))
        unauthorized = self.setting(name, ("unauthorized_dm_behavior",
                                           "extra.unauthorized_dm_behavior"))
        if unauthorized is None:
            unauthorized = self.cfg.get("unauthorized_dm_behavior")
            gateway = self.cfg.get("gateway")
            if unauthorized is None and isinstance(gateway, dict):
                unauthorized = gateway.get("unauthorized_dm_behavior")
        pair = str(unauthorized or "pair").strip().lower() != "ignore"  # hermes: pair default
        dm = str(self.setting(name, ("dm_policy", "extra.dm_policy")) or "open").lower()
        gp = str(self.setting(name, ("group_policy", "extra.group_policy")) or "open").lower()
        users = list(dict.fromkeys(u for u in users if u != "*"))
        if everyone:
            how = "everyone"
        else:
            if users:
                section["allow_from"] = users
            section["dm_policy"] = "pairing" if pair else "allowlist"
            self.pairing_used |= pair
            how = (f"{len(users)} user(s)" if users else "nobody yet") + \
                (", unknown users get a pairing code" if pair else "")
        if dm == "allowlist" and not everyone:
            section["dm_policy"] = "allowlist"
        elif dm == "pairing":
            section["dm_policy"] = "pairing"
            self.pairing_used = True
        elif dm == "disabled":
            section["dm_policy"] = "allowlist"
            self.unmapped(f"{name} dm_policy", "disabled: hermes-green has no such policy; "
                          "written as allowlist (allow_from, admins and paired users only)")
        if gp == "disabled":
            section["group_policy"] = "disabled"
        elif groups or gp == "allowlist" or (not everyone and not users):
            # with nobody allowed, hermes-agent admits no unknown user in groups either
            section["group_policy"] = "allowlist"
            section["groups"] = {g: {} for g in dict.fromkeys(groups)}
        if groups and users:
            self.unmapped(f"{name} groups", "hermes-agent admits every member of a listed group; "
                          "in hermes-green allow_from still applies inside them")
        if admins:
            section["admins"] = list(dict.fromkeys(admins))
        mention = self.env_value(f"{known.prefixes[-1]}REQUIRE_MENTION")
        if mention is None:
            mention = self.setting(name, ("require_mention", "extra.require_mention"))
        if mention is None and name == "telegram":
            mention = self.cfg.get("require_mention")
            if mention is not None:
                self.used_keys.add("require_mention")
        if mention is not None:
            section["require_mention"] = str(mention).strip().lower() in TRUTHY
        return f"allow_from: {how}"

    def not_imported(self, name: str, why: str, *, configured: bool = False) -> None:
        """Report a platform as a whole: one line naming the settings it leaves behind (when
        it is not configured, only if it has some)."""
        mine = [v for v in sorted(self.env) if self.env[v] and env_owner(v) == name]
        self.skipped.add(name)
        self.used_env.update(mine)
        if configured:
            self.unmapped(name, why)
        elif mine:  # config.yaml sections alone are often hermes-agent's defaults: not reported
            self.unmapped(f"{name} settings ({', '.join(mine)})", f"{why}; nothing to import")

    def other_platforms(self) -> None:
        for name, (_, detect) in OTHERS.items():
            explicit = self.explicit_enabled(name)
            by_env = any(self.env.get(v) and (not v.endswith("_ENABLED")
                                              or self.env[v].strip().lower() in TRUTHY)
                         for v in detect)
            if explicit is True or (by_env and explicit is not False):
                self.not_imported(name, f"configured in hermes-agent; hermes-green has no "
                                        f"{name} adapter (not imported)", configured=True)
            else:
                self.not_imported(name, f"hermes-agent does not run {name} with these")

    # the agent -----------------------------------------------------------------------------
    def api_server(self) -> dict | None:
        key = self.env_value("API_SERVER_KEY")
        key_where = "API_SERVER_KEY"
        if key is None:
            for k in ("extra.key", "key"):
                value, where = self.lookup("api_server", k)
                if value is not None:
                    self.used_keys.add(where)
                    key, key_where = self.text_value(value, where), f"config.yaml {where}"
        explicit = self.explicit_enabled("api_server")
        switch = (self.env_value("API_SERVER_ENABLED") or "").lower()
        if explicit is False or switch in ("false", "0", "no", "off"):
            return None
        if key is None or len(key.strip()) < API_KEY_MIN_CHARS:
            if explicit or switch in TRUTHY:
                self.unmapped("API_SERVER_ENABLED", f"hermes-agent runs its API server only "
                              f"with an API_SERVER_KEY of {API_KEY_MIN_CHARS}+ characters; the "
                              f"agent is not pointed at it")
            return None
        settings = {}
        for k in ("port", "host", "model_name"):
            env_value = self.env_value(f"API_SERVER_{k.upper()}")
            if env_value is not None:
                settings[k] = env_value
                continue
            for path in (f"extra.{k}", k):
                value, where = self.lookup("api_server", path)
                if value is not None:
                    self.used_keys.add(where)
                    settings[k] = str(value)
        host = settings.get("host") or "127.0.0.1"
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"  # it listens everywhere; we reach it here
        port = settings.get("port") or str(API_SERVER_DEFAULT_PORT)
        if not port.isdigit() or not 0 < int(port) < 65536:
            self.problems.append("API_SERVER_PORT is not a port number")
            return None
        host = f"[{host}]" if ":" in host else host
        agent: dict[str, Any] = {"backend": "service", "base_url": f"http://{host}:{port}/v1",
                                 "api_key": self.secret_ref("API_SERVER_KEY", key.strip()),
                                 "timeout_s": SERVICE_TIMEOUT_S}
        if settings.get("model_name"):
            agent["model"] = settings["model_name"]
        self.out.done.append(f"agent: backend service at {agent['base_url']} (hermes-agent's API "
                             f"server, key ${{API_SERVER_KEY}} from {key_where}); it keeps its "
                             f"model, tools, memory and skills")
        return agent

    def agent(self) -> dict | None:
        agent = self.api_server()
        if agent is not None:
            self.service = True  # model: and the rest are the agent's, kept by hermes-agent
            return agent
        model = self.cfg.get("model")
        self.used_keys.add("model")
        if model is None:
            self.unmapped("model", "not set in config.yaml; no agent section written (the echo "
                                   "agent answers until you add one)")
            return None
        if isinstance(model, str):
            model = {"default": model}
        if not isinstance(model, dict):
            self.problems.append("config.yaml: model is neither a name nor a mapping")
            return None
        name = model.get("default") or model.get("model")
        provider = str(model.get("provider") or "auto").strip().lower()
        base_url = model.get("base_url")
        if not isinstance(name, str) or not name.strip():
            self.problems.append("config.yaml: model.default is not a model name")
            return None
        if base_url is not None and not isinstance(base_url, str):
            self.problems.append("config.yaml: model.base_url is not a URL")
            return None
        for key in sorted(set(model) - {"default", "model", "provider", "base_url", "api_key"}):
            self.unmapped(f"model.{key}", "no equivalent in hermes-green's agent section")
        if provider == "auto":
            if base_url:
                key_var = "OPENROUTER_API_KEY" if "openrouter.ai" in base_url else \
                    "OPENAI_API_KEY"
            elif self.env.get("OPENROUTER_API_KEY"):
                base_url, key_var = PROVIDERS["openrouter"][0], "OPENROUTER_API_KEY"
            else:
                base_url = key_var = None
        elif provider in PROVIDERS:
            default_url, url_var, key_var = PROVIDERS[provider]
            base_url = base_url or (self.env_value(url_var) if url_var else None) or default_url
        else:
            base_url = key_var = None
        if not base_url:
            self.unmapped(f"model.provider: {provider}", "no OpenAI-compatible endpoint the "
                          "importer knows; no agent section written (the echo agent answers): "
                          "set agent.base_url, api_key and model, or run hermes-agent's API "
                          "server and import again")
            return None
        agent: dict[str, Any] = {"backend": "builtin", "base_url": base_url.rstrip("/"),
                                 "model": name.strip()}
        inline = model.get("api_key")
        if inline is not None:
            inline = self.text_value(inline, "model.api_key")
            if inline:
                agent["api_key"] = self.secret_ref(MODEL_KEY_VAR, inline)
        elif key_var and self.env_value(key_var):
            agent["api_key"] = self.secret_ref(key_var, self.env[key_var])
        elif key_var:
            self.unmapped("agent.api_key", f"{key_var} is not in .env; set agent.api_key if "
                                           f"{base_url} needs one")
        self.out.done.append(f"agent: builtin, model {agent['model']} at {agent['base_url']}"
                             f"{', key ' + agent['api_key'] if 'api_key' in agent else ''}")
        return agent

    def busy_mode(self) -> dict:
        mode = self.env_value("HERMES_GATEWAY_BUSY_INPUT_MODE")
        source = "HERMES_GATEWAY_BUSY_INPUT_MODE"
        display = self.cfg.get("display")
        if mode is None and isinstance(display, dict) and display.get("busy_input_mode"):
            mode, source = str(display["busy_input_mode"]), "display.busy_input_mode"
        if mode is None:
            source = "hermes-agent's default"
        mode = (mode or "interrupt").strip().lower()
        mode = mode if mode in ("queue", "steer") else "interrupt"  # hermes-agent's fallback
        self.out.done.append(f"gateway.busy_mode: {mode} (from {source})")
        return {"busy_mode": mode}

    # what is left ----------------------------------------------------------------------------
    def leftover_env(self) -> None:
        agent_vars = []
        for var in sorted(self.env):
            if var in self.used_env or not self.env[var]:
                continue
            owner = env_owner(var)
            if owner in self.skipped:
                continue
            if owner is None:
                agent_vars.append(var)
            elif var.startswith("API_SERVER_") and self.service:
                continue  # the API server's own settings stay with it
            else:
                self.unmapped(var, _reason(var))
        self._agent_settings(agent_vars, "variables")

    def leftover_config(self) -> None:
        agent_keys = []
        for known in [*KNOWN, "api_server"]:
            if known in self.skipped:
                continue
            for where, section in self.sections(known):
                for key, value in section.items():
                    if key == "extra" and isinstance(value, dict):
                        for k in value:
                            path = f"{where}.extra.{k}"
                            if path not in self.used_keys:
                                self.unmapped(path, _reason(k))
                    elif f"{where}.{key}" not in self.used_keys and not (
                            known == "api_server" and self.service):
                        self.unmapped(f"{where}.{key}", _reason(key))
        for key, value in self.cfg.items():
            if key in IGNORED_KEYS or key in self.used_keys or key in KNOWN or key in OTHERS \
                    or key in ("platforms", "api_server"):
                continue
            if key == "gateway" and isinstance(value, dict):
                for k in value:
                    if k not in ("platforms", *KNOWN, *OTHERS, "api_server"):
                        self.unmapped(f"gateway.{k}", _reason(k))
            elif key == "display" and isinstance(value, dict):
                rest = sorted(set(value) - {"busy_input_mode"})
                if rest:
                    self.unmapped("display", f"{', '.join(rest[:6])}"
                                  f"{', ...' if len(rest) > 6 else ''}: how hermes-agent's CLI "
                                  "shows things; no equivalent")
            elif key in GATEWAY_KEYS:
                self.unmapped(key, _reason(key))
            else:
                agent_keys.append(key)
        self._agent_settings(agent_keys, "config.yaml sections")
        platforms = self.cfg.get("platforms")
        if isinstance(platforms, dict):
            for name in platforms:
                if name not in KNOWN and name not in OTHERS and name != "api_server":
                    self.unmapped(f"platforms.{name}", "a platform this importer does not know")

    def _agent_settings(self, names: list[str], what: str) -> None:
        if not names:
            return
        if self.service:
            self.out.kept.append(f"{len(names)} agent {what} stay with hermes-agent, whose API "
                                 f"server answers: {', '.join(names)}")
        else:
            for name in names:
                self.unmapped(name, "an agent setting; hermes-green's builtin agent has none "
                                    "(run hermes-agent's API server to keep it)")


def env_owner(var: str) -> str | None:
    """The platform (or "gateway") a .env variable belongs to: the longest matching prefix,
    so WECOM_CALLBACK_* is wecom_callback's, not wecom's. None: the agent's."""
    best: tuple[str, int] | None = None
    owners = [*((k.name, k.prefixes) for k in KNOWN.values()),
              *((name, prefixes) for name, (prefixes, _) in OTHERS.items()),
              ("gateway", GATEWAY_ENV_PREFIXES)]
    for name, prefixes in owners:
        for prefix in prefixes:
            if var.startswith(prefix) and (best is None or len(prefix) > best[1]):
                best = (name, len(prefix))
    return best[0] if best else None


def _reason(setting: str) -> str:
    for pattern, why in REASONS:
        if pattern.search(setting):
            return why
    return "no hermes-green equivalent"


def convert(home: HermesHome, available: set[str] | None = None) -> Imported:
    """The mapping (nothing written). `available`: the platforms this installation runs
    (default: the registry's)."""
    if available is None:
        from .platforms import registry
        available = set(registry.names())
    return _Convert(home, available).run()


# --- overrides, validation, output --------------------------------------------------------------

def apply_overrides(config: dict, overrides: list[str]) -> list[str]:
    """`a.b.c=value` (value read as YAML) into `config`; returns problem lines."""
    problems = []
    for item in overrides:
        path, sep, raw = item.partition("=")
        keys = [k for k in path.strip().split(".") if k]
        if not sep or not keys:
            problems.append(f"--set {path.strip() or item!r}: expected KEY.PATH=VALUE")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            problems.append(f"--set {path}: the value is not a YAML scalar")
            continue
        node = config
        for key in keys[:-1]:
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                problems.append(f"--set {path}: {key} is not a mapping")
                break
            node = child
        else:
            node[keys[-1]] = value
    return problems


def validate(config: dict, env: dict[str, str]) -> list[str]:
    from .config import ConfigError, parse_config
    try:
        parse_config(yaml.safe_dump(config, sort_keys=False), source="the imported config",
                     env={**env})
    except ConfigError as e:
        return [f"{e} (the imported config does not validate; nothing written)"]
    return []


def render_config(config: dict, home: Path, env_out: Path) -> str:
    head = (f"# hermes-green config imported from {home} by `hermes-green import-hermes`.\n"
            f"# Secrets are ${{VAR}} references; the values are in {env_out}: load it into the\n"
            f"# gateway's environment (systemd EnvironmentFile=, `hermes-green service install\n"
            f"# --env-file {env_out}`, or `set -a; . {env_out}; set +a`).\n")
    return head + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)


def _out(line: str) -> None:
    sys.stdout.write(line + "\n")  # cli-output


def _err(line: str) -> None:
    sys.stderr.write(f"hermes-green import-hermes: {line}\n")


def run(args) -> int:
    home = Path(args.home).expanduser() if args.home else default_home()
    out, env_out = Path(args.out).expanduser(), Path(args.env_out).expanduser()
    problems: list[str] = []
    if not args.force:
        problems += [f"{p}: exists (pass --force to replace it)" for p in (out, env_out)
                     if p.exists()]
    if out.resolve() == env_out.resolve():
        problems.append("--out and --env-out name the same file")
    if env_out.resolve() == (home / ".env").resolve() or out.resolve() == \
            (home / "config.yaml").resolve():
        problems.append("the outputs would overwrite the hermes home's own files")
    try:
        imported = convert(read_home(home))
    except HomeProblems as e:
        problems += e.problems
        imported = None
    if imported is not None:
        problems += apply_overrides(imported.config, args.set or [])
        if not problems:
            problems += validate(imported.config, imported.env)
        if not problems:
            try:
                env_text = envfile.render(imported.env, header=(
                    f"secrets for {out}, imported from {home} by hermes-green import-hermes"))
            except envfile.EnvFileError as e:
                problems += e.problems
    if problems:
        for line in problems:
            _err(line)
        _err(f"nothing written ({len(problems)} problem{'s' if len(problems) > 1 else ''})")
        return EXIT_PROBLEMS
    try:
        envfile.write_private(env_out, env_text)
        _write_config(out, render_config(imported.config, home, env_out))
    except OSError as e:
        _err(f"cannot write the outputs: {e.strerror or type(e).__name__}")
        return EXIT_PROBLEMS
    _out(f"imported from {home}:")
    for line in imported.done:
        _out(f"  {line}")
    for line in imported.kept:
        _out(f"kept by hermes-agent: {line}")
    for line in imported.unmapped:
        _out(f"not mapped: {line}")
    _out(f"wrote {out} and {env_out} (mode 0600, {len(imported.env)} variables)")
    _out(f"next: load {env_out} into the environment, then "
         f"hermes-green check --config {out}")
    return EXIT_OK


def _write_config(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def default_home() -> Path:
    """hermes-agent's own rule (hermes_constants.get_hermes_home): $HERMES_HOME, else
    ~/.hermes."""
    return Path(os.environ.get("HERMES_HOME") or Path.home() / ".hermes").expanduser()


def add_parser(sub, help_text: str) -> None:
    """The `import-hermes` command for cli.py's subparsers (its one-line help is cli.py's)."""
    p = sub.add_parser("import-hermes", help=help_text, description=__doc__.split("\n\n")[0])
    p.add_argument("home", nargs="?", metavar="HERMES_HOME",
                   help="hermes-agent's home (default: $HERMES_HOME or ~/.hermes)")
    p.add_argument("--out", default="config.yaml", metavar="FILE",
                   help="the config to write (default: config.yaml)")
    p.add_argument("--env-out", default=".env", metavar="FILE",
                   help="the env file with the secrets (default: .env), mode 0600")
    p.add_argument("--force", action="store_true", help="replace existing output files")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="set a key of the written config (repeatable), e.g. "
                        "gateway.data_dir=/var/lib/hermes-green")

