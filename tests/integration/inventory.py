"""A small tour supplier's inventory on SQLite, PostgreSQL or MariaDB, for the integration and
acceptance tiers.

The schema is what partners really have: integer product and slot ids, string option ids,
and a slot start column typed as the backend's natural choice (SQLite TEXT, PostgreSQL
`timestamp` plus a `timestamptz` twin, MariaDB DATETIME). `status` is a nullable text column
(NULL: derive it from vacancies and capacity). `Inventory.track_updates` adds the `updated_at`
column that incremental polls read, stamped by the writer with the database's own clock.
Helpers write the configuration file an Agent reads, compute the notify payloads Seyaha should
receive without using the agent's code, and run the daemon in a thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from zoneinfo import ZoneInfo

import pytest
import sqlalchemy as sa
from sqlalchemy.dialects import mysql, postgresql

from agent.sandbox import Call, Sandbox

if TYPE_CHECKING:
    from agent.app import Agent

ZONE_NAME = "Europe/Istanbul"
ZONE = ZoneInfo(ZONE_NAME)

BACKEND_PARAMS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
]
"""`@pytest.mark.parametrize("backend", BACKEND_PARAMS)`: one case per supported database."""

SERVER_PARAMS = BACKEND_PARAMS[1:]
"""The database servers (PostgreSQL, MariaDB): where two writers hold transactions open at
once, and where several agents share one state store."""

CATALOG_QUERY = """
SELECT p.id AS product_id, o.id AS option_id, p.title, p.price_cents, o.name AS option_name
FROM products p JOIN options o ON o.product_id = p.id
"""

SLOTS_QUERY = """
SELECT o.product_id, s.option_id, s.id AS availability_id,
       s.starts_at AS local_date_time_start, s.status, s.vacancies, s.capacity
FROM slots s LEFT JOIN options o ON o.id = s.option_id
"""
"""LEFT JOIN: a slot whose option was deleted comes back with a NULL product_id (a bad row)."""

SLOTS_CHANGED_QUERY = SLOTS_QUERY.rstrip() + "\nWHERE s.updated_at >= :since\n"
"""The slots query restricted to rows the writer stamped since the cursor (see
Inventory.track_updates)."""

CLOCK_SQL = {
    "sqlite": "strftime('%Y-%m-%d %H:%M:%f', 'now')",
    "postgresql": "now()",
    "mariadb": "NOW(6)",
}
"""How a booking system stamps updated_at with the database's own clock."""


def _metadata(backend: str) -> sa.MetaData:
    metadata = sa.MetaData()
    start_type: sa.types.TypeEngine[Any] = sa.Text() if backend == "sqlite" else sa.DateTime()
    sa.Table(
        "products",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("price_cents", sa.Integer, nullable=False),
    )
    sa.Table(
        "options",
        metadata,
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("product_id", sa.Integer, nullable=False),
        sa.Column("name", sa.String(200)),
    )
    columns = [
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
        sa.Column("option_id", sa.String(64), nullable=False),
        sa.Column("starts_at", start_type, nullable=False),
        sa.Column("status", sa.String(16), nullable=True),
        sa.Column("vacancies", sa.Integer, nullable=True),
        sa.Column("capacity", sa.Integer, nullable=True),
    ]
    if backend == "postgresql":
        columns.append(sa.Column("starts_at_tz", postgresql.TIMESTAMP(timezone=True)))
    sa.Table("slots", metadata, *columns)
    return metadata


