"""The daemon and its SQLite state file, as an operator meets them: a file deleted or emptied
under a running daemon stops it loudly (exit 1, one state.lost event), and the restart resends
every slot, a slot changed meanwhile included; a first run is still a plain baseline.

Waits are generous ceilings; nothing asserts on how long anything took.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from tests.acceptance.conftest import SandboxClient, Setup
from tests.acceptance.test_operations import Daemon, start
from tests.acceptance.test_operations import daemons as daemons  # the fixture

EXIT_S = 120.0
"""Ceiling for a daemon to stop by itself on a slow, busy machine; never an expectation."""


def notified(calls: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The last notify body the receiver took for each slot."""
    return {
        c["body"]["availabilityId"]: c["body"]
        for c in calls
        if c["endpoint"] == "notify" and c["status"] == 200
    }


def endpoints(calls: list[dict[str, Any]]) -> list[str]:
    return [c["endpoint"] for c in calls]


def lose(state: Path, loss: str) -> None:
    if loss == "deleted":
        state.unlink()
    elif loss == "truncated":
        os.truncate(state, 0)
    elif loss == "deleted with its lock file":  # rm state.db*
        for path in state.parent.glob(state.name + "*"):
            path.unlink()
    else:
        raise AssertionError(loss)


@pytest.mark.parametrize("loss", ["deleted", "truncated", "deleted with its lock file"])
def test_a_state_file_lost_under_the_daemon_stops_it_and_the_restart_resends_every_slot(
    setup: Setup, sandbox: SandboxClient, daemons: list[Daemon], loss: str
) -> None:
    state = (setup.folder / "state.db").resolve()
    first = start(daemons, setup.config)
    sandbox.wait_for(lambda calls: endpoints(calls) == ["trigger"], "the baseline trigger")

    lose(state, loss)
    setup.inventory.execute("UPDATE slots SET vacancies = 4 WHERE id = 'c1'")

    assert first.proc.wait(EXIT_S) == 1
    first.stop()  # collects the rest of its output
    lost = first.events("state.lost")
    assert len(lost) == 1, first.output
    assert lost[0]["level"] == "error"
    assert lost[0]["file"] == str(state)
    assert lost[0]["problem"] == ("truncated" if loss == "truncated" else "deleted")
    assert lost[0]["msg"].startswith(f"the state file {state} was ")
    assert "resends every slot to Seyaha" in lost[0]["msg"]
    assert f"seyaha-agent: the state file {state} was " in first.output  # the exit's reason
    assert "Traceback" not in first.output
    assert endpoints(sandbox.calls()) == ["trigger"]  # nothing sent from the lost file

    second = start(daemons, setup.config)
    resync = second.wait_for_event("state.resync")
    assert resync["level"] == "warning"
    assert str(state) in resync["msg"]
    calls = sandbox.wait_for(
        lambda calls: sorted(notified(calls)) == ["c1", "c2", "t1"], "a notify for every slot"
    )
    assert notified(calls)["c1"]["vacancies"] == 4  # the change made while the file was gone
    assert notified(calls)["t1"]["vacancies"] == 10
    assert endpoints(calls).count("trigger") == 2  # the baseline's, and the resync's
    assert second.stop() == 0
    assert "Traceback" not in second.output


def test_a_first_run_on_a_fresh_folder_is_still_a_baseline(
    setup: Setup, sandbox: SandboxClient, daemons: list[Daemon]
) -> None:
    daemon = start(daemons, setup.config)
    sandbox.wait_for(lambda calls: endpoints(calls) == ["trigger"], "the baseline trigger")
    setup.inventory.execute("UPDATE slots SET vacancies = 4 WHERE id = 'c1'")
    calls = sandbox.wait_for(lambda calls: len(calls) >= 2, "the notify for c1")

    # one trigger and no notify from the baseline; the next change is told as it happens
    assert endpoints(calls) == ["trigger", "notify"]
    assert sorted(notified(calls)) == ["c1"]
    assert daemon.events("state.resync") == []
    lock = (setup.folder / "state.db.lock").read_text(encoding="ascii")
    assert lock == f"{daemon.proc.pid}\nbaseline=yes\n"
    assert daemon.stop() == 0
