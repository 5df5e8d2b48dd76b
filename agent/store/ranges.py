"""The stored range digests (agent/ranges.py): what a reconciliation compares the source's with.

Invariant: a range with a digest here has stored fingerprints that match the source rows the
digest was computed over, and nothing wrote its slots since. Every write of slots clears the
digests of their ranges in the same transaction (`touch`), and leaves a row for each such
range, so that a range whose slots are stored always has a row here: a reconciliation then
sees a range whose source rows all went away (the row is here, the source has none).

Beside them, seyaha_option_digests sums them per (product, option), in the same
transactions: a write of slots clears the sums of their pairs (a row for each, so that a
pass compares an option the source no longer has), and a write of digests sums its pairs'
ranges again. A pass compares those sums per option id with the source's option digests
and then reads the stored digests of the options that differ only (agent/ranges.py).
"""

from __future__ import annotations

import re
import threading
import uuid
from collections.abc import Collection, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from itertools import groupby
from typing import Any

import sqlalchemy as sa

from agent.model import SlotKey, StoredSlot
from agent.ranges import (
    SEPARATOR,
    UNKNOWN,
    DigestSum,
    DigestTable,
    OptionDigests,
    OptionSums,
    RangeDigest,
    RangeKey,
    StoredDigests,
    label,
    range_of,
)
from agent.store import schema as t
from agent.store.connector import Connector
from agent.store.meta import get_meta, set_meta
from agent.store.slots import SLOT_COLUMNS, SLOT_KEY, stored_slot

BASIS = "ranges_basis"
"""seyaha_meta key: agent.ranges.basis() of the digests stored (absent: none can be used)."""

WRITTEN = "ranges_written"
"""seyaha_meta key: a new random token at every write of seyaha_ranges, in its transaction,
so that a reader holding the table's content seen with a token knows it is still current."""

TOTAL = "slots_total"
"""seyaha_meta key: "WRITTEN token|rows:sum", the source's digest of every slot row
(SourceReader.slots_digest) that a full pass found the stored slots to match, recorded only
while WRITTEN still held that token; it says nothing once WRITTEN has moved on."""

_R = t.ranges.c
_O = t.option_digests.c
_RANGE_KEY = (_R.product_id, _R.option_id, _R.suffix)
_BATCH_ROWS = 5000
"""Rows a streamed read of the table fetches at a time."""
_SLOT_COLUMNS = ", ".join(c.name for c in SLOT_COLUMNS)
_SLOT_ORDER = ", ".join(c.name for c in SLOT_KEY)
_LIKE_SPECIAL = re.compile(r"[/%_]")
"""Characters a LIKE pattern escapes (with "/") to match them as themselves."""
_TERMS = 256
"""Ranges one read of stored slots names (three bound parameters each: 768, under the 999 of
older SQLite builds). Every such read has this many terms, a batch short of it repeating its
last range, so that one statement serves them all: statements of a shape of their own each
were kept by the statement caches (about 6 MB more at the peak of a 1M-slot pass, 50 MB at
10M)."""

_LABEL = _R.product_id + SEPARATOR + _R.option_id + SEPARATOR + _R.suffix
"""A range's label (agent.ranges.label), spelled by the database."""


REFRESH_MAX_SHARE = 0.1
"""Past this share of the loaded ranges written since a load (and REFRESH_MIN_RANGES), the
next load reads every range again, instead of only the ranges of the option ids written (see
StoredRanges.wrote): the labels written are held until then, and reading most option ids
again costs about what reading every range does."""
REFRESH_MIN_RANGES = 1000
"""Ranges that may be written between two loads however few are loaded."""
REFRESH_OPTIONS_MAX = 20_000
"""Most option ids written since a load whose ranges the next load reads alone (by the
option id's index, one query per _OPTIONS_PER_READ of them)."""
_OPTIONS_PER_READ = 900
"""Option ids one read of their ranges binds (under the 999 parameters of older SQLite)."""


@dataclass(frozen=True)
class RangesWrite:
    """A committed write of seyaha_ranges, as its transaction moved the WRITTEN token."""

    before: str | None
    after: str
    followed: bool
    """The token was `before` when this write moved it on: no other write came between."""
    ranges: frozenset[RangeKey] | None
    """The ranges written; None: every one (a reset)."""


