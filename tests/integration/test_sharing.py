"""Several agents, one platform, one PostgreSQL or MariaDB state store: they divide the
integrations by shard (agent/shards.py, agent/sharing.py), each integration scanned by
exactly one of them, every agent delivering.

Real databases (the platform's inventory and the state store on the same server), the real
sandbox over HTTP checking each integration's secret. Agents are driven a step at a time
(a round of the shards, a poll, a delivery step); an agent that dies is one that stops
renewing: its leases are aged in the database, as its death would leave them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from agent.app import Agent
from agent.clock import Clock
from agent.config import load_config
from agent.errors import StateError
from agent.model import CatalogDiff, SlotDiff
from agent.sandbox import Sandbox
from agent.shards import SHARDS, Ownership, shard_lease, shard_of, share
from agent.store import LeaseLost
from agent.store.coordination import Fence
from tests.integration.inventory import SERVER_PARAMS, at, first_day
from tests.integration.platform import (
    SLOTS_CHANGED_QUERY,
    Platform,
    write_platform_config,
    write_secrets,
)
from tests.integration.test_shared_store import SKEW, SkewedClock

INTEGRATIONS = [f"{0x5E7A00 + n:024x}" for n in range(16)]
"""Sixteen suppliers' integration ids: each agent of two scans some of them (the chance that
one of two agents gets none of sixteen is 2 in 65,536 per division, and each test checks)."""

SECRETS = {integration: f"{n:02d}" * 32 for n, integration in enumerate(INTEGRATIONS)}

WAIT_S = 60.0
"""A ceiling for delivery, never an expectation."""


class World:
    def __init__(self, platform: Platform, state_url: str, sandbox: Sandbox, tmp: Path) -> None:
        self.platform = platform
        self.state_url = state_url
        self.sandbox = sandbox
        self.tmp = tmp
        self.agents: list[Agent] = []
        self.secrets = write_secrets(tmp / "secrets", SECRETS)

    def agent(self, clock: Clock | None = None) -> Agent:
        """Another agent with the same configuration (its own file, the same content); with
        `clock`, on a host whose clock is that one."""
        path = write_platform_config(
            self.tmp,
            name=f"agent-{len(self.agents)}",
            base_url=self.sandbox.url,
            source_url=self.platform.url,
            state_url=self.state_url,
            secrets_dir=self.secrets,
            slots_changed_query=SLOTS_CHANGED_QUERY,
            delivery={"backoff_initial": 0.05},
            # Polls read one second behind the cursor, not five: a test of the cursor
            # handed over with a shard waits that long, not more.
            source={"cursor_overlap": 1.0},
        )
        agent = Agent(load_config(path), clock=clock)
        self.agents.append(agent)
        agent.open()
        return agent

    def close(self) -> None:
        for agent in self.agents:
            agent.close()


@pytest.fixture
def world(
    request: pytest.FixtureRequest, new_database: Callable[[str], str], tmp_path: Path
) -> Iterator[World]:
    backend = request.param
    platform = Platform(new_database(backend))
    platform.track_updates()
    sandbox = Sandbox(secrets=SECRETS.get, port=0).start()
    made = World(platform, new_database(backend), sandbox, tmp_path)
    yield made
    made.close()
    sandbox.stop()
    platform.close()


def seed(platform: Platform) -> None:
    """A product with two slots per integration, and a supplier with no integration."""
    day = first_day()
    for n, integration in enumerate(INTEGRATIONS, start=1):
        platform.supplier(n, integration)
        platform.product(f"p{n}", n)
        platform.slot(f"s{n}a", f"p{n}", at(day, 9))
        platform.slot(f"s{n}b", f"p{n}", at(day, 11))
    platform.supplier(99, None)
    platform.product("p99", 99)
    platform.slot("s99a", "p99", at(day, 9))


def number(integration: str) -> int:
    return INTEGRATIONS.index(integration) + 1


def settle(agents: list[Agent]) -> None:
    """Rounds until the shards are divided evenly (each round once per agent): none holds
    more than its share, and all of them are held."""
    most = share(len(agents))
    for _ in range(6):
        for agent in agents:
            assert agent.sharing is not None
            agent.sharing.round()
        held = [
            len(a.sharing.ownership.shards) for a in agents if a.sharing and a.sharing.ownership
        ]
        if (
            sum(held) == SHARDS
            and max(held) <= most
            and min(held) >= SHARDS - most * (len(agents) - 1)
        ):
            return
    raise AssertionError(f"the shards were not divided evenly: {held}")


def owned_by(agent: Agent) -> list[str]:
    assert agent.sharing is not None
    assert agent.sharing.ownership is not None
    mine = [i for i in INTEGRATIONS if agent.sharing.ownership.owns(i)]
    assert mine, "a division gave this agent none of the sixteen integrations"
    return mine


def deliver_all(agents: list[Agent], sandbox: Sandbox) -> None:
    """Every agent delivers, a step each in turn, until the outbox has nothing waiting."""
    deadline = time.monotonic() + WAIT_S
    store = agents[0].store
    while store.admin.stats().pending:
        assert time.monotonic() < deadline, "delivery did not get there in time"
        if sum(a.deliverer.step() for a in agents) == 0:
            time.sleep(0.05)


def notified(sandbox: Sandbox) -> list[tuple[str, str]]:
    with sandbox.lock:
        return sorted(
            (c.integration, (c.body or {}).get("availabilityId", ""))
            for c in sandbox.calls
            if c.endpoint == "notify"
        )


def triggered(sandbox: Sandbox) -> list[str]:
    with sandbox.lock:
        return sorted(c.integration for c in sandbox.calls if c.endpoint == "trigger")


def age_leases(world: World, holder: str, *, names: list[str] | None = None) -> None:
    """What an agent's death leaves after a lease: its leases ran out (until_ms in the past,
    on the store's clock)."""
    leases = sa.table(
        "seyaha_leases", sa.column("name"), sa.column("holder"), sa.column("until_ms")
    )
    engine = sa.create_engine(world.state_url)
    try:
        with engine.begin() as conn:
            query = sa.update(leases).where(leases.c.holder == holder).values(until_ms=0)
            if names is not None:
                query = query.where(leases.c.name.in_(names))
            conn.execute(query)
    finally:
        engine.dispose()


