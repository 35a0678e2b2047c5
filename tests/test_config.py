"""Config errors name the key path and what was expected, never show a secret, and reach the
user as one line with exit code 2 through the real entry point."""
import pytest

from hermes_green.config import ConfigError, parse_config
from tests.support import run_cli

SECRET = "s3cr3t-VALUE-do-not-show"


def error_of(text: str, env=None) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(text, env=env or {})
    return str(e.value)


def test_minimal_config_and_defaults():
    cfg = parse_config("platforms:\n  qqbot: {app_id: '1', client_secret: x}\n", env={})
    assert cfg.gateway.busy_mode == "queue"
    assert list(cfg.platforms.enabled()) == ["qqbot"]
    assert cfg.platforms.qqbot[0].token_url == "https://bots.qq.com/app/getAppAccessToken"
    assert cfg.agent is None  # no agent section: the echo agent answers


def test_disabled_and_absent_platforms_are_off():
    cfg = parse_config("platforms:\n  wecom: {bot_id: b, secret: s, enabled: false}\n", env={})
    assert cfg.platforms.enabled() == {}


def test_missing_key_names_the_path():
    assert error_of("platforms:\n  wecom: {secret: x}\n") == "platforms.wecom.bot_id: field required"


def test_unknown_key_suggests_the_close_one():
    msg = error_of("platforms:\n  wecom: {bot_id: b, secret: s, ping_intervall_s: 3}\n")
    assert msg == "platforms.wecom.ping_intervall_s: unknown key (did you mean 'ping_interval_s'?)"


def test_unknown_section_is_rejected():
    assert error_of("gatway: {}\n").startswith("gatway: unknown key (did you mean 'gateway'?)")


def test_wrong_type_names_path_and_expectation():
    msg = error_of("gateway: {drain_timeout_s: soon}\n")
    assert msg.startswith("gateway.drain_timeout_s: input should be a valid number")


def test_bad_choice_lists_the_choices():
    assert error_of("gateway: {busy_mode: panic}\n") == \
        "gateway.busy_mode: input should be 'queue', 'interrupt' or 'merge'"


def test_yaml_syntax_error_gives_line_and_column():
    msg = error_of("gateway:\n  data_dir: ./d\n  status: [1, 2\n")
    assert "invalid YAML at line 4, column 1" in msg


def test_env_substitution_and_default():
    cfg = parse_config("agent: {api_key: '${KEY}', model: '${MODEL:-small}'}\n",
                       env={"KEY": SECRET})
    assert cfg.agent.api_key.get_secret_value() == SECRET
    assert cfg.agent.model == "small"


def test_unset_env_var_names_the_key_and_variable():
    msg = error_of("platforms:\n  feishu: {app_id: a, app_secret: '${FEISHU_SECRET}'}\n")
    assert msg.startswith("platforms.feishu.app_secret: environment variable FEISHU_SECRET is not set")


def test_secret_never_in_repr_or_error():
    cfg = parse_config(f"platforms:\n  qqbot: {{app_id: '1', client_secret: {SECRET}}}\n", env={})
    assert SECRET not in repr(cfg) and SECRET not in str(cfg)
    # a type error on a secret field must not echo the value either
    msg = error_of(f"platforms:\n  qqbot: {{app_id: '1', client_secret: [{SECRET}]}}\n")
    assert msg.startswith("platforms.qqbot.client_secret:") and SECRET not in msg


def test_status_off_loopback_requires_token():
    msg = error_of("gateway: {status: {host: 0.0.0.0}}\n")
    assert msg.startswith("gateway.status: a token is required")


# --- through the real entry point --------------------------------------------------------

CASES = {
    "broken_yaml": ("gateway: {data_dir: [\n", "invalid YAML at line"),
    "missing_key": ("platforms:\n  qqbot: {client_secret: " + SECRET + "}\n",
                    "platforms.qqbot.app_id: field required"),
    "mistyped_key": ("platforms:\n  qqbot: {app_id: '1', clientsecret: " + SECRET + "}\n",
                     "platforms.qqbot.clientsecret: unknown key (did you mean 'client_secret'?)"),
    "unset_var": ("agent: {api_key: '${HG_TEST_UNSET_VAR}'}\n",
                  "agent.api_key: environment variable HG_TEST_UNSET_VAR is not set"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_cli_config_error_is_one_line_exit_2(tmp_path, case):
    text, expected = CASES[case]
    path = tmp_path / "config.yaml"
    path.write_text(text)
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert expected in lines[0]
    assert "Traceback" not in result.stderr and SECRET not in result.stderr + result.stdout


def test_cli_unwritable_data_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    path = tmp_path / "config.yaml"
    path.write_text(f"gateway: {{data_dir: {blocker}/data, status: {{enabled: false}}}}\n")
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("hermes-green: gateway.data_dir: cannot create")
    assert "Traceback" not in result.stderr


def test_cli_corrupt_database(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "hermes-green.sqlite3").write_bytes(b"this is not sqlite" * 100)
    path = tmp_path / "config.yaml"
    path.write_text(f"gateway: {{data_dir: {data}, status: {{enabled: false}}}}\n")
    result = run_cli("--config", str(path))
    assert result.returncode == 2
    assert "not a usable SQLite database" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr


def test_cli_missing_config_file(tmp_path):
    result = run_cli("--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2 and "config file not found" in result.stderr


def test_cli_status_port_in_use_is_one_line_exit_2(tmp_path):
    import socket
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        path = tmp_path / "config.yaml"
        path.write_text(f"gateway: {{data_dir: {tmp_path}/data, status: {{port: {port}}}}}\n")
        result = run_cli("--config", str(path))
    finally:
        busy.close()
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("hermes-green: gateway.status:")
