"""Samples in memory, grouped by series: what lets a range query read thousands of series
without asking DuckDB for them one sample row at a time.

The store keeps samples in time order (one scrape after another), which is what ingest and
retention want but the opposite of what a query wants: all of one series' samples together.
A `Block` holds one hour of one source (a Parquet file or a day table) regrouped by series,
in two flat arrays, so a query finds each series' samples in a time window with a few
vectorised binary searches and hands them to the engine as slices.

Layout. Series are sorted by id; series `k` owns rows `starts[k]:starts[k + 1]`, ascending in
time, no timestamp twice. Instead of the timestamps, each row keeps a `position`:

    position = offset[k] + (ts - first_ts[k]),   offset[k + 1] = offset[k] + span[k] + 1

which rises across the whole block, so the rows of every wanted series that fall in a window
are found with two `np.searchsorted` calls for all series at once; the timestamps come back as
`position - offset[k] + first_ts[k]`.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from lookout.query.promql.model import Floats, Times

Ids = npt.NDArray[np.uint64]
Ints = npt.NDArray[np.int64]
_MAX_POSITION = np.iinfo(np.int64).max // 2


@dataclass(frozen=True)
class Block:
    """One source's samples of one time range, regrouped by series (read-only arrays)."""

    sids: Ids  # sorted, unique
    starts: Ints  # len(sids) + 1 row offsets
    first_ts: Ints  # per series
    span: Ints  # per series: last ts - first ts
    offset: Ints  # per series: the position of its first row
    positions: Ints  # per row, rising (see the module docstring)
    values: Floats  # per row
    mint: int
    maxt: int

    @property
    def rows(self) -> int:
        return len(self.values)

    @property
    def nbytes(self) -> int:
        return int(
            sum(a.nbytes for a in (self.sids, self.starts, self.first_ts, self.span))
            + self.offset.nbytes
            + self.positions.nbytes
            + self.values.nbytes
        )

    def ranges(self, want: Ids, mint: int, maxt: int) -> tuple[Ints, Ints, Ints, Ints]:
        """For the series of `want` (sorted ids) with samples in [mint, maxt]: their indexes
        in `want`, the first row, the row count and the timestamp shift (ts = position +
        shift) of each, all vectorised."""
        empty = np.empty(0, np.int64)
        if not len(self.sids) or not len(want) or maxt < self.mint or mint > self.maxt:
            return empty, empty, empty, empty
        found = np.searchsorted(self.sids, want)
        clipped = np.minimum(found, len(self.sids) - 1)
        wanted = np.flatnonzero(self.sids[clipped] == want)
        series = clipped[wanted]
        first, span, offset = self.first_ts[series], self.span[series], self.offset[series]
        low = offset + np.clip(mint - first, 0, span + 1)
        high = offset + np.clip(maxt - first, -1, span)
        lo = np.searchsorted(self.positions, low, "left")
        hi = np.searchsorted(self.positions, high, "right")
        count = hi - lo
        keep = count > 0
        return wanted[keep], lo[keep], count[keep], (first - offset)[keep]

    def present(self, mint: int, maxt: int) -> Ids:
        """The series with at least one sample in [mint, maxt]."""
        wanted, _, _, _ = self.ranges(self.sids, mint, maxt)
        return self.sids[wanted]


def empty_block() -> Block:
    none_ids = np.empty(0, np.uint64)
    none = np.empty(0, np.int64)
    return _frozen(Block(none_ids, np.zeros(1, np.int64), none, none, none, none,
                         np.empty(0, np.float64), 0, -1))  # fmt: skip


def _frozen(block: Block) -> Block:
    """Read-only arrays: the engine gets slices of them, and must never write through."""
    for array in (block.sids, block.starts, block.first_ts, block.span, block.offset,
                  block.positions, block.values):  # fmt: skip
        array.flags.writeable = False
    return block


def from_rows(sids: Ids, ts: Times, values: Floats) -> Block:
    """A block of rows in any order (one query's result); a timestamp seen twice for a
    series keeps its first row."""
    if not len(sids):
        return empty_block()
    uniques, codes = np.unique(sids, return_inverse=True) if len(sids) < 4096 else _codes(sids)
    return _grouped(uniques, codes.astype(np.int64, copy=False), ts, values)


