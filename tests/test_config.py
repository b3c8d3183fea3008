"""app.yaml validation: every broken config gets its exact `path: problem`."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from adapters import SETTINGS_MODELS
from bot.cli import main
from bot.config import EXPECTED_PATTERNS, Config, ConfigError, load_config, parse_config
from bot.durations import format_duration, parse_duration
from tests.conftest import ROOT

BASE = """
people:
  - {id: alice, name: Alice, roles: [responder], slack: U01ALICE, telegram: 111111}
  - {id: bob, name: Bob, slack: U02BOB}
channels:
  - {id: ops-slack, platform: slack, chat: C0OPS}
  - {id: ops-telegram, platform: telegram, chat: "-100123"}
sources:
  - {id: am, kind: alertmanager, auth: {bearer: secret-token}}
rotations:
  - {id: primary, members: [alice, bob], shift: 1w, handoff: "mon 09:00", start: 2026-11-02, timezone: Europe/Berlin}
escalation_policies:
  - {id: dba, steps: [{notify: {rotation: primary}, wait: 5m}]}
runbooks:
  - {id: restart-nginx, title: Restart nginx, steps: [{run: [systemctl, restart, nginx]}]}
"""
ROUTES = """
routes:
  - {match: {team: dba}, channels: [ops-slack], escalation: dba}
  - {match: {}, channels: [ops-slack]}
