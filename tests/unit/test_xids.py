"""The PostgreSQL snapshot reading of agent/source/xids.py (pure; the server is in
tests/integration/test_pg_snapshots.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.source.update_times import Reading
from agent.source.xids import Snapshot, parse_snapshot


def test_a_snapshot_is_read_from_its_text() -> None:
    assert parse_snapshot("740:745:740,743\n") == Snapshot(740, 745, frozenset({740, 743}))
    assert parse_snapshot("745:745:") == Snapshot(745, 745, frozenset())


def test_what_completed_since_a_reading() -> None:
    before = Snapshot(740, 745, frozenset({740, 743}))
    assert Snapshot(740, 745, frozenset({740, 743})).moved_since(before) is None
    # A transaction that began after the reading completed: xmax moved past it.
    assert Snapshot(740, 747, frozenset({740, 743})).moved_since(before) is not None
    # One that was running at the reading completed: it left the running list.
    assert Snapshot(740, 745, frozenset({740})).moved_since(before) is not None
    # A transaction that began after the reading and still runs: nothing to see yet.
    assert Snapshot(740, 745, frozenset({740, 743})).moved_since(before) is None
    assert before.settling() is None
    assert Snapshot(1, 2, frozenset()).moved_since(Reading({}, 0.0)) is not None


ids = st.frozensets(st.integers(1, 60), max_size=8)


@given(running=ids, completed=ids, xmax=st.integers(61, 80), later=st.integers(0, 20))
def test_any_completion_is_seen_and_nothing_else(
    running: frozenset[int], completed: frozenset[int], xmax: int, later: int
) -> None:
    """Transactions below xmax complete (leave `running`), or new ones past xmax complete
    (xmax moves on): either is seen; with neither, the snapshot is unchanged."""
    before = Snapshot(min(running, default=xmax), xmax, running)
    still = running - completed
    after = Snapshot(min(still, default=xmax + later), xmax + later, still)
    seen = after.moved_since(before) is not None
    assert seen == (bool(running & completed) or later > 0)
