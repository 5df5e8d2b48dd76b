"""The daemon's schedule: the next poll starts poll_interval after the last one started, and
reconciliations take at most reconcile_share of the time.

A real agent on a SQLite inventory runs Agent.poll_loop and its reconciliation jobs; its
clock's monotonic reading is moved on inside each poll or reconciliation, standing for a
pass of that length, and the loop's waits are recorded instead of slept."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.app import Agent
from agent.config import Config, load_config
from agent.scan import ScanReport
from tests.conftest import INTEGRATION_ID, SECRET
from tests.integration.commits import Ahead
from tests.integration.inventory import (
    SLOTS_CHANGED_QUERY,
    Inventory,
    first_day,
    seed_tours,
    write_config,
)

INTERVAL_S = 10.0


class Waits:
    """Stands for the poll loop's wake-up event: records each wait, stops after `count`."""

    def __init__(self, stop: threading.Event, count: int) -> None:
        self.stop, self.count, self.seen = stop, count, list[float]()

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.seen.append(timeout)
        if len(self.seen) >= self.count:
            self.stop.set()
        return False

    def set(self) -> None:
        pass

    def clear(self) -> None:
        pass


def _config(inventory: Inventory, folder: Path, **keys: Any) -> Config:
    """An agent on `inventory` with a SQLite state in `folder`, delivering nowhere."""
    return load_config(
        write_config(
            folder,
            name="schedule",
            base_url="http://127.0.0.1:9",
            integration_id=INTEGRATION_ID,
            secret=SECRET,
            source_url=inventory.url,
            state_url=f"sqlite:///{folder / 'state.db'}",
            **keys,
        )
    )


def test_polls_start_one_interval_apart_and_a_long_pass_is_followed_by_a_rest(
    make_inventory: Callable[[str], Inventory], tmp_path: Path
) -> None:
    inventory = make_inventory("sqlite")
    seed_tours(inventory, first_day())
    config = _config(inventory, tmp_path, poll_interval=INTERVAL_S)
    clock = Ahead()
    agent = Agent(config, clock=clock)
    agent.open()
    try:
        passes = iter([2.0, 7.0, 30.0, 0.0])
        real_poll = agent.poll

        def poll() -> object:
            started = time.monotonic()
            result = real_poll()
            clock.ahead += next(passes)
            real_poll_s.append(time.monotonic() - started)
            return result

        real_poll_s: list[float] = []
        agent.poll = poll  # type: ignore[method-assign]
        stop = threading.Event()
        waits = Waits(stop, 4)
        agent.poll_wake = waits  # type: ignore[assignment]
        agent.poll_loop(stop)
    finally:
        agent.close()

    first, second, third, fourth = waits.seen
    slack = [s + 0.001 for s in real_poll_s]  # the polls' own (real, short) length
    # A 2 s pass: the next poll starts 10 s after this one started, not 12 s.
    assert INTERVAL_S - 2.0 - slack[0] <= first <= INTERVAL_S - 2.0
    # A 7 s pass (over half the interval): a rest as long as the pass.
    assert 7.0 <= second <= 7.0 + slack[1]
    # A 30 s pass: a rest of one interval, as before.
    assert third == INTERVAL_S
    # A quick poll: one interval, less its own length.
    assert INTERVAL_S - slack[3] <= fourth <= INTERVAL_S


RECONCILIATION_S = 20.0
"""How long each reconciliation stands for (the clock is moved on by this much)."""


@pytest.mark.parametrize(("share", "held_back_s"), [(0.1, 200.0), (0.5, 40.0), (1.0, 20.0)])
def test_a_scheduled_reconciliation_waits_until_the_last_took_at_most_its_share(
    make_inventory: Callable[[str], Inventory], tmp_path: Path, share: float, held_back_s: float
) -> None:
    inventory = make_inventory("sqlite")
    seed_tours(inventory, first_day())
    inventory.track_updates()
    config = _config(
        inventory,
        tmp_path,
        source={
            "slots_changed_query": SLOTS_CHANGED_QUERY,
            "full_scan_interval": 60,
            "reconcile_share": share,
        },
    )
    clock = Ahead()
    agent = Agent(config, clock=clock)
    agent.open()
    try:
        assert agent.poll() is not None  # the baseline: reconciliations go beside the polls
        ran: list[float] = []
        real_reconcile = agent.scanner.reconcile

        def reconcile(*args: object, **kwargs: object) -> ScanReport | None:
            report = real_reconcile(*args, **kwargs)  # type: ignore[arg-type]
            clock.ahead += RECONCILIATION_S
            ran.append(clock.ahead)
            return report

        agent.scanner.reconcile = reconcile  # type: ignore[method-assign]
        # The one after the start is never held back; it took 20 s.
        agent.full_scan_job()
        assert len(ran) == 1
        # Scheduled ones are skipped until 20 s / share has passed since it started.
        started = clock.ahead - RECONCILIATION_S
        if held_back_s > RECONCILIATION_S:
            for at_s in (RECONCILIATION_S, RECONCILIATION_S + 1.0, held_back_s - 0.5):
                clock.ahead = started + at_s
                agent.scheduled_reconciliation_job()
            assert len(ran) == 1
        clock.ahead = started + held_back_s + 0.5
        agent.scheduled_reconciliation_job()
        assert len(ran) == 2
        # A reconciliation asked for outside the schedule (a secret file appeared) runs anyway.
        agent.full_scan_job()
        assert len(ran) == 3
    finally:
        agent.close()


class Sleeps(Waits):
    """Waits that move `clock` on by each timeout, as if slept, and end the loop after the
    pass following a commit."""

    def __init__(self, stop: threading.Event, clock: Ahead) -> None:
        super().__init__(stop, 10_000)
        self.clock = clock

    def wait(self, timeout: float | None = None) -> bool:
        assert timeout is not None
        self.clock.ahead += timeout
        return super().wait(timeout)


@pytest.mark.postgres
def test_without_a_change_query_a_held_pass_starts_when_its_poll_interval_ends(
    make_inventory: Callable[[str], Inventory], tmp_path: Path
) -> None:
    """A commit right after a pass for a commit waits for poll_interval from that pass's
    start, and no longer: the loop reads the snapshot every 0.25 s, and once more at the
    moment the hold ends."""
    inventory = make_inventory("postgresql")
    seed_tours(inventory, first_day())
    config = _config(inventory, tmp_path, poll_interval=INTERVAL_S)
    clock = Ahead()
    agent = Agent(config, clock=clock)
    agent.open()
    starts: list[float] = []
    try:
        real_poll = agent.poll
        stop = threading.Event()
        waits = Sleeps(stop, clock)

        def poll() -> object:
            starts.append(clock.monotonic())
            result = real_poll()
            if len(starts) in (1, 2):
                inventory.update_slot(101 + len(starts), vacancies=len(starts))
            if len(starts) == 3:
                stop.set()
            return result

        agent.poll = poll  # type: ignore[method-assign]
        agent.poll_wake = waits  # type: ignore[assignment]
        agent.poll_loop(stop)
    finally:
        agent.close()
    first, for_a_commit, held = starts
    assert for_a_commit - first < 1.0  # the first pass holds nothing back
    # Started the moment poll_interval ended (the real time the passes took aside).
    assert INTERVAL_S <= held - for_a_commit < INTERVAL_S + 0.2
    assert 0 < min(waits.seen) < 0.25  # the last wait, up to the hold's end
