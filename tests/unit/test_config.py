from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import (
    SECRET_ENV,
    Config,
    Secret,
    listen_address,
    load_config,
    load_settings,
    resolve_sqlite_url,
    secret_warnings,
)
from agent.errors import ConfigError
from tests.conftest import INTEGRATION_ID, SECRET

Sections = dict[str, dict[str, Any]]
Write = Callable[..., Path]


def base_sections() -> Sections:
    return {
        "seyaha": {"integration_id": INTEGRATION_ID, "webhook_secret_file": "secret.txt"},
        "source": {
            "url": "postgresql+psycopg://reader@db.example/inventory",
            "timezone": "Europe/Istanbul",
            "catalog_query": "SELECT product_id, option_id, name FROM options",
            "slots_query": "SELECT * FROM slots",
        },
    }


def render(sections: Sections) -> str:
    lines: list[str] = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in keys.items())
        lines.append("")
    return "\n".join(lines)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("SEYAHA_"):
            monkeypatch.delenv(name)


@pytest.fixture
def write(tmp_path: Path) -> Write:
    """Writes the config (base sections, changed by `change`) and the secret file next to it."""

    def _write(
        change: Callable[[Sections], None] | None = None, *, text: str | None = None
    ) -> Path:
        sections = base_sections()
        if change is not None:
            change(sections)
        folder = tmp_path / "etc"
        folder.mkdir(exist_ok=True)
        (folder / "secret.txt").write_text(SECRET + "\n", encoding="utf-8")
        path = folder / "agent.toml"
        path.write_text(render(sections) if text is None else text, encoding="utf-8")
        return path

    return _write


def problems_of(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    return caught.value.problems


def test_valid_file_loads_with_defaults(write: Write) -> None:
    config = load_config(write())

    assert isinstance(config, Config)
    assert config.secret.reveal() == SECRET
    settings = config.settings
    assert settings.seyaha.integration_id == INTEGRATION_ID
    assert settings.seyaha.base_url == "https://api.seyaha.net"
    assert settings.source.poll_interval == 5.0
    assert settings.source.zone.key == "Europe/Istanbul"
    assert settings.delivery.max_attempts == 20
    assert settings.log.level == "INFO"


def test_values_are_normalised(write: Write) -> None:
    def change(s: Sections) -> None:
        s["seyaha"]["base_url"] = "http://localhost:8080/"
        s["seyaha"]["integration_id"] = f"  {INTEGRATION_ID.upper()} "
        s["log"] = {"level": "debug", "format": "json"}

    settings = load_config(write(change)).settings
    assert settings.seyaha.base_url == "http://localhost:8080"
    assert settings.seyaha.integration_id == INTEGRATION_ID.upper()
    assert settings.log.level == "DEBUG"


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        pytest.param(
            lambda s: s["source"].update(poll_intervall=3),
            "[source] poll_intervall: unknown key",
            id="misspelt-key",
        ),
        pytest.param(
            lambda s: s["seyaha"].update(webhook_secret=SECRET),
            "[seyaha] webhook_secret: unknown key",
            id="secret-inline",
        ),
        pytest.param(lambda s: s.update(sourc={"url": "x"}), "[sourc]: unknown key", id="section"),
        pytest.param(
            lambda s: s.update(delivery={"retries": 3}),
            "[delivery] retries: unknown key",
            id="optional-section",
        ),
    ],
)
def test_unknown_key_is_named(
    write: Write, change: Callable[[Sections], None], problem: str
) -> None:
    problems = problems_of(write(change))
    assert len(problems) == 1
    assert problems[0].startswith(problem)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (
            lambda s: s["seyaha"].pop("integration_id"),
            "[seyaha] integration_id: is required (or, for a platform whose queries return an "
            "integration_id column, set webhook_secrets_dir instead)",
        ),
        (lambda s: s["source"].pop("url"), "[source] url: is required"),
        (lambda s: s["source"].pop("slots_query"), "[source] slots_query: is required"),
        (lambda s: s.pop("source"), "[source]: is required"),
    ],
)
def test_missing_required_key_is_named(
    write: Write, change: Callable[[Sections], None], problem: str
) -> None:
    assert problems_of(write(change)) == [problem]


