"""Button clicks under an alert stream: how fast Slack gets its answer, the clicker the ephemeral
reply, and the channel the redrawn message.

    python bench/click_latency.py [--clicks 200] [--rate 500] [--seconds 20] [--targets 8] [--noise-incidents 100]

Starts a fake Slack Web API in this process (tests/fake_slack.py, with its rate limit off: only the
bot's own budgets, handlers/outbox.py BUDGETS, pace its calls) and the real bot (`chatops serve`,
SQLite in a temporary folder) as a subprocess on 127.0.0.1. Opens --targets incidents in #ops and
waits for their parent messages. Then, for --seconds:

  background  a separate process sends generic alerts at --rate/s (paced, open loop, one alert per
              request) to --noise-incidents other incidents, routed to #noise; its own process, so
              its work does not delay this process's clock readings
  clicks      --clicks signed block_actions requests, evenly spaced, as Slack sends them to
              POST /slack/events (the payload of tests/fixtures/slack/block_actions.json carrying the
              clicked message as it is in the fake, a response_url pointing at the fake); click j
              hits target j % T with Acknowledge, Escalate, Resolve, Reopen in turn

and measures, from the moment each click is sent: the HTTP answer (Slack wants it within 3 s; target
p99 <= 100 ms), the ephemeral answer arriving at the response_url, the chat.update that shows the new
state arriving at the fake, and the click's thread line ("Acknowledged by Alice"). After the last click
it waits up to --settle seconds for updates and lines still queued. The bot's budgets pace the last two:
chat.update 50/min for the whole workspace, shared with the redraws the alerts cause, and thread lines
1/s per channel, so 10 clicks/s outrun their lines by design (the table says how many arrived). Exit 1 if a click got anything
but 200 or no ephemeral answer; the temporary folder is then kept and the bot's log tail printed.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402

from slackbench import (BotProcess, Sent, TimedSlack, bot_config, clean_up, click_body, committed, free_port,  # noqa: E402
                        incident_messages, incidents, load_process, ms, outbox_counts, pct, pending_by_incident,
                        post, signed_alert, slack_headers, start_bot, state_shown, table)

SOURCE = "load"
OPS, NOISE = "C0OPS", "C0NOISE"
CYCLE = [("ack", "Acknowledged", "Acknowledged"), ("esc", "Escalated", "Acknowledged"),
         ("res", "Resolved", "Resolved"), ("reo", "Reopened", "Firing")]  # action, reply verb, state shown after
LINE = re.compile(r"^(Acknowledged|Escalated|Resolved|Reopened) by Alice")
PROGRESS_EVERY = 5.0


@dataclass
class Click:
    n: int
    incident: int
    ts: str
    action: str
    verb: str
    state: str
    key: str
    sent: float = 0.0
    answered: float | None = None  # the HTTP response
    status: str = ""
    reply_at: float | None = None  # the ephemeral answer at the response_url
    reply: str = ""
    update_at: float | None = None  # the chat.update that shows this state (or a later click's)
    line_at: float | None = None  # its thread line

    @property
    def changed(self) -> bool:
        return self.reply == f"{self.verb} #{self.incident}."


def since(c: Click, at: float | None) -> float:
    return float("inf") if at is None else at - c.sent


async def open_targets(bot: BotProcess, slack: TimedSlack, count: int) -> dict[int, str]:
    """Open `count` incidents in #ops; incident id -> its parent message's ts, once posted."""
    ids: list[int] = []
    res = Sent()
    async with aiohttp.ClientSession() as session:
        for i in range(count):
            body = await post(session, f"{bot.url}/alerts/{SOURCE}", signed_alert(
                {"asset_name": f"click-target-{i:02d}", "signature": "DiskFull", "severity": "critical",
                 "message": f"disk 95% full on click-target-{i:02d}", "tool_source": "setup"}), res)
            if res.ok != i + 1 or not body:
                raise SystemExit(f"opening target incident {i} failed: {res.errors} {body}")
            ids.append(body["results"][0]["incident"])
    deadline = time.perf_counter() + 60
    while True:
        posted = {i: ts for (i, ch), (chat, ts) in incident_messages(bot.db).items() if ch == "ops"}
        if all(i in posted and (OPS, posted[i]) in slack.messages for i in ids):
            return {i: posted[i] for i in ids}
        if time.perf_counter() > deadline:
            raise SystemExit(f"the target incidents' messages were not posted within 60 s ({len(posted)}/{count})")
        await asyncio.sleep(0.1)


