"""One agent per SQLite state file.

Two processes delivering from one SQLite outbox would fight over its write lock and could
not share scans safely, so the second one is refused at start-up. The lock is an flock on a
file next to the database: the kernel releases it when the holder dies, even by SIGKILL.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from agent.errors import StateError


class StateFileLock:
    def __init__(self, database: Path) -> None:
        self.path = database.with_name(database.name + ".lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise StateError(
                f"another seyaha-agent (pid {holder}) is already using the state store "
                f"{self.path.with_suffix('')}: two agents must not share one SQLite state "
                "file. Stop the other one, or give each agent its own [state] url (use a "
                "PostgreSQL state store to run several agents on one outbox)."
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode("ascii"))
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
