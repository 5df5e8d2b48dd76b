"""Where the agent's time goes: py-spy samples of a full reconciliation, a poll and a drain.

Not a timing: py-spy (a sampling profiler, in the bench extra) samples every thread of the
worker process 200 times a second while it runs, and only the samples inside the measured
call are kept (Agent.scan, Agent.poll, or the delivery workers). Threads blocked inside a
Python-level wait (Condition.wait, a socket read) still show up as samples. Two views:
- own time: the function at the top of the stack (where the CPU is spent);
- inclusive time of the agent's own functions (which of its steps the time is spent under).
Profiled: Agent.scan() at the smaller scan size with ~0.1% changed rows; Agent.poll() with
1,000 changed rows; Agent.drain() of a backlog with one delivery worker and no rate limit,
as shipped, so that the samples show work, not waiting; and the daemon's threads during a
stream of single-slot bookings with wake-ups (the latency measurement's setting).
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from bench import agentconf, inventory, latency, throughput
from bench.context import DATA_SEED, Context
from bench.receiver import Receiver

SAMPLES_PER_S = 200
TOP_OWN = 12
TOP_AGENT = 12
POLL_CHANGES = 1000
DRAIN_MESSAGES = 2000
DAEMON_COMMITS = 300
_LINE = re.compile(r":\d+\)$")


def py_spy() -> str | None:
    return shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")


def _record(ctx: Context, name: str, task: str, args: dict[str, Any]) -> tuple[Path, Any]:
    """Run worker `task` under py-spy; returns the raw samples file and the task's result."""
    samples = ctx.path(f"profile-{name}.txt")
    command = [
        str(py_spy()), "record", "--nonblocking", "--format", "raw", "--rate", str(SAMPLES_PER_S),
        "-o", str(samples), "--", sys.executable, "-m", "bench.worker", task, json.dumps(args),
    ]  # fmt: skip
    with open(ctx.log("profile"), "ab") as err:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=err, check=True)
    lines = [x for x in done.stdout.decode().splitlines() if x.startswith("{")]
    return samples, json.loads(lines[-1])


def summarize(samples: Path, inside: str | None) -> dict[str, Any]:
    """Own and inclusive shares of the samples whose stack passes through `inside` (or all)."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in samples.read_text(encoding="utf-8").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_LINE.sub(")", f) for f in stack.split(";")]
        if inside is not None and not any(f.startswith(inside + " ") for f in frames):
            continue
        n = int(count)
        total += n
        own[frames[-1]] += n
        for frame in set(frames):
            if "(agent/" in frame:
                inclusive[frame] += n

    def share(counter: Counter[str], top: int) -> list[str]:
        return [f"{100 * n / total:5.1f}%  {f}" for f, n in counter.most_common(top)]

    return {
        "samples": total,
        "seconds": total / SAMPLES_PER_S,
        "own": share(own, TOP_OWN),
        "agent": share(inclusive, TOP_AGENT),
    }


def measure(ctx: Context) -> dict[str, Any]:
    if py_spy() is None:
        return {"error": "py-spy is not installed (pip install -e '.[bench]')"}
    size = min(ctx.plan.scan_sizes)
    inv = ctx.inventory(size)
    state = ctx.state_copy(size, "profile-scan")
    config = ctx.config("profile-scan", ctx.setup(size, state))
    inventory.mixed_changes(ctx.conn, inv, max(1, size // 1000))
    ctx.changed()
    samples, _ = _record(
        ctx, "scan", "scan", {"config": str(config), "log": str(ctx.log("profile"))}
    )
    profiles = {
        "scan": {"what": f"Agent.scan() at {size:,} slots", **summarize(samples, "Agent.scan")}
    }

    big = ctx.plan.big
    state = ctx.state_copy(big, "profile-poll")
    config = ctx.config("profile-poll", ctx.setup(big, state, cursor_overlap_s=1.0))
    args = {
        "config": str(config), "log": str(ctx.log("profile")), "dsn": ctx.dsn,
        "schema": ctx.inventory(big).schema, "slots": big, "seed": DATA_SEED + 11,
        "counts": [POLL_CHANGES], "runs": 1, "overlap_s": 1.0,
    }  # fmt: skip
    samples, _ = _record(ctx, "poll", "polls", args)
    ctx.changed()
    profiles["poll"] = {
        "what": f"Agent.poll() calls around {POLL_CHANGES:,} changed rows",
        **summarize(samples, "Agent.poll"),
    }

    defaults = agentconf.delivery_defaults()
    one_at_a_time = tuple(
        (k, v) for k, v in (("concurrency", 1), ("rate_limit", 0.0)) if k in defaults
    )
    count = min(DRAIN_MESSAGES, ctx.plan.backlog)
    with Receiver("fast", log=ctx.log("profile-receiver")) as receiver:
        state = throughput.Backlogs(ctx).copy(count, "profile-drain")
        setup = ctx.setup(big, state, base_url=receiver.url, delivery=one_at_a_time)
        args = {
            "config": str(ctx.config("profile-drain", setup)), "log": str(ctx.log("profile")),
            "timeout_s": 600,
        }  # fmt: skip
        samples, drained = _record(ctx, "drain", "drain", args)
    inside = "Deliverer.work" if "concurrency" in defaults else "Agent.drain"
    profiles["drain"] = {
        "what": f"Agent.drain() of {drained['sent']:,} notifies, one worker, no rate limit",
        **summarize(samples, inside),
    }
    profiles["daemon"] = _daemon(ctx)
    return profiles


def _daemon(ctx: Context) -> dict[str, Any]:
    """The daemon (wake-ups, default delivery settings) during a stream of single bookings."""
    big = ctx.plan.big
    inv = ctx.inventory(big)
    commits = DAEMON_COMMITS
    duration_s = math.ceil(commits * ctx.plan.commit_spacing_s) + 2
    latency.set_triggers(ctx, inv, installed=True)
    ctx.wait_quiet()
    try:
        state = ctx.caught_up_state(big, "profile-daemon")
        with Receiver(arrivals=True, log=ctx.log("profile-receiver")) as receiver:
            setup = ctx.setup(
                big, state, base_url=receiver.url, poll_interval_s=latency.WAKEUPS.poll_interval_s
            )
            daemon = latency.Daemon(ctx.config("profile-daemon", setup), ctx.log("profile-daemon"))
            try:
                # Wait for the daemon to deliver a booking, then sample it through a stream.
                latency.stream(ctx, inv, receiver, daemon.cpu_s, commits=1, spacing_s=0.0)
                samples = ctx.path("profile-daemon.txt")
                command = [
                    str(py_spy()), "record", "--nonblocking", "--format", "raw", "--rate", str(SAMPLES_PER_S),
                    "--duration", str(duration_s), "-o", str(samples),
                    "--pid", str(daemon.process.pid),
                ]  # fmt: skip
                with open(ctx.log("profile"), "ab") as err:
                    spy = subprocess.Popen(command, stdout=err, stderr=err)
                    result = latency.stream(
                        ctx, inv, receiver, daemon.cpu_s, commits=commits,
                        spacing_s=ctx.plan.commit_spacing_s,
                    ).summary()  # fmt: skip
                    spy.wait(duration_s + 30)
            finally:
                daemon.stop()
    finally:
        latency.set_triggers(ctx, inv, installed=False)
    return {
        "what": f"the daemon (wake-ups) during {commits} single-slot bookings, one every "
        f"{ctx.plan.commit_spacing_s * 1000:g} ms, p50 {result['p50_ms']:.0f} ms under py-spy",
        **summarize(samples, "Thread.run"),
    }
