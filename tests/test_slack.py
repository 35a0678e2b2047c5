"""Slack (Socket Mode) adapter against the strict fake (hermes_green/testing/fake_slack.py).

Timing: the adapter pings every 0.1 s, the fake redelivers an envelope not acked within 0.3 s,
pings the client every 0.2 s, backoff starts at 0.05 s. Every wait is on a condition; "did not
happen" checks observe a fixed window only to prove that something did NOT happen.
"""
from __future__ import annotations

import json
import logging
import time
from collections import Counter
from types import SimpleNamespace

import gevent
import pytest
import requests
import websocket
from pydantic import SecretStr

from hermes_green.testing.journal import Journal, run_until_stopped
from hermes_green.config import BackoffConfig, Config, ConfigError, parse_config
from hermes_green.gateway import Gateway
from hermes_green.models import OutboundMessage
from hermes_green.platforms.base import FatalPlatformError, SendError, State
from hermes_green.platforms.slack import REPLY_CHUNK_CHARS, SlackAdapter, SlackConfig
from hermes_green.replies import split_reply
from hermes_green.testing.fake_slack import FakeSlackServer
from tests.support import (AdapterRuns, GateAgent, base_config, print_reconnect_times, ready,
                           wait_until)

RECONNECT_BUDGET_S = 2.0
MEASURED: dict[str, float] = {}  # fault -> seconds from the fault to a greeted connection


@pytest.fixture(scope="module", autouse=True)
def report_reconnect_times():
    """Prints what the fault tests measured (visible with -s)."""
    yield from print_reconnect_times(MEASURED)






FAKE_TIMING = dict(ack_timeout_s=0.3, server_ping_interval_s=0.2, pong_deadline_s=0.5)


def slack_config(fake: FakeSlackServer, **over) -> SlackConfig:
    args = dict(app_token=fake.app_token, bot_token=fake.bot_token, api_base=fake.api_base,
                ping_interval_s=0.1, progress_interval_s=0.2,
                backoff=BackoffConfig(initial_s=0.05, max_s=0.3, healthy_after_s=0.5))
    args.update(over)
    return SlackConfig(**args)


@pytest.fixture
def make():
    runs = AdapterRuns()

    def _make(*, fake_kw=None, cfg_kw=None, run=True, journal=None, hello_timeout_s=1.0):
        fake = FakeSlackServer(**{**FAKE_TIMING, **(fake_kw or {})}).start()
        journal = journal if journal is not None else Journal()
        adapter = SlackAdapter(slack_config(fake, **(cfg_kw or {})), journal,
                               hello_timeout_s=hello_timeout_s)
        return runs.start(fake, adapter, journal, run=run)

    yield _make
    runs.stop_all()



def msg_id(channel: str, ts: str) -> str:
    return f"{channel}:{ts}"


def delivered(h, channel: str, ts: str, timeout=3.0):
    return h.fake.wait_for(lambda: h.journal.by_id(msg_id(channel, ts)), timeout)


def reply(h, msg, text="ok", seq=0):
    h.adapter.send(OutboundMessage(platform="slack", chat_id=msg.chat_id, text=text,
                                   in_reply_to=msg.message_id, reply_ref=msg.reply_ref, seq=seq))


def all_settled(fake: FakeSlackServer) -> bool:
    """Every envelope acked (or given up): nothing is waiting for a redelivery."""
    return all(e.acked or e.given_up for e in fake.envelopes)


def greeted_after(h, conn_id: int, timeout=RECONNECT_BUDGET_S) -> tuple[int, float]:
    """The first connection newer than `conn_id` that got its hello: (id, hello time)."""
    found = h.fake.wait_for(lambda: sorted((at, c) for c, at in h.fake.hello_at.items()
                                           if c > conn_id), timeout)
    at, conn = found[0]
    return conn, at


def current_conn(h) -> int:
    return max(h.fake.hello_at)


# --- connect --------------------------------------------------------------------------------

def test_connect_authenticates_opens_a_fresh_url_and_gets_hello(make):
    h = ready(make())
    calls = [(c["path"], c["headers"].get("Authorization")) for c in h.fake.rest_calls]
    assert calls == [("/api/auth.test", f"Bearer {h.fake.bot_token}"),
                     ("/api/apps.connections.open", f"Bearer {h.fake.app_token}")]
    assert h.adapter.hello["num_connections"] == 1
    assert h.fake.tickets == {} and h.fake.refused_tickets == []  # its one ticket was used
    assert h.adapter.stats.state is State.READY and h.adapter.stats.connects == 1


