"""What the two test-only example platforms' drivers (pingchat, pollchat) share: their fakes
take a user's message with `user_sends(...)`, keep replies as dicts in `replies`, and refuse any
token but their own."""
from __future__ import annotations

from typing import Any

from hermes_green.testing.driver import PlatformDriver, ReplyRow


class ExampleDriver(PlatformDriver):
    fake: Any  # the example platform's server, set by the subclass

    def bad_credentials_config(self, **extra: Any) -> dict:
        return self.bot_config(token="not-the-token", **extra)

    def user_says(self, text: str, *, chat: int = 0, user: int | None = None,
                  group: bool = False) -> str:
        sender = f"u{chat if user is None else user}"
        return self.fake.user_sends(text, chat=f"g{chat}" if group else sender, user=sender,
                                    group=group)

    def reply_rows(self) -> list[ReplyRow]:
        return [ReplyRow(r["reply_to"], r["text"], r["at"]) for r in self.fake.replies]
