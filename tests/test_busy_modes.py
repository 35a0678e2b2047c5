"""A burst of five messages sent while a turn runs, in each busy mode, through a real gateway on
the test platform: the order of the replies, and every message answered or merged exactly once.
Then the debounce window and the per-chat queue cap."""
import pytest

from hermes_green import metrics
from hermes_green.agent.llm import LLMClient
from hermes_green.agent.loop import LLMAgent
from hermes_green.config import AgentConfig, ExecutorsConfig
from hermes_green.gateway import INTERRUPTED_REPLY
from hermes_green.testing.fake_llm import FakeLLM, text, tool_call
from tests.fakes import sample_tools
from tests.fakes.fake_testchat import FakeTestChat
from tests.support import GateAgent, start_inprocess_gateway, wait_until

BURST = [f"m{i}" for i in range(1, 6)]
JOINED = "\n".join(BURST)


@pytest.fixture
def fake():
    f = FakeTestChat().start()
    yield f
    f.stop()


@pytest.fixture
def gateways():
    started = []
    yield started
    for gw in started:
        gw.shutdown()


def replies(fake):
    return [(r["reply_to"], r["text"]) for r in fake.replies]


def states(gw, ids):
    return [gw.store.inbound_state("testchat", m) for m in ids]


def burst_during_a_turn(tmp_path, fake, gateways, mode, **kw):
    """'first' runs (held); five messages arrive at once; then the turn may end."""
    agent = GateAgent()
    gw = start_inprocess_gateway(tmp_path, fake, agent, busy_mode=mode, **kw)
    gateways.append(gw)
    gate = agent.hold("first")
    first = fake.send_user_message("first")
    wait_until(lambda: agent.turns == ["first"])
    ids = [fake.send_user_message(t) for t in BURST]  # one write each, no pause between
    wait_until(lambda: None not in states(gw, ids), what="burst journaled")
    gate.set()
    return gw, agent, first, ids


def test_queue_answers_each_in_order(tmp_path, fake, gateways):
    gw, agent, first, ids = burst_during_a_turn(tmp_path, fake, gateways, "queue")
    fake.wait_for(lambda: len(fake.replies) == 6)
    assert replies(fake) == [(first, "answer: first")] + [
        (mid, f"answer: {t}") for mid, t in zip(ids, BURST)]
    assert agent.turns == ["first", *BURST]
    assert states(gw, [first, *ids]) == ["answered"] * 6


def test_interrupt_stops_the_turn_and_answers_only_the_newest(tmp_path, fake, gateways):
    gw, agent, first, ids = burst_during_a_turn(tmp_path, fake, gateways, "interrupt")
    fake.wait_for(lambda: len(fake.replies) == 3)
    # the running turn is told it stopped; m1..m4 were superseded before they started (one
    # notice, on the newest of them); m5 is answered
    assert replies(fake) == [(first, INTERRUPTED_REPLY), (ids[3], INTERRUPTED_REPLY),
                             (ids[4], "answer: m5")]
    assert agent.cancelled == ["first"] and agent.turns == ["first", "m5"]
    assert states(gw, [first, *ids]) == ["answered"] * 6


def test_merge_joins_the_burst_into_one_next_turn(tmp_path, fake, gateways):
    gw, agent, first, ids = burst_during_a_turn(tmp_path, fake, gateways, "merge")
    fake.wait_for(lambda: len(fake.replies) == 2)
    assert replies(fake) == [(first, "answer: first"), (ids[4], f"answer: {JOINED}")]
    assert agent.turns == ["first", JOINED]
    assert states(gw, [first, *ids]) == ["answered"] * 6


def test_steer_leaves_what_the_turn_never_took_for_one_next_turn(tmp_path, fake, gateways):
    # GateAgent has no tool rounds, so it never asks for follow-ups
    gw, agent, first, ids = burst_during_a_turn(tmp_path, fake, gateways, "steer")
    fake.wait_for(lambda: len(fake.replies) == 2)
    assert replies(fake) == [(first, "answer: first"), (ids[4], f"answer: {JOINED}")]
    assert agent.turns == ["first", JOINED]


