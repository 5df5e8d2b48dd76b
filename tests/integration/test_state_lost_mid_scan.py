"""A reconciliation that loses a server state store part-way goes on.

The stored side of a reconciliation is one long read of the state store, and its changes
are recorded chunk by chunk; a failover or a restart of a shared PostgreSQL or MariaDB store
in the middle used to throw the whole pass away. Here the store's connections are killed
while a reconciliation of 20,000 slots reads them, and, on PostgreSQL, the connection that
records a chunk kills itself halfway through (a trigger), and the pass must go on: each
change recorded and sent once, deletions found, nothing left to send afterwards.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa

from tests.integration.inventory import calls
from tests.integration.outage import CutOnce, kill_connections
from tests.integration.test_reconcile_beside_polls import MakeAgent, MakeInventory, MakeSandbox
from tests.integration.test_resumed_read import CUT_AT_CALL, Big, _big

STATE_PARAMS = [
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
    pytest.param("mariadb", id="mariadb", marks=pytest.mark.mariadb),
]


def _notifies_per_slot(big: Big) -> Counter[str]:
    return Counter(
        c.body["availabilityId"]
        for c in calls(big.sandbox)
        if c.endpoint == "notify" and c.status == 200 and c.body
    )


def _events(caplog: pytest.LogCaptureFixture, name: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "event", None) == name]


@pytest.mark.parametrize("state", STATE_PARAMS)
def test_a_reconciliation_that_loses_the_state_store_part_way_goes_on(
    state: str,
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    new_database: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """PostgreSQL streams the stored slots through a server-side cursor: the read carries
    on after the last stored slot (state.resuming). MariaDB has sent a result this small
    into the socket whole before the kill lands: the read ends from it, and the end of the
    dead read transaction must not fail the pass."""
    state_url = new_database(state)
    big = _big("sqlite", make_inventory, make_sandbox, make_agent, tmp_path, state_url=state_url)
    monkeypatch.setattr(big.agent.scanner, "pause", lambda seconds: None)
    give_way = CutOnce(CUT_AT_CALL, lambda: kill_connections(state_url, "state"))
    monkeypatch.setattr(big.agent, "_give_way", give_way)
    with caplog.at_level(logging.WARNING, logger="agent"):
        report = big.agent.full_scan()

    assert len(give_way.cuts) == 1, "the read ended before the cut"
    assert give_way.cuts[0] >= 1, "no state connection was killed"
    if state == "postgresql":
        assert len(_events(caplog, "state.resuming")) == 1
    big.check(report)
    assert _notifies_per_slot(big) == {str(big.early): 1, str(big.late): 1, str(big.gone): 1}


@pytest.mark.postgres
def test_a_chunk_whose_connection_dies_while_recorded_is_recorded_again(
    make_inventory: MakeInventory,
    make_sandbox: MakeSandbox,
    make_agent: MakeAgent,
    new_database: Callable[[str], str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    state_url = new_database("postgresql")
    big = _big("sqlite", make_inventory, make_sandbox, make_agent, tmp_path, state_url=state_url)
    monkeypatch.setattr(big.agent.scanner, "pause", lambda seconds: None)
    # The first statement that updates a stored slot kills its own connection: the chunk's
    # transaction dies halfway, as in a failover. A sequence counts (it is not rolled back).
    state = sa.create_engine(state_url, poolclass=sa.NullPool)
    with state.begin() as conn:
        conn.execute(sa.text("CREATE SEQUENCE cut_once"))
        conn.execute(
            sa.text(
                "CREATE FUNCTION cut_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                "IF nextval('cut_once') = 1 THEN PERFORM pg_terminate_backend(pg_backend_pid()); "
                "PERFORM pg_sleep(5); END IF; RETURN NULL; END $$"
            )
        )
        conn.execute(
            sa.text(
                "CREATE TRIGGER cut_once BEFORE UPDATE ON seyaha_slots "
                "FOR EACH STATEMENT EXECUTE FUNCTION cut_once()"
            )
        )

    with caplog.at_level(logging.WARNING, logger="agent"):
        report = big.agent.full_scan()

    with state.connect() as conn:
        assert conn.execute(sa.text("SELECT last_value FROM cut_once")).scalar_one() >= 2
    state.dispose()
    retried = _events(caplog, "scan.chunk_retry")
    assert len(retried) == 1
    assert "attempt 1 of 3" in retried[0].getMessage()
    big.check(report)
    assert _notifies_per_slot(big) == {str(big.early): 1, str(big.late): 1, str(big.gone): 1}
