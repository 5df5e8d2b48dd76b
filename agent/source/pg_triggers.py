"""PostgreSQL triggers that NOTIFY the agent's channel when a watched table changes.

`seyaha-agent triggers install|uninstall|show` applies or prints this SQL. The triggers are
statement-level: one cheap NOTIFY per INSERT/UPDATE/DELETE/TRUNCATE statement, whatever the
number of rows, and PostgreSQL folds identical notifications within one transaction.

Uninstalling finds the agent's triggers in the catalog (pg_trigger, pg_proc) by the names it
installs them under and the channel their function notifies, not from `notify_tables`: a
table taken out of the configuration after `install` still carries a trigger, and a table
named there may never have had one, or may not exist.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from agent.db import redact_url
from agent.errors import AgentError, SourceUnavailable, first_line, sqlstate

FUNCTION = "seyaha_agent_notify"
TRIGGER = "seyaha_agent_notify"

INSUFFICIENT_PRIVILEGE = "42501"
"""SQLSTATE insufficient_privilege: not the owner, no TRIGGER or no CREATE privilege."""

NOT_FOUND = frozenset({"42P01", "3F000"})
"""SQLSTATE undefined_table and invalid_schema_name: the table (or its schema) is not there."""

CHECK_TABLES = (
    "check [source] notify_tables and the schema; a name without a schema is looked up in "
    "the source user's search_path"
)

INSTALL_PRIVILEGE_HINT = (
    "the source user lacks the privilege: it needs CREATE on the schema for the function and "
    "TRIGGER on each table, or a DBA can run the SQL `seyaha-agent triggers show` prints"
)

UNINSTALL_PRIVILEGE_HINT = "only the table's owner or a superuser can drop its trigger"

_NOTIFIED = re.compile(r"pg_notify\(\s*'((?:[^']|'')*)'")
"""The channel literal in the body of a function install_sql wrote."""

_TABLE_OID = sa.text(
    # The name is matched as install_sql quotes it (its case kept). Without a schema, the
    # first schema of the search path that holds it wins, as it would in a statement.
    "SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "LEFT JOIN unnest(current_schemas(false)) WITH ORDINALITY AS s(nspname, position) "
    "ON s.nspname = n.nspname "
    "WHERE c.relname = :table AND (n.nspname = CAST(:schema AS text) "
    "OR (CAST(:schema AS text) IS NULL AND s.position IS NOT NULL)) "
    "ORDER BY s.position LIMIT 1"
)

_TRIGGERS = sa.text(
    "SELECT c.oid AS table_oid, n.nspname AS table_schema, c.relname AS table_name, "
    "t.tgname AS trigger_name, p.oid AS function_oid, p.proname AS function_name, "
    "p.prosrc AS body "
    "FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
    "JOIN pg_namespace n ON n.oid = c.relnamespace JOIN pg_proc p ON p.oid = t.tgfoid "
    "WHERE NOT t.tgisinternal AND (t.tgname = :trigger OR p.proname = :function) "
    "ORDER BY n.nspname, c.relname, t.tgname"
)

_FUNCTIONS = sa.text(
    "SELECT p.oid AS function_oid, n.nspname AS function_schema, p.prosrc AS body "
    "FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace "
    "WHERE p.proname = :function AND p.pronargs = 0 AND p.prorettype = 'trigger'::regtype "
    "ORDER BY n.nspname"
)


def _quote(preparer: sa.sql.compiler.IdentifierPreparer, table: str) -> str:
    return ".".join(preparer.quote(part) for part in table.split("."))


def install_sql(engine: sa.Engine, tables: Sequence[str], channel: str) -> list[str]:
    preparer = engine.dialect.identifier_preparer
    statements = [_function_sql(channel)]
    for table in tables:
        statements.extend(_table_sql(_quote(preparer, table)))
    return statements


def _function_sql(channel: str) -> str:
    literal = channel.replace("'", "''")
    return (
        f"CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $fn$\n"
        f"BEGIN\n  PERFORM pg_notify('{literal}', TG_TABLE_NAME);\n  RETURN NULL;\nEND\n$fn$"
    )


def _table_sql(quoted: str) -> list[str]:
    return [
        f"DROP TRIGGER IF EXISTS {TRIGGER} ON {quoted}",
        f"CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {quoted} "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {FUNCTION}()",
    ]


def uninstall_sql(engine: sa.Engine, tables: Sequence[str]) -> list[str]:
    """DROP statements for `tables` as named, for a script (`uninstall` asks the catalog
    where the triggers are instead)."""
    preparer = engine.dialect.identifier_preparer
    statements = [f"DROP TRIGGER IF EXISTS {TRIGGER} ON {_quote(preparer, t)}" for t in tables]
    statements.append(f"DROP FUNCTION IF EXISTS {FUNCTION}()")
    return statements


def installed(engine: sa.Engine) -> list[str]:
    """Tables (schema.table) that currently carry the agent's trigger."""
    query = sa.text(
        "SELECT n.nspname || '.' || c.relname FROM pg_trigger t "
        "JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE t.tgname = :name ORDER BY 1"
    )
    with engine.connect() as conn:
        return [str(r[0]) for r in conn.execute(query, {"name": TRIGGER})]


