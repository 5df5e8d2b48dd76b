"""PostgreSQL without a change query: a pass only when a transaction completed since the last
(see agent/source/gate.py).

A snapshot (`pg_current_snapshot()`, `txid_current_snapshot()` before PostgreSQL 13) names
`xmax`, one past the last transaction id that completed, and the ids below it still running.
A transaction that writes gets an id; when it commits (or aborts) either `xmax` moves past
it, or, if it was running at the last reading, it leaves the running list. Anything else
that committed was complete at that reading, taken before the last pass's own snapshot,
which therefore saw it. So "nothing completed since" is exact, with no clock involved
(ids are 64-bit here: no wraparound). It is as wide as the server: a write in any database
of the cluster counts (an extra pass, never a missed one), so on a busy server the passes
keep to `poll_interval` as before, and a state store on the same server, whose every
recording writes, makes each pass ask for the next. Reading the agent's own source never
takes an id: its reads are read-only.
"""

from __future__ import annotations

from contextlib import suppress
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, OperationalError, SQLAlchemyError

from agent.db import redact_url
from agent.errors import SourceUnavailable, first_line
from agent.source.gate import Sensed, SensorUnusable

PG_SNAPSHOT_SINCE = 130000
"""server_version_num from which pg_current_snapshot() exists (txid_current_snapshot() before)."""


@dataclass(frozen=True)
class Snapshot:
    """One reading: `xmax` and the ids below it still running."""

    xmin: int
    xmax: int
    running: frozenset[int]

    def moved_since(self, before: Sensed) -> str | None:
        if not isinstance(before, Snapshot):
            return "the snapshot was read afresh"
        if self.xmax != before.xmax:
            return "a transaction completed"
        if before.running - self.running:
            return "a transaction running at the last pass completed"
        return None

    def settling(self) -> str | None:
        return None  # exact: nothing can hide behind a reading


def parse_snapshot(text: str) -> Snapshot:
    """A snapshot from its text, `xmin:xmax:xip,xip,...`."""
    xmin, xmax, running = text.strip().split(":")
    ids = frozenset(int(x) for x in running.split(",") if x)
    return Snapshot(int(xmin), int(xmax), ids)


class TransactionIds:
    """Reads a PostgreSQL source's snapshot (see the module's doc) on a kept connection."""

    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine
        self._query = "SELECT pg_current_snapshot()::text"
        self._held: sa.Connection | None = None

    @property
    def where(self) -> str:
        return redact_url(self.engine.url.render_as_string(hide_password=True))

    def discover(self) -> str:
        version = self._run("SHOW server_version_num")
        if int(version) < PG_SNAPSHOT_SINCE:
            self._query = "SELECT txid_current_snapshot()::text"
        self.read()
        return "the server's snapshot (pg_current_snapshot: transactions completed)"

    def read(self) -> Snapshot:
        return parse_snapshot(self._run(self._query))

    def close(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            with suppress(SQLAlchemyError):
                held.close()

    def _run(self, sql: str) -> str:
        for retry in (True, False):
            try:
                if self._held is None:
                    conn = self._connect().execution_options(isolation_level="AUTOCOMMIT")
                    self._held = conn
                return str(self._held.exec_driver_sql(sql).scalar_one())
            except DBAPIError as exc:
                self.close()
                lost = isinstance(exc, OperationalError) or exc.connection_invalidated
                if lost and retry:
                    continue  # the kept connection died (a server restart): a new one
                if lost:
                    raise SourceUnavailable(
                        f"cannot reach the source database at {self.where}: {first_line(exc)}"
                    ) from None
                raise SensorUnusable(
                    f"the server's snapshot could not be read ({first_line(exc)})"
                ) from None
        raise AssertionError("unreachable")

    def _connect(self) -> sa.Connection:
        try:
            return self.engine.connect()
        except SQLAlchemyError as exc:
            raise SourceUnavailable(
                f"cannot reach the source database at {self.where}: {first_line(exc)}"
            ) from None
