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

from dataclasses import dataclass

import sqlalchemy as sa

from agent.source.gate import Sensed
from agent.source.kept import KeptConnection

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
        self.kept = KeptConnection(engine, "the server's snapshot")

    def discover(self) -> str:
        version = self.kept.run(lambda c: c.exec_driver_sql("SHOW server_version_num").scalar_one())
        if int(version) < PG_SNAPSHOT_SINCE:
            self._query = "SELECT txid_current_snapshot()::text"
        self.read()
        return "the server's snapshot (pg_current_snapshot: transactions completed)"

    def read(self) -> Snapshot:
        text = self.kept.run(lambda c: c.exec_driver_sql(self._query).scalar_one())
        return parse_snapshot(str(text))

    def close(self) -> None:
        self.kept.close()
