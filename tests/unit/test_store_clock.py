"""The clock of a shared state store: the database's time, advanced by the host's monotonic
clock, whatever the host's wall clock says."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy.exc import OperationalError

from agent.clock import FakeClock, to_epoch_ms
from agent.store.clock import StoreClock

DATABASE_NOW = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)


class Database:
    """The store database's clock: moves with the host's monotonic clock unless told apart."""

    def __init__(self, host: FakeClock) -> None:
        self.host = host
        self.start_mono = host.monotonic()
        self.stepped = timedelta()
        self.reads = 0
        self.down = False

    def read_ms(self) -> int:
        if self.down:
            raise OperationalError("SELECT now()", {}, Exception("connection refused"))
        self.reads += 1
        elapsed = timedelta(seconds=self.host.monotonic() - self.start_mono)
        return to_epoch_ms(DATABASE_NOW + elapsed + self.stepped)


@pytest.mark.parametrize("skew", [timedelta(minutes=-7), timedelta(), timedelta(minutes=12)])
def test_now_is_the_databases_time_whatever_the_hosts_wall_clock_says(skew: timedelta) -> None:
    host = FakeClock(DATABASE_NOW + skew)
    clock = StoreClock(host, Database(host).read_ms)

    assert clock.now() == DATABASE_NOW
    host.advance(42.5)
    assert clock.now() == DATABASE_NOW + timedelta(seconds=42.5)
    assert clock.monotonic() == host.monotonic()


def test_the_database_is_read_once_then_again_only_after_the_resync_period() -> None:
    host = FakeClock()
    database = Database(host)
    clock = StoreClock(host, database.read_ms, resync_s=600)

    for _ in range(5):
        clock.now()
        host.advance(100)
    assert database.reads == 1

    database.stepped = timedelta(seconds=3)  # the database server's clock was stepped
    host.advance(200)  # 700 s since the first reading
    assert clock.now() == DATABASE_NOW + timedelta(seconds=703)
    assert database.reads == 2


def test_an_unreachable_database_at_resync_keeps_the_count_going() -> None:
    host = FakeClock()
    database = Database(host)
    clock = StoreClock(host, database.read_ms, resync_s=60)
    clock.now()

    database.down = True
    host.advance(90)
    assert clock.now() == DATABASE_NOW + timedelta(seconds=90)


def test_an_unreachable_database_before_the_first_reading_is_an_error() -> None:
    host = FakeClock()
    database = Database(host)
    database.down = True
    clock = StoreClock(host, database.read_ms)

    with pytest.raises(OperationalError):
        clock.now()
