"""The work queue, a worker's side: Redis Streams split into shards by chat, each shard read by
one worker at a time, so a chat's messages are answered one at a time and in order.

Producer: the store's journal script appends every new message to its chat's shard
(`store_redis.work_shard`) in the same step that journals it, so nothing journaled is left
unqueued.

Consumers: every worker is in the consumer group `workers` of every shard, but reads only the
shards whose lease it holds (`shard:<n>`, cluster/lease.py). Leases are shared out evenly:
each worker aims for ceil(shards / live workers) and takes free shards up to that; one holding
more stops reading the extras, lets their running turns finish, then releases them, so a
handover never runs two turns of one chat at once. A worker that takes a shard first claims
every entry still pending there (XAUTOCLAIM from 0-0: the previous holder's unfinished turns,
oldest first), then reads new ones (XREADGROUP >). A dead worker's shards are free once its
leases expire (LEASE_TTL_S), and the survivors' next balance takes them.

An entry is acknowledged (XACK, then XDEL: the stream keeps only unfinished work) once the
turn's result is stored (`ack`), or at once when the journal says it was answered already.
Delivery is at least once; the journal makes the answer exactly once: `finish_turn` writes
nothing for a message that is already closed.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from enum import Enum
from typing import Callable

import gevent
import gevent.event

from .lease import Leases
from .members import Members

log = logging.getLogger("hermes_green.cluster")

GROUP = "workers"
READ_BLOCK_MS = 1000  # one XREADGROUP waits this long; balancing runs between reads
READ_COUNT = 32
BALANCE_EVERY_S = 1.0
RECLAIM_EVERY_S = 10.0  # own pending entries whose turn ended without an answer run again
MAX_IN_FLIGHT = 256  # entries taken and not yet acknowledged, per worker
ERROR_WAIT_S = 0.5


class Taken(str, Enum):
    """What the worker did with one entry."""
    RUNNING = "running"  # a turn will answer it; acknowledged when its result is stored
    DONE = "done"  # nothing to do (answered before, unknown): acknowledge now
    LEAVE = "leave"  # not now (stopping): leave it pending for whoever holds the shard next


@dataclass
class _Entry:
    shard: int
    entry_id: str


def shard_lease(shard: int) -> str:
    return f"shard:{shard}"


class WorkQueue:
    """`handle(bot, message_id) -> Taken` decides about each entry (cluster/node.py)."""

    def __init__(self, redis, node_id: str, leases: Leases, members: Members, *,
                 shards: int, stream: Callable[[int], str],
                 handle: Callable[[str, str], Taken]) -> None:
        self.redis = redis
        self.node_id = node_id
        self.leases = leases
        self.members = members
        self.shards = shards
        self.stream = stream
        self.handle = handle
        self.in_flight: dict[tuple[str, str], _Entry] = {}
        self.draining: set[int] = set()
        self._fresh: list[int] = []  # shards taken and not yet claimed from
        self._room = gevent.event.Event()
        self._room.set()
        self._stopping = False
        self._last_balance = 0.0
        self._last_reclaim = time.monotonic()
        self._shown: list[int] = []

    # -- setup -------------------------------------------------------------------------------
    def ensure_groups(self) -> None:
        """The group on every shard stream, from the stream's start (entries journaled before
        any worker existed are read too)."""
        import redis
        for shard in range(self.shards):
            try:
                self.redis.xgroup_create(self.stream(shard), GROUP, id="0", mkstream=True)
            except redis.ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> None:
        import redis
        while not self._stopping:
            try:
                if time.monotonic() - self._last_balance >= BALANCE_EVERY_S:
                    self._balance()
                self._claim_fresh()
                if time.monotonic() - self._last_reclaim >= RECLAIM_EVERY_S:
                    self._reclaim()
                self._read()
            except redis.ResponseError as e:
                if "NOGROUP" in str(e):  # a Redis that lost its data: start the groups again
                    log.warning("work groups missing, creating them again")
                    self._safe(self.ensure_groups)
                else:
                    log.error("work queue error=%s", str(e)[:200])
                gevent.sleep(ERROR_WAIT_S)
            except (redis.RedisError, OSError) as e:
                log.warning("work queue waits for Redis error=%s", type(e).__name__)
                gevent.sleep(ERROR_WAIT_S)

    def stop(self) -> None:
        """Stop taking entries (the running turns go on; see release_all)."""
        self._stopping = True

    def release_all(self) -> None:
        for shard in range(self.shards):
            self.leases.release(shard_lease(shard))

    def active(self) -> list[int]:
        return [s for s in range(self.shards)
                if s not in self.draining and self.leases.holds(shard_lease(s))]

    # -- sharing the shards out --------------------------------------------------------------
    def _balance(self) -> None:
        self._last_balance = time.monotonic()
        alive = self.members.beat()
        target = math.ceil(self.shards / max(1, len(alive)))
        active = self.active()
        if len(active) < target:
            for shard in sorted(self.draining):  # wanted again: keep it
                if len(active) >= target:
                    break
                if self.leases.holds(shard_lease(shard)):
                    self.draining.discard(shard)
                    active.append(shard)
            # Start looking at a different shard on each worker, so they rarely race for one.
            me = alive.index(self.node_id) if self.node_id in alive else 0
            start = (me * target) % self.shards
            for i in range(self.shards):
                if len(active) >= target:
                    break
                shard = (start + i) % self.shards
                if shard in active or self.leases.holds(shard_lease(shard)):
                    continue
                if self.leases.try_take(shard_lease(shard)):
                    active.append(shard)
                    self._fresh.append(shard)
        elif len(active) > target:
            for shard in sorted(active)[target:]:
                self.draining.add(shard)
                log.info("shard draining shard=%d node=%s target=%d", shard, self.node_id,
                         target)
        now_active = sorted(self.active())
        if now_active != self._shown:
            self._shown = now_active
            log.info("shards held node=%s shards=%s workers=%d", self.node_id,
                     ",".join(map(str, now_active)) or "none", len(alive))
        for shard in list(self.draining):
            if not self.leases.holds(shard_lease(shard)):
                self.draining.discard(shard)
            elif not any(e.shard == shard for e in self.in_flight.values()):
                self.draining.discard(shard)
                self.leases.release(shard_lease(shard))

    # -- taking entries ----------------------------------------------------------------------
    def _claim_fresh(self) -> None:
        """A shard just taken: its pending entries (a dead or departed worker's) first."""
        while self._fresh:
            shard = self._fresh[0]
            if self.leases.holds(shard_lease(shard)):
                self._claim_pending(shard)
            self._fresh.pop(0)

    def _claim_pending(self, shard: int) -> int:
        cursor, count = "0-0", 0
        while True:
            cursor, entries, *deleted = self.redis.xautoclaim(
                self.stream(shard), GROUP, self.node_id, 0, start_id=cursor, count=READ_COUNT)
            for entry_id, fields in entries:
                if fields:
                    self._take(shard, entry_id, fields)
                    count += 1
            for entry_id in (deleted[0] if deleted else []):  # gone from the stream: forget
                self.redis.xack(self.stream(shard), GROUP, entry_id)
            if cursor in ("0-0", b"0-0"):
                break
        if count:
            log.info("shard claimed shard=%d node=%s pending=%d", shard, self.node_id, count)
        return count

    def _reclaim(self) -> None:
        """Our own pending entries whose turn ended without an answer (a store error at its
        end) run again; entries whose turn is running are skipped."""
        self._last_reclaim = time.monotonic()
        for shard in self.active():
            self._claim_pending(shard)

    def _read(self) -> None:
        shards = self.active()
        if not shards:
            gevent.sleep(BALANCE_EVERY_S / 2)
            return
        if len(self.in_flight) >= MAX_IN_FLIGHT:
            self._room.clear()
            self._room.wait(BALANCE_EVERY_S)
            return
        answer = self.redis.xreadgroup(GROUP, self.node_id,
                                       {self.stream(s): ">" for s in shards},
                                       count=READ_COUNT, block=READ_BLOCK_MS)
        by_stream = {self.stream(s): s for s in range(self.shards)}
        for stream, entries in answer or []:
            shard = by_stream[stream]
            for entry_id, fields in entries:
                self._take(shard, entry_id, fields)

    def _take(self, shard: int, entry_id: str, fields: dict) -> None:
        bot, mid = fields.get("bot"), fields.get("mid")
        if not bot or not mid:
            log.error("work entry unreadable shard=%d entry=%s", shard, entry_id)
            return self._ack_entry(_Entry(shard, entry_id))
        if (bot, mid) in self.in_flight:
            return  # its turn is running here (a reclaim saw it again)
        if not self.leases.holds(shard_lease(shard)):
            return  # the shard moved while we read: its new holder claims this entry
        self.in_flight[(bot, mid)] = entry = _Entry(shard, entry_id)
        try:
            taken = self.handle(bot, mid)
        except Exception:
            self.in_flight.pop((bot, mid), None)
            raise
        if taken is Taken.DONE:
            if self.in_flight.pop((bot, mid), None) is not None:  # not acked meanwhile
                self._ack_entry(entry)
        elif taken is Taken.LEAVE:
            self.in_flight.pop((bot, mid), None)

    # -- the end of a turn -------------------------------------------------------------------
    def ack(self, bot: str, mid: str) -> None:
        """The turn's result is stored: the entry is done."""
        entry = self.in_flight.pop((bot, mid), None)
        if entry is not None:
            self._ack_entry(entry)
            self._room.set()

    def forget(self, bot: str, mid: str) -> None:
        """The turn ended without a stored result (crashed, stopped): the entry stays pending
        and runs again (our reclaim, or the shard's next holder)."""
        if self.in_flight.pop((bot, mid), None) is not None:
            self._room.set()

    def _ack_entry(self, entry: _Entry) -> None:
        stream = self.stream(entry.shard)
        try:
            pipe = self.redis.pipeline(transaction=True)
            pipe.xack(stream, GROUP, entry.entry_id)
            pipe.xdel(stream, entry.entry_id)
            pipe.execute()
        except Exception as e:  # noqa: BLE001  (left pending: whoever claims it sees it answered)
            log.warning("work ack failed entry=%s error=%s", entry.entry_id, type(e).__name__)

    @staticmethod
    def _safe(fn) -> None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            log.warning("work queue setup failed error=%s", type(e).__name__)
