"""Durable state in one SQLite file (WAL): inbound journal, outbox, chat history.

The journal and the outbox are what make "each message answered once, as a reply, whatever
happens" hold across reconnects, crashes and kill -9:

- `journal_inbound` records a message before the platform is acknowledged (errbot's Telegram
  backend saves its offset before handling an update; same order, on purpose). A redelivered
  message finds its row and is not dispatched again.
- `finish_turn` writes the reply parts into the outbox, marks the inbound rows answered and
  appends history in ONE transaction: after a crash either the turn is redone (nothing was
  written) or its reply is pending in the outbox (and never recomputed).
- outbox rows are deleted only once the platform accepted them; until then they are retried
  with backoff, across reconnects and restarts.

Every call is one short statement or transaction on the hub: WAL with synchronous=NORMAL commits
without fsync on the hot path, so a write holds the hub for tens of microseconds
(bench/store_write.py measures it). The one slow operation, the WAL checkpoint (it fsyncs), is
taken off the hub: automatic checkpoints are off, and `checkpoint()` runs one in gevent's
threadpool on its own connection (SQLite releases the GIL while it does I/O).
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .models import InboundMessage, OutboundMessage

log = logging.getLogger("hermes_green.store")

SCHEMA_VERSION = 1
# A message whose turn was started this many times without finishing (the process died each
# time) is answered with an apology instead of being retried forever.
MAX_TURN_ATTEMPTS = 3

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inbound (
    platform TEXT NOT NULL, message_id TEXT NOT NULL, chat_id TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('received', 'processing', 'answered', 'failed')),
    attempts INTEGER NOT NULL DEFAULT 0, payload TEXT NOT NULL,
    received_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (platform, message_id));
CREATE INDEX IF NOT EXISTS inbound_open ON inbound (state) WHERE state IN ('received', 'processing');
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, platform TEXT NOT NULL, chat_id TEXT NOT NULL,
    in_reply_to TEXT, seq INTEGER NOT NULL DEFAULT 0, reply_ref TEXT NOT NULL, text TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, last_error TEXT,
    created_at REAL NOT NULL);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_part ON outbox (platform, in_reply_to, seq)
    WHERE in_reply_to IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (platform, state, next_attempt_at);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, platform TEXT NOT NULL, chat_id TEXT NOT NULL,
    role TEXT NOT NULL, content TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS history_chat ON history (platform, chat_id, id);
CREATE TABLE IF NOT EXISTS adapter_state (
    platform TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (platform, key));
"""


class StoreError(Exception):
    """The data directory or database cannot be used (unwritable, corrupt, newer schema).
    One line, safe to show; caller: exit 2."""


@dataclass
class PendingInbound:
    message: InboundMessage
    state: str
    attempts: int


