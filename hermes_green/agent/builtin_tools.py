"""A small set of generally useful tools, on by default (`agent.tools`).

Each runs where the one rule puts it (see executors.py), and each refuses what it cannot do
cheaply, because a chat user chooses its input:

- `current_time`: the date and time in a time zone. `thread`: loading a zone reads a file.
- `calculate`: arithmetic from an AST walk (never eval). `process`, under a 5 s timeout: a C
  call on big numbers holds the GIL and cannot be interrupted in-process (`round(1, -10**18)`
  once froze the hub for good). It also refuses, up front and with a clear error, whatever
  could be slow: long or deeply nested expressions, big exponents, products and integers,
  `round` to more digits than an integer can have, big factorials.
- `fetch_url`: a web page's text. Network I/O, so `inline` (patched sockets, cooperative);
  the CPU part, decoding the body and turning HTML into text, goes to the process pool
  (`executors.offload`, 5 s timeout) and is linear in the page size: a hand-written one-pass
  scanner, because the first release's regex stripper (50 s on one 256 KB page) and the
  stdlib's html.parser of Python 3.11.7 (29 s on a run of `<!--`) are quadratic on hostile
  markup. The host is
  resolved once and every address it has is checked; the connection then goes to a checked
  address (the Host header and TLS name stay the URL's host), so a DNS-rebinding name cannot
  pass the check with one answer and connect to another. Loopback, private, link-local and
  other non-public addresses are refused, redirects included (each hop is resolved and checked
  anew), so a chat user cannot make the gateway read internal services; set
  `ALLOW_PRIVATE_ADDRESSES = True` in the gateway process (tests do) to lift that. Proxy
  environment variables are not used: a proxy would resolve the name itself, unchecked.
"""
from __future__ import annotations

import ast
import codecs
import datetime as _dt
import html
import ipaddress
import math
import operator
import os
import re
import socket
import string
from urllib.parse import urljoin, urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from .tools import tool

# -- time ---------------------------------------------------------------------------------------

MAX_TIMEZONE_CHARS = 64


@tool(executor="thread", timeout_s=5)
def current_time(timezone: str = "UTC") -> str:
    """Get the current date and time.

    Args:
        timezone: an IANA time zone name such as "UTC", "Asia/Shanghai" or "Europe/Paris"
    """
    if len(timezone) > MAX_TIMEZONE_CHARS:
        raise ValueError(f"unknown time zone (names are at most {MAX_TIMEZONE_CHARS} characters)")
    try:
        tz = ZoneInfo(timezone)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown time zone {timezone!r} "
                         f"(use an IANA name like 'Asia/Shanghai')") from None
    now = _dt.datetime.now(tz)
    return f"{now.isoformat(timespec='seconds')} ({now:%A}, {timezone})"


# -- calculator ---------------------------------------------------------------------------------

MAX_EXPRESSION_CHARS = 500
MAX_DEPTH = 200  # nesting levels of the expression tree (parentheses, unary signs, calls)
MAX_INT_BITS = 4096  # bounds every intermediate integer so no expression can run for long
MAX_FACTORIAL = 500
# round(x, n) computes 10**abs(n): no integer within MAX_INT_BITS has more digits than this
MAX_ROUND_DIGITS = math.ceil(MAX_INT_BITS * math.log10(2))

_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
           ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}
_FUNCS = {"sqrt": math.sqrt, "sin": math.sin, "cos": math.cos, "tan": math.tan,
          "asin": math.asin, "acos": math.acos, "atan": math.atan, "log": math.log,
          "log10": math.log10, "log2": math.log2, "exp": math.exp, "abs": abs, "round": round,
          "floor": math.floor, "ceil": math.ceil, "factorial": math.factorial, "min": min,
          "max": max, "hypot": math.hypot, "degrees": math.degrees, "radians": math.radians}
_CONSTS = {"pi": math.pi, "e": math.e, "tau": math.tau}


