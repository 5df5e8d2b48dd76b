"""8. A platform: one agent, many Seyaha integrations, each row routed by its integration_id.

One agent: what one agent carries. Several agents dividing a platform's integrations are
measured in section 9 (bench/sharing.py).

The inventory is a platform's PostgreSQL schema of its own in the bench database:
suppliers(id, integration_id) -> products -> options -> slots (the columns of bench/inventory.py,
updated_at indexed), N integrations of M slots each (default 1,000 x 200), except one, the
large integration, which holds B slots (default 20,000). The queries return the supplier's
integration_id with every row (README, "A platform: many integrations"); the secrets folder
([seyaha] webhook_secrets_dir) holds one file per integration, its own 64-hex secret. The
fast receiver (bench/receiver.py --secrets-dir) accepts each integration at its own path with
its own secret only (404 for an unknown id, 401 for another's secret) and stamps each call.
The daemon is the real command line (`python -m agent run --config FILE`), with the agent's
defaults but: a slots_changed_query (updated_at >= :since), LISTEN/NOTIFY wake-ups (the
statement-level triggers of agent/source/pg_triggers.py on the slots table, poll_interval at
its default 5 s), a PostgreSQL state store (database seyaha_bench_platform, recreated for
every run and dropped at the end). Defaults that matter here: rate_limit 50 calls/s for all
integrations together, batch_size 50, concurrency 4, range digests on.

Each run:
1. Baseline: a daemon starts on the empty store. "baseline scan" is the time from its
   agent.started to its scan.baseline log line (one full read of every row, every row
   routed, fingerprints recorded; one sync/trigger queued per integration); "baseline
   delivered" is from starting the process until the last integration's trigger arrived.
   Its CPU seconds and peak RSS (VmHWM of /proc/PID/status) are read before it is stopped
   (SIGTERM).
2. Reconciliation: a second daemon starts on the baselined store. Every daemon runs a full
   reconciliation after its first poll, beside the polls: that is the one timed
   (duration_ms of its log line; with range digests, the default on PostgreSQL, it compares
   per-range digests computed by the database and reads only the ranges that changed, here
   none), with the time from starting the process to its end.
3. Bookings: once it is over, after 3 warm-up bookings (each waited for, not counted), K
   single-slot bookings (default 300), each one UPDATE committed, of distinct slots drawn at
   random among the slots of every integration but the large one; open-loop, the next one
   0.1-0.2 s (uniform) after the previous one was due. Commit-to-delivery latency: from right
   after COMMIT returned until the receiver read the notify carrying the new vacancies
   (CLOCK_MONOTONIC on both sides, one clock for the machine).
4. Bookings behind a backlog (fairness): one statement changes the vacancies of every slot
   of the large integration (B rows, updated_at stamped), as a bulk change of one supplier
   would; its wake-up's poll queues B notifies for that one integration. Once the first of
   them arrived (timed from the statement's commit), K more bookings as in 3. At the default
   rate_limit (50/s) a backlog of 20,000 lasts about 400 s, so it waits through the whole
   window: the outbox's pending messages of the large integration are counted (in the state
   store) when the window starts and ends, and if it ran out, the bookings committed after
   its last call are counted apart. Integrations take turns at the claim, so a booking of
   another integration waits for the batches of the backlog already claimed, not for the
   backlog. On a platform a worker claims about agent.delivery.worker.TURN_S (0.1 s) of
   sending at a time, by the answer time and its share of the rate_limit: at the defaults
   (concurrency 4, rate_limit 50/s) one call per claim, so a booking waits for about one
   call per worker (before that rule, a claim took batch_size 50, and a booking waited up
   to concurrency x batch_size / rate_limit = 4 s).
5. The daemon's CPU seconds (per phase) and peak RSS (VmHWM, covering 2-4) are read, then it
   is stopped (SIGTERM: a clean stop, every message kept). The rest of the backlog is then
   delivered by `python -m agent once` with [delivery] rate_limit = 0 (no limit; not a
   measurement: draining the rest at 50/s would take minutes per run), so that every change
   can be checked.
6. Sanity, over every call of the run: no duplicate notify for one (integration, slot,
   vacancies, status); every booking and every slot of the bulk change arrived with its new
   vacancies, at the path of the integration that owns the slot (the receiver checked the
   secret); the receiver refused nothing (404/401); each integration got one sync/trigger
   (its baseline), no more.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import subprocess
import sys
import time
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from bench import agentconf, inventory
from bench.answers import peak_rss_mb
from bench.context import (
    DATA_SEED,
    Context,
    drop_database,
    psycopg_url,
    recreate_database,
    sqlalchemy_url,
)
from bench.inventory import ZONE_NAME, IdPool, Inventory
from bench.latency import Daemon, set_triggers
from bench.receiver import Receiver
from bench.stats import median, percentile

STATE_DATABASE = "seyaha_bench_platform"
"""The PostgreSQL state store of a run's daemons: recreated for every run, dropped at the end."""

