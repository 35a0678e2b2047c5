"""The web chat against a real gateway (store, sessions, outbox) and its status server, with
the page played from Python (hermes_green/testing/fake_webchat.py): streamed progress, replies
kept in the outbox until a page acknowledged them, resends answered once, replies made while no
page was open (also across a restart), the served transport's life, access rules, bad input."""
from __future__ import annotations

import os
import socket
import struct

import gevent
import gevent.event
import pytest
import requests
import websocket
from pydantic import SecretStr, ValidationError

from hermes_green.config import Config, StatusConfig, parse_config
from hermes_green.gateway import Gateway
from hermes_green.platforms.base import State
from hermes_green.status import StatusServer
from hermes_green.testing.fake_webchat import WebChatPage
from hermes_green.webmount import MOUNTS
from tests.support import wait_until

STATUS_TOKEN = "status-token-0123456789abcdef"
CHAT_TOKEN = "chat-token-fedcba9876543210"


class StreamingAgent:
    """Answers "answer to <text>" word by word through on_progress; a turn whose text was
    `hold()`-ed waits for its gate after the second word."""

    def __init__(self) -> None:
        self.turns: list[str] = []
        self.gates: dict[str, gevent.event.Event] = {}

    def hold(self, text: str) -> gevent.event.Event:
        self.gates[text] = gevent.event.Event()
        return self.gates[text]

    def run_turn(self, turn) -> str:
        self.turns.append(turn.text)
        so_far = ""
        for i, word in enumerate(f"answer to {turn.text}".split()):
            so_far = f"{so_far} {word}".strip()
            turn.on_progress(so_far)
            if i == 1 and turn.text in self.gates:
                self.gates[turn.text].wait()
            gevent.sleep(0.005)
        return so_far

    def close(self) -> None:
        pass


class Chat:
    def __init__(self, tmp_path, agent, webchat: dict, status: dict) -> None:
        self.tmp_path, self.agent, self.webchat, self.status = tmp_path, agent, webchat, status
        self.gateway: Gateway | None = None
        self.server: StatusServer | None = None
        self.pages: list[WebChatPage] = []

    def start(self) -> "Chat":
        config = Config.model_validate({
            "gateway": {"data_dir": str(self.tmp_path / "data"),
                        "status": {"port": 0, **self.status},
                        "progress_after_s": 0},  # streamed from the first word
            "platforms": {"webchat": {"progress_interval_s": 0, "offline_retry_max_s": 0.3,
                                      **self.webchat}}})
        self.gateway = Gateway(config, agent=self.agent).start()
        self.server = StatusServer(self.gateway, config.gateway.status).start()
        self.gateway.status_server = self.server
        wait_until(lambda: self.adapter is not None and self.adapter.ready.is_set(),
                   what="web chat served")
        return self

    def stop(self) -> None:
        for page in self.pages:
            page.close()
        if self.gateway is not None:
            self.gateway.shutdown()
            self.gateway = None

    @property
    def adapter(self):
        return self.gateway.adapters.get("webchat") if self.gateway else None

    @property
    def url(self) -> str:
        return self.server.url

    def page(self, **kw) -> WebChatPage:
        page = WebChatPage(self.url, **kw)
        self.pages.append(page)
        return page

    def pending(self) -> int:
        return self.gateway.store.outbox_pending()


@pytest.fixture
def make_chat(tmp_path):
    made: list[Chat] = []

    def make(webchat: dict | None = None, status: dict | None = None, agent=None) -> Chat:
        chat = Chat(tmp_path, agent or StreamingAgent(), webchat or {}, status or {}).start()
        made.append(chat)
        return chat

    yield make
    for chat in made:
        chat.stop()


# --- the conversation --------------------------------------------------------------------------

