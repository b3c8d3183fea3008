"""app.yaml values as written: matchers YAML would read as numbers, server.host, and what check-config says of a value
it refuses (a boolean matcher, a null key, `auth: None`, a config that cannot be read, a template's unknown name)."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from adapters import SETTINGS_MODELS
from bot.cli import main
from bot.config import ConfigError, load_config, parse_config
from bot.routing import matches, select_routes

BASE = """
people:
  - {id: alice, name: Alice, roles: [responder], slack: U01ALICE}
channels:
  - {id: ops-slack, platform: slack, chat: C0OPS}
  - {id: dba-slack, platform: slack, chat: C0DBA}
sources:
  - {id: gen, kind: generic, auth: none}
"""
CATCH_ALL = "  - {match: {}, channels: [ops-slack]}\n"


def parse(text: str):  # type: ignore[no-untyped-def]
    return parse_config(text, adapter_models=SETTINGS_MODELS, env={}).config


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, adapter_models=SETTINGS_MODELS, env={})
    return [f"{p}: {m}" if p else m for p, m in info.value.problems]


# (written in app.yaml, what YAML 1.1 makes of it, the label value it must match)
NUMBERS = [
    ("1.10", 1.1, "1.10"),
    ("010", 8, "010"),
    ("0x1F", 31, "0x1F"),
    ("1e3", 1000.0, "1e3"),
    ("1_000", 1000, "1_000"),
    ("+5", 5, "+5"),
    ("500", 500, "500"),
    (".5", 0.5, ".5"),
    ("2026-01-02", "2026-01-02", "2026-01-02"),  # (a date, which was refused: `input should be a valid string`)
]


@pytest.mark.parametrize(("written", "number", "label"), NUMBERS, ids=[w for w, _, _ in NUMBERS])
def test_a_matcher_that_yaml_reads_as_a_number_matches_the_text_as_written(written: str, number: object,
                                                                           label: str) -> None:
    """`version: 1.10` was kept as "1.1" (and `code: 010` as "8") without a word: the alert labelled 1.10 went to
    the catch-all route, and the silence meant for it muted nothing."""
    config = parse(BASE + textwrap.dedent(f"""
        routes:
          - {{name: pinned, match: {{v: {written}}}, channels: [dba-slack]}}
          - {{match: {{}}, channels: [ops-slack]}}
        silences:
          - {{matchers: {{v: {written}}}, weekly: {{days: [sun], start: "02:00", end: "03:00"}}}}
        runbooks:
          - {{id: rb, title: RB, match: {{v: {written}}}, steps: [{{run: ["true"]}}]}}
        """))
    assert config.routes[0].match == {"v": label}
    assert config.silences[0].matchers == {"v": label}
    assert config.runbooks[0].match == {"v": label}
    assert [r.name for r in select_routes(config.routes, {"v": label})] == ["pinned"]
    if str(number) != label:  # (what it used to be read as matches no longer)
        assert [r.name for r in select_routes(config.routes, {"v": str(number)})] == [None]


def test_matchers_keep_their_text_in_block_style_and_through_an_anchor() -> None:
    config = parse(BASE + textwrap.dedent("""
        routes:
          - name: first
            match: &pinned
              version: 1.10
              code: 010
          - {name: second, match: *pinned, channels: [dba-slack]}
        """) + CATCH_ALL + "silences:\n  - {matchers: *pinned, weekly: {days: [sun], start: '02:00', end: '03:00'}}\n")
    assert config.routes[0].match == config.routes[1].match == {"version": "1.10", "code": "010"}
    assert config.silences[0].matchers == {"version": "1.10", "code": "010"}


def test_numbers_outside_matchers_are_still_numbers() -> None:
    """Only label matchers are text: a port, a Telegram id, a repeat count are read as YAML reads them."""
    config = parse(BASE.replace("slack: U01ALICE}", "slack: U01ALICE, telegram: 0x10}") + textwrap.dedent("""
        server: {port: 0x1F90}
        routes:
          - {match: {code: 500}, channels: [ops-slack]}
        """) + CATCH_ALL)
    assert config.server.port == 8080
    assert config.people[0].telegram == 16
    assert config.routes[0].match == {"code": "500"}


def test_a_runbook_match_takes_numbers_as_routes_and_silences_do() -> None:
    """`code: 500` in a runbook's match was refused (`input should be a valid string`), taken in a route's."""
    config = parse(BASE + "routes:\n  - {match: {code: 500}, channels: [ops-slack]}\n" + CATCH_ALL
                   + "runbooks:\n  - {id: rb, title: RB, match: {code: 500, team: dba}, steps: [{run: [\"true\"]}]}\n")
    assert config.runbooks[0].match == {"code": "500", "team": "dba"}
    assert matches(config.runbooks[0].match, {"code": "500", "team": "dba"})


def test_a_runbook_match_refuses_a_boolean_as_routes_do() -> None:
    said = problems(BASE + "routes:\n" + CATCH_ALL
                    + "runbooks:\n  - {id: rb, title: RB, match: {pci: yes}, steps: [{run: [\"true\"]}]}\n")
    assert said == ['runbooks[0].match: pci: YAML reads this value as a boolean (true), and labels are text: write '
                    'it in quotes as the label has it: pci: "yes"']


@pytest.mark.parametrize(("written", "value"), [("NO", "false"), ("Yes", "true"), ("off", "false"), ("TRUE", "true")])
def test_a_boolean_matcher_is_refused_with_its_own_text_in_quotes(written: str, value: str) -> None:
    """`country: NO` was told to write `country: "true"`."""
    said = problems(BASE + f"routes:\n  - {{match: {{country: {written}}}, channels: [ops-slack]}}\n" + CATCH_ALL)
    assert said == [f'routes[0].match: country: YAML reads this value as a boolean ({value}), and labels are text: '
                    f'write it in quotes as the label has it: country: "{written}"']
    said = problems(BASE + "routes:\n" + CATCH_ALL + f"silences:\n  - {{matchers: {{country: {written}}}, "
                    "weekly: {days: [sun], start: '02:00', end: '03:00'}}\n")
    assert said == [f'silences[0].matchers: country: YAML reads this value as a boolean ({value}), and labels are '
                    f'text: write it in quotes as the label has it: country: "{written}"']


def test_a_boolean_matcher_given_without_yaml_text_names_the_words_yaml_reads_as_booleans() -> None:
    from bot.config import Route

    with pytest.raises(ValueError, match=r'pci: YAML reads this value as a boolean \(true\), and labels are text: '
                                         r'write it in quotes as the label has it \(e\.g\. pci: "true"; YAML reads '
                                         r'true, false, yes, no, on and off, in any case, as booleans\)'):
        Route.model_validate({"match": {"pci": True}})


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::", "::1", "fe80::1%eth0", "localhost", "bot.internal",
                                  "chat-ops.example.com", "my_host.lan", "bot.internal."])
def test_a_listening_host_that_is_a_name_or_an_address_is_taken(host: str) -> None:
    assert parse(BASE + f"server: {{host: '{host}'}}\nroutes:\n" + CATCH_ALL).server.host == host


@pytest.mark.parametrize(("host", "said"), [
    ("", "server.host: empty: give the address to listen on, such as 127.0.0.1 (this machine only), 0.0.0.0 (every "
         "IPv4 address) or :: (every IPv6 address)"),
    ("not a host!", "server.host: 'not a host!' is not a host name or an IP address: give one such as 127.0.0.1, "
                    "0.0.0.0, :: or bot.internal"),
    ("http://bot.internal", "server.host: 'http://bot.internal' is not a host name or an IP address: give one such "
                            "as 127.0.0.1, 0.0.0.0, :: or bot.internal"),
    ("[::1]", "server.host: '[::1]' is an IPv6 address in brackets: write it without them, ::1 (brackets belong in a "
              "URL)"),
    ("bot.internal:8080", "server.host: 'bot.internal:8080' holds a port: give the port as server.port, and the "
                          "host alone here"),
    ("-bot", "server.host: '-bot' is not a host name or an IP address: give one such as 127.0.0.1, 0.0.0.0, :: or "
             "bot.internal"),
    ("a" * 64 + ".lan", f"server.host: '{'a' * 64}.lan' is not a host name or an IP address: give one such as "
                        "127.0.0.1, 0.0.0.0, :: or bot.internal"),
])
def test_a_listening_host_that_is_no_name_or_address_is_refused_by_check_config(host: str, said: str) -> None:
    """`host: ""` and `host: "not a host!"` were valid to check-config; serve then stopped on `cannot listen on
    :8080: Name or service not known`."""
    assert problems(BASE + f"server: {{host: '{host}'}}\nroutes:\n" + CATCH_ALL) == [said]


def test_a_null_key_is_named_with_its_line() -> None:
    """`~: x` was said as `None: keys should be strings`."""
    said = problems(BASE + "routes:\n" + CATCH_ALL + "~: x\n")
    assert said == ["app.yaml: line 11, column 1: invalid YAML: a key that is null (`~`, `null` or nothing before "
                    "the colon): give the key its name"]
    said = problems(BASE + "routes:\n  - channels: [ops-slack]\n    match:\n      null: x\n" + CATCH_ALL)
    assert said == ["app.yaml: line 12, column 7: invalid YAML: a key that is null (`~`, `null` or nothing before "
                    "the colon): give the key its name"]


@pytest.mark.parametrize("written", ["None", "NONE", "null"])
def test_an_auth_that_is_a_misspelt_none_is_shown(written: str) -> None:
    """`auth: None` was said as `(a secret, not shown) is not allowed`: it is no secret, and the fix is in its case."""
    said = problems(BASE.replace("auth: none", f"auth: '{written}'") + "routes:\n" + CATCH_ALL)
    assert said == [f"sources[0].auth: {written!r} is not allowed: input should be 'none'"]


def test_an_auth_that_is_a_token_written_in_place_stays_hidden() -> None:
    said = problems(BASE.replace("auth: none", "auth: s3cr3t-token-value") + "routes:\n" + CATCH_ALL)
    assert said == ["sources[0].auth: (a secret, not shown) is not allowed: expected `none` (anyone may send), or "
                    "the token written as `{bearer: TOKEN}` or `{hmac_secret: SECRET}`"]
    assert "s3cr3t" not in "".join(said)


def test_an_auth_with_both_a_bearer_and_an_hmac_secret_says_to_give_one() -> None:
    """It said `hmac_secret: unknown key (allowed here: bearer)`, of a key that is right."""
    said = problems(BASE.replace("auth: none", "auth: {bearer: token-token-1, hmac_secret: secret-secret-1}")
                    + "routes:\n" + CATCH_ALL)
    assert said == ["sources[0].auth: give `bearer` or `hmac_secret`, not both: a source checks one kind of "
                    "credential"]


def test_a_config_that_is_a_folder_says_what_is_expected(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", str(tmp_path), "check-config"]) == 2
    said = capsys.readouterr().out
    assert f"{tmp_path}: cannot read: it is a folder, not a file: give -c (or CHATOPS_CONFIG) the path of the YAML " \
           "config file, such as app.yaml in it" in said


def test_a_config_the_bot_cannot_read_says_what_is_expected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "app.yaml"
    path.write_text("routes: [{match: {}}]\n")

    def refused(self: Path, *args: object, **kwargs: object) -> str:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_text", refused)  # (the tests may run as root, whom chmod does not stop)
    with pytest.raises(ConfigError) as info:
        load_config(path, adapter_models=SETTINGS_MODELS, env={})
    assert [m for _, m in info.value.problems] == [
        f"{path}: cannot read: Permission denied: the config must be a YAML file the bot's user can read; let that "
        "user read it (chmod, chown), or pass -c PATH of one it can read"]


def test_a_template_that_uses_an_unknown_name_is_named_with_its_line(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The README promises a failing template named with its file and line; an unknown name was said without it."""
    (tmp_path / "tpl").mkdir()
    (tmp_path / "tpl" / "thread.generic.txt.j2").write_text("line1\n{{ nosuchname.attr }}\n")
    config = tmp_path / "app.yaml"
    config.write_text(textwrap.dedent(BASE) + "templates: {dir: tpl}\nroutes:\n" + CATCH_ALL)
    assert main(["-c", str(config), "check-config"]) == 2
    said = capsys.readouterr().out
    assert (f"templates.dir: template thread.generic.txt.j2 ({tmp_path / 'tpl' / 'thread.generic.txt.j2'}): line 2: "
            "UndefinedError: 'nosuchname' is undefined (rendering a sample thread message; thread templates are given "
            "incident_id, line: see ") in said


def test_a_value_a_matcher_shares_through_an_anchor_stays_what_yaml_reads_elsewhere() -> None:
    """The matcher's value was retagged in place, and an alias is the same node: `continue: &t true` in one route and
    `match: {other: *t}` in another made the first `continue` the text "true", refused as no boolean."""
    with pytest.raises(ConfigError) as refused:
        parse(BASE + textwrap.dedent("""
            routes:
              - {match: {team: dba}, channels: [ops-slack], continue: &t true}
              - {match: {other: *t}, channels: [ops-slack]}
            """) + CATCH_ALL)
    problems = refused.value.problems
    assert [path for path, _ in problems] == ["routes[1].match"], problems
    assert "other: YAML reads this value as a boolean" in problems[0][1], problems
    config = parse(BASE + textwrap.dedent("""
        server: {port: &p 8081}
        routes:
          - {match: {port: *p}, channels: [ops-slack]}
        """) + CATCH_ALL)
    assert config.server.port == 8081 and config.routes[0].match == {"port": "8081"}
