"""The PromQL evaluator, with Prometheus 3 semantics.

An expression is evaluated once for all the steps of a query (see values.py): selectors
find the last sample in `(t - lookback, t]` for every step with one searchsorted call,
functions over ranges cut `(t - range, t]` windows the same way, and operators and
aggregations work on whole rows of steps. An instant query is a range query of one step.
"""

from __future__ import annotations

import math
import re
import time
from datetime import timedelta
from typing import Any

import numpy as np
import promql_parser as pp

from lookout.errors import PromQLError
from lookout.query.promql import aggregate, binary, functions, positions
from lookout.query.promql.model import (
    FlatSeries,
    Matcher,
    QueryResult,
    ResultSeries,
    Storage,
    Times,
    stale_mask,
)
from lookout.query.promql.values import (
    NAME,
    Matrix,
    Scalar,
    String,
    Value,
    Vector,
    name_dropped,
    without_name,
)

DEFAULT_SUBQUERY_STEP_MS = 60_000  # Prometheus's default evaluation_interval
MAX_POINTS_PER_SERIES = 11_000

_MATCH_OPS = {
    "MatchOp.Equal": "=",
    "MatchOp.NotEqual": "!=",
    "MatchOp.Re": "=~",
    "MatchOp.NotRe": "!~",
}


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_NEGATIVE_AT = re.compile(r"@\s*-")


def duration_ms(delta: timedelta | None) -> int:
    if delta is None:
        return 0
    return round(delta.total_seconds() * 1000)


def parse(query: str) -> Any:
    """The parsed expression; a syntax error is `bad_data`."""
    if not query.strip():
        raise PromQLError("empty query", "bad_data")
    if _NEGATIVE_AT.search(_STRINGS.sub('""', query)):
        # promql-parser cannot represent a time before 1970 (it reads it as 0); refuse it
        # rather than answer for the wrong time.
        raise PromQLError("an @ modifier before 1970 (a negative timestamp) is not supported",
                          "bad_data")  # fmt: skip
    try:
        return pp.parse(query)
    except ValueError as exc:
        raise PromQLError(f"parse error: {exc}", "bad_data") from None
    except BaseException as exc:  # promql-parser's Rust panics arrive as BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise PromQLError(f"parse error: {exc}", "bad_data") from None


class Engine:
    """Evaluates PromQL over a Storage. Raises lookout.errors.PromQLError."""

    def __init__(
        self,
        storage: Storage,
        *,
        lookback_ms: int = 300_000,
        max_samples: int = 5_000_000,
        timeout_s: float = 30.0,
        delayed_name_removal: bool = False,
    ) -> None:
        self.storage = storage
        self.lookback_ms = lookback_ms
        self.max_samples = max_samples
        self.timeout_s = timeout_s
        # Prometheus's `promql-delayed-name-removal` feature: off by default in Prometheus,
        # on in its promqltest engine (and so in `lookout promql-test`).
        self.delayed_name_removal = delayed_name_removal

    def instant(self, query: str, time_ms: int, *, timeout_s: float | None = None) -> QueryResult:
        expr = parse(query)
        times = np.array([time_ms], dtype=np.int64)
        ev = Evaluation(self, times, time_ms, time_ms, timeout_s, query=query)
        value = _finished(ev.eval(expr))
        result = _instant_result(value, time_ms)
        return ev.finish(result)

    def range(
        self,
        query: str,
        start_ms: int,
        end_ms: int,
        step_ms: int,
        *,
        timeout_s: float | None = None,
    ) -> QueryResult:
        if step_ms <= 0:
            raise PromQLError(
                "zero or negative query resolution step widths are not accepted. "
                "Try a positive integer",
                "bad_data",
            )
        if end_ms < start_ms:
            raise PromQLError("end timestamp must not be before start time", "bad_data")
        if (end_ms - start_ms) / step_ms > MAX_POINTS_PER_SERIES:  # Prometheus's own test
            raise PromQLError(
                "exceeded maximum resolution of 11,000 points per timeseries. "
                "Try decreasing the query resolution (?step=XX)",
                "bad_data",
            )
        expr = parse(query)
        times = np.arange(start_ms, end_ms + 1, step_ms, dtype=np.int64)
        ev = Evaluation(self, times, start_ms, end_ms, timeout_s, query=query, is_range=True)
        value = _finished(ev.eval(expr))
        if isinstance(value, String | Matrix):
            kind = "string" if isinstance(value, String) else "range vector"
            raise PromQLError(
                f'invalid expression type "{kind}" for range query, '
                "must be Scalar or instant Vector",
                "bad_data",
            )
        return ev.finish(_range_result(value, times))


