"""The engine's intermediate values. Every instant-vector expression is evaluated at all the
steps of a query at once: a `Vector` holds one row per series and one column per step, with
a presence mask, so NumPy does the arithmetic of a whole range query in a few calls.

A `Matrix` (a range-vector selector or a subquery) keeps each series' raw samples plus the
evaluation time of each step; functions over it cut a window `(t - range, t]` per step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from lookout.errors import PromQLError
from lookout.query.promql.model import Floats, Times

Mask = npt.NDArray[np.bool_]
Labels = dict[str, str]
NAME = "__name__"
# What goes with the metric name when an operation drops it, and what vector matching
# ignores: the name and Prometheus 3's type and unit labels.
RESERVED = frozenset({NAME, "__type__", "__unit__"})
# Matrix.windows() searches row by row when rows hold this many samples on average.
ROW_SEARCH_MIN_SAMPLES = 32


def label_key(labels: Labels) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(labels.items()))


def without_name(labels: Labels) -> Labels:
    if NAME not in labels and "__type__" not in labels and "__unit__" not in labels:
        return labels
    return {k: v for k, v in labels.items() if k not in RESERVED}


@dataclass
class Vector:
    labels: list[Labels]
    values: Floats  # (rows, steps)
    present: Mask  # (rows, steps)
    # Sample timestamps, kept only where timestamp() needs them.
    sample_ts: npt.NDArray[np.int64] | None = None
    # True when no two rows can share a label set (saves a merge pass).
    unique: bool = True
    # With delayed name removal: rows whose `__name__` goes at the end of the query.
    drop: Mask | None = None

    @staticmethod
    def empty(steps: int) -> Vector:
        return Vector([], np.empty((0, steps)), np.empty((0, steps), dtype=bool))

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, rows: list[int] | npt.NDArray[np.intp]) -> Vector:
        index = np.asarray(rows, dtype=np.intp)
        return Vector(
            [self.labels[i] for i in index],
            self.values[index],
            self.present[index],
            None if self.sample_ts is None else self.sample_ts[index],
            self.unique,
            None if self.drop is None else self.drop[index],
        )

    def drop_empty(self) -> Vector:
        keep = np.flatnonzero(self.present.any(axis=1))
        if len(keep) == len(self.labels):
            return self
        return self.take(keep)

    def finished(self) -> Vector:
        """Delayed name removal's last step: flagged rows lose `__name__` now."""
        if self.drop is None or not self.drop.any():
            return self
        labels = [
            without_name(lb) if flag else lb
            for lb, flag in zip(self.labels, self.drop, strict=True)
        ]
        return Vector(labels, self.values, self.present, None, unique=False).merged()

    def merged(self) -> Vector:
        """Rows with the same labels become one; two of them present at the same step is
        Prometheus's 'vector cannot contain metrics with the same labelset'."""
        if self.unique or len(self.labels) < 2:
            self.unique = True
            return self
        groups: dict[tuple[tuple[str, str], ...], list[int]] = {}
        for i, labels in enumerate(self.labels):
            groups.setdefault(label_key(labels), []).append(i)
        if len(groups) == len(self.labels):
            self.unique = True
            return self
        firsts: list[int] = []
        values = self.values.copy()
        present = self.present.copy()
        drop = None if self.drop is None else self.drop.copy()
        for rows in groups.values():
            first = rows[0]
            if len(rows) > 1:
                counts = self.present[rows].sum(axis=0)
                if (counts > 1).any():
                    raise PromQLError(
                        "vector cannot contain metrics with the same labelset", "execution"
                    )
                for other in rows[1:]:
                    mask = self.present[other]
                    values[first] = np.where(mask, self.values[other], values[first])
                    present[first] |= mask
                    if drop is not None:
                        drop[first] |= drop[other]
            firsts.append(first)
        index = np.asarray(firsts, dtype=np.intp)
        return Vector(
            [self.labels[i] for i in index],
            values[index],
            present[index],
            None,
            unique=True,
            drop=None if drop is None else drop[index],
        )


