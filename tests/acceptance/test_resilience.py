"""The daemon as a real process against the real sandbox process, through outages, SIGKILL,
SIGTERM and a second daemon on the same state.

The daemon's output goes to files (a burst logs far more than a pipe holds). Waits are
generous ceilings; nothing asserts on how long delivery took.
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.acceptance.conftest import (
    Inventory,
    SandboxClient,
    Setup,
    agent_env,
    cli,
    write_config,
)
from tests.conftest import SECRET
from tests.misbehaving import MisbehavingSeyaha

LONG_WAIT_S = 120.0
"""Ceiling for a burst to get through on a slow, busy machine; never an expectation."""

OFFSET = "+03:00"
"""Europe/Istanbul, the zone of the acceptance configuration (no DST since 2016)."""


# -- the sandbox and the daemon as processes ---------------------------------------------------


class QuietSandbox:
    """`seyaha-agent sandbox` as a process whose output is read as it comes: it prints a line
    per call, and a burst of calls would otherwise fill the pipe and freeze it."""

    def __init__(self, config: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "sandbox", "--port", "0", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=agent_env(),
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if "listening on" not in first:
            self.proc.kill()
            self.proc.communicate()
            raise RuntimeError(f"sandbox did not start: {first!r}")
        self.url = first.rsplit(" ", 1)[-1].strip()
        self.lines: list[str] = [first]
        self._reader = threading.Thread(target=self._read, name="sandbox-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._reader.join(10)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        return "".join(self.lines)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Setup]:
    """Like the `setup` fixture, with a sandbox that can take thousands of calls."""
    inventory = Inventory(tmp_path / "inventory.db")
    config = write_config(tmp_path, "http://127.0.0.1:9")
    sandbox = QuietSandbox(config)
    write_config(tmp_path, sandbox.url)
    try:
        yield Setup(tmp_path, config, inventory, sandbox.url)
    finally:
        output = sandbox.stop()
        assert SECRET not in output


@pytest.fixture
def receiver(rig: Setup) -> SandboxClient:
    return SandboxClient(rig.sandbox_url)


class Daemon:
    """`python -m agent run` with its output in files under the test's folder."""

    def __init__(self, setup: Setup, name: str) -> None:
        self.out_path = setup.folder / f"{name}.stdout"
        self.err_path = setup.folder / f"{name}.stderr"
        self._files: list[IO[str]] = [
            self.out_path.open("w", encoding="utf-8"),
            self.err_path.open("w", encoding="utf-8"),
        ]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(setup.config)],
            stdout=self._files[0],
            stderr=self._files[1],
            text=True,
            env=agent_env(),
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.out_path.read_text(encoding="utf-8") + self.err_path.read_text(encoding="utf-8")

    def terminate(self, timeout: float = 60) -> tuple[int, float]:
        """SIGTERM; (exit code, seconds until it exited)."""
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout)
        return code, time.monotonic() - started

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
        for handle in self._files:
            handle.close()


@pytest.fixture
def daemons() -> Iterator[Callable[[Setup, str], Daemon]]:
    started: list[Daemon] = []

    def start(setup: Setup, name: str) -> Daemon:
        daemon = Daemon(setup, name)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()


# -- looking at the inventory, the receiver and the outbox ----------------------------------


