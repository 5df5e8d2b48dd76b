"""The outbox queue: enqueue, claim, complete, retry, release and dead-letter.

A message is delivered under a lease: a claim reserves it for `lease_s`, and only the holder
of the lease token can complete it. A process that dies mid-request leaves a lease that
expires, and the message is taken again. On a shared store every `now` given here comes from
the database's clock (store.clock.StoreClock), so hosts whose clocks disagree still agree on
when a lease runs out.

Rules: a slot has at most one waiting (unleased) message, updated in place with the newest
absolute state; catalog changes keep at most one waiting trigger; a notify is not claimed
while an older trigger is waiting, nor while an older message for the same slot is in
flight.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from contextlib import suppress
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from agent.clock import from_epoch_ms, to_epoch_ms
from agent.dialects import LOOKUP_BATCH
from agent.model import Message, OutboxMessage, request_body
from agent.store import schema as t
from agent.store.connector import Connector

CLAIM_LOCK_WAIT_S = 10.0
"""Longest wait of a claim for a lock on the whole outbox table (seconds): SQLite's busy
timeout, and PostgreSQL's lock_timeout in the claim's transaction."""


def _claim_candidates(connector: Connector, *, turns: bool = False) -> sa.Select[Any]:
    """The claim's look-up of due messages, built once (bound: now_ms, claim_limit, skip):
    built per claim, this statement cost more CPU than running it. With `turns`, those of
    the integrations after `after` in id order, each integration's oldest first (a
    platform's integrations take turns: see Queue.claim)."""
    now_ms = sa.bindparam("now_ms", type_=sa.BigInteger)
    o = t.outbox.c
    older_trigger = t.outbox.alias("older_trigger")
    older_same = t.outbox.alias("older_same")
    # The oldest waiting trigger of each integration, computed once per claim (a handful of
    # rows, found through seyaha_outbox_trigger): a notify waits for its own catalog's
    # trigger, never another integration's. Checked row by row (a correlated NOT EXISTS),
    # the claim read the whole backlog once per waiting row (quadratic in the backlog).
    first_trigger = (
        sa.select(
            older_trigger.c.integration_id.label("integration_id"),
            sa.func.min(older_trigger.c.id).label("first_id"),
        )
        .where(older_trigger.c.kind == "trigger", older_trigger.c.state == t.PENDING)
        .group_by(older_trigger.c.integration_id)
        .subquery("first_trigger")
    )
    newer_same = t.outbox.alias("newer_same")
    # A newer message for the same slot (or a newer trigger) carries the newest absolute
    # state: an older one, left behind by an expired lease or a failed attempt that ran
    # while the newer was queued, is superseded and dropped instead of sent.
    superseded = (
        sa.exists()
        .where(
            newer_same.c.dedupe_key == o.dedupe_key,
            newer_same.c.state == t.PENDING,
            newer_same.c.id > o.id,
        )
        .label("superseded")
    )
    candidates = (
        sa.select(t.outbox, superseded)
        .select_from(
            t.outbox.outerjoin(first_trigger, first_trigger.c.integration_id == o.integration_id)
        )
        .where(
            o.state == t.PENDING,
            o.available_ms <= now_ms,
            sa.or_(o.leased_until_ms.is_(None), o.leased_until_ms < now_ms),
            sa.or_(
                o.kind == "trigger",
                first_trigger.c.first_id.is_(None),
                o.id < first_trigger.c.first_id,
            ),
            # Integrations paused on their own, whose next probe is not due.
            o.integration_id.not_in(sa.bindparam("skip", expanding=True)),
            ~sa.exists().where(
                older_same.c.dedupe_key == o.dedupe_key,
                older_same.c.state == t.PENDING,
                older_same.c.id < o.id,
            ),
        )
        .order_by(o.id)
        .limit(sa.bindparam("claim_limit", type_=sa.Integer))
    )
    if turns:
        candidates = (
            candidates.where(o.integration_id > sa.bindparam("after", type_=sa.String))
            .order_by(None)
            .order_by(o.integration_id, o.id)
        )
    # Several agents on one store: each skips the rows another is claiming instead of
    # queueing behind its lock (the conditional UPDATE below stays as the guarantee).
    return connector.dialect.skip_locked(candidates, of=t.outbox)