def _codes(sids: Ids) -> tuple[Ids, npt.NDArray[np.int64]]:
    """np.unique(sids, return_inverse=True), hash-based: several times faster on millions of
    rows (the uniques are few, and only they are sorted)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    encoded = pc.dictionary_encode(pa.array(sids, type=pa.uint64()))
    dictionary = encoded.dictionary.to_numpy(zero_copy_only=False)
    order = np.argsort(dictionary)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    return dictionary[order], rank[indices]


def _grouped(uniques: Ids, codes: Ints, ts: Times, values: Floats) -> Block:
    """Sort rows by (series, time), drop repeated timestamps and build the block."""
    count = len(uniques)
    starts = np.concatenate(([0], np.cumsum(np.bincount(codes, minlength=count))))
    # Stable sort by series: a radix sort when the codes fit in 16 bits. Rows of one series
    # keep their stored order, which is nearly always time order already.
    small = codes.astype(np.int16) if count <= np.iinfo(np.int16).max else codes
    order = np.argsort(small, kind="stable")
    ts, values = ts[order], values[order]
    rising = ts[1:] > ts[:-1]
    inner = starts[1:-1]
    rising[inner[inner > 0] - 1] = True  # a series' first row may start lower
    if not bool(np.all(rising)):  # out of order or repeated within a series
        codes = np.repeat(np.arange(count, dtype=np.int64), np.diff(starts))
        low = int(ts.min())
        width = (int(ts.max()) - low).bit_length()
        if width + count.bit_length() <= 62:
            # One int64 key per row; the rows are runs already in order (a parallel scan's
            # pieces), which the stable sort (timsort) merges in near-linear time.
            order = np.argsort((codes << width) | (ts - low), kind="stable")
        else:
            order = np.lexsort((ts, codes))
        codes, ts, values = codes[order], ts[order], values[order]
        repeated = np.flatnonzero((codes[1:] == codes[:-1]) & (ts[1:] == ts[:-1])) + 1
        if len(repeated):
            keep = np.ones(len(ts), bool)
            keep[repeated] = False
            codes, ts, values = codes[keep], ts[keep], values[keep]
            starts = np.searchsorted(codes, np.arange(count + 1))
    return _assemble(uniques, starts.astype(np.int64), ts, values)


def _assemble(uniques: Ids, starts: Ints, ts: Times, values: Floats) -> Block:
    """The block of rows already sorted by (series, time), series `k` at starts[k]:starts[k+1]."""
    counts = np.diff(starts)
    has = counts > 0
    if not bool(np.all(has)):  # series without rows (cannot come from a query, but be safe)
        uniques = uniques[has]
        starts = np.concatenate(([0], np.cumsum(counts[has]))).astype(np.int64)
        counts = counts[has]
    first = ts[starts[:-1]]
    last = ts[starts[1:] - 1]
    span = last - first
    offset = np.concatenate(([0], np.cumsum(span + 1)[:-1])).astype(np.int64)
    if len(span) and int(offset[-1]) + int(span[-1]) > _MAX_POSITION:
        raise OverflowError("sample timestamps span too far to index in one block")
    positions = ts + np.repeat(offset - first, counts)
    return _frozen(
        Block(
            np.ascontiguousarray(uniques, np.uint64),
            starts,
            np.ascontiguousarray(first, np.int64),
            np.ascontiguousarray(span, np.int64),
            offset,
            np.ascontiguousarray(positions, np.int64),
            np.ascontiguousarray(values, np.float64),
            int(ts.min()),
            int(ts.max()),
        )
    )


def timestamps(block: Block) -> Times:
    """Every row's timestamp (for merging and tests; queries only rebuild what they take)."""
    counts = np.diff(block.starts)
    shift = np.repeat(block.first_ts - block.offset, counts)
    return block.positions + shift


def row_sids(block: Block) -> Ids:
    return np.repeat(block.sids, np.diff(block.starts))


def merge(blocks: list[Block]) -> Block:
    """One block of several (older first): where two hold a series' same timestamp, the
    older one's sample is kept, as Prometheus keeps the first of duplicate samples."""
    blocks = [b for b in blocks if b.rows]
    if not blocks:
        return empty_block()
    if len(blocks) == 1:
        return blocks[0]
    sids = np.concatenate([row_sids(b) for b in blocks])
    ts = np.concatenate([timestamps(b) for b in blocks])
    values = np.concatenate([b.values for b in blocks])
    uniques = np.unique(np.concatenate([b.sids for b in blocks]))
    codes = np.searchsorted(uniques, sids).astype(np.int64)
    return _grouped(uniques, codes, ts, values)


