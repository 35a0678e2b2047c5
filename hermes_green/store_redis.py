"""The store on Redis (`gateway.store: redis://host:port/db`): the same journal, outbox, history
and adapter state as the SQLite file, shared by every process of a deployment (SCALE.md).

Layout (prefix `hg:`; a bot key never holds ':' or '{', see botconfig.BOT_ID_PATTERN):
    in:{bot}:{mid}     hash  state, attempts, payload, chat, received_at, updated_at; the
                             de-duplication point (created only if absent). A closed entry is
                             kept JOURNAL_KEEP_S (a platform redelivers within hours, not weeks)
    open               zset  "bot\\nmid" of open entries, scored by journal order (recovery)
    work:{n}           stream per work shard: each journaled message is appended to the shard
                             of its chat IN THE SAME SCRIPT, so a journaled message is always
                             queued; workers read it through a consumer group (cluster/queue.py)
    ob:rows            hash  outbox id -> the reply part (JSON, never rewritten)
    ob:due:{bot}       zset  pending outbox ids (zero-padded, so ties keep id order) by due time
    ob:dead:{bot}      zset  replies given up (kept for inspection)
    ob:attempts/errors hash  outbox id -> attempts / last error
    ob:part            hash  "bot\\nin_reply_to\\nseq" -> id: a part is queued once
    hist:{bot}:{chat}  list  JSON {role, content}, trimmed to the newest `history_limit`
    state:{bot}        hash  the bot's saved adapter state (resume cursors)
    pair:{bot}:{user}  hash  a pairing: state, chat_id, code, created_at, expires_at, approved_at
    pair:codes         hash  code -> "bot\nuser" (a code names one pending pairing)
    pair:all           set   "bot\nuser" of every pairing (for `pairing list`)
    meta:{scope}       hash  one process's small values (scope: host and data_dir)
Every multi-key change is one Lua script (atomic, and replayed whole from the AOF). Scripts build
some key names themselves, so this needs one Redis (a primary, with replicas or Sentinel), not
Redis Cluster.

redis-py under gevent: the sockets are patched, so a call waits without holding the hub. The
pool is a BlockingConnectionPool: callers wait for a free connection instead of opening
unbounded ones; it is sized for the greenlets that block on XREADGROUP or pub/sub (one
connection each) plus the short calls. Connection errors are retried briefly by redis-py (every
script is safe to run twice: journaling de-duplicates, finish_turn refuses a closed turn); past
that they raise, and the caller's policy applies (the adapter kit's journal-failure rule, the
outbox loop's retry, the worker's wait).
"""
from __future__ import annotations

import json
import logging
import os
import time
import urllib.parse
import zlib
from typing import Iterable

from .models import InboundMessage, OutboundMessage, split_bot_key
from .store_base import OPEN_STATES, PendingInbound, StoreBase, StoreError

log = logging.getLogger("hermes_green.store")

PREFIX = "hg:"
SCHEMA_VERSION = 1
WORK_SHARDS = 16  # work streams; a chat always maps to the same one (its order is kept there)
JOURNAL_KEEP_S = 7 * 86400
POOL_SIZE = 48
POOL_WAIT_S = 20.0  # a caller waits this long for a free connection, then errors
SOCKET_TIMEOUT_S = 10.0  # longer than any XREADGROUP BLOCK we issue
CONNECT_TIMEOUT_S = 2.0
MIN_SERVER = (6, 2)  # XAUTOCLAIM
# What must not be lost is retried through a Redis restart this long: a turn's result
# (finish_turn: safe to repeat, a closed turn is not written again) and a reply the platform
# accepted (outbox_done: else it would be sent a second time).
KEEP_TRYING_S = 30.0

_JOURNAL = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'state', ARGV[7], 'attempts', 0, 'payload', ARGV[1],
           'chat', ARGV[2], 'received_at', ARGV[3], 'updated_at', ARGV[3])
