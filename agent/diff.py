"""Pure: the stored fingerprints and the rows just read -> what changed.

Keys that were in the result but could not be read (a bad row with a known key) are
"protected": their stored fingerprint stays as it is, so a typo in one row never closes a slot.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping
from datetime import datetime

from agent.model import CatalogDiff, CatalogKey, CatalogRow, Slot, SlotDiff, SlotKey, StoredSlot
from agent.rows import slot_fingerprint


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
        elif previous.fingerprint != slot_fingerprint(item) and item.key not in protected:
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


def _compare(
    previous: StoredSlot | None, item: Slot | None, added: list[Slot], changed: list[Slot]
) -> None:
    if item is None:
        return  # protected: whatever the store remembers stays
    if previous is None:
        added.append(item)
    elif previous.fingerprint != slot_fingerprint(item):
        changed.append(item)


def merge_slots(
    stored: Iterable[StoredSlot],
    current: Iterable[SourceSlot],
    now: datetime,
    in_store: Callable[[list[SlotKey]], Collection[SlotKey]] = lambda keys: (),
) -> SlotDiff:
    """The same answer as `diff_slots`, from two streams sorted by key, in bounded memory.

    Both streams should come in ascending key order (Python string order). Memory then grows
    with the number of changes, not with the inventory. A source that returns a row out of
    order (its collation disagrees with ours) is still diffed correctly: the row is set
    aside and matched at the end against the stored slots the merge had already passed;
    `in_store` tells which of the remaining late keys the store holds (those were matched in
    order already, so the late row is a duplicate).
    """
    added: list[Slot] = []
    changed: list[Slot] = []
    passed: dict[SlotKey, StoredSlot] = {}
    late: list[SourceSlot] = []
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
        _compare(previous, item, added, changed)
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
            _compare(passed.pop(key), item, added, changed)
        elif item is not None:
            unknown.append((key, item))
    if unknown:
        known = set(in_store([key for key, _ in unknown]))
        for key, item in unknown:
            if key not in known and not _seen_in_order(key, added, changed):
                added.append(item)
    removed = tuple(s for s in passed.values() if s.start_utc >= now)
    expired = tuple(s.key for s in passed.values() if s.start_utc < now)
    return SlotDiff(tuple(added), tuple(changed), removed, expired)


def _seen_in_order(key: SlotKey, added: list[Slot], changed: list[Slot]) -> bool:
    # Only reached for late rows absent from the store: rare, so a scan of the (small) change
    # lists is cheaper than remembering every key the merge saw.
    return any(s.key == key for s in added) or any(s.key == key for s in changed)


def diff_changed_slots(
    stored: Mapping[SlotKey, StoredSlot], current: Iterable[SourceSlot], now: datetime
) -> SlotDiff:
    """Added and changed slots among rows an incremental poll returned; never removals
    (absence from a change query means nothing) and never expiries (full scans do those)."""
    added: list[Slot] = []
    changed: list[Slot] = []
    seen: set[SlotKey] = set()
    for key, item in current:
        if key in seen or (item is not None and item.start_utc < now):
            continue
        seen.add(key)
        _compare(stored.get(key), item, added, changed)
    return SlotDiff(tuple(added), tuple(changed))
