"""A full scan never keeps the supplier's database waiting for the agent's own store.

While another process holds the state store's write lock (a long `outbox purge`, a backup, a
shell left in a transaction), the scan goes on reading the source, holds what it could not
record, ends its read transaction, and only then waits for the store. On a SQLite inventory,
whose readers block writers, the supplier's bookings go through in the meantime.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from agent.app import Agent
from agent.clock import SystemClock
from agent.model import CatalogDiff, SlotDiff
from agent.scan import ScanReport
from agent.store import StateStore, StoreBusy
from tests.integration.inventory import BACKEND_PARAMS, Inventory, first_day, seed_tours

MakeInventory = Callable[[str], Inventory]
MakeAgent = Callable[..., Agent]

WAIT_S = 60.0
"""A ceiling for what another thread does; never an expectation."""

HELD_S = 3.0
"""How long the test holds the state store locked while the scan runs."""


def _sqlite_file(url: str) -> Path:
    return Path(sa.make_url(url).database or "")


def test_bookings_on_a_sqlite_inventory_go_through_while_the_scan_waits_for_a_locked_store(
    make_inventory: MakeInventory, make_agent: MakeAgent, tmp_path: Path
) -> None:
    inventory = make_inventory("sqlite")
    slots = seed_tours(inventory, first_day())
    state = tmp_path / "state.db"
    agent = make_agent(
        "agent",
        base_url="http://127.0.0.1:9",
        source_url=inventory.url,
        state_url=f"sqlite:///{state}",
    )
    assert agent.scan().baseline
    for slot in slots:
        inventory.update_slot(slot.slot_id, vacancies=0)

    # Another process's write transaction on the store, held for HELD_S.
    with sqlite3.connect(_sqlite_file(inventory.url)) as setup:
        setup.execute("CREATE TABLE journal (note TEXT)")  # the supplier's other writes
    setup.close()
    holder = sqlite3.connect(state, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    result: list[ScanReport | BaseException] = []

    def scan() -> None:
        try:
            result.append(agent.scan())
        except BaseException as exc:  # reported to the test below
            result.append(exc)

    scanner = threading.Thread(target=scan, daemon=True)
    scanner.start()
    booked: list[float] = []
    refused: list[str] = []
    deadline = time.monotonic() + HELD_S
    supplier = sqlite3.connect(_sqlite_file(inventory.url), timeout=0.2, isolation_level=None)
    try:
        while time.monotonic() < deadline:
            try:
                supplier.execute("INSERT INTO journal (note) VALUES ('booking')")
                booked.append(time.monotonic())
            except sqlite3.OperationalError as exc:
                refused.append(str(exc))
            time.sleep(0.05)
        # The scan is still waiting for the store, yet the supplier's last writes went through.
        assert scanner.is_alive(), f"the scan ended while the store was locked: {result}"
        last = booked[-1] if booked else 0.0
        assert last > deadline - 1.0, (
            f"the supplier's writes were refused while the scan waited for its store: "
            f"{len(refused)} refused ({refused[-1:]}), {len(booked)} went through"
        )
    finally:
        supplier.close()
        holder.execute("ROLLBACK")
        holder.close()

    scanner.join(WAIT_S)
    assert not scanner.is_alive()
    (report,) = result
    assert isinstance(report, ScanReport), report
    sold_out = [s for s in slots if s.capacity is not None and s.vacancies != 0]
    assert report.slots_changed == len(sold_out)  # a FREESALE slot sends no vacancies
    assert agent.store.admin.stats().pending == len(sold_out) + 1  # and the baseline trigger


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_write_that_must_not_wait_says_the_store_is_busy_and_writes_nothing(
    backend: str, make_store: Callable[[str], StateStore]
) -> None:
    store = make_store(backend)
    now = store.clock(SystemClock()).now()
    store.commit_scan(CatalogDiff(), SlotDiff(), [], now, cursors={"slots": "first"})

    with store.engine.connect() as other:
        if backend == "sqlite":
            other = other.execution_options(sqlite_begin="IMMEDIATE")
        with other.begin():
            # The row every recorded cursor goes to, locked by another transaction.
            meta = sa.table("seyaha_meta", sa.column("key"), sa.column("value"))
            other.execute(sa.update(meta).where(meta.c.key == "cursor:slots").values(value="other"))
            started = time.monotonic()
            with pytest.raises(StoreBusy):
                store.commit_scan(
                    CatalogDiff(), SlotDiff(), [], now, cursors={"slots": "second"}, wait=False
                )
            waited = time.monotonic() - started
        assert waited < 30.0  # a ceiling: MySQL's shortest lock wait is 1 s, SQLite's 0

    # Nothing was written, and the store waits again as usual afterwards.
    assert store.fingerprints.cursor("slots") == "other"
    store.commit_scan(CatalogDiff(), SlotDiff(), [], now, cursors={"slots": "third"})
    assert store.fingerprints.cursor("slots") == "third"
