"""The three strict platform fakes and the fake LLM as one fleet, with one view over their
records: the demo, the cascade test and the cascade benchmark all speak to this.

Each fake keeps its own protocol's records (WeCom streams, Feishu uuids, QQ msg_seq); the
fleet answers the questions every scenario asks, the same way for all three:
    send(platform, text, chat)     a user writes; returns the platform's message id
    answers(platform, mid)         the reply texts the user saw for that message, in order
    lateness(platform)             how late each keepalive arrived against its timetable (s)
    disconnects(platform)          connections the fake dropped or saw dropped while running
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import gevent

from .fake_feishu import FakeFeishuServer
from .fake_llm import FakeLLM
from .fake_qqbot import FakeQQBotServer
from .fake_wecom import FakeWeComServer

PLATFORMS = ("wecom", "feishu", "qqbot")
# Disconnect reasons that are not failures: the test/bench ended the connection itself.
_BENIGN = {"server_stopping", "kicked_by_test"}


@dataclass
class Keepalive:
    """Keepalive timing every fake enforces: beats every `interval_s`, and a client whose
    last beat is older than `deadline_s` is dropped (QQ closes with 4009)."""
    interval_s: float = 1.0
    deadline_s: float = 1.5


class FakeFleet:
    def __init__(self, platforms=PLATFORMS, *, keepalive: Keepalive | None = None,
                 llm_chunk_delay_s: float = 0.02, llm_api_key: str = "sk-fake-fleet-key",
                 secrets: dict[str, str] | None = None) -> None:
        self.platforms = tuple(platforms)
        self.keepalive = keepalive or Keepalive()
        secrets = secrets or {}
        self.llm = FakeLLM(api_key=llm_api_key, chunk_delay_s=llm_chunk_delay_s)
        self.llm_api_key = llm_api_key
        k = self.keepalive
        self.fakes: dict[str, Any] = {}
        if "wecom" in self.platforms:
            self.fakes["wecom"] = FakeWeComServer(
                bot_id="aib-fleet", secret=secrets.get("wecom", "wecom-fleet-secret"),
                ping_interval_s=k.interval_s, keepalive_deadline_s=k.deadline_s)
        if "feishu" in self.platforms:
            self.fakes["feishu"] = FakeFeishuServer(
                app_id="cli_fleet", app_secret=secrets.get("feishu", "feishu-fleet-secret"),
                ping_interval_s=k.interval_s, keepalive_deadline_s=k.deadline_s,
                first_ping_deadline_s=max(1.0, k.deadline_s))
        if "qqbot" in self.platforms:
            self.fakes["qqbot"] = FakeQQBotServer(
                app_id="102000777", client_secret=secrets.get("qqbot", "qq-fleet-secret"),
                heartbeat_interval_ms=k.interval_s * 1000, heartbeat_deadline_s=k.deadline_s)
        self._sent: dict[str, list[str]] = {p: [] for p in self.platforms}

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> "FakeFleet":
        self.llm.start()
        for fake in self.fakes.values():
            fake.start()
        return self

    def stop(self) -> None:
        for fake in self.fakes.values():
            fake.stop()
        self.llm.stop()

    # -- configuration a gateway (or a baseline) needs -----------------------------------------
    def platforms_config(self, backoff: dict | None = None) -> dict:
        cfg: dict[str, dict] = {}
        extra = {"backoff": backoff} if backoff else {}
        if "wecom" in self.fakes:
            f = self.fakes["wecom"]
            cfg["wecom"] = {"bot_id": f.bot_id, "secret": f.secret, "url": f.ws_url,
                            "ping_interval_s": self.keepalive.interval_s, **extra}
        if "feishu" in self.fakes:
            f = self.fakes["feishu"]
            cfg["feishu"] = {"app_id": f.app_id, "app_secret": f.app_secret,
                             "domain": f.http_base, **extra}
        if "qqbot" in self.fakes:
            f = self.fakes["qqbot"]
            cfg["qqbot"] = {"app_id": f.app_id, "client_secret": f.client_secret,
                            "api_base": f.http_base, "token_url": f.token_url, **extra}
        return cfg

    def agent_config(self, **over) -> dict:
        return {"base_url": self.llm.base_url, "api_key": self.llm_api_key,
                "model": "fake-model", "tools": ["hermes_green.agent.demo_tools"], **over}

    # -- users ---------------------------------------------------------------------------------
    def send(self, platform: str, text: str, chat: int = 0) -> str:
        fake = self.fakes[platform]
        if platform == "wecom":
            mid = fake.send_user_message(text, chattype="single", userid=f"user{chat}")
        elif platform == "feishu":
            mid = fake.send_user_message(text, chat_type="p2p", open_id=f"ou_user{chat}")
        else:
            mid = fake.send_user_message(text, kind="c2c", openid=f"user-openid-{chat}")
        self._sent[platform].append(mid)
        return mid

    def sent(self, platform: str) -> list[str]:
        return list(self._sent[platform])

    def answers(self, platform: str, mid: str) -> list[str]:
        fake = self.fakes[platform]
        if platform == "wecom":
            return [r.content for r in fake.replies_to(mid)]
        if platform == "feishu":
            return [r.text for r in fake.replies_to(mid)]
        return [r.content for r in fake.replies if r.msg_id == mid]

    def first_answer_at(self, platform: str, mid: str) -> float | None:
        """time.monotonic() of the first reply to `mid` (None if unanswered)."""
        fake = self.fakes[platform]
        if platform == "wecom":
            rows = fake.replies_to(mid)
        elif platform == "feishu":
            rows = fake.replies_to(mid)
        else:
            rows = [r for r in fake.replies if r.msg_id == mid]
        return min((r.at for r in rows), default=None)

    def wait_for(self, predicate, timeout: float = 30.0, what=None):
        """Wait until predicate() is truthy: re-checked whenever any fake records something
        (and at least every 50 ms). `what()` describes the state for the failure message."""
        deadline = time.monotonic() + timeout
        while not (value := predicate()):
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout}s"
                                     + (f": {what()}" if what else ""))
            for fake in self.fakes.values():
                fake._changed.clear()
            gevent.wait([f._changed for f in self.fakes.values()], timeout=0.05, count=1)
        return value

    def reply_rows(self, platform: str) -> list[tuple[str, str, float]]:
        """Every reply the fake accepted as (message id, text, monotonic time), in order."""
        fake = self.fakes[platform]
        if platform == "wecom":
            return [(r.msgid, r.content, r.at) for r in fake.replies]
        if platform == "feishu":
            return [(r.message_id, r.text, r.at) for r in fake.replies]
        return [(r.msg_id, r.content, r.at) for r in fake.replies]

    def reply_count(self, platform: str) -> int:
        return len(self.fakes[platform].replies)

    def answer_index(self, platform: str) -> dict[str, tuple[list[str], float]]:
        """message id -> (reply texts, first reply time), built in one pass (benchmarks)."""
        index: dict[str, tuple[list[str], float]] = {}
        for mid, text, at in self.reply_rows(platform):
            texts, first = index.get(mid, ([], at))
            texts.append(text)
            index[mid] = (texts, min(first, at))
        return index

    def all_answered(self) -> bool:
        return all(self.answers(p, mid) for p in self.platforms for mid in self._sent[p])

    # -- connection health -----------------------------------------------------------------------
    def lateness(self, platform: str) -> list[float]:
        fake = self.fakes[platform]
        out: list[float] = []
        for conn_id in list(fake.keepalive_times):
            if platform == "wecom":
                out += fake.keepalive_lateness(conn_id, self.keepalive.interval_s)
            elif platform == "feishu":
                out += fake.keepalive_lateness(conn_id, self.keepalive.interval_s)
            else:
                out += fake.keepalive_lateness(conn_id)
        return [max(0.0, x) for x in out]

    def keepalives(self, platform: str) -> int:
        return sum(len(v) for v in self.fakes[platform].keepalive_times.values())

    def session_up_at(self, platform: str, conn_id: int) -> float | None:
        """time.monotonic() when the session on that connection was established, as the fake
        saw it: WeCom's subscribe answer, QQ's READY/RESUMED, Feishu's first ping."""
        fake = self.fakes[platform]
        if platform == "wecom":
            return fake.subscribed_at.get(conn_id)
        if platform == "feishu":
            times = fake.keepalive_times.get(conn_id) or []
            return times[0] if times else None
        return next((f.at for f in fake.frames if f.direction == "out" and f.conn_id == conn_id
                     and isinstance(f.data, dict) and f.data.get("t") in ("READY", "RESUMED")),
                    None)

    def disconnects(self, platform: str) -> list:
        return [d for d in self.fakes[platform].disconnects if d.reason not in _BENIGN]

    def connected(self, platform: str) -> bool:
        return bool(self.fakes[platform].live_conns())

    def summary(self, platform: str) -> dict:
        from hermes_green.runtime import percentile
        sent = self._sent[platform]
        answers = {mid: self.answers(platform, mid) for mid in sent}
        late = self.lateness(platform)
        return {
            "sent": len(sent),
            "answered": sum(1 for a in answers.values() if a),
            "lost": sum(1 for a in answers.values() if not a),
            "duplicated": sum(1 for a in answers.values() if len(a) != len(set(a))),
            "disconnects": len(self.disconnects(platform)),
            "keepalives": len(late),
            "lateness_p50_ms": round(percentile(late, 50) * 1000, 2),
            "lateness_p99_ms": round(percentile(late, 99) * 1000, 2),
            "lateness_max_ms": round(max(late, default=0.0) * 1000, 2),
        }