def test_a_message_is_answered_with_streamed_progress_then_the_reply(make_chat):
    chat = make_chat()
    page = chat.page().open()
    mid = page.say("hello")
    page.wait_for(lambda: page.answer(mid), what="the reply")
    assert page.received[mid] == "new"
    assert page.answer(mid) == "answer to hello"
    streamed = [text for to, text, _ in page.progress if to == mid]
    assert streamed[:3] == ["answer", "answer to", "answer to hello"]
    assert page.progress[0][2] < page.replies[0].at  # progress came before the final reply
    wait_until(lambda: chat.pending() == 0, what="the outbox row deleted after the ack")
    assert chat.agent.turns == ["hello"]


def test_page_sockets_send_small_frames_at_once(make_chat):
    """A reply right after its "received" frame must not wait for the page's delayed ACK
    (Nagle: ~40 ms per reply, measured with bench/webchat.py before the fix)."""
    chat = make_chat()
    page = chat.page().open()
    served = chat.adapter._pages[page.conversation][0]
    sock = served.ws.handler.socket
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


def test_the_outbox_row_stays_until_the_page_acknowledges_the_reply(make_chat):
    chat = make_chat(webchat={"ack_timeout_s": 0.3})
    page = chat.page(auto_ack=False).open()
    mid = page.say("keep it")
    page.wait_for(lambda: len(page.replies) >= 2, what="the unacked part pushed again")
    assert chat.pending() == 1  # pushed twice, acked never: still owed
    assert {r.id for r in page.replies} == {f"{mid}:0"}
    page.ack(f"{mid}:0")
    wait_until(lambda: chat.pending() == 0, what="the row deleted once acked")


def test_a_message_sent_again_after_a_reconnect_is_answered_once(make_chat):
    chat = make_chat()
    gate = chat.agent.hold("only once")
    page = chat.page().open()
    mid = page.say("only once")
    wait_until(lambda: chat.agent.turns == ["only once"], what="the turn started")
    page.drop()
    page.pending[mid] = "only once"  # its "received" was lost with the connection: sent again
    page.open()
    page.wait_for(lambda: page.received.get(mid) == "duplicate", what="the resend journaled")
    gate.set()
    page.wait_for(lambda: page.answer(mid), what="the reply")
    gevent.sleep(0.2)
    assert chat.agent.turns == ["only once"]
    assert [r.id for r in page.replies] == [f"{mid}:0"]


def test_a_reply_made_while_no_page_is_open_arrives_when_the_page_comes_back(make_chat):
    chat = make_chat()
    gate = chat.agent.hold("while away")
    page = chat.page().open()
    mid = page.say("while away")
    page.wait_for(lambda: page.received.get(mid) == "new", what="received")
    page.close()
    gate.set()
    wait_until(lambda: chat.adapter._away, what="the reply found no page")
    assert chat.pending() == 1
    page.open()
    page.wait_for(lambda: page.answer(mid), what="the reply after coming back")
    assert page.answer(mid) == "answer to while away"
    wait_until(lambda: chat.pending() == 0, what="the row deleted after the ack")
    assert len(page.replies) == 1


def test_a_reply_owed_across_a_gateway_restart_is_delivered_to_the_page(make_chat, tmp_path):
    first = make_chat()
    gate = first.agent.hold("across")
    page = first.page().open()
    conversation, client = page.conversation, page.client
    mid = page.say("across")
    page.wait_for(lambda: page.received.get(mid) == "new", what="received")
    page.close()
    gate.set()
    wait_until(lambda: first.adapter._away, what="the reply found no page")
    first.stop()  # the row stays in the store
    second = make_chat()  # same data_dir, a new adapter with an empty memory
    assert second.pending() == 1
    back = second.page(conversation=conversation, client=client).open()
    back.wait_for(lambda: back.answer(mid), what="the owed reply")
    assert back.answer(mid) == "answer to across"
    wait_until(lambda: second.pending() == 0, what="the row deleted after the ack")


def test_two_pages_of_one_conversation_both_show_the_reply_and_one_ack_is_enough(make_chat):
    chat = make_chat()
    one = chat.page().open()
    two = chat.page(conversation=one.conversation, auto_ack=False).open()
    mid = one.say("both")
    one.wait_for(lambda: one.answer(mid), what="page one")
    two.wait_for(lambda: two.answer(mid), what="page two")
    wait_until(lambda: chat.pending() == 0, what="one ack deletes the row")


