"""A runbook request's messages say how it ended: the thread's request line (on every platform the incident has a
thread on) and each approver's direct message are redrawn, without their buttons, when the request is approved,
rejected, withdrawn or expires. They kept saying it waited, with live Approve / Reject, after it was decided.

The real bot against the fake Slack (and Telegram) on 127.0.0.1, as tests/test_runbooks.py drives it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from storage.models import OutboxItem

from tests.botkit import bot_on, running_bot
from tests.fake_slack import FakeSlack
from tests.fake_telegram import FakeTelegram
from tests.test_runbooks import PEOPLE, nasty_alert, posted, recorded, runbook_config, runs
from tests.test_slack_flow import Slack, button_values, slack_config
from tests.test_telegram_flow import GROUP, TG_SECRET, Both

# Erin approves on Slack too: two approvers' direct messages to redraw (Carol's goes to Telegram, off here)
ERIN = "  - {id: erin, name: Erin, roles: [approver], slack: U06ERIN}\n"
ASKED = "Alice asks to run runbook Restart web (high risk)"


@pytest.fixture(params=["sqlite", "postgres"])
async def slack(request: pytest.FixtureRequest, tmp_path: Path, pg_schema: str) -> AsyncIterator[Slack]:
    async with FakeSlack() as fake, bot_on(request.param, tmp_path, pg_schema, slack_config(fake),
                                           people=PEOPLE + ERIN, base=runbook_config(tmp_path)) as h:
        yield Slack(h, fake)


def buttons(message: dict[str, Any]) -> list[str]:
    return button_values(message) if message.get("blocks") else []


async def asked(s: Slack, ts: str) -> tuple[str, str, str]:
    """The ts of the thread's request line and of Bob's and Erin's direct messages, once each arrived with its
    Approve / Reject."""
    def found() -> tuple[str, str, str] | None:
        line = [t for (c, t), m in s.fake.messages.items()
                if c == "C0OPS" and m.get("thread_ts") == ts and ASKED in m["text"] and buttons(m)]
        bob = [t for (c, t), m in s.fake.messages.items() if c == "D02BOB" and buttons(m)]
        erin = [t for (c, t), m in s.fake.messages.items() if c == "D06ERIN" and buttons(m)]
        return (line[-1], bob[-1], erin[-1]) if line and bob and erin else None
    await s.fake.wait_for(found, timeout=10)
    result = found()
    assert result is not None
    return result


async def ended(s: Slack, where: list[tuple[str, str]], words: str) -> None:
    """Each message `where` (channel, ts) says `words` and has no button any more: the outbox redrew it (the bot's
    clock moves a second at a time meanwhile, for a retry's wait)."""
    await s.h.bot.runbooks.idle()

    def now() -> list[tuple[str, str, list[str]]]:
        return [(c, s.fake.messages[(c, t)]["text"], buttons(s.fake.messages[(c, t)])) for c, t in where]
    for _ in range(150):  # (50 ran out once in CI, on PostgreSQL, under load)
        if all(words in text and not keys for _, text, keys in now()):
            return
        s.h.clock.advance(timedelta(seconds=1))
        s.h.bot.outbox.nudge()
        await asyncio.sleep(0.2)
    raise AssertionError(f"not all say {words!r} without buttons: {now()}")


async def test_approved_in_the_thread_every_request_message_says_so_without_buttons(slack: Slack) -> None:
    s = slack
    ts = await posted(s)
    await s.answer(await s.command("/incident", "runbook 1 restart"))
    line, bob, erin = await asked(s, ts)
    assert buttons(s.fake.messages[("C0OPS", line)]) == ["apv:1:1", "rej:1:1"]
    approve = next(v for v in button_values(s.fake.messages[("C0OPS", line)], tagged=True) if v.startswith("apv:"))
    _, _, key = await s.click(approve, line, user="U02BOB")
    assert (await s.answer(key))["text"] == "Approved: Restart web runs on #1 now."
    await ended(s, [("C0OPS", line), ("D02BOB", bob), ("D06ERIN", erin)],
                "Bob approved running Restart web: it runs now")
    said = s.fake.messages[("C0OPS", line)]["text"]
    assert said.startswith("Alice asked to run runbook Restart web (high risk): `") and "record.py" in said
    assert "waits" not in said
    assert "on #1" in s.fake.messages[("D06ERIN", erin)]["text"]
    assert [r.status for r in await runs(s.h)] == ["succeeded"]


async def test_approved_in_a_direct_message_the_other_approvers_and_the_thread_are_told(slack: Slack) -> None:
    s = slack
    ts = await posted(s)
    await s.answer(await s.command("/incident", "runbook 1 restart"))
    line, bob, erin = await asked(s, ts)
    approve = next(v for v in button_values(s.fake.messages[("D06ERIN", erin)], tagged=True) if v.startswith("apv:"))
    _, _, key = await s.click(approve, erin, user="U06ERIN")
    assert (await s.answer(key))["text"] == "Approved: Restart web runs on #1 now."
    await ended(s, [("C0OPS", line), ("D02BOB", bob), ("D06ERIN", erin)],
                "Erin approved running Restart web: it runs now")


async def test_rejected_withdrawn_and_expired_requests_say_how_they_ended(slack: Slack, tmp_path: Path) -> None:
    s = slack
    ts = await posted(s)
    await s.answer(await s.command("/incident", "runbook 1 restart"))
    line, bob, erin = await asked(s, ts)
    _, _, key = await s.click("rej:1:1", bob, user="U02BOB")
    assert (await s.answer(key))["text"] == "Rejected: Restart web does not run on #1."
    await ended(s, [("C0OPS", line), ("D02BOB", bob), ("D06ERIN", erin)], "Rejected by Bob")

    await s.answer(await s.command("/incident", "runbook 1 restart"))
    line, bob, erin = await asked(s, ts)
    _, _, key = await s.click("rej:1:2", line)  # Alice, who asked, with the thread's Reject
    assert (await s.answer(key))["text"] == "Withdrawn: Restart web does not run on #1."
    await ended(s, [("C0OPS", line), ("D02BOB", bob), ("D06ERIN", erin)], "Withdrawn by Alice")

    await s.answer(await s.command("/incident", "runbook 1 restart"))
    line, bob, erin = await asked(s, ts)
    s.h.clock.advance(timedelta(minutes=61))
    await s.h.bot.runbooks.sweep()
    await ended(s, [("C0OPS", line), ("D02BOB", bob), ("D06ERIN", erin)], "Expired: nobody approved within 1 h")
    assert [r.status for r in await runs(s.h)] == ["rejected", "cancelled", "expired"]
    assert recorded(tmp_path / "restart.jsonl") == []
    # each request's own messages: the first request's say it was rejected still
    assert sum("Rejected by Bob" in m["text"] for m in s.fake.messages.values()) == 3


async def test_a_message_still_on_its_way_when_the_request_is_decided_is_redrawn_once_it_arrives(
        slack: Slack) -> None:
    """The direct message (and the thread's line) were being posted when Bob rejected the request: posted with their
    buttons after the request ended, they are redrawn once the platform answers."""
    s = slack
    ts = await posted(s)
    release = s.fake.hold("chat.postMessage")
    await s.answer(await s.command("/incident", "runbook 1 restart"))
    # All three on their way (Slack has them, its answers held) before Bob decides: one not sent yet when he does
    # would go settled, or not at all (the test after this one)
    await s.fake.wait_for(lambda: {c for c, _ in s.fake.messages} >= {"D02BOB", "D06ERIN"}, timeout=10)
    await asked_line(s, ts)
    bob = next(t for (c, t) in s.fake.messages if c == "D02BOB")
    _, _, key = await s.click("rej:1:1", bob, user="U02BOB")
    assert (await s.answer(key))["text"] == "Rejected: Restart web does not run on #1."
    for _ in range(100):  # the decision's redraw has looked, and found nothing posted yet to redraw
        async with s.h.bot.db.sessions() as session:
            redraws = (await session.execute(select(OutboxItem).where(OutboxItem.kind == "asked"))).scalars().all()
        if [r.status for r in redraws] == ["sent"]:
            break
        await asyncio.sleep(0.05)
    assert [r.status for r in redraws] == ["sent"]
    release.set()
    line = await asked_line(s, ts)
    await s.fake.wait_for(lambda: any(c == "D06ERIN" for c, _ in s.fake.messages), timeout=5)
    erin = next(t for (c, t) in s.fake.messages if c == "D06ERIN")
    # they went with their buttons (the request still waited as the platform took them)
    assert all(button_values(c.params) for c in s.fake.called("chat.postMessage") if c.params["channel"][0] == "D")
    await ended(s, [("C0OPS", line), ("D02BOB", bob), ("D06ERIN", erin)], "Rejected by Bob")


async def test_a_message_not_sent_yet_when_the_request_is_decided_never_goes_with_buttons(slack: Slack) -> None:
    """Slack held the direct messages back for a minute (a rate limit): by the time they could go, Bob had rejected
    the request in the thread. Bob and Erin never get a question already answered."""
    s = slack
    ts = await posted(s)
    s.fake.fail("conversations.open", "ratelimited", status=429, retry_after=60, times=2)
    await s.answer(await s.command("/incident", "runbook 1 restart"))
    line = await asked_line(s, ts)
    _, _, key = await s.click("rej:1:1", line, user="U02BOB")
    assert (await s.answer(key))["text"] == "Rejected: Restart web does not run on #1."
    await ended(s, [("C0OPS", line)], "Rejected by Bob")
    for _ in range(10):  # their minute passes
        s.h.clock.advance(timedelta(seconds=10))
        s.h.bot.outbox.nudge()
        await asyncio.sleep(0.2)
    assert not [m for (c, _), m in s.fake.messages.items() if c in ("D02BOB", "D06ERIN")]
    async with s.h.bot.db.sessions() as session:
        dms = (await session.execute(select(OutboxItem).where(OutboxItem.kind == "direct"))).scalars().all()
    # Carol's Telegram is off: her message is given up when the outbox tries it, or cancelled if Bob's answer came
    # first (a busy machine)
    assert sorted((d.channel, d.status if d.channel != "@carol" or d.status != "cancelled" else "dead")
                  for d in dms) == [("@bob", "cancelled"), ("@carol", "dead"), ("@erin", "cancelled")]


async def asked_line(s: Slack, ts: str) -> str:
    def found() -> list[str]:
        return [t for (c, t), m in s.fake.messages.items()
                if c == "C0OPS" and m.get("thread_ts") == ts and ASKED in m["text"]]
    await s.fake.wait_for(found, timeout=10)
    return found()[-1]


async def test_after_a_restart_the_stored_messages_are_redrawn(tmp_path: Path) -> None:
    """Where each message went is kept in the store: the bot that decides need not be the one that asked."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    async with FakeSlack() as fake:
        async with running_bot(url, slack_config(fake), people=PEOPLE + ERIN, base=runbook_config(tmp_path)) as h:
            s = Slack(h, fake)
            ts = await posted(s)
            await s.answer(await s.command("/incident", "runbook 1 restart"))
            line, bob, erin = await asked(s, ts)
        async with running_bot(url, slack_config(fake), people=PEOPLE + ERIN, base=runbook_config(tmp_path)) as h:
            s = Slack(h, fake)
            _, _, key = await s.click("rej:1:1", erin, user="U06ERIN")
            assert (await s.answer(key))["text"] == "Rejected: Restart web does not run on #1."
            await ended(s, [("C0OPS", line), ("D02BOB", bob), ("D06ERIN", erin)], "Rejected by Erin")


async def test_the_telegram_thread_and_direct_message_are_redrawn_too(tmp_path: Path) -> None:
    async with FakeSlack() as slack, FakeTelegram() as tg:
        extra = slack_config(slack) + (f"  telegram: {{bot_token: '{tg.token}', webhook_secret: {TG_SECRET}, "
                                       f"api_url: '{tg.api_url}'}}\n")
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra, people=PEOPLE,
                               base=runbook_config(tmp_path)) as h:
            b = Both(h, Slack(h, slack), tg)
            status, _, _ = await h.post("am", nasty_alert("alertmanager/01-diskfull-firing-2-alerts.json"))
            assert status == 200  # routed to both chats: a thread on each platform
            for _ in range(200):  # (the incident is stored, and its messages recorded, just after the answer)
                try:
                    await h.message_of(1), await h.message_of(1, "ops-telegram")
                    break
                except Exception:
                    await asyncio.sleep(0.05)
            answer = await b.slack.answer(await b.slack.command("/incident", "runbook 1 restart"))
            assert "approver (Bob, Carol)" in answer["text"]

            def found() -> tuple[int, int, str, str] | None:
                group = [mid for (c, mid), m in tg.messages.items() if c == GROUP and ASKED in m["text"]]
                carol = [mid for (c, mid), m in tg.messages.items() if c == 333333 and ASKED in m["text"]]
                line = [t for (c, t), m in slack.messages.items() if c == "C0OPS" and ASKED in m["text"]]
                bob = [t for (c, t), m in slack.messages.items() if c == "D02BOB"]
                return (group[0], carol[0], line[0], bob[0]) if group and carol and line and bob else None
            await tg.wait_for(found, timeout=10)
            where = found()
            assert where is not None
            group, carol, line, bob = where
            assert b.tg_keyboard(group) == ["apv:1:1", "rej:1:1"] and b.tg_keyboard(carol, 333333) == [
                "apv:1:1", "rej:1:1"]
            await b.tap("apv:1:1", carol, user=333333, chat=333333)  # Carol approves in her private chat
            await h.bot.runbooks.idle()

            def redrawn() -> bool:
                return (all("Carol approved running Restart web: it runs now" in tg.messages[(c, m)]["text"]
                            and not tg.messages[(c, m)].get("reply_markup") for c, m in ((GROUP, group), (333333, carol)))
                        and all("Carol approved running Restart web: it runs now" in slack.messages[(c, t)]["text"]
                                and not buttons(slack.messages[(c, t)]) for c, t in (("C0OPS", line), ("D02BOB", bob))))
            for _ in range(50):
                if redrawn():
                    break
                h.clock.advance(timedelta(seconds=1))
                h.bot.outbox.nudge()
                await asyncio.sleep(0.2)
            assert redrawn(), (json.dumps([tg.messages[(GROUP, group)], tg.messages[(333333, carol)]]),
                               slack.messages[("C0OPS", line)]["text"], slack.messages[("D02BOB", bob)]["text"])
            assert "record.py" in tg.messages[(GROUP, group)]["text"]


async def test_a_request_made_before_the_card_reached_the_channel_follows_the_card_into_its_thread(
        slack: Slack) -> None:
    """Slack refused the card for a while (503); a runbook asked for meanwhile was folded into the card's first post,
    which does not draw it: the request line, with its Approve / Reject, never reached the channel, and its row
    was marked sent. It is the thread's story, as an escalation line is: it follows the card."""
    s = slack
    s.fake.fail("chat.postMessage", "internal_error", status=503, times=2)
    status, _, _ = await s.h.post("am", nasty_alert())
    assert status == 200
    await s.fake.wait_for(lambda: [c for c in s.fake.calls if c.method == "chat.postMessage"], timeout=5)  # refused
    asking = await s.command("/incident", "runbook 1 restart")

    def line() -> list[dict[str, Any]]:
        return [m for (c, _), m in s.fake.messages.items() if c == "C0OPS" and m.get("thread_ts") and ASKED in m["text"]]
    for _ in range(120):
        if line():
            break
        s.h.clock.advance(timedelta(seconds=1))
        s.h.bot.outbox.nudge()
        await asyncio.sleep(0.05)
    [request] = line()
    assert buttons(request) == ["apv:1:1", "rej:1:1"], request
    assert "runs once an approver" in (await s.answer(asking))["text"]
