"""`lookout promql-test`: Prometheus's PromQL test scripts run against Lookout's engine.

The scripts are how Prometheus pins down PromQL semantics, so running them unchanged is the
strongest check that Lookout answers like Prometheus 3. promqltest_format.py parses a script
into commands; here an in-memory `MemoryStorage` holds the loaded series, `run_script` runs
each eval against `Engine(MemoryStorage)` and judges it with Prometheus's own rules
(promqltest_compare.py), and `run_cli` prints the report.

An eval is skipped only when it needs a feature outside the supported set. `SKIP_RULES` lists
every such feature with its reason, and docs/promql.md shows that table.
"""

from __future__ import annotations

import json
import math
import re
import sys
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol, TextIO

import numpy as np
import numpy.typing as npt
import promql_parser as pp

from lookout.errors import PromQLError, UsageError
from lookout.query.promql.binary import has_fill
from lookout.query.promql.model import (
    Matcher,
    QueryResult,
    SeriesData,
    Storage,
    matches_all,
)
from lookout.query.promql.promqltest_compare import (
    almost_equal,
    check_annotations,
    compare,
    compare_scalar,
    compare_vector,
    unsorted,
)
from lookout.query.promql.promqltest_format import (
    Clear,
    Eval,
    FormatError,
    HistogramValue,
    LabelsKey,
    Load,
    Script,
    StatesetValue,
    labels_key,
    parse_points,
    parse_script,
    parse_series,
)

__all__ = [
    "SKIP_RULES",
    "FormatError",
    "MemoryStorage",
    "SkipRule",
    "almost_equal",
    "parse_points",
    "parse_script",
    "parse_series",
    "run_cli",
    "run_script",
    "skip_list_markdown",
]

# What Prometheus's test engine uses (promqltest.NewTestEngine): a 5m lookback, at most
# 10,000 samples per query, and a timeout that only catches a hung query.
LOOKBACK_MS = 300_000
MAX_SAMPLES = 10_000
QUERY_TIMEOUT_S = 100.0


# --- The skip list ----------------------------------------------------------------------


@dataclass(frozen=True)
class SkipRule:
    """One feature outside the supported set: an eval that uses it is skipped, not failed."""

    kind: Literal["data", "function", "aggregation", "modifier", "parser"]
    name: str
    reason: str

    @property
    def feature(self) -> str:
        return f"{self.name}()" if self.kind == "function" else self.name

    def because(self, detail: str = "") -> str:
        """The skip reason an eval gets; the parser rule carries the parser's message."""
        return f"{self.feature}: {detail or self.reason}"


_EXPERIMENTAL = "experimental in Prometheus (`--enable-feature=promql-experimental-functions`)"
_DURATION_EXPR = "experimental in Prometheus (`--enable-feature=promql-duration-expr`)"
_HISTOGRAM_ONLY = "reads native histograms only; the store keeps float samples"

NATIVE_HISTOGRAM_DATA = SkipRule(
    "data",
    "native histogram samples",
    "the eval reads `{{...}}` points of a load; the store keeps float samples only",
)
NATIVE_HISTOGRAM_RESULT = SkipRule(
    "data", "native histogram results", "an expected value is a `{{...}}` native histogram"
)
NHCB_DATA = SkipRule(
    "data",
    "load_with_nhcb histograms",
    "the eval reads the native histograms with custom buckets that `load_with_nhcb` builds "
    "from classic `_bucket`/`_count`/`_sum` series (those float series are loaded and tested)",
)
START_TIMESTAMPS = SkipRule(
    "data",
    "start timestamps (`@st` lines)",
    "the eval reads a series given start timestamps, a Prometheus feature newer than 3.x's "
    "stable set; Lookout stores no start timestamps",
)
STATESETS = SkipRule(
    "data",
    "stateset samples (`ss(...)`)",
    "the eval reads a native stateset series; the store keeps float samples only",
)
_UNSUPPORTED_DATA = {"start_timestamps": START_TIMESTAMPS, "statesets": STATESETS}
FILL_MODIFIERS = SkipRule(
    "modifier",
    "fill modifiers",
    "`fill`, `fill_left` and `fill_right` on binary operators are experimental in Prometheus "
    "(`--enable-feature=promql-binop-fill-modifiers`)",
)
UNPARSEABLE = SkipRule(
    "parser",
    "promql-parser cannot parse",
    "syntax promql-parser does not know; an eval that expects a failure still runs",
)