if ARGV[7] == 'refused' then
  redis.call('EXPIRE', KEYS[1], ARGV[8])
  return 1
end
local seq = redis.call('INCR', KEYS[3])
redis.call('ZADD', KEYS[2], seq, ARGV[4])
redis.call('XADD', KEYS[4], '*', 'bot', ARGV[5], 'mid', ARGV[6])
return 1
"""

# KEYS: pair row, codes, all; ARGV: now, code, chat, expires_at, member, ttl kept.
# 'none': an approved user or a valid code exists; 'taken': the code names another pairing.
_PAIR_REQUEST = """
local st = redis.call('HGET', KEYS[1], 'state')
if st == 'approved' then return 'none' end
if st == 'pending' and tonumber(redis.call('HGET', KEYS[1], 'expires_at') or '0') > tonumber(ARGV[1])
  then return 'none' end
if redis.call('HEXISTS', KEYS[2], ARGV[2]) == 1 then return 'taken' end
local old = redis.call('HGET', KEYS[1], 'code')
if old and old ~= '' then redis.call('HDEL', KEYS[2], old) end
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'state', 'pending', 'chat_id', ARGV[3], 'code', ARGV[2],
           'created_at', ARGV[1], 'expires_at', ARGV[4])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[5])
redis.call('SADD', KEYS[3], ARGV[5])
return 'ok'
"""

# KEYS: codes; ARGV: code, now, prefix. Returns {outcome, member}.
_PAIR_APPROVE = """
local member = redis.call('HGET', KEYS[1], ARGV[1])
if not member then return {'unknown', ''} end
local nl = string.find(member, '\\n', 1, true)
local row = ARGV[3] .. 'pair:' .. string.sub(member, 1, nl - 1) .. ':' .. string.sub(member, nl + 1)
if redis.call('HGET', row, 'state') ~= 'pending' then return {'unknown', ''} end
if tonumber(redis.call('HGET', row, 'expires_at') or '0') <= tonumber(ARGV[2]) then
  return {'expired', member}
end
redis.call('HSET', row, 'state', 'approved', 'code', '', 'expires_at', '', 'approved_at', ARGV[2])
redis.call('HDEL', KEYS[1], ARGV[1])
return {'approved', member}
"""

# KEYS: pair row, codes, all; ARGV: member. Returns 1 when something was removed.
_PAIR_REVOKE = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[3], ARGV[1])
  return 0
end
local code = redis.call('HGET', KEYS[1], 'code')
if code and code ~= '' then redis.call('HDEL', KEYS[2], code) end
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[3], ARGV[1])
return 1
"""

# A journaled message's payload rewritten (media fetched); nothing when it is gone.
_UPDATE_PAYLOAD = """
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HSET', KEYS[1], 'payload', ARGV[1], 'updated_at', ARGV[2])
end
return 0
"""

_MARK_PROCESSING = """
for i, key in ipairs(KEYS) do
  local st = redis.call('HGET', key, 'state')
  if st == 'received' or st == 'processing' then
    redis.call('HSET', key, 'state', 'processing', 'updated_at', ARGV[1])
    redis.call('HINCRBY', key, 'attempts', 1)
  end
end
return 0
"""

