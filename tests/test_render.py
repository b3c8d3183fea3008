"""bot.render and templates/: what each platform's message says, and that bad templates are caught."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from bot.render import Renderer, RenderError, chunks, slack_date, slack_escape, slack_facts, slack_link
from bot.view import incident_context, thread_line
from tests.test_view import ALERTS, NOW, make_alert, make_incident

HOSTILE = '</script> & "quotes" \n \\ <!channel> *bold*'


@pytest.fixture
def renderer() -> Renderer:
    return Renderer()


def slack(renderer: Renderer, kind: str = "incident", **over) -> dict:
    ctx = over.pop("ctx", None) or incident_context(make_incident(**over), ALERTS, now=NOW)
    return renderer.render_json(kind, "slack", ctx)


def all_text(payload: dict) -> str:
    return json.dumps(payload, ensure_ascii=False)


@pytest.mark.parametrize(("over", "first"), [
    ({}, "*\U0001f534 Firing \u00b7 Critical \u00b7 #42* Disk full on db-1\nWaiting for someone to acknowledge."),
    ({"status": "acknowledged", "acknowledged_at": NOW - timedelta(minutes=3), "acknowledged_by": "alice"},
     "*\U0001f7e0 Acknowledged \u00b7 Critical \u00b7 #42* Disk full on db-1\nalice is on it."),
    ({"status": "resolved", "firing_count": 0, "resolved_at": NOW, "resolved_by": "source:alertmanager"},
     "*\U0001f7e2 Resolved \u00b7 Critical \u00b7 #42* Disk full on db-1\nResolved after 12 min."),
    ({"silenced": True}, "*\u26aa Silenced \u00b7 Critical \u00b7 #42* Disk full on db-1\nSilenced by a maintenance"),
])
def test_slack_incident_first_block_has_marker_state_severity_id_title_and_next_step(renderer, over, first):
    payload = slack(renderer, **over)
    assert payload["blocks"][0]["type"] == "section"
    assert payload["blocks"][0]["text"]["text"].startswith(first)
    assert payload["text"].startswith(first.split("*")[1])  # the notification says state, severity and #id


def test_slack_incident_facts_latest_and_links(renderer):
    blocks = slack(renderer)["blocks"]
    assert [b["type"] for b in blocks] == ["section", "context", "section", "context"]
    started = int((NOW - timedelta(minutes=12)).timestamp())  # Slack writes it in the reader's zone, kept current
    assert blocks[1]["elements"][0]["text"] == (
        f"service postgres \u00b7 instance db-1:9100 \u00b7 started <!date^{started}^{{ago}} ({{date_short_pretty}} {{time}})"
        "|3 Mar 14:03 UTC> \u00b7 3 alerts from alertmanager and grafana \u00b7 2 of 3 still firing \u00b7 priority 95")
    assert blocks[2]["text"]["text"] == ("*Latest:* Disk 97% full on /var _(showing the last of 3)_\n"
                                         "only 300 MB left")
    assert blocks[3]["elements"][0]["text"] == (
        "<http://prom:9090/graph?g0.expr=disk&amp;g0.tab=1|Graph> \u00b7 <https://wiki.example/disk|Runbook> \u00b7 "
        "<https://grafana.example/d/abc|Dashboard> \u00b7 "
        "<https://grafana.example/alerting/silence/new?matcher=a%3Db|Silence>")


def test_slack_incident_has_no_buttons(renderer):
    payload = slack(renderer)
    assert all(b["type"] != "actions" for b in payload["blocks"])
    assert "ack:42" not in all_text(payload)


def test_hostile_title_and_alert_text_give_valid_escaped_json(renderer):
    alert = make_alert(HOSTILE, received=NOW, annotations={"description": HOSTILE + "\n" + HOSTILE})
    ctx = incident_context(make_incident(title=HOSTILE, labels={"instance": "<i> & \"x\""}), [alert], now=NOW)
    payload = renderer.render_json("incident", "slack", ctx)
    first = payload["blocks"][0]["text"]["text"]
    assert first.startswith('*\U0001f534 Firing \u00b7 Critical \u00b7 #42* &lt;/script&gt; &amp; "quotes" \\ '
                            "&lt;!channel&gt; *bold*\n")
    assert payload["blocks"][1]["elements"][0]["text"].startswith('instance &lt;i&gt; &amp; "x" \u00b7 ')
    detail = payload["blocks"][2]["text"]["text"]
    assert '&lt;/script&gt; &amp; "quotes" \n \\ &lt;!channel&gt;' in detail  # newlines kept in the detail
    for text in (payload["text"], first, detail):
        assert "<" not in text.replace("<http", "") and ">" not in text  # nothing Slack would parse as a link
    assert "&lt;/script&gt;" in payload["text"]


@pytest.mark.parametrize("platform", ["slack", "teams", "telegram"])
def test_bidi_controls_from_an_alert_are_written_out_on_every_platform(renderer, platform):
    """A title holding U+202E (right-to-left override) reversed the card's own words after it on screen: "Disk full
    \u202e" made what followed read backwards. Written out, as tables, the log and a runbook's output do."""
    title = "Disk full \u202eon db-1 \u2066x\u2069"
    ctx = incident_context(make_incident(title=title), [make_alert(title, received=NOW)], now=NOW)
    shown = (json.dumps(renderer.render_json("incident", platform, ctx), ensure_ascii=False) if platform != "telegram"
             else renderer.render_text("incident", platform, ctx))
    assert not any(c in shown for c in "\u202e\u2066\u2069")
    assert "\\u202eon db-1" in shown or "\\\\u202eon db-1" in shown, shown
    line = renderer.render_text("thread", platform, {"line": "Alice paged Bob: \u201c\u202eok\u201d"}
                                ) if platform == "telegram" else json.dumps(renderer.render_json(
                                    "thread", platform, {"line": "Alice paged Bob: \u201c\u202eok\u201d"}))
    assert "\u202e" not in line