class _Calc:
    def eval(self, node):
        method = getattr(self, f"_{type(node).__name__}", None)
        if method is None:
            raise ValueError(f"'{type(node).__name__}' is not allowed")
        return _check(method(node))

    def _Expression(self, node):
        return self.eval(node.body)

    def _Constant(self, node):
        if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
            raise ValueError("only numbers are allowed")
        return node.value

    def _Name(self, node):
        if node.id not in _CONSTS:
            raise ValueError(f"unknown name {node.id!r}")
        return _CONSTS[node.id]

    def _UnaryOp(self, node):
        if type(node.op) not in _UNARY:
            raise ValueError("unsupported operator")
        return _UNARY[type(node.op)](self.eval(node.operand))

    def _BinOp(self, node):
        if type(node.op) not in _BINARY:
            raise ValueError("unsupported operator")
        left, right = self.eval(node.left), self.eval(node.right)
        if isinstance(node.op, ast.Pow):
            _check_pow(left, right)
        if isinstance(node.op, ast.Mult) and isinstance(left, int) and isinstance(right, int):
            if left.bit_length() + right.bit_length() > MAX_INT_BITS + 64:
                raise ValueError("number too large")
        return _BINARY[type(node.op)](left, right)

    def _Call(self, node):
        if not isinstance(node.func, ast.Name) or node.func.id not in _FUNCS or node.keywords:
            raise ValueError("unknown function")
        name = node.func.id
        args = [self.eval(a) for a in node.args]
        if name == "factorial":
            if len(args) != 1 or not isinstance(args[0], int) or not 0 <= args[0] <= MAX_FACTORIAL:
                raise ValueError(f"factorial takes one integer from 0 to {MAX_FACTORIAL}")
        if name == "round" and len(args) == 2:
            if not isinstance(args[1], int) or abs(args[1]) > MAX_ROUND_DIGITS:
                raise ValueError(f"round's digits must be an integer from -{MAX_ROUND_DIGITS} "
                                 f"to {MAX_ROUND_DIGITS}")
        return _FUNCS[name](*args)


def _check(value):
    if isinstance(value, int) and value.bit_length() > MAX_INT_BITS:
        raise ValueError("number too large")
    if isinstance(value, complex):  # (-8) ** 0.5
        raise ValueError("the result is not a real number")
    return value


def _check_pow(base, exponent) -> None:
    if isinstance(base, int) and isinstance(exponent, int) and exponent > 0:
        if abs(base) > 1 and exponent * math.log2(abs(base)) > MAX_INT_BITS:
            raise ValueError("number too large")


