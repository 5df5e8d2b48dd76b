"""The real CLI as a subprocess against the real sandbox process."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from tests.acceptance.conftest import (
    WAIT_S,
    SandboxClient,
    Setup,
    agent_env,
    cli,
)
from tests.conftest import SECRET

WRONG_SECRET = "0bad" * 16


def _endpoints(calls: list[dict]) -> list[str]:
    return [c["endpoint"] for c in calls]


def test_version_and_help_work_through_both_entry_points() -> None:
    version = cli("--version")
    assert version.returncode == 0
    assert version.stdout.startswith("seyaha-agent ")
    helped = subprocess.run(
        [sys.executable, "-c", "from agent.cli import main; raise SystemExit(main(['--help']))"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert helped.returncode == 0
    for command in ("run", "once", "check", "resync", "sandbox", "demo"):
        assert command in helped.stdout


def test_once_baseline_then_changes_then_nothing(setup: Setup, sandbox: SandboxClient) -> None:
    first = cli("once", "--config", str(setup.config))
    assert first.returncode == 0, first.stdout + first.stderr
    assert "baseline recorded" in first.stdout
    assert _endpoints(sandbox.calls()) == ["trigger"]

    setup.inventory.execute("UPDATE slots SET vacancies = 4 WHERE id = 'c1'")
    setup.inventory.execute("UPDATE slots SET vacancies = 0 WHERE id = 't1'")
    setup.inventory.execute("DELETE FROM slots WHERE id = 'c2'")
    second = cli("once", "--config", str(setup.config))
    assert second.returncode == 0, second.stdout + second.stderr
    assert "everything delivered" in second.stdout
    calls = sandbox.calls()
    assert _endpoints(calls) == ["trigger", "notify", "notify", "notify"]
    slots = sandbox.slots()
    assert slots["c1"]["status"] == "LIMITED"
    assert slots["c1"]["vacancies"] == 4
    assert slots["t1"]["status"] == "SOLD_OUT"
    assert slots["c2"] == {
        "productId": "cruise",
        "optionId": "sunset",
        "availabilityId": "c2",
        "localDateTimeStart": "2030-07-16T18:00:00+03:00",
        "status": "CLOSED",
        "vacancies": 0,
        "capacity": None,
    }
    notify = calls[1]
    assert notify["headers"]["content-type"] == "application/json"
    assert notify["headers"]["user-agent"].startswith("seyaha-agent/")

    third = cli("once", "--config", str(setup.config))
    assert third.returncode == 0
    assert len(sandbox.calls()) == len(calls)


def test_wrong_secret_keeps_everything_and_never_shows_the_secret(
    setup: Setup, sandbox: SandboxClient
) -> None:
    assert cli("once", "--config", str(setup.config)).returncode == 0
    setup.inventory.execute("UPDATE slots SET vacancies = 3 WHERE id = 'c1'")

    wrong = cli(
        "once",
        "--config",
        str(setup.config),
        "--timeout",
        "10",
        env=agent_env(SEYAHA_WEBHOOK_SECRET=WRONG_SECRET),
    )
    output = wrong.stdout + wrong.stderr
    assert wrong.returncode == 1
    assert "401 from Seyaha: the webhook secret is wrong" in wrong.stdout
    assert "still waiting: 1 message" in wrong.stdout
    assert WRONG_SECRET not in output
    assert SECRET not in output
    assert [c["status"] for c in sandbox.calls()] == [200, 401]

    fixed = cli("once", "--config", str(setup.config))
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert SECRET not in fixed.stdout + fixed.stderr
    delivered = [c for c in sandbox.calls() if c["endpoint"] == "notify" and c["status"] == 200]
    assert len(delivered) == 1
    assert delivered[0]["body"]["vacancies"] == 3


def test_check_reports_each_problem_with_its_key(setup: Setup) -> None:
    good = cli("check", "--config", str(setup.config))
    assert good.returncode == 0, good.stdout
    assert "all checks passed" in good.stdout
    assert "slots_query: a full read takes " in good.stdout  # what a poll costs without a
    assert "slots_changed_query is not set" not in good.stdout  # change query: little here

    typo = setup.folder / "typo.toml"
    typo.write_text(
        setup.config.read_text().replace("poll_interval", "poll_intervall"), encoding="utf-8"
    )
    result = cli("check", "--config", str(typo))
    assert result.returncode == 1
    assert "[source] poll_intervall: unknown key" in result.stdout

    missing = setup.folder / "missing.toml"
    missing.write_text(
        setup.config.read_text().replace(
            "s.starts_at AS local_date_time_start", "s.starts_at AS starts"
        ),
        encoding="utf-8",
    )
    result = cli("check", "--config", str(missing))
    assert result.returncode == 1
    assert "slots_query returned no column local_date_time_start" in result.stdout
    assert "starts" in result.stdout


def test_check_shows_the_secret_warnings_that_run_logs(setup: Setup) -> None:
    (setup.folder / "webhook_secret").chmod(0o644)

    result = cli("check", "--config", str(setup.config))

    assert result.returncode == 0, result.stdout
    assert "warning [seyaha] webhook_secret_file: " in result.stdout
    assert "can be read by other users (mode 644); run chmod 600 on it" in result.stdout
    assert SECRET not in result.stdout + result.stderr


def test_a_read_only_state_store_fails_check_and_once_says_why_in_one_line(
    setup: Setup,
) -> None:
    assert cli("once", "--config", str(setup.config)).returncode == 0  # the store exists
    state = setup.folder / "state.db"
    assert state.exists()
    read_only = setup.folder / "read-only.toml"
    read_only.write_text(
        setup.config.read_text() + f'\n[state]\nurl = "sqlite:///file:{state}?mode=ro&uri=true"\n',
        encoding="utf-8",
    )

    checked = cli("check", "--config", str(read_only))
    assert checked.returncode == 1
    assert "cannot be written: attempt to write a readonly database" in checked.stdout

    setup.inventory.execute("UPDATE slots SET vacancies = 3 WHERE id = 'c1'")
    ran = cli("once", "--config", str(read_only))
    assert ran.returncode == 1
    assert "Traceback" not in ran.stderr
    assert "a database failed: attempt to write a readonly database" in ran.stderr


def test_bad_rows_are_skipped_with_key_and_reason_while_the_rest_goes_on(
    setup: Setup, sandbox: SandboxClient
) -> None:
    assert cli("once", "--config", str(setup.config)).returncode == 0
    setup.inventory.execute("UPDATE slots SET vacancies = -2 WHERE id = 'c2'")
    setup.inventory.execute("UPDATE slots SET vacancies = 5 WHERE id = 'c1'")
    result = cli("once", "--config", str(setup.config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "cruise/sunset/c2: vacancies is negative (-2)" in result.stdout
    slots = sandbox.slots()
    assert slots["c1"]["vacancies"] == 5
    assert "c2" not in slots  # not closed, not sent: kept as it was until the row is fixed


def test_a_year_9999_start_west_of_utc_is_a_skipped_row_and_the_rest_is_delivered(
    setup: Setup, sandbox: SandboxClient
) -> None:
    """9999-12-31 23:30 in Istanbul is fine; in New York it has no UTC instant (past year
    9999): the conversion used to raise, and every scan ended in a traceback."""
    config = setup.config.read_text().replace(
        'timezone = "Europe/Istanbul"', 'timezone = "America/New_York"'
    )
    setup.config.write_text(config, encoding="utf-8")
    assert cli("once", "--config", str(setup.config)).returncode == 0
    setup.inventory.execute("UPDATE slots SET starts_at = '9999-12-31T23:30:00' WHERE id = 'c2'")
    setup.inventory.execute("UPDATE slots SET vacancies = 4 WHERE id = 'c1'")

    result = cli("once", "--config", str(setup.config))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert "cruise/sunset/c2: local_date_time_start '9999-12-31T23:30:00' is out of range" in (
        result.stdout
    )
    assert sandbox.slots()["c1"]["vacancies"] == 4


def test_once_after_a_failed_scan_does_not_say_everything_was_delivered(setup: Setup) -> None:
    assert cli("once", "--config", str(setup.config)).returncode == 0
    setup.inventory.execute("DROP TABLE slots")

    result = cli("once", "--config", str(setup.config))

    assert result.returncode == 1
    assert "scan failed: " in result.stdout
    assert "everything delivered" not in result.stdout
    assert "this run's changes were not read: the scan failed" in result.stdout


def test_config_error_at_start_names_the_key(setup: Setup) -> None:
    broken = setup.folder / "broken.toml"
    broken.write_text(
        setup.config.read_text().replace(
            'timezone = "Europe/Istanbul"', 'timezone = "Mars/Olympus"'
        ),
        encoding="utf-8",
    )
    result = cli("run", "--config", str(broken))
    assert result.returncode == 2
    assert "[source] timezone: unknown time zone 'Mars/Olympus'" in result.stderr


def test_resync_notifies_every_current_slot(setup: Setup, sandbox: SandboxClient) -> None:
    assert cli("once", "--config", str(setup.config)).returncode == 0
    result = cli("resync", "--config", str(setup.config))
    assert result.returncode == 0, result.stdout + result.stderr
    notified = sorted(
        c["body"]["availabilityId"] for c in sandbox.calls() if c["endpoint"] == "notify"
    )
    assert notified == ["c1", "c2", "t1"]


def _start_daemon(setup: Setup) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "run", "--config", str(setup.config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=agent_env(),
    )


def test_daemon_delivers_changes_and_stops_cleanly_on_sigterm(
    setup: Setup, sandbox: SandboxClient
) -> None:
    daemon = _start_daemon(setup)
    try:
        sandbox.wait_for(lambda calls: _endpoints(calls) == ["trigger"], "the baseline trigger")
        setup.inventory.execute("UPDATE slots SET vacancies = 1 WHERE id = 't1'")
        sandbox.wait_for(
            lambda calls: any(c["endpoint"] == "notify" for c in calls), "the notify for t1"
        )
        daemon.send_signal(signal.SIGTERM)
        out, err = daemon.communicate(timeout=WAIT_S)
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.communicate()
    assert daemon.returncode == 0, err
    assert "stopped" in err
    assert SECRET not in out + err
    assert sandbox.slots()["t1"]["status"] == "LIMITED"


def test_daemon_stops_on_sigint_and_resumes_after_restart(
    setup: Setup, sandbox: SandboxClient
) -> None:
    daemon = _start_daemon(setup)
    sandbox.wait_for(lambda calls: len(calls) == 1, "the baseline trigger")
    daemon.send_signal(signal.SIGINT)
    daemon.communicate(timeout=WAIT_S)
    assert daemon.returncode == 0

    setup.inventory.execute("UPDATE slots SET vacancies = 7 WHERE id = 'c2'")  # while stopped
    daemon = _start_daemon(setup)
    try:
        sandbox.wait_for(lambda calls: len(calls) == 2, "the change made while stopped")
        time.sleep(1.0)  # a few more polls: nothing else may be sent
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.communicate(timeout=WAIT_S)
    calls = sandbox.calls()
    assert _endpoints(calls) == ["trigger", "notify"]
    assert calls[1]["body"]["vacancies"] == 7


def test_demo_runs_and_verifies_itself() -> None:
    result = cli("demo", "--seconds", "8", timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "sync/trigger" in result.stdout
    assert "reached the sandbox correctly" in result.stdout


def test_server_errors_are_retried_until_delivered(setup: Setup, sandbox: SandboxClient) -> None:
    assert cli("once", "--config", str(setup.config)).returncode == 0
    setup.inventory.execute("UPDATE slots SET vacancies = 2 WHERE id = 'c1'")
    sandbox.fail_next(503, count=2, retry_after="0")
    result = cli("once", "--config", str(setup.config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 retried" in result.stdout
    statuses = [c["status"] for c in sandbox.calls()[1:]]
    assert statuses == [503, 503, 200]
