"""Upgrading a state store that seyaha-agent 0.1.0 wrote (schema 1, tests/integration/store_v1.py)
on SQLite, PostgreSQL and MariaDB: in place at the first start, with nothing lost and delivery
going on where it stopped; once when several agents start together; with a copy of a SQLite
store kept beside it as the way back.

(A store written by a newer agent is refused: tests/integration/test_state_store.py.)
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent.app import Agent
from agent.clock import from_epoch_ms
from agent.dialects import FileLock, dialect_of
from agent.model import StoredSlot, request_body
from agent.ranges import UNKNOWN, DigestTable, RangeDigest
from agent.sandbox import Sandbox
from agent.store import OutboxEntry, StateStore
from agent.store.coordination import SCANNER
from agent.store.migrate import HEAD, LOCK_NAME, Migrator, Plan, Step, head_version
from agent.store.ranges import StoredRanges
from tests.integration.inventory import (
    BACKEND_PARAMS,
    ZONE,
    Inventory,
    TourSlot,
    at,
    calls,
    first_day,
    notify_payload,
    wait_until,
)
from tests.integration.store_v1 import (
    TABLES,
    MessageV1,
    OutboxIndexes,
    SlotV1,
    StoreV1,
    catalog_fingerprint,
    dump,
    notify_v1,
    schema_1,
    slot_fingerprint,
    trigger_v1,
    write_store_v1,
)

STEP_1 = Step(1, "Schema 1: the tables as seyaha-agent 0.1.0 created them.")
STEP_2 = Step(
    2, "Schema 2: leases in a table of their own, exact request bodies, the claim's indexes."
)
STEP_3 = Step(
    3, "Schema 3: range digests, so that a reconciliation reads only the slots that changed."
)
STEP_4 = Step(
    4, "Schema 4: each message, slot and catalog row names the Seyaha integration it belongs to."
)
STEP_5 = Step(
    5, "Schema 5: each stored slot keeps the hash of the source row its fingerprint was built from."
)
STEP_6 = Step(6, "Schema 6: the range digests are found by option id too.")
STEP_7 = Step(7, "Schema 7: the range digests summed per product and option, kept beside them.")
"""The steps as `seyaha-agent migrate --dry-run` names them."""

INDEXES_2 = {
    "seyaha_outbox_claim": ["state", "id"],
    "seyaha_outbox_trigger": ["kind", "state", "id"],
    "seyaha_outbox_dedupe": ["dedupe_key", "state"],
}
"""The outbox's indexes in schema 2, whichever 0.1.0-era set the store had."""

INDEXES_4 = {
    **INDEXES_2,
    "seyaha_outbox_integration": ["integration_id", "kind", "state", "id"],
    "seyaha_outbox_turns": ["state", "integration_id", "id"],
}
"""The outbox's indexes from schema 4 on."""

WAIT_S = 60.0
"""A ceiling for anything another thread or process does; never an expectation."""

ROOT = Path(__file__).resolve().parents[2]


# -- the store 0.1.0 left behind --------------------------------------------------------------

PRODUCTS = {
    1: ("Bosphorus Sunset Cruise", 4500, "1-sunset", "Sunset"),
    2: ("Hagia Sophia Guided Tour", 3000, "2-guided", "Guided (EN)"),
    3: ("Istanbul Museum Pass", 9900, "3-pass", "Pass"),
}
"""product id -> (title, price_cents, option id, option name)."""


def supplier_slots(day: date) -> list[TourSlot]:
    """The supplier's slots, each with its status written out (none derived)."""
    return [
        TourSlot(1, "1-sunset", 101, at(day, 18), 40, 40, "AVAILABLE"),
        TourSlot(1, "1-sunset", 102, at(day, 18, 1), 40, 30, "AVAILABLE"),
        TourSlot(1, "1-sunset", 103, at(day, 18, 2), 40, 5, "LIMITED"),
        TourSlot(2, "2-guided", 201, at(day, 9), 15, 15, "AVAILABLE"),
        TourSlot(3, "3-pass", 301, at(day, 10), None, None, "FREESALE"),
    ]


def slot_v1(s: TourSlot) -> SlotV1:
    assert s.status is not None
    payload = notify_payload(
        s.product_id,
        s.option_id,
        s.slot_id,
        s.start,
        status=s.status,
        vacancies=s.vacancies,
        capacity=s.capacity,
    )
    return SlotV1(payload, int(s.start.replace(tzinfo=ZONE).timestamp() * 1000))


