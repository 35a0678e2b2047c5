"""The web chat's own latency, in process: a real gateway, its status server and a page played
from Python (hermes_green/testing/fake_webchat.py), with an agent that answers at once, so what
is measured is the chat's path: page -> journal -> turn -> outbox -> page -> ack.

    python bench/webchat.py [--n 200] [--away 30]

Prints JSON: send -> reply shown, and page opened again -> the reply owed to it shown (the reply
was made while no page was open).
"""
import argparse
import tempfile
import time

import gevent
import gevent.event
from _common import emit, machine, ms_summary

from hermes_green.config import Config
from hermes_green.gateway import Gateway
from hermes_green.status import StatusServer
from hermes_green.testing.fake_webchat import WebChatPage


class Agent:
    def __init__(self) -> None:
        self.gate: gevent.event.Event | None = None

    def run_turn(self, turn) -> str:
        if self.gate is not None:
            self.gate.wait()
        return f"answer: {turn.text}"

    def close(self) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--away", type=int, default=30)
    args = ap.parse_args()
    agent = Agent()
    with tempfile.TemporaryDirectory() as d:
        config = Config.model_validate({
            "gateway": {"data_dir": d, "status": {"port": 0}},
            "platforms": {"webchat": {"rate_limit": {"messages": 0}}}})
        gateway = Gateway(config, agent=agent).start()
        server = gateway.status_server = StatusServer(gateway, config.gateway.status).start()
        while not (gateway.adapters.get("webchat") and gateway.adapters["webchat"].ready.is_set()):
            gevent.sleep(0.01)
        adapter = gateway.adapters["webchat"]
        page = WebChatPage(server.url).open()
        live, back = [], []
        for i in range(args.n):
            t = time.perf_counter()
            mid = page.say(f"message {i}")
            page.wait_for(lambda: page.answer(mid))
            live.append(time.perf_counter() - t)
        for i in range(args.away):
            agent.gate = gevent.event.Event()
            mid = page.say(f"while away {i}")
            page.wait_for(lambda: page.received.get(mid))
            page.close()
            agent.gate.set()
            while not adapter._away:  # the outbox found no page for it
                gevent.sleep(0.005)
            agent.gate = None
            t = time.perf_counter()
            page.open()
            page.wait_for(lambda: page.answer(mid))
            back.append(time.perf_counter() - t)
        page.close()
        gateway.shutdown()
    emit({"bench": "webchat", "machine": machine(),
          "send_to_reply_ms": ms_summary(live),
          "page_back_to_owed_reply_ms": ms_summary(back)})


if __name__ == "__main__":
    main()
