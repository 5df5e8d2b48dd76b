"""A reconciliation beside the polls, raced against them on every source backend.

The reconciliation (Agent.full_scan on a baselined store with a change query) reads every
slot at one moment of the source, its snapshot; polls go on while it reads, and record newer
states. These tests stop the reconciliation in the middle of its read, at a row it has
already read as it was at the snapshot, change that row in the source, run a poll, and let
the reconciliation finish. The poll must not wait for it, and the reconciliation must not
record or send its older picture of the row over the poll's newer one (the watermark rule,
agent.scan.LiveChanges). A fresh full scan at the end must find nothing to change: the store
says what the database says.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent import scan
from agent.app import Agent
from agent.diff import SourceSlot
from agent.sandbox import Sandbox
from agent.scan import ScanReport
from agent.source.reader import Snapshot
from tests.integration.inventory import (
    BACKEND_PARAMS,
    SLOTS_CHANGED_QUERY,
    Inventory,
    TourSlot,
    calls,
    first_day,
    notify_payload,
    running,
    seed_tours,
)

MakeInventory = Callable[[str], Inventory]
MakeSandbox = Callable[..., Sandbox]
MakeAgent = Callable[..., Agent]

WAIT_S = 30.0
"""A ceiling for a thread to reach a point or finish, not an expectation."""

QUIET_S = 1.0
"""How long a test watches for something that must NOT happen."""


class Paused:
    """Wraps the agent's slot stream: the reconciliation stops once it has read `key_id`
    (an availability id) and goes on when `resume` is set. Polls do not use this stream."""

    def __init__(self, agent: Agent, key_id: str) -> None:
        self.reached = threading.Event()
        self.resume = threading.Event()
        self.yielded = 0
        self._real = agent.reader.stream_slots
        self._key_id = key_id

    def stream(
        self, conn: sa.Connection, snapshot: Snapshot, **options: Any
    ) -> Iterator[SourceSlot]:
        for key, item in self._real(conn, snapshot, **options):
            if key[2] == self._key_id and not self.reached.is_set():
                self.reached.set()
                assert self.resume.wait(WAIT_S), "the test never let the reconciliation go on"
            self.yielded += 1
            yield key, item


class InThread:
    """`work()` in a thread; `result()` joins it, re-raising what it raised."""

    def __init__(self, work: Callable[[], Any]) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(work,), daemon=True)
        self._thread.start()

    def _run(self, work: Callable[[], Any]) -> None:
        try:
            self._value = work()
        except BaseException as exc:  # handed to the test thread by result()
            self._error = exc

    def done_within(self, seconds: float) -> bool:
        self._thread.join(seconds)
        return not self._thread.is_alive()

    def result(self) -> Any:
        assert self.done_within(WAIT_S), "the thread did not finish"
        if self._error is not None:
            raise self._error
        return self._value


def _source(inventory: Inventory) -> Inventory:
    if inventory.backend == "sqlite":
        # A live SQLite inventory runs in WAL mode, or no booking could commit while anyone
        # reads it (a rollback journal blocks writers behind readers).
        with inventory.engine.connect() as conn:
            conn.exec_driver_sql("PRAGMA journal_mode=WAL")
    return inventory


def _payload(slot: TourSlot, vacancies: int, status: str = "AVAILABLE") -> dict[str, Any]:
    return notify_payload(
        slot.product_id,
        slot.option_id,
        slot.slot_id,
        slot.start,
        status=status,
        vacancies=vacancies,
        capacity=slot.capacity,
    )


def _last_notify_per_slot(sandbox: Sandbox) -> dict[str, dict[str, Any]]:
    last: dict[str, dict[str, Any]] = {}
    for call in calls(sandbox):
        if call.endpoint == "notify" and call.status == 200 and call.body:
            last[call.body["availabilityId"]] = call.body
    return last


def _notifies_per_slot(sandbox: Sandbox) -> Counter[str]:
    return Counter(
        c.body["availabilityId"]
        for c in calls(sandbox)
        if c.endpoint == "notify" and c.status == 200 and c.body
    )


def _delivered(agent: Agent) -> None:
    result = agent.drain(60.0)
    assert (result.timed_out, result.paused_reason, result.stats.pending) == (False, None, 0)


def _baselined(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    **source: Any,
) -> tuple[Inventory, dict[int, TourSlot], Sandbox, Agent]:
    inventory = _source(make_inventory(backend))
    slots = {s.slot_id: s for s in seed_tours(inventory, first_day())}
    inventory.track_updates()
    sandbox = make_sandbox()
    agent = make_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        source={"slots_changed_query": SLOTS_CHANGED_QUERY, "cursor_overlap": 300, **source},
    )
    first = agent.poll()
    assert first is not None
    assert first.baseline
    _delivered(agent)
    return inventory, slots, sandbox, agent


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_poll_during_a_reconciliation_runs_at_once_and_its_newer_state_is_kept(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inventory, slots, sandbox, agent = _baselined(
        backend, make_inventory, make_sandbox, make_agent, tmp_path
    )
    # Changes no poll has seen yet: the reconciliation will find them.
    inventory.update_slot(101, vacancies=12)
    inventory.update_slot(202, vacancies=7)
    inventory.delete_slot(105)
    agent.scanner.commit_chunk = 1  # each change recorded in its own scan turn
    paused = Paused(agent, "202")
    monkeypatch.setattr(agent.reader, "stream_slots", paused.stream)

    reconciliation = InThread(agent.full_scan)
    assert paused.reached.wait(WAIT_S), "the reconciliation never read slot 202"
    # The reconciliation holds slot 202 as it was at its snapshot (7 seats left), and has
    # already recorded 101 (a chunk of one change). A booking commits now, and a poll runs.
    inventory.update_slot(202, vacancies=3)
    poll = InThread(agent.poll)
    assert poll.done_within(WAIT_S), "the poll waited for the reconciliation"
    polled: ScanReport = poll.result()
    # 101 was recorded by the reconciliation's first chunk, so the poll finds it unchanged;
    # 202 it records with the booking.
    assert (polled.kind, polled.slots_changed, polled.notifies) == ("incremental", 1, 1)

    paused.resume.set()
    reconciled: ScanReport = reconciliation.result()
    # 101 changed, 105 removed; the snapshot's 202 was dropped: the poll recorded a newer one.
    assert (reconciled.kind, reconciled.slots_changed, reconciled.slots_removed) == ("full", 1, 1)

    _delivered(agent)
    last = _last_notify_per_slot(sandbox)
    assert last["202"] == _payload(slots[202], 3, "LIMITED")
    assert last["101"] == _payload(slots[101], 12, "LIMITED")
    assert last["105"]["status"] == "CLOSED"
    # One call per change: the reconciliation's stale 7 was never sent.
    assert _notifies_per_slot(sandbox) == {"101": 1, "202": 1, "105": 1}
    # And the store says what the database says: a blocking full scan finds nothing.
    monkeypatch.undo()
    again = agent.scan()
    assert (again.messages, again.slots_changed, again.slots_removed) == (0, 0, 0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_row_a_poll_recorded_before_the_reconciliation_reaches_it_is_not_overwritten(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The poll runs before the reconciliation's stream reaches the row at all: the
    reconciliation still reads it as it was at the snapshot, after the poll recorded it.
    (Every slot read, as without range digests: with them, only 301's range would be read,
    and the stream could not be stopped before it; test_range_digests races those reads.)"""
    inventory, slots, sandbox, agent = _baselined(
        backend, make_inventory, make_sandbox, make_agent, tmp_path, range_digests=False
    )
    inventory.update_slot(301, status="CLOSED")
    paused = Paused(agent, "101")  # the first slot in key order
    monkeypatch.setattr(agent.reader, "stream_slots", paused.stream)

    reconciliation = InThread(agent.full_scan)
    assert paused.reached.wait(WAIT_S)
    inventory.update_slot(301, status=None)  # reopened before the reconciliation gets there
    inventory.update_slot(202, vacancies=1)
    poll = InThread(agent.poll)
    assert poll.done_within(WAIT_S), "the poll waited for the reconciliation"
    polled: ScanReport = poll.result()
    # 301 is back as the store had it: nothing to send; 202 is one notify.
    assert (polled.slots_changed, polled.notifies) == (1, 1)

    paused.resume.set()
    reconciled: ScanReport = reconciliation.result()
    # The snapshot saw 301 CLOSED and 202 untouched; both were recorded by a later poll.
    assert (reconciled.slots_changed, reconciled.notifies) == (0, 0)

    _delivered(agent)
    assert _notifies_per_slot(sandbox) == {"202": 1}
    assert _last_notify_per_slot(sandbox)["202"] == _payload(slots[202], 1, "LIMITED")
    monkeypatch.undo()
    again = agent.scan()
    assert (again.messages, again.slots_changed) == (0, 0)


