"""The one store interface the gateway speaks, and the choice between its two implementations.

`StoreBase` lists what the gateway, the status page and `check` ask of durable state: the
inbound journal, the outbox, chat history and each bot's saved adapter state. Two classes
implement it and pass one contract suite (tests/test_store_contract.py):

- `store.Store`: one SQLite file (WAL) in `gateway.data_dir`, the default: no server to run;
- `store_redis.RedisStore`: Redis, when `gateway.store` names one (`redis://host:port/db`), so
  several processes on several hosts share one journal, outbox and history (see SCALE.md).

What every implementation promises (the contract suite checks each):
- `journal_inbound` is the de-duplication point: a (bot, message id) seen before returns False;
- `finish_turn` is one atomic step: reply parts queued, inbound rows closed, history appended, or
  nothing at all; a turn finished a second time (a redelivered or re-claimed message that was
  already answered) writes nothing and returns [];
- a reply part (bot, in_reply_to, seq) is queued once while it is pending or dead;
- outbox rows are handed out in id order among the due ones, and survive until `outbox_done`.

Adding a feature to the store (pairing codes, a new inbound state): add the method here as
abstract, then to both implementations, then a test to the contract suite.
"""
from __future__ import annotations

import abc
import logging
import time
from dataclasses import dataclass
from typing import Iterable

from .models import InboundMessage, OutboundMessage

log = logging.getLogger("hermes_green.store")

# A message whose turn was started this many times without finishing (the process died each
# time) is answered with an apology instead of being retried forever.
MAX_TURN_ATTEMPTS = 3
# Inbound states that mean "a turn still has to answer this"; every other state is closed.
OPEN_STATES = ("received", "processing")


class StoreError(Exception):
    """The store cannot be used (unwritable or corrupt file, newer schema, Redis unreachable).
    One line, safe to show; caller: exit 2."""


@dataclass
class PendingInbound:
    message: InboundMessage
    state: str
    attempts: int


class StoreBase(abc.ABC):
    """What the gateway needs from durable state. Calls are short and made on the hub; an
    implementation that waits on the network does so on patched sockets."""

    history_limit: int
    problem: str | None = None  # set when the store is found unusable while running

    def __init__(self, *, history_limit: int = 200, clock=time.time) -> None:
        self.history_limit = history_limit
        self._clock = clock

    # -- lifecycle ---------------------------------------------------------------------------
    @abc.abstractmethod
    def open(self) -> "StoreBase":
        """Connect/open and prove a write works; raise StoreError (one line) otherwise."""

    @abc.abstractmethod
    def close(self, *, checkpoint: bool = True) -> None:
        """`checkpoint=False`: a short-lived second user (the CLI beside a running gateway)
        leaves maintenance to the gateway."""

    @abc.abstractmethod
    def describe(self) -> str:
        """Where the state lives, for `check` and logs (never with a password)."""

    def health(self) -> dict:
        """For /healthz."""
        return {"ok": self.problem is None, "error": self.problem}

    def verify_file(self) -> str | None:
        """A backing file replaced or deleted under us (SQLite); None when there is none."""
        return None

    def checkpoint(self) -> int:
        """Periodic maintenance off the hub (SQLite's WAL checkpoint); 0 when there is none."""
        return 0

    # -- inbound journal ---------------------------------------------------------------------
    @abc.abstractmethod
    def journal_inbound(self, msg: InboundMessage, *, state: str = "received") -> bool:
        """Record a message; False when (bot, message_id) was seen before (redelivery).
        `state='refused'`: kept only so a redelivery is recognized; never answered. Any other
        state is a ValueError."""

    @abc.abstractmethod
    def update_inbound(self, msg: InboundMessage) -> None:
        """Rewrite a journaled message's payload (its attachments were fetched, refused or
        transcribed): a restart then finds the stored files instead of fetching again."""
        raise NotImplementedError

    def mark_processing(self, bot: str, message_ids: Iterable[str]) -> None:
        """A turn starts on these messages: state processing, attempts + 1 (open ones only)."""

    @abc.abstractmethod
    def inbound_state(self, bot: str, message_id: str) -> str | None: ...

    @abc.abstractmethod
    def inbound(self, bot: str, message_id: str) -> PendingInbound | None:
        """One journaled message with its state and the number of turns started on it (None
        when it was never journaled)."""

    @abc.abstractmethod
    def pending_inbound(self) -> list[PendingInbound]:
        """Messages journaled but never answered, oldest first (recovery)."""

    # -- the end of a turn -------------------------------------------------------------------
    @abc.abstractmethod
    def finish_turn(self, bot: str, chat_id: str, message_ids: list[str],
                    parts: list[OutboundMessage], *, user_text: str | None,
                    answer_text: str | None, state: str = "answered") -> list[int]:
        """In one atomic step: queue the reply parts, close the inbound rows, save history.
        Returns the outbox ids; writes nothing (returns []) when one of the messages is already
        closed (its turn was finished before)."""

    # -- outbox ------------------------------------------------------------------------------
    @abc.abstractmethod
    def outbox_due(self, bot: str, *, limit: int = 50) -> list[OutboundMessage]: ...

    @abc.abstractmethod
    def outbox_files(self) -> set[str]:
        """Paths of the files pending outbox rows still need (media retention keeps them)."""
        raise NotImplementedError

    def outbox_next_due_at(self, bot: str) -> float | None: ...

    @abc.abstractmethod
    def outbox_done(self, outbox_id: int) -> None: ...

    @abc.abstractmethod
    def outbox_retry(self, outbox_id: int, delay_s: float, error: str) -> None: ...

    @abc.abstractmethod
    def outbox_dead(self, outbox_id: int, error: str) -> None:
        """The platform refused the reply for good: keep it for inspection, stop retrying."""

    @abc.abstractmethod
    def outbox_pending(self, bot: str | None = None) -> int: ...

    @abc.abstractmethod
    def outbox_dead_count(self, bot: str | None = None) -> int: ...

    @abc.abstractmethod
    def outbox_bots(self) -> list[str]:
        """Bots with replies still to send (a bot removed from the config keeps its rows)."""

    # -- a bot's saved state (resume cursors) ------------------------------------------------
    def adapter_state(self, bot: str) -> "AdapterState":
        """The durable key-value state one bot's adapter keeps across restarts."""
        return AdapterState(self, bot)

    @abc.abstractmethod
    def state_get(self, bot: str, key: str) -> str | None: ...

    @abc.abstractmethod
    def state_put(self, bot: str, key: str, value: str | None) -> None: ...

    # -- history -----------------------------------------------------------------------------
    @abc.abstractmethod
    def history(self, bot: str, chat_id: str, limit: int) -> list[dict]:
        """The newest `limit` entries of one chat, oldest first."""

    @abc.abstractmethod
    def clear_history(self, bot: str, chat_id: str) -> int:
        """`/new`: the chat's next turn starts without history. Returns entries deleted."""

    # -- pairing (dm_policy: pairing) --------------------------------------------------------
    # A user is 'pending' (a code was issued, valid until expires_at) or 'approved'. The CLI
    # changes them while the gateway runs; the gateway reads them for every message of a user
    # it does not know otherwise, so a change applies at once.
    @abc.abstractmethod
    def pairing_request(self, bot: str, user_id: str, chat_id: str, *, ttl_s: float,
                        make_code) -> str | None:
        """A fresh code for an unknown user, or None while an earlier code is still valid or
        the user is approved. `make_code()` returns a candidate; a collision draws again."""

    @abc.abstractmethod
    def is_paired(self, bot: str, user_id: str) -> bool: ...

    @abc.abstractmethod
    def pairing_approve(self, code: str) -> tuple[str, str | None, str | None]:
        """('approved', bot, user) | ('expired', bot, user) | ('unknown', None, None). A code
        works once: approving clears it."""

    @abc.abstractmethod
    def pairing_revoke(self, user_id: str, bot: str | None = None) -> int:
        """Forget a user (approved or pending) on one bot or all; returns entries removed."""

    @abc.abstractmethod
    def pairing_list(self) -> list[dict]:
        """Dicts with bot, user_id, chat_id, state, code, created_at, expires_at, approved_at;
        ordered by bot, state, created_at."""

    # -- small named values of this process (the last reload's outcome) -----------------------
    @abc.abstractmethod
    def meta_get(self, key: str) -> str | None: ...

    @abc.abstractmethod
    def meta_put(self, key: str, value: str) -> None: ...