def wait(condition: Callable[[], Any], what: str, timeout: float = LONG_WAIT_S) -> Any:
    """Poll `condition` until it returns something truthy, which is returned."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(0.25)


def expected_view(setup: Setup, ids: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """The notify body Seyaha should hold for each slot, from the inventory as it is now."""
    with contextlib.closing(sqlite3.connect(setup.inventory.path)) as db:
        rows = db.execute(
            "SELECT o.product_id, s.option_id, s.id, s.starts_at, s.status, s.vacancies, "
            "s.capacity FROM slots s JOIN options o ON o.id = s.option_id"
        ).fetchall()
    view = {}
    for product, option, slot_id, starts, status, vacancies, capacity in rows:
        if ids is not None and slot_id not in ids:
            continue
        if status is None:
            if vacancies == 0:
                status = "SOLD_OUT"
            elif vacancies * 2 < capacity:
                status = "LIMITED"
            else:
                status = "AVAILABLE"
        view[slot_id] = {
            "productId": product,
            "optionId": option,
            "availabilityId": slot_id,
            "localDateTimeStart": starts + OFFSET,
            "status": status,
            "vacancies": vacancies,
            "capacity": capacity,
        }
    return view


def add_slots(setup: Setup, prefix: str, count: int) -> list[str]:
    """`count` more slots on the cruise, all AVAILABLE 20/20, in one transaction."""
    ids = [f"{prefix}{n:04d}" for n in range(count)]
    with contextlib.closing(setup.inventory.connect()) as db, db:
        db.executemany(
            "INSERT INTO slots VALUES (?, 'sunset', ?, NULL, 20, 20)",
            [
                (slot_id, f"2030-08-{1 + n % 28:02d}T{8 + n % 12:02d}:{n % 60:02d}:00")
                for n, slot_id in enumerate(ids)
            ],
        )
    return ids


def book_all(setup: Setup, ids: list[str], transactions: int) -> None:
    """A burst: one booking or more on every slot in `ids`, in a few transactions."""
    size = -(-len(ids) // transactions)
    for start in range(0, len(ids), size):
        with contextlib.closing(setup.inventory.connect()) as db, db:
            db.executemany(
                "UPDATE slots SET vacancies = ? WHERE id = ?",
                [(19 - n % 19, slot_id) for n, slot_id in enumerate(ids[start : start + size])],
            )


def notifies(calls: list[dict[str, Any]], status: int | None = None) -> list[dict[str, Any]]:
    return [
        c for c in calls if c["endpoint"] == "notify" and (status is None or c["status"] == status)
    ]


_BACKLOG = re.compile(r"backlog\s+(\d+) waiting \((\d+) in flight\), (\d+) dead")


def outbox_status(setup: Setup) -> tuple[str, tuple[int, int, int]]:
    """`outbox status`: its text and (waiting, in flight, dead)."""
    result = cli("outbox", "--config", str(setup.config), "status")
    assert result.returncode == 0, result.stdout + result.stderr
    assert SECRET not in result.stdout + result.stderr
    found = _BACKLOG.search(result.stdout)
    assert found, result.stdout
    waiting, in_flight, dead = (int(g) for g in found.groups())
    return result.stdout, (waiting, in_flight, dead)


_ROW = re.compile(r"^\s*(\d+)\s+(\w+)\s+(\w+)\s+\S+\s+(\d+)\s+(\S+)/(\S+)/(\S+) (\w+)$", re.M)


def pending_rows(setup: Setup) -> list[tuple[str, str]]:
    """(slot id, status) of each waiting notify, from `outbox list --state pending`."""
    result = cli("outbox", "--config", str(setup.config), "list", "--state", "pending")
    assert result.returncode == 0, result.stdout + result.stderr
    return [(m[7], m[8]) for m in _ROW.finditer(result.stdout)]


def configure(setup: Setup, extra: str) -> None:
    write_config(setup.folder, setup.sandbox_url, extra=extra)


# -- 10. an outage with changes during it -----------------------------------------------------


def test_changes_during_an_outage_arrive_once_per_slot_with_the_final_state(
    rig: Setup, receiver: SandboxClient, daemons: Callable[[Setup, str], Daemon]
) -> None:
    # Every retry reaches the failing receiver and none gives up: the breaker and the retry
    # budget are not what is tested here.
    configure(
        rig, "concurrency = 2\nrate_limit = 0\nbreaker_failures = 1000\nmax_attempts = 1000\n"
    )
    daemon = daemons(rig, "daemon")
    receiver.wait_for(lambda calls: [c["status"] for c in calls] == [200], "the baseline trigger")

    receiver.fail_next(503, count=1_000_000)  # Seyaha goes down
    # Each slot ends on a status it never had before, so the waiting row shows the final one.
    steps = [
        [("UPDATE slots SET vacancies = 18 WHERE id = 'c1'", "c1")],
        [
            ("UPDATE slots SET vacancies = 12 WHERE id = 'c1'", "c1"),
            ("UPDATE slots SET vacancies = 15 WHERE id = 'c2'", "c2"),
            ("UPDATE slots SET vacancies = 7 WHERE id = 't1'", "t1"),
        ],
        [
            ("UPDATE slots SET vacancies = 8 WHERE id = 'c1'", "c1"),
            ("UPDATE slots SET vacancies = 9 WHERE id = 'c2'", "c2"),
        ],
        [
            ("UPDATE slots SET vacancies = 0 WHERE id = 'c1'", "c1"),
            ("UPDATE slots SET status = 'CLOSED' WHERE id = 'c2'", "c2"),
            ("UPDATE slots SET vacancies = 0 WHERE id = 't1'", "t1"),
        ],
    ]
    changes = Counter[str]()
    for step in steps:
        refused = len(notifies(receiver.calls(), 503))
        for sql, slot_id in step:
            rig.inventory.execute(sql)
            changes[slot_id] += 1
        # Seyaha is still down and the daemon keeps trying between the steps
        receiver.wait_for(
            lambda calls, refused=refused: len(notifies(calls, 503)) > refused,
            "another refused notify",
        )
    final = {"c1": "SOLD_OUT", "c2": "CLOSED", "t1": "SOLD_OUT"}
    # One waiting row per slot, holding the final state: nothing older is left to send.
    wait(
        lambda: sorted(pending_rows(rig)) == sorted(final.items()),
        "one waiting notify per slot with the final state",
    )
    assert notifies(receiver.calls(), 200) == []

    receiver.fail_next(503, count=0)  # Seyaha is back
    expected = expected_view(rig)
    wait(lambda: receiver.slots() == expected, "the final state of every slot")
    wait(lambda: outbox_status(rig)[1][0] == 0, "an empty outbox")

    calls = receiver.calls()
    delivered = notifies(calls, 200)
    per_slot = Counter(c["body"]["availabilityId"] for c in delivered)
    made = sum(changes.values())
    ratio = len(delivered) / made
    print(
        f"\noutage: {made} slot changes ({dict(changes)}) -> {len(delivered)} notifies "
        f"delivered after recovery: {ratio:.2f} calls sent per slot change "
        f"({len(notifies(calls, 503))} refused during the outage)"
    )
    assert per_slot == {"c1": 1, "c2": 1, "t1": 1}, per_slot
    assert ratio < 1
    assert {c["body"]["availabilityId"]: c["body"] for c in delivered} == expected

    code, _ = daemon.terminate()
    assert code == 0, daemon.output()
    assert SECRET not in daemon.output()


# -- 11. SIGKILL in the middle of a burst -----------------------------------------------------


def test_sigkill_during_a_burst_loses_nothing_and_repeats_little(
    rig: Setup, receiver: SandboxClient, daemons: Callable[[Setup, str], Daemon]
) -> None:
    concurrency, batch_size, burst = 4, 20, 2000
    ids = add_slots(rig, "b", burst)
    # A rate limit keeps the burst going long enough to be interrupted (the restarted daemon
    # gives back at its start what the dead one had claimed: see the next test); a short
    # breaker cooldown keeps a hiccup of the busy machine from holding everything back.
    configure(
        rig,
        f"concurrency = {concurrency}\nbatch_size = {batch_size}\nrate_limit = 250\n"
        "rate_burst = 1\n"
        "connect_timeout = 1\ntimeout = 5\nbreaker_cooldown = 1\n",
    )
    first = daemons(rig, "first")
    receiver.wait_for(lambda calls: [c["status"] for c in calls] == [200], "the baseline trigger")

    book_all(rig, ids, transactions=4)
    wait(lambda: len(notifies(receiver.calls(), 200)) >= 100, "the burst to get going")
    first.proc.send_signal(signal.SIGKILL)
    assert first.proc.wait(30) == -signal.SIGKILL
    at_kill = len(notifies(receiver.calls(), 200))
    assert 100 <= at_kill < burst, f"the kill should land mid-burst ({at_kill} delivered)"

    second = daemons(rig, "second")
    expected = expected_view(rig, set(ids))
    wait(
        lambda: {k: v for k, v in receiver.slots().items() if k in expected} == expected,
        "every slot of the burst to reach the receiver",
    )
    wait(lambda: outbox_status(rig)[1][0] == 0, "an empty outbox")
    code, _ = second.terminate()
    assert code == 0, second.output()

    delivered = [c for c in notifies(receiver.calls(), 200) if c["body"]["availabilityId"] in ids]
    seen = Counter(json.dumps(c["body"], sort_keys=True) for c in delivered)
    duplicates = sum(n - 1 for n in seen.values())
    print(
        f"\nSIGKILL after {at_kill} of {burst} notifies: {duplicates} duplicate deliveries "
        f"after the restart (bound {concurrency} x {batch_size})"
    )
    # every slot of the burst arrived, each with its one new state and nothing else
    assert len(seen) == burst
    assert {json.loads(body)["availabilityId"] for body in seen} == set(ids)
    assert duplicates <= concurrency * batch_size
    assert receiver.slots() == expected_view(rig, set(receiver.slots()))
    for daemon in (first, second):
        assert SECRET not in daemon.output()


# -- 11b. SIGKILL while calls are in flight ------------------------------------------------

ORPHANED_LEASE_S = 600.0
"""delivery.lease of the test below: far beyond its waits, so that what the restarted daemon
sends was given back at its start, not by the dead one's lease running out."""


