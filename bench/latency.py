"""3. Commit-to-delivery latency: a committed single-slot UPDATE until its notify arrives.

The daemon is the real command line, `python -m agent run --config FILE`, in its own process,
on a copy of the baselined big inventory's state (polled up to date, outbox empty). This
process commits one booking at a time through psycopg: one UPDATE of one slot, committed;
the commit time is read right after COMMIT returns. The fast receiver (its own process)
stamps each notify when its request has been read. Both stamps are CLOCK_MONOTONIC, one
clock for the whole machine.

Commits are spaced open-loop: one every `commit_spacing_s` on a fixed schedule, whether or
not earlier ones were delivered (a steady booking system, not a request/response test).
Before the measured commits, warm-up commits are each waited for; they are not counted.

Modes:
- wake-ups: the statement-level NOTIFY triggers (agent/source/pg_triggers.py) on the slots
  table, the daemon LISTENing, poll_interval 60 s, so every delivery is a wake-up's;
- polling: no triggers, poll_interval 1 s;
both with the default cursor_overlap (60 s) and full_scan_interval 300 s (the default is
60 s; each run is shorter than 300 s, and the measured commits start once the
reconciliation the daemon runs after its first poll is over, so no full reconciliation falls
inside a measured window);
- wake-ups through reconciliations: as wake-ups, but full_scan_interval 15 s,
  reconcile_share 1 (no rest between reconciliations) and the measured commits start right
  after the warm-up, while the reconciliation after the start runs; at 1,000,000 slots one
  reconciliation takes about as long as the interval, so they follow each other through the
  whole window. The reconciliations' start and end come from the
  daemon's log, and the commits made while one ran are counted apart;
- wake-ups after a bulk change: as wake-ups, but right before the measured commits one
  statement stamps updated_at on `bulk_rows` slots (200,000; nothing Seyaha sees changes),
  as a nightly job touching every row would; the measured commits fall in the minute
  (cursor_overlap) after it. The first poll after the bulk statement reads its rows (the
  bookings committed meanwhile wait for that poll); later polls read only their last 5 s,
  and the late-row sweep reads the rows again beside them;
- two queries only: the default a supplier gets by writing only catalog_query and
  slots_query (no change query, no triggers): every pass is a full reconciliation, with
  range digests on PostgreSQL; the daemon runs one when the server's snapshot shows a
  commit (read every 0.25 s), at most every poll_interval (5 s) while commits keep coming,
  and at least every full_scan_interval (here 300 s). Before the commits the daemon rests
  for `rest_s` with nothing changing: its CPU and the PostgreSQL server's (every `postgres`
  process of the machine, so the bench's own idle connection too) are measured over that
  window, as shares of one core; then 6 single bookings, 8-14 s apart, are each timed
  from commit to notify (at rest: the pass starts when the snapshot shows the commit);
- late rows: as wake-ups, but every measured booking stamps updated_at 30 s before its
  commit, as a transaction that began then would: no poll reads it (they read the last
  5 s), the late-row sweep after the next poll does; not part of `all` (run it
  with `--modes late`);
- missed rows: as wake-ups, with the default full_scan_interval (60 s) and reconcile_share,
  but every measured booking stamps updated_at 120 s before its commit, beyond
  cursor_overlap (60 s): neither the polls nor the late-row sweep read it, only the next
  reconciliation finds it. Commits come 100 ms apart so that they span more than one
  interval, and deliveries are waited for up to 240 s: the maximum is the worst case of a
  row the change query missed (the interval plus one reconciliation, plus delivery). Before
  the commits the daemon rests for `rest_s` (180 s: three reconciliations) as in two
  queries only, which measures what reconciling every 60 s costs at rest;
- after a reconciliation that read every row: as wake-ups, but the daemon starts from a
  state whose range digests are all cleared (as writes of more than a quarter of the
  ranges leave them, after a bulk change of their values), so the reconciliation after
  its start reads every row, and the measured window begins right after it. Not part of
  `all` (run it with `--modes after-every-row`);
- across a restart: as wake-ups, but `restart_at_s` into the measured commits the daemon
  gets SIGTERM and, once it has exited, is started again at once with the same config and
  state (what `systemctl restart` does: a deploy, an upgrade); the commits go on meanwhile,
  open loop. The new daemon runs its first poll from the stored cursor and the
  reconciliation it runs at every start, beside its polls;
- across a crash: as across a restart, but SIGKILL, and the new daemon starts
  `restart_pause_s` (5 s, the RestartSec of systemd/seyaha-agent.service) after the old
  one died: an out-of-memory kill or a crash under systemd.
  In both, the commits from the signal to the new daemon's `agent.started` log line are
  counted apart ("while it was down").
Each run starts once no row has changed for 65 s, so that it does not inherit the previous
run's changes in its polls' overlap window; within a run the window fills with the run's
own commits, as it would in a steady booking system.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench import agentconf, inventory
from bench.context import Context
from bench.inventory import Inventory
from bench.receiver import Receiver
from bench.stats import median, percentile, postgres_cpu_s, process_cpu_s

WARMUP_COMMITS = 3
WARMUP_TIMEOUT_S = 120.0
"""Longest wait for a warm-up delivery: the first one includes the daemon's start."""

