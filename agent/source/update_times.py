"""MySQL/MariaDB without a change query: a pass only when a table the queries read changed
(see agent/source/gate.py).

InnoDB keeps, per table, the time of the last committed change
(`information_schema.TABLES.UPDATE_TIME`), which costs nothing to read. So the poll loop
reads it for the tables the queries name every SENSE_EVERY_S and starts a pass as soon as
one moved, and none while none did (`PassGate`):

- **What moves it.** A transaction's commit sets the time of its first change to each table
  (MariaDB; MySQL documents the commit's time). A rollback leaves it. Only a difference from
  the reading taken before the last pass counts, so a time that goes backwards (a long
  transaction committing late) is seen too.
- **Whole seconds.** A second commit within the second of the one a pass saw leaves the same
  time behind: a table whose time was within SETTLE_S of the reading before the last pass
  asks for one more pass (after `poll_interval`), taken once that second is over.
- **What it cannot see.** A transaction that stays open longer than SETTLE_S and whose first
  change falls in the very second of the time a pass saw; a table read through a stored
  function; a table that changed while it was not watched. So a pass still runs every
  `full_scan_interval` (from the start of the last one) when nothing moved.
- **Which tables.** Every table of the connection's database, and of the databases the
  queries name, whose name appears in the queries' text, then in the definitions of the
  views found that way. More tables than needed cost extra passes, never a missed change.
- **Which engines.** InnoDB and MyISAM keep the time as described. Aria, MEMORY and the
  others do not (an Aria table's time stayed put over an insert): with one of them among the
  tables, or none found, the sensor says why and every poll is a pass, as before.
- **MySQL 8** caches the column for a day by default (`information_schema_stats_expiry`):
  the sensor's session sets it to 0. MySQL documents the time for InnoDB tables that are
  not partitioned, so a partitioned one disables the sensor there (MariaDB keeps one and is
  trusted). Before MySQL 5.7.2 and MariaDB 10.2 InnoDB kept none: the sensor is off there.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError

from agent.source.gate import Sensed, SensorUnusable
from agent.source.kept import KeptConnection

SETTLE_S = 2.0
"""A table whose time is closer than this to the reading before a pass may still take
commits stamped with that same second: one more pass follows, once it is over."""

TRUSTED_ENGINES = frozenset({"innodb", "myisam"})
"""Engines whose UPDATE_TIME moves with every committed change."""

SYSTEM_SCHEMAS = frozenset({"information_schema", "mysql", "performance_schema", "sys"})

_WORD = re.compile(r"`((?:[^`]|``)+)`|([A-Za-z0-9_$\u0080-\uffff]+)")

_READ = (
    "SELECT UNIX_TIMESTAMP(NOW(6)), TABLE_SCHEMA, TABLE_NAME, UNIX_TIMESTAMP(UPDATE_TIME) "
    "FROM information_schema.TABLES"
)

Table = tuple[str, str]
"""(database, table name), as information_schema spells them."""


@dataclass(frozen=True)
class Reading:
    """The watched tables' UPDATE_TIME (epoch seconds; None: not changed since the server
    started) and the server's clock, read together in one statement."""

    times: Mapping[Table, int | None]
    now: float
    settle_s: float = SETTLE_S

    def unsettled(self, settle_s: float) -> Table | None:
        """A table whose time was less than `settle_s` before this reading, if any."""
        for table, moment in sorted(self.times.items()):
            if moment is not None and self.now < moment + settle_s:
                return table
        return None

    def moved_since(self, before: Sensed) -> str | None:
        if not isinstance(before, Reading):
            return "the tables' times were read afresh"
        table = moved(before, self)
        return None if table is None else f"{_shown(table)} changed"

    def settling(self) -> str | None:
        table = self.unsettled(self.settle_s)
        if table is None:
            return None
        return f"{_shown(table)} changed within {self.settle_s:g} s of the last pass"


def moved(before: Reading, now: Reading) -> Table | None:
    """A table whose time differs between the two readings (or that only one has)."""
    for table in sorted(set(before.times) | set(now.times)):
        if before.times.get(table, -1) != now.times.get(table, -1):
            return table
    return None