SLOTS_PER_OPTION = 50
OPTIONS_PER_PRODUCT = 4
SLOTS_PER_DAY = 4
CAPACITY_RANGE = (10, 60)
CANCELLED_FRACTION = 0.01

ID_PREFIX = "5e7a"
"""Integration k's id is this prefix and k in 20 hex digits (24 hex digits in all)."""

SPACING_S = (0.1, 0.2)
"""A booking this long (uniform) after the previous one was due."""

WARMUP_BOOKINGS = 3
WARMUP_TIMEOUT_S = 120.0
BASELINE_TIMEOUT_S = 1800.0
"""Longest wait for every integration's baseline trigger."""
RECONCILIATION_WAIT_S = 600.0
BACKLOG_QUEUED_WAIT_S = 300.0
"""Longest wait for the first notify of the bulk change."""
DELIVERY_WAIT_S = 30.0
"""After the last booking, how long the ones still on their way are waited for."""
DRAIN_TIMEOUT_S = 1200.0


@dataclass(frozen=True)
class Sizes:
    integrations: int
    slots: int
    """Slots of each integration but the large one."""
    backlog: int
    """Slots of the large integration: the notifies its bulk change queues."""
    bookings: int
    """Measured bookings of each stream (without, then behind the backlog)."""

    @property
    def total_slots(self) -> int:
        return (self.integrations - 1) * self.slots + self.backlog


FULL_SIZES = Sizes(integrations=1000, slots=200, backlog=20_000, bookings=300)
QUICK_SIZES = Sizes(integrations=20, slots=50, backlog=1000, bookings=60)


def sizes(quick: bool, size: str | None = None, bookings: int | None = None) -> Sizes:
    """The sizes of a run: the defaults (FULL_SIZES, or QUICK_SIZES with --quick), changed by
    --platform-size NxM[xB] and --platform-bookings K. ValueError says what is wrong."""
    chosen = QUICK_SIZES if quick else FULL_SIZES
    if size:
        parts = size.lower().replace("_", "").split("x")
        if len(parts) not in (2, 3) or not all(p.isdigit() for p in parts):
            raise ValueError(f"--platform-size takes NxM or NxMxB, e.g. 1000x200x20000 ({size!r})")
        n, m = int(parts[0]), int(parts[1])
        b = int(parts[2]) if len(parts) == 3 else chosen.backlog
        chosen = Sizes(integrations=n, slots=m, backlog=b, bookings=chosen.bookings)
    if bookings is not None:
        chosen = Sizes(chosen.integrations, chosen.slots, chosen.backlog, bookings)
    if chosen.integrations < 2 or min(chosen.slots, chosen.backlog, chosen.bookings) < 1:
        raise ValueError("a platform takes at least 2 integrations, and sizes above 0")
    needed = 2 * chosen.bookings + WARMUP_BOOKINGS
    outside = (chosen.integrations - 1) * chosen.slots
    if needed > outside:
        raise ValueError(
            f"{needed} bookings of distinct slots (warm-up included) need as many slots outside "
            f"the large integration; {chosen.integrations}x{chosen.slots} has {outside}"
        )
    return chosen


# -- the platform's inventory -----------------------------------------------------------------


@dataclass(frozen=True)
class Integration:
    id: str
    secret: str
    first_slot: int
    slots: int

    @property
    def slot_ids(self) -> range:
        return range(self.first_slot, self.first_slot + self.slots)


@dataclass
class Platform:
    schema: str
    integrations: list[Integration]
    large: Integration
    inv: Inventory
    """bench/inventory.py's handle on the slots table (for its booking statement)."""

    def __post_init__(self) -> None:
        self._firsts = [i.first_slot for i in self.integrations]

    def owner(self, slot_id: int) -> Integration:
        return self.integrations[bisect_right(self._firsts, slot_id) - 1]

    def small_slots(self) -> list[int]:
        return [s for i in self.integrations if i is not self.large for s in i.slot_ids]


