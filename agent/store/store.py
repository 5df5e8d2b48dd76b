"""The state store: one object per job over one set of connections.

- fingerprints: what Seyaha was last told, the baseline mark and the change cursors;
- queue: the outbox (enqueue, claim, complete, retry, dead-letter);
- admin: what operators do to the outbox (stats, list, retry, purge);
- coordination: the scanner lease and the status records agents share;
- migrate: the schema and its versions.

Its one promise across jobs: a scan's fingerprints and the messages it decided are written in
one transaction (commit_scan), so a crash at any point neither loses an update nor invents
one.
"""

from __future__ import annotations

from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from agent.clock import Clock, to_epoch_ms
from agent.db import create_engine
from agent.dialects import Dialect
from agent.errors import StateError, first_line
from agent.model import CatalogDiff, Message, SlotDiff
from agent.ranges import RangeDigest, RangeKey
from agent.store.admin import Admin
from agent.store.clock import StoreClock
from agent.store.connector import Connector, StoreBusy
from agent.store.coordination import Coordination, Fence
from agent.store.fingerprints import CATALOG_DIGEST, Fingerprints
from agent.store.meta import set_meta
from agent.store.migrate import Migrator, Plan
from agent.store.queue import Queue
from agent.store.ranges import BASIS as RANGES_BASIS
from agent.store.ranges import RangesRecord, RangesWrite, StoredRanges

__all__ = ["LeaseLost", "StateStore", "StoreBusy"]


class LeaseLost(StateError):
    """A scan finished after its agent lost the scanner lease: its result is not recorded."""


