"""Small numeric helpers: medians, percentiles, CPU time and memory of a process.

Times of other processes are read from /proc (Linux), so a process's CPU can be measured
over a window of its life (after start-up) without its cooperation.
"""

from __future__ import annotations

import math
import os
import resource
import statistics
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")
BYTES_PER_MB = 1024 * 1024


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else math.nan


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (0..1) with linear interpolation between ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = (len(ordered) - 1) * fraction
    low = math.floor(position)
    high = math.ceil(position)
    if low == high:
        return float(ordered[low])
    return float(ordered[low] + (ordered[high] - ordered[low]) * (position - low))


def process_cpu_s(pid: int, *, reaped_children: bool = False) -> float:
    """User + system CPU seconds of every thread of `pid` so far; with `reaped_children`,
    plus those of its children that have exited and been waited for."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime field 14, stime field 15, cutime
    # field 16, cstime field 17 (1-based).
    ticks = int(fields[11]) + int(fields[12])
    if reaped_children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLOCK_TICKS_PER_S


def peak_rss_mb() -> float:
    """This process's peak resident set size so far: VmHWM of /proc/self/status (MB).

    Not ru_maxrss: Linux carries it across fork and exec, so a worker started by a bench
    process of 400 MB reported 400 MB whatever it used itself."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    return resident_pages * PAGE_BYTES / BYTES_PER_MB


def own_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def ratio(value: float, reference: float) -> float:
    if reference == 0 or math.isnan(reference) or math.isnan(value):
        return math.nan
    return value / reference


def bytes_received_from(port: int, pid: int | None = None) -> int | None:
    """Bytes the TCP connections of process `pid` (this one by default) to 127.0.0.1:`port`
    have received so far, as the kernel counts them (`ss -ti`); None without `ss`."""
    pid = os.getpid() if pid is None else pid
    try:
        out = subprocess.run(
            ["ss", "-tinpH", "dst", f"127.0.0.1:{port}"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    total, ours = 0, False
    for line in out.splitlines():
        if not line.startswith((" ", "\t")):
            ours = f"pid={pid}," in line
            continue
        if ours:
            for field in line.split():
                if field.startswith("bytes_received:"):
                    total += int(field.split(":", 1)[1])
    return total


def postgres_cpu_s() -> float:
    """User + system CPU seconds so far of every process of this machine named postgres
    (the server's backends and its background workers), and of those that have exited:
    the parallel workers of a query live only as long as it, and the postmaster counts
    their CPU among its reaped children's once they exit. Without these, a digest query
    run by two workers showed a third of its cost."""
    return _named_cpu_s({"postgres"})


def mariadb_cpu_s() -> float:
    """User + system CPU seconds so far of the MariaDB (or MySQL) server of this machine
    (one process, a thread per connection)."""
    return _named_cpu_s({"mariadbd", "mysqld"})


def _named_cpu_s(names: set[str]) -> float:
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if (proc / "comm").read_text().strip() not in names:
                continue
            total += process_cpu_s(int(proc.name), reaped_children=True)
        except (OSError, ValueError):
            continue  # gone meanwhile
    return total


def against_floor(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of runs of {"agent": a scan worker's result, "floor": a floor worker's}."""
    agents = [r["agent"] for r in runs]
    floors = [r["floor"] for r in runs]
    agent_s = median([a["seconds"] for a in agents])
    floor_s = median([f["seconds"] for f in floors])
    return {
        "changed": median([a["changed"] + a["removed"] for a in agents]),
        "agent_s": agent_s,
        "agent_cpu_s": median([a["cpu_s"] for a in agents]),
        "floor_s": floor_s,
        "ratio": ratio(agent_s, floor_s),
        "ranges_read": median([a.get("ranges_read") or 0 for a in agents]),
        "ranges_total": agents[-1].get("ranges_total"),
        "agent_source_kb": median([(a.get("source_bytes") or 0) / 1024 for a in agents]),
        "floor_source_kb": median([(f.get("source_bytes") or 0) / 1024 for f in floors]),
        "slots_digest_matched": agents[-1].get("slots_digest_matched"),
        "peak_rss_mb": median([a["peak_rss_mb"] for a in agents]),
    }
