"""6. Scanner takeover: two daemons on one PostgreSQL state store; the one that scans is killed
(SIGKILL) or stopped (SIGTERM), and the other must take over scanning.

Each run starts two real daemons (`python -m agent run --config FILE`, one configuration)
on a new PostgreSQL state store (database seyaha_bench_takeover, recreated for every run and
dropped at the end) with the agent's defaults for [state] scanner_lease and [source]
poll_interval, a small PostgreSQL inventory without NOTIFY triggers (polling only: the case
the promise "scanner_lease + poll_interval" covers; a wake-up only makes a standby try
sooner), and the fast receiver. Once the baseline was delivered, one daemon holds the
scanner lease (its pid is read from seyaha_leases) and the other has logged scan.standby, a
booking is delivered end to end, and after a pause drawn at random within one poll interval
(so that the signal lands at varied points of the lease's renewals and the standby's polls),
the holder gets the signal. From then on this process commits one booking every 0.2 s until
the first of them has arrived, and records:
- leader: seconds from the signal until the survivor logs scan.leader (its log's timestamp);
- first change: seconds from the signal until the first booking committed after it arrives
  at the receiver (CLOCK_MONOTONIC on both sides);
- how long the holder took to exit (a clean stop finishes its in-flight work, frees the
  lease, then exits; a killed one is gone at once);
- how many of the bookings committed meanwhile never arrived (waited for 30 s).
The first change is one of the bookings that waited for the takeover: its poll queues them
all at once (about 5 per second of takeover), and up to rate_burst (250) of them go out at
once, the rest at the default rate_limit.
"""

from __future__ import annotations

import json
import random
import signal
import threading
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg

from bench import inventory
from bench.context import (
    DATA_SEED,
    Context,
    drop_database,
    psycopg_url,
    recreate_database,
    sqlalchemy_url,
)
from bench.inventory import Inventory
from bench.latency import Daemon
from bench.receiver import Receiver
from bench.stats import median

SLOTS = 1_000
"""The inventory of this measurement: small, so that each run's baseline scan is quick."""

STATE_DATABASE = "seyaha_bench_takeover"
"""The shared state store of the two daemons, beside the bench database."""

COMMIT_SPACING_S = 0.2
"""One booking this often from the signal on, as a steady booking system commits them."""

SETTLE_TIMEOUT_S = 120.0
"""Longest wait for the two daemons to start, baseline and settle into scanner and standby."""

OVERDUE_S = 60.0
"""How long past its promise a takeover is waited for before it counts as missed."""

DELIVERY_WAIT_S = 30.0
"""After the first booking arrived, how long the later ones are waited for."""

EXIT_TIMEOUT_S = 120.0
"""Longest wait for the holder to exit after its signal."""


@dataclass(frozen=True)
class Takeover:
    """One signal to the scanner and what followed (seconds from the signal; None: missed)."""

    signal: str
    pause_s: float
    """How long after the pre-signal booking arrived the signal was sent."""
    holder_exit_s: float
    leader_s: float | None
    first_change_s: float | None
    committed: int
    missing: int


def measure(ctx: Context) -> dict[str, Any]:
    from agent.config import DeliverySettings, SourceSettings, StateSettings

    lease_s = float(StateSettings.model_fields["scanner_lease"].default)
    poll_s = float(SourceSettings.model_fields["poll_interval"].default)
    rate_limit = float(DeliverySettings.model_fields["rate_limit"].default)
    inv = ctx.inventory(SLOTS)
    pauses = random.Random(DATA_SEED + 11)
    runs: dict[str, list[Takeover]] = {"SIGKILL": [], "SIGTERM": []}
    try:
        for run in range(ctx.plan.runs):
            for signum in (signal.SIGKILL, signal.SIGTERM):
                promise_s = lease_s + poll_s if signum == signal.SIGKILL else poll_s
                taken = one_takeover(
                    ctx,
                    inv,
                    signum,
                    run,
                    pause_s=pauses.uniform(0, poll_s),
                    poll_s=poll_s,
                    wait_s=promise_s + OVERDUE_S,
                )
                runs[signum.name].append(taken)
                print(
                    f"  takeover after {signum.name}, run {run + 1}: survivor scans after "
                    f"{_s(taken.leader_s)}, first change after {_s(taken.first_change_s)} "
                    f"(holder exited after {taken.holder_exit_s:.2f} s; {taken.committed} "
                    f"bookings committed meanwhile, {taken.missing} never arrived)",
                    flush=True,
                )
    finally:
        drop_database(STATE_DATABASE)
    return {
        "slots": SLOTS,
        "scanner_lease_s": lease_s,
        "poll_interval_s": poll_s,
        "rate_limit_per_s": rate_limit,
        "commit_spacing_s": COMMIT_SPACING_S,
        "signals": [
            _summary(name, taken, lease_s + poll_s if name == "SIGKILL" else poll_s)
            for name, taken in runs.items()
        ],
    }


