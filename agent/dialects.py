"""Every SQL difference between SQLite, PostgreSQL and MySQL/MariaDB, in one object per backend.

The source reader, the state store, the wake-ups and the engines ask the Dialect of their
engine instead of testing its name: session setup, the database's clock, key ordering,
statement time limits, row locking, bulk key look-ups and the advisory lock that serialises
migrations all live here, so adding a backend means adding one class.
"""

from __future__ import annotations

import fcntl
import os
import random
import sqlite3
import time
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import unquote

import sqlalchemy as sa
from sqlalchemy.engine import URL
from sqlalchemy.exc import DBAPIError

from agent.ranges import SEPARATOR, SUFFIX_CHARS

SQLITE_BUSY_TIMEOUT_MS = 10_000
"""How long a SQLite writer waits for another writer before failing (milliseconds)."""

STORE_CHECKPOINT_PAGES = 10_000
"""Pages in a SQLite store's write-ahead log past which a commit copies them into the
database file itself (a checkpoint). SQLite's default is 1,000: a checkpoint then fell into
every few commits of a poll or a reconciliation (about 0.03 s of a 0.1% pass at 1M slots).
A daemon checkpoints in the background instead (StateStore.checkpoint, every
CHECKPOINT_EVERY_S); this is the bound for a one-shot command, and for a daemon whose
checkpoints fall behind: about 40 MB of log at 4 KB pages. The last connection to close
checkpoints the rest."""

NO_WAIT_MS = 1
"""PostgreSQL's lock_timeout for a write that must not wait (milliseconds; 0 means never)."""

CONNECT_TIMEOUT_S = 10
"""Seconds to wait for a network database to accept a connection: a dead host fails fast."""

LOOKUP_BATCH = 500
"""Keys per IN (...) look-up on PostgreSQL and MySQL: far below their bound-parameter limits."""

SQLITE_LOOKUP_BATCH = 300
"""Keys per VALUES list on SQLite: 900 bound parameters, under the 999 of older SQLite builds."""

Role = str
""""source" (the supplier's database, read only) or "state" (the agent's own store)."""


AFTER_PARAMS = ("seyaha_after_0", "seyaha_after_1", "seyaha_after_2")
"""Parameters of Dialect.ordered(after=True): the key, as text, a read resumes after."""

RANGES_PARAM = "seyaha_ranges"
"""Parameter of Dialect.ordered(ranges=True): the labels of the ranges to read (expanding)."""

DIGEST_WORK_MEM_MB = 64
"""PostgreSQL: work_mem of the transaction that asks for digests ([source] digest_work_mem_mb)."""

RANGE_PRODUCTS_PARAM = "seyaha_range_products"
RANGE_OPTIONS_PARAM = "seyaha_range_options"
"""Parameters of Dialect.ordered(ranges=True): the product and option ids of those ranges, as
the database spells them (expanding). Bound untyped, the database reads each as its column's
type: a condition the database can answer from its indexes (see Dialect.ordered)."""

ROW_HASH = "seyaha_row_hash"
RANGE_LABEL = "seyaha_range"
"""Columns Dialect.with_digests adds to each row of the slots query (see agent/ranges.py)."""


