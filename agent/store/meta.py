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


def set_metas(conn: sa.Connection, values: dict[str, str]) -> None:
    """Replace several records of seyaha_meta in two statements (a poll of an agent that
    scans many shards saves one change cursor per shard)."""
    if not values:
        return
    conn.execute(sa.delete(t.meta).where(t.meta.c.key.in_(sorted(values))))
    conn.execute(sa.insert(t.meta), [{"key": k, "value": v} for k, v in sorted(values.items())])
