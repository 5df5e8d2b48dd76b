"""Prometheus metrics on an injected registry (no module-level globals).

The composition root makes one `Metrics` per process; tests make their own registry and read
values back with `registry.get_sample_value`.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from agent import __version__

NAMESPACE = "seyaha_agent"

REQUEST_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
"""Webhook request durations: loopback calls take milliseconds, a slow Seyaha seconds."""

LATENCY_BUCKETS_S = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
    3600.0,
)
"""Detection to delivery: tens of milliseconds with wake-ups, up to hours during an outage."""

SCAN_BUCKETS_S = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
"""Scan durations: a few rows take milliseconds, millions of slots take minutes."""


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.build_info = Info(
            "build", "Version of the running agent.", namespace=NAMESPACE, registry=registry
        )
        self.build_info.info({"version": __version__})
        self.scans = Counter(
            "scans",
            "Polls and reconciliations of the source, by result.",
            ["result"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.sweeps = Counter(
            "late_sweeps",
            "Late-row sweeps of the source (the cursor_overlap window behind the polls), "
            "by result.",
            ["result"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.scan_duration = Histogram(
            "scan_duration_seconds",
            "Time to read the source, diff and record a scan, by kind (full, incremental, late).",
            ["kind"],
            namespace=NAMESPACE,
            registry=registry,
            buckets=SCAN_BUCKETS_S,
        )
        self.rows_read = Counter(
            "source_rows_read",
            "Rows read from the source, by query.",
            ["query"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.ranges = Counter(
            "reconciliation_ranges",
            "Ranges of slots full passes compared by digest: read (their digest differed) or "
            "skipped (unchanged).",
            ["result"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.rows_skipped = Counter(
            "source_rows_skipped",
            "Source rows skipped because they could not be used.",
            ["query"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.changes = Counter(
            "changes_detected",
            "Changes found by scans, by kind.",
            ["kind"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.deliveries = Counter(
            "deliveries",
            "Webhook calls made, by endpoint, outcome and HTTP status code.",
            ["endpoint", "outcome", "code"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.request_duration = Histogram(
            "request_duration_seconds",
            "Duration of webhook calls to Seyaha.",
            ["endpoint"],
            namespace=NAMESPACE,
            registry=registry,
            buckets=REQUEST_BUCKETS_S,
        )
        self.delivery_latency = Histogram(
            "delivery_latency_seconds",
            "From a change being detected (queued in the outbox) to Seyaha accepting it. With "
            "wake-ups, detection follows the commit within milliseconds.",
            ["endpoint"],
            namespace=NAMESPACE,
            registry=registry,
            buckets=LATENCY_BUCKETS_S,
        )
        self.not_updated = Counter(
            "notify_not_updated",
            "Notify calls that Seyaha answered with updated:false.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.retries = Counter(
            "delivery_retries",
            "Delivery attempts that failed and were scheduled again.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.dead_letters = Counter(
            "dead_letters",
            "Messages given up on and kept as dead letters.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.expired = Counter(
            "notifies_expired",
            "Notifies dropped because their slot had already started.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.paused = Gauge(
            "delivery_paused",
            "1 while delivery is paused (wrong secret, unknown integration).",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.integrations_paused = Gauge(
            "integrations_paused",
            "A platform's integrations whose delivery this agent holds back on their own "
            "(refused secret or id, no secret file); one series whatever their number.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.integrations_breaker_open = Gauge(
            "integrations_circuit_breaker_open",
            "A platform's integrations whose own circuit breaker holds their calls back after "
            "failures in a row (the shared circuit_breaker_open is for all of them).",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.shards_scanned = Gauge(
            "shards_scanned",
            "Shards of a platform's integrations this agent scans, of 64, when agents share "
            "one state store (0 while the others scan them all).",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.integrations_waiting = Gauge(
            "integrations_waiting",
            "A platform's integrations with messages waiting in the outbox.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.breaker_open = Gauge(
            "circuit_breaker_open",
            "1 while the circuit breaker holds calls back after repeated failures.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.outbox = Gauge(
            "outbox_messages",
            "Messages in the outbox, by state.",
            ["state"],
            namespace=NAMESPACE,
            registry=registry,
        )
        self.oldest_pending_age = Gauge(
            "outbox_oldest_pending_age_seconds",
            "Age of the oldest message still to deliver.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.last_scan = Gauge(
            "last_successful_scan_timestamp_seconds",
            "When the last scan succeeded.",
            namespace=NAMESPACE,
            registry=registry,
        )
        self.last_delivery = Gauge(
            "last_successful_delivery_timestamp_seconds",
            "When Seyaha last accepted a call.",
            namespace=NAMESPACE,
            registry=registry,
        )
