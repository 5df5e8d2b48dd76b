"""The late-row sweep, on every source backend.

Polls read only the last few seconds behind the change cursor (Scanner.live_overlap_s); the
sweep reads the whole cursor_overlap window beside them. These tests show the division of
work and try to break it: a row stamped long before it committed is missed by the polls and
found by the sweep; after a bulk change the polls do not read its rows again, and the sweep
skips them unconverted; a poll that records a newer state while a sweep reads keeps it.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent.app import Agent
from agent.sandbox import Sandbox
from agent.source import cursor
from tests.integration.inventory import (
    BACKEND_PARAMS,
    Inventory,
    TourSlot,
    running,
    wait_until,
)
from tests.integration.test_reconcile_beside_polls import (
    QUIET_S,
    WAIT_S,
    InThread,
    MakeAgent,
    MakeInventory,
    MakeSandbox,
    _baselined,
    _delivered,
    _last_notify_per_slot,
    _notifies_per_slot,
    _payload,
)

Setup = tuple[Inventory, dict[int, TourSlot], Sandbox, Agent]


@pytest.fixture
def setup(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> Setup:
    """A baselined agent (cursor_overlap 300 s) on `backend`'s inventory, and its sandbox."""
    return _baselined(backend, make_inventory, make_sandbox, make_agent, tmp_path)


def _stale(inventory: Inventory, seconds: float) -> Any:
    """A stamp `seconds` behind the database's clock, as a transaction that began then (or
    an application server whose clock is behind) writes it."""
    return cursor.since(inventory.clock(), seconds)


