"""The runtime patches before anything else, and watches the hub from both angles."""
import subprocess
import time

import gevent
import pytest
from gevent import pywsgi

from hermes_green import metrics
from hermes_green.runtime import HubWatch, percentile
from tests.support import run_cli, wait_until, write_config


@pytest.fixture(scope="module")
def tls_cert(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    cert, key = d / "cert.pem", d / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def test_fresh_entry_point_is_patched_and_speaks_https(tmp_path, tls_cert):
    """A new interpreter started through bin/hermes-green: the runtime reports socket, ssl and
    threading patched, and requests reaches an HTTPS server (TLS over gevent's ssl)."""
    cert, key = tls_cert
    seen = []

    def app(environ, start_response):
        seen.append((environ["PATH_INFO"], environ.get("HTTP_AUTHORIZATION")))
        body = b'{"data": [{"id": "tiny-model"}]}'
        start_response("200 OK", [("Content-Type", "application/json"),
                                  ("Content-Length", str(len(body)))])
        return [body]

    server = pywsgi.WSGIServer(("127.0.0.1", 0), app, keyfile=str(key), certfile=str(cert),
                               log=None, error_log=None)
    server.start()
    try:
        cfg = write_config(tmp_path / "c.yaml", {
            "gateway": {"data_dir": str(tmp_path / "data")},
            "agent": {"base_url": f"https://127.0.0.1:{server.server_port}/v1",
                      "api_key": "sk-test-secret-123456", "model": "tiny-model", "tools": []}})
        # run the child in a thread-free way: gevent's patched subprocess yields while we wait
        result = run_cli("check", "--config", str(cfg), env={"REQUESTS_CA_BUNDLE": str(cert)})
    finally:
        server.stop()
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    runtime_line = next(line for line in out.splitlines() if line.startswith("ok   runtime:"))
    for module in ("socket", "ssl", "threading"):
        assert module in runtime_line
    assert "ok   llm: https://127.0.0.1" in out and "'tiny-model' listed" in out
    assert seen == [("/v1/models", "Bearer sk-test-secret-123456")]
    assert "sk-test-secret-123456" not in out + result.stderr


def test_blocking_monitor_reports_greenlet_name_and_stack():
    watch = HubWatch(max_blocking_time_s=0.05)
    before = metrics.hub_blocked_total._value.get()
    # The monitor thread is one per hub and outlives the gateways earlier tests ran; start a
    # fresh one with this test's settings, as a new process would.
    hub = gevent.get_hub()
    if hub.periodic_monitoring_thread is not None:
        hub.periodic_monitoring_thread.kill()
        hub.periodic_monitoring_thread = None
    watch.start()
    try:
        def hog_the_hub():
            end = time.perf_counter() + 0.3
            while time.perf_counter() < end:
                pass

        g = gevent.spawn(hog_the_hub)
        g.name = "test:hog"
        g.join()
        # other tests' leftovers may be reported too (a monitor sees the whole process): ours
        # must be among the reports, with its name and its stack
        wait_until(lambda: any(r.greenlet == "test:hog" for r in watch.blocked)
                   and watch.lateness, timeout=5, what="a blocked report and a probe wake")
        report = next(r for r in watch.blocked if r.greenlet == "test:hog")
        assert "hog_the_hub" in report.stack
        assert metrics.hub_blocked_total._value.get() > before
        # the probe saw the hub come back late
        assert max(watch.lateness) >= 0.2
    finally:
        watch.stop()


def test_percentile_nearest_rank():
    assert percentile([], 99) == 0.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([5.0], 50) == 5.0


def test_patching_reads_no_package_metadata():
    """gevent's patch_all looks for plugin entry points by reading every installed package's
    metadata (55 ms of start-up, 3.3 MB); the runtime patches without that scan, and gevent's
    own patching still happens (a fresh interpreter, as the gateway starts)."""
    import sys
    code = ("import sys, hermes_green.runtime\n"
            "from gevent import monkey\n"
            "print(monkey.is_module_patched('socket'), monkey.is_module_patched('ssl'),\n"
            "      'importlib.metadata' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert out == ["True", "True", "False"]
