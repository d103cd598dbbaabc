"""`lookout promql-test`: the promqltest format, the storage the engine reads, Prometheus's
judging rules, the skip list, and the command over Prometheus's own test scripts."""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from lookout.cli import main
from lookout.errors import PromQLError
from lookout.query.promql.model import Matcher, QueryResult, ResultSeries, Storage, is_stale
from lookout.query.promql.promqltest import (
    NATIVE_HISTOGRAM_DATA,
    NHCB_DATA,
    SKIP_RULES,
    FormatError,
    MemoryStorage,
    almost_equal,
    parse_points,
    parse_script,
    parse_series,
    run_cli,
    run_script,
    skip_list_markdown,
)
from lookout.query.promql.promqltest_format import (
    AnnotationExpectation,
    Clear,
    Eval,
    HistogramValue,
    Load,
    parse_duration,
)
from tests.conftest import require_real
from tests.support import ROOT

# The workplace keeps the shared folder next to the project (../shared) and at /work/shared;
# a clone elsewhere (a CI checkout, say) finds it at the second, or where
# LOOKOUT_SHARED_DIR points.
_SHARED_CANDIDATES = [
    *([Path(os.environ["LOOKOUT_SHARED_DIR"])] if os.environ.get("LOOKOUT_SHARED_DIR") else []),
    ROOT.parent / "shared",
    Path("/work/shared"),
]
SHARED = next(
    (c / "conformance" / "promql" for c in _SHARED_CANDIDATES if (c / "conformance").is_dir()),
    ROOT.parent / "shared" / "conformance" / "promql",
)


def skipped_because(name: str) -> str:
    """The skip reason SKIP_RULES gives an eval that uses `name`."""
    return next(rule for rule in SKIP_RULES if rule.name == name).because()


def shared_scripts() -> Path:
    """Prometheus's test scripts, read where they are (never copied into the repository)."""
    require_real(
        "The folder of shared PromQL conformance scripts",
        available=SHARED.is_dir(),
        how=f"looked in {', '.join(str(c) for c in _SHARED_CANDIDATES)}; "
        "set LOOKOUT_SHARED_DIR to the folder that holds conformance/",
    )
    return SHARED


# --- The format -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 2 3", [1.0, 2.0, 3.0]),
        ("0+10x3", [0.0, 10.0, 20.0, 30.0]),
        ("5-2x2", [5.0, 3.0, 1.0]),
        ("-1+2x2", [-1.0, 1.0, 3.0]),
        ("7x2", [7.0, 7.0, 7.0]),
        ("4x0", [4.0]),
        ("_ 1 _x2 2", [None, 1.0, None, None, 2.0]),
        ("Inf -Inf +Inf inf", [math.inf, -math.inf, math.inf, math.inf]),
        ("1e3 .5 -2.5e-1 1E+2 2.", [1000.0, 0.5, -0.25, 100.0, 2.0]),
        ("1e+1x1", [10.0, 10.0]),
        ("0.1+0.1x2", [0.1, 0.1 + 0.1, 0.1 + 0.1 + 0.1]),
    ],
)
def test_expanding_notation_yields_prometheus_points(text: str, expected: list[float]) -> None:
    """`a+bxN` is N+1 points added up step by step, as Prometheus's parser does."""
    assert expected == parse_points(text)


def test_nan_and_stale_points_are_different_nans() -> None:
    """`NaN` is a value; `stale` is the staleness marker, a NaN with its own bits."""
    nan, stale = parse_points("NaN stale")
    assert isinstance(nan, float)
    assert isinstance(stale, float)
    assert (math.isnan(nan), is_stale(nan), is_stale(stale)) == (True, False, True)


def test_native_histogram_points_count_like_floats() -> None:
    """`{{...}}` points are kept as markers, with the same repetition rules as floats."""
    points = parse_points(
        "{{schema:1 sum:3 buckets:[1 2]}} {{count:1}}x2 {{count:0}}+{{count:1}}x1 5"
    )
    kinds = [type(p).__name__ for p in points]
    assert kinds == ["HistogramValue"] * 6 + ["float"]
    assert points[0] == HistogramValue("{{schema:1 sum:3 buckets:[1 2]}}")


