"""PromQL functions, with Prometheus 3 semantics.

Functions over range vectors work on every series and step at once where the maths allows
(rate and friends from window end points plus a running sum of counter resets; sums and
counts from prefix sums), and window by window where it does not (quantiles, regressions).
"""

from __future__ import annotations

import calendar
import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import promql_parser as pp
import re2

from lookout.errors import PromQLError
from lookout.query.promql import histograms, positions
from lookout.query.promql.aggregate import quantile, warn_quantile, welford_variance
from lookout.query.promql.model import Floats
from lookout.query.promql.values import (
    NAME,
    Labels,
    Matrix,
    Scalar,
    String,
    Value,
    Vector,
    name_dropped,
)

if TYPE_CHECKING:
    from lookout.query.promql.engine import Evaluation


def call(ev: Evaluation, node: Any) -> Value:
    name = node.func.name
    handler = FUNCTIONS.get(name)
    if handler is None:
        raise PromQLError(f"function {name!r} is not supported by Lookout", "bad_data")
    return handler(ev, list(node.args))


# -- helpers ---------------------------------------------------------------------------------
def _vector_out(
    ev: Evaluation, vector: Vector, values: Floats, present: Any = None, *, keep_name: bool = False
) -> Vector:
    present = vector.present if present is None else present
    if keep_name:
        return Vector(vector.labels, values, present, None, unique=vector.unique, drop=vector.drop)
    return name_dropped(vector.labels, values, present, unique=vector.unique, prior=vector.drop,
                        delayed=ev.engine.delayed_name_removal)  # fmt: skip


def _matrix_out(
    ev: Evaluation, matrix: Matrix, values: Floats, present: Any, *, keep_name: bool = False
) -> Vector:
    if keep_name:
        return Vector(matrix.labels, values, present, None, unique=True, drop=matrix.drop)
    return name_dropped(matrix.labels, values, present, unique=True, prior=matrix.drop,
                        delayed=ev.engine.delayed_name_removal)  # fmt: skip


def _arg_matrix(ev: Evaluation, node: Any) -> Matrix:
    value = ev.eval(node)
    if not isinstance(value, Matrix):
        raise PromQLError("expected a range vector", "bad_data")
    return value


def _arg_scalar(ev: Evaluation, node: Any) -> Floats:
    return ev.eval_scalar(node).values


def _arg_string(ev: Evaluation, node: Any) -> str:
    value = ev.eval(node)
    if not isinstance(value, String):
        raise PromQLError("expected a string", "bad_data")
    return value.text


# -- range functions from window end points ----------------------------------------------------
def _endpoints(m: Matrix) -> dict[str, Any]:
    lo, hi = m.windows()
    count = hi - lo
    last = np.maximum(hi - 1, 0)
    first = np.minimum(lo, max(len(m.ts) - 1, 0))
    if len(m.ts) == 0:
        zeros = np.zeros(count.shape)
        return {
            "count": count,
            "lo": lo,
            "hi": hi,
            "t0": zeros,
            "t1": zeros,
            "v0": zeros,
            "v1": zeros,
        }
    return {
        "count": count,
        "lo": lo,
        "hi": hi,
        "t0": m.ts[first].astype(np.float64),
        "t1": m.ts[last].astype(np.float64),
        "v0": m.values[first],
        "v1": m.values[last],
    }


def _resets(m: Matrix) -> tuple[npt.NDArray[np.intp], Floats]:
    """Where counter resets are (the index of the sample after the drop, within a series)
    and what each lost (the value before it)."""
    values = m.values
    if len(values) < 2:
        return np.empty(0, dtype=np.intp), np.empty(0)
    at = np.flatnonzero(values[1:] < values[:-1]) + 1
    if len(at):
        at = at[~np.isin(at, m.offsets)]  # a new series starting lower is no reset
    return at, values[at - 1]


def _add_resets(ev: Evaluation, m: Matrix, result: Floats, lo: Any, hi: Any) -> None:
    """Adds each window's counter-reset corrections to `result`, in sample order as
    Prometheus does, so a window without resets is untouched and one with a single reset
    gets exactly `last - first + lost` (running sums would leave rounding residue)."""
    resets, lost = _resets(m)
    if len(resets) == 0:
        return
    first = np.searchsorted(resets, lo, side="right")  # resets in (lo, hi - 1]
    count = np.searchsorted(resets, hi - 1, side="right") - first
    count[hi - lo < 2] = 0
    single = count == 1
    result[single] += lost[first[single]]
    for r, s in zip(*np.nonzero(count > 1), strict=True):
        ev.check()
        for k in range(int(first[r, s]), int(first[r, s] + count[r, s])):
            result[r, s] += lost[k]


