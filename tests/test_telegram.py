"""Telegram: the adapter against the strict Bot API fake, through a real Gateway where the
gateway's part matters (journal, outbox, splitting), and a real gateway process for kill -9.

Every number asserted here comes from the fake's own records (calls, sent messages, edits,
chat actions), never from the adapter's view of itself.
"""
from __future__ import annotations

import logging
import signal
import sys
import time

import gevent
import pytest
import requests

from hermes_green.config import Config
from hermes_green.gateway import Gateway
from hermes_green.platforms.base import Delivery, FatalPlatformError, MemoryState, State
from hermes_green.platforms.telegram import TelegramAdapter, TelegramConfig
from hermes_green.store import Store
from hermes_green.testing.fake_telegram import FakeTelegramServer
from tests.support import GateAgent, Process, base_config, wait_until, write_config

BAD_TOKEN = "987654321:AAE-this-token-was-revoked-long-ago-xx"


@pytest.fixture
def fake():
    f = FakeTelegramServer(conflict_throttle_s=0).start()
    yield f
    f.stop()


def tg_section(fake, **over) -> dict:
    return {"token": fake.token, "api_base": fake.http_base, "poll_timeout_s": 1,
            "conflict_retry_s": 1, "progress_interval_s": 1.0, "typing_interval_s": 0.5,
            "backoff": {"initial_s": 0.2, "max_s": 2.0}, **over}


def start_gateway(tmp_path, agent, section) -> Gateway:
    data = base_config(tmp_path / "data")
    data["platforms"] = {"telegram": section}
    gw = Gateway(Config.model_validate(data), agent=agent).start()
    return gw


def ready(gw, label="telegram"):
    wait_until(lambda: label in gw.adapters and gw.adapters[label].ready.is_set(),
               what=f"{label} polling")
    return gw.adapters[label]


@pytest.fixture
def gateway(tmp_path, fake):
    agent = GateAgent()
    gw = start_gateway(tmp_path, agent, tg_section(fake))
    ready(gw)
    yield gw, agent
    gw.shutdown()


def adapter_for(fake, on_message=None, state=None, **over):
    cfg = TelegramConfig(**tg_section(fake, **over))
    seen: list = []

    def record(msg):
        seen.append(msg)
        return Delivery.NEW
    adapter = TelegramAdapter(cfg, on_message or record, saved_state=state or MemoryState())

    def run():
        try:
            adapter.run()
        except FatalPlatformError:
            pass  # the bot stopped; tests read adapter.stats
    runner = gevent.spawn(run)
    return adapter, runner, seen


def stop(adapter, runner):
    adapter.stop()
    runner.join(5)
    runner.kill()


# -- the fake itself --------------------------------------------------------------------------

def test_the_fake_keeps_updates_until_an_offset_confirms_them(fake):
    base = f"{fake.http_base}/bot{fake.token}"
    fake.user_sends("one")
    fake.user_sends("two")
    first = requests.post(base + "/getUpdates", json={"timeout": 0}).json()["result"]
    again = requests.post(base + "/getUpdates", json={"timeout": 0}).json()["result"]
    assert [u["update_id"] for u in first] == [u["update_id"] for u in again]  # unconfirmed
    rest = requests.post(base + "/getUpdates",
                         json={"offset": first[0]["update_id"] + 1}).json()["result"]
    assert [u["message"]["text"] for u in rest] == ["two"]
    assert [u["message"]["text"] for u in fake.pending_updates()] == ["two"]
    assert requests.post(f"{fake.http_base}/bot{BAD_TOKEN}/getMe").json() == {
        "ok": False, "error_code": 401, "description": "Unauthorized"}


