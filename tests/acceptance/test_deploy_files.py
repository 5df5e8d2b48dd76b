"""The files operators install: Prometheus rules, the Grafana dashboard, the systemd unit,
the Dockerfile."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from agent.cli import build_parser
from agent.metrics import Metrics
from agent.outbox_command import READYZ_TIMEOUT_S, readyz_url

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus"
DASHBOARD = ROOT / "deploy" / "grafana" / "seyaha-agent.json"
UNIT = ROOT / "systemd" / "seyaha-agent.service"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "info": ("_info",),
    "gauge": ("",),
}


def _tool(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        if IN_CI and name == "promtool":
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package")
        pytest.skip(f"{name} is not installed")
    return found


def exported_series_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    text = generate_latest(registry).decode()
    names = set()
    for family, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.MULTILINE):
        base = family.removesuffix("_total") if kind == "counter" else family
        names |= {base + suffix for suffix in SUFFIXES.get(kind, ("",))}
    return names


def referenced_metrics(text: str) -> set[str]:
    return set(re.findall(r"\b(seyaha_agent_[a-z_]+)", text))


def test_promtool_accepts_the_rules_and_their_unit_tests_pass() -> None:
    promtool = _tool("promtool")
    checked = subprocess.run(
        [promtool, "check", "rules", "alerts.yml"],
        cwd=RULES,
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = subprocess.run(
        [promtool, "test", "rules", "alerts_test.yml"],
        cwd=RULES,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


@pytest.mark.parametrize("path", [RULES / "alerts.yml", DASHBOARD], ids=["alerts", "dashboard"])
def test_every_metric_referenced_is_one_the_agent_exports(path: Path) -> None:
    referenced = referenced_metrics(path.read_text(encoding="utf-8"))
    assert referenced, f"{path.name} references no seyaha_agent metric"
    unknown = referenced - exported_series_names()
    assert not unknown, f"{path.name} uses metrics the agent does not export: {sorted(unknown)}"


def test_the_dashboard_is_valid_json_with_a_query_in_every_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert dashboard["panels"]
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert all(t["expr"] for t in panel["targets"]), panel["title"]


def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    analyze = _tool("systemd-analyze")
    executable = Path(sys.executable).with_name("seyaha-agent")
    assert executable.exists()
    unit = tmp_path / "seyaha-agent.service"
    unit.write_text(
        UNIT.read_text(encoding="utf-8").replace("/usr/local/bin/seyaha-agent", str(executable)),
        encoding="utf-8",
    )
    verified = subprocess.run(
        [analyze, "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert verified.returncode == 0, verified.stdout + verified.stderr


def test_the_unit_runs_hardened_with_notify_and_watchdog() -> None:
    unit = UNIT.read_text(encoding="utf-8")
    for setting in (
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "DynamicUser=yes",
        "StateDirectory=seyaha-agent",
        "LoadCredential=webhook_secret:",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
    ):
        assert setting in unit, setting


def test_the_wheel_the_image_installs_carries_the_package_and_the_command(
    tmp_path: Path,
) -> None:
    """The Dockerfile's first stage runs `pip wheel .`; no Docker engine runs here, so the
    wheel it would copy into the runtime image is built and inspected directly."""
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "-q",
            "-w",
            str(tmp_path),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("seyaha_agent-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        entry_points = next(n for n in names if n.endswith("entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    assert {"agent/__main__.py", "agent/cli.py", "agent/py.typed"} <= names
    assert not any(n.startswith(("tests/", "bench/")) for n in names)
    assert "seyaha-agent = agent.cli:main" in scripts


def test_the_dockerfile_builds_a_wheel_then_runs_it_unprivileged_under_tini() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8")
    stages = re.findall(r"^FROM \S+", dockerfile, re.MULTILINE)
    assert len(stages) == 2, "a build stage and a runtime stage"
    for line in (
        "RUN pip wheel --no-cache-dir --wheel-dir /wheels .",
        "COPY --from=build /wheels /wheels",
        "USER seyaha",
        'VOLUME ["/var/lib/seyaha-agent"]',
        "HEALTHCHECK",
        'ENTRYPOINT ["/usr/bin/tini", "--", "seyaha-agent"]',
    ):
        assert line in dockerfile, line


def test_the_image_health_check_asks_the_daemon_and_its_state_never_the_source() -> None:
    """`check` queried the supplier's database every minute and stayed healthy while delivery
    was paused; the health check is `outbox status --daemon --ignore-dead` instead."""
    dockerfile = (ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    (healthcheck,) = re.findall(r"^HEALTHCHECK (.*) CMD (\[.*\])$", dockerfile, re.MULTILINE)
    options = dict(re.findall(r"--([a-z-]+)=(\d+)s", healthcheck[0]))
    command = json.loads(healthcheck[1])
    assert command[0] == "seyaha-agent"
    assert "check" not in command
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.action, args.daemon, args.ignore_dead) == (
        "outbox",
        "status",
        True,
        True,
    )
    (run_command,) = re.findall(r"^CMD (\[.*\])$", dockerfile, re.MULTILINE)
    assert args.config == build_parser().parse_args(json.loads(run_command)).config
    # it finds the daemon where the image makes it listen, and gives it time to answer
    (listen,) = re.findall(r"SEYAHA_AGENT_METRICS__LISTEN=(\S+)", dockerfile)
    (exposed,) = re.findall(r"^EXPOSE (\d+)$", dockerfile, re.MULTILINE)
    assert readyz_url(listen) == f"http://127.0.0.1:{exposed}/readyz"
    assert int(options["timeout"]) > 2 * READYZ_TIMEOUT_S
