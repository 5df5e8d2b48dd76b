"""The state store: fingerprints of what Seyaha was last told, the outbox of calls to make,
the leases agents share, and the schema's versions."""

from agent.store.admin import OutboxEntry, OutboxStats
from agent.store.store import LeaseLost, StateStore, StoreBusy

__all__ = ["LeaseLost", "OutboxEntry", "OutboxStats", "StateStore", "StoreBusy"]
