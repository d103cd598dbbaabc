"""How promqltest judges an answer: Prometheus's compareResult and checkAnnotations.

Values compare with util/almost.Equal (relative tolerance 1e-6, NaN equals NaN, a staleness
marker only equals another); a vector is compared as a set unless the eval is `ordered`; a
range result must be sorted by labels and have exactly the expected points. Each function
returns the first difference as a short "expected ..., got ..." message, or None.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
from collections.abc import Mapping, Sequence

from lookout.query.promql.model import QueryResult, ResultSeries, is_stale
from lookout.query.promql.promqltest_format import (
    AnnotationExpectation,
    Eval,
    ExpectedSeries,
    LabelsKey,
    Point,
    labels_key,
)

EPSILON = 0.000001  # relative error allowed between an expected and an actual value
_MIN_NORMAL = 2.2250738585072014e-308  # the smallest positive normal float64


def almost_equal(a: float, b: float, epsilon: float = EPSILON) -> bool:
    """Prometheus's util/almost.Equal: relative tolerance, NaN equals NaN, and a staleness
    marker equals only another staleness marker."""
    if is_stale(a) or is_stale(b):
        return is_stale(a) and is_stale(b)
    if math.isnan(a) and math.isnan(b):
        return True
    if a == b:
        return True
    abs_sum = abs(a) + abs(b)
    diff = abs(a - b)
    if a == 0 or b == 0 or abs_sum < _MIN_NORMAL:
        return diff < epsilon * _MIN_NORMAL
    return diff / min(abs_sum, sys.float_info.max) < epsilon


def format_value(value: float) -> str:
    if is_stale(value):
        return "stale"
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(value)
    return text.removesuffix(".0")


def format_labels(labels: Mapping[str, str]) -> str:
    name = labels.get("__name__", "")
    rest = ", ".join(f"{k}={json.dumps(v)}" for k, v in sorted(labels.items()) if k != "__name__")
    return f"{name}{{{rest}}}"


def _format_points(points: Sequence[tuple[int, float]], limit: int = 6) -> str:
    shown = [f"{format_value(v)} @{t / 1000:g}s" for t, v in points[:limit]]
    more = f" ... ({len(points)} points)" if len(points) > limit else ""
    return "[" + ", ".join(shown) + more + "]"


def _expected_value(point: Point) -> float:
    return point if isinstance(point, float) else 0.0  # Prometheus reads `_` as 0 here


def _labels_order(labels: Mapping[str, str]) -> list[tuple[str, str]]:
    return sorted(labels.items())  # labels.Compare: pairwise by name then value, then length


def compare(ev: Eval, result: QueryResult, *, as_matrix: bool) -> str | None:
    """Prometheus's compareResult: the first difference between `ev` and `result`, or None."""
    if as_matrix or result.result_type == "matrix":
        return _compare_matrix(ev, result.series)
    if result.result_type == "vector":
        return compare_vector(ev, [(s.labels, s.points[-1][1]) for s in result.series if s.points])
    if result.result_type == "scalar":
        value = result.series[0].points[-1][1] if result.series else math.nan
        return compare_scalar(ev, value)
    expected = ev.expected_string or ""
    if result.text != expected:
        return f"expected string {expected!r}, got {result.text!r}"
    return None


def compare_scalar(ev: Eval, value: float) -> str | None:
    if not ev.expect_scalar:
        return f"expected a vector or matrix, got scalar {format_value(value)}"
    expected = _expected_value(ev.scalar)
    if not almost_equal(expected, value):
        return f"expected scalar {format_value(expected)}, got {format_value(value)}"
    return None


def compare_vector(ev: Eval, samples: list[tuple[dict[str, str], float]]) -> str | None:
    if ev.expect_scalar:
        shown = ", ".join(f"{format_labels(lb)} {format_value(v)}" for lb, v in samples[:3])
        return f"expected scalar {format_value(_expected_value(ev.scalar))}, got vector [{shown}]"
    seen: set[LabelsKey] = set()
    for index, (labels, value) in enumerate(samples):
        key = labels_key(labels)
        expected = ev.expected.get(key)
        if expected is None:
            return f"unexpected series {format_labels(labels)} {format_value(value)} in result"
        if ev.ordered and expected.position != index + 1:
            return (
                f"expected {format_labels(labels)} at position {expected.position}, "
                f"got it at {index + 1}"
            )
        want = _expected_value(expected.points[0])
        if not almost_equal(want, value):
            return (
                f"expected {format_labels(labels)} {format_value(want)}, got {format_value(value)}"
            )
        seen.add(key)
    return _missing(ev, seen)


