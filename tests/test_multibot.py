"""Several bots per platform: two WeCom bots and two QQ bots in one gateway, each on its own fake
(its own credentials), the same user ids writing to each. Every bot keeps its own journal rows,
outbox, history and session; nothing of one reaches the other. And a database file written by the
first release (schema 1: rows keyed by platform) opens, migrates and keeps its data."""
import json
import sqlite3
import time

from hermes_green.config import Config
from hermes_green.gateway import Gateway
from hermes_green.store import SCHEMA_VERSION, Store
from hermes_green.testing.fake_qqbot import Driver as QQDriver
from hermes_green.testing.fake_wecom import Driver as WeComDriver
from tests.support import wait_until


class HistoryAgent:
    """Answers with the bot, the chat, and how many earlier turns it was shown."""

    def run_turn(self, turn) -> str:
        bot, chat = turn.chat_key
        return f"{bot} {chat} seen={len(turn.history) // 2}: {turn.text}"

    def close(self) -> None:
        pass


def start(tmp_path, drivers: dict[str, list]) -> Gateway:
    platforms = {name: [d.bot_config(id=bot_id) for bot_id, d in bots]
                 for name, bots in drivers.items()}
    config = Config.model_validate({
        "gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False}},
        "platforms": platforms})
    gw = Gateway(config, agent=HistoryAgent()).start()
    keys = [f"{name}/{bot_id}" for name, bots in drivers.items() for bot_id, _ in bots]
    wait_until(lambda: all(k in gw.adapters and gw.adapters[k].ready.is_set() for k in keys),
               timeout=20, what="four bots connected")
    return gw


def test_two_wecom_and_two_qq_bots_never_see_each_others_conversations(tmp_path):
    drivers = {"wecom": [("sales", WeComDriver(secret="wecom-sales")),
                         ("support", WeComDriver(secret="wecom-support"))],
               "qqbot": [("sales", QQDriver(secret="qq-sales")),
                         ("support", QQDriver(secret="qq-support"))]}
    for bots in drivers.values():
        for _, d in bots:
            d.start()
    gw = start(tmp_path, drivers)
    try:
        sent = {}
        for round_no in range(2):  # the same user writes twice to every bot
            for name, bots in drivers.items():
                for bot_id, d in bots:
                    mid = d.user_says(f"hello {bot_id} #{round_no}", chat=0)
                    sent[(name, bot_id, round_no)] = mid
                    wait_until(lambda: d.answers(mid), timeout=20, what=f"{name}/{bot_id}")
        for (name, bot_id, round_no), mid in sent.items():
            d = dict(drivers[name])[bot_id]
            [answer] = d.answers(mid)
            assert answer.startswith(f"{name}/{bot_id} ") and f"seen={round_no}:" in answer
            assert answer.endswith(f"hello {bot_id} #{round_no}")
            # the other bot of the platform never sent anything about this message
            for other_id, other in drivers[name]:
                if other_id != bot_id:
                    assert other.answers(mid) == []
                    assert all(bot_id not in r.text for r in other.reply_rows())
        for name, bots in drivers.items():
            for bot_id, d in bots:
                assert len(d.reply_rows()) == 2
                history = gw.store.history(f"{name}/{bot_id}", _chat_of(gw, name, bot_id), 10)
                assert [h["content"] for h in history if h["role"] == "user"] == [
                    f"hello {bot_id} #0", f"hello {bot_id} #1"]
        rows = gw.store.db.execute("SELECT bot, COUNT(*) FROM inbound GROUP BY bot").fetchall()
        assert dict(rows) == {"wecom/sales": 2, "wecom/support": 2, "qqbot/sales": 2,
                              "qqbot/support": 2}
    finally:
        gw.shutdown()
        for bots in drivers.values():
            for _, d in bots:
                d.stop()


def _chat_of(gw: Gateway, platform: str, bot_id: str) -> str:
    row = gw.store.db.execute("SELECT chat_id FROM inbound WHERE bot=? LIMIT 1",
                              (f"{platform}/{bot_id}",)).fetchone()
    return row[0]


