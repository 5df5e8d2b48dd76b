"""SourceReader against real SQLite, PostgreSQL and MariaDB databases."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import sqlalchemy as sa

from agent.errors import QueryError, SourceUnavailable
from agent.model import Slot
from agent.source.reader import DUPLICATE_KEY, Snapshot, SourceReader
from tests.integration.inventory import (
    BACKEND_PARAMS,
    CATALOG_QUERY,
    SLOTS_QUERY,
    Inventory,
)

every_backend = pytest.mark.parametrize("backend", BACKEND_PARAMS)

MakeInventory = Callable[[str], Inventory]
MakeReader = Callable[..., SourceReader]

DAY = datetime(2031, 1, 15)
"""Far enough ahead that nothing here is ever in the past; Istanbul is UTC+03:00 all year."""


def _at(hour: int) -> datetime:
    return DAY.replace(hour=hour)


def _by_id(slots: list[Slot]) -> dict[str, Slot]:
    return {s.availability_id: s for s in slots}


def _catalog_and_slots(inventory: Inventory) -> None:
    inventory.add_product(1, "Bosphorus Cruise", 4500, {"1-a": "Sunset", "1-b": "Day"})
    inventory.add_product(2, "Museum Pass", 9900, {"2-pass": "Pass"})
    add = inventory.add_slot
    add(11, "1-a", _at(9), capacity=10, vacancies=8)  # AVAILABLE: half or more left
    add(12, "1-a", _at(10), capacity=10, vacancies=5)  # AVAILABLE: exactly half
    add(13, "1-a", _at(11), capacity=10, vacancies=4)  # LIMITED: fewer than half
    add(14, "1-a", _at(12), capacity=10, vacancies=0)  # SOLD_OUT
    add(15, "1-b", _at(13), capacity=10, vacancies=6, status="CLOSED")  # explicit wins
    add(16, "1-b", _at(14), capacity=10, vacancies=6, status="closed")  # any case
    add(21, "2-pass", _at(9), capacity=None, vacancies=None)  # FREESALE
    add(22, "2-pass", _at(10), capacity=None, vacancies=7)  # FREESALE sends no vacancies


@every_backend
def test_ids_come_back_as_strings_and_status_is_derived(
    backend: str, make_inventory: MakeInventory, make_reader: MakeReader
) -> None:
    inventory = make_inventory(backend)
    _catalog_and_slots(inventory)

    snapshot = make_reader(inventory.url).read()

    assert snapshot.skipped == []
    assert sorted(row.key for row in snapshot.catalog) == [
        ("1", "1-a"),
        ("1", "1-b"),
        ("2", "2-pass"),
    ]
    assert snapshot.catalog_rows_read == 3
    assert snapshot.slot_rows_read == 8
    for s in snapshot.slots:
        assert isinstance(s.product_id, str)
        assert isinstance(s.option_id, str)
        assert isinstance(s.availability_id, str)
    got = {
        k: (s.product_id, s.option_id, s.status, s.vacancies, s.capacity)
        for k, s in _by_id(snapshot.slots).items()
    }
    assert got == {
        "11": ("1", "1-a", "AVAILABLE", 8, 10),
        "12": ("1", "1-a", "AVAILABLE", 5, 10),
        "13": ("1", "1-a", "LIMITED", 4, 10),
        "14": ("1", "1-a", "SOLD_OUT", 0, 10),
        "15": ("1", "1-b", "CLOSED", 6, 10),
        "16": ("1", "1-b", "CLOSED", 6, 10),
        "21": ("2", "2-pass", "FREESALE", None, None),
        "22": ("2", "2-pass", "FREESALE", None, None),
    }


@every_backend
def test_catalog_fingerprint_follows_metadata_and_catalog_keys(
    backend: str, make_inventory: MakeInventory, make_reader: MakeReader
) -> None:
    inventory = make_inventory(backend)
    _catalog_and_slots(inventory)
    reader = make_reader(inventory.url)

    before = {row.key: row.fingerprint for row in reader.read().catalog}
    again = {row.key: row.fingerprint for row in reader.read().catalog}
    inventory.set_price(2, 10900)
    after = {row.key: row.fingerprint for row in reader.read().catalog}

    assert before == again
    assert after[("2", "2-pass")] != before[("2", "2-pass")]
    assert after[("1", "1-a")] == before[("1", "1-a")]
    assert reader.catalog_keys() == {("1", "1-a"), ("1", "1-b"), ("2", "2-pass")}


@every_backend
def test_sample_reads_at_most_limit_rows_per_query(
    backend: str, make_inventory: MakeInventory, make_reader: MakeReader
) -> None:
    inventory = make_inventory(backend)
    _catalog_and_slots(inventory)

    snapshot = make_reader(inventory.url).sample(limit=2)

    assert (snapshot.catalog_rows_read, snapshot.slot_rows_read) == (2, 2)
    assert (len(snapshot.catalog), len(snapshot.slots)) == (2, 2)


@every_backend
def test_naive_start_is_wall_clock_time_in_the_configured_zone(
    backend: str, make_inventory: MakeInventory, make_reader: MakeReader
) -> None:
    """SQLite TEXT, PostgreSQL timestamp, MariaDB DATETIME: no zone, so the product's."""
    inventory = make_inventory(backend)
    inventory.add_product(1, "Cruise", 4500, {"1-a": "Sunset"})
    inventory.add_slot(11, "1-a", DAY.replace(hour=10, minute=30), capacity=10, vacancies=10)

    (item,) = make_reader(inventory.url).read().slots

    assert item.local_date_time_start == "2031-01-15T10:30:00+03:00"
    assert item.start_utc == datetime(2031, 1, 15, 7, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "local", "utc_hour"),
    [
        ("2031-01-15T10:00:00+05:00", "2031-01-15T10:00:00+05:00", 5),
        ("2031-01-15 10:00:00", "2031-01-15T10:00:00+03:00", 7),
        ("2031-01-15T10:00:00Z", "2031-01-15T10:00:00+00:00", 10),
    ],
)
@every_backend
def test_string_start_keeps_its_offset_or_takes_the_zone(
    backend: str,
    make_inventory: MakeInventory,
    make_reader: MakeReader,
    text: str,
    local: str,
    utc_hour: int,
) -> None:
    inventory = make_inventory(backend)
    slots_query = (
        "SELECT 1 AS product_id, 'a' AS option_id, 7 AS availability_id, "
        f"'{text}' AS local_date_time_start, 3 AS vacancies, 5 AS capacity"
    )

    (item,) = make_reader(inventory.url, slots_query=slots_query).read().slots

    assert item.key == ("1", "a", "7")
    assert item.local_date_time_start == local
    assert item.start_utc == datetime(2031, 1, 15, utc_hour, 0, tzinfo=UTC)


