"""The composition root: builds the store, the agent and one supervised adapter per platform,
and routes every message  inbound -> journal -> session -> agent -> outbox -> adapter.

A bot is one connection to one platform (a platform may have several bots); it is named by its
bot key (models.bot_key: "wecom", or "qqbot/sales" when a platform lists several).

Ownership (every greenlet has an owner, as in locust's runners; each is spawned through
`spawn_owned`, so its failure is logged with its name, and the loops that must keep running are
restarted):
    supervisor:<bot>        runs adapter.run(); restarts a crashed adapter with backoff,
                            leaves a fatally refused one stopped; other bots never notice
    outbox:<bot>            sends pending replies in order per chat once the adapter is ready,
                            retrying with backoff; rows survive reconnects and restarts
    store:checkpoint        WAL checkpoints off the hub
    session:/turn:<chat>    owned by the SessionManager
    command:<bot>:<chat>    one chat command (/stop, /new, /status, /help), beside the busy lock
    gateway:reload          one hot reload (SIGHUP), one at a time
Shutdown runs in a fixed order and a second call is a no-op: stop taking turns, let running
turns finish (up to drain_timeout_s), flush the outbox, close connections.

Before a message reaches a session it passes the bot's access policy (access.py: allow_from,
dm/group policy, pairing, mentions) and its per-user rate limit (ratelimit.py); refused messages
are never answered, except one notice where the user should know (a rate limit bit, a pairing
code). Commands (commands.py) bypass the chat's busy lock. A reload (reload.py) restarts only
the bots whose section changed.
"""
from __future__ import annotations

import logging
import signal
import time
from collections import Counter
from typing import Callable

import gevent
import gevent.event
import gevent.lock
import gevent.pool
from gevent import GreenletExit

from . import commands, metrics
from . import reload as reloading
from .access import PAIRING_NOTICE, PAIRING_TTL_S, BotAccess, new_pairing_code
from .agent.base import Agent, Turn, TurnFailed
from .config import Config, ConfigError, load_config
from .media import MediaManager
from .models import InboundMessage, OutboundMessage, attachment_placeholder, split_bot_key
from .platforms import registry
from .platforms.base import Delivery, FatalPlatformError, PlatformAdapter, SendError, State
from .platforms.botconfig import BotConfig
from .platforms.kit import Backoff, spawn_owned
from .progress import ProgressGate
from .ratelimit import RateLimiter
from .ratelimit import describe as describe_limit
from .replies import render_image_links, split_reply
from .runtime import HubWatch
from .sessions import BusyPolicy, SessionManager, TurnStopped
from .store_base import MAX_TURN_ATTEMPTS, StoreBase, make_store

log = logging.getLogger("hermes_green.gateway")

ERROR_REPLY = "Sorry, something went wrong while answering. Please try again."
INTERRUPTED_REPLY = "(Stopped: answering your newer message instead.)"
GAVE_UP_REPLY = ("Sorry, I could not answer this message: it was interrupted "
                 f"{MAX_TURN_ATTEMPTS} times by restarts.")
STOPPED_MARK = "(stopped)"
RATE_LIMIT_NOTICE = ("You are sending messages faster than I can take them ({limit}). I am "
                     "not reading them for now; wait a moment, then try again.")
QUEUE_CAP_NOTICE = ("Too many messages are waiting in this chat (at most {cap}): I skipped "
                    "{which} one and will skip more while it stays this full.")
OUTBOX_SEND_CONCURRENCY = 16  # chats whose replies are sent at the same time, per platform
OUTBOX_FLUSH_MAX_S = 10.0
STORE_RETRY_S = 1.0  # a store error in an outbox loop: wait this long, then read again
CHECKPOINT_INTERVAL_S = 5.0  # WAL -> database file, in the threadpool (store.checkpoint)
CHECKPOINT_BUSY_INTERVAL_S = 0.5  # ... after a round that copied more than (4 KiB frames):
CHECKPOINT_BUSY_FRAMES = 4096

AdapterFactory = Callable[..., PlatformAdapter]


def adapter_class(platform: str) -> type[PlatformAdapter]:
    return registry.adapter_class(platform)


def _adapter_section(cfg):
    """The section an adapter gets: allow_from is the gateway's to enforce (access.py), where
    admins, paired users and pairing codes are known; the kit's own check would refuse an
    unknown user before pairing could answer."""
    if isinstance(cfg, BotConfig) and cfg.allow_from:
        return cfg.model_copy(update={"allow_from": []})
    return cfg


def turn_text(messages: list[InboundMessage]) -> str:
    """What the agent reads: the text of each message, with placeholders for attachments."""
    lines = []
    for m in messages:
        text = m.text
        if m.attachments:
            placeholder = attachment_placeholder(m.attachments)
            if placeholder not in text:
                text = f"{text} {placeholder}".strip()
        lines.append(text)
    return "\n".join(lines)


def _transcriber(config: Config):
    from .agent.transcribe import Transcriber
    return Transcriber.from_config(config.agent)


