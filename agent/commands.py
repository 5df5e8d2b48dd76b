"""The sub-commands: each loads the configuration, builds an Agent and prints for a person."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TextIO

import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from agent import collector
from agent.app import Agent, DrainResult
from agent.config import (
    SECRET_ENV,
    AgentSettings,
    Config,
    SourceSettings,
    load_config,
    load_settings,
    read_secret,
    secret_warnings,
)
from agent.db import create_engine, redact_url
from agent.delivery.worker import Tally
from agent.dialects import dialect_for_backend, dialect_of
from agent.errors import AgentError, ConfigError, SourceUnavailable, first_line, shown_path
from agent.integrations import Router, SecretsFolder, integration_problem
from agent.logs import Redaction, setup_logging
from agent.outbox_command import outbox
from agent.ranges import compares_options_first
from agent.scan import ScanReport
from agent.source import cursor
from agent.source.gate import SensorUnusable
from agent.source.reader import Snapshot, SourceReader
from agent.source.sensors import commit_sensor
from agent.store import StateStore
from agent.store.migrate import Migrator

__all__ = ["AgentError", "ConfigError", "check", "once", "outbox", "run", "sandbox"]


def _start(path: Path) -> tuple[Config, Agent]:
    config = load_config(path)
    log = config.settings.log
    setup_logging(level=log.level, fmt=log.format, redaction=Redaction([config.secret.reveal()]))
    for doubt in secret_warnings(config.secret, config.settings.seyaha.webhook_secret_file):
        logging.getLogger("agent").warning(doubt, extra={"event": "config.secret_doubt"})
    agent = Agent(config)
    agent.open()
    collector.settle()
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
        digest_work_mem_mb=source.digest_work_mem_mb,
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
            times = _time_digests(reader)
            digest_s = times.changed_s
            report(
                True,
                f"slots_query: digests of its {times.ranges:,} ranges take {times.ranges_s:.1f} s, "
                f"of its {times.options:,} option ids {times.options_s:.1f} s, of every row at "
                f"once {times.whole_s:.1f} s: a reconciliation costs your database about "
                f"{times.changed_s:.1f} s when slots changed since the last one, "
                f"{times.whole_s:.1f} s when none did",
            )
        sensed = not reader.incremental and _check_commits(reader, source, report, out)
        if not reader.incremental:
            advice = full_read_advice(
                rows_read, seconds, source.poll_interval, digest_s, sensed=sensed
            )
            for line in advice:
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


def _check_commits(
    reader: SourceReader,
    source: SourceSettings,
    report: Callable[[bool, str], None],
    out: TextIO,
) -> bool:
    """Without a change query: whether the daemon can pass only when something committed
    (agent/source/gate.py), and what it reads to tell."""
    sensor = commit_sensor(reader) if source.watch_commits else None
    if sensor is None:
        return False
    try:
        what = sensor.discover()
        sensor.read()
    except SensorUnusable as exc:
        print(f"warning {exc}: the daemon passes every {source.poll_interval:g} s", file=out)
        return False
    finally:
        sensor.close()
    report(
        True,
        f"the daemon passes when {what} shows a commit, and every "
        f"{source.full_scan_interval:g} s (full_scan_interval)",
    )
    return True


def _time_full_read(reader: SourceReader) -> tuple[int, float]:
    """Rows of a full read of the slots query, converted as a scan converts them, and its
    seconds: what every poll costs when there is no change query."""
    started = time.perf_counter()
    snapshot = Snapshot()
    with reader.transaction() as conn:
        for _ in reader.stream_slots(conn, snapshot):
            pass
    return snapshot.slot_rows_read, time.perf_counter() - started


@dataclass(frozen=True)
class DigestTimes:
    """What the database takes to digest the slots query (see agent/ranges.py)."""

    ranges: int
    ranges_s: float
    options: int
    options_s: float
    whole_s: float
    """One digest of every row: a pass's first question while nothing was written since."""

    @property
    def changed_s(self) -> float:
        """A pass after changes: the option digests where a pass asks for them first (then
        the ranges of the options that differ, from the option index: not counted), else
        the range digests."""
        if compares_options_first(self.options, self.ranges):
            return self.options_s
        return self.ranges_s


def _time_digests(reader: SourceReader) -> DigestTimes:
    """The seconds the database takes to digest the slots query by range, by option id and
    as a whole: what each poll without a change query costs it."""

    def timed(work: Callable[[sa.Connection], int]) -> tuple[int, float]:
        started = time.perf_counter()
        with reader.transaction() as conn:
            count = work(conn)
        return count, time.perf_counter() - started

    ranges, ranges_s = timed(lambda conn: sum(1 for _ in reader.range_digests(conn)))
    options, options_s = timed(lambda conn: sum(1 for _ in reader.option_digests(conn)))
    _, whole_s = timed(lambda conn: len(reader.slots_digest(conn)))
    return DigestTimes(ranges, ranges_s, options, options_s, whole_s)


LARGE_READ_ROWS = 50_000
"""Above this many slots, `check` recommends a change query whatever the read takes."""

LARGE_READ_SHARE = 0.1
"""A full read taking more than this share of poll_interval earns the same advice."""


def full_read_advice(
    rows_read: int,
    seconds: float,
    poll_interval_s: float,
    digest_s: float | None = None,
    *,
    sensed: bool = False,
) -> list[str]:
    """What `check` says of a configuration without slots_changed_query (pure). With range
    digests (`digest_s`, the database's time to compute them) a poll reads only the ranges
    that changed, but the database still goes through every row of the query each time.
    `sensed`: the daemon passes only when something committed (agent/source/gate.py), so
    the cost is per change, not per poll."""
    if digest_s is not None:
        share = min(1.0, digest_s / poll_interval_s)
        if share <= LARGE_READ_SHARE:
            return []
        if sensed:
            cost = (
                f"the daemon passes only when something committed, but each pass has "
                f"your database digest all {rows_read:,} rows of slots_query "
                f"({digest_s:.1f} s: a booking waits for it, and steady bookings keep your "
                f"database busy up to {share:.0%} of the time)"
            )
        else:
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
