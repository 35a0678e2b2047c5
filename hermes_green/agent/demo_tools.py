"""Tools for the demo and the benchmarks: one of each kind of work.

- `count_primes`, `spin`: pure-Python CPU work, so `executor="process"` (in a thread they would
  hold the GIL and make the hub late; inline they would stop it).
- `hash_text`: blocking C work that releases the GIL (PBKDF2 in OpenSSL), so `thread`.
- `blocking_sleep`: stands for a blocking C library call; uses the unpatched `time.sleep` so it
  really blocks its thread, as a C library would. `thread`.

Enable with `agent.tools: [hermes_green.agent.demo_tools]`. This module is imported by worker
processes: it must import nothing that monkey-patches.
"""
from __future__ import annotations

import hashlib
import sys
import time

from .tools import tool


def _blocking_sleep(seconds: float) -> None:
    """The real, blocking sleep even when this process is monkey-patched."""
    monkey = sys.modules.get("gevent.monkey")  # not imported at all in a worker process
    if monkey is not None and monkey.is_module_patched("time"):
        monkey.get_original("time", "sleep")(seconds)
    else:
        time.sleep(seconds)


MAX_PRIME_LIMIT = 50_000_000


@tool(executor="process", timeout_s=120)
def count_primes(limit: int) -> int:
    """Count the prime numbers below a limit (pure-Python sieve: CPU work).

    Args:
        limit: count primes p with 2 <= p < limit; at most 50 million
    """
    if limit < 0 or limit > MAX_PRIME_LIMIT:
        raise ValueError(f"limit must be between 0 and {MAX_PRIME_LIMIT}")
    if limit < 3:
        return 0
    sieve = bytearray([1]) * limit
    sieve[0] = sieve[1] = 0
    i = 2
    while i * i < limit:
        if sieve[i]:
            for j in range(i * i, limit, i):  # deliberately pure Python: this is the CPU load
                sieve[j] = 0
        i += 1
    return sum(sieve)


@tool(executor="process", timeout_s=120)
def spin(iterations: int) -> int:
    """Burn CPU in a pure-Python loop and return a checksum (benchmarks use it).

    Args:
        iterations: loop iterations; 2e7 takes about two seconds on one core
    """
    acc = 0
    for i in range(iterations):
        acc = (acc + i * i) % 1_000_003
    return acc


@tool(executor="thread", timeout_s=60)
def hash_text(text: str, iterations: int = 200_000) -> str:
    """Derive a PBKDF2-SHA256 hash of a text (blocking C work that releases the GIL).

    Args:
        text: the text to hash
        iterations: PBKDF2 iterations, between 1 and 5 million
    """
    if not 1 <= iterations <= 5_000_000:
        raise ValueError("iterations must be between 1 and 5000000")
    return hashlib.pbkdf2_hmac("sha256", text.encode(), b"hermes-green", iterations).hex()


@tool(executor="thread", timeout_s=60)
def blocking_sleep(seconds: float) -> str:
    """Block the calling thread for a while, like a slow C library call would.

    Args:
        seconds: how long to block, at most 30
    """
    if not 0 <= seconds <= 30:
        raise ValueError("seconds must be between 0 and 30")
    _blocking_sleep(seconds)
    return f"slept {seconds:g} s"
