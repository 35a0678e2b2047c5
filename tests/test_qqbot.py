"""QQ Bot adapter against the strict fake (hermes_green/testing/fake_qqbot.py).

Timing: heartbeat every 0.2 s, the fake drops a client that is silent for 0.3 s, backoff starts
at 0.05 s. Every wait is on a condition; "no reconnect" checks observe a fixed window only to
prove that something did NOT happen.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from types import SimpleNamespace

import gevent
import gevent.event
import pytest
import requests
import websocket
from pydantic import SecretStr

from hermes_green.testing.journal import Journal, run_until_stopped
from hermes_green.gateway import turn_text
from hermes_green.config import BackoffConfig
from hermes_green.platforms.qqbot import QQBotConfig
from hermes_green.models import OutboundMessage
from hermes_green.platforms.base import FatalPlatformError, SendError, State
from hermes_green.platforms.qqbot import EVENT_C2C, QQBotAdapter, attachment_kind
from hermes_green.testing.fake_qqbot import CODE_DUPLICATE, FakeQQBotServer
from tests.support import AdapterRuns, print_reconnect_times, ready

INTERVAL_MS = 200
DEADLINE_S = 0.6  # 3 intervals: strict, with room for a loaded CI machine
RECONNECT_BUDGET_S = 2.0
MEASURED: dict[str, float] = {}  # fault -> seconds from the fault to ready again


@pytest.fixture(scope="module", autouse=True)
def report_reconnect_times():
    """Prints what the fault tests measured (visible with -s)."""
    yield from print_reconnect_times(MEASURED)






@pytest.fixture
def make():
    runs = AdapterRuns()

    def _make(*, fake_kw=None, cfg_kw=None, run=True, journal=None, handshake_timeout_s=1.0,
              **adapter_kw):
        fake_args = dict(heartbeat_interval_ms=INTERVAL_MS, heartbeat_deadline_s=DEADLINE_S)
        fake_args.update(fake_kw or {})
        fake = FakeQQBotServer(**fake_args).start()
        cfg_args = dict(app_id=fake.app_id, client_secret=fake.client_secret,
                        api_base=fake.http_base, token_url=fake.token_url,
                        backoff=BackoffConfig(initial_s=0.05, max_s=0.3, healthy_after_s=0.5))
        cfg_args.update(cfg_kw or {})
        journal = journal if journal is not None else Journal()
        adapter = QQBotAdapter(QQBotConfig(**cfg_args), journal,
                               handshake_timeout_s=handshake_timeout_s, **adapter_kw)
        return runs.start(fake, adapter, journal, run=run)

    yield _make
    runs.stop_all()



def delivered(h, msg_id: str, timeout=3.0):
    return h.fake.wait_for(lambda: h.journal.by_id(msg_id), timeout)


def reply(h, msg, text="ok", seq=0):
    h.adapter.send(OutboundMessage(platform="qqbot", chat_id=msg.chat_id, text=text,
                                   in_reply_to=msg.message_id, reply_ref=msg.reply_ref, seq=seq))


def established_after(h, conn_id: int, timeout=RECONNECT_BUDGET_S):
    """Wait for a connection newer than `conn_id` to get READY or RESUMED; returns
    (its conn id, the first op the client sent on it other than a heartbeat, time it got ready).
    """
    def newer():
        for f in h.fake.frames:
            if (f.direction == "out" and f.conn_id > conn_id and isinstance(f.data, dict)
                    and f.data.get("t") in ("READY", "RESUMED")):
                return f
        return None
    frame = h.fake.wait_for(newer, timeout)
    assert h.adapter.ready.wait(1.0)
    first = next(op for op in h.fake.client_ops(frame.conn_id) if op != 1)
    return frame.conn_id, first, frame.at


def current_conn(h) -> int:
    """The one live connection (an old one the client just closed may take a moment to go)."""
    live = h.fake.wait_for(lambda: len(h.fake.live_conns()) == 1 and h.fake.live_conns(), 2)
    return live[0].id


def answer_once_each(h, msgs):
    for msg in msgs:
        reply(h, msg, f"answer to {msg.text}")


def assert_answered_exactly_once(h, msg_ids):
    pairs = Counter((r.msg_id, r.msg_seq) for r in h.fake.replies)
    assert all(n == 1 for n in pairs.values()), f"duplicate replies: {pairs}"
    per_msg = Counter(r.msg_id for r in h.fake.replies)
    assert {m: per_msg[m] for m in msg_ids} == {m: 1 for m in msg_ids}


# --- token -----------------------------------------------------------------------------------

def test_token_string_expiry_cached_then_renewed_early(make):
    now = [1000.0]
    h = make(run=False, fake_kw={"token_ttl_s": 100.0, "token_renew_window_s": 30.0},
             clock=lambda: now[0])
    raw = requests.post(h.fake.token_url, json={"appId": h.fake.app_id,
                                                "clientSecret": h.fake.client_secret}).json()
    assert raw["expires_in"] == "100"  # a string, as the platform sends it
    token = h.adapter.token
    first = token.get()
    assert h.fake.token_requests == 2
    now[0] += 79.0  # life 100 s: renewed min(50 s, 20 %) = 20 s before expiry, at 80 s
    assert token.get() == first and h.fake.token_requests == 2
    now[0] += 2.0
    token.get()
    assert h.fake.token_requests == 3


def test_token_renewal_window_yields_new_token_and_old_stays_valid(make):
    h = make(run=False, fake_kw={"token_ttl_s": 1.0, "token_renew_window_s": 0.5})
    first = h.adapter.token.get()
    h.fake.wait_for(lambda: h.fake.tokens[first] - time.monotonic() < 0.4, 2)
    h.adapter.token.invalidate()
    second = h.adapter.token.get()
    assert second != first
    assert h.fake.token_valid(f"QQBot {first}") and h.fake.token_valid(f"QQBot {second}")


def test_bad_credentials_are_fatal_without_reconnect_loop(make):
    h = make(cfg_kw={"client_secret": "wrong-secret"})
    err = h.greenlet.get(timeout=3)
    assert isinstance(err, FatalPlatformError)
    assert "invalid appid or secret" in str(err) and "wrong-secret" not in str(err)
    assert h.adapter.stats.state is State.FATAL
    assert h.fake.token_requests == 1 and h.fake.conns == {}


def test_bad_app_id_is_fatal(make):
    h = make(cfg_kw={"app_id": "999"})
    assert isinstance(h.greenlet.get(timeout=3), FatalPlatformError)
    assert h.fake.token_requests == 1


def test_token_endpoint_429_and_5xx_are_retried(make):
    h = make(run=False)
    h.fake.rest_429(2, retry_after=0.01)
    h.greenlet = gevent.spawn(run_until_stopped, h.adapter)
    ready(h)
    assert h.adapter.stats.reconnects["token_failed"] == 2


def test_rest_401_renews_token_once_and_retries(make):
    h = ready(make())
    msg_id = h.fake.send_user_message("hello")
    msg = delivered(h, msg_id)
    fetches = h.adapter.token.fetches
    h.fake.expire_tokens()  # the cached token is now refused with 401
    reply(h, msg, "answer")
    assert h.adapter.token.fetches == fetches + 1
    assert [r.msg_id for r in h.fake.replies] == [msg_id]
    statuses = [c["path"] for c in h.fake.rest_calls if c["path"].startswith("/v2/")]
    assert len(statuses) == 2  # the refused call and its one retry


def test_persistent_401_fails_after_one_renewal(make):
    h = ready(make())
    msg = delivered(h, h.fake.send_user_message("hello"))
    fetches = h.adapter.token.fetches
    h.fake.reject_tokens = True
    with pytest.raises(SendError) as info:
        reply(h, msg)
    assert info.value.retryable and h.adapter.token.fetches == fetches + 1
    assert h.fake.client_secret not in str(info.value)


# --- connect, heartbeat ------------------------------------------------------------------------

def test_identify_then_heartbeats_on_hello_timetable(make):
    h = ready(make())
    conn = current_conn(h)
    identify = h.fake.frames_in(conn)[0]
    assert identify["op"] == 2
    assert identify["d"]["token"].startswith("QQBot ") and identify["d"]["shard"] == [0, 1]
    assert identify["d"]["intents"] == 1 << 25
    h.fake.wait_for(lambda: len(h.fake.keepalive_times[conn]) >= 8, 5)
    lateness = h.fake.keepalive_lateness(conn)
    # The first beat is due one interval after Hello, not after some default: never late by a
    # whole interval (the typical beat is on its slot), and the strict fake never dropped us.
    assert max(lateness) < INTERVAL_MS / 1000, lateness
    assert sorted(lateness)[len(lateness) // 2] < 0.05, lateness
    assert [d.reason for d in h.fake.disconnects] == []
    beats = [f for f in h.fake.frames_in(conn) if f["op"] == 1]
    assert beats[-1]["d"] is None or isinstance(beats[-1]["d"], int)


def test_heartbeat_carries_last_seq(make):
    h = ready(make())
    conn = current_conn(h)
    delivered(h, h.fake.send_user_message("one"))
    seq = h.fake.current.seq
    h.fake.wait_for(lambda: any(f["op"] == 1 and f["d"] == seq for f in h.fake.frames_in(conn)))


def test_hello_interval_is_honoured_per_connection(make):
    h = ready(make())
    conn = current_conn(h)
    h.fake.heartbeat_interval_ms = 100
    h.fake.heartbeat_deadline_s = 0.4
    h.fake.drop()
    new_conn, _, _ = established_after(h, conn)
    h.fake.wait_for(lambda: len(h.fake.keepalive_times[new_conn]) >= 6, 3)
    assert h.adapter.heartbeat_interval_s == pytest.approx(0.1)
    times = h.fake.keepalive_times[new_conn]
    gaps = sorted(b - a for a, b in zip(times, times[1:]))
    assert abs(gaps[len(gaps) // 2] - 0.1) < 0.03, gaps  # beats at the new 100 ms cadence
    assert all(d.conn_id == conn for d in h.fake.disconnects)


def test_fake_drops_a_client_that_never_heartbeats():
    fake = FakeQQBotServer(heartbeat_interval_ms=INTERVAL_MS,
                           heartbeat_deadline_s=DEADLINE_S).start()
    try:
        ws = websocket.create_connection(fake.ws_url, timeout=3)
        assert json.loads(ws.recv())["op"] == 10
        opcode, data = ws.recv_data()
        assert opcode == websocket.ABNF.OPCODE_CLOSE
        assert int.from_bytes(data[:2], "big") == 4009
        assert fake.disconnects[0].reason == "keepalive_deadline"
    finally:
        fake.stop()


@pytest.mark.parametrize("frame, code", [
    ({"op": 2, "d": {"token": "QQBot nope", "intents": 1 << 25, "shard": [0, 1]}}, 4004),
    ({"op": 5}, 4001),
    ({"no": "op"}, 4002),
])
def test_fake_refuses_bad_identify_and_payloads(frame, code):
    fake = FakeQQBotServer(heartbeat_interval_ms=1000).start()
    try:
        ws = websocket.create_connection(fake.ws_url, timeout=3)
        ws.recv()
        ws.send(json.dumps(frame))
        opcode, data = ws.recv_data()
        assert opcode == websocket.ABNF.OPCODE_CLOSE and int.from_bytes(data[:2], "big") == code
    finally:
        fake.stop()


# --- the fake against the official clients' expectations ----------------------------------------

class BotpyLikeClient:
    """Speaks the gateway as botpy/gateway.py does where it matters here: on op 7 or op 9 it
    only takes note and waits for the SERVER to close the socket (it never closes itself)."""

    def __init__(self, fake: FakeQQBotServer) -> None:
        self.fake = fake
        answer = requests.post(fake.token_url, json={"appId": fake.app_id,
                                                     "clientSecret": fake.client_secret}, timeout=3)
        self.token = answer.json()["access_token"]
        self.ws = websocket.create_connection(fake.ws_url, timeout=3)
        self.hello = json.loads(self.ws.recv())

    def send(self, op: int, d) -> None:
        self.ws.send(json.dumps({"op": op, "d": d}))

    def identify(self) -> dict:
        self.send(2, {"token": f"QQBot {self.token}", "intents": 1 << 25, "shard": [0, 1]})
        return json.loads(self.ws.recv())

    def frames_until_closed(self) -> list[dict]:
        """Every frame until the server closes (a 3 s socket timeout fails the test)."""
        frames = []
        while True:
            opcode, data = self.ws.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                return frames
            frames.append(json.loads(data))


@pytest.fixture
def raw_fake():
    fake = FakeQQBotServer(heartbeat_interval_ms=1000, heartbeat_deadline_s=30.0).start()
    yield fake
    fake.stop()


def test_fake_hello_interval_is_an_integer_of_ms():
    # The fleet passes 1.0 s * 1000 = 1000.0; the real Hello carries an int (botgo's
    # WSHelloData.HeartbeatInterval is an int and would not decode 1000.0).
    fake = FakeQQBotServer(heartbeat_interval_ms=1000.0, heartbeat_deadline_s=30.0).start()
    try:
        interval = BotpyLikeClient(fake).hello["d"]["heartbeat_interval"]
        assert type(interval) is int and interval == 1000
    finally:
        fake.stop()


@pytest.mark.parametrize("op", [7, 9])
def test_fake_closes_the_socket_after_op7_and_op9(raw_fake, op):
    client = BotpyLikeClient(raw_fake)
    assert client.identify()["t"] == "READY"
    raw_fake.send_op7() if op == 7 else raw_fake.send_op9()
    assert [f["op"] for f in client.frames_until_closed()] == [op]
    assert [d.reason for d in raw_fake.disconnects] == [f"op{op}"]


def test_fake_answers_a_stale_resume_with_op9_and_closes(raw_fake):
    client = BotpyLikeClient(raw_fake)
    client.send(6, {"token": f"QQBot {client.token}", "session_id": "no-such-session", "seq": 0})
    assert [f["op"] for f in client.frames_until_closed()] == [9]


def test_fake_keeps_a_session_resumable_for_its_window_only(raw_fake):
    raw_fake.resume_window_s = 0.5
    first = BotpyLikeClient(raw_fake)
    session_id = first.identify()["d"]["session_id"]
    first.ws.close()
    kept = raw_fake.send_user_message("while away, inside the window")
    raw_fake.wait_for(lambda: raw_fake.disconnects)
    inside = BotpyLikeClient(raw_fake)
    inside.send(6, {"token": f"QQBot {inside.token}", "session_id": session_id, "seq": 1})
    replayed = [json.loads(inside.ws.recv()) for _ in range(2)]
    assert [(f.get("t"), (f.get("d") or {}).get("id")) for f in replayed] == [
        ("C2C_MESSAGE_CREATE", kept), ("RESUMED", None)]
    inside.ws.close()
    gone_at = raw_fake.wait_for(lambda: len(raw_fake.disconnects) == 2
                                and raw_fake.disconnects[-1].at)
    # The gap itself is the input here: the client stays away longer than the window.
    raw_fake.wait_for(lambda: time.monotonic() > gone_at + 0.6, timeout=3)
    lost = raw_fake.send_user_message("while away, past the window")
    late = BotpyLikeClient(raw_fake)
    late.send(6, {"token": f"QQBot {late.token}", "session_id": session_id, "seq": 2})
    assert [f["op"] for f in late.frames_until_closed()] == [9]
    assert [d["id"] for _, d in raw_fake.lost_events] == [lost]
    assert lost not in raw_fake.delivered_ids()


def test_fake_serves_users_me_with_a_numeric_bot_id(raw_fake):
    client = BotpyLikeClient(raw_fake)
    me = requests.get(raw_fake.http_base + "/users/@me", timeout=3,
                      headers={"Authorization": f"QQBot {client.token}"})
    assert me.status_code == 200 and int(me.json()["id"]) > 0  # botpy: int(data["id"])
    assert me.json()["id"] == client.identify()["d"]["user"]["id"]
    refused = requests.get(raw_fake.http_base + "/users/@me", timeout=3,
                           headers={"Authorization": "QQBot wrong"})
    assert refused.status_code == 401


# --- inbound -----------------------------------------------------------------------------------

def test_c2c_and_group_messages_are_delivered_and_answered(make):
    h = ready(make())
    dm_id = h.fake.send_user_message("hello bot", openid="u-1")
    group_id = h.fake.send_user_message("hello all", kind="group", group_openid="g-1",
                                        member_openid="m-1")
    dm, group = delivered(h, dm_id), delivered(h, group_id)
    assert (dm.chat_type, dm.chat_id, dm.user_id, dm.text) == ("dm", "u-1", "u-1", "hello bot")
    assert {k: v for k, v in dm.reply_ref.items() if k != "at"} == {"msg_id": dm_id, "kind": "c2c", "openid": "u-1"}
    assert abs(dm.reply_ref["at"] - time.time()) < 60  # receipt time: the passive window
    assert (group.chat_type, group.chat_id, group.user_id) == ("group", "g-1", "m-1")
    assert group.text == "hello all"  # the @-mention's leading space is gone
    assert {k: v for k, v in group.reply_ref.items() if k != "at"} == {"msg_id": group_id, "kind": "group", "openid": "g-1"}
    reply(h, dm, "hi user")
    reply(h, group, "hi group")
    got = {(r.msg_id, r.msg_seq, r.kind, r.openid, r.content) for r in h.fake.replies}
    assert got == {(dm_id, 1, "c2c", "u-1", "hi user"), (group_id, 1, "group", "g-1", "hi group")}
    posts = [c for c in h.fake.rest_calls if c["path"].startswith("/v2/")]
    assert all(c["headers"]["X-Union-Appid"] == h.fake.app_id for c in posts)


def test_attachments_become_typed_placeholders(make):
    h = ready(make())
    image = {"content_type": "image/png", "url": "https://multimedia.nt.qq.com/a",
             "filename": "cat.png", "width": 10, "height": 10}
    voice = {"content_type": "voice", "url": "https://multimedia.nt.qq.com/v"}
    mixed_id = h.fake.send_user_message("look", attachments=[image, voice, {"url": 5}, "junk"])
    file_id = h.fake.send_user_message("", kind="group", attachments=[
        {"content_type": "file", "url": "https://x/f", "filename": "report.pdf"}])
    mixed, doc = delivered(h, mixed_id), delivered(h, file_id)
    assert [(a.kind, a.ref, a.name) for a in mixed.attachments] == [
        ("image", image["url"], "cat.png"), ("voice", voice["url"], None)]
    assert mixed.text == "look" and turn_text([mixed]) == "look [image: cat.png] [voice]"
    assert doc.attachments[0].kind == "file" and turn_text([doc]) == "[file: report.pdf]"
    assert attachment_kind("video/mp4") == "video" and attachment_kind("") == "other"


def test_bad_frames_are_skipped_and_the_connection_stays(make):
    h = ready(make())
    conn = current_conn(h)
    h.fake.send_garbage("{not json")
    h.fake.send_garbage(b"\x00\xff binary garbage")
    h.fake.send_raw_frame(b'{"op": 0, "t": "\xff\xfe"}')  # invalid UTF-8 in a text frame
    h.fake.send_garbage("x" * (5 * 1024 * 1024))  # 5 MB
    h.fake.send_garbage(json.dumps([1, 2, 3]))
    h.fake.send_garbage(json.dumps({"op": 42, "d": {}}))
    h.fake.send_garbage(json.dumps({"op": "0"}))
    h.fake.dispatch("GUILD_CREATE", {"id": "g"})  # an event type we do not handle
    h.fake.dispatch("C2C_MESSAGE_CREATE", {"id": "x", "author": {}})  # no user openid
    h.fake.dispatch("C2C_MESSAGE_CREATE", "not a dict")
    h.fake.dispatch("GROUP_AT_MESSAGE_CREATE", {"id": "y", "group_openid": "g",
                                                "author": {"member_openid": "m"},
                                                "content": "   "})  # empty
    msg_id = h.fake.send_user_message("still alive")
    assert delivered(h, msg_id).text == "still alive"
    assert [m.message_id for m in h.journal.messages] == [msg_id]
    assert h.fake.live_conns()[0].id == conn and h.fake.disconnects == []
    assert h.adapter.stats.connects == 1


def test_allow_from_refuses_other_users(make):
    h = ready(make(cfg_kw={"allow_from": ["friend"]}))
    h.fake.send_user_message("spam", openid="stranger")
    friend_id = h.fake.send_user_message("hi", openid="friend")
    delivered(h, friend_id)
    assert [m.user_id for m in h.journal.messages] == ["friend"]


# --- replies -----------------------------------------------------------------------------------

def test_long_answer_parts_get_increasing_msg_seq_and_resend_is_idempotent(make):
    h = ready(make())
    msg = delivered(h, h.fake.send_user_message("tell me a long story"))
    for seq in range(5):
        reply(h, msg, f"part {seq}", seq=seq)
    assert [(r.msg_seq, r.content) for r in h.fake.replies] == [
        (n + 1, f"part {n}") for n in range(5)]
    # After a restart the outbox re-sends part 2: the same pair, recognized, not repeated.
    reply(h, msg, "part 2", seq=2)
    assert len(h.fake.replies) == 5
    assert [r.code for r in h.fake.rejected] == [CODE_DUPLICATE]
    with pytest.raises(SendError) as info:
        reply(h, msg, "part 5", seq=5)
    assert not info.value.retryable
    assert h.adapter.max_reply_parts() == 5 and h.adapter.reply_chunk_chars() == 2000


def test_fake_rejects_a_sixth_reply_and_unknown_msg_ids(make):
    h = ready(make(fake_kw={"max_replies_per_msg": 2}))
    msg = delivered(h, h.fake.send_user_message("hi"))
    reply(h, msg, "a", seq=0)
    reply(h, msg, "b", seq=1)
    with pytest.raises(SendError) as info:
        reply(h, msg, "c", seq=2)
    assert not info.value.retryable
    bogus = dict(msg.reply_ref, msg_id="ROBOT1.0_unknown")
    with pytest.raises(SendError):
        h.adapter.send(OutboundMessage(platform="qqbot", chat_id=msg.chat_id, text="x",
                                       reply_ref=bogus))
    with pytest.raises(SendError):  # no reply_ref: QQ has no unsolicited messages
        h.adapter.send(OutboundMessage(platform="qqbot", chat_id=msg.chat_id, text="x"))


def test_reply_window_is_enforced(make):
    h = ready(make(fake_kw={"reply_window_group_s": 0.0}))
    msg = delivered(h, h.fake.send_user_message("hi", kind="group"))
    with pytest.raises(SendError) as info:
        reply(h, msg)
    assert not info.value.retryable and h.fake.replies == []


def test_send_errors_are_classified(make):
    h = ready(make())
    msg = delivered(h, h.fake.send_user_message("hi"))
    h.fake.rest_429(1, retry_after=0.7)
    with pytest.raises(SendError) as info:
        reply(h, msg)
    assert info.value.retryable and info.value.retry_after == pytest.approx(0.7)
    h.fake.fail_replies(1, status=500)
    with pytest.raises(SendError) as info:
        reply(h, msg)
    assert info.value.retryable and info.value.retry_after is None
    h.fake.fail_replies(1, status=403)
    with pytest.raises(SendError) as info:
        reply(h, msg)
    assert not info.value.retryable
    reply(h, msg)  # the retry the outbox would make
    assert [(r.msg_id, r.msg_seq) for r in h.fake.replies] == [(msg.message_id, 1)]


def test_slow_rest_does_not_delay_heartbeats(make):
    h = ready(make())
    conn = current_conn(h)
    msg = delivered(h, h.fake.send_user_message("hi"))
    h.fake.rest_delay_s = 0.8  # longer than the 0.3 s keepalive deadline
    beats_before = len(h.fake.keepalive_times[conn])
    reply(h, msg)
    assert len(h.fake.keepalive_times[conn]) >= beats_before + 3
    assert h.fake.disconnects == [] and len(h.fake.replies) == 1


def test_slow_rest_on_connect_still_connects(make):
    h = make(run=False)
    h.fake.rest_delay_s = 0.3
    h.greenlet = gevent.spawn(run_until_stopped, h.adapter)
    ready(h)
    assert h.fake.disconnects == []


# --- faults and recovery -----------------------------------------------------------------------

def _fault_then_resume(h, inject, name):
    """Inject a fault while a message is on its way; the adapter must resume (op 6) within the
    budget, receive the missed message once and answer it once."""
    conn = current_conn(h)
    before = delivered(h, h.fake.send_user_message("before"))
    reply(h, before)
    t0 = time.monotonic()
    inject()
    missed_id = h.fake.send_user_message("sent while we were away")
    new_conn, first_op, at = established_after(h, conn)
    MEASURED[name] = at - t0
    assert first_op == 6, f"expected a resume after {name}, got op {first_op}"
    assert at - t0 < RECONNECT_BUDGET_S
    missed = delivered(h, missed_id)
    reply(h, missed)
    assert_answered_exactly_once(h, [before.message_id, missed_id])
    assert Counter(m.message_id for m in h.journal.messages) == Counter(
        {before.message_id: 1, missed_id: 1})
    return new_conn


def test_drop_resumes_and_replays_missed_event(make):
    h = ready(make())
    _fault_then_resume(h, h.fake.drop, "drop")
    assert h.adapter.stats.reconnects["closed"] + h.adapter.stats.reconnects["read_failed"] == 1


def test_op7_reconnects_and_resumes_at_once(make):
    h = ready(make())
    conn = current_conn(h)
    _fault_then_resume(h, h.fake.send_op7, "op7")
    # The server closed right behind op 7; the adapter acted on the op, not on the close.
    assert [d.reason for d in h.fake.disconnects] == ["op7"]
    assert h.adapter.stats.reconnects["server_reconnect"] == 1


@pytest.mark.parametrize("code", [4008, 4009, 1000, 1001, 4999])
def test_resume_close_codes(make, code):
    h = ready(make())
    _fault_then_resume(h, lambda: h.fake.close_with(code), f"close_{code}")


def test_zombie_server_is_detected_and_resumed(make):
    # The deadline is long here so that the fake does not close first: only our own zombie
    # detection (two unanswered beats) can end this connection.
    h = ready(make(fake_kw={"heartbeat_deadline_s": 30.0}, handshake_timeout_s=0.5))
    conn = current_conn(h)
    before = delivered(h, h.fake.send_user_message("before"))
    h.fake.go_silent(0.7)
    t_silent = time.monotonic()
    missed_id = h.fake.send_user_message("sent into the void")  # not sent: kept for replay
    new_conn, first_op, at = established_after(h, conn, timeout=4)
    MEASURED["zombie (from the end of the silence)"] = at - (t_silent + 0.7)
    assert first_op == 6 and h.adapter.stats.reconnects["zombie"] == 1
    assert at - (t_silent + 0.7) < RECONNECT_BUDGET_S
    delivered(h, missed_id)
    assert [m.message_id for m in h.journal.messages] == [before.message_id, missed_id]


def test_op9_discards_session_and_identifies_fresh(make):
    h = ready(make())
    conn = current_conn(h)
    old_session = h.adapter.session_id
    t0 = time.monotonic()
    h.fake.send_op9()
    new_conn, first_op, at = established_after(h, conn)
    MEASURED["op9"] = at - t0
    assert first_op == 2 and h.adapter.session_id not in (None, old_session)
    assert [d.reason for d in h.fake.disconnects] == ["op9"]  # the server closed behind it
    assert h.adapter.stats.reconnects["invalid_session"] == 1
    msg_id = h.fake.send_user_message("after op9")
    reply(h, delivered(h, msg_id))
    assert_answered_exactly_once(h, [msg_id])


@pytest.mark.parametrize("code", [4006, 4007, 4900, 4913, 4001])
def test_reidentify_close_codes(make, code):
    h = ready(make())
    conn = current_conn(h)
    t0 = time.monotonic()
    h.fake.close_with(code)
    new_conn, first_op, at = established_after(h, conn)
    MEASURED[f"close_{code}"] = at - t0
    assert first_op == 2 and at - t0 < RECONNECT_BUDGET_S


def test_4004_renews_token_and_identifies(make):
    h = ready(make())
    conn = current_conn(h)
    old_token = h.fake.frames_in(conn)[0]["d"]["token"]
    h.fake.expire_tokens()
    t0 = time.monotonic()
    h.fake.close_with(4004)
    new_conn, first_op, at = established_after(h, conn)
    MEASURED["close_4004"] = at - t0
    new_identify = next(f for f in h.fake.frames_in(new_conn) if f["op"] == 2)
    assert first_op == 2 and new_identify["d"]["token"] != old_token


def test_identify_with_expired_token_is_closed_4004_and_recovers(make):
    # The adapter holds a token it believes valid; the fake expires it between the gateway call
    # and identify, so the fake closes with 4004 and the adapter renews and identifies again.
    h = make(run=False)
    h.adapter.token.get()
    original = h.fake._gateway

    def gateway_then_expire(request):
        answer = original(request)
        if h.fake.token_requests == 1:
            h.fake.expire_tokens()
        return answer
    h.fake._gateway = gateway_then_expire
    h.greenlet = gevent.spawn(run_until_stopped, h.adapter)
    ready(h)
    assert [e for _, e, _ in h.fake.events if e == "identify_bad_token"] == ["identify_bad_token"]
    assert h.adapter.stats.reconnects["close_4004"] == 1


def test_resume_of_an_expired_session_gets_op9_then_identifies(make):
    h = ready(make())
    conn = current_conn(h)
    h.fake.invalidate_sessions()  # the server forgot us while we were away
    h.fake.drop()
    new_conn, first_op, _ = established_after(h, conn)
    assert first_op == 2
    ops = [op for op in h.fake.client_ops() if op != 1]
    assert ops[-2:] == [6, 2]  # resume refused with op 9, then a fresh identify
    assert h.adapter.stats.reconnects["invalid_session"] == 1


@pytest.mark.parametrize("code", [4010, 4011, 4012, 4013, 4014, 4914, 4915])
def test_fatal_close_codes_stop_without_reconnect(make, code):
    h = ready(make())
    h.fake.close_with(code)
    err = h.greenlet.get(timeout=3)
    assert isinstance(err, FatalPlatformError) and str(code) in str(err)
    assert h.adapter.stats.state is State.FATAL and len(h.fake.conns) == 1


def test_intents_without_permission_are_fatal(make):
    h = make(fake_kw={"allowed_intents": 1 << 25}, cfg_kw={"intents": (1 << 25) | (1 << 30)})
    assert isinstance(h.greenlet.get(timeout=3), FatalPlatformError)
    assert len(h.fake.conns) == 1


def test_server_that_never_says_hello_is_left(make):
    h = make(run=False, handshake_timeout_s=0.3, fake_kw={"heartbeat_deadline_s": 30.0})
    h.fake.go_silent(0.5)
    h.greenlet = gevent.spawn(run_until_stopped, h.adapter)
    ready(h, timeout=3)
    assert h.adapter.stats.reconnects["session_timeout"] >= 1


def test_failed_journal_write_is_replayed_by_resume(make):
    h = ready(make(journal=Journal(fail_first=1)))
    conn = current_conn(h)
    msg_id = h.fake.send_user_message("keep me")
    _, first_op, _ = established_after(h, conn)
    assert first_op == 6
    delivered(h, msg_id)
    assert h.adapter.stats.reconnects["journal_failed"] == 1


def test_no_message_lost_or_answered_twice_through_many_faults(make):
    """Messages keep arriving while the connection is dropped, told to reconnect, closed with
    resume codes, fed garbage; the 'gateway' answers each journaled message once (and the
    outbox re-sends some answers, as after a restart). Asserted from the fake's records."""
    h = ready(make())
    answered: set[str] = set()
    sent: list[str] = []
    faults = [(h.fake.drop, True), (h.fake.send_op7, True),
              (lambda: h.fake.close_with(4008), True),
              (lambda: h.fake.send_garbage("\x00garbage"), False),
              (lambda: h.fake.close_with(4009), True), (h.fake.drop, True)]
    for i, (fault, reconnects) in enumerate(faults):
        conn = current_conn(h)
        sent.append(h.fake.send_user_message(f"m{i}a"))
        fault()
        sent.append(h.fake.send_user_message(f"m{i}b", kind="group"))
        if reconnects:
            established_after(h, conn)
        h.fake.wait_for(lambda: set(sent) <= h.journal.seen, 3)
        for msg in h.journal.messages:
            if msg.message_id not in answered:
                reply(h, msg, "answer")
                answered.add(msg.message_id)
        reply(h, h.journal.messages[0], "answer")  # an outbox re-send of an old reply
    assert set(sent) == h.journal.seen and len(h.journal.messages) == len(sent)
    assert_answered_exactly_once(h, sent)
    wire = Counter(h.fake.delivered_ids())
    assert set(wire) == set(sent)  # each went out at least once; replays are de-duplicated
    # Replays the client had not seen are not duplicates; the rest were recognized.
    assert h.journal.duplicates <= sum(wire.values()) - len(sent)
    assert {r.code for r in h.fake.rejected} == {CODE_DUPLICATE}


