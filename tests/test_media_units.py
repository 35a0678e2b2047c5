"""The media module's refusals and its durability, on a real SQLite store and real HTTP (a fake
platform server hosts the files): bad input gets a placeholder that says why, a restart fetches
what a crash left pending, retention deletes old files but never one the outbox still needs, and
a schema-2 file gains the outbox's file columns."""
import base64
import json
import os
import sqlite3
import time

import pytest

from hermes_green.config import Config
from hermes_green.media import MediaManager, sniff
from hermes_green.models import Attachment, InboundMessage, OutboundMessage
from hermes_green.platforms.media import MediaSource
from hermes_green.platforms.wecom import WeComAdapter
from hermes_green.store import Store
from hermes_green.testing.fake_wecom import encrypt_file
from hermes_green.testing.harness import FakePlatformServer

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100


class Host(FakePlatformServer):
    pass


class UrlAdapter:
    """An adapter whose attachments are plain URLs (the kit's default media_source)."""
    name = "testchat"

    def media_source(self, att, msg):
        return MediaSource(att.ref, size=att.size)

    def max_upload_bytes(self, media):
        return None


@pytest.fixture
def host():
    h = Host().start()
    yield h
    h.stop()


@pytest.fixture
def env(tmp_path):
    config = Config.model_validate({"gateway": {"data_dir": str(tmp_path / "data")},
                                    "media": {"wait_s": 5, "download_timeout_s": 1}})
    store = Store(config.gateway.data_dir).open()
    adapters = {"testchat": UrlAdapter()}
    import gevent.pool
    group = gevent.pool.Group()

    def spawn(fn, *args, name, restart=False):
        g = group.spawn(fn, *args)
        g.name = name
        return g
    media = MediaManager(config, store, adapters, spawn)
    for d in (media.in_dir, media.out_dir):  # (no start(): its cleanup loop would race ours)
        d.mkdir(parents=True)
    yield media, store, adapters
    group.kill()
    store.close()


def receive(media, store, *atts) -> InboundMessage:
    msg = InboundMessage(platform="testchat", message_id=f"m{time.monotonic_ns()}", chat_id="c",
                         user_id="u", text="", attachments=tuple(atts))
    media.mark_pending(msg)
    assert store.journal_inbound(msg)
    media.on_journaled(msg)
    return msg


def settle(media, store, msg) -> Attachment:
    [done] = media.ready([msg])
    return done.attachments[0]


@pytest.mark.parametrize("body, ctype, kind, reason", [
    (b"<!DOCTYPE html><html>expired</html>", "text/html", "image", "web page"),
    (b"just some words", "text/plain", "image", "not an image"),
    (b"", "image/png", "image", "empty"),
    (b"MZ\x90\x00" + b"\x00" * 60, "application/x-msdownload", "file", "not accepted"),
])
def test_bad_files_keep_a_placeholder_that_says_why(env, host, body, ctype, kind, reason):
    media, store, _ = env
    url = host.host_media(body, ctype)
    att = settle(media, store, receive(media, store, Attachment(kind, url, "x")))
    assert att.status == "failed" and reason in att.note, att.note
    assert os.listdir(media.in_dir) == []


def test_an_expired_link_and_a_slow_download_are_refused_with_their_reason(env, host):
    media, store, _ = env
    expired = host.host_media(PNG, "image/png", ttl_s=0)
    slow = host.host_media(PNG * 100, "image/png", rate_bps=2000)  # ~5 s > the 1 s timeout
    msg = receive(media, store, Attachment("image", expired), Attachment("image", slow))
    [done] = media.ready([msg])
    a, b = done.attachments
    assert (a.status, a.note) == ("failed", "the platform answered HTTP 403")
    assert b.status == "failed" and "longer than 1 s" in b.note


def test_an_encrypted_file_with_a_wrong_key_is_refused(env, host):
    media, store, adapters = env
    adapters["wecom"] = WeComAdapter.__new__(WeComAdapter)  # media_source needs no connection
    key, wrong = os.urandom(32), os.urandom(32)
    url = host.host_media(encrypt_file(PNG, key))
    ok_url = host.host_media(encrypt_file(PNG, key))
    msg = InboundMessage(platform="wecom", message_id="w1", chat_id="c", user_id="u", text="",
                         attachments=(
                             Attachment("image", url, meta={"aeskey": base64.b64encode(
                                 wrong).decode().rstrip("=")}),
                             Attachment("image", ok_url, meta={"aeskey": base64.b64encode(
                                 key).decode()})))
    media.mark_pending(msg)
    store.journal_inbound(msg)
    [done] = media.ready([msg])
    bad, good = done.attachments
    assert bad.status == "failed" and ("decrypted" in bad.note or "not an image" in bad.note)
    assert good.status == "stored" and open(good.path, "rb").read() == PNG
    assert good.meta == {}  # the key is not kept once the file is stored
    row = json.loads(store.db.execute("SELECT payload FROM inbound WHERE message_id='w1'")
                     .fetchone()[0])
    assert row["attachments"][1]["path"] == good.path  # the journal row names the stored file


