"""Durable state in one SQLite file (WAL): inbound journal, outbox, chat history. The default
implementation of `store_base.StoreBase` (Redis is the other: store_redis.py).

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

SQLite starts the WAL over from its beginning only when a write begins while every frame in it
has been copied back. Under a steady stream of writes a checkpoint never sees that moment (each
write lands while it copies), so the WAL grew without end (1.3 GB in 8 s of a write loop) and
writes beside a long copy waited up to 54 ms with the hub held. So `checkpoint()` copies the bulk
beside the writes, then the short tail with the store's writers paused: greenlets wait on an
event (the hub keeps running), and the next write restarts the WAL.

What it cannot write it refuses at open (SQLite would open a read-only file read-only and say
nothing until the first write); a file deleted or replaced while we run is noticed by
`verify_file()` (the gateway calls it before each checkpoint) and reported by `health()`.
"""
from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import urllib.parse
from pathlib import Path
from typing import Iterable

from .models import InboundMessage, OutboundMessage, split_bot_key
# Re-exported: callers import these from here as before the interface existed.
from .store_base import (MAX_TURN_ATTEMPTS, AdapterState, PendingInbound,  # noqa: F401
                         StoreBase, StoreError)

log = logging.getLogger("hermes_green.store")

SCHEMA_VERSION = 4

# Every row is keyed by its bot ("platform" for a platform's single bot, "platform/id" for one of
# several: models.bot_key), so two bots on one platform never share a journal entry, an outbox
# row or a conversation.
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS inbound (
    bot TEXT NOT NULL, message_id TEXT NOT NULL, chat_id TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('received', 'processing', 'answered', 'failed',
                                         'refused')),
    attempts INTEGER NOT NULL DEFAULT 0, payload TEXT NOT NULL,
    received_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (bot, message_id));
CREATE INDEX IF NOT EXISTS inbound_open ON inbound (state) WHERE state IN ('received', 'processing');
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, bot TEXT NOT NULL, chat_id TEXT NOT NULL,
    in_reply_to TEXT, seq INTEGER NOT NULL DEFAULT 0, reply_ref TEXT NOT NULL, text TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL, last_error TEXT,
    created_at REAL NOT NULL, kind TEXT NOT NULL DEFAULT 'text', file TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS outbox_part ON outbox (bot, in_reply_to, seq)
    WHERE in_reply_to IS NOT NULL;
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (bot, state, next_attempt_at);
CREATE TABLE IF NOT EXISTS history (
    id INTEGER PRIMARY KEY AUTOINCREMENT, bot TEXT NOT NULL, chat_id TEXT NOT NULL,
    role TEXT NOT NULL, content TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS history_chat ON history (bot, chat_id, id);
CREATE TABLE IF NOT EXISTS adapter_state (
    bot TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (bot, key));
CREATE TABLE IF NOT EXISTS pairing (
    bot TEXT NOT NULL, user_id TEXT NOT NULL, chat_id TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'approved')),
    code TEXT, created_at REAL NOT NULL, expires_at REAL, approved_at REAL,
    PRIMARY KEY (bot, user_id));
CREATE UNIQUE INDEX IF NOT EXISTS pairing_code ON pairing (code) WHERE code IS NOT NULL;
"""

# v1 -> v2: rows were keyed by platform, which is exactly the bot key of a platform's single
# bot, so renaming the column keeps every row meaning what it meant (indexes follow the rename).
_MIGRATE_V1 = """
ALTER TABLE inbound RENAME COLUMN platform TO bot;
ALTER TABLE outbox RENAME COLUMN platform TO bot;
ALTER TABLE history RENAME COLUMN platform TO bot;
"""

# v2 -> v3: the inbound journal takes the state 'refused' (rate limited, skipped by the queue
# cap, waiting for pairing: journaled so a redelivery is recognized, never answered later).
# SQLite cannot change a CHECK constraint in place, so the table is rebuilt (its index is
# created again by _SCHEMA); the pairing table is new and comes from _SCHEMA.
_MIGRATE_V2 = """
CREATE TABLE inbound_v3 (
    bot TEXT NOT NULL, message_id TEXT NOT NULL, chat_id TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('received', 'processing', 'answered', 'failed',
                                         'refused')),
    attempts INTEGER NOT NULL DEFAULT 0, payload TEXT NOT NULL,
    received_at REAL NOT NULL, updated_at REAL NOT NULL,
    PRIMARY KEY (bot, message_id));
