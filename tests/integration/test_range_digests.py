"""Range digests on PostgreSQL and MariaDB sources: a reconciliation reads only what changed.

Each test tries to make a reconciliation that skips ranges miss something: a change a poll
recorded and then saw undone, a range emptied, a row the agent cannot read, ids the database
spells otherwise, a query or time zone changed under stored digests, a slot whose start
passed in a range nobody reads, a booking committed while a range is being read. The
answer is always the same check: the stored fingerprints say what the database says.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent import commands
from agent import ranges as ranges_module
from agent.app import Agent
from agent.dialects import PARALLEL_SETTINGS
from agent.errors import QueryError
from agent.ranges import (
    UNKNOWN,
    RangeKey,
    RangeTally,
    StoredDigests,
    label,
    parse_label,
    range_of,
)
from agent.sandbox import Sandbox
from agent.source import cursor
from agent.source import reader as reader_module
from agent.source.reader import Snapshot, SourceReader
from agent.store.ranges import StoredRanges
from tests.integration.inventory import (
    SLOTS_CHANGED_QUERY,
    SLOTS_QUERY,
    Inventory,
    at,
    calls,
    first_day,
)
from tests.integration.test_reconcile_beside_polls import Paused, _delivered

MakeInventory = Callable[[str], Inventory]
MakeSandbox = Callable[..., Sandbox]
MakeAgent = Callable[..., Agent]

DIGEST_BACKENDS = [
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
]

OPTIONS = {"1-a": 1, "1-b": 1, "2-a": 2}
"""option id -> product id"""
SLOTS_PER_OPTION = 30
"""Ids 1000.. per option: each last digit three times, so three slots per range."""
RANGES = len(OPTIONS) * 10
CAPACITY = 40
WAIT_S = 30.0


FIRST = [
    pytest.param(False, id="ranges"),
    pytest.param(True, id="options-first"),
]
"""Whether a pass compares option digests before range digests (see _options_first)."""


def _options_first(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """Compare option digests first whatever the inventory's size: it has three options,
    where the agent waits for agent.ranges.OPTIONS_MIN, and one option differing of three
    would be past OPTIONS_READ_FRACTION."""
    if on:
        monkeypatch.setattr(ranges_module, "OPTIONS_MIN", 1)
        monkeypatch.setattr(ranges_module, "OPTIONS_READ_FRACTION", 1.0)


@dataclass
class Setup:
    inventory: Inventory
    sandbox: Sandbox
    agent: Agent
    slots: dict[int, str]
    """slot id -> option id"""


def _fill(inventory: Inventory) -> dict[int, str]:
    day = first_day()
    slots: dict[int, str] = {}
    with inventory.engine.begin() as conn:
        conn.execute(
            sa.insert(inventory.products),
            [
                {"id": 1, "title": "Cruise", "price_cents": 4500},
                {"id": 2, "title": "Tour", "price_cents": 3000},
            ],
        )
        conn.execute(
            sa.insert(inventory.options),
            [{"id": o, "product_id": p, "name": o} for o, p in OPTIONS.items()],
        )
        rows = []
        for n, option in enumerate(OPTIONS):
            for i in range(SLOTS_PER_OPTION):
                slot_id = 1000 * (n + 1) + i
                slots[slot_id] = option
                rows.append(
                    {
                        "id": slot_id,
                        "option_id": option,
                        "starts_at": inventory.start_value(at(day, 9 + i % 8, i // 8)),
                        "status": None,
                        "vacancies": CAPACITY,
                        "capacity": CAPACITY,
                    }
                )
        conn.execute(sa.insert(inventory.slots), rows)
    return slots


def _setup(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    *,
    slots_query: str = SLOTS_QUERY,
    **source: Any,
) -> Setup:
    inventory = make_inventory(backend)
    slots = _fill(inventory)
    inventory.track_updates()
    sandbox = make_sandbox()
    agent = make_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        slots_query=slots_query,
        source=source,
    )
    first = agent.scan()
    assert first.baseline
    assert first.ranges_read is None  # the first pass reads every slot, and tallies them
    return Setup(inventory, sandbox, agent, slots)


def _truth(agent: Agent) -> dict[tuple[str, str, str], str]:
    """What the database says now, read in full without the agent's store."""
    snapshot = agent.reader.read()
    now = agent.clock.now()
    return {s.key: s.fingerprint for s in snapshot.slots if s.start_utc >= now}


def _stored(agent: Agent) -> dict[tuple[str, str, str], str]:
    return {k: s.fingerprint for k, s in agent.store.fingerprints.load_slots().items()}


def _row_hashes(agent: Agent) -> dict[tuple[str, str, str], int | None]:
    """The hash of the source row each stored slot was built from (None: not known)."""
    return {k: s.row_hash for k, s in agent.store.fingerprints.load_slots().items()}


def _ranges(agent: Agent) -> dict[RangeKey, str]:
    """The stored digests by range: "rows:sum", or UNKNOWN for a range to read again."""
    loaded = agent.store.fingerprints.ranges.items()
    return {rng: text for name, text in loaded.items() if (rng := parse_label(name)) is not None}


def _rng(setup: Setup, slot_id: int) -> RangeKey:
    option = setup.slots[slot_id]
    return range_of((str(OPTIONS[option]), option, str(slot_id)))


def _last_notify(sandbox: Sandbox, slot_id: int) -> dict[str, Any] | None:
    bodies = [
        c.body
        for c in calls(sandbox)
        if c.endpoint == "notify" and c.status == 200 and c.body
        if c.body["availabilityId"] == str(slot_id)
    ]
    return bodies[-1] if bodies else None


def _after_quiet(backend: str, *, changed: bool) -> list[str]:
    """What a pass right after a quiet one asks for before any range digests, on an
    inventory that compares option digests first: PostgreSQL the option digests alone
    (their sum tells a quiet pass), MariaDB the sum of every row's hash first, then the
    option digests if it differs (`changed`)."""
    if backend == "postgresql":
        return ["options"]
    return ["sum", "options"] if changed else ["sum"]


