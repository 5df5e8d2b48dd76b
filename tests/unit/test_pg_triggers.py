"""What `triggers uninstall` decides from the catalog, and what it and `install` say when
PostgreSQL refuses: pure functions, no database."""

from __future__ import annotations

import pytest
from sqlalchemy.dialects import postgresql

from agent.errors import AgentError, SourceUnavailable
from agent.source.pg_triggers import (
    FUNCTION,
    TRIGGER,
    FoundFunction,
    FoundTrigger,
    Left,
    Uninstalled,
    notified_channel,
    plan_removal,
    refusal,
)

PREPARER = postgresql.dialect().identifier_preparer
CHANNEL = "seyaha_agent"


def trigger(
    table: str,
    oid: int,
    *,
    name: str = TRIGGER,
    function: str = FUNCTION,
    function_oid: int = 900,
    channel: str | None = CHANNEL,
) -> FoundTrigger:
    schema, _, relname = table.rpartition(".")
    return FoundTrigger(
        table_oid=oid,
        schema=schema,
        table=relname,
        name=name,
        function_oid=function_oid,
        function_name=function,
        channel=channel,
    )


FUNCTION_OURS = FoundFunction(oid=900, schema="public", channel=CHANNEL)


@pytest.mark.parametrize(
    ("body", "channel"),
    [
        (
            "\nBEGIN\n  PERFORM pg_notify('seyaha_agent', TG_TABLE_NAME);\n  RETURN NULL;\nEND\n",
            CHANNEL,
        ),
        ("BEGIN PERFORM pg_notify( 'it''s', TG_TABLE_NAME); RETURN NULL; END", "it's"),
        ("BEGIN RETURN NULL; END", None),
    ],
)
def test_the_channel_is_read_from_the_function_body(body: str, channel: str | None) -> None:
    assert notified_channel(body) == channel


def test_every_agent_trigger_is_dropped_whether_or_not_notify_tables_names_its_table() -> None:
    plan = plan_removal(
        {"slots": 1, "products": 2, "ghost": None},
        [trigger("public.slots", 1), trigger("public.options", 3)],
        [FUNCTION_OURS],
        CHANNEL,
        PREPARER,
    )
    assert [t.where for t in plan.triggers] == ["public.slots", "public.options"]
    assert plan.functions == (FUNCTION_OURS,)
    assert plan.nothing == ("products",)
    assert plan.missing == ("ghost",)
    assert plan.left == ()


@pytest.mark.parametrize(
    ("found", "why"),
    [
        (
            trigger("public.slots", 1, channel="other_agent"),
            "its function notifies channel 'other_agent', not [source] notify_channel "
            "'seyaha_agent'",
        ),
        (
            trigger("public.slots", 1, function="audit_changes", function_oid=901),
            "it calls audit_changes(), not the agent's seyaha_agent_notify()",
        ),
        (
            trigger("public.slots", 1, name="slots_audit"),
            "it calls seyaha_agent_notify() but the agent did not create it (its name differs)",
        ),
    ],
)
def test_a_trigger_that_is_not_the_agents_is_left_with_the_sql_to_drop_it(
    found: FoundTrigger, why: str
) -> None:
    plan = plan_removal({"slots": 1}, [found], [], CHANNEL, PREPARER)
    assert plan.triggers == ()
    assert plan.nothing == ("slots",)
    assert plan.left == (
        Left(
            f"trigger {found.name} on public.slots",
            why,
            (f"DROP TRIGGER IF EXISTS {found.name} ON public.slots",),
            failed=False,
        ),
    )


def test_the_function_stays_while_a_trigger_left_in_place_calls_it() -> None:
    plan = plan_removal(
        {},
        [trigger("public.slots", 1), trigger("public.slots", 1, name="slots_audit")],
        [FUNCTION_OURS],
        CHANNEL,
        PREPARER,
    )
    assert [t.name for t in plan.triggers] == [TRIGGER]
    assert plan.functions == ()
    assert plan.left[-1] == Left(
        "function public.seyaha_agent_notify()",
        "a trigger left in place still calls it",
        ("DROP FUNCTION IF EXISTS public.seyaha_agent_notify()",),
        failed=False,
    )


def test_a_function_notifying_another_channel_is_not_the_agents() -> None:
    other = FoundFunction(oid=901, schema="Inventory", channel="other_agent")
    plan = plan_removal({}, [], [other], CHANNEL, PREPARER)
    assert plan.functions == ()
    (left,) = plan.left
    assert left.sql == ('DROP FUNCTION IF EXISTS "Inventory".seyaha_agent_notify()',)


def test_quoted_names_keep_their_case_in_the_sql() -> None:
    found = trigger("Sales.Slots", 1)
    assert (
        found.drop_sql(PREPARER) == 'DROP TRIGGER IF EXISTS seyaha_agent_notify ON "Sales"."Slots"'
    )


def test_the_report_says_what_was_removed_and_why_the_rest_was_not() -> None:
    done = Uninstalled(
        removed=("slots", "public.options (not in notify_tables)"),
        functions=("public.seyaha_agent_notify()",),
        nothing=("products",),
        missing=("ghost",),
        left=(Left("trigger x on public.t", "not ours", ("DROP TRIGGER x ON public.t",), False),),
    )
    assert done.complete
    lines = done.lines()
    assert lines[0] == "triggers removed from: slots, public.options (not in notify_tables)"
    assert lines[1] == "products: no agent trigger on it, nothing to remove"
    assert lines[2].startswith("ghost: table does not exist, nothing to remove (check [source] ")
    assert lines[3] == "function public.seyaha_agent_notify() removed"
    assert lines[4] == (
        "left in place: trigger x on public.t: not ours; to remove it: DROP TRIGGER x ON public.t;"
    )


def test_nothing_removed_is_said_as_such_and_a_failure_makes_it_incomplete() -> None:
    left = Left("trigger t on public.slots", "must be owner", ("DROP TRIGGER t ON slots",), True)
    done = Uninstalled(removed=(), functions=(), nothing=(), missing=(), left=(left,))
    assert done.lines()[0] == "no trigger removed: none of the agent's triggers is installed"
    assert not done.complete


class FakeDriverError(Exception):
    def __init__(self, message: str, sqlstate: str | None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


@pytest.mark.parametrize(
    ("sqlstate", "says", "never"),
    [
        (
            "42P01",
            "table ghost does not exist in the source database (check [source] notify_tables",
            "privilege",
        ),
        ("3F000", "table ghost does not exist in the source database", "privilege"),
        ("42501", "the source user lacks the privilege", "does not exist"),
        ("42809", "`seyaha-agent triggers show` prints the SQL for a DBA", "privilege"),
    ],
)
def test_a_refusal_names_its_real_cause(sqlstate: str, says: str, never: str) -> None:
    error = refusal("install", "ghost", FakeDriverError("relation failed", sqlstate))
    assert type(error) is AgentError
    assert says in str(error)
    assert never not in str(error)
    assert "nothing was installed" in str(error)


def test_a_refusal_without_sqlstate_is_an_unreachable_source() -> None:
    error = refusal("uninstall", "public.slots", FakeDriverError("server closed", None))
    assert isinstance(error, SourceUnavailable)
    assert "nothing was removed" in str(error)