def _finished(value: Value) -> Value:
    """Names flagged for delayed removal go now, at the end of the query."""
    if isinstance(value, Vector):
        return value.finished()
    if isinstance(value, Matrix) and value.drop is not None and value.drop.any():
        flags = value.drop.tolist()
        labels = [without_name(lb) if f else lb for lb, f in zip(value.labels, flags, strict=True)]
        if len({tuple(sorted(lb.items())) for lb in labels}) < len(labels):
            raise PromQLError("vector cannot contain metrics with the same labelset", "execution")
        value.labels = labels
    return value


def _instant_result(value: Value, time_ms: int) -> QueryResult:
    at = np.array([time_ms], dtype=np.int64)
    if isinstance(value, Scalar):
        return QueryResult("scalar", [ResultSeries({}, at, value.values[:1].copy())])
    if isinstance(value, String):
        return QueryResult("string", [], text=value.text)
    if isinstance(value, Matrix):
        series = []
        end = int(value.times[0])
        for i, labels in enumerate(value.labels):
            ts, values = value.row(i)
            keep = (ts > end - value.range_ms) & (ts <= end)
            if keep.any():
                series.append(ResultSeries(labels, ts[keep], values[keep]))
        return QueryResult("matrix", series)
    live = np.flatnonzero(value.present[:, 0]).tolist() if len(value) else []
    series = [ResultSeries(value.labels[i], at, value.values[i, :1].copy()) for i in live]
    return QueryResult("vector", series)


def _range_result(value: Vector | Scalar, times: Times) -> QueryResult:
    if isinstance(value, Scalar):
        return QueryResult("matrix", [ResultSeries({}, times, value.values)])
    series: list[ResultSeries] = []
    if len(value) == 0:
        return QueryResult("matrix", series)
    all_present: list[bool] = np.asarray(value.present.all(axis=1)).tolist()
    for i in np.flatnonzero(value.present.any(axis=1)).tolist():
        if all_present[i]:
            series.append(ResultSeries(value.labels[i], times, value.values[i]))
        else:
            mask = value.present[i]
            series.append(ResultSeries(value.labels[i], times[mask], value.values[i][mask]))
    series.sort(key=lambda s: sorted(s.labels.items()))
    return QueryResult("matrix", series)


