"""The results as tables: printed after a run, and docs/benchmarks.md regenerated from them.

Every figure in the document comes from the results of the run that wrote it; the prose is
either fixed (what is measured, taken from each measurement module's docstring) or computed
from the results (which goals are met). Never edit docs/benchmarks.md by hand.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
import platform
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DOCS_PATH = ROOT / "docs" / "benchmarks.md"
RESULTS_DIR = ROOT / "bench" / "results"

SCAN_RATIO_GOAL = 2.0
SCAN_RSS_GOAL_MB = 150.0
POLL_IDLE_GOAL_MS = 10.0
LATENCY_P50_GOAL_MS = 50.0
BULK_P99_GOAL_MS = 250.0
"""Commit-to-delivery p99 of bookings in the minute after a bulk change."""
RECONCILING_P99_GOAL_MS = 100.0
"""Commit-to-delivery p99 of bookings committed while a full reconciliation runs."""
LATENCY_P99_GOAL_MS = 250.0
THROUGHPUT_GOAL = 0.70

SECTIONS = {
    "scan": "bench.full_scan",
    "changes": "bench.changes",
    "mariadb": "bench.mariadb",
    "poll": "bench.poll",
    "latency": "bench.latency",
    "throughput": "bench.throughput",
    "dlt": "bench.versus_dlt",
    "takeover": "bench.takeover",
    "profile": "bench.profile",
    "answers": "bench.answers",
    "platform": "bench.platform",
    "sharing": "bench.sharing",
}


# -- the machine ----------------------------------------------------------------------------


def machine() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory_kib = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory_kib = int(line.split()[1])
    return {
        "cores": str(os.cpu_count()),
        "memory": f"{memory_kib / 1024 / 1024:.1f} GiB",
        "cpu": model,
        "kernel": platform.release(),
    }


def versions(extra: dict[str, str]) -> dict[str, str]:
    import httpx
    import psycopg
    import sqlalchemy

    import agent
    from bench.versus_dlt import dlt_version

    return {
        "Python": platform.python_version(),
        "PostgreSQL": extra.get("postgresql", "?"),
        "SQLAlchemy": sqlalchemy.__version__,
        "psycopg": psycopg.__version__,
        "httpx": httpx.__version__,
        "dlt": dlt_version() or "not installed",
        "seyaha-agent": f"{agent.__version__}, {extra.get('seyaha-agent', '?')}",
    }


# -- formatting -----------------------------------------------------------------------------


def _num(value: Any, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and digits == 0):
        return f"{int(value):,}"
    return f"{value:,.{digits}f}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**not met**")


def _docstring(module: str) -> list[str]:
    doc = inspect.getdoc(importlib.import_module(module)) or ""
    return ["```text", *doc.splitlines(), "```"]


# -- sections ---------------------------------------------------------------------------------


def scan_section(r: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    rows = [
        [
            _num(s["slots"], 0),
            _num(s["agent_s"], 2),
            f"{_num(s.get('ranges_read'), 0)} / {_num(s.get('ranges_total'), 0)}",
            _num(s.get("agent_source_kb"), 0),
            _num(s.get("every_row_s"), 2),
            _num(s.get("every_row_source_kb"), 0),
            _num(s["floor_s"], 2),
            _num(s.get("floor_source_kb"), 0),
            f"{_num(s['ratio'], 2)}x",
            f"{_num(s.get('every_row_ratio'), 1)}x",
            _num(s["ordered_floor_s"], 2),
            _num(s["agent_cpu_s"], 2),
            _num(s["changed"], 0),
            _num(s["peak_rss_mb"], 0),
            _num(s.get("every_row_peak_rss_mb"), 0),
            _num(s["floor_peak_rss_mb"], 0),
            _num(s["baseline_s"], 1),
            _num(s["baseline_peak_rss_mb"], 0),
            _num(s.get("source_transactions"), 0),
        ]
        for s in r["sizes"]
    ]
    lines = _table(
        [
            "slots",
            "agent (s)",
            "ranges read / all",
            "agent: KB from source",
            "agent reading every row (s)",
            "every row: KB from source",
            "floor (s)",
            "floor: KB from source",
            "agent / floor",
            "every row / floor",
            "floor + ORDER BY (s)",
            "agent CPU (s)",
            "changed rows",
            "peak RSS (MB)",
            "every row: peak RSS (MB)",
            "floor peak RSS (MB)",
            "first scan (baseline, s)",
            "baseline peak RSS (MB)",
            "source transactions reading every row (read_transaction_max 30 s)",
        ],
        rows,
    )
    biggest = r["sizes"][-1]
    goals: list[tuple[str, str, bool | None]] = [
        (
            f"full reconciliation (range digests) within {SCAN_RATIO_GOAL:g}x of the floor at "
            f"{_num(biggest['slots'], 0)} slots",
            f"{_num(biggest['ratio'], 1)}x ({_num(biggest['agent_s'], 1)} s vs "
            f"{_num(biggest['floor_s'], 1)} s)",
            biggest["ratio"] <= SCAN_RATIO_GOAL,
        ),
        (
            f"peak RSS under {SCAN_RSS_GOAL_MB:g} MB at {_num(biggest['slots'], 0)} slots",
            f"{_num(biggest['peak_rss_mb'], 0)} MB",
            biggest["peak_rss_mb"] < SCAN_RSS_GOAL_MB,
        ),
        (
            f"full reconciliation (range digests) faster than the floor at "
            f"{_num(biggest['slots'], 0)} slots",
            f"{_num(biggest['agent_s'], 2)} s vs {_num(biggest['floor_s'], 2)} s",
            biggest["agent_s"] < biggest["floor_s"],
        ),
        (
            "bytes read from the source follow the changes, not the inventory",
            f"{_num(biggest.get('agent_source_kb'), 0)} KB vs "
            f"{_num(biggest.get('floor_source_kb'), 0)} KB for the floor",
            None
            if biggest.get("agent_source_kb") is None or not biggest.get("floor_source_kb")
            else biggest["agent_source_kb"] < 0.1 * biggest["floor_source_kb"],
        ),
    ]
    if len(r["sizes"]) > 1:
        small = r["sizes"][0]
        growth = biggest["peak_rss_mb"] - small["peak_rss_mb"]
        lines += [
            "",
            f"Peak RSS of the scan: {_num(small['peak_rss_mb'], 0)} MB at "
            f"{_num(small['slots'], 0)} slots, {_num(biggest['peak_rss_mb'], 0)} MB at "
            f"{_num(biggest['slots'], 0)} slots ({growth:+.0f} MB for "
            f"{biggest['slots'] / small['slots']:.0f}x the rows); the process holds "
            f"{_num(biggest['rss_before_mb'], 0)} MB before the scan starts (interpreter, "
            "SQLAlchemy, httpx, pydantic, the catalog).",
        ]
    return lines, goals


def changes_section(r: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    cases = r["cases"]
    rows = [
        [
            c["case"],
            _num(c["changed"], 0),
            f"{_num(c['ranges_read'], 0)} / {_num(c.get('ranges_total'), 0)}",
            _num(c.get("agent_source_kb"), 0),
            _num(c["agent_s"], 2),
            _num(c["agent_cpu_s"], 2),
            _num(c["floor_s"], 2),
            f"{_num(c['ratio'], 2)}x",
            "yes" if c.get("slots_digest_matched") else "no",
        ]
        for c in cases
    ]
    lines = [
        f"{_num(r['slots'], 0)} slots.",
        "",
        *_table(
            [
                "changed since the last pass",
                "changed rows",
                "ranges read / all",
                "agent: KB from source",
                "agent (s)",
                "agent CPU (s)",
                "floor (s)",
                "agent / floor",
                "the digest of every row matched",
            ],
            rows,
        ),
    ]
    # By share alone: "0.1% after a quiet pass" is the same share after another kind of pass.
    shares = [c for c in cases if c["share"] > 0 and c["case"] == f"{c['share'] * 100:g}%"]
    below = [c for c in shares if c["agent_s"] < c["floor_s"]]
    crossing = max(below, key=lambda c: c["share"]) if below else None
    lines += [
        "",
        (
            f"Of the shares measured, the largest where a pass beats the floor: "
            f"{crossing['case']} of the slots changed since the last pass."
            if crossing
            else "A pass beats the floor at none of the shares measured."
        )
        + " Beyond the digest of every row, a pass's cost grows with the changes: each "
        "changed slot costs its option's range digests and about 20 slots read on each side.",
    ]

    def faster(what: str, case: dict[str, Any]) -> tuple[str, str, bool | None]:
        return (
            f"a reconciliation {what}, faster than the floor at {_num(r['slots'], 0)} slots",
            f"{_num(case['agent_s'], 2)} s vs {_num(case['floor_s'], 2)} s",
            case["agent_s"] < case["floor_s"],
        )

    named = {c["case"]: c for c in cases}
    goals = [
        faster(what, named[case])
        for case, what in (
            ("0.1%", "with 0.1% changed (a fresh process)"),
            (
                "0.1% in a running daemon",
                "with 0.1% changed (a running daemon, the stored digests loaded after its "
                "last pass)",
            ),
            (
                "0.1% beside the polls",
                "with 0.1% changed (beside the polls: a daemon with a change query, started)",
            ),
            (
                "0.1% beside the polls in a running daemon",
                "with 0.1% changed (beside the polls, after the polls recorded the bookings)",
            ),
        )
        if case in named
    ]
    quiet = next((c for c in cases if c["share"] == 0), None)
    if quiet is not None:
        goals.append(faster("that finds nothing changed", quiet))
    return lines, goals


def mariadb_section(r: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    cases = r["cases"]
    rows = [
        [
            c["case"],
            _num(c["changed"], 0),
            f"{_num(c['ranges_read'], 0)} / {_num(c.get('ranges_total'), 0)}",
            _num(c["agent_s"], 2),
            _num(c["agent_cpu_s"], 2),
            _num(c["floor_s"], 2),
            f"{_num(c['ratio'], 2)}x",
            _num(c.get("agent_source_kb"), 0),
            _num(c.get("floor_source_kb"), 0),
            "yes" if c.get("slots_digest_matched") else "no",
        ]
        for c in cases
    ]
    interval = r["poll_interval_s"]
    quiet = next(c for c in cases if c["requested"] == 0)
    booking = next(c for c in cases if c["requested"] == 1)
    changed = cases[-1]
    lines = [
        f"{_num(r['slots'], 0)} slots, MariaDB {r['version']}; the first scan (baseline) "
        f"{_num(r['baseline_s'], 1)} s at a peak RSS of {_num(r['baseline_peak_rss_mb'], 0)} MB.",
        "",
        *_table(
            [
                "case",
                "changed rows",
                "ranges read / all",
                "agent (s)",
                "agent CPU (s)",
                "floor (s)",
                "agent / floor",
                "agent: KB from source",
                "floor: KB from source",
                "the digest of every row matched",
            ],
            rows,
        ),
        "",
        f"Were every poll (poll_interval {interval:g} s) such a pass, each would cost the "
        f"quiet one at rest, about {_num(100 * quiet['agent_cpu_s'] / interval, 1)}% of a "
        f"core for the agent and "
        f"{_num(100 * (quiet['agent_s'] - quiet['agent_cpu_s']) / interval, 0)}% for MariaDB "
        "(the pass's wall time beyond the agent's CPU), and a booking would arrive within "
        f"poll_interval plus the pass that finds it ({_num(booking['agent_s'], 1)} s) plus "
        "its delivery.",
    ]
    daemon = r.get("daemon")
    if daemon is not None:
        lines += [
            "",
            f"The daemon with the two required queries only (poll_interval "
            f"{daemon['poll_interval_s']:g} s, full_scan_interval "
            f"{daemon['full_scan_interval_s']:g} s) passes when a table's UPDATE_TIME moves: at "
            f"rest for {daemon['rest_s']:g} s it used {_pct(daemon['rest_daemon_core'])} of a "
            f"core, MariaDB {_pct(daemon['rest_mariadb_core'])}, in "
            f"{daemon['rest_passes']} pass(es). {daemon['bookings']} single bookings, each at "
            f"rest, arrived in p50 {_num(daemon['p50_ms'], 0)} ms, at most "
            f"{_num(daemon['max_ms'], 0)} ms ({daemon['missing']} missing; "
            f"{', '.join(str(ms) for ms in daemon['latencies_ms'])} ms).",
        ]
    goals: list[tuple[str, str, bool | None]] = [
        (
            f"MariaDB: full reconciliation, {changed['case']}, faster than the floor at "
            f"{_num(r['slots'], 0)} slots",
            f"{_num(changed['agent_s'], 2)} s vs {_num(changed['floor_s'], 2)} s",
            changed["agent_s"] < changed["floor_s"],
        ),
    ]
    if daemon is None:
        return lines, goals
    limit_ms = (daemon["poll_interval_s"] + 1.0) * 1000
    goals += [
        (
            f"MariaDB, two queries only: the daemon under 5% of a core at rest "
            f"({_num(r['slots'], 0)} slots)",
            f"{_pct(daemon['rest_daemon_core'])} (MariaDB {_pct(daemon['rest_mariadb_core'])})",
            daemon["rest_daemon_core"] < 0.05,
        ),
        (
            "MariaDB, two queries only: a booking at rest within poll_interval + 1 s",
            f"at most {_num(daemon['max_ms'], 0)} ms, {daemon['missing']} missing",
            daemon["missing"] == 0 and daemon["max_ms"] <= limit_ms,
        ),
    ]
    return lines, goals


def _pct(share: float) -> str:
    return f"{_num(100 * share, 1)}%"


def poll_section(r: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    rows = [
        [
            _num(p["changed"], 0),
            _num(p["median_ms"], 1),
            _num(p["min_ms"], 1),
            _num(p["max_ms"], 1),
            _num(p["rows_read"], 0),
            _num(p["notifies"], 0),
            _num(p["us_per_change"], 0),
        ]
        for p in r["rows"]
    ]
    lines = [
        f"{_num(r['slots'], 0)} slots; cursor_overlap {r['overlap_s']:g} s; median of "
        f"{len(r['rows'][0]['polls'])} polls each.",
        "",
        *_table(
            [
                "changed rows",
                "median (ms)",
                "min (ms)",
                "max (ms)",
                "rows read",
                "notifies queued",
                "µs per changed row",
            ],
            rows,
        ),
    ]
    lookup = r.get("lookup") or {}
    if lookup.get("ms_by_keys"):
        timed = ", ".join(
            f"{_num(int(k), 0)} key{'s' if int(k) > 1 else ''}: {_num(v, 1)} ms"
            for k, v in lookup["ms_by_keys"].items()
        )
        lines += [
            "",
            f"Fingerprints.lookup_slots() alone on this state ({_num(r['slots'], 0)} stored "
            f"slots): {timed}.",
        ]
        for count, plan in (lookup.get("plans") or {}).items():
            lines += [
                "",
                f"SQLite's plan for the last statement of the look-up of {_num(int(count), 0)} "
                f"key{'s' if int(count) > 1 else ''}:",
                "",
                "```text",
                *plan,
                "```",
            ]
    idle = r["rows"][0]
    goals: list[tuple[str, str, bool | None]] = [
        (
            f"a poll with 0 changes under {POLL_IDLE_GOAL_MS:g} ms",
            f"{_num(idle['median_ms'], 1)} ms",
            idle["median_ms"] < POLL_IDLE_GOAL_MS,
        )
    ]
    if len(r["rows"]) >= 3:
        mid, big = r["rows"][1], r["rows"][-1]
        per_mid = (mid["median_ms"] - idle["median_ms"]) / mid["changed"]
        per_big = (big["median_ms"] - idle["median_ms"]) / big["changed"]
        goals.append(
            (
                "poll time proportional to the changes",
                f"{per_mid * 1000:.0f} µs per change at {_num(mid['changed'], 0)}, "
                f"{per_big * 1000:.0f} µs at {_num(big['changed'], 0)} (above the idle poll)",
                None,
            )
        )
    return lines, goals


def latency_section(r: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    rows = [
        [
            m["mode"],
            _num(m["commits"], 0),
            _num(m["missing"], 0),
            _num(m["p50_ms"], 0),
            _num(m["p95_ms"], 0),
            _num(m["p99_ms"], 0),
            _num(m["max_ms"], 0),
            _num(m["cpu_s_per_1000"], 2),
            _num(m.get("reconciliations", float("nan")), 0),
            _num(m.get("commits_during", float("nan")), 0),
            _num(m.get("p50_during_ms", float("nan")), 0),
            _num(m.get("p99_during_ms", float("nan")), 0),
        ]
        for m in r["modes"]
    ]
    lines = [
        f"{_num(r['slots'], 0)} slots; {len(r['modes'][0]['runs'])} run(s) of "
        f"{_num(r['commits_per_run'], 0)} single-slot commits, one every "
        f"{r['spacing_ms']:g} ms (open loop) unless a mode says otherwise below; percentiles "
        "are the median over runs.",
        "",
        *_table(
            [
                "mode",
                "commits",
                "not delivered",
                "p50 (ms)",
                "p95 (ms)",
                "p99 (ms)",
                "max (ms)",
                "daemon CPU s per 1,000 changes",
                "reconciliations in the window",
                "commits while one ran",
                "their p50 (ms)",
                "their p99 (ms)",
            ],
            rows,
        ),
    ]
    goals: list[tuple[str, str, bool | None]] = []
    wake = next(
        (
            m
            for m in r["modes"]
            if m["triggers"]
            and not m.get("through_reconciliations")
            and not m.get("bulk")
            and not m.get("stamp_behind_s")
            and not m.get("restart")
        ),
        None,
    )
    for m in r["modes"]:
        spacing_ms = m.get("spacing_ms", r["spacing_ms"])
        if spacing_ms != r["spacing_ms"]:
            lines += ["", f"{m['mode']}: commits one every {spacing_ms:g} ms."]
        if "rest_daemon_core" in m:
            lines += [
                "",
                f"{m['mode']}: at rest the daemon used "
                f"{_num(m['rest_daemon_core'] * 100, 1)}% of a core and PostgreSQL "
                f"{_num(m['rest_postgres_core'] * 100, 1)}% (every postgres process of the "
                "machine, those that exited meanwhile and the bench's idle connection "
                "included).",
            ]
        for run in m.get("runs", []):
            if "down_s" in run:
                lines += [
                    "",
                    f"{m['mode']}: down {', '.join(f'{s:g}' for s in run['down_s'])} s (the "
                    "signal to the new daemon's start); the "
                    f"{_num(run['commits_down'], 0)} commits meanwhile arrived in p50 "
                    f"{_num(run['p50_down_ms'], 0)} ms, at most {_num(run['max_down_ms'], 0)} "
                    f"ms; the whole window p99 {_num(run['p99_ms'], 0)} ms, max "
                    f"{_num(run['max_ms'], 0)} ms ({run['missing']} not delivered).",
                ]
            if "singles_ms" in run:
                lines += [
                    "",
                    f"{m['mode']}: {run['singles']} single bookings at rest arrived in p50 "
                    f"{_num(run['singles_p50_ms'], 0)} ms, at most "
                    f"{_num(run['singles_max_ms'], 0)} ms ({run['singles_missing']} missing; "
                    f"{', '.join(str(ms) for ms in run['singles_ms'])} ms).",
                ]
    default = next(
        (m for m in r["modes"] if m.get("incremental") is False and not m.get("delivery")), None
    )
    if default is not None and "rest_daemon_core" in default:
        bound_ms = (default["poll_interval_s"] + 1) * 1000
        goals += [
            (
                f"two queries only: the daemon under 5% of a core at rest ({_num(r['slots'], 0)} "
                "slots)",
                f"{_num(default['rest_daemon_core'] * 100, 1)}% (PostgreSQL "
                f"{_num(default['rest_postgres_core'] * 100, 1)}%)",
                default["rest_daemon_core"] < 0.05,
            ),
            (
                "two queries only: every booking within poll_interval + 1 s",
                f"max {_num(default['max_ms'], 0)} ms (p99 {_num(default['p99_ms'], 0)} ms)",
                default["max_ms"] <= bound_ms and not default["missing"],
            ),
        ]
    bulk = next((m for m in r["modes"] if m.get("bulk")), None)
    if bulk is not None:
        goals.append(
            (
                f"with wake-ups, p99 <= {BULK_P99_GOAL_MS:g} ms in the minute after a bulk "
                f"change of {_num(r.get('bulk_rows', float('nan')), 0)} rows",
                f"{_num(bulk['p99_ms'], 0)} ms",
                bulk["p99_ms"] <= BULK_P99_GOAL_MS,
            )
        )
    through = next((m for m in r["modes"] if m.get("through_reconciliations")), None)
    if through is not None and through.get("commits_during"):
        goals.append(
            (
                f"with wake-ups, p99 <= {RECONCILING_P99_GOAL_MS:g} ms while a reconciliation "
                f"runs ({_num(r['slots'], 0)} slots)",
                f"{_num(through['p99_during_ms'], 0)} ms over "
                f"{_num(through['commits_during'], 0)} commits",
                through["p99_during_ms"] <= RECONCILING_P99_GOAL_MS,
            )
        )
    for m in r["modes"]:
        if any("down_s" in run for run in m.get("runs", [])):
            goals.append(
                (
                    f"{m['mode']}: every booking delivered",
                    f"{_num(m['missing'], 0)} of {_num(m['commits'], 0)} not delivered; max "
                    f"{_num(m['max_ms'], 0)} ms",
                    not m["missing"],
                )
            )
    if wake is not None:
        goals += [
            (
                f"with wake-ups, p50 < {LATENCY_P50_GOAL_MS:g} ms",
                f"{_num(wake['p50_ms'], 0)} ms",
                wake["p50_ms"] < LATENCY_P50_GOAL_MS,
            ),
            (
                f"with wake-ups, p99 < {LATENCY_P99_GOAL_MS:g} ms",
                f"{_num(wake['p99_ms'], 0)} ms",
                wake["p99_ms"] < LATENCY_P99_GOAL_MS,
            ),
        ]
    return lines, goals


def throughput_section(r: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    rows = []
    for t in r["receivers"]:
        for p in t["rows"]:
            floor = (
                "httpx.Client, sequential"
                if p["concurrency"] == 1
                else f"httpx.Client, {p['concurrency']} threads"
            )
            rows.append(
                [
                    t["receiver"],
                    _num(t["backlog"], 0),
                    _num(p["concurrency"], 0),
                    _num(p["agent_per_s"], 0),
                    floor,
                    _num(p["floor_per_s"], 0),
                    f"{_num(p['agent_vs_floor'] * 100, 0)}%",
                    _num(p["agent_cpu_ms_per_message"], 2),
                    _num(p["floor_cpu_ms_per_message"], 2),
                    f"{_num(p['receiver_busy_agent'] * 100, 0)}% / "
                    f"{_num(p['receiver_busy_floor'] * 100, 0)}%",
                    _num(len(t["runs"]), 0),
                ]
            )
    async_rows = [
        [t["receiver"], _num(t["async_per_s"], 0), f"{_num(t['receiver_busy_async'] * 100, 0)}%"]
        for t in r["receivers"]
    ]
    d, claim = r["defaults"], r["claim"]
    enqueue = ", ".join(
        f"{_num(int(n), 0)} in {_num(s, 1)} s"
        for n, s in sorted(r["enqueue_s"].items(), key=lambda x: int(x[0]))
    )
    lines = [
        f"The agent's delivery defaults here: concurrency {d.get('concurrency', 1)}, rate_limit "
        f"{d.get('rate_limit', 0)}/s, rate_burst {d.get('rate_burst', 1)}, batch_size {d.get('batch_size')}.",
        "",
        f"- One Queue.claim() of {_num(claim['claimed'], 0)} messages with "
        f"{_num(claim['pending'], 0)} pending: {_num(claim['seconds'] * 1000, 0)} ms.",
        f"- Writing the backlog through StateStore.commit_scan() (one transaction): {enqueue}.",
        "",
        *_table(
            [
                "receiver",
                "backlog",
                "concurrency",
                "agent drain (msg/s)",
                "floor",
                "floor (msg/s)",
                "agent / floor",
                "agent CPU ms/msg",
                "floor CPU ms/msg",
                "receiver CPU busy (agent / floor)",
                "runs",
            ],
            rows,
        ),
        "",
        *_table(
            [
                "receiver",
                f"httpx.AsyncClient, {r['async_concurrency']} in flight (msg/s)",
                "receiver CPU busy",
            ],
            async_rows,
        ),
    ]
    limited = r.get("rate_limited")
    if limited:
        burst = int(limited.get("rate_burst", 1))
        designed = max(0, limited["sent"] - burst) / limited["rate_limit"]
        lines += [
            "",
            f"With the default delivery settings (rate_limit {limited['rate_limit']:g}/s, "
            f"rate_burst {burst}, concurrency {d.get('concurrency')}) the agent drained "
            f"{_num(limited['sent'], 0)} notifies in {_num(limited['seconds'], 1)} s "
            f"({_num(limited['per_s'], 1)} msg/s): the first {burst} at once, the rest at the "
            f"limit, {_num(designed, 1)} s as designed.",
        ]
    fast = r["receivers"][0]["rows"]
    goals: list[tuple[str, str, bool | None]] = [
        (
            f"delivery at least {THROUGHPUT_GOAL:.0%} of the httpx floor, concurrency "
            f"{p['concurrency']}",
            f"{_num(p['agent_vs_floor'] * 100, 0)}% ({_num(p['agent_per_s'], 0)} vs "
            f"{_num(p['floor_per_s'], 0)} msg/s)",
            p["agent_vs_floor"] >= THROUGHPUT_GOAL,
        )
        for p in fast
    ]
    return lines, goals


def dlt_section(r: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    if "error" in r:
        return [f"dlt could not be run here: `{r['error']}`"], []
    a, d = r["agent"], r["dlt_stream"]
    rows = [
        [
            "seyaha-agent daemon, wake-ups",
            _num(a["p50_ms"], 0),
            _num(a["p95_ms"], 0),
            _num(a["p99_ms"], 0),
            _num(a["missing"], 0),
            _num(a["cpu_s_per_1000"], 2),
            f"{a['deletes_after_poll']}/{r['deleted']} after a poll; "
            f"{a['deletes_after_scan']}/{r['deleted']} CLOSED after a full reconciliation "
            f"({_num(a['scan_s'], 1)} s)",
        ],
        [
            f"dlt {r['dlt']} loop of pipeline runs",
            _num(d["p50_ms"], 0),
            _num(d["p95_ms"], 0),
            _num(d["p99_ms"], 0),
            _num(d["missing"], 0),
            _num(d["cpu_s_per_1000"], 2),
            f"{d['deletes']}/{r['deleted']} after {r['delete_wait_s']:g} s of pipeline runs",
        ],
    ]
    lines = [
        f"{_num(r['slots'], 0)} slots; {_num(r['commits'], 0)} single-slot commits, one every "
        f"{r['spacing_ms']:g} ms, for each tool; then {r['deleted']} slots deleted.",
        "",
        *_table(
            [
                "tool",
                "p50 (ms)",
                "p95 (ms)",
                "p99 (ms)",
                "not delivered",
                "CPU s per 1,000 changes",
                "deletes told to the receiver",
            ],
            rows,
        ),
        "",
        f"dlt ran {_num(d['pipeline_runs'], 0)} pipeline runs back to back, "
        f"{_num(d['run_median_s'], 2)} s each (median); CPU of child processes: "
        f"{_num(d['children_cpu_s'], 2)} s.",
    ]
    return lines, []


def takeover_section(r: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    lease, poll = r["scanner_lease_s"], r["poll_interval_s"]
    promises = {
        "SIGKILL": f"scanner_lease + poll_interval = {lease + poll:g} s",
        "SIGTERM": f"poll_interval = {poll:g} s after the holder exits",
    }
    rows = [
        [
            s["signal"],
            promises[s["signal"]],
            f"{_num(s['leader_median_s'], 2)} / {_num(s['leader_max_s'], 2)}",
            f"{_num(s['first_change_median_s'], 2)} / {_num(s['first_change_max_s'], 2)}",
            _num(s["holder_exit_median_s"], 2),
            _num(s["missed"], 0),
            f"{_num(s['missing'], 0)} of {_num(s['committed'], 0)}",
            _num(len(s["runs"]), 0),
        ]
        for s in r["signals"]
    ]
    lines = [
        f"Two daemons on one PostgreSQL state store, {_num(r['slots'], 0)} slots, polling only; "
        f"the agent's defaults: scanner_lease {lease:g} s, poll_interval {poll:g} s. One "
        f"booking committed every {r['commit_spacing_s']:g} s from the signal on. Times in "
        "seconds from the signal; median / max over runs.",
        "",
        "The first change after the signal arrives behind the other bookings that waited for "
        "the takeover: its poll queues them all at once, and they are sent at once up to the "
        f"default rate_burst, the rest at rate_limit ({r['rate_limit_per_s']:g}/s).",
        "",
        *_table(
            [
                "signal to the scanner",
                "promise",
                "survivor logs scan.leader (s)",
                "first change after the signal arrives (s)",
                "holder exited after (s, median)",
                "takeovers missed",
                "bookings never delivered",
                "runs",
            ],
            rows,
        ),
    ]
    goals: list[tuple[str, str, bool | None]] = []
    for s in r["signals"]:
        done = [t for t in s["runs"] if t["leader_s"] is not None]
        if s["signal"] == "SIGKILL":
            waited = [t["leader_s"] for t in done]
            what = f"after SIGKILL of the scanner, another agent scans within {lease + poll:g} s"
        else:
            waited = [t["leader_s"] - t["holder_exit_s"] for t in done]
            what = f"after SIGTERM, another agent scans within {poll:g} s of the holder's exit"
        worst = max(waited) if waited else None
        goals.append(
            (
                what,
                f"max {_num(worst, 2)} s over {len(s['runs'])} run(s)"
                + (f", {s['missed']} missed" if s["missed"] else ""),
                worst is not None and not s["missed"] and worst <= s["promise_s"],
            )
        )
    return lines, goals


def profile_section(r: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    if "error" in r:
        return [f"No profile: `{r['error']}`"], []
    lines: list[str] = []
    for p in r.values():
        lines += [
            f"**{p['what']}** ({_num(p['samples'], 0)} samples):",
            "",
            "```text",
            "own time (top of the stack):",
            *p["own"],
            "",
            "inclusive time of the agent's functions:",
            *p["agent"],
            "```",
            "",
        ]
    return lines, []


def _size(count: Any) -> str:
    if not count:
        return "–"
    for unit, scale in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count} bytes"


def answers_section(r: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    d, b = r["defaults"], r["breaker"]
    slow, hostile = r["slow"], r["hostile"]
    runs = [*slow, *hostile]

    def arrived(x: dict[str, Any]) -> str:
        return "yes" if x["all_arrived"] else f"**no: {len(x['missing'])} slots wrong**"

    slow_rows = [
        [
            f"{s['delay_s']:g}",
            f"{_num(s['bookings'], 0)} on {_num(s['slots'], 0)} slots",
            _num(s["calls"], 0),
            _num(s["calls_per_change"], 3),
            _num(s["repeats"], 0),
            _num(s["max_in_flight"], 0),
            f"{_num(s['booked_again_in_flight'], 0)} of {_num(s['booked_again'], 0)}",
            arrived(s),
            _num(s["drain_s"], 1),
            f"{_num(s['span_s'], 1)} / {_num(s['floor_s'], 1)}",
            _num(s["peak_rss_mb"], 0),
        ]
        for s in slow
    ]
    hostile_rows = [
        [
            h["what"],
            f"{_size(h['body_bytes'])} / {_size(h['unpacked_bytes'])}",
            f"{_num(h['hostile_answers'], 0)} ({_num(h['hostile_hung_up'], 0)} hung up)",
            f"{_num(h['calls_per_change'], 2)} / {_num(h['delivered_per_change'], 2)}",
            _num(h["repeats"], 0),
            _num(h["max_in_flight"], 0),
            arrived(h),
            _num(h["recovery_s"], 1),
            f"{_num(h['rss_before_mb'], 0)} → {_num(h['peak_rss_mb'], 0)} "
            f"(+{_num(h['growth_mb'], 1)})",
        ]
        for h in hostile
    ]
    lines = [
        f"The daemon with the default [delivery] settings (concurrency {d['concurrency']}, "
        f"timeout {d['timeout']:g} s, lease {d['lease']:g} s, batch_size {d['batch_size']}, "
        f"rate_limit {d['rate_limit']:g}/s, circuit breaker after {b['breaker_failures']} "
        f"failures for {b['breaker_cooldown']:g} s), polling every {r['poll_interval_s']:g} s "
        f"on {_num(r['slots'], 0)} slots. One run per case.",
        "",
        f"Slow answers: {_num(r['changes'], 0)} bookings of distinct slots, the first fifth "
        "booked again as soon as its first call arrived.",
        "",
        *_table(
            [
                "answer after (s)",
                "bookings",
                "calls",
                "calls per change",
                "repeats",
                "most calls in flight for one slot",
                "booked again while its call was in flight",
                "every change arrived",
                "drain after the last commit (s)",
                "first commit to last answer / floor (s)",
                "peak RSS (MB)",
            ],
            slow_rows,
        ),
        "",
        f"Hostile answers: {_num(r['hostile_changes'], 0)} bookings; every answer hostile for "
        f"{r['hostile_s']:g} s from the first call, then correct.",
        "",
        *_table(
            [
                "answer",
                "body on the wire / unpacked",
                "hostile answers served",
                "calls per change (all / answered 200)",
                "repeats",
                "most calls in flight for one slot",
                "every change arrived",
                "last answer after the switch (s)",
                "peak RSS before → after (MB)",
            ],
            hostile_rows,
        ),
    ]
    for x in runs:
        case = x.get("what") or f"answers after {x['delay_s']:g} s"
        if x.get("exit_code"):
            lines += ["", f"**{case}**: the daemon exited with {x['exit_code']}."]
        if x.get("timed_out"):
            lines += ["", f"**{case}**: not everything arrived before the run gave up waiting."]
        for slot, calls in x["overlaps"].items():
            lines += [
                "",
                f"**{case}**: calls for slot {slot} overlapped (seconds from the first commit):",
                "",
                *_table(
                    ["call", "vacancies", "answer", "arrived", "ended", "status", "hung up"],
                    [
                        [
                            str(c["call"]),
                            str(c["vacancies"]),
                            c["answer"],
                            _num(c["arrived_s"], 2),
                            _num(c["ended_s"], 2),
                            str(c["status"]),
                            "yes" if c["hung_up"] else "",
                        ]
                        for c in calls
                    ],
                ),
                "",
                "```text",
                *x["log"]["lines"].get(slot, []),
                "```",
            ]
    worst = max(slow, key=lambda s: s["calls_per_change"])
    growth = max(hostile, key=lambda h: h["growth_mb"])
    in_flight = max(x["max_in_flight"] for x in runs)
    missing = [x.get("what") or f"{x['delay_s']:g} s" for x in runs if not x["all_arrived"]]
    goals: list[tuple[str, str, bool | None]] = [
        (
            f"calls per change with answers taking 0-5 s ≤ {r['calls_per_change_goal']:g}",
            f"max {worst['calls_per_change']:.3f} (answers after {worst['delay_s']:g} s)",
            worst["calls_per_change"] <= r["calls_per_change_goal"],
        ),
        (
            "never two calls for one slot in flight at once (slow and hostile answers)",
            f"at most {in_flight}",
            in_flight <= 1,
        ),
        (
            "every change arrived (slow and hostile answers)",
            "all" if not missing else "not with: " + ", ".join(missing),
            not missing,
        ),
        (
            f"hostile answers add ≤ {r['rss_growth_goal_mb']:g} MB to peak memory",
            f"at most +{growth['growth_mb']:.1f} MB ({growth['what']})",
            growth["growth_mb"] <= r["rss_growth_goal_mb"],
        ),
    ]
    return lines, goals


def platform_section(r: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    b, rec, q, k = r["baseline"], r["reconciliation"], r["quiet"], r["backlog"]
    d, s = r["daemon"], r["sanity"]
    ranges = [
        f"{x['reconciliation']['ranges_read']} of {x['reconciliation']['ranges_total']}"
        for x in r["runs"]
    ]

    def ms(x: dict[str, Any]) -> str:
        return f"{_num(x['p50_ms'], 0)} / {_num(x['p99_ms'], 0)} / {_num(x['max_ms'], 0)}"

    rows = [
        ["baseline scan: every row read and routed (s)", _num(b["scan_s"], 1)],
        [
            "baseline: start until every integration's trigger arrived (s)",
            _num(b["delivered_s"], 1),
        ],
        [
            "reconciliation after a restart, range digests (s)",
            f"{_num(rec['reconciliation_s'], 2)} (ranges read: {', '.join(ranges)})",
        ],
        [
            f"{_num(q['bookings'], 0)} bookings, p50 / p99 / max (ms)",
            f"{ms(q)}; {_num(q['missing'], 0)} missing",
        ],
        [
            f"{_num(k['bookings'], 0)} bookings behind the large integration's backlog, "
            "p50 / p99 / max (ms)",
            f"{ms(k)}; {_num(k['missing'], 0)} missing",
        ],
        [
            "backlog waiting at the window's start / end",
            f"{_num(k['waiting_at_start'], 0)} / {_num(k['waiting_at_end'], 0)} "
            f"({_num(k['committed_behind_backlog'], 0)} bookings committed while it waited)",
        ],
        ["the large integration's calls per second meanwhile", _num(k["large_sent_per_s"], 0)],
        [
            "peak RSS: baseline daemon / daemon (MB)",
            f"{_num(b['peak_rss_mb'], 0)} / {_num(d['peak_rss_mb'], 0)}",
        ],
        [
            "CPU: baseline daemon / daemon, whole life (s)",
            f"{_num(b['cpu_s'], 1)} / {_num(d['cpu_s'], 1)}",
        ],
    ]
    lines = [
        f"One agent, {_num(r['integrations'], 0)} integrations: "
        f"{_num(r['integrations'] - 1, 0)} of {_num(r['slots_per_integration'], 0)} slots and "
        f"a large one of {_num(r['large_integration_slots'], 0)} ({_num(r['slots'], 0)} slots); "
        "PostgreSQL inventory and state store, wake-ups, the agent's [delivery] defaults. "
        "Medians over runs; counts are sums.",
        "",
        *_table(["", ""], rows),
        "",
        f"Sanity over {_num(s['notifies'], 0)} notifies and {_num(s['triggers'], 0)} triggers: "
        f"{_num(s['duplicates'], 0)} duplicates, {_num(s['lost_bookings'], 0)} bookings and "
        f"{_num(s['lost_backlog'], 0)} backlog changes lost, {_num(s['wrong_integration'], 0)} "
        f"at another integration's path, {_num(s['refused'], 0)} refused, "
        f"{_num(s['extra_triggers'], 0)} triggers beyond one per integration.",
    ]
    bad = sum(
        s[key]
        for key in ("duplicates", "lost_bookings", "lost_backlog", "wrong_integration", "refused")
    )
    goals: list[tuple[str, str, bool | None]] = [
        (
            "a platform: every change once, at its own integration with its secret",
            f"{_num(bad, 0)} duplicate, lost, misrouted or refused over {_num(s['notifies'], 0)}",
            bad == 0,
        )
    ]
    return lines, goals


def _log_line(line: str) -> str:
    """A daemon's JSON log line on one line: time, level, event, message, and the last line
    of its traceback (the raw line is in the JSON results)."""
    try:
        record = json.loads(line)
    except ValueError:
        return line
    if not isinstance(record, dict):
        return line
    text = f"{record.get('ts')} {record.get('level')} {record.get('event')}: {record.get('msg')}"
    lines = str(record.get("exception") or "").splitlines()
    raised = [k for k, x in enumerate(lines) if re.match(r"[\w.]+(Error|Exception)\b.*: ", x)]
    if not raised:
        return text
    said = lines[raised[-1]]
    detail = [x.strip() for x in lines[raised[-1] + 1 :] if x.startswith("DETAIL:")]
    return f"{text} ({' '.join([said, *detail[:1]])})"


def sharing_section(r: dict[str, Any]) -> tuple[list[str], list[tuple[str, str, bool | None]]]:
    counts = r["counts"]

    def ms(x: dict[str, Any], prefix: str = "") -> str:
        return (
            " / ".join(_num(x[f"{prefix}{k}_ms"], 0) for k in ("p50", "p95", "p99", "max"))
            + f"; {_num(x[f'{prefix}missing'], 0)} missing"
        )

    def per_agent(c: dict[str, Any], key: str, digits: int) -> str:
        return " / ".join(_num(a.get(key), digits) for a in c["per_agent"])

    def cycle_agents(c: dict[str, Any]) -> str:
        return " / ".join(
            f"{_num(a['duration_s'], 2)} ({_num(a['shards'], 0)})"
            for a in c["cycle"]["agents"].values()
        )

    def takeover(c: dict[str, Any], text: Callable[[dict[str, Any]], str]) -> str:
        return text(c["takeover"]) if "takeover" in c else "–"

    def sanity(c: dict[str, Any]) -> str:
        s = c["sanity"]
        return (
            f"{_num(s['duplicates'], 0)} duplicates, {_num(s['lost_bookings'], 0)} lost, "
            f"{_num(s['wrong_integration'], 0)} misrouted, {_num(s['refused'], 0)} refused, "
            f"{_num(s['extra_triggers'], 0)} extra triggers ({_num(s['notifies'], 0)} notifies, "
            f"{_num(s['integrations_triggered'], 0)} integrations triggered)"
        )

    rows: list[tuple[str, Callable[[dict[str, Any]], str]]] = [
        ("baseline scan, first agent (s)", lambda c: _num(c["baseline"]["scan_s"], 1)),
        (
            "baseline: start until every integration's trigger arrived (s)",
            lambda c: _num(c["baseline"]["delivered_s"], 1),
        ),
        (
            "division: others started until shards divided (s)",
            lambda c: _num(c["division"]["division_s"], 1),
        ),
        (
            "shards per agent",
            lambda c: " / ".join(_num(v, 0) for v in c["division"]["shards"].values()),
        ),
        ("shard changes after the division", lambda c: _num(c["division"]["reshuffles"], 0)),
        ("reconciliation per agent, s (shards)", cycle_agents),
        (
            "cycle: division until every shard reconciled by its holder (s)",
            lambda c: _num(c["cycle"]["cycle_s"], 1),
        ),
        (
            f"{_num(r['bookings'], 0)} bookings, p50 / p95 / p99 / max (ms)",
            lambda c: ms(c["bookings"]),
        ),
        (
            "… of them committed while a reconciliation ran: count, p99 (ms)",
            lambda c: (
                f"{_num(c['bookings']['during_reconciliation'], 0)}, "
                f"{_num(c['bookings']['p99_during_ms'], 0)}"
            ),
        ),
        (
            "takeover: SIGKILL until the survivors hold all 64 (s; promise)",
            lambda c: takeover(
                c, lambda t: f"{_num(t['takeover_s'], 1)} ({_num(t['promise_s'], 1)})"
            ),
        ),
        (
            "victim's shards / integrations",
            lambda c: takeover(
                c,
                lambda t: f"{_num(t['victim_shards'], 0)} / {_num(t['victim_integrations'], 0)}",
            ),
        ),
        (
            f"{_num(r['takeover_bookings'], 0)} bookings on its integrations after the kill, "
            "p50 / p95 / p99 / max (ms)",
            lambda c: takeover(c, lambda t: ms(t, "bookings_")),
        ),
        (
            "… of them committed before the takeover",
            lambda c: takeover(c, lambda t: _num(t.get("committed_before_takeover"), 0)),
        ),
        ("peak RSS per agent (MB)", lambda c: per_agent(c, "peak_rss_mb", 0)),
        ("CPU per agent, whole life (s)", lambda c: per_agent(c, "cpu_s", 1)),
        ("sanity", sanity),
        (
            "error lines in the agents' logs",
            lambda c: _num(sum(len(v) for v in c["log_problems"].values()), 0),
        ),
    ]
    header = ["", *(f"{_num(c['agents'], 0)} agent(s)" for c in counts)]
    table = [[label, *(text(c) for c in counts)] for label, text in rows]
    lines = [
        f"{_num(r['integrations'], 0)} integrations of {_num(r['slots_per_integration'], 0)} "
        f"slots ({_num(r['slots'], 0)} slots), PostgreSQL inventory and state store, wake-ups, "
        f"[state] scanner_lease {_num(r['scanner_lease_s'], 0)} s, [source] full_scan_interval "
        f"{_num(r['full_scan_interval_s'], 0)} s, the agent's other defaults. Per-agent figures "
        "in the order the agents started (the first took the baseline, and is the one killed).",
        "",
        *_table(header, table),
    ]
    for c in counts:
        duplicates = c["sanity"].get("duplicate_calls") or []
        if duplicates:
            lines += [
                "",
                f"Duplicate calls with {_num(c['agents'], 0)} agent(s) (seconds after the kill):",
                "",
                *(
                    f"- integration {d['integration']}, slot {d['slot']}, vacancies "
                    f"{d['vacancies']}: {d['calls']} calls at {d['after_kill_s']}"
                    for d in duplicates
                ),
            ]
        for agent, problems in c["log_problems"].items():
            if problems:
                lines += [
                    "",
                    f"Error lines in the log of agent {agent} of {_num(c['agents'], 0)}:",
                    "",
                    "```text",
                    *(_log_line(line) for line in problems),
                    "```",
                ]
    bad = sum(
        c["sanity"][key]
        for c in counts
        for key in ("duplicates", "lost_bookings", "wrong_integration", "refused", "extra_triggers")
    )
    notifies = sum(c["sanity"]["notifies"] for c in counts)
    goals: list[tuple[str, str, bool | None]] = [
        (
            "agents sharing a platform: every change once, at its own integration",
            f"{_num(bad, 0)} duplicate, lost, misrouted, refused or extra over "
            f"{_num(notifies, 0)} notifies",
            bad == 0,
        )
    ]
    for c in counts:
        t = c.get("takeover")
        if t is None:
            continue
        ok = t["takeover_s"] is not None and t["takeover_s"] <= t["promise_s"]
        goals.append(
            (
                f"{_num(c['agents'], 0)} agents: a killed agent's shards taken within "
                "scanner_lease + scanner_lease / 3",
                f"{_num(t['takeover_s'], 1)} s (promise {_num(t['promise_s'], 1)} s)",
                ok,
            )
        )
    return lines, goals


TITLES = {
    "scan": "1. Full reconciliation vs a plain SELECT",
    "changes": "1b. Full reconciliation by the share of slots changed",
    "mariadb": "1c. A MariaDB inventory",
    "poll": "2. Incremental polls",
    "latency": "3. Commit-to-delivery latency",
    "throughput": "4. Delivery throughput",
    "dlt": "5. Against dlt",
    "takeover": "6. Scanner takeover",
    "profile": "Where the time goes (profiles)",
    "answers": "7. Delivery under slow and hostile answers",
    "platform": "8. A platform: many integrations, one agent",
    "sharing": "9. Agents sharing a platform",
}
RENDER: dict[
    str, Callable[[dict[str, Any]], tuple[list[str], list[tuple[str, str, bool | None]]]]
] = {
    "scan": scan_section,
    "changes": changes_section,
    "mariadb": mariadb_section,
    "poll": poll_section,
    "latency": latency_section,
    "throughput": throughput_section,
    "dlt": dlt_section,
    "takeover": takeover_section,
    "profile": profile_section,
    "answers": answers_section,
    "platform": platform_section,
    "sharing": sharing_section,
}


def render(results: dict[str, Any], meta: dict[str, Any]) -> str:
    """The whole document for `results` ({name: result or {"failed": text}})."""
    sections: list[str] = []
    goals: list[tuple[str, str, bool | None]] = []
    for name, result in results.items():
        sections += ["", f"## {TITLES[name]}", ""]
        if "failed" in result:
            sections.append(f"This measurement failed: `{result['failed']}`")
            continue
        body, found = RENDER[name](result)
        goals += found
        sections += body
        sections += ["", "How it is measured:", "", *_docstring(SECTIONS[name])]
    setup = [
        ("date", meta["date"]),
        ("command", f"`{meta['command']}`"),
        ("duration of the run", f"{meta['duration_s'] / 60:.1f} min"),
        (
            "machine",
            f"{meta['machine']['cores']} cores, {meta['machine']['memory']} memory, "
            f"{meta['machine']['cpu']} (Linux {meta['machine']['kernel']})",
        ),
        *((k, v) for k, v in meta["versions"].items()),
        (
            "runs per measurement",
            "each case once"
            if set(results) in ({"answers"}, {"sharing"})
            else f"{meta['runs']} (the tables show medians)"
            if meta["runs"] > 1
            else "1",
        ),
    ]
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m bench all` (bench/report.py) from the results of one run."
        " Do not edit by hand: run it again. -->",
        "",
        "Generated by `python -m bench all`. The figures come from a **shared 2-core machine**: "
        "other test runs may load its CPU at times, and every process of a measurement "
        "(PostgreSQL, the agent, the receiver, the benchmark itself) shares the two cores. "
        "Compare ratios measured in the same run rather than absolute numbers across runs.",
        "",
        *_table(["", ""], [[k, v] for k, v in setup]),
        "",
        "## Goals",
        "",
        *_table(["goal", "measured", "verdict"], [[g, m, _verdict(ok)] for g, m, ok in goals]),
        *sections,
        "",
    ]
    return "\n".join(lines)


def meta_for(
    command: str, duration_s: float, runs: int, extra_versions: dict[str, str]
) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "duration_s": duration_s,
        "machine": machine(),
        "versions": versions(extra_versions),
        "runs": runs,
    }
