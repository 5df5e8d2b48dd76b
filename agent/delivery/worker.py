"""The delivery loop: claim due messages from the outbox, send them, record what happened.

One worker per process sends messages one at a time in outbox order, which keeps the trigger
ahead of the notifies that depend on it and never has two calls in flight for one slot.
While Seyaha refuses the secret (401/403) or does not know the integration (404), delivery
pauses: nothing is dropped, and one message is retried every `probe_interval_s` as a probe.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from agent.clock import Clock
from agent.delivery.client import Response, SeyahaClient
from agent.delivery.policy import Outcome, RetryPolicy, Verdict, classify, retry_delay_s
from agent.logs import event
from agent.metrics import Metrics
from agent.model import OutboxMessage
from agent.outbox.store import StateStore

log = logging.getLogger("agent.delivery")

IDLE_WAIT_S = 1.0
"""Longest sleep when nothing is due: a scan's wake-up usually comes sooner."""


@dataclass
class Pause:
    reason: str
    since: datetime
    probe_at: datetime


@dataclass
class Tally:
    """What this process delivered, for the `once` summary and the demo."""

    counts: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)

    def note_problem(self, reason: str) -> None:
        if reason not in self.problems:
            self.problems.append(reason)


class Deliverer:
    def __init__(
        self,
        *,
        store: StateStore,
        client: SeyahaClient,
        clock: Clock,
        metrics: Metrics,
        policy: RetryPolicy,
        lease_s: float,
        batch_size: int,
        probe_interval_s: float,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.client = client
        self.clock = clock
        self.metrics = metrics
        self.policy = policy
        self.lease_s = lease_s
        self.batch_size = batch_size
        self.probe_interval_s = probe_interval_s
        self.rand = rand
        self.pause: Pause | None = None
        self.tally = Tally()

    def resume(self) -> None:
        """Lift a pause at once (the secret or integration id was changed)."""
        if self.pause is not None:
            event(log, logging.INFO, "delivery.resumed", "delivery resumed")
        self.pause = None
        self.metrics.paused.set(0)

    def step(self) -> int:
        """Claim and process one batch; returns how many messages were attempted."""
        now = self.clock.now()
        limit = self.batch_size
        if self.pause is not None:
            if now < self.pause.probe_at:
                return 0
            limit = 1  # a probe: one message tells whether Seyaha accepts us again
        attempted = 0
        for message in self.store.claim(now, limit=limit, lease_s=self.lease_s):
            if self.pause is not None and attempted > 0:
                self.store.retry_later(
                    message,
                    at=self.clock.now(),
                    error=self.pause.reason,
                    status=None,
                    count_attempt=False,
                )
                continue
            self.process(message)
            attempted += 1
        return attempted

    def process(self, message: OutboxMessage) -> Outcome:
        now = self.clock.now()
        if message.kind == "notify" and message.slot_start is not None and message.slot_start < now:
            self.store.discard(message)
            self.metrics.expired.inc()
            self.tally.counts["expired"] += 1
            event(
                log,
                logging.INFO,
                "notify.expired",
                "slot already started; notify dropped",
                message_id=message.id,
                **_slot_fields(message),
            )
            return Outcome(Verdict.DELIVERED, "expired")
        started = self.clock.monotonic()
        if message.kind == "trigger":
            response = self.client.trigger()
        else:
            assert message.payload is not None
            response = self.client.notify(message.payload)
        elapsed = self.clock.monotonic() - started
        outcome = classify(
            status=response.status,
            body=response.body,
            retry_after=response.retry_after,
            error=response.error,
            location=response.location,
            now=self.clock.now(),
        )
        self._record(message, response, outcome, elapsed)
        return outcome

    def _record(
        self, message: OutboxMessage, response: Response, outcome: Outcome, elapsed_s: float
    ) -> None:
        endpoint = "sync_trigger" if message.kind == "trigger" else "availability_notify"
        code = str(response.status) if response.status is not None else "none"
        self.metrics.request_duration.labels(endpoint).observe(elapsed_s)
        self.metrics.deliveries.labels(endpoint, outcome.verdict.value, code).inc()
        fields = {"message_id": message.id, "status": response.status, **_slot_fields(message)}
        now = self.clock.now()
        verdict = outcome.verdict
        if verdict in (Verdict.DELIVERED, Verdict.NOT_UPDATED):
            self.store.complete(message)
            self.metrics.last_delivery.set(now.timestamp())
            self.tally.counts[f"{message.kind}_sent"] += 1
            if self.pause is not None:
                self.resume()
            if verdict is Verdict.NOT_UPDATED:
                self.metrics.not_updated.inc()
                self.tally.counts["not_updated"] += 1
                event(log, logging.WARNING, "notify.not_updated", outcome.reason, **fields)
            else:
                name = "trigger.sent" if message.kind == "trigger" else "notify.sent"
                event(log, logging.INFO, name, f"{message.kind} delivered", **fields)
            return
        if verdict is Verdict.PAUSE:
            self.tally.note_problem(outcome.reason)
            self.store.retry_later(
                message,
                at=now,
                error=outcome.reason,
                status=response.status,
                count_attempt=False,
            )
            first = self.pause is None
            self.pause = Pause(
                outcome.reason,
                since=self.pause.since if self.pause else now,
                probe_at=now + timedelta(seconds=self.probe_interval_s),
            )
            self.metrics.paused.set(1)
            event(
                log,
                logging.ERROR,
                "delivery.paused",
                f"{outcome.reason}; delivery paused, nothing is lost, probing every "
                f"{self.probe_interval_s:g} s"
                if first
                else f"still refused: {outcome.reason}",
                **fields,
            )
            return
        if verdict is Verdict.REJECTED:
            self.tally.note_problem(outcome.reason)
            self.tally.counts["dead"] += 1
            self.store.dead_letter(message, error=outcome.reason, status=response.status)
            self.metrics.dead_letters.inc()
            event(log, logging.ERROR, "delivery.rejected", outcome.reason, **fields)
            return
        failures = message.attempts + 1
        delay = retry_delay_s(failures, outcome, self.policy, self.rand())
        if delay is None:
            reason = f"gave up after {failures} attempts; last: {outcome.reason}"
            self.tally.note_problem(reason)
            self.tally.counts["dead"] += 1
            self.store.dead_letter(message, error=reason, status=response.status)
            self.metrics.dead_letters.inc()
            event(log, logging.ERROR, "delivery.dead_letter", reason, **fields)
            return
        self.tally.note_problem(outcome.reason)
        self.tally.counts["retried"] += 1
        self.metrics.retries.inc()
        self.store.retry_later(
            message,
            at=now + timedelta(seconds=delay),
            error=outcome.reason,
            status=response.status,
        )
        event(
            log,
            logging.WARNING,
            "delivery.retry",
            f"{outcome.reason}; retry {failures} in {delay:.1f} s",
            **fields,
        )

    def run(self, stop: threading.Event, wake: threading.Event) -> None:
        """Deliver until `stop` is set; `wake` cuts an idle wait short (a scan enqueued work)."""
        while not stop.is_set():
            try:
                attempted = self.step()
            except Exception:
                log.exception(
                    "delivery step failed; retrying shortly", extra={"event": "delivery.error"}
                )
                attempted = 0
                stop.wait(IDLE_WAIT_S)
            if attempted == 0:
                wake.wait(IDLE_WAIT_S)
                wake.clear()


def _slot_fields(message: OutboxMessage) -> dict[str, object]:
    if message.payload is None:
        return {}
    return {
        "product": message.payload.get("productId"),
        "option": message.payload.get("optionId"),
        "slot": message.payload.get("availabilityId"),
        "slot_status": message.payload.get("status"),
    }
