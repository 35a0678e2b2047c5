"""`hermes-green service install|uninstall`: the systemd unit and the launchd job it writes,
with this installation's paths, checked by the tools that read them (systemd-analyze where it is
installed, plistlib) and by running the command they hold: a real gateway starts with the
secrets of the env file and drains on SIGTERM within the stop timeout. Uninstall removes what
install (and `systemctl enable`) made. deploy/hermes-green.plist is the same job."""
import configparser
import os
import plistlib
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import gevent
import pytest

from hermes_green.service_install import (STOP_MARGIN_S, ServiceInstallError, ServiceSpec,
                                          detect_manager, launchd_job, read_env_file)
from tests.support import BIN, ROOT, run_cli, wait_until

SECRET = "sk-secret-from-the-env-file"


@pytest.fixture
def setup(tmp_path):
    """A config that needs a secret from the env file, the env file, and a place for units."""
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "config.yaml").write_text(
        "gateway: {data_dir: ./data, drain_timeout_s: 5, status: {enabled: false}}\n"
        "agent: {api_key: '${LLM_KEY}', base_url: 'http://127.0.0.1:9/v1', tools: []}\n")
    (etc / "env").write_text(f"# as systemd's EnvironmentFile reads it\nLLM_KEY='{SECRET}'\n")
    return etc


def install(setup, tmp_path, *extra: str):
    result = run_cli("service", "install", "--config", str(setup / "config.yaml"),
                     "--env-file", str(setup / "env"), "--target-dir", str(tmp_path / "units"),
                     *extra)
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    return result


def read_unit(path: Path) -> configparser.RawConfigParser:
    unit = configparser.RawConfigParser(strict=False, interpolation=None)
    unit.optionxform = str
    unit.read(path)
    return unit


