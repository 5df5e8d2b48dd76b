"""Logging: readable lines on a terminal, JSON lines otherwise, the secret redacted everywhere.

Every record carries a stable event name (`scan.done`, `delivery.failed`, ...) and the keys
of what it concerns (product, option, slot, message id), so that logs can be searched and
alerted on without parsing prose.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any, TextIO

REDACTED = "***"

_RESERVED = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message",
    "asctime",
}


def event(logger: logging.Logger, level: int, name: str, message: str, **fields: Any) -> None:
    """Log `message` under the stable event `name` with structured `fields`."""
    logger.log(level, message, extra={"event": name, "fields": fields})


class Redaction:
    """The strings that must never reach a log line (the webhook secret, old and new)."""

    def __init__(self, values: Iterable[str] = ()) -> None:
        self._values: set[str] = {v for v in values if v}

    def add(self, value: str) -> None:
        if value:
            self._values.add(value)

    def apply(self, text: str) -> str:
        for value in sorted(self._values, key=len, reverse=True):
            if value in text:
                text = text.replace(value, REDACTED)
        return text


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


def setup_logging(
    *, level: str, fmt: str, redaction: Redaction, stream: TextIO | None = None
) -> logging.Handler:
    """Install one handler on the root logger; returns it so the caller can adjust it."""
    out = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not out.isatty())
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        RedactingFormatter(JsonFormatter() if use_json else TextFormatter(), redaction)
    )
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # httpx and httpcore log request lines at INFO/DEBUG; they never carry our headers, but
    # keep them quiet unless asked, since Seyaha's answers are logged by the agent itself.
    for noisy in ("httpx", "httpcore", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    return handler
