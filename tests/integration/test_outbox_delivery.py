"""Delivery through the outbox: leases, coalescing, order, back-pressure and dead letters,
with real state stores, a real inventory and the real HTTP receiver.

Nothing here asserts on how long something took except where a delay is the contract
(Retry-After) or where a short fixed window proves that something does NOT happen (calls
held back by an open circuit breaker). Everything else waits with a generous timeout.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent.app import Agent
from agent.cli import main as cli_main
from agent.config import load_config
from agent.delivery import worker as worker_module
from agent.delivery.client import Response
from agent.errors import StateError
from agent.model import CatalogDiff, OutboxMessage, Slot, SlotDiff
from agent.plan import notify_message
from agent.sandbox import Call, Sandbox
from agent.store import StateStore
from agent.store import schema as outbox_tables
from agent.store.coordination import SCANNER
from tests.conftest import INTEGRATION_ID, SECRET
from tests.integration.conftest import Answer
from tests.integration.inventory import (
    BACKEND_PARAMS,
    SLOTS_CHANGED_QUERY,
    Inventory,
    TourSlot,
    at,
    calls,
    first_day,
    notify_payload,
    seed_tours,
    wait_until,
    write_config,
)

WAIT_S = 60.0
"""Ceiling for anything the delivery threads do; never an expectation."""

SHARED_BACKENDS = [p for p in BACKEND_PARAMS if p.values[0] != "sqlite"]
"""The backends several agents can share (claims use FOR UPDATE SKIP LOCKED there)."""


# -- building blocks ----------------------------------------------------------------------


class ShiftedClock:
    """The real clock, `offset` ahead on both readings: moving the offset makes time pass
    for this process alone. On a shared store the agent's clock is the database's, read once
    and then advanced by the monotonic reading (store.clock.StoreClock), so an offset set
    before that first reading only skews the host's wall clock, which changes nothing; set
    after it, time passes."""

    def __init__(self, offset: timedelta = timedelta()) -> None:
        self.offset = offset

    def now(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def monotonic(self) -> float:
        return time.monotonic() + self.offset.total_seconds()


def _with_delivery(path: Path, delivery: Mapping[str, Any]) -> None:
    """Set [delivery] keys in a configuration written by `write_config`."""
    text = path.read_text(encoding="utf-8")
    for key, value in delivery.items():
        line = f"{key} = {json.dumps(value)}"
        text, found = re.subn(rf"(?m)^{key} = .*$", line, text)
        if not found:
            text = text.replace("[delivery]\n", f"[delivery]\n{line}\n", 1)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def build_agent(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """`build_agent(name, base_url=..., source_url=..., state_url=..., delivery={...})`: an
    opened Agent with [delivery] settings of the test's choosing, closed at the end."""
    made: list[Agent] = []

    def build(
        name: str,
        *,
        base_url: str,
        source_url: str,
        state_url: str,
        delivery: Mapping[str, Any] | None = None,
        clock: ShiftedClock | None = None,
        source: Mapping[str, Any] | None = None,
    ) -> Agent:
        path = write_config(
            tmp_path,
            name=name,
            base_url=base_url,
            integration_id=INTEGRATION_ID,
            secret=SECRET,
            source_url=source_url,
            state_url=state_url,
            source=source,
        )
        _with_delivery(path, {"auth_probe_interval": 0.5, **(delivery or {})})
        agent = Agent(load_config(path), clock=clock)
        made.append(agent)
        agent.open(exclusive=False)
        return agent

    yield build
    for agent in made:
        agent.close()


@pytest.fixture
def state_url(new_database: Callable[[str], str], tmp_path: Path) -> Callable[[str], str]:
    """`state_url(backend)`: where a new state store lives (a file, or a new database)."""

    def make(backend: str) -> str:
        if backend == "sqlite":
            return f"sqlite:///{tmp_path / 'state.db'}"
        return new_database(backend)

    return make


@contextmanager
def delivering(agent: Agent) -> Iterator[None]:
    """The agent's delivery workers (no scans) in the background for the block."""
    stop = threading.Event()
    crashed: list[BaseException] = []

    def run() -> None:
        try:
            agent.deliverer.run(stop, grace_s=30)
        except BaseException as exc:
            crashed.append(exc)

    thread = threading.Thread(target=run, name="deliverer-under-test")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)
    assert not thread.is_alive(), "the delivery workers did not stop within 60 s"
    assert crashed == [], f"delivery crashed: {crashed!r}"


class Wire:
    """What the agent put on the wire and what came back, per notify, in the order the
    answers arrived (the receiver keeps the bodies of accepted calls only)."""

    def __init__(self, agent: Agent) -> None:
        self.sent: list[tuple[dict[str, Any], int | None]] = []
        self._lock = threading.Lock()
        send = agent.client.notify

        def notify(body: str, integration_id: str = "") -> Response:
            response = send(body, integration_id)
            with self._lock:
                self.sent.append((json.loads(body), response.status))
            return response

        agent.client.notify = notify  # type: ignore[method-assign]

    def attempts(self, slot_id: str | None = None) -> list[tuple[dict[str, Any], int | None]]:
        with self._lock:
            return [
                (body, status)
                for body, status in self.sent
                if slot_id is None or body["availabilityId"] == slot_id
            ]