def test_no_secret_or_token_in_logs(make, caplog):
    caplog.set_level(logging.DEBUG)
    h = ready(make())
    conn = current_conn(h)
    msg = delivered(h, h.fake.send_user_message("hi"))
    h.fake.expire_tokens()
    reply(h, msg)  # 401, renewal, retry
    h.fake.close_with(4004)
    established_after(h, conn)
    h.fake.fail_replies(1, status=401)
    reply(h, msg, "again", seq=1)
    assert len(h.fake.tokens) == 2 and caplog.records  # the 4004 refetch got the same one
    for secret in [h.fake.client_secret, *h.fake.tokens]:
        assert secret not in caplog.text


def test_check_performs_the_auth_step(make):
    h = make(run=False)
    assert "credentials accepted" in QQBotAdapter.check(h.adapter.config)
    bad = h.adapter.config.model_copy(update={"client_secret": SecretStr("nope")})
    with pytest.raises(FatalPlatformError):
        QQBotAdapter.check(bad)


# --- lifecycle ---------------------------------------------------------------------------------

def test_stop_while_connecting_returns_promptly(make):
    h = make(run=False)
    h.fake.rest_delay_s = 0.5
    h.greenlet = gevent.spawn(run_until_stopped, h.adapter)
    h.fake.wait_for(lambda: h.fake.rest_calls, 2)
    h.adapter.stop()
    h.greenlet.join(timeout=3)
    assert h.greenlet.dead and h.greenlet.value is None
    assert h.fake.live_conns() == [] and h.adapter.stats.state is State.STOPPED