def left_by_010(day: date) -> StoreV1:
    """A 0.1.0 store stopped during an outage: the catalog changed (a trigger waits), three
    slots changed (one notify already failed three times), and an older notify was refused
    for good (a dead letter). Fingerprints match the supplier's inventory as it still is."""
    now_ms = int(time.time() * 1000)
    minute = 60_000
    slots = {s.slot_id: slot_v1(s) for s in supplier_slots(day)}
    return StoreV1(
        catalog={
            (str(product_id), option_id): {
                "title": title,
                "price_cents": price_cents,
                "option_name": option_name,
            }
            for product_id, (title, price_cents, option_id, option_name) in PRODUCTS.items()
        },
        slots=list(slots.values()),
        outbox=[
            notify_v1(
                slots[201],
                "changed",
                at_ms=now_ms - 50 * minute,
                state="dead",
                attempts=1,
                last_status=422,
                last_error="422 from Seyaha: Unprocessable Entity: slot 201 is archived",
                updated_ms=now_ms - 49 * minute,
            ),
            trigger_v1("catalog", at_ms=now_ms - 30 * minute),
            notify_v1(
                slots[102],
                "changed",
                at_ms=now_ms - 30 * minute,
                attempts=3,
                last_status=503,
                last_error="503 from Seyaha: Service Unavailable: down for maintenance",
                available_ms=now_ms - minute,
            ),
            notify_v1(slots[103], "changed", at_ms=now_ms - 20 * minute),
            notify_v1(slots[301], "added", at_ms=now_ms - 20 * minute),
        ],
        baseline_ms=now_ms - 2 * 24 * 60 * minute,
        cursors={"slots": "dt:2026-11-27T04:39:58.123456+00:00"},
        status={
            "scanner": f"tour-host:4242:9f3c2a1b {now_ms + minute}",
            "breaker": "open",
            "last_delivery": "2026-11-27T04:09:12.345678+00:00",
        },
    )


@dataclass(frozen=True)
class Store010:
    """A database holding what 0.1.0 wrote."""

    url: str
    contents: StoreV1
    ids: list[int]
    """The outbox id of each of contents.outbox."""

    @property
    def file(self) -> Path | None:
        database = sa.engine.make_url(self.url).database
        return Path(database) if self.url.startswith("sqlite") and database else None

    @property
    def backup(self) -> Path | None:
        """Where the upgrade keeps a copy of a SQLite store."""
        return None if self.file is None else self.file.with_name(self.file.name + ".schema-1.bak")

    def messages(self, state: str | None = None) -> list[tuple[int, MessageV1]]:
        """(outbox id, message) of the messages in `state` (all if None), in id order."""
        pairs = zip(self.ids, self.contents.outbox, strict=True)
        return [(i, m) for i, m in pairs if state is None or m.state == state]


@pytest.fixture
def day() -> date:
    return first_day()


@pytest.fixture
def store_010(new_database: Callable[[str], str], day: date) -> Callable[..., Store010]:
    """`store_010("mariadb", indexes="due")`: a new database as 0.1.0 left it (`left_by_010`,
    unless given other `contents`)."""

    def write(
        backend: str, *, indexes: OutboxIndexes = "claim", contents: StoreV1 | None = None
    ) -> Store010:
        url = new_database(backend)
        contents = contents or left_by_010(day)
        engine = sa.create_engine(url)
        try:
            ids = write_store_v1(engine, contents, indexes=indexes)
        finally:
            engine.dispose()
        return Store010(url, contents, ids)

    return write


@pytest.fixture
def inventory(make_inventory: Callable[[str], Inventory], day: date) -> Inventory:
    """The supplier's database, as it was when 0.1.0 last scanned it."""
    inventory = make_inventory("sqlite")
    for product_id, (title, price_cents, option_id, option_name) in PRODUCTS.items():
        inventory.add_product(product_id, title, price_cents, {option_id: option_name})
    for s in supplier_slots(day):
        inventory.add_slot(
            s.slot_id, s.option_id, s.start,
            capacity=s.capacity, vacancies=s.vacancies, status=s.status,
        )  # fmt: skip
    return inventory


