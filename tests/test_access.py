"""Who may talk to a bot, and how fast: the access policy (unit), the per-user token bucket
(unit, on an injected clock), and both through a real gateway on the test platform."""
import pytest

from hermes_green import metrics
from hermes_green.access import BotAccess
from hermes_green.config import parse_config
from hermes_green.gateway import _adapter_section
from hermes_green.models import InboundMessage
from hermes_green.platforms.botconfig import GroupConfig, RateLimitConfig
from hermes_green.ratelimit import RateLimiter
from tests.fakes.fake_testchat import FakeTestChat
from tests.support import GateAgent, start_inprocess_gateway, wait_until


def msg(user="u1", chat=None, group=False, mentioned=None):
    return InboundMessage(platform="testchat", message_id="m", chat_id=chat or user,
                          user_id=user, text="hi", chat_type="group" if group else "dm",
                          mentioned=mentioned)


def decide(access, m, paired=False):
    return access.decide(m, lambda: paired)


# -- the policy ------------------------------------------------------------------------------------

def test_open_by_default_and_allow_from_is_the_allowlist():
    assert decide(BotAccess(), msg()).allowed
    legacy = BotAccess(allow_from=frozenset({"friend"}))
    assert decide(legacy, msg("friend")).allowed
    assert decide(legacy, msg("stranger")).reason == "allow_from"
    assert decide(legacy, msg("stranger", chat="g", group=True)).reason == "allow_from"
    strict = BotAccess(allow_from=frozenset({"friend"}), dm_policy="allowlist")
    assert decide(strict, msg("friend")).allowed
    assert decide(strict, msg("stranger")).reason == "dm_policy"
    assert decide(BotAccess(dm_policy="allowlist"), msg("anyone")).reason == "dm_policy"


def test_admins_and_paired_users_are_known():
    access = BotAccess(dm_policy="allowlist", admins=frozenset({"boss"}))
    assert decide(access, msg("boss")).allowed
    assert decide(access, msg("pal"), paired=True).allowed


def test_pairing_refuses_unknown_users_with_a_code_request():
    access = BotAccess(dm_policy="pairing", allow_from=frozenset({"friend"}))
    assert decide(access, msg("friend")).allowed
    assert decide(access, msg("pal"), paired=True).allowed
    d = decide(access, msg("stranger"))
    assert (d.allowed, d.reason, d.pairing) == (False, "pairing", True)


def test_group_policies_and_mentions():
    assert decide(BotAccess(group_policy="disabled"), msg(chat="g", group=True)).reason == \
        "group_policy"
    listed = BotAccess(group_policy="allowlist", groups={"g1": None, "g2": False})
    assert decide(listed, msg(chat="g1", group=True)).allowed
    assert decide(listed, msg(chat="g9", group=True)).reason == "group_policy"
    # require_mention (default on): a message the platform marked as not addressed is not ours
    assert decide(listed, msg(chat="g1", group=True, mentioned=False)).reason == "mention"
    assert decide(listed, msg(chat="g1", group=True, mentioned=True)).allowed
    assert decide(listed, msg(chat="g2", group=True, mentioned=False)).allowed  # per group off
    loose = BotAccess(require_mention=False)
    assert decide(loose, msg(chat="g", group=True, mentioned=False)).allowed
    # pairing is for direct messages: groups follow group_policy
    assert decide(BotAccess(dm_policy="pairing"), msg("stranger", chat="g", group=True)).allowed


def test_the_access_keys_come_from_a_bot_section():
    cfg = parse_config("""
platforms:
  qqbot:
    app_id: "1"
    client_secret: s
    dm_policy: pairing
    group_policy: allowlist
    groups: {grp1: {require_mention: false}}
    admins: [boss]
    allow_from: [friend]
    rate_limit: {messages: 5, per_s: 10}
""")
    section = cfg.platforms.enabled()["qqbot"]
    access = BotAccess.from_config(section)
    assert (access.dm_policy, access.group_policy, access.groups, access.admins,
            access.allow_from, access.rate_messages, access.rate_per_s) == (
        "pairing", "allowlist", {"grp1": False}, frozenset({"boss"}), frozenset({"friend"}),
        5, 10.0)
    # the adapter's copy has no allow_from: the gateway enforces it, so pairing can answer
    assert _adapter_section(section).allow_from == [] and section.allow_from == ["friend"]


