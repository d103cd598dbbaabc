"""The promqltest script format: Prometheus's PromQL test scripts parsed into commands.

Mirrors promql/promqltest/test.go (Prometheus 3.x) line for line where it matters: lines are
trimmed, a `#` line is blank and so ends a block, `load`/`eval` blocks run to the next blank
line, and the expanding notation (`0+10x5`, `_x3`, `stale`, `{{...}}`) yields the same points,
down to accumulating `a+bxN` by repeated addition. A broken script raises FormatError naming
the file and line; it never surfaces as a traceback.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from lookout.errors import UsageError
from lookout.query.promql.model import STALE_NAN


class FormatError(UsageError):
    """A test script breaks the promqltest format; names the file and line."""

    def __init__(self, path: str, line: int, message: str) -> None:
        self.path = path
        self.line = line
        self.message = message
        super().__init__(f"{path}:{line}: {message}")


@dataclass(frozen=True)
class HistogramValue:
    """A `{{...}}` native histogram point: kept only so skips and point counts are right."""

    text: str


@dataclass(frozen=True)
class StatesetValue:
    """An `ss(...)` stateset point: kept only so the eval is skipped with its reason."""

    text: str


# One position of an expanded sequence: a float (STALE_NAN for `stale`), None for `_`.
Point = float | HistogramValue | StatesetValue | None
LabelsKey = frozenset[tuple[str, str]]


def labels_key(labels: Mapping[str, str]) -> LabelsKey:
    return frozenset(labels.items())


@dataclass
class Load:
    line: int
    interval_ms: int
    with_nhcb: bool
    series: dict[LabelsKey, tuple[dict[str, str], list[Point]]] = field(default_factory=dict)
    start_ms: int = 0  # when the first point is: 0 unless the command gives a start
    # Series whose samples use a feature outside the supported set: labels and which one.
    unsupported: dict[LabelsKey, tuple[dict[str, str], str]] = field(default_factory=dict)


@dataclass
class Clear:
    line: int


@dataclass(frozen=True)
class AnnotationExpectation:
    """An `expect fail|warn|info` qualifier: an exact message, a regex, or (neither) any."""

    message: str | None = None
    regex: str | None = None

    def matches(self, text: str) -> bool:
        if self.message is not None:
            return text == self.message
        if self.regex is not None:
            return re.search(self.regex, text) is not None
        return True

    def __str__(self) -> str:
        if self.message is not None:
            return f"message {self.message!r}"
        return f"pattern {self.regex!r}" if self.regex is not None else "anything"


@dataclass
class ExpectedSeries:
    labels: dict[str, str]
    points: list[Point]
    position: int  # for `ordered`: 1-based, counted as Prometheus counts it


@dataclass
class Eval:
    """One `eval` with its expectations, as Prometheus's evalCmd holds them."""

    line: int
    text: str  # the eval line as written
    query: str
    start_ms: int
    end_ms: int  # an instant eval's time
    step_ms: int
    is_range: bool = False
    fail: AnnotationExpectation | None = None
    expect_fail_lines: int = 0
    ordered: bool = False
    warn_required: bool = False  # eval_warn
    info_required: bool = False  # eval_info
    warns: list[AnnotationExpectation] = field(default_factory=list)
    infos: list[AnnotationExpectation] = field(default_factory=list)
    no_warn: bool = False
    no_info: bool = False
    range_vector: bool = False  # `expect range vector`: an instant query answers a matrix
    expected: dict[LabelsKey, ExpectedSeries] = field(default_factory=dict)
    scalar: Point = None
    expect_scalar: bool = False
    expected_string: str | None = None

    @property
    def checks_annotations(self) -> bool:
        return bool(
            self.warn_required
            or self.info_required
            or self.warns
            or self.infos
            or self.no_warn
            or self.no_info
        )


Command = Load | Clear | Eval


@dataclass
class Script:
    path: str
    commands: list[Command]

    @property
    def evals(self) -> list[Eval]:
        return [c for c in self.commands if isinstance(c, Eval)]


