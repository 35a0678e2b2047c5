"""A real gateway process for crash and signal tests: the production runtime, store, sessions
and outbox, with the test platform adapter and a slow echo agent.

    python tests/fakes/gateway_process.py CONFIG_FILE TESTCHAT_WS_URL TURN_DELAY_S

It writes `TURN_STARTED <text>` on stdout when a turn begins, so a test can kill it mid-turn
without guessing at timing, and exits with the gateway's exit code.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import hermes_green.runtime  # noqa: E402,F401  (first, as in bin/hermes-green)

import gevent  # noqa: E402

from hermes_green.cli import _configure_logging  # noqa: E402
from hermes_green.config import load_config  # noqa: E402
from hermes_green.gateway import Gateway  # noqa: E402
from tests.fakes.testchat_adapter import TestChatAdapter, testchat_config  # noqa: E402


class SlowEchoAgent:
    def __init__(self, delay_s: float) -> None:
        self.delay_s = delay_s

    def run_turn(self, turn) -> str:
        sys.stdout.write(f"TURN_STARTED {turn.text}\n")
        sys.stdout.flush()
        gevent.sleep(self.delay_s)
        return f"echo: {turn.text}"

    def close(self) -> None:
        pass


def main() -> int:
    config_path, url, delay = sys.argv[1], sys.argv[2], float(sys.argv[3])
    config = load_config(config_path)
    _configure_logging(config)
    gateway = Gateway(config, agent=SlowEchoAgent(delay), adapter_factories={
        "testchat": lambda cfg, on_message, **kw: TestChatAdapter(testchat_config(url), on_message,
                                                                  **kw)})
    gateway.start()
    sys.stdout.write("GATEWAY_STARTED\n")
    sys.stdout.flush()
    return gateway.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
