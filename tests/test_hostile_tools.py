"""Hostile input to the built-in tools never holds the hub, and fetch_url connects only to the
address it checked.

In process: which executor each built-in tool runs in, the calculator's refusals (called in a
worker process so that a regression hangs a worker, not pytest), every built-in tool under its
worst inputs while a 10 ms ticker on the hub records its lateness, and fetch_url against a
rebinding resolver (socket.getaddrinfo replaced; the "internet" is loopback servers behind a
replaced urllib3 connect). On a real gateway process (bin/hermes-green with the strict fake of
every registered platform, the fake LLM calling the tools): the hostile calculations and the
hostile page are answered within seconds while every platform stays connected with keepalives
(long polls) on time, and SIGTERM still ends the gateway cleanly.
"""
import json
import re
import signal
import socket
import subprocess
import sys
import time

import gevent
import gevent.pywsgi
import pytest
import urllib3.util.connection

from hermes_green.agent import builtin_tools
from hermes_green.agent.builtin_tools import calculate, current_time, fetch_url
from hermes_green.agent.executors import Executors, RemoteToolError, target_of
from hermes_green.agent.tools import ToolRegistry, call_tool
from hermes_green.testing.fake_llm import ToolCalls, text
from hermes_green.testing.fleet import FakeFleet, Keepalive, all_platforms
from tests.fakes.hostile_inputs import (HOSTILE_CALCULATIONS, HOSTILE_PAGES, HOSTILE_TIMEZONES,
                                        LEAD_TEXT, HostileWeb)
from tests.support import ROOT, Process, write_config

# The only built-in tools allowed to run inline: they do network I/O through patched sockets
# and send what they compute to the process pool (executors.offload).
NETWORK_IO_TOOLS = {"fetch_url"}
TICK_S = 0.010
MAX_LATENESS_S = 0.050


@pytest.fixture(scope="module")
def executors():
    ex = Executors(processes=1)
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def builtins():
    return ToolRegistry.from_modules(["hermes_green.agent.builtin_tools"])


# -- where each built-in tool runs ------------------------------------------------------------

def test_inline_built_in_tools_are_only_the_network_io_ones(builtins):
    executors = {spec.name: spec.executor for spec in builtins.specs()}
    assert {"calculate", "current_time", "fetch_url"} <= set(executors)
    assert {name for name, ex in executors.items() if ex == "inline"} == NETWORK_IO_TOOLS
    assert executors["calculate"] == "process"
    for spec in builtins.specs():
        assert spec.timeout_s <= 30, spec


# -- the calculator refuses what it cannot do cheaply -----------------------------------------

REFUSALS = {
    "round(1, -10**18)": "round's digits must be an integer from -1234 to 1234",
    "round(10**1000, -10**6)": "round's digits must be an integer",
    "9**9**9": "number too large",
    "factorial(500) ** 8": "number too large",
    "(" * 5000 + "1" + ")" * 5000: "expression longer than 500 characters",
    "-" * 499 + "1": "nested too deeply (more than 200 levels)",
    "2.0 ** 100000": "number too large",
    "(-8) ** 0.5": "not a real number",
}


def in_worker(executors, expression):
    """calculate() in a worker process: a regression that never returns costs a worker."""
    return executors.processes.call(target_of(calculate), (expression,), timeout_s=10)


@pytest.mark.parametrize("expression", list(REFUSALS), ids=lambda e: e[:24])
def test_the_calculator_refuses_what_it_cannot_do_cheaply(executors, expression):
    assert set(HOSTILE_CALCULATIONS) <= set(REFUSALS)
    started = time.monotonic()
    with pytest.raises(RemoteToolError) as info:
        in_worker(executors, expression)
    assert info.value.type_name == "ValueError"
    assert REFUSALS[expression] in str(info.value)
    assert time.monotonic() - started < 2


