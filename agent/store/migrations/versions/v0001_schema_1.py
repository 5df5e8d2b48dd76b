"""Schema 1: the tables as seyaha-agent 0.1.0 created them.

A store that 0.1.0 wrote already has them and is stamped with this version instead of
running it (store.migrate); a new store starts here.

Revision ID: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

ID_LENGTH = 255


def _id() -> sa.types.TypeEngine[str]:
    return (
        sa.String(ID_LENGTH)
        .with_variant(sa.String(ID_LENGTH, collation="C"), "postgresql")
        .with_variant(sa.String(ID_LENGTH, collation="utf8mb4_bin"), "mysql", "mariadb")
    )


def upgrade() -> None:
    meta = op.create_table(
        "seyaha_meta",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    op.create_table(
        "seyaha_catalog",
        sa.Column("product_id", _id(), primary_key=True),
        sa.Column("option_id", _id(), primary_key=True),
        sa.Column("fingerprint", sa.String(32), nullable=False),
    )
    op.create_table(
        "seyaha_slots",
        sa.Column("product_id", _id(), primary_key=True),
        sa.Column("option_id", _id(), primary_key=True),
        sa.Column("availability_id", _id(), primary_key=True),
        sa.Column("fingerprint", sa.String(32), nullable=False),
        sa.Column("local_start", sa.String(40), nullable=False),
        sa.Column("start_ms", sa.BigInteger, nullable=False),
    )
    op.create_table(
        "seyaha_outbox",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer, "sqlite"),
            primary_key=True,
            autoincrement=True,
        ),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("dedupe_key", sa.String(64), nullable=False),
        sa.Column("payload", sa.Text, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(32), nullable=False, server_default=""),
        sa.Column("created_ms", sa.BigInteger, nullable=False),
        sa.Column("updated_ms", sa.BigInteger, nullable=False),
        sa.Column("available_ms", sa.BigInteger, nullable=False),
        sa.Column("slot_start_ms", sa.BigInteger, nullable=True),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("last_status", sa.Integer, nullable=True),
        sa.Column("last_error", sa.Text, nullable=True),
        sa.Column("lease_token", sa.String(36), nullable=True),
        sa.Column("leased_until_ms", sa.BigInteger, nullable=True),
    )
    op.create_index("seyaha_outbox_claim", "seyaha_outbox", ["state", "id"])
    op.create_index("seyaha_outbox_trigger", "seyaha_outbox", ["kind", "state", "id"])
    op.create_index("seyaha_outbox_dedupe", "seyaha_outbox", ["dedupe_key", "state"])
    op.bulk_insert(meta, [{"key": "schema_version", "value": "1"}])


def downgrade() -> None:
    raise NotImplementedError("state store migrations are forward-only")
