"""The daemon as operators see it: metrics, health, readiness, reload, systemd, logs."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.acceptance.conftest import WAIT_S, SandboxClient, Setup, agent_env
from tests.conftest import SECRET

WRONG_SECRET = "0bad" * 16


class Daemon:
    """`python -m agent run` with its JSON log lines collected as they come."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "agent", "run", "--config", str(config)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env or agent_env(),
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in list(self.lines):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") == name:
                found.append(record)
        return found

    def wait_for_event(self, name: str, count: int = 1) -> dict[str, Any]:
        return wait(
            lambda: self.events(name)[count - 1] if len(self.events(name)) >= count else None, name
        )

    @property
    def url(self) -> str:
        record = self.wait_for_event("metrics.listening")
        return f"http://{record['host']}:{record['port']}"

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(WAIT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(5)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        assert self.proc.stderr is not None
        self.proc.stderr.close()
        return self.proc.returncode

    @property
    def output(self) -> str:
        return "".join(self.lines)


def wait(probe: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        found = probe()
        if found:
            return found
        time.sleep(0.05)
    raise AssertionError(f"waited {WAIT_S} s for {what}")


@pytest.fixture
def daemons() -> Iterator[list[Daemon]]:
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()
        assert SECRET not in daemon.output
        assert WRONG_SECRET not in daemon.output


def start(daemons: list[Daemon], config: Path, **env: str) -> Daemon:
    daemon = Daemon(config, agent_env(**env))
    daemons.append(daemon)
    return daemon


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_scraped_from_a_running_daemon_tell_what_happened(
    setup: Setup, sandbox: SandboxClient, daemons: list[Daemon]
) -> None:
    daemon = start(daemons, setup.config)
    url = daemon.url
    sandbox.wait_for(lambda calls: len(calls) == 1, "the baseline trigger")
    setup.inventory.execute("UPDATE slots SET vacancies = 2 WHERE id = 'c1'")
    setup.inventory.execute("UPDATE slots SET vacancies = -1 WHERE id = 'c2'")
    sandbox.wait_for(lambda calls: len(calls) == 2, "the notify for c1")

    samples = wait(
        lambda: (
            (s := scrape(url))
            and value(
                s,
                "seyaha_agent_deliveries_total",
                endpoint="availability_notify",
                outcome="delivered",
                code="200",
            )
            >= 1
            and s
        ),
        "the notify in the metrics",
    )
    assert (
        value(
            samples,
            "seyaha_agent_deliveries_total",
            endpoint="sync_trigger",
            outcome="delivered",
            code="200",
        )
        == 1
    )
    assert value(samples, "seyaha_agent_scans_total", result="ok") >= 2
    assert value(samples, "seyaha_agent_changes_detected_total", kind="slot_changed") == 1
    assert value(samples, "seyaha_agent_source_rows_skipped_total", query="slots_query") >= 1
    assert value(samples, "seyaha_agent_delivery_paused") == 0
    assert value(samples, "seyaha_agent_circuit_breaker_open") == 0
    assert value(samples, "seyaha_agent_last_successful_scan_timestamp_seconds") > 0
    assert (
        value(
            samples, "seyaha_agent_request_duration_seconds_count", endpoint="availability_notify"
        )
        >= 1
    )
    assert (
        value(
            samples, "seyaha_agent_delivery_latency_seconds_count", endpoint="availability_notify"
        )
        >= 1
    )
    assert any(name == "seyaha_agent_build_info" for name, _ in samples)

    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    ready = httpx.get(f"{url}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json() == {"ready": True, "problems": []}
    assert daemon.stop() == 0


def test_readiness_fails_while_delivery_is_paused_and_recovers_on_reload(
    setup: Setup, sandbox: SandboxClient, daemons: list[Daemon]
) -> None:
    (setup.folder / "webhook_secret").write_text(WRONG_SECRET + "\n", encoding="utf-8")
    daemon = start(daemons, setup.config)
    url = daemon.url
    sandbox.wait_for(lambda calls: any(c["status"] == 401 for c in calls), "the refused trigger")

    # The refused trigger can come back before the poll that queued it has finished, while
    # readiness still says "no successful scan yet" beside the pause: wait for the pause alone.
    answer = wait(
        lambda: (
            (r := httpx.get(f"{url}/readyz", timeout=10)).status_code == 503
            and len(r.json()["problems"]) == 1
            and r
        ),
        "readiness to fail",
    )
    (problem,) = answer.json()["problems"]
    assert problem.startswith("delivery paused: 401 from Seyaha: the webhook secret is wrong")
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    assert value(scrape(url), "seyaha_agent_delivery_paused") == 1

    # fixing the secret file is noticed without a signal: delivery resumes at once
    (setup.folder / "webhook_secret").write_text(SECRET + "\n", encoding="utf-8")
    daemon.wait_for_event("config.reloaded")
    sandbox.wait_for(lambda calls: calls[-1]["status"] == 200, "the trigger with the right secret")
    wait(lambda: httpx.get(f"{url}/readyz", timeout=10).status_code == 200, "readiness back")
    assert daemon.stop() == 0


def test_an_invalid_reload_is_rejected_and_the_running_config_stays(
    setup: Setup, sandbox: SandboxClient, daemons: list[Daemon]
) -> None:
    daemon = start(daemons, setup.config)
    daemon.wait_for_event("metrics.listening")
    sandbox.wait_for(lambda calls: len(calls) == 1, "the baseline trigger")

    good = setup.config.read_text(encoding="utf-8")
    setup.config.write_text(good.replace("poll_interval", "poll_intervall"), encoding="utf-8")
    rejected = daemon.wait_for_event("config.reload_rejected")
    assert "[source] poll_intervall: unknown key" in rejected["msg"]

    setup.inventory.execute("UPDATE slots SET vacancies = 9 WHERE id = 't1'")
    calls = sandbox.wait_for(lambda calls: len(calls) == 2, "a notify under the old config")
    assert calls[1]["body"]["vacancies"] == 9
    assert daemon.proc.poll() is None

    # SIGHUP with a valid file again: reloaded, still delivering
    setup.config.write_text(good, encoding="utf-8")
    daemon.proc.send_signal(signal.SIGHUP)
    wait(
        lambda: daemon.events("config.unchanged") or daemon.events("config.reloaded"), "the reload"
    )
    setup.inventory.execute("UPDATE slots SET vacancies = 8 WHERE id = 't1'")
    sandbox.wait_for(lambda calls: len(calls) == 3, "a notify after the reload")
    assert daemon.stop() == 0


def test_a_metrics_port_already_taken_is_refused_by_name(setup: Setup) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = setup.config.read_text(encoding="utf-8").replace(
            'listen = "127.0.0.1:0"', f'listen = "127.0.0.1:{port}"'
        )
        setup.config.write_text(config, encoding="utf-8")
        result = subprocess.run(
            [sys.executable, "-m", "agent", "run", "--config", str(setup.config)],
            capture_output=True,
            text=True,
            env=agent_env(),
            timeout=60,
            check=False,
        )
    assert result.returncode == 2
    assert f"[metrics] listen: cannot listen on 127.0.0.1:{port}" in result.stderr


def test_systemd_hears_ready_watchdog_and_stopping(
    setup: Setup, sandbox: SandboxClient, daemons: list[Daemon], tmp_path: Path
) -> None:
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(WAIT_S)
    try:
        daemon = start(daemons, setup.config, NOTIFY_SOCKET=address, WATCHDOG_USEC="1000000")
        received: list[str] = []

        def until(wanted: str) -> None:
            while not any(wanted in m for m in received):
                received.append(listener.recv(4096).decode())

        until("READY=1")
        assert sandbox.calls(), "READY comes after the first scan queued its work"
        until("WATCHDOG=1")
        daemon.proc.send_signal(signal.SIGTERM)
        until("STOPPING=1")
        assert daemon.stop() == 0
    finally:
        listener.close()
        if os.path.exists(address):
            os.unlink(address)


def test_plain_http_to_a_remote_host_is_refused(setup: Setup) -> None:
    config = setup.folder / "remote.toml"
    config.write_text(
        setup.config.read_text(encoding="utf-8").replace(
            setup.sandbox_url, "http://api.seyaha.example"
        ),
        encoding="utf-8",
    )
    result = subprocess.run(
        [sys.executable, "-m", "agent", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        env=agent_env(),
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert (
        "[seyaha] base_url: 'http://api.seyaha.example' would send the webhook secret in clear"
        in result.stderr
    )


def test_a_secret_file_readable_by_others_is_warned_about(
    setup: Setup, daemons: list[Daemon]
) -> None:
    (setup.folder / "webhook_secret").chmod(0o644)
    daemon = start(daemons, setup.config)
    warning = daemon.wait_for_event("config.secret_doubt")
    assert "can be read by other users (mode 644); run chmod 600" in warning["msg"]
    assert daemon.stop() == 0


def test_debug_logs_of_a_whole_run_never_show_either_secret(
    setup: Setup, sandbox: SandboxClient, daemons: list[Daemon]
) -> None:
    config = setup.config.read_text(encoding="utf-8")
    setup.config.write_text(
        config + '\n[log]\nlevel = "DEBUG"\nformat = "json"\n', encoding="utf-8"
    )
    (setup.folder / "webhook_secret").write_text(WRONG_SECRET + "\n", encoding="utf-8")
    daemon = start(daemons, setup.config)
    sandbox.wait_for(lambda calls: any(c["status"] == 401 for c in calls), "a refused call")
    (setup.folder / "webhook_secret").write_text(SECRET + "\n", encoding="utf-8")
    sandbox.wait_for(lambda calls: calls[-1]["status"] == 200, "a call with the right secret")
    setup.inventory.execute("UPDATE slots SET vacancies = 1 WHERE id = 'c1'")
    sandbox.wait_for(lambda calls: calls[-1]["endpoint"] == "notify", "a notify")
    assert daemon.stop() == 0
    assert daemon.events("notify.sent"), "DEBUG output was captured"
    assert SECRET not in daemon.output
    assert WRONG_SECRET not in daemon.output
