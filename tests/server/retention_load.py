"""A week of telemetry replayed through the store's writer with retention enforced as the
server enforces it, and `du` of the data directory sampled all along.

Shared by tests/server/test_retention.py (a scaled run) and bench/retention.py (1 GB).
The replay runs day by day, from `days - 1` days ago to today, in batches of logs, spans
and metric samples. Ingested bytes are the records' JSON size. Every `enforce_every` bytes
stands for one retention period of the server (60 s), at each new day the compaction runs
(as its hourly run would), and every `sample_every` bytes `du` is read, just before any
enforcement: the worst moment.
"""

from __future__ import annotations

import collections
import json
import os
import random
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from lookout.model import Batch, LogColumns, LogRecord, Sample, Span, SpanColumns
from lookout.selfmetrics import ServerMetrics
from lookout.store import Database, Retention, RetentionPolicy, Writer

MB = 1_000_000
SERVICES = [f"svc-{name}" for name in ("gateway", "booking", "payment", "seats", "notify")]
ROUTES = [f"/api/v1/{noun}/{{id}}" for noun in ("trips", "seats", "payments", "users", "routes")]
WORDS = [
    "booking",
    "payment",
    "seat",
    "route",
    "driver",
    "ticket",
    "refund",
    "timeout",
    "upstream",
    "gateway",
    "cache",
    "miss",
    "hit",
    "user",
    "request",
    "failed",
    "ok",
    "retry",
    "reserved",
    "confirmed",
    "cancelled",
    "latency",
    "queue",
    "worker",
]


@dataclass(frozen=True)
class DiskSample:
    """The data directory's size at one point of the replay, four ways."""

    ingested: int  # JSON bytes written so far
    apparent: int  # file sizes summed over os.walk (what `du -sb` reports)
    allocated: int  # allocated blocks summed over os.walk (what plain `du` reports)
    du_sb: int  # the real `du -sb`
    du_blocks: int  # the real `du -s -B1`

    @property
    def most(self) -> int:
        return max(self.apparent, self.allocated, self.du_sb, self.du_blocks)


@dataclass
class LoadResult:
    samples: list[DiskSample] = field(default_factory=list)
    dropped: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    closed: int = 0
    ingested: int = 0
    enforce_seconds: list[float] = field(default_factory=list)  # each run, writer time
    seconds: float = 0.0

    @property
    def max_du(self) -> int:
        return max(s.most for s in self.samples)


def measure(path: Path, ingested: int) -> DiskSample:
    apparent = allocated = 0
    for root, dirs, files in os.walk(path):
        for name in (*dirs, *files):
            try:
                stat = os.lstat(Path(root, name))
            except FileNotFoundError:
                continue
            apparent += stat.st_size
            allocated += stat.st_blocks * 512
    top = os.lstat(path)
    apparent, allocated = apparent + top.st_size, allocated + top.st_blocks * 512
    return DiskSample(ingested, apparent, allocated, _du(path, "-sb"), _du(path, "-sB1"))


def _du(path: Path, flags: str) -> int:
    found = subprocess.run(["du", flags, str(path)], capture_output=True, text=True, check=True)
    return int(found.stdout.split()[0])


