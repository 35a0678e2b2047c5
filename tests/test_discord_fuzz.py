"""Fuzz the Discord adapter's frame handling: `on_frame(data)` called directly, with the socket
replaced by a recorder. Whatever arrives, it raises nothing but the base error types, never
hands up a message with a missing field, and never answers its own or another bot's message."""
from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from hermes_green.models import Attachment, InboundMessage
from hermes_green.platforms.base import ConnectionLost, FatalPlatformError
from hermes_green.platforms.discord import DiscordAdapter, DiscordConfig

BOT_ID = "900000000000000001"
EVENTS = ["READY", "RESUMED", "MESSAGE_CREATE", "MESSAGE_UPDATE", "GUILD_CREATE", ""]
OPS = [0, 1, 2, 6, 7, 9, 10, 11, 12, -1, 2 ** 70]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
snowflakes = st.integers(1, 2 ** 63).map(str)
ids = st.one_of(snowflakes, st.integers(-5, 2 ** 64), st.text(max_size=12), json_values)
user = st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "id": st.one_of(ids, st.just(BOT_ID)), "bot": st.one_of(st.booleans(), json_values)}))
attachment = st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "content_type": st.one_of(st.sampled_from(["image/png", "audio/ogg", "video/mp4", ""]),
                              json_values),
    "url": st.one_of(st.sampled_from(["https://cdn.example/a.png", "ftp://x", ""]), json_values),
    "filename": st.one_of(st.text(max_size=10), json_values),
}))
message_data = st.fixed_dictionaries({}, optional={
    "id": ids, "channel_id": ids, "guild_id": ids, "author": user,
    "content": st.one_of(st.text(max_size=40), st.just(f"<@{BOT_ID}> hi"), json_values),
    "mentions": st.one_of(json_values, st.lists(user, max_size=3)),
    "type": st.one_of(st.sampled_from([0, 19, 7, 21]), json_values),
    "webhook_id": st.one_of(st.none(), ids),
    "attachments": st.one_of(json_values, st.lists(attachment, max_size=3)),
    "session_id": st.one_of(st.text(max_size=20), json_values),
    "resume_gateway_url": st.one_of(st.just("wss://resume.example"), json_values),
    "user": st.one_of(json_values, st.fixed_dictionaries({"id": ids})),
    "heartbeat_interval": st.one_of(st.integers(), st.floats(), json_values),
})
frames = st.fixed_dictionaries({}, optional={
    "op": st.one_of(st.sampled_from(OPS), json_values),
    "s": st.one_of(st.integers(min_value=-5, max_value=2 ** 64), json_values),
    "t": st.one_of(st.sampled_from(EVENTS), json_values),
    "d": st.one_of(message_data, json_values),
})
near_valid = st.fixed_dictionaries({
    "op": st.just(0), "s": st.integers(min_value=1, max_value=2 ** 40),
    "t": st.just("MESSAGE_CREATE"), "d": message_data,
})
raw = st.one_of(near_valid.map(json.dumps), near_valid.map(json.dumps), frames.map(json.dumps),
                json_values.map(json.dumps), st.text(max_size=60), st.binary(max_size=60))


class Recorder:
    def __init__(self) -> None:
        self.sent: list = []

    def __call__(self, *data) -> None:
        self.sent.append(data[0] if len(data) == 1 else data)


@pytest.fixture(scope="module")
def adapter():
    delivered: list[InboundMessage] = []
    cfg = DiscordConfig(token=SecretStr("fuzz-token-value"), api_base="http://127.0.0.1:9")
    a = DiscordAdapter(cfg, lambda m: delivered.append(m) or True,
                       logger=logging.getLogger("fuzz.discord"))
    a.log.setLevel(logging.CRITICAL)  # thousands of skip lines are not the point here
    a.send_frame = Recorder()
    a._keep_typing = Recorder()
    a.user_id = BOT_ID
    a.delivered = delivered
    return a


def check_message(msg: InboundMessage) -> None:
    for value in (msg.message_id, msg.chat_id, msg.user_id):
        assert isinstance(value, str) and value.isdigit()
    assert msg.user_id != BOT_ID and isinstance(msg.text, str)
    assert msg.text.strip() or msg.attachments
    assert msg.platform == "discord" and msg.chat_type in ("dm", "group")
    assert msg.reply_ref["message_id"] == msg.message_id
    assert msg.reply_ref["channel_id"] == msg.chat_id
    for a in msg.attachments:
        assert isinstance(a, Attachment) and a.ref.startswith(("https://", "http://"))
        assert a.kind in ("image", "file", "voice", "video", "other")
    assert InboundMessage.from_json(msg.to_json()) == msg


