"""`seyaha-agent outbox status|list|retry|purge` as an operator uses them, on the outbox the
real CLI (or a real daemon) left behind after runs against the real sandbox process."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import httpx

from agent.cli import EXIT_BROKEN_PIPE, STATUS_EXIT_MEANINGS, StatusExit
from tests.acceptance.conftest import SandboxClient, Setup, agent_env, cli, write_config
from tests.acceptance.test_operations import Daemon, start, wait
from tests.acceptance.test_operations import daemons as daemons  # the fixture
from tests.conftest import SECRET

OUTBOX_COMMAND = (sys.executable, "-m", "agent", "outbox")

WRONG_SECRET = "0bad" * 16

REJECTED = "422 from Seyaha: Unprocessable Entity: injected failure"

README = Path(__file__).resolve().parents[2] / "README.md"

HEALTHY = "ok (exit 0)"
PAUSED = "delivery paused (exit 6)"
BREAKER_OPEN = "circuit breaker open (exit 4)"
DAEMON_NOT_READY = "daemon not ready (exit 5)"


def run(setup: Setup, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """One CLI command on the setup's configuration; its output never shows a secret."""
    command, rest = args[0], args[1:]
    result = cli(command, "--config", str(setup.config), *rest, env=agent_env(**env))
    output = result.stdout + result.stderr
    assert SECRET not in output
    assert WRONG_SECRET not in output
    return result


def outbox(setup: Setup, *args: str, code: int = StatusExit.OK, **env: str) -> str:
    """`outbox ARGS`, which must exit with `code`; its output."""
    result = run(setup, "outbox", *args, **env)
    assert result.returncode == code, result.stdout + result.stderr
    return result.stdout


def health(status: str) -> list[str]:
    """The `health` lines of `outbox status`: each problem with its exit code, most severe
    first, or the one line saying all is well."""
    return re.findall(r"^health           (.*)$", status, re.M)


def dead_letters(count: int) -> str:
    return f"{count} dead letter(s) (exit 3)"


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
    assert health(status) == [HEALTHY]

    setup.inventory.execute("UPDATE slots SET vacancies = 6 WHERE id = 'c1'")
    refused = run(setup, "once", "--timeout", "10", SEYAHA_WEBHOOK_SECRET=WRONG_SECRET)
    assert refused.returncode == 1
    assert [c["status"] for c in sandbox.calls()] == [200, 401]

    status = outbox(setup, "status", code=StatusExit.PAUSED)
    assert "backlog          1 waiting (0 in flight), 0 dead" in status
    assert re.search(r"^oldest waiting   \d+s$", status, re.M), status
    assert "circuit breaker  closed" in status
    paused = re.search(r"^delivery         PAUSED since (\S+): (.*)$", status, re.M)
    assert paused, status
    assert paused[2].startswith("401 from Seyaha: the webhook secret is wrong")
    assert health(status) == [PAUSED]
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
    assert health(status) == [HEALTHY]
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

    status = outbox(setup, "status", code=StatusExit.DEAD_LETTERS)
    assert "backlog          0 waiting (0 in flight), 3 dead" in status
    assert health(status) == [dead_letters(3)]
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
    status = outbox(setup, "status", code=StatusExit.DEAD_LETTERS)
    assert "backlog          1 waiting (0 in flight), 2 dead" in status
    assert run(setup, "once").returncode == 0
    assert delivered(sandbox) == [("c1", 5)]

    # all the others
    assert outbox(setup, "retry", "--all-dead").strip() == "2 dead letter(s) queued again"
    assert outbox(setup, "list", "--state", "dead").strip() == "no dead messages"
    status = outbox(setup, "status")
    assert "backlog          2 waiting (0 in flight), 0 dead" in status
    assert health(status) == [HEALTHY]
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
    assert "0 waiting (0 in flight), 1 dead" in outbox(
        setup, "status", code=StatusExit.DEAD_LETTERS
    )
    assert outbox(setup, "purge", "--dead", "--older-than", "0s").strip() == (
        "1 dead letter(s) deleted"
    )
    assert outbox(setup, "list", "--state", "dead").strip() == "no dead messages"
    assert "backlog          0 waiting (0 in flight), 0 dead" in outbox(setup, "status")
    assert outbox(setup, "retry", "--all-dead").strip() == "0 dead letter(s) queued again"
    assert sorted(delivered(sandbox)) == [("c1", 5), ("c2", 4), ("t1", 3)]


