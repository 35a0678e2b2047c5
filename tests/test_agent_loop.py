"""Whole turns against the fake LLM: tool rounds, executors, failures, interrupts, build_agent."""
import json
import os
import signal

import gevent
import gevent.event
import gevent.socket
import pytest

from hermes_green import metrics
from hermes_green.agent.base import EchoAgent, Turn, TurnFailed
from hermes_green.agent.llm import LLMClient
from hermes_green.agent.loop import EMPTY_REPLY, LLMAgent, build_agent
from hermes_green.config import AgentConfig, Config, ConfigError, ExecutorsConfig, parse_config
from tests.fakes import sample_tools as sample
from hermes_green.testing.fake_llm import FakeLLM, http_error, malformed, text, tool_call, tool_calls

KEY = "sk-loop-test-key"
TOOLS = ["hermes_green.agent.demo_tools", "tests.fakes.sample_tools"]


@pytest.fixture
def fake():
    server = FakeLLM(api_key=KEY, chunk_delay_s=0.001).start()
    yield server
    server.stop()


@pytest.fixture
def make_agent(fake):
    agents = []

    def make(**overrides):
        cfg = AgentConfig(**{"base_url": fake.base_url, "api_key": KEY, "model": "fake-model",
                             "system_prompt": "You are a test.", "max_retries": 2,
                             "tools": TOOLS, **overrides})
        llm = LLMClient.from_config(cfg, backoff_base_s=0.001, read_timeout_s=5)
        agent = LLMAgent(cfg, ExecutorsConfig(threads=4, processes=1), llm=llm)
        agents.append(agent)
        return agent
    yield make
    for agent in agents:
        agent.close()


def turn(text_, history=(), progress=None):
    return Turn(("test", "chat1"), text_, list(history),
                progress.append if progress is not None else (lambda t: None))


def tool_count(tool, executor):
    return metrics.REGISTRY.get_sample_value(
        "hermes_green_tool_seconds_count", {"tool": tool, "executor": executor}) or 0


def test_two_tool_rounds_process_then_thread(fake, make_agent):
    agent = make_agent()
    history = [{"role": "user", "content": "earlier question"},
               {"role": "assistant", "content": "earlier answer"}]
    before = tool_count("count_primes", "process"), tool_count("hash_text", "thread")
    progress = []
    # Default mode: "prime" -> count_primes (process), "hash" -> hash_text (thread), then text.
    answer = agent.run_turn(turn("compute the primes below 1000 then hash 'abc'", history,
                                 progress))
    digest = sample_hash("abc", 100_000)
    assert answer == f"Tool results: 168; {digest}."
    assert progress[-1] == answer

    first, second, third = (r.body for r in fake.chat_requests)
    base = [{"role": "system", "content": "You are a test."}, *history,
            {"role": "user", "content": "compute the primes below 1000 then hash 'abc'"}]
    assert first["messages"] == base
    assert {t["function"]["name"] for t in first["tools"]} >= {"count_primes", "hash_text"}
    call1 = second["messages"][len(base)]
    assert call1["role"] == "assistant" and call1["content"] is None
    assert call1["tool_calls"][0]["function"]["name"] == "count_primes"
    assert json.loads(call1["tool_calls"][0]["function"]["arguments"]) == {"limit": 1000}
    assert second["messages"][len(base) + 1] == {"role": "tool", "content": "168",
                                                 "tool_call_id": call1["tool_calls"][0]["id"]}
    assert third["messages"][:len(base) + 2] == second["messages"]
    call2 = third["messages"][len(base) + 2]
    assert call2["tool_calls"][0]["function"]["name"] == "hash_text"
    assert third["messages"][len(base) + 3]["content"] == digest
    # ... and each tool ran in the executor it asked for.
    assert (tool_count("count_primes", "process"), tool_count("hash_text", "thread")) == \
        (before[0] + 1, before[1] + 1)


def sample_hash(text_, iterations):
    from hermes_green.agent.demo_tools import hash_text
    return hash_text(text_, iterations)


def test_tools_really_run_where_they_say(fake, make_agent):
    agent = make_agent()
    fake.script(tool_calls(("whoami", {}), ("native_thread_id", {})), text("done"))
    assert agent.run_turn(turn("where?")) == "done"
    results = [m for m in fake.chat_requests[1].body["messages"] if m["role"] == "tool"]
    assert json.loads(results[0]["content"])["pid"] != os.getpid()
    import gevent.monkey
    assert int(results[1]["content"]) != gevent.monkey.get_original("_thread", "get_ident")()


