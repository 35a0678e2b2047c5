"""Log lines: one per event, key=value or JSON, and secrets masked whatever logged them."""
import io
import json
import logging

import pytest

from hermes_green.config import parse_config
from hermes_green.logs import MASK, Redactor, config_secrets, setup_logging


@pytest.mark.parametrize("line, secret", [
    ("Authorization: QQBot abcdefgh12345678==", "abcdefgh12345678"),
    ('headers={"Authorization": "Bearer sk-abc123456789"}', "sk-abc123456789"),
    ('{"access_token": "tok-123456", "expires_in": "7200"}', "tok-123456"),
    ('{"tenant_access_token":"t-g1044abcdef","expire":7200}', "t-g1044abcdef"),
    ("POST body AppSecret=abcd-efgh-1234 sent", "abcd-efgh-1234"),
    ('{"appId": "1", "clientSecret": "cs-0123456789"}', "cs-0123456789"),
])
def test_credential_shapes_are_masked(line, secret):
    out = Redactor()(line)
    assert secret not in out and MASK in out


@pytest.mark.parametrize("line", [
    "reconnecting platform=qqbot reason=closed detail=closed: socket closed delay_s=0.00",
    "max_tokens=500 tokens_used=12",
    "inbound platform=feishu chat=oc_1 msg=om_2 chars=12",
])
def test_ordinary_lines_are_untouched(line):
    assert Redactor()(line) == line


def test_config_secret_values_are_masked_anywhere():
    cfg = parse_config("agent: {api_key: sk-live-999}\nplatforms:\n"
                       "  wecom: {bot_id: b, secret: w3c0m-secret}\n", env={})
    secrets = config_secrets(cfg)
    assert set(secrets) == {"sk-live-999", "w3c0m-secret"}
    r = Redactor(secrets)
    assert r("url=wss://x?s=w3c0m-secret&k=sk-live-999") == f"url=wss://x?s={MASK}&k={MASK}"


def test_kv_and_json_formats_redact_tracebacks_too():
    for fmt in ("kv", "json"):
        stream = io.StringIO()
        setup_logging("info", fmt, ["hunter2-secret"], stream=stream)
        log = logging.getLogger("hermes_green.test")
        log.info("event key=%s", "value")
        try:
            raise RuntimeError("failed with hunter2-secret inside")
        except RuntimeError:
            log.exception("boom platform=%s", "qqbot")
        for h in logging.getLogger().handlers:
            h.flush()  # lines are written by a background thread
        out = stream.getvalue()
        assert "hunter2-secret" not in out
        lines = out.strip().splitlines()
        assert len(lines) == 2  # one line per event, the traceback folded into it
        if fmt == "json":
            docs = [json.loads(line) for line in lines]
            assert docs[0]["msg"] == "event key=value" and "RuntimeError" in docs[1]["exc"]
        else:
            assert "level=info" in lines[0] and lines[0].endswith("event key=value")
    for h in list(logging.getLogger().handlers):
        logging.getLogger().removeHandler(h)
        h.close()


def test_a_blocked_stderr_never_blocks_the_hub():
    """The writer is stuck (a full pipe nobody reads): logging still returns at once."""
    import gevent
    from gevent import monkey
    from hermes_green.logs import BackgroundStreamHandler

    real_lock = monkey.get_original("_thread", "allocate_lock")()
    real_lock.acquire()

    class StuckStream:
        lines: list = []

        def write(self, text):
            real_lock.acquire(True, 5.0)  # blocks the writer thread, as a full pipe would
            real_lock.release()
            self.lines.append(text)

        def flush(self):
            pass

    stream = StuckStream()
    handler = BackgroundStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("hermes_green.test.stuck")
    log.addHandler(handler)
    log.propagate = False
    try:
        ticks = []
        ticker = gevent.spawn(lambda: [ticks.append(1) or gevent.sleep(0.001) for _ in range(20)])
        for i in range(200):
            log.warning("line %d", i)
        ticker.join(timeout=2)
        assert len(ticks) == 20 and stream.lines == []  # the hub ran on; nothing written yet
        real_lock.release()
        handler.flush()
        assert len(stream.lines) == 200 and stream.lines[0] == "line 0\n"
    finally:
        log.removeHandler(handler)
        handler.close()
