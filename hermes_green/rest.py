"""The REST client of every adapter, of media downloads and of transcription: requests' calling
convention (the part they use) over geventhttpclient's keep-alive connection pools and C parser.
Neutral: imports nothing of ours, so platforms and the agent may both use it.

Why not requests: in a running gateway it cost about 450 us of hub CPU per call (QQ answers
through one REST call each: `bench/throughput.py --platform qqbot` went from 963 to 507 us of
gateway CPU per message with this client), and 7 MB at idle with urllib3. geventhttpclient is
gevent's own HTTP client (locust's FastHttpUser) and 1 MB.

What it keeps from requests, because adapters rely on it:
- `Session.request(method, url, params=, json=, data=, files=, headers=, timeout=, stream=,
  allow_redirects=)` and get/post/put/patch/delete; `session.headers` go with every call.
- `timeout`: a number or (connect, read), as requests: the connection within connect, then
  every read from the socket (the answer's head included) within read. The pools are kept per
  (host, timeouts), because the socket carries them.
- `data`: a dict is form-encoded, str/bytes go as they are; with `files` (name -> (filename,
  bytes, mime)) the body is multipart/form-data.
- redirects of GET/HEAD (and 303 of anything) are followed, at most MAX_REDIRECTS; the
  Authorization header is dropped when a redirect leaves the host, as requests does.
- proxies from the environment (HTTPS_PROXY, HTTP_PROXY, NO_PROXY), a CA bundle named by
  REQUESTS_CA_BUNDLE, CURL_CA_BUNDLE or SSL_CERT_FILE, else certifi's.
- unlike requests, a pool's size bounds the calls in flight per host: past it a call waits for
  a connection to come free (requests opened throw-away extra ones). So each user sizes its
  pool for what it runs at once: POOL_SIZE for an adapter, the LLM client one per turn.
- one exception type, `RequestException` (`Timeout`, `ConnectionError` below it), whose text
  names the host and the failure, never the URL: a Telegram token is part of the path.
"""
from __future__ import annotations

import json as jsonlib
import os
import urllib.parse
import urllib.request
import uuid
import zlib
from typing import Any, Iterator

import gevent
from geventhttpclient import HTTPClient
from geventhttpclient.url import URL

# Keep-alive connections per host: above the outbox's concurrent senders per bot
# (gateway.OUTBOX_SEND_CONCURRENCY, 16) plus progress updates and token fetches.
POOL_SIZE = 32
MAX_REDIRECTS = 10
DEFAULT_TIMEOUT_S = 60.0
USER_AGENT = "hermes-green"
_REDIRECTS = (301, 302, 303, 307, 308)
# A redirect's body is read and dropped (to keep the connection) only up to this many bytes.
_REDIRECT_BODY_MAX = 64 * 1024


class RequestException(Exception):
    """The call got no usable HTTP answer: connection refused or lost, a timeout, a malformed
    response, too many redirects. An HTTP error status is an answer, not an exception."""


class ConnectionError(RequestException):  # noqa: A001 (requests' name, on purpose)
    """No connection, or it broke before the answer was complete."""


class Timeout(RequestException):
    """The answer (or the next part of a streamed body) did not come in time."""