def _slot_count(inventory: Inventory) -> int:
    with inventory.engine.connect() as conn:
        return int(conn.execute(sa.text("SELECT COUNT(*) FROM slots")).scalar_one())


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_row_stamped_long_before_its_commit_is_missed_by_polls_and_found_by_the_sweep(
    backend: str,
    setup: Setup,
) -> None:
    inventory, slots, sandbox, agent = setup
    assert agent.scanner.sweeps()  # cursor_overlap 300 s, polls read the last 5 s
    inventory.update_slot(101, vacancies=9, updated_at=_stale(inventory, 60))

    polled = agent.poll()
    assert polled is not None
    assert (polled.slot_rows, polled.messages) == (0, 0)  # behind the polls' window

    swept = agent.late_sweep()
    assert swept is not None
    assert (swept.kind, swept.slots_changed, swept.notifies) == ("late", 1, 1)
    _delivered(agent)
    assert _last_notify_per_slot(sandbox)["101"] == _payload(slots[101], 9, "LIMITED")

    # The next sweep reads the row again (it is still in the window) and skips it unconverted.
    again = agent.late_sweep()
    assert again is not None
    assert (again.slot_rows, again.slots_unchanged, again.messages) == (1, 1, 0)
    assert _notifies_per_slot(sandbox) == {"101": 1}


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_after_a_bulk_change_polls_read_only_new_rows_and_the_sweep_diffs_none_again(
    backend: str,
    setup: Setup,
) -> None:
    inventory, slots, sandbox, agent = setup
    agent.scanner.live_overlap_s = 0.5
    total = _slot_count(inventory)
    # A nightly job stamps every row; nothing Seyaha sees changes.
    with inventory.engine.begin() as conn:
        conn.execute(sa.text(f"UPDATE slots SET updated_at = {inventory.clock_sql}"))

    first = agent.poll()
    assert first is not None
    assert (first.slot_rows, first.messages) == (total, 0)  # the bulk change, read once
    time.sleep(2.1)  # past the polls' window (SQLite's clock has whole seconds)
    # The poll right after reads from the first poll's clock minus the window: once more.
    assert agent.poll() is not None
    inventory.update_slot(202, vacancies=4)
    booking = agent.poll()
    assert booking is not None
    # Within cursor_overlap, yet only the booking is read again: the bulk's rows are not.
    assert (booking.slot_rows, booking.notifies) == (1, 1)

    swept = agent.late_sweep()
    assert swept is not None
    # The sweep reads the whole window, bulk included, and converts none of it: every row
    # was recorded as it is by the polls.
    assert (swept.slot_rows, swept.slots_unchanged, swept.messages) == (total, total, 0)
    _delivered(agent)
    assert _notifies_per_slot(sandbox) == {"202": 1}
    assert _last_notify_per_slot(sandbox)["202"] == _payload(slots[202], 4, "LIMITED")


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_poll_during_a_sweep_keeps_its_newer_state(
    backend: str,
    setup: Setup,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The sweep reads a late row as it was at its snapshot; a booking commits and a poll
    records it while the sweep reads: the sweep must not record or send its older state."""
    inventory, slots, sandbox, agent = setup
    inventory.update_slot(101, vacancies=9, updated_at=_stale(inventory, 60))
    inventory.update_slot(202, vacancies=8, updated_at=_stale(inventory, 60))
    booked = threading.Event()

    def give_way() -> None:
        if not booked.is_set():
            booked.set()
            inventory.update_slot(101, vacancies=2)
            poll = InThread(agent.poll)
            assert poll.done_within(WAIT_S), "the poll waited for the sweep"
            assert poll.result().notifies == 1

    monkeypatch.setattr(agent, "_give_way", give_way)
    swept = agent.late_sweep()
    assert booked.is_set()
    assert swept is not None
    # 101 was recorded by the poll (newer); only 202 is the sweep's.
    assert (swept.slots_changed, swept.notifies) == (1, 1)
    _delivered(agent)
    assert _notifies_per_slot(sandbox) == {"101": 1, "202": 1}
    last = _last_notify_per_slot(sandbox)
    assert last["101"] == _payload(slots[101], 2, "LIMITED")
    assert last["202"] == _payload(slots[202], 8, "AVAILABLE")
    monkeypatch.undo()
    again = agent.scan()
    assert (again.messages, again.slots_changed) == (0, 0)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_the_daemon_sweeps_on_its_own(
    backend: str,
    setup: Setup,
) -> None:
    """Run as a daemon, a late row arrives within the sweep interval, with no reconciliation
    (full_scan_interval is an hour) and no poll able to see it."""
    inventory, slots, sandbox, agent = setup
    with running(agent):
        wait_until(lambda: agent.reconciled, "the start reconciliation")
        inventory.update_slot(201, vacancies=2, updated_at=_stale(inventory, 120))
        wait_until(lambda: "201" in _last_notify_per_slot(sandbox), "the late row's notify")
    assert _last_notify_per_slot(sandbox)["201"] == _payload(slots[201], 2, "LIMITED")
    # Sweeps are counted apart: scans_total keeps counting polls and reconciliations only.
    sweeps = _sample(agent, "late_sweeps_total", result="ok")
    assert sweeps >= 1
    assert sweeps == _sample(agent, "scan_duration_seconds_count", kind="late")
    assert _sample(agent, "scans_total", result="ok") == sum(
        _sample(agent, "scan_duration_seconds_count", kind=kind) for kind in ("full", "incremental")
    )


def _sample(agent: Agent, name: str, **labels: str) -> float:
    return agent.metrics.registry.get_sample_value(f"seyaha_agent_{name}", labels) or 0.0


@pytest.mark.parametrize("backend", ["sqlite"])
def test_a_reconciliation_waits_for_a_sweep_under_way_instead_of_being_skipped(
    backend: str,
    setup: Setup,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reconciliation after the start often meets the sweep that follows the first
    poll: it must wait for that sweep, not give up until the next full_scan_interval."""
    inventory, _slots, _sandbox, agent = setup
    inventory.update_slot(101, vacancies=9, updated_at=_stale(inventory, 60))
    inside, go_on = threading.Event(), threading.Event()

    def give_way() -> None:
        inside.set()
        assert go_on.wait(WAIT_S), "the test never let the sweep go on"

    monkeypatch.setattr(agent, "_give_way", give_way)
    sweep = InThread(agent.late_sweep)
    assert inside.wait(WAIT_S), "the sweep never started reading"
    reconciliation = InThread(agent.full_scan)
    assert not reconciliation.done_within(QUIET_S), "the reconciliation did not wait"
    go_on.set()
    swept = sweep.result()
    assert swept is not None
    assert swept.notifies == 1
    reconciled = reconciliation.result()
    assert reconciled is not None
    assert (reconciled.kind, reconciled.messages) == ("full", 0)
