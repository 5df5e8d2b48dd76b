"""7. Delivery under slow and hostile answers: the real daemon against a receiver that takes
its time, or answers what no client should hold in memory.

The daemon is the real command line, `python -m agent run --config FILE`, in its own process,
with the default [delivery] settings (the table names the ones that matter here), polling a
10,000-slot inventory every second (no LISTEN/NOTIFY), on a copy of a state caught up with it
(outbox empty). The receiver is bench/receiver.py --kind answers, in its own process: it
checks the path, integration and secret as Seyaha does and records every call, from the
moment its request was read until the last bytes of its answer go out or the client hangs
up; so it knows how many calls for one slot were in flight at once. Both stamp
CLOCK_MONOTONIC, one clock for the machine. One warm-up booking, answered at once, shows the
daemon is up; it is not counted. Each case runs once (--runs does not apply).

Slow answers: every answer is Seyaha's 200 envelope ({"success":1,"data":{"updated":true}},
which agent/delivery/policy.py counts as delivered) after 0, 1, 2.5 or 5 s. N single-slot
bookings of distinct slots are committed 10 ms apart; the first N/5 of these slots are booked
a second time as soon as their first call reaches the receiver (with slow answers, while
that call is still in flight). Then:
- calls per change: notify calls for these slots / bookings committed (N + N/5); a repeat is
  a call carrying a state the receiver had already answered 200 for;
- in flight per slot: the most calls for one slot in flight at once (must be 1);
- drain: from the last commit to the end of the last answer; "first commit to last answer"
  beside its floor, calls x answer time / concurrency;
- every change arrived: the last call for each slot carried the vacancies the database holds
  at the end, and was answered 200; the run waits for that and for an empty outbox (pending
  rows of the daemon's SQLite state), then 3 s more for stray calls, before it stops.

Hostile answers: after the warm-up, M bookings; from the first call on, every answer for 20 s
is hostile, then correct (at once) again, until every change arrived as above:
- huge: a proxy's 502 whose body is 50 MB (Content-Length announced);
- gzip bomb: a 500 with Content-Encoding: gzip, about 100 KB that unpack to 100 MB (one
  deflate layer compresses at most about 1032:1);
- gzip, two layers: Content-Encoding: gzip, gzip, a few KB that unpack to 4 GB;
- trickle: a correct 200, status line and a proxy's headers included, one byte a second
  (147 s for the head, 184 s for the whole answer, each read well within the 10 s timeout).
Peak memory is VmHWM of the daemon's process (/proc/PID/status), read just before it is
stopped; "before" is the same reading right after the warm-up (start-up, first poll and one
delivery included), so the growth is what the hostile answers and M deliveries added.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench import agentconf, inventory
from bench.context import Context
from bench.inventory import Inventory
from bench.latency import Daemon
from bench.receiver import AnsweredCall, Receiver

SLOTS = 10_000
"""Size of the inventory: small, so that the daemon's own polls and scans weigh little on
its memory and CPU beside what the answers cost."""

POLL_INTERVAL_S = 1.0
COMMIT_SPACING_S = 0.01
DELAYS_S = (0.0, 1.0, 2.5, 5.0)
HOSTILE = (
    ("huge", "502, 50 MB body"),
    ("gzip_bomb", "500, gzip bomb (one layer)"),
    ("gzip_layers", "500, gzip bomb (two layers)"),
    ("trickle", "200, head and body at 1 byte/s"),
)

TWICE_FRACTION = 5
"""1 in this many of a slow run's slots is booked a second time."""

WARMUP_TIMEOUT_S = 120.0
FIRST_CALL_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 1200.0
"""Longest wait for every change to arrive (seconds): 240 calls at 5 s with 4 in flight take
300 s; a daemon that stalls is reported as such rather than waited for."""

SETTLE_S = 3.0
"""After everything arrived, how long stray calls (repeats) are still waited for (seconds)."""

