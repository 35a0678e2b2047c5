"""`agent.backend: service` through a real gateway: two test-platform bots -> journal -> session
-> ServiceAgent -> a strict fake of hermes-agent's API server -> outbox -> the bots.

Shown: only the new text is sent; one conversation id per chat, the same on every turn, different
per chat and per bot; the service (not the gateway) keeps the history; progress streams;
duplicates never reach the service; a service that is down, slow, refuses the key or breaks the
stream gives the short error reply and a failed message, as the builtin agent does; an
interrupt closes the stream and the service stops its agent."""
import re

import pytest
import requests

from hermes_green.agent.service import conversation_id
from hermes_green.config import Config, ConfigError, parse_config
from hermes_green.gateway import Gateway
from hermes_green.testing.fake_agent_service import (FakeAgentService, agent_error, answer,
                                                     http_error, is_path_unsafe, malformed, slow)
from tests.fakes.fake_testchat import FakeTestChat
from tests.fakes import testchat_adapter
from tests.support import run_cli, wait_until, write_config

KEY = "hermes-api-server-key-for-tests"
ID_FORMAT = re.compile(r"^hg-[0-9a-f]{32}$")


class RecordingBot(testchat_adapter.TestChatAdapter):
    """The test platform, also recording the progress the gateway streams to it."""
    __test__ = False

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.progress_seen: list[str] = []

    def progress(self, reply_ref: dict, text_so_far: str) -> None:
        self.progress_seen.append(text_so_far)


class SecondBot(RecordingBot):
    name = "testchat2"


@pytest.fixture
def service():
    f = FakeAgentService(api_key=KEY).start()
    yield f
    f.stop()


@pytest.fixture
def bots():
    a, b = FakeTestChat().start(), FakeTestChat().start()
    yield a, b
    a.stop()
    b.stop()


@pytest.fixture
def gateway(tmp_path, bots):
    started = []

    def start(service_url: str, *, busy_mode: str = "queue", **agent) -> Gateway:
        config = Config.model_validate({
            "gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False},
                        "busy_mode": busy_mode, "progress_after_s": 0},
            "agent": {"backend": "service", "base_url": service_url, "api_key": KEY,
                      "timeout_s": 10, **agent}})
        factories = {
            "testchat": lambda cfg, on_message, **kw: RecordingBot(
                testchat_adapter.testchat_config(bots[0].ws_url), on_message, **kw),
            "testchat2": lambda cfg, on_message, **kw: SecondBot(
                testchat_adapter.testchat_config(bots[1].ws_url), on_message, **kw)}
        gw = Gateway(config, adapter_factories=factories).start()
        started.append(gw)
        wait_until(lambda: all(n in gw.adapters and gw.adapters[n].ready.is_set()
                               for n in factories), what="both bots connected")
        return gw

    yield start
    for gw in started:
        gw.shutdown()


def ask(bot: FakeTestChat, text: str, chat: str = "c1") -> str:
    mid = bot.send_user_message(text, chat=chat)
    bot.wait_for(lambda: bot.replies_to(mid), timeout=15)
    return bot.replies_to(mid)[0]["text"]


def sent(request) -> tuple[list[dict], str]:
    return request.body["messages"], request.headers.get("x-hermes-session-id")


def test_only_the_new_text_is_sent_with_one_conversation_id_per_chat_and_bot(
        gateway, service, bots):
    gw = gateway(service.base_url)
    bot1, bot2 = bots
    first = ask(bot1, "hello, I am Ada")
    second = ask(bot1, "what did I say?")
    other_chat = ask(bot1, "a different chat", chat="c2")
    other_bot = ask(bot2, "same chat id, other bot")  # chat "c1" again, on the second bot

    reqs = service.chat_requests
    assert [sent(r)[0] for r in reqs] == [
        [{"role": "user", "content": text}] for text in
        ("hello, I am Ada", "what did I say?", "a different chat", "same chat id, other bot")]
    ids = [sent(r)[1] for r in reqs]
    assert ids[0] == ids[1], "one conversation per chat, turn after turn"
    assert len({ids[0], ids[2], ids[3]}) == 3, "a different one per chat and per bot"
    assert all(ID_FORMAT.match(i) and not is_path_unsafe(i) for i in ids)
    assert ids[0] == conversation_id(("testchat", "c1"))  # the same after a restart
    # The service kept the history (our requests carried none of it) ...
    assert first.startswith(f"(turn 1 of {ids[0]}) you said: hello, I am Ada")
    assert second == f"(turn 2 of {ids[0]}) you said: what did I say?; before that: hello, I am Ada"
    assert other_chat.startswith("(turn 1 of") and other_bot.startswith("(turn 1 of")
    # ... while the gateway still keeps its own, and streamed the answer as it came.
    assert [m["content"] for m in gw.store.history("testchat", "c1", 10)] == [
        "hello, I am Ada", first, "what did I say?", second]
    partial = [p for p in gw.adapters["testchat"].progress_seen if second.startswith(p)]
    assert len(partial) > 2 and partial[0] != second and partial[-1] == second


