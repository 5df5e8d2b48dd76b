"""Schema 4: each message, slot and catalog row names the Seyaha integration it belongs to.

A platform routes rows to integrations by an `integration_id` column of its queries
([seyaha] webhook_secrets_dir). The outbox keeps where each message goes, so that a trigger
coalesces and a pause holds per integration; the stored slots and catalog rows keep theirs,
so that a slot that vanishes is closed with the integration that knew it, and a product that
leaves a catalog triggers that catalog. An empty integration_id means the one integration of
[seyaha] integration_id: every row written before schema 4, and every row of an agent
configured for one integration, which reads and writes exactly as before.

Revision ID: 0004
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

INTEGRATION_LENGTH = 24


def _add_integration(bind: sa.Connection, table: str) -> None:
    columns = {c["name"] for c in sa.inspect(bind).get_columns(table)}
    if "integration_id" not in columns:
        op.add_column(
            table,
            sa.Column(
                "integration_id",
                sa.String(INTEGRATION_LENGTH),
                nullable=False,
                server_default="",
            ),
        )


def upgrade() -> None:
    bind = op.get_bind()
    for table in ("seyaha_outbox", "seyaha_slots", "seyaha_catalog"):
        _add_integration(bind, table)
    indexes = {i["name"] for i in sa.inspect(bind).get_indexes("seyaha_outbox")}
    if "seyaha_outbox_integration" not in indexes:
        # A notify waits for an older trigger of its own integration only: the claim looks
        # that trigger up per integration.
        op.create_index(
            "seyaha_outbox_integration",
            "seyaha_outbox",
            ["integration_id", "kind", "state", "id"],
        )
    if "seyaha_outbox_turns" not in indexes:
        # A platform's integrations take turns: the claim walks the waiting messages by
        # integration, then id, from the integration after the last one served.
        op.create_index("seyaha_outbox_turns", "seyaha_outbox", ["state", "integration_id", "id"])
    meta = sa.table("seyaha_meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    bind.execute(sa.update(meta).where(meta.c.key == "schema_version").values(value="4"))


def downgrade() -> None:
    raise NotImplementedError("state store migrations are forward-only")
