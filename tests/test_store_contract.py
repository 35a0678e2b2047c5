"""One contract, two stores: every test here runs on the SQLite file and on a real redis-server
(tests/redis_support.py), through the interface the gateway uses (store_base.StoreBase).
SQLite-only matters (WAL, files lost or read-only) stay in test_store.py."""
import pytest

from hermes_green.models import Attachment, InboundMessage, OutboundMessage
from hermes_green.store import Store
from hermes_green.store_base import StoreBase, StoreError, make_store
from hermes_green.store_redis import RedisStore


@pytest.fixture(params=["sqlite", "redis"])
def kind(request):
    return request.param


@pytest.fixture
def opener(kind, request, data_dir):
    """A function that opens a (new handle on the same) store of this kind."""
    opened = []

    def open_(history_limit=4):
        if kind == "sqlite":
            s = Store(data_dir, history_limit=history_limit)
        else:
            s = RedisStore(request.getfixturevalue("redis_url"), history_limit=history_limit)
        opened.append(s.open())
        return s
    yield open_
    for s in opened:
        s.close()


@pytest.fixture
def store(opener) -> StoreBase:
    return opener()


def msg(mid="m1", chat="c1", text="hi", bot=""):
    return InboundMessage("qqbot", mid, chat, "u1", text, reply_ref={"msg_id": mid}, bot=bot,
                          attachments=(Attachment("image", "https://x/1.png", "1.png"),))


def part(mid="m1", seq=0, text="answer", chat="c1"):
    return OutboundMessage("qqbot", chat, text, in_reply_to=mid, reply_ref={"msg_id": mid},
                           seq=seq)


def test_a_redelivered_message_is_recognized(store):
    assert store.journal_inbound(msg()) is True
    assert store.journal_inbound(msg()) is False
    assert store.journal_inbound(msg("m2")) is True


def test_two_bots_of_one_platform_never_share_a_journal_entry(store):
    assert store.journal_inbound(msg("m1", bot="sales")) is True
    assert store.journal_inbound(msg("m1", bot="support")) is True
    assert store.inbound_state("qqbot/sales", "m1") == "received"
    assert store.inbound_state("qqbot", "m1") is None


def test_states_attempts_and_the_recovery_list(store):
    store.journal_inbound(msg("m1"))
    store.journal_inbound(msg("m2"))
    store.mark_processing("qqbot", ["m1"])
    pending = store.pending_inbound()
    assert [(p.message.message_id, p.state, p.attempts) for p in pending] == \
        [("m1", "processing", 1), ("m2", "received", 0)]
    assert pending[0].message.attachments[0].name == "1.png"  # round-trips through JSON
    one = store.inbound("qqbot", "m1")
    assert (one.message.text, one.state, one.attempts) == ("hi", "processing", 1)
    assert store.inbound("qqbot", "nope") is None
    store.finish_turn("qqbot", "c1", ["m1"], [part("m1")], user_text="hi", answer_text="answer")
    assert store.inbound_state("qqbot", "m1") == "answered"
    store.mark_processing("qqbot", ["m1"])  # closed: untouched
    assert store.inbound("qqbot", "m1").attempts == 1
    assert [p.message.message_id for p in store.pending_inbound()] == ["m2"]


def test_finish_turn_writes_nothing_when_a_part_cannot_be_written(store):
    store.journal_inbound(msg("m1"))
    bad = part("m1", 1)
    bad.reply_ref = {"not json": object()}
    with pytest.raises(TypeError):
        store.finish_turn("qqbot", "c1", ["m1"], [part("m1", 0), bad], user_text="hi",
                          answer_text="a")
    assert store.outbox_pending() == 0
    assert store.inbound_state("qqbot", "m1") == "received"
    assert store.history("qqbot", "c1", 10) == []


