"""What a scan says in the log about a baseline, a resync of an empty store, and keys the
query returns more than once."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.app import Agent
from agent.source.reader import Snapshot
from tests.integration.inventory import (
    BACKEND_PARAMS,
    Inventory,
    first_day,
    seed_tours,
)


@pytest.mark.parametrize("resync", [False, True])
def test_an_empty_store_logs_a_baseline_or_a_resync_as_what_it_is(
    resync: bool,
    make_inventory: Callable[[str], Inventory],
    make_agent: Callable[..., Agent],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    inventory = make_inventory("sqlite")
    slots = seed_tours(inventory, first_day())
    agent = make_agent(
        "agent",
        base_url="http://127.0.0.1:9",
        source_url=inventory.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
    )
    with caplog.at_level(logging.INFO, logger="agent.scan"):
        report = agent.scan(resync=resync)

    events = [getattr(r, "event", None) for r in caplog.records]
    if resync:
        assert report.notifies == len(slots)
        assert "scan.resync" in events
        assert "scan.baseline" not in events  # it said "one sync/trigger queued"
    else:
        assert report.notifies == 0
        assert events.count("scan.baseline") == 1


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_copies_of_a_key_apart_in_the_stream_use_the_first_and_log_the_others(
    backend: str,
    make_inventory: Callable[[str], Inventory],
    make_agent: Callable[..., Agent],
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Slot 202 comes twice: as itself, and as ' 202' with 1 seat left (an id with a leading
    space, read as 202). The database orders ' 202' before '201', so the copies arrive
    apart, with 201 between them: the first (' 202') is used, the later one is logged."""
    inventory = make_inventory(backend)
    seed_tours(inventory, first_day())
    text = "CHAR" if backend == "mariadb" else "TEXT"
    spaced = "CONCAT(' ', s.id)" if backend == "mariadb" else "' ' || CAST(s.id AS TEXT)"
    select = (
        "SELECT o.product_id, s.option_id, {id} AS availability_id,\n"
        "       s.starts_at AS local_date_time_start, s.status, {vacancies} AS vacancies,\n"
        "       s.capacity\n"
        "FROM slots s JOIN options o ON o.id = s.option_id"
    )
    twice = (
        select.format(id=f"CAST(s.id AS {text})", vacancies="s.vacancies")
        + "\nUNION ALL\n"
        + select.format(id=spaced, vacancies="1")
        + " WHERE s.id = 202\n"
    )
    agent = make_agent(
        "agent",
        base_url="http://127.0.0.1:9",
        source_url=inventory.url,
        state_url=f"sqlite:///{tmp_path / 'state.db'}",
        slots_query=twice,
    )
    with caplog.at_level(logging.WARNING, logger="agent.scan"):
        agent.scan()  # the baseline records the first copy
        again = agent.scan()
    key = ("2", "2-guided", "202")
    (stored,) = agent.store.fingerprints.lookup_slots([key]).values()
    with agent.reader.transaction() as src:
        rows = list(agent.reader.stream_slots(src, Snapshot()))
    assert [r[0] for r in rows].count(key) == 2, "the copies must come apart for this test"
    first_copy = next(item for k, item in rows if k == key)
    assert first_copy is not None
    assert (first_copy.vacancies, stored.fingerprint) == (1, first_copy.fingerprint)
    assert again.messages == 0  # stable: the same copy decides every time
    skipped = [r.getMessage() for r in caplog.records if getattr(r, "event", None) == "row.skipped"]
    assert len(skipped) == 1, skipped  # said once, not on every scan
    assert "2/2-guided/202" in skipped[0]
    assert "the copy read first was used" in skipped[0]
