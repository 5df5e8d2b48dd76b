"""Many Seyaha integrations behind one agent: a row names its integration, a folder its secret.

A platform's queries return an `integration_id` column; `[seyaha] webhook_secrets_dir` holds
one file per integration, named by its id and holding its webhook secret. A secret is read
when it is first needed and again whenever its file changes (inode, size or modification
time), so a file added or replaced is used without a restart. Which integrations have a
usable secret is looked up once per `RECHECK_S` per integration, never per row.

An agent configured with `[seyaha] integration_id` keeps its single integration: its rows
and messages carry the empty id "", which means that integration everywhere.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.config import Secret, secret_problem, secret_warnings
from agent.errors import shown_path
from agent.logs import event
from agent.source.rows import BadRow, Foreign

INTEGRATION_COLUMN = "integration_id"
"""The column of the catalog and slots queries that routes a row."""

RECHECK_S = 1.0
"""How long the answer to "does this integration have a usable secret?" is kept (seconds):
a scan asks once per row, and a file added is seen within this long."""

_HEX24 = re.compile(r"^[0-9a-fA-F]{24}$")

log = logging.getLogger("agent.delivery")


def integration_problem(value: str) -> str | None:
    """Why `value` cannot be a Seyaha integration id, or None when it can."""
    if _HEX24.match(value):
        return None
    return f"must be the 24-character hexadecimal id Seyaha gave the integration (got {value!r})"


@dataclass(frozen=True)
class _Read:
    stamp: tuple[int, int, int]
    """(inode, size, modification time in ns) of the file when it was read."""
    secret: Secret | None
    problem: str | None


class SecretsFolder:
    """The secrets of a platform's integrations, one file each in `folder`."""

    def __init__(
        self,
        folder: Path,
        *,
        on_secret: Callable[[str], None] = lambda value: None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.folder = folder
        self.on_secret = on_secret
        """Told every secret value read (the log redaction learns it before any use)."""
        self._monotonic = monotonic
        self._read: dict[str, _Read] = {}
        self._usable: dict[str, tuple[float, bool]] = {}
        self._lock = threading.Lock()

    def secret(self, integration_id: str) -> Secret | None:
        """The integration's secret as its file holds it now; None when it has no usable one
        (see `problem`). One stat per call; the file is read again only when it changed."""
        if (
            integration_problem(integration_id) is not None
            or integration_id != integration_id.lower()
        ):
            # Never a path out of the folder; ids are lowercase, as Seyaha writes them.
            self._remember(
                integration_id,
                _Read((0, 0, 0), None, f"{integration_id!r} is not a lowercase integration id"),
            )
            return None
        path = self.folder / integration_id
        try:
            found = os.stat(path)
        except OSError as exc:
            why = (
                f"no secret file {shown_path(path)}"
                if isinstance(exc, FileNotFoundError | NotADirectoryError)
                else f"cannot read {shown_path(path)} ({exc.strerror})"
            )
            self._remember(integration_id, _Read((0, 0, 0), None, why))
            return None
        stamp = (found.st_ino, found.st_size, found.st_mtime_ns)
        known = self._read.get(integration_id)
        if known is not None and known.stamp == stamp:
            return known.secret
        return self._load(integration_id, path, stamp).secret

    def problem(self, integration_id: str) -> str:
        """Why the integration has no usable secret (after `secret` returned None)."""
        known = self._read.get(integration_id)
        if known is None or known.problem is None:
            return f"no secret file {shown_path(self.folder / integration_id)}"
        return known.problem

    def usable(self, integration_id: str) -> bool:
        """Whether the integration has a usable secret, as seen at most RECHECK_S ago."""
        now = self._monotonic()
        seen = self._usable.get(integration_id)
        if seen is not None and now - seen[0] < RECHECK_S:
            return seen[1]
        answer = self.secret(integration_id) is not None
        self._usable[integration_id] = (now, answer)
        return answer

    def _load(self, integration_id: str, path: Path, stamp: tuple[int, int, int]) -> _Read:
        try:
            value = path.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            why = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            return self._remember(
                integration_id, _Read(stamp, None, f"cannot read {shown_path(path)} ({why})")
            )
        if not value:
            return self._remember(
                integration_id, _Read(stamp, None, f"{shown_path(path)} is empty")
            )
        # The value is learnt by the redaction before anything could log it, even a refusal.
        self.on_secret(value)
        refused = secret_problem(value)
        if refused is not None:
            return self._remember(
                integration_id, _Read(stamp, None, f"{shown_path(path)}: {refused}")
            )
        secret = Secret(value)
        first = integration_id not in self._read or self._read[integration_id].secret is None
        self._remember(integration_id, _Read(stamp, secret, None))
        if first:
            for doubt in secret_warnings(secret, path, where=f"integration {integration_id}"):
                event(
                    log, logging.WARNING, "config.secret_doubt", doubt, integration=integration_id
                )
        else:
            event(
                log,
                logging.INFO,
                "delivery.secret_changed",
                f"integration {integration_id}: its secret file changed; the new secret is used",
                integration=integration_id,
            )
        return self._read[integration_id]

    def _remember(self, integration_id: str, read: _Read) -> _Read:
        with self._lock:
            self._read[integration_id] = read
            self._usable.pop(integration_id, None)
        return read


class Router:
    """Reads a row's integration_id for a platform's queries (see SourceReader): the id, or
    BadRow with the reason, so that the row is skipped with its key while the rest goes on.
    A row whose integration has no usable secret is skipped too, and counted per integration
    until the scan takes the counts (`take_missing`)."""

    def __init__(self, secrets: SecretsFolder) -> None:
        self.secrets = secrets
        self._missing: Counter[str] = Counter()
        self._lock = threading.Lock()
        self.owns: Callable[[str], bool] | None = None
        """With agents sharing the platform, whether this agent scans an integration; the
        rows of the others raise Foreign. Rows with no valid id are reported by the agent
        that scans the empty id's shard, not by all of them."""

    def __call__(self, value: Any) -> str:
        owns = self.owns
        if value is None:
            if owns is not None and not owns(""):
                raise Foreign
            raise BadRow("integration_id is NULL: the row belongs to no integration")
        if isinstance(value, bytes | bytearray | memoryview):
            value = bytes(value).decode("utf-8", "replace")
        text = str(value).strip()
        problem = integration_problem(text)
        if problem is not None:
            if owns is not None and not owns(""):
                raise Foreign
            raise BadRow(f"integration_id {problem}")
        text = text.lower()
        if owns is not None and not owns(text):
            raise Foreign
        if not self.secrets.usable(text):
            with self._lock:
                self._missing[text] += 1
            raise BadRow(
                f"integration {text} has no usable secret: {self.secrets.problem(text)}; the "
                "row is read again once the file is there"
            )
        return text

    def take_missing(self) -> dict[str, int]:
        """Rows skipped per integration for want of a secret since the last call."""
        with self._lock:
            missing, self._missing = dict(self._missing), Counter()
        return missing
