"""The state store's connections: one engine, its Dialect, and read and write transactions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from agent.db import read_only
from agent.dialects import Dialect, dialect_of
from agent.errors import StateError


class StoreBusy(StateError):
    """A write that must not wait found the store locked by another transaction."""


class Connector:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self.dialect: Dialect = dialect_of(engine)

    @contextmanager
    def write(self) -> Iterator[sa.Connection]:
        """A write transaction; on SQLite it takes the write lock up front (BEGIN IMMEDIATE)."""
        with self.engine.connect() as conn:
            conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    @contextmanager
    def write_now(self) -> Iterator[sa.Connection]:
        """A write transaction that raises StoreBusy at once, instead of waiting, when another
        transaction holds what it needs (the scan writes this way while it still reads the
        supplier's database, see scan.Scanner.scan)."""
        try:
            with self.engine.connect() as conn:
                conn = conn.execution_options(sqlite_begin="IMMEDIATE")
                with self.dialect.without_waiting(conn):
                    yield conn
        except DBAPIError as exc:
            if self.dialect.is_busy(exc):
                raise StoreBusy(
                    "the state store is locked by another transaction; the write waits "
                    "until the supplier's database is no longer read"
                ) from None
            raise

    @contextmanager
    def read(self) -> Iterator[sa.Connection]:
        """A read transaction: one consistent picture of the store."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    @contextmanager
    def long_read(self) -> Iterator[sa.Connection]:
        """A read transaction whose end cannot fail: nothing was written, so a connection
        lost after the last read (a failover during a long reconciliation) costs nothing."""
        with self.engine.connect() as conn, read_only(conn, conn.begin()):
            yield conn

    def now_ms(self) -> int:
        """The store database's clock, in epoch milliseconds."""
        with self.engine.connect() as conn:
            return self.dialect.now_ms(conn)
