"""QQ accepts a passive reply (with msg_id) only within a window after the user's message (60 min
in C2C, 5 min in groups). A turn that runs past it must not end silently in the dead outbox: the
answer goes out proactively, and when QQ refuses that too (monthly quota) the gateway says so in
a log line, a metric and /healthz. The fake enforces both the window and the quota; the windows
here are shrunk to a fraction of a second so the turn can outlive them without a long wait."""
import logging

import pytest

from hermes_green import metrics
from hermes_green.config import Config
from hermes_green.gateway import Gateway
from hermes_green.status import health
from hermes_green.testing.fake_qqbot import FakeQQBotServer
from tests.support import GateAgent, wait_until

WINDOW_S = 0.4


@pytest.fixture
def fake():
    f = FakeQQBotServer(reply_window_group_s=WINDOW_S, reply_window_dm_s=WINDOW_S,
                        heartbeat_interval_ms=500).start()
    yield f
    f.stop()


def start(tmp_path, fake, agent) -> Gateway:
    config = Config.model_validate({
        "gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False}},
        "platforms": {"qqbot": {"app_id": fake.app_id, "client_secret": fake.client_secret,
                                "api_base": fake.http_base, "token_url": fake.token_url,
                                "passive_window_c2c_s": WINDOW_S,
                                "passive_window_group_s": WINDOW_S}}})
    gw = Gateway(config, agent=agent).start()
    wait_until(lambda: "qqbot" in gw.adapters and gw.adapters["qqbot"].ready.is_set(),
               what="qqbot ready")
    return gw


def outlive_the_window(fake, agent, kind: str) -> str:
    gate = agent.hold("slow question")
    mid = fake.send_user_message("slow question", kind=kind)
    wait_until(lambda: agent.turns, what="turn started")
    # the fake's own clock says the window is over (no fixed sleep: wait on the condition)
    wait_until(lambda: fake.reply_window_s[kind] < _age(fake, mid), timeout=5,
               what="passive window passed")
    gate.set()
    return mid


def _age(fake, mid: str) -> float:
    import time
    return time.monotonic() - fake.user_messages[mid].at


@pytest.mark.parametrize("kind", ["c2c", "group"])
def test_an_answer_after_the_passive_window_goes_out_proactively(tmp_path, fake, kind):
    agent = GateAgent()
    gw = start(tmp_path, fake, agent)
    try:
        mid = outlive_the_window(fake, agent, kind)
        wait_until(lambda: [r for r in fake.replies if r.msg_id == mid], timeout=10,
                   what="the late answer arrived")
        [reply] = [r for r in fake.replies if r.msg_id == mid]
        assert reply.proactive and reply.content == "answer: slow question"
        assert fake.rejected == []  # never tried passively past the window
        wait_until(lambda: gw.store.outbox_pending() == 0, what="outbox empty")
        assert gw.store.outbox_dead_count() == 0
    finally:
        gw.shutdown()


def test_a_refused_proactive_answer_is_reported_not_buried(tmp_path, fake, caplog):
    fake.proactive_quota = 0  # this month's proactive messages are used up
    agent = GateAgent()
    gw = start(tmp_path, fake, agent)
    counter = metrics.undeliverable_total.labels("qqbot", "qqbot")
    before = counter._value.get()
    try:
        with caplog.at_level(logging.ERROR, logger="hermes_green.gateway"):
            outlive_the_window(fake, agent, "group")
            wait_until(lambda: gw.store.outbox_dead_count() == 1, timeout=10,
                       what="the reply given up")
        assert [r.code for r in fake.rejected] == [40034029]  # the proactive refusal, once
        assert counter._value.get() == before + 1
        lines = [r.getMessage() for r in caplog.records if "reply undeliverable" in r.getMessage()]
        assert len(lines) == 1 and "passive window" in lines[0]
        doc = health(gw)
        assert doc["undeliverable_replies"] == 1
        assert doc["platforms"]["qqbot"]["undeliverable"] == 1
    finally:
        gw.shutdown()


def test_within_the_window_the_reply_stays_passive(tmp_path):
    fake = FakeQQBotServer(heartbeat_interval_ms=500).start()  # the real 5 / 60 min windows
    gw = start_with_real_windows(tmp_path, fake)
    try:
        mid = fake.send_user_message("quick question", kind="group")
        wait_until(lambda: [r for r in fake.replies if r.msg_id == mid], what="answered")
        [reply] = [r for r in fake.replies if r.msg_id == mid]
        assert not reply.proactive and reply.msg_seq == 1
        assert fake.proactive_sent == {}
    finally:
        gw.shutdown()
        fake.stop()


def start_with_real_windows(tmp_path, fake) -> Gateway:
    config = Config.model_validate({
        "gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False}},
        "platforms": {"qqbot": {"app_id": fake.app_id, "client_secret": fake.client_secret,
                                "api_base": fake.http_base, "token_url": fake.token_url}}})
    gw = Gateway(config, agent=GateAgent()).start()
    wait_until(lambda: "qqbot" in gw.adapters and gw.adapters["qqbot"].ready.is_set(),
               what="qqbot ready")
    return gw
