from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from agent.model import (
    TRIGGER_DEDUPE_KEY,
    CatalogDiff,
    CatalogRow,
    Message,
    Slot,
    SlotDiff,
    StoredSlot,
)
from agent.plan import plan, slot_dedupe_key
from agent.source import rows

NOW = datetime(2026, 7, 1, 9, 0, tzinfo=UTC)
CATALOG_CHANGE = CatalogDiff(changed=(CatalogRow("p1", "o1", "f-new"),))


def make_slot(
    availability_id: str, hours: float, *, product: str = "p1", option: str = "o1"
) -> Slot:
    row = {
        "product_id": product,
        "option_id": option,
        "availability_id": availability_id,
        "local_date_time_start": (NOW + timedelta(hours=hours)).replace(tzinfo=None),
        "vacancies": 4,
        "capacity": 10,
    }
    return rows.slot(row, UTC)


def gone(
    availability_id: str, hours: float, *, product: str = "p1", option: str = "o1"
) -> StoredSlot:
    item = make_slot(availability_id, hours, product=product, option=option)
    return StoredSlot(item.key, "old", item.local_date_time_start, item.start_utc)


def summary(messages: list[Message]) -> list[tuple[str, str | None, str]]:
    return [
        (m.kind, m.payload["availabilityId"] if m.payload else None, m.reason) for m in messages
    ]


def test_no_change_plans_nothing() -> None:
    assert plan(CatalogDiff(), SlotDiff()) == []


@pytest.mark.parametrize(
    ("catalog", "slots"),
    [
        pytest.param(CatalogDiff(), SlotDiff(), id="empty"),
        pytest.param(
            CatalogDiff(added=(CatalogRow("p1", "o1", "f"),)),
            SlotDiff(added=(make_slot("a1", 2), make_slot("a2", 3))),
            id="everything-new",
        ),
        pytest.param(CATALOG_CHANGE, SlotDiff(removed=(gone("a3", 4),)), id="with-removals"),
    ],
)
def test_baseline_is_one_trigger_and_no_notifies(catalog: CatalogDiff, slots: SlotDiff) -> None:
    messages = plan(catalog, slots, baseline=True)
    assert [(m.kind, m.dedupe_key, m.reason) for m in messages] == [
        ("trigger", TRIGGER_DEDUPE_KEY, "baseline")
    ]


@pytest.mark.parametrize(
    "catalog",
    [
        CatalogDiff(added=(CatalogRow("p2", "o1", "f"),)),
        CATALOG_CHANGE,
        CatalogDiff(removed=(("p3", "o1"),)),
        CatalogDiff(
            added=(CatalogRow("p2", "o1", "f"),),
            changed=(CatalogRow("p1", "o1", "g"),),
            removed=(("p3", "o1"),),
        ),
    ],
)
def test_any_catalog_change_is_one_trigger_placed_first(catalog: CatalogDiff) -> None:
    slots = SlotDiff(added=(make_slot("a1", 2),), changed=(make_slot("a2", 1),))
    messages = plan(catalog, slots)
    assert [m.kind for m in messages] == ["trigger", "notify", "notify"]
    assert messages[0].dedupe_key == TRIGGER_DEDUPE_KEY
    assert messages[0].payload is None


def test_notifies_go_soonest_start_first() -> None:
    slots = SlotDiff(
        added=(make_slot("in-5h", 5), make_slot("in-1h", 1)),
        changed=(make_slot("in-3h", 3), make_slot("in-30h", 30)),
        removed=(gone("in-2h", 2), gone("in-4h", 4)),
    )

    messages = plan(CATALOG_CHANGE, slots)

    assert summary(messages) == [
        ("trigger", None, "catalog"),
        ("notify", "in-1h", "added"),
        ("notify", "in-2h", "removed"),
        ("notify", "in-3h", "changed"),
        ("notify", "in-4h", "removed"),
        ("notify", "in-5h", "added"),
        ("notify", "in-30h", "changed"),
    ]
    starts = [m.slot_start for m in messages[1:]]
    assert starts == sorted(starts)


def test_same_start_is_ordered_by_key() -> None:
    slots = SlotDiff(added=(make_slot("b", 2), make_slot("c", 2), make_slot("a", 2)))
    assert [aid for _, aid, _ in summary(plan(CatalogDiff(), slots))] == ["a", "b", "c"]


def test_added_or_changed_slot_notifies_its_payload() -> None:
    item = make_slot("a1", 6)
    (message,) = plan(CatalogDiff(), SlotDiff(changed=(item,)))
    assert message.kind == "notify"
    assert message.payload == item.payload()
    assert message.slot_start == item.start_utc
    assert message.dedupe_key == slot_dedupe_key(item.key)


def test_removed_slot_is_a_closed_notify() -> None:
    stored = gone("a1", 6)
    (message,) = plan(CatalogDiff(), SlotDiff(removed=(stored,)))
    assert message.payload == {
        "productId": "p1",
        "optionId": "o1",
        "availabilityId": "a1",
        "localDateTimeStart": "2026-07-01T15:00:00+00:00",
        "status": "CLOSED",
        "vacancies": 0,
        "capacity": None,
    }
    assert message.slot_start == stored.start_utc
    assert message.dedupe_key == slot_dedupe_key(stored.key)
    assert message.reason == "removed"


def test_slots_of_an_option_removed_from_the_catalog_are_not_closed() -> None:
    catalog = CatalogDiff(removed=(("p1", "o1"),))
    slots = SlotDiff(
        removed=(
            gone("a1", 2, product="p1", option="o1"),
            gone("a2", 3, product="p1", option="o2"),
            gone("a3", 4, product="p2", option="o1"),
        )
    )

    assert summary(plan(catalog, slots)) == [
        ("trigger", None, "catalog"),
        ("notify", "a2", "removed"),
        ("notify", "a3", "removed"),
    ]


def test_resync_notifies_every_given_slot_once() -> None:
    first, second, third = make_slot("a1", 3), make_slot("a2", 1), make_slot("a3", 2)
    slots = SlotDiff(added=(first,), changed=(second,))

    messages = plan(CatalogDiff(), slots, resync=[first, second, third])

    assert summary(messages) == [
        ("notify", "a2", "resync"),
        ("notify", "a3", "resync"),
        ("notify", "a1", "resync"),
    ]


def test_resync_still_closes_removed_slots() -> None:
    item, stored = make_slot("a1", 3), gone("a2", 1)
    messages = plan(CatalogDiff(), SlotDiff(removed=(stored,)), resync=[item])
    assert summary(messages) == [("notify", "a2", "removed"), ("notify", "a1", "resync")]


@pytest.mark.parametrize(
    ("left", "right"),
    [
        (("p1", "o1", "a1"), ("p1", "o1", "a2")),
        (("p1", "o1", "a1"), ("p2", "o1", "a1")),
        (("ab", "c", "d"), ("a", "bc", "d")),
        (("a", "b", "cd"), ("a", "bc", "d")),
    ],
)
def test_dedupe_keys_tell_slots_apart(
    left: tuple[str, str, str], right: tuple[str, str, str]
) -> None:
    assert slot_dedupe_key(left) != slot_dedupe_key(right)


def test_dedupe_key_is_stable_and_short() -> None:
    key = slot_dedupe_key(("p1", "o1", "a" * 500))
    assert key == slot_dedupe_key(("p1", "o1", "a" * 500))
    assert key.startswith("slot:")
    assert len(key) == len("slot:") + 32
