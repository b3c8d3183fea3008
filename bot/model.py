"""The neutral model every platform adapter speaks."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Actor:
    """Who did something: a person on a platform, an alert source, or the bot itself.

    `platform` is a chat platform (`slack`, `telegram`, `teams`), `source` for an
    alerting system (user_id is the source id), `cli` for an operator at the
    command line, or `system` for the bot's own work.
    """

    platform: str
    user_id: str
    display_name: str = ""
    person_id: str | None = None

    @classmethod
    def system(cls) -> "Actor":
        return cls("system", "chatops", "chatops")

    @classmethod
    def source(cls, source_id: str) -> "Actor":
        return cls("source", source_id, source_id)
