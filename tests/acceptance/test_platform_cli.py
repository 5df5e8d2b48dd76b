"""A platform (`[seyaha] webhook_secrets_dir`) through the real CLI: `check`, `run`, `outbox`.

Real processes (`python -m agent ...`), real HTTP (the `sandbox` command as a process, which
checks each integration's own secret, or the echoing receiver of tests/misbehaving.py), real
files: the platform's SQLite inventory, the SQLite state store, and the secrets folder, one
file per integration, changed while the daemon runs. Each test draws fresh random secrets,
so a secret found in an output can only have come from the agent.

Waits are ceilings (WAIT_S), never expectations: each polls for what it waits for.
"""

from __future__ import annotations

import os
import re
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from secrets import token_hex
from typing import Any

from agent.cli import StatusExit
from tests.acceptance.conftest import (
    Processes,
    SandboxClient,
    cli,
    wait_until,
)
from tests.integration.inventory import ZONE_NAME, at, first_day
from tests.integration.platform import (
    ALPHA,
    BRAVO,
    CATALOG_QUERY,
    CHARLIE,
    SLOTS_QUERY,
    Platform,
    write_secrets,
)
from tests.log_lines import json_lines
from tests.misbehaving import MisbehavingSeyaha

WAIT_S = 60.0
"""A ceiling for anything a test waits for, never an expectation."""

DELTA = "d4" * 12
"""An integration whose secret file is there but empty."""

SECRET_PIECE_CHARS = 16
"""No piece of a secret this long may show, in any letter case (64 bits of its 256)."""

HEALTHY = f"ok (exit {StatusExit.OK:d})"
ONE_PAUSED = f"1 integration(s) paused (exit {StatusExit.PAUSED:d})"


# -- the platform: inventory, secrets, configuration --------------------------------------------


def seed(folder: Path, integrations: tuple[str, ...]) -> Platform:
    """The platform's inventory: supplier n sells product pn, with slots sn1 and sn2, as the
    integration integrations[n-1]."""
    platform = Platform(f"sqlite:///{folder / 'platform.db'}")
    day = first_day()
    for number, integration in enumerate(integrations, start=1):
        platform.supplier(number, integration)
        platform.product(f"p{number}", number, title=f"Tour {number}")
        platform.slot(f"s{number}1", f"p{number}", at(day, 9))
        platform.slot(f"s{number}2", f"p{number}", at(day, 11))
    return platform


def fresh_secrets(*integrations: str) -> dict[str, str]:
    return {integration: token_hex(32) for integration in integrations}


def replace_secret(folder: Path, integration: str, secret: str) -> None:
    """Put a new secret in the integration's file as an operator's tooling would: a new file
    renamed over the old one (never a half-written file)."""
    written = folder / f".{integration}.new"
    written.write_text(secret + "\n", encoding="utf-8")
    written.chmod(0o600)
    os.replace(written, folder / integration)


def write_platform_config(
    folder: Path, base_url: str, *, seyaha: str = "", delivery: str = "", name: str = "platform"
) -> Path:
    """A platform's configuration, every path relative to its own folder: the secrets in
    ./secrets, the inventory and the state store beside it, JSON logs."""
    path = folder / f"{name}.toml"
    path.write_text(
        f"""
[seyaha]
base_url = "{base_url}"
webhook_secrets_dir = "secrets"
{seyaha}
[source]
url = "sqlite:///platform.db"
poll_interval = 0.2
timezone = "{ZONE_NAME}"
catalog_query = '''{CATALOG_QUERY}'''
slots_query = '''{SLOTS_QUERY}'''

[state]
url = "sqlite:///state.db"

[delivery]
backoff_initial = 0.05
backoff_max = 0.5
auth_probe_interval = 0.5
{delivery}
[metrics]
listen = ""

[log]
format = "json"
""",
        encoding="utf-8",
    )
    return path


class Operator:
    """The CLI on one configuration; every output is kept, to be searched for secrets."""

    def __init__(self, config: Path) -> None:
        self.config = config
        self.seen: dict[str, str] = {}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        result = cli(args[0], "--config", str(self.config), *args[1:])
        self.seen[f"{' '.join(args)} #{len(self.seen)}"] = result.stdout + result.stderr
        return result

    def outbox(self, *args: str, code: int = StatusExit.OK) -> str:
        """`outbox ARGS`, which must exit with `code`; its standard output."""
        result = self.run("outbox", *args)
        assert result.returncode == code, result.stdout + result.stderr
        return result.stdout


def health(status: str) -> list[str]:
    """The `health` lines of `outbox status`, most severe first."""
    return re.findall(r"^health           (.*)$", status, re.M)