class Evaluation:
    """One query's evaluation: its steps, deadline, sample budget and annotations."""

    def __init__(
        self,
        engine: Engine,
        times: Times,
        start_ms: int,
        end_ms: int,
        timeout_s: float | None,
        *,
        query: str = "",
        is_range: bool = False,
    ) -> None:
        self.engine = engine
        self.query = query
        self.is_range = is_range
        self.invalid_strings = positions.invalid_utf8_literals(query) if "\\" in query else set()
        self.times = times
        self.start_ms = start_ms
        self.end_ms = end_ms
        timeout = engine.timeout_s if timeout_s is None else min(timeout_s, engine.timeout_s)
        self.deadline = time.monotonic() + timeout
        self.samples = 0
        self.warnings: list[str] = []
        self.infos: list[str] = []

    @property
    def steps(self) -> int:
        return len(self.times)

    def finish(self, result: QueryResult) -> QueryResult:
        result.warnings = list(dict.fromkeys(self.warnings))
        result.infos = list(dict.fromkeys(self.infos))
        result.samples_loaded = self.samples
        return result

    def check(self) -> None:
        """The cooperative deadline: called between nodes and inside long loops."""
        if time.monotonic() > self.deadline:
            raise PromQLError("query timed out in expression evaluation", "timeout")

    def count(self, samples: int) -> None:
        self.samples += samples
        if self.samples > self.engine.max_samples:
            raise PromQLError(
                "query processing would load too many samples into memory in query execution",
                "execution",
            )

    def warn(self, message: str, position: str = "") -> None:
        self.warnings.append(f"PromQL warning: {message} {position}".rstrip())

    def info(self, message: str, position: str = "") -> None:
        self.infos.append(f"PromQL info: {message} {position}".rstrip())

    def label_name_ok(self, name: str) -> bool:
        """A label name a function may write: not empty, printable, and not spelled with
        byte escapes that are invalid UTF-8 (see positions.invalid_utf8_literals)."""
        return bool(name) and name.isprintable() and name not in self.invalid_strings

    # -- dispatch ------------------------------------------------------------------------
    def eval(self, node: Any) -> Value:
        self.check()
        if isinstance(node, pp.NumberLiteral):
            return Scalar(np.full(self.steps, float(node.val)))
        if isinstance(node, pp.StringLiteral):
            return String(node.val)
        if isinstance(node, pp.ParenExpr):
            return self.eval(node.expr)
        if isinstance(node, pp.UnaryExpr):
            return self._negate(self.eval(node.expr))
        if isinstance(node, pp.VectorSelector):
            return self.select(node)
        if isinstance(node, pp.MatrixSelector):
            return self.matrix(node)
        if isinstance(node, pp.SubqueryExpr):
            return self.subquery(node)
        if isinstance(node, pp.Call):
            return functions.call(self, node)
        if isinstance(node, pp.AggregateExpr):
            return aggregate.evaluate(self, node)
        if isinstance(node, pp.BinaryExpr):
            return binary.evaluate(self, node)
        raise PromQLError(f"unsupported expression {node}", "bad_data")

    def eval_vector(self, node: Any) -> Vector:
        value = self.eval(node)
        if not isinstance(value, Vector):
            raise PromQLError(f"expected an instant vector, got {type(value).__name__}")
        return value

    def eval_scalar(self, node: Any) -> Scalar:
        value = self.eval(node)
        if not isinstance(value, Scalar):
            raise PromQLError(f"expected a scalar, got {type(value).__name__}")
        return value

    def _negate(self, value: Value) -> Value:
        if isinstance(value, Scalar):
            return Scalar(-value.values)
        if isinstance(value, Vector):
            delayed = self.engine.delayed_name_removal
            return name_dropped(value.labels, -value.values, value.present, unique=value.unique,
                                prior=value.drop, delayed=delayed)  # fmt: skip
        raise PromQLError("unary minus applies to numbers and instant vectors only")

    # -- selectors -----------------------------------------------------------------------
    def matchers(self, node: Any) -> list[Matcher]:
        found = []
        if node.name:
            found.append(Matcher(NAME, "=", node.name))
        if node.matchers.or_matchers:
            raise PromQLError("'or' inside a label matcher list is not supported", "bad_data")
        for m in node.matchers.matchers:
            try:
                found.append(Matcher(m.name, _MATCH_OPS[str(m.op)], m.value))  # type: ignore[arg-type]
            except ValueError as exc:
                raise PromQLError(str(exc), "bad_data") from None
        return found

    def at_times(self, node: Any) -> Times:
        """The evaluation time of each step for a selector or subquery: `@` pins it,
        `offset` moves it back."""
        at = node.at
        if at is not None:
            kind = str(at.type)
            if kind.endswith("Start"):
                pinned = self.start_ms
            elif kind.endswith("End"):
                pinned = self.end_ms
            else:  # "@ 1.500": read the text, the attribute panics on negative times
                pinned = round(float(str(at).split()[-1]) * 1000)
            times = np.full(self.steps, pinned, dtype=np.int64)
        else:
            times = self.times
        offset = duration_ms(node.offset)
        return times - offset if offset else times

    def _load(self, node: Any, times: Times, window_ms: int, *, drop_stale: bool) -> Matrix:
        """The selector's series over the windows ending at `times`, as a Matrix."""
        matchers = self.matchers(node)
        mint = int(times.min()) - window_ms + 1
        maxt = int(times.max())
        storage = self.engine.storage
        select_flat = getattr(storage, "select_flat", None)
        if select_flat is not None:
            flat: FlatSeries = select_flat(matchers, mint, maxt)
        else:
            flat = _flatten(storage.select(matchers, mint, maxt))
        self.count(len(flat.ts))
        self.check()
        return _matrix(flat, times, window_ms, drop_stale=drop_stale)

    def select(self, node: Any) -> Vector:
        times = self.at_times(node)
        lookback = self.engine.lookback_ms
        matrix = self._load(node, times, lookback, drop_stale=False)
        steps = self.steps
        if len(matrix) == 0 or len(matrix.ts) == 0:
            return Vector.empty(steps)
        _, hi = matrix.windows()
        idx = hi - 1
        starts = matrix.offsets[:-1][:, None]
        present = idx >= starts
        idx = np.where(present, idx, 0)
        sample_ts = matrix.ts[idx]
        values = matrix.values[idx]
        present &= sample_ts > (times - lookback)[None, :]
        present &= ~stale_mask(values)
        return Vector(matrix.labels, values, present, sample_ts, unique=True)

    def matrix(self, node: Any) -> Matrix:
        selector = node.vector_selector
        range_ms = duration_ms(node.range)
        times = self.at_times(selector)
        matrix = self._load(selector, times, range_ms, drop_stale=True)
        matrix.selector = selector
        return matrix

    def subquery(self, node: Any) -> Matrix:
        range_ms = duration_ms(node.range)
        step_ms = duration_ms(node.step) or DEFAULT_SUBQUERY_STEP_MS
        times = self.at_times(node)
        # Inner steps: multiples of the step after the earliest window start (Go's
        # truncating division, as Prometheus does).
        first = int(times.min()) - range_ms
        inner_start = step_ms * int(first / step_ms)
        if inner_start <= first:
            inner_start += step_ms
        inner_end = int(times.max())
        inner_times = np.arange(inner_start, inner_end + 1, step_ms, dtype=np.int64)
        if len(inner_times) == 0:
            return Matrix([], np.empty(0, dtype=np.int64), np.empty(0), np.zeros(1, dtype=np.intp),
                          times, range_ms)  # fmt: skip
        inner = Evaluation(self.engine, inner_times, self.start_ms, self.end_ms, None,
                           query=self.query, is_range=self.is_range)  # fmt: skip
        inner.deadline = self.deadline
        inner.samples = self.samples
        value = inner.eval(node.expr)
        self.samples = inner.samples
        self.warnings += inner.warnings
        self.infos += inner.infos
        if isinstance(value, Scalar):
            value = Vector([{}], value.values[None, :], np.ones((1, len(inner_times)), dtype=bool))
        if not isinstance(value, Vector):
            raise PromQLError("subquery is only allowed on instant vector", "bad_data")
        value = value.drop_empty()
        ts_parts, value_parts, offsets = [], [], [0]
        for i in range(len(value)):
            mask = value.present[i]
            ts_parts.append(inner_times[mask])
            value_parts.append(value.values[i][mask])
            offsets.append(offsets[-1] + int(mask.sum()))
        ts = np.concatenate(ts_parts) if ts_parts else np.empty(0, dtype=np.int64)
        values = np.concatenate(value_parts) if value_parts else np.empty(0)
        self.count(len(ts))
        offsets_array = np.asarray(offsets, dtype=np.intp)
        return Matrix(value.labels, ts, values, offsets_array, times, range_ms, drop=value.drop)


