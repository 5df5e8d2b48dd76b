"""The state store over SQLAlchemy Core: one implementation for SQLite, PostgreSQL and MySQL.

Two promises hold here:
- a scan's fingerprints and the messages it decided are written in one transaction, so a
  crash at any point neither loses an update nor invents one;
- a message is delivered under a lease: a claim reserves it for `lease_s`, and only the holder
  of the lease token can complete it. A process that dies mid-request leaves a lease that
  expires, and the message is taken again.

Outbox rules: a slot has at most one waiting (unleased) message, updated in place with the
newest absolute state; catalog changes keep at most one waiting trigger; a notify is not
claimed while an older trigger is waiting, nor while an older message for the same slot is
in flight.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from agent.clock import from_epoch_ms, to_epoch_ms
from agent.db import create_engine, redact_url
from agent.errors import StateError
from agent.model import (
    CatalogDiff,
    CatalogKey,
    Message,
    OutboxMessage,
    SlotDiff,
    SlotKey,
    StoredSlot,
)
from agent.outbox import tables as t
from agent.rows import slot_fingerprint

_META_BASELINE = "baseline_ms"
_META_CURSOR = "cursor:"
_META_STATUS = "status:"

LOOKUP_BATCH = 500
"""Keys per IN (...) lookup on PostgreSQL and MySQL: far below their bound-parameter limits."""

SQLITE_LOOKUP_BATCH = 300
"""Keys per VALUES list on SQLite: 900 bound parameters, under the 999 of older SQLite builds."""

STREAM_BATCH_ROWS = 5000
"""Stored slots fetched per round trip by iter_slots."""

_META_SCHEMA = "schema_version"


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


class StateStore:
    def __init__(self, engine: sa.Engine) -> None:
        self.engine = engine

    @classmethod
    def from_url(cls, url: str) -> StateStore:
        return cls(create_engine(url, role="state"))

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _write(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn:
            conn = conn.execution_options(sqlite_begin="IMMEDIATE")
            with conn.begin():
                yield conn

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        with self.engine.connect() as conn, conn.begin():
            yield conn

    def open(self) -> None:
        """Create the tables if needed and check the schema version."""
        url = redact_url(self.engine.url.render_as_string(hide_password=True))
        try:
            t.metadata.create_all(self.engine, checkfirst=True)
            with self._write() as conn:
                found = conn.execute(
                    sa.select(t.meta.c.value).where(t.meta.c.key == _META_SCHEMA)
                ).scalar()
                if found is None:
                    conn.execute(sa.insert(t.meta).values(key=_META_SCHEMA, value=t.SCHEMA_VERSION))
                elif found != t.SCHEMA_VERSION:
                    raise StateError(
                        f"the state store at {url} has schema version {found}; this agent "
                        f"uses {t.SCHEMA_VERSION}. Point [state] url at a new store or "
                        f"upgrade the agent."
                    )
        except SQLAlchemyError as exc:
            raise StateError(f"cannot open the state store at {url}: {_first_line(exc)}") from None

    def ping(self) -> None:
        """Raise if the store cannot be reached."""
        with self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    # -- fingerprints -------------------------------------------------------------------

    def is_baselined(self) -> bool:
        with self._read() as conn:
            return (
                conn.execute(
                    sa.select(t.meta.c.value).where(t.meta.c.key == _META_BASELINE)
                ).scalar()
                is not None
            )

    def load_catalog(self) -> dict[CatalogKey, str]:
        c = t.catalog_fingerprints.c
        with self._read() as conn:
            rows = conn.execute(sa.select(c.product_id, c.option_id, c.fingerprint))
            return {(r.product_id, r.option_id): r.fingerprint for r in rows}

    def load_slots(self) -> dict[SlotKey, StoredSlot]:
        with self._read() as conn:
            return {s.key: s for s in self._slots(conn, sa.select(*_SLOT_COLUMNS))}

    @contextmanager
    def reading(self) -> Iterator[sa.Connection]:
        """A read transaction for `iter_slots` (one consistent picture of the store)."""
        with self._read() as conn:
            yield conn

    def iter_slots(self, conn: sa.Connection) -> Iterator[StoredSlot]:
        """Every stored slot in key order (code-point order), streamed in batches."""
        c = t.slot_fingerprints.c
        query = sa.select(*_SLOT_COLUMNS).order_by(c.product_id, c.option_id, c.availability_id)
        result = conn.execution_options(stream_results=True, yield_per=STREAM_BATCH_ROWS).execute(
            query
        )
        try:
            # Unpacked by position: a million rows per scan, and attribute look-ups on a Row
            # cost more than the rest of the loop.
            for product_id, option_id, availability_id, fingerprint, local, start_ms in result:
                yield StoredSlot(
                    (product_id, option_id, availability_id),
                    fingerprint,
                    local,
                    from_epoch_ms(start_ms),
                )
        finally:
            result.close()

    def lookup_slots(self, keys: Sequence[SlotKey]) -> dict[SlotKey, StoredSlot]:
        """The stored slots among `keys` (for incremental polls and late rows of a merge)."""
        c = t.slot_fingerprints.c
        with self._read() as conn:
            rows = self._lookup(
                conn, _SLOT_COLUMNS, (c.product_id, c.option_id, c.availability_id), keys
            )
            return {s.key: s for s in map(_stored_slot, rows)}

    def lookup_catalog(self, keys: Collection[CatalogKey]) -> dict[CatalogKey, str]:
        """The stored fingerprints of the catalog rows among `keys` (for incremental polls:
        a poll needs a handful of them, not the whole catalog)."""
        c = t.catalog_fingerprints.c
        with self._read() as conn:
            rows = self._lookup(
                conn, (c.product_id, c.option_id, c.fingerprint), (c.product_id, c.option_id), keys
            )
            return {(r.product_id, r.option_id): r.fingerprint for r in rows}

    def _lookup(
        self,
        conn: sa.Connection,
        columns: Sequence[sa.Column[Any]],
        key: Sequence[sa.Column[Any]],
        keys: Collection[tuple[str, ...]],
    ) -> Iterator[sa.Row[Any]]:
        """Rows whose `key` columns equal one of `keys`, searched through the primary key."""
        ordered = list(keys)
        if self.backend == "sqlite":
            # SQLite answers a row-value IN list with a scan of the whole table, but joins a
            # list of VALUES to the table through its primary key: one statement per batch.
            table = key[0].table.name
            names = ", ".join(c.name for c in key)
            joined = " AND ".join(f"t.{c.name} = k.{c.name}" for c in key)
            selected = ", ".join(f"t.{c.name}" for c in columns)
            row = "(" + ", ".join("?" * len(key)) + ")"
            for start in range(0, len(ordered), SQLITE_LOOKUP_BATCH):
                batch = ordered[start : start + SQLITE_LOOKUP_BATCH]
                sql = (
                    f"WITH k({names}) AS (VALUES {', '.join([row] * len(batch))}) "  # noqa: S608 - names are the store's own
                    f"SELECT {selected} FROM k JOIN {table} t ON {joined}"
                )
                yield from conn.exec_driver_sql(sql, tuple(v for k in batch for v in k))
            return
        # PostgreSQL and MySQL search the primary key for each item of the IN list.
        for start in range(0, len(ordered), LOOKUP_BATCH):
            batch = ordered[start : start + LOOKUP_BATCH]
            yield from conn.execute(sa.select(*columns).where(sa.tuple_(*key).in_(batch)))

    @staticmethod
    def _slots(conn: sa.Connection, query: sa.Select[Any]) -> Iterator[StoredSlot]:
        for r in conn.execute(query):
            yield _stored_slot(r)

    def cursor(self, name: str) -> str | None:
        """The change cursor saved under `name` by the last scan, or None."""
        with self._read() as conn:
            value = conn.execute(
                sa.select(t.meta.c.value).where(t.meta.c.key == _META_CURSOR + name)
            ).scalar()
        return None if value is None else str(value)

    def commit_scan(
        self,
        catalog: CatalogDiff,
        slots: SlotDiff,
        messages: Sequence[Message],
        now: datetime,
        *,
        baseline: bool = False,
        cursors: Mapping[str, str] | None = None,
    ) -> int:
        """Record the new fingerprints and enqueue `messages`, all or nothing.

        `baseline` marks the state as baselined; `cursors` saves change cursors by name.
        Returns how many outbox rows were added or refreshed.
        """
        now_ms = to_epoch_ms(now)
        with self._write() as conn:
            self._apply_catalog(conn, catalog)
            self._apply_slots(conn, slots)
            written = self._enqueue_all(conn, messages, now_ms)
            if baseline:
                self._set_meta(conn, _META_BASELINE, str(now_ms))
            for name, value in (cursors or {}).items():
                self._set_meta(conn, _META_CURSOR + name, value)
        return written

    @staticmethod
    def _set_meta(conn: sa.Connection, key: str, value: str) -> None:
        conn.execute(sa.delete(t.meta).where(t.meta.c.key == key))
        conn.execute(sa.insert(t.meta).values(key=key, value=value))

    @staticmethod
    def _apply_catalog(conn: sa.Connection, diff: CatalogDiff) -> None:
        tbl = t.catalog_fingerprints
        if diff.added:
            conn.execute(
                sa.insert(tbl),
                [
                    {
                        "product_id": r.product_id,
                        "option_id": r.option_id,
                        "fingerprint": r.fingerprint,
                    }
                    for r in diff.added
                ],
            )
        if diff.changed:
            conn.execute(
                sa.update(tbl)
                .where(tbl.c.product_id == sa.bindparam("p"), tbl.c.option_id == sa.bindparam("o"))
                .values(fingerprint=sa.bindparam("f")),
                [{"p": r.product_id, "o": r.option_id, "f": r.fingerprint} for r in diff.changed],
            )
        if diff.removed:
            conn.execute(
                sa.delete(tbl).where(
                    tbl.c.product_id == sa.bindparam("p"), tbl.c.option_id == sa.bindparam("o")
                ),
                [{"p": p, "o": o} for p, o in diff.removed],
            )

    @staticmethod
    def _apply_slots(conn: sa.Connection, diff: SlotDiff) -> None:
        tbl = t.slot_fingerprints
        key_matches = sa.and_(
            tbl.c.product_id == sa.bindparam("p"),
            tbl.c.option_id == sa.bindparam("o"),
            tbl.c.availability_id == sa.bindparam("a"),
        )
        if diff.added:
            # Delete first: an incremental poll racing a full scan may both find a slot new.
            conn.execute(
                sa.delete(tbl).where(key_matches),
                [{"p": s.product_id, "o": s.option_id, "a": s.availability_id} for s in diff.added],
            )
            conn.execute(
                sa.insert(tbl),
                [
                    {
                        "product_id": s.product_id,
                        "option_id": s.option_id,
                        "availability_id": s.availability_id,
                        "fingerprint": slot_fingerprint(s),
                        "local_start": s.local_date_time_start,
                        "start_ms": to_epoch_ms(s.start_utc),
                    }
                    for s in diff.added
                ],
            )
        if diff.changed:
            conn.execute(
                sa.update(tbl)
                .where(
                    tbl.c.product_id == sa.bindparam("p"),
                    tbl.c.option_id == sa.bindparam("o"),
                    tbl.c.availability_id == sa.bindparam("a"),
                )
                .values(
                    fingerprint=sa.bindparam("f"),
                    local_start=sa.bindparam("ls"),
                    start_ms=sa.bindparam("sm"),
                ),
                [
                    {
                        "p": s.product_id,
                        "o": s.option_id,
                        "a": s.availability_id,
                        "f": slot_fingerprint(s),
                        "ls": s.local_date_time_start,
                        "sm": to_epoch_ms(s.start_utc),
                    }
                    for s in diff.changed
                ],
            )
        gone = [s.key for s in diff.removed] + list(diff.expired)
        if gone:
            conn.execute(
                sa.delete(tbl).where(
                    tbl.c.product_id == sa.bindparam("p"),
                    tbl.c.option_id == sa.bindparam("o"),
                    tbl.c.availability_id == sa.bindparam("a"),
                ),
                [{"p": p, "o": o, "a": a} for p, o, a in gone],
            )

    def _enqueue_all(self, conn: sa.Connection, messages: Sequence[Message], now_ms: int) -> int:
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
            if self.backend != "sqlite":
                # Lock the waiting rows: a claim skips them until this scan commits, instead
                # of leasing one between this look-up and its refresh (the newer state would
                # then be lost). SQLite's write transaction already excludes every claim.
                query = query.with_for_update()
            waiting.update(conn.execute(query).scalars())
        refresh = [notifies[k] for k in keys if k in waiting]
        insert = [notifies[k] for k in keys if k not in waiting]
        if refresh:
            conn.execute(
                sa.update(t.outbox)
                .where(
                    o.dedupe_key == sa.bindparam("k"),
                    o.state == t.PENDING,
                    o.lease_token.is_(None),
                )
                .values(
                    payload=sa.bindparam("p"),
                    slot_start_ms=sa.bindparam("s"),
                    reason=sa.bindparam("r"),
                    updated_ms=now_ms,
                    # A new state starts a new attempt budget; the backoff in progress
                    # (available_ms) and the age of the oldest change (created_ms) stay.
                    attempts=0,
                    leased_until_ms=None,
                ),
                [{"k": m.dedupe_key, **_stored_message(m)} for m in refresh],
            )
        if insert:
            conn.execute(
                sa.insert(t.outbox),
                [
                    {
                        "kind": m.kind,
                        "dedupe_key": m.dedupe_key,
                        "payload": stored["p"],
                        "state": t.PENDING,
                        "reason": m.reason,
                        "created_ms": now_ms,
                        "updated_ms": now_ms,
                        "available_ms": now_ms,
                        "slot_start_ms": stored["s"],
                        "attempts": 0,
                    }
                    for m in insert
                    for stored in (_stored_message(m),)
                ],
            )
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
        stored = _stored_message(message)
        conn.execute(
            sa.insert(t.outbox).values(
                kind=message.kind,
                dedupe_key=message.dedupe_key,
                payload=stored["p"],
                state=t.PENDING,
                reason=message.reason,
                created_ms=now_ms,
                updated_ms=now_ms,
                available_ms=now_ms,
                slot_start_ms=stored["s"],
                attempts=0,
            )
        )
        return 1

    # -- outbox -------------------------------------------------------------------------

    def claim(self, now: datetime, *, limit: int, lease_s: float) -> list[OutboxMessage]:
        """Reserve up to `limit` due messages, oldest first, under a lease of `lease_s`."""
        now_ms = to_epoch_ms(now)
        until_ms = now_ms + int(lease_s * 1000)
        o = t.outbox.c
        older_trigger = t.outbox.alias("older_trigger")
        older_same = t.outbox.alias("older_same")
        # The oldest waiting trigger, computed once: a correlated NOT EXISTS here made every
        # claim scan the whole backlog once per waiting row (quadratic in the backlog).
        first_trigger = (
            sa.select(sa.func.min(older_trigger.c.id))
            .where(older_trigger.c.kind == "trigger", older_trigger.c.state == t.PENDING)
            .scalar_subquery()
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
            .where(
                o.state == t.PENDING,
                o.available_ms <= now_ms,
                sa.or_(o.leased_until_ms.is_(None), o.leased_until_ms < now_ms),
                sa.or_(o.kind == "trigger", first_trigger.is_(None), o.id < first_trigger),
                ~sa.exists().where(
                    older_same.c.dedupe_key == o.dedupe_key,
                    older_same.c.state == t.PENDING,
                    older_same.c.id < o.id,
                ),
            )
            .order_by(o.id)
            .limit(limit)
        )
        if self.backend in ("postgresql", "mysql", "mariadb"):
            # Several agents on one store: each skips the rows another is claiming instead of
            # queueing behind its lock (the conditional UPDATE below stays as the guarantee).
            candidates = candidates.with_for_update(skip_locked=True, of=t.outbox)
        claimed: list[OutboxMessage] = []
        with self._write() as conn:
            rows = conn.execute(candidates).all()
            if superseded_ids := [r.id for r in rows if r.superseded]:
                conn.execute(sa.delete(t.outbox).where(o.id.in_(superseded_ids)))
            wanted = [r for r in rows if not r.superseded]
            if not wanted:
                return []
            # One token for the batch: a message is held by its id and the token together.
            token = str(uuid.uuid4())
            taken = conn.execute(
                sa.update(t.outbox)
                .where(
                    o.id.in_([r.id for r in wanted]),
                    o.state == t.PENDING,
                    sa.or_(o.leased_until_ms.is_(None), o.leased_until_ms < now_ms),
                )
                .values(lease_token=token, leased_until_ms=until_ms)
            ).rowcount
            if taken != len(wanted):
                # Another consumer got in between the two statements (the candidates are
                # locked on PostgreSQL and MySQL, and SQLite has one writer, so this is a
                # safeguard): keep only the rows that carry this claim's token.
                mine = set(
                    conn.execute(
                        sa.select(o.id).where(
                            o.id.in_([r.id for r in wanted]), o.lease_token == token
                        )
                    ).scalars()
                )
                wanted = [r for r in wanted if r.id in mine]
            for row in wanted:
                claimed.append(
                    OutboxMessage(
                        id=row.id,
                        kind=row.kind,
                        dedupe_key=row.dedupe_key,
                        payload=None if row.payload is None else json.loads(row.payload),
                        attempts=row.attempts,
                        created_at=from_epoch_ms(row.created_ms),
                        slot_start=None
                        if row.slot_start_ms is None
                        else from_epoch_ms(row.slot_start_ms),
                        lease_token=token,
                    )
                )
        return claimed

    def _held(self, message: OutboxMessage) -> sa.ColumnElement[bool]:
        o = t.outbox.c
        return sa.and_(o.id == message.id, o.lease_token == message.lease_token)

    def complete(self, message: OutboxMessage) -> bool:
        """The call succeeded: the message leaves the outbox. False if the lease was lost."""
        return self.complete_many([message]) == 1

    def complete_many(self, messages: Sequence[OutboxMessage]) -> int:
        """Calls that succeeded, in one transaction; returns how many were still held (the
        rest had lost their lease and stay for their new holder)."""
        if not messages:
            return 0
        o = t.outbox.c
        with self._write() as conn:
            result = conn.execute(
                sa.delete(t.outbox).where(
                    o.id == sa.bindparam("i"), o.lease_token == sa.bindparam("t")
                ),
                [{"i": m.id, "t": m.lease_token} for m in messages],
            )
            return int(result.rowcount)

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
        now_ms = to_epoch_ms(at)
        o = t.outbox.c
        with self._write() as conn:
            return bool(
                conn.execute(
                    sa.update(t.outbox)
                    .where(self._held(message))
                    .values(
                        attempts=o.attempts + (1 if count_attempt else 0),
                        available_ms=now_ms,
                        last_error=error,
                        last_status=status,
                        lease_token=None,
                        leased_until_ms=None,
                    )
                ).rowcount
            )

    def dead_letter(
        self, message: OutboxMessage, *, error: str, status: int | None, at: datetime
    ) -> bool:
        """Give up on the message but keep it, with the reason, for an operator to see."""
        o = t.outbox.c
        with self._write() as conn:
            return bool(
                conn.execute(
                    sa.update(t.outbox)
                    .where(self._held(message))
                    .values(
                        state=t.DEAD,
                        updated_ms=to_epoch_ms(at),
                        attempts=o.attempts + 1,
                        last_error=error,
                        last_status=status,
                        lease_token=None,
                        leased_until_ms=None,
                    )
                ).rowcount
            )

    def release(self, message: OutboxMessage, *, at: datetime) -> bool:
        """Give back a claimed message that was not sent (shutdown, pause, open breaker)."""
        with self._write() as conn:
            return bool(
                conn.execute(
                    sa.update(t.outbox)
                    .where(self._held(message))
                    .values(available_ms=to_epoch_ms(at), lease_token=None, leased_until_ms=None)
                ).rowcount
            )

    # -- status shared between processes -----------------------------------------------

    def set_status(self, name: str, value: str | None) -> None:
        """Record a delivery status (pause, breaker, last delivery) for `outbox status`."""
        with self._write() as conn:
            conn.execute(sa.delete(t.meta).where(t.meta.c.key == _META_STATUS + name))
            if value is not None:
                conn.execute(sa.insert(t.meta).values(key=_META_STATUS + name, value=value))

    def status(self) -> dict[str, str]:
        with self._read() as conn:
            rows = conn.execute(
                sa.select(t.meta.c.key, t.meta.c.value).where(t.meta.c.key.startswith(_META_STATUS))
            )
            return {key.removeprefix(_META_STATUS): value for key, value in rows}

    def hold_scanner(self, owner: str, now: datetime, lease_s: float) -> bool:
        """Take or renew the scanner lease: one agent scans at a time on a shared store.

        The lease is a row in the meta table, so it works the same on every backend; a holder
        that dies is replaced once its lease has run out.
        """
        key = _META_STATUS + "scanner"
        now_ms = to_epoch_ms(now)
        mine = f"{owner} {now_ms + int(lease_s * 1000)}"
        with self._write() as conn:
            current = conn.execute(
                sa.select(t.meta.c.value).where(t.meta.c.key == key).with_for_update()
            ).scalar()
            if current is not None:
                holder, _, until = current.rpartition(" ")
                if holder != owner and int(until) > now_ms:
                    return False
                conn.execute(sa.update(t.meta).where(t.meta.c.key == key).values(value=mine))
            else:
                conn.execute(sa.insert(t.meta).values(key=key, value=mine))
        return True

    # -- operator commands --------------------------------------------------------------

    def retry_dead(self, now: datetime, *, ids: Sequence[int] = (), kind: str | None = None) -> int:
        """Put dead letters back in the queue (all, or those with `ids`, or of one `kind`)."""
        o = t.outbox.c
        query = sa.update(t.outbox).where(o.state == t.DEAD)
        if ids:
            query = query.where(o.id.in_(list(ids)))
        if kind is not None:
            query = query.where(o.kind == kind)
        now_ms = to_epoch_ms(now)
        with self._write() as conn:
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
        with self._write() as conn:
            return int(conn.execute(query).rowcount)

    def discard(self, message: OutboxMessage) -> bool:
        """Drop a message that no longer needs sending (its slot has already started)."""
        return self.complete(message)

    def next_due(self) -> datetime | None:
        """When the earliest waiting message becomes due, or None if nothing is waiting."""
        o = t.outbox.c
        with self._read() as conn:
            first = conn.execute(
                sa.select(sa.func.min(o.available_ms)).where(o.state == t.PENDING)
            ).scalar()
        return None if first is None else from_epoch_ms(first)

    def stats(self) -> OutboxStats:
        o = t.outbox.c
        with self._read() as conn:
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
        with self._read() as conn:
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


_SLOT_COLUMNS = (
    t.slot_fingerprints.c.product_id,
    t.slot_fingerprints.c.option_id,
    t.slot_fingerprints.c.availability_id,
    t.slot_fingerprints.c.fingerprint,
    t.slot_fingerprints.c.local_start,
    t.slot_fingerprints.c.start_ms,
)


def _stored_message(message: Message) -> dict[str, Any]:
    """The payload ("p"), slot start ("s") and reason ("r") of a message as the outbox keeps
    them."""
    return {
        "p": None if message.payload is None else json.dumps(message.payload, sort_keys=True),
        "s": None if message.slot_start is None else to_epoch_ms(message.slot_start),
        "r": message.reason,
    }


def _stored_slot(r: Any) -> StoredSlot:
    key = (r.product_id, r.option_id, r.availability_id)
    return StoredSlot(
        key=key,
        fingerprint=r.fingerprint,
        local_date_time_start=r.local_start,
        start_utc=from_epoch_ms(r.start_ms),
    )


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
