"""The adapter contract kit: one suite every adapter passes against its strict fake.

Each scenario runs on a real in-process `Gateway` (SQLite in a temporary directory, no status
server) with a small echo agent, and speaks to the platform only through the fake's `Driver`
(testing/driver.py), so the suite never branches on a platform's name. What a platform may do
its own way is read from the adapter itself (`on_journal_failure`, `reply_chunk_chars()`,
`max_reply_parts()`), never from a list kept here.

    connect                   the bot becomes ready and the fake sees its keepalive
    dm_answered_once          a direct message gets exactly one answer
    group_message_answered    a group message addressed to the bot is answered, as a group
    long_reply_split          a long answer arrives in parts within the platform's limit,
                              complete and in order
    drop_recovered            the server cuts the connection: the bot reconnects, nothing
                              answered before is repeated, the next message is answered
    zombie_recovered          the connection goes silent (nothing arrives, nobody closes it):
                              the adapter notices on its own and reconnects
    garbage_skipped           malformed input from the server costs nothing
    redelivery_not_answered_twice   the platform delivers an answered message again
    journal_failure_not_lost  the store refuses one message once: it is answered exactly once,
                              by whatever the adapter's JournalFailure policy does
    bad_credentials_isolated  of two bots of the platform, the one with bad credentials stops
                              for good (FATAL) and the other keeps answering
    allow_from                a user not on the bot's allow list gets no answer; one on it does

Use from a test module (a new platform's tests get the whole suite in one line):

    CASES = contract_cases()                  # every registered platform with a Driver
    CASES += contract_cases([PollChatDriver])  # a test-only adapter: its Driver builds it

    @pytest.mark.parametrize("case", CASES, ids=str)
    def test_adapter_contract(case, tmp_path):
        case.run(tmp_path)
"""
from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import gevent.event

from ..agent.base import Turn
from ..config import Config
from ..gateway import Gateway
from ..models import InboundMessage, bot_key
from ..platforms import registry
from ..platforms.base import Delivery, JournalFailure, PlatformAdapter, State
from .driver import Keepalive, PlatformDriver, driver_class, platforms_with_drivers
from .waits import wait_until

# Short timings keep the suite fast: the fakes want a beat every 0.4 s (a missed one drops the
# client after 2 s); reconnects start at once and back off 0.05..0.3 s.
KEEPALIVE = Keepalive(interval_s=0.4, deadline_s=2.0)
# For the zombie scenario the fake's own deadline is far away: only the adapter can notice.
ZOMBIE_KEEPALIVE = Keepalive(interval_s=0.4, deadline_s=120.0)
ZOMBIE_SILENCE_S = 60.0  # ended as soon as the adapter has noticed
BACKOFF = {"initial_s": 0.05, "max_s": 0.3, "healthy_after_s": 0.5}
WAIT_S = 20.0  # failure guard for any one condition (a loaded CI machine may be slow)


# --- the agent --------------------------------------------------------------------------------

LONG = re.compile(r"^long (\d{1,6})$")


def long_answer(chars: int) -> str:
    """At least `chars` characters of numbered words, a line break every 16 words: a split
    that drops, repeats or reorders anything shows in the words."""
    out, size, n = [], 0, 0
    while size < chars:
        n += 1
        word = f"w{n:05d}" + ("\n" if n % 16 == 0 else " ")
        out.append(word)
        size += len(word)
    return "".join(out).strip()