@pytest.mark.parametrize("text", ["1+x3", "abc", "1+2", "_x", "{{count:1"])
def test_invalid_points_raise(text: str) -> None:
    with pytest.raises(ValueError, match=r"invalid|lacks|closing"):
        parse_points(text)


@pytest.mark.parametrize(
    ("line", "labels"),
    [
        ("metric{a=\"b\", c='d', e=`f`,} 1", {"__name__": "metric", "a": "b", "c": "d", "e": "f"}),
        ("metric 1", {"__name__": "metric"}),
        ("{} 1", {}),
        ('{__name__="m", job="x"} 1', {"__name__": "m", "job": "x"}),
        ('{v="{count:20, sum:10}"}\t2', {"v": "{count:20, sum:10}"}),
        ('{a="x\\"y\\\\n\\n"} 1', {"a": 'x"y\\n\n'}),
        ('{"dotted.name", "a.b"="c"} 1', {"__name__": "dotted.name", "a.b": "c"}),
    ],
)
def test_series_lines_give_labels(line: str, labels: dict[str, str]) -> None:
    assert labels == parse_series(line)[0]


def test_durations_are_prometheus_durations() -> None:
    assert [parse_duration(d) for d in ("0", "5m", "1m30s", "10s53ms", "1d1h")] == [
        0,
        300_000,
        90_000,
        10_053,
        86_400_000 + 3_600_000,
    ]
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration("5x")


def test_load_and_clear_commands() -> None:
    script = parse_script(
        "# a comment\n"
        "load 5m\n"
        '  up{job="a"} 1 2\n'
        '\tup{job="b"} 0+1x2\n'
        "\n"
        "load_with_nhcb 1m\n"
        '  h_bucket{le="1"} 1\n'
        "\n"
        "clear\n"
    )
    first, second, clear = script.commands
    assert isinstance(first, Load)
    assert (first.line, first.interval_ms, first.with_nhcb) == (2, 300_000, False)
    assert [points for _, points in first.series.values()] == [[1.0, 2.0], [0.0, 1.0, 2.0]]
    assert isinstance(second, Load)
    assert (second.interval_ms, second.with_nhcb) == (60_000, True)
    assert clear == Clear(9)


def test_instant_eval_with_expect_lines() -> None:
    (ev,) = parse_script(
        "eval instant at 1m30s sum by (a) (x)\n"
        "  expect warn msg: PromQL warning: boo\n"
        "  expect info regex: foo.*\n"
        "  expect ordered\n"
        '  {a="1"} 3\n'
        '  {a="2"} -Inf\n'
    ).commands
    assert isinstance(ev, Eval)
    assert (ev.line, ev.query, ev.end_ms, ev.is_range, ev.ordered) == (
        1,
        "sum by (a) (x)",
        90_000,
        False,
        True,
    )
    assert ev.warns == [AnnotationExpectation(message="PromQL warning: boo")]
    assert ev.infos == [AnnotationExpectation(regex="foo.*")]
    assert [(s.labels, s.points, s.position) for s in ev.expected.values()] == [
        ({"a": "1"}, [3.0], 1),
        ({"a": "2"}, [-math.inf], 2),
    ]


