"""Properties of the outbox's coalescing rules, on a real SQLite store: however scans, claims
and completions interleave, a slot has at most one waiting message, catalog changes at most
one waiting trigger, a notify never overtakes an older trigger, and the last state queued
for a slot is the last one sent."""

from __future__ import annotations

import shutil
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import sqlalchemy as sa
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from agent.model import (
    TRIGGER_DEDUPE_KEY,
    CatalogDiff,
    Message,
    OutboxMessage,
    Slot,
    SlotDiff,
    SlotKey,
    request_body,
)
from agent.plan import notify_message, trigger_message
from agent.source.rows import format_local
from agent.store import StateStore
from agent.store import schema as t

START = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
LEASE_S = 30.0
SLOTS: tuple[SlotKey, ...] = (("p1", "o1", "a1"), ("p1", "o1", "a2"), ("p2", "o1", "a1"))

MACHINE_SETTINGS = settings(max_examples=50, stateful_step_count=12)
"""Fewer runs than the profile's: each one opens a store of its own, and its statements are
compiled afresh for its engine (about 0.1 s a run)."""

scan_messages = st.lists(
    st.one_of(st.tuples(st.sampled_from(SLOTS), st.integers(0, 3)), st.just("trigger")),
    min_size=1,
    max_size=5,
)
"""One scan's messages in queue order: a slot's new vacancies, or a catalog trigger."""


def message_for(change: tuple[SlotKey, int] | str) -> Message:
    if isinstance(change, str):
        return trigger_message("catalog")
    key, vacancies = change
    start = START + timedelta(days=2)
    return notify_message(
        Slot(*key, format_local(start), start, "AVAILABLE", vacancies, 3), "changed"
    )


class Outbox(RuleBasedStateMachine):
    """Scans queue messages; workers claim them under a lease, complete them, or die (their
    lease runs out). At the end every message is delivered and the deliveries are checked."""

    template: Path
    """A migrated, empty store, copied for each example (migrating each time is slower)."""

    def __init__(self) -> None:
        super().__init__()
        self.path = self.template.with_name(f"{uuid.uuid4().hex}.db")
        shutil.copyfile(self.template, self.path)
        self.store = StateStore.from_url(f"sqlite:///{self.path}")
        self.store.open()
        self.now = START
        self.step = 0
        self.queued: dict[str, tuple[int, str | None]] = {}
        """dedupe key -> (step, body) of the last message queued for it."""
        self.sent: dict[str, tuple[int, str | None]] = {}
        """dedupe key -> (step, body) of the last message claimed for it (sent)."""
        self.held: list[OutboxMessage] = []

    def teardown(self) -> None:
        try:
            self._deliver_everything()
        finally:
            self.store.close()
            for leftover in self.path.parent.glob(f"{self.path.name}*"):  # -wal, -shm
                leftover.unlink()

    # -- what scans and workers do ----------------------------------------------------------

    @rule(changes=scan_messages)
    def scan(self, changes: list[tuple[SlotKey, int] | str]) -> None:
        self.step += 1
        messages = [message_for(change) for change in changes]
        self.store.commit_scan(CatalogDiff(), SlotDiff(), messages, self.now)
        for message in messages:
            body = None if message.payload is None else request_body(message.payload)
            self.queued[message.dedupe_key] = (self.step, body)

    @rule(limit=st.integers(1, 4))
    def claim(self, limit: int) -> None:
        self.held.extend(self._claim(limit))

    @precondition(lambda self: self.held)
    @rule(which=st.integers(0, 9))
    def complete(self, which: int) -> None:
        self.store.queue.complete(self.held.pop(which % len(self.held)))

    @rule()
    def leases_run_out(self) -> None:
        """Every holder is presumed dead: its claims may be taken again."""
        self.now += timedelta(seconds=LEASE_S + 1)

    # -- the promises -----------------------------------------------------------------------

    @invariant()
    def a_slot_has_at_most_one_waiting_message_and_the_catalog_one_trigger(self) -> None:
        o = t.outbox.c
        with self.store.engine.connect() as conn:
            crowded = conn.execute(
                sa.select(o.dedupe_key, sa.func.count())
                .where(o.state == t.PENDING, o.lease_token.is_(None))
                .group_by(o.dedupe_key)
                .having(sa.func.count() > 1)
            ).all()
        assert crowded == []

    def _claim(self, limit: int) -> list[OutboxMessage]:
        """Claim, checking the order rules against the outbox as it stood just before."""
        self.step += 1
        o = t.outbox.c
        with self.store.engine.connect() as conn:
            pending = conn.execute(
                sa.select(o.id, o.kind, o.dedupe_key).where(o.state == t.PENDING)
            ).all()
        claimed = self.store.queue.claim(self.now, limit=limit, lease_s=LEASE_S)
        for message in claimed:
            older = [row for row in pending if row.id < message.id]
            if message.kind == "notify":
                triggers = [row.id for row in older if row.kind == "trigger"]
                assert triggers == [], f"notify {message.id} claimed before trigger {triggers}"
            same = [row.id for row in older if row.dedupe_key == message.dedupe_key]
            assert same == [], f"{message.id} claimed while {same}, older, is not delivered"
            self.sent[message.dedupe_key] = (self.step, message.body)
        return claimed

    def _deliver_everything(self) -> None:
        """Workers that never fail, until the outbox is empty; then what was last sent for
        each slot (and the catalog) must be what was last queued for it."""
        for _ in range(50):
            self.now += timedelta(seconds=LEASE_S + 1)
            self.store.queue.complete_many(self._claim(100))
            if self.store.admin.stats().pending == 0:
                break
        assert self.store.admin.stats().pending == 0, "the outbox does not drain"
        for key, (queued_at, body) in self.queued.items():
            assert key in self.sent, f"{key} was queued and never sent"
            sent_at, sent_body = self.sent[key]
            assert sent_at > queued_at, f"{key}: nothing sent after the last queued change"
            if key != TRIGGER_DEDUPE_KEY:
                assert sent_body == body, f"{key}: sent {sent_body}, last queued {body}"


@pytest.fixture
def outbox(tmp_path: Path) -> type[Outbox]:
    template = tmp_path / "template.db"
    store = StateStore.from_url(f"sqlite:///{template}")
    store.open()
    store.close()
    return type("OutboxOnTemplate", (Outbox,), {"template": template})


def test_outbox_coalescing_holds_however_scans_and_deliveries_interleave(
    outbox: type[Outbox],
) -> None:
    run_state_machine_as_test(outbox, settings=MACHINE_SETTINGS)