def _extrapolated(ev: Evaluation, args: list[Any], *, is_counter: bool, is_rate: bool) -> Value:
    """Prometheus's extrapolatedRate, for every series and step at once. Durations are in
    milliseconds throughout (the ratios are the same) and arrays are reused in place: at
    thousands of series by hundreds of steps, passes over memory are most of the cost."""
    m = _arg_matrix(ev, args[0])
    if is_counter:
        _counter_info(ev, m, "rate" if is_rate else "increase")
    e = _endpoints(m)
    count = e["count"]
    present = count >= 2
    with np.errstate(all="ignore"):
        v0 = e["v0"]
        result = e["v1"] - v0
        if is_counter and len(m.ts):
            _add_resets(ev, m, result, e["lo"], e["hi"])
        t0, t1 = e["t0"], e["t1"]
        ends = m.times.astype(np.float64)[None, :]
        to_start = np.subtract(t0, ends - m.range_ms)
        to_end = np.subtract(ends, t1)
        sampled = np.subtract(t1, t0)
        half = sampled / (count - 1)  # the average interval...
        threshold = half * 1.1
        half *= 0.5  # ...and half of it
        np.copyto(to_start, half, where=to_start >= threshold)
        if is_counter:
            # A counter is not extrapolated below zero. That can only bind where the first
            # value is under 1.1 times the increase: look at those cells alone.
            cells = np.flatnonzero((v0 < result * 1.1) & (result > 0) & (v0 >= 0))
            if len(cells):
                flat_start = to_start.reshape(-1)
                zero = (
                    v0.reshape(-1)[cells] / result.reshape(-1)[cells] * sampled.reshape(-1)[cells]
                )
                closer = zero < flat_start[cells]
                flat_start[cells[closer]] = zero[closer]
        np.copyto(to_end, half, where=to_end >= threshold)
        to_start += to_end
        to_start += sampled
        to_start /= sampled
        if is_rate:
            to_start /= m.range_ms / 1000
        result *= to_start
    return _matrix_out(ev, m, result, present)


_COUNTER_SUFFIXES = ("_total", "_sum", "_count", "_bucket")


def _counter_info(ev: Evaluation, m: Matrix, name: str) -> None:
    """Prometheus's hint that rate() of a metric not named like a counter may be a mistake."""
    for labels in m.labels:
        metric = labels.get(NAME, "")
        if metric and not metric.endswith(_COUNTER_SUFFIXES):
            ev.info("metric might not be a counter, name does not end in "
                    f'_total/_sum/_count/_bucket: "{metric}"',
                    positions.argument_position(ev.query, name, 0))  # fmt: skip


def _instant_delta(ev: Evaluation, args: list[Any], *, is_rate: bool) -> Value:
    m = _arg_matrix(ev, args[0])
    lo, hi = m.windows()
    present = (hi - lo) >= 2
    if len(m.ts) < 2:
        return _matrix_out(ev, m, np.zeros(present.shape), present & False)
    last = np.maximum(hi - 1, 1)
    prev = last - 1
    v1, v0 = m.values[last], m.values[prev]
    dt = (m.ts[last] - m.ts[prev]).astype(np.float64) / 1000
    with np.errstate(all="ignore"):
        result = np.where(v1 < v0, v1, v1 - v0) / dt if is_rate else v1 - v0
    return _matrix_out(ev, m, result, present)


def _count_changes(ev: Evaluation, args: list[Any], *, resets: bool) -> Value:
    m = _arg_matrix(ev, args[0])
    lo, hi = m.windows()
    values = m.values
    flag = np.zeros(len(values))
    if len(values) > 1:
        cur, prev = values[1:], values[:-1]
        hit = cur < prev if resets else (cur != prev) & ~(np.isnan(cur) & np.isnan(prev))
        flag[1:] = hit
    sums = np.cumsum(flag)
    present = (hi - lo) >= 1
    if len(values) == 0:
        return _matrix_out(ev, m, np.zeros(present.shape), present)
    top = sums[np.maximum(hi - 1, 0)]
    bottom = sums[np.minimum(lo, len(sums) - 1)]
    return _matrix_out(ev, m, np.where(present, top - bottom, 0.0), present)