def _asked(agent: Agent, monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """What the agent asks the source for, in order: "sum" for the digest of every slot
    row, "options" for the option digests, ("ranges", option ids or None for all) for
    range digests."""
    asked: list[Any] = []
    real_options, real_ranges = agent.reader.option_digests, agent.reader.range_digests
    real_sum = agent.reader.slots_digest

    def slots_digest(src: Any) -> Any:
        asked.append("sum")
        return real_sum(src)

    def option_digests(src: Any) -> Any:
        asked.append("options")
        return real_options(src)

    def range_digests(src: Any, options: Any = None, **kwargs: Any) -> Any:
        asked.append(("ranges", None if options is None else sorted(options)))
        return real_ranges(src, options, **kwargs)

    monkeypatch.setattr(agent.reader, "option_digests", option_digests)
    monkeypatch.setattr(agent.reader, "range_digests", range_digests)
    monkeypatch.setattr(agent.reader, "slots_digest", slots_digest)
    return asked


@pytest.mark.parametrize("options_first", FIRST)
@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_a_reconciliation_reads_only_the_ranges_whose_rows_changed(
    backend: str,
    options_first: bool,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _options_first(monkeypatch, options_first)
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    agent = setup.agent
    ranges = _ranges(agent)
    assert len(ranges) == RANGES
    assert all(text.startswith("3:") for text in ranges.values())

    quiet = agent.scan()
    assert (quiet.ranges_read, quiet.ranges_total, quiet.slot_rows, quiet.messages) == (
        0,
        RANGES,
        0,
        0,
    )

    hashes = _row_hashes(agent)
    assert None not in hashes.values()  # the baseline kept the hash of every slot's row
    setup.inventory.update_slot(1013, vacancies=1)
    changed = agent.scan()
    # One range read (1003, 1013, 1023), one notify; only the row that changed is built,
    # the other two match the hash of the row their stored slot was built from.
    assert (changed.ranges_read, changed.slot_rows, changed.slots_built) == (1, 3, 1)
    assert (changed.slots_changed, changed.notifies) == (1, 1)
    key = ("1", "1-a", "1013")
    rehashed = _row_hashes(agent)
    assert rehashed.pop(key) not in (None, hashes.pop(key))
    assert rehashed == hashes
    _delivered(agent)
    notified = _last_notify(setup.sandbox, 1013)
    assert notified is not None
    assert (notified["vacancies"], notified["status"]) == (1, "LIMITED")

    again = agent.scan()
    assert (again.ranges_read, again.slot_rows, again.messages) == (0, 0, 0)
    assert _stored(agent) == _truth(agent)
    counted = {
        result: agent.metrics.registry.get_sample_value(
            "seyaha_agent_reconciliation_ranges_total", {"result": result}
        )
        for result in ("read", "skipped")
    }
    assert counted == {"read": 1, "skipped": 3 * RANGES - 1}


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_slots_stored_without_the_hash_of_their_row_have_it_recorded_by_the_pass_that_builds_them(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    """A store from before schema 5 keeps no row hash: a pass builds every row of a range it
    reads, records the hash of those it finds unchanged (only the hash: their range's digest
    is stored as usual), and the next pass through that range builds only what changed."""
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    agent, inventory = setup.agent, setup.inventory
    with agent.store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE seyaha_slots SET row_hash = NULL"))
    before = _stored(agent)

    inventory.update_slot(1013, vacancies=1)
    first = agent.scan()
    assert (first.ranges_read, first.slot_rows, first.slots_built) == (1, 3, 3)
    assert (first.slots_changed, first.notifies) == (1, 1)
    hashes = _row_hashes(agent)
    same_range = [("1", "1-a", "1003"), ("1", "1-a", "1013"), ("1", "1-a", "1023")]
    assert all(hashes[key] is not None for key in same_range)
    assert sum(h is None for h in hashes.values()) == len(setup.slots) - 3
    assert _ranges(agent)[_rng(setup, 1013)] != UNKNOWN  # its digest was stored
    assert agent.scan().ranges_read == 0

    inventory.update_slot(1023, vacancies=2)
    second = agent.scan()
    assert (second.ranges_read, second.slot_rows, second.slots_built) == (1, 3, 1)
    assert second.slots_changed == 1
    changed = {("1", "1-a", "1013"), ("1", "1-a", "1023")}
    assert {k: v for k, v in _stored(agent).items() if k not in changed} == {
        k: v for k, v in before.items() if k not in changed
    }
    assert _stored(agent) == _truth(agent)


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_once_a_pass_found_nothing_changed_the_next_asks_for_one_digest_of_every_slot(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    agent, inventory = setup.agent, setup.inventory
    asked: list[str] = []
    for name in ("slots_digest", "range_digests"):
        real = getattr(agent.reader, name)

        def counted(src: Any, real: Any = real, name: str = name) -> Any:
            asked.append(name)
            return real(src)

        setattr(agent.reader, name, counted)

    # The baseline read every row; the first quiet pass compares ranges and finds none
    # changed, and records the digest of every slot row with the stored slots.
    first = agent.scan()
    assert (first.ranges_read, first.slots_digest_matched, asked) == (0, False, ["range_digests"])
    asked.clear()
    quiet = agent.scan()
    assert (quiet.ranges_read, quiet.ranges_total, quiet.slots_digest_matched) == (0, RANGES, True)
    assert asked == ["slots_digest"]  # no range digest asked for
    assert agent.scan().slots_digest_matched

    # A change: the one digest differs, the ranges are compared, the change is found.
    asked.clear()
    inventory.update_slot(1013, vacancies=1)
    changed = agent.scan()
    assert (changed.slots_digest_matched, changed.ranges_read, changed.notifies) == (False, 1, 1)
    assert asked == ["slots_digest", "range_digests"]
    # That pass wrote the store: the next compares ranges again, the one after needs one row.
    asked.clear()
    assert not agent.scan().slots_digest_matched
    assert agent.scan().slots_digest_matched
    assert asked == ["range_digests", "slots_digest"]

    # A deletion and an addition that leave the count alone are a change all the same.
    inventory.delete_slot(1005)
    inventory.add_slot(2030, "1-b", at(first_day(), 10), capacity=10, vacancies=10)
    swapped = agent.scan()
    assert (swapped.slots_digest_matched, swapped.slots_removed, swapped.slots_added) == (
        False,
        1,
        1,
    )
    assert _stored(agent) == _truth(agent)


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_without_a_change_query_the_daemon_loads_the_digests_a_pass_wrote_before_the_next(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every poll is a full pass: once a pass that wrote the store has queued what it found,
    the stored digests are loaded for the next, which compares at once and loads nothing
    itself; what it compares with is what the store holds. A one-off scan loads nothing
    ahead."""
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    agent, inventory = setup.agent, setup.inventory
    builds: list[str] = []
    where = ["ahead"]
    real_scan = agent.scanner.scan

    def scan(**kwargs: Any) -> Any:
        where[0] = "in a pass"
        try:
            return real_scan(**kwargs)
        finally:
            where[0] = "ahead"

    real_of, real_replaced = StoredDigests.of, StoredDigests.replaced

    def of(cls: type[StoredDigests], triples: Any) -> StoredDigests:
        builds.append(where[0])
        return real_of(triples)

    def replaced(self: StoredDigests, *args: Any) -> StoredDigests:
        builds.append(where[0])  # brought up to date after this process's writes
        return real_replaced(self, *args)

    monkeypatch.setattr(agent.scanner, "scan", scan)
    monkeypatch.setattr(StoredDigests, "of", classmethod(of))
    monkeypatch.setattr(StoredDigests, "replaced", replaced)

    quiet = agent.poll()
    assert quiet is not None
    assert (quiet.kind, quiet.ranges_read) == ("full", 0)
    assert builds == ["in a pass"]  # nothing loaded yet; that pass wrote no digest
    for n, slot_id in enumerate((1013, 2007, 1013)):
        inventory.update_slot(slot_id, vacancies=n + 1)
        report = agent.poll()
        assert report is not None
        assert (report.ranges_read, report.notifies) == (1, 1)
        # The pass found its slot with the digests loaded ahead (none built in the pass),
        # wrote, and the next pass's were loaded once it had queued its notify.
        assert builds == ["in a pass", *["ahead"] * (n + 1)]
        ahead = agent.store.fingerprints.ranges.load()
        fresh = StoredRanges(agent.store.connector).load()
        assert builds.pop() == "ahead"  # that one, built here to compare with
        assert (ahead.ranges, ahead.options) == (fresh.ranges, fresh.options)
    assert _stored(agent) == _truth(agent)

    inventory.update_slot(3001, vacancies=9)
    assert agent.scan().notifies == 1
    assert builds.count("ahead") == 3  # the scan command's pass loaded nothing ahead


@pytest.mark.postgres
def test_digests_that_cannot_be_loaded_ahead_leave_the_poll_done_and_say_so(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Loading ahead is a head start, not part of the pass: when it fails, the poll that
    found the change is still done and counted so, and the next pass loads them itself."""
    setup = _setup("postgresql", make_inventory, make_sandbox, make_agent, tmp_path)
    agent = setup.agent

    def fail() -> None:
        raise RuntimeError("the store went away at /var/lib/seyaha/state.db")

    monkeypatch.setattr(agent.scanner, "load_digests", fail)
    setup.inventory.update_slot(1013, vacancies=1)
    with caplog.at_level(logging.WARNING, logger="agent"):
        report = agent.poll()
    assert report is not None
    assert report.notifies == 1
    warned = [r.getMessage() for r in caplog.records if "loaded ahead" in r.getMessage()]
    assert len(warned) == 1
    assert "RuntimeError" in warned[0]
    assert "/var/lib" not in warned[0]  # the class only: a message may carry paths or URLs
    monkeypatch.undo()
    setup.inventory.update_slot(2007, vacancies=2)
    later = agent.poll()
    assert later is not None
    assert later.notifies == 1
    assert _stored(agent) == _truth(agent)


SHARED_OPTION_IDS = SLOTS_QUERY.replace("s.option_id,", "SUBSTR(s.option_id, 3) AS option_id,", 1)
"""Options "1-a", "1-b", "2-a" come back as "a", "b", "a": products 1 and 2 both have an
option "a", whose digest sums both products' rows."""


@pytest.mark.parametrize("query", [SLOTS_QUERY, SHARED_OPTION_IDS], ids=["ids", "shared-ids"])
@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_option_digests_first_narrow_a_pass_to_the_ranges_of_the_options_that_changed(
    backend: str,
    query: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A pass asks for every option's digest, then for the ranges of the options that differ
    only; an option emptied whole, an option new to the store and a product sharing an
    option's id must all still be found."""
    _options_first(monkeypatch, True)
    # An option emptied whole is a third of the ranges: still to be read by name.
    monkeypatch.setattr(ranges_module, "READ_MAX_FRACTION", 1.0)
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path, slots_query=query)
    agent, inventory = setup.agent, setup.inventory
    shared = query == SHARED_OPTION_IDS

    def spelled(option: str) -> str:
        return option[2:] if shared else option

    asked = _asked(agent, monkeypatch)

    quiet = agent.scan()
    assert (quiet.ranges_read, quiet.ranges_total, asked) == (0, RANGES, ["options"])

    # Right after a quiet pass (see _after_quiet).
    after_quiet = _after_quiet(backend, changed=True)
    asked.clear()
    inventory.update_slot(2013, vacancies=1)  # option 1-b
    changed = agent.scan()
    assert (changed.ranges_read, changed.slots_changed, changed.notifies) == (1, 1, 1)
    assert asked == [*after_quiet, ("ranges", [spelled("1-b")])]
    assert changed.ranges_total == RANGES

    # Option 2-a emptied whole; a slot of 1-a changed in a range that keeps its count.
    asked.clear()
    for slot_id in [s for s, option in setup.slots.items() if option == "2-a"]:
        inventory.delete_slot(slot_id)
    inventory.update_slot(1004, vacancies=3)
    emptied = agent.scan()
    assert (emptied.slots_removed, emptied.slots_changed) == (SLOTS_PER_OPTION, 1)
    assert asked == ["options", ("ranges", sorted({spelled("1-a"), spelled("2-a")}))]
    assert emptied.ranges_read == 11  # the ten ranges of 2-a, gone, and 1-a's "4"
    assert _stored(agent) == _truth(agent)

    # A new option, unknown to the store: its ranges are read, nothing else is.
    asked.clear()
    with inventory.engine.begin() as conn:
        conn.execute(sa.insert(inventory.options), [{"id": "2-c", "product_id": 2, "name": "c"}])
    for n in range(3):
        inventory.add_slot(3000 + n, "2-c", at(first_day(), 9 + n), capacity=10, vacancies=10)
    added = agent.scan()
    assert (added.slots_added, added.ranges_read) == (3, 3)
    assert asked == ["options", ("ranges", [spelled("2-c")])]
    assert _stored(agent) == _truth(agent)

    asked.clear()
    again = agent.scan()
    assert (again.ranges_read, again.messages, asked) == (0, 0, ["options"])

    # That pass found nothing and recorded the digest of every slot row: the next compares
    # it with the sum of the option digests on PostgreSQL (grouping by option takes it
    # about as long as the sum alone), and asks for the sum alone on MariaDB.
    asked.clear()
    quiet = agent.scan()
    assert (quiet.slots_digest_matched, quiet.ranges_read) == (True, 0)
    assert asked == _after_quiet(backend, changed=False)
    # A booking after a quiet pass: the option digests find it, asked for once.
    asked.clear()
    inventory.update_slot(2013, vacancies=2)
    booked = agent.scan()
    assert asked == [*after_quiet, ("ranges", [spelled("1-b")])]
    assert (booked.slots_digest_matched, booked.slots_changed, booked.notifies) == (False, 1, 1)
    assert _stored(agent) == _truth(agent)


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_whether_a_pass_compares_options_first_follows_the_store_at_every_pass(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each pass reads the stored option digests (seyaha_option_digests) before it asks the
    source for anything, and decides by them: once the store holds fewer than OPTIONS_MIN
    option ids, the next pass asks for every range's digest straight away, missing no
    change."""
    monkeypatch.setattr(ranges_module, "OPTIONS_MIN", len(OPTIONS))
    monkeypatch.setattr(ranges_module, "OPTIONS_READ_FRACTION", 1.0)
    monkeypatch.setattr(ranges_module, "READ_MAX_FRACTION", 1.0)
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    agent, inventory = setup.agent, setup.inventory
    stored = agent.store.fingerprints.ranges
    assert len(stored.option_digests().options) == len(OPTIONS)

    asked = _asked(agent, monkeypatch)

    for slot_id in [s for s, option in setup.slots.items() if option == "2-a"]:
        inventory.delete_slot(slot_id)
    emptied = agent.scan()  # three options stored: compared first
    assert asked == ["options", ("ranges", ["2-a"])]
    assert emptied.slots_removed == SLOTS_PER_OPTION
    by_option = stored.option_digests()
    assert (len(by_option.options), by_option.ranges) == (len(OPTIONS) - 1, RANGES - 10)

    asked.clear()
    inventory.update_slot(1004, vacancies=3)
    after = agent.scan()  # two options stored now: range digests straight away
    assert asked == [("ranges", None)]
    assert (after.slots_changed, after.ranges_read, after.notifies) == (1, 1, 1)
    assert _stored(agent) == _truth(agent)


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_a_full_scan_loads_digests_and_reads_stored_slots_in_threads_only_where_no_poll_runs(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A full scan (polls wait for it) loads the stored digests in a thread while the source
    computes its own, and reads the stored slots of the ranges it reads in another while
    the source finds their rows (agent/ahead.py); a reconciliation beside the polls does
    both in its own thread, so that they and the database's parallel workers do not take
    both cores from the polls (a wake-up's p99 during reconciliations went from 47 to
    109-217 ms at 1M slots with the load's thread). Both find the same change."""
    setup = _setup(
        backend,
        make_inventory,
        make_sandbox,
        make_agent,
        tmp_path,
        slots_changed_query=SLOTS_CHANGED_QUERY,
    )
    agent, inventory = setup.agent, setup.inventory
    ranges = agent.store.fingerprints.ranges
    threads: list[tuple[str, str]] = []
    real_load, real_iter_slots = ranges.load, ranges.iter_slots

    def load() -> StoredDigests:
        threads.append(("load", threading.current_thread().name))
        return real_load()

    def iter_slots(conn: Any, chosen: Any) -> Any:
        threads.append(("stored slots", threading.current_thread().name))
        yield from real_iter_slots(conn, chosen)

    monkeypatch.setattr(ranges, "load", load)
    monkeypatch.setattr(ranges, "iter_slots", iter_slots)
    inventory.update_slot(1013, vacancies=9)
    scanned = agent.scan()
    assert (scanned.kind, scanned.slots_changed, scanned.ranges_read) == ("full", 1, 1)
    assert [(what, name.split("_")[0]) for what, name in threads] == [
        ("load", "seyaha-digests"),
        ("stored slots", "seyaha-stored-slots"),
    ]

    threads.clear()
    _delivered(agent)
    inventory.update_slot(1014, vacancies=8, updated_at=cursor.since(inventory.clock(), 3600))
    here = threading.current_thread().name
    reconciled = agent.full_scan()  # beside the polls: baselined, with a change cursor
    assert reconciled is not None
    assert (reconciled.slots_changed, reconciled.ranges_read) == (1, 1)
    assert threads == [("load", here), ("stored slots", here)]
    assert _stored(agent) == _truth(agent)


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_a_source_lost_while_ranges_are_read_stops_the_stored_side_read_ahead(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stored side's thread ends with the pass that failed, and the next pass finds
    what that one did not record."""
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    agent, inventory = setup.agent, setup.inventory
    real_resuming = agent.reader.resuming_slots

    def lost_after_the_first_row(*args: Any, **kwargs: Any) -> Any:
        rows = real_resuming(*args, **kwargs)
        try:
            yield next(rows)
        finally:
            rows.close()
        raise QueryError("slots_query stopped part-way: the server closed the connection")

    monkeypatch.setattr(agent.reader, "resuming_slots", lost_after_the_first_row)
    inventory.update_slot(1015, vacancies=7)
    inventory.update_slot(3025, vacancies=6)
    with pytest.raises(QueryError, match="stopped part-way"):
        agent.scan()
    assert not [t for t in threading.enumerate() if t.name == "seyaha-stored-slots"]
    monkeypatch.setattr(agent.reader, "resuming_slots", real_resuming)
    after = agent.scan()
    assert (after.slots_changed, after.ranges_read) == (2, 2)
    assert _stored(agent) == _truth(agent)


@pytest.mark.postgres
def test_digests_are_computed_when_asked_for_not_when_their_first_row_is_read(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The database computes the option digests while the agent loads its own (Scanner._plan):
    the query runs at the call, so a query that fails while computing fails there."""
    failing = SLOTS_QUERY.replace(
        "s.vacancies, s.capacity",
        "s.vacancies, s.capacity / (s.vacancies - s.vacancies) AS capacity",
    )
    assert failing != SLOTS_QUERY
    setup = _setup("postgresql", make_inventory, make_sandbox, make_agent, tmp_path)
    reader = setup.agent.reader
    with reader.transaction() as conn:
        digests = reader.option_digests(conn)
        digests.close()  # dropped unread: the connection takes the next statement
        assert len(dict(reader.option_digests(conn))) == len(OPTIONS)
    monkeypatch.setattr(reader, "slots_query", failing)
    with reader.transaction() as conn, pytest.raises(QueryError, match="division by zero"):
        reader.option_digests(conn)


@pytest.mark.parametrize("options_first", FIRST)
@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_deleted_slots_and_a_range_emptied_whole_are_found_and_new_ranges_are_read(
    backend: str,
    options_first: bool,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _options_first(monkeypatch, options_first)
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    agent, inventory = setup.agent, setup.inventory
    inventory.delete_slot(1005)
    emptied = [2007, 2017, 2027]  # the whole range (1, 1-b, "7")
    for slot_id in emptied:
        inventory.delete_slot(slot_id)

    report = agent.scan()
    assert (report.ranges_read, report.slots_removed, report.notifies) == (2, 4, 4)
    ranges = _ranges(agent)
    assert _rng(setup, 2007) not in ranges  # forgotten: no slot, no row
    assert ranges[_rng(setup, 1005)].startswith("2:")  # two slots left, a digest of them

    # One slot in a range that has others, one in the range emptied above (new again).
    inventory.add_slot(2030, "1-b", at(first_day(), 10), capacity=10, vacancies=10)
    inventory.add_slot(2037, "1-b", at(first_day(), 11), capacity=10, vacancies=10)
    added = agent.scan()
    assert (added.ranges_read, added.slots_added, added.notifies) == (2, 2, 2)
    assert _stored(agent) == _truth(agent)
    assert agent.scan().ranges_read == 0


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_a_range_emptied_whole_in_a_pass_that_reads_every_range_is_forgotten(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    """Most ranges differ, so the pass reads every range instead of naming them; the range
    emptied among them must be forgotten all the same, or the next pass reads it again."""
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    agent, inventory = setup.agent, setup.inventory
    for slot_id in (1000, 1010, 1020):  # the whole range (1, 1-a, "0")
        inventory.delete_slot(slot_id)
    for slot_id in (1001, 1002, 1003, 1004, 1005, 1006, 1007):  # 8 ranges of 30 differ
        inventory.update_slot(slot_id, vacancies=1)

    report = agent.scan()
    assert report.ranges_read is None  # more than READ_MAX_FRACTION: every range read
    assert (report.slots_removed, report.slots_changed) == (3, 7)
    assert _rng(setup, 1000) not in _ranges(agent)
    assert _stored(agent) == _truth(agent)
    assert agent.scan().ranges_read == 0


@pytest.mark.parametrize("options_first", FIRST)
@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
@pytest.mark.parametrize("quiet_first", [False, True], ids=["straight", "after-quiet-passes"])
def test_a_change_a_poll_recorded_then_undone_unseen_is_found_by_the_next_reconciliation(
    backend: str,
    options_first: bool,
    quiet_first: bool,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The range's rows end up exactly as when its digest was stored, so the source's digest
    equals the stored one; but the store recorded the poll's state in between. Only the
    poll clearing the range's digest sends the reconciliation to read it again.
    `quiet_first`: quiet passes first recorded the digest of every slot row, which the
    source's equals again once the change is undone: the poll's write must void it."""
    _options_first(monkeypatch, options_first)
    setup = _setup(
        backend,
        make_inventory,
        make_sandbox,
        make_agent,
        tmp_path,
        slots_changed_query=SLOTS_CHANGED_QUERY,
        cursor_overlap=5,
    )
    agent, inventory = setup.agent, setup.inventory
    _delivered(agent)
    if quiet_first:
        for _ in range(2):
            assert agent.full_scan() is not None
        quiet = agent.full_scan()
        assert quiet is not None
        assert (quiet.slots_digest_matched, quiet.ranges_read) == (True, 0)
    inventory.update_slot(1013, vacancies=9)
    polled = agent.poll()
    assert polled is not None
    assert (polled.kind, polled.notifies) == ("incremental", 1)
    assert _ranges(agent)[_rng(setup, 1013)] == UNKNOWN
    # The poll's row had no hash: the slot it wrote keeps none, and is built when read.
    assert _row_hashes(agent)[("1", "1-a", "1013")] is None
    # Undone by a transaction the change cursor misses (stamped an hour back).
    inventory.update_slot(
        1013, vacancies=CAPACITY, updated_at=cursor.since(inventory.clock(), 3600)
    )
    missed = agent.poll()
    assert missed is not None
    assert missed.messages == 0

    report = agent.full_scan()
    assert report is not None
    assert (report.ranges_read, report.slots_changed, report.notifies) == (1, 1, 1)
    assert (report.slot_rows, report.slots_built) == (3, 1)
    assert not report.slots_digest_matched
    _delivered(agent)
    notified = _last_notify(setup.sandbox, 1013)
    assert notified is not None
    assert notified["vacancies"] == CAPACITY
    assert _stored(agent) == _truth(agent)


@pytest.mark.parametrize("options_first", FIRST)
@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_an_unreadable_row_keeps_its_range_read_and_reported_until_it_is_fixed(
    backend: str,
    options_first: bool,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _options_first(monkeypatch, options_first)
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    agent, inventory = setup.agent, setup.inventory
    inventory.update_slot(1021, vacancies=CAPACITY + 5)  # more seats left than the boat has

    for _ in range(2):
        report = agent.scan()
        assert (report.ranges_read, report.skipped_total, report.messages) == (1, 1, 0)
        assert [(r.key, r.reason) for r in report.skipped] == [
            ((1, "1-a", 1021), f"vacancies ({CAPACITY + 5}) exceed capacity ({CAPACITY})")
        ]
        assert _ranges(agent)[_rng(setup, 1021)] == UNKNOWN  # read again next time

    inventory.update_slot(1021, vacancies=7)
    fixed = agent.scan()
    assert (fixed.ranges_read, fixed.skipped_total, fixed.notifies) == (1, 0, 1)
    assert (fixed.slot_rows, fixed.slots_built) == (3, 1)
    assert agent.scan().ranges_read == 0
    assert _stored(agent) == _truth(agent)


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_stored_digests_are_dropped_when_the_slots_query_or_the_time_zone_changes(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    agent = setup.agent

    # The same rows by another query: digests of the old one prove nothing about it.
    # Nor do the row hashes kept with the slots: every row is built again.
    agent.reader.slots_query = SLOTS_QUERY + "\n-- now with a comment\n"
    requery = agent.scan()
    assert (requery.ranges_read, requery.messages) == (None, 0)
    assert requery.slots_built == requery.slot_rows == len(setup.slots)
    assert agent.scan().ranges_read == 0

    # The same rows in another zone: every start moves, every slot changes, though each
    # row's hash is what it was.
    agent.reader.timezone = ZoneInfo("UTC")
    rezoned = agent.scan()
    assert rezoned.ranges_read is None
    assert rezoned.slots_changed == rezoned.slots_built == len(setup.slots)
    assert agent.scan().ranges_read == 0
    assert _stored(agent) == _truth(agent)


MISSPELT_IDS = {
    "postgresql": SLOTS_QUERY.replace("s.id AS availability_id", "s.id || ' ' AS availability_id"),
    "mariadb": SLOTS_QUERY.replace(
        "s.id AS availability_id", "CONCAT(s.id, ' ') AS availability_id"
    ),
}


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_ids_the_database_spells_otherwise_turn_digests_off_and_every_slot_is_read(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The agent trims ids ("1013 " is slot 1013), the database does not: the database's
    range of a row and the agent's differ, so no range could be read alone safely."""
    caplog.set_level(logging.WARNING, logger="agent.scan")
    setup = _setup(
        backend,
        make_inventory,
        make_sandbox,
        make_agent,
        tmp_path,
        slots_query=MISSPELT_IDS[backend],
    )
    agent = setup.agent
    said = [r.getMessage() for r in caplog.records if getattr(r, "event", "") == "scan.ranges_off"]
    assert len(said) == 1
    assert "90 slot(s) have ids the source database spells otherwise" in said[0]
    assert _ranges(agent) == {}

    setup.inventory.update_slot(1013, vacancies=1)
    report = agent.scan()
    assert (report.ranges_read, report.slot_rows, report.notifies) == (None, len(setup.slots), 1)
    assert _stored(agent) == _truth(agent)


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_a_slot_whose_start_passed_in_a_range_nobody_reads_is_forgotten(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    agent = setup.agent
    # Aged in the store, as if its start had passed since the last reconciliation.
    table = sa.table("seyaha_slots", sa.column("availability_id"), sa.column("start_ms"))
    with agent.store.engine.begin() as conn:
        conn.execute(sa.update(table).where(table.c.availability_id == "1004").values(start_ms=1))

    report = agent.scan()
    assert (report.ranges_read, report.slots_expired, report.messages) == (0, 1, 0)
    assert ("1", "1-a", "1004") not in _stored(agent)


@pytest.mark.parametrize("options_first", FIRST)
@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
@pytest.mark.parametrize("hashes", [True, False], ids=["row-hashes", "no-row-hashes"])
def test_a_booking_a_poll_records_while_its_range_is_read_keeps_the_range_to_be_read_again(
    backend: str,
    options_first: bool,
    hashes: bool,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The reconciliation reads range (1, 1-a, "3") at its snapshot; a poll records a newer
    state of 1023 meanwhile. The range's digest must not be stored (the store holds a state
    newer than the rows it was computed over), and the poll's state must stand. Without
    `hashes` (a store from before schema 5), the reconciliation builds 1013 and 1023 and
    records the hash of their rows; 1023's must not land on the poll's state."""
    _options_first(monkeypatch, options_first)
    setup = _setup(
        backend,
        make_inventory,
        make_sandbox,
        make_agent,
        tmp_path,
        slots_changed_query=SLOTS_CHANGED_QUERY,
        cursor_overlap=5,
    )
    agent, inventory = setup.agent, setup.inventory
    _delivered(agent)
    if not hashes:
        with agent.store.engine.begin() as conn:
            conn.execute(sa.text("UPDATE seyaha_slots SET row_hash = NULL"))
    stale = cursor.since(inventory.clock(), 3600)
    inventory.update_slot(1003, vacancies=30, updated_at=stale)  # missed by the polls
    paused = Paused(agent, "1003")
    stream_slots = agent.reader.stream_slots
    monkeypatch.setattr(agent.reader, "stream_slots", paused.stream)

    result: list[Any] = []
    reconciliation = threading.Thread(target=lambda: result.append(agent.full_scan()))
    reconciliation.start()
    assert paused.reached.wait(WAIT_S), "the reconciliation never read slot 1003"
    inventory.update_slot(1023, vacancies=2)
    polled = agent.poll()
    assert polled is not None
    assert polled.notifies == 1
    paused.resume.set()
    reconciliation.join(WAIT_S)
    assert not reconciliation.is_alive()
    report = result[0]
    assert (report.ranges_read, report.slots_changed) == (1, 1)  # 1003; 1023 was the poll's
    # 1003 changed; 1013 is built only where no hash was kept. 1023 depends on when the
    # stored side was read: ahead, while the source's first row was awaited (the paused
    # read), it is the state at the snapshot, unchanged; after the poll's turn, it is the
    # poll's, without a row hash: built too, and its older state dropped. Either way the
    # poll's state stands (below).
    assert report.slots_built in ((1, 2) if hashes else (3,))
    assert _ranges(agent)[_rng(setup, 1023)] == UNKNOWN
    kept = _row_hashes(agent)
    assert kept[("1", "1-a", "1023")] is None  # the poll's row had none
    assert kept[("1", "1-a", "1003")] is not None
    assert kept[("1", "1-a", "1013")] is not None
    _delivered(agent)
    assert [_last_notify(setup.sandbox, n)["vacancies"] for n in (1003, 1023)] == [30, 2]  # type: ignore[index]
    assert _stored(agent) == _truth(agent)

    monkeypatch.setattr(agent.reader, "stream_slots", stream_slots)
    next_time = agent.full_scan()
    assert next_time is not None
    assert (next_time.ranges_read, next_time.messages) == (1, 0)
    assert agent.full_scan().ranges_read == 0  # type: ignore[union-attr]


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("book"), st.integers(0, 89), st.integers(0, CAPACITY)),
        st.tuples(st.just("close"), st.integers(0, 89), st.just(0)),
        st.tuples(st.just("delete"), st.integers(0, 89), st.just(0)),
        st.tuples(st.just("add"), st.integers(0, 89), st.integers(0, CAPACITY)),
    ),
    max_size=12,
)


@pytest.mark.parametrize("options_first", FIRST)
@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_after_any_changes_a_reconciliation_of_ranges_leaves_the_store_as_the_database_says(
    backend: str,
    options_first: bool,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Hypothesis writes bookings, closures, deletions and new slots (some undoing others,
    several in one range); after each batch one reconciliation of the differing ranges must
    leave exactly the database's slots in the store."""
    _options_first(monkeypatch, options_first)
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    agent, inventory = setup.agent, setup.inventory
    ids = sorted(setup.slots)

    # Derandomized: the examples share one database and store, so a failure depends on the
    # earlier examples' state and Hypothesis cannot replay or shrink it (FlakyFailure). A
    # random run once found a range emptied whole (1010 deleted earlier, then 1000 and 1020)
    # among more ranges than a pass names, kept by that pass; see
    # test_a_range_emptied_whole_in_a_pass_that_reads_every_range_is_forgotten.
    @settings(
        max_examples=12,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(OPERATIONS)
    def run(operations: list[tuple[str, int, int]]) -> None:
        with inventory.engine.begin() as conn:
            present = set(conn.execute(sa.select(inventory.slots.c.id)).scalars())
            for kind, n, value in operations:
                slot_id = ids[n]
                table = inventory.slots
                if kind == "add" and slot_id not in present:
                    conn.execute(
                        sa.insert(table).values(
                            id=slot_id,
                            option_id=setup.slots[slot_id],
                            starts_at=inventory.start_value(at(first_day(), 12)),
                            vacancies=value,
                            capacity=CAPACITY,
                        )
                    )
                    present.add(slot_id)
                elif kind == "delete" and slot_id in present:
                    conn.execute(sa.delete(table).where(table.c.id == slot_id))
                    present.discard(slot_id)
                elif kind == "book":
                    conn.execute(
                        sa.update(table).where(table.c.id == slot_id).values(vacancies=value)
                    )
                elif kind == "close":
                    conn.execute(
                        sa.update(table).where(table.c.id == slot_id).values(status="CLOSED")
                    )
        agent.scan()
        assert _stored(agent) == _truth(agent)
        assert agent.scan().ranges_read == 0

    run()


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_the_database_digest_of_a_range_is_the_sum_of_the_hashes_of_its_rows_as_read(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    """What the source's GROUP BY adds up and what the agent adds up from the rows it reads
    must agree to the last bit, NULLs and all: or every range would look changed."""
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    setup.inventory.update_slot(1001, status="CLOSED", vacancies=None, capacity=None)
    reader = setup.agent.reader
    tally = RangeTally()
    with reader.transaction() as conn:
        by_database = dict(reader.range_digests(conn))
        read = list(reader.stream_slots(conn, Snapshot(), tally=tally))
    assert len(read) == len(setup.slots)
    assert tally.mismatched == 0
    assert {label(rng): digest.text for rng, digest in tally.clean().items()} == by_database
    assert len(by_database) == RANGES


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_a_read_of_chosen_ranges_carried_on_after_a_key_returns_exactly_the_rest_of_them(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    """The query a resumed read of ranges runs (SourceReader.resuming_slots after a lost
    connection or read_transaction_max): both bounds at once, nothing else."""
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    reader = setup.agent.reader
    chosen = [("1", "1-a", "3"), ("1", "1-b", "0"), ("2", "2-a", "9")]
    with reader.transaction() as conn:
        rows = reader.stream_slots(
            conn, Snapshot(), after=("1", "1-a", "1013"), ranges=[label(r) for r in chosen]
        )
        keys = [key for key, _ in rows]
    assert keys == [
        ("1", "1-a", "1023"),
        ("1", "1-b", "2000"),
        ("1", "1-b", "2010"),
        ("1", "1-b", "2020"),
        ("2", "2-a", "3009"),
        ("2", "2-a", "3019"),
        ("2", "2-a", "3029"),
    ]


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_a_read_of_chosen_ranges_returns_none_of_another_products_option_of_the_same_id(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    """Reading chosen ranges narrows the rows by their product ids and by their option ids
    apart (conditions the database can answer from its indexes): with every product's
    option called "std", product 1's ids and product 2's cross over, and only the ranges'
    labels keep the rows of another product's range out."""
    shared = SLOTS_QUERY.replace("s.option_id,", "'std' AS option_id,", 1)
    setup = _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path, slots_query=shared)
    reader = setup.agent.reader
    chosen = [("1", "std", "3"), ("2", "std", "5")]
    with reader.transaction() as conn:
        keys = [
            key
            for key, _ in reader.stream_slots(conn, Snapshot(), ranges=[label(r) for r in chosen])
        ]
    expected = sorted(
        (str(OPTIONS[option]), "std", str(slot_id))
        for slot_id, option in setup.slots.items()
        if (OPTIONS[option], str(slot_id)[-1]) in {(1, "3"), (2, "5")}
    )
    assert keys == expected
    assert len(keys) == 3 * 2 + 3  # product 1 has two options: six slots end in 3


@pytest.mark.postgres
@pytest.mark.parametrize(("configured", "in_force"), [(None, "64MB"), (256, "256MB"), (0, None)])
def test_digests_are_asked_for_with_the_configured_work_mem_for_that_transaction_only(
    configured: int | None,
    in_force: str | None,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    """The digests' GROUP BY gets [source] digest_work_mem_mb (default 64) in its own
    transaction; the next transaction on the same connection has the server's again."""
    source = {} if configured is None else {"digest_work_mem_mb": configured}
    setup = _setup("postgresql", make_inventory, make_sandbox, make_agent, tmp_path, **source)
    reader = setup.agent.reader
    with reader.transaction() as conn:
        server = conn.exec_driver_sql("SHOW work_mem").scalar()
        assert len(dict(reader.range_digests(conn))) == RANGES
        assert conn.exec_driver_sql("SHOW work_mem").scalar() == (in_force or server)
        pid = conn.exec_driver_sql("SELECT pg_backend_pid()").scalar()
    with reader.transaction() as conn:
        assert conn.exec_driver_sql("SELECT pg_backend_pid()").scalar() == pid  # pooled
        assert conn.exec_driver_sql("SHOW work_mem").scalar() == server
    assert server == "4MB"  # the server's default: the setting above came from the agent


@pytest.mark.postgres
def test_a_full_scan_lets_postgresql_find_many_options_range_digests_with_parallel_workers(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Past PARALLEL_OPTIONS_MIN options, a full scan asks for their range digests with the
    planner's parallel settings at 0 for the rest of its transaction; with fewer, or beside
    the polls, as the server has them. Each finds the same changes."""
    _options_first(monkeypatch, True)
    monkeypatch.setattr(reader_module, "PARALLEL_OPTIONS_MIN", 2)
    setup = _setup(
        "postgresql",
        make_inventory,
        make_sandbox,
        make_agent,
        tmp_path,
        slots_changed_query=SLOTS_CHANGED_QUERY,
    )
    agent, inventory = setup.agent, setup.inventory
    seen: list[tuple[int, dict[str, str]]] = []
    real = agent.reader.range_digests

    def range_digests(conn: Any, options: Any = None, **kwargs: Any) -> Any:
        digests = real(conn, options, **kwargs)
        settings = {
            name: str(conn.exec_driver_sql(f"SHOW {name}").scalar()) for name in PARALLEL_SETTINGS
        }
        seen.append((len(options or ()), settings))
        return digests

    monkeypatch.setattr(agent.reader, "range_digests", range_digests)
    with agent.reader.transaction() as conn:
        server = {n: str(conn.exec_driver_sql(f"SHOW {n}").scalar()) for n in PARALLEL_SETTINGS}
    assert server["parallel_setup_cost"] == "1000"  # the server's own, not the agent's

    inventory.update_slot(1013, vacancies=9)  # option 1-a
    inventory.update_slot(3004, vacancies=8)  # option 2-a
    two = agent.scan()
    assert (two.slots_changed, two.ranges_read) == (2, 2)
    assert seen == [(2, dict.fromkeys(PARALLEL_SETTINGS, "0"))]

    seen.clear()
    inventory.update_slot(2005, vacancies=7)  # option 1-b alone
    one = agent.scan()
    assert one.slots_changed == 1
    assert seen == [(1, server)]

    seen.clear()
    _delivered(agent)
    missed = cursor.since(inventory.clock(), 3600)  # behind the polls' cursor
    inventory.update_slot(1016, vacancies=6, updated_at=missed)
    inventory.update_slot(3007, vacancies=5, updated_at=missed)
    beside = agent.full_scan()
    assert beside is not None
    assert (beside.slots_changed, beside.ranges_read) == (2, 2)
    assert seen == [(2, server)]
    with agent.reader.transaction() as conn:
        now = {n: str(conn.exec_driver_sql(f"SHOW {n}").scalar()) for n in PARALLEL_SETTINGS}
    assert now == server  # SET LOCAL: that transaction only
    assert _stored(agent) == _truth(agent)


@pytest.mark.postgres
def test_postgresql_digests_come_without_a_cursor_so_the_database_may_run_them_in_parallel(
    make_inventory: MakeInventory, make_sandbox: MakeSandbox, make_agent: MakeAgent, tmp_path: Path
) -> None:
    """PostgreSQL plans no parallel workers for a query behind a cursor (DECLARE): the
    digests of 1M slots took 2.7 s through one, 1.8 s without. While the digests are read,
    the session holds no cursor; the changed ranges' rows, many more, still come through one."""
    setup = _setup("postgresql", make_inventory, make_sandbox, make_agent, tmp_path)
    reader = setup.agent.reader
    cursors = "SELECT count(*) FROM pg_cursors"
    with reader.transaction() as conn:
        digests = reader.range_digests(conn)
        first = next(digests)
        assert conn.exec_driver_sql(cursors).scalar() == 0
        assert len({first[0], *dict(digests)}) == RANGES
        rows = reader.stream_slots(conn, Snapshot(), ranges=[first[0]])
        next(rows)
        assert conn.exec_driver_sql(cursors).scalar() == 1
        rows.close()


@pytest.mark.postgres
def test_a_column_postgresql_cannot_hash_by_value_is_hashed_by_the_rows_text(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """json has no hash function: hash_record_extended fails on it, so the agent hashes
    the row's text instead (and says so once); digests work the same."""
    caplog.set_level(logging.INFO, logger="agent.scan")
    with_json = SLOTS_QUERY.replace(
        "s.capacity\n", "s.capacity, json_build_object('seats', s.capacity) AS extra\n"
    )
    assert with_json != SLOTS_QUERY
    setup = _setup(
        "postgresql", make_inventory, make_sandbox, make_agent, tmp_path, slots_query=with_json
    )
    agent = setup.agent
    said = [r for r in caplog.records if getattr(r, "event", "") == "scan.row_hash_text"]
    assert len(said) == 1
    assert agent.scan().ranges_read == 0
    setup.inventory.update_slot(2014, capacity=50)  # the json column changes with it
    report = agent.scan()
    assert (report.ranges_read, report.slots_changed) == (1, 1)
    assert _stored(agent) == _truth(agent)


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_an_unchanged_catalog_is_not_read_and_a_changed_one_is(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    setup = _setup(
        backend,
        make_inventory,
        make_sandbox,
        make_agent,
        tmp_path,
        slots_changed_query=SLOTS_CHANGED_QUERY,
        cursor_overlap=5,
    )
    agent, inventory = setup.agent, setup.inventory
    quiet = agent.scan()
    assert (quiet.catalog_rows, quiet.messages) == (0, 0)

    inventory.set_price(2, 3500)
    priced = agent.scan()
    assert (priced.catalog_rows, len(priced.catalog.changed), priced.triggers) == (3, 1, 1)
    assert agent.scan().catalog_rows == 0

    # A poll that meets a slot of an option the store does not know reads the catalog and
    # records it: the stored catalog is no longer the one the digest was taken of.
    inventory.add_product(3, "Pass", 9900, {"3-a": "Pass"})
    inventory.add_slot(4001, "3-a", at(first_day(), 10), capacity=None, vacancies=None)
    polled = agent.poll()
    assert polled is not None
    assert (len(polled.catalog.added), polled.triggers) == (1, 1)
    assert agent.store.fingerprints.catalog_token() is None
    after = agent.scan()
    assert (after.catalog_rows, after.triggers) == (4, 0)  # read, and nothing new in it
    assert agent.scan().catalog_rows == 0


EXTRA_COLUMN = {"postgresql": '"odd `name"', "mariadb": "`odd ``name`"}
"""A column name with a space and a backtick, quoted each database's way."""


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_a_null_and_an_empty_text_hash_apart_whatever_the_columns_name(
    backend: str, make_inventory: MakeInventory, make_reader: Callable[..., SourceReader]
) -> None:
    inventory = make_inventory(backend)
    _fill(inventory)
    digests = []
    for value in ("NULL", "''", "'x'"):
        reader = make_reader(
            inventory.url,
            slots_query=SLOTS_QUERY.replace(
                "s.capacity\n", f"s.capacity, {value} AS {EXTRA_COLUMN[backend]}\n"
            ),
        )
        with reader.transaction() as conn:
            digests.append(dict(reader.range_digests(conn)))
    assert len(digests[0]) == RANGES
    for one, other in ((0, 1), (1, 2), (0, 2)):
        assert all(digests[one][name] != digests[other][name] for name in digests[one])


@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_check_times_the_digests_a_pass_without_a_change_query_asks_for(
    backend: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
) -> None:
    """`check` on a configuration of two queries only: what the database takes to digest
    the slots by range, by option id and as a whole, each counted from the source."""
    _setup(backend, make_inventory, make_sandbox, make_agent, tmp_path)
    out = io.StringIO()
    assert commands.check(tmp_path / "agent.toml", out=out) == 0, out.getvalue()
    text = out.getvalue()
    assert f"digests of its {RANGES} ranges take " in text
    assert f"of its {len(OPTIONS)} option ids " in text
    assert "of every row at once " in text
    assert "when slots changed since the last one" in text


@pytest.mark.parametrize("beside", [False, True], ids=["scan", "beside-the-polls"])
@pytest.mark.parametrize("backend", DIGEST_BACKENDS)
def test_a_pass_records_its_last_changes_with_the_digests_of_their_ranges_or_neither(
    backend: str,
    beside: bool,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The last changes a pass found and the digests of the ranges it read go in one store
    transaction (its writes then do not clear those digests first): a failure while
    storing the digests leaves the changes unrecorded too, and the next pass finds them."""
    setup = _setup(
        backend,
        make_inventory,
        make_sandbox,
        make_agent,
        tmp_path,
        slots_changed_query=SLOTS_CHANGED_QUERY,
    )
    agent, inventory = setup.agent, setup.inventory
    _delivered(agent)
    before, ranges_before = _stored(agent), _ranges(agent)
    # Stamped long ago: only a reconciliation finds it, not a poll's cursor.
    inventory.update_slot(1013, vacancies=9, updated_at=cursor.since(inventory.clock(), 3600))
    real_record = StoredRanges.record

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise sa.exc.OperationalError("INSERT INTO seyaha_ranges", {}, Exception("disk I/O error"))

    def reconcile() -> Any:
        return agent.full_scan() if beside else agent.scan()

    monkeypatch.setattr(StoredRanges, "record", staticmethod(failing))
    with pytest.raises(sa.exc.OperationalError, match="disk I/O error"):
        reconcile()
    assert _stored(agent) == before  # the booking's fingerprint was not recorded either
    assert _ranges(agent) == ranges_before
    assert agent.store.admin.entries() == []  # nor its notify

    monkeypatch.setattr(StoredRanges, "record", staticmethod(real_record))
    report = reconcile()
    assert report is not None
    assert (report.ranges_read, report.slots_changed, report.notifies) == (1, 1, 1)
    assert _stored(agent) == _truth(agent)
    assert _ranges(agent)[_rng(setup, 1013)] != UNKNOWN  # its digest stored, with the change
    again = reconcile()
    assert again is not None
    assert again.ranges_read == 0
