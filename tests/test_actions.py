"""The button codec: one compact value per button, at most 64 bytes, decoded strictly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bot.actions import MAX_BYTES, MAX_ID, Action, CodecError, decode, encode
from bot.cli import main as cli


def test_values_are_short_and_round_trip() -> None:
    assert encode(Action.ACKNOWLEDGE, 42) == "ack:42"
    assert encode("rb", 42, "restart-nginx") == "rb:42:restart-nginx"
    decoded = decode("rb:42:restart-nginx")
    assert (decoded.action, decoded.incident_id, decoded.arg) == (Action.RUN_RUNBOOK, 42, "restart-nginx")


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
                                   "ack:2147483648", "swcx:99999999999"])
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


@given(st.sampled_from(list(Action)), st.integers(1, MAX_ID), st.from_regex(r"[A-Za-z0-9_.@+=/-]{0,30}", fullmatch=True))
def test_whatever_fits_round_trips(action: Action, incident_id: int, arg: str) -> None:
    try:
        value = encode(action, incident_id, arg)
    except CodecError:
        assert len(f"{action.value}:{incident_id}:{arg}".encode()) > MAX_BYTES
        return
    assert len(value.encode()) <= MAX_BYTES
    back = decode(value)
    assert (back.action, back.incident_id, back.arg) == (action, incident_id, arg)


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