def assert_systemd_accepts(path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        return  # parsed above; the real checker is not installed here
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and path.name not in result.stderr, result.stderr


def test_a_system_systemd_unit_has_this_installs_paths_and_passes_systemd_analyze(
        setup, tmp_path):
    out = install(setup, tmp_path, "--platform", "systemd", "--run-as", "daemon").stdout
    path = tmp_path / "units" / "hermes-green.service"
    unit = read_unit(path)
    service = unit["Service"]
    assert shlex.split(service["ExecStart"]) == [
        os.path.abspath(sys.executable), BIN, "--config", str(setup / "config.yaml")]
    assert service["WorkingDirectory"] == str(setup)
    assert service["EnvironmentFile"] == str(setup / "env")
    assert int(service["TimeoutStopSec"]) == 5 + STOP_MARGIN_S  # above the 5 s drain
    assert (service["Restart"], service["KillSignal"], service["User"]) == (
        "on-failure", "SIGTERM", "daemon")
    assert unit["Unit"]["After"] == "network-online.target"
    assert unit["Install"]["WantedBy"] == "multi-user.target"
    assert "  systemctl enable --now hermes-green.service" in out.splitlines()
    assert oct(path.stat().st_mode & 0o777) == "0o644"
    assert_systemd_accepts(path)


def test_a_user_systemd_unit_needs_no_root_and_starts_with_the_session(setup, tmp_path):
    out = install(setup, tmp_path, "--platform", "systemd", "--user").stdout
    path = tmp_path / "units" / "hermes-green.service"
    unit = read_unit(path)
    assert unit["Install"]["WantedBy"] == "default.target"
    assert "User" not in unit["Service"] and "After" not in unit["Unit"]
    assert "  systemctl --user enable --now hermes-green.service" in out.splitlines()
    assert_systemd_accepts(path)


def test_a_launchd_job_restarts_on_failure_and_outwaits_the_drain(setup, tmp_path):
    logs = tmp_path / "logs"
    out = install(setup, tmp_path, "--platform", "launchd", "--user",
                  "--log-dir", str(logs)).stdout
    path = tmp_path / "units" / "hermes-green.plist"
    job = plistlib.loads(path.read_bytes())
    assert job["Label"] == "hermes-green" and job["RunAtLoad"] is True
    assert job["KeepAlive"] == {"SuccessfulExit": False}
    assert job["ExitTimeOut"] == 5 + STOP_MARGIN_S
    assert (job["StandardOutPath"], job["StandardErrorPath"]) == (
        str(logs / "gateway.out.log"), str(logs / "gateway.err.log"))
    assert logs.is_dir()  # launchd would not create it
    assert job["EnvironmentVariables"]["PYTHONUNBUFFERED"] == "1"
    assert job["EnvironmentVariables"]["PATH"].startswith(
        os.path.dirname(os.path.abspath(sys.executable)) + ":")
    assert job["ProgramArguments"][-4:] == [
        os.path.abspath(sys.executable), BIN, "--config", str(setup / "config.yaml")]
    assert job["WorkingDirectory"] == str(setup) and "UserName" not in job
    assert f"  launchctl bootstrap gui/$(id -u) {path}" in out.splitlines()
    assert SECRET.encode() not in path.read_bytes()  # the env file is read at each start


def _start(args: list[str], cwd: str, env: dict) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _catches_sigterm(pid: int) -> bool:
    """The gateway installs its SIGTERM handler just after logging that it started."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGTERM - 1)))
    return False


def _wait_line(proc: subprocess.Popen, needle: str, timeout: float) -> list[str]:
    lines: list[str] = []
    with gevent.Timeout(timeout, AssertionError(f"no {needle!r} within {timeout}s: {lines}")):
        for line in proc.stdout:
            lines.append(line)
            if needle in line:
                return lines
    raise AssertionError(f"exited ({proc.wait()}) before {needle!r}: {lines}")


@pytest.mark.parametrize("manager", ["systemd", "launchd"])
def test_the_installed_command_starts_a_gateway_with_the_env_files_secrets_and_drains(
        setup, tmp_path, manager):
    install(setup, tmp_path, "--platform", manager, "--user", "--log-dir", str(tmp_path / "l"))
    env = {k: v for k, v in os.environ.items() if k != "LLM_KEY"}
    if manager == "systemd":  # what systemd does with the unit's lines
        service = read_unit(tmp_path / "units" / "hermes-green.service")["Service"]
        args, cwd = shlex.split(service["ExecStart"]), service["WorkingDirectory"]
        env.update(read_env_file(Path(service["EnvironmentFile"])))
        stop_timeout = int(service["TimeoutStopSec"])
    else:  # what launchd does with the job's keys
        job = plistlib.loads((tmp_path / "units" / "hermes-green.plist").read_bytes())
        args, cwd = job["ProgramArguments"], job["WorkingDirectory"]
        env.update(job["EnvironmentVariables"])
        stop_timeout = job["ExitTimeOut"]
    proc = _start(args, cwd, env)
    try:
        _wait_line(proc, "gateway started", timeout=60)
        wait_until(lambda: _catches_sigterm(proc.pid), what="SIGTERM handler installed")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=stop_timeout) == 0  # a clean stop: KeepAlive does not restart
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert (setup / "data" / "hermes-green.sqlite3").exists()  # relative to WorkingDirectory


def test_uninstall_removes_the_unit_and_its_enable_links_and_says_how_to_stop_it(
        setup, tmp_path):
    units = tmp_path / "units"
    install(setup, tmp_path, "--platform", "systemd")
    wants = units / "multi-user.target.wants"
    wants.mkdir()
    (wants / "hermes-green.service").symlink_to("../hermes-green.service")  # systemctl enable
    result = run_cli("service", "uninstall", "--platform", "systemd", "--target-dir", str(units))
    assert result.returncode == 0, result.stderr
    assert not (units / "hermes-green.service").exists()
    assert not (wants / "hermes-green.service").is_symlink()
    assert "  systemctl stop hermes-green.service" in result.stdout.splitlines()
    again = run_cli("service", "uninstall", "--platform", "systemd", "--target-dir", str(units))
    assert again.returncode == 0 and again.stdout.startswith("nothing to remove")
    install(setup, tmp_path, "--platform", "launchd", "--user", "--log-dir", str(tmp_path / "l"))
    gone = run_cli("service", "uninstall", "--platform", "launchd", "--user",
                   "--target-dir", str(units))
    assert gone.returncode == 0 and not (units / "hermes-green.plist").exists()
    assert "  launchctl bootout gui/$(id -u)/hermes-green" in gone.stdout.splitlines()


def test_a_bad_config_or_an_unwritable_target_is_one_line_and_writes_nothing(setup, tmp_path):
    (setup / "bad.yaml").write_text("gateway: {drain_timeout_s: -1}\n")
    result = run_cli("service", "install", "--config", str(setup / "bad.yaml"),
                     "--platform", "systemd", "--target-dir", str(tmp_path / "units"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "hermes-green: gateway.drain_timeout_s: input should be greater than or equal to 0"]
    assert not (tmp_path / "units").exists()
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    result = run_cli("service", "install", "--config", str(setup / "config.yaml"),
                     "--env-file", str(setup / "env"), "--platform", "systemd",
                     "--target-dir", str(blocker / "units"))
    assert result.returncode == 2 and "cannot write" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "LLM_KEY" not in os.environ
    no_env_file = run_cli("service", "install", "--config", str(setup / "config.yaml"),
                          "--platform", "systemd", "--target-dir", str(tmp_path / "units"))
    assert no_env_file.returncode == 2 and "LLM_KEY is not set" in no_env_file.stderr
    assert not (tmp_path / "units").exists()


def test_the_service_manager_follows_the_os():
    assert detect_manager("linux") == "systemd"
    assert detect_manager("darwin") == "launchd"
    with pytest.raises(ServiceInstallError, match="--platform"):
        detect_manager("win32")


def test_deploy_plist_is_the_job_install_writes_for_the_documented_layout():
    job = plistlib.loads((ROOT / "deploy" / "hermes-green.plist").read_bytes())
    spec = ServiceSpec(
        manager="launchd", user=False,
        program=("/opt/hermes-green/.venv/bin/python", "/opt/hermes-green/bin/hermes-green"),
        config=Path("/etc/hermes-green/config.yaml"), working_dir=Path("/opt/hermes-green"),
        stop_timeout_s=30 + STOP_MARGIN_S, env_file=Path("/etc/hermes-green/env"),
        log_dir=Path("/Library/Logs/hermes-green"), run_as="hermes")
    assert job == launchd_job(spec)
    assert job["ExitTimeOut"] > 30  # the default gateway.drain_timeout_s
