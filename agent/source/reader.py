"""Runs the configured catalog and slots queries and turns their rows into model values.

Both queries run in one read transaction (REPEATABLE READ where the database offers it) so
that a product and its slots are seen at the same moment. A row that cannot be used is
skipped with its key and the reason, and the rest of the result goes on.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import time
from collections.abc import Callable, Generator, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from agent.db import close_dead_cursor, connect_source, read_only, redact_url
from agent.dialects import (
    AFTER_PARAMS,
    DIGEST_WORK_MEM_MB,
    RANGE_LABEL,
    RANGE_OPTIONS_PARAM,
    RANGE_PRODUCTS_PARAM,
    RANGES_PARAM,
    ROW_HASH,
    Dialect,
    dialect_of,
)
from agent.diff import SourceItem, SourceSlot, Unconverted
from agent.errors import QueryError, SourceUnavailable, first_line
from agent.logs import event
from agent.model import CatalogKey, CatalogRow, SkippedRow, Slot, SlotKey
from agent.ranges import RangeTally, parse_label
from agent.source import rows
from agent.source.recent import RawKey, RawValues, RecentRows

STREAM_BATCH_ROWS = 5000
"""Rows fetched per round trip when streaming a large result."""

GIVE_WAY_ROWS = 256
"""Rows a read beside the polls (a reconciliation, the late-row sweep) reads between two
looks for a poll waiting to run (a few milliseconds of work: a poll waits at most that long
for it to step aside)."""

RESUME_ATTEMPTS = 3
"""Times a full read of the slots carries on after losing the source (SourceReader.resuming_slots)."""

READ_TRANSACTION_MAX_S = 30.0
"""Longest a full read of the slots keeps one source transaction open, by default
([source] read_transaction_max)."""

CLOCK_EVERY_ROWS = 256
"""A full read looks at the clock (read_transaction_max) once every this many rows."""

RESUME_PAUSE_S = 1.0
"""Pause before the first resumption; it doubles with each."""

PARALLEL_OPTIONS_MIN = 100
"""Fewest option ids whose range digests a full pass asks for with parallel workers allowed
(Dialect.read_in_parallel, where the caller allows them): about 20,000 rows at 200 slots an
option, past which the workers' start (a few milliseconds) pays."""

CHECK_ROW_LIMIT = 100
"""Rows `check` reads from each query: enough to catch bad values without a full scan."""

T = TypeVar("T")

log = logging.getLogger("agent.scan")

DUPLICATE_KEY = (
    "duplicate key: the query returned this key more than once, so no copy is sent and "
    "Seyaha keeps the last state it was told (make the query return each key once)"
)
DUPLICATE_KEY_APART = (
    "duplicate key: the query returned this key more than once, and not side by side in key "
    "order (the database orders these ids differently from their text), so the copy read "
    "first was used (make the query return each key once)"
)

_MYSQL_BAD_FIELD_ERROR = 1054
"""Unknown column, for PyMySQL releases that do not report the SQLSTATE."""


@dataclass
class Snapshot:
    """Everything one read of the source returned."""

    catalog: list[CatalogRow] = field(default_factory=list)
    slots: list[Slot] = field(default_factory=list)
    skipped: list[SkippedRow] = field(default_factory=list)
    catalog_protected: set[CatalogKey] = field(default_factory=set)
    """Catalog keys present in the result but unreadable: keep what the store remembers."""
    slots_protected: set[SlotKey] = field(default_factory=set)
    catalog_rows_read: int = 0
    slot_rows_read: int = 0
    slot_transactions: int = 1
    """Source transactions a full read of the slots took (see resuming_slots)."""
    slot_rows_unchanged: int = 0
    """Rows of a poll skipped because the previous poll handled them as they are (RecentRows)."""
    slot_rows_built: int = 0
    """Rows of a full read made into slots (the others were told unchanged by their hash,
    see agent.diff.Unconverted)."""
    handled: dict[RawKey, tuple[RawValues, SlotKey]] = field(default_factory=dict)
    """The slot rows of a poll to remember once its changes are recorded."""

    def duplicate_apart(self, key: SlotKey) -> None:
        """A later copy of a slot key the full scan's merge met apart from its first copy."""
        self.skipped.append(SkippedRow("slots_query", key, DUPLICATE_KEY_APART))


@dataclass
class StreamPosition:
    """How far a key-ordered read of the slots got: the row of the last slot it handed on,
    as the driver returned it (its key is spelled out only when a read carries on)."""

    row: Mapping[str, Any] | None = None

    @property
    def after(self) -> tuple[str, ...] | None:
        """The key of that slot, each id as the database orders it (its text)."""
        if self.row is None:
            return None
        return tuple(_as_text(self.row.get(c)) for c in rows.SLOT_KEY_COLUMNS)