def test_dead_letters_exit_3_unless_a_health_check_ignores_them(
    setup: Setup, sandbox: SandboxClient
) -> None:
    assert run(setup, "once").returncode == 0
    setup.inventory.execute("UPDATE slots SET vacancies = 5 WHERE id = 'c1'")
    sandbox.fail_next(422)
    assert run(setup, "once").returncode == 1

    status = outbox(setup, "status", code=StatusExit.DEAD_LETTERS)
    assert health(status) == [dead_letters(1)]
    ignored = outbox(setup, "status", "--ignore-dead")
    assert "backlog          0 waiting (0 in flight), 1 dead" in ignored  # still shown
    assert health(ignored) == [HEALTHY]


def test_an_open_circuit_breaker_exits_4_until_seyaha_answers_again(
    setup: Setup, sandbox: SandboxClient
) -> None:
    write_config(setup.folder, setup.sandbox_url, extra="breaker_failures = 1\n")
    assert run(setup, "once").returncode == 0
    setup.inventory.execute("UPDATE slots SET vacancies = 5 WHERE id = 'c1'")
    sandbox.fail_next(503)
    assert run(setup, "once", "--timeout", "2").returncode == 1

    status = outbox(setup, "status", code=StatusExit.BREAKER_OPEN)
    assert "circuit breaker  open" in status
    assert "delivery         running" in status
    assert health(status) == [BREAKER_OPEN]

    assert run(setup, "once").returncode == 0
    status = outbox(setup, "status")
    assert "circuit breaker  closed" in status
    assert health(status) == [HEALTHY]


def test_several_problems_are_each_printed_and_the_most_severe_is_the_exit_code(
    setup: Setup, sandbox: SandboxClient
) -> None:
    write_config(setup.folder, setup.sandbox_url, extra="breaker_failures = 1\n")
    assert run(setup, "once").returncode == 0

    setup.inventory.execute("UPDATE slots SET vacancies = 5 WHERE id = 'c1'")
    sandbox.fail_next(422)
    assert run(setup, "once").returncode == 1
    assert health(outbox(setup, "status", code=StatusExit.DEAD_LETTERS)) == [dead_letters(1)]

    setup.inventory.execute("UPDATE slots SET vacancies = 4 WHERE id = 'c2'")
    sandbox.fail_next(503)
    assert run(setup, "once", "--timeout", "2").returncode == 1
    status = outbox(setup, "status", code=StatusExit.BREAKER_OPEN)
    assert health(status) == [BREAKER_OPEN, dead_letters(1)]

    setup.inventory.execute("UPDATE slots SET vacancies = 3 WHERE id = 't1'")
    refused = run(setup, "once", "--timeout", "10", SEYAHA_WEBHOOK_SECRET=WRONG_SECRET)
    assert refused.returncode == 1
    status = outbox(setup, "status", code=StatusExit.PAUSED)
    assert health(status) == [PAUSED, BREAKER_OPEN, dead_letters(1)]
    ignoring_dead = outbox(setup, "status", "--ignore-dead", code=StatusExit.PAUSED)
    assert health(ignoring_dead) == [PAUSED, BREAKER_OPEN]


