"""Prometheus metrics: one holder of metric objects with its own registry, served at /metrics."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)

from eventsync import __version__

# Every exposed name starts with this, so dashboards can select `{__name__=~"eventsync_.*"}`
# and nothing clashes with other exporters scraped into the same Prometheus.
NAMESPACE = "eventsync"

# Fixed label values, pre-created so their series exist (at 0) before the first event:
# rate() and alerts on a series that appears only with its first increment miss that increment.
WEBHOOK_OUTCOMES = ("accepted", "rejected")
WEBHOOK_REJECT_REASONS = ("bad_secret", "bad_json", "content_type", "too_large", "invalid")
EVENT_SOURCES = ("webhook", "audit", "reconcile")
# "paused": put back, attempt not counted, because BookStack rejected the API token.
JOB_OUTCOMES = ("done", "retried", "dead_lettered", "skipped", "paused")

# Webhook received → mirror written. Steady state is well under a second; the long tail
# covers early-webhook re-checks, rate-limit waits and queue backlogs after an outage.
FRESHNESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
# One delivery attempt: a local receiver answers in milliseconds; the top is the timeout.
DELIVERY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    """Every eventsync metric. Owns a private registry, so tests can build as many as they like.

    The attributes are plain prometheus_client objects: callers use `.labels(...)`, `.inc()`,
    `.set()` and `.observe()` directly. Label values must come from small fixed sets (never
    an entity id or a raw URL): each distinct value is a new time series.
    """

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        reg = self.registry
        # The text format exposes each counter's creation time as an extra `*_created` gauge
        # series that no dashboard here uses. The switch is process-wide, but idempotent, and
        # eventsync is the only user of prometheus_client in its process.
        disable_created_metrics()
        ns = NAMESPACE

        self.info = Info("build", "eventsync version.", namespace=ns, registry=reg)
        self.info.info({"version": __version__})

        # ---- ingest ---------------------------------------------------------------------
        self.webhooks_received_total = Counter(
            "webhooks_received",
            "Webhook POSTs received, by outcome.",
            ["outcome"],
            namespace=ns,
            registry=reg,
        )
        self.webhooks_rejected_total = Counter(
            "webhooks_rejected",
            "Webhook POSTs rejected, by reason.",
            ["reason"],
            namespace=ns,
            registry=reg,
        )
        self.events_total = Counter(
            "events",
            "Events stored in the inbox, by BookStack event type and source.",
            ["type", "source"],
            namespace=ns,
            registry=reg,
        )
        self.events_deduplicated_total = Counter(
            "events_deduplicated",
            "Events dropped as duplicates of one already stored or already covered, by source.",
            ["source"],
            namespace=ns,
            registry=reg,
        )

        # ---- queue ----------------------------------------------------------------------
        self.jobs_total = Counter(
            "jobs",
            "Jobs finished by the dispatcher, by outcome.",
            ["outcome"],
            namespace=ns,
            registry=reg,
        )
        self.queue_depth = Gauge(
            "queue_depth", "Jobs waiting or in flight.", namespace=ns, registry=reg
        )
        self.dead_letters = Gauge(
            "dead_letters", "Events in the dead-letter table.", namespace=ns, registry=reg
        )

        # ---- BookStack API --------------------------------------------------------------
        self.api_requests_total = Counter(
            "api_requests",
            "BookStack API requests, by route template (e.g. /api/pages/{id}) and HTTP status "
            "(0 when no response arrived).",
            ["endpoint", "status"],
            namespace=ns,
            registry=reg,
        )
        self.api_rate_limit_waits_total = Counter(
            "api_rate_limit_waits",
            "Times a request waited for the rate limiter or a 429 Retry-After.",
            namespace=ns,
            registry=reg,
        )
        self.api_rate_limit_wait_seconds_total = Counter(
            "api_rate_limit_wait_seconds",
            "Seconds spent waiting for the rate limiter or a 429 Retry-After.",
            namespace=ns,
            registry=reg,
        )
        self.api_retries_total = Counter(
            "api_retries",
            "BookStack API requests retried after a 429, a 5xx or a connection error.",
            namespace=ns,
            registry=reg,
        )

        # ---- audit log, reconciler, sweep -----------------------------------------------
        self.audit_cursor = Gauge(
            "audit_cursor",
            "Highest audit-log activity id stored (the poller's cursor).",
            namespace=ns,
            registry=reg,
        )
        self.audit_lag_seconds = Gauge(
            "audit_lag_seconds",
            "Seconds since the audit log was last read up to its end (grows while polls fail).",
            namespace=ns,
            registry=reg,
        )
        self.last_full_sync_timestamp_seconds = Gauge(
            "last_full_sync_timestamp_seconds",
            "Unix time the last complete diff sync finished.",
            namespace=ns,
            registry=reg,
        )
        self.sweep_progress_ratio = Gauge(
            "sweep_progress_ratio",
            "Share of entities the background sweep has verified in its current cycle (0..1).",
            namespace=ns,
            registry=reg,
        )
        self.sweep_cycle_seconds = Gauge(
            "sweep_cycle_seconds",
            "Duration of the last complete background-sweep cycle, or its estimate.",
            namespace=ns,
            registry=reg,
        )

        # ---- mirror ---------------------------------------------------------------------
        self.mirror_entities = Gauge(
            "mirror_entities",
            "Rows in the mirror, by kind (shelf, book, chapter, page, attachment, user, role).",
            ["kind"],
            namespace=ns,
            registry=reg,
        )
        self.changes_seq = Gauge(
            "changes_seq",
            "Latest change-feed sequence number.",
            namespace=ns,
            registry=reg,
        )
        self.freshness_seconds = Histogram(
            "freshness_seconds",
            "Delay from first hearing of a change (usually a webhook) to writing it to the mirror.",
            buckets=FRESHNESS_BUCKETS,
            namespace=ns,
            registry=reg,
        )

        # ---- outbound delivery and the stream (subscriptions are few and made by the
        # operator: their ids are a small, fixed set of label values) ---------------------
        self.deliveries_total = Counter(
            "deliveries",
            "Delivery attempts to subscriptions, by subscription id and outcome (delivered: "
            "a 2xx; failed: anything else, retried).",
            ["subscription", "outcome"],
            namespace=ns,
            registry=reg,
        )
        self.delivered_changes_total = Counter(
            "delivered_changes",
            "Change-feed rows acknowledged by a subscription.",
            ["subscription"],
            namespace=ns,
            registry=reg,
        )
        self.delivery_seconds = Histogram(
            "delivery_seconds",
            "Duration of one delivery attempt, sending to the receiver's answer.",
            buckets=DELIVERY_BUCKETS,
            namespace=ns,
            registry=reg,
        )
        self.subscription_lag_changes = Gauge(
            "subscription_lag_changes",
            "Change-feed rows after a subscription's cursor (of every kind).",
            ["subscription"],
            namespace=ns,
            registry=reg,
        )
        self.subscription_paused = Gauge(
            "subscription_paused",
            "1 while a subscription is paused (by the operator, or after failing for "
            "EVENTSYNC_SUBSCRIPTION_PAUSE_AFTER), else 0.",
            ["subscription"],
            namespace=ns,
            registry=reg,
        )
        self.subscription_failing_seconds = Gauge(
            "subscription_failing_seconds",
            "Seconds since a subscription's last 2xx, while its deliveries fail; 0 otherwise.",
            ["subscription"],
            namespace=ns,
            registry=reg,
        )
        self.subscription_pauses_total = Counter(
            "subscription_pauses",
            "Subscriptions paused because they kept failing.",
            namespace=ns,
            registry=reg,
        )
        self.stream_clients = Gauge(
            "stream_clients",
            "Open GET /changes/stream connections.",
            namespace=ns,
            registry=reg,
        )

        for outcome in WEBHOOK_OUTCOMES:
            self.webhooks_received_total.labels(outcome=outcome)
        for reason in WEBHOOK_REJECT_REASONS:
            self.webhooks_rejected_total.labels(reason=reason)
        for source in EVENT_SOURCES:
            self.events_deduplicated_total.labels(source=source)
        for outcome in JOB_OUTCOMES:
            self.jobs_total.labels(outcome=outcome)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition of every metric, and its Content-Type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
