"""`hermes-green import-hermes` through the real CLI: three hermes homes written from
hermes-agent's documented settings (website/docs/user-guide/messaging/*.md, .env.example,
cli-config.yaml.example, features/api-server.md) whose credentials are the fakes', so the
configs it writes pass `hermes-green check` against the fakes (with the env file it writes as
the environment). The fakes' addresses that hermes-agent has no setting for (Telegram's,
Discord's and QQ's API base, Feishu's domain) are given with `--set`, as a user pointing at a
proxy would. Then the mapping's rules one by one, and every kind of bad input: one line per
problem, nothing written."""
from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
import yaml

from hermes_green import envfile
from hermes_green.import_hermes import HomeProblems, convert, read_home
from hermes_green.service_install import read_env_file
from hermes_green.testing.fake_agent_service import FakeAgentService
from hermes_green.testing.fleet import FakeFleet
from tests.support import run_cli

API_SERVER_KEY = "hermes-api-server-key-0123456789"


@pytest.fixture(scope="module")
def fleet():
    f = FakeFleet(("wecom", "feishu", "qqbot", "telegram", "discord", "slack",
                   "dingtalk")).start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def agent_service():
    fake = FakeAgentService(api_key=API_SERVER_KEY).start()
    yield fake
    fake.stop()


def home(tmp_path: Path, name: str, config: str, env: str) -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "config.yaml").write_text(config)
    (path / ".env").write_text(env)
    return path


def import_home(tmp_path: Path, path: Path, *sets: str, out: str = "out") -> tuple:
    cfg, env = tmp_path / f"{out}.yaml", tmp_path / f"{out}.env"
    args = ["import-hermes", str(path), "--out", str(cfg), "--env-out", str(env)]
    for s in (f"gateway.data_dir={tmp_path / 'data'}", *sets):
        args += ["--set", s]
    return run_cli(*args), cfg, env


def check(cfg: Path, env: Path) -> dict[str, str]:
    result = run_cli("check", "--config", str(cfg), env=read_env_file(env))
    lines = {}
    for line in result.stdout.splitlines():
        status, rest = line.split(None, 1)
        name, detail = rest.split(": ", 1)
        lines[name] = f"{status} {detail}"
    assert result.returncode == 0, result.stdout + result.stderr
    return lines


def unmapped(result) -> list[str]:
    return [line[len("not mapped: "):] for line in result.stdout.splitlines()
            if line.startswith("not mapped: ")]


def secrets_of(env_path: Path) -> list[str]:
    return [v for v in read_env_file(env_path).values() if len(v) >= 6]


# --- the three sample homes --------------------------------------------------------------------

