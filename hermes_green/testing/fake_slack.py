"""A strict fake of Slack for a Socket Mode app: the Web API methods a bot uses, and the Socket
Mode WebSocket, as shared/PROTOCOLS.md ("Slack and DingTalk") describes them.

Sources: api.slack.com/apis/socket-mode and /apis/connections/socket-implement (hello,
disconnect reasons, envelopes, acks); slack_sdk `socket_mode/request.py` (envelope fields),
`socket_mode/client.py` and `builtin/client.py` (a new URL per connection, reconnect on
`disconnect`), `builtin/connection.py` (client pings); @slack/socket-mode `SocketModeClient.ts`
(`warning` then `refresh_requested`, server pings) and `UnrecoverableSocketModeStartError.ts`
(errors that mean "never retry"); the chat.postMessage / chat.update / auth.test /
apps.connections.open reference pages; api.slack.com/changelog/2018-04-truncating-really-long-
messages (40,000 characters); docs.slack.dev/apis/web-api/rate-limits (429 + Retry-After).

What it enforces (each rule makes the real server refuse, drop or redeliver):
- Web API: POST {http_base}/api/METHOD, a JSON or form body; the token in `Authorization:
  Bearer` (a form body may carry `token`; a JSON body may not: the Web API reads the token of a
  JSON request from the header only). Logical errors are HTTP 200 {"ok": false, "error"}: no
  token -> not_authed, an unknown one -> invalid_auth, the wrong kind -> not_allowed_token_type
  (apps.connections.open takes the app-level xapp- token only; chat.* and auth.test the bot
  token), a revoked one -> `revoke_bot_token()`'s error (token_revoked, account_inactive...).
  Rate limits: HTTP 429, {"ok": false, "error": "ratelimited"} and `Retry-After: <seconds>`.
- apps.connections.open -> {"ok": true, "url"}: a wss URL with a one-time `ticket`; a ticket
  used twice, unknown, or older than `ticket_ttl_s` (*unverified*: the life is not published)
  is refused (the socket is closed at once). At most `max_connections` (10) at a time.
- On connect: {"type": "hello", "num_connections", "connection_info": {"app_id"},
  "debug_info": {"host", "build_number", "approximate_connection_time"}}.
- Envelopes {"envelope_id", "type": events_api|slash_commands|interactive, "payload",
  "accepts_response_payload", "retry_attempt", "retry_reason"} go to one open connection
  (greeted ones first, connections told to refresh last). Each must be acked with
  {"envelope_id"} on the connection that got it within `ack_timeout_s` (3 s), else it goes out
  again, with a new envelope_id, `retry_attempt` + 1 and `retry_reason` "timeout", up to
  `max_retries` (3, as the Events API retries; *unverified* for Socket Mode), then it is given
  up. An ack on another connection is not counted (*unverified*: the strict choice).
  An event sent while no connection is open waits for the next hello and is recorded as a
  `gap` event.
- `refresh()` sends {"type": "disconnect", "reason": "refresh_requested"} (or "warning") and
  closes that connection `refresh_grace_s` later; `connection_life_s` does it by itself.
- Keepalive: the server pings every `server_ping_interval_s` and closes a connection whose
  pong is `pong_deadline_s` late (*unverified* numbers; slack_sdk and @slack/socket-mode both
  expect server pings); a client ping gets a pong (not while `go_silent()`).
- chat.postMessage {channel, text, thread_ts}: unknown channel -> channel_not_found; empty text
  -> no_text; more than `max_text_chars` (40,000) -> msg_too_long (the strict reading: the
  changelog says "truncated with a warning", the method's error list names msg_too_long);
  `thread_ts` that is no message of that channel -> thread_not_found (*unverified*).
  chat.update {channel, ts, text}: unknown message -> message_not_found; not the bot's own ->
  cant_update_message. The bot's own posts come back as `message` events with `bot_id` (its
  DMs are subscribed with message.im), its edits as `message_changed`.

- Files in (api.slack.com/types/file): `send_file_dm(data, ...)` shares a file in a DM: a
  `message` event, subtype file_share, with `files: [{id, name, title, mimetype, filetype,
  size, url_private, url_private_download, ...}]`. url_private answers only a request with the
  bot token in `Authorization: Bearer`; without it the fake answers what a browser without a
  session gets: a 200 HTML login page (*unverified*: Slack's exact answer; the strict reading
  for a client that checks what it downloaded).
- Files out (slack_sdk `files_upload_v2`; files.getUploadURLExternal / completeUploadExternal
  reference pages): files.getUploadURLExternal {filename, length} (bot token; form args) ->
  {upload_url, file_id}; the upload URL takes ONE POST of exactly `length` bytes (raw, or a
  multipart part), with no token (*unverified*: a second POST and a length mismatch are refused
  here with HTTP 400); files.completeUploadExternal {files: JSON [{id, title}], channel_id,
  thread_ts, initial_comment} shares each uploaded, not yet completed file (else
  file_not_found / upload_not_complete *unverified names*) in the channel (channel_not_found)
  and thread (thread_not_found). `files` records what a user sees; `uploads` counts
  accepted byte uploads; `hold_file_sends()` holds completeUploadExternal unprocessed.

Use from tests, the demo and benchmarks:
    fake = FakeSlackServer(ack_timeout_s=0.3).start()     # fake.app_token, fake.bot_token
    ts = fake.send_dm("hi")                                 # a DM from a user; returns its ts
    fake.send_mention("hello", channel="C0GENERAL")          # an @-mention in a channel
    fake.send_event({...}); fake.send_envelope("slash_commands", {...}); fake.edit_message(...)
    fake.thread_posts(channel, ts)   fake.answers(channel, ts)   fake.envelopes   fake.posts
    fake.updates   fake.gap_events()   fake.coverage_gaps(since)   fake.keepalive_times
    faults: refresh(reason, grace_s), drop(), go_silent(s), send_garbage(data),
            rate_limit(method, times, retry_after), fail_next(method, error, times),
            revoke_bot_token(error), plus the harness's refuse_connections() / rest_delay_s.
"""
from __future__ import annotations