class Inventory:
    """The partner's database, written the way their booking system would."""

    def __init__(self, backend: str, url: str) -> None:
        self.backend = backend
        self.url = url
        self.engine = sa.create_engine(url)
        self.metadata = _metadata(backend)
        self.products = self.metadata.tables["products"]
        self.options = self.metadata.tables["options"]
        self.slots = self.metadata.tables["slots"]
        self.tracks_updates = False

    @classmethod
    def create(cls, backend: str, url: str) -> Inventory:
        inventory = cls(backend, url)
        inventory.metadata.create_all(inventory.engine)
        return inventory

    def close(self) -> None:
        self.engine.dispose()

    # -- an updated_at column, stamped by the writer ------------------------------------

    @property
    def clock_sql(self) -> str:
        """SQL for the database's current time, as the writer stamps updated_at with it."""
        return CLOCK_SQL[self.backend]

    def clock(self) -> Any:
        """The database's current time, in the type an updated_at value has on this backend."""
        with self.engine.connect() as conn:
            return conn.execute(sa.text(f"SELECT {self.clock_sql}")).scalar_one()

    def track_updates(self) -> None:
        """Add slots.updated_at (NULL for the rows already there); from now on add_slot and
        update_slot stamp it with the database clock unless given a value."""
        column_type: sa.types.TypeEngine[Any] = {
            "sqlite": sa.Text(),
            "postgresql": postgresql.TIMESTAMP(timezone=True),
            "mariadb": mysql.DATETIME(fsp=6),
        }[self.backend]
        ddl = column_type.compile(dialect=self.engine.dialect)
        with self.engine.begin() as conn:
            conn.execute(sa.text(f"ALTER TABLE slots ADD COLUMN updated_at {ddl} NULL"))
        self.slots.append_column(sa.Column("updated_at", column_type, nullable=True))
        self.tracks_updates = True

    def _stamp(self, values: dict[str, Any]) -> dict[str, Any]:
        if self.tracks_updates and values.get("updated_at") is None:
            values["updated_at"] = sa.literal_column(self.clock_sql)
        return values

    def start_value(self, start: datetime | str) -> datetime | str:
        """How the booking system stores a start: text on SQLite, a native value elsewhere."""
        if isinstance(start, str) or self.backend != "sqlite":
            return start
        return start.isoformat(sep=" ")

    def add_product(
        self, product_id: int, title: str, price_cents: int, options: dict[str, str]
    ) -> None:
        """A product and its options ({option_id: name})."""
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(self.products).values(id=product_id, title=title, price_cents=price_cents)
            )
            for option_id, name in options.items():
                conn.execute(
                    sa.insert(self.options).values(id=option_id, product_id=product_id, name=name)
                )

    def add_slot(
        self,
        slot_id: int,
        option_id: str,
        start: datetime | str,
        *,
        capacity: int | None,
        vacancies: int | None,
        status: str | None = None,
        start_tz: datetime | None = None,
    ) -> None:
        values: dict[str, Any] = {
            "id": slot_id,
            "option_id": option_id,
            "starts_at": self.start_value(start),
            "status": status,
            "vacancies": vacancies,
            "capacity": capacity,
        }
        if start_tz is not None:
            values["starts_at_tz"] = start_tz
        with self.engine.begin() as conn:
            conn.execute(sa.insert(self.slots).values(**self._stamp(values)))

    def update_slot(self, slot_id: int, **values: Any) -> None:
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.update(self.slots)
                .where(self.slots.c.id == slot_id)
                .values(**self._stamp(dict(values)))
            )
            assert result.rowcount == 1, f"no slot {slot_id}"

    def delete_slot(self, slot_id: int) -> None:
        with self.engine.begin() as conn:
            result = conn.execute(sa.delete(self.slots).where(self.slots.c.id == slot_id))
            assert result.rowcount == 1, f"no slot {slot_id}"

    def remove_product(self, product_id: int) -> None:
        """A product leaves the catalog with its options and their slots, in one transaction."""
        with self.engine.begin() as conn:
            options = sa.select(self.options.c.id).where(self.options.c.product_id == product_id)
            option_ids = list(conn.execute(options).scalars())
            conn.execute(sa.delete(self.slots).where(self.slots.c.option_id.in_(option_ids)))
            conn.execute(sa.delete(self.options).where(self.options.c.product_id == product_id))
            result = conn.execute(sa.delete(self.products).where(self.products.c.id == product_id))
            assert result.rowcount == 1, f"no product {product_id}"

    def set_price(self, product_id: int, price_cents: int) -> None:
        with self.engine.begin() as conn:
            result = conn.execute(
                sa.update(self.products)
                .where(self.products.c.id == product_id)
                .values(price_cents=price_cents)
            )
            assert result.rowcount == 1, f"no product {product_id}"


# -- a standard data set ---------------------------------------------------------------


@dataclass(frozen=True)
class TourSlot:
    product_id: int
    option_id: str
    slot_id: int
    start: datetime
    """Naive wall-clock time in ZONE."""
    capacity: int | None
    vacancies: int | None
    status: str | None = None


def first_day(days_ahead: int = 3) -> date:
    """A day safely in the future in ZONE, so that no slot expires during a test."""
    return datetime.now(ZONE).date() + timedelta(days=days_ahead)


def at(day: date, hour: int, plus_days: int = 0) -> datetime:
    return datetime(day.year, day.month, day.day, hour, 0) + timedelta(days=plus_days)


def tour_slots(day: date) -> list[TourSlot]:
    """The slots seeded by `seed_tours`."""
    return [
        TourSlot(1, "1-sunset", 101, at(day, 18), 40, 40),
        TourSlot(1, "1-sunset", 102, at(day, 18, 1), 40, 30),
        TourSlot(1, "1-sunset", 103, at(day, 18, 2), 40, 5),
        TourSlot(1, "1-sunset", 104, at(day, 18, 3), 40, 20),
        TourSlot(1, "1-sunset", 105, at(day, 18, 4), 40, 40),
        TourSlot(2, "2-guided", 201, at(day, 9), 15, 15),
        TourSlot(2, "2-guided", 202, at(day, 9, 1), 15, 10),
        TourSlot(3, "3-pass", 301, at(day, 10), None, None),
    ]