class SourceReader:
    def __init__(
        self,
        engine: sa.Engine,
        *,
        catalog_query: str,
        slots_query: str,
        timezone: ZoneInfo,
        slots_changed_query: str | None = None,
        catalog_changed_query: str | None = None,
        query_timeout_s: float | None = None,
        transaction_max_s: float = READ_TRANSACTION_MAX_S,
        range_digests: bool = True,
        digest_work_mem_mb: int = DIGEST_WORK_MEM_MB,
        route: rows.Route | None = None,
    ) -> None:
        self.engine = engine
        self.route = route
        """A platform's rows name their integration (agent.integrations.Router); None: one."""
        routed = () if route is None else ("integration_id",)
        self.slot_columns: tuple[str, ...] = (*rows.SLOT_REQUIRED_COLUMNS, *routed)
        """The columns the slots queries must return."""
        self.catalog_columns: tuple[str, ...] = (*rows.CATALOG_KEY_COLUMNS, *routed)
        """The columns the catalog queries must return."""
        self.dialect: Dialect = dialect_of(engine)
        self.catalog_query = catalog_query
        self.slots_query = slots_query
        self.timezone = timezone
        self.slots_changed_query = slots_changed_query
        self.catalog_changed_query = catalog_changed_query
        self.query_timeout_s = query_timeout_s
        self.transaction_max_s = transaction_max_s
        self.uses_digests = range_digests and self.dialect.digests
        """Full reads use range digests (agent/ranges.py): configured, and the source can."""
        self.digest_work_mem_mb = digest_work_mem_mb
        self._hash_by_text: dict[str, bool] = {}
        """Per query name, whether its rows are hashed by their text (Dialect.row_hash_probe)."""

    @property
    def incremental(self) -> bool:
        """Whether polls can read only what changed (a slots_changed_query is configured)."""
        return self.slots_changed_query is not None

    @property
    def where(self) -> str:
        return redact_url(self.engine.url.render_as_string(hide_password=True))

    @contextmanager
    def transaction(self) -> Iterator[sa.Connection]:
        """One read transaction on the source, every query in it seeing the same moment."""
        conn = connect_source(self.engine, self.where)
        try:
            if self.dialect.source_isolation is not None:
                conn = conn.execution_options(isolation_level=self.dialect.source_isolation)
            try:
                transaction = conn.begin()
                self._limit_time(conn)
            except DBAPIError as exc:
                raise SourceUnavailable(
                    f"cannot use the source database at {self.where}: {first_line(exc)}"
                ) from None
            # Ended quietly: a connection that died after the last read, or a transaction
            # resuming_slots already ended, leaves what was read standing.
            with read_only(conn, transaction):
                yield conn
        finally:
            conn.close()

    def _limit_time(self, conn: sa.Connection) -> None:
        if self.query_timeout_s is not None:
            self.dialect.limit_statement_time(conn, self.query_timeout_s)

    def clock(self, conn: sa.Connection) -> Any:
        """The database's own current time: the upper bound of a change cursor.

        Taken from the database, not this host, so that clock skew between the agent and the
        application servers writing `updated_at` cannot open a gap.
        """
        return conn.exec_driver_sql(self.dialect.clock_sql()).scalar()

    def stream_slots(
        self,
        conn: sa.Connection,
        snapshot: Snapshot,
        *,
        after: tuple[str, ...] | None = None,
        position: StreamPosition | None = None,
        tally: RangeTally | None = None,
        ranges: Sequence[str] | None = None,
    ) -> Generator[SourceItem, None, None]:
        """Every slot, streamed through a server-side cursor in key order (see Dialect.ordered);
        with `after`, only those whose key (as the database orders it) comes after it.

        Unreadable rows whose key is sound come through as (key, None); skipped rows are
        recorded on `snapshot`. Memory does not grow with the size of the result. `position`
        is kept at the key, as the database has it, of the last slot handed on. With
        `tally`, each row's hash is added to its range's digest (agent/ranges.py), and with
        `ranges` (their labels) only the rows of those ranges are read. With `tally`, a row
        with a hash comes through unbuilt (agent.diff.Unconverted): the merge builds it only
        if the stored slot of its key was built from another row.
        """
        name = "slots_query"
        sql = self.slots_query
        if tally is not None or ranges is not None:
            sql = self.dialect.with_digests(
                sql, self._hashed_columns(conn), by_text=self._by_text(conn)
            )
        sql = self.dialect.ordered(
            sql, rows.SLOT_KEY_COLUMNS, after=after is not None, ranges=ranges is not None
        )
        params: dict[str, Any] = dict(zip(AFTER_PARAMS, after or (), strict=False))
        expanding: tuple[str, ...] = ()
        if ranges is not None:
            named = [r for r in map(parse_label, ranges) if r is not None]
            params[RANGES_PARAM] = list(ranges)
            params[RANGE_PRODUCTS_PARAM] = sorted({r[0] for r in named})
            params[RANGE_OPTIONS_PARAM] = sorted({r[1] for r in named})
            expanding = (RANGES_PARAM, RANGE_PRODUCTS_PARAM, RANGE_OPTIONS_PARAM)
        result = self._execute(
            conn, name, sql, self.slot_columns, stream=True, params=params, expanding=expanding
        )
        zone, route = self.timezone, self.route

        def build(raw: Mapping[str, Any], row_hash: int | None) -> Slot:
            snapshot.slot_rows_built += 1
            return rows.slot(raw, zone, route, row_hash)

        def unreadable(raw: Mapping[str, Any], exc: rows.BadRow | rows.Foreign) -> None:
            # Reported if bad; protected either way: the merge keeps its key's stored state.
            if isinstance(exc, rows.BadRow):
                snapshot.skipped.append(
                    SkippedRow(name, rows.raw_key(raw, rows.SLOT_KEY_COLUMNS), str(exc))
                )

        def built(raw: Mapping[str, Any], row_hash: int) -> Slot | None:
            """An Unconverted row's slot, built by the merge; a row that cannot be read is
            reported then, and spoils its range's digest."""
            try:
                return build(raw, row_hash)
            except (rows.BadRow, rows.Foreign) as exc:
                unreadable(raw, exc)
                if tally is not None:
                    tally.spoil(_slot_key(raw))
                return None

        # Rows come in key order, so the copies of a duplicated key are adjacent: each row is
        # held back until the next key differs, and a key that came twice goes on protected.
        held: SourceItem | None = None
        held_raw: Mapping[str, Any] = {}
        duplicated = False
        for raw in self._rows(result, name, None):
            snapshot.slot_rows_read += 1
            item: Slot | Unconverted | None = None
            key: SlotKey | None = None
            if tally is not None:
                row_hash = tally.row_hash(raw.get(ROW_HASH))
                if row_hash is not None:
                    try:
                        key = _slot_key(raw)
                    except rows.BadRow:
                        key = None  # reported below, as the row is built
                    else:
                        item = Unconverted(row_hash, raw, built)
            if key is None:
                try:
                    item = build(raw, None)
                    key = item.key
                except (rows.BadRow, rows.Foreign) as exc:
                    unreadable(raw, exc)
                    try:
                        key = _slot_key(raw)
                    except rows.BadRow:
                        continue
                    item = None
            if held is not None and held[0] == key:
                snapshot.skipped.append(
                    SkippedRow(name, rows.raw_key(raw, rows.SLOT_KEY_COLUMNS), DUPLICATE_KEY)
                )
                duplicated = True
                continue
            if held is not None:
                yield self._hand_on(held, held_raw, duplicated, position, tally)
            held, duplicated = (key, item), False
            held_raw = raw
        if held is not None:
            yield self._hand_on(held, held_raw, duplicated, position, tally)

    @staticmethod
    def _hand_on(
        held: SourceItem,
        raw: Mapping[str, Any],
        duplicated: bool,
        position: StreamPosition | None,
        tally: RangeTally | None,
    ) -> SourceItem:
        if position is not None:
            position.row = raw
        if duplicated and isinstance(held[1], Unconverted):
            held[1].slot()  # built only to report the first copy if it cannot be read
        if tally is not None:
            if duplicated or held[1] is None:
                tally.spoil(held[0])
            else:
                tally.add(held[0], raw.get(ROW_HASH), raw.get(RANGE_LABEL))
        return (held[0], None) if duplicated else held

    def range_digests(
        self,
        conn: sa.Connection,
        options: Sequence[str] | None = None,
        *,
        parallel: bool = False,
    ) -> DigestRows:
        """Per range of the slots query's rows, its label and "rows:sum" (the number of its
        rows and the sum of their hashes, agent.ranges.Digests), computed by the database:
        one row per range on the wire (see agent/ranges.py). Rows become Python objects one
        at a time: 500,000 ranges (10M slots) held at once as rows cost over 100 MB.
        `options`: only the ranges of these option ids (as range labels spell them);
        `parallel`: with parallel workers allowed for that read when there are at least
        PARALLEL_OPTIONS_MIN of them (not beside the polls: the workers would take both cores
        from them)."""
        sql = self.dialect.range_digest_sql(
            self.slots_query,
            self._hashed_columns(conn),
            by_text=self._by_text(conn),
            options=options is not None,
        )
        if options is None:
            return self._digests(conn, sql)
        if parallel and len(options) >= PARALLEL_OPTIONS_MIN:
            self.dialect.read_in_parallel(conn)
        return self._digests(conn, sql, {RANGE_OPTIONS_PARAM: list(options)})

    def option_digests(self, conn: sa.Connection) -> DigestRows:
        """Per option id of the slots query's rows (every product's together), the id as
        range labels spell it and "rows:sum" of its rows: fewer groups than ranges, so a
        pass finds the options that changed for about half the database's work of finding
        the ranges, and then asks for the ranges of those options only."""
        sql = self.dialect.option_digest_sql(
            self.slots_query, self._hashed_columns(conn), by_text=self._by_text(conn)
        )
        return self._digests(conn, sql)

    def _digests(
        self, conn: sa.Connection, sql: str, params: Mapping[str, Any] | None = None
    ) -> DigestRows:
        """The digests `sql` computes. The query runs now, not at the first row asked for: a
        caller does its own work while the database computes (PostgreSQL's whole result
        arrives before this returns)."""
        self.dialect.digest_memory(conn, self.digest_work_mem_mb)
        result = self._execute(
            conn,
            "slots_query",
            sql,
            (),
            stream=self.dialect.digests_through_cursor,
            params=params,
            expanding=tuple(params or ()),
        )
        return DigestRows(result)

    def catalog_digest(self, conn: sa.Connection) -> str:
        """The number of the catalog query's rows and the sum of their hashes, "rows:sum",
        computed by the database: one row on the wire. A full pass whose catalog digest is
        the one stored after the last pass that read the catalog skips reading it."""
        return self._total_digest(conn, "catalog_query")

    def slots_digest(self, conn: sa.Connection) -> str:
        """The same for the slots query, all of its rows at once: "rows:sum", the sums of
        the rows and digests of its ranges when every row has a range (range_digests). A
        pass asks for it before the ranges' when nothing was written to the stored slots
        since the last pass found them all unchanged: equal, it reads no range at all."""
        return self._total_digest(conn, "slots_query")

    def _total_digest(self, conn: sa.Connection, name: str) -> str:
        sql = self.dialect.total_digest_sql(
            self._query(name),
            self._hashed_columns(conn, name),
            by_text=self._by_text(conn, name),
        )
        self.dialect.digest_memory(conn, self.digest_work_mem_mb)
        result = self._execute(conn, name, sql, ())
        try:
            row: Any = result.one()
            count, total = row[0], row[1]
        except DBAPIError as exc:
            close_dead_cursor(exc)
            raise SourceUnavailable(f"{name} stopped part-way: {first_line(exc)}") from None
        return f"{count}:{total or 0}"

    def row_hash_kind(self, conn: sa.Connection, name: str = "slots_query") -> str:
        """How this source hashes the rows of query `name` for digests ("text" or "value"):
        part of the digests' basis, since digests of one kind say nothing of the other."""
        return "text" if self._by_text(conn, name) else "value"

    def _query(self, name: str) -> str:
        return self.catalog_query if name == "catalog_query" else self.slots_query

    def _by_text(self, conn: sa.Connection, name: str = "slots_query") -> bool:
        """Whether this source hashes the rows of query `name` by their text: found once per
        query, by running the dialect's probe in a savepoint (a failed statement would end
        the read transaction)."""
        known = self._hash_by_text.get(name)
        if known is not None:
            return known
        probe = self.dialect.row_hash_probe(self._query(name))
        by_text = False
        if probe is not None:
            try:
                with conn.begin_nested():
                    conn.exec_driver_sql(probe).all()
            except DBAPIError as exc:
                close_dead_cursor(exc)
                if _timed_out(exc):
                    raise QueryError(self._timed_out_message(name)) from None
                if exc.connection_invalidated or not _blames_query(exc):
                    raise SourceUnavailable(
                        f"{name} could not run on {self.where}: {first_line(exc)}"
                    ) from None
                by_text = True
                event(
                    log,
                    logging.INFO,
                    "scan.row_hash_text",
                    f"digests hash each row of {name} by its text (a column's type has no "
                    f"hash function: {first_line(exc)})",
                )
        self._hash_by_text[name] = by_text
        return by_text

    def _hashed_columns(self, conn: sa.Connection, name: str = "slots_query") -> list[str]:
        """Query `name`'s column names, for a dialect that hashes a row column by column."""
        if not self.dialect.hashes_by_column:
            return []
        return self.query_columns(conn, name)

    def query_columns(self, conn: sa.Connection, name: str) -> list[str]:
        """The column names query `name` returns (it runs with LIMIT 0)."""
        sql = f"SELECT * FROM (\n{self._query(name).strip().rstrip(';')}\n) q LIMIT 0"  # noqa: S608 - the operator's own query
        required = self.slot_columns if name == "slots_query" else self.catalog_columns
        result = self._execute(conn, name, sql, required)
        try:
            return [str(k) for k in result.keys()]  # noqa: SIM118 - a Result, not a dict
        finally:
            result.close()

    def resuming_slots(
        self,
        conn: sa.Connection,
        snapshot: Snapshot,
        *,
        attempts: int = RESUME_ATTEMPTS,
        pause: Callable[[float], None] = time.sleep,
        monotonic: Callable[[], float] = time.monotonic,
        tally: RangeTally | None = None,
        ranges: Sequence[str] | None = None,
    ) -> Generator[SourceItem, None, None]:
        """stream_slots on `conn`, in transactions of at most `transaction_max_s`, carried
        on when the source is lost part-way through.

        A full read of a large inventory takes long enough to hold back the supplier's
        vacuum (one snapshot kept open all along) and to meet a restarted database, a
        failover or a killed connection. So the read ends its transaction once it has read
        for `transaction_max_s` (after the query's first row) and reads the rest in a new
        one, from the key after the last slot handed on; a read that loses the source does the same, up to `attempts`
        times (pausing RESUME_PAUSE_S, doubling), and then the failure goes up. What was
        read stays read; the rest is seen as it is when it is read (the polls record what
        changed in between, as they do beside a reconciliation). Each new transaction runs
        the ordered query again, bounded to the keys after that one: the database reads the
        query's rows once more for every transaction (see README, read_transaction_max).
        """
        position = StreamPosition()
        failures = 0
        with ExitStack() as resumed:
            stream: Generator[SourceItem, None, None]
            stream = self.stream_slots(
                conn, snapshot, position=position, tally=tally, ranges=ranges
            )
            # Timed from the first row: the time the query takes before it (the database
            # sorting what is left) is not reading, and counting it could leave a new
            # transaction no time to read anything before the next one.
            began: float | None = None
            while True:
                try:
                    for n, item in enumerate(stream):
                        yield item
                        if n % CLOCK_EVERY_ROWS:
                            continue  # the clock is read once every CLOCK_EVERY_ROWS rows
                        if began is None:
                            began = monotonic()
                        elif monotonic() - began >= self.transaction_max_s:
                            break
                    else:
                        return
                    # Open long enough: end this transaction, carry on in a new one.
                    stream.close()
                    with suppress(SQLAlchemyError):
                        conn.commit()  # a read: nothing to keep, the snapshot is let go
                except SourceUnavailable as exc:
                    failures += 1
                    if failures > attempts:
                        raise
                    wait_s = RESUME_PAUSE_S * 2 ** (failures - 1)
                    rest = (
                        f"the rest of the slots (after {'/'.join(position.after)})"
                        if position.after
                        else "the slots from the first one"
                    )
                    event(
                        log,
                        logging.WARNING,
                        "scan.resuming",
                        f"{exc}; reading {rest} in a new transaction in {wait_s:g} s "
                        f"(attempt {failures} of {attempts})",
                    )
                    pause(wait_s)
                resumed.close()
                try:
                    conn = resumed.enter_context(self.transaction())
                except SourceUnavailable as exc:
                    if failures >= attempts:
                        raise
                    stream = _failing(exc)
                    continue
                snapshot.slot_transactions += 1
                stream = self.stream_slots(
                    conn,
                    snapshot,
                    after=position.after,
                    position=position,
                    tally=tally,
                    ranges=ranges,
                )
                began = None

    def read_catalog(self, conn: sa.Connection, snapshot: Snapshot) -> None:
        """Every catalog row, into `snapshot` (catalogs are small: thousands of rows)."""
        self._read_catalog(conn, snapshot, limit=None)

    def changed_slots(
        self,
        conn: sa.Connection,
        since: Any,
        snapshot: Snapshot,
        recent: RecentRows | None = None,
        *,
        seen: Callable[[RawKey, RawValues], bool] | None = None,
        give_way: Callable[[], None] | None = None,
    ) -> list[SourceSlot]:
        """Slots the slots_changed_query returns for `since` (an incremental poll).

        Rows `recent` holds exactly as they come back are skipped before conversion (counted
        in snapshot.slot_rows_unchanged); every readable row goes into snapshot.handled.
        Rows `seen` says are recorded as they are (the late-row sweep's SeenRows) are skipped
        and counted the same way, but not put in snapshot.handled. `give_way` is called
        every GIVE_WAY_ROWS rows (a read beside the polls).
        """
        assert self.slots_changed_query is not None
        name = "slots_changed_query"
        result = self._execute(
            conn,
            name,
            self.slots_changed_query,
            self.slot_columns,
            params={"since": since},
        )
        collect = _Collector(name, rows.SLOT_KEY_COLUMNS, snapshot.skipped)
        found: list[SourceSlot] = []
        zone, route = self.timezone, self.route
        key_columns = rows.SLOT_KEY_COLUMNS
        handled = snapshot.handled
        for raw in self._rows(result, name, None):
            if give_way is not None and snapshot.slot_rows_read % GIVE_WAY_ROWS == 0:
                give_way()
            snapshot.slot_rows_read += 1
            values = tuple(raw.values())
            raw_key = tuple(raw[c] for c in key_columns)
            if seen is not None and seen(raw_key, values):
                snapshot.slot_rows_unchanged += 1
                continue
            known = recent.unchanged(raw_key, values) if recent is not None else None
            if known is not None:
                if collect.first_time(raw, known):
                    snapshot.slot_rows_unchanged += 1
                    handled[raw_key] = (values, known)
                continue
            item = collect.convert(raw, lambda r: rows.slot(r, zone, route))
            if item is not None and collect.first_time(raw, item.key):
                found.append((item.key, item))
                with suppress(TypeError):  # a key value that cannot be hashed: not remembered
                    handled[raw_key] = (values, item.key)
        if collect.duplicates:
            found = [f for f in found if f[0] not in collect.duplicates]
            for raw_key, (_values, key) in list(handled.items()):
                if key in collect.duplicates:
                    del handled[raw_key]
        found.extend(((k[0], k[1], k[2]), None) for k in collect.protected)
        return found

    def changed_catalog(self, conn: sa.Connection, since: Any, snapshot: Snapshot) -> None:
        """Catalog rows the catalog_changed_query returns for `since`, into `snapshot`."""
        assert self.catalog_changed_query is not None
        self._read_catalog(
            conn,
            snapshot,
            limit=None,
            sql=self.catalog_changed_query,
            name="catalog_changed_query",
            params={"since": since},
        )

    def read(self) -> Snapshot:
        """Run both queries in one transaction and convert every row."""
        snapshot = Snapshot()
        with self.transaction() as conn:
            self._read_catalog(conn, snapshot, limit=None)
            self._read_slots(conn, snapshot, limit=None)
        return snapshot

    def catalog_keys(self) -> set[CatalogKey]:
        """The (product_id, option_id) pairs of the catalog (the sandbox's view of a sync)."""
        snapshot = Snapshot()
        with self.transaction() as conn:
            self._read_catalog(conn, snapshot, limit=None)
        return {row.key for row in snapshot.catalog}

    def sample(self, limit: int = CHECK_ROW_LIMIT) -> Snapshot:
        """Read the first `limit` rows of each query (for `check`)."""
        snapshot = Snapshot()
        with self.transaction() as conn:
            self._read_catalog(conn, snapshot, limit=limit)
            self._read_slots(conn, snapshot, limit=limit)
        return snapshot

    def _execute(
        self,
        conn: sa.Connection,
        name: str,
        sql: str,
        required: Sequence[str],
        *,
        stream: bool = False,
        params: Mapping[str, Any] | None = None,
        expanding: Sequence[str] = (),
    ) -> sa.CursorResult[Any]:
        try:
            # A server-side cursor reads a large result in batches instead of the driver
            # fetching all of it first.
            options: dict[str, Any] = (
                {"stream_results": True, "yield_per": STREAM_BATCH_ROWS} if stream else {}
            )
            statement = sa.text(sql)
            if expanding:
                statement = statement.bindparams(
                    *(sa.bindparam(n, expanding=True) for n in expanding)
                )
            # Options of this statement only: Connection.execution_options sets them on the
            # connection, and a later SET or SHOW of the transaction would then be sent as a
            # server-side cursor (DECLARE ... CURSOR FOR SET: a syntax error).
            result = conn.execute(statement, dict(params or {}), execution_options=options)
        except DBAPIError as exc:
            close_dead_cursor(exc)
            if _timed_out(exc):
                raise QueryError(self._timed_out_message(name)) from None
            if exc.connection_invalidated or (
                isinstance(exc, sa.exc.OperationalError) and not _blames_query(exc)
            ):
                raise SourceUnavailable(
                    f"{name} could not run on {self.where}: {first_line(exc)}"
                ) from None
            raise QueryError(f"{name} failed: {first_line(exc)}") from None
        except SQLAlchemyError as exc:
            raise QueryError(f"{name} failed: {first_line(exc)}") from None
        got = list(result.keys())
        if not result.returns_rows:
            raise QueryError(f"{name} returned no rows at all; it must be a SELECT")
        missing = rows.missing_columns(got, required)
        if missing:
            result.close()
            raise QueryError(
                f"{name} returned no column {', '.join(missing)} (got: {', '.join(got) or 'none'})"
            )
        return result

    def _timed_out_message(self, name: str) -> str:
        return (
            f"{name} was cancelled after {self.query_timeout_s:g} s "
            "(raise [source] query_timeout, or make the query cheaper)"
        )

    def _rows(
        self, result: sa.CursorResult[Any], name: str, limit: int | None
    ) -> Iterator[dict[str, Any]]:
        # Column names are lowered once, not per row: the loop runs a million times per scan.
        keys = [str(k).lower() for k in result.keys()]  # noqa: SIM118 - a Result, not a dict
        try:
            rows_in = result if limit is None else itertools.islice(result, limit)
            for row in rows_in:
                yield dict(zip(keys, row, strict=True))
        except DBAPIError as exc:
            close_dead_cursor(exc)
            if _timed_out(exc):
                raise QueryError(self._timed_out_message(name)) from None
            raise SourceUnavailable(f"{name} stopped part-way: {first_line(exc)}") from None
        finally:
            result.close()

    def _read_catalog(
        self,
        conn: sa.Connection,
        snapshot: Snapshot,
        limit: int | None,
        *,
        sql: str | None = None,
        name: str = "catalog_query",
        params: Mapping[str, Any] | None = None,
    ) -> None:
        result = self._execute(
            conn,
            name,
            sql or self.catalog_query,
            self.catalog_columns,
            stream=limit is not None,
            params=params,
        )
        collect = _Collector(name, rows.CATALOG_KEY_COLUMNS, snapshot.skipped)
        for raw in self._rows(result, name, limit):
            snapshot.catalog_rows_read += 1
            item = collect.convert(raw, lambda r: rows.catalog_row(r, self.route))
            if item is not None and collect.first_time(raw, item.key):
                snapshot.catalog.append(item)
        if collect.duplicates:
            snapshot.catalog[:] = [r for r in snapshot.catalog if r.key not in collect.duplicates]
        snapshot.catalog_protected |= {(k[0], k[1]) for k in collect.protected}

    def _read_slots(self, conn: sa.Connection, snapshot: Snapshot, limit: int | None) -> None:
        name = "slots_query"
        # The SQL a full scan runs, so that `check` passes only what the scan will run too.
        sql = self.dialect.ordered(self.slots_query, rows.SLOT_KEY_COLUMNS)
        result = self._execute(conn, name, sql, self.slot_columns, stream=limit is not None)
        collect = _Collector(name, rows.SLOT_KEY_COLUMNS, snapshot.skipped)
        zone, route = self.timezone, self.route
        for raw in self._rows(result, name, limit):
            snapshot.slot_rows_read += 1
            item = collect.convert(raw, lambda r: rows.slot(r, zone, route))
            if item is not None and collect.first_time(raw, item.key):
                snapshot.slots.append(item)
        if collect.duplicates:
            snapshot.slots[:] = [s for s in snapshot.slots if s.key not in collect.duplicates]
        snapshot.slots_protected |= {(k[0], k[1], k[2]) for k in collect.protected}