def test_range_eval_scalar_string_and_range_vector() -> None:
    ranged, scalar, text, matrix, empty = parse_script(
        "eval range from 0 to 2m step 1m x\n"
        "  x 1 _ 3\n"
        "\n"
        "eval instant at 0 1 - 2.5\n"
        "  -1.5\n"
        "\n"
        'eval instant at 0 "a b"\n'
        '  expect string "a b"\n'
        "\n"
        "eval instant at 1m x[1m]\n"
        "  expect range vector from 10s to 1m step 10s\n"
        "  x 1 2 3 4 5 6\n"
        "\n"
        "eval instant at 50m nothing\n"
    ).commands
    assert isinstance(ranged, Eval)
    assert (ranged.is_range, ranged.start_ms, ranged.end_ms, ranged.step_ms) == (
        True,
        0,
        120_000,
        60_000,
    )
    assert [s.points for s in ranged.expected.values()] == [[1.0, None, 3.0]]
    assert isinstance(scalar, Eval)
    assert (scalar.expect_scalar, scalar.scalar) == (True, -1.5)
    assert isinstance(text, Eval)
    assert text.expected_string == "a b"
    assert isinstance(matrix, Eval)
    assert (matrix.range_vector, matrix.start_ms, matrix.end_ms, matrix.step_ms) == (
        True,
        10_000,
        60_000,
        10_000,
    )
    assert isinstance(empty, Eval)
    assert (empty.expected, empty.expect_scalar) == ({}, False)


def test_fail_forms_old_and_new() -> None:
    old, regex, tight, bare = parse_script(
        "eval_fail instant at 0 foo\n"
        "  expected_fail_message boom\n"
        "\n"
        "eval instant at 0 foo\n"
        "  expect fail regex: a.c\n"
        "\n"
        "eval instant at 0 foo\n"
        "  expect fail msg:vector cannot\n"
        "\n"
        "eval range from 0 to 1m step 1m foo\n"
        "  expect fail\n"
    ).commands
    assert [e.fail for e in (old, regex, tight, bare) if isinstance(e, Eval)] == [
        AnnotationExpectation(message="boom"),
        AnnotationExpectation(regex="a.c"),
        AnnotationExpectation(message="vector cannot"),
        AnnotationExpectation(),
    ]


@pytest.mark.parametrize(
    ("text", "line", "problem"),
    [
        ("clear\nbogus 1\n", 2, "unknown command 'bogus 1'"),
        ("load 5x\n", 1, "invalid load interval"),
        ("load 1m\n  m{a=1} 1\n", 2, "expected a quoted value for label 'a'"),
        ("load 1m\n  m 1 x\n", 2, "invalid point 'x'"),
        ('eval instant at 1m x\n  {a="1"} 1 2\n', 2, "expect range vector"),
        ("eval instant at 1m x\n  expect fail\n  expect fail\n", 3, "at most one"),
        ("eval instant at 1m x\n  expect warn\n  expect no_warn\n", 3, "cannot be used together"),
        ("eval instant at 1m x\n  expect sometimes\n", 2, "invalid 'expect sometimes'"),
        (
            "eval instant at 1m x\n  a 1\n# the comment ends the block\n  b 2\n",
            4,
            "unknown command",
        ),
        ("eval range from 2m to 1m step 1m x\n", 1, "before start"),
    ],
)
def test_format_errors_name_file_and_line(text: str, line: int, problem: str) -> None:
    with pytest.raises(FormatError) as caught:
        parse_script(text, "t.test")
    assert (caught.value.path, caught.value.line) == ("t.test", line)
    assert str(caught.value).startswith(f"t.test:{line}: ")
    assert problem in caught.value.message


# --- The storage ------------------------------------------------------------------------


def _storage(text: str) -> MemoryStorage:
    storage = MemoryStorage()
    for command in parse_script(text).commands:
        assert isinstance(command, Load)
        storage.load(command)
    return storage


def test_select_matches_all_matchers_in_an_inclusive_window() -> None:
    """Samples at both ends of [mint, maxt] are served, sorted, stale markers kept."""
    storage = _storage(
        'load 1m\n  m{a="x"} 0 1 stale 3 4\n  m{a="y"} 5 _ 7\n  m{a="z"} 9 9 9\n  other{a="x"} 1\n'
    )
    matchers = [Matcher("__name__", "=", "m"), Matcher("a", "=~", "x|y")]
    got = storage.select(matchers, 60_000, 180_000)
    assert [(s.labels, s.ts.tolist()) for s in got] == [
        ({"__name__": "m", "a": "x"}, [60_000, 120_000, 180_000]),
        ({"__name__": "m", "a": "y"}, [120_000]),
    ]
    assert (got[0].ts.dtype, got[0].values.dtype) == (np.int64, np.float64)
    assert got[0].values[0] == 1.0
    assert is_stale(float(got[0].values[1]))
    assert storage.select(matchers, 240_001, 600_000) == []


