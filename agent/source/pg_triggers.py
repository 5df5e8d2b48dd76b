"""PostgreSQL triggers that NOTIFY the agent's channel when a watched table changes.

`seyaha-agent triggers install|uninstall|show` applies or prints this SQL. The triggers are
statement-level: one cheap NOTIFY per INSERT/UPDATE/DELETE/TRUNCATE statement, whatever the
number of rows, and PostgreSQL folds identical notifications within one transaction.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa

FUNCTION = "seyaha_agent_notify"
TRIGGER = "seyaha_agent_notify"


def _quote(preparer: sa.sql.compiler.IdentifierPreparer, table: str) -> str:
    return ".".join(preparer.quote(part) for part in table.split("."))


def install_sql(engine: sa.Engine, tables: Sequence[str], channel: str) -> list[str]:
    preparer = engine.dialect.identifier_preparer
    literal = channel.replace("'", "''")
    statements = [
        f"CREATE OR REPLACE FUNCTION {FUNCTION}() RETURNS trigger LANGUAGE plpgsql AS $fn$\n"
        f"BEGIN\n  PERFORM pg_notify('{literal}', TG_TABLE_NAME);\n  RETURN NULL;\nEND\n$fn$"
    ]
    for table in tables:
        quoted = _quote(preparer, table)
        statements.append(f"DROP TRIGGER IF EXISTS {TRIGGER} ON {quoted}")
        statements.append(
            f"CREATE TRIGGER {TRIGGER} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON {quoted} "
            f"FOR EACH STATEMENT EXECUTE FUNCTION {FUNCTION}()"
        )
    return statements


def uninstall_sql(engine: sa.Engine, tables: Sequence[str]) -> list[str]:
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