@pytest.mark.parametrize("backend", [p for p in BACKEND_PARAMS if p.id != "mariadb"])
def test_aware_start_is_shown_in_the_configured_zone(
    backend: str, make_inventory: MakeInventory, make_reader: MakeReader
) -> None:
    """PostgreSQL timestamptz comes back in the session's zone (New York here); SQLite TEXT
    may carry an offset of its own. Either way the instant is kept and shown in Istanbul
    time, except that an offset written in the text is the query's deliberate choice. (MariaDB
    has no time-zone-aware column type.)"""
    inventory = make_inventory(backend)
    inventory.add_product(1, "Cruise", 4500, {"1-a": "Sunset"})
    instant = datetime(2031, 1, 15, 7, 0, tzinfo=UTC)
    if backend == "postgresql":
        database = sa.engine.make_url(inventory.url).database
        with inventory.engine.begin() as conn:
            conn.execute(
                sa.text(f"ALTER DATABASE \"{database}\" SET timezone TO 'America/New_York'")
            )
        inventory.engine.dispose()
        inventory.add_slot(11, "1-a", _at(1), start_tz=instant, capacity=10, vacancies=10)
        slots_query = SLOTS_QUERY.replace("s.starts_at AS", "s.starts_at_tz AS")
        expected = "2031-01-15T10:00:00+03:00"
    else:
        inventory.add_slot(11, "1-a", "2031-01-15T02:00:00-05:00", capacity=10, vacancies=10)
        slots_query = SLOTS_QUERY
        expected = "2031-01-15T02:00:00-05:00"
    reader = make_reader(inventory.url, slots_query=slots_query)

    if backend == "postgresql":  # the driver really does hand back a New York time
        with reader.engine.connect() as conn:
            raw = conn.execute(sa.text("SELECT starts_at_tz FROM slots")).scalar_one()
        assert raw.utcoffset() is not None
        assert raw.utcoffset().total_seconds() == -5 * 3600

    (item,) = reader.read().slots

    assert item.local_date_time_start == expected
    assert item.start_utc == instant