def test_the_fake_ends_the_older_held_poll_with_409_when_a_second_poller_comes(fake):
    base = f"{fake.http_base}/bot{fake.token}"
    answers = {}

    def poll(name):
        answers[name] = requests.post(base + "/getUpdates", json={"timeout": 3})
    older = gevent.spawn(poll, "older")
    fake.wait_for(lambda: fake.bot().poll is not None)
    newer = gevent.spawn(poll, "newer")
    older.join(5)
    assert answers["older"].status_code == 409
    assert "terminated by other getUpdates request" in answers["older"].json()["description"]
    fake.user_sends("for the newer one")
    newer.join(5)
    assert answers["newer"].json()["result"][0]["message"]["text"] == "for the newer one"


# -- inbound and answers ----------------------------------------------------------------------

def test_a_private_message_is_answered_with_a_reply_to_it(fake, gateway):
    gw, agent = gateway
    mid = fake.user_sends("hello there")
    chat = fake.private_chat()
    fake.wait_for(lambda: fake.replies_to(chat, mid))
    assert [m.text for m in fake.replies_to(chat, mid)] == ["answer: hello there"]
    # getMe and deleteWebhook came before the first poll; polls long-poll for "message" only
    methods = [c.method for c in fake.calls]
    assert methods.index("getme") < methods.index("deletewebhook") < methods.index("getupdates")
    poll = fake.poll_calls()[0]
    assert poll.params["timeout"] == 1 and poll.params["allowed_updates"] == ["message"]


def test_in_a_group_only_mentions_replies_and_commands_for_this_bot_are_answered(fake, gateway):
    gw, agent = gateway
    group, alice, bob = fake.group(), fake.user(2), fake.user(3)
    ignored = [fake.user_sends(text, chat=group, user=alice)
               for text in ("hello everyone", "@other_bot do it", "/help", "/ask@other_bot x",
                            "mail hermes_test_bot@example.com")]
    mention = fake.user_sends("hey @Hermes_Test_Bot what time is it?", chat=group, user=alice)
    command = fake.user_sends("/help@hermes_test_bot", chat=group, user=bob)  # the gateway's
    fake.wait_for(lambda: fake.replies_to(group, mention) and fake.replies_to(group, command))
    bot_msg = fake.replies_to(group, mention)[0].message_id
    reply = fake.user_sends("and tomorrow?", chat=group, user=alice, reply_to=bot_msg)
    to_alice = fake.user_sends("thanks", chat=group, user=bob, reply_to=mention)  # not to us
    fake.wait_for(lambda: fake.replies_to(group, reply))
    last = fake.user_sends("@hermes_test_bot last one", chat=group, user=bob)
    fake.wait_for(lambda: fake.replies_to(group, last))
    assert agent.turns == ["hey what time is it?", "and tomorrow?", "last one"]
    assert fake.replies_to(group, command)[0].text.startswith("Commands:\n/stop")
    assert all(not fake.replies_to(group, mid) for mid in ignored + [to_alice])


def test_an_answer_longer_than_4096_characters_goes_out_in_parts(fake, tmp_path):
    paragraph = ("word " * 199 + "end.\n\n")  # 1001 characters
    answer = paragraph * 10

    class LongAgent:
        def run_turn(self, turn):
            return answer

        def close(self):
            pass
    gw = start_gateway(tmp_path, LongAgent(), tg_section(fake))
    try:
        ready(gw)
        mid = fake.user_sends("tell me everything")
        chat = fake.private_chat()
        fake.wait_for(lambda: sum(len(m.text) for m in fake.replies_to(chat, mid))
                      >= len(answer.strip()) - 20)
        parts = [m.text for m in fake.replies_to(chat, mid)]
        assert len(parts) == 3 and all(len(p) <= 4096 for p in parts)
        assert " ".join(parts).split() == answer.split()  # nothing lost, in order
        assert not [c for c in fake.calls_of("sendMessage") if c.status != 200]
    finally:
        gw.shutdown()


