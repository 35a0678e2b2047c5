"""A file the agent sends arrives once on every platform, also when the gateway is killed with
-9 between uploading it and sending it: a real gateway process (bin/hermes-green) on every
platform's strict fake and the fake LLM.

The kill lands between the two steps because each fake holds the request that puts the file
into the chat (after WeCom's, Feishu's and QQ's separate upload was accepted; Telegram and
Discord upload and send in one request) and never processes it. After the restart the outbox
row is still pending: the file is uploaded again and sent, once.
"""
import os
import signal
import sys

import pytest

from hermes_green.testing.fake_llm import text, tool_call
from hermes_green.testing.fleet import FakeFleet, Keepalive
from tests.support import BIN, Process, write_config
from tests.test_media import PLATFORMS

PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(600 * 1024)


def _agent_step(chart: str):
    def respond(body):
        last = body["messages"][-1]
        if last.get("role") == "tool":
            return text("Here is the chart.")
        return tool_call("send_file", path=chart)
    return respond


@pytest.fixture
def fleet():
    f = FakeFleet(PLATFORMS, keepalive=Keepalive(interval_s=1.0, deadline_s=3.0),
                  llm_chunk_delay_s=0.001).start()
    yield f
    for driver in f.drivers.values():
        driver.release_file_sends()
    f.stop()


def test_a_file_sent_by_the_agent_arrives_once_across_a_kill_between_upload_and_send(
        tmp_path, fleet):
    outbound = tmp_path / "outbound"
    outbound.mkdir()
    chart = outbound / "chart.png"
    chart.write_bytes(PNG)
    cfg = write_config(tmp_path / "config.yaml", {
        "gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False}},
        "agent": fleet.agent_config(tools=[], max_retries=0),
        "media": {"outbound_dirs": [str(outbound)]},
        "platforms": fleet.platforms_config(backoff={"initial_s": 0.05, "max_s": 0.5})})
    fleet.llm.script(*[_agent_step(str(chart)) for _ in range(2 * len(PLATFORMS))])
    for driver in fleet.drivers.values():
        driver.hold_file_sends()

    gw = Process([sys.executable, BIN, "--config", str(cfg)])
    try:
        fleet.wait_for(lambda: all(fleet.keepalives(p) >= 1 for p in PLATFORMS), timeout=30)
        mids = {p: fleet.send(p, "send me the chart") for p in PLATFORMS}
        # every platform got the answer and the upload, and holds the file's send
        fleet.wait_for(lambda: all(d.held_file_sends() >= 1 and d.uploads() >= 1
                                   and fleet.answers(p, mids[p])
                                   for p, d in fleet.drivers.items()), timeout=60,
                       what=lambda: {p: (d.uploads(), d.held_file_sends())
                                     for p, d in fleet.drivers.items()})
    finally:
        gw.kill()
    assert all(d.files_sent() == [] for d in fleet.drivers.values())
    for driver in fleet.drivers.values():
        driver.release_file_sends()  # the held requests are dropped: their client is dead

    gw2 = Process([sys.executable, BIN, "--config", str(cfg)])
    try:
        fleet.wait_for(lambda: all(d.files_sent() for d in fleet.drivers.values()), timeout=60,
                       what=lambda: {p: len(d.files_sent()) for p, d in fleet.drivers.items()})
        # let every platform settle: a duplicate would come now (outbox retries run fast)
        seen = {p: fleet.keepalives(p) for p in PLATFORMS}
        fleet.wait_for(lambda: all(fleet.keepalives(p) >= seen[p] + 2 for p in PLATFORMS),
                       timeout=20)
        for platform, driver in fleet.drivers.items():
            [sent] = driver.files_sent()
            assert sent.data == PNG, platform
            assert sent.message_id == mids[platform], platform
            assert fleet.answers(platform, mids[platform]) == ["Here is the chart."], platform
        assert len(fleet.llm.chat_requests) == 2 * len(PLATFORMS)  # no turn ran again
    finally:
        gw2.signal(signal.SIGTERM)
        assert gw2.wait(timeout=60) == 0, gw2.stderr[-3000:]
