"""The status server against a real gateway on the test platform: /healthz, /metrics, the page,
the page's WebSocket (including bad input), the token rule, and that no secret leaks."""
from __future__ import annotations

import base64
import json
import logging
import os
import socket
import struct

import gevent
import pytest
import requests
import websocket
from pydantic import SecretStr, ValidationError

from hermes_green import status as status_mod
from hermes_green.config import StatusConfig
from hermes_green.runtime import BlockedReport, HubWatch
from hermes_green.status import (MAX_WS_MESSAGE_BYTES, RecentErrors, StatusServer,
                                 StatusServerError, health_status)
from tests.fakes.fake_testchat import FakeTestChat
from tests.support import GateAgent, start_inprocess_gateway, wait_until
from tests.fakes import testchat_adapter

TOKEN = "s3cr3t-status-token-0123456789"
REQUIRED_METRICS = [
    "hermes_green_platform_up", "hermes_green_reconnects_total",
    "hermes_green_heartbeat_lateness_seconds", "hermes_green_hub_lateness_seconds",
    "hermes_green_hub_blocked_total", "hermes_green_messages_total",
    "hermes_green_outbox_pending", "hermes_green_turn_seconds", "hermes_green_tool_seconds",
]


# --- set-up ------------------------------------------------------------------------------------

class Env:
    def __init__(self, gateway, fakes: dict, server: StatusServer) -> None:
        self.gateway, self.fakes, self.server = gateway, fakes, server

    @property
    def base(self) -> str:
        return self.server.url.rstrip("/")

    @property
    def ws_url(self) -> str:
        return self.base.replace("http://", "ws://") + "/ws"

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.base + path, timeout=5, **kw)


def outage(fake: FakeTestChat) -> None:
    """The platform becomes unreachable: live connections are cut and new ones are not accepted
    (connects hang in the listen backlog until `recover`)."""
    fake.refuse_connections()
    fake.drop()


def recover(fake: FakeTestChat) -> None:
    fake.accept_connections()


@pytest.fixture
def make_env(tmp_path):
    made: list = []

    def make(*, token: str | None = None, platforms: int = 1, hub: HubWatch | None = None,
             push_interval_s: float = 1.0, host: str = "127.0.0.1", **server_kw) -> Env:
        fakes = {"testchat": FakeTestChat().start()}
        extra = {}
        for i in range(2, platforms + 1):
            fake = fakes[f"testchat{i}"] = FakeTestChat().start()
            extra[f"testchat{i}"] = (lambda f, cls: lambda cfg, on_message, **kw: cls(
                testchat_adapter.testchat_config(f.ws_url), on_message, **kw))(
                fake, type(f"TestChat{i}", (testchat_adapter.TestChatAdapter,),
                           {"name": f"testchat{i}"}))
        gw = start_inprocess_gateway(tmp_path, fakes["testchat"], GateAgent(),
                                     extra_factories=extra)
        gw.hub_watch = hub
        for name in extra:
            wait_until(lambda: name in gw.adapters and gw.adapters[name].ready.is_set(),
                       what=f"{name} connected")
        cfg = StatusConfig(host=host, port=0, token=SecretStr(token) if token else None)
        server = StatusServer(gw, cfg, push_interval_s=push_interval_s, **server_kw).start()
        gw.status_server = server
        env = Env(gw, fakes, server)
        made.append(env)
        return env

    yield make
    for env in made:
        for fake in env.fakes.values():
            try:
                recover(fake)
            except Exception:
                pass
        env.gateway.shutdown()  # stops the status server too
        for fake in env.fakes.values():
            fake.stop()


def healthz_status(env: Env, expected: str) -> dict:
    return wait_until(lambda: (doc := env.get("/healthz").json())["status"] == expected and doc,
                      what=f"/healthz status {expected}")


# --- /healthz ----------------------------------------------------------------------------------

