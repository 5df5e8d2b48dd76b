"""Hypothesis strategies shared by the property tests of source rows: what a database driver
can hand back for a column, and time zones.

One place for them, so that every property about source rows draws from the same idea of
"any value a driver can return".
"""

from __future__ import annotations

import zoneinfo
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

from hypothesis import strategies as st

from agent.model import STATUSES

ZONE_NAMES = sorted(zoneinfo.available_timezones())

zones = st.sampled_from(ZONE_NAMES).map(zoneinfo.ZoneInfo)
"""Any IANA zone this machine knows (Hypothesis samples from all of them)."""

_LARGEST_OFFSET_S = 24 * 3600 - 1

fixed_offsets = st.one_of(
    st.just(UTC),
    st.integers(-(24 * 60 - 1), 24 * 60 - 1).map(lambda m: timezone(timedelta(minutes=m))),
    # Sub-minute offsets: what PostgreSQL prints for a local mean time before 1900 or so.
    st.integers(-_LARGEST_OFFSET_S, _LARGEST_OFFSET_S).map(
        lambda s: timezone(timedelta(seconds=s))
    ),
)
"""A fixed offset anywhere within ±23:59:59, as drivers attach to timestamptz values."""

datetimes = st.datetimes(
    min_value=datetime.min,
    max_value=datetime.max,
    timezones=st.one_of(st.none(), fixed_offsets, zones),
)
"""Naive or aware, from year 1 to 9999, in a fixed offset or an IANA zone (folds included)."""

_EDGE_MOMENTS = (
    datetime.min,
    datetime.max,
    datetime(1, 1, 1, 0, 30),
    datetime(9999, 12, 31, 23, 30),
)


@st.composite
def offset_texts(draw: st.DrawFn) -> str:
    """An ISO offset suffix, including odd ones: Z, +14:00, -23:59, +05:30:15, +0530."""
    sign = draw(st.sampled_from("+-"))
    hours = draw(st.integers(0, 23))
    minutes = draw(st.integers(0, 59))
    shape = draw(st.sampled_from(["hh:mm", "hhmm", "hh", "hh:mm:ss"]))
    if shape == "hh:mm":
        return f"{sign}{hours:02d}:{minutes:02d}"
    if shape == "hhmm":
        return f"{sign}{hours:02d}{minutes:02d}"
    if shape == "hh":
        return f"{sign}{hours:02d}"
    return f"{sign}{hours:02d}:{minutes:02d}:{draw(st.integers(0, 59)):02d}"


@st.composite
def iso_texts(draw: st.DrawFn) -> str:
    """A date, or a date and time, written the ways a query may CAST it to text."""
    moment = draw(st.one_of(st.datetimes(), st.sampled_from(_EDGE_MOMENTS)))
    if draw(st.booleans()):
        text = moment.date().isoformat()
    else:
        spec = draw(
            st.sampled_from(["auto", "hours", "minutes", "seconds", "milliseconds", "microseconds"])
        )
        text = moment.isoformat(sep=draw(st.sampled_from("T ")), timespec=spec)
    suffix = draw(st.one_of(st.just(""), st.just("Z"), offset_texts()))
    padding = draw(st.sampled_from(["", " ", "\t", "\n"]))
    return f"{padding}{text}{suffix}{padding}"


def _status_texts() -> st.SearchStrategy[str]:
    return st.tuples(
        st.sampled_from(STATUSES), st.sampled_from([str.lower, str.upper, str.title])
    ).map(lambda pair: f" {pair[1](pair[0])} ")


texts = st.one_of(
    st.text(),
    st.text(st.characters(categories=["Nd"]), min_size=1),  # digits of any script: ٣, ३, ๓
    st.text(st.characters(categories=["Zs", "Cc"]), max_size=4),  # blanks only
    st.integers(4000, 6000).map(lambda n: "9" * n),  # longer than int() accepts
    st.integers().map(str),
    iso_texts(),
    _status_texts(),
)


def _special_decimals() -> st.SearchStrategy[Decimal]:
    return st.sampled_from(
        [
            Decimal("NaN"),
            Decimal("-NaN"),
            Decimal("sNaN"),
            Decimal("Infinity"),
            Decimal("-Infinity"),
            Decimal("-0"),
            Decimal("1E+999999"),
            Decimal("-1E+999999"),
            Decimal("1E-999999"),
            Decimal("12.000"),
        ]
    )


decimals = st.one_of(
    st.decimals(),
    _special_decimals(),
    # Whole numbers written with any exponent: 7E+3, 120E-1, 1E+40 ...
    st.builds(
        lambda digits, exponent: Decimal(f"{digits}E{exponent}"),
        st.integers(-(10**40), 10**40),
        st.integers(-60, 60),
    ),
)

integers = st.one_of(
    st.integers(),
    st.integers(0, 6000).map(lambda n: 10**n),  # up to numeric's 131072 digits, near enough
    st.integers(0, 6000).map(lambda n: -(10**n)),
)

binaries = st.one_of(
    st.binary(),  # often not UTF-8
    texts.map(lambda s: s.encode("utf-8", "surrogatepass")),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=3), inner),
    max_leaves=6,
)
"""What a JSON or array column comes back as."""

driver_values: st.SearchStrategy[Any] = st.one_of(
    st.none(),
    st.booleans(),
    integers,
    st.floats(),  # nan, inf and -0.0 included
    decimals,
    texts,
    binaries,
    binaries.map(bytearray),
    binaries.map(lambda b: memoryview(b)),  # read-only
    binaries.map(lambda b: memoryview(bytearray(b))),  # writable, so not hashable
    st.dates(),
    datetimes,
    st.sampled_from(_EDGE_MOMENTS),
    st.times(timezones=st.one_of(st.none(), fixed_offsets)),
    st.timedeltas(),
    st.uuids(),
    json_values,
)
"""Any value a database driver can return for a column."""
