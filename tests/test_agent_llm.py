"""The OpenAI-compatible client against the fake LLM: streaming, tool calls, retries, timeouts,
interrupts, and the SSE parser on its own."""
import json
import logging
import socket as _socket

import gevent
import gevent.event
import gevent.server
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hermes_green.agent.llm import (LLMClient, LLMConnectionError, LLMError, LLMHTTPError,
                                    LLMStreamError, LLMTimeout, SSEParser)
from hermes_green.testing.fake_llm import (FakeLLM, hang, http_error, malformed, stream_error, text,
                                  tool_call, tool_calls)

KEY = "sk-test-0123456789abcdef"
USER = [{"role": "user", "content": "hi"}]


@pytest.fixture
def fake():
    server = FakeLLM(api_key=KEY, chunk_delay_s=0.001).start()
    yield server
    server.stop()


class Sleeps(list):
    """An injectable sleep that records the delays and only yields."""

    def __call__(self, seconds):
        self.append(seconds)
        gevent.sleep(0)


@pytest.fixture
def sleeps():
    return Sleeps()


@pytest.fixture
def client(fake, sleeps):
    c = LLMClient(base_url=fake.base_url, model="fake-model", api_key=KEY, max_retries=3,
                  timeout_s=10, read_timeout_s=5, backoff_base_s=0.001, sleep=sleeps,
                  extra_headers={"X-Title": "hermes-green"})
    yield c
    c.close()


# -- streaming -----------------------------------------------------------------------------------

def test_streamed_text_reaches_the_callback_as_it_arrives(fake, client):
    fake.script(text("Hello, streaming world!", chunk_chars=5))
    seen = []
    completion = client.chat(USER, on_text=seen.append)
    assert completion.text == "Hello, streaming world!"
    assert completion.finish_reason == "stop" and completion.tool_calls == []
    assert seen == ["Hello", "Hello, str", "Hello, streamin", "Hello, streaming wor",
                    "Hello, streaming world!"]


def test_request_carries_model_messages_auth_and_extra_headers(fake, client):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    client.chat(USER, tools=tools, tool_choice="none")
    req = fake.chat_requests[-1]
    assert req.path == "/v1/chat/completions"
    assert req.headers["authorization"] == f"Bearer {KEY}"
    assert req.headers["x-title"] == "hermes-green"
    assert req.body == {"model": "fake-model", "messages": USER, "stream": True, "tools": tools,
                        "tool_choice": "none"}


def test_one_session_reuses_its_connection(fake, client):
    client.chat(USER)
    client.chat(USER)
    first, second = fake.chat_requests
    assert first.remote_port and first.remote_port == second.remote_port


def test_streamed_tool_call_deltas_are_assembled(fake, client):
    fake.script(tool_calls(("count_primes", {"limit": 1000}),
                           ("hash_text", {"text": "a long enough text to be split"}),
                           content="Let me check."))
    completion = client.chat(USER)
    assert completion.text == "Let me check."
    assert completion.finish_reason == "tool_calls"
    assert [(c.name, json.loads(c.arguments)) for c in completion.tool_calls] == [
        ("count_primes", {"limit": 1000}),
        ("hash_text", {"text": "a long enough text to be split"})]
    assert [c.id for c in completion.tool_calls] == ["call_1_0", "call_1_1"]


def test_a_server_that_ignores_stream_true_still_works(fake, client):
    fake.script(tool_call("f", x=1))
    completion = client.chat(USER, extra={"stream": False})  # the fake then answers whole JSON
    assert completion.tool_calls[0].name == "f"
    assert json.loads(completion.tool_calls[0].arguments) == {"x": 1}


def test_models_endpoint_needs_the_key(fake):
    import requests
    url = f"{fake.base_url}/models"
    assert requests.get(url, timeout=5).status_code == 401
    body = requests.get(url, headers={"Authorization": f"Bearer {KEY}"}, timeout=5).json()
    assert body["data"][0]["id"] == "fake-model"


# -- retries and failures --------------------------------------------------------------------------

def test_429_then_success_honours_retry_after(fake, client, sleeps):
    fake.script(http_error(429, retry_after=0.05), text("ok"))
    completion = client.chat(USER)
    assert (completion.text, completion.attempts) == ("ok", 2)
    assert sleeps == [0.05]