_LOAD = re.compile(r"^load(?:_(with_nhcb))?\s+(.+?)$")
_EVAL_INSTANT = re.compile(
    r"^eval(?:_(fail|warn|ordered|info))?\s+instant\s+(?:at\s+(.+?))?\s+(.+)$"
)
_EVAL_RANGE = re.compile(
    r"^eval(?:_(fail|warn|info))?\s+range\s+from\s+(.+)\s+to\s+(.+)\s+step\s+(.+?)\s+(.+)$"
)
_EXPECT = re.compile(r"^expect\s+(ordered|fail|warn|no_warn|info|no_info)(?:\s+(regex|msg):(.+))?$")
_EXPECT_RANGE = re.compile(r"^expect range vector\s+from\s+(.+)\s+to\s+(.+)\s+step\s+(.+)$")
_DURATION = re.compile(
    r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$"
)
_DURATION_UNITS_MS = (365 * 86_400_000, 7 * 86_400_000, 86_400_000, 3_600_000, 60_000, 1000, 1)
_NUMBER = r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?|[iI][nN][fF]|[nN][aA][nN]"
_ITEM = re.compile(
    rf"^(?P<a>[-+]?(?:{_NUMBER}))(?:(?:(?P<op>[-+])(?P<b>{_NUMBER}))?x(?P<n>[0-9]+))?$"
)
_BLANKS = re.compile(r"^_(?:x(?P<n>[0-9]+))?$")
_HISTOGRAM_TAIL = re.compile(r"x([0-9]+)|[-+](?=\{\{)")
_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_ESCAPES = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, "'": 39, '"': 34}


def _start_ms(text: str) -> int:
    """A load's start: seconds as a number, or a duration."""
    try:
        return round(float(text) * 1000)
    except ValueError:
        return parse_duration(text)


def parse_duration(text: str) -> int:
    """Milliseconds of a Prometheus duration such as `1m30s` (model.ParseDuration)."""
    if text == "0":
        return 0
    match = _DURATION.match(text)
    if not text or match is None:
        raise ValueError(f"invalid duration {text!r}; expected one such as 0, 5m, 1m30s or 10s53ms")
    return sum(
        int(g) * unit for g, unit in zip(match.groups(), _DURATION_UNITS_MS, strict=True) if g
    )


def _number(text: str) -> float:
    return float(text)  # Python reads inf, -Inf, NaN, 1e3 and .5 as Go's ParseFloat does


def parse_points(text: str) -> list[Point]:
    """Expand a sequence in promqltest's notation: `1 2 _ stale 0+10x3 5-1x2 _x2 {{...}}x1`.

    `a+bxN` and `a-bxN` are N+1 points starting at a; `axN` repeats a N+1 times; `_xN` is N
    skipped steps. Additions accumulate as Prometheus's parser does, so values match to the bit.
    """
    points: list[Point] = []
    pos = 0
    while pos < len(text):
        if text[pos].isspace():
            pos += 1
            continue
        if text.startswith("{{", pos):
            pos = _histogram_item(text, pos, points)
            continue
        end = pos
        while end < len(text) and not text[end].isspace():
            end += 1
        points.extend(_float_item(text[pos:end]))
        pos = end
    return points


def _histogram_item(text: str, pos: int, points: list[Point]) -> int:
    close = text.find("}}", pos)
    if close < 0:
        raise ValueError(f"native histogram {text[pos : pos + 30]!r}... has no closing }}}}")
    value = HistogramValue(text[pos : close + 2])
    pos = close + 2
    tail = _HISTOGRAM_TAIL.match(text, pos)
    if tail is None:
        points.append(value)
        return pos
    if tail.group(1) is not None:  # {{...}}xN
        points.extend([value] * (int(tail.group(1)) + 1))
        return tail.end()
    close = text.find("}}", tail.end())  # {{...}}+{{...}}xN
    repeat = re.compile(r"x([0-9]+)").match(text, close + 2) if close >= 0 else None
    if repeat is None:
        raise ValueError(f"native histogram series {text[pos - 10 : pos + 30]!r} lacks xN")
    points.extend([value] * (int(repeat.group(1)) + 1))
    return repeat.end()


