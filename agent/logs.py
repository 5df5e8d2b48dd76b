"""Logging: readable lines on a terminal, JSON lines otherwise, the secret redacted everywhere.

Every record carries a stable event name (`scan.done`, `delivery.failed`, ...) and the keys
of what it concerns (product, option, slot, message id), so that logs can be searched and
alerted on without parsing prose. Every line is one record: Python's warnings are logged
like any other event, and the database pool's complaints about a dead connection it throws
away are one line at DEBUG instead of an ERROR with a traceback.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import warnings
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

from agent.errors import first_line

REDACTED = "***"

POOL_CLEANUP_MESSAGES = (
    "Exception during reset or similar",
    "Exception closing connection",
    "Exception terminating connection",
    "Error closing cursor",
)
"""How SQLAlchemy's pool starts the ERROR it logs, with a traceback, when closing a cursor or
resetting or closing a connection fails. After the server killed the connection (a restart,
pg_terminate_backend, an idle timeout), or once a failed scan closed it, that is expected:
the agent has already reported the failure that mattered (source.unavailable,
state.unavailable) and the pool opens a new connection when it needs one."""

DRIVER_ERROR = "Error"
"""PEP 249's name for the base class of every driver's exceptions (psycopg.Error,
pymysql.err.Error, sqlite3.Error): what a driver raises when the connection it is asked to
reset or close is dead or already closed."""

QUIET_LOGGERS = ("httpx", "httpcore", "apscheduler", "tzlocal")
"""Libraries logged at WARNING and above only, whatever the agent's level. httpx and httpcore
log request lines at INFO/DEBUG (they never carry our headers, and Seyaha's answers are
logged by the agent itself); tzlocal, under apscheduler, logs files it read over several
lines at DEBUG."""

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
}


def event(logger: logging.Logger, level: int, name: str, message: str, **fields: Any) -> None:
    """Log `message` under the stable event `name` with structured `fields`."""
    logger.log(level, message, extra={"event": name, "fields": fields})


FEW_VALUES = 16
"""Up to this many values, a line is searched for each; beyond, by windows of each length."""


class Redaction:
    """The strings that must never reach a log line (the webhook secret, old and new)."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values: set[str] = {v for v in values if v}
        self._by_length: dict[int, frozenset[str]] = {}
        self._ordered = self._order()
        self._lock = threading.Lock()

    def _order(self) -> tuple[str, ...]:
        self._by_length = {
            length: frozenset(v for v in self._values if len(v) == length)
            for length in sorted({len(v) for v in self._values}, reverse=True)
        }
        return tuple(sorted(self._values, key=len, reverse=True))

    def add(self, value: str) -> None:
        """Learn a value (from any thread: a platform's secrets are read as they are used)."""
        if value and value not in self._values:
            with self._lock:
                self._values.add(value)
                self._ordered = self._order()

    def apply(self, text: str) -> str:
        ordered = self._ordered
        if len(ordered) <= FEW_VALUES:
            for value in ordered:
                if value in text:
                    text = text.replace(value, REDACTED)
            return text
        # A platform's thousands of secrets: one pass per distinct length over the line
        # (they are mostly of one length), not one search per secret.
        for length, values in self._by_length.items():
            start = 0
            while start + length <= len(text):
                if text[start : start + length] in values:
                    text = text[:start] + REDACTED + text[start + length :]
                    start += len(REDACTED)
                else:
                    start += 1
        return text


def redact_everywhere(value: str) -> None:
    """Have every log handler of the root logger mask `value` from now on."""
    for handler in logging.getLogger().handlers:
        formatter = handler.formatter
        if isinstance(formatter, RedactingFormatter):
            formatter.redaction.add(value)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    found = dict(getattr(record, "fields", None) or {})
    for key, value in record.__dict__.items():
        if key not in _RESERVED and key not in ("event", "fields"):
            found.setdefault(key, value)
    return found


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%H:%M:%S")
        name = getattr(record, "event", record.name)
        extras = " ".join(f"{k}={v}" for k, v in _fields(record).items() if v is not None)
        line = f"{stamp} {record.levelname:<7} {name:<20} {record.getMessage()}"
        if extras:
            line = f"{line}  {extras}"
        if record.exc_info:
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "event": getattr(record, "event", record.name),
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            body.setdefault(key, value)
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, default=str, ensure_ascii=False)


class RedactingFormatter(logging.Formatter):
    """Formats with `inner`, then removes every redacted value from the finished line."""

    def __init__(self, inner: logging.Formatter, redaction: Redaction) -> None:
        super().__init__()
        self.inner = inner
        self.redaction = redaction

    def format(self, record: logging.LogRecord) -> str:
        return self.redaction.apply(self.inner.format(record))


def _driver_error(exc: BaseException | None) -> bool:
    return exc is not None and any(
        cls.__name__ == DRIVER_ERROR and cls.__module__ != "builtins" for cls in type(exc).__mro__
    )


class DiscardedConnections(logging.Filter):
    """Turns the pool's ERROR-with-traceback about a connection or cursor it could not reset
    or close because the connection is dead (or closed already) into one DEBUG line
    (`db.connection_discarded`), shown only when the agent logs at DEBUG. Any other failure
    of the pool (not a driver's error) is left as it is: that one is not expected."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("sqlalchemy.pool") or not record.exc_info:
            return True
        if not isinstance(record.msg, str) or not record.msg.startswith(POOL_CLEANUP_MESSAGES):
            return True
        exc = record.exc_info[1]
        if not _driver_error(exc):
            return True
        assert exc is not None
        record.msg = (
            f"{record.getMessage()}: {first_line(exc)} (the connection was dead or closed already)"
        )
        record.args = None
        record.exc_info = None
        record.exc_text = None
        record.levelno = logging.DEBUG
        record.levelname = logging.getLevelName(logging.DEBUG)
        record.__dict__["event"] = "db.connection_discarded"
        return logging.getLogger().isEnabledFor(logging.DEBUG)


def log_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """`warnings.showwarning` for the agent: a warning is one log line (`python.warning`),
    formatted, redacted and filtered like every other. Python's filters still decide which
    warnings are shown at all."""
    if file is not None:  # written to a file on purpose: as Python would
        _python_showwarning(message, category, filename, lineno, file, line)
        return
    text = " ".join(str(message).split())
    event(
        logging.getLogger("py.warnings"),
        logging.WARNING,
        "python.warning",
        f"{category.__name__}: {text}",
        category=category.__name__,
        location=f"{filename}:{lineno}",
    )


_python_showwarning = warnings.showwarning


def setup_logging(
    *, level: str, fmt: str, redaction: Redaction, stream: TextIO | None = None
) -> logging.Handler:
    """Install one handler on the root logger; returns it so the caller can adjust it.

    Python's warnings go to it too (see log_warning), and the pool's noise about dead
    connections is folded (see DiscardedConnections).
    """
    global _python_showwarning
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        RedactingFormatter(JsonFormatter() if use_json else TextFormatter(), redaction)
    )
    handler.addFilter(DiscardedConnections())
    if warnings.showwarning is not log_warning:
        _python_showwarning = warnings.showwarning
        warnings.showwarning = log_warning
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    for noisy in QUIET_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    return handler
