"""Debian's promtool (Prometheus 2.42) as a second oracle for the engine.

Each case's series and queries run through Lookout's engine; its answers become the expected
samples of a `promtool test rules` unit test, which Prometheus then evaluates itself. The
cases avoid what 3.0 changed: every evaluation time sits between samples, so no sample falls
on a range or lookback window's edge (2.x closed windows on the left, 3.x opens them).

promtool compares floats exactly, and the two engines may round the last bit differently
(the order of additions differs), so the test reads promtool's report of what it got and
holds the two answers to a relative 1e-9 instead.

Where 2.42 and the shared conformance files disagree, the files win; the cases below stay
clear of those differences (DIFFERENT_IN_2_42 lists the ones known, with why).
"""

from __future__ import annotations

import math
import re
import subprocess
from pathlib import Path

import pytest
import yaml

from lookout.query.promql.engine import Engine
from lookout.query.promql.promqltest import MemoryStorage
from lookout.query.promql.promqltest_format import parse_points
from tests.conftest import require_binary

INTERVAL_MS = 60_000

SERIES = {
    'http_requests_total{job="api",instance="0",code="200"}': "0+10x40",
    'http_requests_total{job="api",instance="1",code="200"}': "5+7x15 0+7x24",
    'http_requests_total{job="api",instance="0",code="500"}': "0+1x40",
    'http_requests_total{job="web",instance="0",code="200"}': "100+3x40",
    'http_requests_total{job="web",instance="0",code="500"}': "0 0 1 1 2 3 5 8 13 21 34x30",
    'temperature{room="a"}': "20 21 19.5 22 23 21 20 18 17.5 19x31",
    'temperature{room="b"}': "15+0.25x40",
    'latency_seconds_bucket{job="api",le="0.1"}': "0+5x40",
    'latency_seconds_bucket{job="api",le="0.5"}': "0+9x40",
    'latency_seconds_bucket{job="api",le="1"}': "0+11x40",
    'latency_seconds_bucket{job="api",le="+Inf"}': "0+12x40",
    'latency_seconds_bucket{job="web",le="0.1"}': "0+1x40",
    'latency_seconds_bucket{job="web",le="0.5"}': "0+2x40",
    'latency_seconds_bucket{job="web",le="1"}': "0+6x40",
    'latency_seconds_bucket{job="web",le="+Inf"}': "0+8x40",
}

QUERIES = [
    "rate(http_requests_total[5m])",
    "irate(http_requests_total[5m])",
    "increase(http_requests_total[10m])",
    "sum by (job) (rate(http_requests_total[5m]))",
    'sum by (job) (rate(http_requests_total{code=~"5.."}[5m])) '
    "/ sum by (job) (rate(http_requests_total[5m]))",
    "histogram_quantile(0.9, sum by (job, le) (rate(latency_seconds_bucket[5m])))",
    "histogram_quantile(0.5, rate(latency_seconds_bucket[5m]))",
    "delta(temperature[10m])",
    "deriv(temperature[10m])",
    "predict_linear(temperature[10m], 3600)",
    "avg_over_time(temperature[10m])",
    "max_over_time(temperature[10m]) - min_over_time(temperature[10m])",
    "quantile_over_time(0.25, temperature[10m])",
    "stddev_over_time(temperature[10m])",
    "changes(temperature[15m])",
    "resets(http_requests_total[30m])",
    "topk(2, http_requests_total)",
    "bottomk(1, temperature)",
    'count_values("value", round(temperature))',
    "quantile(0.5, temperature)",
    "stdvar by (job) (http_requests_total)",
    "http_requests_total > bool 100",
    'http_requests_total{code="500"} / ignoring(code) http_requests_total{code="200"}',
    "sum by (job) (http_requests_total) / on(job) group_left "
    'sum by (job) (http_requests_total{code="200"})',
    "http_requests_total and on(job) (temperature > 100)",
    'label_replace(temperature, "floor", "$1", "room", "(.*)")',
    'label_join(http_requests_total, "id", "-", "job", "instance", "code")',
    "clamp(temperature, 18, 21)",
    "round(temperature * 3.3, 0.5)",
    "abs(-temperature) ^ 0.5",
    # Inner steps sit on whole minutes like the samples: a 150s window keeps its edges off them.
    "max_over_time(rate(http_requests_total[150s])[15m:2m])",
    "http_requests_total offset 7m",
    "avg without (instance) (http_requests_total)",
    'absent(nonexistent{job="x"})',
    "timestamp(temperature)",
]

# Evaluation times between samples (samples sit on whole minutes).
EVAL_TIMES_S = [615, 1250, 1890, 2345]

# Where Prometheus 2.42 answers differently from 3.x, the shared files side with 3.x and so
# does Lookout: (what, interval, series, values, query, eval time s, Lookout's answer, 2.42's).
DIFFERENT_IN_2_42 = [
    (
        "a sample on a range window's left edge (2.x windows are [t - r, t], 3.x (t - r, t])",
        "4m", 'm{a="x"}', "1 2 3", "count_over_time(m[8m])", 480, 2.0, 3.0,
    ),
    (
        "rate()'s zero cutoff applies after the half-interval rule in 3.x (functions.test)",
        "4m", 'c{start="3m"}', "180+240x10", "rate(c[20m])", 600, 0.6, 0.65,
    ),
]  # fmt: skip


