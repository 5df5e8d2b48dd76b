"""Agents opening one SQLite store at the same moment, the store still in the rollback-journal
mode 0.1.0 left it in: each connection switches it to WAL, and SQLite answers "database is
locked" at once, without waiting, to a connection that meets another one switching. None of
them may fail for it."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from agent.store import StateStore

ROUNDS = 40
AGENTS = 8
WAIT_S = 30.0


def test_agents_connecting_at_once_each_find_the_store_in_wal_mode(tmp_path: Path) -> None:
    failures: list[BaseException] = []
    for round_ in range(ROUNDS):  # the race shows up in a few rounds out of a hundred
        path = tmp_path / f"state-{round_}.db"
        with sqlite3.connect(path) as first:
            first.execute("CREATE TABLE seyaha_meta (key TEXT PRIMARY KEY, value TEXT)")
        first.close()
        together = threading.Barrier(AGENTS, timeout=WAIT_S)
        stores = [StateStore.from_url(f"sqlite:///{path}") for _ in range(AGENTS)]

        def connect(store: StateStore, together: threading.Barrier) -> None:
            try:
                together.wait()
                store.ping()
            except BaseException as exc:  # reported by the test, not lost in a thread
                failures.append(exc)

        threads = [threading.Thread(target=connect, args=(store, together)) for store in stores]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(WAIT_S)
        for store in stores:
            store.close()
        assert failures == [], f"round {round_}: {failures[0]!r}"
        with sqlite3.connect(path) as check:
            assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        check.close()
