"""A booking platform's inventory: many suppliers in one database, each its own Seyaha
integration, for the tests of routing by row (agent/integrations.py).

`suppliers` maps a supplier to its Seyaha integration id; products belong to a supplier and
the queries return the supplier's integration_id with every row. Secrets live in a folder,
one file per integration, as `[seyaha] webhook_secrets_dir` wants them.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import sqlalchemy as sa

from tests.integration.inventory import ZONE_NAME

ALPHA = "a1" * 12
BRAVO = "b2" * 12
CHARLIE = "c3" * 12
"""Three suppliers' integration ids."""

SECRETS = {ALPHA: "a" * 64, BRAVO: "b" * 64, CHARLIE: "c" * 64}

CATALOG_QUERY = """
SELECT p.id AS product_id, p.option_id, p.title, s.integration_id
FROM products p JOIN suppliers s ON s.id = p.supplier_id
"""

SLOTS_QUERY = """
SELECT p.id AS product_id, p.option_id, t.id AS availability_id,
       t.starts_at AS local_date_time_start, t.vacancies, t.capacity, s.integration_id
FROM slots t JOIN products p ON p.id = t.product_id JOIN suppliers s ON s.id = p.supplier_id
"""

SLOTS_CHANGED_QUERY = SLOTS_QUERY.rstrip() + "\nWHERE t.updated_at >= :since\n"
"""The slots query restricted to rows stamped since the cursor (see Platform.track_updates)."""

STAMPS = {
    "sqlite": ("TEXT", "strftime('%Y-%m-%d %H:%M:%f', 'now')"),
    "postgresql": ("TIMESTAMP WITH TIME ZONE", "now()"),
    "mysql": ("DATETIME(6)", "NOW(6)"),
    "mariadb": ("DATETIME(6)", "NOW(6)"),
}
"""An updated_at column per backend, and the database clock the booking system stamps it with."""

metadata = sa.MetaData()
suppliers = sa.Table(
    "suppliers",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("integration_id", sa.String(24)),
)
products = sa.Table(
    "products",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("option_id", sa.String(32), nullable=False),
    sa.Column("supplier_id", sa.Integer, nullable=False),
    sa.Column("title", sa.String(100), nullable=False),
)
slots = sa.Table(
    "slots",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("product_id", sa.String(32), nullable=False),
    sa.Column("starts_at", sa.DateTime, nullable=False),
    sa.Column("vacancies", sa.Integer),
    sa.Column("capacity", sa.Integer),
)


class Platform:
    """The platform's database, written the way its booking system would."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = sa.create_engine(url)
        metadata.create_all(self.engine)
        self.stamp: str | None = None
        """SQL of the database clock that stamps slots.updated_at (see track_updates)."""

    def track_updates(self) -> None:
        """Add slots.updated_at, stamped by every write of a slot from now on."""
        ddl, self.stamp = STAMPS[self.engine.dialect.name]
        with self.engine.begin() as conn:
            conn.execute(sa.text(f"ALTER TABLE slots ADD COLUMN updated_at {ddl} NULL"))

    def _stamp(self, conn: sa.Connection, slot_id: str) -> None:
        if self.stamp is not None:
            conn.execute(
                sa.text(f"UPDATE slots SET updated_at = {self.stamp} WHERE id = :id"),
                {"id": slot_id},
            )

    def close(self) -> None:
        self.engine.dispose()

    def supplier(self, supplier_id: int, integration_id: str | None) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.insert(suppliers).values(id=supplier_id, integration_id=integration_id))

    def product(self, product_id: str, supplier_id: int, title: str = "Tour") -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.insert(products).values(
                    id=product_id, option_id="default", supplier_id=supplier_id, title=title
                )
            )

    def move(self, product_id: str, supplier_id: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.update(products)
                .where(products.c.id == product_id)
                .values(supplier_id=supplier_id)
            )

    def retitle(self, product_id: str, title: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.update(products).where(products.c.id == product_id).values(title=title))

    def drop_product(self, product_id: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.delete(slots).where(slots.c.product_id == product_id))
            conn.execute(sa.delete(products).where(products.c.id == product_id))

    def slot(self, slot_id: str, product_id: str, start: datetime, vacancies: int = 10) -> None:
        values: dict[str, object] = {
            "id": slot_id,
            "product_id": product_id,
            "starts_at": start,
            "vacancies": vacancies,
            "capacity": 10,
        }
        with self.engine.begin() as conn:
            conn.execute(sa.insert(slots).values(values))
            self._stamp(conn, slot_id)

    def book(self, slot_id: str, vacancies: int) -> None:
        with self.engine.begin() as conn:
            conn.execute(sa.update(slots).where(slots.c.id == slot_id).values(vacancies=vacancies))
            self._stamp(conn, slot_id)


def write_secrets(folder: Path, secrets: dict[str, str]) -> Path:
    folder.mkdir(exist_ok=True)
    for integration, secret in secrets.items():
        path = folder / integration
        path.write_text(secret + "\n", encoding="utf-8")
        path.chmod(0o600)
    return folder


def write_platform_config(
    folder: Path,
    *,
    name: str,
    base_url: str,
    source_url: str,
    state_url: str,
    secrets_dir: Path,
    delivery: dict[str, object] | None = None,
    slots_changed_query: str | None = None,
    state: dict[str, object] | None = None,
    source: dict[str, object] | None = None,
) -> Path:
    """A platform's configuration: no integration_id, a secrets folder, routed queries."""

    def s(value: object) -> str:
        return json.dumps(value)

    path = folder / f"{name}.toml"
    more = "".join(f"{k} = {s(v)}\n" for k, v in (delivery or {}).items())
    shared = "".join(f"{k} = {s(v)}\n" for k, v in (state or {}).items())
    reading = "".join(f"{k} = {s(v)}\n" for k, v in (source or {}).items())
    changes = (
        "" if slots_changed_query is None else f"slots_changed_query = '''{slots_changed_query}'''"
    )
    path.write_text(
        f"""
[seyaha]
base_url = {s(base_url)}
webhook_secrets_dir = {s(str(secrets_dir))}

[source]
url = {s(source_url)}
timezone = {s(ZONE_NAME)}
catalog_query = '''{CATALOG_QUERY}'''
slots_query = '''{SLOTS_QUERY}'''
{changes}
{reading}
[state]
url = {s(state_url)}
{shared}
[delivery]
{more}
[metrics]
listen = ""
""",
        encoding="utf-8",
    )
    return path
