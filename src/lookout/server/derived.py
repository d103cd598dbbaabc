"""Every signal also becomes a metric (DESIGN §1), so one rule language serves them all.

- spans: `traces_span_metrics_calls_total` and `traces_span_metrics_duration_seconds`, the
  OpenTelemetry Collector's spanmetrics names, labelled service_name, span_name, span_kind
  and status_code. A span whose W3C tracestate carries the OpenTelemetry sampling threshold
  (`ot=th:…`) counts as 1/probability; other spans count once, as sampled;
- error events: `lookout_error_events_total{service,issue}`;
- logs: `lookout_log_records_total{service,level}`;
- Sentry check-ins: `lookout_job_runs_total{job,status}` and
  `lookout_job_last_success_timestamp_seconds{job}`.

They are counted from what the writer committed (resends excluded) and written into the
store with the server's own metrics, as series with job="lookout". Each family keeps at most
MAX_SERIES label sets; past that, new ones are dropped and counted.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from lookout.model import ErrorEvent, JobRun, LogColumns, SpanColumns
from lookout.sdk._metrics import DEFAULT_BUCKETS
from lookout.store import issue_id

MAX_SERIES = 10_000


class DerivedMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.calls = Counter(
            "traces_span_metrics_calls",
            "Spans received, by service, name, kind and status (sampling-adjusted when known).",
            ["service_name", "span_name", "span_kind", "status_code"],
            registry=registry,
        )
        self.duration = Histogram(
            "traces_span_metrics_duration_seconds",
            "Span durations, by service, name, kind and status.",
            ["service_name", "span_name", "span_kind", "status_code"],
            buckets=DEFAULT_BUCKETS,
            registry=registry,
        )
        self.errors = Counter(
            "lookout_error_events",
            "Error events received, by service and issue.",
            ["service", "issue"],
            registry=registry,
        )
        self.logs = Counter(
            "lookout_log_records",
            "Log records received, by service and level.",
            ["service", "level"],
            registry=registry,
        )
        self.job_runs = Counter(
            "lookout_job_runs",
            "Scheduled job check-ins, by job and status.",
            ["job", "status"],
            registry=registry,
        )
        self.job_last_success = Gauge(
            "lookout_job_last_success_timestamp_seconds",
            "Unix time of each job's last successful check-in.",
            ["job"],
            registry=registry,
        )
        self.dropped = Counter(
            "lookout_derived_series_dropped",
            "Derived samples dropped because their family reached its series limit.",
            ["metric"],
            registry=registry,
        )
        self._seen: dict[str, set[tuple[str, ...]]] = {}
        self._lock = threading.Lock()

    def _admit(self, metric: str, labels: tuple[str, ...]) -> bool:
        with self._lock:
            seen = self._seen.setdefault(metric, set())
            if labels in seen:
                return True
            if len(seen) >= MAX_SERIES:
                self.dropped.labels(metric).inc()
                return False
            seen.add(labels)
            return True

    def observe(
        self,
        spans: SpanColumns,
        logs: LogColumns,
        events: Sequence[ErrorEvent],
        runs: Sequence[JobRun],
    ) -> None:
        """Count records the writer has just committed: grouped by label set first, so
        each series is looked up once per commit, not once per record."""
        durations: dict[tuple[str, ...], list[float]] = collections.defaultdict(list)
        calls: dict[tuple[str, ...], float] = collections.defaultdict(float)
        for key, count, start, end in zip(
            zip(spans.service, spans.name, spans.kind, spans.status_code, strict=True),
            spans.adjusted_count, spans.start_ns, spans.end_ns, strict=True,
        ):  # fmt: skip
            calls[key] += count
            durations[key].append((end - start) / 1e9 if end > start else 0.0)
        for group, seconds in durations.items():
            if self._admit("traces_span_metrics", group):
                self.calls.labels(*group).inc(calls[group])
                child = self.duration.labels(*group)
                for value in seconds:
                    child.observe(value)
        levels = collections.Counter(zip(logs.service, logs.level, strict=True))
        for log_labels, count in levels.items():
            if self._admit("lookout_log_records", log_labels):
                self.logs.labels(*log_labels).inc(count)
        for event in events:
            error_labels = (event.service, issue_id(event.project_id, event.fingerprint))
            if self._admit("lookout_error_events", error_labels):
                self.errors.labels(*error_labels).inc()
        for run in runs:
            run_labels = (run.monitor, run.status)
            if self._admit("lookout_job_runs", run_labels):
                self.job_runs.labels(*run_labels).inc()
                if run.status == "ok":
                    self.job_last_success.labels(run.monitor).set(run.ts_ns / 1e9)
