"""`histogram_quantile` and `histogram_fraction` over classic histograms: `_bucket` series
with an `le` label, grouped by their other labels (the metric name included), as Prometheus
3 reads them. Native histograms are out of scope (docs/promql.md)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from lookout.query.promql import positions
from lookout.query.promql.aggregate import warn_quantile
from lookout.query.promql.model import Floats
from lookout.query.promql.values import NAME, Labels, Value, Vector

if TYPE_CHECKING:
    from lookout.query.promql.engine import Evaluation


def _bucket_groups(
    ev: Evaluation, vector: Vector, fn_name: str, argument: int
) -> tuple[list[Labels], list[tuple[Floats, list[int]]]]:
    """Series grouped by their labels without `le`: each group's upper bounds and rows.
    The metric name is part of the group (and dropped from the result), so two histograms
    that differ only by name collide in the result, as in Prometheus."""
    groups: dict[tuple[tuple[str, str], ...], tuple[Labels, list[float], list[int]]] = {}
    for i, lb in enumerate(vector.labels):
        text = lb.get("le")
        try:
            bound = float(text) if text is not None else math.nan
        except ValueError:
            bound = math.nan
        if text is None or math.isnan(bound):
            name = lb.get(NAME, "")
            ev.warn(f'bucket label "le" is missing or has a malformed value of "{text or ""}" '
                    f'for metric name "{name}"',
                    positions.argument_position(ev.query, fn_name, argument))  # fmt: skip
            continue
        out = {k: v for k, v in lb.items() if k not in ("le", NAME)}
        key = (*tuple(sorted(out.items())), ("", lb.get(NAME, "")))
        if ev.engine.delayed_name_removal and NAME in lb:
            out[NAME] = lb[NAME]
        group = groups.setdefault(key, (out, [], []))
        group[1].append(bound)
        group[2].append(i)
    labels = [g[0] for g in groups.values()]
    return labels, [(np.asarray(g[1]), g[2]) for g in groups.values()]


def _has_duplicates(sorted_bounds: Floats) -> bool:
    """Two equal upper bounds (`le="1"` and `le="1.0"`), infinities included."""
    return bool((sorted_bounds[1:] == sorted_bounds[:-1]).any())


def _coalesce(bounds: Floats, counts: Floats) -> tuple[Floats, Floats]:
    order = np.argsort(bounds, kind="stable")
    bounds, counts = bounds[order], counts[order]
    if len(bounds) > 1 and _has_duplicates(bounds):
        unique, index = np.unique(bounds, return_inverse=True)
        summed = np.zeros(len(unique))
        np.add.at(summed, index, counts)
        return unique, summed
    return bounds, counts


def bucket_quantile(q: float, bounds: Floats, counts: Floats) -> tuple[float, bool]:
    """Prometheus's bucketQuantile over classic buckets; also says whether the counts had to
    be made monotonic."""
    if math.isnan(q):
        return math.nan, False
    if q < 0:
        return -math.inf, False
    if q > 1:
        return math.inf, False
    bounds, counts = _coalesce(bounds, counts)
    if len(bounds) == 0 or not math.isinf(bounds[-1]) or bounds[-1] < 0:
        return math.nan, False
    fixed = np.maximum.accumulate(counts)
    forced = bool((fixed != counts).any())
    counts = fixed
    if len(bounds) < 2:
        return math.nan, forced
    observations = counts[-1]
    if observations == 0 or math.isnan(observations):
        return math.nan, forced
    rank = q * observations
    b = int(np.searchsorted(counts, rank, side="left"))
    b = min(b, len(counts) - 1)
    if b == len(counts) - 1:
        return float(bounds[-2]), forced
    if b == 0 and bounds[0] <= 0:
        return float(bounds[0]), forced
    start, end, count = 0.0, float(bounds[b]), float(counts[b])
    if b > 0:
        start = float(bounds[b - 1])
        count -= float(counts[b - 1])
        rank -= float(counts[b - 1])
    return start + (end - start) * (rank / count), forced


def bucket_quantiles(q: Floats, bounds: Floats, counts: Floats) -> tuple[Floats, Any]:
    """bucket_quantile() for many steps at once: `counts` has a row per bucket (matching
    `bounds`) and a column per step, none missing or NaN. The same operations in the same
    order, so each column's answer is bit for bit the one bucket_quantile() gives."""
    steps = counts.shape[1]
    values = np.full(steps, np.nan)
    forced = np.zeros(steps, dtype=bool)
    order = np.argsort(bounds, kind="stable")
    bounds, counts = bounds[order], counts[order]
    if len(bounds) > 1 and _has_duplicates(bounds):
        unique, index = np.unique(bounds, return_inverse=True)
        summed = np.zeros((len(unique), steps))
        np.add.at(summed, index, counts)
        bounds, counts = unique, summed
    if len(bounds) and math.isinf(bounds[-1]) and bounds[-1] > 0:
        fixed = np.maximum.accumulate(counts, axis=0)
        forced = (fixed != counts).any(axis=0)
        if len(bounds) >= 2:
            with np.errstate(all="ignore"):
                values = _interpolate(q, bounds, fixed)
    # What bucket_quantile() answers before it looks at the buckets.
    values = np.where(q > 1, np.inf, values)
    values = np.where(q < 0, -np.inf, values)
    values = np.where(np.isnan(q), np.nan, values)
    forced &= ~(np.isnan(q) | (q < 0) | (q > 1))
    return values, forced


