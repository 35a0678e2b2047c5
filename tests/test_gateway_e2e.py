"""End to end on the real pieces: QQ Bot fake -> QQ adapter -> journal -> session -> LLM agent
(fake OpenAI-compatible server, process and thread tools) -> outbox -> QQ fake."""
import pytest

from hermes_green.config import Config
from hermes_green.gateway import Gateway
from hermes_green.testing.fake_llm import FakeLLM, http_error, text, tool_call
from hermes_green.testing.fake_qqbot import FakeQQBotServer
from tests.support import wait_until


@pytest.fixture
def llm():
    f = FakeLLM(api_key="sk-e2e-key", chunk_delay_s=0.001).start()
    yield f
    f.stop()


@pytest.fixture
def qq():
    f = FakeQQBotServer(heartbeat_interval_ms=300).start()
    yield f
    f.stop()


def gateway_config(tmp_path, llm, qq, **agent) -> Config:
    return Config.model_validate({
        "gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False}},
        "agent": {"base_url": llm.base_url, "api_key": "sk-e2e-key", "model": "fake-model",
                  "tools": ["hermes_green.agent.demo_tools"], "max_retries": 1, **agent},
        "executors": {"threads": 2, "processes": 1},
        "platforms": {"qqbot": {"app_id": qq.app_id, "client_secret": qq.client_secret,
                                "api_base": qq.http_base, "token_url": qq.token_url,
                                "backoff": {"initial_s": 0.05, "max_s": 0.5}}}})


@pytest.fixture
def gateway(tmp_path, llm, qq):
    gws = []

    def start(**agent):
        gw = Gateway(gateway_config(tmp_path, llm, qq, **agent)).start()
        gws.append(gw)
        wait_until(lambda: "qqbot" in gw.adapters and gw.adapters["qqbot"].ready.is_set(),
                   what="qqbot ready")
        return gw

    yield start
    for gw in gws:
        gw.shutdown()


def test_two_tool_rounds_process_then_thread_reply_through_qq(gateway, llm, qq):
    gw = gateway()
    # default fake-LLM mode: "primes" + "hash" -> count_primes (process), then hash_text (thread)
    mid = qq.send_user_message("please compute the primes below 5000 and hash the word green")
    qq.wait_for(lambda: any(r.msg_id == mid for r in qq.replies), timeout=30)
    reply = [r for r in qq.replies if r.msg_id == mid]
    assert len(reply) == 1 and reply[0].msg_seq == 1
    assert "669" in reply[0].content  # pi(5000) = 669, computed in the worker process
    calls = [m for req in llm.chat_requests for m in req.body["messages"] if m["role"] == "tool"]
    assert len(llm.chat_requests) == 3  # round 1 -> count_primes, round 2 -> hash_text, final
    assert any("669" in m["content"] for m in calls)
    history = gw.store.history("qqbot", "user-openid-1", 10)
    assert history[0]["role"] == "user" and "primes" in history[0]["content"]
    assert history[1] == {"role": "assistant", "content": reply[0].content}


def test_llm_failure_is_answered_but_kept_out_of_history(gateway, llm, qq):
    gw = gateway()
    llm.script(http_error(500), http_error(500))
    mid = qq.send_user_message("hello?")
    qq.wait_for(lambda: any(r.msg_id == mid for r in qq.replies), timeout=20)
    reply = next(r for r in qq.replies if r.msg_id == mid)
    assert reply.content.startswith("Sorry, I could not get an answer")
    assert gw.store.inbound_state("qqbot", mid) == "failed"
    assert gw.store.history("qqbot", "user-openid-1", 10) == []
    llm.script(text("back again"))
    mid2 = qq.send_user_message("and now?")
    qq.wait_for(lambda: any(r.msg_id == mid2 for r in qq.replies), timeout=20)
    assert llm.chat_requests[-1].body["messages"][-1]["content"] == "and now?"
    assert [m["content"] for m in llm.chat_requests[-1].body["messages"]
            if m["role"] != "system"] == ["and now?"]


def test_long_answer_is_split_into_at_most_five_qq_replies(gateway, llm, qq):
    gateway()
    llm.script(text(" ".join(f"word{i}" for i in range(4000)), chunk_chars=2000))
    mid = qq.send_user_message("write me an essay")
    qq.wait_for(lambda: len([r for r in qq.replies if r.msg_id == mid]) == 5, timeout=20)
    parts = [r for r in qq.replies if r.msg_id == mid]
    assert [r.msg_seq for r in parts] == [1, 2, 3, 4, 5]
    assert parts[-1].content.endswith("(answer truncated)")
    assert qq.rejected == []
