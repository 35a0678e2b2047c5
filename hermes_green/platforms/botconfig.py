"""The keys every bot section takes, whatever its platform, and the strict model base that every
platform's config model builds on.

It lives beside the platforms (not in config.py) so a platform module can declare its own config
model without importing the whole configuration, and config.py can build the `platforms:`
section from the registry without a circular import.
"""
from __future__ import annotations

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


class BotConfig(StrictModel):
    """Keys every bot takes. `id` tells several bots of one platform apart; a platform written as
    one mapping (the common case) gets its platform's name as the id."""
    enabled: bool = True
    id: str = Field("", pattern=r"^$|" + BOT_ID_PATTERN)
    allow_from: list[str] = Field(default_factory=list)
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)
