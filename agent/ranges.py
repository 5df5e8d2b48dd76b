"""Pure: ranges of slot keys and their digests, so that a reconciliation reads only what changed.

A range is every slot of one (product, option) whose availability id ends with the same
character: about a tenth of an option's slots when ids are numbers, a sixteenth when they
are UUIDs. The source database computes, per range, the number of rows and the sum of a
64-bit hash of each row as the slots query returns it (Dialect.range_digest_sql); one row
per range comes over the wire instead of every slot.

The state store keeps each range's digest from the last time its stored fingerprints were
known to match the rows it was computed over (the rows a full pass read and recorded, none
of them touched by a poll meanwhile, none of them unreadable or duplicated). Every other
write to a range's slots clears that digest. A range whose digest in the source equals the
stored one holds the same rows as then, so its slots are what the store remembers: a
reconciliation skips it and reads the others. A range stored but gone from the source is
read too (its slots were deleted).

On a large inventory (OPTIONS_MIN option ids, several ranges each) a pass first asks for
one digest per option id (the sum of its ranges': fewer groups, about half the database's
work at 1M slots), compares them with the sums of the stored ranges' digests per option,
which the store keeps beside the ranges (one row per product and option, written with
them: OptionDigests), and then compares the range digests of the options that differ only,
which both databases find from an index on the option column. A range of an option whose
digest matched is as unchanged as if its own had (both are sums of the same 64-bit row
hashes).
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import accumulate

from agent.model import SlotKey

SEPARATOR = "\x1f"
"""Between the parts of a range's label (ASCII unit separator: below every printable
character, so labels sort as their (product, option, suffix) parts do)."""

SUFFIX_CHARS = 1
"""Characters of the availability id that pick its range."""

DIGEST_VERSION = "2"
"""Changes when the row hash or the ranges change, or what a row builds (agent/source/rows.py:
a slot whose row is unchanged is not built again, see row_salt): every stored digest is then
dropped, and no row hash kept with a slot matches."""

RangeKey = tuple[str, str, str]
"""(product_id, option_id, suffix)"""


def range_of(key: SlotKey) -> RangeKey:
    """The range of a slot key, as the agent spells its ids."""
    return (key[0], key[1], key[2][-SUFFIX_CHARS:])


def label(rng: RangeKey) -> str:
    """A range as one text, the way the source database spells it (Dialect.range_label_sql)."""
    return SEPARATOR.join(rng)


def parse_label(text: str | None) -> RangeKey | None:
    """The range a label names; None for a label that cannot be split back (an id holding
    the separator, or a NULL id)."""
    if text is None:
        return None
    parts = text.split(SEPARATOR)
    if len(parts) != 3:
        return None
    return (parts[0], parts[1], parts[2])


def basis(slots_query: str, timezone: str, backend: str) -> str:
    """What stored digests are worth only as long as it stays the same: the query (its rows
    are what is hashed), the time zone (it changes the slots made of the same rows), the
    source's kind and its way of hashing a row (`backend`), and DIGEST_VERSION."""
    text = SEPARATOR.join((DIGEST_VERSION, backend, timezone, slots_query.strip()))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def row_salt(basis_text: str) -> int:
    """What RangeTally.row_hash mixes into each row's hash before the store keeps it: taken
    from the basis (see basis), so that a row hash stored on one basis never matches the
    same row's on another (a new time zone builds another slot from the same row)."""
    return int(basis_text[:16], 16)


def catalog_token(catalog_query: str, backend: str, digest: str) -> str:
    """The catalog's digest (Dialect.total_digest_sql) bound to what it is worth only with:
    the query, the source's kind and way of hashing (`backend`), and DIGEST_VERSION. Equal
    tokens: the catalog query returns the rows it returned when the token was stored."""
    text = SEPARATOR.join((DIGEST_VERSION, backend, catalog_query.strip(), digest))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


@dataclass(frozen=True, slots=True)
class RangeDigest:
    rows: int
    digest: int
    """The sum of the rows' 64-bit hashes (signed on PostgreSQL, unsigned on MySQL)."""

    @property
    def text(self) -> str:
        """The digest as both sides compare it ("rows:sum"), so that comparing 50,000
        ranges costs two dictionaries of strings, not 100,000 objects."""
        return f"{self.rows}:{self.digest}"


