"""Pairing and hot reload end to end: a real gateway process (`bin/hermes-green --config`) on
the strict platform fakes, driven by the real CLI in other processes (`pairing`, `reload`) and
by SIGHUP."""
import json
import signal
import sqlite3
import sys

import pytest
import yaml

from hermes_green.testing.fake_llm import text
from hermes_green.testing.fake_qqbot import FakeQQBotServer
from hermes_green.testing.fleet import FakeFleet, Keepalive
from tests.support import BIN, Process, run_cli, wait_until, write_config


def session_up(fake, conn_id=None) -> bool:
    """The QQ fake sent READY or RESUMED (on that connection)."""
    return any(f.direction == "out" and isinstance(f.data, dict)
               and f.data.get("t") in ("READY", "RESUMED")
               and (conn_id is None or f.conn_id == conn_id) for f in fake.frames)


def qq_answers(qq, mid):
    return [r.content for r in qq.replies if r.msg_id == mid]


def last_reload(data_dir):
    db = sqlite3.connect(f"file:{data_dir / 'hermes-green.sqlite3'}?mode=ro", uri=True)
    try:
        row = db.execute("SELECT value FROM meta WHERE key='last_reload'").fetchone()
    finally:
        db.close()
    return json.loads(row[0]) if row else None


def stop(gw: Process) -> str:
    gw.signal(signal.SIGTERM)
    assert gw.wait(30) == 0
    return gw.stderr


# -- pairing -------------------------------------------------------------------------------------

@pytest.fixture
def qq():
    f = FakeQQBotServer(heartbeat_interval_ms=500).start()
    yield f
    f.stop()


def test_pairing_end_to_end_through_the_cli(tmp_path, qq):
    data_dir = tmp_path / "data"
    cfg = write_config(tmp_path / "config.yaml", {
        "gateway": {"data_dir": str(data_dir), "status": {"enabled": False}},
        "platforms": {"qqbot": {"app_id": qq.app_id, "client_secret": qq.client_secret,
                                "api_base": qq.http_base, "token_url": qq.token_url,
                                "dm_policy": "pairing", "admins": ["boss"]}}})
    gw = Process([sys.executable, BIN, "--config", str(cfg)])
    try:
        qq.wait_for(lambda: session_up(qq), timeout=30)
        boss = qq.send_user_message("hi", openid="boss")  # admins are known: answered
        qq.wait_for(lambda: qq_answers(qq, boss), timeout=20)
        assert qq_answers(qq, boss) == ["echo: hi"]

        first = qq.send_user_message("hello?", openid="stranger")
        qq.wait_for(lambda: qq_answers(qq, first), timeout=20)
        notice = qq_answers(qq, first)[0]
        code = notice.split("pairing code is ")[1].split(" ")[0]
        assert f"`hermes-green pairing approve {code}`" in notice
        second = qq.send_user_message("anyone?", openid="stranger")  # one code, not two
        probe = qq.send_user_message("still there?", openid="boss")
        qq.wait_for(lambda: qq_answers(qq, probe), timeout=20)

        listed = run_cli("pairing", "list", "--config", str(cfg))
        assert listed.returncode == 0, listed.stderr
        assert listed.stdout.startswith(f"pending   qqbot  user=stranger  code={code}  expires in ")
        approved = run_cli("pairing", "approve", code.lower(), "--config", str(cfg))
        assert (approved.returncode, approved.stdout) == (
            0, "approved: stranger may now talk to qqbot\n")
        reused = run_cli("pairing", "approve", code, "--config", str(cfg))
        assert reused.returncode == 1 and reused.stderr == (
            "hermes-green: no pending pairing has that code (see `hermes-green pairing list`)\n")

        third = qq.send_user_message("are we friends now?", openid="stranger")
        qq.wait_for(lambda: qq_answers(qq, third), timeout=20)
        assert qq_answers(qq, third) == ["echo: are we friends now?"]
        assert qq_answers(qq, second) == []
        listed = run_cli("pairing", "list", "--config", str(cfg))
        assert listed.stdout == "approved  qqbot  user=stranger\n"

        revoked = run_cli("pairing", "revoke", "stranger", "--config", str(cfg))
        assert (revoked.returncode, revoked.stdout) == (0, "revoked: stranger (1 bot)\n")
        fourth = qq.send_user_message("and now?", openid="stranger")
        qq.wait_for(lambda: qq_answers(qq, fourth), timeout=20)
        assert "pairing code is" in qq_answers(qq, fourth)[0]
        assert code not in qq_answers(qq, fourth)[0]
        nobody = run_cli("pairing", "revoke", "nobody", "--config", str(cfg))
        assert nobody.returncode == 1 and nobody.stderr == "hermes-green: nobody is not paired\n"
    finally:
        stderr = stop(gw) if gw.proc.poll() is None else gw.stderr
    assert code not in stderr  # the code is the user's to tell, never logged