def drained(agent: Agent) -> None:
    result = agent.drain(WAIT_S)
    assert (result.timed_out, result.paused_reason, result.stats.pending) == (False, None, 0), (
        result
    )


def baseline(agent: Agent, sandbox: Sandbox) -> None:
    report = agent.scan()
    assert report.baseline
    drained(agent)
    assert [(c.endpoint, c.status) for c in calls(sandbox)] == [("trigger", 200)]


def notifies(sandbox: Sandbox, status: int | None = None) -> list[Call]:
    return [
        c
        for c in calls(sandbox)
        if c.endpoint == "notify" and (status is None or c.status == status)
    ]


def slot_of(call: Call) -> str:
    assert call.body is not None
    return str(call.body["availabilityId"])


def expected_view(inventory: Inventory, slots: Mapping[int, TourSlot]) -> dict[str, Any]:
    """What Seyaha should hold for each slot, from the inventory as it is now (written out
    independently of the agent's code: these slots have no explicit status)."""
    with inventory.engine.connect() as conn:
        rows = conn.execute(sa.select(inventory.slots)).all()
    view: dict[str, Any] = {}
    for row in rows:
        s = slots[row.id]
        if row.capacity is None:
            status, vacancies = "FREESALE", None
        elif row.vacancies == 0:
            status, vacancies = "SOLD_OUT", 0
        elif row.vacancies * 2 < row.capacity:
            status, vacancies = "LIMITED", row.vacancies
        else:
            status, vacancies = "AVAILABLE", row.vacancies
        view[str(row.id)] = notify_payload(
            s.product_id,
            s.option_id,
            s.slot_id,
            s.start,
            status=status,
            vacancies=vacancies,
            capacity=row.capacity,
        )
    return view


def received(sandbox: Sandbox) -> dict[str, Any]:
    with sandbox.lock:
        return {key[2]: dict(body) for key, body in sandbox.slots.items()}


def breaker_gauge(agent: Agent) -> float | None:
    return agent.metrics.registry.get_sample_value("seyaha_agent_circuit_breaker_open")


T0 = datetime(2030, 7, 1, 9, 0, tzinfo=UTC)
START = datetime(2030, 7, 10, 15, 0, tzinfo=UTC)


def store_slot(number: int, vacancies: int = 5) -> Slot:
    return Slot(
        product_id="1",
        option_id="a",
        availability_id=str(number),
        local_date_time_start="2030-07-10T18:00:00+03:00",
        start_utc=START,
        status="AVAILABLE" if vacancies else "SOLD_OUT",
        vacancies=vacancies,
        capacity=10,
    )


def enqueue(store: StateStore, *slots: Slot, now: datetime = T0) -> int:
    return store.commit_scan(
        CatalogDiff(), SlotDiff(), [notify_message(s, "changed") for s in slots], now
    )


# -- 1. competing consumers ---------------------------------------------------------------


