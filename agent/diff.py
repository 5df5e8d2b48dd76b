"""Pure: the stored fingerprints and the rows just read -> what changed.

Keys that were in the result but could not be read (a bad row with a known key) are
"protected": their stored fingerprint stays as it is, so a typo in one row never closes a slot.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Literal

from agent.model import CatalogDiff, CatalogKey, CatalogRow, Slot, SlotDiff, SlotKey, StoredSlot


def diff_catalog(
    stored: Mapping[CatalogKey, str],
    current: Iterable[CatalogRow],
    protected: Collection[CatalogKey] = (),
) -> CatalogDiff:
    added: list[CatalogRow] = []
    changed: list[CatalogRow] = []
    seen: set[CatalogKey] = set()
    for row in current:
        seen.add(row.key)
        previous = stored.get(row.key)
        if previous is None:
            added.append(row)
        elif previous != row.fingerprint and row.key not in protected:
            changed.append(row)
    removed = [k for k in stored if k not in seen and k not in protected]
    return CatalogDiff(tuple(added), tuple(changed), tuple(sorted(removed)))


def diff_slots(
    stored: Mapping[SlotKey, StoredSlot],
    current: Iterable[Slot],
    now: datetime,
    protected: Collection[SlotKey] = (),
) -> SlotDiff:
    """Compare in-scope slots (start not in the past) with what the store remembers.

    `current` may contain past slots; they are out of scope and treated as absent. A stored
    slot whose start has passed is expired (forgotten silently), never closed.
    """
    added: list[Slot] = []
    changed: list[Slot] = []
    seen: set[SlotKey] = set()
    for item in current:
        if item.start_utc < now:
            continue
        seen.add(item.key)
        previous = stored.get(item.key)
        if previous is None:
            added.append(item)
        elif previous.fingerprint != item.fingerprint and item.key not in protected:
            changed.append(item)
    removed: list[StoredSlot] = []
    expired: list[SlotKey] = []
    for key, remembered in stored.items():
        if key in seen or key in protected:
            continue
        if remembered.start_utc < now:
            expired.append(key)
        else:
            removed.append(remembered)
    return SlotDiff(tuple(added), tuple(changed), tuple(removed), tuple(expired))


SourceSlot = tuple[SlotKey, Slot | None]
"""One item of a streamed slots result: the key, and the slot or None for an unreadable row
whose key is sound (protected)."""


ChangeKind = Literal["added", "changed", "same", "removed", "expired"]
SlotChange = tuple[ChangeKind, Slot | StoredSlot]
"""("added" | "changed" | "same", Slot) or ("removed" | "expired", StoredSlot)."""


def _compare(previous: StoredSlot | None, item: Slot | None) -> ChangeKind | None:
    if item is None:
        return None  # protected: whatever the store remembers stays
    if previous is None:
        return "added"
    if previous.fingerprint != item.fingerprint:
        return "changed"
    return "same"


def iter_slot_changes(
    stored: Iterable[StoredSlot],
    current: Iterable[SourceSlot],
    now: datetime,
    in_store: Callable[[list[SlotKey]], Collection[SlotKey]] = lambda keys: (),
    *,
    include_unchanged: bool = False,
) -> Iterator[SlotChange]:
    """Merge-join two streams sorted by key (Python string order) into changes, lazily.

    Memory grows with the number of removals and out-of-order rows, not with the inventory.
    A source that returns a row out of order (its collation disagrees with ours) is still
    diffed correctly: the row is set aside and matched at the end against the stored slots
    the merge had already passed; `in_store` tells which of the remaining late keys the
    store holds (those were matched in order already, so the late row is a duplicate).
    Added and changed slots come as they are found; removals and expiries come last.
    """
    passed: dict[SlotKey, StoredSlot] = {}
    late: list[SourceSlot] = []
    seen_new: set[SlotKey] = set()
    remembered = iter(stored)
    head = next(remembered, None)
    last: SlotKey | None = None
    for key, item in current:
        if item is not None and item.start_utc < now:
            continue  # out of scope, as if absent
        if last is not None and key <= last:
            late.append((key, item))
            continue
        last = key
        while head is not None and head.key < key:
            passed[head.key] = head
            head = next(remembered, None)
        previous = None
        if head is not None and head.key == key:
            previous, head = head, next(remembered, None)
        kind = _compare(previous, item)
        if kind is None or (kind == "same" and not include_unchanged):
            continue
        if kind == "added" and late:
            seen_new.add(key)
        assert item is not None
        yield kind, item
    while head is not None:
        passed[head.key] = head
        head = next(remembered, None)

    unknown: list[tuple[SlotKey, Slot]] = []
    matched_late: set[SlotKey] = set()
    for key, item in late:
        if key in matched_late:
            continue  # a duplicate of a late row already diffed
        matched_late.add(key)
        if key in passed:
            kind = _compare(passed.pop(key), item)
            if kind is not None and (kind != "same" or include_unchanged):
                assert item is not None
                yield kind, item
        elif item is not None:
            unknown.append((key, item))
    if unknown:
        known = set(in_store([key for key, _ in unknown]))
        for key, item in unknown:
            if key not in known and key not in seen_new:
                yield "added", item
    for gone in passed.values():
        yield ("expired" if gone.start_utc < now else "removed"), gone


def merge_slots(
    stored: Iterable[StoredSlot],
    current: Iterable[SourceSlot],
    now: datetime,
    in_store: Callable[[list[SlotKey]], Collection[SlotKey]] = lambda keys: (),
) -> SlotDiff:
    """The same answer as `diff_slots`, from two key-ordered streams (see iter_slot_changes)."""
    return collect_changes(iter_slot_changes(stored, current, now, in_store))


def collect_changes(changes: Iterable[SlotChange]) -> SlotDiff:
    """A SlotDiff from a run of changes ("same" entries are left out)."""
    added: list[Slot] = []
    changed: list[Slot] = []
    removed: list[StoredSlot] = []
    expired: list[SlotKey] = []
    for kind, value in changes:
        if kind == "added" and isinstance(value, Slot):
            added.append(value)
        elif kind == "changed" and isinstance(value, Slot):
            changed.append(value)
        elif kind == "removed" and isinstance(value, StoredSlot):
            removed.append(value)
        elif kind == "expired" and isinstance(value, StoredSlot):
            expired.append(value.key)
    return SlotDiff(tuple(added), tuple(changed), tuple(removed), tuple(expired))


def diff_changed_slots(
    stored: Mapping[SlotKey, StoredSlot], current: Iterable[SourceSlot], now: datetime
) -> SlotDiff:
    """Added and changed slots among rows an incremental poll returned; never removals
    (absence from a change query means nothing) and never expiries (full scans do those)."""
    added: list[Slot] = []
    changed: list[Slot] = []
    seen: set[SlotKey] = set()
    for key, item in current:
        if key in seen or item is None or item.start_utc < now:
            continue
        seen.add(key)
        kind = _compare(stored.get(key), item)
        if kind == "added":
            added.append(item)
        elif kind == "changed":
            changed.append(item)
    return SlotDiff(tuple(added), tuple(changed))


def without_keys(changes: Iterable[SlotChange], keys: Collection[SlotKey]) -> list[SlotChange]:
    """`changes` minus those of `keys`, in order: a reconciliation's chunk minus the slots a
    poll recorded after the reconciliation's snapshot (their stored state is newer)."""
    return [change for change in changes if change[1].key not in keys]
