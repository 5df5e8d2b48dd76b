"""Versioned, forward-only migrations of the state store (Alembic scripts; see store.migrate)."""
