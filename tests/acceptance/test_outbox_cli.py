"""`seyaha-agent outbox status|list|retry|purge` as an operator uses them, on the outbox the
real CLI left behind after runs against the real sandbox process."""

from __future__ import annotations

import re
import subprocess

from tests.acceptance.conftest import SandboxClient, Setup, agent_env, cli
from tests.conftest import SECRET

WRONG_SECRET = "0bad" * 16

REJECTED = "422 from Seyaha: Unprocessable Entity: injected failure"


def run(setup: Setup, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """One CLI command on the setup's configuration; its output never shows a secret."""
    command, rest = args[0], args[1:]
    result = cli(command, "--config", str(setup.config), *rest, env=agent_env(**env))
    output = result.stdout + result.stderr
    assert SECRET not in output
    assert WRONG_SECRET not in output
    return result


def outbox(setup: Setup, *args: str) -> str:
    result = run(setup, "outbox", *args)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


_ROW = re.compile(r"^\s*(\d+)\s+(\w+)\s+(\w+)\s+\S+\s+(\d+)\s+(\S+)/(\S+)/(\S+) (\w+)$", re.M)


def rows(listing: str) -> dict[str, tuple[int, str, int, str]]:
    """`outbox list` rows by slot id: (message id, shown state, tries, slot status)."""
    return {m[7]: (int(m[1]), m[2], int(m[4]), m[8]) for m in _ROW.finditer(listing)}


def delivered(sandbox: SandboxClient) -> list[tuple[str, int]]:
    return [
        (c["body"]["availabilityId"], c["body"]["vacancies"])
        for c in sandbox.calls()
        if c["endpoint"] == "notify" and c["status"] == 200
    ]


def test_status_shows_backlog_age_breaker_and_a_pause_until_a_good_run_clears_it(
    setup: Setup, sandbox: SandboxClient
) -> None:
    assert run(setup, "once").returncode == 0
    status = outbox(setup, "status")
    assert "backlog          0 waiting (0 in flight), 0 dead" in status
    assert "oldest waiting" not in status
    assert "circuit breaker  closed" in status
    assert "delivery         running" in status

    setup.inventory.execute("UPDATE slots SET vacancies = 6 WHERE id = 'c1'")
    refused = run(setup, "once", "--timeout", "10", SEYAHA_WEBHOOK_SECRET=WRONG_SECRET)
    assert refused.returncode == 1
    assert [c["status"] for c in sandbox.calls()] == [200, 401]

    status = outbox(setup, "status")
    assert "backlog          1 waiting (0 in flight), 0 dead" in status
    assert re.search(r"^oldest waiting   \d+s$", status, re.M), status
    assert "circuit breaker  closed" in status
    paused = re.search(r"^delivery         PAUSED since (\S+): (.*)$", status, re.M)
    assert paused, status
    assert paused[2].startswith("401 from Seyaha: the webhook secret is wrong")
    listing = rows(outbox(setup, "list"))
    assert listing["c1"][1:] == ("paused", 0, "LIMITED")  # a pause costs no attempt

    fixed = run(setup, "once")
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert delivered(sandbox) == [("c1", 6)]
    status = outbox(setup, "status")
    assert "backlog          0 waiting (0 in flight), 0 dead" in status
    assert re.search(r"^last delivery    \S+ \(\d+s ago\)$", status, re.M), status
    # the secret works again: the pause recorded by the earlier run is over
    assert "delivery         running" in status, status
    assert "PAUSED" not in status
    assert outbox(setup, "list").strip() == "the outbox is empty"


def test_dead_letters_are_listed_with_the_reason_retried_and_purged(
    setup: Setup, sandbox: SandboxClient
) -> None:
    assert run(setup, "once").returncode == 0
    setup.inventory.execute("UPDATE slots SET vacancies = 5 WHERE id = 'c1'")
    setup.inventory.execute("UPDATE slots SET vacancies = 4 WHERE id = 'c2'")
    setup.inventory.execute("UPDATE slots SET vacancies = 3 WHERE id = 't1'")
    sandbox.fail_next(422, count=3)
    rejected = run(setup, "once")
    assert rejected.returncode == 1
    assert "gave up on 3 message(s)" in rejected.stdout
    assert delivered(sandbox) == []

    assert "backlog          0 waiting (0 in flight), 3 dead" in outbox(setup, "status")
    dead_listing = outbox(setup, "list", "--state", "dead")
    dead = rows(dead_listing)
    assert set(dead) == {"c1", "c2", "t1"}
    assert {state for _id, state, _tries, _status in dead.values()} == {"dead"}
    assert dead_listing.count(REJECTED) == 3
    assert outbox(setup, "list", "--state", "pending").strip() == "no pending messages"

    # one by id
    c1_id = dead["c1"][0]
    assert outbox(setup, "retry", "--id", str(c1_id)).strip() == "1 dead letter(s) queued again"
    pending = rows(outbox(setup, "list", "--state", "pending"))
    assert list(pending) == ["c1"]
    assert pending["c1"][:3] == (c1_id, "pending", 0)
    assert set(rows(outbox(setup, "list", "--state", "dead"))) == {"c2", "t1"}
    assert "backlog          1 waiting (0 in flight), 2 dead" in outbox(setup, "status")
    assert run(setup, "once").returncode == 0
    assert delivered(sandbox) == [("c1", 5)]

    # all the others
    assert outbox(setup, "retry", "--all-dead").strip() == "2 dead letter(s) queued again"
    assert outbox(setup, "list", "--state", "dead").strip() == "no dead messages"
    assert "backlog          2 waiting (0 in flight), 0 dead" in outbox(setup, "status")
    assert run(setup, "once").returncode == 0
    assert sorted(delivered(sandbox)) == [("c1", 5), ("c2", 4), ("t1", 3)]
    assert outbox(setup, "list").strip() == "the outbox is empty"

    # a fresh dead letter: kept by an age filter it is younger than, gone with 0s
    setup.inventory.execute("UPDATE slots SET vacancies = 2 WHERE id = 'c1'")
    sandbox.fail_next(422, count=1)
    assert run(setup, "once").returncode == 1
    assert set(rows(outbox(setup, "list", "--state", "dead"))) == {"c1"}
    assert outbox(setup, "purge", "--dead", "--older-than", "1h").strip() == (
        "0 dead letter(s) deleted"
    )
    assert "0 waiting (0 in flight), 1 dead" in outbox(setup, "status")
    assert outbox(setup, "purge", "--dead", "--older-than", "0s").strip() == (
        "1 dead letter(s) deleted"
    )
    assert outbox(setup, "list", "--state", "dead").strip() == "no dead messages"
    assert "backlog          0 waiting (0 in flight), 0 dead" in outbox(setup, "status")
    assert outbox(setup, "retry", "--all-dead").strip() == "0 dead letter(s) queued again"
    assert sorted(delivered(sandbox)) == [("c1", 5), ("c2", 4), ("t1", 3)]
