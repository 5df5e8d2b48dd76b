"""Deadlocks between state store transactions, on PostgreSQL and MariaDB.

InnoDB rolls back one of two transactions that wait for each other's rows (delivery workers
giving outbox rows back while others claim can), and PostgreSQL does too. The outbox's
writes run again, whole, instead of failing: a failed write after a call leaves its message
leased, unsent, until the lease runs out.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import DBAPIError, IntegrityError

from agent.store import StateStore, schema
from agent.store.connector import CONFLICT_TRIES
from agent.store.meta import get_meta, set_meta
from tests.integration.inventory import SERVER_PARAMS

WAIT_S = 30.0


def _raise_conflict(conn: sa.Connection) -> None:
    """Have the database itself answer with its deadlock error."""
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql(
            "DO $$ BEGIN RAISE EXCEPTION 'deadlock' USING ERRCODE = '40P01'; END $$"
        )
    else:
        conn.exec_driver_sql("SIGNAL SQLSTATE '40001' SET MYSQL_ERRNO = 1213")


@pytest.mark.parametrize("backend", SERVER_PARAMS)
def test_two_transactions_that_deadlock_both_end_with_their_writes(
    backend: str, make_store: Callable[[str], StateStore]
) -> None:
    """Two transactions take two rows in opposite order: the database rolls one back, and
    transact runs it again after the other has committed."""
    store = make_store(backend)
    with store.connector.write() as conn:
        set_meta(conn, "left", "0")
        set_meta(conn, "right", "0")
    both_hold_one = threading.Barrier(2, timeout=WAIT_S)
    runs = {"left": 0, "right": 0}
    failures: list[BaseException] = []

    def writer(first: str, second: str) -> None:
        def work(conn: sa.Connection) -> None:
            runs[first] += 1
            set_meta(conn, first, f"{first} by {first}")
            if runs[first] == 1:
                both_hold_one.wait()
            set_meta(conn, second, f"{second} by {first}")

        try:
            store.connector.transact(work)
        except BaseException as exc:  # reported by the test, not lost in a thread
            failures.append(exc)

    threads = [
        threading.Thread(target=writer, args=("left", "right")),
        threading.Thread(target=writer, args=("right", "left")),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    assert failures == []
    # One of them was rolled back by the database and ran again, once.
    assert sorted(runs.values()) == [1, 2]
    again = max(runs, key=lambda name: runs[name])
    other = "right" if again == "left" else "left"
    with store.connector.read() as conn:
        # The one that ran again wrote last: both rows say so.
        assert get_meta(conn, again) == f"{again} by {again}"
        assert get_meta(conn, other) == f"{other} by {again}"


@pytest.mark.parametrize("backend", SERVER_PARAMS)
def test_a_transaction_the_database_keeps_rolling_back_fails_after_its_last_run(
    backend: str, make_store: Callable[[str], StateStore]
) -> None:
    store = make_store(backend)
    runs = 0

    def work(conn: sa.Connection) -> None:
        nonlocal runs
        runs += 1
        set_meta(conn, "written", str(runs))
        _raise_conflict(conn)

    with pytest.raises(DBAPIError) as raised:
        store.connector.transact(work)
    assert store.connector.dialect.is_conflict(raised.value)
    assert runs == CONFLICT_TRIES
    with store.connector.read() as conn:
        assert get_meta(conn, "written") is None  # every run was rolled back


@pytest.mark.parametrize("backend", [*SERVER_PARAMS, "sqlite"])
def test_other_errors_are_not_run_again(
    backend: str, make_store: Callable[[str], StateStore]
) -> None:
    store = make_store(backend)
    runs = 0

    def work(conn: sa.Connection) -> None:
        nonlocal runs
        runs += 1
        conn.execute(sa.insert(schema.meta).values(key="twice", value="a"))
        conn.execute(sa.insert(schema.meta).values(key="twice", value="b"))

    with pytest.raises(IntegrityError):
        store.connector.transact(work)
    assert runs == 1
