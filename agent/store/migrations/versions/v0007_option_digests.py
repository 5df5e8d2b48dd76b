"""Schema 7: the range digests summed per product and option, kept beside them.

A reconciliation of a large inventory compares one digest per option id first, and then the
range digests of the options that differ only. The stored side of that first comparison was
summed from every stored range at each load (50,000 ranges at 1M slots, 0.14-0.23 s of the
agent's CPU before the first reconciliation after a start, and again whenever another
process had written the store). seyaha_option_digests keeps those sums, one row per (product,
option), written in the same transactions as the ranges: a pass reads about 5,000 rows, and
then the ranges of the options that differ by the option id's index. This migration fills it
from the ranges already stored.

Revision ID: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

ID_LENGTH = 255
BATCH = 5000


def _text(length: int) -> sa.types.TypeEngine[str]:
    return (
        sa.String(length)
        .with_variant(sa.String(length, collation="C"), "postgresql")
        .with_variant(sa.String(length, collation="utf8mb4_bin"), "mysql", "mariadb")
    )


def upgrade() -> None:
    bind = op.get_bind()
    if not sa.inspect(bind).has_table("seyaha_option_digests"):
        op.create_table(
            "seyaha_option_digests",
            sa.Column("product_id", _text(ID_LENGTH), primary_key=True),
            sa.Column("option_id", _text(ID_LENGTH), primary_key=True),
            sa.Column("row_count", sa.BigInteger, nullable=False),
            sa.Column("digest", sa.String(48), nullable=True),
        )
    options = sa.table(
        "seyaha_option_digests",
        sa.column("product_id", sa.String),
        sa.column("option_id", sa.String),
        sa.column("row_count", sa.BigInteger),
        sa.column("digest", sa.String),
    )
    ranges = sa.table(
        "seyaha_ranges",
        sa.column("product_id", sa.String),
        sa.column("option_id", sa.String),
        sa.column("row_count", sa.BigInteger),
        sa.column("digest", sa.String),
    )
    # A MySQL upgrade stopped after the table was created (DDL commits by itself) may have
    # left it part-filled: filled again from the start.
    bind.execute(sa.delete(options))
    rows: dict[tuple[str, str], int] = {}
    sums: dict[tuple[str, str], int | None] = {}
    stored = bind.execute(
        sa.select(ranges.c.product_id, ranges.c.option_id, ranges.c.row_count, ranges.c.digest)
    )
    for product, option, count, digest in stored:
        pair = (product, option)
        rows[pair] = rows.get(pair, 0) + int(count)
        total = sums.get(pair, 0)
        sums[pair] = None if digest is None or total is None else total + int(digest)
    values = [
        {
            "product_id": product,
            "option_id": option,
            "row_count": count,
            "digest": None if sums[(product, option)] is None else str(sums[(product, option)]),
        }
        for (product, option), count in rows.items()
    ]
    for start in range(0, len(values), BATCH):
        bind.execute(sa.insert(options), values[start : start + BATCH])
    meta = sa.table("seyaha_meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    bind.execute(sa.update(meta).where(meta.c.key == "schema_version").values(value="7"))


def downgrade() -> None:
    raise NotImplementedError("state store migrations are forward-only")
