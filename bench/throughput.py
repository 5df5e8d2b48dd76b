"""4. Delivery throughput: a backlog of notifies drained by Agent.drain(), against bare httpx.

The backlog is real notify payloads of the big inventory, written once through the agent's
own StateStore.commit_scan() into a SQLite state (timed, reported as "enqueue"); every drain
starts from a copy of that state. Agent.drain() then delivers it to the receiver. Each agent
figure has its floor: the same bodies posted to the same receiver by bare httpx with the
same concurrency, i.e. a sequential httpx.Client loop against the agent with [delivery]
concurrency = 1, and N threads sharing one httpx.Client (the agent's own model) against the
agent with its default concurrency N. rate_limit is 0 in these drains: the default limit
(reported separately) caps delivery on purpose and would measure only itself. An
httpx.AsyncClient with 8 requests in flight is reported for context. Every client runs in a
fresh process; the receiver's CPU during each one shows whether it was the bottleneck. One
Queue.claim() of a batch from the full backlog is timed on its own (it was quadratic in
the backlog before commit abec86e). The agent's sandbox (a ThreadingHTTPServer) is measured
the same way, once, with a smaller backlog.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import psycopg

from bench import agentconf, inventory, worker
from bench.context import Context
from bench.receiver import Receiver
from bench.stats import median, ratio

ASYNC_CONCURRENCY = 8
DRAIN_TIMEOUT_S = 1800.0


def payloads(ctx: Context, count: int) -> Path:
    """`count` notify bodies of distinct slots, as the agent computes them, in a JSON file."""
    from agent.source import rows

    path = ctx.path(f"payloads-{count}.json")
    if path.exists():
        return path
    inv = ctx.inventory(ctx.plan.big)
    zone = ZoneInfo(inventory.ZONE_NAME)
    query = inventory.queries(inv.schema).slots + " ORDER BY s.id LIMIT %s"
    with psycopg.connect(ctx.dsn) as conn, conn.cursor(row_factory=psycopg.rows.dict_row) as cur:
        cur.execute(query, (count,))
        bodies = [rows.slot(row, zone).payload() for row in cur]
    path.write_text(json.dumps(bodies), encoding="utf-8")
    return path


class Backlogs:
    """SQLite states holding a backlog of `count` notifies, written once, copied per drain."""

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.enqueue_s: dict[int, float] = {}
        self._made: dict[int, Path] = {}

    def copy(self, count: int, name: str) -> Path:
        if count not in self._made:
            state = self.ctx.path(f"backlog-{count}.db")
            setup = self.ctx.setup(self.ctx.plan.big, state)
            args = {
                "config": str(self.ctx.config(f"backlog-{count}", setup)),
                "log": str(self.ctx.log("throughput-enqueue")),
                "payloads": str(payloads(self.ctx, count)),
            }
            result = worker.run("enqueue", args, log=self.ctx.log("workers"))
            self.enqueue_s[count] = result["seconds"]
            self._made[count] = state
        target = self.ctx.path(f"{name}.db")
        for old in (target, Path(f"{target}-wal"), Path(f"{target}-shm")):
            old.unlink(missing_ok=True)
        with sqlite3.connect(self._made[count]) as src, sqlite3.connect(target) as dst:
            src.backup(dst)
        src.close()
        dst.close()
        return target


def _timed(ctx: Context, receiver: Receiver, task: str, args: dict[str, Any]) -> dict[str, Any]:
    before = receiver.cpu_s()
    result = worker.run(task, args, log=ctx.log("workers"))
    result["receiver_cpu_s"] = receiver.cpu_s() - before
    result["receiver_busy"] = result["receiver_cpu_s"] / result["seconds"]
    return result


def _drain(
    ctx: Context,
    receiver: Receiver,
    backlog: Path,
    name: str,
    delivery: dict[str, Any],
) -> dict[str, Any]:
    setup = ctx.setup(
        ctx.plan.big, backlog, base_url=receiver.url, delivery=tuple(delivery.items())
    )
    args = {
        "config": str(ctx.config(name, setup)),
        "log": str(ctx.log(name)),
        "timeout_s": DRAIN_TIMEOUT_S,
    }
    return _timed(ctx, receiver, "drain", args)


def _floor(ctx: Context, receiver: Receiver, count: int, concurrency: int) -> dict[str, Any]:
    args: dict[str, Any] = {"url": receiver.url, "payloads": str(payloads(ctx, count))}
    if concurrency == 1:
        return _timed(ctx, receiver, "post_sync", args)
    return _timed(ctx, receiver, "post_threads", {**args, "concurrency": concurrency})


def _levels() -> list[tuple[int, dict[str, Any]]]:
    """(concurrency, [delivery] keys) of the agent drains: 1, and the default if larger."""
    defaults = agentconf.delivery_defaults()
    if "concurrency" not in defaults:  # an agent that always delivers one at a time
        return [(1, {})]
    unlimited = {"rate_limit": 0.0} if "rate_limit" in defaults else {}
    levels = [(1, {"concurrency": 1, **unlimited})]
    if int(defaults["concurrency"]) > 1:
        n = int(defaults["concurrency"])
        levels.append((n, {"concurrency": n, **unlimited}))
    return levels


def _round(
    ctx: Context, receiver: Receiver, backlogs: Backlogs, count: int, tag: str
) -> dict[str, Any]:
    result: dict[str, Any] = {"pairs": []}
    for concurrency, delivery in _levels():
        name = f"drain-{tag}-c{concurrency}"
        agent = _drain(ctx, receiver, backlogs.copy(count, name), name, delivery)
        floor = _floor(ctx, receiver, count, concurrency)
        result["pairs"].append({"concurrency": concurrency, "agent": agent, "floor": floor})
        print(
            f"  throughput ({receiver.kind} receiver, {tag}, concurrency {concurrency}): "
            f"agent {agent['per_s']:.0f}/s ({agent['sent']} sent), httpx {floor['per_s']:.0f}/s",
            flush=True,
        )
    result["async"] = _timed(
        ctx,
        receiver,
        "post_async",
        {
            "url": receiver.url,
            "payloads": str(payloads(ctx, count)),
            "concurrency": ASYNC_CONCURRENCY,
        },
    )
    print(f"  throughput: httpx async x{ASYNC_CONCURRENCY} {result['async']['per_s']:.0f}/s")
    return result


def _summary(kind: str, runs: list[dict[str, Any]], count: int) -> dict[str, Any]:
    rows = []
    for position, pair in enumerate(runs[0]["pairs"]):
        same = [r["pairs"][position] for r in runs]
        agent = median([p["agent"]["per_s"] for p in same])
        floor = median([p["floor"]["per_s"] for p in same])
        rows.append(
            {
                "concurrency": pair["concurrency"],
                "agent_per_s": agent,
                "floor_per_s": floor,
                "agent_vs_floor": ratio(agent, floor),
                "agent_cpu_ms_per_message": median(
                    [p["agent"]["cpu_s"] / max(1, p["agent"]["sent"]) * 1000 for p in same]
                ),
                "floor_cpu_ms_per_message": median(
                    [p["floor"]["cpu_s"] / max(1, p["floor"]["sent"]) * 1000 for p in same]
                ),
                "receiver_busy_agent": median([p["agent"]["receiver_busy"] for p in same]),
                "receiver_busy_floor": median([p["floor"]["receiver_busy"] for p in same]),
                "sent": min(p["agent"]["sent"] for p in same),
                "left": max(p["agent"]["left"] for p in same),
            }
        )
    return {
        "receiver": kind,
        "backlog": count,
        "rows": rows,
        "async_per_s": median([r["async"]["per_s"] for r in runs]),
        "receiver_busy_async": median([r["async"]["receiver_busy"] for r in runs]),
        "runs": runs,
    }


def _claim(ctx: Context, backlogs: Backlogs, count: int) -> dict[str, Any]:
    """One claim of a batch from the full backlog."""
    state = backlogs.copy(count, "claim")
    args = {
        "config": str(ctx.config("claim", ctx.setup(ctx.plan.big, state))),
        "log": str(ctx.log("claim")),
        "limit": int(agentconf.delivery_defaults().get("batch_size", 50)),
    }
    return dict(worker.run("claim", args, log=ctx.log("workers")))


def measure(ctx: Context) -> dict[str, Any]:
    plan = ctx.plan
    defaults = agentconf.delivery_defaults()
    backlogs = Backlogs(ctx)
    claim = _claim(ctx, backlogs, plan.backlog)
    print(
        f"  one claim of {claim['claimed']} from {claim['pending']:,} pending: "
        f"{claim['seconds'] * 1000:.0f} ms",
        flush=True,
    )
    results = []
    with Receiver("fast", log=ctx.log("throughput-receiver")) as receiver:
        runs = [
            _round(ctx, receiver, backlogs, plan.backlog, f"run{run}") for run in range(plan.runs)
        ]
        results.append(_summary("fast", runs, plan.backlog))
        limited: dict[str, Any] | None = None
        rate = float(defaults.get("rate_limit", 0.0) or 0.0)
        if rate > 0:
            burst = int(defaults.get("rate_burst", 1) or 1)
            count = min(plan.backlog, burst + int(rate * plan.rate_limited_s))
            limited = _drain(
                ctx, receiver, backlogs.copy(count, "drain-defaults"), "drain-defaults", {}
            )
            limited["rate_limit"] = rate
            limited["rate_burst"] = burst
            print(f"  throughput, default delivery settings: {limited['per_s']:.0f}/s", flush=True)
    with Receiver("sandbox", log=ctx.log("throughput-sandbox")) as sandbox:
        sandbox_run = _round(ctx, sandbox, backlogs, plan.sandbox_backlog, "sandbox")
        results.append(_summary("sandbox", [sandbox_run], plan.sandbox_backlog))
    return {
        "backlog": plan.backlog,
        "enqueue_s": backlogs.enqueue_s,
        "claim": claim,
        "async_concurrency": ASYNC_CONCURRENCY,
        "defaults": {
            k: defaults.get(k) for k in ("concurrency", "rate_limit", "rate_burst", "batch_size")
        },
        "rate_limited": limited,
        "receivers": results,
    }
