"""Schema 6: the range digests are found by option id too.

A daemon keeps the stored range digests it loaded current through its own writes: the next
load reads again only the ranges of the option ids written (and their sums per option id),
and a reconciliation reads the labels of the options whose digests differ. Both look the
ranges up by option id, which the table's key (product, option, suffix) does not lead with:
without this index each such read went through every row of the table.

Revision ID: 0006
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    bind = op.get_bind()
    indexes = {i["name"] for i in sa.inspect(bind).get_indexes("seyaha_ranges")}
    if "seyaha_ranges_option" not in indexes:
        op.create_index("seyaha_ranges_option", "seyaha_ranges", ["option_id"])
    meta = sa.table("seyaha_meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    bind.execute(sa.update(meta).where(meta.c.key == "schema_version").values(value="6"))


def downgrade() -> None:
    raise NotImplementedError("state store migrations are forward-only")