# -- range functions window by window --------------------------------------------------------
def _per_window(
    ev: Evaluation,
    m: Matrix,
    fn: Callable[[Any, Floats, int], float],
    keep_name: bool = False,
    min_count: int = 1,
) -> Vector:
    lo, hi = m.windows()
    steps = len(m.times)
    values = np.full((len(m), steps), np.nan)
    present = (hi - lo) >= min_count
    for i in range(len(m)):
        ev.check()
        for s in np.flatnonzero(present[i]):
            a, b = lo[i, s], hi[i, s]
            values[i, s] = fn(m.ts[a:b], m.values[a:b], int(s))
    return _matrix_out(ev, m, values, present, keep_name=keep_name)


def _kahan(values: Floats) -> float:
    total = comp = 0.0
    for x in values.tolist():
        t = total + x
        if math.isinf(t):
            comp = 0.0
        elif abs(total) >= abs(x):
            comp += (total - t) + x
        else:
            comp += (x - t) + total
        total = t
    return total + comp


def _window_sums(ev: Evaluation, m: Matrix) -> tuple[Floats, Any, Any, Any]:
    """Every window's sum from per-series prefix sums, with Prometheus's Kahan sum redone
    window by window wherever the prefix sums' rounding could reach 1e-9 of the result
    (values of very different sizes, or cancelling ones). Returns sums, lo, hi and count."""
    lo, hi = m.windows()
    rows = len(m)
    prefix = np.zeros(len(m.values) + rows)
    magnitude = np.zeros(len(m.values) + rows)
    offsets = m.offsets
    for r in range(rows):
        a, b = int(offsets[r]), int(offsets[r + 1])
        np.cumsum(m.values[a:b], out=prefix[a + r + 1 : b + r + 1])
        np.cumsum(np.abs(m.values[a:b]), out=magnitude[a + r + 1 : b + r + 1])
    shift = np.arange(rows, dtype=np.intp)[:, None]
    count = hi - lo
    with np.errstate(all="ignore"):
        sums = prefix[hi + shift] - prefix[lo + shift]
        lengths = np.diff(offsets).astype(np.float64)[:, None]
        error = 2.3e-16 * lengths * magnitude[hi + shift]
        doubtful = (count > 0) & ~(np.abs(sums) * 1e-9 > error)
    for r, s in zip(*np.nonzero(doubtful), strict=True):
        ev.check()
        sums[r, s] = _kahan(m.values[lo[r, s] : hi[r, s]])
    return sums, lo, hi, count


def _sum_over_time(ev: Evaluation, args: list[Any]) -> Value:
    m = _arg_matrix(ev, args[0])
    sums, _, _, count = _window_sums(ev, m)
    return _matrix_out(ev, m, sums, count > 0)


def _avg_over_time(ev: Evaluation, args: list[Any]) -> Value:
    m = _arg_matrix(ev, args[0])
    sums, lo, hi, count = _window_sums(ev, m)
    present = count > 0
    with np.errstate(all="ignore"):
        means = sums / count
    # A sum that overflowed: Prometheus falls back to the incremental mean.
    for r, s in zip(*np.nonzero(present & np.isinf(means)), strict=True):
        window = m.values[lo[r, s] : hi[r, s]]
        if np.isfinite(window).all():
            mean = 0.0
            for k, x in enumerate(window.tolist(), 1):
                mean += x / k - mean / k
            means[r, s] = mean
    return _matrix_out(ev, m, means, present)


def _count_over_time(ev: Evaluation, args: list[Any]) -> Value:
    m = _arg_matrix(ev, args[0])
    lo, hi = m.windows()
    return _matrix_out(ev, m, (hi - lo).astype(np.float64), hi > lo)


def _present_over_time(ev: Evaluation, args: list[Any]) -> Value:
    m = _arg_matrix(ev, args[0])
    lo, hi = m.windows()
    return _matrix_out(ev, m, np.ones(lo.shape), hi > lo)


def _last_over_time(ev: Evaluation, args: list[Any]) -> Value:
    m = _arg_matrix(ev, args[0])
    lo, hi = m.windows()
    if len(m.ts) == 0:
        return _matrix_out(ev, m, np.zeros(lo.shape), hi > lo, keep_name=True)
    return _matrix_out(ev, m, m.values[np.maximum(hi - 1, 0)], hi > lo, keep_name=True)