def integration_id(k: int) -> str:
    return f"{ID_PREFIX}{k:020x}"


def secret_of(integration: str) -> str:
    """Each integration's own 64-hex secret, as Seyaha's are."""
    return hashlib.sha256(f"seyaha-bench-platform {integration}".encode()).hexdigest()


def queries(schema: str) -> tuple[str, str, str]:
    """(catalog_query, slots_query, slots_changed_query), routed by the supplier's id."""
    catalog = (
        "SELECT p.id AS product_id, o.id AS option_id, p.title, p.price_cents,\n"
        "       o.name AS option_name, s.integration_id\n"
        f"FROM {schema}.products p JOIN {schema}.options o ON o.product_id = p.id\n"
        f"JOIN {schema}.suppliers s ON s.id = p.supplier_id\n"
        "WHERE p.published"
    )
    slots = (
        "SELECT o.product_id, t.option_id, t.id AS availability_id,\n"
        "       t.starts_at AS local_date_time_start,\n"
        "       CASE WHEN t.cancelled THEN 'CLOSED' END AS status,\n"
        "       t.capacity - t.booked AS vacancies, t.capacity, s.integration_id\n"
        f"FROM {schema}.slots t JOIN {schema}.options o ON o.id = t.option_id\n"
        f"JOIN {schema}.products p ON p.id = o.product_id\n"
        f"JOIN {schema}.suppliers s ON s.id = p.supplier_id\n"
        "WHERE t.starts_at >= now() - interval '1 day'"
    )
    return catalog, slots, slots + "\n  AND t.updated_at >= :since"


