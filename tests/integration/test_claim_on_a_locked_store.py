"""A claim that waits for a locked state store: it ends within the store's own wait limit, or
the failure is reported, and what it claimed is never sent on a lease that has run out.

Another process holds the SQLite state file's write lock (a long `outbox purge`, a backup, a
shell left in a transaction) while a delivery worker claims.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from agent.clock import SystemClock
from agent.config import Secret
from agent.delivery.client import SeyahaClient
from agent.delivery.policy import RetryPolicy
from agent.delivery.worker import Deliverer
from agent.dialects import SQLITE_BUSY_TIMEOUT_MS
from agent.metrics import Metrics
from agent.model import CatalogDiff, Slot, SlotDiff
from agent.plan import notify_message
from agent.store import StateStore
from tests.conftest import INTEGRATION_ID, SECRET
from tests.integration.conftest import Answer

CONNECT_TIMEOUT_S = 0.5
TIMEOUT_S = 1.5
LEASE_S = 5.0
"""More than twice connect_timeout + timeout, as the configuration demands."""

ANSWER_S = 1.2
"""How long the receiver takes to answer (seconds)."""

HELD_S = LEASE_S - ANSWER_S + 0.2
"""How long the store stays locked while the worker claims (seconds): the claim's lease,
stamped when the claim began, has less than ANSWER_S left once the lock is freed."""

LATE_S = 8.0
"""How far past its limit something may end on a slow, loaded machine (seconds): a ceiling,
not an expectation."""


@pytest.fixture
def store(make_store: Callable[[str], StateStore]) -> StateStore:
    store = make_store("sqlite")
    slot = Slot(
        product_id="1",
        option_id="a",
        availability_id="7",
        local_date_time_start="2030-07-10T18:00:00+03:00",
        start_utc=datetime(2030, 7, 10, 15, 0, tzinfo=UTC),
        status="AVAILABLE",
        vacancies=5,
        capacity=10,
    )
    message = notify_message(slot, "changed")
    assert store.commit_scan(CatalogDiff(), SlotDiff(), [message], datetime.now(UTC)) == 1
    return store


def state_file(store: StateStore) -> Path:
    return Path(store.engine.url.database or "")


@contextlib.contextmanager
def locked(store: StateStore) -> Iterator[Callable[[], None]]:
    """Another connection's write transaction on the state file; yields its release."""
    holder = sqlite3.connect(state_file(store), isolation_level=None, check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")
    try:
        yield holder.rollback
    finally:
        holder.rollback()
        holder.close()


def deliverer(store: StateStore, base_url: str) -> Deliverer:
    client = SeyahaClient(
        base_url=base_url,
        integration_id=INTEGRATION_ID,
        secret=Secret(SECRET),
        connect_timeout_s=CONNECT_TIMEOUT_S,
        timeout_s=TIMEOUT_S,
    )
    return Deliverer(
        store=store,
        client=client,
        clock=SystemClock(),
        metrics=Metrics(CollectorRegistry()),
        policy=RetryPolicy(initial_s=0.05, max_s=0.5),
        lease_s=LEASE_S,
        batch_size=10,
        probe_interval_s=1.0,
        request_s=CONNECT_TIMEOUT_S + TIMEOUT_S,
    )


def test_a_claim_that_waited_for_the_store_renews_its_lease_before_a_slow_call(
    store: StateStore, serve: Callable[[Answer], str]
) -> None:
    """The claim's lease starts when the claim does: after the wait it is too short for the
    call, and the call must not outlive it (another worker could send the message too)."""
    lease_left: list[float] = []

    def slow(handler: BaseHTTPRequestHandler) -> None:
        with contextlib.closing(sqlite3.connect(state_file(store))) as db:
            (until_ms,) = db.execute("SELECT leased_until_ms FROM seyaha_outbox").fetchone()
        time.sleep(ANSWER_S)
        lease_left.append(until_ms / 1000 - time.time())
        answer = json.dumps({"success": 1, "data": {"updated": True}}).encode()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(answer)))
        handler.end_headers()
        handler.wfile.write(answer)

    worker = deliverer(store, serve(slow))
    try:
        with locked(store) as release:
            threading.Timer(HELD_S, release).start()
            started = time.monotonic()
            attempted = worker.step()
        elapsed = time.monotonic() - started
    finally:
        worker.client.close()

    assert attempted == 1
    assert worker.tally.counts["notify_sent"] == 1
    assert store.admin.stats().pending == 0
    # the lease still ran when the answer had come
    assert len(lease_left) == 1
    assert lease_left[0] > 0, f"the call outlived its lease by {-lease_left[0]:.1f} s"
    assert elapsed < HELD_S + ANSWER_S + LATE_S


def test_a_claim_behind_a_lock_held_past_the_busy_timeout_ends_then_and_says_why(
    store: StateStore, serve: Callable[[Answer], str]
) -> None:
    """The claim gives up at SQLite's busy timeout: the worker goes on, and `once` can say
    why messages are still waiting (it said "not yet due")."""
    worker = deliverer(store, serve(lambda handler: None))
    stop = threading.Event()
    thread = threading.Thread(target=worker.work, args=(stop,), daemon=True)
    busy_s = SQLITE_BUSY_TIMEOUT_MS / 1000
    try:
        with locked(store):
            started = time.monotonic()
            thread.start()
            while not worker.tally.problems and time.monotonic() < started + busy_s + LATE_S:
                time.sleep(0.05)
            elapsed = time.monotonic() - started
    finally:
        stop.set()
        worker.poke()
        thread.join(busy_s + LATE_S)
        worker.client.close()

    assert not thread.is_alive()
    assert worker.tally.problems == ["the state store failed: database is locked (retried)"]
    assert elapsed < busy_s + LATE_S
    assert store.admin.stats().pending == 1  # kept for the next claim