UNKNOWN = ""
"""The digest text of a stored range something wrote since (a NULL digest): it never
equals a source's."""

Digests = Mapping[str, str]
"""Range label -> digest text (RangeDigest.text), as the source or the store gives them."""

_OFFSET = 1 << 63
"""Added to a signed 64-bit hash to order it as unsigned."""

_SPAN = 1 << 64
_MASK = _SPAN - 1

_NEVER = -1
"""The digest hash of an UNKNOWN range: CPython's hash() never returns -1 (it gives -2
instead), so no source digest matches it."""


def entry_digest(text: str) -> int:
    """What a DigestTable keeps of a digest text."""
    return _NEVER if text == UNKNOWN else hash(text)


@dataclass(frozen=True, eq=False)
class DigestTable:
    """The stored digests, held compact between passes: about 20 bytes a range (10 MB for
    the 500,000 ranges of 10M slots) instead of about 200 as a dictionary of strings.

    Each range is kept as two 64-bit hashes, its label's and its digest text's, in buckets
    by the top bits of the label's (as many buckets as ranges, rounded up to a power of
    two: a lookup reads about one entry); the labels themselves stay in the store
    (differing() reads them again only for ranges the source no longer has). hash() of a
    string is fixed within one process, which is as long as a table lives. A range
    compares equal here when both hashes match, so hashing can mislead only where two
    labels share a 64-bit hash: a changed range then passes for unchanged only if its
    digest's hash also matches the other's, and a range gone from the source passes for
    present only if its label's hash is that of a range still there (about one chance in
    2**64 for each such pair: at 10M slots, with 500,000 ranges and a hundred gone, about
    3 in 10**12 a pass). The digest itself, a 64-bit sum, is the weaker link.
    """

    labels: array[int]
    digests: array[int]
    starts: array[int]
    """Where each bucket's entries start in `labels` and `digests` (one more at the end)."""
    shift: int
    """A label hash's bucket: (hash + 2**63) >> shift."""

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, str]]) -> DigestTable:
        """Build from (label, digest text) pairs as they stream in (UNKNOWN: written since)."""
        labels: array[int] = array("q")
        digests: array[int] = array("q")
        for name, text in pairs:
            labels.append(hash(name))
            digests.append(entry_digest(text))
        return cls._built(labels, digests)

    def replaced(self, dropped: Collection[int], added: Iterable[tuple[str, str]]) -> DigestTable:
        """This table without the entries whose label hash is in `dropped`, with the
        (label, digest text) pairs `added` (a table brought up to date in place of a load).
        Where the labels stay the same (each dropped one added again, none new: the ranges
        written still exist), only the digests change, in a copy of their array."""
        pairs = [(hash(name), entry_digest(text)) for name, text in added]
        if len(pairs) == len(dropped) and {h for h, _ in pairs} == set(dropped):
            digests = array("q", self.digests)
            for h, d in pairs:
                found = list(_entries(self, h))
                if len(found) != 1:  # absent, or two labels with one hash: build anew
                    break
                digests[found[0]] = d
            else:
                return DigestTable(self.labels, digests, self.starts, self.shift)
        return self._rebuilt(dropped, pairs)

    def _rebuilt(self, dropped: Collection[int], pairs: list[tuple[int, int]]) -> DigestTable:
        labels: array[int] = array("q")
        digests: array[int] = array("q")
        for h, d in zip(self.labels, self.digests, strict=True):
            if h not in dropped:
                labels.append(h)
                digests.append(d)
        for h, d in pairs:
            labels.append(h)
            digests.append(d)
        return self._built(labels, digests)

    @classmethod
    def _built(cls, labels: array[int], digests: array[int]) -> DigestTable:
        size = len(labels)
        bits = max(size - 1, 1).bit_length()
        shift = 64 - bits
        # A counting sort by bucket: no list of the entries, only arrays.
        counts: array[int] = array("I", bytes(4 * ((1 << bits) + 1)))
        for h in labels:
            counts[((h + _OFFSET) >> shift) + 1] += 1
        starts = array("I", accumulate(counts))
        fill = array("I", starts)
        by_label: array[int] = array("q", bytes(8 * size))
        by_digest: array[int] = array("q", bytes(8 * size))
        for h, d in zip(labels, digests, strict=True):
            bucket = (h + _OFFSET) >> shift
            at = fill[bucket]
            fill[bucket] = at + 1
            by_label[at] = h
            by_digest[at] = d
        return cls(by_label, by_digest, starts, shift)

    def __len__(self) -> int:
        return len(self.labels)

    def __eq__(self, other: object) -> bool:
        """The same ranges with the same digests (in whatever order they were added)."""
        if not isinstance(other, DigestTable):
            return NotImplemented
        return sorted(zip(self.labels, self.digests, strict=True)) == sorted(
            zip(other.labels, other.digests, strict=True)
        )

    __hash__ = None  # type: ignore[assignment]