def test_bad_access_settings_are_refused_with_the_key_path():
    from hermes_green.config import ConfigError
    with pytest.raises(ConfigError) as e:
        parse_config("platforms:\n  qqbot: {app_id: '1', client_secret: s, dm_policy: closed}\n")
    assert str(e.value) == ("platforms.qqbot.dm_policy: input should be 'open', 'allowlist' "
                            "or 'pairing'")
    with pytest.raises(ConfigError) as e:
        parse_config("platforms:\n  qqbot: {app_id: '1', client_secret: s, "
                     "rate_limit: {messages: -1}}\n")
    assert str(e.value).startswith("platforms.qqbot.rate_limit.messages: input should be")


# -- the token bucket -------------------------------------------------------------------------------

class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_bucket_allows_a_burst_then_refills_and_notifies_once_per_bite():
    clock = Clock()
    limiter = RateLimiter(3, 60.0, clock=clock)  # 3 at once, then one every 20 s
    assert [limiter.check("u").allowed for _ in range(3)] == [True] * 3
    first, second = limiter.check("u"), limiter.check("u")
    assert (first.allowed, first.notify) == (False, True)
    assert (second.allowed, second.notify) == (False, False)  # same bite: silent
    assert limiter.check("other").allowed  # buckets are per user
    clock.now += 20
    assert limiter.check("u").allowed
    again = limiter.check("u")
    assert (again.allowed, again.notify) == (False, True)  # a new bite gets its notice
    clock.now += 3600
    assert [limiter.check("u").allowed for _ in range(4)] == [True, True, True, False]


def test_the_limit_is_described_in_words():
    from hermes_green.ratelimit import describe
    assert [describe(20, 60), describe(3, 7200), describe(1, 10), describe(5, 1.5)] == [
        "20 messages per minute", "3 messages per 2 hours", "1 message per 10 seconds",
        "5 messages per 1.5 seconds"]


def test_zero_messages_means_no_limit_and_idle_buckets_are_swept():
    assert all(RateLimiter(0, 60).check("u").allowed for _ in range(1000))
    clock = Clock()
    limiter = RateLimiter(2, 1.0, clock=clock, max_users=10)
    for i in range(10):
        limiter.check(f"user{i}")
    clock.now += 5  # everyone refilled
    limiter.check("newcomer")
    assert len(limiter) == 1


# -- through the gateway -----------------------------------------------------------------------------

@pytest.fixture
def fake():
    f = FakeTestChat().start()
    yield f
    f.stop()


@pytest.fixture
def gateways():
    started = []
    yield started
    for gw in started:
        gw.shutdown()


def sample(name, **labels):
    return metrics.REGISTRY.get_sample_value(name, {"platform": "testchat", "bot": "testchat",
                                                    **labels}) or 0


