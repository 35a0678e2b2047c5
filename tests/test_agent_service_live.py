"""Opt-in: the service backend against a real hermes-agent API server.

Skipped unless HERMES_AGENT_URL is set, e.g. with hermes-agent's gateway running locally
(`API_SERVER_ENABLED=true`, `API_SERVER_KEY=...` in ~/.hermes/.env, then `hermes gateway`):

    HERMES_AGENT_URL=http://127.0.0.1:8642/v1 HERMES_AGENT_KEY=<API_SERVER_KEY> \\
        .venv/bin/python -m pytest -q tests/test_agent_service_live.py

It checks what the fake cannot promise: the server accepts our conversation id and echoes it,
and a second turn that carries only its own text is answered from the first (the server kept
the history). The answers come from a real model, so the second check asks for a code word.
"""
import os
import uuid

import pytest
import requests
import yaml

from hermes_green.agent.base import Turn
from hermes_green.agent.service import ServiceAgent
from hermes_green.config import parse_config

URL = os.environ.get("HERMES_AGENT_URL", "")
KEY = os.environ.get("HERMES_AGENT_KEY", "")

pytestmark = pytest.mark.skipif(not URL, reason="set HERMES_AGENT_URL (and HERMES_AGENT_KEY) "
                                                "to check against a real hermes-agent")


def test_a_real_hermes_agent_keeps_the_conversation_named_by_our_id():
    agent_cfg = parse_config(yaml.safe_dump({"agent": {
        "backend": "service", "base_url": URL, "api_key": KEY, "timeout_s": 300,
        "service": {"namespace": f"live-{uuid.uuid4().hex}"}}}), env={}).agent  # a fresh chat
    agent = ServiceAgent(agent_cfg)
    chat_key = ("live-test", "chat-1")
    conversation = agent.conversation_id(chat_key)
    word = f"green{uuid.uuid4().hex[:6]}"
    try:
        r = requests.post(f"{URL.rstrip('/')}/chat/completions", timeout=300,
                          headers={"Authorization": f"Bearer {KEY}",
                                   "X-Hermes-Session-Id": conversation},
                          json={"model": agent_cfg.model, "messages": [{"role": "user", "content":
                                f"Remember the code word {word}. Reply with just OK."}]})
        assert r.status_code == 200, r.text[:300]
        assert r.headers.get("X-Hermes-Session-Id") == conversation
        progress: list[str] = []
        answer = agent.run_turn(Turn(chat_key=chat_key, text="What was the code word? Answer "
                                     "with the word only.", on_progress=progress.append))
    finally:
        agent.close()
    assert word in answer
    assert progress and progress[-1] == answer