def _missing(ev: Eval, seen: set[LabelsKey]) -> str | None:
    for key, expected in ev.expected.items():
        if key not in seen:
            return f"expected series {format_labels(expected.labels)} is not in the result"
    return None


def unsorted(series: Sequence[ResultSeries]) -> str | None:
    for before, after in itertools.pairwise(series):
        if _labels_order(before.labels) > _labels_order(after.labels):
            return (
                "a matrix must be sorted by labels, but "
                f"{format_labels(before.labels)} comes before {format_labels(after.labels)}"
            )
    return None


def _compare_matrix(ev: Eval, series: list[ResultSeries]) -> str | None:
    if ev.ordered:
        return "expected an ordered result, but the query returned a matrix"
    if ev.expect_scalar:
        return f"expected scalar {format_value(_expected_value(ev.scalar))}, got a matrix"
    problem = unsorted(series)
    seen: set[LabelsKey] = set()
    for s in series:
        if problem:
            break
        key = labels_key(s.labels)
        expected = ev.expected.get(key)
        if expected is None:
            return f"unexpected series {format_labels(s.labels)} {_format_points(s.points)}"
        seen.add(key)
        problem = _compare_points(ev, expected, s)
    return problem or _missing(ev, seen)


def _compare_points(ev: Eval, expected: ExpectedSeries, got: ResultSeries) -> str | None:
    """Point i of an expected series is at start + i * step; `_` means no point there."""
    name = format_labels(got.labels)
    wanted: list[tuple[int, float]] = []
    for i, point in enumerate(expected.points):
        t = ev.start_ms + i * ev.step_ms
        if not (ev.is_range or ev.range_vector) or t > ev.end_ms:
            return (
                f"expected {len(expected.points)} points for {name}, but the query's time "
                "range cannot return this many"
            )
        if isinstance(point, float):
            wanted.append((t, point))
    if len(wanted) != len(got.points):
        return (
            f"expected {len(wanted)} points for {name}, got {len(got.points)}: "
            f"{_format_points(got.points)}"
        )
    for (want_t, want), (got_t, value) in zip(wanted, got.points, strict=True):
        if want_t != got_t:
            return (
                f"expected a point at {want_t / 1000:g}s for {name}, got one at "
                f"{got_t / 1000:g}s: {_format_points(got.points)}"
            )
        if not almost_equal(want, value):
            return (
                f"expected {format_value(want)} at {got_t / 1000:g}s for {name}, "
                f"got {format_value(value)}"
            )
    return None


def check_annotations(ev: Eval, result: QueryResult) -> str | None:
    """Prometheus's checkAnnotations: every expected one found, no unexpected ones."""
    if ev.warn_required and not result.warnings:
        return "expected warnings, got none"
    if ev.info_required and not result.infos:
        return "expected info annotations, got none"
    problem = _check_kind("warn", ev.warns, result.warnings) or _check_kind(
        "info", ev.infos, result.infos
    )
    if problem:
        return problem
    if ev.no_warn and result.warnings:
        return f"expected no warnings, got {result.warnings}"
    if ev.no_info and result.infos:
        return f"expected no info annotations, got {result.infos}"
    return None


def _check_kind(
    kind: str, expected: Sequence[AnnotationExpectation], actual: Sequence[str]
) -> str | None:
    if not expected:
        return None
    if not actual:
        return f"expected {kind} annotations, got none"
    for want in expected:
        if not any(want.matches(text) for text in actual):
            return f"expected a {kind} annotation matching {want}, got {list(actual)}"
    for text in actual:
        if not any(want.matches(text) for want in expected):
            return f"unexpected {kind} annotation {text!r}"
    return None