def _lease_update() -> sa.Update:
    """Lease the claimed rows (bound: ids, now_ms, token, until_ms), built once."""
    o = t.outbox.c
    now_ms = sa.bindparam("now_ms", type_=sa.BigInteger)
    return (
        sa.update(t.outbox)
        .where(
            o.id.in_(sa.bindparam("ids", expanding=True)),
            o.state == t.PENDING,
            sa.or_(o.leased_until_ms.is_(None), o.leased_until_ms < now_ms),
        )
        .values(
            lease_token=sa.bindparam("token", type_=sa.String),
            leased_until_ms=sa.bindparam("until_ms", type_=sa.BigInteger),
        )
    )


class Queue:
    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self._candidates = _claim_candidates(connector)
        self._turns = _claim_candidates(connector, turns=True)
        self._lease = _lease_update()

    # -- enqueue, inside the scan's transaction -----------------------------------------

    def enqueue(self, conn: sa.Connection, messages: Sequence[Message], now_ms: int) -> int:
        """Enqueue `messages` in order; returns how many rows were added or refreshed.

        Notifies go in bulk (a scan may queue tens of thousands): one look-up of the slots
        that already have a waiting row per batch, then one UPDATE and one INSERT statement
        for all of them, instead of two statements per message.
        """
        written = 0
        notifies: dict[str, Message] = {}
        for message in messages:
            if message.kind == "notify":
                if message.dedupe_key in notifies:
                    written += 1  # refreshes the row queued just before, as it would alone
                notifies[message.dedupe_key] = message  # keeps the first one's place
                continue
            written += self._enqueue_notifies(conn, notifies, now_ms)
            notifies = {}
            written += self._enqueue_trigger(conn, message, now_ms)
        return written + self._enqueue_notifies(conn, notifies, now_ms)

    def _enqueue_notifies(
        self, conn: sa.Connection, notifies: Mapping[str, Message], now_ms: int
    ) -> int:
        o = t.outbox.c
        keys = list(notifies)
        # Only a message nobody holds is refreshed in place. One whose lease ran out may still
        # be on the wire from a process that is not dead after all; the newer state gets a row
        # of its own, and the older row is dropped as superseded when it is next claimed.
        waiting: set[str] = set()
        for start in range(0, len(keys), LOOKUP_BATCH):
            query = sa.select(o.dedupe_key).where(
                o.dedupe_key.in_(keys[start : start + LOOKUP_BATCH]),
                o.state == t.PENDING,
                o.lease_token.is_(None),
            )
            # Lock the waiting rows: a claim skips them until this scan commits, instead of
            # leasing one between this look-up and its refresh (the newer state would then be
            # lost). SQLite's write transaction already excludes every claim.
            waiting.update(conn.execute(self.connector.dialect.lock_rows(query)).scalars())
        refresh = [notifies[k] for k in keys if k in waiting]
        insert = [notifies[k] for k in keys if k not in waiting]
        if refresh:
            conn.execute(
                sa.update(t.outbox)
                .where(
                    o.dedupe_key == sa.bindparam("slot_key"),
                    o.state == t.PENDING,
                    o.lease_token.is_(None),
                )
                .values(
                    payload=sa.bindparam("body"),
                    slot_start_ms=sa.bindparam("start_epoch_ms"),
                    reason=sa.bindparam("why"),
                    # A slot that moved to another integration goes to the new one.
                    integration_id=sa.bindparam("to"),
                    updated_ms=now_ms,
                    # A new state starts a new attempt budget; the backoff in progress
                    # (available_ms) and the age of the oldest change (created_ms) stay.
                    attempts=0,
                    leased_until_ms=None,
                ),
                [
                    {
                        "slot_key": m.dedupe_key,
                        "body": _body(m),
                        "start_epoch_ms": _start_ms(m),
                        "why": m.reason,
                        "to": m.integration_id,
                    }
                    for m in refresh
                ],
            )
        if insert:
            conn.execute(sa.insert(t.outbox), [_new_row(m, now_ms) for m in insert])
        return len(keys)

    @staticmethod
    def _enqueue_trigger(conn: sa.Connection, message: Message, now_ms: int) -> int:
        """One waiting trigger covers every catalog change made before it is sent: a second
        one is not queued while one waits (one in flight does not count: it may have read the
        catalog before this change)."""
        o = t.outbox.c
        waiting = sa.and_(
            o.dedupe_key == message.dedupe_key,
            o.state == t.PENDING,
            o.lease_token.is_(None),
        )
        if conn.execute(sa.select(o.id).where(waiting).limit(1)).first() is not None:
            return 0
        conn.execute(sa.insert(t.outbox).values(**_new_row(message, now_ms)))
        return 1

    # -- delivery -----------------------------------------------------------------------

    def claim(
        self,
        now: datetime,
        *,
        limit: int,
        lease_s: float,
        skip: Sequence[str] = (),
        after: str | None = None,
    ) -> list[OutboxMessage]:
        """Reserve up to `limit` due messages under a lease of `lease_s`, none of the
        integrations in `skip` (paused on their own). Oldest first; with `after` (a
        platform), those of the next integrations after it in id order, so that one
        integration's backlog of any size waits its turn behind the others' changes."""
        now_ms = to_epoch_ms(now)
        until_ms = now_ms + int(lease_s * 1000)
        claim = _Claim()
        try:
            # A claim the database rolls back to break a deadlock is made again, whole.
            return self.connector.transact(
                lambda conn: self._claim(conn, limit, claim, now_ms, until_ms, list(skip), after)
            )
        except SQLAlchemyError:
            # The connection died: the lease UPDATE may have committed without this process
            # hearing of it. Its rows would wait out their lease; give them back now.
            if claim.token is not None:
                with suppress(SQLAlchemyError), self.connector.write() as conn:
                    conn.execute(
                        sa.update(t.outbox)
                        .where(t.outbox.c.lease_token == claim.token)
                        .values(lease_token=None, leased_until_ms=None)
                    )
            raise

    def _claim(
        self,
        conn: sa.Connection,
        limit: int,
        claim: _Claim,
        now_ms: int,
        until_ms: int,
        skip: list[str],
        after: str | None,
    ) -> list[OutboxMessage]:
        o = t.outbox.c
        # Rows other claims hold are skipped; a lock on the whole table (a migration, a
        # LOCK TABLE) is waited for only this long, then the claim fails and is retried.
        self.connector.dialect.limit_lock_wait(conn, CLAIM_LOCK_WAIT_S)
        bound = {"now_ms": now_ms, "claim_limit": limit, "skip": skip}
        if after is None:
            rows = conn.execute(self._candidates, bound).all()
        else:
            rows = conn.execute(self._turns, {**bound, "after": after}).all()
        if superseded_ids := [r.id for r in rows if r.superseded]:
            conn.execute(sa.delete(t.outbox).where(o.id.in_(superseded_ids)))
        wanted = [r for r in rows if not r.superseded]
        if not wanted:
            return []
        # One token for the batch: a message is held by its id and the token together.
        token = claim.token = str(uuid.uuid4())
        taken = conn.execute(
            self._lease,
            {
                "ids": [r.id for r in wanted],
                "now_ms": now_ms,
                "token": token,
                "until_ms": until_ms,
            },
        ).rowcount
        if taken != len(wanted):
            # Another consumer got in between the two statements (the candidates are
            # locked on PostgreSQL and MySQL, and SQLite has one writer, so this is a
            # safeguard): keep only the rows that carry this claim's token.
            mine = set(
                conn.execute(
                    sa.select(o.id).where(o.id.in_([r.id for r in wanted]), o.lease_token == token)
                ).scalars()
            )
            wanted = [r for r in wanted if r.id in mine]
        return [
            OutboxMessage(
                id=row.id,
                kind=row.kind,
                dedupe_key=row.dedupe_key,
                body=row.payload,
                attempts=row.attempts,
                created_at=from_epoch_ms(row.created_ms),
                slot_start=None if row.slot_start_ms is None else from_epoch_ms(row.slot_start_ms),
                lease_token=token,
                integration_id=row.integration_id,
            )
            for row in wanted
        ]

    def extend(self, messages: Sequence[OutboxMessage], *, until: datetime) -> set[int]:
        """Extend the lease of claimed messages to `until`; returns the ids still held (a
        message whose lease ran out and was taken by another worker is not among them)."""
        if not messages:
            return set()
        o = t.outbox.c
        ids = [m.id for m in messages]
        tokens = {m.lease_token for m in messages}

        def extend(conn: sa.Connection) -> set[tuple[int, str | None]]:
            extended = conn.execute(
                sa.update(t.outbox)
                .where(o.id.in_(ids), o.lease_token.in_(tokens), o.state == t.PENDING)
                .values(leased_until_ms=to_epoch_ms(until))
            ).rowcount
            if extended == len(ids):
                return {(m.id, m.lease_token) for m in messages}
            return {
                (row.id, row.lease_token)
                for row in conn.execute(
                    sa.select(o.id, o.lease_token).where(o.id.in_(ids), o.lease_token.in_(tokens))
                )
            }

        held = self.connector.transact(extend)
        return {m.id for m in messages if (m.id, m.lease_token) in held}

    def drop_superseded(self, messages: Sequence[OutboxMessage]) -> set[int]:
        """Of these claimed messages, delete those a newer waiting message for the same slot
        has replaced since they were claimed (sending them would put an older state on the
        wire after a newer one was decided); returns their ids."""
        if not messages:
            return set()
        return self.connector.transact(lambda conn: self._replaced(conn, messages))

    @staticmethod
    def _replaced(conn: sa.Connection, messages: Sequence[OutboxMessage]) -> set[int]:
        """Delete those of these held messages that a newer waiting message for the same key
        replaced; returns their ids. A failed or unsent message goes back to waiting only when
        nothing newer waits: a slot has one waiting message, and one trigger waits."""
        o = t.outbox.c
        newer = t.outbox.alias("newer")
        held = sa.and_(
            o.id.in_([m.id for m in messages]),
            o.lease_token.in_({m.lease_token for m in messages}),
        )
        stale = set(
            conn.execute(
                sa.select(o.id).where(
                    held,
                    sa.exists().where(
                        newer.c.dedupe_key == o.dedupe_key,
                        newer.c.state == t.PENDING,
                        newer.c.id > o.id,
                    ),
                )
            ).scalars()
        )
        if stale:
            conn.execute(sa.delete(t.outbox).where(held, o.id.in_(stale)))
        return stale

    def complete(self, message: OutboxMessage) -> bool:
        """The call succeeded: the message leaves the outbox. False if the lease was lost."""
        return self.complete_many([message]) == 1

    def complete_many(self, messages: Sequence[OutboxMessage]) -> int:
        """Calls that succeeded, in one transaction; returns how many were still held (the
        rest had lost their lease and stay for their new holder)."""
        if not messages:
            return 0
        o = t.outbox.c
        return self.connector.transact(
            lambda conn: int(
                conn.execute(
                    sa.delete(t.outbox).where(
                        o.id == sa.bindparam("message_id"), o.lease_token == sa.bindparam("token")
                    ),
                    [{"message_id": m.id, "token": m.lease_token} for m in messages],
                ).rowcount
            )
        )

    def retry_later(
        self,
        message: OutboxMessage,
        *,
        at: datetime,
        error: str,
        status: int | None,
        count_attempt: bool = True,
    ) -> bool:
        """Keep the message for another attempt at `at`, recording why this one failed."""
        o = t.outbox.c
        return self._update_held(
            message,
            waiting=True,
            attempts=o.attempts + (1 if count_attempt else 0),
            available_ms=to_epoch_ms(at),
            last_error=error,
            last_status=status,
        )

    def dead_letter(
        self, message: OutboxMessage, *, error: str, status: int | None, at: datetime
    ) -> bool:
        """Give up on the message but keep it, with the reason, for an operator to see."""
        o = t.outbox.c
        return self._update_held(
            message,
            waiting=False,
            state=t.DEAD,
            updated_ms=to_epoch_ms(at),
            attempts=o.attempts + 1,
            last_error=error,
            last_status=status,
        )

    def release(self, message: OutboxMessage, *, at: datetime) -> bool:
        """Give back a claimed message that was not sent (shutdown, pause, open breaker)."""
        return self._update_held(message, waiting=True, available_ms=to_epoch_ms(at))

    def release_many(self, messages: Sequence[OutboxMessage], *, at: datetime) -> int:
        """`release` for several messages in one statement; returns how many were held."""
        if not messages:
            return 0
        o = t.outbox.c

        def release(conn: sa.Connection) -> int:
            gone = self._replaced(conn, messages)
            rest = [m for m in messages if m.id not in gone]
            if not rest:
                return len(gone)
            return len(gone) + int(
                conn.execute(
                    sa.update(t.outbox)
                    .where(
                        o.id == sa.bindparam("message_id"), o.lease_token == sa.bindparam("token")
                    )
                    .values(available_ms=to_epoch_ms(at), lease_token=None, leased_until_ms=None),
                    [{"message_id": m.id, "token": m.lease_token} for m in rest],
                ).rowcount
            )

        return self.connector.transact(release)

    def release_orphaned(self) -> int:
        """Give back every lease in the outbox; returns how many there were. Only for a store
        no other process can be using (a SQLite file under this process's lock): a lease
        found there was taken by a process that ended without giving it back (killed, or
        crashed), and its messages would otherwise wait out delivery.lease. Sending them now
        is what the lease's end would do: at-least-once, a call in flight at the kill is
        sent again."""
        o = t.outbox.c
        return self.connector.transact(
            lambda conn: int(
                conn.execute(
                    sa.update(t.outbox)
                    .where(o.state == t.PENDING, o.lease_token.is_not(None))
                    .values(lease_token=None, leased_until_ms=None)
                ).rowcount
            )
        )

    def discard(self, message: OutboxMessage) -> bool:
        """Drop a message that no longer needs sending (its slot has already started)."""
        return self.complete(message)

    def _update_held(self, message: OutboxMessage, *, waiting: bool, **values: object) -> bool:
        """Change a message this process still holds, and give its lease up; one that goes
        back to `waiting` is deleted instead when a newer one for its key waits already."""
        o = t.outbox.c

        def update(conn: sa.Connection) -> bool:
            if waiting and self._replaced(conn, [message]):
                return True
            return bool(
                conn.execute(
                    sa.update(t.outbox)
                    .where(o.id == message.id, o.lease_token == message.lease_token)
                    .values(**values, lease_token=None, leased_until_ms=None)
                ).rowcount
            )

        return self.connector.transact(update)

    def next_due(self) -> datetime | None:
        """When the earliest waiting message becomes due, or None if nothing is waiting."""
        o = t.outbox.c
        with self.connector.read() as conn:
            first = conn.execute(
                sa.select(sa.func.min(o.available_ms)).where(o.state == t.PENDING)
            ).scalar()
        return None if first is None else from_epoch_ms(first)


class _Claim:
    """The lease token of a claim in progress, known before its transaction ends."""

    token: str | None = None


def _body(message: Message) -> str | None:
    return None if message.payload is None else request_body(message.payload)


def _start_ms(message: Message) -> int | None:
    return None if message.slot_start is None else to_epoch_ms(message.slot_start)


def _new_row(message: Message, now_ms: int) -> dict[str, object]:
    return {
        "kind": message.kind,
        "dedupe_key": message.dedupe_key,
        "payload": _body(message),
        "state": t.PENDING,
        "reason": message.reason,
        "created_ms": now_ms,
        "updated_ms": now_ms,
        "available_ms": now_ms,
        "slot_start_ms": _start_ms(message),
        "attempts": 0,
        "integration_id": message.integration_id,
    }
