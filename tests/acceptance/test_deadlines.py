"""Every timeout is a deadline: the real CLI against a receiver that trickles its answers
(tests/misbehaving.py) ends each call, `once --timeout`, and a SIGTERM when README says.

A `trickle_head` answer sends its status line and headers a byte a second (about 99 s), a
`trickle` answer its body (38 s): every single read comes within any per-read timeout, so
only a deadline on the whole call ends it. The bounds below are ceilings for a slow, loaded
machine, each far below what the trickle alone would take.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from agent.delivery.worker import INTERRUPTED_RECORD_S
from tests.acceptance.conftest import Inventory, Setup, cli, write_config
from tests.acceptance.test_misbehaving_seyaha import (
    Stand,
    assert_outage_promises,
    finish,
    misbehave_during_changes,
    stand,  # noqa: F401 - a fixture
    wait_until_every_change_arrived,
)
from tests.acceptance.test_resilience import Daemon, add_slots, wait
from tests.misbehaving import Behaviour, MisbehavingSeyaha

CONNECT_TIMEOUT_S = 1.0
TIMEOUT_S = 2.0
REQUEST_S = CONNECT_TIMEOUT_S + TIMEOUT_S
"""A call's deadline (seconds)."""

LATE_S = 10.0
"""How far past its promised end something may finish on a slow, loaded machine, process
start included (seconds): a ceiling, never an expectation."""

LONG_GRACE_S = 60.0
"""A shutdown_grace longer than any bound here: what ends a call is its deadline, not this."""

ONCE_TIMEOUT_S = 3.0
STUCK_WORKERS = 4
"""delivery.concurrency, each worker taking one message at a time (batch_size = 1)."""


def delivery(*, timeout_s: float = TIMEOUT_S, grace_s: float = LONG_GRACE_S) -> str:
    lease_s = 2 * (CONNECT_TIMEOUT_S + timeout_s) + 1
    return (
        f"connect_timeout = {CONNECT_TIMEOUT_S}\ntimeout = {timeout_s}\nlease = {lease_s}\n"
        f"shutdown_grace = {grace_s}\nconcurrency = {STUCK_WORKERS}\nbatch_size = 1\n"
        "breaker_failures = 1000\nmax_attempts = 1000\n"
    )


@dataclass
class Bench:
    setup: Setup
    receiver: MisbehavingSeyaha
    slots: list[str]

    @property
    def config(self) -> str:
        return str(self.setup.config)

    def book_every_slot(self) -> None:
        for slot in self.slots:
            self.setup.inventory.execute("UPDATE slots SET vacancies = 3 WHERE id = ?", slot)

    def calls_in_flight(self) -> int:
        return len([c for c in self.receiver.calls() if c.ended_s is None])

    def outbox(self) -> tuple[str, str]:
        """(`outbox status`, `outbox list`) as printed."""
        status = cli("outbox", "--config", self.config, "status")
        listed = cli("outbox", "--config", self.config, "list", "--state", "all")
        return status.stdout + status.stderr, listed.stdout + listed.stderr


@pytest.fixture
def bench(tmp_path: Path) -> Iterator[Callable[[str], Bench]]:
    """`bench(delivery)`: a SQLite inventory with STUCK_WORKERS more slots and a receiver
    answering correctly; the agent's configuration points at it."""
    receivers: list[MisbehavingSeyaha] = []

    def make(settings: str) -> Bench:
        receiver = MisbehavingSeyaha().start()
        receivers.append(receiver)
        inventory = Inventory(tmp_path / "inventory.db")
        config = write_config(tmp_path, receiver.url, extra=settings)
        setup = Setup(tmp_path, config, inventory, receiver.url)
        return Bench(setup, receiver, add_slots(setup, "d", STUCK_WORKERS))

    yield make
    for receiver in receivers:
        receiver.stop()


@pytest.fixture
def daemons() -> Iterator[Callable[[Setup], Daemon]]:
    started: list[Daemon] = []

    def start(setup: Setup) -> Daemon:
        daemon = Daemon(setup, f"daemon-{len(started)}")
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.close()


def baseline_delivered(receiver: MisbehavingSeyaha) -> bool:
    return any(c.endpoint == "trigger" and c.delivered for c in receiver.calls())


