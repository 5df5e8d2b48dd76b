"""Measured work, each task in a fresh Python process: `python -m bench.worker TASK JSON`.

A fresh process per measurement keeps sizes from contaminating each other (peak RSS is the
process's own, caches start cold) and keeps the benchmark harness, the receiver and the work
from sharing one interpreter lock. The result is one JSON object on the last stdout line.

Tasks:
  scan       Agent.scan() on the configured state (a baseline or a reconciliation); with
             "digests_loaded", the stored range digests are loaded before it is timed, as a
             daemon without a change query holds them from its previous pass
  floor      the slots query through a psycopg server-side cursor, rows fetched to Python
  enqueue    a backlog of notifies through StateStore.commit_scan()
  claim      one Queue.claim() from that backlog, timed
  drain      Agent.drain() of the backlog to the receiver
  post_sync  the same payloads posted by a bare sequential httpx.Client loop
  post_threads  the same, N threads sharing one httpx.Client (the agent's own model)
  post_async the same payloads posted by httpx.AsyncClient with N requests in flight
  polls      Agent.poll() after 0, 100, 10,000 ... changed rows
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg

from bench.agentconf import SECRET
from bench.stats import bytes_received_from, current_rss_mb, own_cpu_s, peak_rss_mb

POSTGRES_PORT = 5432

FLOOR_BATCH_ROWS = 5000
"""Rows per fetch of the floor's server-side cursor: the agent's own STREAM_BATCH_ROWS."""

WORKER_TIMEOUT_S = 3600.0


# -- the harness side -----------------------------------------------------------------------


def run(task: str, args: dict[str, Any], *, log: Path, timeout_s: float = WORKER_TIMEOUT_S) -> Any:
    """Run `task` in a fresh process and return its JSON result (stderr goes to `log`)."""
    with open(log, "ab") as err:
        done = subprocess.run(
            [sys.executable, "-m", "bench.worker", task, json.dumps(args)],
            stdout=subprocess.PIPE,
            stderr=err,
            timeout=timeout_s,
            check=False,
        )
    lines = done.stdout.decode("utf-8", "replace").strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"bench worker {task} failed (exit {done.returncode}); see {log}")
    return json.loads(lines[-1])


# -- the tasks ------------------------------------------------------------------------------


def _agent(args: dict[str, Any]) -> Any:
    from agent.app import Agent
    from agent.config import load_config
    from agent.logs import Redaction, setup_logging

    config = load_config(Path(args["config"]))
    log = open(args["log"], "a", encoding="utf-8")  # noqa: SIM115 - lives as long as the process
    setup_logging(
        level=config.settings.log.level, fmt="json", redaction=Redaction([SECRET]), stream=log
    )
    agent = Agent(config)
    agent.open()
    try:  # as the CLI and the daemon do once the agent is open, where this version has it
        from agent.collector import settle
    except ImportError:
        pass
    else:
        settle()
    return agent


def task_scan(args: dict[str, Any]) -> dict[str, Any]:
    agent = _agent(args)
    if args.get("polled"):
        # A running daemon with a change query: the digests loaded by its last
        # reconciliation, then its polls recorded the changes (not timed).
        agent.store.fingerprints.ranges.load()
        if agent.poll() is None:
            raise RuntimeError("the poll before the reconciliation did not run")
    if args.get("digests_loaded"):
        # What Agent._load_digests_ahead does once a pass is recorded, where every poll is a
        # full pass: the next one starts with them in memory.
        agent.store.fingerprints.ranges.load()
    rss_before = current_rss_mb()
    cpu_before = own_cpu_s()
    started = time.perf_counter()
    if args.get("beside_polls"):
        # The daemon's scheduled reconciliation where a change query keeps a cursor: beside
        # the polls (Scanner.reconcile), without the threads and parallel range digests of
        # a full scan that polls wait for.
        if not agent.scanner.can_reconcile_beside():
            raise RuntimeError("this state cannot be reconciled beside the polls")
        report = agent.full_scan()
        if report is None:
            raise RuntimeError("the reconciliation beside the polls did not run")
    else:
        report = agent.scan()
    seconds = time.perf_counter() - started
    cpu = own_cpu_s() - cpu_before
    # Before the pool closes them; `source_port`: a source other than the bench's PostgreSQL.
    source_bytes = bytes_received_from(args.get("source_port", POSTGRES_PORT))
    pending = agent.store.admin.stats().pending
    agent.close()
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "rows": report.slot_rows,
        "baseline": report.baseline,
        "added": report.slots_added,
        "changed": report.slots_changed,
        "removed": report.slots_removed,
        "notifies": report.notifies,
        "skipped": report.skipped_total,
        "source_transactions": getattr(report, "source_transactions", 1),
        "ranges_read": getattr(report, "ranges_read", None),
        "ranges_total": getattr(report, "ranges_total", None),
        "slots_digest_matched": getattr(report, "slots_digest_matched", None),
        "source_bytes": source_bytes,
        "outbox_pending": pending,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
    }


def task_floor(args: dict[str, Any]) -> dict[str, Any]:
    rss_before = current_rss_mb()
    started = time.perf_counter()
    rows = 0
    with psycopg.connect(args["dsn"]) as conn:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        with conn.transaction(), conn.cursor(name="floor") as cursor:
            cursor.execute(args["sql"])
            while batch := cursor.fetchmany(FLOOR_BATCH_ROWS):
                rows += len(batch)
        seconds = time.perf_counter() - started
        source_bytes = bytes_received_from(POSTGRES_PORT)
    return _floor_result(seconds, rows, source_bytes, rss_before)


def task_floor_mysql(args: dict[str, Any]) -> dict[str, Any]:
    """The floor on a MySQL/MariaDB source: the query through PyMySQL, the agent's driver,
    an unbuffered cursor fetching FLOOR_BATCH_ROWS rows at a time into Python tuples."""
    import pymysql
    import pymysql.cursors

    rss_before = current_rss_mb()
    started = time.perf_counter()
    rows = 0
    conn = pymysql.connect(
        host=args["host"],
        port=args["port"],
        user=args["user"],
        database=args["database"],
        cursorclass=pymysql.cursors.SSCursor,
    )
    try:
        conn.begin()
        with conn.cursor() as cursor:
            cursor.execute(args["sql"])
            while batch := cursor.fetchmany(FLOOR_BATCH_ROWS):
                rows += len(batch)
        seconds = time.perf_counter() - started
        source_bytes = bytes_received_from(args["port"])
        conn.rollback()
    finally:
        conn.close()
    return _floor_result(seconds, rows, source_bytes, rss_before)


def _floor_result(
    seconds: float, rows: int, source_bytes: int | None, rss_before: float
) -> dict[str, Any]:
    return {
        "seconds": seconds,
        "rows": rows,
        "source_bytes": source_bytes,
        "rss_before_mb": rss_before,
        "peak_rss_mb": peak_rss_mb(),
    }


def _messages(payloads: list[dict[str, Any]]) -> list[Any]:
    from agent.model import Message
    from agent.plan import slot_dedupe_key

    return [
        Message(
            kind="notify",
            dedupe_key=slot_dedupe_key((p["productId"], p["optionId"], p["availabilityId"])),
            payload=p,
            slot_start=datetime.fromisoformat(p["localDateTimeStart"]),
            reason="bench",
        )
        for p in payloads
    ]


def task_enqueue(args: dict[str, Any]) -> dict[str, Any]:
    """A backlog of notifies written through the agent's own StateStore.commit_scan()."""
    from agent.model import CatalogDiff, SlotDiff

    payloads = json.loads(Path(args["payloads"]).read_text(encoding="utf-8"))
    agent = _agent(args)
    messages = _messages(payloads)
    started = time.perf_counter()
    enqueued = agent.store.commit_scan(CatalogDiff(), SlotDiff(), messages, agent.clock.now())
    seconds = time.perf_counter() - started
    agent.close()
    return {"seconds": seconds, "enqueued": enqueued}


