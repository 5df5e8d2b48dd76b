"""The pure side of range digests: which ranges a full pass reads, and what it may store."""

from __future__ import annotations

from array import array
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.ranges import (
    OPTIONS_MIN,
    READ_MAX,
    UNKNOWN,
    Difference,
    DigestSum,
    DigestTable,
    RangeDigest,
    RangeKey,
    RangeTally,
    StoredDigests,
    basis,
    compares_options_first,
    differing,
    label,
    options_to_compare,
    parse_label,
    range_of,
    row_salt,
    to_read,
)

A: RangeKey = ("1", "sunset", "1")
B: RangeKey = ("1", "sunset", "2")
C: RangeKey = ("2", "guided", "1")


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        (("1", "sunset", "101"), ("1", "sunset", "1")),
        (("1", "sunset", "7"), ("1", "sunset", "7")),
        (("p", "o", "slot-é"), ("p", "o", "é")),
        (("p", "o", "🎉"), ("p", "o", "🎉")),
    ],
)
def test_a_slot_belongs_to_the_range_of_its_ids_last_character(
    key: tuple[str, str, str], expected: RangeKey
) -> None:
    assert range_of(key) == expected


@given(st.tuples(*(st.text(alphabet=st.characters(min_codepoint=32), min_size=1),) * 3))
def test_a_label_reads_back_as_its_range(rng: tuple[str, str, str]) -> None:
    assert parse_label(label(rng)) == rng


@pytest.mark.parametrize("text", [None, "1\x1fsunset", "1\x1fsun\x1fset\x1f1"])
def test_a_label_that_cannot_be_split_back_names_no_range(text: str | None) -> None:
    assert parse_label(text) is None


@given(
    st.lists(st.tuples(st.text(max_size=3), st.text(max_size=3), st.text(max_size=1)), max_size=8)
)
def test_labels_sort_as_their_ranges_do(ranges: list[tuple[str, str, str]]) -> None:
    # the database orders labels, the agent ranges: the same order, or a merge would break
    printable = [r for r in ranges if all(c > "\x1f" for part in r for c in part)]
    assert sorted(printable) == sorted(printable, key=label)


def test_every_part_of_the_basis_matters_but_surrounding_whitespace() -> None:
    first = basis("SELECT 1", "Europe/Istanbul", "postgresql")
    assert basis("  SELECT 1\n", "Europe/Istanbul", "postgresql") == first
    assert basis("SELECT 2", "Europe/Istanbul", "postgresql") != first
    assert basis("SELECT 1", "UTC", "postgresql") != first
    assert basis("SELECT 1", "Europe/Istanbul", "mysql") != first


D1, D2 = RangeDigest(3, 100).text, RangeDigest(3, 101).text
LA, LB, LC = label(A), label(B), label(C)


@pytest.mark.parametrize(
    ("source", "stored", "expected"),
    [
        ({LA: D1}, {LA: D1}, set()),
        ({LA: D1}, {LA: D2}, {LA}),  # a row changed
        ({LA: D1}, {LA: RangeDigest(4, 100).text}, {LA}),  # same sum, another count
        ({LA: D1}, {LA: UNKNOWN}, {LA}),  # written since its digest was stored
        ({LA: D1}, {}, {LA}),  # new in the source
        ({}, {LA: D1}, {LA}),  # gone from the source: its slots were deleted
        ({}, {LA: UNKNOWN}, {LA}),
        ({LA: D1, LB: D1}, {LA: D1, LB: D1, LC: UNKNOWN}, {LC}),
    ],
)
def test_the_ranges_that_differ(
    source: dict[str, str], stored: dict[str, str], expected: set[str]
) -> None:
    difference = _differing(source, stored)
    assert difference.labels == expected
    assert difference.count == len(expected)
    assert (difference.source_ranges, difference.stored_ranges) == (len(source), len(stored))


def _differing(
    source: dict[str, str], stored: dict[str, str], keep: int | None = None
) -> Difference:
    return differing(
        iter(source.items()), DigestTable.of(stored.items()), lambda: iter(stored), keep=keep
    )


_labels = st.sampled_from([label(("p", f"o{i}", "1")) for i in range(12)])
_texts = st.sampled_from([UNKNOWN, D1, D2, RangeDigest(4, 100).text])