def test_the_slack_date_token_survives_escaping_and_text_that_imitates_it_does_not(renderer):
    """The facts line escapes what alerts wrote (an instance label that looks like a date token stays text) and
    leaves the card's own time tokens whole; the acknowledging person's name is escaped before its token."""
    inc = make_incident(labels={"instance": "<!date^1^{time}|x> & <!channel>"}, status="acknowledged",
                        acknowledged_at=NOW - timedelta(minutes=3), acknowledged_by="alice")
    ctx = incident_context(inc, ALERTS, now=NOW, tz="Europe/Berlin", acknowledged_name="<b>Al & Co</b>")
    facts = renderer.render_json("incident", "slack", ctx)["blocks"][1]["elements"][0]["text"]
    started, acked = (int((NOW - timedelta(minutes=m)).timestamp()) for m in (12, 3))
    assert facts.startswith("instance &lt;!date^1^{time}|x&gt; &amp; &lt;!channel&gt; \u00b7 started "
                            f"<!date^{started}^{{ago}} ({{date_short_pretty}} {{time}})|3 Mar 15:03 CET> \u00b7 "), facts
    assert facts.endswith(f" \u00b7 acknowledged by &lt;b&gt;Al &amp; Co&lt;/b&gt;, "
                          f"<!date^{acked}^{{ago}} ({{date_short_pretty}} {{time}})|3 Mar 15:12 CET>"), facts
    assert facts.count("<") == 2  # the two tokens, nothing else Slack would parse
    # Telegram, which cannot write a time for each reader, says when in the bot's zone, named
    html = renderer.render_text("incident", "telegram", ctx)
    assert "started 3 Mar 15:03 CET" in html and "acknowledged by &lt;b&gt;Al &amp; Co&lt;/b&gt;, 3 Mar 15:12 CET" in html


def test_long_alert_text_is_cut_not_refused(renderer):
    huge = "x&" * 5000
    alert = make_alert(huge, received=NOW, annotations={"description": huge, "values": huge})
    payload = renderer.render_json("incident", "slack",
                                   incident_context(make_incident(title=huge), [alert], now=NOW))
    for block in payload["blocks"]:
        text = block.get("text", {}).get("text") or block["elements"][0]["text"]
        assert len(text) <= 3000
        assert not text.rstrip("\u2026").endswith(("&", "&a", "&am", "&amp"))  # no entity cut in half
    assert len(payload["text"]) <= 300