"""


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(textwrap.dedent(text), adapter_models=SETTINGS_MODELS, env=env or {})
    return [f"{p}: {m}" if p else m for p, m in info.value.problems]


BROKEN = [
    (
        BASE + "routes:\n  - {match: {team: dba}, channels: [ops-slak]}\n  - {match: {}, channels: [ops-slack]}\n",
        "routes[0].channels[0]: unknown channel 'ops-slak' (known: ops-slack, ops-telegram)",
    ),
    (
        BASE + "routes:\n  - {match: {}, channels: [ops-slack], escalation: nope}\n",
        "routes[0].escalation: unknown escalation policy 'nope' (known: dba)",
    ),
    (
        BASE + "routes:\n  - {match: {}, channels: [ops-slack], runbooks: [restart-apache]}\n",
        "routes[0].runbooks[0]: unknown runbook 'restart-apache' (known: restart-nginx)",
    ),
    (
        BASE + "routes:\n  - {match: {team: dba}, channels: [ops-slack]}\n",
        "routes: the last route must be a catch-all with `match: {}` so no alert goes unrouted",
    ),
    (
        BASE.replace("members: [alice, bob]", "members: [alice, dave]") + ROUTES,
        "rotations[0].members[1]: unknown person 'dave' (known: alice, bob)",
    ),
    (
        BASE.replace("shift: 1w", "shift: 1 week") + ROUTES,
        "rotations[0].shift: invalid duration '1 week' (expected e.g. 90s, 5m, 1h30m, 1d, 1w)",
    ),
    (
        BASE.replace('handoff: "mon 09:00"', 'handoff: "mon 9h"') + ROUTES,
        "rotations[0].handoff: invalid time of day '9h' (expected HH:MM, e.g. 09:00)",
    ),
    (
        BASE.replace('handoff: "mon 09:00"', 'handoff: "someday 09:00"') + ROUTES,
        "rotations[0].handoff: invalid weekday 'someday' (expected one of: mon, tue, wed, thu, fri, sat, sun)",
    ),
    (
        BASE.replace("timezone: Europe/Berlin", "timezone: Europe/Berlni") + ROUTES,
        "rotations[0].timezone: unknown time zone 'Europe/Berlni' (expected an IANA name such as Europe/Berlin)",
    ),
    (
        BASE.replace("slack: U02BOB", "slack: bob") + ROUTES,
        "people[1].slack: malformed value 'bob' (expected a Slack member id: U or W, then capital letters and digits, "
        "such as U0123ABCD)",
    ),
    (
        BASE.replace('chat: "-100123"', "chat: general") + ROUTES,
        "channels[1].chat: malformed telegram chat 'general' (expected a Telegram chat id such as -1001234567890 or @channelname)",
    ),
    (
        BASE.replace("{id: bob, name: Bob", "{id: alice, name: Bob") + ROUTES,
        "people[1].id: duplicate id 'alice'",
    ),
    (
        BASE.replace("slack: U02BOB", "slack: U01ALICE") + ROUTES,
        "people[1].slack: slack id 'U01ALICE' is already 'alice''s; each chat account belongs to one person",
    ),
    (
        BASE.replace("auth: {bearer: secret-token}", "auth: {bearer: ${AM_TOKEN}}").replace("{id: am,", "{id: am, rate_limit: {per_minute: ${RATE}, burst: 5},") + ROUTES,
        "sources[0].rate_limit.per_minute: environment variable RATE is not set (set it, or write ${RATE:-default})",
    ),
    (
        BASE.replace("kind: alertmanager", "kind: nagios") + ROUTES,
        "sources[0].kind: 'nagios' is not allowed: input should be 'alertmanager', 'grafana' or 'generic'",
    ),
    (
        BASE.replace("{notify: {rotation: primary}, wait: 5m}", "{notify: {rotation: secondary}, wait: 5m}") + ROUTES,
        "escalation_policies[0].steps[0].notify.rotation: unknown rotation 'secondary' (known: primary)",
    ),
    (
        BASE.replace("{notify: {rotation: primary}, wait: 5m}", "{notify: {people: [zed]}, wait: 5m}") + ROUTES,
        "escalation_policies[0].steps[0].notify.people[0]: unknown person 'zed' (known: alice, bob)",
    ),
    (
        BASE + ROUTES + "server: {prot: 8080}\n",
        "server.prot: unknown key (did you mean `port`?)",
    ),
    (
        BASE + ROUTES + "server: {port: 99999}\n",
        "server.port: input should be less than or equal to 65535",
    ),
    (
        BASE + ROUTES + "storage: {url: 'mysql://localhost/db'}\n",
        "storage.url: unsupported database URL 'mysql://...' (expected sqlite+aiosqlite:///path.db or postgresql+asyncpg://user@host/db)",
    ),
    *((
        BASE + ROUTES + f"storage: {{url: '{url}'}}\n",
        "storage.url: an in-memory SQLite database keeps nothing (an accepted alert would be lost at the next "
        "restart): give a file, e.g. sqlite+aiosqlite:///./chatops.db",
    ) for url in ("sqlite+aiosqlite://", "sqlite+aiosqlite:///:memory:", "sqlite+aiosqlite:///",
                  "sqlite+aiosqlite:///file:x?mode=memory&uri=true")),
    (
        BASE + ROUTES + "adapters: {slack: {bot_token: xoxb-1, signing_secret: short}}\n",
        "adapters.slack.signing_secret: string should have at least 8 characters",
    ),
    (
        BASE + ROUTES + "adapters: {teams: {app_id: ''}}\n",
        "adapters.teams: app_id is empty, which turns off Bot Framework authentication; set app_id and app_password, or allow_unauthenticated: true for the local emulator only",
    ),
    (
        BASE + ROUTES + "adapters: {discord: {token: x}}\n",
        "adapters.discord: unknown adapter (known: slack, teams, telegram)",
    ),
    (
        BASE + "routes:\n  - {match: {instance: '=~db[0-9'}, channels: [ops-slack]}\n  - {match: {}, channels: [ops-slack]}\n",
        "routes[0].match.instance: invalid regular expression 'db[0-9': unterminated character set at position 2",
    ),
    (
        BASE.replace("auth: {bearer: secret-token}", "auth: {bearer: short}") + ROUTES,
        "sources[0].auth.bearer: string should have at least 8 characters",
    ),
    (
        BASE.replace("auth: {bearer: secret-token}", "auth: {}") + ROUTES,
        "sources[0].auth: expected `none`, `{bearer: TOKEN}` or `{hmac_secret: SECRET, ...}`",
    ),
    ("people: [\n", "app.yaml: line 2, column 1: invalid YAML: expected the node content, but found '<stream end>'"),
    ("server:\n\tport: 80\n", "app.yaml: line 2, column 1: invalid YAML: found character '\\t' that cannot start any "
                               "token (indent with spaces: YAML takes no tabs there)"),
    # What PyYAML's constructors raise besides YAMLError: a date that is no date, a tagged number that is none, a
    # list as a key. Each was a traceback, then a message without its line.
    (BASE + ROUTES.replace("routes:", "start: 2026-13-02\nroutes:"),
     "app.yaml: line 17, column 8: invalid YAML: month must be in 1..12 (quote the value if it is meant as text)"),
    (BASE + ROUTES + 'x: !!int "abc"\n',
     "app.yaml: line 20, column 4: invalid YAML: invalid literal for int() with base 10: 'abc' (quote the value if it is meant as text)"),
    (BASE + ROUTES + "? [a, b]\n: 1\n", "app.yaml: line 20, column 3: invalid YAML: a key that is a list or a mapping (unhashable type: 'list')"),
    # YAML 1.1 reads an unquoted 1:30 as 90 (base 60): it was taken as 90 seconds without a word. It is text now,
    # and a duration must say its units.
    (BASE + ROUTES + "grouping: {window: 1:30}\n",
     "grouping.window: invalid duration '1:30': write it with units (1:30 could be 1h30m or 1m30s), not as a clock time"),
    (BASE.replace("shift: 1w", "shift: 168:00") + ROUTES,
     "rotations[0].shift: invalid duration '168:00': write it with units (1:30 could be 1h30m or 1m30s), not as a clock "
     "time"),
    (BASE.replace("wait: 5m}]}", "wait: 99999999999:00}]}") + ROUTES,  # was an OverflowError's traceback
     "escalation_policies[0].steps[0].wait: invalid duration '99999999999:00': write it with units (1:30 could be "
     "1h30m or 1m30s), not as a clock time"),
    (BASE.replace("start: 2026-11-02", "start: 9999-12-01") + ROUTES,  # every /oncall failed on it
     "rotations[0].start: start 9999-12-01 is out of range: give the date the rotation starts, between 1970 and 2199"),
    (BASE.replace("wait: 5m}]}", "wait: 0s}], repeat: 20}") + ROUTES,  # 21 pages in one instant
     "escalation_policies[0]: with repeat: 20, the steps' waits add up to 0s, so the repeats would page at once; make "
     "them add up to at least 1m"),
    (BASE + ROUTES + "business_hours: {start: 9:00, end: 25:00}\n",
     "business_hours.end: invalid time of day '25:00' (expected HH:MM, e.g. 09:00)"),
    (BASE + ROUTES.replace("{team: dba}", "{pci: true}"),  # was taken as "True", which no label holds
     'routes[0].match: pci: YAML reads this value as a boolean (true), and labels are text: write it in quotes as '
     'the label has it: pci: "true"'),
    (BASE + ROUTES + "server:\n", "server: empty: give it keys, or remove it"),
    (BASE + ROUTES + "server: 5\n", "server: expected a mapping of keys, got 5"),
    # An empty header name refused every request ("missing  header"); an empty timestamp header quietly turned
    # off the timestamp window and replay protection.
    (BASE.replace("auth: {bearer: secret-token}", "auth: {hmac_secret: s3cret-123, header: ''}") + ROUTES,
     "sources[0].auth.header: '' is not an HTTP header name (such as X-Signature)"),
    (BASE.replace("auth: {bearer: secret-token}", "auth: {hmac_secret: s3cret-123, timestamp_header: ''}") + ROUTES,
     "sources[0].auth.timestamp_header: '' is not an HTTP header name (such as X-Timestamp); set it to null for a "
     "signature over the body alone, with no timestamp"),
    (BASE.replace("auth: {bearer: secret-token}", "auth: {hmac_secret: s3cret-123, max_skew: 2d}") + ROUTES,
     "sources[0].auth.max_skew: must be between 1s and 12h (a signed request stays valid, and is remembered against "
     "replays, this long before and after its timestamp)"),
    # One header for both refused every request, its signature read as its time
    (BASE.replace("auth: {bearer: secret-token}", "auth: {hmac_secret: s3cret-123, header: X-Sig, "
                  "timestamp_header: x-sig}") + ROUTES,
     "sources[0].auth.timestamp_header: 'x-sig' is the signature's header too: the signature and its timestamp come "
     "in two headers (such as X-Signature and X-Timestamp)"),
    # A misspelt key under auth, a label mapping written as a string, a word for a boolean: they were said without
    # the key or the value ("expected `none`, ...", "input should be a valid dictionary", "unable to interpret input")
    (BASE.replace("auth: {bearer: secret-token}", "auth: {hmac_secert: s3cret-123}") + ROUTES,
     "sources[0].auth: unknown key `hmac_secert` (did you mean `hmac_secret`?): expected `{bearer: TOKEN}` or "
     "`{hmac_secret: SECRET, ...}`"),
    (BASE + ROUTES.replace("{match: {team: dba}", '{match: "team=dba"'),
     "routes[0].match: expected a mapping of labels to values, such as `{team: db}`, got 'team=dba'"),
    (BASE + ROUTES.replace("escalation: dba}", "escalation: dba, continue: maybe}"),
     "routes[0].continue: expected true or false, got 'maybe'"),
]


@pytest.mark.parametrize(("text", "expected"), BROKEN, ids=[e.split(":")[0] for _, e in BROKEN])
def test_broken_config_names_path_and_problem(text: str, expected: str) -> None:
    assert expected in problems(text)


def test_every_problem_is_reported_not_just_the_first() -> None:
    text = BASE.replace("members: [alice, bob]", "members: [zed]") + (
        "routes:\n  - {match: {}, channels: [nowhere], escalation: none-such}\n"
    )
    assert problems(text) == [
        "routes[0].channels[0]: unknown channel 'nowhere' (known: ops-slack, ops-telegram)",
        "routes[0].escalation: unknown escalation policy 'none-such' (known: dba)",
        "rotations[0].members[0]: unknown person 'zed' (known: alice, bob)",
    ]


def test_a_misshapen_section_does_not_hide_what_the_others_say_of_themselves() -> None:
    """A silence whose window ends before it starts hid a route's broken regular expression, the catch-all route
    missing and a malformed chat id until it was fixed: check-config named one stage of problems per run."""
    text = BASE.replace("chat: C0OPS", "chat: C1") + (
        "routes:\n  - {match: {team: '=~(x'}, channels: [ops-slack]}\n"
        "silences:\n  - {matchers: {a: b}, starts: '2026-01-02T00:00:00Z', ends: '2025-01-01T00:00:00Z'}\n")
    assert problems(text) == [
        "silences[0]: ends must be after starts",
        "channels[0].chat: malformed slack chat 'C1' (expected a Slack channel id such as C0123ABCD)",
        "routes[0].match.team: invalid regular expression '(x': missing ), unterminated subpattern at position 0",
        "routes: the last route must be a catch-all with `match: {}` so no alert goes unrouted",
    ]
    # A reference into a misshapen section is not judged: the channel may well be there once it is fixed.
    text = BASE.replace("platform: slack, chat: C0OPS", "platform: slak, chat: C0OPS") + ROUTES
    assert problems(text) == [
        "channels[0].platform: 'slak' is not allowed: input should be 'slack', 'telegram' or 'teams'"]


def test_an_unset_variable_does_not_hide_the_other_problems() -> None:
    text = BASE + ROUTES.replace("channels: [ops-slack]", "channels: [nope]", 1) + (
        'server: {host: "${NOPE_UNSET}", "${KEY_UNSET}": 1}\ngrouping: {window: 15x}\n')
    assert problems(text) == [
        "server.host: environment variable NOPE_UNSET is not set (set it, or write ${NOPE_UNSET:-default})",
        "server: environment variable KEY_UNSET is not set (set it, or write ${KEY_UNSET:-default})",
        "grouping.window: invalid duration '15x' (expected e.g. 90s, 5m, 1h30m, 1d, 1w)",
    ]
    text = BASE + ROUTES.replace("channels: [ops-slack]", "channels: [nope]", 1) + 'server: {host: "${NOPE_UNSET}"}\n'
    assert problems(text) == [  # with the rest of the shapes right, the references are checked too
        "server.host: environment variable NOPE_UNSET is not set (set it, or write ${NOPE_UNSET:-default})",
        "routes[0].channels[0]: unknown channel 'nope' (known: ops-slack, ops-telegram)",
    ]
    text = BASE.replace("chat: C0OPS", 'chat: "${OPS_CHAT}"') + ROUTES.replace("channels: [ops-slack]}", 'channels: ["${CH}"]}')
    assert problems(text) == [  # what a variable stands in for is not judged, a reference included
        "channels[0].chat: environment variable OPS_CHAT is not set (set it, or write ${OPS_CHAT:-default})",
        "routes[1].channels[0]: environment variable CH is not set (set it, or write ${CH:-default})",
    ]


def test_env_substitution_with_defaults_and_flow_style() -> None:
    text = BASE.replace("auth: {bearer: secret-token}", "auth: {bearer: ${AM_TOKEN}}") + ROUTES + (
        "server: {port: ${PORT:-9090}, public_url: 'https://${HOST}/x'}\naudit: {hmac_key: '$${literal}-0123456789'}\n"
    )
    loaded = parse_config(text, adapter_models=SETTINGS_MODELS, env={"AM_TOKEN": "tok-12345678", "HOST": "bot.example"})
    assert loaded.config.server.port == 9090
    assert loaded.config.server.public_url == "https://bot.example/x"
    assert loaded.config.sources[0].auth.bearer == "tok-12345678"
    assert loaded.config.audit.hmac_key == "${literal}-0123456789"


@pytest.mark.parametrize(("server", "env", "public_url"), [
    ("", {}, "http://127.0.0.1:8080"),
    ("server: {port: 9000}", {}, "http://127.0.0.1:9000"),
    ("server: {host: 0.0.0.0, port: 9000}", {}, "http://127.0.0.1:9000"),
    ("server: {host: '::', port: 9000}", {}, "http://127.0.0.1:9000"),
    ("server: {host: '::1', port: 9000}", {}, "http://[::1]:9000"),
    ("server: {host: bot.internal, port: 9000}", {}, "http://bot.internal:9000"),
    ("server: {port: 9000, public_url: 'https://chatops.example.com'}", {}, "https://chatops.example.com"),
    ("server: {port: 9000, public_url: 'http://127.0.0.1:8080'}", {}, "http://127.0.0.1:8080"),  # as written
    ("server: {port: '${PORT}', public_url: '${PUBLIC_URL:-}'}", {"PORT": "9000"}, "http://127.0.0.1:9000"),
    ("server: {port: '${PORT}', public_url: '${PUBLIC_URL:-}'}", {"PORT": "9000", "PUBLIC_URL": "https://bot.example"},
     "https://bot.example"),
])
def test_public_url_left_out_is_where_the_bot_listens(server: str, env: dict[str, str], public_url: str) -> None:
    """slack-manifest, telegram set-webhook and the start-up line use it: a bot on port 9000 is not at :8080."""
    loaded = parse_config(BASE + ROUTES + server, adapter_models=SETTINGS_MODELS, env=env)
    assert loaded.config.server.public_url == public_url


def test_the_example_config_announces_the_port_it_listens_on() -> None:
    loaded = load_config(ROOT / "app.yaml", adapter_models=SETTINGS_MODELS, env={"CHATOPS_PORT": "9000"})
    assert loaded.config.server.public_url == "http://127.0.0.1:9000"
    loaded = load_config(ROOT / "app.yaml", adapter_models=SETTINGS_MODELS,
                         env={"CHATOPS_PORT": "9000", "CHATOPS_PUBLIC_URL": "https://chatops.example.com"})
    assert loaded.config.server.public_url == "https://chatops.example.com"


def test_unset_secrets_switch_features_off_with_the_variable_named() -> None:
    loaded = load_config(ROOT / "app.yaml", adapter_models=SETTINGS_MODELS, env={})
    assert loaded.adapters == {}
    assert loaded.adapters_off == {
        "slack": "SLACK_BOT_TOKEN is not set",
        "telegram": "TELEGRAM_BOT_TOKEN is not set",
        "teams": "TEAMS_APP_ID is not set",
    }
    assert loaded.sources_off["alertmanager"] == "AM_TOKEN is not set"
    assert loaded.config.audit.hmac_key is None
    assert ("channels[0] (ops-slack): slack is off (SLACK_BOT_TOKEN is not set), so incidents routed there wait "
            "in the outbox until it is on") in loaded.warnings
    env = {"SLACK_BOT_TOKEN": "xoxb-123", "SLACK_SIGNING_SECRET": "abcdefgh12345678", "AM_TOKEN": "am-token-123"}
    loaded = load_config(ROOT / "app.yaml", adapter_models=SETTINGS_MODELS, env=env)
    assert loaded.adapters["slack"].bot_token == "xoxb-123"
    assert "alertmanager" not in loaded.sources_off
    assert not any(w.startswith("channels[0]") for w in loaded.warnings)  # Slack is on


def test_a_section_that_is_off_is_still_checked_for_misspelt_keys_and_values_not_allowed() -> None:
    text = (ROOT / "app.yaml").read_text(encoding="utf-8")
    text = text.replace("    bot_token: ${SLACK_BOT_TOKEN}", "    bot_token: ${SLACK_BOT_TOKEN}\n    signing_secrett: x")
    text = text.replace("    api_url: ${TELEGRAM_API_URL", "    mode: push\n    api_url: ${TELEGRAM_API_URL")
    text = text.replace('auth: {bearer: "${AM_TOKEN}"}', 'auth: {bearer: "${AM_TOKEN}", headr: X-Token}')
    text = text.replace('auth: {hmac_secret: "${GENERIC_SECRET}"}', 'auth: {hmac_secrt: "${GENERIC_SECRET}"}')
    text = text.replace("    tenant_id: ${TEAMS_TENANT_ID:-}", "    tenant_id: ${TEAMS_TENANT_ID:-}\n    app_tokn: ${TEAMS_TOKEN}")
    text = text.replace("\nadapters:", "\nadapters:\n  slak: {bot_token: ${SLACK_BOT_TOKEN}}\n  #", 1)
    with pytest.raises(ConfigError) as info:
        parse_config(text, adapter_models=SETTINGS_MODELS, env={})  # every secret unset: all of them are off
    assert sorted(f"{p}: {m}" for p, m in info.value.problems) == [
        "adapters.slack.signing_secrett: unknown key (allowed here: bot_token, signing_secret, api_url)",
        "adapters.slak: unknown adapter (known: slack, teams, telegram)",
        "adapters.teams.app_tokn: unknown key (allowed here: app_id, app_password, tenant_id, allow_unauthenticated, "
        "service_url, openid_metadata_url, token_issuer, login_url, oauth_scope)",
        "adapters.telegram.mode: 'push' is not allowed: input should be 'webhook' or 'polling'",
        "sources[0].auth.headr: unknown key (allowed here: bearer)",
        "sources[2].auth: unknown key `hmac_secrt` (did you mean `hmac_secret`?): expected `{bearer: TOKEN}` or "
        "`{hmac_secret: SECRET, ...}`",
    ]


def test_a_route_to_a_platform_this_version_cannot_post_to_is_a_warning() -> None:
    text = BASE.replace("channels:\n", "channels:\n  - {id: ops-teams, platform: teams, chat: '19:abc@thread.tacv2'}\n")
    text += "routes:\n  - {match: {}, channels: [ops-teams]}\n"
    text += "adapters:\n  teams: {app_id: 00000000-0000-0000-0000-000000000001, app_password: secret}\n"
    unbuilt = type("UnbuiltTeams", (SETTINGS_MODELS["teams"],), {"built": False})  # (every platform is built now)
    loaded = parse_config(text, adapter_models={**SETTINGS_MODELS, "teams": unbuilt}, env={})
    assert ("channels[0] (ops-teams): teams is configured, but this version has no adapter for it, so incidents "
            "routed there wait in the outbox until it is on") in loaded.warnings


def test_a_rotation_channel_on_a_platform_that_is_off_is_a_warning() -> None:
    """Handoff notices to a Telegram channel with Telegram off piled up in the outbox without a word."""
    text = BASE.replace('timezone: Europe/Berlin}', 'timezone: Europe/Berlin, channel: ops-telegram}') + ROUTES
    loaded = parse_config(text, adapter_models=SETTINGS_MODELS, env={})
    assert ("channels[1] (ops-telegram): telegram is off (no section under adapters), so handoff notices of rotation "
            "primary wait in the outbox until it is on") in loaded.warnings
    text = BASE.replace("{notify: {rotation: primary}", "{notify: {rotation: primary, channel: ops-telegram}") + ROUTES
    loaded = parse_config(text, adapter_models=SETTINGS_MODELS, env={})
    assert ("channels[1] (ops-telegram): telegram is off (no section under adapters), so the escalation notices of "
            "policy dba wait in the outbox until it is on") in loaded.warnings


def test_clock_times_written_without_quotes_are_read_as_written() -> None:
    """YAML 1.1 reads 18:00 as the number 1080; the config reads it as the time it says."""
    text = BASE.replace('handoff: "mon 09:00"', "handoff: 18:00") + ROUTES + "business_hours: {start: 9:00, end: 18:00}\n"
    config = parse_config(text, adapter_models=SETTINGS_MODELS, env={}).config
    assert config.rotations[0].handoff == "18:00"
    assert (str(config.business_hours.start), str(config.business_hours.end)) == ("09:00:00", "18:00:00")


def test_a_secret_whose_variable_and_default_are_empty_switches_its_section_off() -> None:
    """`${AM_TOKEN:-}` unset was an error ("bearer: string should have at least 8 characters", the variable unnamed)
    and the bot would not start; `${AM_TOKEN}` switched the source off, as the README says of both."""
    text = (BASE.replace("bearer: secret-token", "bearer: '${AM_TOKEN:-}'") + ROUTES
            + "adapters:\n  slack: {bot_token: '${SLACK_BOT_TOKEN:-}', signing_secret: '${SLACK_SIGNING_SECRET:-}'}\n")
    loaded = parse_config(text, adapter_models=SETTINGS_MODELS, env={"SLACK_BOT_TOKEN": ""})
    assert loaded.sources_off["am"] == "AM_TOKEN is not set"
    assert loaded.adapters_off["slack"] == "SLACK_BOT_TOKEN is empty"
    env = {"AM_TOKEN": "am-token-123", "SLACK_BOT_TOKEN": "xoxb-123", "SLACK_SIGNING_SECRET": "abcdefgh12345678"}
    loaded = parse_config(text, adapter_models=SETTINGS_MODELS, env=env)
    assert "am" not in loaded.sources_off and loaded.adapters["slack"].bot_token == "xoxb-123"
    # A secret that may be empty stays empty: the Teams emulator's (and polling Telegram's webhook_secret)
    emulator = BASE + ROUTES + ("adapters:\n  teams: {app_id: '', allow_unauthenticated: true, "
                                "app_password: '${TEAMS_APP_PASSWORD:-}'}\n")
    assert "teams" in parse_config(emulator, adapter_models=SETTINGS_MODELS, env={}).adapters
    # ... and where its section needs it after all, the error names the variable (it named none)
    for section, said in (
            ("teams: {app_id: abc, app_password: '${TEAMS_APP_PASSWORD:-}'}",
             "adapters.teams.app_password: required when app_id is set (TEAMS_APP_PASSWORD is not set, or empty)"),
            ("telegram: {bot_token: '7000000001:AAFake', webhook_secret: '${TG_SECRET:-}'}",
             "adapters.telegram.webhook_secret: required with mode: webhook (TG_SECRET is not set, or empty)")):
        found = problems(BASE + ROUTES + f"adapters:\n  {section}\n")
        head, tail = said.split(" (")
        assert len(found) == 1 and found[0].startswith(head) and found[0].endswith(f"({tail}"), found


def test_silence_matchers_take_numbers_as_routes_do() -> None:
    text = BASE + ROUTES + "silences:\n  - {matchers: {code: 500}, starts: 2026-11-25T22:00:00+01:00, ends: 2026-11-26T02:00:00+01:00}\n"
    assert parse_config(text, adapter_models=SETTINGS_MODELS, env={}).config.silences[0].matchers == {"code": "500"}


def test_a_variable_set_to_nothing_counts_as_unset() -> None:
    """Compose files and Kubernetes give a missing secret as an empty string."""
    loaded = load_config(ROOT / "app.yaml", adapter_models=SETTINGS_MODELS, env={"AM_TOKEN": "", "SLACK_BOT_TOKEN": ""})
    assert loaded.sources_off["alertmanager"] == "AM_TOKEN is empty"
    assert loaded.adapters_off["slack"] == "SLACK_BOT_TOKEN is empty"
    text = BASE + ROUTES + "server: {port: ${PORT:-9090}}\n"
    assert parse_config(text, adapter_models=SETTINGS_MODELS, env={"PORT": ""}).config.server.port == 9090  # `:-`
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + ROUTES + "timezone: ${TZ_NAME}\n", adapter_models=SETTINGS_MODELS, env={"TZ_NAME": ""})
    assert [f"{p}: {m}" for p, m in info.value.problems] == [
        "timezone: environment variable TZ_NAME is empty (set it, or write ${TZ_NAME:-default})"]


def test_a_duration_too_long_for_the_calendar_is_a_config_error_not_a_crash() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE.replace("shift: 1w", "shift: 99999999999d") + ROUTES, adapter_models=SETTINGS_MODELS, env={})
    assert "rotations[0].shift: duration '99999999999d' is too long (at most 3650d)" in [
        f"{p}: {m}" for p, m in info.value.problems]
    with pytest.raises(ConfigError) as info:  # fits a timedelta, not the calendar: still refused
        parse_config(BASE.replace("shift: 1w", "shift: 9999999d") + ROUTES, adapter_models=SETTINGS_MODELS, env={})
    assert "rotations[0].shift: duration '9999999d' is too long (at most 3650d)" in [
        f"{p}: {m}" for p, m in info.value.problems]


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90), ("5m", 300), ("1h30m", 5400), ("1d", 86400), ("1w", 604800), ("2w3d", 1468800)]
)
def test_durations_round_trip(text: str, seconds: int) -> None:
    assert parse_duration(text).total_seconds() == seconds
    assert parse_duration(format_duration(parse_duration(text))) == parse_duration(text)
    assert format_duration(parse_duration("90s")) == "1m30s"


@pytest.mark.parametrize(("window", "env"), [
    ("900", {}), ('"900"', {}), ("${GROUP_WINDOW:-900}", {}), ("${GROUP_WINDOW}", {"GROUP_WINDOW": "900"}),
    ("${GROUP_WINDOW}", {"GROUP_WINDOW": " 900 "}),
])
def test_a_bare_number_counts_seconds_however_app_yaml_writes_it(tmp_path: Path, window: str, env: dict[str, str],
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """The README says a bare number counts seconds; `${VAR}`, as app.yaml passes its settings, gives text."""
    config = tmp_path / "app.yaml"
    config.write_text(f"grouping: {{window: {window}}}\n")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert main(["check-config", "-c", str(config)]) == 0, capsys.readouterr().out
    assert load_config(config, adapter_models=SETTINGS_MODELS).config.grouping.window.total_seconds() == 900


@pytest.mark.parametrize(("window", "problem"), [
    ('"1:30"', "grouping.window: invalid duration '1:30': write it with units"),  # 1h30m or 1m30s: said, not guessed
    ('"90 s"', "grouping.window: invalid duration '90 s'"),
    ('"-900"', "grouping.window: invalid duration '-900'"),
    ('"9000000000"', "grouping.window: duration '9000000000' is too long (at most 3650d)"),
])
def test_a_duration_in_app_yaml_that_is_not_a_number_of_seconds_is_still_refused(window: str, problem: str) -> None:
    assert any(p.startswith(problem) for p in problems(BASE + ROUTES + f"grouping: {{window: {window}}}\n"))


@pytest.mark.parametrize("text", ["", "5", "m", "1.5h", "5 m", "-5m", "1m1h"])
def test_bad_durations_are_rejected(text: str) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(text)


def test_check_config_cli_exit_codes(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHATOPS_CONFIG", raising=False)
    assert main(["check-config", "-c", str(ROOT / "app.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{ROOT / 'app.yaml'}: valid: 3 people, 2 channels, 3 sources, 2 routes")

    bad = tmp_path / "bad.yaml"
    bad.write_text(BASE + "routes:\n  - {match: {}, channels: [ops-slak]}\n")
    monkeypatch.setenv("CHATOPS_CONFIG", str(bad))  # -c defaults to $CHATOPS_CONFIG
    assert main(["check-config"]) == 2
    assert capsys.readouterr().out == (
        "routes[0].channels[0]: unknown channel 'ops-slak' (known: ops-slack, ops-telegram)\n"
    )
    assert main(["check-config", "-c", str(tmp_path / "missing.yaml")]) == 2
    assert "missing.yaml: file not found (named with -c); give -c the path of your app.yaml" in capsys.readouterr().out


def test_check_config_where_there_is_no_app_yaml_checks_the_example_one(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CHATOPS_CONFIG", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["check-config"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(f"{ROOT / 'app.yaml'}: valid: 3 people")
    assert f"using the example config shipped with the bot, {ROOT / 'app.yaml'}" in err
    (tmp_path / "app.yaml").write_text("routes: []\n")  # one here wins, and is judged
    assert main(["check-config"]) == 2
    assert capsys.readouterr().out.startswith("routes: the last route must be a catch-all")
    (tmp_path / "app.yaml").unlink()
    for named in (["-c", "missing.yaml"], []):  # a file named, and not there: refused, never the example instead
        if not named:
            monkeypatch.setenv("CHATOPS_CONFIG", "missing.yaml")
        assert main(["check-config", *named]) == 2
        assert "missing.yaml: file not found" in capsys.readouterr().out


def test_grafana_hmac_defaults_follow_grafana_and_explicit_values_win() -> None:
    text = textwrap.dedent(BASE).replace("sources:\n", textwrap.dedent("""\
        sources:
          - {id: g, kind: grafana, auth: {hmac_secret: s3cret-123}}
          - {id: g2, kind: grafana, auth: {hmac_secret: s3cret-123, header: X-Sig, timestamp_header: X-TS}}
          - {id: w, kind: generic, auth: {hmac_secret: s3cret-123}}
        """))
    loaded = parse_config(text, adapter_models=SETTINGS_MODELS, env={})
    sources = {s.id: s.auth for s in loaded.config.sources}
    assert (sources["g"].header, sources["g"].timestamp_header) == ("X-Grafana-Alerting-Signature", None)
    assert (sources["g2"].header, sources["g2"].timestamp_header) == ("X-Sig", "X-TS")
    assert (sources["w"].header, sources["w"].timestamp_header) == ("X-Signature", "X-Timestamp")
    # The default that signs the body alone takes copies of a request again: said, once, for that source only
    assert [w for w in loaded.warnings if "timestamp_header" in w] == [
        'sources[0].auth.timestamp_header: none, so the signature covers the body alone and a copy of a request g '
        'sent is taken again at any time (a captured "resolved" resolves a later incident of that alert): name the '
        "header the sender puts its time in (Grafana: the contact point's HMAC Timestamp Header, such as "
        "X-Grafana-Alerting-Timestamp, named here too), and copies are refused as replays"]


def test_a_missing_template_dir_is_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "app.yaml"
    config.write_text("templates: {dir: my-templates}\n")
    assert main(["check-config", "-c", str(config)]) == 2
    assert "templates.dir: no such directory: my-templates (relative paths start at the folder of" in capsys.readouterr().out
    (tmp_path / "my-templates").mkdir()
    assert main(["check-config", "-c", str(config)]) == 0


def test_a_key_written_twice_is_an_error_not_a_silent_overwrite() -> None:
    assert problems("people:\n  - {id: a, name: A}\nchannels: []\npeople:\n  - {id: b, name: B}\n") == [
        "app.yaml: line 4, column 1: invalid YAML: 'people' is written twice in one mapping "
        "(the second would silently replace the first)"]


def test_everyone_an_escalation_pages_may_acknowledge_the_page() -> None:
    """Bob (no roles) is in the rotation a policy step pages, Carol is named in a step: both may press Acknowledge on
    their page; Dave, whom nothing pages, still may not."""
    from bot.dispatch import Dispatcher
    from bot.model import Actor

    text = BASE.replace("  - {id: bob, name: Bob, slack: U02BOB}", "  - {id: bob, name: Bob, slack: U02BOB}\n"
                        "  - {id: carol, name: Carol, roles: [manager], slack: U03CAROL}\n"
                        "  - {id: dave, name: Dave, slack: U04DAVE}").replace(
        "steps: [{notify: {rotation: primary}, wait: 5m}]",
        "steps: [{notify: {rotation: primary}, wait: 5m}, {notify: {people: [carol]}, wait: 5m}]") + ROUTES
    config = parse_config(text, adapter_models=SETTINGS_MODELS, env={}).config
    assert {p.id: p.roles for p in config.people} == {"alice": ["responder"], "bob": ["responder"],
                                                      "carol": ["manager", "responder"], "dave": []}
    dispatcher = Dispatcher(config)

    async def acknowledge(*_: object) -> None:
        return None

    dispatcher.action("ack", role="responder", label="Acknowledge")(acknowledge)  # as handlers/chat.py registers it
    assert dispatcher.refusal("ack", Actor("slack", "U02BOB", "Bob", None)) is None
    refused = dispatcher.refusal("ack", Actor("slack", "U04DAVE", "Dave", None))
    assert refused is not None and "needs the `responder` role" in refused.text


def test_a_rejected_secret_is_never_shown() -> None:
    """A token read from a file keeps its newline; a bearer token written where `auth:` wants a mapping. The
    problem is named and what is wrong with its shape, never the secret itself."""
    found = problems(BASE.replace("auth: {bearer: secret-token}", 'auth: "AMBEARER-token-4242"') + ROUTES)
    found += problems(BASE + ROUTES + "adapters:\n  telegram: {bot_token: \"7000000001:AAFakeTokenSecretPart\\n\", "
                                      "webhook_secret: s3cret-s3cret}\n")
    assert not any("AMBEARER" in p or "AAFakeTokenSecretPart" in p for p in found), found
    assert any(p.startswith("adapters.telegram.bot_token: malformed value (a secret, not shown: it begins or ends "
                            "with a space or a line break; strip it)") for p in found), found
    assert any(p.startswith("sources[0].auth") and "(a secret, not shown)" in p for p in found), found


@pytest.mark.parametrize(("name", "template", "problem"), [
    ("incident.slack.json.j2", '{"text": "{{ incident.title }", "blocks": []}\n', "): line 1: unexpected '}'"),
    # a title with quotes: tojson forgotten
    ("incident.slack.json.j2", '{"text": "{{ title }}", "blocks": []}\n', "): output is not valid JSON"),
    ("incident.slack.json.j2", '{"text": {{ titel | tojson }}, "blocks": []}\n', "'titel' is undefined"),
    # JSON, but a card Slack would refuse
    ("incident.slack.json.j2", '{"text": {{ title | tojson }}}\n', '"blocks" must be a list'),
    # HTML Telegram refuses ("can't parse entities"): a tag or entity it does not take, a tag left open, too long
    ("incident.telegram.html.j2", "<div>{{ title }}</div>\n", "<div> is not a tag Telegram takes"),
    ("incident.telegram.html.j2", "<b>{{ title }}\n", "<b> is never closed"),
    ("incident.telegram.html.j2", "<b>{{ title }}</i></b>\n", "</i> closes no open <i> (<b> is open)"),
    ("incident.telegram.html.j2", "{{ title }}<br/>{{ state_label }}\n", "<br/>: Telegram takes no self-closing tags"),
    ("incident.telegram.html.j2", "{{ title }} &mdash; {{ state_label }}\n", "&mdash; is not an entity Telegram takes"),
    ("incident.telegram.html.j2", "{% for i in range(500) %}{{ title }} {% endfor %}\n",
     "Telegram takes 4096 in a message"),
])
def test_a_broken_override_template_is_named_before_any_card_is_sent(tmp_path: Path, name: str, template: str,
                                                                       problem: str,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """A template that fails (or draws what its platform refuses) passed check-config, and then every card it drew
    failed and was given up."""
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / name).write_text(template)
    config = tmp_path / "app.yaml"
    config.write_text(f"storage: {{url: 'sqlite+aiosqlite:///{tmp_path / 'bot.db'}'}}\ntemplates: {{dir: tpl}}\n")
    assert main(["check-config", "-c", str(config)]) == 2
    out = capsys.readouterr().out
    assert out.startswith(f"templates.dir: template {name} ({tmp_path / 'tpl' / name})")
    assert problem in out, out


def test_override_templates_that_work_pass_check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = tmp_path / "tpl"
    folder.mkdir()
    for template in (ROOT / "templates").glob("*.j2"):  # every built-in template, as an operator starts from them
        (folder / template.name).write_text(template.read_text(encoding="utf-8"), encoding="utf-8")
    (folder / "footer.j2").write_text("{% macro footer() %}-- the bot{% endmacro %}")  # a piece others include
    (folder / "text.generic.txt.j2").write_text('{% from "footer.j2" import footer %}{{ text }}\n{{ footer() }}')
    config = tmp_path / "app.yaml"
    config.write_text("templates: {dir: tpl}\n")
    assert main(["check-config", "-c", str(config)]) == 0, capsys.readouterr().out
    (folder / "footer.j2").write_text("{% macro footer() %}-- the bot{% endmacr %}")  # broken where it is included
    assert main(["check-config", "-c", str(config)]) == 2
    assert "templates.dir: template footer.j2 (" in capsys.readouterr().out


SLACK = "adapters:\n  slack: {bot_token: xoxb-1, signing_secret: signing-secret}\n"
TELEGRAM = "adapters:\n  telegram: {bot_token: '7000000001:AAFake', webhook_secret: s3cret-s3cret}\n"


@pytest.mark.parametrize(("text", "expected"), [
    (BASE.replace("{id: alice, name: Alice", "{id: 'my person', name: Alice") + ROUTES,
     "people[0].id: malformed value 'my person' (expected an id of letters, digits, `_`, `.` and `-` that starts with "
     "a letter or digit, such as db-primary)"),
    (BASE.replace("slack: U02BOB", "slack: X123") + ROUTES,
     "people[1].slack: malformed value 'X123' (expected a Slack member id: U or W, then capital letters and digits, "
     "such as U0123ABCD)"),
    (BASE.replace("slack: U02BOB", "teams: bob@example.com") + ROUTES,
     "people[1].teams: malformed value 'bob@example.com' (expected a Teams user id such as 29:1AbCd... or an Azure AD "
     "object id such as 6f1d2c3b-4a5e-4f60-8a7b-9c0d1e2f3a4b)"),
    (BASE + ROUTES + "storage: {schema: My-Schema}\n",
     "storage.schema: malformed value 'My-Schema' (expected a PostgreSQL schema name of lower-case letters, digits and "
     "`_` that does not start with a digit, such as chatops)"),
    (BASE + ROUTES + SLACK.replace("}", ", api_url: slack.com/api}"),
     "adapters.slack.api_url: malformed value 'slack.com/api' (expected a URL that starts with http:// or https://, "
     "such as https://slack.com/api/, the default)"),
    (BASE + ROUTES + TELEGRAM.replace("}", ", api_url: api.telegram.org}"),
     "adapters.telegram.api_url: malformed value 'api.telegram.org' (expected a URL that starts with http:// or "
     "https://, such as https://api.telegram.org/bot, the default)"),
    (BASE + ROUTES + SLACK.replace("xoxb-1", "abc"),
     "adapters.slack.bot_token: malformed value (a secret, not shown) (expected a Slack bot token, which starts with "
     "xoxb-: the Bot User OAuth Token on the app's OAuth & Permissions page)"),
    (BASE + ROUTES + TELEGRAM.replace("7000000001:AAFake", "AAFake"),
     "adapters.telegram.bot_token: malformed value (a secret, not shown) (expected a Telegram bot token as @BotFather "
     "gives it: digits, a colon, then the rest, such as 123456789:AA...)"),
    (BASE + ROUTES + TELEGRAM.replace("s3cret-s3cret", "'my webhook secret'"),
     "adapters.telegram.webhook_secret: malformed value (a secret, not shown) (expected 8 to 256 letters, digits, `_` "
     "and `-` (the characters Telegram takes in a secret_token), such as the output of `openssl rand -hex 32`)"),
])
def test_a_malformed_value_says_what_is_expected(text: str, expected: str) -> None:
    """A value checked against a pattern said only "malformed value": which shape was wanted, the user had to find in
    the code. It says the rule and an example, as a malformed chat id does, and never shows a secret."""
    found = problems(text)
    assert expected in found, found
    assert not any("my webhook secret" in p or "AAFake" in p or "'abc'" in p for p in found), found


def test_every_pattern_a_value_is_checked_against_is_explained() -> None:
    """A pattern added to a section (or an adapter's settings) without a description would fall back to showing the
    regular expression."""
    def patterns(schema: object) -> set[str]:
        if isinstance(schema, dict):
            return {schema["pattern"]} if isinstance(schema.get("pattern"), str) else set().union(
                *(patterns(v) for v in schema.values()))
        return set().union(*(patterns(v) for v in schema)) if isinstance(schema, list) else set()

    found = patterns(Config.model_json_schema()).union(*(patterns(m.model_json_schema()) for m in SETTINGS_MODELS.values()))
    assert len(found) >= 8 and not found - set(EXPECTED_PATTERNS), found - set(EXPECTED_PATTERNS)



@pytest.mark.parametrize(("text", "expected"), [
    (BASE + ROUTES + "server: {hots: x}\n", "server.hots: unknown key (did you mean `host`?)"),
    (BASE + ROUTES + "server: {colour: blue}\n",
     "server.colour: unknown key (allowed here: host, port, public_url, max_body_bytes, metrics_token, "
     "calendar_token)"),
    (BASE + ROUTES + "storage: {schema_nam: ops}\n", "storage.schema_nam: unknown key (did you mean `schema`?)"),
    (BASE + ROUTES + "silence: []\n", "silence: unknown key (did you mean `silences`?)"),
    (BASE.replace("wait: 5m}", "wiat: 5m}") + ROUTES,
     "escalation_policies[0].steps[0].wiat: unknown key (did you mean `wait`?)"),
    (BASE.replace("{rotation: primary}", "{rotation: primary, chanel: ops-slack}") + ROUTES,
     "escalation_policies[0].steps[0].notify.chanel: unknown key (did you mean `channel`?)"),
    (BASE.replace("auth: {bearer: secret-token}", "auth: {hmac_secret: secret-token, heder: X-Sig}") + ROUTES,
     "sources[0].auth.heder: unknown key (did you mean `header`?)"),
    (BASE.replace("auth: {bearer: secret-token}", "auth: {bearer: secret-token, header: X-Sig}") + ROUTES,
     "sources[0].auth.header: unknown key (allowed here: bearer)"),
    (BASE + ROUTES + SLACK.replace("signing_secret:", "signing_secrett:"),
     "adapters.slack.signing_secrett: unknown key (did you mean `signing_secret`?)"),
    # a key written already is not the one meant
    (BASE + ROUTES + SLACK.replace("}", ", signing_secrett: x}"),
     "adapters.slack.signing_secrett: unknown key (allowed here: bot_token, signing_secret, api_url)"),
])
def test_an_unknown_key_names_the_key_meant_or_those_allowed(text: str, expected: str) -> None:
    assert expected in problems(text), problems(text)


@pytest.mark.parametrize(("name", "template", "names"), [
    ("incident.slack.json.j2", '{"text": {{ incident.title | tojson }}, "blocks": []}\n',
     "alert_count, colour, facts, firing_count, headline, id, latest, links, marker, next_step, ref, resolved_after, "
     "severity, severity_label, sources, state, state_label, title"),
    ("thread.telegram.html.j2", "{{ message }}\n", "incident_id, line"),
])
def test_an_override_template_that_uses_an_unknown_name_is_told_the_names_it_has(
        tmp_path: Path, name: str, template: str, names: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`{{ incident.title }}` failed with "'incident' is undefined" alone: which names a template is given was
    written only in the templates README, which the message did not mention."""
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / name).write_text(template)
    config = tmp_path / "app.yaml"
    config.write_text(f"storage: {{url: 'sqlite+aiosqlite:///{tmp_path / 'bot.db'}'}}\ntemplates: {{dir: tpl}}\n")
    assert main(["check-config", "-c", str(config)]) == 2
    out = capsys.readouterr().out
    kind = name.split(".")[0]
    assert (f"is undefined (rendering a sample {kind} message; {kind} templates are given {names}: see "
            f"{ROOT / 'templates' / 'README.md'})") in out, out