@given(
    st.dictionaries(_labels, _texts.filter(bool)),
    st.dictionaries(_labels, _texts),
    st.integers(min_value=0, max_value=13),
)
def test_the_compact_table_finds_what_two_dictionaries_would(
    source: dict[str, str], stored: dict[str, str], keep: int
) -> None:
    expected = {n for n in source.keys() | stored.keys() if source.get(n) != stored.get(n)}
    expected |= {n for n, text in stored.items() if text == UNKNOWN}
    difference = _differing(source, stored, keep)
    assert difference.count == len(expected)
    assert difference.labels <= expected
    # Every one is named while they fit in `keep`; past it a pass reads every range anyway.
    assert difference.truncated == (len(expected) > keep)
    if len(expected) <= keep:
        assert difference.labels == expected


_scoped_labels = st.sampled_from([label(("p", f"o{i % 3}", str(i))) for i in range(12)])


@given(
    st.dictionaries(_scoped_labels, _texts.filter(bool)),
    st.dictionaries(_scoped_labels, _texts),
    st.sets(st.sampled_from(["o0", "o1", "o2"])),
)
def test_compared_within_some_options_only_those_options_ranges_differ(
    source: dict[str, str], stored: dict[str, str], options: set[str]
) -> None:
    """The source names the ranges of `options` only (the ones whose option digest
    differed): a stored range of those it does not name is gone, one of another option is
    not compared at all."""

    def within(digests: dict[str, str]) -> dict[str, str]:
        return {n: t for n, t in digests.items() if n.split("\x1f")[1] in options}

    asked, kept = within(source), within(stored)
    expected = {n for n in asked.keys() | kept.keys() if asked.get(n) != kept.get(n)}
    expected |= {n for n, text in kept.items() if text == UNKNOWN}
    difference = differing(
        iter(asked.items()), DigestTable.of(stored.items()), lambda: iter(kept), scoped=True
    )
    assert (difference.labels, difference.count) == (expected, len(expected))
    assert difference.stored_ranges == len(stored)
    assert difference.source_ranges == len(stored) - len(kept) + len(asked)


def test_option_sums_add_up_each_options_ranges_and_are_unknown_while_one_is() -> None:
    stored = StoredDigests.of(
        [
            (LA, "sunset", RangeDigest(3, 100).text),
            (LB, "sunset", RangeDigest(2, -7).text),
            (LC, "guided", UNKNOWN),
            (label(("2", "sunset", "9")), "sunset", RangeDigest(1, 1).text),  # same id
        ]
    )
    other_product = label(("2", "sunset", "9"))
    assert stored.ranges == DigestTable.of(
        [
            (LA, RangeDigest(3, 100).text),
            (LB, RangeDigest(2, -7).text),
            (LC, UNKNOWN),
            (other_product, RangeDigest(1, 1).text),
        ]
    )
    assert stored.options == DigestTable.of([("sunset", "6:94"), ("guided", UNKNOWN)])


def test_options_are_compared_first_with_enough_of_them_each_holding_several_ranges() -> None:
    assert compares_options_first(OPTIONS_MIN, OPTIONS_MIN * 10)
    assert not compares_options_first(OPTIONS_MIN - 1, (OPTIONS_MIN - 1) * 10)  # "std" for all
    assert not compares_options_first(OPTIONS_MIN * 2, OPTIONS_MIN * 4)  # two ranges an option
    # Past a fifth of the options differing, every range's digest is asked for instead.
    assert options_to_compare(Difference({"o1", "o0"}, 2, 100, 100)) == ["o0", "o1"]
    assert options_to_compare(Difference(set(), 0, 100, 100)) == []
    assert options_to_compare(Difference(set(range(21)), 21, 100, 100)) is None  # type: ignore[arg-type]
    assert options_to_compare(Difference({"o1"}, 5, 100, 100)) is None  # truncated


def test_the_stored_labels_are_read_only_for_ranges_the_source_no_longer_has() -> None:
    reads: list[int] = []

    def labels(stored: dict[str, str]) -> Iterator[str]:
        reads.append(1)
        return iter(stored)

    stored = {LA: D1, LB: D1}
    same = differing(iter(stored.items()), DigestTable.of(stored.items()), lambda: labels(stored))
    changed = differing(
        iter({LA: D2, LB: D1}.items()), DigestTable.of(stored.items()), lambda: labels(stored)
    )
    assert (same.labels, changed.labels, reads) == (set(), {LA}, [])
    gone = differing(iter({LA: D1}.items()), DigestTable.of(stored.items()), lambda: labels(stored))
    assert (gone.labels, reads) == ({LB}, [1])
    # Too many gone to name: the pass reads every range, the labels are not read.
    many = _many(30)
    table = DigestTable.of(many.items())
    cut = differing(iter(()), table, lambda: labels(many), keep=20)
    assert (cut.count, cut.truncated, reads) == (30, True, [1])
    assert to_read(cut) is None