def test_native_histogram_samples_are_noted_not_served() -> None:
    storage = _storage("load 1m\n  h 1 {{count:1}} 3\n")
    assert [s.values.tolist() for s in storage.select([], 0, 0)] == [[1.0]]
    assert storage.histograms_read == set()
    assert [s.values.tolist() for s in storage.select([], 0, 120_000)] == [[1.0, 3.0]]
    assert storage.histograms_read == {NATIVE_HISTOGRAM_DATA}


def test_load_with_nhcb_derives_histograms_from_classic_series() -> None:
    """The classic series stay floats; their native-histogram twin is only noted."""
    storage = _storage('load_with_nhcb 1m\n  x_bucket{le="1", j="a"} 1 2\n  x_sum{j="a"} 3 4\n')
    assert storage.select([Matcher("__name__", "=", "x")], 0, 60_000) == []
    assert storage.histograms_read == {NHCB_DATA}
    storage.histograms_read.clear()
    bucket = storage.select([Matcher("__name__", "=", "x_bucket")], 0, 60_000)
    assert [s.values.tolist() for s in bucket] == [[1.0, 2.0]]
    assert storage.histograms_read == set()


# --- Judging ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("a", "b", "equal"),
    [
        (1.0, 1.0 + 1e-9, True),
        (1.0, 1.00001, False),
        (math.nan, math.nan, True),
        (math.inf, math.inf, True),
        (0.0, 1e-300, False),
        (0.0, -0.0, True),
        (parse_points("stale")[0], math.nan, False),
        (parse_points("stale")[0], parse_points("stale")[0], True),
    ],
)
def test_values_compare_like_prometheus_almost_equal(a: float, b: float, equal: bool) -> None:
    assert equal == almost_equal(a, b)


class FakeEngine:
    """Answers from a table (query -> result or exception), for judging rules alone.

    A range query of an instant answer repeats that answer at every step, so the range-mode
    check agrees unless a test gives a different range answer."""

    def __init__(
        self,
        storage: Storage,
        instant: dict[str, QueryResult | Exception],
        ranged: dict[str, QueryResult | Exception] | None = None,
    ) -> None:
        self.storage = storage
        self.answers = instant
        self.ranged = ranged or {}

    def _answer(self, table: dict[str, QueryResult | Exception], query: str) -> QueryResult:
        self.storage.select([Matcher("__name__", "=~", ".+")], -600_000, 600_000)
        answer = table[query]
        if isinstance(answer, Exception):
            raise answer
        return answer

    def instant(self, query: str, time_ms: int) -> QueryResult:
        return self._answer(self.answers, query)

    def range(self, query: str, start_ms: int, end_ms: int, step_ms: int) -> QueryResult:
        if query in self.ranged:
            return self._answer(self.ranged, query)
        answer = self._answer(self.answers, query)
        steps = range(start_ms, end_ms + 1, step_ms)
        series = [
            ResultSeries.of(s.labels, [(t, s.points[0][1]) for t in steps]) for s in answer.series
        ]
        return QueryResult("matrix", sorted(series, key=lambda s: sorted(s.labels.items())))


def vector(*samples: tuple[dict[str, str], float], t: int = 0) -> QueryResult:
    return QueryResult("vector", [ResultSeries.of(labels, [(t, v)]) for labels, v in samples])