def test_a_full_scan_while_a_reconciliation_runs_stops_the_reconciliation(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A full scan (`once`, a resync) records every row: the reconciliation's older picture
    is worth nothing after it, so the reconciliation stops instead of recording it."""
    inventory, slots, sandbox, agent = _baselined(
        "sqlite", make_inventory, make_sandbox, make_agent, tmp_path
    )
    inventory.update_slot(202, vacancies=7)
    paused = Paused(agent, "202")
    monkeypatch.setattr(agent.reader, "stream_slots", paused.stream)
    reconciliation = InThread(agent.full_scan)
    assert paused.reached.wait(WAIT_S)
    inventory.update_slot(202, vacancies=2)
    monkeypatch.setattr(agent.reader, "stream_slots", paused._real)
    full = InThread(agent.scan)
    assert full.done_within(WAIT_S), "the full scan waited for the reconciliation"
    assert full.result().slots_changed == 1

    with caplog.at_level(logging.INFO, logger="agent"):
        paused.resume.set()
        assert reconciliation.result() is None
    assert any(getattr(r, "event", None) == "scan.superseded" for r in caplog.records)
    _delivered(agent)
    assert _notifies_per_slot(sandbox) == {"202": 1}
    assert _last_notify_per_slot(sandbox)["202"] == _payload(slots[202], 2, "LIMITED")


def test_a_reconciliation_steps_aside_while_a_poll_runs(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Between rows it waits for the scan turn to be free: a poll holding it runs alone."""
    _inventory, _slots, _sandbox, agent = _baselined(
        "sqlite", make_inventory, make_sandbox, make_agent, tmp_path
    )
    monkeypatch.setattr(scan, "GIVE_WAY_ROWS", 1)
    paused = Paused(agent, "101")
    monkeypatch.setattr(agent.reader, "stream_slots", paused.stream)
    reconciliation = InThread(agent.full_scan)
    assert paused.reached.wait(WAIT_S)
    with agent.scan_lock:  # what a poll holds while it runs
        paused.resume.set()
        assert not reconciliation.done_within(QUIET_S)
        # It handed on the row it had read, then waited before reading the next.
        assert paused.yielded == 1, "it read on while a poll ran"
    report: ScanReport = reconciliation.result()
    assert paused.yielded == 8
    assert (report.kind, report.slot_rows) == ("full", 8)


def test_a_stopping_daemon_ends_its_reconciliation_instead_of_waiting_for_it(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """SIGTERM during a reconciliation of a million slots would otherwise wait for it (tens
    of seconds): it ends at its next step aside, and reads no further."""
    _inventory, _slots, _sandbox, agent = _baselined(
        "sqlite", make_inventory, make_sandbox, make_agent, tmp_path
    )
    monkeypatch.setattr(scan, "GIVE_WAY_ROWS", 1)
    paused = Paused(agent, "101")  # the start reconciliation stops at the first slot
    monkeypatch.setattr(agent.reader, "stream_slots", paused.stream)
    with caplog.at_level(logging.INFO, logger="agent"), running(agent) as stop:
        assert paused.reached.wait(WAIT_S), "the daemon ran no reconciliation after its start"
        stop.set()
        paused.resume.set()
    assert paused.yielded == 1, "it read on after the stop"
    said = [
        r.getMessage() for r in caplog.records if getattr(r, "event", None) == "scan.superseded"
    ]
    assert said == ["reconciliation stopped: the agent is stopping"]


def test_a_reconciliation_ends_even_when_delivery_never_rests(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """It steps aside for busy delivery workers only for a while each time: a backlog that
    keeps them busy for hours slows it down, and it still ends."""
    inventory, _slots, _sandbox, agent = _baselined(
        "sqlite", make_inventory, make_sandbox, make_agent, tmp_path
    )
    inventory.update_slot(202, vacancies=4)
    monkeypatch.setattr(scan, "GIVE_WAY_ROWS", 1)
    asked: list[bool] = []

    def always_busy() -> bool:
        asked.append(True)
        return True

    monkeypatch.setattr(agent.deliverer, "busy", always_busy)
    reconciliation = InThread(agent.full_scan)
    report: ScanReport = reconciliation.result()
    assert (report.kind, report.slot_rows, report.slots_changed) == ("full", 8, 1)
    assert len(asked) >= 8  # it did look, at every row