class _Collector:
    """Converts the rows of one query, remembering skipped rows, seen keys and protected keys."""

    def __init__(self, name: str, key_columns: Sequence[str], skipped: list[SkippedRow]) -> None:
        self.name = name
        self.key_columns = key_columns
        self.skipped = skipped
        self.seen: set[tuple[str, ...]] = set()
        self.protected: set[tuple[str, ...]] = set()
        self.duplicates: set[tuple[str, ...]] = set()
        """Keys returned more than once: no copy is used, and the key is protected."""

    def convert(
        self, raw: Mapping[str, Any], convert: Callable[[Mapping[str, Any]], T]
    ) -> T | None:
        """The converted row, or None after recording why it was skipped.

        A skipped row whose key is sound is protected: the store keeps its last known state
        instead of treating the row as gone.
        """
        try:
            return convert(raw)
        except (rows.BadRow, rows.Foreign) as exc:
            if isinstance(exc, rows.BadRow):
                self.skipped.append(
                    SkippedRow(self.name, rows.raw_key(raw, self.key_columns), str(exc))
                )
            try:
                key = tuple(rows.to_id(raw.get(c), c) for c in self.key_columns)
            except rows.BadRow:
                return None
            self.protected.add(key)
            self.seen.add(key)
            return None

    def first_time(self, raw: Mapping[str, Any], key: tuple[str, ...]) -> bool:
        """False (and the row is recorded as skipped) when the key was already returned; the
        copy returned before is then dropped too, by the caller, whatever the row order."""
        if key in self.seen:
            self.skipped.append(
                SkippedRow(self.name, rows.raw_key(raw, self.key_columns), DUPLICATE_KEY)
            )
            self.duplicates.add(key)
            self.protected.add(key)
            return False
        self.seen.add(key)
        return True


