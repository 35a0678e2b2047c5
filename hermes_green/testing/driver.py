"""One way to drive any platform's strict fake: what the demo fleet, the cascade test, the
benchmarks and the adapter contract kit ask of a platform, answered by each fake module's
`Driver` (a subclass of `PlatformDriver`), so none of them branches on a platform's name.

A driver owns one fake server (and through it one or more bots' credentials) and speaks for
its users: a user writes, the driver returns the platform's message id; the fake's own records
(replies, keepalives, disconnects) are read back through the same few calls.

Adding a platform: write `Driver` at the bottom of its fake module and name that module in the
platform's `PlatformSpec.fake`; the fleet and the contract kit pick it up from the registry.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

# Disconnect reasons that are not failures: the test/bench ended the connection itself.
BENIGN_DISCONNECTS = frozenset({"server_stopping", "kicked_by_test"})


@dataclass
class Keepalive:
    """Keepalive timing every fake enforces: beats every `interval_s`, and a client whose last
    beat is older than `deadline_s` is dropped. Long-poll platforms read `interval_s` as the
    long-poll timeout."""
    interval_s: float = 1.0
    deadline_s: float = 1.5


@dataclass
class SentFile:
    """A file the fake accepted from the bot: which inbound message it answers, as the platform
    received it."""
    message_id: str
    name: str
    data: bytes
    media: str  # image | file | voice | video


@dataclass
class ReplyRow:
    """One reply the fake accepted: which inbound message it answers, its text, when (monotonic
    time at the fake)."""
    message_id: str
    text: str
    at: float


class PlatformDriver:
    platform: ClassVar[str]
    max_reply_chars: ClassVar[int] = 2000
    # The fake sends an event the adapter did not acknowledge again, as the real platform does
    # (the contract's journal-failure scenario relies on it for JournalFailure.REDELIVER). A
    # fake that cannot model this says False here, and the contract then calls `redeliver()`
    # itself once the failure was seen (a stand-in for the platform, named in its report).
    resends_unacked: ClassVar[bool] = True

    def __init__(self, keepalive: Keepalive | None = None, *, secret: str | None = None) -> None:
        self.keepalive = keepalive or Keepalive()
        self.secret = secret
        self.fake: Any = None  # the fake server, made by the subclass

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "PlatformDriver":
        self.fake.start()
        return self

    def stop(self) -> None:
        self.fake.stop()

    # -- configuration -----------------------------------------------------------------------
    def bot_config(self, **extra: Any) -> dict:
        """The `platforms.<name>` section that connects a gateway to this fake."""
        raise NotImplementedError

    def bad_credentials_config(self, **extra: Any) -> dict:
        """A section the fake refuses for good (wrong secret or token)."""
        raise NotImplementedError

    def adapter_factory(self, section: dict) -> Callable[..., Any]:
        """Only for an adapter outside the registry (a test's own platform): the gateway
        factory `factory(cfg, on_message, **kw)` that builds it from `section` (a bot_config()
        dict, plus `id`, `backoff`, `allow_from` as the gateway's sections take them).
        Registered platforms are built by the gateway from their config model."""
        raise NotImplementedError(f"{self.platform} is registered: the gateway builds it")

    # -- users -------------------------------------------------------------------------------
    def user_says(self, text: str, *, chat: int = 0, user: int | None = None,
                  group: bool = False) -> str:
        """A user writes to the bot (in a group: addressed to the bot, as the platform requires
        for the bot to be told). Returns the platform's message id, as the adapter journals it."""
        raise NotImplementedError

    def redeliver(self, message_id: str) -> None:
        """The platform delivers that message again (same id), as after a lost ack."""
        raise NotImplementedError

    def reply_rows(self) -> list[ReplyRow]:
        """Every reply the fake accepted, in order."""
        raise NotImplementedError

    # -- media (the media tests run on every platform whose driver speaks these) ------------
    # Whether the platform transcribes voice messages itself (the adapter hands the text up).
    transcribes_voice: ClassVar[bool] = False
    # The largest file a user can send that the bot may fetch (None: as large as the fake
    # serves); the media tests expect a larger one to be refused with a note.
    media = True

    def user_sends_media(self, data: bytes, *, kind: str, name: str, mime: str,
                         transcript: str | None = None, chat: int = 0) -> str:
        """A user sends a file of `kind` (image | file | voice) the fake serves with the
        platform's own download rules; `transcript`: what the platform's speech recognition
        heard (used where it transcribes). Returns the message id."""
        raise NotImplementedError

    # The fakes keep the same records for these (`files`, `hold_file_sends()`, `held_sends`,
    # `release_file_sends()`), so a driver only overrides what its fake names differently.
    def files_sent(self) -> list[SentFile]:
        """Every file the fake accepted from the bot and showed in a chat, in order."""
        return list(self.fake.files)

    def uploads(self) -> int:
        """Uploads the fake accepted (on two-step platforms the upload precedes the send; on
        one-step ones upload and send are one request, counted when it arrives)."""
        raise NotImplementedError

    def hold_file_sends(self) -> None:
        """From now on the request that puts a file into a chat is held unanswered and never
        processed (the client dies while waiting); `held_file_sends()` counts them."""
        self.fake.hold_file_sends()

    def held_file_sends(self) -> int:
        return self.fake.held_sends

    def release_file_sends(self) -> None:
        """Held requests are dropped unprocessed and later ones handled again."""
        self.fake.release_file_sends()

    def answers(self, message_id: str) -> list[str]:
        return [r.text for r in self.reply_rows() if r.message_id == message_id]

    # -- faults ------------------------------------------------------------------------------
    def drop(self) -> None:
        """Cut every live connection (or the long poll) without a goodbye."""
        self.fake.drop()

    def go_silent(self, seconds: float) -> None:
        """The server stops answering anything (a zombie connection). Better for the contract's
        zombie scenario: only the live connection dies (a dead network path: nothing arrives on
        it, the server drops nobody for it) and a new one works, as `FakePlatformServer.go_silent(
        s, whole_server=False)` does; with a whole-server silence the adapter's next connection
        hangs until its own session deadline after `end_silence()`."""
        self.fake.go_silent(seconds)

    def end_silence(self) -> None:
        """End a `go_silent()` at once."""
        self.go_silent(0.0)

    def send_garbage(self) -> None:
        """Push malformed input at the client (bad JSON, invalid frames)."""
        self.fake.send_garbage('{"not": "a frame')

    # -- health ------------------------------------------------------------------------------
    def lateness(self) -> list[float]:
        """How late each keepalive (or long poll) arrived against its timetable, seconds."""
        raise NotImplementedError

    def keepalives(self) -> int:
        return len(self.lateness())

    def session_up_at(self, conn_id: int) -> float | None:
        """monotonic time at which the session on that connection was established."""
        raise NotImplementedError

    def sessions(self) -> list[tuple[int, float]]:
        """Established sessions, oldest first: (an id, monotonic time it was established). A new
        entry after a fault is the reconnect the benchmarks time."""
        out = []
        for conn_id in list(self.fake.conns):
            up = self.session_up_at(conn_id)
            if up is not None:
                out.append((conn_id, up))
        return out

    def disconnects(self) -> list:
        return [d for d in self.fake.disconnects if d.reason not in BENIGN_DISCONNECTS]

    def connected(self) -> bool:
        return bool(self.fake.live_conns())

    def wait_changed(self) -> Any:
        """An event set whenever the fake records something (for waits without sleeps)."""
        return self.fake._changed


def driver_class(platform: str) -> type[PlatformDriver] | None:
    """The driver of a registered platform (None when its fake module has none yet)."""
    from ..platforms import registry
    spec = registry.spec(platform)
    if spec.fake is None:
        return None
    module = importlib.import_module(spec.fake.partition(":")[0])
    return getattr(module, "Driver", None)


def platforms_with_drivers() -> list[str]:
    from ..platforms import registry
    return [name for name in registry.platforms() if driver_class(name) is not None]