_FINISH_TURN = """
local a = cjson.decode(ARGV[1])
local p = a.prefix
for _, mid in ipairs(a.mids) do
  local st = redis.call('HGET', p .. 'in:' .. a.bot .. ':' .. mid, 'state')
  if st and st ~= 'received' and st ~= 'processing' then return {} end
end
local ids = {}
for i, part in ipairs(a.parts) do
  local fresh = true
  if part.key and redis.call('HEXISTS', p .. 'ob:part', part.key) == 1 then fresh = false end
  if fresh then
    local id = redis.call('INCR', p .. 'ob:seq')
    redis.call('HSET', p .. 'ob:rows', id, part.row)
    redis.call('ZADD', p .. 'ob:due:' .. part.bot, a.now, string.format('%015d', id))
    redis.call('SADD', p .. 'ob:bots', part.bot)
    if part.key then redis.call('HSET', p .. 'ob:part', part.key, id) end
    table.insert(ids, i)
    table.insert(ids, id)
  end
end
for _, mid in ipairs(a.mids) do
  local k = p .. 'in:' .. a.bot .. ':' .. mid
  if redis.call('EXISTS', k) == 1 then
    redis.call('HSET', k, 'state', a.state, 'updated_at', a.now)
    redis.call('ZREM', p .. 'open', a.bot .. '\\n' .. mid)
    redis.call('EXPIRE', k, a.keep_s)
  end
end
local h = p .. 'hist:' .. a.bot .. ':' .. a.chat
if a.user then redis.call('RPUSH', h, a.user) end
if a.answer then redis.call('RPUSH', h, a.answer) end
if a.user or a.answer then redis.call('LTRIM', h, -a.limit, -1) end
return ids
"""

_OUTBOX_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
local out = {}
for _, m in ipairs(ids) do
  local id = tostring(tonumber(m))
  local row = redis.call('HGET', KEYS[2], id)
  if row then
    table.insert(out, id)
    table.insert(out, row)
    table.insert(out, redis.call('HGET', KEYS[3], id) or '0')
  end
end
return out
"""

# KEYS: rows, attempts, errors, part, bots, deadbots; ARGV: id, action (done|retry|dead),
# now, due time, error, prefix
_OUTBOX_END = """
local row = redis.call('HGET', KEYS[1], ARGV[1])
if not row then return 0 end
local r = cjson.decode(row)
local member = string.format('%015d', tonumber(ARGV[1]))
local due = ARGV[6] .. 'ob:due:' .. r.bot
if ARGV[2] == 'retry' then
  if redis.call('ZSCORE', due, member) then
    redis.call('ZADD', due, ARGV[4], member)
    redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
    redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
  end
  return 1
end
redis.call('ZREM', due, member)
if ARGV[2] == 'dead' then
  redis.call('ZADD', ARGV[6] .. 'ob:dead:' .. r.bot, ARGV[3], member)
  redis.call('SADD', KEYS[6], r.bot)
  redis.call('HINCRBY', KEYS[2], ARGV[1], 1)
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[5])
else
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[2], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
  if r.part_key then redis.call('HDEL', KEYS[4], r.part_key) end
end
if redis.call('ZCARD', due) == 0 then redis.call('SREM', KEYS[5], r.bot) end
return 1
"""


def safe_url(url: str) -> str:
    """The URL as it may be shown: any password replaced by ***."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:***@{host}{port}"))


def work_shard(bot: str, chat_id: str, shards: int = WORK_SHARDS) -> int:
    """The work stream a chat's messages go to: always the same one, so one worker at a time
    takes them, in order (cluster/queue.py)."""
    return zlib.crc32(f"{bot}\n{chat_id}".encode()) % shards


def work_stream(shard: int, prefix: str = PREFIX) -> str:
    return f"{prefix}work:{shard}"