def test_keepalive_pings_are_answered_and_the_server_pings_too(make):
    h = ready(make())
    conn = current_conn(h)
    h.fake.wait_for(lambda: len(h.fake.keepalive_times[conn]) >= 5
                    and len(h.fake.server_pings[conn]) >= 3, 5)
    assert h.adapter.stats.last_rtt_s is not None and h.adapter.stats.heartbeat_lateness
    assert h.fake.disconnects == []  # our pongs kept the server's deadline


# --- inbound and replies ----------------------------------------------------------------------

def test_a_dm_is_acked_only_after_the_journal_took_it_and_answered_in_its_thread(make):
    h = make(run=False)
    acked_when_journaled = []

    def hook(msg):
        gevent.sleep(0.1)  # a window in which an ack sent too early would reach the fake
        acked_when_journaled.append(
            [e.acked for e in h.fake.envelopes_for_message(msg.chat_id, msg.reply_ref["ts"])])
    h.journal.hook = hook
    h.greenlet = gevent.spawn(run_until_stopped, h.adapter)
    ready(h)
    ts = h.fake.send_dm("hello bot", user="U0ALICE")
    msg = delivered(h, "D0ALICE", ts)
    assert (msg.chat_type, msg.chat_id, msg.user_id, msg.text) == ("dm", "D0ALICE", "U0ALICE",
                                                                   "hello bot")
    assert msg.reply_ref == {"channel": "D0ALICE", "thread_ts": ts, "ts": ts}
    assert acked_when_journaled == [[False]]
    h.fake.wait_for(lambda: all_settled(h.fake))
    reply(h, msg, "hi Alice")
    assert h.fake.answers("D0ALICE", ts) == ["hi Alice"]
    # Our own reply comes back as a message event (bot_id): acked, never handed up.
    h.fake.wait_for(lambda: len(h.fake.envelopes) == 2 and all_settled(h.fake))
    assert [m.message_id for m in h.journal.messages] == [msg.message_id]
    assert h.fake.redelivered() == [] and h.fake.foreign_acks == []


def test_an_app_mention_is_answered_in_the_thread_it_was_written_in(make):
    h = ready(make())
    root = h.fake.send_mention("start of a thread", channel="C0DEV")
    first = delivered(h, "C0DEV", root)
    # A mention inside that thread; with message.channels the same message also comes as a
    # plain channel `message`: only the mention is answered (one journal entry).
    ts = h.fake.send_mention("what about this?", channel="C0DEV", thread_ts=root,
                             also_message_event=True)
    msg = delivered(h, "C0DEV", ts)
    h.fake.wait_for(lambda: all_settled(h.fake))
    assert (msg.chat_type, msg.text) == ("group", "what about this?")  # the <@U0BOT> is gone
    assert msg.reply_ref == {"channel": "C0DEV", "thread_ts": root, "ts": ts}
    reply(h, first, "first answer")
    reply(h, msg, "second answer")
    assert h.fake.answers("C0DEV", root) == ["first answer", "second answer"]
    assert [m.message_id for m in h.journal.messages] == [first.message_id, msg.message_id]


def test_a_long_answer_is_split_at_4000_characters_and_every_part_lands_in_the_thread(make):
    h = ready(make())
    ts = h.fake.send_dm("tell me everything")
    msg = delivered(h, "D0USER1", ts)
    answer = "\n\n".join(f"paragraph {i} " + "word " * 300 for i in range(20))  # ~30,000 chars
    parts = split_reply(answer, h.adapter.reply_chunk_chars(), h.adapter.max_reply_parts())
    for seq, part in enumerate(parts):
        reply(h, msg, part, seq=seq)
    posted = h.fake.answers("D0USER1", ts)
    assert h.adapter.reply_chunk_chars() == REPLY_CHUNK_CHARS == 4000
    assert len(posted) == len(parts) >= 8 and all(len(p) <= 4000 for p in posted)
    assert " ".join(" ".join(posted).split()) == " ".join(answer.split())
    with pytest.raises(SendError) as info:  # the fake's size limit: 40,000 characters
        reply(h, msg, "x" * 40_001, seq=99)
    assert not info.value.retryable and "msg_too_long" in str(info.value)


