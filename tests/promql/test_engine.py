"""The engine beyond the conformance files: a range query is its instant queries side by
side, and the guards (deadline, sample budget, regex safety, step limit) hold."""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lookout.errors import PromQLError
from lookout.query.promql import values as values_module
from lookout.query.promql.engine import Engine
from lookout.query.promql.model import STALE_NAN, Matcher
from lookout.query.promql.promqltest import MemoryStorage

QUERIES = [
    "m",
    "rate(m[1m])",
    "increase(m[90s])",
    "irate(m[1m])",
    "delta(m[2m])",
    "deriv(m[2m])",
    "resets(m[3m])",
    "changes(m[3m])",
    "sum_over_time(m[1m])",
    "avg_over_time(m[45s])",
    "max_over_time(m[1m])",
    "min_over_time(m[90s])",
    "count_over_time(m[2m])",
    "last_over_time(m[1m])",
    "quantile_over_time(0.3, m[2m])",
    "stddev_over_time(m[2m])",
    "sum by (job) (rate(m[1m]))",
    "max without (instance) (m)",
    "topk(2, m)",
    "m > bool 5",
    "m / on(job) group_left sum by (job) (m)",
    "m offset 30s",
    "max_over_time(m[2m:20s])",
    "absent(m{job='none'})",
    "timestamp(m)",
]


def _storage(data: list[list[float | None]]) -> MemoryStorage:
    storage = MemoryStorage()
    for i, points in enumerate(data):
        labels = {"__name__": "m", "job": f"j{i % 2}", "instance": f"i{i}"}
        # Non-round per-series offsets put samples off the step grid.
        samples = [(k * 10_000 + 1_337 * i, p) for k, p in enumerate(points) if p is not None]
        storage.add(labels, samples)
    return storage


