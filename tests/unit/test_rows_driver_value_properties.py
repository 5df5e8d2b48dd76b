"""Properties of row conversion that the current code breaks; each counterexample Hypothesis
found is pinned with @example. (Not committed: they fail until agent/source/rows.py and
agent/model.py are fixed.)"""

from __future__ import annotations

import json
import re
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from hypothesis import example, given
from hypothesis import strategies as st

from agent.source import rows
from agent.source.rows import BadRow
from tests.unit.strategies import driver_values, fixed_offsets, iso_texts, zones
from tests.unit.test_rows_properties import (
    ABSENT,
    SOUND_SLOT_ROW,
    attempt,
    names_one_of,
    with_overrides,
)

SLOT_COLUMNS = (*rows.SLOT_REQUIRED_COLUMNS, *rows.SLOT_OPTIONAL_COLUMNS)
SOUND_CATALOG_ROW: dict[str, Any] = {"product_id": 101, "option_id": "standard"}
LOCAL_START = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d$")

HUGE = 10**4300
"""An integer with more digits than str() converts (sys.get_int_max_str_digits(): 4300); a
PostgreSQL numeric holds up to 131072 digits before the point."""

TOKYO = ZoneInfo("Asia/Tokyo")

slot_overrides = st.dictionaries(
    st.sampled_from(SLOT_COLUMNS), st.one_of(driver_values, st.just(ABSENT)), max_size=4
)
"""Some columns of a sound slot row replaced by any driver value, or left out."""


@given(overrides=slot_overrides, zone=zones)
@example(overrides={"local_date_time_start": "0001-01-01 00:30"}, zone=TOKYO)
@example(overrides={"local_date_time_start": "9999-12-31 23:30"}, zone=ZoneInfo("America/New_York"))
@example(overrides={"local_date_time_start": "9999-12-31T23:59:59-05:00"}, zone=ZoneInfo("UTC"))
# decimal.InvalidOperation from _is_whole: Decimal % 1 needs more than 28 digits of precision
@example(overrides={"product_id": Decimal("1E+28")}, zone=TOKYO)
@example(overrides={"vacancies": Decimal("1E+28")}, zone=TOKYO)
# ValueError "Exceeds the limit (4300 digits) for integer string conversion"
@example(overrides={"product_id": HUGE}, zone=TOKYO)  # to_id: str(value)
@example(overrides={"vacancies": -HUGE}, zone=TOKYO)  # to_count: the "is negative" message
@example(overrides={"status": HUGE}, zone=TOKYO)  # derive_status: str(status)
@example(overrides={"vacancies": HUGE}, zone=TOKYO)  # model.slot_fingerprint: repr()
# ValueError "cannot hash writable memoryview object" from the start cache (_start catches
# only TypeError)
@example(overrides={"local_date_time_start": memoryview(bytearray(b""))}, zone=TOKYO)
def test_any_value_in_any_slot_column_converts_or_is_a_bad_row_naming_that_column(
    overrides: dict[str, Any], zone: ZoneInfo
) -> None:
    row = with_overrides(SOUND_SLOT_ROW, overrides)
    converted = attempt(lambda: rows.slot(row, zone))
    if isinstance(converted, BadRow):
        assert names_one_of(str(converted), set(overrides)), (str(converted), overrides)
    else:
        assert json.loads(json.dumps(converted.payload(), allow_nan=False))


@given(
    keys=st.dictionaries(
        st.sampled_from(rows.CATALOG_KEY_COLUMNS),
        st.one_of(driver_values, st.just(ABSENT)),
        max_size=2,
    ),
    metadata=st.dictionaries(st.sampled_from(["name", "price", "tags", "at"]), driver_values),
)
@example(keys={"product_id": Decimal("1E+28")}, metadata={})  # InvalidOperation
@example(keys={"product_id": HUGE}, metadata={})  # ValueError in to_id
@example(keys={}, metadata={"name": HUGE})  # ValueError in fingerprint's json.dumps
def test_any_value_in_any_catalog_column_converts_or_is_a_bad_row_naming_that_column(
    keys: dict[str, Any], metadata: dict[str, Any]
) -> None:
    row = with_overrides({**SOUND_CATALOG_ROW, **metadata}, keys)
    converted = attempt(lambda: rows.catalog_row(row))
    if isinstance(converted, BadRow):
        assert names_one_of(str(converted), set(keys)), (str(converted), keys)
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", converted.fingerprint)


