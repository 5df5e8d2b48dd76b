"""The delivery loop: claim due messages from the outbox, send them, record what happened.

`concurrency` workers share one HTTP client, one rate limit and one circuit breaker. Order
is kept by the outbox itself: a claim never takes a notify while an older trigger waits, nor
a message while an older one for the same slot is in flight.

While Seyaha refuses the secret (401/403), does not know the integration (404) or redirects,
delivery pauses: nothing is dropped, and one message is retried every `probe_interval_s` as a
probe. After `breaker.threshold` retryable failures in a row the circuit breaker opens and only
one probe goes out per cooldown, so a dead Seyaha is probed, not hammered.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy.exc import SQLAlchemyError

from agent.clock import Clock
from agent.delivery.client import Response, SeyahaClient
from agent.delivery.flow import BreakerState, CircuitBreaker, RateLimit
from agent.delivery.policy import Outcome, RetryPolicy, Verdict, classify, retry_delay_s
from agent.errors import first_line
from agent.logs import event
from agent.metrics import Metrics
from agent.model import OutboxMessage
from agent.store import StateStore

log = logging.getLogger("agent.delivery")

IDLE_WAIT_S = 1.0
"""Longest sleep when nothing is due: a scan that queues work wakes the workers sooner."""


def idle_wait_s(retry_at: float, looked_at: float, now: float) -> float:
    """How long an idle worker sleeps (monotonic seconds): until the earliest retry this
    process scheduled (`retry_at`, 0 for none), unless the look at the queue that just found
    nothing (begun at `looked_at`) began after it was due; at most IDLE_WAIT_S.

    A retry that fell due while that look was under way was not seen by it: the worker looks
    again at once instead of sleeping a whole IDLE_WAIT_S past it."""
    if retry_at <= looked_at:
        return IDLE_WAIT_S
    return max(0.0, min(IDLE_WAIT_S, retry_at - now))


LAST_DELIVERY_EVERY_S = 1.0
"""The last-delivery time is written to the store at most this often (seconds)."""


TURN_S = 0.1
"""On a platform a worker claims about this long of sending at a time (by the answer time
and its share of rate_limit): one integration's backlog holds the others back by about this
long per worker, not by a batch_size of calls at the rate limit (4 s at the defaults)."""

CLAIM_WORK_S = 1.0
"""A worker claims about this many seconds of work at a time (by the recent answer time),
up to batch_size: with slow answers the others take the rest instead of idling while one
worker sends a long batch in series."""

STUCK_CALL_S = CLAIM_WORK_S
"""A call running longer than this lets an idle worker take over the rest of its batch
(seconds): one answer slower than all before it (a trickling proxy, a stalled Seyaha) must
not hold up the messages claimed behind it until its deadline."""

ANSWER_TIME_WEIGHT = 0.2
"""Weight of the newest answer in the moving average of answer times."""

SUPERSEDED_CHECK_S = 0.5
"""How often a worker sending a batch looks for newer states queued for its slots (seconds)."""

RELEASE_TRIES = 3
RELEASE_RETRY_S = 0.1
"""Tries, and the pause between them (seconds), to give unsent messages back to a store that
fails."""

RETRY_WAKE_MARGIN_S = 0.01
"""A worker waiting for a retry wakes this much after it is due (seconds), so that the claim
it makes then finds the message due rather than a millisecond early."""

INTERRUPTED_RECORD_S = 1.0
"""At shutdown, how long workers get to record the calls cut short once shutdown_grace is over
(seconds): one write each to the outbox."""

COMPLETE_EVERY_S = 0.5
"""Successful calls of a batch are removed from the outbox together, at the end of the batch
or once the oldest of them waited this long (seconds). Until then each stays leased, so it
is neither sent again nor overtaken by a newer message for its slot; a crash before the
removal re-sends it once its lease runs out (Seyaha receives the same absolute state twice)."""


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
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, name: str, amount: int = 1) -> None:
        with self._lock:
            self.counts[name] += amount

    def note_problem(self, reason: str) -> None:
        with self._lock:
            if reason not in self.problems:
                self.problems.append(reason)


class Completions:
    """Successful calls of one worker's batch, removed from the outbox in one transaction."""

    def __init__(self, store: StateStore, clock: Clock) -> None:
        self.store = store
        self.clock = clock
        self._messages: list[OutboxMessage] = []
        self._since = 0.0

    def add(self, message: OutboxMessage) -> None:
        if not self._messages:
            self._since = self.clock.monotonic()
        self._messages.append(message)

    def flush_if_due(self) -> None:
        if self._messages and self.clock.monotonic() - self._since >= COMPLETE_EVERY_S:
            self.flush()

    def flush(self) -> None:
        """Remove the successes from the outbox. If the store fails, they are kept here and
        removed at the next flush: the removal (id and lease token) is safe to repeat, and
        dropping it would leave each success to be sent again once its lease runs out."""
        if self._messages:
            self.store.queue.complete_many(self._messages)
            self._messages = []

    @property
    def waiting(self) -> bool:
        return bool(self._messages)