def baseline(world: World, agents: list[Agent]) -> None:
    """The first agent takes the platform's baseline under the scanner lease; then they
    divide the shards and deliver the baseline's triggers."""
    report = agents[0].poll()
    assert report is not None
    assert report.baseline
    assert report.triggers == len(INTEGRATIONS)
    settle(agents)
    deliver_all(agents, world.sandbox)
    assert triggered(world.sandbox) == sorted(INTEGRATIONS)
    world.sandbox.reset()


@pytest.mark.parametrize("world", SERVER_PARAMS, indirect=True)
def test_agents_divide_the_integrations_and_each_change_is_sent_once(world: World) -> None:
    seed(world.platform)
    a, b = world.agent(), world.agent()
    baseline(world, [a, b])
    assert a.sharing
    assert a.sharing.ownership
    assert b.sharing
    assert b.sharing.ownership
    assert a.sharing.ownership.shards.isdisjoint(b.sharing.ownership.shards)
    assert len(a.sharing.ownership.shards | b.sharing.ownership.shards) == SHARDS
    mine_a, mine_b = owned_by(a), owned_by(b)
    assert sorted(mine_a + mine_b) == sorted(INTEGRATIONS)

    # A booking in every integration: each agent's poll finds its own integrations' only.
    for n in range(1, len(INTEGRATIONS) + 1):
        world.platform.book(f"s{n}a", 3)
    report_a, report_b = a.poll(), b.poll()
    assert report_a is not None
    assert report_b is not None
    assert report_a.notifies == len(mine_a)
    assert report_b.notifies == len(mine_b)
    deliver_all([a, b], world.sandbox)
    assert notified(world.sandbox) == sorted((i, f"s{number(i)}a") for i in INTEGRATIONS)

    # Reconciliations by both find nothing more: neither takes the other's rows for gone.
    world.sandbox.reset()
    for agent in (a, b):
        full = agent.scan()
        assert (full.triggers, full.notifies) == (0, 0)
    # The row with no integration is reported by one agent only, not by every one.
    reports = [a.scan(), b.scan()]
    unroutable = [r for report in reports for r in report.skipped if r.key[0] == "p99"]
    assert sorted(r.query for r in unroutable) == ["catalog_query", "slots_query"]

    # A slot deleted in an integration of a's is closed by a alone.
    victim = mine_a[0]
    with world.platform.engine.begin() as conn:
        conn.execute(sa.text("DELETE FROM slots WHERE id = :id"), {"id": f"s{number(victim)}b"})
    assert b.scan().notifies == 0
    assert a.scan().notifies == 1
    deliver_all([a, b], world.sandbox)
    assert notified(world.sandbox) == [(victim, f"s{number(victim)}b")]