SKIP_RULES: tuple[SkipRule, ...] = (
    NATIVE_HISTOGRAM_DATA,
    NATIVE_HISTOGRAM_RESULT,
    NHCB_DATA,
    START_TIMESTAMPS,
    STATESETS,
    *(
        SkipRule("function", name, _HISTOGRAM_ONLY)
        for name in (
            "histogram_avg",
            "histogram_count",
            "histogram_stddev",
            "histogram_stdvar",
            "histogram_sum",
        )
    ),
    *(
        SkipRule("function", name, _EXPERIMENTAL)
        for name in (
            "double_exponential_smoothing",
            "first_over_time",
            "histogram_quantiles",
            "info",
            "mad_over_time",
            "sort_by_label",
            "sort_by_label_desc",
            "ts_of_first_over_time",
            "ts_of_last_over_time",
            "ts_of_max_over_time",
            "ts_of_min_over_time",
        )
    ),
    *(
        SkipRule("function", name, _DURATION_EXPR)
        for name in ("start", "end", "range", "step", "min_of", "max_of")
    ),
    *(SkipRule("aggregation", name, _EXPERIMENTAL) for name in ("limitk", "limit_ratio")),
    FILL_MODIFIERS,
    UNPARSEABLE,
)
_FUNCTION_RULES = {r.name: r for r in SKIP_RULES if r.kind == "function"}
_AGGREGATION_RULES = {r.name: r for r in SKIP_RULES if r.kind == "aggregation"}


def skip_list_markdown() -> str:
    """The skip list as the Markdown table docs/promql.md shows (a test keeps them equal)."""
    rows = ["| Skipped feature | Why |", "| --- | --- |"]
    rows += [f"| `{r.feature}` | {r.reason} |" for r in SKIP_RULES]
    return "\n".join(rows) + "\n"


# --- The storage the engine reads -------------------------------------------------------


_HISTOGRAM_SUFFIXES = ("_bucket", "_count", "_sum")


_Arrays = tuple[npt.NDArray[np.int64], npt.NDArray[np.float64], npt.NDArray[np.int64]]


@dataclass
class _StoredSeries:
    labels: dict[str, str]
    floats: dict[int, float] = field(default_factory=dict)
    histograms: dict[int, SkipRule] = field(default_factory=dict)
    arrays: _Arrays | None = None
    unsupported: set[SkipRule] = field(default_factory=set)


