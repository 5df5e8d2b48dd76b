"""Engines for the source and the state store, set up by their backend's Dialect.

Nothing connects here: SQLAlchemy engines connect lazily, on first use.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from agent.dialects import dialect_for_backend
from agent.errors import SourceUnavailable, first_line

_CREDENTIALS = re.compile(r"(://[^:/@\s]*:)[^@\s]*@")


def redact_url(url: str) -> str:
    """A database URL fit for a log line: the password is replaced by ***."""
    return _CREDENTIALS.sub(r"\1***@", url)


def connect_source(engine: sa.Engine, where: str) -> sa.Connection:
    """A new connection to the source database at `where` (its URL without the password),
    or SourceUnavailable saying it cannot be reached and why."""
    try:
        return engine.connect()
    except SQLAlchemyError as exc:
        raise SourceUnavailable(
            f"cannot reach the source database at {where}: {first_line(exc)}"
        ) from None


def create_engine(url: str, *, role: str) -> sa.Engine:
    """An engine for `url`; `role` ("source" or "state") is the application name servers see."""
    parsed = make_url(url)
    dialect = dialect_for_backend(parsed.get_backend_name())
    kwargs, connect_args = dialect.engine_options(role)
    engine = sa.create_engine(parsed, connect_args=connect_args, **kwargs)
    dialect.prepare(engine, role)
    sa.event.listen(engine, "handle_error", _remember_cursor)
    return engine


def _remember_cursor(context: sa.engine.ExceptionContext) -> None:
    # SQLAlchemy leaves the driver's cursor to the garbage collector when the connection
    # died under it: a server-side cursor (psycopg's) then warns, unprompted, from whatever
    # thread collects it. It cannot be closed here (the driver still holds its connection's
    # lock while it reports the failure): it is kept on the error, for close_dead_cursor.
    error = context.sqlalchemy_exception
    cursor = getattr(context.execution_context, "cursor", None)
    if context.is_disconnect and cursor is not None and error is not None:
        error.dead_cursor = cursor  # type: ignore[attr-defined]


@contextlib.contextmanager
def read_only(conn: sa.Connection, transaction: sa.RootTransaction) -> Iterator[sa.Connection]:
    """`conn` inside its read `transaction`, then the transaction ended: rolled back if the
    block failed, else committed, quietly. A read writes nothing, so a connection that died
    after the last read (or a transaction a resumed read already ended) costs nothing."""
    try:
        yield conn
    except BaseException:
        with contextlib.suppress(sa.exc.SQLAlchemyError):
            transaction.rollback()
        raise
    if conn.invalidated or not transaction.is_active:
        return
    with contextlib.suppress(DBAPIError):
        transaction.commit()


def lost_connection(exc: DBAPIError) -> bool:
    """Whether `exc` says the connection itself was lost (a restart, a failover, a killed
    session), not that a statement failed: worth trying again on a new connection."""
    return bool(exc.connection_invalidated) or isinstance(exc, sa.exc.OperationalError)


def close_dead_cursor(exc: BaseException) -> None:
    """Close the cursor a lost connection left open (see _remember_cursor), once the driver
    has let go of it: on a dead connection the driver closes it without a round trip."""
    cursor = getattr(exc, "dead_cursor", None)
    if cursor is None:
        return
    with contextlib.suppress(Exception):
        cursor.close()
    # PyMySQL's unbuffered cursor reads the rest of its result as it closes; on a dead
    # connection that fails half-way and leaves the cursor and its result to try again from
    # the garbage collector ("Exception ignored in SSCursor.close" on stderr): let go of both.
    result = getattr(cursor, "_result", None)
    if result is not None and getattr(result, "unbuffered_active", False):
        result.unbuffered_active = False
    if result is not None and getattr(cursor, "connection", None) is not None:
        cursor.connection = None
