"""A small set of generally useful tools, on by default (`agent.tools`).

Each runs where the one rule puts it (see executors.py), and each refuses what it cannot do
cheaply, because a chat user chooses its input:

- `current_time`: the date and time in a time zone. `thread`: loading a zone reads a file.
- `calculate`: arithmetic from an AST walk (never eval). `process`, under a 5 s timeout: a C
  call on big numbers holds the GIL and cannot be interrupted in-process (`round(1, -10**18)`
  once froze the hub for good). It also refuses, up front and with a clear error, whatever
  could be slow: long or deeply nested expressions, big exponents, products and integers,
  `round` to more digits than an integer can have, big factorials.
- `fetch_url`: a web page's text, with a size limit and timeouts, through patched sockets
  (inline). Addresses on loopback, private, link-local and other internal networks are refused,
  redirects included, so a chat user cannot make the gateway read internal services; set
  `ALLOW_PRIVATE_ADDRESSES = True` in code (tests do) to lift that.
"""
from __future__ import annotations

import ast
import datetime as _dt
import html
import ipaddress
import math
import operator
import re
import socket
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


# -- fetch a URL ---------------------------------------------------------------------------------

ALLOW_PRIVATE_ADDRESSES = False
MAX_FETCH_BYTES = 256 * 1024
FETCH_CONNECT_TIMEOUT_S = 5.0
FETCH_READ_TIMEOUT_S = 10.0
MAX_REDIRECTS = 5
_USER_AGENT = "hermes-green/0.1 (+fetch_url tool)"
_DROP_BLOCKS = re.compile(r"<(script|style|noscript|svg|head)\b.*?</\1\s*>",
                          re.IGNORECASE | re.DOTALL)
_BLOCK_TAGS = re.compile(r"</?(p|div|br|li|tr|h[1-6]|section|article|pre|table|ul|ol)\b[^>]*>",
                         re.IGNORECASE)
_TAGS = re.compile(r"<[^>]+>")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_BLANK_LINES = re.compile(r"\n\s*\n+")


def _check_address(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("only http:// and https:// URLs can be fetched")
    if ALLOW_PRIVATE_ADDRESSES:
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(parts.hostname, port, proto=socket.IPPROTO_TCP)
    except socket.gaierror:
        raise ValueError(f"cannot resolve host {parts.hostname!r}") from None
    for info in infos:
        ip = ipaddress.ip_address(info[4][0].split("%")[0])
        if not ip.is_global:
            raise ValueError(f"{parts.hostname} resolves to a non-public address; refused")


def html_to_text(markup: str) -> str:
    """Readable text from HTML with C-speed regexes (fast enough to run on the hub)."""
    text = _DROP_BLOCKS.sub(" ", markup)
    text = _BLOCK_TAGS.sub("\n", text)
    text = html.unescape(_TAGS.sub(" ", text))
    text = _SPACES.sub(" ", text)
    return _BLANK_LINES.sub("\n\n", "\n".join(line.strip() for line in text.split("\n"))).strip()


@tool(executor="inline", timeout_s=20, max_result_chars=20_000)
def fetch_url(url: str, max_chars: int = 8000) -> str:
    """Fetch a web page (http or https) and return its text content, HTML tags removed.

    Args:
        url: the address to fetch
        max_chars: return at most this many characters of text (up to 20000)
    """
    import requests  # deferred: process workers that import this module never need it

    max_chars = max(100, min(max_chars, 20_000))
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        _check_address(current)
        resp = requests.get(current, stream=True, allow_redirects=False,
                            headers={"User-Agent": _USER_AGENT,
                                     "Accept": "text/html, text/plain, */*"},
                            timeout=(FETCH_CONNECT_TIMEOUT_S, FETCH_READ_TIMEOUT_S))
        try:
            if resp.is_redirect and resp.headers.get("Location"):
                current = urljoin(current, resp.headers["Location"])
                continue
            if resp.status_code >= 400:
                raise ValueError(f"HTTP {resp.status_code} {resp.reason}")
            body = b""
            for chunk in resp.iter_content(16384):
                body += chunk
                if len(body) >= MAX_FETCH_BYTES:
                    body = body[:MAX_FETCH_BYTES]
                    break
            ctype = resp.headers.get("Content-Type", "")
            charset = resp.encoding if "charset" in ctype.lower() else "utf-8"
            text = body.decode(charset or "utf-8", errors="replace")
        finally:
            resp.close()
        if "html" in ctype or text.lstrip()[:15].lower().startswith(("<!doctype", "<html")):
            text = html_to_text(text)
        elif not (ctype.startswith("text/") or "json" in ctype or "xml" in ctype or not ctype):
            return (f"(not a text document: Content-Type {ctype.split(';')[0]}, "
                    f"{len(body)} bytes read)")
        if len(text) > max_chars:
            text = text[:max_chars] + f"\n[... cut at {max_chars} characters]"
        return text
    raise ValueError(f"more than {MAX_REDIRECTS} redirects")
