"""The `outbox` sub-command: what an operator sees of delivery (status, list) and does to
it (retry, purge), safe while daemons run; and the health conditions `outbox status` exits
with, the daemon's readiness included."""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import TextIO

import httpx

from agent.cli import StatusExit
from agent.clock import SystemClock, to_epoch_ms
from agent.config import (
    listen_address,
    load_settings,
)
from agent.delivery.flow import BreakerState
from agent.errors import ConfigError
from agent.shards import SHARD_PREFIX, SHARDS
from agent.store import StateStore
from agent.store.coordination import SCANNER
from agent.store.identity import watch_state_file


def parse_age(text: str) -> timedelta:
    """'7d', '12h', '30m', '45s' or plain seconds."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    value = text.strip().lower()
    factor = units.get(value[-1:])
    number = value[:-1] if factor is not None else value
    try:
        seconds = float(number) * (factor or 1)
    except ValueError:
        raise ConfigError(
            [f"--older-than: {text!r} is not an age like 7d, 12h, 30m or 45s"]
        ) from None
    return timedelta(seconds=seconds)


def _age(delta: timedelta) -> str:
    seconds = int(max(0.0, delta.total_seconds()))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 172800:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


PAUSING_STATUSES = frozenset({301, 302, 303, 307, 308, 401, 403, 404})
"""Answers that pause delivery: a message last refused with one of them is shown as paused."""


READYZ_TIMEOUT_S = 5.0
"""How long `outbox status --daemon` waits for /readyz. The daemon answers it from memory and
one state-store ping: a longer silence means it is stuck, and a health check must say so well
within its own timeout."""


@dataclass(frozen=True)
class Condition:
    """Something wrong with delivery, and the exit code of `outbox status` that names it."""

    code: StatusExit
    text: str


def status_conditions(
    status: Mapping[str, str],
    dead: int,
    daemon_problems: list[str] | None,
    *,
    ignore_dead: bool,
    paused: int = 0,
) -> list[Condition]:
    """What is wrong, most severe first; empty when delivery is healthy.

    `status` is the state store's delivery record, `dead` the dead letters in the outbox,
    `daemon_problems` what the daemon's /readyz reported (None: it was not asked), `paused`
    how many of a platform's integrations are paused on their own.
    """
    found = []
    if status.get("pause"):
        found.append(Condition(StatusExit.PAUSED, "delivery paused"))
    elif paused:
        found.append(Condition(StatusExit.PAUSED, f"{paused} integration(s) paused"))
    # Any state but closed counts, half-open included: a half-open breaker still holds back
    # every call but its one probe (the circuit_breaker_open gauge says 1 for it too), and the
    # record, written when the breaker opens and when it closes, reads open through the probe.
    breaker = status.get("breaker", BreakerState.CLOSED.value)
    if breaker != BreakerState.CLOSED.value:
        found.append(Condition(StatusExit.BREAKER_OPEN, f"circuit breaker {breaker}"))
    if daemon_problems:
        found.append(Condition(StatusExit.DAEMON_NOT_READY, "daemon not ready"))
    if dead and not ignore_dead:
        found.append(Condition(StatusExit.DEAD_LETTERS, f"{dead} dead letter(s)"))
    return sorted(found, key=lambda c: c.code, reverse=True)


def readyz_url(listen: str) -> str:
    """Where the daemon serves /readyz, from `[metrics] listen` as this host reaches it."""
    address = listen_address(listen) if listen else None
    if address is None or address[1] == 0:
        found = f"{listen!r} has no fixed port" if listen else "it is empty (no listener)"
        raise ConfigError(
            [
                f"[metrics] listen: --daemon asks the daemon's /readyz there, but {found}; "
                'set a fixed port, e.g. listen = "127.0.0.1:9464"'
            ]
        )
    host, port = address
    # A wildcard listens on every address, loopback included: ask that one.
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/readyz"


def ask_daemon(url: str) -> list[str]:
    """The problems the daemon's /readyz lists; no answer, or not its answer, is one too."""
    try:
        # trust_env=False: a proxy from the environment must not stand between us and it.
        answer = httpx.get(url, timeout=READYZ_TIMEOUT_S, trust_env=False)
    except httpx.HTTPError as exc:
        return [f"no answer ({type(exc).__name__}): is the daemon running?"]
    try:
        body = answer.json()
        ready, problems = body["ready"], body["problems"]
    except (ValueError, KeyError, TypeError):
        return [f"answered {answer.status_code} without a readiness report: is it the daemon?"]
    if answer.status_code == 200 and ready is True:
        return []
    return [str(problem) for problem in problems] or [f"answered {answer.status_code}"]