def test_a_table_holds_two_hashes_a_range_and_a_bucket_start_per_range_or_two() -> None:
    many = _many(1000)
    table = DigestTable.of(many.items())
    assert len(table) == 1000
    assert table.labels.itemsize == table.digests.itemsize == 8
    assert (len(table.starts), table.starts.itemsize) == (1024 + 1, 4)
    held = sum(a.itemsize * len(a) for a in (table.labels, table.digests, table.starts))
    assert held / len(table) < 24  # bytes a range; a dictionary of the strings took ~200
    # Every range sits in the bucket its label's hash names.
    for name, text in many.items():
        bucket = (hash(name) + 2**63) >> table.shift
        at = table.labels.index(hash(name))
        assert table.starts[bucket] <= at < table.starts[bucket + 1]
        assert table.digests[at] == hash(text)


def test_a_digest_text_tells_rows_and_sum_apart() -> None:
    assert RangeDigest(12, 3).text != RangeDigest(1, 23).text
    assert RangeDigest(3, -(2**63) * 3).text == f"3:{-(2**63) * 3}"


def _many(n: int) -> dict[str, str]:
    return {label(("p", f"o{i:05d}", "1")): D1 for i in range(n)}


@pytest.mark.parametrize(
    ("changed", "of", "expected"),
    [
        (0, 100, 0),
        (25, 100, 25),  # a quarter: still read one by one
        (26, 100, None),  # more: every range, in one pass
        (1, 1, None),  # a one-range inventory is read whole
    ],
)
def test_past_a_quarter_of_the_ranges_changed_every_range_is_read(
    changed: int, of: int, expected: int | None
) -> None:
    source = _many(of)
    stored = {name: (D2 if i < changed else D1) for i, name in enumerate(sorted(source))}
    chosen = to_read(_differing(source, stored))
    assert (None if chosen is None else len(chosen)) == expected
    if chosen is not None:
        assert chosen == sorted(chosen)
        assert all(parse_label(label(rng)) == rng for rng in chosen)


def test_more_ranges_than_one_query_can_name_are_read_whole() -> None:
    source = _many(READ_MAX * 5)
    stored = {name: (D2 if i <= READ_MAX else D1) for i, name in enumerate(sorted(source))}
    assert to_read(_differing(source, stored)) is None


def test_a_label_that_names_no_range_is_never_read_alone() -> None:
    source = {LA: D2, "no separator": D1}  # a NULL id on the database's side
    assert to_read(_differing(source | _many(20), _many(20) | {LA: D1})) == [A]


def test_a_tally_adds_the_rows_of_each_range_as_the_database_does() -> None:
    tally = RangeTally()
    tally.add(("1", "sunset", "101"), 5, "1\x1fsunset\x1f1")
    tally.add(("1", "sunset", "111"), -7, b"1\x1fsunset\x1f1")  # MySQL: a binary label
    tally.add(("1", "sunset", "102"), 2**64 - 1, "1\x1fsunset\x1f2")  # unsigned, MySQL
    assert tally.clean() == {A: RangeDigest(2, -2), B: RangeDigest(1, 2**64 - 1)}
    assert tally.mismatched == 0


def test_a_row_the_database_ranges_otherwise_spoils_its_range_and_is_counted() -> None:
    tally = RangeTally()
    tally.add(("1", "sunset", "101"), 5, "1\x1fsunset\x1f1 ")  # the database kept a space
    tally.add(("1", "sunset", "111"), 5, "1\x1fsunset\x1f1")
    assert tally.mismatched == 1
    assert tally.clean() == {}


def test_unreadable_duplicated_or_touched_rows_keep_their_range_from_being_stored() -> None:
    tally = RangeTally()
    tally.add(("1", "sunset", "101"), 5, label(A))
    tally.add(("1", "sunset", "102"), 5, label(B))
    tally.add(("2", "guided", "201"), 5, label(C))
    tally.add(("2", "guided", "211"), None, label(C))  # no hash: cannot be summed
    tally.spoil(("1", "sunset", "112"))  # an unreadable row of B
    assert tally.clean() == {A: RangeDigest(1, 5)}
    assert tally.clean(touched=[("1", "sunset", "131")]) == {}


def test_of_the_ranges_a_pass_was_to_read_those_without_any_row_are_gone() -> None:
    tally = RangeTally()
    tally.add(("1", "sunset", "101"), 5, label(A))
    tally.spoil(("2", "guided", "201"))
    assert tally.gone([A, B, C]) == [B]  # C has a row the pass could not read: not gone