@every_backend
def test_bad_rows_are_skipped_with_key_and_reason_and_the_rest_comes_through(
    backend: str, make_inventory: MakeInventory, make_reader: MakeReader
) -> None:
    inventory = make_inventory(backend)
    inventory.add_product(1, "Cruise", 4500, {"1-a": "Sunset"})
    add = inventory.add_slot
    add(11, "1-a", _at(9), capacity=10, vacancies=8)
    add(12, "1-a", _at(10), capacity=10, vacancies=-2)  # negative vacancies
    add(13, "ghost", _at(11), capacity=10, vacancies=3)  # option gone: NULL product_id
    add(14, "1-a", _at(12), capacity=10, vacancies=None)  # status cannot be derived
    add(15, "1-a", _at(13), capacity=10, vacancies=1, status="PAUSED")  # unknown status
    if backend == "sqlite":
        add(16, "1-a", "2031-02-30 10:00:00", capacity=10, vacancies=3)  # no such day
    add(17, "1-a", _at(14), capacity=10, vacancies=2)

    snapshot = make_reader(inventory.url).read()

    assert sorted(_by_id(snapshot.slots)) == ["11", "17"]
    reasons = {row.key: row.reason for row in snapshot.skipped}
    assert all(row.query == "slots_query" for row in snapshot.skipped)
    assert reasons[(1, "1-a", 12)] == "vacancies is negative (-2)"
    assert reasons[(None, "ghost", 13)] == "product_id is NULL"
    assert "vacancies is NULL while capacity is 10" in reasons[(1, "1-a", 14)]
    assert "status 'PAUSED' is not one of" in reasons[(1, "1-a", 15)]
    expected_skipped = 4
    if backend == "sqlite":
        expected_skipped += 1
        assert "is not a valid date and time" in reasons[(1, "1-a", 16)]
        assert "2031-02-30 10:00:00" in reasons[(1, "1-a", 16)]
    assert len(snapshot.skipped) == expected_skipped
    # A bad row with a sound key keeps its last known state; one without a key cannot.
    assert ("1", "1-a", "12") in snapshot.slots_protected
    assert ("1", "1-a", "15") in snapshot.slots_protected
    assert not any(key[1] == "ghost" for key in snapshot.slots_protected)
    assert snapshot.slot_rows_read == expected_skipped + 2


@every_backend
def test_a_duplicated_key_sends_no_copy_and_keeps_its_last_known_state(
    backend: str, make_inventory: MakeInventory, make_reader: MakeReader
) -> None:
    inventory = make_inventory(backend)
    inventory.add_product(1, "Cruise", 4500, {"1-a": "Sunset"})
    inventory.add_slot(11, "1-a", _at(9), capacity=10, vacancies=8)
    inventory.add_slot(12, "1-a", _at(10), capacity=10, vacancies=5)
    catalog_query = f"{CATALOG_QUERY} UNION ALL {CATALOG_QUERY}"
    # The second copy of slot 12 says something else: which one would win depended on order.
    other_copy = SLOTS_QUERY.replace("s.vacancies", "s.vacancies - 1 AS vacancies", 1)
    assert other_copy != SLOTS_QUERY
    for slots_query in (
        f"{SLOTS_QUERY} UNION ALL {other_copy} WHERE s.id = 12",
        f"{other_copy} WHERE s.id = 12 UNION ALL {SLOTS_QUERY}",
    ):
        reader = make_reader(inventory.url, catalog_query=catalog_query, slots_query=slots_query)
        snapshot = reader.read()

        assert snapshot.catalog == []
        assert snapshot.catalog_protected == {("1", "1-a")}
        assert _by_id(snapshot.slots) == {"11": snapshot.slots[0]}
        assert snapshot.slots_protected == {("1", "1-a", "12")}
        assert sorted((row.query, row.key, row.reason) for row in snapshot.skipped) == [
            ("catalog_query", (1, "1-a"), DUPLICATE_KEY),
            ("slots_query", (1, "1-a", 12), DUPLICATE_KEY),
        ]

        # A full scan streams the rows in key order: the same rule holds there.
        streamed = Snapshot()
        with reader.transaction() as conn:
            found = dict(reader.stream_slots(conn, streamed))
        assert found[("1", "1-a", "12")] is None  # protected: no copy is sent
        assert found[("1", "1-a", "11")] is not None
        assert [(r.key, r.reason) for r in streamed.skipped] == [((1, "1-a", 12), DUPLICATE_KEY)]


@every_backend
def test_missing_required_column_names_the_column_and_lists_what_came_back(
    backend: str, make_inventory: MakeInventory, make_reader: MakeReader
) -> None:
    inventory = make_inventory(backend)
    _catalog_and_slots(inventory)
    slots_query = SLOTS_QUERY.replace("AS local_date_time_start", "AS starts")

    with pytest.raises(QueryError) as caught:
        make_reader(inventory.url, slots_query=slots_query).read()

    assert str(caught.value) == (
        "slots_query returned no column local_date_time_start (got: product_id, option_id, "
        "availability_id, starts, status, vacancies, capacity)"
    )


