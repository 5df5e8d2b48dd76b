"""A full read of the slots that loses the source part-way carries on where it stopped.

A reconciliation of a large inventory reads for long enough to meet a database restart, a
failover or a killed connection. These tests kill every connection the agent holds to the
source while a reconciliation streams its slots, and check that the pass carries on in a new
transaction after the last slot it handed on: it reads each row about once (not the whole
inventory again), finds the changes on both sides of the cut, and still finds deletions.
Server databases only: a SQLite inventory is a local file, with no connection to lose.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent import scan as scan_module
from agent.app import Agent
from agent.model import SlotKey
from agent.sandbox import Sandbox
from agent.scan import ScanReport
from agent.source import cursor
from agent.source.reader import Snapshot, SourceReader, StreamPosition
from tests.conftest import PG_ADMIN_URL
from tests.integration.inventory import (
    BACKEND_PARAMS,
    SERVER_PARAMS,
    SLOTS_CHANGED_QUERY,
    SLOTS_QUERY,
    Inventory,
    at,
    first_day,
    notify_payload,
    seed_tours,
)
from tests.integration.outage import CutOnce, kill_connections
from tests.integration.test_reconcile_beside_polls import (
    MakeAgent,
    MakeInventory,
    MakeSandbox,
    _delivered,
    _last_notify_per_slot,
)

MakeReader = Callable[..., SourceReader]


BULK = 20_000
"""Slots of the large option: several of the reader's fetches (STREAM_BATCH_ROWS), so that
a connection killed after the first fetch is noticed part-way through the read."""

FIRST_ID = 100_000
"""Ids of the large option's slots: all six digits, so their text order is their order."""

OPTION = "9-bulk"

PADDED_SLOTS_QUERY = SLOTS_QUERY.rstrip().replace(
    "s.capacity\n", "s.capacity, REPEAT('x', 1000) AS padding\n", 1
)
"""The slots query with a wide column: 20 MB of rows, more than the socket buffers between
the two ends can hold, so that a connection killed part-way is noticed part-way (MariaDB
writes a small result into them whole before the kill lands)."""

CUT_AT_CALL = 20
"""The source is cut when the reconciliation has read this many times GIVE_WAY_ROWS rows:
inside the large option, between its early and its late changed slot."""


def _fill(inventory: Inventory) -> None:
    inventory.add_product(9, "Cappadocia Balloon Flight", 25000, {OPTION: "Sunrise"})
    start = first_day(10)
    rows = [
        {
            "id": FIRST_ID + n,
            "option_id": OPTION,
            "starts_at": inventory.start_value(_start(start, n)),
            "status": None,
            "vacancies": 20,
            "capacity": 20,
        }
        for n in range(BULK)
    ]
    with inventory.engine.begin() as conn:
        conn.execute(sa.insert(inventory.slots), rows)


def _start(day: date, n: int) -> datetime:
    return at(day, 6) + timedelta(minutes=n)


def _kill_source_connections(inventory: Inventory) -> int:
    """Every connection the agent holds to the inventory, killed as a restart would."""
    inventory.engine.dispose()  # the test's own, so that it can write again afterwards
    return kill_connections(inventory.url, "source")


@dataclass
class Big:
    """A baselined agent on an inventory of BULK + 8 slots, and three changes only a
    reconciliation finds (stamped long before the cursor's window): one early in key order,
    one late, and a late deletion."""

    inventory: Inventory
    sandbox: Sandbox
    agent: Agent
    total: int
    early: int = FIRST_ID + 10
    late: int = FIRST_ID + BULK - 10
    gone: int = FIRST_ID + BULK - 5

    def check(self, report: ScanReport | None) -> None:
        """The reconciliation found the three changes, and recorded all it read."""
        assert report is not None, "the reconciliation gave up"
        assert (report.slots_changed, report.slots_removed, report.notifies) == (2, 1, 3)
        _delivered(self.agent)
        last = _last_notify_per_slot(self.sandbox)
        assert last[str(self.early)]["vacancies"] == 3
        assert last[str(self.late)]["vacancies"] == 4
        gone_start = _start(first_day(10), self.gone - FIRST_ID)
        assert last[str(self.gone)] == notify_payload(
            9, OPTION, self.gone, gone_start, status="CLOSED", vacancies=0, capacity=None
        )
        again = self.agent.full_scan()
        assert again is not None
        assert again.messages == 0  # everything was recorded as the source has it


