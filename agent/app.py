"""The composition root: builds the engines, the store, the HTTP client, the metrics registry
and the scheduler from a Config, and wires them into the daemon and the one-shot commands.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass

import httpx
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import CollectorRegistry, Counter
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from agent import systemd
from agent.clock import Clock, SystemClock
from agent.config import Config
from agent.db import create_engine
from agent.delivery.client import SeyahaClient
from agent.delivery.flow import CircuitBreaker, RateLimit
from agent.delivery.policy import RetryPolicy
from agent.delivery.worker import INTERRUPTED_RECORD_S, Deliverer
from agent.dialects import STORE_CHECKPOINT_PAGES
from agent.errors import (
    AgentError,
    QueryError,
    SourceUnavailable,
    StateError,
    first_line,
    shown_path,
)
from agent.integrations import Router, SecretsFolder
from agent.logs import event, redact_everywhere
from agent.metrics import Metrics
from agent.scan import Scanner, ScanReport, Superseded, Turn
from agent.sharing import Sharing
from agent.source.gate import (
    REDISCOVER_EVERY_S,
    SENSE_EVERY_S,
    PassGate,
    Sensed,
    Sensor,
    SensorUnusable,
)
from agent.source.reader import SourceReader
from agent.source.sensors import commit_sensor
from agent.source.wakeups import PostgresListener, SqliteFileWatcher, Wakeup
from agent.store import LeaseLost, OutboxStats, StateStore
from agent.store.coordination import SCANNER, Fence
from agent.store.identity import AlreadyReported, StateFileGuard, StateFileLost
from agent.store.lock import LockRecord, StateFileLock, evidence_of_a_lost_store

log = logging.getLogger("agent")

MISSING_SHOWN = 10
"""Integrations a log line names one by one (the rest are counted)."""

SHUTDOWN_GRACE_S = 30.0
"""Longest wait for an in-flight request at shutdown before the process exits anyway."""

OUTBOX_METRICS_EVERY_S = 15.0
"""How often the outbox gauges are refreshed when no scan does it (seconds)."""

CHECKPOINT_EVERY_S = 1.0
"""How often a daemon on a SQLite store copies the store's write-ahead log into its file, in
the background (seconds; see agent.dialects.STORE_CHECKPOINT_PAGES)."""

SOURCE_BACKOFF_MAX_S = 60.0
"""Longest pause between two scans while the source keeps failing (seconds)."""

DRAIN_CHECK_S = 0.05
"""How often a one-shot drain looks at the outbox to see whether it is done (seconds)."""

DRAIN_STATS_TRIES = 5
"""Reads of the outbox's counts at the end of a drain before a store failure is reported."""

READY_FAILURES = 2
"""Failed scans in a row after which /readyz reports the agent not ready."""

READY_MIN_STALE_S = 60.0
"""/readyz fails when no scan succeeded for 3 poll intervals, and never sooner than this."""

SCAN_GRACE_S = 300.0
"""A scan may keep the poll loop busy this long before the watchdog stops vouching for it."""

SWEEP_EVERY_S = 5.0
"""The late-row sweep reads the whole cursor_overlap window beside the polls right after
each poll, and at least this often (seconds): a row whose transaction committed more than
Scanner.live_overlap_s after stamping it arrives after the next poll and the sweep's own
length (see Agent.sweep_loop)."""

SCANNER_RENEWALS = 3
"""The scanner lease is renewed this many times per lease ([state] scanner_lease): two
renewals may fail (a slow store, a blip) before another agent takes over."""


def rest_after(interval_s: float, took_s: float) -> float:
    """How long the poll loop waits after a poll that took `took_s` (seconds).

    Polls start every `interval_s`, counted from the start of the one before: with only
    the two required queries each poll is a full pass, and counting from its end would
    add its length to every booking's wait (a booking committed just after a pass's
    snapshot is read by the next pass: within interval + one pass, not interval + two).
    A poll longer than half the interval is followed by a rest as long as itself, up to
    the interval, so that a pass which outgrows the interval leaves the database idle
    at least half the time instead of scanning without pause."""
    return min(interval_s, max(interval_s - took_s, took_s))