@pytest.mark.parametrize("backend", SHARED_BACKENDS)
def test_two_consumers_on_one_store_claim_every_message_exactly_once(
    backend: str, make_store: Callable[[str], StateStore]
) -> None:
    total = 2000
    store = make_store(backend)
    queued_at = datetime.now(UTC)
    assert enqueue(store, *(store_slot(n) for n in range(total)), now=queued_at) == total
    all_ids = {e.id for e in store.admin.entries(limit=total + 1)}
    assert len(all_ids) == total
    url = store.engine.url.render_as_string(hide_password=False)

    start = threading.Barrier(2)
    claimed: dict[str, list[int]] = {}
    errors: list[BaseException] = []

    def consumer(name: str) -> None:
        mine: list[int] = []
        other = StateStore.from_url(url)
        try:
            start.wait(30)
            # Leases of 30 s, far longer than the work: a claim is never taken back by
            # expiry, and nothing is completed, so only the leases keep the two apart.
            while batch := other.queue.claim(datetime.now(UTC), limit=25, lease_s=30.0):
                mine.extend(m.id for m in batch)
        except BaseException as exc:
            errors.append(exc)
        finally:
            other.close()
            claimed[name] = mine

    threads = [threading.Thread(target=consumer, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)

    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    a, b = claimed["a"], claimed["b"]
    print(f"\n{backend}: consumer a claimed {len(a)}, consumer b claimed {len(b)} of {total}")
    assert a, "both consumers should have taken part"
    assert b, "both consumers should have taken part"
    assert len(a) == len(set(a)), "a consumer got a message twice"
    assert len(b) == len(set(b)), "a consumer got a message twice"
    assert set(a) & set(b) == set(), "a message was handed to both consumers"
    assert set(a) | set(b) == all_ids
    assert store.admin.stats().in_flight == total
    assert store.queue.claim(datetime.now(UTC), limit=total, lease_s=30.0) == []


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_claim_stays_cheap_behind_a_large_backlog(
    backend: str, make_store: Callable[[str], StateStore]
) -> None:
    """A claim used to check each waiting row against every other one (quadratic): behind
    20,000 messages it took minutes, where it takes a fraction of a second."""
    store = make_store(backend)
    now = datetime.now(UTC)
    ms = int(now.timestamp() * 1000)
    rows = [
        {
            "kind": "notify",
            "dedupe_key": f"slot:{n:032x}",
            "payload": json.dumps(store_slot(n).payload()),
            "state": "pending",
            "reason": "changed",
            "created_ms": ms,
            "updated_ms": ms,
            "available_ms": ms,
            "slot_start_ms": int(START.timestamp() * 1000),
            "attempts": 0,
        }
        for n in range(20_000)
    ]
    with store.engine.begin() as conn:
        conn.execute(sa.insert(outbox_tables.outbox), rows)

    started = time.monotonic()
    claimed = store.queue.claim(now, limit=50, lease_s=30)
    took = time.monotonic() - started

    print(f"\n{backend}: one claim of 50 behind 20,000 waiting messages took {took:.2f} s")
    assert [m.payload["availabilityId"] for m in claimed if m.payload] == [
        str(n) for n in range(50)
    ]
    assert took < 20, f"a claim took {took:.1f} s"


# -- 2. coalescing during an outage ---------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_changes_made_during_an_outage_reach_seyaha_once_per_slot_with_the_last_value(
    backend: str,
    make_inventory: Callable[[str], Inventory],
    make_sandbox: Callable[..., Sandbox],
    build_agent: Callable[..., Agent],
    state_url: Callable[[str], str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    inventory = make_inventory("sqlite")
    slots = {s.slot_id: s for s in seed_tours(inventory, first_day())}
    sandbox = make_sandbox()
    agent = build_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=state_url(backend),
        # the breaker and the retry budget have their own tests: here every retry reaches
        # the failing receiver and none gives up
        delivery={
            "concurrency": 2,
            "breaker_failures": 1000,
            "max_attempts": 1000,
            "rate_limit": 0,
        },
    )
    wire = Wire(agent)
    baseline(agent, sandbox)

    changes = {101: [38, 35, 31, 26, 20], 201: [14, 11, 7]}
    sandbox.fail_next(503, count=1_000_000)
    with delivering(agent):
        for round_ in range(5):
            for slot_id, values in changes.items():
                if round_ < len(values):
                    inventory.update_slot(slot_id, vacancies=values[round_])
            report = agent.scan()
            assert report.slots_changed == sum(round_ < len(v) for v in changes.values())
            value = changes[101][round_]
            # the outage is real: this round's value of slot 101 was tried and refused
            wait_until(
                lambda value=value: any(
                    body["vacancies"] == value and status == 503
                    for body, status in wire.attempts("101")
                ),
                f"a refused attempt with vacancies={value}",
                WAIT_S,
            )
    assert notifies(sandbox, 200) == []

    sandbox.fail_next(503, count=0)  # Seyaha is back
    drained(agent)

    expected = expected_view(inventory, slots)
    delivered = notifies(sandbox, 200)
    per_slot = Counter(slot_of(c) for c in delivered)
    made = sum(len(v) for v in changes.values())
    attempts = len(notifies(sandbox))
    tries = Counter(body["availabilityId"] for body, _ in wire.attempts())
    figures = (
        f"{made} slot changes -> {len(delivered)} notifies delivered "
        f"({len(delivered) / made:.2f} per change); {attempts} calls in all including "
        f"those refused during the outage ({attempts / made:.2f} per change; per slot "
        f"{dict(tries)})"
    )
    print(f"\n{backend}: {figures}")
    assert per_slot == {"101": 1, "201": 1}, figures
    assert {slot_of(c): c.body for c in delivered} == {
        "101": expected["101"],
        "201": expected["201"],
    }
    assert {c.body["vacancies"] for c in delivered if c.body} == {20, 7}
    assert agent.store.admin.entries() == []
    assert SECRET not in caplog.text


# -- 3. per-slot order with several workers ---------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_with_four_workers_each_slot_hears_its_changes_in_order(
    backend: str,
    make_inventory: Callable[[str], Inventory],
    make_sandbox: Callable[..., Sandbox],
    build_agent: Callable[..., Agent],
    state_url: Callable[[str], str],
) -> None:
    inventory = make_inventory("sqlite")
    slots = {s.slot_id: s for s in seed_tours(inventory, first_day())}
    sandbox = make_sandbox()
    agent = build_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=state_url(backend),
        delivery={"concurrency": 4, "batch_size": 3, "rate_limit": 0, "breaker_failures": 1000},
    )
    wire = Wire(agent)
    baseline(agent, sandbox)

    # vacancies per round: never rising, some slots changing only every other round or so
    hot: dict[int, Callable[[int], int]] = {
        101: lambda r: 40 - r,
        102: lambda r: 30 - r,
        201: lambda r: 15 - (r + 1) // 2,
        202: lambda r: 10 - r // 3,
    }
    rounds = 24
    with delivering(agent):
        for round_ in range(1, rounds + 1):
            for slot_id, vacancies in hot.items():
                inventory.update_slot(slot_id, vacancies=vacancies(round_))
            if round_ % 7 == 0:
                sandbox.fail_next(503, count=3)
            agent.scan()
            if round_ % 6 == 0:  # let the outbox run dry now and then
                wait_until(
                    lambda: agent.store.admin.stats().pending == 0, "the outbox to drain", WAIT_S
                )
        wait_until(lambda: agent.store.admin.stats().pending == 0, "the outbox to drain", WAIT_S)

    def sequence(call: Call) -> int:
        assert call.body is not None
        return int(call.body["vacancies"])

    by_slot_ok: dict[str, list[int]] = defaultdict(list)
    for call in notifies(sandbox, 200):
        by_slot_ok[slot_of(call)].append(sequence(call))
    by_slot_all: dict[str, list[int]] = defaultdict(list)
    for body, _status in wire.attempts():
        by_slot_all[body["availabilityId"]].append(int(body["vacancies"]))
    refused = sum(status != 200 for _body, status in wire.attempts())
    print(f"\n{backend}: {refused} refused attempts; delivered per slot {dict(by_slot_ok)}")
    assert refused > 0  # the injected failures did make retries
    assert set(by_slot_ok) == {"101", "102", "201", "202"}
    for slot_id, seen in by_slot_ok.items():
        # every value is lower than the one before it: a strictly falling sequence means no
        # older state ever arrived after a newer one (and none arrived twice)
        assert all(a > b for a, b in pairwise(seen)), (slot_id, seen)
    for slot_id, seen in by_slot_all.items():
        assert all(a >= b for a, b in pairwise(seen)), (slot_id, seen)
    expected = expected_view(inventory, slots)
    assert received(sandbox) == {k: expected[k] for k in ("101", "102", "201", "202")}
    assert agent.store.admin.entries() == []