def judged(
    text: str,
    instant: dict[str, QueryResult | Exception],
    ranged: dict[str, QueryResult | Exception] | None = None,
) -> list[tuple[str, str]]:
    """(status, message) of each eval of `text` against a FakeEngine."""

    def factory(storage: Storage) -> FakeEngine:
        return FakeEngine(storage, instant, ranged)

    report = run_script(parse_script(text), factory)
    return [(o.status, o.message) for o in report.outcomes]


A1, A2 = {"a": "1"}, {"a": "2"}
TWO = 'eval instant at 0 q\n  {a="1"} 3\n  {a="2"} 4\n'


def test_a_vector_is_compared_as_a_set() -> None:
    assert judged(TWO, {"q": vector((A2, 4), (A1, 3))}) == [("passed", "")]


def test_ordered_checks_each_position() -> None:
    assert judged(
        "eval instant at 0 q\n  expect ordered\n" + TWO.split("\n", 1)[1],
        {"q": vector((A2, 4), (A1, 3))},
    ) == [("failed", 'expected {a="2"} at position 2, got it at 1')]


def test_a_wrong_value_names_both_values() -> None:
    assert judged(TWO, {"q": vector((A1, 3.5), (A2, 4))}) == [
        ("failed", 'expected {a="1"} 3, got 3.5')
    ]


def test_missing_and_unexpected_series_fail() -> None:
    assert judged(
        TWO + "\n" + TWO.replace("q", "r"),
        {"q": vector((A1, 3)), "r": vector((A1, 3), (A2, 4), ({"a": "3"}, 1))},
    ) == [
        ("failed", 'expected series {a="2"} is not in the result'),
        ("failed", 'unexpected series {a="3"} 1 in result'),
    ]


def test_scalar_and_vector_answers_are_not_interchangeable() -> None:
    scalar = QueryResult("scalar", [ResultSeries.of({}, [(0, 2.0)])])
    assert judged(
        "eval instant at 0 v\n  2\n\neval instant at 0 s\n  {} 2\n\neval instant at 0 s\n  2\n",
        {"v": vector(({}, 2)), "s": scalar},
    ) == [
        ("failed", "expected scalar 2, got vector [{} 2]"),
        ("failed", "expected a vector or matrix, got scalar 2"),
        ("passed", ""),
    ]


def test_no_result_lines_expect_an_empty_result() -> None:
    assert judged(
        "eval instant at 50m e\n\neval instant at 50m f\n",
        {"e": vector(), "f": vector((A1, 1))},
    ) == [("passed", ""), ("failed", 'unexpected series {a="1"} 1 in result')]


def test_expect_fail_passes_only_on_a_matching_promql_error() -> None:
    script = (
        "eval instant at 0 any\n  expect fail\n\n"
        "eval instant at 0 msg\n  expect fail msg: bad thing\n\n"
        "eval instant at 0 wrongmsg\n  expect fail msg: bad thing\n\n"
        "eval instant at 0 regex\n  expect fail regex: ba. th\n\n"
        "eval instant at 0 none\n  expect fail\n\n"
        "eval instant at 0 crash\n  expect fail\n"
    )
    bad = PromQLError("bad thing", "execution")
    assert judged(
        script,
        {
            "any": bad,
            "msg": bad,
            "wrongmsg": PromQLError("other thing"),
            "regex": bad,
            "none": vector(),
            "crash": NotImplementedError("later"),
        },
    ) == [
        ("passed", ""),
        ("passed", ""),
        ("failed", "expected an error matching message 'bad thing', got 'other thing'"),
        ("passed", ""),
        ("failed", "expected an error, got a vector result"),
        ("failed", "engine raised NotImplementedError: later"),
    ]


def test_an_unexpected_error_fails_with_its_type() -> None:
    assert judged("eval instant at 0 q\n", {"q": PromQLError("boom", "execution")}) == [
        ("failed", "unexpected error (execution): boom")
    ]


def _annotated(warnings: list[str], infos: list[str]) -> QueryResult:
    result = vector()
    result.warnings, result.infos = warnings, infos
    return result