def _window_extremes(ev: Evaluation, m: Matrix, *, pick_max: bool) -> Vector:
    """max_over_time / min_over_time of every window at once, from a sparse table: level j
    holds the extreme of each run of 2^j samples, so a window's extreme is that of two runs
    that cover it. NaN counts only when the whole window is NaN, as in Prometheus."""
    lo, hi = m.windows()
    present = hi > lo
    pick = np.fmax if pick_max else np.fmin
    levels = [m.values]
    width = 1
    longest = int((hi - lo).max()) if present.any() else 0
    while width * 2 <= longest:
        ev.check()
        below = levels[-1]
        levels.append(pick(below[: len(below) - width], below[width:]))
        width *= 2
    count = np.maximum(hi - lo, 1)
    level = np.floor(np.log2(count)).astype(np.intp)
    values = np.full(lo.shape, np.nan)
    for j, table in enumerate(levels):
        cells = present & (level == j)
        if not cells.any():
            continue
        start = lo[cells]
        end = hi[cells] - (1 << j)
        values[cells] = pick(table[start], table[end])
    return _matrix_out(ev, m, values, present)


def _over_time(kind: str) -> Callable[[Evaluation, list[Any]], Value]:
    def handler(ev: Evaluation, args: list[Any]) -> Value:
        if kind == "quantile":
            phi = _arg_scalar(ev, args[0])
            m = _arg_matrix(ev, args[1])
            warn_quantile(ev, phi, positions.argument_position(ev.query, "quantile_over_time", 0))
            return _per_window(ev, m, lambda t, v, s: quantile(float(phi[s]), v))
        m = _arg_matrix(ev, args[0])
        if kind in ("max", "min"):
            return _window_extremes(ev, m, pick_max=kind == "max")

        def var(_t: Any, v: Floats, _s: int) -> float:
            return float(welford_variance(v[:, None], np.ones((len(v), 1), dtype=bool))[0])

        if kind == "stdvar":
            return _per_window(ev, m, var)
        return _per_window(ev, m, lambda t, v, s: math.sqrt(var(t, v, s)))

    return handler


def _linear_regression(ts: Any, values: Floats, intercept_ms: int) -> tuple[float, float]:
    """Prometheus's least squares (Kahan sums), x in seconds from `intercept_ms`."""
    if len(values) and (values == values[0]).all() and math.isfinite(values[0]):
        return 0.0, float(values[0])
    x = (ts.astype(np.float64) - intercept_ms) / 1000
    n = len(values)
    sum_x, sum_y = _kahan(x), _kahan(values)
    sum_xy, sum_x2 = _kahan(x * values), _kahan(x * x)
    cov = sum_xy - sum_x * sum_y / n
    var = sum_x2 - sum_x * sum_x / n
    with np.errstate(all="ignore"):
        slope = cov / var if var != 0 else math.nan
        intercept = sum_y / n - slope * sum_x / n
    return float(slope), float(intercept)


def _deriv(ev: Evaluation, args: list[Any]) -> Value:
    m = _arg_matrix(ev, args[0])
    return _per_window(ev, m, lambda t, v, s: _linear_regression(t, v, int(t[0]))[0], min_count=2)


def _predict_linear(ev: Evaluation, args: list[Any]) -> Value:
    m = _arg_matrix(ev, args[0])
    horizon = _arg_scalar(ev, args[1])

    def predict(t: Any, v: Floats, s: int) -> float:
        slope, intercept = _linear_regression(t, v, int(ev.times[s]))
        return slope * float(horizon[s]) + intercept

    return _per_window(ev, m, predict, min_count=2)


def _absent_over_time(ev: Evaluation, args: list[Any]) -> Value:
    m = _arg_matrix(ev, args[0])
    lo, hi = m.windows()
    any_present = (hi > lo).any(axis=0) if len(m) else np.zeros(len(m.times), dtype=bool)
    selector = m.selector if isinstance(m.selector, pp.VectorSelector) else None
    labels = _absent_labels(ev, selector)
    absent = np.logical_not(any_present).reshape(1, -1)
    return Vector([labels], np.ones((1, len(m.times))), absent, None, unique=True)