def test_wecom_feishu_and_qq_home_imports_and_passes_check(tmp_path, fleet):
    wecom, feishu, qq = (fleet.fakes[p] for p in ("wecom", "feishu", "qqbot"))
    path = home(tmp_path, "hermes1", config=f"""\
# ~/.hermes/config.yaml (cli-config.yaml.example, messaging/wecom.md, messaging/qqbot.md)
_config_version: 50
model:
  default: fake-model
  provider: custom
  base_url: {fleet.llm.base_url}
display:
  busy_input_mode: queue
  compact: false
terminal:
  backend: local
group_sessions_per_user: true
platforms:
  wecom:
    enabled: true
    extra:
      dm_policy: open
  qqbot:
    enabled: true
    extra:
      markdown_support: true
""", env=f"""\
# ~/.hermes/.env
OPENAI_API_KEY={fleet.llm_api_key}
# WeCom (messaging/wecom.md)
WECOM_BOT_ID={wecom.bot_id}
WECOM_SECRET={wecom.secret}
WECOM_WEBSOCKET_URL={wecom.ws_url}
WECOM_ALLOWED_USERS=user0,user1
# Feishu / Lark (messaging/feishu.md)
FEISHU_APP_ID={feishu.app_id}
FEISHU_APP_SECRET="{feishu.app_secret}"
FEISHU_DOMAIN=feishu
FEISHU_CONNECTION_MODE=websocket
FEISHU_ALLOWED_USERS=ou_user0,ou_user1    # comma-separated open_ids
# QQ Bot (messaging/qqbot.md)
export QQ_APP_ID={qq.app_id}
QQ_CLIENT_SECRET='{qq.client_secret}'
QQ_ALLOWED_USERS=user-openid-0
QQBOT_HOME_CHANNEL=user-openid-0
TERMINAL_TIMEOUT=60
""")
    result, cfg, env = import_home(tmp_path, path, f"platforms.feishu.domain={feishu.http_base}",
                                   f"platforms.qqbot.api_base={qq.http_base}",
                                   f"platforms.qqbot.token_url={qq.token_url}")
    assert result.returncode == 0, result.stderr
    written = yaml.safe_load(cfg.read_text())
    assert written["gateway"]["busy_mode"] == "queue"
    assert written["agent"] == {"backend": "builtin", "base_url": fleet.llm.base_url,
                                "model": "fake-model", "api_key": "${OPENAI_API_KEY}"}
    p = written["platforms"]
    assert p["wecom"] == {"bot_id": wecom.bot_id, "secret": "${WECOM_SECRET}",
                          "url": wecom.ws_url, "allow_from": ["user0", "user1"],
                          "dm_policy": "pairing"}  # unknown users pair, as in hermes-agent
    assert p["feishu"]["app_secret"] == "${FEISHU_APP_SECRET}"
    assert p["feishu"]["allow_from"] == ["ou_user0", "ou_user1"]
    assert p["qqbot"]["client_secret"] == "${QQ_CLIENT_SECRET}"
    assert p["qqbot"]["allow_from"] == ["user-openid-0"]
    assert read_env_file(env) == {"WECOM_SECRET": wecom.secret,
                                  "FEISHU_APP_SECRET": feishu.app_secret,
                                  "QQ_CLIENT_SECRET": qq.client_secret,
                                  "OPENAI_API_KEY": fleet.llm_api_key}
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    for secret in secrets_of(env):
        assert secret not in result.stdout + result.stderr + cfg.read_text()
    lines = unmapped(result)
    expected = ["QQBOT_HOME_CHANNEL", "TERMINAL_TIMEOUT", "platforms.qqbot.extra.markdown_support",
                "group_sessions_per_user", "terminal", "display", "pairing approvals"]
    for setting in expected:
        assert sum(line.startswith(setting + ":") for line in lines) == 1, (setting, lines)
    assert len(lines) == len(expected), lines

    got = check(cfg, env)
    assert {k for k in got if k.startswith("platform")} == {
        "platform wecom", "platform feishu", "platform qqbot"}
    assert all(v.startswith("ok") for v in got.values()), got
    assert "'fake-model' listed" in got["llm"]