class Response:
    """One answer. Without `stream` its body is already read; with it, read it through
    `iter_content()` (or `content`) and `close()` when done early."""

    def __init__(self, raw, url: str, host: str, read_s: float) -> None:
        self._raw = raw
        self.url = url
        self.status_code: int = raw.status_code
        self.reason: str | None = raw.status_message
        self.headers = raw.info()  # case-insensitive (geventhttpclient.s Headers)
        self._host = host
        self._read_s = read_s
        self._content: bytes | None = None
        encoding = (self.headers.get("content-encoding") or "").strip().lower()
        self._decoder = (zlib.decompressobj(16 + zlib.MAX_WBITS) if encoding == "gzip" else
                         zlib.decompressobj() if encoding == "deflate" else None)

    @property
    def ok(self) -> bool:
        return self.status_code < 400

    def _read(self, size: int | None) -> bytes:
        data = self._timed(lambda: self._raw.read(size))
        if self._decoder is not None:
            data = self._decoder.decompress(data) + (b"" if data else self._decoder.flush())
        return data

    def iter_content(self, chunk_size: int = 64 * 1024) -> Iterator[bytes]:
        if self._content is not None:
            for i in range(0, len(self._content), chunk_size):
                yield self._content[i:i + chunk_size]
            return
        while True:
            chunk = self._read(chunk_size)
            if not chunk:
                self._content = b""
                return
            yield chunk

    def iter_lines(self) -> Iterator[bytes]:
        """The body as it arrives, a line at a time (bytes, line end kept) as soon as the line
        is complete: server-sent events. `iter_content` waits for whole chunks instead."""
        if self._decoder is not None or self._content is not None:
            yield from self.iter_content(8192)  # a compressed stream: pieces, not lines
            return
        while True:
            line = self._timed(lambda: self._raw.readline(b"\n"))
            if not line:
                rest = self._timed(lambda: self._raw.read())  # a last line without its end
                self._content = b""
                if rest:
                    yield rest
                return
            yield line

    def _timed(self, read):
        """A read; the socket's own timeout bounds each recv (the pool set it)."""
        try:
            return read()
        except TimeoutError:
            self.close()
            raise Timeout(f"{self._host}: no data within {self._read_s:g}s") from None
        except Exception as e:  # socket errors, the parser's errors on a broken body
            self.close()
            raise ConnectionError(f"{self._host}: body lost ({type(e).__name__})") from None

    @property
    def content(self) -> bytes:
        if self._content is None:
            self._content = self._read(None)
            if self._decoder is not None:
                self._content += self._decoder.flush()
        return self._content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", errors="replace")

    def json(self) -> Any:
        """The body as JSON; ValueError when it is not (as requests' JSONDecodeError)."""
        return jsonlib.loads(self.content)

    def close(self) -> None:
        """Give the connection back (or close it when the body was not read to its end)."""
        self._raw.release()


class Session:
    """One adapter's client: a pool of keep-alive connections per host, `headers` sent with
    every call."""

    def __init__(self, *, pool_size: int = POOL_SIZE) -> None:
        self.headers: dict[str, str] = {"User-Agent": USER_AGENT}
        self._pool_size = pool_size
        self._clients: dict[tuple, HTTPClient] = {}
        self._proxies = urllib.request.getproxies()
        self._ca = (os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE")
                    or os.environ.get("SSL_CERT_FILE") or None)

    def get(self, url: str, **kw) -> Response:
        return self.request("GET", url, **kw)

    def post(self, url: str, **kw) -> Response:
        return self.request("POST", url, **kw)

    def put(self, url: str, **kw) -> Response:
        return self.request("PUT", url, **kw)

    def patch(self, url: str, **kw) -> Response:
        return self.request("PATCH", url, **kw)

    def delete(self, url: str, **kw) -> Response:
        return self.request("DELETE", url, **kw)

    def request(self, method: str, url: str, *, params=None, json: Any = None, data: Any = None,
                files: dict | None = None, headers: dict | None = None,
                timeout: float | tuple[float, float] | None = None, stream: bool = False,
                allow_redirects: bool = True) -> Response:
        connect_s, read_s = _timeouts(timeout)
        sent = {**self.headers, **(headers or {})}
        body = _body(json, data, files, sent)
        if params:
            url = _with_params(url, params)
        method = method.upper()
        for _ in range(MAX_REDIRECTS + 1):
            u = URL(url)
            raw = self._send(u, method, body, sent, connect_s, read_s)
            location = raw.get("location")
            if not (allow_redirects and raw.status_code in _REDIRECTS and location
                    and (method in ("GET", "HEAD") or raw.status_code == 303)):
                resp = Response(raw, url, u.host, read_s)
                if not stream:
                    resp.content  # noqa: B018 (read now, under the read timeout)
                return resp
            _drop_body(raw)
            target = urllib.parse.urljoin(url, location)
            if urllib.parse.urlsplit(target).netloc != urllib.parse.urlsplit(url).netloc:
                sent = {k: v for k, v in sent.items() if k.lower() != "authorization"}
            if raw.status_code == 303 and method != "HEAD":
                method, body = "GET", None
                sent = {k: v for k, v in sent.items() if k.lower() != "content-type"}
            url = target
        raise RequestException(f"{URL(url).host}: more than {MAX_REDIRECTS} redirects")

    def close(self) -> None:
        for client in self._clients.values():
            client.close()
        self._clients.clear()

    # -- plumbing ------------------------------------------------------------------------------
    def _send(self, u: URL, method: str, body: bytes | None, headers: dict, connect_s: float,
              read_s: float):
        client = self._client(u, connect_s, read_s)
        host = u.host
        try:
            return client.request(method, u.request_uri, body=body, headers=headers)
        except TimeoutError:  # socket.timeout: the connect, or a read of the answer's head
            raise Timeout(f"{host}: no answer within {connect_s:g}s to connect, "
                          f"{read_s:g}s to read") from None
        except Exception as e:  # refused, reset, DNS, TLS, a malformed answer
            raise ConnectionError(f"{host}: {type(e).__name__}") from None

    def _client(self, u: URL, connect_s: float, read_s: float) -> HTTPClient:
        key = (u.scheme, u.host, u.port, connect_s, read_s)
        client = self._clients.get(key)
        if client is None:
            https = u.scheme == "https"
            kw: dict[str, Any] = {}
            proxy = self._proxies.get(u.scheme)
            if proxy and not urllib.request.proxy_bypass(u.host):
                p = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
                kw.update(proxy_host=p.hostname, proxy_port=p.port or 8080,
                          proxy_user=urllib.parse.unquote(p.username) if p.username else None,
                          proxy_password=(urllib.parse.unquote(p.password)
                                          if p.password else None))
            if https and self._ca:
                kw["ssl_options"] = {"ca_certs": self._ca}
            client = self._clients[key] = HTTPClient(
                u.host, u.port, ssl=https, concurrency=self._pool_size,
                connection_timeout=connect_s, network_timeout=read_s,
                headers={"User-Agent": USER_AGENT}, **kw)
        return client


