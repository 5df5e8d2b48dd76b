"""One source connection kept open between a sensor's reads (agent/source/gate.py): four
reads a second, where a checkout from the pool each time cost as much again as the read."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from typing import TypeVar

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from agent.db import connect_source, redact_url
from agent.errors import SourceUnavailable, first_line
from agent.source.gate import SensorUnusable

T = TypeVar("T")


class KeptConnection:
    """An autocommit connection of `engine`, opened at the first use and kept; replaced once
    when the server ended it (a restart, a killed connection)."""

    def __init__(self, engine: sa.Engine, what: str) -> None:
        self.engine = engine
        self.what = what
        """What the sensor reads, for the message when the server refuses it."""
        self.on_open: Callable[[sa.Connection], None] = lambda conn: None
        """Run on each new connection (a session setting)."""
        self._conn: sa.Connection | None = None

    @property
    def where(self) -> str:
        return redact_url(self.engine.url.render_as_string(hide_password=True))

    def run(self, work: Callable[[sa.Connection], T]) -> T:
        """`work` on the kept connection. SourceUnavailable when the source cannot be
        reached; SensorUnusable when it answers but refuses."""
        for retry in (True, False):
            try:
                return work(self._connection())
            except DBAPIError as exc:
                self.close()
                lost = isinstance(exc, OperationalError) or exc.connection_invalidated
                if lost and retry:
                    continue  # the kept connection died: a new one, once
                if lost:
                    raise SourceUnavailable(
                        f"cannot reach the source database at {self.where}: {first_line(exc)}"
                    ) from None
                raise SensorUnusable(f"{self.what} could not be read ({first_line(exc)})") from None
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Give the connection back (the next run opens another)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(SQLAlchemyError):
                conn.close()

    @property
    def held(self) -> sa.Connection | None:
        """The connection kept now, if any."""
        return self._conn

    def _connection(self) -> sa.Connection:
        if self._conn is None:
            conn = connect_source(self.engine, self.where)
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            self.on_open(conn)
            self._conn = conn
        return self._conn