class Dialect:
    """What every backend answers; the defaults are plain SQL that all three accept."""

    name: ClassVar[str]
    shared: ClassVar[bool] = True
    """Several agents may share one store here: leases, row locks and the database's clock."""
    listens: ClassVar[bool] = False
    """The source can push wake-ups (LISTEN/NOTIFY)."""
    key_order_template: ClassVar[str] = "CAST(q.{0} AS TEXT)"
    """Orders an id column as text in code-point order (the order Python sorts strings in)."""
    source_isolation: ClassVar[str | None] = "REPEATABLE READ"
    """Isolation of the source's read transaction: both queries see one moment."""
    digests: ClassVar[bool] = False
    """The source can hash rows and sum them per range (with_digests, range_digest_sql)."""
    hashes_by_column: ClassVar[bool] = False
    """with_digests needs the query's column names (no whole-row text to hash)."""
    digests_through_cursor: ClassVar[bool] = True
    """Range digests come through a server-side cursor, a batch at a time (otherwise the
    driver receives the whole result before the first row is read)."""
    groups_options_cheaply: ClassVar[bool] = False
    """The option digests (a GROUP BY of every row by the option column) cost the database
    about what the sum of every row's hash alone does, so that a pass that compares them
    first also tells a quiet inventory by their sum (see Scanner._plan)."""

    # -- engines ------------------------------------------------------------------------

    def engine_options(self, role: Role) -> tuple[dict[str, Any], dict[str, Any]]:
        """(create_engine keyword arguments, driver connect arguments) for `role`."""
        kwargs: dict[str, Any] = {"pool_pre_ping": True}
        if role == "state":
            kwargs["isolation_level"] = "READ COMMITTED"
        return kwargs, {"connect_timeout": CONNECT_TIMEOUT_S}

    def prepare(self, engine: sa.Engine, role: Role) -> None:
        """Hook session set-up onto a new engine (nothing by default)."""

    # -- the source ---------------------------------------------------------------------

    def limit_statement_time(self, conn: sa.Connection, seconds: float) -> None:
        """Cancel any statement of this transaction that runs longer than `seconds`."""

    def digest_memory(self, conn: sa.Connection, megabytes: int) -> None:
        """Let the rest of this transaction group rows in `megabytes` of memory (0: as the
        server is set); nothing where the session cannot say so for one transaction."""

    def read_in_parallel(self, conn: sa.Connection) -> None:
        """Let the rest of this transaction run a read of some options' rows, found by an
        index, with parallel workers where the server has them; nothing where it has none."""

    def checkpoint(self, conn: sa.Connection) -> None:
        """Copy what the store's write-ahead log holds into the database file, waiting for
        no reader or writer (nothing where the database does that itself)."""

    def clock_sql(self) -> str:
        """A SELECT of the database's current time, in the type its timestamp columns use:
        the upper bound of a change cursor."""
        raise NotImplementedError

    def ordered(
        self, sql: str, key_columns: Sequence[str], *, after: bool = False, ranges: bool = False
    ) -> str:
        """`sql` wrapped to come back in key order, each id compared as text in code-point
        order (byte order of UTF-8): the order the state store keeps its keys in, so that
        the two streams can be merge-joined. With `after`, only the rows whose key comes
        after the one bound as AFTER_PARAMS (the rest of a read that was cut off); with
        `ranges` (on a query wrapped by with_digests), only the rows of the ranges bound as
        RANGES_PARAM. Their product and option ids (RANGE_PRODUCTS_PARAM, RANGE_OPTIONS_PARAM)
        narrow the read beforehand: a range's label is made from every row, so a condition on
        the label alone has the database go through all of them, where one on the option id
        the slots table is indexed by reads the changed options' slots only."""
        inner = _bare(sql)
        keys = [self.key_order_template.format(c) for c in key_columns]
        conditions = []
        if after:
            bound = ", ".join(f":{p}" for p in AFTER_PARAMS[: len(keys)])
            conditions.append(f"({', '.join(keys)}) > ({bound})")
        if ranges:
            product, option, _ = _KEY_COLUMNS
            conditions.append(f"q.{product} IN :{RANGE_PRODUCTS_PARAM}")
            conditions.append(f"q.{option} IN :{RANGE_OPTIONS_PARAM}")
            conditions.append(f"q.{RANGE_LABEL} IN :{RANGES_PARAM}")
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        # The query on lines of its own: a trailing `-- comment` would swallow the ")".
        return f"SELECT * FROM (\n{inner}\n) q{where} ORDER BY {', '.join(keys)}"  # noqa: S608 - the operator's own query

    def row_hash(self, columns: Sequence[str], *, by_text: bool = False) -> str:
        """A 64-bit hash of the row `q` (of a query whose column names are `columns`) as an
        integer expression. `by_text`: hash the row's text, for columns of types the
        database cannot hash by value (see row_hash_probe)."""
        raise NotImplementedError

    def label(self, alias: str) -> str:
        """The label of the range of the slot row `alias` (agent.ranges.label), spelled by
        the database."""
        raise NotImplementedError

    def with_digests(
        self, sql: str, columns: Sequence[str], *, by_text: bool = False, options: bool = False
    ) -> str:
        """`sql` with two more columns per row: ROW_HASH (see row_hash) and RANGE_LABEL.
        `options`: only the rows of the option ids bound as RANGE_OPTIONS_PARAM."""
        return (
            f"SELECT q.*, {self.row_hash(columns, by_text=by_text)} AS {ROW_HASH},"  # noqa: S608 - the operator's own query
            f" {self.label('q')} AS {RANGE_LABEL} FROM (\n{_bare(sql)}\n) q{_of_options(options)}"
        )

    def total_digest_sql(self, sql: str, columns: Sequence[str], *, by_text: bool = False) -> str:
        """The number of `sql`'s rows and the sum of their hashes (one row, two columns):
        the digest of a whole query (the catalog's)."""
        return (
            f"SELECT COUNT(*), SUM({self.row_hash(columns, by_text=by_text)})"  # noqa: S608 - the operator's own query
            f" FROM (\n{_bare(sql)}\n) q"
        )

    def range_digest_sql(
        self, sql: str, columns: Sequence[str], *, by_text: bool = False, options: bool = False
    ) -> str:
        """One row per range of `sql`'s rows: its label, and its number of rows and the sum
        of their hashes as one text, "rows:sum" (see with_digests, agent.ranges.Digests).
        `options`: only the ranges of the option ids bound as RANGE_OPTIONS_PARAM, which the
        database finds from an index on the option column instead of going through every
        row."""
        digested = self.with_digests(sql, columns, by_text=by_text, options=options)
        return (
            f"SELECT d.{RANGE_LABEL}, CONCAT(COUNT(*), ':', SUM(d.{ROW_HASH})) AS seyaha_digest"  # noqa: S608 - the operator's own query
            f" FROM (\n{digested}\n) d GROUP BY d.{RANGE_LABEL}"
        )

    def option_digest_sql(self, sql: str, columns: Sequence[str], *, by_text: bool = False) -> str:
        """One row per option id of `sql`'s rows (every product's together): the id as range
        labels spell it, and "rows:sum" of its rows. Fewer groups than ranges: the database
        groups 1M rows into 5,000 options in about half the time it takes into 50,000 ranges."""
        option = f"q.{_KEY_COLUMNS[1]}"
        return (
            f"SELECT {self.option_text(option)} AS {RANGE_LABEL},"  # noqa: S608 - the operator's own query
            f" CONCAT(COUNT(*), ':', SUM({self.row_hash(columns, by_text=by_text)}))"
            f" AS seyaha_digest FROM (\n{_bare(sql)}\n) q GROUP BY {self.option_text(option)}"
        )

    def option_text(self, column: str) -> str:
        """An option id as a range's label spells it (its middle part, see label)."""
        raise NotImplementedError

    def row_hash_probe(self, sql: str) -> str | None:
        """A query that fails when with_digests cannot hash `sql`'s rows by value, or None
        when there is only one way."""
        return None

    def file_database(self, url: URL) -> Path | None:
        """The database file behind `url`, for backends that are a local file."""
        return None

    # -- the state store ----------------------------------------------------------------

    def now_ms(self, conn: sa.Connection) -> int:
        """The database's clock, in epoch milliseconds."""
        raise NotImplementedError

    def lock_rows(self, query: sa.Select[Any]) -> sa.Select[Any]:
        """Lock the rows `query` reads until the transaction ends."""
        return query.with_for_update()

    def skip_locked(self, query: sa.Select[Any], of: sa.Table) -> sa.Select[Any]:
        """Skip rows another transaction holds instead of queueing behind its lock: several
        agents claiming from one outbox each take different rows."""
        return query.with_for_update(skip_locked=True, of=of)

    def lookup(
        self,
        conn: sa.Connection,
        columns: Sequence[sa.Column[Any]],
        key: Sequence[sa.Column[Any]],
        keys: Collection[tuple[str, ...]],
    ) -> Iterator[sa.Row[Any]]:
        """Rows whose `key` columns equal one of `keys`, searched through the primary key
        (PostgreSQL and MySQL search it once per item of a row-value IN list)."""
        ordered = list(keys)
        for start in range(0, len(ordered), LOOKUP_BATCH):
            batch = ordered[start : start + LOOKUP_BATCH]
            yield from conn.execute(sa.select(*columns).where(sa.tuple_(*key).in_(batch)))

    @contextmanager
    def without_waiting(self, conn: sa.Connection) -> Iterator[None]:
        """A write transaction on `conn` that fails at once (see is_busy) instead of waiting
        for a lock another transaction holds; the connection waits again afterwards."""
        with conn.begin():
            yield

    def is_busy(self, exc: DBAPIError) -> bool:
        """Whether `exc` says a lock was held by another transaction (see without_waiting)."""
        return False

    def is_conflict(self, exc: DBAPIError) -> bool:
        """Whether `exc` says the database rolled the whole transaction back to break a
        deadlock between transactions (or a serialization failure): run again, it succeeds.
        SQLite has none: a write transaction takes the one write lock up front."""
        return False

    def limit_lock_wait(self, conn: sa.Connection, seconds: float) -> None:
        """In the transaction open on `conn`, a lock held by another transaction is waited for
        at most `seconds` (then the statement fails). SQLite's busy timeout does it for every
        transaction; MySQL's row locks are skipped (SKIP LOCKED): nothing by default."""

    def try_lock(self, conn: sa.Connection, name: str) -> bool:
        """Take the advisory lock `name` for this connection's session, without waiting."""
        raise NotImplementedError

    def unlock(self, conn: sa.Connection, name: str) -> None:
        raise NotImplementedError


