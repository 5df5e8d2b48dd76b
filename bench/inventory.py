"""The partner inventory the benchmarks read: a typical tour supplier's PostgreSQL schema.

products(id, title, price_cents, published) -> options(id text, product_id) ->
slots(id bigint, option_id, starts_at timestamp, capacity, booked, cancelled, updated_at
timestamptz). Each inventory lives in its own schema (s100000, s1000000, ...) of the bench
database and is generated with COPY: 200 slots per option, 4 options per product, starts from
tomorrow on, all in the future, wall-clock time in Europe/Istanbul. updated_at starts a day in
the past and is indexed, so a change query (`updated_at >= :since`) finds only real changes.

Changes are made the way a booking system makes them: one UPDATE or DELETE statement that
sets updated_at = now(), committed.
"""

from __future__ import annotations

import io
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import psycopg
from psycopg import sql

SLOTS_PER_OPTION = 200
OPTIONS_PER_PRODUCT = 4
SLOTS_PER_DAY = 4
FIRST_HOUR = 9
HOURS_BETWEEN_SLOTS = 3
CAPACITY_RANGE = (10, 60)
CANCELLED_FRACTION = 0.01
COPY_CHUNK_ROWS = 50_000
"""Rows formatted per write to the COPY stream."""

MUTABLE_FRACTION = 0.9
"""Changes pick slots among the first 90% of ids; deletions take ids from the last 10%, so a
deleted slot is never picked for an update later in the run."""

ZONE_NAME = "Europe/Istanbul"
"""The source's time zone: slot starts are naive wall-clock times there (no DST since 2016)."""


def schema_name(slots: int) -> str:
    return f"s{slots}"


@dataclass(frozen=True)
class Queries:
    """The agent's three source queries for one inventory schema."""

    catalog: str
    slots: str
    slots_changed: str


def queries(schema: str) -> Queries:
    """The README's queries for the typical schema, pointed at `schema`."""
    slots = (
        "SELECT o.product_id, s.option_id, s.id AS availability_id,\n"
        "       s.starts_at AS local_date_time_start,\n"
        "       CASE WHEN s.cancelled THEN 'CLOSED' END AS status,\n"
        "       s.capacity - s.booked AS vacancies, s.capacity\n"
        f"FROM {schema}.slots s JOIN {schema}.options o ON o.id = s.option_id\n"
        "WHERE s.starts_at >= now() - interval '1 day'"
    )
    return Queries(
        catalog=(
            "SELECT p.id AS product_id, o.id AS option_id, p.title, p.price_cents,\n"
            "       o.name AS option_name\n"
            f"FROM {schema}.products p JOIN {schema}.options o ON o.product_id = p.id\n"
            "WHERE p.published"
        ),
        slots=slots,
        slots_changed=slots + "\n  AND s.updated_at >= :since",
    )


@dataclass
class Inventory:
    """One generated inventory: its schema, its size and the ids free for changes."""

    schema: str
    slots: int
    ids: IdPool

    @property
    def table(self) -> sql.Composed:
        return sql.SQL("{}.slots").format(sql.Identifier(self.schema))


class IdPool:
    """Hands out slot ids for changes without repeating one before the pool runs dry."""

    def __init__(self, slots: int, seed: int) -> None:
        self._rand = random.Random(seed)
        self._mutable = max(1, int(slots * MUTABLE_FRACTION))
        self._order: list[int] = []
        self._next_delete = slots

    def take(self, count: int) -> list[int]:
        taken: list[int] = []
        while len(taken) < count:
            if not self._order:
                self._order = list(range(1, self._mutable + 1))
                self._rand.shuffle(self._order)
            taken.append(self._order.pop())
        return taken

    def take_for_delete(self, count: int) -> list[int]:
        """Ids of slots that still exist and will never be updated (the top of the range)."""
        ids = list(range(self._next_delete, self._next_delete - count, -1))
        if ids and ids[-1] <= self._mutable:
            raise RuntimeError("the inventory ran out of slots reserved for deletions")
        self._next_delete -= count
        return ids


