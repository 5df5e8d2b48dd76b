"""What `check` says about a configuration whose every poll is a full read (no change query)."""

from __future__ import annotations

import pytest

from agent.commands import LARGE_READ_ROWS, DigestTimes, full_read_advice
from agent.ranges import OPTIONS_MIN


@pytest.mark.parametrize(
    ("rows", "seconds", "poll_interval_s"),
    [
        (0, 0.0, 5.0),
        (1_000, 0.05, 5.0),
        (LARGE_READ_ROWS, 0.5, 5.0),  # at both limits: still quiet
    ],
)
def test_a_small_quick_read_needs_no_change_query(
    rows: int, seconds: float, poll_interval_s: float
) -> None:
    assert full_read_advice(rows, seconds, poll_interval_s) == []


@pytest.mark.parametrize(
    ("rows", "seconds", "poll_interval_s", "share"),
    [
        (LARGE_READ_ROWS + 1, 0.2, 5.0, "4%"),  # many rows, even if read fast
        (2_000, 1.0, 5.0, "20%"),  # few rows, but a slow read for the interval
        (1_000_000, 13.0, 5.0, "100%"),  # a read longer than the interval: polls back to back
    ],
)
def test_a_large_or_slow_read_names_the_key_its_cost_and_the_query_to_add(
    rows: int, seconds: float, poll_interval_s: float, share: str
) -> None:
    advice = full_read_advice(rows, seconds, poll_interval_s)
    assert advice[0].startswith("[source] slots_changed_query is not set")
    assert f"full read of {rows:,} rows ({seconds:.1f} s, about {share} of every" in advice[0]
    assert any(":since" in line and "slots_changed_query = " in line for line in advice)
    assert all("\n" not in line for line in advice)


@pytest.mark.parametrize(
    ("rows", "digest_s", "advised", "share"),
    [
        (1_000_000, 0.4, False, ""),  # digests cheap for the interval: nothing to say
        (1_000_000, 1.1, True, "22%"),  # the database digests every row on every poll
        (20_000, 6.0, True, "100%"),  # a slow query, whatever its size
    ],
)
def test_with_range_digests_the_advice_follows_the_databases_time_to_digest(
    rows: int, digest_s: float, advised: bool, share: str
) -> None:
    # the full read itself (13 s) no longer decides: polls read only the ranges that changed
    advice = full_read_advice(rows, 13.0, 5.0, digest_s)
    assert bool(advice) == advised
    if advised:
        assert advice[0].startswith("[source] slots_changed_query is not set")
        assert (
            f"digest all {rows:,} rows of slots_query ({digest_s:.1f} s, about {share}"
            in (advice[0])
        )


@pytest.mark.parametrize(
    ("options", "ranges", "expected"),
    [
        (OPTIONS_MIN, 10 * OPTIONS_MIN, 0.4),  # option digests first: they are the cost
        (OPTIONS_MIN - 1, 10 * OPTIONS_MIN, 0.9),  # too few options to narrow anything
        (OPTIONS_MIN, OPTIONS_MIN, 0.9),  # about one range an option
    ],
)
def test_check_counts_the_digests_a_pass_after_changes_asks_for(
    options: int, ranges: int, expected: float
) -> None:
    times = DigestTimes(ranges=ranges, ranges_s=0.9, options=options, options_s=0.4, whole_s=0.3)
    assert times.changed_s == expected


def test_when_passes_follow_commits_the_advice_counts_a_pass_per_change() -> None:
    advice = full_read_advice(1_000_000, 13.0, 5.0, 2.2, sensed=True)
    assert advice[0].startswith("[source] slots_changed_query is not set")
    assert "passes only when something committed" in advice[0]
    assert "(2.2 s: a booking waits for it" in advice[0]
    assert "every poll" not in advice[0]
    assert full_read_advice(1_000_000, 13.0, 5.0, 0.4, sensed=True) == []