@given(value=driver_values)
@example(value=Decimal("1E+28"))
@example(value=HUGE)
def test_an_id_of_any_value_is_stripped_text_or_a_bad_row_naming_the_column(value: Any) -> None:
    """to_id alone: the reader calls it to key an unreadable row (a protected key)."""
    text = attempt(lambda: rows.to_id(value, "availability_id"))
    if isinstance(text, BadRow):
        assert str(text).startswith("availability_id "), str(text)
    else:
        assert text
        assert text == text.strip()


start_values = st.one_of(
    st.datetimes(
        min_value=datetime(2, 1, 1),
        max_value=datetime(9998, 12, 31),
        timezones=st.one_of(st.none(), fixed_offsets, zones),
    ),
    st.dates(),
    iso_texts(),
    iso_texts().map(str.encode),
)
"""Start values that name a moment (years 1 and 9999 left out: they may have no UTC instant)."""


@given(start=start_values, zone=zones)
# A zone's local mean time has a sub-minute offset (-00:16:08); format_local rounds it away.
@example(start=date(1911, 1, 1), zone=ZoneInfo("Africa/Abidjan"))
# An offset with seconds in the text: sent as +05:30, the instant moves 15 s.
@example(start="2026-07-01T10:00:00+05:30:15", zone=TOKYO)
# Fractions of a second: sent without them, start_utc keeps them.
@example(start=datetime(2026, 7, 1, 10, 0, 0, 500_000), zone=TOKYO)
def test_a_converted_slot_is_json_and_its_local_start_is_the_instant_of_start_utc(
    start: Any, zone: ZoneInfo
) -> None:
    converted = attempt(lambda: rows.slot({**SOUND_SLOT_ROW, "local_date_time_start": start}, zone))
    if isinstance(converted, BadRow):
        return
    payload = converted.payload()
    assert json.loads(json.dumps(payload, allow_nan=False)) == payload
    local = payload["localDateTimeStart"]
    assert LOCAL_START.match(local), local
    assert datetime.fromisoformat(local) == converted.start_utc


@st.composite
def aware_starts_with_their_fold_twins(draw: st.DrawFn) -> list[datetime]:
    """Aware datetimes in IANA zones, each followed by itself with the other fold: during the
    hour repeated when clocks go back, the two are different instants."""
    moments = draw(
        st.lists(
            st.datetimes(
                min_value=datetime(1900, 1, 1), max_value=datetime(2100, 1, 1), timezones=zones
            ),
            min_size=1,
            max_size=4,
        )
    )
    return [m for moment in moments for m in (moment, moment.replace(fold=1 - moment.fold))]


@given(starts=aware_starts_with_their_fold_twins(), zone=zones)
# The two 01:30 of the night New York leaves daylight time (05:30Z and 06:30Z) are equal and
# hash alike as datetimes, so the start cache hands the second the first one's instant.
@example(
    starts=[
        datetime(2026, 11, 1, 1, 30, tzinfo=ZoneInfo("America/New_York")),
        datetime(2026, 11, 1, 1, 30, fold=1, tzinfo=ZoneInfo("America/New_York")),
    ],
    zone=ZoneInfo("UTC"),
)
def test_an_aware_start_is_the_instant_the_driver_gave_whatever_was_converted_before(
    starts: list[datetime], zone: ZoneInfo
) -> None:
    for start in starts:
        converted = rows.slot({**SOUND_SLOT_ROW, "local_date_time_start": start}, zone)
        # The instant sent: the text carries whole seconds and a whole-minute offset, so the
        # driver's instant is met within a minute (the cache's mistake was an hour).
        sent = datetime.fromisoformat(converted.local_date_time_start)
        assert converted.start_utc == sent.astimezone(UTC)
        assert abs(converted.start_utc - start.astimezone(UTC)) < timedelta(minutes=1), (
            start,
            converted.start_utc,
        )
