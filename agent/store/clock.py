"""The clock of a shared state store.

Leases and retry times on a PostgreSQL or MySQL store are compared by every agent that shares
it, so they are stamped with the one clock those agents agree on: the database's. Asking the
database on every claim would cost a round trip each time; instead the StoreClock reads the
database's time once, notes the host's monotonic clock beside it, and from then on adds the
monotonic time elapsed. Skew between the host's wall clock and the database's (minutes, in
either direction) has no effect; drift between the host's monotonic clock and the database's
is corrected by reading the database again every RESYNC_S.

A SQLite store lives on one host: its agent uses the host's clock as it is.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import suppress
from datetime import datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError

from agent.clock import Clock, from_epoch_ms

RESYNC_S = 3600.0
"""How often the database's time is read again (seconds of the host's monotonic clock).
NTP slews the monotonic clock with the wall clock, so the two drift apart by milliseconds an
hour; a step of the database server's clock is picked up within this long."""


class StoreClock:
    """A Clock whose now() is the store database's time; monotonic() is the host's."""

    def __init__(
        self, host: Clock, read_ms: Callable[[], int], *, resync_s: float = RESYNC_S
    ) -> None:
        self.host = host
        self._read_ms = read_ms
        self._resync_s = resync_s
        self._lock = threading.Lock()
        self._anchor: tuple[datetime, float] | None = None
        """(the database's time, the host's monotonic reading at that moment)"""

    def _sync(self) -> tuple[datetime, float]:
        before = self.host.monotonic()
        database_ms = self._read_ms()
        after = self.host.monotonic()
        # The database read its clock somewhere within the round trip: take the middle.
        return from_epoch_ms(database_ms), (before + after) / 2

    def now(self) -> datetime:
        with self._lock:
            mono = self.host.monotonic()
            if self._anchor is None:
                self._anchor = self._sync()
            elif mono - self._anchor[1] >= self._resync_s:
                # An unreachable store: keep counting from the last reading.
                with suppress(SQLAlchemyError):
                    self._anchor = self._sync()
            moment, at = self._anchor
        return moment + timedelta(seconds=self.host.monotonic() - at)

    def monotonic(self) -> float:
        return self.host.monotonic()
