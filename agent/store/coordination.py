"""What agents sharing one store tell each other: the scanner lease and the status records
(pause, breaker, last delivery) that `outbox status` reads.

The scanner lease is a row of seyaha_leases: (holder, until_ms), with until_ms on the clock of
the store's database (every `now` given here comes from store.clock.StoreClock on a shared
store), so that agents on hosts whose clocks differ by minutes never both hold it.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import sqlalchemy as sa

from agent.clock import from_epoch_ms, to_epoch_ms
from agent.store import schema as t
from agent.store.connector import Connector
from agent.store.meta import set_meta

Held = Literal["renewed", "taken"]

STATUS_PREFIX = "status:"
SCANNER = "scanner"
"""The lease of the one agent that scans a shared store."""


@dataclass(frozen=True)
class Lease:
    name: str
    holder: str
    until: datetime


class Coordination:
    def __init__(self, connector: Connector) -> None:
        self.connector = connector

    # -- leases -------------------------------------------------------------------------

    def hold(
        self, name: str, holder: str, now: datetime, lease_s: float, *, renew_only: bool = False
    ) -> Held | None:
        """Take or renew the lease `name` until now + `lease_s`.

        "renewed": `holder` had it and nobody held it in between (even if it had run out:
        another holder would have replaced the holder's name). "taken": the lease was free,
        or another holder's had run out. None: another holder's lease runs, or, with
        `renew_only`, `holder` no longer has it. A holder that dies is replaced once its
        lease has run out."""
        now_ms = to_epoch_ms(now)
        until_ms = now_ms + int(lease_s * 1000)
        c = t.leases.c
        with self.connector.write() as conn:
            current = conn.execute(
                self.connector.dialect.lock_rows(
                    sa.select(c.holder, c.until_ms).where(c.name == name)
                )
            ).first()
            mine = current is not None and current.holder == holder
            if renew_only and not mine:
                return None
            if current is None:
                conn.execute(
                    sa.insert(t.leases).values(name=name, holder=holder, until_ms=until_ms)
                )
                return "taken"
            if not mine and current.until_ms > now_ms:
                return None
            conn.execute(
                sa.update(t.leases).where(c.name == name).values(holder=holder, until_ms=until_ms)
            )
            return "renewed" if mine else "taken"

    def give_up(self, name: str, holder: str) -> None:
        """End the lease now if `holder` has it (a clean shutdown hands scanning over at once)."""
        c = t.leases.c
        with self.connector.write() as conn:
            conn.execute(sa.delete(t.leases).where(c.name == name, c.holder == holder))

    def lease(self, name: str) -> Lease | None:
        c = t.leases.c
        with self.connector.read() as conn:
            row = conn.execute(sa.select(c.holder, c.until_ms).where(c.name == name)).first()
        return None if row is None else Lease(name, row.holder, from_epoch_ms(row.until_ms))

    def holds(self, conn: sa.Connection, name: str, holder: str) -> bool:
        """Whether `holder` has the lease, read and locked inside the caller's write
        transaction: a scan commits only while its agent still holds the scanner lease, and
        nobody takes it over before that commit ends."""
        c = t.leases.c
        query = self.connector.dialect.lock_rows(sa.select(c.holder).where(c.name == name))
        return conn.execute(query).scalar() == holder

    # -- status records -----------------------------------------------------------------

    def set_status(self, name: str, value: str | None) -> None:
        """Record a delivery status (pause, breaker, last delivery) for `outbox status`."""
        with self.connector.write() as conn:
            set_meta(conn, STATUS_PREFIX + name, value)

    def status(self) -> dict[str, str]:
        with self.connector.read() as conn:
            rows = conn.execute(
                sa.select(t.meta.c.key, t.meta.c.value).where(
                    t.meta.c.key.startswith(STATUS_PREFIX)
                )
            )
            return {key.removeprefix(STATUS_PREFIX): value for key, value in rows}
