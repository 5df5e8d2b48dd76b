"""5. The agent against dlt on the same inventory and the same stream of changes.

dlt (`sql_database` source, incremental cursor on updated_at, a custom destination posting
each changed row; see dlt_loop.py) runs as a loop of pipeline runs in its own process. The
agent runs as the daemon with wake-ups, as in the latency measurement. Each gets the same
stream: single-slot bookings, one every commit_spacing_s, open-loop; then:
- latency, commit to arrival at the receiver (p50/p95/p99);
- CPU seconds per 1,000 changes: the tool's own process (/proc, all threads) from the first
  measured commit to the last delivery; dlt's loop also reports the CPU of child processes;
- deletes: slots deleted in the source; does the receiver hear about them? For dlt, after
  several pipeline runs; for the agent, after an incremental poll and after a full
  reconciliation (which the daemon runs every full_scan_interval), each followed by a drain.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from bench import inventory, latency
from bench.context import Context
from bench.receiver import Receiver
from bench.stats import median, process_cpu_s

DLT_READY_TIMEOUT_S = 600.0
DLT_DELIVERY_WAIT_S = 120.0
DELETE_WAIT_S = 20.0
"""How long dlt's loop keeps running after the deletions (several pipeline runs)."""
DLT_STOP_TIMEOUT_S = 120.0
AGENT_DRAIN_TIMEOUT_S = 120.0


def dlt_version() -> str | None:
    try:
        return importlib.metadata.version("dlt")
    except importlib.metadata.PackageNotFoundError:
        return None


class DltLoop:
    def __init__(self, ctx: Context, receiver: Receiver, since: str) -> None:
        self._log = open(ctx.log("dlt-loop"), "ab")  # noqa: SIM115 - closed in stop()
        folder = ctx.path("dlt")
        env = {
            **os.environ,
            "RUNTIME__DLTHUB_TELEMETRY": "false",
            "DLT_DATA_DIR": str(folder / "data"),
        }
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "bench.dlt_loop",
                "--url",
                ctx.source_url,
                "--schema",
                ctx.inventory(ctx.plan.big).schema,
                "--receiver",
                receiver.url,
                "--dir",
                str(folder / "pipelines"),
                "--since",
                since,
            ],
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
        )
        self.lines: list[str] = []
        self._ready = threading.Event()
        self._reader = threading.Thread(target=self._read, name="dlt-loop", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.strip())
            if line.strip() == "READY":
                self._ready.set()
        self._ready.set()

    def wait_ready(self) -> None:
        self._ready.wait(DLT_READY_TIMEOUT_S)
        if self.process.poll() is not None or "READY" not in self.lines:
            raise RuntimeError("dlt's first pipeline run did not complete; see the dlt-loop log")

    def cpu_s(self) -> float:
        return process_cpu_s(self.process.pid)

    def stop(self) -> dict[str, Any]:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(DLT_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(10)
        self._log.close()
        for line in reversed(self.lines):
            if line.startswith("{"):
                return dict(json.loads(line))
        return {}


def _agent_deletes(
    ctx: Context, receiver: Receiver, deleted_ids: list[int], state: Any
) -> dict[str, Any]:
    """Poll then drain, full scan then drain: which deleted slots the receiver heard of."""
    from agent.app import Agent
    from agent.config import load_config

    slots = [str(i) for i in deleted_ids]
    config = ctx.config("dlt-agent-deletes", ctx.setup(ctx.plan.big, state, base_url=receiver.url))
    agent = Agent(load_config(config))
    agent.open()
    try:
        mark = time.monotonic()
        agent.poll()
        agent.drain(AGENT_DRAIN_TIMEOUT_S)
        after_poll = receiver.slots_seen(slots, since=mark)
        mark = time.monotonic()
        started = time.perf_counter()
        agent.scan()
        scan_s = time.perf_counter() - started
        agent.drain(AGENT_DRAIN_TIMEOUT_S)
        time.sleep(0.5)  # the receiver's last lines
        after_scan = receiver.slots_seen(slots, since=mark)
    finally:
        agent.close()
    return {
        "after_poll": len(after_poll),
        "after_scan": sum(1 for s in after_scan.values() if "CLOSED" in s),
        "scan_s": scan_s,
    }


def measure(ctx: Context) -> dict[str, Any]:
    version = dlt_version()
    if version is None:
        return {"error": "dlt is not installed (pip install -e '.[bench]')"}
    commits = ctx.plan.dlt_commits
    inv = ctx.inventory(ctx.plan.big)
    ctx.reference_state(ctx.plan.big)

    # The agent, as in the latency measurement (wake-ups), on the same kind of stream.
    latency.set_triggers(ctx, inv, installed=True)
    try:
        agent = latency.agent_stream(ctx, latency.WAKEUPS, 0, commits).summary()
    finally:
        latency.set_triggers(ctx, inv, installed=False)
    print(
        f"  vs dlt: agent p50 {agent['p50_ms']:.0f} ms, {agent['cpu_s_per_1000']:.2f} CPU s/1000",
        flush=True,
    )

    # dlt starts from now (its incremental has no overlap window): no wait needed.
    since = str(ctx.conn.execute("SELECT now()").fetchone()[0].isoformat())
    with Receiver(arrivals=True, log=ctx.log("dlt-receiver")) as receiver:
        loop = DltLoop(ctx, receiver, since)
        try:
            loop.wait_ready()
            dlt_stream = latency.stream(
                ctx,
                inv,
                receiver,
                loop.cpu_s,
                commits=commits,
                spacing_s=ctx.plan.commit_spacing_s,
                wait_s=DLT_DELIVERY_WAIT_S,
            ).summary()
            print(
                f"  vs dlt: dlt p50 {dlt_stream['p50_ms']:.0f} ms, "
                f"{dlt_stream['cpu_s_per_1000']:.2f} CPU s/1000",
                flush=True,
            )
            # Deletes: the agent's state is caught up first, so it still knows these slots.
            agent_state = ctx.caught_up_state(ctx.plan.big, "dlt-agent-deletes")
            deleted = inv.ids.take_for_delete(ctx.plan.dlt_deletes)
            mark = time.monotonic()
            inventory.delete(ctx.conn, inv, deleted)
            time.sleep(DELETE_WAIT_S)
            dlt_deletes = len(receiver.slots_seen([str(i) for i in deleted], since=mark))
        finally:
            loop_result = loop.stop()
        agent_deletes = _agent_deletes(ctx, receiver, deleted, agent_state)
    durations = loop_result.get("durations_s", [])
    return {
        "dlt": version,
        "slots": ctx.plan.big,
        "commits": commits,
        "spacing_ms": ctx.plan.commit_spacing_s * 1000,
        "deleted": len(deleted),
        "delete_wait_s": DELETE_WAIT_S,
        "agent": {
            **agent,
            "deletes_after_poll": agent_deletes["after_poll"],
            "deletes_after_scan": agent_deletes["after_scan"],
            "scan_s": agent_deletes["scan_s"],
        },
        "dlt_stream": {
            **dlt_stream,
            "deletes": dlt_deletes,
            "pipeline_runs": loop_result.get("runs"),
            "run_median_s": median(durations) if durations else None,
            "children_cpu_s": loop_result.get("children_cpu_s"),
        },
    }
