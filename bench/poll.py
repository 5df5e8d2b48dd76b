"""2. Incremental polls: Agent.poll() with 0, 100 and 10,000 changed rows in the big table.

The poll runs slots_changed_query (`... AND s.updated_at >= :since`, updated_at indexed) in a
fresh process on a copy of the baselined state. Each measured poll is preceded by a wait of
cursor_overlap + 0.2 s and an untimed poll, so that it sees exactly the rows changed for it:
with the agent's defaults, a poll re-reads every row changed in the last 5 s (the late-row
sweep reads the rest of cursor_overlap beside the polls), whatever the previous poll already
saw (see the latency measurement).
At the end, Fingerprints.lookup_slots() (how a poll finds the stored fingerprints of the rows
it read) is timed alone for 1 key and for one batch of 500, and the state database's plan
for that statement is shown.
"""

from __future__ import annotations

from typing import Any

from bench import worker
from bench.context import DATA_SEED, Context
from bench.stats import median

POLL_OVERLAP_S = 1.0
"""cursor_overlap of this measurement (seconds): short, so that runs can follow each other."""


def measure(ctx: Context) -> dict[str, Any]:
    size = ctx.plan.big
    inv = ctx.inventory(size)
    state = ctx.state_copy(size, "polls")
    config = ctx.config("polls", ctx.setup(size, state, cursor_overlap_s=POLL_OVERLAP_S))
    result = worker.run(
        "polls",
        {
            "config": str(config),
            "log": str(ctx.log("polls")),
            "dsn": ctx.dsn,
            "schema": inv.schema,
            "slots": size,
            # Ids of the worker's own changes: a seed of their own, among updatable slots.
            "seed": DATA_SEED + 7,
            "counts": list(ctx.plan.poll_counts),
            "runs": ctx.plan.poll_runs,
            "overlap_s": POLL_OVERLAP_S,
        },
        log=ctx.log("workers"),
    )
    ctx.changed()
    rows = []
    for count in ctx.plan.poll_counts:
        polls = result["polls"][str(count)]
        ms = median([p["ms"] for p in polls])
        rows.append(
            {
                "changed": count,
                "median_ms": ms,
                "min_ms": min(p["ms"] for p in polls),
                "max_ms": max(p["ms"] for p in polls),
                "rows_read": median([p["rows"] for p in polls]),
                "notifies": median([p["notifies"] for p in polls]),
                "us_per_change": ms * 1000 / count if count else None,
                "polls": polls,
            }
        )
        print(f"  poll with {count:>6,} changed rows: median {ms:.1f} ms", flush=True)
    lookup = result.get("lookup", {})
    return {"slots": size, "overlap_s": POLL_OVERLAP_S, "rows": rows, "lookup": lookup}
