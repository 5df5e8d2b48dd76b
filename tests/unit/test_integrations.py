"""A platform's configuration, its secrets folder and the routing of rows (agent/integrations.py)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from agent.config import SECRET_ENV, load_config
from agent.errors import ConfigError
from agent.integrations import RECHECK_S, Router, SecretsFolder
from agent.model import CatalogDiff, CatalogRow, SlotDiff, StoredSlot
from agent.plan import plan
from agent.source.rows import BadRow
from tests.unit.test_config import Sections, base_sections, render

A = "a1" * 12
B = "b2" * 12
SECRET_A = "a" * 64


def write_platform(tmp_path: Path, change: Callable[[Sections], None] | None = None) -> Path:
    sections = base_sections()
    del sections["seyaha"]["integration_id"]
    del sections["seyaha"]["webhook_secret_file"]
    sections["seyaha"]["webhook_secrets_dir"] = "secrets"
    if change is not None:
        change(sections)
    (tmp_path / "secrets").mkdir(exist_ok=True)
    path = tmp_path / "agent.toml"
    path.write_text(render(sections), encoding="utf-8")
    return path


def problems(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.problems


@pytest.fixture(autouse=True)
def no_secret_in_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)


def test_a_platform_configuration_loads_with_its_folder_resolved(tmp_path: Path) -> None:
    config = load_config(write_platform(tmp_path))
    seyaha = config.settings.seyaha
    assert seyaha.routed
    assert seyaha.integration_id is None
    assert seyaha.webhook_secrets_dir == (tmp_path / "secrets").resolve()
    assert config.secret.reveal() == ""


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        pytest.param(
            lambda s: s["seyaha"].update(integration_id="64a1b2c3d4e5f6a7b8c9d0e1"),
            "[seyaha] integration_id: leave it out when webhook_secrets_dir is set",
            id="both-forms",
        ),
        pytest.param(
            lambda s: s["seyaha"].update(webhook_secret_file="secret.txt"),
            "[seyaha] webhook_secret_file: leave it out when webhook_secrets_dir is set",
            id="single-secret-too",
        ),
        pytest.param(
            lambda s: s["seyaha"].update(webhook_secrets_dir="nowhere"),
            "[seyaha] webhook_secrets_dir: no folder at",
            id="missing-folder",
        ),
    ],
)
def test_platform_mistakes_name_the_key(
    tmp_path: Path, change: Callable[[Sections], None], problem: str
) -> None:
    (found,) = problems(write_platform(tmp_path, change))
    assert found.startswith(problem)


def test_the_single_secret_variable_does_not_apply_to_a_platform(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET_A)
    (found,) = problems(write_platform(tmp_path))
    assert found.startswith(f"{SECRET_ENV}: does not apply when [seyaha] webhook_secrets_dir")
    assert SECRET_A not in found


class Ticking:
    """A monotonic clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_secret_file_added_changed_and_removed_is_seen(tmp_path: Path) -> None:
    learnt: list[str] = []
    clock = Ticking()
    folder = SecretsFolder(tmp_path, on_secret=learnt.append, monotonic=clock)
    assert folder.secret(A) is None
    assert folder.problem(A).startswith("no secret file")
    assert not folder.usable(A)

    (tmp_path / A).write_text(SECRET_A + "\n", encoding="utf-8")
    assert not folder.usable(A)  # the answer is kept for RECHECK_S
    clock.now += RECHECK_S
    assert folder.usable(A)
    found = folder.secret(A)
    assert found is not None
    assert found.reveal() == SECRET_A
    assert learnt == [SECRET_A]  # the redaction knows it before anything uses it

    (tmp_path / A).write_text("d" * 70 + "\n", encoding="utf-8")  # another size: changed
    found = folder.secret(A)
    assert found is not None
    assert found.reveal() == "d" * 70
    assert learnt == [SECRET_A, "d" * 70]

    (tmp_path / A).unlink()
    assert folder.secret(A) is None


