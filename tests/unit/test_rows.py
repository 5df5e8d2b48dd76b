from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from agent.model import slot_fingerprint
from agent.source import rows
from agent.source.rows import BadRow

BERLIN = ZoneInfo("Europe/Berlin")
ISTANBUL = ZoneInfo("Europe/Istanbul")
NEW_YORK = ZoneInfo("America/New_York")


def slot_row(**overrides: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "product_id": 101,
        "option_id": "standard",
        "availability_id": 9001,
        "local_date_time_start": datetime(2026, 7, 1, 10, 0),
        "status": None,
        "vacancies": 8,
        "capacity": 10,
    }
    row.update(overrides)
    return row


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (7, "7"),
        (0, "0"),
        (-3, "-3"),
        ("abc", "abc"),
        ("  P-1 ", "P-1"),
        (Decimal("12"), "12"),
        (Decimal("12.000"), "12"),
        (12.0, "12"),
        (10**20, "100000000000000000000"),
        (b"p-1", "p-1"),
        (bytearray(b"p-2"), "p-2"),
        (memoryview(b"p-3"), "p-3"),
        ("ürün-5", "ürün-5"),
    ],
)
def test_to_id_sends_a_string(value: Any, expected: str) -> None:
    assert rows.to_id(value, "product_id") == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "option_id is NULL"),
        (True, "option_id is a boolean"),
        (1.5, "option_id is not a whole number"),
        (Decimal("2.5"), "option_id is not a whole number"),
        (float("nan"), "option_id is not a whole number"),
        (float("inf"), "option_id is not a whole number"),
        (Decimal("NaN"), "option_id is not a whole number"),
        (Decimal("Infinity"), "option_id is not a whole number"),
        ("", "option_id is empty"),
        ("   ", "option_id is empty"),
        (b"\xff\xfe", "option_id is not valid UTF-8"),
    ],
)
def test_to_id_refuses_unusable_values(value: Any, reason: str) -> None:
    with pytest.raises(BadRow, match=reason):
        rows.to_id(value, "option_id")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        (0, 0),
        (12, 12),
        (" 7 ", 7),
        ("-0", 0),
        (Decimal("3"), 3),
        (Decimal("3.00"), 3),
        (4.0, 4),
    ],
)
def test_to_count(value: Any, expected: int | None) -> None:
    assert rows.to_count(value, "vacancies") == expected


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (-1, r"vacancies is negative \(-1\)"),
        ("-2", r"vacancies is negative \(-2\)"),
        (Decimal("-4"), "vacancies is negative"),
        ("seven", "vacancies is not a number"),
        ("7.0", "vacancies is not a number"),
        (2.5, "vacancies is not a whole number"),
        (float("nan"), "vacancies is not a whole number"),
        (Decimal("Infinity"), "vacancies is not a whole number"),
        (Decimal("-Infinity"), "vacancies is not a whole number"),
        (False, "vacancies is a boolean"),
        ([3], "vacancies has an unexpected type"),
    ],
)
def test_to_count_refuses_unusable_values(value: Any, reason: str) -> None:
    with pytest.raises(BadRow, match=reason):
        rows.to_count(value, "vacancies")


@pytest.mark.parametrize(
    ("status", "vacancies", "capacity", "expected"),
    [
        ("AVAILABLE", 0, 10, ("AVAILABLE", 0)),
        ("sold_out", 4, 10, ("SOLD_OUT", 4)),
        ("  Limited ", 9, 10, ("LIMITED", 9)),
        ("CLOSED", 3, 10, ("CLOSED", 3)),
        ("FREESALE", 5, 10, ("FREESALE", None)),
        ("freesale", None, None, ("FREESALE", None)),
        ("AVAILABLE", None, None, ("AVAILABLE", None)),
        (None, None, None, ("FREESALE", None)),
        (None, 5, None, ("FREESALE", None)),
        (None, 0, 10, ("SOLD_OUT", 0)),
        (None, 0, 0, ("SOLD_OUT", 0)),
        (None, 1, 10, ("LIMITED", 1)),
        (None, 4, 10, ("LIMITED", 4)),
        (None, 4, 9, ("LIMITED", 4)),
        (None, 5, 10, ("AVAILABLE", 5)),
        (None, 5, 9, ("AVAILABLE", 5)),
        (None, 10, 10, ("AVAILABLE", 10)),
        ("FREESALE", 12, 10, ("FREESALE", None)),  # vacancies are not sent with FREESALE
    ],
)
def test_derive_status(
    status: str | None,
    vacancies: int | None,
    capacity: int | None,
    expected: tuple[str, int | None],
) -> None:
    assert rows.derive_status(status, vacancies, capacity) == expected


