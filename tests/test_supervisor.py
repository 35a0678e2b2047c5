"""An adapter that crashes is restarted with backoff; the other platform keeps its connection
and keeps answering."""
import gevent
import gevent.event

from hermes_green.platforms.base import PlatformAdapter, State
from tests.fakes.fake_testchat import FakeTestChat
from tests.support import GateAgent, start_inprocess_gateway, wait_until


class CrashingAdapter(PlatformAdapter):
    """Crashes on its first `crashes` runs, then runs until stopped."""
    name = "crashy"
    runs = 0
    crashes = 3

    def __init__(self, config, on_message, **kw):
        super().__init__(config, on_message, **kw)
        self._stop = gevent.event.Event()

    def run(self):
        type(self).runs += 1
        if type(self).runs <= self.crashes:
            raise RuntimeError("adapter bug")
        self._set_state(State.READY)
        self._stop.wait()

    def stop(self):
        super().stop()
        self._stop.set()


def test_crashing_adapter_is_restarted_and_others_keep_serving(tmp_path):
    fake = FakeTestChat().start()
    CrashingAdapter.runs = 0
    gw = start_inprocess_gateway(tmp_path, fake, GateAgent(),
                                 extra_factories={"crashy": CrashingAdapter})
    try:
        answered = fake.send_user_message("still there?")
        fake.wait_for(lambda: fake.replies_to(answered))
        wait_until(lambda: gw.adapters["crashy"].stats.state is State.READY, timeout=15,
                   what="crashy adapter restarted")
        assert CrashingAdapter.runs == 4
        # the test platform never noticed: one connection, no disconnect
        assert len(fake.conns) == 1 and fake.disconnects == []
        assert gw.adapters["testchat"].stats.reconnects == {}
    finally:
        gw.shutdown()
        fake.stop()
