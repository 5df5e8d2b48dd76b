"""seyaha_meta: the store's named records (schema version, baseline, cursors, statuses)."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

from agent.store import schema as t


def get_meta(conn: sa.Connection, key: str) -> str | None:
    value = conn.execute(sa.select(t.meta.c.value).where(t.meta.c.key == key)).scalar()
    return None if value is None else str(value)


def set_meta(conn: sa.Connection, key: str, value: str | None) -> None:
    """Replace (or, with None, remove) one record of seyaha_meta.

    Updated in place, inserted only when absent: agents sharing a store write the same
    records at once (the range digests' token at every recorded scan), and a delete followed
    by an insert fails on PostgreSQL when another transaction inserts the key in between (its
    delete waited for the other, found nothing, and the insert then meets the other's row).
    An insert that meets a row written meanwhile updates it instead."""
    if value is None:
        conn.execute(sa.delete(t.meta).where(t.meta.c.key == key))
        return
    update = sa.update(t.meta).where(t.meta.c.key == key).values(value=value)
    # rowcount counts the rows matched, not only those changed (SQLAlchemy asks MySQL for
    # found rows): an update to the same value still says the key is there.
    if conn.execute(update).rowcount:
        return
    try:
        with conn.begin_nested():
            conn.execute(sa.insert(t.meta).values(key=key, value=value))
    except IntegrityError:
        conn.execute(update)


def set_metas(conn: sa.Connection, values: dict[str, str]) -> None:
    """Replace several records of seyaha_meta in two statements (a poll of an agent that
    scans many shards saves one change cursor per shard). Only for records one writer at a
    time owns, as the cursors of a shard are its holder's (see StateStore.commit_scan's
    fence); set_meta for records agents share."""
    if not values:
        return
    conn.execute(sa.delete(t.meta).where(t.meta.c.key.in_(sorted(values))))
    conn.execute(sa.insert(t.meta), [{"key": k, "value": v} for k, v in sorted(values.items())])