def test_healthz_ok_document(make_env):
    hub = HubWatch()
    hub.lateness.extend([0.001] * 99 + [0.004])
    hub.blocked_count = 2
    env = make_env(hub=hub)
    r = env.get("/healthz")
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "application/json"
    doc = r.json()
    assert set(doc) == {"status", "platforms", "hub", "outbox_pending", "undeliverable_replies"}
    assert doc["status"] == "ok"
    p = doc["platforms"]["testchat"]
    assert set(p) == {"state", "connected_since", "reconnects", "last_error",
                      "heartbeat_lateness_p99_ms", "undeliverable", "held"}
    assert p["undeliverable"] == 0 and p["held"] == 0
    assert p["state"] == "ready" and p["reconnects"] == 0 and p["connected_since"] > 0
    assert doc["hub"] == {"lateness_p99_ms": 1.0, "blocked_reports": 2}
    assert doc["outbox_pending"] == 0


def test_healthz_degraded_then_down_then_ok(make_env):
    env = make_env(platforms=2)
    assert env.get("/healthz").json()["status"] == "ok"

    outage(env.fakes["testchat2"])
    doc = healthz_status(env, "degraded")
    assert env.get("/healthz").status_code == 503
    assert doc["platforms"]["testchat"]["state"] == "ready"
    assert doc["platforms"]["testchat2"]["state"] in ("connecting", "backoff")
    assert doc["platforms"]["testchat2"]["reconnects"] >= 1
    assert doc["platforms"]["testchat2"]["last_error"]

    outage(env.fakes["testchat"])
    healthz_status(env, "down")
    assert env.get("/healthz").status_code == 503

    recover(env.fakes["testchat"])
    recover(env.fakes["testchat2"])
    healthz_status(env, "ok")
    assert env.get("/healthz").status_code == 200


def test_health_status_rule():
    assert health_status([]) == "ok"  # nothing configured: nothing is broken
    assert health_status(["ready", "ready"]) == "ok"
    assert health_status(["ready", "backoff"]) == "degraded"
    assert health_status(["ready", "fatal"]) == "degraded"
    assert health_status(["connecting", "fatal"]) == "down"


def test_fatal_platform_is_reported(make_env):
    env = make_env(platforms=2)
    env.gateway.fatal["testchat2"] = "refused: invalid app_secret=abcdef123456"
    env.gateway.adapters["testchat2"].stats.last_error = env.gateway.fatal["testchat2"]
    env.gateway.adapters["testchat2"]._set_state(status_mod_state("fatal"))
    doc = env.get("/healthz").json()
    assert doc["status"] == "degraded"
    assert doc["platforms"]["testchat2"]["state"] == "fatal"
    assert "abcdef123456" not in json.dumps(doc)  # redacted like a log line


def status_mod_state(value: str):
    from hermes_green.platforms.base import State
    return State(value)


# --- /metrics ----------------------------------------------------------------------------------

def test_metrics_exposition(make_env):
    env = make_env()
    fake = env.fakes["testchat"]
    mid = fake.send_user_message("hello")
    fake.wait_for(lambda: fake.replies_to(mid))
    r = env.get("/metrics")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    text = r.text
    for name in REQUIRED_METRICS:
        assert f"# TYPE {name} " in text, name
    assert 'hermes_green_platform_up{bot="testchat",platform="testchat"} 1.0' in text
    assert 'hermes_green_messages_total{bot="testchat",direction="in",platform="testchat"}' in text
    assert "# TYPE hermes_green_heartbeat_lateness_seconds histogram" in text
    assert "hermes_green_turn_seconds_count" in text
    assert "hermes_green_outbox_pending 0.0" in text
    om = env.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert om.headers["Content-Type"].startswith("application/openmetrics-text")
    assert om.text.rstrip().endswith("# EOF")


# --- / and unknown paths -----------------------------------------------------------------------

def test_page_is_served(make_env):
    env = make_env()
    r = env.get("/")
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/html")
    assert "connect-src 'self'" in r.headers["Content-Security-Policy"]
    assert r.headers["Referrer-Policy"] == "no-referrer"
    assert "<title>hermes-green status</title>" in r.text
    assert "new WebSocket(" in r.text


