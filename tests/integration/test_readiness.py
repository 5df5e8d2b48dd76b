"""Agent.readiness(): what /readyz reports, in each failure state, against real databases."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from agent.app import Agent
from tests.conftest import PG_ADMIN_URL
from tests.integration.inventory import Inventory, first_day, seed_tours


def test_not_ready_before_the_first_scan_then_ready(
    make_inventory: Callable[..., Inventory],
    make_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    inventory = make_inventory("sqlite")
    agent = make_agent(
        "ready",
        base_url="http://127.0.0.1:9",
        source_url=inventory.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
    )
    assert agent.readiness() == ["no successful scan yet"]
    assert agent.guarded(agent.poll)
    assert agent.readiness() == []


def test_an_unreachable_source_makes_the_agent_not_ready(
    make_agent: Callable[..., Agent], tmp_path: Path
) -> None:
    agent = make_agent(
        "down",
        base_url="http://127.0.0.1:9",
        source_url="postgresql+psycopg://postgres@127.0.0.1:1/nowhere",
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
    )
    assert not agent.guarded(agent.poll)
    problems = agent.readiness()
    assert problems[0].startswith("source unavailable: cannot reach the source database")
    assert "no successful scan yet" in problems
    interval = agent.config.settings.source.poll_interval
    assert agent.next_poll_in_s() == interval
    assert not agent.guarded(agent.poll)
    assert agent.next_poll_in_s() == 2 * interval  # backing off while the source is down


def test_an_unreachable_state_store_makes_the_agent_not_ready(
    make_inventory: Callable[..., Inventory],
    make_agent: Callable[..., Agent],
    new_database: Callable[[str], str],
) -> None:
    inventory = make_inventory("sqlite")
    state_url = new_database("postgresql")
    agent = make_agent(
        "state", base_url="http://127.0.0.1:9", source_url=inventory.url, state_url=state_url
    )
    assert agent.guarded(agent.poll)
    name = sa.engine.make_url(state_url).database
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false'))
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
                ),
                {"n": name},
            )
        problems = agent.readiness()
        assert any(p.startswith("state store unreachable") for p in problems), problems
        assert not agent.guarded(agent.poll)
    finally:
        with admin.connect() as conn:
            conn.execute(sa.text(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true'))
        admin.dispose()
    assert agent.guarded(agent.poll)
    assert agent.readiness() == []


def test_scans_failing_on_a_broken_query_make_the_agent_not_ready_until_one_succeeds(
    make_inventory: Callable[..., Inventory],
    make_agent: Callable[..., Agent],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """/readyz stayed 200 through 30 s of failing scans, and nothing said when they
    recovered."""
    inventory = make_inventory("sqlite")
    seed_tours(inventory, first_day())
    agent = make_agent(
        "broken",
        base_url="http://127.0.0.1:9",
        source_url=inventory.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
    )
    assert agent.guarded(agent.poll)
    caplog.set_level(logging.INFO, logger="agent")
    with sa.create_engine(inventory.url).begin() as conn:
        conn.execute(sa.text("ALTER TABLE slots RENAME COLUMN vacancies TO seats"))

    assert not agent.guarded(agent.poll)
    assert agent.readiness() == []  # one failure may be a blip
    assert not agent.guarded(agent.poll)
    (problem,) = agent.readiness()
    assert problem.startswith("the last 2 scans failed: slots_query failed: ")

    with sa.create_engine(inventory.url).begin() as conn:
        conn.execute(sa.text("ALTER TABLE slots RENAME COLUMN seats TO vacancies"))
    assert agent.guarded(agent.poll)
    assert agent.readiness() == []
    recovered = [
        r.getMessage() for r in caplog.records if getattr(r, "event", "") == "scan.recovered"
    ]
    assert recovered == ["scans succeed again after 2 failed scan(s)"]
