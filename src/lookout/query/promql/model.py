"""What the PromQL engine reads and returns: series data, label matchers, the storage
protocol the store and the promqltest runner both implement, and query results.

Times are integer milliseconds since the epoch, as in Prometheus's TSDB.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np
import numpy.typing as npt
import re2

# Prometheus's staleness marker: a NaN with this exact bit pattern. A scrape writes it when a
# series disappears; the engine treats a series as absent from the marker on.
STALE_NAN_BITS = 0x7FF0000000000002
STALE_NAN: float = struct.unpack("<d", struct.pack("<Q", STALE_NAN_BITS))[0]

Floats = npt.NDArray[np.float64]
Times = npt.NDArray[np.int64]


def is_stale(value: float) -> bool:
    return math.isnan(value) and struct.pack("<d", value) == struct.pack("<Q", STALE_NAN_BITS)


def stale_mask(values: Floats) -> npt.NDArray[np.bool_]:
    """Which of `values` are staleness markers (not merely NaN)."""
    mask: npt.NDArray[np.bool_] = values.view(np.uint64) == np.uint64(STALE_NAN_BITS)
    return mask


MatchOp = Literal["=", "!=", "=~", "!~"]


@dataclass(frozen=True)
class Matcher:
    """One label matcher. Regexes are RE2, fully anchored, and `.` matches a newline, as in
    Prometheus 3: `{a=~"b"}` matches only the value `b`. A label that is absent has the
    value "", so `{a=""}` matches series without `a`."""

    name: str
    op: MatchOp
    value: str
    _regex: Any = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.op in ("=~", "!~"):
            options = re2.Options()
            options.dot_nl = True
            options.log_errors = False  # a bad pattern is the user's error, answered as such
            try:
                regex = re2.compile(f"^(?:{self.value})$", options)
            except re2.error as exc:
                raise ValueError(f"invalid regular expression {self.value!r}: {exc}") from None
            object.__setattr__(self, "_regex", regex)

    def matches(self, value: str) -> bool:
        if self.op == "=":
            return value == self.value
        if self.op == "!=":
            return value != self.value
        assert self._regex is not None
        found = self._regex.fullmatch(value) is not None
        return found if self.op == "=~" else not found

    def __str__(self) -> str:
        return f"{self.name}{self.op}{self.value!r}"


def matches_all(labels: dict[str, str], matchers: list[Matcher]) -> bool:
    return all(m.matches(labels.get(m.name, "")) for m in matchers)


@dataclass
class SeriesData:
    """One stored series over the asked window: labels (with `__name__`) and its samples,
    ascending by time. A value may be a staleness marker (see stale_mask)."""

    labels: dict[str, str]
    ts: Times
    values: Floats


@dataclass
class FlatSeries:
    """Series data as flat arrays: row i has labels[i] and samples offsets[i]:offsets[i+1]
    of `ts` and `values` (each row ascending in time). What a storage that holds samples
    this way can hand the engine without a copy per series (see Storage.select_flat)."""

    labels: list[dict[str, str]]
    ts: Times
    values: Floats
    offsets: npt.NDArray[np.intp]


class Storage(Protocol):
    """Where the engine reads series from."""

    def select(self, matchers: list[Matcher], mint_ms: int, maxt_ms: int) -> list[SeriesData]:
        """Every series matching all `matchers` that has a sample in [mint_ms, maxt_ms], with
        its samples in that window (both ends included)."""
        ...


ResultType = Literal["vector", "matrix", "scalar", "string"]


@dataclass
class ResultSeries:
    """One result series: its points as two arrays (what the API formats without a Python
    object per point), and as (time ms, value) pairs through `points`."""

    labels: dict[str, str]
    ts: Times
    values: Floats

    @property
    def points(self) -> list[tuple[int, float]]:
        return list(zip(self.ts.tolist(), self.values.tolist(), strict=True))

    @classmethod
    def of(cls, labels: dict[str, str], points: list[tuple[int, float]]) -> ResultSeries:
        ts = np.array([t for t, _ in points], dtype=np.int64)
        return cls(labels, ts, np.array([v for _, v in points], dtype=np.float64))


@dataclass
class QueryResult:
    """What a query returned, in the Prometheus API's terms. A `vector` result has one point
    per series, a `matrix` one or more; a `scalar` is one series without labels; a `string`
    keeps its text in `text`."""

    result_type: ResultType
    series: list[ResultSeries]
    text: str = ""
    warnings: list[str] = field(default_factory=list)
    infos: list[str] = field(default_factory=list)
    samples_loaded: int = 0
