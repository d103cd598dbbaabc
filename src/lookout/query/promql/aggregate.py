"""Aggregation operators: sum, avg, min, max, count, count_values, stddev, stdvar, topk,
bottomk, quantile and group, with `by` and `without`.

Sums use NumPy's pairwise summation when every input is finite and below 1e12 in size (the
error is then far under the 1e-6 that matters); otherwise they run Prometheus's
Kahan-Neumaier summation row by row, so cancellations such as 1e100 + 1 - 1e100 come out as
Prometheus's do.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import numpy as np

from lookout.errors import PromQLError
from lookout.query.promql import positions
from lookout.query.promql.model import Floats
from lookout.query.promql.values import (
    RESERVED,
    Labels,
    Mask,
    Scalar,
    String,
    Value,
    Vector,
)

if TYPE_CHECKING:
    from lookout.query.promql.engine import Evaluation

SAFE_MAGNITUDE = 1e12


def _grouping(node: Any) -> tuple[bool, list[str]]:
    """(without, labels)."""
    modifier = node.modifier
    if modifier is None:
        return False, []
    return str(modifier.type).endswith("Without"), list(modifier.labels)


def _group_labels(labels: Labels, without: bool, names: list[str]) -> Labels:
    if without:
        dropped = set(names) | RESERVED
        return {k: v for k, v in labels.items() if k not in dropped}
    return {n: labels[n] for n in names if labels.get(n, "")}


def _groups(
    vector: Vector, without: bool, names: list[str]
) -> tuple[list[Labels], list[list[int]]]:
    """The output labels of each group and the rows in it, in order of first appearance.
    With `by`, the key is the listed labels' values (an absent label and an empty one are
    the same): no dict per row until a group is new."""
    found: dict[Any, int] = {}
    out_labels: list[Labels] = []
    rows: list[list[int]] = []
    wanted = list(dict.fromkeys(names))
    for i, labels in enumerate(vector.labels):
        if without:
            group = _group_labels(labels, without, names)
            key: Any = tuple(sorted(group.items()))
        else:
            key = tuple(labels.get(n, "") for n in wanted)
        index = found.get(key)
        if index is None:
            index = found[key] = len(out_labels)
            out_labels.append(group if without else _group_labels(labels, without, names))
            rows.append([])
        rows[index].append(i)
    return out_labels, rows


def kahan_sum_rows(values: Floats, present: Mask) -> Floats:
    """Prometheus's kahanSumInc over the rows (axis 0), vectorized across steps."""
    total = np.zeros(values.shape[1])
    comp = np.zeros(values.shape[1])
    with np.errstate(all="ignore"):
        for row, mask in zip(values, present, strict=True):
            inc = np.where(mask, row, 0.0)
            t = total + inc
            big = np.abs(total) >= np.abs(inc)
            comp = comp + np.where(big, (total - t) + inc, (inc - t) + total)
            comp = np.where(np.isinf(t), 0.0, comp)
            total = t
    return total + comp


def floats(value: Any) -> Floats:
    """A NumPy result as a float array (NumPy's reductions are typed as Any)."""
    return np.asarray(value, dtype=np.float64)


def _safe(values: Floats, present: Mask) -> bool:
    picked = values[present]
    return bool(np.isfinite(picked).all() and (np.abs(picked) < SAFE_MAGNITUDE).all())


def group_sum(values: Floats, present: Mask) -> Floats:
    if _safe(values, present):
        return floats(np.where(present, values, 0.0).sum(axis=0))
    return kahan_sum_rows(values, present)


