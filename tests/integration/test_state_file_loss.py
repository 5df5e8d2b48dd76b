"""A SQLite state file deleted, replaced or emptied: the agent says it once and stops using
it, and the next start resends every slot instead of taking a silent baseline.

Real SQLite inventory and state files, a real sandbox; the agent in this process.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from agent.app import Agent
from agent.sandbox import Sandbox
from agent.source.reader import SourceReader
from agent.store import StateStore
from agent.store.identity import StateFileLost, watch_state_file
from agent.store.lock import LockRecord
from tests.integration.inventory import Inventory, calls, first_day, seed_tours

DRAIN_S = 60.0
"""A ceiling, not an expectation: drain returns as soon as the outbox is empty."""

LOSSES = ["deleted", "replaced", "truncated", "deleted with its lock file"]
EMPTYING = ["deleted", "truncated", "deleted with its lock file"]
"""The losses after which the path holds no store, or an empty one."""


@pytest.fixture
def rig(
    make_inventory: Callable[[str], Inventory],
    make_reader: Callable[..., SourceReader],
    make_sandbox: Callable[..., Sandbox],
    make_agent: Callable[..., Agent],
    tmp_path: Path,
) -> Rig:
    inventory = make_inventory("sqlite")
    seed_tours(inventory, first_day())
    sandbox = make_sandbox(catalog=make_reader(inventory.url).catalog_keys)
    return Rig(inventory, sandbox, make_agent, tmp_path / "state" / "state.db")


class Rig:
    def __init__(
        self,
        inventory: Inventory,
        sandbox: Sandbox,
        make_agent: Callable[..., Agent],
        state: Path,
    ) -> None:
        self.inventory = inventory
        self.sandbox = sandbox
        self._make_agent = make_agent
        self.state = state
        self.lock = state.with_name(state.name + ".lock")
        self._made = 0

    def agent(self) -> Agent:
        """An agent on the state file, opened as the daemon opens it (holding the lock)."""
        self._made += 1
        return self._make_agent(
            f"agent-{self._made}",
            exclusive=True,
            base_url=self.sandbox.url,
            source_url=self.inventory.url,
            state_url=f"sqlite:///{self.state}",
        )

    def lose(self, loss: str) -> None:
        if loss == "deleted":
            self.state.unlink()
        elif loss == "deleted with its lock file":  # rm state.db*
            for path in self.state.parent.glob(self.state.name + "*"):
                path.unlink()
        elif loss == "replaced":  # a copy put in its place, as a restore would
            copy = self.state.with_name("copy.db")
            shutil.copyfile(self.state, copy)
            os.replace(copy, self.state)
        elif loss == "truncated":
            os.truncate(self.state, 0)
        else:
            raise AssertionError(loss)


def delivered(agent: Agent) -> None:
    result = agent.drain(DRAIN_S)
    assert (result.timed_out, result.paused_reason, result.stats.pending) == (False, None, 0)


def events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


def slots_notified(sandbox: Sandbox) -> dict[str, Any]:
    """The last notify body the sandbox received for each slot."""
    return {
        c.body["availabilityId"]: c.body
        for c in calls(sandbox)
        if c.endpoint == "notify" and c.body is not None
    }


@contextmanager
def held_open(*paths: Path) -> Iterator[Callable[[], list[tuple[int, int]]]]:
    """The files at `paths`, held open (they stay readable once unlinked): yields a function
    returning their (size, modification time) now."""
    handles = [os.open(path, os.O_RDONLY) for path in paths]
    try:
        yield lambda: [(os.fstat(fd).st_size, os.fstat(fd).st_mtime_ns) for fd in handles]
    finally:
        for fd in handles:
            os.close(fd)


@pytest.mark.parametrize("loss", LOSSES)
def test_a_state_file_lost_under_the_agent_is_said_once_and_nothing_more_is_written_to_it(
    rig: Rig, loss: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    agent = rig.agent()
    told: list[StateFileLost] = []
    agent.on_state_lost = told.append
    assert agent.scan().baseline
    delivered(agent)
    assert LockRecord.parse(rig.lock.read_text()) == LockRecord(os.getpid(), True)

    wal = rig.state.with_name(rig.state.name + "-wal")
    with held_open(rig.state, wal) as written:
        rig.lose(loss)
        lost = written()
        rig.inventory.update_slot(101, vacancies=7)
        with pytest.raises(StateFileLost) as refused:
            agent.scan()
        assert agent.guarded(agent.poll) is False
        assert agent.state_lost is not None
        with pytest.raises(StateFileLost):
            agent.drain(DRAIN_S)
        with pytest.raises(StateFileLost):
            agent.store.admin.stats()
        with pytest.raises(StateFileLost):
            agent.store.queue.claim(agent.clock.now(), limit=10, lease_s=30)
        assert written() == lost, "the lost file was written after the loss was found"

    problem = "truncated" if loss == "truncated" else loss.split()[0]
    assert refused.value.problem == problem
    assert [lost.problem for lost in told] == [problem]
    said = events(caplog, "state.lost")
    assert len(said) == 1
    assert said[0].levelno == logging.ERROR
    assert str(rig.state) in said[0].getMessage()
    assert [c.endpoint for c in calls(rig.sandbox)] == ["trigger"]  # 101's change not sent
    assert any(p.startswith("state store unreachable: ") for p in agent.readiness())

    agent.close()
    # The next start learns that a baseline was recorded here, whatever was deleted.
    assert LockRecord.parse(rig.lock.read_text()) == LockRecord(os.getpid(), True)
    if loss == "truncated":
        assert rig.state.stat().st_size == 0  # as the operator left it, WAL copied back or not


@pytest.mark.parametrize("loss", EMPTYING)
def test_the_start_after_a_loss_resends_every_slot_including_one_changed_meanwhile(
    rig: Rig, loss: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    first = rig.agent()
    assert first.scan().baseline
    delivered(first)
    rig.lose(loss)
    rig.inventory.update_slot(101, vacancies=7)
    assert first.guarded(first.poll) is False
    first.close()

    second = rig.agent()
    resync = events(caplog, "state.resync")
    assert len(resync) == 1
    assert resync[0].levelno == logging.WARNING
    assert str(rig.state) in resync[0].getMessage()
    assert str(rig.lock) in resync[0].getMessage()
    report = second.poll()
    assert report is not None
    assert (report.triggers, report.notifies) == (1, 8)
    delivered(second)
    assert [c.endpoint for c in calls(rig.sandbox)] == ["trigger", "trigger"] + ["notify"] * 8
    notified = slots_notified(rig.sandbox)
    assert sorted(notified) == ["101", "102", "103", "104", "105", "201", "202", "301"]
    assert notified["101"]["vacancies"] == 7
    second.close()

    # The resync is recorded as this store's baseline: the start after it is an ordinary one.
    caplog.clear()
    third = rig.agent()
    assert events(caplog, "state.resync") == []
    report = third.poll()
    assert report is not None
    assert (report.baseline, report.messages) == (False, 0)


def test_after_a_replacement_the_agent_goes_on_from_the_file_now_in_place(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """A copy of the store put in its place (a restore) holds a baseline: no resync, and
    what changed since the copy is found by comparing with it."""
    caplog.set_level(logging.INFO, logger="agent")
    first = rig.agent()
    assert first.scan().baseline
    delivered(first)
    rig.lose("replaced")
    rig.inventory.update_slot(101, vacancies=7)
    assert first.guarded(first.poll) is False
    first.close()

    second = rig.agent()
    report = second.poll()
    assert report is not None
    assert (report.baseline, report.triggers, report.notifies) == (False, 0, 1)
    delivered(second)
    assert slots_notified(rig.sandbox)["101"]["vacancies"] == 7
    assert events(caplog, "state.resync") == []


def test_a_store_deleted_while_the_agent_was_stopped_is_resynced(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    first = rig.agent()
    assert first.scan().baseline
    delivered(first)
    first.close()
    for suffix in ("", "-wal", "-shm"):
        rig.state.with_name(rig.state.name + suffix).unlink(missing_ok=True)
    rig.inventory.update_slot(202, vacancies=1)

    report = rig.agent().scan()  # as `once` does
    assert (report.triggers, report.notifies) == (1, 8)
    assert len(events(caplog, "state.resync")) == 1


def test_a_first_run_is_a_plain_baseline_even_after_one_that_stopped_before_its_baseline(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    interrupted = rig.agent()  # opened, the lock file written, then stopped before a scan
    interrupted.close()
    assert LockRecord.parse(rig.lock.read_text()) == LockRecord(os.getpid(), False)
    rig.state.unlink()

    agent = rig.agent()
    report = agent.poll()
    assert report is not None
    assert (report.baseline, report.triggers, report.notifies) == (True, 1, 0)
    assert events(caplog, "state.resync") == []
    assert LockRecord.parse(rig.lock.read_text()) == LockRecord(os.getpid(), True)


@pytest.mark.parametrize(
    "evidence",
    ["a lock file written before the baseline line", "a schema upgrade's copy"],
)
def test_other_evidence_of_an_earlier_store_also_means_a_resync(
    rig: Rig, evidence: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="agent")
    rig.state.parent.mkdir(parents=True)
    if evidence == "a schema upgrade's copy":
        rig.state.with_name(rig.state.name + ".schema-1.bak").write_bytes(b"")
    else:
        rig.lock.write_text("4242\n", encoding="ascii")

    report = rig.agent().scan()
    assert (report.triggers, report.notifies) == (1, 8)
    assert len(events(caplog, "state.resync")) == 1


def test_an_untouched_state_file_is_never_taken_for_lost(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    """Checkpoints, growth and a restart on the same file are not a loss."""
    caplog.set_level(logging.INFO, logger="agent")
    agent = rig.agent()
    agent.scan()
    delivered(agent)
    for vacancies in range(5):
        rig.inventory.update_slot(101, vacancies=vacancies)
        agent.scan()
        delivered(agent)
    with agent.store.engine.connect() as conn:
        conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    agent.store.admin.purge_dead(older_than=agent.clock.now() - timedelta(days=1))
    assert agent.state_lost is None
    agent.close()
    again = rig.agent()
    assert again.poll() is not None
    assert events(caplog, "state.lost") == events(caplog, "state.resync") == []


def test_a_command_on_the_outbox_refuses_a_state_file_lost_meanwhile(tmp_path: Path) -> None:
    state = tmp_path / "state.db"
    store = StateStore.from_url(f"sqlite:///{state}")
    try:
        store.open()
        assert watch_state_file(store.engine) is not None
        assert store.admin.stats().pending == 0
        os.truncate(state, 0)
        with pytest.raises(StateFileLost) as refused:
            store.admin.purge_dead(older_than=None)
        assert str(refused.value).startswith(f"the state file {state} was emptied (0 bytes)")
    finally:
        store.close()
