"""Properties of row conversion: whatever a driver returns, in whatever column and zone, a row
either converts or is a BadRow that names the column at fault; it never crashes the scan."""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from typing import Any, TypeVar
from zoneinfo import ZoneInfo

from hypothesis import example, given
from hypothesis import strategies as st

from agent.source import rows
from agent.source.rows import BadRow
from tests.unit.strategies import datetimes, iso_texts, texts, zones

SOUND_SLOT_ROW: dict[str, Any] = {
    "product_id": 101,
    "option_id": "standard",
    "availability_id": 9001,
    "local_date_time_start": datetime(2026, 7, 1, 10, 0),
    "status": None,
    "vacancies": 8,
    "capacity": 10,
}
"""A row that converts; properties replace some of its columns."""

T = TypeVar("T")

ABSENT = object()
"""A replacement that leaves the column out of the row."""


def with_overrides(row: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    changed = {**row, **overrides}
    return {column: value for column, value in changed.items() if value is not ABSENT}


def attempt(convert: Callable[[], T]) -> T | BadRow:
    """What a conversion returns, or the BadRow it raises (any other exception propagates)."""
    try:
        return convert()
    except BadRow as exc:
        return exc


def names_one_of(message: str, columns: set[str]) -> bool:
    return any(re.search(rf"\b{re.escape(column)}\b", message) for column in columns)


start_texts_and_moments = st.one_of(
    datetimes, st.dates(), iso_texts(), iso_texts().map(str.encode), texts
)
"""local_date_time_start as a driver returns it: a datetime (naive, fixed offset or zone, years
1 to 9999), a date, text (ISO or not), or the bytes of ISO text."""


@given(start=start_texts_and_moments, zone=zones)
@example(start="0001-01-01 00:30", zone=ZoneInfo("Asia/Tokyo"))
@example(start="9999-12-31 23:30", zone=ZoneInfo("America/New_York"))
@example(start="9999-12-31T23:59:59-05:00", zone=ZoneInfo("UTC"))
def test_any_start_in_any_zone_converts_or_is_a_bad_row_naming_local_date_time_start(
    start: Any, zone: ZoneInfo
) -> None:
    row = {**SOUND_SLOT_ROW, "local_date_time_start": start}
    for _ in range(2):  # the second time through the conversion cache
        converted = attempt(lambda: rows.slot(row, zone))
        if isinstance(converted, BadRow):
            assert str(converted).startswith("local_date_time_start "), str(converted)
        else:
            assert converted.start_utc.utcoffset() is not None