import itertools
import json
import mimetypes
import time
import urllib.parse
import uuid
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
import gevent.pool
from geventwebsocket.websocket import WebSocket

from hermes_green.testing.driver import Keepalive, PlatformDriver, ReplyRow, SentFile
from hermes_green.testing.harness import Conn, FakePlatformServer, parse_multipart

MAX_TEXT_CHARS = 40_000  # changelog 2018-04-truncating-really-long-messages
MAX_UPLOAD_BYTES = 1024 * 1024 * 1024  # 1 GB per file *unverified for the external flow*
LOGIN_PAGE = b"<!DOCTYPE html><html><head><title>Slack</title></head><body>Sign in</body></html>"
MAX_CONNECTIONS = 10  # socket-mode: "up to 10 simultaneous connections" per app
FATAL_AUTH_ERRORS = ("not_authed", "invalid_auth", "account_inactive", "token_revoked",
                     "token_expired", "not_allowed_token_type")


@dataclass
class Delivery:
    envelope_id: str
    conn_id: int
    attempt: int
    at: float
    acked_at: float | None = None


@dataclass
class EventRecord:
    """One event (or other envelope payload) and every time it went out."""
    kind: str  # envelope type
    body: dict  # the `event` for events_api, else the payload
    created_at: float
    key: str  # event_id (events_api) or a fake id
    deliveries: list[Delivery] = field(default_factory=list)
    gap: bool = False  # no connection was open when it was (re)sent: it waited
    given_up: bool = False

    @property
    def acked(self) -> bool:
        return any(d.acked_at is not None for d in self.deliveries)


@dataclass
class Message:
    channel: str
    ts: str
    user: str
    text: str
    thread_ts: str | None = None
    bot: bool = False  # posted by our bot
    at: float = 0.0


