"""SeenRows, the late-row sweep's memory: a row is known only as the last state recorded for
its key, whatever came before, for any mix of the values drivers return."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from agent.source.seen import SeenRows

values = st.one_of(
    st.none(),
    st.integers(-3, 3),  # CPython hashes -1 and -2 alike: the digests must not
    st.integers(),
    st.text(max_size=5),
    st.decimals(allow_nan=False, allow_infinity=False, places=2),
    st.datetimes(timezones=st.just(UTC)),
    st.floats(allow_nan=False),
)
rows = st.tuples(st.tuples(st.integers(0, 3)), st.tuples(values, values))


@given(st.lists(rows, max_size=30), rows)
def test_a_row_is_known_only_as_the_last_state_remembered_for_its_key(
    remembered: list[tuple[tuple[object, ...], tuple[object, ...]]],
    probe: tuple[tuple[object, ...], tuple[object, ...]],
) -> None:
    seen = SeenRows()
    last: dict[tuple[object, ...], tuple[object, ...]] = {}
    for raw_key, row in remembered:
        seen.remember([(raw_key, row)])
        last[raw_key] = row
    raw_key, row = probe
    expected = raw_key in last and repr(last[raw_key]) == repr(row)
    assert seen.known(raw_key, row) == expected


def test_values_that_compare_or_hash_alike_are_still_told_apart() -> None:
    seen = SeenRows()
    seen.remember([((1,), (-1, Decimal("1.0"), datetime(2026, 1, 1, tzinfo=UTC)))])
    assert seen.known((1,), (-1, Decimal("1.0"), datetime(2026, 1, 1, tzinfo=UTC)))
    assert not seen.known((1,), (-2, Decimal("1.0"), datetime(2026, 1, 1, tzinfo=UTC)))
    assert not seen.known((1,), (-1, Decimal("1.00"), datetime(2026, 1, 1, tzinfo=UTC)))
    assert not seen.known((2,), (-1, Decimal("1.0"), datetime(2026, 1, 1, tzinfo=UTC)))


def test_past_its_limit_the_memory_starts_again_empty() -> None:
    seen = SeenRows(limit=3)
    seen.remember(((i,), ("x",)) for i in range(3))
    assert len(seen) == 3
    assert seen.known((0,), ("x",))
    seen.remember([((3,), ("x",))])
    assert len(seen) == 0
    assert not seen.known((0,), ("x",))