def test_annotations_are_checked_both_ways() -> None:
    script = (
        "eval instant at 0 w\n  expect warn msg: PromQL warning: w (1:1)\n\n"
        "eval instant at 0 none\n  expect warn\n\n"
        "eval instant at 0 extra\n  expect warn msg: PromQL warning: w (1:1)\n\n"
        "eval instant at 0 w\n  expect no_warn\n\n"
        "eval instant at 0 i\n  expect info regex: ^PromQL info: .*\n  expect no_warn\n\n"
        "eval_warn instant at 0 none\n"
    )
    w = _annotated(["PromQL warning: w (1:1)"], [])
    extra = _annotated(["PromQL warning: w (1:1)", "PromQL warning: v"], [])
    assert judged(
        script,
        {"w": w, "none": vector(), "extra": extra, "i": _annotated([], ["PromQL info: x"])},
    ) == [
        ("passed", ""),
        ("failed", "expected warn annotations, got none"),
        ("failed", "unexpected warn annotation 'PromQL warning: v'"),
        ("failed", "expected no warnings, got ['PromQL warning: w (1:1)']"),
        ("passed", ""),
        ("failed", "expected warnings, got none"),
    ]


def test_range_evals_check_points_times_and_order() -> None:
    script = 'eval range from 0 to 2m step 1m q\n  {a="1"} 1 _ 3\n  {a="2"} 1x2\n'
    good = QueryResult(
        "matrix",
        [
            ResultSeries.of(A1, [(0, 1.0), (120_000, 3.0)]),
            ResultSeries.of(A2, [(0, 1.0), (60_000, 1.0), (120_000, 1.0)]),
        ],
    )
    unsorted = QueryResult("matrix", good.series[::-1])
    shifted = QueryResult(
        "matrix", [ResultSeries.of(A1, [(0, 1.0), (60_000, 3.0)]), good.series[1]]
    )
    assert judged(
        script + "\n" + script.replace(" q", " u") + "\n" + script.replace(" q", " s"),
        {},
        {"q": good, "u": unsorted, "s": shifted},
    ) == [
        ("passed", ""),
        ("failed", 'a matrix must be sorted by labels, but {a="2"} comes before {a="1"}'),
        ("failed", 'expected a point at 120s for {a="1"}, got one at 60s: [1 @0s, 3 @60s]'),
    ]


def test_an_instant_eval_must_agree_with_its_range_mode() -> None:
    """Prometheus re-runs an instant eval as a 3-step range query and compares the middle."""
    answer = vector((A1, 3), t=60_000)
    other = QueryResult("matrix", [ResultSeries.of(A1, [(0, 3.0), (60_000, 4.0)])])
    assert judged('eval instant at 1m q\n  {a="1"} 3\n', {"q": answer}, {"q": other}) == [
        ("failed", 'in range mode: expected {a="1"} 3, got 4')
    ]


def test_experimental_functions_and_histogram_results_are_skipped() -> None:
    script = (
        'eval instant at 0 sort_by_label(x, "a")\n\n'
        "eval instant at 0 limitk(1, x)\n\n"
        "eval instant at 0 x\n  x {{count:1}}\n"
    )
    assert [
        ("skipped", skipped_because("sort_by_label")),
        ("skipped", skipped_because("limitk")),
        ("skipped", "native histogram results: an expected value is a `{{...}}` native histogram"),
    ] == judged(script, {})


def test_python_warnings_are_noted_whatever_the_filters(tmp_path: Path) -> None:
    """A warning the engine lets escape neither fails the eval nor escapes the runner."""

    class WarningEngine(FakeEngine):
        def instant(self, query: str, time_ms: int) -> QueryResult:
            np.log(np.array([-1.0]))  # numpy: RuntimeWarning, an error under pytest
            return super().instant(query, time_ms)

    def factory(storage: Storage) -> FakeEngine:
        return WarningEngine(storage, {"q": vector()})

    report = run_script(parse_script("eval instant at 0 q\n"), factory)
    assert [(o.status, o.python_warnings) for o in report.outcomes] == [
        ("passed", ["RuntimeWarning: invalid value encountered in log"])
    ]


