"""Every platform's strict fake and the fake LLM as one fleet, with one view over their records:
the demo, the cascade test and the benchmarks speak to this. Which platforms there are comes from
the registry; what each fake records is read through its `Driver` (testing/driver.py), so the
fleet never branches on a platform's name:
    send(platform, text, chat)     a user writes; returns the platform's message id
    answers(platform, mid)         the reply texts the user saw for that message, in order
    lateness(platform)             how late each keepalive arrived against its timetable (s)
    disconnects(platform)          connections the fake dropped or saw dropped while running
"""
from __future__ import annotations

import time
from typing import Any

import gevent

from .driver import Keepalive, PlatformDriver, driver_class, platforms_with_drivers
from .fake_llm import FakeLLM

__all__ = ["FakeFleet", "Keepalive", "all_platforms"]


def all_platforms() -> tuple[str, ...]:
    """Every registered platform whose fake has a driver."""
    return tuple(platforms_with_drivers())


class FakeFleet:
    def __init__(self, platforms=None, *, keepalive: Keepalive | None = None,
                 llm_chunk_delay_s: float = 0.02, llm_api_key: str = "sk-fake-fleet-key",
                 secrets: dict[str, str] | None = None) -> None:
        self.platforms = tuple(platforms) if platforms is not None else all_platforms()
        self.keepalive = keepalive or Keepalive()
        secrets = secrets or {}
        self.llm = FakeLLM(api_key=llm_api_key, chunk_delay_s=llm_chunk_delay_s)
        self.llm_api_key = llm_api_key
        self.drivers: dict[str, PlatformDriver] = {}
        for name in self.platforms:
            cls = driver_class(name)
            if cls is None:
                raise LookupError(f"platform {name!r} has no fake driver")
            self.drivers[name] = cls(self.keepalive, secret=secrets.get(name))
        self.fakes: dict[str, Any] = {name: d.fake for name, d in self.drivers.items()}
        self._sent: dict[str, list[str]] = {p: [] for p in self.platforms}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FakeFleet":
        self.llm.start()
        for driver in self.drivers.values():
            driver.start()
        return self

    def stop(self) -> None:
        for driver in self.drivers.values():
            driver.stop()
        self.llm.stop()

    # -- configuration a gateway (or a baseline) needs -----------------------------------------
    def platforms_config(self, backoff: dict | None = None) -> dict:
        extra = {"backoff": backoff} if backoff else {}
        return {name: d.bot_config(**extra) for name, d in self.drivers.items()}

    def agent_config(self, **over) -> dict:
        return {"base_url": self.llm.base_url, "api_key": self.llm_api_key,
                "model": "fake-model", "tools": ["hermes_green.agent.demo_tools"], **over}

    # -- users ---------------------------------------------------------------------------------
    def send(self, platform: str, text: str, chat: int = 0) -> str:
        mid = self.drivers[platform].user_says(text, chat=chat)
        self._sent[platform].append(mid)
        return mid

    def sent(self, platform: str) -> list[str]:
        return list(self._sent[platform])

    def answers(self, platform: str, mid: str) -> list[str]:
        return self.drivers[platform].answers(mid)

    def first_answer_at(self, platform: str, mid: str) -> float | None:
        """time.monotonic() of the first reply to `mid` (None if unanswered)."""
        return min((r.at for r in self.drivers[platform].reply_rows() if r.message_id == mid),
                   default=None)

    def wait_for(self, predicate, timeout: float = 30.0, what=None):
        """Wait until predicate() is truthy: re-checked whenever any fake records something
        (and at least every 50 ms). `what()` describes the state for the failure message."""
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s"
                                     + (f": {what()}" if what else ""))
            events = [d.wait_changed() for d in self.drivers.values()]
            for ev in events:
                ev.clear()
            gevent.wait(events, timeout=0.05, count=1)
        return value

    def reply_rows(self, platform: str) -> list[tuple[str, str, float]]:
        """Every reply the fake accepted as (message id, text, monotonic time), in order."""
        return [(r.message_id, r.text, r.at) for r in self.drivers[platform].reply_rows()]

    def reply_count(self, platform: str) -> int:
        return len(self.drivers[platform].reply_rows())

    def answer_index(self, platform: str) -> dict[str, tuple[list[str], float]]:
        """message id -> (reply texts, first reply time), built in one pass (benchmarks)."""
        index: dict[str, tuple[list[str], float]] = {}
        for mid, text, at in self.reply_rows(platform):
            texts, first = index.get(mid, ([], at))
            texts.append(text)
            index[mid] = (texts, min(first, at))
        return index

    def all_answered(self) -> bool:
        return all(self.answers(p, mid) for p in self.platforms for mid in self._sent[p])

    # -- connection health -----------------------------------------------------------------------
    def lateness(self, platform: str) -> list[float]:
        return self.drivers[platform].lateness()

    def keepalives(self, platform: str) -> int:
        return self.drivers[platform].keepalives()

    def session_up_at(self, platform: str, conn_id: int) -> float | None:
        """time.monotonic() when the session on that connection was established, as the fake
        saw it."""
        return self.drivers[platform].session_up_at(conn_id)

    def disconnects(self, platform: str) -> list:
        return self.drivers[platform].disconnects()

    def connected(self, platform: str) -> bool:
        return self.drivers[platform].connected()

    def summary(self, platform: str) -> dict:
        from hermes_green.runtime import percentile
        sent = self._sent[platform]
        answers = {mid: self.answers(platform, mid) for mid in sent}
        late = self.lateness(platform)
        return {
            "sent": len(sent),
            "answered": sum(1 for a in answers.values() if a),
            "lost": sum(1 for a in answers.values() if not a),
            "duplicated": sum(1 for a in answers.values() if len(a) != len(set(a))),
            "disconnects": len(self.disconnects(platform)),
            "keepalives": len(late),
            "lateness_p50_ms": round(percentile(late, 50) * 1000, 2),
            "lateness_p99_ms": round(percentile(late, 99) * 1000, 2),
            "lateness_max_ms": round(max(late, default=0.0) * 1000, 2),
        }