# -- instant vector functions ------------------------------------------------------------------
def _math(fn: Callable[[Floats], Floats]) -> Callable[[Evaluation, list[Any]], Value]:
    def handler(ev: Evaluation, args: list[Any]) -> Value:
        vector = ev.eval_vector(args[0])
        with np.errstate(all="ignore"):
            return _vector_out(ev, vector, fn(vector.values))

    return handler


def _round(ev: Evaluation, args: list[Any]) -> Value:
    vector = ev.eval_vector(args[0])
    to = _arg_scalar(ev, args[1]) if len(args) > 1 else np.ones(ev.steps)
    with np.errstate(all="ignore"):
        inverse = 1.0 / to[None, :]
        values = np.floor(vector.values * inverse + 0.5) / inverse
    return _vector_out(ev, vector, values)


def _clamp(ev: Evaluation, args: list[Any], *, low: bool, high: bool) -> Value:
    vector = ev.eval_vector(args[0])
    lo = _arg_scalar(ev, args[1]) if low else None
    hi = _arg_scalar(ev, args[2 if low else 1]) if high else None
    values = vector.values
    present = vector.present
    if lo is not None and hi is not None:
        present = present & ~(hi < lo)[None, :]
    with np.errstate(all="ignore"):
        if lo is not None:
            values = np.where(np.isnan(values), values, np.fmax(values, lo[None, :]))
            values = np.where(np.isnan(lo)[None, :], np.nan, values)
        if hi is not None:
            values = np.where(np.isnan(values), values, np.fmin(values, hi[None, :]))
            values = np.where(np.isnan(hi)[None, :], np.nan, values)
    return _vector_out(ev, vector, values, present)


def _time(ev: Evaluation, args: list[Any]) -> Value:
    return Scalar(ev.times.astype(np.float64) / 1000)


def _vector(ev: Evaluation, args: list[Any]) -> Value:
    values = _arg_scalar(ev, args[0])
    return Vector(
        [{}], values[None, :].copy(), np.ones((1, ev.steps), dtype=bool), None, unique=True
    )


def _scalar(ev: Evaluation, args: list[Any]) -> Value:
    vector = ev.eval_vector(args[0])
    count = vector.present.sum(axis=0)
    picked = (
        np.where(vector.present, vector.values, 0.0).sum(axis=0)
        if len(vector)
        else np.zeros(ev.steps)
    )
    return Scalar(np.where(count == 1, picked, np.nan))


def _timestamp(ev: Evaluation, args: list[Any]) -> Value:
    vector = ev.eval_vector(args[0])
    if vector.sample_ts is not None and isinstance(_unwrap(args[0]), pp.VectorSelector):
        values = vector.sample_ts.astype(np.float64) / 1000
    else:
        values = np.broadcast_to(ev.times.astype(np.float64) / 1000, vector.values.shape).copy()
    return _vector_out(ev, vector, values)


def _unwrap(node: Any) -> Any:
    while isinstance(node, pp.ParenExpr):
        node = node.expr
    return node


def _absent_labels(ev: Evaluation, selector: Any) -> Labels:
    if selector is None:
        return {}
    labels: Labels = {}
    seen: set[str] = set()
    for m in ev.matchers(selector):
        if m.name == NAME:
            continue
        if m.op == "=" and m.name not in seen:
            labels[m.name] = m.value
            seen.add(m.name)
        else:
            labels.pop(m.name, None)
    return labels


def _absent(ev: Evaluation, args: list[Any]) -> Value:
    vector = ev.eval_vector(args[0])
    any_present = vector.present.any(axis=0) if len(vector) else np.zeros(ev.steps, dtype=bool)
    node = _unwrap(args[0])
    selector = node if isinstance(node, pp.VectorSelector) else None
    labels = _absent_labels(ev, selector)
    absent = np.logical_not(any_present).reshape(1, -1)
    return Vector([labels], np.ones((1, ev.steps)), absent, None, unique=True)