def _check_depth(tree: ast.AST) -> None:
    """Refuse trees deeper than MAX_DEPTH before the (recursive) evaluation starts."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"the expression is nested too deeply (more than {MAX_DEPTH} levels)")
        stack.extend((child, depth + 1) for child in ast.iter_child_nodes(node))


@tool(executor="process", timeout_s=5)
def calculate(expression: str) -> str:
    """Evaluate an arithmetic expression exactly and return the result.

    Supports + - * / // % ** and parentheses, the constants pi, e and tau, and the functions
    sqrt, sin, cos, tan, asin, acos, atan, log, log10, log2, exp, abs, round, floor, ceil,
    factorial, min, max, hypot, degrees and radians. Integers are limited to 4096 bits.

    Args:
        expression: for example "2**10 + sqrt(16) * (3 - 1)"
    """
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ValueError(f"expression longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ValueError("not a valid arithmetic expression") from None
    except (RecursionError, MemoryError):
        raise ValueError(f"the expression is nested too deeply (more than {MAX_DEPTH} "
                         f"levels)") from None
    _check_depth(tree)
    try:
        value = _Calc().eval(tree)
    except ZeroDivisionError:
        raise ValueError("division by zero") from None
    except OverflowError:
        raise ValueError("number too large") from None
    except TypeError as e:
        raise ValueError(str(e)) from None
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


# -- HTML to text (runs in a worker process) ----------------------------------------------------

# Elements whose content is not text to read. Script and style content is raw text: an
# unclosed one runs to the end of the page (as in a browser). The others end at their end tag,
# or, when it is missing, are read as ordinary markup.
_RAW_TEXT = frozenset({"script", "style", "noscript", "textarea", "xmp", "iframe", "noembed",
                       "noframes"})
_SKIPPED = _RAW_TEXT | {"head", "svg", "template", "math", "object"}
_BLOCK = frozenset({"address", "article", "aside", "blockquote", "body", "br", "dd", "details",
                    "div", "dl", "dt", "figcaption", "figure", "footer", "form", "h1", "h2",
                    "h3", "h4", "h5", "h6", "header", "hr", "li", "main", "nav", "ol", "p",
                    "pre", "section", "summary", "table", "title", "tr", "ul"})
_CELL = frozenset({"td", "th", "img", "input", "button", "label", "option"})
_ASCII_LOWER = str.maketrans(string.ascii_uppercase, string.ascii_lowercase)
_MARKUP = re.compile(r"<[a-zA-Z/!?]")
_TAG_NAME = re.compile(r"/?([a-zA-Z][a-zA-Z0-9:-]*)")
_CHARSET = re.compile(r"charset\s*=\s*[\"']?([\w.:-]{1,40})", re.IGNORECASE)
_TAG_STOP = re.compile(r">|=[ \t\n\r\f]*[\"']")  # the tag's end, or a quoted value's start
# html.unescape int()s a numeric reference's digits: over 4300 decimal digits raise ValueError
_OVERLONG_CHARREF = re.compile(r"&#(?:[xX][0-9a-fA-F]{100,}|[0-9]{100,});?")
_TEXT_CODECS_IN_PYTHON = frozenset({"idna", "punycode"})  # pure-Python decoders: slow


def _tag_end(markup: str, pos: int) -> int:
    """Where the tag whose attributes start at `pos` ends (after its `>`). Quoted attribute
    values may hold `>`; an unterminated tag or value runs to the end of the page."""
    while True:
        m = _TAG_STOP.search(markup, pos)
        if m is None:
            return len(markup)
        if m.group() == ">":
            return m.end()
        close = markup.find(m.group()[-1], m.end())
        if close < 0:
            return len(markup)
        pos = close + 1


def html_to_text(markup: str) -> str:
    """Readable text from HTML, in time linear in its length whatever the markup.

    One forward pass, as a browser's tokenizer makes it: each step finds the next thing with
    a C-speed search that starts where the previous one ended and never looks back, so no
    input makes it rescan (unclosed tags, comments and scripts run to the end of the page).
    Pure-Python work (one step per tag): fetch_url runs it in a worker process.
    """
    n = len(markup)
    lower = markup.translate(_ASCII_LOWER)  # ASCII only, so positions match `markup`
    out: list[str] = []
    unclosed: set[str] = set()  # skipped elements with no end tag after some point: none later
    i = 0
    while i < n:
        m = _MARKUP.search(markup, i)
        if m is None:
            out.append(markup[i:])
            break
        j = m.start()
        out.append(markup[i:j])
        if markup[j + 1] in "!?":  # comment, doctype, CDATA, processing instruction
            if markup.startswith("<!--", j):
                end = markup.find("-->", j + 4)
                i = n if end < 0 else end + 3
            else:
                end = markup.find(">", j + 2)
                i = n if end < 0 else end + 1
            continue
        tag = _TAG_NAME.match(markup, j + 1)
        if tag is None:  # "</" and no name: a bogus comment up to the next ">"
            end = markup.find(">", j + 2)
            i = n if end < 0 else end + 1
            continue
        name = lower[tag.start(1):tag.end(1)]
        i = _tag_end(markup, tag.end())
        if name in _BLOCK:
            out.append("\n")
        elif name in _CELL:
            out.append(" ")
        if name in _SKIPPED and name not in unclosed and markup[j + 1] != "/":
            end = lower.find("</" + name, i)
            if end >= 0:
                i = end  # the end tag is read next
            elif name in _RAW_TEXT:
                i = n
            else:
                unclosed.add(name)  # searched to the end once; never again
    text = _OVERLONG_CHARREF.sub("\ufffd", "".join(out))
    return _tidy(html.unescape(text))


def _tidy(text: str) -> str:
    """Spaces collapsed within lines; at most one blank line between paragraphs."""
    lines: list[str] = []
    for line in text.split("\n"):
        line = " ".join(line.split())
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip()


def page_text(body: bytes, content_type: str) -> str | None:
    """A fetched document's readable text (HTML turned into text), or None when it is not a
    text document. Decoding too is work on bytes a server chose (and charset), so fetch_url
    runs all of this in a worker process."""
    text = _decode(body, content_type)
    if "html" in content_type or text.lstrip()[:15].lower().startswith(("<!doctype", "<html")):
        return html_to_text(text)
    if content_type.startswith("text/") or "json" in content_type or "xml" in content_type \
            or not content_type:
        return text
    return None


def _decode(body: bytes, content_type: str) -> str:
    m = _CHARSET.search(content_type)
    charset = "utf-8"
    if m:
        try:
            charset = codecs.lookup(m.group(1)).name
        except LookupError:
            pass
    if charset in _TEXT_CODECS_IN_PYTHON:
        charset = "utf-8"
    try:
        return body.decode(charset, errors="replace")
    except LookupError:  # a codec that is not a text encoding ("zlib", "rot13")
        return body.decode("utf-8", errors="replace")


# -- fetch a URL ---------------------------------------------------------------------------------

ALLOW_PRIVATE_ADDRESSES = False
MAX_FETCH_BYTES = 256 * 1024
FETCH_CONNECT_TIMEOUT_S = 5.0
FETCH_READ_TIMEOUT_S = 10.0
EXTRACT_TIMEOUT_S = 5.0
MAX_REDIRECTS = 5
_REDIRECTS = (301, 302, 303, 307, 308)
_USER_AGENT = "hermes-green/0.1 (+fetch_url tool)"


def _is_public(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    if ip.version == 6 and ip.ipv4_mapped is not None:  # ::ffff:127.0.0.1 is loopback
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def resolve_checked(host: str, port: int) -> list[str]:
    """Resolve `host` once; every address must be public (unless ALLOW_PRIVATE_ADDRESSES).
    Returns the addresses to connect to, in the resolver's order: fetch_url connects to these
    and never resolves the name again."""
    try:
        addresses = [str(ipaddress.ip_address(host))]
    except ValueError:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError):
            raise ValueError(f"cannot resolve host {host!r}") from None
        addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not addresses:
        raise ValueError(f"cannot resolve host {host!r}")
    if not ALLOW_PRIVATE_ADDRESSES:
        for address in addresses:
            if not _is_public(ipaddress.ip_address(address.split("%")[0])):
                raise ValueError(f"{host} resolves to a non-public address; refused")
    return addresses


class _Target:
    """One hop's URL, taken apart: what to resolve, what to send as Host and TLS name."""

    def __init__(self, url: str) -> None:
        from requests.utils import requote_uri  # deferred, as everything network

        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("only http:// and https:// URLs can be fetched")
        self.https = parts.scheme == "https"
        try:
            self.host = parts.hostname.encode("idna").decode("ascii")
        except UnicodeError:
            raise ValueError(f"invalid host name in {url[:200]!r}") from None
        default_port = 443 if self.https else 80
        self.port = parts.port or default_port  # ValueError for a bad port
        name = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = name if self.port == default_port else f"{name}:{self.port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.path = requote_uri(path)  # as requests sends it: spaces, non-ASCII %-encoded


