"""One turn at a time per chat, and each busy mode's order of replies, through a real gateway
on the test platform."""
import pytest

from hermes_green.gateway import INTERRUPTED_REPLY
from tests.fakes.fake_testchat import FakeTestChat
from tests.support import GateAgent, start_inprocess_gateway, wait_until


@pytest.fixture
def fake():
    f = FakeTestChat().start()
    yield f
    f.stop()


@pytest.fixture
def agent():
    return GateAgent()


def run(tmp_path, fake, agent, mode):
    return start_inprocess_gateway(tmp_path, fake, agent, busy_mode=mode)


def texts(fake, chat="c1"):
    return [r["text"] for r in fake.replies if r["chat"] == chat]


def test_queue_mode_answers_in_order(tmp_path, fake, agent):
    gw = run(tmp_path, fake, agent, "queue")
    try:
        gate = agent.hold("one")
        fake.send_user_message("one")
        wait_until(lambda: agent.turns == ["one"])
        fake.send_user_message("two")
        fake.send_user_message("three")
        other = fake.send_user_message("elsewhere", chat="c2")  # other chats are not blocked
        fake.wait_for(lambda: fake.replies_to(other))
        assert agent.turns == ["one", "elsewhere"]
        gate.set()
        fake.wait_for(lambda: len(texts(fake)) == 3)
        assert texts(fake) == ["answer: one", "answer: two", "answer: three"]
        assert agent.turns == ["one", "elsewhere", "two", "three"]
    finally:
        gw.shutdown()


def test_interrupt_mode_cancels_and_tells_the_user(tmp_path, fake, agent):
    gw = run(tmp_path, fake, agent, "interrupt")
    try:
        agent.hold("slow question")
        first = fake.send_user_message("slow question")
        wait_until(lambda: agent.turns == ["slow question"])
        second = fake.send_user_message("never mind, this")
        fake.wait_for(lambda: fake.replies_to(second))
        assert agent.cancelled == ["slow question"]
        assert [r["text"] for r in fake.replies_to(first)] == [INTERRUPTED_REPLY]
        assert [r["text"] for r in fake.replies_to(second)] == ["answer: never mind, this"]
        assert texts(fake) == [INTERRUPTED_REPLY, "answer: never mind, this"]
        assert gw.store.inbound_state("testchat", first) == "answered"
    finally:
        gw.shutdown()


def test_merge_mode_joins_messages_sent_while_busy(tmp_path, fake, agent):
    gw = run(tmp_path, fake, agent, "merge")
    try:
        gate = agent.hold("first")
        fake.send_user_message("first")
        wait_until(lambda: agent.turns == ["first"])
        a = fake.send_user_message("and also")
        b = fake.send_user_message("one more thing")
        wait_until(lambda: gw.store.inbound_state("testchat", b) == "received")
        gate.set()
        fake.wait_for(lambda: len(texts(fake)) == 2)
        assert agent.turns == ["first", "and also\none more thing"]
        assert texts(fake) == ["answer: first", "answer: and also\none more thing"]
        assert [r["reply_to"] for r in fake.replies][1] == b  # answers the latest message
        assert gw.store.inbound_state("testchat", a) == "answered"
    finally:
        gw.shutdown()


def test_history_is_passed_to_the_next_turn(tmp_path, fake):
    seen = []

    class HistoryAgent:
        def run_turn(self, turn):
            seen.append(list(turn.history))
            return f"re: {turn.text}"

        def close(self):
            pass

    gw = run(tmp_path, fake, HistoryAgent(), "queue")
    try:
        fake.send_user_message("hello")
        fake.wait_for(lambda: len(fake.replies) == 1)
        fake.send_user_message("again")
        fake.wait_for(lambda: len(fake.replies) == 2)
        assert seen[0] == []
        assert seen[1] == [{"role": "user", "content": "hello"},
                           {"role": "assistant", "content": "re: hello"}]
    finally:
        gw.shutdown()
