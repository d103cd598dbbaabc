"""The two servers bench/promql.py compares, and how it asks them: a Prometheus process on
TSDB blocks, a `lookout server` process on a data directory, both queried over HTTP through
the same client; their answers parsed into one shape and compared point by point."""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from _server import free_port, stop, wait_ready

# Compression off on both sides: the engines and their JSON are measured, not gzip.
HEADERS = {"accept-encoding": "identity"}
Labels = frozenset[tuple[str, str]]


def prometheus_version() -> str | None:
    if shutil.which("prometheus") is None or shutil.which("promtool") is None:
        return None
    done = subprocess.run(["prometheus", "--version"], capture_output=True, text=True, check=False)
    first = (done.stdout or done.stderr).splitlines()
    return first[0] if first else "prometheus (unknown version)"


@dataclass
class Running:
    url: str
    pid: int
    name: str


@contextmanager
def prometheus_server(blocks: Path, ready_timeout_s: float = 300.0) -> Iterator[Running]:
    """`prometheus` on the blocks in `blocks`: no scrape jobs, compaction off (min = max block
    duration, so the imported blocks stay as they are and nothing compacts during the
    measurement), retention far beyond the data."""
    port = free_port()
    config = blocks.parent / "prometheus.yml"
    config.write_text("global:\n  evaluation_interval: 1m\nscrape_configs: []\n")
    log = blocks.parent / "prometheus.log"
    command = [
        "prometheus", f"--config.file={config}", f"--storage.tsdb.path={blocks}",
        f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=3650d",
        "--storage.tsdb.min-block-duration=2h", "--storage.tsdb.max-block-duration=2h",
        "--query.lookback-delta=5m", "--log.level=warn",
    ]  # fmt: skip
    with log.open("wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/-/ready", process, ready_timeout_s, "prometheus", log)
        yield Running(url, process.pid, "prometheus")
    finally:
        stop(process, timeout_s=60)


def wait_for_writer(url: str) -> None:
    """One span through the writer: returns once the startup compaction and retention,
    queued before it on the writer thread, are done."""
    now = time.time_ns()
    body = {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "probe"}}]},
        "scopeSpans": [{"spans": [{"traceId": os.urandom(16).hex(), "spanId": os.urandom(8).hex(),
                                   "name": "probe", "kind": 2,
                                   "startTimeUnixNano": str(now - 10**6),
                                   "endTimeUnixNano": str(now)}]}]}]}  # fmt: skip
    httpx.post(f"{url}/v1/traces", json=body, timeout=900)


def fresh_copy(template: Path, scratch: Path, name: str) -> Path:
    """A copy of a cached data directory for one server run: every run starts from the same
    store, and the cache is never written by a server."""
    target = scratch / name
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(template, target)
    return target


def scratch_dir(work: Path) -> Path:
    return Path(tempfile.mkdtemp(prefix="run-", dir=work))


# -- asking ------------------------------------------------------------------------------------
@dataclass
class Answer:
    """One HTTP answer: its wall time, and the result as {labels: [(ms, value)]}, or an error."""

    seconds: float
    result: dict[Labels, list[tuple[int, float]]] | None = None
    result_type: str = ""
    error: str | None = None


def ask(
    client: httpx.Client, base: str, query: str, time_s: float | None = None,
    span: tuple[float, float, float] | None = None,
) -> Answer:  # fmt: skip
    """GET /api/v1/query (at `time_s`) or /api/v1/query_range (`span` = start, end, step)."""
    if span is None:
        path, params = "/api/v1/query", {"query": query, "time": _seconds(time_s or 0.0)}
    else:
        path = "/api/v1/query_range"
        params = {"query": query, "start": _seconds(span[0]), "end": _seconds(span[1]),
                  "step": _seconds(span[2])}  # fmt: skip
    began = time.perf_counter()
    try:
        response = client.get(f"{base}{path}", params=params, headers=HEADERS)
    except httpx.HTTPError as exc:
        return Answer(time.perf_counter() - began, error=f"{type(exc).__name__}: {exc}")
    seconds = time.perf_counter() - began
    try:
        body = response.json()
    except ValueError:
        return Answer(seconds, error=f"HTTP {response.status_code}: {response.text[:300]!r}")
    if response.status_code != 200 or body.get("status") != "success":
        message = body.get("error") or body.get("message") or body
        return Answer(seconds, error=f"HTTP {response.status_code}: {str(message)[:300]}")
    data = body.get("data", {})
    return Answer(seconds, _parse(data), data.get("resultType", ""))


