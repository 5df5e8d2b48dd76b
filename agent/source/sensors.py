"""Which sign of commits a source offers (agent/source/gate.py): the one place that picks."""

from __future__ import annotations

from agent.source.gate import Sensor
from agent.source.reader import SourceReader
from agent.source.update_times import UpdateTimes
from agent.source.xids import TransactionIds


def commit_sensor(reader: SourceReader) -> Sensor | None:
    """The sensor of `reader`'s database, if it has one: UPDATE_TIME on MySQL/MariaDB, the
    snapshot on PostgreSQL; None on SQLite (whose file watcher wakes the polls instead)."""
    if reader.dialect.name == "mysql":
        return UpdateTimes(reader.engine, (reader.catalog_query, reader.slots_query))
    if reader.dialect.name == "postgresql":
        return TransactionIds(reader.engine)
    return None
