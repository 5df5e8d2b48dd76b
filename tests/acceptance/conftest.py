"""Acceptance fixtures: the real CLI as a subprocess, a real sandbox process, a SQLite inventory."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from tests.conftest import INTEGRATION_ID, SECRET

WAIT_S = 30.0
"""Generous upper bound for anything a test waits for; never a measured duration."""

CATALOG_QUERY = (
    "SELECT p.id AS product_id, o.id AS option_id, p.title, p.price_cents "
    "FROM products p JOIN options o ON o.product_id = p.id"
)
SLOTS_QUERY = (
    "SELECT o.product_id, s.option_id, s.id AS availability_id, "
    "s.starts_at AS local_date_time_start, s.status, s.vacancies, s.capacity "
    "FROM slots s JOIN options o ON o.id = s.option_id"
)


class Inventory:
    """A small partner database in SQLite, changed the way a booking system would."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with self.connect() as db:
            db.executescript(
                """
                CREATE TABLE products (id TEXT PRIMARY KEY, title TEXT, price_cents INTEGER);
                CREATE TABLE options (id TEXT PRIMARY KEY, product_id TEXT);
                CREATE TABLE slots (id TEXT PRIMARY KEY, option_id TEXT, starts_at TEXT,
                                    status TEXT, vacancies INTEGER, capacity INTEGER);
                INSERT INTO products VALUES ('cruise', 'Bosphorus Cruise', 4500),
                                            ('tour', 'Old City Walk', 2000);
                INSERT INTO options VALUES ('sunset', 'cruise'), ('morning', 'tour');
                INSERT INTO slots VALUES
                  ('c1', 'sunset', '2030-07-15T18:00:00', NULL, 20, 20),
                  ('c2', 'sunset', '2030-07-16T18:00:00', NULL, 20, 20),
                  ('t1', 'morning', '2030-07-15T09:00:00', NULL, 10, 10);
                """
            )

    def connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path)

    def execute(self, sql: str, *params: Any) -> None:
        with self.connect() as db:
            db.execute(sql, params)


@dataclass
class Setup:
    folder: Path
    config: Path
    inventory: Inventory
    sandbox_url: str


def write_config(folder: Path, base_url: str, *, extra: str = "", secret: str = SECRET) -> Path:
    (folder / "webhook_secret").write_text(secret + "\n", encoding="utf-8")
    config = folder / "agent.toml"
    config.write_text(
        f"""
[seyaha]
base_url = "{base_url}"
integration_id = "{INTEGRATION_ID}"
webhook_secret_file = "webhook_secret"

[source]
url = "sqlite:///inventory.db"
poll_interval = 0.2
timezone = "Europe/Istanbul"
catalog_query = "{CATALOG_QUERY}"
slots_query = "{SLOTS_QUERY}"

[metrics]
listen = "127.0.0.1:0"

[delivery]
backoff_initial = 0.05
backoff_max = 0.5
auth_probe_interval = 0.5
{extra}
""",
        encoding="utf-8",
    )
    return config


def agent_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SEYAHA")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run `python -m agent ARGS` to completion."""
    return subprocess.run(
        [sys.executable, "-m", "agent", *args],
        capture_output=True,
        text=True,
        env=env or agent_env(),
        timeout=timeout,
        check=False,
    )


class SandboxProcess:
    """`seyaha-agent sandbox` as a real process on a free port: with `--config`, or with
    `--secrets-dir` (a platform's integrations, each checked against its own file)."""

    def __init__(self, config: Path | None = None, *, secrets_dir: Path | None = None) -> None:
        given = ["--config", str(config)] if config is not None else []
        if secrets_dir is not None:
            given += ["--secrets-dir", str(secrets_dir)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "sandbox", "--port", "0", *given],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=agent_env(),
        )
        assert self.proc.stdout is not None
        first = self.proc.stdout.readline()
        if "listening on" not in first:
            self.proc.kill()
            raise RuntimeError(
                f"sandbox did not start: {first!r} {self.proc.stderr.read() if self.proc.stderr else ''}"
            )
        self.url = first.rsplit(" ", 1)[-1].strip()
        # The sandbox prints a line per call: keep reading, or a full pipe would stall it.
        self.output: list[str] = [first]
        self._drain = threading.Thread(target=self._read, daemon=True)
        self._drain.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()
        return "".join(self.output)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    inventory = Inventory(tmp_path / "inventory.db")
    # The sandbox reads the same config for its secret and catalog; base_url is patched after.
    config = write_config(tmp_path, "http://127.0.0.1:9")
    sandbox = SandboxProcess(config)
    write_config(tmp_path, sandbox.url)
    try:
        yield Setup(tmp_path, config, inventory, sandbox.url)
    finally:
        sandbox.stop()