@contextmanager
def opened(url: str) -> Iterator[StateStore]:
    store = StateStore.from_url(url)
    try:
        yield store
    finally:
        store.close()


@contextmanager
def connected(url: str) -> Iterator[sa.Connection]:
    """A plain connection, outside the agent's code, for looking at what is stored."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def as_entry(outbox_id: int, m: MessageV1) -> OutboxEntry:
    """What `outbox list` should show for a message 0.1.0 queued."""
    return OutboxEntry(
        id=outbox_id,
        kind=m.kind,
        state=m.state,
        reason=m.reason,
        integration_id="",  # 0.1.0 knew one integration: the configured one
        attempts=m.attempts,
        last_status=m.last_status,
        last_error=m.last_error,
        created_at=from_epoch_ms(m.created_ms),
        available_at=from_epoch_ms(m.available_ms),
        payload=m.payload,
    )


def meta_of(conn: sa.Connection) -> dict[str, str]:
    meta = sa.table("seyaha_meta", sa.column("key", sa.String), sa.column("value", sa.Text))
    return {key: value for key, value in conn.execute(sa.select(meta.c.key, meta.c.value))}


def versions_of(conn: sa.Connection) -> list[str]:
    return list(conn.execute(sa.text("SELECT version_num FROM seyaha_schema_version")).scalars())


def outbox_indexes(conn: sa.Connection) -> dict[str | None, list[str | None]]:
    indexes = sa.inspect(conn).get_indexes("seyaha_outbox")
    return {index["name"]: index["column_names"] for index in indexes}


def tables_of(conn: sa.Connection) -> set[str]:
    return set(sa.inspect(conn).get_table_names())


def stored(conn: sa.Connection) -> dict[str, Any]:
    """What a store holds below its API: meta records, schema version, the outbox's indexes
    and the exact text of each body."""
    bodies = conn.execute(sa.text("SELECT id, payload FROM seyaha_outbox ORDER BY id"))
    return {
        "meta": meta_of(conn),
        "versions": versions_of(conn),
        "indexes": outbox_indexes(conn),
        "bodies": [tuple(row) for row in bodies],
    }


def stored_after_upgrade(written: Store010) -> dict[str, Any]:
    contents = written.contents
    return {
        "meta": {
            "schema_version": "7",
            "baseline_ms": str(contents.baseline_ms),
            "cursor:slots": contents.cursors["slots"],
            # 0.1.0's scanner lease ("status:scanner") is gone; the other records stay
            "status:breaker": contents.status["breaker"],
            "status:last_delivery": contents.status["last_delivery"],
        },
        "versions": ["0007"],
        "indexes": INDEXES_4,
        # every body exactly as the agent sends it (0.1.0 kept sorted, spaced JSON)
        "bodies": [
            (i, None if m.payload is None else request_body(m.payload))
            for i, m in written.messages()
        ],
    }


# -- 1. in place, nothing lost ----------------------------------------------------------------


@pytest.mark.parametrize("indexes", ["claim", "due"])
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_store_written_by_010_is_upgraded_in_place_on_open_and_keeps_everything(
    backend: str, indexes: OutboxIndexes, store_010: Callable[..., Store010]
) -> None:
    written = store_010(backend, indexes=indexes)
    contents = written.contents

    with opened(written.url) as store:
        plan = store.open()

        assert plan == Plan(
            current=1,
            head=7,
            steps=(STEP_2, STEP_3, STEP_4, STEP_5, STEP_6, STEP_7),
            stamp_legacy=True,
            backup=written.backup,
        )
        assert store.fingerprints.is_baselined()
        assert store.fingerprints.load_catalog() == {
            key: catalog_fingerprint(columns) for key, columns in contents.catalog.items()
        }
        assert store.fingerprints.load_slots() == {
            s.key: StoredSlot(
                s.key,
                slot_fingerprint(s.payload),
                s.payload["localDateTimeStart"],
                from_epoch_ms(s.start_ms),
            )
            for s in contents.slots
        }
        assert store.fingerprints.cursor("slots") == contents.cursors["slots"]
        # waiting and dead messages: same ids, attempts, errors and times
        assert store.admin.entries() == [as_entry(i, m) for i, m in written.messages()]
        stats = store.admin.stats()
        assert (stats.pending, stats.dead, stats.in_flight) == (
            len(written.messages("pending")),
            len(written.messages("dead")),
            0,
        )
        # 0.1.0's scanner lease is gone: the first agent on schema 2 takes a new one
        assert store.coordination.lease(SCANNER) is None
        assert store.coordination.status() == {
            "breaker": contents.status["breaker"],
            "last_delivery": contents.status["last_delivery"],
        }

    with connected(written.url) as conn:
        assert stored(conn) == stored_after_upgrade(written)
        # schema 6: the range digests are found by option id (StoredRanges.labels)
        assert {
            i["name"]: i["column_names"] for i in sa.inspect(conn).get_indexes("seyaha_ranges")
        }.get("seyaha_ranges_option") == ["option_id"]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_an_upgrade_that_stopped_half_way_finishes_at_the_next_start(
    backend: str, store_010: Callable[..., Store010]
) -> None:
    """MySQL commits each DDL statement by itself: an agent stopped during the upgrade leaves
    its first steps done. Here: 0.1.0's store stamped, the leases table created, the scanner
    record deleted, seyaha_outbox_due dropped and seyaha_outbox_claim created; the trigger
    index, the bodies and the version not yet."""
    written = store_010(backend, indexes="due")
    engine = sa.create_engine(written.url)
    try:
        with engine.begin() as conn:
            half_way = sa.MetaData()
            version = sa.Table(
                "seyaha_schema_version",
                half_way,
                sa.Column("version_num", sa.String(32), primary_key=True),
            )
            sa.Table(
                "seyaha_leases",
                half_way,
                sa.Column("name", sa.String(64), primary_key=True),
                sa.Column("holder", sa.String(255), nullable=False),
                sa.Column("until_ms", sa.BigInteger, nullable=False),
            )
            half_way.create_all(conn)
            conn.execute(sa.insert(version).values(version_num="0001"))
            schema = schema_1("due")
            meta, outbox = schema.tables["seyaha_meta"], schema.tables["seyaha_outbox"]
            conn.execute(sa.delete(meta).where(meta.c.key == "status:scanner"))
            sa.Index("seyaha_outbox_due", outbox.c.state, outbox.c.available_ms).drop(conn)
            sa.Index("seyaha_outbox_claim", outbox.c.state, outbox.c.id).create(conn)
    finally:
        engine.dispose()

    with opened(written.url) as store:
        plan = store.open()
        assert plan == Plan(
            current=1,
            head=7,
            steps=(STEP_2, STEP_3, STEP_4, STEP_5, STEP_6, STEP_7),
            backup=written.backup,
        )
        assert store.admin.entries() == [as_entry(i, m) for i, m in written.messages()]

    with connected(written.url) as conn:
        assert stored(conn) == stored_after_upgrade(written)
        assert tables_of(conn) == {
            *TABLES,
            "seyaha_leases",
            "seyaha_ranges",
            "seyaha_option_digests",
            "seyaha_schema_version",
        }


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_every_body_of_a_backlog_larger_than_one_batch_is_rewritten(
    backend: str, store_010: Callable[..., Store010], day: date
) -> None:
    """A long outage leaves thousands of waiting notifies; the rewrite goes through them in
    batches (of 1,000) and must reach the last one."""
    contents = left_by_010(day)
    backlog = [
        notify_v1(
            slot_v1(TourSlot(1, "1-sunset", 10_000 + n, at(day, 18), 40, n % 40, "AVAILABLE")),
            "changed",
            at_ms=contents.baseline_ms + n,
        )
        for n in range(2_345)
    ]
    written = store_010(backend, contents=replace(contents, outbox=backlog))

    with opened(written.url) as store:
        store.open()

    with connected(written.url) as conn:
        assert stored(conn)["bodies"] == stored_after_upgrade(written)["bodies"]


# -- 2. delivery goes on where it stopped -------------------------------------------------------


def wire(sandbox: Sandbox, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bytes]]:
    """(endpoint, raw request body) of every webhook call the receiver answers from now on,
    the bytes as they came off the wire."""
    seen: list[tuple[str, bytes]] = []
    handle = sandbox.handle

    def recording(
        method: str, path: str, headers: dict[str, str], raw: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        answer = handle(method, path, headers, raw)
        seen.append(("trigger" if path.endswith("/sync/trigger") else "notify", raw))
        return answer

    monkeypatch.setattr(sandbox, "handle", recording)
    return seen


@pytest.fixture(params=BACKEND_PARAMS)
def upgraded(
    request: pytest.FixtureRequest,
    store_010: Callable[..., Store010],
    inventory: Inventory,
    make_sandbox: Callable[..., Sandbox],
    make_agent: Callable[..., Agent],
) -> tuple[Store010, Agent, Sandbox]:
    """A 0.1.0 store on each backend, and the agent that upgraded it by starting on it."""
    written = store_010(request.param)
    sandbox = make_sandbox()
    agent = make_agent(
        "agent", base_url=sandbox.url, source_url=inventory.url, state_url=written.url
    )
    return written, agent, sandbox


def test_after_the_upgrade_the_agent_delivers_what_010_left_waiting_byte_for_byte(
    upgraded: tuple[Store010, Agent, Sandbox], monkeypatch: pytest.MonkeyPatch
) -> None:
    written, agent, sandbox = upgraded
    on_the_wire = wire(sandbox, monkeypatch)

    # The fingerprints 0.1.0 recorded still describe the inventory: nothing is sent again.
    report = agent.poll()
    assert report is not None  # the only agent on the store holds the scanner lease
    changes = (report.catalog.any, report.slots_added, report.slots_changed, report.slots_removed)
    assert (report.baseline, changes, report.messages) == (False, (False, 0, 0, 0), 0)

    result = agent.drain(WAIT_S)

    assert (result.timed_out, result.paused_reason) == (False, None)
    assert (result.stats.pending, result.stats.dead) == (0, 1)
    bodies = [request_body(m.payload) for _, m in written.messages("pending") if m.payload]
    answered = [(c.endpoint, c.status) for c in calls(sandbox)]
    assert answered == [("trigger", 200)] + [("notify", 200)] * len(bodies)
    # the trigger first (no notify passes a waiting trigger), then the notifies in any order
    assert on_the_wire[0] == ("trigger", b"")
    assert sorted(on_the_wire[1:]) == sorted(("notify", body.encode("utf-8")) for body in bodies)
    # the dead letter stays dead, as it was
    assert agent.store.admin.entries() == [as_entry(i, m) for i, m in written.messages("dead")]


def test_a_slot_changing_after_the_upgrade_refreshes_the_notify_010_left_waiting(
    upgraded: tuple[Store010, Agent, Sandbox], inventory: Inventory
) -> None:
    written, agent, sandbox = upgraded
    (waiting_103,) = [
        i
        for i, m in written.messages("pending")
        if m.payload and m.payload["availabilityId"] == "103"
    ]

    inventory.update_slot(103, vacancies=3)
    report = agent.poll()
    assert report is not None

    assert (report.slots_changed, report.notifies, report.enqueued) == (1, 1, 1)
    pending = agent.store.admin.entries(state="pending")
    assert [e.id for e in pending] == [i for i, _ in written.messages("pending")]
    refreshed = next(e for e in pending if e.id == waiting_103)
    assert refreshed.payload is not None
    assert (refreshed.payload["vacancies"], refreshed.attempts) == (3, 0)

    result = agent.drain(WAIT_S)
    assert (result.timed_out, result.stats.pending) == (False, 0)
    sent_103 = [c.body for c in calls(sandbox) if c.body and c.body["availabilityId"] == "103"]
    assert [body["vacancies"] for body in sent_103] == [3]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_schema_6_store_gets_the_sums_of_its_stored_ranges_per_product_and_option(
    backend: str, new_database: Callable[[str], str]
) -> None:
    """Schema 7 keeps the range digests summed per (product, option): the upgrade fills the
    table from the ranges a schema-6 store holds (exact past 64 bits, unknown where a range
    is), so that the first reconciliation after it compares option digests as before. A
    MySQL upgrade stopped after creating the table (its DDL commits by itself) left rows
    that are filled again, not kept."""
    url = new_database(backend)
    big = RangeDigest(3, -(2**63) * 3)
    digests = {("1", "a", "1"): big, ("1", "a", "2"): big, ("2", "a", "1"): RangeDigest(1, 5)}
    with opened(url) as store:
        store.open()
        store.record_ranges(digests, dirty=[("3", "b", "1")], basis="b1")
        expected = StoredRanges(store.connector).load().options
    with connected(url) as conn, conn.begin():
        conn.execute(sa.text("DELETE FROM seyaha_option_digests"))
        conn.execute(
            sa.text(
                "INSERT INTO seyaha_option_digests (product_id, option_id, row_count, digest)"
                " VALUES ('9', 'z', 1, '1')"
            )
        )
        conn.execute(sa.text("UPDATE seyaha_schema_version SET version_num = '0006'"))
        meta = sa.table("seyaha_meta", sa.column("key"), sa.column("value"))
        conn.execute(sa.update(meta).where(meta.c.key == "schema_version").values(value="6"))

    with opened(url) as store:
        plan = store.open()
        assert (plan.current, plan.steps) == (6, (STEP_7,))
        by_option = store.fingerprints.ranges.option_digests()
    assert by_option.options == expected
    assert by_option.options == DigestTable.of([("a", f"7:{2 * big.digest + 5}"), ("b", UNKNOWN)])
    assert by_option.ranges == 4
    with connected(url) as conn:
        assert versions_of(conn) == ["0007"]


# -- 3. once only, and a dry run that changes nothing -----------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_opening_an_upgraded_store_again_changes_nothing(
    backend: str, store_010: Callable[..., Store010]
) -> None:
    written = store_010(backend)
    with opened(written.url) as store:
        store.open()
        with connected(written.url) as conn:
            before = (dump(conn), versions_of(conn), tables_of(conn))

        again = store.open()
        planned = Migrator(store.engine).plan()

    assert again == Plan(current=7, head=7, steps=())
    assert planned == again
    with connected(written.url) as conn:
        assert (dump(conn), versions_of(conn), tables_of(conn)) == before
    if written.file is not None:
        assert sorted(p.name for p in written.file.parent.glob("*.bak")) == [
            f"{written.file.name}.schema-1.bak"
        ]


def test_head_is_the_last_migration_in_the_folder() -> None:
    # HEAD lets a start on an up-to-date store skip Alembic; a new migration must move it.
    assert head_version() == HEAD


def test_a_start_on_an_up_to_date_store_does_not_load_alembic(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'state.db'}"
    StateStore.from_url(url).open()  # created at HEAD (Alembic runs here, in this process)
    probe = (
        "import sys\n"
        "from agent.store import StateStore\n"
        f"plan = StateStore.from_url({url!r}).open()\n"
        "print(plan.current, plan.head, len(plan.steps), 'alembic' in sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=WAIT_S
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(HEAD), str(HEAD), "0", "False"]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_dry_run_on_a_010_store_names_the_upgrade_and_changes_nothing(
    backend: str, store_010: Callable[..., Store010]
) -> None:
    written = store_010(backend)
    with connected(written.url) as conn:
        before = dump(conn)

    with opened(written.url) as store:
        plan = Migrator(store.engine).migrate(dry_run=True)

    assert plan == Plan(
        current=1,
        head=7,
        steps=(STEP_2, STEP_3, STEP_4, STEP_5, STEP_6, STEP_7),
        stamp_legacy=True,
        backup=written.backup,
    )
    with connected(written.url) as conn:
        assert tables_of(conn) == set(TABLES)  # no version table, no leases
        assert meta_of(conn)["schema_version"] == "1"
        assert dump(conn) == before  # the scanner lease and the old payloads are still there
    if written.backup is not None:
        assert not written.backup.exists()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_dry_run_on_a_new_database_names_every_step_and_creates_nothing(
    backend: str, new_database: Callable[[str], str]
) -> None:
    url = new_database(backend)
    with opened(url) as store:
        plan = Migrator(store.engine).migrate(dry_run=True)

    assert plan == Plan(
        current=None, head=7, steps=(STEP_1, STEP_2, STEP_3, STEP_4, STEP_5, STEP_6, STEP_7)
    )
    with connected(url) as conn:
        assert tables_of(conn) == set()


# -- 4. the way back from a SQLite upgrade ------------------------------------------------------


def _wal_without_checkpoints(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode = WAL")
        cursor.execute("PRAGMA wal_autocheckpoint = 0")
    finally:
        cursor.close()


def test_upgrading_a_sqlite_store_keeps_a_complete_schema_1_copy_to_roll_back_to(
    day: date, tmp_path: Path
) -> None:
    """Even of a store whose 0.1.0 agent was killed with its writes still in the write-ahead
    log: a copy of the database file alone would miss them."""
    running, state = tmp_path / "running" / "state.db", tmp_path / "state.db"
    running.parent.mkdir()
    contents = left_by_010(day)
    engine = sa.create_engine(f"sqlite:///{running}")
    sa.event.listen(engine, "connect", _wal_without_checkpoints)
    try:
        write_store_v1(engine, contents)
        with engine.connect() as conn:
            before = dump(conn)
        # the agent is killed: its files stay as they are, the log not copied into the database
        for suffix in ("", "-wal"):
            shutil.copyfile(f"{running}{suffix}", f"{state}{suffix}")
    finally:
        engine.dispose()
    file_alone = tmp_path / "running" / "file-alone.db"
    shutil.copyfile(state, file_alone)
    with connected(f"sqlite:///{file_alone}") as conn:
        assert tables_of(conn) == set()  # everything 0.1.0 wrote is still in the log

    with opened(f"sqlite:///{state}") as store:
        store.open()
        assert len(store.admin.entries()) == len(contents.outbox)

    backup = tmp_path / "state.db.schema-1.bak"
    assert sorted(p.name for p in tmp_path.glob("*.bak")) == [backup.name]
    # The README's way back: stop the agent, put the copy in place, drop the WAL files.
    backup.replace(state)
    for suffix in ("-wal", "-shm"):
        Path(f"{state}{suffix}").unlink(missing_ok=True)
    with connected(f"sqlite:///{state}") as conn:
        assert tables_of(conn) == set(TABLES)
        assert outbox_indexes(conn) == INDEXES_2  # 0.1.0's own
        assert meta_of(conn)["schema_version"] == "1"
        assert dump(conn) == before  # the old payloads, the scanner lease, everything


def test_a_new_sqlite_store_is_created_without_a_backup(
    new_database: Callable[[str], str],
) -> None:
    url = new_database("sqlite")
    with opened(url) as store:
        plan = store.open()

    assert plan == Plan(
        current=None, head=7, steps=(STEP_1, STEP_2, STEP_3, STEP_4, STEP_5, STEP_6, STEP_7)
    )
    database = Path(str(sa.engine.make_url(url).database))
    assert list(database.parent.glob("*.bak")) == []


# -- 5. agents starting together on one store -----------------------------------------------------

STARTER = """
import json, sys
from agent.store import StateStore