_ROW = re.compile(
    r"^ *(?P<id>\d+)  (?P<state>\w+) +(?P<kind>\w+) +\S+ +\d+  (?P<what>\S+)"
    r".*\(integration (?P<integration>[0-9a-f]{24})\)$",
    re.M,
)


def rows(listing: str) -> list[tuple[str, str, str, str]]:
    """`outbox list` rows: (integration, state shown, kind, slot id or sync/trigger)."""
    return sorted(
        (m["integration"], m["state"], m["kind"], m["what"].rsplit("/", 1)[-1])
        for m in _ROW.finditer(listing)
    )


def delivered(calls: list[dict[str, Any]]) -> set[tuple[str, str, int]]:
    """(integration, slot, vacancies) of every notify the sandbox accepted."""
    return {
        (c["integration"], c["body"]["availabilityId"], c["body"]["vacancies"])
        for c in calls
        if c["endpoint"] == "notify" and c["status"] == 200
    }


def leaks(texts: dict[str, str], secrets: list[str]) -> dict[str, str]:
    """Where a secret, or a piece of SECRET_PIECE_CHARS characters of it, shows in any case:
    name -> an excerpt around it."""
    pieces = {
        secret.lower()[at : at + SECRET_PIECE_CHARS]
        for secret in secrets
        for at in range(len(secret) - SECRET_PIECE_CHARS + 1)
    }
    found = {}
    for name, text in texts.items():
        lowered = text.lower()
        hits = [lowered.find(piece) for piece in pieces if piece in lowered]
        if hits:
            at = min(hits)
            found[name] = text[max(0, at - 120) : at + 80]
    return found


# -- the tests ----------------------------------------------------------------------------------


def test_check_explains_a_platform_and_refuses_a_config_that_mixes_both_forms(
    tmp_path: Path,
) -> None:
    """`check` must say which form a configuration takes and judge the secrets folder the way
    the daemon will use it: a file named by an id but empty is a PROBLEM (exit 1), a stray
    file a warning, and the rows of an integration without a file are named as skipped. A
    configuration giving both integration_id and webhook_secrets_dir must not start."""
    secrets = fresh_secrets(ALPHA, BRAVO)
    seed(tmp_path, (ALPHA, BRAVO, CHARLIE)).close()  # CHARLIE: no secret file
    folder = write_secrets(tmp_path / "secrets", secrets)
    (folder / DELTA).write_text("", encoding="utf-8")
    (folder / "README.txt").write_text("one file per integration\n", encoding="utf-8")
    platform = write_platform_config(tmp_path, "http://127.0.0.1:9")
    one = write_platform_config(
        tmp_path,
        "http://127.0.0.1:9",
        name="one",
        seyaha=f'integration_id = "{ALPHA}"\nwebhook_secret_file = "secrets/{ALPHA}"\n',
    )
    one.write_text(
        one.read_text(encoding="utf-8").replace('webhook_secrets_dir = "secrets"\n', ""),
        encoding="utf-8",
    )
    both = write_platform_config(
        tmp_path, "http://127.0.0.1:9", name="both", seyaha=f'integration_id = "{ALPHA}"\n'
    )

    # each command takes a second or two to import the agent: side by side
    with ThreadPoolExecutor(3) as pool:
        checked_platform = pool.submit(cli, "check", "--config", str(platform))
        checked_one = pool.submit(cli, "check", "--config", str(one))
        started_both = pool.submit(cli, "run", "--config", str(both))
    result, single, refused = (
        checked_platform.result(),
        checked_one.result(),
        started_both.result(),
    )

    out = result.stdout
    assert result.returncode == 1, out + result.stderr
    lines = out.splitlines()
    assert (
        "info    a platform: each row goes to the integration its integration_id column "
        f"names, with the secret in the file of that name in {folder}"
    ) in lines, out
    assert "info    one integration" not in out
    assert "ok      webhook_secrets_dir: 2 integration secret file(s) usable" in lines, out
    assert f"PROBLEM webhook_secrets_dir: integration {DELTA}: {folder / DELTA} is empty" in (
        lines
    ), out
    stray = [line for line in lines if "'README.txt'" in line]
    assert len(stray) == 1, out
    assert stray[0].startswith("warning webhook_secrets_dir: 'README.txt' is not named by an")
    # CHARLIE's catalog row and its two slots, each by its key and with the reason
    skipped = [line for line in lines if "would be skipped" in line]
    assert sorted(line.split(" would be skipped")[0] for line in skipped) == [
        "PROBLEM catalog_query: row p3/default",
        "PROBLEM slots_query: row p3/default/s31",
        "PROBLEM slots_query: row p3/default/s32",
    ], out
    for line in skipped:
        assert f"integration {CHARLIE} has no usable secret: no secret file" in line
    assert "info    the rows read name 2 integration(s) with a usable secret" in lines, out
    problems = [line for line in lines if line.startswith("PROBLEM")]
    assert len(problems) == 4, out  # the empty file and the three rows, nothing else
    assert lines[-1] == "4 problem(s) found"

    assert single.returncode == 0, single.stdout + single.stderr
    assert (
        f"info    one integration: every row goes to {ALPHA} ([seyaha] integration_id)"
        in single.stdout
    )
    assert "info    a platform" not in single.stdout
    # the platform's queries return the column this form ignores: said, not refused
    assert re.search(
        r"^warning catalog_query and slots_query return\(s\) an integration_id column, but "
        r"every row goes to \[seyaha\] integration_id",
        single.stdout,
        re.M,
    ), single.stdout
    assert single.stdout.splitlines()[-1] == "all checks passed"

    assert refused.returncode == 2, refused.stdout + refused.stderr  # a configuration error
    assert refused.stdout == ""
    assert "[seyaha] integration_id: leave it out when webhook_secrets_dir is set" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1, refused.stderr  # no traceback

    every = {"check": out + result.stderr, "one": single.stdout + single.stderr}
    assert leaks(every, list(secrets.values())) == {}


