"""Pure: the stored fingerprints and the rows just read -> what changed.

Keys that were in the result but could not be read (a bad row with a known key) are
"protected": their stored fingerprint stays as it is, so a typo in one row never closes a slot.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
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