@pytest.mark.parametrize(
    ("content", "problem"),
    [("", "is empty"), ("two words\n", "contains spaces"), ("\xff", "not UTF-8")],
)
def test_an_unusable_secret_file_says_why_without_its_content(
    tmp_path: Path, content: str, problem: str
) -> None:
    path = tmp_path / A
    if content == "\xff":
        path.write_bytes(b"\xff\xfe")
    else:
        path.write_text(content, encoding="utf-8")
    folder = SecretsFolder(tmp_path)
    assert folder.secret(A) is None
    assert problem in folder.problem(A)
    assert "two words" not in folder.problem(A)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads every file")
def test_an_unreadable_secret_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / A
    path.write_text(SECRET_A, encoding="utf-8")
    path.chmod(0)
    folder = SecretsFolder(tmp_path)
    assert folder.secret(A) is None
    assert "Permission denied" in folder.problem(A)


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (None, "integration_id is NULL"),
        ("", "integration_id must be the 24-character hexadecimal id"),
        ("../../etc/passwd", "integration_id must be the 24-character hexadecimal id"),
        (A + "0", "integration_id must be the 24-character hexadecimal id"),
        (B, f"integration {B} has no usable secret: no secret file"),
    ],
)
def test_a_row_without_a_usable_integration_is_refused_with_its_reason(
    tmp_path: Path, value: object, reason: str
) -> None:
    (tmp_path / A).write_text(SECRET_A, encoding="utf-8")
    route = Router(SecretsFolder(tmp_path))
    with pytest.raises(BadRow) as refused:
        route(value)
    assert str(refused.value).startswith(reason)


def test_a_row_names_its_integration_in_any_case_and_misses_are_counted(tmp_path: Path) -> None:
    (tmp_path / A).write_text(SECRET_A, encoding="utf-8")
    route = Router(SecretsFolder(tmp_path))
    assert route(A.upper()) == A
    assert route(f" {A} ".encode()) == A
    for _ in range(3):
        with pytest.raises(BadRow):
            route(B)
    assert route.take_missing() == {B: 3}
    assert route.take_missing() == {}


def test_the_plan_triggers_each_catalog_that_changed_once() -> None:
    rows = (CatalogRow("p1", "o", "f1", A), CatalogRow("p2", "o", "f2", A))
    messages = plan(CatalogDiff(added=rows, left=frozenset({B})), SlotDiff(), routed=True)
    assert [(m.kind, m.integration_id, m.dedupe_key) for m in messages] == [
        ("trigger", A, f"catalog:{A}"),
        ("trigger", B, f"catalog:{B}"),
    ]


def test_a_platform_baseline_triggers_every_integration_it_found() -> None:
    rows = (CatalogRow("p1", "o", "f1", B),)
    assert [
        m.integration_id
        for m in plan(CatalogDiff(added=rows), SlotDiff(), baseline=True, routed=True)
    ] == [B]
    assert [m.dedupe_key for m in plan(CatalogDiff(), SlotDiff(), baseline=True)] == ["catalog"]


def test_a_vanished_slot_is_closed_with_the_integration_that_knew_it() -> None:
    from datetime import UTC, datetime

    gone = StoredSlot(
        ("p", "o", "s"), "f", "2030-01-01T10:00:00+03:00", datetime(2030, 1, 1, 7, tzinfo=UTC), B
    )
    (closed,) = plan(CatalogDiff(), SlotDiff(removed=(gone,)), routed=True)
    assert (closed.integration_id, (closed.payload or {})["status"]) == (B, "CLOSED")


@pytest.mark.parametrize("name", ["../secret", A.upper(), "a1" * 11])
def test_a_secret_is_never_looked_up_outside_the_folder_or_by_another_spelling(
    tmp_path: Path, name: str
) -> None:
    folder = tmp_path / "secrets"
    folder.mkdir()
    (tmp_path / "secret").write_text(SECRET_A, encoding="utf-8")
    (folder / A.upper()).write_text(SECRET_A, encoding="utf-8")
    secrets = SecretsFolder(folder)
    assert secrets.secret(name) is None
    assert "is not a lowercase integration id" in secrets.problem(name)