def test_telegram_and_discord_home_with_the_api_server_imports_as_a_service_backend(
        tmp_path, fleet, agent_service):
    telegram, discord = fleet.fakes["telegram"], fleet.fakes["discord"]
    path = home(tmp_path, "hermes2", config="""\
model:
  default: anthropic/claude-opus-4.6
  provider: openrouter
  base_url: https://openrouter.ai/api/v1
toolsets: [hermes-cli]
memory:
  memory_enabled: true
discord:
  require_mention: true
  free_response_channels: ""
  auto_thread: true
platforms:
  telegram:
    reply_to_mode: first
""", env=f"""\
OPENROUTER_API_KEY=sk-or-not-a-real-key-0000
TELEGRAM_BOT_TOKEN={telegram.token}
TELEGRAM_ALLOWED_USERS=111111111,222222222    # Comma-separated for multiple users
TELEGRAM_HOME_CHANNEL=111111111
DISCORD_BOT_TOKEN="{discord.token}"
DISCORD_ALLOWED_USERS=700000000000000001
# API server (features/api-server.md)
API_SERVER_ENABLED=true
API_SERVER_KEY={API_SERVER_KEY}
API_SERVER_PORT={agent_service.port}
""")
    result, cfg, env = import_home(tmp_path, path,
                                   f"platforms.telegram.api_base={telegram.http_base}",
                                   f"platforms.discord.api_base={discord.api_base}")
    assert result.returncode == 0, result.stderr
    written = yaml.safe_load(cfg.read_text())
    assert written["agent"] == {"backend": "service", "base_url": agent_service.base_url,
                                "api_key": "${API_SERVER_KEY}", "timeout_s": 600}
    assert written["gateway"]["busy_mode"] == "interrupt"  # hermes-agent's default
    assert written["platforms"]["telegram"]["token"] == "${TELEGRAM_BOT_TOKEN}"
    assert written["platforms"]["telegram"]["allow_from"] == ["111111111", "222222222"]
    assert written["platforms"]["discord"]["token"] == "${DISCORD_BOT_TOKEN}"
    assert set(read_env_file(env)) == {"TELEGRAM_BOT_TOKEN", "DISCORD_BOT_TOKEN",
                                       "API_SERVER_KEY"}
    for secret in secrets_of(env):
        assert secret not in result.stdout + result.stderr + cfg.read_text()
    lines = unmapped(result)
    assert written["platforms"]["discord"]["require_mention"] is True
    assert sorted(line.split(":")[0] for line in lines) == sorted([
        "TELEGRAM_HOME_CHANNEL", "platforms.telegram.reply_to_mode", "pairing approvals",
        "discord.free_response_channels", "discord.auto_thread"]), lines
    kept = [line for line in result.stdout.splitlines() if line.startswith("kept by")]
    assert len(kept) == 2 and "OPENROUTER_API_KEY" in kept[0] + kept[1]
    assert "model" in kept[0] + kept[1] and "memory" in kept[0] + kept[1]

    got = check(cfg, env)
    assert got["platform telegram"].startswith("ok") and got["platform discord"].startswith("ok")
    assert got["llm"].startswith("ok") and "'hermes-agent' listed" in got["llm"]


def test_a_home_with_unsupported_settings_reports_each_and_still_passes_check(tmp_path, fleet):
    qq, telegram = fleet.fakes["qqbot"], fleet.fakes["telegram"]
    path = home(tmp_path, "hermes3", config=f"""\
model:
  default: claude-opus-4.6
  provider: anthropic
display:
  busy_input_mode: steer
streaming:
  enabled: true
session_reset:
  mode: idle
platforms:
  qqbot:
    enabled: true
    extra:
      app_id: "{qq.app_id}"
      client_secret: "{qq.client_secret}"
      dm_policy: allowlist
      allow_from: [user-openid-1]
      group_policy: open
      markdown_support: true
  api_server:
    enabled: true
whatsapp:
  reply_prefix: ""
""", env=f"""\
ANTHROPIC_API_KEY=sk-ant-not-a-real-key
EXA_API_KEY=exa-not-a-real-key
TELEGRAM_BOT_TOKEN={telegram.token}
TELEGRAM_WEBHOOK_URL=https://my-app.fly.dev/telegram
QQ_GROUP_ALLOWED_USERS=group-openid-1
WHATSAPP_ENABLED=true
WHATSAPP_ALLOWED_USERS=15551234567
SIGNAL_HTTP_URL=http://127.0.0.1:8080
SIGNAL_ACCOUNT=+15551234567
MATRIX_ACCESS_TOKEN=syt_not_a_real_token
MATRIX_HOMESERVER=https://matrix.example.org
WECOM_CALLBACK_CORP_ID=ww0123456789
WECOM_CALLBACK_CORP_SECRET=not-a-real-corp-secret
API_SERVER_KEY=too-short
""")
    result, cfg, env = import_home(tmp_path, path, f"platforms.qqbot.api_base={qq.http_base}",
                                   f"platforms.qqbot.token_url={qq.token_url}",
                                   f"platforms.telegram.api_base={telegram.http_base}")
    assert result.returncode == 0, result.stderr
    written = yaml.safe_load(cfg.read_text())
    assert "agent" not in written  # anthropic's API is not OpenAI's: the echo agent answers
    assert written["gateway"]["busy_mode"] == "steer"
    # no allowlist: hermes-agent lets nobody in but paired users; so does the import
    assert written["platforms"]["telegram"] == {"token": "${TELEGRAM_BOT_TOKEN}",
                                                "dm_policy": "pairing",
                                                "group_policy": "allowlist", "groups": {},
                                                "api_base": telegram.http_base}
    assert written["platforms"]["qqbot"] == {
        "app_id": qq.app_id, "client_secret": "${QQ_CLIENT_SECRET}",
        "allow_from": ["user-openid-1"], "dm_policy": "allowlist",
        "group_policy": "allowlist", "groups": {"group-openid-1": {}},
        "api_base": qq.http_base, "token_url": qq.token_url}
    assert read_env_file(env)["QQ_CLIENT_SECRET"] == qq.client_secret  # moved out of the yaml
    lines = unmapped(result)
    expected = ["model.provider: anthropic", "pairing approvals", "TELEGRAM_WEBHOOK_URL",
                "whatsapp", "signal", "matrix", "wecom_callback", "API_SERVER_ENABLED",
                "qqbot groups",
                "platforms.qqbot.extra.markdown_support", "streaming", "session_reset",
                "ANTHROPIC_API_KEY", "EXA_API_KEY"]
    for setting in expected:
        assert sum(line.startswith(setting + ":") for line in lines) == 1, (setting, lines)
    assert len(lines) == len(expected), lines
    for secret in ("not-a-real", qq.client_secret, telegram.token, "too-short", "15551234567"):
        assert secret not in result.stdout + result.stderr + cfg.read_text()

    got = check(cfg, env)
    assert set(got) == {"runtime", "config", "data_dir", "platform qqbot", "platform telegram",
                        "llm"}
    assert got["llm"].startswith("skip")