class FakeSlackServer(FakePlatformServer):
    ws_path = "/link/"

    def __init__(self, *, app_token: str = "xapp-1-A0FAKE-1-fakeappsecret",
                 bot_token: str = "xoxb-1-fake-bot-token", app_id: str = "A0FAKE",
                 team_id: str = "T0FAKE", bot_user_id: str = "U0BOT", bot_id: str = "B0BOT",
                 ack_timeout_s: float = 3.0, max_retries: int = 3,
                 ticket_ttl_s: float = 30.0, refresh_grace_s: float = 5.0,
                 connection_life_s: float | None = None,
                 server_ping_interval_s: float | None = 10.0, pong_deadline_s: float = 10.0,
                 max_text_chars: int = MAX_TEXT_CHARS, max_connections: int = MAX_CONNECTIONS,
                 echo_own_messages: bool = True) -> None:
        super().__init__()
        self.app_token, self.bot_token = app_token, bot_token
        self.app_id, self.team_id = app_id, team_id
        self.bot_user_id, self.bot_id = bot_user_id, bot_id
        self.ack_timeout_s, self.max_retries = ack_timeout_s, max_retries
        self.ticket_ttl_s, self.refresh_grace_s = ticket_ttl_s, refresh_grace_s
        self.connection_life_s = connection_life_s
        self.server_ping_interval_s, self.pong_deadline_s = server_ping_interval_s, pong_deadline_s
        self.max_text_chars, self.max_connections = max_text_chars, max_connections
        self.echo_own_messages = echo_own_messages
        # records
        self.envelopes: list[EventRecord] = []
        self.messages: dict[tuple[str, str], Message] = {}
        self.user_events: dict[tuple[str, str], dict] = {}  # (channel, ts) -> its event
        self.posts: list[Message] = []  # chat.postMessage calls the fake accepted
        self.updates: list[tuple[str, str, str, float]] = []  # (channel, ts, text, at)
        self.refused: list[tuple[str, str]] = []  # (method, error)
        self.refused_tickets: list[str] = []
        self.foreign_acks: list[tuple[int, str]] = []  # (conn id, envelope id)
        self.unknown_acks: list[tuple[int, Any]] = []
        self.hello_at: dict[int, float] = {}
        self.keepalive_times: dict[int, list[float]] = {}  # client pings per connection
        self.server_pings: dict[int, list[float]] = {}
        self.refreshes: list[tuple[int, str, float]] = []  # (conn id, reason, at)
        # state
        self.channels: dict[str, str] = {"C0GENERAL": "channel"}  # id -> im | channel
        self.tickets: dict[str, float] = {}  # ticket -> issued at (unused ones)
        self._pending: dict[str, tuple[EventRecord, Delivery]] = {}  # envelope id -> ...
        self._queue: list[tuple[EventRecord, int, str]] = []  # waiting for a connection
        self._draining: set[int] = set()
        self._round_robin = itertools.count()
        self._ts = itertools.count(1)
        self._ts_base = int(time.time())
        self._timers = gevent.pool.Group()
        self._revoked: str | None = None
        self._fail_next: dict[str, list[str]] = {}
        self._ratelimit: dict[str, list[float]] = {}
        # files
        self.files: list[SentFile] = []  # what completeUploadExternal put in a chat
        self.uploads = 0  # byte uploads to an upload URL the fake accepted
        self.held_sends = 0
        self.slack_files: set[str] = set()  # hosted media ids that are url_private files
        self._uploads: dict[str, dict] = {}  # upload id -> {file_id, filename, length, data}
        self._files: dict[str, dict] = {}  # file id -> the same dict
        self._release = gevent.event.Event()
        self._release.set()

    # -- URLs ----------------------------------------------------------------------------------
    @property
    def api_base(self) -> str:
        return f"{self.http_base}/api"

    def stop(self) -> None:
        self._timers.kill(block=False)
        super().stop()

    # -- users ---------------------------------------------------------------------------------
    def dm_channel(self, user: str) -> str:
        channel = "D" + user[1:]
        self.channels.setdefault(channel, "im")
        return channel

    def send_dm(self, text: str, *, user: str = "U0USER1", thread_ts: str | None = None,
                client_msg_id: bool = True) -> str:
        """A user writes to the bot in their DM; returns the message's ts."""
        channel = self.dm_channel(user)
        return self._user_message(channel, "im", user, text, thread_ts, client_msg_id)

    def send_mention(self, text: str, *, channel: str = "C0GENERAL", user: str = "U0USER1",
                     thread_ts: str | None = None, also_message_event: bool = False) -> str:
        """A user @-mentions the bot in a channel (app_mention); with `also_message_event`
        the message.channels subscription delivers the same message as a `message` too."""
        self.channels.setdefault(channel, "channel")
        text = f"<@{self.bot_user_id}> {text}"
        ts = self._new_ts()
        event = {"client_msg_id": str(uuid.uuid4()), "type": "app_mention", "text": text,
                 "user": user, "ts": ts, "team": self.team_id, "channel": channel,
                 "event_ts": ts}
        if thread_ts:
            event["thread_ts"] = thread_ts
        self.messages[(channel, ts)] = Message(channel, ts, user, text, thread_ts,
                                               at=time.monotonic())
        self.user_events[(channel, ts)] = event
        self.send_event(event)
        if also_message_event:
            self.send_event({k: v for k, v in event.items() if k != "type"}
                            | {"type": "message", "channel_type": "channel"})
        return ts

    def edit_message(self, channel: str, ts: str, text: str) -> None:
        """A user edits a message: a `message_changed` event (no top-level user or text)."""
        old = self.messages[(channel, ts)]
        self.send_event(self._changed_event(old, text))
        old.text = text

    def send_event(self, event: dict) -> EventRecord:
        """Any Events API event (unknown types, malformed ones included)."""
        return self.send_envelope("events_api", event)

    def send_envelope(self, kind: str, body: Any) -> EventRecord:
        """An envelope of any type; events_api wraps `body` in an event_callback payload."""
        record = EventRecord(kind, body, time.monotonic(), f"Ev{uuid.uuid4().hex[:10].upper()}")
        self.envelopes.append(record)
        self._dispatch(record, 0, "")
        return record

    def send_file_dm(self, data: bytes, *, name: str, mimetype: str, user: str = "U0USER1",
                     text: str = "") -> str:
        """A user shares a file in their DM with the bot (file_share); returns the ts."""
        channel = self.dm_channel(user)
        url = self.host_media(data, mimetype)
        self.slack_files.add(url.rsplit("/", 1)[-1])
        file_id = f"F{uuid.uuid4().hex[:10].upper()}"
        filetype = name.rsplit(".", 1)[-1].lower() if "." in name else "binary"
        file = {"id": file_id, "created": int(time.time()), "timestamp": int(time.time()),
                "name": name, "title": name, "mimetype": mimetype, "filetype": filetype,
                "pretty_type": filetype.upper(), "user": user, "mode": "hosted",
                "editable": False, "is_external": False, "external_type": "",
                "is_public": False, "public_url_shared": False, "size": len(data),
                "url_private": url, "url_private_download": url + "?download=1",
                "permalink": f"https://fake.slack.com/files/{user}/{file_id}/{name}"}
        ts = self._new_ts()
        event = {"type": "message", "subtype": "file_share", "text": text, "user": user,
                 "ts": ts, "team": self.team_id, "channel": channel, "event_ts": ts,
                 "channel_type": "im", "files": [file], "upload": False,
                 "display_as_bot": False, "client_msg_id": str(uuid.uuid4())}
        self.messages[(channel, ts)] = Message(channel, ts, user, text, None,
                                               at=time.monotonic())
        self.user_events[(channel, ts)] = event
        self.send_event(event)
        return ts

    def media_refusal(self, media_id: str, headers: dict) -> tuple | None:
        media_id = media_id.split("?", 1)[0]
        if media_id in self.slack_files and \
                headers.get("Authorization") != f"Bearer {self.bot_token}":
            self.refused.append(("url_private", "no_token"))
            return 200, LOGIN_PAGE, {"Content-Type": "text/html; charset=utf-8"}
        return None

    def hold_file_sends(self) -> None:
        """files.completeUploadExternal is held unanswered (and never processed)."""
        self._release.clear()

    def release_file_sends(self) -> None:
        self._release.set()

    # -- records -------------------------------------------------------------------------------
    def thread_posts(self, channel: str, ts: str) -> list[Message]:
        """The bot's posts in the thread of message `ts` (its replies), in order."""
        return [m for m in self.posts if m.channel == channel and m.thread_ts == ts]

    def answers(self, channel: str, ts: str) -> list[str]:
        """What the user now sees from the bot in that thread: each post's current text."""
        return [self.messages[(m.channel, m.ts)].text for m in self.thread_posts(channel, ts)]

    def envelopes_for_message(self, channel: str, ts: str) -> list[EventRecord]:
        return [e for e in self.envelopes if isinstance(e.body, dict)
                and e.body.get("channel") == channel and e.body.get("ts") == ts]

    def gap_events(self) -> list[EventRecord]:
        return [e for e in self.envelopes if e.gap]

    def redelivered(self) -> list[EventRecord]:
        return [e for e in self.envelopes if len(e.deliveries) > 1]

    def coverage_gaps(self, since: float, until: float | None = None) -> list[tuple[float, float]]:
        """Intervals in [since, until] with no greeted connection open: when an event could
        only have waited. Computed from hello and close times."""
        until = time.monotonic() if until is None else until
        closed = {d.conn_id: d.at for d in self.disconnects}
        spans = sorted((at, closed.get(cid, until)) for cid, at in self.hello_at.items())
        gaps, covered_to = [], since
        for start, end in spans:
            if end <= covered_to:
                continue
            if start > covered_to:
                gaps.append((covered_to, min(start, until)))
            covered_to = max(covered_to, end)
            if covered_to >= until:
                break
        if covered_to < until:
            gaps.append((covered_to, until))
        return [(a, b) for a, b in gaps if b > a]

    # -- faults --------------------------------------------------------------------------------
    def refresh(self, reason: str = "refresh_requested", grace_s: float | None = None,
                conn_ids: list[int] | None = None) -> None:
        """Tell connections they will end (`disconnect`), then close them after the grace."""
        grace = self.refresh_grace_s if grace_s is None else grace_s
        for conn in self.live_conns():
            if conn_ids is not None and conn.id not in conn_ids:
                continue
            self._draining.add(conn.id)
            self.refreshes.append((conn.id, reason, time.monotonic()))
            conn.send({"type": "disconnect", "reason": reason,
                       "debug_info": {"host": f"applink-fake-{conn.id}"}})
            self._timers.spawn(self._close_after, conn, grace, f"server_{reason}")

    def disable_link(self) -> None:
        """Socket Mode turned off for the app: `disconnect` link_disabled, then closed."""
        self.refresh("link_disabled", grace_s=0.0)

    def rate_limit(self, method: str, times: int = 1, retry_after: float = 1.0) -> None:
        self._ratelimit.setdefault(method, []).extend([retry_after] * times)

    def fail_next(self, method: str, error: str, times: int = 1) -> None:
        self._fail_next.setdefault(method, []).extend([error] * times)

    def revoke_bot_token(self, error: str = "token_revoked") -> None:
        self._revoked = error

    def send_raw_frame(self, payload: bytes, opcode: int = WebSocket.OPCODE_TEXT) -> None:
        for conn in self.live_conns():
            try:
                conn.ws.send_frame(payload, opcode)
            except Exception:
                pass

    # -- Web API -------------------------------------------------------------------------------
    def routes(self):
        return {("POST", "/api/"): self._api, ("POST", "/upload/v1/"): self._upload_bytes}

    def _api(self, request: dict) -> tuple:
        method = request["path"][len("/api/"):]
        handler = {"apps.connections.open": self._connections_open, "auth.test": self._auth_test,
                   "chat.postMessage": self._post_message,
                   "chat.update": self._update,
                   "files.getUploadURLExternal": self._get_upload_url,
                   "files.completeUploadExternal": self._complete_upload}.get(method)
        if handler is None:
            return 404, {"ok": False, "error": "unknown_method"}
        if self._ratelimit.get(method):
            retry_after = self._ratelimit[method].pop(0)
            self.refused.append((method, "ratelimited"))
            return 429, {"ok": False, "error": "ratelimited"}, {"Retry-After": f"{retry_after:g}"}
        args, token = _arguments(request)
        kind = "app" if method == "apps.connections.open" else "bot"
        error = self._token_error(token, kind)
        if error is None and self._fail_next.get(method):
            error = self._fail_next[method].pop(0)
        if error is not None:
            self.refused.append((method, error))
            self.changed()
            return 200, {"ok": False, "error": error}
        status, body = handler(args)
        if not body.get("ok"):
            self.refused.append((method, body.get("error")))
        self.changed()
        return status, body

    # -- files ---------------------------------------------------------------------------------
    def _get_upload_url(self, args: dict) -> tuple:
        filename, length = args.get("filename"), str(args.get("length", ""))
        if not isinstance(filename, str) or not filename or not length.isdigit():
            return 200, {"ok": False, "error": "invalid_arguments"}
        if not 0 < int(length) <= MAX_UPLOAD_BYTES:
            return 200, {"ok": False, "error": "invalid_arguments"}
        upload_id, file_id = uuid.uuid4().hex, f"F{uuid.uuid4().hex[:10].upper()}"
        entry = {"file_id": file_id, "filename": filename, "length": int(length), "data": None,
                 "completed": False}
        self._uploads[upload_id] = self._files[file_id] = entry
        return 200, {"ok": True, "upload_url": f"{self.http_base}/upload/v1/{upload_id}",
                     "file_id": file_id}

    def _upload_bytes(self, request: dict) -> tuple:
        entry = self._uploads.get(request["path"][len("/upload/v1/"):])
        if entry is None:
            return 404, b"Not Found", {"Content-Type": "text/plain"}
        if entry["data"] is not None:
            self.refused.append(("upload", "used_twice"))
            return 400, b"upload URL already used", {"Content-Type": "text/plain"}
        data = request["body"] or b""
        if request["headers"].get("Content-Type", "").startswith("multipart/"):
            try:
                _, parts = parse_multipart(request)
            except ValueError:
                return 400, b"bad multipart", {"Content-Type": "text/plain"}
            data = next(iter(parts.values())).data if parts else b""
        if len(data) != entry["length"]:
            self.refused.append(("upload", "length_mismatch"))
            self.changed()
            return 400, b"length mismatch", {"Content-Type": "text/plain"}
        entry["data"] = data
        self.uploads += 1
        self.changed()
        return 200, f"OK - {len(data)}".encode(), {"Content-Type": "text/plain"}

    def _complete_upload(self, args: dict) -> tuple:
        if not self._release.is_set():
            self.held_sends += 1
            self.changed()
            self._release.wait()
            return 500, {"ok": False, "error": "fatal_error"}  # dropped: its client is gone
        try:
            files = json.loads(args.get("files") or "")
        except (TypeError, ValueError):
            return 200, {"ok": False, "error": "invalid_arguments"}
        if not isinstance(files, list) or not files or not all(
                isinstance(f, dict) and isinstance(f.get("id"), str) for f in files):
            return 200, {"ok": False, "error": "invalid_arguments"}
        channel, thread_ts = args.get("channel_id"), args.get("thread_ts")
        if channel is not None and channel not in self.channels:
            return 200, {"ok": False, "error": "channel_not_found"}
        if thread_ts is not None and (channel, str(thread_ts)) not in self.messages:
            return 200, {"ok": False, "error": "thread_not_found"}
        entries = [self._files.get(f["id"]) for f in files]
        if any(e is None or e["completed"] for e in entries):
            return 200, {"ok": False, "error": "file_not_found"}
        if any(e["data"] is None for e in entries):
            return 200, {"ok": False, "error": "upload_not_complete"}
        shown = []
        for f, e in zip(files, entries):
            e["completed"] = True
            name = str(f.get("title") or e["filename"])
            mime = mimetypes.guess_type(e["filename"])[0] or ""
            if channel is not None:
                self.files.append(SentFile(
                    f"{channel}:{thread_ts}" if thread_ts else "", name, e["data"],
                    "image" if mime.startswith("image/") else "file"))
            shown.append({"id": e["file_id"], "name": e["filename"], "title": name,
                          "size": e["length"], "mimetype": mime})
        return 200, {"ok": True, "files": shown}

    def _token_error(self, token: str | None, kind: str) -> str | None:
        if not token:
            return "not_authed"
        expected, other = ((self.app_token, self.bot_token) if kind == "app"
                           else (self.bot_token, self.app_token))
        if token == other:
            return "not_allowed_token_type"
        if token != expected:
            return "invalid_auth"
        if kind == "bot" and self._revoked:
            return self._revoked
        return None

    def _connections_open(self, args: dict) -> tuple:
        ticket = uuid.uuid4().hex
        self.tickets[ticket] = time.monotonic()
        query = urllib.parse.urlencode({"ticket": ticket, "app_id": self.app_id})
        return 200, {"ok": True, "url": f"{self.ws_url}?{query}"}

    def _auth_test(self, args: dict) -> tuple:
        return 200, {"ok": True, "url": "https://fake.slack.com/", "team": "Fake Team",
                     "user": "hermes", "team_id": self.team_id, "user_id": self.bot_user_id,
                     "bot_id": self.bot_id, "is_enterprise_install": False}

    def _text_error(self, text: Any) -> str | None:
        if not isinstance(text, str) or not text.strip():
            return "no_text"
        if len(text) > self.max_text_chars:
            return "msg_too_long"
        return None

    def _post_message(self, args: dict) -> tuple:
        channel, text, thread_ts = args.get("channel"), args.get("text"), args.get("thread_ts")
        if channel not in self.channels:
            return 200, {"ok": False, "error": "channel_not_found"}
        error = self._text_error(text)
        if error:
            return 200, {"ok": False, "error": error}
        if thread_ts is not None and (channel, str(thread_ts)) not in self.messages:
            return 200, {"ok": False, "error": "thread_not_found"}
        msg = Message(channel, self._new_ts(), self.bot_user_id, text,
                      str(thread_ts) if thread_ts is not None else None, bot=True,
                      at=time.monotonic())
        self.messages[(channel, msg.ts)] = msg
        self.posts.append(msg)
        if self.echo_own_messages and self.channels[channel] == "im":
            event = {"bot_id": self.bot_id, "type": "message", "text": text,
                     "user": self.bot_user_id, "ts": msg.ts, "app_id": self.app_id,
                     "team": self.team_id, "channel": channel, "event_ts": msg.ts,
                     "channel_type": "im"}
            if msg.thread_ts:
                event["thread_ts"] = msg.thread_ts
            self.send_event(event)
        return 200, {"ok": True, "channel": channel, "ts": msg.ts,
                     "message": {"type": "message", "text": text, "user": self.bot_user_id,
                                 "bot_id": self.bot_id, "ts": msg.ts}}

    def _update(self, args: dict) -> tuple:
        channel, ts, text = args.get("channel"), args.get("ts"), args.get("text")
        msg = self.messages.get((channel, str(ts)))
        if msg is None:
            return 200, {"ok": False, "error": "message_not_found"}
        if not msg.bot:
            return 200, {"ok": False, "error": "cant_update_message"}
        error = self._text_error(text)
        if error:
            return 200, {"ok": False, "error": error}
        if self.echo_own_messages and self.channels.get(channel) == "im":
            self.send_event(self._changed_event(msg, text))
        msg.text = text
        self.updates.append((channel, msg.ts, text, time.monotonic()))
        return 200, {"ok": True, "channel": channel, "ts": msg.ts, "text": text}

    def _changed_event(self, old: Message, text: str) -> dict:
        ts = self._new_ts()
        before = {"type": "message", "text": old.text, "user": old.user, "ts": old.ts}
        return {"type": "message", "subtype": "message_changed", "hidden": True,
                "channel": old.channel, "ts": ts, "event_ts": ts,
                "channel_type": self.channels.get(old.channel, "channel"),
                "message": before | {"text": text, "edited": {"user": old.user, "ts": ts}},
                "previous_message": before}

    def _new_ts(self) -> str:
        return f"{self._ts_base}.{next(self._ts):06d}"

    def _user_message(self, channel: str, channel_type: str, user: str, text: str,
                      thread_ts: str | None, client_msg_id: bool) -> str:
        ts = self._new_ts()
        event = {"type": "message", "text": text, "user": user, "ts": ts, "team": self.team_id,
                 "channel": channel, "event_ts": ts, "channel_type": channel_type}
        if client_msg_id:
            event["client_msg_id"] = str(uuid.uuid4())
        if thread_ts:
            event["thread_ts"] = thread_ts
        self.messages[(channel, ts)] = Message(channel, ts, user, text, thread_ts,
                                               at=time.monotonic())
        self.user_events[(channel, ts)] = event
        self.send_event(event)
        return ts

    # -- Socket Mode ---------------------------------------------------------------------------
    def on_connect(self, conn: Conn, request: dict) -> bool:
        query = urllib.parse.parse_qs(request.get("query") or "")
        ticket = (query.get("ticket") or [""])[0]
        issued = self.tickets.pop(ticket, None)
        if issued is None or time.monotonic() - issued > self.ticket_ttl_s:
            self.refused_tickets.append(ticket)
            self.log_event("ticket_refused", conn)
            return False
        if len(self._greeted()) >= self.max_connections:
            self.log_event("too_many_connections", conn)
            return False
        self.keepalive_times[conn.id] = []
        self.server_pings[conn.id] = []
        conn.state["pong_at"] = time.monotonic()
        conn.ws.environ["fake.on_ping"] = lambda payload: self._on_client_ping(conn, payload)
        conn.ws.environ["fake.on_pong"] = lambda payload: conn.state.update(
            pong_at=time.monotonic())
        conn.ws.__class__ = _KeepaliveSocket
        life = self.connection_life_s
        if conn.send({"type": "hello", "num_connections": len(self._greeted()) + 1,
                      "debug_info": {"host": f"applink-fake-{conn.id}", "build_number": 1,
                                     "approximate_connection_time": int(life or 18060)},
                      "connection_info": {"app_id": self.app_id}}):
            self.hello_at[conn.id] = time.monotonic()
        if self.server_ping_interval_s:
            self._timers.spawn(self._ping_loop, conn)
        if life is not None:
            self._timers.spawn(self._refresh_after, conn, life)
        queued, self._queue = self._queue, []
        for record, attempt, reason in queued:
            self._dispatch(record, attempt, reason)
        return True

    def on_frame(self, conn: Conn, data: Any) -> None:
        envelope_id = data.get("envelope_id") if isinstance(data, dict) else None
        pending = self._pending.get(envelope_id) if isinstance(envelope_id, str) else None
        if pending is None:
            self.unknown_acks.append((conn.id, data))
            return
        record, delivery = pending
        if delivery.conn_id != conn.id:
            self.foreign_acks.append((conn.id, envelope_id))
            return
        del self._pending[envelope_id]
        delivery.acked_at = time.monotonic()
        self.changed()

    def _on_client_ping(self, conn: Conn, payload: bytes) -> None:
        if self.silent_until > time.monotonic() or conn.closed.is_set():
            return  # a zombie server: no pong
        self.keepalive_times[conn.id].append(time.monotonic())
        try:
            conn.ws.send_frame(payload, WebSocket.OPCODE_PONG)
        except Exception:
            pass

    def _ping_loop(self, conn: Conn) -> None:
        interval = self.server_ping_interval_s
        while not conn.closed.wait(interval):
            if self.silent_until > time.monotonic():  # a zombie server judges nobody
                conn.state["pong_at"] = time.monotonic()
                continue
            if time.monotonic() - conn.state["pong_at"] > interval + self.pong_deadline_s:
                self.log_event("pong_deadline", conn)
                return conn.close(None, reason="pong_deadline")
            try:
                conn.ws.send_frame(str(time.time()).encode(), WebSocket.OPCODE_PING)
                self.server_pings[conn.id].append(time.monotonic())
            except Exception:
                return

    def _refresh_after(self, conn: Conn, life: float) -> None:
        if not conn.closed.wait(life):
            self.refresh(conn_ids=[conn.id])

    def _close_after(self, conn: Conn, grace: float, reason: str) -> None:
        if grace > 0:
            conn.closed.wait(grace)
        conn.close(None, reason=reason)

    def _greeted(self) -> list[Conn]:
        return [c for c in self.live_conns() if c.id in self.hello_at]

    def _dispatch(self, record: EventRecord, attempt: int, reason: str) -> None:
        """Send the envelope to one open connection (not one told to refresh, while another
        is open), or queue it until a connection opens."""
        conns = self._greeted()
        fresh = [c for c in conns if c.id not in self._draining]
        pool = fresh or conns
        if not pool:
            record.gap = True
            self._queue.append((record, attempt, reason))
            self.changed()
            return
        conn = pool[next(self._round_robin) % len(pool)]
        envelope_id = str(uuid.uuid4())
        delivery = Delivery(envelope_id, conn.id, attempt, time.monotonic())
        record.deliveries.append(delivery)
        self._pending[envelope_id] = (record, delivery)
        envelope: Any = self._envelope(record, envelope_id, attempt, reason)
        try:
            json.dumps(envelope, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate travels escaped, as "\ud800"
            envelope = json.dumps(envelope)
        conn.send(envelope)  # while silent: into the void
        self._timers.spawn(self._ack_deadline, envelope_id)
        self.changed()

    def _envelope(self, record: EventRecord, envelope_id: str, attempt: int,
                  reason: str) -> dict:
        if record.kind != "events_api":
            return {"envelope_id": envelope_id, "type": record.kind, "payload": record.body,
                    "accepts_response_payload": record.kind != "interactive"}
        return {"envelope_id": envelope_id, "type": "events_api",
                "accepts_response_payload": False, "retry_attempt": attempt,
                "retry_reason": reason,
                "payload": {"token": "fake-verification-token", "team_id": self.team_id,
                            "api_app_id": self.app_id, "event": record.body,
                            "type": "event_callback", "event_id": record.key,
                            "event_time": int(time.time()),
                            "authorizations": [{"enterprise_id": None, "team_id": self.team_id,
                                                "user_id": self.bot_user_id, "is_bot": True,
                                                "is_enterprise_install": False}],
                            "is_ext_shared_channel": False}}

    def _ack_deadline(self, envelope_id: str) -> None:
        gevent.sleep(self.ack_timeout_s)
        pending = self._pending.pop(envelope_id, None)
        if pending is None:
            return
        record, delivery = pending
        if delivery.attempt >= self.max_retries:
            record.given_up = True
            self.log_event("event_given_up")
            return
        self._dispatch(record, delivery.attempt + 1, "timeout")


class _KeepaliveSocket(WebSocket):
    """gevent-websocket answers a ping inside receive(); the fake must see each one (and keep
    quiet as a zombie), so its sockets take this class, which hands pings and pongs to the
    hooks the fake put in the socket's environ (WebSocket has __slots__: no attributes)."""
    __slots__ = ()

    def handle_ping(self, header, payload) -> None:
        hook = self.environ.get("fake.on_ping")
        if hook is None:
            return super().handle_ping(header, payload)
        hook(payload)

    def handle_pong(self, header, payload) -> None:
        hook = self.environ.get("fake.on_pong")
        if hook is not None:
            hook(payload)


def _arguments(request: dict) -> tuple[dict, str | None]:
    """The call's arguments and its token (header; or `token` in a form body only)."""
    header = request["headers"].get("Authorization", "")
    token = header[len("Bearer "):].strip() if header.startswith("Bearer ") else None
    ctype = request["headers"].get("Content-Type", "").split(";")[0].strip().lower()
    body = request["body"] or b""
    args: dict = {}
    if ctype == "application/json":
        args = request["json"] if isinstance(request["json"], dict) else {}
    elif body:
        args = {k: v[-1] for k, v in urllib.parse.parse_qs(body.decode("utf-8", "replace")).items()}
        token = token or args.pop("token", None)
    return args, token


class Driver(PlatformDriver):
    """The fleet's and the contract kit's handle on this fake (see testing/driver.py). Message
    ids are the adapter's: "channel:ts"; a reply belongs to the message whose thread it is in."""
    platform = "slack"
    max_reply_chars = 4000

    def __init__(self, keepalive: Keepalive | None = None, *, secret: str | None = None) -> None:
        super().__init__(keepalive, secret=secret)
        k = self.keepalive
        tokens = {"bot_token": f"xoxb-{secret}"} if secret else {}
        self.fake = FakeSlackServer(server_ping_interval_s=k.interval_s,
                                    pong_deadline_s=k.deadline_s, **tokens)

    def bot_config(self, **extra: Any) -> dict:
        return {"app_token": self.fake.app_token, "bot_token": self.fake.bot_token,
                "api_base": self.fake.api_base, "ping_interval_s": self.keepalive.interval_s,
                **extra}

    def bad_credentials_config(self, **extra: Any) -> dict:
        return self.bot_config(bot_token="xoxb-not-the-token", **extra)

    def user_says(self, text: str, *, chat: int = 0, user: int | None = None,
                  group: bool = False) -> str:
        who = f"U0USER{chat if user is None else user}"
        if group:
            channel = f"C0CHAN{chat}"
            return f"{channel}:{self.fake.send_mention(text, channel=channel, user=who)}"
        return f"{self.fake.dm_channel(who)}:{self.fake.send_dm(text, user=who)}"

    def redeliver(self, message_id: str) -> None:
        channel, _, ts = message_id.partition(":")
        self.fake.send_event(dict(self.fake.user_events[(channel, ts)]))

    def reply_rows(self) -> list[ReplyRow]:
        return [ReplyRow(f"{m.channel}:{m.thread_ts}",
                         self.fake.messages.get((m.channel, m.ts), m).text,
                         m.at) for m in self.fake.posts if m.thread_ts is not None]

    def lateness(self) -> list[float]:
        """How much later than one interval after the previous ping each ping came."""
        interval = self.keepalive.interval_s
        return [max(0.0, b - a - interval) for times in list(self.fake.keepalive_times.values())
                for a, b in zip(times, times[1:])]

    def keepalives(self) -> int:
        return sum(len(t) for t in self.fake.keepalive_times.values())

    def session_up_at(self, conn_id: int) -> float | None:
        return self.fake.hello_at.get(conn_id)

    # -- media -----------------------------------------------------------------------------
    def user_sends_media(self, data: bytes, *, kind: str, name: str, mime: str,
                         transcript: str | None = None, chat: int = 0) -> str:
        who = f"U0USER{chat}"
        return f"{self.fake.dm_channel(who)}:" \
               f"{self.fake.send_file_dm(data, name=name, mimetype=mime, user=who)}"

    # files_sent / hold / held / release: the PlatformDriver's (this fake keeps the same records)
    def uploads(self) -> int:
        return self.fake.uploads