class SqliteDialect(Dialect):
    name = "sqlite"
    shared = False
    source_isolation = None  # a SQLite transaction is serializable already

    def engine_options(self, role: Role) -> tuple[dict[str, Any], dict[str, Any]]:
        # A SQLite "connection" is a file handle: there is no server whose restart a ping
        # detects. The driver's own transaction handling is switched off: it never begins a
        # transaction before a SELECT, so the source's two queries would each see a different
        # moment, and the store could not open write transactions with BEGIN IMMEDIATE.
        # _begin starts every transaction instead.
        return {"pool_pre_ping": False}, {
            "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000,
            "check_same_thread": False,
            "isolation_level": None,
        }

    def prepare(self, engine: sa.Engine, role: Role) -> None:
        sa.event.listen(engine, "connect", _state_pragmas if role == "state" else _pragmas)
        sa.event.listen(engine, "begin", _begin)

    def clock_sql(self) -> str:
        return "SELECT strftime('%Y-%m-%d %H:%M:%f', 'now')"

    def file_database(self, url: URL) -> Path | None:
        database = url.database
        if database and database.startswith("file:"):
            # A URI filename (sqlite:///file:/path/state.db?mode=ro&uri=true).
            if url.query.get("mode") == "memory":
                return None
            database = unquote(database[len("file:") :].partition("?")[0])
        return Path(database) if database and database != ":memory:" else None

    def now_ms(self, conn: sa.Connection) -> int:
        return _integer(
            conn.exec_driver_sql(
                "SELECT CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)"
            ).scalar()
        )

    def lock_rows(self, query: sa.Select[Any]) -> sa.Select[Any]:
        # A SQLite write transaction (BEGIN IMMEDIATE) already excludes every other writer.
        return query

    def skip_locked(self, query: sa.Select[Any], of: sa.Table) -> sa.Select[Any]:
        return query

    @contextmanager
    def without_waiting(self, conn: sa.Connection) -> Iterator[None]:
        # On the driver's connection, outside any transaction: through `conn` the PRAGMA
        # would begin the transaction (with the busy timeout still set).
        raw = conn.connection.dbapi_connection
        assert raw is not None
        raw.execute("PRAGMA busy_timeout = 0")
        try:
            with conn.begin():
                yield
        finally:
            with suppress(Exception):
                raw.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")

    def checkpoint(self, conn: sa.Connection) -> None:
        # PASSIVE: as much of the log as no reader still needs, without waiting or calling
        # the busy handler. On the driver's connection, outside any transaction.
        raw = conn.connection.dbapi_connection
        assert raw is not None
        raw.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()

    def is_busy(self, exc: DBAPIError) -> bool:
        # SQLITE_BUSY; SQLite says "database is locked" (a table lock says "... table is
        # locked", which is SQLITE_LOCKED and not a wait).
        return "database is locked" in str(exc.orig)

    def lookup(
        self,
        conn: sa.Connection,
        columns: Sequence[sa.Column[Any]],
        key: Sequence[sa.Column[Any]],
        keys: Collection[tuple[str, ...]],
    ) -> Iterator[sa.Row[Any]]:
        # SQLite answers a row-value IN list with a scan of the whole table, but joins a list
        # of VALUES to the table through its primary key: one statement per batch.
        ordered = list(keys)
        table = key[0].table.name
        names = ", ".join(c.name for c in key)
        joined = " AND ".join(f"t.{c.name} = k.{c.name}" for c in key)
        selected = ", ".join(f"t.{c.name}" for c in columns)
        row = "(" + ", ".join("?" * len(key)) + ")"
        for start in range(0, len(ordered), SQLITE_LOOKUP_BATCH):
            batch = ordered[start : start + SQLITE_LOOKUP_BATCH]
            sql = (
                f"WITH k({names}) AS (VALUES {', '.join([row] * len(batch))}) "  # noqa: S608 - names are the store's own
                f"SELECT {selected} FROM k JOIN {table} t ON {joined}"
            )
            yield from conn.exec_driver_sql(sql, tuple(v for k in batch for v in k))


