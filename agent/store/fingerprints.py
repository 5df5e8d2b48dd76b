"""What Seyaha was last told: catalog and slot fingerprints, the baseline mark and the change
cursors. Reads stand alone; writes join the scan's transaction (StateStore.commit_scan)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Generator, Mapping, Sequence
from contextlib import ExitStack

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from agent.clock import from_epoch_ms, to_epoch_ms
from agent.db import lost_connection
from agent.errors import first_line
from agent.logs import event
from agent.model import CatalogDiff, CatalogKey, SlotDiff, SlotKey, StoredSlot
from agent.ranges import RangeKey
from agent.store import schema as t
from agent.store.connector import Connector
from agent.store.meta import get_meta, set_meta, set_metas
from agent.store.ranges import RangesWrite, StoredRanges
from agent.store.slots import SLOT_COLUMNS, SLOT_KEY, stored_slot

STREAM_BATCH_ROWS = 5000
"""Stored slots fetched per round trip by iter_slots."""

RESUME_ATTEMPTS = 3
"""Times a read of the stored slots carries on after losing the store (resuming_slots)."""

RESUME_PAUSE_S = 1.0
"""Pause before the first resumption; it doubles with each."""

log = logging.getLogger("agent.state")

BASELINE = "baseline_ms"
CATALOG_DIGEST = "catalog_digest"
"""agent.ranges.catalog_token of the catalog the store holds (absent: unknown)."""
CURSOR_PREFIX = "cursor:"

_CATALOG_KEY = (t.catalog_fingerprints.c.product_id, t.catalog_fingerprints.c.option_id)


class Fingerprints:
    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self.ranges = StoredRanges(connector)

    # -- reads --------------------------------------------------------------------------

    def is_baselined(self) -> bool:
        with self.connector.read() as conn:
            return get_meta(conn, BASELINE) is not None

    def load_catalog(self, owns: Callable[[str], bool] | None = None) -> dict[CatalogKey, str]:
        """The stored catalog; with `owns`, only the rows of the integrations it accepts (an
        agent that scans some shards of a platform)."""
        c = t.catalog_fingerprints.c
        with self.connector.read() as conn:
            rows = conn.execute(
                sa.select(c.product_id, c.option_id, c.fingerprint, c.integration_id)
            )
            return {
                (r.product_id, r.option_id): r.fingerprint
                for r in rows
                if owns is None or owns(r.integration_id)
            }

    def load_slots(self) -> dict[SlotKey, StoredSlot]:
        with self.connector.read() as conn:
            return {s.key: s for s in map(stored_slot, conn.execute(sa.select(*SLOT_COLUMNS)))}

    def iter_slots(
        self, conn: sa.Connection, *, after: SlotKey | None = None
    ) -> Generator[StoredSlot, None, None]:
        """Every stored slot in key order (code-point order), streamed in batches, within the
        read transaction `conn` (StateStore.reading); with `after`, those after that key."""
        query = sa.select(*SLOT_COLUMNS).order_by(*SLOT_KEY)
        if after is not None:
            query = query.where(sa.tuple_(*SLOT_KEY) > sa.tuple_(*after))
        # Options of this statement only: Connection.execution_options would set them on the
        # connection for every later statement of it too.
        result = conn.execute(
            query, execution_options={"stream_results": True, "yield_per": STREAM_BATCH_ROWS}
        )
        try:
            # Unpacked by position: a million rows per scan, and attribute look-ups on a Row
            # cost more than the rest of the loop.
            for product, option, availability, fingerprint, local, start_ms, to, row in result:
                yield StoredSlot(
                    (product, option, availability),
                    fingerprint,
                    local,
                    from_epoch_ms(start_ms),
                    to,
                    row,
                )
        finally:
            result.close()

    def resuming_slots(
        self,
        conn: sa.Connection,
        *,
        attempts: int = RESUME_ATTEMPTS,
        pause: Callable[[float], None] = time.sleep,
    ) -> Generator[StoredSlot, None, None]:
        """iter_slots on `conn`, carried on in a new read transaction after the last slot
        handed on when the connection to a server store is lost part-way (a failover, a
        restart): up to `attempts` times, pausing RESUME_PAUSE_S, doubling. The stored side
        of a long reconciliation, which then goes on instead of starting again."""
        last: StoredSlot | None = None
        failures = 0
        with ExitStack() as resumed:
            stream: Generator[StoredSlot, None, None] | None = self.iter_slots(conn)
            while True:
                try:
                    if stream is None:
                        resumed.close()
                        conn = resumed.enter_context(self.connector.long_read())
                        stream = self.iter_slots(conn, after=None if last is None else last.key)
                    for last in stream:
                        yield last
                    return
                except DBAPIError as exc:
                    if not lost_connection(exc):
                        raise
                    failures += 1
                    if failures > attempts:
                        raise
                    wait_s = RESUME_PAUSE_S * 2 ** (failures - 1)
                    rest = f"the rest (after {'/'.join(last.key)})" if last else "them again"
                    event(
                        log,
                        logging.WARNING,
                        "state.resuming",
                        f"reading the stored slots failed ({first_line(exc)}); reading {rest} "
                        f"in a new transaction in {wait_s:g} s (attempt {failures} of {attempts})",
                    )
                    pause(wait_s)
                    stream = None

    def lookup_slots(self, keys: Sequence[SlotKey]) -> dict[SlotKey, StoredSlot]:
        """The stored slots among `keys` (for incremental polls and late rows of a merge)."""
        with self.connector.read() as conn:
            rows = self.connector.dialect.lookup(conn, SLOT_COLUMNS, SLOT_KEY, keys)
            return {s.key: s for s in map(stored_slot, rows)}

    def lookup_catalog(self, keys: Collection[CatalogKey]) -> dict[CatalogKey, str]:
        """The stored fingerprints of the catalog rows among `keys` (for incremental polls:
        a poll needs a handful of them, not the whole catalog)."""
        c = t.catalog_fingerprints.c
        with self.connector.read() as conn:
            rows = self.connector.dialect.lookup(
                conn, (c.product_id, c.option_id, c.fingerprint), _CATALOG_KEY, keys
            )
            return {(r.product_id, r.option_id): r.fingerprint for r in rows}

    def catalog_integrations(self, keys: Collection[CatalogKey]) -> dict[CatalogKey, str]:
        """The integration each of these stored catalog rows belongs to."""
        c = t.catalog_fingerprints.c
        with self.connector.read() as conn:
            rows = self.connector.dialect.lookup(
                conn, (c.product_id, c.option_id, c.integration_id), _CATALOG_KEY, keys
            )
            return {(r.product_id, r.option_id): r.integration_id for r in rows}

    def expire(self, now_ms: int) -> int:
        """Forget the stored slots whose start has passed (a reconciliation that reads only
        the ranges that changed does not meet the others); returns how many."""
        tbl = t.slot_fingerprints
        with self.connector.write() as conn:
            return conn.execute(sa.delete(tbl).where(tbl.c.start_ms < now_ms)).rowcount or 0

    def catalog_token(self) -> str | None:
        """The token of the catalog's digest when the store last read it whole and nothing
        changed its catalog since (see Scanner._read_catalog)."""
        with self.connector.read() as conn:
            return get_meta(conn, CATALOG_DIGEST)

    def cursor(self, name: str) -> str | None:
        """The change cursor saved under `name` by the last scan, or None."""
        with self.connector.read() as conn:
            return get_meta(conn, CURSOR_PREFIX + name)

    def cursors(self, names: Collection[str]) -> dict[str, str]:
        """The change cursors saved under `names` (those saved; one query)."""
        keys = {CURSOR_PREFIX + name: name for name in names}
        with self.connector.read() as conn:
            rows = conn.execute(
                sa.select(t.meta.c.key, t.meta.c.value).where(t.meta.c.key.in_(sorted(keys)))
            )
            return {keys[row.key]: row.value for row in rows}

    # -- writes, inside the scan's transaction ------------------------------------------

    def record(
        self,
        conn: sa.Connection,
        catalog: CatalogDiff,
        slots: SlotDiff,
        *,
        baseline_ms: int | None,
        cursors: Mapping[str, str],
        recorded: Collection[RangeKey] = (),
    ) -> RangesWrite | None:
        """Write a scan's changes in the caller's transaction; what it wrote of the range
        digests is for StoredRanges.wrote once that transaction is committed. The digests
        of the ranges of `recorded`, which the transaction writes afterwards, are left
        alone (StoredRanges.touch)."""
        _apply_catalog(conn, catalog)
        if catalog.added or catalog.changed or catalog.removed:
            set_meta(conn, CATALOG_DIGEST, None)  # the catalog's digest is stored anew, or not
        _apply_slots(conn, slots)
        # Expired slots are forgotten without their ranges changing: the source rows a
        # digest was computed over may still hold them, out of scope (see diff_slots).
        write = StoredRanges.touch(
            conn,
            [
                *(s.key for s in slots.added),
                *(s.key for s in slots.changed),
                *(s.key for s in slots.removed),
            ],
            recorded,
        )
        if baseline_ms is not None:
            set_meta(conn, BASELINE, str(baseline_ms))
        set_metas(conn, {CURSOR_PREFIX + name: value for name, value in cursors.items()})
        return write


def _apply_catalog(conn: sa.Connection, diff: CatalogDiff) -> None:
    tbl = t.catalog_fingerprints
    matches = sa.and_(
        tbl.c.product_id == sa.bindparam("product"), tbl.c.option_id == sa.bindparam("option")
    )
    if diff.added:
        # Delete first: on a platform a product that moved to another integration is new
        # to the agent that scans that one, while its row still names the old one.
        conn.execute(
            sa.delete(tbl).where(matches),
            [{"product": r.product_id, "option": r.option_id} for r in diff.added],
        )
        conn.execute(
            sa.insert(tbl),
            [
                {
                    "product_id": r.product_id,
                    "option_id": r.option_id,
                    "fingerprint": r.fingerprint,
                    "integration_id": r.integration_id,
                }
                for r in diff.added
            ],
        )
    if diff.changed:
        conn.execute(
            sa.update(tbl)
            .where(matches)
            .values(fingerprint=sa.bindparam("new_fingerprint"), integration_id=sa.bindparam("to")),
            [
                {
                    "product": r.product_id,
                    "option": r.option_id,
                    "new_fingerprint": r.fingerprint,
                    "to": r.integration_id,
                }
                for r in diff.changed
            ],
        )
    if diff.removed:
        conn.execute(
            sa.delete(tbl).where(matches),
            [{"product": p, "option": o} for p, o in diff.removed],
        )


def _apply_slots(conn: sa.Connection, diff: SlotDiff) -> None:
    tbl = t.slot_fingerprints
    matches = sa.and_(
        tbl.c.product_id == sa.bindparam("product"),
        tbl.c.option_id == sa.bindparam("option"),
        tbl.c.availability_id == sa.bindparam("slot"),
    )
    if diff.added:
        # Delete first: an incremental poll racing a full scan may both find a slot new.
        conn.execute(
            sa.delete(tbl).where(matches),
            [
                {"product": s.product_id, "option": s.option_id, "slot": s.availability_id}
                for s in diff.added
            ],
        )
        conn.execute(
            sa.insert(tbl),
            [
                {
                    "product_id": s.product_id,
                    "option_id": s.option_id,
                    "availability_id": s.availability_id,
                    "fingerprint": s.fingerprint,
                    "local_start": s.local_date_time_start,
                    "start_ms": to_epoch_ms(s.start_utc),
                    "integration_id": s.integration_id,
                    "row_hash": s.source_hash,
                }
                for s in diff.added
            ],
        )
    if diff.changed:
        conn.execute(
            sa.update(tbl)
            .where(matches)
            .values(
                fingerprint=sa.bindparam("new_fingerprint"),
                local_start=sa.bindparam("local_start_text"),
                start_ms=sa.bindparam("start_epoch_ms"),
                integration_id=sa.bindparam("to"),
                # None from a row without a hash (a poll's): the next full pass builds it.
                row_hash=sa.bindparam("source_hash"),
            ),
            [
                {
                    "product": s.product_id,
                    "option": s.option_id,
                    "slot": s.availability_id,
                    "new_fingerprint": s.fingerprint,
                    "local_start_text": s.local_date_time_start,
                    "start_epoch_ms": to_epoch_ms(s.start_utc),
                    "to": s.integration_id,
                    "source_hash": s.source_hash,
                }
                for s in diff.changed
            ],
        )
    if diff.removed:
        # Only the row as it was found: on a platform, an agent that scans another
        # integration may have recorded the slot under it since (it moved there).
        conn.execute(
            sa.delete(tbl).where(matches, tbl.c.integration_id == sa.bindparam("was")),
            [
                {"product": p, "option": o, "slot": a, "was": s.integration_id}
                for s in diff.removed
                for p, o, a in (s.key,)
            ],
        )
    if diff.expired:
        conn.execute(
            sa.delete(tbl).where(matches),
            [{"product": p, "option": o, "slot": a} for p, o, a in diff.expired],
        )
    if diff.rehashed:
        # The fingerprint stays: only the row it was found to be built from is noted. Not
        # a write of the slot, so its range's digest stays too (see StoredRanges.touch).
        conn.execute(
            sa.update(tbl)
            .where(matches, tbl.c.fingerprint == sa.bindparam("kept_fingerprint"))
            .values(row_hash=sa.bindparam("source_hash")),
            [
                {
                    "product": s.product_id,
                    "option": s.option_id,
                    "slot": s.availability_id,
                    "kept_fingerprint": s.fingerprint,
                    "source_hash": s.source_hash,
                }
                for s in diff.rehashed
            ],
        )
