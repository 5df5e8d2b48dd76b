"""rest_after: polls start every poll_interval, and a long pass leaves the database a rest."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.app import rest_after

intervals = st.floats(min_value=0.01, max_value=3600.0)
durations = st.floats(min_value=0.0, max_value=10_000.0)


@given(intervals, durations)
def test_the_rest_is_never_longer_than_the_interval_nor_shorter_than_needed(
    interval: float, took: float
) -> None:
    rest = rest_after(interval, took)
    assert 0 < rest <= interval
    # Never sooner than one interval after the last poll's start (to float rounding)...
    assert took + rest >= interval or took + rest == pytest.approx(interval)
    # ...and the database rests at least as long as the pass, up to the interval.
    assert rest >= min(took, interval)


@given(intervals, st.floats(min_value=0.0, max_value=0.5))
def test_a_pass_of_at_most_half_the_interval_keeps_polls_one_interval_apart(
    interval: float, share: float
) -> None:
    took = interval * share
    assert took + rest_after(interval, took) == pytest.approx(interval)


@pytest.mark.parametrize(
    ("took", "rest"),
    [(0.0, 5.0), (1.5, 3.5), (2.5, 2.5), (4.0, 4.0), (5.0, 5.0), (13.0, 5.0)],
)
def test_examples_with_the_default_interval(took: float, rest: float) -> None:
    assert rest_after(5.0, took) == pytest.approx(rest)
