"""The stored range digests, as a contract every state store backend keeps (SQLite,
PostgreSQL, MariaDB): every write of slots clears its ranges' digests in the same
transaction, and a range whose slots are stored always has a row."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from agent.model import CatalogDiff, SlotDiff
from agent.ranges import UNKNOWN, DigestTable, RangeDigest, RangeKey, label
from agent.store import StateStore
from agent.store import ranges as ranges_module
from tests.integration.inventory import BACKEND_PARAMS
from tests.integration.test_state_store import T0, later, slot

ONE = ("1", "a", "1")
TWO = ("1", "a", "2")
D = RangeDigest(3, -(2**63) * 3)
"""Three of the most negative 64-bit hashes: the sum no 64-bit column could hold."""


def loaded(store: StateStore) -> dict[RangeKey, str]:
    return {
        tuple(name.split("\x1f")): text  # type: ignore[misc]
        for name, text in store.fingerprints.ranges.items().items()
    }


@pytest.fixture(params=BACKEND_PARAMS)
def store(request: pytest.FixtureRequest, make_store: Callable[[str], StateStore]) -> StateStore:
    return make_store(request.param)


def test_digests_round_trip_exactly_and_are_forgotten_with_their_basis(store: StateStore) -> None:
    ranges = store.fingerprints.ranges
    assert (ranges.items(), ranges.basis()) == ({}, None)

    store.record_ranges({ONE: D, TWO: RangeDigest(1, 2**64 - 1)}, basis="b1")
    assert ranges.items() == {label(ONE): D.text, label(TWO): f"1:{2**64 - 1}"}
    assert ranges.basis() == "b1"

    store.record_ranges({}, dirty=[TWO], gone=[ONE])
    assert ranges.items() == {label(TWO): UNKNOWN}

    store.reset_ranges()
    assert (ranges.items(), ranges.basis()) == ({}, None)


def test_every_write_of_slots_clears_its_ranges_digests_but_an_expiry(store: StateStore) -> None:
    store.record_ranges({ONE: D, TWO: D, ("1", "a", "3"): D}, basis="b1")
    store.commit_scan(CatalogDiff(), SlotDiff(added=(slot(11), slot(12))), [], T0)
    assert loaded(store) == {ONE: UNKNOWN, TWO: UNKNOWN, ("1", "a", "3"): D.text}

    store.record_ranges({ONE: D, TWO: D})
    store.commit_scan(CatalogDiff(), SlotDiff(changed=(slot(11, vacancies=1),)), [], later(1))
    store.commit_scan(CatalogDiff(), SlotDiff(expired=(slot(12).key,)), [], later(2))
    assert loaded(store) == {ONE: UNKNOWN, TWO: D.text, ("1", "a", "3"): D.text}

    stored_11 = store.fingerprints.lookup_slots([slot(11).key])[slot(11).key]
    store.record_ranges({ONE: D})
    store.commit_scan(CatalogDiff(), SlotDiff(removed=(stored_11,)), [], later(3))
    assert loaded(store)[ONE] == UNKNOWN  # a row stays: no slot, read it once


def test_the_slots_of_chosen_ranges_come_in_key_order(store: StateStore) -> None:
    numbers = [1, 2, 11, 12, 21, 101, 1001]
    store.commit_scan(CatalogDiff(), SlotDiff(added=tuple(slot(n) for n in numbers)), [], T0)
    with store.reading() as conn:
        chosen = [s.key[2] for s in store.fingerprints.ranges.iter_slots(conn, [TWO, ONE])]
    # code-point order of the ids, as the source returns them
    assert chosen == ["1", "1001", "101", "11", "12", "2", "21"]


def test_the_slots_of_ranges_of_many_options_come_whole_in_key_order_across_queries(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ranges of many options, read a few options per query (4 ranges a query here, 256 in
    use; a batch short of it repeats its last range): every slot of the chosen ranges, none
    of the others, all in key order."""
    monkeypatch.setattr(ranges_module, "_TERMS", 4)  # one option (3 ranges) a query
    options = [(str(p), o) for p in (1, 2, 10) for o in ("a", "b", "ab")]
    slots = [replace(slot(n), product_id=p, option_id=o) for p, o in options for n in range(1, 25)]
    store.commit_scan(CatalogDiff(), SlotDiff(added=tuple(slots)), [], T0)
    chosen = {(p, o, x) for p, o in options for x in ("1", "3", "4") if (p, o) != ("2", "b")}
    with store.reading() as conn:
        found = [s.key for s in store.fingerprints.ranges.iter_slots(conn, chosen)]
    expected = sorted(s.key for s in slots if (s.key[0], s.key[1], s.key[2][-1]) in chosen)
    assert found == expected
    assert len(found) == 8 * 9  # 8 options, 9 ids among 1-24 ending in 1, 3 or 4