def test_progress_is_posted_then_updated_at_most_once_per_interval_and_the_answer_replaces_it(
        make):
    h = ready(make(cfg_kw={"progress_interval_s": 0.2}))
    ts = h.fake.send_dm("think hard")
    msg = delivered(h, "D0USER1", ts)
    started = time.monotonic()
    text = ""
    while time.monotonic() - started < 1.0:  # a token every 10 ms, as an LLM streams
        text += "tok "
        h.adapter.progress(msg.reply_ref, text)
        gevent.sleep(0.01)
    h.fake.wait_for(lambda: not any(d.updating for d in h.adapter._drafts.values()))
    posts = h.fake.thread_posts("D0USER1", ts)
    assert len(posts) == 1  # one progress message, edited in place
    times = [posts[0].at] + [at for _, t, _, at in h.fake.updates if t == posts[0].ts]
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert 3 <= len(times) <= 6 and min(gaps) >= 0.2 - 0.02, gaps
    reply(h, msg, "the final answer")
    assert h.fake.answers("D0USER1", ts) == ["the final answer"]
    assert len(h.fake.thread_posts("D0USER1", ts)) == 1
    h.adapter.progress(msg.reply_ref, text + "late")  # after the answer: ignored
    assert h.fake.answers("D0USER1", ts) == ["the final answer"]
    assert SlackConfig.model_fields["progress_interval_s"].default == 1.0


def test_a_deleted_progress_message_means_the_answer_is_posted_anew(make):
    h = ready(make(cfg_kw={"progress_interval_s": 0.0}))
    ts = h.fake.send_dm("hi")
    msg = delivered(h, "D0USER1", ts)
    h.adapter.progress(msg.reply_ref, "partial")
    h.fake.wait_for(lambda: h.fake.thread_posts("D0USER1", ts))
    progress_ts = h.fake.thread_posts("D0USER1", ts)[0].ts
    del h.fake.messages[("D0USER1", progress_ts)]  # the user deleted it
    reply(h, msg, "final")
    assert [m.text for m in h.fake.thread_posts("D0USER1", ts)] == ["partial", "final"]


def test_allow_from_refuses_other_users_but_still_acks_them(make):
    h = ready(make(cfg_kw={"allow_from": ["U0FRIEND"]}))
    stranger = h.fake.send_dm("spam", user="U0STRANGER")
    friend = h.fake.send_dm("hi", user="U0FRIEND")
    delivered(h, "D0FRIEND", friend)
    h.fake.wait_for(lambda: all_settled(h.fake))
    assert [m.user_id for m in h.journal.messages] == ["U0FRIEND"]
    assert h.fake.envelopes_for_message("D0STRANGER", stranger)[0].acked
    assert h.fake.redelivered() == []


