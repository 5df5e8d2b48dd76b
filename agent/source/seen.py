"""Pure: the rows already recorded, one pair of small digests per row, for the late-row sweep.

Polls read only the last few seconds behind the change cursor (Scanner.live_overlap_s); the
late-row sweep re-reads the whole `cursor_overlap` window beside them, for the rows of
transactions that committed long after they stamped `updated_at`. After a bulk change that
window holds every row the change stamped, and the sweep would convert, look up and diff
them all again on every pass. SeenRows remembers each recorded row as the hash of its key
columns and a digest of the whole row exactly as the driver returned it: a row that comes
back identical is skipped before conversion, so a bulk change is diffed once.

Only the last recorded values of a key count: a row that went A, B, then back to A (with a
stale stamp, the case the sweep exists for) differs from the remembered B and goes the full
way. The memory is emptied whenever the store may have been changed by anything but the
polls and sweeps that feed it (a full scan, another agent taking the scanner lease), and
when it would exceed its limit.
"""

from __future__ import annotations

from collections.abc import Iterable
from hashlib import blake2b

SEEN_LIMIT = 500_000
"""Most rows remembered; about 130 bytes each (a dict entry, the key's hash and an 8-byte
digest), so some 65 MB at most. Past it the memory starts again empty: the rows a sweep then
meets go the full way once (conversion, look-up, diff), and are remembered again."""

RawKey = tuple[object, ...]
RawValues = tuple[object, ...]


def digest(raw_key: RawKey, values: RawValues) -> bytes:
    """A 64-bit digest of the whole row, key included, built on repr(), which is exact for the
    values drivers return (numbers, text, dates, decimals; unlike hash(), which gives -1 and
    -2 alike): two different rows share it only by a 64-bit accident. A value whose repr()
    changes from one read to the next (an object without a value repr) only makes its row
    look changed."""
    text = repr((raw_key, values)).encode("utf-8", "surrogatepass")
    return blake2b(text, digest_size=8).digest()


class SeenRows:
    def __init__(self, limit: int = SEEN_LIMIT) -> None:
        self.limit = limit
        self._rows: dict[int, bytes] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def known(self, raw_key: RawKey, values: RawValues) -> bool:
        """Whether this exact row is the last one recorded for its key."""
        try:
            remembered = self._rows.get(hash(raw_key))
        except TypeError:  # a key column of a type that cannot be hashed: never remembered
            return False
        return remembered is not None and remembered == digest(raw_key, values)

    def remember(self, rows: Iterable[tuple[RawKey, RawValues]]) -> None:
        """Note rows just recorded in the store (each the newest state of its key). Keys are
        held by their hash(): two keys that share one only replace each other's entry, and
        the row digest (which holds the key) tells them apart."""
        memory = self._rows
        for raw_key, values in rows:
            try:
                memory[hash(raw_key)] = digest(raw_key, values)
            except TypeError:
                continue
        if len(memory) > self.limit:
            memory.clear()

    def clear(self) -> None:
        self._rows = {}
