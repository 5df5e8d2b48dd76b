"""The state store's connections: one engine, its Dialect, and read and write transactions."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import sqlalchemy as sa

from agent.dialects import Dialect, dialect_of


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
    def read(self) -> Iterator[sa.Connection]:
        """A read transaction: one consistent picture of the store."""
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def now_ms(self) -> int:
        """The store database's clock, in epoch milliseconds."""
        with self.engine.connect() as conn:
            return self.dialect.now_ms(conn)