def test_garbage_is_skipped_and_every_envelope_is_still_acked(make):
    h = ready(make())
    conn = current_conn(h)
    h.fake.send_garbage("{not json")
    h.fake.send_garbage(b"\x00\xff binary")
    h.fake.send_raw_frame(b'{"type": "\xff\xfe"}')  # invalid UTF-8 in a text frame
    h.fake.send_garbage(json.dumps([1, 2, 3]))
    h.fake.send_garbage(json.dumps({"type": "events_api", "payload": {}}))  # no envelope_id
    h.fake.send_garbage(json.dumps({"type": "brand_new_frame"}))
    # An oversized envelope (2 MiB): not parsed, but its envelope_id is read and acked.
    big = {"envelope_id": "big-1", "type": "events_api", "payload": {"event": {
        "type": "message", "text": "x" * (2 << 20)}}}
    h.fake.send_garbage(json.dumps(big))
    h.fake.send_envelope("slash_commands", {"command": "/hermes", "text": "hi"})
    h.fake.send_envelope("interactive", {"type": "block_actions"})
    h.fake.send_envelope("shiny_new_type", {"what": "?"})
    h.fake.send_event("not an object")
    h.fake.send_event({"type": "reaction_added", "user": "U0USER1", "reaction": "+1"})
    h.fake.send_event({"type": "message", "user": "U0USER1", "channel": "D0USER1",
                       "ts": "1.000001", "channel_type": "im"})  # no text
    h.fake.send_event({"type": "message", "subtype": "bot_message", "bot_id": "B0OTHER",
                       "text": "beep", "channel": "D0USER1", "ts": "1.000002",
                       "channel_type": "im"})
    h.fake.send_event({"type": "message", "bot_id": "B0OTHER", "user": "U0OTHERBOT",
                       "text": "beep", "channel": "D0USER1", "ts": "1.000003",
                       "channel_type": "im"})
    edited = h.fake.send_dm("typo")
    h.fake.wait_for(lambda: h.journal.by_id(msg_id("D0USER1", edited)))
    h.fake.edit_message("D0USER1", edited, "fixed typo")  # message_changed
    h.fake.send_event({"type": "message", "subtype": "message_deleted", "channel": "D0USER1",
                       "ts": "1.000004", "channel_type": "im", "deleted_ts": edited})
    h.fake.send_event({"type": "message", "text": "hello #general", "user": "U0USER1",
                       "channel": "C0GENERAL", "ts": "1.000005", "channel_type": "channel"})
    h.fake.send_event({"type": "message", "text": "\ud800 lone surrogate", "user": "U0USER1",
                       "channel": "D0USER1", "ts": "1.000006", "channel_type": "im"})
    last = h.fake.send_dm("still alive")
    assert delivered(h, "D0USER1", last).text == "still alive"
    h.fake.wait_for(lambda: all_settled(h.fake) and h.fake.unknown_acks, 3)
    assert [m.text for m in h.journal.messages] == ["typo", "? lone surrogate", "still alive"]
    assert h.fake.redelivered() == [] and h.fake.foreign_acks == []
    assert h.fake.unknown_acks == [(conn, {"envelope_id": "big-1"})]  # read from its head
    assert h.fake.disconnects == [] and h.adapter.stats.connects == 1


# --- acks, redelivery, journal failures ----------------------------------------------------------

def test_a_redelivered_event_is_recognized_by_its_message_not_its_envelope(make):
    # The store stalls past Slack's ack window: Slack sends the event again (new envelope id,
    # retry_attempt 1) while the first one is still being journaled. (The reader waits for the
    # store meanwhile: pings are spaced so that the stall is not taken for a dead connection.)
    h = ready(make(journal=Journal(stall_first_s=0.5), cfg_kw={"ping_interval_s": 1.0}))
    ts = h.fake.send_dm("hello once")
    h.fake.wait_for(lambda: h.journal.duplicates == 1 and all_settled(h.fake), 3)
    record = h.fake.envelopes_for_message("D0USER1", ts)[0]
    assert [(d.attempt, d.acked_at is not None) for d in record.deliveries] == [(0, False),
                                                                               (1, True)]
    assert record.deliveries[0].envelope_id != record.deliveries[1].envelope_id
    assert len(h.journal.messages) == 1
    reply(h, h.journal.messages[0], "answer")
    assert h.fake.answers("D0USER1", ts) == ["answer"]


def test_a_failed_journal_write_is_not_acked_and_the_redelivery_is_answered_once(make):
    h = ready(make(journal=Journal(fail_first=1)))
    ts = h.fake.send_dm("keep me")
    msg = delivered(h, "D0USER1", ts)
    h.fake.wait_for(lambda: all_settled(h.fake))
    record = h.fake.envelopes_for_message("D0USER1", ts)[0]
    assert [(d.attempt, d.acked_at is not None) for d in record.deliveries] == [(0, False),
                                                                               (1, True)]
    assert h.adapter.stats.journal_failures == 1 and h.adapter.stats.connects == 1
    reply(h, msg, "kept")
    assert h.fake.answers("D0USER1", ts) == ["kept"] and len(h.journal.messages) == 1


# --- faults and recovery -------------------------------------------------------------------------

def test_a_dropped_connection_is_replaced_and_what_came_meanwhile_is_answered_once(make):
    h = ready(make())
    conn = current_conn(h)
    before = h.fake.send_dm("before")
    delivered(h, "D0USER1", before)
    t0 = time.monotonic()
    h.fake.drop()
    during = h.fake.send_dm("while we were away", user="U0BOB")
    new_conn, at = greeted_after(h, conn)
    MEASURED["drop"] = at - t0
    assert at - t0 < RECONNECT_BUDGET_S
    msg = delivered(h, "D0BOB", during)
    reply(h, msg, "answer")
    h.fake.wait_for(lambda: all_settled(h.fake))
    assert h.fake.answers("D0BOB", during) == ["answer"]
    assert Counter(m.message_id for m in h.journal.messages) == Counter(
        {msg_id("D0USER1", before): 1, msg.message_id: 1})
    calls = Counter(c["path"] for c in h.fake.rest_calls)
    assert (calls["/api/auth.test"], calls["/api/apps.connections.open"]) == (1, 2)  # a URL each
    assert h.fake.refused_tickets == []