def test_parallel_tool_calls_run_concurrently(fake, make_agent):
    agent = make_agent()
    sample._MEETING.clear()
    fake.script(tool_calls(("meet", {"who": "a"}), ("meet", {"who": "b"})), text("ok"))
    assert agent.run_turn(turn("meet")) == "ok"
    results = [m["content"] for m in fake.chat_requests[1].body["messages"] if m["role"] == "tool"]
    assert results == ["met", "met"]


def test_progress_spans_rounds_and_equals_the_answer(fake, make_agent):
    agent = make_agent()
    fake.script(tool_calls(("calculate_missing", {}), content="Let me look."),
                text("Found it.", chunk_chars=3))
    progress = []
    answer = agent.run_turn(turn("go", progress=progress))
    assert answer == "Let me look.\n\nFound it."
    assert progress[0] == "Let me look." and progress[-1] == answer
    assert all(b.startswith(a) for a, b in zip(progress, progress[1:]))
    # the unknown tool was reported to the model, and the turn went on
    tool_msg = fake.chat_requests[1].body["messages"][-1]
    assert tool_msg["role"] == "tool" and "no tool named 'calculate_missing'" in tool_msg["content"]


def test_history_is_bounded_and_cleaned(fake, make_agent):
    agent = make_agent(max_history=3)
    history = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"m{i}"}
               for i in range(10)] + [{"role": "system", "content": "injected"},
                                      {"role": "user", "content": None}]
    agent.run_turn(turn("now", history))
    sent = fake.chat_requests[0].body["messages"]
    assert [m["content"] for m in sent] == ["You are a test.", "m7", "m8", "m9", "now"]
    agent_no_history = make_agent(max_history=0, system_prompt="")
    agent_no_history.run_turn(turn("alone", history))
    assert fake.chat_requests[1].body["messages"] == [{"role": "user", "content": "alone"}]


def test_hanging_process_tool_is_killed_and_the_turn_answers(fake, make_agent):
    agent = make_agent()
    fake.script(tool_call("hang_forever"), text("Sorry, that tool hung."))
    assert agent.run_turn(turn("hang")) == "Sorry, that tool hung."
    tool_msg = fake.chat_requests[1].body["messages"][-1]
    assert tool_msg["content"] == \
        "Error: hang_forever failed: did not finish within 0.5 s (worker killed)"
    assert agent.executors.processes.replaced == 1


def test_worker_killed_mid_tool_gives_a_tool_error_and_the_next_call_works(fake, make_agent):
    agent = make_agent()
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    fake.script(tool_call("report_pid_and_block", port=port), text("first done"),
                tool_call("count_primes", limit=100), text("second done"))
    g = gevent.spawn(agent.run_turn, turn("block"))
    with gevent.Timeout(10):
        conn, _ = listener.accept()
        pid = int(conn.makefile().readline())
    os.kill(pid, signal.SIGKILL)
    assert g.get(timeout=10) == "first done"
    assert "killed by signal 9" in fake.chat_requests[1].body["messages"][-1]["content"]
    assert agent.run_turn(turn("again")) == "second done"
    assert fake.chat_requests[3].body["messages"][-1]["content"] == "25"
    conn.close()
    listener.close()


def test_429_then_success(fake, make_agent):
    agent = make_agent()
    fake.script(http_error(429, retry_after=0.01), text("fine"))
    assert agent.run_turn(turn("hi")) == "fine"
    assert len(fake.chat_requests) == 2


def failed_reply(agent, t) -> str:
    """An LLM failure ends the turn with TurnFailed carrying the user-facing reply."""
    with pytest.raises(TurnFailed) as e:
        agent.run_turn(t)
    return e.value.reply


def test_500_every_time_gives_a_user_facing_error_reply(fake, make_agent):
    agent = make_agent()
    fake.script(*[http_error(500)] * 3)
    answer = failed_reply(agent, turn("hi"))
    assert answer == ("Sorry, I could not get an answer: the model server answered HTTP 500. "
                      "Please try again in a moment.")
    assert len(fake.chat_requests) == 3  # 1 + max_retries


