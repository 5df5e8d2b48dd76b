"""The state store's contract, one suite run against SQLite, PostgreSQL and MariaDB.

Time is passed in explicitly (`now`, `at`): leases are aged by claiming at a later moment,
never by sleeping.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from agent.delivery.worker import COMPLETE_EVERY_S, Completions
from agent.errors import StateError
from agent.model import (
    CatalogDiff,
    CatalogRow,
    Message,
    OutboxMessage,
    Slot,
    SlotDiff,
    slot_fingerprint,
)
from agent.plan import notify_message, trigger_message
from agent.store import OutboxStats, StateStore
from agent.store import schema as tables
from tests.integration.inventory import BACKEND_PARAMS

T0 = datetime(2026, 7, 1, 9, 0, tzinfo=UTC)
START = datetime(2026, 7, 10, 15, 0, tzinfo=UTC)
LEASE_S = 30.0


@pytest.fixture(params=BACKEND_PARAMS)
def store(request: pytest.FixtureRequest, make_store: Callable[[str], StateStore]) -> StateStore:
    return make_store(request.param)


def later(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def slot(number: int, vacancies: int = 5, start: datetime = START) -> Slot:
    return Slot(
        product_id="1",
        option_id="a",
        availability_id=str(number),
        local_date_time_start=start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S+00:00"),
        start_utc=start,
        status="AVAILABLE" if vacancies else "SOLD_OUT",
        vacancies=vacancies,
        capacity=10,
    )


def notify(number: int, vacancies: int = 5) -> Message:
    return notify_message(slot(number, vacancies), "changed")


def enqueue(store: StateStore, *messages: Message, now: datetime = T0) -> int:
    return store.commit_scan(CatalogDiff(), SlotDiff(), list(messages), now)


def claim(store: StateStore, now: datetime = T0, limit: int = 50) -> list[OutboxMessage]:
    return store.queue.claim(now, limit=limit, lease_s=LEASE_S)


def vacancies(message: OutboxMessage) -> object:
    assert message.payload is not None
    return message.payload["vacancies"]


def url_of(store: StateStore) -> str:
    return store.engine.url.render_as_string(hide_password=False)


# -- schema -----------------------------------------------------------------------------


def test_open_creates_the_tables_and_is_idempotent(store: StateStore) -> None:
    store.commit_scan(
        CatalogDiff(added=(CatalogRow("1", "a", "f1"),)),
        SlotDiff(),
        [trigger_message("baseline")],
        T0,
        baseline=True,
    )

    store.open()
    again = StateStore.from_url(url_of(store))
    try:
        again.open()
        assert again.fingerprints.is_baselined()
        assert again.fingerprints.load_catalog() == {("1", "a"): "f1"}
        assert [e.kind for e in again.admin.entries()] == ["trigger"]
    finally:
        again.close()

    names = set(sa.inspect(store.engine).get_table_names())
    assert {
        "seyaha_meta",
        "seyaha_catalog",
        "seyaha_slots",
        "seyaha_outbox",
        "seyaha_leases",
        "seyaha_schema_version",
    } <= names
    with store.engine.connect() as conn:
        meta = conn.execute(sa.select(tables.meta.c.key, tables.meta.c.value)).all()
        version = conn.execute(sa.text("SELECT version_num FROM seyaha_schema_version")).all()
    assert sorted(tuple(row) for row in meta) == [
        ("baseline_ms", str(int(T0.timestamp() * 1000))),
        ("schema_version", str(tables.SCHEMA_VERSION)),
    ]
    assert [tuple(row) for row in version] == [(f"{tables.SCHEMA_VERSION:04d}",)]


def test_open_refuses_a_store_written_by_a_newer_agent(store: StateStore) -> None:
    with store.engine.begin() as conn:
        conn.execute(sa.text("UPDATE seyaha_schema_version SET version_num = '0099'"))

    with pytest.raises(StateError) as refused:
        store.open()
    message = str(refused.value)
    assert (
        f"has schema version 99, written by a newer seyaha-agent; this agent knows versions up to {tables.SCHEMA_VERSION}"
        in message
    )
    assert "stores are never downgraded" in message


def test_open_refuses_a_store_whose_meta_records_a_newer_schema(store: StateStore) -> None:
    """Also what a 0.1.0 agent reads: it refuses a store this agent migrated."""
    with store.engine.begin() as conn:
        conn.execute(
            sa.update(tables.meta).where(tables.meta.c.key == "schema_version").values(value="99")
        )

    with pytest.raises(StateError, match="has schema version 99, written by a newer"):
        store.open()


# -- fingerprints -----------------------------------------------------------------------


def test_fingerprints_round_trip_and_follow_each_scan(store: StateStore) -> None:
    assert not store.fingerprints.is_baselined()
    one, two, three = slot(1), slot(2), slot(3, start=START + timedelta(days=1))
    written = store.commit_scan(
        CatalogDiff(added=(CatalogRow("1", "a", "f1"), CatalogRow("2", "b", "f2"))),
        SlotDiff(added=(one, two, three)),
        [trigger_message("baseline")],
        T0,
        baseline=True,
    )

    assert written == 1
    assert store.fingerprints.is_baselined()
    assert store.fingerprints.load_catalog() == {("1", "a"): "f1", ("2", "b"): "f2"}
    assert store.fingerprints.lookup_catalog({("2", "b"), ("9", "z"), ("1", "b")}) == {
        ("2", "b"): "f2"
    }
    assert store.fingerprints.lookup_catalog(set()) == {}
    stored = store.fingerprints.load_slots()
    assert set(stored) == {one.key, two.key, three.key}
    assert stored[three.key].fingerprint == slot_fingerprint(three)
    assert stored[three.key].local_date_time_start == three.local_date_time_start
    assert stored[three.key].start_utc == three.start_utc

    moved = slot(1, vacancies=0, start=START + timedelta(hours=2))
    store.commit_scan(
        CatalogDiff(changed=(CatalogRow("1", "a", "f1b"),), removed=(("2", "b"),)),
        SlotDiff(changed=(moved,), removed=(stored[two.key],), expired=(three.key,)),
        [],
        later(60),
    )

    assert store.fingerprints.load_catalog() == {("1", "a"): "f1b"}
    stored = store.fingerprints.load_slots()
    assert set(stored) == {one.key}
    assert stored[one.key].fingerprint == slot_fingerprint(moved)
    assert stored[one.key].start_utc == START + timedelta(hours=2)


def test_commit_scan_writes_nothing_when_a_message_cannot_be_stored(store: StateStore) -> None:
    """The failure comes after the fingerprints and the first two messages were written."""
    unserialisable = Message(kind="notify", dedupe_key="slot:x", payload={"when": object()})
    catalog = CatalogDiff(added=(CatalogRow("1", "a", "f1"),))
    slots = SlotDiff(added=(slot(1), slot(2)))

    with pytest.raises(TypeError):
        store.commit_scan(
            catalog,
            slots,
            [trigger_message("catalog"), notify(1), unserialisable],
            T0,
            baseline=True,
        )

    assert not store.fingerprints.is_baselined()
    assert store.fingerprints.load_catalog() == {}
    assert store.fingerprints.load_slots() == {}
    assert store.admin.entries() == []
    assert store.admin.stats() == OutboxStats(pending=0, dead=0, in_flight=0, oldest_pending=None)
    # and the store is still usable: the same scan without the bad message goes through
    assert store.commit_scan(catalog, slots, [trigger_message("catalog"), notify(1)], T0) == 2
    assert set(store.fingerprints.load_slots()) == {slot(1).key, slot(2).key}


def test_commit_scan_writes_nothing_when_the_database_refuses(store: StateStore) -> None:
    store.commit_scan(
        CatalogDiff(added=(CatalogRow("1", "a", "f1"),)), SlotDiff(added=(slot(1),)), [], T0
    )
    before_slots = store.fingerprints.load_slots()

    with pytest.raises(sa.exc.IntegrityError):
        store.commit_scan(
            CatalogDiff(
                added=(CatalogRow("2", "b", "f2"), CatalogRow("2", "b", "f2-again"))
            ),  # ("2", "b") twice in one write: duplicate key
            SlotDiff(added=(slot(2),)),
            [trigger_message("catalog"), notify(2)],
            later(1),
        )

    assert store.fingerprints.load_catalog() == {("1", "a"): "f1"}
    assert store.fingerprints.load_slots() == before_slots
    assert store.admin.entries() == []


# -- the outbox rules -------------------------------------------------------------------


def test_notifies_for_a_waiting_slot_coalesce_into_one_row_with_the_newest_payload(
    store: StateStore,
) -> None:
    assert enqueue(store, notify(1, vacancies=5)) == 1
    assert enqueue(store, notify(2, vacancies=9)) == 1
    first_id = store.admin.entries()[0].id

    assert enqueue(store, notify(1, vacancies=3), now=later(1)) == 1
    assert enqueue(store, notify(1, vacancies=2), now=later(2)) == 1
    # the very same message again at the same moment: nothing changes, still one row
    # (MySQL counts only changed rows unless told otherwise)
    assert enqueue(store, notify(1, vacancies=2), now=later(2)) == 1

    entries = store.admin.entries()
    assert len(entries) == 2
    assert entries[0].id == first_id  # refreshed in place: it keeps its turn
    assert entries[0].payload is not None
    assert entries[0].payload["vacancies"] == 2
    claimed = claim(store, later(3))
    assert [vacancies(m) for m in claimed] == [2, 9]
    assert [m.attempts for m in claimed] == [0, 0]


def test_one_scan_queues_its_messages_in_order_and_coalesces_within_itself(
    store: StateStore,
) -> None:
    assert enqueue(store, notify(1, vacancies=5)) == 1
    written = enqueue(
        store,
        notify(2, vacancies=9),
        trigger_message("catalog"),
        notify(3, vacancies=4),
        notify(1, vacancies=3),
        notify(3, vacancies=1),
        now=later(1),
    )
    assert written == 5  # every message counts, as if each had been queued on its own

    queued = [
        (e.kind, e.payload and (e.payload["availabilityId"], e.payload["vacancies"]))
        for e in store.admin.entries()
    ]
    # 1 keeps its place with its newest state; 3 is one row with the last of its two states.
    assert queued == [
        ("notify", ("1", 3)),
        ("notify", ("2", 9)),
        ("trigger", None),
        ("notify", ("3", 1)),
    ]


def test_at_most_one_waiting_trigger(store: StateStore) -> None:
    assert enqueue(store, trigger_message("catalog")) == 1
    assert enqueue(store, trigger_message("catalog"), now=later(1)) == 0
    assert [e.kind for e in store.admin.entries()] == ["trigger"]

    (in_flight,) = claim(store, later(2))
    # The trigger in flight may have read the catalog before this change: a new one waits.
    assert enqueue(store, trigger_message("catalog"), now=later(3)) == 1
    assert enqueue(store, trigger_message("catalog"), now=later(4)) == 0
    assert [e.kind for e in store.admin.entries()] == ["trigger", "trigger"]
    assert claim(store, later(5)) == []  # not while the older trigger is in flight

    assert store.queue.complete(in_flight)
    (second,) = claim(store, later(6))
    assert second.kind == "trigger"
    assert second.id != in_flight.id


def test_a_notify_for_a_slot_in_flight_waits_for_the_older_message(store: StateStore) -> None:
    enqueue(store, notify(1, vacancies=5))
    (first,) = claim(store)

    assert enqueue(store, notify(1, vacancies=3), now=later(1)) == 1
    assert enqueue(store, notify(1, vacancies=2), now=later(2)) == 1  # coalesces, not a third
    assert len(store.admin.entries()) == 2
    assert claim(store, later(3)) == []

    assert store.queue.complete(first)
    (second,) = claim(store, later(4))
    assert second.id != first.id
    assert vacancies(second) == 2


def test_a_failed_message_whose_slot_changed_meanwhile_is_dropped_for_the_newer_state(
    store: StateStore,
) -> None:
    enqueue(store, notify(1, vacancies=5), notify(2, vacancies=5))
    first, other = claim(store)
    enqueue(store, notify(1, vacancies=3), now=later(1))  # a row of its own: 5 is in flight
    assert store.queue.retry_later(first, at=later(2), error="503", status=503)
    assert store.queue.retry_later(other, at=later(2), error="503", status=503)

    # The older state of slot 1 is dropped when its attempt fails (one waiting message per
    # slot); slot 2 has nothing newer and is retried; slot 1's newest state goes out with it.
    assert [
        (e.payload and e.payload["availabilityId"], e.attempts) for e in store.admin.entries()
    ] == [
        ("2", 1),
        ("1", 0),
    ]
    claimed = claim(store, later(2))
    assert [(m.payload and m.payload["availabilityId"], vacancies(m)) for m in claimed] == [
        ("2", 5),
        ("1", 3),
    ]
    assert store.queue.complete_many(claimed) == 2
    assert store.admin.entries() == []


def test_a_notify_behind_a_waiting_trigger_waits_until_the_trigger_completes(
    store: StateStore,
) -> None:
    enqueue(store, notify(2))  # older than the trigger: free to go
    enqueue(store, trigger_message("catalog"), notify(1))

    claimed = claim(store, later(1))
    assert [(m.kind, m.payload and m.payload["availabilityId"]) for m in claimed] == [
        ("notify", "2"),
        ("trigger", None),
    ]
    assert store.queue.complete(claimed[0])
    trigger = claimed[1]
    # The trigger failed and waits for its retry: the notify behind it still may not go.
    assert store.queue.retry_later(trigger, at=later(60), error="503", status=503)
    assert claim(store, later(2)) == []

    (trigger,) = claim(store, later(60))
    assert trigger.kind == "trigger"
    assert claim(store, later(61)) == []
    assert store.queue.complete(trigger)
    (behind,) = claim(store, later(62))
    assert behind.payload is not None
    assert behind.payload["availabilityId"] == "1"


def test_an_expired_lease_frees_the_message_and_the_first_holder_loses_it(
    store: StateStore,
) -> None:
    enqueue(store, notify(1))
    (first,) = claim(store, T0)

    assert claim(store, later(LEASE_S - 1)) == []
    (second,) = claim(store, later(LEASE_S + 1))

    assert second.id == first.id
    assert second.lease_token != first.lease_token
    assert not store.queue.complete(first)
    assert not store.queue.retry_later(first, at=later(100), error="late", status=None)
    assert not store.queue.dead_letter(first, error="late", status=None, at=T0)
    (entry,) = store.admin.entries()
    assert (entry.state, entry.attempts, entry.last_error) == ("pending", 0, None)
    assert store.queue.complete(second)
    assert store.admin.entries() == []


def test_release_orphaned_makes_every_leased_message_due_at_once_and_nothing_else(
    store: StateStore,
) -> None:
    # What a process killed mid-delivery leaves: slots 1 and 2 leased, slot 3 dead, slot 4
    # waiting unclaimed, and a newer state of slot 1 waiting behind its leased one.
    enqueue(store, notify(1), notify(2), notify(3), notify(4))
    one, _two = claim(store, T0, limit=2)
    (three,) = claim(store, later(1), limit=1)
    assert store.queue.dead_letter(three, error="400", status=400, at=later(1))
    enqueue(store, notify(1, vacancies=3), now=later(2))
    assert [(m.payload or {})["availabilityId"] for m in claim(store, later(3), limit=0)] == []

    assert store.queue.release_orphaned() == 2

    # Due at once, long before the leases (LEASE_S) would have run out; slot 1 goes out in
    # its newest state only: the claim drops the older one as superseded, and the newer one
    # is due at the next claim.
    due = claim(store, later(4))
    assert {(m.payload or {})["availabilityId"]: vacancies(m) for m in due} == {"2": 5, "4": 5}
    due += claim(store, later(4))
    assert {(m.payload or {})["availabilityId"]: vacancies(m) for m in due} == {
        "1": 3,
        "2": 5,
        "4": 5,
    }
    assert not store.queue.complete(one)  # its lease went with its token
    assert sorted(e.state for e in store.admin.entries()) == [
        "dead",
        "pending",
        "pending",
        "pending",
    ]
    assert store.queue.release_orphaned() == 3  # what that claim leased, as a restart finds it
    assert store.queue.release_orphaned() == 0


def test_complete_many_removes_what_is_still_held_and_leaves_what_was_taken_over(
    store: StateStore,
) -> None:
    enqueue(store, notify(1), notify(2), notify(3))
    one, two, three = claim(store, T0)
    (retaken,) = claim(store, later(LEASE_S + 1), limit=1)  # one's lease ran out
    assert retaken.id == one.id

    assert store.queue.complete_many([one, two, three]) == 2
    (left,) = store.admin.entries()
    assert left.id == one.id  # its new holder still owns it
    assert store.queue.complete_many([retaken]) == 1
    assert store.queue.complete_many([]) == 0
    assert store.admin.entries() == []


def test_extend_keeps_held_messages_and_leaves_what_was_taken_over(store: StateStore) -> None:
    enqueue(store, notify(1), notify(2), notify(3))
    one, two, three = claim(store, T0)
    (retaken,) = claim(store, later(LEASE_S + 1), limit=1)  # one's lease ran out
    assert retaken.id == one.id

    held = store.queue.extend([one, two, three], until=later(LEASE_S + 60))
    assert held == {two.id, three.id}
    # Extended: nobody can take them when the first lease would have run out...
    assert claim(store, later(LEASE_S + 2)) == []
    # ... and the one that was taken over stays with its new holder.
    assert store.queue.complete(retaken)
    assert not store.queue.complete(one)
    assert store.queue.extend([], until=later(1)) == set()


def test_drop_superseded_removes_held_messages_a_newer_state_replaced(store: StateStore) -> None:
    enqueue(store, notify(1, vacancies=5), notify(2, vacancies=5), notify(3, vacancies=5))
    one, two, three = claim(store, T0)
    enqueue(store, notify(2, vacancies=4), now=later(1))  # slot 2 changed while held

    assert store.queue.drop_superseded([one, two, three]) == {two.id}
    assert store.queue.drop_superseded([one, three]) == set()
    assert not store.queue.complete(two)
    assert [vacancies(m) for m in claim(store, later(LEASE_S + 1))] == [5, 5, 4]
    assert store.queue.drop_superseded([]) == set()


def test_retry_later_makes_the_message_due_only_at_the_given_time(store: StateStore) -> None:
    enqueue(store, notify(1))
    (message,) = claim(store)

    assert store.queue.retry_later(message, at=later(60), error="503 from Seyaha: busy", status=503)

    assert store.queue.next_due() == later(60)
    assert claim(store, later(59.999)) == []
    (entry,) = store.admin.entries()
    assert (entry.state, entry.attempts, entry.last_status, entry.last_error) == (
        "pending",
        1,
        503,
        "503 from Seyaha: busy",
    )
    assert entry.available_at == later(60)
    (again,) = claim(store, later(60))
    assert again.id == message.id
    assert again.attempts == 1

    # a pause puts the message back without counting an attempt
    assert store.queue.retry_later(
        again, at=later(61), error="401", status=401, count_attempt=False
    )
    (third,) = claim(store, later(61))
    assert third.attempts == 1


def test_dead_letter_keeps_the_message_with_its_error(store: StateStore) -> None:
    enqueue(store, notify(1, vacancies=4))
    (message,) = claim(store)

    assert store.queue.dead_letter(message, error="422 from Seyaha: bad slot", status=422, at=T0)

    assert claim(store, later(86_400)) == []
    assert store.queue.next_due() is None
    assert store.admin.entries(state="pending") == []
    (dead,) = store.admin.entries(state="dead")
    assert (dead.id, dead.state, dead.attempts, dead.last_status, dead.last_error) == (
        message.id,
        "dead",
        1,
        422,
        "422 from Seyaha: bad slot",
    )
    assert dead.payload is not None
    assert dead.payload["vacancies"] == 4
    assert store.admin.stats() == OutboxStats(pending=0, dead=1, in_flight=0, oldest_pending=None)
    # a dead letter neither absorbs nor blocks the slot's next message
    assert enqueue(store, notify(1, vacancies=3), now=later(10)) == 1
    (fresh,) = claim(store, later(11))
    assert fresh.id != message.id
    assert vacancies(fresh) == 3


def test_stats_and_next_due(store: StateStore) -> None:
    assert store.admin.stats() == OutboxStats(pending=0, dead=0, in_flight=0, oldest_pending=None)
    assert store.queue.next_due() is None

    enqueue(store, notify(1), now=T0)
    enqueue(store, notify(2), now=later(5))
    assert store.admin.stats() == OutboxStats(pending=2, dead=0, in_flight=0, oldest_pending=T0)
    assert store.queue.next_due() == T0

    (first,) = claim(store, later(6), limit=1)
    assert store.admin.stats().in_flight == 1
    store.queue.retry_later(first, at=later(100), error="timeout", status=None)
    assert store.admin.stats() == OutboxStats(pending=2, dead=0, in_flight=0, oldest_pending=T0)
    assert store.queue.next_due() == later(5)


def test_claim_takes_the_oldest_first_up_to_the_limit(store: StateStore) -> None:
    for number in range(1, 6):
        enqueue(store, notify(number), now=later(number))

    first = claim(store, later(10), limit=2)
    rest = claim(store, later(10), limit=10)

    ids = [e.id for e in store.admin.entries()]
    assert [m.id for m in first] == ids[:2]
    assert [m.id for m in rest] == ids[2:]


def test_concurrent_claims_never_hand_out_a_message_twice(store: StateStore) -> None:
    for number in range(40):
        enqueue(store, notify(number))
    url = url_of(store)
    taken: list[list[int]] = []
    errors: list[BaseException] = []

    def consumer() -> None:
        other = StateStore.from_url(url)
        mine: list[int] = []
        try:
            while batch := other.queue.claim(later(1), limit=3, lease_s=LEASE_S):
                mine.extend(m.id for m in batch)
        except BaseException as exc:
            errors.append(exc)
        finally:
            other.close()
            taken.append(mine)

    threads = [threading.Thread(target=consumer) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert errors == []
    assert not any(thread.is_alive() for thread in threads)
    leftovers = [m.id for m in claim(store, later(2))]
    handed_out = [i for mine in taken for i in mine] + leftovers
    assert sorted(handed_out) == sorted(e.id for e in store.admin.entries())
    assert len(handed_out) == 40


class ManualClock:
    """A monotonic clock that moves only when told to."""

    def __init__(self) -> None:
        self.at = 100.0

    def now(self) -> datetime:
        return T0 + timedelta(seconds=self.at)

    def monotonic(self) -> float:
        return self.at


def test_a_batch_of_successes_leaves_the_outbox_together_or_once_the_oldest_waited(
    store: StateStore,
) -> None:
    enqueue(store, notify(1), notify(2), notify(3))
    one, two, three = claim(store, T0)
    clock = ManualClock()
    done = Completions(store, clock)

    done.add(one)
    clock.at += COMPLETE_EVERY_S / 2
    done.add(two)
    done.flush_if_due()
    assert len(store.admin.entries()) == 3  # still leased: neither re-sent nor overtaken
    clock.at += COMPLETE_EVERY_S / 2
    done.flush_if_due()  # the first success has waited long enough: both go
    assert [e.id for e in store.admin.entries()] == [three.id]

    done.add(three)
    done.flush()
    assert store.admin.entries() == []
