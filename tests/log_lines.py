"""The agent's logging set-up installed for one block of a test, writing to a buffer, and the
process's logging and warnings set-up put back after it (tests share one interpreter)."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from agent.logs import QUIET_LOGGERS, Redaction, setup_logging


@contextmanager
def agent_log(level: str = "INFO", fmt: str = "json") -> Iterator[io.StringIO]:
    """`with agent_log("DEBUG") as out:` the agent logs into `out` as the daemon would."""
    root = logging.getLogger()
    handlers, root_level = list(root.handlers), root.level
    quiet = {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    showwarning = warnings.showwarning
    out = io.StringIO()
    setup_logging(level=level, fmt=fmt, redaction=Redaction(), stream=out)
    try:
        yield out
    finally:
        warnings.showwarning = showwarning
        for handler in list(root.handlers):
            root.removeHandler(handler)
        for handler in handlers:
            root.addHandler(handler)
        root.setLevel(root_level)
        for name, old in quiet.items():
            logging.getLogger(name).setLevel(old)


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every line of a JSON log as an object; fails on the first line that is not one."""
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        try:
            body = json.loads(line)
        except json.JSONDecodeError:
            raise AssertionError(f"line {number} of the log is not JSON: {line!r}") from None
        assert isinstance(body, dict), f"line {number} is JSON but not an object: {line!r}"
        found.append(body)
    return found
