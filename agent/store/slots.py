"""The stored slots' columns as the agent reads them, and a row of them as a StoredSlot."""

from __future__ import annotations

from typing import Any

from agent.clock import from_epoch_ms
from agent.model import StoredSlot
from agent.store import schema as t

_C = t.slot_fingerprints.c

SLOT_COLUMNS = (
    _C.product_id,
    _C.option_id,
    _C.availability_id,
    _C.fingerprint,
    _C.local_start,
    _C.start_ms,
    _C.integration_id,
)
"""What a read of stored slots selects (stored_slot makes each row a StoredSlot)."""

SLOT_KEY = (_C.product_id, _C.option_id, _C.availability_id)


def stored_slot(r: Any) -> StoredSlot:
    """A row of SLOT_COLUMNS (by name) as a StoredSlot."""
    return StoredSlot(
        key=(r.product_id, r.option_id, r.availability_id),
        fingerprint=r.fingerprint,
        local_date_time_start=r.local_start,
        start_utc=from_epoch_ms(r.start_ms),
        integration_id=r.integration_id,
    )
