"""The WebSocket transport's handover: a successor connection is opened beside the current one
and takes over before the old one closes, so no frame falls into a gap (the kit's generic
mechanism; Slack's `refresh_requested` rotation is built on it).

A tiny protocol on the harness: the server greets every connection with {"type": "hello"}
(unless told to hold it back), pushes {"type": "msg", "id"} to a chosen connection, and records
the client's {"type": "ack", "id"} together with the connection it came on.
"""
from __future__ import annotations

import json
from types import SimpleNamespace

import gevent
import pytest

from hermes_green.config import BackoffConfig
from hermes_green.models import InboundMessage
from hermes_green.platforms.base import State
from hermes_green.platforms.transports.websocket import Keepalive, WebSocketAdapter
from hermes_green.testing.harness import Conn, FakePlatformServer


class HelloServer(FakePlatformServer):
    def __init__(self) -> None:
        super().__init__()
        self.hold_hello: set[int] = set()  # connection ids that get no hello
        self.hello_at: dict[int, float] = {}
        self.acks: list[tuple[int, str]] = []  # (conn id, message id)

    def on_connect(self, conn: Conn, request: dict) -> bool:
        if conn.id not in self.hold_hello:
            self.greet(conn)
        return True

    def greet(self, conn: Conn) -> None:
        conn.send({"type": "hello"})
        self.hello_at[conn.id] = gevent.get_hub().loop.now()

    def on_frame(self, conn: Conn, data) -> None:
        if data.get("type") == "ack":
            self.acks.append((conn.id, data["id"]))
            self.changed()

    def push(self, conn_id: int, frame: dict) -> None:
        self.conns[conn_id].send(frame)


class RotatingAdapter(WebSocketAdapter):
    """hello -> ready (on a successor: the handover); msg -> deliver, then ack; rotate -> open a
    successor, as a server's advance notice of the end asks."""
    name = "rotating"
    keepalive = Keepalive.PING
    heartbeat_interval_s = 0.1
    session_timeout_s = 0.5
    handover_grace_s = 0.3
    __test__ = False

    def __init__(self, config, on_message, **kw) -> None:
        super().__init__(config, on_message, **kw)
        self.states: list[State] = []

    def set_state(self, state: State) -> None:
        self.states.append(state)
        super().set_state(state)

    def prepare(self) -> str:
        return self.config.url

    def on_frame(self, data) -> None:
        frame = json.loads(data)
        kind = frame.get("type")
        if kind == "hello":
            self.mark_ready()
        elif kind == "rotate":
            self.open_successor("rotate")
        elif kind == "msg":
            self.deliver(InboundMessage(platform=self.name, message_id=frame["id"], chat_id="c",
                                        user_id="u", text="hi"))
            self.send_frame(json.dumps({"type": "ack", "id": frame["id"]}))


@pytest.fixture
def setup():
    server = HelloServer().start()
    seen: list[str] = []
    adapter = RotatingAdapter(SimpleNamespace(url=server.ws_url, allow_from=[],
                                              backoff=BackoffConfig(initial_s=0.05, max_s=0.2)),
                              lambda msg: seen.append(msg.message_id) or True)
    runner = gevent.spawn(adapter.run)
    assert adapter.ready.wait(3)
    yield SimpleNamespace(server=server, adapter=adapter, seen=seen, runner=runner)
    adapter.stop()
    runner.join(5)
    assert runner.dead
    server.stop()


def test_a_successor_takes_over_while_the_old_connection_is_still_open(setup):
    s = setup
    s.server.push(1, {"type": "rotate"})
    s.server.wait_for(lambda: s.adapter.conn is not None and s.server.conns.get(2)
                      and s.adapter.stats.reconnects["handover"] == 1, 3)
    assert not s.server.conns[1].closed.is_set()  # the old one is still up at the takeover
    # A frame still arriving on the old connection is handled and answered on it...
    s.server.push(1, {"type": "msg", "id": "late-on-old"})
    s.server.push(2, {"type": "msg", "id": "on-new"})
    s.server.wait_for(lambda: len(s.server.acks) == 2, 3)
    assert sorted(s.server.acks) == [(1, "late-on-old"), (2, "on-new")]
    # ...and after the grace period the client closes it; the new one stays.
    s.server.wait_for(lambda: s.server.conns[1].closed.is_set(), 3)
    assert [d.reason for d in s.server.disconnects] == ["client_closed"]
    assert not s.server.conns[2].closed.is_set() and sorted(s.seen) == ["late-on-old", "on-new"]
    # No reconnect through the run loop: the bot never left READY.
    assert s.adapter.states == [State.CONNECTING, State.READY]
    assert dict(s.adapter.stats.reconnects) == {"handover": 1}
    assert s.adapter.heartbeat_running and s.adapter.stats.connects == 2


def test_a_successor_that_is_never_established_is_dropped_and_the_current_one_goes_on(setup):
    s = setup
    s.server.hold_hello.add(2)
    s.server.push(1, {"type": "rotate"})
    s.server.wait_for(lambda: 2 in s.server.conns and s.server.conns[2].closed.is_set(), 3)
    s.server.push(1, {"type": "msg", "id": "still-served"})
    s.server.wait_for(lambda: s.server.acks, 3)
    assert s.server.acks == [(1, "still-served")]
    assert s.adapter.stats.reconnects == {} and s.adapter.states == [State.CONNECTING,
                                                                      State.READY]


def test_when_the_old_connection_ends_first_the_successor_still_takes_over(setup):
    s = setup
    s.server.hold_hello.add(2)
    s.server.push(1, {"type": "rotate"})
    s.server.wait_for(lambda: 2 in s.server.conns, 3)
    s.server.conns[1].drop()  # the server ends the old one before the new one says hello
    gevent.sleep(0.05)  # the input: the successor is greeted only after the old one is gone
    s.server.greet(s.server.conns[2])
    s.server.wait_for(lambda: s.adapter.stats.reconnects["handover"] == 1, 3)
    s.server.push(2, {"type": "msg", "id": "after"})
    s.server.wait_for(lambda: s.server.acks, 3)
    assert s.server.acks == [(2, "after")] and len(s.server.conns) == 2
    assert dict(s.adapter.stats.reconnects) == {"handover": 1}


def test_stop_during_a_handover_returns_promptly(setup):
    s = setup
    s.server.hold_hello.add(2)
    s.server.push(1, {"type": "rotate"})
    s.server.wait_for(lambda: 2 in s.server.conns, 3)
    s.adapter.stop()
    s.runner.join(2)
    assert s.runner.dead and s.runner.value is None
    s.server.wait_for(lambda: not s.server.live_conns(), 3)


def test_a_late_notice_on_the_replaced_connection_opens_no_second_successor(setup):
    s = setup
    s.server.push(1, {"type": "rotate"})
    s.server.wait_for(lambda: s.adapter.stats.reconnects["handover"] == 1, 3)
    s.server.push(1, {"type": "rotate"})  # e.g. a `warning` then a `refresh_requested`
    s.server.push(1, {"type": "msg", "id": "marker"})  # handled after the second notice
    s.server.wait_for(lambda: s.server.acks, 3)
    gevent.sleep(0.3)  # a window in which a wrongly started successor would have connected
    assert len(s.server.conns) == 2 and s.adapter.conn is not None
    assert dict(s.adapter.stats.reconnects) == {"handover": 1}
