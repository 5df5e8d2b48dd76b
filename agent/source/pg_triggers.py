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

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, SQLAlchemyError

from agent.db import redact_url
from agent.errors import AgentError, SourceUnavailable, first_line, sqlstate
from agent.source.trigger_catalog import (
    CHECK_TABLES,
    FUNCTION,
    STILL_CALLED,
    TRIGGER,
    FoundFunction,
    FoundTrigger,
    Left,
    Removal,
    Uninstalled,
    notified_channel,
    plan_removal,
)

INSUFFICIENT_PRIVILEGE = "42501"
"""SQLSTATE insufficient_privilege: not the owner, no TRIGGER or no CREATE privilege."""

NOT_FOUND = frozenset({"42P01", "3F000"})
"""SQLSTATE undefined_table and invalid_schema_name: the table (or its schema) is not there."""

INSTALL_PRIVILEGE_HINT = (
    "the source user lacks the privilege: it needs CREATE on the schema for the function and "
    "TRIGGER on each table, or a DBA can run the SQL `seyaha-agent triggers show` prints"
)

UNINSTALL_PRIVILEGE_HINT = "only the table's owner or a superuser can drop its trigger"

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
# (what to remove is decided in agent/source/trigger_catalog.py)


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


__all__ = [
    "FUNCTION",
    "TRIGGER",
    "FoundFunction",
    "FoundTrigger",
    "Left",
    "Removal",
    "Uninstalled",
    "install",
    "install_sql",
    "installed",
    "notified_channel",
    "plan_removal",
    "refusal",
    "uninstall",
]