@dataclass(frozen=True)
class Difference:
    labels: set[str]
    """The ranges to read: new, changed, written since (UNKNOWN), or gone from the source;
    at most `keep` of them (see truncated)."""
    count: int
    """How many ranges differ (all of them, whether or not `labels` names each)."""
    source_ranges: int
    """How many ranges the source has."""
    stored_ranges: int
    """How many ranges the state store has digests for."""

    @property
    def truncated(self) -> bool:
        """More ranges differ than `labels` names: a pass reads every range anyway."""
        return self.count > len(self.labels)


def differing(
    source: Iterable[tuple[str, str]],
    stored: DigestTable,
    stored_labels: Callable[[], Iterable[str]],
    *,
    keep: int | None = None,
    scoped: bool = False,
) -> Difference:
    """Compare the source's (label, digest text) pairs with the stored digests in one pass
    as they stream in, holding only the labels that differ (at most `keep`, default
    READ_MAX + 1: past that a pass reads every range whatever they are). The stored ranges
    the source did not name are looked up in `stored_labels()` (every stored label, read
    again from the store) only when some are missing and they could still be named.

    `scoped`: the source named only some of its ranges (those of some options), and
    `stored_labels()` gives the stored ranges of the same scope; every one of those the
    source did not name is gone, and the stored ranges outside it are not compared."""
    keep = READ_MAX + 1 if keep is None else keep
    keys = stored.labels
    size = len(keys)
    seen = bytearray(size)
    out, count, differ = _compare(source, stored, seen, keep)
    if scoped:
        in_scope = 0
        for name in stored_labels():
            in_scope += 1
            if not any(seen[at] for at in _entries(stored, hash(name))):
                differ += 1
                if len(out) < keep:
                    out.add(name)
        return Difference(out, differ, size - in_scope + count, size)
    missing = size - seen.count(1)
    if missing and differ + missing <= keep:
        gone = {keys[i] for i in range(size) if not seen[i]}
        out.update(name for name in stored_labels() if hash(name) in gone)
    return Difference(out, differ + missing, count, size)


def _compare(
    source: Iterable[tuple[str, str]], stored: DigestTable, seen: bytearray, keep: int
) -> tuple[set[str], int, int]:
    """The source's labels that differ from the stored digests (at most `keep`), how many
    pairs the source gave and how many differ; marks in `seen` the stored entries named."""
    keys, digests, starts, shift = stored.labels, stored.digests, stored.starts, stored.shift
    out: set[str] = set()
    count = differ = 0
    for name, text in source:
        count += 1
        wanted = hash(name)
        bucket = (wanted + _OFFSET) >> shift
        at, end = starts[bucket], starts[bucket + 1]
        same = False
        while at < end:  # about one entry a bucket
            if keys[at] == wanted:  # more than one only if two labels share a hash
                seen[at] = 1
                same = same or digests[at] == hash(text)
            at += 1
        if not same:
            differ += 1
            if len(out) < keep:
                out.add(name)
    return out, count, differ


def _entries(stored: DigestTable, label_hash: int) -> Iterator[int]:
    """Where the entries of a label's hash are in the table."""
    bucket = (label_hash + _OFFSET) >> stored.shift
    for at in range(stored.starts[bucket], stored.starts[bucket + 1]):
        if stored.labels[at] == label_hash:
            yield at