def test_a_slack_and_dingtalk_home_imports_and_passes_check(tmp_path, fleet):
    slack, dingtalk = fleet.fakes["slack"], fleet.fakes["dingtalk"]
    path = home(tmp_path, "hermes4", config="""\
platforms:
  dingtalk:
    extra:
      require_mention: true
""", env=f"""\
# messaging/slack.md (Socket Mode)
SLACK_BOT_TOKEN={slack.bot_token}
SLACK_APP_TOKEN={slack.app_token}
SLACK_ALLOWED_USERS=U0USER0
# messaging/dingtalk.md (Stream mode)
DINGTALK_CLIENT_ID={dingtalk.client_id}
DINGTALK_CLIENT_SECRET={dingtalk.client_secret}
DINGTALK_ALLOW_ALL_USERS=true
""")
    result, cfg, env = import_home(tmp_path, path, f"platforms.slack.api_base={slack.api_base}",
                                   f"platforms.dingtalk.api_base={dingtalk.http_base}")
    assert result.returncode == 0, result.stderr
    written = yaml.safe_load(cfg.read_text())["platforms"]
    assert written["slack"]["app_token"] == "${SLACK_APP_TOKEN}"
    assert written["slack"]["bot_token"] == "${SLACK_BOT_TOKEN}"
    assert written["dingtalk"]["client_secret"] == "${DINGTALK_CLIENT_SECRET}"
    assert written["dingtalk"]["require_mention"] is True
    for secret in secrets_of(env):
        assert secret not in result.stdout + result.stderr + cfg.read_text()
    got = check(cfg, env)
    assert got["platform slack"].startswith("ok") and got["platform dingtalk"].startswith("ok")


# --- the mapping's rules -----------------------------------------------------------------------

def mapped(tmp_path, config: str, env: str, available=None, name: str = "h"):
    path = home(tmp_path, name, config, env)
    return convert(read_home(path), available)