def evaluate(ev: Evaluation, node: Any) -> Value:
    op = str(node.op)
    without, names = _grouping(node)
    param: Any = None
    if node.param is not None:
        param = ev.eval(node.param)
    vector = ev.eval_vector(node.expr)
    ev.check()
    steps = ev.steps
    if op == "count_values":
        if not isinstance(param, String):
            raise PromQLError("count_values needs a string label name", "bad_data")
        if not ev.label_name_ok(param.text):
            raise PromQLError(f"invalid label name {param.text!r}", "execution")
        return _count_values(vector, param.text, without, names, steps)
    if op in ("limitk", "limit_ratio"):
        raise PromQLError(f"{op} is experimental in Prometheus and not supported by Lookout",
                          "bad_data")  # fmt: skip
    if op in ("topk", "bottomk"):
        if not isinstance(param, Scalar):
            raise PromQLError(f"{op} needs a scalar parameter", "bad_data")
        return _topk(vector, param.values, top=op == "topk", without=without, names=names)
    out_labels, groups = _groups(vector, without, names)
    if not groups:
        return Vector.empty(steps)
    n = len(groups)
    values = np.full((n, steps), np.nan)
    present = np.zeros((n, steps), dtype=bool)
    phi: Floats | None = None
    if op == "quantile":
        if not isinstance(param, Scalar):
            raise PromQLError("quantile needs a scalar parameter", "bad_data")
        phi = param.values
        warn_quantile(ev, phi, positions.argument_position(ev.query, "quantile", 0))
    with np.errstate(all="ignore"):
        for g, rows in enumerate(groups):
            v = vector.values[rows]
            p = vector.present[rows]
            present[g] = p.any(axis=0)
            values[g] = _reduce(op, v, p, phi)
    drop = None
    if vector.drop is not None:  # a kept name is dropped if any of its inputs drops it
        drop = np.array([bool(vector.drop[rows].any()) for rows in groups], dtype=bool)
    return Vector(out_labels, values, present, None, unique=True, drop=drop)


def _reduce(op: str, v: Floats, p: Mask, phi: Floats | None) -> Floats:
    """One group's aggregate at every step: rows are its series, columns the steps."""
    if op == "sum":
        return group_sum(v, p)
    if op == "avg":
        return _mean(v, p, p.sum(axis=0))
    if op == "count":
        return floats(p.sum(axis=0))
    if op == "group":
        return np.ones(v.shape[1])
    if op == "max":
        return floats(np.fmax.reduce(np.where(p, v, np.nan), axis=0))  # NaN only when all are
    if op == "min":
        return floats(np.fmin.reduce(np.where(p, v, np.nan), axis=0))
    if op in ("stddev", "stdvar"):
        var = welford_variance(v, p)
        return floats(np.sqrt(var)) if op == "stddev" else var
    if op == "quantile":
        assert phi is not None
        out = np.full(v.shape[1], np.nan)
        for s in np.flatnonzero(p.any(axis=0)):
            out[s] = quantile(float(phi[s]), v[p[:, s], s])
        return out
    raise PromQLError(f"unsupported aggregation {op}", "bad_data")


def go_g(value: float) -> str:
    """A float as Go's %g writes it (NaN, +Inf, -Inf)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return f"{value:g}"


def warn_quantile(ev: Evaluation, phi: Floats, position: str) -> None:
    bad = np.isnan(phi) | (phi < 0) | (phi > 1)
    if bad.any():
        ev.warn(f"quantile value should be between 0 and 1, got {go_g(float(phi[bad][0]))}",
                position)  # fmt: skip


def _kahan_inc(inc: Floats, total: Floats, comp: Floats) -> tuple[Floats, Floats]:
    t = total + inc
    big = np.abs(total) >= np.abs(inc)
    comp = comp + np.where(big, (total - t) + inc, (inc - t) + total)
    comp = np.where(np.isinf(t), 0.0, comp)
    return t, comp


def welford_variance(v: Floats, p: Mask) -> Floats:
    """Population variance as Prometheus computes it: Welford's online update with Kahan
    compensated sums, row by row, vectorized across steps (equal values give exactly 0)."""
    steps = v.shape[1]
    count = np.zeros(steps)
    mean = np.zeros(steps)
    c_mean = np.zeros(steps)
    aux = np.zeros(steps)
    c_aux = np.zeros(steps)
    with np.errstate(all="ignore"):
        for row, mask in zip(v, p, strict=True):
            if not mask.any():
                continue
            new_count = count + mask
            delta = row - (mean + c_mean)
            inc = np.where(mask, delta / np.where(mask, new_count, 1.0), 0.0)
            new_mean, new_c = _kahan_inc(inc, mean, c_mean)
            mean = np.where(mask, new_mean, mean)
            c_mean = np.where(mask, new_c, c_mean)
            inc = np.where(mask, delta * (row - (mean + c_mean)), 0.0)
            new_aux, new_caux = _kahan_inc(inc, aux, c_aux)
            aux = np.where(mask, new_aux, aux)
            c_aux = np.where(mask, new_caux, c_aux)
            count = new_count
        return floats((aux + c_aux) / count)


def _mean(v: Floats, p: Mask, count: Any) -> Floats:
    if _safe(v, p):
        return floats(np.where(p, v, 0.0).sum(axis=0) / count)
    total = kahan_sum_rows(v, p)
    mean = total / count
    overflow = np.isinf(total) & np.isfinite(np.where(p, v, 0.0)).all(axis=0)
    if overflow.any():  # incremental mean, as Prometheus falls back to
        for s in np.flatnonzero(overflow):
            m = 0.0
            for k, x in enumerate(v[p[:, s], s].tolist(), 1):
                m += x / k - m / k
            mean[s] = m
    return floats(mean)


def quantile(q: float, values: Floats) -> float:
    """Prometheus's quantile: linear interpolation between the closest ranks."""
    if len(values) == 0 or math.isnan(q):
        return math.nan
    if q < 0:
        return -math.inf
    if q > 1:
        return math.inf
    ordered = np.sort(values)
    nans = np.isnan(ordered)
    if nans.any():  # NaN sorts first, as Go's cmp.Compare orders it
        ordered = np.concatenate([ordered[nans], ordered[~nans]])
    n = len(ordered)
    rank = q * (n - 1)
    lower = max(0, math.floor(rank))
    upper = min(n - 1, lower + 1)
    weight = rank - math.floor(rank)
    return float(ordered[lower] * (1 - weight) + ordered[upper] * weight)


