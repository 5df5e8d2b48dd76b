"""merge_slots must give the answer of diff_slots, whatever the order of the source stream."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from agent.diff import diff_changed_slots, diff_slots, merge_slots
from agent.model import Slot, SlotDiff, SlotKey, StoredSlot, slot_fingerprint
from agent.source.rows import format_local

NOW = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)


def make_slot(key: SlotKey, vacancies: int, hours: float = 48) -> Slot:
    start = NOW + timedelta(hours=hours)
    return Slot(*key, format_local(start), start, "AVAILABLE", vacancies, 100)


def stored_of(item: Slot) -> StoredSlot:
    return StoredSlot(item.key, slot_fingerprint(item), item.local_date_time_start, item.start_utc)


def normalise(diff: SlotDiff) -> tuple[object, ...]:
    return (
        sorted(s.key for s in diff.added),
        sorted(s.key for s in diff.changed),
        sorted(s.key for s in diff.removed),
        sorted(diff.expired),
    )


def scenario(seed: int) -> tuple[dict[SlotKey, StoredSlot], list[Slot], set[SlotKey]]:
    rng = random.Random(seed)
    keys = [(f"p{rng.randint(1, 5)}", f"o{rng.randint(1, 3)}", str(n)) for n in range(60)]
    keys = sorted(set(keys))
    stored: dict[SlotKey, StoredSlot] = {}
    current: list[Slot] = []
    protected: set[SlotKey] = set()
    for key in keys:
        fate = rng.choice(["same", "changed", "removed", "added", "past", "expired", "protected"])
        base = make_slot(key, 10)
        if fate in ("same", "changed", "removed", "protected"):
            stored[key] = stored_of(base)
        if fate == "expired":
            stored[key] = stored_of(make_slot(key, 10, hours=-2))
        if fate == "same":
            current.append(base)
        elif fate == "changed":
            current.append(make_slot(key, 3))
        elif fate == "added":
            current.append(make_slot(key, 7))
        elif fate == "past":
            current.append(make_slot(key, 7, hours=-1))
        elif fate == "protected":
            protected.add(key)
    return stored, current, protected


def stream(current: list[Slot], protected: set[SlotKey]) -> list[tuple[SlotKey, Slot | None]]:
    items: list[tuple[SlotKey, Slot | None]] = [(s.key, s) for s in current]
    items += [(k, None) for k in protected]
    return sorted(items, key=lambda pair: pair[0])


@pytest.mark.parametrize("seed", range(25))
def test_merge_of_sorted_streams_equals_the_dictionary_diff(seed: int) -> None:
    stored, current, protected = scenario(seed)
    expected = diff_slots(stored, current, NOW, protected)
    merged = merge_slots(
        [stored[k] for k in sorted(stored)],
        stream(current, protected),
        NOW,
        in_store=lambda keys: [k for k in keys if k in stored],
    )
    assert normalise(merged) == normalise(expected)


@pytest.mark.parametrize("seed", range(25))
def test_merge_survives_a_source_that_sorts_differently(seed: int) -> None:
    stored, current, protected = scenario(seed)
    expected = diff_slots(stored, current, NOW, protected)
    items = stream(current, protected)
    random.Random(seed).shuffle(items)
    merged = merge_slots(
        [stored[k] for k in sorted(stored)],
        items,
        NOW,
        in_store=lambda keys: [k for k in keys if k in stored],
    )
    assert normalise(merged) == normalise(expected)


def test_a_late_duplicate_of_an_unchanged_row_is_not_added() -> None:
    a, b = ("p", "o", "1"), ("p", "o", "2")
    stored = {a: stored_of(make_slot(a, 5)), b: stored_of(make_slot(b, 5))}
    items = [(a, make_slot(a, 5)), (b, make_slot(b, 5)), (a, make_slot(a, 5))]
    merged = merge_slots(
        [stored[a], stored[b]], items, NOW, in_store=lambda keys: [k for k in keys if k in stored]
    )
    assert normalise(merged) == ([], [], [], [])


def test_a_late_row_new_to_the_store_is_added_once() -> None:
    a, b = ("p", "o", "1"), ("p", "o", "2")
    items = [(b, make_slot(b, 5)), (a, make_slot(a, 4)), (a, make_slot(a, 4))]
    merged = merge_slots([], items, NOW, in_store=lambda keys: [])
    assert [s.key for s in merged.added] == [b, a]


def test_incremental_diff_reports_no_removals_and_ignores_past_rows() -> None:
    a, b, c = ("p", "o", "1"), ("p", "o", "2"), ("p", "o", "3")
    stored = {a: stored_of(make_slot(a, 5)), b: stored_of(make_slot(b, 5))}
    items: list[tuple[SlotKey, Slot | None]] = [
        (a, make_slot(a, 2)),
        (c, make_slot(c, 9)),
        (("p", "o", "old"), make_slot(("p", "o", "old"), 1, hours=-3)),
        (b, None),
    ]
    diff = diff_changed_slots(stored, items, NOW)
    assert normalise(diff) == ([c], [a], [], [])