class MemoryStorage:
    """model.Storage over the data of `load` commands, as Prometheus's test storage holds it.

    Float samples and staleness markers are served; native histogram samples cannot be (the
    engine reads floats), so a select that reaches one records the skip rule in
    `histograms_read` and the runner skips that eval instead of judging a partial answer.
    """

    def __init__(self) -> None:
        self._series: dict[LabelsKey, _StoredSeries] = {}
        self.histograms_read: set[SkipRule] = set()

    def clear(self) -> None:
        self._series.clear()

    def add(
        self,
        labels: Mapping[str, str],
        floats: Iterable[tuple[int, float]] = (),
        histograms: Iterable[int] = (),
        rule: SkipRule = NATIVE_HISTOGRAM_DATA,
    ) -> None:
        """Add samples to a series (a later sample at the same time replaces the earlier)."""
        key = labels_key(labels)
        stored = self._series.setdefault(key, _StoredSeries(dict(labels)))
        stored.floats.update(floats)
        stored.histograms.update((t, rule) for t in histograms)
        stored.arrays = None

    def load(self, load: Load) -> None:
        """Add a `load` command's points: point i of a series is at i * interval."""
        for labels, points in load.series.values():
            at = load.start_ms
            floats = [
                (at + i * load.interval_ms, p) for i, p in enumerate(points) if isinstance(p, float)
            ]
            histograms = [
                at + i * load.interval_ms
                for i, p in enumerate(points)
                if isinstance(p, HistogramValue)
            ]
            self.add(labels, floats, histograms)
            if load.with_nhcb:
                self._add_nhcb(labels, [t for t, _ in floats])
        for key, (labels, feature) in load.unsupported.items():
            rule = _UNSUPPORTED_DATA[feature]
            if not key:  # a default for every series of the load
                for other, _ in load.series.values():
                    self._series[labels_key(other)].unsupported.add(rule)
                continue
            stored = self._series.setdefault(key, _StoredSeries(dict(labels)))
            stored.unsupported.add(rule)

    def _add_nhcb(self, labels: Mapping[str, str], times: list[int]) -> None:
        """The native histogram series `load_with_nhcb` derives from a classic one."""
        name = labels.get("__name__", "")
        suffix = next((s for s in _HISTOGRAM_SUFFIXES if name.endswith(s)), None)
        if suffix is None:
            return
        if suffix == "_bucket":
            try:
                if math.isnan(float(labels.get("le", "nan"))):
                    return
            except ValueError:
                return
        base = {k: v for k, v in labels.items() if k != "le"}
        base["__name__"] = name.removesuffix(suffix)
        self.add(base, histograms=times, rule=NHCB_DATA)

    def select(self, matchers: list[Matcher], mint_ms: int, maxt_ms: int) -> list[SeriesData]:
        out = []
        for stored in self._series.values():
            if not matches_all(stored.labels, matchers):
                continue
            ts, values, hist_ts = self._arrays(stored)
            if np.any((hist_ts >= mint_ms) & (hist_ts <= maxt_ms)):
                self.histograms_read.update(stored.histograms.values())
            self.histograms_read.update(stored.unsupported)
            lo = int(np.searchsorted(ts, mint_ms, side="left"))
            hi = int(np.searchsorted(ts, maxt_ms, side="right"))
            if hi > lo:
                out.append(SeriesData(dict(stored.labels), ts[lo:hi].copy(), values[lo:hi].copy()))
        return out

    @staticmethod
    def _arrays(stored: _StoredSeries) -> _Arrays:
        """Sorted sample times, their values, and the times of histogram samples."""
        if stored.arrays is None:
            times = sorted(stored.floats)
            stored.arrays = (
                np.array(times, dtype=np.int64),
                np.array([stored.floats[t] for t in times], dtype=np.float64),
                np.array(sorted(stored.histograms), dtype=np.int64),
            )
        return stored.arrays


# --- Running evals ----------------------------------------------------------------------


class QueryEngine(Protocol):
    """What the runner needs of an engine (lookout.query.promql.engine.Engine)."""

    def instant(self, query: str, time_ms: int) -> QueryResult: ...

    def range(self, query: str, start_ms: int, end_ms: int, step_ms: int) -> QueryResult: ...


EngineFactory = Callable[[Storage], QueryEngine]


def default_engine(storage: Storage) -> QueryEngine:
    """Lookout's engine, configured as Prometheus's test engine is (promqltest's
    NewTestEngine turns delayed name removal on; the server's default is off, as in
    Prometheus)."""
    from lookout.query.promql.engine import Engine

    return Engine(
        storage,
        lookback_ms=LOOKBACK_MS,
        max_samples=MAX_SAMPLES,
        timeout_s=QUERY_TIMEOUT_S,
        delayed_name_removal=True,
    )


Status = Literal["passed", "failed", "skipped"]


@dataclass
class Outcome:
    """What became of one eval: `message` is the failure, or the skip reason."""

    line: int
    eval_text: str
    status: Status
    message: str = ""
    annotations: bool = False  # the eval asserted warn/info annotations
    python_warnings: list[str] = field(default_factory=list)  # what the engine let escape


@dataclass
class FileReport:
    path: str
    outcomes: list[Outcome] = field(default_factory=list)

    def count(self, status: Status) -> int:
        return sum(1 for o in self.outcomes if o.status == status)

    @property
    def annotated(self) -> int:
        return sum(1 for o in self.outcomes if o.annotations and o.status != "skipped")

    def of(self, status: Status) -> list[Outcome]:
        return [o for o in self.outcomes if o.status == status]


