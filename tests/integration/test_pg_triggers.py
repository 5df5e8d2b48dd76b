"""`triggers install|uninstall` against a real PostgreSQL (the command's lines; the CLI
itself is in tests/acceptance/test_triggers_cli.py): uninstall removes the agent's triggers
wherever the catalog shows them and says what it did for each table; a missing table is
named as missing, a refused privilege as a privilege.

Each test has its own database (and, where it needs one, its own login role, dropped after).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import pytest
import sqlalchemy as sa

from agent.db import create_engine
from agent.errors import AgentError
from agent.source import pg_triggers
from agent.source.pg_triggers import Uninstalled

pytestmark = pytest.mark.postgres

CHANNEL = "seyaha_agent"


@dataclass
class Source:
    """An inventory database with a few tables, and a superuser connection to it."""

    url: str
    admin: sa.Engine
    roles: list[str]

    def execute(self, *statements: str) -> None:
        with self.admin.connect() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)

    def install(self, tables: Sequence[str], *, url: str | None = None) -> None:
        engine = create_engine(url or self.url, role="source")
        try:
            pg_triggers.install(engine, tables, CHANNEL)
        finally:
            engine.dispose()

    def uninstall(self, tables: Sequence[str], *, url: str | None = None) -> Uninstalled:
        engine = create_engine(url or self.url, role="source")
        try:
            return pg_triggers.uninstall(engine, tables, CHANNEL)
        finally:
            engine.dispose()

    def installed(self) -> list[str]:
        return pg_triggers.installed(self.admin)

    def functions(self) -> int:
        with self.admin.connect() as conn:
            return int(
                conn.execute(
                    sa.text("SELECT count(*) FROM pg_proc WHERE proname = :name"),
                    {"name": pg_triggers.FUNCTION},
                ).scalar_one()
            )

    def role(self) -> str:
        """A new login role that owns nothing and may use schema public: its source URL."""
        name = f"seyaha_test_{uuid.uuid4().hex[:10]}"
        self.execute(f"CREATE ROLE {name} LOGIN", f"GRANT USAGE ON SCHEMA public TO {name}")
        self.roles.append(name)
        return sa.engine.make_url(self.url).set(username=name).render_as_string(False)


@pytest.fixture
def source(new_database: Callable[[str], str]) -> Iterator[Source]:
    url = new_database("postgresql")
    admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    made = Source(url, admin, [])
    made.execute(
        "CREATE TABLE slots (id int)",
        "CREATE TABLE products (id int)",
        "CREATE TABLE options (id int)",
        'CREATE SCHEMA "Sales"',
        'CREATE TABLE "Sales"."Slots" (id int)',
    )
    try:
        yield made
    finally:
        for role in made.roles:
            # The role owns privileges (and maybe tables) in this database only.
            made.execute(f"REASSIGN OWNED BY {role} TO CURRENT_USER", f"DROP OWNED BY {role}")
            made.execute(f"DROP ROLE {role}")
        admin.dispose()


def removal_sql(lines: list[str]) -> list[str]:
    """The statements `uninstall` printed for what it left in place."""
    found = [line.split("; to remove it: ", 1)[1] for line in lines if line.startswith("left")]
    return [s.strip() for text in found for s in text.split(";") if s.strip()]


CHECK = (
    "(check [source] notify_tables and the schema; a name without a schema is looked up in "
    "the source user's search_path)"
)


def test_uninstall_reports_only_what_it_removed_and_what_each_named_table_had(
    source: Source,
) -> None:
    source.install(["slots", "Sales.Slots"])
    assert sorted(source.installed()) == ["Sales.Slots", "public.slots"]

    named = ["Sales.Slots", "slots", "products", "ghost"]
    done = source.uninstall(named)
    assert done.complete
    assert done.lines() == [
        "triggers removed from: Sales.Slots, slots",
        "products: no agent trigger on it, nothing to remove",
        f"ghost: table does not exist, nothing to remove {CHECK}",
        "function public.seyaha_agent_notify() removed",
    ]
    assert source.installed() == []
    assert source.functions() == 0

    # Idempotent: nothing left, and it says so.
    assert source.uninstall(named).lines() == [
        "no trigger removed: none of the agent's triggers is installed",
        "Sales.Slots: no agent trigger on it, nothing to remove",
        "slots: no agent trigger on it, nothing to remove",
        "products: no agent trigger on it, nothing to remove",
        f"ghost: table does not exist, nothing to remove {CHECK}",
    ]


@pytest.mark.parametrize(
    ("now_named", "removed"),
    [
        pytest.param(
            ["slots"],
            "slots, public.options (not in notify_tables), public.products (not in notify_tables)",
            id="shortened",
        ),
        pytest.param(
            [],
            "public.options (not in notify_tables), public.products (not in notify_tables), "
            "public.slots (not in notify_tables)",
            id="emptied",
        ),
    ],
)
def test_uninstall_after_notify_tables_lost_tables_still_removes_every_agent_trigger(
    source: Source, now_named: list[str], removed: str
) -> None:
    source.install(["slots", "products", "options"])

    assert source.uninstall(now_named).lines() == [
        f"triggers removed from: {removed}",
        "function public.seyaha_agent_notify() removed",
    ]
    assert source.installed() == []
    assert source.functions() == 0


def test_uninstall_leaves_a_trigger_for_another_channel_and_prints_the_sql_to_drop_it(
    source: Source,
) -> None:
    # Installed for another channel (another agent's configuration, or an older one).
    pg_triggers.apply(
        source.admin, pg_triggers.install_sql(source.admin, ["options"], "other_agent")
    )
    source.execute(
        "CREATE FUNCTION audit() RETURNS trigger LANGUAGE plpgsql AS $$BEGIN RETURN NULL; END$$",
        "CREATE TRIGGER seyaha_agent_notify AFTER INSERT ON products "
        "FOR EACH STATEMENT EXECUTE FUNCTION audit()",
    )

    done = source.uninstall(["options", "products"])
    assert done.complete  # none of it was the agent's
    lines = done.lines()

    assert lines == [
        "no trigger removed: none of the agent's triggers is installed",
        "options: no agent trigger on it, nothing to remove",
        "products: no agent trigger on it, nothing to remove",
        "left in place: trigger seyaha_agent_notify on public.options: its function notifies "
        "channel 'other_agent', not [source] notify_channel 'seyaha_agent'; to remove it: "
        "DROP TRIGGER IF EXISTS seyaha_agent_notify ON public.options;",
        "left in place: trigger seyaha_agent_notify on public.products: it calls audit(), not "
        "the agent's seyaha_agent_notify(); to remove it: "
        "DROP TRIGGER IF EXISTS seyaha_agent_notify ON public.products;",
        "left in place: function public.seyaha_agent_notify(): it notifies channel "
        "'other_agent', not [source] notify_channel 'seyaha_agent'; to remove it: "
        "DROP FUNCTION IF EXISTS public.seyaha_agent_notify();",
    ]
    assert sorted(source.installed()) == ["public.options", "public.products"]

    source.execute(*removal_sql(lines))
    assert source.installed() == []
    assert source.functions() == 0


def test_uninstall_removes_what_the_source_user_may_and_names_the_rest_with_its_sql(
    source: Source,
) -> None:
    limited = source.role()
    source.execute(f"ALTER TABLE products OWNER TO {sa.engine.make_url(limited).username}")
    source.install(["slots", "products"])

    done = source.uninstall(["slots", "products"], url=limited)

    assert not done.complete  # the command exits 1
    lines = done.lines()
    removed, slots, function = lines
    assert removed == "triggers removed from: products"  # the table the role owns
    # The server's own words in the middle ("must be owner of table/relation slots").
    assert slots.startswith("left in place: trigger seyaha_agent_notify on public.slots: must ")
    assert slots.endswith(
        "(only the table's owner or a superuser can drop its trigger); to remove it: "
        "DROP TRIGGER IF EXISTS seyaha_agent_notify ON public.slots;"
    )
    assert function == (
        "left in place: function public.seyaha_agent_notify(): a trigger left in place still "
        "calls it; to remove it: DROP FUNCTION IF EXISTS public.seyaha_agent_notify();"
    )
    assert source.installed() == ["public.slots"]

    source.execute(*removal_sql(lines))  # what a DBA runs
    assert source.installed() == []
    assert source.functions() == 0


def test_install_names_missing_tables_as_missing_and_installs_nothing(source: Source) -> None:
    with pytest.raises(AgentError) as refused:
        source.install(["slots", "ghost", "nowhere.slots"])

    message = str(refused.value)
    assert message == (
        "triggers install: tables ghost, nowhere.slots do not exist in the source database "
        f"{CHECK}; nothing was installed"
    )
    assert "privilege" not in message
    assert source.installed() == []
    assert source.functions() == 0


def test_install_without_the_privilege_says_which_privilege(source: Source) -> None:
    limited = source.role()

    with pytest.raises(AgentError) as refused:
        source.install(["slots"], url=limited)

    message = str(refused.value)
    assert "the source user lacks the privilege" in message
    assert "does not exist" not in message
    assert message.endswith("nothing was installed")
    assert source.installed() == []
