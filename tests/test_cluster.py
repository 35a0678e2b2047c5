"""Past one host, with real processes: gateway and worker nodes (`bin/hermes-green --role ...`)
on one real redis-server, against the fleet's strict fakes (WeCom and Telegram allow one
connection per bot; Feishu spreads events over several). Every verdict comes from the fakes'
records: what each user was answered, how often, in which order.

- kill -9 of the gateway node holding the WeCom and Telegram bots: the other node takes them
  over within 10 s and sends the replies of turns that were running; nothing lost, nothing
  answered twice, each chat in order;
- kill -9 of a worker in the middle of a turn: another worker answers it, once;
- redis-server killed (-9) and restarted with its AOF in the middle of a load: nothing lost or
  answered twice;
- bad starts: Redis unreachable, a role without a Redis store: one line, exit 2.
"""
import re

import gevent
import pytest

from hermes_green.testing.fake_llm import hang
from hermes_green.testing.fleet import FakeFleet
from hermes_green.testing.redis_server import RedisServer, free_port
from tests.cluster_support import CuttableProxy, Node, echo, node_config, stop_all
from tests.support import base_config, run_cli, write_config

PLATFORMS = ("wecom", "telegram", "feishu")
FAILOVER_LIMIT_S = 10.0


@pytest.fixture
def fleet():
    f = FakeFleet(PLATFORMS).start()
    yield f
    f.stop()


def expect_once(fleet, sent):
    """Every (platform, mid, text) answered exactly once, with the answer to that text."""
    wrong = {(p, t): fleet.answers(p, mid) for p, mid, t in sent
             if fleet.answers(p, mid) != [f"echo: {t}"]}
    assert not wrong, wrong


def all_answered(fleet, sent):
    return all(fleet.answers(p, mid) for p, mid, _ in sent)


def taken_by(nodes, mid):
    """The nodes that logged taking a turn for this message id."""
    pattern = rf"turn taken .* msg={re.escape(mid)}\b"
    return [n for n in nodes if n.find(pattern)]


def send(fleet, sent, platform, label, chat):
    text = f"{label}-{platform}-{chat}"
    sent.append((platform, fleet.send(platform, text, chat=chat), text))


def test_the_node_holding_wecom_and_telegram_dies_and_the_other_serves_within_10_s(
        tmp_path, redis_url, fleet):
    fleet.llm.script(*[echo(delay_s=0.4, chunk_chars=12)] * 200)  # each turn takes ~1 s
    g1 = Node("g1", node_config(tmp_path, "g1", redis_url, fleet), "gateway")
    nodes = [g1]
    try:
        for platform in ("wecom", "telegram"):
            g1.wait_for(rf"bot lease taken bot={platform}\b")
        fleet.wait_for(lambda: all(fleet.connected(p) for p in PLATFORMS), timeout=20)
        old_wecom = fleet.wait_for(lambda: fleet.fakes["wecom"].current_conn_id, timeout=20)
        g2 = Node("g2", node_config(tmp_path, "g2", redis_url, fleet), "gateway")
        workers = [Node(f"w{i}", node_config(tmp_path, f"w{i}", redis_url, fleet), "worker")
                   for i in (1, 2, 3)]
        nodes += [g2, *workers]
        g2.wait_for("node started")
        fleet.wait_for(lambda: len(fleet.fakes["feishu"].live_conns()) == 2, timeout=20)
        for w in workers:
            w.wait_for(r"shards held node=\S+ shards=\d")

        sent: list = []
        for chat in range(4):
            for platform in PLATFORMS:
                send(fleet, sent, platform, "one", chat)
        # Every message journaled and its turn running on some worker, then the holder dies.
        for _, mid, _ in sent:
            fleet.wait_for(lambda: taken_by(workers, mid), timeout=20)
        assert fleet.fakes["wecom"].current_conn_id == old_wecom  # g1 still holds WeCom
        g1.kill9()
        killed_at = g1.killed_at

        # While nobody holds them: Telegram keeps updates, Feishu pushes to g2's connection.
        fleet.wait_for(lambda: len(fleet.fakes["feishu"].live_conns()) == 1, timeout=10)
        for chat in range(4):
            for platform in ("telegram", "feishu"):
                send(fleet, sent, platform, "two", chat)
        # WeCom drops what arrives with no connection: write once g2 has subscribed.
        fleet.wait_for(lambda: fleet.fakes["wecom"].current_conn_id not in (None, old_wecom),
                       timeout=FAILOVER_LIMIT_S + 5)
        for chat in range(4):
            send(fleet, sent, "wecom", "two", chat)

        fleet.wait_for(lambda: all_answered(fleet, sent), timeout=30,
                       what=lambda: [(p, t) for p, mid, t in sent if not fleet.answers(p, mid)])
        expect_once(fleet, sent)
        assert fleet.fakes["wecom"].undelivered == []
        # WeCom messages that arrived on g1's connection were answered over g2's
        first_batch = {mid for p, mid, t in sent if p == "wecom" and t.startswith("one-")}
        assert any(at > killed_at for mid, _, at in fleet.reply_rows("wecom")
                   if mid in first_batch)
        for platform in ("wecom", "telegram"):
            g2.wait_for(rf"bot lease taken bot={platform}\b", timeout=1)
            first = min(at for _, _, at in fleet.reply_rows(platform) if at > killed_at)
            assert first - killed_at < FAILOVER_LIMIT_S, (platform, first - killed_at)
        # each chat answered in the order it wrote
        for platform in PLATFORMS:
            for chat in range(4):
                mids = [mid for p, mid, t in sent if p == platform and t.endswith(f"-{chat}")]
                rows = [m for m, _, _ in fleet.reply_rows(platform) if m in mids]
                assert rows == mids, (platform, chat)
        # turns ran on workers only; the gateway nodes never ran one
        assert not g2.find("turn taken") and not g1.find("turn taken")
    finally:
        stop_all(nodes)


