"""A platform that refuses us for good (bad credentials, banned bot) is stopped and reported;
the other platforms stay connected and keep answering."""
import pytest

from hermes_green.config import Config
from hermes_green.gateway import Gateway
from hermes_green.platforms.base import State
from hermes_green.testing.fleet import FakeFleet
from tests.support import wait_until


@pytest.fixture
def fleet():
    # the three WebSocket platforms, whose fakes count connections (conns)
    f = FakeFleet(("wecom", "feishu", "qqbot"), llm_chunk_delay_s=0.001).start()
    yield f
    f.stop()


def start(tmp_path, fleet, **overrides) -> Gateway:
    platforms = fleet.platforms_config(backoff={"initial_s": 0.05, "max_s": 0.3})
    for name, over in overrides.items():
        platforms[name].update(over)
    config = Config.model_validate({
        "gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False}},
        "agent": fleet.agent_config(), "platforms": platforms})
    return Gateway(config).start()


def all_connected(gw: Gateway) -> None:
    wait_until(lambda: len(gw.adapters) == 3
               and all(a.ready.is_set() for a in gw.adapters.values()), timeout=20,
               what="three platforms connected")


def serving(gw: Gateway, fleet: FakeFleet, platforms) -> None:
    for p in platforms:
        mid = fleet.send(p, "are you there?")
        fleet.wait_for(lambda: fleet.answers(p, mid), timeout=20)


def test_bad_qq_credentials_leave_wecom_and_feishu_serving(tmp_path, fleet):
    gw = start(tmp_path, fleet, qqbot={"client_secret": "not-the-secret"})
    try:
        wait_until(lambda: "qqbot" in gw.fatal, timeout=20, what="qqbot reported fatal")
        assert gw.adapters["qqbot"].stats.state is State.FATAL
        assert "not-the-secret" not in gw.fatal["qqbot"]
        wait_until(lambda: all(gw.adapters[p].ready.is_set() for p in ("wecom", "feishu")),
                   timeout=20, what="wecom and feishu connected")
        serving(gw, fleet, ("wecom", "feishu"))
        qq = fleet.fakes["qqbot"]
        assert qq.token_requests == 1  # refused once, never retried in a loop
        assert qq.conns == {}  # no WebSocket was even opened
        for p in ("wecom", "feishu"):
            assert fleet.disconnects(p) == [] and len(fleet.fakes[p].conns) == 1
    finally:
        gw.shutdown()


FATAL_WHILE_CONNECTED = {
    # a 4915 close (bot banned): QQ stops and does not reconnect
    "qqbot_banned": ("qqbot", lambda fake: fake.close_with(4915, "bot banned")),
    # another instance subscribed for the WeCom bot: ours does not fight for it
    "wecom_taken_over": ("wecom", lambda fake: fake.kick()),
}


@pytest.mark.parametrize("case", sorted(FATAL_WHILE_CONNECTED))
def test_fatal_while_connected_stops_that_platform_only(tmp_path, fleet, case):
    victim, fault = FATAL_WHILE_CONNECTED[case]
    others = [p for p in fleet.platforms if p != victim]
    gw = start(tmp_path, fleet)
    try:
        all_connected(gw)
        fault(fleet.fakes[victim])
        wait_until(lambda: victim in gw.fatal, timeout=20, what=f"{victim} reported fatal")
        serving(gw, fleet, others)
        assert len(fleet.fakes[victim].conns) == 1  # no reconnect after a fatal refusal
        for p in others:
            assert len(fleet.fakes[p].conns) == 1
    finally:
        gw.shutdown()