DELIVERY_WAIT_S = 30.0
"""After the last commit, how long to wait for deliveries still on their way."""

DAEMON_STOP_TIMEOUT_S = 60.0

START_RECONCILIATION_WAIT_S = 300.0
"""Longest wait for the reconciliation the daemon runs after its first poll (about 20 s at
1,000,000 slots); the measured window starts after it."""

RECONCILED_CHECK_S = 0.5

QUICK_REST_S = 5.0
"""The at-rest window of a --quick run (the two-queries mode)."""

SINGLE_GAP_S = (8.0, 14.0)
"""Seconds between two single bookings at rest (uniformly drawn, see single_bookings)."""

SINGLE_WAIT_S = 60.0


def single_bookings(
    book: Callable[[], tuple[str, int]], receiver: Receiver, count: int, seed: int
) -> dict[str, Any]:
    """`count` bookings, one at a time, SINGLE_GAP_S apart, each timed from its commit
    (`book` returns the slot and its new vacancies once committed) to its notify at the
    receiver: what a booking costs a daemon at rest, at a random phase of its readings."""
    rng = random.Random(seed)
    latencies: list[float] = []
    missing = 0
    for _ in range(count):
        time.sleep(rng.uniform(*SINGLE_GAP_S))
        slot, vacancies = book()
        committed = time.monotonic()
        arrived = receiver.wait_for([(slot, vacancies)], SINGLE_WAIT_S)
        if slot in arrived:
            latencies.append((arrived[slot] - committed) * 1000)
        else:
            missing += 1
    return {
        "singles": count,
        "singles_missing": missing,
        "singles_ms": [round(ms) for ms in latencies],
        "singles_p50_ms": percentile(latencies, 0.50) if latencies else float("nan"),
        "singles_max_ms": max(latencies) if latencies else float("nan"),
    }


@dataclass(frozen=True)
class Mode:
    key: str
    """Names the mode's files (config, state, logs) and picks it (`--modes`)."""
    name: str
    triggers: bool
    poll_interval_s: float
    cursor_overlap_s: float = 60.0
    full_scan_interval_s: float = 300.0
    through_reconciliations: bool = False
    """Measure while reconciliations run, instead of after the one at the start."""
    bulk: bool = False
    """Stamp updated_at on Plan.bulk_rows slots right before the measured commits."""
    stamp_behind_s: float = 0.0
    """Stamp the measured bookings this long before their commit (late rows)."""
    incremental: bool = True
    """With the change query; without it, every poll is a full reconciliation."""
    rest_s: float = 0.0
    """Measure the daemon's and the database's CPU this long with nothing changing first."""
    reconcile_share: float | None = None
    """[source] reconcile_share; None: the agent's default."""
    spacing_s: float | None = None
    """Seconds between measured commits; None: the plan's commit_spacing_s."""
    delivery_wait_s: float = DELIVERY_WAIT_S
    """After the last commit, how long to wait for deliveries still on their way."""
    delivery: tuple[tuple[str, Any], ...] = ()
    """[delivery] keys to set; () the agent's defaults."""
    singles: int = 0
    """Single bookings at rest, timed one by one after the rest window (single_bookings)."""
    restart: str | None = None
    """"term" or "kill": restart the daemon once, `restart_at_s` into the measured commits,
    with that signal (see the module's docstring); None: never."""
    restart_at_s: float = 10.0
    restart_pause_s: float = 0.0
    """Between the old daemon's exit and the new one's start."""
    every_row_first: bool = False
    """Start from a state whose range digests were all cleared (as writes of more than a
    quarter of the ranges leave them): the reconciliation after the start reads every row,
    and the measured window begins right after it."""