def create(conn: psycopg.Connection, sizes: Sizes, seed: int) -> Platform:
    """The schema platform_NxMxB, filled with COPY (replaced if it exists)."""
    schema = f"platform_{sizes.integrations}x{sizes.slots}x{sizes.backlog}"
    ident = sql.Identifier(schema)
    rand = random.Random(seed)
    large = sizes.integrations // 2
    integrations: list[Integration] = []
    next_slot = 1
    for k in range(sizes.integrations):
        count = sizes.backlog if k == large else sizes.slots
        iid = integration_id(k)
        integrations.append(Integration(iid, secret_of(iid), next_slot, count))
        next_slot += count
    with conn.transaction():
        conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(ident))
        conn.execute(sql.SQL("CREATE SCHEMA {}").format(ident))
        for table in (
            "CREATE TABLE {}.suppliers (id integer PRIMARY KEY, integration_id text NOT NULL)",
            "CREATE TABLE {}.products (id integer PRIMARY KEY, supplier_id integer NOT NULL, "
            "title text NOT NULL, price_cents integer NOT NULL, published boolean NOT NULL)",
            "CREATE TABLE {}.options (id text PRIMARY KEY, product_id integer NOT NULL, "
            "name text NOT NULL)",
            "CREATE TABLE {}.slots (id bigint NOT NULL, option_id text NOT NULL, "
            "starts_at timestamp NOT NULL, capacity integer NOT NULL, booked integer NOT NULL, "
            "cancelled boolean NOT NULL, updated_at timestamptz NOT NULL DEFAULT now())",
        ):
            conn.execute(sql.SQL(table).format(ident))
        first_day = date.today() + timedelta(days=1)
        loaded_at = (datetime.now() - timedelta(days=1)).isoformat(sep=" ") + "+00"
        suppliers, products, options = io.StringIO(), io.StringIO(), io.StringIO()
        slots = io.StringIO()
        product = option = 0
        for supplier, integration in enumerate(integrations, start=1):
            suppliers.write(f"{supplier}\t{integration.id}\n")
            in_option = SLOTS_PER_OPTION  # a new option at the first slot
            options_of_product = OPTIONS_PER_PRODUCT
            for slot_id in integration.slot_ids:
                if in_option == SLOTS_PER_OPTION:
                    if options_of_product == OPTIONS_PER_PRODUCT:
                        product += 1
                        options_of_product = 0
                        products.write(
                            f"{product}\t{supplier}\tTour {product}\t{1000 + product % 9000}\tt\n"
                        )
                    option += 1
                    options_of_product += 1
                    options.write(f"po-{option:07d}\t{product}\tOption {option}\n")
                    in_option = 0
                day = first_day + timedelta(days=in_option // SLOTS_PER_DAY)
                hour = 9 + 3 * (in_option % SLOTS_PER_DAY)
                in_option += 1
                capacity = rand.randint(*CAPACITY_RANGE)
                booked = rand.randint(0, capacity)
                cancelled = "t" if rand.random() < CANCELLED_FRACTION else "f"
                slots.write(
                    f"{slot_id}\tpo-{option:07d}\t{day.isoformat()} {hour:02d}:00:00\t"
                    f"{capacity}\t{booked}\t{cancelled}\t{loaded_at}\n"
                )
        for table, columns, data in (
            ("suppliers", "id, integration_id", suppliers),
            ("products", "id, supplier_id, title, price_cents, published", products),
            ("options", "id, product_id, name", options),
            (
                "slots",
                "id, option_id, starts_at, capacity, booked, cancelled, updated_at",
                slots,
            ),
        ):
            copying = sql.SQL("COPY {}.{} (" + columns + ") FROM STDIN").format(
                ident, sql.Identifier(table)
            )
            with conn.cursor().copy(copying) as copy:
                copy.write(data.getvalue())
        for statement in (
            "ALTER TABLE {}.slots ADD PRIMARY KEY (id)",
            "CREATE INDEX ON {}.slots (updated_at)",
            "CREATE INDEX ON {}.slots (option_id)",
            "CREATE INDEX ON {}.products (supplier_id)",
        ):
            conn.execute(sql.SQL(statement).format(ident))
    for table in ("suppliers", "products", "options", "slots"):
        conn.execute(sql.SQL("ANALYZE {}.{}").format(ident, sql.Identifier(table)))
    inv = Inventory(schema=schema, slots=next_slot - 1, ids=IdPool(next_slot - 1, seed))
    return Platform(schema, integrations, integrations[large], inv)


def write_secrets(folder: Path, platform: Platform) -> Path:
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    for integration in platform.integrations:
        path = folder / integration.id
        path.write_text(integration.secret + "\n", encoding="utf-8")
        path.chmod(0o600)
    return folder


def write_config(
    ctx: Context,
    name: str,
    platform: Platform,
    *,
    base_url: str,
    secrets_dir: Path,
    delivery: dict[str, Any] | None = None,
    source: dict[str, Any] | None = None,
    state: dict[str, Any] | None = None,
    listen: str = "127.0.0.1:0",
) -> Path:
    """A platform's configuration: no integration_id, the secrets folder, routed queries;
    `delivery`, `source` and `state` add settings to their sections, `listen` is [metrics]
    listen (empty: no listener)."""
    catalog, slots, changed = queries(platform.schema)

    def s(value: object) -> str:
        return json.dumps(value)  # a TOML basic string (or number)

    def settings(values: dict[str, Any] | None) -> str:
        return "".join(f"{key} = {s(value)}\n" for key, value in (values or {}).items())

    folder = ctx.workdir / "config"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    more = settings(delivery)
    path.write_text(
        f"""# Written by bench/platform.py for one measurement.
[seyaha]
base_url = {s(base_url)}
webhook_secrets_dir = {s(str(secrets_dir))}

[source]
url = {s(ctx.source_url)}
timezone = {s(ZONE_NAME)}
notify_channel = {s(agentconf.NOTIFY_CHANNEL)}
notify_tables = [{s(platform.schema + ".slots")}]
catalog_query = '''{catalog}'''
slots_query = '''{slots}'''
slots_changed_query = '''{changed}'''
{settings(source)}
[state]
url = {s(sqlalchemy_url(STATE_DATABASE))}
{settings(state)}
[delivery]
{more}
[metrics]
listen = {s(listen)}

[log]
level = "INFO"
format = "json"
""",
        encoding="utf-8",
    )
    return path


# -- one run ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Booking:
    slot: str
    vacancies: int
    integration: str
    committed: float
    """time.monotonic() right after COMMIT returned."""


def book(ctx: Context, platform: Platform, slot_id: int) -> Booking:
    ((slot, vacancies),) = inventory.book(ctx.conn, platform.inv, [slot_id]).items()
    return Booking(slot, vacancies, platform.owner(slot_id).id, time.monotonic())


def stream(
    ctx: Context, platform: Platform, slot_ids: list[int], rand: random.Random
) -> list[Booking]:
    """One booking per slot, open-loop: each due SPACING_S after the previous one was due."""
    done = []
    due = time.monotonic()
    for slot_id in slot_ids:
        pause = due - time.monotonic()
        if pause > 0:
            time.sleep(pause)
        done.append(book(ctx, platform, slot_id))
        due += rand.uniform(*SPACING_S)
    return done


def latency(bookings: list[Booking], arrived: dict[str, float]) -> dict[str, Any]:
    ms = [(arrived[b.slot] - b.committed) * 1000 for b in bookings if b.slot in arrived]
    return {
        "bookings": len(bookings),
        "integrations": len({b.integration for b in bookings}),
        "delivered": len(ms),
        "missing": len(bookings) - len(ms),
        "p50_ms": percentile(ms, 0.50),
        "p95_ms": percentile(ms, 0.95),
        "p99_ms": percentile(ms, 0.99),
        "max_ms": max(ms) if ms else float("nan"),
        "seconds": bookings[-1].committed - bookings[0].committed if bookings else 0.0,
    }


def bulk_change(ctx: Context, platform: Platform) -> dict[str, int]:
    """One statement changing the vacancies of every slot of the large integration."""
    ids = platform.large.slot_ids
    statement = sql.SQL(
        "UPDATE {} SET booked = CASE WHEN booked < capacity THEN booked + 1 "
        "ELSE booked - 1 END, updated_at = now() WHERE id BETWEEN %s AND %s "
        "RETURNING id, capacity - booked"
    ).format(platform.inv.table)
    with ctx.conn.transaction():
        rows = ctx.conn.execute(statement, (ids.start, ids.stop - 1)).fetchall()
    return {str(slot): int(vacancies) for slot, vacancies in rows}


def pending(integration: str) -> int:
    """Messages of `integration` waiting in the state store's outbox (leased ones included)."""
    with psycopg.connect(psycopg_url(STATE_DATABASE), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM seyaha_outbox WHERE integration_id = %s AND state = 'pending'",
            (integration,),
        ).fetchone()
    return int(row[0]) if row else 0


def records(log: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The JSON records of the daemon's log (of `event` only, if given)."""
    found = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and (event is None or record.get("event") == event):
            found.append(record)
    return found


def _epoch(record: dict[str, Any]) -> float:
    return datetime.fromisoformat(record["ts"]).timestamp()


def baseline(
    ctx: Context, platform: Platform, config: Path, name: str, receiver: Receiver
) -> dict[str, Any]:
    """Step 1: a daemon on the empty store, until every integration's trigger arrived."""
    log = ctx.log(f"{name}-baseline")
    started, started_wall = time.monotonic(), time.time()
    daemon = Daemon(config, log)
    try:
        found = wait_baseline(platform, daemon, log, receiver, started, started_wall)
    finally:
        code = daemon.stop()
    if code != 0:
        raise RuntimeError(f"the baseline daemon exited with {code}; see {log}")
    return found


def wait_baseline(
    platform: Platform,
    daemon: Daemon,
    log: Path,
    receiver: Receiver,
    started: float,
    started_wall: float,
) -> dict[str, Any]:
    """Wait until every integration's trigger arrived and the daemon (started at `started`,
    time.monotonic(), and `started_wall`, epoch seconds, on an empty store) logged its
    scan.baseline; its baseline figures, its CPU seconds and peak RSS so far. It is left
    running."""
    wanted = {i.id for i in platform.integrations}
    deadline = started + BASELINE_TIMEOUT_S
    while True:
        first: dict[str, float] = {}
        for integration, at in receiver.triggers():
            first.setdefault(integration, at)
        if wanted <= first.keys():
            break
        if daemon.process.poll() is not None:
            raise RuntimeError(f"the baseline daemon exited; see {log}")
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"{len(wanted - first.keys())} integrations' baseline triggers never "
                f"arrived; see {log}"
            )
        time.sleep(0.2)
    # The triggers are queued with the first chunk of the baseline and delivered while
    # it records the rest of the slots: its end is waited for too.
    while not records(log, "scan.baseline"):
        if daemon.process.poll() is not None or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    cpu_s = daemon.cpu_s()
    rss_mb = peak_rss_mb(daemon.process.pid)
    begun = records(log, "agent.started")
    recorded = records(log, "scan.baseline")
    if not begun or not recorded:
        raise RuntimeError(f"no agent.started or scan.baseline line in {log}")
    return {
        "scan_s": _epoch(recorded[0]) - _epoch(begun[0]),
        "start_to_recorded_s": _epoch(recorded[0]) - started_wall,
        "delivered_s": max(first[i] for i in wanted) - started,
        "cpu_s": cpu_s,
        "peak_rss_mb": rss_mb,
    }


def one_run(
    ctx: Context, platform: Platform, sizes: Sizes, run: int, secrets_dir: Path
) -> dict[str, Any]:
    name = f"platform-{run}"
    recreate_database(STATE_DATABASE)
    rand = random.Random(DATA_SEED + 701 + run)
    count = sizes.bookings
    picks = rand.sample(platform.small_slots(), WARMUP_BOOKINGS + 2 * count)
    warm, quiet = picks[:WARMUP_BOOKINGS], picks[WARMUP_BOOKINGS : WARMUP_BOOKINGS + count]
    behind = picks[WARMUP_BOOKINGS + count :]
    receiver_log = ctx.log(f"{name}-receiver")
    with Receiver(arrivals=True, log=receiver_log, secrets_dir=secrets_dir) as receiver:
        config = write_config(ctx, name, platform, base_url=receiver.url, secrets_dir=secrets_dir)
        first = baseline(ctx, platform, config, name, receiver)
        print(
            f"  {name}: baseline scan {first['scan_s']:.1f} s, every integration's trigger "
            f"delivered after {first['delivered_s']:.1f} s; peak RSS "
            f"{first['peak_rss_mb']:.0f} MB, CPU {first['cpu_s']:.1f} s",
            flush=True,
        )

        log = ctx.log(name)
        started_wall = time.time()
        daemon = Daemon(config, log)
        bookings: list[Booking] = []
        try:
            if not daemon.wait_reconciled(RECONCILIATION_WAIT_S):
                raise RuntimeError(f"the daemon ran no reconciliation after its start; see {log}")
            (reconciled,) = [r for r in records(log) if r.get("scan") == "full"][:1]
            cpu_reconciled = daemon.cpu_s()
            reconciliation = {
                "reconciliation_s": float(reconciled["duration_ms"]) / 1000,
                "start_to_reconciled_s": _epoch(reconciled) - started_wall,
                "ranges_read": reconciled.get("ranges_read"),
                "ranges_total": reconciled.get("ranges_total"),
                "cpu_s": cpu_reconciled,
            }
            print(
                f"  {name}: reconciliation after the restart {reconciliation['reconciliation_s']:.2f} s "
                f"(over {reconciliation['start_to_reconciled_s']:.1f} s after the start; ranges "
                f"read {reconciled.get('ranges_read')} of {reconciled.get('ranges_total')})",
                flush=True,
            )

            for slot_id in warm:
                done = book(ctx, platform, slot_id)
                bookings.append(done)
                if not receiver.wait_for([(done.slot, done.vacancies)], WARMUP_TIMEOUT_S):
                    raise RuntimeError(f"a warm-up booking of slot {done.slot} never arrived")

            cpu_before = daemon.cpu_s()
            plain = stream(ctx, platform, quiet, rand)
            bookings += plain
            arrived = receiver.wait_for([(b.slot, b.vacancies) for b in plain], DELIVERY_WAIT_S)
            quiet_result = {**latency(plain, arrived), "cpu_s": daemon.cpu_s() - cpu_before}
            print(
                f"  {name}: {count} bookings over {quiet_result['integrations']} integrations: "
                f"p50 {quiet_result['p50_ms']:.0f} ms, p99 {quiet_result['p99_ms']:.0f} ms, "
                f"{quiet_result['missing']} missing",
                flush=True,
            )

            large = platform.large.id
            changed = bulk_change(ctx, platform)
            changed_at = time.monotonic()
            first_call = _first_arrival_of(receiver, large, after=changed_at)
            waiting_at_start = pending(large)
            cpu_before = daemon.cpu_s()
            sent_before = _arrivals_of(receiver, large)
            window_start = time.monotonic()
            behind_backlog = stream(ctx, platform, behind, rand)
            window_end = time.monotonic()
            waiting_at_end = pending(large)
            sent_during = _arrivals_of(receiver, large) - sent_before
            # Bookings committed while the backlog waited: all of them, unless it ran out.
            emptied = (
                max(a.at for a in receiver.arrivals() if a.integration == large)
                if waiting_at_end == 0
                else None
            )
            waited = sum(emptied is None or b.committed < emptied for b in behind_backlog)
            bookings += behind_backlog
            arrived = receiver.wait_for(
                [(b.slot, b.vacancies) for b in behind_backlog], DELIVERY_WAIT_S
            )
            backlog_result = {
                **latency(behind_backlog, arrived),
                "cpu_s": daemon.cpu_s() - cpu_before,
                "changed_rows": len(changed),
                "committed_behind_backlog": waited,
                "first_backlog_call_after_s": first_call - changed_at,
                "waiting_at_start": waiting_at_start,
                "waiting_at_end": waiting_at_end,
                "large_sent_per_s": sent_during / (window_end - window_start),
            }
            print(
                f"  {name}: {count} bookings behind a backlog of {waiting_at_start:,} "
                f"({waiting_at_end:,} left at the end): p50 {backlog_result['p50_ms']:.0f} ms, "
                f"p99 {backlog_result['p99_ms']:.0f} ms, {backlog_result['missing']} missing; "
                f"the large integration got {backlog_result['large_sent_per_s']:.0f} calls/s",
                flush=True,
            )
            if waited < len(behind_backlog):
                print(
                    f"  {name}: the backlog ran out during the window: only {waited} of "
                    f"{len(behind_backlog)} bookings were committed behind it",
                    flush=True,
                )
            daemon_result = {
                "cpu_s": daemon.cpu_s(),
                "peak_rss_mb": peak_rss_mb(daemon.process.pid),
            }
        finally:
            code = daemon.stop()
        if code != 0:
            raise RuntimeError(f"the daemon exited with {code}; see {log}")

        drain_config = write_config(
            ctx,
            f"{name}-drain",
            platform,
            base_url=receiver.url,
            secrets_dir=secrets_dir,
            delivery={"rate_limit": 0.0},
        )
        drained = _drain(drain_config, ctx.log(f"{name}-drain"))
        receiver.wait_for(changed.items(), DELIVERY_WAIT_S)
        time.sleep(1.0)  # stray calls, if any, are counted too
        sanity = check(platform, receiver, bookings, changed)
    print(
        f"  {name}: sanity: {sanity['duplicates']} duplicate notifies, "
        f"{sanity['lost_bookings']} bookings and {sanity['lost_backlog']} backlog changes lost, "
        f"{sanity['wrong_integration']} at another integration's path, {sanity['refused']} "
        f"refused, {sanity['unexpected']} unexpected; triggers: {sanity['triggers']} for "
        f"{sanity['integrations_triggered']} of {sizes.integrations} integrations",
        flush=True,
    )
    return {
        "baseline": first,
        "reconciliation": reconciliation,
        "quiet": quiet_result,
        "backlog": backlog_result,
        "daemon": daemon_result,
        "drain": drained,
        "sanity": sanity,
    }


def _arrivals_of(receiver: Receiver, integration: str) -> int:
    return sum(a.integration == integration for a in receiver.arrivals())


def _first_arrival_of(receiver: Receiver, integration: str, *, after: float) -> float:
    deadline = time.monotonic() + BACKLOG_QUEUED_WAIT_S
    while time.monotonic() < deadline:
        found = [a.at for a in receiver.arrivals() if a.integration == integration and a.at > after]
        if found:
            return min(found)
        time.sleep(0.05)
    raise RuntimeError("no notify of the bulk change arrived")


def _drain(config: Path, log: Path) -> dict[str, Any]:
    """`python -m agent once`, rate_limit 0: the rest of the backlog, after the daemon stopped."""
    started = time.monotonic()
    with open(log, "ab") as err:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "agent",
                "once",
                "--config",
                str(config),
                "--timeout",
                str(DRAIN_TIMEOUT_S),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            timeout=DRAIN_TIMEOUT_S + 120,
            check=False,
        )
    out = done.stdout.decode("utf-8", "replace")
    with open(log, "a", encoding="utf-8") as text:
        text.write(out)
    if done.returncode != 0:
        raise RuntimeError(f"`agent once` exited with {done.returncode}: {out.strip()}")
    scanned = re.search(r"in ([0-9.]+) s", out)
    sent = re.search(r"sent (\d+) sync/trigger and (\d+) availability/notify", out)
    return {
        "seconds": time.monotonic() - started,
        "scan_s": float(scanned[1]) if scanned else None,
        "notifies": int(sent[2]) if sent else None,
        "triggers": int(sent[1]) if sent else None,
    }


