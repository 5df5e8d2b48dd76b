"""Pure: the stored fingerprints and the rows just read -> what changed.

Keys that were in the result but could not be read (a bad row with a known key) are
"protected": their stored fingerprint stays as it is, so a typo in one row never closes a slot.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from datetime import datetime
from typing import Any, Literal

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


class Unconverted:
    """A source row whose slot is not built yet, with the row's hash (RangeTally.row_hash).

    The merge builds the slot only when the stored one of its key was not built from a row
    of the same hash: a reconciliation reads a range of about 20 slots for each one that
    changed, and the other 19 are then told unchanged by their hash instead of being built
    (about half of what a row read costs the agent).
    """

    __slots__ = ("_build", "_row", "row_hash")

    def __init__(self, row_hash: int, row: Any, build: Callable[[Any, int], Slot | None]) -> None:
        self.row_hash = row_hash
        self._row = row
        self._build = build

    def slot(self) -> Slot | None:
        """The slot, or None for a row that cannot be read (the builder reports it)."""
        return self._build(self._row, self.row_hash)


SourceItem = tuple[SlotKey, Slot | Unconverted | None]
"""A SourceSlot whose slot may not be built yet (Unconverted)."""


ChangeKind = Literal["added", "changed", "same", "rehashed", "removed", "expired"]
SlotChange = tuple[ChangeKind, Slot | StoredSlot]
"""("added" | "changed" | "same" | "rehashed", Slot) or ("removed" | "expired", StoredSlot)."""


def _compare(previous: StoredSlot | None, item: Slot | None) -> ChangeKind | None:
    if item is None:
        return None  # protected: whatever the store remembers stays
    if previous is None:
        return "added"
    if previous.fingerprint != item.fingerprint:
        return "changed"
    return "same"


def _built(item: Slot | Unconverted | None) -> Slot | None:
    return item.slot() if isinstance(item, Unconverted) else item


def iter_slot_changes(
    stored: Iterable[StoredSlot],
    current: Iterable[SourceItem],
    now: datetime,
    in_store: Callable[[list[SlotKey]], Collection[SlotKey]] = lambda keys: (),
    *,
    include_unchanged: bool = False,
    on_duplicate: Callable[[SlotKey], None] = lambda key: None,
) -> Iterator[SlotChange]:
    """Merge-join two streams sorted by key (Python string order) into changes, lazily.

    Memory grows with the number of removals and out-of-order rows, not with the inventory.
    A source that returns a row out of order (its collation disagrees with ours) is still
    diffed correctly: the row is set aside and matched at the end against the stored slots
    the merge had already passed; `in_store` tells which of the remaining late keys the
    store holds (those were matched in order already, so the late row is a duplicate).
    Added and changed slots come as they are found; removals and expiries come last.

    A key that comes more than once is diffed by its first copy in the stream: the merge
    cannot take back a change it has handed on, and the copies of a key only meet when the
    source returns them side by side (SourceReader.stream_slots protects such a key). Each
    later copy is told to `on_duplicate`, so it can be reported as skipped. To know a late
    copy of a key the store does not hold yet, the merge remembers a hash of every such key
    it met in order (about 60 bytes each, as many as the slots added: some 60 MB for the
    first scan of 1,000,000 slots). Without it, a first scan that meets a key twice apart
    would record it twice and fail.

    A row not built yet (Unconverted) whose hash is the one the stored slot of its key was
    built from is unchanged, and stays unbuilt (unless `include_unchanged`); out of scope
    when the stored slot is. One built and found unchanged comes as "rehashed" when the
    stored slot keeps another hash than the row's (SlotDiff.rehashed).
    """
    passed: dict[SlotKey, StoredSlot] = {}
    late: list[SourceSlot] = []
    seen_new: set[int] = set()
    remembered = iter(stored)
    # The stored side is first asked for once the source gave its first row: the source's
    # query is then on its way while a stored side read ahead (agent/ahead.py) is read.
    head: StoredSlot | None = None
    begun = False
    last: SlotKey | None = None
    for key, item in current:
        if not begun:
            head, begun = next(remembered, None), True
        if last is not None and key <= last:
            late_item = _built(item)
            if late_item is None or late_item.start_utc >= now:
                late.append((key, late_item))
            continue
        # Every key in order moves `last` on, in scope or not: the stored slots before it
        # are passed now, so a later row of a key before it is matched among them.
        last = key
        while head is not None and head.key < key:
            passed[head.key] = head
            head = next(remembered, None)
        previous = head if head is not None and head.key == key else None
        if isinstance(item, Unconverted):
            if previous is not None and previous.row_hash == item.row_hash:
                if previous.start_utc < now:
                    continue  # out of scope, as if absent: the stored slot expires
                head = next(remembered, None)
                if not include_unchanged:
                    continue  # built from this very row: unchanged
            item = item.slot()
        if item is not None and item.start_utc < now:
            continue  # out of scope, as if absent
        if previous is not None and head is previous:
            head = next(remembered, None)
        if previous is None:
            seen_new.add(hash(key))
        kind = _compare(previous, item)
        if kind == "same" and not include_unchanged:
            assert item is not None
            assert previous is not None
            if item.source_hash is not None and previous.row_hash != item.source_hash:
                yield "rehashed", item
            continue
        if kind is None:
            continue
        assert item is not None
        yield kind, item
    if not begun:
        head = next(remembered, None)
    while head is not None:
        passed[head.key] = head
        head = next(remembered, None)

    unknown: list[SourceSlot] = []
    matched_late: set[SlotKey] = set()
    for key, late_slot in late:
        if key in matched_late:
            on_duplicate(key)  # a copy of a late row already diffed
            continue
        matched_late.add(key)
        if key in passed:
            kind = _compare(passed.pop(key), late_slot)
            if kind is not None and (kind != "same" or include_unchanged):
                assert late_slot is not None
                yield kind, late_slot
        else:
            unknown.append((key, late_slot))
    if unknown:
        known = set(in_store([key for key, _ in unknown]))
        for key, late_slot in unknown:
            if key in known or hash(key) in seen_new:
                on_duplicate(key)  # its first copy was met in order, and diffed then
            elif late_slot is not None:
                yield "added", late_slot
    for gone in passed.values():
        yield ("expired" if gone.start_utc < now else "removed"), gone


def merge_slots(
    stored: Iterable[StoredSlot],
    current: Iterable[SourceSlot],
    now: datetime,
    in_store: Callable[[list[SlotKey]], Collection[SlotKey]] = lambda keys: (),
    *,
    on_duplicate: Callable[[SlotKey], None] = lambda key: None,
) -> SlotDiff:
    """The same answer as `diff_slots`, from two key-ordered streams (see iter_slot_changes)."""
    return collect_changes(
        iter_slot_changes(
            stored,
            current,
            now,
            in_store,
            on_duplicate=on_duplicate,
        )
    )


def collect_changes(changes: Iterable[SlotChange]) -> SlotDiff:
    """A SlotDiff from a run of changes ("same" entries are left out)."""
    added: list[Slot] = []
    changed: list[Slot] = []
    removed: list[StoredSlot] = []
    expired: list[SlotKey] = []
    rehashed: list[Slot] = []
    for kind, value in changes:
        if kind == "added" and isinstance(value, Slot):
            added.append(value)
        elif kind == "changed" and isinstance(value, Slot):
            changed.append(value)
        elif kind == "rehashed" and isinstance(value, Slot):
            rehashed.append(value)
        elif kind == "removed" and isinstance(value, StoredSlot):
            removed.append(value)
        elif kind == "expired" and isinstance(value, StoredSlot):
            expired.append(value.key)
    return SlotDiff(tuple(added), tuple(changed), tuple(removed), tuple(expired), tuple(rehashed))


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
