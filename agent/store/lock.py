"""One agent per SQLite state file.

Two processes delivering from one SQLite outbox would fight over its write lock and could
not share scans safely, so the second one is refused at start-up. The lock is an flock on a
file next to the database (dialects.FileLock): the kernel releases it when the holder dies,
even by SIGKILL.
"""

from __future__ import annotations

import os
from pathlib import Path

from agent.dialects import FileLock
from agent.errors import StateError


class StateFileLock:
    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + ".lock")
        self._lock = FileLock(self.path)

    def acquire(self) -> None:
        if not self._lock.try_acquire():
            holder = self.path.read_text(encoding="ascii", errors="replace").strip() or "unknown"
            raise StateError(
                f"another seyaha-agent (pid {holder}) is already using the state store "
                f"{self.path.with_suffix('')}: two agents must not share one SQLite state "
                "file. Stop the other one, or give each agent its own [state] url (use a "
                "PostgreSQL state store to run several agents on one outbox)."
            )
        self._lock.write(str(os.getpid()))

    def release(self) -> None:
        self._lock.release()
