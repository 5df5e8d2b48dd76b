"""ReadAhead: a stream read in a thread of its own gives the same items, bounded, and stops.
read_while_starting: one stream's first item awaited in a thread while the other is read
ahead, bounded, in the caller's thread. while_waiting: one call awaited in a thread while the
caller works."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest

from agent.ahead import ReadAhead, read_while_starting, while_waiting
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


def test_the_other_side_is_read_ahead_here_until_the_first_item_came() -> None:
    came = threading.Event()
    where: list[str] = []
    taken: list[int] = []

    def source() -> Iterator[str]:
        # The first item comes only once 20 items of the other side were read: proof that
        # they were read while it was awaited.
        assert came.wait(WAIT_S)
        where.append(threading.current_thread().name)
        yield "first"
        where.append(threading.current_thread().name)
        yield "second"

    def other() -> Iterator[int]:
        for n in range(1000):
            if n == 20:
                came.set()
            taken.append(n)
            yield n

    rest, ahead = read_while_starting(source(), other(), name="t-first", limit=500)
    read_ahead = len(taken)
    assert 20 <= read_ahead <= 500
    assert not any(t.name == "t-first" and t.is_alive() for t in threading.enumerate())
    assert list(rest) == ["first", "second"]
    assert where == ["t-first", threading.current_thread().name]
    assert list(ahead) == list(range(1000))


def test_reading_ahead_stops_at_the_limit_while_the_first_item_takes_long() -> None:
    released = threading.Event()
    source = Counted(bound=10**9)
    stepped: list[int] = []

    def slow() -> Iterator[str]:
        assert released.wait(WAIT_S)
        yield "first"

    def release_at_the_limit() -> None:
        source.wait_taken(50)
        time.sleep(0.05)  # time enough to read more, were it allowed
        released.set()

    watcher = threading.Thread(target=release_at_the_limit, daemon=True)
    watcher.start()
    rest, ahead = read_while_starting(
        slow(), source.items(), name="t", step_aside=lambda: stepped.append(source.taken),
        every=10, limit=50,
    )  # fmt: skip
    watcher.join()
    assert source.taken == 50
    assert stepped == [0, 10, 20, 30, 40]  # every `every` items, before each batch
    assert list(rest) == ["first"]
    assert [next(ahead) for _ in range(60)] == list(range(60))  # then on where it was


def test_a_source_that_ends_at_once_leaves_the_other_side_whole() -> None:
    rest, ahead = read_while_starting(iter(()), iter(range(5)), name="t")
    assert list(rest) == []
    assert list(ahead) == list(range(5))


def test_a_failure_of_the_first_item_is_raised_here_once_its_thread_ended() -> None:
    other = Counted(bound=10**9)
    items = other.items()

    def failing() -> Iterator[int]:
        other.wait_taken(5)  # the other side is being read meanwhile
        raise ConnectionError("the source went away")
        yield 0  # a generator

    with pytest.raises(ConnectionError, match="the source went away"):
        read_while_starting(failing(), items, name="t-fail", limit=30)
    assert not any(t.name == "t-fail" and t.is_alive() for t in threading.enumerate())
    assert not other.closed.is_set()  # left to its owner
    items.close()
    assert other.closed.is_set()


def test_a_failure_reading_ahead_waits_for_the_first_item_then_is_raised() -> None:
    failed, first_done = threading.Event(), threading.Event()

    def source() -> Iterator[str]:
        assert failed.wait(WAIT_S)
        time.sleep(0.05)
        first_done.set()
        yield "first"

    def broken() -> Iterator[int]:
        yield 1
        failed.set()
        raise OSError("the store went away")

    with pytest.raises(OSError, match="the store went away"):
        read_while_starting(source(), broken(), name="t")
    assert first_done.is_set()  # the source's thread ended before the error came here


def test_the_work_is_done_here_while_the_call_waits_in_a_thread_of_its_own() -> None:
    working, answered = threading.Event(), threading.Event()
    threads: dict[str, str] = {}

    def call() -> str:
        threads["call"] = threading.current_thread().name
        assert working.wait(WAIT_S)  # the work began before the answer came
        answered.set()
        return "digests"

    def work() -> int:
        threads["work"] = threading.current_thread().name
        working.set()
        assert answered.wait(WAIT_S)  # and the call went on while the work ran
        return 42

    assert while_waiting(call, work, name="t-wait") == ("digests", 42)
    assert threads == {"call": "t-wait", "work": threading.current_thread().name}
    assert not any(t.name == "t-wait" and t.is_alive() for t in threading.enumerate())


def test_a_failed_call_is_raised_here_once_the_work_is_done() -> None:
    done: list[str] = []

    def call() -> str:
        raise ConnectionError("the source went away")

    def work() -> None:
        time.sleep(0.05)
        done.append("work")

    with pytest.raises(ConnectionError, match="the source went away"):
        while_waiting(call, work, name="t-wait-fail")
    assert done == ["work"]


def test_failed_work_is_raised_once_the_call_ended() -> None:
    ended = threading.Event()

    def call() -> str:
        time.sleep(0.05)
        ended.set()
        return "digests"

    def work() -> None:
        raise OSError("the store went away")

    with pytest.raises(OSError, match="the store went away"):
        while_waiting(call, work, name="t-work-fail")
    assert ended.is_set()  # the call's thread ended before the error came here


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