def test_the_latest_alerts_values_are_on_every_platforms_card_escaped(renderer):
    """Grafana's evaluated values, after the latest alert's summary: `Values: B=15234.5, C=1`; what an alert writes
    there is escaped as the rest of the card (Slack mrkdwn, Telegram HTML)."""
    alert = make_alert("Queue depth", received=NOW, annotations={"values": "B=15234.5, C=1 <!channel> & <b>",
                                                                 "description": "orders are waiting"})
    ctx = incident_context(make_incident(), [*ALERTS, alert], now=NOW)
    latest = renderer.render_json("incident", "slack", ctx)["blocks"][2]["text"]["text"]
    assert latest == ("*Latest:* Queue depth _(showing the last of 4)_\n"
                      "*Values:* B=15234.5, C=1 &lt;!channel&gt; &amp; &lt;b&gt;\norders are waiting")
    html = renderer.render_text("incident", "telegram", ctx)
    assert ("<b>Latest:</b> Queue depth <i>(showing the last of 4)</i>\n"
            "<b>Values:</b> B=15234.5, C=1 &lt;!channel&gt; &amp; &lt;b&gt;\norders are waiting\n") in html
    text = renderer.render_text("incident", "generic", ctx).splitlines()
    assert text[3:6] == ["Latest: Queue depth (showing the last of 4)", "Values: B=15234.5, C=1 <!channel> & <b>",
                         "orders are waiting"]
    # An alert without values: no Values line anywhere.
    plain = incident_context(make_incident(), ALERTS, now=NOW)
    assert "Values" not in all_text(renderer.render_json("incident", "slack", plain))
    assert "Values" not in renderer.render_text("incident", "telegram", plain)
    assert "Values" not in renderer.render_text("incident", "generic", plain)


def test_long_links_are_left_out_whole_rather_than_break_the_message(renderer):
    """Five links of 1,900 characters (each `&` an entity of five): as many as fit in one text element."""
    url = "https://grafana.example/d/abc?" + "&".join(f"var-host=h{i}" for i in range(140))
    assert 1800 < len(url) < 2000  # links up to 2,000 characters are kept (bot.view.safe_url)
    kinds = ("generator", "runbook", "dashboard", "panel", "silence")
    incident = make_incident(links={kind: url + f"&n={i}" for i, kind in enumerate(kinds)})
    payload = renderer.render_json("incident", "slack",
                                   incident_context(incident, [make_alert("disk", received=NOW)], now=NOW))
    links = payload["blocks"][-1]["elements"][0]["text"]
    assert len(links) <= 3000
    assert links.count("<https://") == 1 and links.endswith("&amp;n=0|Graph>")  # whole; the second did not fit


