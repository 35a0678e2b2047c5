"""`hermes-green check`: know before going live that everything the config names works.

One line per check (`ok`, `FAIL` or `skip`, a name, a detail), exit 1 when any failed. Each
platform performs its real auth step (token / endpoint / subscribe) without keeping a long
connection; the LLM's `models` endpoint is called; every tool module is imported.
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable

import gevent
import requests

from .config import Config

CHECK_TIMEOUT_S = 20.0


def _line(status: str, name: str, detail: str) -> None:
    sys.stdout.write(f"{status:<4} {name}: {detail}\n")  # cli-output
    sys.stdout.flush()


def check_runtime() -> str:
    from gevent import monkey
    patched = [m for m in ("socket", "ssl", "threading", "time", "select")
               if monkey.is_module_patched(m)]
    missing = {"socket", "ssl", "threading"} - set(patched)
    if missing:
        raise RuntimeError(f"not monkey-patched: {', '.join(sorted(missing))}")
    return f"gevent {gevent.__version__} monkey-patched ({', '.join(patched)})"


def check_data_dir(config: Config) -> str:
    """The store the gateway would open (the SQLite file, or Redis with gateway.store)."""
    from .store_base import make_store
    store = make_store(config.gateway).open()
    try:
        return f"{store.describe()} (pending replies: {store.outbox_pending()})"
    finally:
        store.close()


def check_platform(platform: str, cfg, full: bool) -> str:
    from .platforms import registry
    return registry.adapter_class(platform).check(cfg, full=full)


def check_llm(config: Config) -> str:
    agent = config.agent
    headers = dict(agent.extra_headers)
    if agent.api_key is not None:
        headers["Authorization"] = f"Bearer {agent.api_key.get_secret_value()}"
    url = agent.base_url.rstrip("/") + "/models"
    resp = requests.get(url, headers=headers, timeout=(agent.connect_timeout_s, 15))
    if resp.status_code in (401, 403):
        raise RuntimeError(f"{url} refused the API key (HTTP {resp.status_code})")
    if resp.status_code != 200:
        raise RuntimeError(f"{url} answered HTTP {resp.status_code}")
    models = [m.get("id") for m in (resp.json().get("data") or []) if isinstance(m, dict)]
    listed = "listed" if agent.model in models else "NOT listed (check agent.model)"
    return f"{url}: {len(models)} models, '{agent.model}' {listed}"


def check_tool_module(module: str) -> str:
    importlib.import_module(module)
    return "imported"


def run_check(config: Config, *, full: bool = False) -> int:
    from .logs import REDACTOR, config_secrets
    REDACTOR.add(config_secrets(config))
    checks: list[tuple[str, Callable[[], str]]] = [
        ("runtime", check_runtime),
        ("config", lambda: f"{len(config.platforms.bots())} bot(s) enabled: "
                           f"{', '.join(b.label for b in config.platforms.bots()) or 'none'}"),
        ("store" if config.gateway.store else "data_dir", lambda: check_data_dir(config)),
    ]
    for bot in config.platforms.bots():
        checks.append((f"platform {bot.label}",
                       lambda p=bot.platform, c=bot.config: check_platform(p, c, full)))
    if config.agent is not None:
        checks.append(("llm", lambda: check_llm(config)))
        for module in config.agent.tools:
            checks.append((f"tools {module}", lambda m=module: check_tool_module(m)))
    failed = 0
    for name, fn in checks:
        try:
            with gevent.Timeout(CHECK_TIMEOUT_S, TimeoutError(f"no answer in {CHECK_TIMEOUT_S:.0f}s")):
                detail = fn()
            _line("ok", name, REDACTOR(str(detail)))
        except Exception as e:  # each check reports its own failure; the others still run
            failed += 1
            _line("FAIL", name, REDACTOR(f"{type(e).__name__}: {e}"))
    if config.agent is None:
        _line("skip", "llm", "no agent section: the echo agent answers")
    return 1 if failed else 0
