"""ReadAhead: a stream read in a thread of its own gives the same items, bounded, and stops.
read_while_waiting: a stream read in the caller's thread while another's first item is
awaited, each then read on from where it was."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from agent.ahead import ReadAhead, read_while_waiting
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


# -- read_while_waiting -----------------------------------------------------------------------


class Waited:
    """A stream whose first item comes once `ready` is set (or after `timeout_s`), noting
    which thread took each item."""

    def __init__(self, items: list[str], *, timeout_s: float = WAIT_S) -> None:
        self.items = items
        self.ready = threading.Event()
        self.timeout_s = timeout_s
        self.threads: list[int] = []

    def stream(self) -> Iterator[str]:
        self.ready.wait(self.timeout_s)
        for item in self.items:
            self.threads.append(threading.get_ident())
            yield item


class Read:
    """A stream of `count` numbers that counts what was taken and sets `release` once
    `at` items were taken (then waits, so that the waited-for item has come)."""

    def __init__(self, count: int, *, release: threading.Event | None = None, at: int = 0):
        self.count = count
        self.release = release
        self.at = at
        self.taken = 0
        self.threads: set[int] = set()

    def stream(self) -> Iterator[int]:
        for n in range(self.count):
            self.threads.add(threading.get_ident())
            if self.release is not None and n == self.at:
                self.release.set()
                time.sleep(0.2)  # the waiting thread gets its item meanwhile
            self.taken += 1
            yield n


def _while_waiting(
    read: Read, waited: Waited, *, limit: int = 1000, every: int = 4
) -> tuple[list[int], list[str], int]:
    ways: list[int] = []
    reading, waiting = read_while_waiting(
        read.stream(),
        waited.stream(),
        limit=limit,
        give_way=lambda: ways.append(read.taken),
        every=every,
        name="test-wait",
    )
    taken_then = read.taken
    assert ways == list(range(every, taken_then, every))
    return list(reading), list(waiting), taken_then


def test_reading_stops_once_the_first_awaited_item_came_and_both_go_on_whole() -> None:
    waited = Waited(["a", "b", "c"])
    read = Read(100, release=waited.ready, at=5)
    reading, waiting, taken_then = _while_waiting(read, waited)
    assert 6 <= taken_then < 100  # read until the first item came, not to the end
    assert (reading, waiting) == (list(range(100)), ["a", "b", "c"])
    me = threading.get_ident()
    assert read.threads == {me}
    assert waited.threads[0] != me
    assert set(waited.threads[1:]) == {me}


def test_reading_stops_at_the_limit_while_the_first_item_is_still_awaited() -> None:
    waited = Waited(["a"], timeout_s=0.3)  # never released: comes after 0.3 s
    read = Read(100)
    reading, waiting, taken_then = _while_waiting(read, waited, limit=10)
    assert taken_then == 10
    assert (reading, waiting) == (list(range(100)), ["a"])


def test_nothing_is_read_with_no_room_and_empty_streams_stay_empty() -> None:
    waited = Waited([], timeout_s=0.0)
    read = Read(3)
    reading, waiting, taken_then = _while_waiting(read, waited, limit=0)
    assert (taken_then, reading, waiting) == (0, [0, 1, 2], [])
    reading, waiting, _ = _while_waiting(Read(0), Waited(["a"], timeout_s=0.0))
    assert (reading, waiting) == ([], ["a"])


def test_a_failure_of_either_stream_comes_to_the_caller_once_the_waiting_is_over() -> None:
    def failing_wait() -> Iterator[str]:
        raise ConnectionError("the source went away")
        yield "never"

    with pytest.raises(ConnectionError, match="source went away"):
        read_while_waiting(
            iter(range(5)), failing_wait(), limit=10, give_way=lambda: None, every=4, name="t"
        )

    waited = Waited(["a"], timeout_s=0.3)
    finished: list[bool] = []

    def failing_read() -> Iterator[int]:
        yield 1
        raise OSError("the store went away")

    def watched() -> Iterator[str]:
        yield from waited.stream()
        finished.append(True)

    waiting = watched()
    with pytest.raises(OSError, match="store went away"):
        read_while_waiting(
            failing_read(), waiting, limit=10, give_way=lambda: None, every=4, name="t"
        )
    # The waiting thread was done with its item before the failure was raised: the caller
    # may close what it reads from at once.
    assert waited.threads
    assert not finished
    assert list(waiting) == []
    assert finished == [True]