def test_long_plain_text_is_split_into_sections(renderer):
    text = "\n".join(f"#{i} some incident & <details>" for i in range(2000))
    payload = renderer.render_json("text", "slack", {"text": text})
    sections = payload["blocks"]
    assert 1 < len(sections) <= 50
    assert all(len(b["text"]["text"]) <= 3000 for b in sections)
    assert sections[0]["text"]["text"].startswith("#0 some incident &amp; &lt;details&gt;\n#1 ")
    assert renderer.render_json("text", "slack", {"text": "Done."}) == {
        "text": "Done.", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": "Done."}}]}


def test_thread_line_on_slack_and_as_plain_text(renderer):
    line = thread_line("alerts.grouped", {"count": 3}, actor_name=None)
    assert renderer.render_json("thread", "slack", {"line": line, "incident_id": 42}) == {
        "text": "3 new alerts", "blocks": [{"type": "context", "elements": [{"type": "mrkdwn", "text": "3 new alerts"}]}]}
    assert renderer.render_text("thread", "telegram", {"line": "Acknowledged by Alice"}) == "Acknowledged by Alice"
    assert renderer.render_json("thread", "slack", {"text": "3 new alerts"})["text"] == "3 new alerts"  # also `text`
    hostile = renderer.render_json("thread", "slack", {"text": "Acknowledged by <!here> & co"})
    assert hostile["text"] == "Acknowledged by &lt;!here&gt; &amp; co"


def test_generic_incident_text(renderer):
    text = renderer.render_text("incident", "generic", incident_context(make_incident(), ALERTS, now=NOW))
    assert text.splitlines() == [
        "\U0001f534 Firing \u00b7 Critical \u00b7 #42 Disk full on db-1",
        "Waiting for someone to acknowledge.",
        "service postgres \u00b7 instance db-1:9100 \u00b7 started 3 Mar 14:03 UTC \u00b7 "
        "3 alerts from alertmanager and grafana \u00b7 2 of 3 still firing \u00b7 priority 95",
        "Latest: Disk 97% full on /var (showing the last of 3)",
        "only 300 MB left",
        "Graph: http://prom:9090/graph?g0.expr=disk&g0.tab=1",
        "Runbook: https://wiki.example/disk",
        "Dashboard: https://grafana.example/d/abc",
        "Silence: https://grafana.example/alerting/silence/new?matcher=a%3Db",
    ]


def test_platform_without_a_template_falls_back_to_generic_text(renderer):
    ctx = incident_context(make_incident(status="resolved", resolved_at=NOW), [], now=NOW)
    text = renderer.render_text("incident", "pager", ctx)
    assert text == renderer.render_text("incident", "generic", ctx)
    assert text.startswith("\U0001f7e2 Resolved \u00b7 Critical \u00b7 #42 Disk full on db-1\nResolved after 12 min.")
    # a JSON platform without the kind's template: generic text, wrapped by the platform's `text` template
    assert renderer.render_json("incident", "pager", ctx) == {"text": text}


def test_kind_with_only_a_generic_template_is_wrapped_for_slack(tmp_path):
    (tmp_path / "help.generic.txt.j2").write_text("Commands: {{ commands | join(', ') }} <all>\n")
    payload = Renderer(tmp_path).render_json("help", "slack", {"commands": ["ack", "oncall"]})
    assert payload["blocks"] == [{"type": "section", "text": {"type": "mrkdwn",
                                                              "text": "Commands: ack, oncall &lt;all&gt;"}}]


def test_override_dir_wins_over_the_built_in_template(tmp_path):
    (tmp_path / "incident.slack.json.j2").write_text(
        '{"text": {{ ("OVERRIDE " ~ ref) | tojson }}, "blocks": [{"type": "divider"}]}')
    ctx = incident_context(make_incident(), ALERTS, now=NOW)
    assert Renderer(tmp_path).render_json("incident", "slack", ctx) == {"text": "OVERRIDE #42",
                                                                        "blocks": [{"type": "divider"}]}
    # kinds the override dir does not have still come from templates/
    assert Renderer(tmp_path).render_json("thread", "slack", {"text": "x"})["text"] == "x"
    assert Renderer(tmp_path).render_text("incident", "generic", ctx).startswith("\U0001f534 Firing")


def test_override_generic_beats_built_in_generic(tmp_path):
    (tmp_path / "thread.generic.txt.j2").write_text("-- {{ text }}")
    assert Renderer(tmp_path).render_text("thread", "pager", {"text": "Reopened by Bob"}) == "-- Reopened by Bob"


@pytest.mark.parametrize(("template", "problem"), [
    ('{"text": "{{ title }}", "blocks": []}', "output is not valid JSON"),  # title has quotes: tojson was forgotten
    ('{"text": "x"}', '"blocks" must be a list'),
    ('{"text": "", "blocks": []}', '"text" must be a non-empty string'),
    ('{"text": "x", "blocks": [{"text": "no type"}]}', 'blocks[0] must be an object with a "type"'),
    ('{"text": "x", "blocks": [{% for i in range(51) %}{"type": "divider"}{{ "," if not loop.last }}{% endfor %}]}',
     "51 blocks; Slack allows 50"),
    ('{"text": "x", "blocks": [{"type": "section", "text": {"type": "mrkdwn", "text": {{ ("y" * 3001) | tojson }}}}]}',
     "blocks[0] (section): text must be a text object with 1 to 3000 characters"),
    ('["not", "an", "object"]', "output must be a JSON object"),
    ('{"text": {{ titel | tojson }}, "blocks": []}', "'titel' is undefined"),
    ('{"text": {{ title | tojson }, "blocks": []}', "line 1:"),
])
def test_broken_override_raises_render_error_naming_the_template(tmp_path, template, problem):
    (tmp_path / "incident.slack.json.j2").write_text(template)
    ctx = incident_context(make_incident(title=HOSTILE), ALERTS, now=NOW)
    with pytest.raises(RenderError) as err:
        Renderer(tmp_path).render_json("incident", "slack", ctx)
    assert err.value.template.startswith(f"incident.slack.json.j2 ({tmp_path / 'incident.slack.json.j2'})")
    assert problem in err.value.problem
    assert str(err.value).startswith("template incident.slack.json.j2 (")


def test_missing_template_raises_render_error(renderer):
    with pytest.raises(RenderError, match=r"nosuch\.generic\.txt\.j2: not found \(tried nosuch\.slack\.json\.j2"):
        renderer.render_json("nosuch", "slack", {})
    with pytest.raises(RenderError, match="not a template kind"):
        renderer.render_text("../../etc/passwd", "slack", {})


def test_html_templates_are_autoescaped_and_text_templates_are_not(tmp_path):
    (tmp_path / "incident.telegram.html.j2").write_text("{{ marker }} <b>{{ ref }} {{ title }}</b>")
    ctx = incident_context(make_incident(title='<script>alert("x")</script> & co'), [], now=NOW)
    html = Renderer(tmp_path).render_text("incident", "telegram", ctx)
    assert html == ("\U0001f534 <b>#42 &lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt; &amp; co</b>")
    text = Renderer(tmp_path).render_text("incident", "generic", ctx)
    assert text.startswith('\U0001f534 Firing \u00b7 Critical \u00b7 #42 <script>alert("x")</script> & co')


def test_times_render_from_the_given_now_only(renderer):
    later = NOW + timedelta(hours=3)
    ctx = incident_context(make_incident(), ALERTS, now=later, tz="America/New_York")
    assert "started 3 Mar 09:03 EST" in renderer.render_text("incident", "slack", ctx)
    day = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)
    ctx = incident_context(make_incident(opened_at=day - timedelta(minutes=30)), [], now=day, tz="America/New_York")
    assert "started 10 Mar 07:30 EDT" in renderer.render_text("incident", "generic", ctx)


