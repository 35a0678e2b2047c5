"""The SQLite store on a real file: de-duplication, one-transaction turn ends, outbox retries,
bounded history, recovery lists, clear errors for files it cannot use or write, and a file
lost while open noticed."""
import os
import sqlite3
from pathlib import Path

import pytest

from hermes_green.models import Attachment, InboundMessage, OutboundMessage
from hermes_green.store import Store, StoreError
from tests.readonly import immutable, read_only_mount


@pytest.fixture
def store(data_dir):
    s = Store(data_dir, history_limit=4).open()
    yield s
    s.close()


def msg(mid="m1", chat="c1", text="hi"):
    return InboundMessage("qqbot", mid, chat, "u1", text, reply_ref={"msg_id": mid},
                          attachments=(Attachment("image", "https://x/1.png", "1.png"),))


def part(mid="m1", seq=0, text="answer"):
    return OutboundMessage("qqbot", "c1", text, in_reply_to=mid, reply_ref={"msg_id": mid}, seq=seq)


def test_wal_mode_on_a_real_file(store):
    assert store.path.exists()
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_redelivered_message_is_recognized(store):
    assert store.journal_inbound(msg()) is True
    assert store.journal_inbound(msg()) is False
    assert store.journal_inbound(msg("m2")) is True


def test_states_and_recovery_list(store):
    store.journal_inbound(msg("m1"))
    store.journal_inbound(msg("m2"))
    store.mark_processing("qqbot", ["m1"])
    pending = store.pending_inbound()
    assert [(p.message.message_id, p.state, p.attempts) for p in pending] == \
        [("m1", "processing", 1), ("m2", "received", 0)]
    assert pending[0].message.attachments[0].name == "1.png"  # round-trips through JSON
    store.finish_turn("qqbot", "c1", ["m1"], [part("m1")], user_text="hi", answer_text="answer")
    assert store.inbound_state("qqbot", "m1") == "answered"
    assert [p.message.message_id for p in store.pending_inbound()] == ["m2"]


def test_finish_turn_is_atomic(store):
    store.journal_inbound(msg("m1"))
    bad = part("m1", 1)
    bad.reply_ref = {"not json": object()}  # fails inside the transaction, after part 0
    with pytest.raises(TypeError):
        store.finish_turn("qqbot", "c1", ["m1"], [part("m1", 0), bad], user_text="hi",
                          answer_text="a")
    assert store.outbox_pending() == 0
    assert store.inbound_state("qqbot", "m1") == "received"
    assert store.history("qqbot", "c1", 10) == []


def test_a_turn_with_a_message_finished_before_writes_nothing(store):
    """m1 was answered by an earlier run of the turn; the re-run (m1 + m2) must leave m2 open,
    queue nothing and add no history. Messages never journaled do not stop a turn."""
    store.journal_inbound(msg("m1"))
    store.journal_inbound(msg("m2"))
    assert store.finish_turn("qqbot", "c1", ["m1"], [part("m1")], user_text="hi",
                             answer_text="a") != []
    before = store.outbox_pending()
    assert store.finish_turn("qqbot", "c1", ["m1", "m2"], [part("m2")], user_text="again",
                             answer_text="b") == []
    assert store.inbound_state("qqbot", "m2") == "received"
    assert store.outbox_pending() == before
    assert [h["content"] for h in store.history("qqbot", "c1", 10)] == ["hi", "a"]
    assert store.finish_turn("qqbot", "c1", ["m2", "never-journaled"], [part("m2")],
                             user_text="q", answer_text="b") != []
    assert store.inbound_state("qqbot", "m2") == "answered"


def test_outbox_order_retry_and_done(store, monkeypatch):
    now = [1000.0]
    store._clock = lambda: now[0]
    store.finish_turn("qqbot", "c1", ["m1"], [part("m1", 0, "a"), part("m1", 1, "b")],
                      user_text="q", answer_text="ab")
    due = store.outbox_due("qqbot")
    assert [(o.seq, o.text) for o in due] == [(0, "a"), (1, "b")]
    store.outbox_retry(due[0].outbox_id, 5.0, "timeout")
    assert [o.seq for o in store.outbox_due("qqbot")] == [1]
    now[0] += 5
    again = store.outbox_due("qqbot")
    assert [(o.seq, o.attempts) for o in again] == [(0, 1), (1, 0)]
    store.outbox_done(again[0].outbox_id)
    store.outbox_dead(again[1].outbox_id, "refused")
    assert store.outbox_pending() == 0 and store.outbox_due("qqbot") == []


def test_same_part_is_never_queued_twice(store):
    ids1 = store.finish_turn("qqbot", "c1", ["m1"], [part("m1", 0)], user_text=None, answer_text=None)
    ids2 = store.finish_turn("qqbot", "c1", ["m1"], [part("m1", 0)], user_text=None, answer_text=None)
    assert len(ids1) == 1 and ids2 == [] and store.outbox_pending() == 1