def test_a_worker_killed_mid_turn_is_answered_once_by_another(tmp_path, redis_url, fleet):
    fleet.llm.script(hang(), *[echo()] * 20)  # the first turn hangs in the LLM call
    gw = Node("g", node_config(tmp_path, "g", redis_url, fleet), "gateway")
    workers = [Node(f"w{i}", node_config(tmp_path, f"w{i}", redis_url, fleet), "worker")
               for i in (1, 2)]
    nodes = [gw, *workers]
    try:
        gw.wait_for(r"bot lease taken bot=telegram\b")
        for w in workers:
            w.wait_for(r"shards held node=\S+ shards=\d")
        fleet.wait_for(lambda: fleet.connected("telegram"), timeout=20)
        mid = fleet.send("telegram", "the slow one", chat=5)
        fleet.wait_for(lambda: taken_by(workers, mid), timeout=20)
        assert fleet.llm.wait_for_chat_requests(1, timeout=10)
        [first] = taken_by(workers, mid)
        first.kill9()
        [other] = [w for w in workers if w is not first]
        fleet.wait_for(lambda: fleet.answers("telegram", mid), timeout=20)
        assert taken_by([other], mid)
        # a later message in the same chat: answered after it, and nothing more for the first
        later = fleet.send("telegram", "after it", chat=5)
        fleet.wait_for(lambda: fleet.answers("telegram", later), timeout=20)
        assert fleet.answers("telegram", mid) == ["echo: the slow one"]
        assert fleet.answers("telegram", later) == ["echo: after it"]
    finally:
        stop_all(nodes)