@dataclass(frozen=True)
class StoredDigests:
    """The stored digests as a pass compares with them: by range, and by option id."""

    ranges: DigestTable
    options: DigestTable
    """Per option id (as range labels spell it; every product's ranges of that id
    together): "rows:sum" of its ranges' digests, UNKNOWN when one of them is."""

    @classmethod
    def of(cls, triples: Iterable[tuple[str, str, str]]) -> StoredDigests:
        """Build from (label, option id, digest text) as they stream in."""
        sums = OptionSums()
        ranges = DigestTable.of(sums.through(triples))
        return cls(ranges, sums.table())

    def replaced(
        self,
        written: Collection[int],
        options: Collection[str],
        triples: Iterable[tuple[str, str, str]],
    ) -> StoredDigests:
        """This content with the ranges of the option ids `options` replaced by `triples`
        (label, option id, digest text: every stored range of those option ids, as the
        store has them now). `written`: the label hashes of the ranges written since this
        content was read (every one of them is of an option in `options`), those the
        writes removed among them. Equal to what a load would give, if nothing but those
        writes changed the store since this content was read."""
        sums = OptionSums()
        pairs = list(sums.through(triples))
        dropped = {*written, *(hash(name) for name, _ in pairs)}
        ranges = self.ranges.replaced(dropped, pairs)
        by_option = self.options.replaced({hash(o) for o in options}, sums.pairs())
        return StoredDigests(ranges, by_option)


@dataclass(frozen=True)
class OptionDigests:
    """The stored digests per option id, as kept beside the ranges (seyaha_option_digests)."""

    options: DigestTable
    """Per option id: "rows:sum" of its stored ranges' digests, UNKNOWN when one of them is."""
    ranges: int
    """How many ranges are stored."""


class OptionSums:
    """The stored ranges' digests summed per option id as they stream through `through`:
    what the source's option digests (SourceReader.option_digests) answer while the rows
    stay the same. Held while a load streams: one DigestSum per option id."""

    def __init__(self) -> None:
        self._sums: dict[str, DigestSum] = {}

    def through(self, triples: Iterable[tuple[str, str, str]]) -> Iterator[tuple[str, str]]:
        for name, option, text in triples:
            self.add(option, text)
            yield name, text

    def add(self, option: str, text: str) -> None:
        total = self._sums.get(option)
        if total is None:
            total = self._sums[option] = DigestSum()
        total.add(text)

    def table(self) -> DigestTable:
        """The sums as a DigestTable by option id, UNKNOWN where a range's digest is."""
        return DigestTable.of(self.pairs())

    def pairs(self) -> Iterator[tuple[str, str]]:
        """The sums as (option id, digest text), UNKNOWN where a range's digest is; taken
        from here as they are handed on."""
        sums, self._sums = self._sums, {}
        return ((option, total.text or UNKNOWN) for option, total in sums.items())


class DigestSum:
    """Digests ("rows:sum") summed into one as they stream through `through` (or `add`):
    every range's digest from the source sums to what SourceReader.slots_digest answers
    while the rows stay the same, if every row has a range. A digest that is not a number
    (UNKNOWN, or the source's for a row without a range, a NULL id) makes the sum unknown:
    it never matches, which costs a pass its shortcut, never a change."""

    __slots__ = ("rows", "sound", "sum")  # one per option id while a load streams

    def __init__(self) -> None:
        self.rows = 0
        self.sum = 0
        self.sound = True

    def add(self, text: str) -> None:
        if self.sound:
            rows, _, total = text.partition(":")
            try:
                self.rows += int(rows)
                self.sum += int(total)
            except ValueError:
                self.sound = False

    def add_stored(self, rows: int, digest: str | None) -> None:
        """Add a stored range's digest as the store keeps it: the number of rows and the
        sum as text, None (UNKNOWN) for a range written since."""
        if digest is None:
            self.sound = False
        elif self.sound:
            try:
                self.sum += int(digest)
            except ValueError:
                self.sound = False
            else:
                self.rows += rows

    def through(self, pairs: Iterable[tuple[str, str]]) -> Iterator[tuple[str, str]]:
        for name, text in pairs:
            self.add(text)
            yield name, text

    @property
    def text(self) -> str | None:
        return f"{self.rows}:{self.sum}" if self.sound else None


READ_MAX_FRACTION = 0.25
"""Past this share of the ranges differing, a full pass reads every range: each query that
reads chosen ranges makes the database go through every row of the slots query once more."""

READ_MAX = 20_000
"""Most ranges one pass reads by label (bound parameters of one IN list)."""


