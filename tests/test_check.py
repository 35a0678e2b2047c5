"""`hermes-green check` through the real entry point against the fakes: one line per check,
exit 0 when everything works, non-zero with the failing line when credentials are wrong."""
import pytest

from hermes_green.testing.fleet import FakeFleet
from tests.support import run_cli, write_config


@pytest.fixture(scope="module")
def fleet():
    f = FakeFleet().start()
    yield f
    f.stop()


def config(tmp_path, fleet, **platform_overrides):
    platforms = fleet.platforms_config()
    for name, over in platform_overrides.items():
        platforms[name].update(over)
    return write_config(tmp_path / "c.yaml", {
        "gateway": {"data_dir": str(tmp_path / "data")},
        "agent": fleet.agent_config(tools=["hermes_green.agent.demo_tools"]),
        "platforms": platforms})


def lines(result) -> dict[str, str]:
    out = {}
    for line in result.stdout.splitlines():
        status, rest = line.split(None, 1)
        name, detail = rest.split(": ", 1)
        out[name] = f"{status} {detail}"
    return out


def test_all_good(tmp_path, fleet):
    result = run_cli("check", "--config", str(config(tmp_path, fleet)))
    got = lines(result)
    assert result.returncode == 0, result.stdout + result.stderr
    assert set(got) == {"runtime", "config", "data_dir", "llm",
                        "tools hermes_green.agent.demo_tools"} | {
                            f"platform {p}" for p in fleet.platforms}
    assert all(v.startswith("ok") for v in got.values()), got
    assert "not verified" in got["platform wecom"]  # without --full, WeCom is not taken over
    assert "'fake-model' listed" in got["llm"]


def test_bad_credentials_fail_their_own_lines(tmp_path, fleet):
    cfg = config(tmp_path, fleet, feishu={"app_secret": "wrong-feishu-secret"},
                 qqbot={"client_secret": "wrong-qq-secret"})
    result = run_cli("check", "--config", str(cfg))
    got = lines(result)
    assert result.returncode == 1
    assert got["platform feishu"].startswith("FAIL") and got["platform qqbot"].startswith("FAIL")
    assert got["platform wecom"].startswith("ok") and got["llm"].startswith("ok")
    assert "wrong-feishu-secret" not in result.stdout + result.stderr
    assert "wrong-qq-secret" not in result.stdout + result.stderr


def test_full_check_subscribes_wecom_and_catches_a_bad_secret(tmp_path, fleet):
    good = run_cli("check", "--full", "--config", str(config(tmp_path, fleet)))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "session established" in lines(good)["platform wecom"]
    bad = run_cli("check", "--full", "--config",
                  str(config(tmp_path, fleet, wecom={"secret": "wrong-wecom-secret"})))
    got = lines(bad)
    assert bad.returncode == 1 and got["platform wecom"].startswith("FAIL")
    assert "wrong-wecom-secret" not in bad.stdout + bad.stderr


def test_wrong_llm_key_and_missing_tool_module(tmp_path, fleet):
    path = write_config(tmp_path / "c.yaml", {
        "gateway": {"data_dir": str(tmp_path / "data")},
        "agent": fleet.agent_config(api_key="sk-wrong-key", tools=["no_such_tools_module"])})
    result = run_cli("check", "--config", str(path))
    got = lines(result)
    assert result.returncode == 1
    assert got["llm"].startswith("FAIL") and "refused the API key" in got["llm"]
    assert got["tools no_such_tools_module"].startswith("FAIL")
    assert "sk-wrong-key" not in result.stdout + result.stderr
