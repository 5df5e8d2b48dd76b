"""What a scan says in the log about a baseline and about a resync of an empty store."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.app import Agent
from tests.integration.inventory import Inventory, first_day, seed_tours


@pytest.mark.parametrize("resync", [False, True])
def test_an_empty_store_logs_a_baseline_or_a_resync_as_what_it_is(
    resync: bool,
    make_inventory: Callable[[str], Inventory],
    make_agent: Callable[..., Agent],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    inventory = make_inventory("sqlite")
    slots = seed_tours(inventory, first_day())
    agent = make_agent(
        "agent",
        base_url="http://127.0.0.1:9",
        source_url=inventory.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
    )
    with caplog.at_level(logging.INFO, logger="agent.scan"):
        report = agent.scan(resync=resync)

    events = [getattr(r, "event", None) for r in caplog.records]
    if resync:
        assert report.notifies == len(slots)
        assert "scan.resync" in events
        assert "scan.baseline" not in events  # it said "one sync/trigger queued"
    else:
        assert report.notifies == 0
        assert events.count("scan.baseline") == 1
