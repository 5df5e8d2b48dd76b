"""A connection the PostgreSQL server killed, handed back to SQLAlchemy's pool: the pool's
failed reset is one DEBUG line of the agent's log, not an ERROR with a traceback."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import sqlalchemy as sa

from tests.conftest import PG_ADMIN_URL
from tests.integration.inventory import wait_until
from tests.log_lines import agent_log, json_lines

pytestmark = pytest.mark.postgres


def _gone(admin: sa.Engine, pid: int) -> bool:
    with admin.connect() as conn:
        found = conn.execute(
            sa.text("SELECT 1 FROM pg_stat_activity WHERE pid = :pid"), {"pid": pid}
        )
        return found.first() is None


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
def test_a_killed_connection_returned_to_the_pool_is_one_debug_line(
    new_database: Callable[[str], str], level: str
) -> None:
    engine = sa.create_engine(new_database("postgresql"))
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with agent_log(level) as out:
            raw = engine.raw_connection()
            cursor = raw.cursor()
            cursor.execute("SELECT pg_backend_pid()")  # opens a transaction the pool must end
            (pid,) = cursor.fetchone()
            cursor.close()
            with admin.connect() as conn:
                conn.execute(sa.text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
            wait_until(lambda: _gone(admin, pid), "the server to end the backend")
            raw.close()  # the pool's ROLLBACK meets a dead connection
    finally:
        engine.dispose()
        admin.dispose()

    assert "Traceback" not in out.getvalue()
    lines = json_lines(out.getvalue())
    if level == "INFO":
        assert lines == []
        return
    (line,) = lines
    assert line["level"] == "debug"
    assert line["event"] == "db.connection_discarded"
    assert line["msg"].startswith("Exception during reset or similar: ")
    assert line["msg"].endswith("(the connection was dead or closed already)")