def test_redis_killed_and_restarted_with_its_aof_mid_load_loses_nothing(tmp_path, fleet):
    redis = RedisServer(tmp_path / "redis", appendonly=True).start()
    fleet.llm.script(*[echo()] * 400)
    node = Node("n", node_config(tmp_path, "n", redis.url, fleet), "all")
    sent: list = []
    stop_sending = gevent.event.Event()

    def users():
        i = 0
        while not stop_sending.is_set():
            platform = PLATFORMS[i % len(PLATFORMS)]
            send(fleet, sent, platform, f"m{i}", i % 5)
            i += 1
            stop_sending.wait(0.05)

    try:
        node.wait_for(r"shards held node=\S+ shards=\d")
        fleet.wait_for(lambda: all(fleet.connected(p) for p in PLATFORMS), timeout=20)
        load = gevent.spawn(users)
        fleet.wait_for(lambda: sum(1 for p, mid, _ in sent if fleet.answers(p, mid)) >= 15,
                       timeout=20)
        redis.kill()
        fleet.wait_for(lambda: node.find("(waits for Redis|not journaled|held)"), timeout=10)
        gevent.sleep(0.5)  # a real outage: load keeps coming while Redis is down
        redis.start()
        count = len(sent)
        fleet.wait_for(lambda: len(sent) >= count + 30, timeout=20)
        stop_sending.set()
        load.join()
        fleet.wait_for(lambda: all_answered(fleet, sent), timeout=40,
                       what=lambda: [(p, t) for p, mid, t in sent if not fleet.answers(p, mid)])
        expect_once(fleet, sent)
        assert fleet.fakes["wecom"].undelivered == []
    finally:
        stop_sending.set()
        stop_all([node])
        redis.stop()


def test_a_node_cut_off_from_redis_closes_its_connection_before_another_takes_the_bot(
        tmp_path, redis_url, redis_server, fleet):
    """A partition, not a death: g1 lives on but cannot reach Redis. It must give WeCom up (close
    its connection) before g2 may subscribe, so the two never kick each other; g1 sends
    nothing meanwhile, and g2 answers what comes next, once."""
    fleet.llm.script(*[echo()] * 50)
    proxy = CuttableProxy(redis_server.port)
    g1 = Node("g1", node_config(tmp_path, "g1", proxy.url(), fleet), "gateway")
    nodes = [g1]
    try:
        g1.wait_for(r"bot lease taken bot=wecom\b")
        old = fleet.wait_for(lambda: fleet.fakes["wecom"].current_conn_id, timeout=20)
        nodes += [Node("g2", node_config(tmp_path, "g2", redis_url, fleet), "gateway"),
                  Node("w", node_config(tmp_path, "w", redis_url, fleet), "worker")]
        nodes[2].wait_for(r"shards held node=\S+ shards=\d")
        before = fleet.send("wecom", "before", chat=1)
        fleet.wait_for(lambda: fleet.answers("wecom", before), timeout=20)
        proxy.cut()
        g1.wait_for(r"connection closed: lease lost bot=wecom\b", timeout=10)
        wecom = fleet.fakes["wecom"]
        fleet.wait_for(lambda: [c for c in wecom.subscribed_at if c != old], timeout=15)
        [new] = [c for c in wecom.subscribed_at if c != old]
        closed = [d for d in wecom.disconnects if d.conn_id == old]
        assert closed and closed[0].reason != "kicked"  # g1 left by itself...
        assert closed[0].at < wecom.subscribed_at[new]  # ...before g2 subscribed
        nodes[1].wait_for(r"bot lease taken bot=wecom\b", timeout=1)
        after = fleet.send("wecom", "after", chat=2)
        fleet.wait_for(lambda: fleet.answers("wecom", after), timeout=20)
        assert fleet.answers("wecom", after) == ["echo: after"]
        assert fleet.answers("wecom", before) == ["echo: before"]
        assert not [d for d in wecom.disconnects if d.conn_id == new]  # g1 never came back
    finally:
        proxy.stop()
        stop_all(nodes)


# -- bad starts ----------------------------------------------------------------------------

def test_redis_unreachable_at_start_is_one_line_and_exit_2(tmp_path):
    port = free_port()
    cfg = write_config(tmp_path / "c.yaml", base_config(
        tmp_path / "data", store=f"redis://:pw-not-shown@127.0.0.1:{port}/0"))
    result = run_cli("--config", str(cfg), "--role", "worker")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == (f"hermes-green: gateway.store: redis://:***@127.0.0.1:{port}/0: cannot "
                         f"reach Redis (Error 111 connecting to 127.0.0.1:{port}. Connection "
                         f"refused.)")
    assert "pw-not-shown" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_a_role_without_a_redis_store_is_refused(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", base_config(tmp_path / "data"))
    result = run_cli("--config", str(cfg), "--role", "gateway")
    assert result.returncode == 2
    assert result.stderr.strip() == ("hermes-green: --role gateway needs gateway.store: "
                                     "redis://... (processes share work through Redis; without "
                                     "it one process does all)")
