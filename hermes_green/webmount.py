"""Mount points: how a platform whose clients come to us (a web page) is served by the gateway's
own HTTP server, the status server, without either of them importing the other.

A served adapter (platforms/transports/served.py) publishes a `WebMount` on the `MOUNTS` board
while its connection lives: a path, a WSGI app, which of its paths are WebSockets, an optional
token of its own and its socket limits. An HTTP host (status.py's StatusServer) subscribes to the
board, claims the mounts of its own gateway's adapters and calls `owner.attach(host)`; it serves
them under its own rules (Host check against DNS rebinding, the token, connection limits,
timeouts, same-origin WebSockets) and calls `owner.detach(host)` when it stops. So the adapter is
READY exactly while some host serves its page, and a crashed adapter's next connection is
offered to the host again without anyone polling.

Every board operation is a few dict operations on the hub; offers run the host's claim at once.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

# Paths the status server answers itself: no mount may cover them.
RESERVED_PATHS = frozenset({"/", "/healthz", "/metrics", "/ws"})
MAX_MESSAGE_BYTES = 64 * 1024  # default size limit of one WebSocket message from a page
MAX_SOCKETS = 64  # default limit of live sockets on one mount

# Headers for an HTML page that talks to its own origin only (the URL may carry ?token=).
PAGE_HEADERS = (
    ("Content-Type", "text/html; charset=utf-8"),
    ("Cache-Control", "no-store"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; "
                                "script-src 'unsafe-inline'; connect-src 'self'; "
                                "img-src data:; base-uri 'none'; form-action 'none'"),
)


class MessageTooLarge(Exception):
    """A page sent a WebSocket message over its mount's limit. The host's socket raises it
    from the frame header, before the payload is read; next step: close that socket (1009)."""


@dataclass(frozen=True)
class WebMount:
    """What a served platform asks the host to serve. `path` and everything under `path + "/"`
    go to `app` (plain WSGI; an upgraded WebSocket arrives as environ["wsgi.websocket"]).
    `token`: requests under the mount need this token (Bearer header or ?token=) instead of the
    host's own; None: the host's token rule applies (required off loopback)."""
    path: str
    app: Callable[[dict, Callable], Any]
    socket_paths: frozenset[str]
    token: str | None = None
    max_message_bytes: int = MAX_MESSAGE_BYTES
    max_sockets: int = MAX_SOCKETS

    def covers(self, path: str) -> bool:
        return path == self.path or path.startswith(self.path + "/")


class MountOwner(Protocol):
    """The adapter side: told when a host serves its mount and when it stops doing so."""

    def attach(self, host: Any) -> None: ...

    def detach(self, host: Any) -> None: ...


class MountHost(Protocol):
    """The server side: `offer` may claim the mount (and then calls owner.attach)."""

    def offer(self, owner: MountOwner, mount: WebMount) -> None: ...

    def withdraw(self, owner: MountOwner) -> None: ...


def mount_path_problem(path: str) -> str | None:
    """Why `path` cannot be a mount path, or None when it can."""
    if not path.startswith("/") or path.endswith("/") or "//" in path:
        return "must start with '/', not end with '/', and have no empty segment"
    if path in RESERVED_PATHS:
        return f"{path} is the status server's own path"
    if any(not (c.isascii() and (c.isalnum() or c in "/-_.")) for c in path):
        return "may hold only letters, digits, '/', '-', '_' and '.'"
    if any(seg in (".", "..") for seg in path.split("/")):
        return "may not have '.' or '..' segments"
    return None


class MountBoard:
    """Mounts published by adapters, offered to every subscribed host."""

    def __init__(self) -> None:
        self._mounts: dict[MountOwner, WebMount] = {}
        self._hosts: list[MountHost] = []

    def publish(self, owner: MountOwner, mount: WebMount) -> None:
        self._mounts[owner] = mount
        for host in list(self._hosts):
            host.offer(owner, mount)

    def withdraw(self, owner: MountOwner) -> None:
        if self._mounts.pop(owner, None) is not None:
            for host in list(self._hosts):
                host.withdraw(owner)

    def subscribe(self, host: MountHost) -> None:
        if host not in self._hosts:
            self._hosts.append(host)
        for owner, mount in list(self._mounts.items()):
            host.offer(owner, mount)

    def unsubscribe(self, host: MountHost) -> None:
        if host in self._hosts:
            self._hosts.remove(host)

    def published(self) -> dict[MountOwner, WebMount]:
        return dict(self._mounts)


MOUNTS = MountBoard()
