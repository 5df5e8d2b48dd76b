"""1c. A MariaDB inventory: full reconciliation against its floor, and what a pass costs there.

The inventory of bench/inventory.py (the same rows: 200 slots per option, starts from
tomorrow, Europe/Istanbul wall-clock times) at the largest scan size, in the MariaDB (or
MySQL) on 127.0.0.1:3306 as root: database seyaha_bench_mariadb, recreated for each run and
dropped at its end, loaded with LOAD DATA LOCAL INFILE, indexed like the PostgreSQL one
(primary key, option_id, updated_at). The agent's queries are the README's in MariaDB's SQL;
the source has no wake-ups, so without a change query every poll is such a pass.

The state is baselined once (that first scan is reported too), caught up by one scan before
each case (not timed), and each case is then timed three times (the plan's runs), each run
in a fresh process on a fresh copy of the caught-up state, beside the floor: the slots query
through the same driver (PyMySQL, an unbuffered cursor, 5,000 rows a fetch). Cases:
- quiet: nothing changed, after a pass that also found nothing (the sum of every row's hash
  says so): what each poll of a daemon with the two required queries only costs at rest;
- one booking, after a quiet pass: the pass that finds a booking in that mode (it asks for
  the sum first, finds it differs, and goes on by option and range digests);
- 0.1% changed (95% bookings, 5% deletions), after a pass that recorded changes.
The agent's CPU is its own process's; the rest of a pass's wall time is mostly MariaDB's
(it runs each query on one core).

Then the daemon with the two required queries only (`python -m agent run`, poll_interval 5
s and full_scan_interval 60 s, the agent's defaults) on a copy of the caught-up state with
an empty outbox, delivering to the fast receiver: once its first pass is over and 10 s
more, its CPU and MariaDB's (the mariadbd process) over 120 s at rest, then 12 single
bookings, 8-14 s apart (drawn at random), each committed and waited for until its notify
arrives: commit to arrival, CLOCK_MONOTONIC on both sides. Each booking lands at rest, at a
random phase of the daemon's reading of the tables' UPDATE_TIME (every 0.25 s) and of its
fallback pass (every 60 s).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

import pymysql  # type: ignore[import-untyped]

from bench import inventory, worker
from bench.agentconf import AgentSetup
from bench.context import DATA_SEED, Context, copy_state, empty_outbox
from bench.latency import Daemon, single_bookings
from bench.receiver import Receiver
from bench.stats import against_floor, mariadb_cpu_s

HOST = os.environ.get("SEYAHA_BENCH_MYSQL_HOST", "127.0.0.1")
PORT = int(os.environ.get("SEYAHA_BENCH_MYSQL_PORT", "3306"))
USER = os.environ.get("SEYAHA_BENCH_MYSQL_USER", "root")
DATABASE = "seyaha_bench_mariadb"
CHANGED_FRACTION = 0.001

DAEMON_POLL_S = 5.0
DAEMON_FULL_SCAN_S = 60.0
"""The daemon's poll_interval and full_scan_interval: the agent's defaults."""
START_WAIT_S = 600.0
"""Longest wait for the daemon's first pass."""
SETTLED_S = 10.0
"""After the first pass, before the window at rest: the passes its start asks for are over."""
REST_S = 120.0
QUICK_REST_S = 10.0
"""The window at rest (two fallback passes at full_scan_interval 60 s)."""
BOOKINGS = 12
QUICK_BOOKINGS = 2


def queries() -> inventory.Queries:
    """bench/inventory.py's queries in MariaDB's SQL (the tables of DATABASE)."""
    slots = (
        "SELECT o.product_id, s.option_id, s.id AS availability_id,\n"
        "       s.starts_at AS local_date_time_start,\n"
        "       CASE WHEN s.cancelled THEN 'CLOSED' END AS status,\n"
        "       s.capacity - s.booked AS vacancies, s.capacity\n"
        "FROM slots s JOIN options o ON o.id = s.option_id\n"
        "WHERE s.starts_at >= NOW() - INTERVAL 1 DAY"
    )
    return inventory.Queries(
        catalog=(
            "SELECT p.id AS product_id, o.id AS option_id, p.title, p.price_cents,\n"
            "       o.name AS option_name\n"
            "FROM products p JOIN options o ON o.product_id = p.id\n"
            "WHERE p.published"
        ),
        slots=slots,
        slots_changed=slots + "\n  AND s.updated_at >= :since",
    )


