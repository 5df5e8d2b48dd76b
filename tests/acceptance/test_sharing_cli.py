"""Two `seyaha-agent run` processes sharing a platform: one configuration, one PostgreSQL or
MariaDB state store, the integrations divided between them by shard; one is killed with
SIGKILL and the other takes its share over.

Real processes, real HTTP (the `sandbox` command, checking each integration's own secret),
the platform's inventory on the same database server as the state store. [state]
scanner_lease is 2 s, so a takeover is due within 4 s (twice the lease); the test waits up
to WAIT_S for it and prints the time it took, without asserting it.
"""

from __future__ import annotations

import re
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from secrets import token_hex
from typing import Any

import pytest

from tests.acceptance.conftest import Processes, SandboxClient, cli, wait_until
from tests.integration.inventory import SERVER_PARAMS, ZONE_NAME, at, first_day
from tests.integration.platform import (
    CATALOG_QUERY,
    SLOTS_CHANGED_QUERY,
    SLOTS_QUERY,
    Platform,
    write_secrets,
)

INTEGRATIONS = tuple(f"{0xC0FFEE00 + n:024x}" for n in range(12))

LEASE_S = 2.0


def write_config(folder: Path, name: str, *, base_url: str, source: str, state: str) -> Path:
    path = folder / f"{name}.toml"
    path.write_text(
        f"""
[seyaha]
base_url = "{base_url}"
webhook_secrets_dir = "secrets"

[source]
url = "{source}"
poll_interval = 0.2
timezone = "{ZONE_NAME}"
catalog_query = '''{CATALOG_QUERY}'''
slots_query = '''{SLOTS_QUERY}'''
slots_changed_query = '''{SLOTS_CHANGED_QUERY}'''

[state]
url = "{state}"
scanner_lease = {LEASE_S}

[delivery]
backoff_initial = 0.05
backoff_max = 0.5

[metrics]
listen = ""

[log]
format = "json"
""",
        encoding="utf-8",
    )
    return path


def notifies(calls: list[dict[str, Any]]) -> Counter[tuple[str, str]]:
    return Counter(
        (c["integration"], (c["body"] or {}).get("availabilityId", ""))
        for c in calls
        if c["endpoint"] == "notify"
    )


@pytest.mark.parametrize("backend", SERVER_PARAMS)
def test_two_agents_share_a_platform_and_one_takes_over_when_the_other_is_killed(
    backend: str,
    tmp_path: Path,
    new_database: Callable[[str], str],
    processes: Processes,
) -> None:
    secrets = {integration: token_hex(32) for integration in INTEGRATIONS}
    write_secrets(tmp_path / "secrets", secrets)
    platform = Platform(new_database(backend))
    platform.track_updates()
    day = first_day()
    for n, integration in enumerate(INTEGRATIONS, start=1):
        platform.supplier(n, integration)
        platform.product(f"p{n}", n)
        platform.slot(f"s{n}a", f"p{n}", at(day, 9))
        platform.slot(f"s{n}b", f"p{n}", at(day, 11))
    sandbox = SandboxClient(processes.sandbox(tmp_path / "secrets").url)
    state = new_database(backend)
    configs = [
        write_config(tmp_path, name, base_url=sandbox.url, source=platform.url, state=state)
        for name in ("first", "second")
    ]
    checked = cli("check", "--config", str(configs[0]))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "a shared state store: agents run with this configuration divide the integrations" in (
        checked.stdout
    )
    first, second = (processes.daemon(c) for c in configs)

    # One baseline: one sync/trigger per integration, not one per agent.
    sandbox.wait_for(
        lambda calls: {c["integration"] for c in calls} == set(INTEGRATIONS), "the baseline"
    )

    def division() -> tuple[int, int] | None:
        held = []
        for daemon in (first, second):
            said = daemon.events("scan.shards")
            if not said:
                return None
            held.append(int(said[-1]["shards"]))
        return (held[0], held[1]) if sum(held) == 64 and min(held) > 0 else None

    assert wait_until(division, "the two agents to divide the shards") == (32, 32)
    assert Counter(c["integration"] for c in sandbox.calls()) == Counter(INTEGRATIONS)
    status = cli("outbox", "--config", str(configs[0]), "status")
    scanning = re.findall(r"^scanning +(.*)$", status.stdout, re.M)
    assert len(scanning) == 1, status.stdout + status.stderr
    assert scanning[0].startswith("2 agent(s) share the 64 shards: ")
    assert sorted(re.findall(r"\((\d+)\)", scanning[0])) == ["32", "32"]

    # A booking in every integration reaches its integration once.
    for n in range(1, len(INTEGRATIONS) + 1):
        platform.book(f"s{n}a", 3)
    wanted = {(i, f"s{n}a") for n, i in enumerate(INTEGRATIONS, start=1)}
    sandbox.wait_for(lambda calls: set(notifies(calls)) >= wanted, "the first bookings")
    assert all(count == 1 for count in notifies(sandbox.calls()).values())
    # Both agents scanned: each polled a share of the bookings.
    scanned = [
        sum(int(e.get("slots_changed", 0)) for e in d.events("scan.changes"))
        for d in (first, second)
    ]
    assert sum(scanned) == len(INTEGRATIONS)
    assert min(scanned) > 0

    # The first agent is killed; bookings made after it are all sent by the second.
    killed = time.monotonic()
    first.proc.send_signal(signal.SIGKILL)
    first.proc.wait(10)
    for n in range(1, len(INTEGRATIONS) + 1):
        platform.book(f"s{n}b", 2)
    wanted |= {(i, f"s{n}b") for n, i in enumerate(INTEGRATIONS, start=1)}
    sandbox.wait_for(lambda calls: set(notifies(calls)) >= wanted, "bookings after the kill")
    took = time.monotonic() - killed
    print(f"\nall bookings made after SIGKILL delivered {took:.1f} s after it")
    counts = notifies(sandbox.calls())
    assert set(counts) == wanted
    assert all(count == 1 for count in counts.values()), counts
    wait_until(
        lambda: second.events("scan.shards") and second.events("scan.shards")[-1]["shards"] == 64,
        "the second agent to hold every shard",
    )
    status = cli("outbox", "--config", str(configs[1]), "status")
    assert "scanning         1 agent(s) share the 64 shards: " in status.stdout
    assert second.stop() == 0
    for daemon in (first, second):
        out, err = daemon.output()
        for secret in secrets.values():
            assert secret not in out + err
    platform.close()