INSERT INTO inbound_v3 (bot, message_id, chat_id, state, attempts, payload, received_at,
    updated_at) SELECT bot, message_id, chat_id, state, attempts, payload, received_at,
    updated_at FROM inbound ORDER BY rowid;
DROP TABLE inbound;
ALTER TABLE inbound_v3 RENAME TO inbound;
"""

PAIRING_CODE_ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # no 0/O, 1/I: read aloud, typed
PAIRING_CODE_LENGTH = 8

# Files in the outbox (schema 4): a row of kind 'file' carries its file as JSON (the path of
# the gateway's own copy, name, type). Added to an older table by `_add_outbox_file_columns`,
# which looks at the table rather than the version number, so it composes with other steps.
_OUTBOX_FILE_COLUMNS = (("kind", "TEXT NOT NULL DEFAULT 'text'"), ("file", "TEXT"))


# checkpoint(): copies beside the writes before the paused one, while more than this many
# frames (4 KiB pages) are left; and the longest the writers are paused for the tail.
CHECKPOINT_PASSES = 3
CHECKPOINT_TAIL_FRAMES = 256
CHECKPOINT_PAUSE_MAX_S = 1.0


class _FinishedBefore(Exception):
    """finish_turn found a message of the turn already closed: its transaction rolls back."""


class Store(StoreBase):
    """The default store: one SQLite file in `gateway.data_dir` (see store_base.StoreBase)."""

    def __init__(self, data_dir: str | os.PathLike, *, history_limit: int = 200,
                 clock=time.time) -> None:
        super().__init__(history_limit=history_limit, clock=clock)
        self.data_dir = Path(data_dir)
        self.path = self.data_dir / "hermes-green.sqlite3"
        self._db: sqlite3.Connection | None = None
        self._identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the file opened
        self.problem: str | None = None  # set when the file is lost under us (verify_file)
        self._tx_depth = 0  # transactions open on the hub connection (never paused inside one)
        self._writes_paused = None  # a gevent Event while the checkpoint copies the WAL's tail

    # -- lifecycle ---------------------------------------------------------------------------
    def open(self) -> "Store":
        """Open (or create) the database and prove it can be written: SQLite opens a file it
        may not write read-only without a word, and the gateway would then journal nothing.
        The proof is a real write (BEGIN IMMEDIATE, a row in `meta`, COMMIT), which also needs
        the -wal and -shm files beside it."""
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreError(f"gateway.data_dir: cannot create {self.data_dir} "
                             f"({e.strerror or type(e).__name__})") from None
        if not os.access(self.data_dir, os.W_OK | os.X_OK):
            raise StoreError(f"gateway.data_dir: {self.data_dir} is not writable (SQLite "
                             f"creates its -wal and -shm files there)")
        db = None
        try:
            db = sqlite3.connect(self.path, isolation_level=None, timeout=5.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            # 16 MiB of page cache (SQLite's default is 2): the journal's, outbox's and history's
            # hot pages stay in memory as the file grows; a message's writes cost ~20% less
            # (store writes alone: 251 -> 201 us per message over 20,000 messages). Filled only
            # as pages are read, so an idle gateway does not pay for it.
            db.execute("PRAGMA cache_size=-16384")
            db.execute("PRAGMA wal_autocheckpoint=0")  # see checkpoint()
            db.execute("PRAGMA foreign_keys=ON")
            ok = db.execute("PRAGMA quick_check").fetchone()[0]
            if ok != "ok":
                raise sqlite3.DatabaseError(ok)
            self._migrate(db)
            st = os.stat(self.path)
        except sqlite3.Error as e:
            if db is not None:
                db.close()
            raise StoreError(self._open_error(e)) from None
        except BaseException:
            if db is not None:
                db.close()
            raise
        self._db = db
        self._identity = (st.st_dev, st.st_ino)
        self.problem = None
        return self

    def _migrate(self, db: sqlite3.Connection) -> None:
        """Create the schema, or bring an older file up to this version in one transaction."""
        db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        row = db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
        version = int(row[0]) if row is not None else None
        if version is not None and version > SCHEMA_VERSION:
            raise StoreError(f"{self.path}: written by a newer hermes-green "
                             f"(schema {version}); upgrade or point data_dir elsewhere")
        db.execute("BEGIN IMMEDIATE")
        try:
            if version == 1:
                for statement in filter(str.strip, _MIGRATE_V1.split(";")):
                    db.execute(statement)
            if version in (1, 2):  # (v3 -> v4 only adds the outbox's file columns, below)
                for statement in filter(str.strip, _MIGRATE_V2.split(";")):
                    db.execute(statement)
                log.info("store migrated path=%s from_schema=%d to_schema=%d", self.path,
                         version, SCHEMA_VERSION)
            if version is not None:
                self._add_outbox_file_columns(db)
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            db.execute("INSERT OR REPLACE INTO meta VALUES ('schema', ?)", (str(SCHEMA_VERSION),))
            # A real write at every open: a read-only file or directory is refused here, at start.
            db.execute("INSERT OR REPLACE INTO meta VALUES ('opened_at', ?)", (str(self._clock()),))
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _add_outbox_file_columns(self, db: sqlite3.Connection) -> None:
        """Schema 4: outbox rows may carry a file. Adds the columns an older outbox lacks."""
        have = {row[1] for row in db.execute("PRAGMA table_info(outbox)")}
        added = [name for name, _ in _OUTBOX_FILE_COLUMNS if name not in have]
        for name, decl in _OUTBOX_FILE_COLUMNS:
            if name in added:
                db.execute(f"ALTER TABLE outbox ADD COLUMN {name} {decl}")
        if added:
            log.info("store migrated path=%s outbox_columns_added=%s", self.path, ",".join(added))

    def _open_error(self, e: sqlite3.Error) -> str:
        """One line for a failed open: what cannot be written, or why the file is unusable."""
        code = getattr(e, "sqlite_errorname", "") or ""
        if code.startswith(("SQLITE_READONLY", "SQLITE_CANTOPEN", "SQLITE_PERM", "SQLITE_IOERR",
                            "SQLITE_FULL", "SQLITE_AUTH")):
            return f"{self.path}: cannot write the database ({self._unwritable(e)})"
        if code.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")):
            return (f"{self.path}: locked by another process for more than 5 s (another "
                    f"gateway on the same data_dir?)")
        return f"{self.path}: not a usable SQLite database ({e}); move it aside to start fresh"

    def _unwritable(self, e: sqlite3.Error) -> str:
        for p in (self.path, Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            if os.path.lexists(p) and not os.path.isfile(p):
                return f"{p.name} is not a regular file"
            if os.path.exists(p) and not os.access(p, os.R_OK | os.W_OK):
                return f"{p.name} is read-only"
        return str(e)

    def describe(self) -> str:
        return str(self.path)

    def close(self, *, checkpoint: bool = True) -> None:
        """`checkpoint=False`: a short-lived second user of the file (the CLI beside a running
        gateway) leaves the WAL to the gateway's own checkpoints."""
        if self._db is not None:
            try:
                if checkpoint:
                    self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error:
                pass  # busy or already closing: the next open replays the WAL
            self._db.close()
            self._db = None

    # -- the file under us -------------------------------------------------------------------
    def verify_file(self) -> str | None:
        """Is the file we opened still the one at our path? Deleted or replaced while we run,
        every later write goes to a file nothing will open again (the next start creates an
        empty one). Returns the problem when first found (the caller logs it), else None; the
        store stays unhealthy (see health()) until reopened."""
        if self.problem is not None or self._db is None:
            return None
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self.problem = f"{self.path} was deleted while the gateway runs"
        except OSError as e:
            self.problem = f"{self.path} cannot be read ({e.strerror or type(e).__name__})"
        else:
            if (st.st_dev, st.st_ino) != self._identity:
                self.problem = f"{self.path} was replaced by another file while the gateway runs"
        return self.problem

    def health(self) -> dict:
        """For /healthz: ok while the file we write is the one at our path."""
        return {"ok": self.problem is None, "error": self.problem}

    def checkpoint(self) -> int:
        """Copy the WAL into the database file from a threadpool thread, so the fsync never
        holds the hub, and let the next write start the WAL over (module docstring): up to
        CHECKPOINT_PASSES copies beside the writes while the tail left is large, then one with
        the writers paused (at most CHECKPOINT_PAUSE_MAX_S). Returns the frames checkpointed."""
        import gevent
        import gevent.event
        pool = gevent.get_hub().threadpool
        # A pass reports the WAL's frames when it began and how many it copied: what was
        # written while it copied shows up as the next pass's growth.
        frames, done = pool.apply(self._checkpoint_blocking)
        for _ in range(CHECKPOINT_PASSES - 1):
            before = frames
            frames, done = pool.apply(self._checkpoint_blocking)
            if frames == before or done < frames:
                return done  # nothing written meanwhile: the next write restarts the WAL;
                # or a reader held frames back (a pass copies no further than its snapshot)
            if frames < before or frames - before <= CHECKPOINT_TAIL_FRAMES:
                break  # restarted meanwhile, or the tail is short: pause for it
        if self._tx_depth or self._writes_paused is not None:
            return done  # a transaction is open (a greenlet yielded inside one): next round
        self._writes_paused = paused = gevent.event.Event()
        try:
            tail = pool.spawn(self._checkpoint_blocking)
            try:
                frames, done = tail.get(timeout=CHECKPOINT_PAUSE_MAX_S)
            except gevent.Timeout:
                log.warning("checkpoint slow: writes resumed after %.1fs while the WAL's tail "
                            "is still being copied (a slow or busy disk)", CHECKPOINT_PAUSE_MAX_S)
        finally:
            self._writes_paused = None
            paused.set()
        return done

    def _checkpoint_blocking(self) -> tuple[int, int]:
        """(frames in the WAL, frames copied into the database file) after one PASSIVE pass."""
        # mode=rw: never create an empty database where ours was deleted
        uri = f"file:{urllib.parse.quote(str(self.path))}?mode=rw"
        db = sqlite3.connect(uri, uri=True, isolation_level=None, timeout=1.0)
        try:
            busy, log_frames, done = db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
            return log_frames, done
        finally:
            db.close()

    @property
    def db(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError("store is not open")
        if self._writes_paused is not None and not self._tx_depth:
            self._writes_paused.wait()  # the checkpoint's tail (above): a few milliseconds
        return self._db

    # -- inbound journal ---------------------------------------------------------------------
    def journal_inbound(self, msg: InboundMessage, *, state: str = "received") -> bool:
        """Record a message; False when (bot, message_id) was seen before (redelivery).
        `state='refused'`: kept only so a redelivery is recognized; never answered."""
        if state not in ("received", "refused"):  # OR IGNORE would read a CHECK failure as a dup
            raise ValueError(f"a message is journaled as received or refused, not {state!r}")
        now = self._clock()
        cur = self.db.execute(
            "INSERT OR IGNORE INTO inbound (bot, message_id, chat_id, state, payload,"
            " received_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (msg.bot_key, msg.message_id, msg.chat_id, state, msg.to_json(), now, now))
        return cur.rowcount == 1

    def update_inbound(self, msg: InboundMessage) -> None:
        """Rewrite a journaled message's payload (its attachments were fetched, refused or
        transcribed): a restart then finds the stored files instead of fetching again."""
        self.db.execute("UPDATE inbound SET payload=?, updated_at=? WHERE bot=? AND message_id=?",
                        (msg.to_json(), self._clock(), msg.bot_key, msg.message_id))

    def mark_processing(self, bot: str, message_ids: Iterable[str]) -> None:
        now = self._clock()
        rows = [(now, bot, mid) for mid in message_ids]
        sql = ("UPDATE inbound SET state='processing', attempts=attempts+1, updated_at=?"
               " WHERE bot=? AND message_id=? AND state IN ('received', 'processing')")
        if len(rows) == 1:  # one statement is atomic by itself: no BEGIN/COMMIT round
            self.db.execute(sql, rows[0])
            return
        with self._tx():
            self.db.executemany(sql, rows)

    def inbound_state(self, bot: str, message_id: str) -> str | None:
        row = self.db.execute("SELECT state FROM inbound WHERE bot=? AND message_id=?",
                              (bot, message_id)).fetchone()
        return row[0] if row else None

    def inbound(self, bot: str, message_id: str) -> PendingInbound | None:
        row = self.db.execute("SELECT payload, state, attempts FROM inbound WHERE bot=? AND"
                              " message_id=?", (bot, message_id)).fetchone()
        return PendingInbound(InboundMessage.from_json(row[0]), row[1], row[2]) if row else None

    def pending_inbound(self) -> list[PendingInbound]:
        """Messages journaled but never answered (the process stopped mid-turn): recovery
        dispatches them again, oldest first."""
        rows = self.db.execute(
            "SELECT payload, state, attempts FROM inbound WHERE state IN ('received',"
            " 'processing') ORDER BY received_at, rowid").fetchall()
        return [PendingInbound(InboundMessage.from_json(p), s, a) for p, s, a in rows]

    # -- the end of a turn -------------------------------------------------------------------
    def finish_turn(self, bot: str, chat_id: str, message_ids: list[str],
                    parts: list[OutboundMessage], *, user_text: str | None,
                    answer_text: str | None, state: str = "answered") -> list[int]:
        """In one transaction: queue the reply parts, close the inbound rows, save history.
        Returns the outbox ids."""
        now = self._clock()
        ids = []
        try:
            with self._tx():
                self._close_inbound(bot, message_ids, state, now)
                ids = self._queue_parts(parts, now)
                turn = [(bot, chat_id, role, content, now) for role, content in
                        (("user", user_text), ("assistant", answer_text)) if content is not None]
                if turn:
                    self._history_add(turn)
        except _FinishedBefore:
            return []  # a redelivered or re-run turn: answered once, rolled back
        return ids

    def _close_inbound(self, bot: str, message_ids: list[str], state: str, now: float) -> None:
        """One UPDATE closes the open rows; fewer than asked is a redelivered or re-run turn only
        when one of them is already closed (rows never journaled count as open)."""
        if not message_ids:
            return
        marks = ",".join("?" * len(message_ids))
        cur = self.db.execute(
            f"UPDATE inbound SET state=?, updated_at=? WHERE bot=? AND message_id IN ({marks})"
            " AND state IN ('received', 'processing')", (state, now, bot, *message_ids))
        if cur.rowcount < len(set(message_ids)):  # rare: some missing, or closed before
            existing = self.db.execute(
                f"SELECT COUNT(*) FROM inbound WHERE bot=? AND message_id IN ({marks})",
                (bot, *message_ids)).fetchone()[0]
            if existing > cur.rowcount:  # a row this UPDATE did not close was closed before
                raise _FinishedBefore

    def _queue_parts(self, parts: list[OutboundMessage], now: float) -> list[int]:
        ids = []
        for part in parts:
            cur = self.db.execute(
                "INSERT OR IGNORE INTO outbox (bot, chat_id, in_reply_to, seq,"
                " reply_ref, text, next_attempt_at, created_at, kind, file)"
                " VALUES (?,?,?,?,?,?,?,?,?,?)",
                (part.bot_key, part.chat_id, part.in_reply_to, part.seq,
                 json.dumps(part.reply_ref), part.text, now, now, part.kind,
                 json.dumps(part.file) if part.file is not None else None))
            if cur.rowcount == 1:
                part.outbox_id = cur.lastrowid
                ids.append(cur.lastrowid)
        return ids

    # -- outbox ------------------------------------------------------------------------------
    def outbox_due(self, bot: str, *, limit: int = 50) -> list[OutboundMessage]:
        rows = self.db.execute(
            "SELECT id, chat_id, in_reply_to, seq, reply_ref, text, attempts, kind, file"
            " FROM outbox WHERE bot=? AND state='pending' AND next_attempt_at<=?"
            " ORDER BY id LIMIT ?", (bot, self._clock(), limit)).fetchall()
        platform, bot_id = split_bot_key(bot)
        return [OutboundMessage(platform=platform, bot=bot_id, chat_id=c, text=t, in_reply_to=r,
                                seq=s, reply_ref=json.loads(ref), outbox_id=i, attempts=a,
                                kind=k, file=json.loads(f) if f else None)
                for i, c, r, s, ref, t, a, k, f in rows]

    def outbox_files(self) -> set[str]:
        """Paths of the files pending rows still need (retention must not delete them)."""
        paths = set()
        for (raw,) in self.db.execute("SELECT file FROM outbox WHERE kind='file' AND"
                                      " state='pending' AND file IS NOT NULL"):
            try:
                paths.add(json.loads(raw)["path"])
            except (ValueError, KeyError, TypeError):
                continue
        return paths

    def outbox_next_due_at(self, bot: str) -> float | None:
        row = self.db.execute("SELECT MIN(next_attempt_at) FROM outbox WHERE bot=?"
                              " AND state='pending'", (bot,)).fetchone()
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

    def outbox_pending(self, bot: str | None = None) -> int:
        if bot is None:
            row = self.db.execute("SELECT COUNT(*) FROM outbox WHERE state='pending'").fetchone()
        else:
            row = self.db.execute("SELECT COUNT(*) FROM outbox WHERE state='pending'"
                                  " AND bot=?", (bot,)).fetchone()
        return row[0]

    def outbox_dead_count(self, bot: str | None = None) -> int:
        """Replies given up as undeliverable (kept for inspection)."""
        if bot is None:
            row = self.db.execute("SELECT COUNT(*) FROM outbox WHERE state='dead'").fetchone()
        else:
            row = self.db.execute("SELECT COUNT(*) FROM outbox WHERE state='dead' AND bot=?",
                                  (bot,)).fetchone()
        return row[0]

    def outbox_bots(self) -> list[str]:
        """Bots with replies still to send (a bot removed from the config keeps its rows)."""
        return [r[0] for r in self.db.execute(
            "SELECT DISTINCT bot FROM outbox WHERE state='pending'")]

    # -- a bot's saved state (resume cursors) ------------------------------------------------
    def state_get(self, bot: str, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM adapter_state WHERE bot=? AND key=?",
                              (bot, key)).fetchone()
        return row[0] if row else None

    def state_put(self, bot: str, key: str, value: str | None) -> None:
        if value is None:
            self.db.execute("DELETE FROM adapter_state WHERE bot=? AND key=?", (bot, key))
        else:
            self.db.execute(
                "INSERT INTO adapter_state (bot, key, value, updated_at) VALUES (?,?,?,?)"
                " ON CONFLICT (bot, key) DO UPDATE SET value=excluded.value,"
                " updated_at=excluded.updated_at", (bot, key, value, self._clock()))

    # -- history -----------------------------------------------------------------------------
    def history(self, bot: str, chat_id: str, limit: int) -> list[dict]:
        if limit <= 0:
            return []
        rows = self.db.execute(
            "SELECT role, content FROM history WHERE bot=? AND chat_id=?"
            " ORDER BY id DESC LIMIT ?", (bot, chat_id, limit)).fetchall()
        return [{"role": r, "content": c} for r, c in reversed(rows)]

    def clear_history(self, bot: str, chat_id: str) -> int:
        """`/new`: the chat's next turn starts without history. Returns rows deleted."""
        return self.db.execute("DELETE FROM history WHERE bot=? AND chat_id=?",
                               (bot, chat_id)).rowcount

    def _history_add(self, rows: list[tuple[str, str, str, str, float]]) -> None:
        """Append (bot, chat_id, role, content, at) rows of one chat, then bound the chat to its
        newest `history_limit` rows (one bounding DELETE per turn, not per row)."""
        self.db.executemany("INSERT INTO history (bot, chat_id, role, content, at)"
                            " VALUES (?,?,?,?,?)", rows)
        bot, chat_id = rows[0][0], rows[0][1]
        # A NULL bound (fewer rows than the limit) deletes nothing.
        self.db.execute(
            "DELETE FROM history WHERE bot=?1 AND chat_id=?2 AND id < (SELECT id FROM"
            " history WHERE bot=?1 AND chat_id=?2 ORDER BY id DESC LIMIT 1 OFFSET ?3)",
            (bot, chat_id, self.history_limit - 1))

    # -- pairing (dm_policy: pairing) --------------------------------------------------------
    # A user is 'pending' (a code was issued, valid until expires_at) or 'approved'. The CLI
    # (`hermes-green pairing`) changes rows while the gateway runs; the gateway reads them for
    # every message of a user it does not know otherwise, so a change applies at once.
    def pairing_request(self, bot: str, user_id: str, chat_id: str, *, ttl_s: float,
                        make_code) -> str | None:
        """A fresh code for an unknown user, or None while an earlier code is still valid (the
        first DM gets the code; the next ones are not answered until it expires) or the user
        is approved. `make_code()` returns a candidate; a collision draws again."""
        now = self._clock()
        with self._tx():
            row = self.db.execute("SELECT state, expires_at FROM pairing WHERE bot=? AND"
                                  " user_id=?", (bot, user_id)).fetchone()
            if row is not None and (row[0] == "approved" or (row[1] or 0) > now):
                return None
            self.db.execute("DELETE FROM pairing WHERE bot=? AND user_id=?", (bot, user_id))
            for _ in range(8):
                code = make_code()
                try:
                    self.db.execute(
                        "INSERT INTO pairing (bot, user_id, chat_id, state, code, created_at,"
                        " expires_at) VALUES (?, ?, ?, 'pending', ?, ?, ?)",
                        (bot, user_id, chat_id, code, now, now + ttl_s))
                except sqlite3.IntegrityError:  # the code is taken: draw another
                    continue
                return code
        raise StoreError("could not draw an unused pairing code")

    def is_paired(self, bot: str, user_id: str) -> bool:
        return self.db.execute("SELECT 1 FROM pairing WHERE bot=? AND user_id=? AND"
                               " state='approved'", (bot, user_id)).fetchone() is not None

    def pairing_approve(self, code: str) -> tuple[str, str | None, str | None]:
        """('approved', bot, user) | ('expired', bot, user) | ('unknown', None, None). A code
        works once: approving clears it."""
        now = self._clock()
        with self._tx():
            row = self.db.execute("SELECT bot, user_id, expires_at FROM pairing WHERE code=?"
                                  " AND state='pending'", (code,)).fetchone()
            if row is None:
                return "unknown", None, None
            bot, user_id, expires_at = row
            if (expires_at or 0) <= now:
                return "expired", bot, user_id
            self.db.execute("UPDATE pairing SET state='approved', code=NULL, expires_at=NULL,"
                            " approved_at=? WHERE bot=? AND user_id=?", (now, bot, user_id))
        return "approved", bot, user_id

    def pairing_revoke(self, user_id: str, bot: str | None = None) -> int:
        """Forget a user (approved or pending) on one bot or all; returns rows removed."""
        if bot is None:
            return self.db.execute("DELETE FROM pairing WHERE user_id=?", (user_id,)).rowcount
        return self.db.execute("DELETE FROM pairing WHERE bot=? AND user_id=?",
                               (bot, user_id)).rowcount

    def pairing_list(self) -> list[dict]:
        rows = self.db.execute("SELECT bot, user_id, chat_id, state, code, created_at,"
                               " expires_at, approved_at FROM pairing ORDER BY bot, state,"
                               " created_at").fetchall()
        keys = ("bot", "user_id", "chat_id", "state", "code", "created_at", "expires_at",
                "approved_at")
        return [dict(zip(keys, r)) for r in rows]

    # -- small named values (the last reload's outcome, read by `hermes-green reload`) -------
    def meta_get(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return row[0] if row else None

    def meta_put(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    # -- plumbing ----------------------------------------------------------------------------
    class _Tx:
        def __init__(self, store: "Store") -> None:
            self.store = store
            self.db = store.db  # waits here while the checkpoint's tail is copied

        def __enter__(self):
            self.db.execute("BEGIN IMMEDIATE")
            self.store._tx_depth += 1

        def __exit__(self, exc_type, exc, tb):
            self.store._tx_depth -= 1
            self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            return False

    def _tx(self) -> "Store._Tx":
        return Store._Tx(self)