def outbox(path: Path, args: argparse.Namespace, out: TextIO | None = None) -> int:
    """Operator commands on the outbox; safe while the daemon runs."""
    out = out or sys.stdout
    settings = load_settings(path)
    asks_daemon = args.action == "status" and args.daemon
    daemon_url = readyz_url(settings.metrics.listen) if asks_daemon else None
    store = StateStore.from_url(settings.state.url)
    clock = SystemClock()
    try:
        store.open()
        watch_state_file(store.engine)  # a state file lost meanwhile is refused, not written
        now = clock.now()
        only = getattr(args, "integration", None)
        if args.action == "status":
            return _outbox_status(
                store,
                now,
                out,
                daemon_url=daemon_url,
                ignore_dead=args.ignore_dead,
                integration=only,
            )
        elif args.action == "list":
            _outbox_list(
                store,
                now,
                out,
                state=None if args.state == "all" else args.state,
                limit=args.limit,
                integration=only,
            )
        elif args.action == "retry":
            count = store.admin.retry_dead(
                now, ids=args.ids or (), kind=args.kind, integration=only
            )
            print(f"{count} dead letter(s) queued again", file=out)
        elif args.action == "purge":
            cutoff = None if args.older_than is None else now - parse_age(args.older_than)
            count = store.admin.purge_dead(older_than=cutoff, integration=only)
            print(f"{count} dead letter(s) deleted", file=out)
    finally:
        store.close()
    return 0


PAUSES_SHOWN = 10
"""Paused integrations `outbox status` names one by one (the rest are counted)."""

AGENTS_SHOWN = 10
"""Agents sharing a platform that `outbox status` names one by one (the rest are counted)."""


def _scanning(store: StateStore) -> str | None:
    """Who scans a shared store: the holder of the scanner lease, or how a platform's shards
    are divided among its agents (see agent/shards.py); None on a SQLite store, or before
    any agent ran. Leases run on the database's clock: so does this look at them."""
    if not store.dialect.shared:
        return None
    now_ms = to_epoch_ms(store.clock(SystemClock()).now())
    shards = store.coordination.leases_named(SHARD_PREFIX)
    if shards:
        held = Counter(holder for holder, until_ms in shards.values() if until_ms > now_ms)
        agents = ", ".join(f"{h} ({n})" for h, n in sorted(held.items())[:AGENTS_SHOWN])
        more = f" and {len(held) - AGENTS_SHOWN} more" if len(held) > AGENTS_SHOWN else ""
        line = f"{len(held)} agent(s) share the {SHARDS} shards: {agents or 'none'}{more}"
        unheld = SHARDS - sum(held.values())
        if unheld:
            line += (
                f"; {unheld} shard(s) scanned by no agent now (their agent stopped: another "
                "takes them within the lease, if one runs)"
            )
        return line
    lease = store.coordination.lease(SCANNER)
    if lease is None:
        return None
    if to_epoch_ms(lease.until) <= now_ms:
        return f"by no agent now (the scanner lease of {lease.holder} ran out)"
    return f"by {lease.holder} (it holds the scanner lease; the others deliver)"