@pytest.mark.parametrize("status", ["OPEN", "", "sold out", "AVAILABLE_NOW"])
def test_unknown_status_is_a_bad_row(status: str) -> None:
    with pytest.raises(BadRow, match=r"status .* is not one of AVAILABLE, FREESALE"):
        rows.derive_status(status, 3, 10)


def test_capacity_without_vacancies_is_a_bad_row() -> None:
    with pytest.raises(BadRow, match="vacancies is NULL while capacity is 10"):
        rows.derive_status(None, None, 10)


@pytest.mark.parametrize(
    ("value", "zone", "expected"),
    [
        pytest.param(
            datetime(2026, 7, 1, 10, 0), ISTANBUL, "2026-07-01T10:00:00+03:00", id="naive"
        ),
        pytest.param(
            datetime(2026, 1, 15, 10, 0), BERLIN, "2026-01-15T10:00:00+01:00", id="winter"
        ),
        pytest.param(
            datetime(2026, 7, 15, 10, 0), BERLIN, "2026-07-15T10:00:00+02:00", id="summer"
        ),
        pytest.param(
            datetime(2026, 7, 1, 10, 0, 30, 999999), BERLIN, "2026-07-01T10:00:30+02:00", id="micro"
        ),
        pytest.param(
            datetime(2026, 7, 1, 10, 0, tzinfo=UTC),
            NEW_YORK,
            "2026-07-01T06:00:00-04:00",
            id="aware",
        ),
        pytest.param(
            datetime(2026, 7, 1, 23, 30, tzinfo=timezone(timedelta(hours=-5))),
            ISTANBUL,
            "2026-07-02T07:30:00+03:00",
            id="aware-next-day",
        ),
        pytest.param("2026-07-01T10:00:00", BERLIN, "2026-07-01T10:00:00+02:00", id="iso-naive"),
        pytest.param("  2026-07-01 10:00  ", BERLIN, "2026-07-01T10:00:00+02:00", id="iso-space"),
        pytest.param(b"2026-07-01T10:00:00", BERLIN, "2026-07-01T10:00:00+02:00", id="bytes"),
        pytest.param(
            "2026-07-01T10:00:00+05:30", BERLIN, "2026-07-01T10:00:00+05:30", id="iso-offset"
        ),
        pytest.param("2026-07-01T10:00:00Z", ISTANBUL, "2026-07-01T10:00:00+00:00", id="iso-z"),
        pytest.param(
            "2026-01-15T08:00:00-03:30", BERLIN, "2026-01-15T08:00:00-03:30", id="iso-negative"
        ),
        pytest.param(date(2026, 7, 1), ISTANBUL, "2026-07-01T00:00:00+03:00", id="date"),
        pytest.param("2026-10-25T02:30:00", BERLIN, "2026-10-25T02:30:00+02:00", id="ambiguous"),
        pytest.param(
            datetime(2026, 10, 25, 2, 30, fold=1),
            BERLIN,
            "2026-10-25T02:30:00+02:00",
            id="ambiguous-fold1",
        ),
        pytest.param(
            datetime(2026, 11, 1, 1, 30), NEW_YORK, "2026-11-01T01:30:00-04:00", id="ambiguous-ny"
        ),
    ],
)
def test_start_is_sent_with_seconds_and_offset(value: Any, zone: ZoneInfo, expected: str) -> None:
    assert rows.format_local(rows.parse_start(value, zone)) == expected


