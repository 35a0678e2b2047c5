"""The gateway and its database file: a file the gateway cannot write is refused at start (one
line, exit 2), a file deleted while it runs is reported (an error line, /healthz degraded), and
the first WAL checkpoint runs at start, not one interval later."""
import subprocess
import sys

import pytest
import requests

from hermes_green import gateway as gateway_module
from hermes_green.config import StatusConfig
from hermes_green.status import StatusServer
from tests.fakes.fake_testchat import FakeTestChat
from tests.readonly import give_to_unprivileged, shared_dir, unprivileged  # noqa: F401 (fixture)
from tests.support import BIN, ROOT, GateAgent, start_inprocess_gateway, wait_until, write_config

DB = "hermes-green.sqlite3"


@pytest.fixture
def fake():
    f = FakeTestChat().start()
    yield f
    f.stop()


def read_only_database(shared_dir):
    """A database from an earlier run, owned by the unprivileged user and chmod 0444: the
    realistic case (a service user, a file restored read-only from a backup). The gateway runs
    as that user (tests run as root, which ignores permission bits: see tests/readonly.py)."""
    data = shared_dir / "data"
    first = subprocess.run([sys.executable, "-c", (
        "import sys; sys.path.insert(0, sys.argv[2]); import hermes_green.runtime;"
        "from hermes_green.store import Store; Store(sys.argv[1]).open().close()"),
        str(data), str(ROOT)], capture_output=True, text=True, timeout=30)
    assert first.returncode == 0, first.stderr
    for path in (data, *data.iterdir()):
        give_to_unprivileged(path)
    (data / DB).chmod(0o444)
    config = write_config(shared_dir / "config.yaml", {
        "gateway": {"data_dir": str(data), "status": {"enabled": False}}})
    config.chmod(0o644)
    return config


def run_as_unprivileged(*args: str, timeout: float = 20.0) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([*unprivileged(), sys.executable, BIN, *args], capture_output=True,
                              text=True, timeout=timeout, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        pytest.fail(f"hermes-green {' '.join(args)} was still running after {timeout:.0f}s: "
                    f"it accepted the read-only database")


def test_a_read_only_database_file_is_refused_at_start(shared_dir):
    config = read_only_database(shared_dir)
    result = run_as_unprivileged("--config", str(config))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        f"hermes-green: {shared_dir / 'data' / DB}: cannot write the database ({DB} is read-only)"]


def test_check_reports_a_read_only_database_as_a_failure(shared_dir):
    config = read_only_database(shared_dir)
    result = run_as_unprivileged("--config", str(config), "check")
    assert result.returncode == 1, result.stdout + result.stderr
    data_line = [line for line in result.stdout.splitlines() if " data_dir: " in line]
    assert data_line == [f"FAIL data_dir: StoreError: {shared_dir / 'data' / DB}: cannot write "
                         f"the database ({DB} is read-only)"], result.stdout


def test_a_database_deleted_while_running_is_logged_and_degrades_healthz(tmp_path, fake,
                                                                         monkeypatch, caplog):
    monkeypatch.setattr(gateway_module, "CHECKPOINT_INTERVAL_S", 0.05)
    gw = start_inprocess_gateway(tmp_path, fake, GateAgent())
    gw.status_server = server = StatusServer(gw, StatusConfig(port=0)).start()
    healthz = server.url.rstrip("/") + "/healthz"
    try:
        ok = requests.get(healthz, timeout=5)
        assert ok.status_code == 200 and ok.json()["status"] == "ok"
        data = tmp_path / "data"
        for name in (DB, f"{DB}-wal", f"{DB}-shm"):  # `rm -rf data/*` while it runs
            (data / name).unlink()
        lost = wait_until(
            lambda: [r for r in caplog.records if "store file lost" in r.getMessage()],
            what="the lost file logged")
        assert len(lost) == 1 and lost[0].levelname == "ERROR"
        assert f"error={data / DB} was deleted while the gateway runs" in lost[0].getMessage()
        r = requests.get(healthz, timeout=5)
        assert r.status_code == 503
        doc = r.json()
        assert doc["status"] == "degraded"
        assert doc["store"] == {"ok": False,
                                "error": f"{data / DB} was deleted while the gateway runs"}
        assert doc["platforms"]["testchat"]["state"] == "ready"  # the connection is not the problem
        assert not (data / DB).exists()  # and no checkpoint made an empty file in its place
    finally:
        gw.shutdown()


def test_the_first_checkpoint_runs_at_start(tmp_path, fake, monkeypatch):
    """A run that died leaves its writes in the WAL; the next start folds them into the file at
    once (here the interval is an hour, so only the start-up checkpoint can do it)."""
    data = tmp_path / "data"
    crashed = subprocess.run([sys.executable, "-c", (
        "import os, sys; sys.path.insert(0, sys.argv[2]); import hermes_green.runtime;"
        "from hermes_green.store import Store; from hermes_green.models import InboundMessage;"
        "s = Store(sys.argv[1]).open()\n"
        "for i in range(300):\n"
        "    s.journal_inbound(InboundMessage('testchat', f'm{i}', 'c', 'u', 'x' * 500))\n"
        "os._exit(0)"), str(data), str(ROOT)], capture_output=True, text=True, timeout=30)
    assert crashed.returncode == 0, crashed.stderr
    assert (data / f"{DB}-wal").stat().st_size > 100_000  # the writes are in the WAL only
    before = (data / DB).stat().st_size
    monkeypatch.setattr(gateway_module, "CHECKPOINT_INTERVAL_S", 3600.0)
    gw = start_inprocess_gateway(tmp_path, fake, GateAgent())
    try:
        wait_until(lambda: (data / DB).stat().st_size > before + 100_000,
                   what="the WAL checkpointed into the database file")
    finally:
        gw.shutdown()
