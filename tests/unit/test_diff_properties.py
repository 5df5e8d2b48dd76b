"""Properties of the streamed merge-join diff: for any stored state and any source result, in
key order or not, it gives the answer of the dictionary diff (diff_slots), the reference."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from agent.diff import (
    SourceItem,
    SourceSlot,
    Unconverted,
    collect_changes,
    diff_slots,
    iter_slot_changes,
    merge_slots,
)
from agent.model import Slot, SlotDiff, SlotKey, StoredSlot, slot_fingerprint
from agent.source.rows import format_local

NOW = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)

ids = st.sampled_from(
    ["", "a", "a ", "ab", "B", "z", "1", "10", "2", "é", "É", "ß", "İ", "Ω", "€", "𝔘"]
)
"""Ids where code-point order and a human collation disagree (B < a < é, "10" < "2")."""

keys = st.tuples(ids, ids, ids)

VERSIONS = list(itertools.product([48, 1, 0, -1, -48], [0, 1, 2]))
"""A slot's (start in hours from NOW, vacancies): 0 hours is exactly now, still in scope."""

UNREADABLE = "unreadable"

FATES = list(itertools.product([None, *VERSIONS], [None, UNREADABLE, *VERSIONS]))
"""What the store remembers of a key (nothing or a version) and what the source returns for
it (nothing, an unreadable row or a version): one draw per key keeps examples cheap."""


def make_slot(key: SlotKey, version: tuple[int, int]) -> Slot:
    hours, vacancies = version
    start = NOW + timedelta(hours=hours)
    return Slot(*key, format_local(start), start, "AVAILABLE", vacancies, 2)


def stored_of(item: Slot) -> StoredSlot:
    return StoredSlot(item.key, slot_fingerprint(item), item.local_date_time_start, item.start_utc)


@dataclass
class Snapshots:
    """The store's slots and the source's rows; an unreadable row is (key, None)."""

    stored: dict[SlotKey, StoredSlot]
    rows: list[SourceSlot]

    @property
    def readable(self) -> list[Slot]:
        return [item for _, item in self.rows if item is not None]

    @property
    def protected(self) -> set[SlotKey]:
        return {key for key, item in self.rows if item is None}

    def reference(self) -> SlotDiff:
        return diff_slots(self.stored, self.readable, NOW, self.protected)

    def in_key_order(self) -> list[SourceSlot]:
        return sorted(self.rows, key=lambda row: row[0])

    def in_store(self, wanted: list[SlotKey]) -> list[SlotKey]:
        return [key for key in wanted if key in self.stored]

    def merged(self, stream: list[SourceSlot]) -> SlotDiff:
        return merge_slots(
            [self.stored[key] for key in sorted(self.stored)], stream, NOW, self.in_store
        )


@st.composite
def snapshots(draw: st.DrawFn) -> Snapshots:
    """Keys in the store, the source, or both; stored starts past or ahead; rows equal to the
    stored slot, different from it, past, or unreadable."""
    fates = draw(st.dictionaries(keys, st.sampled_from(FATES), max_size=12))
    stored: dict[SlotKey, StoredSlot] = {}
    rows: list[SourceSlot] = []
    for key, (remembered, read) in fates.items():
        if remembered is not None:
            stored[key] = stored_of(make_slot(key, remembered))
        if read == UNREADABLE:
            rows.append((key, None))
        elif isinstance(read, tuple):
            rows.append((key, make_slot(key, read)))
    return Snapshots(stored, rows)


def outcome(diff: SlotDiff) -> tuple[object, ...]:
    """A SlotDiff as sorted multisets: the order of changes is not part of the promise, but
    a change reported twice is a wrong answer."""
    return (
        sorted((s.key, s.fingerprint) for s in diff.added),
        sorted((s.key, s.fingerprint) for s in diff.changed),
        sorted((s.key, s.fingerprint) for s in diff.removed),
        sorted(diff.expired),
    )


@given(snapshots())
def test_merging_a_key_ordered_source_gives_the_dictionary_diff(snap: Snapshots) -> None:
    assert outcome(snap.merged(snap.in_key_order())) == outcome(snap.reference())


@given(snap=snapshots(), data=st.data())
def test_merging_a_source_in_any_order_gives_the_dictionary_diff(
    snap: Snapshots, data: st.DataObject
) -> None:
    stream = data.draw(st.permutations(snap.rows), label="source order")
    assert outcome(snap.merged(stream)) == outcome(snap.reference())


