"""The values that flow through the pipeline: source rows -> changes -> messages.

Small frozen dataclasses with full type hints; pydantic stays at the configuration edge.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

CatalogKey = tuple[str, str]
"""(product_id, option_id)"""

SlotKey = tuple[str, str, str]
"""(product_id, option_id, availability_id)"""

Status = Literal["AVAILABLE", "FREESALE", "LIMITED", "SOLD_OUT", "CLOSED"]
STATUSES: tuple[Status, ...] = ("AVAILABLE", "FREESALE", "LIMITED", "SOLD_OUT", "CLOSED")

MessageKind = Literal["trigger", "notify"]

TRIGGER_DEDUPE_KEY = "catalog"
"""Every catalog change coalesces into the one pending trigger with this key (per
integration: see trigger_dedupe_key)."""


def trigger_dedupe_key(integration_id: str) -> str:
    """The dedupe key of an integration's trigger: one waits per integration."""
    return f"{TRIGGER_DEDUPE_KEY}:{integration_id}" if integration_id else TRIGGER_DEDUPE_KEY


@dataclass(frozen=True, slots=True)
class CatalogRow:
    """One (product, option) row of the catalog query, reduced to its fingerprint."""

    product_id: str
    option_id: str
    fingerprint: str
    integration_id: str = ""
    """The Seyaha integration the row belongs to ("": the configured one)."""

    @property
    def key(self) -> CatalogKey:
        return (self.product_id, self.option_id)


@dataclass(frozen=True, slots=True)
class Slot:
    """One availability slot as Seyaha should see it (the notify payload, plus its UTC start)."""

    product_id: str
    option_id: str
    availability_id: str
    local_date_time_start: str
    start_utc: datetime
    status: Status
    vacancies: int | None
    capacity: int | None
    integration_id: str = ""
    """The Seyaha integration the slot belongs to ("": the configured one)."""
    source_hash: int | None = field(default=None, compare=False, repr=False)
    """The hash of the source row it was built from, where a full pass read one
    (agent.ranges.RangeTally.row_hash); not part of what Seyaha sees."""
    fingerprint: str = field(init=False, compare=False, repr=False)
    """The digest of what a notify would carry (slot_fingerprint), computed once, here:
    the diff compares it and the store records it."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "fingerprint", slot_fingerprint(self))

    @property
    def key(self) -> SlotKey:
        return (self.product_id, self.option_id, self.availability_id)

    def payload(self) -> dict[str, Any]:
        """The OCTO availability/notify body."""
        return {
            "productId": self.product_id,
            "optionId": self.option_id,
            "availabilityId": self.availability_id,
            "localDateTimeStart": self.local_date_time_start,
            "status": self.status,
            "vacancies": self.vacancies,
            "capacity": self.capacity,
        }


def slot_fingerprint(value: Slot) -> str:
    """The digest of what a notify would carry. The repr of a tuple of str, int and None is
    stable across processes and releases, and far cheaper than canonical JSON."""
    carried: tuple[str | int | None, ...] = (
        value.product_id,
        value.option_id,
        value.availability_id,
        value.local_date_time_start,
        value.status,
        value.vacancies,
        value.capacity,
    )
    if value.integration_id:
        # A slot that moves to another integration is a change; one integration's
        # fingerprints stay what they were before integrations were routed.
        carried += (value.integration_id,)
    return hashlib.blake2b(repr(carried).encode("utf-8"), digest_size=16).hexdigest()


def request_body(payload: dict[str, Any]) -> str:
    """The exact JSON body of a notify, as the outbox keeps it and the client sends it."""
    return json.dumps(payload, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class StoredSlot:
    """What the state store remembers of a slot: enough to detect a change and to close it."""

    key: SlotKey
    fingerprint: str
    local_date_time_start: str
    start_utc: datetime
    integration_id: str = ""
    row_hash: int | None = None
    """The hash of the source row its fingerprint was built from (Slot.source_hash), or
    None: written from a row without one (a poll's), or before the store kept them."""


@dataclass(frozen=True, slots=True)
class SkippedRow:
    """A source row that could not be used; the rest of the scan goes on without it."""

    query: str
    key: tuple[Any, ...] | None
    reason: str


@dataclass(frozen=True, slots=True)
class CatalogDiff:
    added: tuple[CatalogRow, ...] = ()
    changed: tuple[CatalogRow, ...] = ()
    removed: tuple[CatalogKey, ...] = ()
    left: frozenset[str] = frozenset()
    """Integrations that lost a removed or changed row (a platform's catalog: the row's
    integration as stored), so that their catalogs are triggered too."""

    @property
    def any(self) -> bool:
        return bool(self.added or self.changed or self.removed)


@dataclass(frozen=True, slots=True)
class SlotDiff:
    added: tuple[Slot, ...] = ()
    changed: tuple[Slot, ...] = ()
    removed: tuple[StoredSlot, ...] = ()
    """Slots gone from the query result whose start is still ahead: Seyaha must hear CLOSED."""
    expired: tuple[SlotKey, ...] = ()
    """Slots whose start has passed: forgotten without a message."""
    rehashed: tuple[Slot, ...] = ()
    """Slots unchanged whose stored row hash is not the one of the row a full pass just
    built them from (none was kept: a poll wrote them, or a store from before schema 5):
    only the hash is recorded, so that the next pass need not build them."""


@dataclass(frozen=True, slots=True)
class Message:
    """One webhook call to make, before it has an outbox id."""

    kind: MessageKind
    dedupe_key: str
    payload: dict[str, Any] | None = None
    slot_start: datetime | None = None
    reason: str = ""
    """Why the message exists (added, changed, closed, removed, resync, baseline): for logs."""
    integration_id: str = ""
    """Where it goes ("": the configured integration)."""


@dataclass(frozen=True, slots=True)
class OutboxMessage:
    """A message as stored in the outbox, claimed under a lease for one delivery attempt."""

    id: int
    kind: MessageKind
    dedupe_key: str
    body: str | None
    """The exact request body (notifies), written once when the message was queued."""
    attempts: int
    created_at: datetime
    slot_start: datetime | None
    lease_token: str = field(default="", compare=False)
    integration_id: str = ""
    """Where it goes ("": the configured integration)."""

    @property
    def payload(self) -> dict[str, Any] | None:
        """The body read back (for logs and operators; sending uses `body` as it is)."""
        return None if self.body is None else dict(json.loads(self.body))