def apply(engine: sa.Engine, statements: Sequence[str]) -> None:
    with engine.begin() as conn:
        for statement in statements:
            conn.exec_driver_sql(statement)


# -- what went wrong, for the person who must act -------------------------------------


def _not_found(tables: Sequence[str]) -> str:
    if len(tables) == 1:
        return f"table {tables[0]} does not exist in the source database ({CHECK_TABLES})"
    return f"tables {', '.join(tables)} do not exist in the source database ({CHECK_TABLES})"


def refusal(action: str, subject: str, exc: BaseException) -> AgentError:
    """The one-line error for a statement of `triggers <action>` on `subject` (a table, or
    the function) that PostgreSQL refused; the transaction is rolled back, so nothing
    changed."""
    reason = first_line(exc)
    state = sqlstate(exc)
    nothing = "nothing was installed" if action == "install" else "nothing was removed"
    if state in NOT_FOUND:
        return AgentError(f"triggers {action}: {_not_found([subject])}; {nothing} ({reason})")
    if state == INSUFFICIENT_PRIVILEGE:
        hint = INSTALL_PRIVILEGE_HINT if action == "install" else UNINSTALL_PRIVILEGE_HINT
        return AgentError(f"triggers {action} failed on {subject}: {reason} ({hint}); {nothing}")
    if state is None or state.startswith("08") or getattr(exc, "connection_invalidated", False):
        return SourceUnavailable(
            f"triggers {action} failed on {subject}: the source database went away "
            f"({reason}); {nothing}, run it again once it is back"
        )
    return AgentError(
        f"triggers {action} failed on {subject}: {reason}; {nothing} "
        "(`seyaha-agent triggers show` prints the SQL for a DBA)"
    )


@contextmanager
def _transaction(engine: sa.Engine) -> Iterator[sa.Connection]:
    """One transaction on the source: committed at the end, rolled back on any error."""
    try:
        conn = engine.connect()
    except SQLAlchemyError as exc:
        where = redact_url(engine.url.render_as_string(hide_password=True))
        raise SourceUnavailable(
            f"cannot reach the source database at {where}: {first_line(exc)}"
        ) from None
    with conn, conn.begin():
        yield conn


def _table_oid(conn: sa.Connection, table: str) -> int | None:
    schema, _, name = table.rpartition(".")
    found = conn.execute(_TABLE_OID, {"table": name, "schema": schema or None}).scalar()
    return None if found is None else int(found)


def _run(conn: sa.Connection, action: str, subject: str, statement: str) -> None:
    try:
        conn.exec_driver_sql(statement)
    except DBAPIError as exc:
        raise refusal(action, subject, exc) from None


# -- install ----------------------------------------------------------------------------


def install(engine: sa.Engine, tables: Sequence[str], channel: str) -> None:
    """Put the trigger on every table of `tables`, all or nothing.

    Every table is looked up first, so that a name that is not there is reported as such
    (with every other missing name), not as a refused privilege.
    """
    preparer = engine.dialect.identifier_preparer
    with _transaction(engine) as conn:
        missing = [table for table in tables if _table_oid(conn, table) is None]
        if missing:
            raise AgentError(f"triggers install: {_not_found(missing)}; nothing was installed")
        _run(conn, "install", f"function {FUNCTION}()", _function_sql(channel))
        for table in tables:
            for statement in _table_sql(_quote(preparer, table)):
                _run(conn, "install", table, statement)


# -- uninstall --------------------------------------------------------------------------