WAKEUPS = Mode("wakeups", "wake-ups (LISTEN/NOTIFY), poll_interval 60 s", True, 60.0)
POLLING = Mode("polling", "plain polling, poll_interval 1 s", False, 1.0)
RECONCILING = Mode(
    "reconciling",
    "wake-ups through reconciliations, full_scan_interval 15 s",
    True,
    60.0,
    full_scan_interval_s=15.0,
    through_reconciliations=True,
    reconcile_share=1.0,
)
BULK = Mode("bulk", "wake-ups in the minute after a bulk change", True, 60.0, bulk=True)
LATE = Mode(
    "late",
    "wake-ups, each booking stamped 30 s before its commit (late rows)",
    True,
    60.0,
    stamp_behind_s=30.0,
)
DEFAULT = Mode(
    "default",
    "two queries only (no change query, no triggers), poll_interval 5 s",
    False,
    5.0,
    incremental=False,
    rest_s=60.0,
    singles=6,
)
UNLIMITED = Mode(
    "default-unlimited",
    "two queries only, poll_interval 5 s, delivery rate_limit 0 (no limit)",
    False,
    5.0,
    incremental=False,
    delivery=(("rate_limit", 0.0),),
)
"""As DEFAULT without the delivery rate limit: a pass finds about 125 bookings (5 s at one
every 40 ms) and queues them at once; rate_limit (50/s) alone would send them over 2.5 s,
rate_burst (250) lets them out at once. This mode shows what the passes cost a booking with
no limit at all, to compare."""
MISSED = Mode(
    "missed",
    "wake-ups, each booking stamped 120 s before its commit (beyond cursor_overlap), "
    "full_scan_interval 60 s",
    True,
    60.0,
    full_scan_interval_s=60.0,
    stamp_behind_s=120.0,
    spacing_s=0.1,
    delivery_wait_s=240.0,
    rest_s=180.0,
)
AFTER_EVERY_ROW = Mode(
    "after-every-row",
    "wake-ups right after a reconciliation that read every row",
    True,
    60.0,
    every_row_first=True,
)
RESTART = Mode(
    "restart",
    "wake-ups across a restart (SIGTERM, started again at once)",
    True,
    60.0,
    restart="term",
)
CRASH = Mode(
    "crash",
    "wake-ups across a crash (SIGKILL, started again 5 s later)",
    True,
    60.0,
    restart="kill",
    restart_pause_s=5.0,
)
"""restart_pause_s: RestartSec of systemd/seyaha-agent.service."""
MODES = {
    m.key: m
    for m in (
        WAKEUPS,
        POLLING,
        RECONCILING,
        BULK,
        DEFAULT,
        UNLIMITED,
        LATE,
        MISSED,
        AFTER_EVERY_ROW,
        RESTART,
        CRASH,
    )
}


