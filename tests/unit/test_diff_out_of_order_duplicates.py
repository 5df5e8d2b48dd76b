"""The merge-join and keys that come more than once, in any order.

The reader protects a key whose copies arrive side by side (the usual case: the source
orders the rows as the agent asked). Copies that arrive apart (a database that orders these
ids differently from their text) cannot all be seen before the first one is handed on, so
the merge's contract is: the first copy in the stream decides, and every later copy is
reported (to be logged as a skipped row).
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from agent.diff import SourceSlot, merge_slots
from agent.model import SlotDiff, SlotKey
from tests.unit.test_diff_properties import (
    NOW,
    Snapshots,
    make_slot,
    outcome,
    snapshots,
    stored_of,
)

KEY = ("p", "o", "1")

VERSIONS = st.tuples(st.sampled_from([-1, 48]), st.integers(0, 3))
"""A copy's (hours from now, vacancies): past or ahead, and one of a few states."""


@st.composite
def with_duplicates(draw: st.DrawFn) -> tuple[Snapshots, list[SourceSlot]]:
    """Snapshots where some keys come again (unreadable, or readable in another state), and
    the stream the merge reads: in key order or not."""
    snap = draw(snapshots())
    read = sorted({key for key, _ in snap.rows})
    again = draw(st.lists(st.sampled_from(read), max_size=6)) if read else []
    copies: list[SourceSlot] = []
    for key in again:
        version = draw(st.none() | VERSIONS)
        copies.append((key, None if version is None else make_slot(key, version)))
    both = Snapshots(snap.stored, [*snap.rows, *copies])
    in_key_order = draw(st.booleans())
    return both, both.in_key_order() if in_key_order else draw(st.permutations(both.rows))


def first_copies(stream: list[SourceSlot]) -> tuple[list[SourceSlot], list[SlotKey]]:
    """The first in-scope copy of each key, and the keys of the later copies."""
    seen: set[SlotKey] = set()
    first: list[SourceSlot] = []
    later: list[SlotKey] = []
    for key, item in stream:
        if item is not None and item.start_utc < NOW:
            continue  # a past row is out of scope, as if absent
        if key in seen:
            later.append(key)
        else:
            seen.add(key)
            first.append((key, item))
    return first, later


def merged(snap: Snapshots, stream: list[SourceSlot]) -> tuple[SlotDiff, list[SlotKey]]:
    reported: list[SlotKey] = []
    diff = merge_slots(
        [snap.stored[key] for key in sorted(snap.stored)],
        stream,
        NOW,
        snap.in_store,
        on_duplicate=reported.append,
    )
    return diff, reported


CHANGED = make_slot(KEY, (48, 1))


@given(with_duplicates())
# The store remembers the slot; the source returns it changed, then an unreadable copy:
# the changed copy came first and decides; the unreadable one is reported.
@example(
    (
        Snapshots({KEY: stored_of(make_slot(KEY, (48, 2)))}, [(KEY, CHANGED), (KEY, None)]),
        [(KEY, CHANGED), (KEY, None)],
    )
)
# A new key, unreadable first, readable later and out of order: the first copy protects it.
@example(
    (
        Snapshots({}, [(KEY, None), (("p", "o", "2"), None), (KEY, CHANGED)]),
        [(KEY, None), (("p", "o", "2"), None), (KEY, CHANGED)],
    )
)
def test_the_first_copy_of_a_key_decides_and_every_later_copy_is_reported(
    case: tuple[Snapshots, list[SourceSlot]],
) -> None:
    snap, stream = case
    first, later = first_copies(stream)
    diff, reported = merged(snap, stream)
    assert outcome(diff) == outcome(Snapshots(snap.stored, first).reference())
    assert sorted(reported) == sorted(later)