OPTIONS_MIN = 64
"""Fewest stored option ids for which a pass compares option digests before range digests:
with fewer, a change lands in an option holding too large a share of the rows to narrow
anything (a catalog whose every product calls its option "std")."""

RANGES_PER_OPTION_MIN = 4.0
"""Fewest stored ranges per option id, on average, for which option digests are compared
first: with fewer, grouping by option costs the database about what grouping by range does."""

OPTIONS_READ_FRACTION = 0.2
"""Past this share of the option ids differing, a pass asks for every range's digest
instead of those of the differing options (each of those reads its options' rows by index)."""


def compares_options_first(options: int, ranges: int) -> bool:
    """Whether a pass over `options` option ids and `ranges` ranges compares option digests
    first (see OPTIONS_MIN)."""
    return options >= OPTIONS_MIN and ranges >= RANGES_PER_OPTION_MIN * options


def options_to_compare(difference: Difference) -> list[str] | None:
    """The option ids whose ranges a pass compares, after comparing option digests; None:
    too many differ, compare every range."""
    of = max(difference.source_ranges, difference.stored_ranges)
    if difference.truncated or difference.count > min(READ_MAX, OPTIONS_READ_FRACTION * of):
        return None
    return sorted(difference.labels)


def to_read(difference: Difference) -> list[RangeKey] | None:
    """The ranges a full pass reads, in order; None for all of them (most differ, or too
    many to name in one query). A label that names no range (a NULL id) is left out: its
    rows are unreadable, and reported by the passes that read every range."""
    of = max(difference.source_ranges, difference.stored_ranges)
    if difference.truncated or difference.count > min(READ_MAX, READ_MAX_FRACTION * of):
        return None
    return sorted(rng for rng in map(parse_label, difference.labels) if rng is not None)


@dataclass
class RangeTally:
    """The digests of the ranges a full pass reads, from the row hashes of the rows it read.

    Memory: one entry per range read (about 200 bytes), held until the pass ends, since a
    range's digest may be stored only once every change the pass found in it is recorded.
    """

    salt: int = 0
    """Mixed into the row hashes the store keeps with the slots (row_hash; see row_salt)."""
    sums: dict[RangeKey, list[int]] = field(default_factory=dict)
    spoiled: set[RangeKey] = field(default_factory=set)
    """Ranges with an unreadable or duplicated row: their digest is not stored."""
    mismatched: int = 0
    """Rows the database put in another range than the agent does (ids whose text differs
    from the agent's spelling, e.g. with spaces around): digests cannot be used at all."""

    def add(self, key: SlotKey, row_hash: object, db_label: object) -> None:
        rng = range_of(key)
        if _text(db_label) != label(rng):
            self.mismatched += 1
            self.spoiled.add(rng)
            return
        try:
            value = int(row_hash)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            self.spoiled.add(rng)
            return
        entry = self.sums.get(rng)
        if entry is None:
            self.sums[rng] = [1, value]
        else:
            entry[0] += 1
            entry[1] += value

    def spoil(self, key: SlotKey) -> None:
        self.spoiled.add(range_of(key))

    def row_hash(self, value: object) -> int | None:
        """A row's hash as the store keeps it with the slot built from the row (signed
        64-bit, salted: see row_salt); None when the database gave none."""
        try:
            number: int = int(value)  # type: ignore[call-overload]
        except (TypeError, ValueError):
            return None
        mixed = (number ^ self.salt) & _MASK
        return mixed - _SPAN if mixed & _OFFSET else mixed

    def clean(self, touched: Iterable[SlotKey] = ()) -> dict[RangeKey, RangeDigest]:
        """The digests to store: every range read except spoiled ones and those holding a
        key a poll recorded while the pass ran (its stored state is newer than the pass)."""
        dirty = self.spoiled | {range_of(key) for key in touched}
        return {
            rng: RangeDigest(rows, digest)
            for rng, (rows, digest) in self.sums.items()
            if rng not in dirty
        }

    def gone(self, read: Iterable[RangeKey]) -> list[RangeKey]:
        """Of the ranges a pass was to read, those the source returned no row of."""
        return sorted(rng for rng in read if rng not in self.sums and rng not in self.spoiled)


def _text(value: object) -> str | None:
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", "replace")
    return None if value is None else str(value)