def _sort(*, descending: bool) -> Callable[[Evaluation, list[Any]], Value]:
    def handler(ev: Evaluation, args: list[Any]) -> Value:
        vector = ev.eval_vector(args[0])
        if ev.is_range:
            name = "sort_desc" if descending else "sort"
            ev.warn("sort is ineffective for range queries since results are always ordered by "
                    "labels", positions.call_position(ev.query, name))  # fmt: skip
        if ev.steps != 1 or len(vector) == 0:
            return vector
        live = [i for i in range(len(vector)) if vector.present[i, 0]]
        values = vector.values[:, 0]

        def key(i: int) -> tuple[int, float]:
            v = float(values[i])
            if math.isnan(v):
                return (1, 0.0)  # NaN last either way
            return (0, -v if descending else v)

        return vector.take(sorted(live, key=key))

    return handler


def _expand(template: str, match: Any) -> str:
    """Go's Regexp.ExpandString: $1, ${1}, $name, ${name}; $$ is a dollar."""
    out: list[str] = []
    i = 0
    while i < len(template):
        c = template[i]
        if c != "$" or i + 1 >= len(template):
            out.append(c)
            i += 1
            continue
        nxt = template[i + 1]
        if nxt == "$":
            out.append("$")
            i += 2
            continue
        if nxt == "{":
            end = template.find("}", i + 2)
            name = template[i + 2 : end] if end != -1 else ""
            if end == -1 or not name or not all(ch.isalnum() or ch == "_" for ch in name):
                out.append(c)
                i += 1
                continue
            i = end + 1
        else:
            j = i + 1
            while j < len(template) and (template[j].isalnum() or template[j] == "_"):
                j += 1
            name = template[i + 1 : j]
            if not name:
                out.append(c)
                i += 1
                continue
            i = j
        try:
            group = match.group(int(name)) if name.isdigit() else match.group(name)
        except (IndexError, KeyError, ValueError, re2.error):
            group = None
        out.append(group or "")
    return "".join(out)


def _label_replace(ev: Evaluation, args: list[Any]) -> Value:
    vector = ev.eval_vector(args[0])
    dst = _arg_string(ev, args[1])
    replacement = _arg_string(ev, args[2])
    src = _arg_string(ev, args[3])
    pattern = _arg_string(ev, args[4])
    options = re2.Options()
    options.dot_nl = True
    options.log_errors = False  # a bad pattern is the user's error, answered as such
    try:
        regex = re2.compile(f"^(?:{pattern})$", options)
    except re2.error:
        raise PromQLError(
            f"invalid regular expression in label_replace(): {pattern}", "bad_data"
        ) from None
    if not ev.label_name_ok(dst):
        raise PromQLError(f"invalid destination label name in label_replace(): {dst}", "bad_data")
    values = []
    for lb in vector.labels:
        found = regex.fullmatch(lb.get(src, ""))
        values.append(None if found is None else _expand(replacement, found))
    return _with_label(vector, dst, values)


def _label_join(ev: Evaluation, args: list[Any]) -> Value:
    vector = ev.eval_vector(args[0])
    dst = _arg_string(ev, args[1])
    sep = _arg_string(ev, args[2])
    sources = [_arg_string(ev, a) for a in args[3:]]
    if not ev.label_name_ok(dst):
        raise PromQLError(f"invalid destination label name in label_join(): {dst}", "bad_data")
    for name in sources:
        if not ev.label_name_ok(name):
            raise PromQLError(f"invalid source label name in label_join(): {name}", "bad_data")
    values: list[str | None] = [sep.join(lb.get(s, "") for s in sources) for lb in vector.labels]
    return _with_label(vector, dst, values)


def _with_label(vector: Vector, dst: str, values: list[str | None]) -> Vector:
    """Each row with `dst` set to its value (removed when empty, untouched when None)."""
    labels = []
    for lb, value in zip(vector.labels, values, strict=True):
        if value is None:
            labels.append(lb)
            continue
        out = dict(lb)
        if value:
            out[dst] = value
        else:
            out.pop(dst, None)
        labels.append(out)
    # With delayed name removal, a name written by the function stays.
    drop = None if dst == NAME else vector.drop
    return Vector(labels, vector.values, vector.present, None, unique=False, drop=drop).merged()


