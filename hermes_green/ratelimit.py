"""Per-user token buckets: how many messages one user may send one bot.

A bucket holds up to `messages` tokens and refills at `messages / per_s` tokens a second; each
message takes one. A message that finds the bucket empty is refused. The user is told once per
"bite": the first refusal says so, later ones are silent until a message gets through again
(then the next bite gets its notice). Buckets live in memory: a restart forgives everyone, which
is the safe direction for a limit whose purpose is to keep one user from flooding the agent.

Memory stays bounded: when more than `max_users` buckets exist, the full ones (users idle long
enough to have refilled, who would start from a full bucket anyway) are dropped.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

MAX_USERS = 10_000  # buckets per bot before the idle (full) ones are swept


@dataclass
class _Bucket:
    tokens: float
    at: float
    noticed: bool = False


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    notify: bool = False  # refused, and the first refusal of this bite: tell the user


class RateLimiter:
    def __init__(self, messages: int, per_s: float, *, clock: Callable[[], float] = time.monotonic,
                 max_users: int = MAX_USERS) -> None:
        self.capacity = float(messages)
        self.rate = messages / per_s if messages else 0.0
        self.enabled = messages > 0
        self._clock = clock
        self._max_users = max_users
        self._buckets: dict[str, _Bucket] = {}

    def check(self, user: str) -> Verdict:
        """Take one token for `user`'s message, or refuse it."""
        if not self.enabled:
            return Verdict(True)
        now = self._clock()
        bucket = self._buckets.get(user)
        if bucket is None:
            if len(self._buckets) >= self._max_users:
                self._sweep(now)
            bucket = self._buckets[user] = _Bucket(self.capacity, now)
        else:
            bucket.tokens = min(self.capacity, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            bucket.noticed = False
            return Verdict(True)
        notify = not bucket.noticed
        bucket.noticed = True
        return Verdict(False, notify)

    def _sweep(self, now: float) -> None:
        full = [u for u, b in self._buckets.items()
                if b.tokens + (now - b.at) * self.rate >= self.capacity]
        for user in full:
            del self._buckets[user]

    def __len__(self) -> int:
        return len(self._buckets)


def describe(messages: int, per_s: float) -> str:
    """"20 messages per minute", "3 messages per 2 hours", "5 messages per 10 seconds"."""
    for unit_s, unit in ((3600, "hour"), (60, "minute"), (1, "second")):
        if per_s >= unit_s and float(per_s / unit_s).is_integer():
            n = int(per_s // unit_s)
            window = unit if n == 1 else f"{n} {unit}s"
            break
    else:
        window = f"{per_s:g} seconds"
    return f"{messages} message{'' if messages == 1 else 's'} per {window}"