def _float_item(item: str) -> list[Point]:
    if item == "stale":
        return [STALE_NAN]
    blanks = _BLANKS.match(item)
    if blanks:
        return [None] * int(blanks.group("n") or 1)
    match = _ITEM.match(item)
    if match is None:
        raise ValueError(
            f"invalid point {item!r}; expected a number, _, _xN, stale, aXN, a+bxN or a-bxN"
        )
    value = _number(match.group("a"))
    if match.group("n") is None:
        return [value]
    step = _number(match.group("b")) if match.group("b") else 0.0
    if match.group("op") == "-":
        step = -step
    out: list[Point] = []
    for _ in range(int(match.group("n")) + 1):
        out.append(value)
        value += step
    return out


def _read_string(text: str, pos: int) -> tuple[str, int]:
    """A quoted string at `pos` (double, single or backtick, with Go's escapes)."""
    quote = text[pos]
    if quote == "`":
        end = text.find("`", pos + 1)
        if end < 0:
            raise ValueError("unterminated raw string")
        return text[pos + 1 : end], end + 1
    out = bytearray()
    i = pos + 1
    while i < len(text):
        char = text[i]
        if char == quote:
            return out.decode("utf-8", "surrogateescape"), i + 1
        if char != "\\":
            out += char.encode("utf-8", "surrogateescape")
            i += 1
            continue
        code = text[i + 1 : i + 2]
        if code in _ESCAPES:
            out.append(_ESCAPES[code])
            i += 2
        elif code == "x":
            out.append(int(text[i + 2 : i + 4], 16))
            i += 4
        elif code in ("u", "U"):
            width = 4 if code == "u" else 8
            out += chr(int(text[i + 2 : i + 2 + width], 16)).encode("utf-8")
            i += 2 + width
        elif code.isdigit():
            out.append(int(text[i + 1 : i + 4], 8))
            i += 4
        else:
            raise ValueError(f"unknown escape \\{code} in string")
    raise ValueError(f"unterminated string starting {text[pos : pos + 20]!r}")


def _skip_blank(text: str, pos: int) -> int:
    while pos < len(text) and text[pos].isspace():
        pos += 1
    return pos


def parse_series(line: str) -> tuple[dict[str, str], list[Point]]:
    """`metric{label="value", ...} points`: the labels (with `__name__`) and the points."""
    labels, pos = series_head(line)
    points = parse_points(line[pos:])
    if not points:
        raise ValueError(f"series {line!r} has no points")
    return labels, points


def series_head(line: str) -> tuple[dict[str, str], int]:
    """The labels of `metric{label="value", ...} ...` and where what follows them starts."""
    labels: dict[str, str] = {}
    pos = 0
    name = _IDENT.match(line)
    if name:
        labels["__name__"] = name.group()
        pos = name.end()
    if line.startswith("{", pos):
        pos = _read_labels(line, pos + 1, labels)
    elif not name:
        raise ValueError(f'expected a series such as metric{{label="value"}}, got {line!r}')
    if pos < len(line) and not line[pos].isspace() and not line.startswith("@st", pos):
        raise ValueError(f"unexpected {line[pos:]!r} after the series labels")
    return labels, pos


def _read_labels(line: str, pos: int, labels: dict[str, str]) -> int:
    while True:
        pos = _skip_blank(line, pos)
        if line.startswith("}", pos):
            return pos + 1
        if pos < len(line) and line[pos] in "\"'`":
            name, pos = _read_string(line, pos)
            pos = _skip_blank(line, pos)
            if not line.startswith("=", pos):  # Prometheus 3: a quoted metric name
                labels["__name__"] = name
                pos = _after_label(line, pos)
                continue
        else:
            match = _LABEL.match(line, pos)
            if match is None:
                raise ValueError(f"expected a label name at {line[pos:]!r}")
            name, pos = match.group(), _skip_blank(line, match.end())
        if not line.startswith("=", pos):
            raise ValueError(f"expected = after label {name!r}")
        pos = _skip_blank(line, pos + 1)
        if pos >= len(line) or line[pos] not in "\"'`":
            raise ValueError(f"expected a quoted value for label {name!r}")
        labels[name], pos = _read_string(line, pos)
        pos = _after_label(line, pos)


def _after_label(line: str, pos: int) -> int:
    pos = _skip_blank(line, pos)
    if line.startswith(",", pos):
        return pos + 1
    if line.startswith("}", pos):
        return pos
    raise ValueError(f"expected , or }} in labels at {line[pos:]!r}")


