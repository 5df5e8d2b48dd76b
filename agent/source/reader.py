"""Runs the configured catalog and slots queries and turns their rows into model values.

Both queries run in one read transaction (REPEATABLE READ where the database offers it) so
that a product and its slots are seen at the same moment. A row that cannot be used is
skipped with its key and the reason, and the rest of the result goes on.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from agent import rows
from agent.db import redact_url
from agent.errors import QueryError, SourceUnavailable
from agent.model import CatalogKey, CatalogRow, SkippedRow, Slot, SlotKey

CHECK_ROW_LIMIT = 100
"""Rows `check` reads from each query: enough to catch bad values without a full scan."""

T = TypeVar("T")

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


class SourceReader:
    def __init__(
        self,
        engine: sa.Engine,
        *,
        catalog_query: str,
        slots_query: str,
        timezone: ZoneInfo,
    ) -> None:
        self.engine = engine
        self.catalog_query = catalog_query
        self.slots_query = slots_query
        self.timezone = timezone

    @property
    def where(self) -> str:
        return redact_url(self.engine.url.render_as_string(hide_password=True))

    @contextmanager
    def _transaction(self) -> Iterator[sa.Connection]:
        try:
            conn = self.engine.connect()
        except SQLAlchemyError as exc:
            raise SourceUnavailable(
                f"cannot reach the source database at {self.where}: {_reason(exc)}"
            ) from None
        try:
            if self.engine.dialect.name in ("postgresql", "mysql", "mariadb"):
                conn = conn.execution_options(isolation_level="REPEATABLE READ")
            with conn.begin():
                yield conn
        finally:
            conn.close()

    def read(self) -> Snapshot:
        """Run both queries in one transaction and convert every row."""
        snapshot = Snapshot()
        with self._transaction() as conn:
            self._read_catalog(conn, snapshot, limit=None)
            self._read_slots(conn, snapshot, limit=None)
        return snapshot

    def catalog_keys(self) -> set[CatalogKey]:
        """The (product_id, option_id) pairs of the catalog (the sandbox's view of a sync)."""
        snapshot = Snapshot()
        with self._transaction() as conn:
            self._read_catalog(conn, snapshot, limit=None)
        return {row.key for row in snapshot.catalog}

    def sample(self, limit: int = CHECK_ROW_LIMIT) -> Snapshot:
        """Read the first `limit` rows of each query (for `check`)."""
        snapshot = Snapshot()
        with self._transaction() as conn:
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
    ) -> sa.CursorResult[Any]:
        try:
            # A server-side cursor lets `check` read a few rows of a large result without
            # the driver fetching all of it first.
            options = {"stream_results": True} if stream else {}
            result = conn.execution_options(**options).execute(sa.text(sql))
        except DBAPIError as exc:
            if exc.connection_invalidated or (
                isinstance(exc, sa.exc.OperationalError) and not _blames_query(exc)
            ):
                raise SourceUnavailable(
                    f"{name} could not run on {self.where}: {_reason(exc)}"
                ) from None
            raise QueryError(f"{name} failed: {_reason(exc)}") from None
        except SQLAlchemyError as exc:
            raise QueryError(f"{name} failed: {_reason(exc)}") from None
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

    def _rows(
        self, result: sa.CursorResult[Any], name: str, limit: int | None
    ) -> Iterator[dict[str, Any]]:
        try:
            for count, row in enumerate(result.mappings()):
                if limit is not None and count >= limit:
                    break
                yield {str(k).lower(): v for k, v in row.items()}
        except DBAPIError as exc:
            raise SourceUnavailable(f"{name} stopped part-way: {_reason(exc)}") from None
        finally:
            result.close()

    def _read_catalog(self, conn: sa.Connection, snapshot: Snapshot, limit: int | None) -> None:
        name = "catalog_query"
        result = self._execute(
            conn, name, self.catalog_query, rows.CATALOG_KEY_COLUMNS, stream=limit is not None
        )
        collect = _Collector(name, rows.CATALOG_KEY_COLUMNS, snapshot.skipped)
        for raw in self._rows(result, name, limit):
            snapshot.catalog_rows_read += 1
            item = collect.convert(raw, rows.catalog_row)
            if item is not None and collect.first_time(raw, item.key):
                snapshot.catalog.append(item)
        snapshot.catalog_protected |= {(k[0], k[1]) for k in collect.protected}

    def _read_slots(self, conn: sa.Connection, snapshot: Snapshot, limit: int | None) -> None:
        name = "slots_query"
        result = self._execute(
            conn, name, self.slots_query, rows.SLOT_REQUIRED_COLUMNS, stream=limit is not None
        )
        collect = _Collector(name, rows.SLOT_KEY_COLUMNS, snapshot.skipped)
        zone = self.timezone
        for raw in self._rows(result, name, limit):
            snapshot.slot_rows_read += 1
            item = collect.convert(raw, lambda r: rows.slot(r, zone))
            if item is not None and collect.first_time(raw, item.key):
                snapshot.slots.append(item)
        snapshot.slots_protected |= {(k[0], k[1], k[2]) for k in collect.protected}


class _Collector:
    """Converts the rows of one query, remembering skipped rows, seen keys and protected keys."""

    def __init__(self, name: str, key_columns: Sequence[str], skipped: list[SkippedRow]) -> None:
        self.name = name
        self.key_columns = key_columns
        self.skipped = skipped
        self.seen: set[tuple[str, ...]] = set()
        self.protected: set[tuple[str, ...]] = set()

    def convert(
        self, raw: Mapping[str, Any], convert: Callable[[Mapping[str, Any]], T]
    ) -> T | None:
        """The converted row, or None after recording why it was skipped.

        A skipped row whose key is sound is protected: the store keeps its last known state
        instead of treating the row as gone.
        """
        try:
            return convert(raw)
        except rows.BadRow as exc:
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
        """False (and the row is recorded as skipped) when the key was already returned."""
        if key in self.seen:
            self.skipped.append(
                SkippedRow(self.name, rows.raw_key(raw, self.key_columns), "duplicate key")
            )
            return False
        self.seen.add(key)
        return True


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


def _reason(exc: BaseException) -> str:
    original = getattr(exc, "orig", None) or exc
    text = str(original).strip()
    return text.splitlines()[0] if text else type(original).__name__