def _fit_files(files: list[dict], max_parts: int | None) -> tuple[list[dict], int | None]:
    """Files and the text parts left for an answer on a platform that caps the replies per
    message (QQ: 5): the text keeps at least one part; files past the cap are dropped (logged)."""
    if max_parts is None or not files:
        return files, max_parts
    keep = files[:max(0, max_parts - 1)]
    for f in files[len(keep):]:
        log.warning("file not sent name=%s reason=reply_limit max_parts=%d", f.get("name"),
                    max_parts)
    return keep, max_parts - len(keep)


class Gateway:
    def __init__(self, config: Config, *, agent: Agent | None = None,
                 adapter_factories: dict[str, AdapterFactory] | None = None,
                 hub_watch: HubWatch | None = None, config_path: str | None = None,
                 role: str = "all") -> None:
        self.config = config
        self.role = role  # with a Redis store: gateway | worker | all (cluster/node.py)
        self.cluster = None  # the cluster Node, when the store is Redis
        self.config_path = config_path  # what SIGHUP reloads (None: reload is refused)
        self.store: StoreBase = make_store(
            config.gateway,
            history_limit=max(2 * (config.agent.max_history if config.agent else 40), 2))
        self._agent = agent
        self._agent_injected = agent is not None  # a reload keeps an agent it did not build
        self.agent: Agent | None = None
        self._agent_turns: Counter = Counter()  # agent -> turns running on it
        self._retired_agents: list[Agent] = []  # replaced by a reload; closed when idle
        self._factories = dict(adapter_factories or {})
        self.hub_watch = hub_watch
        self.adapters: dict[str, PlatformAdapter] = {}
        self.fatal: dict[str, str] = {}
        self._offline: dict[str, PlatformAdapter | None] = {}
        self.sessions = SessionManager(BusyPolicy.from_config(config.gateway), self._session_turn,
                                       self._on_interrupted, on_stopped=self._on_stopped,
                                       on_dropped=self._on_dropped)
        self.commands = commands.CommandHandler(self)
        self._access: dict[str, BotAccess] = {}
        self._limits: dict[str, RateLimiter] = {}
        self._group = gevent.pool.Group()
        self._supervisors: dict[str, gevent.Greenlet] = {}  # bot key -> its supervisor
        self._retiring: set[str] = set()  # bots being stopped by a reload
        self._reload_lock = gevent.lock.Semaphore()
        self._signals_installed = False
        self._outbox_wake: dict[str, gevent.event.Event] = {}
        self._stopping = False
        self.stopped = gevent.event.Event()
        self.started_at: float | None = None
        self.status_server = None
        self.media = MediaManager(config, self.store, self.adapters, self._spawn,
                                  transcriber=_transcriber(config))

    # -- start -------------------------------------------------------------------------------
    def start(self) -> "Gateway":
        """Open the store and build the agent and adapters (errors here are the user's: config
        or data_dir), then start connections, outbox senders and recovery."""
        self.store.open()
        runs_turns = True
        if self.config.gateway.store:  # on Redis, every process is a node of a cluster
            from .cluster.node import Node
            self.cluster = Node(self, self.role)
            runs_turns = self.cluster.works
        if self._agent is None and runs_turns:
            from .agent import loop  # the LLM agent and its tool modules, loaded on demand
            self._agent = loop.build_agent(self.config)
        self.agent = self._agent
        self.media.start()
        enabled = {b.label: b.config for b in self.config.platforms.bots()}
        for bot in self.config.platforms.bots():
            if bot.label not in self._factories:
                self._factories[bot.label] = adapter_class(bot.platform)
        if not self._connects:
            self._factories = {}
        if self.hub_watch is not None:
            self.hub_watch.start()
        self.started_at = time.time()
        if self.cluster is not None:
            self.cluster.start(self._spawn)
        for key in self._factories:
            self._start_bot(key, enabled.get(key))
        if self._connects:
            for key in set(self._factories) | set(self.store.outbox_bots()):
                self._ensure_outbox(key)
        self._spawn(self._checkpoint_loop, name="store:checkpoint", restart=True)
        if self.cluster is None:
            self._recover()  # on Redis the work streams are the recovery (cluster/queue.py)
        metrics.outbox_pending.set(self.store.outbox_pending())
        log.info("gateway started platforms=%s busy_mode=%s", ",".join(self._factories) or "none",
                 self.config.gateway.busy_mode)
        return self

    def _spawn(self, fn, *args, name: str, restart: bool = False) -> gevent.Greenlet:
        return spawn_owned(self._group, fn, *args, name=name, log=log, restart=restart)

    def _ensure_outbox(self, bot: str) -> None:
        if bot not in self._outbox_wake:
            self._outbox_wake[bot] = gevent.event.Event()
            self._spawn(self._outbox_loop, bot, name=f"outbox:{bot}", restart=True)

    @property
    def _connects(self) -> bool:
        """Does this process hold platform connections (every role but worker)?"""
        return self.cluster is None or self.cluster.connects

    def _single_connection(self, key: str) -> bool:
        """Does this bot's platform allow one connection only (its adapter class says)?"""
        single = getattr(self._factories.get(key), "single_connection", None)
        if single is None:  # a factory function (tests): ask the registered class
            try:
                single = adapter_class(split_bot_key(key)[0]).single_connection
            except LookupError:
                single = False
        return bool(single)

    def _recover(self) -> None:
        pending = self.store.pending_inbound()
        if pending:
            log.info("recovery messages=%d", len(pending))
        for p in pending:
            if p.attempts >= MAX_TURN_ATTEMPTS:
                self._give_up(p.message, p.attempts)
            else:
                self._dispatch(p.message)

    def _give_up(self, msg: InboundMessage, attempts: int) -> None:
        log.error("giving up platform=%s bot=%s chat=%s msg=%s attempts=%d",
                  msg.platform, msg.bot, msg.chat_id, msg.message_id, attempts)
        self._finish([msg], GAVE_UP_REPLY, state="failed", user_text=None, answer_text=None)

    def _checkpoint_loop(self) -> None:
        """The first round runs at start: a WAL left by a crash is folded in at once, and a
        file that cannot be checkpointed is reported now rather than in five seconds."""
        while True:
            copied = self._checkpoint_once()
            # a busy store checkpoints sooner: the WAL's size stays bounded by a short interval
            gevent.sleep(CHECKPOINT_BUSY_INTERVAL_S if copied > CHECKPOINT_BUSY_FRAMES
                         else CHECKPOINT_INTERVAL_S)

    def _checkpoint_once(self) -> int:
        """Frames checkpointed (0 when none, or on failure)."""
        problem = self.store.verify_file()
        if problem is not None:  # once; /healthz says degraded from now on (store.health())
            log.error("store file lost error=%s (writes from now on are lost at restart; "
                      "restore the file or restart)", problem)
        if self.store.problem is not None:
            return 0  # a checkpoint now would write into whatever file is at the path
        try:
            return self.store.checkpoint()
        except Exception as e:  # a failed checkpoint is retried next time; writes go on
            log.warning("checkpoint failed error=%s", type(e).__name__)
            return 0

    # -- supervision -------------------------------------------------------------------------
    def _supervise(self, name: str, cfg) -> None:
        backoff = Backoff(initial_s=1.0, max_s=60.0, healthy_after_s=60.0)
        if cfg is not None and hasattr(cfg, "backoff"):
            backoff = Backoff.from_config(cfg.backoff)
        while not self._stopping and name not in self._retiring:
            if self.cluster is not None:
                self.cluster.wait_connect(name)  # a single-connection bot: hold its lease
                if self._stopping or name in self._retiring:
                    return
            adapter = self._factories[name](_adapter_section(cfg), self.on_inbound,
                                            saved_state=self.store.adapter_state(name))
            if adapter.bot_key != name:  # its messages would be routed to another bot's key
                raise RuntimeError(f"adapter for {name!r} names itself {adapter.bot_key!r}")
            self._ensure_access(name, cfg if cfg is not None else adapter.config)
            self.adapters[name] = adapter
            started = time.monotonic()
            try:
                adapter.run()
                if self._stopping or name in self._retiring:
                    return
                if self.cluster is not None and not self.cluster.may_connect(name):
                    continue  # its lease moved to another node: wait to get it back
                log.error("adapter returned without being stopped platform=%s", name)
            except FatalPlatformError as e:
                self.fatal[name] = str(e)
                adapter.stats.last_error = str(e)
                adapter._set_state(State.FATAL)
                log.error("platform disabled platform=%s error=%s", name, e)
                return
            except GreenletExit:
                adapter.stop()
                raise
            except Exception as e:
                adapter.stats.last_error = f"crash: {type(e).__name__}"
                log.exception("adapter crashed platform=%s", name)
            metrics.reconnects_total.labels(*split_bot_key(name), "crash").inc()
            backoff.connected_for(time.monotonic() - started)
            delay = max(backoff.next_delay(), 0.05)
            log.warning("restarting adapter platform=%s delay_s=%.2f", name, delay)
            gevent.sleep(delay)

    # -- inbound -----------------------------------------------------------------------------
    def on_inbound(self, msg: InboundMessage) -> Delivery:
        """Called by an adapter's read loop, synchronously, before it acknowledges the frame.
        A store error propagates: the adapter kit applies its platform's journal-failure rule.
        A redelivery is recognized before the access policy and the rate limit look at it, so
        it never spends a token or draws a second notice."""
        if self.store.inbound_state(msg.bot_key, msg.message_id) is not None:
            return self._duplicate(msg)
        refused = self._admit(msg)
        if refused is not None:
            return refused
        self.media.mark_pending(msg)  # journaled as "pending"; fetched after the journal
        if not self.store.journal_inbound(msg):
            return self._duplicate(msg)
        metrics.messages_total.labels(msg.platform, msg.bot or msg.platform, "in").inc()
        log.info("inbound platform=%s bot=%s chat=%s msg=%s chars=%d", msg.platform, msg.bot,
                 msg.chat_id, msg.message_id, len(msg.text))
        self.media.on_journaled(msg)  # downloads start now, in media's greenlets
        if self.cluster is None and self.sessions.accepting:
            self._dispatch(msg)  # (on Redis, journaling queued it for the workers)
        return Delivery.NEW

    def _duplicate(self, msg: InboundMessage) -> Delivery:
        metrics.duplicates_total.labels(msg.platform, msg.bot or msg.platform).inc()
        log.info("duplicate skipped platform=%s bot=%s chat=%s msg=%s", msg.platform,
                 msg.bot, msg.chat_id, msg.message_id)
        return Delivery.DUPLICATE

    def _dispatch(self, msg: InboundMessage) -> None:
        """A command runs now, beside the chat's busy lock; anything else goes to its chat."""
        cmd = commands.parse(msg.text)
        if cmd is None:
            self.sessions.submit(msg)
            return
        self._spawn(self._run_command, msg, cmd, name=f"command:{msg.bot_key}:{msg.chat_id}")

    # -- access: policy, pairing, rate limit (before anything is journaled as work) -----------
    def _ensure_access(self, bot: str, section) -> None:
        if bot not in self._access:
            access = self._access[bot] = BotAccess.from_config(section)
            self._limits[bot] = RateLimiter(access.rate_messages, access.rate_per_s)

    def access_for(self, bot: str) -> BotAccess:
        return self._access.get(bot) or BotAccess()

    def _admit(self, msg: InboundMessage) -> Delivery | None:
        """None when the message may go on; else how it was refused (after journaling it as
        refused where a notice or a redelivery needs the record)."""
        bot = msg.bot_key
        decision = self.access_for(bot).decide(msg, lambda: self.store.is_paired(bot, msg.user_id))
        if not decision.allowed:
            self._count_refused(msg, decision.reason)
            if decision.pairing:
                self._pairing_request(msg)
            else:  # group chatter not addressed to us is routine: debug only
                log.log(logging.DEBUG if decision.reason == "mention" else logging.INFO,
                        "inbound refused platform=%s bot=%s chat=%s user=%s reason=%s",
                        msg.platform, msg.bot, msg.chat_id, msg.user_id, decision.reason)
            return Delivery.REFUSED
        limiter = self._limits.get(bot)
        verdict = limiter.check(msg.user_id) if limiter is not None else None
        if verdict is None or verdict.allowed:
            return None
        self.store.journal_inbound(msg, state="refused")
        self._count_refused(msg, "rate_limit")
        log.info("inbound refused platform=%s bot=%s chat=%s user=%s msg=%s reason=rate_limit "
                 "notice=%s", msg.platform, msg.bot, msg.chat_id, msg.user_id, msg.message_id,
                 verdict.notify)
        if verdict.notify:
            access = self.access_for(bot)
            self._notice(msg, RATE_LIMIT_NOTICE.format(
                limit=describe_limit(access.rate_messages, access.rate_per_s)), kind="rate_limit")
        return Delivery.REFUSED

    def _pairing_request(self, msg: InboundMessage) -> None:
        self.store.journal_inbound(msg, state="refused")
        code = self.store.pairing_request(msg.bot_key, msg.user_id, msg.chat_id,
                                          ttl_s=PAIRING_TTL_S, make_code=new_pairing_code)
        log.info("inbound refused platform=%s bot=%s chat=%s user=%s reason=pairing "
                 "code_issued=%s", msg.platform, msg.bot, msg.chat_id, msg.user_id,
                 code is not None)
        if code is not None:
            self._notice(msg, PAIRING_NOTICE.format(code=code), kind="pairing")

    def _count_refused(self, msg: InboundMessage, reason: str, n: int = 1) -> None:
        metrics.refused_total.labels(msg.platform, msg.bot or msg.platform, reason).inc(n)

    def _notice(self, msg: InboundMessage, text: str, *, kind: str) -> None:
        """A short reply the user should see although no turn answers (the outbox sends it;
        it replies to a message that gets no other answer)."""
        self._write_reply(msg, text, message_ids=[], state="refused")
        metrics.notices_total.labels(msg.platform, msg.bot or msg.platform, kind).inc()

    # -- commands -----------------------------------------------------------------------------
    def _run_command(self, msg: InboundMessage, cmd: commands.Command) -> None:
        bot = msg.bot_key
        self.store.mark_processing(bot, [msg.message_id])
        metrics.commands_total.labels(msg.platform, msg.bot or msg.platform,
                                      cmd.name if cmd.known else "unknown").inc()
        log.info("command platform=%s bot=%s chat=%s msg=%s command=%s", msg.platform, msg.bot,
                 msg.chat_id, msg.message_id, cmd.name if cmd.known else "unknown")
        try:
            reply = self.commands.handle(msg, cmd)
        except Exception as e:
            log.exception("command failed platform=%s chat=%s error=%s", msg.platform,
                          msg.chat_id, type(e).__name__)
            reply = ERROR_REPLY
        self._finish([msg], reply, state="answered", user_text=None, answer_text=None)

    def stop_chat(self, key: tuple[str, str]) -> tuple[bool, int]:
        """`/stop` and `/new`: end the chat's running turn (its partial answer is kept) and drop
        the messages waiting behind it. Returns (a turn was stopped, messages dropped)."""
        stopped, dropped = self.sessions.stop(key)
        if dropped:
            self._on_dropped(dropped, False, reason="stopped")
        return stopped, len(dropped)

    # -- turns -------------------------------------------------------------------------------
    def _session_turn(self, batch: list[InboundMessage]) -> None:
        """The SessionManager's turn: run it, then tell the cluster it is over (answered or
        not: an unanswered one is claimed again)."""
        try:
            self._run_turn(batch)
        finally:
            if self.cluster is not None:
                self.cluster.turn_over(batch)

    def _run_turn(self, batch: list[InboundMessage]) -> None:
        bot, chat_id = batch[0].chat_key
        platform = batch[0].platform
        self.store.mark_processing(bot, [m.message_id for m in batch])
        batch = self.media.ready(batch)  # attachments fetched (bounded wait) and transcribed
        text = turn_text(batch)
        max_history = self.config.agent.max_history if self.config.agent else 40
        adapter = self.adapters.get(bot)
        last = batch[-1]
        said = [""]  # the answer so far, kept in history if the turn is stopped
        outbound = self.media.outbound(adapter)  # the send_file tool's files for this turn

        def show(text_so_far: str) -> None:
            if adapter is not None and adapter.ready.is_set():
                adapter.progress(last.reply_ref, text_so_far)

        gate = ProgressGate(show, self.config.gateway.progress_after_s, what=f"bot={bot}",
                            spawn=lambda fn: self._spawn(fn, name=f"progress:{bot}"))

        def on_progress(text_so_far: str) -> None:
            said[0] = text_so_far
            gate(text_so_far)

        agent = self.agent  # a reload may replace it; this turn finishes on this one
        history = (self.store.history(bot, chat_id, max_history)
                   if getattr(agent, "uses_history", True) else [])
        turn = Turn(chat_key=(bot, chat_id), text=text, history=history,
                    on_progress=on_progress,
                    take_follow_ups=lambda: self._take_follow_ups(batch),
                    images=self.media.images(batch), send_file=outbound)
        started = time.monotonic()
        metrics.turns_in_flight.inc()
        state = "answered"
        self._agent_turns[agent] += 1
        try:
            answer = agent.run_turn(turn)
        except TurnStopped:
            state = "stopped"
        except GreenletExit:
            raise
        except TurnFailed as e:
            answer, state = e.reply, "failed"
        except Exception as e:
            log.exception("agent failed platform=%s chat=%s error=%s", platform, chat_id,
                          type(e).__name__)
            answer, state = ERROR_REPLY, "failed"
        finally:
            gate.close()
            metrics.turns_in_flight.dec()
            metrics.turn_seconds.observe(time.monotonic() - started)
            self._agent_done(agent)
        if state == "stopped":
            self._on_stopped(batch, said[0])
            return
        # A failed turn leaves no trace in history: the model never reads its error back.
        ok = state == "answered"
        text = turn_text(batch)  # steer: the follow-ups the turn took are part of it
        self._finish(batch, answer, state=state, user_text=text if ok else None,
                     answer_text=answer if ok else None, files=outbound.files if ok else ())

    def _take_follow_ups(self, batch: list[InboundMessage]) -> list[str]:
        """Busy mode steer: messages for this running turn, now part of its batch."""
        taken = self.sessions.take_follow_ups(batch)
        if not taken:
            return []
        taken = self.media.ready(taken)  # their attachments, fetched like the turn's own
        self.store.mark_processing(taken[0].bot_key, [m.message_id for m in taken])
        log.info("follow-ups given to the running turn bot=%s chat=%s msgs=%d",
                 taken[0].bot_key, taken[0].chat_id, len(taken))
        return [turn_text([m]) for m in taken]

    def _on_stopped(self, batch: list[InboundMessage], said: str = "") -> None:
        """`/stop` ended this turn: what the user wrote and what was said so far stay in the
        history; a partial answer is sent with a mark (it finishes a streamed reply)."""
        bot, chat_id = batch[0].chat_key
        log.info("turn stopped bot=%s chat=%s msgs=%d chars_said=%d", bot, chat_id, len(batch),
                 len(said))
        said = said.strip()
        if said:
            self._finish(batch, f"{said}\n\n{STOPPED_MARK}", state="answered",
                         user_text=turn_text(batch), answer_text=said)
        else:
            self._write_reply(batch[-1], None, message_ids=[m.message_id for m in batch],
                              state="answered", user_text=turn_text(batch))

    def _on_dropped(self, dropped: list[InboundMessage], notify: bool, *,
                    reason: str = "queue_cap") -> None:
        """Messages skipped by the queue cap (or dropped by /stop): never answered later."""
        first = dropped[0]
        self.store.finish_turn(first.bot_key, first.chat_id, [m.message_id for m in dropped],
                               [], user_text=None, answer_text=None, state="refused")
        self._closed(first.bot_key, [m.message_id for m in dropped])
        self._count_refused(first, reason, len(dropped))
        log.info("inbound dropped bot=%s chat=%s msgs=%d reason=%s notice=%s", first.bot_key,
                 first.chat_id, len(dropped), reason, notify)
        if notify:
            policy = self.sessions.policy
            self._notice(first, QUEUE_CAP_NOTICE.format(
                cap=policy.queue_cap, which="the oldest waiting" if policy.drop == "oldest"
                else "this"), kind="queue_cap")

    def _on_interrupted(self, batch: list[InboundMessage]) -> None:
        bot, chat_id = batch[0].chat_key
        log.info("turn interrupted bot=%s chat=%s msgs=%d", bot, chat_id, len(batch))
        self._finish(batch, INTERRUPTED_REPLY, state="answered", user_text=turn_text(batch),
                     answer_text=None)

    def _finish(self, batch: list[InboundMessage], answer: str, *, state: str,
                user_text: str | None, answer_text: str | None, files=()) -> None:
        self._write_reply(batch[-1], answer, message_ids=[m.message_id for m in batch],
                          state=state, user_text=user_text, answer_text=answer_text,
                          files=files)

    def _write_reply(self, last: InboundMessage, answer: str | None, *, message_ids: list[str],
                     state: str, user_text: str | None = None,
                     answer_text: str | None = None, files=()) -> None:
        """One transaction: the reply to `last` (none when `answer` is None) into the outbox,
        then the files the agent sent (kind 'file'), `message_ids` closed with `state`, history
        appended."""
        bot, chat_id = last.chat_key
        adapter = self.adapters.get(bot) or self._offline_adapter(bot)
        chunk = adapter.reply_chunk_chars() if adapter else 2000
        max_parts = adapter.max_reply_parts() if adapter else 5
        files, max_text_parts = _fit_files(list(files), max_parts)
        if answer is not None and adapter is not None:
            answer = render_image_links(answer, adapter.image_links)
        parts = [] if answer is None else [
            OutboundMessage(platform=last.platform, bot=last.bot, chat_id=chat_id, text=piece,
                            in_reply_to=last.message_id, reply_ref=last.reply_ref, seq=i)
            for i, piece in enumerate(split_reply(answer, chunk, max_text_parts))]
        parts += [OutboundMessage(platform=last.platform, bot=last.bot, chat_id=chat_id,
                                  text=f.get("caption") or "", in_reply_to=last.message_id,
                                  reply_ref=last.reply_ref, seq=len(parts) + i, kind="file",
                                  file=f)
                  for i, f in enumerate(files)]
        self.store.finish_turn(bot, chat_id, message_ids, parts,
                               user_text=user_text, answer_text=answer_text, state=state)
        self._closed(bot, message_ids)
        if self.cluster is not None:  # the node that sends for this bot is woken
            self.cluster.replies_queued(bot)
            return
        self._ensure_outbox(bot)
        self._outbox_wake[bot].set()

    def _closed(self, bot: str, message_ids: list[str]) -> None:
        """These messages are closed in the store: on Redis their work entries are done."""
        if self.cluster is not None and message_ids:
            self.cluster.turn_finished(bot, message_ids)

    def _offline_adapter(self, bot: str) -> PlatformAdapter | None:
        """A worker has no connections: the bot's adapter, built but never run, still says
        how its replies are split."""
        if bot not in self._offline:
            cfg = self.config.platforms.enabled().get(bot)
            self._offline[bot] = None if cfg is None else adapter_class(
                split_bot_key(bot)[0])(cfg, lambda msg: Delivery.REFUSED)
        return self._offline[bot]

    # -- outbox ------------------------------------------------------------------------------
    def _outbox_loop(self, bot: str) -> None:
        """Hand due rows to one sender greenlet per chat (order within a chat is kept; chats
        do not wait for each other), then sleep until woken or the next retry is due. A store
        error is logged and the loop reads again shortly: it never ends this bot's replies."""
        wake = self._outbox_wake[bot]
        senders = gevent.pool.Pool(OUTBOX_SEND_CONCURRENCY)
        chat_senders: dict[str, gevent.Greenlet] = {}
        # Rows a sender finished with while the due rows were being read: a store whose read
        # yields (Redis) may answer with a row whose send ended meanwhile; it is not sent again.
        handled: set[int] = set()
        while True:
            adapter = self.adapters.get(bot)
            if adapter is None or not adapter.ready.is_set():
                wake.clear()
                (adapter.ready if adapter is not None else wake).wait(1.0)
                continue
            if self.cluster is not None and not self.cluster.may_send(bot):
                wake.clear()  # another node holds this bot's lease and sends its replies
                wake.wait(1.0)
                continue
            wake.clear()
            handled.clear()
            try:
                due = self.store.outbox_due(bot)
                next_due = self.store.outbox_next_due_at(bot)
            except Exception as e:
                log.error("outbox read failed bot=%s error=%s: %s retry_s=%.1f", bot,
                          type(e).__name__, str(e)[:200], STORE_RETRY_S)
                wake.wait(STORE_RETRY_S)
                continue
            by_chat: dict[str, list[OutboundMessage]] = {}  # (no yield from here to the spawns)
            for out in (o for o in due if o.outbox_id not in handled):
                by_chat.setdefault(out.chat_id, []).append(out)
            for chat_id, rows in by_chat.items():
                running = chat_senders.get(chat_id)
                if running is not None and not running.dead:
                    continue  # its sender wakes us when done; then the rest goes in order
                chat_senders[chat_id] = spawn_owned(senders, self._send_rows, bot, adapter, rows,
                                                    handled, name=f"outbox:{bot}:{chat_id}",
                                                    log=log)
            for chat_id in [c for c, g in chat_senders.items() if g.dead]:
                del chat_senders[chat_id]
            if next_due is None or chat_senders:
                wake.wait(1.0)
            else:
                wake.wait(min(1.0, max(0.01, next_due - time.time())))

    def _send_rows(self, bot: str, adapter: PlatformAdapter, rows: list[OutboundMessage],
                   handled: set[int]) -> None:
        try:
            for out in rows:
                sent = self._send_one(adapter, out)
                handled.add(out.outbox_id)
                if not sent:
                    break  # keep this chat's order: later parts wait for the failed one
        finally:
            self._outbox_wake[bot].set()

    def _send_one(self, adapter: PlatformAdapter, out: OutboundMessage) -> bool:
        try:
            (adapter.send_file if out.kind == "file" else adapter.send)(out)
        except SendError as e:
            if e.retryable:
                delay = e.retry_after if e.retry_after is not None else min(
                    60.0, 0.5 * 2 ** min(out.attempts, 7))
                self.store.outbox_retry(out.outbox_id, delay, str(e))
                log.warning("reply retry platform=%s chat=%s outbox=%d attempt=%d delay_s=%.1f"
                            " error=%s", out.platform, out.chat_id, out.outbox_id,
                            out.attempts + 1, delay, e)
                return False
            self.store.outbox_dead(out.outbox_id, str(e))
            adapter.stats.undeliverable += 1
            metrics.undeliverable_total.labels(out.platform, out.bot or out.platform).inc()
            log.error("reply undeliverable platform=%s bot=%s chat=%s outbox=%d error=%s",
                      out.platform, out.bot, out.chat_id, out.outbox_id, e)
        except GreenletExit:
            raise
        except Exception as e:
            self.store.outbox_retry(out.outbox_id, 1.0, f"{type(e).__name__}")
            log.exception("reply send crashed platform=%s outbox=%d", out.platform, out.outbox_id)
            return False
        else:
            self.store.outbox_done(out.outbox_id)
            adapter.stats.messages_out += 1
            metrics.messages_total.labels(out.platform, out.bot or out.platform, "out").inc()
            log.info("reply sent platform=%s bot=%s chat=%s outbox=%d part=%d", out.platform,
                     out.bot, out.chat_id, out.outbox_id, out.seq)
        return True

    # -- stop --------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        if self._signals_installed:
            return
        self._signals_installed = True
        for sig in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(sig, self._on_signal, sig)
        if self.config_path is not None:
            gevent.signal_handler(signal.SIGHUP, self._on_reload_signal)

    def _on_signal(self, sig) -> None:
        log.info("signal received signal=%s", signal.Signals(sig).name)
        gevent.spawn(self.shutdown).name = "gateway:shutdown"

    def shutdown(self) -> None:
        if self._stopping:
            self.stopped.wait()
            return
        self._stopping = True
        if self.cluster is not None:
            self.cluster.stop_taking_work()
        deadline = time.monotonic() + self.config.gateway.drain_timeout_s
        log.info("draining turns=%d timeout_s=%.0f", self.sessions.turns_in_flight(),
                 self.config.gateway.drain_timeout_s)
        clean = self.sessions.drain(self.config.gateway.drain_timeout_s)
        if not clean:
            log.warning("drain timeout: unfinished turns stay journaled for the next start")
        flush_until = max(deadline, time.monotonic() + 1.0)
        flush_until = min(flush_until, time.monotonic() + OUTBOX_FLUSH_MAX_S)
        while self._unsent() and time.monotonic() < flush_until:
            if not any(a.ready.is_set() for a in self.adapters.values()):
                break
            for ev in self._outbox_wake.values():
                ev.set()
            gevent.sleep(0.02)
        left = self._unsent()
        if left:
            log.warning("outbox not empty at exit pending=%d (sent on next start)", left)
        for adapter in self.adapters.values():
            adapter.stop()
        gevent.joinall(list(self._supervisors.values()), timeout=5)  # connections close
        for adapter in self.adapters.values():
            flush = getattr(adapter.saved_state, "flush", None)
            if flush is not None:
                flush()  # resume cursors held by put_soon: the next start replays less
        if self.cluster is not None:
            self.cluster.stop()  # leases given back: other nodes take over at once
        self._group.kill(block=True, timeout=2)
        if self.status_server is not None:
            self.status_server.stop()
        for retired in self._retired_agents:
            retired.close()
        if self.agent is not None:
            self.agent.close()
        self.media.close()
        if self.hub_watch is not None:
            self.hub_watch.stop()
        self.store.close()
        log.info("gateway stopped")
        self.stopped.set()

    def _unsent(self) -> int:
        """Replies this process still has to send (on Redis: for the bots it sends for)."""
        if self.cluster is None:
            return self.store.outbox_pending()
        return sum(self.store.outbox_pending(b) for b in self._outbox_wake
                   if self.cluster.may_send(b))

    def serve_forever(self) -> int:
        self.install_signal_handlers()
        self.stopped.wait()
        return 0

    def wait_idle(self, timeout: float = 60.0) -> bool:
        """Wait until every turn is done and every reply accepted (used by `chat` at end of
        input, and by tests)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.sessions.wait_idle(max(0.0, deadline - time.monotonic())):
                return False
            if self.store.outbox_pending() == 0:
                return True
            gevent.sleep(0.01)
        return False

    # -- bots: start, stop, hot reload (reload.py) --------------------------------------------
    def _start_bot(self, key: str, cfg) -> None:
        if not self._connects:
            return  # a worker node: its turns name bots, it never connects them
        self._retiring.discard(key)
        self.fatal.pop(key, None)
        if self.cluster is not None:
            self.cluster.add_bot(key, self._single_connection(key))
        self._supervisors[key] = self._spawn(self._supervise, key, cfg, name=f"supervisor:{key}")
        self._ensure_outbox(key)

    def _stop_bot(self, key: str, timeout: float = 5.0) -> None:
        """Close one bot's connection and end its supervisor; other bots never notice. Its
        unsent replies stay in the outbox for when it comes back."""
        self._retiring.add(key)
        adapter = self.adapters.get(key)
        if adapter is not None:
            adapter.stop()
        supervisor = self._supervisors.pop(key, None)
        if supervisor is not None:
            supervisor.join(timeout)
            if not supervisor.dead:
                supervisor.kill(block=True, timeout=2)
        self.adapters.pop(key, None)
        self.fatal.pop(key, None)
        self._access.pop(key, None)  # a changed section brings its own policy and limits
        self._limits.pop(key, None)
        self._offline.pop(key, None)
        if self.cluster is not None:
            self.cluster.remove_bot(key)  # its lease given back: another node may take it

    def _on_reload_signal(self) -> None:
        log.info("signal received signal=SIGHUP")
        self._spawn(self.reload, name="gateway:reload")

    def reload(self) -> tuple[bool, str]:
        """Read the config file again and apply what changed; an invalid file changes nothing
        (one line in the log). Returns (applied, detail); the outcome is also recorded for
        `hermes-green reload`."""
        with self._reload_lock:
            if self._stopping:
                ok, detail = False, "the gateway is stopping"
            else:
                ok, detail = self._reload_once()
        metrics.reloads_total.labels("applied" if ok else "refused").inc()
        try:
            self.store.meta_put(reloading.LAST_RELOAD_KEY, reloading.outcome_record(ok, detail))
        except Exception as e:  # the reload itself is done; only its report is lost
            log.warning("reload outcome not recorded error=%s", type(e).__name__)
        return ok, detail

    def _reload_once(self) -> tuple[bool, str]:
        if self.config_path is None:
            return False, "no config file to reload (the gateway was started without one)"
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            log.error("reload refused error=%s", e)
            return False, str(e)
        plan = reloading.plan(self.config, new)
        if plan.refused:
            log.error("reload refused error=%s", plan.refused)
            return False, plan.refused
        agent = None
        if plan.agent_changed and not self._agent_injected:
            try:
                from .agent import loop
                agent = loop.build_agent(new)
            except ConfigError as e:
                log.error("reload refused error=%s", e)
                return False, str(e)
        # Valid and built: from here on the reload applies in full.
        self.config = new
        self.sessions.policy = BusyPolicy.from_config(new.gateway)
        self.store.history_limit = max(2 * (new.agent.max_history if new.agent else 40), 2)
        if agent is not None:
            self._swap_agent(agent)
        for key in plan.stop:
            self._stop_bot(key)
        for key, section in plan.start.items():
            if key not in self._factories:
                self._factories[key] = adapter_class(split_bot_key(key)[0])
            self._start_bot(key, section)
        detail = plan.describe()
        log.info("config reloaded %s", detail)
        return True, detail

    def _swap_agent(self, agent: Agent) -> None:
        old, self.agent = self.agent, agent
        self._agent = agent
        if old is not None:
            self._retired_agents.append(old)
            self._agent_done(old, count=False)

    def _agent_done(self, agent: Agent, *, count: bool = True) -> None:
        """A turn ended on `agent`: a retired agent is closed once its last turn ended."""
        if count:
            self._agent_turns[agent] -= 1
        if self._agent_turns[agent] <= 0:
            del self._agent_turns[agent]
            if agent in self._retired_agents:
                self._retired_agents.remove(agent)
                agent.close()

    # -- introspection -----------------------------------------------------------------------
    def platform_states(self) -> dict[str, dict]:
        return {name: a.stats.as_dict() for name, a in self.adapters.items()}
