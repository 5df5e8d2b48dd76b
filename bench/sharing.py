"""9. Agents sharing a platform: N agents on one PostgreSQL state store divide its integrations.

The platform, its secrets folder, the fast receiver, the configuration and the booking
statement are bench/platform.py's (section 8): suppliers(id, integration_id) -> products ->
options -> slots on PostgreSQL, N integrations of M slots each (default 1,000 x 200; --quick
50 x 50; here no integration is larger than the others), LISTEN/NOTIFY wake-ups, a PostgreSQL
state store (section 8's database, seyaha_bench_platform, recreated for every agent count and
dropped at the end), the agent's defaults but [state] scanner_lease (--lease, default 15 s,
the agent's default; --quick 3 s), [source] full_scan_interval (60 s; --quick 10 s: see 2)
and [metrics] listen = "" (no listener, so that the agents' ports cannot clash). Every agent
is the real command line (`python -m agent run --config FILE`), each with its own copy of one
configuration and its own log. The agents divide the integrations into 64 shards (CRC-32 of
the id modulo 64), each a lease row `shard:NN` in seyaha_leases held by one agent.

For each agent count N (--agents, default 1,3):
1. Baseline, then division. One agent starts on the empty store: "baseline scan" is the time
   from its agent.started to its scan.baseline log line, "baseline delivered" from starting
   the process until the last integration's sync/trigger arrived (as in section 8). Then
   the other N-1 agents start, and the division is waited for: every agent's last
   scan.shards log line (logged whenever its holding changes) says it holds more than 0 and
   at most ceil(64 / N) shards, and they add up to 64. "Division" is the time from starting
   the others until the latest of those lines (not applicable with one agent, which holds
   all 64 from its start). Shard lines logged after it, until the takeover, are counted
   ("reshuffles"; 0 when the division is stable).
2. A full cycle. An agent runs a reconciliation after its first poll, but the agents that
   join hold no shard yet at their first poll (the first one gives its excess back at its
   next round), so that one does nothing; with one agent the baseline itself was the first
   full scan. What is timed is therefore the next scheduled reconciliation, with
   full_scan_interval set short (60 s; --quick 10 s): for each agent, the first full
   reconciliation (a scan.unchanged or scan.changes line with scan = full) that began (its
   line's time minus its duration_ms) after that agent's last scan.shards line, i.e. one that
   covers exactly the shards it holds in the end. Its duration_ms is reported per agent (the
   work); "cycle" is from the division (1; with one agent, from its scan.baseline line) until
   the last of those reconciliations ended, i.e. until every shard was reconciled once by its
   final holder: it includes the wait for each agent's schedule (up to full_scan_interval),
   so it says when, not how fast. With one agent (all 64 shards) it compares range digests;
   agents holding part of the shards read every row (range digests cover every integration).
3. Bookings: after 3 warm-up bookings (each waited for, not counted), K single-slot bookings
   (--bookings, default 300; --quick 60) of distinct slots drawn at random among every
   integration's, open-loop, the next one 0.1-0.2 s (uniform) after the previous one was due;
   commit-to-delivery from right after COMMIT returned until the receiver read the notify
   (CLOCK_MONOTONIC on both sides). Reconciliations keep running every full_scan_interval:
   the bookings committed while any agent's reconciliation ran (spans from the logs) are
   counted, with their p99, apart.
4. Takeover (N >= 2): the victim is the agent that took the baseline. Its shards are read
   from seyaha_leases (rows shard:NN whose holder, "host:PID:hex", names its pid), and its
   integrations found by CRC-32 of their ids modulo 64. It is killed (SIGKILL), and at once
   60 bookings of distinct slots of its integrations only are committed, open-loop as in 3.
   "Takeover" is from the SIGKILL until the survivors' scan.shards lines (their latest
   counts) add up to 64 again; the promise is scanner_lease + scanner_lease / 3. The
   bookings' commit-to-delivery is expected to be about one lease: nobody scans their
   shards until the victim's leases run out; a survivor that takes a shard reads on from the
   change cursor the victim recorded for it. They are waited for up to 2 x lease + 30 s.
   The stream lasts about 9 s: at a lease of 15 s every booking is committed before the
   takeover, at a short one (--quick, 3 s) only the first ones are; how many is counted.
5. Per agent: peak RSS (VmHWM of /proc/PID/status) and CPU seconds (utime + stime of
   /proc/PID/stat), over its whole life, read right before it is killed or stopped.
6. Before the check, the outbox is waited for until nothing is pending (up to [delivery]
   lease + 30 s): a message the victim had claimed but not recorded as sent is claimed again
   by a survivor only once its delivery lease (60 s) ran out, and that call is sent twice
   (at-least-once); such duplicates are counted and listed, not hidden. Sanity over every
   call: no duplicate notify for one (integration, slot, vacancies, status); every booking
   arrived with its new vacancies, at the path of the integration that owns the slot (the
   receiver checked the secret); the receiver refused nothing (404/401); each integration
   got one sync/trigger (its baseline), no more.
7. The survivors are stopped (SIGTERM); their logs, and the victim's, are searched for
   error lines, scan.failed and anything that is not a JSON line (a traceback): listed.
"""

