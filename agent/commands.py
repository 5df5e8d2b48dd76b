"""The sub-commands: each loads the configuration, builds an Agent and prints for a person."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from types import FrameType
from typing import TextIO

import httpx
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from agent.app import Agent, DrainResult
from agent.cli import StatusExit
from agent.clock import SystemClock, to_epoch_ms
from agent.config import (
    SECRET_ENV,
    AgentSettings,
    Config,
    listen_address,
    load_config,
    load_settings,
    read_secret,
    secret_warnings,
)
from agent.db import create_engine, redact_url
from agent.delivery.flow import BreakerState
from agent.delivery.worker import Tally
from agent.dialects import dialect_for_backend, dialect_of
from agent.errors import AgentError, ConfigError, SourceUnavailable, first_line, shown_path
from agent.integrations import Router, SecretsFolder, integration_problem
from agent.logs import Redaction, setup_logging
from agent.scan import ScanReport
from agent.shards import SHARD_PREFIX, SHARDS
from agent.source import cursor
from agent.source.reader import Snapshot, SourceReader
from agent.store import StateStore
from agent.store.coordination import SCANNER
from agent.store.identity import watch_state_file
from agent.store.migrate import Migrator

__all__ = ["AgentError", "ConfigError", "check", "once", "run", "sandbox"]


def _start(path: Path) -> tuple[Config, Agent]:
    config = load_config(path)
    log = config.settings.log
    setup_logging(level=log.level, fmt=log.format, redaction=Redaction([config.secret.reveal()]))
    for doubt in secret_warnings(config.secret, config.settings.seyaha.webhook_secret_file):
        logging.getLogger("agent").warning(doubt, extra={"event": "config.secret_doubt"})
    agent = Agent(config)
    agent.open()
    return config, agent


def _stop_on_signals(stop: threading.Event) -> None:
    def handler(signum: int, _frame: FrameType | None) -> None:
        logging.getLogger("agent").info(
            "received %s", signal.Signals(signum).name, extra={"event": "agent.signal"}
        )
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)


def run(path: Path) -> int:
    from agent.daemon import Daemon

    return Daemon(path).run()


def once(path: Path, *, timeout_s: float, resync: bool, out: TextIO | None = None) -> int:
    out = out or sys.stdout
    _config, agent = _start(path)
    stop = threading.Event()
    _stop_on_signals(stop)
    try:
        try:
            report = agent.scan(resync=resync)
        except AgentError as exc:
            print(f"scan failed: {exc}", file=out)
            drain = agent.drain(timeout_s, stop)  # still deliver what earlier runs queued
            _print_delivery(out, drain, agent.deliverer.tally, scanned=False)
            return 1
        drain = agent.drain(timeout_s, stop)
        _print_scan(out, report)
        _print_delivery(out, drain, agent.deliverer.tally)
        ok = drain.stats.pending == 0 and agent.deliverer.tally.counts["dead"] == 0
        return 0 if ok else 1
    finally:
        agent.close()


def _print_scan(out: TextIO, report: ScanReport) -> None:
    c = report.catalog
    print(
        f"scanned {report.catalog_rows} catalog rows and {report.slot_rows} slot rows "
        f"in {report.duration_s:.2f} s",
        file=out,
    )
    if report.baseline and not report.notifies:  # with notifies: a resync of an empty store
        queued = "one sync/trigger" if report.triggers == 1 else f"{report.triggers} sync/triggers"
        print(f"  first run: baseline recorded, {queued} queued", file=out)
    else:
        print(
            f"  catalog: {len(c.added)} added, {len(c.changed)} changed, {len(c.removed)} removed; "
            f"slots: {report.slots_added} added, {report.slots_changed} changed, "
            f"{report.slots_removed} closed, {report.slots_expired} past",
            file=out,
        )
    if report.skipped_total:
        print(f"  {report.skipped_total} row(s) skipped:", file=out)
        for row in report.skipped[:10]:
            key = "/".join("NULL" if k is None else str(k) for k in (row.key or ()))
            print(f"    {row.query} {key or '(no key)'}: {row.reason}", file=out)
        if report.skipped_total > 10:
            print(f"    ... and {report.skipped_total - 10} more (see the log)", file=out)


def _print_delivery(out: TextIO, drain: DrainResult, tally: Tally, *, scanned: bool = True) -> None:
    counts = tally.counts
    sent = (
        f"sent {counts['trigger_sent']} sync/trigger and {counts['notify_sent']} "
        f"availability/notify"
    )
    extras = []
    if counts["not_updated"]:
        extras.append(f"{counts['not_updated']} answered updated:false")
    if counts["retried"]:
        extras.append(f"{counts['retried']} retried")
    if counts["expired"]:
        extras.append(f"{counts['expired']} dropped as already started")
    print(f"  {sent}" + (f" ({', '.join(extras)})" if extras else ""), file=out)
    stats = drain.stats
    if stats.pending:
        why = drain.paused_reason or (tally.problems[-1] if tally.problems else "not yet due")
        if drain.timed_out and not drain.paused_reason:
            why = f"timed out; last problem: {why}"
        print(f"  still waiting: {stats.pending} message(s): {why}", file=out)
        print("  nothing is lost: they stay in the outbox and go out on the next run", file=out)
    if counts["dead"]:
        print(f"  gave up on {counts['dead']} message(s) this run:", file=out)
        for problem in tally.problems[-5:]:
            print(f"    {problem}", file=out)
    if stats.dead:
        print(f"  dead letters kept in the outbox: {stats.dead}", file=out)
    if not stats.pending and not counts["dead"]:
        print(
            "  everything delivered"
            if scanned
            else "  the outbox is empty, but this run's changes were not read: the scan failed",
            file=out,
        )


def check(path: Path, out: TextIO | None = None) -> int:
    """Validate everything that can be validated without calling Seyaha; exit 0 or 1."""
    out = out or sys.stdout
    problems = 0

    def report(ok: bool, text: str) -> None:
        nonlocal problems
        problems += 0 if ok else 1
        print(f"{'ok     ' if ok else 'PROBLEM'} {text}", file=out)

    try:
        settings = load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            report(False, f"{exc.source}: {problem}")
        return 1
    report(True, f"configuration {path}")
    try:
        secret = read_secret(settings)
        if not settings.seyaha.routed:
            report(True, "webhook secret readable")
        # The same doubts `run` logs at start: a check must not look cleaner than a start.
        for doubt in secret_warnings(secret, settings.seyaha.webhook_secret_file):
            print(f"warning {doubt}", file=out)
    except ConfigError as exc:
        for problem in exc.problems:
            report(False, problem)

    secrets = _check_routing(settings, report, out)
    engine = create_engine(settings.source.url, role="source")
    source = settings.source
    reader = SourceReader(
        engine,
        catalog_query=source.catalog_query,
        slots_query=source.slots_query,
        timezone=source.zone,
        slots_changed_query=source.slots_changed_query,
        catalog_changed_query=source.catalog_changed_query,
        query_timeout_s=source.query_timeout,
        route=None if secrets is None else Router(secrets),
    )
    try:
        sample = reader.sample()
        report(True, f"source {redact_url(source.url)} reachable")
        _check_integrations(reader, sample, out)
        report(True, f"catalog_query: {sample.catalog_rows_read} row(s) read (first 100 at most)")
        report(True, f"slots_query: {sample.slot_rows_read} row(s) read (first 100 at most)")
        if reader.incremental or source.catalog_changed_query is not None:
            # The change queries, with :since bound as a poll binds it: the cursor is the
            # database clock now, so only the overlap window is read.
            with reader.transaction() as conn:
                since = cursor.since(reader.clock(conn), source.cursor_overlap)
                if reader.incremental:
                    found = reader.changed_slots(conn, since, sample)
                    report(True, f"slots_changed_query: {len(found)} row(s) changed recently")
                if source.catalog_changed_query is not None:
                    before = len(sample.catalog)
                    reader.changed_catalog(conn, since, sample)
                    report(
                        True,
                        f"catalog_changed_query: {len(sample.catalog) - before} row(s) "
                        "changed recently",
                    )
        for row in sample.skipped:
            key = "/".join("NULL" if k is None else str(k) for k in (row.key or ()))
            report(False, f"{row.query}: row {key or '(no key)'} would be skipped: {row.reason}")
        rows_read, seconds = _time_full_read(reader)
        report(True, f"slots_query: a full read takes {seconds:.1f} s ({rows_read:,} rows)")
        digest_s: float | None = None
        if reader.uses_digests:
            ranges, digest_s = _time_digests(reader)
            report(
                True,
                f"slots_query: range digests take {digest_s:.1f} s ({ranges:,} ranges), what a "
                "reconciliation that finds nothing costs",
            )
        if not reader.incremental:
            for line in full_read_advice(rows_read, seconds, source.poll_interval, digest_s):
                print(f"warning {line}", file=out)
    except AgentError as exc:
        report(False, str(exc))
    finally:
        engine.dispose()

    store = StateStore.from_url(settings.state.url)
    try:
        store.open()
        store.probe_write()  # a read-only store passed here, and every run then failed
        report(True, f"state store {redact_url(settings.state.url)} ready (read and write)")
    except AgentError as exc:
        report(False, str(exc))
    finally:
        store.close()
    print("all checks passed" if problems == 0 else f"{problems} problem(s) found", file=out)
    return 0 if problems == 0 else 1


def _check_routing(
    settings: AgentSettings, report: Callable[[bool, str], None], out: TextIO
) -> SecretsFolder | None:
    """Say which of the two forms the configuration takes; a platform's secrets folder."""
    seyaha = settings.seyaha
    if seyaha.webhook_secrets_dir is None:
        if seyaha.integration_id is not None:
            print(
                f"info    one integration: every row goes to {seyaha.integration_id} "
                "([seyaha] integration_id); a platform whose queries return an integration_id "
                "column sets [seyaha] webhook_secrets_dir instead, with one secret file per "
                "integration",
                file=out,
            )
        return None
    folder = seyaha.webhook_secrets_dir
    print(
        "info    a platform: each row goes to the integration its integration_id column "
        f"names, with the secret in the file of that name in {shown_path(folder)}",
        file=out,
    )
    if dialect_for_backend(make_url(settings.state.url).get_backend_name()).shared:
        print(
            "info    a shared state store: agents run with this configuration divide the "
            "integrations among themselves (64 shards, an even share each; a dead agent's "
            f"are taken within {settings.state.scanner_lease * 4 / 3:g} s, [state] "
            "scanner_lease + a third)",
            file=out,
        )
    if not folder.is_dir():
        return None  # said by read_secret above
    secrets = SecretsFolder(folder)
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    usable = [n for n in names if integration_problem(n) is None and secrets.secret(n)]
    report(True, f"webhook_secrets_dir: {len(usable)} integration secret file(s) usable")
    for name in names:
        if integration_problem(name) is not None:
            print(
                f"warning webhook_secrets_dir: {name!r} is not named by an integration id (24 "
                "hexadecimal characters) and is not used",
                file=out,
            )
        elif name != name.lower():
            report(
                False,
                f"webhook_secrets_dir: {name!r}: name the file in lowercase ({name.lower()}), "
                "as the agent looks it up",
            )
        elif name not in usable:
            report(False, f"webhook_secrets_dir: integration {name}: {secrets.problem(name)}")
        else:
            secret = secrets.secret(name)
            assert secret is not None
            for doubt in secret_warnings(secret, folder / name, where=f"integration {name}"):
                print(f"warning {doubt}", file=out)
    return secrets


