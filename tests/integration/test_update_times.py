"""A MariaDB source without a change query: the tables' UPDATE_TIME decides when the daemon
runs a pass (agent/source/update_times.py), against the real server.

The deterministic tests drive Agent.poll_when_due with a clock whose monotonic reading is
moved on by hand (poll_interval and full_scan_interval pass at once), while the server's own
clock, which stamps UPDATE_TIME, runs for real. The premise of each attack (two commits in one
second, a transaction open across a pass) is checked on the server before its outcome.
"""

from __future__ import annotations

import io
import logging
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent.app import Agent
from agent.commands import check
from agent.sandbox import Sandbox
from agent.source.gate import SensorUnusable
from agent.source.update_times import SETTLE_S, UpdateTimes
from tests.conftest import INTEGRATION_ID, MARIADB_ADMIN_URL, SECRET
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
    CATALOG_QUERY,
    SLOTS_QUERY,
    Inventory,
    calls,
    first_day,
    seed_tours,
    write_config,
)

pytestmark = pytest.mark.mariadb

MakeInventory = Callable[[str], Inventory]
MakeSandbox = Callable[..., Sandbox]


@pytest.fixture
def watched(make_inventory: MakeInventory) -> Iterator[tuple[Inventory, UpdateTimes]]:
    """A seeded MariaDB inventory and a sensor over the two queries' tables (closed after)."""
    inventory = make_inventory("mariadb")
    seed_tours(inventory, first_day())
    sensor = UpdateTimes(inventory.engine, [CATALOG_QUERY, SLOTS_QUERY])
    sensor.find_tables()
    yield inventory, sensor
    sensor.close()


def _database(inventory: Inventory) -> str:
    database = sa.make_url(inventory.url).database
    assert database is not None
    return database


def _server_now(inventory: Inventory) -> float:
    with inventory.engine.connect() as conn:
        return float(conn.exec_driver_sql("SELECT UNIX_TIMESTAMP(NOW(6))").scalar_one())


def _slots_time(agent: Agent, inventory: Inventory) -> int | None:
    assert isinstance(agent.sensor, UpdateTimes)
    return agent.sensor.read().times[(_database(inventory), "slots")]


def _quiet(agent: Agent, clock: Ahead) -> None:
    """Move on until the gate runs no pass: the seeding's times have settled."""
    time.sleep(SETTLE_S)
    quiet(agent, clock)


def _started_second(inventory: Inventory) -> None:
    """Return early in a second of the server's clock (its first 200 ms)."""
    while (fraction := _server_now(inventory) % 1.0) > 0.2:
        time.sleep(1.0 - fraction + 0.01)


# -- which tables, and whether their times can be trusted ---------------------------------


def test_the_tables_the_queries_read_are_watched_through_a_view_into_another_database(
    make_inventory: MakeInventory, new_database: Callable[[str], str]
) -> None:
    inventory = make_inventory("mariadb")
    other_url = new_database("mariadb")
    other = sa.make_url(other_url).database
    here = _database(inventory)
    with inventory.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE `{other}`.prices (option_id varchar(64), cents int)")
        conn.exec_driver_sql(f"CREATE VIEW priced AS SELECT * FROM `{other}`.prices")
        conn.exec_driver_sql("CREATE TABLE audit_log (id int PRIMARY KEY) ENGINE=MEMORY")
    catalog = CATALOG_QUERY.rstrip() + " LEFT JOIN priced ON priced.option_id = o.id"
    sensor = UpdateTimes(inventory.engine, [catalog, SLOTS_QUERY])
    assert set(sensor.find_tables()) == {
        (here, "options"),
        (here, "products"),
        (here, "slots"),
        (other, "prices"),
    }
    # audit_log (MEMORY) is not named by the queries, so it does not disable the sensor.
    assert set(sensor.read().times) == set(sensor.tables)


@pytest.mark.parametrize("engine", ["MEMORY", "Aria"])
def test_a_table_whose_engine_keeps_no_time_makes_the_sensor_say_which(
    engine: str, make_inventory: MakeInventory
) -> None:
    inventory = make_inventory("mariadb")
    with inventory.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE closures (option_id varchar(64)) ENGINE={engine}")
    slots = SLOTS_QUERY.rstrip() + " LEFT JOIN closures c ON c.option_id = s.option_id"
    with pytest.raises(SensorUnusable, match=rf"closures uses the {engine} engine"):
        UpdateTimes(inventory.engine, [CATALOG_QUERY, slots]).find_tables()


