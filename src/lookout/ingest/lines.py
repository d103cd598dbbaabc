"""Shipped stdout and stderr lines (`lookout run`), into log records.

A batch is `{"source": ID, "seq": N, "service": NAME, "dropped": K, "lines": [{"ts_ns": T,
"stream": "stdout"|"stderr", "text": LINE}]}`. The server keeps a batch once per (source,
seq), so a resend after a lost answer creates no duplicates, while two identical lines are
two records.

JSON lines are parsed: `timestamp`, `level`, `event` (or `message`/`msg`), `logger`,
`trace_id` and `span_id` become fields, everything else becomes attributes. Other lines
(a multi-line traceback arrives as one) are plain records: level `error` on stderr,
`info` on stdout.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any

from lookout.errors import IngestError
from lookout.ingest.jsonbody import loads_text, valid_text
from lookout.ingest.limits import Limits
from lookout.ingest.otlp import Outcome
from lookout.model import LogRecord

MAX_LINES_PER_BATCH = 10_000
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_LEVELS = {
    "warn": "warning", "err": "error", "critical": "fatal", "exception": "error",
    "information": "info", "notice": "info",
}  # fmt: skip
_SEVERITY = {"trace": 1, "debug": 5, "info": 9, "warning": 13, "error": 17, "fatal": 21}
_MESSAGE_KEYS = ("event", "message", "msg")
_FIELD_KEYS = frozenset({"timestamp", "time", "ts", "level", "severity", "logger", "service",
                         "trace_id", "span_id", *_MESSAGE_KEYS})  # fmt: skip


def _timestamp(value: Any) -> int | None:
    if isinstance(value, int | float) and 0 < value < 4e18:  # past 4e18 no scale fits
        # Seconds, milliseconds, microseconds or nanoseconds, by magnitude.
        for scale in (1e9, 1e6, 1e3, 1.0):
            candidate = value * scale
            if candidate < 4e18:
                return int(candidate)
        return None
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        # Whole seconds and microseconds apart: a float would lose the last digits.
        return int(moment.timestamp()) * 10**9 + moment.microsecond * 1000
    return None


def _level(value: Any, default: str) -> str:
    if not isinstance(value, str) or not value:
        return default
    lowered = value.strip().lower()
    return _LEVELS.get(lowered, lowered)


def parse_line(text: str, *, ts_ns: int, stream: str, service: str, source: str) -> LogRecord:
    """One shipped line as a log record."""
    default_level = "error" if stream == "stderr" else "info"
    stripped = text.strip()
    if stripped.startswith("{") and stripped.endswith("}"):
        try:
            document = loads_text(stripped)
        except (ValueError, RecursionError):  # not JSON after all: kept as plain text
            document = None
        if isinstance(document, dict):
            body = next((document[k] for k in _MESSAGE_KEYS if k in document), "")
            level = _level(document.get("level") or document.get("severity"), default_level)
            trace_id = str(document.get("trace_id") or "").lower()
            span_id = str(document.get("span_id") or "").lower()
            stamp = _timestamp(
                document.get("timestamp") or document.get("time") or document.get("ts")
            )
            attributes = {k: v for k, v in document.items() if k not in _FIELD_KEYS}
            if "logger" in document:
                attributes["logger"] = document["logger"]
            attributes["stream"] = stream
            return LogRecord(
                ts_ns=stamp or ts_ns,
                service=str(document.get("service") or service),
                level=level,
                severity_number=_SEVERITY.get(level, 0),
                body=body if isinstance(body, str) else json.dumps(body, default=str),
                trace_id=trace_id if _HEX32.fullmatch(trace_id) else "",
                span_id=span_id if _HEX16.fullmatch(span_id) else "",
                attributes=attributes,
                resource={"service.name": service},
                observed_ns=ts_ns,
                source=source,
            )
    return LogRecord(
        ts_ns=ts_ns,
        service=service,
        level=default_level,
        severity_number=_SEVERITY[default_level],
        body=text,
        attributes={"stream": stream},
        resource={"service.name": service},
        observed_ns=ts_ns,
        source=source,
    )


def read_batch(document: Any, limits: Limits, now_ns: int) -> tuple[str, Outcome, int]:
    """(dedup key, records, lines the shipper reports it dropped) of one batch."""
    if not isinstance(document, dict):
        raise IngestError("A lines batch is a JSON object with source, seq and lines.")
    source, seq, lines = document.get("source"), document.get("seq"), document.get("lines")
    if not isinstance(source, str) or not 1 <= len(source) <= 128:
        raise IngestError("`source` must be a string of 1 to 128 characters.")
    if not isinstance(seq, int) or seq < 0:
        raise IngestError("`seq` must be a whole number >= 0.")
    if not isinstance(lines, list) or len(lines) > MAX_LINES_PER_BATCH:
        raise IngestError(f"`lines` must be a list of at most {MAX_LINES_PER_BATCH} lines.")
    source = valid_text(source)
    service = document.get("service")
    service = valid_text(service) if isinstance(service, str) and service else "unknown_service"
    dropped = document.get("dropped")
    outcome = Outcome()
    for line in lines:
        if not isinstance(line, dict) or not isinstance(line.get("text"), str):
            outcome.reject("line without text")
            continue
        text = valid_text(line["text"])
        if len(text.encode()) > limits.max_line_bytes:
            raise IngestError(
                f"A line is longer than {limits.max_line_bytes} bytes.",
                status=400,
                reason="line_too_long",
            )
        ts = line.get("ts_ns")
        # Past int64 it could not be stored (it becomes the record's observed time).
        ts_ns = ts if isinstance(ts, int) and 0 < ts < 2**63 else now_ns
        stream = "stderr" if line.get("stream") == "stderr" else "stdout"
        record = parse_line(
            text, ts_ns=ts_ns, stream=stream, service=service, source=f"run:{source}:{seq}"
        )
        problem = limits.time_problem(record.ts_ns, now_ns)
        if problem:
            outcome.reject(problem)
            continue
        record.attributes = limits.attributes(record.attributes)
        outcome.records.append(record)
    key = f"run:{source}:{seq}"  # also each record's `source`, so restarts keep deduplicating
    return key, outcome, dropped if isinstance(dropped, int) and 0 < dropped < 2**63 else 0
