"""Fuzz the QQ adapter's frame handling: `on_frame(data)` called directly, with the socket
replaced by a recorder. Whatever arrives, it raises nothing but the base error types and never
hands up a message with a missing field."""
from __future__ import annotations

import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hermes_green.platforms.qqbot import QQBotConfig
from hermes_green.models import Attachment, InboundMessage
from hermes_green.platforms.base import ConnectionLost, FatalPlatformError
from hermes_green.platforms.qqbot import QQBotAdapter

EVENTS = ["READY", "RESUMED", "C2C_MESSAGE_CREATE", "GROUP_AT_MESSAGE_CREATE",
          "AT_MESSAGE_CREATE", "DIRECT_MESSAGE_CREATE", "GUILD_CREATE", ""]
OPS = [0, 1, 2, 6, 7, 9, 10, 11, 12, 13, -1, 2 ** 70]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
valid_ids = st.text(alphabet="ABCDEF0123456789_", min_size=1, max_size=16)
ids = st.one_of(valid_ids, st.text(max_size=12), json_values)
attachment = st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "content_type": st.one_of(st.sampled_from(["image/png", "voice", "video/mp4", "file", ""]),
                              json_values),
    "url": st.one_of(st.text(max_size=20), json_values),
    "filename": st.one_of(st.text(max_size=10), json_values),
}))
message_data = st.fixed_dictionaries({}, optional={
    "id": ids, "content": st.one_of(st.text(max_size=40), json_values), "group_openid": ids,
    "session_id": ids, "heartbeat_interval": st.one_of(st.integers(), st.floats(), json_values),
    "author": st.one_of(json_values, st.fixed_dictionaries({}, optional={
        "user_openid": ids, "member_openid": ids})),
    "attachments": st.one_of(json_values, st.lists(attachment, max_size=4)),
})
frames = st.fixed_dictionaries({}, optional={
    "op": st.one_of(st.sampled_from(OPS), json_values),
    "s": st.one_of(st.integers(min_value=-5, max_value=2 ** 64), json_values),
    "t": st.one_of(st.sampled_from(EVENTS), json_values),
    "d": st.one_of(message_data, json_values),
})
# Almost-valid messages: each field is right or wrong on its own, so a check that slips (an id
# of the wrong type, a missing author) shows up as a delivered message with a bad field.
near_valid = st.fixed_dictionaries({
    "op": st.just(0),
    "s": st.integers(min_value=1, max_value=2 ** 40),
    "t": st.sampled_from(["C2C_MESSAGE_CREATE", "GROUP_AT_MESSAGE_CREATE"]),
    "d": st.fixed_dictionaries({
        "id": ids, "content": st.one_of(st.text(max_size=20), json_values),
        "group_openid": ids,
        "author": st.one_of(json_values, st.fixed_dictionaries({
            "user_openid": ids, "member_openid": ids})),
    }, optional={"attachments": st.one_of(json_values, st.lists(attachment, max_size=3))}),
})
raw = st.one_of(
    near_valid.map(json.dumps),
    near_valid.map(json.dumps),
    frames.map(json.dumps),
    json_values.map(json.dumps),
    st.text(max_size=60),
    st.binary(max_size=60),
    st.binary(max_size=60).map(lambda b: b.decode("latin-1")),
)


class Recorder:
    def __init__(self) -> None:
        self.sent: list = []

    def __call__(self, data) -> None:
        self.sent.append(data)


@pytest.fixture(scope="module")
def adapter():
    delivered: list[InboundMessage] = []
    cfg = QQBotConfig(app_id="1", client_secret="s3cret-value", api_base="http://127.0.0.1:9",
                      token_url="http://127.0.0.1:9/token")
    a = QQBotAdapter(cfg, lambda m: delivered.append(m) or True,
                     logger=logging.getLogger("fuzz.qqbot"))
    a.log.setLevel(logging.CRITICAL)  # thousands of skip lines are not the point here
    a.send_frame = Recorder()
    a.start_heartbeat = Recorder()
    a.token.get = lambda: "fuzz-token"
    a.delivered = delivered
    return a