def test_while_a_turn_runs_the_chat_shows_typing_and_the_first_part_is_edited(fake, tmp_path):
    steps = gevent.event.Event()

    class StreamingAgent:
        def run_turn(self, turn):
            text = ""
            for i in range(25):  # 2.5 s of streaming, a progress call every 0.1 s
                text += f"w{i} "
                turn.on_progress(text)
                gevent.sleep(0.1)
            steps.set()
            return text + "done"

        def close(self):
            pass
    gw = start_gateway(tmp_path, StreamingAgent(), tg_section(fake))
    try:
        ready(gw)
        mid = fake.user_sends("stream please")
        chat = fake.private_chat()
        fake.wait_for(lambda: any(m.edits and m.edits[-1].endswith("done")
                                  for m in fake.replies_to(chat, mid)), timeout=15)
        sent = fake.replies_to(chat, mid)
        assert len(sent) == 1  # the progress message became the answer: no second copy
        edits = [t for t, c, m, _ in fake.edits if c == chat["id"] and m == sent[0].message_id]
        # at most about one edit a second while streaming, plus the final one
        assert 1 <= len(edits) <= 5
        assert all(b - a >= 0.9 for a, b in zip(edits[:-2], edits[1:-1]))
        typing = [t for t, c, a in fake.chat_actions if c == chat["id"] and a == "typing"]
        assert len(typing) >= 2  # renewed after our first message cleared it
        assert fake.typing_visible(chat, edits[0] - 0.01)
    finally:
        gw.shutdown()


# -- the connection ---------------------------------------------------------------------------

def test_a_second_poller_is_reported_and_retried_with_backoff_not_in_a_tight_loop(fake, caplog):
    caplog.set_level(logging.WARNING, logger="hermes_green")
    adapter, runner, seen = adapter_for(fake)
    try:
        adapter.ready.wait(5)
        fake.wait_for(lambda: fake.poll_calls())
        fake.start_rival_poller(timeout=1)
        fake.wait_for(lambda: any(c.status == 409 for c in fake.poll_calls()))
        window_start = time.monotonic()
        gevent.sleep(4.0)
        ours = [c for c in fake.poll_calls() if c.at >= window_start]
        # conflict_retry_s=1 and growing backoff: a handful of tries in 4 s, not hundreds
        assert 1 <= len(ours) <= 6, len(ours)
        assert any("another getUpdates poller" in r.getMessage() for r in caplog.records)
        assert adapter.stats.reconnects["conflict"] >= 1
        fake.stop_rivals()
        mid = fake.user_sends("are you back?")
        wait_until(lambda: seen, timeout=20, what="message after the rival left")
        assert seen[0].message_id == f"{fake.private_chat()['id']}:{mid}"
    finally:
        stop(adapter, runner)


def test_a_429_on_polling_is_honoured_for_its_retry_after(fake):
    adapter, runner, seen = adapter_for(fake)
    try:
        adapter.ready.wait(5)
        fake.flood(1, retry_after=2, method="getUpdates")
        fake.wait_for(lambda: any(c.status == 429 for c in fake.poll_calls()))
        limited = next(c for c in fake.poll_calls() if c.status == 429)
        fake.wait_for(lambda: any(c.at > limited.at for c in fake.poll_calls()), timeout=10)
        after = next(c for c in fake.poll_calls() if c.at > limited.at)
        assert after.at - limited.answered_at >= 1.95
        assert adapter.stats.reconnects["rate_limited"] == 1
    finally:
        stop(adapter, runner)


def test_a_429_on_a_reply_is_retried_after_retry_after_and_answered_once(fake, gateway):
    fake.flood(1, retry_after=1, method="sendMessage")
    mid = fake.user_sends("busy?")
    chat = fake.private_chat()
    fake.wait_for(lambda: fake.replies_to(chat, mid), timeout=15)
    calls = fake.calls_of("sendMessage")
    assert [c.status for c in calls] == [429, 200]
    assert calls[1].at - calls[0].answered_at >= 0.95
    assert len(fake.replies_to(chat, mid)) == 1