def test_a_commit_moves_the_time_and_a_rollback_or_an_open_transaction_does_not(
    watched: tuple[Inventory, UpdateTimes],
) -> None:
    inventory, sensor = watched
    time.sleep(1.1)  # the seeding's second is over: a new commit gets a new time
    before = sensor.read()
    with inventory.engine.connect() as conn:
        conn.begin()
        conn.execute(
            sa.update(inventory.slots).where(inventory.slots.c.id == 101).values(vacancies=1)
        )
        conn.rollback()
        assert sensor.read().times == before.times
        conn.begin()
        conn.execute(
            sa.update(inventory.slots).where(inventory.slots.c.id == 101).values(vacancies=2)
        )
        assert sensor.read().times == before.times  # not committed yet
        conn.commit()
    after = sensor.read()
    slots = (_database(inventory), "slots")
    assert after.times[slots] != before.times[slots]
    assert {t: m for t, m in after.times.items() if t != slots} == {
        t: m for t, m in before.times.items() if t != slots
    }


# -- when the daemon runs a pass ------------------------------------------------------------


def test_at_rest_no_pass_runs_and_a_booking_runs_one_before_any_fallback(
    make_inventory: MakeInventory, make_sandbox: MakeSandbox, agents: Callable[..., Agent]
) -> None:
    inventory = make_inventory("mariadb")
    agent, clock = at_rest(inventory, agents, make_sandbox().url)
    for _ in range(3):
        assert pass_(agent, clock) is None
    inventory.update_slot(101, vacancies=7)
    found = pass_(agent, clock)
    assert notifies(found) == 1
    # Held for poll_interval after it, whatever changes meanwhile.
    inventory.update_slot(102, vacancies=6)
    assert agent.poll_when_due() is None
    again = pass_(agent, clock)
    assert notifies(again) == 1


@pytest.mark.parametrize("settle", [True, False], ids=["settle", "no-settle"])
def test_a_booking_committed_in_the_second_a_pass_saw_is_not_lost(
    settle: bool,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    agents: Callable[..., Agent],
) -> None:
    """Booking B commits after the pass that found booking A, in the same second: the
    table's time does not move. The pass after is due because that second was not over when
    the first one read it; without that rule (no-settle) B waits for the fallback pass."""
    inventory = make_inventory("mariadb")
    seed_tours(inventory, first_day())
    clock = Ahead()
    sandbox = make_sandbox()
    agent = agents(inventory, sandbox.url, clock=clock)
    assert agent.poll_when_due() is not None
    if not settle:
        assert isinstance(agent.sensor, UpdateTimes)
        agent.sensor.settle_s = 0.0
    _quiet(agent, clock)
    pairs = [(101, 102), (103, 104), (105, 106), (107, 108)]
    for a, b in pairs:
        _started_second(inventory)
        inventory.update_slot(a, vacancies=5)
        seen = _slots_time(agent, inventory)
        found = pass_(agent, clock)
        inventory.update_slot(b, vacancies=4)
        if _slots_time(agent, inventory) == seen:
            break  # the premise holds: B left the time A's pass saw
        assert found is not None
        _quiet(agent, clock)  # a slow moment: try again with the next two slots
    else:
        pytest.fail(f"no two commits fell in one second of the server in {len(pairs)} tries")
    assert notifies(found) == 1
    after = pass_(agent, clock)
    if settle:
        assert notifies(after) == 1
    else:
        assert after is None  # the gap this rule closes
        clock.ahead += FALLBACK_S
        fallback = agent.poll_when_due()
        assert notifies(fallback) == 1
    assert agent.drain(60.0).stats.pending == 0
    notified = {
        c.body["availabilityId"] for c in calls(sandbox) if c.endpoint == "notify" and c.body
    }
    assert {str(a), str(b)} <= notified


def test_a_transaction_open_across_a_pass_is_found_when_it_commits_with_an_older_time(
    make_inventory: MakeInventory, make_sandbox: MakeSandbox, agents: Callable[..., Agent]
) -> None:
    """A booking whose transaction made its change before another committed, and commits
    after the pass that found the other: the table's time goes back, which is a change."""
    inventory = make_inventory("mariadb")
    agent, clock = at_rest(inventory, agents, make_sandbox().url)
    with inventory.engine.connect() as slow:
        slow.begin()
        slow.execute(
            sa.update(inventory.slots).where(inventory.slots.c.id == 101).values(vacancies=3)
        )
        time.sleep(1.1)
        inventory.update_slot(102, vacancies=2)
        found = pass_(agent, clock)
        assert notifies(found) == 1
        time.sleep(SETTLE_S)
        # The pass after a reading within the second of the change (SETTLE_S), then none.
        assert notifies(pass_(agent, clock)) == 0
        assert pass_(agent, clock) is None
        seen = _slots_time(agent, inventory)
        slow.commit()
    assert _slots_time(agent, inventory) != seen  # the premise: its time differs
    late = pass_(agent, clock)
    assert notifies(late) == 1