def test_slack_escape_and_friends():
    assert slack_escape('a & <b> "c"') == 'a &amp; &lt;b&gt; "c"'
    assert slack_escape("<<<<", 10) == "&lt;&lt;\u2026"
    assert slack_escape("abc", 3) == "abc" and slack_escape(None) == ""
    assert slack_link(("Graph", "https://x/?a=1&b=2|3")) == "<https://x/?a=1&amp;b=2%7C3|Graph>"
    assert chunks("aaa\nbbb\nccc", 7) == ["aaa\nbbb", "ccc"]
    assert chunks("&amp;&amp;", 7) == ["&amp;", "&amp;"]
    assert slack_date(1772546580, "3 Mar <14:03>") == "<!date^1772546580^{ago} ({date_short_pretty} {time})|3 Mar &lt;14:03&gt;>"
    timed = {"text": "started 3 Mar 14:03 UTC", "at": 1772546580, "when": "3 Mar 14:03 UTC"}
    assert slack_facts([{"text": "a" * 10}, timed], 40) == "a" * 10 + " \u2026"  # a token is left out whole
    assert len(chunks("x" * 1000, 10, most=3)) == 3


def test_a_telegram_thread_line_keeps_a_fenced_commands_backticks_as_code(renderer):
    """bot.view.code fences a command that holds a backtick: on Telegram the backticks were taken as spans, dropped,
    and the command shown as plain text while the words around it became code."""
    from bot.view import code

    line = f"Alice asks to run runbook Tick (high risk): {code('sh -c ' + chr(39) + 'echo `hostname` && x' + chr(39))}."
    text = renderer.render_text("thread", "telegram", {"line": line})
    assert "<code>sh -c &#39;echo `hostname` &amp;&amp; x&#39;</code>." in text
    assert text.startswith("Alice asks to run runbook Tick (high risk): <code>")
    assert code("a```b") == "```a`\u200b`\u200b`b```" and code("plain") == "`plain`"