def _seconds(value: float) -> str:
    return f"{value:.3f}"


def _number(text: Any) -> float:
    return float(text)  # "NaN", "+Inf", "-Inf" and plain decimals all parse


def _parse(data: dict[str, Any]) -> dict[Labels, list[tuple[int, float]]]:
    kind = data.get("resultType")
    result = data.get("result") or []
    if kind == "scalar":
        at, value = result
        return {frozenset(): [(round(float(at) * 1000), _number(value))]}
    parsed: dict[Labels, list[tuple[int, float]]] = {}
    for item in result:
        labels = frozenset(item.get("metric", {}).items())
        points = item["values"] if "values" in item else [item["value"]]
        parsed[labels] = [(round(float(at) * 1000), _number(value)) for at, value in points]
    return parsed


# -- comparing ---------------------------------------------------------------------------------
def relative_difference(a: float, b: float) -> float:
    """|a - b| / max(|a|, |b|); 0 when both are NaN, equal infinities or both 0."""
    if math.isnan(a) or math.isnan(b):
        return 0.0 if math.isnan(a) and math.isnan(b) else math.inf
    if a == b:
        return 0.0
    if math.isinf(a) or math.isinf(b):
        return math.inf
    return abs(a - b) / max(abs(a), abs(b))


@dataclass
class Comparison:
    series: int = 0  # in Prometheus's answer
    points: int = 0
    max_rel_diff: float = 0.0
    worst: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)
    missing_series: int = 0
    extra_series: int = 0
    point_mismatches: int = 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "series": self.series,
            "points": self.points,
            "max_rel_diff": _finite(self.max_rel_diff),
            "missing_series": self.missing_series,
            "extra_series": self.extra_series,
            "point_mismatches": self.point_mismatches,
        }
        if self.worst is not None and self.max_rel_diff > 0:
            out["worst"] = self.worst
        if self.problems:
            out["problems"] = self.problems[:5]
        return out


def _finite(value: float) -> float | str:
    return value if math.isfinite(value) else str(value)


def _name(labels: Labels) -> str:
    return "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels)) + "}"


def compare(
    lookout: dict[Labels, list[tuple[int, float]]],
    prometheus: dict[Labels, list[tuple[int, float]]],
) -> Comparison:
    """Series matched by labels, points by timestamp; a series or point on one side only is a
    failure (its relative difference counts as infinite)."""
    out = Comparison(series=len(prometheus))
    for labels, expected in prometheus.items():
        out.points += len(expected)
        got = lookout.get(labels)
        if got is None:
            out.missing_series += 1
            out.max_rel_diff = math.inf
            out.problems.append(f"missing in Lookout: {_name(labels)}")
            continue
        theirs = dict(expected)
        ours = dict(got)
        if theirs.keys() != ours.keys():
            only_theirs = sorted(theirs.keys() - ours.keys())
            only_ours = sorted(ours.keys() - theirs.keys())
            out.point_mismatches += len(only_theirs) + len(only_ours)
            out.max_rel_diff = math.inf
            out.problems.append(
                f"{_name(labels)}: {len(only_theirs)} points only in Prometheus "
                f"(first {only_theirs[:1]}), {len(only_ours)} only in Lookout "
                f"(first {only_ours[:1]})"
            )
        for at in theirs.keys() & ours.keys():
            diff = relative_difference(ours[at], theirs[at])
            if diff > out.max_rel_diff or (out.worst is None and diff > 0):
                out.max_rel_diff = max(out.max_rel_diff, diff)
                out.worst = {"labels": _name(labels), "time_ms": at, "lookout": _finite(ours[at]),
                             "prometheus": _finite(theirs[at])}  # fmt: skip
    for labels in lookout.keys() - prometheus.keys():
        out.extra_series += 1
        out.max_rel_diff = math.inf
        out.problems.append(f"only in Lookout: {_name(labels)}")
    return out
