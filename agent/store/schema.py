"""The state store's tables as the newest migration leaves them, shared by every backend
(SQLite, PostgreSQL, MySQL/MariaDB). The tables are created and changed only by the
migrations in agent/store/migrations; this module describes them for the queries.

Timestamps are integer epoch milliseconds: they sort and compare the same way everywhere.
Id columns are VARCHAR(255) so that the three-column slot key fits InnoDB's 3072-byte index
limit under utf8mb4.
"""

from __future__ import annotations

import sqlalchemy as sa

SCHEMA_VERSION = 7
"""The schema the newest migration writes (also kept in seyaha_meta, where 0.1.0 reads it)."""

ID_LENGTH = 255
SUFFIX_LENGTH = 4
INTEGRATION_LENGTH = 24
"""A Seyaha integration id: 24 hexadecimal characters; empty for the configured one."""


def _id_column_type(length: int = ID_LENGTH) -> sa.types.TypeEngine[str]:
    """Ids compare in code-point order on every backend, the order Python sorts strings in,
    so that a full scan can merge-join the stored keys with the source's (see
    Dialect.ordered)."""
    return (
        sa.String(length)
        .with_variant(sa.String(length, collation="C"), "postgresql")
        .with_variant(sa.String(length, collation="utf8mb4_bin"), "mysql", "mariadb")
    )


metadata = sa.MetaData()

meta = sa.Table(
    "seyaha_meta",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

catalog_fingerprints = sa.Table(
    "seyaha_catalog",
    metadata,
    sa.Column("product_id", _id_column_type(), primary_key=True),
    sa.Column("option_id", _id_column_type(), primary_key=True),
    sa.Column("fingerprint", sa.String(32), nullable=False),
    sa.Column("integration_id", sa.String(INTEGRATION_LENGTH), nullable=False, server_default=""),
)

slot_fingerprints = sa.Table(
    "seyaha_slots",
    metadata,
    sa.Column("product_id", _id_column_type(), primary_key=True),
    sa.Column("option_id", _id_column_type(), primary_key=True),
    sa.Column("availability_id", _id_column_type(), primary_key=True),
    sa.Column("fingerprint", sa.String(32), nullable=False),
    sa.Column("local_start", sa.String(40), nullable=False),
    sa.Column("start_ms", sa.BigInteger, nullable=False),
    sa.Column("integration_id", sa.String(INTEGRATION_LENGTH), nullable=False, server_default=""),
    # The hash of the source row the fingerprint was built from (see StoredSlot.row_hash).
    sa.Column("row_hash", sa.BigInteger, nullable=True),
    sa.Index("seyaha_slots_start", "start_ms"),
)

outbox = sa.Table(
    "seyaha_outbox",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer, "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("kind", sa.String(16), nullable=False),
    sa.Column("dedupe_key", sa.String(64), nullable=False),
    # The exact JSON body to send (notifies), written once when the message is planned.
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
    # Where the message goes: "" is [seyaha] integration_id, else the id its row named.
    sa.Column("integration_id", sa.String(INTEGRATION_LENGTH), nullable=False, server_default=""),
    # A claim walks the waiting messages in id order and stops at its batch size: an index
    # on (state, available_ms) made every claim sort the whole backlog first.
    sa.Index("seyaha_outbox_claim", "state", "id"),
    # The oldest waiting trigger, which the claim looks up once per batch.
    sa.Index("seyaha_outbox_trigger", "kind", "state", "id"),
    sa.Index("seyaha_outbox_dedupe", "dedupe_key", "state"),
    # The oldest waiting trigger of one integration (a notify waits only for its own).
    sa.Index("seyaha_outbox_integration", "integration_id", "kind", "state", "id"),
    # A platform's integrations take turns (Queue.claim with `after`).
    sa.Index("seyaha_outbox_turns", "state", "integration_id", "id"),
)

ranges = sa.Table(
    "seyaha_ranges",
    metadata,
    sa.Column("product_id", _id_column_type(), primary_key=True),
    sa.Column("option_id", _id_column_type(), primary_key=True),
    # The last character of the availability ids of the range (agent/ranges.py).
    sa.Column("suffix", _id_column_type(SUFFIX_LENGTH), primary_key=True),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    # The sum of the range's row hashes, as decimal text; NULL: written since, read it again.
    sa.Column("digest", sa.String(40), nullable=True),
    # The ranges of some option ids (StoredRanges.labels, StoredRanges.load after own writes).
    sa.Index("seyaha_ranges_option", "option_id"),
)

option_digests = sa.Table(
    "seyaha_option_digests",
    metadata,
    # The stored ranges of one (product, option), summed: a reconciliation compares the
    # source's option digests with these, 5,000 rows at 1M slots, without reading the ranges.
    sa.Column("product_id", _id_column_type(), primary_key=True),
    sa.Column("option_id", _id_column_type(), primary_key=True),
    sa.Column("row_count", sa.BigInteger, nullable=False),
    # The sum of its ranges' digests, as decimal text; NULL: one of them is unknown (every
    # write of the pair's slots clears it; the next reconciliation that stores digests of
    # its ranges sums them again).
    sa.Column("digest", sa.String(48), nullable=True),
)

leases = sa.Table(
    "seyaha_leases",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(255), nullable=False),
    # On the clock of the store's database (see store.clock.StoreClock).
    sa.Column("until_ms", sa.BigInteger, nullable=False),
)

PENDING = "pending"
DEAD = "dead"
