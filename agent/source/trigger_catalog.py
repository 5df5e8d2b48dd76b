"""What the catalog says about the agent's PostgreSQL triggers, and what `triggers uninstall`
removes and leaves (pure: agent/source/pg_triggers.py reads the catalog and drops).

The agent's triggers are those named TRIGGER that call its FUNCTION notifying the configured
channel, on whatever table; anything else with one of those names is left in place, with
the SQL a DBA can run to remove it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import sqlalchemy as sa

FUNCTION = "seyaha_agent_notify"
TRIGGER = "seyaha_agent_notify"

CHECK_TABLES = (
    "check [source] notify_tables and the schema; a name without a schema is looked up in "
    "the source user's search_path"
)

_NOTIFIED = re.compile(r"pg_notify\(\s*'((?:[^']|'')*)'")
"""The channel literal in the body of a function install_sql wrote."""


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