def task_claim(args: dict[str, Any]) -> dict[str, Any]:
    """One Queue.claim() of a batch from the backlog, timed."""
    agent = _agent(args)
    pending = agent.store.admin.stats().pending
    started = time.perf_counter()
    claimed = agent.store.queue.claim(agent.clock.now(), limit=int(args["limit"]), lease_s=60.0)
    seconds = time.perf_counter() - started
    agent.close()
    return {"seconds": seconds, "claimed": len(claimed), "pending": pending}


def task_drain(args: dict[str, Any]) -> dict[str, Any]:
    """Agent.drain() of the backlog already in the configured state."""
    agent = _agent(args)
    cpu_before = own_cpu_s()
    started = time.perf_counter()
    result = agent.drain(float(args["timeout_s"]))
    seconds = time.perf_counter() - started
    cpu = own_cpu_s() - cpu_before
    sent = agent.deliverer.tally.counts["notify_sent"]
    agent.close()
    return {
        "seconds": seconds,
        "cpu_s": cpu,
        "sent": sent,
        "left": result.stats.pending,
        "timed_out": result.timed_out,
        "per_s": sent / seconds,
    }


def _bodies(path: str) -> list[bytes]:
    payloads = json.loads(Path(path).read_text(encoding="utf-8"))
    # The agent's own encoding (agent/delivery/client.py), so both send the same bytes.
    return [json.dumps(p, separators=(",", ":")).encode("utf-8") for p in payloads]