def test_tables_that_keep_no_time_mean_a_pass_every_poll_said_once(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    agents: Callable[..., Agent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    inventory = make_inventory("mariadb")
    seed_tours(inventory, first_day())
    with inventory.engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE closures (option_id varchar(64)) ENGINE=MEMORY")
    slots = SLOTS_QUERY.rstrip() + " LEFT JOIN closures c ON c.option_id = s.option_id"
    clock = Ahead()
    agent = agents(inventory, make_sandbox().url, clock=clock, slots_query=slots)
    with caplog.at_level(logging.WARNING, logger="agent"):
        passes = [agent.poll_when_due() for _ in range(3)]
    assert all(p is not None for p in passes)
    unusable = [r for r in caplog.records if getattr(r, "event", "") == "source.commits_unseen"]
    assert len(unusable) == 1
    assert "closures uses the MEMORY engine" in unusable[0].getMessage()
    assert agent.sensor is None


def test_watch_commits_false_keeps_a_pass_every_poll(
    make_inventory: MakeInventory, make_sandbox: MakeSandbox, agents: Callable[..., Agent]
) -> None:
    inventory = make_inventory("mariadb")
    seed_tours(inventory, first_day())
    agent = agents(inventory, make_sandbox().url, watch_commits=False)
    assert agent.sensor is None
    assert [agent.poll_when_due() is not None for _ in range(2)] == [True, True]


def test_the_connection_kept_for_reading_is_replaced_when_the_server_ends_it(
    watched: tuple[Inventory, UpdateTimes],
) -> None:
    inventory, sensor = watched
    first = sensor.read()
    assert sensor.kept.held is not None
    held = sensor.kept.held.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one()
    with inventory.engine.connect() as admin:
        admin.exec_driver_sql(f"KILL CONNECTION {int(held)}")
    again = sensor.read()  # not an outage: one new connection, then the same answer
    assert again.times == first.times
    assert sensor.kept.held.exec_driver_sql("SELECT CONNECTION_ID()").scalar_one() != held


@pytest.mark.parametrize("engine", ["InnoDB", "MEMORY"])
def test_check_names_the_tables_whose_times_decide_or_why_none_can(
    engine: str, make_inventory: MakeInventory, make_sandbox: MakeSandbox, tmp_path: Path
) -> None:
    inventory = make_inventory("mariadb")
    seed_tours(inventory, first_day())
    with inventory.engine.begin() as conn:
        conn.exec_driver_sql(f"CREATE TABLE closures (option_id varchar(64)) ENGINE={engine}")
    path = write_config(
        tmp_path,
        name="check",
        base_url=make_sandbox().url,
        integration_id=INTEGRATION_ID,
        secret=SECRET,
        source_url=inventory.url,
        state_url=f"sqlite:///{tmp_path / 'check.db'}",
        slots_query=SLOTS_QUERY.rstrip() + " LEFT JOIN closures c ON c.option_id = s.option_id",
    )
    out = io.StringIO()
    assert check(path, out) == 0
    printed = out.getvalue()
    here = _database(inventory)
    if engine == "InnoDB":
        assert (
            f"ok      the daemon passes when the UPDATE_TIME of 4 table(s) ({here}.closures, "
            f"{here}.options, {here}.products, {here}.slots) shows a commit, and every 60 s "
            "(full_scan_interval)"
        ) in printed
    else:
        assert (
            f"warning table {here}.closures uses the MEMORY engine, which does not keep the "
            "time of its last change (only InnoDB and MyISAM do): the daemon passes every 0.2 s"
        ) in printed


def test_a_pass_for_a_moved_time_skips_the_question_whether_anything_changed(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    agents: Callable[..., Agent],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sum of every row's digest answers "did anything change?" at the cost of a pass
    over every row: a pass started because a table's time moved knows the answer already.
    The pass the fallback runs, with nothing moved, still asks it."""
    inventory = make_inventory("mariadb")
    agent, clock = at_rest(inventory, agents, make_sandbox().url)
    asked: list[int] = []
    sum_of_every_row = agent.reader.slots_digest

    def counted(conn: sa.Connection) -> Any:
        asked.append(1)
        return sum_of_every_row(conn)

    monkeypatch.setattr(agent.reader, "slots_digest", counted)
    clock.ahead += FALLBACK_S
    fallback = agent.poll_when_due()
    assert fallback is not None
    assert fallback.slots_digest_matched
    assert len(asked) == 1
    inventory.update_slot(101, vacancies=8)
    found = pass_(agent, clock)
    assert notifies(found) == 1
    assert len(asked) == 1  # not asked again


def test_a_booking_during_the_fallback_pass_is_read_right_after_it(
    make_inventory: MakeInventory, make_sandbox: MakeSandbox, agents: Callable[..., Agent]
) -> None:
    """poll_interval holds the next pass back only after one a moved time started: after the
    fallback's pass (or a second's settling), a booking does not wait for it."""
    inventory = make_inventory("mariadb")
    agent, clock = at_rest(inventory, agents, make_sandbox().url)
    clock.ahead += FALLBACK_S
    assert notifies(agent.poll_when_due()) == 0
    inventory.update_slot(101, vacancies=6)
    assert notifies(agent.poll_when_due()) == 1  # the clock did not move on
    inventory.update_slot(102, vacancies=5)
    assert agent.poll_when_due() is None  # held: that pass was for a moved time


def test_a_source_that_goes_away_while_watched_is_waited_for_and_a_change_made_meanwhile_found(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    agents: Callable[..., Agent],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The agent's account is locked and its sessions killed (the kept one among them): the
    readings fail as the source being away, said once, with backoff and without the
    password; a booking made meanwhile moves the table's time, and the first reading after
    the outage runs the pass that finds it."""
    inventory = make_inventory("mariadb")
    seed_tours(inventory, first_day())
    url = sa.make_url(inventory.url)
    user, password = f"seyaha_w_{uuid.uuid4().hex[:8]}", uuid.uuid4().hex
    accounts = [f"'{user}'@'{host}'" for host in ("localhost", "127.0.0.1", "%")]
    admin = sa.create_engine(MARIADB_ADMIN_URL, isolation_level="AUTOCOMMIT")

    def run(*statements: str) -> None:
        with admin.connect() as conn:
            for statement in statements:
                conn.execute(sa.text(statement))

    try:
        run(*[f"CREATE USER {a} IDENTIFIED BY '{password}'" for a in accounts])
        run(*[f"GRANT SELECT ON `{url.database}`.* TO {a}" for a in accounts])
        source_url = url.set(username=user, password=password).render_as_string(hide_password=False)
        sandbox = make_sandbox()
        clock = Ahead()
        agent = agents(inventory, sandbox.url, clock=clock, source_url=source_url)
        assert agent.guarded(agent.poll_when_due)
        time.sleep(SETTLE_S)
        quiet(agent, clock)
        with admin.connect() as conn:
            sessions = conn.execute(
                sa.text("SELECT id FROM information_schema.PROCESSLIST WHERE user = :u"),
                {"u": user},
            ).scalars()
            ids = list(sessions)
        assert ids, "the kept connection is open between readings"
        run(*[f"ALTER USER {a} ACCOUNT LOCK" for a in accounts])
        run(*[f"KILL {int(i)}" for i in ids])
        with caplog.at_level(logging.INFO, logger="agent"):
            assert agent.guarded(agent.poll_when_due) is False
            assert agent.guarded(agent.poll_when_due) is False
        down = [r for r in caplog.records if getattr(r, "event", "") == "source.unavailable"]
        assert len(down) == 1
        assert password not in down[0].getMessage()
        assert agent.next_poll_in_s() > POLL_S  # backing off
        inventory.update_slot(101, vacancies=4)  # the booking system keeps writing
        run(*[f"ALTER USER {a} ACCOUNT UNLOCK" for a in accounts])
        found = agent.poll_when_due()
        assert notifies(found) == 1
        assert agent.drain(60.0).stats.pending == 0
        assert any(
            c.endpoint == "notify" and c.body and c.body["availabilityId"] == "101"
            for c in calls(sandbox)
        )
    finally:
        run(*[f"DROP USER IF EXISTS {a}" for a in accounts])
        admin.dispose()