def test_unknown_paths_and_methods(make_env):
    env = make_env()
    for path in ("/nope", "/healthz/", "/metrics.txt", "/../etc/passwd", "/static/status.html"):
        r = env.get(path)
        assert r.status_code == 404, path
        assert r.json() == {"error": "not found"}
    assert requests.post(env.base + "/healthz", timeout=5).status_code == 405
    assert env.get("/ws").status_code == 400  # plain GET without an upgrade


# --- the token rule ----------------------------------------------------------------------------

def test_token_required_on_every_path(make_env, caplog):
    caplog.set_level(logging.DEBUG)
    env = make_env(token=TOKEN)
    for path in ("/", "/healthz", "/metrics", "/ws"):
        for kw in ({}, {"headers": {"Authorization": "Bearer wrong"}},
                   {"headers": {"Authorization": f"Basic {TOKEN}"}},
                   {"params": {"token": TOKEN[:-1]}}, {"params": {"token": ""}},
                   {"headers": {"Authorization": "Bearer "}}):
            r = env.get(path, **kw)
            assert r.status_code == 401, (path, kw)
            assert r.json() == {"error": "unauthorized"}
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
    # unknown paths stay 404 whatever the token (they reveal nothing)
    assert env.get("/nope").status_code == 404
    assert env.get("/healthz", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert env.get("/metrics", headers={"authorization": f"bearer {TOKEN}"}).status_code == 200
    r = env.get("/", params={"token": TOKEN})
    assert r.status_code == 200 and TOKEN not in r.text
    ours = [r for r in caplog.records if r.name.startswith("hermes_green")]
    assert any(r.name == "hermes_green.status" for r in ours)
    for record in ours:  # (urllib3, the test's client, logs its own URLs)
        assert TOKEN not in record.getMessage()


def test_token_websocket(make_env):
    env = make_env(token=TOKEN)
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(env.ws_url, timeout=5)
    assert refused.value.status_code == 401
    with pytest.raises(websocket.WebSocketBadStatusException):
        websocket.create_connection(env.ws_url, timeout=5,
                                    header=["Authorization: Bearer nope"])
    ws = websocket.create_connection(f"{env.ws_url}?token={TOKEN}", timeout=5)
    assert json.loads(ws.recv())["platforms"]["testchat"]["state"] == "ready"
    ws.close()
    ws = websocket.create_connection(env.ws_url, timeout=5,
                                     header=[f"Authorization: Bearer {TOKEN}"])
    assert json.loads(ws.recv())["status"] == "ok"
    ws.close()


def test_token_compared_in_constant_time(monkeypatch):
    calls = []
    real = status_mod.hmac.compare_digest

    def spy(a, b):
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(status_mod.hmac, "compare_digest", spy)
    check = status_mod.TokenCheck(TOKEN)
    assert not check.allows({"HTTP_AUTHORIZATION": "Bearer x"})
    assert not check.allows({"QUERY_STRING": "token=" + "y" * 500})
    assert check.allows({"QUERY_STRING": f"token={TOKEN}"})
    # every check compares both candidates, as fixed-length digests: no length or source leak
    assert calls == [(32, 32)] * 6


def test_off_loopback_needs_a_token(make_env):
    with pytest.raises(ValidationError, match="token is required"):
        StatusConfig(host="0.0.0.0")
    env = make_env()
    for host in ("0.0.0.0", "192.0.2.10", "", "::"):
        unchecked = StatusConfig.model_construct(host=host, port=0, token=None, enabled=True)
        with pytest.raises(StatusServerError, match="without a token"):
            StatusServer(env.gateway, unchecked)
        empty = StatusConfig.model_construct(host=host, port=0, token=SecretStr(""),
                                             enabled=True)
        with pytest.raises(StatusServerError):
            StatusServer(env.gateway, empty)
    # loopback in any spelling needs none; off loopback with a token is accepted
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        StatusServer(env.gateway, StatusConfig.model_construct(host=host, port=0, token=None,
                                                               enabled=True))
    StatusServer(env.gateway, StatusConfig(host="0.0.0.0", port=0, token=SecretStr(TOKEN)))


def test_port_in_use_is_a_clear_error(make_env):
    env = make_env()
    with pytest.raises(StatusServerError, match="cannot listen on 127.0.0.1"):
        StatusServer(env.gateway, StatusConfig(port=env.server.port)).start()


# --- the page's WebSocket ----------------------------------------------------------------------

def open_ws(env: Env, **kw) -> websocket.WebSocket:
    ws = websocket.create_connection(env.ws_url, timeout=5, **kw)
    first = json.loads(ws.recv())
    assert first["platforms"]["testchat"]["state"] == "ready"
    return ws


def close_code(ws: websocket.WebSocket) -> int:
    """Read until the server's close frame; its status code."""
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            return struct.unpack("!H", data[:2])[0] if len(data) >= 2 else 1005


def test_ws_snapshot_on_connect_push_and_ping(make_env):
    hub = HubWatch()
    hub.lateness.extend([0.0005] * 1200)
    hub.blocked.append(BlockedReport(1.0, "wecom:heartbeat", 0.25, "stack"))
    hub.blocked_count = 1
    env = make_env(hub=hub, push_interval_s=30.0)
    ws = open_ws(env)
    ws.send("ping")  # the next push is 30 s away: this answer comes from the ping
    snap = json.loads(ws.recv())
    assert snap["status"] == "ok" and snap["turns_in_flight"] == 0
    p = snap["platforms"]["testchat"]
    assert p["uptime_s"] >= 0 and p["messages_in"] == 0 and len(p["sparkline_ms"]) <= 60
    assert len(snap["hub"]["sparkline_ms"]) == 60
    assert snap["hub"]["recent_blocked"][0]["greenlet"] == "wecom:heartbeat"
    ws.close()

    env.server.push_interval_s = 0.05
    ws = open_ws(env)
    ws.recv()  # pushed without asking
    ws.close()


@pytest.mark.parametrize("send, code", [
    (lambda ws: ws.send("x" * (MAX_WS_MESSAGE_BYTES + 1)), 1009),
    (lambda ws: ws.send("{\"type\": \"subscribe\"}"), 1008),
    (lambda ws: ws.send_binary(b"ping"), 1003),
    (lambda ws: ws.send(b"\xff\xfe", websocket.ABNF.OPCODE_TEXT), 1007),
    # a frame that declares 1 TB: refused from its header, the payload is never awaited
    (lambda ws: ws.sock.sendall(b"\x81\xff" + struct.pack("!Q", 1 << 40) + os.urandom(4)), 1009),
    # many small fragments adding up to more than the limit
    (lambda ws: [ws.send_frame(websocket.ABNF(fin=0, opcode=op, data="y" * 1024))
                 for op in [websocket.ABNF.OPCODE_TEXT] + [0] * 4], 1009),
])
def test_bad_ws_message_closes_that_socket_only(make_env, send, code):
    env = make_env()
    bystander = open_ws(env)
    ws = open_ws(env)
    send(ws)
    assert close_code(ws) == code
    ws.close()
    bystander.send("refresh")
    assert json.loads(bystander.recv())["status"] == "ok"
    assert env.get("/healthz").status_code == 200
    bystander.close()
    wait_until(lambda: not env.server._sockets, what="sockets released")


def test_ws_from_another_origin_is_refused(make_env):
    env = make_env()
    with pytest.raises(websocket.WebSocketBadStatusException) as refused:
        websocket.create_connection(env.ws_url, timeout=5, origin="http://evil.example")
    assert refused.value.status_code == 403
    open_ws(env, origin=env.base).close()  # the page's own origin


def test_stop_closes_page_sockets_and_is_idempotent(make_env):
    env = make_env()
    ws = open_ws(env)
    env.server.stop()
    assert close_code(ws) == 1001
    env.server.stop()
    with pytest.raises(requests.ConnectionError):
        env.get("/healthz")


def test_raw_upgrade_without_key_does_not_break_server(make_env):
    env = make_env()
    s = socket.create_connection(("127.0.0.1", env.server.port), timeout=5)
    s.sendall(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
              b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: "
              + base64.b64encode(b"short") + b"\r\n\r\n")
    assert s.recv(100).startswith(b"HTTP/1.1 400")
    s.close()
    assert env.get("/healthz").status_code == 200


# --- recent errors -----------------------------------------------------------------------------

def test_recent_errors_are_redacted_and_detached_on_stop(make_env):
    env = make_env(push_interval_s=30.0)
    logging.getLogger("hermes_green.test").warning(
        "upstream refused headers={'Authorization': 'Bearer abcdefghijklmnop'} app_secret=zz9999")
    logging.getLogger("hermes_green.test").info("not an error")
    ws = open_ws(env)
    ws.send("refresh")
    errors = json.loads(ws.recv())["errors"]
    ws.close()
    messages = [e["message"] for e in errors]
    assert any("upstream refused" in m for m in messages)
    assert not any("abcdefghijklmnop" in m or "zz9999" in m for m in messages)
    assert not any("not an error" in m for m in messages)
    assert env.server.errors in logging.getLogger().handlers
    env.server.stop()
    assert env.server.errors not in logging.getLogger().handlers


def test_recent_errors_capacity():
    handler = RecentErrors(capacity=3)
    logger = logging.getLogger("hermes_green.test.capacity")
    logger.addHandler(handler)
    try:
        for i in range(5):
            logger.error("e%d", i)
    finally:
        logger.removeHandler(handler)
    assert [e["message"] for e in handler.latest()] == ["e4", "e3", "e2"]


def test_sparkline_keeps_spikes():
    values = [0.001] * 1200
    values[700] = 0.5
    points = status_mod._spark(values)
    assert len(points) == 60 and max(points) == 500.0 and min(points) == 1.0
    assert status_mod._spark([0.002, 0.003]) == [2.0, 3.0]


def test_cooperative_under_load(make_env):
    """Twenty page sockets and HTTP polling at once: all answered, the gateway unharmed."""
    env = make_env(push_interval_s=0.05)
    sockets = [open_ws(env) for _ in range(20)]
    jobs = [gevent.spawn(env.get, "/metrics") for _ in range(20)]
    gevent.joinall(jobs, timeout=10)
    assert all(j.value.status_code == 200 for j in jobs)
    for ws in sockets:
        assert json.loads(ws.recv())["platforms"]["testchat"]["state"] == "ready"
        ws.close()
    assert env.gateway.adapters["testchat"].ready.is_set()


def test_metrics_import_prometheus_client_only_when_someone_looks():
    """Recording costs no prometheus-client import (3.5 MB in every gateway): it is imported
    by the first scrape (a fresh interpreter, as a gateway starts)."""
    import subprocess
    import sys
    code = ("import sys, hermes_green.runtime, hermes_green.gateway, hermes_green.status\n"
            "from hermes_green import metrics\n"
            "metrics.messages_total.labels('qqbot', 'qqbot', 'in').inc(2)\n"
            "metrics.hub_lateness.observe(0.003)\n"
            "before = 'prometheus_client' in sys.modules\n"
            "value = metrics.REGISTRY.get_sample_value('hermes_green_messages_total',\n"
            "    {'platform': 'qqbot', 'bot': 'qqbot', 'direction': 'in'})\n"
            "count = metrics.REGISTRY.get_sample_value('hermes_green_hub_lateness_seconds_bucket',"
            " {'le': '0.005'})\n"
            "print(before, value, count, 'prometheus_client' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["False", "2.0", "1.0", "True"]
