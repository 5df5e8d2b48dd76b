"""The circuit breaker and the rate limit: state machines over an injected monotonic time."""

from __future__ import annotations

import pytest

from agent.delivery.flow import BreakerState, CircuitBreaker, RateLimit


def test_breaker_opens_after_the_threshold_of_failures_in_a_row() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown_s=10)
    assert [breaker.failure(now=t) for t in (0, 1, 2)] == [False, False, True]
    assert breaker.state is BreakerState.OPEN
    assert not breaker.allow(5)
    assert breaker.wait_s(5) == pytest.approx(7)  # opened at 2, for 10 s


def test_a_success_resets_the_count_of_failures() -> None:
    breaker = CircuitBreaker(threshold=3, cooldown_s=10)
    breaker.failure(0)
    breaker.failure(1)
    breaker.success()
    assert not breaker.failure(2)
    assert breaker.state is BreakerState.CLOSED


def test_after_the_cooldown_exactly_one_probe_goes_out() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown_s=10)
    breaker.failure(0)
    assert not breaker.allow(9.9)
    assert breaker.allow(10)
    assert breaker.state is BreakerState.HALF_OPEN
    assert not breaker.allow(10.1)  # a second worker waits for the probe's answer


def test_a_successful_probe_closes_the_breaker() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown_s=10)
    breaker.failure(0)
    assert breaker.allow(10)
    assert breaker.success() is True
    assert breaker.state is BreakerState.CLOSED
    assert breaker.allow(10.1)


def test_a_failed_probe_reopens_with_a_doubled_cooldown_up_to_the_cap() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown_s=10, max_cooldown_s=25)
    breaker.failure(0)
    assert breaker.allow(10)
    assert breaker.failure(10) is True
    assert breaker.current_cooldown_s == 20
    assert not breaker.allow(29)
    assert breaker.allow(30)
    breaker.failure(30)
    assert breaker.current_cooldown_s == 25


def test_a_neutral_answer_to_a_probe_closes_the_breaker() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown_s=10)
    breaker.failure(0)
    assert breaker.allow(10)
    breaker.neutral()
    assert breaker.state is BreakerState.CLOSED


def test_no_rate_limit_never_waits() -> None:
    limit = RateLimit(0)
    assert [limit.reserve(0.0) for _ in range(100)] == [0.0] * 100


def test_rate_limit_spaces_calls_after_the_burst() -> None:
    limit = RateLimit(10, burst=2)
    waits = [limit.reserve(0.0) for _ in range(4)]
    assert waits == pytest.approx([0.0, 0.0, 0.1, 0.2])


def test_rate_limit_refills_with_time_but_not_beyond_the_burst() -> None:
    limit = RateLimit(10, burst=2)
    limit.reserve(0.0)
    limit.reserve(0.0)
    assert limit.reserve(100.0) == 0.0
    assert limit.reserve(100.0) == 0.0
    assert limit.reserve(100.0) == pytest.approx(0.1)


@pytest.mark.parametrize("calls", [50, 500])
def test_a_backlog_drains_at_the_rate(calls: int) -> None:
    limit = RateLimit(25, burst=1)
    now = 0.0
    for _ in range(calls):
        now += limit.reserve(now)
    assert now == pytest.approx((calls - 1) / 25)