_QUERY_CONTEXT_FUNCTIONS = re.compile(r"(start|end|range|step)\(\)")


def run_script(script: Script, engine_factory: EngineFactory = default_engine) -> FileReport:
    """Run a script's commands in order against a fresh storage and engine."""
    storage = MemoryStorage()
    engine = engine_factory(storage)
    report = FileReport(script.path)
    for command in script.commands:
        if isinstance(command, Clear):
            storage.clear()
        elif isinstance(command, Load):
            storage.load(command)
        else:
            report.outcomes.append(run_eval(command, engine, storage))
    return report


def run_eval(ev: Eval, engine: QueryEngine, storage: MemoryStorage) -> Outcome:
    """Skip `ev` if it needs an unsupported feature, else run it and judge the answer."""
    outcome = Outcome(ev.line, ev.text, "passed", annotations=ev.checks_annotations)
    skip = static_skip(ev)
    if skip is not None:
        outcome.status, outcome.message = "skipped", skip
        return outcome
    storage.histograms_read.clear()
    # Python warnings (numpy's "invalid value" ones, say) are noted, not judged: the verdict
    # is the same whether the caller's filters print them or, as under pytest, raise them.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        failure = _judge(ev, engine)
    outcome.python_warnings = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    if storage.histograms_read:
        rule = min(storage.histograms_read, key=SKIP_RULES.index)
        outcome.status, outcome.message = "skipped", rule.because()
    elif failure is not None:
        outcome.status, outcome.message = "failed", failure
    return outcome


def static_skip(ev: Eval) -> str | None:
    """The skip reason `ev` has before it runs: its query or its expected values."""
    for expected in ev.expected.values():
        if any(isinstance(p, HistogramValue) for p in expected.points):
            return NATIVE_HISTOGRAM_RESULT.because()
        if any(isinstance(p, StatesetValue) for p in expected.points):
            return STATESETS.because()
    try:
        expr = pp.parse(ev.query)
    except BaseException as exc:  # promql-parser's Rust panics arrive as BaseException
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        if ev.fail is not None and ev.fail.message is None and ev.fail.regex is None:
            return None  # the engine must fail it too, with any message
        # Syntax promql-parser does not know: Prometheus's own message for it cannot be had.
        return UNPARSEABLE.because(str(exc).split("\n")[0])
    found: list[SkipRule] = []

    def visit(node: pp.Expr) -> bool:
        rule = None
        if isinstance(node, pp.Call):
            rule = _FUNCTION_RULES.get(node.func.name)
        elif isinstance(node, pp.AggregateExpr):
            rule = _AGGREGATION_RULES.get(str(node.op))
        elif isinstance(node, pp.BinaryExpr) and has_fill(node.modifier):
            rule = FILL_MODIFIERS
        if rule is not None:
            found.append(rule)
            return False
        return True

    pp.walk(expr, visit)
    return found[0].because() if found else None


def _call(engine: QueryEngine, ev: Eval, query_range: tuple[int, int, int] | None) -> QueryResult:
    if query_range is None:
        return engine.instant(ev.query, ev.end_ms)
    return engine.range(ev.query, *query_range)


def _judge(ev: Eval, engine: QueryEngine) -> str | None:
    """Run `ev` as Prometheus's execInstantEval / execRangeEval do; the failure, or None."""
    query_range = (ev.start_ms, ev.end_ms, ev.step_ms) if ev.is_range else None
    try:
        result = _call(engine, ev, query_range)
    except PromQLError as exc:
        return _judge_error(ev, exc)
    except Exception as exc:  # noqa: BLE001 - an engine bug fails its eval, not the whole run
        return f"engine raised {type(exc).__name__}: {exc}"
    if ev.fail is not None:
        return f"expected an error, got a {result.result_type} result"
    problem = check_annotations(ev, result) or compare(ev, result, as_matrix=ev.is_range)
    if problem or not _has_range_mode(ev):
        return problem
    return _judge_range_mode(ev, engine, result)


