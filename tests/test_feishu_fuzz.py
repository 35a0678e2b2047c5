"""Fuzzing the Feishu adapter's frame handling: `on_frame()` is called directly (no socket) with
`send_frame` replaced by a recorder. Whatever arrives, it never raises (anything but the base
error types), never delivers a message with a missing field, and every frame it sends back is a
well-formed ack."""
import json
import logging
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr

from hermes_green.platforms.feishu import FeishuConfig
from hermes_green.models import Attachment, InboundMessage
from hermes_green.platforms.base import PlatformError
from hermes_green.platforms.feishu import FeishuAdapter, Frame, PartJoiner

BOT = "ou_bot"
SECRET = "fuzz-secret-never-logged"
FUZZ = settings(max_examples=2000, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


class Harness:
    """One adapter, offline: frames in through on_frame(), acks and deliveries recorded."""

    def __init__(self) -> None:
        self.log = logging.getLogger("tests.fuzz.feishu")
        self.log.propagate = False
        self.log.setLevel(logging.DEBUG)
        self.lines = _Lines()
        self.log.handlers[:] = [self.lines]
        config = FeishuConfig(app_id="cli_fuzz", app_secret=SecretStr(SECRET),
                              domain="http://127.0.0.1:9")
        self.delivered: list[InboundMessage] = []
        self.adapter = FeishuAdapter(config, self._on_message, logger=self.log)
        self.adapter.bot_open_id = BOT
        self.adapter.service_id = 7
        self.sent: list[bytes] = []
        self.adapter.send_frame = self.sent.append

    def _on_message(self, msg: InboundMessage) -> bool:
        self.delivered.append(msg)
        return True

    def feed(self, data) -> tuple[int, int]:
        """One frame in; returns (messages delivered, acks sent) after checking them."""
        try:
            self.adapter.on_frame(data)
        except PlatformError:
            pass  # the base types are allowed: the read loop knows what to do with them
        counts = len(self.delivered), len(self.sent)
        self.check()
        return counts

    def check(self) -> None:
        for msg in self.delivered:
            for name in ("message_id", "chat_id", "user_id"):
                value = getattr(msg, name)
                assert isinstance(value, str) and value.strip(), (name, msg)
            # Attachments carry no placeholder text here (the gateway adds it): one of the two.
            assert isinstance(msg.text, str) and (msg.text.strip() or msg.attachments), msg
            assert msg.platform == "feishu" and msg.chat_type in ("dm", "group")
            assert msg.reply_ref["message_id"] == msg.message_id
            for att in msg.attachments:
                assert isinstance(att, Attachment) and att.kind
                assert isinstance(att.ref, str) and att.ref
            assert InboundMessage.from_json(msg.to_json()) == msg
        for raw in self.sent:
            ack = Frame()
            ack.ParseFromString(raw)
            headers = {h.key: h.value for h in ack.headers}
            assert ack.method == 1 and headers["biz_rt"].isdigit()
            assert json.loads(ack.payload) == {"code": 200}
        for line in self.lines.lines:
            assert SECRET not in line
        self.delivered.clear()
        self.sent.clear()
        self.lines.lines.clear()


@pytest.fixture(scope="module")
def harness():
    return Harness()


# --- strategies (built once: hypothesis re-validates strategies built inside a draw) --------

junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
                    | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                    max_leaves=6)
ids = st.text(alphabet="abcdefghijklmnop0123456789_", min_size=0, max_size=12)
DELETE = object()


def _content(message_type: str, text: str, key: str) -> dict:
    return {"text": {"text": text}, "image": {"image_key": key},
            "file": {"file_key": key, "file_name": text}, "audio": {"file_key": key},
            "media": {"file_key": key, "file_name": text}, "sticker": {"file_key": key},
            "post": {"title": text, "content": [[{"tag": "text", "text": text},
                                                 {"tag": "img", "image_key": key},
                                                 {"tag": "at", "user_id": "@_user_1"}]]},
            }.get(message_type, {"whatever": text})


def _envelope(message_type, text, key, chat_type, mentioned, message_id, sender):
    mentions = ([{"key": "@_user_1", "id": {"open_id": mentioned}, "name": "n"}]
                if mentioned else None)
    return {"schema": "2.0",
            "header": {"event_id": "ev", "event_type": "im.message.receive_v1"},
            "event": {"sender": {"sender_id": {"open_id": sender}},
                      "message": {"message_id": message_id, "chat_id": "oc_" + key,
                                  "chat_type": chat_type, "message_type": message_type,
                                  "content": json.dumps(_content(message_type, text, key)),
                                  "mentions": mentions}}}


