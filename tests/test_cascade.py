"""The cascade scenario that breaks single-loop gateways, against a real gateway process.

Every platform's fake enforces a 1 s keepalive with a 1.5 s deadline (a client late by half a
second is dropped; Telegram's long poll must be renewed as promptly), the fake LLM streams
slowly, and a burst of users on every platform asks for pure-Python CPU work (process pool), blocking work (threadpool) and long
streamed answers, then writes again while their turns are still running.

Asserted (correctness only; speed lives in bench/cascade.py): no fake recorded a disconnect,
every message was answered exactly once, the follow-ups sent during a running turn were queued
and answered after it; and, with known secrets in the config and tokens issued by the fakes,
none of them appears anywhere in the gateway's output (debug logging on).
"""
import signal
import sys

import pytest

from hermes_green.testing.fleet import FakeFleet, Keepalive, all_platforms
from tests.support import BIN, Process, write_config

PLATFORMS = all_platforms()
SECRETS = {"wecom": "wecom-SECRET-4f1a9c", "feishu": "feishu-SECRET-77b2e0",
           "qqbot": "qq-SECRET-0c3d5e", "telegram": "7000001:TG-SECRET-5d8e2b",
           "discord": "DISCORD-SECRET-93c1f7", "slack": "SLACK-SECRET-2b7e11",
           "dingtalk": "DINGTALK-SECRET-6a0d42"}
LLM_KEY = "sk-LLM-SECRET-91aa02"
FIRST = ["please compute the primes below 1500000", "hash the word green for me",
         "tell me a long story about keepalives"]
FOLLOW_UP = "and one more thing while you are at it"
CHATS = 3  # per platform: 3 chats on every platform, all turns running at once


def _connected(fleet: FakeFleet) -> bool:
    return all(fleet.keepalives(p) >= 1 for p in fleet.platforms)


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cascade")
    fleet = FakeFleet(keepalive=Keepalive(interval_s=1.0, deadline_s=1.5),
                      llm_chunk_delay_s=0.02, llm_api_key=LLM_KEY, secrets=SECRETS).start()
    cfg = write_config(tmp / "config.yaml", {
        "gateway": {"data_dir": str(tmp / "data"), "log_level": "debug",
                    "status": {"enabled": False}},
        "agent": fleet.agent_config(),
        "executors": {"threads": 4, "processes": 2},
        "platforms": fleet.platforms_config()})
    gw = Process([sys.executable, BIN, "--config", str(cfg)])
    sent: dict[str, list[tuple[str, str, int]]] = {p: [] for p in fleet.platforms}
    try:
        fleet.wait_for(lambda: _connected(fleet), timeout=30)
        for platform in fleet.platforms:
            for chat in range(CHATS):
                mid = fleet.send(platform, FIRST[chat % len(FIRST)], chat=chat)
                sent[platform].append((mid, "first", chat))
        # follow-ups while those turns run: each waits for its chat's turn to end
        for platform in fleet.platforms:
            for chat in range(CHATS):
                mid = fleet.send(platform, FOLLOW_UP, chat=chat)
                sent[platform].append((mid, "follow_up", chat))
        fleet.wait_for(fleet.all_answered, timeout=120,
                       what=lambda: {p: fleet.summary(p) for p in fleet.platforms})
        # keep the connections under watch for two more keepalives on every platform
        seen = {p: fleet.keepalives(p) for p in fleet.platforms}
        fleet.wait_for(lambda: all(fleet.keepalives(p) >= seen[p] + 2 for p in fleet.platforms),
                       timeout=10)
        summaries = {p: fleet.summary(p) for p in fleet.platforms}
        answers = {p: {mid: fleet.answers(p, mid) for mid, _, _ in sent[p]}
                   for p in fleet.platforms}
        first_at = {p: {mid: fleet.first_answer_at(p, mid) for mid, _, _ in sent[p]}
                    for p in fleet.platforms}
        issued = list(fleet.fakes["feishu"].issued_tokens) + list(fleet.fakes["qqbot"].tokens)
    finally:
        if gw.proc.poll() is None:
            gw.signal(signal.SIGTERM)
        code = gw.wait(timeout=60)
        fleet.stop()
    return {"summaries": summaries, "answers": answers, "first_at": first_at, "sent": sent,
            "exit_code": code, "output": "\n".join(gw.lines) + gw.stderr, "issued": issued,
            "tool_calls": fleet.llm.chat_requests}


@pytest.mark.parametrize("platform", PLATFORMS)
def test_no_connection_dropped(cascade, platform):
    s = cascade["summaries"][platform]
    assert s["disconnects"] == 0, s
    assert s["keepalives"] >= 3


@pytest.mark.parametrize("platform", PLATFORMS)
def test_every_message_answered_exactly_once(cascade, platform):
    answers = cascade["answers"][platform]
    assert len(answers) == 2 * CHATS
    for mid, texts in answers.items():
        assert texts, f"{platform} {mid} never answered"
        assert len(texts) == len(set(texts)), f"{platform} {mid} answered twice: {texts}"
    s = cascade["summaries"][platform]
    assert s["lost"] == 0 and s["duplicated"] == 0


@pytest.mark.parametrize("platform", PLATFORMS)
def test_follow_ups_were_queued_behind_the_running_turn(cascade, platform):
    sent, first_at = cascade["sent"][platform], cascade["first_at"][platform]
    for chat in range(CHATS):
        first = next(mid for mid, kind, c in sent if kind == "first" and c == chat)
        follow = next(mid for mid, kind, c in sent if kind == "follow_up" and c == chat)
        assert first_at[follow] > first_at[first]


def test_heavy_tools_really_ran(cascade):
    tool_msgs = [m["content"] for r in cascade["tool_calls"] for m in r.body["messages"]
                 if m.get("role") == "tool"]
    assert any("114155" in t for t in tool_msgs)  # pi(1.5e6), counted in a worker process
    assert len(tool_msgs) >= 2 * len(PLATFORMS)  # a CPU and a hashing tool per platform at least


def test_gateway_drained_and_exited_cleanly(cascade):
    assert cascade["exit_code"] == 0


def test_no_secret_or_token_in_any_output(cascade):
    """Debug logs of a whole cascade run: no config secret, API key or issued token."""
    out = cascade["output"]
    # the grep covers wire traces of the frames that carry credentials, not an empty log:
    # WeCom's subscribe (bot secret) and QQ's identify (access token), both masked
    lines = out.splitlines()
    assert any("frame out platform=wecom" in x and '"aibot_subscribe"' in x
               and '"secret":"***"' in x for x in lines)
    assert any("frame out platform=qqbot" in x and '"op": 2' in x and '"token": "***' in x
               for x in lines)
    leaked = [s for s in [*SECRETS.values(), LLM_KEY, *cascade["issued"]] if s in out]
    assert cascade["issued"], "the fakes issued no tokens: the grep would prove nothing"
    assert leaked == []