def test_an_eval_that_reads_native_histograms_is_skipped() -> None:
    assert [("skipped", NATIVE_HISTOGRAM_DATA.because())] == judged(
        "load 1m\n  h {{count:1}}\n\neval instant at 0 h\n", {"h": vector()}
    )


def test_an_unparseable_query_is_skipped_unless_it_should_fail() -> None:
    statuses = judged(
        "eval instant at 0 foo{\n\neval instant at 0 foo{\n  expect fail\n",
        {"foo{": PromQLError("parse error: unexpected end of input")},
    )
    assert statuses == [
        ("skipped", "promql-parser cannot parse: unexpected end of input inside braces"),
        ("passed", ""),
    ]


def test_the_skip_list_is_in_the_docs() -> None:
    """docs/promql.md shows SKIP_RULES verbatim: every skipped feature with its reason."""
    assert skip_list_markdown() in (ROOT / "docs" / "promql.md").read_text()


# --- The command ------------------------------------------------------------------------

SKIPPED_ONLY = 'eval instant at 0 sort_by_label(x, "a")\n'


def test_cli_prints_a_row_per_file_and_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "one.test").write_text(SKIPPED_ONLY)
    (tmp_path / "two.test").write_text(SKIPPED_ONLY + "\n" + SKIPPED_ONLY)
    (tmp_path / "ignored.txt").write_text("not a script")
    assert main(["promql-test", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:4] == [
        "file          passed  failed  skipped  warn/info",
        "sub/one.test       0       0        1          0",
        "two.test           0       0        2          0",
        "total              0       0        3          0",
    ]


@pytest.mark.parametrize(
    ("make", "problem"),
    [
        (lambda d: str(d / "missing.test"), "no such file or folder"),
        (str, "no *.test files under"),
    ],
)
def test_usage_errors_exit_2_with_one_line(
    tmp_path: Path, make: Callable[[Path], str], problem: str
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "lookout", "promql-test", make(tmp_path)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (result.returncode, result.stdout) == (2, "")
    assert len(result.stderr.splitlines()) == 1
    assert problem in result.stderr
    assert "Traceback" not in result.stderr


def test_a_broken_script_fails_and_the_others_still_run(tmp_path: Path) -> None:
    """A script the runner cannot parse is one failure naming its line; the rest run."""
    _write(tmp_path / "a_bad.test", "load 1m\n  m 1 x\n")
    _write(tmp_path / "b_good.test", "load 1m\n  m 1 2\n\neval instant at 1m m\n  m 2\n")
    out, err = io.StringIO(), io.StringIO()
    code = run_cli([str(tmp_path)], out=out, err=err)
    assert code == 1
    rows = out.getvalue().splitlines()
    assert rows[1].split() == ["a_bad.test", "0", "1", "0", "0"]
    assert rows[2].split() == ["b_good.test", "1", "0", "0", "0"]
    assert "a_bad.test:2: invalid point 'x'" in out.getvalue()


def test_an_unparseable_query_expecting_a_named_error_is_skipped(tmp_path: Path) -> None:
    """Prometheus's exact message for syntax promql-parser does not know cannot be had: such
    an eval is skipped with the parser's reason; one expecting any failure still runs."""
    script = (
        "load 1m\n  m 1 2\n\n"
        "eval instant at 1m m[3m] smoothed\n  expect fail msg: something Prometheus says\n\n"
        "eval instant at 1m m[3m] smoothed\n  expect fail\n"
    )
    _write(tmp_path / "s.test", script)
    out = io.StringIO()
    assert run_cli([str(tmp_path / "s.test")], out=out, err=io.StringIO()) == 0
    assert out.getvalue().splitlines()[1].split()[1:] == ["1", "0", "1", "0"]


def _write(path: Path, text: str) -> str:
    path.write_text(text)
    return str(path)


def test_json_output_has_counts_failures_and_skip_reasons(tmp_path: Path) -> None:
    script = tmp_path / "s.test"
    script.write_text(SKIPPED_ONLY + "\neval instant at 0 q\n  1\n")
    out, err = io.StringIO(), io.StringIO()

    def factory(storage: Storage) -> FakeEngine:
        return FakeEngine(storage, {"q": vector()})

    code = run_cli([str(script)], as_json=True, out=out, err=err, engine_factory=factory)
    document = json.loads(out.getvalue())
    assert code == 1
    assert document["files"] == [
        {
            "file": str(script),
            "passed": 0,
            "failed": 1,
            "skipped": 1,
            "warn_info": 0,
            "failures": [
                {
                    "line": 3,
                    "eval": "eval instant at 0 q",
                    "message": "expected scalar 1, got vector []",
                }
            ],
            "skips": [
                {
                    "line": 1,
                    "eval": SKIPPED_ONLY.strip(),
                    "reason": skipped_because("sort_by_label"),
                }
            ],
            "python_warnings": [],
        }
    ]
    assert document["total"] == {"passed": 0, "failed": 1, "skipped": 1, "warn_info": 0}
    assert len(document["skip_rules"]) == len(SKIP_RULES)
    assert err.getvalue().splitlines()[-1].startswith("total")


# --- The real engine --------------------------------------------------------------------

SIMPLE = """
load 1m
  x{a="1"} 0+1x10
  x{a="2"} 5x10

eval instant at 0 12.5
  12.5

eval instant at 0 -2 * 3
  -6

eval instant at 5m x
  x{a="1"} 5
  x{a="2"} 5

eval instant at 5m x + 1
  {a="1"} 6
  {a="2"} 6

eval range from 0 to 2m step 1m x{a="1"}
  x{a="1"} 0 1 2
"""


def test_the_real_engine_passes_literals_a_selector_and_arithmetic() -> None:
    report = run_script(parse_script(SIMPLE, "simple.test"))
    assert [(o.line, o.status, o.message) for o in report.outcomes] == [
        (6, "passed", ""),
        (9, "passed", ""),
        (12, "passed", ""),
        (16, "passed", ""),
        (20, "passed", ""),
    ]


def test_a_corrupted_expected_value_makes_the_runner_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The self-check: literals.test passes as it is, and fails with one value changed."""
    original = shared_scripts() / "literals.test"
    intact = tmp_path / "literals.test"
    shutil.copy(original, intact)
    text = original.read_text()
    target = "eval instant at 50m 1+1\n\t2\n"
    assert text.count(target) == 1, f"{original} changed: it no longer has {target!r}"
    corrupted = tmp_path / "corrupted.test"
    corrupted.write_text(text.replace(target, "eval instant at 50m 1+1\n\t3\n"))

    assert main(["promql-test", str(intact)]) == 0
    capsys.readouterr()
    assert main(["promql-test", str(corrupted)]) == 1
    out = capsys.readouterr().out
    line = text[: text.index(target)].count("\n") + 1
    assert f"{corrupted}:{line}: eval instant at 50m 1+1\n    expected scalar 3, got 2\n" in out


def test_every_shared_conformance_script_passes() -> None:
    """THE CONFORMANCE GATE: Prometheus's test scripts, zero failed evals. It fails until the
    engine is complete, and its message lists every failing eval with what differed."""
    out, err = io.StringIO(), io.StringIO()
    code = run_cli([str(shared_scripts())], as_json=True, out=out, err=err)
    failures = [
        f"{f['file']}:{failure['line']}: {failure['eval']}\n    {failure['message']}"
        for f in json.loads(out.getvalue())["files"]
        for failure in f["failures"]
    ]
    assert (code, failures) == (0, []), err.getvalue() + "\n".join(failures)