def test_a_redelivered_message_never_reaches_the_service_twice(gateway, service, bots):
    gateway(service.base_url)
    bot1 = bots[0]
    mid = bot1.send_user_message("only once")
    bot1.wait_for(lambda: bot1.replies_to(mid), timeout=15)
    bot1.redeliver(mid)
    later = bot1.send_user_message("next")  # the chat's queue is in order: after the duplicate
    bot1.wait_for(lambda: bot1.replies_to(later), timeout=15)
    assert [sent(r)[0][0]["content"] for r in service.chat_requests] == ["only once", "next"]
    assert len(bot1.replies_to(mid)) == 1


def test_tool_progress_events_are_skipped_and_the_answer_text_is_kept(gateway, service, bots):
    gateway(service.base_url)
    service.script(answer("Listed 3 files.", tools=["terminal", "read_file"]))
    assert ask(bots[0], "list my files") == "Listed 3 files."


def _down_url() -> str:
    f = FakeAgentService(api_key=KEY).start()
    url = f.base_url
    f.stop()
    return url


@pytest.mark.parametrize("case, reason", [
    ("down", "the agent service cannot be reached"),
    ("wrong key", "the agent service answered HTTP 401"),
    ("slow", "the agent service did not answer in time"),
    ("malformed stream", "the agent service sent a broken answer"),
    ("agent failed", "the agent service failed"),
    ("HTTP 502", "the agent service answered HTTP 502"),
])
def test_a_failing_service_gets_the_short_error_reply_and_the_message_is_failed(
        gateway, service, bots, case, reason):
    url = _down_url() if case == "down" else service.base_url
    agent = {"timeout_s": 1.0} if case == "slow" else {}
    if case == "wrong key":
        agent["api_key"] = "not-the-key"
    gw = gateway(url, **agent)
    service.script(*{"slow": [slow()], "malformed stream": [malformed(good_chunks=0)],
                     "agent failed": [agent_error("provider quota exhausted")],
                     "HTTP 502": [http_error(502)]}.get(case, []))
    mid = bots[0].send_user_message("are you there?")
    bots[0].wait_for(lambda: bots[0].replies_to(mid), timeout=15)
    reply = bots[0].replies_to(mid)[0]["text"]
    assert reply == f"Sorry, I could not get an answer: {reason}. Please try again in a moment."
    assert gw.store.inbound_state("testchat", mid) == "failed"
    assert gw.store.history("testchat", "c1", 10) == []
    assert KEY not in reply and "not-the-key" not in reply


def test_text_streamed_before_a_failure_is_kept_above_the_error(gateway, service, bots):
    gw = gateway(service.base_url)
    service.script(agent_error("context length exceeded", partial="Here is the start"))
    mid = bots[0].send_user_message("tell me everything")
    bots[0].wait_for(lambda: bots[0].replies_to(mid), timeout=15)
    assert bots[0].replies_to(mid)[0]["text"] == (
        "Here is the start\n\n(Sorry, I could not get an answer: the agent service failed. "
        "Please try again in a moment.)")
    assert gw.store.inbound_state("testchat", mid) == "failed"