def test_stop_when_ready_closes_and_does_not_reconnect(make):
    h = ready(make())
    h.adapter.stop()
    h.greenlet.join(timeout=3)
    assert h.greenlet.dead and h.greenlet.value is None
    h.fake.wait_for(lambda: not h.fake.live_conns(), 2)
    assert len(h.fake.conns) == 1
    h.adapter.stop()  # a second stop is a no-op




def test_stop_leaves_without_a_close_frame_so_the_session_stays_resumable(make, monkeypatch):
    # Discord-style gateways end a session on a 1000/1001 close but keep it after a cut.
    close_frames = []
    send_close = websocket.WebSocket.send_close
    monkeypatch.setattr(websocket.WebSocket, "send_close",
                        lambda ws, *a, **kw: close_frames.append(a) or send_close(ws, *a, **kw))
    h = ready(make())
    conn = h.fake.conns[current_conn(h)]
    h.adapter.stop()
    h.greenlet.join(timeout=3)
    h.fake.wait_for(lambda: conn.closed.is_set(), 2)
    assert close_frames == [] and [d.reason for d in h.fake.disconnects] == ["client_closed"]


# --- restarts: the session and seq are saved and resumed -------------------------------------

def _restarted(h, journal=None) -> SimpleNamespace:
    """A new adapter on the same config and saved state, as after a gateway restart."""
    adapter = QQBotAdapter(h.adapter.config, journal or h.journal, handshake_timeout_s=1.0)
    adapter.saved_state = h.adapter.saved_state
    return SimpleNamespace(fake=h.fake, adapter=adapter, journal=journal or h.journal,
                           greenlet=gevent.spawn(run_until_stopped, adapter))