CHECK_EVERY_S = 0.5
REBOOK_CHECK_S = 0.01
"""How often the second bookings look for the first call of their slot (seconds)."""

CALLS_PER_CHANGE_GOAL = 1.05
RSS_GROWTH_GOAL_MB = 20.0
"""Most peak memory hostile answers may add (MB): below the smallest of them (50 MB), so a
daemon that holds one whole fails, and far above what 4 workers' 64 KB read caps cost."""

LOG_LINES_KEPT = 12
"""Daemon log lines kept per slot whose calls overlapped."""


@dataclass(frozen=True)
class Sizes:
    changes: int
    """Bookings of distinct slots in a slow-answer run."""
    hostile_changes: int
    hostile_s: float
    """How long every answer is hostile, from the first call on (seconds): past the circuit
    breaker's opening (5 failures) but short of its first probe (30 s later)."""


FULL_SIZES = Sizes(changes=200, hostile_changes=40, hostile_s=20.0)
QUICK_SIZES = Sizes(changes=24, hostile_changes=8, hostile_s=20.0)


# -- one daemon against one receiver ----------------------------------------------------------


@dataclass
class Commits:
    """What the benchmark committed: {slot: [(vacancies, monotonic commit time), ...]}."""

    by_slot: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    """The first bookings and the second ones are made by two threads."""

    def add(self, booked: dict[str, int]) -> None:
        at = time.monotonic()
        with self._lock:
            for slot, vacancies in booked.items():
                self.by_slot.setdefault(slot, []).append((vacancies, at))

    @property
    def count(self) -> int:
        return sum(len(v) for v in self.by_slot.values())

    def finals(self) -> dict[str, int]:
        return {slot: seen[-1][0] for slot, seen in self.by_slot.items()}

    def times(self) -> list[float]:
        return [at for seen in self.by_slot.values() for _, at in seen]