def _colliding(entries: list[tuple[str, str]]) -> DigestTable:
    """A table whose every label shares the hash of the first one (no two real labels do)."""
    shared = hash(entries[0][0])
    shift = 63
    bucket = (shared + 2**63) >> shift
    starts = array("I", [0, 0, 0])
    starts[bucket + 1 :] = array("I", [len(entries)] * (2 - bucket))
    return DigestTable(
        array("q", [shared] * len(entries)),
        array("q", [hash(text) for _, text in entries]),
        starts,
        shift,
    )


def test_labels_sharing_a_hash_make_a_range_unchanged_only_if_its_digest_matches_too() -> None:
    # LA and another stored label with the same hash (called LB here), digests D1 and D2.
    stored = _colliding([(LA, D1), (LB, D2)])
    changed = differing(iter([(LA, RangeDigest(9, 9).text)]), stored, lambda: [LA, LB])
    assert (changed.labels, changed.count) == ({LA}, 1)
    # The limit of hashing (documented on DigestTable): with LA unchanged, the other range
    # passes for present whether or not the source still has it.
    assert differing(iter([(LA, D1)]), stored, lambda: [LA, LB]).count == 0


@given(st.lists(st.tuples(st.integers(0, 10**6), st.integers(-(2**70), 2**70)), max_size=20))
def test_the_ranges_digests_sum_to_the_digest_of_every_row(
    ranges: list[tuple[int, int]],
) -> None:
    summed = DigestSum()
    pairs = [(f"r{i}", RangeDigest(rows, total).text) for i, (rows, total) in enumerate(ranges)]
    assert list(summed.through(iter(pairs))) == pairs  # handed on untouched
    rows = sum(r for r, _ in ranges)
    assert summed.text == RangeDigest(rows, sum(t for _, t in ranges)).text


@given(
    st.lists(
        st.one_of(st.none(), st.tuples(st.integers(0, 10**6), st.integers(-(2**70), 2**70))),
        max_size=20,
    )
)
def test_stored_digests_sum_as_their_texts_do(stored: list[tuple[int, int] | None]) -> None:
    """add_stored takes a stored range's row count and sum (None: written since) as add
    takes its text ("rows:sum", UNKNOWN)."""
    by_parts, by_text = DigestSum(), DigestSum()
    for item in stored:
        if item is None:
            by_parts.add_stored(0, None)
            by_text.add(UNKNOWN)
        else:
            by_parts.add_stored(item[0], str(item[1]))
            by_text.add(RangeDigest(*item).text)
    assert by_parts.text == by_text.text
    assert (by_parts.text is None) == (None in stored)


def test_a_digest_that_does_not_read_as_numbers_leaves_no_sum() -> None:
    summed = DigestSum()
    list(summed.through(iter([(LA, D1), (LB, "3:not a number"), (LC, D2)])))
    assert summed.text is None


SIGNED_64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)


@given(SIGNED_64)
def test_a_row_hash_is_kept_as_a_signed_64_bit_integer_alike_from_either_database(
    value: int,
) -> None:
    tally = RangeTally(row_salt(basis("SELECT 1", "UTC", "postgresql/by-value")))
    kept = tally.row_hash(value)
    assert kept is not None
    assert -(2**63) <= kept < 2**63  # a BIGINT column holds it
    # MySQL gives the same 64 bits unsigned: the same row hash is kept
    assert tally.row_hash(value % 2**64) == kept
    assert tally.row_hash(str(value)) == kept  # a DECIMAL or text from the driver


@given(SIGNED_64)
def test_a_row_hash_kept_on_one_basis_never_matches_the_same_row_on_another(value: int) -> None:
    utc = RangeTally(row_salt(basis("SELECT 1", "UTC", "postgresql/by-value")))
    istanbul = RangeTally(row_salt(basis("SELECT 1", "Europe/Istanbul", "postgresql/by-value")))
    other_query = RangeTally(row_salt(basis("SELECT 2", "UTC", "postgresql/by-value")))
    assert utc.row_hash(value) != istanbul.row_hash(value)
    assert utc.row_hash(value) != other_query.row_hash(value)


def test_a_row_without_a_hash_has_none_to_keep() -> None:
    tally = RangeTally(row_salt(basis("SELECT 1", "UTC", "postgresql/by-value")))
    assert tally.row_hash(None) is None
    assert tally.row_hash("not a number") is None