@dataclass(frozen=True)
class RangesRecord:
    """Range digests a full pass stores once it recorded the changes it found in them (see
    StoredRanges.record): the digests of `clean` ones, `dirty` ones to be read again, `gone`
    ones forgotten; with `basis`, the digests are marked as computed on it."""

    clean: Mapping[RangeKey, RangeDigest]
    dirty: Collection[RangeKey] = ()
    gone: Collection[RangeKey] = ()
    basis: str | None = None

    @property
    def ranges(self) -> frozenset[RangeKey]:
        """Every range this record writes."""
        return frozenset((*self.clean, *self.dirty, *self.gone))


class StoredRanges:
    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self._loaded: tuple[str | None, StoredDigests] | None = None
        """(WRITTEN token, content) of the last load: a quiet inventory's every pass
        compares with the same 50,000 digests, read once."""
        self._lock = threading.Lock()
        self._chain: str | None = None
        """The token the last of this process's writes since the last load set, while every
        write since that load is one of them (see wrote); None: none since."""
        self._written_labels: set[int] = set()
        """hash() of the labels of the ranges those writes wrote."""
        self._written_options: set[str] = set()
        """The option ids of those ranges."""
        self.last_load = ""
        """How the last load found the content: "kept" (nothing written since the one
        before), "refreshed" (only this process wrote since: the ranges of the option ids
        it wrote were read again) or "read" (every range)."""

    def basis(self) -> str | None:
        with self.connector.read() as conn:
            return get_meta(conn, BASIS)

    def written(self) -> str | None:
        """The WRITTEN token now: it moves on at every write of stored slots or digests."""
        with self.connector.read() as conn:
            return get_meta(conn, WRITTEN)

    def total(self, written: str | None) -> str | None:
        """The source's slots digest the stored slots matched, if recorded while WRITTEN was
        `written` and it still is (nothing was written since); else None."""
        if written is None:
            return None
        with self.connector.read() as conn:
            now, recorded = get_meta(conn, WRITTEN), get_meta(conn, TOTAL)
        if now != written or recorded is None:
            return None
        token, _, text = recorded.partition("|")
        return text if token == written else None

    @staticmethod
    def record_total(conn: sa.Connection, written: str, text: str) -> bool:
        """Record `text` as the slots digest the stored slots match, if WRITTEN is still
        `written` in this transaction (a write since would make it untrue: nothing is
        recorded). A later write leaves it behind by moving WRITTEN on."""
        if get_meta(conn, WRITTEN) != written:
            return False
        set_meta(conn, TOTAL, f"{written}|{text}")
        return True

    def load(self) -> StoredDigests:
        """Every stored range's digest (agent.ranges.DigestTable), UNKNOWN for one written
        since, and their sums per option id; kept between passes while nothing writes the
        table (a quiet inventory's every pass compares with the same digests, read once),
        and brought up to date by reading the ranges of the option ids written only, where
        only this process wrote since (see wrote). Built as the rows stream in: about 20
        bytes a range once built (10 MB for the 500,000 ranges of 10M slots, where a
        dictionary of the label and digest strings took 98 MB), and as much an option id."""
        with self.connector.read() as conn:
            # The token first: a write committed between the two reads leaves an old token
            # beside newer content, which the next load reads again (the other order could
            # keep older content under the newest token).
            token = get_meta(conn, WRITTEN)
            with self._lock:  # copies: wrote() may add to them while this load runs
                loaded, chain = self._loaded, self._chain
                labels, options = set(self._written_labels), set(self._written_options)
            if token is not None and loaded is not None and loaded[0] == token:
                self.last_load = "kept"
                return loaded[1]
            if token is not None and loaded is not None and chain == token:
                content = loaded[1].replaced(labels, options, self._items_of(conn, options))
                how = "refreshed"
            else:
                with self._lock:
                    self._loaded = None  # the previous content goes first, not once the
                    # new one is built beside it
                content = StoredDigests.of(self._items(conn, with_option=True))
                how = "read"
        with self._lock:
            # What this process wrote while the load ran is left out: the next load finds
            # the token moved on without a chain from this one, and reads every range.
            self._loaded = (token, content)
            self._chain, self._written_labels, self._written_options = None, set(), set()
        self.last_load = how
        return content

    def wrote(self, write: RangesWrite | None) -> None:
        """Note a write of seyaha_ranges that this process committed (StateStore calls it
        after each commit). While every write since the last load is one of this process's,
        each moving the token on from the one before (RangesWrite.followed), the next load
        reads the ranges of the option ids written only (their sums per option id are read
        with them) instead of every range: 50,000 ranges took 0.14 s at 1M slots, on the
        way of each reconciliation after polls wrote. Any other write (another agent's on
        a shared store, another process's, a reset, or more than REFRESH_MAX_SHARE of the
        ranges) drops the loaded content: the next load reads every range."""
        if write is None:
            return
        with self._lock:
            if self._loaded is None or write.after == self._loaded[0]:
                return  # nothing to keep current, or the load read the store after it
            expected = self._chain if self._chain is not None else self._loaded[0]
            ranges = write.ranges
            if (
                ranges is None
                or not write.followed
                or write.before != expected
                or len(self._written_labels) + len(ranges)
                > max(REFRESH_MIN_RANGES, REFRESH_MAX_SHARE * len(self._loaded[1].ranges))
                or len(self._written_options | {r[1] for r in ranges}) > REFRESH_OPTIONS_MAX
            ):
                self._loaded = None
                self._chain, self._written_labels, self._written_options = None, set(), set()
                return
            self._chain = write.after
            self._written_labels.update(hash(label(r)) for r in ranges)
            self._written_options.update(r[1] for r in ranges)

    def items(self) -> dict[str, str]:
        """Every stored range: label -> digest text (UNKNOWN when written since)."""
        with self.connector.read() as conn:
            return dict(self._items(conn))

    def labels(self) -> Iterator[str]:
        """Every stored range's label, streamed from the store (a range to read again too)."""
        with self.connector.read() as conn:
            for (name,) in conn.execute(
                sa.select(_LABEL), execution_options={"yield_per": _BATCH_ROWS}
            ):
                yield name

    @staticmethod
    def _items_of(conn: sa.Connection, options: Collection[str]) -> Iterator[Any]:
        """(label, option id, digest text) of every stored range of the option ids `options`."""
        wanted = sorted(options)
        for start in range(0, len(wanted), _OPTIONS_PER_READ):
            part = wanted[start : start + _OPTIONS_PER_READ]
            yield from StoredRanges._items(conn, with_option=True, options=part)

    @staticmethod
    def _items(
        conn: sa.Connection, *, with_option: bool = False, options: list[str] | None = None
    ) -> Iterator[Any]:
        # The database spells each label and digest text: a range comes as one pair of
        # strings (50,000 ranges in about 30 ms). Streamed, never a list of rows first: at
        # 10M slots that held 500,000 Row objects, 70 MB more at the peak.
        text = sa.case(
            (_R.digest.is_(None), UNKNOWN),
            else_=sa.cast(_R.row_count, sa.String) + ":" + _R.digest,
        )
        columns = (_LABEL, _R.option_id, text) if with_option else (_LABEL, text)
        query = sa.select(*columns)
        if options is not None:
            query = query.where(_R.option_id.in_(options))
        rows = conn.execute(query, execution_options={"yield_per": _BATCH_ROWS})
        yield from (tuple(row) for row in rows)

    @staticmethod
    def iter_slots(
        conn: sa.Connection, ranges: Collection[RangeKey]
    ) -> Generator[StoredSlot, None, None]:
        """The stored slots of `ranges`, in key order: one indexed query per batch of whole
        options (see _batches), all of one text (see _TERMS). A query per option built with
        SQLAlchemy's expressions cost 0.43 s for the 990 ranges of a 1M-slot pass, half of it
        in building and compiling the queries."""
        for batch in _batches(ranges):
            terms = [(p, o, x) for (p, o), suffixes in batch.items() for x in sorted(suffixes)]
            size = max(_TERMS, len(terms))  # more only for one option of more ranges alone
            terms += [terms[-1]] * (size - len(terms))
            params: dict[str, str] = {}
            for n, (product, option, suffix) in enumerate(terms):
                params[f"p{n}"], params[f"o{n}"] = product, option
                params[f"s{n}"] = "%" + _LIKE_SPECIAL.sub(r"/\g<0>", suffix)
            # The database skips the options' other ranges (SQLite's LIKE ignores ASCII case:
            # what else it returns is dropped below).
            for row in conn.execute(_slots_query(size), params):
                slot = stored_slot(row)
                if range_of(slot.key)[2] in batch.get((slot.key[0], slot.key[1]), ()):
                    yield slot

    @staticmethod
    def touch(
        conn: sa.Connection, keys: Iterable[SlotKey], recorded: Collection[RangeKey] = ()
    ) -> RangesWrite | None:
        """Clear the digests of the ranges of `keys`, whose slots this transaction writes,
        but those of `recorded`, which the same transaction writes afterwards (record).
        Once committed, the write is for StoredRanges.wrote (None: nothing was written)."""
        touched = sorted({range_of(key) for key in keys}.difference(recorded))
        if not touched:
            return None
        StoredRanges._delete(conn, touched)
        StoredRanges._insert_dirty(conn, touched)
        StoredRanges._options_unknown(conn, touched)
        return StoredRanges._written(conn, frozenset(touched))

    @staticmethod
    def _written(conn: sa.Connection, ranges: frozenset[RangeKey] | None) -> RangesWrite:
        """Move the WRITTEN token on; from the one read first (followed) if no other write
        moved it since, which a compare-and-set tells on a shared store too (an UPDATE
        waits for a concurrent one and then finds another value)."""
        before, after = get_meta(conn, WRITTEN), uuid.uuid4().hex
        if before is not None:
            moved = conn.execute(
                sa.update(t.meta)
                .where(t.meta.c.key == WRITTEN, t.meta.c.value == before)
                .values(value=after)
            ).rowcount
            if moved:
                return RangesWrite(before, after, True, ranges)
        set_meta(conn, WRITTEN, after)
        return RangesWrite(before, after, False, ranges)

    @staticmethod
    def _insert_dirty(conn: sa.Connection, ranges: Iterable[RangeKey]) -> None:
        conn.execute(
            sa.insert(t.ranges),
            [
                {"product_id": p, "option_id": o, "suffix": s, "row_count": 0, "digest": None}
                for p, o, s in sorted(ranges)
            ],
        )

    @staticmethod
    def record(
        conn: sa.Connection,
        clean: Mapping[RangeKey, RangeDigest],
        dirty: Iterable[RangeKey] = (),
        gone: Iterable[RangeKey] = (),
    ) -> RangesWrite | None:
        """Store the digests of `clean` ranges, mark `dirty` ones to be read again (their
        slots may be stored, their digest is unknown) and forget `gone` ones (no slot, no
        row). Once committed, the write is for StoredRanges.wrote."""
        dirty = set(dirty)
        changed = sorted({*clean, *gone, *dirty})
        if not changed:
            return None
        write = StoredRanges._written(conn, frozenset(changed))
        StoredRanges._delete(conn, changed)
        if dirty:
            StoredRanges._insert_dirty(conn, dirty)
        if clean:
            conn.execute(
                sa.insert(t.ranges),
                [
                    {
                        "product_id": p,
                        "option_id": o,
                        "suffix": s,
                        "row_count": d.rows,
                        "digest": str(d.digest),
                    }
                    for (p, o, s), d in clean.items()
                ],
            )
        StoredRanges._sum_options(conn, changed)
        return write

    @staticmethod
    def reset(conn: sa.Connection, basis: str | None) -> RangesWrite:
        """Forget every stored digest; from now on they are computed on `basis` (None: none)."""
        conn.execute(sa.delete(t.ranges))
        conn.execute(sa.delete(t.option_digests))
        set_meta(conn, BASIS, basis)
        return StoredRanges._written(conn, None)

    @staticmethod
    def _delete(conn: sa.Connection, ranges: list[RangeKey]) -> None:
        if ranges:
            matches = sa.and_(
                _R.product_id == sa.bindparam("range_product"),
                _R.option_id == sa.bindparam("range_option"),
                _R.suffix == sa.bindparam("range_suffix"),
            )
            conn.execute(
                sa.delete(t.ranges).where(matches),
                [{"range_product": p, "range_option": o, "range_suffix": s} for p, o, s in ranges],
            )

    @staticmethod
    def _options_unknown(conn: sa.Connection, ranges: Iterable[RangeKey]) -> None:
        """Clear the sums of the (product, option) pairs of `ranges`, whose digests this
        transaction cleared (a row for each, so that a reconciliation compares the option
        even when the source no longer has it: its slots were deleted)."""
        pairs = sorted({(product, option) for product, option, _ in ranges})
        StoredRanges._delete_options(conn, pairs)
        conn.execute(
            sa.insert(t.option_digests),
            [{"product_id": p, "option_id": o, "row_count": 0, "digest": None} for p, o in pairs],
        )

    @staticmethod
    def _delete_options(conn: sa.Connection, pairs: list[tuple[str, str]]) -> None:
        conn.execute(
            sa.delete(t.option_digests).where(
                _O.product_id == sa.bindparam("pair_product"),
                _O.option_id == sa.bindparam("pair_option"),
            ),
            [{"pair_product": p, "pair_option": o} for p, o in pairs],
        )

    @staticmethod
    def _sum_options(conn: sa.Connection, ranges: Iterable[RangeKey]) -> None:
        """Write anew, in the caller's transaction, the sums of the stored ranges of every
        (product, option) of `ranges` (seyaha_option_digests), once their digests are
        written: a pair's row then sums its ranges as this transaction leaves them (NULL
        where one of them is unknown; no row once it has none). As for the ranges
        themselves, one writer at a time writes a pair: an agent's polls and its
        reconciliation take turns, and agents sharing a store write the slots of different
        products (their shards)."""
        pairs = sorted({(product, option) for product, option, _ in ranges})
        for start in range(0, len(pairs), _OPTIONS_PER_READ):
            part = pairs[start : start + _OPTIONS_PER_READ]
            wanted = set(part)
            # Found by the option id's index; other products' pairs of those ids are skipped.
            query = sa.select(_R.product_id, _R.option_id, _R.row_count, _R.digest).where(
                _R.option_id.in_(sorted({option for _, option in part}))
            )
            sums: dict[tuple[str, str], DigestSum] = {}
            for product, option, rows, digest in conn.execute(query):
                pair = (product, option)
                if pair in wanted:
                    total = sums.get(pair)
                    if total is None:
                        total = sums[pair] = DigestSum()
                    total.add_stored(rows, digest)
            StoredRanges._delete_options(conn, part)
            if sums:
                conn.execute(
                    sa.insert(t.option_digests),
                    [
                        {
                            "product_id": p,
                            "option_id": o,
                            "row_count": total.rows,
                            "digest": str(total.sum) if total.sound else None,
                        }
                        for (p, o), total in sums.items()
                    ],
                )

    def option_digests(self) -> OptionDigests:
        """The stored ranges' digests summed per option id (every product's together), from
        seyaha_option_digests: one row per (product, option), about 5,000 at 1M slots."""
        with self.connector.read() as conn:
            ranges = conn.execute(sa.select(sa.func.count()).select_from(t.ranges)).scalar_one()
            rows = conn.execute(
                sa.select(_O.option_id, _O.row_count, _O.digest),
                execution_options={"yield_per": _BATCH_ROWS},
            )
            sums = OptionSums()
            for option, row_count, digest in rows:
                sums.add(option, UNKNOWN if digest is None else f"{row_count}:{digest}")
        return OptionDigests(sums.table(), int(ranges))

    def counts(self) -> tuple[int, int]:
        """(option ids, ranges) the store has digests for: what decides whether a pass
        compares option digests first (agent.ranges.compares_options_first), before they
        are read."""
        with self.connector.read() as conn:
            options = conn.execute(sa.select(sa.func.count(_O.option_id.distinct()))).scalar_one()
            ranges = conn.execute(sa.select(sa.func.count()).select_from(t.ranges)).scalar_one()
        return int(options), int(ranges)

    def option_ids(self) -> Iterator[str]:
        """Every option id seyaha_option_digests has (each once), streamed from the store."""
        with self.connector.read() as conn:
            for (option,) in conn.execute(
                sa.select(_O.option_id).distinct(), execution_options={"yield_per": _BATCH_ROWS}
            ):
                yield option

    def of_options(self, options: Collection[str]) -> tuple[DigestTable, list[str]]:
        """The stored digests of the ranges of the option ids `options`, and their labels,
        found by the option id's index."""
        labels: list[str] = []
        with self.connector.read() as conn:

            def pairs() -> Iterator[tuple[str, str]]:
                for name, _, text in self._items_of(conn, options):
                    labels.append(name)
                    yield name, text

            table = DigestTable.of(pairs())
        return table, labels


