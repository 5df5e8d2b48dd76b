"""The watermark rule of a reconciliation beside the polls (agent.scan.LiveChanges), on a model.

A model of the source (a version per slot, bumped by each write), the store (the version it
recorded), polls (they read the slots written since the previous poll, as a change cursor
does, and record them) and one reconciliation (it reads every slot at its snapshot, then
records its changes chunk by chunk while writes and polls go on). Hypothesis interleaves
them. Whatever the order, the store never goes back to an older version of a slot than it
held, and after a last poll it holds the source's versions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.diff import SlotChange, without_keys
from agent.model import Slot, SlotKey
from agent.scan import LiveChanges, Superseded

KEYS = ["a", "b", "c", "d", "e"]
START = datetime(2030, 1, 1, tzinfo=UTC)


def _slot(name: str, version: int) -> Slot:
    return Slot("1", "opt", name, "2030-01-01T03:00:00+03:00", START, "AVAILABLE", version, 99)


def _key(name: str) -> SlotKey:
    return ("1", "opt", name)


@dataclass
class World:
    source: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KEYS, 0))
    store: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KEYS, 0))
    written_since_poll: set[str] = field(default_factory=set)
    recorded: dict[str, list[int]] = field(default_factory=lambda: {k: [0] for k in KEYS})

    def write(self, name: str) -> None:
        self.source[name] += 1
        self.written_since_poll.add(name)

    def record(self, name: str, version: int) -> None:
        self.store[name] = version
        self.recorded[name].append(version)

    def poll(self, live: LiveChanges | None) -> None:
        seen = sorted(self.written_since_poll)
        self.written_since_poll.clear()
        for name in seen:
            if self.source[name] != self.store[name]:
                self.record(name, self.source[name])
        if live is not None:
            live.saw(_key(name) for name in seen)


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("write"), st.sampled_from(KEYS)),
        st.tuples(st.just("poll"), st.just("")),
        st.tuples(st.just("chunk"), st.just("")),
    ),
    max_size=40,
)


def _run(before: list[str], operations: list[tuple[str, str]], rule: bool) -> World:
    world = World()
    for name in before:
        world.write(name)  # changes no poll has recorded yet when the reconciliation starts
    live = LiveChanges()
    snapshot = dict(world.source)  # read at one moment, under the scan turn
    unread = list(KEYS)  # the reconciliation reaches the slots in key order

    def chunk() -> None:
        name = unread.pop(0)
        if snapshot[name] == world.store[name]:
            return
        changes: list[SlotChange] = [("changed", _slot(name, snapshot[name]))]
        kept = live.keep(changes) if rule else changes
        for _kind, value in kept:
            assert isinstance(value, Slot)
            assert value.vacancies is not None
            world.record(value.availability_id, value.vacancies)

    for op, name in operations:
        if op == "write":
            world.write(name)
        elif op == "poll":
            world.poll(live)
        elif unread:
            chunk()
    while unread:
        chunk()
    world.poll(None)
    return world


@given(before=st.lists(st.sampled_from(KEYS), max_size=6), operations=OPERATIONS)
def test_the_store_never_goes_back_and_ends_where_the_source_is(
    before: list[str], operations: list[tuple[str, str]]
) -> None:
    world = _run(before, operations, rule=True)
    for name, versions in world.recorded.items():
        assert versions == sorted(versions), f"slot {name} went back: {versions}"
    assert world.store == world.source


def test_without_the_rule_the_model_records_an_older_version() -> None:
    """The model can tell: recording the snapshot's value over a poll's goes back."""
    operations = [("write", "a"), ("poll", "")]
    world = _run(["a"], operations, rule=False)
    assert world.recorded["a"] == [0, 2, 1]
    assert _run(["a"], operations, rule=True).recorded["a"] == [0, 2]


def test_a_superseded_reconciliation_records_nothing_more() -> None:
    live = LiveChanges()
    live.superseded = "a full scan ran meanwhile"
    with pytest.raises(Superseded, match="a full scan ran meanwhile"):
        live.keep([("changed", _slot("a", 1))])


@given(
    changes=st.lists(st.tuples(st.sampled_from(KEYS), st.integers(0, 9)), max_size=12),
    touched=st.sets(st.sampled_from(KEYS)),
)
def test_without_keys_keeps_the_order_of_every_untouched_change(
    changes: list[tuple[str, int]], touched: set[str]
) -> None:
    chunk: list[SlotChange] = [("changed", _slot(name, v)) for name, v in changes]
    kept = without_keys(chunk, {_key(name) for name in touched})
    assert kept == [c for c in chunk if c[1].key[2] not in touched]
