"""Outages made for real: the agent's connections to a database killed by its server."""

from __future__ import annotations

from collections.abc import Callable

import sqlalchemy as sa

from tests.conftest import MARIADB_ADMIN_URL, PG_ADMIN_URL


def kill_connections(database_url: str, role: str) -> int:
    """Kill, as a restart or a failover would, the agent's connections to the database at
    `database_url` in `role` ("source" or "state"): on PostgreSQL those that carry the
    agent's application name for the role, on MariaDB every connection to that database but
    the killer's. Returns how many were killed."""
    url = sa.engine.make_url(database_url)
    database = str(url.database)
    if url.get_backend_name() == "postgresql":
        admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            killed = conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :db AND application_name = :name"
                ),
                {"db": database, "name": f"seyaha-agent-{role}"},
            ).all()
        admin.dispose()
        return len(killed)
    admin = sa.create_engine(MARIADB_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        ids = list(
            conn.execute(
                sa.text(
                    "SELECT id FROM information_schema.processlist "
                    "WHERE db = :db AND id <> CONNECTION_ID()"
                ),
                {"db": database},
            ).scalars()
        )
        for connection_id in ids:
            conn.execute(sa.text(f"KILL CONNECTION {int(connection_id)}"))
    admin.dispose()
    return len(ids)


class CutOnce:
    """A stand-in for Agent._give_way (called every GIVE_WAY_ROWS rows a long read reads)
    that runs `cut` once, at the `at`-th call, and keeps what it returned in `cuts`."""

    def __init__(self, at: int, cut: Callable[[], int]) -> None:
        self.at = at
        self.cut = cut
        self.calls = 0
        self.cuts: list[int] = []

    def __call__(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.cuts.append(self.cut())
