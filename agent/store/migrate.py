"""Schema versions of the state store: what a store holds, what it needs, and the upgrade.

Every start (and `seyaha-agent migrate`) runs `migrate`:
1. take the migration lock, so that agents starting together on one shared store migrate it
   once while the others wait (an advisory lock on PostgreSQL and MySQL, a file lock beside
   a SQLite store; the server or the kernel drops it when its holder dies);
2. read the store's version: Alembic's version table, or the schema_version record of a
   store 0.1.0 wrote (schema 1, no version table), which is stamped instead of re-created;
3. refuse a store that a newer agent wrote, naming both versions;
4. copy a SQLite store beside itself before changing it (the way back: see the README);
5. apply the missing migrations (agent/store/migrations/versions), oldest first.

Migrations are forward-only: an older agent refuses a newer store rather than guess.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from agent.clock import Clock, SystemClock
from agent.dialects import Dialect, FileLock, dialect_of
from agent.errors import StateError, first_line
from agent.logs import event

if TYPE_CHECKING:
    from alembic.config import Config as AlembicConfig
    from alembic.script import ScriptDirectory

# Alembic is imported only when a store is not at HEAD (or for `migrate`): an agent starting
# on an up-to-date store does not pay for it in memory or start time.

log = logging.getLogger("agent.state")

HEAD = 7
"""The newest schema version (the last migration in migrations/versions; a test checks the
two agree)."""

VERSION_TABLE = "seyaha_schema_version"
"""Alembic's version table in the state store."""

LOCK_NAME = "seyaha-agent-migrate"
"""The advisory lock that serialises migrations of one store."""

LOCK_WAIT_S = 600.0
"""Longest wait for another agent's migration before giving up (seconds): a large SQLite
copy or a MySQL index build on a big outbox can take minutes."""

LOCK_POLL_S = 0.2
"""How often a waiting agent tries the migration lock again (seconds)."""

MIGRATIONS = Path(__file__).with_name("migrations")

_META = sa.table("seyaha_meta", sa.column("key", sa.String), sa.column("value", sa.Text))
"""The one table every schema version has (read before the version is known)."""


@dataclass(frozen=True)
class Step:
    version: int
    title: str


@dataclass(frozen=True)
class Plan:
    """Where a store stands and what migrating it would do."""

    current: int | None
    """The store's schema version; None for an empty store."""
    head: int
    """The newest schema this agent knows."""
    steps: tuple[Step, ...]
    """The migrations still to apply, oldest first."""
    stamp_legacy: bool = False
    """A schema-1 store written by 0.1.0: its version is recorded before the steps run."""
    backup: Path | None = None
    """Where the SQLite store is copied before it changes."""


def _script() -> ScriptDirectory:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config(None))


def _alembic_config(connection: sa.Connection | None) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    return config


def head_version() -> int:
    head = _script().get_current_head()
    assert head is not None
    return int(head)


