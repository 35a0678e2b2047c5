"""Adapter state: the small durable key-value store the gateway hands each adapter
(`adapter.saved_state`), on a real SQLite file, so protocol state survives a restart."""
from hermes_green.platforms.base import MemoryState
from hermes_green.store import Store
from tests.fakes.fake_testchat import FakeTestChat
from tests.support import GateAgent, start_inprocess_gateway


def test_saved_state_survives_a_reopen_and_is_kept_per_platform(data_dir):
    store = Store(data_dir).open()
    qq, other = store.adapter_state("qqbot"), store.adapter_state("feishu")
    qq.put("session", '{"id": "s1", "seq": 3}')
    qq.put("session", '{"id": "s1", "seq": 4}')  # overwritten in place
    other.put("session", "theirs")
    qq.put("gone", "x")
    qq.put("gone", None)  # None deletes
    store.close()

    store = Store(data_dir).open()
    try:
        qq = store.adapter_state("qqbot")
        assert qq.get("session") == '{"id": "s1", "seq": 4}'
        assert qq.get("gone") is None and qq.get("never") is None
        assert store.adapter_state("feishu").get("session") == "theirs"
    finally:
        store.close()


def test_put_soon_writes_the_latest_value_once_and_put_wins_over_it(data_dir):
    """A resume cursor advanced per event costs one store write per SOON_S, not one per event;
    reads see the newest value at once; a plain put (a new session) replaces a pending one."""
    import gevent
    store = Store(data_dir).open()
    writes = []
    real = store.state_put
    store.state_put = lambda bot, key, value: (writes.append(value), real(bot, key, value))
    qq = store.adapter_state("qqbot")
    for seq in range(1, 101):
        qq.put_soon("session", f'{{"seq": {seq}}}')
    assert qq.get("session") == '{"seq": 100}' and writes == []
    gevent.wait([qq._flusher], timeout=5)
    assert writes == ['{"seq": 100}']
    qq.put_soon("session", '{"seq": 101}')
    qq.put("session", '{"id": "new"}')  # newer than the pending cursor
    qq.flush()
    assert writes[-1] == '{"id": "new"}'
    store.close()
    store = Store(data_dir).open()
    assert store.adapter_state("qqbot").get("session") == '{"id": "new"}'
    store.close()


def test_memory_state_has_the_same_calls():
    state = MemoryState()
    state.put("k", "v")
    assert state.get("k") == "v"
    state.put("k", None)
    assert state.get("k") is None


def test_the_gateway_hands_each_adapter_its_durable_state(tmp_path):
    fake = FakeTestChat().start()
    gw = start_inprocess_gateway(tmp_path, fake, GateAgent())
    try:
        gw.adapters["testchat"].saved_state.put("cursor", "42")
        assert gw.store.adapter_state("testchat").get("cursor") == "42"
        assert gw.store.adapter_state("other").get("cursor") is None
    finally:
        gw.shutdown()
        fake.stop()
