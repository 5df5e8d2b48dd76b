"""Operator commands on the outbox: counts, listings, dead letters put back or deleted."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import sqlalchemy as sa

from agent.clock import from_epoch_ms, to_epoch_ms
from agent.store import schema as t
from agent.store.connector import Connector


@dataclass(frozen=True)
class OutboxStats:
    pending: int
    dead: int
    in_flight: int
    oldest_pending: datetime | None


@dataclass(frozen=True)
class OutboxEntry:
    """A row of the outbox as an operator sees it (for summaries and listings)."""

    id: int
    kind: str
    state: str
    reason: str
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: datetime
    available_at: datetime
    payload: dict[str, object] | None


class Admin:
    def __init__(self, connector: Connector) -> None:
        self.connector = connector

    def stats(self) -> OutboxStats:
        o = t.outbox.c
        with self.connector.read() as conn:
            rows = conn.execute(
                sa.select(
                    o.state,
                    sa.func.count(),
                    sa.func.min(o.created_ms),
                    sa.func.count(o.lease_token),
                ).group_by(o.state)
            ).all()
        pending = dead = in_flight = 0
        oldest: int | None = None
        for state, count, first_ms, leased in rows:
            if state == t.PENDING:
                pending, oldest, in_flight = count, first_ms, leased
            elif state == t.DEAD:
                dead = count
        return OutboxStats(
            pending=pending,
            dead=dead,
            in_flight=in_flight,
            oldest_pending=None if oldest is None else from_epoch_ms(oldest),
        )

    def entries(self, *, state: str | None = None, limit: int = 100) -> list[OutboxEntry]:
        o = t.outbox.c
        query = sa.select(t.outbox).order_by(o.id).limit(limit)
        if state is not None:
            query = query.where(o.state == state)
        with self.connector.read() as conn:
            return [
                OutboxEntry(
                    id=r.id,
                    kind=r.kind,
                    state=r.state,
                    reason=r.reason,
                    attempts=r.attempts,
                    last_status=r.last_status,
                    last_error=r.last_error,
                    created_at=from_epoch_ms(r.created_ms),
                    available_at=from_epoch_ms(r.available_ms),
                    payload=None if r.payload is None else json.loads(r.payload),
                )
                for r in conn.execute(query)
            ]

    def retry_dead(self, now: datetime, *, ids: Sequence[int] = (), kind: str | None = None) -> int:
        """Put dead letters back in the queue (all, or those with `ids`, or of one `kind`)."""
        o = t.outbox.c
        query = sa.update(t.outbox).where(o.state == t.DEAD)
        if ids:
            query = query.where(o.id.in_(list(ids)))
        if kind is not None:
            query = query.where(o.kind == kind)
        now_ms = to_epoch_ms(now)
        with self.connector.write() as conn:
            return int(
                conn.execute(
                    query.values(
                        state=t.PENDING,
                        attempts=0,
                        available_ms=now_ms,
                        created_ms=now_ms,
                        updated_ms=now_ms,
                    )
                ).rowcount
            )

    def purge_dead(self, *, older_than: datetime | None = None) -> int:
        """Delete dead letters (only those last touched before `older_than`, if given)."""
        o = t.outbox.c
        query = sa.delete(t.outbox).where(o.state == t.DEAD)
        if older_than is not None:
            query = query.where(o.updated_ms < to_epoch_ms(older_than))
        with self.connector.write() as conn:
            return int(conn.execute(query).rowcount)
