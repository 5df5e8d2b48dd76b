"""Configuration: one TOML file plus environment overrides, validated once into pydantic models.

This is the only module that reads the configuration file, the secret file and the
environment. Every mistake is reported with the key at fault, e.g.
`[source] poll_intervall: unknown key`.

Environment overrides use the prefix SEYAHA_AGENT_ and `__` between levels
(SEYAHA_AGENT_SOURCE__URL=...). The webhook secret comes from SEYAHA_WEBHOOK_SECRET or from
the file named by `seyaha.webhook_secret_file`; the environment variable wins when both are set.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import stat
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError

from agent.dialects import DIGEST_WORK_MEM_MB
from agent.errors import ConfigError, first_line, shown_path

SECRET_ENV = "SEYAHA_WEBHOOK_SECRET"
ENV_PREFIX = "SEYAHA_AGENT_"
DEFAULT_STATE_URL = "sqlite:///state.db"
HOUR_S = 3600
DAY_S = 86400
"""Upper bounds of durations, in seconds: far above any sensible setting, far below what
makes a timer overflow."""
_HEX24 = re.compile(r"^[0-9a-fA-F]{24}$")
_HEX64 = re.compile(r"^[0-9a-fA-F]{64}$")
_SINCE = re.compile(r"(?<![:\w]):since\b")
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*(\.[A-Za-z_][A-Za-z0-9_$]*)?$")


class _Section(BaseModel):
    # inf and nan are refused: a poll_interval of inf killed the poll thread while /readyz
    # stayed ready. Upper bounds (le=...) keep every duration within what timers accept.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        if isinstance(value, str) and "\x00" in value:
            raise ValueError("contains a NUL character")
        return value

    @field_validator("*", mode="before")
    @classmethod
    def _no_boolean_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # TOML's true is an int to pydantic's lax mode: max_attempts = true meant 1.
        if isinstance(value, bool) and info.field_name is not None:
            kind = cls.model_fields[info.field_name].annotation
            if kind in (int, float):
                raise ValueError(f"must be a number, not {str(value).lower()}")
        return value


class SeyahaSettings(_Section):
    base_url: str = "https://api.seyaha.net"
    integration_id: str | None = None
    """The one integration every row goes to; left out when webhook_secrets_dir is set."""
    webhook_secret_file: Path | None = None
    webhook_secrets_dir: Path | None = None
    """A platform's many integrations: each row names its own in an integration_id column,
    and this folder holds one file per integration, named by its id, holding its secret."""

    @property
    def routed(self) -> bool:
        """Whether each row names its integration (webhook_secrets_dir is set)."""
        return self.webhook_secrets_dir is not None

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        value = value.strip().rstrip("/")
        if not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an http:// or https:// URL (got {value!r})")
        parts = urlsplit(value)
        if parts.username is not None or parts.password is not None:
            # Never echoed: the part before @ may hold a password.
            raise ValueError(
                "must not contain a user name or password (user:password@); Seyaha "
                "authenticates with the webhook secret alone"
            )
        if parts.query or parts.fragment or "?" in value or "#" in value:
            raise ValueError(
                f"must be the address alone, without ?query or #fragment (got {value!r}); "
                "the agent appends /api/v1/partner-integrations/..."
            )
        if value.startswith("http://") and not _is_loopback(urlsplit(value).hostname or ""):
            raise ValueError(
                f"{value!r} would send the webhook secret in clear over the network; use "
                "https:// (plain http:// is accepted only for loopback addresses, such as the "
                "sandbox)"
            )
        return value

    @field_validator("integration_id")
    @classmethod
    def _object_id(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        if not _HEX24.match(value):
            raise ValueError(
                f"must be the 24-character hexadecimal id Seyaha gave the integration (got {value!r})"
            )
        return value


class SourceSettings(_Section):
    url: str
    poll_interval: float = Field(
        5.0, gt=0, le=HOUR_S, description="seconds from the start of one scan to the next's"
    )
    timezone: str = "UTC"
    catalog_query: str
    slots_query: str
    slots_changed_query: str | None = None
    catalog_changed_query: str | None = None
    cursor_overlap: float = Field(
        60.0,
        ge=0,
        le=DAY_S,
        description="seconds re-read behind the change cursor (the last 5 s by every poll, "
        "all of it by the late-row sweep after each poll)",
    )
    full_scan_interval: float = Field(
        60.0,
        gt=0,
        le=7 * DAY_S,
        description="seconds between full reconciliations, start to start (they find deletes "
        "and rows the change query missed); held back by reconcile_share",
    )
    reconcile_share: float = Field(
        0.1,
        gt=0,
        le=1,
        description="at most this share of the time is spent reconciling: a scheduled "
        "reconciliation waits until the last one's length divided by this share has passed "
        "since it started (0.1: a 20 s reconciliation starts again at most every 200 s)",
    )
    query_timeout: float = Field(
        60.0, gt=0, le=DAY_S, description="seconds before a query is cancelled"
    )
    read_transaction_max: float = Field(
        30.0,
        gt=0,
        le=DAY_S,
        description="seconds a full read reads in one source transaction (from the query's "
        "first row) before it reads the rest in a new one",
    )
    range_digests: bool = Field(
        True,
        description="on PostgreSQL and MySQL, a reconciliation asks the database for a digest "
        "per range of slots and reads only the ranges that changed",
    )
    digest_work_mem_mb: int = Field(
        DIGEST_WORK_MEM_MB,
        ge=0,
        le=16_384,
        description="PostgreSQL: work_mem (MB) of the transaction that asks for range digests, "
        "so that grouping a large inventory stays in memory; 0 keeps the server's setting",
    )
    notify_channel: str = Field("seyaha_agent", pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
    notify_tables: tuple[str, ...] = ()
    watch_file: bool = True
    watch_commits: bool = Field(
        True,
        description="without a change query, on PostgreSQL and MySQL/MariaDB: every 0.25 s "
        "look whether anything committed (PostgreSQL's snapshot, the UPDATE_TIME of the "
        "tables the queries name on MySQL), pass as soon as something did, and skip passes "
        "while nothing does (one still runs every full_scan_interval)",
    )

    @field_validator("url")
    @classmethod
    def _sqlalchemy_url(cls, value: str) -> str:
        return _check_url(value)

    @field_validator("slots_changed_query", "catalog_changed_query")
    @classmethod
    def _has_since(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if not value.strip():
            raise ValueError("must not be empty (leave the key out to poll with full scans)")
        if not _SINCE.search(value):
            raise ValueError(
                "must use the :since parameter, e.g. WHERE updated_at >= :since "
                "(the agent binds the change cursor to it)"
            )
        return value

    @field_validator("notify_tables")
    @classmethod
    def _table_names(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        for name in value:
            if not _TABLE.match(name):
                raise ValueError(f"{name!r} is not a table name (schema.table or table)")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError, OSError) as exc:
            raise ValueError(
                f"unknown time zone {value!r} (use an IANA name such as Europe/Istanbul)"
            ) from exc
        return value

    @field_validator("catalog_query", "slots_query")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)


class StateSettings(_Section):
    url: str = DEFAULT_STATE_URL
    scanner_lease: float = Field(
        15.0,
        ge=2,
        le=3600,
        description="seconds after which another agent on a shared store takes over scanning "
        "from one that stopped renewing its lease",
    )

    @field_validator("url")
    @classmethod
    def _sqlalchemy_url(cls, value: str) -> str:
        return _check_url(value)


class DeliverySettings(_Section):
    connect_timeout: float = Field(
        5.0, gt=0, le=HOUR_S, description="seconds to open a connection to Seyaha"
    )
    timeout: float = Field(10.0, gt=0, le=HOUR_S, description="seconds to wait for Seyaha's answer")
    max_attempts: int = Field(
        20, ge=1, le=1_000_000, description="attempts before a message is dead-lettered"
    )
    backoff_initial: float = Field(
        1.0, gt=0, le=DAY_S, description="seconds before the first retry"
    )
    backoff_max: float = Field(
        300.0, gt=0, le=DAY_S, description="longest pause between two retries"
    )
    retry_after_max: float = Field(
        3600.0, gt=0, le=7 * DAY_S, description="longest Retry-After that is honoured, in seconds"
    )
    auth_probe_interval: float = Field(
        60.0, gt=0, le=DAY_S, description="seconds between probes while Seyaha refuses the secret"
    )
    lease: float = Field(
        60.0, gt=0, le=DAY_S, description="seconds a claimed message stays reserved"
    )
    batch_size: int = Field(50, ge=1, le=10_000)
    concurrency: int = Field(4, ge=1, le=64, description="requests in flight at once")
    rate_limit: float = Field(
        50.0, ge=0, le=1_000_000, description="requests per second at most (0: no limit)"
    )
    rate_burst: int = Field(
        250,
        ge=1,
        le=1_000_000,
        description="calls that may go out at once after a quiet spell, within rate_limit "
        "on average (what a poll or a reconciliation found leaves together)",
    )
    integration_rate_limit: float = Field(
        0.0,
        ge=0,
        le=1_000_000,
        description="a platform: requests per second at most per integration, within "
        "rate_limit for all (0: rate_limit alone)",
    )
    breaker_failures: int = Field(
        5, ge=1, le=1_000_000, description="failures in a row that open the circuit breaker"
    )
    breaker_cooldown: float = Field(
        30.0, gt=0, le=DAY_S, description="seconds the breaker stays open before one probe"
    )
    max_age: float = Field(
        86400.0,
        gt=0,
        le=365 * DAY_S,
        description="seconds a failing message is retried before it is dead",
    )
    shutdown_grace: float = Field(
        20.0, ge=0, le=HOUR_S, description="seconds in-flight calls may take to finish at shutdown"
    )

    @model_validator(mode="after")
    def _backoff_in_order(self) -> DeliverySettings:
        if self.backoff_initial > self.backoff_max:
            raise ValueError(
                f"backoff_initial ({self.backoff_initial:g} s) is above backoff_max "
                f"({self.backoff_max:g} s): the first retry would wait longer than any other"
            )
        return self

    @model_validator(mode="after")
    def _lease_outlives_request(self) -> DeliverySettings:
        worst = self.connect_timeout + self.timeout
        if self.lease <= worst * 2:
            raise ValueError(
                f"lease ({self.lease:g} s) must be more than twice connect_timeout + timeout "
                f"({worst:g} s), or a slow request could be sent twice"
            )
        return self


class MetricsSettings(_Section):
    listen: str = Field(
        "127.0.0.1:9464",
        description="host:port for /metrics, /healthz and /readyz; empty: no listener",
    )

    @field_validator("listen")
    @classmethod
    def _host_port(cls, value: str) -> str:
        value = value.strip()
        if value and listen_address(value) is None:
            raise ValueError(
                f"must be host:port, e.g. 127.0.0.1:9464 or 0.0.0.0:9464 (got {value!r})"
            )
        return value


def listen_address(value: str) -> tuple[str, int] | None:
    """("host", port) from "host:port" or "[v6]:port", or None if it is not one."""
    match = re.match(r"^\[?([^\]]*?)\]?:(\d{1,5})$", value)
    if match is None or int(match[2]) > 65535:
        return None
    return match[1] or "0.0.0.0", int(match[2])


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class LogSettings(_Section):
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["auto", "text", "json"] = "auto"

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value


class AgentSettings(BaseSettings):
    """The whole configuration file."""

    model_config = SettingsConfigDict(
        extra="forbid",
        frozen=True,
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        nested_model_default_partial_update=True,
    )

    seyaha: SeyahaSettings
    source: SourceSettings
    state: StateSettings = StateSettings()
    delivery: DeliverySettings = DeliverySettings()
    metrics: MetricsSettings = MetricsSettings()
    log: LogSettings = LogSettings()


class Secret:
    """The webhook secret. Its repr and str never show the value."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('**********')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True)
