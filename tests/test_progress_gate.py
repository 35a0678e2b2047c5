"""Progress waits until a turn has run `gateway.progress_after_s`: a fast answer is one plain
reply (no stream, card, typing or edit), a slow one shows what the agent said so far at that
moment, and nothing is shown once the turn is over."""
import time

import gevent
import pytest

from hermes_green.config import Config
from hermes_green.gateway import Gateway
from hermes_green.progress import ProgressGate
from hermes_green.testing.fake_feishu import FakeFeishuServer
from hermes_green.testing.fake_llm import FakeLLM, text
from tests.support import wait_until


class Shown:
    def __init__(self) -> None:
        self.texts: list[tuple[float, str]] = []
        self.event = gevent.event.Event()

    def __call__(self, text_so_far: str) -> None:
        self.texts.append((time.monotonic(), text_so_far))
        self.event.set()


def spawn(fn):
    return gevent.spawn(fn)


def test_text_reported_early_is_shown_once_the_turn_has_run_after_s_then_updates_pass():
    shown = Shown()
    started = time.monotonic()
    gate = ProgressGate(shown, 0.2, spawn=spawn)
    gate("thinking")
    gate("thinking about")  # the newest text is the one shown when the time comes
    assert shown.texts == []
    assert shown.event.wait(10)
    [(at, first)] = shown.texts
    assert first == "thinking about" and at - started >= 0.2
    gate("thinking about tides")  # past the wait: straight through
    assert [t for _, t in shown.texts] == ["thinking about", "thinking about tides"]
    gate.close()
    gate("after the end")
    assert len(shown.texts) == 2


def test_a_turn_over_before_after_s_shows_nothing():
    shown = Shown()
    gate = ProgressGate(shown, 0.05, spawn=spawn)
    gate("almost done")
    gate.close()
    # the timer would have fired by now; a negative check needs a bounded window
    assert not shown.event.wait(0.3)
    assert shown.texts == []


def test_zero_shows_every_update_at_once():
    shown = Shown()
    gate = ProgressGate(shown, 0, spawn=spawn)
    gate("a")
    gate("ab")
    assert [t for _, t in shown.texts] == ["a", "ab"]


def test_an_adapter_failing_to_show_progress_does_not_reach_the_turn():
    def broken(_text):
        raise ConnectionError("gone")
    gate = ProgressGate(broken, 0, spawn=spawn)
    gate("a")  # logged at DEBUG, not raised


# -- through a real gateway on the Feishu fake --------------------------------------------------
@pytest.fixture
def feishu():
    f = FakeFeishuServer(ping_interval_s=1.0).start()
    yield f
    f.stop()


@pytest.fixture
def llm():
    f = FakeLLM(api_key="sk-gate").start()
    yield f
    f.stop()


@pytest.fixture
def gateway(tmp_path, feishu, llm):
    config = Config.model_validate({
        "gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False},
                    "progress_after_s": 0.3},
        "agent": {"base_url": llm.base_url, "api_key": "sk-gate", "model": "m", "tools": []},
        "platforms": {"feishu": {"app_id": feishu.app_id, "app_secret": feishu.app_secret,
                                 "domain": feishu.http_base, "card_update_interval_s": 0.1}}})
    gw = Gateway(config).start()
    wait_until(lambda: "feishu" in gw.adapters and gw.adapters["feishu"].ready.is_set(),
               what="feishu ready")
    yield gw
    gw.shutdown()


def test_a_fast_answer_is_one_plain_reply_and_a_slow_one_streams_a_card(gateway, feishu, llm):
    llm.script(text("It is the moon.", chunk_chars=5, delay_s=0.001))
    om = feishu.send_user_message("why are there tides?")
    feishu.wait_for(lambda: feishu.replies_to(om), timeout=30)
    assert gateway.wait_idle(30)
    assert [(r.text, r.card_id) for r in feishu.replies_to(om)] == [("It is the moon.", None)]
    assert not [c for c in feishu.rest_calls if "cardkit" in c["path"]]

    slow = "The tide follows the moon, and the sun helps a little. " * 3
    llm.script(text(slow.strip(), chunk_chars=8, delay_s=0.04))  # about a second
    om2 = feishu.send_user_message("tell me more")
    feishu.wait_for(lambda: feishu.replies_to(om2), timeout=30)
    assert gateway.wait_idle(30)
    [card] = feishu.cards.values()
    contents = [op for op in card.ops if op[0] == "content"]
    assert len(contents) >= 2 and contents[-1][2] == slow.strip()
    assert [r.card_id for r in feishu.replies_to(om2)] == [card.card_id]