def test_a_bad_token_stops_that_bot_only_and_the_other_keeps_answering(fake, tmp_path):
    agent = GateAgent()
    gw = start_gateway(tmp_path, agent, [tg_section(fake, id="revoked", token=BAD_TOKEN),
                                         tg_section(fake, id="good")])
    try:
        wait_until(lambda: gw.adapters.get("telegram/revoked") is not None
                   and gw.adapters["telegram/revoked"].stats.state is State.FATAL,
                   what="revoked bot fatal")
        ready(gw, "telegram/good")
        mid = fake.user_sends("still there?")
        fake.wait_for(lambda: fake.replies_to(fake.private_chat(), mid))
        bad_calls = [c for c in fake.calls if c.token == BAD_TOKEN]
        assert [(c.method, c.status) for c in bad_calls] == [("getme", 401)]  # never retried
        assert "refused the bot token" in gw.adapters["telegram/revoked"].stats.last_error
    finally:
        gw.shutdown()


def test_check_names_the_bot_and_never_polls(fake):
    detail = TelegramAdapter.check(TelegramConfig(**tg_section(fake)), full=True)
    assert detail == "bot @hermes_test_bot id=123456789 webhook=none pending_updates=0"
    with pytest.raises(FatalPlatformError, match="refused the bot token"):
        TelegramAdapter.check(TelegramConfig(**tg_section(fake, token=BAD_TOKEN)))
    # a poll (or deleteWebhook) here would disturb a gateway already running on this token
    assert {c.method for c in fake.calls} == {"getme", "getwebhookinfo"}


def test_garbage_updates_are_skipped_and_polling_goes_on(fake, gateway):
    gw, agent = gateway
    chat, group = fake.private_chat(), fake.group()
    fake.inject_update({"edited_message": {"message_id": 99, "text": "edit", "chat": chat,
                                           "from": fake.user(), "date": 1}}, force=True)
    fake.inject_update({"brand_new_kind": {"x": [1, 2, {"y": None}]}}, force=True)
    fake.inject_update({"message": "not an object"}, force=True)
    fake.inject_update({"message": {"message_id": 5, "text": "no chat"}}, force=True)
    fake.inject_update({"message": {"message_id": 6, "text": "x" * 200_000, "chat": chat,
                                    "from": fake.user(), "date": 1}}, force=True)
    fake.inject_update({"message": {"message_id": 7, "chat": chat, "from": fake.user(),
                                    "date": 1, "text": "", "entities": "garbage"}}, force=True)
    fake.user_sends_sticker()
    fake.user_sends("@hermes_test_bot hi", chat=group,
                    entities=[{"type": "mention", "offset": 10_000, "length": -3}, 7, None])
    fake.garbage_next("getUpdates")  # one answer that is not JSON at all
    good = fake.user_sends("a real question")
    fake.wait_for(lambda: fake.replies_to(chat, good), timeout=15)
    assert agent.turns == ["a real question"]
    wait_until(lambda: not fake.pending_updates(), what="every update confirmed")
    assert gw.adapters["telegram"].ready.is_set()


def test_the_offset_is_saved_so_a_restart_neither_skips_nor_repeats(fake):
    state = MemoryState()
    adapter, runner, seen = adapter_for(fake, state=state)
    try:
        adapter.ready.wait(5)
        first = fake.user_sends("first")
        wait_until(lambda: seen, what="first delivered")
    finally:
        stop(adapter, runner)
    second = fake.user_sends("second")  # arrives while no one polls
    adapter2, runner2, seen2 = adapter_for(fake, state=state)
    try:
        wait_until(lambda: seen2, what="second delivered")
        gevent.sleep(1.5)  # one more poll round: nothing else may come
        chat = fake.private_chat()["id"]
        assert [m.message_id for m in seen2] == [f"{chat}:{second}"]
        assert first != second
    finally:
        stop(adapter2, runner2)


