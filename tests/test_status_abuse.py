"""The status server under abuse (issue 11), against a real StatusServer on a real in-process
gateway: idle and slow connections, connection floods from one address and from many, DNS
rebinding (a foreign Host on loopback), and pre-auth junk. Clients are raw sockets so each test
controls exactly which bytes arrive and when; every wait is on the socket's EOF or an answer,
with GUARD_S as the failure guard."""
from __future__ import annotations

import json
import logging
import os
import socket
import time

import gevent
import pytest
import requests
import websocket

from hermes_green.status import MAX_CONNECTIONS, MAX_CONNECTIONS_PER_ADDRESS, host_name
from tests.support import wait_until
from tests.test_status import TOKEN, make_env, open_ws  # noqa: F401  (make_env: the fixture)

GUARD_S = 5.0
LONG_S = 60.0  # a timeout that must play no part in the test that sets it
PARTIAL_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n"  # the blank line never comes


def connect(env, source: str = "127.0.0.1") -> socket.socket:
    """A TCP connection to the status server from `source` (any 127/8 address is local)."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.settimeout(GUARD_S)
    s.bind((source, 0))
    s.connect(("127.0.0.1", env.server.port))
    return s


def read_to_eof(s: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection (raises after GUARD_S)."""
    chunks = []
    while True:
        try:
            data = s.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def raw_get(env, path: str, host: str | None, source: str = "127.0.0.1") -> tuple[int, bytes]:
    """Status code and body of one `Connection: close` request with exactly this Host line."""
    s = connect(env, source)
    head = f"GET {path} HTTP/1.1\r\n" + (f"Host: {host}\r\n" if host is not None else "")
    s.sendall(head.encode() + b"Connection: close\r\n\r\n")
    reply = read_to_eof(s)
    s.close()
    status_line, _, rest = reply.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def close_all(sockets) -> None:
    for s in sockets:
        s.close()


# --- connection floods -------------------------------------------------------------------------

def test_two_hundred_idle_connections_leave_healthz_answering(make_env):
    # Timeouts long: only the connection limits may make room. Before the fix the 128th idle
    # connection filled the pool and /healthz waited in the listen backlog for good.
    env = make_env(idle_timeout_s=LONG_S, read_timeout_s=LONG_S)
    idle = [connect(env) for _ in range(200)]
    try:
        started = time.monotonic()
        r = env.get("/healthz")  # from the same address as the idle ones; requests' timeout 5 s
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert time.monotonic() - started < GUARD_S
        assert env.get("/").status_code == 200
        held, _ = env.server.admission.held("127.0.0.1")
        assert held <= MAX_CONNECTIONS_PER_ADDRESS
        # the idle ones made room (the connection limits, not a timeout, let /healthz in)
        assert env.server.admission.evicted >= 200 - MAX_CONNECTIONS_PER_ADDRESS
    finally:
        close_all(idle)
    assert env.gateway.adapters["testchat"].ready.is_set()


def test_two_hundred_trickling_requests_from_four_addresses_leave_healthz_answering(make_env):
    # Slowloris: every connection mid-head, from several addresses, so that no per-address limit
    # is reached and the overall one is. Timeouts long: only eviction may make room.
    env = make_env(idle_timeout_s=LONG_S, read_timeout_s=LONG_S)
    slow = []
    for i in range(200):
        s = connect(env, f"127.0.0.{2 + i % 4}")
        s.sendall(PARTIAL_HEAD)
        slow.append(s)
    try:
        r = env.get("/healthz")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert len(env.server.admission) <= MAX_CONNECTIONS
        assert env.server.admission.evicted >= 200 - MAX_CONNECTIONS
    finally:
        close_all(slow)


def page_sockets(env, source: str, n: int) -> list[websocket.WebSocket]:
    """n status-page sockets from `source`: connections being served, which are never closed
    to make room."""
    pages = []
    for _ in range(n):
        ws = websocket.create_connection(env.ws_url, timeout=GUARD_S, socket=connect(env, source))
        assert json.loads(ws.recv())["status"] == "ok"
        pages.append(ws)
    return pages