# -- 4. Retry-After -------------------------------------------------------------------------


def test_a_429_with_retry_after_is_retried_no_sooner_than_asked(
    make_inventory: Callable[[str], Inventory],
    make_sandbox: Callable[..., Sandbox],
    build_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    inventory = make_inventory("sqlite")
    slots = {s.slot_id: s for s in seed_tours(inventory, first_day())}
    sandbox = make_sandbox()
    agent = build_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
    )
    baseline(agent, sandbox)
    inventory.update_slot(102, vacancies=2)
    agent.scan()

    sandbox.fail_next(429, count=1, retry_after="2")
    drained(agent)

    attempts = notifies(sandbox)
    assert [c.status for c in attempts] == [429, 200]
    gap = (
        datetime.fromisoformat(attempts[1].at) - datetime.fromisoformat(attempts[0].at)
    ).total_seconds()
    print(f"\nretry {gap:.2f} s after a 429 with Retry-After: 2 (backoff_initial is 0.05 s)")
    assert 1.5 <= gap < 30, gap
    assert attempts[1].body == expected_view(inventory, slots)["102"]


@pytest.mark.parametrize("burst", [1, 4])
def test_rate_burst_calls_go_out_at_once_and_the_next_waits_for_the_rate(
    burst: int,
    make_inventory: Callable[[str], Inventory],
    make_sandbox: Callable[..., Sandbox],
    build_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    """A token bucket of rate_burst calls: after a quiet spell that many go out at once (the
    baseline trigger took one), the next waits 1/rate_limit (100 s here) and stays queued."""
    inventory = make_inventory("sqlite")
    seed_tours(inventory, first_day())
    sandbox = make_sandbox()
    agent = build_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        delivery={"concurrency": 1, "rate_limit": 0.01, "rate_burst": burst},
    )
    baseline(agent, sandbox)
    changed = [101, 102, 201, 202]
    for slot_id in changed:
        inventory.update_slot(slot_id, vacancies=1)
    assert agent.scan().notifies == len(changed)

    at_once = burst - 1
    with delivering(agent):
        wait_until(lambda: len(notifies(sandbox)) >= at_once, f"{at_once} notifies", WAIT_S)
        time.sleep(1.0)  # the next call is 100 s away: nothing more may arrive meanwhile
        assert len(notifies(sandbox, 200)) == at_once
    assert agent.store.admin.stats().pending == len(changed) - at_once


# -- 5. circuit breaker ---------------------------------------------------------------------