def test_history_is_bounded_per_chat(store):
    for i in range(5):
        store.finish_turn("qqbot", "c1", [], [], user_text=f"q{i}", answer_text=f"a{i}")
        store.finish_turn("qqbot", "c2", [], [], user_text=f"other{i}", answer_text="x")
    assert store.history("qqbot", "c1", 10) == [
        {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"},
        {"role": "user", "content": "q4"}, {"role": "assistant", "content": "a4"}]
    assert store.history("qqbot", "c1", 2)[-1] == {"role": "assistant", "content": "a4"}
    assert len(store.history("qqbot", "c2", 10)) == 4


def test_state_survives_reopen(data_dir):
    s = Store(data_dir).open()
    s.journal_inbound(msg("m1"))
    s.finish_turn("qqbot", "c1", ["m1"], [part("m1")], user_text="q", answer_text="a")
    s.close()
    s2 = Store(data_dir).open()
    assert s2.journal_inbound(msg("m1")) is False
    assert s2.outbox_pending() == 1
    s2.close()


def test_corrupt_file_is_a_clear_error(data_dir):
    (data_dir / "hermes-green.sqlite3").write_bytes(b"garbage" * 500)
    with pytest.raises(StoreError, match="not a usable SQLite database"):
        Store(data_dir).open()


def test_unwritable_data_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "f"
    blocker.write_text("x")
    with pytest.raises(StoreError, match="gateway.data_dir: cannot create"):
        Store(blocker / "sub").open()


def wal_frames(path: Path) -> int:
    """Frames in the WAL now, as a separate connection's passive checkpoint reports them."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        return db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()[1]
    finally:
        db.close()


def test_a_checkpoint_under_steady_writes_lets_the_wal_start_over(data_dir):
    """SQLite restarts the WAL only when a write begins with every frame copied back; with a
    write landing during every copy that never happened and the WAL grew without end."""
    import gevent
    import gevent.event
    s = Store(data_dir).open()
    written, stop_at = [0], [10**9]
    filled = gevent.event.Event()  # several thousand frames in the WAL

    def writer():
        while written[0] < stop_at[0]:
            i = written[0]
            s.journal_inbound(msg(f"m{i}", chat=f"c{i % 20}"))
            s.finish_turn("qqbot", f"c{i % 20}", [f"m{i}"], [part(f"m{i}")], user_text="hi",
                          answer_text="answer")
            written[0] += 1
            if written[0] == 600:
                filled.set()
            gevent.idle()  # the other greenlets (the checkpoint's) run between writes

    g = gevent.spawn(writer)
    assert filled.wait(30)
    assert s.checkpoint() > 0  # ... while the writer keeps writing
    after_checkpoint = written[0]
    stop_at[0] = written[0] + 20
    g.join(10)
    assert written[0] == stop_at[0]  # the writer was paused at most, never stopped
    assert after_checkpoint > 600  # it wrote during the checkpoint's passes too
    # started over: only the last few messages' frames (old code: every frame since the start)
    assert wal_frames(s.path) < 2000
    s.close()
    s2 = Store(data_dir).open()
    assert s2.journal_inbound(msg(f"m{stop_at[0] - 1}", chat="x")) is False
    s2.close()


def test_checkpoint_runs_off_the_hub_and_keeps_data(data_dir):
    s = Store(data_dir).open()
    for i in range(200):
        s.journal_inbound(msg(f"m{i}"))
    wal = data_dir / "hermes-green.sqlite3-wal"
    assert wal.stat().st_size > 0  # automatic checkpoints are off: the WAL grew
    assert s.checkpoint() > 0
    s.close()
    s2 = Store(data_dir).open()
    assert s2.journal_inbound(msg("m199")) is False
    s2.close()


# --- what it cannot write, and a file lost under it -----------------------------------------

def made(data_dir) -> Path:
    """A real database file from a first run, closed."""
    s = Store(data_dir).open()
    s.journal_inbound(msg("m1"))
    s.close()
    return data_dir / "hermes-green.sqlite3"


def test_a_read_only_database_file_is_refused_at_open(data_dir):
    # Immutable: read-only even for root (tests run as root; see tests/readonly.py). SQLite
    # opens such a file read-only without complaint; before the write probe, open() accepted it.
    with immutable(made(data_dir)):
        with pytest.raises(StoreError) as e:
            Store(data_dir).open()
    assert str(e.value) == (f"{data_dir / 'hermes-green.sqlite3'}: cannot write the database "
                            "(hermes-green.sqlite3 is read-only)")


def test_a_data_dir_on_a_read_only_mount_is_refused_at_open(data_dir):
    made(data_dir)
    with read_only_mount(data_dir) as mnt:
        with pytest.raises(StoreError, match=f"gateway.data_dir: {mnt} is not writable"):
            Store(mnt).open()


def test_a_directory_in_place_of_the_database_file_is_refused(data_dir):
    (data_dir / "hermes-green.sqlite3").mkdir()
    with pytest.raises(StoreError) as e:
        Store(data_dir).open()
    assert str(e.value).endswith("cannot write the database (hermes-green.sqlite3 is not a "
                                 "regular file)")


def test_a_database_file_deleted_while_open_is_noticed(data_dir):
    s = Store(data_dir).open()
    assert s.verify_file() is None and s.health() == {"ok": True, "error": None}
    for name in ("hermes-green.sqlite3", "hermes-green.sqlite3-wal", "hermes-green.sqlite3-shm"):
        (data_dir / name).unlink()
    problem = s.verify_file()
    assert problem == f"{data_dir / 'hermes-green.sqlite3'} was deleted while the gateway runs"
    assert s.health() == {"ok": False, "error": problem}
    assert s.verify_file() is None  # reported once; health() keeps saying it
    s.close()


def test_a_database_file_replaced_while_open_is_noticed(data_dir, tmp_path):
    s = Store(data_dir).open()
    other = made(tmp_path / "other")
    os.replace(other, data_dir / "hermes-green.sqlite3")
    assert "was replaced by another file" in s.verify_file()
    assert s.health()["ok"] is False
    s.close()


def test_the_checkpoint_never_creates_a_database_where_ours_was_deleted(data_dir):
    s = Store(data_dir).open()
    s.journal_inbound(msg("m1"))
    (data_dir / "hermes-green.sqlite3").unlink()
    with pytest.raises(sqlite3.OperationalError):
        s.checkpoint()
    assert not (data_dir / "hermes-green.sqlite3").exists()
    s.close()