def test_slots_past_their_start_are_forgotten_and_counted(store: StateStore) -> None:
    past = datetime(2026, 7, 1, 8, 0, tzinfo=UTC)
    store.commit_scan(
        CatalogDiff(), SlotDiff(added=(slot(1, start=past), slot(2), slot(3, start=past))), [], T0
    )
    assert store.fingerprints.expire(int(T0.timestamp() * 1000)) == 2
    assert list(store.fingerprints.load_slots()) == [slot(2).key]


def test_the_slots_of_a_range_are_told_apart_by_the_exact_last_character(
    store: StateStore,
) -> None:
    # SQLite's LIKE ignores ASCII case, and "%" and "_" are LIKE's own: none may leak in.
    ids = ["1a", "2A", "3_", "4%", "5b", "6a"]
    added = SlotDiff(added=tuple(replace(slot(1), availability_id=i) for i in ids))
    store.commit_scan(CatalogDiff(), added, [], T0)
    with store.reading() as conn:
        for suffix, expected in (("a", ["1a", "6a"]), ("_", ["3_"]), ("%", ["4%"])):
            found = [
                s.key[2] for s in store.fingerprints.ranges.iter_slots(conn, [("1", "a", suffix)])
            ]
            assert found == expected


def test_what_a_load_remembers_is_never_older_than_the_table(store: StateStore) -> None:
    """load() keeps the tables it built while no write happened since: a write from this
    store, or from another agent's connection to it, is seen at the next load. The option
    table sums the option's range digests, and is UNKNOWN while one of them is."""
    ranges = store.fingerprints.ranges
    three = ("2", "a", "3")  # another product's option of the same id: summed with ONE's
    store.record_ranges({ONE: D, TWO: D, three: D}, basis="b1")
    first = ranges.load()
    assert ranges.load() is first
    assert first.ranges == _table({ONE: D.text, TWO: D.text, three: D.text})
    assert first.options == DigestTable.of([("a", f"9:{3 * D.digest}")])

    store.commit_scan(CatalogDiff(), SlotDiff(added=(slot(11),)), [], T0)
    assert ranges.load().ranges == _table({ONE: UNKNOWN, TWO: D.text, three: D.text})
    assert ranges.load().options == DigestTable.of([("a", UNKNOWN)])

    other = StateStore.from_url(store.engine.url.render_as_string(hide_password=False))
    try:
        other.record_ranges({ONE: D}, gone=[TWO, three])
    finally:
        other.close()
    assert ranges.load().ranges == _table({ONE: D.text})
    assert ranges.load().options == DigestTable.of([("a", D.text)])
    assert list(ranges.labels()) == [label(ONE)]
    assert list(ranges.options()) == ["a"]
    assert list(ranges.labels(["a", "b"])) == [label(ONE)]
    assert list(ranges.labels(["b"])) == []

    store.reset_ranges()
    assert len(ranges.load().ranges) == len(ranges.load().options) == 0


def _table(digests: dict[RangeKey, str]) -> DigestTable:
    return DigestTable.of((label(rng), text) for rng, text in digests.items())


def test_a_slots_digest_is_recorded_and_worth_anything_only_while_nothing_writes(
    store: StateStore,
) -> None:
    ranges = store.fingerprints.ranges
    store.record_ranges({ONE: D}, basis="b1")
    written = ranges.written()
    assert written is not None
    assert ranges.total(written) is None  # none recorded yet
    assert store.record_slots_digest(written, "3:42")
    assert ranges.total(written) == "3:42"

    # A write of slots moves the token on: what was recorded says nothing any more, and a
    # pass that compared before that write cannot record its digest either.
    store.commit_scan(CatalogDiff(), SlotDiff(added=(slot(11),)), [], T0)
    assert ranges.written() != written
    assert ranges.total(written) is None
    assert ranges.total(ranges.written()) is None
    assert not store.record_slots_digest(written, "4:43")
    assert ranges.total(ranges.written()) is None

    store.reset_ranges()
    assert ranges.total(ranges.written()) is None
