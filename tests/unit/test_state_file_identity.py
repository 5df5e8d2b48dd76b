"""The pure decisions about a SQLite state file: was it lost under the agent, and does a store
without a baseline at start mean a first run or a lost store?"""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.store.identity import FileIdentity, Problem, file_problem, lost_message
from agent.store.lock import LockRecord, evidence_of_a_lost_store

OPENED = FileIdentity(device=2049, inode=1234, holds_data=True)


@pytest.mark.parametrize(
    ("current", "problem"),
    [
        pytest.param(OPENED, None, id="the same file"),
        pytest.param(
            FileIdentity(2049, 1234, holds_data=True), None, id="the same file, grown or shrunk"
        ),
        pytest.param(None, "deleted", id="nothing at the path"),
        pytest.param(FileIdentity(2049, 5678, holds_data=True), "replaced", id="another inode"),
        pytest.param(
            FileIdentity(2050, 1234, holds_data=True), "replaced", id="another device, same inode"
        ),
        pytest.param(
            FileIdentity(2049, 5678, holds_data=False), "replaced", id="an empty file in its place"
        ),
        pytest.param(FileIdentity(2049, 1234, holds_data=False), "truncated", id="emptied"),
    ],
)
def test_what_happened_to_the_state_file(
    current: FileIdentity | None, problem: Problem | None
) -> None:
    assert file_problem(OPENED, current) == problem


def test_a_file_empty_when_opened_is_not_called_truncated_while_it_stays_empty() -> None:
    empty = FileIdentity(2049, 1234, holds_data=False)
    assert file_problem(empty, empty) is None
    assert file_problem(empty, FileIdentity(2049, 1234, holds_data=True)) is None


@pytest.mark.parametrize(
    ("problem", "said"),
    [
        ("deleted", "was deleted while the agent was running"),
        ("replaced", "was replaced by another file while the agent was running"),
        ("truncated", "was emptied (0 bytes) while the agent was running"),
    ],
)
def test_the_loss_is_said_with_the_file_and_what_happens_next(problem: Problem, said: str) -> None:
    message = lost_message(problem, Path("/var/lib/seyaha-agent/state.db"))
    assert message.startswith(f"the state file /var/lib/seyaha-agent/state.db {said}")
    assert "The agent stops; at its next start" in message
    assert "resends every slot to Seyaha" in message
    assert "\n" not in message


# -- the lock file's record ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "record"),
    [
        pytest.param("", None, id="empty: nothing recorded"),
        pytest.param("  \n", None, id="blank"),
        pytest.param("4242", LockRecord(4242, None), id="a bare pid, as before the record"),
        pytest.param("4242\n", LockRecord(4242, None), id="a bare pid and a newline"),
        pytest.param("4242\nbaseline=yes\n", LockRecord(4242, True), id="baselined"),
        pytest.param("4242\nbaseline=no\n", LockRecord(4242, False), id="not baselined"),
        pytest.param("4242\nbaseline=maybe\n", LockRecord(4242, None), id="an unknown value"),
        pytest.param("4242\nsomething=else\n", LockRecord(4242, None), id="an unknown key"),
        pytest.param("garbage", LockRecord(None, None), id="no pid"),
    ],
)
def test_a_lock_file_is_read(text: str, record: LockRecord | None) -> None:
    assert LockRecord.parse(text) == record


@pytest.mark.parametrize(
    "record",
    [LockRecord(4242, True), LockRecord(4242, False), LockRecord(4242, None)],
)
def test_a_lock_record_reads_back_as_written(record: LockRecord) -> None:
    assert LockRecord.parse(record.text()) == record


def test_the_pid_stays_the_first_line_of_the_lock_file() -> None:
    assert LockRecord(4242, True).text() == "4242\nbaseline=yes\n"
    assert LockRecord(4242, None).text() == "4242\n"  # as agents before the record wrote it


# -- at start: a first run, or a lost store? ------------------------------------------------

LOCK = Path("/var/lib/seyaha-agent/state.db.lock")
BACKUP = Path("/var/lib/seyaha-agent/state.db.schema-1.bak")


@pytest.mark.parametrize(
    ("baselined", "previous", "backups", "evidence"),
    [
        pytest.param(False, None, [], None, id="no lock file: a first run, a baseline"),
        pytest.param(
            False,
            LockRecord(4242, False),
            [],
            None,
            id="a first run that stopped before its baseline: a baseline",
        ),
        pytest.param(
            False,
            LockRecord(4242, True),
            [],
            f"its lock file {LOCK} says an agent (pid 4242) recorded a baseline in it",
            id="the lock file says it was baselined: a resync",
        ),
        pytest.param(
            False,
            LockRecord(4242, None),
            [],
            f"its lock file {LOCK} says an agent (pid 4242) used it before",
            id="a lock file from before the record: a resync",
        ),
        pytest.param(
            False,
            LockRecord(None, None),
            [],
            f"its lock file {LOCK} says an agent used it before",
            id="a lock file without a pid: a resync",
        ),
        pytest.param(
            False,
            None,
            [BACKUP],
            f"a copy from a schema upgrade is beside it ({BACKUP})",
            id="a schema backup beside it: a resync",
        ),
        pytest.param(
            False,
            LockRecord(4242, False),
            [BACKUP],
            f"a copy from a schema upgrade is beside it ({BACKUP})",
            id="a backup outweighs a lock file that saw no baseline",
        ),
        pytest.param(True, None, [], None, id="a baselined store: nothing lost"),
        pytest.param(
            True, LockRecord(4242, True), [BACKUP], None, id="a baselined store with evidence"
        ),
    ],
)
def test_a_store_without_a_baseline_is_resynced_only_where_one_was_recorded_before(
    baselined: bool,
    previous: LockRecord | None,
    backups: list[Path],
    evidence: str | None,
) -> None:
    found = evidence_of_a_lost_store(
        baselined=baselined, previous=previous, lock_path=LOCK, backups=backups
    )
    assert found == evidence