def _timeouts(timeout) -> tuple[float, float]:
    if timeout is None:
        return DEFAULT_TIMEOUT_S, DEFAULT_TIMEOUT_S
    if isinstance(timeout, tuple):
        return float(timeout[0]), float(timeout[1])
    return float(timeout), float(timeout)


def _with_params(url: str, params) -> str:
    items = params.items() if isinstance(params, dict) else params
    query = urllib.parse.urlencode([(k, v) for k, v in items if v is not None])
    if not query:
        return url
    return f"{url}{'&' if '?' in url else '?'}{query}"


def _body(json: Any, data: Any, files: dict | None, headers: dict) -> bytes | None:
    """The request body; sets Content-Type unless the caller set one."""
    def content_type(value: str) -> None:
        if not any(k.lower() == "content-type" for k in headers):
            headers["Content-Type"] = value

    if files:
        body, boundary = _multipart(data or {}, files)
        content_type(f"multipart/form-data; boundary={boundary}")
        return body
    if json is not None:
        if data is not None:
            raise ValueError("send json or data, not both")
        content_type("application/json")
        return jsonlib.dumps(json).encode("utf-8")
    if isinstance(data, dict):
        content_type("application/x-www-form-urlencoded")
        return urllib.parse.urlencode(
            [(k, v) for k, v in data.items() if v is not None]).encode("ascii")
    if isinstance(data, str):
        return data.encode("utf-8")
    return data


def _multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    """multipart/form-data (RFC 7578): names and filenames quoted as browsers do (a quote and
    line breaks percent-encoded), file parts with their own Content-Type."""
    boundary = uuid.uuid4().hex
    out = bytearray()
    for name, value in fields.items():
        if value is None:
            continue
        if not isinstance(value, bytes):
            value = str(value).encode("utf-8")
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"'
                "\r\n\r\n").encode("utf-8") + value + b"\r\n"
    for name, spec in files.items():
        filename, content, mime = (tuple(spec) + ("application/octet-stream",))[:3]
        if hasattr(content, "read"):
            content = content.read()
        if isinstance(content, str):
            content = content.encode("utf-8")
        out += (f'--{boundary}\r\nContent-Disposition: form-data; name="{_quote(name)}"; '
                f'filename="{_quote(filename)}"\r\nContent-Type: {mime}\r\n\r\n'
                ).encode("utf-8") + content + b"\r\n"
    out += f"--{boundary}--\r\n".encode("ascii")
    return bytes(out), boundary


def _quote(value: str) -> str:
    return str(value).replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")


def _drop_body(raw) -> None:
    """Read a redirect's small body so its connection can be reused; close it otherwise."""
    length = raw.content_length
    if length is not None and length <= _REDIRECT_BODY_MAX:
        try:
            with gevent.Timeout(5):
                raw.read()
        except (Exception, gevent.Timeout):
            pass
    raw.release()