class Telemetry:
    """Deterministic batches that look like a small bus-booking system's telemetry."""

    def __init__(self, seed: int = 6, series: int = 400) -> None:
        self.rng = random.Random(seed)
        rng = self.rng
        self.series = [
            ("http_server_request_duration_seconds_bucket",
             {"job": rng.choice(SERVICES), "instance": f"10.0.0.{i % 50}:9464",
              "http_route": rng.choice(ROUTES), "le": str(rng.choice([0.1, 0.5, 1, 5]))})
            for i in range(series)
        ]  # fmt: skip

    def batch(self, ts_ns: int, logs: int = 800, spans: int = 300) -> tuple[Batch, int]:
        """One batch at about `ts_ns`, and its size as JSON."""
        rng = self.rng
        out = Batch()
        span_list = []
        for i in range(spans):
            trace = f"{rng.getrandbits(128):032x}"
            start = ts_ns + i * 1000
            span_list.append(
                Span(trace, f"{rng.getrandbits(64):016x}", "", rng.choice(SERVICES),
                     f"GET {rng.choice(ROUTES)}", "server", start,
                     start + rng.randint(1, 900) * 1_000_000,
                     status_code=rng.choice(["unset", "unset", "unset", "error"]),
                     attributes={"http.route": rng.choice(ROUTES),
                                 "http.response.status_code": rng.choice([200, 200, 201, 404, 500]),
                                 "user.id": f"u{rng.randint(0, 50_000)}"},
                     resource={"service.name": rng.choice(SERVICES),
                               "host.name": f"node-{rng.randint(0, 7)}"})
            )  # fmt: skip
        out.spans = SpanColumns.of(span_list)
        records = []
        for i in range(logs):
            words = " ".join(rng.choices(WORDS, k=rng.randint(6, 30)))
            records.append(
                LogRecord(ts_ns + i * 1000, rng.choice(SERVICES),
                          rng.choice(["info", "info", "info", "warn", "error"]), 9,
                          f"{words} booking_id={rng.getrandbits(48):x} "
                          f"request_id={rng.getrandbits(128):032x} "
                          f"digest={rng.getrandbits(256):064x}",
                          trace_id=f"{rng.getrandbits(128):032x}",
                          span_id=f"{rng.getrandbits(64):016x}",
                          attributes={"logger": "app", "duration_ms": round(rng.random() * 900, 2)},
                          resource={"service.name": "busline"})
            )  # fmt: skip
        out.logs = LogColumns.of(records)
        ts_ms = ts_ns // 1_000_000
        out.samples.extend(
            Sample(name, labels, ts_ms, float(rng.randint(0, 10_000)))
            for name, labels in self.series
        )
        size = sum(
            len(json.dumps(vars(r), default=str)) for r in (*span_list, *records, *out.samples)
        )
        return out, size


def _timestamps(days: int, now_s: float, steps: int) -> Iterator[int]:
    """`steps` times spread evenly over `days` UTC days ending now, oldest first."""
    midnight = datetime.fromtimestamp(now_s, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start = midnight.timestamp() - (days - 1) * 86400
    span = max(now_s - 1 - start, 1.0)
    for step in range(steps):
        yield int((start + span * step / steps) * 1e9)


def run_load(
    data_dir: Path,
    policy: RetentionPolicy,
    total: int,
    *,
    enforce_every: int,
    sample_every: int,
    days: int = 6,
    progress: Callable[[DiskSample], None] | None = None,
) -> LoadResult:
    """Replay about `total` JSON bytes over `days` days with `policy` enforced."""
    began = time.perf_counter()
    database = Database(data_dir)
    writer = Writer(database, ServerMetrics())
    writer.start()
    retention = Retention(database, policy, ServerMetrics())
    telemetry = Telemetry()
    result = LoadResult()
    _, one = telemetry.batch(0)
    steps = max(total // one, 1)
    next_enforce, next_sample, day = enforce_every, sample_every, ""
    try:
        for ts_ns in _timestamps(days, time.time(), steps):
            today = datetime.fromtimestamp(ts_ns / 1e9, UTC).strftime("%Y%m%d")
            if today != day:  # a new day: the compaction's run (hourly), then retention's
                yesterday = datetime.fromtimestamp(time.time() - 86400, UTC)
                writer.close_days_before(yesterday.strftime("%Y%m%d")).result(120)
                day, next_enforce = today, result.ingested
            if result.ingested >= next_enforce:
                next_enforce = result.ingested + enforce_every
                started = time.perf_counter()
                report = retention.submit(writer, time.time()).result(120)
                result.enforce_seconds.append(time.perf_counter() - started)
                result.closed += len(report.closed)
                result.dropped.update((d.signal, d.reason) for d in report.dropped)
            batch, size = telemetry.batch(ts_ns)
            writer.submit(batch).result(60)
            result.ingested += size
            if result.ingested >= next_sample:
                next_sample += sample_every
                result.samples.append(measure(data_dir, result.ingested))
                if progress is not None:
                    progress(result.samples[-1])
        result.samples.append(measure(data_dir, result.ingested))
    finally:
        writer.stop()
        database.close()
    result.seconds = time.perf_counter() - began
    return result
