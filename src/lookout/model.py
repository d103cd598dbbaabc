"""Plain data that flows from ingest to the store: one class per kind of record.

Ids are lowercase hex strings (trace 32, span 16). Times are nanoseconds since the epoch
unless a field says otherwise. Attribute maps hold JSON-compatible values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Attributes = dict[str, Any]


@dataclass
class Span:
    trace_id: str
    span_id: str
    parent_span_id: str
    service: str
    name: str
    kind: str
    start_ns: int
    end_ns: int
    status_code: str = "unset"
    status_message: str = ""
    attributes: Attributes = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    links: list[dict[str, Any]] = field(default_factory=list)
    resource: Attributes = field(default_factory=dict)
    scope: str = ""
    source: str = "otlp"
    # How many spans this one stands for: 1/probability when the sampler said (tracestate).
    adjusted_count: float = 1.0


@dataclass
class LogRecord:
    ts_ns: int
    service: str
    level: str
    severity_number: int
    body: str
    trace_id: str = ""
    span_id: str = ""
    attributes: Attributes = field(default_factory=dict)
    resource: Attributes = field(default_factory=dict)
    observed_ns: int = 0
    source: str = "otlp"


@dataclass
class Sample:
    """One point of one series: the metric name and labels identify the series."""

    name: str
    labels: dict[str, str]
    ts_ms: int
    value: float
    exemplar: Attributes | None = None


@dataclass
class ErrorEvent:
    event_id: str
    project_id: int
    ts_ns: int
    fingerprint: str
    title: str
    exception_type: str
    message: str
    level: str
    service: str
    environment: str
    release: str
    trace_id: str
    span_id: str
    user: Attributes
    tags: dict[str, str]
    payload: Attributes


@dataclass
class JobRun:
    """A scheduled job's check-in (Sentry crons): the strategy's Sev3 'cron job failed'."""

    check_in_id: str
    monitor: str
    status: str
    ts_ns: int
    duration_s: float | None
    environment: str
    project_id: int
    trace_id: str = ""


@dataclass
class Batch:
    """What one ingest request stores, in one transaction."""

    spans: list[Span] = field(default_factory=list)
    logs: list[LogRecord] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    events: list[ErrorEvent] = field(default_factory=list)
    job_runs: list[JobRun] = field(default_factory=list)
    # Set by senders that number their batches (`lookout run`): a batch whose key was
    # committed already is a resend and is dropped whole.
    dedup_key: str | None = None

    def __len__(self) -> int:
        return (
            len(self.spans)
            + len(self.logs)
            + len(self.samples)
            + len(self.events)
            + len(self.job_runs)
        )