def _flatten(series: list[Any]) -> FlatSeries:
    """A storage's list of SeriesData as one FlatSeries (one copy of every sample)."""
    lengths = np.fromiter((len(s.ts) for s in series), dtype=np.intp, count=len(series))
    offsets = np.zeros(len(series) + 1, dtype=np.intp)
    np.cumsum(lengths, out=offsets[1:])
    if not series:
        return FlatSeries([], np.empty(0, dtype=np.int64), np.empty(0), offsets)
    ts = np.concatenate([s.ts for s in series]).astype(np.int64, copy=False)
    values = np.concatenate([s.values for s in series]).astype(np.float64, copy=False)
    return FlatSeries([s.labels for s in series], ts, values, offsets)


def _matrix(flat: FlatSeries, times: Times, range_ms: int, *, drop_stale: bool) -> Matrix:
    """A Matrix over flat series; for a range, without staleness markers."""
    ts, values, offsets = flat.ts, flat.values, flat.offsets
    if drop_stale and len(values):
        stale = stale_mask(values)
        if stale.any():
            keep = ~stale
            rows = np.repeat(np.arange(len(flat.labels)), np.diff(offsets))
            lengths = np.bincount(rows[keep], minlength=len(flat.labels))
            offsets = np.zeros(len(flat.labels) + 1, dtype=np.intp)
            np.cumsum(lengths, out=offsets[1:])
            ts, values = ts[keep], values[keep]
    return Matrix(flat.labels, ts, values, offsets, times, range_ms)


def go_float(value: float) -> str:
    """A float as Go's strconv.FormatFloat(v, 'f', -1, 64) writes it (count_values)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(value)
    if "e" in text or "E" in text:
        text = np.format_float_positional(value, trim="-")
    if text.endswith(".0"):
        text = text[:-2]
    return text