@pytest.fixture
def sandbox(setup: Setup) -> SandboxClient:
    return SandboxClient(setup.sandbox_url)


class SandboxClient:
    """Reads a running sandbox's recorded calls over its /_sandbox/ endpoints."""

    def __init__(self, url: str) -> None:
        self.url = url

    def calls(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/_sandbox/calls", timeout=10).json()["calls"])

    def slots(self) -> dict[str, dict[str, Any]]:
        found = httpx.get(f"{self.url}/_sandbox/slots", timeout=10).json()["slots"]
        return {s["availabilityId"]: s for s in found}

    def reset(self) -> None:
        httpx.post(f"{self.url}/_sandbox/reset", timeout=10)

    def fail_next(self, status: int, count: int = 1, retry_after: str | None = None) -> None:
        httpx.post(
            f"{self.url}/_sandbox/fail",
            json={"status": status, "count": count, "retry_after": retry_after},
            timeout=10,
        )

    def wait_for(self, predicate: Any, what: str) -> list[dict[str, Any]]:
        deadline = time.monotonic() + WAIT_S
        calls: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            calls = self.calls()
            if predicate(calls):
                return calls
            time.sleep(0.05)
        raise AssertionError(f"waited {WAIT_S} s for {what}; calls: {calls}")


# -- daemons with JSON logs in files, and what a test started ----------------------------------------------------------------------------------


class Daemon:
    """`python -m agent run` with its standard output and error in files: nothing is lost to
    a pipe, and a pipe left unread cannot stall it."""

    def __init__(self, config: Path) -> None:
        self.out_path = config.with_name(f"{config.stem}.stdout")
        self.err_path = config.with_name(f"{config.stem}.stderr")
        self._files: list[IO[str]] = [
            self.out_path.open("w", encoding="utf-8"),
            self.err_path.open("w", encoding="utf-8"),
        ]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=self._files[0],
            stderr=self._files[1],
            text=True,
            env=agent_env(),
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        """The log records of event `name` so far (a line still being written is skipped)."""
        found = []
        for line in self.err_path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                found.append(record)
        return found

    def stop(self) -> int:
        """SIGTERM, then its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(WAIT_S)
        for handle in self._files:
            handle.close()
        return self.proc.returncode

    def output(self) -> tuple[str, str]:
        """(standard output, standard error)."""
        return (
            self.out_path.read_text(encoding="utf-8"),
            self.err_path.read_text(encoding="utf-8"),
        )


@dataclass
class Processes:
    """What a test started, stopped at its end whatever happened."""

    daemons: list[Daemon] = field(default_factory=list)
    sandboxes: list[SandboxProcess] = field(default_factory=list)

    def daemon(self, config: Path) -> Daemon:
        started = Daemon(config)
        self.daemons.append(started)
        return started

    def sandbox(self, secrets_dir: Path) -> SandboxProcess:
        started = SandboxProcess(secrets_dir=secrets_dir)
        self.sandboxes.append(started)
        return started


@pytest.fixture
def processes() -> Iterator[Processes]:
    started = Processes()
    yield started
    for daemon in started.daemons:
        daemon.stop()
    for sandbox in started.sandboxes:
        sandbox.stop()


def wait_until(probe: Callable[[], Any], what: str, within_s: float = 60.0) -> Any:
    """Poll `probe` until it returns something truthy, which is returned (a ceiling of
    `within_s`, never an expectation)."""
    deadline = time.monotonic() + within_s
    while True:
        found = probe()
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {within_s:g} s for {what}")
        time.sleep(0.1)
