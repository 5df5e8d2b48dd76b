"""Agents on one PostgreSQL or MariaDB state store whose hosts' clocks disagree by minutes:
leases and retry times follow the database's clock, so the agents never hold one lease at once
and never send one message together, and a retry is not put off by a slow host clock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from agent.app import Agent
from agent.clock import SystemClock
from agent.config import load_config
from agent.model import OutboxMessage
from agent.sandbox import Sandbox
from agent.store import LeaseLost, StateStore
from agent.store.coordination import SCANNER
from agent.store.meta import get_meta, set_meta
from tests.conftest import INTEGRATION_ID, SECRET
from tests.integration.inventory import (
    BACKEND_PARAMS,
    SERVER_PARAMS,
    Inventory,
    first_day,
    seed_tours,
    write_config,
)

SHARED_BACKENDS = [p for p in BACKEND_PARAMS if p.values[0] != "sqlite"]

SKEW = timedelta(minutes=10)
"""Far more than any lease or retry delay here: the host clocks alone would decide all."""


class SkewedClock(SystemClock):
    """A host whose wall clock is `skew` away from the others'; its monotonic clock ticks
    like everyone's (that is what a wrong time zone setting or a dead NTP daemon looks like)."""

    def __init__(self, skew: timedelta) -> None:
        self.skew = skew

    def now(self) -> datetime:
        return super().now() + self.skew


@pytest.fixture
def agents_on(
    tmp_path: Path,
    make_inventory: Callable[[str], Inventory],
    make_sandbox: Callable[..., Sandbox],
    new_database: Callable[[str], str],
) -> Iterator[Callable[[str, timedelta], Agent]]:
    """`agents_on(backend, skew)`: an opened agent on the test's one shared state store (in
    `backend`), one SQLite inventory and one sandbox, its host clock `skew` off."""
    inventory = make_inventory("sqlite")
    seed_tours(inventory, first_day())
    sandbox = make_sandbox()
    states: dict[str, str] = {}
    made: list[Agent] = []

    def make(backend: str, skew: timedelta) -> Agent:
        state_url = states.setdefault(backend, new_database(backend))
        path = write_config(
            tmp_path,
            name=f"agent-{len(made)}",
            base_url=sandbox.url,
            integration_id=INTEGRATION_ID,
            secret=SECRET,
            source_url=inventory.url,
            state_url=state_url,
        )
        agent = Agent(load_config(path), clock=SkewedClock(skew))
        made.append(agent)
        agent.open(exclusive=False)
        return agent

    yield make
    for agent in made:
        agent.close()


@pytest.mark.parametrize("backend", SHARED_BACKENDS)
def test_an_agent_whose_clock_runs_ahead_takes_neither_the_scanner_lease_nor_held_messages(
    backend: str, agents_on: Callable[[str, timedelta], Agent]
) -> None:
    on_time = agents_on(backend, timedelta())
    ahead = agents_on(backend, SKEW)

    first = on_time.poll()
    assert first is not None
    assert first.baseline
    # Ten minutes "later" on its own clock, the other agent still sees a running lease.
    assert ahead.poll() is None
    lease = ahead.store.coordination.lease(SCANNER)
    assert lease is not None
    assert lease.holder == on_time.identity

    lease_s = on_time.config.settings.delivery.lease
    (held,) = on_time.store.queue.claim(on_time.clock.now(), limit=10, lease_s=lease_s)
    assert held.kind == "trigger"
    assert ahead.store.queue.claim(ahead.clock.now(), limit=10, lease_s=lease_s) == []

    # A retry scheduled 30 s ahead by one agent is not due for the other either.
    on_time.store.queue.retry_later(
        held, at=on_time.clock.now() + timedelta(seconds=30), error="503 from Seyaha", status=503
    )
    assert ahead.store.queue.claim(ahead.clock.now(), limit=10, lease_s=lease_s) == []
    assert on_time.store.queue.claim(on_time.clock.now(), limit=10, lease_s=lease_s) == []