valid_envelopes = st.builds(
    _envelope,
    message_type=st.sampled_from(["text", "text", "post", "image", "file", "audio", "media",
                                  "sticker", "interactive", "share_chat", "", "???"]),
    text=st.text(max_size=30), key=ids,
    chat_type=st.sampled_from(["p2p", "p2p", "group", "topic"]),
    mentioned=st.sampled_from([None, BOT, BOT, "ou_x"]),
    message_id=st.sampled_from(["om_1", "om_2", "om_3", "om_4", ""]),
    sender=st.sampled_from(["ou_u", "ou_u", "ou_u", BOT, ""]))

PATHS = [("header",), ("header", "event_type"), ("event",), ("event", "sender"),
         ("event", "sender", "sender_id"), ("event", "sender", "sender_id", "open_id"),
         ("event", "message"), ("event", "message", "message_id"),
         ("event", "message", "chat_id"), ("event", "message", "chat_type"),
         ("event", "message", "message_type"), ("event", "message", "content"),
         ("event", "message", "mentions"), ("event", "message", "mentions", 0),
         ("event", "message", "mentions", 0, "key"), ("event", "message", "mentions", 0, "id")]
mutations = st.lists(st.tuples(st.sampled_from(PATHS),
                               st.one_of(st.just(DELETE), junk, junk.map(json.dumps))), max_size=2)


def _mutate(envelope: dict, changes) -> dict:
    for path, value in changes:
        node = envelope
        for step in path[:-1]:
            try:
                node = node[step]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        if not isinstance(node, (dict, list)):
            continue
        try:
            if value is DELETE:
                del node[path[-1]]
            else:
                node[path[-1]] = value
        except (KeyError, IndexError, TypeError):
            pass
    return envelope


envelopes = st.builds(_mutate, valid_envelopes, mutations)
payloads = st.one_of(envelopes.map(lambda e: json.dumps(e).encode()),
                     envelopes.map(lambda e: json.dumps(e).encode()),
                     st.fixed_dictionaries({"PingInterval": junk}).map(
                         lambda c: json.dumps(c).encode()),
                     st.binary(max_size=64))
any_header = st.tuples(st.sampled_from(["type", "message_id", "sum", "seq", "trace_id", "biz_rt",
                                        "x"]),
                       st.one_of(st.sampled_from(["event", "card", "ping", "pong", "1", "2", "0",
                                                  "-1", "99999999999999999999", "m1", ""]),
                                 st.text(max_size=8)))
random_headers = st.lists(any_header, max_size=6)
shaped_headers = st.builds(
    lambda kind, mid, total, seq: [("type", kind), ("message_id", mid), ("sum", total),
                                   ("seq", seq), ("trace_id", "t")],
    st.sampled_from(["event", "event", "event", "card", "pong", "ping", "?"]), ids,
    st.sampled_from(["1", "1", "1", "1", "2", "3", "0", "x"]),
    st.sampled_from(["0", "0", "1", "5"]))
methods = st.one_of(st.just(1), st.just(1), st.just(1), st.just(0), st.integers(-2**31, 2**31 - 1))


def _frame(method, headers, payload, seq_id, service) -> bytes:
    frame = Frame(SeqID=seq_id, LogID=0, service=service, method=method, payload=payload)
    for key, value in headers:
        frame.headers.add(key=key, value=value)
    return frame.SerializeToString()


event_headers = st.builds(lambda mid: [("type", "event"), ("message_id", mid), ("sum", "1"),
                                        ("seq", "0"), ("trace_id", "t")], ids)
event_frames = st.builds(_frame, st.just(1), event_headers,
                         envelopes.map(lambda e: json.dumps(e).encode()),
                         st.integers(0, 2**64 - 1), st.just(7))
any_frames = st.builds(_frame, methods, st.one_of(shaped_headers, random_headers),
                       payloads, st.integers(0, 2**64 - 1), st.integers(-2**31, 2**31 - 1))
frames = st.one_of(event_frames, event_frames, any_frames)  # most reach the event parser
STATS = {"frames": 0, "delivered": 0, "acks": 0}


# --- the fuzz tests -------------------------------------------------------------------------

@FUZZ
@given(frames)
def test_fuzzed_frames_never_crash_nor_deliver_a_broken_message(harness, data):
    delivered, acks = harness.feed(data)
    STATS["frames"] += 1
    STATS["delivered"] += delivered
    STATS["acks"] += acks


def test_the_fuzzing_reached_delivery_and_acks():
    """Runs after the fuzz test: a fuzz that never got a message through proves little."""
    if STATS["frames"] < 1000:
        pytest.skip("run together with the fuzz test")
    assert STATS["delivered"] > STATS["frames"] // 50 and STATS["acks"] > STATS["frames"] // 10


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=256))
def test_random_bytes_are_skipped(harness, data):
    harness.feed(data)
    assert not harness.sent


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=64))
def test_text_frames_are_skipped(harness, data):
    harness.feed(data)
    assert not harness.sent