def test_a_download_a_crash_left_pending_is_fetched_by_the_recovered_turn(env, host):
    media, store, _ = env
    url = host.host_media(PNG, "image/png")
    msg = InboundMessage(platform="testchat", message_id="crashed", chat_id="c", user_id="u",
                         text="look", attachments=(Attachment("image", url),))
    media.mark_pending(msg)
    store.journal_inbound(msg)  # journaled, then the process died before downloading
    [pending] = store.pending_inbound()
    assert pending.message.attachments[0].status == "pending"
    [done] = media.ready([pending.message])  # what recovery's turn does
    assert done.attachments[0].status == "stored"
    assert len(host.media_requests) == 1


def test_retention_deletes_old_files_but_not_what_the_outbox_still_needs(env):
    media, store, _ = env
    old_in, old_out, kept, fresh = (media.in_dir / "a", media.out_dir / "b",
                                    media.out_dir / "c", media.in_dir / "d")
    for p in (old_in, old_out, kept, fresh):
        p.write_bytes(b"x")
    week_ago = time.time() - 8 * 86400
    for p in (old_in, old_out, kept):
        os.utime(p, (week_ago, week_ago))
    store.finish_turn("testchat", "c", [], [OutboundMessage(
        platform="testchat", chat_id="c", text="", in_reply_to="m", seq=1, kind="file",
        file={"path": str(kept), "name": "c"})], user_text=None, answer_text=None)
    assert media.cleanup_once() == 2
    assert sorted(p.name for p in (media.in_dir, media.out_dir) for p in p.iterdir()) == \
        ["c", "d"]


def test_a_schema_2_file_gains_the_outbox_file_columns_and_keeps_its_rows(tmp_path):
    """(schema 2 -> 4: the journal's rebuild for 'refused', then the file columns)"""
    db = sqlite3.connect(tmp_path / "hermes-green.sqlite3")
    db.executescript("""
        CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
        INSERT INTO meta VALUES ('schema', '2');
        CREATE TABLE inbound (bot TEXT NOT NULL, message_id TEXT NOT NULL,
            chat_id TEXT NOT NULL, state TEXT NOT NULL CHECK (state IN ('received',
            'processing', 'answered', 'failed')), attempts INTEGER NOT NULL DEFAULT 0,
            payload TEXT NOT NULL, received_at REAL NOT NULL, updated_at REAL NOT NULL,
            PRIMARY KEY (bot, message_id));
        CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, bot TEXT NOT NULL,
            chat_id TEXT NOT NULL, in_reply_to TEXT, seq INTEGER NOT NULL DEFAULT 0,
            reply_ref TEXT NOT NULL, text TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'pending',
            attempts INTEGER NOT NULL DEFAULT 0, next_attempt_at REAL NOT NULL,
            last_error TEXT, created_at REAL NOT NULL);
        INSERT INTO outbox (bot, chat_id, in_reply_to, seq, reply_ref, text, next_attempt_at,
            created_at) VALUES ('qqbot', 'c1', 'm1', 0, '{}', 'an old reply', 0, 0);""")
    db.commit()
    db.close()
    store = Store(tmp_path).open()
    try:
        [row] = store.outbox_due("qqbot")
        assert (row.text, row.kind, row.file) == ("an old reply", "text", None)
        assert store.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()[0] == "4"
    finally:
        store.close()


def test_sniffing_tells_images_from_what_pretends_to_be_one():
    assert sniff(PNG) == "image/png"
    assert sniff(b"\xff\xd8\xff\xe0\x00\x10JFIF") == "image/jpeg"
    assert sniff(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert sniff(b"OggS\x00\x02") == "audio/ogg"
    assert sniff(b"  <!doctype html><title>403</title>") == "text/html"
    assert sniff(b"hello") is None


def test_markdown_image_links_are_written_the_way_each_platform_shows_them():
    from hermes_green.replies import render_image_links
    answer = "Here: ![a cat](https://x.test/cat.png) and ![](https://x.test/dog.png)"
    assert render_image_links(answer, "markdown") == answer  # WeCom renders them
    assert render_image_links(answer, "bare") == \
        "Here: https://x.test/cat.png and https://x.test/dog.png"  # Discord embeds lone URLs
    assert render_image_links(answer, "text") == \
        "Here: a cat: https://x.test/cat.png and https://x.test/dog.png"