class Session:
    """A receiver (`--kind answers`) and a daemon on a fresh caught-up state, warmed up."""

    def __init__(self, ctx: Context, name: str) -> None:
        self.ctx = ctx
        self.name = name
        self.inv = ctx.inventory(SLOTS)
        self.state = ctx.caught_up_state(SLOTS, name)
        self.receiver = Receiver("answers", arrivals=True, log=ctx.log(f"{name}-receiver"))
        self.daemon: Daemon | None = None
        self.exit_code: int | None = None
        try:
            setup = ctx.setup(
                SLOTS, self.state, base_url=self.receiver.url, poll_interval_s=POLL_INTERVAL_S
            )
            self.daemon = Daemon(ctx.config(name, setup), ctx.log(name))
            ((slot, vacancies),) = inventory.book(ctx.conn, self.inv, self.inv.ids.take(1)).items()
            if not self.receiver.wait_for([(slot, vacancies)], WARMUP_TIMEOUT_S):
                raise RuntimeError(f"the warm-up booking never arrived; see {ctx.log(name)}")
        except BaseException:
            self.close()
            raise

    @property
    def pid(self) -> int:
        assert self.daemon is not None
        return self.daemon.process.pid

    def book(self, ids: list[int], commits: Commits) -> None:
        """Book each of `ids` in its own commit, COMMIT_SPACING_S apart (open loop)."""
        started = time.monotonic()
        for k, slot_id in enumerate(ids):
            pause = started + k * COMMIT_SPACING_S - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            commits.add(inventory.book(self.ctx.conn, self.inv, [slot_id]))
        self.ctx.changed()

    def wait_delivered(self, finals: dict[str, int], timeout_s: float) -> bool:
        """Until the last call for every slot carried its final state and was answered 200,
        and the outbox has nothing pending; False if `timeout_s` passed first."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            calls, _ = self.receiver.calls()
            last = _last_calls(calls, finals)
            if all(_carries(last.get(s), v) for s, v in finals.items()) and not self._pending():
                return True
            time.sleep(CHECK_EVERY_S)
        return False

    def _pending(self) -> int:
        from agent.store import schema

        uri = f"file:{self.state}?mode=ro"
        with sqlite3.connect(uri, uri=True, timeout=10.0) as db:
            # The table's name comes from the agent's own schema module, not from input.
            query = f"SELECT count(*) FROM {schema.outbox.name} WHERE state = ?"  # noqa: S608
            row = db.execute(query, (schema.PENDING,)).fetchone()
        db.close()
        return int(row[0])

    def close(self) -> None:
        if self.daemon is not None and self.exit_code is None:
            self.exit_code = self.daemon.stop()
        self.receiver.stop()
        self.ctx.changed()


def _carries(call: AnsweredCall | None, vacancies: int) -> bool:
    return call is not None and call.vacancies == vacancies and _delivered(call)


def _delivered(call: AnsweredCall) -> bool:
    return call.answered and call.status == 200 and not call.hung_up


def _last_calls(calls: Iterable[AnsweredCall], slots: Iterable[str]) -> dict[str, AnsweredCall]:
    wanted = set(slots)
    last: dict[str, AnsweredCall] = {}
    for call in sorted(calls, key=lambda c: c.number):
        if call.slot in wanted:
            last[call.slot] = call
    return last


def peak_rss_mb(pid: int) -> float:
    """VmHWM of `pid`: the most memory it has held resident so far (MB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def database_vacancies(ctx: Context, inv: Inventory, slots: Iterable[str]) -> dict[str, int]:
    statement = sql.SQL("SELECT id, capacity - booked FROM {} WHERE id = ANY(%s)").format(inv.table)
    with psycopg.connect(ctx.dsn) as conn:
        rows = conn.execute(statement, ([int(s) for s in slots],)).fetchall()
    return {str(slot): int(vacancies) for slot, vacancies in rows}


# -- what the calls show ----------------------------------------------------------------------


def summarise(
    calls: list[AnsweredCall],
    peaks: dict[str, int],
    commits: Commits,
    database: dict[str, int],
) -> dict[str, Any]:
    """Calls per change, repeats, overlaps and whether every slot's last call was right."""
    mine = sorted((c for c in calls if c.slot in commits.by_slot), key=lambda c: c.number)
    by_slot: dict[str, list[AnsweredCall]] = {}
    for call in mine:
        assert call.slot is not None
        by_slot.setdefault(call.slot, []).append(call)
    repeats = 0
    for slot_calls in by_slot.values():
        for index, call in enumerate(slot_calls):
            repeats += any(
                earlier.vacancies == call.vacancies
                and _delivered(earlier)
                and earlier.ended is not None
                and earlier.ended <= call.arrived
                for earlier in slot_calls[:index]
            )
    last = _last_calls(mine, commits.by_slot)
    missing = [s for s in commits.by_slot if not _carries(last.get(s), database.get(s, -1))]
    ends = [c.ended for c in mine if c.ended is not None]
    first_commit = min(commits.times())
    last_commit = max(commits.times())
    overlapping = sorted(slot for slot in commits.by_slot if peaks.get(slot, 0) > 1)
    return {
        "bookings": commits.count,
        "slots": len(commits.by_slot),
        "calls": len(mine),
        "calls_per_change": len(mine) / commits.count,
        "delivered_calls": sum(_delivered(c) for c in mine),
        "repeats": repeats,
        "max_in_flight": max((peaks.get(s, 0) for s in commits.by_slot), default=0),
        "all_arrived": not missing,
        "missing": missing,
        "drain_s": max(ends) - last_commit if ends else None,
        "span_s": max(ends) - first_commit if ends else None,
        "last_answer_at": max(ends) if ends else None,
        "overlaps": {
            slot: [_call_row(c, first_commit) for c in by_slot[slot]] for slot in overlapping
        },
    }


def _call_row(call: AnsweredCall, origin: float) -> dict[str, Any]:
    return {
        "call": call.number,
        "vacancies": call.vacancies,
        "answer": call.answer,
        "arrived_s": round(call.arrived - origin, 3),
        "ended_s": None if call.ended is None else round(call.ended - origin, 3),
        "status": call.status,
        "answered": call.answered,
        "hung_up": call.hung_up,
    }


def daemon_log(path: Path, slots: Iterable[str]) -> dict[str, Any]:
    """The daemon's events counted by name, and the lines about `slots` (overlaps)."""
    wanted = set(slots)
    events: Counter[str] = Counter()
    lines: dict[str, list[str]] = {}
    for raw in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(record, dict):
            continue
        events[str(record.get("event"))] += 1
        slot = str(record.get("slot"))
        if slot in wanted and len(lines.setdefault(slot, [])) < LOG_LINES_KEPT:
            lines[slot].append(raw)
    return {"events": dict(events.most_common()), "lines": lines}


# -- the two kinds of run ---------------------------------------------------------------------


def slow_run(ctx: Context, sizes: Sizes, delay_s: float) -> dict[str, Any]:
    name = f"answers-slow-{delay_s:g}s".replace(".", "_")
    session = Session(ctx, name)
    try:
        session.receiver.answer_with("delay", delay_s)
        ids = session.inv.ids.take(sizes.changes)
        twice = [str(i) for i in ids[: max(1, sizes.changes // TWICE_FRACTION)]]
        commits = Commits()
        again: dict[str, float] = {}
        rebooker = threading.Thread(
            target=_book_again_on_arrival,
            args=(ctx, session, twice, commits, again),
            name="book-again",
            daemon=True,
        )
        rebooker.start()
        session.book(ids, commits)
        rebooker.join(DRAIN_TIMEOUT_S)
        finals = commits.finals()
        timed_out = not session.wait_delivered(finals, DRAIN_TIMEOUT_S)
        time.sleep(SETTLE_S)
        peak = peak_rss_mb(session.pid)
        calls, peaks = session.receiver.calls()
    finally:
        session.close()
    result = summarise(calls, peaks, commits, database_vacancies(ctx, session.inv, finals))
    concurrency = int(agentconf.delivery_defaults().get("concurrency", 1))
    result.update(
        {
            "delay_s": delay_s,
            "booked_again": len(again),
            "booked_again_in_flight": sum(
                any(
                    c.slot == slot and c.arrived <= at and (c.ended is None or c.ended > at)
                    for c in calls
                )
                for slot, at in again.items()
            ),
            "floor_s": result["calls"] * delay_s / concurrency,
            "peak_rss_mb": peak,
            "timed_out": timed_out,
            "exit_code": session.exit_code,
            "log": daemon_log(ctx.log(name), result["overlaps"]),
        }
    )
    return result


def _book_again_on_arrival(
    ctx: Context, session: Session, slots: list[str], commits: Commits, again: dict[str, float]
) -> None:
    """Book each of `slots` again as soon as the receiver has seen its first call."""
    waiting = set(slots)
    deadline = time.monotonic() + DRAIN_TIMEOUT_S
    with psycopg.connect(ctx.dsn, autocommit=True) as conn:
        while waiting and time.monotonic() < deadline:
            arrived = {a.slot for a in session.receiver.arrivals()} & waiting
            for slot in sorted(arrived, key=int):
                booked = inventory.book(conn, session.inv, [int(slot)])
                commits.add(booked)
                again[slot] = time.monotonic()
                waiting.discard(slot)
            time.sleep(REBOOK_CHECK_S)


def hostile_run(ctx: Context, sizes: Sizes, kind: str, what: str) -> dict[str, Any]:
    name = f"answers-{kind}"
    session = Session(ctx, name)
    try:
        before = peak_rss_mb(session.pid)
        body = session.receiver.answer_with(kind)
        ids = session.inv.ids.take(sizes.hostile_changes)
        commits = Commits()
        session.book(ids, commits)
        slots = set(commits.by_slot)
        first = _first_arrival(session.receiver, slots, FIRST_CALL_TIMEOUT_S)
        if first is None:
            raise RuntimeError(f"no call reached the receiver; see {ctx.log(name)}")
        time.sleep(max(0.0, first + sizes.hostile_s - time.monotonic()))
        session.receiver.answer_with("delay", 0.0)
        switched = time.monotonic()
        finals = commits.finals()
        timed_out = not session.wait_delivered(finals, DRAIN_TIMEOUT_S)
        time.sleep(SETTLE_S)
        peak = peak_rss_mb(session.pid)
        calls, peaks = session.receiver.calls()
    finally:
        session.close()
    result = summarise(calls, peaks, commits, database_vacancies(ctx, session.inv, finals))
    hostile = [c for c in calls if c.answer == kind]
    result.update(
        {
            "kind": kind,
            "what": what,
            "body_bytes": body.get("packed"),
            "unpacked_bytes": body.get("unpacked"),
            "hostile_s": sizes.hostile_s,
            "hostile_answers": len(hostile),
            "hostile_hung_up": sum(c.hung_up for c in hostile),
            "delivered_per_change": result["delivered_calls"] / result["bookings"],
            "recovery_s": (
                result["last_answer_at"] - switched if result["last_answer_at"] else None
            ),
            "rss_before_mb": before,
            "peak_rss_mb": peak,
            "growth_mb": peak - before,
            "timed_out": timed_out,
            "exit_code": session.exit_code,
            "log": daemon_log(ctx.log(name), result["overlaps"]),
        }
    )
    return result


def _first_arrival(receiver: Receiver, slots: set[str], timeout_s: float) -> float | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        times = [a.at for a in receiver.arrivals() if a.slot in slots]
        if times:
            return min(times)
        time.sleep(REBOOK_CHECK_S)
    return None


def measure(ctx: Context) -> dict[str, Any]:
    sizes = QUICK_SIZES if ctx.plan.quick else FULL_SIZES
    defaults = agentconf.delivery_defaults()
    slow = []
    for delay_s in DELAYS_S:
        row = slow_run(ctx, sizes, delay_s)
        slow.append(row)
        print(
            f"  answers in {delay_s:g} s: {row['calls_per_change']:.3f} calls per change, "
            f"max {row['max_in_flight']} in flight per slot, drain {_s(row['drain_s'])}, "
            f"{_arrived(row)}, peak RSS {row['peak_rss_mb']:.0f} MB",
            flush=True,
        )
    hostile = []
    for kind, what in HOSTILE:
        row = hostile_run(ctx, sizes, kind, what)
        hostile.append(row)
        print(
            f"  {what}: {row['hostile_answers']} hostile answers, peak RSS "
            f"{row['rss_before_mb']:.0f} -> {row['peak_rss_mb']:.0f} MB, "
            f"{row['calls_per_change']:.2f} calls per change, "
            f"max {row['max_in_flight']} in flight per slot, {_arrived(row)}",
            flush=True,
        )
    return {
        "slots": SLOTS,
        "poll_interval_s": POLL_INTERVAL_S,
        "changes": sizes.changes,
        "hostile_changes": sizes.hostile_changes,
        "hostile_s": sizes.hostile_s,
        "defaults": {
            k: defaults.get(k)
            for k in ("concurrency", "timeout", "lease", "batch_size", "rate_limit")
        },
        "breaker": {k: defaults.get(k) for k in ("breaker_failures", "breaker_cooldown")},
        "calls_per_change_goal": CALLS_PER_CHANGE_GOAL,
        "rss_growth_goal_mb": RSS_GROWTH_GOAL_MB,
        "slow": slow,
        "hostile": hostile,
    }


def _s(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds:.1f} s"


def _arrived(row: dict[str, Any]) -> str:
    return "all arrived" if row["all_arrived"] else f"{len(row['missing'])} slots wrong or missing"
