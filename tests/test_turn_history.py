"""A turn reads the chat's history from the store only for an agent that uses it (the LLM
loop); the echo agent and a remote agent service (which keeps its own transcript) never do,
and their turns cost one query less."""
import pytest

from hermes_green.agent.base import EchoAgent
from hermes_green.agent.service import ServiceAgent
from tests.fakes.fake_testchat import FakeTestChat
from tests.support import GateAgent, start_inprocess_gateway


@pytest.fixture
def fake():
    f = FakeTestChat().start()
    yield f
    f.stop()


class _EchoWatchingHistory(EchoAgent):
    def __init__(self) -> None:
        self.histories = []

    def run_turn(self, turn) -> str:
        self.histories.append(turn.history)
        return super().run_turn(turn)


def _history_reads(tmp_path, fake, agent, monkeypatch) -> int:
    from hermes_green.store import Store
    reads = []
    original = Store.history
    monkeypatch.setattr(Store, "history", lambda self, *a, **k: reads.append(a) or
                        original(self, *a, **k))
    gw = start_inprocess_gateway(tmp_path, fake, agent)
    try:
        first, second = fake.send_user_message("one"), None
        fake.wait_for(lambda: fake.replies_to(first))
        second = fake.send_user_message("two")
        fake.wait_for(lambda: fake.replies_to(second))
    finally:
        gw.shutdown()
    return len(reads)


def test_the_echo_agent_turn_reads_no_history(tmp_path, fake, monkeypatch):
    agent = _EchoWatchingHistory()
    assert _history_reads(tmp_path, fake, agent, monkeypatch) == 0
    assert agent.histories == [[], []]


def test_an_agent_that_uses_history_gets_it_read(tmp_path, fake, monkeypatch):
    agent = GateAgent()  # no uses_history attribute: read, as before
    assert _history_reads(tmp_path, fake, agent, monkeypatch) == 2


def test_the_service_agent_declares_it_keeps_its_own_history():
    assert ServiceAgent.uses_history is False and EchoAgent.uses_history is False