def notified_channel(body: str) -> str | None:
    """The channel a trigger function written by install_sql notifies (None: not one of its
    functions)."""
    found = _NOTIFIED.search(body)
    return None if found is None else found.group(1).replace("''", "'")


@dataclass(frozen=True)
class FoundFunction:
    """A trigger function named FUNCTION, as the catalog lists it."""

    oid: int
    schema: str
    channel: str | None

    @property
    def where(self) -> str:
        return f"{self.schema}.{FUNCTION}()"

    def drop_sql(self, preparer: sa.sql.compiler.IdentifierPreparer) -> str:
        return f"DROP FUNCTION IF EXISTS {preparer.quote(self.schema)}.{preparer.quote(FUNCTION)}()"


@dataclass(frozen=True)
class FoundTrigger:
    """A trigger named TRIGGER, or one calling a function named FUNCTION."""

    table_oid: int
    schema: str
    table: str
    name: str
    function_oid: int
    function_name: str
    channel: str | None

    @property
    def where(self) -> str:
        return f"{self.schema}.{self.table}"

    def drop_sql(self, preparer: sa.sql.compiler.IdentifierPreparer) -> str:
        table = f"{preparer.quote(self.schema)}.{preparer.quote(self.table)}"
        return f"DROP TRIGGER IF EXISTS {preparer.quote(self.name)} ON {table}"


@dataclass(frozen=True)
class Left:
    """Something that stays in the database after `uninstall`, and how to remove it."""

    what: str
    why: str
    sql: tuple[str, ...]
    failed: bool
    """True: the agent's own, and removing it failed; False: not the agent's to remove."""


@dataclass(frozen=True)
class Removal:
    """What `uninstall` will drop and what it leaves, decided from the catalog."""

    triggers: tuple[FoundTrigger, ...]
    functions: tuple[FoundFunction, ...]
    left: tuple[Left, ...]
    nothing: tuple[str, ...]
    """Tables of notify_tables that exist and carry none of the agent's triggers."""
    missing: tuple[str, ...]
    """Tables of notify_tables that do not exist."""


STILL_CALLED = "a trigger left in place still calls it"


def _other_channel(found: str | None, channel: str) -> str:
    notifies = "notifies no channel" if found is None else f"notifies channel {found!r}"
    return f"{notifies}, not [source] notify_channel {channel!r}"


def plan_removal(
    named: Mapping[str, int | None],
    triggers: Sequence[FoundTrigger],
    functions: Sequence[FoundFunction],
    channel: str,
    preparer: sa.sql.compiler.IdentifierPreparer,
) -> Removal:
    """Pure: the agent's triggers are those named TRIGGER that call its FUNCTION notifying
    `channel`, on whatever table; its functions are those named FUNCTION notifying `channel`
    that no other trigger still needs. `named` maps each table of notify_tables to its oid
    (None: the table does not exist)."""
    ours: list[FoundTrigger] = []
    left: list[Left] = []
    for trigger in triggers:
        if (
            trigger.name == TRIGGER
            and trigger.function_name == FUNCTION
            and trigger.channel == channel
        ):
            ours.append(trigger)
            continue
        if trigger.name != TRIGGER:
            why = f"it calls {FUNCTION}() but the agent did not create it (its name differs)"
        elif trigger.function_name != FUNCTION:
            why = f"it calls {trigger.function_name}(), not the agent's {FUNCTION}()"
        else:
            why = f"its function {_other_channel(trigger.channel, channel)}"
        what = f"trigger {trigger.name} on {trigger.where}"
        left.append(Left(what, why, (trigger.drop_sql(preparer),), failed=False))
    still_used = {t.function_oid for t in triggers if t not in ours}
    mine: list[FoundFunction] = []
    for function in functions:
        if function.channel == channel and function.oid not in still_used:
            mine.append(function)
            continue
        why = (
            f"it {_other_channel(function.channel, channel)}"
            if function.channel != channel
            else STILL_CALLED
        )
        sql = (function.drop_sql(preparer),)
        left.append(Left(f"function {function.where}", why, sql, failed=False))
    carrying = {t.table_oid for t in ours}
    return Removal(
        triggers=tuple(ours),
        functions=tuple(mine),
        left=tuple(left),
        nothing=tuple(n for n, oid in named.items() if oid is not None and oid not in carrying),
        missing=tuple(n for n, oid in named.items() if oid is None),
    )