def seed_tours(inventory: Inventory, day: date) -> list[TourSlot]:
    """Three products (a cruise, a guided tour, a free-sale pass) and their slots."""
    inventory.add_product(1, "Bosphorus Sunset Cruise", 4500, {"1-sunset": "Sunset"})
    inventory.add_product(2, "Hagia Sophia Guided Tour", 3000, {"2-guided": "Guided (EN)"})
    inventory.add_product(3, "Istanbul Museum Pass", 9900, {"3-pass": "Pass"})
    slots = tour_slots(day)
    for s in slots:
        inventory.add_slot(
            s.slot_id,
            s.option_id,
            s.start,
            capacity=s.capacity,
            vacancies=s.vacancies,
            status=s.status,
        )
    return slots


def local_start(start: datetime) -> str:
    """The localDateTimeStart Seyaha expects for a naive ZONE wall-clock time."""
    return start.replace(tzinfo=ZONE).isoformat(timespec="seconds")


def notify_payload(
    product_id: int | str,
    option_id: str,
    slot_id: int | str,
    start: datetime,
    *,
    status: str,
    vacancies: int | None,
    capacity: int | None,
) -> dict[str, Any]:
    """The availability/notify body expected for a slot, written out independently."""
    return {
        "productId": str(product_id),
        "optionId": option_id,
        "availabilityId": str(slot_id),
        "localDateTimeStart": local_start(start),
        "status": status,
        "vacancies": vacancies,
        "capacity": capacity,
    }


# -- agent configuration ----------------------------------------------------------------


def write_config(
    folder: Path,
    *,
    name: str,
    base_url: str,
    integration_id: str,
    secret: str,
    source_url: str,
    state_url: str,
    poll_interval: float = 0.2,
    catalog_query: str = CATALOG_QUERY,
    slots_query: str = SLOTS_QUERY,
    source: Mapping[str, Any] | None = None,
) -> Path:
    """A TOML configuration `name`.toml in `folder`, the secret in a file beside it.

    `source` adds [source] keys, e.g. {"slots_changed_query": ..., "cursor_overlap": 0}.
    """
    secret_file = folder / f"{name}.secret"
    secret_file.write_text(secret + "\n", encoding="utf-8")
    secret_file.chmod(0o600)
    path = folder / f"{name}.toml"

    def s(value: str) -> str:
        return json.dumps(value)  # a TOML basic string

    more = "".join(f"{key} = {json.dumps(value)}\n" for key, value in (source or {}).items())
    path.write_text(
        f"""
[seyaha]
base_url = {s(base_url)}
integration_id = {s(integration_id)}
webhook_secret_file = {s(secret_file.name)}

[source]
url = {s(source_url)}
poll_interval = {poll_interval}
timezone = {s(ZONE_NAME)}
catalog_query = '''{catalog_query}'''
slots_query = '''{slots_query}'''
{more}
[state]
url = {s(state_url)}

[delivery]
backoff_initial = 0.05
backoff_max = 0.5

[log]
level = "DEBUG"
format = "json"
""",
        encoding="utf-8",
    )
    return path


WAIT_S = 20.0
"""Longest wait for something another thread does; generous for a slow, noisy machine."""


# -- waiting for the receiver ---------------------------------------------------------


def calls(sandbox: Sandbox) -> list[Call]:
    """A copy of the calls the sandbox received, oldest first."""
    with sandbox.lock:
        return list(sandbox.calls)


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = WAIT_S) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"gave up after {timeout_s:g} s waiting for {what}")
        time.sleep(0.05)


# -- the daemon ---------------------------------------------------------------------


@contextmanager
def running(agent: Agent) -> Iterator[threading.Event]:
    """`agent.run` in a thread for the duration of the block; stopped and joined after it,
    failing the test if the daemon crashed or did not stop."""
    stop = threading.Event()
    crashed: list[BaseException] = []

    def run() -> None:
        try:
            agent.run(stop)
        except BaseException as exc:
            crashed.append(exc)

    daemon = threading.Thread(target=run, name="agent-under-test")
    daemon.start()
    try:
        yield stop
    finally:
        stop.set()
        daemon.join(60)
    assert not daemon.is_alive(), "the daemon did not stop within 60 s"
    assert crashed == [], f"the daemon crashed: {crashed!r}"