class ContractAgent:
    """Answers "echo: <text>"; "long <n>" gets `long_answer(n)`. Streams half the answer as
    progress first, as a real agent does (the final text still comes only through the outbox)."""

    def run_turn(self, turn: Turn) -> str:
        m = LONG.match(turn.text.strip())
        answer = long_answer(int(m.group(1))) if m else f"echo: {turn.text}"
        turn.on_progress(answer[: len(answer) // 2])
        return answer

    def close(self) -> None:
        pass


def words(texts: Iterable[str]) -> list[str]:
    return " ".join(texts).split()


# --- one scenario's world ---------------------------------------------------------------------

@dataclass
class Bot:
    driver: PlatformDriver
    section: dict
    id: str = ""  # "" -> the platform's single bot


@dataclass
class Seen:
    """One message an adapter handed up, and what became of it (a Delivery, or the exception
    deliver() raised: ConnectionLost for JournalFailure.REPLAY)."""
    bot: str
    message: InboundMessage
    outcome: Any
    at: float


class Run:
    """Drivers (fakes), gateways and records of one scenario. `close()` stops everything."""

    def __init__(self, driver_cls: type[PlatformDriver], tmp_path: Path) -> None:
        self.driver_cls = driver_cls
        self.platform = driver_cls.platform
        self.tmp = Path(tmp_path)
        self.drivers: list[PlatformDriver] = []
        self.gw: Gateway | None = None
        self.agent = ContractAgent()
        self.seen: list[Seen] = []
        self.changed = gevent.event.Event()
        self._main: PlatformDriver | None = None

    # -- building ------------------------------------------------------------------------------
    def driver(self, keepalive: Keepalive = KEEPALIVE) -> PlatformDriver:
        d = self.driver_cls(keepalive).start()
        self.drivers.append(d)
        return d

    @property
    def main(self) -> PlatformDriver:
        """The scenario's first driver (made with the default keepalive when none exists)."""
        if self._main is None:
            self._main = self.drivers[0] if self.drivers else self.driver()
        return self._main

    def start(self, bots: list[Bot] | None = None, *, ready: Iterable[str] | None = None,
              **extra: Any) -> Gateway:
        """A gateway with `bots` (default: one bot on the main driver, its section updated with
        `extra`); waits until the bots in `ready` (default: all) are ready."""
        if bots is None:
            bots = [Bot(self.main, self.main.bot_config(**extra))]
        sections = [{**b.section, "backoff": BACKOFF, **({"id": b.id} if b.id else {})}
                    for b in bots]
        keys = [bot_key(self.platform, b.id or self.platform) for b in bots]
        data: dict[str, Any] = {"gateway": {"data_dir": str(self.tmp / "data"),
                                            "status": {"enabled": False},
                                            "drain_timeout_s": 5}}
        factories: dict[str, Callable[..., PlatformAdapter]] = {}
        if self.platform in registry.platforms():
            data["platforms"] = {self.platform: sections if bots[0].id else sections[0]}
            cls = registry.adapter_class(self.platform)
            for key in keys:
                factories[key] = self._recording(key, cls)
        else:
            for key, bot, section in zip(keys, bots, sections):
                factories[key] = self._recording(key, bot.driver.adapter_factory(section))
        self.gw = Gateway(Config.model_validate(data), agent=self.agent,
                          adapter_factories=factories).start()
        for key in (keys if ready is None else ready):
            self.wait(lambda key=key: self.gw.adapters.get(key) is not None
                      and self.gw.adapters[key].ready.is_set(), f"{key} ready")
        return self.gw

    def _recording(self, key: str, factory: Callable[..., PlatformAdapter]):
        """Build the adapter as the gateway would, and record every message it hands up with
        its outcome (a refused one never reaches the gateway: only here can a test see it)."""
        def build(cfg, on_message, **kw) -> PlatformAdapter:
            adapter = factory(cfg, on_message, **kw)
            deliver = adapter.deliver

            def recorded(msg: InboundMessage) -> Delivery:
                try:
                    outcome = deliver(msg)
                except Exception as e:
                    self._note(Seen(key, msg, e, time.monotonic()))
                    raise
                self._note(Seen(key, msg, outcome, time.monotonic()))
                return outcome
            adapter.deliver = recorded  # the adapter calls self.deliver(): this instance's
            return adapter
        return build

    def _note(self, seen: Seen) -> None:
        self.seen.append(seen)
        self.changed.set()

    def stop_gateway(self) -> None:
        if self.gw is not None:
            self.gw.shutdown()
            self.gw = None

    def close(self) -> None:
        try:
            self.stop_gateway()
        finally:
            for d in self.drivers:
                d.stop()

    # -- reading -------------------------------------------------------------------------------
    def adapter(self, key: str | None = None) -> PlatformAdapter:
        return self.gw.adapters[key or self.platform]

    def wait(self, predicate: Callable[[], Any], what: str, timeout: float = WAIT_S) -> Any:
        events = [self.changed] + [d.wait_changed() for d in self.drivers]
        return wait_until(predicate, timeout=timeout, what=f"{self.platform}: {what}",
                          events=events, describe=self.describe)

    def describe(self) -> dict:
        gw = self.gw
        return {"adapters": {k: a.stats.as_dict() for k, a in gw.adapters.items()} if gw else {},
                "fatal": dict(gw.fatal) if gw else {},
                "seen": [(s.message.message_id, getattr(s.outcome, "value", repr(s.outcome)))
                         for s in self.seen[-10:]],
                "replies": [(r.message_id, r.text[:60]) for d in self.drivers
                            for r in d.reply_rows()[-10:]]}

    def seen_of(self, mid: str) -> list[Seen]:
        return [s for s in self.seen if s.message.message_id == mid]

    def answered(self, mid: str, driver: PlatformDriver | None = None) -> list[str]:
        """Wait for an answer to `mid`, then for the gateway to be idle (every turn done, every
        reply accepted); returns every reply text the fake accepted for it."""
        d = driver or self.main
        self.wait(lambda: d.answers(mid), f"an answer to {mid}")
        assert self.gw.wait_idle(WAIT_S), f"{self.platform}: gateway not idle"
        return d.answers(mid)

    def reconnects(self, key: str | None = None) -> int:
        return sum(self.adapter(key).stats.reconnects.values())


# --- the scenarios ----------------------------------------------------------------------------

def connect(run: Run) -> None:
    run.start()
    adapter, d = run.adapter(), run.main
    run.wait(lambda: d.connected() and d.keepalives() >= 1, "a keepalive seen by the fake")
    assert adapter.stats.state is State.READY
    assert adapter.stats.connects == 1 and run.reconnects() == 0, run.describe()


def dm_answered_once(run: Run) -> None:
    run.start()
    mid = run.main.user_says("hello there")
    assert run.answered(mid) == ["echo: hello there"]
    (seen,) = run.seen_of(mid)
    assert seen.outcome is Delivery.NEW and seen.message.chat_type == "dm"


def group_message_answered(run: Run) -> None:
    run.start()
    mid = run.main.user_says("hello group", chat=1, user=2, group=True)
    assert run.answered(mid) == ["echo: hello group"]  # the mention is not part of the text
    (seen,) = run.seen_of(mid)
    assert seen.message.chat_type == "group"


def long_reply_split(run: Run) -> None:
    run.start()
    adapter, d = run.adapter(), run.main
    chunk, max_parts = adapter.reply_chunk_chars(), adapter.max_reply_parts()
    assert chunk <= d.max_reply_chars, f"chunk {chunk} > the platform's {d.max_reply_chars}"
    parts = min(max_parts or 3, 3)  # 2.5 parts' worth: fits any limit of 3 parts or more
    size = int(chunk * (parts - 0.5)) if parts > 1 else chunk // 2
    mid = d.user_says(f"long {size}")
    texts = run.answered(mid)
    assert len(texts) >= min(parts, 2), [len(t) for t in texts]
    assert all(len(t) <= d.max_reply_chars for t in texts), [len(t) for t in texts]
    assert words(texts) == words([long_answer(size)]), "parts incomplete or out of order"


def drop_recovered(run: Run) -> None:
    run.start()
    adapter, d = run.adapter(), run.main
    before = d.user_says("before the drop")
    assert run.answered(before) == ["echo: before the drop"]
    connects = adapter.stats.connects
    d.drop()
    run.wait(lambda: adapter.stats.connects > connects and adapter.ready.is_set(),
             "reconnected after the drop")
    after = d.user_says("after the drop")
    assert run.answered(after) == ["echo: after the drop"]
    assert d.answers(before) == ["echo: before the drop"]  # nothing answered twice


def zombie_recovered(run: Run) -> None:
    d = run.driver(ZOMBIE_KEEPALIVE)
    run.start()
    adapter = run.adapter()
    before = d.user_says("before the silence")
    assert run.answered(before) == ["echo: before the silence"]
    lost = run.reconnects()
    d.go_silent(ZOMBIE_SILENCE_S)
    try:
        # The fake drops nobody (its deadline is far off): a reconnect now is the adapter's own.
        run.wait(lambda: run.reconnects() > lost, "the adapter noticed the silent connection",
                 timeout=ZOMBIE_SILENCE_S - 10)
    finally:
        d.end_silence()
    # Where the fake's silence also swallowed the next connection's handshake, the adapter gets
    # out only by its own session deadline (20 s by default): wait for that too.
    run.wait(lambda: adapter.ready.is_set() and d.connected(), "ready again after the silence",
             timeout=WAIT_S + 30)
    after = d.user_says("after the silence")
    assert run.answered(after) == ["echo: after the silence"]
    assert d.answers(before) == ["echo: before the silence"]


def garbage_skipped(run: Run) -> None:
    run.start()
    adapter, d = run.adapter(), run.main
    d.send_garbage()
    # Two messages in turn: where the garbage waits for the next read (a long poll's answer),
    # the first one's answer does not prove it was read yet; the second's does.
    for text in ("after the garbage", "and once more"):
        mid = d.user_says(text)
        assert run.answered(mid) == [f"echo: {text}"]
    run.wait(lambda: adapter.ready.is_set(), "ready")
    assert adapter.stats.state is State.READY and not run.gw.fatal


def redelivery_not_answered_twice(run: Run) -> None:
    run.start()
    d = run.main
    mid = d.user_says("answer me once")
    assert run.answered(mid) == ["echo: answer me once"]
    d.redeliver(mid)
    run.wait(lambda: len(run.seen_of(mid)) >= 2, "the redelivered message handed up")
    assert [s.outcome for s in run.seen_of(mid)] == [Delivery.NEW, Delivery.DUPLICATE]
    assert run.gw.wait_idle(WAIT_S)
    assert d.answers(mid) == ["echo: answer me once"]


def journal_failure_not_lost(run: Run) -> None:
    gw = run.start()
    adapter, d = run.adapter(), run.main
    policy = adapter.on_journal_failure
    journal, failed = gw.store.journal_inbound, []

    def fails_once(msg: InboundMessage) -> bool:
        if not failed:
            failed.append(msg.message_id)
            raise sqlite3.OperationalError("disk I/O error (injected by the contract kit)")
        return journal(msg)
    gw.store.journal_inbound = fails_once
    reconnects = run.reconnects()
    mid = d.user_says("do not lose me")
    run.wait(lambda: failed, "the journal failure")
    assert failed == [mid]
    if policy is JournalFailure.REDELIVER and not d.resends_unacked:
        run.wait(lambda: run.seen_of(mid), "the refused delivery")
        d.redeliver(mid)  # the fake cannot resend unacked events: stand in for the platform
    assert run.answered(mid) == ["echo: do not lose me"]
    assert adapter.stats.journal_failures == 1 and adapter.stats.held == 0
    first = run.seen_of(mid)[0].outcome
    if policy is JournalFailure.REDELIVER:
        assert first is Delivery.NOT_JOURNALED and run.reconnects() == reconnects
    elif policy is JournalFailure.REPLAY:
        assert isinstance(first, Exception) and run.reconnects() > reconnects
    else:
        assert first is Delivery.HELD and run.reconnects() == reconnects


def bad_credentials_isolated(run: Run) -> None:
    good, bad = run.main, run.driver()
    gw = run.start([Bot(good, good.bot_config(), "good"),
                    Bot(bad, bad.bad_credentials_config(), "bad")],
                   ready=[bot_key(run.platform, "good")])
    good_key, bad_key = bot_key(run.platform, "good"), bot_key(run.platform, "bad")
    run.wait(lambda: bad_key in gw.fatal, "the bot with bad credentials stopped")
    assert run.adapter(bad_key).stats.state is State.FATAL
    mid = good.user_says("are you still there?")
    assert run.answered(mid, good) == ["echo: are you still there?"]
    assert run.adapter(good_key).stats.state is State.READY and good_key not in gw.fatal
    assert not bad.reply_rows()


def allow_from(run: Run) -> None:
    d = run.main
    run.start()
    probe = d.user_says("who am I?", chat=1, user=1)
    run.answered(probe)
    allowed = run.seen_of(probe)[0].message.user_id
    run.stop_gateway()
    run.start(allow_from=[allowed])  # the same data directory: a restart with a new config
    stranger = d.user_says("let me in", chat=2, user=2)
    friend = d.user_says("it is me again", chat=1, user=1)
    assert run.answered(friend) == ["echo: it is me again"]
    run.wait(lambda: run.seen_of(stranger), "the stranger's message handed up")
    assert [s.outcome for s in run.seen_of(stranger)] == [Delivery.REFUSED]
    assert run.seen_of(stranger)[0].message.user_id != allowed
    assert d.answers(stranger) == []


CONTRACT: list[Callable[[Run], None]] = [
    connect, dm_answered_once, group_message_answered, long_reply_split, drop_recovered,
    zombie_recovered, garbage_skipped, redelivery_not_answered_twice, journal_failure_not_lost,
    bad_credentials_isolated, allow_from,
]


# --- cases ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    """One scenario against one platform's fake; `str(case)` is its test id."""
    driver: type[PlatformDriver]
    scenario: Callable[[Run], None]

    def __str__(self) -> str:
        return f"{self.driver.platform}-{self.scenario.__name__}"

    def run(self, tmp_path: Path) -> None:
        run = Run(self.driver, tmp_path)
        try:
            self.scenario(run)
        finally:
            run.close()


def contract_cases(drivers: Iterable[type[PlatformDriver] | str] | None = None,
                   scenarios: Iterable[Callable[[Run], None]] = CONTRACT) -> list[Case]:
    """Every scenario for every driver: Driver classes, or registered platform names (default:
    every registered platform whose fake has a Driver)."""
    chosen = platforms_with_drivers() if drivers is None else drivers
    classes = [driver_class(d) if isinstance(d, str) else d for d in chosen]
    return [Case(cls, scenario) for cls in classes for scenario in scenarios]
