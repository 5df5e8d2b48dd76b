"""Each network operation of a call gets at most what is left of the call's deadline."""

from __future__ import annotations

import threading
import time

import httpcore
import pytest

from agent.delivery.deadline import Deadlines

FAR_S = 1000.0
"""A deadline this far ahead is never reached during a test (seconds)."""


@pytest.mark.parametrize("timeout", [None, 5.0])
def test_outside_a_call_an_operation_keeps_its_own_timeout(timeout: float | None) -> None:
    assert Deadlines().bounded(timeout, httpcore.ReadTimeout) == timeout


@pytest.mark.parametrize(
    ("timeout", "expected"),
    [
        (5.0, 5.0),  # the operation's own timeout is the shorter
        (None, FAR_S),  # no timeout of its own: what is left of the call
        (2 * FAR_S, FAR_S),  # longer than what is left: cut to it
    ],
)
def test_in_a_call_an_operation_gets_at_most_what_is_left(
    timeout: float | None, expected: float
) -> None:
    deadlines = Deadlines()
    with deadlines.call(time.monotonic() + FAR_S):
        bounded = deadlines.bounded(timeout, httpcore.ReadTimeout)
    assert bounded == pytest.approx(expected, abs=1.0)
    assert deadlines.bounded(timeout, httpcore.ReadTimeout) == timeout  # the call is over


@pytest.mark.parametrize("late", [httpcore.ReadTimeout, httpcore.ConnectTimeout])
def test_past_the_deadline_an_operation_fails_as_a_timeout_at_once(
    late: type[httpcore.TimeoutException],
) -> None:
    deadlines = Deadlines()
    with deadlines.call(time.monotonic() - 0.001), pytest.raises(late):
        deadlines.bounded(5.0, late)


def test_a_deadline_belongs_to_the_thread_making_the_call() -> None:
    deadlines = Deadlines()
    seen: list[float | None] = []
    with deadlines.call(time.monotonic() - 0.001):
        other = threading.Thread(
            target=lambda: seen.append(deadlines.bounded(5.0, httpcore.ReadTimeout))
        )
        other.start()
        other.join()
    assert seen == [5.0]


def test_once_interrupted_every_call_fails_at_its_next_operation() -> None:
    deadlines = Deadlines()
    deadlines.interrupt()
    assert deadlines.interrupted
    with deadlines.call(time.monotonic() + FAR_S), pytest.raises(httpcore.WriteTimeout):
        deadlines.bounded(5.0, httpcore.WriteTimeout)
