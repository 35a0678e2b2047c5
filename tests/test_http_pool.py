"""The REST client every adapter sends replies with (kit.http_session): keep-alive connections
for as many senders as the outbox runs at once, and requests' per-call environment lookups
only where the environment has something for them."""
import socket

import gevent
import gevent.event
from gevent import pywsgi

from hermes_green.gateway import OUTBOX_SEND_CONCURRENCY
from hermes_green.platforms.kit import http_session


class _CountingServer:
    """A loopback HTTP server that counts the TCP connections it accepted; each answer waits
    until released, so every sender holds its connection at the same time."""

    def __init__(self) -> None:
        self.connections = 0
        self.release = gevent.event.Event()
        server = self

        class Handler(pywsgi.WSGIHandler):
            def __init__(self, sock, *args, **kw):
                server.connections += 1
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                super().__init__(sock, *args, **kw)

        def app(environ, start_response):
            environ["wsgi.input"].read()
            self.release.wait(10)
            start_response("200 OK", [("Content-Type", "application/json")])
            return [b'{"ok": true}']

        self.wsgi = pywsgi.WSGIServer(("127.0.0.1", 0), app, handler_class=Handler, log=None)

    def __enter__(self) -> "_CountingServer":
        self.wsgi.start()
        self.url = f"http://127.0.0.1:{self.wsgi.server_port}/send"
        return self

    def __exit__(self, *exc) -> None:
        self.wsgi.stop(timeout=1)


def _round(session, url: str, server: _CountingServer, n: int) -> None:
    server.release.clear()
    calls = [gevent.spawn(session.post, url, json={"i": i}, timeout=10) for i in range(n)]
    gevent.wait(timeout=0.5)  # every call is now waiting on its answer
    server.release.set()
    for call in calls:
        assert call.get(timeout=10).status_code == 200


def test_a_second_round_of_concurrent_replies_reuses_every_connection():
    n = OUTBOX_SEND_CONCURRENCY
    with _CountingServer() as server:
        session = http_session()
        _round(session, server.url, server, n)
        assert server.connections == n
        _round(session, server.url, server, n)
        assert server.connections == n  # requests' default pool kept 10: 6 new ones here


def test_the_environment_is_read_per_call_only_when_it_names_a_proxy_or_netrc(monkeypatch,
                                                                             tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
                 "https_proxy", "all_proxy", "no_proxy", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
                 "NETRC"):
        monkeypatch.delenv(name, raising=False)
    plain = http_session()
    assert plain.trust_env is False and plain.verify is True
    monkeypatch.setenv("CURL_CA_BUNDLE", "/etc/ssl/curl.pem")
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", "/etc/ssl/corp.pem")
    bundled = http_session()  # the bundle requests would have read per call, read once
    assert bundled.trust_env is False and bundled.verify == "/etc/ssl/corp.pem"
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.example:3128")
    assert http_session().trust_env is True
    monkeypatch.delenv("HTTPS_PROXY")
    (tmp_path / ".netrc").write_text("machine example.com login a password b\n")
    assert http_session().trust_env is True
