"""The acceptance scenario: inventory -> agent -> real HTTP -> the sandbox, on every backend.

The state store is SQLite in tmp_path; the inventory is SQLite, PostgreSQL or MariaDB. The
sandbox answers a trigger by re-reading the catalog from the same inventory, so a notify for
a new product answers updated:true only if the trigger really went first. A real clock runs
this test; slots start days ahead and nothing asserts on how long anything took.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.app import Agent
from agent.sandbox import Sandbox
from agent.source.reader import SourceReader
from tests.integration.inventory import (
    BACKEND_PARAMS,
    Inventory,
    at,
    calls,
    first_day,
    notify_payload,
    seed_tours,
)

DRAIN_S = 60.0
"""A ceiling, not an expectation: drain returns as soon as the outbox is empty."""


def _delivered(agent: Agent) -> None:
    result = agent.drain(DRAIN_S)
    assert (result.timed_out, result.paused_reason, result.stats.pending) == (False, None, 0)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_acceptance_scenario(
    backend: str,
    make_inventory: Callable[[str], Inventory],
    make_reader: Callable[..., SourceReader],
    make_sandbox: Callable[..., Sandbox],
    make_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    inventory = make_inventory(backend)
    day = first_day()
    slots = {s.slot_id: s for s in seed_tours(inventory, day)}
    sandbox = make_sandbox(catalog=make_reader(inventory.url).catalog_keys)
    state_url = f"sqlite:///{tmp_path / 'state.db'}"
    agent = make_agent("agent", base_url=sandbox.url, source_url=inventory.url, state_url=state_url)

    # (a) the first scan is a baseline: one trigger, no notify
    report = agent.scan()
    assert report.baseline
    assert (report.triggers, report.notifies) == (1, 0)
    _delivered(agent)
    baseline_calls = calls(sandbox)
    assert [(c.endpoint, c.status) for c in baseline_calls] == [("trigger", 200)]
    assert baseline_calls[0].answer["data"]["synced"] == 3

    # (b) a day of bookings
    inventory.update_slot(101, vacancies=37)  # a booking
    inventory.update_slot(102, vacancies=0)  # sold out
    inventory.update_slot(103, status="CLOSED")  # closed (weather)
    inventory.delete_slot(104)  # deleted
    inventory.update_slot(201, capacity=20)  # capacity raised
    inventory.add_product(4, "Cappadocia Balloon Flight", 25000, {"4-sunrise": "Sunrise"})
    inventory.add_slot(401, "4-sunrise", at(day, 5, 1), capacity=20, vacancies=20)
    inventory.add_slot(402, "4-sunrise", at(day, 5, 2), capacity=20, vacancies=8)
    inventory.set_price(3, 10900)  # price change on a product whose slots did not change

    def expected(
        slot_id: int, status: str, vacancies: int | None, capacity: int | None
    ) -> dict[str, Any]:
        if slot_id in slots:
            s = slots[slot_id]
            product_id, option_id, start = s.product_id, s.option_id, s.start
        else:
            product_id, option_id = 4, "4-sunrise"
            start = at(day, 5, 1) if slot_id == 401 else at(day, 5, 2)
        return notify_payload(
            product_id,
            option_id,
            slot_id,
            start,
            status=status,
            vacancies=vacancies,
            capacity=capacity,
        )

    wanted = {
        "101": expected(101, "AVAILABLE", 37, 40),
        "102": expected(102, "SOLD_OUT", 0, 40),
        "103": expected(103, "CLOSED", 5, 40),
        "104": expected(104, "CLOSED", 0, None),
        "201": expected(201, "AVAILABLE", 15, 20),
        "401": expected(401, "AVAILABLE", 20, 20),
        "402": expected(402, "LIMITED", 8, 20),
    }

    report = agent.scan()
    assert not report.baseline
    assert (report.triggers, report.notifies) == (1, len(wanted))
    _delivered(agent)

    day_calls = calls(sandbox)[len(baseline_calls) :]
    assert [c.endpoint for c in day_calls] == ["trigger"] + ["notify"] * len(wanted)
    assert all(c.status == 200 for c in day_calls)
    assert day_calls[0].answer["data"]["synced"] == 4  # the trigger saw the new product
    notifies = day_calls[1:]
    by_slot = {c.body["availabilityId"]: c.body for c in notifies if c.body is not None}
    assert len(by_slot) == len(notifies)  # exactly one notify per changed slot
    assert by_slot == wanted
    # the trigger went first, so Seyaha already knew the new product's option
    assert {c.body["availabilityId"]: c.answer["data"]["updated"] for c in notifies if c.body} == {
        slot_id: True for slot_id in wanted
    }
    # soonest start first
    assert [c.body["availabilityId"] for c in notifies if c.body] == [
        "201",
        "101",
        "401",
        "102",
        "402",
        "103",
        "104",
    ]
    with sandbox.lock:
        assert sandbox.slots[("4", "4-sunrise", "402")] == wanted["402"]

    # (c) nothing changed: nothing is sent
    report = agent.scan()
    assert (report.messages, report.enqueued) == (0, 0)
    _delivered(agent)
    assert len(calls(sandbox)) == len(baseline_calls) + len(day_calls)

    # (d) an agent with the wrong secret: refused, paused, nothing lost
    before = len(calls(sandbox))
    wrong = make_agent(
        "wrong-secret",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=state_url,
        secret="0bad" * 16,
    )
    inventory.update_slot(105, vacancies=39)
    change = expected(105, "AVAILABLE", 39, 40)
    assert wrong.scan().notifies == 1

    result = wrong.drain(DRAIN_S)

    assert result.paused_reason is not None
    assert result.paused_reason.startswith("401 from Seyaha")
    assert result.stats.pending == 1
    assert wrong.deliverer.pause is not None
    assert wrong.metrics.registry.get_sample_value("seyaha_agent_delivery_paused") == 1.0
    assert [(c.endpoint, c.status) for c in calls(sandbox)[before:]] == [("notify", 401)]
    with sandbox.lock:
        assert ("1", "1-sunset", "105") not in sandbox.slots
    (waiting,) = agent.store.admin.entries()
    assert (waiting.kind, waiting.state, waiting.last_status) == ("notify", "pending", 401)
    assert waiting.payload == change

    # the agent with the right secret delivers it, exactly once
    _delivered(agent)
    _delivered(agent)
    after = calls(sandbox)[before:]
    assert [(c.endpoint, c.status) for c in after] == [("notify", 401), ("notify", 200)]
    assert after[1].body == change
    with sandbox.lock:
        assert sandbox.slots[("1", "1-sunset", "105")] == change
    assert agent.store.admin.entries() == []
