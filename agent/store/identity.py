"""Whether the SQLite state file is still the one the agent opened.

SQLite reads and writes through the file descriptors it opened. A state file deleted while
the agent runs keeps being written as an unlinked inode, and is gone at the next start; one
emptied in place reads as a first run. Either way the next start would record a baseline,
which counts every slot as told, and the changes made in between would never reach Seyaha.

So the file's device and inode, and whether it holds anything, are recorded when the store
is opened and compared again each time the store hands out a connection: a stat, a few
microseconds, once per transaction and never per row. The first difference is reported once
and every later use of the store is refused, so nothing more goes to the lost file. (What the
next start does about the lost baseline is agent.store.lock's evidence_of_a_lost_store.)
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from agent.dialects import dialect_of
from agent.errors import StateError, shown_path

Problem = Literal["deleted", "replaced", "truncated"]
"""What happened to the state file under the running agent."""


@dataclass(frozen=True)
class FileIdentity:
    """What tells one file from another at the same path."""

    device: int
    inode: int
    holds_data: bool
    """Its size is above 0 bytes (a SQLite store in use always has its header page)."""


def identify(path: Path) -> FileIdentity | None:
    """The identity of the file at `path`; None when there is none (deleted, or its folder)."""
    try:
        found = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return FileIdentity(found.st_dev, found.st_ino, found.st_size > 0)


def file_problem(recorded: FileIdentity, current: FileIdentity | None) -> Problem | None:
    """What happened to a file since `recorded` was taken, seeing it is now `current`.

    The inode of a file the agent still holds open is never reused, so another file at the
    path always has another (device, inode) pair, even one created right after a delete.
    """
    if current is None:
        return "deleted"
    if (current.device, current.inode) != (recorded.device, recorded.inode):
        return "replaced"
    if recorded.holds_data and not current.holds_data:
        return "truncated"
    return None


_NEXT_START = (
    "The agent stops; at its next start (automatic under systemd or Docker) it resends every "
    "slot to Seyaha if the store there holds no baseline, so nothing changed meanwhile is missed."
)


def lost_message(problem: Problem, path: Path) -> str:
    """What happened to the state file at `path`, and what the operator should do."""
    where, folder = shown_path(path), shown_path(path.parent)
    if problem == "deleted":
        return (
            f"the state file {where} was deleted while the agent was running: what it "
            "recorded from then on would have gone into the deleted file, and been lost with "
            f"it. {_NEXT_START} "
            f"Find what deletes files in {folder} (a cleanup job, a volume mounted over it)."
        )
    if problem == "replaced":
        return (
            f"the state file {where} was replaced by another file while the agent was running "
            "(a restore, a copy over it, a volume mounted over its folder): the agent would go "
            f"on writing into the old one. {_NEXT_START} Stop the agent before you replace "
            "its state file."
        )
    return (
        f"the state file {where} was emptied (0 bytes) while the agent was running: what it "
        f"recorded is gone, and a start would take it for a first run. {_NEXT_START} Find "
        f"what empties {where} (a log rotation or cleanup pointed at the wrong file)."
    )


class StateFileLost(StateError, SQLAlchemyError):
    """The state file was deleted, replaced or emptied under the running agent.

    Also a SQLAlchemyError: it is raised where the store hands out a connection, so the code
    that already copes with a failing store (delivery gives its claims back, /readyz lists the
    store, a command prints one line) copes with this one the same way.
    """

    def __init__(self, problem: Problem, path: Path) -> None:
        super().__init__(lost_message(problem, path))
        self.problem: Problem = problem
        self.path = path


class StateFileGuard:
    """Watches one SQLite state file from the moment its store is open."""

    def __init__(self, database: Path, on_lost: Callable[[StateFileLost], None]) -> None:
        self.database = database
        self._on_lost = on_lost
        self._recorded: FileIdentity | None = None
        self._reporting = threading.Lock()
        self.lost: StateFileLost | None = None
        """What happened, once it has: from then on every check raises."""

    def watch(self, engine: sa.Engine) -> None:
        """Record the file as it is now (just opened) and check it at every connection
        `engine` hands out, before anything can be read or written through it."""
        self._recorded = identify(self.database)
        sa.event.listen(engine, "checkout", self._on_checkout)

    def _on_checkout(self, *_connection: Any) -> None:
        self.check()

    def check(self) -> None:
        """Raise StateFileLost if the file is no longer the one recorded; the first time,
        `on_lost` hears of it first (once, whichever thread notices)."""
        if self.lost is None:
            problem = self._problem()
            if problem is None:
                return
            with self._reporting:
                first = self.lost is None
                if first:
                    self.lost = StateFileLost(problem, self.database)
            if first:
                assert self.lost is not None
                self._on_lost(self.lost)
        assert self.lost is not None
        # A new exception for each caller: threads raising one instance would share (and
        # keep growing) its traceback.
        raise StateFileLost(self.lost.problem, self.database)

    def after_close(self) -> None:
        """Once the store's connections are closed, empty again a file found emptied.

        SQLite's last close copies its write-ahead log back into the database file: after
        the file was emptied that rebuilds the old store whole, in part (a malformed file the
        next start would fail on) or not at all, depending on what the log still held.
        Emptied again, the file gives the next start what the operator left, an empty store,
        which it resyncs (SQLite drops the log of a database of 0 bytes).
        """
        lost, recorded = self.lost, self._recorded
        if lost is None or lost.problem != "truncated" or recorded is None:
            return
        self._recorded = None  # once: a later store at this path is not this one
        current = identify(self.database)
        if current is None or (current.device, current.inode) != (recorded.device, recorded.inode):
            return  # not the file this agent had open any more: not its to touch
        with suppress(OSError):
            os.truncate(self.database, 0)

    def _problem(self) -> Problem | None:
        if self._recorded is None:
            return None  # not watching yet (the store is being opened)
        try:
            current = identify(self.database)
        except OSError:
            # The file cannot be looked at (permissions changed on its folder): that is not
            # proof it is gone, and SQLite reports a file it cannot use by itself.
            return None
        return file_problem(self._recorded, current)


def watch_state_file(engine: sa.Engine) -> StateFileGuard | None:
    """Refuse every use of the just-opened store behind `engine` once its SQLite file is lost
    (for a command that reports the StateFileLost itself); None for any other store."""
    database = dialect_of(engine).file_database(engine.url)
    if database is None:
        return None
    guard = StateFileGuard(database, lambda _lost: None)
    guard.watch(engine)
    return guard


class AlreadyReported(logging.Filter):
    """Drops log records that only repeat a StateFileLost: it was reported once, as
    state.lost, when it was found; a traceback from each worker that ran into it after that
    tells the operator nothing more."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], StateFileLost))
