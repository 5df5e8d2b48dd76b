"""The state store's connections: one engine, its Dialect, and read and write transactions."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from agent.db import read_only
from agent.dialects import Dialect, dialect_of
from agent.errors import StateError
from agent.logs import event

log = logging.getLogger("agent.state")

T = TypeVar("T")

CONFLICT_TRIES = 5
"""Runs of a write transaction the database rolls back to break a deadlock (see transact)."""
CONFLICT_PAUSE_S = 0.05
"""Longest pause before the second run (seconds); the n-th waits up to n times as long, a
random share of it, so that the two transactions that met do not meet again."""


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

    def transact(self, work: Callable[[sa.Connection], T]) -> T:
        """`work` in a write transaction, run again whole when the database rolls the
        transaction back to break a deadlock with another (InnoDB does, between workers
        that leave and take outbox rows at once; PostgreSQL can): up to CONFLICT_TRIES runs.
        `work` must only run statements on the connection it is given."""
        runs = 0
        while True:
            runs += 1
            try:
                with self.write() as conn:
                    return work(conn)
            except DBAPIError as exc:
                if runs >= CONFLICT_TRIES or not self.dialect.is_conflict(exc):
                    raise
            event(
                log,
                logging.DEBUG,
                "state.conflict",
                "a state store transaction was rolled back to break a deadlock; it runs again",
                runs=runs,
            )
            time.sleep(random.uniform(0, CONFLICT_PAUSE_S * runs))

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
