"""Pure conversions from raw query rows to model values, or a reason to skip the row.

Status derivation, start-time parsing and formatting live here, with no I/O, so that every
rule the README states about a column is one parametrized unit test.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from typing import Any
from zoneinfo import ZoneInfo

from agent.model import STATUSES, CatalogRow, Slot, Status

CATALOG_KEY_COLUMNS = ("product_id", "option_id")
SLOT_KEY_COLUMNS = ("product_id", "option_id", "availability_id")
SLOT_REQUIRED_COLUMNS = (*SLOT_KEY_COLUMNS, "local_date_time_start")
SLOT_OPTIONAL_COLUMNS = ("status", "vacancies", "capacity")


_STATUS_BY_NAME: dict[str, Status] = {s: s for s in STATUSES}


MAX_ID_DIGITS = 100
MAX_ID_BITS = 332
"""An id of more than 100 digits (332 bits) is a data error; Python also refuses to print an
integer of more than 4,300 digits."""

MAX_COUNT = 2**31 - 1
"""Largest vacancies or capacity sent: a 32-bit integer, which every consumer of OCTO
payloads reads exactly; anything above it is a data error, not a tour."""


class BadRow(ValueError):
    """The row cannot be used; `str(error)` says why in words an operator understands."""


class Foreign(Exception):
    """The row belongs to an integration that another agent scans (agents sharing a
    platform, see agent/shards.py): left alone here, neither used nor reported, and its
    stored state kept as it is."""


def _shown(value: Any) -> str:
    """repr() for a message, also for an integer too long to print."""
    try:
        return repr(value)
    except ValueError:
        return f"(a {type(value).__name__} too long to show)"


def missing_columns(got: Sequence[str], required: Sequence[str]) -> list[str]:
    present = {c.lower() for c in got}
    return [c for c in required if c not in present]


def _is_whole(value: Decimal | float) -> bool:
    """False for fractions, NaN and infinities (PostgreSQL numeric has 'Infinity' too)."""
    if isinstance(value, Decimal):
        # Not `value % 1`: 1E+28 % 1 raises InvalidOperation (DivisionImpossible).
        return value.is_finite() and value == value.to_integral_value()
    return math.isfinite(value) and value % 1 == 0


_NUMBERS = (Decimal, float)
_BUFFERS = (bytes, bytearray, memoryview)
_PLAIN = (bool, int, str)
_MOMENTS = (datetime, date, time)
"""isinstance() tuples built once: `A | B` in a call builds a new union on every row."""


def to_id(value: Any, column: str) -> str:
    """Ids may come back as integers or strings; Seyaha always gets strings."""
    kind = type(value)
    if kind is str:
        text: str = value.strip()
        if text:
            return text
        raise BadRow(f"{column} is empty")
    if kind is int and value.bit_length() <= MAX_ID_BITS:
        return str(value)
    if value is None:
        raise BadRow(f"{column} is NULL")
    if isinstance(value, bool):
        raise BadRow(f"{column} is a boolean ({value!r}), not an id")
    if isinstance(value, int):
        if value.bit_length() > MAX_ID_BITS:
            raise BadRow(f"{column} is a number of more than {MAX_ID_DIGITS} digits")
        return str(value)
    if isinstance(value, _NUMBERS):
        if not _is_whole(value):
            raise BadRow(f"{column} is not a whole number ({_shown(value)})")
        if abs(value) >= 10**MAX_ID_DIGITS:
            raise BadRow(f"{column} is a number of more than {MAX_ID_DIGITS} digits")
        return str(int(value))
    if isinstance(value, _BUFFERS):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BadRow(f"{column} is not valid UTF-8 text") from exc
    text = str(value).strip()
    if not text:
        raise BadRow(f"{column} is empty")
    return text


def to_count(value: Any, column: str) -> int | None:
    """vacancies and capacity: a whole number >= 0, or NULL."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise BadRow(f"{column} is a boolean ({value!r}), not a count")
    number: int
    if type(value) is int and 0 <= value <= MAX_COUNT:
        return value  # the usual case
    if isinstance(value, int):
        number = value
    elif isinstance(value, _NUMBERS):
        if not _is_whole(value):
            raise BadRow(f"{column} is not a whole number ({value!r})")
        number = int(value)
    elif isinstance(value, str):
        try:
            number = int(value.strip())
        except ValueError as exc:
            raise BadRow(f"{column} is not a number ({value!r})") from exc
    else:
        raise BadRow(f"{column} has an unexpected type ({type(value).__name__})")
    if 0 <= number <= MAX_COUNT:
        return number
    if number > MAX_COUNT:  # first: the number itself may be too long to print
        raise BadRow(f"{column} is larger than any tour (more than {MAX_COUNT})")
    if number < -MAX_COUNT:
        raise BadRow(f"{column} is negative (less than -{MAX_COUNT})")
    raise BadRow(f"{column} is negative ({number})")