def _ca_bundle() -> str:
    """The CA file requests would use: REQUESTS_CA_BUNDLE or CURL_CA_BUNDLE, else certifi's."""
    from requests.certs import where

    return os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or where()


def _open(target: _Target, address: str):
    """GET target.path from `address` (an IP) with the URL's host as Host and TLS name."""
    import urllib3  # deferred: worker processes import this module and never fetch

    timeout = urllib3.Timeout(connect=FETCH_CONNECT_TIMEOUT_S, read=FETCH_READ_TIMEOUT_S)
    if target.https:
        pool = urllib3.HTTPSConnectionPool(
            address, target.port, timeout=timeout, retries=False, maxsize=1,
            cert_reqs="CERT_REQUIRED", ca_certs=_ca_bundle(), server_hostname=target.host,
            assert_hostname=target.host)
    else:
        pool = urllib3.HTTPConnectionPool(address, target.port, timeout=timeout, retries=False,
                                          maxsize=1)
    try:
        resp = pool.urlopen("GET", target.path, redirect=False, preload_content=False,
                            assert_same_host=False,
                            headers={"Host": target.host_header, "User-Agent": _USER_AGENT,
                                     "Accept": "text/html, text/plain, */*"})
    except BaseException:
        pool.close()
        raise
    return pool, resp