def _scalar_line(text: str) -> float | None:
    """A bare number line (Go's ParseInt with base 0, then ParseFloat), else None."""
    try:
        return float(int(text, 0))
    except ValueError:
        pass
    if "_" in text:
        return None
    try:
        return float(text)
    except ValueError:
        return None


def parse_script(text: str, path: str = "<script>") -> Script:
    """Commands of a test script. Raises FormatError naming path:line for a broken script."""
    raw = text.split("\n")
    lines = ["" if s.strip().startswith("#") else s.strip() for s in raw]
    commands: list[Command] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line:
            i += 1
            continue
        try:
            command, i = _parse_command(lines, i)
        except _LineError as exc:
            raise FormatError(path, exc.index + 1, exc.message) from None
        commands.append(command)
    return Script(path, commands)


def _parse_command(lines: list[str], i: int) -> tuple[Command, int]:
    """The command starting at line index `i`, and the index after it."""
    line = lines[i]
    word = re.split(r"[\t ]+", line, maxsplit=1)[0].lower()
    if word == "clear":
        return Clear(i + 1), i + 1
    if word.startswith("load"):
        return _parse_load(lines, i)
    if word.startswith("eval"):
        return _parse_eval(lines, i)
    raise _LineError(i, f"unknown command {line!r}; expected load, clear or eval")


class _LineError(Exception):
    def __init__(self, index: int, message: str) -> None:
        self.index = index
        self.message = message
        super().__init__(message)


def _parse_load(lines: list[str], i: int) -> tuple[Load, int]:
    match = _LOAD.match(lines[i])
    if match is None:
        raise _LineError(i, "invalid load command; expected load[_with_nhcb] <interval>")
    interval, _, start = match.group(2).partition(" ")
    try:
        load = Load(i + 1, parse_duration(interval), match.group(1) == "with_nhcb")
        if start.strip():  # `load 30s 150`: the first point at 150 s (newer Prometheus)
            load.start_ms = _start_ms(start.strip())
    except ValueError as exc:
        raise _LineError(i, f"invalid load interval: {exc}") from None
    i += 1
    while i < len(lines) and lines[i]:
        line = lines[i].strip()
        try:
            if line.startswith("@st"):  # start timestamps for every series of the load
                load.unsupported[frozenset()] = ({}, "start_timestamps")
                i += 1
                continue
            labels, pos = series_head(line)
            rest = line[pos:]
            feature = None
            if rest.startswith("@st"):  # start timestamps for the next line's samples
                feature = "start_timestamps"
            elif rest.strip().startswith("ss("):
                feature = "statesets"
            if feature is not None:
                load.unsupported[labels_key(labels)] = (labels, feature)
            else:
                labels, points = parse_series(line)
                load.series[labels_key(labels)] = (labels, points)
        except ValueError as exc:
            raise _LineError(i, str(exc)) from None
        i += 1
    return load, i


def _parse_eval(lines: list[str], i: int) -> tuple[Eval, int]:
    line = lines[i]
    instant, ranged = _EVAL_INSTANT.match(line), _EVAL_RANGE.match(line)
    try:
        if instant:
            modifier, at, query = instant.groups()
            time_ms = parse_duration(at or "")
            ev = Eval(i + 1, line, query, time_ms, time_ms, 0, is_range=False)
        elif ranged:
            modifier, start, end, step, query = ranged.groups()
            ev = Eval(i + 1, line, query, *_range_times(start, end, step), is_range=True)
        else:
            raise _LineError(
                i,
                "invalid eval; expected 'eval[_fail|_warn|_info|_ordered] instant at <time> "
                "<query>' or 'eval[_fail|_warn|_info] range from <t> to <t> step <d> <query>'",
            )
    except ValueError as exc:
        raise _LineError(i, str(exc)) from None
    ev.fail = AnnotationExpectation() if modifier == "fail" else None
    ev.ordered = modifier == "ordered"
    ev.warn_required = modifier == "warn"
    ev.info_required = modifier == "info"
    position = 1
    i += 1
    while i < len(lines) and lines[i]:
        try:
            done, position = _eval_line(ev, lines[i], position)
        except ValueError as exc:
            raise _LineError(i, str(exc)) from None
        if done:  # Prometheus ends the block after a scalar or an expected_fail_* line
            return ev, i + 1
        i += 1
    return ev, i