def test_what_a_killed_daemon_had_in_flight_goes_out_at_its_restart_not_after_its_lease(
    tmp_path: Path, daemons: Callable[[Setup, str], Daemon]
) -> None:
    inventory = Inventory(tmp_path / "inventory.db")
    with MisbehavingSeyaha("good") as receiver:
        config = write_config(
            tmp_path,
            receiver.url,
            extra=(
                "concurrency = 2\nbatch_size = 5\nconnect_timeout = 1\ntimeout = 5\n"
                f"lease = {ORPHANED_LEASE_S:g}\n"
            ),
        )
        setup = Setup(tmp_path, config, inventory, receiver.url)
        ids = add_slots(setup, "k", 20)
        first = daemons(setup, "first")
        wait(
            lambda: any(c.endpoint == "trigger" and c.delivered for c in receiver.calls()),
            "the baseline trigger",
        )

        # Seyaha answers in 1.5-2.5 s: the daemon is killed with calls in flight, and more
        # messages claimed behind them.
        receiver.set_behaviour("slow")
        book_all(setup, ids, transactions=1)
        in_flight = wait(
            lambda: {c.slot for c in receiver.calls() if c.slot in ids and c.ended_s is None},
            "a notify in flight",
        )
        first.proc.send_signal(signal.SIGKILL)
        assert first.proc.wait(30) == -signal.SIGKILL
        killed_at = time.monotonic()
        receiver.set_behaviour("good")

        second = daemons(setup, "second")
        wait(
            lambda: (
                in_flight
                <= {c.slot for c in receiver.calls() if c.arrived_s > killed_at and c.delivered}
            ),
            f"the notifies in flight at the kill ({sorted(in_flight)}) to be sent again",
        )
        expected = expected_view(setup, set(ids))
        wait(
            lambda: {k: v for k, v in receiver.slots().items() if k in expected} == expected,
            "every slot's new state",
        )
        wait(lambda: outbox_status(setup)[1] == (0, 0, 0), "an empty outbox")
        code, _ = second.terminate()
        assert code == 0, second.output()

    released = [
        json.loads(line)
        for line in second.output().splitlines()
        if '"outbox.leases_released"' in line
    ]
    assert len(released) == 1, second.output()
    assert released[0]["level"] == "warning"
    count = int(released[0]["msg"].split(" ", 1)[0])
    print(
        f"\nSIGKILL with {sorted(in_flight)} in flight: {count} message(s) given back at the restart"
    )
    assert len(in_flight) <= count <= len(ids)
    for daemon in (first, second):
        assert SECRET not in daemon.output()