@pytest.mark.parametrize("backend", SHARED_BACKENDS)
def test_an_agent_starting_on_a_shared_store_leaves_the_others_leases_alone(
    backend: str, agents_on: Callable[[str, timedelta], Agent]
) -> None:
    # A start on a SQLite store gives back every lease it finds (only a dead process can
    # hold one there); on a shared store the holder may be another agent at work.
    first = agents_on(backend, timedelta())
    report = first.poll()
    assert report is not None
    assert report.baseline
    lease_s = first.config.settings.delivery.lease
    (held,) = first.store.queue.claim(first.clock.now(), limit=10, lease_s=lease_s)

    second = agents_on(backend, timedelta())

    assert second.store.queue.claim(second.clock.now(), limit=10, lease_s=lease_s) == []
    assert first.store.queue.complete(held)


@pytest.mark.parametrize("backend", SHARED_BACKENDS)
def test_an_agent_whose_clock_runs_behind_is_not_held_back_by_it(
    backend: str, agents_on: Callable[[str, timedelta], Agent]
) -> None:
    on_time = agents_on(backend, timedelta())
    behind = agents_on(backend, -SKEW)

    assert on_time.poll() is not None
    (held,) = on_time.store.queue.claim(on_time.clock.now(), limit=10, lease_s=60)
    on_time.store.queue.retry_later(
        held, at=on_time.clock.now() + timedelta(seconds=0.5), error="timed out", status=None
    )
    deadline = time.monotonic() + 30
    taken: list[OutboxMessage] = []
    while not taken and time.monotonic() < deadline:
        time.sleep(0.1)
        taken = behind.store.queue.claim(behind.clock.now(), limit=10, lease_s=60)
    # Ten minutes "earlier" on its own clock, the retry is due for it as soon as for anyone.
    assert [m.id for m in taken] == [held.id]


@pytest.mark.parametrize("backend", SHARED_BACKENDS)
def test_scan_results_are_dropped_once_another_agent_took_the_scanner_lease(
    backend: str, agents_on: Callable[[str, timedelta], Agent]
) -> None:
    """A scanner that stalls past its lease finishes its scan after the takeover: its result
    must not overwrite what the new scanner recorded."""
    stalled = agents_on(backend, timedelta())
    other = agents_on(backend, timedelta())
    assert stalled.poll() is not None
    lease_s = stalled.config.settings.state.scanner_lease
    taken = other.store.coordination.hold(
        SCANNER, other.identity, other.clock.now() + timedelta(seconds=lease_s + 1), lease_s
    )
    assert taken == "taken"

    with pytest.raises(LeaseLost, match="another agent took over what this one was scanning"):
        stalled.scanner.scan()
    assert [e.kind for e in other.store.admin.entries()] == ["trigger"]


def test_the_agent_clock_of_a_shared_store_is_the_databases(
    agents_on: Callable[[str, timedelta], Agent],
) -> None:
    ahead = agents_on("postgresql", SKEW)
    assert abs(ahead.clock.now() - datetime.now(UTC)) < SKEW / 10


@pytest.mark.parametrize("backend", SERVER_PARAMS)
def test_two_agents_writing_one_new_record_at_once_both_succeed(
    backend: str, make_store: Callable[[str], StateStore]
) -> None:
    """Agents sharing a store write the same records (the range digests' token, at every
    recorded scan): the second of two writers of a record neither holds waits for the first
    and then writes its own value over it, instead of failing on the first's new row."""
    store = make_store(backend)
    written = threading.Event()
    failure: list[BaseException] = []
    with store.engine.connect() as first:
        with first.begin():
            set_meta(first, "shared-record", "first")

            def second_writer() -> None:
                try:
                    with store.engine.begin() as second:
                        set_meta(second, "shared-record", "second")
                except BaseException as exc:  # reported by the test, not lost in a thread
                    failure.append(exc)
                written.set()

            thread = threading.Thread(target=second_writer)
            thread.start()
            # The second writer waits for the first one's row (its lock), whatever it tried.
            assert not written.wait(0.5)
        thread.join(30)
    assert failure == []
    with store.engine.connect() as conn:
        assert get_meta(conn, "shared-record") == "second"
