"""WeCom AI bot long connection, baseline: subscribe, ping every interval once subscribed,
callbacks in, one finished stream frame per reply (reusing the callback req_id), each command
waiting up to 5 s for the answer that echoes its req_id."""
from __future__ import annotations

import asyncio
import json
import uuid

from common import Connection, Inbound, log

ACK_TIMEOUT_S = 5.0


def _frame(cmd: str, req_id: str, body: dict | None = None) -> str:
    frame: dict = {"cmd": cmd, "headers": {"req_id": req_id}}
    if body is not None:
        frame["body"] = body
    return json.dumps(frame, ensure_ascii=False)


class WeCom(Connection):
    name = "wecom"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._answers: dict[str, asyncio.Future] = {}
        self._subscribe_req: str | None = None

    async def url(self) -> str:
        return self.config["url"]

    async def on_open(self) -> None:
        self._subscribe_req = f"aibot_subscribe_{uuid.uuid4().hex[:12]}"
        await self.send(_frame("aibot_subscribe", self._subscribe_req,
                               {"bot_id": self.config["bot_id"], "secret": self.config["secret"]}))

    async def beat(self) -> None:
        await self.send(_frame("ping", f"ping_{uuid.uuid4().hex[:12]}"))

    async def on_frame(self, raw) -> None:
        frame = json.loads(raw)
        req_id = (frame.get("headers") or {}).get("req_id", "")
        cmd = frame.get("cmd")
        if cmd is None:  # an answer to one of our commands
            if req_id == self._subscribe_req:
                if frame.get("errcode") != 0:
                    raise ConnectionError(f"subscribe refused errcode={frame.get('errcode')}")
                log("subscribed", platform=self.name)
                self.start_heartbeat(lambda: float(self.config.get("ping_interval_s", 30)),
                                     float(self.config.get("ping_interval_s", 30)))
                return
            waiter = self._answers.pop(req_id, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(frame)
            return
        body = frame.get("body") or {}
        if cmd == "aibot_msg_callback" and body.get("msgtype") == "text":
            chat = body.get("chatid") or body.get("from", {}).get("userid", "")
            self.deliver(Inbound(self.name, chat, body["msgid"], body["text"]["content"],
                                 {"req_id": req_id}))
        elif cmd == "aibot_event_callback":
            log("event", platform=self.name,
                eventtype=body.get("event", {}).get("eventtype"))

    async def reply(self, msg: Inbound, text: str) -> None:
        req_id = msg.ref["req_id"]
        waiter = asyncio.get_running_loop().create_future()
        self._answers[req_id] = waiter
        try:
            await self.send(_frame("aibot_respond_msg", req_id, {
                "msgtype": "stream",
                "stream": {"id": msg.ref.setdefault("stream_id", uuid.uuid4().hex),
                           "finish": True, "content": text}}))
            answer = await asyncio.wait_for(waiter, ACK_TIMEOUT_S)
        finally:
            self._answers.pop(req_id, None)
        if answer.get("errcode") != 0:
            raise RuntimeError(f"reply refused errcode={answer.get('errcode')}")