def test_a_wrong_secret_pauses_its_integration_alone_until_its_file_is_fixed(
    tmp_path: Path, processes: Processes
) -> None:
    """A real daemon delivers to two integrations, each call with its own secret (Seyaha's
    side, the sandbox, holds its own copies and answers 401 to any other). BRAVO's file is
    then changed to a wrong secret while the daemon runs: `outbox status --integration`
    must show BRAVO paused with exit 6 and ALPHA healthy, ALPHA's bookings must still go
    out, `outbox list --integration` must show one integration's messages only, and the
    file put right must let BRAVO catch up in the same process."""
    secrets = fresh_secrets(ALPHA, BRAVO)
    wrong = token_hex(32)
    platform = seed(tmp_path, (ALPHA, BRAVO))
    try:
        write_secrets(tmp_path / "seyaha", secrets)  # what Seyaha holds
        folder = write_secrets(tmp_path / "secrets", secrets)  # the agent's files
        sandbox = processes.sandbox(tmp_path / "seyaha")
        seyaha = SandboxClient(sandbox.url)
        operator = Operator(write_platform_config(tmp_path, sandbox.url))
        daemon = processes.daemon(operator.config)

        def calls_of(integration: str) -> list[tuple[str, str | None, int]]:
            """(endpoint, slot, status) of the integration's calls; the sandbox keeps the body
            of an accepted notify only."""
            return [
                (c["endpoint"], (c["body"] or {}).get("availabilityId"), c["status"])
                for c in seyaha.calls()
                if c["integration"] == integration
            ]

        # the baseline: one trigger per integration, each accepted with its own secret
        wait_until(
            lambda: (
                calls_of(ALPHA) == [("trigger", None, 200)]
                and calls_of(BRAVO) == [("trigger", None, 200)]
            ),
            "a trigger accepted for each integration",
        )
        platform.book("s11", 7)
        platform.book("s21", 6)
        wait_until(
            lambda: delivered(seyaha.calls()) == {(ALPHA, "s11", 7), (BRAVO, "s21", 6)},
            "a booking of each integration delivered",
        )
        assert [c["status"] for c in seyaha.calls()] == [200] * 4

        # BRAVO's file now holds a secret Seyaha does not know
        replace_secret(folder, BRAVO, wrong)
        platform.book("s21", 5)
        wait_until(lambda: ("notify", None, 401) in calls_of(BRAVO), "BRAVO's refused call")
        paused = wait_until(
            lambda: (
                (r := operator.run("outbox", "status", "--integration", BRAVO)).returncode
                == StatusExit.PAUSED
                and r.stdout
            ),
            "outbox status to show BRAVO paused",
        )
        assert f"integration      {BRAVO}\n" in paused
        assert re.search(r"^backlog          1 waiting \(\d in flight\), 0 dead$", paused, re.M)
        assert re.search(
            rf"^integration      {BRAVO} PAUSED since \S+: 401 from Seyaha: the webhook "
            r"secret is wrong \(check its file in seyaha.webhook_secrets_dir\)$",
            paused,
            re.M,
        ), paused
        assert "delivery         running" in paused  # the agent's delivery as a whole goes on
        assert ALPHA not in paused
        assert health(paused) == [ONE_PAUSED]
        alpha = operator.outbox("status", "--integration", ALPHA)
        assert "PAUSED" not in alpha
        assert health(alpha) == [HEALTHY]

        # ALPHA's bookings go on: one refused by Seyaha (a dead letter), one delivered
        seyaha.fail_next(422)
        platform.book("s12", 4)
        wait_until(lambda: ("notify", None, 422) in calls_of(ALPHA), "ALPHA's rejected call")
        platform.book("s11", 3)
        wait_until(lambda: (ALPHA, "s11", 3) in delivered(seyaha.calls()), "ALPHA's booking")

        bravo_only = rows(operator.outbox("list", "--integration", BRAVO))
        assert bravo_only == [(BRAVO, "paused", "notify", "s21")]
        # a success leaves the outbox a moment after Seyaha has it (with its batch)
        alpha_only = [(ALPHA, "dead", "notify", "s12")]
        wait_until(
            lambda: rows(operator.outbox("list", "--integration", ALPHA)) == alpha_only,
            "ALPHA's listing: its dead letter alone",
        )
        assert rows(operator.outbox("list")) == sorted(alpha_only + bravo_only)
        assert operator.outbox("retry", "--all-dead", "--integration", BRAVO).strip() == (
            "0 dead letter(s) queued again"
        )
        assert operator.outbox("retry", "--all-dead", "--integration", ALPHA).strip() == (
            "1 dead letter(s) queued again"
        )
        wait_until(lambda: (ALPHA, "s12", 4) in delivered(seyaha.calls()), "ALPHA's retry")
        assert (BRAVO, "s21", 5) not in delivered(seyaha.calls())

        # the file put right: BRAVO catches up, in the same process
        replace_secret(folder, BRAVO, secrets[BRAVO])
        healthy = wait_until(
            lambda: (
                (r := operator.run("outbox", "status", "--integration", BRAVO)).returncode
                == StatusExit.OK
                # its pause ends at the success, its message leaves the outbox just after
                and "backlog          0 waiting (0 in flight), 0 dead" in r.stdout
                and r.stdout
            ),
            "BRAVO to catch up",
        )
        assert health(healthy) == [HEALTHY]
        assert "PAUSED" not in healthy
        assert (BRAVO, "s21", 5) in delivered(seyaha.calls())
        bravo = calls_of(BRAVO)
        refused = bravo.index(("notify", None, 401))
        assert bravo[:refused] == [("trigger", None, 200), ("notify", "s21", 200)]
        assert set(bravo[refused:-1]) == {("notify", None, 401)}  # the probes
        assert bravo[-1] == ("notify", "s21", 200)
        wait_until(
            lambda: operator.outbox("list").strip() == "the outbox is empty", "an empty outbox"
        )
        assert health(operator.outbox("status")) == [HEALTHY]

        assert daemon.proc.poll() is None, "the daemon stopped"
        changed = daemon.events("delivery.secret_changed")
        assert [r.get("integration") for r in changed] == [BRAVO, BRAVO]
        assert daemon.events("config.reloaded") == []
        assert daemon.stop() == 0
    finally:
        platform.close()

    out, err = daemon.output()
    assert out == ""
    json_lines(err)  # every line of the log is one JSON object
    texts = {**operator.seen, "daemon log": err}
    assert leaks(texts, [*secrets.values(), wrong]) == {}