def test_ambiguous_time_is_the_first_occurrence() -> None:
    start = rows.parse_start(datetime(2026, 10, 25, 2, 30), BERLIN)
    assert start.astimezone(UTC) == datetime(2026, 10, 25, 0, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "zone"),
    [
        (datetime(2026, 3, 29, 2, 30), BERLIN),
        ("2026-03-29T02:00:00", BERLIN),
        ("2026-03-08T02:15:00", NEW_YORK),
    ],
)
def test_time_inside_a_dst_gap_is_a_bad_row(value: Any, zone: ZoneInfo) -> None:
    with pytest.raises(BadRow, match=rf"local_date_time_start .* does not exist in {zone.key}"):
        rows.parse_start(value, zone)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "local_date_time_start is NULL"),
        ("2026-02-30T10:00:00", "local_date_time_start '2026-02-30T10:00:00' is not a valid"),
        ("2026-13-01 10:00", "local_date_time_start .* is not a valid date and time"),
        ("tomorrow", "local_date_time_start .* is not a valid date and time"),
        ("", "local_date_time_start .* is not a valid date and time"),
        (1_782_900_000, r"local_date_time_start has an unexpected type \(int\)"),
    ],
)
def test_unusable_start_is_a_bad_row(value: Any, reason: str) -> None:
    with pytest.raises(BadRow, match=reason):
        rows.parse_start(value, BERLIN)


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 10, 25, 2, 30),
        datetime(2026, 10, 25, 2, 30, fold=1),
        datetime(2026, 7, 1, 8, 0, tzinfo=UTC),
        datetime(2026, 7, 1, 11, 0, tzinfo=timezone(timedelta(hours=3))),
        "2026-07-01T10:00:00",
        bytearray(b"2026-07-01T10:00:00"),
    ],
)
def test_every_row_with_one_start_value_gets_the_same_start(value: Any) -> None:
    """Start conversions are remembered per distinct value; a row converts the same whether
    its value was seen before or not, and an unhashable value is converted every time."""
    expected = rows.parse_start(value, BERLIN)
    for _ in range(2):
        converted = rows.slot(slot_row(local_date_time_start=value), BERLIN)
        assert converted.local_date_time_start == rows.format_local(expected)
        assert converted.start_utc == expected.astimezone(UTC)


def test_a_start_inside_a_dst_gap_is_a_bad_row_every_time() -> None:
    row = slot_row(local_date_time_start=datetime(2026, 3, 29, 2, 30))
    for _ in range(2):
        with pytest.raises(BadRow, match="does not exist in Europe/Berlin"):
            rows.slot(row, BERLIN)


@pytest.mark.parametrize(
    ("value", "zone"),
    [
        ("0001-01-01 00:30", ZoneInfo("Asia/Tokyo")),  # east of UTC: before year 1 in UTC
        (datetime(1, 1, 1, 0, 30), ZoneInfo("Asia/Tokyo")),
        ("9999-12-31 23:30", NEW_YORK),  # west of UTC: after year 9999 in UTC
        (datetime(9999, 12, 31, 23, 30), NEW_YORK),
        ("9999-12-31T23:59:59-05:00", ZoneInfo("UTC")),
        (datetime(9999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-5))), BERLIN),
    ],
)
def test_a_start_with_no_utc_instant_is_a_bad_row_not_a_crash(value: Any, zone: ZoneInfo) -> None:
    row = {"product_id": 1, "option_id": 2, "availability_id": 3, "local_date_time_start": value}
    for _ in range(2):  # the conversion cache must not turn the second one into a crash
        with pytest.raises(BadRow, match=r"local_date_time_start .* is out of range"):
            rows.slot(row, zone)


def test_format_local_refuses_a_naive_datetime() -> None:
    with pytest.raises(ValueError, match="aware"):
        rows.format_local(datetime(2026, 7, 1, 10, 0))


def test_fingerprint_ignores_key_order_and_is_pinned() -> None:
    values = {"name": "Bosphorus cruise", "price": Decimal("25.50"), "at": date(2026, 7, 1)}
    reordered = dict(reversed(list(values.items())))
    assert rows.fingerprint(values) == rows.fingerprint(reordered)
    assert rows.fingerprint(values) == "97bfbf33f9be195e94682b9d376a59bd"


@pytest.mark.parametrize(
    ("left", "right"),
    [
        ({"name": "Cruise"}, {"name": "Cruise "}),
        ({"seats": 1}, {"seats": "1"}),
        ({"seats": 1}, {"seats": True}),
        ({"at": date(2026, 7, 1)}, {"at": date(2026, 7, 2)}),
        ({"price": Decimal("25.50")}, {"price": Decimal("26.50")}),
        ({"note": None}, {"note": ""}),
        ({"a": 1}, {"a": 1, "b": None}),
    ],
)
def test_fingerprint_tells_values_apart(left: dict[str, Any], right: dict[str, Any]) -> None:
    assert rows.fingerprint(left) != rows.fingerprint(right)


