"""Plain data that flows from ingest to the store: one class per kind of record.

Ids are lowercase hex strings (trace 32, span 16). Times are nanoseconds since the epoch
unless a field says otherwise. Attribute maps hold JSON-compatible values.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any, Self

import orjson

Attributes = dict[str, Any]


def json_text(value: Any) -> str:
    """`value` as the store keeps maps and lists: compact JSON text, NaN as null."""
    try:  # orjson: several times faster than json, and NaN becomes null (JSON has no NaN)
        return orjson.dumps(value, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:  # an integer beyond 64 bits
        return json.dumps(value, default=str, separators=(",", ":"))


class SharedJson:
    """json_text() of maps that many records share (a request's resource): each encoded
    once. Keyed by identity, for the length of one batch only."""

    def __init__(self) -> None:
        self._done: dict[int, tuple[object, str]] = {}

    def __call__(self, value: Attributes) -> str:
        found = self._done.get(id(value))
        if found is None or found[0] is not value:
            found = self._done[id(value)] = (value, json_text(value))
        return found[1]


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


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}


def _field_names(kind: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(kind)
    if names is None:
        names = _FIELD_NAMES[kind] = tuple(f.name for f in fields(kind))
    return names


class _Columns:
    """Records held column by column: one list per field, in the order of the fields.

    Spans and log records come in tens of thousands a second. The OTLP intake fills these
    lists straight from the decoded request, the scrubber tests whole columns at once, the
    lists cross from a decoding worker to the server as plain values, and the writer hands
    each to Arrow as it is. An object and a few dicts per record cost more than all of that
    (docs/server.md, "Measured figures"). Maps are held as the JSON text the store keeps;
    the records of one resource share one text."""

    # The columns whose records hold a map or a list, stored as JSON text. `resource` is
    # one too, encoded once for the records that share the map.
    JSON: frozenset[str] = frozenset()

    @classmethod
    def of(cls, records: Iterable[Any]) -> Self:
        """Records (Spans, LogRecords: a field of the same name for each column) as columns."""
        columns = cls()
        resource = SharedJson()
        plain, encoded = [], []  # (field, the column's append), and with its encoding
        for name, column in zip(_field_names(cls), columns.columns(), strict=True):
            if name == "resource" or name in cls.JSON:
                encoded.append((name, column.append, resource if name == "resource" else json_text))
            else:
                plain.append((name, column.append))
        for record in records:
            values = vars(record)
            for name, append in plain:
                append(values[name])
            for name, append, encode in encoded:
                append(encode(values[name]))
        return columns

    def columns(self) -> list[list[Any]]:
        """Every column, in the order of the fields."""
        return [getattr(self, name) for name in _field_names(type(self))]

    def __len__(self) -> int:
        return len(getattr(self, _field_names(type(self))[0]))

    def take(self, rows: Iterable[int]) -> Self:
        """The records at `rows`, in that order."""
        picked = list(rows)
        return type(self)(*([column[i] for i in picked] for column in self.columns()))

    def extend(self, other: Self) -> None:
        for mine, theirs in zip(self.columns(), other.columns(), strict=True):
            mine.extend(theirs)


@dataclass
class SpanColumns(_Columns):
    """Spans as columns (see _Columns), in the order of the store's spans table, less the
    columns the writer works out (duration, ingested, trace key). Intakes with few spans
    (Sentry transactions, the server's own) build Spans and convert them with of()."""

    JSON = frozenset({"attributes", "events", "links"})

    trace_id: list[str] = field(default_factory=list)
    span_id: list[str] = field(default_factory=list)
    parent_span_id: list[str] = field(default_factory=list)  # "": a root
    service: list[str] = field(default_factory=list)
    name: list[str] = field(default_factory=list)
    kind: list[str] = field(default_factory=list)
    start_ns: list[int] = field(default_factory=list)
    end_ns: list[int] = field(default_factory=list)
    status_code: list[str] = field(default_factory=list)
    status_message: list[str] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)  # JSON text
    events: list[str] = field(default_factory=list)  # JSON text
    links: list[str] = field(default_factory=list)  # JSON text
    resource: list[str] = field(default_factory=list)  # JSON text
    scope: list[str] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    adjusted_count: list[float] = field(default_factory=list)  # not stored: for span metrics


@dataclass
class LogColumns(_Columns):
    """Log records as columns (see _Columns), in the order of the store's logs table,
    ingested_ns aside. Intakes with few records (lines, Loki) build LogRecords and convert
    them with of()."""

    JSON = frozenset({"attributes"})

    ts_ns: list[int] = field(default_factory=list)
    observed_ns: list[int] = field(default_factory=list)  # 0: when it was stored
    service: list[str] = field(default_factory=list)
    level: list[str] = field(default_factory=list)
    severity_number: list[int] = field(default_factory=list)
    body: list[str] = field(default_factory=list)
    trace_id: list[str] = field(default_factory=list)
    span_id: list[str] = field(default_factory=list)
    attributes: list[str] = field(default_factory=list)  # JSON text
    resource: list[str] = field(default_factory=list)  # JSON text
    source: list[str] = field(default_factory=list)


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

    spans: SpanColumns = field(default_factory=SpanColumns)
    logs: LogColumns = field(default_factory=LogColumns)
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