class Store:
    def __init__(self, data_dir: str | os.PathLike, *, history_limit: int = 200,
                 clock=time.time) -> None:
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / "hermes-green.sqlite3"
        self.history_limit = history_limit
        self._clock = clock
        self._db: sqlite3.Connection | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> "Store":
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"gateway.data_dir: cannot create {self.data_dir} "
                             f"({e.strerror or type(e).__name__})") from None
        if not os.access(self.data_dir, os.W_OK | os.X_OK):
            raise StoreError(f"gateway.data_dir: {self.data_dir} is not writable")
        try:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute("PRAGMA wal_autocheckpoint=0")  # see checkpoint()
            db.execute("PRAGMA foreign_keys=ON")
            ok = db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(ok)
            db.executescript(_SCHEMA)
            row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is None:
                db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            elif int(row[0]) > SCHEMA_VERSION:
                raise StoreError(f"{self.path}: written by a newer hermes-green "
                                 f"(schema {row[0]}); upgrade or point data_dir elsewhere")
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a usable SQLite database ({e}); move it aside "
                             f"to start fresh") from None
        self._db = db
        return self

    def close(self) -> None:
        if self._db is not None:
            try:
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # busy or already closing: the next open replays the WAL
            self._db.close()
            self._db = None

    def checkpoint(self) -> int:
        """Copy the WAL into the database file from a threadpool thread, so the fsync never
        holds the hub. Returns the number of WAL frames checkpointed."""
        import gevent
        return gevent.get_hub().threadpool.apply(self._checkpoint_blocking)

    def _checkpoint_blocking(self) -> int:
        db = sqlite3.connect(self.path, isolation_level=None, timeout=1.0)
        try:
            busy, log_frames, done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return done
        finally:
            db.close()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        return self._db

    # -- inbound journal ---------------------------------------------------------------------
    def journal_inbound(self, msg: InboundMessage) -> bool:
        """Record a message; False when (platform, message_id) was seen before (redelivery)."""
        now = self._clock()
        cur = self.db.execute(
            "INSERT OR IGNORE INTO inbound (platform, message_id, chat_id, state, payload,"
            " received_at, updated_at) VALUES (?, ?, ?, 'received', ?, ?, ?)",
            (msg.platform, msg.message_id, msg.chat_id, msg.to_json(), now, now))
        return cur.rowcount == 1

    def mark_processing(self, platform: str, message_ids: Iterable[str]) -> None:
        now = self._clock()
        with self._tx():
            self.db.executemany(
                "UPDATE inbound SET state='processing', attempts=attempts+1, updated_at=?"
                " WHERE platform=? AND message_id=? AND state IN ('received', 'processing')",
                [(now, platform, mid) for mid in message_ids])

    def inbound_state(self, platform: str, message_id: str) -> str | None:
        row = self.db.execute("SELECT state FROM inbound WHERE platform=? AND message_id=?",
                              (platform, message_id)).fetchone()
        return row[0] if row else None

    def pending_inbound(self) -> list[PendingInbound]:
        """Messages journaled but never answered (the process stopped mid-turn): recovery
        dispatches them again, oldest first."""
        rows = self.db.execute(
            "SELECT payload, state, attempts FROM inbound WHERE state IN ('received',"
            " 'processing') ORDER BY received_at, rowid").fetchall()
        return [PendingInbound(InboundMessage.from_json(p), s, a) for p, s, a in rows]

    # -- the end of a turn -------------------------------------------------------------------
    def finish_turn(self, platform: str, chat_id: str, message_ids: list[str],
                    parts: list[OutboundMessage], *, user_text: str | None,
                    answer_text: str | None, state: str = "answered") -> list[int]:
        """In one transaction: queue the reply parts, close the inbound rows, save history.
        Returns the outbox ids."""
        now = self._clock()
        ids = []
        with self._tx():
            for part in parts:
                cur = self.db.execute(
                    "INSERT OR IGNORE INTO outbox (platform, chat_id, in_reply_to, seq,"
                    " reply_ref, text, next_attempt_at, created_at) VALUES (?,?,?,?,?,?,?,?)",
                    (part.platform, part.chat_id, part.in_reply_to, part.seq,
                     json.dumps(part.reply_ref), part.text, now, now))
                if cur.rowcount == 1:
                    part.outbox_id = cur.lastrowid
                    ids.append(cur.lastrowid)
            self.db.executemany(
                "UPDATE inbound SET state=?, updated_at=? WHERE platform=? AND message_id=?",
                [(state, now, platform, mid) for mid in message_ids])
            if user_text is not None:
                self._history_add(platform, chat_id, "user", user_text, now)
            if answer_text is not None:
                self._history_add(platform, chat_id, "assistant", answer_text, now)
        return ids

    # -- outbox ------------------------------------------------------------------------------
    def outbox_due(self, platform: str, *, limit: int = 50) -> list[OutboundMessage]:
        rows = self.db.execute(
            "SELECT id, chat_id, in_reply_to, seq, reply_ref, text, attempts FROM outbox"
            " WHERE platform=? AND state='pending' AND next_attempt_at<=?"
            " ORDER BY id LIMIT ?", (platform, self._clock(), limit)).fetchall()
        return [OutboundMessage(platform=platform, chat_id=c, text=t, in_reply_to=r, seq=s,
                                reply_ref=json.loads(ref), outbox_id=i, attempts=a)
                for i, c, r, s, ref, t, a in rows]

    def outbox_next_due_at(self, platform: str) -> float | None:
        row = self.db.execute("SELECT MIN(next_attempt_at) FROM outbox WHERE platform=?"
                              " AND state='pending'", (platform,)).fetchone()
        return row[0]

    def outbox_done(self, outbox_id: int) -> None:
        self.db.execute("DELETE FROM outbox WHERE id=?", (outbox_id,))

    def outbox_retry(self, outbox_id: int, delay_s: float, error: str) -> None:
        self.db.execute("UPDATE outbox SET attempts=attempts+1, next_attempt_at=?, last_error=?"
                        " WHERE id=?", (self._clock() + delay_s, error[:300], outbox_id))

    def outbox_dead(self, outbox_id: int, error: str) -> None:
        """The platform refused the reply for good: keep it for inspection, stop retrying."""
        self.db.execute("UPDATE outbox SET state='dead', attempts=attempts+1, last_error=?"
                        " WHERE id=?", (error[:300], outbox_id))

    def outbox_pending(self, platform: str | None = None) -> int:
        if platform is None:
            row = self.db.execute("SELECT COUNT(*) FROM outbox WHERE state='pending'").fetchone()
        else:
            row = self.db.execute("SELECT COUNT(*) FROM outbox WHERE state='pending'"
                                  " AND platform=?", (platform,)).fetchone()
        return row[0]

    def outbox_platforms(self) -> list[str]:
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT platform FROM outbox WHERE state='pending'")]

    # -- history -----------------------------------------------------------------------------
    def history(self, platform: str, chat_id: str, limit: int) -> list[dict]:
        if limit <= 0:
            return []
        rows = self.db.execute(
            "SELECT role, content FROM history WHERE platform=? AND chat_id=?"
            " ORDER BY id DESC LIMIT ?", (platform, chat_id, limit)).fetchall()
        return [{"role": r, "content": c} for r, c in reversed(rows)]

    def _history_add(self, platform: str, chat_id: str, role: str, content: str,
                     now: float) -> None:
        self.db.execute("INSERT INTO history (platform, chat_id, role, content, at)"
                        " VALUES (?,?,?,?,?)", (platform, chat_id, role, content, now))
        # Bound each chat to its newest `history_limit` rows (a NULL bound deletes nothing).
        self.db.execute(
            "DELETE FROM history WHERE platform=?1 AND chat_id=?2 AND id < (SELECT id FROM"
            " history WHERE platform=?1 AND chat_id=?2 ORDER BY id DESC LIMIT 1 OFFSET ?3)",
            (platform, chat_id, self.history_limit - 1))

    # -- adapter state -----------------------------------------------------------------------
    def adapter_state(self, platform: str) -> "AdapterState":
        """The durable key-value state one adapter keeps across restarts (see AdapterState)."""
        return AdapterState(self, platform)

    def state_get(self, platform: str, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM adapter_state WHERE platform=? AND key=?",
                              (platform, key)).fetchone()
        return row[0] if row else None

    def state_put(self, platform: str, key: str, value: str | None) -> None:
        if value is None:
            self.db.execute("DELETE FROM adapter_state WHERE platform=? AND key=?",
                            (platform, key))
        else:
            self.db.execute(
                "INSERT INTO adapter_state (platform, key, value, updated_at) VALUES (?,?,?,?)"
                " ON CONFLICT (platform, key) DO UPDATE SET value=excluded.value,"
                " updated_at=excluded.updated_at", (platform, key, value, self._clock()))

    # -- plumbing ----------------------------------------------------------------------------
    class _Tx:
        def __init__(self, db: sqlite3.Connection) -> None:
            self.db = db

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")

        def __exit__(self, exc_type, exc, tb):
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            return False

    def _tx(self) -> "Store._Tx":
        return Store._Tx(self.db)


class AdapterState:
    """`adapter.saved_state` as the gateway hands it in: get(key) / put(key, value or None) on
    one platform's rows of the `adapter_state` table, so adapters keep protocol state (QQ's
    session id and last seq) across restarts without importing the store. Each put is one
    autocommitted statement (WAL, synchronous=NORMAL: tens of microseconds on the hub)."""

    def __init__(self, store: Store, platform: str) -> None:
        self._store, self.platform = store, platform

    def get(self, key: str) -> str | None:
        return self._store.state_get(self.platform, key)

    def put(self, key: str, value: str | None) -> None:
        self._store.state_put(self.platform, key, value)
