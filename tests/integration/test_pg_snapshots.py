"""A PostgreSQL source without a change query: the server's snapshot decides when the daemon
runs a pass (agent/source/xids.py), against the real server. Driven by hand as in
test_update_times.py (tests/integration/commits.py)."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from agent.app import Agent
from agent.commands import check
from agent.sandbox import Sandbox
from agent.source.xids import TransactionIds
from tests.conftest import INTEGRATION_ID, SECRET
from tests.integration.commits import (
    FALLBACK_S,
    POLL_S,
    Ahead,
    at_rest,
    notifies,
    pass_,
    quiet,
)
from tests.integration.inventory import (
    Inventory,
    first_day,
    seed_tours,
    write_config,
)

# A commit in any database of the server moves its snapshot: no other test runs meanwhile.
pytestmark = [pytest.mark.postgres, pytest.mark.alone]

MakeInventory = Callable[[str], Inventory]
MakeSandbox = Callable[..., Sandbox]


def _book(conn: sa.Connection, inventory: Inventory, slot: int, vacancies: int) -> None:
    conn.execute(
        sa.update(inventory.slots).where(inventory.slots.c.id == slot).values(vacancies=vacancies)
    )


def test_at_rest_no_pass_runs_reads_included_and_a_booking_runs_one_at_once(
    make_inventory: MakeInventory, make_sandbox: MakeSandbox, agents: Callable[..., Agent]
) -> None:
    inventory = make_inventory("postgresql")
    seed_tours(inventory, first_day())
    clock = Ahead()
    agent = agents(inventory, make_sandbox().url, clock=clock)
    assert isinstance(agent.sensor, TransactionIds)
    first = agent.poll_when_due()
    assert first is not None
    assert first.baseline
    quiet(agent, clock)
    with inventory.engine.connect() as reader:  # reads take no transaction id
        reader.execute(sa.select(sa.func.count()).select_from(inventory.slots)).scalar_one()
    assert pass_(agent, clock) is None
    inventory.update_slot(101, vacancies=7)
    assert notifies(pass_(agent, clock)) == 1
    assert pass_(agent, clock) is None  # exact: no settling pass after it


def test_a_transaction_running_across_a_pass_is_found_when_it_commits(
    make_inventory: MakeInventory, make_sandbox: MakeSandbox, agents: Callable[..., Agent]
) -> None:
    """Its change is not in the pass that ran while it was open; when it commits it leaves
    the running list, which is a change, however long it stayed open."""
    inventory = make_inventory("postgresql")
    agent, clock = at_rest(inventory, agents, make_sandbox().url)
    with inventory.engine.connect() as slow:
        slow.begin()
        _book(slow, inventory, 101, 3)
        inventory.update_slot(102, vacancies=2)  # commits while the slow one runs
        assert notifies(pass_(agent, clock)) == 1
        time.sleep(1.0)
        assert pass_(agent, clock) is None  # nothing completed since
        slow.commit()
    assert notifies(pass_(agent, clock)) == 1
    assert pass_(agent, clock) is None


def test_a_transaction_begun_after_the_reading_is_found_when_it_commits(
    make_inventory: MakeInventory, make_sandbox: MakeSandbox, agents: Callable[..., Agent]
) -> None:
    inventory = make_inventory("postgresql")
    agent, clock = at_rest(inventory, agents, make_sandbox().url)
    with inventory.engine.connect() as late:
        late.begin()
        _book(late, inventory, 103, 1)  # takes an id past the last reading's xmax
        assert pass_(agent, clock) is None  # running, not completed
        late.commit()
    assert notifies(pass_(agent, clock)) == 1


def test_a_rolled_back_transaction_costs_one_pass_that_finds_nothing(
    make_inventory: MakeInventory, make_sandbox: MakeSandbox, agents: Callable[..., Agent]
) -> None:
    inventory = make_inventory("postgresql")
    agent, clock = at_rest(inventory, agents, make_sandbox().url)
    with inventory.engine.connect() as undone:
        undone.begin()
        _book(undone, inventory, 104, 0)
        undone.rollback()
    assert notifies(pass_(agent, clock)) == 0
    assert pass_(agent, clock) is None


def test_check_says_the_snapshot_decides(
    make_inventory: MakeInventory, make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    inventory = make_inventory("postgresql")
    seed_tours(inventory, first_day())
    path = write_config(
        tmp_path,
        name="check",
        base_url=make_sandbox().url,
        integration_id=INTEGRATION_ID,
        secret=SECRET,
        source_url=inventory.url,
        state_url=f"sqlite:///{tmp_path / 'check.db'}",
        source={"full_scan_interval": FALLBACK_S},
    )
    out = io.StringIO()
    assert check(path, out) == 0
    assert (
        "ok      the daemon passes when the server's snapshot (pg_current_snapshot: "
        "transactions completed) shows a commit, and every 3600 s (full_scan_interval)"
    ) in out.getvalue()


def test_an_agent_in_standby_asks_for_its_turn_every_poll_interval_not_every_reading(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    agents: Callable[..., Agent],
    new_database: Callable[[str], str],
) -> None:
    """Two agents on one PostgreSQL state store: the one without the scanner lease tries
    its turn (a store query) at poll_interval, as before, not four times a second."""
    inventory = make_inventory("postgresql")
    seed_tours(inventory, first_day())
    store = new_database("postgresql")
    url = make_sandbox().url
    holder = agents(inventory, url, state_url=store)
    assert holder.poll_when_due() is not None
    clock = Ahead()
    standby = agents(inventory, url, clock=clock, state_url=store)
    tries: list[object] = []
    poll = standby.poll

    def counted() -> object:
        tries.append(poll())
        return tries[-1]

    standby.poll = counted  # type: ignore[method-assign]
    assert standby.poll_when_due() is None
    assert standby.poll_when_due() is None
    assert tries == [None]  # the second reading did not ask again
    clock.ahead += POLL_S
    assert standby.poll_when_due() is None
    assert tries == [None, None]
