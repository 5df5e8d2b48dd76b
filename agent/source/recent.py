"""Pure: the rows the last incremental poll already handled, as the source returned them.

Every poll re-reads its window behind the cursor (the last 5 s, Scanner.poll_overlap_s), so
under a steady stream of bookings most rows of a poll are rows the previous poll already diffed and
recorded. Converting each of them again, looking its fingerprint up in the state store and
diffing it would cost each poll in proportion to the window instead of to what changed.

RecentRows remembers, for each row of the last poll, its key columns and all its values
exactly as the driver returned them. A row that comes back with the same values for the same
key is known to be recorded already (its fingerprint is in the store), so the poll skips it
before any conversion. A row whose values differ, or whose key is not remembered, goes the
full way. The memory holds only what the last poll read (bounded by `limit`); it is emptied
whenever the store may have been changed by anything else: a full scan (which also removes
and expires slots), a failed poll, or another agent taking the scanner lease.
"""

from __future__ import annotations

from collections.abc import Mapping

from agent.model import SlotKey

RECENT_LIMIT = 20_000
"""Most rows remembered (about 1.6 kB each with their values, so some 30 MB at most): a poll
that reads more than this is diffed the full way, as without memory."""

RawKey = tuple[object, ...]
"""The key columns' values as the driver returned them."""
RawValues = tuple[object, ...]
"""Every column's value as the driver returned it."""


class RecentRows:
    def __init__(self, limit: int = RECENT_LIMIT) -> None:
        self.limit = limit
        self._rows: dict[RawKey, tuple[RawValues, SlotKey]] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def unchanged(self, raw_key: RawKey, values: RawValues) -> SlotKey | None:
        """The slot's key when this exact row was handled by the last poll, else None."""
        try:
            remembered = self._rows.get(raw_key)
        except TypeError:  # a key column of a type that cannot be hashed: never remembered
            return None
        if remembered is None or remembered[0] != values:
            return None
        return remembered[1]

    def replace(self, rows: Mapping[RawKey, tuple[RawValues, SlotKey]]) -> None:
        """Remember exactly `rows` (the last poll's, once recorded); too many: nothing."""
        self._rows = dict(rows) if len(rows) <= self.limit else {}

    def clear(self) -> None:
        self._rows = {}