@pytest.mark.parametrize("config, env, expected", [
    ("{}", "TELEGRAM_ALLOWED_USERS=1,2, 2 ,3",
     {"allow_from": ["1", "2", "3"], "dm_policy": "pairing"}),
    ("{}", "TELEGRAM_ALLOWED_USERS=1,*", {}),
    ("{}", "TELEGRAM_ALLOW_ALL_USERS=true\nTELEGRAM_ALLOWED_USERS=1", {}),
    ("{}", "GATEWAY_ALLOWED_USERS=9", {"allow_from": ["9"], "dm_policy": "pairing"}),
    ("{}", "GATEWAY_ALLOW_ALL_USERS=yes", {}),
    ("{}", "GATEWAY_ALLOW_ALL_USERS=true\nTELEGRAM_ALLOWED_USERS=4",
     {"allow_from": ["4"], "dm_policy": "pairing"}),
    # hermes-agent's default: nobody but paired users (unknown DMs get a code), no groups
    ("{}", "", {"dm_policy": "pairing", "group_policy": "allowlist", "groups": {}}),
    ("unauthorized_dm_behavior: ignore", "TELEGRAM_ALLOWED_USERS=1",
     {"allow_from": ["1"], "dm_policy": "allowlist"}),
    ("{}", "TELEGRAM_ALLOW_ALL_USERS=1\nTELEGRAM_GROUP_ALLOWED_CHATS=-100123\n"
           "TELEGRAM_REQUIRE_MENTION=false",
     {"group_policy": "allowlist", "groups": {"-100123": {}}, "require_mention": False}),
    ("telegram: {allow_admin_from: [7], require_mention: true}", "TELEGRAM_ALLOW_ALL_USERS=1",
     {"admins": ["7"], "require_mention": True}),
])
def test_access_follows_hermes_agents_authorization(tmp_path, config, env, expected):
    got = mapped(tmp_path, config, f"TELEGRAM_BOT_TOKEN=123:abc\n{env}\n", {"telegram"})
    section = dict(got.config["platforms"]["telegram"])
    assert section.pop("token") == "${TELEGRAM_BOT_TOKEN}"
    assert section == expected


def test_config_yaml_credentials_go_to_the_env_file_and_env_wins(tmp_path):
    got = mapped(tmp_path, """\
platforms:
  wecom:
    extra: {bot_id: from-config, secret: config-secret, allow_from: [a]}
gateway:
  platforms:
    discord: {token: config-discord-token, enabled: false}
""", "WECOM_BOT_ID=from-env\nDISCORD_ALLOWED_USERS=1\n", {"wecom", "discord"})
    assert got.config["platforms"]["wecom"]["bot_id"] == "from-env"
    assert got.env == {"WECOM_SECRET": "config-secret", "DISCORD_BOT_TOKEN": "config-discord-token"}
    assert got.config["platforms"]["discord"]["enabled"] is False  # explicitly off in hermes


def test_slack_and_dingtalk_map_when_this_installation_has_their_adapters(tmp_path):
    config, env = "{}", ("SLACK_BOT_TOKEN=xoxb-1\nSLACK_APP_TOKEN=xapp-1\nSLACK_ALLOWED_USERS=U1\n"
                         "DINGTALK_CLIENT_ID=ding-id\nDINGTALK_CLIENT_SECRET=ding-secret\n"
                         "DINGTALK_ALLOW_ALL_USERS=true\n")
    got = mapped(tmp_path, config, env, {"slack", "dingtalk"})
    assert got.config["platforms"]["slack"] == {"bot_token": "${SLACK_BOT_TOKEN}",
                                                "app_token": "${SLACK_APP_TOKEN}",
                                                "allow_from": ["U1"], "dm_policy": "pairing"}
    assert got.config["platforms"]["dingtalk"] == {"client_id": "ding-id",
                                                   "client_secret": "${DINGTALK_CLIENT_SECRET}"}
    assert sorted(line.split(":")[0] for line in got.unmapped) == ["model", "pairing approvals"]
    without = mapped(tmp_path, config, env, set(), name="h2")
    assert without.config["platforms"] == {}
    assert sorted(line.split(":")[0] for line in without.unmapped
                  if not line.startswith("model:")) == ["dingtalk", "slack"]


