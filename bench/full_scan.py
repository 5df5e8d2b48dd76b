"""1. Full reconciliation: Agent.scan() against the floor, a plain SELECT of the same rows.

For each size the state is baselined once (that first scan is reported too), then each run
changes about 0.1% of the slots (95% bookings, 5% deletions) and times, each in a fresh
process:
- the agent: Agent.scan() on the baselined state (PostgreSQL inventory, SQLite state), with
  range digests (the default: the database sums a hash per range, the agent reads the
  ranges that differ);
- the agent reading every row ([source] range_digests = false) on a copy of the same state;
- the floor: the same slots_query through the same driver (psycopg), a server-side cursor
  fetching 5,000 rows at a time into Python tuples, nothing else;
- the ordered floor: the same, wrapped in the ORDER BY the agent adds for its merge-join
  (agent.dialects.Dialect.ordered), to show what the sort alone costs in PostgreSQL.
Peak RSS is VmHWM of the process that ran the scan (not ru_maxrss, which Linux carries
over from the bench process that started it).
"""

from __future__ import annotations

from typing import Any

from bench import inventory, worker
from bench.context import Context
from bench.stats import median, ratio

CHANGED_FRACTION = 0.001


def measure(ctx: Context) -> dict[str, Any]:
    from agent.dialects import PostgresDialect
    from agent.source.rows import SLOT_KEY_COLUMNS

    sizes: list[dict[str, Any]] = []
    for size in ctx.plan.scan_sizes:
        inv = ctx.inventory(size)
        ctx.reference_state(size)
        config = ctx.config(f"scan-{size}", ctx.setup(size, ctx.state_copy(size, f"scan-{size}")))
        every_row = ctx.config(
            f"scan-rows-{size}",
            ctx.setup(size, ctx.state_copy(size, f"scan-rows-{size}"), range_digests=False),
        )
        slots_sql = inventory.queries(inv.schema).slots
        runs: list[dict[str, Any]] = []
        for run in range(ctx.plan.runs):
            booked, deleted = inventory.mixed_changes(
                ctx.conn, inv, max(1, int(size * CHANGED_FRACTION))
            )
            ctx.changed()
            agent = worker.run(
                "scan",
                {"config": str(config), "log": str(ctx.log(f"scan-{size}"))},
                log=ctx.log("workers"),
            )
            rows_agent = worker.run(
                "scan",
                {"config": str(every_row), "log": str(ctx.log(f"scan-rows-{size}"))},
                log=ctx.log("workers"),
            )
            floor = worker.run("floor", {"dsn": ctx.dsn, "sql": slots_sql}, log=ctx.log("workers"))
            ordered = worker.run(
                "floor",
                {"dsn": ctx.dsn, "sql": PostgresDialect().ordered(slots_sql, SLOT_KEY_COLUMNS)},
                log=ctx.log("workers"),
            )
            runs.append(
                {
                    "run": run,
                    "booked": booked,
                    "deleted": deleted,
                    "agent": agent,
                    "every_row": rows_agent,
                    "floor": floor,
                    "ordered_floor": ordered,
                }
            )
            print(
                f"  scan {size:>9,} slots run {run + 1}: agent {agent['seconds']:.2f} s "
                f"({agent['changed']} changed, {agent['removed']} removed, "
                f"{agent.get('ranges_read')} of {agent.get('ranges_total')} ranges read, "
                f"{_kb(agent.get('source_bytes'))} from the source), "
                f"every row {rows_agent['seconds']:.2f} s ({_kb(rows_agent.get('source_bytes'))}), "
                f"floor {floor['seconds']:.2f} s ({_kb(floor.get('source_bytes'))}), "
                f"ordered floor {ordered['seconds']:.2f} s, "
                f"peak RSS {agent['peak_rss_mb']:.0f} / {rows_agent['peak_rss_mb']:.0f} MB, "
                f"{rows_agent.get('source_transactions', 1)} source transaction(s) reading every row",
                flush=True,
            )
        agent_s = median([r["agent"]["seconds"] for r in runs])
        floor_s = median([r["floor"]["seconds"] for r in runs])
        sizes.append(
            {
                "slots": size,
                "generate_s": ctx.baselines[size].get("generate_s"),
                "baseline_s": ctx.baselines[size].get("seconds"),
                "baseline_peak_rss_mb": ctx.baselines[size].get("peak_rss_mb"),
                "agent_s": agent_s,
                "agent_cpu_s": median([r["agent"]["cpu_s"] for r in runs]),
                "floor_s": floor_s,
                "ordered_floor_s": median([r["ordered_floor"]["seconds"] for r in runs]),
                "ratio": ratio(agent_s, floor_s),
                "rows": runs[-1]["agent"]["rows"],
                "changed": median([r["agent"]["changed"] + r["agent"]["removed"] for r in runs]),
                "notifies": median([r["agent"]["notifies"] for r in runs]),
                "rss_before_mb": median([r["agent"]["rss_before_mb"] for r in runs]),
                "peak_rss_mb": median([r["agent"]["peak_rss_mb"] for r in runs]),
                "floor_peak_rss_mb": median([r["floor"]["peak_rss_mb"] for r in runs]),
                "source_transactions": max(
                    r["every_row"].get("source_transactions", 1) for r in runs
                ),
                "every_row_s": median([r["every_row"]["seconds"] for r in runs]),
                "every_row_ratio": ratio(
                    median([r["every_row"]["seconds"] for r in runs]), floor_s
                ),
                "every_row_peak_rss_mb": median([r["every_row"]["peak_rss_mb"] for r in runs]),
                "ranges_read": median([r["agent"].get("ranges_read") or 0 for r in runs]),
                "ranges_total": runs[-1]["agent"].get("ranges_total"),
                "agent_source_kb": _median_kb([r["agent"] for r in runs]),
                "every_row_source_kb": _median_kb([r["every_row"] for r in runs]),
                "floor_source_kb": _median_kb([r["floor"] for r in runs]),
                "runs": runs,
            }
        )
    return {"sizes": sizes}


def _kb(value: int | None) -> str:
    return "? KB" if value is None else f"{value / 1024:,.0f} KB"


def _median_kb(results: list[dict[str, Any]]) -> float | None:
    values = [r["source_bytes"] / 1024 for r in results if r.get("source_bytes") is not None]
    return median(values) if values else None
