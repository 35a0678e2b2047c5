"""The status server under abuse (issue 11), against a real StatusServer on a real in-process
gateway: idle and slow connections, connection floods from one address and from many, DNS
rebinding (a foreign Host on loopback), and pre-auth junk. Clients are raw sockets so each test
controls exactly which bytes arrive and when; every wait is on the socket's EOF or an answer,
with GUARD_S as the failure guard."""
from __future__ import annotations

import socket

import pytest
import requests
import websocket

from hermes_green.status import host_name
from tests.test_status import TOKEN, make_env, open_ws  # noqa: F401  (make_env: the fixture)

GUARD_S = 5.0


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