def test_catalog_row_keys_by_ids_and_fingerprints_the_rest() -> None:
    first = rows.catalog_row({"product_id": 101, "option_id": 1, "name": "Cruise", "price": 25})
    same_metadata = rows.catalog_row(
        {"product_id": "102", "option_id": "2", "name": "Cruise", "price": 25}
    )
    renamed = rows.catalog_row({"product_id": 101, "option_id": 1, "name": "Tour", "price": 25})

    assert first.key == ("101", "1")
    assert first.fingerprint == same_metadata.fingerprint
    assert first.fingerprint != renamed.fingerprint


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"product_id": None, "option_id": 1}, "product_id is NULL"),
        ({"product_id": 1}, "option_id is NULL"),
        ({"product_id": 1, "option_id": "  "}, "option_id is empty"),
    ],
)
def test_catalog_row_without_sound_ids_is_a_bad_row(row: dict[str, Any], reason: str) -> None:
    with pytest.raises(BadRow, match=reason):
        rows.catalog_row(row)


def test_slot_is_the_notify_payload_with_string_ids() -> None:
    item = rows.slot(slot_row(), ISTANBUL)

    assert item.key == ("101", "standard", "9001")
    assert item.start_utc == datetime(2026, 7, 1, 7, 0, tzinfo=UTC)
    assert item.payload() == {
        "productId": "101",
        "optionId": "standard",
        "availabilityId": "9001",
        "localDateTimeStart": "2026-07-01T10:00:00+03:00",
        "status": "AVAILABLE",
        "vacancies": 8,
        "capacity": 10,
    }


@pytest.mark.parametrize(
    ("overrides", "status", "vacancies", "capacity"),
    [
        ({"capacity": None, "vacancies": None}, "FREESALE", None, None),
        ({"capacity": None, "vacancies": 4}, "FREESALE", None, None),
        ({"status": "freesale"}, "FREESALE", None, 10),
        ({"vacancies": 0}, "SOLD_OUT", 0, 10),
        ({"vacancies": "3"}, "LIMITED", 3, 10),
        ({"status": "closed", "vacancies": 5}, "CLOSED", 5, 10),
    ],
)
def test_slot_status_and_counts(
    overrides: dict[str, Any], status: str, vacancies: int | None, capacity: int | None
) -> None:
    item = rows.slot(slot_row(**overrides), ISTANBUL)
    assert (item.status, item.vacancies, item.capacity) == (status, vacancies, capacity)


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"product_id": None}, "product_id is NULL"),
        ({"option_id": None}, "option_id is NULL"),
        ({"availability_id": None}, "availability_id is NULL"),
        ({"local_date_time_start": None}, "local_date_time_start is NULL"),
        ({"local_date_time_start": "2026-04-31 10:00"}, "local_date_time_start"),
        ({"local_date_time_start": "2026-03-29 02:30"}, "DST gap"),
        ({"vacancies": -1}, "vacancies is negative"),
        ({"capacity": -10}, "capacity is negative"),
        ({"vacancies": None}, "vacancies is NULL while capacity is 10"),
        ({"status": "MAYBE"}, "status 'MAYBE' is not one of"),
        ({"vacancies": 12}, r"vacancies \(12\) exceed capacity \(10\)"),
        ({"vacancies": 12, "status": "AVAILABLE"}, r"vacancies \(12\) exceed capacity"),
        ({"vacancies": 2**31}, r"vacancies is larger than any tour \(more than 2147483647\)"),
        ({"capacity": 10**30}, "capacity is larger than any tour"),
    ],
)
def test_slot_bad_rows_name_the_column(overrides: dict[str, Any], reason: str) -> None:
    with pytest.raises(BadRow, match=reason):
        rows.slot(slot_row(**overrides), BERLIN)


def test_slot_fingerprint_follows_the_payload() -> None:
    base = rows.slot(slot_row(), BERLIN)
    again = rows.slot(slot_row(product_id="101", availability_id="9001"), BERLIN)
    fewer_seats = rows.slot(slot_row(vacancies=7), BERLIN)

    assert slot_fingerprint(base) == slot_fingerprint(again)
    assert slot_fingerprint(base) != slot_fingerprint(fewer_seats)


def test_raw_key_reports_what_came_back() -> None:
    assert rows.raw_key({"product_id": 1, "option_id": None}, rows.CATALOG_KEY_COLUMNS) == (1, None)
    assert rows.raw_key({"name": "x"}, rows.CATALOG_KEY_COLUMNS) is None


@pytest.mark.parametrize(
    ("got", "missing"),
    [
        (["product_id", "option_id", "availability_id", "local_date_time_start"], []),
        (["PRODUCT_ID", "Option_Id", "availability_id", "local_date_time_start"], []),
        (["product_id", "option_id"], ["availability_id", "local_date_time_start"]),
    ],
)
def test_missing_columns(got: list[str], missing: list[str]) -> None:
    assert rows.missing_columns(got, rows.SLOT_REQUIRED_COLUMNS) == missing
