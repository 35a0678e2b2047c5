"""The keys every bot section takes, whatever its platform, and the strict model base that every
platform's config model builds on.

It lives beside the platforms (not in config.py) so a platform module can declare its own config
model without importing the whole configuration, and config.py can build the `platforms:`
section from the registry without a circular import.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

# A bot id names the bot in keys, metric labels, log lines and file names: keep it path-safe.
BOT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"


class StrictModel(BaseModel):
    """Unknown keys are errors (a typo must not silently disable a setting); values are frozen."""
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class BackoffConfig(StrictModel):
    """Reconnect timing: exponential backoff with full jitter, reset after a healthy period."""
    initial_s: float = Field(1.0, gt=0)
    max_s: float = Field(60.0, gt=0)
    factor: float = Field(2.0, ge=1)
    healthy_after_s: float = Field(60.0, gt=0)


class RateLimitConfig(StrictModel):
    """A token bucket per user of this bot: `messages` may arrive in any `per_s` window (a burst
    of `messages` at once, then one every per_s/messages seconds). 0 messages: no limit."""
    messages: int = Field(20, ge=0, le=100_000)
    per_s: float = Field(60.0, gt=0, le=86_400)


class GroupConfig(StrictModel):
    """Settings for one group chat, by its chat id. Listing a group admits it under
    `group_policy: allowlist`."""
    require_mention: Optional[bool] = None  # None: the bot's `require_mention`


class BotConfig(StrictModel):
    """Keys every bot takes. `id` tells several bots of one platform apart; a platform written as
    one mapping (the common case) gets its platform's name as the id.

    Who may talk (enforced by the gateway's access layer, hermes_green/access.py):
    `allow_from` lists user ids; when it is not empty nobody else may talk to the bot (it is the
    allowlist that `dm_policy: allowlist` and `pairing` read). `dm_policy`: open (anyone, within
    allow_from when set) | allowlist (allow_from, admins and paired users) | pairing (the same,
    and an unknown user gets a one-time code an operator approves with `hermes-green pairing`).
    `group_policy`: open | allowlist (only the groups listed under `groups`) | disabled.
    `require_mention`: in groups, answer only messages addressed to the bot (where the platform
    says; most platforms deliver only those). `admins` may always talk and see the whole gateway
    in `/status`. `rate_limit`: per user, refused messages get one notice."""
    enabled: bool = True
    id: str = Field("", pattern=r"^$|" + BOT_ID_PATTERN)
    allow_from: list[str] = Field(default_factory=list)
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)
    dm_policy: Literal["open", "allowlist", "pairing"] = "open"
    group_policy: Literal["open", "allowlist", "disabled"] = "open"
    require_mention: bool = True
    groups: dict[str, GroupConfig] = Field(default_factory=dict)
    admins: list[str] = Field(default_factory=list)
    rate_limit: RateLimitConfig = Field(default_factory=RateLimitConfig)