def test_a_zombie_connection_without_pongs_is_replaced(make):
    h = ready(make(fake_kw={"pong_deadline_s": 30.0}), timeout=3)
    conn = current_conn(h)
    before = h.fake.send_dm("before")
    delivered(h, "D0USER1", before)
    h.fake.go_silent(0.6)
    t_silent = time.monotonic()
    lost = h.fake.send_dm("sent into the void", user="U0BOB")  # not acked: redelivered later
    new_conn, at = greeted_after(h, conn, timeout=5)
    MEASURED["zombie (from the end of the silence)"] = at - (t_silent + 0.6)
    assert h.adapter.stats.reconnects["zombie"] >= 1
    delivered(h, "D0BOB", lost, timeout=5)
    h.fake.wait_for(lambda: all_settled(h.fake), 5)
    assert [m.text for m in h.journal.messages] == ["before", "sent into the void"]


def test_disconnect_link_disabled_waits_before_asking_again(make):
    h = ready(make())
    h.fake.disable_link()
    wait_until(lambda: h.adapter.stats.reconnects["link_disabled"] == 1, 3, "link_disabled")
    gevent.sleep(0.3)  # a window in which a reconnect must NOT happen
    assert h.adapter.stats.state is State.BACKOFF and len(h.fake.conns) == 1


@pytest.mark.parametrize("which, error", [("bot", "invalid_auth"), ("app", "invalid_auth"),
                                          ("revoked", "account_inactive")])
def test_refused_credentials_are_fatal_without_a_reconnect_loop(make, which, error):
    cfg = {"bot": {"bot_token": SecretStr("xoxb-wrong")},
           "app": {"app_token": SecretStr("xapp-wrong")}, "revoked": {}}[which]
    h = make(cfg_kw=cfg, run=False)
    if which == "revoked":
        h.fake.revoke_bot_token("account_inactive")
    h.greenlet = gevent.spawn(run_until_stopped, h.adapter)
    err = h.greenlet.get(timeout=3)
    assert isinstance(err, FatalPlatformError) and error in str(err)
    assert "xoxb-" not in str(err) and "xapp-" not in str(err)
    assert h.adapter.stats.state is State.FATAL and h.fake.conns == {}
    assert len(h.fake.rest_calls) == (2 if which == "app" else 1)


# The issue's contract; quoted, since a bare ${...} inside a YAML flow mapping is a syntax error.
CONTRACT = """
platforms:
  slack: {app_token: '${SLACK_APP_TOKEN}', bot_token: '${SLACK_BOT_TOKEN}'}
"""


def test_the_config_contract_and_its_token_kinds_are_checked_when_read():
    env = {"SLACK_APP_TOKEN": "xapp-1-A1-2-secret", "SLACK_BOT_TOKEN": "xoxb-1-2-secret"}
    [cfg] = parse_config(CONTRACT, env=env).platforms.slack
    assert cfg.api_base == "https://slack.com/api" and cfg.enabled and cfg.allow_from == []
    assert cfg.app_token.get_secret_value() == env["SLACK_APP_TOKEN"]
    swapped = {"SLACK_APP_TOKEN": env["SLACK_BOT_TOKEN"], "SLACK_BOT_TOKEN": env["SLACK_APP_TOKEN"]}
    with pytest.raises(ConfigError) as info:
        parse_config(CONTRACT, env=swapped)
    text = str(info.value)
    assert "platforms.slack.app_token" in text and "xapp-..." in text
    assert "secret" not in text  # the values are never shown


def test_a_revoked_bot_token_while_sending_stops_this_bot_and_keeps_the_reply(make):
    h = ready(make())
    msg = delivered(h, "D0USER1", h.fake.send_dm("hi"))
    h.fake.revoke_bot_token("token_revoked")
    with pytest.raises(SendError) as info:
        reply(h, msg)
    assert info.value.retryable  # stays in the outbox for when the bot is fixed
    err = h.greenlet.get(timeout=3)
    assert isinstance(err, FatalPlatformError) and "token_revoked" in str(err)