# AdapterState.put_soon: how long a value may wait before it is written.
SOON_S = 0.2


class AdapterState:
    """`adapter.saved_state` as the gateway hands it in: get(key) / put(key, value or None) on
    one bot's saved state, so adapters keep protocol state (a session id and last sequence)
    across restarts without importing the store."""

    def __init__(self, store: StoreBase, bot: str) -> None:
        self._store, self.bot = store, bot
        self._soon: dict[str, str | None] = {}  # put_soon's values not yet written
        self._flusher = None

    def get(self, key: str) -> str | None:
        if key in self._soon:
            return self._soon[key]
        return self._store.state_get(self.bot, key)

    def put(self, key: str, value: str | None) -> None:
        self._soon.pop(key, None)  # this value is newer than a pending one
        self._store.state_put(self.bot, key, value)

    def put_soon(self, key: str, value: str | None) -> None:
        """One write per key every SOON_S at most, instead of one per event (QQ's and
        Discord's sequence numbers: a store write and its commit per message)."""
        self._soon[key] = value
        if self._flusher is None:
            import gevent
            self._flusher = gevent.spawn_later(SOON_S, self.flush)
            self._flusher.name = f"saved-state:{self.bot}"

    def flush(self) -> None:
        """Write what put_soon holds (a failure is logged; the older saved value is safe)."""
        self._flusher = None
        pending, self._soon = self._soon, {}
        for key, value in pending.items():
            try:
                self._store.state_put(self.bot, key, value)
            except Exception as e:  # the store's own errors: the next value tries again
                log.warning("saved state not written bot=%s key=%s error=%s", self.bot, key,
                            type(e).__name__)


def make_store(gateway_config, *, history_limit: int = 200) -> StoreBase:
    """The store a gateway config names (not yet opened): Redis when `gateway.store` is set,
    else the SQLite file in `gateway.data_dir`. The Redis client is imported only then."""
    url = getattr(gateway_config, "store", None)
    if url:
        import socket
        from pathlib import Path
        from .store_redis import RedisStore
        # Per-process values (a reload's outcome, read back by the CLI that found this process
        # through its data_dir) stay apart from those of the other processes on the Redis.
        scope = f"{socket.gethostname()}:{Path(gateway_config.data_dir).resolve()}"
        return RedisStore(url, history_limit=history_limit, meta_scope=scope,
                          local_dir=gateway_config.data_dir)
    from .store import Store
    return Store(gateway_config.data_dir, history_limit=history_limit)