@pytest.mark.parametrize(
    ("section", "key", "value", "problem"),
    [
        (
            "source",
            "timezone",
            "Mars/Olympus",
            "[source] timezone: unknown time zone 'Mars/Olympus'",
        ),
        ("source", "timezone", "Europe", "[source] timezone: unknown time zone 'Europe'"),
        ("source", "timezone", "../etc/passwd", "[source] timezone: unknown time zone"),
        ("source", "timezone", 3, "[source] timezone:"),
        ("seyaha", "integration_id", "abc", "[seyaha] integration_id: must be the 24-character"),
        ("seyaha", "integration_id", "z" * 24, "[seyaha] integration_id: must be the 24-character"),
        ("seyaha", "integration_id", INTEGRATION_ID + "0", "[seyaha] integration_id: must be"),
        ("seyaha", "base_url", "ftp://api.seyaha.net", "[seyaha] base_url: must be an http://"),
        ("source", "url", "not a url", "[source] url: is not a database URL"),
        ("source", "poll_interval", 0, "[source] poll_interval: Input should be greater than 0"),
        ("source", "catalog_query", "   ", "[source] catalog_query: must not be empty"),
        ("source", "digest_work_mem_mb", -1, "[source] digest_work_mem_mb: Input should be"),
        ("source", "digest_work_mem_mb", "64MB", "[source] digest_work_mem_mb: Input should be"),
        ("state", "url", "nope", "[state] url: is not a database URL"),
        ("delivery", "max_attempts", 0, "[delivery] max_attempts:"),
        ("delivery", "lease", 20, "[delivery]: lease (20 s) must be more than twice"),
        ("log", "level", "LOUD", "[log] level:"),
        ("log", "format", "xml", "[log] format:"),
        # Values that broke the daemon instead of the start:
        ("source", "poll_interval", 1e300, "[source] poll_interval: Input should be less than"),
        ("delivery", "lease", 1e300, "[delivery] lease: Input should be less than or equal"),
        ("delivery", "backoff_max", 1e300, "[delivery] backoff_max: Input should be less than"),
        ("source", "read_transaction_max", 0, "[source] read_transaction_max: Input should be"),
        ("source", "reconcile_share", 0, "[source] reconcile_share: Input should be greater"),
        ("source", "reconcile_share", 1.5, "[source] reconcile_share: Input should be less"),
        ("source", "read_transaction_max", 1e300, "[source] read_transaction_max: Input should"),
        ("delivery", "max_attempts", True, "[delivery] max_attempts: must be a number, not true"),
        ("delivery", "rate_limit", False, "[delivery] rate_limit: must be a number, not false"),
        ("delivery", "rate_burst", 0, "[delivery] rate_burst: Input should be greater than"),
        ("delivery", "rate_burst", 2.5, "[delivery] rate_burst: Input should be a valid integer"),
        (
            "delivery",
            "backoff_initial",
            600,
            "[delivery]: backoff_initial (600 s) is above backoff_max (300 s)",
        ),
        ("metrics", "listen", "127.0.0.1:65536", "[metrics] listen: must be host:port"),
        (
            "seyaha",
            "base_url",
            "https://api.seyaha.net/?tenant=1",
            "[seyaha] base_url: must be the address alone, without ?query",
        ),
        (
            "seyaha",
            "base_url",
            "https://api.seyaha.net#top",
            "[seyaha] base_url: must be the address alone",
        ),
        (
            "source",
            "url",
            "mysql://reader@db.example/inventory",
            "[source] url: the driver for mysql:// is not installed (No module named 'MySQLdb'); "
            "use mysql+pymysql://user@host/db",
        ),
        ("state", "url", "oracle://agent@db.example/x", "[state] url: oracle:// databases are not"),
    ],
)
def test_invalid_value_is_named(
    write: Write, section: str, key: str, value: Any, problem: str
) -> None:
    def change(s: Sections) -> None:
        s.setdefault(section, {})[key] = value

    problems = problems_of(write(change))
    assert len(problems) == 1
    assert problems[0].startswith(problem)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "+inf"])
@pytest.mark.parametrize(
    ("section", "key"),
    [("source", "poll_interval"), ("source", "read_transaction_max"), ("delivery", "lease")],
)
def test_an_infinite_or_undefined_number_is_named(
    write: Write, section: str, key: str, value: str
) -> None:
    """poll_interval = inf killed the poll thread silently while /readyz stayed ready."""
    path = write()
    path.write_text(path.read_text().replace(f"[{section}]", f"[{section}]\n{key} = {value}"))
    if f"[{section}]" not in path.read_text():
        path.write_text(path.read_text() + f"\n[{section}]\n{key} = {value}\n")

    (problem,) = problems_of(path)
    assert problem.startswith(f"[{section}] {key}: Input should be a finite number")


def test_credentials_in_the_base_url_are_refused_without_echoing_them(write: Write) -> None:
    def change(s: Sections) -> None:
        s["seyaha"]["base_url"] = "https://partner:hunter2@api.seyaha.net"

    (problem,) = problems_of(write(change))
    assert problem.startswith("[seyaha] base_url: must not contain a user name or password")
    assert "hunter2" not in problem