def test_rate_limits_and_errors_on_send_are_classified(make):
    h = ready(make())
    ts = h.fake.send_dm("hi")
    msg = delivered(h, "D0USER1", ts)
    h.fake.rate_limit("chat.postMessage", 1, retry_after=7)
    with pytest.raises(SendError) as info:
        reply(h, msg)
    assert info.value.retryable and info.value.retry_after == pytest.approx(7.0)
    h.fake.fail_next("chat.postMessage", "internal_error")
    with pytest.raises(SendError) as info:
        reply(h, msg)
    assert info.value.retryable and info.value.retry_after is None
    h.fake.fail_next("chat.postMessage", "channel_not_found")
    with pytest.raises(SendError) as info:
        reply(h, msg)
    assert not info.value.retryable
    bogus = dict(msg.reply_ref, thread_ts="999.000001")
    with pytest.raises(SendError) as info:
        h.adapter.send(OutboundMessage(platform="slack", chat_id="D0USER1", text="x",
                                       reply_ref=bogus))
    assert not info.value.retryable and "thread_not_found" in str(info.value)
    reply(h, msg)  # the retry the outbox would make
    assert h.fake.answers("D0USER1", ts) == ["ok"]


def test_a_rate_limited_connections_open_waits_retry_after(make):
    h = make(run=False)
    h.fake.rate_limit("apps.connections.open", 1, retry_after=0.4)
    t0 = time.monotonic()
    h.greenlet = gevent.spawn(run_until_stopped, h.adapter)
    ready(h)
    assert time.monotonic() - t0 >= 0.4 and h.adapter.stats.reconnects["rate_limited"] == 1


def test_no_token_in_logs(make, caplog):
    caplog.set_level(logging.DEBUG)
    h = ready(make())
    msg = delivered(h, "D0USER1", h.fake.send_dm("hi"))
    reply(h, msg)
    h.fake.rate_limit("chat.postMessage", 1)
    with pytest.raises(SendError):
        reply(h, msg)
    h.fake.refresh(grace_s=0.1)
    wait_until(lambda: h.adapter.stats.reconnects["handover"] == 1, 3, "handover")
    assert caplog.records
    for secret in (h.fake.app_token, h.fake.bot_token):
        assert secret not in caplog.text


def test_check_performs_the_auth_step(make):
    h = make(run=False)
    detail = SlackAdapter.check(h.adapter.config)
    assert "credentials accepted" in detail and "U0BOT" in detail
    bad = h.adapter.config.model_copy(update={"app_token": SecretStr("xapp-nope")})
    with pytest.raises(FatalPlatformError):
        SlackAdapter.check(bad)
    assert "session established" in SlackAdapter.check(h.adapter.config, full=True)


# --- the fake against the protocol's rules -------------------------------------------------------

def test_the_fake_refuses_a_reused_url_and_the_wrong_token_kind():
    fake = FakeSlackServer(server_ping_interval_s=None).start()
    try:
        def call(method, token):
            return requests.post(f"{fake.api_base}/{method}", timeout=3,
                                 headers={"Authorization": f"Bearer {token}"}).json()
        assert call("apps.connections.open", fake.bot_token)["error"] == "not_allowed_token_type"
        assert call("chat.postMessage", fake.app_token)["error"] == "not_allowed_token_type"
        assert call("auth.test", "xoxb-unknown")["error"] == "invalid_auth"
        url = call("apps.connections.open", fake.app_token)["url"]
        ws = websocket.create_connection(url, timeout=3)
        assert json.loads(ws.recv())["type"] == "hello"
        again = websocket.create_connection(url, timeout=3)
        assert again.recv_data(control_frame=True)[0] == websocket.ABNF.OPCODE_CLOSE  # no hello
        assert len(fake.refused_tickets) == 1
        # An envelope not acked in time comes again with retry_attempt 1 and a new id.
        fake.ack_timeout_s = 0.1
        fake.send_dm("hi")
        first, second = json.loads(ws.recv()), json.loads(ws.recv())
        assert (first["retry_attempt"], second["retry_attempt"]) == (0, 1)
        assert second["retry_reason"] == "timeout"
        assert first["envelope_id"] != second["envelope_id"]
        ws.send(json.dumps({"envelope_id": second["envelope_id"]}))
        fake.wait_for(lambda: all_settled(fake))
    finally:
        fake.stop()