@dataclass(eq=False)
class _Batch:
    """One worker's claimed messages, shared with the other workers: while one of its calls
    runs past STUCK_CALL_S, an idle worker takes over the part it has not reached."""

    messages: list[OutboxMessage]
    leased_until: datetime
    lost: set[int] = field(default_factory=set)
    """Messages not to send: taken by another claim, or superseded."""
    end: int = -1
    """messages[:end] are the owner's; [end:] were taken over by another worker."""
    next: int = 0
    """messages[next:end] have not been reached by the owner yet."""
    call_since: float | None = None
    """Monotonic start of the owner's call in flight, if one is."""

    def __post_init__(self) -> None:
        if self.end < 0:
            self.end = len(self.messages)


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
        request_s: float = 0.0,
        concurrency: int = 1,
        rate_limit: RateLimit | None = None,
        breaker: CircuitBreaker | None = None,
        rand: Callable[[], float] = random.random,
        turns: bool = False,
        integration_rate: float = 0.0,
    ) -> None:
        self.store = store
        self.client = client
        self.clock = clock
        self.metrics = metrics
        self.policy = policy
        self.lease_s = lease_s
        self.batch_size = batch_size
        self.request_s = request_s
        """The longest a request can take (connect_timeout + timeout): a message is sent only
        while its lease has at least this long to run, extended first if need be."""
        self._retry_at = 0.0
        """Monotonic time of the earliest retry this process scheduled (0: none ahead)."""
        self._answer_s: float | None = None
        """Moving average of recent answer times (seconds), for the claim size."""
        self.probe_interval_s = probe_interval_s
        self.concurrency = concurrency
        self.rate_limit = rate_limit or RateLimit(0)
        self.breaker = breaker or CircuitBreaker()
        self.rand = rand
        self.pause: Pause | None = None
        self.turns = turns
        """A platform: integrations take turns at the claim (see _claim)."""
        self._turn = ""
        """The integration the last claim ended with: the next takes those after it."""
        self.integration_rate = integration_rate
        """A platform: calls per second at most per integration (0: only rate_limit)."""
        self._limits: dict[str, RateLimit] = {}
        self._breakers: dict[str, CircuitBreaker] = {}
        """A platform: each integration's own breaker, kept only while it has failures (the
        shared one still opens when every integration fails: Seyaha itself is down)."""
        self.paused: dict[str, Pause] = {}
        """A platform's integrations paused on their own (refused secret or id, no secret
        file): their messages wait, one probe per integration every probe_interval_s, while
        the others flow."""
        self.tally = Tally()
        self._lock = threading.Lock()
        self._batches: set[_Batch] = set()
        """Every worker's batch in progress (see _take_over)."""
        self._batches_lock = threading.Lock()
        self._stepping = 0
        """Workers inside step() now (busy)."""
        self._work = threading.Condition()
        self._generation = 0
        self._last_delivery_written = 0.0
        self._stale_status_cleared = False
        self._stale_pauses: set[str] = set()
        """Integrations whose pause an earlier process recorded (cleared at their success)."""

    # -- wake-ups -----------------------------------------------------------------------

    def poke(self, messages: int | None = None) -> None:
        """New work was queued: wake idle workers now; with `messages`, only as many as can
        take a batch of them (one for a single booking: the others would open a write
        transaction on the outbox just to find nothing). None wakes every worker (shutdown)."""
        with self._work:
            self._generation += 1
            if messages is None:
                self._work.notify_all()
            else:
                self._work.notify(max(1, -(-messages // self.claim_size())))

    def _idle(self, seen: int, stop: threading.Event, looked_at: float) -> None:
        """Sleep until new work is poked, a retry falls due, or IDLE_WAIT_S passes; `looked_at`
        is when the step that found nothing began."""
        with self._work:
            if self._generation == seen and not stop.is_set():
                wait = idle_wait_s(self._retry_at, looked_at, self.clock.monotonic())
                if wait > 0:
                    self._work.wait(wait)

    def _retry_due_in(self, seconds: float) -> None:
        with self._work:
            now = self.clock.monotonic()
            if self._retry_at <= now or now + seconds < self._retry_at:
                self._retry_at = now + seconds

    # -- pause --------------------------------------------------------------------------

    def resume(self) -> None:
        """Lift a pause at once (the secret or integration id was changed)."""
        with self._lock:
            was = self.pause
            self.pause = None
        self.metrics.paused.set(0)
        if was is not None:
            self.store.coordination.set_status("pause", None)
            event(log, logging.INFO, "delivery.resumed", "delivery resumed")

    def _held_back(self, now: datetime) -> list[str]:
        """The paused integrations whose next probe is not due, and those whose own breaker
        is open: the claim skips them."""
        mono = self.clock.monotonic()
        with self._lock:
            held = [i for i, p in self.paused.items() if now < p.probe_at]
            held += [i for i, b in self._breakers.items() if b.wait_s(mono) > 0]
        return held

    def _own_breaker(self, integration_id: str, *, create: bool = False) -> CircuitBreaker | None:
        """A platform's integration's own breaker (made at its first failure)."""
        if not self.turns or not integration_id:
            return None
        with self._lock:
            found = self._breakers.get(integration_id)
            if found is None and create:
                found = self._breakers[integration_id] = CircuitBreaker(
                    threshold=self.breaker.threshold,
                    cooldown_s=self.breaker.cooldown_s,
                    max_cooldown_s=self.breaker.max_cooldown_s,
                )
            return found

    def forget_idle_pauses(self) -> None:
        """Lift the pauses of integrations with nothing left waiting (their messages expired
        or were delivered by another agent), this process's and those recorded in the store:
        a pause is about messages that cannot go out, and `outbox status` would otherwise
        report it for good."""
        with self._lock:
            mine = set(self.paused)
        recorded = {
            name.removeprefix("pause:")
            for name in self.store.coordination.status()
            if name.startswith("pause:")
        }
        candidates = sorted(mine | recorded)
        if not candidates:
            return
        idle = set(candidates) - self.store.admin.waiting_of(candidates)
        for integration in sorted(idle):
            if integration in mine:
                self._resume_integration(integration)
            else:
                self.store.coordination.set_status(f"pause:{integration}", None)

    def _own_neutral(self, integration_id: str) -> None:
        """A call (or a message dropped unsent) that tells nothing of the integration's own
        health: a probe its half-open breaker granted is over."""
        own = self._own_breaker(integration_id)
        if own is not None:
            own.neutral()

    def _may_go(self, message: OutboxMessage, now: datetime) -> bool:
        """Whether a claimed message may be sent now, as far as its own integration goes:
        not paused (or this is its probe), and its own breaker lets a call through."""
        if self.paused and not self._probe_or_hold(message.integration_id, now):
            return False
        own = self._own_breaker(message.integration_id)
        return own is None or own.allow(self.clock.monotonic())

    def _wait_for_rate(self, integration_id: str) -> float:
        """Seconds to wait before the next call: the shared rate limit, and the
        integration's own (integration_rate_limit)."""
        mono = self.clock.monotonic()
        wait = self.rate_limit.reserve(mono)
        if self.integration_rate > 0 and integration_id:
            with self._lock:
                limit = self._limits.get(integration_id)
                if limit is None:
                    # No burst: integration_rate_limit caps what one tenant receives in
                    # any second (rate_burst lets a burst through the shared limit only).
                    limit = self._limits[integration_id] = RateLimit(self.integration_rate)
            wait = max(wait, limit.reserve(mono))
        return wait

    def _probe_or_hold(self, integration_id: str, now: datetime) -> bool:
        """Whether a claimed message of `integration_id` may go out now: it is not paused, or
        it is the one probe of its pause (which moves the next probe on)."""
        with self._lock:
            pause = self.paused.get(integration_id)
            if pause is None:
                return True
            if now < pause.probe_at:
                return False
            pause.probe_at = now + timedelta(seconds=self.probe_interval_s)
            return True

    def _resume_integration(self, integration_id: str) -> None:
        with self._lock:
            was = self.paused.pop(integration_id, None)
            count = len(self.paused)
        if was is None:
            return
        self.metrics.integrations_paused.set(count)
        self.store.coordination.set_status(f"pause:{integration_id}", None)
        event(
            log,
            logging.INFO,
            "delivery.resumed",
            f"integration {integration_id}: delivery resumed",
            integration=integration_id,
        )

    def _claim(self, now: datetime, limit: int) -> list[OutboxMessage]:
        """Claim a batch. On a platform, from the integrations after the one the last claim
        ended with, in id order (then from the first again): an integration with a backlog
        of any size sends one batch per round, and the others' changes go out between."""
        queue, skip = self.store.queue, self._held_back(now)
        if not self.turns:
            return queue.claim(now, limit=limit, lease_s=self.lease_s, skip=skip)
        with self._lock:
            after = self._turn
        claimed = queue.claim(now, limit=limit, lease_s=self.lease_s, skip=skip, after=after)
        if not claimed and after:
            # Round again, from the first integration.
            claimed = queue.claim(now, limit=limit, lease_s=self.lease_s, skip=skip, after="")
        if not claimed:
            # Messages that name no integration (queued before the platform's configuration):
            # claimed last, to be given up on with the reason.
            claimed = queue.claim(now, limit=limit, lease_s=self.lease_s, skip=skip)
        with self._lock:
            self._turn = max((m.integration_id for m in claimed), default="")
        return claimed

    def claim_size(self) -> int:
        """How many messages one claim takes: about CLAIM_WORK_S of sending at the recent
        answer time, at least 1, at most batch_size. On a platform, about TURN_S of sending,
        at the answer time and at this worker's share of rate_limit: a batch holds the turn
        of one integration, and another's change waits for the batches under way."""
        answer_s = self._answer_s
        size = self.batch_size if not answer_s else int(CLAIM_WORK_S / answer_s)
        if self.turns:
            if answer_s:
                size = min(size, int(TURN_S / answer_s))
            rate = self.rate_limit.rate_per_s
            if rate > 0:
                size = min(size, int(TURN_S * rate / self.concurrency))
        return max(1, min(self.batch_size, size))

    def _note_answer_time(self, seconds: float) -> None:
        previous = self._answer_s
        self._answer_s = (
            seconds if previous is None else previous + ANSWER_TIME_WEIGHT * (seconds - previous)
        )

    def _may_send(self, now: datetime) -> tuple[bool, int]:
        """Whether this worker may claim now, and how many messages at most."""
        with self._lock:
            if self.pause is None:
                return True, self.claim_size()
            if now < self.pause.probe_at:
                return False, 0
            # One probe: push the next probe time forward so no other worker probes too.
            self.pause.probe_at = now + timedelta(seconds=self.probe_interval_s)
            return True, 1

    # -- one batch ----------------------------------------------------------------------

    def step(self, stop: threading.Event | None = None, done: Completions | None = None) -> int:
        """Claim and process one batch (see _step), counted while it runs (busy)."""
        with self._batches_lock:
            self._stepping += 1
        try:
            return self._step(stop, done)
        finally:
            with self._batches_lock:
                self._stepping -= 1

    def busy(self) -> bool:
        """Whether a worker is claiming or sending now: a reconciliation steps aside for it
        (Agent._give_way)."""
        return self._stepping > 0

    def _step(self, stop: threading.Event | None, done: Completions | None) -> int:
        """Claim and process one batch (or take over the rest of a batch stuck behind a long
        call); returns how many messages were attempted. `done` carries a worker's successes
        from batch to batch while the store cannot take them."""
        stop = stop or threading.Event()
        done = done or Completions(self.store, self.clock)
        done.flush()  # successes an earlier batch could not record go first
        now = self.clock.now()
        allowed, limit = self._may_send(now)
        if not allowed or self.breaker.wait_s(self.clock.monotonic()) > 0:
            return 0
        batch = self._take_over()
        if batch is None:
            claimed = self._claim(now, limit)
            batch = _Batch(claimed, now + timedelta(seconds=self.lease_s))
            checked = self.clock.monotonic()
        else:
            checked = 0.0  # messages that waited behind a long call: checked before sending
        claimed = batch.messages
        lost = batch.lost
        attempted = 0
        unsent = 0  # claimed[unsent:batch.end] have not been sent yet
        held: list[OutboxMessage] = []  # of integrations paused meanwhile: given back
        with self._batches_lock:
            self._batches.add(batch)
        try:
            for index, message in enumerate(claimed):
                unsent = index
                if (
                    index >= batch.end  # another worker took over the rest
                    or stop.is_set()
                    or (self.pause is not None and attempted > 0)
                    or not self.breaker.allow(self.clock.monotonic())
                ):
                    break
                wait = self._wait_for_rate(message.integration_id)
                if wait > 0 and stop.wait(wait):
                    break
                with suppress(SQLAlchemyError):  # kept, and recorded at a later flush
                    done.flush_if_due()
                if self.clock.monotonic() - checked >= SUPERSEDED_CHECK_S:
                    # A scan may have queued a newer state for a slot of this batch while it
                    # waited behind slow answers: that one goes out instead, never after it.
                    checked = self.clock.monotonic()
                    rest = [m for m in claimed[index : batch.end] if m.id not in lost]
                    lost |= self.store.queue.drop_superseded(rest)
                if self.clock.now() + timedelta(seconds=self.request_s) >= batch.leased_until:
                    # Slow answers ate the lease: renew it before sending, or another worker
                    # could take the message while this one's call is still in flight.
                    batch.leased_until = self.clock.now() + timedelta(seconds=self.lease_s)
                    rest = [m for m in claimed[index : batch.end] if m.id not in lost]
                    lost |= {m.id for m in rest} - self.store.queue.extend(
                        rest, until=batch.leased_until
                    )
                if (
                    message.id not in lost
                    and (self.paused or self._breakers)
                    and not self._may_go(message, self.clock.now())
                ):
                    # Its integration is paused or its own breaker is open: given back at
                    # the end of the batch. Asked last, so that a probe it grants is a call.
                    held.append(message)
                    lost.add(message.id)
                if message.id not in lost:  # else another worker holds it, or it is stale
                    unsent = index + 1
                    with self._batches_lock:
                        if index >= batch.end:
                            unsent = index
                            break
                        batch.next, batch.call_since = index + 1, self.clock.monotonic()
                    try:
                        self.process(message, done)
                    finally:
                        with self._batches_lock:
                            batch.call_since = None
                    attempted += 1
                    self._share(claimed[index + 1 : batch.end], lost)
            else:
                unsent = len(claimed)
        finally:
            with self._batches_lock:
                self._batches.discard(batch)
                end = batch.end
            # Whatever stopped the batch (a stop, a pause, an open breaker, a store that
            # failed), what was not sent is given back now rather than when its lease runs out.
            rest = held + [m for m in claimed[unsent:end] if m.id not in lost]
            if rest:
                with suppress(SQLAlchemyError):
                    self._release(rest)
            done.flush()
        return attempted

    def _take_over(self) -> _Batch | None:
        """The unreached rest of another worker's batch whose call has run past STUCK_CALL_S,
        as a batch of this worker's (under the same lease), or None."""
        now = self.clock.monotonic()
        with self._batches_lock:
            for other in self._batches:
                if other.call_since is None or now - other.call_since < STUCK_CALL_S:
                    continue
                rest = [m for m in other.messages[other.next : other.end] if m.id not in other.lost]
                if not rest:
                    continue
                other.end = other.next
                return _Batch(rest, other.leased_until)
        return None

    def _share(self, rest: list[OutboxMessage], lost: set[int]) -> None:
        """Give back the part of a batch that the recent answer time says this worker will
        not reach soon, so that idle workers take it (answers slowed down after the claim)."""
        if self.pause is not None:
            return  # the batch stops at the next message and gives the rest back anyway
        keep = self.claim_size()
        waiting = [m for m in rest if m.id not in lost]
        if len(waiting) <= keep:
            return
        tail = waiting[keep:]
        with suppress(SQLAlchemyError):  # kept, and sent by this worker in turn
            self._release(tail)
            lost.update(m.id for m in tail)
            self.poke(len(tail))

    def _release(self, messages: list[OutboxMessage]) -> None:
        """Give claimed but unsent messages back at once, without counting an attempt. The
        release is retried a few times: it is safe to repeat, and a lost one leaves the
        messages waiting for their lease to run out."""
        now = self.clock.now()
        for attempt in range(1, RELEASE_TRIES + 1):
            try:
                self.store.queue.release_many(messages, at=now)
                return
            except SQLAlchemyError:
                if attempt == RELEASE_TRIES:
                    raise
                time.sleep(RELEASE_RETRY_S)

    def process(self, message: OutboxMessage, done: Completions) -> Outcome:
        """Send one claimed message and record the outcome (a success through `done`)."""
        now = self.clock.now()
        if message.kind == "notify" and message.slot_start is not None and message.slot_start < now:
            self.store.queue.discard(message)
            self._own_neutral(message.integration_id)
            self.metrics.expired.inc()
            self.tally.add("expired")
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
            response = self.client.trigger(message.integration_id)
        else:
            assert message.body is not None
            response = self.client.notify(message.body, message.integration_id)
        if response.interrupted:
            self._own_neutral(message.integration_id)
            return self._interrupted(message, response)
        elapsed = self.clock.monotonic() - started
        self._note_answer_time(elapsed)
        outcome = classify(
            status=response.status,
            body=response.body,
            retry_after=response.retry_after,
            error=response.error,
            location=response.location,
            now=self.clock.now(),
            unsent=response.unsent,
            routed=bool(message.integration_id),
        )
        self._record(message, response, outcome, elapsed, done)
        return outcome

    def _interrupted(self, message: OutboxMessage, response: Response) -> Outcome:
        """The call was cut short at shutdown: Seyaha may or may not have it, and it says
        nothing about Seyaha (no attempt counted, the breaker untouched). The message is due
        at once, for the next start, instead of held until its lease runs out."""
        reason = response.error or "cut short at shutdown"
        self.store.queue.retry_later(
            message, at=self.clock.now(), error=reason, status=None, count_attempt=False
        )
        event(
            log,
            logging.WARNING,
            "delivery.interrupted",
            f"{reason}; the message is sent again at the next start",
            message_id=message.id,
            **_slot_fields(message),
        )
        return Outcome(Verdict.RETRY, reason)

    def _record(
        self,
        message: OutboxMessage,
        response: Response,
        outcome: Outcome,
        elapsed_s: float,
        done: Completions,
    ) -> None:
        endpoint = "sync_trigger" if message.kind == "trigger" else "availability_notify"
        code = str(response.status) if response.status is not None else "none"
        self.metrics.request_duration.labels(endpoint).observe(elapsed_s)
        self.metrics.deliveries.labels(endpoint, outcome.verdict.value, code).inc()
        fields = {"message_id": message.id, "status": response.status, **_slot_fields(message)}
        now = self.clock.now()
        verdict = outcome.verdict
        if verdict in (Verdict.PAUSE, Verdict.REJECTED):
            self._own_neutral(message.integration_id)  # says nothing of its own health
        if verdict in (Verdict.DELIVERED, Verdict.NOT_UPDATED):
            self._delivered(message, verdict, outcome, fields, now, done)
        elif verdict is Verdict.PAUSE and outcome.scope == "integration" and message.integration_id:
            self._paused_integration(message, response, outcome, fields, now)
        elif verdict is Verdict.PAUSE:
            self._paused(message, response, outcome, fields, now)
        elif verdict is Verdict.REJECTED:
            self.breaker.neutral()
            self._dead(message, outcome.reason, response.status, fields, "delivery.rejected")
        else:
            self._retry(message, response, outcome, fields, now)

    def _delivered(
        self,
        message: OutboxMessage,
        verdict: Verdict,
        outcome: Outcome,
        fields: dict[str, object],
        now: datetime,
        done: Completions,
    ) -> None:
        done.add(message)
        self.metrics.last_delivery.set(now.timestamp())
        self.metrics.delivery_latency.labels(
            "sync_trigger" if message.kind == "trigger" else "availability_notify"
        ).observe(max(0.0, (now - message.created_at).total_seconds()))
        self.tally.add(f"{message.kind}_sent")
        if self.breaker.success():
            self._breaker_changed()
        own = self._own_breaker(message.integration_id)
        if own is not None:
            with self._lock:
                self._breakers.pop(message.integration_id, None)
            if own.success():
                self._own_breaker_changed(message.integration_id, own)
        if self.pause is not None:
            self.resume()
        if not self._stale_status_cleared:
            self._clear_stale_status()
        if message.integration_id in self.paused:
            self._resume_integration(message.integration_id)
        elif message.integration_id in self._stale_pauses:
            # Recorded by an earlier process: this success ends it.
            self._stale_pauses.discard(message.integration_id)
            self.store.coordination.set_status(f"pause:{message.integration_id}", None)
        mono = self.clock.monotonic()
        if mono - self._last_delivery_written >= LAST_DELIVERY_EVERY_S:
            self._last_delivery_written = mono
            self.store.coordination.set_status("last_delivery", now.isoformat())
        if verdict is Verdict.NOT_UPDATED:
            self.metrics.not_updated.inc()
            self.tally.add("not_updated")
            event(log, logging.WARNING, "notify.not_updated", outcome.reason, **fields)
        else:
            name = "trigger.sent" if message.kind == "trigger" else "notify.sent"
            event(log, logging.INFO, name, f"{message.kind} delivered", **fields)

    def _clear_stale_status(self) -> None:
        """At this deliverer's first success: a pause or an open breaker recorded by an earlier
        process (or before a reload) is over, but only a transition of this one's would have
        cleared it, and `outbox status` would show it for good."""
        self._stale_status_cleared = True
        recorded = self.store.coordination.status()
        self._stale_pauses = {
            name.removeprefix("pause:") for name in recorded if name.startswith("pause:")
        }
        if "pause" in recorded and self.pause is None:
            self.store.coordination.set_status("pause", None)
        if recorded.get("breaker", "closed") != "closed" and (
            self.breaker.state is BreakerState.CLOSED
        ):
            self.store.coordination.set_status("breaker", BreakerState.CLOSED.value)

    def _paused(
        self,
        message: OutboxMessage,
        response: Response,
        outcome: Outcome,
        fields: dict[str, object],
        now: datetime,
    ) -> None:
        self.tally.note_problem(outcome.reason)
        self.breaker.neutral()
        # The pause first: once the message is due again, an idle worker could otherwise
        # claim and send it before it hears of the pause (a second refused call).
        with self._lock:
            first = self.pause is None
            self.pause = Pause(
                outcome.reason,
                since=self.pause.since if self.pause else now,
                probe_at=now + timedelta(seconds=self.probe_interval_s),
            )
        self.store.queue.retry_later(
            message, at=now, error=outcome.reason, status=response.status, count_attempt=False
        )
        self.metrics.paused.set(1)
        if first:
            self.store.coordination.set_status("pause", f"{now.isoformat()} {outcome.reason}")
            event(
                log,
                logging.ERROR,
                "delivery.paused",
                f"{outcome.reason}; delivery paused, nothing is lost, probing every "
                f"{self.probe_interval_s:g} s",
                **fields,
            )
        else:
            event(
                log, logging.ERROR, "delivery.paused", f"still refused: {outcome.reason}", **fields
            )

    def _paused_integration(
        self,
        message: OutboxMessage,
        response: Response,
        outcome: Outcome,
        fields: dict[str, object],
        now: datetime,
    ) -> None:
        """Pause the message's integration alone: its messages wait (this one is due again
        at once, for the next probe), the other integrations' flow."""
        integration = message.integration_id
        self.tally.note_problem(f"integration {integration}: {outcome.reason}")
        self.breaker.neutral()
        with self._lock:
            was = self.paused.get(integration)
            self.paused[integration] = Pause(
                outcome.reason,
                since=was.since if was else now,
                probe_at=now + timedelta(seconds=self.probe_interval_s),
            )
            count = len(self.paused)
        self.store.queue.retry_later(
            message, at=now, error=outcome.reason, status=response.status, count_attempt=False
        )
        self.metrics.integrations_paused.set(count)
        if was is None or was.reason != outcome.reason:
            self.store.coordination.set_status(
                f"pause:{integration}", f"{now.isoformat()} {outcome.reason}"
            )
            event(
                log,
                logging.ERROR,
                "delivery.paused",
                f"integration {integration}: {outcome.reason}; its delivery is paused, nothing "
                f"is lost, probing every {self.probe_interval_s:g} s; other integrations go on",
                integration=integration,
                **fields,
            )
        else:
            event(
                log,
                logging.WARNING,
                "delivery.paused",
                f"integration {integration}: still refused: {outcome.reason}",
                integration=integration,
                **fields,
            )

    def _dead(
        self,
        message: OutboxMessage,
        reason: str,
        status: int | None,
        fields: dict[str, object],
        name: str,
    ) -> None:
        self.tally.note_problem(reason)
        self.tally.add("dead")
        self.store.queue.dead_letter(message, error=reason, status=status, at=self.clock.now())
        self.metrics.dead_letters.inc()
        event(log, logging.ERROR, name, reason, **fields)

    def _retry(
        self,
        message: OutboxMessage,
        response: Response,
        outcome: Outcome,
        fields: dict[str, object],
        now: datetime,
    ) -> None:
        if self.breaker.failure(self.clock.monotonic()):
            self._breaker_changed()
        own = self._own_breaker(message.integration_id, create=True)
        if own is not None and own.failure(self.clock.monotonic()):
            self._own_breaker_changed(message.integration_id, own)
        failures = message.attempts + 1
        age = (now - message.created_at).total_seconds()
        delay = retry_delay_s(failures, outcome, self.policy, self.rand(), age)
        if delay is None:
            budget = (
                f"{failures} attempts"
                if failures >= self.policy.max_attempts
                else f"{age / 3600:.1f} h"
            )
            reason = f"gave up after {budget}; last: {outcome.reason}"
            self._dead(message, reason, response.status, fields, "delivery.dead_letter")
            return
        self.tally.note_problem(outcome.reason)
        self.tally.add("retried")
        self.metrics.retries.inc()
        self.store.queue.retry_later(
            message,
            at=now + timedelta(seconds=delay),
            error=outcome.reason,
            status=response.status,
        )
        self._retry_due_in(delay + RETRY_WAKE_MARGIN_S)
        event(
            log,
            logging.WARNING,
            "delivery.retry",
            f"{outcome.reason}; retry {failures} in {delay:.1f} s",
            **fields,
        )

    def _own_breaker_changed(self, integration_id: str, breaker: CircuitBreaker) -> None:
        with self._lock:
            opened = sum(b.state is not BreakerState.CLOSED for b in self._breakers.values())
        self.metrics.integrations_breaker_open.set(opened)
        if breaker.state is BreakerState.CLOSED:
            event(
                log,
                logging.INFO,
                "breaker.closed",
                f"integration {integration_id}: Seyaha accepts its calls again; circuit closed",
                integration=integration_id,
            )
        else:
            event(
                log,
                logging.ERROR,
                "breaker.open",
                f"integration {integration_id}: {breaker.threshold} failures in a row: its "
                f"circuit is open, one probe every {breaker.current_cooldown_s:g} s; other "
                "integrations go on",
                integration=integration_id,
            )

    def _breaker_changed(self) -> None:
        state = self.breaker.state
        # The shared record first: whoever sees the gauge change finds it already written.
        self.store.coordination.set_status("breaker", state.value)
        self.metrics.breaker_open.set(0 if state is BreakerState.CLOSED else 1)
        if state is BreakerState.CLOSED:
            event(log, logging.INFO, "breaker.closed", "Seyaha answers again; circuit closed")
        else:
            event(
                log,
                logging.ERROR,
                "breaker.open",
                f"{self.breaker.threshold} failures in a row: circuit open, one probe every "
                f"{self.breaker.current_cooldown_s:g} s until Seyaha answers",
            )

    # -- the loops ----------------------------------------------------------------------

    def work(self, stop: threading.Event) -> None:
        """One worker: deliver until `stop` is set."""
        done = Completions(self.store, self.clock)
        while not stop.is_set():
            seen = self._generation
            looked_at = self.clock.monotonic()
            try:
                attempted = self.step(stop, done)
            except Exception as exc:
                log.exception(
                    "delivery step failed; retrying shortly", extra={"event": "delivery.error"}
                )
                # For `once`'s summary: a store locked past its wait limit (SQLite's busy
                # timeout) leaves messages waiting, and "not yet due" would be untrue.
                what = "the state store" if isinstance(exc, SQLAlchemyError) else "delivery"
                self.tally.note_problem(f"{what} failed: {first_line(exc)} (retried)")
                attempted = 0
                looked_at = self.clock.monotonic()  # no look was made: wait, do not spin
            if attempted == 0:
                self._idle(seen, stop, looked_at)
        with suppress(SQLAlchemyError):
            done.flush()  # a last try for successes the store could not take

    def run(self, stop: threading.Event, grace_s: float = 30.0) -> None:
        """Run `concurrency` workers until `stop` is set; then let in-flight calls finish
        (at most `grace_s`), unsent claims having been given back. Calls still in flight
        then are cut short and their messages given back too (INTERRUPTED_RECORD_S more)."""
        workers = [
            threading.Thread(target=self.work, args=(stop,), name=f"delivery-{n}", daemon=True)
            for n in range(self.concurrency)
        ]
        for worker in workers:
            worker.start()
        stop.wait()
        self.poke()
        _join(workers, self.clock.monotonic() + grace_s, self.clock)
        stuck = [worker for worker in workers if worker.is_alive()]
        if stuck:
            # Left running, their calls would end with the process, and their messages stay
            # leased (unsendable by the next start) until the lease runs out.
            event(
                log,
                logging.WARNING,
                "delivery.grace_over",
                f"{len(stuck)} worker(s) still busy after shutdown_grace ({grace_s:g} s): "
                "their calls are cut short",
            )
            self.client.interrupt()
            _join(stuck, self.clock.monotonic() + INTERRUPTED_RECORD_S, self.clock)


def _join(threads: list[threading.Thread], deadline: float, clock: Clock) -> None:
    """Wait for `threads` until `deadline` (clock.monotonic()) at the latest, all together."""
    for thread in threads:
        thread.join(max(0.0, deadline - clock.monotonic()))


def _slot_fields(message: OutboxMessage) -> dict[str, object]:
    if message.payload is None:
        return {}
    return {
        "product": message.payload.get("productId"),
        "option": message.payload.get("optionId"),
        "slot": message.payload.get("availabilityId"),
        "slot_status": message.payload.get("status"),
    }
