"""The state store: fingerprints of what Seyaha was last told, and the outbox of calls to make."""

from agent.outbox.store import OutboxStats, StateStore

__all__ = ["OutboxStats", "StateStore"]
