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
Shutdown runs in a fixed order and a second call is a no-op: stop taking turns, let running
turns finish (up to drain_timeout_s), flush the outbox, close connections.
"""
from __future__ import annotations

import logging
import signal
import time
from typing import Callable

import gevent
import gevent.event
import gevent.pool
from gevent import GreenletExit

from . import metrics
from .agent.base import Agent, Turn, TurnFailed
from .config import Config
from .models import InboundMessage, OutboundMessage, attachment_placeholder, split_bot_key
from .platforms import registry
from .platforms.base import Delivery, FatalPlatformError, PlatformAdapter, SendError, State
from .platforms.kit import Backoff, spawn_owned
from .replies import split_reply
from .runtime import HubWatch
from .sessions import SessionManager
from .store import MAX_TURN_ATTEMPTS, Store

log = logging.getLogger("hermes_green.gateway")

ERROR_REPLY = "Sorry, something went wrong while answering. Please try again."
INTERRUPTED_REPLY = "(Stopped: answering your newer message instead.)"
GAVE_UP_REPLY = ("Sorry, I could not answer this message: it was interrupted "
                 f"{MAX_TURN_ATTEMPTS} times by restarts.")
OUTBOX_SEND_CONCURRENCY = 16  # chats whose replies are sent at the same time, per platform
OUTBOX_FLUSH_MAX_S = 10.0
STORE_RETRY_S = 1.0  # a store error in an outbox loop: wait this long, then read again
CHECKPOINT_INTERVAL_S = 5.0  # WAL -> database file, in the threadpool (store.checkpoint)

AdapterFactory = Callable[..., PlatformAdapter]


def adapter_class(platform: str) -> type[PlatformAdapter]:
    return registry.adapter_class(platform)




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


class Gateway:
    def __init__(self, config: Config, *, agent: Agent | None = None,
                 adapter_factories: dict[str, AdapterFactory] | None = None,
                 hub_watch: HubWatch | None = None) -> None:
        self.config = config
        self.store = Store(config.gateway.data_dir,
                           history_limit=max(2 * (config.agent.max_history if config.agent else 40), 2))
        self._agent = agent
        self.agent: Agent | None = None
        self._factories = dict(adapter_factories or {})
        self.hub_watch = hub_watch
        self.adapters: dict[str, PlatformAdapter] = {}
        self.fatal: dict[str, str] = {}
        self.sessions = SessionManager(config.gateway.busy_mode, self._run_turn,
                                       self._on_interrupted)
        self._group = gevent.pool.Group()
        self._supervisors: list[gevent.Greenlet] = []
        self._outbox_wake: dict[str, gevent.event.Event] = {}
        self._stopping = False
        self.stopped = gevent.event.Event()
        self.started_at: float | None = None
        self.status_server = None

    # -- start -------------------------------------------------------------------------------
    def start(self) -> "Gateway":
        """Open the store and build the agent and adapters (errors here are the user's: config
        or data_dir), then start connections, outbox senders and recovery."""
        self.store.open()
        if self._agent is None:
            from .agent import loop  # the LLM agent and its tool modules, loaded on demand
            self._agent = loop.build_agent(self.config)
        self.agent = self._agent
        enabled = {b.label: b.config for b in self.config.platforms.bots()}
        for bot in self.config.platforms.bots():
            if bot.label not in self._factories:
                self._factories[bot.label] = adapter_class(bot.platform)
        if self.hub_watch is not None:
            self.hub_watch.start()
        self.started_at = time.time()
        for key in self._factories:
            cfg = enabled.get(key)
            self._supervisors.append(self._spawn(self._supervise, key, cfg,
                                                 name=f"supervisor:{key}"))
        for key in set(self._factories) | set(self.store.outbox_bots()):
            self._ensure_outbox(key)
        self._spawn(self._checkpoint_loop, name="store:checkpoint", restart=True)
        self._recover()
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

    def _recover(self) -> None:
        pending = self.store.pending_inbound()
        if pending:
            log.info("recovery messages=%d", len(pending))
        for p in pending:
            msg = p.message
            if p.attempts >= MAX_TURN_ATTEMPTS:
                log.error("giving up platform=%s bot=%s chat=%s msg=%s attempts=%d",
                          msg.platform, msg.bot, msg.chat_id, msg.message_id, p.attempts)
                self._finish([msg], GAVE_UP_REPLY, state="failed", user_text=None,
                             answer_text=None)
            else:
                self.sessions.submit(msg)

    def _checkpoint_loop(self) -> None:
        """The first round runs at start: a WAL left by a crash is folded in at once, and a
        file that cannot be checkpointed is reported now rather than in five seconds."""
        while True:
            self._checkpoint_once()
            gevent.sleep(CHECKPOINT_INTERVAL_S)

    def _checkpoint_once(self) -> None:
        problem = self.store.verify_file()
        if problem is not None:  # once; /healthz says degraded from now on (store.health())
            log.error("store file lost error=%s (writes from now on are lost at restart; "
                      "restore the file or restart)", problem)
        if self.store.problem is not None:
            return  # a checkpoint now would write into whatever file is at the path
        try:
            self.store.checkpoint()
        except Exception as e:  # a failed checkpoint is retried next time; writes go on
            log.warning("checkpoint failed error=%s", type(e).__name__)

    # -- supervision -------------------------------------------------------------------------
    def _supervise(self, name: str, cfg) -> None:
        backoff = Backoff(initial_s=1.0, max_s=60.0, healthy_after_s=60.0)
        if cfg is not None and hasattr(cfg, "backoff"):
            backoff = Backoff.from_config(cfg.backoff)
        while not self._stopping:
            adapter = self._factories[name](cfg, self.on_inbound,
                                            saved_state=self.store.adapter_state(name))
            if adapter.bot_key != name:  # its messages would be routed to another bot's key
                raise RuntimeError(f"adapter for {name!r} names itself {adapter.bot_key!r}")
            self.adapters[name] = adapter
            started = time.monotonic()
            try:
                adapter.run()
                if self._stopping:
                    return
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
        A store error propagates: the adapter kit applies its platform's journal-failure rule."""
        if not self.store.journal_inbound(msg):
            metrics.duplicates_total.labels(msg.platform, msg.bot or msg.platform).inc()
            log.info("duplicate skipped platform=%s bot=%s chat=%s msg=%s", msg.platform,
                     msg.bot, msg.chat_id, msg.message_id)
            return Delivery.DUPLICATE
        metrics.messages_total.labels(msg.platform, msg.bot or msg.platform, "in").inc()
        log.info("inbound platform=%s bot=%s chat=%s msg=%s chars=%d", msg.platform, msg.bot,
                 msg.chat_id, msg.message_id, len(msg.text))
        if self.sessions.accepting:
            self.sessions.submit(msg)
        return Delivery.NEW

    # -- turns -------------------------------------------------------------------------------
    def _run_turn(self, batch: list[InboundMessage]) -> None:
        bot, chat_id = batch[0].chat_key
        platform = batch[0].platform
        self.store.mark_processing(bot, [m.message_id for m in batch])
        text = turn_text(batch)
        max_history = self.config.agent.max_history if self.config.agent else 40
        adapter = self.adapters.get(bot)
        last = batch[-1]

        def on_progress(text_so_far: str) -> None:
            if adapter is not None and adapter.ready.is_set():
                try:
                    adapter.progress(last.reply_ref, text_so_far)
                except Exception as e:  # progress is best effort; the final reply is durable
                    log.debug("progress failed platform=%s error=%s", platform, type(e).__name__)

        turn = Turn(chat_key=(bot, chat_id), text=text,
                    history=self.store.history(bot, chat_id, max_history),
                    on_progress=on_progress)
        started = time.monotonic()
        metrics.turns_in_flight.inc()
        state = "answered"
        try:
            answer = self.agent.run_turn(turn)
        except GreenletExit:
            raise
        except TurnFailed as e:
            answer, state = e.reply, "failed"
        except Exception as e:
            log.exception("agent failed platform=%s chat=%s error=%s", platform, chat_id,
                          type(e).__name__)
            answer, state = ERROR_REPLY, "failed"
        finally:
            metrics.turns_in_flight.dec()
            metrics.turn_seconds.observe(time.monotonic() - started)
        # A failed turn leaves no trace in history: the model never reads its error back.
        ok = state == "answered"
        self._finish(batch, answer, state=state, user_text=text if ok else None,
                     answer_text=answer if ok else None)

    def _on_interrupted(self, batch: list[InboundMessage]) -> None:
        bot, chat_id = batch[0].chat_key
        log.info("turn interrupted bot=%s chat=%s msgs=%d", bot, chat_id, len(batch))
        self._finish(batch, INTERRUPTED_REPLY, state="answered", user_text=turn_text(batch),
                     answer_text=None)

    def _finish(self, batch: list[InboundMessage], answer: str, *, state: str,
                user_text: str | None, answer_text: str | None) -> None:
        bot, chat_id = batch[0].chat_key
        adapter = self.adapters.get(bot)
        chunk = adapter.reply_chunk_chars() if adapter else 2000
        max_parts = adapter.max_reply_parts() if adapter else 5
        last = batch[-1]
        parts = [OutboundMessage(platform=last.platform, bot=last.bot, chat_id=chat_id,
                                 text=piece, in_reply_to=last.message_id,
                                 reply_ref=last.reply_ref, seq=i)
                 for i, piece in enumerate(split_reply(answer, chunk, max_parts))]
        self.store.finish_turn(bot, chat_id, [m.message_id for m in batch], parts,
                               user_text=user_text, answer_text=answer_text, state=state)
        metrics.outbox_pending.set(self.store.outbox_pending())
        self._ensure_outbox(bot)
        self._outbox_wake[bot].set()

    # -- outbox ------------------------------------------------------------------------------
    def _outbox_loop(self, bot: str) -> None:
        """Hand due rows to one sender greenlet per chat (order within a chat is kept; chats
        do not wait for each other), then sleep until woken or the next retry is due. A store
        error is logged and the loop reads again shortly: it never ends this bot's replies."""
        wake = self._outbox_wake[bot]
        senders = gevent.pool.Pool(OUTBOX_SEND_CONCURRENCY)
        chat_senders: dict[str, gevent.Greenlet] = {}
        while True:
            adapter = self.adapters.get(bot)
            if adapter is None or not adapter.ready.is_set():
                wake.clear()
                (adapter.ready if adapter is not None else wake).wait(1.0)
                continue
            wake.clear()
            try:
                due = self.store.outbox_due(bot)
                next_due = self.store.outbox_next_due_at(bot)
            except Exception as e:
                log.error("outbox read failed bot=%s error=%s: %s retry_s=%.1f", bot,
                          type(e).__name__, str(e)[:200], STORE_RETRY_S)
                wake.wait(STORE_RETRY_S)
                continue
            by_chat: dict[str, list[OutboundMessage]] = {}
            for out in due:
                by_chat.setdefault(out.chat_id, []).append(out)
            for chat_id, rows in by_chat.items():
                running = chat_senders.get(chat_id)
                if running is not None and not running.dead:
                    continue  # its sender wakes us when done; then the rest goes in order
                chat_senders[chat_id] = spawn_owned(senders, self._send_rows, bot, adapter, rows,
                                                    name=f"outbox:{bot}:{chat_id}", log=log)
            for chat_id in [c for c, g in chat_senders.items() if g.dead]:
                del chat_senders[chat_id]
            if next_due is None or chat_senders:
                wake.wait(1.0)
            else:
                wake.wait(min(1.0, max(0.01, next_due - time.time())))

    def _send_rows(self, bot: str, adapter: PlatformAdapter, rows: list[OutboundMessage]) -> None:
        try:
            for out in rows:
                if not self._send_one(adapter, out):
                    break  # keep this chat's order: later parts wait for the failed one
        finally:
            self._outbox_wake[bot].set()

    def _send_one(self, adapter: PlatformAdapter, out: OutboundMessage) -> bool:
        try:
            adapter.send(out)
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
        metrics.outbox_pending.set(self.store.outbox_pending())
        return True

    # -- stop --------------------------------------------------------------------------------
    def install_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            gevent.signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig) -> None:
        log.info("signal received signal=%s", signal.Signals(sig).name)
        gevent.spawn(self.shutdown).name = "gateway:shutdown"

    def shutdown(self) -> None:
        if self._stopping:
            self.stopped.wait()
            return
        self._stopping = True
        deadline = time.monotonic() + self.config.gateway.drain_timeout_s
        log.info("draining turns=%d timeout_s=%.0f", self.sessions.turns_in_flight(),
                 self.config.gateway.drain_timeout_s)
        clean = self.sessions.drain(self.config.gateway.drain_timeout_s)
        if not clean:
            log.warning("drain timeout: unfinished turns stay journaled for the next start")
        flush_until = max(deadline, time.monotonic() + 1.0)
        flush_until = min(flush_until, time.monotonic() + OUTBOX_FLUSH_MAX_S)
        while self.store.outbox_pending() and time.monotonic() < flush_until:
            if not any(a.ready.is_set() for a in self.adapters.values()):
                break
            for ev in self._outbox_wake.values():
                ev.set()
            gevent.sleep(0.02)
        left = self.store.outbox_pending()
        if left:
            log.warning("outbox not empty at exit pending=%d (sent on next start)", left)
        for adapter in self.adapters.values():
            adapter.stop()
        gevent.joinall(self._supervisors, timeout=5)  # adapters close their connections
        self._group.kill(block=True, timeout=2)
        if self.status_server is not None:
            self.status_server.stop()
        if self.agent is not None:
            self.agent.close()
        if self.hub_watch is not None:
            self.hub_watch.stop()
        self.store.close()
        log.info("gateway stopped")
        self.stopped.set()

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

    # -- introspection -----------------------------------------------------------------------
    def platform_states(self) -> dict[str, dict]:
        return {name: a.stats.as_dict() for name, a in self.adapters.items()}