def test_the_calculator_still_does_long_sums_and_big_exact_numbers(executors):
    assert in_worker(executors, "+".join(["1"] * 150)) == "150"
    assert in_worker(executors, "round(12345, -2) + round(pi, 2)") == "12303.14"
    assert in_worker(executors, "2 ** 4000 // 2 ** 3999") == "2"


def test_a_hostile_time_zone_name_is_refused_without_echoing_it():
    for name in HOSTILE_TIMEZONES[:3]:
        with pytest.raises(ValueError, match="unknown time zone") as info:
            current_time(name)
        assert len(str(info.value)) < 150


# -- every built-in tool under its worst inputs, with a ticker on the hub ---------------------

def worst_calls(web):
    """(tool, arguments) for every built-in tool's worst inputs. A call that cannot finish on
    the hub comes last, so a regression fails on the earlier, finite ones before it hangs."""
    calcs = sorted(HOSTILE_CALCULATIONS, key=lambda e: e == "round(1, -10**18)")
    return ([("current_time", {"timezone": tz}) for tz in HOSTILE_TIMEZONES]
            + [("fetch_url", {"url": web.url(name), "max_chars": 20000})
               for name in HOSTILE_PAGES]
            + [("fetch_url", {"url": f"{web.base_url}/missing"}),
               ("fetch_url", {"url": "http://no-such-host.invalid/"})]
            + [("calculate", {"expression": expr}) for expr in calcs])


def test_every_built_in_tool_with_its_worst_inputs_leaves_the_hub_on_time(
        builtins, executors, monkeypatch):
    monkeypatch.setattr(builtin_tools, "ALLOW_PRIVATE_ADDRESSES", True)
    web = HostileWeb().start()
    lateness: list[float] = []

    def tick():
        due = time.monotonic() + TICK_S
        while True:
            gevent.sleep(max(0.0, due - time.monotonic()))
            now = time.monotonic()
            lateness.append(now - due)
            due = now + TICK_S if now - due > TICK_S else due + TICK_S

    call_tool(builtins, executors, "calculate", '{"expression": "1 + 1"}')  # worker started
    ticker = gevent.spawn(tick)
    try:
        for name, args in worst_calls(web):
            gevent.sleep(TICK_S * 2)
            first, started = len(lateness), time.monotonic()
            result = call_tool(builtins, executors, name, json.dumps(args))
            took = time.monotonic() - started
            gevent.sleep(TICK_S * 2)  # the wake a held hub delayed is recorded only now
            worst = max(lateness[first:], default=0.0)
            label = f"{name}({json.dumps(args)[:60]})"
            assert worst < MAX_LATENESS_S, f"{label}: the hub was {worst * 1000:.0f} ms late"
            assert took < 10, f"{label}: answered after {took:.1f} s"
            assert result.content, label
            if name == "calculate":
                assert not result.ok and result.content.startswith("Error: calculate failed")
            if "/page/" in args.get("url", ""):  # extracted in the pool, well within its timeout
                assert result.ok, f"{label}: {result.content}"
            if args.get("url", "").endswith("/unclosed_script"):
                assert result.content == LEAD_TEXT
    finally:
        ticker.kill()
        web.stop()


# -- HTML to text: one forward pass ------------------------------------------------------------

@pytest.mark.parametrize("markup, text", [
    ("<p>a</p><p>b</p>", "a\n\nb"),
    ('<a title="x > y" href=\'/>\'>link</a> after', "link after"),
    ("<SCRIPT type=x>if (a<b) {}</SCRIPT >shown", "shown"),
    ("<!-- <p>hidden</p> -->shown<!-- unclosed <p>hidden", "shown"),
    ("<head><title>t</title></head><body>body</body>", "body"),
    ("<head><title>t</title><body>no end of head</body>", "t\n\nno end of head"),
    ("x <script>never closed <p>hidden", "x"),
    ("1 < 2 and 3 </ 4 > 5 <3", "1 < 2 and 3 5 <3"),
    ("caf&eacute; &amp; &#x1F600; &#" + "9" * 5000 + ";", "café & \U0001F600 \ufffd"),
    ("<td>a</td><td>b</td>", "a b"),
    ("<b>bo</b>ld <i>it</i>", "bold it"),
])
def test_html_to_text(markup, text):
    assert builtin_tools.html_to_text(markup) == text


