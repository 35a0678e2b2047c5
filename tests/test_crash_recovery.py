"""Delivery guarantees of a real gateway process on a real SQLite file.

kill -9 mid-turn: the restarted gateway answers the message exactly once; a redelivered copy is
recognized and not answered. SIGTERM mid-turn: the turn finishes, its reply is sent, exit 0.
"""
import signal

import pytest

from tests.fakes.fake_testchat import FakeTestChat
from tests.support import Process, base_config, write_config

LAUNCHER = "tests/fakes/gateway_process.py"


@pytest.fixture
def fake():
    f = FakeTestChat().start()
    yield f
    f.stop()


def start_gateway(config_path, fake, delay: float) -> Process:
    import sys
    p = Process([sys.executable, LAUNCHER, str(config_path), fake.ws_url, str(delay)])
    p.wait_line("GATEWAY_STARTED")
    return p


def test_sigkill_mid_turn_then_restart_answers_once(tmp_path, fake):
    cfg = write_config(tmp_path / "c.yaml", base_config(tmp_path / "data"))
    gw = start_gateway(cfg, fake, delay=30.0)  # the turn would take 30 s: we kill it first
    try:
        mid = fake.send_user_message("question one")
        gw.wait_line("TURN_STARTED question one")
        assert mid in fake.acked  # journaled and acknowledged before the turn began
    finally:
        gw.kill()
    assert fake.replies_to(mid) == []

    gw2 = start_gateway(cfg, fake, delay=0.0)
    try:
        fake.wait_for(lambda: fake.replies_to(mid), timeout=20)
        # The platform redelivers the same message (as Feishu does): recognized, not answered.
        fake.redeliver(mid)
        later = fake.send_user_message("question two")
        fake.wait_for(lambda: fake.replies_to(later), timeout=20)
        # same chat, FIFO: a reply to the duplicate would have been sent before this one
        assert [r["text"] for r in fake.replies_to(mid)] == ["echo: question one"]
        assert [r["text"] for r in fake.replies_to(later)] == ["echo: question two"]
    finally:
        gw2.signal(signal.SIGTERM)
        assert gw2.wait() == 0


def test_sigkill_after_answer_stored_never_recomputes(tmp_path, fake):
    """kill -9 after the reply was stored but before the platform had it: the stored reply is
    sent on restart and the turn is not run again (no second, different answer)."""
    cfg = write_config(tmp_path / "c.yaml", base_config(tmp_path / "data"))
    gw = start_gateway(cfg, fake, delay=0.0)
    fake.accept_replies = False  # the reply is sent but never accepted: it stays in the outbox
    mid = fake.send_user_message("hold this")
    try:
        gw.wait_line("TURN_STARTED hold this")
        fake.wait_for(lambda: fake.unaccepted, timeout=20)
    finally:
        gw.kill()
    fake.accept_replies = True
    gw2 = start_gateway(cfg, fake, delay=0.0)
    try:
        fake.wait_for(lambda: fake.replies_to(mid), timeout=20)
        assert [r["text"] for r in fake.replies_to(mid)] == ["echo: hold this"]
        assert not any(line.startswith("TURN_STARTED") for line in gw2.lines)
    finally:
        gw2.signal(signal.SIGTERM)
        assert gw2.wait() == 0


def test_sigterm_lets_the_running_turn_finish(tmp_path, fake):
    cfg = write_config(tmp_path / "c.yaml", base_config(tmp_path / "data", drain_timeout_s=20))
    gw = start_gateway(cfg, fake, delay=1.0)
    mid = fake.send_user_message("finish me")
    gw.wait_line("TURN_STARTED finish me")
    gw.signal(signal.SIGTERM)
    code = gw.wait(timeout=30)
    assert code == 0, gw.stderr[-2000:]
    assert [r["text"] for r in fake.replies_to(mid)] == ["echo: finish me"]
    assert "gateway stopped" in gw.stderr