def _check_integrations(reader: SourceReader, sample: Snapshot, out: TextIO) -> None:
    """A platform: how many integrations the sampled rows name. One integration: a warning
    when the queries return an integration_id column that it does not use."""
    if reader.route is not None:
        named = {r.integration_id for r in sample.catalog} | {
            s.integration_id for s in sample.slots
        }
        print(
            f"info    the rows read name {len(named)} integration(s) with a usable secret",
            file=out,
        )
        return
    with reader.transaction() as conn:
        routed = [
            name
            for name in ("catalog_query", "slots_query")
            if "integration_id" in reader.query_columns(conn, name)
        ]
    if routed:
        print(
            f"warning {' and '.join(routed)} return(s) an integration_id column, but every row "
            "goes to [seyaha] integration_id; to send each row to the integration it names, "
            "set [seyaha] webhook_secrets_dir instead",
            file=out,
        )


def _time_full_read(reader: SourceReader) -> tuple[int, float]:
    """Rows of a full read of the slots query, converted as a scan converts them, and its
    seconds: what every poll costs when there is no change query."""
    started = time.perf_counter()
    snapshot = Snapshot()
    with reader.transaction() as conn:
        for _ in reader.stream_slots(conn, snapshot):
            pass
    return snapshot.slot_rows_read, time.perf_counter() - started