class Config:
    """A validated configuration with paths resolved and the secret loaded."""

    path: Path
    settings: AgentSettings
    secret: Secret


_DRIVER_HINTS = {
    "postgresql": "postgresql+psycopg://user@host/db",
    "mysql": "mysql+pymysql://user@host/db",
    "mariadb": "mysql+pymysql://user@host/db",
    "sqlite": "sqlite:///file.db",
}
"""The URL form whose driver ships with the agent, per backend."""


def _check_url(value: str) -> str:
    try:
        url = make_url(value)
    except ArgumentError as exc:
        raise ValueError(
            f"is not a database URL (expected e.g. postgresql+psycopg://user@host/db, "
            f"mysql+pymysql://user@host/db or sqlite:///file.db; got "
            f"{redacted_url(value)!r})"
        ) from exc
    backend = url.get_backend_name()
    hint = _DRIVER_HINTS.get(backend)
    try:
        url.get_dialect().import_dbapi()
    except (ImportError, NoSuchModuleError) as exc:
        if hint is None:
            raise ValueError(
                f"{backend}:// databases are not supported (use PostgreSQL, MySQL/MariaDB or "
                f"SQLite, e.g. {_DRIVER_HINTS['postgresql']})"
            ) from None
        raise ValueError(
            f"the driver for {url.drivername}:// is not installed ({exc}); use {hint}, "
            "whose driver ships with the agent"
        ) from None
    return value