def gather(blocks: list[Block], want: Ids, mint: int, maxt: int) -> dict[int, tuple[Times, Floats]]:
    """The samples in [mint, maxt] of each wanted series (sorted ids), from blocks ordered
    by time: {index in want: (ts, values)}, as slices of two arrays made for this call."""
    owners, edges, ts, values = gather_flat(blocks, want, mint, maxt)
    return {
        index: (ts[a:b], values[a:b])
        for index, a, b in zip(
            owners.tolist(), edges[:-1].tolist(), edges[1:].tolist(), strict=True
        )
    }


def gather_flat(
    blocks: list[Block], want: Ids, mint: int, maxt: int
) -> tuple[Ints, Ints, Times, Floats]:
    """gather()'s answer as flat arrays: the indexes in `want` of the series found
    (ascending), row offsets (one more than series), and all samples, series after series.

    Each series' pieces (one per block) are copied in one np.concatenate over all of them,
    in (series, block) order, so the work per series is a slice, not an array operation. A
    series whose pieces overlap in time (a late sample written after its hour was
    compacted) is merged; equal timestamps keep the earlier block's sample."""
    found = []
    for position, block in enumerate(blocks):
        wanted, low, size, delta = block.ranges(want, mint, maxt)
        if len(wanted):
            found.append((position, wanted, low, size, delta))
    if not found:
        empty = np.empty(0, dtype=np.int64)
        return empty, np.zeros(1, dtype=np.int64), empty, np.empty(0)
    series = np.concatenate([f[1] for f in found])
    number = np.concatenate([np.full(len(f[1]), f[0], np.int64) for f in found])
    lo = np.concatenate([f[2] for f in found])
    count = np.concatenate([f[3] for f in found])
    shift = np.concatenate([f[4] for f in found])
    order = np.lexsort((number, series)) if len(found) > 1 else np.arange(len(series))
    series, number, lo, count, shift = (
        series[order],
        number[order],
        lo[order],
        count[order],
        shift[order],
    )
    positions = [blocks[n].positions for n in range(len(blocks))]
    values = [blocks[n].values for n in range(len(blocks))]
    pieces_ts, pieces_values = [], []
    for n, start, size in zip(number.tolist(), lo.tolist(), count.tolist(), strict=True):
        pieces_ts.append(positions[n][start : start + size])
        pieces_values.append(values[n][start : start + size])
    ts = np.concatenate(pieces_ts) + np.repeat(shift, count)
    out_values = np.concatenate(pieces_values)
    first = np.flatnonzero(np.concatenate(([True], series[1:] != series[:-1])))
    owners = series[first].astype(np.int64)
    bounds = np.append(np.concatenate(([0], np.cumsum(count)))[first], len(ts)).astype(np.int64)
    if len(found) > 1:
        rising = ts[1:] > ts[:-1]
        starts_of_series = np.zeros(len(ts), bool)
        starts_of_series[bounds[:-1]] = True
        if not bool(np.all(rising | starts_of_series[1:])):
            return _merged(owners, bounds, ts, out_values)
    return owners, bounds, ts, out_values


def _merged(
    owners: Ints, bounds: Ints, ts: Times, values: Floats
) -> tuple[Ints, Ints, Times, Floats]:
    """gather_flat()'s rare path: some series' pieces overlap; sort each of those by time."""
    edges = bounds.tolist()
    pieces_ts, pieces_values, lengths = [], [], []
    for a, b in itertools.pairwise(edges):
        piece_ts, piece_values = ts[a:b], values[a:b]
        if len(piece_ts) > 1 and not bool(np.all(piece_ts[1:] > piece_ts[:-1])):
            order = np.argsort(piece_ts, kind="stable")  # earlier blocks first among equals
            piece_ts, piece_values = piece_ts[order], piece_values[order]
            keep = np.concatenate(([True], piece_ts[1:] != piece_ts[:-1]))
            piece_ts, piece_values = piece_ts[keep], piece_values[keep]
        pieces_ts.append(piece_ts)
        pieces_values.append(piece_values)
        lengths.append(len(piece_ts))
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return owners, offsets, np.concatenate(pieces_ts), np.concatenate(pieces_values)
