"""The served transport: a platform whose clients connect to us (a web page) instead of us
connecting to a platform's server. The gateway's own HTTP server (the status server) serves it
through a mount point (hermes_green/webmount.py).

The connection's life, in the kit's terms (`PlatformAdapter.run()` loops over `serve_once()`):
there is no remote server to dial, so "connected" means "a host serves our pages":

    serve_once()   CONNECTING; publish `web_mount()` on the mount board; a host that claims it
                   calls attach() -> READY (counted as a connect). It ends when the host lets go
                   (detach(): the status server stopped -> ConnectionLost("unmounted"), and the
                   base reconnects, i.e. publishes again and waits for a host) or on stop().
                   Without a status server the bot stays CONNECTING: nothing can reach it, and
                   /healthz says so.
    on_unmounted() the mount is gone: close the pages (their sockets belong to the host that
                   served them, which is stopping, or to this connection, which ended).

A page that comes and goes is one chat's user going offline and back, not a reconnect of the
bot: that is the platform module's business (its replies wait in the outbox meanwhile).
"""
from __future__ import annotations

from typing import Any

import gevent.event

from ...webmount import MOUNTS, WebMount
from ..base import ConnectionLost, PlatformAdapter, PlatformError, State


class ServedAdapter(PlatformAdapter):
    """A platform served by the gateway's HTTP server; the module supplies `web_mount()`."""

    def __init__(self, config, on_message, **kw) -> None:
        super().__init__(config, on_message, **kw)
        self._lost: gevent.event.AsyncResult | None = None
        self.host: Any = None

    # -- hooks ----------------------------------------------------------------------------------
    def web_mount(self) -> WebMount:
        """The path, WSGI app and limits to publish for this connection."""
        raise NotImplementedError

    def on_unmounted(self) -> None:
        """The host no longer serves us (or we stop): end every page's session."""

    @classmethod
    def check(cls, config, *, full: bool = False) -> str:
        mount = cls(config, lambda msg: False).web_mount()
        return (f"served at {mount.path} by the status server (no remote server to "
                f"authenticate; {'own token' if mount.token else 'the status token rule'})")

    # -- the host's side (webmount.MountOwner) ---------------------------------------------------
    def attach(self, host: Any) -> None:
        if self._lost is None or self._lost.ready():
            return
        self.host = host
        self.stats.connects += 1
        self.mark_ready()

    def detach(self, host: Any) -> None:
        if self.host is host:
            self.end_connection(ConnectionLost("unmounted", "the status server stopped"))

    # -- the connection's life -------------------------------------------------------------------
    def end_connection(self, outcome: PlatformError) -> None:
        lost = self._lost
        if lost is not None and not lost.ready():
            lost.set(outcome)

    def serve_once(self) -> None:
        self.set_state(State.CONNECTING)
        lost = self._lost = gevent.event.AsyncResult()
        try:
            if self.stopping:
                return
            MOUNTS.publish(self, self.web_mount())
            raise lost.get()
        finally:
            MOUNTS.withdraw(self)
            self._lost, self.host = None, None
            if self.stats.state is not State.FATAL:
                self.set_state(State.STOPPED if self.stopping else State.CONNECTING)
            try:
                self.on_unmounted()
            except Exception:
                self.log.exception("on_unmounted failed platform=%s bot=%s", self.name,
                                   self.bot_id)
