"""Discord adapter against the strict fake (hermes_green/testing/fake_discord.py).

Timing: heartbeat every 0.2 s, the fake closes a client whose beat is 3 intervals late, backoff
starts at 0.05 s. Every wait is on a condition; "nothing happened" checks observe a fixed window
only to prove that something did NOT happen.
"""
from __future__ import annotations

import json
import logging
import random
import time
from collections import Counter
from types import SimpleNamespace

import gevent
import pytest
from pydantic import SecretStr

from hermes_green.testing.journal import Journal
from hermes_green.models import OutboundMessage
from hermes_green.platforms.base import FatalPlatformError, MemoryState, SendError, State
from hermes_green.platforms.botconfig import BackoffConfig
from hermes_green.platforms.discord import (INTENTS, DiscordAdapter, DiscordConfig, RateLimits,
                                            nonce_for)
from hermes_green.replies import split_reply
from hermes_green.testing.fake_discord import FakeDiscordServer
from tests.support import AdapterRuns, print_reconnect_times, ready

INTERVAL_MS = 200
INTERVAL_S = INTERVAL_MS / 1000
RECONNECT_BUDGET_S = 2.0
MEASURED: dict[str, float] = {}  # fault -> seconds from the fault to ready again


@pytest.fixture(scope="module", autouse=True)
def report_reconnect_times():
    """Prints what the fault tests measured (visible with -s)."""
    yield from print_reconnect_times(MEASURED)




class FixedRng(random.Random):
    """random() and uniform() at a chosen point of their range (jitter, op 9 wait)."""

    def __init__(self, point: float) -> None:
        super().__init__(0)
        self.point = point

    def random(self) -> float:
        return self.point

    def uniform(self, a: float, b: float) -> float:
        return a + (b - a) * self.point




@pytest.fixture
def make():
    runs = AdapterRuns()

    def _make(*, fake=None, fake_kw=None, run=True, journal=None, saved_state=None,
              handshake_timeout_s=1.0, token=None, **adapter_kw):
        if fake is None:
            args = dict(heartbeat_interval_ms=INTERVAL_MS, heartbeat_tolerance=3.0,
                        max_concurrency=1000)
            args.update(fake_kw or {})
            fake = FakeDiscordServer(**args).start()
        cfg = DiscordConfig(token=SecretStr(token or fake.token), api_base=fake.api_base,
                            backoff=BackoffConfig(initial_s=0.05, max_s=0.3, healthy_after_s=0.5))
        journal = journal if journal is not None else Journal()
        adapter = DiscordAdapter(cfg, journal, handshake_timeout_s=handshake_timeout_s,
                                 saved_state=saved_state, **adapter_kw)
        return runs.start(fake, adapter, journal, run=run)

    yield _make
    runs.stop_all()



def delivered(h, msg_id: str, timeout=3.0):
    return h.fake.wait_for(lambda: h.journal.by_id(msg_id), timeout)


def reply(h, msg, text="ok", seq=0):
    h.adapter.send(OutboundMessage(platform="discord", chat_id=msg.chat_id, text=text,
                                   in_reply_to=msg.message_id, reply_ref=msg.reply_ref, seq=seq))


def current_conn(h) -> int:
    live = h.fake.wait_for(lambda: len(h.fake.live_conns()) == 1 and h.fake.live_conns(), 2)
    return live[0].id


def established_after(h, conn_id: int, timeout=RECONNECT_BUDGET_S):
    """Wait for a connection newer than `conn_id` to get READY or RESUMED; returns (its conn
    id, the first op the client sent on it other than a heartbeat, when it got ready)."""
    def newer():
        return next((f for f in h.fake.frames if f.direction == "out" and f.conn_id > conn_id
                     and isinstance(f.data, dict) and f.data.get("t") in ("READY", "RESUMED")),
                    None)
    frame = h.fake.wait_for(newer, timeout)
    assert h.adapter.ready.wait(1.0)
    first = next(op for op in h.fake.client_ops(frame.conn_id) if op != 1)
    return frame.conn_id, first, frame.at


