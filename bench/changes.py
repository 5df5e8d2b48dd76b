"""1b. Full reconciliation by the share of slots changed since the last pass.

A reconciliation with range digests costs the database one pass over every row (a hash
summed per option) and then grows with the changes: each changed slot costs its option's
range digests and the reading, on both sides, of its whole range (about 20 slots). So
whether it beats the floor (the same plain SELECT as in 1.) depends on how much changed
since the last pass, and this measures where it crosses.

At the largest scan size, for each share of slots changed (largest first: each case starts
from a pass that recorded changes, as a reconciliation after busy polls does), a copy of the
state is first caught up with the inventory by one scan (not timed), then about that share
of the slots is changed (95% bookings, 5% deletions), and then, each in a fresh process and
each run on a fresh copy of the caught-up state (the same changes every run): the agent's
Agent.scan() (PostgreSQL inventory, SQLite state, range digests) and the floor.
Three cases more: "quiet" (nothing changed, after a pass that also found nothing: the sum
of every row's hash says so, here the sum of the option digests), "0.1% after a quiet pass"
(the first changed pass after such a quiet one: that sum differs, and it goes on as usual
with the option digests it summed), and "one booking after a quiet pass" (the same with a
single booking: what finds a booking when every poll is such a pass, with the two required
queries only). The 0.1% share is also timed "in a running daemon": the same pass with the
stored range digests loaded before it is timed, as a daemon without a change query loads
them once its previous pass is recorded (a fresh process loads them beside the database's
option digests, and both share the two cores), and "beside the polls": the scheduled
reconciliation of a daemon with a change query (Agent.full_scan, Scanner.reconcile), which
reads the stored option sums, asks for the range digests without parallel workers, and
reads the stored side in its own thread while another only waits for the source's first
row, so that polls and wake-ups keep a core while it runs; and "beside the polls in a
running daemon": the same after the stored digests were loaded and a poll then recorded the
changes the change query returns (the bookings; not timed), as the polls of a daemon
between two reconciliations do, and finds the deletions, which no change query returns.
"""

from __future__ import annotations

from typing import Any

from bench import inventory, worker
from bench.context import Context, copy_state
from bench.stats import against_floor

SHARES = (0.01, 0.003, 0.001, 0.0003, 0.0001)
"""Shares of the slots changed since the last pass, largest first."""
AFTER_QUIET_SHARE = 0.001
"""The share changed in the case that follows a quiet pass."""
DAEMON_SHARE = 0.001
"""The share also timed with the stored digests loaded beforehand (a running daemon's pass), and
beside the polls (a daemon with a change query)."""


def measure(ctx: Context) -> dict[str, Any]:
    size = max(ctx.plan.scan_sizes)
    inv = ctx.inventory(size)
    slots_sql = inventory.queries(inv.schema).slots
    live = ctx.state_copy(size, f"changes-{size}")
    live_config = ctx.config(f"changes-{size}", ctx.setup(size, live))
    run_state = ctx.path(f"changes-{size}-run.db")
    run_config = ctx.config(f"changes-{size}-run", ctx.setup(size, run_state))

    def catch_up() -> None:
        worker.run(
            "scan",
            {"config": str(live_config), "log": str(ctx.log(f"changes-{size}"))},
            log=ctx.log("workers"),
        )

    def timed(
        case: str,
        share: float,
        count: int,
        *,
        loaded: bool = False,
        beside: bool = False,
        polled: bool = False,
    ) -> dict[str, Any]:
        runs: list[dict[str, Any]] = []
        for _ in range(ctx.plan.runs):
            copy_state(live, run_state)
            agent = worker.run(
                "scan",
                {
                    "config": str(run_config),
                    "log": str(ctx.log(f"changes-{size}-run")),
                    "digests_loaded": loaded,
                    "beside_polls": beside,
                    "polled": polled,
                },
                log=ctx.log("workers"),
            )
            floor = worker.run("floor", {"dsn": ctx.dsn, "sql": slots_sql}, log=ctx.log("workers"))
            runs.append({"agent": agent, "floor": floor})
        summary = against_floor(runs)
        print(
            f"  {case}: {count:,} slots changed, agent {summary['agent_s']:.2f} s, floor "
            f"{summary['floor_s']:.2f} s ({summary['ratio']:.2f}x), {summary['ranges_read']:.0f} "
            f"of {summary['ranges_total']} ranges read",
            flush=True,
        )
        return {"case": case, "share": share, "requested": count, **summary, "runs": runs}

    cases: list[dict[str, Any]] = []
    for share in SHARES:
        catch_up()
        count = max(1, int(size * share))
        inventory.mixed_changes(ctx.conn, inv, count)
        ctx.changed()
        cases.append(timed(f"{share * 100:g}%", share, count))
        if share == DAEMON_SHARE:
            cases.append(timed(f"{share * 100:g}% in a running daemon", share, count, loaded=True))
            cases.append(timed(f"{share * 100:g}% beside the polls", share, count, beside=True))
            cases.append(
                timed(
                    f"{share * 100:g}% beside the polls in a running daemon",
                    share,
                    count,
                    beside=True,
                    polled=True,
                )
            )
    # Caught up twice: the first pass records the last case's changes, the second finds
    # nothing changed and records the sum of every row's hash, which the timed passes check.
    catch_up()
    catch_up()
    cases.append(timed("quiet", 0.0, 0))
    count = max(1, int(size * AFTER_QUIET_SHARE))
    inventory.mixed_changes(ctx.conn, inv, count)
    ctx.changed()
    cases.append(
        timed(f"{AFTER_QUIET_SHARE * 100:g}% after a quiet pass", AFTER_QUIET_SHARE, count)
    )
    # Quiet again (the first catch-up records those changes, the second finds nothing), then
    # a single booking.
    catch_up()
    catch_up()
    inventory.book(ctx.conn, inv, inv.ids.take(1))
    ctx.changed()
    cases.append(timed("one booking after a quiet pass", 1 / size, 1))
    return {"slots": size, "cases": cases}