@every_backend
def test_missing_catalog_key_column(
    backend: str, make_inventory: MakeInventory, make_reader: MakeReader
) -> None:
    inventory = make_inventory(backend)
    catalog_query = "SELECT p.id AS product_id, p.title FROM products p"

    with pytest.raises(QueryError) as caught:
        make_reader(inventory.url, catalog_query=catalog_query).read()

    assert str(caught.value) == (
        "catalog_query returned no column option_id (got: product_id, title)"
    )


@pytest.mark.parametrize(
    ("query", "which"),
    [
        ("SELEC p.id AS product_id FROM products p", "catalog_query"),
        ("SELECT no_such_column AS product_id FROM products", "catalog_query"),
        ("SELECT * FROM no_such_table", "catalog_query"),
        ("SELECT id AS product_id FROM products WHERE", "slots_query"),
    ],
    ids=["syntax", "unknown-column", "unknown-table", "slots-syntax"],
)
@every_backend
def test_a_broken_query_is_a_query_error_naming_the_query(
    backend: str,
    make_inventory: MakeInventory,
    make_reader: MakeReader,
    query: str,
    which: str,
) -> None:
    """Not SourceUnavailable: the database answered, the query is what must be fixed."""
    inventory = make_inventory(backend)
    queries = {"catalog_query": CATALOG_QUERY, "slots_query": SLOTS_QUERY, which: query}

    with pytest.raises(QueryError) as caught:
        make_reader(inventory.url, **queries).read()

    message = str(caught.value)
    assert message.startswith(f"{which} failed: ")
    assert "\n" not in message


@every_backend
def test_unreachable_database_is_source_unavailable(
    backend: str, make_reader: MakeReader, tmp_path: Path
) -> None:
    url = {
        "sqlite": f"sqlite:///{tmp_path / 'no-such-folder' / 'inventory.db'}",
        "postgresql": "postgresql+psycopg://agent:hunter2@127.0.0.1:1/inventory",
        "mariadb": "mysql+pymysql://agent:hunter2@127.0.0.1:1/inventory",
    }[backend]
    reader = make_reader(url)

    for attempt in (reader.read, reader.catalog_keys, reader.sample):
        with pytest.raises(SourceUnavailable) as caught:
            attempt()
        message = str(caught.value)
        assert message.startswith("cannot reach the source database at ")
        assert "\n" not in message
        assert "hunter2" not in message
        # raised `from None`: one line for the operator, not a chained driver traceback
        assert caught.value.__cause__ is None
        assert caught.value.__suppress_context__


@every_backend
def test_both_queries_see_the_source_at_one_moment(
    backend: str, make_inventory: MakeInventory, make_reader: MakeReader
) -> None:
    """A product and its slots committed between the catalog and the slots query are seen
    by neither (SQLite in WAL mode, where a writer can commit while a read is open)."""
    inventory = make_inventory(backend)
    if backend == "sqlite":
        with inventory.engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode = WAL").scalar() == "wal"
    inventory.add_product(1, "Cruise", 4500, {"1-a": "Sunset"})
    inventory.add_slot(11, "1-a", _at(9), capacity=10, vacancies=8)
    reader = make_reader(inventory.url)
    wrote: list[str] = []

    @sa.event.listens_for(reader.engine, "before_cursor_execute")
    def meanwhile(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        if "FROM slots" in statement and not wrote:
            wrote.append(statement)
            inventory.add_product(2, "Balloon", 25000, {"2-a": "Sunrise"})
            inventory.add_slot(21, "2-a", _at(5), capacity=20, vacancies=20)

    snapshot = reader.read()

    assert wrote
    assert [row.key for row in snapshot.catalog] == [("1", "1-a")]
    assert [s.key for s in snapshot.slots] == [("1", "1-a", "11")]
    later = reader.read()
    assert sorted(row.key for row in later.catalog) == [("1", "1-a"), ("2", "2-a")]
    assert sorted(s.key for s in later.slots) == [("1", "1-a", "11"), ("2", "2-a", "21")]


@every_backend
def test_a_query_ending_in_a_comment_runs_in_check_and_in_the_scan_alike(
    backend: str, make_inventory: MakeInventory, make_reader: MakeReader
) -> None:
    """The ordering wrapper of the full scan used to land inside a trailing `-- comment`:
    `check` passed and every scan failed with a syntax error."""
    inventory = make_inventory(backend)
    _catalog_and_slots(inventory)
    reader = make_reader(
        inventory.url, slots_query=SLOTS_QUERY.rstrip() + "  -- every slot, including closed"
    )

    sampled = reader.sample()
    streamed = Snapshot()
    with reader.transaction() as conn:
        found = list(reader.stream_slots(conn, streamed))

    assert sampled.slot_rows_read == len(found) > 0
    assert sorted(key for key, _slot in found) == sorted(s.key for s in sampled.slots)