@pytest.mark.parametrize("world", SERVER_PARAMS, indirect=True)
def test_a_dead_agents_integrations_are_scanned_from_where_it_stopped(world: World) -> None:
    seed(world.platform)
    a, b = world.agent(), world.agent()
    baseline(world, [a, b])
    a.poll(), b.poll()
    theirs = owned_by(b)

    # A booking in b's integrations, read by a's polls (and left: not a's to send), never
    # by b's: b dies first. a's cursor moves past it; b's shards keep b's cursor.
    for integration in theirs:
        world.platform.book(f"s{number(integration)}b", 1)
    time.sleep(1.5)  # past the second every poll reads again behind its cursor
    report = a.poll()
    assert report is not None
    assert report.notifies == 0
    time.sleep(1.5)
    a.poll()
    age_leases(world, b.identity)

    # a's next round takes every shard; its next poll reads b's from b's cursor.
    assert a.sharing is not None
    assert a.sharing.round().everything
    report = a.poll()
    assert report is not None
    assert report.notifies == len(theirs)
    deliver_all([a], world.sandbox)
    assert notified(world.sandbox) == sorted((i, f"s{number(i)}b") for i in theirs)


@pytest.mark.parametrize("world", SERVER_PARAMS, indirect=True)
def test_a_scan_of_a_shard_taken_meanwhile_is_not_recorded(world: World) -> None:
    seed(world.platform)
    a, b = world.agent(), world.agent()
    baseline(world, [a, b])
    mine = owned_by(a)
    taken = shard_of(mine[0])
    # b takes one of a's shards once its lease ran out (a stalled past its lease).
    age_leases(world, a.identity, names=[shard_lease(taken)])
    held = b.store.coordination.hold_all(
        [shard_lease(taken)], b.identity, b.clock.now(), b.config.settings.state.scanner_lease
    )
    assert held == {shard_lease(taken)}

    world.platform.book(f"s{number(mine[0])}a", 2)
    pending = a.store.admin.stats().pending
    with pytest.raises(LeaseLost):
        a.poll()
    assert a.store.admin.stats().pending == pending, "nothing of that scan was recorded"

    # a's next round learns what it lost; the agents settle again, each scans what it holds
    # then, and the booking is sent once.
    assert a.sharing is not None
    assert taken not in a.sharing.round().shards
    settle([a, b])
    for agent in (a, b):
        assert agent.poll() is not None
    deliver_all([a, b], world.sandbox)
    assert notified(world.sandbox) == [(mine[0], f"s{number(mine[0])}a")]


@pytest.mark.parametrize("world", SERVER_PARAMS, indirect=True)
def test_a_product_moving_between_agents_integrations_triggers_both_once(
    world: World,
) -> None:
    seed(world.platform)
    a, b = world.agent(), world.agent()
    baseline(world, [a, b])
    x, y = owned_by(a)[0], owned_by(b)[0]
    world.platform.move(f"p{number(x)}", number(y))

    assert (a.scan().triggers, a.scan().notifies) == (0, 0)  # the rows are b's now
    report = b.scan()
    assert report.triggers == 2
    deliver_all([a, b], world.sandbox)
    assert triggered(world.sandbox) == sorted([x, y])
    moved = f"p{number(x)}"
    assert notified(world.sandbox) == [(y, f"s{number(x)}a"), (y, f"s{number(x)}b")]
    slots = b.store.fingerprints.lookup_slots(
        [(moved, "default", f"s{number(x)}a"), (moved, "default", f"s{number(x)}b")]
    )
    assert {s.integration_id for s in slots.values()} == {y}

    # Nothing more, whichever agent reconciles.
    world.sandbox.reset()
    for agent in (a, b, a):
        report = agent.scan()
        assert (report.triggers, report.notifies) == (0, 0)


@pytest.mark.parametrize("world", SERVER_PARAMS, indirect=True)
def test_a_clean_stop_hands_its_shards_over_at_once(world: World) -> None:
    seed(world.platform)
    a, b = world.agent(), world.agent()
    baseline(world, [a, b])
    theirs = owned_by(b)
    b.close()
    world.agents.remove(b)
    assert a.sharing is not None
    assert a.sharing.round().everything  # no lease to wait out
    world.platform.book(f"s{number(theirs[0])}a", 4)
    report = a.poll()
    assert report is not None
    assert report.notifies == 1


@pytest.mark.parametrize("world", SERVER_PARAMS, indirect=True)
def test_a_third_agent_joining_gets_a_share_and_nothing_is_scanned_twice(world: World) -> None:
    seed(world.platform)
    a, b = world.agent(), world.agent()
    baseline(world, [a, b])
    c = world.agent()
    settle([a, b, c])
    held = [a.sharing.ownership.shards for a in (a, b, c) if a.sharing and a.sharing.ownership]
    assert sum(len(h) for h in held) == SHARDS
    assert len(frozenset().union(*held)) == SHARDS
    for n in range(1, len(INTEGRATIONS) + 1):
        world.platform.book(f"s{n}b", 5)
    found = 0
    for agent in (a, b, c):
        report = agent.poll()
        assert report is not None
        found += report.notifies
    assert found == len(INTEGRATIONS)
    deliver_all([a, b, c], world.sandbox)
    assert notified(world.sandbox) == sorted((i, f"s{number(i)}b") for i in INTEGRATIONS)