V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE inbound (
    platform TEXT NOT NULL, message_id TEXT NOT NULL, chat_id TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('received', 'processing', 'answered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0, payload TEXT NOT NULL,
    received_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (platform, message_id));
CREATE INDEX inbound_open ON inbound (state) WHERE state IN ('received', 'processing');
CREATE TABLE outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, platform TEXT NOT NULL, chat_id TEXT NOT NULL,
    in_reply_to TEXT, seq INTEGER NOT NULL DEFAULT 0, reply_ref TEXT NOT NULL, text TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, last_error TEXT,
    created_at REAL NOT NULL);
CREATE UNIQUE INDEX outbox_part ON outbox (platform, in_reply_to, seq)
    WHERE in_reply_to IS NOT NULL;
CREATE INDEX outbox_due ON outbox (platform, state, next_attempt_at);
CREATE TABLE history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, platform TEXT NOT NULL, chat_id TEXT NOT NULL,
    role TEXT NOT NULL, content TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX history_chat ON history (platform, chat_id, id);
INSERT INTO meta VALUES ('schema', '1');
"""


def test_a_first_release_database_is_migrated_and_keeps_its_data(tmp_path):
    """Schema 1 (copied from the first release's store.py): a journaled message, a pending
    reply to a real QQ message and a conversation. After the migration the pending reply is
    sent by the new gateway, the conversation continues, and the old message is still known
    (a redelivery of it is not answered again)."""
    qq = QQDriver().start()
    data = tmp_path / "data"
    data.mkdir()
    try:
        mid = qq.fake.send_user_message("asked before the upgrade", kind="c2c",
                                        openid="user-openid-0")
        now = time.time()
        db = sqlite3.connect(data / "hermes-green.sqlite3")
        db.executescript(V1_SCHEMA)
        payload = {"platform": "qqbot", "message_id": mid, "chat_id": "user-openid-0",
                   "user_id": "user-openid-0", "text": "asked before the upgrade",
                   "chat_type": "dm", "attachments": [],
                   "reply_ref": {"msg_id": mid, "kind": "c2c", "openid": "user-openid-0"},
                   "received_at": now}
        db.execute("INSERT INTO inbound VALUES ('qqbot', ?, 'user-openid-0', 'answered', 1, ?,"
                   " ?, ?)", (mid, json.dumps(payload), now, now))
        db.execute("INSERT INTO outbox (platform, chat_id, in_reply_to, seq, reply_ref, text,"
                   " next_attempt_at, created_at) VALUES ('qqbot', 'user-openid-0', ?, 0, ?,"
                   " 'the answer written before the upgrade', ?, ?)",
                   (mid, json.dumps(payload["reply_ref"]), now, now))
        db.executemany("INSERT INTO history (platform, chat_id, role, content, at) VALUES"
                       " ('qqbot', 'user-openid-0', ?, ?, ?)",
                       [("user", "asked before the upgrade", now),
                        ("assistant", "the answer written before the upgrade", now)])
        db.commit()
        db.close()

        store = Store(data).open()
        assert store.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == \
            str(SCHEMA_VERSION)
        assert store.inbound_state("qqbot", mid) == "answered"
        assert store.outbox_pending("qqbot") == 1
        assert len(store.history("qqbot", "user-openid-0", 10)) == 2
        store.close()

        config = Config.model_validate({
            "gateway": {"data_dir": str(data), "status": {"enabled": False}},
            "platforms": {"qqbot": qq.bot_config()}})
        gw = Gateway(config, agent=HistoryAgent()).start()
        try:
            wait_until(lambda: qq.answers(mid), timeout=20, what="the pending reply sent")
            assert qq.answers(mid) == ["the answer written before the upgrade"]
            qq.redeliver(mid)  # known to the migrated journal: not answered again
            later = qq.user_says("and after it", chat=0)
            wait_until(lambda: qq.answers(later), timeout=20, what="a new turn")
            assert qq.answers(later) == ["qqbot user-openid-0 seen=1: and after it"]
            assert qq.answers(mid) == ["the answer written before the upgrade"]
        finally:
            gw.shutdown()
    finally:
        qq.stop()
