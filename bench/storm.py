"""An alert storm against Slack's rate limits: how many chat calls, how many 429s, how long until the
channel shows the truth.

    python bench/storm.py [--alerts N] [--incidents K] [--channels C] [--concurrency W] [--real-limits]

Starts a fake Slack Web API in this process (tests/fake_slack.py: chat.postMessage limited to 1/s per
channel with a burst of 3, HTTP 429 + Retry-After beyond; --real-limits also holds chat.update to
Slack's Tier 3, 50/min with a burst of 10, and chat.postEphemeral to Tier 4) and the real bot
(`chatops serve`, SQLite in a temporary folder) as a subprocess on 127.0.0.1. Then sends N generic
alerts as fast as W connections allow: K incidents (alert i belongs to incident i % K: same
asset_name and signature, a different tool_source for each alert, so every alert is a distinct alert
of its incident), incident j routed to channel j % C.

Waits until every incident's parent message in the fake shows its final alert count ("100 alerts
from storm") and the bot's outbox has nothing pending, which includes the "N new alerts" thread lines:
those wait 30 s to coalesce (handlers/intake.py THREAD_LINE_DELAY), so the end is at least 30 s after
the last alert that arrived once a parent was posted. Prints the calls by method, 429s, the timeline,
and checks: K parent posts, every alert committed, no dead letters, and that each incident's first post
plus its "N new alerts" lines add up to its alerts (nothing lost, nothing counted twice).
Exit 1 if a check fails; the temporary folder is then kept and the bot's log tail printed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import aiohttp  # noqa: E402

from slackbench import (NEW_ALERTS, SLACK_TIERS, BotProcess, Sent, TimedSlack, alerts_shown, bot_config, clean_up,  # noqa: E402
                        committed, free_port, incident_messages, incidents, instance_shown,
                        outbox_counts, post, secs, signed_alert, start_bot, table)

SOURCE = "storm"
PROGRESS_EVERY = 3.0


def asset(j: int) -> str:
    return f"storm-app-{j:03d}"


def storm_alert(i: int, k: int, channels: int) -> dict[str, Any]:
    j = i % k
    return {"asset_name": asset(j), "signature": "HighLatency", "severity": "high",
            "message": f"p99 latency above 2s (storm alert {i})", "tool_source": f"probe-{i}",
            "labels": {"team": f"t{j % channels}"}}


class Watch:
    """What the fake Slack shows, read from its call log and its current messages."""

    def __init__(self, slack: TimedSlack, expected: dict[str, int], t0: float):
        self.slack, self.expected, self.t0 = slack, expected, t0

    def parents(self) -> dict[str, list[Any]]:
        """asset -> its successful parent posts (more than one would be a duplicate parent)."""
        out: dict[str, list[Any]] = defaultdict(list)
        for c in self.slack.parent_posts():
            out[instance_shown(c.params) or "?"].append(c)
        return out

    def final_now(self) -> int:
        """How many incidents' parent messages show their final count now."""
        shown = {}
        for (chat, ts), m in self.slack.messages.items():
            if not m.get("thread_ts"):
                shown[instance_shown(m) or "?"] = alerts_shown(m)
        return sum(1 for a, n in self.expected.items() if shown.get(a) == n)

    def final_since(self) -> dict[str, float | None]:
        """asset -> when (s after t0) its message started showing the final count for good (None: not yet)."""
        out: dict[str, float | None] = {}
        for a, calls in self.parents().items():
            if a not in self.expected or not calls:
                continue
            post = calls[0]
            key = (post.params.get("channel"), post.ts)
            history = [post] + [c for c in self.slack.updates() if (c.params.get("channel"), c.params.get("ts")) == key]
            since = None
            for c in sorted(history, key=lambda c: c.at):
                if alerts_shown(c.params) == self.expected[a]:
                    since = c.at if since is None else since
                else:
                    since = None
            out[a] = None if since is None else since - self.t0
        return out

    def accounting(self) -> dict[str, tuple[int, int, int]]:
        """asset -> (count in the first post, sum of its "N new alerts" lines, final count)."""
        threads: dict[tuple[str, str], int] = Counter()
        for c in self.slack.thread_posts():
            m = NEW_ALERTS.match(str(c.params.get("text", "")).strip())
            if m:
                threads[(c.params.get("channel"), c.params.get("thread_ts"))] += int(m.group(1))
        out = {}
        for a, calls in self.parents().items():
            if a in self.expected and calls:
                post = calls[0]
                out[a] = (alerts_shown(post.params) or 0, threads[(post.params.get("channel"), post.ts)], self.expected[a])
        return out


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--alerts", type=int, default=2000)
    parser.add_argument("--incidents", type=int, default=20)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=8, help="connections the alerts are sent over")
    parser.add_argument("--real-limits", action="store_true",
                        help="also limit chat.update (Tier 3: 50/min, burst 10) and chat.postEphemeral in the fake")
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds to wait for the final state")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (bot log, SQLite) even on success")
    args = parser.parse_args()
    n, k, nch = args.alerts, min(args.incidents, args.alerts), args.channels
    if n < 1 or k < 1 or nch < 1:
        parser.error("--alerts, --incidents and --channels must be at least 1")
    expected = {asset(j): n // k + (1 if j < n % k else 0) for j in range(k)}
    tmp = Path(tempfile.mkdtemp(prefix="chatops-storm-"))
    bot: BotProcess | None = None
    ok = False
    try:
        limits = SLACK_TIERS if args.real_limits else None
        async with TimedSlack(per_second=1.0, burst=3, method_limits=limits) as slack:
            channels = [(f"ops{c}", f"C0STORM{c}") for c in range(nch)]
            routes = ([{"match": {"team": f"t{c}"}, "channels": [f"ops{c}"]} for c in range(1, nch)]
                      + [{"match": {}, "channels": ["ops0"]}])
            port = free_port()
            bot = await start_bot(tmp, bot_config(tmp, port, slack, channels=channels, routes=routes, source=SOURCE), port)
            limit_note = ("chat.postMessage 1/s per channel (burst 3); chat.update 50/min (burst 10), "
                          "chat.postEphemeral 100/min" if args.real_limits else
                          "chat.postMessage 1/s per channel (burst 3); other methods unlimited")
            print(f"{n:,} alerts over {k} incidents in {nch} channel(s), {args.concurrency} connections; "
                  f"fake Slack limits: {limit_note}\nbot log and SQLite in {tmp}", flush=True)
            reqs = [signed_alert(storm_alert(i, k, nch)) for i in range(n)]
            url = f"{bot.url}/alerts/{SOURCE}"
            res = Sent()
            connector = aiohttp.TCPConnector(limit=args.concurrency, keepalive_timeout=60)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
                async with session.get(f"{bot.url}/healthz") as r:  # connections up before the clock starts
                    await r.read()
                t0 = time.perf_counter()
                watch = Watch(slack, expected, t0)
                pending: list[int] = [-1]

                def line(label: str) -> None:
                    t = time.perf_counter() - t0
                    fails = sum(1 for c in slack.calls if c.status == 429)
                    print(f"  {label} {t:5.1f}s: alerts {res.ok:,}/{n:,} ok; parents {len(watch.parents())}/{k}; "
                          f"final {watch.final_now()}/{k}; updates {len(slack.updates())}; "
                          f"thread lines {len(slack.thread_posts())}; 429s {fails}; "
                          f"outbox pending {pending[0] if pending[0] >= 0 else '?'}", flush=True)

                async def progress() -> None:
                    while True:
                        await asyncio.sleep(PROGRESS_EVERY)
                        pending[0] = outbox_counts(bot.db).get("pending", 0)
                        line("t=")

                ticker = asyncio.create_task(progress())
                it = iter(reqs)

                async def worker() -> None:
                    for req in it:
                        await post(session, url, req, res)

                await asyncio.gather(*(worker() for _ in range(args.concurrency)))
            sent_s = (res.last_done or t0) - t0
            print(f"  sent {res.sent:,} alerts in {sent_s:.2f} s ({res.ok / sent_s if sent_s else 0:,.0f}/s ok, "
                  f"errors: {res.errors}); waiting for the final state", flush=True)

            deadline = time.perf_counter() + args.timeout
            empty_at: float | None = None
            last_db = 0.0
            while True:
                now = time.perf_counter()
                if now - last_db >= 0.5:
                    last_db = now
                    pending[0] = outbox_counts(bot.db).get("pending", 0)
                if watch.final_now() == k and pending[0] == 0:
                    empty_at = now - t0
                    break
                if now > deadline:
                    break
                await asyncio.sleep(0.1)
            ticker.cancel()
            line("end")

            # -- figures ------------------------------------------------------------------------------
            calls = slack.calls
            last = lambda cs: max((c.at for c in cs), default=None)  # noqa: E731
            parents = watch.parents()
            first_posts = sorted(c[0].at for c in parents.values())
            finals = watch.final_since()
            final_at = max((v for v in finals.values() if v is not None), default=None)
            all_final = len(finals) == k and all(v is not None for v in finals.values()) and watch.final_now() == k
            thread_at = last(slack.thread_posts())
            counts = outbox_counts(bot.db)
            in_alerts, in_audit = committed(bot.db)
            incs = incidents(bot.db)
            posted = incident_messages(bot.db)
            cli = bot.outbox_cli()

            print(f"\nalerts: {res.sent:,} sent in {sent_s:.2f} s over {args.concurrency} connections "
                  f"({res.ok / sent_s if sent_s else 0:,.0f}/s), {res.ok:,} answered 200, errors: {res.errors}")
            print("\n" + table(*slack.call_table()))
            n429 = sum(1 for c in calls if c.status == 429)
            print(f"  {len(calls)} calls for {n:,} alerts in {k} incidents ({len(calls) / k:.1f} per incident); "
                  f"{n429} answered 429")
            if nch > 1:
                rows = []
                for cid, chat in channels:
                    mine = [c for c in calls if c.params.get("channel") == chat]
                    rows.append([chat, sum(1 for c in mine if c.method == "chat.postMessage" and not c.params.get("thread_ts") and c.ok),
                                 sum(1 for c in mine if c.method == "chat.postMessage" and c.params.get("thread_ts") and c.ok),
                                 sum(1 for c in mine if c.method == "chat.update" and c.ok),
                                 sum(1 for c in mine if c.status == 429)])
                print("\n" + table(["channel", "parents", "thread replies", "updates", "429s"], rows))

            rel = lambda t: None if t is None else t - t0  # noqa: E731
            timeline = [
                ["last alert answered (200)", secs(sent_s)],
                ["first parent posted", secs(rel(first_posts[0]) if first_posts else None)],
                [f"all {k} parents posted", secs(rel(first_posts[-1]) if len(first_posts) >= k else None)],
                ["every parent shows its final count", secs(final_at) if all_final else "never"],
                ['last "N new alerts" thread line', secs(rel(thread_at)) if thread_at else "none sent"],
                ["last Slack call of any kind", secs(rel(last(calls)))],
                ["outbox empty (nothing pending)", secs(empty_at) if empty_at is not None else "never"],
            ]
            print("\n" + table(["seconds after the first alert", "s"], timeline))
            print('  ("outbox empty" includes the 30 s that "N new alerts" lines wait to coalesce)')

            acc = watch.accounting()
            exact = sum(1 for f, t, e in acc.values() if f + t == e)
            over = {a: v for a, v in acc.items() if v[0] + v[1] > v[2]}
            under = {a: v for a, v in acc.items() if v[0] + v[1] < v[2]}
            dupes = {a: len(cs) for a, cs in parents.items() if len(cs) > 1}
            want_counts = sorted(expected.values())
            got_counts = sorted(i["alert_count"] for i in incs)
            checks = [
                [f"parent posts == {k}", sum(len(cs) for cs in parents.values()),
                 sum(len(cs) for cs in parents.values()) == k and not dupes],
                [f"incident messages recorded == {k}", len(posted), len(posted) == k],
                [f"alerts answered 200 == {n:,}", res.ok, res.ok == n],
                [f"alerts committed == {n:,} (received_count sum)", in_alerts, in_alerts == n],
                [f"alert.received audit events == {n:,}", in_audit, in_audit == n],
                [f"incidents == {k}, alert counts as sent", f"{len(incs)}", len(incs) == k and got_counts == want_counts],
                ["every parent shows its final count", f"{watch.final_now()}/{k}", all_final],
                ["outbox pending == 0", counts.get("pending", 0), counts.get("pending", 0) == 0],
                ["outbox dead letters == 0", counts.get("dead", 0), counts.get("dead", 0) == 0],
            ]
            print("\n" + table(["check", "got", "result"], [[c, g, "ok" if r else "FAILED"] for c, g, r in checks]))
            if counts.get("pending", 0):
                print(f'\n  first post + "N new alerts" lines == alerts: not checked, {counts["pending"]} outbox rows pending')
            else:
                print(f'\n  first post + "N new alerts" lines == alerts: {exact}/{len(acc)} incidents'
                      + (f"; over-counted {len(over)}" if over else "") + (f"; under-counted {len(under)}" if under else ""))
                for a, (f, t, e) in sorted({**over, **under}.items())[:10]:
                    print(f"    {a}: first post showed {f}, thread lines added {t}, has {e}")
            if dupes:
                print(f"  duplicate parent posts: {dupes}")
            print(f"  chatops outbox list --status pending: {cli.splitlines()[-1] if cli else '(no output)'}")
            ok = all(r for _, _, r in checks)
            if not ok:
                behind = sorted((instance_shown(m) or "?", alerts_shown(m)) for m in slack.messages.values()
                                if not m.get("thread_ts") and alerts_shown(m) != expected.get(instance_shown(m) or ""))
                unposted = sorted(set(expected) - set(parents))
                for a, shown in behind[:5]:
                    print(f"    {a}: its message shows {shown} alerts of {expected.get(a, '?')}")
                if unposted:
                    print(f"    no parent message yet for {len(unposted)}: {', '.join(unposted[:5])}{' ...' if len(unposted) > 5 else ''}")
            return 0 if ok else 1
    finally:
        clean_up(tmp, ok=ok, keep=args.keep, bot=bot)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