def test_an_interrupt_closes_the_stream_and_the_service_stops_its_agent(gateway, service, bots):
    gateway(service.base_url, busy_mode="interrupt")
    bot1 = bots[0]
    service.script(slow())
    bot1.send_user_message("a long job")
    assert service.streaming.wait(10)  # the first turn's stream is open
    newer = bot1.send_user_message("never mind")
    assert service.disconnected.wait(10), "the gateway should close the stream"
    assert service.interrupted == [conversation_id(("testchat", "c1"))]
    bot1.wait_for(lambda: bot1.replies_to(newer), timeout=15)
    assert "you said: never mind" in bot1.replies_to(newer)[0]["text"]


def test_conversation_ids_are_stable_path_safe_bounded_and_distinct():
    keys = [("qqbot", "user-openid-1"), ("qqbot", "user-openid-2"), ("wecom", "user-openid-1"),
            ("feishu", "../../etc/passwd"), ("feishu", "C:\\x"), ("wecom", "群聊/αβ"),
            ("qqbot", "x" * 10_000)]
    ids = [conversation_id(k) for k in keys]
    assert all(ID_FORMAT.match(i) and not is_path_unsafe(i) for i in ids)
    assert len(set(ids)) == len(ids)
    assert conversation_id(keys[0], "gateway-b") not in ids  # a namespace parts two gateways
    # Pinned: changing the derivation would orphan every conversation the service holds.
    assert conversation_id(("qqbot", "user-openid-1")) == "hg-febc456edd939565d7ba64604681ecf0"


def test_the_fake_refuses_what_hermes_agent_refuses(service):
    url = f"{service.base_url}/chat/completions"
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": "hermes-agent", "messages": [{"role": "user", "content": "hi"}]}

    def post(headers, json_body=body):
        return requests.post(url, headers=headers, json=json_body, timeout=5)

    assert post({}).status_code == 401
    assert post({"Authorization": "Bearer wrong"}).status_code == 401
    for bad in ("../../etc/passwd", "a/b", "a\\b", "C:x"):
        r = post({**auth, "X-Hermes-Session-Id": bad})
        assert (r.status_code, r.json()["error"]["message"]) == (400, "Invalid session ID")
    r = post({**auth, "X-Hermes-Session-Id": "x" * 257})
    assert (r.status_code, r.json()["error"]["message"]) == (400, "Session ID too long")
    r = post(auth, {"messages": [{"role": "system", "content": "only a system prompt"}]})
    assert r.status_code == 400
    ours = conversation_id(("qqbot", "u1"))
    r = post({**auth, "X-Hermes-Session-Id": ours})
    assert r.status_code == 200 and r.headers["X-Hermes-Session-Id"] == ours
    assert service.sessions[ours][0] == {"role": "user", "content": "hi"}
    open_server = FakeAgentService(api_key=None).start()  # no API_SERVER_KEY: no continuation
    try:
        r = requests.post(f"{open_server.base_url}/chat/completions", json=body, timeout=5,
                          headers={"X-Hermes-Session-Id": ours})
        assert r.status_code == 403 and "requires API key" in r.json()["error"]["message"]
    finally:
        open_server.stop()


def test_service_config_defaults_and_one_line_errors():
    agent = parse_config("agent: {backend: service, api_key: k}").agent
    assert (agent.base_url, agent.model, agent.tools, agent.max_retries, agent.system_prompt) == (
        "http://127.0.0.1:8642/v1", "hermes-agent", [], 0, "")
    assert parse_config("agent: {api_key: k}").agent.backend == "builtin"
    for text, expected in [
        ("agent: {backend: service}", "agent: backend: service needs api_key"),
        ("agent: {backend: service, api_key: k, tools: [m]}",
         "agent: tools are not used with backend: service"),
        ("agent: {backend: servce, api_key: k}", "agent.backend: input should be"),
        ("agent: {backend: service, api_key: k, service: {conversation_header: 'a b'}}",
         "agent.service.conversation_header:"),
    ]:
        with pytest.raises(ConfigError) as e:
            parse_config(text)
        assert str(e.value).startswith(expected), str(e.value)


def test_check_reaches_the_service_and_lists_its_model(tmp_path, service):
    cfg = write_config(tmp_path / "c.yaml", {
        "gateway": {"data_dir": str(tmp_path / "data")},
        "agent": {"backend": "service", "base_url": service.base_url, "api_key": KEY}})
    result = run_cli("check", "--config", str(cfg))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "'hermes-agent' listed" in result.stdout
    assert KEY not in result.stdout + result.stderr
