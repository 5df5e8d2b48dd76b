"""One scan: read the source, diff against the stored fingerprints, plan, record atomically.

The decisions (diff, plan) are pure; this module only moves values between the source, the
pure functions and the state store, and reports what it saw.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Mapping
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from contextlib import AbstractContextManager, closing, nullcontext
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, TypeVar

from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from agent.ahead import ReadAhead, read_while_starting, while_waiting
from agent.clock import Clock, to_epoch_ms
from agent.db import lost_connection
from agent.diff import (
    SlotChange,
    SourceItem,
    SourceSlot,
    collect_changes,
    diff_catalog,
    diff_changed_slots,
    iter_slot_changes,
    without_keys,
)
from agent.errors import StateError, first_line
from agent.integrations import Router
from agent.logs import event
from agent.metrics import Metrics
from agent.model import (
    CatalogDiff,
    CatalogKey,
    Message,
    SkippedRow,
    Slot,
    SlotDiff,
    SlotKey,
    StoredSlot,
)
from agent.plan import plan
from agent.ranges import (
    Difference,
    DigestSum,
    RangeDigest,
    RangeKey,
    RangeTally,
    basis,
    catalog_token,
    compares_options_first,
    differing,
    label,
    options_to_compare,
    parse_label,
    range_of,
    row_salt,
    to_read,
)
from agent.shards import Ownership
from agent.source import cursor
from agent.source.reader import GIVE_WAY_ROWS, Snapshot, SourceReader
from agent.source.recent import RecentRows
from agent.source.seen import SeenRows
from agent.store import StateStore, StoreBusy
from agent.store.coordination import Fence
from agent.store.ranges import RangesRecord

log = logging.getLogger("agent.scan")

T = TypeVar("T")

SKIPPED_MEMORY = 10_000
"""Skipped rows remembered between scans, so a bad row is logged once, not on every poll."""


HELD_CHUNKS = 10
"""Chunks a full scan holds in memory while the state store is locked by another process
(about 5 MB per chunk of changed slots); past it the scan gives up rather than grow."""

CHUNK_ATTEMPTS = 3
"""Times a full scan records a chunk again after losing a server state store."""

CHUNK_PAUSE_S = 1.0
"""Pause before recording a chunk again; it doubles with each attempt."""

COMMIT_CHUNK = 5000
"""Slot changes written per state transaction during a full scan: memory stays bounded
whatever the number of changes, and each chunk keeps a slot's fingerprint and its message
together, so a crash between chunks loses nothing."""

SKIPPED_KEPT = 1000
"""Skipped rows kept in one report (the rest are counted): a broken column must not fill
memory with a million reasons."""

LIVE_OVERLAP_S = 5.0
"""Seconds behind the change cursor that every poll reads again: enough for the commits of
ordinary transactions to land behind the cursor, and SQLite's whole-second clock. The rest of
`cursor_overlap` is read by the late-row sweep beside the polls, so that after a bulk change
the polls do not read and diff its rows again for a whole overlap window."""

SWEEP_CHUNK = 1000
"""Changed rows a late-row sweep records per scan turn (each turn holds the polls back)."""

CURSOR = "slots"
"""Name of the change cursor in the state store; an agent that scans some shards of a
platform keeps one per shard (`slots@NN`), so that the next holder of a shard reads on
from where its last holder recorded."""

STORED_AHEAD = 20_000
"""Stored slots a reconciliation beside the polls reads ahead at most while it waits for
the source's first row (agent.ahead.read_while_starting): a few MB."""

RANGES_CHUNK = 2000
"""Range digests recorded per state transaction (and scan turn) at the end of a full pass."""


Turn = Callable[[], AbstractContextManager[object]]
"""Takes the agent's scan turn for a moment (its scan lock: no poll runs meanwhile); raises
when the agent may no longer scan (the state file was lost, another agent took the lease)."""


class Superseded(StateError):
    """A reconciliation running beside the polls was overtaken: a full scan ran meanwhile,
    or the scanner lease changed hands. What it recorded so far stays; the next goes on."""


@dataclass
class LiveChanges:
    """What the polls recorded since a reconciliation took its snapshot (its low watermark).

    A reconciliation beside the polls reads every row at one moment of the source (its
    snapshot, taken while no poll runs); polls go on meanwhile and record newer states. Each
    chunk of its changes is recorded in a scan turn (no poll runs then either) minus the keys
    gathered here: a poll that read a key after the snapshot saw it at least as new, so the
    reconciliation's value for that key is dropped (Netflix DBLog's watermark rule). A poll
    that begins after the chunk's turn reads the newer rows itself. Memory: one key per slot
    a poll recorded while the reconciliation ran.
    """

    touched: set[SlotKey] = field(default_factory=set)
    catalog: set[CatalogKey] = field(default_factory=set)
    polls: int = 0
    superseded: str | None = None

    def saw(self, keys: Iterable[SlotKey], catalog: Iterable[CatalogKey] = ()) -> None:
        self.polls += 1
        self.touched.update(keys)
        self.catalog.update(catalog)

    def check(self) -> None:
        if self.superseded is not None:
            raise Superseded(f"reconciliation stopped: {self.superseded}; the next one goes on")

    def keep(self, chunk: list[SlotChange]) -> list[SlotChange]:
        self.check()
        return without_keys(chunk, self.touched) if self.touched else chunk


@dataclass
class FullPass:
    """How a full pass reads the slots (see agent/ranges.py)."""

    tally: RangeTally | None = None
    """Digests of the ranges read, from their rows' hashes; None: the source has none."""
    ranges: list[RangeKey] | None = None
    """The ranges to read; None: every range."""
    basis: str | None = None
    reset: bool = False
    """The stored digests were computed on another basis: forget them first."""
    ranges_total: int = 0
    """Ranges the source has (0 when every range is read without asking)."""
    unchanged: bool = False
    """The source's digest of every slot row is the one recorded with the stored slots
    (SourceReader.slots_digest): no range is read."""
    written: str | None = None
    """The stored digests' WRITTEN token when the pass compared with them."""
    total: str | None = None
    """The source's slots digest, summed from its range digests (agent.ranges.DigestSum)."""

    @property
    def labels(self) -> list[str] | None:
        return None if self.ranges is None else [label(r) for r in self.ranges]


