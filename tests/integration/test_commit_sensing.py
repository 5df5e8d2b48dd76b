"""What both commit sensors promise a daemon without a change query, on each server: at rest
no pass runs, and a booking is delivered at once. Each sensor's own cases are in
test_pg_snapshots.py (PostgreSQL's snapshot) and test_update_times.py (MariaDB's table
times)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from agent.app import Agent
from agent.sandbox import Sandbox
from tests.integration.commits import daemon_rests_then_delivers
from tests.integration.inventory import Inventory, first_day, seed_tours


@pytest.mark.parametrize(
    "backend",
    [
        # A commit in any database of the server moves PostgreSQL's snapshot.
        pytest.param("postgresql", marks=[pytest.mark.postgres, pytest.mark.alone]),
        pytest.param("mariadb", marks=pytest.mark.mariadb),
    ],
)
def test_the_daemon_at_rest_runs_no_pass_and_delivers_a_booking_at_once(
    backend: str,
    make_inventory: Callable[[str], Inventory],
    make_sandbox: Callable[..., Sandbox],
    agents: Callable[..., Agent],
) -> None:
    inventory = make_inventory(backend)
    seed_tours(inventory, first_day())
    sandbox = make_sandbox()
    daemon_rests_then_delivers(
        agents(inventory, sandbox.url, poll_interval=0.2), inventory, sandbox
    )
