"""What the three baseline adapters share: a reconnecting WebSocket connection with a heartbeat
task on a fixed timetable, the inbound message, dedup, per-chat locks and send-with-retry."""
from __future__ import annotations

import asyncio
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

RECONNECT_DELAY_S = 2.0  # fixed, like the competitor's ~2 s
SEND_ATTEMPTS, SEND_RETRY_DELAY_S = 3, 1.0
DEDUP_SIZE = 4096


def log(event: str, **kv: Any) -> None:
    fields = " ".join(f"{k}={v}" for k, v in kv.items())
    sys.stderr.write(f"{time.strftime('%H:%M:%S')} baseline {event} {fields}\n")
    sys.stderr.flush()


@dataclass
class Inbound:
    platform: str
    chat: str
    mid: str
    text: str
    ref: dict = field(default_factory=dict)  # what the reply needs (req_id, openid, ...)


Handler = Callable[["Connection", Inbound], Awaitable[None]]


class Connection:
    """One platform: connect (REST steps + WebSocket), read frames, beat, reconnect after 2 s."""

    name = "?"

    def __init__(self, config: dict, handler: Handler, http: httpx.AsyncClient) -> None:
        self.config = config
        self.handler = handler
        self.http = http
        self.ws = None
        self._beat: asyncio.Task | None = None
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._tasks: set[asyncio.Task] = set()

    # -- for subclasses -----------------------------------------------------------------------
    async def url(self) -> str:
        raise NotImplementedError

    async def on_open(self) -> None:
        pass

    async def on_frame(self, raw: str | bytes) -> None:
        raise NotImplementedError

    async def beat(self) -> None:
        raise NotImplementedError

    async def reply(self, msg: Inbound, text: str) -> None:
        raise NotImplementedError

    # -- connection ---------------------------------------------------------------------------
    async def run(self) -> None:
        while True:
            try:
                url = await self.url()
                async with connect(url, ping_interval=None, proxy=None, max_size=2**22) as ws:
                    self.ws = ws
                    log("connected", platform=self.name)
                    await self.on_open()
                    async for raw in ws:
                        await self.on_frame(raw)
                    reason = f"closed code={ws.close_code}"
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001  (whatever broke the connection: reconnect)
                reason = f"{type(e).__name__}: {e}"
            finally:
                self.ws = None
                if self._beat is not None:
                    self._beat.cancel()
                    self._beat = None
            log("disconnected", platform=self.name, reason=reason.replace(" ", "_")[:120],
                reconnect_in_s=RECONNECT_DELAY_S)
            await asyncio.sleep(RECONNECT_DELAY_S)

    def start_heartbeat(self, interval_s: Callable[[], float], first_in_s: float) -> None:
        """Beat on a fixed timetable: beat k is due at start + first + sum of intervals, whatever
        the loop did in between (a late beat is followed by the next one on time)."""
        if self._beat is not None:
            self._beat.cancel()
        self._beat = asyncio.create_task(self._heartbeat(interval_s, first_in_s))

    async def _heartbeat(self, interval_s: Callable[[], float], first_in_s: float) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + first_in_s
        while self.ws is not None:
            await asyncio.sleep(max(0.0, due - loop.time()))
            try:
                await self.beat()
            except (OSError, WebSocketException) as e:
                log("heartbeat_failed", platform=self.name, error=type(e).__name__)
                return
            due += interval_s()

    async def send(self, data: str | bytes) -> None:
        ws = self.ws
        if ws is None:
            raise ConnectionError(f"{self.name} is not connected")
        await ws.send(data)

    # -- inbound ------------------------------------------------------------------------------
    def deliver(self, msg: Inbound) -> None:
        """Hand a message to the agent as its own task (after the ack), once per message id."""
        if msg.mid in self._seen:
            log("duplicate_dropped", platform=self.name, msg=msg.mid)
            return
        self._seen[msg.mid] = None
        while len(self._seen) > DEDUP_SIZE:
            self._seen.popitem(last=False)
        task = asyncio.create_task(self.handler(self, msg))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def send_reply(self, msg: Inbound, text: str) -> bool:
        """A typical send-with-retry, in memory: after the last attempt the reply is lost."""
        for attempt in range(1, SEND_ATTEMPTS + 1):
            try:
                await self.reply(msg, text)
                return True
            except Exception as e:  # noqa: BLE001  (any failure: retry, then give up)
                log("reply_failed", platform=self.name, msg=msg.mid, attempt=attempt,
                    error=type(e).__name__)
                if attempt < SEND_ATTEMPTS:
                    await asyncio.sleep(SEND_RETRY_DELAY_S)
        log("reply_lost", platform=self.name, msg=msg.mid)
        return False


def raise_for_api(resp: httpx.Response, what: str) -> dict:
    """The JSON body of a REST answer; an error status or a nonzero `code` raises."""
    body = resp.json() if resp.content else {}
    if resp.status_code >= 400 or (isinstance(body, dict) and body.get("code", 0) != 0):
        raise RuntimeError(f"{what} failed status={resp.status_code} code={body.get('code')}")
    return body