def derive_status(
    status: Any, vacancies: int | None, capacity: int | None
) -> tuple[Status, int | None]:
    """The status to send and the vacancies to send with it.

    An explicit status wins. Otherwise: no capacity means FREESALE (vacancies sent as null);
    no vacancies left means SOLD_OUT; fewer than half the capacity left means LIMITED
    (OCTO's "less than 50% remaining"); anything else is AVAILABLE.
    """
    if status is not None:
        chosen = _STATUS_BY_NAME.get(status.strip().upper()) if isinstance(status, str) else None
        if chosen is None:
            raise BadRow(f"status {_shown(status)} is not one of {', '.join(STATUSES)}")
        if chosen == "FREESALE":
            return chosen, None
        if vacancies is not None and capacity is not None and vacancies > capacity:
            raise _over_capacity(vacancies, capacity)
        return chosen, vacancies
    if capacity is None:
        return "FREESALE", None
    if vacancies is not None and vacancies > capacity:
        raise _over_capacity(vacancies, capacity)
    if vacancies is None:
        raise BadRow(
            f"vacancies is NULL while capacity is {capacity}: the status cannot be derived"
        )
    if vacancies == 0:
        return "SOLD_OUT", 0
    if vacancies * 2 < capacity:
        return "LIMITED", vacancies
    return "AVAILABLE", vacancies


def _over_capacity(vacancies: int, capacity: int) -> BadRow:
    # Skipped, not clamped: a clamped count is a number the supplier never wrote, while a
    # skipped row keeps Seyaha on the last state that made sense and names the row loudly.
    return BadRow(f"vacancies ({vacancies}) exceed capacity ({capacity})")


def localize(naive: datetime, tz: ZoneInfo) -> datetime:
    """Attach `tz` to a wall-clock time, refusing times that a DST change skips.

    Ambiguous times (the repeated hour when clocks go back) take the first occurrence (fold=0).
    """
    aware = naive.replace(tzinfo=tz, fold=0)
    if aware.utcoffset() == naive.replace(tzinfo=tz, fold=1).utcoffset():
        return aware  # the usual case: not near a DST change, one reading only
    # A gap or a repeated hour: only a gap fails the round trip.
    round_trip = aware.astimezone(UTC).astimezone(tz).replace(tzinfo=None)
    if round_trip != naive.replace(fold=0):
        raise BadRow(
            f"local_date_time_start {naive.isoformat()} does not exist in {tz.key} (DST gap)"
        )
    return aware


def parse_start(value: Any, tz: ZoneInfo) -> datetime:
    """local_date_time_start as an aware datetime.

    - an aware datetime from the driver is expressed in `tz` (drivers report the session's
      zone, not the product's);
    - an ISO string with an offset keeps its offset (the query chose it deliberately);
    - naive values, strings or datetimes, are wall-clock time in `tz`;
    - a bare date means midnight local time.
    """
    if value is None:
        raise BadRow("local_date_time_start is NULL")
    if isinstance(value, datetime):
        if value.tzinfo is not None and value.utcoffset() is not None:
            return value.astimezone(tz)
        return localize(value, tz)
    if isinstance(value, date):
        return localize(datetime.combine(value, time()), tz)
    if isinstance(value, _BUFFERS):
        value = bytes(value).decode("utf-8", "replace")
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError as exc:
            raise BadRow(f"local_date_time_start {value!r} is not a valid date and time") from exc
        if parsed.tzinfo is not None:
            return parsed
        return localize(parsed, tz)
    raise BadRow(f"local_date_time_start has an unexpected type ({type(value).__name__})")


def format_local(moment: datetime) -> str:
    """`YYYY-MM-DDTHH:MM:SS±HH:MM`: OCTO's validator requires seconds and an offset."""
    offset = moment.utcoffset()
    if offset is None:
        raise ValueError("format_local needs an aware datetime")
    m = moment
    # Attribute formatting, not strftime: several times faster on a hot path, and the year
    # keeps four digits below 1000.
    return (
        f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
        f"{_offset_text(offset)}"
    )


@functools.lru_cache(maxsize=256)
def _offset_text(offset: timedelta) -> str:
    minutes = round(offset.total_seconds() / 60)
    sign = "+" if minutes >= 0 else "-"
    hours, mins = divmod(abs(minutes), 60)
    return f"{sign}{hours:02d}:{mins:02d}"


