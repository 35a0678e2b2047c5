"""Who is alive, per role: each process writes itself into a sorted set with an expiry (Redis's
clock, so hosts with different clocks agree) and reads how many are alive. Workers use the count
to share the work shards evenly (cluster/queue.py); /healthz and logs show it."""
from __future__ import annotations

import logging

log = logging.getLogger("hermes_green.cluster")

MEMBER_TTL_MS = 5000

# KEYS[1] the role's set; ARGV: node id, ttl ms. Returns the live members.
_BEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
return redis.call('ZRANGE', KEYS[1], 0, -1)
"""


class Members:
    def __init__(self, redis, role: str, node_id: str, *, prefix: str = "hg:",
                 ttl_ms: int = MEMBER_TTL_MS) -> None:
        self.key = f"{prefix}members:{role}"
        self.node_id = node_id
        self.ttl_ms = ttl_ms
        self._beat = redis.register_script(_BEAT)
        self._redis = redis
        self.alive: list[str] = [node_id]

    def beat(self) -> list[str]:
        """Say we are alive; returns every live member (ourselves included), sorted. On a Redis
        error the last known list is kept."""
        try:
            self.alive = sorted(self._beat(keys=[self.key], args=[self.node_id, self.ttl_ms]))
        except Exception as e:  # noqa: BLE001  (an outage: balance on what we knew)
            log.debug("member beat failed key=%s error=%s", self.key, type(e).__name__)
        return self.alive

    def leave(self) -> None:
        try:
            self._redis.zrem(self.key, self.node_id)
        except Exception:  # noqa: BLE001  (it expires by itself)
            pass
