"""The state store as seyaha-agent 0.1.0 left it on disk: schema 1, for the upgrade tests.

Written out here, not imported from agent/: the tables are 0.1.0's agent/outbox/tables.py
(commit adadd56), and the rows are encoded the way its agent/outbox/store.py wrote them
(payloads as `json.dumps(payload, sort_keys=True)`, the scanner lease as an "owner epochms"
status record, no version table). Whatever agent/ becomes, the migrations are tested against
what a 0.1.0 install really holds.

Earlier 0.1.0-era stores (commit f7ed597) indexed the outbox on (state, available_ms) under
the name seyaha_outbox_due instead of the claim's two indexes: `OutboxIndexes` picks one.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import sqlalchemy as sa

SCHEMA_VERSION = "1"
"""What 0.1.0 recorded under seyaha_meta key 'schema_version' (it had no version table)."""

ID_LENGTH = 255

OutboxIndexes = Literal["claim", "due"]
"""The outbox's indexes: "claim" as 0.1.0 shipped them (seyaha_outbox_claim (state, id) and
seyaha_outbox_trigger (kind, state, id)); "due" as earlier builds had them
(seyaha_outbox_due (state, available_ms)). Both have seyaha_outbox_dedupe."""

CatalogKey = tuple[str, str]
SlotKey = tuple[str, str, str]


def _id_column_type() -> sa.types.TypeEngine[str]:
    return (
        sa.String(ID_LENGTH)
        .with_variant(sa.String(ID_LENGTH, collation="C"), "postgresql")
        .with_variant(sa.String(ID_LENGTH, collation="utf8mb4_bin"), "mysql", "mariadb")
    )


def schema_1(indexes: OutboxIndexes = "claim") -> sa.MetaData:
    """0.1.0's four tables (seyaha_meta, seyaha_catalog, seyaha_slots, seyaha_outbox)."""
    metadata = sa.MetaData()
    sa.Table(
        "seyaha_meta",
        metadata,
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )
    sa.Table(
        "seyaha_catalog",
        metadata,
        sa.Column("product_id", _id_column_type(), primary_key=True),
        sa.Column("option_id", _id_column_type(), primary_key=True),
        sa.Column("fingerprint", sa.String(32), nullable=False),
    )
    sa.Table(
        "seyaha_slots",
        metadata,
        sa.Column("product_id", _id_column_type(), primary_key=True),
        sa.Column("option_id", _id_column_type(), primary_key=True),
        sa.Column("availability_id", _id_column_type(), primary_key=True),
        sa.Column("fingerprint", sa.String(32), nullable=False),
        sa.Column("local_start", sa.String(40), nullable=False),
        sa.Column("start_ms", sa.BigInteger, nullable=False),
    )
    outbox_indexes = (
        [
            sa.Index("seyaha_outbox_claim", "state", "id"),
            sa.Index("seyaha_outbox_trigger", "kind", "state", "id"),
        ]
        if indexes == "claim"
        else [sa.Index("seyaha_outbox_due", "state", "available_ms")]
    )
    sa.Table(
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
        *outbox_indexes,
        sa.Index("seyaha_outbox_dedupe", "dedupe_key", "state"),
    )
    return metadata


TABLES = ("seyaha_meta", "seyaha_catalog", "seyaha_slots", "seyaha_outbox")


# -- 0.1.0's encodings ---------------------------------------------------------------------


def catalog_fingerprint(metadata: Mapping[str, str | int | None]) -> str:
    """0.1.0's digest of a catalog row's non-key columns (agent/rows.py `fingerprint`), for
    the str, int and None values the test inventory's catalog query returns."""
    canonical = json.dumps(dict(metadata), sort_keys=True, separators=(",", ":"))
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).hexdigest()


def slot_fingerprint(payload: Mapping[str, Any]) -> str:
    """0.1.0's digest of what a notify carries (agent/rows.py `slot_fingerprint`)."""
    carried = tuple(
        payload[name]
        for name in (
            "productId",
            "optionId",
            "availabilityId",
            "localDateTimeStart",
            "status",
            "vacancies",
            "capacity",
        )
    )
    return hashlib.blake2b(repr(carried).encode("utf-8"), digest_size=16).hexdigest()


def slot_key(payload: Mapping[str, Any]) -> SlotKey:
    return (payload["productId"], payload["optionId"], payload["availabilityId"])


def slot_dedupe_key(key: SlotKey) -> str:
    """0.1.0's outbox key of a slot (agent/plan.py)."""
    joined = "\x1f".join(key)
    return "slot:" + hashlib.blake2b(joined.encode("utf-8"), digest_size=16).hexdigest()


TRIGGER_DEDUPE_KEY = "catalog"
"""0.1.0's outbox key of the one waiting trigger."""


def stored_payload(payload: Mapping[str, Any]) -> str:
    """A notify payload as 0.1.0 kept it in the outbox: sorted keys, spaced JSON."""
    return json.dumps(payload, sort_keys=True)


# -- what a store holds --------------------------------------------------------------------