class Migrator:
    def __init__(self, engine: sa.Engine, *, clock: Clock | None = None) -> None:
        self.engine = engine
        self.dialect: Dialect = dialect_of(engine)
        self.clock = clock or SystemClock()
        self.where = engine.url.render_as_string(hide_password=True)

    # -- reading ----------------------------------------------------------------------

    def plan(self) -> Plan:
        """What `migrate` would do, without the lock and without changing anything."""
        with self.engine.connect() as conn:
            return self._plan(conn)

    def _plan(self, conn: sa.Connection) -> Plan:
        from alembic.runtime.migration import MigrationContext

        script = _script()
        head = head_version()
        inspector = sa.inspect(conn)
        revision = MigrationContext.configure(
            conn, opts={"version_table": VERSION_TABLE}
        ).get_current_revision()
        recorded = (
            conn.execute(sa.select(_META.c.value).where(_META.c.key == "schema_version")).scalar()
            if inspector.has_table("seyaha_meta")
            else None
        )
        if recorded is not None and (not str(recorded).isdigit() or int(recorded) > head):
            raise self._newer(str(recorded), head)
        stamp_legacy = False
        if revision is not None:
            if revision not in {s.revision for s in script.walk_revisions()}:
                raise self._newer(revision, head)
            current: int | None = int(revision)
        elif recorded is not None:
            current, stamp_legacy = int(recorded), True  # written by 0.1.0: no version table
        elif inspector.has_table("seyaha_meta"):
            raise StateError(
                f"the state store at {self.where} has a seyaha_meta table but no schema "
                "version: it was not written by seyaha-agent, or only in part. Point "
                "[state] url at a new store."
            )
        else:
            current = None
        steps = tuple(
            Step(int(s.revision), (s.doc or "").strip().splitlines()[0])
            for s in reversed(
                list(
                    script.iterate_revisions(
                        "head", "base" if current is None else f"{current:04d}"
                    )
                )
            )
        )
        backup = None
        database = self.dialect.file_database(self.engine.url)
        if steps and current is not None and database is not None:
            backup = database.with_name(f"{database.name}.schema-{current}.bak")
        return Plan(current, head, steps, stamp_legacy, backup)

    def _at_head(self) -> bool:
        """Whether the store is already at HEAD: the usual start, answered without Alembic
        or the migration lock (anything else goes the long way, under the lock)."""
        version = sa.table(VERSION_TABLE, sa.column("version_num", sa.String))
        with self.engine.connect() as conn:
            inspector = sa.inspect(conn)
            if not (inspector.has_table(VERSION_TABLE) and inspector.has_table("seyaha_meta")):
                return False
            revisions = conn.execute(sa.select(version.c.version_num)).scalars().all()
            recorded = conn.execute(
                sa.select(_META.c.value).where(_META.c.key == "schema_version")
            ).scalar()
        return revisions == [f"{HEAD:04d}"] and recorded == str(HEAD)

    def _newer(self, found: str, head: int) -> StateError:
        found = str(int(found)) if found.isdigit() else repr(found)
        return StateError(
            f"the state store at {self.where} has schema version {found}, written by a newer "
            f"seyaha-agent; this agent knows versions up to {head}. Run the newer agent "
            "again, or point [state] url at another store: stores are never downgraded."
        )

    # -- changing ---------------------------------------------------------------------

    def migrate(self, *, dry_run: bool = False) -> Plan:
        """Bring the store to the newest schema (or, with `dry_run`, say what that takes)."""
        # Alembic narrates at INFO ("Will assume transactional DDL"): our own events say
        # what happens.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        try:
            if dry_run:
                return self.plan()
            if self._at_head():
                return Plan(HEAD, HEAD, ())
            with self.engine.connect() as conn, self._locked(conn):
                # One transaction reads the version and applies the steps (SQLite takes its
                # write lock up front; MySQL commits each DDL statement by itself).
                with conn.execution_options(sqlite_begin="IMMEDIATE").begin():
                    plan = self._plan(conn)
                    if plan.steps or plan.stamp_legacy:
                        self._apply(conn, plan)
                return plan
        except SQLAlchemyError as exc:
            raise StateError(
                f"cannot open the state store at {self.where}: {first_line(exc)}"
            ) from None

    def _apply(self, conn: sa.Connection, plan: Plan) -> None:
        if plan.backup is not None:
            self._backup(plan.backup)
        if plan.steps:
            event(
                log,
                logging.WARNING,
                "state.migrating",
                f"upgrading the state store at {self.where} from schema "
                f"{plan.current if plan.current is not None else '(new)'} to {plan.head}"
                + (f"; a copy of it is kept at {plan.backup}" if plan.backup else ""),
            )
        from alembic import command

        config = _alembic_config(conn)
        if plan.stamp_legacy:
            command.stamp(config, f"{plan.current:04d}")
        command.upgrade(config, "head")
        if plan.steps:
            event(
                log,
                logging.INFO,
                "state.migrated",
                f"the state store at {self.where} is at schema {plan.head}",
            )

    def _backup(self, target: Path) -> None:
        database = self.dialect.file_database(self.engine.url)
        assert database is not None
        # SQLite's online backup copies a consistent picture, WAL included.
        source = sqlite3.connect(database)
        try:
            copy = sqlite3.connect(target)
            try:
                source.backup(copy)
            finally:
                copy.close()
        finally:
            source.close()

    def _locked(self, conn: sa.Connection) -> _MigrationLock:
        return _MigrationLock(self, conn)


class _MigrationLock:
    """Held while a store is inspected and migrated; waits for another agent's migration."""

    def __init__(self, migrator: Migrator, conn: sa.Connection) -> None:
        self.migrator = migrator
        self.conn = conn
        database = migrator.dialect.file_database(migrator.engine.url)
        self.file = (
            FileLock(database.with_name(database.name + ".migrate.lock"))
            if database is not None
            else None
        )

    def _try(self) -> bool:
        dialect = self.migrator.dialect
        if self.file is not None:
            return self.file.try_acquire()
        if not dialect.shared:
            return True  # an in-memory SQLite store: one connection, nobody to wait for
        taken = dialect.try_lock(self.conn, LOCK_NAME)
        self.conn.commit()
        return taken

    def __enter__(self) -> None:
        clock = self.migrator.clock
        deadline = clock.monotonic() + LOCK_WAIT_S
        said = False
        while not self._try():
            if not said:
                event(
                    log,
                    logging.INFO,
                    "state.migration_wait",
                    f"another seyaha-agent is migrating the state store at "
                    f"{self.migrator.where}; waiting for it",
                )
                said = True
            if clock.monotonic() >= deadline:
                raise StateError(
                    f"another seyaha-agent has been migrating the state store at "
                    f"{self.migrator.where} for more than {LOCK_WAIT_S:g} s. Let it finish "
                    "(its log says state.migrating), then start this one again."
                )
            time.sleep(LOCK_POLL_S)

    def __exit__(self, *_exc: object) -> None:
        if self.file is not None:
            self.file.release()
        elif self.migrator.dialect.shared:
            try:
                if self.conn.in_transaction():
                    self.conn.rollback()
                self.migrator.dialect.unlock(self.conn, LOCK_NAME)
                self.conn.commit()
            except SQLAlchemyError:
                # The connection died: the server dropped the lock with the session.
                self.conn.invalidate()