def _stop(h) -> None:
    h.adapter.stop()
    h.greenlet.join(timeout=5)
    assert h.greenlet.dead


def test_a_restarted_adapter_resumes_the_saved_session_and_gets_what_came_meanwhile(make):
    h = ready(make())
    before = delivered(h, h.fake.send_user_message("before the restart"))
    _stop(h)
    away = [h.fake.send_user_message(f"while down {i}", openid=f"u{i}") for i in range(3)]
    h2 = _restarted(h)
    try:
        ready(h2)
        conn = h.fake.conn_ids()[-1]
        assert next(op for op in h.fake.client_ops(conn) if op != 1) == 6
        for msg_id in away:
            delivered(h2, msg_id)
        # resumed from the saved seq: nothing before it came again
        assert [m.message_id for m in h.journal.messages] == [before.message_id, *away]
        assert h.journal.duplicates == 0 and h.fake.delivered_ids().count(before.message_id) == 1
    finally:
        _stop(h2)


def test_a_saved_session_past_the_window_gets_op9_and_a_fresh_identify(make):
    h = ready(make(fake_kw={"resume_window_s": 0.3}))
    old_session = h.adapter.session_id
    _stop(h)
    gone_at = h.fake.wait_for(lambda: h.fake.disconnects and h.fake.disconnects[-1].at)
    h.fake.wait_for(lambda: time.monotonic() > gone_at + 0.4, 3)  # down longer than the window
    lost = h.fake.send_user_message("sent while down too long")
    h2 = _restarted(h)
    try:
        ready(h2)
        assert [op for op in h.fake.client_ops() if op != 1][-2:] == [6, 2]
        assert h2.adapter.session_id not in (None, old_session)
        saved = json.loads(h2.adapter.saved_state.get("session"))
        assert saved["session_id"] == h2.adapter.session_id
        # Honest about the gap: the platform cannot replay it and the adapter never saw it.
        assert [d["id"] for _, d in h.fake.lost_events] == [lost]
        assert h.journal.by_id(lost) is None
    finally:
        _stop(h2)