def _canonical(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 4096:
        return hex(value)  # json.dumps cannot print an integer of more than 4,300 digits
    if value is None or isinstance(value, _PLAIN):
        return value
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, _MOMENTS):
        return value.isoformat()
    if isinstance(value, _BUFFERS):
        return bytes(value).hex()
    return str(value)


def fingerprint(values: Mapping[str, Any]) -> str:
    """A stable digest of a row's values: equal rows give equal fingerprints across restarts."""
    canonical = json.dumps(
        {k: _canonical(v) for k, v in values.items()}, sort_keys=True, separators=(",", ":")
    )
    return hashlib.blake2b(canonical.encode("utf-8"), digest_size=16).hexdigest()


Route = Callable[[Any], str]
"""A row's integration_id value -> the integration id, or BadRow (agent.integrations.Router)."""


def catalog_row(row: Mapping[str, Any], route: Route | None = None) -> CatalogRow:
    """A catalog query row: keyed by (product_id, option_id); every other column is metadata
    (the integration_id of a routed row among them: a product that moves is a change)."""
    product_id = to_id(row.get("product_id"), "product_id")
    option_id = to_id(row.get("option_id"), "option_id")
    integration = "" if route is None else route(row.get("integration_id"))
    metadata = {k: v for k, v in row.items() if k not in CATALOG_KEY_COLUMNS}
    return CatalogRow(product_id, option_id, fingerprint(metadata), integration)


START_CACHE = 65_536
"""Distinct start values whose conversion is remembered: an inventory has far fewer distinct
start times than slots (every option of a venue shares its 15-minute grid)."""


def _convert_start(value: Any, tz: ZoneInfo, _fold: int = 0) -> tuple[str, datetime]:
    """local_date_time_start as sent (see format_local) and as a UTC instant: the instant of
    the sent text, so that a sub-minute offset or a fraction of a second dropped from the text
    is dropped from the instant too (`_fold` keeps the two readings of a repeated hour apart in
    the cache: datetimes equal as values may be different instants)."""
    try:
        text = format_local(parse_start(value, tz))
        return text, datetime.fromisoformat(text).astimezone(UTC)
    except OverflowError:
        # Python's datetimes span years 1 to 9999: 0001-01-01 00:30 east of UTC, or
        # 9999-12-31 23:30 west of it, has no UTC instant.
        raise BadRow(
            f"local_date_time_start {value!r} is out of range: in UTC it falls before year 1 "
            "or after year 9999"
        ) from None


_cached_start = functools.lru_cache(maxsize=START_CACHE)(_convert_start)


def _start(value: Any, tz: ZoneInfo) -> tuple[str, datetime]:
    try:
        hash(value)
    except (TypeError, ValueError):  # ValueError: "cannot hash writable memoryview"
        # Not a cache key: a buffer is cached by its bytes, anything else converted each time.
        if isinstance(value, (bytearray, memoryview)):
            value = bytes(value)
        else:
            return _convert_start(value, tz)
    return _cached_start(value, tz, value.fold if type(value) is datetime else 0)


def slot(
    row: Mapping[str, Any],
    tz: ZoneInfo,
    route: Route | None = None,
    source_hash: int | None = None,
) -> Slot:
    """A slots query row as the notify Seyaha should receive (with `route`, to the
    integration its integration_id column names); `source_hash`: the row's hash, kept with
    the slot (Slot.source_hash)."""
    product_id = to_id(row.get("product_id"), "product_id")
    option_id = to_id(row.get("option_id"), "option_id")
    availability_id = to_id(row.get("availability_id"), "availability_id")
    integration = "" if route is None else route(row.get("integration_id"))
    local_start, start_utc = _start(row.get("local_date_time_start"), tz)
    vacancies = to_count(row.get("vacancies"), "vacancies")
    capacity = to_count(row.get("capacity"), "capacity")
    status, sent_vacancies = derive_status(row.get("status"), vacancies, capacity)
    return Slot(
        product_id=product_id,
        option_id=option_id,
        availability_id=availability_id,
        local_date_time_start=local_start,
        start_utc=start_utc,
        status=status,
        vacancies=sent_vacancies,
        capacity=capacity,
        integration_id=integration,
        source_hash=source_hash,
    )


def raw_key(row: Mapping[str, Any], columns: Sequence[str]) -> tuple[Any, ...] | None:
    """The row's key as it came back, for reporting a skipped row; None if no part is known."""
    key = tuple(row.get(c) for c in columns)
    return None if all(v is None for v in key) else key