# -- 12. SIGTERM during delivery ------------------------------------------------------------


def test_sigterm_during_delivery_exits_cleanly_and_the_next_run_sends_the_rest(
    rig: Setup, receiver: SandboxClient, daemons: Callable[[Setup, str], Daemon]
) -> None:
    grace = 5.0
    ids = add_slots(rig, "g", 300)
    # Slow delivery: each worker holds a claimed batch while it waits for the rate limit.
    configure(
        rig,
        f"concurrency = 2\nbatch_size = 50\nrate_limit = 20\nrate_burst = 1\n"
        f"shutdown_grace = {grace}\n",
    )
    first = daemons(rig, "first")
    receiver.wait_for(lambda calls: [c["status"] for c in calls] == [200], "the baseline trigger")
    book_all(rig, ids, transactions=1)
    wait(lambda: len(notifies(receiver.calls(), 200)) >= 10, "delivery to get going")

    code, took = first.terminate()
    output = first.output()
    assert code == 0, output
    assert took < grace + 25, f"exited {took:.1f} s after SIGTERM"
    assert '"event": "agent.stopped"' in output
    assert SECRET not in output
    sent_before = len(notifies(receiver.calls(), 200))
    assert sent_before < len(ids)
    _text, (waiting, in_flight, dead) = outbox_status(rig)
    # the claimed but unsent messages were given back, not left under a lease
    assert (in_flight, dead) == (0, 0)
    assert waiting == len(ids) - sent_before

    configure(rig, "concurrency = 2\nrate_limit = 0\n")
    second = daemons(rig, "second")
    expected = expected_view(rig, set(ids))
    wait(
        lambda: {k: v for k, v in receiver.slots().items() if k in expected} == expected,
        "the rest of the changes",
    )
    wait(lambda: outbox_status(rig)[1][0] == 0, "an empty outbox")
    code, _ = second.terminate()
    assert code == 0, second.output()
    assert SECRET not in second.output()
    per_slot = Counter(c["body"]["availabilityId"] for c in notifies(receiver.calls(), 200))
    assert per_slot == dict.fromkeys(ids, 1)  # nothing lost, nothing sent twice


# -- 13. one daemon per SQLite state ----------------------------------------------------------


def test_a_second_daemon_on_the_same_sqlite_state_is_refused(
    rig: Setup, receiver: SandboxClient, daemons: Callable[[Setup, str], Daemon]
) -> None:
    first = daemons(rig, "first")
    receiver.wait_for(lambda calls: [c["status"] for c in calls] == [200], "the baseline trigger")

    second = cli("run", "--config", str(rig.config), timeout=60)
    assert second.returncode == 1, second.stdout + second.stderr
    state = Path(rig.folder / "state.db").resolve()
    assert (
        f"another seyaha-agent (pid {first.pid}) is already using the state store {state}"
        in second.stderr
    )
    assert "Stop the other one" in second.stderr
    assert SECRET not in second.stdout + second.stderr

    # the first one carries on undisturbed
    assert first.proc.poll() is None
    rig.inventory.execute("UPDATE slots SET vacancies = 3 WHERE id = 't1'")
    receiver.wait_for(
        lambda calls: any(c["status"] == 200 for c in notifies(calls)), "the notify for t1"
    )
    code, _ = first.terminate()
    assert code == 0
    assert SECRET not in first.output()
    assert receiver.slots()["t1"] == expected_view(rig)["t1"]