def change_since(before: Reading, now: Reading) -> str | None:
    """Why a pass is needed, given the reading taken before the last pass; None: nothing
    the last pass may have missed."""
    return now.moved_since(before) or before.settling()


def words(text: str) -> set[str]:
    """The identifiers of SQL text (bare or `quoted`), lower-cased."""
    found = set()
    for quoted, bare in _WORD.findall(text):
        found.add((quoted.replace("``", "`") if quoted else bare).lower())
    return found


def named_tables(
    texts: Iterable[str],
    kinds: Mapping[Table, str],
    views: Mapping[Table, str],
    current: str | None,
) -> tuple[set[Table], set[str]]:
    """The tables and views of `kinds` (each with its TABLE_TYPE) that the query texts name,
    and through the definitions of the views among them, what those read; with the words of
    the texts and of those definitions (the databases to look up, see UpdateTimes.discover).
    A table counts when its name appears, in the current database or in one whose name
    appears too."""
    named = set().union(*(words(t) for t in texts))
    found: set[Table] = set()
    while True:
        more = {
            (s, n)
            for s, n in kinds
            if (s == current or s.lower() in named) and n.lower() in named and (s, n) not in found
        }
        if not more:
            return found, named
        found |= more
        for view in sorted(more & set(views)):
            named |= words(views[view])


class UpdateTimes:
    """Reads the UPDATE_TIME of the tables a source's queries name (see the module's doc)."""

    def __init__(self, engine: sa.Engine, queries: Sequence[str]) -> None:
        self.engine = engine
        self.queries = tuple(queries)
        self.tables: tuple[Table, ...] = ()
        self._mysql = False
        self._expiry = False
        self.kept = KeptConnection(engine, "information_schema")
        self.kept.on_open = self._keep_fresh
        self.settle_s = SETTLE_S
        """See Reading.settling."""

    def discover(self) -> str:
        """Look up the tables to watch (find_tables); says which."""
        tables = self.find_tables()
        names = ", ".join(_shown(t) for t in tables)
        return f"the UPDATE_TIME of {len(tables)} table(s) ({names})"

    def find_tables(self) -> tuple[Table, ...]:
        """Look up the tables to watch; SensorUnusable when their times cannot be trusted.
        Only the databases whose names the queries (or the views they read) use are listed,
        not every table of a shared server."""
        kinds: dict[Table, str] = {}
        engines: dict[Table, tuple[str, str]] = {}
        views: dict[Table, str] = {}

        def look_up(conn: sa.Connection) -> str | None:
            database, version = conn.exec_driver_sql("SELECT DATABASE(), VERSION()").one()
            current = None if database is None else str(database)
            self._mysql = not getattr(conn.dialect, "is_mariadb", False)
            keeps = keeps_update_time(str(version), mariadb=not self._mysql)
            if keeps is not None:
                raise SensorUnusable(keeps)
            if self._mysql:
                self._expiry = _sets_stats_expiry(conn)
            schemas = [
                str(s)
                for (s,) in conn.exec_driver_sql(
                    "SELECT SCHEMA_NAME FROM information_schema.SCHEMATA"
                ).all()
                if str(s).lower() not in SYSTEM_SCHEMAS
            ]
            loaded: set[str] = set()
            named = set().union(*(words(q) for q in self.queries))
            while True:
                wanted = {s for s in schemas if s == current or s.lower() in named} - loaded
                if not wanted:
                    return current
                _list_tables(conn, sorted(wanted), kinds, engines, views)
                loaded |= wanted
                _, named = named_tables(self.queries, kinds, views, current)

        current = self.kept.run(look_up)
        found, _ = named_tables(self.queries, kinds, views, current)
        watched = tuple(sorted(t for t in found if t not in views and "VIEW" not in kinds[t]))
        if not watched:
            raise SensorUnusable("no table the queries name was found in information_schema")
        for table in watched:
            engine, options = engines[table]
            if engine.lower() not in TRUSTED_ENGINES:
                raise SensorUnusable(
                    f"table {_shown(table)} uses the {engine or 'unknown'} engine, which does "
                    "not keep the time of its last change (only InnoDB and MyISAM do)"
                )
            if self._mysql and "partitioned" in options.lower():
                raise SensorUnusable(
                    f"table {_shown(table)} is partitioned, and MySQL keeps no time of the "
                    "last change for a partitioned table"
                )
        self.tables = watched
        return watched

    def read(self) -> Reading:
        """The watched tables' times now (discover first), on the kept connection.
        SourceUnavailable when the source cannot be reached; SensorUnusable when it answers
        but refuses the query."""
        schemas = sorted({s for s, _ in self.tables})
        names = sorted({n for _, n in self.tables})
        # Only PyMySQL's placeholders are joined into the text; the names are bound.
        in_schemas = ", ".join(["%s"] * len(schemas))
        in_names = ", ".join(["%s"] * len(names))
        query = f"{_READ} WHERE TABLE_SCHEMA IN ({in_schemas}) AND TABLE_NAME IN ({in_names})"

        def read(conn: sa.Connection) -> tuple[list[Any], Any]:
            rows = list(conn.exec_driver_sql(query, (*schemas, *names)).all())
            if rows:
                return rows, rows[0][0]
            return rows, conn.exec_driver_sql("SELECT UNIX_TIMESTAMP(NOW(6))").scalar()

        rows, clock = self.kept.run(read)
        watched = set(self.tables)
        times: dict[Table, int | None] = {}
        for _, schema, name, moment in rows:
            table = (str(schema), str(name))
            if table in watched:
                times[table] = None if moment is None else int(moment)
        # NOW() is the statement's start: no later than any time it read.
        return Reading(times, float(clock), self.settle_s)

    def close(self) -> None:
        """Give back the connection read keeps (the next read opens another)."""
        self.kept.close()

    def _keep_fresh(self, conn: sa.Connection) -> None:
        if self._expiry:
            conn.exec_driver_sql("SET SESSION information_schema_stats_expiry = 0")


