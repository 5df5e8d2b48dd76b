"""The dlt side of measurement 5: a loop of dlt pipeline runs, in its own process.

`python -m bench.dlt_loop --url URL --schema S --receiver URL --dir DIR --since ISO`

dlt's `sql_database` source reads the slots table with an incremental cursor on updated_at
(starting at --since, so the first run does not send the whole inventory); a custom
destination (`@dlt.destination`) posts each changed row to the receiver as an
availability/notify, mapped the way a partner would write it by hand (product id looked up
from the options table, status derived from vacancies like the agent does). Pipeline state
lives in --dir. Runs follow each other back to back until SIGTERM or --max-seconds; the first
completed run prints READY, and the exit prints one JSON line: runs, their durations, and
the CPU of this process and of any children it waited for.

Only this module imports dlt: the rest of the suite, and --quick, work without it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import sys
import time
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

os.environ.setdefault("RUNTIME__DLTHUB_TELEMETRY", "false")  # no network but the loopback

import dlt
import httpx
import psycopg
from dlt.sources.sql_database import sql_database

from bench.agentconf import INTEGRATION_ID, SECRET
from bench.inventory import ZONE_NAME

NOTIFY_PATH = f"/api/v1/partner-integrations/{INTEGRATION_ID}/availability/notify"
DESTINATION_BATCH_ROWS = 100
MAX_SECONDS_DEFAULT = 1800.0


def _status(cancelled: bool, vacancies: int, capacity: int) -> str:
    if cancelled:
        return "CLOSED"
    if vacancies == 0:
        return "SOLD_OUT"
    if vacancies * 2 < capacity:
        return "LIMITED"
    return "AVAILABLE"


def _start(value: Any, zone: ZoneInfo) -> str:
    moment = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=zone)
    return moment.astimezone(zone).isoformat(timespec="seconds")


def make_destination(receiver: str, products: dict[str, str]) -> Any:
    client = httpx.Client(base_url=receiver, timeout=10.0)
    zone = ZoneInfo(ZONE_NAME)
    headers = {"x-webhook-secret": SECRET, "Content-Type": "application/json"}

    @dlt.destination(batch_size=DESTINATION_BATCH_ROWS, name="seyaha_receiver")
    def seyaha_receiver(items: Any, table: Any) -> None:
        if table["name"] != "slots":
            return
        for row in items:
            vacancies = int(row["capacity"]) - int(row["booked"])
            payload = {
                "productId": products[row["option_id"]],
                "optionId": row["option_id"],
                "availabilityId": str(row["id"]),
                "localDateTimeStart": _start(row["starts_at"], zone),
                "status": _status(bool(row["cancelled"]), vacancies, int(row["capacity"])),
                "vacancies": vacancies,
                "capacity": int(row["capacity"]),
            }
            answer = client.post(
                NOTIFY_PATH, content=json.dumps(payload, separators=(",", ":")), headers=headers
            )
            answer.raise_for_status()

    return seyaha_receiver


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dlt_loop")
    parser.add_argument("--url", required=True, help="SQLAlchemy URL of the inventory")
    parser.add_argument("--schema", required=True)
    parser.add_argument("--receiver", required=True)
    parser.add_argument("--dir", required=True, help="dlt's pipelines_dir")
    parser.add_argument("--since", required=True, help="initial updated_at (ISO, with offset)")
    parser.add_argument("--max-seconds", type=float, default=MAX_SECONDS_DEFAULT)
    args = parser.parse_args(argv)

    stop = False

    def on_term(_signum: int, _frame: Any) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    conninfo = args.url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(conninfo) as conn:
        products = {
            o: str(p)
            for o, p in conn.execute(f"SELECT id, product_id FROM {args.schema}.options")  # noqa: S608 - the bench's own schema name
        }
    pipeline = dlt.pipeline(
        pipeline_name="seyaha_bench",
        destination=make_destination(args.receiver, products),
        pipelines_dir=args.dir,
        dataset_name="bench",
    )
    since = datetime.fromisoformat(args.since)
    durations: list[float] = []
    deadline = time.monotonic() + args.max_seconds
    while not stop and time.monotonic() < deadline:
        started = time.perf_counter()
        source = sql_database(credentials=args.url, schema=args.schema, table_names=["slots"])
        source.slots.apply_hints(
            incremental=dlt.sources.incremental("updated_at", initial_value=since)
        )
        pipeline.run(source)
        durations.append(time.perf_counter() - started)
        if len(durations) == 1:
            sys.stdout.write("READY\n")
            sys.stdout.flush()
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    result = {
        "runs": len(durations),
        "durations_s": durations,
        "cpu_s": own.ru_utime + own.ru_stime,
        "children_cpu_s": children.ru_utime + children.ru_stime,
        "dlt": dlt.__version__,
    }
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