# -- dates -----------------------------------------------------------------------------------
def _date(part: str) -> Callable[[Evaluation, list[Any]], Value]:
    def extract(seconds: float) -> float:
        if not math.isfinite(seconds):
            return math.nan
        moment = datetime.fromtimestamp(math.floor(seconds), UTC)
        if part == "year":
            return moment.year
        if part == "month":
            return moment.month
        if part == "day_of_month":
            return moment.day
        if part == "day_of_week":
            return (moment.weekday() + 1) % 7
        if part == "day_of_year":
            return moment.timetuple().tm_yday
        if part == "days_in_month":
            return calendar.monthrange(moment.year, moment.month)[1]
        if part == "hour":
            return moment.hour
        return moment.minute

    def handler(ev: Evaluation, args: list[Any]) -> Value:
        if args:
            vector = ev.eval_vector(args[0])
        else:
            vector = Vector([{}], ev.times.astype(np.float64)[None, :] / 1000,
                            np.ones((1, ev.steps), dtype=bool), None, unique=True)  # fmt: skip
        values = np.full(vector.values.shape, np.nan)
        cache: dict[float, float] = {}
        for i, s in zip(*np.nonzero(vector.present), strict=True):
            x = float(vector.values[i, s])
            if x not in cache:
                try:
                    cache[x] = extract(x)
                except (OverflowError, ValueError, OSError):
                    cache[x] = math.nan
            values[i, s] = cache[x]
        return _vector_out(ev, vector, values)

    return handler


def _sgn(values: Floats) -> Floats:
    return np.sign(values)


Handler = Callable[["Evaluation", list[Any]], Value]

FUNCTIONS: dict[str, Handler] = {
    "rate": lambda ev, a: _extrapolated(ev, a, is_counter=True, is_rate=True),
    "increase": lambda ev, a: _extrapolated(ev, a, is_counter=True, is_rate=False),
    "delta": lambda ev, a: _extrapolated(ev, a, is_counter=False, is_rate=False),
    "irate": lambda ev, a: _instant_delta(ev, a, is_rate=True),
    "idelta": lambda ev, a: _instant_delta(ev, a, is_rate=False),
    "deriv": _deriv,
    "predict_linear": _predict_linear,
    "resets": lambda ev, a: _count_changes(ev, a, resets=True),
    "changes": lambda ev, a: _count_changes(ev, a, resets=False),
    "sum_over_time": _sum_over_time,
    "avg_over_time": _avg_over_time,
    "count_over_time": _count_over_time,
    "present_over_time": _present_over_time,
    "last_over_time": _last_over_time,
    "min_over_time": _over_time("min"),
    "max_over_time": _over_time("max"),
    "quantile_over_time": _over_time("quantile"),
    "stddev_over_time": _over_time("stddev"),
    "stdvar_over_time": _over_time("stdvar"),
    "absent_over_time": _absent_over_time,
    "abs": _math(np.abs),
    "ceil": _math(np.ceil),
    "floor": _math(np.floor),
    "exp": _math(np.exp),
    "ln": _math(np.log),
    "log2": _math(np.log2),
    "log10": _math(np.log10),
    "sqrt": _math(np.sqrt),
    "sgn": _math(_sgn),
    "sin": _math(np.sin),
    "cos": _math(np.cos),
    "tan": _math(np.tan),
    "asin": _math(np.arcsin),
    "acos": _math(np.arccos),
    "atan": _math(np.arctan),
    "sinh": _math(np.sinh),
    "cosh": _math(np.cosh),
    "tanh": _math(np.tanh),
    "asinh": _math(np.arcsinh),
    "acosh": _math(np.arccosh),
    "atanh": _math(np.arctanh),
    "deg": _math(np.degrees),
    "rad": _math(np.radians),
    "pi": lambda ev, a: Scalar(np.full(ev.steps, math.pi)),
    "round": _round,
    "clamp": lambda ev, a: _clamp(ev, a, low=True, high=True),
    "clamp_min": lambda ev, a: _clamp(ev, a, low=True, high=False),
    "clamp_max": lambda ev, a: _clamp(ev, a, low=False, high=True),
    "time": _time,
    "vector": _vector,
    "scalar": _scalar,
    "timestamp": _timestamp,
    "absent": _absent,
    "label_replace": _label_replace,
    "label_join": _label_join,
    "sort": _sort(descending=False),
    "sort_desc": _sort(descending=True),
    "histogram_quantile": histograms.histogram_quantile,
    "histogram_fraction": histograms.histogram_fraction,
    "year": _date("year"),
    "month": _date("month"),
    "day_of_month": _date("day_of_month"),
    "day_of_week": _date("day_of_week"),
    "day_of_year": _date("day_of_year"),
    "days_in_month": _date("days_in_month"),
    "hour": _date("hour"),
    "minute": _date("minute"),
}
