"""Engines for the source and the state store, with the per-dialect settings each needs.

Nothing connects here: SQLAlchemy engines connect lazily, on first use.
"""

from __future__ import annotations

import re
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import make_url

SQLITE_BUSY_TIMEOUT_MS = 10_000
"""How long a SQLite writer waits for another writer before failing (milliseconds)."""

CONNECT_TIMEOUT_S = 10
"""Seconds to wait for a network database to accept a connection: a dead host fails fast."""

_CREDENTIALS = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def redact_url(url: str) -> str:
    """A database URL fit for a log line: the password is replaced by ***."""
    return _CREDENTIALS.sub(r"\1***@", url)


def create_engine(url: str, *, role: str) -> sa.Engine:
    """An engine for `url`; `role` ("source" or "state") is the application name servers see."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    # A SQLite "connection" is a file handle: there is no server whose restart a ping detects.
    kwargs: dict[str, Any] = {"pool_pre_ping": backend != "sqlite"}
    connect_args: dict[str, Any] = {}
    if backend == "sqlite":
        connect_args["timeout"] = SQLITE_BUSY_TIMEOUT_MS / 1000
        connect_args["check_same_thread"] = False
        # The driver's own transaction handling is switched off: it never begins a
        # transaction before a SELECT, so the source's two queries would each see a different
        # moment, and the store could not open write transactions with BEGIN IMMEDIATE.
        # _sqlite_begin starts every transaction instead.
        connect_args["isolation_level"] = None
    elif backend == "postgresql":
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
        connect_args["application_name"] = f"seyaha-agent-{role}"
    elif backend in ("mysql", "mariadb"):
        connect_args["connect_timeout"] = CONNECT_TIMEOUT_S
        kwargs["pool_recycle"] = 3600
    if role == "state" and backend != "sqlite":
        kwargs["isolation_level"] = "READ COMMITTED"
    engine = sa.create_engine(parsed, connect_args=connect_args, **kwargs)
    if backend == "sqlite":
        sa.event.listen(
            engine, "connect", _sqlite_state_pragmas if role == "state" else _sqlite_pragmas
        )
        sa.event.listen(engine, "begin", _sqlite_begin)
    return engine


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    finally:
        cursor.close()


def _sqlite_state_pragmas(dbapi_connection: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_connection, record)
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA synchronous = FULL")
    finally:
        cursor.close()


def _sqlite_begin(conn: sa.Connection) -> None:
    # A transaction that reads and then writes must take the write lock up front: upgrading
    # a read lock later fails at once with "database is locked" when another writer got in
    # between, whatever the busy timeout.
    mode = conn.get_execution_options().get("sqlite_begin", "DEFERRED")
    conn.exec_driver_sql(f"BEGIN {mode}")