def check_message(msg: InboundMessage) -> None:
    for value in (msg.message_id, msg.chat_id, msg.user_id):
        assert isinstance(value, str) and value.strip()
    assert isinstance(msg.text, str) and (msg.text.strip() or msg.attachments)
    assert msg.platform == "qqbot" and msg.chat_type in ("dm", "group")
    assert msg.reply_ref["msg_id"] == msg.message_id and msg.reply_ref["openid"] == msg.chat_id
    assert msg.reply_ref["kind"] == ("c2c" if msg.chat_type == "dm" else "group")
    for a in msg.attachments:
        assert isinstance(a, Attachment) and isinstance(a.ref, str) and a.ref
        assert a.kind in ("image", "file", "voice", "video", "other")
        assert a.name is None or isinstance(a.name, str)
    assert InboundMessage.from_json(msg.to_json()) == msg


def feed(adapter, data) -> None:
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


openids = st.text(alphabet="ABCDEF0123456789", min_size=1, max_size=32)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(kind=st.sampled_from(["c2c", "group"]), msg_id=openids, user=openids, group=openids,
       text=st.text(min_size=1, max_size=200).filter(str.strip), seq=st.integers(1, 2 ** 31))
def test_well_formed_messages_are_always_delivered(adapter, kind, msg_id, user, group, text, seq):
    if kind == "c2c":
        frame = {"op": 0, "s": seq, "t": "C2C_MESSAGE_CREATE",
                 "d": {"id": msg_id, "content": text, "author": {"user_openid": user}}}
    else:
        frame = {"op": 0, "s": seq, "t": "GROUP_AT_MESSAGE_CREATE",
                 "d": {"id": msg_id, "content": " " + text, "group_openid": group,
                       "author": {"member_openid": user}}}
    before = len(adapter.delivered)
    adapter.on_frame(json.dumps(frame))
    [msg] = adapter.delivered[before:]
    check_message(msg)
    assert msg.text == text.strip() and msg.user_id == user
    assert msg.chat_id == (user if kind == "c2c" else group)


def test_pathological_payloads_are_skipped(adapter):
    before = len(adapter.delivered)
    feed(adapter, "[" * 200_000)  # deep nesting: RecursionError inside json
    feed(adapter, '{"op": 0, "t": "C2C_MESSAGE_CREATE", "d": ' + '{"a":' * 5000 + "1"
         + "}" * 5001)
    feed(adapter, json.dumps({"op": 0, "t": "C2C_MESSAGE_CREATE", "s": 1,
                              "d": {"id": "x", "author": {"user_openid": "u"},
                                    "content": "y" * 5_000_000}}))
    feed(adapter, b"\xff" * 1000)
    assert all(m.text or m.attachments for m in adapter.delivered[before:])


def test_hello_ops_drive_identify_resume_and_heartbeats(adapter):
    """The recorder really sees what the handlers send (the fuzz above is not vacuous)."""
    adapter.session_id = None
    adapter._hello_seen = False
    adapter.send_frame.sent.clear()
    adapter.on_frame(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
    assert adapter.start_heartbeat.sent[-1] == pytest.approx(41.25)
    identify = json.loads(adapter.send_frame.sent[-1])
    assert identify["op"] == 2 and identify["d"]["token"] == "QQBot fuzz-token"
    adapter.on_frame(json.dumps({"op": 0, "s": 1, "t": "READY", "d": {"session_id": "S"}}))
    assert adapter.session_id == "S" and adapter.seq == 1
    adapter._hello_seen = False
    adapter.on_frame(json.dumps({"op": 10, "d": {"heartbeat_interval": 1}}))
    assert adapter.start_heartbeat.sent[-1] == pytest.approx(0.05)  # clamped
    assert json.loads(adapter.send_frame.sent[-1]) == {
        "op": 6, "d": {"token": "QQBot fuzz-token", "session_id": "S", "seq": 1}}
    with pytest.raises(ConnectionLost):
        adapter.on_frame(json.dumps({"op": 9, "d": False}))
    assert adapter.session_id is None