# -- fetch_url connects only to the address it checked -----------------------------------------

PUBLIC_IP = "93.184.215.14"  # a global address; the test's "internet" maps it to loopback


class Page:
    """A loopback server answering every request with one response; records Host headers."""

    def __init__(self, body: str, status: str = "200 OK", headers=()) -> None:
        self.hosts: list[str] = []
        self.body, self.status, self.headers = body, status, list(headers)
        self.server = gevent.pywsgi.WSGIServer(("127.0.0.1", 0), self._app, log=None)
        self.server.start()
        self.port = self.server.server_port

    def _app(self, environ, start_response):
        self.hosts.append(environ.get("HTTP_HOST", ""))
        start_response(self.status, [("Content-Type", "text/html"), *self.headers])
        return [self.body.encode()]


@pytest.fixture
def net(monkeypatch):
    """A resolver that rebinds, and an internet where PUBLIC_IP is a loopback server.

    `net.answers[name]` is the list of answers `name` gets, one per lookup (the last one
    repeats); `net.lookups` and `net.connects` record what fetch_url asked for and where it
    connected. The internal service listens on 127.0.0.1 at `net.port`; the public site
    answers on PUBLIC_IP at the same port."""
    class Net:
        internal = Page("<p>internal secret</p>")
        public = Page("<p>the public page</p>")
        port = internal.port
        public_port = public.port  # where a connection to PUBLIC_IP lands
        answers: dict[str, list[list[str]]] = {}
        lookups: list[str] = []
        connects: list[str] = []

    real_getaddrinfo, real_connect = socket.getaddrinfo, urllib3.util.connection.create_connection

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in Net.answers:
            return real_getaddrinfo(host, port, *args, **kwargs)
        Net.lookups.append(host)
        queue = Net.answers[host]
        ips = queue.pop(0) if len(queue) > 1 else queue[0]
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (ip, port or 0))
                for ip in ips]

    def create_connection(address, *args, **kwargs):
        host, port = address
        Net.connects.append(host)
        if host == PUBLIC_IP:
            address = ("127.0.0.1", Net.public_port)
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(urllib3.util.connection, "create_connection", create_connection)
    yield Net
    Net.internal.server.stop()
    Net.public.server.stop()


def test_a_rebinding_name_is_fetched_from_the_address_that_was_checked(net):
    """Public on the first lookup, 127.0.0.1 on every later one: the page comes from the
    public address, the internal service never sees a request, and the name is looked up once."""
    net.answers["rebind.example"] = [[PUBLIC_IP], ["127.0.0.1"]]
    text = fetch_url(f"http://rebind.example:{net.port}/")
    assert net.internal.hosts == []
    assert text == "the public page"
    assert net.lookups == ["rebind.example"]
    assert net.connects == [PUBLIC_IP]
    assert net.public.hosts == [f"rebind.example:{net.port}"]  # the URL's host, not the IP


def test_a_name_with_any_non_public_address_is_refused_before_connecting(net):
    net.answers["mixed.example"] = [[PUBLIC_IP, "127.0.0.1"]]
    net.answers["mapped.example"] = [["::ffff:127.0.0.1"]]
    for name in ("mixed.example", "mapped.example"):
        with pytest.raises(ValueError, match="non-public address; refused"):
            fetch_url(f"http://{name}:{net.port}/")
    assert net.connects == [] and net.internal.hosts == []


def test_every_redirect_hop_is_resolved_and_checked_again(net):
    net.answers["site.example"] = [[PUBLIC_IP]]
    net.answers["inside.example"] = [["127.0.0.1"]]
    net.public.status = "302 Found"
    net.public.headers = [("Location", f"http://inside.example:{net.port}/admin")]
    with pytest.raises(ValueError, match="inside.example resolves to a non-public address"):
        fetch_url(f"http://site.example:{net.port}/")
    assert net.lookups == ["site.example", "inside.example"]
    assert net.connects == [PUBLIC_IP] and net.internal.hosts == []