def free_listen_address() -> str:
    """A fixed loopback port for a daemon's listener: `--daemon` cannot find port 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def test_with_daemon_a_stopped_daemon_exits_5_and_a_ready_one_adds_nothing(
    setup: Setup, sandbox: SandboxClient, daemons: list[Daemon]
) -> None:
    # As in the image: the listen address comes from the environment, for both processes.
    listen = free_listen_address()
    env = {"SEYAHA_AGENT_METRICS__LISTEN": listen}
    daemon = start(daemons, setup.config, **env)
    sandbox.wait_for(lambda calls: len(calls) == 1, "the baseline trigger")
    wait(lambda: httpx.get(f"http://{listen}/readyz", timeout=10).status_code == 200, "ready")

    status = outbox(setup, "status", "--daemon", **env)
    assert f"daemon           ready (http://{listen}/readyz)" in status
    assert health(status) == [HEALTHY]

    sandbox.fail_next(422)  # before the change: the running daemon sends it at once
    setup.inventory.execute("UPDATE slots SET vacancies = 5 WHERE id = 'c1'")
    wait(
        lambda: run(setup, "outbox", "status").returncode == StatusExit.DEAD_LETTERS,
        "the dead letter",
    )
    status = outbox(setup, "status", "--daemon", code=StatusExit.DEAD_LETTERS, **env)
    assert health(status) == [dead_letters(1)]
    # what the image's health check runs: a dead letter is no reason to call the daemon sick
    assert health(outbox(setup, "status", "--daemon", "--ignore-dead", **env)) == [HEALTHY]

    assert daemon.stop() == 0
    stopped = outbox(
        setup, "status", "--daemon", "--ignore-dead", code=StatusExit.DAEMON_NOT_READY, **env
    )
    assert (
        f"daemon           NOT READY: no answer (ConnectError): is the daemon running? (http://{listen}/readyz)"
        in stopped
    )
    assert health(stopped) == [DAEMON_NOT_READY]


def test_with_daemon_a_paused_daemon_exits_6_and_its_readiness_problem_is_printed(
    setup: Setup, sandbox: SandboxClient, daemons: list[Daemon]
) -> None:
    (setup.folder / "webhook_secret").write_text(WRONG_SECRET + "\n", encoding="utf-8")
    listen = free_listen_address()
    env = {"SEYAHA_AGENT_METRICS__LISTEN": listen}
    start(daemons, setup.config, **env)
    sandbox.wait_for(lambda calls: any(c["status"] == 401 for c in calls), "the refused trigger")

    paused = wait(
        lambda: (
            (r := run(setup, "outbox", "status", "--daemon", "--ignore-dead", **env)).returncode
            == StatusExit.PAUSED
            and r.stdout
        ),
        "the pause",
    )
    assert health(paused) == [PAUSED, DAEMON_NOT_READY]
    (daemon_line,) = re.findall(r"^daemon           (.*)$", paused, re.M)
    assert daemon_line.startswith(
        "NOT READY: delivery paused: 401 from Seyaha: the webhook secret is wrong"
    )


def test_with_daemon_a_listener_without_a_fixed_port_is_a_configuration_error(
    setup: Setup,
) -> None:
    refused = run(setup, "outbox", "status", "--daemon")  # the setup listens on port 0
    assert refused.returncode == 2
    assert "[metrics] listen: --daemon asks the daemon's /readyz there" in refused.stderr


def test_every_exit_code_of_status_is_documented_in_its_help_and_the_readme() -> None:
    shown = cli("outbox", "--config", "agent.toml", "status", "--help")
    assert shown.returncode == 0, shown.stderr
    readme = README.read_text(encoding="utf-8").replace("`", "")
    codes = [code for code, _meaning in STATUS_EXIT_MEANINGS]
    assert codes == sorted({0, 1, 2} | set(StatusExit)), "each code once, in order"
    for code, meaning in STATUS_EXIT_MEANINGS:
        assert f"  {code:d}  {meaning}\n" in shown.stdout
        assert f"| {code:d} | {meaning} |" in readme


def test_a_listing_piped_into_a_reader_that_stops_early_ends_quietly(
    setup: Setup, sandbox: SandboxClient
) -> None:
    """`outbox list | head -1` ended in a BrokenPipeError traceback."""
    sandbox.fail_next(422, count=1)
    assert run(setup, "once").returncode == 1  # a dead letter, so there is a row to list
    listing = subprocess.Popen(
        [*OUTBOX_COMMAND, "--config", str(setup.config), "list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=agent_env(),
    )
    assert listing.stdout is not None
    listing.stdout.close()  # the reader is gone before the first line is written
    _out, err = listing.communicate(timeout=60)

    assert listing.returncode == EXIT_BROKEN_PIPE
    assert err == b""
