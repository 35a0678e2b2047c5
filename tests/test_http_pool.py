"""The REST client every adapter sends replies with (kit.http_session -> hermes_green/rest.py), on a
real loopback HTTP server: keep-alive connections for as many senders as the outbox runs at
once, requests' calling convention (json, forms, multipart, params, streamed bodies), timeouts
and failures as one exception type whose text never holds the URL, redirects that drop the
Authorization header when they leave the host, and proxies from the environment."""
import gzip
import json
import socket

import gevent
import gevent.event
import pytest
from gevent import pywsgi

from hermes_green.gateway import OUTBOX_SEND_CONCURRENCY
from hermes_green import rest
from hermes_green.platforms.kit import http_session
from hermes_green.testing.harness import parse_multipart


class _Server:
    """A loopback HTTP server recording each request (method, path, query, headers, body) and
    the TCP connections it accepted; `app` may be replaced per test."""

    def __init__(self) -> None:
        self.connections = 0
        self.requests: list[dict] = []
        self.release = gevent.event.Event()
        self.release.set()
        self.answer = lambda req: ("200 OK", [("Content-Type", "application/json")],
                                   b'{"ok": true}')
        server = self

        class Handler(pywsgi.WSGIHandler):
            def __init__(self, sock, *args, **kw):
                server.connections += 1
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                super().__init__(sock, *args, **kw)

        def app(environ, start_response):
            req = {"method": environ["REQUEST_METHOD"], "path": environ["PATH_INFO"],
                   "query": environ.get("QUERY_STRING", ""),
                   "headers": {k[5:].replace("_", "-").title(): v for k, v in environ.items()
                               if k.startswith("HTTP_")},
                   "body": environ["wsgi.input"].read()}
            if environ.get("CONTENT_TYPE"):
                req["headers"]["Content-Type"] = environ["CONTENT_TYPE"]
            self.requests.append(req)
            self.release.wait(10)
            status, headers, body = self.answer(req)
            start_response(status, headers)
            return [body] if isinstance(body, bytes) else body

        self.wsgi = pywsgi.WSGIServer(("127.0.0.1", 0), app, handler_class=Handler, log=None)

    def __enter__(self) -> "_Server":
        self.wsgi.start()
        self.base = f"http://127.0.0.1:{self.wsgi.server_port}"
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.wsgi.stop(timeout=1)


@pytest.fixture
def server():
    with _Server() as s:
        yield s


def _round(session, url: str, server: _Server, n: int) -> None:
    server.release.clear()
    calls = [gevent.spawn(session.post, url, json={"i": i}, timeout=10) for i in range(n)]
    gevent.wait(timeout=0.5)  # every call is now waiting on its answer
    server.release.set()
    for call in calls:
        assert call.get(timeout=10).status_code == 200


def test_a_second_round_of_concurrent_replies_reuses_every_connection(server):
    n = OUTBOX_SEND_CONCURRENCY
    session = http_session()
    _round(session, server.base + "/send", server, n)
    assert server.connections == n
    _round(session, server.base + "/send", server, n)
    assert server.connections == n  # requests' default pool kept 10: 6 new ones here


def test_json_form_params_and_session_headers_are_sent_as_requests_would(server):
    session = http_session()
    session.headers["X-Union-Appid"] = "42"
    r = session.post(server.base + "/v2/send?a=1", json={"content": "héllo"},
                     params={"b": "x y", "skip": None}, headers={"Authorization": "Bot t"},
                     timeout=5)
    assert r.status_code == 200 and r.ok and r.json() == {"ok": True}
    assert r.headers["content-type"] == "application/json"  # any case
    req = server.requests[-1]
    assert req["method"] == "POST" and req["path"] == "/v2/send" and req["query"] == "a=1&b=x+y"
    assert req["headers"]["X-Union-Appid"] == "42" and req["headers"]["Authorization"] == "Bot t"
    assert req["headers"]["Content-Type"] == "application/json"
    assert json.loads(req["body"]) == {"content": "héllo"}
    session.post(server.base + "/form", data={"chat_id": 5, "text": "a&b", "none": None})
    req = server.requests[-1]
    assert req["headers"]["Content-Type"] == "application/x-www-form-urlencoded"
    assert req["body"] == b"chat_id=5&text=a%26b"


def test_files_go_as_multipart_with_their_fields(server):
    session = http_session()
    session.post(server.base + "/upload", data={"payload_json": '{"a": 1}'},
                 files={"files[0]": ('pic "1".png', b"\x89PNG\r\n\x00", "image/png")})
    fields, files = parse_multipart(server.requests[-1])
    assert fields == {"payload_json": '{"a": 1}'}
    assert files["files[0]"].filename == "pic %221%22.png"
    assert files["files[0]"].content_type == "image/png"
    assert files["files[0]"].data == b"\x89PNG\r\n\x00"


def test_a_streamed_body_is_read_in_chunks_and_a_gzip_body_decoded(server):
    blob = bytes(range(256)) * 2048  # 512 KiB
    server.answer = lambda req: ("200 OK", [("Content-Type", "application/octet-stream")],
                                 blob if req["path"] == "/blob" else gzip.compress(b'{"z": 1}'))
    session = http_session()
    r = session.get(server.base + "/blob", stream=True, timeout=(5, 5))
    chunks = list(r.iter_content(64 * 1024))
    assert b"".join(chunks) == blob and len(chunks) >= 8
    server.answer = lambda req: ("200 OK", [("Content-Encoding", "gzip")],
                                 gzip.compress(b'{"z": 1}'))
    assert session.get(server.base + "/gz").json() == {"z": 1}