from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import time
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

from bench import platform
from bench.answers import peak_rss_mb
from bench.context import DATA_SEED, Context, drop_database, psycopg_url, recreate_database
from bench.latency import DAEMON_STOP_TIMEOUT_S, Daemon, set_triggers
from bench.platform import Booking, Platform, Sizes, records
from bench.receiver import Receiver
from bench.stats import percentile

STATE_DATABASE = platform.STATE_DATABASE
"""platform.write_config points every agent at this store (recreated for every agent count)."""

SHARDS = 64
"""agent/shards.py: shard_of(id) = CRC-32 of the id modulo SHARDS; computed here on its own."""

FULL_SIZES = Sizes(integrations=1000, slots=200, backlog=200, bookings=300)
QUICK_SIZES = Sizes(integrations=50, slots=50, backlog=50, bookings=60)
FULL_LEASE_S = 15.0
QUICK_LEASE_S = 3.0
FULL_SCAN_INTERVAL_S = 60.0
QUICK_SCAN_INTERVAL_S = 10.0
DEFAULT_AGENTS = (1, 3)

TAKEOVER_BOOKINGS = 60
DELIVERY_LEASE_S = 60.0
"""[delivery] lease, the agent's default (not changed here)."""
DIVISION_TIMEOUT_S = 300.0
CYCLE_EXTRA_S = 600.0
"""Beyond full_scan_interval, how long the reconciliations of step 2 are waited for."""
DELIVERY_WAIT_S = 30.0
OUTBOX_EXTRA_S = 30.0
PROBLEMS_SHOWN = 40


@dataclass(frozen=True)
class Options:
    agents: tuple[int, ...]
    sizes: Sizes
    lease_s: float
    full_scan_interval_s: float


def options(
    quick: bool,
    agents: str | None = None,
    size: str | None = None,
    bookings: int | None = None,
    lease: float | None = None,
) -> Options:
    """The options of a run; ValueError says what is wrong. --platform-size NxM[xB]: B (one
    integration's slots) is M unless given."""
    chosen = QUICK_SIZES if quick else FULL_SIZES
    counts = DEFAULT_AGENTS
    if agents:
        try:
            counts = tuple(int(a) for a in agents.split(",") if a.strip())
        except ValueError:
            raise ValueError(
                f"--agents takes a comma-separated list of counts ({agents!r})"
            ) from None
        if not counts or min(counts) < 1:
            raise ValueError("--agents takes counts of 1 or more")
    spelled = size or f"{chosen.integrations}x{chosen.slots}"
    parts = spelled.lower().replace("_", "").split("x")
    if len(parts) == 2:
        spelled = f"{spelled}x{parts[1]}"
    sizes = platform.sizes(quick, spelled, bookings if bookings is not None else chosen.bookings)
    lease_s = lease if lease is not None else (QUICK_LEASE_S if quick else FULL_LEASE_S)
    if lease_s < 2:
        raise ValueError("--lease takes 2 s or more (the agent's minimum scanner_lease)")
    interval = QUICK_SCAN_INTERVAL_S if quick else FULL_SCAN_INTERVAL_S
    return Options(counts, sizes, lease_s, interval)