def keeps_update_time(version: str, *, mariadb: bool) -> str | None:
    """Why a server of `version` keeps no UPDATE_TIME for InnoDB tables; None: it does
    (MySQL from 5.7.2, MariaDB from 10.2; before, the column stayed NULL)."""
    numbers = tuple(int(n) for n in re.findall(r"\d+", version.split("-")[0])[:3])
    since = (10, 2, 0) if mariadb else (5, 7, 2)
    if numbers >= since:
        return None
    name = "MariaDB" if mariadb else "MySQL"
    return (
        f"{name} {version} keeps no time of an InnoDB table's last change (it does from "
        f"{name} {'.'.join(map(str, since))})"
    )


def _list_tables(
    conn: sa.Connection,
    schemas: Sequence[str],
    kinds: dict[Table, str],
    engines: dict[Table, tuple[str, str]],
    views: dict[Table, str],
) -> None:
    """The tables and views of `schemas`, into the three maps."""
    tables = sa.text(
        "SELECT TABLE_SCHEMA, TABLE_NAME, TABLE_TYPE, ENGINE, CREATE_OPTIONS "
        "FROM information_schema.TABLES WHERE TABLE_SCHEMA IN :schemas"
    ).bindparams(sa.bindparam("schemas", expanding=True))
    for schema, name, kind, engine, options in conn.execute(tables, {"schemas": schemas}):
        table = (str(schema), str(name))
        kinds[table] = str(kind or "")
        engines[table] = (str(engine or ""), str(options or ""))
    defined = sa.text(
        "SELECT TABLE_SCHEMA, TABLE_NAME, VIEW_DEFINITION FROM information_schema.VIEWS "
        "WHERE TABLE_SCHEMA IN :schemas"
    ).bindparams(sa.bindparam("schemas", expanding=True))
    for schema, name, definition in conn.execute(defined, {"schemas": schemas}):
        views[(str(schema), str(name))] = str(definition or "")


def _sets_stats_expiry(conn: sa.Connection) -> bool:
    """Whether this MySQL caches information_schema's table statistics (8.0 and later): its
    session then asks for fresh ones."""
    try:
        conn.exec_driver_sql("SET SESSION information_schema_stats_expiry = 0")
    except DBAPIError:
        conn.rollback()
        return False
    return True


def _shown(table: Table) -> str:
    return f"{table[0]}.{table[1]}"