# --- variables, as the shell writes them: each was taken as the literal text, a secret included ---

@pytest.mark.parametrize(("bearer", "shown"), [
    ("${AM_TOKEN:?set it}", "${AM_TOKEN:?...}"),
    ("${AM_TOKEN-}", "${AM_TOKEN-...}"),
    ("${AM_TOKEN:=x}", "${AM_TOKEN:=...}"),
    ("${AM TOKEN}", "${AM...}"),  # (of a secret, no more than a name is shown)
])
def test_a_shell_form_of_a_variable_that_is_not_supported_is_an_error_not_the_secret(bearer: str, shown: str) -> None:
    """`${AM_TOKEN:?set it}` with AM_TOKEN unset passed, and the source took that text as its bearer token."""
    found = problems(BASE.replace("auth: {bearer: secret-token}", f'auth: {{bearer: "{bearer}"}}') + ROUTES)
    assert found == [f"sources[0].auth.bearer: {shown} is not supported: only ${{VAR}} and ${{VAR:-default}} are "
                     "(write $${ for a literal ${)"]


@pytest.mark.parametrize("env", [{}, {"DEV_TOKEN": "devtoken123"}])
def test_a_reference_nested_in_a_default_is_an_error_not_the_secret(env: dict[str, str]) -> None:
    """`${AM_TOKEN:-${DEV_TOKEN}}`, the shell's nesting, with AM_TOKEN unset, passed, and the bearer token was the text
    `${DEV_TOKEN}` (the default read as `${DEV_TOKEN`, and a `}` left over), whatever DEV_TOKEN held."""
    text = BASE.replace("auth: {bearer: secret-token}", 'auth: {bearer: "${AM_TOKEN:-${DEV_TOKEN}}"}') + ROUTES
    assert problems(text, env) == [
        "sources[0].auth.bearer: ${AM_TOKEN:-${...}} nests a reference in a default, which is not supported (only "
        "${VAR} and ${VAR:-default} are, the default being plain text): set AM_TOKEN itself"]
    assert problems(text, {**env, "AM_TOKEN": "am-token-0123"}) == problems(text, env)  # the form, whatever is set


