"""`seyaha-agent triggers` and `check` through the real CLI, and a PostgreSQL wake-up end to
end: triggers installed by the CLI, the daemon, a real sandbox process.

The daemon runs in this process (Agent.run in a thread) so that the test can read its scans
metric: with poll_interval = 60, a notify that arrives quickly, after a single extra poll, was
delivered because of a wake-up, not a timed poll.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.app import Agent
from agent.config import ENV_PREFIX, SECRET_ENV, load_config
from tests.acceptance.conftest import (
    CATALOG_QUERY,
    SLOTS_QUERY,
    WAIT_S,
    Inventory,
    SandboxClient,
    SandboxProcess,
    cli,
    write_config,
)
from tests.conftest import INTEGRATION_ID, SECRET
from tests.integration import inventory as partner
from tests.integration.inventory import first_day, notify_payload, running, seed_tours, wait_until

POLL_S = 60.0
"""The daemon's poll_interval: after its first polls, only a wake-up explains another one."""

QUIET_S = 3.0
"""How long the test watches for a delivery that must NOT happen."""


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process agent reads overrides from the environment: start from none."""
    monkeypatch.delenv(SECRET_ENV, raising=False)
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def _scans(agent: Agent) -> float:
    value = agent.metrics.registry.get_sample_value("seyaha_agent_scans_total", {"result": "ok"})
    return value or 0.0


def _notified(calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c["body"] for c in calls if c["endpoint"] == "notify" and c["status"] == 200]


def _with_source_keys(config: Path, **keys: Any) -> Path:
    """The acceptance config with more [source] keys, written beside it."""
    lines = "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    text = config.read_text(encoding="utf-8").replace(
        "poll_interval = 0.2\n", "poll_interval = 0.2\n" + lines, 1
    )
    assert lines in text
    path = config.with_name(f"{config.stem}-{uuid.uuid4().hex[:8]}.toml")
    path.write_text(text, encoding="utf-8")
    return path


# -- PostgreSQL: install, wake, uninstall ---------------------------------------------


@pytest.mark.postgres
def test_installed_triggers_wake_the_daemon_and_uninstall_removes_them(
    tmp_path: Path, new_database: Callable[[str], str]
) -> None:
    inventory = partner.Inventory.create("postgresql", new_database("postgresql"))
    try:
        slots = {s.slot_id: s for s in seed_tours(inventory, first_day())}
        settings: dict[str, Any] = {
            "integration_id": INTEGRATION_ID,
            "secret": SECRET,
            "source_url": inventory.url,
            "state_url": f"sqlite:///{tmp_path / 'state.db'}",
            "poll_interval": POLL_S,
        }

        bare = partner.write_config(
            tmp_path, name="bare", base_url="http://127.0.0.1:9", **settings
        )
        refused = cli("triggers", "install", "--config", str(bare))
        assert refused.returncode == 2, refused.stdout + refused.stderr
        assert "[source] notify_tables" in refused.stderr

        # The triggers alone: without a change query the daemon would otherwise also read
        # the server's snapshot and pass on any commit (tests/integration/test_pg_snapshots.py).
        settings["source"] = {
            "notify_tables": ["slots"],
            "full_scan_interval": 3600,
            "watch_commits": False,
        }
        config = partner.write_config(
            tmp_path, name="agent", base_url="http://127.0.0.1:9", **settings
        )
        sandbox_process = SandboxProcess(config)
        try:
            partner.write_config(tmp_path, name="agent", base_url=sandbox_process.url, **settings)
            sandbox = SandboxClient(sandbox_process.url)
            _wake_up_end_to_end(config, inventory, slots, sandbox)
        finally:
            sandbox_process.stop()
    finally:
        inventory.close()


def _wake_up_end_to_end(
    config: Path,
    inventory: partner.Inventory,
    slots: dict[int, partner.TourSlot],
    sandbox: SandboxClient,
) -> None:
    before_install = cli("triggers", "show", "--config", str(config))
    assert before_install.returncode == 0, before_install.stderr
    assert "-- installed now on: no table" in before_install.stdout

    installed = cli("triggers", "install", "--config", str(config))
    assert installed.returncode == 0, installed.stdout + installed.stderr
    assert "triggers installed on: slots" in installed.stdout
    shown = cli("triggers", "show", "--config", str(config))
    assert shown.returncode == 0, shown.stderr
    assert "-- installed now on: public.slots" in shown.stdout
    assert "CREATE TRIGGER seyaha_agent_notify" in shown.stdout
    assert "pg_notify('seyaha_agent'" in shown.stdout

    agent = Agent(load_config(config))
    agent.open()
    try:
        started = time.monotonic()
        with running(agent):
            sandbox.wait_for(
                lambda calls: [c["endpoint"] for c in calls] == ["trigger"], "the baseline trigger"
            )
            # the first poll, then the one the listener asks for once it is listening
            wait_until(lambda: _scans(agent) >= 2, "the listener to connect", timeout_s=WAIT_S)

            before = _scans(agent)
            inventory.update_slot(101, vacancies=12)
            wanted = notify_payload(
                1, "1-sunset", 101, slots[101].start, status="LIMITED", vacancies=12, capacity=40
            )
            sandbox.wait_for(lambda calls: wanted in _notified(calls), "the notify")
            assert time.monotonic() - started < POLL_S, "too slow to tell a wake-up from a poll"
            wait_until(lambda: _scans(agent) > before, "the poll to be counted")
            assert _scans(agent) == before + 1  # one NOTIFY, one poll

            removed = cli("triggers", "uninstall", "--config", str(config))
            assert removed.returncode == 0, removed.stdout + removed.stderr
            assert removed.stdout.splitlines() == [
                "triggers removed from: slots",
                "function public.seyaha_agent_notify() removed",
            ]
            after = cli("triggers", "show", "--config", str(config))
            assert "-- installed now on: no table" in after.stdout
            again = cli("triggers", "uninstall", "--config", str(config))
            assert again.returncode == 0, again.stdout + again.stderr
            assert again.stdout.splitlines() == [
                "no trigger removed: none of the agent's triggers is installed",
                "slots: no agent trigger on it, nothing to remove",
            ]

            # Without the trigger nothing wakes the daemon: the change waits for the poll.
            before = _scans(agent)
            inventory.update_slot(102, vacancies=1)
            time.sleep(QUIET_S)
            assert _scans(agent) == before
            assert _notified(sandbox.calls()) == [wanted]
    finally:
        agent.close()


# -- sources that have no triggers ----------------------------------------------------


def test_triggers_refuse_a_sqlite_source_naming_source_url(tmp_path: Path) -> None:
    config = _with_source_keys(
        write_config(tmp_path, "http://127.0.0.1:9"), notify_tables=["slots"]
    )
    for action in ("install", "show"):
        result = cli("triggers", action, "--config", str(config))
        assert result.returncode != 0, result.stdout
        assert "[source] url" in result.stderr
        assert "PostgreSQL" in result.stderr
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "inventory.db").exists()  # refused before touching the source


@pytest.mark.mariadb
def test_triggers_refuse_a_mariadb_source_naming_source_url(
    tmp_path: Path, new_database: Callable[[str], str]
) -> None:
    config = partner.write_config(
        tmp_path,
        name="agent",
        base_url="http://127.0.0.1:9",
        integration_id=INTEGRATION_ID,
        secret=SECRET,
        source_url=new_database("mariadb"),
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        source={"notify_tables": ["slots"]},
    )
    result = cli("triggers", "install", "--config", str(config))
    assert result.returncode != 0, result.stdout
    assert "[source] url" in result.stderr
    assert "PostgreSQL" in result.stderr
    assert "Traceback" not in result.stderr


# -- check -----------------------------------------------------------------------------


def test_check_refuses_a_change_query_without_since_naming_the_key(tmp_path: Path) -> None:
    inventory = Inventory(tmp_path / "inventory.db")
    inventory.execute("ALTER TABLE slots ADD COLUMN updated_at TEXT")
    inventory.execute("ALTER TABLE products ADD COLUMN updated_at TEXT")
    config = write_config(tmp_path, "http://127.0.0.1:9")
    changed = {
        "slots_changed_query": f"{SLOTS_QUERY} WHERE s.updated_at >= :since",
        "catalog_changed_query": f"{CATALOG_QUERY} WHERE p.updated_at >= :since",
    }

    good = _with_source_keys(config, **changed)
    result = cli("check", "--config", str(good))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all checks passed" in result.stdout

    for key, query in changed.items():
        bad = _with_source_keys(config, **{key: query.replace(":since", ":sinc")})
        result = cli("check", "--config", str(bad))
        assert result.returncode == 1, result.stdout + result.stderr
        assert f"[source] {key}" in result.stdout
        assert ":since" in result.stdout

    # The daemon refuses such a file at start, naming the key.
    bad = _with_source_keys(config, slots_changed_query=SLOTS_QUERY)
    run = cli("run", "--config", str(bad), timeout=60)
    assert run.returncode == 2
    assert "[source] slots_changed_query" in run.stderr


def test_check_runs_the_change_queries_and_names_the_one_that_fails(tmp_path: Path) -> None:
    inventory = Inventory(tmp_path / "inventory.db")
    inventory.execute("ALTER TABLE slots ADD COLUMN updated_at TEXT")
    config = write_config(tmp_path, "http://127.0.0.1:9")
    good = _with_source_keys(
        config, slots_changed_query=f"{SLOTS_QUERY} WHERE s.updated_at >= :since"
    )
    result = cli("check", "--config", str(good))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "slots_changed_query: 0 row(s) changed recently" in result.stdout

    broken = _with_source_keys(
        config, slots_changed_query="SELECT product_id FROM no_such_table WHERE x >= :since"
    )
    result = cli("check", "--config", str(broken))
    assert result.returncode == 1, result.stdout
    assert "slots_changed_query failed: no such table: no_such_table" in result.stdout