def test_an_error_status_is_an_answer_and_a_bad_body_a_value_error(server):
    server.answer = lambda req: ("429 Too Many Requests", [("Retry-After", "3")], b"slow down")
    r = http_session().get(server.base + "/x")
    assert r.status_code == 429 and not r.ok and r.headers.get("retry-after") == "3"
    assert r.text == "slow down"
    with pytest.raises(ValueError):
        r.json()


def test_failures_are_one_exception_type_whose_text_never_holds_the_url(server):
    token_url = "/bot123456:SECRET-token/getUpdates"
    session = http_session()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    with pytest.raises(rest.ConnectionError) as refused:
        session.get(f"http://127.0.0.1:{closed}{token_url}", timeout=2)
    server.release.clear()  # the server holds its answer
    with pytest.raises(rest.Timeout) as slow:
        session.get(server.base + token_url, timeout=(0.2, 0.2))
    server.release.set()
    for e in (refused.value, slow.value):
        assert isinstance(e, rest.RequestException)
        assert "SECRET" not in str(e) and "getUpdates" not in str(e) and "127.0.0.1" in str(e)


def test_a_read_timeout_applies_to_each_part_of_a_streamed_body(server):
    gate = gevent.event.Event()

    def slow_body():
        yield b"first"
        gate.wait(10)
        yield b"second"

    server.answer = lambda req: ("200 OK", [("Content-Type", "text/plain")], slow_body())
    r = http_session().get(server.base + "/slow", stream=True, timeout=(2, 0.3))
    with pytest.raises(rest.Timeout):
        list(r.iter_content(1024))
    gate.set()


def test_redirects_are_followed_and_authorization_stays_on_its_host(server):
    with _Server() as other:
        def answer(req):
            if req["path"] == "/same":
                return "302 Found", [("Location", "/final")], b""
            if req["path"] == "/away":
                return "302 Found", [("Location", other.base + "/elsewhere")], b""
            return "200 OK", [("Content-Type", "text/plain")], b"here"
        server.answer = answer
        session = http_session()
        r = session.get(server.base + "/same", headers={"Authorization": "Bearer xoxb-1"})
        assert r.text == "here" and r.url.endswith("/final")
        assert server.requests[-1]["headers"]["Authorization"] == "Bearer xoxb-1"
        other.answer = lambda req: ("200 OK", [], b"there")
        r = session.get(server.base + "/away", headers={"Authorization": "Bearer xoxb-1"})
        assert r.text == "there"
        assert "Authorization" not in other.requests[-1]["headers"]
        # a POST is not redirected (requests would turn it into a GET: a reply must not vanish)
        r = session.post(server.base + "/same", json={"a": 1}, allow_redirects=True)
        assert r.status_code == 302


def test_a_proxy_from_the_environment_carries_plain_http(server, monkeypatch):
    """HTTP_PROXY names the server itself: it receives the absolute URL, as a proxy does."""
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY", "http_proxy",
                 "https_proxy", "all_proxy", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", server.base)
    session = http_session()
    session.get("http://chat.example.invalid/api/ping", timeout=5)
    assert server.requests[-1]["headers"]["Host"] == "chat.example.invalid"
    monkeypatch.setenv("no_proxy", "chat.example.invalid")
    with pytest.raises(rest.ConnectionError):  # not through the proxy: the name does not resolve
        http_session().get("http://chat.example.invalid/api/ping", timeout=5)


def test_https_verifies_the_certificate_against_the_bundle_the_environment_names(tmp_path,
                                                                               monkeypatch):
    """TLS as requests does it: a server whose certificate the named bundle (REQUESTS_CA_BUNDLE)
    vouches for is reached; without that bundle (certifi's) the same server is refused, and so
    is a certificate for another name."""
    import subprocess

    def make_cert(name: str) -> tuple[str, str]:
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days",
                        "2", "-subj", f"/CN={name}", "-addext", f"subjectAltName=DNS:{name}",
                        "-keyout", str(key), "-out", str(cert)], check=True,
                       capture_output=True)
        return str(cert), str(key)

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b'{"secure": true}']

    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(name, raising=False)
    good_cert, good_key = make_cert("localhost")
    other_cert, other_key = make_cert("impostor.example")
    good = pywsgi.WSGIServer(("127.0.0.1", 0), app, certfile=good_cert, keyfile=good_key,
                             log=None, error_log=None)
    other = pywsgi.WSGIServer(("127.0.0.1", 0), app, certfile=other_cert, keyfile=other_key,
                              log=None, error_log=None)
    good.start()
    other.start()
    try:
        with pytest.raises(rest.ConnectionError, match="SSL"):  # certifi does not know it
            http_session().get(f"https://localhost:{good.server_port}/", timeout=5)
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", good_cert)
        r = http_session().get(f"https://localhost:{good.server_port}/", timeout=5)
        assert r.status_code == 200 and r.json() == {"secure": True}
        monkeypatch.setenv("REQUESTS_CA_BUNDLE", other_cert)  # trusted, but not for localhost
        with pytest.raises(rest.ConnectionError):
            http_session().get(f"https://localhost:{other.server_port}/", timeout=5)
    finally:
        good.stop()
        other.stop()
