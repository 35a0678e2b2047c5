"""The outbox loop against a store whose read of due rows yields (Redis does: it is a network
round trip). A chat's sender that finishes while such a read is on the way must not have its
row sent again by a new sender started from the stale answer: that was a duplicate reply, seen
under load on Redis (tests/test_cluster.py) and forced here step by step."""
import gevent
import gevent.event
import pytest

from hermes_green.config import Config
from hermes_green.gateway import Gateway
from tests.fakes.fake_testchat import FakeTestChat
from tests.fakes.testchat_adapter import TestChatAdapter
from tests.fakes.testchat_adapter import testchat_config as chat_config
from tests.support import GateAgent, base_config, wait_until


@pytest.fixture
def fake():
    f = FakeTestChat().start()
    yield f
    f.stop()


def test_a_row_sent_while_the_due_rows_were_read_is_not_sent_again(tmp_path, fake):
    send_entered, send_gate = gevent.event.Event(), gevent.event.Event()
    read_stalled, read_gate = gevent.event.Event(), gevent.event.Event()
    stall_next_read = []

    class GatedAdapter(TestChatAdapter):
        def send(self, out):
            send_entered.set()
            send_gate.wait()
            super().send(out)

    config = Config.model_validate(base_config(tmp_path / "data"))
    gw = Gateway(config, agent=GateAgent(), adapter_factories={
        "testchat": lambda cfg, on_message, **kw: GatedAdapter(chat_config(fake.ws_url),
                                                               on_message, **kw)})
    read = gw.store.outbox_due

    def slow_read(bot, **kw):
        rows = read(bot, **kw)
        if stall_next_read:  # the answer is on its way back while the world moves on
            stall_next_read.clear()
            read_stalled.set()
            read_gate.wait()
        return rows
    gw.store.outbox_due = slow_read
    gw.start()
    try:
        wait_until(lambda: "testchat" in gw.adapters and gw.adapters["testchat"].ready.is_set(),
                   what="testchat connected")
        mid = fake.send_user_message("one", chat="a")
        send_entered.wait(10)  # the chat's sender is sending the answer
        stall_next_read.append(True)
        gw._outbox_wake["testchat"].set()  # the loop reads the due rows: that row among them
        assert read_stalled.wait(10)
        send_gate.set()  # the send ends: accepted, row deleted, sender gone
        fake.wait_for(lambda: fake.replies_to(mid), timeout=10)
        wait_until(lambda: gw.store.outbox_pending() == 0, what="row deleted")
        gevent.sleep(0)  # the sender's greenlet finishes its last lines
        read_gate.set()  # the stale answer arrives
        later = fake.send_user_message("two", chat="a")
        fake.wait_for(lambda: fake.replies_to(later), timeout=10)  # same chat: FIFO after it
        assert [r["text"] for r in fake.replies_to(mid)] == ["answer: one"]
    finally:
        send_gate.set()
        read_gate.set()
        gw.shutdown()