def test_https_to_the_checked_address_verifies_the_certificate_for_the_urls_name(
        net, tmp_path, monkeypatch):
    """The connection goes to an IP, yet TLS (SNI and the certificate check) speaks the URL's
    name: a certificate for that name passes, one for another name is refused."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=secure.example", "-addext", "subjectAltName=DNS:secure.example",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(cert))

    def app(environ, start_response):
        start_response("200 OK", [("Content-Type", "text/html")])
        return [f"<p>secure page for {environ['HTTP_HOST']}</p>".encode()]
    server = gevent.pywsgi.WSGIServer(("127.0.0.1", 0), app, keyfile=str(key),
                                      certfile=str(cert), log=None, error_log=None)
    server.start()
    net.public_port = server.server_port
    net.answers["secure.example"] = [[PUBLIC_IP]]
    net.answers["impostor.example"] = [[PUBLIC_IP]]
    try:
        assert fetch_url(f"https://secure.example:{net.port}/") == \
            f"secure page for secure.example:{net.port}"
        with pytest.raises(ValueError, match=r"fetching impostor.example failed \(SSLError\)"):
            fetch_url(f"https://impostor.example:{net.port}/")
    finally:
        server.stop()
    assert net.connects == [PUBLIC_IP, PUBLIC_IP] and net.internal.hosts == []


# -- on a real gateway process ------------------------------------------------------------------

# bin/hermes-green with fetch_url allowed to read loopback (the hostile page is served there)
LAUNCHER = str(ROOT / "tests" / "fakes" / "hermes_green_private_fetch.py")
MARKER = re.compile(r"hostile-input-(\d+)")


def scripted_llm(calls):
    """A fake-LLM response for any chat request: the user's `hostile-input-<n>` asks for
    calls[n]; once the tool answered, the model repeats its answer."""
    def respond(body):
        messages = body["messages"]
        if messages[-1].get("role") == "tool":
            return text(f"tool answered: {messages[-1]['content'][:300]}", chunk_chars=400)
        user = next(m for m in reversed(messages) if m.get("role") == "user")
        name, args = calls[int(MARKER.search(user["content"]).group(1))]
        return ToolCalls([(name, args)], delay_s=0, arg_chunk_chars=4096)
    return respond


def run_gateway(tmp, calls):
    """Start a gateway on every platform's fake, send all `calls` at once (call i from
    platform i mod n, one chat per call), wait for the answers (or 30 s), watch two more
    keepalives on every platform, SIGTERM it."""
    web = HostileWeb().start()
    calls = [(name, {k: v.replace("@WEB@", web.base_url) if isinstance(v, str) else v
                     for k, v in args.items()}) for name, args in calls]
    fleet = FakeFleet(keepalive=Keepalive(interval_s=1.0, deadline_s=1.5)).start()
    fleet.llm.script(*[scripted_llm(calls)] * (4 * len(calls)))
    cfg = write_config(tmp / "config.yaml", {
        "gateway": {"data_dir": str(tmp / "data"), "status": {"enabled": False}},
        "agent": fleet.agent_config(tools=["hermes_green.agent.builtin_tools"]),
        "platforms": fleet.platforms_config()})
    gw = Process([sys.executable, LAUNCHER, "--config", str(cfg)])
    out = {"answered_in": {}, "answers": {}}
    try:
        fleet.wait_for(lambda: all(fleet.keepalives(p) >= 1 for p in fleet.platforms), 30)
        since = time.monotonic()
        seen_late = {p: len(fleet.lateness(p)) for p in fleet.platforms}
        n = len(fleet.platforms)
        sent = [(fleet.send(fleet.platforms[i % n], f"please run hostile-input-{i}",
                            chat=i // n), fleet.platforms[i % n]) for i in range(len(calls))]
        try:
            fleet.wait_for(fleet.all_answered, timeout=30)
        except AssertionError:
            pass  # reported per input below
        seen = {p: fleet.keepalives(p) for p in fleet.platforms}
        try:
            fleet.wait_for(lambda: all(fleet.keepalives(p) >= seen[p] + 2
                                       for p in fleet.platforms), timeout=10)
        except AssertionError:
            pass
        for i, (mid, p) in enumerate(sent):
            at = fleet.first_answer_at(p, mid)
            out["answered_in"][i] = None if at is None else at - since
            out["answers"][i] = fleet.answers(p, mid)
        out["disconnects"] = {p: fleet.disconnects(p) for p in fleet.platforms}
        # one connection each (no disconnects): the keepalives after the input come last
        out["lateness"] = {p: fleet.lateness(p)[seen_late[p]:] for p in fleet.platforms}
        out["tool_results"] = [m["content"] for r in fleet.llm.chat_requests
                               for m in r.body["messages"] if m.get("role") == "tool"]
    finally:
        gw.signal(signal.SIGTERM)
        try:
            out["exit_code"] = gw.wait(timeout=20)
        except Exception:  # noqa: BLE001  (a frozen hub never hears SIGTERM)
            out["exit_code"] = "no exit within 20 s of SIGTERM"
            gw.kill()
        out["output"] = "\n".join(gw.lines) + gw.stderr
        fleet.stop()
        web.stop()
    return out


CALC_INPUTS = ["round(1, -10**18)", "9**9**9", "(" * 5000 + "1" + ")" * 5000, "-" * 499 + "1"]


@pytest.fixture(scope="module")
def calc_run(tmp_path_factory):
    return run_gateway(tmp_path_factory.mktemp("hostile-calc"),
                       [("calculate", {"expression": e}) for e in CALC_INPUTS])


@pytest.fixture(scope="module")
def page_run(tmp_path_factory):
    return run_gateway(tmp_path_factory.mktemp("hostile-page"),
                       [("fetch_url", {"url": "@WEB@/page/unclosed_script"})]
                       * len(all_platforms()))


@pytest.mark.parametrize("i", range(len(CALC_INPUTS)), ids=lambda i: CALC_INPUTS[i][:20])
def test_a_gateway_answers_each_hostile_calculation_with_an_error_in_seconds(calc_run, i):
    took, answers = calc_run["answered_in"][i], calc_run["answers"][i]
    assert took is not None and took < 10, f"answered after {took} s"
    assert len(answers) == 1 and "tool answered: Error: calculate failed: ValueError" in answers[0]
    assert REFUSALS[CALC_INPUTS[i]] in answers[0]


def test_a_gateway_answers_the_hostile_page_with_its_text_in_seconds(page_run):
    assert len(page_run["answers"]) == len(all_platforms()) >= 3
    for i in page_run["answers"]:
        took, answers = page_run["answered_in"][i], page_run["answers"][i]
        assert took is not None and took < 10, f"answered after {took} s"
        assert answers == [f"tool answered: {LEAD_TEXT}"]


@pytest.mark.parametrize("run", ["calc_run", "page_run"])
def test_every_platform_stays_connected_with_keepalives_on_time(request, run):
    result = request.getfixturevalue(run)
    assert set(result["disconnects"]) == set(all_platforms()) >= {"wecom", "feishu", "qqbot"}
    assert all(d == [] for d in result["disconnects"].values()), result["disconnects"]
    for platform, lateness in result["lateness"].items():
        assert len(lateness) >= 2, f"{platform}: {len(lateness)} keepalives after the input"
        assert max(lateness) < MAX_LATENESS_S, \
            f"{platform}: keepalive {max(lateness) * 1000:.0f} ms late"


@pytest.mark.parametrize("run", ["calc_run", "page_run"])
def test_the_gateway_still_drains_and_exits_on_sigterm(request, run):
    result = request.getfixturevalue(run)
    assert result["exit_code"] == 0, result["output"][-3000:]
    assert "hub blocked" not in result["output"]
