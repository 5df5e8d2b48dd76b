"""Fixtures for the integration tier: inventories, sandboxes, agents and state stores that are
all real, and all closed at the end of the test (warnings are errors: nothing may leak)."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator
from contextlib import suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from agent.app import Agent
from agent.config import ENV_PREFIX, SECRET_ENV, load_config
from agent.db import create_engine
from agent.sandbox import Sandbox
from agent.source.reader import SourceReader
from agent.store import StateStore
from tests.conftest import INTEGRATION_ID, SECRET
from tests.integration.commits import agents  # noqa: F401 - a fixture (see commits.py)
from tests.integration.inventory import (
    CATALOG_QUERY,
    SLOTS_QUERY,
    ZONE,
    Inventory,
    write_config,
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent reads its secret and overrides from the environment: start from none."""
    monkeypatch.delenv(SECRET_ENV, raising=False)
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


@pytest.fixture
def make_inventory(new_database: Callable[[str], str]) -> Iterator[Callable[[str], Inventory]]:
    """`make_inventory("mariadb")`: an empty partner schema in a new database."""
    made: list[Inventory] = []

    def make(backend: str) -> Inventory:
        inventory = Inventory.create(backend, new_database(backend))
        made.append(inventory)
        return inventory

    yield make
    for inventory in made:
        inventory.close()


@pytest.fixture
def make_reader() -> Iterator[Callable[..., SourceReader]]:
    """`make_reader(url, catalog_query=..., slots_query=...)`: the agent's reader on `url`."""
    made: list[SourceReader] = []

    def make(
        url: str, *, catalog_query: str = CATALOG_QUERY, slots_query: str = SLOTS_QUERY
    ) -> SourceReader:
        reader = SourceReader(
            create_engine(url, role="source"),
            catalog_query=catalog_query,
            slots_query=slots_query,
            timezone=ZONE,
        )
        made.append(reader)
        return reader

    yield make
    for reader in made:
        reader.engine.dispose()


@pytest.fixture
def make_sandbox() -> Iterator[Callable[..., Sandbox]]:
    """`make_sandbox(catalog=reader.catalog_keys)`: a started receiver on a free port."""
    made: list[Sandbox] = []

    def make(catalog: Callable[[], set[tuple[str, str]]] | None = None) -> Sandbox:
        sandbox = Sandbox(
            secret=SECRET, integration_id=INTEGRATION_ID, catalog=catalog, port=0
        ).start()
        made.append(sandbox)
        return sandbox

    yield make
    for sandbox in made:
        sandbox.stop()


@pytest.fixture
def make_agent(tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    """`make_agent(name, base_url=..., source_url=..., state_url=..., secret=...)`: an opened
    Agent built from a TOML file written to tmp_path, closed at the end of the test."""
    made: list[Agent] = []

    def make(name: str, *, exclusive: bool = False, **settings: Any) -> Agent:
        # Not exclusive by default: scenarios stand for a restart by opening a second agent
        # on the same SQLite state while the first is still open in this process.
        settings.setdefault("integration_id", INTEGRATION_ID)
        settings.setdefault("secret", SECRET)
        agent = Agent(load_config(write_config(tmp_path, name=name, **settings)))
        made.append(agent)
        agent.open(exclusive=exclusive)
        return agent

    yield make
    for agent in made:
        agent.close()


@pytest.fixture
def make_store(new_database: Callable[[str], str]) -> Iterator[Callable[[str], StateStore]]:
    """`make_store("postgresql")`: an opened state store in a new database."""
    made: list[StateStore] = []

    def make(backend: str) -> StateStore:
        store = StateStore.from_url(new_database(backend))
        made.append(store)
        store.open()
        return store

    yield make
    for store in made:
        store.close()


Answer = Callable[[BaseHTTPRequestHandler], None]
"""How a test server answers one POST (see `serve`)."""


@pytest.fixture
def serve() -> Iterator[Callable[[Answer], str]]:
    """`serve(answer)`: a real HTTP server on 127.0.0.1 answering every POST with `answer`
    (the request's body already read, as the handler's `request_body`)."""
    servers: list[ThreadingHTTPServer] = []

    def start(answer: Answer) -> str:
        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                self.request_body = self.rfile.read(int(self.headers.get("content-length") or 0))
                # The client may stop reading early: that is the point.
                with suppress(BrokenPipeError, ConnectionResetError):
                    answer(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()
