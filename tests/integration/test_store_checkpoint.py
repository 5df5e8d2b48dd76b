"""A SQLite store's write-ahead log is copied into the database file in the background, by the
daemon, not by the commit that grew it past SQLite's default 1,000 pages: that copy (about
0.03 s) fell into a poll's or a reconciliation's commit."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import OperationalError

from agent.app import Agent
from agent.dialects import STORE_CHECKPOINT_PAGES
from agent.sandbox import Sandbox
from agent.source.reader import SourceReader
from agent.store import StateStore
from agent.store.meta import set_meta
from tests.integration.inventory import Inventory, running, wait_until

PAGE_BYTES = 4096
LOG_PAGES = 2000
"""Pages one commit writes: twice SQLite's default bound, a fifth of the store's."""


def _write_pages(store: StateStore, key: str = "filler") -> None:
    """One commit of about LOG_PAGES pages (a value that overflows into that many)."""
    with store.connector.write() as conn:
        set_meta(conn, key, "x" * (LOG_PAGES * PAGE_BYTES))


def _file_bytes(path: Path) -> int:
    """The database file's own size, without its log."""
    return path.stat().st_size


def test_a_large_commit_leaves_its_log_to_the_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    store = StateStore.from_url(f"sqlite:///{path}")
    store.open()
    try:
        with store.engine.connect() as conn:
            raw = conn.connection.dbapi_connection
            assert raw is not None
            bound = raw.execute("PRAGMA wal_autocheckpoint").fetchone()
        assert bound == (STORE_CHECKPOINT_PAGES,)
        store.checkpoint()  # what opening the store wrote
        before = _file_bytes(path)

        _write_pages(store)
        # Past SQLite's default bound, the commit would have copied the pages itself.
        assert _file_bytes(path) == before
        assert Path(f"{path}-wal").stat().st_size > LOG_PAGES * PAGE_BYTES

        store.checkpoint()
        assert _file_bytes(path) > before + LOG_PAGES * PAGE_BYTES // 2
        with store.connector.read() as conn:
            value = conn.execute(
                sa.text("SELECT length(value) FROM seyaha_meta WHERE key = 'filler'")
            ).scalar_one()
        assert value == LOG_PAGES * PAGE_BYTES
    finally:
        store.close()


def test_a_checkpoint_waits_for_no_reader(tmp_path: Path) -> None:
    """A reader holding an old picture of the store (a reconciliation's long read) keeps the
    pages it may still need in the log; the checkpoint returns at once instead of waiting."""
    path = tmp_path / "state.db"
    store = StateStore.from_url(f"sqlite:///{path}")
    store.open()
    try:
        store.checkpoint()
        before = _file_bytes(path)
        with store.connector.read() as reader:
            reader.execute(sa.text("SELECT count(*) FROM seyaha_meta")).scalar_one()
            _write_pages(store)
            store.checkpoint()  # returns: PASSIVE never waits (a wait would hang the test)
            assert _file_bytes(path) == before
        store.checkpoint()
        assert _file_bytes(path) > before
    finally:
        store.close()


def test_the_daemon_checkpoints_in_the_background_and_says_once_when_it_cannot(
    make_inventory: Callable[[str], Inventory],
    make_reader: Callable[..., SourceReader],
    make_sandbox: Callable[..., Sandbox],
    make_agent: Callable[..., Agent],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    inventory = make_inventory("sqlite")
    sandbox = make_sandbox(catalog=make_reader(inventory.url).catalog_keys)
    path = tmp_path / "state.db"
    agent = make_agent(
        "daemon",
        base_url=sandbox.url,
        source_url=inventory.url,
        state_url=f"sqlite:///{path}",
        poll_interval=0.2,
    )
    checkpoint = agent.store.checkpoint
    failures: list[int] = []

    def failing() -> None:
        failures.append(1)
        raise OperationalError("PRAGMA wal_checkpoint", {}, Exception("disk I/O error"))

    def warnings() -> list[logging.LogRecord]:
        return [r for r in caplog.records if getattr(r, "event", None) == "state.checkpoint_failed"]

    with caplog.at_level(logging.WARNING, logger="agent"), running(agent):
        wait_until(lambda: agent.reconciled, "the first reconciliation")
        before = _file_bytes(path)
        _write_pages(agent.store, "first")
        wait_until(lambda: _file_bytes(path) > before, "the background checkpoint")

        monkeypatch.setattr(agent.store, "checkpoint", failing)
        wait_until(lambda: len(failures) >= 3, "three failed checkpoints")
        assert len(warnings()) == 1
        assert "disk I/O error" in warnings()[0].getMessage()

        monkeypatch.setattr(agent.store, "checkpoint", checkpoint)
        before = _file_bytes(path)
        _write_pages(agent.store, "second")
        wait_until(lambda: _file_bytes(path) > before, "the checkpoint once it works again")

        failures.clear()
        monkeypatch.setattr(agent.store, "checkpoint", failing)
        wait_until(lambda: len(failures) >= 2, "two more failed checkpoints")
        assert len(warnings()) == 2  # said again: one had worked in between
    assert not [r for r in caplog.records if r.exc_info is not None]
