"""Pure: what changed -> the webhook calls to make, in the order they must go out.

Rules:
- any catalog change (row added, removed or changed) is one `sync/trigger`, placed first so
  that Seyaha knows a new product before it hears about that product's slots;
- each added or changed slot is one `availability/notify` with its absolute current state;
- a slot that vanished while its start is still ahead is one CLOSED notify, unless its
  (product, option) left the catalog in the same scan: the trigger already tells Seyaha;
- the first scan against an empty state is a baseline: one trigger, no notifies;
- a resync notifies every in-scope slot.
Notifies go soonest-start first: during a backlog the slots about to be sold matter most.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from agent.model import (
    TRIGGER_DEDUPE_KEY,
    CatalogDiff,
    Message,
    Slot,
    SlotDiff,
    SlotKey,
    StoredSlot,
)


def slot_dedupe_key(key: SlotKey) -> str:
    """One outbox key per slot, short enough to index on every backend."""
    joined = "\x1f".join(key)
    return "slot:" + hashlib.blake2b(joined.encode("utf-8"), digest_size=16).hexdigest()


def trigger_message(reason: str) -> Message:
    return Message(kind="trigger", dedupe_key=TRIGGER_DEDUPE_KEY, reason=reason)


def notify_message(item: Slot, reason: str) -> Message:
    return Message(
        kind="notify",
        dedupe_key=slot_dedupe_key(item.key),
        payload=item.payload(),
        slot_start=item.start_utc,
        reason=reason,
    )


def closed_message(gone: StoredSlot) -> Message:
    product_id, option_id, availability_id = gone.key
    return Message(
        kind="notify",
        dedupe_key=slot_dedupe_key(gone.key),
        payload={
            "productId": product_id,
            "optionId": option_id,
            "availabilityId": availability_id,
            "localDateTimeStart": gone.local_date_time_start,
            "status": "CLOSED",
            "vacancies": 0,
            "capacity": None,
        },
        slot_start=gone.start_utc,
        reason="removed",
    )


def plan(
    catalog: CatalogDiff,
    slots: SlotDiff,
    *,
    baseline: bool = False,
    resync: Iterable[Slot] = (),
) -> list[Message]:
    """The messages for one scan, in delivery order."""
    if baseline:
        return [trigger_message("baseline")]
    messages: list[Message] = []
    if catalog.any:
        messages.append(trigger_message("catalog"))

    notifies: list[tuple[Message, SlotKey]] = []
    resync_keys: set[SlotKey] = set()
    for item in resync:
        resync_keys.add(item.key)
        notifies.append((notify_message(item, "resync"), item.key))
    for item in slots.added:
        if item.key not in resync_keys:
            notifies.append((notify_message(item, "added"), item.key))
    for item in slots.changed:
        if item.key not in resync_keys:
            notifies.append((notify_message(item, "changed"), item.key))
    gone_options = set(catalog.removed)
    for gone in slots.removed:
        if (gone.key[0], gone.key[1]) not in gone_options:
            notifies.append((closed_message(gone), gone.key))

    notifies.sort(key=lambda pair: (pair[0].slot_start, pair[1]))
    messages.extend(m for m, _ in notifies)
    return messages
