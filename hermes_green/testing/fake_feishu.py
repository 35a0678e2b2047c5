"""A strict fake of Feishu's long connection and the REST calls the adapter makes.

What it enforces, as the real server does (shared/PROTOCOLS.md, "Feishu"):
- credentials on `POST /callback/ws/endpoint` and on the tenant token; every other REST call needs
  a live `Authorization: Bearer <tenant token>` (expired or revoked -> code 99991663);
- the WebSocket handshake needs a ticket issued by the endpoint call (single use) and fits under
  `max_conns`; refusals come as HTTP headers Handshake-Status / -Msg / -Autherrcode;
- keepalive: one ping within `keepalive_deadline_s` of the previous one (default: 2.5 x the
  PingInterval this connection was last told, so a client that ignores a new ClientConfig from a
  pong is dropped); the first within the same deadline of the upgrade, unless tests set a
  stricter `first_ping_deadline_s` (the official client may first ping a reconnected socket a
  whole PingInterval after it opened: see `on_connect`); pings must be control frames for our
  service_id with header `type: ping`;
- ClientConfig values are integers of seconds, as the real ones are (sub-second intervals exist
  only so that tests run fast; they go out as they are given);
- every event must be acked (the same frame: all its headers, plus `biz_rt`, payload exactly
  {"code": 200}) within `ack_deadline_s`, or it is delivered again (fresh frame message_id, same
  event), up to `redeliver_limit` more times; events wait for a connection when none is up;
- `split_parts` > 1 splits each payload over that many frames (`sum`/`seq`), `shuffle_parts`
  sends them out of order;
- replies honour `uuid`: one uuid makes at most one message (Feishu: within an hour);
- `session_max_s`: connections are ended after that long (seen in the wild: ~19-29 min).

Public API for tests, the demo and benchmarks:
    fake = FakeFeishuServer(ping_interval_s=0.25, ack_deadline_s=0.5).start()
    config domain = fake.http_base
    om_id = fake.send_user_message("hi", chat_type="p2p"|"group", open_id=..., chat_id=...,
                                   mention_bot=True, message_type="text"|"image"|"file"|...)
    fake.replies                 [Reply(message_id, text, uuid, chat_id, at, reply_id)]
    fake.replies_to(om_id)
    fake.deliveries              [Delivery(message_id, event_id, frame_msg_id, conn_id, sent_at,
                                           acked_at)]  one per push of an event to a connection
    fake.ack_times[om_id]        receipt times (monotonic) of valid acks
    fake.ack_latencies()         acked_at - sent_at per acked delivery
    fake.keepalive_times[conn_id]  receipt times of valid pings; keepalive_gaps(conn_id)
    fake.frames / frames_in()    every frame, decoded to WireFrame (harness FrameRecord.data)
    fake.protocol_errors         [(at, what, conn_id)] bad pings/acks the fake refused
Media (im/v1 message resources, images, files; CardKit v1):
    fake.send_user_media(data, message_type="image"|"file"|"audio", ...)  the resource is then
        served by GET /open-apis/im/v1/messages/{om}/resources/{key}?type=image|file with a
        live tenant token, to the message that carries it, with the matching type
    uploads: POST /open-apis/im/v1/images (multipart image_type, image <= 10 MB) and /files
        (file_type, file_name, file <= 30 MB) issue keys; a reply with msg_type image|file must
        name a key issued to this app. fake.files records each file shown.
    cards: POST /open-apis/cardkit/v1/cards (card_json, schema 2.0, elements with unique
        element_id) -> card_id; a card is sent once (msg_type interactive); PUT
        .../elements/{id}/content needs streaming_mode on (300309) and a sequence above every
        earlier one on that card (300317); PATCH .../settings applies config.streaming_mode.
        fake.cards[card_id] keeps every operation; the reply showing a card reads its text.
    hold_file_sends()/release_file_sends(): image/file replies held unprocessed.
Faults: the harness's drop(), close_with(code), send_garbage(data), rest_delay_s, rest_429(n, s);
go_silent(s) makes the current connections zombies (they swallow everything, enforce nothing;
new connections work); reject_handshakes(n, status, autherrcode), fail_endpoint(n, code, status),
lose_acks(n), truncate_next(), invalidate_tokens(), redeliver(om_id).
"""
from __future__ import annotations

import json
import random
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs

import gevent
import gevent.event
import gevent.pool

from hermes_green.platforms.feishu import load_frame_class
from .driver import Keepalive, PlatformDriver, ReplyRow, SentFile
from .harness import Conn, FakePlatformServer, parse_multipart

Frame = load_frame_class()

CONTROL, DATA = 0, 1
INVALID_TOKEN = 99991663
IMAGE_LIMIT = 10 * 1024 * 1024
FILE_LIMIT = 30 * 1024 * 1024
FILE_TYPES = {"opus", "mp4", "pdf", "doc", "xls", "ppt", "stream"}
# CardKit error codes (cardkit-v1 card-element/content "错误码")
CARD_NOT_FOUND, CARD_STREAMING_CLOSED, CARD_NOT_TEXT, CARD_SEQUENCE = 200740, 300309, 300310, 300317
CODE_PARAM = 10002
# The fake's own codes where the docs name none we could find (*unverified*)
CODE_NOT_IN_MESSAGE = 234003
CODE_TOO_LARGE = 234006
CODE_CARD_SENT = 230099