def _range_times(start: str, end: str, step: str) -> tuple[int, int, int]:
    start_ms, end_ms, step_ms = parse_duration(start), parse_duration(end), parse_duration(step)
    if end_ms < start_ms:
        raise ValueError(f"end {end!r} is before start {start!r}")
    return start_ms, end_ms, step_ms


def _eval_line(ev: Eval, line: str, position: int) -> tuple[bool, int]:
    """Apply one line of an eval block; returns (block ends, next position)."""
    directive = _eval_directive(ev, line, position)
    if directive is not None:
        return directive
    if line.split(" ", maxsplit=1)[0] == "expect":
        _expect(ev, line)
        return False, position
    scalar = _scalar_line(line)
    if scalar is not None:
        ev.scalar, ev.expect_scalar = scalar, True
        return True, position
    labels, pos = series_head(line)
    rest = line[pos:].strip()
    if rest.startswith("ss("):  # an expected stateset value
        ev.expected[labels_key(labels)] = ExpectedSeries(labels, [StatesetValue(rest)], position)
        ev.expect_scalar = False
        return False, position + 1
    labels, points = parse_series(line)
    if len(points) > 1 and not ev.is_range and not ev.range_vector:
        raise ValueError(
            "an instant eval expects one value per series; use 'expect range vector' for a matrix"
        )
    ev.expected[labels_key(labels)] = ExpectedSeries(labels, points, position)
    ev.expect_scalar = False
    return False, position + 1


def _eval_directive(ev: Eval, line: str, position: int) -> tuple[bool, int] | None:
    """The lines test.go checks before `expect`: expected_fail_*, range vector, string."""
    if ev.fail is not None and line.startswith("expected_fail_message"):
        ev.fail = AnnotationExpectation(message=line.removeprefix("expected_fail_message").strip())
        return True, position
    if ev.fail is not None and line.startswith("expected_fail_regexp"):
        pattern = line.removeprefix("expected_fail_regexp").strip()
        ev.fail = AnnotationExpectation(regex=_checked_regex(pattern))
        return True, position
    if line.startswith("expect range vector"):
        match = _EXPECT_RANGE.match(line)
        if match is None:
            raise ValueError(
                f"invalid {line!r}; expected 'expect range vector from <t> to <t> step <d>'"
            )
        ev.start_ms, ev.end_ms, ev.step_ms = _range_times(*match.groups())
        ev.range_vector = True
        return False, position + 1
    if line.startswith("expect string"):
        rest = line.removeprefix("expect string").strip()
        if not rest:
            raise ValueError("expect string needs a quoted string literal")
        ev.expected_string, end = _read_string(rest, 0)
        if end != len(rest):
            raise ValueError(f"unexpected {rest[end:]!r} after the expected string")
        return False, position + 1
    return None


def _checked_regex(pattern: str) -> str:
    try:
        re.compile(pattern)  # Go's RE2 patterns in these files mean the same in Python's re
    except re.error as exc:
        raise ValueError(f"invalid regex {pattern!r}: {exc}") from None
    return pattern


def _expect(ev: Eval, line: str) -> None:
    match = _EXPECT.match(line.strip())
    if match is None:
        raise ValueError(
            f"invalid {line!r}; expected 'expect <ordered|fail|warn|no_warn|info|no_info> "
            "[msg:<text>|regex:<pattern>]'"
        )
    kind, how, text = match.groups()
    expectation = AnnotationExpectation()
    if how == "msg":
        expectation = AnnotationExpectation(message=text.strip())
    elif how == "regex":
        expectation = AnnotationExpectation(regex=_checked_regex(text.strip()))
    if kind == "ordered":
        ev.ordered = True
    elif kind == "fail":
        ev.expect_fail_lines += 1
        if ev.expect_fail_lines > 1:
            raise ValueError("an eval takes at most one 'expect fail' line")
        ev.fail = expectation
    elif kind in ("warn", "info"):
        (ev.warns if kind == "warn" else ev.infos).append(expectation)
    else:
        ev.no_warn = ev.no_warn or kind == "no_warn"
        ev.no_info = ev.no_info or kind == "no_info"
    if ev.warns and ev.no_warn:
        raise ValueError("warn and no_warn cannot be used together")
    if ev.infos and ev.no_info:
        raise ValueError("info and no_info cannot be used together")
