"""Pure: the change cursor of incremental polls.

The cursor is the database's own clock, read at the start of the transaction of the last
successful scan. The next poll asks for rows changed since (cursor - overlap): re-reading an
overlap window catches transactions that committed after a later one (out-of-order commits)
and rows that share one timestamp; fingerprints make the re-read rows free of duplicates.

Values keep the type the database gave: an aware datetime (PostgreSQL now()), a naive one
(MySQL NOW(6), in the session's time zone like its CURRENT_TIMESTAMP columns), or SQLite
text in UTC ('YYYY-MM-DD HH:MM:SS', the format of its CURRENT_TIMESTAMP).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

SQLITE_FORMAT = "%Y-%m-%d %H:%M:%S"


def encode(value: Any) -> str:
    """The cursor as text for the state store."""
    if isinstance(value, datetime):
        return "dt:" + value.isoformat()
    if isinstance(value, str):
        return "text:" + value
    raise TypeError(f"the database clock returned {type(value).__name__}, not a date and time")


def decode(text: str) -> Any:
    kind, _, value = text.partition(":")
    if kind == "dt":
        return datetime.fromisoformat(value)
    if kind == "text":
        return value
    raise ValueError(f"unknown cursor {text!r}")


def since(cursor: Any, overlap_s: float) -> Any:
    """The value bound to :since: the cursor moved back by the overlap window."""
    back = timedelta(seconds=overlap_s)
    if isinstance(cursor, datetime):
        return cursor - back
    if isinstance(cursor, str):
        moment = datetime.fromisoformat(cursor.replace(" ", "T"))
        return (moment - back).strftime(SQLITE_FORMAT)
    raise TypeError(f"unsupported cursor type {type(cursor).__name__}")