def test_a_runbook_command_keeps_the_shells_own_forms() -> None:
    """`sh -c "systemctl reload haproxy@${INSTANCE%%:*}"` is the shell's text when the step runs: a config with it
    started before, and still does, as written."""
    text = BASE.replace("steps: [{run: [systemctl, restart, nginx]}]",
                        "steps: [{run: [sh, -c, 'systemctl reload haproxy@${INSTANCE%%:*} ${1}']}]") + ROUTES
    loaded = parse_config(text, adapter_models=SETTINGS_MODELS, env={})
    assert loaded.config.runbooks[0].steps[0].run == ["sh", "-c", "systemctl reload haproxy@${INSTANCE%%:*} ${1}"]


def test_an_unclosed_variable_is_an_error() -> None:
    found = problems(BASE.replace("chat: C0OPS", 'chat: "${OPS_CHAT"') + ROUTES)
    assert found == ["channels[0].chat: ${OPS_CHAT has no closing } (only ${VAR} and ${VAR:-default} are "
                     "supported; write $${ for a literal ${)"]


@pytest.mark.parametrize(("text", "where", "name"), [
    (BASE.replace("auth: {bearer: secret-token}", "auth: {bearer: $AM_TOKEN}") + ROUTES, "sources[0].auth.bearer",
     "AM_TOKEN"),
    (BASE + ROUTES + "audit: {hmac_key: 'key-$AUDIT_KEY-0123456789'}\n", "audit.hmac_key", "AUDIT_KEY"),
    (BASE + ROUTES + "storage: {url: 'postgresql+asyncpg://bot:$PGPASSWORD@db/chatops'}\n", "storage.url",
     "PGPASSWORD"),
    (BASE + ROUTES + "adapters:\n  slack: {bot_token: xoxb-1, signing_secret: $SLACK_SECRET}\n",
     "adapters.slack.signing_secret", "SLACK_SECRET"),
])
def test_a_bare_dollar_name_in_a_secret_is_an_error(text: str, where: str, name: str) -> None:
    """`$AM_TOKEN` is not substituted (only `${AM_TOKEN}` is): the token was the text `$AM_TOKEN`."""
    assert problems(text) == [
        f"{where}: a secret holds `${name}`, which is not substituted (only ${{VAR}} is): write ${{{name}}} for the "
        "variable; a secret that really holds a `$` before a letter or `_` is given through a variable, whose value is "
        "used as it is"]