_TIMEOUT_SQLSTATES = frozenset({"57014"})
"""PostgreSQL query_canceled (statement_timeout)."""
_TIMEOUT_MYSQL_ERRORS = frozenset({3024, 1969})
"""MySQL max_execution_time exceeded; MariaDB max_statement_time exceeded."""


class DigestRows(Iterator[tuple[str, str]]):
    """(label, "rows:sum") pairs of a digest query that already ran, row by row as
    iterated; close() drops the rest (and frees the connection for its next statement)."""

    def __init__(self, result: sa.CursorResult[Any]) -> None:
        self._result = result
        self._pairs = self._iterate()

    def __next__(self) -> tuple[str, str]:
        return next(self._pairs)

    def close(self) -> None:
        self._pairs.close()
        self._result.close()

    def _iterate(self) -> Generator[tuple[str, str], None, None]:
        result = self._result
        try:
            # Row by row: Result.partitions() without a size fetched the whole result at
            # once (190 MB at 10M slots), where iterating honours yield_per.
            pair: Any
            for pair in result:
                range_name, text = pair
                if range_name is None:
                    continue
                if type(range_name) is str and type(text) is str:
                    yield range_name, text  # PostgreSQL
                else:  # MySQL's labels are binary (compared byte for byte): bytes here.
                    yield _as_text(range_name), _as_text(text)
        except DBAPIError as exc:
            close_dead_cursor(exc)
            raise SourceUnavailable(f"slots_query stopped part-way: {first_line(exc)}") from None
        finally:
            result.close()