store = StateStore.from_url(sys.argv[1])
try:
    store.ping()
    print("ready", flush=True)
    sys.stdin.readline()
    plan = store.open()
    print(json.dumps([[s.version for s in plan.steps], plan.stamp_legacy]))
finally:
    store.close()
"""
"""One agent's start: connect, wait for the word, open the store, and print what it did:
[the versions it applied, whether it stamped a 0.1.0 store]."""

AGENTS = 4
ROUNDS = 3


def start_together(url: str, agents: int) -> list[tuple[list[int], bool]]:
    """Start `agents` processes on `url`, release them at once, and return what each did."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    processes = [
        subprocess.Popen(
            [sys.executable, "-W", "error", "-c", STARTER, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=env,
        )
        for _ in range(agents)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            line = process.stdout.readline()
            assert line == "ready\n", (
                f"{line!r}; stderr: {process.stderr.read() if process.stderr else ''}"
            )
        for process in processes:  # the barrier: every process is connected and waiting
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        finished = [process.communicate(timeout=WAIT_S) for process in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                if stream is not None:  # left open when a start failed: later tests warn
                    stream.close()
    failed = [
        (process.returncode, err)
        for process, (_, err) in zip(processes, finished, strict=True)
        if process.returncode != 0
    ]
    assert failed == [], f"agents failed to start: {failed}"
    return [tuple(json.loads(out)) for out, _ in finished]


@pytest.mark.parametrize(
    ("written_by", "migrating_start"),
    [
        pytest.param("nothing", ([1, 2, 3, 4, 5, 6, 7], False), id="new"),
        pytest.param("0.1.0", ([2, 3, 4, 5, 6, 7], True), id="written-by-0.1.0"),
    ],
)
@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_agents_starting_together_on_one_store_migrate_it_once_and_all_start(
    backend: str,
    written_by: str,
    migrating_start: tuple[list[int], bool],
    new_database: Callable[[str], str],
    store_010: Callable[..., Store010],
) -> None:
    for _ in range(ROUNDS):  # each round on a new database: a race shows up only sometimes
        url = new_database(backend) if written_by == "nothing" else store_010(backend).url

        did = start_together(url, AGENTS)

        # one migrates (or stamps and upgrades 0.1.0's store); the others find it done
        assert sorted(did) == [([], False)] * (AGENTS - 1) + [migrating_start]
        with connected(url) as conn:
            assert versions_of(conn) == ["0007"]
            assert meta_of(conn)["schema_version"] == "7"


@contextmanager
def migration_lock_held(url: str) -> Iterator[None]:
    """Hold the migration lock of the store at `url`, as a migrating agent does: the advisory
    lock on a server, the lock file beside a SQLite store."""
    engine = sa.create_engine(url)
    dialect = dialect_of(engine)
    database = dialect.file_database(engine.url)
    try:
        if database is not None:
            lock = FileLock(database.with_name(database.name + ".migrate.lock"))
            assert lock.try_acquire()
            try:
                yield
            finally:
                lock.release()
            return
        with engine.connect() as conn:
            assert dialect.try_lock(conn, LOCK_NAME)
            conn.commit()
            try:
                yield
            finally:
                dialect.unlock(conn, LOCK_NAME)
                conn.commit()
    finally:
        engine.dispose()


class Starting:
    """An agent's start (StateStore.open) on `url`, in a thread."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.done = threading.Event()
        self.outcome: list[Plan | BaseException] = []
        self.thread = threading.Thread(target=self._start, name="starting-agent")
        self.thread.start()

    def _start(self) -> None:
        try:
            with opened(self.url) as store:
                self.outcome.append(store.open())
        except BaseException as exc:
            self.outcome.append(exc)
        finally:
            self.done.set()

    def result(self) -> list[Plan | BaseException]:
        assert self.done.wait(WAIT_S), "the agent did not start"
        self.thread.join(WAIT_S)
        return self.outcome


def waits_said(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What agents logged when they found the migration lock taken."""
    return [
        r.getMessage()
        for r in caplog.records
        if getattr(r, "event", None) == "state.migration_wait"
    ]


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_an_agent_starting_while_another_migrates_waits_for_it_then_starts(
    backend: str, new_database: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.state")
    url = new_database(backend)

    with migration_lock_held(url):
        starting = Starting(url)
        wait_until(lambda: waits_said(caplog) != [], "the agent to say it waits", WAIT_S)
        # A window that proves it does not go ahead while the lock is held.
        assert not starting.done.wait(1.0), f"it went ahead: {starting.outcome}"
        with connected(url) as conn:
            assert tables_of(conn) == set()

    assert starting.result() == [
        Plan(current=None, head=7, steps=(STEP_1, STEP_2, STEP_3, STEP_4, STEP_5, STEP_6, STEP_7))
    ]
    where = sa.engine.make_url(url).render_as_string(hide_password=True)
    assert waits_said(caplog) == [
        f"another seyaha-agent is migrating the state store at {where}; waiting for it"
    ]
    with connected(url) as conn:
        assert versions_of(conn) == ["0007"]


@pytest.mark.parametrize(
    "backend",
    [
        pytest.param("postgresql", marks=pytest.mark.postgres),
        # GET_LOCK names are global to a MySQL/MariaDB server: the lock's name must carry
        # the database's (PostgreSQL's advisory locks belong to one database anyway).
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
)
def test_a_migration_of_one_store_does_not_hold_up_an_agent_on_another_store_of_the_server(
    backend: str, new_database: Callable[[str], str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent.state")
    other, url = new_database(backend), new_database(backend)

    with migration_lock_held(other):
        starting = Starting(url)
        wait_until(
            lambda: starting.done.is_set() or waits_said(caplog) != [],
            "the agent to start, or to say it waits",
            WAIT_S,
        )
        waited = waits_said(caplog)
    outcome = starting.result()  # once the other store's lock is free, in any case

    assert waited == []
    assert outcome == [
        Plan(current=None, head=7, steps=(STEP_1, STEP_2, STEP_3, STEP_4, STEP_5, STEP_6, STEP_7))
    ]
