"""The daemon's JSON log when the server kills its source connection in the middle of a scan.

The failure is the agent's own event (source.unavailable, then source.recovered), and every
line of the log is one JSON object of the agent's formatter with a one-line message: no
Python warning printed raw and no traceback from the database pool discarding the dead
connection. The daemon runs with Python's warnings shown (PYTHONWARNINGS=default, what
`python -X dev` or a debugging operator turns on), so a warning raised by the kill is seen.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

from agent.sandbox import Sandbox
from tests.acceptance.conftest import WAIT_S, agent_env
from tests.conftest import INTEGRATION_ID, PG_ADMIN_URL, SECRET
from tests.integration import inventory as partner
from tests.integration.inventory import first_day, seed_tours, wait_until
from tests.log_lines import json_lines

HOLD_S = 600
"""How long the slots query sleeps while the test holds it: far longer than the test waits,
so the only way out is the kill."""

HOLD_SQL = f"""
CREATE TABLE hold (held boolean);
CREATE FUNCTION seyaha_test_hold() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  IF EXISTS (SELECT 1 FROM hold) THEN PERFORM pg_sleep({HOLD_S}); END IF;
  RETURN true;
END $$
"""
"""A slots query calling seyaha_test_hold() sleeps while the table `hold` has a row."""


class DaemonLog:
    """`seyaha-agent run` as a process; its standard error (the JSON log) read as it comes."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=agent_env(PYTHONWARNINGS="default"),
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        found = []
        for line in list(self.lines):
            try:
                found.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return found

    def saw(self, name: str) -> bool:
        return any(body.get("event") == name for body in self.events())

    def stop(self) -> tuple[int, str]:
        """SIGTERM, then its exit code and standard output."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=WAIT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(WAIT_S)
        assert self.proc.stdout is not None
        out = self.proc.stdout.read()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return self.proc.returncode, out


def _held_scan(admin: sa.Engine, database: str) -> int | None:
    """The agent's source backend while it sleeps in seyaha_test_hold(), if it does."""
    with admin.connect() as conn:
        pid = conn.execute(
            sa.text(
                "SELECT pid FROM pg_stat_activity WHERE datname = :db "
                "AND application_name = 'seyaha-agent-source' AND wait_event = 'PgSleep'"
            ),
            {"db": database},
        ).scalar()
    return None if pid is None else int(pid)


@pytest.mark.postgres
def test_a_scan_killed_by_the_server_leaves_only_json_lines_of_the_agents_events(
    tmp_path: Path, new_database: Callable[[str], str]
) -> None:
    inventory = partner.Inventory.create("postgresql", new_database("postgresql"))
    sandbox = Sandbox(secret=SECRET, integration_id=INTEGRATION_ID, port=0).start()
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    daemon: DaemonLog | None = None
    try:
        seed_tours(inventory, first_day())
        with inventory.engine.begin() as conn:
            conn.exec_driver_sql(HOLD_SQL)
        config = partner.write_config(
            tmp_path,
            name="agent",
            base_url=sandbox.url,
            integration_id=INTEGRATION_ID,
            secret=SECRET,
            source_url=inventory.url,
            state_url=f"sqlite:///{tmp_path / 'state.db'}",
            slots_query=partner.SLOTS_QUERY + "WHERE seyaha_test_hold()\n",
            # Every slot read by each poll (no range digests), so that the held query is
            # the read the kill cuts and the scan carries on (scan.resuming).
            source={"range_digests": False},
        )
        with config.open("a", encoding="utf-8") as extra:
            extra.write('\n[metrics]\nlisten = "127.0.0.1:0"\n')
        database = str(sa.engine.make_url(inventory.url).database)

        daemon = DaemonLog(config)
        wait_until(lambda: daemon.saw("scan.baseline"), "the first scan", timeout_s=WAIT_S)

        with inventory.engine.begin() as conn:
            conn.exec_driver_sql("INSERT INTO hold VALUES (true)")
        wait_until(lambda: _held_scan(admin, database) is not None, "a scan to be held")
        pid = _held_scan(admin, database)
        with inventory.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM hold")  # the next scans run through
        with admin.connect() as conn:
            assert conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid}).scalar()

        # The scan carries on in a new transaction after the last slot it read.
        wait_until(lambda: daemon.saw("scan.resuming"), "the cut scan", timeout_s=WAIT_S)
        wait_until(lambda: _scanned_after_the_cut(daemon), "the scan to end", timeout_s=WAIT_S)
        code, out = daemon.stop()
    finally:
        if daemon is not None and daemon.proc.poll() is None:
            daemon.stop()
        admin.dispose()
        sandbox.stop()
        inventory.close()

    assert code == 0, "\n".join(daemon.lines)
    assert out == ""
    log = "\n".join(daemon.lines)
    assert "Traceback" not in log
    lines = json_lines(log)
    for body in lines:
        assert {"ts", "level", "event", "msg"} <= body.keys(), body
        assert "\n" not in body["msg"], body
    # Not even folded into one line: the scan closes its own cursors as it fails (both the
    # source's server-side cursor and the state store's), so nothing is left for the garbage
    # collector to warn about or for the pool to trip over.
    assert [b for b in lines if b["event"] in ("python.warning", "db.connection_discarded")] == []
    (cut,) = [b for b in lines if b["event"] == "scan.resuming"]
    assert cut["level"] == "warning"
    assert cut["msg"].startswith("slots_query ")
    assert "terminating connection due to administrator command" in cut["msg"]
    assert [b for b in lines if b["event"] in ("source.unavailable", "scan.failed")] == []


def _scanned_after_the_cut(daemon: DaemonLog) -> bool:
    names = [body.get("event") for body in daemon.events()]
    cut = names.index("scan.resuming")
    return any(name in ("scan.unchanged", "scan.changes") for name in names[cut + 1 :])