@dataclass
class ScanReport:
    at: datetime
    kind: str
    """"full" (every row read, deletes found) or "incremental" (only what changed)."""
    baseline: bool = False
    catalog: CatalogDiff = field(default_factory=CatalogDiff)
    slots_added: int = 0
    slots_changed: int = 0
    slots_removed: int = 0
    slots_expired: int = 0
    triggers: int = 0
    notifies: int = 0
    enqueued: int = 0
    skipped: list[SkippedRow] = field(default_factory=list)
    skipped_total: int = 0
    catalog_rows: int = 0
    slot_rows: int = 0
    slots_unchanged: int = 0
    """Rows a poll skipped unconverted: the previous poll handled them as they are."""
    slots_built: int = 0
    """Rows a full pass made into slots; the others it read matched the hash of the row
    their stored slot was built from (agent.diff.Unconverted)."""
    source_transactions: int = 1
    """Source transactions a full read took (SourceReader.resuming_slots)."""
    ranges_read: int | None = None
    """Ranges a full pass read, when it read only those that differ (agent/ranges.py)."""
    ranges_total: int | None = None
    slots_digest_matched: bool = False
    """No range was read: the source's digest of every slot row matched the stored one."""
    duration_s: float = 0.0

    @property
    def messages(self) -> int:
        return self.triggers + self.notifies

    def count(self, diff: SlotDiff, messages: list[Message], enqueued: int) -> None:
        self.slots_added += len(diff.added)
        self.slots_changed += len(diff.changed)
        self.slots_removed += len(diff.removed)
        self.slots_expired += len(diff.expired)
        self.triggers += sum(1 for m in messages if m.kind == "trigger")
        self.notifies += sum(1 for m in messages if m.kind == "notify")
        self.enqueued += enqueued

    def take_skipped(self, snapshot: Snapshot) -> None:
        self.skipped = snapshot.skipped[:SKIPPED_KEPT]
        self.skipped_total = len(snapshot.skipped)
        self.catalog_rows = snapshot.catalog_rows_read
        self.slot_rows = snapshot.slot_rows_read
        self.slots_built = snapshot.slot_rows_built
        self.source_transactions = snapshot.slot_transactions