def check(
    platform: Platform, receiver: Receiver, bookings: list[Booking], changed: dict[str, int]
) -> dict[str, Any]:
    """Step 6: every call of the run against what was changed."""
    arrivals = receiver.arrivals()
    owners = {i.id for i in platform.integrations}
    expected = {(b.slot, str(b.vacancies)) for b in bookings}
    backlog = {(slot, str(v)) for slot, v in changed.items()}
    seen = {(a.slot, a.vacancies) for a in arrivals}
    calls = Counter((a.integration, a.slot, a.vacancies, a.status) for a in arrivals)
    triggers = Counter(integration for integration, _ in receiver.triggers())
    return {
        "notifies": len(arrivals),
        "duplicates": sum(n - 1 for n in calls.values() if n > 1),
        "lost_bookings": len(expected - seen),
        "lost_backlog": len(backlog - seen),
        "wrong_integration": sum(a.integration != platform.owner(int(a.slot)).id for a in arrivals),
        "unexpected": len(seen - expected - backlog),
        "refused": receiver.stats()["refused"],
        "triggers": sum(triggers.values()),
        "integrations_triggered": len(triggers.keys() & owners),
        "extra_triggers": sum(n - 1 for n in triggers.values() if n > 1)
        + sum(n for i, n in triggers.items() if i not in owners),
    }


