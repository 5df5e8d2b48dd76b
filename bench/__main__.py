"""`python -m bench all [--quick]` or `python -m bench NAME`: run measurements, print, report.

NAME is one of scan, changes, mariadb, poll, latency, throughput, dlt, takeover, profile, answers, platform,
sharing. `all` runs every one of them but answers, platform and sharing (dlt and profile only
in the full run) and regenerates docs/benchmarks.md; `all --quick` (small sizes, one run,
about a minute; what CI runs to check the suite still works) writes its report to
bench/results/benchmarks-quick.md instead, so a quick run never replaces the real figures.
A single NAME writes bench/results/NAME.md. The raw results of every run go beside the report
as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

from bench import (
    answers,
    changes,
    full_scan,
    latency,
    mariadb,
    platform,
    poll,
    profile,
    report,
    sharing,
    snapshot,
    takeover,
    throughput,
    versus_dlt,
)
from bench.context import FULL, QUICK, Context

MEASUREMENTS = {
    "scan": full_scan.measure,
    "changes": changes.measure,
    "mariadb": mariadb.measure,
    "poll": poll.measure,
    "latency": latency.measure,
    "throughput": throughput.measure,
    "dlt": versus_dlt.measure,
    "takeover": takeover.measure,
    "profile": profile.measure,
    "answers": answers.measure,
    "platform": platform.measure,
    "sharing": sharing.measure,
}
FULL_ONLY = ("dlt", "profile", "answers")
"""Left out of `all --quick`: dlt is an optional extra, a profile is not a check, and answers
waits out answers that take seconds each (even `answers --quick` takes a few minutes)."""
ON_ITS_OWN = ("answers", "platform", "sharing")
"""Run only when named: answers waits out slow and trickled answers for about 15 minutes,
more than the rest of a full run can carry; platform (one agent, 1,000 integrations) takes
about 10 minutes of its own, sharing (1 then 3 agents on one platform) about as long."""
ONCE = ("answers", "sharing")
"""Run once whatever --runs says (answers: each case once; sharing: once per agent count)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("name", choices=["all", *MEASUREMENTS], help="what to measure")
    parser.add_argument("--quick", action="store_true", help="small sizes, one run (CI)")
    parser.add_argument("--runs", type=int, help="runs per measurement (default 3, quick 1)")
    parser.add_argument("--output", type=Path, help="where to write the Markdown report")
    parser.add_argument(
        "--modes",
        help="latency modes to run, comma-separated (default: all of "
        + ", ".join(latency.MODES)
        + ")",
    )
    parser.add_argument(
        "--scan-sizes",
        help="inventory sizes the scan measurement runs at, comma-separated (default "
        + ", ".join(str(n) for n in FULL.scan_sizes)
        + ")",
    )
    parser.add_argument(
        "--platform-size",
        metavar="NxM[xB]",
        help="platform: N integrations of M slots, one of them of B slots instead (default "
        f"{platform.FULL_SIZES.integrations}x{platform.FULL_SIZES.slots}x"
        f"{platform.FULL_SIZES.backlog}; --quick {platform.QUICK_SIZES.integrations}x"
        f"{platform.QUICK_SIZES.slots}x{platform.QUICK_SIZES.backlog})",
    )
    parser.add_argument(
        "--platform-bookings",
        type=int,
        metavar="K",
        help=f"platform: bookings per stream (default {platform.FULL_SIZES.bookings}; --quick "
        f"{platform.QUICK_SIZES.bookings})",
    )
    parser.add_argument(
        "--agents",
        metavar="N,M",
        help="sharing: agent counts to run, comma-separated (default "
        + ",".join(map(str, sharing.DEFAULT_AGENTS))
        + ")",
    )
    parser.add_argument(
        "--bookings",
        type=int,
        metavar="K",
        help=f"sharing: bookings spread over the integrations (default "
        f"{sharing.FULL_SIZES.bookings}; --quick {sharing.QUICK_SIZES.bookings}); "
        "--platform-size NxM[xB] sets its platform too (default "
        f"{sharing.FULL_SIZES.integrations}x{sharing.FULL_SIZES.slots}; --quick "
        f"{sharing.QUICK_SIZES.integrations}x{sharing.QUICK_SIZES.slots})",
    )
    parser.add_argument(
        "--lease",
        type=float,
        metavar="S",
        help=f"sharing: [state] scanner_lease in seconds (default {sharing.FULL_LEASE_S:g}; "
        f"--quick {sharing.QUICK_LEASE_S:g})",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (configs, states, logs)"
    )
    args = parser.parse_args(argv)

    plan = QUICK if args.quick else FULL
    if args.runs:
        plan = replace(plan, runs=args.runs, latency_runs=args.runs)
    if args.modes:
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
        unknown = [m for m in modes if m not in latency.MODES]
        if unknown:
            parser.error(
                f"unknown latency mode(s) {', '.join(unknown)}; known: {', '.join(latency.MODES)}"
            )
        plan = replace(plan, latency_modes=modes)
    if args.scan_sizes:
        try:
            sizes = tuple(int(n.replace("_", "")) for n in args.scan_sizes.split(",") if n.strip())
        except ValueError:
            parser.error(f"--scan-sizes takes whole numbers (got {args.scan_sizes!r})")
        if not sizes or min(sizes) < 1:
            parser.error("--scan-sizes takes at least one size above 0")
        plan = replace(plan, scan_sizes=sizes)
    try:
        platform_sizes = platform.sizes(plan.quick, args.platform_size, args.platform_bookings)
        sharing_options = sharing.options(
            plan.quick,
            args.agents,
            args.platform_size,
            args.bookings if args.bookings is not None else args.platform_bookings,
            args.lease,
        )
    except ValueError as exc:
        parser.error(str(exc))
    measurements: dict[str, Callable[[Context], Any]] = {
        **MEASUREMENTS,
        "platform": partial(platform.measure, sizes=platform_sizes),
        "sharing": partial(sharing.measure, opts=sharing_options),
    }
    if args.name == "all":
        names = [
            n for n in MEASUREMENTS if n not in ON_ITS_OWN and not (plan.quick and n in FULL_ONLY)
        ]
    else:
        names = [args.name]
    if args.output is not None:
        output = args.output.resolve()
    elif args.name == "all" and not plan.quick:
        output = report.DOCS_PATH
    else:
        suffix = "-quick" if plan.quick else ""
        output = (
            report.RESULTS_DIR / f"{'benchmarks' if args.name == 'all' else args.name}{suffix}.md"
        )
    command = "python -m bench " + " ".join(argv if argv is not None else sys.argv[1:])

    started = time.monotonic()
    ctx = Context.open(plan)
    agent = snapshot.take(ctx.workdir / "snapshot")
    print(f"benchmarks: {', '.join(names)}; work folder {ctx.workdir}", flush=True)
    results: dict[str, Any] = {}
    failed = False
    try:
        for name in names:
            print(f"== {name}", flush=True)
            begun = time.monotonic()
            try:
                results[name] = measurements[name](ctx)
            except Exception as exc:
                traceback.print_exc()
                results[name] = {"failed": f"{type(exc).__name__}: {exc}"}
                failed = True
            print(f"   ({time.monotonic() - begun:.0f} s)", flush=True)
    finally:
        extra_versions = dict(ctx.versions)
        os.chdir(report.ROOT)  # out of the work folder before it is removed
        if failed or args.keep:
            print(f"work folder kept: {ctx.workdir}", flush=True)
        ctx.close(keep_files=failed or args.keep)
    extra_versions["seyaha-agent"] = agent.describe()
    runs = 1 if len(names) == 1 and names[0] in ONCE else plan.runs
    meta = report.meta_for(command, time.monotonic() - started, runs, extra_versions)
    document = report.render(results, meta)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(document, encoding="utf-8")
    raw = report.RESULTS_DIR / (output.stem + ".json")
    raw.parent.mkdir(parents=True, exist_ok=True)
    raw.write_text(
        json.dumps({"meta": meta, "results": results}, indent=1, default=str), encoding="utf-8"
    )
    print(document)
    print(f"report written to {output}; raw results in {raw}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