@dataclass
class Scanner:
    reader: SourceReader
    store: StateStore
    clock: Clock
    metrics: Metrics
    overlap_s: float = 60.0
    recent: RecentRows = field(default_factory=RecentRows)
    """The rows the last poll handled: the next poll skips those that come back unchanged."""
    fence: Fence | None = None
    """On a shared store, the agent and the leases it must still hold for a scan's result
    to be recorded (StateStore.commit_scan): the scanner lease, or the shards it scans."""
    ownership: Ownership | None = None
    """The shards of a platform this agent scans, when agents share it (see own); None: it
    scans every row."""
    _ranges_reset: bool = False
    """The stored range digests must be read afresh: this agent scans every shard again
    after others scanned some of them."""
    commit_chunk: int = COMMIT_CHUNK
    """Slot changes a full scan records per state transaction (see COMMIT_CHUNK)."""
    live_overlap_s: float = LIVE_OVERLAP_S
    """The part of `overlap_s` every poll reads again (see LIVE_OVERLAP_S)."""
    seen: SeenRows = field(default_factory=SeenRows)
    """Rows recorded as they are, for the late-row sweep (see sweep)."""
    pause: Callable[[float], None] = time.sleep
    """Waits before a full read carries on after losing the source (resuming_slots)."""
    _swept_to: Any = None
    """The source clock the last sweep or full scan read at (the next sweep reads from it,
    minus the overlap); None until the first poll."""
    _reported: set[tuple[str, str, str]] = field(default_factory=set)
    _live: LiveChanges | None = None
    """Set while a reconciliation runs beside the polls (see reconcile)."""
    ranges_off: str | None = None
    """Why range digests are not used (ids the database spells otherwise than the agent)."""
    _changed: bool = False
    """The source is known to have changed since the last pass (see source_changed)."""
    _options_first: bool = False
    """The last pass compared option digests first (see _plan)."""

    @property
    def routed(self) -> bool:
        """Whether rows name their integration (a platform: see agent.integrations)."""
        return self.reader.route is not None

    def can_reconcile_beside(self) -> bool:
        """Whether `reconcile` can run beside the polls: a baselined store with a cursor."""
        return (
            self.reader.incremental
            and self._saved_cursor() is not None
            and self.store.fingerprints.is_baselined()
        )

    def own(self, ownership: Ownership | None, fence: Fence | None) -> None:
        """Scan the integrations of `ownership` from now on (None: every row), recording
        under `fence`. A change stops a reconciliation under way and empties what the polls
        remember: the store may hold what another agent recorded for the shards taken."""
        if ownership == self.ownership:
            self.fence = fence
            return
        self.supersede("the shards this agent scans changed")
        self.forget()
        if (
            ownership is not None
            and ownership.everything
            and self.ownership is not None
            and not self.ownership.everything
        ):
            self._ranges_reset = True
        self.ownership = ownership
        self.fence = fence
        if isinstance(self.reader.route, Router):
            self.reader.route.owns = (
                None if ownership is None or ownership.everything else ownership.owns
            )

    @property
    def _partial(self) -> Ownership | None:
        """The ownership when this agent scans only some shards."""
        own = self.ownership
        return None if own is None or own.everything else own

    def _cursor_names(self) -> list[str]:
        if self.ownership is None:
            return [CURSOR]
        return [f"{CURSOR}@{shard:02d}" for shard in sorted(self.ownership.shards)]

    def _saved_cursor(self) -> str | None:
        """Where the next poll reads from: the change cursor, or, scanning shards, the
        oldest of theirs (a shard without one yet reads from the cursor the baseline
        saved). None when there is none: the next scan reads everything."""
        names = self._cursor_names()
        if names == [CURSOR]:
            return self.store.fingerprints.cursor(CURSOR)
        saved = self.store.fingerprints.cursors([*names, CURSOR])
        found = [saved.get(name, saved.get(CURSOR)) for name in names]
        if any(value is None for value in found):
            return None
        return min((v for v in found if v is not None), key=cursor.decode)

    def _cursors(self, upper: Any) -> dict[str, str]:
        encoded = cursor.encode(upper)
        return {name: encoded for name in self._cursor_names()}

    def _digests(self) -> bool:
        """Whether full passes use range and catalog digests: where the source computes
        them, and only by an agent that scans every row (digests cover every integration)."""
        return self.reader.uses_digests and self.ranges_off is None and self._partial is None

    def load_digests(self) -> None:
        """Load the stored digests now, where every poll is a full pass (no change query):
        after a pass that wrote them, the next then starts with the source's digests instead
        of loading them first (0.2-0.3 s at 1M slots) on the way of what it finds. Nothing
        to read when they did not change since the last load, nor where the last pass
        compared option digests first (it reads the stored ranges of the options that
        differ only)."""
        if not self.reader.incremental and self._digests() and not self._options_first:
            self.store.fingerprints.ranges.load()

    @property
    def poll_overlap_s(self) -> float:
        """The window behind the cursor each poll reads again (the late-row sweep reads the
        rest of `overlap_s`)."""
        return min(self.overlap_s, self.live_overlap_s)

    def sweeps(self) -> bool:
        """Whether the late-row sweep has work: a change query, and an overlap wider than
        the polls read."""
        return self.reader.incremental and self.overlap_s > self.live_overlap_s

    def source_changed(self) -> None:
        """Say that the source changed since the last pass (a table's UPDATE_TIME moved):
        the next full pass does not ask for the digest of every row first, which only tells
        whether anything changed (on MariaDB about half of the pass that finds a booking)."""
        self._changed = True

    def forget(self) -> None:
        """Empty what the polls and sweeps remember of recorded rows: the store may have
        been changed by something else (another agent took the scanner lease)."""
        self.recent.clear()
        self.seen.clear()
        self._swept_to = None

    def supersede(self, why: str) -> None:
        """Stop a reconciliation running beside the polls at its next chunk (see LiveChanges)."""
        if self._live is not None:
            self._live.superseded = why

    def scan(self, *, resync: bool = False) -> ScanReport:
        """A full scan; with `resync`, every in-scope slot is notified (a deliberate backfill).

        Both sides stream: source rows come through a server-side cursor in key order and are
        merge-joined with the stored fingerprints, so memory follows the changes, not the
        inventory. Changes are committed in chunks of COMMIT_CHUNK, the trigger first.
        """
        started = self.clock.monotonic()
        snapshot = Snapshot()
        self.supersede("a full scan ran meanwhile")
        # A full scan also removes and expires slots: what the last poll saw may be stale.
        self.forget()
        with self.reader.transaction() as src:
            upper = self.reader.clock(src) if self.reader.incremental else None
            now = self.clock.now()
            report = ScanReport(
                at=now, kind="full", baseline=not self.store.fingerprints.is_baselined()
            )
            catalog_token = self._read_catalog(src, snapshot, report, everything=resync)
            full = self._plan(src, everything=resync or report.baseline)
            if full.reset:
                self.store.reset_ranges(scanner=self.fence)
            with self.store.reading() as stored:
                remembered, current = self._both_sides(src, stored, snapshot, full, ahead=True)
                # Closed here, on failure too, while their connections are still open: left
                # to the garbage collector, they would close their cursors on closed ones.
                with closing(remembered), closing(current):
                    changes = iter_slot_changes(
                        remembered,
                        current,
                        now,
                        in_store=lambda keys: self.store.fingerprints.lookup_slots(keys).keys(),
                        include_unchanged=resync,
                        on_duplicate=snapshot.duplicate_apart,
                    )
                    held = _Held(self, report, resync)
                    held.take(_chunks(changes, self.commit_chunk), self.commit_chunk)
                    if not held.chunks and not held.committed:
                        held.add([])  # the catalog's changes, or at least the scan's time
        # The supplier's database is no longer read: now the store may be waited for.
        self._flush_with_ranges(held, full, report)
        self._note_slots_digest(full, report)
        if catalog_token is not None:
            self.store.record_catalog_digest(catalog_token, scanner=self.fence)
        cursors = {} if upper is None else self._cursors(upper)
        self._swept_to = upper
        self.store.commit_scan(
            CatalogDiff(),
            SlotDiff(),
            [],
            now,
            baseline=report.baseline,
            cursors=cursors,
            scanner=self.fence,
        )
        report.take_skipped(snapshot)
        report.duration_s = self.clock.monotonic() - started
        self._observe(report)
        return report

    def reconcile(self, turn: Turn, give_way: Callable[[], None] = lambda: None) -> ScanReport:
        """A full reconciliation that runs beside the polls instead of stopping them.

        Polls take the scan turn (`turn`) only for a moment each; so does this: to read the
        catalog and take the source snapshot every slot is then read at, to record each
        chunk of changes (minus those LiveChanges holds), and to finish. Between those,
        polls and wake-ups go on. Every GIVE_WAY_ROWS rows it calls `give_way`, which
        returns once no poll runs: a poll runs alone, instead of sharing the interpreter
        with a reconciliation that would take it back every few milliseconds. The store
        must be baselined and a change cursor saved (Agent.full_scan falls back to `scan`
        otherwise).
        """
        started = self.clock.monotonic()
        snapshot = Snapshot()
        with self.reader.transaction() as src:
            with turn():
                # The snapshot: PostgreSQL takes it at the first statement, MySQL/MariaDB
                # (REPEATABLE READ) and SQLite (a deferred transaction) at the first read of
                # a table, the catalog's; every slot is then read as it was at this moment.
                upper = self.reader.clock(src)
                now = self.clock.now()
                report = ScanReport(at=now, kind="full")
                catalog_token = self._read_catalog(src, snapshot, report)
                if report.catalog.added or report.catalog.changed or report.catalog.removed:
                    # Recorded now, triggers first; polls read the catalog from the store.
                    # Not waited for: the source's transaction is open (see _Held).
                    self._commit_chunk(report, [], first=True, resync=False, wait=False)
                live = self._live = LiveChanges()
                # What the polls remembered before the snapshot may be older than it.
                self.forget()
            try:
                full = self._plan(src, everything=False, beside_polls=True)
                if full.reset:
                    with turn():
                        live.check()
                        self.store.reset_ranges(scanner=self.fence)
                with self.store.reading() as stored:
                    remembered, current = self._both_sides(src, stored, snapshot, full)
                    with closing(remembered), closing(current):
                        # While the database finds and sorts the rows of the ranges read
                        # (0.15 s at 1M slots, 0.1% changed), the stored side is read here.
                        source, ahead = read_while_starting(
                            current,
                            remembered,
                            name="seyaha-source-rows",
                            step_aside=give_way,
                            every=GIVE_WAY_ROWS,
                            limit=STORED_AHEAD,
                        )
                        changes = iter_slot_changes(
                            ahead,
                            _giving_way(source, give_way),
                            now,
                            in_store=lambda keys: self.store.fingerprints.lookup_slots(keys).keys(),
                            on_duplicate=snapshot.duplicate_apart,
                        )
                        held = _Held(self, report, resync=False, committed=1, turn=turn, live=live)
                        held.take(_chunks(changes, self.commit_chunk), self.commit_chunk)
            except BaseException:
                self._live = None
                raise
        try:
            self._flush_with_ranges(held, full, report, turn, live)
            self._note_slots_digest(full, report)
            with turn():
                live.check()
                if catalog_token is not None and not live.catalog:
                    # Not when a poll recorded catalog rows after the snapshot: the store
                    # then holds a catalog newer than the digest.
                    self.store.record_catalog_digest(catalog_token, scanner=self.fence)
                # The polls keep the cursor once one ran; before that, this moves it on.
                cursors = {} if live.polls else self._cursors(upper)
                self.store.commit_scan(
                    CatalogDiff(), SlotDiff(), [], now, cursors=cursors, scanner=self.fence
                )
                self._swept_to = upper
        finally:
            self._live = None
        report.take_skipped(snapshot)
        report.duration_s = self.clock.monotonic() - started
        self._observe(report)
        return report

    def _both_sides(
        self,
        src: Connection,
        stored: Connection,
        snapshot: Snapshot,
        full: FullPass,
        *,
        ahead: bool = False,
    ) -> tuple[
        Generator[StoredSlot, None, None] | ReadAhead[StoredSlot], Generator[SourceItem, None, None]
    ]:
        """What a full scan merges: the stored slots and the source's, both in key order,
        each read carried on across lost connections (and, the source's, across
        read_transaction_max); only those of `full.ranges` when it names them. `ahead`: the
        stored slots of `full.ranges` are read in a thread of their own while the source
        finds its rows (see agent/ahead.py). Not beside the polls, whose turns would then
        share the interpreter with that thread: read ahead there, stepping aside for them
        every GIVE_WAY_ROWS slots, it took the 0.1% case's both sides at 1M slots from
        0.42-0.47 s to 0.32-0.41 s, but a wake-up's p99 during reconciliations went to
        50-96 ms (six runs of `bench latency --modes reconciling`) from 49-53 ms (three).
        There the source's first row is awaited in a thread instead, which only waits, while
        the reconciliation's own thread reads the stored side (read_while_starting)."""
        if full.ranges == []:
            return _nothing(), _nothing()
        partial = self._partial
        remembered: Generator[StoredSlot, None, None] | ReadAhead[StoredSlot]
        if full.ranges is None:
            remembered = self.store.fingerprints.resuming_slots(stored, pause=self.pause)
            if partial is not None:
                remembered = _owned(remembered, partial)
        else:
            remembered = self.store.fingerprints.ranges.iter_slots(stored, full.ranges)
            if ahead:
                remembered = ReadAhead(remembered, name="seyaha-stored-slots")
        return (
            remembered,
            self.reader.resuming_slots(
                src,
                snapshot,
                pause=self.pause,
                monotonic=self.clock.monotonic,
                tally=full.tally,
                ranges=full.labels,
            ),
        )

    def _read_catalog(
        self, src: Connection, snapshot: Snapshot, report: ScanReport, *, everything: bool = False
    ) -> str | None:
        """The catalog's changes into `report`: read whole and diffed, or, where the source
        computes digests, skipped when its digest is the one stored after the last full
        pass that read it (catalog_token). Returns the token to store once the pass is
        recorded (None: nothing to store, the catalog was skipped or had unreadable rows)."""
        token: str | None = None
        if self._digests() and not self._ranges_reset:
            token = catalog_token(
                self.reader.catalog_query,
                f"{self.reader.dialect.name}/{self.reader.row_hash_kind(src, 'catalog_query')}",
                self.reader.catalog_digest(src),
            )
            if not everything and token == self.store.fingerprints.catalog_token():
                return None
        self.reader.read_catalog(src, snapshot)
        partial = self._partial
        report.catalog = self._leaving(
            diff_catalog(
                self.store.fingerprints.load_catalog(None if partial is None else partial.owns),
                snapshot.catalog,
                snapshot.catalog_protected,
            )
        )
        return None if snapshot.catalog_protected else token

    def _plan(self, src: Connection, *, everything: bool, beside_polls: bool = False) -> FullPass:
        """How a full pass reads (see agent/ranges.py): the ranges whose digest in the source
        differs from the stored one, or every range (a first pass, a resync, digests on
        another basis, most ranges changed), their digests tallied where the source has
        them. `everything`: read every range whatever the digests say."""
        changed, self._changed = self._changed, False
        if not self._digests():
            return FullPass()
        on = basis(
            self.reader.slots_query,
            self.reader.timezone.key,
            f"{self.reader.dialect.name}/{self.reader.row_hash_kind(src)}",
        )
        salt = row_salt(on)
        if self._ranges_reset or self.store.fingerprints.ranges.basis() != on:
            self._ranges_reset = False
            return FullPass(RangeTally(salt), basis=on, reset=True)
        if everything:
            return FullPass(RangeTally(salt), basis=on)
        ranges = self.store.fingerprints.ranges
        written = ranges.written()
        known = ranges.total(written)
        # The stored digests per option id, kept beside the ranges (about 5,000 rows at 1M
        # slots): on an inventory of many options a pass compares those first, and then
        # reads the stored digests of the ranges of the options that differ only.
        options, stored_ranges = ranges.counts()
        options_first = compares_options_first(options, stored_ranges)
        self._options_first = options_first
        # Else every stored range digest is compared: they load in a thread of their own
        # while the source computes its range digests, the agent's part hidden behind the
        # database's. Not beside the polls: that thread and the database's parallel workers
        # then take both cores from them (p99 of a wake-up during reconciliations 47 ms ->
        # 109-217 ms at 1M slots; see docs/performance-history.md).
        with (
            _Inline()
            if beside_polls or options_first
            else ThreadPoolExecutor(1, thread_name_prefix="seyaha-digests")
        ) as beside:
            loading = None if options_first else beside.submit(ranges.load)
            # Nothing written since a pass found every stored slot unchanged (`known`): the
            # sum of every slot row's digest tells whether the source still holds those
            # rows. Where option digests come first and the database groups by option for
            # about what the sum alone costs it (PostgreSQL), it is their sum: a pass that
            # finds a change then asks for nothing twice. Elsewhere it is one row, the sum
            # alone (a quiet inventory's pass then costs a sum, not a GROUP BY).
            summed = DigestSum()
            difference = None
            by_options = options_first and self.reader.dialect.groups_options_cheaply
            quiet = (
                known is not None
                and not by_options
                and not changed
                and self.reader.slots_digest(src) == known
            )
            if options_first and not quiet:
                difference = self._by_option(
                    src,
                    summed,
                    parallel=not beside_polls,
                    whole=known if by_options else None,
                )
                quiet = by_options and known is not None and summed.text == known
            if quiet:
                return FullPass(
                    RangeTally(salt),
                    ranges=[],
                    basis=on,
                    ranges_total=stored_ranges if loading is None else len(loading.result().ranges),
                    unchanged=True,
                )
            if difference is None:
                summed = DigestSum()
                source = summed.through(self.reader.range_digests(src))
                stored = ranges.load() if loading is None else loading.result()
                difference = differing(source, stored.ranges, ranges.labels)
        return FullPass(
            RangeTally(salt),
            ranges=to_read(difference),
            basis=on,
            ranges_total=difference.source_ranges,
            written=written,
            total=summed.text,
        )

    def _by_option(
        self,
        src: Connection,
        summed: DigestSum,
        *,
        parallel: bool,
        whole: str | None = None,
    ) -> Difference | None:
        """The ranges that differ, found by option first: the option ids whose digests
        differ from the stored ones (fewer groups than ranges: about half the database's
        work; the stored ones are read while the database computes), then the ranges of
        those options only (found by an index on the option, on both sides). None when too many differ: every range's digest is then asked for.
        `parallel`: the source may compute those with parallel workers
        (SourceReader.range_digests). `whole`: the digest of every slot row that the stored
        slots matched: every option digest then goes through `summed`, so that the caller
        can tell a pass that found nothing changed; the ranges' digests are then asked for
        only if it differs."""
        ranges = self.store.fingerprints.ranges
        source, stored = while_waiting(
            lambda: self.reader.option_digests(src),
            ranges.option_digests,
            name="seyaha-option-digests",
        )
        options = options_to_compare(
            differing(summed.through(source), stored.options, ranges.option_ids)
        )
        if whole is not None and summed.text == whole:
            return None  # nothing changed: the caller returns before asking for more
        if options is None:
            return None
        if not options:
            return Difference(set(), 0, stored.ranges, stored.ranges)
        # The stored digests of those options' ranges are read while the database computes
        # the source's (0.03-0.05 s of the store's, at 1M slots and 0.1% changed).
        digests, (table, labels) = while_waiting(
            lambda: self.reader.range_digests(src, options, parallel=parallel),
            lambda: ranges.of_options(options),
            name="seyaha-range-digests",
        )
        found = differing(digests, table, lambda: labels, scoped=True)
        # Counted over the ranges of those options: the others are as stored.
        others = stored.ranges - len(table)
        return replace(
            found,
            source_ranges=others + found.source_ranges,
            stored_ranges=others + found.stored_ranges,
        )

    def _note_slots_digest(self, full: FullPass, report: ScanReport) -> None:
        """After a pass that read no range (every stored range matched the source's), record
        the source's digest of every slot row with the stored slots, unless something wrote
        them since the pass compared (then it says nothing, and is not recorded)."""
        report.slots_digest_matched = full.unchanged
        if full.ranges != [] or full.total is None or full.written is None:
            return
        self.store.record_slots_digest(full.written, full.total, scanner=self.fence)

    def _flush_with_ranges(
        self,
        held: _Held,
        full: FullPass,
        report: ScanReport,
        turn: Turn = nullcontext,
        live: LiveChanges | None = None,
    ) -> None:
        """Once a full pass read the source: forget the slots past their start that a pass
        of some ranges did not meet, record the changes still held, and store the digests
        the pass tallied. Those go in the last chunk's transaction when they fit in one
        (RANGES_CHUNK ranges): its writes then leave the digests of their ranges alone
        instead of clearing them first, and it commits once (about 0.04 s of a 0.1% pass
        at 1M slots); else they are stored after it. Ranges the source spells otherwise
        than the agent turn digests off instead (see RangeTally.mismatched)."""
        tally = full.tally
        if tally is not None and full.ranges is not None:
            report.ranges_read, report.ranges_total = len(full.ranges), full.ranges_total
            with turn():
                if live is not None:
                    live.check()
                report.slots_expired += self.store.fingerprints.expire(to_epoch_ms(report.at))
        todo = None if tally is None or tally.mismatched else self._ranges_to_record(full, live)
        together = todo is not None and len(todo.ranges) <= RANGES_CHUNK
        recorded = held.flush(
            wait=True, ranges=todo.whole if todo is not None and together else None
        )
        if todo is not None and not recorded:
            self._record_ranges(todo, turn)
        if tally is not None and tally.mismatched:
            self.ranges_off = (
                f"{tally.mismatched} slot(s) have ids the source database spells otherwise "
                "than the agent reads them (spaces around them, or numbers with decimals)"
            )
            event(
                log,
                logging.WARNING,
                "scan.ranges_off",
                f"range digests are not used: {self.ranges_off}; every reconciliation reads "
                "every slot (trim or cast the ids in slots_query to use them)",
            )
            with turn():
                self.store.reset_ranges(scanner=self.fence)

    def _ranges_to_record(self, full: FullPass, live: LiveChanges | None) -> _RangesToRecord | None:
        """What a full pass stores of the digests it tallied, once its changes are recorded
        (None: nothing)."""
        assert full.tally is not None
        tally = full.tally
        if full.ranges is not None:
            gone = set(tally.gone(full.ranges))
        else:
            # Every range was read: a stored one the source returned no row of was emptied
            # (its slots' removal left it marked to be read again), and is forgotten too.
            stored = map(parse_label, self.store.fingerprints.ranges.labels())
            gone = set(tally.gone(r for r in stored if r is not None))
        digests = tally.clean()
        ranges = sorted({*digests, *tally.spoiled, *gone})
        if not ranges and full.ranges is not None and (live is None or not live.touched):
            return None  # nothing read, nothing to store: the stored digests stand as they are
        return _RangesToRecord(full, digests, tally.spoiled, gone, ranges, live)

    def _record_ranges(self, todo: _RangesToRecord, turn: Turn = nullcontext) -> None:
        """Store what `todo` says of the range digests, RANGES_CHUNK ranges a transaction
        (and a scan turn), once the pass's changes are recorded."""
        for start in range(0, max(len(todo.ranges), 1), RANGES_CHUNK):
            with turn():
                if todo.live is not None:
                    todo.live.check()
                clean, dirty, gone, on = todo.part(start, start + RANGES_CHUNK)
                self.store.record_ranges(clean, dirty, gone, basis=on, scanner=self.fence)

    def _commit_chunk(
        self,
        report: ScanReport,
        chunk: list[SlotChange],
        *,
        first: bool,
        resync: bool,
        wait: bool = True,
        ranges: RangesRecord | None = None,
    ) -> None:
        slots = collect_changes(chunk)
        backfill = [
            v for k, v in chunk if k in ("same", "changed", "added") and isinstance(v, Slot)
        ]
        catalog = report.catalog if first else CatalogDiff(removed=report.catalog.removed)
        if report.baseline and not resync:
            messages = plan(catalog, slots, baseline=True, routed=self.routed) if first else []
        else:
            messages = plan(catalog, slots, resync=backfill if resync else (), routed=self.routed)
            if not first:
                messages = [m for m in messages if m.kind != "trigger"]
        enqueued = self.store.commit_scan(
            catalog if first else CatalogDiff(),
            slots,
            messages,
            report.at,
            scanner=self.fence,
            wait=wait,
            ranges=ranges,
        )
        report.count(slots, messages, enqueued)

    def poll(self) -> ScanReport:
        """An incremental poll: only rows the change queries return since the cursor.

        Falls back to a full scan when there is no cursor yet (first run) or no change query.
        """
        saved = self._saved_cursor() if self.reader.incremental else None
        if saved is None:
            return self.scan()
        recent, self.recent = self.recent, RecentRows(self.recent.limit)
        # Until this poll is recorded, nothing is remembered: a failure below leaves the
        # memory empty, and the next poll diffs every row the full way.
        started = self.clock.monotonic()
        snapshot = Snapshot()
        previous = cursor.decode(saved)
        if self._swept_to is None:
            self._swept_to = previous  # the sweep covers the overlap behind the first poll
        since = cursor.since(previous, self.poll_overlap_s)
        with self.reader.transaction() as src:
            upper = self.reader.clock(src)
            found = self._read_changed(src, since, snapshot, recent=recent)
        now = self.clock.now()
        report = ScanReport(at=now, kind="incremental")
        report.catalog = self._catalog_changes(snapshot)
        stored = self.store.fingerprints.lookup_slots([key for key, _ in found])
        slots = diff_changed_slots(stored, found, now)
        messages = plan(report.catalog, slots, routed=self.routed)
        enqueued = self.store.commit_scan(
            report.catalog,
            slots,
            messages,
            now,
            cursors=self._cursors(upper),
            scanner=self.fence,
        )
        self.recent.replace(snapshot.handled)
        if self.sweeps():
            self.seen.remember((raw, values) for raw, (values, _) in snapshot.handled.items())
        if self._live is not None:
            self._live.saw((key for key, _ in found), (r.key for r in snapshot.catalog))
        report.count(slots, messages, enqueued)
        report.slots_unchanged = snapshot.slot_rows_unchanged
        report.take_skipped(snapshot)
        report.duration_s = self.clock.monotonic() - started
        self._observe(report)
        return report

    def sweep(self, turn: Turn, give_way: Callable[[], None] = lambda: None) -> ScanReport | None:
        """The late-row sweep: the change queries over the whole `cursor_overlap` window,
        beside the polls (which read only the last `poll_overlap_s`).

        It finds the rows of transactions that committed long after they stamped
        `updated_at`. Each sweep reads from where the previous one (or a full scan) read,
        minus the overlap; rows recorded as they are (SeenRows) are skipped before
        conversion, so the rows of a bulk change are diffed once, not on every pass. Like a
        reconciliation it reads at one snapshot of the source outside the scan turn and
        records in turns, minus the keys polls recorded meanwhile (LiveChanges). None when
        there is nothing to sweep (no change query, an overlap the polls already cover, no
        cursor yet).
        """
        if not self.sweeps() or self._swept_to is None:
            return None
        started = self.clock.monotonic()
        snapshot = Snapshot()
        since = cursor.since(self._swept_to, self.overlap_s)
        with self.reader.transaction() as src:
            with turn():
                upper = self.reader.clock(src)
                live = self._live = LiveChanges()
            try:
                found = self._read_changed(
                    src, since, snapshot, seen=self.seen.known, give_way=give_way
                )
            except BaseException:
                self._live = None
                raise
        try:
            report = ScanReport(at=self.clock.now(), kind="late")
            pending = [change for change in found if change[1] is not None]
            raw_rows = {key: (raw, values) for raw, (values, key) in snapshot.handled.items()}
            chunks = list(_chunks(pending, SWEEP_CHUNK))
            if snapshot.catalog and not chunks:
                chunks = [[]]  # the catalog's changes go with the first chunk
            for n, chunk in enumerate(chunks):
                first = n == 0
                give_way()
                with turn():
                    live.check()
                    if first:
                        snapshot.catalog = [
                            r for r in snapshot.catalog if r.key not in live.catalog
                        ]
                        report.catalog = self._catalog_changes(snapshot)
                    chunk = [c for c in chunk if c[0] not in live.touched]
                    stored = self.store.fingerprints.lookup_slots([key for key, _ in chunk])
                    slots = diff_changed_slots(stored, chunk, report.at)
                    messages = plan(
                        report.catalog if first else CatalogDiff(), slots, routed=self.routed
                    )
                    if messages or slots.added or slots.changed:
                        enqueued = self.store.commit_scan(
                            report.catalog if first else CatalogDiff(),
                            slots,
                            messages,
                            report.at,
                            scanner=self.fence,
                        )
                        report.count(slots, messages, enqueued)
                    # Recorded now (or found recorded): remembered, in this same turn.
                    self.seen.remember(raw_rows[key] for key, _ in chunk if key in raw_rows)
            with turn():
                live.check()
                self._swept_to = upper
        finally:
            self._live = None
        report.slots_unchanged = snapshot.slot_rows_unchanged
        report.take_skipped(snapshot)
        report.duration_s = self.clock.monotonic() - started
        self._observe(report)
        return report

    def _read_changed(
        self, src: Connection, since: object, snapshot: Snapshot, **read: Any
    ) -> list[SourceSlot]:
        """The change queries' rows since `since` (slots returned, catalog into `snapshot`).

        A slot of a (product, option) the store has not seen makes the whole catalog be read
        now, so that its trigger is queued before the slot's notify. Sent first, the notify
        would be answered updated:false, and the full scan's trigger would not resend the
        slot (Seyaha's catalog sync does not carry availability).
        """
        found = self.reader.changed_slots(src, since, snapshot, **read)
        if self.reader.catalog_changed_query is not None:
            self.reader.changed_catalog(src, since, snapshot)
        wanted = {(k[0], k[1]) for k, item in found if item is not None}
        wanted -= {r.key for r in snapshot.catalog}
        if wanted and len(self.store.fingerprints.lookup_catalog(wanted)) < len(wanted):
            snapshot.catalog.clear()
            self.reader.read_catalog(src, snapshot)
        return found

    def _catalog_changes(self, snapshot: Snapshot) -> CatalogDiff:
        """The catalog rows of `snapshot` that are new or changed against the store."""
        keys = {r.key for r in snapshot.catalog}
        stored = self.store.fingerprints.lookup_catalog(keys) if keys else {}
        return self._leaving(
            CatalogDiff(
                added=tuple(r for r in snapshot.catalog if r.key not in stored),
                changed=tuple(
                    r
                    for r in snapshot.catalog
                    if r.key in stored and stored[r.key] != r.fingerprint
                ),
            )
        )

    def _leaving(self, diff: CatalogDiff) -> CatalogDiff:
        """On a platform, `diff` with the integrations that lose a row: each removed row's, and
        each changed row's that moved to another integration (their catalogs changed too).
        An agent that scans some shards also meets a moved row as added: the store still
        holds it under an integration another agent scans."""
        if self.reader.route is None or not (diff.removed or diff.changed or diff.added):
            return diff
        moved = [*diff.changed, *diff.added] if self._partial is not None else [*diff.changed]
        if not (diff.removed or moved):
            return diff
        was = self.store.fingerprints.catalog_integrations([*diff.removed, *(r.key for r in moved)])
        left = {was[k] for k in diff.removed if k in was}
        left |= {was[r.key] for r in moved if was.get(r.key, r.integration_id) != r.integration_id}
        # Rows stored before the platform's configuration name no integration: no catalog
        # of one to trigger.
        return replace(diff, left=frozenset(left - {""}))

    def _observe(self, report: ScanReport) -> None:
        m = self.metrics
        (m.sweeps if report.kind == "late" else m.scans).labels("ok").inc()
        m.scan_duration.labels(report.kind).observe(report.duration_s)
        m.last_scan.set(report.at.timestamp())
        m.rows_read.labels("catalog_query").inc(report.catalog_rows)
        m.rows_read.labels("slots_query").inc(report.slot_rows)
        if report.ranges_read is not None and report.ranges_total is not None:
            m.ranges.labels("read").inc(report.ranges_read)
            m.ranges.labels("skipped").inc(max(0, report.ranges_total - report.ranges_read))
        for kind, count in (
            ("catalog_added", len(report.catalog.added)),
            ("catalog_changed", len(report.catalog.changed)),
            ("catalog_removed", len(report.catalog.removed)),
            ("slot_added", report.slots_added),
            ("slot_changed", report.slots_changed),
            ("slot_removed", report.slots_removed),
            ("slot_expired", report.slots_expired),
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

        if report.baseline and report.notifies:
            event(
                log,
                logging.INFO,
                "scan.resync",
                f"resync of an empty store recorded: {report.catalog_rows} catalog rows, "
                f"{report.notifies} notify(s) and {report.triggers} trigger(s) queued",
            )
        elif report.baseline:
            event(
                log,
                logging.INFO,
                "scan.baseline",
                f"baseline recorded: {report.catalog_rows} catalog rows, "
                f"{report.slots_added} slots in scope; "
                + (
                    "one sync/trigger queued"
                    if report.triggers == 1
                    else f"{report.triggers} sync/triggers queued (one per integration)"
                ),
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
                slots_added=report.slots_added,
                slots_changed=report.slots_changed,
                slots_removed=report.slots_removed,
                scan=report.kind,
                duration_ms=round(report.duration_s * 1000, 1),
                **_read_in(report),
            )
        else:
            # A reconciliation is said at INFO even when it found nothing (every
            # full_scan_interval, and its length is worth seeing); a quiet poll only at DEBUG.
            event(
                log,
                logging.INFO if report.kind == "full" else logging.DEBUG,
                "scan.unchanged",
                "no change" if report.kind != "full" else "reconciled: no change",
                scan=report.kind,
                duration_ms=round(report.duration_s * 1000, 1),
                **_read_in(report),
            )


@dataclass
class _Held:
    """A full scan's chunks not yet recorded, oldest first.

    While the scan reads the supplier's database, a chunk is written only if the state store
    is free at that instant (StateStore.commit_scan(wait=False)): waiting there would keep
    the source's read transaction, and on SQLite its lock, open for as long as another
    process holds our store, and the supplier's own writes would fail ("database is
    locked"). A chunk that cannot be written is held, in order (the first carries the
    trigger), and retried at the next chunk; what is still held when the read ends is written
    then, waiting as long as it takes. Holding is bounded (HELD_CHUNKS): past it the scan
    gives up, and the next one starts again from what was recorded.
    """

    scanner: Scanner
    report: ScanReport
    resync: bool
    chunks: list[list[SlotChange]] = field(default_factory=list)
    committed: int = 0
    turn: Turn = nullcontext
    """Taken around each chunk's recording (a reconciliation beside the polls)."""
    live: LiveChanges | None = None
    """Keys the polls recorded meanwhile, dropped from each chunk (see LiveChanges)."""
    failures: int = 0
    """Chunks recorded again after losing the store (at most CHUNK_ATTEMPTS in a scan)."""

    def take(self, chunks: Iterable[list[SlotChange]], size: int) -> None:
        """Record `chunks` of `size` changes as they come while the store is free (add),
        but a smaller one, the last: that one is held for the end of the read, and recorded
        then with the range digests of the pass, in one transaction
        (Scanner._flush_with_ranges)."""
        for chunk in chunks:
            if len(chunk) < size:
                self.chunks.append(chunk)
            else:
                self.add(chunk)

    def add(self, chunk: list[SlotChange]) -> None:
        self.chunks.append(chunk)
        self.flush(wait=False)
        if len(self.chunks) > HELD_CHUNKS:
            raise StoreBusy(
                f"the state store stayed locked by another process while this scan read "
                f"{len(self.chunks) * self.scanner.commit_chunk:,} changed slots; the scan stops here "
                "(what it recorded so far is kept) and the next one goes on. Look for a "
                "long transaction on the state store (an `outbox purge`, a backup, a shell)."
            )

    def flush(self, *, wait: bool, ranges: Callable[[], RangesRecord] | None = None) -> bool:
        """Record the chunks held, oldest first; without `wait`, only while the store is
        free. `ranges` (with `wait`): range digests to store with the last chunk, made in
        its turn. Returns whether they were (not when no chunk was held)."""
        recorded = False
        while self.chunks:
            try:
                with self.turn():
                    chunk = self.chunks[0] if self.live is None else self.live.keep(self.chunks[0])
                    last = wait and len(self.chunks) == 1
                    record = ranges() if last and ranges is not None else None
                    self.scanner._commit_chunk(
                        self.report,
                        chunk,
                        first=self.committed == 0,
                        resync=self.resync,
                        wait=wait,
                        ranges=record,
                    )
                    recorded = record is not None
            except StoreBusy:
                return recorded
            except DBAPIError as exc:
                # A lost connection to a server store (a failover, a restart): the chunk is
                # recorded again, whole (its writes are idempotent, its messages coalesce by
                # slot), instead of throwing the pass away. Waited for outside the turn.
                if not lost_connection(exc) or self.failures >= CHUNK_ATTEMPTS:
                    raise
                self.failures += 1
                wait_s = CHUNK_PAUSE_S * 2 ** (self.failures - 1)
                event(
                    log,
                    logging.WARNING,
                    "scan.chunk_retry",
                    f"recording {len(self.chunks[0])} changes failed ({first_line(exc)}); "
                    f"again in {wait_s:g} s (attempt {self.failures} of {CHUNK_ATTEMPTS})",
                )
                self.scanner.pause(wait_s)
                continue
            self.chunks.pop(0)
            self.committed += 1
        return recorded


@dataclass
class _RangesToRecord:
    """What a full pass stores of the range digests it tallied (Scanner._ranges_to_record),
    in parts or with its last changes; each part is made in the scan turn that records it,
    so that the ranges a poll wrote meanwhile keep no digest."""

    full: FullPass
    digests: Mapping[RangeKey, RangeDigest]
    spoiled: Collection[RangeKey]
    gone: Collection[RangeKey]
    ranges: list[RangeKey]
    live: LiveChanges | None

    def whole(self) -> RangesRecord:
        """Every range, in one part."""
        clean, dirty, gone, on = self.part(0, len(self.ranges))
        return RangesRecord(clean, dirty, gone, basis=on)

    def part(
        self, start: int, end: int
    ) -> tuple[dict[RangeKey, RangeDigest], set[RangeKey], list[RangeKey], str | None]:
        """(clean, dirty, gone, basis) of the ranges [start, end), the basis with the last
        part. A range a poll wrote after the snapshot keeps no digest: read it again."""
        part = self.ranges[start:end]
        last = end >= len(self.ranges)
        touched = {range_of(k) for k in self.live.touched} if self.live is not None else set()
        dirty = {r for r in part if r in self.spoiled or r in touched}
        if last:
            dirty |= touched - set(self.ranges)
        clean = {r: self.digests[r] for r in part if r in self.digests and r not in touched}
        gone = [r for r in part if r in self.gone and r not in touched]
        return clean, dirty, gone, self.full.basis if last else None


class _Inline(Executor):
    """Runs what it is given at once, in the caller's thread."""

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        done: Future[T] = Future()
        try:
            done.set_result(fn(*args, **kwargs))
        except Exception as exc:  # handed to the caller at result(), as a thread's would be
            done.set_exception(exc)
        return done


def _nothing() -> Generator[Any, None, None]:
    yield from ()


def _owned(
    stored: Generator[StoredSlot, None, None], ownership: Ownership
) -> Generator[StoredSlot, None, None]:
    """The stored slots of the integrations `ownership` scans (closing `stored` with it)."""
    owns = ownership.owns
    try:
        for slot in stored:
            if owns(slot.integration_id):
                yield slot
    finally:
        stored.close()


def _giving_way(items: Iterable[SourceItem], give_way: Callable[[], None]) -> Iterator[SourceItem]:
    for n, item in enumerate(items):
        if n % GIVE_WAY_ROWS == 0:
            give_way()
        yield item


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    batch: list[T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _read_in(report: ScanReport) -> dict[str, int]:
    """A full read's source transactions (see SourceReader.resuming_slots) and, when it read
    only the ranges that changed, how many of how many, for its log line."""
    if report.kind != "full":
        return {}
    fields = {
        "source_transactions": report.source_transactions,
        "slot_rows": report.slot_rows,
        "slots_built": report.slots_built,
    }
    if report.ranges_read is not None and report.ranges_total is not None:
        fields["ranges_read"] = report.ranges_read
        fields["ranges_total"] = report.ranges_total
    if report.slots_digest_matched:
        fields["slots_digest_matched"] = 1
    return fields


def _key_text(key: tuple[object, ...] | None) -> str:
    if key is None:
        return "(no key)"
    return "/".join("NULL" if k is None else str(k) for k in key)