def test_the_circuit_breaker_holds_a_backlog_back_while_seyaha_fails_and_lets_it_go_after(
    make_inventory: Callable[[str], Inventory],
    make_sandbox: Callable[..., Sandbox],
    build_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    inventory = make_inventory("sqlite")
    day = first_day()
    inventory.add_product(1, "Bosphorus Sunset Cruise", 4500, {"1-sunset": "Sunset"})
    slots: dict[int, TourSlot] = {}
    for n in range(1, 21):
        slots[n] = TourSlot(1, "1-sunset", n, at(day, 8 + n % 12, n // 12), 40, 40)
        inventory.add_slot(n, "1-sunset", slots[n].start, capacity=40, vacancies=40)
    sandbox = make_sandbox()
    threshold, backlog = 3, 20
    agent = build_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        delivery={
            "breaker_failures": threshold,
            "breaker_cooldown": 1.0,
            "concurrency": 1,
            "rate_limit": 0,
        },
    )
    baseline(agent, sandbox)
    assert breaker_gauge(agent) == 0
    with inventory.engine.begin() as conn:
        conn.execute(sa.update(inventory.slots).values(vacancies=inventory.slots.c.vacancies - 3))
    assert agent.scan().notifies == backlog

    sandbox.fail_next(503, count=1_000_000)
    with delivering(agent):
        wait_until(lambda: breaker_gauge(agent) == 1, "the breaker to open", WAIT_S)
        assert agent.store.coordination.status()["breaker"] == "open"
        at_open = len(notifies(sandbox))
        # A fixed window, only to show what does NOT happen: the backlog hammering Seyaha.
        time.sleep(3.0)
        in_window = len(notifies(sandbox)) - at_open
        assert breaker_gauge(agent) == 1
        failed = len(notifies(sandbox))
        figures = (
            f"{at_open} calls until the breaker opened, {in_window} probe(s) in the next 3 s; "
            f"a backlog of {backlog} with backoff 0.05-0.5 s would have made dozens"
        )
        print(f"\n{figures}")
        assert at_open <= threshold + 1, figures
        assert in_window <= 3, figures
        assert failed <= threshold + 4, figures
        assert notifies(sandbox, 200) == []

        sandbox.fail_next(503, count=0)  # Seyaha is back
        wait_until(lambda: len(received(sandbox)) == backlog, "the backlog to be delivered", WAIT_S)
        wait_until(lambda: breaker_gauge(agent) == 0, "the breaker gauge to drop", WAIT_S)
    assert received(sandbox) == expected_view(inventory, slots)
    assert len(notifies(sandbox, 200)) == backlog
    assert agent.store.coordination.status()["breaker"] == "closed"
    assert agent.store.admin.entries() == []


def test_a_pause_and_an_open_breaker_left_by_an_earlier_process_end_with_the_next_delivery(
    make_inventory: Callable[[str], Inventory],
    make_sandbox: Callable[..., Sandbox],
    build_agent: Callable[..., Agent],
    tmp_path: Path,
) -> None:
    inventory = make_inventory("sqlite")
    seed_tours(inventory, first_day())
    sandbox = make_sandbox()
    url = f"sqlite:///{tmp_path / 'state.db'}"
    # A process that stopped while paused by a 401 and with its breaker open
    earlier = StateStore.from_url(url)
    try:
        earlier.open()
        earlier.coordination.set_status(
            "pause", "2030-07-01T09:00:00+00:00 401 from Seyaha: wrong secret"
        )
        earlier.coordination.set_status("breaker", "open")
    finally:
        earlier.close()

    agent = build_agent("agent", base_url=sandbox.url, source_url=inventory.url, state_url=url)
    assert {k: v for k, v in agent.store.coordination.status().items() if k != "last_delivery"} == {
        "pause": "2030-07-01T09:00:00+00:00 401 from Seyaha: wrong secret",
        "breaker": "open",
    }
    baseline(agent, sandbox)

    status = agent.store.coordination.status()
    assert "pause" not in status
    assert status["breaker"] == "closed"


# -- 6. dead letters ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_refused_and_exhausted_messages_become_dead_letters_that_retry_brings_back(
    backend: str,
    make_inventory: Callable[[str], Inventory],
    make_sandbox: Callable[..., Sandbox],
    build_agent: Callable[..., Agent],
    state_url: Callable[[str], str],
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    inventory = make_inventory("sqlite")
    slots = {s.slot_id: s for s in seed_tours(inventory, first_day())}
    sandbox = make_sandbox()
    agent = build_agent(
        "agent",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=state_url(backend),
        delivery={"max_attempts": 2},
    )
    wire = Wire(agent)
    baseline(agent, sandbox)

    inventory.update_slot(101, vacancies=17)
    agent.scan()
    sandbox.fail_next(
        422,
        count=1,
        body=json.dumps(
            {"success": 0, "error": "Unprocessable Entity", "message": "slot 101 is archived"}
        ),
    )
    drained(agent)
    (rejected,) = agent.store.admin.entries(state="dead")
    assert (rejected.attempts, rejected.last_status, rejected.last_error) == (
        1,
        422,
        "422 from Seyaha: Unprocessable Entity: slot 101 is archived",
    )

    inventory.update_slot(201, vacancies=4)
    agent.scan()
    sandbox.fail_next(503, count=2)
    drained(agent)
    dead = {
        e.payload["availabilityId"]: e for e in agent.store.admin.entries(state="dead") if e.payload
    }
    assert set(dead) == {"101", "201"}
    exhausted = dead["201"]
    assert (exhausted.attempts, exhausted.last_status) == (2, 503)
    assert exhausted.last_error is not None
    assert exhausted.last_error.startswith("gave up after 2 attempts; last: 503 from Seyaha")
    assert [c.status for c in notifies(sandbox)] == [422, 503, 503]
    assert [(body["availabilityId"], status) for body, status in wire.attempts()] == [
        ("101", 422),
        ("201", 503),
        ("201", 503),
    ]
    assert agent.store.admin.stats().dead == 2

    capsys.readouterr()
    code = cli_main(["outbox", "--config", str(agent.config.path), "retry", "--all-dead"])
    out = capsys.readouterr()
    assert code == 0
    assert out.out.strip() == "2 dead letter(s) queued again"
    assert SECRET not in out.out + out.err
    assert {e.state for e in agent.store.admin.entries()} == {"pending"}

    drained(agent)
    assert agent.store.admin.entries() == []
    expected = expected_view(inventory, slots)
    assert received(sandbox) == {"101": expected["101"], "201": expected["201"]}
    assert SECRET not in caplog.text


# -- 7. leases ----------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_lease_that_runs_out_hands_the_message_to_another_store_and_the_first_loses_it(
    backend: str, make_store: Callable[[str], StateStore]
) -> None:
    first = make_store(backend)
    second = StateStore.from_url(first.engine.url.render_as_string(hide_password=False))
    try:
        second.open()
        enqueue(first, store_slot(1, vacancies=4))
        (held,) = first.queue.claim(T0, limit=10, lease_s=30)  # ... and the holder never finishes

        assert second.queue.claim(T0 + timedelta(seconds=29), limit=10, lease_s=30) == []
        (taken,) = second.queue.claim(T0 + timedelta(seconds=31), limit=10, lease_s=30)

        assert taken.id == held.id
        assert taken.lease_token != held.lease_token
        assert taken.payload == held.payload
        assert not first.queue.complete(held)
        assert not first.queue.release(held, at=T0)
        assert second.admin.stats().in_flight == 1
        assert second.queue.complete(taken)
        assert first.admin.entries() == []
    finally:
        second.close()


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_a_stale_message_left_by_a_dead_holder_is_dropped_for_the_newer_state(
    backend: str,
    make_inventory: Callable[[str], Inventory],
    make_sandbox: Callable[..., Sandbox],
    build_agent: Callable[..., Agent],
    state_url: Callable[[str], str],
    tmp_path: Path,
) -> None:
    inventory = make_inventory("sqlite")
    slots = {s.slot_id: s for s in seed_tours(inventory, first_day())}
    sandbox = make_sandbox()
    url = state_url(backend)
    dying = build_agent("dying", base_url=sandbox.url, source_url=inventory.url, state_url=url)
    baseline(dying, sandbox)

    inventory.update_slot(101, vacancies=33)
    dying.scan()
    lease_s = dying.config.settings.delivery.lease
    # The process claims the notify and dies before sending it.
    (stale,) = dying.store.queue.claim(dying.clock.now(), limit=50, lease_s=lease_s)
    assert stale.payload is not None
    assert stale.payload["vacancies"] == 33

    inventory.update_slot(101, vacancies=32)
    dying.scan()  # the leased row is not touched: the newer state gets a row of its own
    assert [e.payload["vacancies"] for e in dying.store.admin.entries() if e.payload] == [33, 32]

    # Another agent, once the lease has run out.
    later_clock = ShiftedClock()
    later = build_agent(
        "later",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=url,
        clock=later_clock,
    )
    later.clock.now()  # on a shared store: the database's clock, read once
    later_clock.offset = timedelta(seconds=lease_s + 5)
    drained(later)

    assert [(c.status, c.body) for c in notifies(sandbox)] == [
        (200, expected_view(inventory, slots)["101"])
    ]
    assert later.store.admin.entries() == []
    assert not dying.store.queue.complete(stale)


# -- 8. the scanner lease -----------------------------------------------------------------


@pytest.mark.parametrize("backend", SHARED_BACKENDS)
def test_two_agents_on_a_shared_store_take_turns_scanning_through_the_lease(
    backend: str,
    make_inventory: Callable[[str], Inventory],
    make_sandbox: Callable[..., Sandbox],
    build_agent: Callable[..., Agent],
    state_url: Callable[[str], str],
) -> None:
    inventory = make_inventory("sqlite")
    seed_tours(inventory, first_day())
    sandbox = make_sandbox()
    url = state_url(backend)
    one = build_agent("one", base_url=sandbox.url, source_url=inventory.url, state_url=url)
    two = build_agent("two", base_url=sandbox.url, source_url=inventory.url, state_url=url)
    assert one.identity != two.identity

    first = one.poll()
    assert first is not None
    assert first.baseline
    assert two.poll() is None
    inventory.update_slot(101, vacancies=21)
    assert two.poll() is None  # the change waits for the holder, not for this agent
    assert len(two.store.admin.entries()) == 1  # only the baseline trigger
    lease_s = two.config.settings.state.scanner_lease
    held = two.store.coordination.lease(SCANNER)
    assert held is not None
    assert held.holder == one.identity

    now = two.clock.now()
    # While the holder's lease runs, nobody else gets it, even a little later.
    later = now + timedelta(seconds=lease_s / 2)
    assert two.store.coordination.hold(SCANNER, two.identity, later, lease_s) is None
    # The holder stops renewing: once its lease has run out, the other takes over.
    aged = now + timedelta(seconds=lease_s + 5)
    assert two.store.coordination.hold(SCANNER, two.identity, aged, lease_s) == "taken"
    assert one.poll() is None
    took_over = two.poll()
    assert took_over is not None
    assert (took_over.baseline, took_over.slots_changed) == (False, 1)
    assert one.poll() is None
    held = two.store.coordination.lease(SCANNER)
    assert held is not None
    assert held.holder == two.identity
    assert [e.kind for e in one.store.admin.entries()] == ["trigger", "notify"]


@pytest.mark.parametrize("backend", SHARED_BACKENDS)
def test_an_agent_taking_the_scanner_lease_back_diffs_every_row_the_full_way_again(
    backend: str,
    make_inventory: Callable[[str], Inventory],
    make_sandbox: Callable[..., Sandbox],
    build_agent: Callable[..., Agent],
    state_url: Callable[[str], str],
) -> None:
    """A poll skips rows the previous poll handled as they are; after another agent held the
    lease, the store may hold newer states than those rows, so nothing is skipped."""
    inventory = make_inventory("sqlite")
    seed_tours(inventory, first_day())
    inventory.track_updates()
    sandbox = make_sandbox()
    url = state_url(backend)
    one_clock, two_clock = ShiftedClock(), ShiftedClock()
    incremental = {"slots_changed_query": SLOTS_CHANGED_QUERY}
    one, two = (
        build_agent(name, base_url=sandbox.url, source_url=inventory.url, state_url=url,
                    clock=clock, source=incremental)
        for name, clock in (("one", one_clock), ("two", two_clock))
    )  # fmt: skip

    first = one.poll()
    assert first is not None
    assert first.baseline
    inventory.update_slot(101, vacancies=12)
    seen = one.poll()
    assert seen is not None
    assert seen.notifies == 1  # one remembers 101 at 12 vacancies
    drained(one)

    # One stalls past its lease; two takes over and records a booking.
    lease = timedelta(seconds=one.config.settings.state.scanner_lease + 5)
    two.clock.now()  # the database's clock, read once: from here on time passes for two
    two_clock.offset = lease
    inventory.update_slot(101, vacancies=11)
    taken = two.poll()
    assert taken is not None
    assert taken.notifies == 1
    drained(two)
    # The booking is cancelled: 101 is back to exactly what one saw last.
    inventory.update_slot(101, vacancies=12)
    one_clock.offset = 3 * lease  # two's lease has run out in turn
    back = one.poll()
    assert back is not None
    assert (back.slots_unchanged, back.notifies) == (0, 1)
    drained(one)
    assert [c.body["vacancies"] for c in notifies(sandbox) if c.body] == [12, 11, 12]


# -- 9. one agent per SQLite state file ------------------------------------------------------


def test_a_second_agent_on_the_same_sqlite_state_file_is_refused_until_the_first_closes(
    make_inventory: Callable[[str], Inventory], tmp_path: Path
) -> None:
    inventory = make_inventory("sqlite")
    state = tmp_path / "shared-state.db"

    def config(name: str) -> Any:
        return load_config(
            write_config(
                tmp_path,
                name=name,
                base_url="http://127.0.0.1:9",
                integration_id=INTEGRATION_ID,
                secret=SECRET,
                source_url=inventory.url,
                state_url=f"sqlite:///{state}",
            )
        )

    first, second = Agent(config("first")), Agent(config("second"))
    try:
        first.open(exclusive=True)
        with pytest.raises(StateError) as refused:
            second.open(exclusive=True)
        message = str(refused.value)
        assert str(state) in message
        assert "another seyaha-agent" in message
        assert "is already using the state store" in message
        assert "Stop the other one" in message
        assert SECRET not in message

        first.close()
        second.open(exclusive=True)
        assert not second.store.fingerprints.is_baselined()
    finally:
        first.close()
        second.close()


# -- 10. slow answers ------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_slow_answers_are_sent_once_and_never_overlap_for_one_slot(
    backend: str,
    make_inventory: Callable[[str], Inventory],
    serve: Callable[[Answer], str],
    build_agent: Callable[..., Agent],
    state_url: Callable[[str], str],
) -> None:
    """Each answer takes 0.5 s, so a batch of 24 takes 12 s in series while a lease lasts
    2.5 s: a batch sent under one unrenewed lease was taken again by idle workers while its
    calls were still in flight (120 changes became 144 calls at 1.5-2.5 s answers)."""
    inventory = make_inventory("sqlite")
    day = first_day()
    inventory.add_product(1, "Cruise", 4500, {"1-a": "Sunset"})
    slot_ids = list(range(1001, 1025))
    for number, slot_id in enumerate(slot_ids):
        inventory.add_slot(slot_id, "1-a", at(day, 9, number), capacity=30, vacancies=30)
    lock = threading.Lock()
    in_flight: Counter[str] = Counter()
    most_in_flight: Counter[str] = Counter()
    notified: list[str] = []

    def slow(handler: BaseHTTPRequestHandler) -> None:
        body = json.loads(getattr(handler, "request_body", b"") or b"{}")
        slot = str(body.get("availabilityId", "trigger"))
        with lock:
            in_flight[slot] += 1
            most_in_flight[slot] = max(most_in_flight[slot], in_flight[slot])
        time.sleep(0.5)
        with lock:
            in_flight[slot] -= 1
            if slot != "trigger":
                notified.append(slot)
        data = {"updated": True} if slot != "trigger" else {"synced": 1, "skipped": False}
        answer = json.dumps({"success": 1, "data": data}).encode()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(answer)))
        handler.end_headers()
        handler.wfile.write(answer)

    agent = build_agent(
        "slow",
        base_url=serve(slow),
        source_url=inventory.url,
        state_url=state_url(backend),
        delivery={
            "lease": 2.5,
            "timeout": 1.0,
            "connect_timeout": 0.2,
            "concurrency": 4,
            "rate_limit": 0,
        },
    )
    assert agent.scan().baseline
    drained(agent)
    for slot_id in slot_ids:
        inventory.update_slot(slot_id, vacancies=29)
    assert agent.scan().notifies == len(slot_ids)
    drained(agent)

    assert sorted(notified) == sorted(str(s) for s in slot_ids)  # each once, none again
    assert max(most_in_flight.values()) == 1