def test_an_alerts_markdown_is_inert_on_a_teams_card_and_in_a_teams_message(renderer):
    """Teams draws markdown: an alert titled "[Silence it here](https://attacker.example/login) **URGENT**" showed a
    link with a label of its own and bold as the card's (Slack's and Telegram's were escaped). It shows as written,
    its markup broken; the bot's own bold and links stay."""
    from adapters.teams import message_activity

    hostile = "[Silence it here](https://attacker.example/login) **URGENT** __x__"
    alert = make_alert(hostile, received=NOW, annotations={"description": hostile})
    ctx = incident_context(make_incident(title=hostile, labels={"instance": hostile}), [alert], now=NOW)
    rendered = renderer.render_json("incident", "teams", ctx)
    card = json.dumps(rendered["body"], ensure_ascii=False)  # ("text" is the notification's plain summary)
    assert "](https://attacker" not in card and "**URGENT" not in card and "__x" not in card
    assert "[Silence it here]\u200b(https://attacker.example/login) *\u200b*URGENT*\u200b* _\u200b_x_\u200b_" in card
    assert "**Latest:**" in card  # the card's own
    assert "](" not in message_activity(rendered, []).summary
    # a message: plain text, which Teams reads no markdown in, as it was written
    line = message_activity({"text": f"3 new alerts: {hostile}"}, [])
    assert (line.text_format, line.text) == ("plain", f"3 new alerts: {hostile}")
    assert message_activity({"text": "Acknowledged #1."}, []).text_format == "markdown"
    # markdown reads nothing inside code: a table or a runbook's output holding `*****` or `__main__` keeps it
    output = "Runbook Deploy finished:\n```\nTASK [web] *****\npython -m app.__main__\n```"
    assert (message_activity({"text": output}, []).text_format, message_activity({"text": output}, []).text) == (
        "markdown", output)
    # ... unless the spans may be read otherwise than split (a backslash before a backtick): all of it decides then
    assert message_activity({"text": "a \\`**b**`"}, []).text_format == "plain"
    # a backtick markdown reads as a backtick: what follows it is no code, and its markup goes out inert (a stray
    # one made the rest pass for code, sent as markdown: bold and a link of its own label)
    for stray in ("don`t **bold** [x](https://evil)", "a `b` c ` **x** [l](https://e)",
                  "foo ``` **bold** [l](https://e)", "````x```` **bold** [l](https://e)",
                  "`a\n\n**bold** [l](https://e)\n\n`", "# x `\n**bold** `", "x ```\n**b**\n```",
                  "```sh\nrm x\n```\n**b**", "[Silence it here][1]\n\n[1]: https://evil"):
        assert message_activity({"text": stray}, []).text_format == "plain", stray
    for fine in ("```sh\nrm **x**\n```\nafter", "run `m.run(**{})` now", "`a` and `b**c`"):
        assert message_activity({"text": fine}, []).text_format == "markdown", fine
    # a line that mentions the channel is markup: its words made inert in markdown instead
    from adapters.teams import mention_channel

    mention_channel(line, "19:ops@thread.tacv2")
    assert line.text_format == "markdown" and line.text.startswith("<at>channel</at> 3 new alerts: [Silence it here]\u200b(")


def test_runs_of_stars_and_underscores_in_an_alert_hold_no_bold_on_teams(renderer):
    """`***Acknowledged by Alice***` became `*\u200b**Acknowledged by Alice*\u200b**`: a `**` pair still, bold as the
    card's own words. Every pair in a run is broken now; a lone star or a snake_case name stays as it came."""
    from bot.render import teams_text

    summary = "***Acknowledged by Alice: no action needed***"
    alert = make_alert(summary, received=NOW, annotations={"summary": summary,
                                                           "description": "___Resolved, ignore this page___"})
    ctx = incident_context(make_incident(title=summary), [alert], now=NOW)
    card = json.dumps(renderer.render_json("incident", "teams", ctx)["body"], ensure_ascii=False)
    assert "Acknowledged by Alice" in card and "ignore this page" in card
    assert "**" not in card.replace("**Latest:**", "").replace("**Values:**", "") and "__" not in card
    assert teams_text("***x***") == "*\u200b*\u200b*x*\u200b*\u200b*"
    assert teams_text("a * b snake_case_name") == "a * b snake_case_name"