@dataclass
class MariadbInventory:
    conn: pymysql.connections.Connection
    slots: int
    ids: inventory.IdPool

    def book_one(self) -> tuple[str, int]:
        """One booking of one slot, committed: (availability id, its vacancies after)."""
        (slot,) = self.ids.take(1)
        with self.conn.cursor() as cursor:
            cursor.execute(
                "UPDATE slots SET booked = CASE WHEN booked < capacity THEN booked + 1 "
                "ELSE booked - 1 END, updated_at = NOW(6) WHERE id = %s",
                (slot,),
            )
            cursor.execute("SELECT capacity - booked FROM slots WHERE id = %s", (slot,))
            row = cursor.fetchone()
        self.conn.commit()
        return str(slot), int(row[0])

    def change(self, count: int) -> None:
        """About `count` changed rows in two committed statements: 95% bookings (vacancies
        always change), 5% deletions (ids never booked in this run)."""
        deletions = count // 20
        booked = self.ids.take(count - deletions)
        with self.conn.cursor() as cursor:
            cursor.execute(
                "UPDATE slots SET booked = CASE WHEN booked < capacity THEN booked + 1 "
                "ELSE booked - 1 END, updated_at = NOW(6) WHERE id IN %s",
                (booked,),
            )
            if deletions:
                cursor.execute(
                    "DELETE FROM slots WHERE id IN %s", (self.ids.take_for_delete(deletions),)
                )
        self.conn.commit()