def test_a_retry_goes_out_when_it_is_due_not_at_the_next_idle_wake_up(
    make_inventory: Callable[[str], Inventory],
    serve: Callable[[Answer], str],
    build_agent: Callable[..., Agent],
    state_url: Callable[[str], str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The log said "retry in 0.1 s" and the retry came about a second later: the worker
    slept its whole idle wait (IDLE_WAIT_S) past the retry it had just scheduled, or past one
    that fell due while its look at the queue was under way (a slow store makes that look
    outlast the retry's delay; every look here takes slow_claim_s). The times are stretched
    (an idle wait of 3 s, a retry 1 s after the failure) so that a loaded machine, slow to
    get from the failure to the next look, still plays the same scenario."""
    idle_s = 3.0
    monkeypatch.setattr(worker_module, "IDLE_WAIT_S", idle_s)
    inventory = make_inventory("sqlite")
    seed_tours(inventory, first_day())
    attempts: list[float] = []

    def busy_once(handler: BaseHTTPRequestHandler) -> None:
        attempts.append(time.monotonic())
        status, answer = (
            (503, b'{"success":0,"error":"Service Unavailable","message":"busy"}')
            if len(attempts) == 1
            else (200, b'{"success":1,"data":{"synced":8,"skipped":false}}')
        )
        handler.send_response(status)
        handler.send_header("Content-Length", str(len(answer)))
        handler.end_headers()
        handler.wfile.write(answer)

    agent = build_agent(
        "retry",
        base_url=serve(busy_once),
        source_url=inventory.url,
        state_url=state_url("sqlite"),
        delivery={"backoff_initial": 1.0, "backoff_max": 1.0, "concurrency": 1},
    )
    # The jitter at its top: the retry falls due 1 s after the failure, after the next look
    # has read the time (with a jitter near 0, that look finds it and none is missed).
    agent.deliverer.rand = lambda: 1.0
    slow_claim_s = 1.2  # longer than the retry's whole delay (1 s + margin)
    in_claims: list[tuple[float, float]] = []
    claim = agent.store.queue.claim

    def slow_claim(*args: Any, **kwargs: Any) -> list[OutboxMessage]:
        began = time.monotonic()
        if attempts:  # after the failure: the look that misses the retry falling due
            time.sleep(slow_claim_s)
        try:
            return claim(*args, **kwargs)
        finally:
            in_claims.append((began, time.monotonic()))

    agent.store.queue.claim = slow_claim  # type: ignore[method-assign]
    assert agent.scan().baseline
    drained(agent)

    assert len(attempts) == 2
    first, second = attempts
    # What the store itself took between the two calls is not the worker's idling.
    claiming = sum(
        min(end, second) - max(began, first)
        for began, end in in_claims
        if end > first and began < second
    )
    assert claiming >= 2 * slow_claim_s  # the look that missed the retry, and the one that found it
    # The retry was due 1 s after the failure, within the missed look: no idle wait of its own.
    assert second - first - claiming < idle_s / 2


# -- 11. a state store whose connections die ---------------------------------------------


def _kill_state_connections(url: str) -> int:
    """End every connection the agent holds to its state store, as a failover or an
    idle-connection reaper would; returns how many were ended."""
    admin = sa.create_engine(url)
    try:
        with admin.connect() as conn:
            if admin.dialect.name == "postgresql":
                return len(
                    conn.execute(
                        sa.text(
                            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                            "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                            "AND application_name = 'seyaha-agent-state'"
                        )
                    ).all()
                )
            ids = conn.execute(
                sa.text(
                    "SELECT id FROM information_schema.processlist "
                    "WHERE db = DATABASE() AND id <> CONNECTION_ID()"
                )
            ).scalars()
            killed = 0
            for connection_id in list(ids):
                with suppress(sa.exc.DBAPIError):  # it may have ended by itself meanwhile
                    conn.execute(sa.text(f"KILL CONNECTION {int(connection_id)}"))
                    killed += 1
            return killed
    finally:
        admin.dispose()


@pytest.mark.parametrize("backend", SHARED_BACKENDS)
def test_killed_state_store_connections_lose_nothing_and_send_nothing_twice(
    backend: str,
    make_inventory: Callable[[str], Inventory],
    make_sandbox: Callable[..., Sandbox],
    build_agent: Callable[..., Agent],
    state_url: Callable[[str], str],
) -> None:
    """3,000 notifies became 3,083 calls with a MariaDB store whose connections were killed:
    successes whose removal failed were dropped from memory and sent again once their lease
    ran out, about 60 s later."""
    inventory = make_inventory("sqlite")
    day = first_day()
    inventory.add_product(1, "Cruise", 4500, {"1-a": "Sunset"})
    slot_ids = list(range(2000, 2300))
    for number, slot_id in enumerate(slot_ids):
        inventory.add_slot(slot_id, "1-a", at(day, 9, number % 300), capacity=50, vacancies=50)
    sandbox = make_sandbox()
    url = state_url(backend)
    agent = build_agent(
        "killed",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=url,
        delivery={"batch_size": 20, "rate_limit": 0},
    )
    baseline(agent, sandbox)
    for slot_id in slot_ids:
        inventory.update_slot(slot_id, vacancies=49)
    assert agent.scan().notifies == len(slot_ids)

    kills: list[int] = []
    stop = threading.Event()

    def killer() -> None:
        while not stop.wait(0.15) and len(notifies(sandbox, 200)) < len(slot_ids) * 0.9:
            kills.append(_kill_state_connections(url))

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        result = agent.drain(WAIT_S)
    finally:
        stop.set()
        thread.join(10)
    # Nothing waited out a lease (60 s): every message went out within the drain.
    assert (result.timed_out, result.stats.pending) == (False, 0), result

    assert sum(kills) > 0
    sent = Counter(slot_of(c) for c in notifies(sandbox, 200))
    assert set(sent) == {str(s) for s in slot_ids}
    assert sum(sent.values()) <= 1.05 * len(slot_ids), sent.most_common(5)
