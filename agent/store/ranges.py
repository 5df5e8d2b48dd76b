"""The stored range digests (agent/ranges.py): what a reconciliation compares the source's with.

Invariant: a range with a digest here has stored fingerprints that match the source rows the
digest was computed over, and nothing wrote its slots since. Every write of slots clears the
digests of their ranges in the same transaction (`touch`), and leaves a row for each such
range, so that a range whose slots are stored always has a row here: a reconciliation then
sees a range whose source rows all went away (the row is here, the source has none).
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Collection, Generator, Iterable, Iterator, Mapping
from functools import lru_cache
from itertools import groupby
from typing import Any

import sqlalchemy as sa

from agent.model import SlotKey, StoredSlot
from agent.ranges import SEPARATOR, UNKNOWN, RangeDigest, RangeKey, StoredDigests, range_of
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


class StoredRanges:
    def __init__(self, connector: Connector) -> None:
        self.connector = connector
        self._loaded: tuple[str | None, StoredDigests] | None = None
        """(WRITTEN token, content) of the last load: a quiet inventory's every pass
        compares with the same 50,000 digests, read once."""
        self._shape: tuple[int, int] | None = None
        """(option ids, ranges) of the last load."""

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
        table (a quiet inventory's every pass compares with the same digests, read once).
        Built as the rows stream in: about 20 bytes a range once built (10 MB for the
        500,000 ranges of 10M slots, where a dictionary of the label and digest strings took
        98 MB), and as much an option id."""
        with self.connector.read() as conn:
            # The token first: a write committed between the two reads leaves an old token
            # beside newer content, which the next load reads again (the other order could
            # keep older content under the newest token).
            token = get_meta(conn, WRITTEN)
            if token is not None and self._loaded is not None and self._loaded[0] == token:
                return self._loaded[1]
            # The previous content goes first, not once the new one is built beside it.
            self._loaded = None
            content = StoredDigests.of(self._items(conn, with_option=True))
        self._loaded = (token, content)
        self._shape = (len(content.options), len(content.ranges))
        return content

    def shape(self) -> tuple[int, int]:
        """How many option ids and ranges are stored: as the last load found them (the shape
        of an inventory changes slowly; a pass decides how to compare with it before its
        load is done), else counted in the store."""
        if self._shape is not None:
            return self._shape
        with self.connector.read() as conn:
            options, ranges = conn.execute(
                sa.select(sa.func.count(sa.distinct(_R.option_id)), sa.func.count())
            ).one()
        return int(options), int(ranges)

    def items(self) -> dict[str, str]:
        """Every stored range: label -> digest text (UNKNOWN when written since)."""
        with self.connector.read() as conn:
            return dict(self._items(conn))

    def labels(self, options: Collection[str] | None = None) -> Iterator[str]:
        """Every stored range's label, streamed from the store (a range to read again too);
        `options`: those of these option ids only."""
        with self.connector.read() as conn:
            if options is None:
                for (name,) in conn.execute(
                    sa.select(_LABEL), execution_options={"yield_per": _BATCH_ROWS}
                ):
                    yield name
                return
            # One streamed read, filtered here: the table's key starts with the product id,
            # so a condition on the option id alone would go through every row per batch.
            wanted = set(options)
            for name, option in conn.execute(
                sa.select(_LABEL, _R.option_id), execution_options={"yield_per": _BATCH_ROWS}
            ):
                if option in wanted:
                    yield name

    def options(self) -> Iterator[str]:
        """Every option id the stored ranges have (each once), streamed from the store."""
        with self.connector.read() as conn:
            for (option,) in conn.execute(
                sa.select(_R.option_id).distinct(), execution_options={"yield_per": _BATCH_ROWS}
            ):
                yield option

    @staticmethod
    def _items(conn: sa.Connection, *, with_option: bool = False) -> Iterator[Any]:
        # The database spells each label and digest text: a range comes as one pair of
        # strings (50,000 ranges in about 30 ms). Streamed, never a list of rows first: at
        # 10M slots that held 500,000 Row objects, 70 MB more at the peak.
        text = sa.case(
            (_R.digest.is_(None), UNKNOWN),
            else_=sa.cast(_R.row_count, sa.String) + ":" + _R.digest,
        )
        columns = (_LABEL, _R.option_id, text) if with_option else (_LABEL, text)
        rows = conn.execute(sa.select(*columns), execution_options={"yield_per": _BATCH_ROWS})
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
    def touch(conn: sa.Connection, keys: Iterable[SlotKey]) -> None:
        """Clear the digests of the ranges of `keys`, whose slots this transaction writes."""
        touched = sorted({range_of(key) for key in keys})
        if not touched:
            return
        StoredRanges._delete(conn, touched)
        StoredRanges._insert_dirty(conn, touched)
        StoredRanges._written(conn)

    @staticmethod
    def _written(conn: sa.Connection) -> None:
        set_meta(conn, WRITTEN, uuid.uuid4().hex)

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
    ) -> None:
        """Store the digests of `clean` ranges, mark `dirty` ones to be read again (their
        slots may be stored, their digest is unknown) and forget `gone` ones (no slot, no
        row)."""
        dirty = set(dirty)
        changed = sorted({*clean, *gone, *dirty})
        if not changed:
            return
        StoredRanges._written(conn)
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

    @staticmethod
    def reset(conn: sa.Connection, basis: str | None) -> None:
        """Forget every stored digest; from now on they are computed on `basis` (None: none)."""
        conn.execute(sa.delete(t.ranges))
        set_meta(conn, BASIS, basis)
        StoredRanges._written(conn)

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
