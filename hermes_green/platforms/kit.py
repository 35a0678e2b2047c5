"""Small helpers every platform needs, written once: reconnect backoff, a cached access token,
request/answer correlation, Retry-After parsing, clamping a server-announced interval, decoding a
frame or skipping it, and renewing a token once when a REST call is refused with 401.

Nothing here knows a platform; each helper's docstring says which protocol habit it serves.
"""
from __future__ import annotations

import json
import math
import random
import time
from email.utils import parsedate_to_datetime
from typing import Any, Callable, Mapping, TypeVar

import gevent
import gevent.event
import gevent.lock
import gevent.pool

T = TypeVar("T")


def spawn_owned(group: gevent.pool.Group, fn: Callable[..., Any], *args: Any, name: str,
                log, restart: bool = False, restart_delay_s: float = 1.0) -> gevent.Greenlet:
    """Spawn `fn` into its owner's group (killed with it), named after its job, with its failure
    logged with that name (locust's rule: every greenlet has an owner). `restart`: a loop that
    must keep running (an outbox sender, the checkpoint) is started again after a crash."""

    def body() -> Any:
        while True:
            try:
                return fn(*args)
            except gevent.GreenletExit:
                raise
            except Exception as e:
                log.error("greenlet failed name=%s error=%s: %s restart=%s", name,
                          type(e).__name__, str(e)[:200], restart, exc_info=True)
                if not restart:
                    return None
                gevent.sleep(restart_delay_s)

    g = group.spawn(body)
    g.name = name
    return g


def http_session():
    """The REST client for one adapter's calls (hermes_green/rest.py: requests' calling
    convention over geventhttpclient's keep-alive pools)."""
    from ..rest import Session
    return Session()


class SkipFrame(Exception):
    """This frame cannot be used (garbled, oversized, too deep). Next step: log one line and go
    on reading; the connection stays up."""


class Backoff:
    """Exponential backoff with full jitter (AWS architecture blog's "full jitter").

    The first retry after a connection that was up is immediate: a single drop (server restart,
    QQ-style op 7, a session timeout) should cost milliseconds, not a second. Consecutive failures
    then wait uniform(0, min(cap, initial * factor**(n-1))). The count resets once a connection
    has stayed healthy for `healthy_after_s`, so a server that accepts and drops at once cannot
    make us spin.
    """

    def __init__(self, initial_s: float = 1.0, max_s: float = 60.0, factor: float = 2.0,
                 healthy_after_s: float = 60.0, rng: random.Random | None = None) -> None:
        self.initial_s, self.max_s, self.factor = initial_s, max_s, factor
        self.healthy_after_s = healthy_after_s
        self.failures = 0
        self._rng = rng or random.Random()

    @classmethod
    def from_config(cls, cfg) -> "Backoff":
        return cls(cfg.initial_s, cfg.max_s, cfg.factor, cfg.healthy_after_s)

    def connected_for(self, seconds: float) -> None:
        if seconds >= self.healthy_after_s:
            self.failures = 0

    def next_delay(self, at_least: float = 0.0) -> float:
        """The wait before the next attempt; `at_least` is what the server asked for (a 409 or
        429's retry time), so backoff never undercuts it."""
        n = self.failures
        self.failures += 1
        if n == 0:
            return at_least
        return max(at_least, self._rng.uniform(0, min(self.max_s, self.initial_s * self.factor ** (n - 1))))