def _topk(
    vector: Vector, k_values: Floats, *, top: bool, without: bool, names: list[str]
) -> Vector:
    """Per step and group, the k largest (smallest) samples; NaN ranks last either way, ties
    keep input order. Each group is ranked at every step in one stable argsort. An instant
    query lists them group by group in rank order, as Prometheus does."""
    _, groups = _groups(vector, without, names)
    steps = vector.values.shape[1]
    if np.isnan(k_values).any():
        raise PromQLError("Parameter value is NaN", "execution")
    ks = np.where(k_values >= 1, np.minimum(k_values, 2**62), 0).astype(np.int64)
    present = np.zeros_like(vector.present)
    rank_of: dict[int, tuple[int, int]] = {}
    worst = -np.inf if top else np.inf
    for g, rows in enumerate(groups):
        index = np.asarray(rows, dtype=np.intp)
        live = vector.present[index]
        key = np.where(live & ~np.isnan(vector.values[index]), vector.values[index], worst)
        # Absent samples sort after every present one, NaN ones included.
        order = np.argsort(-key if top else key, axis=0, kind="stable")
        live_sorted = np.take_along_axis(live, order, axis=0)
        tier = np.where(live_sorted, 0, 1)
        order = np.take_along_axis(order, np.argsort(tier, axis=0, kind="stable"), axis=0)
        ranks = np.arange(len(rows))[:, None]
        chosen = (ranks < ks[None, :]) & np.take_along_axis(live, order, axis=0)
        picked_rows, picked_steps = np.nonzero(chosen)
        present[index[order[picked_rows, picked_steps]], picked_steps] = True
        if steps == 1:
            for rank, position in enumerate(order[chosen[:, 0], 0].tolist()):
                rank_of[rows[position]] = (g, rank)
    out = Vector(
        vector.labels, vector.values, present, None, unique=vector.unique, drop=vector.drop
    )
    if rank_of:
        out = out.take(sorted(rank_of, key=rank_of.__getitem__))
    return out


def _count_values(
    vector: Vector, label: str, without: bool, names: list[str], steps: int
) -> Vector:
    from lookout.query.promql.engine import go_float

    counts: dict[tuple[tuple[str, str], ...], Floats] = {}
    out_labels: dict[tuple[tuple[str, str], ...], Labels] = {}
    for i, labels in enumerate(vector.labels):
        base = _group_labels(labels, without, names)
        for s in np.flatnonzero(vector.present[i]):
            out = dict(base)
            out[label] = go_float(float(vector.values[i, s]))
            key = tuple(sorted(out.items()))
            if key not in counts:
                counts[key] = np.zeros(steps)
                out_labels[key] = out
            counts[key][s] += 1
    if not counts:
        return Vector.empty(steps)
    keys = list(counts)
    values = np.array([counts[k] for k in keys])
    return Vector([out_labels[k] for k in keys], values, values > 0, None, unique=True)
