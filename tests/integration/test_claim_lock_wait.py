"""A claim on a PostgreSQL state store whose outbox table another session has locked whole
(a migration, a LOCK TABLE): it fails after CLAIM_LOCK_WAIT_S instead of waiting for ever,
and the next claim, once the lock is gone, takes the message."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import SQLAlchemyError

from agent.clock import SystemClock
from agent.model import CatalogDiff, SlotDiff
from agent.plan import trigger_message
from agent.store import StateStore
from agent.store import queue as queue_module

WAIT_S = 0.5
"""The claim's lock wait in this test (seconds), instead of CLAIM_LOCK_WAIT_S."""

LATE_S = 20.0
"""A ceiling for a loaded machine, far below "for ever"; never an expectation."""


@pytest.mark.postgres
def test_a_claim_behind_a_table_lock_gives_up_after_its_limit(
    make_store: Callable[[str], StateStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(queue_module, "CLAIM_LOCK_WAIT_S", WAIT_S)
    store = make_store("postgresql")
    now = store.clock(SystemClock()).now()
    store.commit_scan(CatalogDiff(), SlotDiff(), [trigger_message("catalog changed")], now)

    locked = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with store.engine.connect() as conn, conn.begin():
            conn.exec_driver_sql("LOCK TABLE seyaha_outbox IN ACCESS EXCLUSIVE MODE")
            locked.set()
            release.wait(LATE_S * 2)

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    try:
        assert locked.wait(LATE_S)
        started = time.monotonic()
        with pytest.raises(SQLAlchemyError, match="lock timeout"):
            store.queue.claim(now, limit=10, lease_s=30.0)
        assert time.monotonic() - started < LATE_S
    finally:
        release.set()
        holder.join(LATE_S)

    (claimed,) = store.queue.claim(store.clock(SystemClock()).now(), limit=10, lease_s=30.0)
    assert claimed.kind == "trigger"
    with store.engine.connect() as conn:
        assert conn.execute(sa.text("SHOW lock_timeout")).scalar() == "0"  # only the claim's
