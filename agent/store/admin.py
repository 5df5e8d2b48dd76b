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
    integrations_waiting: int = 0
    """A platform's integrations with at least one message waiting (routed rows only)."""


@dataclass(frozen=True)
class OutboxEntry:
    """A row of the outbox as an operator sees it (for summaries and listings)."""

    id: int
    kind: str
    state: str
    reason: str
    integration_id: str
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: datetime
    available_at: datetime
    payload: dict[str, object] | None


class Admin:
    def __init__(self, connector: Connector) -> None:
        self.connector = connector

    def stats(self, *, integration: str | None = None) -> OutboxStats:
        """Counts of the whole outbox, or of one integration's messages."""
        o = t.outbox.c
        with self.connector.read() as conn:
            query = sa.select(
                o.state,
                sa.func.count(),
                sa.func.min(o.created_ms),
                sa.func.count(o.lease_token),
            ).group_by(o.state)
            if integration is not None:
                query = query.where(o.integration_id == integration)
            rows = conn.execute(query).all()
            waiting = conn.execute(
                sa.select(sa.func.count(sa.distinct(o.integration_id))).where(
                    o.state == t.PENDING,
                    o.integration_id != "",
                    *(() if integration is None else (o.integration_id == integration,)),
                )
            ).scalar_one()
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
            integrations_waiting=int(waiting),
        )

    def waiting_of(self, integrations: Sequence[str]) -> set[str]:
        """Those of `integrations` that have messages waiting."""
        if not integrations:
            return set()
        o = t.outbox.c
        with self.connector.read() as conn:
            return set(
                conn.execute(
                    sa.select(o.integration_id)
                    .where(o.state == t.PENDING, o.integration_id.in_(list(integrations)))
                    .group_by(o.integration_id)
                ).scalars()
            )

    def pending(self, *, besides: Sequence[str] = ()) -> int:
        """Messages waiting, but those of the integrations `besides`."""
        o = t.outbox.c
        query = sa.select(sa.func.count()).where(o.state == t.PENDING)
        if besides:
            query = query.where(o.integration_id.not_in(list(besides)))
        with self.connector.read() as conn:
            return int(conn.execute(query).scalar_one())

    def entries(
        self, *, state: str | None = None, limit: int = 100, integration: str | None = None
    ) -> list[OutboxEntry]:
        o = t.outbox.c
        query = sa.select(t.outbox).order_by(o.id).limit(limit)
        if state is not None:
            query = query.where(o.state == state)
        if integration is not None:
            query = query.where(o.integration_id == integration)
        with self.connector.read() as conn:
            return [
                OutboxEntry(
                    id=r.id,
                    kind=r.kind,
                    state=r.state,
                    reason=r.reason,
                    integration_id=r.integration_id,
                    attempts=r.attempts,
                    last_status=r.last_status,
                    last_error=r.last_error,
                    created_at=from_epoch_ms(r.created_ms),
                    available_at=from_epoch_ms(r.available_ms),
                    payload=None if r.payload is None else json.loads(r.payload),
                )
                for r in conn.execute(query)
            ]

    def retry_dead(
        self,
        now: datetime,
        *,
        ids: Sequence[int] = (),
        kind: str | None = None,
        integration: str | None = None,
    ) -> int:
        """Put dead letters back in the queue (all, or those with `ids`, or of one `kind`, or
        of one integration)."""
        o = t.outbox.c
        query = sa.update(t.outbox).where(o.state == t.DEAD)
        if integration is not None:
            query = query.where(o.integration_id == integration)
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

    def purge_dead(
        self, *, older_than: datetime | None = None, integration: str | None = None
    ) -> int:
        """Delete dead letters (only those last touched before `older_than`, if given, or of
        one integration)."""
        o = t.outbox.c
        query = sa.delete(t.outbox).where(o.state == t.DEAD)
        if integration is not None:
            query = query.where(o.integration_id == integration)
        if older_than is not None:
            query = query.where(o.updated_ms < to_epoch_ms(older_than))
        with self.connector.write() as conn:
            return int(conn.execute(query).rowcount)