def test_a_connection_over_the_per_address_cap_is_closed_at_once_and_others_are_served(make_env):
    env = make_env(max_connections_per_address=4, idle_timeout_s=LONG_S, read_timeout_s=LONG_S)
    pages = page_sockets(env, "127.0.0.2", 4)
    try:
        extra = connect(env, "127.0.0.2")
        assert read_to_eof(extra) == b""  # closed unanswered, long before any timeout
        extra.close()
        assert raw_get(env, "/healthz", "127.0.0.1", source="127.0.0.3")[0] == 200
        assert env.get("/healthz").status_code == 200
        for ws in pages:  # the four held connections were not harmed
            ws.send("refresh")
            assert json.loads(ws.recv())["status"] == "ok"
    finally:
        close_all(pages)


def test_at_the_overall_cap_a_new_connection_is_closed_at_once(make_env):
    env = make_env(max_connections=6, max_connections_per_address=3,
                   idle_timeout_s=LONG_S, read_timeout_s=LONG_S)
    pages = page_sockets(env, "127.0.0.2", 3) + page_sockets(env, "127.0.0.3", 3)
    try:
        extra = connect(env, "127.0.0.4")
        assert read_to_eof(extra) == b""
        extra.close()
        pages.pop().close()  # one page goes: room for one more
        wait_until(lambda: len(env.server.admission) == 5, what="the closed page released")
        assert raw_get(env, "/healthz", "127.0.0.1", source="127.0.0.4")[0] == 200
    finally:
        close_all(pages)


# --- timeouts ----------------------------------------------------------------------------------

def test_an_idle_connection_is_closed_after_the_idle_timeout(make_env):
    env = make_env(idle_timeout_s=0.3, read_timeout_s=LONG_S)
    s = connect(env)
    started = time.monotonic()
    assert read_to_eof(s) == b""  # the server closed it; the guard is GUARD_S
    assert time.monotonic() - started >= 0.2  # not before its time
    s.close()
    # between keep-alive requests too: answered, then closed once idle
    s = connect(env)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert read_to_eof(s).startswith(b"HTTP/1.1 200")
    s.close()


def test_a_request_that_trickles_in_is_closed_after_the_read_timeout(make_env):
    env = make_env(idle_timeout_s=LONG_S, read_timeout_s=0.5)
    s = connect(env)
    head = PARTIAL_HEAD + b"X-Pad: " + b"a" * 10_000

    def trickle():  # one byte every 20 ms: never idle, never done
        try:
            for i in range(len(head)):
                s.send(head[i:i + 1])
                gevent.sleep(0.02)
        except OSError:
            pass

    sender = gevent.spawn(trickle)
    try:
        assert read_to_eof(s) == b""
    finally:
        sender.kill()
        s.close()


@pytest.mark.parametrize("framing, body", [(b"Content-Length: 1000000000000", b"a" * 1000),
                                           (b"Transfer-Encoding: chunked", b"1\r\na\r\n" * 100)])
def test_a_request_body_is_not_read_the_answer_comes_at_once(make_env, framing, body):
    # Nothing here takes a body: the server answers and closes instead of reading it to the end
    # (before the fix it waited for the whole declared terabyte, or for the last chunk).
    env = make_env(idle_timeout_s=LONG_S, read_timeout_s=LONG_S)
    s = connect(env)
    s.sendall(b"POST /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + framing + b"\r\n\r\n" + body)
    assert read_to_eof(s).startswith(b"HTTP/1.1 405")  # answered, and closed
    s.close()


def test_a_page_socket_outlives_the_timeouts(make_env):
    env = make_env(idle_timeout_s=0.1, read_timeout_s=0.1, push_interval_s=0.05)
    ws = open_ws(env)
    started = time.monotonic()
    while time.monotonic() - started < 0.5:  # five times either timeout, pushes keep coming
        assert ws.recv()
    ws.send("refresh")
    assert ws.recv()
    ws.close()


# --- DNS rebinding -----------------------------------------------------------------------------

@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.evil.example",
                                  "localhost.evil.example:{port}", "127.0.0.1:{port}@evil.example",
                                  "127.0.0.1, evil.example", "[::1]evil", "127.0.0.1:x"])
