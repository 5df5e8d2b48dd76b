"""The composition root: builds the engines, the store, the HTTP client, the metrics registry
and the scheduler from a Config, and wires them into the daemon and the one-shot commands.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime

import httpx
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import CollectorRegistry

from agent.clock import Clock, SystemClock
from agent.config import Config
from agent.db import create_engine
from agent.delivery.client import SeyahaClient
from agent.delivery.policy import RetryPolicy
from agent.delivery.worker import Deliverer
from agent.errors import AgentError, QueryError, SourceUnavailable
from agent.logs import event
from agent.metrics import Metrics
from agent.outbox.store import OutboxStats, StateStore
from agent.scan import Scanner, ScanReport
from agent.source.reader import SourceReader

log = logging.getLogger("agent")

SHUTDOWN_GRACE_S = 30.0
"""Longest wait for an in-flight request at shutdown before the process exits anyway."""

MIN_WAIT_S = 0.05
"""Shortest pause of the one-shot drain loop between two checks of the outbox."""


@dataclass(frozen=True)
class DrainResult:
    """What a one-shot delivery left behind."""

    stats: OutboxStats
    timed_out: bool
    paused_reason: str | None


class Agent:
    def __init__(
        self,
        config: Config,
        *,
        clock: Clock | None = None,
        registry: CollectorRegistry | None = None,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        s = config.settings
        self.config = config
        self.clock: Clock = clock or SystemClock()
        self.metrics = Metrics(registry or CollectorRegistry())
        self.reader = SourceReader(
            create_engine(s.source.url, role="source"),
            catalog_query=s.source.catalog_query,
            slots_query=s.source.slots_query,
            timezone=s.source.zone,
        )
        self.store = StateStore.from_url(s.state.url)
        self.client = SeyahaClient(
            base_url=s.seyaha.base_url,
            integration_id=s.seyaha.integration_id,
            secret=config.secret,
            connect_timeout_s=s.delivery.connect_timeout,
            timeout_s=s.delivery.timeout,
            transport=transport,
        )
        self.scanner = Scanner(self.reader, self.store, self.clock, self.metrics)
        self.deliverer = Deliverer(
            store=self.store,
            client=self.client,
            clock=self.clock,
            metrics=self.metrics,
            policy=RetryPolicy(
                initial_s=s.delivery.backoff_initial,
                max_s=s.delivery.backoff_max,
                max_attempts=s.delivery.max_attempts,
                retry_after_max_s=s.delivery.retry_after_max,
            ),
            lease_s=s.delivery.lease,
            batch_size=s.delivery.batch_size,
            probe_interval_s=s.delivery.auth_probe_interval,
        )
        self.wake = threading.Event()
        self._source_down: str | None = None

    def open(self) -> None:
        self.store.open()

    def close(self) -> None:
        self.client.close()
        self.store.close()
        self.reader.engine.dispose()

    # -- scanning -----------------------------------------------------------------------

    def scan(self, *, resync: bool = False) -> ScanReport:
        report = self.scanner.scan(resync=resync)
        self.refresh_outbox_metrics()
        if report.enqueued:
            self.wake.set()
        return report

    def scan_job(self) -> None:
        """The scheduled scan: reports failures and keeps the daemon alive through them."""
        try:
            self.scan()
        except SourceUnavailable as exc:
            self.metrics.scans.labels("source_unavailable").inc()
            if self._source_down != str(exc):
                event(log, logging.ERROR, "source.unavailable", f"{exc}; retrying every poll")
            self._source_down = str(exc)
            return
        except QueryError as exc:
            self.metrics.scans.labels("query_error").inc()
            event(log, logging.ERROR, "scan.query_error", str(exc))
            return
        except AgentError as exc:
            self.metrics.scans.labels("error").inc()
            event(log, logging.ERROR, "scan.failed", str(exc))
            return
        except Exception:
            self.metrics.scans.labels("error").inc()
            log.exception("scan failed unexpectedly", extra={"event": "scan.crashed"})
            return
        if self._source_down is not None:
            event(log, logging.INFO, "source.recovered", "source database reachable again")
            self._source_down = None

    def refresh_outbox_metrics(self) -> OutboxStats:
        stats = self.store.stats()
        self.metrics.outbox.labels("pending").set(stats.pending)
        self.metrics.outbox.labels("dead").set(stats.dead)
        age = 0.0
        if stats.oldest_pending is not None:
            age = max(0.0, (self.clock.now() - stats.oldest_pending).total_seconds())
        self.metrics.oldest_pending_age.set(age)
        return stats

    # -- the daemon ---------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Scan on `poll_interval` and deliver continuously until `stop` is set."""
        interval = self.config.settings.source.poll_interval
        scheduler = BackgroundScheduler(timezone="UTC")
        scheduler.add_job(
            self.scan_job,
            IntervalTrigger(seconds=interval),
            id="scan",
            max_instances=1,
            coalesce=True,
            misfire_grace_time=None,
            next_run_time=datetime.now(scheduler.timezone),
        )
        scheduler.add_job(
            self.refresh_outbox_metrics,
            IntervalTrigger(seconds=15),
            id="outbox-metrics",
            max_instances=1,
            coalesce=True,
        )
        worker = threading.Thread(
            target=self.deliverer.run, args=(stop, self.wake), name="delivery", daemon=True
        )
        event(
            log,
            logging.INFO,
            "agent.started",
            f"watching the source every {interval:g} s; delivering to "
            f"{self.config.settings.seyaha.base_url}",
        )
        scheduler.start()
        worker.start()
        try:
            stop.wait()
        finally:
            event(log, logging.INFO, "agent.stopping", "stopping: finishing in-flight work")
            scheduler.shutdown(wait=True)
            self.wake.set()
            worker.join(SHUTDOWN_GRACE_S)
            event(log, logging.INFO, "agent.stopped", "stopped")

    # -- one-shot -----------------------------------------------------------------------

    def drain(self, timeout_s: float, stop: threading.Event | None = None) -> DrainResult:
        """Deliver until the outbox has nothing waiting, delivery pauses, or time runs out."""
        stop = stop or threading.Event()
        deadline = self.clock.monotonic() + timeout_s
        while not stop.is_set():
            attempted = self.deliverer.step()
            stats = self.store.stats()
            if stats.pending == 0:
                return DrainResult(stats, False, None)
            if self.deliverer.pause is not None:
                return DrainResult(stats, False, self.deliverer.pause.reason)
            remaining = deadline - self.clock.monotonic()
            if remaining <= 0:
                return DrainResult(stats, True, None)
            if attempted == 0:
                due = self.store.next_due()
                wait = MIN_WAIT_S
                if due is not None:
                    wait = max(MIN_WAIT_S, (due - self.clock.now()).total_seconds())
                stop.wait(min(wait, remaining))
        return DrainResult(self.store.stats(), True, None)