def test_the_seq_is_saved_only_once_the_journal_took_the_message(make):
    h = make(run=False)
    saved_when_journaled: list = []

    class Recording(Journal):
        def __call__(self, msg) -> bool:
            raw = h.adapter.saved_state.get("session")
            saved_when_journaled.append(json.loads(raw)["seq"] if raw else None)
            return super().__call__(msg)

    h.journal = Recording(fail_first=1)  # the first try fails: that event must not be saved
    h.adapter = QQBotAdapter(h.adapter.config, h.journal, handshake_timeout_s=1.0)
    h.greenlet = gevent.spawn(run_until_stopped, h.adapter)
    ready(h)
    ids = [h.fake.send_user_message(f"m{i}") for i in range(3)]
    h.fake.wait_for(lambda: set(ids) <= h.journal.seen)
    seqs = {f["d"]["id"]: f["s"] for f in h.fake.out_events() if f["t"] == EVENT_C2C}
    final = h.fake.wait_for(lambda: json.loads(h.adapter.saved_state.get("session"))["seq"]
                            == h.fake.current.seq)
    assert final
    # each message was handed up while the saved seq was still below its own
    assert len(saved_when_journaled) == 4  # the failed try, then its replay, then two more
    for saved, msg_id in zip(saved_when_journaled, [ids[0], ids[0], ids[1], ids[2]]):
        assert saved is None or saved < seqs[msg_id]


