"""Feishu long connection, baseline: endpoint POST for the URL and PingInterval, protobuf ping
control frames (first one at once), events acked on receipt (same frame + biz_rt, payload
{"code": 200}), replies over REST with a cached tenant token."""
from __future__ import annotations

import json
import time
from urllib.parse import parse_qs, urlparse

from lark_oapi.ws.pb.pbbp2_pb2 import Frame

from common import Connection, Inbound, raise_for_api

CONTROL, DATA = 0, 1


class Feishu(Connection):
    name = "feishu"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.ping_interval_s = 120.0
        self.service_id = 0
        self._token: tuple[str, float] | None = None  # (token, expires at, monotonic)

    async def url(self) -> str:
        resp = await self.http.post(f"{self.config['domain']}/callback/ws/endpoint",
                                    json={"AppID": self.config["app_id"],
                                          "AppSecret": self.config["app_secret"]})
        data = raise_for_api(resp, "endpoint")["data"]
        self._apply_client_config(data.get("ClientConfig") or {})
        url = data["URL"]
        self.service_id = int(parse_qs(urlparse(url).query)["service_id"][0])
        return url

    def _apply_client_config(self, conf: dict) -> None:
        if conf.get("PingInterval"):
            self.ping_interval_s = float(conf["PingInterval"])

    async def on_open(self) -> None:
        self.start_heartbeat(lambda: self.ping_interval_s, 0.0)

    async def beat(self) -> None:
        ping = Frame(SeqID=0, LogID=0, service=self.service_id, method=CONTROL)
        ping.headers.add(key="type", value="ping")
        await self.send(ping.SerializeToString())

    async def on_frame(self, raw) -> None:
        received = time.monotonic()
        frame = Frame()
        frame.ParseFromString(raw)
        headers = {h.key: h.value for h in frame.headers}
        if frame.method == CONTROL:
            if headers.get("type") == "pong" and frame.payload:
                self._apply_client_config(json.loads(frame.payload))
            return
        # Data: ack at once (the same frame, its headers + biz_rt, payload {"code": 200}).
        # The fleet never splits payloads (sum == 1), so parts are not joined here.
        ack = Frame()
        ack.CopyFrom(frame)
        ack.headers.add(key="biz_rt", value=str(int((time.monotonic() - received) * 1000)))
        ack.payload = b'{"code": 200}'
        await self.send(ack.SerializeToString())
        envelope = json.loads(frame.payload)
        if envelope.get("header", {}).get("event_type") != "im.message.receive_v1":
            return
        message = envelope["event"]["message"]
        if message.get("message_type") != "text":
            return
        text = json.loads(message["content"]).get("text", "")
        self.deliver(Inbound(self.name, message["chat_id"], message["message_id"], text))

    async def _tenant_token(self) -> str:
        if self._token is None or self._token[1] <= time.monotonic():
            resp = await self.http.post(
                f"{self.config['domain']}/open-apis/auth/v3/tenant_access_token/internal",
                json={"app_id": self.config["app_id"], "app_secret": self.config["app_secret"]})
            body = raise_for_api(resp, "tenant token")
            self._token = (body["tenant_access_token"],
                           time.monotonic() + float(body["expire"]) - 60)
        return self._token[0]

    async def reply(self, msg: Inbound, text: str) -> None:
        token = await self._tenant_token()
        resp = await self.http.post(
            f"{self.config['domain']}/open-apis/im/v1/messages/{msg.mid}/reply",
            headers={"Authorization": f"Bearer {token}"},
            json={"msg_type": "text", "content": json.dumps({"text": text}, ensure_ascii=False)})
        raise_for_api(resp, "reply")
