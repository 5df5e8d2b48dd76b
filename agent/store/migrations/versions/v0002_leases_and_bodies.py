"""Schema 2: leases in a table of their own, exact request bodies, the claim's indexes.

- seyaha_leases holds the scanner lease as columns (holder, until_ms on the database's clock)
  instead of an "owner epoch" string among the status records;
- the outbox keeps the exact body each notify sends: rows queued by schema 1 (sorted keys,
  spaced JSON) are rewritten to the compact form the agent sends;
- stores created before the claim's indexes existed get them, and lose the index they
  replaced.

Every step checks what is there first, so a run that stopped half-way (MySQL cannot roll
DDL back) finishes on the next start.

Revision ID: 0002
"""

from __future__ import annotations

import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BATCH = 1000

NOTIFY_FIELDS = (
    "productId",
    "optionId",
    "availabilityId",
    "localDateTimeStart",
    "status",
    "vacancies",
    "capacity",
)
"""The order of a notify body's fields, as the agent writes them."""


def _compact(stored: str) -> str:
    payload: dict[str, Any] = json.loads(stored)
    ordered = {k: payload[k] for k in NOTIFY_FIELDS if k in payload}
    ordered.update((k, v) for k, v in payload.items() if k not in ordered)
    return json.dumps(ordered, separators=(",", ":"))


def upgrade() -> None:
    bind = op.get_bind()
    inspector = sa.inspect(bind)
    if not inspector.has_table("seyaha_leases"):
        op.create_table(
            "seyaha_leases",
            sa.Column("name", sa.String(64), primary_key=True),
            sa.Column("holder", sa.String(255), nullable=False),
            sa.Column("until_ms", sa.BigInteger, nullable=False),
        )
    meta = sa.table("seyaha_meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    # The schema-1 scanner lease ("owner epoch" on the holder's host clock) is dropped: the
    # first agent to start on schema 2 takes the lease in the new table.
    bind.execute(sa.delete(meta).where(meta.c.key == "status:scanner"))

    indexes = {i["name"] for i in inspector.get_indexes("seyaha_outbox")}
    if "seyaha_outbox_due" in indexes:
        op.drop_index("seyaha_outbox_due", table_name="seyaha_outbox")
    if "seyaha_outbox_claim" not in indexes:
        op.create_index("seyaha_outbox_claim", "seyaha_outbox", ["state", "id"])
    if "seyaha_outbox_trigger" not in indexes:
        op.create_index("seyaha_outbox_trigger", "seyaha_outbox", ["kind", "state", "id"])

    outbox = sa.table(
        "seyaha_outbox", sa.column("id", sa.BigInteger), sa.column("payload", sa.Text)
    )
    last = -1
    while True:
        rows = bind.execute(
            sa.select(outbox.c.id, outbox.c.payload)
            .where(outbox.c.id > last, outbox.c.payload.is_not(None))
            .order_by(outbox.c.id)
            .limit(BATCH)
        ).all()
        if not rows:
            break
        bind.execute(
            sa.update(outbox)
            .where(outbox.c.id == sa.bindparam("row_id"))
            .values(payload=sa.bindparam("body")),
            [{"row_id": r.id, "body": _compact(r.payload)} for r in rows],
        )
        last = rows[-1].id

    bind.execute(sa.update(meta).where(meta.c.key == "schema_version").values(value="2"))


def downgrade() -> None:
    raise NotImplementedError("state store migrations are forward-only")