# --- rotation: refresh_requested without a gap ----------------------------------------------------

@pytest.fixture
def gateway(tmp_path):
    fake = FakeSlackServer(**FAKE_TIMING).start()
    agent = GateAgent()
    cfg = base_config(tmp_path / "data")
    cfg["platforms"] = {"slack": {"app_token": fake.app_token, "bot_token": fake.bot_token,
                                  "api_base": fake.api_base, "ping_interval_s": 0.1,
                                  "backoff": {"initial_s": 0.05, "max_s": 0.3}}}
    gw = Gateway(Config.model_validate(cfg), agent=agent).start()
    wait_until(lambda: "slack" in gw.adapters and gw.adapters["slack"].ready.is_set(),
               what="slack connected")
    yield SimpleNamespace(gw=gw, fake=fake, agent=agent)
    gw.shutdown()
    fake.stop()


def test_20_events_during_a_refresh_rotation_are_all_answered_once_and_none_in_a_gap(gateway):
    fake, gw = gateway.fake, gateway.gw
    adapter = gw.adapters["slack"]
    sent: list[tuple[str, str, str]] = []  # (channel, ts, text)

    def send(i: int) -> None:
        user = f"U0USER{i:02d}"  # one DM each: every event is its own turn
        text = f"question {i}"
        sent.append((fake.dm_channel(user), fake.send_dm(text, user=user), text))

    for i in range(5):
        send(i)
        gevent.sleep(0.02)
    t_refresh = time.monotonic()
    fake.refresh(grace_s=0.6)  # the server closes the old connection 0.6 s from now
    send(5)  # before the client even read the notice: these go to the old connection
    send(6)
    for i in range(7, 20):
        gevent.sleep(0.05)  # spread over the grace period and past the old connection's end
        send(i)
    fake.wait_for(lambda: all(fake.answers(ch, ts) for ch, ts, _ in sent)
                  and all_settled(fake), timeout=15)
    gevent.sleep(0.2)  # room for a wrong second answer to show up
    for channel, ts, text in sent:
        assert fake.answers(channel, ts) == [f"answer: {text}"], (channel, ts)
    records = [fake.envelopes_for_message(ch, ts)[0] for ch, ts, _ in sent]
    assert all(len(r.deliveries) == 1 and r.acked for r in records)  # acked in time, once
    assert fake.gap_events() == []
    assert fake.coverage_gaps(since=t_refresh - 0.1) == []  # a greeted connection all along
    assert fake.foreign_acks == []  # each ack went out on the connection that carried it
    old_conn_events = {r.deliveries[0].conn_id for r in records[5:7]}
    assert old_conn_events == {1} and {r.deliveries[0].conn_id for r in records[-5:]} == {2}
    assert [(d.conn_id, d.reason) for d in fake.disconnects] == [
        (1, "server_refresh_requested")]
    assert dict(adapter.stats.reconnects) == {"handover": 1} and adapter.stats.connects == 2
    MEASURED["refresh_requested (hello on the successor)"] = fake.hello_at[2] - t_refresh


def test_bad_credentials_stop_one_bot_while_the_other_keeps_answering(tmp_path):
    good, bad = (FakeSlackServer(**FAKE_TIMING).start() for _ in range(2))
    agent = GateAgent()
    cfg = base_config(tmp_path / "data")
    cfg["platforms"] = {"slack": [
        {"id": "good", "app_token": good.app_token, "bot_token": good.bot_token,
         "api_base": good.api_base, "ping_interval_s": 0.1},
        {"id": "bad", "app_token": bad.app_token, "bot_token": "xoxb-not-the-token",
         "api_base": bad.api_base, "ping_interval_s": 0.1}]}
    gw = Gateway(Config.model_validate(cfg), agent=agent).start()
    try:
        wait_until(lambda: "slack/bad" in gw.fatal, 10, "bad bot reported fatal")
        assert "invalid_auth" in gw.fatal["slack/bad"]
        assert "xoxb-not-the-token" not in gw.fatal["slack/bad"]
        wait_until(lambda: gw.adapters["slack/good"].ready.is_set(), 10, "good bot ready")
        ts = good.send_dm("are you there?")
        good.wait_for(lambda: good.answers("D0USER1", ts), 10)
        assert good.answers("D0USER1", ts) == ["answer: are you there?"]
        assert bad.conns == {} and len(bad.rest_calls) == 1  # refused once, never retried
        assert gw.adapters["slack/bad"].stats.state is State.FATAL
    finally:
        gw.shutdown()
        good.stop()
        bad.stop()