class StateStore:
    def __init__(self, engine: sa.Engine) -> None:
        self.connector = Connector(engine)
        self.fingerprints = Fingerprints(self.connector)
        self.queue = Queue(self.connector)
        self.admin = Admin(self.connector)
        self.coordination = Coordination(self.connector)

    @classmethod
    def from_url(cls, url: str) -> StateStore:
        return cls(create_engine(url, role="state"))

    @property
    def engine(self) -> sa.Engine:
        return self.connector.engine

    @property
    def dialect(self) -> Dialect:
        return self.connector.dialect

    @property
    def backend(self) -> str:
        return self.connector.dialect.name

    def open(self, *, clock: Clock | None = None) -> Plan:
        """Bring the schema to this agent's version (see store.migrate); returns what was
        done."""
        return Migrator(self.engine, clock=clock).migrate()

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        """Raise if the store cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def checkpoint(self) -> None:
        """Copy the SQLite store's write-ahead log into its file, waiting for no reader or
        writer: a daemon does it in the background, so that its commits do not (see
        agent.dialects.STORE_CHECKPOINT_PAGES). Nothing on a database server."""
        with self.engine.connect() as conn:
            self.dialect.checkpoint(conn)

    def probe_write(self) -> None:
        """Raise StateError unless the agent can write here (a read-only file, a user without
        UPDATE): a write that changes nothing, rolled back."""
        meta = sa.table("seyaha_meta", sa.column("key", sa.String), sa.column("value", sa.Text))
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")
                with conn.begin() as transaction:
                    conn.execute(
                        sa.update(meta)
                        .where(meta.c.key == "schema_version")
                        .values(value=meta.c.value)
                    )
                    transaction.rollback()
        except SQLAlchemyError as exc:
            raise StateError(
                f"the state store at {self.engine.url.render_as_string(hide_password=True)} "
                f"cannot be written: {first_line(exc)}. "
                "The agent records every scan and delivery there: give it write access."
            ) from None

    def clock(self, host: Clock) -> Clock:
        """The clock for everything this store stamps: the database's on a shared store,
        the host's on a SQLite file (see store.clock)."""
        return StoreClock(host, self.connector.now_ms) if self.dialect.shared else host

    def record_ranges(
        self,
        clean: Mapping[RangeKey, RangeDigest],
        dirty: Collection[RangeKey] = (),
        gone: Collection[RangeKey] = (),
        *,
        basis: str | None = None,
        scanner: Fence | None = None,
    ) -> None:
        """Store range digests a full pass computed (see StoredRanges.record) and, with
        `basis`, mark the digests as computed on it; `scanner` as in commit_scan."""
        with self.connector.write() as conn:
            self._hold_lease(conn, scanner)
            write = self._record_ranges(conn, RangesRecord(clean, dirty, gone, basis))
        self.fingerprints.ranges.wrote(write)

    @staticmethod
    def _record_ranges(conn: sa.Connection, record: RangesRecord) -> RangesWrite | None:
        write = StoredRanges.record(conn, record.clean, record.dirty, record.gone)
        if record.basis is not None:
            set_meta(conn, RANGES_BASIS, record.basis)
        return write

    def record_catalog_digest(self, token: str, *, scanner: Fence | None = None) -> None:
        """Store the token of the catalog a full pass read and recorded (see
        Fingerprints.catalog_token); `scanner` as in commit_scan."""
        with self.connector.write() as conn:
            self._hold_lease(conn, scanner)
            set_meta(conn, CATALOG_DIGEST, token)

    def record_slots_digest(self, written: str, text: str, *, scanner: Fence | None = None) -> bool:
        """Store the slots digest a full pass found the stored slots to match, unless
        something wrote them since `written` (see StoredRanges.record_total); `scanner` as
        in commit_scan. True if it was stored."""
        with self.connector.write() as conn:
            self._hold_lease(conn, scanner)
            return StoredRanges.record_total(conn, written, text)

    def reset_ranges(self, *, scanner: Fence | None = None) -> None:
        """Forget every stored range digest (their basis changed, or cannot be trusted)."""
        with self.connector.write() as conn:
            self._hold_lease(conn, scanner)
            write = StoredRanges.reset(conn, None)
        self.fingerprints.ranges.wrote(write)

    def _hold_lease(self, conn: sa.Connection, scanner: Fence | None) -> None:
        if scanner is not None and not self.coordination.holds(conn, scanner):
            raise LeaseLost(
                "another agent took over what this one was scanning (the scanner lease, or "
                "a shard of the integrations); its result is dropped and the other agent "
                "scans instead"
            )

    @contextmanager
    def reading(self) -> Iterator[sa.Connection]:
        """A read transaction for `fingerprints.iter_slots` (one picture of the store)."""
        with self.connector.long_read() as conn:
            yield conn

    def commit_scan(
        self,
        catalog: CatalogDiff,
        slots: SlotDiff,
        messages: Sequence[Message],
        now: datetime,
        *,
        baseline: bool = False,
        cursors: Mapping[str, str] | None = None,
        scanner: Fence | None = None,
        wait: bool = True,
        ranges: RangesRecord | None = None,
    ) -> int:
        """Record the new fingerprints and enqueue `messages`, all or nothing.

        `baseline` marks the state as baselined; `cursors` saves change cursors by name;
        `ranges` stores range digests in the same transaction (see record_ranges): the
        last changes of a full pass and the digests of the ranges they are in, whose
        digests the slots' writes then leave alone instead of clearing them first;
        `scanner` (on a shared store) names the agent and the leases it must still hold
        (the scanner lease, or its shards), or LeaseLost is raised and nothing is written; without `wait`, StoreBusy is raised
        at once when another transaction holds the store. Returns how many outbox rows
        were added or refreshed.
        """
        now_ms = to_epoch_ms(now)
        with self.connector.write() if wait else self.connector.write_now() as conn:
            self._hold_lease(conn, scanner)
            write = self.fingerprints.record(
                conn,
                catalog,
                slots,
                baseline_ms=now_ms if baseline else None,
                cursors=cursors or {},
                recorded=() if ranges is None else ranges.ranges,
            )
            enqueued = self.queue.enqueue(conn, messages, now_ms)
            digests = None if ranges is None else self._record_ranges(conn, ranges)
        self.fingerprints.ranges.wrote(write)
        self.fingerprints.ranges.wrote(digests)
        return enqueued
