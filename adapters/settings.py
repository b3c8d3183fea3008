"""The `adapters:` sections of app.yaml, one model per platform.

Kept apart from the adapter modules so `chatops check-config` validates a
config without importing any platform SDK.
"""

from __future__ import annotations

from typing import ClassVar, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

# The error type of a key that another key's value requires (bot.config reports it where it reports missing keys).
REQUIRED_WHEN = "required_when"


def _in_clear(key: str, url: str | None) -> list[tuple[str, str]]:
    """A warning for an http:// URL to another machine: what goes there (tokens, the bot's secret, signing keys that
    say who may act as anyone) crosses the network readable and changeable."""
    parts = urlsplit(url or "")
    if parts.scheme != "http" or (parts.hostname or "") in ("localhost", "::1") or \
            (parts.hostname or "").startswith("127."):
        return []
    return [(key, f"{url!r} is plain http to another machine: the tokens and keys that go there can be read and "
                  "changed on the way; use https://")]


class _Settings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    built: ClassVar[bool] = True  # this version has an adapter that uses these settings

    def doubts(self) -> list[tuple[str, str]]:
        """What check-config and serve warn of (key, problem): likely wrong, but taken by earlier versions."""
        return []


class SlackSettings(_Settings):
    bot_token: str = Field(pattern=r"^xox[bpa]-\S+$")
    signing_secret: str = Field(min_length=8)
    api_url: str = Field("https://slack.com/api/", pattern=r"^https?://")

    def doubts(self) -> list[tuple[str, str]]:
        found = _in_clear("api_url", self.api_url)
        if self.bot_token.startswith("xoxb-"):
            return found
        # A user (xoxp-) or app (xoxa-) token was taken before, and configs hold them: it posts as its user, if at all.
        return [("bot_token", "(a secret, not shown) is not a bot token (expected a Slack bot token, which starts "
                              "with xoxb-: the Bot User OAuth Token on the app's OAuth & Permissions page)"), *found]


class TelegramSettings(_Settings):
    bot_token: str = Field(pattern=r"^\d+:\S+$")
    mode: Literal["webhook", "polling"] = "webhook"  # (before webhook_secret: its check reads it)
    # What Telegram sends with every update it posts to the webhook. A bot that polls takes no update over HTTP, so it
    # may go without (left out, or empty: `${TELEGRAM_WEBHOOK_SECRET:-}`); its webhook path then refuses everything.
    webhook_secret: str | None = Field(None, min_length=8, pattern=r"^[A-Za-z0-9_-]{1,256}$", validate_default=True)
    api_url: str = Field("https://api.telegram.org/bot", pattern=r"^https?://")

    def doubts(self) -> list[tuple[str, str]]:
        return _in_clear("api_url", self.api_url)

    @field_validator("webhook_secret", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @field_validator("webhook_secret")
    @classmethod
    def _secret_for_webhook(cls, value: str | None, info: ValidationInfo) -> str | None:
        # A missing key of its kind (REQUIRED_WHEN): check-config names it, at its own key, also while the section
        # is off (its token unset), as it names any missing key.
        if value is None and info.data.get("mode", "webhook") == "webhook":
            raise PydanticCustomError(REQUIRED_WHEN, "required with mode: webhook (Telegram sends it with every "
                                                     "update, and an update without it is refused); only mode: "
                                                     "polling goes without")
        return value


class TeamsSettings(_Settings):
    app_id: str = ""
    app_password: str = ""
    tenant_id: str | None = None  # a single-tenant app's tenant; the bot then gets its tokens from that tenant
    allow_unauthenticated: bool = False
    # Where the bot posts what no one's message started (incident cards, pages): Teams' global Bot Connector. An
    # answer goes to the serviceUrl of the activity it answers.
    service_url: str = Field("https://smba.trafficmanager.net/teams/", pattern=r"^https?://")
    # Bot Framework's endpoints, for a sovereign cloud (or a test's fake): all four together, or none (the public
    # cloud's). Inbound: the OpenID metadata whose keys sign the channel's tokens, and their issuer; outbound: where
    # the bot gets its token, and the scope it asks for.
    openid_metadata_url: str | None = Field(None, pattern=r"^https?://")
    token_issuer: str | None = None
    login_url: str | None = Field(None, pattern=r"^https?://")
    oauth_scope: str | None = None

    @field_validator("app_password")
    @classmethod
    def _password_for_app(cls, value: str, info: ValidationInfo) -> str:
        # (at its own key, as a missing one: check-config names the variable it came from, if it did)
        if info.data.get("app_id") and not value:
            raise PydanticCustomError(REQUIRED_WHEN, "required when app_id is set")
        return value

    @model_validator(mode="after")
    def _auth_is_on(self) -> "TeamsSettings":
        if not self.app_id and not self.allow_unauthenticated:
            raise ValueError(
                "app_id is empty, which turns off Bot Framework authentication; "
                "set app_id and app_password, or allow_unauthenticated: true for the local emulator only"
            )
        if self.app_id and not self.app_password:  # (left out: the field's own check does not run for a default)
            raise ValueError("app_password is required when app_id is set")
        given = [key for key in self.ENDPOINT_KEYS if getattr(self, key) is not None]
        if given and not self.app_id:  # botbuilder's emulator mode crashes on any of them
            raise ValueError(f"{', '.join(given)} need app_id: without it there is no authentication to point "
                             "elsewhere")
        if given and len(given) < len(self.ENDPOINT_KEYS):
            missing = [key for key in self.ENDPOINT_KEYS if key not in given]
            raise ValueError(f"{', '.join(given)} without {', '.join(missing)}: Bot Framework's endpoints are set "
                             "all together (a sovereign cloud's), or none (the public cloud's)")
        return self

    ENDPOINT_KEYS: ClassVar[tuple[str, ...]] = ("openid_metadata_url", "token_issuer", "login_url", "oauth_scope")

    @property
    def unauthenticated(self) -> bool:
        """No Bot Framework token is checked: an activity is taken from anyone (the local emulator's mode). With an
        app_id, allow_unauthenticated changes nothing: botbuilder checks the token all the same."""
        return not self.app_id

    def doubts(self) -> list[tuple[str, str]]:
        found = [doubt for key in ("service_url", "openid_metadata_url", "login_url")
                 for doubt in _in_clear(key, getattr(self, key))]
        if self.unauthenticated:  # (only with allow_unauthenticated: the model refuses an empty app_id otherwise)
            found.append(("allow_unauthenticated", "true and no app_id: anyone who can reach /api/messages can act "
                                                   "as any person: only for the Bot Framework Emulator on your own "
                                                   "machine"))
        if not self.tenant_id:  # (a multi-tenant app: taken, and it pages once someone wrote to it)
            found.append(("tenant_id", "not set: a multi-tenant bot learns its tenant from the first message a "
                                       "person in people: sends it, so after a restart pages on Teams wait for one "
                                       "(Teams opens a private chat only in a tenant it is told); set it to your "
                                       "tenant's id"))
        return found


ENDPOINTS = {"slack": "/slack/events", "telegram": "/telegram/webhook", "teams": "/api/messages"}  # the HTTP contract (README)

SETTINGS_MODELS: dict[str, type[BaseModel]] = {
    "slack": SlackSettings,
    "telegram": TelegramSettings,
    "teams": TeamsSettings,
}
