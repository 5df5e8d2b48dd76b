from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from agent.source import cursor


@pytest.mark.parametrize(
    "value",
    [
        datetime(2026, 7, 1, 9, 30, 15, 123456, tzinfo=UTC),
        datetime(2026, 7, 1, 12, 30, tzinfo=timezone(timedelta(hours=3))),
        datetime(2026, 7, 1, 9, 30, 15, 500000),
        "2026-07-01 09:30:15.250",
    ],
)
def test_cursor_round_trips_through_text(value: object) -> None:
    assert cursor.decode(cursor.encode(value)) == value


@pytest.mark.parametrize(
    ("value", "overlap", "expected"),
    [
        (
            datetime(2026, 7, 1, 9, 30, tzinfo=UTC),
            60,
            datetime(2026, 7, 1, 9, 29, tzinfo=UTC),
        ),
        (datetime(2026, 7, 1, 0, 0, 30), 45, datetime(2026, 6, 30, 23, 59, 45)),
        ("2026-07-01 00:00:10.900", 30, "2026-06-30 23:59:40"),
        ("2026-07-01 09:30:15", 0, "2026-07-01 09:30:15"),
    ],
)
def test_since_moves_the_cursor_back_by_the_overlap(
    value: object, overlap: float, expected: object
) -> None:
    assert cursor.since(value, overlap) == expected


def test_a_clock_of_another_type_is_refused_with_its_type() -> None:
    with pytest.raises(TypeError, match="int"):
        cursor.encode(12)
    with pytest.raises(ValueError, match="unknown cursor"):
        cursor.decode("epoch:12")