def test_every_problem_is_reported_at_once(write: Write) -> None:
    def change(s: Sections) -> None:
        s["source"]["timezone"] = "Nowhere/City"
        s["seyaha"]["integration_id"] = "123"
        s["source"]["polling"] = 1

    problems = problems_of(write(change))
    assert len(problems) == 3
    assert {p.split(":")[0] for p in problems} == {
        "[source] timezone",
        "[seyaha] integration_id",
        "[source] polling",
    }


def test_invalid_toml(write: Write) -> None:
    (problem,) = problems_of(write(text="[seyaha\nintegration_id = 1\n"))
    assert problem.startswith("not valid TOML")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no configuration file at"):
        load_settings(tmp_path / "absent.toml")


def test_relative_paths_resolve_against_the_config_folder(
    write: Write, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def change(s: Sections) -> None:
        s["source"]["url"] = "sqlite:///data/inventory.db"
        s["seyaha"]["webhook_secret_file"] = "secret.txt"

    path = write(change)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)

    config = load_config(path)

    folder = path.parent.resolve()
    assert config.settings.source.url == f"sqlite:///{folder / 'data' / 'inventory.db'}"
    assert config.settings.state.url == f"sqlite:///{folder / 'state.db'}"
    assert config.settings.seyaha.webhook_secret_file == folder / "secret.txt"
    assert config.secret.reveal() == SECRET


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:///state.db", "sqlite:////etc/seyaha/state.db"),
        ("sqlite:///./sub/../state.db", "sqlite:////etc/seyaha/state.db"),
        ("sqlite+pysqlite:///state.db", "sqlite+pysqlite:////etc/seyaha/state.db"),
        ("sqlite:////var/lib/seyaha/state.db", "sqlite:////var/lib/seyaha/state.db"),
        ("sqlite://", "sqlite://"),
        ("sqlite:///:memory:", "sqlite:///:memory:"),
        ("postgresql+psycopg://agent:pw@db/state", "postgresql+psycopg://agent:pw@db/state"),
    ],
)
def test_resolve_sqlite_url(url: str, expected: str) -> None:
    assert resolve_sqlite_url(url, Path("/etc/seyaha")) == expected