def redacted_url(value: str) -> str:
    """A URL fit for a message: whatever stands between :// and @ is hidden."""
    return re.sub(r"(://)[^/@\s]*@", r"\1***@", value)


def resolve_sqlite_url(url: str, base: Path) -> str:
    """A relative SQLite path is relative to the configuration file's folder, not the cwd."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite":
        return url
    database = parsed.database
    if not database or database == ":memory:" or database.startswith("file:"):
        return url
    if Path(database).is_absolute():
        return url
    return parsed.set(database=str((base / database).resolve())).render_as_string(
        hide_password=False
    )


def _describe(error: dict[str, Any], environ: Mapping[str, str] | None = None) -> str:
    # A key with a line break in it (TOML allows "\n" = 1) must not split the problem's line.
    loc = [str(p) if str(p).isprintable() else repr(str(p)) for p in error.get("loc", ())]
    override = env_override(loc, os.environ if environ is None else environ)
    if override is not None:
        where = f"{override} (environment override of [{loc[0]}] {'.'.join(loc[1:])})"
    elif len(loc) >= 2:
        where = f"[{loc[0]}] {'.'.join(loc[1:])}"
    elif loc:
        where = f"[{loc[0]}]"
    else:
        where = "(file)"
    kind = error.get("type", "")
    if kind == "extra_forbidden":
        return f"{where}: unknown key (check the spelling)"
    if kind == "missing":
        return f"{where}: is required"
    message = str(error.get("msg", "is invalid"))
    message = message.removeprefix("Value error, ")
    got = error.get("input")
    if kind not in ("value_error",) and isinstance(got, str | int | float | bool):
        try:
            message = f"{message} (got {got!r})"
        except ValueError:  # an integer of more than 4,300 digits cannot be printed
            message = f"{message} (got an integer too long to show)"
    return f"{where}: {' '.join(message.split())}"


def env_override(loc: list[str], environ: Mapping[str, str]) -> str | None:
    """The environment variable that set the key at `loc`, if one did: a wrong override
    must not be blamed on the file."""
    if len(loc) < 2:
        return None
    wanted = (ENV_PREFIX + "__".join(loc[:2])).upper()
    return next((name for name in environ if name.upper() == wanted), None)


def _settings_from_file(path: Path) -> AgentSettings:
    class _FromFile(AgentSettings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            return (init_settings, env_settings, TomlConfigSettingsSource(settings_cls, path))

    return AgentSettings.model_validate(_FromFile().model_dump())


def routing_problems(
    settings: AgentSettings, environ: Mapping[str, str] | None = None
) -> list[str]:
    """What is wrong with the choice between one integration and many (each key named)."""
    seyaha = settings.seyaha
    env = os.environ if environ is None else environ
    if seyaha.webhook_secrets_dir is None:
        if seyaha.integration_id is None:
            return [
                "[seyaha] integration_id: is required (or, for a platform whose queries return "
                "an integration_id column, set webhook_secrets_dir instead)"
            ]
        return []
    problems = []
    if seyaha.integration_id is not None:
        problems.append(
            "[seyaha] integration_id: leave it out when webhook_secrets_dir is set (each row "
            "names its integration in its integration_id column)"
        )
    if seyaha.webhook_secret_file is not None:
        problems.append(
            "[seyaha] webhook_secret_file: leave it out when webhook_secrets_dir is set (each "
            "integration's secret is the file named by its id in that folder)"
        )
    if env.get(SECRET_ENV, "").strip():
        problems.append(
            f"{SECRET_ENV}: does not apply when [seyaha] webhook_secrets_dir is set (each "
            "integration's secret is the file named by its id in that folder); unset it"
        )
    folder = seyaha.webhook_secrets_dir
    if not folder.is_dir():
        problems.append(
            f"[seyaha] webhook_secrets_dir: no folder at {shown_path(folder)} (create it, then "
            "put one file per integration in it, named by the integration id)"
        )
    return problems


def read_secret(settings: AgentSettings, environ: Mapping[str, str] | None = None) -> Secret:
    """The one integration's secret; empty for a platform (see agent.integrations)."""
    problems = routing_problems(settings, environ)
    if problems:
        raise ConfigError(problems)
    if settings.seyaha.routed:
        return Secret("")
    env = os.environ if environ is None else environ
    from_env = env.get(SECRET_ENV, "").strip()
    if from_env:
        return _usable_secret(from_env, SECRET_ENV)
    secret_file = settings.seyaha.webhook_secret_file
    if secret_file is None:
        raise ConfigError([f"[seyaha] webhook_secret_file: is required unless {SECRET_ENV} is set"])
    try:
        value = secret_file.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(
            [f"[seyaha] webhook_secret_file: cannot read {shown_path(secret_file)} ({why})"]
        ) from None
    if not value:
        raise ConfigError([f"[seyaha] webhook_secret_file: {shown_path(secret_file)} is empty"])
    return _usable_secret(value, "[seyaha] webhook_secret_file")


