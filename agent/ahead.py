"""Reading one stream ahead, in a thread of its own, while the caller waits on another.

A full pass that reads only the ranges that changed merges two streams: the stored slots of
those ranges (the state store) and the source's rows of them. The source's first row comes
only once the supplier's database has found and sorted every row of those ranges (about
0.13 s at 1M slots and 0.1% changed), and the caller sits idle in the driver meanwhile, the
interpreter free. Reading the stored side in that time, instead of after it, takes its cost
(about as long again) off the pass.

Beside the polls the roles swap (read_while_starting): the thread asks for the source's
first row and only waits for it, while the pass's own thread reads the stored side ahead
and steps aside for the polls as it does in the merge. A second thread doing Python work
would share the interpreter with the polls' and slow a wake-up. while_waiting is the same
arrangement for one call: a query whose answer is awaited in a thread while the caller
reads the store.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import suppress
from typing import Generic, TypeVar

S = TypeVar("S")
T = TypeVar("T")

CHUNK_ITEMS = 1000
"""Items handed over at once: one handover per item would cost more than the item."""

CHUNKS_AHEAD = 20
"""Chunks read ahead at most (20,000 stored slots, a few MB): past that the reading thread
waits for the caller, so memory does not follow the size of the pass."""

_END = object()
"""What the reading thread hands over after the last chunk."""


class ReadAhead(Generic[T]):
    """The items of `source`, read in a thread of its own up to `chunks` x `chunk` items
    ahead of the caller, in their order. An exception raised while reading `source` is
    raised to the caller in its place. close() stops the reading, waits for the thread and
    closes `source` (in that thread, which is where it runs): call it before whatever
    `source` reads from is closed."""

    def __init__(
        self,
        source: Iterator[T],
        *,
        name: str,
        chunk: int = CHUNK_ITEMS,
        chunks: int = CHUNKS_AHEAD,
    ) -> None:
        self._handed: queue.Queue[object] = queue.Queue(chunks)
        self._stop = threading.Event()
        self._chunk = chunk
        self._current: Iterator[T] = iter(())
        self._ended = False
        self._thread = threading.Thread(target=self._read, args=(source,), name=name, daemon=True)
        self._thread.start()

    def _read(self, source: Iterator[T]) -> None:
        batch: list[T] = []
        try:
            for item in source:
                batch.append(item)
                if len(batch) >= self._chunk:
                    self._handed.put(batch)
                    batch = []
                    if self._stop.is_set():
                        return
            self._handed.put(batch)
            self._handed.put(_END)
        except BaseException as exc:  # raised to the caller, after the items before it
            if batch:
                self._handed.put(batch)
            self._handed.put(exc)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                close()

    def __iter__(self) -> ReadAhead[T]:
        return self

    def __next__(self) -> T:
        while True:
            for item in self._current:
                return item
            if self._ended:
                raise StopIteration
            handed = self._handed.get()
            if handed is _END:
                self._ended = True
                raise StopIteration
            if isinstance(handed, BaseException):
                self._ended = True
                raise handed
            self._current = iter(handed)  # type: ignore[call-overload]

    def close(self) -> None:
        """Stop reading ahead and wait for the reading thread to have closed `source`."""
        self._ended = True
        self._current = iter(())
        self._stop.set()
        while self._thread.is_alive():
            # Room for the chunk it may be waiting to hand over: it then sees the stop.
            with suppress(queue.Empty):
                self._handed.get(timeout=0.05)
        self._thread.join()


def read_while_starting(
    source: Iterator[S],
    other: Iterator[T],
    *,
    name: str,
    step_aside: Callable[[], None] = lambda: None,
    every: int = CHUNK_ITEMS,
    limit: int = CHUNK_ITEMS * CHUNKS_AHEAD,
) -> tuple[Iterator[S], Iterator[T]]:
    """`source` and `other`, each to be read on from where it is, after asking `source` for
    its first item in a thread of its own while this thread reads `other` ahead: until that
    first item came, and at most `limit` items, calling `step_aside` every `every` items.

    The other way round from ReadAhead, for a pass beside the polls: the thread only waits
    for the database (the driver lets go of the interpreter meanwhile), and the work stays
    in the caller's thread, which steps aside for a poll as often as it would in the merge.
    Returns once that thread is done, whatever happened; an exception raised there or here
    is raised here. Neither iterator is closed: their owner closes them, now that no other
    thread runs either."""
    first: Future[list[S]] = Future()

    def start() -> None:
        try:
            first.set_result([next(source)])
        except StopIteration:
            first.set_result([])
        except BaseException as exc:  # raised in the caller's thread below
            first.set_exception(exc)

    thread = threading.Thread(target=start, name=name, daemon=True)
    thread.start()
    ahead: list[T] = []
    try:
        while not first.done() and len(ahead) < limit:
            if len(ahead) % every == 0:
                step_aside()
            try:
                ahead.append(next(other))
            except StopIteration:
                break
    finally:
        thread.join()
    return itertools.chain(first.result(), source), itertools.chain(ahead, other)


def while_waiting(wait: Callable[[], S], work: Callable[[], T], *, name: str) -> tuple[S, T]:
    """`wait()` called in a thread of its own while this thread calls `work()`; both results
    once both returned.

    For a call that only waits for a database (the driver lets go of the interpreter while
    it does) and work of the caller's own that does not need its answer: the work's time is
    taken off the pass instead of added to it. Returns once that thread is done, whatever
    happened; an exception raised there or here is raised here (this thread's first)."""
    waited: Future[S] = Future()

    def call() -> None:
        try:
            waited.set_result(wait())
        except BaseException as exc:  # raised in the caller's thread below
            waited.set_exception(exc)

    thread = threading.Thread(target=call, name=name, daemon=True)
    thread.start()
    try:
        done = work()
    finally:
        thread.join()
    return waited.result(), done