def assert_answered_exactly_once(h, msg_ids):
    per_msg = Counter(m.reference for m in h.fake.sent_messages())
    assert {m: per_msg[m] for m in msg_ids} == {m: 1 for m in msg_ids}, per_msg


# --- connecting ------------------------------------------------------------------------------

def test_identify_carries_token_intents_and_properties_then_ready(make):
    h = ready(make())
    conn = h.fake.conns[current_conn(h)]
    assert conn.state["path"].rstrip("/") == "/gateway"  # from GET /gateway/bot
    identify = next(d for d in h.fake.frames_in(conn.id) if d.get("op") == 2)["d"]
    assert identify["token"] == h.fake.token
    assert identify["intents"] == INTENTS == (1 << 9) | (1 << 12) | (1 << 15)
    assert set(identify["properties"]) == {"os", "browser", "device"}
    assert h.adapter.user_id == h.fake.bot_id and h.adapter.stats.state is State.READY
    gw_calls = [r for r in h.fake.rest_calls if r["path"] == "/api/v10/gateway/bot"]
    assert gw_calls[0]["headers"]["Authorization"] == f"Bot {h.fake.token}"


def test_first_heartbeat_after_interval_times_jitter_then_every_interval_with_last_seq(make):
    h = ready(make(rng=FixedRng(0.5)))
    conn = current_conn(h)
    msg = delivered(h, h.fake.user_sends("hi", dm=True))
    h.fake.wait_for(lambda: len(h.fake.keepalive_times[conn]) >= 5, 3)
    hello_at, interval = h.fake.hello_times[conn]
    first = h.fake.keepalive_times[conn][0] - hello_at
    assert 0.4 * interval <= first <= 0.5 * interval + 0.1, first  # jitter 0.5 of the interval
    lateness = sorted(h.fake.keepalive_lateness(conn))
    assert abs(lateness[len(lateness) // 2]) < 0.05, lateness  # then on the interval timetable
    beats = [d for d in h.fake.frames_in(conn) if d.get("op") == 1]
    assert beats[0]["d"] is None or beats[0]["d"] >= 1
    seq_of_msg = next(f["s"] for f in h.fake.out_events("MESSAGE_CREATE")
                      if f["d"]["id"] == msg.message_id)
    assert beats[-1]["d"] == seq_of_msg  # the last sequence received


def test_server_heartbeat_request_is_answered_at_once(make):
    h = ready(make(fake_kw={"heartbeat_interval_ms": 5000}))
    conn = current_conn(h)
    before = len(h.fake.keepalive_times[conn])
    h.fake.request_heartbeat()
    h.fake.wait_for(lambda: len(h.fake.keepalive_times[conn]) > before, 1)
    asked_at = h.fake.heartbeat_requests[-1][1]
    assert h.fake.keepalive_times[conn][-1] - asked_at < 0.2


def test_bad_token_is_fatal_at_start_and_nothing_reconnects(make):
    h = make(token="not-the-token")
    h.greenlet.join(timeout=3)
    assert isinstance(h.greenlet.value, FatalPlatformError)
    assert h.adapter.stats.state is State.FATAL and not h.fake.conns
    assert len([r for r in h.fake.rest_calls if r["path"].endswith("/gateway/bot")]) == 1


def test_check_performs_the_auth_step(make):
    h = make(run=False)
    assert "gateway" in DiscordAdapter.check(h.adapter.config)
    bad = h.adapter.config.model_copy(update={"token": SecretStr("wrong")})
    with pytest.raises(FatalPlatformError):
        DiscordAdapter.check(bad)


# --- messages --------------------------------------------------------------------------------

def test_dm_and_guild_mention_are_answered_with_message_reference(make):
    h = ready(make())
    dm_id = h.fake.user_sends("hello there", dm=True)
    guild_id = h.fake.user_sends("what time is it?", channel_id="810000000000000042",
                                 mention=True)
    dm, mention = delivered(h, dm_id), delivered(h, guild_id)
    assert (dm.chat_type, dm.text, dm.user_id) == ("dm", "hello there", "700000000000000001")
    assert (mention.chat_type, mention.text, mention.chat_id) == (
        "group", "what time is it?", "810000000000000042")
    reply(h, dm, "hi!")
    reply(h, mention, "noon")
    [a], [b] = h.fake.replies_to(dm_id), h.fake.replies_to(guild_id)
    assert (a.content, a.channel_id) == ("hi!", dm.chat_id)
    assert (b.content, b.channel_id) == ("noon", "810000000000000042")
    body = next(r["json"] for r in h.fake.rest_calls if r["method"] == "POST"
                and r["path"].endswith("/messages") and r["json"]["content"] == "noon")
    assert body["message_reference"]["message_id"] == guild_id
    assert body["nonce"] == nonce_for(h.adapter.bot_id, guild_id, 0) and body["enforce_nonce"]
    assert body["allowed_mentions"]["parse"] == ["users"]  # never @everyone from model output


def test_guild_messages_without_mention_own_and_other_bots_and_edits_are_not_answered(make):
    h = ready(make())
    skipped = [h.fake.user_sends("chatter among users"),
               h.fake.user_sends("from another bot", mention=True, author_bot=True),
               h.fake.user_sends("from myself", dm=True, author_id=h.fake.bot_id)]
    later = h.fake.user_sends("now for you", mention=True)
    h.fake.user_edits(later, "now for you, edited")  # MESSAGE_UPDATE: not a new question
    marker = h.fake.user_sends("marker", dm=True)
    delivered(h, marker)
    assert [m.message_id for m in h.journal.messages] == [later, marker]
    assert not set(skipped) & h.journal.seen


def test_long_answer_is_split_into_parts_of_at_most_2000_characters(make):
    h = ready(make(fake_kw={"message_limit": (50, 1.0)}))
    msg = delivered(h, h.fake.user_sends("tell me everything", dm=True))
    assert h.adapter.reply_chunk_chars() == 2000
    answer = "\n\n".join(f"paragraph {i} " + "x" * 700 for i in range(9))
    parts = split_reply(answer, h.adapter.reply_chunk_chars(), h.adapter.max_reply_parts())
    assert len(parts) > 3
    for seq, part in enumerate(parts):
        reply(h, msg, part, seq=seq)
    sent = h.fake.replies_to(msg.message_id)
    assert [m.content for m in sent] == parts and all(len(p) <= 2000 for p in parts)
    with pytest.raises(SendError) as e:
        reply(h, msg, "y" * 2001, seq=len(parts))
    assert not e.value.retryable and len(h.fake.sent_messages()) == len(parts)


def test_a_resent_part_returns_the_message_already_posted(make):
    """The outbox re-sends after a timeout or a restart: the nonce makes Discord answer with
    the message it already has instead of posting it twice."""
    h = ready(make())
    msg = delivered(h, h.fake.user_sends("once please", dm=True))
    reply(h, msg, "only once")
    reply(h, msg, "only once")
    assert len(h.fake.replies_to(msg.message_id)) == 1 and h.fake.nonce_hits == 1


def test_a_reply_to_a_channel_the_bot_cannot_see_is_refused_and_the_connection_stays(make):
    h = ready(make())
    conn = current_conn(h)
    hidden = delivered(h, h.fake.user_sends("psst", channel_id="810000000000000066",
                                            mention=True))
    h.fake.hide_channel("810000000000000066")
    for i in range(15):  # the agent streams while typing and progress are refused (403)
        h.adapter.progress(hidden.reply_ref, "partial " * (i + 1))
        gevent.sleep(0.1)
    refused = [r for r in h.fake.rejected if "810000000000000066" in r.path]
    assert len(refused) == 1, refused  # given up at once: 403s count towards a ban
    with pytest.raises(SendError) as e:
        reply(h, hidden)
    assert not e.value.retryable and "50001" in str(e.value)
    assert current_conn(h) == conn and h.adapter.ready.is_set()
    ok = delivered(h, h.fake.user_sends("still here?", dm=True))
    reply(h, ok)
    assert h.fake.replies_to(ok.message_id)


# --- rate limits -----------------------------------------------------------------------------

def test_bucket_headers_are_honoured_so_no_429_is_earned(make):
    h = ready(make(fake_kw={"message_limit": (2, 0.5)}))
    msg = delivered(h, h.fake.user_sends("burst", dm=True))
    started = time.monotonic()
    for seq in range(6):
        reply(h, msg, f"part {seq}", seq=seq)
    elapsed = time.monotonic() - started
    assert [m.content for m in h.fake.replies_to(msg.message_id)] == [f"part {i}"
                                                                       for i in range(6)]
    assert h.fake.rate_limited == []  # every wait came from the headers, before the call
    assert elapsed >= 1.0  # 6 calls through a bucket of 2 per 0.5 s: two full resets


def test_a_429_is_waited_out_for_retry_after_then_the_send_succeeds(make):
    h = ready(make())
    msg = delivered(h, h.fake.user_sends("slow down", dm=True))
    h.fake.force_429(1, retry_after=0.4)
    reply(h, msg, "after the wait")
    [hit] = h.fake.rate_limited
    posts = [a for a in h.fake.rest_answers if a[1] == "POST" and a[2].endswith("/messages")]
    assert posts[-2][3] == 429 and posts[-1][3] == 200
    assert posts[-1][0] - hit.at >= 0.39
    assert h.fake.replies_to(msg.message_id)[0].content == "after the wait"


def test_a_global_429_holds_every_route(make):
    h = ready(make())
    a = delivered(h, h.fake.user_sends("a", dm=True))
    b = delivered(h, h.fake.user_sends("b", channel_id="810000000000000077", mention=True))
    h.fake.force_429(1, retry_after=0.4, global_=True)
    reply(h, a)  # 429 global, waits, succeeds
    t = time.monotonic()
    reply(h, b)  # another channel's bucket: held by the global limit only until it ends
    hit = h.fake.rate_limited[0]
    first_b = next(x for x in h.fake.rest_answers if x[2].endswith(f"{b.chat_id}/messages"))
    assert first_b[0] - hit.at >= 0.39 and time.monotonic() - t < 1.0


def test_rate_limits_learn_buckets_from_headers():
    now = [100.0]
    limits = RateLimits(clock=lambda: now[0])
    route = "POST /channels/{id}/messages"
    assert limits.wait_s(route, "1") == 0.0
    limits.update(route, "1", 200, {"X-RateLimit-Bucket": "abc", "X-RateLimit-Remaining": "0",
                                    "X-RateLimit-Reset-After": "2.5"}, {})
    assert limits.wait_s(route, "1") == pytest.approx(2.5)
    assert limits.wait_s(route, "2") == 0.0  # another channel: its own bucket
    limits.update(route, "2", 429, {"Retry-After": "3"}, {"retry_after": 1.25, "global": False})
    assert limits.wait_s(route, "2") == pytest.approx(1.25)  # the body's float wins
    limits.update("PATCH x", "3", 429, {"X-RateLimit-Global": "true"},
                  {"retry_after": 4.0, "global": True})
    assert limits.wait_s("GET /anything", "") == pytest.approx(4.0)
    now[0] += 5
    assert limits.wait_s(route, "1") == 0.0
    limits.update(route, "9", 429, {"Retry-After": "garbage"}, {"retry_after": "nan"})
    assert limits.wait_s(route, "9") == pytest.approx(1.0)  # unreadable: a safe default


# --- progress --------------------------------------------------------------------------------

def test_typing_while_the_turn_runs_and_progress_edits_the_first_part_at_most_once_a_second(make):
    h = ready(make(fake_kw={"edit_limit": (50, 1.0)}))
    msg = delivered(h, h.fake.user_sends("write a poem", dm=True))
    h.fake.wait_for(lambda: [c for c, _ in h.fake.typing if c == msg.chat_id], 2)
    text = ""
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # the agent streams for 2.5 s
        text += "la "
        h.adapter.progress(msg.reply_ref, text)
        gevent.sleep(0.05)
    h.fake.wait_for(lambda: h.fake.replies_to(msg.message_id), 2)
    reply(h, msg, "the final poem")
    [posted] = h.fake.replies_to(msg.message_id)  # progress became the first part: one message
    assert posted.content == "the final poem"
    edit_times = [at for mid, _, at in h.fake.edits if mid == posted.id]
    gaps = [b - a for a, b in zip(edit_times, edit_times[1:-1])]  # the last is the final text
    assert len(edit_times) >= 2 and all(g >= 0.9 for g in gaps), gaps
    typed = len(h.fake.typing)
    gevent.sleep(0.3)
    assert len(h.fake.typing) == typed  # typing stopped once the answer is there


def test_after_a_restart_the_final_part_replaces_the_progress_message(make):
    h = ready(make())
    msg = delivered(h, h.fake.user_sends("think hard", dm=True))
    h.adapter.progress(msg.reply_ref, "thinking so far")
    h.fake.wait_for(lambda: h.fake.replies_to(msg.message_id), 2)
    fresh = make(fake=h.fake)  # a new process: no memory of the progress message
    ready(fresh)
    reply(fresh, msg, "the answer")
    [posted] = h.fake.replies_to(msg.message_id)
    assert posted.content == "the answer" and h.fake.nonce_hits == 1


# --- faults ----------------------------------------------------------------------------------

def test_zombie_is_detected_within_two_intervals_and_resumed(make):
    # The fake's own deadline is disabled by go_zombie(): only our detection ends it.
    h = ready(make())
    conn = current_conn(h)
    before = delivered(h, h.fake.user_sends("before", dm=True))
    h.fake.go_zombie()
    t_zombie = time.monotonic()
    missed = h.fake.user_sends("sent into the void", dm=True)  # kept for the resume
    h.fake.wait_for(lambda: h.fake.conns[conn].closed.is_set(), 3)
    detected = next(d.at for d in h.fake.disconnects if d.conn_id == conn)
    assert detected - t_zombie <= 2 * INTERVAL_S + 0.2, detected - t_zombie
    new_conn, first_op, at = established_after(h, conn)
    MEASURED["zombie (from the link dying; interval 0.2 s)"] = at - t_zombie
    assert first_op == 6 and h.adapter.stats.reconnects["zombie"] == 1
    assert h.fake.conns[new_conn].state["resume_url"] and h.fake.wrong_url_resumes == 0
    assert not [c for c in h.fake.client_close_codes if c[0] == conn]  # a cut: 1000/1001
    # would have ended the session (and the fake drops a zombie's close frame anyway)
    delivered(h, missed)
    assert [m.message_id for m in h.journal.messages] == [before.message_id, missed]


def test_missed_dispatches_are_replayed_after_resume_and_answered_once(make):
    h = ready(make())
    conn = current_conn(h)
    first = delivered(h, h.fake.user_sends("first", dm=True))
    reply(h, first, "a1")
    h.fake.refuse_connections()
    h.fake.drop()  # a network cut: no close frame
    missed = [h.fake.user_sends(f"while away {i}", dm=True) for i in range(3)]
    h.fake.accept_connections()
    t = time.monotonic()
    new_conn, first_op, at = established_after(h, conn, timeout=4)
    MEASURED["drop"] = at - t
    assert first_op == 6
    for mid in missed:
        reply(h, delivered(h, mid), "answer")
    assert [m.message_id for m in h.journal.messages] == [first.message_id, *missed]
    assert_answered_exactly_once(h, [first.message_id, *missed])


def test_op7_reconnects_and_resumes_on_the_resume_url(make):
    h = ready(make())
    conn = current_conn(h)
    t = time.monotonic()
    h.fake.send_reconnect()
    new_conn, first_op, at = established_after(h, conn)
    MEASURED["op 7"] = at - t
    assert first_op == 6 and h.fake.conns[new_conn].state["resume_url"]
    assert h.adapter.stats.reconnects["server_reconnect"] == 1


def test_op9_false_identifies_afresh_after_a_short_random_wait(make):
    h = ready(make(rng=FixedRng(0.0)))  # the wait's lowest point: 1 s
    conn = current_conn(h)
    old_session = h.adapter.session_id
    h.fake.invalidate_session(resumable=False)
    t = time.monotonic()
    new_conn, first_op, at = established_after(h, conn, timeout=4)
    MEASURED["op 9 (d=false, 1 s wait)"] = at - t
    identified_at = h.fake.identifies[-1][1]
    assert first_op == 2 and 1.0 <= identified_at - t < 2.0
    assert h.adapter.session_id not in (None, old_session)


def test_op9_true_resumes(make):
    h = ready(make())
    conn = current_conn(h)
    h.fake.invalidate_session(resumable=True)
    _, first_op, _ = established_after(h, conn)
    assert first_op == 6


@pytest.mark.parametrize("code", [4000, 4001, 4002, 4003, 4005, 4008, 1001, 1011])
def test_other_close_codes_resume(make, code):
    h = ready(make())
    conn = current_conn(h)
    h.fake.close_with(code)
    _, first_op, _ = established_after(h, conn)
    assert first_op == 6


@pytest.mark.parametrize("code", [4007, 4009])
def test_invalid_seq_and_session_timeout_identify_afresh(make, code):
    h = ready(make())
    conn = current_conn(h)
    h.fake.close_with(code)
    _, first_op, _ = established_after(h, conn)
    assert first_op == 2


@pytest.mark.parametrize("code", [4004, 4010, 4011, 4012, 4013, 4014])
def test_fatal_close_codes_stop_only_this_bot(make, code):
    doomed, other = ready(make()), ready(make())
    doomed.fake.close_with(code)
    doomed.greenlet.join(timeout=3)
    assert isinstance(doomed.greenlet.value, FatalPlatformError)
    assert doomed.adapter.stats.state is State.FATAL and len(doomed.fake.conns) == 1
    assert other.adapter.ready.is_set()
    msg = delivered(other, other.fake.user_sends("are you alive?", dm=True))
    reply(other, msg)
    assert other.fake.replies_to(msg.message_id)


def test_disallowed_intents_are_fatal(make):
    h = make(fake_kw={"enabled_privileged": 0})  # MESSAGE_CONTENT not enabled for the app
    h.greenlet.join(timeout=3)
    assert isinstance(h.greenlet.value, FatalPlatformError) and "4014" in str(h.greenlet.value)


def test_a_token_reset_while_running_stops_the_bot(make):
    h = ready(make())
    msg = delivered(h, h.fake.user_sends("hi", dm=True))
    h.fake.revoke_token()
    with pytest.raises(SendError) as e:
        reply(h, msg)
    assert e.value.retryable  # kept in the outbox until the token is fixed
    h.greenlet.join(timeout=3)
    assert isinstance(h.greenlet.value, FatalPlatformError)


def test_failed_journal_write_is_replayed_by_resume(make):
    h = ready(make(journal=Journal(fail_first=1)))
    conn = current_conn(h)
    mid = h.fake.user_sends("keep me", dm=True)
    _, first_op, _ = established_after(h, conn)
    assert first_op == 6 and h.adapter.stats.journal_failures == 1
    delivered(h, mid)
    assert [m.message_id for m in h.journal.messages] == [mid]


def test_a_restart_resumes_the_saved_session_and_gets_what_was_missed(make):
    state = MemoryState()
    first = ready(make(saved_state=state))
    msg = delivered(first, first.fake.user_sends("before the restart", dm=True))
    conn = current_conn(first)
    first.adapter.stop()
    first.greenlet.join(timeout=3)
    first.fake.wait_for(lambda: first.fake.conns[conn].closed.is_set(), 2)
    assert first.fake.client_close_codes == []  # a cut keeps the session resumable
    missed = first.fake.user_sends("during the restart", dm=True)
    second = ready(make(fake=first.fake, saved_state=state))
    assert first.fake.resumes and first.fake.resumes[-1][2] == first.adapter.session_id
    delivered(second, missed)
    assert [m.message_id for m in second.journal.messages] == [missed]
    assert msg.message_id not in second.journal.seen  # the saved seq was past it


@pytest.mark.parametrize("saved", ["{not json", '["a list"]', '{"session_id": 5}',
                                   '{"session_id": "s", "resume_url": "wss://r", "seq": 1, '
                                   '"at": 0}'])  # the last one: too old to try
def test_an_unusable_saved_session_is_ignored_and_the_bot_identifies(make, saved):
    state = MemoryState()
    state.put("gateway_session", saved)
    h = ready(make(saved_state=state))
    assert h.fake.identifies and not h.fake.resumes


def test_bad_frames_are_skipped_and_the_connection_stays(make, caplog):
    caplog.set_level(logging.INFO)
    h = ready(make())
    conn = current_conn(h)
    live = h.fake.conns[conn]
    for garbage in ["not json", "[1, 2]", '{"op": "zero"}', '{"op": 42}', "{}",
                    "[" * 100_000 + "]" * 100_000, '{"op": 0, "t": "MESSAGE_CREATE", "s": 99}',
                    b"\x00\x01binary", "x" * (2 << 20)]:
        live.ws.send(garbage, binary=isinstance(garbage, bytes))
    h.fake.dispatch("SOMETHING_NEW", {"x": 1})
    h.fake.dispatch("MESSAGE_CREATE", {"id": "not-a-snowflake", "channel_id": "1",
                                       "author": {"id": "2"}, "content": "x"})
    h.fake.dispatch("MESSAGE_CREATE", {"id": "123", "channel_id": "456", "author": {"id": "7"},
                                       "content": "", "mentions": "nope", "type": [1]})
    h.fake.user_sends("", dm=True)  # a sticker-only message: nothing to answer
    # A guild message as it arrives without the MESSAGE_CONTENT intent: empty, no mention.
    h.fake.dispatch("MESSAGE_CREATE", {"id": "124", "channel_id": "456", "author": {"id": "7"},
                                       "guild_id": "9", "content": "", "mentions": []})
    ok = delivered(h, h.fake.user_sends("still working?", dm=True))
    assert current_conn(h) == conn and h.adapter.stats.reconnects == Counter()
    assert [m.message_id for m in h.journal.messages] == [ok.message_id]
    assert "reason=unknown_op" in caplog.text and "reason=empty" in caplog.text


def test_no_token_in_logs(make, caplog):
    caplog.set_level(logging.DEBUG)
    h = ready(make())
    conn = current_conn(h)
    msg = delivered(h, h.fake.user_sends("hi", dm=True))
    reply(h, msg)
    h.fake.close_with(4000)
    established_after(h, conn)  # a Resume carries the token too
    h.fake.revoke_token()
    with pytest.raises(SendError):
        reply(h, msg, "again", seq=1)
    assert caplog.records and h.fake.token not in caplog.text
    assert all(h.fake.token not in json.dumps(str(r.args)) for r in caplog.records)


def test_stop_when_ready_closes_with_a_resumable_code_and_does_not_reconnect(make):
    h = ready(make())
    conn = current_conn(h)
    h.adapter.stop()
    h.greenlet.join(timeout=3)
    assert h.greenlet.dead and h.greenlet.value is None
    h.fake.wait_for(lambda: h.fake.conns[conn].closed.is_set(), 2)
    assert h.fake.client_close_codes == []  # left by a TCP cut: a 1000/1001 ends the session
    gevent.sleep(0.3)
    assert len(h.fake.conns) == 1


def test_no_message_lost_or_answered_twice_through_many_faults(make):
    h = ready(make(fake_kw={"message_limit": (100, 1.0)}))
    answered: set[str] = set()
    sent: list[str] = []
    faults = [(h.fake.drop, True), (h.fake.send_reconnect, True),
              (lambda: h.fake.close_with(4008), True),
              (lambda: h.fake.send_garbage("\x00garbage"), False),
              (lambda: h.fake.close_with(4009), True), (h.fake.go_zombie, True),
              (h.fake.drop, True)]
    for i, (fault, reconnects) in enumerate(faults):
        conn = current_conn(h)
        sent.append(h.fake.user_sends(f"m{i}a", dm=True))
        fault()
        sent.append(h.fake.user_sends(f"m{i}b", mention=True))
        if reconnects:
            established_after(h, conn, timeout=3)
        h.fake.wait_for(lambda: set(sent) <= h.journal.seen, 3)
        for msg in h.journal.messages:
            if msg.message_id not in answered:
                reply(h, msg, "answer")
                answered.add(msg.message_id)
        reply(h, h.journal.messages[0], "answer")  # an outbox re-send of an old reply
    # 4009 starts a new session: what was sent between the close and the new READY was kept by
    # the fake for the next identify (the real gateway would drop it).
    assert set(sent) == h.journal.seen and len(h.journal.messages) == len(sent)
    assert_answered_exactly_once(h, sent)
    assert h.fake.rejected == [] and h.fake.rate_limited == []


# --- through the real gateway ----------------------------------------------------------------

@pytest.fixture
def stack(tmp_path):
    """A real Gateway (store, sessions, LLM agent, outbox) on the fake Discord and fake LLM."""
    from hermes_green.config import Config
    from hermes_green.gateway import Gateway
    from hermes_green.testing.fake_llm import FakeLLM
    from tests.support import wait_until

    llm = FakeLLM(api_key="sk-discord-e2e", chunk_delay_s=0.001).start()
    fake = FakeDiscordServer(heartbeat_interval_ms=INTERVAL_MS, heartbeat_tolerance=3.0,
                             message_limit=(50, 1.0), edit_limit=(50, 1.0)).start()
    config = Config.model_validate({
        "gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False}},
        "agent": {"base_url": llm.base_url, "api_key": "sk-discord-e2e", "model": "fake-model",
                  "max_retries": 1},
        "platforms": {"discord": {"token": fake.token, "api_base": fake.api_base,
                                  "backoff": {"initial_s": 0.05, "max_s": 0.5}}}})
    gateways = []

    def start():
        gw = Gateway(config).start()
        gateways.append(gw)
        wait_until(lambda: "discord" in gw.adapters and gw.adapters["discord"].ready.is_set(),
                   what="discord ready")
        return gw

    yield SimpleNamespace(llm=llm, fake=fake, start=start)
    for gw in gateways:
        gw.shutdown()
    fake.stop()
    llm.stop()


def test_through_the_gateway_a_dm_is_streamed_typed_and_split_into_2000_char_parts(stack):
    from hermes_green.testing.fake_llm import text

    stack.start()
    answer = "\n\n".join(f"part {i}: " + "words " * 120 for i in range(7))  # ~5,000 chars
    stack.llm.script(text(answer, chunk_chars=80, delay_s=0.03))  # ~2 s of streaming
    mid = stack.fake.user_sends("tell me a long story", dm=True)
    parts = split_reply(answer, 2000)
    stack.fake.wait_for(lambda: [m.content for m in stack.fake.replies_to(mid)] == parts, 20)
    sent = stack.fake.replies_to(mid)
    assert len(parts) > 2 and all(len(p) <= 2000 for p in parts)
    assert sent[0].edits[-1] == parts[0] and len(sent[0].edits) >= 2  # progress, then final
    assert [c for c, _ in stack.fake.typing][0] == sent[0].channel_id
    assert stack.fake.rejected == [] and stack.fake.rate_limited == []


def test_through_the_gateway_a_restart_resumes_and_answers_what_came_meanwhile_once(stack):
    from hermes_green.testing.fake_llm import text

    stack.llm.script(text("first answer"), text("second answer"))
    gw = stack.start()
    first = stack.fake.user_sends("first", dm=True)
    stack.fake.wait_for(lambda: [m.content for m in stack.fake.replies_to(first)]
                        == ["first answer"], 10)
    gw.shutdown()
    missed = stack.fake.user_sends("sent while the gateway restarts", dm=True)
    stack.start()
    stack.fake.wait_for(lambda: [m.content for m in stack.fake.replies_to(missed)]
                        == ["second answer"], 10)
    assert stack.fake.resumes and len(stack.fake.identifies) == 1  # the same session, resumed
    assert [m.content for m in stack.fake.sent_messages()] == ["first answer", "second answer"]