def test_environment_overrides_one_key(write: Write, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEYAHA_AGENT_SOURCE__POLL_INTERVAL", "7.5")
    settings = load_config(write()).settings
    assert settings.source.poll_interval == 7.5
    assert settings.source.timezone == "Europe/Istanbul"
    assert settings.source.url == base_sections()["source"]["url"]


def test_environment_overrides_a_section_absent_from_the_file(
    write: Write, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEYAHA_AGENT_DELIVERY__MAX_ATTEMPTS", "3")
    delivery = load_config(write()).settings.delivery
    assert delivery.max_attempts == 3
    assert delivery.backoff_max == 300.0


def test_invalid_environment_override_is_named(
    write: Write, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEYAHA_AGENT_SOURCE__POLL_INTERVAL", "-1")
    (problem,) = problems_of(write())
    # Named by the variable that set it, not blamed on the file.
    assert problem.startswith(
        "SEYAHA_AGENT_SOURCE__POLL_INTERVAL (environment override of [source] poll_interval): "
        "Input should be greater than 0"
    )


def test_secret_from_environment_wins_over_the_file(
    write: Write, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, "  from-the-environment\n")
    assert load_config(write()).secret.reveal() == "from-the-environment"


def test_secret_from_environment_needs_no_file(
    write: Write, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    path = write(lambda s: s["seyaha"].pop("webhook_secret_file"))
    assert load_config(path).secret.reveal() == SECRET


def test_blank_secret_environment_falls_back_to_the_file(
    write: Write, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, "   ")
    assert load_config(write()).secret.reveal() == SECRET


@pytest.mark.parametrize(
    ("change", "secret_text", "problem"),
    [
        (
            lambda s: s["seyaha"].pop("webhook_secret_file"),
            None,
            f"[seyaha] webhook_secret_file: is required unless {SECRET_ENV} is set",
        ),
        (
            lambda s: s["seyaha"].update(webhook_secret_file="missing.txt"),
            None,
            "[seyaha] webhook_secret_file: cannot read",
        ),
        (None, " \n", "[seyaha] webhook_secret_file:"),
    ],
)
def test_secret_problems(
    write: Write,
    change: Callable[[Sections], None] | None,
    secret_text: str | None,
    problem: str,
) -> None:
    path = write(change)
    if secret_text is not None:
        (path.parent / "secret.txt").write_text(secret_text, encoding="utf-8")
    (found,) = problems_of(path)
    assert found.startswith(problem)


def test_secret_never_shows() -> None:
    secret = Secret(SECRET)
    assert SECRET not in str(secret)
    assert SECRET not in repr(secret)
    assert SECRET not in f"{secret!s} {secret!r} {[secret]}"
    assert secret == Secret(SECRET)
    assert secret != Secret("other")
    assert hash(secret) == hash(Secret(SECRET))


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda s: s["source"].update(timezone="Nowhere/City"), id="bad-value"),
        pytest.param(lambda s: s["source"].update(extra=SECRET), id="unknown-key"),
        pytest.param(lambda s: s["seyaha"].update(webhook_secret=SECRET), id="secret-inline"),
        pytest.param(lambda s: s["seyaha"].pop("integration_id"), id="missing-key"),
        pytest.param(lambda s: s["delivery"].update(lease=1), id="model-check"),
    ],
)
@pytest.mark.parametrize("secret_in_env", [True, False], ids=["env-secret", "file-secret"])
def test_config_errors_never_carry_the_secret(
    write: Write,
    monkeypatch: pytest.MonkeyPatch,
    change: Callable[[Sections], None],
    secret_in_env: bool,
) -> None:
    if secret_in_env:
        monkeypatch.setenv(SECRET_ENV, SECRET)

    def changed(s: Sections) -> None:
        s["delivery"] = {}
        change(s)

    with pytest.raises(ConfigError) as caught:
        load_config(write(changed))
    error = caught.value
    assert SECRET not in str(error)
    assert SECRET not in repr(error)
    assert all(SECRET not in p for p in error.problems)


def test_secret_in_an_environment_override_is_not_echoed(
    write: Write, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SEYAHA_AGENT_SEYAHA__WEBHOOK_SECRET", SECRET)
    with pytest.raises(ConfigError) as caught:
        load_config(write())
    assert (
        "SEYAHA_AGENT_SEYAHA__WEBHOOK_SECRET (environment override of [seyaha] webhook_secret): "
        "unknown key"
    ) in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "bad_secret",
    ["abc def" + SECRET, SECRET + "\nsecond-line", "s\u00e9cret" + SECRET, "tab\there"],
)
def test_secret_unfit_for_a_header_is_refused_without_echoing_it(
    write: Write, bad_secret: str
) -> None:
    path = write()
    (path.parent / "secret.txt").write_text(bad_secret, encoding="utf-8")
    (found,) = problems_of(path)
    assert found.startswith("[seyaha] webhook_secret_file: the secret contains")
    assert bad_secret.strip() not in found
    assert bad_secret.split()[0] not in found


def test_secret_unfit_for_a_header_from_the_environment_names_the_variable(
    write: Write, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(SECRET_ENV, "two words")
    (found,) = problems_of(write())
    assert found.startswith(f"{SECRET_ENV}: the secret contains")
    assert "two words" not in found


@pytest.mark.parametrize(
    ("value", "doubts"),
    [(SECRET, 0), (SECRET.upper(), 0), ("abc123", 1), ("z" * 64, 1), (SECRET + "0", 1)],
)
def test_secret_warnings_doubt_anything_but_64_hex(value: str, doubts: int) -> None:
    warnings = secret_warnings(Secret(value))
    assert len(warnings) == doubts
    assert all(value not in w for w in warnings)


@pytest.mark.parametrize(
    ("base_url", "accepted"),
    [
        ("https://api.seyaha.net", True),
        ("http://127.0.0.1:8377", True),
        ("http://localhost:8377", True),
        ("http://[::1]:8377", True),
        ("http://api.seyaha.net", False),
        ("http://10.0.0.5:8377", False),
    ],
)
def test_plain_http_is_only_accepted_for_loopback(
    write: Write, base_url: str, accepted: bool
) -> None:
    path = write(lambda s: s["seyaha"].update(base_url=base_url))
    if accepted:
        assert load_config(path).settings.seyaha.base_url == base_url
    else:
        (found,) = problems_of(path)
        assert found.startswith(f"[seyaha] base_url: {base_url!r} would send the webhook secret")


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        (":9464", ("0.0.0.0", 9464)),
        ("[::1]:9464", ("::1", 9464)),
        ("127.0.0.1", None),
        ("127.0.0.1:99999", None),
        ("host:port", None),
    ],
)
def test_listen_address(text: str, address: tuple[str, int] | None) -> None:
    assert listen_address(text) == address


def test_a_bad_listen_address_names_the_key(write: Write) -> None:
    path = write(lambda s: s.setdefault("metrics", {}).update(listen="9464"))
    (found,) = problems_of(path)
    assert found.startswith("[metrics] listen: must be host:port")
