"""Without a change query: a pass only when the source shows a commit since the last one.

With the two required queries only, every poll used to be a full pass: at 1M slots that is
the database's time every `poll_interval` while nothing changes, and a booking waited for the
pass that happened to run before the one that found it. Two databases tell cheaply whether
anything committed since a moment:
- MySQL/MariaDB keep, per table, the time of its last committed change
  (`information_schema.TABLES.UPDATE_TIME`: agent/source/update_times.py);
- PostgreSQL's snapshot says which transactions completed (`pg_current_snapshot()`:
  agent/source/xids.py).
The poll loop reads one of them every SENSE_EVERY_S and PassGate decides from it.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Protocol

SENSE_EVERY_S = 0.25
"""How often the poll loop reads the source's sign of commits while no pass is due."""

REDISCOVER_EVERY_S = 300.0
"""How often a sensor looks up again what to read (a view redefined to read another table)."""


class Sensed(Protocol):
    """One reading of a source's sign of commits."""

    def moved_since(self, before: Sensed) -> str | None:
        """What committed since `before` (taken before the last pass began), for the log;
        None: nothing that pass did not see."""
        ...

    def settling(self) -> str | None:
        """Why one more pass must follow the one this reading came before, though nothing
        moves afterwards (a commit the reading cannot tell apart from the last it saw)."""
        ...


class Sensor(Protocol):
    """Reads a source's sign of commits (see the module's doc)."""

    def discover(self) -> str:
        """Look up what to read; says what in a few words. SensorUnusable if it cannot
        tell when the queries' rows change."""
        ...

    def read(self) -> Sensed: ...

    def close(self) -> None: ...


class SensorUnusable(Exception):
    """The source's sign of commits cannot tell when the queries' rows change; says why."""


@dataclass(frozen=True)
class Due:
    """Why a pass starts now."""

    why: str
    moved: bool = False
    """Something committed since the last pass: the source changed, so the pass need not
    ask first whether anything did, and the next one keeps to poll_interval (see PassGate).
    False for the first pass, the fallback, a settling pass, a new scope."""


@dataclass
class PassGate:
    """When the poll loop of a source with a sensor runs a pass (pure: times are passed in).

    A pass is due when none ran yet, when the last one started `fallback_s` ago, when
    something committed since the reading before it, or when that reading asked for one
    more (Sensed.settling); never before the time the last one set (hold_until)."""

    fallback_s: float
    _not_before: float = -math.inf
    _passed: float | None = None
    _before: Sensed | None = field(default=None, repr=False)
    _scope: Hashable = None

    def due(self, monotonic: float, reading: Sensed, scope: Hashable = None) -> Due | None:
        """Why a pass starts now; None: not now. `scope` is what this agent scans (the
        scanner lease, a platform's shards): a pass is due when it differs from the last
        pass's, since what it now scans was another agent's to read."""
        if monotonic < self._not_before:
            return None
        if self._passed is None or self._before is None:
            return Due("no pass yet")
        if scope != self._scope:
            return Due("what this agent scans changed")
        if monotonic - self._passed >= self.fallback_s:
            return Due(f"no pass for {self.fallback_s:g} s")
        what = reading.moved_since(self._before)
        if what is not None:
            return Due(what, moved=True)
        why = self._before.settling()
        return None if why is None else Due(why)

    def hold_until(self, monotonic: float) -> None:
        """No pass before `monotonic` (set after each one tried, passed or not: the caller
        holds the next for poll_interval after a pass for a commit, a stream of changes then
        gets a pass every poll_interval; after any other, only while it ran, so that a
        booking landing during the fallback's pass is read right after it)."""
        self._not_before = monotonic

    def held_for(self, monotonic: float) -> float:
        """Seconds until the hold ends (0 or less: not held)."""
        return self._not_before - monotonic

    def passed(self, monotonic: float, reading: Sensed, scope: Hashable = None) -> None:
        """The pass started at `monotonic`, after `reading`, over `scope`, is recorded."""
        self._passed = monotonic
        self._before = reading
        self._scope = scope