def _slot_key(raw: Mapping[str, Any]) -> SlotKey:
    """A slot row's key as the agent spells its ids (rows.slot builds the same)."""
    product, option, slot = (rows.to_id(raw.get(c), c) for c in rows.SLOT_KEY_COLUMNS)
    return (product, option, slot)


def _timed_out(exc: DBAPIError) -> bool:
    original = exc.orig
    if getattr(original, "sqlstate", None) in _TIMEOUT_SQLSTATES:
        return True
    args: tuple[Any, ...] = getattr(original, "args", ())
    return bool(args) and args[0] in _TIMEOUT_MYSQL_ERRORS


def _blames_query(exc: DBAPIError) -> bool:
    """Whether an OperationalError is a mistake in the query, not an unreachable database.

    SQLite reports a syntax error or an unknown table or column as OperationalError with the
    generic SQLITE_ERROR code, and PyMySQL an unknown column (SQLSTATE 42S22, class 42:
    "syntax error or access rule violation"); retrying cannot fix either.
    """
    original = exc.orig
    if getattr(original, "sqlite_errorcode", None) == sqlite3.SQLITE_ERROR:
        return True
    sqlstate = getattr(original, "sqlstate", None)
    if isinstance(sqlstate, str):
        return sqlstate.startswith("42")
    args: tuple[Any, ...] = getattr(original, "args", ())
    return bool(args) and args[0] == _MYSQL_BAD_FIELD_ERROR


def _as_text(value: Any) -> str:
    """An id as the database's text cast spells it (Dialect.key_order_template): str of the
    value the driver returned (integers, decimals, UUIDs and strings all agree)."""
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return str(value)


def _failing(exc: SourceUnavailable) -> Generator[SourceItem, None, None]:
    """A stream that fails at once: the source could not be reached to carry on."""
    yield from ()
    raise exc
