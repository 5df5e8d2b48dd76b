"""Change detection against real databases: incremental polls on a database-clock cursor, the
overlap window, full reconciliation, wake-ups, and a source that fails or is slow.

The writer stamps slots.updated_at with the database clock (Inventory.track_updates); rows
seeded before that have a NULL updated_at, so a poll reads exactly the rows changed since.
Nothing here asserts how long anything took, except generous upper bounds; a short fixed
wait appears only where a test proves that something does NOT happen.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent.app import Agent
from agent.clock import SystemClock
from agent.config import load_config
from agent.errors import QueryError
from agent.sandbox import Sandbox
from agent.scan import CURSOR, ScanReport
from agent.source import cursor, pg_triggers
from agent.source.reader import SourceReader
from tests.conftest import INTEGRATION_ID, MARIADB_ADMIN_URL, PG_ADMIN_URL, SECRET
from tests.integration.inventory import (
    BACKEND_PARAMS,
    SERVER_PARAMS,
    SLOTS_CHANGED_QUERY,
    SLOTS_QUERY,
    ZONE,
    Inventory,
    TourSlot,
    at,
    calls,
    first_day,
    notify_payload,
    running,
    seed_tours,
    wait_until,
    write_config,
)

MakeInventory = Callable[[str], Inventory]
MakeReader = Callable[..., SourceReader]
MakeSandbox = Callable[..., Sandbox]
MakeAgent = Callable[..., Agent]


INCREMENTAL = {"slots_changed_query": SLOTS_CHANGED_QUERY}

DRAIN_S = 60.0
"""A ceiling, not an expectation: drain returns as soon as the outbox is empty."""

DAEMON_POLL_S = 60.0
"""poll_interval of the daemon tests: after the first poll, only a wake-up explains a poll
within this many seconds of the start."""

QUIET_S = 3.0
"""How long a test watches for something that must NOT happen."""

WAKE_WAIT_S = 30.0
"""Longest wait for a wake-up to deliver; below DAEMON_POLL_S on purpose."""


# -- helpers ----------------------------------------------------------------------------


def _scans(agent: Agent, result: str = "ok") -> float:
    value = agent.metrics.registry.get_sample_value("seyaha_agent_scans_total", {"result": result})
    return value or 0.0


def _delivered(agent: Agent) -> None:
    result = agent.drain(DRAIN_S)
    assert (result.timed_out, result.paused_reason, result.stats.pending) == (False, None, 0)


def _notified(sandbox: Sandbox) -> list[dict[str, Any]]:
    """Bodies of the accepted notifies, oldest first."""
    return [c.body for c in calls(sandbox) if c.endpoint == "notify" and c.status == 200 and c.body]


def _per_slot(bodies: list[dict[str, Any]]) -> Counter[str]:
    return Counter(b["availabilityId"] for b in bodies)


def _endpoints(sandbox: Sandbox) -> list[str]:
    return [c.endpoint for c in calls(sandbox)]


def _state(tmp_path: Path, name: str = "state") -> str:
    return f"sqlite:///{tmp_path / (name + '.db')}"


def _expected(slot: TourSlot, status: str, vacancies: int | None) -> dict[str, Any]:
    return notify_payload(
        slot.product_id,
        slot.option_id,
        slot.slot_id,
        slot.start,
        status=status,
        vacancies=vacancies,
        capacity=slot.capacity,
    )


def _closed(slot: TourSlot) -> dict[str, Any]:
    return notify_payload(
        slot.product_id,
        slot.option_id,
        slot.slot_id,
        slot.start,
        status="CLOSED",
        vacancies=0,
        capacity=None,
    )


def _poll(agent: Agent) -> ScanReport:
    report = agent.poll()
    assert report is not None, "a single agent on its own store must always scan"
    return report


def _eventually(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


@dataclass
class Baselined:
    """An inventory whose writer stamps updated_at, and an incremental agent that has recorded
    its baseline and delivered the baseline trigger to the sandbox."""

    inventory: Inventory
    slots: dict[int, TourSlot]
    sandbox: Sandbox
    agent: Agent


@pytest.fixture
def baselined(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> Callable[..., Baselined]:
    """`baselined(backend, **source_keys)`: see Baselined; [source] keys on top of INCREMENTAL."""

    def make(backend: str, **source: Any) -> Baselined:
        inventory = make_inventory(backend)
        slots = {s.slot_id: s for s in seed_tours(inventory, first_day())}
        inventory.track_updates()
        sandbox = make_sandbox()
        agent = make_agent(
            "agent",
            base_url=sandbox.url,
            source_url=inventory.url,
            state_url=_state(tmp_path),
            source={**INCREMENTAL, **source},
        )
        assert _poll(agent).baseline
        _delivered(agent)
        return Baselined(inventory, slots, sandbox, agent)

    return make


# -- incremental polls ------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_an_incremental_poll_sends_exactly_what_changed_and_a_re_read_sends_nothing(
    backend: str,
    make_inventory: MakeInventory,
    make_reader: MakeReader,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    inventory = make_inventory(backend)
    slots = {s.slot_id: s for s in seed_tours(inventory, first_day())}
    inventory.track_updates()
    sandbox = make_sandbox(catalog=make_reader(inventory.url).catalog_keys)
    agent = make_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=_state(tmp_path),
        source=INCREMENTAL,
    )

    first = _poll(agent)  # no cursor yet: a full scan records the baseline and the cursor
    assert (first.kind, first.baseline, first.slot_rows) == ("full", True, len(slots))
    saved = agent.store.fingerprints.cursor(CURSOR)
    assert saved is not None
    _delivered(agent)
    assert _endpoints(sandbox) == ["trigger"]

    inventory.update_slot(101, vacancies=12)
    inventory.update_slot(202, vacancies=0)
    changed = _poll(agent)
    # Only the two stamped rows were read, and each is one notify.
    assert (changed.kind, changed.slot_rows) == ("incremental", 2)
    assert (changed.triggers, changed.notifies, changed.slots_changed) == (0, 2, 2)
    _delivered(agent)
    assert sorted(_notified(sandbox), key=lambda b: b["availabilityId"]) == [
        _expected(slots[101], "LIMITED", 12),
        _expected(slots[202], "SOLD_OUT", 0),
    ]

    for _ in range(2):
        # Nothing changed: the two rows are still inside the overlap window, so they are read
        # again, and their fingerprints make them produce nothing.
        again = _poll(agent)
        assert (again.kind, again.slot_rows, again.slots_unchanged) == ("incremental", 2, 2)
        assert (again.messages, again.enqueued, again.slots_changed) == (0, 0, 0)
    _delivered(agent)
    assert _per_slot(_notified(sandbox)) == {"101": 1, "202": 1}
    assert len(calls(sandbox)) == 3

    later = agent.store.fingerprints.cursor(CURSOR)
    assert later is not None
    assert cursor.decode(later) > cursor.decode(saved)  # every successful poll moves it on


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_poll_skips_rows_it_handled_as_they_are_but_never_a_row_the_store_moved_past(
    backend: str, baselined: Callable[..., Baselined]
) -> None:
    setup = baselined(backend)
    inventory, slots, sandbox, agent = setup.inventory, setup.slots, setup.sandbox, setup.agent

    inventory.update_slot(101, vacancies=12)
    inventory.update_slot(102, vacancies=3)
    first = _poll(agent)
    assert (first.slot_rows, first.slots_unchanged, first.notifies) == (2, 0, 2)
    _delivered(agent)
    # 101 changes and changes back: remembered by key, its old values are never mistaken for
    # the ones the store holds now.
    inventory.update_slot(101, vacancies=11)
    moved = _poll(agent)
    assert (moved.slot_rows, moved.slots_unchanged, moved.notifies) == (2, 1, 1)
    _delivered(agent)
    inventory.update_slot(101, vacancies=12)
    back = _poll(agent)
    assert (back.slot_rows, back.slots_unchanged, back.notifies) == (2, 1, 1)
    _delivered(agent)

    # A full reconciliation closes 101, which then comes back exactly as it was: the poll
    # after the full scan must not take it for a row it already handled.
    inventory.delete_slot(101)
    full = agent.scan()
    assert (full.slots_removed, full.notifies) == (1, 1)
    _delivered(agent)
    slot = slots[101]
    inventory.add_slot(
        101, slot.option_id, slot.start, capacity=slot.capacity, vacancies=12, status=None
    )
    returned = _poll(agent)
    assert (returned.slots_unchanged, returned.slots_added, returned.notifies) == (0, 1, 1)
    _delivered(agent)
    assert [b["vacancies"] for b in _notified(sandbox) if b["availabilityId"] == "101"] == [
        12,
        11,
        12,
        0,
        12,
    ]
    assert _poll(agent).slots_unchanged == 2


# -- out-of-order commits ---------------------------------------------------------------


def _commit_out_of_order(
    inventory: Inventory,
    agent: Agent,
    sandbox: Sandbox,
    *,
    early_stamp: str,
    params: dict[str, Any],
) -> tuple[ScanReport, list[dict[str, Any]], ScanReport]:
    """T1 changes slot 101 first, so its updated_at is the earlier one, but commits last; T2
    changes slot 202 and commits first. The agent polls (and delivers) between the two
    commits and after both: the poll between, what it delivered, the poll after."""
    early = inventory.engine.connect()
    late = inventory.engine.connect()
    try:
        early.execute(
            sa.text(f"UPDATE slots SET vacancies = 11, updated_at = {early_stamp} WHERE id = 101"),
            params,
        )
        late.execute(
            sa.text(
                f"UPDATE slots SET vacancies = 3, updated_at = {inventory.clock_sql} WHERE id = 202"
            )
        )
        late.commit()
        stamps = dict(
            late.execute(sa.text("SELECT id, updated_at FROM slots WHERE id IN (101, 202)")).all()
        )
        late.rollback()
        between = _poll(agent)
        _delivered(agent)
        delivered_between = _notified(sandbox)
        early.commit()
        after = _poll(agent)
    finally:
        early.close()
        late.close()
    # T2 committed its own, later, timestamp; T1's row was not visible to it yet.
    assert stamps[101] is None
    assert stamps[202] is not None
    return between, delivered_between, after


@pytest.mark.parametrize("backend", SERVER_PARAMS)
def test_a_commit_that_lands_behind_the_cursor_is_caught_by_the_overlap_window(
    backend: str, baselined: Callable[..., Baselined]
) -> None:
    setup = baselined(backend)  # cursor_overlap: the default 60 s
    inventory, slots, sandbox, agent = setup.inventory, setup.slots, setup.sandbox, setup.agent

    between, delivered_between, after = _commit_out_of_order(
        inventory, agent, sandbox, early_stamp=inventory.clock_sql, params={}
    )

    assert between.notifies == 1
    assert delivered_between == [_expected(slots[202], "LIMITED", 3)]
    # T1's row carries a timestamp older than the cursor saved by the poll in between; the
    # overlap window reads it anyway. B is read again and sends nothing.
    assert (after.slot_rows, after.notifies) == (2, 1)
    _delivered(agent)
    assert _notified(sandbox)[1:] == [_expected(slots[101], "LIMITED", 11)]
    assert _per_slot(_notified(sandbox)) == {"101": 1, "202": 1}


@pytest.mark.parametrize("backend", SERVER_PARAMS)
def test_without_an_overlap_a_late_commit_is_missed_by_polls_and_found_by_the_full_scan(
    backend: str, baselined: Callable[..., Baselined]
) -> None:
    setup = baselined(backend, cursor_overlap=0)
    inventory, slots, sandbox, agent = setup.inventory, setup.slots, setup.sandbox, setup.agent

    # An application server stamps the row itself, two seconds behind the database.
    early = inventory.clock() - timedelta(seconds=2)
    between, delivered_between, after = _commit_out_of_order(
        inventory, agent, sandbox, early_stamp=":early", params={"early": early}
    )

    assert between.notifies == 1
    assert delivered_between == [_expected(slots[202], "LIMITED", 3)]
    assert (after.slot_rows, after.messages) == (0, 0)  # the failure mode is real
    _delivered(agent)
    assert _notified(sandbox) == delivered_between

    full = agent.scan()
    assert (full.kind, full.notifies, full.slots_changed) == ("full", 1, 1)
    _delivered(agent)
    assert _notified(sandbox)[1:] == [_expected(slots[101], "LIMITED", 11)]
    assert _per_slot(_notified(sandbox)) == {"101": 1, "202": 1}


@pytest.mark.parametrize("backend", SERVER_PARAMS)
def test_a_row_the_polls_missed_before_a_restart_is_found_by_the_reconciliation_at_start(
    backend: str, baselined: Callable[..., Baselined]
) -> None:
    """A late commit the polls missed used to wait for the first reconciliation, which came
    full_scan_interval after the start (3600 s here): restarting did not help."""
    setup = baselined(backend, cursor_overlap=0, full_scan_interval=3600)
    inventory, slots, sandbox, agent = setup.inventory, setup.slots, setup.sandbox, setup.agent

    early = inventory.clock() - timedelta(seconds=2)
    between, delivered_between, after = _commit_out_of_order(
        inventory, agent, sandbox, early_stamp=":early", params={"early": early}
    )
    assert (between.notifies, after.slot_rows, after.messages) == (1, 0, 0)  # missed by polls
    missed = _expected(slots[101], "LIMITED", 11)
    full_scans = _full_scans(agent)

    with running(agent):  # the restart
        wait_until(lambda: missed in _notified(sandbox), "the reconciliation after the start")
        wait_until(lambda: agent.store.admin.stats().pending == 0, "delivery")

    assert _notified(sandbox) == [*delivered_between, missed]
    assert _full_scans(agent) == full_scans + 1  # one, after the first (incremental) poll


@pytest.mark.parametrize("backend", SERVER_PARAMS)
def test_bookings_committed_while_the_start_reconciliation_runs_all_arrive_last_state_last(
    backend: str, baselined: Callable[..., Baselined]
) -> None:
    """The reconciliation after the start and the polls take turns on one store: with
    bookings committed from the moment the daemon starts, through that reconciliation, the
    last call for each slot carries the database's last state, and no slot gets more calls
    than it had bookings (a small inventory: the reconciliation overlaps only the first
    bookings)."""
    setup = baselined(backend, full_scan_interval=3600)
    inventory, sandbox, agent = setup.inventory, setup.sandbox, setup.agent
    assert _poll(agent).kind == "incremental"
    booked = [101, 202, 101, 202, 101]
    full_scans = _full_scans(agent)

    with running(agent):
        for round_, slot_id in enumerate(booked * 4):  # from the first instant of the start
            inventory.update_slot(slot_id, vacancies=30 - round_)
            time.sleep(0.05)
        wait_until(lambda: _full_scans(agent) == full_scans + 1, "the start reconciliation")
        final = {"101": 30 - 19, "202": 30 - 18}  # each slot's last round

        def last_vacancies() -> dict[str, Any]:
            return {b["availabilityId"]: b["vacancies"] for b in _notified(sandbox)}

        wait_until(
            lambda: {k: last_vacancies().get(k) for k in final} == final,
            "the last state of each slot",
        )
        wait_until(lambda: agent.store.admin.stats().pending == 0, "delivery")

    assert {k: last_vacancies().get(k) for k in final} == final
    sent = _per_slot(_notified(sandbox))
    assert set(sent) == set(final)
    assert sent["101"] <= 12  # never more calls than bookings
    assert sent["202"] <= 8


def _full_scans(agent: Agent) -> float:
    value = agent.metrics.registry.get_sample_value(
        "seyaha_agent_scan_duration_seconds_count", {"kind": "full"}
    )
    return value or 0.0


# -- many rows sharing one timestamp ----------------------------------------------------

MANY = range(1001, 1051)


def _add_many(inventory: Inventory) -> None:
    day = first_day()
    rows = [
        {
            "id": slot_id,
            "option_id": "1-sunset",
            "starts_at": inventory.start_value(at(day, 6 + i % 12, 5 + i // 12)),
            "status": None,
            "vacancies": 40,
            "capacity": 40,
        }
        for i, slot_id in enumerate(MANY)
    ]
    with inventory.engine.begin() as conn:
        conn.execute(sa.insert(inventory.slots), rows)


def _distinct_stamps(inventory: Inventory, first: int, last: int) -> int:
    with inventory.engine.connect() as conn:
        return int(
            conn.execute(
                sa.text("SELECT COUNT(DISTINCT updated_at) FROM slots WHERE id BETWEEN :a AND :b"),
                {"a": first, "b": last},
            ).scalar_one()
        )


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_fifty_rows_sharing_one_timestamp_arrive_exactly_once_across_a_poll_boundary(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    inventory = make_inventory(backend)
    seed_tours(inventory, first_day())
    _add_many(inventory)
    inventory.track_updates()
    sandbox = make_sandbox()
    agent = make_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=_state(tmp_path),
        source=INCREMENTAL,
    )
    assert _poll(agent).baseline
    _delivered(agent)
    wanted = {str(slot_id): 1 for slot_id in MANY}

    # (a) One statement stamps all 50 rows with one timestamp; a poll runs before it commits.
    writer = inventory.engine.connect()
    try:
        result = writer.execute(
            sa.text(
                f"UPDATE slots SET vacancies = 30, updated_at = {inventory.clock_sql} "
                "WHERE id BETWEEN 1001 AND 1050"
            )
        )
        assert result.rowcount == 50
        during = _poll(agent)
        writer.commit()
    finally:
        writer.close()
    assert _distinct_stamps(inventory, 1001, 1050) == 1
    assert during.messages == 0
    after = _poll(agent)
    assert (after.slot_rows, after.notifies) == (50, 50)
    assert _poll(agent).messages == 0
    _delivered(agent)
    first_round = _notified(sandbox)
    assert _per_slot(first_round) == wanted
    assert {b["vacancies"] for b in first_round} == {30}

    # (b) One timestamp split by a poll: 30 rows commit, the agent polls (its cursor passes
    # the timestamp), then 20 more rows commit with the very same timestamp.
    stamp = inventory.clock()
    with inventory.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE slots SET vacancies = 20, updated_at = :t WHERE id BETWEEN 1001 AND 1030"
            ),
            {"t": stamp},
        )
    before_boundary = _poll(agent)
    # All 50 rows are inside the overlap window since (a); 30 of them changed again.
    assert (before_boundary.slot_rows, before_boundary.notifies) == (50, 30)
    with inventory.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE slots SET vacancies = 20, updated_at = :t WHERE id BETWEEN 1031 AND 1050"
            ),
            {"t": stamp},
        )
    assert _distinct_stamps(inventory, 1001, 1050) == 1
    after_boundary = _poll(agent)
    assert (after_boundary.slot_rows, after_boundary.notifies) == (50, 20)
    assert _poll(agent).messages == 0
    _delivered(agent)
    second_round = _notified(sandbox)[len(first_round) :]
    assert _per_slot(second_round) == wanted
    assert {b["vacancies"] for b in second_round} == {20}


# -- deletes ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_delete_is_not_seen_by_polls_and_closed_once_by_the_full_scan(
    backend: str, baselined: Callable[..., Baselined]
) -> None:
    setup = baselined(backend)
    inventory, slots, sandbox, agent = setup.inventory, setup.slots, setup.sandbox, setup.agent

    inventory.delete_slot(104)
    inventory.update_slot(105, vacancies=25)
    polled = _poll(agent)
    assert polled.kind == "incremental"
    assert (polled.notifies, polled.slots_removed) == (1, 0)  # 105 only: absence means nothing
    assert _poll(agent).messages == 0
    _delivered(agent)
    assert _notified(sandbox) == [_expected(slots[105], "AVAILABLE", 25)]

    full = agent.scan()
    assert (full.kind, full.triggers, full.notifies, full.slots_removed) == ("full", 0, 1, 1)
    assert agent.scan().messages == 0
    _delivered(agent)
    assert _notified(sandbox)[1:] == [_closed(slots[104])]
    assert agent.store.fingerprints.lookup_slots([("1", "1-sunset", "104")]) == {}


# -- a product leaves; a slot's start passes --------------------------------------------


class ShiftedClock(SystemClock):
    """The real clock, moved ahead by `advance`: time passes without waiting for it."""

    def __init__(self) -> None:
        self.offset = timedelta()

    def now(self) -> datetime:
        return super().now() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += timedelta(seconds=seconds)


@contextmanager
def _agent_with_clock(tmp_path: Path, clock: ShiftedClock, **settings: Any) -> Iterator[Agent]:
    agent = Agent(
        load_config(
            write_config(
                tmp_path, name="clocked", integration_id=INTEGRATION_ID, secret=SECRET, **settings
            )
        ),
        clock=clock,
    )
    try:
        agent.open()
        yield agent
    finally:
        agent.close()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_removed_product_is_one_trigger_and_a_started_slot_is_dropped_silently(
    backend: str,
    make_inventory: MakeInventory,
    make_reader: MakeReader,
    make_sandbox: MakeSandbox,
    tmp_path: Path,
) -> None:
    inventory = make_inventory(backend)
    seed_tours(inventory, first_day())
    soon = datetime.now(ZONE).replace(tzinfo=None, microsecond=0) + timedelta(hours=1)
    inventory.add_slot(106, "1-sunset", soon, capacity=40, vacancies=40)
    inventory.track_updates()
    sandbox = make_sandbox(catalog=make_reader(inventory.url).catalog_keys)
    clock = ShiftedClock()
    with _agent_with_clock(
        tmp_path,
        clock,
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=_state(tmp_path),
        source=INCREMENTAL,
    ) as agent:
        assert agent.scan().baseline
        _delivered(agent)
        gone = [("2", "2-guided", "201"), ("2", "2-guided", "202"), ("1", "1-sunset", "106")]
        assert len(agent.store.fingerprints.lookup_slots(gone)) == 3

        clock.advance(2 * 3600)  # slot 106 has started
        inventory.update_slot(106, vacancies=1)
        polled = _poll(agent)
        assert (polled.kind, polled.slot_rows, polled.messages) == ("incremental", 1, 0)

        inventory.remove_product(2)
        full = agent.scan()
        assert full.catalog.removed == (("2", "2-guided"),)
        assert (full.triggers, full.notifies) == (1, 0)
        assert (full.slots_removed, full.slots_expired) == (2, 1)
        _delivered(agent)
        assert agent.store.fingerprints.lookup_slots(gone) == {}
        assert agent.scan().messages == 0

    assert _endpoints(sandbox) == ["trigger", "trigger"]
    assert [c.answer["data"]["synced"] for c in calls(sandbox)] == [3, 2]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_new_product_first_seen_by_a_poll_is_triggered_before_its_slots_are_notified(
    backend: str,
    make_inventory: MakeInventory,
    make_reader: MakeReader,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    """No catalog_changed_query: the poll learns of the product only through its slot."""
    inventory = make_inventory(backend)
    day = first_day()
    seed_tours(inventory, day)
    inventory.track_updates()
    sandbox = make_sandbox(catalog=make_reader(inventory.url).catalog_keys)
    agent = make_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=_state(tmp_path),
        source=INCREMENTAL,
    )
    assert _poll(agent).baseline
    _delivered(agent)

    inventory.add_product(4, "Cappadocia Balloon Flight", 25000, {"4-sunrise": "Sunrise"})
    inventory.add_slot(401, "4-sunrise", at(day, 5, 1), capacity=20, vacancies=20)
    polled = _poll(agent)
    assert (polled.kind, polled.triggers, polled.notifies) == ("incremental", 1, 1)
    assert polled.catalog.added[0].key == ("4", "4-sunrise")
    _delivered(agent)
    new = calls(sandbox)[1:]
    assert [c.endpoint for c in new] == ["trigger", "notify"]
    assert new[0].answer["data"]["synced"] == 4
    # Seyaha knew the option when the slot arrived: the availability was taken, not dropped.
    assert new[1].answer["data"]["updated"] is True
    assert new[1].body == notify_payload(
        4, "4-sunrise", 401, at(day, 5, 1), status="AVAILABLE", vacancies=20, capacity=20
    )
    assert agent.scan().messages == 0  # the poll recorded the catalog row too


# -- key order --------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_full_scan_is_exact_when_integer_keys_sort_differently_as_text(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    """Ids 1..30 and products 2 and 10: as numbers 2 < 10, as the store's text "10" < "2"."""
    inventory = make_inventory(backend)
    day = first_day()
    inventory.add_product(2, "Galata Tower Walk", 1500, {"2-a": "Walk"})
    inventory.add_product(10, "Princes' Islands Ferry", 2500, {"10-a": "Ferry"})
    slots: dict[int, TourSlot] = {}
    for slot_id in range(1, 31):
        product = 2 if slot_id % 2 else 10
        slots[slot_id] = TourSlot(
            product, f"{product}-a", slot_id, at(day, 6 + slot_id % 12, slot_id // 12), 20, 20
        )
    slots[100] = TourSlot(10, "10-a", 100, at(day, 7, 5), 20, 20)
    for s in slots.values():
        if s.slot_id != 100:
            inventory.add_slot(
                s.slot_id, s.option_id, s.start, capacity=s.capacity, vacancies=s.vacancies
            )
    sandbox = make_sandbox()
    agent = make_agent(
        "agent", base_url=sandbox.url, source_url=inventory.url, state_url=_state(tmp_path)
    )
    assert agent.scan().baseline
    _delivered(agent)

    inventory.update_slot(2, vacancies=1)
    inventory.update_slot(10, vacancies=0)
    inventory.update_slot(21, status="CLOSED")
    inventory.delete_slot(3)
    s = slots[100]
    inventory.add_slot(100, s.option_id, s.start, capacity=20, vacancies=20)

    full = agent.scan()
    assert (full.slots_added, full.slots_changed, full.slots_removed) == (1, 3, 1)
    assert (full.triggers, full.notifies) == (0, 5)
    assert agent.scan().messages == 0
    _delivered(agent)
    by_slot = {b["availabilityId"]: b for b in _notified(sandbox)}
    assert len(by_slot) == len(_notified(sandbox))
    assert by_slot == {
        "2": _expected(slots[2], "LIMITED", 1),
        "10": _expected(slots[10], "SOLD_OUT", 0),
        "21": _expected(slots[21], "CLOSED", 20),
        "3": _closed(slots[3]),
        "100": _expected(slots[100], "AVAILABLE", 20),
    }


# -- query_timeout ----------------------------------------------------------------------

SLOW_SLOTS_QUERY = {
    "postgresql": SLOTS_QUERY.rstrip() + "\nCROSS JOIN (SELECT pg_sleep(2)) AS pause",
    "mariadb": SLOTS_QUERY.rstrip() + "\nCROSS JOIN (SELECT SLEEP(2) AS pause) AS pause",
}


@pytest.mark.parametrize("backend", SERVER_PARAMS)
def test_a_slow_slots_query_is_cancelled_and_named(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    inventory = make_inventory(backend)
    seed_tours(inventory, first_day())
    sandbox = make_sandbox()
    agent = make_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=_state(tmp_path),
        slots_query=SLOW_SLOTS_QUERY[backend],
        source={"query_timeout": 0.5},
    )

    with pytest.raises(QueryError) as raised:
        agent.scan()
    message = str(raised.value)
    assert "slots_query" in message
    assert "query_timeout" in message
    assert "0.5 s" in message

    assert agent.guarded(agent.scan) is False
    assert (_scans(agent, "query_error"), _scans(agent, "ok")) == (1, 0)
    assert not agent.store.fingerprints.is_baselined()  # nothing was recorded
    assert agent.store.admin.stats().pending == 0
    assert calls(sandbox) == []


# -- a MariaDB source that goes away and comes back -------------------------------------


@pytest.mark.mariadb
def test_a_mariadb_source_that_goes_away_is_waited_for_and_a_change_made_meanwhile_delivered(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    inventory = make_inventory("mariadb")
    slots = {s.slot_id: s for s in seed_tours(inventory, first_day())}
    inventory.track_updates()
    url = sa.engine.make_url(inventory.url)
    user = f"seyaha_src_{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    accounts = [f"'{user}'@'{host}'" for host in ("localhost", "127.0.0.1", "%")]
    admin = sa.create_engine(MARIADB_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            for account in accounts:
                conn.execute(sa.text(f"CREATE USER {account} IDENTIFIED BY '{password}'"))
                conn.execute(sa.text(f"GRANT SELECT ON `{url.database}`.* TO {account}"))
        source_url = url.set(username=user, password=password).render_as_string(hide_password=False)
        sandbox = make_sandbox()
        agent = make_agent(
            "agent",
            base_url=sandbox.url,
            source_url=source_url,
            state_url=_state(tmp_path),
            poll_interval=0.2,
            source=INCREMENTAL,
        )
        assert agent.guarded(agent.poll)
        _delivered(agent)
        assert _endpoints(sandbox) == ["trigger"]

        def sessions() -> list[int]:
            with admin.connect() as conn:
                return list(
                    conn.execute(
                        sa.text("SELECT id FROM information_schema.PROCESSLIST WHERE user = :u"),
                        {"u": user},
                    ).scalars()
                )

        # The outage: the agent's account is locked and its sessions killed.
        with admin.connect() as conn:
            for account in accounts:
                conn.execute(sa.text(f"ALTER USER {account} ACCOUNT LOCK"))
            for session in sessions():
                conn.execute(sa.text(f"KILL {int(session)}"))
        wait_until(lambda: sessions() == [], "the agent's sessions to be killed")

        with caplog.at_level(logging.INFO, logger="agent"):
            assert agent.guarded(agent.poll) is False
            assert agent.guarded(agent.poll) is False
        assert (_scans(agent, "source_unavailable"), _scans(agent, "ok")) == (2, 1)
        assert agent.next_poll_in_s() > 0.2  # backing off
        down = [r for r in caplog.records if getattr(r, "event", None) == "source.unavailable"]
        assert len(down) == 1  # reported once, not on every attempt
        assert user in down[0].getMessage()
        assert password not in down[0].getMessage()

        inventory.update_slot(101, vacancies=9)  # the booking system keeps writing

        with admin.connect() as conn:
            for account in accounts:
                conn.execute(sa.text(f"ALTER USER {account} ACCOUNT UNLOCK"))
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="agent"):
            assert agent.guarded(agent.poll) is True
        assert _scans(agent, "ok") == 2
        assert agent.next_poll_in_s() == 0.2
        assert [r for r in caplog.records if getattr(r, "event", None) == "source.recovered"]
        _delivered(agent)
        assert _notified(sandbox) == [_expected(slots[101], "LIMITED", 9)]
    finally:
        with admin.connect() as conn:
            for account in accounts:
                conn.execute(sa.text(f"DROP USER IF EXISTS {account}"))
        admin.dispose()


# -- SQLite: the file watcher -----------------------------------------------------------


def _sqlite_daemon(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    *,
    watch_file: bool,
    journal_mode: str = "delete",
) -> tuple[Inventory, dict[int, TourSlot], Sandbox, Agent]:
    inventory = make_inventory("sqlite")
    with inventory.engine.connect() as conn:
        mode = conn.exec_driver_sql(f"PRAGMA journal_mode = {journal_mode}").scalar_one()
    assert mode == journal_mode
    slots = {s.slot_id: s for s in seed_tours(inventory, first_day())}
    inventory.track_updates()
    sandbox = make_sandbox()
    agent = make_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=_state(tmp_path),
        poll_interval=DAEMON_POLL_S,
        source={**INCREMENTAL, "watch_file": watch_file, "full_scan_interval": 3600},
    )
    return inventory, slots, sandbox, agent


@pytest.mark.parametrize("journal_mode", ["delete", "wal"])
def test_sqlite_file_watcher_wakes_the_poll_loop(
    journal_mode: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    """A commit touches the database file (rollback journal) or only its -wal (WAL mode)."""
    inventory, slots, sandbox, agent = _sqlite_daemon(
        make_inventory,
        make_sandbox,
        make_agent,
        tmp_path,
        watch_file=True,
        journal_mode=journal_mode,
    )
    started = time.monotonic()
    with running(agent):
        wait_until(lambda: _endpoints(sandbox) == ["trigger"], "the baseline trigger")
        wait_until(lambda: _scans(agent) >= 1, "the first poll to be counted")

        # The watcher starts beside the poll loop: write (changing nothing Seyaha sees) until
        # a wake-up answers, so the real change below cannot race the watcher's start.
        def woken() -> bool:
            before = _scans(agent)
            inventory.update_slot(105, vacancies=40)
            return _eventually(lambda: _scans(agent) > before, 2.0)

        wait_until(woken, "a write to wake the poll loop")
        assert _notified(sandbox) == []

        before = _scans(agent)
        inventory.update_slot(101, vacancies=12)
        wanted = _expected(slots[101], "LIMITED", 12)
        wait_until(lambda: wanted in _notified(sandbox), "the notify", timeout_s=WAKE_WAIT_S)
        # No timed poll was due yet: only a wake-up explains this poll.
        assert time.monotonic() - started < DAEMON_POLL_S, "too slow to tell wake-ups apart"
        wait_until(lambda: _scans(agent) > before, "the poll to be counted")
        assert _scans(agent) - before <= 2  # one commit: one or two wake-ups, not a loop
        assert _scans(agent, "source_unavailable") == 0
    assert _notified(sandbox) == [wanted]


def test_sqlite_without_the_watcher_a_change_waits_for_the_poll_interval(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    """The control for the test above: the same daemon with watch_file = false."""
    inventory, _slots, sandbox, agent = _sqlite_daemon(
        make_inventory, make_sandbox, make_agent, tmp_path, watch_file=False
    )
    with running(agent):
        wait_until(lambda: _endpoints(sandbox) == ["trigger"], "the baseline trigger")
        wait_until(lambda: _scans(agent) >= 1, "the first poll to be counted")
        inventory.update_slot(101, vacancies=12)
        time.sleep(QUIET_S)
        assert _notified(sandbox) == []
        assert _scans(agent) == 1
        assert agent.store.admin.stats().pending == 0  # not even queued: no poll ran since


# -- PostgreSQL: the LISTEN connection is lost ------------------------------------------


def _listeners(admin: sa.Engine, database: str) -> list[int]:
    with admin.connect() as conn:
        return list(
            conn.execute(
                sa.text(
                    "SELECT pid FROM pg_stat_activity WHERE datname = :db "
                    "AND query ILIKE 'LISTEN%' AND pid <> pg_backend_pid()"
                ),
                {"db": database},
            ).scalars()
        )


@pytest.mark.postgres
def test_a_lost_listen_connection_reconnects_and_wakes_the_poll_loop_again(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    inventory = make_inventory("postgresql")
    slots = {s.slot_id: s for s in seed_tours(inventory, first_day())}
    inventory.track_updates()
    pg_triggers.apply(
        inventory.engine, pg_triggers.install_sql(inventory.engine, ["slots"], "seyaha_agent")
    )
    database = str(sa.engine.make_url(inventory.url).database)
    sandbox = make_sandbox()
    agent = make_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=_state(tmp_path),
        poll_interval=DAEMON_POLL_S,
        source={**INCREMENTAL, "full_scan_interval": 3600},
    )
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    caplog.set_level(logging.INFO, logger="agent")
    started = time.monotonic()
    try:
        with running(agent):
            wait_until(lambda: _endpoints(sandbox) == ["trigger"], "the baseline trigger")
            # the first poll, then the one every (re)connection of the listener asks for
            wait_until(lambda: _scans(agent) >= 2, "the listener to connect")
            (first,) = _listeners(admin, database)

            before = _scans(agent)
            with admin.connect() as conn:
                assert conn.execute(
                    sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": first}
                ).scalar_one()
            wait_until(
                lambda: [p for p in _listeners(admin, database) if p != first] != [],
                "the listener to reconnect",
            )
            wait_until(lambda: _scans(agent) > before, "the poll asked for on reconnection")

            before = _scans(agent)
            inventory.update_slot(101, vacancies=12)
            wanted = _expected(slots[101], "LIMITED", 12)
            wait_until(lambda: wanted in _notified(sandbox), "the notify", timeout_s=WAKE_WAIT_S)
            assert time.monotonic() - started < DAEMON_POLL_S, "too slow to tell wake-ups apart"
            wait_until(lambda: _scans(agent) > before, "the poll to be counted")
            assert _scans(agent) == before + 1
    finally:
        admin.dispose()

    assert _notified(sandbox) == [wanted]
    events = [getattr(r, "event", None) for r in caplog.records]
    assert "wakeup.disconnected" in events
    assert events.count("wakeup.listening") >= 2
    assert not [r for r in caplog.records if r.exc_info is not None]