def _big(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    *,
    state_url: str | None = None,
    slots_query: str | None = None,
    **source: Any,
) -> Big:
    inventory = make_inventory(backend)
    seed_tours(inventory, first_day())
    _fill(inventory)
    inventory.track_updates()
    sandbox = make_sandbox()
    agent = make_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=state_url or f"sqlite:///{tmp_path / 'state.db'}",
        slots_query=slots_query or (SLOTS_QUERY if backend == "sqlite" else PADDED_SLOTS_QUERY),
        # Every slot read by each reconciliation, as without range digests: these tests cut
        # and seam a read of the whole inventory (test_range_digests cuts a read of ranges).
        source={
            "slots_changed_query": SLOTS_CHANGED_QUERY,
            "cursor_overlap": 300,
            "range_digests": False,
            **source,
        },
    )
    baseline = agent.poll()
    assert baseline is not None
    assert baseline.baseline
    _delivered(agent)
    big = Big(inventory, sandbox, agent, baseline.slot_rows)
    stale = cursor.since(inventory.clock(), 3600)
    inventory.update_slot(big.early, vacancies=3, updated_at=stale)
    inventory.update_slot(big.late, vacancies=4, updated_at=stale)
    inventory.delete_slot(big.gone)
    return big


@pytest.mark.parametrize("backend", SERVER_PARAMS)
def test_a_reconciliation_that_loses_the_source_part_way_carries_on_after_the_last_slot(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    big = _big(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    inventory, agent = big.inventory, big.agent
    monkeypatch.setattr(agent.scanner, "pause", lambda seconds: None)

    # The rows fetched already are read when the cut comes; the next fetch fails. Counted
    # from the source's first row: no stored slot is read ahead before it (that read steps
    # aside for the polls too).
    monkeypatch.setattr(scan_module, "STORED_AHEAD", 0)
    give_way = CutOnce(CUT_AT_CALL, lambda: _kill_source_connections(inventory))
    monkeypatch.setattr(agent, "_give_way", give_way)
    with caplog.at_level(logging.WARNING, logger="agent.scan"):
        report = agent.full_scan()

    assert len(give_way.cuts) == 1, "the read ended before the cut"
    assert give_way.cuts[0] >= 1, "no source connection was killed"
    assert report is not None, "the reconciliation gave up"
    resumed = [r for r in caplog.records if getattr(r, "event", None) == "scan.resuming"]
    assert len(resumed) == 1
    cut = re.search(r"after 9/9-bulk/(\d+)\)", resumed[0].getMessage())
    assert cut is not None, resumed[0].getMessage()
    assert big.early < int(cut.group(1)) < big.late
    assert report.source_transactions == 2
    # Each row read about once: the rest was read after the cut, not the whole inventory
    # again (the one slot held back for its duplicates when the cut came is read twice).
    assert big.total - 1 <= report.slot_rows <= big.total
    big.check(report)


TRANSACTION_MAX_S = 0.2


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_long_read_ends_its_source_transaction_every_read_transaction_max_and_goes_on(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A reconciliation slowed to take well over a second (polls keep it waiting) keeps no
    source transaction open longer than read_transaction_max, and still finds every change
    and deletion on both sides of its transactions' seams."""
    big = _big(
        backend,
        make_inventory,
        make_sandbox,
        make_agent,
        tmp_path,
        read_transaction_max=TRANSACTION_MAX_S,
    )
    oldest: list[float] = []

    def give_way() -> None:  # called every GIVE_WAY_ROWS rows read: 79 times
        time.sleep(0.02)
        if backend == "postgresql":
            oldest.append(_oldest_source_transaction_s(big.inventory))

    monkeypatch.setattr(big.agent, "_give_way", give_way)
    started = time.monotonic()
    report = big.agent.full_scan()
    took = time.monotonic() - started

    assert report is not None
    assert took > 1.5  # the sleeps alone
    assert report.source_transactions >= 3
    assert report.slot_rows <= big.total + report.source_transactions  # one re-read per seam
    if backend == "postgresql":
        assert max(oldest) < TRANSACTION_MAX_S + 0.8, f"a transaction open {max(oldest):.2f} s"
    big.check(report)


@pytest.mark.postgres
def test_a_query_slower_to_start_than_read_transaction_max_still_reads_on(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each new transaction runs the query again; one that takes longer than the limit to
    return its first row (a big sort) must still read for the limit, not stop after one row
    and start the query again, for ever."""
    big = _big(
        "postgresql",
        make_inventory,
        make_sandbox,
        make_agent,
        tmp_path,
        slots_query=SLOTS_QUERY.rstrip() + "\nCROSS JOIN (SELECT pg_sleep(0.5)) AS slow_start\n",
        read_transaction_max=TRANSACTION_MAX_S,
    )
    # Reading takes over 1.5 s in all (the sleeps): several transactions' worth.
    monkeypatch.setattr(big.agent, "_give_way", lambda: time.sleep(0.02))
    report = big.agent.full_scan()
    assert report is not None
    # Not one transaction per row (20,000): each read for the limit after its slow start.
    assert 2 <= report.source_transactions < 100
    big.check(report)


def _oldest_source_transaction_s(inventory: Inventory) -> float:
    database = str(sa.engine.make_url(inventory.url).database)
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=sa.NullPool)
    with admin.connect() as conn:
        age = conn.execute(
            sa.text(
                "SELECT coalesce(max(extract(epoch FROM clock_timestamp() - xact_start)), 0) "
                "FROM pg_stat_activity WHERE datname = :db "
                "AND application_name = 'seyaha-agent-source' AND xact_start IS NOT NULL"
            ),
            {"db": database},
        ).scalar_one()
    admin.dispose()
    return float(age)


ODD_OPTIONS = ["10", "9", "B", "a", "a b", "Z z", "é-x", "ß", "😀", "-"]
"""Option ids whose text order differs from any numeric or case-blind order."""


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_read_after_a_key_returns_exactly_the_rest_in_the_same_order(
    backend: str, make_inventory: MakeInventory, make_reader: MakeReader
) -> None:
    """What a resumed read relies on: the database's `after` bound cuts its key order exactly
    where the reader's position says, whatever the ids (numbers as text, case, accents,
    characters outside the BMP)."""
    inventory = make_inventory(backend)
    for product_id in (1, 2, 10):
        inventory.add_product(
            product_id,
            f"Product {product_id}",
            1000,
            {f"{product_id}:{o}": o for o in ODD_OPTIONS},
        )
    start = at(first_day(5), 9)
    ids = iter(range(1, 10_000, 7))  # one to three digits: their text order is not numeric
    rows = [
        {
            "id": slot_id,
            "option_id": f"{product_id}:{option}",
            "starts_at": inventory.start_value(start),
            "status": None,
            "vacancies": 1,
            "capacity": 1,
        }
        for product_id in (1, 2, 10)
        for option in ODD_OPTIONS
        for slot_id in (next(ids), next(ids))
    ]
    with inventory.engine.begin() as conn:
        conn.execute(sa.insert(inventory.slots), rows)
    reader = make_reader(inventory.url)

    def read(after: tuple[str, ...] | None) -> list[tuple[SlotKey, tuple[str, ...] | None]]:
        position = StreamPosition()
        out = []
        with reader.transaction() as src:
            for key, _item in reader.stream_slots(src, Snapshot(), after=after, position=position):
                out.append((key, position.after))
        return out

    whole = read(None)
    keys = [key for key, _at in whole]
    assert len(keys) == len(rows)
    assert keys == sorted(keys)  # the text order the state store merges in
    for i, (_key, position) in enumerate(whole):
        assert [key for key, _at in read(position)] == keys[i + 1 :], f"after {position}"