def shard_of(integration_id: str) -> int:
    return zlib.crc32(integration_id.encode("utf-8")) % SHARDS


def share(agents: int) -> int:
    return math.ceil(SHARDS / agents)


# -- the agents --------------------------------------------------------------------------------


@dataclass
class Agent:
    number: int
    log: Path
    daemon: Daemon
    started_wall: float
    cpu_s: float | None = None
    peak_rss_mb: float | None = None
    exit_code: int | None = None
    role: str = "agent"
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.daemon.process.pid

    def alive(self) -> bool:
        return self.daemon.process.poll() is None

    def shard_lines(self) -> list[dict[str, Any]]:
        return records(self.log, "scan.shards")

    def read_usage(self) -> None:
        """Step 5, right before it is killed or stopped."""
        if self.alive():
            self.cpu_s = self.daemon.cpu_s()
            self.peak_rss_mb = peak_rss_mb(self.pid)

    def summary(self) -> dict[str, Any]:
        return {
            "agent": self.number,
            "pid": self.pid,
            "role": self.role,
            "cpu_s": self.cpu_s,
            "peak_rss_mb": self.peak_rss_mb,
            "exit_code": self.exit_code,
            **self.notes,
        }


def start(ctx: Context, config: Path, name: str, number: int) -> Agent:
    log = ctx.log(f"{name}-agent{number}")
    started_wall = time.time()
    return Agent(number, log, Daemon(config, log), started_wall)


def _epoch(record: dict[str, Any]) -> float:
    return platform._epoch(record)


def wait_divided(agents: list[Agent], timeout_s: float) -> tuple[float, dict[int, int]]:
    """Step 1: until every agent's last scan.shards line holds (0, ceil(64/N)] and they add up
    to 64; (epoch of the latest of those lines, {agent number: shards})."""
    deadline = time.monotonic() + timeout_s
    top = share(len(agents))
    while True:
        last = {a.number: a.shard_lines()[-1:] for a in agents}
        if all(last.values()):
            held = {n: int(lines[0]["shards"]) for n, lines in last.items()}
            if sum(held.values()) == SHARDS and all(0 < h <= top for h in held.values()):
                return max(_epoch(lines[0]) for lines in last.values()), held
        for a in agents:
            if not a.alive():
                raise RuntimeError(f"agent {a.number} exited; see {a.log}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the shards were not divided after {timeout_s:.0f} s: {last}")
        time.sleep(0.2)


def full_reconciliations(log: Path) -> list[dict[str, Any]]:
    """Full reconciliations of a log (scan.unchanged / scan.changes with scan = full), each
    with its start and end in epoch seconds."""
    found = []
    for record in records(log):
        if record.get("scan") != "full" or "duration_ms" not in record:
            continue
        end = _epoch(record)
        found.append({**record, "start": end - float(record["duration_ms"]) / 1000, "end": end})
    return found


def wait_cycle(agents: list[Agent], timeout_s: float) -> dict[int, dict[str, Any]]:
    """Step 2: for each agent, its first full reconciliation that began after its last
    scan.shards line."""
    deadline = time.monotonic() + timeout_s
    while True:
        found: dict[int, dict[str, Any]] = {}
        for a in agents:
            since = _epoch(a.shard_lines()[-1])
            after = [r for r in full_reconciliations(a.log) if r["start"] >= since]
            if after:
                found[a.number] = after[0]
        if len(found) == len(agents):
            return found
        for a in agents:
            if not a.alive():
                raise RuntimeError(f"agent {a.number} exited; see {a.log}")
        if time.monotonic() > deadline:
            missing = sorted({a.number for a in agents} - found.keys())
            raise RuntimeError(f"agents {missing} ran no reconciliation of their final shards")
        time.sleep(0.5)