@pytest.mark.parametrize("model, env, base_url, key", [
    ("{default: m, provider: openrouter}", "OPENROUTER_API_KEY=k", "https://openrouter.ai/api/v1",
     "${OPENROUTER_API_KEY}"),
    ("m", "OPENROUTER_API_KEY=k", "https://openrouter.ai/api/v1", "${OPENROUTER_API_KEY}"),
    ("{default: m, provider: zai}", "GLM_API_KEY=k\nGLM_BASE_URL=https://glm.example/v4",
     "https://glm.example/v4", "${GLM_API_KEY}"),
    ("{model: m, provider: custom, base_url: 'http://h:1/v1/', api_key: inline-key}", "",
     "http://h:1/v1", "${HERMES_MODEL_API_KEY}"),
])
def test_the_model_maps_to_the_builtin_agent_on_openai_compatible_endpoints(
        tmp_path, model, env, base_url, key):
    got = mapped(tmp_path, f"model: {model}\n", env + "\n", set())
    assert got.config["agent"]["base_url"] == base_url
    assert got.config["agent"]["model"] == "m"
    assert got.config["agent"]["api_key"] == key


def test_the_api_server_host_and_model_name_are_used(tmp_path):
    got = mapped(tmp_path, "platforms:\n  api_server: {extra: {port: 9000}}\n",
                 f"API_SERVER_KEY={API_SERVER_KEY}\nAPI_SERVER_HOST=0.0.0.0\n"
                 "API_SERVER_MODEL_NAME=my-profile\n", set())
    assert got.config["agent"]["base_url"] == "http://127.0.0.1:9000/v1"
    assert got.config["agent"]["model"] == "my-profile"
    off = mapped(tmp_path, "", f"API_SERVER_KEY={API_SERVER_KEY}\nAPI_SERVER_ENABLED=false\n",
                 set(), name="h2")
    assert "agent" not in off.config


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("files, problems", [
    ({}, ["config.yaml: not found", ".env: not found"]),
    ({"config.yaml": "a: [1,\n", ".env": ""}, ["invalid YAML at line 2"]),
    ({"config.yaml": "- a\n- b\n", ".env": ""}, ["the top level is not a mapping"]),
    ({"config.yaml": "{}", ".env": "this is not an env line\nA='unterminated\nB=ok\n"},
     [".env line 1: not KEY=value", ".env line 2: A: the quoted value does not end"]),
    ({"config.yaml": "{}", ".env": "C=${UNDEFINED_THING}\n"}, ["C: refers to ${UNDEFINED_THING}"]),
    ({"config.yaml": "{}", ".env": "WECOM_BOT_ID=aib1\nFEISHU_APP_SECRET=s\n"},
     ["wecom: WECOM_BOT_ID is set but WECOM_SECRET is not",
      "feishu: FEISHU_APP_SECRET is set but FEISHU_APP_ID is not"]),
    ({"config.yaml": "platforms:\n  telegram: just-a-string\n", ".env": ""},
     ["platforms.telegram is not a mapping"]),
    ({"config.yaml": "telegram: {allow_from: {a: 1}}\n", ".env": "TELEGRAM_BOT_TOKEN=1:x\n"},
     ["telegram.allow_from is not a list of user ids"]),
    ({"config.yaml": "{}", ".env": "FEISHU_APP_ID=a\nFEISHU_APP_SECRET=b\nFEISHU_DOMAIN=x\n"},
     ["FEISHU_DOMAIN is neither feishu, lark nor an https:// URL"]),
    ({"config.yaml": "{}", ".env": "QQ_APP_ID=1\nQQ_CLIENT_SECRET=it's\nQQ_ALLOW_ALL_USERS=1\n"},
     ["QQ_CLIENT_SECRET: the value holds a single quote"]),
])
def test_a_broken_home_gets_one_line_per_problem_and_nothing_is_written(tmp_path, files, problems):
    path = tmp_path / "hermes"
    path.mkdir()
    for name, text in files.items():
        (path / name).write_text(text)
    result, cfg, env = import_home(tmp_path, path)
    assert result.returncode == 2
    errors = result.stderr.strip().splitlines()
    assert len(errors) == len(problems) + 1 and "nothing written" in errors[-1], errors
    for problem, line in zip(problems, errors):
        assert problem in line, (problem, line)
    assert not cfg.exists() and not env.exists()
    assert "Traceback" not in result.stderr


