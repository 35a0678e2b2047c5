"""QQ Bot gateway v2, baseline: token, gateway URL, Hello -> identify (or resume after a drop)
-> heartbeats every heartbeat_interval from Hello carrying the last seq; C2C / group messages
in; passive replies over REST with msg_id and msg_seq."""
from __future__ import annotations

import json
import time

from common import Connection, Inbound, log, raise_for_api

INTENTS = 1 << 25  # GROUP_AND_C2C_EVENT


class QQBot(Connection):
    name = "qqbot"

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self._token: tuple[str, float] | None = None
        self.session_id: str | None = None
        self.seq: int | None = None
        self.interval_s = 30.0

    async def token(self) -> str:
        if self._token is None or self._token[1] <= time.monotonic():
            resp = await self.http.post(self.config["token_url"], json={
                "appId": self.config["app_id"], "clientSecret": self.config["client_secret"]})
            body = raise_for_api(resp, "token")
            self._token = (body["access_token"],
                           time.monotonic() + float(body["expires_in"]) - 60)
        return self._token[0]

    async def _headers(self) -> dict:
        return {"Authorization": f"QQBot {await self.token()}",
                "X-Union-Appid": self.config["app_id"]}

    async def url(self) -> str:
        resp = await self.http.get(f"{self.config['api_base']}/gateway/bot",
                                   headers=await self._headers())
        return raise_for_api(resp, "gateway")["url"]

    async def beat(self) -> None:
        await self.send(json.dumps({"op": 1, "d": self.seq}))

    async def on_frame(self, raw) -> None:
        frame = json.loads(raw)
        op, d = frame.get("op"), frame.get("d")
        if frame.get("s") is not None:
            self.seq = frame["s"]
        if op == 10:  # Hello: beat from now on, then identify or resume
            self.interval_s = d["heartbeat_interval"] / 1000.0
            self.start_heartbeat(lambda: self.interval_s, self.interval_s)
            token = f"QQBot {await self.token()}"
            if self.session_id and self.seq is not None:
                await self.send(json.dumps({"op": 6, "d": {
                    "token": token, "session_id": self.session_id, "seq": self.seq}}))
            else:
                await self.send(json.dumps({"op": 2, "d": {
                    "token": token, "intents": INTENTS, "shard": [0, 1]}}))
        elif op == 0:
            self._dispatch(frame.get("t"), d)
        elif op == 7:  # reconnect and resume
            await self.ws.close()
        elif op == 9:  # invalid session: identify fresh next time
            self.session_id, self.seq = None, None
            await self.ws.close()

    def _dispatch(self, event: str, d: dict) -> None:
        if event == "READY":
            self.session_id = d["session_id"]
            log("ready", platform=self.name)
        elif event == "RESUMED":
            log("resumed", platform=self.name)
        elif event == "C2C_MESSAGE_CREATE":
            openid = d["author"]["user_openid"]
            self.deliver(Inbound(self.name, openid, d["id"], d["content"],
                                 {"path": f"/v2/users/{openid}/messages"}))
        elif event == "GROUP_AT_MESSAGE_CREATE":
            group = d["group_openid"]
            self.deliver(Inbound(self.name, group, d["id"], d["content"].strip(),
                                 {"path": f"/v2/groups/{group}/messages"}))

    async def reply(self, msg: Inbound, text: str) -> None:
        resp = await self.http.post(f"{self.config['api_base']}{msg.ref['path']}",
                                    headers=await self._headers(),
                                    json={"msg_type": 0, "content": text, "msg_id": msg.mid,
                                          "msg_seq": 1})
        raise_for_api(resp, "reply")
