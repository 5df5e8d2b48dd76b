"""The daemon loop and a source database that goes away and comes back."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from agent.app import Agent
from agent.sandbox import Sandbox
from agent.source.reader import SourceReader
from tests.conftest import PG_ADMIN_URL
from tests.integration.inventory import (
    Inventory,
    calls,
    first_day,
    notify_payload,
    running,
    seed_tours,
    wait_until,
)


def _scans(agent: Agent, result: str) -> float:
    value = agent.metrics.registry.get_sample_value("seyaha_agent_scans_total", {"result": result})
    return value or 0.0


def test_the_daemon_delivers_a_change_and_stops_when_asked(
    make_inventory: Callable[[str], Inventory],
    make_reader: Callable[..., SourceReader],
    make_sandbox: Callable[..., Sandbox],
    make_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    inventory = make_inventory("sqlite")
    slot = seed_tours(inventory, first_day())[0]
    sandbox = make_sandbox(catalog=make_reader(inventory.url).catalog_keys)
    agent = make_agent(
        "daemon",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        poll_interval=0.2,
    )
    expected = notify_payload(
        slot.product_id,
        slot.option_id,
        slot.slot_id,
        slot.start,
        status="LIMITED",
        vacancies=12,
        capacity=40,
    )
    with running(agent):
        wait_until(
            lambda: [(c.endpoint, c.status) for c in calls(sandbox)] == [("trigger", 200)],
            "the baseline trigger",
        )
        inventory.update_slot(slot.slot_id, vacancies=12)
        wait_until(
            lambda: any(c.body == expected and c.status == 200 for c in calls(sandbox)),
            "the notify for the booking",
        )

    assert [(c.endpoint, c.status, c.body) for c in calls(sandbox)] == [
        ("trigger", 200, None),
        ("notify", 200, expected),
    ]
    assert _scans(agent, "ok") >= 2
    assert agent.store.admin.entries() == []


@pytest.mark.postgres
def test_a_source_that_goes_away_is_waited_for_and_a_change_made_meanwhile_delivered(
    make_inventory: Callable[[str], Inventory],
    make_sandbox: Callable[..., Sandbox],
    make_agent: Callable[..., Agent],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    inventory = make_inventory("postgresql")
    slot = seed_tours(inventory, first_day())[0]
    database = sa.engine.make_url(inventory.url).database
    sandbox = make_sandbox()
    agent = make_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
    )
    agent.scan_job()
    assert agent.drain(60).stats.pending == 0
    assert [c.endpoint for c in calls(sandbox)] == ["trigger"]
    assert _scans(agent, "ok") == 1

    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    # The booking system's own session outlives the outage and keeps writing.
    booking = inventory.engine.connect()
    try:
        own_pid = booking.execute(sa.text("SELECT pg_backend_pid()")).scalar_one()
        booking.commit()
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :name AND pid <> :own AND pid <> pg_backend_pid()"
                ),
                {"name": database, "own": own_pid},
            )

        def only_the_booking_session_left() -> bool:
            with admin.connect() as conn:
                pids = conn.execute(
                    sa.text("SELECT pid FROM pg_stat_activity WHERE datname = :name"),
                    {"name": database},
                ).scalars()
                return set(pids) == {own_pid}

        wait_until(only_the_booking_session_left, "the agent's sessions to be terminated")

        with caplog.at_level(logging.INFO, logger="agent"):
            agent.scan_job()
            agent.scan_job()

        assert _scans(agent, "source_unavailable") == 2
        assert _scans(agent, "ok") == 1
        down = [r for r in caplog.records if getattr(r, "event", None) == "source.unavailable"]
        assert down
        assert all(r.levelno == logging.ERROR and r.exc_info is None for r in down)
        assert "not currently accepting connections" in down[0].getMessage()
        assert not [r for r in caplog.records if r.exc_info is not None]

        booking.execute(
            sa.update(inventory.slots)
            .where(inventory.slots.c.id == slot.slot_id)
            .values(vacancies=3)
        )
        booking.commit()
    finally:
        booking.close()
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
        admin.dispose()

    caplog.clear()
    with caplog.at_level(logging.INFO, logger="agent"):
        agent.scan_job()
    assert _scans(agent, "ok") == 2
    assert [
        r.getMessage() for r in caplog.records if getattr(r, "event", None) == "source.recovered"
    ]
    assert agent.drain(60).stats.pending == 0
    assert [(c.endpoint, c.status, c.body) for c in calls(sandbox)][1:] == [
        (
            "notify",
            200,
            notify_payload(
                slot.product_id,
                slot.option_id,
                slot.slot_id,
                slot.start,
                status="LIMITED",
                vacancies=3,
                capacity=40,
            ),
        )
    ]