def _interpolate(q: Floats, bounds: Floats, counts: Floats) -> Floats:
    nb = len(bounds)
    columns = np.arange(counts.shape[1])
    observations = counts[-1]
    rank = q * observations
    reached = counts >= rank[None, :]
    b = np.where(reached.any(axis=0), reached.argmax(axis=0), nb - 1)
    before = np.maximum(b - 1, 0)
    start = np.where(b > 0, bounds[before], 0.0)
    end = bounds[b]
    below = np.where(b > 0, counts[before, columns], 0.0)
    count = counts[b, columns] - below
    values = start + (end - start) * ((rank - below) / count)
    values = np.where(b == nb - 1, bounds[-2], values)
    values = np.where((b == 0) & (bounds[0] <= 0), bounds[0], values)
    return np.where((observations == 0) | np.isnan(observations), np.nan, values)


def bucket_fraction(lower: float, upper: float, bounds: Floats, counts: Floats) -> float:
    """The share of observations in [lower, upper], interpolating linearly inside finite
    buckets. A bucket of infinite width is never interpolated into: a bound inside it counts
    as its finite edge. The first bucket starts at 0 when its upper bound is positive."""
    bounds, counts = _coalesce(bounds, counts)
    if len(bounds) == 0 or not math.isinf(bounds[-1]) or bounds[-1] < 0:
        return math.nan
    total = float(counts[-1])
    if total == 0 or math.isnan(total) or math.isnan(lower) or math.isnan(upper):
        return math.nan
    if lower >= upper:
        return 0.0

    def rank(x: float) -> float:
        below = 0.0
        for i, end in enumerate(bounds.tolist()):
            start = (0.0 if end > 0 else -math.inf) if i == 0 else float(bounds[i - 1])
            cum = float(counts[i])
            if x <= start:
                return below
            if x < end:
                if math.isinf(start):
                    return cum
                if math.isinf(end):
                    return below
                return float(below + (cum - below) * (x - start) / (end - start))
            below = cum
        return total

    return (rank(upper) - rank(lower)) / total


_QUANTILE_DOCS = (
    "https://prometheus.io/docs/prometheus/latest/querying/functions/#histogram_quantile"
)


def histogram_quantile(ev: Evaluation, args: list[Any]) -> Value:
    phi = ev.eval_scalar(args[0]).values
    vector = ev.eval_vector(args[1])
    warn_quantile(ev, phi, positions.argument_position(ev.query, "histogram_quantile", 0))
    labels, groups = _bucket_groups(ev, vector, "histogram_quantile", 1)
    steps = ev.steps
    values = np.full((len(groups), steps), np.nan)
    present = np.zeros((len(groups), steps), dtype=bool)
    for g, (bounds, rows) in enumerate(groups):
        ev.check()
        p = vector.present[rows]
        v = vector.values[rows]
        present[g] = p.any(axis=0)
        # Steps where every bucket is there (the usual case) go all at once.
        whole = p.all(axis=0) & ~np.isnan(v).any(axis=0)
        forced = np.zeros(steps, dtype=bool)
        if whole.any():
            values[g, whole], forced[whole] = bucket_quantiles(phi[whole], bounds, v[:, whole])
        for s in np.flatnonzero(present[g] & ~whole):
            live = p[:, s]
            values[g, s], forced[s] = bucket_quantile(float(phi[s]), bounds[live], v[live, s])
        if forced.any():
            name = vector.labels[rows[0]].get(NAME, "")
            ev.info(f"input to histogram_quantile needed to be fixed for monotonicity "
                    f"(see {_QUANTILE_DOCS}) for metric name \"{name}\"",
                    positions.argument_position(ev.query, "histogram_quantile", 1))  # fmt: skip
    flags = np.ones(len(labels), dtype=bool) if ev.engine.delayed_name_removal else None
    return Vector(labels, values, present, None, unique=False, drop=flags).merged()


def histogram_fraction(ev: Evaluation, args: list[Any]) -> Value:
    lower = ev.eval_scalar(args[0]).values
    upper = ev.eval_scalar(args[1]).values
    vector = ev.eval_vector(args[2])
    labels, groups = _bucket_groups(ev, vector, "histogram_fraction", 2)
    steps = ev.steps
    values = np.full((len(groups), steps), np.nan)
    present = np.zeros((len(groups), steps), dtype=bool)
    for g, (bounds, rows) in enumerate(groups):
        p = vector.present[rows]
        v = vector.values[rows]
        for s in np.flatnonzero(p.any(axis=0)):
            live = p[:, s]
            values[g, s] = bucket_fraction(
                float(lower[s]), float(upper[s]), bounds[live], v[live, s]
            )
            present[g, s] = True
    flags = np.ones(len(labels), dtype=bool) if ev.engine.delayed_name_removal else None
    return Vector(labels, values, present, None, unique=False, drop=flags).merged()