def _time_digests(reader: SourceReader) -> tuple[int, float]:
    """Ranges of the slots query and the seconds the database takes to digest them (see
    agent/ranges.py): what each poll without a change query costs when nothing changed."""
    started = time.perf_counter()
    with reader.transaction() as conn:
        ranges = len(reader.range_digests(conn))
    return ranges, time.perf_counter() - started


LARGE_READ_ROWS = 50_000
"""Above this many slots, `check` recommends a change query whatever the read takes."""

LARGE_READ_SHARE = 0.1
"""A full read taking more than this share of poll_interval earns the same advice."""


def full_read_advice(
    rows_read: int, seconds: float, poll_interval_s: float, digest_s: float | None = None
) -> list[str]:
    """What `check` says of a configuration without slots_changed_query (pure). With range
    digests (`digest_s`, the database's time to compute them) a poll reads only the ranges
    that changed, but the database still goes through every row of the query each time."""
    if digest_s is not None:
        share = min(1.0, digest_s / poll_interval_s)
        if share <= LARGE_READ_SHARE:
            return []
        cost = (
            f"every poll has your database digest all {rows_read:,} rows of slots_query "
            f"({digest_s:.1f} s, about {share:.0%} of every {poll_interval_s:g} s "
            "poll_interval; the agent then reads only the ranges that changed)"
        )
    else:
        if rows_read <= LARGE_READ_ROWS and seconds <= LARGE_READ_SHARE * poll_interval_s:
            return []
        share = min(1.0, seconds / poll_interval_s)
        cost = (
            f"every poll is a full read of {rows_read:,} rows ({seconds:.1f} s, about "
            f"{share:.0%} of every {poll_interval_s:g} s poll_interval, in the agent and in "
            "your database)"
        )
    return [
        f"[source] slots_changed_query is not set: {cost}, and a booking waits for the next poll",
        "add a change query: your slots_query with one more condition on the column your "
        "booking system stamps on every change, for example",
        "    slots_changed_query = '''<your slots_query> AND s.updated_at >= :since'''",
        "(AND or WHERE, whichever your query needs; see the README's Incremental polls)",
    ]