class PostgresDialect(Dialect):
    name = "postgresql"
    listens = True
    digests = True
    # PostgreSQL never plans a query behind a cursor with parallel workers: the range
    # digests of 1M slots took 2.7 s through one and 1.8 s without on two cores. The
    # result, one short row per range, is received whole: about 90 bytes a range in
    # libpq (45 MB at 10M slots).
    digests_through_cursor = False
    # At 1M slots the option digests took 0.42-0.45 s, the sum alone 0.38-0.42 s (parallel
    # workers do both); in CPU at rest, under a daemon polling every 5 s, about a quarter
    # more of a core than the sum: the price of finding a booking after a quiet pass in
    # one pass over the rows instead of two.
    groups_options_cheaply = True
    key_order_template = 'CAST(q.{0} AS TEXT) COLLATE "C"'

    def row_hash(self, columns: Sequence[str], *, by_text: bool = False) -> str:
        # Each column hashed by its type's own 64-bit hash (hash_record_extended, PostgreSQL
        # 14+): equal values hash alike whatever their text, and no text is made. Columns of
        # a type without a hash function (json, point) fall back on the row's text.
        return "hashtextextended(q::text, 0)" if by_text else "hash_record_extended(q, 0)"

    def label(self, alias: str) -> str:
        return self._label(alias)

    def range_digest_sql(
        self, sql: str, columns: Sequence[str], *, by_text: bool = False, options: bool = False
    ) -> str:
        # Grouped by the key columns as they are, the label made once per range: grouping
        # by a label made for every row costs the database about a third more.
        row_hash = self.row_hash(columns, by_text=by_text)
        product, option, slot = _KEY_COLUMNS
        return (
            f"SELECT {self._label('g', suffix='g.seyaha_suffix')} AS {RANGE_LABEL},"  # noqa: S608 - the operator's own query
            " g.seyaha_rows || ':' || g.seyaha_digest AS seyaha_digest FROM ("
            f"SELECT q.{product}, q.{option}, right(CAST(q.{slot} AS TEXT), {_SUFFIX_CHARS})"
            f" AS seyaha_suffix, COUNT(*) AS seyaha_rows, SUM({row_hash}) AS seyaha_digest"
            f" FROM (\n{_bare(sql)}\n) q{_of_options(options)} GROUP BY 1, 2, 3) g"
        )

    def option_digest_sql(self, sql: str, columns: Sequence[str], *, by_text: bool = False) -> str:
        # Grouped by the option column as it is (a hash aggregate on one column: 0.41 s for
        # 1M rows where the ranges' three columns sorted take 0.86 s), its text made once
        # per option. Values equal but spelled apart (numeric 1.0 and 1.00) fall into one
        # group under one spelling: that option never matches the stored sum and its ranges
        # are compared every pass, which costs time, never a change.
        option = _KEY_COLUMNS[1]
        return (
            f"SELECT CAST(g.seyaha_option AS TEXT) AS {RANGE_LABEL},"  # noqa: S608 - the operator's own query
            " g.seyaha_rows || ':' || g.seyaha_digest AS seyaha_digest FROM ("
            f"SELECT q.{option} AS seyaha_option, COUNT(*) AS seyaha_rows,"
            f" SUM({self.row_hash(columns, by_text=by_text)}) AS seyaha_digest"
            f" FROM (\n{_bare(sql)}\n) q GROUP BY 1) g"
        )

    def option_text(self, column: str) -> str:
        return f"CAST({column} AS TEXT)"

    def row_hash_probe(self, sql: str) -> str | None:
        return f"SELECT hash_record_extended(q, 0) FROM (\n{_bare(sql)}\n) q LIMIT 1"  # noqa: S608 - the operator's own query

    @staticmethod
    def _label(alias: str, *, suffix: str | None = None) -> str:
        product, option, slot = (f"CAST({alias}.{c} AS TEXT)" for c in _KEY_COLUMNS)
        last = suffix or f"right({slot}, {_SUFFIX_CHARS})"
        separator = f"chr({_SEPARATOR_CODE})"
        return f"{product} || {separator} || {option} || {separator} || {last}"

    def engine_options(self, role: Role) -> tuple[dict[str, Any], dict[str, Any]]:
        kwargs, connect = super().engine_options(role)
        connect["application_name"] = f"seyaha-agent-{role}"
        return kwargs, connect

    def limit_statement_time(self, conn: sa.Connection, seconds: float) -> None:
        conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, int(seconds * 1000))}")

    def digest_memory(self, conn: sa.Connection, megabytes: int) -> None:
        # The default work_mem (4 MB) has the range digests' GROUP BY spill to disk past a
        # few hundred thousand slots, and rules out the parallel plan: 1M slots took 1.0 s
        # with it, 0.7 s with 64 MB. SET LOCAL ends with the transaction.
        if megabytes > 0:
            conn.exec_driver_sql(f"SET LOCAL work_mem = '{int(megabytes)}MB'")

    def read_in_parallel(self, conn: sa.Connection) -> None:
        # The planner keeps an index read of a few hundred options' rows (about 170,000 at
        # 1M slots and 0.1% changed) to one process: the index part it reads is under
        # min_parallel_index_scan_size, and the workers' start and their rows are costed
        # higher than the read. With both workers: 0.14 s -> 0.09 s. max_parallel_workers_
        # per_gather (the server's, 2 by default) still bounds them; SET LOCAL ends with
        # the transaction.
        for setting in PARALLEL_SETTINGS:
            conn.exec_driver_sql(f"SET LOCAL {setting} = 0")

    def clock_sql(self) -> str:
        return "SELECT now()"

    def now_ms(self, conn: sa.Connection) -> int:
        return _integer(
            conn.exec_driver_sql(
                "SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)"
            ).scalar()
        )

    def try_lock(self, conn: sa.Connection, name: str) -> bool:
        return bool(
            conn.execute(
                sa.text("SELECT pg_try_advisory_lock(hashtext(:name))"), {"name": name}
            ).scalar()
        )

    def unlock(self, conn: sa.Connection, name: str) -> None:
        conn.execute(sa.text("SELECT pg_advisory_unlock(hashtext(:name))"), {"name": name})

    @contextmanager
    def without_waiting(self, conn: sa.Connection) -> Iterator[None]:
        with conn.begin():
            # SET LOCAL ends with the transaction; 0 would mean "wait forever".
            conn.exec_driver_sql(f"SET LOCAL lock_timeout = {NO_WAIT_MS}")
            yield

    def is_busy(self, exc: DBAPIError) -> bool:
        return getattr(exc.orig, "sqlstate", None) == "55P03"  # lock_not_available

    def is_conflict(self, exc: DBAPIError) -> bool:
        # deadlock_detected, serialization_failure
        return getattr(exc.orig, "sqlstate", None) in ("40P01", "40001")

    def limit_lock_wait(self, conn: sa.Connection, seconds: float) -> None:
        conn.exec_driver_sql(f"SET LOCAL lock_timeout = {max(1, int(seconds * 1000))}")


