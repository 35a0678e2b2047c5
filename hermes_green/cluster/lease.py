"""Leases: who holds a thing that only one process may hold (a bot's single connection, a work
shard), on Redis.

Taken with `SET key token NX PX ttl`; renewed and released by scripts that act only while the key
still holds our token (SCALE.md). Every process renews all its leases from one greenlet every
`renew_every_s`. What a holder believes is bounded by its own clock: a lease is valid until
`ttl - margin` after the start of its last successful renewal, so the holder gives it up
(`on_lost`) before Redis can hand it to another process, even when Redis cannot be reached to
say so. A lease is therefore kept through a Redis outage shorter than most of its TTL, and given
up, at once, after that.

A pause longer than the TTL (a stopped VM, a partition) can still leave two holders for a moment
(locks without fencing are unsafe in general); the chat platforms cannot check a fencing token,
so the holder's answer is to stop acting the moment its lease is in doubt: the connection is
closed and replies for that bot are no longer sent (cluster/node.py).
"""
from __future__ import annotations

import logging
import secrets
import time
from dataclasses import dataclass
from typing import Callable

import gevent
import gevent.event

log = logging.getLogger("hermes_green.cluster")

LEASE_TTL_S = 5.0  # a dead holder's lease is free this long after its last renewal
RENEW_EVERY_S = 1.0
MARGIN_S = 0.75  # given up this long before Redis could expire it (clock rate differences)

# Renew when the key holds our token; re-take it when it is gone (a Redis restarted without
# persistence forgot it, and nobody else can hold it meanwhile); refuse when another holds it.
_RENEW = """
local out = {}
for i, key in ipairs(KEYS) do
  local token = ARGV[i + 1]
  local v = redis.call('GET', key)
  if v == token then
    redis.call('PEXPIRE', key, ARGV[1])
    out[i] = 1
  elseif not v then
    redis.call('SET', key, token, 'PX', ARGV[1])
    out[i] = 1
  else
    out[i] = 0
  end
end
return out
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass
class _Held:
    token: str
    valid_until: float  # time.monotonic()


class Leases:
    """This process's leases. `on_lost(name)` is called (from the renewing greenlet) for each
    lease that was lost or could not be renewed in time; the caller stops what it guarded."""

    def __init__(self, redis, owner: str, *, prefix: str = "hg:", ttl_s: float = LEASE_TTL_S,
                 renew_every_s: float = RENEW_EVERY_S, margin_s: float = MARGIN_S,
                 on_lost: Callable[[str], None] | None = None) -> None:
        if renew_every_s * 2 > ttl_s - margin_s:
            raise ValueError("renew_every_s must leave room for two renewals inside the TTL")
        self.redis = redis
        self.owner = owner
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.renew_every_s = renew_every_s
        self.margin_s = margin_s
        self.on_lost = on_lost or (lambda name: None)
        self._held: dict[str, _Held] = {}
        self._renew = redis.register_script(_RENEW)
        self._release = redis.register_script(_RELEASE)
        self._stopped = gevent.event.Event()

    def _key(self, name: str) -> str:
        return f"{self.prefix}lease:{name}"

    def _token(self) -> str:
        return f"{self.owner}:{secrets.token_hex(6)}"

    # -- one lease ---------------------------------------------------------------------------
    def try_take(self, name: str) -> bool:
        """Take the lease if nobody holds it. Redis errors count as "not taken"."""
        if self.holds(name):
            return True
        token = self._token()
        started = time.monotonic()
        try:
            with gevent.Timeout(self.renew_every_s, TimeoutError):
                taken = self.redis.set(self._key(name), token, nx=True,
                                       px=int(self.ttl_s * 1000))
        except Exception as e:  # noqa: BLE001  (an outage: try again next round)
            log.debug("lease take failed lease=%s error=%s", name, type(e).__name__)
            return False
        if not taken:
            return False
        self._held[name] = _Held(token, started + self.ttl_s - self.margin_s)
        log.debug("lease taken lease=%s node=%s", name, self.owner)
        return True

    def holds(self, name: str) -> bool:
        held = self._held.get(name)
        return held is not None and time.monotonic() < held.valid_until

    def held(self) -> list[str]:
        return [n for n in self._held if self.holds(n)]

    def holder(self, name: str) -> str | None:
        """Who holds it now, as Redis says (the owner part of the token); None when free."""
        value = self.redis.get(self._key(name))
        return value.rsplit(":", 1)[0] if value else None

    def release(self, name: str) -> None:
        """Give it up now (a clean stop, a rebalance), so another process need not wait out
        the TTL."""
        held = self._held.pop(name, None)
        if held is None:
            return
        try:
            self._release(keys=[self._key(name)], args=[held.token])
            log.debug("lease released lease=%s node=%s", name, self.owner)
        except Exception as e:  # noqa: BLE001  (it expires by itself)
            log.warning("lease release failed lease=%s error=%s", name, type(e).__name__)

    def release_all(self) -> None:
        for name in list(self._held):
            self.release(name)

    # -- renewal -----------------------------------------------------------------------------
    def renew_once(self) -> None:
        """Renew every lease in ONE script call (one round trip, however many leases), bounded
        by the soonest validity, so a lease whose time is up is given up on time even while
        Redis does not answer."""
        held = list(self._held.items())
        if not held:
            return
        started = time.monotonic()
        soonest = min(h.valid_until for _, h in held)
        bound = max(0.05, min(self.renew_every_s, soonest - started))
        try:
            with gevent.Timeout(bound, TimeoutError):
                answers = self._renew(keys=[self._key(n) for n, _ in held],
                                      args=[int(self.ttl_s * 1000), *(h.token for _, h in held)])
        except Exception as e:  # noqa: BLE001  (each kept until its validity runs out)
            answers = [None] * len(held)
            log.warning("lease renewal failed leases=%d error=%s valid_for_s=%.1f", len(held),
                        type(e).__name__, soonest - time.monotonic())
        for (name, h), ok in zip(held, answers):
            if self._held.get(name) is not h:
                continue  # released meanwhile
            if ok == 1:
                h.valid_until = started + self.ttl_s - self.margin_s
            elif ok == 0 or time.monotonic() >= h.valid_until:
                self._lose(name, "taken_by_another" if ok == 0 else "not_renewed_in_time")

    def _lose(self, name: str, reason: str) -> None:
        del self._held[name]
        log.warning("lease lost lease=%s node=%s reason=%s", name, self.owner, reason)
        try:
            self.on_lost(name)
        except Exception:  # noqa: BLE001  (one failing handler never stops renewals)
            log.exception("lease lost handler failed lease=%s", name)

    def run(self) -> None:
        """The renewing loop (one greenlet per process). It also notices, between rounds, a
        lease whose validity ran out while a renewal call hung."""
        while not self._stopped.is_set():
            self.renew_once()
            self._stopped.wait(self._next_wait())

    def _next_wait(self) -> float:
        now = time.monotonic()
        soonest = min((h.valid_until for h in self._held.values()), default=now + 3600)
        return max(0.01, min(self.renew_every_s, soonest - now))

    def stop(self) -> None:
        self._stopped.set()