def test_a_dollar_in_a_secret_from_a_variable_or_before_no_name_is_kept() -> None:
    text = BASE.replace("auth: {bearer: secret-token}", "auth: {bearer: '${AM_TOKEN}'}").replace("name: Bob", "name: $BOB")
    loaded = parse_config(text + ROUTES + "audit: {hmac_key: 'k3y-$1-$$-0123456789'}\n", adapter_models=SETTINGS_MODELS,
                          env={"AM_TOKEN": "tok-$HOME-123"})
    assert loaded.config.sources[0].auth.bearer == "tok-$HOME-123"
    assert loaded.config.people[1].name == "$BOB"  # not a secret: taken as written
    assert loaded.config.audit.hmac_key == "k3y-$1-$$-0123456789"


# --- storage.url: each passed check-config, then every command was a traceback ---

PG = "postgresql+asyncpg://bot@db.internal:5432/chatops"


@pytest.mark.parametrize(("url", "expected"), [
    (PG + "?sslmode=require",
     "storage.url: sslmode is libpq's name: asyncpg takes ssl=require (ssl: disable, allow, prefer, require, "
     "verify-ca or verify-full)"),
    (PG + "?ssl=on", "storage.url: ssl='on' is not allowed (ssl: disable, allow, prefer, require, verify-ca or "
                     "verify-full)"),
    (PG + "?application_name=bot",
     "storage.url: unknown query parameter 'application_name' (asyncpg takes: ssl, target_session_attrs, host, "
     "passfile, prepared_statement_cache_size, command_timeout, krbsrvname, gsslib)"),
    (PG + "?command_timeout=soon", "storage.url: command_timeout='soon' is not a number of seconds above 0"),
    (PG + "?command_timeout=0", "storage.url: command_timeout='0' is not a number of seconds above 0"),
    (PG + "?prepared_statement_cache_size=x",
     "storage.url: prepared_statement_cache_size='x' is not a whole number"),
    ("postgresql+asyncpg://bot:pw@db:notaport/chatops",
     "storage.url: the port 'notaport' is not a number (expected 1 to 65535; PostgreSQL's is 5432)"),
    ("postgresql+asyncpg://bot@db:/chatops",
     "storage.url: the port after `db:` is empty: give one (PostgreSQL's is 5432), or leave out the `:`"),
    ("postgresql+asyncpg://bot@db:99999/chatops",
     "storage.url: the port 99999 is out of range (expected 1 to 65535; PostgreSQL's is 5432)"),
    ("postgresql+asyncpg://bot@[::1/chatops",
     "storage.url: the host `[::1` has no closing `]` (an IPv6 address is written in brackets, such as "
     "[::1]:5432)"),
    ("sqlite+aiosqlite:///./chatops.db?timeout=soon", "storage.url: timeout='soon' is not a number of seconds"),
    # A password with an `@` not percent-encoded: the driver read the rest of it as the host (and the log showed it)
    ("postgresql+asyncpg://bot:pw@SECRET@db:5432/chatops",
     "storage.url: the password holds an `@`: write it as %40 there (percent-encoded), or the driver takes what "
     "follows it for the host"),
    ("postgresql+asyncpg://bot:p/a@ss@db/chatops",
     "storage.url: the password holds an `@`: write it as %40 there (percent-encoded), or the driver takes what "
     "follows it for the host"),
    ("postgresql+asyncpg://bot@::1:5432/chatops",  # (it said "the port ':1:5432' is not a number")
     "storage.url: the host `::1:5432` looks like an IPv6 address: write it in brackets, such as [::1]:5432 (a port "
     "after the closing `]`)"),
])
def test_a_database_url_the_driver_cannot_take_names_the_part(url: str, expected: str) -> None:
    found = problems(BASE + ROUTES + f"storage: {{url: '{url}'}}\n")
    assert found == [expected]
    assert not any("pw" in p or "SECRET" in p for p in found)


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+asyncpg://bot:pw@SECRET@db:5432/chatops", "postgresql+asyncpg://bot:***@db:5432/chatops"),
    ("postgresql+asyncpg://bot:p%40ss@db/chatops", "postgresql+asyncpg://bot:***@db/chatops"),
    ("postgresql+asyncpg://bot@db/chatops?ssl=require", "postgresql+asyncpg://bot@db/chatops?ssl=require"),
    ("sqlite+aiosqlite:///./chatops.db", "sqlite+aiosqlite:///./chatops.db"),
    ("postgresql+asyncpg://bot@myserver:pw@myserver.example.com/db", "postgresql+asyncpg://bot@myserver:***@myserver.example.com/db"),
    ("postgresql+asyncpg://bot:p/a@ss@db/chatops", "postgresql+asyncpg://bot:***@db/chatops"),
    ("postgresql+asyncpg://bot:pw@db/chatops?application_name=a@b", "postgresql+asyncpg://bot:***@db/chatops?application_name=a@b"),
    ("postgresql+asyncpg://bot@/chatops?host=/run/postgresql", "postgresql+asyncpg://bot@/chatops?host=/run/postgresql"),
])
def test_the_shown_database_url_hides_the_whole_password(url: str, shown: str) -> None:
    from storage.db import Database

    assert Database(url).safe_url == shown


