"""Leases and the work queue in one process, on a real redis-server, with short lease times so
each fault shows in about a second: one holder at a time; a holder that cannot renew gives the
lease up before Redis could hand it on; a lease taken over by another is noticed at the next
renewal; shards are shared evenly and a departed worker's pending entries are claimed, in order.
"""
import time

import gevent
import gevent.event
import pytest
import redis as redis_py

from hermes_green.cluster.lease import Leases
from hermes_green.cluster.members import Members
from hermes_green.cluster.queue import GROUP, Taken, WorkQueue, shard_lease
from hermes_green.models import InboundMessage
from hermes_green.store_redis import RedisStore, work_shard, work_stream
from hermes_green.testing.redis_server import RedisServer
from tests.support import wait_until

TTL = dict(ttl_s=1.0, renew_every_s=0.2, margin_s=0.2)


@pytest.fixture
def r(redis_url):
    client = redis_py.Redis.from_url(redis_url, decode_responses=True)
    yield client
    client.close()


def running(leases: Leases) -> gevent.Greenlet:
    g = gevent.spawn(leases.run)
    g.name = f"test:leases:{leases.owner}"
    return g


def test_one_holder_at_a_time_and_a_release_frees_it_at_once(r):
    a, b = Leases(r, "a", **TTL), Leases(r, "b", **TTL)
    renewing = running(a)
    try:
        assert a.try_take("bot:x") and a.holds("bot:x")
        assert not b.try_take("bot:x")
        gevent.sleep(1.5)  # longer than the TTL: renewals keep it
        assert a.holds("bot:x") and not b.try_take("bot:x")
        assert a.holder("bot:x") == "a"
        a.release("bot:x")
        assert not a.holds("bot:x") and b.try_take("bot:x") and b.holder("bot:x") == "b"
    finally:
        a.stop()
        renewing.kill()


def test_a_lease_taken_by_another_is_given_up_at_the_next_renewal(r):
    lost = gevent.event.AsyncResult()
    a = Leases(r, "a", on_lost=lost.set, **TTL)
    assert a.try_take("bot:x")
    r.set("hg:lease:bot:x", "intruder:1", px=5000)  # e.g. a pause longer than the TTL
    renewing = running(a)
    try:
        assert lost.get(timeout=2) == "bot:x"
        assert not a.holds("bot:x") and r.get("hg:lease:bot:x") == "intruder:1"
    finally:
        a.stop()
        renewing.kill()


def test_a_holder_cut_off_from_redis_gives_up_before_redis_could_hand_it_on(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    client = redis_py.Redis.from_url(server.url, decode_responses=True, socket_timeout=0.5,
                                     socket_connect_timeout=0.5)
    lost = gevent.event.AsyncResult()
    a = Leases(client, "a", on_lost=lost.set, **TTL)
    renewing = running(a)
    try:
        taken_at = time.monotonic()
        assert a.try_take("bot:x")
        server.kill()
        killed_at = time.monotonic()
        assert lost.get(timeout=3) == "bot:x"
        # given up before its TTL (counted from its last renewal) could have run out in Redis
        assert time.monotonic() - max(taken_at, killed_at - 0.2) < TTL["ttl_s"]
        assert not a.holds("bot:x")
    finally:
        a.stop()
        renewing.kill()
        server.stop()


# -- the work queue -------------------------------------------------------------------------

class Worker:
    """A WorkQueue whose turns are recorded and finished by the test."""

    def __init__(self, client, name: str, store: RedisStore) -> None:
        self.name, self.store = name, store
        self.taken: list[str] = []
        self.leases = Leases(client, name, **TTL)
        self.members = Members(client, "worker", name, ttl_ms=1000)
        self.queue = WorkQueue(client, name, self.leases, self.members, shards=store.shards,
                               stream=work_stream, handle=self.handle)
        self.queue.ensure_groups()
        self.greenlets = [gevent.spawn(self.leases.run), gevent.spawn(self.queue.run)]

    def handle(self, bot, mid) -> Taken:
        if self.store.inbound_state(bot, mid) != "received":
            return Taken.DONE
        self.taken.append(mid)
        return Taken.RUNNING

    def finish(self, bot, mid) -> None:
        self.store.finish_turn(bot, "c", [mid], [], user_text=None, answer_text=None)
        self.queue.ack(bot, mid)

    def die(self) -> None:
        """As kill -9: no release, no more renewals."""
        for g in self.greenlets:
            g.kill()

    def stop(self) -> None:
        self.queue.stop()
        self.die()
        self.leases.release_all()


def test_shards_are_shared_out_and_a_dead_workers_pending_entries_are_claimed_in_order(
        redis_url, r):
    store = RedisStore(redis_url).open()
    a = Worker(r, "a", store)
    b = None
    try:
        wait_until(lambda: len(a.queue.active()) == store.shards, what="a holds every shard")
        b = Worker(r, "b", store)
        wait_until(lambda: len(a.queue.active()) == len(b.queue.active()) == store.shards // 2,
                   timeout=10, what="shards shared evenly")
        # one chat, five messages: all in one shard, held by one worker
        chat = "chat-7"
        mids = [f"m{i}" for i in range(5)]
        for mid in mids:
            store.journal_inbound(InboundMessage("qqbot", mid, chat, "u", "t"))
        shard = work_shard("qqbot", chat)
        holder, other = (a, b) if shard in a.queue.active() else (b, a)
        wait_until(lambda: holder.taken == mids, what="taken in order by the shard's holder")
        holder.finish("qqbot", "m0")
        holder.die()  # m1..m4 taken, unanswered
        wait_until(lambda: other.taken == mids[1:], timeout=10,
                   what="the other worker claimed the pending entries, in order")
        assert len(other.queue.active()) == store.shards
        for mid in mids[1:]:
            other.finish("qqbot", mid)
        wait_until(lambda: r.xpending(work_stream(shard), GROUP)["pending"] == 0,
                   what="every entry acknowledged")
        assert r.xlen(work_stream(shard)) == 0  # acknowledged entries are deleted
        assert not r.exists("hg:lease:" + shard_lease(shard)) or other.leases.holds(
            shard_lease(shard))
    finally:
        a.stop()
        if b is not None:
            b.stop()
        store.close()
