"""The daemon's passes without a change query (agent/source/gate.py), driven by hand: an
Agent whose clock's monotonic reading is moved on at will, so that poll_interval and
full_scan_interval pass at once, while the database's own clock runs for real."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.app import Agent
from agent.clock import SystemClock
from agent.config import load_config
from agent.sandbox import Sandbox
from agent.scan import ScanReport
from tests.conftest import INTEGRATION_ID, SECRET
from tests.integration.inventory import (
    SLOTS_QUERY,
    Inventory,
    calls,
    first_day,
    running,
    seed_tours,
    wait_until,
    write_config,
)

POLL_S = 5.0
"""poll_interval of the deterministic tests (moved on by hand)."""

FALLBACK_S = 3600.0
"""full_scan_interval: no pass in these tests is explained by it unless moved on to it."""

QUIET_S = 3.0
"""How long a daemon test watches for a pass that must NOT run."""

WAKE_WAIT_S = 30.0


class Ahead(SystemClock):
    """The system clock, whose monotonic reading is moved on by hand."""

    def __init__(self) -> None:
        self.ahead = 0.0

    def monotonic(self) -> float:
        return time.monotonic() + self.ahead


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """`agents(inventory, base_url, clock=..., **source_keys)`: an opened Agent on a SQLite
    state, with no change query and full_scan_interval FALLBACK_S unless told."""
    made: list[Agent] = []

    def make(
        inventory: Inventory,
        base_url: str,
        *,
        clock: SystemClock | None = None,
        poll_interval: float = POLL_S,
        slots_query: str = SLOTS_QUERY,
        state_url: str | None = None,
        source_url: str | None = None,
        **source: Any,
    ) -> Agent:
        path = write_config(
            tmp_path,
            name=f"agent{len(made)}",
            base_url=base_url,
            integration_id=INTEGRATION_ID,
            secret=SECRET,
            source_url=source_url or inventory.url,
            state_url=state_url or f"sqlite:///{tmp_path / f'state{len(made)}.db'}",
            poll_interval=poll_interval,
            slots_query=slots_query,
            source={"full_scan_interval": FALLBACK_S, **source},
        )
        agent = Agent(load_config(path), clock=clock)
        made.append(agent)
        agent.open(exclusive=False)
        return agent

    yield make
    for agent in made:
        agent.close()


def quiet(agent: Agent, clock: Ahead) -> None:
    """Move on until the gate runs no pass."""
    for _ in range(3):
        clock.ahead += POLL_S
        if agent.poll_when_due() is None:
            return
    pytest.fail("the gate kept running passes with nothing changing")


def pass_(agent: Agent, clock: Ahead) -> ScanReport | None:
    """The daemon's next poll, poll_interval on."""
    clock.ahead += POLL_S
    return agent.poll_when_due()


def notifies(report: ScanReport | None) -> int:
    assert report is not None, "no pass ran"
    return report.notifies


def at_rest(
    inventory: Inventory, agent_for: Callable[..., Agent], base_url: str
) -> tuple[Agent, Ahead]:
    """The tours seeded, an agent on `clock` that recorded them and runs no pass now."""
    seed_tours(inventory, first_day())
    clock = Ahead()
    agent = agent_for(inventory, base_url, clock=clock)
    first = agent.poll_when_due()
    assert first is not None
    assert first.baseline
    time.sleep(settle_s(agent))
    quiet(agent, clock)
    return agent, clock


def settle_s(agent: Agent) -> float:
    """How long a reading may ask for one more pass after a change (MySQL's whole seconds)."""
    return float(getattr(agent.sensor, "settle_s", 0.0))


def scans(agent: Agent) -> float:
    value = agent.metrics.registry.get_sample_value("seyaha_agent_scans_total", {"result": "ok"})
    return value or 0.0


def daemon_rests_then_delivers(agent: Agent, inventory: Inventory, sandbox: Sandbox) -> None:
    """The running daemon records the seeded tours, then runs no pass while nothing
    commits (QUIET_S), then delivers a booking at once (well before any fallback)."""
    with running(agent):
        wait_until(lambda: [c.endpoint for c in calls(sandbox)] == ["trigger"], "the baseline")
        time.sleep(settle_s(agent) + 1.0)  # MySQL: the seeding's second settles
        # A window of QUIET_S without a pass, within three tries: on PostgreSQL a write
        # anywhere on the server (another test database's autoanalyze) is a commit too.
        for _ in range(3):
            before = scans(agent)
            time.sleep(QUIET_S)
            if scans(agent) == before:
                break
        else:
            pytest.fail("passes kept running with nothing changing")
        inventory.update_slot(101, vacancies=9)
        wait_until(
            lambda: any(
                c.endpoint == "notify" and c.body and c.body["availabilityId"] == "101"
                for c in calls(sandbox)
            ),
            "the booking's notify",
            timeout_s=WAKE_WAIT_S,
        )
        assert scans(agent) > before