def create(conn: psycopg.Connection, slots: int, seed: int) -> Inventory:
    """Create schema s<slots> and fill it with COPY; returns its handle."""
    schema = schema_name(slots)
    ident = sql.Identifier(schema)
    rand = random.Random(seed)
    options = max(1, slots // SLOTS_PER_OPTION)
    products = max(1, -(-options // OPTIONS_PER_PRODUCT))
    with conn.transaction():
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
        conn.execute(
            sql.SQL(
                "CREATE TABLE {}.products (id integer PRIMARY KEY, title text NOT NULL, "
                "price_cents integer NOT NULL, published boolean NOT NULL)"
            ).format(ident)
        )
        conn.execute(
            sql.SQL(
                "CREATE TABLE {}.options (id text PRIMARY KEY, product_id integer NOT NULL, "
                "name text NOT NULL)"
            ).format(ident)
        )
        conn.execute(
            sql.SQL(
                "CREATE TABLE {}.slots (id bigint NOT NULL, option_id text NOT NULL, "
                "starts_at timestamp NOT NULL, capacity integer NOT NULL, "
                "booked integer NOT NULL, cancelled boolean NOT NULL, "
                "updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(ident)
        )
        with conn.cursor().copy(
            sql.SQL("COPY {}.products (id, title, price_cents, published) FROM STDIN").format(ident)
        ) as copy:
            for product in range(1, products + 1):
                copy.write_row((product, f"Tour {product}", 1000 + product % 9000, True))
        with conn.cursor().copy(
            sql.SQL("COPY {}.options (id, product_id, name) FROM STDIN").format(ident)
        ) as copy:
            for option in range(options):
                product = option // OPTIONS_PER_PRODUCT + 1
                copy.write_row((option_id_of(option), product, f"Option {option}"))
        loaded_at = (datetime.now() - timedelta(days=1)).isoformat(sep=" ") + "+00"
        with conn.cursor().copy(
            sql.SQL(
                "COPY {}.slots (id, option_id, starts_at, capacity, booked, cancelled, "
                "updated_at) FROM STDIN"
            ).format(ident)
        ) as copy:
            for chunk in slot_lines(slots, rand, ("t", "f"), loaded_at):
                copy.write(chunk)
        conn.execute(sql.SQL("ALTER TABLE {}.slots ADD PRIMARY KEY (id)").format(ident))
        conn.execute(
            sql.SQL("CREATE INDEX ON {}.slots (updated_at)").format(ident),
        )
        conn.execute(sql.SQL("CREATE INDEX ON {}.slots (option_id)").format(ident))
    conn.execute(sql.SQL("ANALYZE {}.products").format(ident))
    conn.execute(sql.SQL("ANALYZE {}.options").format(ident))
    conn.execute(sql.SQL("ANALYZE {}.slots").format(ident))
    return Inventory(schema=schema, slots=slots, ids=IdPool(slots, seed))


def slot_lines(
    slots: int, rand: random.Random, booleans: tuple[str, str], updated_at: str
) -> Iterator[str]:
    """The slots table as tab-separated lines, COPY_CHUNK_ROWS at a time (PostgreSQL's COPY
    and MySQL's LOAD DATA read the same text; `booleans` spells true and false)."""
    options = max(1, slots // SLOTS_PER_OPTION)
    first_day = date.today() + timedelta(days=1)
    buffer = io.StringIO()
    for slot_id in range(1, slots + 1):
        index = slot_id - 1
        option = min(index // SLOTS_PER_OPTION, options - 1)
        k = index % SLOTS_PER_OPTION
        day = first_day + timedelta(days=k // SLOTS_PER_DAY)
        hour = FIRST_HOUR + HOURS_BETWEEN_SLOTS * (k % SLOTS_PER_DAY)
        capacity = rand.randint(*CAPACITY_RANGE)
        booked = rand.randint(0, capacity)
        cancelled = booleans[0] if rand.random() < CANCELLED_FRACTION else booleans[1]
        buffer.write(
            f"{slot_id}\t{option_id_of(option)}\t{day.isoformat()} {hour:02d}:00:00\t"
            f"{capacity}\t{booked}\t{cancelled}\t{updated_at}\n"
        )
        if slot_id % COPY_CHUNK_ROWS == 0:
            yield buffer.getvalue()
            buffer = io.StringIO()
    yield buffer.getvalue()


def option_id_of(option: int) -> str:
    return f"opt-{option:06d}"


def slot_key(slot_id: int) -> tuple[str, str, str]:
    """The agent's key of a generated slot: (product_id, option_id, availability_id)."""
    option = (slot_id - 1) // SLOTS_PER_OPTION
    return (str(option // OPTIONS_PER_PRODUCT + 1), option_id_of(option), str(slot_id))


BOOK_ONE_SQL = (
    "UPDATE {table} SET booked = CASE WHEN booked < capacity THEN booked + 1 "
    "ELSE booked - 1 END, updated_at = now() - make_interval(secs => %s) WHERE id = ANY(%s) "
    "RETURNING id, capacity - booked"
)
"""A booking (or, on a full slot, a cancellation of one seat): vacancies always change."""


def book(
    conn: psycopg.Connection,
    inventory: Inventory,
    ids: Sequence[int],
    *,
    stamp_behind_s: float = 0.0,
) -> dict[str, int]:
    """Change the vacancies of `ids` in one committed statement: {availability id: vacancies}.

    `stamp_behind_s` stamps updated_at that long before the commit, as a transaction that
    began then (updated_at = now() is its start) would."""
    statement = sql.SQL(BOOK_ONE_SQL).format(table=inventory.table)
    with conn.transaction():
        rows = conn.execute(statement, (stamp_behind_s, list(ids))).fetchall()
    return {str(slot_id): int(vacancies) for slot_id, vacancies in rows}


def delete(conn: psycopg.Connection, inventory: Inventory, ids: Sequence[int]) -> list[str]:
    """Delete `ids` in one committed statement; returns the availability ids deleted."""
    statement = sql.SQL("DELETE FROM {table} WHERE id = ANY(%s) RETURNING id").format(
        table=inventory.table
    )
    with conn.transaction():
        rows = conn.execute(statement, (list(ids),)).fetchall()
    return [str(r[0]) for r in rows]


def mixed_changes(conn: psycopg.Connection, inventory: Inventory, count: int) -> tuple[int, int]:
    """About `count` changed rows: 95% bookings, 5% deletions. Returns (booked, deleted)."""
    deletions = max(1, count // 20)
    booked = book(conn, inventory, inventory.ids.take(count - deletions))
    deleted = delete(conn, inventory, inventory.ids.take_for_delete(deletions))
    return len(booked), len(deleted)
