"""Schema 5: each stored slot keeps the hash of the source row its fingerprint was built from.

A reconciliation reads the ranges whose digests differ, about 20 slots for each one that
changed; with seyaha_slots.row_hash it builds a slot only from a row whose hash differs from
the one its stored fingerprint was built from (the row that changed), instead of from every
row of the range. The column starts NULL: slots written before schema 5 are built as before
until a full pass records them again.

Revision ID: 0005
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    columns = {c["name"] for c in sa.inspect(bind).get_columns("seyaha_slots")}
    if "row_hash" not in columns:
        op.add_column("seyaha_slots", sa.Column("row_hash", sa.BigInteger, nullable=True))
    meta = sa.table("seyaha_meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    bind.execute(sa.update(meta).where(meta.c.key == "schema_version").values(value="5"))


def downgrade() -> None:
    raise NotImplementedError("state store migrations are forward-only")