class MysqlDialect(Dialect):
    name = "mysql"
    digests = True
    hashes_by_column = True
    # groups_options_cheaply stays False: MariaDB took 4.9 s for the option digests of 1M
    # slots where the sum of every row's hash took 3.0 s (one core does either).
    key_order_template = "CAST(q.{0} AS BINARY)"

    def row_hash(self, columns: Sequence[str], *, by_text: bool = False) -> str:
        # MySQL has no whole-row text: each column's, marked so that NULL and '' differ,
        # joined, through MD5 (its first 64 bits, as an unsigned integer SUM adds exactly).
        parts = ", ".join(f"IFNULL(CONCAT('v', q.{_backquoted(c)}), 'n')" for c in columns)
        return (
            f"CAST(CONV(LEFT(MD5(CONCAT_WS({_MYSQL_SEPARATOR}, {parts})), 16), 16, 10) AS UNSIGNED)"
        )

    def label(self, alias: str) -> str:
        product, option, slot = (f"{alias}.{c}" for c in _KEY_COLUMNS)
        # Binary: compared byte for byte with the labels the agent sends, whatever the
        # connection's collation says about case and accents.
        return (
            f"CAST(CONCAT({product}, {_MYSQL_SEPARATOR}, {option}, {_MYSQL_SEPARATOR},"
            f" RIGHT({slot}, {_SUFFIX_CHARS})) AS BINARY)"
        )

    def option_text(self, column: str) -> str:
        return f"CAST({column} AS BINARY)"

    def engine_options(self, role: Role) -> tuple[dict[str, Any], dict[str, Any]]:
        kwargs, connect = super().engine_options(role)
        kwargs["pool_recycle"] = 3600
        return kwargs, connect

    def limit_statement_time(self, conn: sa.Connection, seconds: float) -> None:
        ms = max(1, int(seconds * 1000))
        # Known only once connected: a mysql:// URL may point at a MariaDB server.
        if getattr(conn.dialect, "is_mariadb", False):
            conn.exec_driver_sql(f"SET SESSION max_statement_time = {ms / 1000:.3f}")
        else:
            conn.exec_driver_sql(f"SET SESSION max_execution_time = {ms}")

    def clock_sql(self) -> str:
        return "SELECT NOW(6)"

    def now_ms(self, conn: sa.Connection) -> int:
        # UNIX_TIMESTAMP reads NOW(3) in the session's time zone: the result is zone-free.
        return _integer(
            conn.exec_driver_sql("SELECT CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED)").scalar()
        )

    # GET_LOCK names are server-wide (PostgreSQL's advisory locks are per database): the
    # database's name goes into the lock's, so stores on one server do not wait for each other.
    def try_lock(self, conn: sa.Connection, name: str) -> bool:
        query = sa.text("SELECT GET_LOCK(CONCAT(:name, ':', DATABASE()), 0)")
        return conn.execute(query, {"name": name}).scalar() == 1

    def unlock(self, conn: sa.Connection, name: str) -> None:
        conn.execute(sa.text("SELECT RELEASE_LOCK(CONCAT(:name, ':', DATABASE()))"), {"name": name})

    @contextmanager
    def without_waiting(self, conn: sa.Connection) -> Iterator[None]:
        # Whole seconds only: MySQL's shortest row-lock wait is 1 s.
        # (SET SESSION is not undone by a rollback: it is set back by hand.)
        previous: Any = None
        try:
            with conn.begin():
                previous = conn.exec_driver_sql(
                    "SELECT @@SESSION.innodb_lock_wait_timeout"
                ).scalar()
                conn.exec_driver_sql("SET SESSION innodb_lock_wait_timeout = 1")
                yield
        finally:
            if previous is not None:
                with suppress(DBAPIError):
                    conn.exec_driver_sql(f"SET SESSION innodb_lock_wait_timeout = {int(previous)}")
                    conn.commit()

    def is_busy(self, exc: DBAPIError) -> bool:
        args: tuple[Any, ...] = tuple(getattr(exc.orig, "args", ()))
        return len(args) > 0 and args[0] == 1205  # ER_LOCK_WAIT_TIMEOUT

    def is_conflict(self, exc: DBAPIError) -> bool:
        # ER_LOCK_DEADLOCK; a lock wait timeout (1205) rolls back only its statement.
        args: tuple[Any, ...] = tuple(getattr(exc.orig, "args", ()))
        return len(args) > 0 and args[0] == 1213


