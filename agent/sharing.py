"""An agent's part in dividing a platform among the agents that share its state store.

Each round (every scanner_lease / 3, and before the first scan) reads the shard and
membership leases, lets agent.shards.balance decide what to take and give back, and renews
what it keeps, all on the database's clock. The shards held after the round are the ones
this agent scans until the next; its scans are recorded only while it still holds them
(store.coordination.Fence), so a shard changing hands mid-scan costs that scan, never a
change recorded twice or by two agents.
"""

from __future__ import annotations

import logging
import threading

from agent.clock import Clock, to_epoch_ms
from agent.logs import event
from agent.metrics import Metrics
from agent.shards import (
    MEMBER_PREFIX,
    SHARD_PREFIX,
    SHARDS,
    LeaseRow,
    Ownership,
    balance,
    member_lease,
    shard_lease,
    shard_of_lease,
)
from agent.store.coordination import Coordination

log = logging.getLogger("agent.sharing")


class Sharing:
    def __init__(
        self,
        coordination: Coordination,
        identity: str,
        clock: Clock,
        lease_s: float,
        metrics: Metrics,
    ) -> None:
        self.coordination = coordination
        self.identity = identity
        self.clock = clock
        self.lease_s = lease_s
        self.metrics = metrics
        self.ownership: Ownership | None = None
        """The shards held after the last round; None before the first."""
        self.agents = 0
        """Agents alive at the last round (this one included)."""
        self._lock = threading.Lock()

    def round(self, *, member: bool = True) -> Ownership:
        """Take, keep and give back shards (see agent.shards.balance); returns what this
        agent holds now. Without `member` (a one-shot command beside running agents), it
        takes only shards nobody holds and does not count as an agent: the running ones give
        nothing back for it, which they would have to take again once it exits."""
        with self._lock:
            before = self.ownership
            now = self.clock.now()
            now_ms = to_epoch_ms(now)
            shards: dict[int, LeaseRow] = {}
            for name, (holder, until_ms) in self.coordination.leases_named(SHARD_PREFIX).items():
                shard = shard_of_lease(name)
                if shard is not None:
                    shards[shard] = LeaseRow(holder, until_ms)
            members = {
                holder
                for holder, until_ms in self.coordination.leases_named(MEMBER_PREFIX).values()
                if until_ms > now_ms
            }
            decided = balance(self.identity, now_ms, shards, members)
            if decided.give_back:
                # Scanning them stops first (the caller takes the new ownership at its next
                # scan turn; a scan under way is refused at its commit by the fence).
                self.ownership = Ownership(decided.keep)
                self.coordination.give_up_all(
                    [shard_lease(s) for s in decided.give_back], self.identity
                )
            names = [shard_lease(s) for s in decided.keep | decided.take]
            held = self.coordination.hold_all(
                [member_lease(self.identity), *names] if member else names,
                self.identity,
                now,
                self.lease_s,
            )
            owned = frozenset(s for s in range(SHARDS) if shard_lease(s) in held)
            self.ownership = Ownership(owned)
            self.agents = len(members | {self.identity})
            self.metrics.shards_scanned.set(len(owned))
            if before is None or before.shards != owned:
                gained = len(owned - (before.shards if before else frozenset()))
                lost = len((before.shards if before else frozenset()) - owned)
                event(
                    log,
                    logging.INFO,
                    "scan.shards",
                    f"this agent scans {len(owned)} of {SHARDS} shards of the platform's "
                    f"integrations ({self.agents} agent(s) share them; took {gained}, gave "
                    f"back or lost {lost})",
                    shards=len(owned),
                    agents=self.agents,
                )
            return self.ownership

    def leave(self) -> None:
        """Give every lease back at once (a clean stop): the others take the shards at their
        next round instead of waiting for the leases to run out."""
        with self._lock:
            self.coordination.give_up_all(
                [member_lease(self.identity), *(shard_lease(s) for s in range(SHARDS))],
                self.identity,
            )
            self.ownership = Ownership(frozenset())
            self.metrics.shards_scanned.set(0)