@pytest.mark.parametrize("url", [
    PG, PG + "?ssl=require", PG + "?ssl=verify-full&target_session_attrs=read-write",
    "postgresql+asyncpg://bot@/chatops?host=/var/run/postgresql",
    "postgresql+asyncpg://bot@/chatops?host=db1:5432&host=db2:5432", "postgresql+asyncpg://bot@[::1]:5432/chatops",
    "postgresql+asyncpg://bot:p%40ss@db/chatops", "sqlite+aiosqlite:///./chatops.db?timeout=30",
    "postgresql+asyncpg://bot@myserver:pw@myserver.postgres.example.com/chatops",  # (Azure's user@server names)
    PG + "?command_timeout=60",  # (asyncpg reads it as a number: a config with it started before)
    "sqlite+aiosqlite:///file:chatops.db?uri=true&mode=rwc",
])
def test_database_urls_the_driver_takes_pass(url: str) -> None:
    assert parse_config(BASE + ROUTES + f"storage: {{url: '{url}'}}\n", adapter_models=SETTINGS_MODELS, env={})


def test_a_schema_on_sqlite_is_an_error() -> None:
    assert problems(BASE + ROUTES + "storage: {url: 'sqlite+aiosqlite:///./x.db', schema: ops}\n") == [
        "storage.schema: PostgreSQL only (SQLite has no schemas): remove it, or point storage.url at PostgreSQL"]