# -- the measurement ----------------------------------------------------------------------------


def measure(ctx: Context, sizes: Sizes | None = None) -> dict[str, Any]:
    sizes = sizes or (QUICK_SIZES if ctx.plan.quick else FULL_SIZES)
    print(
        f"  platform: {sizes.integrations:,} integrations, {sizes.slots:,} slots each but one "
        f"of {sizes.backlog:,} ({sizes.total_slots:,} slots); {sizes.bookings} bookings per "
        "stream",
        flush=True,
    )
    generated = time.perf_counter()
    platform = create(ctx.conn, sizes, DATA_SEED + 7)
    generate_s = time.perf_counter() - generated
    secrets_dir = write_secrets(ctx.workdir / "platform-secrets", platform)
    runs = []
    set_triggers(ctx, platform.inv, installed=True)
    try:
        for run in range(ctx.plan.runs):
            begun = time.monotonic()
            runs.append(one_run(ctx, platform, sizes, run, secrets_dir))
            runs[-1]["run_s"] = time.monotonic() - begun
            ctx.changed()
    finally:
        set_triggers(ctx, platform.inv, installed=False)
        drop_database(STATE_DATABASE)
    return {
        "integrations": sizes.integrations,
        "slots_per_integration": sizes.slots,
        "large_integration_slots": sizes.backlog,
        "slots": sizes.total_slots,
        "bookings_per_stream": sizes.bookings,
        "spacing_s": list(SPACING_S),
        "generate_s": generate_s,
        **_medians(runs),
        "runs": runs,
    }


