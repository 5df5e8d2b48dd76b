"""Pure: how agents sharing one state store divide a platform's integrations.

Integrations fall into SHARDS shards by a hash of their id. Each shard is a lease in the
state store (`shard:NN`), held by one agent at a time and renewed on the database's clock;
an agent scans only the integrations of the shards it holds. Every agent also holds a
membership lease (`agent:<identity>`), renewed with its shards, so that each can count the
agents alive and aim at an even share: ceil(SHARDS / agents).

`balance` decides one round for one agent: which shards to take (free, or left to run out
by an agent that died) and which to give back (more than its share while another agent has
less). Rounds run every lease / 3 on every agent, so a dead agent's shards are taken within
lease + lease / 3, and a new agent gets its share within two rounds of the others.
"""

from __future__ import annotations

import hashlib
import math
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SHARDS = 64
"""Shards the integrations are divided into: enough for an even share among a dozen agents
(64 / 3 = 21 or 22 each), few enough that an agent renews all of its leases in one short
transaction and records one change cursor per shard it holds."""

SHARD_PREFIX = "shard:"
MEMBER_PREFIX = "agent:"

ALL_SHARDS: frozenset[int] = frozenset(range(SHARDS))


def shard_of(integration_id: str) -> int:
    """The shard of an integration: stable across agents, hosts and versions of Python
    (CRC-32 of the id's bytes, not hash(), which is salted per process)."""
    return zlib.crc32(integration_id.encode("utf-8")) % SHARDS


def shard_lease(shard: int) -> str:
    return f"{SHARD_PREFIX}{shard:02d}"


def member_lease(identity: str) -> str:
    """The membership lease of an agent (its identity is the lease's holder; the name is a
    digest of it, as a host name can be longer than a lease name)."""
    return MEMBER_PREFIX + hashlib.sha256(identity.encode("utf-8")).hexdigest()[:32]


def shard_of_lease(name: str) -> int | None:
    """The shard a lease name stands for; None for another kind of lease."""
    if not name.startswith(SHARD_PREFIX):
        return None
    number = name.removeprefix(SHARD_PREFIX)
    return int(number) if number.isdigit() and int(number) < SHARDS else None


@dataclass(frozen=True)
class Ownership:
    """The shards one agent scans."""

    shards: frozenset[int] = ALL_SHARDS

    @property
    def everything(self) -> bool:
        return self.shards == ALL_SHARDS

    def owns(self, integration_id: str) -> bool:
        return self.everything or shard_of(integration_id) in self.shards

    @property
    def leases(self) -> tuple[str, ...]:
        """The lease names of these shards, in the order agents lock them."""
        return tuple(shard_lease(s) for s in sorted(self.shards))


@dataclass(frozen=True)
class LeaseRow:
    holder: str
    until_ms: int


@dataclass(frozen=True)
class Round:
    """What one agent does in one round: the shards it takes and those it gives back. The
    shards it holds and keeps are renewed."""

    keep: frozenset[int]
    take: frozenset[int]
    give_back: frozenset[int]


def share(agents: int) -> int:
    """The shards each agent aims at when `agents` are alive."""
    return math.ceil(SHARDS / max(1, agents))


def balance(
    me: str,
    now_ms: int,
    shards: Mapping[int, LeaseRow],
    members: Iterable[str],
) -> Round:
    """One round for agent `me`.

    `shards`: the shard leases as stored (a shard without a row is free); `members`: the
    identities whose membership lease has not run out (`me` counts whatever it says). A shard
    whose lease ran out is free, whoever held it last. An agent that holds more than its share
    gives back the excess only while other agents are short and there are not enough free
    shards for them: shards never go unscanned for the sake of balance.
    """
    alive = set(members) | {me}
    target = share(len(alive))
    live = {s: row for s, row in shards.items() if row.until_ms > now_ms}
    mine = frozenset(s for s, row in live.items() if row.holder == me)
    free = sorted((s for s in range(SHARDS) if s not in live), key=lambda s: _preference(me, s))
    held: dict[str, int] = {agent: 0 for agent in alive}
    for row in live.values():
        if row.holder in held:
            held[row.holder] += 1
    take = frozenset(free[: max(0, target - len(mine))])
    give_back: frozenset[int] = frozenset()
    if len(mine) > target:
        short = sum(max(0, target - n) for agent, n in held.items() if agent != me)
        unmet = short - len(free)
        if unmet > 0:
            excess = sorted(mine, key=lambda s: _preference(me, s), reverse=True)
            give_back = frozenset(excess[: min(len(mine) - target, unmet)])
    return Round(keep=mine - give_back, take=take, give_back=give_back)


def _preference(me: str, shard: int) -> int:
    """Agents prefer different free shards (a hash of agent and shard), so that two agents
    taking shards at the same moment rarely reach for the same ones."""
    return zlib.crc32(f"{me}/{shard}".encode())