def _event(message_id: str, text: str) -> bytes:
    return json.dumps({
        "schema": "2.0", "header": {"event_id": "e", "event_type": "im.message.receive_v1"},
        "event": {"sender": {"sender_id": {"open_id": "ou_u"}},
                  "message": {"message_id": message_id, "chat_id": "oc_1", "chat_type": "p2p",
                              "message_type": "text", "content": json.dumps({"text": text})}},
    }).encode()


def _parts(frame_msg_id: str, payload: bytes, n: int) -> list[bytes]:
    size = -(-len(payload) // n)
    out = []
    for i in range(n):
        chunk = payload[i * size:(i + 1) * size]
        frame = Frame(SeqID=i, LogID=0, service=7, method=1, payload=chunk)
        for k, v in (("type", "event"), ("message_id", frame_msg_id), ("sum", str(n)),
                     ("seq", str(i)), ("trace_id", "t")):
            frame.headers.add(key=k, value=v)
        out.append(frame.SerializeToString())
    return out


@settings(max_examples=300, deadline=None)
@given(st.integers(2, 8), st.integers(2, 8), st.randoms(use_true_random=False),
       st.text(min_size=1, max_size=200).filter(str.strip))
def test_interleaved_split_payloads_each_deliver_once_with_one_ack(harness, n1, n2, rnd, text):
    a = _parts("fm_a", _event("om_a", text), n1)
    b = _parts("fm_b", _event("om_b", "other"), n2)
    rnd.shuffle(a)
    rnd.shuffle(b)
    merged = [a.pop() if (a and (not b or rnd.random() < 0.5)) else b.pop() for _ in range(n1 + n2)]
    delivered, acks = [], 0
    for frame in merged:
        harness.adapter.on_frame(frame)
        delivered += [(m.message_id, m.text) for m in harness.delivered]
        acks += len(harness.sent)
        harness.check()
    assert sorted(delivered) == sorted([("om_a", " ".join(text.split())), ("om_b", "other")])
    assert acks == 2


@settings(max_examples=500, deadline=None)
@given(st.binary(min_size=2, max_size=300), st.integers(2, 10), st.randoms(use_true_random=False))
def test_part_joiner_joins_any_order_and_forgets_stale_parts(data, n, rnd):
    now = [0.0]
    joiner = PartJoiner(5.0, clock=lambda: now[0])
    n = min(n, len(data))
    size = -(-len(data) // n)
    chunks = [data[i * size:(i + 1) * size] for i in range(n)]
    order = list(range(n))
    rnd.shuffle(order)
    results = [joiner.add("m", n, i, chunks[i]) for i in order]
    assert results[:-1] == [None] * (n - 1) and results[-1] == data and len(joiner) == 0
    assert joiner.add("m", n, order[0], chunks[order[0]]) is None  # a new, incomplete message
    now[0] += 5.1
    rest = [joiner.add("m", n, i, chunks[i]) for i in order[1:]]
    assert rest[-1] is None  # the first part expired: incomplete, never a wrong join


def test_part_joiner_bounds_memory():
    joiner = PartJoiner(5.0, max_pending=4, max_bytes=100)
    for i in range(10):
        joiner.add(f"m{i}", 2, 0, b"x")
    assert len(joiner) == 4
    with pytest.raises(ValueError):
        joiner.add("big", 2, 0, b"x" * 101)
    for bad in ((1, 0), (2, 2), (2, -1), (10_000, 0)):
        with pytest.raises(ValueError):
            joiner.add("m", *bad, b"x")


def test_a_five_megabyte_payload_in_a_frame_is_skipped_unharmed(harness):
    frame = Frame(SeqID=1, LogID=0, service=7, method=1, payload=random.randbytes(5 << 20))
    for k, v in (("type", "event"), ("message_id", "fm_big"), ("sum", "1"), ("seq", "0")):
        frame.headers.add(key=k, value=v)
    harness.feed(frame.SerializeToString())  # (the read loop already skips frames over 1 MB)
    assert not harness.delivered


@pytest.mark.parametrize("payload", [
    b'{"PingInterval": NaN}', b'{"PingInterval": Infinity}', b'{"PingInterval": -1}',
    b'{"PingInterval": 1' + b'0' * 400 + b'}', b'[' * 100_000 + b']' * 100_000,
    b'{"header": {"event_type": "im.message.receive_v1"}, "event": '
    + b'[' * 100_000 + b']' * 100_000 + b'}',
])
def test_hostile_json_in_pongs_and_events_is_skipped(harness, payload):
    interval = harness.adapter.heartbeat_interval_s
    for method, kind in ((0, "pong"), (1, "event")):
        frame = Frame(SeqID=0, LogID=0, service=7, method=method, payload=payload)
        for k, v in (("type", kind), ("message_id", "fm_h"), ("sum", "1"), ("seq", "0")):
            frame.headers.add(key=k, value=v)
        harness.feed(frame.SerializeToString())
    assert harness.adapter.heartbeat_interval_s in (interval, 0.05)  # -1: clamped, never < 0.05
