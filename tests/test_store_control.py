"""The store's part in conversation control: schema 3 (the 'refused' journal state, migrated
from v2 and v1 files with their rows), pairing codes (one at a time, one-time, expiring), and
/new's history reset."""
import sqlite3

import pytest

from hermes_green.models import InboundMessage
from hermes_green.store import SCHEMA_VERSION, Store

V2_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE inbound (
    bot TEXT NOT NULL, message_id TEXT NOT NULL, chat_id TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('received', 'processing', 'answered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0, payload TEXT NOT NULL,
    received_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (bot, message_id));
CREATE INDEX inbound_open ON inbound (state) WHERE state IN ('received', 'processing');
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, bot TEXT NOT NULL, chat_id TEXT NOT NULL,
    in_reply_to TEXT, seq INTEGER NOT NULL DEFAULT 0, reply_ref TEXT NOT NULL, text TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, last_error TEXT,
    created_at REAL NOT NULL);
CREATE TABLE history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, bot TEXT NOT NULL, chat_id TEXT NOT NULL,
    role TEXT NOT NULL, content TEXT NOT NULL, at REAL NOT NULL);
"""


def message(mid, text="hi", platform="qqbot"):
    return InboundMessage(platform=platform, message_id=mid, chat_id="c1", user_id="u1",
                          text=text)


def old_file(data_dir, version):
    db = sqlite3.connect(data_dir / "hermes-green.sqlite3")
    schema = V2_SCHEMA if version == 2 else V2_SCHEMA.replace("bot TEXT", "platform TEXT") \
        .replace("(bot, message_id)", "(platform, message_id)")
    db.executescript(schema)
    key = "bot" if version == 2 else "platform"
    db.execute(f"INSERT INTO inbound ({key}, message_id, chat_id, state, attempts, payload,"
               " received_at, updated_at) VALUES ('qqbot', 'old1', 'c1', 'received', 1, ?, 1, 1)",
               (message("old1", "before the upgrade").to_json(),))
    db.execute(f"INSERT INTO inbound ({key}, message_id, chat_id, state, attempts, payload,"
               " received_at, updated_at) VALUES ('qqbot', 'old2', 'c1', 'answered', 1, ?, 2, 2)",
               (message("old2").to_json(),))
    db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(version),))
    db.commit()
    db.close()


@pytest.mark.parametrize("version", [1, 2])
def test_an_older_file_is_migrated_with_its_rows_and_takes_refused(data_dir, version):
    old_file(data_dir, version)
    store = Store(data_dir).open()
    try:
        assert store.meta_get("schema") == str(SCHEMA_VERSION) == "4"  # 4: outbox files
        pending = store.pending_inbound()
        assert [(p.message.message_id, p.message.text, p.attempts) for p in pending] == [
            ("old1", "before the upgrade", 1)]
        assert store.inbound_state("qqbot", "old2") == "answered"
        assert store.journal_inbound(message("new1"), state="refused")
        assert store.inbound_state("qqbot", "new1") == "refused"
        assert not store.journal_inbound(message("new1"))  # still de-duplicated
        assert [p.message.message_id for p in store.pending_inbound()] == ["old1"]
        indexes = {r[0] for r in store.db.execute("SELECT name FROM sqlite_master WHERE "
                                                  "type='index'")}
        assert {"inbound_open", "pairing_code"} <= indexes
    finally:
        store.close()
    # a second open finds nothing to migrate
    store = Store(data_dir).open()
    assert store.inbound_state("qqbot", "new1") == "refused"
    store.close()


def test_a_message_is_journaled_only_as_received_or_refused(data_dir):
    store = Store(data_dir).open()
    try:
        with pytest.raises(ValueError):
            store.journal_inbound(message("x"), state="answered")
        assert store.journal_inbound(message("y"))
        with pytest.raises(sqlite3.IntegrityError):  # and the schema refuses other states
            store.db.execute("UPDATE inbound SET state='maybe'")
    finally:
        store.close()


class Clock:
    def __init__(self):
        self.now = 5000.0

    def __call__(self):
        return self.now


def test_pairing_codes_are_one_at_a_time_one_time_and_expire(data_dir):
    clock = Clock()
    store = Store(data_dir, clock=clock).open()
    codes = iter(["AAAA2222", "AAAA2222", "BBBB3333", "CCCC4444"])
    try:
        first = store.pairing_request("qqbot", "u1", "u1", ttl_s=3600, make_code=lambda: next(codes))
        assert first == "AAAA2222"
        # while it is valid, the user's next messages draw nothing
        assert store.pairing_request("qqbot", "u1", "u1", ttl_s=3600, make_code=lambda: "X") is None
        # another user cannot get the same code: a collision draws again
        assert store.pairing_request("qqbot", "u2", "u2", ttl_s=3600,
                                     make_code=lambda: next(codes)) == "BBBB3333"
        clock.now += 3601
        assert store.pairing_approve("AAAA2222") == ("expired", "qqbot", "u1")
        assert not store.is_paired("qqbot", "u1")
        renewed = store.pairing_request("qqbot", "u1", "u1", ttl_s=3600,
                                        make_code=lambda: next(codes))
        assert renewed == "CCCC4444"
        assert store.pairing_approve("CCCC4444") == ("approved", "qqbot", "u1")
        assert store.pairing_approve("CCCC4444") == ("unknown", None, None)
        assert store.is_paired("qqbot", "u1") and not store.is_paired("telegram", "u1")
        assert store.pairing_request("qqbot", "u1", "u1", ttl_s=3600, make_code=lambda: "Z") is None
        listed = [(r["bot"], r["user_id"], r["state"], r["code"]) for r in store.pairing_list()]
        assert listed == [("qqbot", "u1", "approved", None), ("qqbot", "u2", "pending", "BBBB3333")]
        assert store.pairing_revoke("u1", "telegram") == 0
        assert store.pairing_revoke("u1") == 1 and not store.is_paired("qqbot", "u1")
    finally:
        store.close()


def test_clear_history_forgets_one_chat(data_dir):
    store = Store(data_dir).open()
    try:
        store.finish_turn("qqbot", "c1", [], [], user_text="a", answer_text="b")
        store.finish_turn("qqbot", "c2", [], [], user_text="x", answer_text="y")
        assert store.clear_history("qqbot", "c1") == 2
        assert store.history("qqbot", "c1", 10) == []
        assert len(store.history("qqbot", "c2", 10)) == 2
    finally:
        store.close()
