"""One agent per SQLite state file, and the lock file's memory of the store.

Two processes delivering from one SQLite outbox would fight over its write lock and could
not share scans safely, so the second one is refused at start-up. The lock is an flock on a
file next to the database (dialects.FileLock): the kernel releases it when the holder dies,
even by SIGKILL.

The lock file outlives the agents that take it, and says two things to the next one: the pid
of the last holder (for the refusal above) and whether a baseline was ever recorded in the
store at this path. That second line is how a start tells a first run (take a baseline) from
a store that was lost since (resend everything: see evidence_of_a_lost_store). It is set once
the store holds a baseline and never cleared, not even when the store is lost: the lock file
is created before the first baseline, so its mere existence would also be true of a first
run that stopped before its baseline.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from agent.dialects import FileLock
from agent.errors import StateError, shown_path
from agent.store.identity import FileIdentity, file_problem, identify

BASELINE_KEY = "baseline"
"""The lock file's line `baseline=yes|no`; a lock file without it was written by an agent
that did not keep this record (before it, the file held only the pid)."""


@dataclass(frozen=True)
class LockRecord:
    """What a lock file says."""

    pid: int | None
    """The agent that holds the lock, or held it last."""
    baselined: bool | None
    """Whether a baseline was ever recorded in the store at this path; None: not recorded
    (a lock file written before the agent kept this line)."""

    def text(self) -> str:
        lines = ["" if self.pid is None else str(self.pid)]
        if self.baselined is not None:
            lines.append(f"{BASELINE_KEY}={'yes' if self.baselined else 'no'}")
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> LockRecord | None:
        """The record in a lock file's `text`; None for an empty file (nothing recorded)."""
        lines = text.strip().splitlines()
        if not lines:
            return None
        first = lines[0].strip()
        baselined = None
        for line in lines[1:]:
            key, _, value = line.partition("=")
            if key.strip() == BASELINE_KEY and value.strip() in ("yes", "no"):
                baselined = value.strip() == "yes"
        return cls(int(first) if first.isdigit() else None, baselined)


def evidence_of_a_lost_store(
    *,
    baselined: bool,
    previous: LockRecord | None,
    lock_path: Path,
    backups: Sequence[Path],
) -> str | None:
    """Why a store without a baseline must have had one before (it was lost, emptied or
    replaced since), in words for the log; None when it need not have: a first run, which
    takes a baseline, or a store that holds one.

    `previous` is what the lock file said before this agent took it (None: no lock file);
    `backups` are the copies a schema upgrade made beside the store (STATE.schema-N.bak).
    """
    if baselined:
        return None
    if previous is not None and previous.baselined is not False:
        holder = "an agent" if previous.pid is None else f"an agent (pid {previous.pid})"
        if previous.baselined:
            return f"its lock file {shown_path(lock_path)} says {holder} recorded a baseline in it"
        # Written before the lock file kept the baseline line: an agent ran here, and it
        # baselined on its first scan unless that scan failed. A resync costs one notify
        # per slot; a missed change stays wrong at Seyaha until the slot changes again.
        return f"its lock file {shown_path(lock_path)} says {holder} used it before"
    if backups:
        return f"a copy from a schema upgrade is beside it ({shown_path(backups[0])})"
    return None


class StateFileLock:
    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + ".lock")
        self._lock = FileLock(self.path)
        self._record: LockRecord | None = None
        """What this agent wrote (None: it does not hold the lock)."""
        self._held: FileIdentity | None = None
        """The lock file this agent holds, as it was when taken."""

    def acquire(self) -> LockRecord | None:
        """Take the lock, or refuse (StateError) while another agent holds it. Returns what
        the lock file said before (None: no agent used this store before)."""
        if not self._lock.try_acquire():
            found = LockRecord.parse(self._read())
            holder = "unknown" if found is None or found.pid is None else str(found.pid)
            raise StateError(
                f"another seyaha-agent (pid {holder}) is already using the state store "
                f"{self.path.with_suffix('')}: two agents must not share one SQLite state "
                "file. Stop the other one, or give each agent its own [state] url (use a "
                "PostgreSQL state store to run several agents on one outbox)."
            )
        previous = LockRecord.parse(self._read())
        # The baseline line is carried over as it was: only a recorded baseline sets it.
        self._write(LockRecord(os.getpid(), False if previous is None else previous.baselined))
        self._held = identify(self.path)
        return previous

    def mark_baselined(self) -> None:
        """Record that the store at this path holds (or held) a baseline."""
        if self._record is not None and self._record.baselined is not True:
            self._write(replace(self._record, baselined=True))

    def keep_after_loss(self) -> None:
        """Write this agent's record again at the lock file's path if the file there went
        with the state file (`rm state.db*`): the next start must still learn that the store
        it finds empty had a baseline. Best effort: the folder may be gone too."""
        if self._record is None or self._held is None:
            return
        if file_problem(self._held, identify(self.path)) != "deleted":
            return  # still there, or another agent's by now: its record stands
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, self._record.text().encode("ascii"))
            finally:
                os.close(fd)
        except OSError:
            return

    def release(self) -> None:
        self._lock.release()
        self._record = None

    def _read(self) -> str:
        try:
            return self.path.read_text(encoding="ascii", errors="replace")
        except FileNotFoundError:
            return ""

    def _write(self, record: LockRecord) -> None:
        self._lock.write(record.text())
        self._record = record