def shards_held_by(pid: int) -> set[int]:
    """Step 4: the shards whose lease row names `pid` ("host:PID:hex") and has not run out
    (the database's clock)."""
    with psycopg.connect(psycopg_url(STATE_DATABASE), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT name, holder, until_ms, "
            "(extract(epoch from clock_timestamp()) * 1000)::bigint FROM seyaha_leases "
            "WHERE name LIKE 'shard:%%'"
        ).fetchall()
    held = set()
    for name, holder, until_ms, now_ms in rows:
        parts = str(holder).rsplit(":", 2)
        if len(parts) == 3 and parts[1] == str(pid) and int(until_ms) > int(now_ms):
            held.add(int(str(name).removeprefix("shard:")))
    return held


def pending_messages() -> int:
    with psycopg.connect(psycopg_url(STATE_DATABASE), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM seyaha_outbox WHERE state = 'pending'").fetchone()
    return int(row[0]) if row else 0


def wait_outbox_empty(timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while True:
        left = pending_messages()
        if left == 0 or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def taken_over_at(survivors: list[Agent], killed_wall: float, timeout_s: float) -> float | None:
    """Step 4: epoch of the first survivor shard line after the kill at which the survivors'
    latest counts add up to 64; None if that did not happen within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        counts: dict[int, int] = {}
        events: list[tuple[float, int, int]] = []
        for a in survivors:
            for line in a.shard_lines():
                at = _epoch(line)
                if at <= killed_wall:
                    counts[a.number] = int(line["shards"])
                else:
                    events.append((at, a.number, int(line["shards"])))
        for at, number, shards in sorted(events):
            counts[number] = shards
            if sum(counts.values()) == SHARDS:
                return at
        if time.monotonic() > deadline:
            return None
        time.sleep(0.2)


def stop_all(agents: list[Agent]) -> None:
    """Steps 5 and 7: the usage of every agent still alive, then one SIGTERM each, all at
    once (one signal only: a second one while a daemon shuts down would cut it short)."""
    alive = [a for a in agents if a.alive()]
    for a in alive:
        a.read_usage()
        a.daemon.process.send_signal(signal.SIGTERM)
    for a in alive:
        try:
            a.daemon.process.wait(DAEMON_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            a.daemon.process.kill()
            a.daemon.process.wait()
    for a in agents:
        code = a.daemon.stop()  # each has exited: this closes its log
        if a.exit_code is None:
            a.exit_code = code


def log_problems(log: Path) -> tuple[list[str], dict[str, int]]:
    """Step 7: error lines, scan.failed and non-JSON lines, verbatim; warnings counted by
    event."""
    problems: list[str] = []
    warnings: Counter[str] = Counter()
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            problems.append(line)
            continue
        if not isinstance(record, dict):
            problems.append(line)
            continue
        level = str(record.get("level", "")).lower()
        if level in ("error", "critical") or record.get("event") in ("scan.failed", "scan.crashed"):
            problems.append(line)
        elif level == "warning":
            warnings[str(record.get("event", "?"))] += 1
    return problems, dict(warnings)


def latency_of(bookings: list[Booking], arrived: dict[str, float]) -> dict[str, Any]:
    return platform.latency(bookings, arrived)


# -- one agent count ---------------------------------------------------------------------------


def one_count(
    ctx: Context, plat: Platform, opts: Options, agents_count: int, secrets_dir: Path
) -> dict[str, Any]:
    name = f"sharing-{agents_count}"
    sizes = opts.sizes
    recreate_database(STATE_DATABASE)
    rand = random.Random(DATA_SEED + 901 + agents_count)
    every_slot = [s for i in plat.integrations for s in i.slot_ids]
    picks = rand.sample(every_slot, platform.WARMUP_BOOKINGS + sizes.bookings)
    warm, measured = picks[: platform.WARMUP_BOOKINGS], picks[platform.WARMUP_BOOKINGS :]
    booked = set(picks)
    bookings: list[Booking] = []
    agents: list[Agent] = []
    result: dict[str, Any] = {"agents": agents_count}
    killed: float | None = None
    to_wall = time.time() - time.monotonic()
    with Receiver(
        arrivals=True, log=ctx.log(f"{name}-receiver"), secrets_dir=secrets_dir
    ) as receiver:

        def config(number: int) -> Path:
            return platform.write_config(
                ctx,
                f"{name}-agent{number}",
                plat,
                base_url=receiver.url,
                secrets_dir=secrets_dir,
                source={"full_scan_interval": opts.full_scan_interval_s},
                state={"scanner_lease": opts.lease_s},
                listen="",
            )

        try:
            # 1. the baseline, by one agent
            started = time.monotonic()
            first = start(ctx, config(1), name, 1)
            agents.append(first)
            baseline = platform.wait_baseline(
                plat, first.daemon, first.log, receiver, started, first.started_wall
            )
            result["baseline"] = baseline
            print(
                f"  {name}: baseline scan {baseline['scan_s']:.1f} s, every integration's "
                f"trigger delivered after {baseline['delivered_s']:.1f} s",
                flush=True,
            )
            others_wall = time.time()
            for number in range(2, agents_count + 1):
                agents.append(start(ctx, config(number), name, number))
            divided_at, held = wait_divided(agents, DIVISION_TIMEOUT_S)
            for a in agents:
                a.notes["shards"] = held[a.number]
            result["division"] = {
                "division_s": divided_at - others_wall if agents_count > 1 else None,
                "shards": {str(n): h for n, h in held.items()},
            }
            print(
                f"  {name}: shards divided "
                + (
                    f"{divided_at - others_wall:.1f} s after starting the others: "
                    if agents_count > 1
                    else "(one agent): "
                )
                + ", ".join(f"agent {n} {h}" for n, h in held.items()),
                flush=True,
            )

            # 2. a full cycle, from the division (or, with one agent, the baseline's end)
            cycle_from = max(divided_at, first.started_wall + baseline["start_to_recorded_s"])
            found = wait_cycle(agents, opts.full_scan_interval_s + CYCLE_EXTRA_S)
            cycle_end = max(r["end"] for r in found.values())
            per_agent = {}
            for a in agents:
                r = found[a.number]
                per_agent[str(a.number)] = {
                    "shards": held[a.number],
                    "duration_s": float(r["duration_ms"]) / 1000,
                    "began_after_s": r["start"] - cycle_from,
                    "ranges_read": r.get("ranges_read"),
                    "ranges_total": r.get("ranges_total"),
                    "event": r.get("event"),
                }
            result["cycle"] = {
                "cycle_s": cycle_end - cycle_from,
                "longest_reconciliation_s": max(v["duration_s"] for v in per_agent.values()),
                "agents": per_agent,
            }
            print(
                f"  {name}: every shard reconciled by its holder {cycle_end - cycle_from:.1f} s "
                "after the division; reconciliations "
                + ", ".join(
                    f"agent {n} {v['duration_s']:.2f} s ({v['shards']} shards)"
                    for n, v in per_agent.items()
                ),
                flush=True,
            )

            # 3. bookings
            for slot_id in warm:
                done = platform.book(ctx, plat, slot_id)
                bookings.append(done)
                if not receiver.wait_for([(done.slot, done.vacancies)], platform.WARMUP_TIMEOUT_S):
                    raise RuntimeError(f"a warm-up booking of slot {done.slot} never arrived")
            stream = platform.stream(ctx, plat, measured, rand)
            bookings += stream
            arrived = receiver.wait_for([(b.slot, b.vacancies) for b in stream], DELIVERY_WAIT_S)
            spans = [(r["start"], r["end"]) for a in agents for r in full_reconciliations(a.log)]
            during = [
                (arrived[b.slot] - b.committed) * 1000
                for b in stream
                if b.slot in arrived and any(s <= b.committed + to_wall <= e for s, e in spans)
            ]
            quiet = {
                **latency_of(stream, arrived),
                "during_reconciliation": len(during),
                "p99_during_ms": percentile(during, 0.99) if during else float("nan"),
            }
            result["bookings"] = quiet
            print(
                f"  {name}: {len(stream)} bookings over {quiet['integrations']} integrations: "
                f"p50 {quiet['p50_ms']:.0f} ms, p99 {quiet['p99_ms']:.0f} ms, max "
                f"{quiet['max_ms']:.0f} ms, {quiet['missing']} missing ({len(during)} "
                "committed while a reconciliation ran)",
                flush=True,
            )
            reshuffles = sum(
                1 for a in agents for line in a.shard_lines() if _epoch(line) > divided_at
            )
            result["division"]["reshuffles"] = reshuffles

            # 4. takeover
            if agents_count >= 2:
                result["takeover"] = takeover(ctx, plat, opts, agents, receiver, rand, booked)
                bookings += result["takeover"].pop("bookings_done")
                killed = result["takeover"].pop("killed_mono")
            left = wait_outbox_empty(DELIVERY_LEASE_S + OUTBOX_EXTRA_S)
            time.sleep(1.0)  # stray calls, if any, are counted too
            result["outbox_left"] = left
        finally:
            stop_all(agents)
        sanity = platform.check(plat, receiver, bookings, {})
        sanity["duplicate_calls"] = _duplicates(receiver, killed)
    problems = {}
    warnings = {}
    for a in agents:
        found_problems, found_warnings = log_problems(a.log)
        problems[str(a.number)] = found_problems[:PROBLEMS_SHOWN]
        warnings[str(a.number)] = found_warnings
        a.notes["log_problems"] = len(found_problems)
    result["sanity"] = sanity
    result["log_problems"] = problems
    result["log_warnings"] = warnings
    result["per_agent"] = [a.summary() for a in agents]
    bad_exit = [a.number for a in agents if a.role != "victim" and a.exit_code != 0]
    print(
        f"  {name}: sanity: {sanity['duplicates']} duplicate notifies, "
        f"{sanity['lost_bookings']} bookings lost, {sanity['wrong_integration']} at another "
        f"integration's path, {sanity['refused']} refused, {sanity['unexpected']} unexpected; "
        f"triggers: {sanity['triggers']} for {sanity['integrations_triggered']} of "
        f"{sizes.integrations} integrations; outbox left {result.get('outbox_left')}",
        flush=True,
    )
    for a in agents:
        print(
            f"  {name}: agent {a.number} ({a.role}, pid {a.pid}): CPU {a.cpu_s or 0:.1f} s, "
            f"peak RSS {a.peak_rss_mb or 0:.0f} MB, exit {a.exit_code}, "
            f"{a.notes['log_problems']} problem line(s) in its log",
            flush=True,
        )
        for line in problems[str(a.number)]:
            print(f"    {line}", flush=True)
    if bad_exit:
        raise RuntimeError(f"agents {bad_exit} did not stop cleanly; see their logs")
    return result


def takeover(
    ctx: Context,
    plat: Platform,
    opts: Options,
    agents: list[Agent],
    receiver: Receiver,
    rand: random.Random,
    booked: set[int],
) -> dict[str, Any]:
    """Step 4: kill the agent that took the baseline, book on its integrations only."""
    victim = agents[0]
    survivors = agents[1:]
    shards = shards_held_by(victim.pid)
    mine = [i for i in plat.integrations if shard_of(i.id) in shards]
    slots = [s for i in mine for s in i.slot_ids if s not in booked]
    if not slots:
        raise RuntimeError(f"the victim (pid {victim.pid}) scans no integration: shards {shards}")
    picks = rand.sample(slots, min(TAKEOVER_BOOKINGS, len(slots)))
    victim.role = "victim"
    victim.read_usage()
    killed_wall = time.time()
    killed = time.monotonic()
    victim.daemon.process.kill()
    victim.daemon.process.wait()
    victim.exit_code = victim.daemon.process.returncode
    done = platform.stream(ctx, plat, picks, rand)
    to_wall = time.time() - time.monotonic()
    promise = opts.lease_s + opts.lease_s / 3
    at = taken_over_at(survivors, killed_wall, 3 * opts.lease_s + DELIVERY_WAIT_S)
    arrived = receiver.wait_for(
        [(b.slot, b.vacancies) for b in done], 2 * opts.lease_s + DELIVERY_WAIT_S
    )
    found = latency_of(done, arrived)
    waited = sum(at is None or b.committed + to_wall < at for b in done)
    first_arrival = min(arrived.values()) - killed if arrived else None
    last_arrival = max(arrived.values()) - killed if arrived else None
    held_after = {a.number: (a.shard_lines()[-1:] or [{}])[0].get("shards") for a in survivors}
    result = {
        "victim": victim.number,
        "victim_shards": len(shards),
        "victim_integrations": len(mine),
        "takeover_s": at - killed_wall if at is not None else None,
        "promise_s": promise,
        "survivor_shards": {str(n): h for n, h in held_after.items()},
        "committed_before_takeover": waited,
        "first_arrival_after_kill_s": first_arrival,
        "last_arrival_after_kill_s": last_arrival,
        **{f"bookings_{k}": v for k, v in found.items()},
        "bookings_done": done,
    }
    print(
        f"  takeover: agent {victim.number} (pid {victim.pid}, {len(shards)} shards, "
        f"{len(mine)} integrations) killed; survivors hold all 64 after "
        + (f"{at - killed_wall:.1f} s" if at is not None else "never")
        + f" (promise {promise:.1f} s); {len(done)} bookings on its integrations: p50 "
        f"{found['p50_ms']:.0f} ms, p99 {found['p99_ms']:.0f} ms, max {found['max_ms']:.0f} ms, "
        f"{found['missing']} missing",
        flush=True,
    )
    result["killed_mono"] = killed  # for the duplicates' report (popped by the caller)
    return result


def _duplicates(receiver: Receiver, killed: float | None) -> list[dict[str, Any]]:
    """Every (integration, slot, vacancies, status) that arrived more than once, with its
    arrival times (seconds after the kill, if any)."""
    times: dict[tuple[str, str, str, str], list[float]] = {}
    for a in receiver.arrivals():
        times.setdefault((a.integration, a.slot, a.vacancies, a.status), []).append(a.at)
    return [
        {
            "integration": key[0],
            "slot": key[1],
            "vacancies": key[2],
            "status": key[3],
            "calls": len(at),
            "after_kill_s": [round(t - killed, 2) for t in at] if killed is not None else None,
        }
        for key, at in times.items()
        if len(at) > 1
    ]


# -- the measurement ---------------------------------------------------------------------------


def measure(ctx: Context, opts: Options | None = None) -> dict[str, Any]:
    opts = opts or options(ctx.plan.quick)
    sizes = opts.sizes
    print(
        f"  sharing: agents {', '.join(map(str, opts.agents))}; {sizes.integrations:,} "
        f"integrations ({sizes.total_slots:,} slots); {sizes.bookings} bookings; scanner_lease "
        f"{opts.lease_s:g} s, full_scan_interval {opts.full_scan_interval_s:g} s",
        flush=True,
    )
    generated = time.perf_counter()
    plat = platform.create(ctx.conn, sizes, DATA_SEED + 9)
    generate_s = time.perf_counter() - generated
    secrets_dir = platform.write_secrets(ctx.workdir / "sharing-secrets", plat)
    counts: list[dict[str, Any]] = []
    set_triggers(ctx, plat.inv, installed=True)
    try:
        for n in opts.agents:
            begun = time.monotonic()
            counts.append(one_count(ctx, plat, opts, n, secrets_dir))
            counts[-1]["run_s"] = time.monotonic() - begun
            ctx.changed()
    finally:
        set_triggers(ctx, plat.inv, installed=False)
        drop_database(STATE_DATABASE)
    return {
        "integrations": sizes.integrations,
        "slots_per_integration": sizes.slots,
        "slots": sizes.total_slots,
        "bookings": sizes.bookings,
        "takeover_bookings": TAKEOVER_BOOKINGS,
        "scanner_lease_s": opts.lease_s,
        "full_scan_interval_s": opts.full_scan_interval_s,
        "spacing_s": list(platform.SPACING_S),
        "generate_s": generate_s,
        "counts": counts,
    }
