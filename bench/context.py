"""The shared fixtures of one benchmark run, and the plan of what a full or quick run measures.

One run owns: the PostgreSQL database `seyaha_bench` (dropped and recreated at the start,
dropped at the end), one inventory schema per size, a temporary folder with the agent's
SQLite state files, configurations and logs, and a "reference" state per size: the state a
baseline scan recorded, which later measurements copy (SQLite's backup API) instead of
baselining again.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from psycopg import sql

from bench import agentconf, inventory, worker
from bench.inventory import Inventory

PG_SERVER = os.environ.get("SEYAHA_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
"""The PostgreSQL server (no database part): trust auth on loopback, as README's tests use."""

DATABASE = "seyaha_bench"
DATA_SEED = 20_240_601
"""Seed of the generated inventory and of the ids picked for changes: runs are comparable."""

BASELINE_TIMEOUT_S = 3600.0


@dataclass(frozen=True)
class Plan:
    """What one run measures, and how often."""

    quick: bool
    runs: int
    scan_sizes: tuple[int, ...]
    big: int
    """The inventory of the poll, latency and dlt measurements."""
    poll_counts: tuple[int, ...]
    poll_runs: int
    latency_commits: int
    latency_runs: int
    commit_spacing_s: float
    backlog: int
    sandbox_backlog: int
    rate_limited_s: float
    """The drain with default settings gets about this many seconds of backlog at its limit."""
    dlt_commits: int
    dlt_deletes: int
    bulk_rows: int
    """Rows the bulk-change latency mode touches at once (updated_at only)."""
    latency_modes: tuple[str, ...] = (
        "wakeups",
        "polling",
        "reconciling",
        "bulk",
        "default",
        "missed",
        "restart",
        "crash",
    )
    """Which latency modes run (bench/latency.py MODES; `--modes` picks some)."""
    quiet_s: float = 0.0
    """Before a daemon run, wait until no row was changed for this long (seconds): polls
    re-read the rows of the last cursor_overlap (60 s by default), so changes left by an
    earlier measurement would otherwise weigh on every poll of the next one. 0 in --quick."""


FULL = Plan(
    quick=False,
    runs=3,
    scan_sizes=(100_000, 1_000_000),
    big=1_000_000,
    poll_counts=(0, 100, 10_000),
    poll_runs=5,
    latency_commits=1000,
    latency_runs=3,
    commit_spacing_s=0.04,
    backlog=10_000,
    sandbox_backlog=500,
    rate_limited_s=10.0,
    dlt_commits=300,
    dlt_deletes=20,
    bulk_rows=200_000,
    quiet_s=65.0,
)

QUICK = Plan(
    quick=True,
    runs=1,
    scan_sizes=(5_000, 20_000),
    big=20_000,
    poll_counts=(0, 100, 1000),
    poll_runs=2,
    latency_commits=60,
    latency_runs=1,
    commit_spacing_s=0.04,
    backlog=300,
    sandbox_backlog=30,
    rate_limited_s=2.0,
    dlt_commits=30,
    dlt_deletes=5,
    bulk_rows=10_000,
    quiet_s=0.0,
)


RUN_LOCK = 0x5E7A_BE7C
"""PostgreSQL advisory lock key held by a run for its whole length."""


def _run_guard() -> psycopg.Connection:
    """A connection holding RUN_LOCK. A second run would drop the database under the first
    (each starts and ends with DROP DATABASE ... WITH (FORCE)), so it is refused instead."""
    guard = psycopg.connect(psycopg_url("postgres"), autocommit=True)
    row = guard.execute("SELECT pg_try_advisory_lock(%s)", (RUN_LOCK,)).fetchone()
    if not (row and row[0]):
        guard.close()
        raise SystemExit(
            f"another `python -m bench` run is using the database {DATABASE} on {PG_SERVER}; "
            "wait for it to finish (or stop it) and run again"
        )
    return guard


def psycopg_url(database: str) -> str:
    return f"{PG_SERVER}/{database}"


def sqlalchemy_url(database: str) -> str:
    return psycopg_url(database).replace("postgresql://", "postgresql+psycopg://", 1)