def test_conversations_are_apart(make_chat):
    chat = make_chat()
    alice, bob = chat.page().open(), chat.page().open()
    a, b = alice.say("from alice"), bob.say("from bob")
    alice.wait_for(lambda: alice.answer(a), what="alice's reply")
    bob.wait_for(lambda: bob.answer(b), what="bob's reply")
    assert {r.in_reply_to for r in alice.replies} == {a}
    assert {r.in_reply_to for r in bob.replies} == {b}


def test_the_driver_plays_users_for_code_that_drives_platforms_generically(make_chat):
    from hermes_green.testing.fake_webchat import Driver
    chat = make_chat()
    driver = Driver().attach(chat.url)
    try:
        first, second = driver.user_says("one", chat=0), driver.user_says("two", chat=1)
        wait_until(lambda: driver.answers(first) and driver.answers(second), what="answers")
        assert driver.answers(first) == ["answer to one"]
        assert driver.answers(second) == ["answer to two"]
        assert driver.connected() and len(driver.reply_rows()) == 2
    finally:
        driver.stop()


# --- the served transport's life ---------------------------------------------------------------

def test_the_chat_is_ready_only_while_a_status_server_serves_it(make_chat):
    chat = make_chat()
    adapter = chat.adapter
    assert adapter.stats.state is State.READY and adapter.stats.connects == 1
    chat.server.stop()
    wait_until(lambda: adapter.stats.state is State.CONNECTING, what="not served any more")
    assert adapter.stats.reconnects["unmounted"] == 1
    assert adapter in MOUNTS.published()  # offered again, waiting for a host
    chat.server = StatusServer(chat.gateway, StatusConfig(port=0)).start()
    chat.gateway.status_server = chat.server
    wait_until(lambda: adapter.ready.is_set(), what="served again")
    page = chat.page().open()
    mid = page.say("again")
    page.wait_for(lambda: page.answer(mid), what="a reply from the new server")


def test_a_stopped_chat_leaves_the_board_and_closes_its_pages(make_chat):
    chat = make_chat()
    page = chat.page().open()
    adapter = chat.adapter
    chat.stop()
    assert adapter not in MOUNTS.published()
    page.wait_for(lambda: not page.connected, what="the page closed")


def test_check_names_the_path_and_the_token_rule():
    from hermes_green.platforms.webchat import WebChatAdapter, WebChatConfig
    assert "served at /chat" in WebChatAdapter.check(WebChatConfig(id="webchat"))
    detail = WebChatAdapter.check(WebChatConfig(id="webchat", path="/talk",
                                                token=SecretStr(CHAT_TOKEN)))
    assert "served at /talk" in detail and "own token" in detail and CHAT_TOKEN not in detail


# --- access ------------------------------------------------------------------------------------

def test_a_chat_token_opens_the_chat_only_and_the_status_token_the_status_only(make_chat):
    chat = make_chat(webchat={"token": CHAT_TOKEN}, status={"token": STATUS_TOKEN})
    base = chat.url.rstrip("/")
    assert requests.get(base + "/chat", timeout=5).status_code == 401
    assert requests.get(f"{base}/chat?token={STATUS_TOKEN}", timeout=5).status_code == 401
    page = requests.get(f"{base}/chat?token={CHAT_TOKEN}", timeout=5)
    assert page.status_code == 200 and "text/html" in page.headers["Content-Type"]
    assert CHAT_TOKEN not in page.text  # the page reads its token from its own address
    assert requests.get(f"{base}/healthz?token={CHAT_TOKEN}", timeout=5).status_code == 401
    assert requests.get(f"{base}/healthz?token={STATUS_TOKEN}", timeout=5).status_code in (200,
                                                                                           503)
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        chat.page().open()
    assert refused.value.status_code == 401
    page = chat.page(token=CHAT_TOKEN).open()
    mid = page.say("with a token")
    page.wait_for(lambda: page.answer(mid), what="the reply")