# --- an empty app.yaml, and one without sources ---

@pytest.mark.parametrize("text", ["", "\n", "# nothing yet\n# server: {port: 8080}\n"])
def test_an_empty_config_is_refused(text: str) -> None:
    assert problems(text) == ["app.yaml is empty: give it at least sources, channels and routes (the example "
                              "app.yaml shipped with the bot shows each)"]


def test_a_config_without_sources_is_a_warning() -> None:
    loaded = parse_config(BASE.replace("sources:\n  - {id: am, kind: alertmanager, auth: {bearer: secret-token}}\n", "")
                          + ROUTES, adapter_models=SETTINGS_MODELS, env={})
    assert ("sources: none, so no alert can arrive (POST /alerts/{source} knows no source); add one under sources"
            in loaded.warnings)
    assert not any(w.startswith("sources") for w in parse_config(BASE + ROUTES, adapter_models=SETTINGS_MODELS,
                                                                   env={}).warnings)


# --- values that were taken and did the wrong thing ---

@pytest.mark.parametrize(("text", "expected"), [
    (BASE + ROUTES + "server: {port: true}\n", "server.port: true is not a port: give a whole number from 1 to 65535"),
    (BASE + ROUTES + "server: {public_url: not a url}\n",
     "server.public_url: 'not a url' is not an http:// or https:// URL with a host (such as "
     "https://chatops.example.com)"),
    (BASE + ROUTES + "server: {public_url: 'https://bot.example/?x=1'}\n",
     "server.public_url: 'https://bot.example/?x=1' has a query or a fragment: give the address the bot is reached "
     "at, such as https://chatops.example.com (the bot adds its paths to it)"),
    (BASE + ROUTES + "server: {public_url: 'https://bot.example/#top'}\n",
     "server.public_url: 'https://bot.example/#top' has a query or a fragment: give the address the bot is reached "
     "at, such as https://chatops.example.com (the bot adds its paths to it)"),
    (BASE.replace("name: Bob", "name: ''") + ROUTES, "people[1].name: empty: give the name chat shows for the person"),
    (BASE.replace("name: Bob", "name: '  '") + ROUTES, "people[1].name: empty: give the name chat shows for the person"),
    (BASE + ROUTES + "grouping: {by: []}\n",
     "grouping.by: empty: give at least one label name (alerts with the same values of these labels form one "
     "incident)"),
    (BASE + "routes:\n  - {match: {'': dba}, channels: [ops-slack]}\n  - {match: {}, channels: [ops-slack]}\n",
     "routes[0].match: '': an empty label name; give the label's name (such as team: dba)"),
    (BASE.replace("kind: alertmanager, auth: {bearer: secret-token}", "kind: alertmanager") + ROUTES,
     "sources[0].auth: required: `none` (anyone may send), `{bearer: TOKEN}` or `{hmac_secret: SECRET}` (see Alert "
     "intake in the README)"),
])
def test_a_value_that_would_do_the_wrong_thing_is_refused(text: str, expected: str) -> None:
    assert expected in problems(text)


# What a config an earlier version started with may hold, and code outside the project writes its own app.yaml: each
# is said at start (check-config: `warning: path: problem`), and the bot starts as it did.
WEAK_KEY = ("audit.hmac_key: (a secret, not shown) is shorter than 16 characters, so it is weak: give a longer one, "
            "such as the output of `openssl rand -hex 32`, and change to it with `chatops audit rekey --old-key-env "
            "VAR` (VAR holding this key; see the README, The audit log)")
NOT_A_BOT_TOKEN = ("adapters.slack.bot_token: (a secret, not shown) is not a bot token (expected a Slack bot token, "
                   "which starts with xoxb-: the Bot User OAuth Token on the app's OAuth & Permissions page)")
QUIET_CATCH_ALL = ("the catch-all route has neither channels nor escalation, so an alert no other route takes opens an "
                   "incident nobody is told of: give it channels or an escalation policy")
DOUBTED = ("people", "audit.", "adapters.", "routes", "sources[", "grouping", "escalation_policies", "runbooks")  # (not: no sources, a platform off)
WARNED = [
    (BASE.replace("roles: [responder]", "roles: [respondr]") + ROUTES,
     "people[0].roles[0]: unknown role 'respondr' (did you mean `responder`? known roles: approver, manager, "
     "responder)"),
    (BASE.replace("roles: [responder]", "roles: [responder, aprover]") + ROUTES,
     "people[0].roles[1]: unknown role 'aprover' (did you mean `approver`? known roles: approver, manager, responder)"),
    (BASE.replace("roles: [responder]", "roles: [lead]").replace("timezone: Europe/Berlin}",
                                                                 "timezone: Europe/Berlin, swap_approval: lead}")
     .replace("name: Bob,", "name: Bob, roles: [boss],") + ROUTES,
     "people[1].roles[0]: unknown role 'boss' (known roles: approver, lead, manager, responder)"),
    (BASE + ROUTES + "audit: {hmac_key: short-key}\n", WEAK_KEY),
    (BASE + ROUTES + SLACK.replace("xoxb-1", "xoxp-1"), NOT_A_BOT_TOKEN),
    (BASE + "routes:\n  - {match: {team: dba}, channels: [ops-slack]}\n  - {match: {}}\n",
     f"routes[1]: {QUIET_CATCH_ALL}"),
    (BASE + "routes:\n  - {match: {}, channels: []}\n", f"routes[0]: {QUIET_CATCH_ALL}"),
    (BASE, "routes: not set, so every alert goes to the default catch-all route, which has neither channels nor "
           "escalation: its incidents are opened and nobody is told of them; add routes, ending with a catch-all such "
           "as `- {match: {}, channels: [CHANNEL]}`"),  # (check-config said nothing; the incidents reached nobody)
    (BASE.replace("kind: alertmanager,", "kind: alertmanager, dedup_key: groupkey,") + ROUTES,
     "sources[0].dedup_key: 'groupkey' is read as a label of that name, which alerts rarely have: did you mean "
     "`groupKey` (the sender's own group, spelt so)?"),
    (BASE.replace("kind: alertmanager,", "kind: generic, dedup_key: groupKey,") + ROUTES,
     "sources[0].dedup_key: `groupKey` is Alertmanager's and Grafana's group: a generic payload has none, so its "
     "alerts group by grouping.by (a generic alert's own `dedup_key` field groups it)"),
    (BASE + ROUTES + SLACK.replace("xoxb-1", "xoxb-1, api_url: 'http://slack.internal.example/api/'"),
     "adapters.slack.api_url: 'http://slack.internal.example/api/' is plain http to another machine: the tokens and "
     "keys that go there can be read and changed on the way; use https://"),
    (BASE.replace("{id: bob, name: Bob, slack: U02BOB}", "{id: bob, name: Bob}") + ROUTES,
     "escalation_policies[0].steps[0]: pages bob, who has no slack, telegram or teams id: that page fails at once and "
     "the escalation moves on (give them one under people:)"),
    (BASE + ROUTES + "grouping: {window: 0s}\n",
     "grouping.window: 0, so an alert joins an open incident of its key only when they arrive in the same instant "
     "(repeats of one alert still join theirs): give a window, such as 15m"),
    # (check-config said nothing; each request to run it was then refused in chat)
    (BASE.replace("title: Restart nginx,", "title: Restart nginx, risk: high,") + ROUTES,
     "runbooks[0].risk: high, so a person with the `approver` role must approve each request to run restart-nginx, "
     "and nobody has it: every request is refused; give the role to someone under people (not the one who asks: "
     "nobody approves their own)"),
]