def test_a_turn_finished_twice_is_written_once(store):
    """A message run twice (a worker presumed dead finishes late, a re-claimed entry) gets one
    reply: the second finish_turn finds the message closed and writes nothing."""
    store.journal_inbound(msg("m1"))
    first = store.finish_turn("qqbot", "c1", ["m1"], [part("m1", 0, "first")], user_text="q",
                              answer_text="first")
    second = store.finish_turn("qqbot", "c1", ["m1"], [part("m1", 0, "second"),
                                                        part("m1", 1, "more")],
                               user_text="q", answer_text="second", state="failed")
    assert len(first) == 1 and second == []
    assert [o.text for o in store.outbox_due("qqbot")] == ["first"]
    assert store.inbound_state("qqbot", "m1") == "answered"
    assert store.history("qqbot", "c1", 10) == [{"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "first"}]


def test_outbox_order_retry_done_and_dead(store):
    now = [1000.0]
    store._clock = lambda: now[0]
    parts = [part("m1", 0, "a"), part("m1", 1, "b")]
    ids = store.finish_turn("qqbot", "c1", ["m1"], parts, user_text="q", answer_text="ab")
    assert [p.outbox_id for p in parts] == ids and len(set(ids)) == 2
    due = store.outbox_due("qqbot")
    assert [(o.seq, o.text, o.reply_ref, o.in_reply_to) for o in due] == \
        [(0, "a", {"msg_id": "m1"}, "m1"), (1, "b", {"msg_id": "m1"}, "m1")]
    assert store.outbox_next_due_at("qqbot") == 1000.0
    store.outbox_retry(due[0].outbox_id, 5.0, "timeout")
    assert [o.seq for o in store.outbox_due("qqbot")] == [1]
    now[0] += 5
    again = store.outbox_due("qqbot")
    assert [(o.seq, o.attempts) for o in again] == [(0, 1), (1, 0)]
    assert store.outbox_bots() == ["qqbot"]
    store.outbox_done(again[0].outbox_id)
    assert store.outbox_pending() == 1 and store.outbox_pending("qqbot") == 1
    store.outbox_dead(again[1].outbox_id, "refused")
    assert store.outbox_pending() == 0 and store.outbox_due("qqbot") == []
    assert store.outbox_dead_count() == 1 and store.outbox_dead_count("qqbot") == 1
    assert store.outbox_bots() == [] and store.outbox_next_due_at("qqbot") is None


def test_due_rows_come_in_id_order_across_chats(store):
    for i in range(6):
        store.finish_turn("qqbot", f"c{i % 2}", [f"m{i}"], [part(f"m{i}", 0, f"t{i}",
                                                                 chat=f"c{i % 2}")],
                          user_text=None, answer_text=None)
    assert [o.text for o in store.outbox_due("qqbot")] == [f"t{i}" for i in range(6)]
    assert [o.text for o in store.outbox_due("qqbot", limit=2)] == ["t0", "t1"]


def test_the_same_part_is_never_queued_twice_while_pending(store):
    ids1 = store.finish_turn("qqbot", "c1", ["m1"], [part("m1", 0)], user_text=None,
                             answer_text=None)
    ids2 = store.finish_turn("qqbot", "c1", ["m1"], [part("m1", 0)], user_text=None,
                             answer_text=None)
    assert len(ids1) == 1 and ids2 == [] and store.outbox_pending() == 1


def test_history_is_bounded_per_chat(store):
    for i in range(5):
        store.finish_turn("qqbot", "c1", [], [], user_text=f"q{i}", answer_text=f"a{i}")
        store.finish_turn("qqbot", "c2", [], [], user_text=f"other{i}", answer_text="x")
    assert store.history("qqbot", "c1", 10) == [
        {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"},
        {"role": "user", "content": "q4"}, {"role": "assistant", "content": "a4"}]
    assert store.history("qqbot", "c1", 2)[-1] == {"role": "assistant", "content": "a4"}
    assert store.history("qqbot", "c1", 0) == []
    assert len(store.history("qqbot", "c2", 10)) == 4


def test_adapter_state_is_kept_per_bot(store):
    a, b = store.adapter_state("qqbot/a"), store.adapter_state("qqbot/b")
    a.put("session", "s-1")
    b.put("session", "s-2")
    assert (a.get("session"), b.get("session"), a.get("other")) == ("s-1", "s-2", None)
    a.put("session", None)
    assert a.get("session") is None and b.get("session") == "s-2"


def test_everything_survives_a_new_handle(opener):
    s = opener()
    s.journal_inbound(msg("m1"))
    s.journal_inbound(msg("m2", text="unanswered"))
    s.finish_turn("qqbot", "c1", ["m1"], [part("m1")], user_text="q", answer_text="a")
    s.state_put("qqbot", "offset", "42")
    s.close()
    s2 = opener()
    assert s2.journal_inbound(msg("m1")) is False
    assert s2.outbox_pending() == 1
    assert [p.message.text for p in s2.pending_inbound()] == ["unanswered"]
    assert s2.state_get("qqbot", "offset") == "42"
    assert s2.history("qqbot", "c1", 10)[-1]["content"] == "a"


def test_health_is_ok_while_open(store):
    assert store.health() == {"ok": True, "error": None}
    assert store.describe()


def test_the_config_chooses_the_store(kind, request, data_dir):
    from hermes_green.config import GatewayConfig
    if kind == "sqlite":
        chosen = make_store(GatewayConfig(data_dir=data_dir))
        assert isinstance(chosen, Store)
    else:
        chosen = make_store(GatewayConfig(data_dir=data_dir,
                                          store=request.getfixturevalue("redis_url")))
        assert isinstance(chosen, RedisStore)


def test_redis_unreachable_at_open_is_one_clear_line():
    from hermes_green.testing.redis_server import free_port
    port = free_port()  # nothing listens there
    with pytest.raises(StoreError) as e:
        RedisStore(f"redis://:s3cret@127.0.0.1:{port}/0").open()
    text = str(e.value)
    assert text.startswith(f"gateway.store: redis://:***@127.0.0.1:{port}/0: cannot reach Redis")
    assert "s3cret" not in text and "\n" not in text


# -- conversation control: refused messages, /new, pairing, per-process values ------------

def test_a_refused_message_is_recognized_and_never_pending(store):
    assert store.journal_inbound(msg("r1"), state="refused") is True
    assert store.inbound_state("qqbot", "r1") == "refused"
    assert store.journal_inbound(msg("r1")) is False
    assert store.pending_inbound() == []
    with pytest.raises(ValueError):
        store.journal_inbound(msg("r2"), state="answered")
    # a turn that would close it again writes nothing
    assert store.finish_turn("qqbot", "c1", ["r1"], [part("r1")], user_text="x",
                             answer_text="y") == []


def test_clear_history_forgets_one_chat(store):
    store.finish_turn("qqbot", "c1", [], [], user_text="a", answer_text="b")
    store.finish_turn("qqbot", "c2", [], [], user_text="x", answer_text="y")
    assert store.clear_history("qqbot", "c1") == 2
    assert store.history("qqbot", "c1", 10) == []
    assert len(store.history("qqbot", "c2", 10)) == 2


def test_pairing_codes_are_one_at_a_time_one_time_and_expire(store):
    now = [5000.0]
    store._clock = lambda: now[0]
    codes = iter(["AAAA2222", "AAAA2222", "BBBB3333", "CCCC4444"])
    first = store.pairing_request("qqbot", "u1", "u1", ttl_s=3600, make_code=lambda: next(codes))
    assert first == "AAAA2222"
    assert store.pairing_request("qqbot", "u1", "u1", ttl_s=3600, make_code=lambda: "X") is None
    assert store.pairing_request("qqbot", "u2", "u2", ttl_s=3600,
                                 make_code=lambda: next(codes)) == "BBBB3333"
    now[0] += 3601
    assert store.pairing_approve("AAAA2222") == ("expired", "qqbot", "u1")
    assert not store.is_paired("qqbot", "u1")
    assert store.pairing_request("qqbot", "u1", "u1", ttl_s=3600,
                                 make_code=lambda: next(codes)) == "CCCC4444"
    assert store.pairing_approve("AAAA2222") == ("unknown", None, None)  # replaced
    assert store.pairing_approve("CCCC4444") == ("approved", "qqbot", "u1")
    assert store.pairing_approve("CCCC4444") == ("unknown", None, None)
    assert store.is_paired("qqbot", "u1") and not store.is_paired("telegram", "u1")
    assert store.pairing_request("qqbot", "u1", "u1", ttl_s=3600, make_code=lambda: "Z") is None
    listed = [(r["bot"], r["user_id"], r["state"], r["code"], r["chat_id"])
              for r in store.pairing_list()]
    assert listed == [("qqbot", "u1", "approved", None, "u1"),
                      ("qqbot", "u2", "pending", "BBBB3333", "u2")]
    assert store.pairing_revoke("u1", "telegram") == 0
    assert store.pairing_revoke("u1") == 1 and not store.is_paired("qqbot", "u1")
    assert store.pairing_revoke("u2", "qqbot") == 1 and store.pairing_list() == []
    assert store.pairing_approve("BBBB3333") == ("unknown", None, None)


def test_small_named_values(store):
    assert store.meta_get("last_reload") is None
    store.meta_put("last_reload", "ok")
    store.meta_put("last_reload", "again")
    assert store.meta_get("last_reload") == "again"


def test_a_payload_is_rewritten_once_its_media_was_fetched(store):
    store.journal_inbound(msg("m1"))
    fetched = msg("m1")
    fetched.attachments = (Attachment("image", "https://x/1.png", "1.png"),)
    fetched.text = "hi (with the picture fetched)"
    store.update_inbound(fetched)
    assert store.inbound("qqbot", "m1").message.text == "hi (with the picture fetched)"
    store.update_inbound(msg("never-journaled"))  # nothing to rewrite: nothing created
    assert store.inbound("qqbot", "never-journaled") is None


def test_file_rows_keep_their_file_until_sent(store):
    store.journal_inbound(msg("m1"))
    text = part("m1", 0, "here it is")
    file_part = OutboundMessage("qqbot", "c1", "report.pdf", in_reply_to="m1",
                                reply_ref={"msg_id": "m1"}, seq=1, kind="file",
                                file={"path": "/data/media/out/report.pdf", "name": "report.pdf",
                                      "mime": "application/pdf"})
    store.finish_turn("qqbot", "c1", ["m1"], [text, file_part], user_text="hi",
                      answer_text="here it is")
    due = store.outbox_due("qqbot")
    assert [(o.kind, o.file and o.file["name"]) for o in due] == [("text", None),
                                                                 ("file", "report.pdf")]
    assert store.outbox_files() == {"/data/media/out/report.pdf"}
    for o in due:
        store.outbox_done(o.outbox_id)
    assert store.outbox_files() == set()
