"""Two daemons on one PostgreSQL state store: one scans (it holds the scanner lease), both
deliver. When the scanner dies (SIGKILL) or stops (SIGTERM), the other takes over scanning
and a change made afterwards still reaches Seyaha.

The lease here is [state] scanner_lease = 2 s and the polls come every 0.2 s, so a takeover
takes a few seconds; the tests wait up to WAIT_S (30 s) for it, which a lease of 120 s, as
before scanner_lease existed, could never meet. The measured time is printed, not asserted.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from typing import Any

import pytest
import sqlalchemy as sa

from tests.acceptance.conftest import WAIT_S, SandboxClient, Setup, write_config
from tests.acceptance.test_resilience import Daemon
from tests.conftest import SECRET

pytestmark = pytest.mark.postgres

SCANNER_LEASE_S = 2.0
"""[state] scanner_lease of these tests: the shortest the configuration allows."""


# -- the daemons and the lease ----------------------------------------------------------------


@pytest.fixture
def pair(
    setup: Setup, new_database: Callable[[str], str], sandbox: SandboxClient
) -> Iterator[tuple[list[Daemon], sa.Engine]]:
    """Two daemons on one new PostgreSQL state store, the same inventory and sandbox, each
    with its own metrics port (port 0); and an engine on that store. Both are killed at the
    end whatever happened."""
    state_url = new_database("postgresql")
    write_config(
        setup.folder,
        setup.sandbox_url,
        extra=f'\n[state]\nurl = "{state_url}"\nscanner_lease = {SCANNER_LEASE_S}\n',
    )
    store = sa.create_engine(state_url)
    started: list[Daemon] = []
    try:
        started += [Daemon(setup, "first"), Daemon(setup, "second")]
        yield started, store
    finally:
        for daemon in started:
            daemon.close()
            assert SECRET not in daemon.output()
        store.dispose()


def events(daemon: Daemon, *names: str) -> list[str]:
    """The events among `names` in the daemon's JSON log, oldest first."""
    found = []
    for line in daemon.output().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") in names:
            found.append(record["event"])
    return found


def holder_pid(store: sa.Engine) -> int | None:
    """The pid part of the scanner lease's holder ("<hostname>:<pid>:<8 hex>"), if any."""
    with store.connect() as conn:
        try:
            holder = conn.execute(
                sa.text("SELECT holder FROM seyaha_leases WHERE name = 'scanner'")
            ).scalar()
        except sa.exc.ProgrammingError:
            return None  # the first daemon has not created the schema yet
    return None if holder is None else int(holder.split(":")[-2])


def outbox_rows(store: sa.Engine) -> int:
    """Messages in the shared store's outbox (a delivered one is deleted)."""
    with store.connect() as conn:
        return int(conn.execute(sa.text("SELECT COUNT(*) FROM seyaha_outbox")).scalar_one())


def wait(probe: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"waited {WAIT_S} s for {what}")


def scanner_and_standby(
    daemons: list[Daemon], store: sa.Engine, sandbox: SandboxClient
) -> tuple[Daemon, Daemon]:
    """Once the baseline went out and the standby has said so: (scanner, standby)."""
    sandbox.wait_for(
        lambda calls: [(c["endpoint"], c["status"]) for c in calls] == [("trigger", 200)],
        "the baseline trigger",
    )
    pid = wait(lambda: holder_pid(store), "an agent to hold the scanner lease")
    by_pid = {daemon.pid: daemon for daemon in daemons}
    assert pid in by_pid, f"the lease names pid {pid}, not one of {sorted(by_pid)}"
    scanner = by_pid[pid]
    standby = next(daemon for daemon in daemons if daemon is not scanner)
    wait(lambda: events(standby, "scan.standby"), "the other agent to stand by")
    # The trigger recorded as delivered, not only received: killed between Seyaha's answer
    # and that record, the scanner would leave it leased (delivery.lease, 60 s on a shared
    # store, as the README says), and the survivor's notify would wait behind it.
    wait(lambda: outbox_rows(store) == 0, "the baseline trigger to be recorded as delivered")
    assert events(scanner, "scan.leader"), scanner.output()
    assert events(standby, "scan.leader") == [], standby.output()
    return scanner, standby


def change_and_wait(setup: Setup, sandbox: SandboxClient, stopped_at: float) -> float:
    """Book a seat on t1 and wait for its notify; seconds from `stopped_at` (time.time() of
    the scanner's end) to the notify's arrival at the sandbox."""
    setup.inventory.execute("UPDATE slots SET vacancies = 3 WHERE id = 't1'")

    def arrived(call: dict[str, Any]) -> bool:
        body = call["body"] or {}
        return (
            call["endpoint"] == "notify"
            and call["status"] == 200
            and body.get("availabilityId") == "t1"
            and body.get("vacancies") == 3
        )

    calls = sandbox.wait_for(
        lambda calls: any(arrived(c) for c in calls), "the notify for t1 from the survivor"
    )
    notify = next(c for c in calls if arrived(c))
    return datetime.fromisoformat(notify["at"]).timestamp() - stopped_at


def assert_took_over(survivor: Daemon, store: sa.Engine) -> None:
    assert holder_pid(store) == survivor.pid
    assert survivor.proc.poll() is None, survivor.output()
    # it stood by while the other scanned, then took the lease over: once each
    assert events(survivor, "scan.standby", "scan.leader") == ["scan.standby", "scan.leader"]


# -- the tests ---------------------------------------------------------------------------------


def test_when_the_scanner_is_killed_the_other_agent_takes_over_scanning_within_its_lease(
    setup: Setup, sandbox: SandboxClient, pair: tuple[list[Daemon], sa.Engine]
) -> None:
    daemons, store = pair
    scanner, survivor = scanner_and_standby(daemons, store, sandbox)

    scanner.proc.send_signal(signal.SIGKILL)
    killed_at = time.time()
    assert scanner.proc.wait(WAIT_S) == -signal.SIGKILL
    took = change_and_wait(setup, sandbox, killed_at)

    print(
        f"\nSIGKILL of the scanner -> the next change at the sandbox: {took:.2f} s "
        f"(scanner_lease {SCANNER_LEASE_S:g} s + poll_interval 0.2 s; waited up to {WAIT_S:g} s)"
    )
    assert_took_over(survivor, store)
    code, _ = survivor.terminate()
    assert code == 0, survivor.output()


def test_when_the_scanner_stops_cleanly_it_hands_scanning_over_at_once(
    setup: Setup, sandbox: SandboxClient, pair: tuple[list[Daemon], sa.Engine]
) -> None:
    daemons, store = pair
    scanner, survivor = scanner_and_standby(daemons, store, sandbox)

    stopped_at = time.time()
    code, _ = scanner.terminate()
    assert code == 0, scanner.output()
    assert holder_pid(store) != scanner.pid  # given up on the way out, not left to run out
    took = change_and_wait(setup, sandbox, stopped_at)

    print(
        f"\nSIGTERM of the scanner -> the next change at the sandbox: {took:.2f} s "
        f"(poll_interval 0.2 s; waited up to {WAIT_S:g} s)"
    )
    assert_took_over(survivor, store)
    code, _ = survivor.terminate()
    assert code == 0, survivor.output()
