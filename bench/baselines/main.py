"""Run one asyncio baseline gateway until SIGTERM/SIGINT (then exit 0; turns still running are
abandoned, as a typical gateway's shutdown does).

    python bench/baselines/main.py --config cfg.json --tools inline|threads

cfg.json: {"agent": FakeFleet.agent_config(), "platforms": FakeFleet.platforms_config()}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import httpx  # noqa: E402

from agent import Agent  # noqa: E402
from common import Connection, Inbound, log  # noqa: E402
from feishu import Feishu  # noqa: E402
from qqbot import QQBot  # noqa: E402
from wecom import WeCom  # noqa: E402

ADAPTERS = {"wecom": WeCom, "feishu": Feishu, "qqbot": QQBot}


async def main(config: dict, tools_mode: str) -> int:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with httpx.AsyncClient(trust_env=False, timeout=30) as http:
        agent = Agent(config["agent"], http, tools_mode)
        locks: dict[tuple[str, str], asyncio.Lock] = {}

        async def handle(conn: Connection, msg: Inbound) -> None:
            async with locks.setdefault((msg.platform, msg.chat), asyncio.Lock()):
                try:
                    text = await agent.run_turn(f"{msg.platform}:{msg.chat}", msg.text)
                except Exception as e:  # noqa: BLE001
                    log("turn_failed", platform=msg.platform, msg=msg.mid, error=type(e).__name__)
                    text = "Sorry, something went wrong."
                await conn.send_reply(msg, text)

        conns = [ADAPTERS[name](cfg, handle, http)
                 for name, cfg in config["platforms"].items() if name in ADAPTERS]
        tasks = [asyncio.create_task(c.run(), name=c.name) for c in conns]
        log("started", tools=tools_mode, platforms=",".join(c.name for c in conns))
        await stop.wait()
        log("stopping")
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return 0


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--tools", choices=("inline", "threads"), required=True)
    args = ap.parse_args()
    with open(args.config) as f:
        cfg = json.load(f)
    sys.exit(asyncio.run(main(cfg, args.tools)))