@dataclass(frozen=True)
class SlotV1:
    """A slot as 0.1.0 last saw it: the notify it would send, and its start in epoch ms."""

    payload: dict[str, Any]
    start_ms: int

    @property
    def key(self) -> SlotKey:
        return slot_key(self.payload)


@dataclass(frozen=True)
class MessageV1:
    """One outbox row as 0.1.0 wrote it (and, after failed attempts, updated it)."""

    kind: Literal["trigger", "notify"]
    payload: dict[str, Any] | None
    reason: str
    created_ms: int
    updated_ms: int
    """When it was queued, or refreshed; for a dead letter, when it died."""
    available_ms: int
    """When it is due: after a failed attempt, when the retry is."""
    state: Literal["pending", "dead"] = "pending"
    slot_start_ms: int | None = None
    attempts: int = 0
    last_status: int | None = None
    last_error: str | None = None

    @property
    def dedupe_key(self) -> str:
        if self.payload is None:
            return TRIGGER_DEDUPE_KEY
        return slot_dedupe_key(slot_key(self.payload))


def trigger_v1(reason: str, *, at_ms: int) -> MessageV1:
    return MessageV1("trigger", None, reason, at_ms, at_ms, at_ms)


def notify_v1(slot: SlotV1, reason: str, *, at_ms: int, **later: Any) -> MessageV1:
    """A notify for `slot` queued at `at_ms`; `later` sets what failed attempts changed
    (state, attempts, last_status, last_error, updated_ms, available_ms)."""
    queued = MessageV1(
        "notify", slot.payload, reason, at_ms, at_ms, at_ms, slot_start_ms=slot.start_ms
    )
    return replace(queued, **later)


@dataclass(frozen=True)
class StoreV1:
    """Everything a 0.1.0 store holds."""

    catalog: Mapping[CatalogKey, Mapping[str, str | int | None]]
    """(product_id, option_id) -> the catalog query's other columns."""
    slots: Sequence[SlotV1]
    outbox: Sequence[MessageV1]
    """In the order 0.1.0 queued them (id order)."""
    baseline_ms: int
    cursors: Mapping[str, str] = field(default_factory=dict)
    """Change cursors by name (agent/source/cursor.py `encode`)."""
    status: Mapping[str, str] = field(default_factory=dict)
    """Status records by name: 'scanner' ("<owner> <until epoch ms>"), 'breaker',
    'last_delivery', 'pause'."""


def write_store_v1(
    engine: sa.Engine, store: StoreV1, *, indexes: OutboxIndexes = "claim"
) -> list[int]:
    """Create 0.1.0's tables in the empty database behind `engine` and fill them with
    `store`; returns the outbox ids, in the order of `store.outbox`."""
    metadata = schema_1(indexes)
    metadata.create_all(engine)
    meta, catalog, slots, outbox = (metadata.tables[name] for name in TABLES)
    meta_rows = {"schema_version": SCHEMA_VERSION, "baseline_ms": str(store.baseline_ms)}
    meta_rows.update({f"cursor:{name}": value for name, value in store.cursors.items()})
    meta_rows.update({f"status:{name}": value for name, value in store.status.items()})
    with engine.begin() as conn:
        conn.execute(sa.insert(meta), [{"key": k, "value": v} for k, v in meta_rows.items()])
        conn.execute(
            sa.insert(catalog),
            [
                {
                    "product_id": product_id,
                    "option_id": option_id,
                    "fingerprint": catalog_fingerprint(columns),
                }
                for (product_id, option_id), columns in store.catalog.items()
            ],
        )
        conn.execute(
            sa.insert(slots),
            [
                {
                    "product_id": s.key[0],
                    "option_id": s.key[1],
                    "availability_id": s.key[2],
                    "fingerprint": slot_fingerprint(s.payload),
                    "local_start": s.payload["localDateTimeStart"],
                    "start_ms": s.start_ms,
                }
                for s in store.slots
            ],
        )
        conn.execute(
            sa.insert(outbox),
            [
                {
                    "kind": m.kind,
                    "dedupe_key": m.dedupe_key,
                    "payload": None if m.payload is None else stored_payload(m.payload),
                    "state": m.state,
                    "reason": m.reason,
                    "created_ms": m.created_ms,
                    "updated_ms": m.updated_ms,
                    "available_ms": m.available_ms,
                    "slot_start_ms": m.slot_start_ms,
                    "attempts": m.attempts,
                    "last_status": m.last_status,
                    "last_error": m.last_error,
                }
                for m in store.outbox
            ],
        )
        # The table was empty: rows inserted in one statement take ids in their order.
        ids = list(conn.execute(sa.select(outbox.c.id).order_by(outbox.c.id)).scalars())
    return ids


def dump(conn: sa.Connection) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of 0.1.0's four tables, sorted: two stores compare equal row for row."""
    metadata = schema_1()
    return {
        name: sorted(tuple(row) for row in conn.execute(sa.select(metadata.tables[name])))
        for name in TABLES
    }
