"""DingTalk stream adapter against the strict fake (hermes_green/testing/fake_dingtalk.py).

Timing: the fake pings every 0.2 s and drops a client that leaves a ping unanswered for 0.5 s;
the adapter pings every 0.2 s; backoff starts at 0.05 s. Every wait is on a condition; "nothing
happened" checks observe a fixed window only to prove a negative.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter

import gevent
import pytest
import websocket
from pydantic import SecretStr

from hermes_green.testing.journal import Journal, run_until_stopped
from hermes_green.config import BackoffConfig
from hermes_green.models import OutboundMessage
from hermes_green.platforms.base import FatalPlatformError, SendError, State
from hermes_green.platforms.dingtalk import (BOT_TOPIC, REPLY_CHUNK_CHARS, DingTalkAdapter,
                                             DingTalkConfig, markdown_title)
from hermes_green.replies import split_reply
from hermes_green.testing.fake_dingtalk import (THROTTLE_CODE, WEBHOOK_GONE, WEBHOOK_TOO_LARGE,
                                                FakeDingTalkServer)
from tests.support import AdapterRuns, print_reconnect_times, ready

PING_S = 0.2
RECONNECT_BUDGET_S = 2.0
MEASURED: dict[str, float] = {}  # fault -> seconds from the fault to a new session


@pytest.fixture(scope="module", autouse=True)
def report_reconnect_times():
    """Prints what the fault tests measured (visible with -s)."""
    yield from print_reconnect_times(MEASURED)






@pytest.fixture
def make():
    runs = AdapterRuns()

    def _make(*, fake_kw=None, cfg_kw=None, run=True, journal=None, fake=None, **adapter_kw):
        if fake is None:
            args = dict(server_ping_interval_s=PING_S, ping_deadline_s=0.5,
                        disconnect_grace_s=10.0, event_ack_timeout_s=0.3)
            args.update(fake_kw or {})
            fake = FakeDingTalkServer(**args).start()
        cfg = dict(client_id=fake.client_id, client_secret=fake.client_secret,
                   api_base=fake.http_base, oapi_base=fake.http_base, ping_interval_s=PING_S,
                   server_silence_s=5.0,
                   backoff=BackoffConfig(initial_s=0.05, max_s=0.3, healthy_after_s=0.5))
        cfg.update(cfg_kw or {})
        journal = journal if journal is not None else Journal()
        adapter = DingTalkAdapter(DingTalkConfig(**cfg), journal, **adapter_kw)
        return runs.start(fake, adapter, journal, run=run)

    yield _make
    runs.stop_all()



def delivered(h, msg_id: str, timeout=3.0):
    return h.fake.wait_for(lambda: h.journal.by_id(msg_id), timeout)


def answer(msg, text="ok", seq=0) -> OutboundMessage:
    return OutboundMessage(platform="dingtalk", chat_id=msg.chat_id, text=text,
                           in_reply_to=msg.message_id, reply_ref=msg.reply_ref, seq=seq)


def current_conn(h) -> int:
    live = h.fake.wait_for(lambda: [c for c in h.fake.live_conns()
                                    if not c.state.get("going_away")], 2)
    return live[-1].id


def reconnected_after(h, conn_id: int, t0: float, name: str) -> int:
    """Wait for a connection newer than `conn_id` and the adapter ready on it; records the
    seconds from `t0` (the fault) to its opening."""
    new = h.fake.wait_for(lambda: [c for c in h.fake.live_conns() if c.id > conn_id],
                          RECONNECT_BUDGET_S)
    assert h.adapter.ready.wait(1.0)
    MEASURED[name] = new[0].opened_at - t0
    return new[0].id


# --- connect ---------------------------------------------------------------------------------

def test_connects_with_a_fresh_ticket_subscribed_to_bot_messages(make):
    h = ready(make())
    (req,) = h.fake.open_requests
    assert req["clientId"] == h.fake.client_id and req["ua"].startswith("hermes-green/")
    assert req["subscriptions"] == [{"type": "CALLBACK", "topic": BOT_TOPIC}]
    assert h.adapter.stats.state is State.READY and h.adapter.stats.connects == 1
    conn = current_conn(h)
    h.fake.drop()
    reconnected_after(h, conn, time.monotonic(), "drop")
    assert len(h.fake.open_requests) == 2  # each connection asks for its own ticket
    assert h.fake.handshake_rejections == []


def test_server_pings_are_answered_with_their_opaque_and_our_pings_keep_time(make):
    h = ready(make())
    conn = current_conn(h)
    h.fake.wait_for(lambda: sum(p.answered_at is not None for p in h.fake.pings) >= 5, 5)
    h.fake.wait_for(lambda: len(h.fake.keepalive_times[conn]) >= 5, 5)
    assert h.fake.protocol_errors == [] and h.fake.disconnects == []
    answered = [p for p in h.fake.pings if p.answered_at is not None]
    assert max(p.answered_at - p.sent_at for p in answered) < 0.2
    lateness = h.fake.keepalive_lateness(conn, PING_S)
    assert max(lateness) < PING_S, lateness
    assert h.adapter.stats.last_rtt_s is not None


# --- messages --------------------------------------------------------------------------------

def test_single_chat_message_is_journaled_then_acked(make):
    h = ready(make(journal=Journal(delay_s=0.1)))
    mid = h.fake.send_user_message("hello bot", staff_id="alice")
    msg = delivered(h, mid)
    assert (msg.platform, msg.chat_type, msg.user_id, msg.text) == \
        ("dingtalk", "dm", "alice", "hello bot")
    assert msg.chat_id == h.fake.messages[mid].conversation_id
    assert msg.reply_ref["staff_id"] == "alice" and msg.reply_ref["conversation_type"] == "1"
    (push,) = h.fake.wait_for(lambda: h.fake.acks_of(mid))
    assert push.ack_code == 200 and push.ack_data == {"response": None}
    assert push.acked_at >= h.journal.at[mid]  # the ack follows the journal
    assert h.fake.protocol_errors == []


def test_group_message_at_the_bot_is_delivered_and_one_without_the_mention_is_not(make):
    h = ready(make())
    mid = h.fake.send_user_message("what time is it", conversation_type="2",
                                   conversation_id="cid-team", staff_id="bob")
    msg = delivered(h, mid)
    assert (msg.chat_type, msg.chat_id, msg.user_id, msg.text) == \
        ("group", "cid-team", "bob", "what time is it")  # the mention's space is gone
    unmentioned = h.fake.send_user_message("chatter", conversation_type="2", in_at_list=False)
    h.fake.wait_for(lambda: h.fake.acks_of(unmentioned))
    assert h.journal.by_id(unmentioned) is None


def test_reply_goes_through_the_session_webhook_as_markdown(make):
    h = ready(make())
    msg = delivered(h, h.fake.send_user_message("hi"))
    h.adapter.send(answer(msg, "## Hello\nnice to *meet* you"))
    (reply,) = h.fake.replies_to(msg.message_id)
    assert (reply.via, reply.text, reply.title) == ("webhook", "## Hello\nnice to *meet* you",
                                                    "Hello")
    assert h.fake.issued_tokens == []  # no OpenAPI needed while the webhook lives


def test_long_reply_is_split_into_parts_that_fit_the_size_limit(make):
    h = ready(make())
    msg = delivered(h, h.fake.send_user_message("tell me a long story"))
    story = "\n\n".join(f"段落 {i}: " + "长" * 900 + " 😀" * 50 for i in range(12))
    parts = split_reply(story, h.adapter.reply_chunk_chars(), h.adapter.max_reply_parts())
    assert len(parts) > 3
    for i, part in enumerate(parts):
        h.adapter.send(answer(msg, part, seq=i))
    replies = h.fake.replies_to(msg.message_id)
    assert [r.text for r in replies] == parts and all(r.via == "webhook" for r in replies)
    # The fake enforces the 20,000-byte body: an unsplit answer is refused, not delivered.
    with pytest.raises(SendError) as err:
        h.adapter.send(answer(msg, story))
    assert not err.value.retryable and ("webhook", WEBHOOK_TOO_LARGE) in h.fake.refusals
    assert len(("\x01" * REPLY_CHUNK_CHARS).encode()) * 6 < 20000  # worst JSON escape fits


def test_a_reply_after_the_session_webhook_expired_arrives_through_the_openapi(make):
    later = [0.0]
    h = ready(make(wall_clock=lambda: time.time() + later[0]))
    single = delivered(h, h.fake.send_user_message("slow question", staff_id="carol"))
    group = delivered(h, h.fake.send_user_message("slow too", conversation_type="2",
                                                  conversation_id="cid-ops"))
    later[0] = 2 * 3600  # the agent took two hours: both webhooks are past their expiry
    h.fake.advance_time(2 * 3600)
    h.adapter.send(answer(single, "late answer"))
    h.adapter.send(answer(group, "late group answer"))
    (r1,) = h.fake.replies_to(single.message_id)
    (r2,) = h.fake.replies_to(group.message_id)
    assert (r1.via, r1.text, r2.via, r2.text) == ("openapi", "late answer", "openapi",
                                                  "late group answer")
    assert not any(what == "webhook" for what, _ in h.fake.refusals)  # never tried it
    assert len(h.fake.issued_tokens) == 1  # one token, cached for both


def test_a_webhook_the_server_already_forgot_falls_back_to_the_openapi(make):
    h = ready(make())
    msg = delivered(h, h.fake.send_user_message("hi", staff_id="dave"))
    h.fake.expire_webhooks()  # our clock still says valid; the server says 300001
    h.adapter.send(answer(msg, "still here"))
    (reply,) = h.fake.replies_to(msg.message_id)
    assert reply.via == "openapi" and ("webhook", WEBHOOK_GONE) in h.fake.refusals


def test_openapi_token_is_cached_and_renewed_once_when_refused(make):
    h = ready(make())
    msg = delivered(h, h.fake.send_user_message("hi", staff_id="erin"))
    h.fake.expire_webhooks()
    h.adapter.send(answer(msg, "one"))
    h.fake.expire_tokens()
    h.adapter.send(answer(msg, "two", seq=1))
    assert [r.text for r in h.fake.replies_to(msg.message_id)] == ["one", "two"]
    assert len(h.fake.issued_tokens) == 2
    assert ("openapi", "InvalidAuthentication") in h.fake.refusals


def test_openapi_throttling_is_a_retryable_send_error(make):
    h = ready(make())
    msg = delivered(h, h.fake.send_user_message("hi"))
    h.fake.expire_webhooks()
    h.fake.throttle(1)
    with pytest.raises(SendError) as err:
        h.adapter.send(answer(msg, "x"))
    assert err.value.retryable and ("openapi", THROTTLE_CODE) in h.fake.refusals
    h.adapter.send(answer(msg, "x"))
    assert [r.text for r in h.fake.replies_to(msg.message_id)] == ["x"]


def test_allow_from_refuses_other_users_but_acks_them(make):
    h = ready(make(cfg_kw={"allow_from": ["staff-ok"]}))
    bad = h.fake.send_user_message("let me in", staff_id="mallory")
    good = h.fake.send_user_message("hello", staff_id="staff-ok")
    delivered(h, good)
    h.fake.wait_for(lambda: h.fake.acks_of(bad))
    assert h.journal.by_id(bad) is None and [m.message_id for m in h.journal.messages] == [good]


def test_a_webhook_over_its_rate_limit_hands_the_rest_to_the_openapi(make):
    h = ready(make(fake_kw={"webhook_rate_per_min": 2}))
    msg = delivered(h, h.fake.send_user_message("many parts please", staff_id="fay"))
    for i in range(3):
        h.adapter.send(answer(msg, f"part {i}", seq=i))
    replies = h.fake.replies_to(msg.message_id)
    assert [(r.text, r.via) for r in replies] == [("part 0", "webhook"), ("part 1", "webhook"),
                                                  ("part 2", "openapi")]
    assert ("webhook", 130101) in h.fake.refusals


def test_events_that_come_anyway_are_answered_each_time_they_come(make):
    h = ready(make(fake_kw={"duplicate_events": True}))
    h.fake.send_event(force=True)
    h.fake.wait_for(lambda: len([p for p in h.fake.pushes if p.kind == "EVENT"
                                 and p.acked_at]) == 2)
    assert all(p.ack_data == {"status": "SUCCESS", "message": "ignored"}
               for p in h.fake.pushes if p.kind == "EVENT")
    assert h.journal.messages == [] and h.fake.protocol_errors == []


# --- bad input ---------------------------------------------------------------------------------

def test_garbage_is_skipped_acks_are_still_sent_and_the_connection_stays(make):
    h = ready(make())
    f = h.fake
    conn = f.conns[current_conn(h)]

    def frame(kind, topic, data, mid):
        return {"specVersion": "1.0", "type": kind, "data": data,
                "headers": {"messageId": mid, "topic": topic, "contentType": "application/json"}}

    f.send_garbage("{not json")
    f.send_garbage(b"\x00\x01binary")
    f.send_garbage("x" * (h.adapter.max_frame_bytes + 10))
    f.push_raw(json.dumps([1, 2, 3]), conn)
    f.push_raw(json.dumps({"type": "CALLBACK"}), conn)  # no headers, no messageId
    cases = {
        "m-unknown-type": (frame("SURPRISE", "x", "{}", "m-unknown-type"), 404),
        "m-unknown-topic": (frame("CALLBACK", "/v1.0/card/instances/callback", "{}",
                                  "m-unknown-topic"), 404),
        "m-bad-data": (frame("CALLBACK", BOT_TOPIC, "{oops", "m-bad-data"), 400),
        "m-data-not-str": (frame("CALLBACK", BOT_TOPIC, {"msgId": "x"}, "m-data-not-str"), 400),
        "m-no-text": (frame("CALLBACK", BOT_TOPIC, json.dumps(
            {"msgId": "x1", "conversationId": "c", "conversationType": "1",
             "senderStaffId": "s", "msgtype": "text", "text": {"content": "   "}}),
            "m-no-text"), 200),
        "m-unknown-msgtype": (frame("CALLBACK", BOT_TOPIC, json.dumps(
            {"msgId": "x2", "conversationId": "c", "conversationType": "1",
             "senderStaffId": "s", "msgtype": "unknownMsgType",
             "content": {"unknownMsgType": "?"}}), "m-unknown-msgtype"), 200),
        "m-bad-conv-type": (frame("CALLBACK", BOT_TOPIC, json.dumps(
            {"msgId": "x3", "conversationId": "c", "conversationType": "9",
             "senderStaffId": "s", "msgtype": "text", "text": {"content": "hi"}}),
            "m-bad-conv-type"), 200),
        "m-sys-unknown": (frame("SYSTEM", "KEEPALIVE", "{}", "m-sys-unknown"), 200),
    }
    answers = {}
    for mid, (fr, _) in cases.items():
        f.push_raw(fr, conn)
    f.wait_for(lambda: all(any(isinstance(x, dict) and x.get("headers", {}).get("messageId")
                               == mid for x in f.frames_in()) for mid in cases))
    for x in f.frames_in():
        if isinstance(x, dict) and x.get("headers", {}).get("messageId") in cases:
            answers[x["headers"]["messageId"]] = x["code"]
    assert answers == {mid: code for mid, (_, code) in cases.items()}
    ev = f.send_event(force=True)  # not subscribed, came anyway: answered SUCCESS, not again
    f.wait_for(lambda: any(p.message_id == ev and p.acked_at for p in f.pushes))
    (push,) = [p for p in f.pushes if p.kind == "EVENT"]
    assert push.ack_data["status"] == "SUCCESS"
    good = delivered(h, f.send_user_message("still fine"))
    assert good.text == "still fine" and h.journal.messages == [good]
    assert h.adapter.stats.connects == 1 and f.disconnects == []


def test_a_pure_attachment_becomes_typed_and_audio_keeps_its_recognition(make):
    h = ready(make())
    pic = delivered(h, h.fake.send_user_message(msgtype="picture",
                                                content={"downloadCode": "dl-pic"}))
    assert pic.text == "" and [(a.kind, a.ref) for a in pic.attachments] == [("image", "dl-pic")]
    voice = delivered(h, h.fake.send_user_message(
        msgtype="audio", content={"downloadCode": "dl-v", "recognition": "turn on the light"}))
    # DingTalk's recognition is the voice attachment's transcript (shown as its words; no
    # audio is fetched for it), not a second copy in the text
    assert voice.text == "" and [(a.kind, a.ref, a.transcript) for a in voice.attachments] == \
        [("voice", "dl-v", "turn on the light")]
    words = delivered(h, h.fake.send_user_message(msgtype="audio",
                                                  content={"recognition": "no code"}))
    assert words.text == "no code" and words.attachments == ()
    rich = delivered(h, h.fake.send_user_message(msgtype="richText", content={"richText": [
        {"text": "see this"}, {"downloadCode": "dl-r", "type": "picture"}, {"text": "ok?"}]}))
    assert rich.text == "see this\nok?" and rich.attachments[0].ref == "dl-r"


# --- faults ------------------------------------------------------------------------------------

def test_disconnect_is_answered_and_left_at_once_before_the_server_closes(make):
    h = ready(make())
    conn = current_conn(h)
    t0 = time.monotonic()
    h.fake.send_disconnect(with_message_id=True)
    new = reconnected_after(h, conn, t0, "disconnect")
    old = h.fake.conns[conn]
    h.fake.wait_for(lambda: old.closed.is_set(), 2)
    gone = next(d.reason for d in h.fake.disconnects if d.conn_id == conn)
    assert gone == "client_closed"  # we left; the 10 s grace never ran out
    assert h.adapter.stats.reconnects["server_disconnect"] == 1
    assert h.fake.protocol_errors == []
    msg = delivered(h, h.fake.send_user_message("after the rotation"))
    assert h.fake.pushes_of(msg.message_id)[0].conn_id == new


def test_dead_path_zombie_is_left_when_pings_go_unanswered(make):
    h = ready(make(cfg_kw={"server_silence_s": 60.0}))
    conn = current_conn(h)
    t0 = time.monotonic()
    h.fake.go_silent(30.0)  # nothing either way, not even pongs
    reconnected_after(h, conn, t0, "zombie_dead_path")
    assert h.adapter.stats.reconnects["zombie"] == 1
    delivered(h, h.fake.send_user_message("after the zombie"))


def test_silent_server_that_still_pongs_is_left_after_server_silence(make):
    h = ready(make(cfg_kw={"server_silence_s": 0.6}))
    conn = current_conn(h)
    t0 = time.monotonic()
    h.fake.go_silent(30.0, pongs=True)  # WebSocket pongs go on; no server pings, no messages
    reconnected_after(h, conn, t0, "zombie_server_silent")
    assert "no data frame" in h.adapter.stats.last_error
    delivered(h, h.fake.send_user_message("after the silence"))


def test_open_429_and_5xx_are_retried_then_connect(make):
    h = make(run=False)
    h.fake.rest_429(1, retry_after=0.1)
    h.fake.fail_open(2, status=503)
    h.greenlet = gevent.spawn(run_until_stopped, h.adapter)
    ready(h, timeout=5)
    assert len(h.fake.open_requests) == 3  # the 429 was answered before the route saw it
    assert h.adapter.stats.reconnects["open_failed"] == 3


def test_bad_credentials_are_fatal_without_a_reconnect_loop(make):
    h = make(cfg_kw={"client_secret": "wrong"})
    h.greenlet.join(timeout=3)
    assert isinstance(h.greenlet.value, FatalPlatformError)
    assert h.adapter.stats.state is State.FATAL
    assert len(h.fake.open_requests) == 1 and h.fake.refusals == [("open", 401)]
    assert "wrong" not in str(h.greenlet.value)


def test_journal_failure_is_held_acked_and_journaled_once_when_the_store_recovers(make):
    h = ready(make(journal=Journal(fail_first=3)))
    mid = h.fake.send_user_message("do not lose me")
    (push,) = h.fake.wait_for(lambda: h.fake.acks_of(mid))
    assert push.ack_code == 200  # acked at once: the platform never sends it again
    msg = delivered(h, mid, timeout=5)
    assert h.journal.failures == 3 and h.journal.duplicates == 0
    h.fake.wait_for(lambda: h.adapter.stats.held == 0)
    assert push.acked_at < h.journal.at[mid]
    h.adapter.send(answer(msg, "kept"))
    assert [r.text for r in h.fake.replies_to(mid)] == ["kept"]


def test_a_redelivered_callback_is_acked_again_but_journaled_once(make):
    h = ready(make())
    mid = h.fake.send_user_message("once")
    delivered(h, mid)
    h.fake.redeliver(mid)
    h.fake.wait_for(lambda: len(h.fake.acks_of(mid)) == 2)
    assert len(h.journal.messages) == 1 and h.journal.duplicates == 1


def test_no_message_lost_or_duplicated_through_faults(make):
    h = ready(make(cfg_kw={"server_silence_s": 0.6}))
    sent = []
    faults = [h.fake.drop, lambda: h.fake.send_disconnect(),
              lambda: h.fake.close_with(1011, "bye"), lambda: h.fake.go_silent(5.0, pongs=True),
              h.fake.drop]
    for i, fault in enumerate(faults):
        conn = current_conn(h)
        sent.append(h.fake.send_user_message(f"before {i}", staff_id=f"u{i}"))
        h.fake.wait_for(lambda: h.journal.by_id(sent[-1]))
        fault()
        reconnected_after(h, conn, time.monotonic(), f"mixed_{i}")
        sent.append(h.fake.send_user_message(f"after {i}", conversation_type="2"))
        h.fake.wait_for(lambda: set(sent) <= h.journal.seen, 3)
    assert [m.message_id for m in h.journal.messages] == sent and h.fake.lost == []
    for msg in h.journal.messages:
        h.adapter.send(answer(msg, f"re: {msg.text}"))
    assert Counter(r.msg_id for r in h.fake.replies) == Counter(sent)


# --- the fake's own rules (checked with a bare client) ------------------------------------------

def _ticket(fake) -> str:
    import requests
    resp = requests.post(fake.http_base + "/v1.0/gateway/connections/open", json={
        "clientId": fake.client_id, "clientSecret": fake.client_secret,
        "subscriptions": [{"type": "CALLBACK", "topic": BOT_TOPIC}]}, timeout=5)
    assert resp.status_code == 200
    return resp.json()["endpoint"] + "?ticket=" + resp.json()["ticket"]


def test_fake_refuses_a_used_or_expired_ticket():
    fake = FakeDingTalkServer(ticket_ttl_s=0.2).start()
    try:
        url = _ticket(fake)
        ws = websocket.create_connection(url, timeout=3)
        with pytest.raises(websocket.WebSocketBadStatusException):
            websocket.create_connection(url, timeout=3)  # the same ticket twice
        stale = _ticket(fake)
        gevent.sleep(0.3)  # the ticket outlives its 0.2 s
        with pytest.raises(websocket.WebSocketBadStatusException):
            websocket.create_connection(stale, timeout=3)
        assert [why for _, why in fake.handshake_rejections] == ["unknown_or_used_ticket",
                                                                 "expired_ticket"]
        ws.close()
    finally:
        fake.stop()


def test_fake_drops_a_client_that_leaves_a_ping_unanswered():
    fake = FakeDingTalkServer(server_ping_interval_s=0.1, ping_deadline_s=0.3).start()
    try:
        ws = websocket.create_connection(_ticket(fake), timeout=3)
        ping = json.loads(ws.recv())
        assert ping["type"] == "SYSTEM" and ping["headers"]["topic"] == "ping"
        assert "opaque" in json.loads(ping["data"])
        fake.wait_for(lambda: fake.disconnects, 3)
        assert fake.disconnects[0].reason == "ping_unanswered"
        ws.close()
    finally:
        fake.stop()


def test_fake_redelivers_an_unanswered_event_and_refuses_malformed_answers():
    fake = FakeDingTalkServer(server_ping_interval_s=60, event_ack_timeout_s=0.2).start()
    try:
        import requests
        resp = requests.post(fake.http_base + "/v1.0/gateway/connections/open", json={
            "clientId": fake.client_id, "clientSecret": fake.client_secret,
            "subscriptions": [{"type": "EVENT", "topic": "*"}]}, timeout=5)
        ws = websocket.create_connection(resp.json()["endpoint"] + "?ticket="
                                         + resp.json()["ticket"], timeout=3)
        fake.send_event()
        first, second = json.loads(ws.recv()), json.loads(ws.recv())  # unanswered: again
        assert first["data"] == second["data"]
        assert first["headers"]["messageId"] != second["headers"]["messageId"]
        ws.send(json.dumps({"code": 200, "headers": {"messageId": second["headers"]["messageId"]},
                            "message": "OK", "data": "{}"}))  # no contentType
        ws.send(json.dumps({"code": 200, "headers": {"messageId": second["headers"]["messageId"],
                                                     "contentType": "application/json"},
                            "message": "OK", "data": json.dumps({"status": "SUCCESS"})}))
        fake.wait_for(lambda: any(p.acked_at for p in fake.pushes))
        assert [w for _, w, _ in fake.protocol_errors] == ["malformed_answer"]
        assert len([p for p in fake.pushes if p.kind == "EVENT"]) == 2
        ws.close()
    finally:
        fake.stop()


# --- check, secrets, title ----------------------------------------------------------------------

def test_check_performs_the_auth_step(make):
    h = make(run=False)
    assert "credentials accepted" in DingTalkAdapter.check(h.adapter.config)
    assert len(h.fake.issued_tokens) == 1
    bad = h.adapter.config.model_copy(update={"client_secret": SecretStr("nope")})
    with pytest.raises(FatalPlatformError):
        DingTalkAdapter.check(bad)


def test_no_secret_token_or_webhook_in_logs(make, caplog):
    caplog.set_level(logging.INFO)
    h = ready(make())
    msg = delivered(h, h.fake.send_user_message("hi"))
    h.adapter.send(answer(msg, "a"))
    h.fake.expire_webhooks()
    h.adapter.send(answer(msg, "b", seq=1))
    session = h.fake.messages[msg.message_id].session
    ours = "\n".join(r.getMessage() for r in caplog.records
                     if r.name.startswith("hermes_green.platforms"))
    assert "session webhook refused" in ours and "token fetched" in ours
    for secret in [h.fake.client_secret, session, *h.fake.issued_tokens]:
        assert secret not in ours


def test_markdown_title_is_the_first_line_without_marks():
    assert markdown_title("### Result\nbody") == "Result"
    assert markdown_title("\n\n> quoted text that is rather long indeed") == \
        "quoted text that is "
    assert markdown_title("   ") == "reply"


# --- through a real gateway -----------------------------------------------------------------------

def _gateway_config(tmp_path, fake, bots) -> dict:
    return {"gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False}},
            "platforms": {"dingtalk": bots}}


def _bot(fake, **over) -> dict:
    return {"client_id": fake.client_id, "client_secret": fake.client_secret,
            "api_base": fake.http_base, "ping_interval_s": 0.5,
            "backoff": {"initial_s": 0.05, "max_s": 0.3}, **over}


@pytest.fixture
def dt_fake():
    fake = FakeDingTalkServer(server_ping_interval_s=0.5, ping_deadline_s=2.0).start()
    yield fake
    fake.stop()


def test_a_store_outage_holds_the_message_and_it_is_answered_once_when_the_store_recovers(
        tmp_path, dt_fake, monkeypatch):
    from hermes_green.config import Config
    from hermes_green.gateway import Gateway
    from tests.support import GateAgent, wait_until

    gw = Gateway(Config.model_validate(_gateway_config(tmp_path, dt_fake, _bot(dt_fake))),
                 agent=GateAgent()).start()
    try:
        wait_until(lambda: "dingtalk" in gw.adapters and gw.adapters["dingtalk"].ready.is_set(),
                   what="dingtalk ready")
        real, failures, journaled = gw.store.journal_inbound, [], []

        def flaky(msg):
            if len(failures) < 3:
                failures.append(time.monotonic())
                raise OSError("disk I/O error")
            journaled.append(time.monotonic())
            return real(msg)

        monkeypatch.setattr(gw.store, "journal_inbound", flaky)
        mid = dt_fake.send_user_message("keep me", staff_id="zoe")
        (push,) = dt_fake.wait_for(lambda: dt_fake.acks_of(mid), 5)
        assert push.ack_code == 200 and failures[0] < push.acked_at  # after the first try
        dt_fake.wait_for(lambda: dt_fake.replies_to(mid), 15)
        later = dt_fake.send_user_message("and this", staff_id="zoe")  # same conversation
        dt_fake.wait_for(lambda: dt_fake.replies_to(later), 15)
        assert [r.text for r in dt_fake.replies_to(mid)] == ["answer: keep me"]
        assert len(failures) == 3 and gw.adapters["dingtalk"].stats.held == 0
        assert push.acked_at < journaled[0]  # acked while held: the platform never resends
        assert gw.adapters["dingtalk"].stats.journal_failures >= 1
    finally:
        gw.shutdown()


def test_bad_credentials_stop_that_bot_only(tmp_path, dt_fake):
    from hermes_green.config import Config
    from hermes_green.gateway import Gateway
    from tests.support import GateAgent, wait_until

    bots = [_bot(dt_fake, id="good"), _bot(dt_fake, id="bad", client_secret="not-it")]
    gw = Gateway(Config.model_validate(_gateway_config(tmp_path, dt_fake, bots)),
                 agent=GateAgent()).start()
    try:
        wait_until(lambda: "dingtalk/bad" in gw.fatal, timeout=10, what="bad bot fatal")
        assert gw.adapters["dingtalk/bad"].stats.state is State.FATAL
        assert "not-it" not in gw.fatal["dingtalk/bad"]
        wait_until(lambda: gw.adapters.get("dingtalk/good") is not None
                   and gw.adapters["dingtalk/good"].ready.is_set(), what="good bot ready")
        mid = dt_fake.send_user_message("still there?")
        dt_fake.wait_for(lambda: dt_fake.replies_to(mid), 15)
        assert [r.text for r in dt_fake.replies_to(mid)] == ["answer: still there?"]
        assert dt_fake.refusals.count(("open", 401)) == 1  # refused once, never retried
        assert len(dt_fake.conns) == 1
    finally:
        gw.shutdown()


def test_a_callback_redelivered_after_a_restart_is_not_answered_twice(tmp_path, dt_fake):
    """A real gateway process on a real SQLite file answers a message, is stopped with SIGTERM
    and started again; the platform pushes the same bot message again (a new frame, the same
    msgId): it is acked, recognized by the journal, and not answered a second time."""
    import signal
    import sys

    import yaml

    from hermes_green.testing.fake_llm import FakeLLM
    from tests.support import BIN, Process

    llm = FakeLLM(api_key="sk-dt", chunk_delay_s=0.0).start()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump({
        **_gateway_config(tmp_path, dt_fake, _bot(dt_fake)),
        "agent": {"base_url": llm.base_url, "api_key": "sk-dt", "model": "fake-model"}}))
    procs = []

    def start() -> Process:
        procs.append(Process([sys.executable, BIN, "--config", str(cfg)]))
        return procs[-1]

    try:
        first = start()
        dt_fake.wait_for(lambda: dt_fake.live_conns(), 30)
        mid = dt_fake.send_user_message("answer me once", staff_id="yan")
        dt_fake.wait_for(lambda: dt_fake.replies_to(mid), 30)
        before = [r.text for r in dt_fake.replies_to(mid)]
        assert before[0].startswith("You said: answer me once.")
        first.signal(signal.SIGTERM)
        assert first.wait(timeout=30) == 0, first.stderr[-2000:]
        conns_before = set(dt_fake.conns)
        start()
        dt_fake.wait_for(lambda: [c for c in dt_fake.live_conns() if c.id not in conns_before],
                         30)
        dt_fake.redeliver(mid)
        dt_fake.wait_for(lambda: len(dt_fake.acks_of(mid)) == 2, 15)  # acked after the journal
        later = dt_fake.send_user_message("a new question", staff_id="yan")
        dt_fake.wait_for(lambda: dt_fake.replies_to(later), 30)
        assert [r.text for r in dt_fake.replies_to(mid)] == before  # no second answer
        assert dt_fake.replies_to(later)[0].text.startswith("You said: a new question.")
        assert dt_fake.lost == [] and dt_fake.protocol_errors == []
    finally:
        for p in procs:
            if p.proc.poll() is None:
                p.signal(signal.SIGTERM)
                p.wait(timeout=30)
        llm.stop()


def test_any_json_in_a_bot_message_is_delivered_or_skipped_never_an_error():
    """Bot message data of any shape: the adapter either makes an InboundMessage of it or skips
    it with a reason; nothing else escapes (an escape would cost the frame its ack)."""
    from hypothesis import example, given, settings, strategies as st

    from hermes_green.platforms.dingtalk import Skip

    adapter = DingTalkAdapter(DingTalkConfig(client_id="c", client_secret="s"), lambda m: True)
    odd = st.sampled_from([float("inf"), float("-inf"), float("nan"), 10 ** 30, -1, "", " "])
    leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8) | odd
    value = st.recursive(leaf, lambda inner: st.lists(inner, max_size=3)
                         | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
    keys = st.sampled_from(["msgId", "conversationId", "conversationType", "senderStaffId",
                            "senderId", "msgtype", "text", "content", "isInAtList",
                            "chatbotUserId", "sessionWebhook", "sessionWebhookExpiredTime"])
    base = {"msgId": "m", "conversationId": "c", "conversationType": "1",
            "senderStaffId": "s", "msgtype": "text", "text": {"content": "hi"},
            "sessionWebhook": "https://oapi.example/robot/sendBySession?session=x",
            "sessionWebhookExpiredTime": 1}

    @settings(max_examples=500, deadline=None)
    @given(st.dictionaries(keys, leaf | value, max_size=4), st.booleans())
    @example({"sessionWebhookExpiredTime": float("inf")}, True)
    @example({"sessionWebhookExpiredTime": float("nan")}, True)
    def check(over, on_base):
        data = {**base, **over} if on_base else over
        try:
            msg = adapter._normalize(data)
        except Skip:
            return
        assert msg.message_id and msg.chat_id and msg.user_id
        assert msg.text or msg.attachments

    check()


# --- files -------------------------------------------------------------------------------------

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 20


def file_out(msg, path, *, name: str, mime: str, media: str) -> OutboundMessage:
    return OutboundMessage(platform="dingtalk", chat_id=msg.chat_id, text="",
                           in_reply_to=msg.message_id, reply_ref=msg.reply_ref, kind="file",
                           file={"path": str(path), "name": name, "mime": mime, "media": media,
                                 "size": path.stat().st_size})


def test_a_picture_is_fetched_through_its_download_code_with_the_token_renewed_once(make):
    import requests
    from hermes_green.platforms.media import MediaRefused
    h = ready(make())
    msg = delivered(h, h.fake.send_media_message(PNG, kind="image", name="cat.png",
                                                 mime="image/png", staff_id="erin"))
    [att] = msg.attachments
    assert att.kind == "image" and att.ref in h.fake.download_codes
    src = h.adapter.media_source(att, msg)
    assert requests.get(src.url, headers=src.headers, timeout=5).content == PNG
    h.fake.expire_tokens()  # the cached token is refused: renewed once, then the code works
    again = h.adapter.media_source(att, msg)
    assert requests.get(again.url, timeout=5).content == PNG
    assert ("download", "InvalidAuthentication") in h.fake.refusals
    assert len(h.fake.issued_tokens) == 2
    with pytest.raises(MediaRefused, match="did not hand out"):
        h.adapter.media_source(att.__class__("file", "dl-unknown"), msg)


def test_a_document_goes_up_by_media_upload_and_arrives_as_a_sample_file_message(make,
                                                                                   tmp_path):
    h = ready(make())
    msg = delivered(h, h.fake.send_user_message("send the report", staff_id="erin"))
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.4 " + bytes(range(256)) * 100)
    h.adapter.token.get()
    h.fake.expire_tokens()  # media/upload renews a refused token once too
    h.adapter.send_file(file_out(msg, report, name="report.pdf", mime="application/pdf",
                                 media="file"))
    chart = tmp_path / "chart.png"
    chart.write_bytes(PNG)
    h.adapter.send_file(file_out(msg, chart, name="chart.png", mime="image/png", media="image"))
    assert [(f.message_id, f.name, f.data, f.media) for f in h.fake.files] == [
        (msg.message_id, "report.pdf", report.read_bytes(), "file"),
        (msg.message_id, "", PNG, "image")]
    assert h.fake.uploads == 2 and ("upload", 40014) in h.fake.refusals
    sent = [c["json"] for c in h.fake.rest_calls if c["path"].endswith("/batchSend")]
    assert [b["msgKey"] for b in sent] == ["sampleFile", "sampleImageMsg"]
    assert json.loads(sent[0]["msgParam"])["fileType"] == "pdf"