@lru_cache(maxsize=4)
def _slots_query(terms: int) -> sa.TextClause:
    """The read of the stored slots of `terms` ranges bound as p<n>, o<n> and s<n> (the
    product, the option, and a LIKE pattern of the last character), in key order."""
    where = " OR ".join(
        f"(product_id = :p{n} AND option_id = :o{n} AND availability_id LIKE :s{n} ESCAPE '/')"
        for n in range(terms)
    )
    return sa.text(
        f"SELECT {_SLOT_COLUMNS} FROM {t.slot_fingerprints.name}"  # noqa: S608 - no outside text
        f" WHERE {where} ORDER BY {_SLOT_ORDER}"
    )


def _batches(ranges: Collection[RangeKey]) -> Iterator[dict[tuple[str, str], set[str]]]:
    """`ranges` as {(product, option): suffixes}, in key order, cut between options so that
    each batch holds at most _TERMS ranges (an option's ranges stay in one batch, which keeps
    the slots in key order across batches)."""
    batch: dict[tuple[str, str], set[str]] = {}
    count = 0
    for (product, option), group in groupby(sorted(ranges), key=lambda r: (r[0], r[1])):
        suffixes = {r[2] for r in group}
        if batch and count + len(suffixes) > _TERMS:
            yield batch
            batch, count = {}, 0
        batch[(product, option)] = suffixes
        count += len(suffixes)
    if batch:
        yield batch