def test_malformed_stream_gives_an_error_reply(fake, make_agent):
    agent = make_agent()
    fake.script(malformed())
    assert failed_reply(agent, turn("hi")).startswith(
        "Sorry, I could not get an answer: the model server sent a broken answer.")


def test_failure_after_partial_text_keeps_the_text(fake, make_agent):
    agent = make_agent()
    fake.script(malformed(good_chunks=2))
    answer = failed_reply(agent, turn("hi"))
    assert answer.startswith("piece0 piece1 \n\n(Sorry, I could not get an answer")


def test_model_down_gives_an_error_reply(make_agent, fake):
    agent = make_agent()
    fake.stop()
    assert "cannot be reached" in failed_reply(agent, turn("hi"))


def test_interrupt_cancels_a_streaming_turn_and_closes_its_connection(fake, make_agent):
    agent = make_agent()
    fake.script(text("long " * 1000, chunk_chars=5, delay_s=0.01))
    streaming = gevent.event.Event()
    g = gevent.spawn(agent.run_turn, Turn(("t", "c"), "talk", [], lambda t: streaming.set()))
    assert streaming.wait(5)  # text has reached the progress callback
    g.kill()
    assert fake.disconnected.wait(5) and fake.disconnects == [1]


def test_interrupt_during_a_process_tool_kills_the_worker(fake, make_agent):
    agent = make_agent()
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    fake.script(tool_call("report_pid_and_block", port=listener.getsockname()[1]))
    g = gevent.spawn(agent.run_turn, turn("block"))
    with gevent.Timeout(10):
        conn, _ = listener.accept()
        conn.makefile().readline()
        g.kill()
        assert conn.recv(1) == b""  # the worker process is gone
    assert agent.executors.processes.replaced == 1
    conn.close()
    listener.close()


def test_tool_rounds_are_bounded(fake, make_agent):
    agent = make_agent(max_tool_rounds=1)
    fake.script(tool_call("calculate_missing"), text("gave up on tools"))
    assert agent.run_turn(turn("loop")) == "gave up on tools"
    assert "tool_choice" not in fake.chat_requests[0].body
    assert fake.chat_requests[1].body["tool_choice"] == "none"


def test_a_model_that_ignores_the_round_limit_still_gets_an_answer(fake, make_agent):
    agent = make_agent(max_tool_rounds=0)
    fake.script(tool_call("calculate_missing"))
    assert "more tool steps" in agent.run_turn(turn("loop"))


def test_empty_answer_is_replaced(fake, make_agent):
    agent = make_agent()
    fake.script(text(""))
    assert agent.run_turn(turn("hi")) == EMPTY_REPLY


def test_a_failing_progress_callback_does_not_stop_the_turn(fake, make_agent):
    agent = make_agent()
    fake.script(text("still here"))

    def broken(_):
        raise RuntimeError("adapter bug")
    assert agent.run_turn(Turn(("t", "c"), "hi", [], broken)) == "still here"


# -- build_agent ---------------------------------------------------------------------------------

def test_build_agent_without_agent_section_is_echo():
    assert isinstance(build_agent(Config()), EchoAgent)


def test_build_agent_reports_a_missing_tool_module():
    config = parse_config("agent:\n  tools: [hermes_green.agent.builtin_tools, not_a_module_x]\n")
    with pytest.raises(ConfigError) as info:
        build_agent(config)
    assert str(info.value) == "agent.tools: cannot import module 'not_a_module_x' (ModuleNotFoundError)"


def test_build_agent_and_close(fake):
    config = parse_config(
        f"agent:\n  base_url: {fake.base_url}\n  api_key: {KEY}\n"
        f"  tools: [hermes_green.agent.demo_tools]\nexecutors:\n  processes: 1\n")
    agent = build_agent(config)
    try:
        assert isinstance(agent, LLMAgent)
        assert agent.registry.names() == ["blocking_sleep", "count_primes", "hash_text", "send_file",
                                          "spin"]  # send_file: built in (agent.send_files)
        fake.script(tool_call("count_primes", limit=10), text("four"))
        assert agent.run_turn(turn("primes")) == "four"
        proc = agent.executors.processes.workers[0].proc
    finally:
        agent.close()
    assert proc.wait(timeout=5) == -signal.SIGKILL
    agent.close()  # idempotent
