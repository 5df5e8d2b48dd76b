"""What agents sharing one store tell each other: the scanner lease and the status records
(pause, breaker, last delivery) that `outbox status` reads.

The scanner lease is a row of seyaha_leases: (holder, until_ms), with until_ms on the clock of
the store's database (every `now` given here comes from store.clock.StoreClock on a shared
store), so that agents on hosts whose clocks differ by minutes never both hold it.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError

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


@dataclass(frozen=True)
class Fence:
    """The leases an agent must still hold, under its name, for a scan's result to be
    recorded: the scanner lease, or the shards it scans (see agent/shards.py)."""

    holder: str
    leases: tuple[str, ...] = (SCANNER,)


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

    def hold_all(
        self, names: Collection[str], holder: str, now: datetime, lease_s: float
    ) -> set[str]:
        """Take or renew each lease of `names` that is free, run out or `holder`'s own, all
        in one transaction; returns the names `holder` holds now. Rows are locked in name
        order, as `holds` locks them, so that a renewal and a scan's commit never deadlock."""
        now_ms = to_epoch_ms(now)
        until_ms = now_ms + int(lease_s * 1000)
        c = t.leases.c
        wanted = sorted(set(names))
        held: set[str] = set()
        with self.connector.write() as conn:
            found = {
                row.name: row
                for row in conn.execute(
                    self.connector.dialect.lock_rows(
                        sa.select(c.name, c.holder, c.until_ms)
                        .where(c.name.in_(wanted))
                        .order_by(c.name)
                    )
                )
            }
            ours = [
                n
                for n in wanted
                if n in found and (found[n].holder == holder or found[n].until_ms <= now_ms)
            ]
            if ours:
                conn.execute(
                    sa.update(t.leases)
                    .where(c.name.in_(ours))
                    .values(holder=holder, until_ms=until_ms)
                )
                held.update(ours)
            for name in wanted:
                if name in found:
                    continue
                # Another agent may insert the same free lease at this moment: its row
                # stands, and this one goes on with the others.
                try:
                    with conn.begin_nested():
                        conn.execute(
                            sa.insert(t.leases).values(name=name, holder=holder, until_ms=until_ms)
                        )
                except IntegrityError:
                    continue
                held.add(name)
        return held

    def give_up_all(self, names: Collection[str], holder: str) -> None:
        """End the leases of `names` that `holder` has, at once."""
        if not names:
            return
        c = t.leases.c
        with self.connector.write() as conn:
            conn.execute(
                sa.delete(t.leases).where(c.name.in_(sorted(set(names))), c.holder == holder)
            )

    def leases_named(self, prefix: str) -> dict[str, tuple[str, int]]:
        """Every lease whose name starts with `prefix`: name -> (holder, until_ms)."""
        c = t.leases.c
        with self.connector.read() as conn:
            rows = conn.execute(
                sa.select(c.name, c.holder, c.until_ms).where(c.name.startswith(prefix))
            )
            return {row.name: (row.holder, row.until_ms) for row in rows}

    def lease(self, name: str) -> Lease | None:
        c = t.leases.c
        with self.connector.read() as conn:
            row = conn.execute(sa.select(c.holder, c.until_ms).where(c.name == name)).first()
        return None if row is None else Lease(name, row.holder, from_epoch_ms(row.until_ms))

    def holds(self, conn: sa.Connection, fence: Fence) -> bool:
        """Whether `fence.holder` has every lease of the fence, read and locked (in name
        order) inside the caller's write transaction: a scan commits only while its agent
        still holds what it scanned for, and nobody takes it over before that commit ends."""
        c = t.leases.c
        names = sorted(set(fence.leases))
        query = self.connector.dialect.lock_rows(
            sa.select(c.name, c.holder).where(c.name.in_(names)).order_by(c.name)
        )
        holders = {row.name: row.holder for row in conn.execute(query)}
        # A fence of no lease holds nothing: an agent left without shards records nothing.
        return bool(names) and all(holders.get(name) == fence.holder for name in names)

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