def match_updates(clicks: list[Click], slack: TimedSlack) -> None:
    """Each click's update: the first chat.update of its message arriving after the click committed (its
    ephemeral answer is sent after the commit) that shows its state or that of a later click on it."""
    by_ts: dict[str, list[tuple[float, str | None]]] = {}
    for c in slack.updates():
        if c.params.get("channel") == OPS:
            by_ts.setdefault(c.params.get("ts"), []).append((c.at, state_shown(c.params)))
    lines: dict[str, list[float]] = {}
    for c in slack.thread_posts():
        if c.params.get("channel") == OPS and LINE.match(str(c.params.get("text", ""))):
            lines.setdefault(c.params.get("thread_ts"), []).append(c.at)
    per_incident: dict[int, list[Click]] = {}
    for c in sorted(clicks, key=lambda c: c.sent):
        per_incident.setdefault(c.incident, []).append(c)
    for mine in per_incident.values():
        changed = [c for c in mine if c.changed]
        for c, at in zip(changed, sorted(lines.get(mine[0].ts, []))):
            c.line_at = at
        for k, c in enumerate(changed):
            after = c.reply_at if c.reply_at is not None else c.answered
            if after is None:
                continue
            for at, state in sorted(by_ts.get(c.ts, [])):
                if at <= after:
                    continue
                ok = {x.state for x in changed[k:] if x.sent <= at}
                if state in ok:
                    c.update_at = at
                    break


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clicks", type=int, default=200)
    parser.add_argument("--rate", type=float, default=500.0, help="background alerts per second (0: none)")
    parser.add_argument("--seconds", type=float, default=20.0, help="how long the clicks and the alert stream last")
    parser.add_argument("--targets", type=int, default=8, help="incidents that are clicked")
    parser.add_argument("--noise-incidents", type=int, default=100, help="incidents the background alerts go to")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds to wait after the last click for updates")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (bot log, SQLite) even on success")
    args = parser.parse_args()
    if args.clicks < 1 or args.targets < 1 or args.seconds <= 0 or args.noise_incidents < 1:
        parser.error("--clicks, --targets, --noise-incidents and --seconds must be positive")
    tmp = Path(tempfile.mkdtemp(prefix="chatops-clicks-"))
    bot: BotProcess | None = None
    loader: Any = None
    ok = False
    try:
        async with TimedSlack(rate_limit=False) as slack:
            port = free_port()
            routes = [{"match": {"team": "noise"}, "channels": ["noise"]}, {"match": {}, "channels": ["ops"]}]
            config = bot_config(tmp, port, slack, channels=[("ops", OPS), ("noise", NOISE)], routes=routes, source=SOURCE)
            bot = await start_bot(tmp, config, port)
            print(f"{args.clicks} clicks on {args.targets} incidents over {args.seconds:g} s while "
                  f"{args.rate:,.0f} alerts/s go to {args.noise_incidents} other incidents; fake Slack unlimited "
                  f"(the bot's own budgets apply)\nbot log and SQLite in {tmp}", flush=True)
            started = time.perf_counter()
            targets = await open_targets(bot, slack, args.targets)
            print(f"  {len(targets)} target incidents posted in #ops after {time.perf_counter() - started:.1f} s", flush=True)

            ctx = mp.get_context("spawn")
            ready, go, results = ctx.Event(), ctx.Event(), ctx.Queue()
            progress = ctx.Array("i", 3, lock=False)
            if args.rate > 0:
                assets = [f"noise-{k:03d}" for k in range(args.noise_incidents)]
                loader = ctx.Process(target=load_process, daemon=True, args=(
                    f"{bot.url}/alerts/{SOURCE}", args.rate, args.seconds, assets, {"team": "noise"},
                    ready, go, progress, results))
                loader.start()
                if not await asyncio.to_thread(ready.wait, 120):
                    raise SystemExit("the background alert sender did not get ready within 120 s")

            ids = list(targets)
            clicks = [Click(j, ids[j % len(ids)], targets[ids[j % len(ids)]], *CYCLE[(j // len(ids)) % 4], key=f"c{j}")
                      for j in range(args.clicks)]
            connector = aiohttp.TCPConnector(limit=16, keepalive_timeout=60)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
                async with session.get(f"{bot.url}/healthz") as r:  # a warm connection, as Slack's would be
                    await r.read()
                url = f"{bot.url}/slack/events"

                async def click(c: Click) -> None:
                    body = click_body(c.action, c.incident, OPS, slack.messages[(OPS, c.ts)], slack.response_url(c.key),
                                      f"{int(time.time())}.{c.n:06d}")
                    headers = slack_headers(body)
                    c.sent = time.perf_counter()
                    try:
                        async with session.post(url, data=body, headers=headers) as r:
                            await r.read()
                            c.status = str(r.status)
                    except Exception as exc:  # noqa: BLE001 - a failed click is a figure, not a crash
                        c.status = type(exc).__name__
                    c.answered = time.perf_counter()

                def line(label: str) -> None:
                    t = time.perf_counter() - t0
                    done = [c.answered - c.sent for c in clicks if c.answered is not None]
                    replies = sum(1 for c in clicks if slack.response_at.get(c.key))
                    updates = sum(1 for c in slack.updates() if c.params.get("channel") == OPS)
                    pending = outbox_counts(bot.db).get("pending", 0)
                    print(f"  {label} {t:5.1f}s: clicks {len(done)}/{args.clicks} answered, HTTP p99 {ms(pct(done, 0.99))} ms; "
                          f"ephemeral replies {replies}; #ops updates {updates}; alerts {progress[1]:,} ok "
                          f"({progress[1] / t if t else 0:,.0f}/s), {progress[2]} failed; outbox pending {pending:,}",
                          flush=True)

                async def ticker() -> None:
                    while True:
                        await asyncio.sleep(PROGRESS_EVERY)
                        line("t=")

                go.set()
                t0 = time.perf_counter()
                tick = asyncio.create_task(ticker())
                tasks = []
                for c in clicks:
                    due = t0 + c.n * args.seconds / args.clicks
                    if (wait := due - time.perf_counter()) > 0:
                        await asyncio.sleep(wait)
                    tasks.append(asyncio.create_task(click(c)))
                await asyncio.gather(*tasks)
                last_click = time.perf_counter()
                waiting_load = (asyncio.create_task(asyncio.to_thread(results.get, True, args.seconds + 120))
                                if loader is not None else None)

                def collect() -> bool:
                    """Take in what arrived; True when every answer, update and thread line is there."""
                    for c in clicks:
                        if c.reply_at is None and slack.response_at.get(c.key):
                            c.reply_at, c.reply = slack.response_at[c.key][0], str(slack.responses[c.key][0].get("text", ""))
                    match_updates(clicks, slack)
                    changed = [c for c in clicks if c.changed]
                    return all(c.reply_at for c in clicks) and all(c.update_at and c.line_at for c in changed)

                # settle: ephemeral answers, then updates and thread lines still queued (the alert stream
                # may still be draining meanwhile)
                while time.perf_counter() < last_click + args.settle and not collect():
                    await asyncio.sleep(0.2)
                collect()
                settled = time.perf_counter() - last_click

            load: dict[str, Any] | None = None
            if waiting_load is not None:
                load = await waiting_load
                loader.join(10)
            tick.cancel()
            line("end")

            # -- figures ------------------------------------------------------------------------------
            changed = [c for c in clicks if c.changed]
            http = [since(c, c.answered) for c in clicks]
            rows = []
            for label, xs, of in [("HTTP response to POST /slack/events", http, clicks),
                                  ("ephemeral answer at the response_url", [since(c, c.reply_at) for c in clicks], clicks),
                                  ("chat.update showing the new state", [since(c, c.update_at) for c in changed], changed),
                                  ("thread line (\"Acknowledged by Alice\")", [since(c, c.line_at) for c in changed], changed)]:
                arrived = sum(1 for x in xs if x != float("inf"))
                rows.append([label, f"{arrived}/{len(of)}", ms(pct(xs, 0.5)), ms(pct(xs, 0.99)), ms(max(xs, default=float("nan")))])
            print(f"\nclicks: {len(clicks)} sent, {len(changed)} changed their incident; waited {settled:.1f} s after the "
                  "last one for what was still queued")
            print(table(["from sending the click to", "arrived", "p50 ms", "p99 ms", "max ms"], rows))
            p99 = pct(http, 0.99)
            print(f"  HTTP p99 {ms(p99)} ms (target <= 100 ms: {'met' if p99 <= 0.1 else 'NOT met'})")
            by_action = []
            for action, verb, _ in CYCLE:
                mine = [c for c in clicks if c.action == action]
                upd = [since(c, c.update_at) for c in mine if c.changed]
                by_action.append([verb, len(mine), sum(1 for c in mine if c.changed), ms(pct([since(c, c.answered) for c in mine], 0.99)),
                                  ms(pct([since(c, c.reply_at) for c in mine], 0.99)), ms(pct(upd, 0.5)) if upd else "-"])
            print("\n" + table(["click", "sent", "changed", "HTTP p99 ms", "answer p99 ms", "update p50 ms"], by_action))

            if load is not None:
                print(f"\nbackground alerts: {load['sent']:,} sent at {args.rate:,.0f}/s target over {load['sending_seconds']:.1f} s; "
                      f"{load['ok']:,} answered 200 = {load['ok'] / load['elapsed'] if load['elapsed'] else 0:,.0f}/s achieved "
                      f"(until the last answer, {load['elapsed']:.1f} s); latency from each alert's due time "
                      f"p50 {ms(load['p50'])} ms, p99 {ms(load['p99'])} ms, max {ms(load['max'])} ms; errors: {load['errors']}")
                in_alerts, _ = committed(bot.db)
                print(f"  committed so far: {in_alerts - len(targets):,} of them (alerts.received_count sum, "
                      "including any whose sender gave up waiting)")
            print("\n" + table(*slack.call_table()))
            print(f"  response_url posts: {sum(len(v) for v in slack.response_at.values())}")

            db_state = {i["id"]: i["status"] for i in incidents(bot.db)}
            shown = {"triggered": "Firing", "acknowledged": "Acknowledged", "resolved": "Resolved"}
            pending = pending_by_incident(bot.db)
            agree = [i for i, ts in targets.items() if state_shown(slack.messages[(OPS, ts)]) == shown.get(db_state.get(i, ""))]
            waiting = sum(pending.get(i, 0) for i in targets)
            print(f"  target messages showing their incident's state now: {len(agree)}/{len(targets)}"
                  + (f" ({waiting} outbox rows for them still pending)" if waiting else ""))
            print(f"  outbox at the end: {dict(outbox_counts(bot.db))}")

            bad = [c for c in clicks if c.status != "200"]
            unanswered = [c for c in clicks if c.reply_at is None]
            refused = [c for c in clicks if c.reply_at is not None and not c.changed]
            if refused:
                print(f"  {len(refused)} click(s) refused, e.g. #{refused[0].incident} {refused[0].action}: {refused[0].reply!r}")
            if bad:
                print(f"FAILED: {len(bad)} click(s) answered other than 200: "
                      + ", ".join(sorted({c.status for c in bad})))
            if unanswered:
                print(f"FAILED: {len(unanswered)} click(s) got no ephemeral answer within {settled:.0f} s")
            ok = not bad and not unanswered
            return 0 if ok else 1
    finally:
        if loader is not None and loader.is_alive():
            loader.terminate()
            loader.join(5)
        clean_up(tmp, ok=ok, keep=args.keep, bot=bot)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
