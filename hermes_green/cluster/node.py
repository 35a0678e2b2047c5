"""One process of a deployment on Redis: its identity, its role, and the few hooks the gateway
calls (the gateway knows nothing else of the cluster).

Roles (`hermes-green --role`):
    gateway   holds platform connections, journals inbound (which queues it), sends replies;
              never runs a turn
    worker    runs turns from the work shards it holds (cluster/queue.py); never connects
    all       both (the default; one process on Redis is a cluster of one)
Identity: host, pid and a random suffix, made at start; nothing in the config names a node, so
several processes on one host (each with its own config: data_dir, status port) just work.

Bots. A platform that allows one connection per bot (the adapter class says
`single_connection = True`: a second one kicks the first, gets 409, or splits a shard) is
connected only by the node holding the bot's lease `bot:<key>`; the node that loses it closes
the connection at once. Platforms that spread events over several connections are connected by
every gateway node (the journal de-duplicates); their lease only says who sends the replies, so
each reply row is sent by one node. A gateway node takes every free bot lease it can (first come
first served: a running bot never moves while its holder lives); a dead node's leases expire
after LEASE_TTL_S and the others take them at their next round (ACQUIRE_EVERY_S), so its bots
serve again within about TTL + round + connect time (bench/scale.py measures it).

Replies are written by the worker with the turn's result (store.finish_turn); the worker then
publishes the bot's key on `<prefix>replies`, and the node that sends for that bot wakes its
outbox loop (which also polls every second, so a lost publish only costs latency).
"""
from __future__ import annotations

import logging
import os
import secrets
import socket

import gevent
import gevent.event

from ..models import InboundMessage
from ..store_base import MAX_TURN_ATTEMPTS, OPEN_STATES
from .lease import Leases
from .members import Members
from .queue import Taken, WorkQueue

log = logging.getLogger("hermes_green.cluster")

ROLES = ("all", "gateway", "worker")
ACQUIRE_EVERY_S = 0.5  # how often a gateway node looks for free bot leases
LISTEN_TIMEOUT_S = 1.0


def bot_lease(bot: str) -> str:
    return f"bot:{bot}"


