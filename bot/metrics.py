"""Prometheus metrics, one registry per running app (so tests can run several)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.http_requests = Counter(
            "chatops_http_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.audit_events = Counter("chatops_audit_events", "Audit events appended", registry=r)
        self.adapter_up = Gauge("chatops_adapter_up", "1 when a chat adapter is on", ["adapter"], registry=r)
        self.db_up = Gauge("chatops_database_up", "1 when the last readiness check (also run by each scrape) reached the database", registry=r)
        self.request_seconds = Histogram(
            "chatops_http_request_seconds", "Time to answer an HTTP request", ["route"], registry=r,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
        )

        self.alerts_received = Counter(
            "chatops_alerts_received", "Alerts accepted, by source and status", ["source", "status"], registry=r
        )
        self.alert_rejected = Counter(
            "chatops_alert_rejected", "Alert webhook requests refused, by source and reason", ["source", "reason"],
            registry=r,
        )
        self.incidents_open = Gauge(
            "chatops_incidents_open", "Incidents not resolved, by severity (read from the store at scrape time)",
            ["severity"], registry=r,
        )
        self.alerts_truncated = Counter(
            "chatops_alerts_truncated", "Alerts a sender left out of its notifications (truncatedAlerts; raise the "
            "receiver's max_alerts)", ["source"], registry=r,
        )
        self.alerts_unknown_severity = Counter(
            "chatops_alerts_unknown_severity", "Alerts stored whose severity label the bot does not know (taken as "
            "medium; the log names the values)", ["source"], registry=r,
        )
        # (up to 30 s: the store waits 10-15 s for a lock or an answer before intake answers 503)
        self.intake_seconds = Histogram(
            "chatops_intake_seconds", "From request received to committed answer (2xx), alert webhooks", ["source"],
            registry=r, buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )

        self.outbox = Gauge(
            "chatops_outbox", "Chat deliveries by status (read from the store at scrape time)", ["status"], registry=r
        )
        self.leading = Gauge(
            "chatops_leading", "1 where this replica does a job one replica does at a time (outbox: chat delivery and "
            "the pages; telegram-polling), 0 where another does", ["job"], registry=r
        )
        self.outbox_oldest_due = Gauge(
            "chatops_outbox_oldest_due_seconds", "How long the longest-waiting chat delivery has been due, on platforms "
            "that are on (read from the store at scrape time): delivery stuck, or a leader that hangs", registry=r
        )
        self.outbox_dead = Counter(
            "chatops_outbox_dead", "Chat deliveries given up after repeated or permanent failures", ["channel"],
            registry=r,
        )
        self.chat_calls = Counter(
            "chatops_chat_calls", "Calls to chat platforms, by platform, method and outcome",
            ["platform", "method", "outcome"], registry=r,
        )
        self.actions = Counter(
            "chatops_actions", "Clicks and commands handled, by action and outcome", ["action", "outcome"], registry=r
        )

        self.timers_fired = Counter(
            "chatops_timers_fired", "Durable timers run, by kind and outcome (ok, retry, failed)", ["kind", "outcome"],
            registry=r,
        )
        self.timer_lateness = Histogram(
            "chatops_timer_lateness_seconds", "How long after its due time a timer ran", registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 15, 60, 300, 3600),
        )
        self.timers_overdue = Gauge(
            "chatops_timers_overdue", "Timers more than a minute overdue at the last tick (stalled escalations)",
            registry=r,
        )
        self.pages = Counter(
            "chatops_pages", "Direct pages to people, by platform and outcome", ["platform", "outcome"], registry=r
        )
        response_buckets = (30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400)
        self.time_to_acknowledge = Histogram(
            "chatops_time_to_acknowledge_seconds", "From incident opened to acknowledged", ["severity"],
            registry=r, buckets=response_buckets,
        )
        self.time_to_resolve = Histogram(
            "chatops_time_to_resolve_seconds", "From incident opened to resolved", ["severity"],
            registry=r, buckets=response_buckets,
        )

        # Label children by label values, for the per-request paths: labels() takes a lock and builds
        # a key each call. A child stays the metric's until remove()/clear(), which nothing calls.
        self._request_children: dict[tuple[str, int], tuple[Any, Any]] = {}
        self._intake_children: dict[str, Any] = {}
        self._received_children: dict[tuple[str, str], Any] = {}

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """chatops_http_requests{route,status} += 1 and chatops_http_request_seconds{route} observes `seconds`."""
        children = self._request_children.get((route, status))
        if children is None:
            children = self._request_children[(route, status)] = (
                self.http_requests.labels(route, str(status)), self.request_seconds.labels(route))
        children[0].inc()
        children[1].observe(seconds)

    def observe_intake(self, source: str, seconds: float) -> None:
        """chatops_intake_seconds{source} observes `seconds`."""
        child = self._intake_children.get(source)
        if child is None:
            child = self._intake_children[source] = self.intake_seconds.labels(source)
        child.observe(seconds)

    def count_received(self, source: str, status: str, n: int = 1) -> None:
        """chatops_alerts_received{source,status} += n."""
        child = self._received_children.get((source, status))
        if child is None:
            child = self._received_children[(source, status)] = self.alerts_received.labels(source, status)
        child.inc(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