def test_an_unreadable_saved_session_means_a_fresh_identify(make):
    h = make(run=False)
    h.adapter.saved_state.put("session", "{not json")
    h.greenlet = gevent.spawn(run_until_stopped, h.adapter)
    ready(h)
    assert next(op for op in h.fake.client_ops(current_conn(h)) if op != 1) == 2


def test_messages_sent_during_a_sigterm_restart_of_a_real_gateway_are_answered_once_each(tmp_path):
    """A real gateway process on a real SQLite file, stopped with SIGTERM; three users write
    while it is down; the next process resumes the saved session and answers each message
    once (asserted from the fake's records)."""
    import signal
    import sys

    from hermes_green.testing.fleet import FakeFleet
    from tests.support import BIN, Process, write_config

    fleet = FakeFleet(platforms=("qqbot",), llm_chunk_delay_s=0.0).start()
    fake = fleet.fakes["qqbot"]
    cfg = write_config(tmp_path / "config.yaml", {
        "gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False},
                    "drain_timeout_s": 10},
        "agent": fleet.agent_config(), "platforms": fleet.platforms_config()})
    procs = []

    def start() -> Process:
        procs.append(Process([sys.executable, BIN, "--config", str(cfg)]))
        return procs[-1]

    try:
        first = start()
        before = fleet.send("qqbot", "before the restart", chat=9)
        fleet.wait_for(lambda: fleet.answers("qqbot", before), timeout=30)
        first.signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0, first.stderr[-2000:]
        conns_before = len(fake.conns)
        away = [fleet.send("qqbot", f"written while the gateway was down {i}", chat=i)
                for i in range(3)]
        start()
        fleet.wait_for(lambda: all(fleet.answers("qqbot", m) for m in away), timeout=30,
                       what=lambda: fleet.summary("qqbot"))
        resumed_on = fake.conn_ids()[conns_before]
        assert next(op for op in fake.client_ops(resumed_on) if op != 1) == 6
        for i, mid in enumerate(away):
            answers = fleet.answers("qqbot", mid)
            assert len(answers) == 1, answers
            assert answers[0].startswith(f"You said: written while the gateway was down {i}.")
        assert len(fleet.answers("qqbot", before)) == 1
        assert Counter((r.msg_id, r.msg_seq) for r in fake.replies).most_common(1)[0][1] == 1
        assert fake.rejected == [] and fake.lost_events == []
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.signal(signal.SIGTERM)
                p.wait(timeout=30)
        fleet.stop()
