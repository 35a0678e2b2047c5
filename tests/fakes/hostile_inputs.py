"""The worst inputs a chat user can make the built-in tools chew on, and a loopback web server
that serves the hostile pages. Shared by tests/test_hostile_tools.py and bench/hostile_tools.py.

Each input was found or constructed against the first release, which ran the calculator and
fetch_url's HTML-to-text on the hub: `round(1, -10**18)` computes 10**(10**18) in one C call
and never returns; the regex HTML stripper backtracks over the whole rest of a 256 KB page at
each unclosed `<script>` (about 50 s); html.parser of Python 3.11.7 is quadratic on runs of
`<!--`, `</` and `<?` (5-30 s), so the stdlib parser is not linear everywhere either.
"""
from __future__ import annotations

import gevent.pywsgi

PAGE_BYTES = 256 * 1024  # fetch_url's read limit: the whole hostile page gets read


def _page(unit: str, lead: str = "") -> str:
    return (lead + unit * (PAGE_BYTES // len(unit) + 1))[:PAGE_BYTES]


LEAD_TEXT = "Hello from a hostile page"


# expression -> what the first release did with it
HOSTILE_CALCULATIONS = {
    "round(1, -10**18)": "computes 10**(10**18): never returns, holds the GIL",
    "9**9**9": "an exponent tower (refused by the exponent bound)",
    "(" * 5000 + "1" + ")" * 5000: "5000 nested parentheses (refused by the size limit)",
    "-" * 499 + "1": "a 499-deep chain of unary minus (RecursionError)",
    "round(10**1000, -10**6)": "10**(10**6): 0.15 s of C work on the hub",
    "factorial(500) ** 8": "a big power (refused by the bit bound)",
}

# name -> a 256 KB text/html page
HOSTILE_PAGES = {
    # (first release's regex stripper on the hub, bench/hostile_tools.py; html.parser 3.11.7)
    # ~50 s, the page; its text is LEAD_TEXT
    "unclosed_script": _page("<script>", lead=f"<p>{LEAD_TEXT}</p>"),
    "lt_run": _page("<"),                   # ~59 s
    "comment_open_run": _page("<!--"),      # ~17 s; html.parser ~29 s
    "end_tag_run": _page("</"),             # ~26 s; html.parser ~6 s
    "pi_run": _page("<?"),                  # ~24 s; html.parser ~5 s
    "dense_tags": _page("<p>a</p><br>"),    # legitimate but dense markup: many tags
}

HOSTILE_TIMEZONES = ["../" * 100 + "etc/passwd", "x" * 10_000, "\x00", "UTC"]


class HostileWeb:
    """A loopback HTTP server: `/page/<name>` serves HOSTILE_PAGES[name] as text/html,
    `/text` a short plain page. `requests` lists the paths it was asked for."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests: list[str] = []
        self._server = gevent.pywsgi.WSGIServer((host, port), self._app, log=None)

    def start(self) -> "HostileWeb":
        self._server.start()
        return self

    def stop(self) -> None:
        self._server.stop(timeout=1)

    @property
    def base_url(self) -> str:
        return f"http://{self._server.server_host}:{self._server.server_port}"

    def url(self, name: str) -> str:
        return f"{self.base_url}/page/{name}"

    def _app(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        self.requests.append(path)
        name = path.removeprefix("/page/")
        if path.startswith("/page/") and name in HOSTILE_PAGES:
            body, ctype = HOSTILE_PAGES[name].encode(), "text/html; charset=utf-8"
        elif path == "/text":
            body, ctype = b"plain words", "text/plain"
        else:
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"no such page"]
        start_response("200 OK", [("Content-Type", ctype), ("Content-Length", str(len(body)))])
        return [body]
