"""Who may talk to a bot: the access policy of one bot section, decided before anything runs.

The rules (keys of `platforms.botconfig.BotConfig`):
- `allow_from` is the allowlist. When it is not empty nobody else may talk to the bot (as
  before policies existed), unless an admin or a user approved by pairing.
- direct messages, `dm_policy`: `open` (anyone, within allow_from when set), `allowlist` (only
  known users: allow_from, admins, paired), `pairing` (known users; an unknown user gets a
  one-time code, see `PAIRING_NOTICE`).
- groups, `group_policy`: `open`, `allowlist` (only the groups listed under `groups`),
  `disabled`; then the sender must pass allow_from when it is set; and with `require_mention`
  (per group under `groups`, else the bot's), a message the platform marked as not addressed
  to the bot (`InboundMessage.mentioned is False`) is not for us. Platforms that deliver only
  addressed group messages leave `mentioned` unset and pass.

`decide()` is pure: the caller says whether the user is paired (the store knows) and acts on
the verdict (journal, notice, pairing code). Rate limits come after access (ratelimit.py).
"""
from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Callable

from .models import InboundMessage
from .store import PAIRING_CODE_ALPHABET, PAIRING_CODE_LENGTH

PAIRING_TTL_S = 3600.0  # a pairing code is valid for an hour
PAIRING_NOTICE = ("I don't know you yet. Your pairing code is {code} (valid for one hour): "
                  "ask the operator of this bot to run `hermes-green pairing approve {code}`.")


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str = ""  # why refused: allow_from, dm_policy, group_policy, mention, pairing
    pairing: bool = False  # refused, but an unknown user's DM under dm_policy: pairing


ALLOW = Decision(True)


@dataclass(frozen=True)
class BotAccess:
    allow_from: frozenset[str] = frozenset()
    admins: frozenset[str] = frozenset()
    dm_policy: str = "open"
    group_policy: str = "open"
    require_mention: bool = True
    groups: dict[str, bool | None] = field(default_factory=dict)  # chat id -> require_mention
    rate_messages: int = 20
    rate_per_s: float = 60.0

    @classmethod
    def from_config(cls, cfg) -> "BotAccess":
        """From a bot section (or any object with some of its keys, such as a test adapter's
        config; missing keys take the BotConfig defaults)."""
        groups = getattr(cfg, "groups", None) or {}
        rate = getattr(cfg, "rate_limit", None)
        return cls(
            allow_from=frozenset(getattr(cfg, "allow_from", None) or ()),
            admins=frozenset(getattr(cfg, "admins", None) or ()),
            dm_policy=getattr(cfg, "dm_policy", "open"),
            group_policy=getattr(cfg, "group_policy", "open"),
            require_mention=getattr(cfg, "require_mention", True),
            groups={str(k): getattr(v, "require_mention", None) for k, v in groups.items()},
            rate_messages=getattr(rate, "messages", 20),
            rate_per_s=getattr(rate, "per_s", 60.0))

    def is_admin(self, user_id: str) -> bool:
        return user_id in self.admins

    def decide(self, msg: InboundMessage, paired: Callable[[], bool]) -> Decision:
        """`paired()` is asked only when the answer matters (it reads the store)."""
        def known() -> bool:
            return msg.user_id in self.allow_from or msg.user_id in self.admins or paired()

        if msg.chat_type == "group":
            if self.group_policy == "disabled":
                return Decision(False, "group_policy")
            if self.group_policy == "allowlist" and msg.chat_id not in self.groups:
                return Decision(False, "group_policy")
            if self.allow_from and not known():
                return Decision(False, "allow_from")
            require = self.groups.get(msg.chat_id)
            if (self.require_mention if require is None else require) and \
                    getattr(msg, "mentioned", None) is False:
                return Decision(False, "mention")
            return ALLOW
        if self.dm_policy == "open":
            return ALLOW if not self.allow_from or known() else Decision(False, "allow_from")
        if known():
            return ALLOW
        if self.dm_policy == "pairing":
            return Decision(False, "pairing", pairing=True)
        return Decision(False, "dm_policy")


def new_pairing_code() -> str:
    return "".join(secrets.choice(PAIRING_CODE_ALPHABET) for _ in range(PAIRING_CODE_LENGTH))


def normalize_code(text: str) -> str:
    """What a user types back: case and separators do not matter."""
    return "".join(ch for ch in text.upper() if ch.isalnum())
