"""When an idle delivery worker looks at the queue again: never a whole idle wait past a retry
that no look has yet looked for, and never in a loop that spins."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.delivery.worker import IDLE_WAIT_S, idle_wait_s

moments = st.floats(min_value=0.0, max_value=1e6, allow_nan=False)


def test_no_retry_ahead_waits_the_idle_wait() -> None:
    assert idle_wait_s(0.0, looked_at=50.0, now=50.2) == IDLE_WAIT_S


def test_a_retry_ahead_is_waited_for_and_no_longer() -> None:
    assert idle_wait_s(50.3, looked_at=50.0, now=50.2) == pytest.approx(0.1)


def test_a_retry_that_fell_due_during_the_look_is_looked_for_at_once() -> None:
    """The look began at 50.0 and took 0.3 s; the retry fell due at 50.1, unseen by it."""
    assert idle_wait_s(50.1, looked_at=50.0, now=50.3) == 0.0


def test_a_retry_the_last_look_began_after_is_not_looked_for_again() -> None:
    assert idle_wait_s(50.1, looked_at=50.2, now=50.4) == IDLE_WAIT_S


@given(retry_at=moments, looked_at=moments, step_s=st.floats(min_value=0.0, max_value=100.0))
def test_the_wait_is_bounded_and_never_sleeps_past_an_unseen_retry(
    retry_at: float, looked_at: float, step_s: float
) -> None:
    now = looked_at + step_s
    wait = idle_wait_s(retry_at, looked_at, now)
    assert 0.0 <= wait <= IDLE_WAIT_S
    if retry_at > looked_at:
        assert now + wait <= max(retry_at, now) + 1e-9  # awake by the retry, or at once
    else:
        assert wait == IDLE_WAIT_S


@given(retry_at=moments, looked_at=moments, step_s=st.floats(min_value=0.0, max_value=100.0))
def test_a_worker_that_looked_after_the_retry_sleeps_before_looking_again(
    retry_at: float, looked_at: float, step_s: float
) -> None:
    """No spin: a zero wait is followed by a look that begins after the retry, and that one's
    wait is a real one."""
    now = looked_at + step_s
    if idle_wait_s(retry_at, looked_at, now) == 0.0:
        assert idle_wait_s(retry_at, looked_at=now, now=now) == IDLE_WAIT_S
