"""Metrics: the exposition parses back with the expected names, labels and values."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from eventsync import __version__
from eventsync.metrics import (
    EVENT_SOURCES,
    JOB_OUTCOMES,
    WEBHOOK_OUTCOMES,
    WEBHOOK_REJECT_REASONS,
    Metrics,
)

# Family name (as the parser reports it: counters without `_total`) → Prometheus type.
FAMILIES = {
    "eventsync_build_info": "gauge",  # an Info is a gauge of 1 in the text format
    "eventsync_webhooks_received": "counter",
    "eventsync_webhooks_rejected": "counter",
    "eventsync_events": "counter",
    "eventsync_events_deduplicated": "counter",
    "eventsync_jobs": "counter",
    "eventsync_queue_depth": "gauge",
    "eventsync_dead_letters": "gauge",
    "eventsync_api_requests": "counter",
    "eventsync_api_rate_limit_waits": "counter",
    "eventsync_api_rate_limit_wait_seconds": "counter",
    "eventsync_api_retries": "counter",
    "eventsync_audit_cursor": "gauge",
    "eventsync_audit_lag_seconds": "gauge",
    "eventsync_last_full_sync_timestamp_seconds": "gauge",
    "eventsync_sweep_progress_ratio": "gauge",
    "eventsync_sweep_cycle_seconds": "gauge",
    "eventsync_mirror_entities": "gauge",
    "eventsync_changes_seq": "gauge",
    "eventsync_freshness_seconds": "histogram",
    "eventsync_deliveries": "counter",
    "eventsync_delivered_changes": "counter",
    "eventsync_delivery_seconds": "histogram",
    "eventsync_subscription_lag_changes": "gauge",
    "eventsync_subscription_paused": "gauge",
    "eventsync_subscription_failing_seconds": "gauge",
    "eventsync_subscription_pauses": "counter",
    "eventsync_stream_clients": "gauge",
}


def samples(metrics: Metrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    body, _ = metrics.render()
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            assert isinstance(sample, Sample)
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def test_render_exposes_every_family_with_its_type() -> None:
    body, content_type = Metrics().render()
    assert content_type.startswith("text/plain")
    types = {f.name: f.type for f in text_string_to_metric_families(body.decode())}
    assert types == FAMILIES


def test_fixed_label_sets_exist_at_zero_before_any_event() -> None:
    m = Metrics()
    for outcome in WEBHOOK_OUTCOMES:
        assert value(m, "eventsync_webhooks_received_total", outcome=outcome) == 0
    for reason in WEBHOOK_REJECT_REASONS:
        assert value(m, "eventsync_webhooks_rejected_total", reason=reason) == 0
    for source in EVENT_SOURCES:
        assert value(m, "eventsync_events_deduplicated_total", source=source) == 0
    for outcome in JOB_OUTCOMES:
        assert value(m, "eventsync_jobs_total", outcome=outcome) == 0
    assert value(m, "eventsync_build_info", version=__version__) == 1


def test_updates_show_up_with_their_labels() -> None:
    m = Metrics()
    m.webhooks_received_total.labels(outcome="accepted").inc()
    m.webhooks_rejected_total.labels(reason="bad_secret").inc(2)
    m.events_total.labels(type="page_update", source="webhook").inc()
    m.events_total.labels(type="page_update", source="audit").inc(3)
    m.jobs_total.labels(outcome="dead_lettered").inc()
    m.api_requests_total.labels(endpoint="/api/pages/{id}", status="200").inc(5)
    m.api_requests_total.labels(endpoint="/api/pages", status="429").inc()
    m.api_rate_limit_waits_total.inc()
    m.api_rate_limit_wait_seconds_total.inc(1.5)
    m.api_retries_total.inc()
    m.queue_depth.set(7)
    m.dead_letters.set(1)
    m.audit_cursor.set(12345)
    m.audit_lag_seconds.set(2.5)
    m.last_full_sync_timestamp_seconds.set(1_700_000_000)
    m.sweep_progress_ratio.set(0.25)
    m.sweep_cycle_seconds.set(86_400)
    m.mirror_entities.labels(kind="pages").set(200)
    m.changes_seq.set(99)
    m.freshness_seconds.observe(0.3)
    m.freshness_seconds.observe(42)

    got = samples(m)

    def at(name: str, **labels: str) -> float | None:
        return got.get((name, frozenset(labels.items())))

    assert at("eventsync_webhooks_received_total", outcome="accepted") == 1
    assert at("eventsync_webhooks_received_total", outcome="rejected") == 0
    assert at("eventsync_webhooks_rejected_total", reason="bad_secret") == 2
    assert at("eventsync_events_total", type="page_update", source="webhook") == 1
    assert at("eventsync_events_total", type="page_update", source="audit") == 3
    assert at("eventsync_jobs_total", outcome="dead_lettered") == 1
    assert at("eventsync_api_requests_total", endpoint="/api/pages/{id}", status="200") == 5
    assert at("eventsync_api_requests_total", endpoint="/api/pages", status="429") == 1
    assert at("eventsync_api_rate_limit_waits_total") == 1
    assert at("eventsync_api_rate_limit_wait_seconds_total") == 1.5
    assert at("eventsync_api_retries_total") == 1
    assert at("eventsync_queue_depth") == 7
    assert at("eventsync_dead_letters") == 1
    assert at("eventsync_audit_cursor") == 12345
    assert at("eventsync_audit_lag_seconds") == 2.5
    assert at("eventsync_last_full_sync_timestamp_seconds") == 1_700_000_000
    assert at("eventsync_sweep_progress_ratio") == 0.25
    assert at("eventsync_sweep_cycle_seconds") == 86_400
    assert at("eventsync_mirror_entities", kind="pages") == 200
    assert at("eventsync_changes_seq") == 99
    assert at("eventsync_freshness_seconds_count") == 2
    assert at("eventsync_freshness_seconds_sum") == 42.3
    assert at("eventsync_freshness_seconds_bucket", le="0.5") == 1
    assert at("eventsync_freshness_seconds_bucket", le="60.0") == 2
    assert at("eventsync_freshness_seconds_bucket", le="+Inf") == 2


def test_two_instances_do_not_collide() -> None:
    # Both register the same names; with the global default registry the second would raise.
    a, b = Metrics(), Metrics()
    a.queue_depth.set(3)
    a.jobs_total.labels(outcome="done").inc()
    assert value(a, "eventsync_queue_depth") == 3
    assert value(b, "eventsync_queue_depth") == 0
    assert value(a, "eventsync_jobs_total", outcome="done") == 1
    assert value(b, "eventsync_jobs_total", outcome="done") == 0