def _judge_error(ev: Eval, exc: PromQLError) -> str | None:
    """An error passes only an eval that expects one, with a matching message if it says."""
    if ev.fail is None:
        return f"unexpected error ({exc.error_type}): {exc}"
    if not ev.fail.matches(str(exc)):
        return f"expected an error matching {ev.fail}, got {str(exc)!r}"
    return None


def _has_range_mode(ev: Eval) -> bool:
    """Whether Prometheus re-runs this instant eval as a range query (test.go skips results
    that are not instant vectors or scalars, and start()/end()/range()/step())."""
    if ev.is_range or ev.range_vector or ev.expected_string is not None:
        return False
    return _QUERY_CONTEXT_FUNCTIONS.search(ev.query) is None


def _judge_range_mode(ev: Eval, engine: QueryEngine, instant: QueryResult) -> str | None:
    """Prometheus also runs an instant eval as a range query of three steps around its time
    and checks the middle step gives the same answer."""
    t = ev.end_ms
    try:
        result = engine.range(ev.query, t - 60_000, t + 60_000, 60_000)
    except Exception as exc:  # noqa: BLE001 - any error here is the eval's failure
        return f"in range mode: {type(exc).__name__}: {exc}"
    if ev.ordered:
        return None  # range results are sorted by labels, so order cannot be checked
    problem = unsorted(result.series)
    if problem:
        return f"in range mode: {problem}"
    samples = [
        (s.labels, next(v for pt, v in s.points if pt == t))
        for s in result.series
        if any(pt == t for pt, _ in s.points)
    ]
    if instant.result_type == "scalar":
        if not samples:
            return f"in range mode: no value at {t / 1000:g}s"
        problem = compare_scalar(ev, samples[0][1])
    else:
        problem = compare_vector(ev, samples)
    return f"in range mode: {problem}" if problem else None


# --- The report -------------------------------------------------------------------------


def collect(paths: Sequence[str]) -> list[tuple[Path, str]]:
    """(file, name to show) of every script the arguments name; folders are walked for *.test."""
    found: list[tuple[Path, str]] = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            files = sorted(path.rglob("*.test"))
            if not files:
                raise UsageError(f"no *.test files under {arg}; give a folder of test scripts")
            found += [(f, str(f.relative_to(path))) for f in files]
        elif path.is_file():
            found.append((path, arg))
        else:
            raise UsageError(f"no such file or folder: {arg}")
    return found


def load_scripts(paths: Sequence[str]) -> list[Script | FileReport]:
    """Read and parse every script first. One that cannot be read or parsed becomes a
    report of one failure naming its file and line, and the others still run: a script in
    a newer format must not hide the verdicts of the rest."""
    loaded: list[Script | FileReport] = []
    for file, name in collect(paths):
        try:
            script = parse_script(file.read_text(encoding="utf-8"), str(file))
        except (OSError, UnicodeDecodeError) as exc:
            loaded.append(_broken(name, 0, f"cannot read {file}: {exc}"))
            continue
        except FormatError as exc:
            loaded.append(_broken(name, exc.line, str(exc)))
            continue
        script.path = name
        loaded.append(script)
    return loaded


def _broken(name: str, line: int, message: str) -> FileReport:
    return FileReport(name, [Outcome(line, "(the script)", "failed", message)])


_COLUMNS = ("passed", "failed", "skipped", "warn/info")
_SHORT = 300  # characters of a failure shown without --verbose


def _row(name: str, width: int, counts: Sequence[object]) -> str:
    cells = "".join(f"  {c!s:>{len(h)}}" for c, h in zip(counts, _COLUMNS, strict=True))
    return f"{name:<{width}}{cells}"


def _counts(reports: Sequence[FileReport]) -> tuple[int, int, int, int]:
    return (
        sum(r.count("passed") for r in reports),
        sum(r.count("failed") for r in reports),
        sum(r.count("skipped") for r in reports),
        sum(r.annotated for r in reports),
    )


