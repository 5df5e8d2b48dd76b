"""Shared fixtures: throw-away databases on the local PostgreSQL and MariaDB servers.

Tests that need a server skip when it is missing locally, and fail under CI=true, where the
servers must be up (.ci/run starts them).
"""

from __future__ import annotations

import fcntl
import os
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import settings

PG_ADMIN_URL = os.environ.get(
    "SEYAHA_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
MARIADB_ADMIN_URL = os.environ.get(
    "SEYAHA_TEST_MARIADB_URL", "mysql+pymysql://root@127.0.0.1:3306/mysql"
)
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

BACKENDS = ("sqlite", "postgresql", "mariadb")

SECRET = "5eca" * 16
"""A 64-hex webhook secret used by tests; tests assert it never appears in any output."""

INTEGRATION_ID = "64a1b2c3d4e5f6a7b8c9d0e1"

settings.register_profile(
    "seyaha",
    max_examples=200,
    # Some properties open a SQLite store per example: its time varies with the disk, and a
    # slow first example is not a failure.
    deadline=None,
    # A counterexample worth keeping is pinned with @example in its test file; nothing is
    # written into the working tree.
    database=None,
)
settings.load_profile("seyaha")


def _unavailable(what: str, exc: Exception) -> None:
    message = f"{what} is not reachable: {str(exc).splitlines()[0]}"
    if IN_CI:
        pytest.fail(message + " (CI=true: servers must be up; .ci/run starts them)")
    pytest.skip(message)


class DatabaseFactory:
    """Creates empty databases and drops them at the end of the session."""

    def __init__(self) -> None:
        self._made: list[tuple[str, str]] = []
        self._admin: dict[str, sa.Engine] = {}

    def _engine(self, kind: str) -> sa.Engine:
        if kind not in self._admin:
            url = PG_ADMIN_URL if kind == "postgresql" else MARIADB_ADMIN_URL
            engine = sa.create_engine(
                url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5}
            )
            try:
                with engine.connect() as conn:
                    conn.execute(sa.text("SELECT 1"))
            except sa.exc.OperationalError as exc:
                engine.dispose()
                _unavailable(kind, exc)
            self._admin[kind] = engine
        return self._admin[kind]

    def new(self, kind: str, tmp_path_factory: pytest.TempPathFactory | None = None) -> str:
        """The URL of a new, empty database of `kind` (sqlite, postgresql or mariadb)."""
        name = f"seyaha_test_{uuid.uuid4().hex[:12]}"
        if kind == "sqlite":
            assert tmp_path_factory is not None
            return f"sqlite:///{tmp_path_factory.mktemp('db') / (name + '.db')}"
        engine = self._engine(kind)
        with engine.connect() as conn:
            if kind == "postgresql":
                conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
            else:
                conn.execute(
                    sa.text(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
                )
        self._made.append((kind, name))
        base = sa.engine.make_url(PG_ADMIN_URL if kind == "postgresql" else MARIADB_ADMIN_URL)
        return base.set(database=name).render_as_string(hide_password=False)

    def drop_all(self) -> None:
        for kind, name in self._made:
            engine = self._admin[kind]
            with engine.connect() as conn:
                if kind == "postgresql":
                    conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
                else:
                    conn.execute(sa.text(f"DROP DATABASE IF EXISTS `{name}`"))
        for engine in self._admin.values():
            engine.dispose()


class ServerTurns:
    """Under pytest-xdist, a test marked `alone` has the database servers to itself: it
    waits for the tests under way in the other processes to end, and no other test starts
    (nor a process's end, which drops its databases) until it has ended. PostgreSQL's
    snapshot, which a daemon without a change query watches, moves with a commit in any
    database of the server: another process's tests would make it pass where the test
    expects it to rest. Every other test holds the servers shared (a flock on one file in
    the session's temporary folder, which every process sees); an `alone` test first
    leaves a file in `holds` so that no shared turn begins, then takes it exclusively."""

    WAIT_S = 0.05

    def __init__(self, folder: Path, worker: str) -> None:
        self.lock = folder / "servers.lock"
        self.holds = folder / "servers.holds"
        self.holds.mkdir(exist_ok=True)
        self.hold = self.holds / worker

    @contextmanager
    def _locked(self, mode: int) -> Iterator[None]:
        with open(self.lock, "a") as file:
            fcntl.flock(file, mode)
            try:
                yield
            finally:
                fcntl.flock(file, fcntl.LOCK_UN)

    @contextmanager
    def shared(self) -> Iterator[None]:
        while any(self.holds.iterdir()):
            time.sleep(self.WAIT_S)
        with self._locked(fcntl.LOCK_SH):
            yield

    @contextmanager
    def alone(self) -> Iterator[None]:
        self.hold.touch()
        try:
            with self._locked(fcntl.LOCK_EX):
                yield
        finally:
            self.hold.unlink(missing_ok=True)


class OneProcess:
    """Pytest in one process: every test has the servers to itself, no turn to take."""

    def shared(self) -> AbstractContextManager[None]:
        return nullcontext()

    def alone(self) -> AbstractContextManager[None]:
        return nullcontext()


@pytest.fixture(scope="session")
def server_turns(tmp_path_factory: pytest.TempPathFactory) -> ServerTurns | OneProcess:
    """The turns of the xdist processes at the database servers."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker is None:
        return OneProcess()
    # Each process's base folder is popen-gwN in one folder of the session: shared.
    return ServerTurns(tmp_path_factory.getbasetemp().parent, worker)


@pytest.fixture(autouse=True)
def _server_turn(
    request: pytest.FixtureRequest, server_turns: ServerTurns | OneProcess
) -> Iterator[None]:
    """Taken before any other fixture of the test (autouse), given back after them."""
    alone = request.node.get_closest_marker("alone") is not None
    with server_turns.alone() if alone else server_turns.shared():
        yield


@pytest.fixture(scope="session")
def databases(server_turns: ServerTurns | OneProcess) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory()
    yield factory
    with server_turns.shared():
        factory.drop_all()


@pytest.fixture
def new_database(
    databases: DatabaseFactory, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], str]:
    """`new_database("postgresql")` -> URL of an empty database, dropped after the session."""
    return lambda kind: databases.new(kind, tmp_path_factory)