def _outbox_status(
    store: StateStore,
    now: datetime,
    out: TextIO,
    *,
    daemon_url: str | None,
    ignore_dead: bool,
    integration: str | None = None,
) -> int:
    """Print the state of delivery (of one integration's messages, with `integration`);
    return the exit code of its most severe problem."""
    stats = store.admin.stats(integration=integration)
    status = store.coordination.status()
    paused = {
        name.removeprefix("pause:"): value
        for name, value in status.items()
        if name.startswith("pause:") and (integration is None or name == f"pause:{integration}")
    }
    if integration is not None:
        print(f"integration      {integration}", file=out)
    print(
        f"backlog          {stats.pending} waiting ({stats.in_flight} in flight), {stats.dead} dead",
        file=out,
    )
    if stats.integrations_waiting and integration is None:
        print(f"integrations     {stats.integrations_waiting} with messages waiting", file=out)
    if stats.oldest_pending is not None:
        print(f"oldest waiting   {_age(now - stats.oldest_pending)}", file=out)
    last = status.get("last_delivery")
    if last:
        print(f"last delivery    {last} ({_age(now - datetime.fromisoformat(last))} ago)", file=out)
    else:
        print("last delivery    never", file=out)
    print(f"circuit breaker  {status.get('breaker', 'closed')}", file=out)
    pause = status.get("pause")
    if pause:
        since, _, reason = pause.partition(" ")
        print(f"delivery         PAUSED since {since}: {reason}", file=out)
    else:
        print("delivery         running", file=out)
    for shown, (paused_id, record) in enumerate(sorted(paused.items())):
        if shown == PAUSES_SHOWN:
            print(f"                 ... and {len(paused) - shown} more paused", file=out)
            break
        since, _, reason = record.partition(" ")
        print(f"integration      {paused_id} PAUSED since {since}: {reason}", file=out)
    scanning = _scanning(store)
    if scanning is not None:
        print(f"scanning         {scanning}", file=out)
    daemon_problems = None
    if daemon_url is not None:
        daemon_problems = ask_daemon(daemon_url)
        verdict = "NOT READY: " + "; ".join(daemon_problems) if daemon_problems else "ready"
        print(f"daemon           {verdict} ({daemon_url})", file=out)
    conditions = status_conditions(
        status, stats.dead, daemon_problems, ignore_dead=ignore_dead, paused=len(paused)
    )
    for condition in conditions:
        print(f"health           {condition.text} (exit {condition.code:d})", file=out)
    if not conditions:
        print(f"health           ok (exit {StatusExit.OK:d})", file=out)
    return conditions[0].code if conditions else StatusExit.OK


def _outbox_list(
    store: StateStore,
    now: datetime,
    out: TextIO,
    *,
    state: str | None,
    limit: int,
    integration: str | None = None,
) -> None:
    entries = store.admin.entries(state=state, limit=limit, integration=integration)
    if not entries:
        print("the outbox is empty" if state is None else f"no {state} messages", file=out)
        return
    print(
        f"{'id':>8}  {'state':<8} {'kind':<7} {'age':>8} {'tries':>5}  what / last error", file=out
    )
    paused = {
        name.removeprefix("pause:")
        for name in store.coordination.status()
        if name.startswith("pause:")
    }
    for e in entries:
        shown = e.state
        if e.state == "pending" and (
            e.last_status in PAUSING_STATUSES or (e.integration_id and e.integration_id in paused)
        ):
            shown = "paused"  # refused, or its integration paused (e.g. no secret file)
        what = "sync/trigger"
        if e.payload is not None:
            what = (
                f"{e.payload.get('productId')}/{e.payload.get('optionId')}/"
                f"{e.payload.get('availabilityId')} {e.payload.get('status')}"
            )
        if e.integration_id:
            what += f" (integration {e.integration_id})"
        print(
            f"{e.id:>8}  {shown:<8} {e.kind:<7} {_age(now - e.created_at):>8} {e.attempts:>5}  {what}",
            file=out,
        )
        if e.last_error:
            print(f"{'':>8}  {e.last_error}", file=out)
