"""The decisions of agent/source/update_times.py: which tables the queries read, and when a
table's UPDATE_TIME asks for a pass (pure; the real MariaDB is in
tests/integration/test_update_times.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from agent.source.gate import Due, PassGate
from agent.source.update_times import (
    SETTLE_S,
    Reading,
    Table,
    change_since,
    keeps_update_time,
    moved,
    named_tables,
    words,
)

SLOTS: Table = ("shop", "slots")
OPTIONS: Table = ("shop", "options")


def reading(now: float, **times: int | None) -> Reading:
    return Reading({("shop", name): moment for name, moment in times.items()}, now)


# -- which tables --------------------------------------------------------------------------


def test_words_are_the_identifiers_bare_or_quoted_in_lower_case() -> None:
    assert words("SELECT s.Id FROM `Odd ``name`` here` s JOIN shop.Options") == {
        "select",
        "s",
        "id",
        "from",
        "odd `name` here",
        "join",
        "shop",
        "options",
    }


KINDS = {
    ("shop", "slots"): "BASE TABLE",
    ("shop", "options"): "BASE TABLE",
    ("shop", "audit_log"): "BASE TABLE",
    ("shop", "open_slots"): "VIEW",
    ("crm", "products"): "BASE TABLE",
    ("crm", "slots"): "BASE TABLE",
    ("other", "options"): "BASE TABLE",
}


def test_the_tables_named_in_the_current_database_and_in_databases_the_text_names() -> None:
    found, _ = named_tables(
        ["SELECT * FROM slots s JOIN options o ON o.id = s.option_id JOIN crm.products p"],
        KINDS,
        {},
        "shop",
    )
    # crm is named, so its slots table counts too (more tables cost passes, never a miss);
    # other.options is not: the database "other" is not named.
    assert found == {("shop", "slots"), ("shop", "options"), ("crm", "products"), ("crm", "slots")}


def test_a_view_is_followed_to_what_it_reads_in_another_database() -> None:
    views = {("shop", "open_slots"): "select `other`.`options`.`id` AS `id` from `other`.`options`"}
    found, named = named_tables(["SELECT * FROM open_slots"], KINDS, views, "shop")
    assert ("other", "options") in found
    assert ("shop", "open_slots") in found
    assert "other" in named  # the database to look up when it was not listed yet
    assert ("shop", "audit_log") not in found


def test_without_a_current_database_only_qualified_names_count() -> None:
    found, _ = named_tables(["SELECT * FROM shop.slots"], KINDS, {}, None)
    assert found == {("shop", "slots")}


# -- when a pass is due ------------------------------------------------------------------


def test_an_unchanged_settled_reading_asks_for_nothing() -> None:
    before = reading(1000.0, slots=990, options=None)
    assert change_since(before, reading(1010.0, slots=990, options=None)) is None


def test_any_difference_asks_for_a_pass_even_a_time_that_went_backwards() -> None:
    before = reading(1000.0, slots=990, options=None)
    assert change_since(before, reading(1001.0, slots=1000, options=None)) == "shop.slots changed"
    # A transaction that began before the last change and committed after it.
    assert change_since(before, reading(1001.0, slots=985, options=None)) is not None
    assert change_since(before, reading(1001.0, slots=990, options=995)) is not None
    # The server restarted (times are not kept) or the table was dropped.
    assert change_since(before, reading(1001.0, slots=None, options=None)) is not None
    assert change_since(before, reading(1001.0, options=None)) is not None


def test_a_time_within_the_settle_window_of_the_reading_asks_for_one_more_pass() -> None:
    """A second commit in the same second leaves the same time: the pass after a reading
    taken within that second (and the margin) is followed by one more."""
    before = reading(1000.4, slots=1000)
    why = change_since(before, reading(1005.0, slots=1000))
    assert why == "shop.slots changed within 2 s of the last pass"
    settled = reading(1000.0 + SETTLE_S, slots=1000)
    assert change_since(settled, reading(1005.0, slots=1000)) is None


def test_the_gate_runs_the_first_pass_then_only_for_a_change_or_the_fallback() -> None:
    gate = PassGate(fallback_s=60.0)
    quiet = reading(500.0, slots=400)
    assert gate.due(0.0, quiet) == Due("no pass yet")
    gate.hold_until(5.0)
    gate.passed(0.0, quiet)
    assert gate.due(1.0, reading(501.0, slots=501)) is None  # held: poll_interval
    assert gate.due(5.0, reading(505.0, slots=400)) is None
    assert gate.due(5.0, reading(505.0, slots=504)) == Due("shop.slots changed", moved=True)
    assert gate.due(59.9, reading(560.0, slots=400)) is None
    assert gate.due(60.0, reading(560.0, slots=400)) == Due("no pass for 60 s")
    assert gate.due(9.0, reading(505.0, slots=None)) == Due("shop.slots changed", moved=True)


def test_what_the_agent_scans_changing_asks_for_a_pass() -> None:
    gate = PassGate(fallback_s=60.0)
    quiet = reading(500.0, slots=400)
    gate.passed(0.0, quiet, (True, None))
    assert gate.due(1.0, quiet, (True, None)) is None
    assert gate.due(1.0, quiet, (False, None)) == Due("what this agent scans changed")
    assert gate.due(1.0, quiet, (True, frozenset({1, 2}))) is not None


times = st.one_of(st.none(), st.integers(0, 2_000_000_000))
readings = st.builds(
    Reading,
    st.dictionaries(st.sampled_from([SLOTS, OPTIONS, ("crm", "products")]), times, max_size=3),
    st.floats(0, 2_000_000_100, allow_nan=False),
)


@given(before=readings, now=readings)
def test_a_pass_is_skipped_only_for_the_same_times_once_settled(
    before: Reading, now: Reading
) -> None:
    skipped = change_since(before, now) is None
    settled = all(t is None or before.now >= t + SETTLE_S for t in before.times.values())
    assert skipped == (dict(before.times) == dict(now.times) and settled)


@given(before=readings, now=readings, since=st.floats(0, 1e6, allow_nan=False))
def test_a_held_gate_never_runs_and_a_free_one_always_runs_for_a_change(
    before: Reading, now: Reading, since: float
) -> None:
    gate = PassGate(fallback_s=60.0)
    gate.passed(0.0, before)
    gate.hold_until(5.0)
    assert gate.due(min(since, 4.999), now) is None
    due = gate.due(5.0 + since, now)
    if 5.0 + since >= 60.0 or change_since(before, now) is not None:
        assert due is not None
        # Only a moved time says the source changed (the fallback may come first).
        assert due.moved == (5.0 + since < 60.0 and moved(before, now) is not None)
    else:
        assert due is None


def test_servers_that_keep_no_innodb_time_are_named() -> None:
    assert keeps_update_time("10.11.19-MariaDB-0+deb12u1", mariadb=True) is None
    assert keeps_update_time("8.0.36", mariadb=False) is None
    assert keeps_update_time("5.7.2-log", mariadb=False) is None
    assert keeps_update_time("5.7.1", mariadb=False) == (
        "MySQL 5.7.1 keeps no time of an InnoDB table's last change (it does from MySQL 5.7.2)"
    )
    assert keeps_update_time("10.1.48-MariaDB", mariadb=True) is not None
    assert keeps_update_time("5.6.51", mariadb=False) is not None


def test_the_gate_says_how_long_it_holds() -> None:
    gate = PassGate(fallback_s=60.0)
    assert gate.held_for(0.0) < 0
    gate.hold_until(5.0)
    assert gate.held_for(4.75) == 0.25
    assert gate.held_for(6.0) == -1.0