def new_node_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class Node:
    def __init__(self, gateway, role: str = "all") -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
        self.gateway = gateway
        self.role = role
        self.connects = role in ("all", "gateway")
        self.works = role in ("all", "worker")
        self.id = new_node_id()
        store = gateway.store
        self.store = store
        self.redis = store.redis
        self.prefix = store.prefix
        self.channel = f"{self.prefix}replies"
        self.leases = Leases(self.redis, self.id, prefix=self.prefix, on_lost=self._lease_lost)
        self._may_connect: dict[str, gevent.event.Event] = {}
        self._single: dict[str, bool] = {}
        self._closing = False
        self.queue: WorkQueue | None = None
        self.members: list[Members] = []
        if self.works:
            from ..store_redis import work_stream
            workers = Members(self.redis, "worker", self.id, prefix=self.prefix)
            self.members.append(workers)
            self.queue = WorkQueue(self.redis, self.id, self.leases, workers,
                                   shards=store.shards,
                                   stream=lambda shard: work_stream(shard, self.prefix),
                                   handle=self._handle_entry)
        if self.connects:
            self.members.append(Members(self.redis, "gateway", self.id, prefix=self.prefix))

    # -- start and stop ----------------------------------------------------------------------
    def start(self, spawn) -> None:
        """`spawn(fn, name=, restart=)` is the gateway's owned spawn."""
        spawn(self.leases.run, name="cluster:leases", restart=True)
        if self.connects:
            spawn(self._own_bots, name="cluster:bots", restart=True)
            spawn(self._listen_replies, name="cluster:replies", restart=True)
        if self.queue is not None:
            self.queue.ensure_groups()
            spawn(self.queue.run, name="cluster:work", restart=True)
        log.info("node started node=%s role=%s", self.id, self.role)

    def stop_taking_work(self) -> None:
        """Shutdown begins: no new entries, no new connections (waiting supervisors return)."""
        self._closing = True
        for ev in self._may_connect.values():
            ev.set()
        if self.queue is not None:
            self.queue.stop()

    def stop(self) -> None:
        """After the adapters closed and the turns drained: give every lease back at once,
        so other nodes need not wait out the TTL."""
        self.leases.stop()
        held = self.leases.held()
        self.leases.release_all()
        log.info("leases released node=%s leases=%s", self.id, ",".join(sorted(held)) or "none")
        for m in self.members:
            m.leave()
        log.info("node stopped node=%s", self.id)

    # -- bots (gateway role) -----------------------------------------------------------------
    def add_bot(self, bot: str, single_connection: bool) -> None:
        self._single[bot] = single_connection
        self._may_connect.setdefault(bot, gevent.event.Event())

    def remove_bot(self, bot: str) -> None:
        """The bot left this node's config (a reload): give its lease back."""
        self._single.pop(bot, None)
        ev = self._may_connect.pop(bot, None)
        if ev is not None:
            ev.set()
        self.leases.release(bot_lease(bot))

    def _own_bots(self) -> None:
        while True:
            for m in self.members:
                if m.key.endswith(":gateway"):
                    m.beat()
            for bot in list(self._single):
                if not self.leases.holds(bot_lease(bot)) and self.leases.try_take(bot_lease(bot)):
                    log.info("bot lease taken bot=%s node=%s connects=%s", bot, self.id,
                             "yes" if self._single[bot] else "always")
                    self._may_connect.get(bot, gevent.event.Event()).set()
                    self._wake(bot)
            gevent.sleep(ACQUIRE_EVERY_S)

    def wait_connect(self, bot: str) -> None:
        """Blocks the bot's supervisor until this node may connect it."""
        while (self._single.get(bot) and not self._closing
               and not self.leases.holds(bot_lease(bot))):
            ev = self._may_connect[bot]
            ev.clear()
            ev.wait(1.0)

    def may_connect(self, bot: str) -> bool:
        return not self._single.get(bot) or self.leases.holds(bot_lease(bot))

    def may_send(self, bot: str) -> bool:
        return self.leases.holds(bot_lease(bot))

    def _lease_lost(self, name: str) -> None:
        kind, _, bot = name.partition(":")
        if kind != "bot":
            return  # a work shard: its running turns finish; the journal answers them once
        self._may_connect.get(bot, gevent.event.Event()).clear()
        adapter = self.gateway.adapters.get(bot)
        if self._single.get(bot) and adapter is not None:
            log.warning("connection closed: lease lost bot=%s node=%s", bot, self.id)
            adapter.stop()  # closes the connection now; the supervisor waits for the lease

    # -- replies -----------------------------------------------------------------------------
    def replies_queued(self, bot: str) -> None:
        """A worker stored replies for `bot`: wake whichever node sends for it."""
        self._wake(bot)
        try:
            self.redis.publish(self.channel, bot)
        except Exception as e:  # noqa: BLE001  (the sender polls every second anyway)
            log.debug("reply wake not published bot=%s error=%s", bot, type(e).__name__)

    def _wake(self, bot: str) -> None:
        wake = self.gateway._outbox_wake.get(bot)
        if wake is not None:
            wake.set()

    def _listen_replies(self) -> None:
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            pubsub.subscribe(self.channel)
            while True:
                message = pubsub.get_message(timeout=LISTEN_TIMEOUT_S)
                if message and message.get("type") == "message":
                    self._wake(message["data"])
        finally:
            pubsub.close()

    # -- turns (worker role) -----------------------------------------------------------------
    def _handle_entry(self, bot: str, mid: str) -> Taken:
        sessions = self.gateway.sessions
        if not sessions.accepting:
            return Taken.LEAVE
        pending = self.store.inbound(bot, mid)
        if pending is None:
            log.warning("work entry without a journal entry bot=%s msg=%s", bot, mid)
            return Taken.DONE
        if pending.state not in OPEN_STATES:
            return Taken.DONE  # answered before (a re-claimed entry): answered once
        msg: InboundMessage = pending.message
        if pending.attempts >= MAX_TURN_ATTEMPTS:
            self.gateway._give_up(msg, pending.attempts)
            return Taken.DONE
        log.info("turn taken node=%s bot=%s chat=%s msg=%s attempts=%d", self.id, bot,
                 msg.chat_id, mid, pending.attempts)
        self.gateway._dispatch(msg)  # a command runs now; anything else goes to its chat
        return Taken.RUNNING

    def turn_finished(self, bot: str, message_ids: list[str]) -> None:
        """They are closed in the store: acknowledge their entries."""
        if self.queue is not None:
            for mid in message_ids:
                self.queue.ack(bot, mid)

    def turn_over(self, batch: list[InboundMessage]) -> None:
        if self.queue is not None:
            for m in batch:
                self.queue.forget(m.bot_key, m.message_id)

    # -- for /healthz ------------------------------------------------------------------------
    def snapshot(self) -> dict:
        return {"node": self.id, "role": self.role, "leases": sorted(self.leases.held())}