def test_steer_gives_the_burst_to_the_running_turns_next_llm_call(tmp_path, fake, gateways):
    llm = FakeLLM(api_key="k", chunk_delay_s=0.001).start()
    try:
        sample_tools._GATE.clear()
        gate = sample_tools.gate()
        llm.script(tool_call("wait_at_gate"),
                   lambda body: text(f"final: {body['messages'][-1]['content']}"))
        section = {"base_url": llm.base_url, "api_key": "k", "model": "fake-model",
                   "tools": ["tests.fakes.sample_tools"], "max_retries": 0}
        cfg = AgentConfig(**section)
        agent = LLMAgent(cfg, ExecutorsConfig(threads=2, processes=1),
                         llm=LLMClient.from_config(cfg, read_timeout_s=10))
        gw = start_inprocess_gateway(tmp_path, fake, agent, busy_mode="steer",
                                     config={"agent": section})
        gateways.append(gw)
        first = fake.send_user_message("first")
        assert gate["entered"].wait(10)  # the turn is inside its tool round
        ids = [fake.send_user_message(t) for t in BURST]
        wait_until(lambda: None not in states(gw, ids), what="burst journaled")
        gate["release"].set()
        fake.wait_for(lambda: fake.replies)
        gw.wait_idle(10)
        # one answer, to the newest message, from the same turn's second model call
        assert replies(fake) == [(ids[4], f"final: {JOINED}")]
        assert len(llm.chat_requests) == 2
        second = llm.chat_requests[1].body["messages"]
        assert [m["role"] for m in second[-4:]] == ["user", "assistant", "tool", "user"]
        assert second[-4]["content"] == "first" and second[-1]["content"] == JOINED
        assert states(gw, [first, *ids]) == ["answered"] * 6
        assert gw.store.history("testchat", "c1", 10) == [
            {"role": "user", "content": f"first\n{JOINED}"},
            {"role": "assistant", "content": f"final: {JOINED}"}]
    finally:
        llm.stop()


# -- debounce ---------------------------------------------------------------------------------------

def test_debounce_joins_a_burst_of_split_messages_into_one_turn(tmp_path, fake, gateways):
    agent = GateAgent()
    gw = start_inprocess_gateway(tmp_path, fake, agent, busy={"debounce_ms": 300})
    gateways.append(gw)
    ids = [fake.send_user_message(t) for t in ("so I was", "thinking about", "gevent")]
    fake.wait_for(lambda: fake.replies)
    assert agent.turns == ["so I was\nthinking about\ngevent"]
    assert replies(fake) == [(ids[2], "answer: so I was\nthinking about\ngevent")]
    later = fake.send_user_message("and another thing")  # after the burst: a turn of its own
    fake.wait_for(lambda: fake.replies_to(later))
    assert agent.turns[-1] == "and another thing"
    assert states(gw, [*ids, later]) == ["answered"] * 4


# -- the queue cap ------------------------------------------------------------------------------------

def refused(reason):
    return metrics.REGISTRY.get_sample_value("hermes_green_inbound_refused_total", {
        "platform": "testchat", "bot": "testchat", "reason": reason}) or 0


def notices(kind):
    return metrics.REGISTRY.get_sample_value("hermes_green_notices_total", {
        "platform": "testchat", "bot": "testchat", "kind": kind}) or 0


@pytest.mark.parametrize("drop", ["oldest", "newest"])
def test_the_queue_cap_skips_messages_with_one_notice(tmp_path, fake, gateways, drop):
    before = refused("queue_cap"), notices("queue_cap")
    gw, agent, first, ids = burst_during_a_turn(tmp_path, fake, gateways, "queue",
                                                busy={"queue_cap": 2, "drop": drop})
    kept, skipped = (ids[3:], ids[:3]) if drop == "oldest" else (ids[:2], ids[2:])
    fake.wait_for(lambda: len(fake.replies) == 4)
    gw.wait_idle(10)
    notice = replies(fake)[0]
    assert notice[0] == skipped[0] and notice[1].startswith(
        "Too many messages are waiting in this chat (at most 2)")
    assert replies(fake)[1:] == [(first, "answer: first")] + [
        (mid, f"answer: {BURST[ids.index(mid)]}") for mid in kept]
    assert states(gw, skipped) == ["refused"] * 3 and states(gw, kept) == ["answered"] * 2
    assert (refused("queue_cap"), notices("queue_cap")) == (before[0] + 3, before[1] + 1)
    # skipped messages are never answered later, not even after a restart
    gw.shutdown()
    gateways.remove(gw)
    again = GateAgent()
    gw2 = start_inprocess_gateway(tmp_path, fake, again)
    gateways.append(gw2)
    assert gw2.store.pending_inbound() == [] and gw2.wait_idle(10)
    assert again.turns == [] and len(fake.replies) == 4