@dataclass(frozen=True)
class Uninstalled:
    """What `uninstall` did, in the words it prints."""

    removed: tuple[str, ...]
    functions: tuple[str, ...]
    nothing: tuple[str, ...]
    missing: tuple[str, ...]
    left: tuple[Left, ...]

    @property
    def complete(self) -> bool:
        """Whether every trigger and function of the agent's is gone."""
        return not any(item.failed for item in self.left)

    def lines(self) -> list[str]:
        lines = [
            f"triggers removed from: {', '.join(self.removed)}"
            if self.removed
            else "no trigger removed: none of the agent's triggers is installed"
        ]
        lines += [f"{name}: no agent trigger on it, nothing to remove" for name in self.nothing]
        lines += [
            f"{name}: table does not exist, nothing to remove ({CHECK_TABLES})"
            for name in self.missing
        ]
        lines += [f"function {name} removed" for name in self.functions]
        lines += [
            f"left in place: {item.what}: {item.why}; to remove it: "
            + " ".join(f"{statement};" for statement in item.sql)
            for item in self.left
        ]
        return lines


def _found(conn: sa.Connection) -> tuple[list[FoundTrigger], list[FoundFunction]]:
    names = {"trigger": TRIGGER, "function": FUNCTION}
    triggers = [
        FoundTrigger(
            table_oid=int(row.table_oid),
            schema=str(row.table_schema),
            table=str(row.table_name),
            name=str(row.trigger_name),
            function_oid=int(row.function_oid),
            function_name=str(row.function_name),
            channel=notified_channel(str(row.body or "")),
        )
        for row in conn.execute(_TRIGGERS, names)
    ]
    functions = [
        FoundFunction(
            oid=int(row.function_oid),
            schema=str(row.function_schema),
            channel=notified_channel(str(row.body or "")),
        )
        for row in conn.execute(_FUNCTIONS, names)
    ]
    return triggers, functions


def _drop(conn: sa.Connection, subject: str, statement: str) -> str | None:
    """Run one DROP in a savepoint: None when done, the reason when the source user may
    not; any other refusal ends the whole uninstall (rolled back)."""
    try:
        with conn.begin_nested():
            conn.exec_driver_sql(statement)
    except DBAPIError as exc:
        if sqlstate(exc) != INSUFFICIENT_PRIVILEGE:
            raise refusal("uninstall", subject, exc) from None
        return first_line(exc)
    return None


def uninstall(engine: sa.Engine, tables: Sequence[str], channel: str) -> Uninstalled:
    """Remove the agent's triggers from every table that has one (named in `tables` or not)
    and then its function; what the source user may not drop is left and reported with the
    SQL a DBA can run."""
    preparer = engine.dialect.identifier_preparer
    with _transaction(engine) as conn:
        named = {table: _table_oid(conn, table) for table in tables}
        triggers, functions = _found(conn)
        plan = plan_removal(named, triggers, functions, channel, preparer)
        order = {oid: i for i, oid in enumerate(named.values()) if oid is not None}
        shown = {oid: name for name, oid in named.items() if oid is not None}
        removed: list[FoundTrigger] = []
        left = list(plan.left)
        failed_functions: set[int] = set()
        for trigger in plan.triggers:
            statement = trigger.drop_sql(preparer)
            refused = _drop(conn, trigger.where, statement)
            if refused is None:
                removed.append(trigger)
            else:
                failed_functions.add(trigger.function_oid)
                why = f"{refused} ({UNINSTALL_PRIVILEGE_HINT})"
                what = f"trigger {TRIGGER} on {trigger.where}"
                left.append(Left(what, why, (statement,), failed=True))
        dropped: list[str] = []
        for function in plan.functions:
            what = f"function {function.where}"
            statement = function.drop_sql(preparer)
            if function.oid in failed_functions:
                left.append(Left(what, STILL_CALLED, (statement,), failed=True))
                continue
            refused = _drop(conn, what, statement)
            if refused is None:
                dropped.append(function.where)
            else:
                why = f"{refused} (only its owner or a superuser can drop it)"
                left.append(Left(what, why, (statement,), failed=True))
    # The tables of notify_tables first, in its order, then the others the catalog showed.
    removed.sort(key=lambda t: (order.get(t.table_oid, len(order)), t.where))
    return Uninstalled(
        removed=tuple(shown.get(t.table_oid, f"{t.where} (not in notify_tables)") for t in removed),
        functions=tuple(dropped),
        nothing=plan.nothing,
        missing=plan.missing,
        left=tuple(left),
    )