def test_off_loopback_the_chat_takes_the_status_token(make_chat):
    chat = make_chat(status={"host": "0.0.0.0", "token": STATUS_TOKEN})
    url = f"http://127.0.0.1:{chat.server.port}/chat"
    public = {"Host": "chat.example.com"}
    assert requests.get(url, headers=public, timeout=5).status_code == 401
    ok = requests.get(url, headers={**public, "Authorization": f"Bearer {STATUS_TOKEN}"},
                      timeout=5)
    assert ok.status_code == 200


def test_a_foreign_host_and_a_foreign_origin_are_refused(make_chat):
    chat = make_chat()
    r = requests.get(chat.url + "chat", headers={"Host": "evil.example"}, timeout=5)
    assert r.status_code == 421  # DNS rebinding guard, as for the status page
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        chat.page(origin="http://evil.example").open()
    assert refused.value.status_code == 403


def test_a_chat_path_may_not_cover_the_status_server_paths():
    with pytest.raises(ValidationError):
        Config.model_validate({"platforms": {"webchat": {"path": "/healthz"}}})
    with pytest.raises(Exception, match="webchat.path"):
        parse_config("platforms:\n  webchat: {path: 'no-slash'}\n")


# --- bad input ---------------------------------------------------------------------------------

def raw_socket(chat: Chat, first: str | bytes | None) -> websocket.WebSocket:
    ws = websocket.WebSocket()
    ws.connect(chat.url.replace("http://", "ws://") + "chat/ws", suppress_origin=True,
               timeout=5)
    if first is not None:
        ws.send_bytes(first) if isinstance(first, bytes) else ws.send_text(first)
    return ws


def close_code(ws: websocket.WebSocket) -> int | None:
    while True:
        try:
            opcode, data = ws.recv_data(control_frame=True)
        except (websocket.WebSocketConnectionClosedException, socket.timeout, OSError):
            return None
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return int.from_bytes(data[:2], "big")


@pytest.mark.parametrize("first", [
    "not json", '{"type": "message", "id": "x", "text": "no hello"}',
    '{"type": "hello", "client": "short", "conversation": "0123456789abcdef"}',
    '{"type": "hello", "client": "0123456789abcdef", "conversation": "../../etc"}',
    b"\x00binary"])
def test_a_page_without_a_valid_hello_is_closed_with_1008(make_chat, first):
    chat = make_chat()
    assert close_code(raw_socket(chat, first)) == 1008


def huge_frame_header(page: WebChatPage) -> None:
    """A text frame that declares 1 TB: refused from its header, the payload never awaited."""
    page._ws.sock.sendall(b"\x81\xff" + struct.pack("!Q", 1 << 40) + os.urandom(4))


@pytest.mark.parametrize("frame, code", [
    ('{"type": "message", "id": "bad id!", "text": "x"}', 1008),
    ('{"type": "message", "id": "ok", "text": "   "}', 1008),
    ('{"type": "message", "id": "ok", "text": 42}', 1008),
    ('{"type": "dance"}', 1008),
    ("[1, 2", 1008),
    (b"binary", 1008),
    (huge_frame_header, 1009)])
def test_a_bad_message_closes_that_page_only(make_chat, frame, code):
    chat = make_chat(webchat={"max_text_chars": 100})
    good = chat.page().open()
    bad = chat.page().open()
    frame(bad) if callable(frame) else bad.send(frame)
    bad.wait_for(lambda: bad.closes, what="the bad page closed")
    assert bad.closes == [code]
    mid = good.say("still here")
    good.wait_for(lambda: good.answer(mid), what="the other page answered")


def test_a_text_over_the_limit_is_refused_and_not_journaled(make_chat):
    chat = make_chat(webchat={"max_text_chars": 10})
    page = chat.page().open()
    page.say("x" * 11)
    page.wait_for(lambda: page.closes, what="closed")
    assert page.closes == [1008] and "1 to 10 characters" in page.errors[0]
    assert chat.agent.turns == []
