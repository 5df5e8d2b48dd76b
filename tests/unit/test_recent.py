from __future__ import annotations

from decimal import Decimal

from agent.source.recent import RecentRows

KEY = (7, "7-morning", 101)
ROW = (7, "7-morning", 101, "2026-07-01 09:00", None, Decimal(12), 20)
SLOT_KEY = ("7", "7-morning", "101")


def test_a_row_is_known_only_with_exactly_the_values_it_was_handled_with() -> None:
    recent = RecentRows()
    recent.replace({KEY: (ROW, SLOT_KEY)})
    assert recent.unchanged(KEY, ROW) == SLOT_KEY
    assert recent.unchanged(KEY, (*ROW[:-1], 21)) is None
    assert recent.unchanged((7, "7-morning", 102), ROW) is None


def test_replace_forgets_rows_the_last_poll_did_not_return() -> None:
    recent = RecentRows()
    recent.replace({KEY: (ROW, SLOT_KEY)})
    other = (8, "8-day", 5)
    recent.replace(
        {other: ((8, "8-day", 5, "2026-07-02 10:00", "CLOSED", 0, 0), ("8", "8-day", "5"))}
    )
    assert recent.unchanged(KEY, ROW) is None
    assert len(recent) == 1


def test_more_rows_than_the_limit_are_not_remembered_at_all() -> None:
    recent = RecentRows(limit=2)
    rows = {(i,): ((i, "x"), (str(i), "o", "s")) for i in range(3)}
    recent.replace(rows)
    assert len(recent) == 0
    assert recent.unchanged((0,), (0, "x")) is None


def test_a_key_that_cannot_be_hashed_is_never_known() -> None:
    recent = RecentRows()
    recent.replace({KEY: (ROW, SLOT_KEY)})
    assert recent.unchanged(([7], "7-morning", 101), ROW) is None


def test_clear_forgets_everything() -> None:
    recent = RecentRows()
    recent.replace({KEY: (ROW, SLOT_KEY)})
    recent.clear()
    assert recent.unchanged(KEY, ROW) is None