def one_takeover(
    ctx: Context,
    inv: Inventory,
    signum: signal.Signals,
    run: int,
    *,
    pause_s: float,
    poll_s: float,
    wait_s: float,
) -> Takeover:
    """Two daemons, one signal to the scanner; see the module's docstring."""
    name = f"takeover-{signum.name.lower()}-{run}"
    recreate_database(STATE_DATABASE)
    with Receiver(arrivals=True, log=ctx.log(f"{name}-receiver")) as receiver:
        config = _config(ctx, name, receiver.url)
        logs = [ctx.log(f"{name}-a"), ctx.log(f"{name}-b")]
        daemons = [Daemon(config, log) for log in logs]
        try:
            holder, survivor = _settle(daemons, logs, receiver)
            ((slot, vacancies),) = inventory.book(ctx.conn, inv, inv.ids.take(1)).items()
            if not receiver.wait_for([(slot, vacancies)], SETTLE_TIMEOUT_S):
                raise RuntimeError(f"a booking before the signal was never delivered; see {logs}")
            time.sleep(pause_s)

            exited = _watch_exit(daemons[holder])
            signalled = time.monotonic()
            signalled_wall = time.time()
            daemons[holder].process.send_signal(signum)
            sent: list[tuple[str, int]] = []
            first: float | None = None
            while first is None and time.monotonic() < signalled + wait_s:
                pause = signalled + len(sent) * COMMIT_SPACING_S - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                sent += inventory.book(ctx.conn, inv, inv.ids.take(1)).items()
                first = receiver.arrival(*sent[0])
            holder_exit_s = _exit_after(exited, daemons[holder], signalled)
            leader_s = _leader_after(logs[survivor], signalled_wall, poll_s)
            arrived = receiver.wait_for(sent, DELIVERY_WAIT_S)
            if _holder_pid() != daemons[survivor].process.pid:
                raise RuntimeError(f"the survivor does not hold the scanner lease; see {logs}")
        finally:
            codes = [daemon.stop() for daemon in daemons]
    expected = -signal.SIGKILL if signum == signal.SIGKILL else 0
    if codes[holder] != expected or codes[survivor] != 0:
        raise RuntimeError(f"the daemons exited with {codes}; see {logs}")
    return Takeover(
        signal=signum.name,
        pause_s=pause_s,
        holder_exit_s=holder_exit_s,
        leader_s=leader_s,
        first_change_s=None if first is None else first - signalled,
        committed=len(sent),
        missing=len(sent) - len(arrived),
    )


# -- the two daemons and their shared state store ---------------------------------------------


def _config(ctx: Context, name: str, base_url: str) -> Path:
    """The bench's configuration of a daemon (agent defaults but the receiver and the source),
    its [state] url pointed at the shared PostgreSQL store."""
    placeholder = ctx.path(f"{name}.db")
    path = ctx.config(name, ctx.setup(SLOTS, placeholder, base_url=base_url))
    text = path.read_text(encoding="utf-8")
    sqlite_url = f"url = {json.dumps('sqlite:///' + str(placeholder))}"
    if text.count(sqlite_url) != 1:
        raise RuntimeError(f"no `{sqlite_url}` in {path}: bench/agentconf.py changed its [state]")
    shared_url = f"url = {json.dumps(sqlalchemy_url(STATE_DATABASE))}"
    path.write_text(text.replace(sqlite_url, shared_url), encoding="utf-8")
    return path