def feed(adapter, data) -> None:
    adapter.user_id = adapter.user_id or BOT_ID  # a fuzzed READY may not change who we are
    try:
        adapter.on_frame(data)
    except (ConnectionLost, FatalPlatformError):
        pass  # the read loop ends the connection on these: allowed
    seq = adapter.seq
    assert seq is None or (isinstance(seq, int) and seq > 0)
    assert json.loads(adapter.heartbeat_frame())["op"] == 1


@settings(max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw)
def test_any_frame_is_handled_or_skipped(adapter, data):
    before = len(adapter.delivered)
    feed(adapter, data)
    for msg in adapter.delivered[before:]:
        check_message(msg)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(guild=st.booleans(), msg_id=snowflakes, author=snowflakes, channel=snowflakes,
       text=st.text(min_size=1, max_size=200).filter(str.strip), seq=st.integers(1, 2 ** 31))
def test_well_formed_messages_are_always_delivered(adapter, guild, msg_id, author, channel,
                                                   text, seq):
    adapter.user_id = BOT_ID
    d = {"id": msg_id, "channel_id": channel, "author": {"id": author}, "content": text,
         "type": 0, "mentions": []}
    if guild:
        d.update(guild_id="800000000000000001", content=f"<@{BOT_ID}> {text}",
                 mentions=[{"id": BOT_ID}])
    before = len(adapter.delivered)
    adapter.on_frame(json.dumps({"op": 0, "s": seq, "t": "MESSAGE_CREATE", "d": d}))
    if author == BOT_ID:
        assert len(adapter.delivered) == before
        return
    [msg] = adapter.delivered[before:]
    check_message(msg)
    assert msg.text == text.strip() and msg.user_id == author and msg.chat_id == channel
    assert msg.chat_type == ("group" if guild else "dm")


def test_pathological_payloads_are_skipped(adapter):
    before = len(adapter.delivered)
    feed(adapter, "[" * 200_000)
    feed(adapter, '{"op": 0, "t": "MESSAGE_CREATE", "d": ' + '{"a":' * 5000 + "1" + "}" * 5001)
    feed(adapter, json.dumps({"op": 0, "t": "MESSAGE_CREATE", "s": 1,
                              "d": {"id": "1", "channel_id": "2", "author": {"id": "3"},
                                    "content": "y" * 5_000_000}}))
    feed(adapter, b"\xff" * 1000)
    assert all(m.text for m in adapter.delivered[before:])


def test_hello_ops_drive_identify_resume_and_invalid_session(adapter):
    """The recorder really sees what the handlers send (the fuzz above is not vacuous)."""
    adapter.session_id = None
    adapter._hello_seen = False
    adapter.send_frame.sent.clear()
    adapter.on_frame(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
    identify = json.loads(adapter.send_frame.sent[-1])
    assert identify["op"] == 2 and identify["d"]["token"] == "fuzz-token-value"
    adapter.on_frame(json.dumps({"op": 0, "s": 1, "t": "READY", "d": {
        "session_id": "S", "resume_gateway_url": "wss://r.example", "user": {"id": BOT_ID}}}))
    assert adapter.session_id == "S" and adapter.seq == 1
    adapter._hello_seen = False
    adapter.on_frame(json.dumps({"op": 10, "d": {"heartbeat_interval": 45000}}))
    assert json.loads(adapter.send_frame.sent[-1]) == {
        "op": 6, "d": {"token": "fuzz-token-value", "session_id": "S", "seq": 1}}
    adapter.on_frame(json.dumps({"op": 1, "d": None}))  # the server asks for a beat
    assert json.loads(adapter.send_frame.sent[-1]) == {"op": 1, "d": 1}
    with pytest.raises(ConnectionLost) as e:
        adapter.on_frame(json.dumps({"op": 9, "d": False}))
    assert not e.value.resume and 1.0 <= e.value.retry_after <= 5.0
    assert adapter.session_id is None and adapter.seq is None