@dataclass
class FakeCard:
    card_id: str
    card: dict
    streaming: bool
    elements: dict  # element_id -> {"tag", "content"}
    last_sequence: int = 0
    ops: list = field(default_factory=list)  # (kind, sequence, value) in arrival order
    reply: "Reply | None" = None

    def text(self, element_id: str) -> str:
        return self.elements.get(element_id, {}).get("content", "")


@dataclass
class WireFrame:
    """One protobuf frame as the record keeps it."""
    method: int
    service: int
    seq_id: int
    headers: dict[str, str]
    payload: bytes

    @property
    def type(self) -> str | None:
        return self.headers.get("type")

    def json(self) -> Any:
        return json.loads(self.payload)


@dataclass
class Reply:
    message_id: str | None  # the inbound message answered (None: a plain send to a chat)
    text: str  # for a card: its text now (kept current by every content update)
    uuid: str | None
    chat_id: str
    at: float
    reply_id: str
    card_id: str | None = None


@dataclass
class Delivery:
    message_id: str  # the IM message (om_...) the event carries; "" for other events
    event_id: str
    frame_msg_id: str  # frame header message_id of this push
    conn_id: int
    sent_at: float
    headers: list[dict[str, str]] = field(default_factory=list)  # one per part sent
    acked_at: float | None = None
    lost: bool = False  # swallowed by a zombie connection or a failed send


@dataclass
class PendingEvent:
    envelope: dict
    kind: str
    message_id: str
    event_id: str
    acked: gevent.event.Event = field(default_factory=gevent.event.Event)
    attempts: int = 0


def _seconds(value: float) -> int | float:
    """Whole seconds as an int (what the server sends); a test's sub-second value as it is."""
    return int(value) if float(value).is_integer() else value


def _wire(frame) -> WireFrame:
    return WireFrame(frame.method, frame.service, frame.SeqID,
                     {h.key: h.value for h in frame.headers}, bytes(frame.payload))


