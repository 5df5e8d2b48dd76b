"""Pure: what changed -> the webhook calls to make, in the order they must go out.

Rules:
- any catalog change (row added, removed or changed) is one `sync/trigger`, placed first so
  that Seyaha knows a new product before it hears about that product's slots;
- each added or changed slot is one `availability/notify` with its absolute current state;
- a slot that vanished while its start is still ahead is one CLOSED notify, unless its
  (product, option) left the catalog in the same scan: the trigger already tells Seyaha;
- the first scan against an empty state is a baseline: one trigger, no notifies;
- on a platform (rows routed by integration) each of these is per integration: a trigger for
  every integration whose catalog changed (gained, lost or changed a row), and each notify
  to its slot's integration;
- a resync notifies every in-scope slot.
Notifies go soonest-start first: during a backlog the slots about to be sold matter most.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from agent.model import (
    CatalogDiff,
    Message,
    Slot,
    SlotDiff,
    SlotKey,
    StoredSlot,
    trigger_dedupe_key,
)


def slot_dedupe_key(key: SlotKey) -> str:
    """One outbox key per slot, short enough to index on every backend."""
    joined = "\x1f".join(key)
    return "slot:" + hashlib.blake2b(joined.encode("utf-8"), digest_size=16).hexdigest()


def trigger_message(reason: str, integration_id: str = "") -> Message:
    return Message(
        kind="trigger",
        dedupe_key=trigger_dedupe_key(integration_id),
        reason=reason,
        integration_id=integration_id,
    )


def notify_message(item: Slot, reason: str) -> Message:
    return Message(
        kind="notify",
        dedupe_key=slot_dedupe_key(item.key),
        payload=item.payload(),
        slot_start=item.start_utc,
        reason=reason,
        integration_id=item.integration_id,
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
        integration_id=gone.integration_id,
    )


def plan(
    catalog: CatalogDiff,
    slots: SlotDiff,
    *,
    baseline: bool = False,
    resync: Iterable[Slot] = (),
    routed: bool = False,
) -> list[Message]:
    """The messages for one scan, in delivery order (`routed`: rows name their integration)."""
    changed = {r.integration_id for r in (*catalog.added, *catalog.changed)} | catalog.left
    if catalog.removed and not routed:
        changed.add("")  # one integration: a removed row's is the configured one
    if baseline:
        reached = changed | {s.integration_id for s in slots.added}
        if not routed:
            reached = {""}
        return [trigger_message("baseline", i) for i in sorted(reached)]
    messages: list[Message] = []
    if catalog.any or catalog.left:
        messages.extend(trigger_message("catalog", i) for i in sorted(changed))

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