@dataclass
class Context:
    plan: Plan
    workdir: Path
    conn: psycopg.Connection
    """An autocommit connection to the bench database, for setting up and changing data."""
    inventories: dict[int, Inventory] = field(default_factory=dict)
    references: dict[int, Path] = field(default_factory=dict)
    baselines: dict[int, dict[str, Any]] = field(default_factory=dict)
    """The first (baseline) scan of each size, as the scan worker reported it."""
    versions: dict[str, str] = field(default_factory=dict)
    last_change: float = 0.0
    """time.monotonic() of the last change the benchmark made to an inventory."""
    guard: psycopg.Connection | None = None
    """Holds the advisory lock that keeps a second run off the bench database (_run_guard)."""

    @classmethod
    def open(cls, plan: Plan) -> Context:
        guard = _run_guard()
        with psycopg.connect(psycopg_url("postgres"), autocommit=True) as admin:
            ident = sql.Identifier(DATABASE)
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(ident))
            admin.execute(sql.SQL("CREATE DATABASE {}").format(ident))
        conn = psycopg.connect(psycopg_url(DATABASE), autocommit=True)
        workdir = Path(tempfile.mkdtemp(prefix="seyaha-bench-"))
        context = cls(plan=plan, workdir=workdir, conn=conn, guard=guard)
        context.versions["postgresql"] = str(conn.execute("SHOW server_version").fetchone()[0])
        return context

    def close(self, *, keep_files: bool = False) -> None:
        """Drop the bench database; remove the work folder unless `keep_files`."""
        self.conn.close()
        with psycopg.connect(psycopg_url("postgres"), autocommit=True) as admin:
            admin.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(DATABASE))
            )
        if self.guard is not None:
            self.guard.close()  # the session ends, and its advisory lock with it
        if not keep_files:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- paths --------------------------------------------------------------------------

    @property
    def dsn(self) -> str:
        return psycopg_url(DATABASE)

    @property
    def source_url(self) -> str:
        return sqlalchemy_url(DATABASE)

    def path(self, name: str) -> Path:
        return self.workdir / name

    def log(self, name: str) -> Path:
        folder = self.workdir / "logs"
        folder.mkdir(exist_ok=True)
        return folder / f"{name}.log"

    def setup(self, size: int, state: Path, **overrides: Any) -> agentconf.AgentSetup:
        return agentconf.AgentSetup(
            source_url=self.source_url,
            schema=self.inventory(size).schema,
            state_path=state,
            **overrides,
        )

    def config(self, name: str, setup: agentconf.AgentSetup) -> Path:
        return agentconf.write(self.workdir / "config", name, setup)

    def changed(self) -> None:
        """Note that an inventory was just changed (see Plan.quiet_s)."""
        self.last_change = time.monotonic()

    def wait_quiet(self) -> None:
        """Wait until no inventory row has changed for Plan.quiet_s."""
        pause = self.last_change + self.plan.quiet_s - time.monotonic()
        if pause > 0:
            print(f"  waiting {pause:.0f} s for earlier changes to leave the overlap window")
            time.sleep(pause)

    # -- fixtures -----------------------------------------------------------------------

    def inventory(self, size: int) -> Inventory:
        """The inventory of `size` slots, generated on first use."""
        if size not in self.inventories:
            started = time.perf_counter()
            self.inventories[size] = inventory.create(self.conn, size, DATA_SEED + size)
            self.baselines.setdefault(size, {})["generate_s"] = time.perf_counter() - started
        return self.inventories[size]

    def reference_state(self, size: int) -> Path:
        """A state baselined against the inventory of `size` slots (one scan, first use)."""
        if size not in self.references:
            self.inventory(size)
            state = self.path(f"reference-{size}.db")
            config = self.config(f"baseline-{size}", self.setup(size, state))
            result = worker.run(
                "scan",
                {"config": str(config), "log": str(self.log(f"baseline-{size}"))},
                log=self.log("workers"),
                timeout_s=BASELINE_TIMEOUT_S,
            )
            self.baselines[size].update(result)
            self.references[size] = state
        return self.references[size]

    def state_copy(self, size: int, name: str) -> Path:
        """A copy of the reference state of `size` (consistent even with a WAL in use)."""
        target = self.path(f"{name}.db")
        copy_state(self.reference_state(size), target)
        return target

    def caught_up_state(self, size: int, name: str) -> Path:
        """A copy of the reference state, polled up to now, with an empty outbox.

        The reference itself is brought up to date (one poll, a reconciliation, then its
        outbox emptied), so that each call only catches up with what changed since the
        previous one. Daemons start from such a copy: nothing left over from earlier
        measurements is waiting to be delivered in front of what they measure, and the
        stored range digests are whole, as a running daemon's are after its reconciliations
        (the poll measurement changes about 30,000 slots, whose writes clear the digests of
        more than a quarter of the ranges: the daemon's first reconciliation would read
        every row, about 45 s at 1M, and fall just before a measured window).
        """
        from agent.app import Agent
        from agent.config import load_config

        reference = self.reference_state(size)
        config = self.config(f"reference-{size}-catch-up", self.setup(size, reference))
        agent = Agent(load_config(config))
        agent.open()
        try:
            agent.poll()
            agent.scan()
        finally:
            agent.close()
        empty_outbox(reference)
        return self.state_copy(size, name)


def empty_outbox(state: Path) -> None:
    """Drop every message of the SQLite state at `state`: a daemon started on it delivers
    only what it finds itself."""
    from agent.store import schema as tables

    engine = sa.create_engine(f"sqlite:///{state}")
    try:
        with engine.begin() as conn:
            conn.execute(sa.delete(tables.outbox))
    finally:
        engine.dispose()


def copy_state(source: Path, target: Path) -> None:
    """A consistent copy of the SQLite state `source` at `target` (even with a WAL in use)."""
    for leftover in (target, Path(f"{target}-wal"), Path(f"{target}-shm")):
        leftover.unlink(missing_ok=True)
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)
    src.close()
    dst.close()


def recreate_database(name: str) -> None:
    """An empty database `name` on the bench's PostgreSQL server (dropped first if it exists)."""
    drop_database(name)
    with psycopg.connect(psycopg_url("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(name: str) -> None:
    """Drop database `name` on the bench's PostgreSQL server, its connections with it."""
    with psycopg.connect(psycopg_url("postgres"), autocommit=True) as admin:
        admin.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
        )