def name_dropped(
    labels: list[Labels],
    values: Floats,
    present: Mask,
    *,
    unique: bool,
    prior: Mask | None,
    delayed: bool,
) -> Vector:
    """The result of an operation that removes `__name__`: at once (Prometheus's default),
    or, with delayed name removal, flagged for the end of the query, so label_replace and
    label_join can still read or keep it and `by (__name__)` still sees it."""
    if delayed:
        return Vector(labels, values, present, None, unique=unique,
                      drop=np.ones(len(labels), dtype=bool))  # fmt: skip
    names = {(lb.get(NAME), lb.get("__type__"), lb.get("__unit__")) for lb in labels}
    stripped = [without_name(lb) for lb in labels]
    out = Vector(stripped, values, present, None, unique=unique and len(names) <= 1, drop=prior)
    return out.merged()


@dataclass
class Scalar:
    values: Floats  # (steps,)


@dataclass
class String:
    text: str


@dataclass
class Matrix:
    """Series with raw samples (stale markers removed), all concatenated into `ts` and
    `values` with row i at `offsets[i]:offsets[i + 1]`, and per step the window end time
    `times` (after offset and @) and the window length `range_ms`. Windows are
    `(t - range, t]`, as in Prometheus 3."""

    labels: list[Labels]
    ts: Times
    values: Floats
    offsets: npt.NDArray[np.intp]
    times: Times
    range_ms: int
    selector: object = field(default=None, repr=False)  # the parser node, for absent_over_time
    drop: Mask | None = None  # see Vector.drop (a subquery's rows may carry it)

    def __len__(self) -> int:
        return len(self.labels)

    def windows(self) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        """Per row and step, the global index range [lo, hi) of the samples in the window.

        Rows with many samples are searched one by one (a binary search in a short, cached
        array); many rows of few samples are shifted each into a band of its own so that one
        sorted array serves one searchsorted call for all. With regular steps and a range
        that is a whole number of them, a window starts where the window `lag` steps
        earlier ended, which halves the searching."""
        rows, steps = len(self.labels), len(self.times)
        if rows == 0:
            shape = (0, steps)
            return np.empty(shape, dtype=np.intp), np.empty(shape, dtype=np.intp)
        interval = int(self.times[1] - self.times[0]) if steps > 1 else 0
        lag = self.range_ms // interval if interval > 0 else 0
        regular = (
            0 < lag < steps
            and self.range_ms % interval == 0
            and bool((np.diff(self.times) == interval).all())
        )
        starts = self.times - self.range_ms
        searched = starts[:lag] if regular else starts
        if len(self.ts) >= ROW_SEARCH_MIN_SAMPLES * rows:
            hi, lo_part = self._search_rows(searched)
        else:
            hi, lo_part = self._search_bands(searched)
        if regular:
            lo = np.empty_like(hi)
            lo[:, lag:] = hi[:, :-lag]
            lo[:, :lag] = lo_part
        else:
            lo = lo_part
        return lo, hi

    def _search_rows(self, starts: Times) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        rows = len(self.labels)
        hi = np.empty((rows, len(self.times)), dtype=np.intp)
        lo = np.empty((rows, len(starts)), dtype=np.intp)
        edges = self.offsets.tolist()
        for r in range(rows):
            row = self.ts[edges[r] : edges[r + 1]]
            hi[r] = row.searchsorted(self.times, side="right")
            lo[r] = row.searchsorted(starts, side="right")
        first = self.offsets[:-1, None]
        hi += first
        lo += first
        return hi, lo

    def _search_bands(self, starts: Times) -> tuple[npt.NDArray[np.intp], npt.NDArray[np.intp]]:
        rows = len(self.labels)
        base = int(min(self.times.min(), starts.min()) if len(starts) else self.times.min())
        if len(self.ts):
            base = min(base, int(self.ts.min()))
        span = max(int(self.ts.max()) if len(self.ts) else 0, int(self.times.max())) - base + 2
        row_of = np.repeat(np.arange(rows, dtype=np.int64), np.diff(self.offsets))
        keys = (self.ts - base) + row_of * span
        bands = (np.arange(rows, dtype=np.int64) * span)[:, None]
        hi = np.searchsorted(keys, (self.times - base)[None, :] + bands, side="right")
        lo = np.searchsorted(keys, (starts - base)[None, :] + bands, side="right")
        return hi, lo

    def row(self, i: int) -> tuple[Times, Floats]:
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.ts[a:b], self.values[a:b]


Value = Vector | Scalar | String | Matrix
