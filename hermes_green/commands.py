"""Chat commands: `/stop`, `/new`, `/status`, `/help`.

A command is read from the normalized text of an inbound message: `/name`, optionally
`/name@botname` (Telegram's form in groups), optionally after leading `@mention` tokens (how a
mention before the command arrives from platforms that keep it in the text). `/usr/bin` or
`/ 2` are not commands: the name must end at a space, an `@` or the end of the text.

The gateway journals a command like any message (a redelivery is recognized), runs it at once
beside the chat's busy lock (it acts while a turn runs), and sends the answer through the
outbox, once. This module parses, acts through the gateway's public parts (`sessions`,
`store`, `adapters`, `config`) and writes the answer; it never sends anything itself.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass

from .models import InboundMessage

COMMANDS = {
    "stop": "end the answer being written now (what was said so far is kept)",
    "new": "start a fresh conversation in this chat (earlier messages are forgotten)",
    "status": "this bot's connection, waiting messages, model and uptime",
    "help": "this list",
}
HELP_TEXT = "Commands:\n" + "\n".join(f"/{name} - {what}" for name, what in COMMANDS.items())

_COMMAND = re.compile(r"(?:@\S+\s+)*/([A-Za-z][A-Za-z0-9_]{0,31})(?:@(\S*))?(?:\s+(.*))?",
                      re.DOTALL)


@dataclass(frozen=True)
class Command:
    name: str  # lower case, as typed (maybe unknown)
    args: str

    @property
    def known(self) -> bool:
        return self.name in COMMANDS


def parse(text: str) -> Command | None:
    """The command in `text`, or None for an ordinary message."""
    m = _COMMAND.fullmatch(text.strip())
    if m is None:
        return None
    return Command(m.group(1).lower(), (m.group(3) or "").strip())


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


class CommandHandler:
    """Runs one parsed command for the gateway and returns the answer's text."""

    def __init__(self, gateway) -> None:
        self.gateway = gateway

    def handle(self, msg: InboundMessage, cmd: Command) -> str:
        if not cmd.known:
            return f"Unknown command /{cmd.name[:32]}.\n{HELP_TEXT}"
        if cmd.args:
            return f"/{cmd.name} takes no arguments (send /help for the list)."
        return getattr(self, f"_{cmd.name}")(msg)

    # -- the commands ----------------------------------------------------------------------------
    def _help(self, msg: InboundMessage) -> str:
        return HELP_TEXT

    def _stop(self, msg: InboundMessage) -> str:
        stopped, dropped = self.gateway.stop_chat(msg.chat_key)
        text = "Stopped." if stopped else "Nothing is running."
        if dropped:
            text += f" {_plural(dropped, 'waiting message')} dropped."
        return text

    def _new(self, msg: InboundMessage) -> str:
        stopped, dropped = self.gateway.stop_chat(msg.chat_key)
        self.gateway.store.clear_history(*msg.chat_key)
        text = "New conversation: earlier messages are forgotten."
        if stopped:
            text = "Stopped the answer being written. " + text
        if dropped:
            text += f" {_plural(dropped, 'waiting message')} dropped."
        return text

    def _status(self, msg: InboundMessage) -> str:
        gw = self.gateway
        bot = msg.bot_key
        chat = gw.sessions.chat_info(msg.chat_key)
        lines = [self._bot_line(bot)]
        if chat.running_for_s is not None:
            lines.append(f"this chat: answering for {duration(chat.running_for_s)}, "
                         f"{chat.waiting} waiting")
        else:
            lines.append(f"this chat: idle, {chat.waiting} waiting")
        uptime = duration(time.time() - gw.started_at) if gw.started_at else "-"
        lines.append(f"model: {self._model()} | busy mode: {gw.sessions.busy_mode} | "
                     f"up {uptime}")
        if gw.access_for(bot).is_admin(msg.user_id):
            lines.append(self._gateway_line())
            lines += ["  " + self._bot_line(other) for other in sorted(gw.adapters)
                      if other != bot]
        return "\n".join(lines)

    # -- pieces of /status ------------------------------------------------------------------------
    def _bot_line(self, bot: str) -> str:
        gw = self.gateway
        adapter = gw.adapters.get(bot)
        running, waiting = gw.sessions.bot_info(bot)
        if adapter is None:
            state = "fatal" if bot in gw.fatal else "starting"
        else:
            stats = adapter.stats
            state = stats.state.value
            if stats.connected_since:
                state += f" for {duration(time.time() - stats.connected_since)}"
            reconnects = sum(stats.reconnects.values())
            if reconnects:
                state += f" ({_plural(reconnects, 'reconnect')})"
        return f"{bot}: {state}; {running} answering, {waiting} waiting"

    def _gateway_line(self) -> str:
        gw = self.gateway
        waiting = sum(s.waiting for s in gw.sessions.sessions.values())
        return (f"gateway: {_plural(len(gw.adapters), 'bot')}, "
                f"{gw.sessions.turns_in_flight()} answering, {waiting} waiting, "
                f"{gw.store.outbox_pending()} replies unsent")

    def _model(self) -> str:
        agent = self.gateway.config.agent
        if agent is None:
            return "echo (no agent section)"
        if agent.backend == "service":
            return f"{agent.model} (agent service)"
        return agent.model