def _engine() -> Engine:
    storage = MemoryStorage()
    for text, values in SERIES.items():
        labels = _labels(text)
        points = parse_points(values)
        storage.add(labels, [(i * INTERVAL_MS, p) for i, p in enumerate(points) if p is not None])
    return Engine(storage)


def _labels(text: str) -> dict[str, str]:
    name, _, rest = text.partition("{")
    labels = {"__name__": name}
    for pair in rest.rstrip("}").split(","):
        key, _, value = pair.partition("=")
        labels[key] = value.strip('"')
    return labels


def _series_text(labels: dict[str, str]) -> str:
    name = labels.get("__name__", "")
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
    return f"{name}{{{inner}}}"


def _unit_test() -> dict[str, object]:
    engine = _engine()
    expr_tests = []
    for query in QUERIES:
        for seconds in EVAL_TIMES_S:
            result = engine.instant(query, seconds * 1000)
            samples = []
            for series in result.series:
                value = series.points[0][1]
                assert not math.isnan(value), (query, seconds)  # promtool cannot expect NaN
                samples.append({"labels": _series_text(series.labels), "value": value})
            expr_tests.append({"expr": query, "eval_time": f"{seconds}s", "exp_samples": samples})
    return {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [{"series": s, "values": v} for s, v in SERIES.items()],
                "promql_expr_test": expr_tests,
            }
        ],
    }


_BLOCK = re.compile(
    r'expr: "(?P<expr>(?:[^"\\]|\\.)*)", time: (?P<time>\S+),\s*'
    r"exp: (?P<exp>.*?)\n\s*got: (?P<got>.*?)(?:\n|$)"
)
_SAMPLE = re.compile(r"(\{[^}]*\}) (\S+?)(?:,|$)")


def _samples(text: str) -> dict[str, float]:
    return {labels: float(value) for labels, value in _SAMPLE.findall(text.strip())}


def _disagreements(report: str) -> list[str]:
    """The cases where promtool's answer differs from the engine's by more than rounding."""
    blocks = list(_BLOCK.finditer(report))
    assert len(blocks) == report.count("expr: "), report[-3000:]  # every failure was read
    found = []
    for block in blocks:
        want, got = _samples(block["exp"]), _samples(block["got"])
        close = want.keys() == got.keys() and all(
            math.isclose(want[k], got[k], rel_tol=1e-9, abs_tol=1e-12) for k in want
        )
        if not close:
            found.append(f"{block['expr']} at {block['time']}: lookout {want}, promtool {got}")
    return found


def _run_promtool(test: dict[str, object], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    promtool = require_binary("promtool", "prometheus")
    path = tmp_path / "oracle_test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    return subprocess.run(
        [promtool, "test", "rules", str(path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.mark.real("promtool")
def test_promtool_agrees_with_the_engine(tmp_path: Path) -> None:
    done = _run_promtool(_unit_test(), tmp_path)
    if done.returncode != 0:
        assert "FAILED" in done.stdout + done.stderr, done.stdout[-2000:] + done.stderr[-2000:]
        assert _disagreements(done.stdout + done.stderr) == []


@pytest.mark.real("promtool")
def test_the_oracle_fails_on_a_wrong_answer(tmp_path: Path) -> None:
    """Negative control: one expected value changed, and the test sees a disagreement."""
    test = _unit_test()
    cases = test["tests"][0]["promql_expr_test"]  # type: ignore[index]
    first = next(c for c in cases if c["exp_samples"])
    first["exp_samples"][0]["value"] += 1
    done = _run_promtool(test, tmp_path)
    assert done.returncode == 1
    assert len(_disagreements(done.stdout + done.stderr)) == 1


@pytest.mark.real("promtool")
@pytest.mark.parametrize("case", DIFFERENT_IN_2_42, ids=[c[4] for c in DIFFERENT_IN_2_42])
def test_where_2_42_and_the_files_disagree(case: tuple[object, ...], tmp_path: Path) -> None:
    """The known differences, checked both ways: Lookout gives the 3.x answer the shared
    files expect, and promtool 2.42 still gives its own."""
    _, interval, series, values, query, seconds, ours, theirs = case
    storage = MemoryStorage()
    step = int(str(interval).removesuffix("m")) * 60_000
    points = parse_points(str(values))
    storage.add(
        _labels(str(series)), [(i * step, p) for i, p in enumerate(points) if p is not None]
    )
    got = Engine(storage).instant(str(query), int(str(seconds)) * 1000)
    assert [s.points[0][1] for s in got.series] == [pytest.approx(ours)]
    test = {
        "rule_files": [],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": interval,
            "input_series": [{"series": series, "values": values}],
            "promql_expr_test": [{
                "expr": query,
                "eval_time": f"{seconds}s",
                "exp_samples": [{"labels": _series_text(got.series[0].labels), "value": ours}],
            }],
        }],
    }  # fmt: skip
    done = _run_promtool(test, tmp_path)
    assert done.returncode == 1
    block = next(_BLOCK.finditer(done.stdout + done.stderr))
    assert list(_samples(block["got"]).values()) == [pytest.approx(theirs)]
