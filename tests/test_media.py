"""Rich messages on every platform whose fake serves real media, through a real gateway (in
process): the platform's fake -> adapter -> journal -> media download (WeCom: encrypted) ->
turn -> fake LLM (vision and transcription on) -> outbox -> the fake.

Each platform's Driver (testing/driver.py) speaks for its users (`user_sends_media`) and reads
back what the fake accepted (`files_sent`), so these tests never branch on a platform's name;
a platform added later (Slack, DingTalk) runs them once its driver implements those calls.
"""
import os

import pytest

from hermes_green.config import Config
from hermes_green.gateway import Gateway
from hermes_green.testing.driver import Keepalive, driver_class, platforms_with_drivers
from hermes_green.testing.fake_llm import FakeLLM, text, tool_call
from tests.support import wait_until


def _media_platforms() -> list[str]:
    found = []
    for name in platforms_with_drivers():
        cls = driver_class(name)
        if getattr(cls, "user_sends_media") is not getattr(
                __import__("hermes_green.testing.driver", fromlist=["PlatformDriver"])
                .PlatformDriver, "user_sends_media"):
            found.append(name)
    return found


PLATFORMS = _media_platforms()
PNG = b"\x89PNG\r\n\x1a\n" + os.urandom(3000)  # the signature is what the sniffer checks
MB = 1024 * 1024


@pytest.fixture
def llm():
    f = FakeLLM(api_key="sk-media", chunk_delay_s=0.001).start()
    yield f
    f.stop()


@pytest.fixture
def rig(tmp_path, llm, request):
    platform = request.param
    driver = driver_class(platform)(Keepalive(interval_s=1.0, deadline_s=3.0)).start()
    outbound = tmp_path / "outbound"
    outbound.mkdir()
    config = Config.model_validate({
        "gateway": {"data_dir": str(tmp_path / "data"), "status": {"enabled": False}},
        "agent": {"base_url": llm.base_url, "api_key": "sk-media", "model": "fake-model",
                  "tools": [], "max_retries": 0, "vision": True, "transcribe": {}},
        "media": {"outbound_dirs": [str(outbound)], "wait_s": 20},
        "platforms": {platform: driver.bot_config(backoff={"initial_s": 0.05, "max_s": 0.5})}})
    gw = Gateway(config).start()
    wait_until(lambda: platform in gw.adapters and gw.adapters[platform].ready.is_set(),
               timeout=15, what=f"{platform} ready")

    class Rig:
        pass
    r = Rig()
    r.platform, r.driver, r.gw, r.llm, r.outbound = platform, driver, gw, llm, outbound
    yield r
    gw.shutdown()
    driver.stop()


def answered(rig, mid: str, timeout: float = 20.0) -> list[str]:
    """The final answer to `mid` (progress edits may show parts of it earlier)."""
    rig.driver.fake.wait_for(lambda: rig.driver.answers(mid), timeout=timeout)
    assert rig.gw.wait_idle(timeout)
    return rig.driver.answers(mid)


@pytest.mark.parametrize("rig", PLATFORMS, indirect=True)
def test_an_image_reaches_the_model_as_an_image_url_part_with_its_bytes(rig):
    mid = rig.driver.user_sends_media(PNG, kind="image", name="cat.png", mime="image/png")
    answers = answered(rig, mid)
    [request] = [r for r in rig.llm.chat_requests if "image" in FakeLLM.user_text(r)]
    assert FakeLLM.images(request) == [("image/png", PNG)]
    assert "I see 1 image" in answers[0]
    # and the journal row refers to the stored file
    [stored] = rig.gw.store.pending_inbound() or [None]  # answered: not pending any more
    assert stored is None
    files = os.listdir(rig.gw.media.in_dir)
    assert len(files) == 1 and open(rig.gw.media.in_dir / files[0], "rb").read() == PNG


@pytest.mark.parametrize("rig", PLATFORMS, indirect=True)
def test_a_50_mb_file_is_refused_with_a_note_the_model_reads(rig):
    big = os.urandom(50 * MB)
    mid = rig.driver.user_sends_media(big, kind="file", name="big.bin",
                                      mime="application/octet-stream")
    answered(rig, mid)
    said = FakeLLM.user_text(rig.llm.chat_requests[-1])
    assert "not received" in said and ("20 MB" in said or "limit" in said), said
    assert os.listdir(rig.gw.media.in_dir) == []  # nothing of it was kept


@pytest.mark.parametrize("rig", PLATFORMS, indirect=True)
def test_a_voice_message_reaches_the_model_as_text(rig):
    spoken = "please water the plants on tuesday"
    mid = rig.driver.user_sends_media(b"SPEECH:" + spoken.encode(), kind="voice",
                                      name="voice.ogg", mime="audio/ogg", transcript=spoken)
    answered(rig, mid)
    said = FakeLLM.user_text(rig.llm.chat_requests[-1])
    assert f"transcript: {spoken}" in said, said
    # the platform's own transcript where it sends one; else the transcription endpoint
    assert bool(rig.llm.transcriptions) is not rig.driver.transcribes_voice


@pytest.mark.parametrize("rig", PLATFORMS, indirect=True)
def test_a_file_the_agent_sends_arrives_once_after_the_answer(rig):
    chart = rig.outbound / "chart.png"
    chart.write_bytes(PNG + os.urandom(700 * 1024))  # two chunks of WeCom's upload
    rig.llm.script(tool_call("send_file", path=str(chart)), text("Here is the chart."))
    mid = rig.driver.user_says("send me the chart")
    rig.driver.fake.wait_for(lambda: rig.driver.files_sent(), timeout=20)
    wait_until(lambda: rig.gw.store.outbox_pending() == 0, timeout=10, what="outbox empty")
    [sent] = rig.driver.files_sent()
    assert sent.data == chart.read_bytes() and sent.media == "image"
    assert sent.name in ("chart.png", "")  # QQ's rich media carries no name
    assert sent.message_id == mid
    assert rig.driver.answers(mid) == ["Here is the chart."]


@pytest.mark.parametrize("rig", PLATFORMS, indirect=True)
def test_send_file_refuses_paths_outside_the_allowed_directories(rig, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the chat")
    rig.llm.script(tool_call("send_file", path=str(secret)), text("I could not send it."))
    mid = rig.driver.user_says("send me the secret")
    answered(rig, mid)
    tool_result = [m["content"] for m in rig.llm.chat_requests[-1].body["messages"]
                   if m.get("role") == "tool"]
    assert tool_result and "outside the directories" in tool_result[0]
    assert rig.driver.files_sent() == []
