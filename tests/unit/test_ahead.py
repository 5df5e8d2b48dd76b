"""ReadAhead: a stream read in a thread of its own gives the same items, bounded, and stops."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from agent.ahead import ReadAhead
from agent.diff import iter_slot_changes
from agent.model import Slot, SlotKey, StoredSlot, slot_fingerprint
from agent.source.rows import format_local

NOW = datetime(2026, 7, 1, 12, 0, tzinfo=UTC)
WAIT_S = 10.0
"""Longest wait for the reading thread to reach a state (it gets there in microseconds)."""


class Counted:
    """An endless source that counts what was taken from it, refuses to be read further
    ahead of the caller than `bound` items, and tells when it was closed."""

    def __init__(self, bound: int) -> None:
        self.bound = bound
        self.taken = 0
        self.consumed = 0
        self.closed = threading.Event()
        self.changed = threading.Condition()

    def items(self) -> Iterator[int]:
        try:
            while True:
                assert self.taken - self.consumed <= self.bound, "read too far ahead"
                with self.changed:
                    self.taken += 1
                    self.changed.notify_all()
                yield self.taken - 1
        finally:
            self.closed.set()

    def wait_taken(self, count: int) -> None:
        with self.changed:
            assert self.changed.wait_for(lambda: self.taken >= count, timeout=WAIT_S)


def test_every_item_comes_in_order_across_chunks() -> None:
    ahead = ReadAhead(iter(range(1001)), name="t", chunk=7, chunks=3)
    assert list(ahead) == list(range(1001))
    assert list(ahead) == []  # and stays ended


def test_an_empty_source_ends_at_once() -> None:
    assert list(ReadAhead(iter(()), name="t")) == []


def test_reading_stops_a_bounded_way_ahead_of_the_caller() -> None:
    chunk, chunks = 5, 2
    # Full queue, a chunk in hand waiting to be handed over, and one more chunk for the
    # moment between the caller taking an item and counting it.
    source = Counted(bound=(chunks + 2) * chunk)
    ahead = ReadAhead(source.items(), name="t", chunk=chunk, chunks=chunks)
    try:
        source.wait_taken((chunks + 1) * chunk)  # it fills what it may, then waits
        for expected in range(200):
            assert next(ahead) == expected
            source.consumed += 1
        source.wait_taken(200 + (chunks + 1) * chunk)
    finally:
        ahead.close()
    assert source.closed.is_set()


def test_closing_early_stops_the_thread_and_closes_the_source() -> None:
    source = Counted(bound=10**9)
    ahead = ReadAhead(source.items(), name="t", chunk=4, chunks=2)
    source.wait_taken(12)  # the queue is full: the thread waits to hand over a chunk
    ahead.close()
    assert source.closed.is_set()
    assert not any(t.name == "t" and t.is_alive() for t in threading.enumerate())
    assert list(ahead) == []
    ahead.close()  # twice is harmless


def test_a_failure_while_reading_comes_to_the_caller_after_the_items_before_it() -> None:
    def failing() -> Iterator[int]:
        yield from range(10)
        raise ConnectionError("the store went away")

    ahead = ReadAhead(failing(), name="t", chunk=3, chunks=2)
    got = [next(ahead) for _ in range(10)]
    assert got == list(range(10))
    with pytest.raises(ConnectionError, match="the store went away"):
        next(ahead)
    assert list(ahead) == []  # ended with it


def _slot(number: int) -> Slot:
    start = NOW + timedelta(days=2)
    return Slot("p1", "o1", f"a{number:03d}", format_local(start), start, "AVAILABLE", 5, 10)


def _stored(item: Slot, vacancies: int) -> StoredSlot:
    changed = Slot(
        *item.key, item.local_date_time_start, item.start_utc, "AVAILABLE", vacancies, 10
    )
    return StoredSlot(
        item.key, slot_fingerprint(changed), item.local_date_time_start, item.start_utc
    )


def test_the_merge_asks_for_the_stored_side_once_the_source_gave_its_first_row() -> None:
    """So that a stored side read ahead is read while the source's query runs."""
    order: list[str] = []
    slots = [_slot(n) for n in range(3)]

    def stored() -> Iterator[StoredSlot]:
        order.append("stored")
        yield _stored(slots[0], 5)  # the same
        yield _stored(slots[1], 9)  # changed in the source
        yield StoredSlot(
            ("p1", "o1", "a999"), "x", slots[0].local_date_time_start, NOW + timedelta(days=2)
        )

    def current() -> Iterator[tuple[SlotKey, Slot | None]]:
        order.append("source")
        for item in slots:
            yield item.key, item

    changes = list(iter_slot_changes(stored(), current(), NOW))
    assert order == ["source", "stored"]
    assert [(kind, getattr(v, "key", None)) for kind, v in changes] == [
        ("changed", ("p1", "o1", "a001")),
        ("added", ("p1", "o1", "a002")),
        ("removed", ("p1", "o1", "a999")),
    ]


def test_an_empty_source_still_removes_every_stored_slot() -> None:
    gone = [_stored(_slot(n), 5) for n in range(3)]
    changes = list(iter_slot_changes(iter(gone), iter(()), NOW))
    assert [(kind, v.key) for kind, v in changes] == [("removed", s.key) for s in gone]