def test_a_foreign_host_is_refused_on_loopback(make_env, host):
    env = make_env()
    host = host.format(port=env.server.port)
    for path in ("/", "/healthz", "/metrics", "/ws", "/nope"):
        status, body = raw_get(env, path, host)
        assert (status, body) == (421, b""), path
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(env.ws_url, timeout=GUARD_S, host=host)
    assert refused.value.status_code == 421


def test_loopback_hosts_are_served(make_env):
    env = make_env()
    port = env.server.port
    for host in (f"127.0.0.1:{port}", "127.0.0.1", f"localhost:{port}", "LocalHost",
                 f"[::1]:{port}", "[::1]", None):  # None: no Host line (HTTP/1.1 tools send one)
        assert raw_get(env, "/healthz", host)[0] == 200, host
    assert requests.get(env.base + "/", timeout=GUARD_S).status_code == 200
    open_ws(env).close()


def test_with_a_token_off_loopback_the_token_rule_decides_not_the_host(make_env):
    env = make_env(token=TOKEN, host="0.0.0.0")
    url = f"http://127.0.0.1:{env.server.port}/healthz"
    public = {"Host": "status.example.com"}
    assert requests.get(url, headers=public, timeout=GUARD_S).status_code == 401
    r = requests.get(url, headers={**public, "Authorization": f"Bearer {TOKEN}"},
                     timeout=GUARD_S)
    assert r.status_code == 200


@pytest.mark.parametrize("header, name", [
    ("127.0.0.1:8765", "127.0.0.1"), ("LOCALHOST", "localhost"), ("[::1]:80", "::1"),
    ("[::1]", "::1"), ("evil.example", "evil.example"), ("a:b", None), ("[::1", None),
    ("x@127.0.0.1", None), ("127.0.0.1,evil", None), ("", None), (":80", None)])
def test_host_name_parsing(header, name):
    assert host_name(header) == name


# --- pre-auth noise ----------------------------------------------------------------------------

JUNK = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(200),  # a TLS ClientHello
    b"\x00\xff\xfe\xfd junk\r\n\r\n",
    b"HELLO\r\n\r\n",
    b"GET /?token=s3cr3t-in-junk HTTP/9.9\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: many\r\n\r\n",
    b"GET / HTTP/1.1\r\nContent-Length: -5\r\n\r\n",
]


def test_junk_bytes_are_one_debug_line_each_never_an_error(make_env, caplog, capfd):
    caplog.set_level(logging.DEBUG)
    env = make_env(idle_timeout_s=LONG_S, read_timeout_s=0.5)  # the ClientHello has no newline
    caplog.clear()
    for junk in JUNK:
        s = connect(env)
        s.sendall(junk)
        read_to_eof(s)
        s.close()
    records = list(caplog.records)
    assert env.get("/healthz").status_code == 200
    loud = [(r.name, r.levelname, r.getMessage()) for r in records if r.levelno >= logging.INFO
            and not r.name.startswith("hermes_green.platforms")]
    assert loud == []
    ours = [r.getMessage() for r in records if r.name == "hermes_green.status"]
    assert len(ours) == len(JUNK), ours  # one line per connection
    assert all(m.startswith("status connection closed") for m in ours), ours
    assert not any("s3cr3t-in-junk" in r.getMessage() for r in records)
    assert env.server.errors.latest() == []  # nothing on the page's recent-errors list
    assert "Traceback" not in capfd.readouterr().err