def next_reconciliation_at(started_s: float, took_s: float, share: float) -> float:
    """When (monotonic seconds) the next scheduled reconciliation may start, after one that
    started at `started_s` and took `took_s`: the source spends at most `share` of its time
    on reconciliations ([source] reconcile_share), however large the inventory grows."""
    return started_s + took_s / share


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
        metrics: Metrics | None = None,
        transport: httpx.BaseTransport | None = None,
        on_state_lost: Callable[[StateFileLost], None] | None = None,
    ) -> None:
        s = config.settings
        self.config = config
        self.metrics = metrics or Metrics(registry or CollectorRegistry())
        self.store = StateStore.from_url(s.state.url)
        self.clock: Clock = self.store.clock(clock or SystemClock())
        """The database's clock on a shared state store, the host's on a SQLite file: leases,
        retry times and scan times are all stamped with it (see store.clock)."""
        self.secrets: SecretsFolder | None = None
        """A platform's secrets, one file per integration ([seyaha] webhook_secrets_dir)."""
        self.router: Router | None = None
        self._without_secret: set[str] = set()
        """Integrations whose rows were skipped for want of a secret (see _rows_without_secret)."""
        if s.seyaha.webhook_secrets_dir is not None:
            self.secrets = SecretsFolder(s.seyaha.webhook_secrets_dir, on_secret=redact_everywhere)
            self.router = Router(self.secrets)
        self.reader = SourceReader(
            create_engine(s.source.url, role="source"),
            catalog_query=s.source.catalog_query,
            slots_query=s.source.slots_query,
            timezone=s.source.zone,
            slots_changed_query=s.source.slots_changed_query,
            catalog_changed_query=s.source.catalog_changed_query,
            query_timeout_s=s.source.query_timeout,
            transaction_max_s=s.source.read_transaction_max,
            range_digests=s.source.range_digests,
            digest_work_mem_mb=s.source.digest_work_mem_mb,
            route=self.router,
        )
        self.client = SeyahaClient(
            base_url=s.seyaha.base_url,
            integration_id=s.seyaha.integration_id,
            secret=config.secret,
            connect_timeout_s=s.delivery.connect_timeout,
            timeout_s=s.delivery.timeout,
            transport=transport,
            secrets=self.secrets,
        )
        self.scanner = Scanner(
            self.reader, self.store, self.clock, self.metrics, overlap_s=s.source.cursor_overlap
        )
        self.sensor: Sensor | None = None
        """Without a change query, on PostgreSQL and MySQL/MariaDB: what tells the daemon's
        poll loop that something committed, so that it passes then and only then
        (agent/source/gate.py); None elsewhere, and once found unusable."""
        self._gate = PassGate(fallback_s=s.source.full_scan_interval)
        self._sensor_found_at: float | None = None
        if s.source.watch_commits and not self.reader.incremental:
            self.sensor = commit_sensor(self.reader)
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
                max_age_s=s.delivery.max_age,
            ),
            lease_s=s.delivery.lease,
            batch_size=s.delivery.batch_size,
            request_s=s.delivery.connect_timeout + s.delivery.timeout,
            probe_interval_s=s.delivery.auth_probe_interval,
            concurrency=s.delivery.concurrency,
            rate_limit=RateLimit(s.delivery.rate_limit, burst=s.delivery.rate_burst),
            breaker=CircuitBreaker(
                threshold=s.delivery.breaker_failures, cooldown_s=s.delivery.breaker_cooldown
            ),
            turns=s.seyaha.routed,
            integration_rate=s.delivery.integration_rate_limit,
        )
        self.identity = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        """Names this process in the leases of a shared state store."""
        if self.store.dialect.shared:
            self.scanner.fence = Fence(self.identity)
        self.sharing: Sharing | None = None
        """Agents sharing a platform's state store divide its integrations (agent/shards.py)."""
        if self.router is not None and self.store.dialect.shared:
            self.sharing = Sharing(
                self.store.coordination,
                self.identity,
                self.clock,
                s.state.scanner_lease,
                self.metrics,
            )
        self._baselined = False
        """Whether the store was seen baselined (a platform's agents divide it only then)."""
        self._sharing_standby_logged = False
        database = self.store.dialect.file_database(self.store.engine.url)
        self._lock = StateFileLock(database) if database is not None else None
        self._guard = (
            StateFileGuard(database, self._state_file_lost) if database is not None else None
        )
        self.on_state_lost = on_state_lost
        """Told once when the SQLite state file is lost under the agent (the daemon stops)."""
        self._quiet_delivery = AlreadyReported()
        self._resync_because: str | None = None
        """Why the first full scan must resync: the store lost the baseline it had (see open)."""
        self._not_scanner_logged = False
        self._holds_scanner = False
        """Whether this agent held the scanner lease at its last attempt (shared stores)."""
        self.poll_wake = threading.Event()
        self.sweep_wake = threading.Event()
        """Set after every poll: the late-row sweep runs next (see sweep_loop)."""
        """Set by a wake-up (LISTEN/NOTIFY, file watch): wakes the poll loop."""
        self.scan_lock = threading.Lock()
        """One scan at a time: full scans and polls both write fingerprints. A
        reconciliation beside the polls takes it only for moments (Scanner.reconcile)."""
        self._reconciling = threading.Lock()
        """One reconciliation at a time (the start's and the interval's may meet)."""
        self._reconcile_not_before = -math.inf
        """No scheduled reconciliation before this (monotonic s): see reconcile_share."""
        self._sweeping = threading.Lock()
        """One reader beside the polls at a time: the late-row sweep, or a reconciliation
        (which waits for a sweep under way; a sweep does not start while it runs)."""
        self._source_down: str | None = None
        self._failures = 0
        self._failure: tuple[str, str] | None = None
        """What the last failed scan ran into (source, query, state, scan) and why."""
        self._last_scan_ok: float | None = None
        """Monotonic time of the last successful poll or scan (or standby turn)."""
        self.heartbeat = self.clock.monotonic()
        """Monotonic time the poll loop last went round: the systemd watchdog feeds on it."""
        self.reconciled = False
        """Whether a full scan (a reconciliation, or a poll that fell back to one) has run
        since the daemon started (run): it runs one right after its first poll."""
        self._scheduler: BackgroundScheduler | None = None
        self._stopping: threading.Event | None = None
        """The daemon's stop event (run): a reconciliation beside the polls ends at it."""
        self._checkpoint_failed = False
        """The last background checkpoint of a SQLite store failed (said once until one works)."""

    def open(self, *, exclusive: bool = True) -> None:
        """Open the state store; `exclusive` refuses to share a SQLite state file."""
        lock = self._lock if exclusive else None
        previous = lock.acquire() if lock is not None else None
        self.store.open(clock=self.clock)
        if lock is not None:
            self._look_for_a_lost_store(lock, previous)
            self._release_orphaned_leases()
        if self._guard is not None:
            self._guard.watch(self.store.engine)
            logging.getLogger("agent.delivery").addFilter(self._quiet_delivery)

    def _release_orphaned_leases(self) -> None:
        """Under the SQLite store's lock no other process delivers from this outbox: a
        message still leased was claimed by one that ended without giving it back (SIGKILL,
        a crash, the out-of-memory killer). It is due now, not when its lease runs out
        (delivery.lease, 60 s by default), which would hold back its slot's newer states
        too. A shared store keeps its leases: other agents may hold them."""
        released = self.store.queue.release_orphaned()
        if released:
            event(
                log,
                logging.WARNING,
                "outbox.leases_released",
                f"{released} message(s) claimed by an earlier agent process that ended "
                "without finishing them (killed or crashed) are due again now, instead of "
                f"after their lease ([delivery] lease, "
                f"{self.config.settings.delivery.lease:g} s); a call that was in flight then "
                "is sent again",
            )

    def _look_for_a_lost_store(self, lock: StateFileLock, previous: LockRecord | None) -> None:
        """A SQLite store without a baseline where one was recorded before (it was deleted,
        emptied or replaced since) is resynced by the first full scan, not baselined: a
        baseline would count every slot as told, and the changes made since the store was
        lost would never reach Seyaha. A resync loses nothing and needs nobody."""
        assert self._guard is not None  # a SQLite file, as the lock
        database = self._guard.database
        baselined = self.store.fingerprints.is_baselined()
        evidence = evidence_of_a_lost_store(
            baselined=baselined,
            previous=previous,
            lock_path=lock.path,
            backups=sorted(database.parent.glob(glob.escape(database.name) + ".schema-*.bak")),
        )
        if evidence is not None:
            self._resync_because = evidence
            event(
                log,
                logging.WARNING,
                "state.resync",
                f"the state store {shown_path(database)} holds no baseline, but {evidence}: "
                "it was lost, emptied or replaced since. The first scan resends every slot "
                "to Seyaha (a resync) instead of taking a new baseline, so that no change "
                "made meanwhile is missed; nothing to do. To start afresh on purpose, delete "
                f"{shown_path(lock.path)} with the store, or use a new [state] url.",
                file=str(database),
            )
        if baselined or evidence is not None:
            # Kept until the resync is recorded: a crash before it resyncs again.
            lock.mark_baselined()

    def close(self) -> None:
        self._hand_over_scanning()
        self._leave_shards()
        self.client.close()
        self.store.close()
        if self._guard is not None:
            self._guard.after_close()
        if self.sensor is not None:
            self.sensor.close()
        self.reader.engine.dispose()
        if self._lock is not None:
            self._lock.release()
        logging.getLogger("agent.delivery").removeFilter(self._quiet_delivery)

    @property
    def state_lost(self) -> StateFileLost | None:
        """What happened to the SQLite state file under the agent, once it has."""
        return None if self._guard is None else self._guard.lost

    def _check_state_file(self) -> None:
        """Raise StateFileLost unless the SQLite state file is still the one opened (a stat:
        cheap enough for every scan, see store.identity)."""
        if self._guard is not None:
            self._guard.check()

    def _state_file_lost(self, lost: StateFileLost) -> None:
        """Said once, by whichever thread found it; the store refuses every use after it."""
        event(
            log,
            logging.ERROR,
            "state.lost",
            str(lost),
            file=str(lost.path),
            problem=lost.problem,
        )
        if self._lock is not None:
            self._lock.keep_after_loss()
        self.poll_wake.set()
        self.sweep_wake.set()
        if self.on_state_lost is not None:
            self.on_state_lost(lost)

    def _scanner_turn(self) -> bool:
        """On a shared (non-SQLite) store, only the holder of the scanner lease scans; on a
        platform's, once its baseline is recorded, each agent scans the shards it holds."""
        if not self.store.dialect.shared:
            return True
        if self.sharing is not None and self._store_baselined():
            return self._shards_turn(self.sharing)
        held = self.store.coordination.hold(
            SCANNER, self.identity, self.clock.now(), self.config.settings.state.scanner_lease
        )
        if held == "taken":
            # The lease is new to this agent, or another agent held it since: that one may
            # have recorded changes meanwhile, so what the last poll saw may be stale, and
            # so may a reconciliation's snapshot.
            self.scanner.forget()
            self.scanner.supersede("the scanner lease changed hands")
        if held is not None:
            self.scanner.own(None, Fence(self.identity))
            if not self._holds_scanner:
                event(log, logging.INFO, "scan.leader", "this agent holds the scanner lease")
            self._holds_scanner = True
            self._not_scanner_logged = False
            return True
        self._holds_scanner = False
        self.scanner.forget()
        self.scanner.supersede("another agent holds the scanner lease")
        if not self._not_scanner_logged:
            event(
                log,
                logging.INFO,
                "scan.standby",
                "another agent holds the scanner lease on this state store; this one delivers "
                "and takes over scanning if the other stops",
            )
            self._not_scanner_logged = True
        return False

    def _store_baselined(self) -> bool:
        if not self._baselined:
            self._baselined = self.store.fingerprints.is_baselined()
        return self._baselined

    def _shards_turn(self, sharing: Sharing) -> bool:
        """Scan the shards this agent holds (after a first round, if none ran yet). The
        platform's baseline was taken by one agent under the scanner lease: given back."""
        ownership = sharing.ownership
        if ownership is None:
            # A daemon's first round runs before its first poll (run); a one-shot command
            # takes only free shards, without counting as one of the agents.
            ownership = sharing.round(member=False)
        if self._holds_scanner:
            self._hand_over_scanning()
        if not ownership.shards:
            self.scanner.own(ownership, Fence(self.identity, ()))
            if not self._sharing_standby_logged:
                event(
                    log,
                    logging.INFO,
                    "scan.standby",
                    "the other agents on this state store scan every shard of the platform; "
                    "this one delivers, and takes a share when one is freed or unbalanced",
                )
                self._sharing_standby_logged = True
            return False
        self._sharing_standby_logged = False
        self.scanner.own(ownership, Fence(self.identity, ownership.leases))
        return True

    def sharing_job(self) -> None:
        """A round of dividing the platform's shards (see agent.sharing), while the poll loop
        is alive: an agent whose polls are stuck lets its shards run out to the others."""
        if self.sharing is None:
            return
        if self.clock.monotonic() - self.heartbeat > self._stuck_after_s():
            return
        before = self.sharing.ownership
        try:
            after = self.sharing.round()
        except SQLAlchemyError as exc:
            # The poll loop reports the store's failures; the next round retries.
            event(log, logging.DEBUG, "scan.shards_failed", f"dividing shards failed: {exc}")
            return
        if before is not None and after.shards - before.shards:
            # Shards taken over (an agent died or left): their changes since their last
            # holder's poll are read now, not at the next poll_interval.
            self.poll_wake.set()

    # -- scanning -----------------------------------------------------------------------

    def scan(self, *, resync: bool = False) -> ScanReport:
        """A full scan (reads everything, finds deletes), asked for by a command or a test:
        on a shared store it takes the scanner lease first, and is refused while another
        agent holds it."""
        with self.scan_lock:
            self._check_state_file()
            if not self._scanner_turn():
                if self.sharing is not None and self._baselined:
                    raise StateError(
                        "the agents sharing this platform's state store scan every shard of "
                        "its integrations; they scan for you. Run this again when fewer "
                        "agents run, or stop them first."
                    )
                lease = self.store.coordination.lease(SCANNER)
                holder = "another agent" if lease is None else f"agent {lease.holder}"
                raise StateError(
                    f"{holder} scans this state store (it holds the scanner lease); a daemon "
                    "already scans for you. Let it, or stop it and run this again once its "
                    f"lease has run out ([state] scanner_lease, "
                    f"{self.config.settings.state.scanner_lease:g} s)."
                )
            report = self._full_scan(resync=resync)
        self._after(report)
        return report

    def _full_scan(self, *, resync: bool) -> ScanReport:
        """Scanner.scan, which resyncs while the store has lost its baseline (see open)."""
        lost = self._resync_because is not None
        report = self.scanner.scan(resync=resync or lost)
        if lost:
            self._resync_because = None
            event(
                log,
                logging.INFO,
                "state.resynced",
                f"resync queued: {report.triggers} trigger(s) and {report.notifies} notify(s)",
            )
        return report

    def poll(self) -> ScanReport | None:
        """An incremental poll where a change query is configured, else a full scan.
        None when another agent holds the scanner lease."""
        return self._as_scanner(self.scanner.poll)

    def poll_when_due(self) -> ScanReport | None:
        """The daemon's poll: without a change query, on a source with a sign of commits
        (agent/source/gate.py), a pass only when something committed since the last one
        began (or it asks for one more, or none ran for full_scan_interval: PassGate); else
        `poll`. None when no pass ran (or another agent scans)."""
        if self.sensor is None:
            return self.poll()
        reading = self._read_sensor()
        if reading is None:
            return self.poll()
        started = self.clock.monotonic()
        due = self._gate.due(started, reading, self._scope())
        if due is None:
            return None
        event(log, logging.DEBUG, "scan.due", f"pass: {due.why}")
        if due.moved:
            self.scanner.source_changed()
        report = None
        try:
            report = self.poll()
        finally:
            took = self.clock.monotonic() - started
            # Held for poll_interval after a pass for a commit (steady bookings), and after
            # a turn another agent had (a standby agent asks for the lease that often).
            held = due.moved or report is None
            rest = rest_after(self.config.settings.source.poll_interval, took) if held else 0
            self._gate.hold_until(started + took + rest)
        if report is not None:
            self._gate.passed(started, reading, self._scope())
        return report

    def _scope(self) -> Hashable:
        """What this agent scans: the scanner lease held or not, a platform's shards."""
        shards = None
        if self.sharing is not None and self.sharing.ownership is not None:
            shards = self.sharing.ownership.shards
        return (self._holds_scanner, shards)

    def _read_sensor(self) -> Sensed | None:
        """The source's sign of commits (looked up at the first read and every
        REDISCOVER_EVERY_S); None once it turns out unusable, said once, after which every
        poll is a pass."""
        sensor = self.sensor
        assert sensor is not None
        source = self.config.settings.source
        now = self.clock.monotonic()
        try:
            if self._sensor_found_at is None or now - self._sensor_found_at >= REDISCOVER_EVERY_S:
                what = sensor.discover()
                if self._sensor_found_at is None:
                    event(
                        log,
                        logging.INFO,
                        "source.watching_commits",
                        f"a pass runs as soon as {what} shows a commit (read every "
                        f"{SENSE_EVERY_S:g} s), and at least every {source.full_scan_interval:g} s",
                    )
                self._sensor_found_at = now
            return sensor.read()
        except SensorUnusable as exc:
            event(
                log,
                logging.WARNING,
                "source.commits_unseen",
                f"{exc}: every poll is a full pass, every {source.poll_interval:g} s (add a "
                "slots_changed_query to read only what changed, or set [source] "
                "watch_commits = false to silence this)",
            )
            sensor.close()
            self.sensor = None
            return None

    def full_scan(self) -> ScanReport | None:
        """The scheduled reconciliation, by the scanner-lease holder only.

        Beside the polls (Scanner.reconcile) once the store is baselined and a change query
        keeps a cursor: polls and wake-ups go on while it reads. Otherwise (the first scan,
        a resync, no change query) a full scan that polls wait for. None when another agent
        scans, another reconciliation runs, or this one was overtaken (Superseded).
        """
        if not self._reconciling.acquire(blocking=False):
            return None
        started = self.clock.monotonic()
        try:
            with self._sweeping:
                with self.scan_lock:
                    self._check_state_file()
                    if not self._scanner_turn():
                        return None
                    beside = self._resync_because is None and self.scanner.can_reconcile_beside()
                if not beside:
                    return self._as_scanner(self.scanner.scan)
                return self._beside(self.scanner.reconcile, superseded_level=logging.INFO)
        finally:
            self._reconcile_not_before = next_reconciliation_at(
                started,
                self.clock.monotonic() - started,
                self.config.settings.source.reconcile_share,
            )
            self._reconciling.release()
            # Rows committed late while it ran (after its snapshot) are the sweep's now.
            self.sweep_wake.set()

    def late_sweep(self) -> ScanReport | None:
        """The late-row sweep (Scanner.sweep) beside the polls, by the scanner-lease holder;
        skipped while a reconciliation runs (rows committed late meanwhile wait for its end).
        None when it had nothing to do or was overtaken."""
        if not self.scanner.sweeps() or not self._sweeping.acquire(blocking=False):
            return None
        try:
            if self._reconciling.locked():
                return None
            with self.scan_lock:
                self._check_state_file()
                if not self._scanner_turn() or self._resync_because is not None:
                    return None
            return self._beside(self.scanner.sweep, superseded_level=logging.DEBUG)
        finally:
            self._sweeping.release()

    def _beside(
        self,
        work: Callable[[Turn, Callable[[], None]], ScanReport | None],
        *,
        superseded_level: int,
    ) -> ScanReport | None:
        """Run a reconciliation or a sweep beside the polls (the caller holds _sweeping):
        it takes the scan turn only for moments (_scan_turn) and steps aside between rows
        (_give_way). None when it had nothing to do or was overtaken (Superseded)."""
        try:
            with _switching_often():
                report = work(self._scan_turn, self._give_way)
        except Superseded as exc:
            event(log, superseded_level, "scan.superseded", str(exc))
            return None
        if report is not None:
            self._after(report)
        return report

    def _give_way(self) -> None:
        """Return once no poll runs (Scanner.reconcile calls it between rows); end the
        reconciliation when the daemon is stopping, rather than make it wait (a SIGTERM
        would otherwise wait for a reconciliation that can last a minute)."""
        if self._stopping is not None and self._stopping.is_set():
            raise Superseded("reconciliation stopped: the agent is stopping")
        with self.scan_lock:
            pass
        # Delivery too, for a while: under a backlog the workers never rest, and the
        # reconciliation must still end.
        until = self.clock.monotonic() + GIVE_WAY_TO_DELIVERY_S
        while self.deliverer.busy() and self.clock.monotonic() < until:
            time.sleep(GIVE_WAY_PAUSE_S)

    @contextmanager
    def _scan_turn(self) -> Iterator[None]:
        """The scan lock for a moment of a reconciliation beside the polls (Scanner.Turn)."""
        with self.scan_lock:
            self._check_state_file()
            if not self._scanner_turn():
                raise Superseded("reconciliation stopped: another agent took the scanner lease")
            yield

    def _as_scanner(self, work: Callable[[], ScanReport]) -> ScanReport | None:
        with self.scan_lock:
            self._check_state_file()
            if not self._scanner_turn():
                return None
            # A store that lost its baseline is resynced by the first scan, poll or not.
            report = work() if self._resync_because is None else self._full_scan(resync=True)
        self._after(report)
        if report.kind == "full":
            self._load_digests_ahead()
        return report

    def _load_digests_ahead(self) -> None:
        """The daemon's next pass's stored digests, loaded once this one's findings are on
        their way (Scanner.load_digests); skipped while another scan holds the lock (it loads
        them itself)."""
        if not self.scan_lock.acquire(blocking=False):
            return
        try:
            self.scanner.load_digests()
        except Exception as exc:  # the pass is done; the next loads them or says why
            event(
                log,
                logging.WARNING,
                "scan.digests_not_loaded",
                f"the stored digests could not be loaded ahead of the next pass "
                f"({type(exc).__name__}); it loads them itself",
            )
        finally:
            self.scan_lock.release()

    def _after(self, report: ScanReport) -> None:
        if report.kind == "full":
            self.reconciled = True
        if report.baseline and self._lock is not None:
            self._lock.mark_baselined()
        if report.enqueued:
            self.deliverer.poke(report.enqueued)
        if self.router is not None:
            self._rows_without_secret(self.router.take_missing())
        self.refresh_outbox_metrics()

    def _rows_without_secret(self, missing: dict[str, int]) -> None:
        """Say which integrations had rows skipped for want of a secret (once per scan, not
        per row), and reconcile as soon as one of them gets its secret file: its rows were
        skipped, and a poll reads only what changes."""
        assert self.secrets is not None
        if missing:
            shown = sorted(missing.items(), key=lambda pair: (-pair[1], pair[0]))
            listed = ", ".join(f"{i} ({n} rows)" for i, n in shown[:MISSING_SHOWN])
            more = f" and {len(shown) - MISSING_SHOWN} more" if len(shown) > MISSING_SHOWN else ""
            event(
                log,
                logging.WARNING,
                "scan.no_secret",
                f"rows of {len(shown)} integration(s) skipped for want of a usable secret in "
                f"{shown_path(self.secrets.folder)}: {listed}{more}; add the file named by the "
                "integration id (its rows are read again once it is there)",
                integrations=len(shown),
                rows=sum(missing.values()),
            )
            self._without_secret.update(missing)
        found = [i for i in self._without_secret if self.secrets.usable(i)]
        if not found:
            return
        self._without_secret.difference_update(found)
        event(
            log,
            logging.INFO,
            "scan.secret_found",
            f"secret file(s) found for {len(found)} integration(s) whose rows were skipped "
            f"({', '.join(sorted(found)[:MISSING_SHOWN])}); reconciling now to read them",
        )
        if self._scheduler is not None:
            self._scheduler.add_job(
                self.full_scan_job, id="secret-reconciliation", replace_existing=True
            )

    def full_scan_job(self) -> None:
        self.guarded(self.full_scan)

    def scheduled_reconciliation_job(self) -> None:
        """The reconciliation every full_scan_interval, unless the last one was so long that
        running now would spend more than reconcile_share of the time reconciling (then the
        next interval's turn tries again). The one after the start, and the one a secret
        file appearing asks for, are not held back."""
        wait_s = self._reconcile_not_before - self.clock.monotonic()
        if wait_s > 0:
            event(
                log,
                logging.DEBUG,
                "scan.reconciliation_deferred",
                f"scheduled reconciliation skipped: the last one's length allows the next in "
                f"{wait_s:.1f} s ([source] reconcile_share "
                f"{self.config.settings.source.reconcile_share:g})",
            )
            return
        self.full_scan_job()

    def guarded(self, work: Callable[[], object], counter: Counter | None = None) -> bool:
        """Run a scan, reporting failures and keeping the daemon alive; True on success.
        Failures are counted in `counter` (scans_total unless told)."""
        failed = (counter or self.metrics.scans).labels
        try:
            work()
        except StateFileLost as exc:
            # Said once, as state.lost, when it was found; the agent is stopping.
            failed("state_unavailable").inc()
            return self._failed("state", str(exc))
        except SourceUnavailable as exc:
            failed("source_unavailable").inc()
            if self._source_down != str(exc):
                event(
                    log,
                    logging.ERROR,
                    "source.unavailable",
                    f"{exc}; retrying with backoff, nothing is lost",
                )
            self._source_down = str(exc)
            return self._failed("source", str(exc))
        except QueryError as exc:
            failed("query_error").inc()
            event(log, logging.ERROR, "scan.query_error", str(exc))
            return self._failed("query", str(exc))
        except LeaseLost as exc:
            # Agents sharing a store hand leases over (a platform's shards balance when an
            # agent joins): the scan is dropped, and the next one runs on what is held then.
            event(log, logging.INFO, "scan.superseded", str(exc))
            return True
        except AgentError as exc:
            failed("error").inc()
            event(log, logging.ERROR, "scan.failed", str(exc))
            return self._failed("scan", str(exc))
        except OperationalError as exc:
            failed("state_unavailable").inc()
            reason = f"the state store failed: {first_line(exc)}"
            event(log, logging.ERROR, "state.unavailable", f"{reason}; retrying with backoff")
            return self._failed("state", reason)
        except Exception as exc:
            failed("error").inc()
            log.exception("scan failed unexpectedly", extra={"event": "scan.crashed"})
            return self._failed("scan", f"unexpected {type(exc).__name__}")
        if self._source_down is not None:
            event(log, logging.INFO, "source.recovered", "source database reachable again")
            self._source_down = None
        if self._failures and self._failure is not None:
            kind, _reason = self._failure
            name = "state.recovered" if kind == "state" else "scan.recovered"
            event(
                log,
                logging.INFO,
                name,
                f"scans succeed again after {self._failures} failed scan(s)",
            )
        self._failures = 0
        self._failure = None
        self._last_scan_ok = self.clock.monotonic()
        return True

    def _failed(self, kind: str, reason: str) -> bool:
        self._failures += 1
        self._failure = (kind, reason)
        return False

    def scan_job(self) -> None:
        """One poll, as the daemon runs it (kept for callers that drive scans themselves)."""
        self.guarded(self.poll)

    def next_poll_in_s(self) -> float:
        """The poll interval, stretched by exponential backoff while scans keep failing."""
        interval = self.config.settings.source.poll_interval
        if self._failures == 0:
            return interval
        return min(SOURCE_BACKOFF_MAX_S, interval * 2.0 ** min(self._failures - 1, 10))

    def poll_loop(self, stop: threading.Event) -> None:
        """Poll every poll_interval (from start to start, see rest_after), or at once when
        a wake-up arrives."""
        first = True
        while not stop.is_set() and self.state_lost is None:
            started = self.clock.monotonic()
            ok = self.guarded(self.poll_when_due)
            self.heartbeat = self.clock.monotonic()
            took = self.heartbeat - started
            self.sweep_wake.set()
            if first:
                # Ready once the outbox is open and the first scan has run: a source that is
                # down at boot is the agent's to wait out, not a reason for systemd to kill it.
                first = False
                self._reconcile_after_start()
                systemd.notify(
                    "READY=1\nSTATUS="
                    + ("first scan done" if ok else "first scan failed; retrying with backoff")
                )
            if self._failures:
                # Backing off: wake-ups (a busy writer commits all the time) must not cut the
                # pause short and hammer a source that is failing.
                stop.wait(self.next_poll_in_s())
            elif self.sensor is not None:
                # The sign of commits is read every SENSE_EVERY_S, and the moment the gate's
                # hold ends: a pass held for poll_interval starts on time, not up to a
                # reading later.
                held = self._gate.held_for(self.clock.monotonic())
                self.poll_wake.wait(held if 0 < held < SENSE_EVERY_S else SENSE_EVERY_S)
            else:
                self.poll_wake.wait(rest_after(self.next_poll_in_s(), took))
            self.poll_wake.clear()

    def sweep_loop(self, stop: threading.Event) -> None:
        """The late-row sweep, beside the polls: right after each poll, at least every
        SWEEP_EVERY_S, and never busier than half the time (after a sweep it rests as long as
        the sweep took: after a bulk change a sweep reads all its rows again)."""
        while not stop.is_set() and self.state_lost is None:
            self.sweep_wake.wait(SWEEP_EVERY_S)
            self.sweep_wake.clear()
            if stop.is_set() or self.state_lost is not None:
                return
            started = self.clock.monotonic()
            self.guarded(self.late_sweep, self.metrics.sweeps)
            took = self.clock.monotonic() - started
            # A failing source is waited out at the polls' backoff, not hammered.
            stop.wait(self.next_poll_in_s() if self._failures else min(SWEEP_EVERY_S, took))

    def _reconcile_after_start(self) -> None:
        """Queue a reconciliation right after the first poll, unless that poll was one.

        A row the change query missed (a transaction longer than cursor_overlap, stamped
        with its start) is found only by a reconciliation: waiting full_scan_interval after
        every start would let a restart put it off again. Run from the scheduler, after the
        first poll, so readiness (READY=1) does not wait for a long reconciliation."""
        scheduler = self._scheduler
        if scheduler is None or self.reconciled or not self.reader.incremental:
            return
        scheduler.add_job(self.full_scan_job, id="start-reconciliation", max_instances=1)

    def readiness(self) -> list[str]:
        """Why the agent is not ready (empty: ready): for /readyz."""
        problems = []
        if self._source_down is not None:
            problems.append(f"source unavailable: {self._source_down}")
        elif self._failures >= READY_FAILURES and self._failure is not None:
            # Scans that keep failing (a broken query, a full state store) deliver nothing:
            # not ready after two in a row, not only once the last success is old.
            problems.append(f"the last {self._failures} scans failed: {self._failure[1]}")
        source = self.config.settings.source
        stale_s = max(READY_MIN_STALE_S, 3 * source.poll_interval)
        if self._last_scan_ok is None:
            problems.append("no successful scan yet")
        else:
            age = self.clock.monotonic() - self._last_scan_ok
            if age > stale_s:
                problems.append(f"last successful scan {age:.0f} s ago (more than {stale_s:g} s)")
        try:
            self.store.ping()
        except SQLAlchemyError as exc:
            problems.append(f"state store unreachable: {first_line(exc)}")
        if self.deliverer.pause is not None:
            problems.append(f"delivery paused: {self.deliverer.pause.reason}")
        return problems

    def _feed_watchdog(self, stop: threading.Event, every_s: float) -> None:
        """WATCHDOG=1 while the poll loop keeps going round; silence lets systemd restart us."""
        limit = max(2 * every_s, self._stuck_after_s())
        while not stop.wait(every_s):
            if self.clock.monotonic() - self.heartbeat < limit:
                systemd.notify("WATCHDOG=1")

    def wakeup(self) -> Wakeup | None:
        """The wake-up source for this database, if it has one."""
        source = self.config.settings.source
        if self.reader.dialect.listens:
            return PostgresListener(source.url, source.notify_channel)
        database = self.reader.dialect.file_database(self.reader.engine.url)
        if database is not None and source.watch_file:
            return SqliteFileWatcher(database)
        return None

    def renew_scanner_job(self) -> None:
        """Keep the scanner lease while the poll loop is alive, however long a scan takes:
        the lease can then be short, and a dead holder is replaced quickly."""
        if not self._holds_scanner:
            return
        if self.clock.monotonic() - self.heartbeat > self._stuck_after_s():
            return  # the poll loop is stuck: let another agent take over
        try:
            held = self.store.coordination.hold(
                SCANNER,
                self.identity,
                self.clock.now(),
                self.config.settings.state.scanner_lease,
                renew_only=True,
            )
        except SQLAlchemyError:
            return  # the poll loop reports the store's failures; the next renewal retries
        if held is None:
            self._holds_scanner = False

    def _stuck_after_s(self) -> float:
        """How long the poll loop may go without a turn before it counts as stuck."""
        return 2 * self.next_poll_in_s() + SCAN_GRACE_S

    def _wake(self, reason: str) -> None:
        self.poll_wake.set()

    def _outbox_metrics_job(self) -> None:
        with suppress(StateFileLost):  # said once, as state.lost; the agent is stopping
            self.refresh_outbox_metrics()

    def _checkpoint_job(self) -> None:
        try:
            self.store.checkpoint()
        except StateFileLost:
            pass  # said once, as state.lost; the agent is stopping
        except SQLAlchemyError as exc:
            if not self._checkpoint_failed:
                event(
                    log,
                    logging.WARNING,
                    "state.checkpoint_failed",
                    "the state store's write-ahead log could not be copied into its file "
                    f"({first_line(exc)}); the store's own commits do it once it holds "
                    f"{STORE_CHECKPOINT_PAGES:,} pages. Said once until a checkpoint works again",
                )
            self._checkpoint_failed = True
        else:
            self._checkpoint_failed = False

    def refresh_outbox_metrics(self) -> OutboxStats:
        stats = self.store.admin.stats()
        self.metrics.outbox.labels("pending").set(stats.pending)
        self.metrics.outbox.labels("dead").set(stats.dead)
        self.metrics.integrations_waiting.set(stats.integrations_waiting)
        if self.router is not None:
            self.deliverer.forget_idle_pauses()
        age = 0.0
        if stats.oldest_pending is not None:
            age = max(0.0, (self.clock.now() - stats.oldest_pending).total_seconds())
        self.metrics.oldest_pending_age.set(age)
        return stats

    # -- the daemon ---------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Poll, reconcile and deliver until `stop` is set."""
        source = self.config.settings.source
        scheduler = self._scheduler = BackgroundScheduler(timezone="UTC")
        self.reconciled = False
        self._stopping = stop
        if self.reader.incremental:
            _every(
                scheduler, self.scheduled_reconciliation_job, source.full_scan_interval, "full-scan"
            )
        leases: list[tuple[Callable[[], None], str]] = []
        if self.store.dialect.shared:
            leases.append((self.renew_scanner_job, "scanner-lease"))
        if self.sharing is not None:
            self.sharing_job()  # a share before the first poll
            leases.append((self.sharing_job, "shards"))
        for job, name in leases:
            _every(
                scheduler, job, self.config.settings.state.scanner_lease / SCANNER_RENEWALS, name
            )
        _every(scheduler, self._outbox_metrics_job, OUTBOX_METRICS_EVERY_S, "outbox-metrics")
        if not self.store.dialect.shared:
            _every(scheduler, self._checkpoint_job, CHECKPOINT_EVERY_S, "store-checkpoint")
        threads = [
            threading.Thread(target=self.poll_loop, args=(stop,), name="poll", daemon=True),
            threading.Thread(
                target=self.deliverer.run,
                args=(stop, self.config.settings.delivery.shutdown_grace),
                name="delivery",
                daemon=True,
            ),
        ]
        if self.scanner.sweeps():
            threads.append(
                threading.Thread(target=self.sweep_loop, args=(stop,), name="sweep", daemon=True)
            )
        wakeup = self.wakeup()
        if wakeup is not None:
            threads.append(
                threading.Thread(
                    target=self._run_wakeup, args=(wakeup, stop), name="wakeup", daemon=True
                )
            )
        mode = (
            f"incremental polls every {source.poll_interval:g} s, full reconciliation every "
            f"{source.full_scan_interval:g} s (at most {source.reconcile_share * 100:g}% of "
            "the time)"
            if self.reader.incremental
            else (
                f"full scans when the source shows a commit (at most every "
                f"{source.poll_interval:g} s while commits keep coming), and every "
                f"{source.full_scan_interval:g} s"
                if self.sensor is not None
                else f"full scans every {source.poll_interval:g} s"
            )
        )
        event(
            log,
            logging.INFO,
            "agent.started",
            f"{mode}; wake-ups: {type(wakeup).__name__ if wakeup else 'none (polling only)'}; "
            f"delivering to {self.config.settings.seyaha.base_url}",
        )
        every = systemd.watchdog_interval_s()
        if every is not None:
            threads.append(
                threading.Thread(
                    target=self._feed_watchdog, args=(stop, every), name="watchdog", daemon=True
                )
            )
        scheduler.start()
        for thread in threads:
            thread.start()
        try:
            stop.wait()
        finally:
            systemd.notify("STOPPING=1")
            event(log, logging.INFO, "agent.stopping", "stopping: finishing in-flight work")
            self.poll_wake.set()
            self.sweep_wake.set()
            self.deliverer.poke()
            scheduler.shutdown(wait=True)
            # The delivery thread ends within shutdown_grace (it cuts calls still running
            # then, see Deliverer.run): the wait here is that, plus the time to record them.
            limit = self.config.settings.delivery.shutdown_grace + INTERRUPTED_RECORD_S + 1.0
            deadline = self.clock.monotonic() + max(SHUTDOWN_GRACE_S, limit)
            for thread in threads:
                thread.join(max(0.0, deadline - self.clock.monotonic()))
            self._hand_over_scanning()
            self._leave_shards()
            event(log, logging.INFO, "agent.stopped", "stopped")

    def _hand_over_scanning(self) -> None:
        """A clean stop frees the scanner lease at once: another agent scans at its next
        poll instead of waiting for the lease to run out."""
        if not self._holds_scanner:
            return
        try:
            self.store.coordination.give_up(SCANNER, self.identity)
        except SQLAlchemyError:
            return  # the lease runs out by itself
        self._holds_scanner = False

    def _leave_shards(self) -> None:
        """A clean stop gives a platform's shards back at once (see Sharing.leave)."""
        if self.sharing is None or self.sharing.ownership is None:
            return
        with suppress(SQLAlchemyError):  # else they run out by themselves
            self.sharing.leave()

    def _run_wakeup(self, wakeup: Wakeup, stop: threading.Event) -> None:
        try:
            wakeup.run(stop, self._wake)
        except Exception:
            # Wake-ups only shorten the wait; polling goes on without them.
            log.exception("wake-ups stopped; polling continues", extra={"event": "wakeup.failed"})

    # -- one-shot -----------------------------------------------------------------------

    def drain(self, timeout_s: float, stop: threading.Event | None = None) -> DrainResult:
        """Deliver with the configured workers until the outbox has nothing waiting, delivery
        pauses, or `timeout_s` passes. Raises StateFileLost if the SQLite state file is lost
        before or meanwhile."""
        self._check_state_file()
        stop = stop or threading.Event()
        workers_stop = threading.Event()
        workers = [
            threading.Thread(target=self.deliverer.work, args=(workers_stop,), daemon=True)
            for _ in range(self.config.settings.delivery.concurrency)
        ]
        for worker in workers:
            worker.start()
        deadline = self.clock.monotonic() + timeout_s
        timed_out, paused = True, None
        try:
            while not stop.is_set() and self.state_lost is None:
                try:
                    pending: int | None = self.store.admin.stats().pending
                except SQLAlchemyError:
                    # The store blinked (a failover, a killed connection): the workers retry
                    # by themselves; look again at the next check.
                    pending = None
                if pending == 0:
                    timed_out = False
                    break
                if self.deliverer.pause is not None:
                    timed_out, paused = False, self.deliverer.pause.reason
                    break
                held = dict(self.deliverer.paused)
                if (
                    held
                    and pending is not None
                    and self.store.admin.pending(besides=list(held)) == 0
                ):
                    # What waits belongs to integrations paused on their own.
                    timed_out = False
                    paused = f"{len(held)} integration(s) paused: " + "; ".join(
                        f"{i}: {held[i].reason}" for i in sorted(held)[:MISSING_SHOWN]
                    )
                    break
                remaining = deadline - self.clock.monotonic()
                if remaining <= 0:
                    break
                stop.wait(min(DRAIN_CHECK_S, remaining))
        finally:
            workers_stop.set()
            self.deliverer.poke()
            # One deadline for them all, not shutdown_grace each in turn (a call in flight
            # ends by its own deadline anyway, see delivery.deadline).
            grace_end = self.clock.monotonic() + self.config.settings.delivery.shutdown_grace
            for worker in workers:
                worker.join(max(0.0, grace_end - self.clock.monotonic()))
        self._check_state_file()
        return DrainResult(self._stats_after_drain(), timed_out, paused)

    def _stats_after_drain(self) -> OutboxStats:
        for _ in range(DRAIN_STATS_TRIES - 1):
            with suppress(SQLAlchemyError):
                return self.store.admin.stats()
            time.sleep(DRAIN_CHECK_S)
        return self.store.admin.stats()


