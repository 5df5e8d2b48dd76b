"""Wake-ups: ways to learn that the source changed sooner than the next poll.

A wake-up only asks for a scan; it never carries data. Polling stays the source of truth,
because a PostgreSQL NOTIFY can be folded with others and is lost while the listener is
disconnected, and a file event can be a read as well as a write.

- PostgreSQL: LISTEN on a channel that triggers NOTIFY (see pg_triggers.py). Every
  (re)connection also asks for a scan, since notifications sent while disconnected are gone.
- SQLite: watch the database's folder; a commit touches the main file, its `-wal` (WAL mode)
  or its `-journal` (rollback mode). `-shm` changes even on reads, so it is ignored, and each
  event is confirmed with `PRAGMA data_version`, which changes only when another connection
  committed.
- MySQL/MariaDB: none; polling only (a binlog reader would need replication privileges and a
  server-side configuration most suppliers cannot change). Without a change query, the poll
  loop reads the tables' UPDATE_TIME four times a second instead (update_times.py).
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import psycopg
import watchfiles
from sqlalchemy.engine import make_url

from agent.errors import first_line
from agent.logs import event

log = logging.getLogger("agent.wakeup")

LISTEN_POLL_S = 0.5
"""How often the listener looks at the stop flag while waiting for notifications."""

RECONNECT_INITIAL_S = 0.5
RECONNECT_MAX_S = 30.0
"""Backoff between reconnection attempts of the PostgreSQL listener (seconds)."""

FILE_DEBOUNCE_MS = 10
"""watchfiles groups events closer than this (milliseconds): one commit writes several."""

Wake = Callable[[str], None]


class Wakeup(Protocol):
    def run(self, stop: threading.Event, wake: Wake) -> None:
        """Call `wake(reason)` whenever the source may have changed, until `stop` is set."""
        ...


class PostgresListener:
    def __init__(self, url: str, channel: str) -> None:
        parsed = make_url(url)
        self._conninfo = parsed.set(drivername="postgresql").render_as_string(hide_password=False)
        self._where = parsed.render_as_string(hide_password=True)
        self.channel = channel

    def run(self, stop: threading.Event, wake: Wake) -> None:
        delay = RECONNECT_INITIAL_S
        connected_before = False
        while not stop.is_set():
            try:
                with psycopg.connect(
                    self._conninfo,
                    autocommit=True,
                    connect_timeout=5,
                    application_name="seyaha-agent-listen",
                ) as conn:
                    conn.execute(
                        psycopg.sql.SQL("LISTEN {}").format(psycopg.sql.Identifier(self.channel))
                    )
                    event(
                        log,
                        logging.INFO,
                        "wakeup.listening",
                        f"listening on PostgreSQL channel {self.channel}",
                        reconnected=connected_before,
                    )
                    connected_before = True
                    delay = RECONNECT_INITIAL_S
                    wake("listen")  # anything committed while we were not listening
                    while not stop.is_set():
                        for note in conn.notifies(timeout=LISTEN_POLL_S):
                            wake(f"notify:{note.payload}")
            except psycopg.Error as exc:
                if stop.is_set():
                    return
                # Once per outage, like the source's own outage: each failed reconnection
                # attempt after that is logged at DEBUG.
                said_before = delay > RECONNECT_INITIAL_S
                event(
                    log,
                    logging.DEBUG if said_before else logging.WARNING,
                    "wakeup.disconnected",
                    f"LISTEN connection to {self._where} lost ({first_line(exc)}); "
                    f"polling continues, reconnecting in {delay:g} s",
                )
                stop.wait(delay)
                delay = min(RECONNECT_MAX_S, delay * 2)


class SqliteFileWatcher:
    def __init__(self, database: Path) -> None:
        self.database = database.resolve()
        self._watched = {str(self.database), f"{self.database}-wal", f"{self.database}-journal"}

    def _filter(self, _change: watchfiles.Change, path: str) -> bool:
        return path in self._watched

    def run(self, stop: threading.Event, wake: Wake) -> None:
        uri = f"file:{self.database}?mode=ro"
        probe = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        try:
            last = _data_version(probe)
            for _changes in watchfiles.watch(
                self.database.parent,
                watch_filter=self._filter,
                debounce=FILE_DEBOUNCE_MS,
                step=FILE_DEBOUNCE_MS,
                stop_event=stop,
                recursive=False,
                rust_timeout=500,
                yield_on_timeout=False,
            ):
                current = _data_version(probe)
                if current != last:
                    last = current
                    wake("file")
        finally:
            probe.close()


def _data_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA data_version").fetchone()
    return int(row[0])