def test_retry_after_is_capped(fake, sleeps):
    c = LLMClient(base_url=fake.base_url, model="m", api_key=KEY, retry_after_cap_s=0.02,
                  sleep=sleeps)
    fake.script(http_error(429, retry_after=3600), text("ok"))
    assert c.chat(USER).text == "ok"
    assert sleeps == [0.02]


def test_5xx_is_retried_with_growing_backoff_then_fails(fake, client, sleeps):
    fake.script(*[http_error(500, message="upstream exploded")] * 4)
    with pytest.raises(LLMHTTPError) as info:
        client.chat(USER)
    assert info.value.status == 500 and "upstream exploded" in str(info.value)
    assert info.value.reason == "the model server answered HTTP 500"
    assert len(fake.chat_requests) == 4  # 1 + max_retries
    assert len(sleeps) == 3
    assert all(0.0005 <= s <= 0.001 * 2 ** i for i, s in enumerate(sleeps))


def test_4xx_is_not_retried(fake, client):
    fake.script(http_error(400, message="bad model"))
    with pytest.raises(LLMHTTPError, match="HTTP 400: bad model"):
        client.chat(USER)
    assert len(fake.chat_requests) == 1


def test_wrong_key_gives_401_and_no_secret_anywhere(fake, caplog):
    caplog.set_level(logging.DEBUG)
    wrong = "sk-wrong-key-that-must-not-leak"
    c = LLMClient(base_url=fake.base_url, model="m", api_key=wrong)
    with pytest.raises(LLMHTTPError) as info:
        c.chat(USER)
    assert info.value.status == 401
    assert wrong not in str(info.value) and wrong not in repr(c) and wrong not in caplog.text
    assert "authentication failed" in str(info.value)


def test_secrets_stay_out_of_retry_logs(fake, client, caplog):
    caplog.set_level(logging.DEBUG)
    fake.script(http_error(500, message=f"echoing your key {KEY}"), text("ok"))
    client.chat(USER)
    assert "retry" in caplog.text and KEY not in caplog.text


def test_connection_refused_is_retried_then_reported(sleeps):
    s = _socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    c = LLMClient(base_url=f"http://127.0.0.1:{port}/v1", model="m", max_retries=2, sleep=sleeps,
                  backoff_base_s=0.001)
    with pytest.raises(LLMConnectionError, match="cannot connect"):
        c.chat(USER)
    assert len(sleeps) == 2


def test_malformed_stream_is_an_error_without_retry(fake, client):
    fake.script(malformed(good_chunks=0))
    with pytest.raises(LLMStreamError, match="malformed stream"):
        client.chat(USER)
    assert len(fake.chat_requests) == 1


def test_stream_cut_after_tokens_is_not_retried(fake, client):
    fake.script(text("a" * 40, chunk_chars=4, drop_after_chunks=3), text("second try"))
    seen = []
    with pytest.raises(LLMStreamError, match="stream interrupted|ended before"):
        client.chat(USER, on_text=seen.append)
    assert seen[-1] == "aaaaaaaaaaaa"
    assert len(fake.chat_requests) == 1  # the user already saw text: no repeat


def test_stream_cut_before_any_token_is_retried(fake, client):
    fake.script(text("never", drop_after_chunks=0), text("second try"))
    assert client.chat(USER).text == "second try"
    assert len(fake.chat_requests) == 2


def test_stream_without_done_but_finished_is_accepted(fake, client):
    fake.script(text("fine", send_done=False))
    assert client.chat(USER).text == "fine"


def test_a_hung_server_is_retried_after_the_read_timeout(fake, sleeps):
    c = LLMClient(base_url=fake.base_url, model="m", api_key=KEY, read_timeout_s=0.1,
                  timeout_s=10, sleep=sleeps, backoff_base_s=0.001)
    fake.script(hang(), text("awake"))
    assert c.chat(USER).text == "awake"
    assert fake.disconnected.wait(5)  # we left the hung request


def test_total_timeout_bounds_the_whole_call(fake):
    c = LLMClient(base_url=fake.base_url, model="m", api_key=KEY, read_timeout_s=30,
                  timeout_s=0.3)
    fake.script(hang(after_headers=True))
    with pytest.raises(LLMTimeout, match="within 0.3 s"):
        c.chat(USER)
    assert fake.disconnected.wait(5)


