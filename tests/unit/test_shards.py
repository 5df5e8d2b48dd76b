"""How agents sharing a platform divide its shards (agent/shards.py): one round at a time,
each agent deciding alone from the leases it reads, as the real ones do."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.shards import (
    ALL_SHARDS,
    SHARDS,
    LeaseRow,
    Ownership,
    balance,
    member_lease,
    shard_lease,
    shard_of,
    shard_of_lease,
    share,
)

LEASE_MS = 15_000


class Leases:
    """The seyaha_leases table of a store, as agents' rounds change it (see
    agent.sharing.Sharing.round, which does the same against the database)."""

    def __init__(self) -> None:
        self.shards: dict[int, LeaseRow] = {}
        self.members: dict[str, int] = {}

    def round(self, agent: str, now_ms: int) -> frozenset[int]:
        alive = {a for a, until in self.members.items() if until > now_ms}
        decided = balance(agent, now_ms, self.shards, alive)
        for s in decided.give_back:
            del self.shards[s]
        until = now_ms + LEASE_MS
        self.members[agent] = until
        for s in decided.keep | decided.take:
            row = self.shards.get(s)
            if row is None or row.holder == agent or row.until_ms <= now_ms:
                self.shards[s] = LeaseRow(agent, until)
        return self.held(agent, now_ms)

    def held(self, agent: str, now_ms: int) -> frozenset[int]:
        return frozenset(
            s for s, row in self.shards.items() if row.holder == agent and row.until_ms > now_ms
        )


def settle(leases: Leases, agents: list[str], now_ms: int, rng: random.Random) -> int:
    """Rounds (every agent once per round, in a random order) until two rounds in a row
    change nothing (a newcomer is seen by the others only from the round after its first);
    returns how many rounds it took."""
    quiet = 0
    for rounds in range(1, 20):
        before = {s: r.holder for s, r in leases.shards.items()}
        order = list(agents)
        rng.shuffle(order)
        for agent in order:
            leases.round(agent, now_ms)
        quiet = quiet + 1 if before == {s: r.holder for s, r in leases.shards.items()} else 0
        if quiet == 2:
            return rounds
    raise AssertionError("the shards never settled")


def assert_divided(leases: Leases, agents: list[str], now_ms: int) -> None:
    held = {a: leases.held(a, now_ms) for a in agents}
    union = frozenset().union(*held.values())
    assert union == ALL_SHARDS, "every shard is scanned"
    assert sum(len(h) for h in held.values()) == SHARDS, "by one agent only"
    for agent, shards in held.items():
        assert len(shards) <= share(len(agents)), agent
        assert len(shards) >= SHARDS - share(len(agents)) * (len(agents) - 1), agent


def test_one_agent_takes_every_shard_in_its_first_round() -> None:
    leases = Leases()
    assert leases.round("a", 0) == ALL_SHARDS


@given(agents=st.integers(1, 9), seed=st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_agents_that_join_one_by_one_settle_on_an_even_division(agents: int, seed: int) -> None:
    rng = random.Random(seed)
    leases = Leases()
    names = [f"agent-{n}" for n in range(agents)]
    for joined in range(1, agents + 1):
        # A round per lease / 3: a newcomer has its share within a few of them.
        assert settle(leases, names[:joined], 0, rng) <= 5
        assert_divided(leases, names[:joined], 0)


@given(agents=st.integers(2, 8), seed=st.integers(0, 2**32))
@settings(max_examples=60, deadline=None)
def test_the_shards_of_a_dead_agent_are_taken_in_one_round_after_its_leases_run_out(
    agents: int, seed: int
) -> None:
    rng = random.Random(seed)
    leases = Leases()
    names = [f"agent-{n}" for n in range(agents)]
    settle(leases, names, 0, rng)
    dead = rng.choice(names)
    survivors = [n for n in names if n != dead]
    # The dead agent renews nothing more; the others' rounds go on every lease / 3.
    now = 0
    for _ in range(3):
        now += LEASE_MS // 3
        for agent in survivors:
            leases.round(agent, now)
    now += 1  # the dead agent's leases have now run out
    for agent in survivors:
        leases.round(agent, now)
    assert_divided(leases, survivors, now)


def test_an_agent_with_more_than_its_share_gives_back_only_what_others_lack() -> None:
    rows = {s: LeaseRow("a", 10_000) for s in range(SHARDS)}
    decided = balance("a", 0, rows, {"a", "b"})
    assert len(decided.give_back) == SHARDS // 2
    assert decided.keep | decided.give_back == ALL_SHARDS
    # 24 shards are free: the newcomer lacks 8 more for its 32.
    rows = {s: LeaseRow("a", 10_000) for s in range(40)}
    decided = balance("a", 0, rows, {"a", "b"})
    assert len(decided.give_back) == 8
    assert decided.keep | decided.give_back == frozenset(range(40))
    # Three agents, a share of 22: "a" holds 23, one more than its share, and gives back
    # that one; "b" (22) keeps its own.
    holders = ["a"] * 23 + ["b"] * 22 + ["c"] * 19
    rows = {s: LeaseRow(h, 10_000) for s, h in enumerate(holders)}
    assert len(balance("a", 0, rows, {"a", "b", "c"}).give_back) == 1
    assert balance("b", 0, rows, {"a", "b", "c"}).give_back == frozenset()


def test_a_lease_that_ran_out_is_free_whoever_held_it() -> None:
    rows = {s: LeaseRow("gone", 1_000) for s in range(SHARDS)}
    assert balance("a", 1_000, rows, set()).take == ALL_SHARDS
    assert balance("a", 999, rows, set()).take == frozenset()


def test_an_agent_never_takes_a_running_lease_of_another() -> None:
    rows = {s: LeaseRow("b", 10_000) for s in range(10)}
    decided = balance("a", 0, rows, {"b"})
    assert not decided.take & set(range(10))


@pytest.mark.parametrize(
    ("integration", "expected"),
    [
        # CRC-32 of the id's bytes: fixed across processes and hosts (hash() is not).
        ("a1" * 12, 0xD80C8767 % SHARDS),
        ("", 0),
    ],
)
def test_an_integration_falls_in_the_same_shard_on_every_agent(
    integration: str, expected: int
) -> None:
    import zlib

    assert zlib.crc32(integration.encode()) % SHARDS == shard_of(integration)
    assert shard_of(integration) == expected


def test_lease_names_fit_the_leases_table() -> None:
    assert shard_of_lease(shard_lease(7)) == 7
    assert shard_of_lease("scanner") is None
    assert shard_of_lease("shard:99") is None
    assert len(member_lease("h" * 255 + ":1:abcdef12")) <= 64


def test_an_ownership_of_some_shards_owns_only_their_integrations() -> None:
    ids = [f"{n:024x}" for n in range(200)]
    some = Ownership(frozenset(range(0, SHARDS, 2)))
    assert {i for i in ids if some.owns(i)} == {i for i in ids if shard_of(i) % 2 == 0}
    assert all(Ownership().owns(i) for i in ids)
    assert not any(Ownership(frozenset()).owns(i) for i in ids)