def test_a_missing_home_is_one_line(tmp_path):
    result, cfg, env = import_home(tmp_path, tmp_path / "nope")
    assert result.returncode == 2 and "no such directory" in result.stderr
    assert not cfg.exists() and not env.exists()


def test_existing_outputs_are_kept_unless_forced(tmp_path):
    path = home(tmp_path, "h", "{}",
                "TELEGRAM_BOT_TOKEN=1:secret-token\nTELEGRAM_ALLOWED_USERS=1\n")
    (tmp_path / "out.yaml").write_text("mine\n")
    result, cfg, env = import_home(tmp_path, path)
    assert result.returncode == 2 and "exists (pass --force" in result.stderr
    assert cfg.read_text() == "mine\n" and not env.exists()
    result = run_cli("import-hermes", str(path), "--out", str(cfg), "--env-out", str(env),
                     "--force")
    assert result.returncode == 0, result.stderr
    assert "${TELEGRAM_BOT_TOKEN}" in cfg.read_text()
    assert stat.S_IMODE(env.stat().st_mode) == 0o600


def test_the_outputs_may_not_replace_the_homes_own_files(tmp_path):
    path = home(tmp_path, "h", "{}", "")
    result = run_cli("import-hermes", str(path), "--out", str(tmp_path / "o.yaml"),
                     "--env-out", str(path / ".env"), "--force")
    assert result.returncode == 2 and "hermes home's own files" in result.stderr
    assert (path / ".env").read_text() == ""


def test_a_set_that_breaks_the_config_writes_nothing(tmp_path):
    path = home(tmp_path, "h", "{}", "TELEGRAM_BOT_TOKEN=1:x\nTELEGRAM_ALLOWED_USERS=1\n")
    result, cfg, env = import_home(tmp_path, path, "platforms.telegram.poll_timeout_s=500")
    assert result.returncode == 2 and "platforms.telegram.poll_timeout_s" in result.stderr
    assert not cfg.exists() and not env.exists()
    result, cfg, env = import_home(tmp_path, path, "no-equals-sign")
    assert result.returncode == 2 and "expected KEY.PATH=VALUE" in result.stderr


def test_the_default_home_is_hermes_home_or_dot_hermes(tmp_path):
    path = home(tmp_path, "elsewhere", "{}", "")
    result = run_cli("import-hermes", "--out", str(tmp_path / "o.yaml"),
                     "--env-out", str(tmp_path / "o.env"), env={"HERMES_HOME": str(path)})
    assert result.returncode == 0, result.stderr
    assert f"imported from {path}" in result.stdout


def test_read_home_reports_both_files_at_once(tmp_path):
    (tmp_path / "h").mkdir()
    with pytest.raises(HomeProblems) as e:
        read_home(tmp_path / "h")
    assert len(e.value.problems) == 2


# --- env files ----------------------------------------------------------------------------------

def test_env_files_are_read_as_dotenv_reads_them():
    values = envfile.parse(
        "# comment\n\nexport A=1\nB = two words   # inline comment\nC='lit ${A} # not a comment'\n"
        'D="line\\nbreak \\"q\\" ${A}"\nE=${A}-${MISSING:-dflt}\nF=x#y\nA=2\n')
    assert values == {"A": "2", "B": "two words", "C": "lit ${A} # not a comment",
                       "D": 'line\nbreak "q" 1', "E": "1-dflt", "F": "x#y"}


def test_written_env_files_read_the_same_in_systemd_style_and_in_a_shell(tmp_path):
    values = {"PLAIN": "abc", "SPACES": "a b  c", "SHELLY": "$HOME `x` \\n ${Y} \"q\" #h"}
    path = tmp_path / "e.env"
    envfile.write_private(path, envfile.render(values, header="two\nlines"))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_env_file(path) == values
    assert envfile.read(path) == {**values, "SHELLY": values["SHELLY"]}
    shell = subprocess.run(["sh", "-c", 'set -a; . "$0"; set +a; env -0', str(path)],
                           capture_output=True, check=True, env={"PATH": os.environ["PATH"]})
    seen = dict(item.split("=", 1) for item in shell.stdout.decode().split("\0") if "=" in item)
    assert {k: seen[k] for k in values} == values