def _same(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    # promqltest's own tolerance: running sums may round differently from a lone window.
    return a == b or abs(a - b) <= 1e-6 * max(abs(a), abs(b))


value = st.one_of(
    st.none(),
    st.floats(min_value=0, max_value=1000, allow_nan=False),
    st.just(STALE_NAN),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.lists(st.lists(value, min_size=5, max_size=40), min_size=1, max_size=4),
    query=st.sampled_from(QUERIES),
    start=st.integers(min_value=0, max_value=200_000),
    step=st.sampled_from([5_000, 10_000, 15_000, 30_000, 60_000]),
    steps=st.integers(min_value=1, max_value=30),
)
def test_a_range_query_is_its_instant_queries_side_by_side(
    data: list[list[float | None]], query: str, start: int, step: int, steps: int
) -> None:
    """The vectorized range evaluation (shared windows, prefix sums, per-step matching)
    gives what evaluating each step alone gives, with windows searched both ways (row by
    row, and all rows in one array)."""
    saved = values_module.ROW_SEARCH_MIN_SAMPLES
    try:
        for threshold in (0, 10**9):
            values_module.ROW_SEARCH_MIN_SAMPLES = threshold
            _check_range_is_instants(data, query, start, step, steps)
    finally:
        values_module.ROW_SEARCH_MIN_SAMPLES = saved


def _check_range_is_instants(
    data: list[list[float | None]], query: str, start: int, step: int, steps: int
) -> None:
    engine = Engine(_storage(data))
    end = start + (steps - 1) * step
    ranged = engine.range(query, start, end, step)
    by_labels = {tuple(sorted(s.labels.items())): dict(s.points) for s in ranged.series}
    for t in range(start, end + 1, step):
        instant = engine.instant(query, t)
        got = {tuple(sorted(s.labels.items())): s.points[0][1] for s in instant.series}
        want = {k: v[t] for k, v in by_labels.items() if t in v}
        assert got.keys() == want.keys(), (query, t)
        for key, number in got.items():
            assert _same(number, want[key]), (query, t, key, number, want[key])


def test_the_property_catches_a_window_reused_one_step_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Negative control: a range query that reuses window starts one step off (the kind of
    slip the shared-window shortcut could make) fails the property."""
    data: list[list[float | None]] = [[float(k * k) for k in range(30)]]
    _check_range_is_instants(data, "sum_over_time(m[1m])", 60_000, 10_000, 10)
    windows = values_module.Matrix.windows

    def off_by_one(self: values_module.Matrix) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[type-arg]
        lo, hi = windows(self)
        if lo.shape[1] > 1:
            lo = lo.copy()
            lo[:, 1:] = lo[:, :-1]
        return lo, hi

    monkeypatch.setattr(values_module.Matrix, "windows", off_by_one)
    with pytest.raises(AssertionError):
        _check_range_is_instants(data, "sum_over_time(m[1m])", 60_000, 10_000, 10)


def test_a_slow_query_stops_at_its_deadline() -> None:
    storage = MemoryStorage()
    for i in range(300):
        storage.add({"__name__": "m", "i": str(i)}, [(k * 1000, float(k)) for k in range(600)])
    engine = Engine(storage)
    query = "quantile_over_time(0.5, m[10m:1s])"
    started = time.monotonic()
    with pytest.raises(PromQLError) as caught:
        engine.range(query, 0, 600_000, 1000, timeout_s=0.2)
    assert caught.value.error_type == "timeout"
    assert time.monotonic() - started < 5  # stopped near 0.2 s, not after the whole query


def test_more_samples_than_the_budget_is_an_execution_error() -> None:
    storage = MemoryStorage()
    storage.add({"__name__": "m"}, [(k * 1000, 1.0) for k in range(1000)])
    assert Engine(storage, max_samples=1000).instant("sum_over_time(m[1h])", 1_000_000)
    with pytest.raises(PromQLError) as caught:
        Engine(storage, max_samples=999).instant("sum_over_time(m[1h])", 1_000_000)
    assert caught.value.error_type == "execution"
    assert caught.value.status == 422


def test_more_than_11000_points_per_series_is_bad_data() -> None:
    engine = Engine(MemoryStorage())
    engine.range("1", 0, 11_000_000, 1000)  # (end - start) / step = 11,000 is allowed
    with pytest.raises(PromQLError) as caught:
        engine.range("1", 0, 11_001_000, 1000)
    assert caught.value.error_type == "bad_data"
    assert "11,000 points" in str(caught.value)


def test_a_pathological_regex_matches_in_linear_time() -> None:
    """RE2: `(a+)+$` against 'aaaa…b' is instant; a backtracking engine would take ages."""
    value = "a" * 50_000 + "b"
    matcher = Matcher("l", "=~", "(a+)+$")
    started = time.monotonic()
    assert not matcher.matches(value)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("query", "error_type"),
    [
        ("sum(", "bad_data"),
        ("m @ -10", "bad_data"),
        ("m{a=~'('}", "bad_data"),
        ("", "bad_data"),
        ('"text"[5m]', "bad_data"),
        ("m + fill(0) m", "bad_data"),  # experimental in Prometheus: refused, not ignored
    ],
)
def test_bad_queries_are_bad_data(query: str, error_type: str) -> None:
    with pytest.raises(PromQLError) as caught:
        Engine(MemoryStorage()).instant(query, 0)
    assert caught.value.error_type == error_type
    assert caught.value.status == 400


def test_a_range_query_of_a_string_is_refused() -> None:
    with pytest.raises(PromQLError, match="invalid expression type"):
        Engine(MemoryStorage()).range('"text"', 0, 60_000, 15_000)


bound = st.sampled_from([-1.0, -0.5, 0.0, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, math.inf])


@settings(max_examples=300, deadline=None)
@given(
    bounds=st.lists(bound, min_size=1, max_size=8),
    columns=st.lists(
        st.tuples(
            st.one_of(st.sampled_from([math.nan, -0.5, 0.0, 1.0, 1.5]), st.floats(0, 1)),
            st.lists(st.floats(0, 100, allow_nan=False), min_size=8, max_size=8),
        ),
        min_size=1,
        max_size=6,
    ),
)
def test_the_all_steps_quantile_is_the_one_step_quantile(
    bounds: list[float], columns: list[tuple[float, list[float]]]
) -> None:
    """histogram_quantile's vectorized path answers bit for bit what the per-step one does,
    for unsorted, duplicate, non-monotonic and +Inf-less buckets and any quantile."""
    from lookout.query.promql.histograms import bucket_quantile, bucket_quantiles

    edges = np.array(bounds)
    q = np.array([c[0] for c in columns])
    counts = np.array([c[1][: len(bounds)] for c in columns]).T
    values, forced = bucket_quantiles(q, edges, counts)
    for s in range(len(columns)):
        one, one_forced = bucket_quantile(float(q[s]), edges, counts[:, s])
        assert (math.isnan(one) and math.isnan(values[s])) or one == values[s], (s, one, values[s])
        assert one_forced == bool(forced[s])