def test_no_log_line_ever_carries_the_token(fake, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    adapter, runner, seen = adapter_for(fake)
    bad, bad_runner, _ = adapter_for(fake, token=BAD_TOKEN)
    # nothing listens there: requests' ConnectionError text holds the whole URL
    lost, lost_runner, _ = adapter_for(fake, api_base="http://127.0.0.1:9")
    try:
        adapter.ready.wait(5)
        fake.flood(1, retry_after=1, method="getUpdates")
        fake.garbage_next("getUpdates")
        fake.user_sends("hi")
        wait_until(lambda: seen, timeout=15, what="delivered")
        bad_runner.join(5)
        wait_until(lambda: lost.stats.reconnects["network"] >= 2, what="network errors")
    finally:
        for a, r in ((adapter, runner), (bad, bad_runner), (lost, lost_runner)):
            stop(a, r)
    lines = [r.getMessage() + (caplog.handler.format(r) if r.exc_info else "")
             for r in caplog.records]
    assert any("getUpdates" in line or "poll" in line for line in lines)
    for token in (fake.token, BAD_TOKEN, fake.token.split(":")[1], BAD_TOKEN.split(":")[1]):
        assert not [line for line in lines if token in line]


# -- a real gateway process -------------------------------------------------------------------

@pytest.mark.parametrize("offset_saved", [True, False], ids=["offset_saved", "offset_lost"])
def test_kill_9_between_journaling_and_the_next_poll_then_restart_answers_once(
        tmp_path, fake, offset_saved):
    """The update is journaled and its turn running; the poll that would confirm it never
    reaches the server (kill -9). With the offset saved, the restart confirms it and the journal
    runs the turn again; with the offset lost too (a crash just before the save), Telegram hands
    the update out again and the journal recognizes it. Either way: one answer."""
    from tests.fakes.fake_testchat import FakeTestChat
    testchat = FakeTestChat().start()  # the launcher's own test platform, idle here
    data = base_config(tmp_path / "data")
    data["platforms"] = {"telegram": tg_section(fake)}
    cfg = write_config(tmp_path / "c.yaml", data)

    def start(delay):
        p = Process([sys.executable, "tests/fakes/gateway_process.py", str(cfg),
                     testchat.ws_url, str(delay)])
        p.wait_line("GATEWAY_STARTED")
        return p

    gw = start(30.0)  # the turn would take 30 s: it is still running when we kill
    try:
        fake.wait_for(lambda: fake.poll_calls())
        mid = fake.user_sends("question one")
        uid = fake.pending_updates()[-1]["update_id"]
        fake.hold_polls(confirming=uid)
        gw.wait_line("TURN_STARTED question one")
        fake.wait_for(lambda: fake.parked_polls())
    finally:
        gw.kill()
    fake.release_polls(discard=True)  # that poll never arrived: nothing was confirmed
    chat = fake.private_chat()
    assert [u["update_id"] for u in fake.pending_updates()] == [uid]
    assert fake.replies_to(chat, mid) == []
    if not offset_saved:
        store = Store(tmp_path / "data").open()
        assert store.state_get("telegram", "offset") == str(uid + 1)
        store.state_put("telegram", "offset", str(uid))  # as if the crash came before the save
        store.close()
    polls_before = len(fake.poll_calls())

    gw2 = start(0.0)
    try:
        fake.wait_for(lambda: fake.replies_to(chat, mid), timeout=20)
        fake.wait_for(lambda: len(fake.poll_calls()) > polls_before)
        first_poll = fake.poll_calls()[polls_before]
        assert first_poll.params["offset"] == (uid + 1 if offset_saved else uid)
        later = fake.user_sends("question two")
        fake.wait_for(lambda: fake.replies_to(chat, later), timeout=20)
        # same chat, in order: a second answer to question one would have come before this
        assert [m.text for m in fake.replies_to(chat, mid)] == ["echo: question one"]
        assert [m.text for m in fake.replies_to(chat, later)] == ["echo: question two"]
        assert not fake.pending_updates()
    finally:
        gw2.signal(signal.SIGTERM)
        assert gw2.wait() == 0
        testchat.stop()