def test_pairing_on_a_data_dir_without_a_database_says_so(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", {"gateway": {"data_dir": str(tmp_path / "none")}})
    result = run_cli("pairing", "list", "--config", str(cfg))
    assert result.returncode == 2
    assert result.stderr.startswith("hermes-green: ") and "no database yet" in result.stderr
    assert not (tmp_path / "none" / "hermes-green.sqlite3").exists()


# -- reload ----------------------------------------------------------------------------------------

@pytest.fixture
def fleet():
    f = FakeFleet(platforms=("wecom", "qqbot"), keepalive=Keepalive(interval_s=0.5,
                                                                    deadline_s=2.0),
                  llm_chunk_delay_s=0.005).start()
    yield f
    f.stop()


def start_fleet_gateway(tmp_path, fleet):
    data = {"gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False}},
            "agent": fleet.agent_config(tools=[]),
            "platforms": fleet.platforms_config(backoff={"initial_s": 0.05, "max_s": 0.5})}
    cfg = write_config(tmp_path / "config.yaml", data)
    gw = Process([sys.executable, BIN, "--config", str(cfg)])
    qq, wecom = fleet.fakes["qqbot"], fleet.fakes["wecom"]
    fleet.wait_for(lambda: session_up(qq) and wecom.subscribed_at, timeout=30)
    return gw, cfg, data


def test_reload_restarts_only_the_changed_bot_and_running_turns_finish(tmp_path, fleet):
    gw, cfg, data = start_fleet_gateway(tmp_path, fleet)
    qq, wecom = fleet.fakes["qqbot"], fleet.fakes["wecom"]
    try:
        conns = {"wecom": len(wecom.conns), "qqbot": len(qq.conns)}
        # turns still streaming while the reload happens, on the kept bot and on the restarted
        slowly = "slowly " * 150  # 150 chunks, 20 ms apart: still streaming after the reload
        fleet.llm.script(text(slowly, chunk_chars=7, delay_s=0.02),
                         text(slowly, chunk_chars=7, delay_s=0.02))
        slow = fleet.send("wecom", "tell me slowly")
        slow_qq = fleet.send("qqbot", "you too, slowly")
        assert fleet.llm.wait_for_chat_requests(2, timeout=10) and fleet.llm.streaming.wait(10)
        data["platforms"]["qqbot"]["rate_limit"] = {"messages": 5}
        data["agent"]["model"] = "fake-model-2"
        write_config(cfg, data)
        result = run_cli("reload", "--config", str(cfg))
        assert result.returncode == 0, result.stderr
        assert result.stdout == ("reloaded: restarted=qqbot started=- stopped=- unchanged=wecom "
                                 "agent=new busy=unchanged\n")
        assert not fleet.answers("qqbot", slow_qq)  # (the turn outlived the reload)
        newest = max(qq.conns)
        fleet.wait_for(lambda: len(qq.conns) == conns["qqbot"] + 1 and session_up(qq, newest),
                       timeout=20)
        fleet.wait_for(lambda: fleet.answers("wecom", slow) and fleet.answers("qqbot", slow_qq),
                       timeout=20)
        assert "".join(fleet.answers("wecom", slow)).strip() == slowly.strip()
        assert fleet.answers("qqbot", slow_qq) == [slowly.strip()]  # after the bot's restart
        assert [r.body["model"] for r in fleet.llm.chat_requests] == ["fake-model"] * 2
        # the next turn is served by the new agent settings, on the restarted bot
        after = fleet.send("qqbot", "hello after the reload")
        fleet.wait_for(lambda: fleet.answers("qqbot", after), timeout=20)
        assert fleet.llm.chat_requests[-1].body["model"] == "fake-model-2"
        # WeCom never noticed: same connection, no disconnect
        assert len(wecom.conns) == conns["wecom"] and fleet.disconnects("wecom") == []
        unchanged = run_cli("reload", "--config", str(cfg))
        assert unchanged.stdout == ("reloaded: restarted=- started=- stopped=- "
                                    "unchanged=qqbot,wecom agent=unchanged busy=unchanged\n")
        assert (len(wecom.conns), len(qq.conns)) == (conns["wecom"], conns["qqbot"] + 1)
    finally:
        stderr = stop(gw)
    assert "config reloaded restarted=qqbot" in stderr


def test_a_broken_config_changes_nothing(tmp_path, fleet):
    gw, cfg, data = start_fleet_gateway(tmp_path, fleet)
    qq, wecom = fleet.fakes["qqbot"], fleet.fakes["wecom"]
    try:
        conns = (len(wecom.conns), len(qq.conns))
        good = cfg.read_text()
        cfg.write_text(good + "platforms: [\n")
        refused = run_cli("reload", "--config", str(cfg))  # validated before any signal
        assert refused.returncode == 2 and refused.stderr.count("\n") == 1
        assert refused.stderr.startswith(f"hermes-green: {cfg}: invalid YAML at line ")
        assert last_reload(tmp_path / "data") is None  # the gateway was never asked
        # the same file by SIGHUP: the gateway refuses it with one line and keeps running
        bad = dict(data, platforms={**data["platforms"],
                                    "qqbot": {**data["platforms"]["qqbot"], "dm_policy": "closed"}})
        cfg.write_text(yaml.safe_dump(bad))
        gw.signal(signal.SIGHUP)
        outcome = wait_until(lambda: last_reload(tmp_path / "data"), timeout=20)
        assert outcome["ok"] is False and outcome["detail"] == (
            "platforms.qqbot.dm_policy: input should be 'open', 'allowlist' or 'pairing'")
        mid = fleet.send("qqbot", "still answering?")
        fleet.wait_for(lambda: fleet.answers("qqbot", mid), timeout=20)
        assert (len(wecom.conns), len(qq.conns)) == conns
        assert fleet.disconnects("wecom") == [] and fleet.disconnects("qqbot") == []
        # a data_dir cannot move under a running gateway
        moved = dict(data, gateway={**data["gateway"], "data_dir": str(tmp_path / "elsewhere")})
        cfg.write_text(yaml.safe_dump(moved))
        gw.signal(signal.SIGHUP)
        wait_until(lambda: last_reload(tmp_path / "data")["detail"] != outcome["detail"],
                   timeout=20)
        assert last_reload(tmp_path / "data")["detail"].startswith(
            "gateway.data_dir cannot change while the gateway runs")
        assert (len(wecom.conns), len(qq.conns)) == conns
    finally:
        stderr = stop(gw)
    refusals = [line for line in stderr.splitlines() if "reload refused" in line]
    assert len(refusals) == 2 and "dm_policy" in refusals[0]
    assert not (tmp_path / "data" / "hermes-green.pid").exists()  # removed at exit


def test_reload_without_a_running_gateway_says_so(tmp_path):
    data_dir = tmp_path / "data"
    from hermes_green.store import Store
    Store(data_dir).open().close()
    cfg = write_config(tmp_path / "c.yaml", {"gateway": {"data_dir": str(data_dir)}})
    result = run_cli("reload", "--config", str(cfg))
    assert result.returncode == 1
    assert result.stderr == (f"hermes-green: no gateway is running on {data_dir} "
                             f"(no hermes-green.pid there)\n")
    (data_dir / "hermes-green.pid").write_text('{"pid": 1, "started": 0}')  # stale: pid reused
    result = run_cli("reload", "--config", str(cfg))
    assert result.returncode == 1 and "stale hermes-green.pid, pid 1" in result.stderr