def dialect_for_backend(backend: str) -> Dialect:
    """The Dialect of a URL's backend name ("sqlite", "postgresql", "mysql", "mariadb")."""
    if backend == "sqlite":
        return SqliteDialect()
    if backend == "postgresql":
        return PostgresDialect()
    if backend in ("mysql", "mariadb"):
        return MysqlDialect()
    raise ValueError(f"unsupported database backend {backend!r}")


def dialect_of(engine: sa.Engine) -> Dialect:
    return dialect_for_backend(engine.dialect.name)


class FileLock:
    """An advisory lock on a file beside a SQLite database (the kernel drops it when the
    holder dies, even by SIGKILL): SQLite has no advisory locks of its own."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def try_acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def write(self, text: str) -> None:
        """Replace the lock file's content (e.g. with the holder's pid, for the next one)."""
        assert self._fd is not None, "write() needs the lock"
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text.encode("ascii"), 0)

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def _integer(value: Any) -> int:
    return int(value)


PARALLEL_SETTINGS = ("min_parallel_index_scan_size", "parallel_setup_cost", "parallel_tuple_cost")
"""PostgreSQL planner settings read_in_parallel sets to 0 for the rest of a transaction."""

_KEY_COLUMNS = ("product_id", "option_id", "availability_id")
"""The slot key's columns (agent.source.rows.SLOT_KEY_COLUMNS), in range order."""
_SEPARATOR_CODE = ord(SEPARATOR)
_SUFFIX_CHARS = SUFFIX_CHARS
_MYSQL_SEPARATOR = f"CHAR({_SEPARATOR_CODE} USING utf8mb4)"