@given(snap=snapshots(), data=st.data())
def test_a_resync_sees_every_readable_slot_ahead_exactly_once(
    snap: Snapshots, data: st.DataObject
) -> None:
    stream = data.draw(st.permutations(snap.rows), label="source order")
    expected = snap.reference()
    changes = list(
        iter_slot_changes(
            [snap.stored[key] for key in sorted(snap.stored)],
            stream,
            NOW,
            snap.in_store,
            include_unchanged=True,
        )
    )
    seen = Counter(value.key for kind, value in changes if kind in ("added", "changed", "same"))
    ahead = {item.key for item in snap.readable if item.start_utc >= NOW}
    assert seen == Counter(ahead)
    unchanged = ahead - {s.key for s in (*expected.added, *expected.changed)}
    assert {value.key for kind, value in changes if kind == "same"} == unchanged


# -- rows not built yet (Unconverted), told unchanged by the hash of their row ---------------

ROW_HASHES = {version: n for n, version in enumerate(VERSIONS)}
"""The hash of the row a version is built from: two rows of one hash build one slot, as the
source's row hash promises; an unreadable row has a hash of its own (-1)."""


@dataclass
class Hashed:
    """Snapshots whose stored slots may keep the hash of their row, and whose source rows
    come unbuilt; `built` counts the rows the merge built."""

    snap: Snapshots
    stored: list[StoredSlot]
    rows: list[SourceItem]
    built: list[SlotKey]


@st.composite
def hashed(draw: st.DrawFn) -> Hashed:
    snap = draw(snapshots())
    built: list[SlotKey] = []

    def build(row: tuple[SlotKey, tuple[int, int] | None], row_hash: int) -> Slot | None:
        key, version = row
        built.append(key)
        return None if version is None else replace(make_slot(key, version), source_hash=row_hash)

    stored = []
    for key in sorted(snap.stored):
        remembered = snap.stored[key]
        (version,) = [
            v for v in VERSIONS if make_slot(key, v).fingerprint == remembered.fingerprint
        ]
        keeps = draw(st.booleans(), label=f"the store keeps the row hash of {key}")
        row_hash = ROW_HASHES[version] if keeps else None
        stored.append(replace(remembered, row_hash=row_hash))
    rows: list[SourceItem] = []
    for key, item in snap.rows:
        read = (
            None
            if item is None
            else (round((item.start_utc - NOW) / timedelta(hours=1)), item.vacancies)
        )
        assert read is None or read in ROW_HASHES
        row_hash = -1 if read is None else ROW_HASHES[read]
        rows.append((key, Unconverted(row_hash, (key, read), build)))
    return Hashed(snap, stored, rows, built)


def test_the_hashes_stand_for_the_versions() -> None:
    # Two versions of a key build one fingerprint only when they are one version.
    prints = {make_slot(("p", "o", "a"), v).fingerprint: v for v in VERSIONS}
    assert len(prints) == len(VERSIONS)


@given(hashed())
def test_rows_not_built_yet_give_the_dictionary_diff_and_only_those_whose_hash_differs_are_built(
    h: Hashed,
) -> None:
    stream = sorted(h.rows, key=lambda row: row[0])
    diff = collect_changes(iter_slot_changes(h.stored, stream, NOW, h.snap.in_store))
    assert outcome(diff) == outcome(h.snap.reference())
    kept = {s.key: s.row_hash for s in h.stored}
    unbuilt = {
        key
        for key, item in stream
        if isinstance(item, Unconverted) and kept.get(key) == item.row_hash
    }
    assert set(h.built) == {key for key, _ in stream} - unbuilt
    assert len(h.built) == len(set(h.built))
    # Built, found unchanged and in scope, with no hash kept: the row's hash is recorded.
    stored = {s.key: s for s in h.stored}
    assert sorted((s.key, s.source_hash) for s in diff.rehashed) == sorted(
        (key, slot.source_hash)
        for key, slot in ((k, i.slot()) for k, i in stream if isinstance(i, Unconverted))
        if slot is not None and slot.start_utc >= NOW
        if key in stored
        and stored[key].row_hash is None
        and stored[key].fingerprint == slot.fingerprint
    )


@given(h=hashed(), data=st.data())
def test_rows_not_built_yet_in_any_order_give_the_dictionary_diff(
    h: Hashed, data: st.DataObject
) -> None:
    stream = data.draw(st.permutations(h.rows), label="source order")
    diff = collect_changes(iter_slot_changes(h.stored, stream, NOW, h.snap.in_store))
    assert outcome(diff) == outcome(h.snap.reference())


@given(h=hashed(), data=st.data())
def test_a_resync_builds_every_row_and_sees_every_readable_slot_ahead(
    h: Hashed, data: st.DataObject
) -> None:
    stream = data.draw(st.permutations(h.rows), label="source order")
    changes = list(
        iter_slot_changes(h.stored, stream, NOW, h.snap.in_store, include_unchanged=True)
    )
    seen = Counter(value.key for kind, value in changes if kind in ("added", "changed", "same"))
    assert seen == Counter(item.key for item in h.snap.readable if item.start_utc >= NOW)
    in_scope = {key for key, item in h.snap.rows if item is None or item.start_utc >= NOW}
    assert in_scope <= set(h.built)