GIVE_WAY_TO_DELIVERY_S = 0.02
"""Longest a reconciliation waits, between two runs of GIVE_WAY_ROWS rows (about 5 ms of
work), for the delivery workers to rest: under a backlog that keeps them busy it still goes
on, at about a fifth of its speed."""

GIVE_WAY_PAUSE_S = 0.001
"""How often a reconciliation stepping aside looks whether the workers rest."""

RECONCILING_SWITCH_INTERVAL_S = 0.001
"""The interpreter's thread switch interval while a reconciliation runs beside the polls
(Python's default is 0.005 s)."""


@contextmanager
def _switching_often() -> Iterator[None]:
    """A reconciliation keeps one thread busy for seconds; every other thread (a poll, a
    delivery worker) coming back from the network waits for it to hand over the interpreter,
    up to the switch interval each time, a dozen times per booking. A shorter interval cuts
    that wait; it costs nothing while only one thread has work."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(RECONCILING_SWITCH_INTERVAL_S)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def _every(
    scheduler: BackgroundScheduler, job: Callable[[], None], seconds: float, name: str
) -> None:
    """`job` every `seconds` in the scheduler's threads: one run at a time, and runs missed
    meanwhile (a slow store, a busy machine) folded into one."""
    scheduler.add_job(
        job, IntervalTrigger(seconds=seconds), id=name, max_instances=1, coalesce=True
    )
