"""Fuzz the Telegram adapter's update handling: `on_update(update)` and `commit(update)` called
directly, as the long-poll loop calls them. Whatever an update holds, it raises nothing but the
base error types, never hands up a message with a missing field, and the offset only grows."""
from __future__ import annotations

import logging

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from hermes_green.models import Attachment, InboundMessage
from hermes_green.platforms.base import ConnectionLost, FatalPlatformError, MemoryState
from hermes_green.platforms.telegram import TelegramAdapter, TelegramConfig

ME = {"id": 123456789, "is_bot": True, "first_name": "Hermes", "username": "hermes_test_bot"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12)
ints = st.one_of(st.integers(min_value=-2 ** 40, max_value=2 ** 53), json_values)
texts = st.one_of(st.text(max_size=40), st.sampled_from([
    "@hermes_test_bot hi", "/ask@hermes_test_bot x", "/ask@HERMES_TEST_BOT", "👍🏽 @hermes_test_bot",
    "@hermes_test_bot", "   ", "", "lone \ud800 surrogate @hermes_test_bot"]),
    st.text(st.characters(codec=None, categories=["Cs", "Ll", "So"]), max_size=10), json_values)
entity = st.one_of(json_values, st.fixed_dictionaries({}, optional={
    "type": st.one_of(st.sampled_from(["mention", "bot_command", "text_mention", "url"]),
                      json_values),
    "offset": st.one_of(st.integers(-3, 60), json_values),
    "length": st.one_of(st.integers(-3, 60), json_values),
    "user": st.one_of(json_values, st.fixed_dictionaries({"id": st.sampled_from([ME["id"], 7])})),
}))
user = st.one_of(json_values, st.fixed_dictionaries({"id": ints}, optional={
    "is_bot": st.one_of(st.booleans(), json_values), "first_name": texts}))
chat = st.one_of(json_values, st.fixed_dictionaries({"id": ints}, optional={
    "type": st.one_of(st.sampled_from(["private", "group", "supergroup", "channel"]),
                      json_values)}))
message = st.fixed_dictionaries({}, optional={
    "message_id": ints, "from": user, "chat": chat, "date": ints, "text": texts,
    "caption": texts, "entities": st.one_of(json_values, st.lists(entity, max_size=4)),
    "reply_to_message": st.one_of(json_values, st.fixed_dictionaries({"from": st.one_of(
        user, st.just(ME))})),
    "photo": st.one_of(json_values, st.lists(st.fixed_dictionaries({"file_id": texts}),
                                             max_size=3)),
    "document": st.one_of(json_values, st.fixed_dictionaries({"file_id": texts},
                                                             optional={"file_name": texts})),
    "sticker": json_values, "is_topic_message": json_values, "message_thread_id": ints,
})
updates = st.one_of(
    json_values,
    st.fixed_dictionaries({"update_id": ints}, optional={
        "message": st.one_of(message, json_values), "edited_message": message,
        "channel_post": message, "poll": json_values, "unknown_kind": json_values}),
)


@pytest.fixture(scope="module")
def adapter():
    delivered: list[InboundMessage] = []
    cfg = TelegramConfig(token="123456789:AAH-fuzz-token-not-real-0000000000",
                         api_base="http://127.0.0.1:9")
    a = TelegramAdapter(cfg, lambda m: delivered.append(m) or True, saved_state=MemoryState(),
                        logger=logging.getLogger("fuzz.telegram"))
    a.log.setLevel(logging.CRITICAL)  # thousands of skip lines are not the point here
    a._me, a._offset = dict(ME), 0
    a.delivered = delivered
    return a


def check_message(msg: InboundMessage) -> None:
    for value in (msg.message_id, msg.chat_id, msg.user_id):
        assert isinstance(value, str) and value.strip()
    assert isinstance(msg.text, str) and (msg.text.strip() or msg.attachments)
    msg.to_json().encode("utf-8")  # the store can journal it
    assert msg.platform == "telegram" and msg.chat_type in ("dm", "group")
    ref = msg.reply_ref
    assert isinstance(ref["chat_id"], int) and isinstance(ref["message_id"], int)
    assert msg.message_id == f"{ref['chat_id']}:{ref['message_id']}"
    assert msg.chat_id == str(ref["chat_id"]) and msg.user_id != str(ME["id"])
    for a in msg.attachments:
        assert isinstance(a, Attachment) and isinstance(a.ref, str) and a.ref
    assert InboundMessage.from_json(msg.to_json()) == msg


def feed(adapter, update) -> None:
    before = adapter._offset
    try:
        adapter.on_update(update)
    except (ConnectionLost, FatalPlatformError):
        return  # the poll loop ends the connection on these, without committing: allowed
    adapter.commit(update)
    assert isinstance(adapter._offset, int) and adapter._offset >= before
    assert adapter.saved_state.get("offset") in (None, str(adapter._offset))


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(updates)
def test_any_update_is_handled_or_skipped(adapter, update):
    before = len(adapter.delivered)
    feed(adapter, update)
    for msg in adapter.delivered[before:]:
        check_message(msg)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@example(text="a lone \ud800 surrogate", uid=1, mid=1, user_id=1)
@given(text=st.text(st.characters(codec=None, exclude_categories=["Cc"]), min_size=1,
                   max_size=200).filter(str.strip),
       uid=st.integers(1, 2 ** 31), mid=st.integers(1, 2 ** 31), user_id=st.integers(1, 2 ** 40))
def test_well_formed_private_messages_are_always_delivered(adapter, text, uid, mid, user_id):
    adapter._offset = 0
    before = len(adapter.delivered)
    feed(adapter, {"update_id": uid, "message": {
        "message_id": mid, "date": 1, "text": text, "chat": {"id": user_id, "type": "private"},
        "from": {"id": user_id, "is_bot": False, "first_name": "U"}}})
    [msg] = adapter.delivered[before:]
    check_message(msg)
    safe = text.encode("utf-8", "replace").decode("utf-8")  # lone surrogates become "?"
    assert msg.text == safe.strip() and msg.user_id == str(user_id)
    assert adapter._offset == uid + 1