def _notify_path() -> str:
    from bench.agentconf import INTEGRATION_ID

    return f"/api/v1/partner-integrations/{INTEGRATION_ID}/availability/notify"


HEADERS = {"x-webhook-secret": SECRET, "Content-Type": "application/json"}


def task_post_sync(args: dict[str, Any]) -> dict[str, Any]:
    bodies = _bodies(args["payloads"])
    path = _notify_path()
    ok = 0
    cpu_before = own_cpu_s()
    started = time.perf_counter()
    with httpx.Client(base_url=args["url"], timeout=10.0) as client:
        for body in bodies:
            answer = client.post(path, content=body, headers=HEADERS)
            ok += answer.status_code == httpx.codes.OK
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "cpu_s": own_cpu_s() - cpu_before,
        "sent": ok,
        "per_s": ok / seconds,
    }


def task_post_threads(args: dict[str, Any]) -> dict[str, Any]:
    """`concurrency` threads sharing one httpx.Client, as the agent's delivery workers do."""
    bodies = _bodies(args["payloads"])
    path = _notify_path()
    concurrency = int(args["concurrency"])
    queue = iter(bodies)
    take = threading.Lock()
    ok = [0] * concurrency

    def sender(index: int, client: httpx.Client) -> None:
        while True:
            with take:
                body = next(queue, None)
            if body is None:
                return
            answer = client.post(path, content=body, headers=HEADERS)
            ok[index] += answer.status_code == httpx.codes.OK

    cpu_before = own_cpu_s()
    started = time.perf_counter()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    with httpx.Client(base_url=args["url"], timeout=10.0, limits=limits) as client:
        threads = [threading.Thread(target=sender, args=(n, client)) for n in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    seconds = time.perf_counter() - started
    sent = sum(ok)
    return {
        "seconds": seconds,
        "cpu_s": own_cpu_s() - cpu_before,
        "sent": sent,
        "per_s": sent / seconds,
    }


def task_post_async(args: dict[str, Any]) -> dict[str, Any]:
    bodies = _bodies(args["payloads"])
    path = _notify_path()
    concurrency = int(args["concurrency"])

    async def post_all() -> int:
        queue = iter(bodies)
        ok = 0
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(base_url=args["url"], timeout=10.0, limits=limits) as client:

            async def sender() -> None:
                nonlocal ok
                for body in queue:
                    answer = await client.post(path, content=body, headers=HEADERS)
                    ok += answer.status_code == httpx.codes.OK

            await asyncio.gather(*(sender() for _ in range(concurrency)))
        return ok

    cpu_before = own_cpu_s()
    started = time.perf_counter()
    ok = asyncio.run(post_all())
    seconds = time.perf_counter() - started
    return {
        "seconds": seconds,
        "cpu_s": own_cpu_s() - cpu_before,
        "sent": ok,
        "per_s": ok / seconds,
    }


def task_polls(args: dict[str, Any]) -> dict[str, Any]:
    from bench.inventory import IdPool, Inventory, book

    agent = _agent(args)
    inventory = Inventory(
        args["schema"], int(args["slots"]), IdPool(int(args["slots"]), args["seed"])
    )
    settle_s = float(args["overlap_s"]) + 0.2
    agent.poll()  # catch up with whatever changed since the state was recorded
    results: dict[str, list[dict[str, float]]] = {}
    with psycopg.connect(args["dsn"]) as conn:
        for count in args["counts"]:
            for _ in range(int(args["runs"])):
                # Let earlier changes leave the overlap window, then bring the cursor to now,
                # so that the measured poll sees exactly the `count` rows changed next.
                time.sleep(settle_s)
                agent.poll()
                if count:
                    book(conn, inventory, inventory.ids.take(count))
                started = time.perf_counter()
                report = agent.poll()
                seconds = time.perf_counter() - started
                results.setdefault(str(count), []).append(
                    {"ms": seconds * 1000, "rows": report.slot_rows, "notifies": report.notifies}
                )
    lookup = _lookup_probe(agent, inventory)
    agent.close()
    return {"polls": results, "lookup": lookup}


LOOKUP_PROBE_KEYS = 500
"""Keys of the second lookup probe: the agent's LOOKUP_BATCH on PostgreSQL and MySQL (one
statement); on SQLite, two statements of SQLITE_LOOKUP_BATCH and the rest."""


def _lookup_probe(agent: Any, inventory: Any) -> dict[str, Any]:
    """Fingerprints.lookup_slots() timed for 1 key and for a batch, with the plan the state
    database chose for the agent's own statement (SQLite: EXPLAIN QUERY PLAN)."""
    import sqlalchemy as sa

    from bench.inventory import slot_key

    keys = [slot_key(i) for i in inventory.ids.take(LOOKUP_PROBE_KEYS)]
    captured: list[tuple[str, Any]] = []

    def grab(*event: Any) -> None:
        _conn, _cursor, statement, parameters = event[:4]
        if statement.lstrip().upper().startswith(("SELECT", "WITH")):
            captured.append((statement, parameters))

    timings: dict[str, float] = {}
    found = 0
    sa.event.listen(agent.store.engine, "before_cursor_execute", grab)
    try:
        for count in (1, len(keys)):
            started = time.perf_counter()
            found = len(agent.store.fingerprints.lookup_slots(keys[:count]))
            timings[str(count)] = (time.perf_counter() - started) * 1000
    finally:
        sa.event.remove(agent.store.engine, "before_cursor_execute", grab)
    plans: dict[str, list[str]] = {}
    if agent.store.backend == "sqlite" and len(captured) >= 2:
        with agent.store.engine.connect() as conn:
            for count, (statement, parameters) in zip(
                timings, (captured[0], captured[-1]), strict=True
            ):
                explained = conn.exec_driver_sql("EXPLAIN QUERY PLAN " + statement, parameters)
                plans[count] = [str(row[-1]) for row in explained]
    return {"ms_by_keys": timings, "found": found, "plans": plans}


TASKS: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "scan": task_scan,
    "floor": task_floor,
    "floor_mysql": task_floor_mysql,
    "enqueue": task_enqueue,
    "claim": task_claim,
    "drain": task_drain,
    "post_sync": task_post_sync,
    "post_threads": task_post_threads,
    "post_async": task_post_async,
    "polls": task_polls,
}


def main(argv: list[str]) -> int:
    task, raw = argv
    result = TASKS[task](json.loads(raw))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
