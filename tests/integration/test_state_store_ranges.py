"""The stored range digests, as a contract every state store backend keeps (SQLite,
PostgreSQL, MariaDB): every write of slots clears its ranges' digests in the same
transaction, and a range whose slots are stored always has a row."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.model import CatalogDiff, SlotDiff
from agent.ranges import (
    UNKNOWN,
    DigestTable,
    OptionDigests,
    RangeDigest,
    RangeKey,
    StoredDigests,
    label,
)
from agent.store import StateStore
from agent.store import ranges as ranges_module
from agent.store.ranges import RangesRecord, StoredRanges
from tests.integration.inventory import BACKEND_PARAMS, SERVER_PARAMS
from tests.integration.test_state_store import T0, later, slot

WAIT_S = 30.0
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


def test_slots_written_with_their_ranges_digests_keep_those_and_clear_the_others(
    store: StateStore,
) -> None:
    """A pass's last changes and the digests it computed for their ranges, in one
    transaction (commit_scan's `ranges`): the slots of ONE and TWO are written with ONE's new
    digest and TWO's marked to be read again; the slot of the third range, which the
    record does not name, clears that range's digest as any write does."""
    three = ("1", "a", "3")
    store.record_ranges({ONE: D, TWO: D, three: D}, basis="b1")
    ranges = store.fingerprints.ranges
    ranges.load()
    new = RangeDigest(1, 42)
    store.commit_scan(
        CatalogDiff(),
        SlotDiff(added=(slot(11), slot(12), slot(13))),
        [],
        T0,
        ranges=RangesRecord({ONE: new}, dirty=[TWO], basis="b2"),
    )
    assert loaded(store) == {ONE: new.text, TWO: UNKNOWN, three: UNKNOWN}
    assert ranges.basis() == "b2"
    assert set(store.fingerprints.load_slots()) == {slot(n).key for n in (11, 12, 13)}
    # The loaded digests follow both writes of that one transaction: the next load reads
    # the written options' ranges only, and finds what a whole read does.
    kept = ranges.load()
    assert ranges.last_load == "refreshed"
    assert kept == StoredRanges(store.connector).load()


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
    assert list(ranges.option_ids()) == ["a"]

    store.reset_ranges()
    assert len(ranges.load().ranges) == len(ranges.load().options) == 0


def test_the_option_digests_kept_beside_the_ranges_sum_them_after_every_write(
    store: StateStore,
) -> None:
    """seyaha_option_digests holds, per (product, option), the sum of its stored ranges'
    digests, exact past 64 bits, UNKNOWN while one of them is; per option id (every
    product's together) it equals what summing every stored range gives, after every kind
    of write: digests recorded, slots written, ranges gone, a whole option gone, a reset."""
    ranges = store.fingerprints.ranges
    three = ("2", "a", "3")  # another product's option of the same id
    other = ("1", "b", "1")

    def check() -> OptionDigests:
        by_option = ranges.option_digests()
        fresh = _fresh(store)
        assert by_option.options == fresh.options
        assert by_option.ranges == len(fresh.ranges)
        return by_option

    assert check().options == DigestTable.of([])
    store.record_ranges({ONE: D, TWO: D, three: D, other: RangeDigest(1, 5)}, basis="b1")
    assert check().options == DigestTable.of([("a", f"9:{3 * D.digest}"), ("b", "1:5")])

    store.commit_scan(CatalogDiff(), SlotDiff(added=(slot(11),)), [], T0)
    assert check().options == DigestTable.of([("a", UNKNOWN), ("b", "1:5")])

    store.record_ranges({ONE: RangeDigest(2, 7)})  # TWO and three kept their digests
    assert check().options == DigestTable.of([("a", f"8:{2 * D.digest + 7}"), ("b", "1:5")])

    store.record_ranges({}, gone=[other])  # option b's only range: the option goes
    store.record_ranges({}, dirty=[three], gone=[TWO])
    assert check().options == DigestTable.of([("a", UNKNOWN)])
    assert list(ranges.option_ids()) == ["a"]

    store.reset_ranges()
    assert check().ranges == 0
    assert list(ranges.option_ids()) == []


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


def _fresh(store: StateStore) -> StoredDigests:
    """The content a load reads from the store now, whatever this store's loads kept."""
    return StoredRanges(store.connector).load()


def test_a_load_after_this_stores_own_writes_reads_only_their_options(store: StateStore) -> None:
    """After writes from this store only, a load reads again the ranges of the option ids
    written (their sums with them), and gives what reading every range gives: written
    ranges, new ones, new options, ranges gone and whole options gone."""
    ranges = store.fingerprints.ranges
    other_product = ("2", "a", "3")  # option "a" of another product: summed with ONE's
    kept = ("5", "z", "1")  # an option no write below touches
    store.record_ranges({ONE: D, TWO: D, other_product: D, kept: D, ("6", "y", "1"): D}, basis="b1")
    ranges.load()
    assert ranges.last_load == "read"

    store.commit_scan(CatalogDiff(), SlotDiff(added=(slot(11),)), [], T0)  # ONE unknown
    store.record_ranges({TWO: RangeDigest(4, 7), ("7", "n", "1"): D}, gone=[("6", "y", "1")])
    content = ranges.load()
    assert ranges.last_load == "refreshed"
    assert content == _fresh(store)
    assert content.options == DigestTable.of([("a", UNKNOWN), ("z", D.text), ("n", D.text)])

    store.record_ranges({ONE: D})
    content = ranges.load()
    assert ranges.last_load == "refreshed"
    assert content == _fresh(store)
    assert ranges.load() is content
    assert ranges.last_load == "kept"


def test_another_writer_or_a_reset_makes_the_next_load_read_every_range(
    store: StateStore,
) -> None:
    ranges = store.fingerprints.ranges
    store.record_ranges({ONE: D, TWO: D, ("3", "b", "1"): D}, basis="b1")
    ranges.load()
    other = StateStore.from_url(store.engine.url.render_as_string(hide_password=False))
    try:
        other.record_ranges({("3", "b", "1"): RangeDigest(1, 1)})  # unseen by this store
        store.record_ranges({ONE: RangeDigest(2, 2)})  # this store's, after the other's
        content = ranges.load()
        assert ranges.last_load == "read"
        assert content == _fresh(store)

        store.record_ranges({TWO: RangeDigest(2, 2)})
        other.record_ranges({ONE: RangeDigest(3, 3)})  # after this store's, unseen
        content = ranges.load()
        assert ranges.last_load == "read"
        assert content == _fresh(store)
    finally:
        other.close()

    store.record_ranges({TWO: D})
    store.reset_ranges()
    assert len(ranges.load().ranges) == 0
    assert ranges.last_load == "read"


def test_too_many_ranges_written_since_a_load_make_the_next_read_every_range(
    store: StateStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ranges_module, "REFRESH_MIN_RANGES", 1)
    ranges = store.fingerprints.ranges
    many = {("1", "a", str(n)): D for n in range(10)}
    store.record_ranges(many, basis="b1")
    ranges.load()
    store.record_ranges({("1", "a", "0"): RangeDigest(1, 1)})  # 1 of 10: within the share
    store.record_ranges({("1", "a", "1"): RangeDigest(1, 1)})  # 2 of 10: past it
    content = ranges.load()
    assert ranges.last_load == "read"
    assert content == _fresh(store)


@pytest.mark.parametrize("backend", SERVER_PARAMS)
def test_a_write_that_meets_another_agents_concurrent_one_is_not_taken_for_a_follower(
    backend: str, make_store: Callable[[str], StateStore]
) -> None:
    """Two agents on one server store write the digests at once: this store's write reads
    the token before the other's commits, and then waits for it. The compare-and-set of the
    token finds the other's, so the next load reads every range (content that missed the
    other's write would compare a range it cleared with its old digest)."""
    store = make_store(backend)
    ranges = store.fingerprints.ranges
    store.record_ranges({ONE: D, TWO: D, ("3", "b", "1"): D}, basis="b1")
    ranges.load()
    other = StateStore.from_url(store.engine.url.render_as_string(hide_password=False))
    try:
        with other.connector.write() as held:
            # The other agent's write, not committed yet: it holds the token's row.
            StoredRanges.record(held, {("3", "b", "1"): RangeDigest(9, 9)})
            done: list[BaseException | None] = []

            def write() -> None:
                try:
                    store.record_ranges({ONE: RangeDigest(2, 2)})
                    done.append(None)
                except BaseException as exc:  # handed to the test below
                    done.append(exc)

            writer = threading.Thread(target=write)
            writer.start()
            writer.join(timeout=1.0)
            assert writer.is_alive()  # waiting for the other's row lock
        writer.join(timeout=30)
        assert done == [None]
    finally:
        other.close()
    content = ranges.load()
    assert ranges.last_load == "read"
    assert content == _fresh(store)
    assert dict(ranges.items())[label(("3", "b", "1"))] == "9:9"


_RANGE_KEYS = [(p, o, x) for p in ("1", "2") for o in ("a", "b", "c") for x in ("1", "2", "3")]


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    steps=st.lists(
        st.tuples(
            st.sampled_from(["touch", "record", "gone", "foreign", "load"]),
            st.lists(st.sampled_from(_RANGE_KEYS), min_size=1, max_size=4, unique=True),
        ),
        max_size=14,
    )
)
def test_a_load_always_gives_what_reading_every_range_gives(
    steps: list[tuple[str, list[RangeKey]]], tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Whatever this store and another writer do in whatever order (SQLite), every load
    gives the content a fresh read of the store gives, refreshed or read or kept, and the
    option digests kept beside the ranges sum what they hold."""
    folder = tmp_path_factory.mktemp("ranges")
    url = f"sqlite:///{folder / 'state.db'}"
    store, other = StateStore.from_url(url), StateStore.from_url(url)
    store.open()
    other.open()
    try:
        store.record_ranges({k: RangeDigest(1, n) for n, k in enumerate(_RANGE_KEYS)}, basis="b")
        store.fingerprints.ranges.load()
        for n, (kind, keys) in enumerate(steps):
            if kind == "touch":
                added = tuple(
                    replace(slot(1), product_id=p, option_id=o, availability_id=f"9{x}")
                    for p, o, x in keys
                )
                store.commit_scan(CatalogDiff(), SlotDiff(added=added), [], later(n))
            elif kind == "record":
                store.record_ranges({k: RangeDigest(2, n) for k in keys})
            elif kind == "gone":
                store.record_ranges({}, dirty=keys[:1], gone=keys[1:])
            elif kind == "foreign":
                other.record_ranges({k: RangeDigest(3, n) for k in keys})
            else:
                assert store.fingerprints.ranges.load() == _fresh(store)
                assert store.fingerprints.ranges.option_digests().options == _fresh(store).options
        assert store.fingerprints.ranges.load() == _fresh(store)
        assert other.fingerprints.ranges.option_digests() == OptionDigests(
            _fresh(store).options, len(_fresh(store).ranges)
        )
    finally:
        other.close()
        store.close()


def test_loads_racing_this_stores_own_writes_end_equal_to_a_fresh_read(
    make_store: Callable[[str], StateStore],
) -> None:
    """Polls write while a reconciliation loads: loads run in one thread while another
    writes (SQLite). None fails, each gives a table of the right size, and once the writes
    stop the next load equals what reading every range gives."""
    store = make_store("sqlite")
    ranges = store.fingerprints.ranges
    store.record_ranges({k: RangeDigest(1, n) for n, k in enumerate(_RANGE_KEYS)}, basis="b")
    ranges.load()
    stop = threading.Event()
    failures: list[BaseException] = []
    sizes: set[int] = set()

    def load() -> None:
        try:
            while not stop.is_set():
                sizes.add(len(ranges.load().ranges))
        except BaseException as exc:  # handed to the test below
            failures.append(exc)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        for n in range(200):
            key = _RANGE_KEYS[n % len(_RANGE_KEYS)]
            if n % 3 == 0:
                added = replace(slot(1), product_id=key[0], option_id=key[1])
                store.commit_scan(CatalogDiff(), SlotDiff(added=(added,)), [], later(n))
            else:
                store.record_ranges({key: RangeDigest(2, n)})
    finally:
        stop.set()
        loader.join(WAIT_S)
    assert failures == []
    assert sizes == {len(_RANGE_KEYS)}  # every write is of ranges that are there
    assert ranges.load() == _fresh(store)