def create(ctx: Context, slots: int) -> MariadbInventory:
    conn = pymysql.connect(host=HOST, port=PORT, user=USER, local_infile=True, autocommit=True)
    with conn.cursor() as c:
        c.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
        c.execute(f"CREATE DATABASE {DATABASE}")
        c.execute(f"USE {DATABASE}")
        c.execute(
            "CREATE TABLE products (id int PRIMARY KEY, title varchar(100) NOT NULL, "
            "price_cents int NOT NULL, published boolean NOT NULL)"
        )
        c.execute(
            "CREATE TABLE options (id varchar(32) PRIMARY KEY, product_id int NOT NULL, "
            "name varchar(100) NOT NULL)"
        )
        c.execute(
            "CREATE TABLE slots (id bigint PRIMARY KEY, option_id varchar(32) NOT NULL, "
            "starts_at datetime NOT NULL, capacity int NOT NULL, booked int NOT NULL, "
            "cancelled boolean NOT NULL, updated_at datetime(6) NOT NULL, "
            "KEY (option_id), KEY (updated_at))"
        )
        options = max(1, slots // inventory.SLOTS_PER_OPTION)
        products = max(1, -(-options // inventory.OPTIONS_PER_PRODUCT))
        c.executemany(
            "INSERT INTO products VALUES (%s, %s, %s, %s)",
            [(p, f"Tour {p}", 1000 + p % 9000, True) for p in range(1, products + 1)],
        )
        c.executemany(
            "INSERT INTO options VALUES (%s, %s, %s)",
            [
                (inventory.option_id_of(o), o // inventory.OPTIONS_PER_PRODUCT + 1, f"Option {o}")
                for o in range(options)
            ],
        )
        seed = DATA_SEED + slots
        loaded_at = (datetime.now() - timedelta(days=1)).isoformat(sep=" ")
        data = ctx.path("mariadb-slots.tsv")
        with open(data, "w", encoding="utf-8") as out:
            for chunk in inventory.slot_lines(slots, random.Random(seed), ("1", "0"), loaded_at):
                out.write(chunk)
        c.execute(f"LOAD DATA LOCAL INFILE '{data}' INTO TABLE slots")
        data.unlink()
        c.execute("ANALYZE TABLE products, options, slots")
        c.fetchall()
    conn.autocommit(False)
    return MariadbInventory(conn, slots, inventory.IdPool(slots, seed))


def drop() -> None:
    conn = pymysql.connect(host=HOST, port=PORT, user=USER, autocommit=True)
    try:
        with conn.cursor() as c:
            c.execute(f"DROP DATABASE IF EXISTS {DATABASE}")
    finally:
        conn.close()


def measure(ctx: Context) -> dict[str, Any]:
    size = max(ctx.plan.scan_sizes)
    inv = create(ctx, size)
    try:
        return _measure(ctx, inv)
    finally:
        inv.conn.close()
        drop()


def _measure(ctx: Context, inv: MariadbInventory) -> dict[str, Any]:
    size = inv.slots
    q = queries()
    url = f"mysql+pymysql://{USER}@{HOST}:{PORT}/{DATABASE}"
    live = ctx.path(f"mariadb-{size}.db")
    run_state = ctx.path(f"mariadb-{size}-run.db")

    def setup(state: Any) -> AgentSetup:
        return AgentSetup(
            source_url=url, schema=DATABASE, state_path=state, queries=q, listens=False
        )

    live_config = ctx.config(f"mariadb-{size}", setup(live))
    run_config = ctx.config(f"mariadb-{size}-run", setup(run_state))

    def scan(config: Any, name: str) -> dict[str, Any]:
        result: dict[str, Any] = worker.run(
            "scan",
            {"config": str(config), "log": str(ctx.log(name)), "source_port": PORT},
            log=ctx.log("workers"),
            timeout_s=3600.0,
        )
        return result

    baseline = scan(live_config, f"mariadb-{size}")

    def timed(case: str, count: int) -> dict[str, Any]:
        runs: list[dict[str, Any]] = []
        for _ in range(ctx.plan.runs):
            copy_state(live, run_state)
            agent = scan(run_config, f"mariadb-{size}-run")
            floor = worker.run(
                "floor_mysql",
                {"host": HOST, "port": PORT, "user": USER, "database": DATABASE, "sql": q.slots},
                log=ctx.log("workers"),
            )
            runs.append({"agent": agent, "floor": floor})
        summary = against_floor(runs)
        print(
            f"  MariaDB {size:,} slots, {case}: agent {summary['agent_s']:.2f} s (CPU "
            f"{summary['agent_cpu_s']:.2f} s), floor {summary['floor_s']:.2f} s "
            f"({summary['ratio']:.2f}x), {summary['ranges_read']:.0f} of "
            f"{summary['ranges_total']} ranges read",
            flush=True,
        )
        return {"case": case, "requested": count, **summary, "runs": runs}

    cases: list[dict[str, Any]] = []
    # Quiet: the second catch-up finds nothing changed and records the sum of every row.
    scan(live_config, f"mariadb-{size}")
    scan(live_config, f"mariadb-{size}")
    cases.append(timed("quiet", 0))
    inv.change(1)
    cases.append(timed("one booking, after a quiet pass", 1))
    scan(live_config, f"mariadb-{size}")
    count = max(1, int(size * CHANGED_FRACTION))
    inv.change(count)
    cases.append(timed(f"{CHANGED_FRACTION * 100:g}% changed", count))
    scan(live_config, f"mariadb-{size}")  # caught up with the 0.1% change
    daemon = ctx.path(f"mariadb-{size}-daemon.db")
    copy_state(live, daemon)
    empty_outbox(daemon)
    return {
        "slots": size,
        "version": _version(),
        "baseline_s": baseline["seconds"],
        "baseline_peak_rss_mb": baseline["peak_rss_mb"],
        "poll_interval_s": setup(live).poll_interval_s,
        "cases": cases,
        "daemon": _daemon(ctx, inv, replace(setup(daemon), incremental=False)),
    }


def _daemon(ctx: Context, inv: MariadbInventory, setup: AgentSetup) -> dict[str, Any]:
    """The daemon with the two required queries only: its CPU and MariaDB's at rest, then
    single bookings committed one at a time, each at rest, until their notify arrives."""
    rest_s = QUICK_REST_S if ctx.plan.quick else REST_S
    bookings = QUICK_BOOKINGS if ctx.plan.quick else BOOKINGS
    with Receiver(arrivals=True, log=ctx.log("mariadb-daemon-receiver")) as receiver:
        setup = replace(
            setup,
            base_url=receiver.url,
            poll_interval_s=DAEMON_POLL_S,
            full_scan_interval_s=DAEMON_FULL_SCAN_S,
        )
        daemon = Daemon(ctx.config("mariadb-daemon", setup), ctx.log("mariadb-daemon"))
        try:
            if not daemon.wait_reconciled(START_WAIT_S):
                raise RuntimeError("the MariaDB daemon ran no first pass; see its log")
            time.sleep(SETTLED_S)
            window = time.time()
            agent_cpu, server_cpu = daemon.cpu_s(), mariadb_cpu_s()
            time.sleep(rest_s)
            rest = {
                "rest_s": rest_s,
                "rest_daemon_core": (daemon.cpu_s() - agent_cpu) / rest_s,
                "rest_mariadb_core": (mariadb_cpu_s() - server_cpu) / rest_s,
                "rest_passes": sum(1 for start, _ in daemon.reconciliations() if start >= window),
            }
            print(
                f"  MariaDB daemon, two queries only, at rest for {rest_s:g} s: daemon "
                f"{rest['rest_daemon_core']:.1%} of a core, MariaDB "
                f"{rest['rest_mariadb_core']:.1%}, {rest['rest_passes']} pass(es)",
                flush=True,
            )
            singles = single_bookings(inv.book_one, receiver, bookings, DATA_SEED)
        finally:
            code = daemon.stop()
        if code != 0:
            raise RuntimeError(f"the MariaDB daemon exited with {code}; see its log")
    passes = [end - start for start, end in daemon.reconciliations() if start >= window]
    result = {
        **rest,
        "poll_interval_s": DAEMON_POLL_S,
        "full_scan_interval_s": DAEMON_FULL_SCAN_S,
        "bookings": bookings,
        "missing": singles["singles_missing"],
        "latencies_ms": singles["singles_ms"],
        "p50_ms": singles["singles_p50_ms"],
        "max_ms": singles["singles_max_ms"],
        "passes": len(passes),
        "pass_s": [round(p, 2) for p in passes],
    }
    print(
        f"  MariaDB daemon, {bookings} bookings at rest: p50 {result['p50_ms']:.0f} ms, max "
        f"{result['max_ms']:.0f} ms, {result['missing']} missing; {len(passes)} passes "
        f"{result['pass_s']} s",
        flush=True,
    )
    return result


def _version() -> str:
    conn = pymysql.connect(host=HOST, port=PORT, user=USER)
    try:
        with conn.cursor() as c:
            c.execute("SELECT VERSION()")
            row = c.fetchone()
        return str(row[0]) if row else "?"
    finally:
        conn.close()