def _settle(daemons: list[Daemon], logs: list[Path], receiver: Receiver) -> tuple[int, int]:
    """Wait until the baseline arrived, one daemon holds the scanner lease and the other has
    logged scan.standby: (index of the holder, index of the other)."""
    pids = [daemon.process.pid for daemon in daemons]
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while time.monotonic() < deadline:
        for daemon, log in zip(daemons, logs, strict=True):
            if daemon.process.poll() is not None:
                raise RuntimeError(f"a daemon exited with {daemon.process.returncode}; see {log}")
        pid = _holder_pid()
        if pid in pids and receiver.stats()["trigger"] >= 1:
            holder = pids.index(pid)
            survivor = 1 - holder
            if _events(logs[survivor], "scan.standby"):
                return holder, survivor
        time.sleep(0.1)
    raise RuntimeError(f"the daemons did not settle into scanner and standby; see {logs}")


def _watch_exit(daemon: Daemon) -> list[float]:
    """A list that gets time.monotonic() of the daemon's exit, from a thread waiting on it."""
    exited: list[float] = []

    def watch() -> None:
        daemon.process.wait()
        exited.append(time.monotonic())

    threading.Thread(target=watch, name="exit-watch", daemon=True).start()
    return exited


def _exit_after(exited: list[float], daemon: Daemon, signalled: float) -> float:
    """Seconds from the signal until `daemon` exited, waiting for it if it has not yet."""
    daemon.process.wait(EXIT_TIMEOUT_S)
    deadline = time.monotonic() + 5
    while not exited and time.monotonic() < deadline:
        time.sleep(0.01)
    return exited[0] - signalled


def _leader_after(log: Path, signalled_wall: float, poll_s: float) -> float | None:
    """Seconds from the signal until the survivor logged scan.leader, waiting up to a poll
    interval more for the line (the first change may arrive before it is flushed)."""
    deadline = time.monotonic() + poll_s + 1
    while True:
        stamps = [
            t - signalled_wall
            for t in _events(log, "scan.leader")
            # the log's stamps are to the millisecond
            if t >= signalled_wall - 0.001
        ]
        if stamps:
            return max(0.0, stamps[0])
        if time.monotonic() > deadline:
            return None
        time.sleep(0.05)


def _events(log: Path, name: str) -> list[float]:
    """Wall-clock times (epoch seconds) of the JSON log records of event `name` in `log`."""
    found = []
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == name:
            found.append(datetime.fromisoformat(record["ts"]).timestamp())
    return found


def _holder_pid() -> int | None:
    """The pid in the scanner lease's holder ("<hostname>:<pid>:<8 hex>"), if it is held."""
    try:
        with psycopg.connect(psycopg_url(STATE_DATABASE), autocommit=True) as conn:
            row = conn.execute("SELECT holder FROM seyaha_leases WHERE name = 'scanner'").fetchone()
    except psycopg.errors.UndefinedTable:
        return None  # the daemons have not created the schema yet
    return None if row is None else int(str(row[0]).split(":")[-2])


# -- the figures ------------------------------------------------------------------------------


def _summary(name: str, runs: list[Takeover], promise_s: float) -> dict[str, Any]:
    leaders = [t.leader_s for t in runs if t.leader_s is not None]
    firsts = [t.first_change_s for t in runs if t.first_change_s is not None]
    return {
        "signal": name,
        "promise_s": promise_s,
        "leader_median_s": median(leaders),
        "leader_max_s": max(leaders) if leaders else None,
        "first_change_median_s": median(firsts),
        "first_change_max_s": max(firsts) if firsts else None,
        "holder_exit_median_s": median([t.holder_exit_s for t in runs]),
        "missed": sum(t.leader_s is None or t.first_change_s is None for t in runs),
        "committed": sum(t.committed for t in runs),
        "missing": sum(t.missing for t in runs),
        "runs": [asdict(t) for t in runs],
    }


def _s(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds:.2f} s"