def _medians(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def of(part: str, key: str) -> float:
        values = [r[part][key] for r in runs if r[part].get(key) is not None]
        return median(values)

    merged: dict[str, Any] = {}
    for part, keys in (
        ("baseline", ("scan_s", "start_to_recorded_s", "delivered_s", "cpu_s", "peak_rss_mb")),
        ("reconciliation", ("reconciliation_s", "start_to_reconciled_s")),
        ("quiet", ("p50_ms", "p95_ms", "p99_ms", "max_ms", "cpu_s")),
        (
            "backlog",
            (
                "p50_ms",
                "p95_ms",
                "p99_ms",
                "max_ms",
                "cpu_s",
                "first_backlog_call_after_s",
                "waiting_at_start",
                "waiting_at_end",
                "large_sent_per_s",
            ),
        ),
        ("daemon", ("cpu_s", "peak_rss_mb")),
    ):
        merged[part] = {key: of(part, key) for key in keys}
    sanity_keys = runs[0]["sanity"].keys() if runs else ()
    merged["sanity"] = {k: sum(r["sanity"][k] for r in runs) for k in sanity_keys}
    for part in ("quiet", "backlog"):
        merged[part]["bookings"] = sum(r[part]["bookings"] for r in runs)
        merged[part]["missing"] = sum(r[part]["missing"] for r in runs)
    merged["backlog"]["committed_behind_backlog"] = sum(
        r["backlog"]["committed_behind_backlog"] for r in runs
    )
    return merged
