from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agent.clock import FakeClock
from agent.diff import diff_catalog, diff_slots
from agent.model import CatalogRow, Slot, SlotDiff, StoredSlot, slot_fingerprint
from agent.source import rows

NOW = FakeClock(datetime(2026, 7, 1, 9, 0, tzinfo=UTC)).now()


def make_slot(
    availability_id: str = "a1",
    *,
    hours: float = 24,
    vacancies: int = 8,
    product: str = "p1",
    option: str = "o1",
) -> Slot:
    start = (NOW + timedelta(hours=hours)).replace(tzinfo=None)
    row = {
        "product_id": product,
        "option_id": option,
        "availability_id": availability_id,
        "local_date_time_start": start,
        "vacancies": vacancies,
        "capacity": 10,
    }
    return rows.slot(row, UTC)


def remembered(item: Slot) -> StoredSlot:
    return StoredSlot(
        key=item.key,
        fingerprint=slot_fingerprint(item),
        local_date_time_start=item.local_date_time_start,
        start_utc=item.start_utc,
    )


def test_catalog_added_changed_and_removed() -> None:
    stored = {("p1", "o1"): "f1", ("p2", "o1"): "f2", ("p9", "o1"): "f9", ("p0", "o1"): "f0"}
    current = [
        CatalogRow("p1", "o1", "f1"),
        CatalogRow("p2", "o1", "f2-new"),
        CatalogRow("p3", "o1", "f3"),
    ]

    result = diff_catalog(stored, current)

    assert result.added == (CatalogRow("p3", "o1", "f3"),)
    assert result.changed == (CatalogRow("p2", "o1", "f2-new"),)
    assert result.removed == (("p0", "o1"), ("p9", "o1"))
    assert result.any


def test_unchanged_catalog_is_no_change() -> None:
    result = diff_catalog({("p1", "o1"): "f1"}, [CatalogRow("p1", "o1", "f1")])
    assert not result.any


@pytest.mark.parametrize(
    ("current", "expected_changed"),
    [
        pytest.param([], (), id="bad-row-only"),
        pytest.param([CatalogRow("p1", "o1", "f1-new")], (), id="good-row-and-bad-duplicate"),
    ],
)
def test_protected_catalog_key_is_kept_as_stored(
    current: list[CatalogRow], expected_changed: tuple[CatalogRow, ...]
) -> None:
    result = diff_catalog({("p1", "o1"): "f1"}, current, protected={("p1", "o1")})
    assert result.removed == ()
    assert result.changed == expected_changed


def test_first_sight_of_slots_is_added() -> None:
    soon, later = make_slot("a1", hours=1), make_slot("a2", hours=48)
    result = diff_slots({}, [later, soon], NOW)
    assert result.added == (later, soon)
    assert result.changed == result.removed == result.expired == ()


def test_slot_with_a_new_state_is_changed() -> None:
    before = make_slot(vacancies=8)
    after = make_slot(vacancies=3)
    result = diff_slots({before.key: remembered(before)}, [after], NOW)
    assert result.changed == (after,)
    assert result.added == ()


def test_same_slot_is_no_change() -> None:
    item = make_slot()
    result = diff_slots({item.key: remembered(item)}, [item], NOW)
    assert result == SlotDiff()


def test_past_slots_in_the_result_are_out_of_scope() -> None:
    past = make_slot("old", hours=-1)
    past_and_stored = make_slot("older", hours=-2)
    changed_since = make_slot("older", hours=-2, vacancies=0)

    result = diff_slots(
        {past_and_stored.key: remembered(past_and_stored)}, [past, changed_since], NOW
    )

    assert result.added == result.changed == result.removed == ()
    assert result.expired == (past_and_stored.key,)


@pytest.mark.parametrize(
    ("hours", "in_result", "protected", "outcome"),
    [
        pytest.param(5, False, False, "removed", id="gone-future"),
        pytest.param(0, False, False, "removed", id="gone-starting-now"),
        pytest.param(-0.01, False, False, "expired", id="gone-just-started"),
        pytest.param(-5, False, False, "expired", id="gone-past"),
        pytest.param(-5, True, False, "expired", id="still-listed-but-past"),
        pytest.param(5, False, True, "kept", id="bad-row-future"),
        pytest.param(-5, False, True, "kept", id="bad-row-past"),
        pytest.param(5, True, False, "kept", id="unchanged"),
    ],
)
def test_fate_of_a_stored_slot(
    hours: float, in_result: bool, protected: bool, outcome: str
) -> None:
    item = make_slot(hours=hours)
    stored = {item.key: remembered(item)}
    keys = {item.key} if protected else set()

    result = diff_slots(stored, [item] if in_result else [], NOW, protected=keys)

    fate = {
        "removed": result.removed == (remembered(item),) and result.expired == (),
        "expired": result.expired == (item.key,) and result.removed == (),
        "kept": result.removed == () and result.expired == (),
    }
    assert fate[outcome], result
    assert result.changed == ()


def test_protected_slot_is_not_changed_by_a_duplicate_good_row() -> None:
    before = make_slot(vacancies=8)
    duplicate = make_slot(vacancies=2)
    result = diff_slots({before.key: remembered(before)}, [duplicate], NOW, protected={before.key})
    assert result.changed == ()
    assert result.removed == ()


def test_removed_slot_keeps_what_closing_it_needs() -> None:
    item = make_slot(hours=30)
    (gone,) = diff_slots({item.key: remembered(item)}, [], NOW).removed
    assert gone.key == item.key
    assert gone.local_date_time_start == item.local_date_time_start
    assert gone.start_utc == item.start_utc
