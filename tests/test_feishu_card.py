"""Feishu progress as a CardKit streaming card, through a real gateway in process: the card is
created and sent once, its text grows with strictly increasing sequences, and the outbox's first
part finishes it with the exact final text and closes streaming mode -- no second message."""
import pytest

from hermes_green.testing.fake_feishu import FakeFeishuServer
from hermes_green.testing.fake_llm import FakeLLM, text
from tests.support import start_feishu_llm_gateway

ANSWER = ("The tide comes in twice a day because the moon pulls the oceans towards it, and the "
          "earth turns beneath that bulge. " * 4).strip()


@pytest.fixture
def llm():
    f = FakeLLM(api_key="sk-card", chunk_delay_s=0.02).start()
    yield f
    f.stop()


@pytest.fixture
def feishu():
    f = FakeFeishuServer(ping_interval_s=1.0).start()
    yield f
    f.stop()


@pytest.fixture
def gateway(tmp_path, llm, feishu):
    # progress shown from the first update: these tests are about the card itself
    gw = start_feishu_llm_gateway(tmp_path, feishu, llm, api_key="sk-card", progress_after_s=0)
    yield gw
    gw.shutdown()


def test_streaming_card_grows_with_increasing_sequence_and_ends_with_the_exact_answer(
        gateway, llm, feishu):
    llm.script(text(ANSWER, chunk_chars=6, delay_s=0.02))  # ~1.5 s of streaming
    om = feishu.send_user_message("why are there tides?")
    feishu.wait_for(lambda: feishu.replies_to(om), timeout=30)
    assert gateway.wait_idle(30)
    [card] = feishu.cards.values()
    contents = [op for op in card.ops if op[0] == "content"]
    sequences = [op[1] for op in card.ops]
    assert len(contents) >= 3, card.ops  # it streamed, not just the final text
    assert sequences == sorted(sequences) and len(set(sequences)) == len(sequences)
    assert contents[-1][2] == ANSWER  # the exact final text ...
    assert card.ops[-1][0] == "settings" and card.ops[-1][2]["streaming_mode"] is False
    assert card.text("answer") == ANSWER and card.streaming is False
    # ... shown once: the card is the only reply to the message
    [reply] = feishu.replies_to(om)
    assert reply.card_id == card.card_id and reply.text == ANSWER
    assert all(len(c[2]) <= len(ANSWER) and ANSWER.startswith(c[2][:20]) for c in contents)


def test_without_the_card_permission_the_answer_comes_as_one_plain_reply(gateway, llm, feishu):
    feishu.cards_refused = True
    llm.script(text(ANSWER, chunk_chars=12, delay_s=0.01))
    om = feishu.send_user_message("why are there tides?")
    feishu.wait_for(lambda: feishu.replies_to(om), timeout=30)
    assert gateway.wait_idle(30)
    assert feishu.cards == {}
    assert [(r.text, r.card_id) for r in feishu.replies_to(om)] == [(ANSWER, None)]
    # and the next answer does not try again (one refusal turns cards off for this bot)
    calls = len([c for c in feishu.rest_calls if "cardkit" in c["path"]])
    om2 = feishu.send_user_message("and the moon?")
    feishu.wait_for(lambda: feishu.replies_to(om2), timeout=30)
    assert gateway.wait_idle(30)
    assert len([c for c in feishu.rest_calls if "cardkit" in c["path"]]) == calls


def test_with_progress_after_s_a_fast_answer_is_one_plain_reply_and_a_slow_one_a_card(
        tmp_path, feishu, llm):
    gateway = start_feishu_llm_gateway(tmp_path, feishu, llm, api_key="sk-card",
                                       progress_after_s=0.3)
    try:
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
    finally:
        gateway.shutdown()
