"""The kit's one inbound policy and the gateway's ownership rules, each against a defect of the
first release: a WeCom message whose journaling failed was lost ("frame skipped"), Feishu counted
its sends twice, one SQLite error in the outbox loop ended a platform's replies until a restart."""
import sqlite3

import pytest

from hermes_green import metrics
from hermes_green.config import Config
from hermes_green.gateway import Gateway
from hermes_green.testing.fleet import FakeFleet
from tests.support import GateAgent, wait_until


class Flaky:
    """Wraps one store method: the next `times` calls raise sqlite3.OperationalError."""

    def __init__(self, store, name: str, times: int = 1) -> None:
        self.store, self.name, self.left = store, name, times
        self.real = getattr(store, name)
        self.failed = 0
        setattr(store, name, self)

    def __call__(self, *args, **kw):
        if self.left > 0:
            self.left -= 1
            self.failed += 1
            raise sqlite3.OperationalError("disk I/O error")
        return self.real(*args, **kw)


@pytest.fixture
def fleet():
    f = FakeFleet(("wecom", "feishu", "qqbot"), llm_chunk_delay_s=0.0).start()
    yield f
    f.stop()


def start(tmp_path, fleet, agent=None) -> Gateway:
    config = Config.model_validate({
        "gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False}},
        "platforms": fleet.platforms_config(backoff={"initial_s": 0.05, "max_s": 0.3})})
    gw = Gateway(config, agent=agent or GateAgent()).start()
    wait_until(lambda: len(gw.adapters) == len(fleet.platforms)
               and all(a.ready.is_set() for a in gw.adapters.values()), timeout=20,
               what="every platform connected")
    return gw


@pytest.mark.parametrize("platform, policy", [("wecom", "hold"), ("feishu", "redeliver"),
                                              ("qqbot", "replay")])
def test_a_message_the_store_could_not_journal_is_answered_once(tmp_path, fleet, platform,
                                                                 policy):
    gw = start(tmp_path, fleet)
    failures = metrics.inbound_journal_failures.labels(platform, platform, policy)
    before = failures._value.get()
    try:
        flaky = Flaky(gw.store, "journal_inbound", times=2)
        mid = fleet.send(platform, "this one hits a failing disk")
        fleet.wait_for(lambda: fleet.answers(platform, mid), timeout=20,
                       what=lambda: fleet.summary(platform))
        assert flaky.failed == 2
        assert failures._value.get() >= before + 1
        later = fleet.send(platform, "and this one after it")
        fleet.wait_for(lambda: fleet.answers(platform, later), timeout=20)
        assert fleet.answers(platform, mid) == ["answer: this one hits a failing disk"]
        assert gw.adapters[platform].stats.held == 0
    finally:
        gw.shutdown()


def test_each_reply_is_counted_once(tmp_path, fleet):
    gw = start(tmp_path, fleet)
    try:
        for p in fleet.platforms:
            mid = fleet.send(p, "count me")
            fleet.wait_for(lambda: fleet.answers(p, mid), timeout=20)
        wait_until(lambda: gw.store.outbox_pending() == 0, what="outbox empty")
        for p in fleet.platforms:
            assert gw.adapters[p].stats.messages_out == fleet.reply_count(p) == 1, p
    finally:
        gw.shutdown()


def test_the_outbox_survives_a_store_error_and_sends_on(tmp_path, fleet):
    gw = start(tmp_path, fleet)
    try:
        flaky = Flaky(gw.store, "outbox_due", times=3)
        mid = fleet.send("qqbot", "answer me despite the hiccup")
        fleet.wait_for(lambda: fleet.answers("qqbot", mid), timeout=20)
        assert flaky.failed == 3
        mid2 = fleet.send("qqbot", "and me too")
        fleet.wait_for(lambda: fleet.answers("qqbot", mid2), timeout=20)
    finally:
        gw.shutdown()