def test_a_rate_limited_user_gets_one_notice_and_nothing_is_answered_twice(tmp_path, fake,
                                                                            gateways):
    agent = GateAgent()
    gw = start_inprocess_gateway(tmp_path, fake, agent, testchat={
        "rate_limit": RateLimitConfig(messages=3, per_s=3600)})
    gateways.append(gw)
    before = (sample("hermes_green_inbound_refused_total", reason="rate_limit"),
              sample("hermes_green_notices_total", kind="rate_limit"))
    ids = [fake.send_user_message(f"msg {i}") for i in range(6)]
    command = fake.send_user_message("/status")  # commands are limited like messages
    other = fake.send_user_message("someone else", user="u2", chat="c2")
    fake.wait_for(lambda: fake.replies_to(other) and len(fake.replies) == 5)
    gw.wait_idle(10)
    assert [len(fake.replies_to(m)) for m in ids] == [1, 1, 1, 1, 0, 0]
    assert fake.replies_to(ids[3])[0]["text"].startswith(
        "You are sending messages faster than I can take them (3 messages per hour)")
    assert fake.replies_to(command) == []
    assert sorted(agent.turns) == ["msg 0", "msg 1", "msg 2", "someone else"]
    assert [gw.store.inbound_state("testchat", m) for m in ids[3:] + [command]] == \
        ["refused"] * 4
    assert (sample("hermes_green_inbound_refused_total", reason="rate_limit"),
            sample("hermes_green_notices_total", kind="rate_limit")) == (
        before[0] + 4, before[1] + 1)
    # a redelivered refused message is recognized: no token, no second notice
    fake.redeliver(ids[4])
    probe = fake.send_user_message("probe", user="u2", chat="c2")
    fake.wait_for(lambda: fake.replies_to(probe))
    assert len(fake.replies) == 6 and sample(
        "hermes_green_notices_total", kind="rate_limit") == before[1] + 1
    # refused messages are never answered later by surprise, not even after a restart
    gw.shutdown()
    gateways.remove(gw)
    again = GateAgent()
    gw2 = start_inprocess_gateway(tmp_path, fake, again)
    gateways.append(gw2)
    assert gw2.store.pending_inbound() == [] and gw2.wait_idle(10)
    assert again.turns == [] and len(fake.replies) == 6


def test_group_messages_follow_the_group_policy_and_mentions(tmp_path, fake, gateways):
    agent = GateAgent()
    gw = start_inprocess_gateway(tmp_path, fake, agent, testchat={
        "group_policy": "allowlist", "groups": {"g1": GroupConfig()}})
    gateways.append(gw)
    fake.send_user_message("not addressed", chat="g1", group=True, mentioned=False)
    fake.send_user_message("elsewhere", chat="g2", group=True, mentioned=True)
    ok = fake.send_user_message("hello bot", chat="g1", group=True, mentioned=True)
    fake.wait_for(lambda: fake.replies_to(ok))
    gw.wait_idle(10)
    assert agent.turns == ["hello bot"] and len(fake.replies) == 1
    assert sample("hermes_green_inbound_refused_total", reason="mention") >= 1
    assert sample("hermes_green_inbound_refused_total", reason="group_policy") >= 1


def test_pairing_in_process_code_once_then_approved_user_talks(tmp_path, fake, gateways):
    agent = GateAgent()
    gw = start_inprocess_gateway(tmp_path, fake, agent, testchat={"dm_policy": "pairing"})
    gateways.append(gw)
    first = fake.send_user_message("hello?", user="newbie", chat="newbie")
    fake.wait_for(lambda: fake.replies_to(first))
    notice = fake.replies_to(first)[0]["text"]
    code = notice.split("pairing code is ")[1].split(" ")[0]
    assert len(code) == 8 and f"hermes-green pairing approve {code}" in notice
    second = fake.send_user_message("anyone there?", user="newbie", chat="newbie")
    wait_until(lambda: gw.store.inbound_state("testchat", second) == "refused")
    assert gw.store.pairing_approve(code) == ("approved", "testchat", "newbie")
    assert gw.store.pairing_approve(code)[0] == "unknown"  # one-time
    third = fake.send_user_message("now?", user="newbie", chat="newbie")
    fake.wait_for(lambda: fake.replies_to(third))
    assert fake.replies_to(second) == [] and agent.turns == ["now?"]
    assert gw.store.pairing_revoke("newbie") == 1
    fourth = fake.send_user_message("still me", user="newbie", chat="newbie")
    fake.wait_for(lambda: fake.replies_to(fourth))
    assert "pairing code is" in fake.replies_to(fourth)[0]["text"] and agent.turns == ["now?"]