def _of_options(options: bool) -> str:
    """The condition on the slot row `q` of with_digests(options=True)."""
    return f" WHERE q.{_KEY_COLUMNS[1]} IN :{RANGE_OPTIONS_PARAM}" if options else ""


def _bare(sql: str) -> str:
    """An operator's query, ready to be wrapped: no trailing semicolon."""
    return sql.strip().rstrip(";").strip()


def _backquoted(name: str) -> str:
    return "`" + name.replace("`", "``") + "`"


def _pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def _state_pragmas(dbapi_connection: Any, record: Any) -> None:
    _pragmas(dbapi_connection, record)
    cursor = dbapi_connection.cursor()
    try:
        _to_wal(cursor)
        cursor.execute("PRAGMA synchronous = FULL")
        cursor.execute(f"PRAGMA wal_autocheckpoint = {STORE_CHECKPOINT_PAGES}")
    finally:
        cursor.close()


WAL_SWITCH_PAUSE_S = 0.02
"""Longest pause between two tries to switch a store to WAL (seconds; a random share)."""


def _to_wal(cursor: Any) -> None:
    """Switch the store to WAL (a no-op once it is). A switch needs the file to itself, and
    SQLite answers "database is locked" at once, without its busy timeout, to a connection
    that meets another one switching (agents starting together on a store 0.1.0 wrote in
    rollback-journal mode): tried again for as long as the busy timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            cursor.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "database is locked" not in str(exc) or time.monotonic() > deadline:
                raise
        time.sleep(random.uniform(0, WAL_SWITCH_PAUSE_S))


def _begin(conn: sa.Connection) -> None:
    # A transaction that reads and then writes must take the write lock up front: upgrading
    # a read lock later fails at once with "database is locked" when another writer got in
    # between, whatever the busy timeout.
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")