def migrate(path: Path, *, dry_run: bool, out: TextIO | None = None) -> int:
    """Show (dry run) or apply the migrations the state store needs; safe to run again."""
    out = out or sys.stdout
    settings = load_settings(path)
    engine = create_engine(settings.state.url, role="state")
    try:
        plan = Migrator(engine).migrate(dry_run=dry_run)
    finally:
        engine.dispose()
    current = "none (a new store)" if plan.current is None else str(plan.current)
    print(f"state store      {redact_url(settings.state.url)}", file=out)
    print(f"schema version   {current}; this agent writes {plan.head}", file=out)
    if not plan.steps:
        print("nothing to do: the store is up to date", file=out)
        return 0
    print("would apply:" if dry_run else "applied:", file=out)
    for step in plan.steps:
        print(f"  {step.version}  {step.title}", file=out)
    if plan.backup is not None:
        print(f"{'would copy' if dry_run else 'copied'} the store first to {plan.backup}", file=out)
    return 0


def parse_age(text: str) -> timedelta:
    """'7d', '12h', '30m', '45s' or plain seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    value = text.strip().lower()
    factor = units.get(value[-1:])
    number = value[:-1] if factor is not None else value
    try:
        seconds = float(number) * (factor or 1)
    except ValueError:
        raise ConfigError(
            [f"--older-than: {text!r} is not an age like 7d, 12h, 30m or 45s"]
        ) from None
    return timedelta(seconds=seconds)


def _age(delta: timedelta) -> str:
    seconds = int(max(0.0, delta.total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


PAUSING_STATUSES = frozenset({301, 302, 303, 307, 308, 401, 403, 404})
"""Answers that pause delivery: a message last refused with one of them is shown as paused."""


READYZ_TIMEOUT_S = 5.0
"""How long `outbox status --daemon` waits for /readyz. The daemon answers it from memory and
one state-store ping: a longer silence means it is stuck, and a health check must say so well
within its own timeout."""


@dataclass(frozen=True)
class Condition:
    """Something wrong with delivery, and the exit code of `outbox status` that names it."""

    code: StatusExit
    text: str


def status_conditions(
    status: Mapping[str, str],
    dead: int,
    daemon_problems: list[str] | None,
    *,
    ignore_dead: bool,
    paused: int = 0,
) -> list[Condition]:
    """What is wrong, most severe first; empty when delivery is healthy.

    `status` is the state store's delivery record, `dead` the dead letters in the outbox,
    `daemon_problems` what the daemon's /readyz reported (None: it was not asked), `paused`
    how many of a platform's integrations are paused on their own.
    """
    found = []
    if status.get("pause"):
        found.append(Condition(StatusExit.PAUSED, "delivery paused"))
    elif paused:
        found.append(Condition(StatusExit.PAUSED, f"{paused} integration(s) paused"))
    # Any state but closed counts, half-open included: a half-open breaker still holds back
    # every call but its one probe (the circuit_breaker_open gauge says 1 for it too), and the
    # record, written when the breaker opens and when it closes, reads open through the probe.
    breaker = status.get("breaker", BreakerState.CLOSED.value)
    if breaker != BreakerState.CLOSED.value:
        found.append(Condition(StatusExit.BREAKER_OPEN, f"circuit breaker {breaker}"))
    if daemon_problems:
        found.append(Condition(StatusExit.DAEMON_NOT_READY, "daemon not ready"))
    if dead and not ignore_dead:
        found.append(Condition(StatusExit.DEAD_LETTERS, f"{dead} dead letter(s)"))
    return sorted(found, key=lambda c: c.code, reverse=True)


def readyz_url(listen: str) -> str:
    """Where the daemon serves /readyz, from `[metrics] listen` as this host reaches it."""
    address = listen_address(listen) if listen else None
    if address is None or address[1] == 0:
        found = f"{listen!r} has no fixed port" if listen else "it is empty (no listener)"
        raise ConfigError(
            [
                f"[metrics] listen: --daemon asks the daemon's /readyz there, but {found}; "
                'set a fixed port, e.g. listen = "127.0.0.1:9464"'
            ]
        )
    host, port = address
    # A wildcard listens on every address, loopback included: ask that one.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/readyz"


def ask_daemon(url: str) -> list[str]:
    """The problems the daemon's /readyz lists; no answer, or not its answer, is one too."""
    try:
        # trust_env=False: a proxy from the environment must not stand between us and it.
        answer = httpx.get(url, timeout=READYZ_TIMEOUT_S, trust_env=False)
    except httpx.HTTPError as exc:
        return [f"no answer ({type(exc).__name__}): is the daemon running?"]
    try:
        body = answer.json()
        ready, problems = body["ready"], body["problems"]
    except (ValueError, KeyError, TypeError):
        return [f"answered {answer.status_code} without a readiness report: is it the daemon?"]
    if answer.status_code == 200 and ready is True:
        return []
    return [str(problem) for problem in problems] or [f"answered {answer.status_code}"]