class Daemon:
    """`python -m agent run` in its own process, stopped with SIGTERM like systemd does."""

    def __init__(self, config: Path, log: Path) -> None:
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=self._log,
            stderr=self._log,
        )

    def cpu_s(self) -> float:
        return process_cpu_s(self.process.pid)

    def wait_reconciled(self, timeout_s: float, after: float | None = None) -> bool:
        """Wait for the reconciliation the daemon runs after its first poll (a full scan in
        its JSON log), or with `after` (epoch seconds) for one that ends after it; False if
        none came within `timeout_s` (an agent that does not run one), or the daemon
        exited."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.process.poll() is None:
            if any(after is None or end > after for _, end in self.reconciliations()):
                return True
            time.sleep(RECONCILED_CHECK_S)
        return False

    def _records(self, marker: str) -> list[dict[str, Any]]:
        """The JSON log records whose line holds `marker` (every daemon writing the log)."""
        records = []
        with open(self._log.name, encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if marker not in line:
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue
        return records

    def reconciliations(self) -> list[tuple[float, float]]:
        """(start, end) in epoch seconds of every full reconciliation the log reports."""
        spans = []
        for record in self._records('"scan": "full"'):
            if "duration_ms" not in record:
                continue
            end = datetime.fromisoformat(record["ts"]).timestamp()
            spans.append((end - float(record["duration_ms"]) / 1000, end))
        return spans

    def started(self) -> list[float]:
        """Epoch seconds of each `agent.started` line of the log (every daemon writing it)."""
        return [
            datetime.fromisoformat(r["ts"]).timestamp() for r in self._records('"agent.started"')
        ]

    def kill(self) -> int:
        """SIGKILL, as the kernel's out-of-memory killer or a crash ends a process."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self._log.close()
        return self.process.returncode

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(DAEMON_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
        return self.process.returncode


class Restarting:
    """The daemon of a run and the ones started in its place (Mode.restart); each one
    appends to the same log."""

    def __init__(self, config: Path, log: Path) -> None:
        self._config, self._log = config, log
        self.daemon = Daemon(config, log)
        self._cpu_done = 0.0
        self.signalled: list[float] = []
        """Epoch seconds of each restart's signal."""
        self.codes: list[int] = []
        """Exit code of each daemon restarted (0 after SIGTERM, -9 after SIGKILL)."""
        self._thread: threading.Thread | None = None
        self._failed: BaseException | None = None

    def cpu_s(self) -> float:
        """CPU of every daemon of the run (those restarted: up to their signal)."""
        return self._cpu_done + self.daemon.cpu_s()

    def restart(self, how: str, pause_s: float) -> None:
        self._cpu_done += self.daemon.cpu_s()
        self.signalled.append(time.time())
        self.codes.append(self.daemon.kill() if how == "kill" else self.daemon.stop())
        time.sleep(pause_s)
        self.daemon = Daemon(self._config, self._log)

    def restart_later(self, after_s: float, how: str, pause_s: float) -> None:
        """restart() `after_s` from now, in a thread (join() waits for it)."""

        def later() -> None:
            time.sleep(after_s)
            try:
                self.restart(how, pause_s)
            except BaseException as exc:  # raised again by join()
                self._failed = exc

        self._thread = threading.Thread(target=later, name="restart", daemon=True)
        self._thread.start()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join()
        if self._failed is not None:
            raise RuntimeError("the daemon could not be restarted") from self._failed

    def down(self) -> list[tuple[float, float]]:
        """(signal, the next agent.started after it) of each restart; the end is the
        signal itself when no daemon has said it started since."""
        started = self.daemon.started()
        return [(at, min((s for s in started if s > at), default=at)) for at in self.signalled]


@dataclass
class StreamResult:
    latencies_ms: list[float]
    commits: int
    missing: int
    cpu_s: float
    """CPU of the measured process from the first measured commit to the last delivery."""
    seconds: float
    committed_at: list[float] = field(default_factory=list)
    """Epoch seconds of each delivered commit, in the order of latencies_ms."""
    reconciling: list[tuple[float, float]] = field(default_factory=list)
    """(start, end) of the reconciliations that overlapped the window (epoch seconds)."""
    rest: dict[str, float] = field(default_factory=dict)
    """Shares of a core the daemon and PostgreSQL used at rest (Mode.rest_s)."""
    down: list[tuple[float, float]] = field(default_factory=list)
    """(signal, the new daemon's agent.started) of each restart (epoch seconds)."""

    def during(self, spans: list[tuple[float, float]] | None = None) -> list[float]:
        """Latencies of the commits made while a reconciliation ran (or within `spans`)."""
        spans = self.reconciling if spans is None else spans
        return [
            ms
            for ms, at in zip(self.latencies_ms, self.committed_at, strict=True)
            if any(start <= at <= end for start, end in spans)
        ]

    def summary(self) -> dict[str, Any]:
        lat = self.latencies_ms
        during = self.during()
        down = self.during(self.down)
        restarts = (
            {
                "down_s": [round(end - start, 2) for start, end in self.down],
                "commits_down": len(down),
                "p50_down_ms": percentile(down, 0.50) if down else float("nan"),
                "max_down_ms": max(down) if down else float("nan"),
            }
            if self.down
            else {}
        )
        return {
            **restarts,
            "reconciliations": len(self.reconciling),
            "reconciliation_s": [round(end - start, 1) for start, end in self.reconciling],
            "commits_during": len(during),
            "p50_during_ms": percentile(during, 0.50) if during else float("nan"),
            "p99_during_ms": percentile(during, 0.99) if during else float("nan"),
            "max_during_ms": max(during) if during else float("nan"),
            "commits": self.commits,
            "delivered": len(lat),
            "missing": self.missing,
            "p50_ms": percentile(lat, 0.50),
            "p95_ms": percentile(lat, 0.95),
            "p99_ms": percentile(lat, 0.99),
            "max_ms": max(lat) if lat else float("nan"),
            "cpu_s": self.cpu_s,
            "cpu_s_per_1000": self.cpu_s / self.commits * 1000 if self.commits else float("nan"),
            "seconds": self.seconds,
            **self.rest,
        }


def stream(
    ctx: Context,
    inv: Inventory,
    receiver: Receiver,
    cpu_of: Callable[[], float],
    *,
    commits: int,
    spacing_s: float,
    wait_s: float = DELIVERY_WAIT_S,
    stamp_behind_s: float = 0.0,
    on_start: Callable[[], None] = lambda: None,
) -> StreamResult:
    """Warm up, then commit `commits` single-slot bookings and time each until it arrives.
    `on_start` is called as the first measured commit is due."""
    for _ in range(WARMUP_COMMITS):
        ((slot, vacancies),) = inventory.book(ctx.conn, inv, inv.ids.take(1)).items()
        if not receiver.wait_for([(slot, vacancies)], WARMUP_TIMEOUT_S):
            raise RuntimeError(f"a warm-up booking of slot {slot} was never delivered")
    cpu_before = cpu_of()
    sent: dict[str, tuple[int, float, float]] = {}
    started = time.monotonic()
    on_start()
    for k in range(commits):
        pause = started + k * spacing_s - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        booked = inventory.book(ctx.conn, inv, inv.ids.take(1), stamp_behind_s=stamp_behind_s)
        ((slot, vacancies),) = booked.items()
        sent[slot] = (vacancies, time.monotonic(), time.time())
    arrived = receiver.wait_for([(s, v) for s, (v, _, _) in sent.items()], wait_s)
    cpu = cpu_of() - cpu_before
    seconds = time.monotonic() - started
    delivered = [(s, at, wall) for s, (_, at, wall) in sent.items() if s in arrived]
    latencies = [(arrived[s] - at) * 1000 for s, at, _ in delivered]
    return StreamResult(
        latencies,
        commits,
        commits - len(latencies),
        cpu,
        seconds,
        committed_at=[wall for _, _, wall in delivered],
    )


def at_rest(daemon: Daemon, seconds: float) -> dict[str, float]:
    """The daemon's and PostgreSQL's CPU over `seconds` with nothing changing, as shares of
    one core."""
    daemon_before, postgres_before = daemon.cpu_s(), postgres_cpu_s()
    time.sleep(seconds)
    return {
        "rest_daemon_core": (daemon.cpu_s() - daemon_before) / seconds,
        "rest_postgres_core": (postgres_cpu_s() - postgres_before) / seconds,
        "rest_s": seconds,
    }


def touch(ctx: Context, inv: Inventory, rows: int) -> int:
    """One committed statement stamping updated_at on the first `rows` slots by id."""
    from psycopg import sql

    statement = sql.SQL("UPDATE {} SET updated_at = now() WHERE id <= %s").format(inv.table)
    with ctx.conn.transaction():
        return ctx.conn.execute(statement, (rows,)).rowcount


def clear_range_digests(state: Path) -> None:
    """Clear every stored range digest of the SQLite state at `state`, as writes of their
    slots would."""
    from agent.store import schema as tables

    engine = sa.create_engine(f"sqlite:///{state}")
    try:
        with engine.begin() as conn:
            conn.execute(sa.update(tables.ranges).values(digest=None))
    finally:
        engine.dispose()


def set_triggers(ctx: Context, inv: Inventory, *, installed: bool) -> None:
    from agent.source import pg_triggers

    engine = sa.create_engine(ctx.source_url)
    try:
        table = f"{inv.schema}.slots"
        statements = (
            pg_triggers.install_sql(engine, [table], agentconf.NOTIFY_CHANNEL)
            if installed
            else pg_triggers.uninstall_sql(engine, [table])
        )
        pg_triggers.apply(engine, statements)
    finally:
        engine.dispose()


def agent_stream(ctx: Context, mode: Mode, run: int, commits: int) -> StreamResult:
    """One daemon in `mode`, one stream of `commits` bookings; the triggers set by the caller."""
    size = ctx.plan.big
    inv = ctx.inventory(size)
    name = f"latency-{mode.key}-{run}"
    ctx.wait_quiet()
    state = ctx.caught_up_state(size, name)
    if mode.every_row_first:
        clear_range_digests(state)
    with Receiver(arrivals=True, log=ctx.log(f"{name}-receiver")) as receiver:
        config = ctx.config(
            name,
            ctx.setup(
                size,
                state,
                base_url=receiver.url,
                poll_interval_s=mode.poll_interval_s,
                cursor_overlap_s=mode.cursor_overlap_s,
                full_scan_interval_s=mode.full_scan_interval_s,
                incremental=mode.incremental,
                source=()
                if mode.reconcile_share is None
                else (("reconcile_share", mode.reconcile_share),),
                delivery=mode.delivery,
            ),
        )
        daemons = Restarting(config, ctx.log(name))
        daemon = daemons.daemon
        try:
            if not mode.through_reconciliations:
                # A quiet window: the reconciliation after the start is over before it begins.
                began = time.monotonic()
                reconciled = daemon.wait_reconciled(START_RECONCILIATION_WAIT_S)
                print(
                    f"  {name}: "
                    + (
                        f"start reconciliation over after {time.monotonic() - began:.1f} s"
                        if reconciled
                        else "no start reconciliation seen"
                    ),
                    flush=True,
                )
            rest: dict[str, float] = {}
            if mode.rest_s:
                rest_s = min(mode.rest_s, QUICK_REST_S) if ctx.plan.quick else mode.rest_s
                rest = at_rest(daemon, rest_s)
                print(
                    f"  {name}: at rest for {rest_s:g} s: daemon "
                    f"{rest['rest_daemon_core']:.1%} of a core, PostgreSQL "
                    f"{rest['rest_postgres_core']:.1%}",
                    flush=True,
                )
            if mode.singles:
                count = 1 if ctx.plan.quick else mode.singles

                def book() -> tuple[str, int]:
                    ((slot, vacancies),) = inventory.book(ctx.conn, inv, inv.ids.take(1)).items()
                    return slot, vacancies

                rest.update(single_bookings(book, receiver, count, run))
                print(
                    f"  {name}: {count} single bookings at rest: p50 "
                    f"{rest['singles_p50_ms']:.0f} ms, max {rest['singles_max_ms']:.0f} ms, "
                    f"{rest['singles_missing']} missing",
                    flush=True,
                )
            if mode.bulk:
                touched = touch(ctx, inv, ctx.plan.bulk_rows)
                print(f"  {name}: updated_at stamped on {touched:,} slots", flush=True)
            window_start = time.time()
            spacing_s = mode.spacing_s or ctx.plan.commit_spacing_s
            result = stream(
                ctx,
                inv,
                receiver,
                daemons.cpu_s,
                commits=commits,
                spacing_s=spacing_s,
                wait_s=mode.delivery_wait_s,
                stamp_behind_s=mode.stamp_behind_s,
                on_start=lambda: (
                    None
                    if mode.restart is None
                    else daemons.restart_later(
                        # Within a short window too (--quick): a quarter of the way through.
                        min(mode.restart_at_s, commits * spacing_s / 4),
                        mode.restart,
                        mode.restart_pause_s,
                    )
                ),
            )
            window_end = time.time()
            daemons.join()
            daemon = daemons.daemon
            result.down = daemons.down()
            if mode.restart is not None:
                print(
                    f"  {name}: restarted ({mode.restart}; exit code {daemons.codes}), "
                    f"down {[round(end - start, 2) for start, end in result.down]} s",
                    flush=True,
                )
            result.rest = rest
            if mode.through_reconciliations:
                # The one running at the window's end is said in the log when it ends.
                daemon.wait_reconciled(START_RECONCILIATION_WAIT_S, after=window_end)
            result.reconciling = [
                (start, end)
                for start, end in daemon.reconciliations()
                if end >= window_start and start <= window_end
            ]
        finally:
            try:
                daemons.join()
            finally:
                code = daemons.daemon.stop()
        ctx.changed()
        if code != 0:
            raise RuntimeError(f"the daemon exited with {code}; see {ctx.log(name)}")
    return result


def measure(ctx: Context) -> dict[str, Any]:
    inv = ctx.inventory(ctx.plan.big)
    ctx.reference_state(ctx.plan.big)
    modes: list[dict[str, Any]] = []
    for mode in (MODES[name] for name in ctx.plan.latency_modes):
        set_triggers(ctx, inv, installed=mode.triggers)
        try:
            runs = []
            for run in range(ctx.plan.latency_runs):
                summary = agent_stream(ctx, mode, run, ctx.plan.latency_commits).summary()
                runs.append(summary)
                print(
                    f"  latency, {mode.name}, run {run + 1}: p50 {summary['p50_ms']:.0f} ms, "
                    f"p95 {summary['p95_ms']:.0f} ms, p99 {summary['p99_ms']:.0f} ms, "
                    f"{summary['missing']} missing; {summary['commits_during']} commits "
                    f"during {summary['reconciliations']} reconciliation(s) "
                    f"{summary['reconciliation_s']} s: p50 {summary['p50_during_ms']:.0f} ms, "
                    f"p99 {summary['p99_during_ms']:.0f} ms",
                    flush=True,
                )
        finally:
            if mode.triggers:
                set_triggers(ctx, inv, installed=False)
        modes.append(
            {
                "mode": mode.name,
                "triggers": mode.triggers,
                "through_reconciliations": mode.through_reconciliations,
                "bulk": mode.bulk,
                "stamp_behind_s": mode.stamp_behind_s,
                "restart": mode.restart,
                "incremental": mode.incremental,
                "delivery": dict(mode.delivery),
                "poll_interval_s": mode.poll_interval_s,
                "spacing_ms": (mode.spacing_s or ctx.plan.commit_spacing_s) * 1000,
                **_medians(runs),
                "runs": runs,
            }
        )
    return {
        "slots": ctx.plan.big,
        "commits_per_run": ctx.plan.latency_commits,
        "bulk_rows": ctx.plan.bulk_rows,
        "spacing_ms": ctx.plan.commit_spacing_s * 1000,
        "modes": modes,
    }


def _medians(runs: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("p50_ms", "p95_ms", "p99_ms", "max_ms", "cpu_s_per_1000")
    merged: dict[str, float] = {k: median([r[k] for r in runs]) for k in keys}
    for k in ("p50_during_ms", "p99_during_ms", "max_during_ms"):
        values = [r[k] for r in runs if r["commits_during"]]
        merged[k] = median(values) if values else float("nan")
    merged["commits_during"] = sum(r["commits_during"] for r in runs)
    merged["reconciliations"] = sum(r["reconciliations"] for r in runs)
    merged["commits"] = sum(r["commits"] for r in runs)
    merged["missing"] = sum(r["missing"] for r in runs)
    for k in ("rest_daemon_core", "rest_postgres_core"):
        if all(k in r for r in runs):
            merged[k] = median([r[k] for r in runs])
    return merged