@pytest.mark.parametrize(("text", "expected"), WARNED)
def test_a_value_an_earlier_version_took_is_a_warning_and_the_config_loads(text: str, expected: str) -> None:
    loaded = parse_config(textwrap.dedent(text), adapter_models=SETTINGS_MODELS, env={})
    assert [w for w in loaded.warnings if w.startswith(DOUBTED)] == [expected], loaded.warnings
    assert not any("short-key" in w or "xoxp-1" in w for w in loaded.warnings)


def test_none_of_those_warnings_is_given_for_what_is_right() -> None:
    # (approver: as the design's example config gives it)
    text = BASE.replace("roles: [responder]", "roles: [responder, manager, approver]") + ROUTES + SLACK
    loaded = parse_config(text + "audit: {hmac_key: long-enough-key-0123}\n", adapter_models=SETTINGS_MODELS, env={})
    assert not any(w.startswith(DOUBTED) for w in loaded.warnings), loaded.warnings


def test_a_weak_key_from_a_variable_names_the_variable_and_not_the_key() -> None:
    loaded = parse_config(BASE + ROUTES + "audit: {hmac_key: '${AUDIT_KEY}'}\n", adapter_models=SETTINGS_MODELS,
                          env={"AUDIT_KEY": "sh0rtk3y"})
    assert f"{WEAK_KEY} (the value is from the environment variable AUDIT_KEY)" in loaded.warnings, loaded.warnings
    assert not any("sh0rtk3y" in w for w in loaded.warnings)
    assert loaded.config.audit.hmac_key == "sh0rtk3y"  # the chain goes on with the key it was written with


def test_a_route_before_the_catch_all_may_tell_nobody() -> None:
    """A route with neither channels nor escalation before the catch-all keeps matching alerts quiet, on purpose."""
    text = BASE + "routes:\n  - {match: {team: noise}}\n  - {match: {}, channels: [ops-slack]}\n"
    assert parse_config(text, adapter_models=SETTINGS_MODELS, env={})


# --- what an error shows ---

def test_a_key_with_control_characters_is_shown_escaped() -> None:
    found = problems(BASE + ROUTES + '"evil\\nkey\\x1b[31mRED": 1\n')
    assert found == ["evil\\nkey\\x1b[31mRED: unknown key (allowed here: server, storage, timezone, business_hours, "
                     "paging, audit, templates, adapters, people, channels, sources, grouping, routes, rotations, "
                     "escalation_policies, runbooks, silences, critical_assets)"]


@pytest.mark.parametrize(("text", "expected"), [
    (BASE + ROUTES + "server: {port: abc}\n", "server.port: expected a whole number, got 'abc'"),
    (BASE + ROUTES + "server: {max_body_bytes: 1MiB}\n",
     "server.max_body_bytes: expected a whole number of bytes, such as 1048576, got '1MiB'"),
    (BASE.replace("telegram: 111111", "telegram: '@alice'") + ROUTES,
     "people[0].telegram: expected the person's numeric Telegram user id, such as 123456789, got '@alice' (the bot "
     "answers /start with it)"),
    (BASE.replace("roles: [responder]", "roles: responder") + ROUTES,
     "people[0].roles: expected a list, such as `[a, b]`, got 'responder'"),
    (BASE.replace("  - {id: restart", "  - {id: r, title: R, steps: [{run: 'systemctl restart nginx'}]}\n"
                  "  - {id: restart") + ROUTES,
     "runbooks[0].steps[0].run: expected the command as a list of words, the program first, such as `[systemctl, "
     "restart, nginx]` (no shell runs it), got 'systemctl restart nginx'"),
    (BASE.replace("start: 2026-11-02", "start: 05.01.2026") + ROUTES,
     "rotations[0].start: expected a date such as 2026-11-02, got '05.01.2026'"),
    (BASE + ROUTES + "silences:\n  - {matchers: {a: b}, starts: tomorrow, ends: 2026-11-26T02:00:00+01:00}\n",
     "silences[0].starts: expected a time with its offset, such as 2026-11-25T22:00:00+01:00, got 'tomorrow'"),
    (BASE.replace("members: [alice, bob]", "members: []") + ROUTES, "rotations[0].members: must not be empty: give "
                                                                    "at least one"),
])
def test_a_value_of_the_wrong_kind_is_told_what_is_expected(text: str, expected: str) -> None:
    """Pydantic's own words ("input should be a valid list", "unable to parse string as an integer", "invalid
    character in year") named neither the form wanted nor an example."""
    assert problems(text) == [expected]


def test_a_value_from_the_environment_is_named_with_its_variable() -> None:
    found = problems(BASE + ROUTES + "server: {port: '${CHATOPS_PORT:-8080}'}\n", env={"CHATOPS_PORT": "abc"})
    assert found == ["server.port: expected a whole number, got 'abc' (the value 'abc' is from the environment "
                     "variable CHATOPS_PORT)"]
    found = problems(BASE.replace("auth: {bearer: secret-token}", "auth: {bearer: '${AM_TOKEN}'}") + ROUTES,
                     env={"AM_TOKEN": "short"})
    assert found == ["sources[0].auth.bearer: string should have at least 8 characters (the value is from the "
                     "environment variable AM_TOKEN)"]


def test_a_date_that_is_no_date_names_its_line() -> None:
    found = problems(BASE.replace("start: 2026-11-02", "start: 2026-13-02") + ROUTES)
    assert found == ["app.yaml: line 11, column 82: invalid YAML: month must be in 1..12 (quote the value if it is "
                     "meant as text)"]


def test_a_template_that_raises_is_named_with_its_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`{{ 1/0 }}` was a traceback from check-config and serve: only Jinja's errors and TypeError were caught."""
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "thread.generic.txt.j2").write_text("{{ line }}\n{{ 1/0 }}\n")
    config = tmp_path / "app.yaml"
    config.write_text(f"storage: {{url: 'sqlite+aiosqlite:///{tmp_path / 'bot.db'}'}}\ntemplates: {{dir: tpl}}\n")
    for command in ("check-config", "serve"):
        assert main([command, "-c", str(config)]) == 2
        out, err = capsys.readouterr()
        said = out if command == "check-config" else err
        assert said.startswith(f"templates.dir: template thread.generic.txt.j2 ({tmp_path / 'tpl' / 'thread.generic.txt.j2'}): "
                               "line 2: ZeroDivisionError: division by zero (rendering a sample thread message)"), said
        assert "Traceback" not in out + err


def test_a_malformed_variable_in_a_secret_shows_no_more_than_a_name() -> None:
    found = problems(BASE.replace("auth: {bearer: secret-token}", "auth: {bearer: '${9s3cr3t-t0ken}'}") + ROUTES)
    found += problems(BASE.replace("auth: {bearer: secret-token}", "auth: {bearer: 'x${AM s3cr3t'}") + ROUTES)
    assert found == ["sources[0].auth.bearer: ${...} is not supported: only ${VAR} and ${VAR:-default} are (write $${ "
                     "for a literal ${)",
                     "sources[0].auth.bearer: ${AM has no closing } (only ${VAR} and ${VAR:-default} are supported; "
                     "write $${ for a literal ${)"]


def test_a_runbook_step_keeps_its_variables_as_written_and_never_gets_the_bots_secrets() -> None:
    """A step's `${VAR}` is the started program's text (its shell's, with only PATH and LANG): substituted from the
    bot's environment as app.yaml loaded, `echo ${SLACK_SIGNING_SECRET}` put the secret in the Slack dialog, the
    thread and the audit log, and a variable the bot does not have stopped the config."""
    step = "sh, -c, 'echo ${SLACK_SIGNING_SECRET} ${UNSET_HERE} ${HOME:-/root} $${ $PATH'"
    text = (BASE.replace("steps: [{run: [systemctl, restart, nginx]}]", f"steps: [{{run: [{step}], timeout: 5s}}]")
            .replace("channels:\n", "adapters:\n  slack: {bot_token: xoxb-1, signing_secret: '${SLACK_SIGNING_SECRET}'}"
                     "\nchannels:\n", 1) + ROUTES)
    secret = "s3cret-signing-0123456789"
    loaded = parse_config(text, adapter_models=SETTINGS_MODELS, env={"SLACK_SIGNING_SECRET": secret, "HOME": "/h"})
    assert loaded.config.runbooks[0].steps[0].run == [
        "sh", "-c", "echo ${SLACK_SIGNING_SECRET} ${UNSET_HERE} ${HOME:-/root} $${ $PATH"]
    assert secret not in repr(loaded.config.runbooks)
    assert secret in repr(loaded.adapters["slack"])  # (elsewhere a variable is still substituted)


@pytest.mark.parametrize("timeout", ["0s", "0"])
def test_a_runbook_step_timeout_below_a_second_is_refused(timeout: str) -> None:
    """`timeout: 0s` passed check-config, and every run of the step timed out at once."""
    text = BASE.replace("steps: [{run: [systemctl, restart, nginx]}]",
                        f"steps: [{{run: [systemctl, restart, nginx], timeout: {timeout}}}]") + ROUTES
    assert problems(text) == ["runbooks[0].steps[0].timeout: a step's timeout must be at least 1s (the step is killed "
                              "when it passes)"]