def secret_problem(value: str) -> str | None:
    """Why `value` cannot be sent as a secret, or None. It goes into an HTTP header: anything
    else would fail at the first request with an error that could echo it. The message never
    repeats the value."""
    if not (value.isascii() and value.isprintable()) or any(c.isspace() for c in value):
        return (
            "the secret contains spaces, line breaks or non-ASCII characters; it should be "
            "the 64 hexadecimal characters Seyaha showed once"
        )
    return None


def _usable_secret(value: str, where: str) -> Secret:
    problem = secret_problem(value)
    if problem is not None:
        raise ConfigError([f"{where}: {problem}"])
    return Secret(value)


def secret_warnings(
    secret: Secret, secret_file: Path | None = None, *, where: str = "[seyaha] webhook_secret_file"
) -> list[str]:
    """Doubts about a usable secret, for warnings at start-up.

    Warnings, not refusals: a secret of another shape may be a deliberate test value, and a
    file readable by others may sit in a container whose only user is the agent.
    """
    if not secret.reveal():
        return []  # a platform's: each file of webhook_secrets_dir is doubted as it is read
    doubts = []
    if not _HEX64.match(secret.reveal()):
        doubts.append(
            f"{'the' if secret_file is None or where.startswith('[') else where + ': its'} "
            f"webhook secret is {len(secret.reveal())} characters long and not all "
            "hexadecimal; Seyaha's secrets are 64 hexadecimal characters, so Seyaha will "
            "probably answer 401"
        )
    if secret_file is not None:
        with contextlib.suppress(OSError):
            mode = secret_file.stat().st_mode
            if mode & 0o077:
                doubts.append(
                    f"{where}: {shown_path(secret_file)} can be read by other users "
                    f"(mode {stat.S_IMODE(mode):o}); run chmod 600 on it"
                )
    return doubts