class FakeFeishuServer(FakePlatformServer):
    json_frames = False
    ws_path = "/ws"

    def __init__(self, app_id: str = "cli_fake", app_secret: str = "fake-app-secret", *,
                 ping_interval_s: float = 120.0, keepalive_deadline_s: float | None = None,
                 first_ping_deadline_s: float | None = None, ack_deadline_s: float = 3.0,
                 redeliver_limit: int = 3, split_parts: int = 1, shuffle_parts: bool = False,
                 pong_client_config: dict | None = None, token_expire_s: float = 7200,
                 bot_open_id: str = "ou_bot", max_conns: int = 50,
                 service_id: int = 33554678, session_max_s: float | None = None) -> None:
        super().__init__()
        self.app_id, self.app_secret = app_id, app_secret
        self.ping_interval_s = ping_interval_s
        self.keepalive_deadline_s = keepalive_deadline_s
        self.first_ping_deadline_s = first_ping_deadline_s
        self.ack_deadline_s = ack_deadline_s
        self.redeliver_limit = redeliver_limit
        self.split_parts, self.shuffle_parts = split_parts, shuffle_parts
        self.pong_client_config = pong_client_config
        self.token_expire_s = token_expire_s
        self.bot_open_id = bot_open_id
        self.max_conns = max_conns
        self.service_id = service_id
        self.session_max_s = session_max_s  # the real server ends sessions after ~19-29 min
        # records
        self.replies: list[Reply] = []
        self.deliveries: list[Delivery] = []
        self.ack_times: dict[str, list[float]] = {}
        self.keepalive_times: dict[int, list[float]] = {}
        self.protocol_errors: list[tuple[float, str, int]] = []
        self.undelivered: list[PendingEvent] = []
        self.handshake_rejections: list[tuple[float, str, str]] = []
        self.messages: dict[str, dict] = {}  # om_id -> the inbound message (replies need one)
        self.issued_tokens: list[str] = []  # so tests can assert none of them is ever logged
        # media
        self.resources: dict[tuple[str, str], tuple[bytes, str, str]] = {}  # (om, key) ->
        #   (data, "image"|"file", content type)
        self.uploaded: dict[str, tuple[str, str, bytes]] = {}  # key -> (kind, name, data)
        self.files: list[SentFile] = []
        self.cards: dict[str, FakeCard] = {}
        self.cards_refused = False
        self.held_sends = 0
        self._release = gevent.event.Event()
        self._release.set()
        # state
        self._tickets: set[str] = set()
        self._tokens: dict[str, float] = {}
        self._uuids: dict[str, Reply] = {}
        self._by_frame_msg: dict[str, tuple[PendingEvent, Delivery]] = {}
        self._rejects: list[tuple[str, str, str]] = []
        self._endpoint_faults: list[tuple[int, int]] = []
        self._handshake_answers: dict[str, tuple[str, str, str]] = {}
        self._lose_acks = 0
        self._truncate_next = 0
        self._seq = 0
        self._pushers = gevent.pool.Group()
        self._conn_up = gevent.event.Event()

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> "FakeFeishuServer":
        super().start()
        self._server.pre_start_hook = self._check_handshake  # runs before the upgrade
        return self

    def stop(self) -> None:
        self._pushers.kill(block=True, timeout=2)
        super().stop()

    # -- test-facing helpers -----------------------------------------------------------------
    def client_config(self) -> dict:
        """As the endpoint and every pong send it: integers of seconds (lark-oapi
        ws/model.py ClientConfig declares them int; ws/client.py starts `_ping_interval` at 120).
        A whole-second float (the default 120.0) goes out as 120, never as 120.0."""
        return {"PingInterval": _seconds(self.ping_interval_s), "ReconnectCount": -1,
                "ReconnectInterval": 120, "ReconnectNonce": 30}

    def send_user_message(self, text: str = "hello", *, chat_type: str = "p2p",
                          open_id: str = "ou_user", chat_id: str | None = None,
                          mention_bot: bool = False, mentions: list[tuple[str, str]] = (),
                          message_type: str = "text", content: dict | None = None,
                          message_id: str | None = None) -> str:
        """A user sends a message; returns its message_id (om_...). `mentions`: other users
        (open_id, name) mentioned besides the bot."""
        message_id = message_id or f"om_{uuid.uuid4().hex}"
        chat_id = chat_id or (f"oc_p2p_{open_id}" if chat_type == "p2p" else "oc_group")
        mention_list, prefix = [], []
        people = ([(self.bot_open_id, "hermes")] if mention_bot else []) + list(mentions)
        for i, (oid, name) in enumerate(people, 1):
            key = f"@_user_{i}"
            mention_list.append({"key": key, "id": {"open_id": oid, "union_id": f"on_{oid}",
                                                    "user_id": None}, "name": name,
                                 "tenant_key": "tk"})
            prefix.append(key)
        if content is None:
            content = {
                "text": {"text": " ".join(prefix + [text])},
                "image": {"image_key": f"img_{uuid.uuid4().hex[:12]}"},
                "file": {"file_key": f"file_{uuid.uuid4().hex[:12]}", "file_name": text},
                "audio": {"file_key": f"file_{uuid.uuid4().hex[:12]}", "duration": 1500},
                "media": {"file_key": f"file_{uuid.uuid4().hex[:12]}", "image_key": "img_x",
                          "file_name": text, "duration": 3000},
                "sticker": {"file_key": f"file_{uuid.uuid4().hex[:12]}"},
            }.get(message_type, {})
        now_ms = str(int(time.time() * 1000))
        message = {"message_id": message_id, "root_id": "", "parent_id": "",
                   "create_time": now_ms, "update_time": now_ms, "chat_id": chat_id,
                   "chat_type": chat_type, "message_type": message_type,
                   "content": json.dumps(content, ensure_ascii=False),
                   "mentions": mention_list or None, "user_agent": "fake"}
        envelope = {"schema": "2.0",
                    "header": {"event_id": uuid.uuid4().hex, "event_type": "im.message.receive_v1",
                               "create_time": now_ms, "token": "", "app_id": self.app_id,
                               "tenant_key": "tk"},
                    "event": {"sender": {"sender_id": {"open_id": open_id,
                                                       "union_id": f"on_{open_id}",
                                                       "user_id": None},
                                         "sender_type": "user", "tenant_key": "tk"},
                              "message": message}}
        self.messages[message_id] = {"chat_id": chat_id, "chat_type": chat_type,
                                     "open_id": open_id, "envelope": envelope}
        self.push_event(envelope)
        return message_id

    def send_user_media(self, data: bytes, message_type: str = "image", *,
                        content_type: str = "application/octet-stream",
                        file_name: str = "file", **kw) -> str:
        """A user sends an image / file / audio / media message whose resource this fake
        serves (to the message it belongs to, with the tenant token)."""
        key = f"{'img' if message_type == 'image' else 'file'}_v3_{uuid.uuid4().hex[:16]}"
        content = {"image": {"image_key": key},
                   "file": {"file_key": key, "file_name": file_name},
                   "audio": {"file_key": key, "duration": 2000},
                   "media": {"file_key": key, "image_key": "img_x", "file_name": file_name,
                             "duration": 3000}}[message_type]
        om = f"om_{uuid.uuid4().hex}"
        self.resources[(om, key)] = (data, "image" if message_type == "image" else "file",
                                     content_type)
        return self.send_user_message(message_type=message_type, content=content,
                                      message_id=om, **kw)

    def hold_file_sends(self) -> None:
        self._release.clear()

    def release_file_sends(self) -> None:
        self._release.set()

    def push_event(self, envelope: dict | bytes, *, kind: str = "event") -> PendingEvent:
        """Deliver any payload (a dict as JSON, or raw bytes) as a data frame of type `kind`,
        redelivered until acked."""
        message_id = event_id = ""
        if isinstance(envelope, dict):
            event, header = envelope.get("event"), envelope.get("header")
            message = event.get("message") if isinstance(event, dict) else None
            if isinstance(message, dict):
                message_id = str(message.get("message_id", ""))
            if isinstance(header, dict):
                event_id = str(header.get("event_id", ""))
            stored = envelope
        else:
            stored = {"__raw__": bytes(envelope)}
        ev = PendingEvent(stored, kind, message_id, event_id)
        g = self._pushers.spawn(self._push_loop, ev)
        g.name = "fake-feishu:push"
        return ev

    def redeliver(self, message_id: str, *, new_event_id: bool = False) -> PendingEvent:
        """Deliver an already-acked message again (Feishu does, even hours later); with
        `new_event_id` it comes as a different event carrying the same message."""
        envelope = json.loads(json.dumps(self.messages[message_id]["envelope"]))
        if new_event_id:
            envelope["header"]["event_id"] = uuid.uuid4().hex
        return self.push_event(envelope)

    def replies_to(self, message_id: str) -> list[Reply]:
        return [r for r in self.replies if r.message_id == message_id]

    def deliveries_of(self, message_id: str) -> list[Delivery]:
        return [d for d in self.deliveries if d.message_id == message_id]

    def ack_latencies(self) -> list[float]:
        return [d.acked_at - d.sent_at for d in self.deliveries if d.acked_at is not None]

    def keepalive_gaps(self, conn_id: int) -> list[float]:
        times = self.keepalive_times.get(conn_id, [])
        return [b - a for a, b in zip(times, times[1:])]

    def keepalive_lateness(self, conn_id: int, interval_s: float | None = None) -> list[float]:
        """Receipt time of each ping against a timetable starting at the first one."""
        times = self.keepalive_times.get(conn_id, [])
        interval = interval_s or self.ping_interval_s
        return [t - (times[0] + i * interval) for i, t in enumerate(times)]

    # -- faults -------------------------------------------------------------------------------
    def go_silent(self, seconds: float, *, whole_server: bool = False) -> None:
        """Make the live connections zombies: they swallow every frame both ways (no pongs, no
        acks counted, no events) and drop nobody, as a dead network path would. Connections
        opened afterwards work. `whole_server`: the harness's version instead."""
        if whole_server:
            return super().go_silent(seconds)
        until = time.monotonic() + seconds
        for conn in self.live_conns():
            conn.state["zombie_until"] = until
            conn.expect_keepalive(seconds + self._deadline(conn))
        self.log_event("go_silent")

    def reject_handshakes(self, times: int = 1, status: str = "514",
                          autherrcode: str = "1000040350", msg: str = "exceed conn limit") -> None:
        self._rejects.extend([(status, autherrcode, msg)] * times)

    def fail_endpoint(self, times: int = 1, code: int = 1, status: int = 200) -> None:
        self._endpoint_faults.extend([(status, code)] * times)

    def lose_acks(self, times: int = 1) -> None:
        """The next `times` valid acks are lost on the way: those events are redelivered."""
        self._lose_acks += times

    def truncate_next(self, times: int = 1) -> None:
        """The next `times` split deliveries miss their last part."""
        self._truncate_next += times

    def invalidate_tokens(self) -> None:
        self._tokens.clear()

    # -- WebSocket ---------------------------------------------------------------------------
    def _zombie(self, conn: Conn) -> bool:
        return conn.state.get("zombie_until", 0.0) > time.monotonic()

    def _deadline(self, conn: Conn) -> float:
        if self.keepalive_deadline_s is not None:
            return self.keepalive_deadline_s
        return 2.5 * conn.state.get("ping_interval", self.ping_interval_s)

    def _check_handshake(self, handler) -> bool:
        """pywsgi pre-start hook: True refuses the upgrade (answered by the GET route)."""
        env = handler.environ
        if env.get("PATH_INFO") != self.ws_path:
            return False
        query_string = env.get("QUERY_STRING", "")
        query = parse_qs(query_string)
        ticket = query.get("ticket", [""])[0]
        if self._rejects:
            answer = self._rejects.pop(0)
        elif ticket not in self._tickets or query.get("service_id") != [str(self.service_id)]:
            answer = ("514", "1000040351", "invalid ticket")
        elif len(self.live_conns()) >= self.max_conns:
            answer = ("514", "1000040350", "exceed conn limit")
        else:
            self._tickets.discard(ticket)
            return False
        self._tickets.discard(ticket)
        self._handshake_answers[query_string] = answer
        self.handshake_rejections.append((time.monotonic(),) + answer[:2])
        self.log_event("handshake_rejected")
        return True

    def _handshake_refusal(self, request: dict):
        status, autherr, msg = self._handshake_answers.pop(request["query"],
                                                           ("400", "0", "not a websocket"))
        http_status = int(status) if status.isdigit() else 400
        return (http_status, {"code": int(status) if status.isdigit() else 0, "msg": msg},
                {"Handshake-Status": status, "Handshake-Msg": msg,
                 "Handshake-Autherrcode": autherr})

    def on_connect(self, conn: Conn, request: dict) -> bool:
        conn.state["device_id"] = parse_qs(request["query"]).get("device_id", [""])[0]
        conn.state["ping_interval"] = self.ping_interval_s
        self.keepalive_times[conn.id] = []
        # lark-oapi ws/client.py runs ONE `_ping_loop` per client, created by start() after the
        # first connect and sleeping PingInterval between pings whatever the socket: a first
        # connection is pinged at once, but a reconnected one only at the loop's next tick, up
        # to a whole PingInterval after it opened. So by default the first ping gets the same
        # deadline as every later one.
        first = self.first_ping_deadline_s
        conn.expect_keepalive(first if first is not None else self._deadline(conn))
        if self.session_max_s is not None:
            timer = gevent.spawn_later(self.session_max_s, conn.close, None, reason="session_max")
            self._pushers.add(timer)  # ends with the connection's close, or at stop()
        self._conn_up.set()
        return True

    def decode(self, raw: str | bytes) -> WireFrame:
        if isinstance(raw, str):
            raise ValueError("text frame")  # Feishu speaks protobuf only
        frame = Frame()
        frame.ParseFromString(raw)
        if not frame.IsInitialized():
            raise ValueError("required fields missing")
        return _wire(frame)

    def record(self, direction: str, conn: Conn, data: Any) -> None:
        if isinstance(data, (bytes, bytearray)):
            try:
                frame = Frame()
                frame.ParseFromString(bytes(data))
                data = _wire(frame)
            except Exception:
                pass  # garbage we were told to send: kept raw
        super().record(direction, conn, data)

    def on_frame(self, conn: Conn, data: WireFrame) -> None:
        if self._zombie(conn):
            return
        if data.method == CONTROL and data.type == "ping":
            return self._on_ping(conn, data)
        if data.method == DATA:
            return self._on_ack(conn, data)
        self._protocol_error(conn, f"unexpected_frame method={data.method} type={data.type}")

    def _protocol_error(self, conn: Conn, what: str) -> None:
        self.protocol_errors.append((time.monotonic(), what, conn.id))
        self.log_event(f"protocol_error:{what}", conn)

    def _on_ping(self, conn: Conn, frame: WireFrame) -> None:
        if frame.service != self.service_id:
            return self._protocol_error(conn, f"ping_wrong_service service={frame.service}")
        self.keepalive_times[conn.id].append(time.monotonic())
        conf = dict(self.client_config())
        if self.pong_client_config:
            conf.update(self.pong_client_config)
        conn.state["ping_interval"] = conf["PingInterval"]
        conn.expect_keepalive(self._deadline(conn))  # resets the timer, with the current rule
        pong = Frame(SeqID=0, LogID=0, service=self.service_id, method=CONTROL,
                     payload=json.dumps(conf).encode())
        pong.headers.add(key="type", value="pong")
        conn.send(pong.SerializeToString())

    def _on_ack(self, conn: Conn, frame: WireFrame) -> None:
        headers = dict(frame.headers)
        biz_rt = headers.pop("biz_rt", None)
        found = self._by_frame_msg.get(headers.get("message_id", ""))
        try:
            payload_ok = json.loads(frame.payload) == {"code": 200}
        except ValueError:
            payload_ok = False
        if found is None:
            return self._protocol_error(conn, "ack_for_unknown_message")
        ev, delivery = found
        if headers not in delivery.headers:
            return self._protocol_error(conn, "ack_headers_differ")
        if biz_rt is None or not biz_rt.isdigit():
            return self._protocol_error(conn, "ack_without_biz_rt")
        if not payload_ok:
            return self._protocol_error(conn, "ack_payload_not_code_200")
        if frame.service != self.service_id:
            return self._protocol_error(conn, "ack_wrong_service")
        if self._lose_acks > 0:
            self._lose_acks -= 1
            self.log_event("ack_lost", conn)
            return
        now = time.monotonic()
        if delivery.acked_at is None:
            delivery.acked_at = now
        self.ack_times.setdefault(ev.message_id, []).append(now)
        ev.acked.set()
        self.changed()

    def _push_loop(self, ev: PendingEvent) -> None:
        while not ev.acked.is_set():
            if ev.attempts > self.redeliver_limit:
                self.undelivered.append(ev)
                self.log_event("event_given_up")
                return
            conn = self._wait_conn()
            ev.attempts += 1
            self._send_event(conn, ev)
            ev.acked.wait(self.ack_deadline_s)

    def _wait_conn(self) -> Conn:
        while True:
            conns = self.live_conns()
            if conns:
                return conns[-1]
            self._conn_up.clear()
            self._conn_up.wait(0.05)

    def _send_event(self, conn: Conn, ev: PendingEvent) -> None:
        raw = ev.envelope.get("__raw__")
        payload = (raw if isinstance(raw, bytes)
                   else json.dumps(ev.envelope, ensure_ascii=False).encode())
        n = max(1, min(self.split_parts, len(payload)))
        size = -(-len(payload) // n)
        chunks = [payload[i * size:(i + 1) * size] for i in range(n)]
        frame_msg_id = f"fm_{uuid.uuid4().hex}"
        trace_id = uuid.uuid4().hex
        order = list(range(n))
        if self.shuffle_parts:
            random.shuffle(order)
        if n > 1 and self._truncate_next > 0:
            self._truncate_next -= 1
            order = [i for i in order if i != n - 1]
        delivery = Delivery(ev.message_id, ev.event_id, frame_msg_id, conn.id, 0.0)
        self._by_frame_msg[frame_msg_id] = (ev, delivery)
        sent_all = not self._zombie(conn)
        for i in order:
            self._seq += 1
            headers = {"type": ev.kind, "message_id": frame_msg_id, "sum": str(n),
                       "seq": str(i), "trace_id": trace_id}
            frame = Frame(SeqID=self._seq, LogID=self._seq, service=self.service_id,
                          method=DATA, payload=chunks[i])
            for k, v in headers.items():
                frame.headers.add(key=k, value=v)
            delivery.headers.append(headers)
            if sent_all and not conn.send(frame.SerializeToString()):
                sent_all = False
        delivery.sent_at = time.monotonic()
        delivery.lost = not sent_all
        self.deliveries.append(delivery)
        self.log_event("event_sent" if sent_all else "event_lost", conn)

    # -- REST ---------------------------------------------------------------------------------
    def routes(self):
        return {
            ("POST", "/callback/ws/endpoint"): self._endpoint,
            ("POST", "/open-apis/auth/v3/tenant_access_token/internal"): self._token,
            ("GET", "/open-apis/bot/v3/info"): self._bot_info,
            ("POST", "/open-apis/im/v1/messages"): self._messages,
            ("GET", "/open-apis/im/v1/messages/"): self._resource,
            ("POST", "/open-apis/im/v1/images"): self._upload_image,
            ("POST", "/open-apis/im/v1/files"): self._upload_file,
            ("POST", "/open-apis/cardkit/v1/cards"): self._card_create,
            ("PUT", "/open-apis/cardkit/v1/cards/"): self._card_content,
            ("PATCH", "/open-apis/cardkit/v1/cards/"): self._card_settings,
            ("GET", self.ws_path): self._handshake_refusal,
        }

    # -- media ------------------------------------------------------------------------------
    def _resource(self, request: dict):
        refused = self._auth(request)
        if refused:
            return refused
        parts = request["path"].split("/")  # ['', open-apis, im, v1, messages, om, resources, key]
        if len(parts) != 8 or parts[6] != "resources":
            return 404, {"code": 404, "msg": "no such route"}
        found = self.resources.get((parts[5], parts[7]))
        kind = parse_qs(request["query"]).get("type", [""])[0]
        if found is None:
            return 400, {"code": CODE_NOT_IN_MESSAGE, "msg": "the resource is not in the message"}
        if kind != found[1]:
            return 400, {"code": CODE_PARAM, "msg": "type does not match the resource"}
        return 200, found[0], {"Content-Type": found[2]}

    def _uploaded(self, request: dict, field_name: str, limit: int):
        refused = self._auth(request)
        if refused:
            return refused
        try:
            fields, files = parse_multipart(request)
        except ValueError:
            return 400, {"code": CODE_PARAM, "msg": "multipart/form-data expected"}
        upload = files.get(field_name)
        if upload is None or not upload.data:
            return 400, {"code": CODE_PARAM, "msg": f"{field_name} is required"}
        if len(upload.data) > limit:
            return 400, {"code": CODE_TOO_LARGE, "msg": "file size exceeds the limit"}
        return fields, upload

    def _upload_image(self, request: dict):
        got = self._uploaded(request, "image", IMAGE_LIMIT)
        if isinstance(got[0], int):
            return got
        fields, upload = got
        if fields.get("image_type") not in ("message", "avatar"):
            return 400, {"code": CODE_PARAM, "msg": "invalid image_type"}
        key = f"img_v3_{uuid.uuid4().hex[:16]}"
        self.uploaded[key] = ("image", upload.filename or "", upload.data)
        self.changed()
        return 200, {"code": 0, "msg": "success", "data": {"image_key": key}}

    def _upload_file(self, request: dict):
        got = self._uploaded(request, "file", FILE_LIMIT)
        if isinstance(got[0], int):
            return got
        fields, upload = got
        if fields.get("file_type") not in FILE_TYPES or not fields.get("file_name"):
            return 400, {"code": CODE_PARAM, "msg": "invalid file_type or file_name"}
        key = f"file_v3_{uuid.uuid4().hex[:16]}"
        self.uploaded[key] = ("file", fields["file_name"], upload.data)
        self.changed()
        return 200, {"code": 0, "msg": "success", "data": {"file_key": key}}

    # -- CardKit ----------------------------------------------------------------------------
    def _card_create(self, request: dict):
        refused = self._auth(request)
        if refused:
            return refused
        if self.cards_refused:  # the app lacks cardkit:card:write
            return 400, {"code": 99991672, "msg": "Access denied. One of the following scopes "
                         "is required: [cardkit:card:write]"}
        body = request["json"] or {}
        try:
            card = json.loads(body.get("data") or "")
            assert body.get("type") == "card_json" and card.get("schema") == "2.0"
            elements = card["body"]["elements"]
            ids = [e["element_id"] for e in elements if "element_id" in e]
            assert len(ids) == len(set(ids)) and all(isinstance(i, str) and 0 < len(i) <= 20
                                                     for i in ids)
        except (ValueError, KeyError, TypeError, AttributeError, AssertionError):
            return 400, {"code": CODE_PARAM, "msg": "invalid card json"}
        card_id = str(7_300_000_000_000_000_000 + len(self.cards))
        streaming = bool((card.get("config") or {}).get("streaming_mode"))
        self.cards[card_id] = FakeCard(card_id, card, streaming,
                                       {e["element_id"]: dict(e) for e in elements
                                        if "element_id" in e})
        self.changed()
        return 200, {"code": 0, "msg": "success", "data": {"card_id": card_id}}

    def _card_op(self, request: dict, suffix: str):
        refused = self._auth(request)
        if refused:
            return refused, None, None
        parts = request["path"].split("/")  # ['', open-apis, cardkit, v1, cards, id, ...]
        card = self.cards.get(parts[5]) if len(parts) > 5 else None
        if card is None:
            return (400, {"code": CARD_NOT_FOUND, "msg": "The card entity does not exist"}), \
                None, None
        body = request["json"] if isinstance(request["json"], dict) else {}
        seq = body.get("sequence")
        if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= 2**31 - 1:
            return (400, {"code": CODE_PARAM, "msg": "invalid sequence"}), None, None
        if seq <= card.last_sequence:
            return (400, {"code": CARD_SEQUENCE, "msg": "The sequence number for operating on "
                          "the card did not increment consecutively"}), None, None
        return None, card, (parts, body, seq)

    def _card_content(self, request: dict):
        refused, card, rest = self._card_op(request, "content")
        if refused:
            return refused
        parts, body, seq = rest
        if len(parts) != 9 or parts[6] != "elements" or parts[8] != "content":
            return 404, {"code": 404, "msg": "no such route"}
        element = card.elements.get(parts[7])
        content = body.get("content")
        if not card.streaming:
            return 400, {"code": CARD_STREAMING_CLOSED, "msg": "Card streaming closed"}
        if element is None or element.get("tag") not in ("markdown", "plain_text"):
            return 400, {"code": CARD_NOT_TEXT, "msg": "Only update text"}
        if not isinstance(content, str) or not 1 <= len(content) <= 100_000:
            return 400, {"code": CODE_PARAM, "msg": "invalid content"}
        card.last_sequence = seq
        element["content"] = content
        card.ops.append(("content", seq, content))
        if card.reply is not None:
            card.reply.text = content
        self.changed()
        return 200, {"code": 0, "msg": "success", "data": {}}

    def _card_settings(self, request: dict):
        refused, card, rest = self._card_op(request, "settings")
        if refused:
            return refused
        parts, body, seq = rest
        try:
            settings = json.loads(body.get("settings") or "")
            config = settings.get("config") or {}
        except (ValueError, AttributeError):
            return 400, {"code": CODE_PARAM, "msg": "invalid settings"}
        card.last_sequence = seq
        if "streaming_mode" in config:
            card.streaming = bool(config["streaming_mode"])
        card.ops.append(("settings", seq, config))
        self.changed()
        return 200, {"code": 0, "msg": "success", "data": {}}

    def _endpoint(self, request: dict):
        if self._endpoint_faults:
            status, code = self._endpoint_faults.pop(0)
            return status, {"code": code, "msg": "fault injected"}
        body = request["json"] or {}
        if body.get("AppID") != self.app_id or body.get("AppSecret") != self.app_secret:
            return 200, {"code": 10014, "msg": "app secret invalid"}
        ticket = uuid.uuid4().hex
        self._tickets.add(ticket)
        device_id = uuid.uuid4().hex[:16]
        url = (f"ws://{self.host}:{self.port}{self.ws_path}?fpid=493&aid=552564&"
               f"device_id={device_id}&access_key={uuid.uuid4().hex}&service_id="
               f"{self.service_id}&ticket={ticket}")
        return 200, {"code": 0, "msg": "ok", "data": {"URL": url,
                                                       "ClientConfig": self.client_config()}}

    def _token(self, request: dict):
        body = request["json"] or {}
        if body.get("app_id") != self.app_id or body.get("app_secret") != self.app_secret:
            return 400, {"code": 10014, "msg": "app secret invalid"}
        token = f"t-{uuid.uuid4().hex}"
        self._tokens[token] = time.monotonic() + self.token_expire_s
        self.issued_tokens.append(token)
        return 200, {"code": 0, "msg": "ok", "tenant_access_token": token,
                     "expire": self.token_expire_s}

    def _auth(self, request: dict):
        auth = request["headers"].get("Authorization", "")
        token = auth[7:] if auth.startswith("Bearer ") else ""
        if self._tokens.get(token, 0.0) <= time.monotonic():
            return 400, {"code": INVALID_TOKEN, "msg": "Invalid access token for authorization."}
        return None

    def _bot_info(self, request: dict):
        refused = self._auth(request)
        if refused:
            return refused
        return 200, {"code": 0, "msg": "ok",
                     "bot": {"open_id": self.bot_open_id, "app_name": "hermes",
                             "activate_status": 2, "ip_white_list": []}}

    def _messages(self, request: dict):
        refused = self._auth(request)
        if refused:
            return refused
        body = request["json"] or {}
        path = request["path"].rstrip("/")
        parts = path.split("/")  # ['', 'open-apis', 'im', 'v1', 'messages', om, 'reply']
        if len(parts) == 7 and parts[6] == "reply":
            target = parts[5]
            if target not in self.messages:
                return 400, {"code": 230011, "msg": "message not found or withdrawn"}
            chat_id = self.messages[target]["chat_id"]
        elif len(parts) == 5 and parse_qs(request["query"]).get("receive_id_type") == ["chat_id"]:
            target, chat_id = None, body.get("receive_id")
            if not isinstance(chat_id, str) or not chat_id:
                return 400, {"code": 230001, "msg": "invalid receive_id"}
        else:
            return 404, {"code": 404, "msg": "no such route"}
        msg_type = body.get("msg_type")
        card = file = None
        try:
            content = json.loads(body.get("content", ""))
            if msg_type == "interactive":
                card = self.cards.get(content["data"]["card_id"])
                assert content.get("type") == "card" and card is not None
                text = card.text(next(iter(card.elements), ""))
            elif msg_type in ("image", "file"):
                file = self.uploaded.get(content["image_key" if msg_type == "image"
                                                 else "file_key"])
                assert file is not None and file[0] == msg_type
                text = ""
            else:
                text = content["text"]
                assert msg_type == "text" and isinstance(text, str)
        except (ValueError, KeyError, TypeError, AssertionError):
            return 400, {"code": 230001, "msg": "invalid content"}
        if card is not None and card.reply is not None and body.get("uuid") not in self._uuids:
            return 400, {"code": CODE_CARD_SENT, "msg": "the card entity was sent already"}
        if file is not None and not self._release.is_set():
            self.held_sends += 1
            self.changed()
            self._release.wait()
            return 502, {"code": 502, "msg": "dropped"}
        uid = body.get("uuid")
        if uid is not None and (not isinstance(uid, str) or len(uid) > 50):
            return 400, {"code": 230001, "msg": "invalid uuid"}
        if uid in self._uuids:  # the same request again: answered with the first message
            reply = self._uuids[uid]
            self.log_event("reply_deduplicated")
        else:
            reply = Reply(target, text, uid, chat_id, time.monotonic(), f"om_{uuid.uuid4().hex}",
                          card_id=card.card_id if card is not None else None)
            if file is not None:  # shown as a file, not as a text reply
                self.files.append(SentFile(target or "", file[1], file[2], file[0]))
            else:
                self.replies.append(reply)
            if card is not None:
                card.reply = reply
            if uid is not None:
                self._uuids[uid] = reply
            self.changed()
        return 200, {"code": 0, "msg": "success",
                     "data": {"message_id": reply.reply_id, "chat_id": reply.chat_id,
                              "msg_type": msg_type, "parent_id": target or ""}}


class Driver(PlatformDriver):
    """The fleet's and the contract kit's handle on this fake (see testing/driver.py)."""
    platform = "feishu"
    max_reply_chars = 4000

    def __init__(self, keepalive: Keepalive | None = None, *, secret: str | None = None) -> None:
        super().__init__(keepalive, secret=secret)
        k = self.keepalive
        self.fake = FakeFeishuServer(app_id="cli_fleet", app_secret=secret or "feishu-fleet-secret",
                                     ping_interval_s=k.interval_s,
                                     keepalive_deadline_s=k.deadline_s)

    def bot_config(self, **extra: Any) -> dict:
        return {"app_id": self.fake.app_id, "app_secret": self.fake.app_secret,
                "domain": self.fake.http_base, **extra}

    def bad_credentials_config(self, **extra: Any) -> dict:
        return self.bot_config(app_secret="not-the-secret", **extra)

    def user_says(self, text: str, *, chat: int = 0, user: int | None = None,
                  group: bool = False) -> str:
        open_id = f"ou_user{chat if user is None else user}"
        if group:
            return self.fake.send_user_message(text, chat_type="group", open_id=open_id,
                                               chat_id=f"oc_group{chat}", mention_bot=True)
        return self.fake.send_user_message(text, chat_type="p2p", open_id=open_id)

    def redeliver(self, message_id: str) -> None:
        self.fake.redeliver(message_id)

    def reply_rows(self) -> list[ReplyRow]:
        return [ReplyRow(r.message_id or "", r.text, r.at) for r in self.fake.replies]

    def user_sends_media(self, data: bytes, *, kind: str, name: str, mime: str,
                         transcript: str | None = None, chat: int = 0) -> str:
        message_type = {"image": "image", "voice": "audio"}.get(kind, "file")
        return self.fake.send_user_media(data, message_type, content_type=mime, file_name=name,
                                         open_id=f"ou_user{chat}")

    def uploads(self) -> int:
        return len(self.fake.uploaded)

    def lateness(self) -> list[float]:
        return [max(0.0, x) for conn_id in list(self.fake.keepalive_times)
                for x in self.fake.keepalive_lateness(conn_id, self.keepalive.interval_s)]

    def session_up_at(self, conn_id: int) -> float | None:
        times = self.fake.keepalive_times.get(conn_id) or []
        return times[0] if times else None
