"""seyaha_meta: the store's named records (schema version, baseline, cursors, statuses)."""

from __future__ import annotations

import sqlalchemy as sa

from agent.store import schema as t


def get_meta(conn: sa.Connection, key: str) -> str | None:
    value = conn.execute(sa.select(t.meta.c.value).where(t.meta.c.key == key)).scalar()
    return None if value is None else str(value)


def set_meta(conn: sa.Connection, key: str, value: str | None) -> None:
    """Replace (or, with None, remove) one record of seyaha_meta."""
    conn.execute(sa.delete(t.meta).where(t.meta.c.key == key))
    if value is not None:
        conn.execute(sa.insert(t.meta).values(key=key, value=value))
