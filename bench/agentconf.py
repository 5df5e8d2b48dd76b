"""The agent's TOML configuration for a measurement, written the way an operator writes it.

Only what a measurement needs differs from config.example.toml: the queries point at the
bench inventory, base_url at a loopback receiver, and the source/state/delivery keys named
by each caller. Logs go to a file at INFO in JSON, as the daemon writes them in production.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.inventory import ZONE_NAME, Queries, queries

SECRET = "be7c" * 16
"""The webhook secret (64 hex digits, like Seyaha's) shared by the agent and the receivers."""

INTEGRATION_ID = "64a1b2c3d4e5f6a7b8c9d0e1"

NO_RECEIVER_URL = "http://127.0.0.1:9"
"""base_url for measurements that never deliver (the discard port; nothing listens there)."""

NOTIFY_CHANNEL = "seyaha_bench"


@dataclass(frozen=True)
class AgentSetup:
    """What differs between the measurements' configurations."""

    source_url: str
    schema: str
    state_path: Path
    base_url: str = NO_RECEIVER_URL
    poll_interval_s: float = 5.0
    cursor_overlap_s: float = 60.0
    full_scan_interval_s: float = 300.0
    incremental: bool = True
    range_digests: bool = True
    log_level: str = "INFO"
    delivery: tuple[tuple[str, Any], ...] = ()
    """[delivery] keys to set, e.g. (("concurrency", 1), ("rate_limit", 0.0))."""
    queries: Queries | None = None
    """The source queries, if not the PostgreSQL ones of bench/inventory.py for `schema`."""
    listens: bool = True
    """Name the PostgreSQL channel and table of the wake-ups (a MySQL source has none)."""
    source: tuple[tuple[str, Any], ...] = ()
    """More [source] keys, e.g. (("reconcile_share", 1.0),): written only where this version
    of the agent knows them (source_defaults), so a measurement still runs on an older one."""


def _metrics_section() -> str:
    """[metrics] on an ephemeral port where the agent has a listener: daemons started by the
    benchmark keep it (its cost is part of the daemon) without fighting over a fixed port."""
    from agent.config import AgentSettings

    if "metrics" not in AgentSettings.model_fields:
        return ""
    return '[metrics]\nlisten = "127.0.0.1:0"\n\n'


def delivery_defaults() -> dict[str, Any]:
    """The [delivery] keys this version of the agent knows, with their defaults."""
    from agent.config import DeliverySettings

    return {name: f.default for name, f in DeliverySettings.model_fields.items()}


def source_defaults() -> dict[str, Any]:
    """The [source] keys this version of the agent knows, with their defaults."""
    from agent.config import SourceSettings

    return {name: f.default for name, f in SourceSettings.model_fields.items()}


def write(folder: Path, name: str, setup: AgentSetup) -> Path:
    """`folder/name.toml` and its secret file; returns the configuration's path."""
    folder.mkdir(parents=True, exist_ok=True)
    secret_file = folder / f"{name}.secret"
    secret_file.write_text(SECRET + "\n", encoding="utf-8")
    secret_file.chmod(0o600)
    q = setup.queries or queries(setup.schema)
    changed = f"slots_changed_query = '''{q.slots_changed}'''\n" if setup.incremental else ""

    def s(value: str) -> str:
        return json.dumps(value)  # a TOML basic string

    delivery = "".join(f"{key} = {json.dumps(value)}\n" for key, value in setup.delivery)
    known = source_defaults()
    source = "".join(
        f"{key} = {json.dumps(value)}\n" for key, value in setup.source if key in known
    )
    wakeups = (
        f"notify_channel = {s(NOTIFY_CHANNEL)}\nnotify_tables = [{s(setup.schema + '.slots')}]\n"
        if setup.listens
        else ""
    )
    path = folder / f"{name}.toml"
    path.write_text(
        f"""# Written by bench/agentconf.py for one measurement.
[seyaha]
base_url = {s(setup.base_url)}
integration_id = {s(INTEGRATION_ID)}
webhook_secret_file = {s(secret_file.name)}

[source]
url = {s(setup.source_url)}
poll_interval = {setup.poll_interval_s}
timezone = {s(ZONE_NAME)}
cursor_overlap = {setup.cursor_overlap_s}
full_scan_interval = {setup.full_scan_interval_s}
{wakeups}range_digests = {"true" if setup.range_digests else "false"}
catalog_query = '''{q.catalog}'''
slots_query = '''{q.slots}'''
{changed}{source}
[state]
url = {s("sqlite:///" + str(setup.state_path))}

[delivery]
{delivery}
{_metrics_section()}[log]
level = {s(setup.log_level)}
format = "json"
""",
        encoding="utf-8",
    )
    return path