def outbox(path: Path, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Operator commands on the outbox; safe while the daemon runs."""
    out = out or sys.stdout
    settings = load_settings(path)
    asks_daemon = args.action == "status" and args.daemon
    daemon_url = readyz_url(settings.metrics.listen) if asks_daemon else None
    store = StateStore.from_url(settings.state.url)
    clock = SystemClock()
    try:
        store.open()
        watch_state_file(store.engine)  # a state file lost meanwhile is refused, not written
        now = clock.now()
        only = getattr(args, "integration", None)
        if args.action == "status":
            return _outbox_status(
                store,
                now,
                out,
                daemon_url=daemon_url,
                ignore_dead=args.ignore_dead,
                integration=only,
            )
        elif args.action == "list":
            _outbox_list(
                store,
                now,
                out,
                state=None if args.state == "all" else args.state,
                limit=args.limit,
                integration=only,
            )
        elif args.action == "retry":
            count = store.admin.retry_dead(
                now, ids=args.ids or (), kind=args.kind, integration=only
            )
            print(f"{count} dead letter(s) queued again", file=out)
        elif args.action == "purge":
            cutoff = None if args.older_than is None else now - parse_age(args.older_than)
            count = store.admin.purge_dead(older_than=cutoff, integration=only)
            print(f"{count} dead letter(s) deleted", file=out)
    finally:
        store.close()
    return 0


PAUSES_SHOWN = 10
"""Paused integrations `outbox status` names one by one (the rest are counted)."""

AGENTS_SHOWN = 10
"""Agents sharing a platform that `outbox status` names one by one (the rest are counted)."""


def _scanning(store: StateStore) -> str | None:
    """Who scans a shared store: the holder of the scanner lease, or how a platform's shards
    are divided among its agents (see agent/shards.py); None on a SQLite store, or before
    any agent ran. Leases run on the database's clock: so does this look at them."""
    if not store.dialect.shared:
        return None
    now_ms = to_epoch_ms(store.clock(SystemClock()).now())
    shards = store.coordination.leases_named(SHARD_PREFIX)
    if shards:
        held = Counter(holder for holder, until_ms in shards.values() if until_ms > now_ms)
        agents = ", ".join(f"{h} ({n})" for h, n in sorted(held.items())[:AGENTS_SHOWN])
        more = f" and {len(held) - AGENTS_SHOWN} more" if len(held) > AGENTS_SHOWN else ""
        line = f"{len(held)} agent(s) share the {SHARDS} shards: {agents or 'none'}{more}"
        unheld = SHARDS - sum(held.values())
        if unheld:
            line += (
                f"; {unheld} shard(s) scanned by no agent now (their agent stopped: another "
                "takes them within the lease, if one runs)"
            )
        return line
    lease = store.coordination.lease(SCANNER)
    if lease is None:
        return None
    if to_epoch_ms(lease.until) <= now_ms:
        return f"by no agent now (the scanner lease of {lease.holder} ran out)"
    return f"by {lease.holder} (it holds the scanner lease; the others deliver)"


def _outbox_status(
    store: StateStore,
    now: datetime,
    out: TextIO,
    *,
    daemon_url: str | None,
    ignore_dead: bool,
    integration: str | None = None,
) -> int:
    """Print the state of delivery (of one integration's messages, with `integration`);
    return the exit code of its most severe problem."""
    stats = store.admin.stats(integration=integration)
    status = store.coordination.status()
    paused = {
        name.removeprefix("pause:"): value
        for name, value in status.items()
        if name.startswith("pause:") and (integration is None or name == f"pause:{integration}")
    }
    if integration is not None:
        print(f"integration      {integration}", file=out)
    print(
        f"backlog          {stats.pending} waiting ({stats.in_flight} in flight), {stats.dead} dead",
        file=out,
    )
    if stats.integrations_waiting and integration is None:
        print(f"integrations     {stats.integrations_waiting} with messages waiting", file=out)
    if stats.oldest_pending is not None:
        print(f"oldest waiting   {_age(now - stats.oldest_pending)}", file=out)
    last = status.get("last_delivery")
    if last:
        print(f"last delivery    {last} ({_age(now - datetime.fromisoformat(last))} ago)", file=out)
    else:
        print("last delivery    never", file=out)
    print(f"circuit breaker  {status.get('breaker', 'closed')}", file=out)
    pause = status.get("pause")
    if pause:
        since, _, reason = pause.partition(" ")
        print(f"delivery         PAUSED since {since}: {reason}", file=out)
    else:
        print("delivery         running", file=out)
    for shown, (paused_id, record) in enumerate(sorted(paused.items())):
        if shown == PAUSES_SHOWN:
            print(f"                 ... and {len(paused) - shown} more paused", file=out)
            break
        since, _, reason = record.partition(" ")
        print(f"integration      {paused_id} PAUSED since {since}: {reason}", file=out)
    scanning = _scanning(store)
    if scanning is not None:
        print(f"scanning         {scanning}", file=out)
    daemon_problems = None
    if daemon_url is not None:
        daemon_problems = ask_daemon(daemon_url)
        verdict = "NOT READY: " + "; ".join(daemon_problems) if daemon_problems else "ready"
        print(f"daemon           {verdict} ({daemon_url})", file=out)
    conditions = status_conditions(
        status, stats.dead, daemon_problems, ignore_dead=ignore_dead, paused=len(paused)
    )
    for condition in conditions:
        print(f"health           {condition.text} (exit {condition.code:d})", file=out)
    if not conditions:
        print(f"health           ok (exit {StatusExit.OK:d})", file=out)
    return conditions[0].code if conditions else StatusExit.OK


def _outbox_list(
    store: StateStore,
    now: datetime,
    out: TextIO,
    *,
    state: str | None,
    limit: int,
    integration: str | None = None,
) -> None:
    entries = store.admin.entries(state=state, limit=limit, integration=integration)
    if not entries:
        print("the outbox is empty" if state is None else f"no {state} messages", file=out)
        return
    print(
        f"{'id':>8}  {'state':<8} {'kind':<7} {'age':>8} {'tries':>5}  what / last error", file=out
    )
    paused = {
        name.removeprefix("pause:")
        for name in store.coordination.status()
        if name.startswith("pause:")
    }
    for e in entries:
        shown = e.state
        if e.state == "pending" and (
            e.last_status in PAUSING_STATUSES or (e.integration_id and e.integration_id in paused)
        ):
            shown = "paused"  # refused, or its integration paused (e.g. no secret file)
        what = "sync/trigger"
        if e.payload is not None:
            what = (
                f"{e.payload.get('productId')}/{e.payload.get('optionId')}/"
                f"{e.payload.get('availabilityId')} {e.payload.get('status')}"
            )
        if e.integration_id:
            what += f" (integration {e.integration_id})"
        print(
            f"{e.id:>8}  {shown:<8} {e.kind:<7} {_age(now - e.created_at):>8} {e.attempts:>5}  {what}",
            file=out,
        )
        if e.last_error:
            print(f"{'':>8}  {e.last_error}", file=out)


def triggers(path: Path, action: str, out: TextIO | None = None) -> int:
    """Manage the NOTIFY triggers on `source.notify_tables` (PostgreSQL sources only)."""
    from agent.source import pg_triggers

    out = out or sys.stdout
    source = load_settings(path).source
    engine = create_engine(source.url, role="source")
    try:
        if not dialect_of(engine).listens:
            raise ConfigError(
                [
                    f"[source] url: triggers are for PostgreSQL sources; this one is "
                    f"{engine.dialect.name}, which the agent polls"
                ]
            )
        if action == "install":
            if not source.notify_tables:
                raise ConfigError(
                    [
                        "[source] notify_tables: name the tables whose changes should wake the "
                        'agent, e.g. notify_tables = ["products", "options", "slots"]'
                    ]
                )
            pg_triggers.install(engine, source.notify_tables, source.notify_channel)
            print(f"triggers installed on: {', '.join(source.notify_tables)}", file=out)
            return 0
        if action == "uninstall":
            # The catalog says where the agent's triggers are: notify_tables may have changed
            # since they were installed, or be empty by now.
            done = pg_triggers.uninstall(engine, source.notify_tables, source.notify_channel)
            for line in done.lines():
                print(line, file=out)
            if not done.complete:
                raise AgentError(
                    "triggers uninstall removed what the source user may remove; what is left "
                    "is listed with the SQL a DBA can run"
                )
            return 0
        statements = pg_triggers.install_sql(
            engine, source.notify_tables or ("<table>",), source.notify_channel
        )
        print("-- SQL that `triggers install` applies (a DBA may apply it instead):", file=out)
        for statement in statements:
            print(f"{statement};", file=out)
        try:
            found = pg_triggers.installed(engine)
        except SQLAlchemyError as exc:
            raise SourceUnavailable(
                f"cannot reach the source database at {redact_url(source.url)}: {first_line(exc)}"
            ) from None
        print(f"-- installed now on: {', '.join(found) or 'no table'}", file=out)
        return 0
    finally:
        engine.dispose()


def sandbox(
    *,
    port: int,
    host: str,
    config_path: Path | None,
    secret_file: Path | None,
    secrets_dir: Path | None = None,
) -> int:
    from agent.sandbox import Sandbox

    integration_id: str | None = None
    catalog = None
    secret = os.environ.get(SECRET_ENV, "").strip()
    if secret_file is not None:
        try:
            secret = secret_file.read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                [f"--secret-file: cannot read {secret_file} ({exc.strerror})"]
            ) from None
    if config_path is not None:
        config = load_config(config_path)
        secret = secret or config.secret.reveal()
        integration_id = config.settings.seyaha.integration_id
        secrets_dir = secrets_dir or config.settings.seyaha.webhook_secrets_dir
        source = config.settings.source
        reader = SourceReader(
            create_engine(source.url, role="source"),
            catalog_query=source.catalog_query,
            slots_query=source.slots_query,
            timezone=source.zone,
        )
        catalog = reader.catalog_keys
    secrets = None
    if secrets_dir is not None:
        if not secrets_dir.is_dir():
            raise ConfigError([f"--secrets-dir: no folder at {secrets_dir}"], source="sandbox")
        folder = SecretsFolder(secrets_dir)

        def secrets(integration: str) -> str | None:
            if integration_problem(integration) is not None:
                return None
            found = folder.secret(integration)
            return None if found is None else found.reveal()

        integration_id = None
    elif not secret:
        raise ConfigError(
            [
                f"the sandbox needs the secret to expect: set {SECRET_ENV}, or pass --secret-file, "
                "--secrets-dir or --config"
            ],
            source="sandbox",
        )
    server = Sandbox(
        secret=secret,
        secrets=secrets,
        integration_id=integration_id,
        catalog=catalog,
        host=host,
        port=port,
        out=sys.stdout,
    )
    print(f"Seyaha sandbox listening on {server.url}", flush=True)
    print(f'  set [seyaha] base_url = "{server.url}" to deliver here; Ctrl-C stops', flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server.server_close()
    return 0