def load_settings(path: Path) -> AgentSettings:
    """Validate the file (with environment overrides) and resolve relative paths in it."""
    path = path.expanduser()
    if not path.is_file():
        raise ConfigError([f"no configuration file at {path}"], source=str(path))
    try:
        settings = _settings_from_file(path)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"not valid TOML: {exc}"], source=str(path)) from None
    except ValidationError as exc:
        raise ConfigError(
            [_describe(dict(e)) for e in exc.errors(include_url=False)], source=str(path)
        ) from None
    except ValueError as exc:  # tomllib refuses an integer of more than 4,300 digits so
        raise ConfigError([f"not valid TOML: {first_line(exc)}"], source=str(path)) from None
    base = path.resolve().parent
    seyaha = settings.seyaha
    for key in ("webhook_secret_file", "webhook_secrets_dir"):
        given = getattr(seyaha, key)
        if given is not None and not given.is_absolute():
            seyaha = seyaha.model_copy(update={key: (base / given).resolve()})
    return settings.model_copy(
        update={
            "seyaha": seyaha,
            "source": settings.source.model_copy(
                update={"url": resolve_sqlite_url(settings.source.url, base)}
            ),
            "state": settings.state.model_copy(
                update={"url": resolve_sqlite_url(settings.state.url, base)}
            ),
        }
    )


def load_config(path: Path) -> Config:
    settings = load_settings(path)
    try:
        secret = read_secret(settings)
    except ConfigError as exc:
        raise ConfigError(exc.problems, source=str(path)) from None
    return Config(path=path.resolve(), settings=settings, secret=secret)