def test_headers_trickling_byte_by_byte_are_given_up_at_the_deadline_and_retried(
    stand: Callable[..., Stand],  # noqa: F811 - the fixture imported above
) -> None:
    """Each call ended only when its head was complete, about 99 s: past its 7 s lease, so
    other workers sent the same slots meanwhile."""
    s = stand()
    misbehave_during_changes(s, "trickle_head")
    wait_until_every_change_arrived(s)
    finish(s)

    trickled = [c for c in s.receiver.calls() if c.behaviour == "trickle_head"]
    assert trickled
    assert not [c for c in trickled if c.answered], "a trickling head was waited out"
    longest = max(c.duration_s or float("inf") for c in trickled)
    print(f"longest trickling call: {longest:.1f} s")
    assert longest < REQUEST_S + LATE_S, f"a trickling call lasted {longest:.1f} s"
    assert_outage_promises(s)


@pytest.mark.parametrize("behaviour", ["trickle_head", "trickle"])
def test_once_returns_at_its_timeout_plus_one_call_however_seyaha_trickles(
    bench: Callable[[str], Bench], behaviour: Behaviour
) -> None:
    b = bench(delivery())
    assert cli("once", "--config", b.config).returncode == 0  # the baseline
    b.receiver.set_behaviour(behaviour)
    b.book_every_slot()

    started = time.monotonic()
    result = cli("once", "--config", b.config, "--timeout", f"{ONCE_TIMEOUT_S:g}")
    took = time.monotonic() - started

    print(f"once --timeout {ONCE_TIMEOUT_S:g} took {took:.1f} s")
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"still waiting: {STUCK_WORKERS} message(s): timed out" in result.stdout
    assert "timed out: " in result.stdout  # the last problem: the calls' own deadline
    assert took < ONCE_TIMEOUT_S + REQUEST_S + LATE_S, result.stdout


def test_sigterm_ends_run_at_the_calls_deadline_when_every_worker_is_stuck_in_a_trickle(
    bench: Callable[[str], Bench], daemons: Callable[[Setup], Daemon]
) -> None:
    """The workers used to wait out the whole grace (here 60 s), then the process exited
    with the calls still open and their messages leased."""
    b = bench(delivery())
    daemon = daemons(b.setup)
    wait(lambda: baseline_delivered(b.receiver), "the baseline trigger", timeout=60)
    b.receiver.set_behaviour("trickle_head")
    b.book_every_slot()
    wait(lambda: b.calls_in_flight() >= STUCK_WORKERS, "every worker in a trickling call")

    code, took = daemon.terminate(timeout=2 * LONG_GRACE_S)

    print(f"stopped in {took:.1f} s")
    assert code == 0, daemon.output()[-2000:]
    assert took < REQUEST_S + LATE_S, daemon.output()[-2000:]
    status, listed = b.outbox()
    assert f"{STUCK_WORKERS} waiting (0 in flight)" in status, status
    assert "timed out: no answer within 3 s (connect_timeout + timeout)" in listed, listed


def test_calls_in_flight_when_the_grace_ends_are_cut_and_sent_again_at_the_next_start(
    bench: Callable[[str], Bench], daemons: Callable[[Setup], Daemon]
) -> None:
    """shutdown_grace (1 s) is shorter than a call may take (21 s): the process used to exit
    with the calls abandoned and their messages leased, unsendable by the next start until
    the lease (43 s) ran out."""
    grace_s, timeout_s = 1.0, 20.0
    b = bench(delivery(timeout_s=timeout_s, grace_s=grace_s))
    daemon = daemons(b.setup)
    wait(lambda: baseline_delivered(b.receiver), "the baseline trigger", timeout=60)
    b.receiver.set_behaviour("trickle_head")
    b.book_every_slot()
    wait(lambda: b.calls_in_flight() >= STUCK_WORKERS, "every worker in a trickling call")

    code, took = daemon.terminate(timeout=2 * LONG_GRACE_S)

    print(f"stopped in {took:.1f} s")
    assert code == 0, daemon.output()[-2000:]
    assert took < grace_s + INTERRUPTED_RECORD_S + LATE_S, daemon.output()[-2000:]
    status, listed = b.outbox()
    assert f"{STUCK_WORKERS} waiting (0 in flight)" in status, status
    assert listed.count("cut short: the agent was stopping") == STUCK_WORKERS, listed

    b.receiver.set_behaviour("good")
    daemons(b.setup)
    wait(
        lambda: {c.slot for c in b.receiver.calls() if c.delivered} >= set(b.slots),
        "the cut calls' slots delivered by the next start",
        timeout=timeout_s,  # their lease would have kept them 43 s
    )