class CachedToken:
    """An access token and its expiry, as the platforms' REST APIs hand them out.

    `get()` fetches on first use and again `renew_margin(life)` seconds before expiry; one
    fetch runs at a time and callers arriving meanwhile reuse its result. `invalidate(refused)`
    forgets the token after a 401 so the next `get()` fetches anew, but only while it is still
    the refused one: several senders refused at once cause one refresh, not one each.
    `fetch()` returns (token, lifetime in seconds) or raises the adapter's own errors.
    """

    def __init__(self, fetch: Callable[[], tuple[str, float]], *,
                 renew_margin: Callable[[float], float],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._fetch, self._renew_margin, self._clock = fetch, renew_margin, clock
        self._value: str | None = None
        self._renew_at = 0.0
        self._lock = gevent.lock.Semaphore()
        self.fetches = 0

    def get(self) -> str:
        with self._lock:
            if self._value is None or self._clock() >= self._renew_at:
                self.fetches += 1
                token, life = self._fetch()
                self._value = token
                self._renew_at = self._clock() + life - self._renew_margin(life)
            return self._value

    def invalidate(self, refused: str | None = None) -> None:
        if refused is None or refused == self._value:
            self._value = None


class TokenRefused(Exception):
    """Raised by a REST call made through `with_token_renewal` when the platform said 401 (or
    its own "token invalid" code): the token is renewed once and the call made once more."""


def with_token_renewal(token: CachedToken, call: Callable[[str], T]) -> T:
    """Run `call(token)`; on TokenRefused, forget that token, fetch a new one and try once more.
    A second refusal propagates: the credentials themselves are wrong, and the caller decides
    (fatal at start, a non-retryable send error later)."""
    value = token.get()
    try:
        return call(value)
    except TokenRefused:
        token.invalidate(value)
        return call(token.get())


class Waiters:
    """Request/answer correlation: `expect(key)` before sending, `resolve(key, value)` from the
    read loop, `AsyncResult.get(timeout=)` in the sender. Used for req_ids and the like."""

    def __init__(self) -> None:
        self._pending: dict[str, gevent.event.AsyncResult] = {}

    def expect(self, key: str) -> gevent.event.AsyncResult:
        result = gevent.event.AsyncResult()
        self._pending[key] = result
        return result

    def resolve(self, key: str, value: Any) -> bool:
        result = self._pending.pop(key, None)
        if result is None:
            return False
        result.set(value)
        return True

    def discard(self, key: str) -> None:
        self._pending.pop(key, None)

    def fail_all(self, exc: BaseException) -> None:
        pending, self._pending = self._pending, {}
        for result in pending.values():
            result.set_exception(exc)


def retry_after_s(value: Any, *, default: float | None = None, cap_s: float = 3600.0) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date), a JSON
    `retry_after` number, or a headers mapping holding one. Garbage, negative, NaN or absurd
    values give `default`; the result is capped so a hostile server cannot park us for a week."""
    if isinstance(value, Mapping):
        value = next((v for k, v in value.items() if k.lower() == "retry-after"), None)
    if value is None:
        return default
    seconds: float | None = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip()
        try:
            seconds = float(text)
        except ValueError:
            try:
                seconds = parsedate_to_datetime(text).timestamp() - time.time()
            except (TypeError, ValueError, IndexError, OverflowError):
                return default
    if seconds is None or not math.isfinite(seconds):
        return default
    return min(max(seconds, 0.0), cap_s)


def is_int(value: Any) -> bool:
    """A JSON integer (bool is an int subclass in Python, never in JSON)."""
    return isinstance(value, int) and not isinstance(value, bool)


def json_object(resp) -> dict:
    """A REST answer's JSON object, or {} when the body is not one (an HTML error page from a
    proxy, garbage, a list): callers then read the status code alone."""
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def clamp_interval(value: Any, lo: float, hi: float, *, default: float) -> float:
    """A keepalive interval the server announced, made safe: a non-number, NaN, infinity or a
    bool gives `default`; anything else is held within [lo, hi] (a 0 ms interval would spin the
    hub, a day-long one would leave a zombie undetected)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return default
    return min(max(float(value), lo), hi)


def decode_json(data: str | bytes, *, max_bytes: int | None = None) -> Any:
    """Parse one JSON frame or raise SkipFrame with the reason (too large, not JSON, nested past
    the interpreter's recursion limit, NaN/Infinity). Never raises anything else."""
    if max_bytes is not None and len(data) > max_bytes:
        raise SkipFrame(f"too_large bytes={len(data)}")
    try:
        text = data.decode("utf-8") if isinstance(data, (bytes, bytearray)) else data
    except UnicodeDecodeError:
        raise SkipFrame("invalid_utf8") from None
    try:
        obj = json.loads(text, parse_constant=_refuse_constant)
    except (ValueError, RecursionError) as e:
        raise SkipFrame(f"bad_json {type(e).__name__}") from None
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
