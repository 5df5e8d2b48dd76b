"""One scan: read the source, diff against the stored fingerprints, plan, record atomically.

The decisions (diff, plan) are pure; this module only moves values between the source, the
pure functions and the state store, and reports what it saw.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime

from agent.clock import Clock
from agent.diff import diff_catalog, diff_slots
from agent.logs import event
from agent.metrics import Metrics
from agent.model import CatalogDiff, Message, SkippedRow, SlotDiff
from agent.outbox.store import StateStore
from agent.plan import plan
from agent.source.reader import SourceReader

log = logging.getLogger("agent.scan")

SKIPPED_MEMORY = 10_000
"""Skipped rows remembered between scans, so a bad row is logged once, not on every poll."""


@dataclass(frozen=True)
class ScanReport:
    at: datetime
    baseline: bool
    catalog: CatalogDiff
    slots: SlotDiff
    messages: list[Message]
    enqueued: int
    skipped: list[SkippedRow]
    catalog_rows: int
    slot_rows: int
    duration_s: float

    @property
    def triggers(self) -> int:
        return sum(1 for m in self.messages if m.kind == "trigger")

    @property
    def notifies(self) -> int:
        return sum(1 for m in self.messages if m.kind == "notify")


@dataclass
class Scanner:
    reader: SourceReader
    store: StateStore
    clock: Clock
    metrics: Metrics
    _reported: set[tuple[str, str, str]] = field(default_factory=set)

    def scan(self, *, resync: bool = False) -> ScanReport:
        """Run one scan. With `resync`, every in-scope slot is notified (a deliberate backfill)."""
        started = self.clock.monotonic()
        snapshot = self.reader.read()
        now = self.clock.now()
        baseline = not self.store.is_baselined()
        catalog = diff_catalog(
            self.store.load_catalog(), snapshot.catalog, snapshot.catalog_protected
        )
        slots = diff_slots(self.store.load_slots(), snapshot.slots, now, snapshot.slots_protected)
        backfill = [s for s in snapshot.slots if s.start_utc >= now] if resync else []
        messages = plan(catalog, slots, baseline=baseline and not resync, resync=backfill)
        enqueued = self.store.commit_scan(catalog, slots, messages, now, baseline=baseline)
        duration = self.clock.monotonic() - started

        report = ScanReport(
            at=now,
            baseline=baseline,
            catalog=catalog,
            slots=slots,
            messages=messages,
            enqueued=enqueued,
            skipped=snapshot.skipped,
            catalog_rows=snapshot.catalog_rows_read,
            slot_rows=snapshot.slot_rows_read,
            duration_s=duration,
        )
        self._observe(report)
        return report

    def _observe(self, report: ScanReport) -> None:
        m = self.metrics
        m.scans.labels("ok").inc()
        m.scan_duration.observe(report.duration_s)
        m.last_scan.set(report.at.timestamp())
        m.rows_read.labels("catalog_query").inc(report.catalog_rows)
        m.rows_read.labels("slots_query").inc(report.slot_rows)
        for kind, count in (
            ("catalog_added", len(report.catalog.added)),
            ("catalog_changed", len(report.catalog.changed)),
            ("catalog_removed", len(report.catalog.removed)),
            ("slot_added", len(report.slots.added)),
            ("slot_changed", len(report.slots.changed)),
            ("slot_removed", len(report.slots.removed)),
            ("slot_expired", len(report.slots.expired)),
        ):
            if count:
                m.changes.labels(kind).inc(count)

        current: set[tuple[str, str, str]] = set()
        for row in report.skipped:
            m.rows_skipped.labels(row.query).inc()
            ident = (row.query, repr(row.key), row.reason)
            current.add(ident)
            if ident not in self._reported:
                event(
                    log,
                    logging.WARNING,
                    "row.skipped",
                    f"{row.query}: row {_key_text(row.key)} skipped: {row.reason}",
                    query=row.query,
                    key=_key_text(row.key),
                    reason=row.reason,
                )
        if len(current) <= SKIPPED_MEMORY:
            self._reported = current

        if report.baseline:
            event(
                log,
                logging.INFO,
                "scan.baseline",
                f"baseline recorded: {report.catalog_rows} catalog rows, "
                f"{len(report.slots.added)} slots in scope; one sync/trigger queued",
            )
        elif report.messages:
            event(
                log,
                logging.INFO,
                "scan.changes",
                f"queued {report.triggers} trigger(s) and {report.notifies} notify(s)",
                catalog_added=len(report.catalog.added),
                catalog_changed=len(report.catalog.changed),
                catalog_removed=len(report.catalog.removed),
                slots_added=len(report.slots.added),
                slots_changed=len(report.slots.changed),
                slots_removed=len(report.slots.removed),
            )
        else:
            event(
                log,
                logging.DEBUG,
                "scan.unchanged",
                "no change",
                duration_ms=round(report.duration_s * 1000, 1),
            )


def _key_text(key: tuple[object, ...] | None) -> str:
    if key is None:
        return "(no key)"
    return "/".join("NULL" if k is None else str(k) for k in key)
