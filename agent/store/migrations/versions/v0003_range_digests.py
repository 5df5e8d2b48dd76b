"""Schema 3: range digests, so that a reconciliation reads only the slots that changed.

seyaha_ranges holds, per range of slot keys (product, option and the last character of the
availability id), how many source rows the range had and the sum of their row hashes as
the source database computed them, when the stored fingerprints of the range were last
known to match those rows; a NULL digest marks a range something has written since. The
table starts empty: the first reconciliation on schema 3 reads every slot, as before, and
fills it (agent/ranges.py). seyaha_slots gets an index on start_ms, so that slots whose start
has passed are forgotten without reading the others.

Revision ID: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

ID_LENGTH = 255
SUFFIX_LENGTH = 4


def _text(length: int) -> sa.types.TypeEngine[str]:
    return (
        sa.String(length)
        .with_variant(sa.String(length, collation="C"), "postgresql")
        .with_variant(sa.String(length, collation="utf8mb4_bin"), "mysql", "mariadb")
    )


def upgrade() -> None:
    bind = op.get_bind()
    if not sa.inspect(bind).has_table("seyaha_ranges"):
        op.create_table(
            "seyaha_ranges",
            sa.Column("product_id", _text(ID_LENGTH), primary_key=True),
            sa.Column("option_id", _text(ID_LENGTH), primary_key=True),
            sa.Column("suffix", _text(SUFFIX_LENGTH), primary_key=True),
            sa.Column("row_count", sa.BigInteger, nullable=False),
            # A sum of up to millions of 64-bit hashes: kept as its decimal text.
            sa.Column("digest", sa.String(40), nullable=True),
        )
    indexes = {i["name"] for i in sa.inspect(bind).get_indexes("seyaha_slots")}
    if "seyaha_slots_start" not in indexes:
        # Slots past their start are forgotten by one DELETE (Fingerprints.expire).
        op.create_index("seyaha_slots_start", "seyaha_slots", ["start_ms"])
    meta = sa.table("seyaha_meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    bind.execute(sa.update(meta).where(meta.c.key == "schema_version").values(value="3"))


def downgrade() -> None:
    raise NotImplementedError("state store migrations are forward-only")