@pytest.mark.parametrize("world", SERVER_PARAMS, indirect=True)
def test_an_agent_left_without_shards_records_nothing(world: World) -> None:
    agent = world.agent()
    nothing = Fence(agent.identity, ())
    with pytest.raises(LeaseLost):
        agent.store.commit_scan(CatalogDiff(), SlotDiff(), [], agent.clock.now(), scanner=nothing)


@pytest.mark.parametrize("world", SERVER_PARAMS, indirect=True)
def test_a_one_shot_command_beside_running_agents_takes_nothing_from_them(
    world: World,
) -> None:
    seed(world.platform)
    a, b = world.agent(), world.agent()
    baseline(world, [a, b])
    before = {agent.identity: agent.sharing.ownership for agent in (a, b) if agent.sharing}

    one_shot = world.agent()  # as `seyaha-agent once` would build it: no round of its own
    with pytest.raises(StateError, match="scan every shard"):
        one_shot.scan()
    # It does not count as an agent: the running ones give nothing back for it.
    for agent in (a, b):
        assert agent.sharing is not None
        assert agent.sharing.round() == before[agent.identity]


@pytest.mark.parametrize("world", SERVER_PARAMS, indirect=True)
def test_an_agent_whose_host_clock_is_minutes_ahead_takes_no_running_shard(
    world: World,
) -> None:
    """Leases run on the database's clock: an agent on a host ten minutes ahead sees the
    others' leases running, takes only its share as they give it back, and none is held
    twice; an agent ten minutes behind does not keep a shard past its lease."""
    seed(world.platform)
    a, b = world.agent(), world.agent()
    baseline(world, [a, b])
    ahead = world.agent(clock=SkewedClock(SKEW))
    assert ahead.sharing is not None
    assert ahead.sharing.round().shards == frozenset()  # every shard's lease runs
    settle([a, b, ahead])
    held = [x.sharing.ownership.shards for x in (a, b, ahead) if x.sharing and x.sharing.ownership]
    assert sum(len(h) for h in held) == SHARDS
    assert len(frozenset().union(*held)) == SHARDS

    # One more agent, behind: a has died; its shards go to the others once they ran out on
    # the database's clock, not on the late host's.
    behind = world.agent(clock=SkewedClock(-SKEW))
    age_leases(world, a.identity)
    settle([b, ahead, behind])
    survivors = [
        x.sharing.ownership.shards for x in (b, ahead, behind) if x.sharing and x.sharing.ownership
    ]
    assert sum(len(h) for h in survivors) == SHARDS
    assert len(frozenset().union(*survivors)) == SHARDS


@pytest.mark.parametrize("world", SERVER_PARAMS, indirect=True)
def test_a_reconciliation_whose_shard_changes_hands_midway_records_nothing_of_it(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reconciliation runs beside the polls, taking the scan turn only for moments; a
    shard taken from its agent in between stops it at its next turn: the change it read is
    recorded once, by the agent that holds the shard now."""
    seed(world.platform)
    a, b = world.agent(), world.agent()
    baseline(world, [a, b])
    a.poll(), b.poll()
    mine = owned_by(a)[0]
    taken = shard_of(mine)
    # A change no poll reads (updated_at left as it was): only a reconciliation finds it.
    with world.platform.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE slots SET vacancies = 7 WHERE id = :id"), {"id": f"s{number(mine)}a"}
        )

    def shard_taken_meanwhile() -> None:
        assert a.sharing is not None
        if taken not in a.sharing.ownership.shards:  # type: ignore[union-attr]
            return
        age_leases(world, a.identity, names=[shard_lease(taken)])
        lease_s = b.config.settings.state.scanner_lease
        b.store.coordination.hold_all([shard_lease(taken)], b.identity, b.clock.now(), lease_s)
        a.sharing.round()

    monkeypatch.setattr(a, "_give_way", shard_taken_meanwhile)
    assert a.full_scan() is None  # superseded
    assert a.store.admin.stats().pending == 0

    assert b.sharing is not None
    assert b.sharing.ownership is not None
    # What b holds now, as its next round would find it (a round might give one back to a).
    b.sharing.ownership = Ownership(b.sharing.ownership.shards | {taken})
    report = b.full_scan()
    assert report is not None
    assert report.notifies == 1
    deliver_all([a, b], world.sandbox)
    assert notified(world.sandbox) == [(mine, f"s{number(mine)}a")]
