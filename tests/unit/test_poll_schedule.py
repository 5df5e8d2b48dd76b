"""rest_after: polls start every poll_interval, and a long pass leaves the database a rest.
next_reconciliation_at: reconciliations take at most reconcile_share of the time."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.app import next_reconciliation_at, rest_after

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


shares = st.floats(min_value=0.001, max_value=1.0)
instants = st.floats(min_value=-1e6, max_value=1e6)


@given(instants, durations, shares)
def test_reconciliations_take_at_most_their_share_of_the_time(
    started: float, took: float, share: float
) -> None:
    """From one reconciliation's start to the next's, it ran at most `share` of the time."""
    at = next_reconciliation_at(started, took, share)
    rounding = 4 * math.ulp(max(abs(started), abs(at)))
    # The time from its start to the next start, times the share, covers its length.
    assert (at - started) * share >= took - rounding
    assert at >= started + took - rounding


@given(instants, durations, durations, shares)
def test_a_longer_reconciliation_waits_longer(
    started: float, took: float, longer: float, share: float
) -> None:
    if longer >= took:
        assert next_reconciliation_at(started, longer, share) >= next_reconciliation_at(
            started, took, share
        )


@pytest.mark.parametrize(
    ("took", "share", "at"),
    [(2.0, 0.1, 20.0), (20.0, 0.1, 200.0), (20.0, 1.0, 20.0), (0.0, 0.1, 0.0)],
)
def test_examples(took: float, share: float, at: float) -> None:
    assert next_reconciliation_at(0.0, took, share) == pytest.approx(at)