class RedisStore(StoreBase):
    """StoreBase on Redis. See the module docstring for the layout."""

    def __init__(self, url: str, *, history_limit: int = 200, clock=time.time,
                 prefix: str = PREFIX, pool_size: int = POOL_SIZE,
                 meta_scope: str = "default", local_dir=None) -> None:
        super().__init__(history_limit=history_limit, clock=clock)
        self.url = url
        self.meta_scope = meta_scope
        # This process's own directory (gateway.data_dir: its pid file), made at open.
        self.local_dir = local_dir
        self.prefix = prefix
        self.pool_size = pool_size
        self.shards = WORK_SHARDS
        self.redis = None  # redis.Redis once open

    # -- lifecycle ---------------------------------------------------------------------------
    def describe(self) -> str:
        return safe_url(self.url)

    def open(self) -> "RedisStore":
        """Connect, check the server (6.2+, writable), and load the scripts. Any failure is one
        line naming the URL without its password."""
        import redis
        from redis.backoff import ExponentialBackoff
        from redis.retry import Retry
        where = f"gateway.store: {safe_url(self.url)}"
        if self.local_dir is not None:
            try:
                os.makedirs(self.local_dir, exist_ok=True)
            except OSError as e:
                raise StoreError(f"gateway.data_dir: cannot create {self.local_dir} "
                                 f"({e.strerror or type(e).__name__})") from None
        try:
            pool = redis.BlockingConnectionPool.from_url(
                self.url, max_connections=self.pool_size, timeout=POOL_WAIT_S,
                socket_connect_timeout=CONNECT_TIMEOUT_S, socket_timeout=SOCKET_TIMEOUT_S,
                retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 4),
                retry_on_error=[redis.ConnectionError, redis.TimeoutError],
                decode_responses=True)
        except ValueError as e:
            raise StoreError(f"{where}: not a Redis URL ({e})") from None
        client = redis.Redis(connection_pool=pool)
        try:
            info = client.info("server")
            version = tuple(int(x) for x in str(info.get("redis_version", "0")).split(".")[:2])
            if version < MIN_SERVER:
                raise StoreError(f"{where}: Redis {info.get('redis_version')} is too old "
                                 f"(6.2 or newer is needed for XAUTOCLAIM)")
            client.hset(self._k("meta"), mapping={"schema": SCHEMA_VERSION,
                                                  "opened_at": self._clock()})
        except StoreError:
            pool.disconnect()
            raise
        except redis.ResponseError as e:  # a read-only replica, a missing AUTH, a NOPERM
            pool.disconnect()
            raise StoreError(f"{where}: refused ({str(e).split(chr(10))[0][:120]})") from None
        except (redis.RedisError, OSError) as e:
            pool.disconnect()
            reason = str(e).split("\n")[0][:160] or type(e).__name__
            raise StoreError(f"{where}: cannot reach Redis ({reason})") from None
        self.redis = client
        self._journal = client.register_script(_JOURNAL)
        self._mark = client.register_script(_MARK_PROCESSING)
        self._update_payload = client.register_script(_UPDATE_PAYLOAD)
        self._finish = client.register_script(_FINISH_TURN)
        self._due = client.register_script(_OUTBOX_DUE)
        self._end = client.register_script(_OUTBOX_END)
        self._pair_request = client.register_script(_PAIR_REQUEST)
        self._pair_approve = client.register_script(_PAIR_APPROVE)
        self._pair_revoke = client.register_script(_PAIR_REVOKE)
        self.problem = None
        log.info("store opened redis=%s", safe_url(self.url))
        return self

    def close(self, *, checkpoint: bool = True) -> None:
        if self.redis is not None:
            self.redis.connection_pool.disconnect()
            self.redis = None

    def health(self) -> dict:
        try:
            self.r.ping()
        except Exception as e:  # noqa: BLE001  (/healthz reports, never raises)
            return {"ok": False, "error": f"Redis unreachable ({type(e).__name__})"}
        return {"ok": True, "error": None}

    @property
    def r(self):
        if self.redis is None:
            raise StoreError("store is not open")
        return self.redis

    def _k(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- inbound journal ---------------------------------------------------------------------
    def journal_inbound(self, msg: InboundMessage, *, state: str = "received") -> bool:
        """Record a message and queue it on its chat's work stream, in one script; False when
        (bot, message_id) was seen before. A refused one is only recorded (and expires)."""
        if state not in ("received", "refused"):
            raise ValueError(f"a message is journaled as received or refused, not {state!r}")
        bot = msg.bot_key
        now = self._clock()
        stream = work_stream(work_shard(bot, msg.chat_id, self.shards), self.prefix)
        done = self._journal(
            keys=[self._k("in", bot, msg.message_id), self._k("open"), self._k("seq"), stream],
            args=[msg.to_json(), msg.chat_id, now, f"{bot}\n{msg.message_id}", bot,
                  msg.message_id, state, JOURNAL_KEEP_S])
        return int(done) == 1

    def mark_processing(self, bot: str, message_ids: Iterable[str]) -> None:
        keys = [self._k("in", bot, mid) for mid in message_ids]
        if keys:
            self._mark(keys=keys, args=[self._clock()])

    def inbound_state(self, bot: str, message_id: str) -> str | None:
        return self.r.hget(self._k("in", bot, message_id), "state")

    def update_inbound(self, msg: InboundMessage) -> None:
        """Rewrite a journaled message's payload (its attachments were fetched, refused or
        transcribed); a message no longer journaled is left alone."""
        key = self._k("in", msg.bot_key, msg.message_id)
        self._retrying("update_inbound", self._update_payload, [key],
                       [msg.to_json(), self._clock()])

    def inbound(self, bot: str, message_id: str) -> PendingInbound | None:
        payload, state, attempts = self.r.hmget(self._k("in", bot, message_id),
                                                "payload", "state", "attempts")
        if payload is None:
            return None
        return PendingInbound(InboundMessage.from_json(payload), state, int(attempts or 0))

    def pending_inbound(self) -> list[PendingInbound]:
        members = self.r.zrange(self._k("open"), 0, -1)
        pipe = self.r.pipeline(transaction=False)
        for m in members:
            bot, _, mid = m.partition("\n")
            pipe.hmget(self._k("in", bot, mid), "payload", "state", "attempts")
        out = []
        for payload, state, attempts in pipe.execute() if members else []:
            if payload is not None and state in OPEN_STATES:
                out.append(PendingInbound(InboundMessage.from_json(payload), state,
                                          int(attempts or 0)))
        return out

    # -- the end of a turn -------------------------------------------------------------------
    def finish_turn(self, bot: str, chat_id: str, message_ids: list[str],
                    parts: list[OutboundMessage], *, user_text: str | None,
                    answer_text: str | None, state: str = "answered") -> list[int]:
        now = self._clock()
        encoded = []
        for part in parts:  # encoded first: a part that cannot be written stops everything
            key = (f"{part.bot_key}\n{part.in_reply_to}\n{part.seq}"
                   if part.in_reply_to is not None else None)
            row = json.dumps({"bot": part.bot_key, "chat_id": part.chat_id,
                              "in_reply_to": part.in_reply_to, "seq": part.seq,
                              "reply_ref": part.reply_ref, "text": part.text,
                              "kind": part.kind, "file": part.file,
                              "part_key": key, "created_at": now}, ensure_ascii=False)
            encoded.append({"bot": part.bot_key, "row": row, **({"key": key} if key else {})})
        args: dict = {"prefix": self.prefix, "bot": bot, "chat": chat_id,
                      "mids": list(message_ids), "parts": encoded, "state": state, "now": now,
                      "limit": max(1, self.history_limit), "keep_s": JOURNAL_KEEP_S}
        if user_text is not None:
            args["user"] = json.dumps({"role": "user", "content": user_text}, ensure_ascii=False)
        if answer_text is not None:
            args["answer"] = json.dumps({"role": "assistant", "content": answer_text},
                                        ensure_ascii=False)
        flat = self._retrying("finish_turn", self._finish, [],
                              [json.dumps(args, ensure_ascii=False)]) or []
        ids = []
        for i in range(0, len(flat), 2):  # (1-based part index, outbox id) of each new row
            parts[int(flat[i]) - 1].outbox_id = oid = int(flat[i + 1])
            ids.append(oid)
        return ids

    def _retrying(self, what: str, script, keys: list, args: list):
        import gevent
        import redis
        deadline = time.monotonic() + KEEP_TRYING_S
        wait = 0.1
        while True:
            try:
                return script(keys=keys, args=args)
            except (redis.ConnectionError, redis.TimeoutError) as e:
                if time.monotonic() + wait > deadline:
                    raise
                log.warning("%s waits for Redis error=%s retry_s=%.1f", what,
                            type(e).__name__, wait)
                gevent.sleep(wait)
                wait = min(wait * 2, 2.0)

    # -- outbox ------------------------------------------------------------------------------
    def outbox_due(self, bot: str, *, limit: int = 50) -> list[OutboundMessage]:
        flat = self._due(keys=[self._k("ob", "due", bot), self._k("ob", "rows"),
                               self._k("ob", "attempts")], args=[self._clock(), limit])
        out = []
        for i in range(0, len(flat), 3):
            oid, row, attempts = int(flat[i]), json.loads(flat[i + 1]), int(flat[i + 2])
            platform, bot_id = split_bot_key(row["bot"])
            out.append(OutboundMessage(platform=platform, bot=bot_id, chat_id=row["chat_id"],
                                       text=row["text"], in_reply_to=row["in_reply_to"],
                                       seq=row["seq"], reply_ref=row["reply_ref"],
                                       outbox_id=oid, attempts=attempts,
                                       kind=row.get("kind", "text"), file=row.get("file")))
        out.sort(key=lambda o: o.outbox_id)
        return out

    def outbox_files(self) -> set[str]:
        """Paths of the files pending rows still need (retention must not delete them)."""
        paths = set()
        for bot in self.r.smembers(self._k("ob", "bots")):
            ids = [str(int(m)) for m in self.r.zrange(self._k("ob", "due", bot), 0, -1)]
            for raw in (self.r.hmget(self._k("ob", "rows"), ids) if ids else []):
                try:
                    file = json.loads(raw).get("file") if raw else None
                    if file:
                        paths.add(file["path"])
                except (ValueError, KeyError, TypeError, AttributeError):
                    continue
        return paths

    def outbox_next_due_at(self, bot: str) -> float | None:
        first = self.r.zrange(self._k("ob", "due", bot), 0, 0, withscores=True)
        return float(first[0][1]) if first else None

    def _outbox_end(self, outbox_id: int, action: str, due_at: float = 0.0,
                    error: str = "") -> None:
        """Every outcome of a send is retried through an outage (each is safe to repeat): a
        platform that took the reply must not get it again."""
        self._retrying(f"outbox_{action}", self._end,
                       [self._k("ob", "rows"), self._k("ob", "attempts"), self._k("ob", "errors"),
                        self._k("ob", "part"), self._k("ob", "bots"), self._k("ob", "deadbots")],
                       [outbox_id, action, self._clock(), due_at, error[:300], self.prefix])

    def outbox_done(self, outbox_id: int) -> None:
        self._outbox_end(outbox_id, "done")

    def outbox_retry(self, outbox_id: int, delay_s: float, error: str) -> None:
        self._outbox_end(outbox_id, "retry", self._clock() + delay_s, error)

    def outbox_dead(self, outbox_id: int, error: str) -> None:
        self._outbox_end(outbox_id, "dead", error=error)

    def _count(self, kind: str, bots_key: str, bot: str | None) -> int:
        bots = [bot] if bot is not None else sorted(self.r.smembers(self._k("ob", bots_key)))
        if not bots:
            return 0
        pipe = self.r.pipeline(transaction=False)
        for b in bots:
            pipe.zcard(self._k("ob", kind, b))
        return sum(pipe.execute())

    def outbox_pending(self, bot: str | None = None) -> int:
        return self._count("due", "bots", bot)

    def outbox_dead_count(self, bot: str | None = None) -> int:
        return self._count("dead", "deadbots", bot)

    def outbox_bots(self) -> list[str]:
        bots = sorted(self.r.smembers(self._k("ob", "bots")))
        return [b for b in bots if self.r.zcard(self._k("ob", "due", b))]

    # -- a bot's saved state -----------------------------------------------------------------
    def state_get(self, bot: str, key: str) -> str | None:
        return self.r.hget(self._k("state", bot), key)

    def state_put(self, bot: str, key: str, value: str | None) -> None:
        if value is None:
            self.r.hdel(self._k("state", bot), key)
        else:
            self.r.hset(self._k("state", bot), key, value)

    # -- history -----------------------------------------------------------------------------
    def history(self, bot: str, chat_id: str, limit: int) -> list[dict]:
        if limit <= 0:
            return []
        return [json.loads(x) for x in self.r.lrange(self._k("hist", bot, chat_id), -limit, -1)]

    def clear_history(self, bot: str, chat_id: str) -> int:
        key = self._k("hist", bot, chat_id)
        pipe = self.r.pipeline(transaction=True)
        pipe.llen(key)
        pipe.delete(key)
        return int(pipe.execute()[0])

    # -- pairing -----------------------------------------------------------------------------
    def _pair_keys(self, bot: str, user_id: str) -> list[str]:
        return [self._k("pair", bot, user_id), self._k("pair", "codes"), self._k("pair", "all")]

    def pairing_request(self, bot: str, user_id: str, chat_id: str, *, ttl_s: float,
                        make_code) -> str | None:
        now = self._clock()
        for _ in range(8):
            code = make_code()
            outcome = self._pair_request(keys=self._pair_keys(bot, user_id),
                                         args=[now, code, chat_id, now + ttl_s,
                                               f"{bot}\n{user_id}"])
            if outcome == "none":
                return None
            if outcome == "ok":
                return code
        raise StoreError("could not draw an unused pairing code")

    def is_paired(self, bot: str, user_id: str) -> bool:
        return self.r.hget(self._k("pair", bot, user_id), "state") == "approved"

    def pairing_approve(self, code: str) -> tuple[str, str | None, str | None]:
        outcome, member = self._pair_approve(keys=[self._k("pair", "codes")],
                                             args=[code, self._clock(), self.prefix])
        if outcome == "unknown":
            return "unknown", None, None
        bot, _, user = member.partition("\n")
        return outcome, bot, user

    def pairing_revoke(self, user_id: str, bot: str | None = None) -> int:
        if bot is not None:
            members = [f"{bot}\n{user_id}"]
        else:
            members = [m for m in self.r.smembers(self._k("pair", "all"))
                       if m.partition("\n")[2] == user_id]
        removed = 0
        for m in members:
            b, _, u = m.partition("\n")
            removed += int(self._pair_revoke(keys=self._pair_keys(b, u), args=[m]))
        return removed

    def pairing_list(self) -> list[dict]:
        members = sorted(self.r.smembers(self._k("pair", "all")))
        pipe = self.r.pipeline(transaction=False)
        for m in members:
            pipe.hgetall(self._k("pair", *m.split("\n", 1)))
        rows = []
        for m, h in zip(members, pipe.execute() if members else []):
            if not h:
                continue
            bot, _, user = m.partition("\n")
            num = lambda k: float(h[k]) if h.get(k) else None  # noqa: E731
            rows.append({"bot": bot, "user_id": user, "chat_id": h.get("chat_id"),
                         "state": h.get("state"), "code": h.get("code") or None,
                         "created_at": num("created_at"), "expires_at": num("expires_at"),
                         "approved_at": num("approved_at")})
        rows.sort(key=lambda r: (r["bot"], r["state"], r["created_at"] or 0))
        return rows

    # -- this process's small values ---------------------------------------------------------
    def meta_get(self, key: str) -> str | None:
        return self.r.hget(self._k("meta", self.meta_scope), key)

    def meta_put(self, key: str, value: str) -> None:
        self.r.hset(self._k("meta", self.meta_scope), key, value)