def _short(text: str, verbose: bool) -> str:
    """A long failure keeps its start and its end: "expected X" and "got Y" both show."""
    if verbose or len(text) <= _SHORT:
        return text
    half = _SHORT // 2
    return f"{text[:half]} ... {text[-half:]}"


def _print_details(reports: Sequence[FileReport], verbose: bool, out: TextIO) -> None:
    reasons = Counter(o.message for r in reports for o in r.of("skipped"))
    if reasons:
        print("\nSkipped evals by reason (features outside the supported set):", file=out)
        for reason, count in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0])):
            print(f"{count:>6}  {reason}", file=out)
    failing = [r for r in reports if r.count("failed")]
    if failing:
        title = "Failures:" if verbose else "First failure in each file (--verbose lists all):"
        print(f"\n{title}", file=out)
        for report in failing:
            shown = report.of("failed") if verbose else report.of("failed")[:1]
            for o in shown:
                print(f"{report.path}:{o.line}: {o.eval_text}", file=out)
                print(f"    {_short(o.message, verbose)}", file=out)
    if verbose and reasons:
        print("\nSkipped evals:", file=out)
        for report in reports:
            for o in report.of("skipped"):
                print(f"{report.path}:{o.line}: {o.eval_text}\n    {o.message}", file=out)
    _print_python_warnings(reports, verbose, out)


def _print_python_warnings(reports: Sequence[FileReport], verbose: bool, out: TextIO) -> None:
    warned = [(r.path, o) for r in reports for o in r.outcomes if o.python_warnings]
    if not warned:
        return
    more = "" if verbose else " (--verbose lists them)"
    print(f"\n{len(warned)} evals emitted Python warnings, not counted as failures{more}", file=out)
    if verbose:
        for path, o in warned:
            print(f"{path}:{o.line}: {o.eval_text}", file=out)
            for text in o.python_warnings:
                print(f"    {text}", file=out)


def _as_json(reports: Sequence[FileReport]) -> dict[str, object]:
    def keys(counts: Sequence[int]) -> dict[str, int]:
        return dict(zip(("passed", "failed", "skipped", "warn_info"), counts, strict=True))

    return {
        "files": [
            {
                "file": r.path,
                **keys(_counts([r])),
                "failures": [
                    {"line": o.line, "eval": o.eval_text, "message": o.message}
                    for o in r.of("failed")
                ],
                "skips": [
                    {"line": o.line, "eval": o.eval_text, "reason": o.message}
                    for o in r.of("skipped")
                ],
                "python_warnings": [
                    {"line": o.line, "eval": o.eval_text, "warnings": o.python_warnings}
                    for o in r.outcomes
                    if o.python_warnings
                ],
            }
            for r in reports
        ],
        "total": keys(_counts(reports)),
        "skip_rules": [{"feature": s.feature, "reason": s.reason} for s in SKIP_RULES],
    }


def run_cli(
    paths: Sequence[str],
    *,
    verbose: bool = False,
    as_json: bool = False,
    out: TextIO | None = None,
    err: TextIO | None = None,
    engine_factory: EngineFactory = default_engine,
) -> int:
    """`lookout promql-test`: 0 when no eval failed, 1 when one did, 2 for a usage error.

    The table prints a row per file as it finishes, so a long run shows its progress; with
    `as_json` the rows go to `err` and `out` gets one JSON document at the end.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        scripts = load_scripts(paths)
    except UsageError as exc:
        print(f"lookout promql-test: {exc}", file=err)
        return 2
    width = max(len("total"), *(len(s.path) for s in scripts))
    table = err if as_json else out
    print(_row("file", width, _COLUMNS), file=table, flush=True)
    reports = []
    for script in scripts:
        report = script if isinstance(script, FileReport) else run_script(script, engine_factory)
        reports.append(report)
        print(_row(report.path, width, _counts(reports[-1:])), file=table, flush=True)
    print(_row("total", width, _counts(reports)), file=table, flush=True)
    if as_json:
        json.dump(_as_json(reports), out, indent=2)
        out.write("\n")
    else:
        _print_details(reports, verbose, out)
    return 1 if any(r.count("failed") for r in reports) else 0