def test_error_event_inside_the_stream(fake, client):
    fake.script(stream_error("provider overloaded"))
    with pytest.raises(LLMError, match="error in stream: provider overloaded"):
        client.chat(USER)


def test_a_callable_response_is_computed_from_the_request(fake, client):
    fake.script(lambda body: text(f"{len(body['messages'])} message(s)"))
    assert client.chat(USER).text == "1 message(s)"


# -- interrupt -----------------------------------------------------------------------------------

def test_interrupt_closes_the_http_response_and_the_server_sees_it(fake, client):
    fake.script(text("word " * 500, chunk_chars=5, delay_s=0.01))
    seen = []
    g = gevent.spawn(client.chat, USER, on_text=seen.append)
    assert fake.streaming.wait(5)
    g.kill()  # GreenletExit inside the read: the busy-mode `interrupt` path
    assert g.dead and isinstance(g.value, gevent.GreenletExit)
    assert fake.disconnected.wait(5)
    assert fake.disconnects == [1]
    fake.script(text("after"))
    assert client.chat(USER).text == "after"  # the session is still usable


# -- non-chunked streams (HTTP/1.0 style, closed by the server) ----------------------------------

def test_stream_without_chunked_encoding_is_read_as_it_arrives(sleeps):
    first_seen = gevent.event.Event()

    def handle(sock, _addr):
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(4096)
        head, body = data.split(b"\r\n\r\n", 1)
        length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0]
                     .split(b":")[1])
        while len(body) < length:
            body += sock.recv(4096)

        def event(content):
            chunk = {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}
            return b"data: " + json.dumps(chunk).encode() + b"\n\n"
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
                     b"Connection: close\r\n\r\n" + event("first "))
        first_seen.wait(5)  # only sent on once the client has shown the first piece
        sock.sendall(event("second") + b"data: [DONE]\n\n")
        sock.close()

    server = gevent.server.StreamServer(("127.0.0.1", 0), handle)
    server.start()
    try:
        c = LLMClient(base_url=f"http://127.0.0.1:{server.server_port}/v1", model="m",
                      timeout_s=5)
        seen = []

        def on_text(t):
            seen.append(t)
            first_seen.set()
        assert c.chat(USER, on_text=on_text).text == "first second"
        assert seen == ["first ", "first second"]
    finally:
        server.stop()


# -- SSE parser ----------------------------------------------------------------------------------

STREAM = (b": OPENROUTER PROCESSING\r\n\r\n"
          b"event: message\r\ndata: {\"a\": 1}\r\n\r\n"
          b"data:{\"b\": 2}\n\n"
          b"data: line one\ndata: line two\n\n"
          b"id: 7\nretry: 100\n\n"
          b"data: [DONE]\n\n")
EVENTS = ['{"a": 1}', '{"b": 2}', "line one\nline two", "[DONE]"]


def test_sse_parser_whole():
    p = SSEParser()
    assert p.feed(STREAM) + p.close() == EVENTS


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(STREAM)), max_size=12))
def test_sse_parser_any_split(cuts):
    p = SSEParser()
    events, last = [], 0
    for cut in sorted(cuts) + [len(STREAM)]:
        events += p.feed(STREAM[last:cut])
        last = cut
    assert events + p.close() == EVENTS


def test_sse_parser_flushes_a_last_event_without_blank_line():
    p = SSEParser()
    assert p.feed(b"data: x") == []
    assert p.close() == ["x"]


def test_llm_error_reasons_are_short_phrases():
    assert LLMTimeout("x").reason == "the model server did not answer in time"
    assert issubclass(LLMStreamError, LLMError)


def test_many_turns_stream_at_once_each_on_its_own_connection(fake):
    """40 turns waiting on their streams at the same time all reach the server (a pool of 32
    connections held the rest back until a stream ended: the footprint bench's 50 slow turns)."""
    c = LLMClient(base_url=fake.base_url, model="m", api_key=KEY, timeout_s=30)
    fake.script(*[hang(after_headers=True)] * 40)
    calls = [gevent.spawn(c.chat, USER) for _ in range(40)]
    try:
        assert fake.wait_for_chat_requests(40, timeout=10), len(fake.chat_requests)
    finally:
        gevent.killall(calls, timeout=5)
        c.close()