# --- files -------------------------------------------------------------------------------------

def file_out(msg, path, *, name: str, mime: str, media: str, text: str = "") -> OutboundMessage:
    return OutboundMessage(platform="slack", chat_id=msg.chat_id, text=text,
                           in_reply_to=msg.message_id, reply_ref=msg.reply_ref, kind="file",
                           file={"path": str(path), "name": name, "mime": mime, "media": media,
                                 "size": path.stat().st_size})


def test_a_shared_file_is_described_and_its_url_private_is_fetched_with_the_bot_token(make):
    h = ready(make())
    data = b"%PDF-1.4 " + bytes(range(256)) * 40
    ts = h.fake.send_file_dm(data, name="report.pdf", mimetype="application/pdf")
    msg = delivered(h, h.fake.dm_channel("U0USER1"), ts)
    [att] = msg.attachments
    assert (att.kind, att.name, att.mime, att.size) == ("file", "report.pdf",
                                                        "application/pdf", len(data))
    src = h.adapter.media_source(att, msg)
    assert src.size == len(data)
    assert requests.get(src.url, headers=src.headers, timeout=5).content == data
    # without the token Slack's file host answers a login page, never the file
    anonymous = requests.get(src.url, timeout=5)
    assert anonymous.content != data and "text/html" in anonymous.headers["Content-Type"]


def test_a_file_goes_up_by_the_external_upload_and_is_shared_once_in_the_thread(make, tmp_path):
    h = ready(make())
    ts = h.fake.send_dm("send me the notes")
    channel = h.fake.dm_channel("U0USER1")
    msg = delivered(h, channel, ts)
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"line\n" * 5000)
    h.adapter.send_file(file_out(msg, notes, name="notes.txt", mime="text/plain", media="file"))
    [shared] = h.fake.files
    assert (shared.message_id, shared.name, shared.data, shared.media) == (
        f"{channel}:{ts}", "notes.txt", notes.read_bytes(), "file")
    assert h.fake.uploads == 1
    calls = [c["path"].rsplit("/", 1)[-1] if c["path"].startswith("/api/") else "upload"
             for c in h.fake.rest_calls if c["path"] != "/api/auth.test"
             and "connections" not in c["path"]]
    assert calls == ["files.getUploadURLExternal", "upload", "files.completeUploadExternal"]
    # the upload URL carried no token; the Web API calls did
    [put] = [c for c in h.fake.rest_calls if c["path"].startswith("/upload/")]
    assert "Authorization" not in put["headers"]


def test_the_fake_shares_no_file_whose_bytes_never_arrived_and_takes_one_upload_per_url(make):
    h = make(run=False)
    auth = {"Authorization": f"Bearer {h.fake.bot_token}"}
    ticket = requests.post(f"{h.fake.api_base}/files.getUploadURLExternal", headers=auth,
                           data={"filename": "a.txt", "length": "3"}, timeout=5).json()
    h.fake.channels["C0GENERAL"] = "channel"
    complete = {"files": json.dumps([{"id": ticket["file_id"]}]), "channel_id": "C0GENERAL"}
    early = requests.post(f"{h.fake.api_base}/files.completeUploadExternal", headers=auth,
                          data=complete, timeout=5).json()
    assert early == {"ok": False, "error": "upload_not_complete"}
    assert requests.post(ticket["upload_url"], data=b"abcd", timeout=5).status_code == 400
    assert requests.post(ticket["upload_url"], data=b"abc", timeout=5).status_code == 200
    assert requests.post(ticket["upload_url"], data=b"abc", timeout=5).status_code == 400
    done = requests.post(f"{h.fake.api_base}/files.completeUploadExternal", headers=auth,
                         data=complete, timeout=5).json()
    assert done["ok"] is True and [f.data for f in h.fake.files] == [b"abc"]
    again = requests.post(f"{h.fake.api_base}/files.completeUploadExternal", headers=auth,
                          data=complete, timeout=5).json()
    assert again == {"ok": False, "error": "file_not_found"} and len(h.fake.files) == 1