def test_secrets_echoed_by_the_server_show_in_no_log_line_and_no_listing(
    tmp_path: Path, processes: Processes
) -> None:
    """The receiver answers 500 with the secret it received in its body (also in upper
    case) and in its headers. Two integrations, two secrets: the daemon's log and
    `outbox list` must hold the echoes masked, never a secret or a piece of one."""
    secrets = fresh_secrets(ALPHA, BRAVO)
    seed(tmp_path, (ALPHA, BRAVO)).close()
    write_secrets(tmp_path / "secrets", secrets)
    with MisbehavingSeyaha("echo_secret") as receiver:
        operator = Operator(
            write_platform_config(
                tmp_path, receiver.url, delivery="breaker_failures = 1000\nmax_attempts = 1000\n"
            )
        )
        daemon = processes.daemon(operator.config)

        def echoed() -> bool:
            # A second call means the first answer is its message's last error by then.
            sent = [c.secret for c in receiver.calls() if c.status == 500]
            return all(sent.count(secret) >= 2 for secret in secrets.values())

        wait_until(echoed, "two echoing answers to each integration's calls")
        assert {c.secret for c in receiver.calls()} == set(secrets.values())
        listing = operator.outbox("list")
        operator.run("outbox", "status")
        assert daemon.stop() == 0
    out, err = daemon.output()

    assert sorted(r[0] for r in rows(listing)) == [ALPHA, BRAVO]
    assert listing.count("Internal Server Error for x-webhook-secret: ***") == 2, listing
    assert listing.count("upstream rejected ***") == 2, listing
    assert out == ""
    log = json_lines(err)
    retried = [r["msg"] for r in log if r["event"] == "delivery.retry"]
    assert len(retried) >= 4
    assert all("x-webhook-secret: ***" in msg for msg in retried), retried
    texts = {"daemon stdout": out, "daemon log": err, **operator.seen}
    assert leaks(texts, list(secrets.values())) == {}
