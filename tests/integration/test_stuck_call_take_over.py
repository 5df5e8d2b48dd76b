"""One call that hangs (a trickling proxy, a stalled Seyaha) does not hold up the messages its
worker claimed behind it: idle workers take them over while it runs, and none is sent twice.

Before any answer time is known a worker claims a whole batch; if its first call then hangs,
the rest of the batch used to wait for that call's deadline while the other workers idled.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler

from prometheus_client import CollectorRegistry

from agent.clock import SystemClock
from agent.config import Secret
from agent.delivery.client import SeyahaClient
from agent.delivery.policy import RetryPolicy
from agent.delivery.worker import STUCK_CALL_S, Deliverer
from agent.metrics import Metrics
from agent.model import CatalogDiff, Slot, SlotDiff
from agent.plan import notify_message
from agent.store import StateStore
from tests.conftest import INTEGRATION_ID, SECRET
from tests.integration.conftest import Answer

MESSAGES = 10
HANG_S = 12.0
"""How long the first call hangs (seconds): far past STUCK_CALL_S and the idle wake-up."""

TIMEOUT_S = 20.0
"""The client's timeout: the hanging call is answered, not cut (seconds)."""

WAIT_S = 60.0
"""A ceiling for the whole delivery; never an expectation."""


def _slot(n: int) -> Slot:
    return Slot(
        product_id="1",
        option_id="a",
        availability_id=str(n),
        local_date_time_start="2030-07-10T18:00:00+03:00",
        start_utc=datetime(2030, 7, 10, 15, 0, tzinfo=UTC),
        status="AVAILABLE",
        vacancies=n,
        capacity=10,
    )


def test_the_batch_behind_a_hanging_call_is_taken_over_and_sent_once(
    make_store: Callable[[str], StateStore], serve: Callable[[Answer], str]
) -> None:
    store = make_store("sqlite")
    messages = [notify_message(_slot(n), "changed") for n in range(MESSAGES)]
    store.commit_scan(CatalogDiff(), SlotDiff(), messages, datetime.now(UTC))

    lock = threading.Lock()
    answered: list[tuple[str, float]] = []
    first = threading.Event()

    def answer(handler: BaseHTTPRequestHandler) -> None:
        slot = json.loads(handler.request_body)["availabilityId"]
        with lock:
            hang = not first.is_set()
            first.set()
        if hang:
            time.sleep(HANG_S)
        body = json.dumps({"success": 1, "data": {"updated": True}}).encode()
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        handler.wfile.write(body)
        with lock:
            answered.append((slot, time.monotonic()))

    client = SeyahaClient(
        base_url=serve(answer),
        integration_id=INTEGRATION_ID,
        secret=Secret(SECRET),
        connect_timeout_s=1.0,
        timeout_s=TIMEOUT_S,
    )
    deliverer = Deliverer(
        store=store,
        client=client,
        clock=SystemClock(),
        metrics=Metrics(CollectorRegistry()),
        policy=RetryPolicy(initial_s=0.05, max_s=0.5),
        lease_s=2 * (1.0 + TIMEOUT_S) + 5,
        batch_size=MESSAGES,  # one claim takes them all: no answer time is known yet
        probe_interval_s=1.0,
        request_s=1.0 + TIMEOUT_S,
        concurrency=4,
    )
    stop = threading.Event()
    runner = threading.Thread(target=deliverer.run, args=(stop,), daemon=True)
    runner.start()
    try:
        deliverer.poke(MESSAGES)
        deadline = time.monotonic() + WAIT_S
        while store.admin.stats().pending and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        stop.set()
        runner.join(WAIT_S)
        client.close()

    assert store.admin.stats().pending == 0
    slots = [slot for slot, _ in answered]
    assert Counter(slots) == Counter(str(n) for n in range(MESSAGES)), "each sent once"
    hung_until = max(at for _, at in answered)
    others = sorted(at for _, at in answered if at < hung_until)
    assert len(others) == MESSAGES - 1
    # The other nine were answered while the first call still hung, not after it.
    assert others[-1] < hung_until - HANG_S / 3, (
        f"the rest of the batch waited for the hanging call: last other answer "
        f"{hung_until - others[-1]:.1f} s before it ended (STUCK_CALL_S {STUCK_CALL_S:g})"
    )