def _get(target: _Target):
    """Resolve, check, connect to a checked address (the next one if connecting fails)."""
    from urllib3.exceptions import ConnectTimeoutError, HTTPError, NewConnectionError

    failure = "no address"
    for address in resolve_checked(target.host, target.port):
        try:
            return _open(target, address)
        except (NewConnectionError, ConnectTimeoutError) as e:
            failure = type(e).__name__
        except HTTPError as e:
            raise ValueError(f"fetching {target.host} failed ({type(e).__name__})") from None
    raise ValueError(f"cannot connect to {target.host} ({failure})")


def _read_body(resp) -> bytes:
    from urllib3.exceptions import HTTPError

    body = bytearray()
    try:
        for chunk in resp.stream(16384, decode_content=True):
            body += chunk
            if len(body) >= MAX_FETCH_BYTES:
                break
    except HTTPError as e:
        raise ValueError(f"reading the page failed ({type(e).__name__})") from None
    return bytes(body[:MAX_FETCH_BYTES])


def _extract(body: bytes, content_type: str) -> str | None:
    """page_text in the process pool of the Executors running this call."""
    from .executors import ExecutorError, offload  # deferred: gevent, never in a worker

    try:
        return offload(page_text, body, content_type, timeout_s=EXTRACT_TIMEOUT_S)
    except ExecutorError as e:
        raise ValueError(f"cannot extract the page's text: {e}") from None


@tool(executor="inline", timeout_s=20, max_result_chars=20_000)
def fetch_url(url: str, max_chars: int = 8000) -> str:
    """Fetch a web page (http or https) and return its text content, HTML tags removed.

    Args:
        url: the address to fetch
        max_chars: return at most this many characters of text (up to 20000)
    """
    max_chars = max(100, min(max_chars, 20_000))
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        target = _Target(current)
        pool, resp = _get(target)
        try:
            location = resp.headers.get("Location")
            if resp.status in _REDIRECTS and location:
                current = urljoin(current, location)
                continue
            if resp.status >= 400:
                raise ValueError(f"HTTP {resp.status} {resp.reason or ''}".rstrip())
            body = _read_body(resp)
            ctype = resp.headers.get("Content-Type", "")
        finally:
            resp.release_conn()
            pool.close()
        text = _extract(body, ctype)
        if text is None:
            return (f"(not a text document: Content-Type {ctype.split(';')[0]}, "
                    f"{len(body)} bytes read)")
        if not text.strip():
            return f"(no readable text: {len(body)} bytes read)"
        if len(text) > max_chars:
            text = text[:max_chars] + f"\n[... cut at {max_chars} characters]"
        return text
    raise ValueError(f"more than {MAX_REDIRECTS} redirects")
