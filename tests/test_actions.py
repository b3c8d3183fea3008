"""The button codec: one compact value per button, at most 64 bytes, decoded strictly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from datetime import UTC, datetime, timedelta, timezone

from bot.actions import MAX_BYTES, MAX_ID, Action, CodecError, decode, encode, stamp
from bot.cli import main as cli


def test_values_are_short_and_round_trip() -> None:
    assert encode(Action.ACKNOWLEDGE, 42) == "ack:42"
    assert encode("rb", 42, "restart-nginx") == "rb:42:restart-nginx"
    decoded = decode("rb:42:restart-nginx")
    assert (decoded.action, decoded.incident_id, decoded.arg) == (Action.RUN_RUNBOOK, 42, "restart-nginx")


def test_a_button_carries_the_tag_of_its_incident_and_one_drawn_before_tags_still_decodes() -> None:
    opened, key = datetime(2026, 11, 23, 8, 15, 42, 123456, tzinfo=UTC), '{"alertname":"DiskFull"}'
    tag = stamp(opened, key)
    assert 1 <= len(tag) <= 6 and tag.isalnum() and tag == tag.lower()
    assert stamp(opened.replace(microsecond=0), key) == tag  # whole seconds: the same whatever a store keeps of them
    assert stamp(opened.astimezone(timezone(timedelta(hours=1))), key) == tag == stamp(opened.replace(tzinfo=None), key)
    assert stamp(opened + timedelta(seconds=1), key) != tag  # another incident #42 (in another store)...
    assert stamp(opened, '{"alertname":"DBDown"}') != tag  # ...even one opened in the same second
    value = encode("esc", 42, "2.1", tag)
    assert value == f"esc:42.{tag}:2.1"
    assert decode(value) == (decoded := decode(value)) and (decoded.incident_id, decoded.arg, decoded.tag) == (
        42, "2.1", tag)
    old = decode("esc:42:2.1")  # a card drawn before tags
    assert (old.incident_id, old.arg, old.tag) == (42, "2.1", "")
    with pytest.raises(CodecError, match="tag"):
        encode("ack", 42, tag="ABC")


def test_exactly_64_bytes_fits_and_65_does_not_with_a_tag_too() -> None:
    tag = "z" * 6  # the longest tag
    arg = "x" * (MAX_BYTES - len(f"rb:{MAX_ID}.{tag}:"))
    value = encode("rb", MAX_ID, arg, tag)
    assert len(value.encode()) == 64 and (decode(value).arg, decode(value).tag) == (arg, tag)
    with pytest.raises(CodecError, match="is 65 bytes; a button value must fit 64"):
        encode("rb", MAX_ID, arg + "x", tag)
    with pytest.raises(CodecError, match="too long"):
        decode(value + "x")


def test_exactly_64_bytes_fits_and_65_does_not() -> None:
    arg = "x" * (MAX_BYTES - len(f"rb:{MAX_ID}:"))  # with the largest incident id there can be
    value = encode("rb", MAX_ID, arg)
    assert len(value.encode()) == 64 and decode(value).arg == arg
    with pytest.raises(CodecError, match="is 65 bytes; a button value must fit 64"):
        encode("rb", MAX_ID, arg + "x")
    with pytest.raises(CodecError, match="too long"):
        decode(value + "x")


@pytest.mark.parametrize("value", ["", "ack", "ack:", "ack:0", "ack:-1", "ack:01", "ack:42:", "ack:42:a b",
                                   "ACK:42", "nuke:42", "ack:42:<script>", "ack:1234567890123456789", "ack:42\n",
                                   "ack:2147483648", "swcx:99999999999",
                                   "ack:42.", "ack:42.ABC", "ack:42.abcdefg", "ack:42.a.b", "ack.x:42"])
def test_anything_encode_would_not_make_is_refused(value: str) -> None:
    with pytest.raises(CodecError):
        decode(value)


def test_encode_refuses_what_it_could_not_decode_back() -> None:
    with pytest.raises(CodecError, match="may only hold"):
        encode("rb", 1, "two words")
    with pytest.raises(ValueError):
        encode("nuke", 1)
    with pytest.raises(CodecError, match="out of range"):
        encode("ack", 0)
    with pytest.raises(CodecError, match="out of range"):
        encode("ack", MAX_ID + 1)

    assert decode(f"ack:{MAX_ID}").incident_id == MAX_ID


@given(st.sampled_from(list(Action)), st.integers(1, MAX_ID),
       st.from_regex(r"[A-Za-z0-9_.@+=/-]{0,50}", fullmatch=True), st.from_regex(r"[0-9a-z]{0,6}", fullmatch=True))
def test_whatever_fits_round_trips(action: Action, incident_id: int, arg: str, tag: str) -> None:
    try:
        value = encode(action, incident_id, arg, tag)
    except CodecError:
        assert len(f"{action.value}:{incident_id}.{tag}:{arg}".encode()) - (not tag) - (not arg) > MAX_BYTES
        return
    assert len(value.encode()) <= MAX_BYTES
    back = decode(value)
    assert (back.action, back.incident_id, back.arg, back.tag) == (action, incident_id, arg, tag)


def test_the_slack_manifest_points_at_public_url(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "app.yaml"
    config.write_text("server: {public_url: 'https://chatops.example.com'}\n")
    assert cli(["slack-manifest", "-c", str(config), "--name", "oncall-bot"]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["settings"]["interactivity"]["request_url"] == "https://chatops.example.com/slack/events"
    assert {c["command"] for c in manifest["features"]["slash_commands"]} >= {"/incident", "/ack", "/chatops"}
    assert manifest["display_information"]["name"] == "oncall-bot"
    # Slack sends a typed @alice as <@U01ALICE|alice> only with escaping on: /swap @alice then finds Alice by her
    # Slack id, whatever her display name (without it, plain "@alice.smith", which no app.yaml name matches).
    assert all(c["should_escape"] is True for c in manifest["features"]["slash_commands"])


@pytest.mark.parametrize("name", ["", "   ", "x" * 36])
def test_the_slack_manifest_refuses_a_name_slack_would(name: str, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """An empty name made a manifest Slack refuses; a long one was cut to 35 characters without a word."""
    config = tmp_path / "app.yaml"
    config.write_text("server: {public_url: 'https://chatops.example.com'}\n")
    with pytest.raises(SystemExit) as refused:
        cli(["slack-manifest", "-c", str(config), "--name", name])
    assert refused.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert (f"argument --name: a Slack app's name is 1 to 35 characters; {name!r} has {len(name.strip())}"
            in captured.err)


async def test_a_refused_click_delivered_twice_is_audited_once() -> None:
    """The refusal's audit event was written before the duplicate check: Slack's retry of a click (another signature,
    the same action) was a second `access.refused`."""
    from adapters import SETTINGS_MODELS
    from bot.chat import ActionEvent, Reply
    from bot.config import parse_config
    from bot.dispatch import Dispatcher
    from bot.model import Actor

    config = parse_config("people:\n  - {id: bob, name: Bob, slack: U02BOB}\n", adapter_models=SETTINGS_MODELS,
                          env={}).config
    dispatcher = Dispatcher(config)
    dispatcher.action("ack", label="Acknowledge")(lambda *_: Reply("done"))
    audited: list[tuple[str, str, int | None, str]] = []

    async def on_refused(actor: Actor, person: object, what: str, incident_id: int | None, role: str) -> None:
        audited.append((actor.user_id, what, incident_id, role))

    dispatcher.on_refused = on_refused
    bob = Actor("slack", "U02BOB", "Bob", None)
    for event_id in ("click-1", "click-1", "click-2"):
        reply = await dispatcher.handle_action(ActionEvent("ack", 1, "", bob, None, event_id=event_id))
        assert reply is not None and "needs the `responder` role" in reply.text
    assert audited == [("U02BOB", "Acknowledge", 1, "responder")] * 2  # click-1 once, click-2 once
