"""Sentry intake: the envelope protocol (and `/store/`), into error events, spans, job runs.

Item types: `event` becomes an error event grouped into an issue; `transaction` becomes
spans (ids from `contexts.trace`); `check_in` becomes a job run; `client_report` is counted
into `lookout_sdk_client_discarded_total`; every other type is counted as skipped
(`lookout_sentry_items_skipped_total{type}`) and listed in docs/server.md.
"""

from __future__ import annotations

import hashlib
import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from lookout.errors import IngestError
from lookout.ingest.jsonbody import load_json
from lookout.model import Batch, ErrorEvent, JobRun, Span, SpanColumns

_AUTH_KEY = re.compile(r"sentry_key\s*=\s*([^,\s]+)")
_HEX32 = re.compile(r"[0-9a-f]{32}")
_HEX16 = re.compile(r"[0-9a-f]{16}")
_STATUS_ERROR = {"internal_error", "unknown_error", "unknown", "deadline_exceeded",
                 "unavailable", "data_loss", "aborted", "resource_exhausted"}  # fmt: skip


def sentry_key(headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
    """The DSN public key from `X-Sentry-Auth` (or `Authorization`), else `sentry_key=`."""
    for name in ("x-sentry-auth", "authorization"):
        value = headers.get(name, "")
        match = _AUTH_KEY.search(value)
        if match:
            return match[1]
    return query.get("sentry_key") or None


@dataclass
class Item:
    type: str
    headers: dict[str, Any]
    payload: bytes


@dataclass
class Envelope:
    headers: dict[str, Any]
    items: list[Item] = field(default_factory=list)


def _json_line(raw: bytes, what: str) -> dict[str, Any]:
    value = load_json(raw or b"{}", f"Envelope {what}")
    if not isinstance(value, dict):
        raise IngestError(f"Envelope {what} must be a JSON object.")
    return value


def parse_envelope(body: bytes) -> Envelope:
    """Split an envelope into its header and items (explicit or implicit lengths). It walks
    the body by offset: slicing off the rest after each item would copy the body once per
    item, quadratic in a body of many small items."""
    header_raw, at = _line(body, 0)
    envelope = Envelope(_json_line(header_raw, "header"))
    while at < len(body):
        item_raw, at = _line(body, at)
        if not item_raw.strip():
            continue
        item_headers = _json_line(item_raw, "item header")
        length = item_headers.get("length")
        if length is not None:
            if not isinstance(length, int) or length < 0 or length > len(body) - at:
                raise IngestError(f"Envelope item length {length!r} does not fit the body.")
            payload, at = body[at : at + length], at + length
            if body[at : at + 1] == b"\n":
                at += 1
        else:
            payload, at = _line(body, at)
        envelope.items.append(Item(str(item_headers.get("type", "")), item_headers, payload))
    return envelope


def _line(body: bytes, at: int) -> tuple[bytes, int]:
    """The line that starts at `at`, without its newline, and where the next one starts."""
    end = body.find(b"\n", at)
    return (body[at:], len(body)) if end < 0 else (body[at:end], end + 1)


_ACCEPTED_PAST_NS = 7 * 86400 * 10**9
_ACCEPTED_FUTURE_NS = 600 * 10**9


def _timestamp_ns(value: Any, default: int) -> int:
    """Seconds (float) or RFC 3339 as nanoseconds; a time out of range becomes `default`,
    as Relay clamps a client's wrong clock rather than refusing the event."""
    stamp = None
    if isinstance(value, int | float) and 0 < value < 1e11:
        stamp = int(value * 1e9)
    elif isinstance(value, str):
        try:
            stamp = int(datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp() * 1e9)
        except (ValueError, OverflowError):
            stamp = None
    if stamp is None or not default - _ACCEPTED_PAST_NS <= stamp <= default + _ACCEPTED_FUTURE_NS:
        return default
    return stamp


def _tags(raw: Any) -> dict[str, str]:
    if isinstance(raw, dict):
        return {str(k): str(v) for k, v in raw.items()}
    if isinstance(raw, list):
        return {str(p[0]): str(p[1]) for p in raw if isinstance(p, list | tuple) and len(p) == 2}
    return {}


def _exceptions(event: dict[str, Any]) -> list[dict[str, Any]]:
    container = event.get("exception")
    values = container.get("values") if isinstance(container, dict) else container
    return [v for v in _array(values) if isinstance(v, dict)]


def _seconds(value: Any) -> float | None:
    """A JSON number as seconds; None for anything else, or an integer past float's range."""
    if not isinstance(value, int | float):
        return None
    try:
        return float(value)
    except OverflowError:
        return None


def _status_code(status: Any) -> str:
    """A Sentry span status as ours; `status` may be any JSON value (a dict is unhashable)."""
    return "error" if isinstance(status, str) and status in _STATUS_ERROR else "unset"


def _quantity(value: Any) -> int:
    """A client report's count: a whole number >= 0; any other value counts as 0."""
    if isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value < 2**63:
        return int(value)
    return 0


def _object(value: Any) -> dict[str, Any]:
    """A field that should hold a JSON object: any other shape counts as absent."""
    return value if isinstance(value, dict) else {}


def _array(value: Any) -> list[Any]:
    """A field that should hold a JSON array: any other shape counts as absent."""
    return value if isinstance(value, list) else []


def fingerprint(event: dict[str, Any]) -> str:
    """The SDK's fingerprint when it sent one, else the exception type and in-app frames."""
    given = event.get("fingerprint")
    if isinstance(given, list) and given and given != ["{{ default }}"]:
        parts = ["fingerprint", *map(str, given)]
    else:
        parts = []
        for exc in _exceptions(event):
            parts.append(str(exc.get("type", "")))
            frames = _array(_object(exc.get("stacktrace")).get("frames"))
            in_app = [f for f in frames if isinstance(f, dict) and f.get("in_app")] or [
                f for f in frames if isinstance(f, dict)
            ]
            parts.extend(
                f"{f.get('module') or f.get('filename')}:{f.get('function')}" for f in in_app
            )
        if not parts:
            message = event.get("message") or _object(event.get("logentry")).get("message") or ""
            parts = ["message", str(message)]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


def _trace(event: dict[str, Any]) -> dict[str, Any]:
    trace = _object(event.get("contexts")).get("trace") or {}
    return trace if isinstance(trace, dict) else {}


def _valid(value: Any, pattern: re.Pattern[str]) -> str:
    text = str(value or "").lower()
    return text if pattern.fullmatch(text) else ""


def error_event(event: dict[str, Any], project_id: int, event_id: str, now_ns: int) -> ErrorEvent:
    exceptions = _exceptions(event)
    last = exceptions[-1] if exceptions else {}
    exception_type = str(last.get("type", ""))
    message = str(
        last.get("value")
        or event.get("message")
        or _object(event.get("logentry")).get("formatted")
        or _object(event.get("logentry")).get("message")
        or ""
    )
    title = f"{exception_type}: {message}" if exception_type else message
    tags = _tags(event.get("tags"))
    trace = _trace(event)
    user = event.get("user") if isinstance(event.get("user"), dict) else {}
    return ErrorEvent(
        event_id=event_id,
        project_id=project_id,
        ts_ns=_timestamp_ns(event.get("timestamp"), now_ns),
        fingerprint=fingerprint(event),
        title=title[:500],
        exception_type=exception_type,
        message=message[:2000],
        level=str(event.get("level") or "error"),
        service=tags.get("service") or str(event.get("server_name") or ""),
        environment=str(event.get("environment") or ""),
        release=str(event.get("release") or ""),
        trace_id=_valid(trace.get("trace_id"), _HEX32),
        span_id=_valid(trace.get("span_id"), _HEX16),
        user=user or {},
        tags=tags,
        payload=event,
    )


def transaction_spans(event: dict[str, Any], now_ns: int) -> list[Span]:
    """A transaction's root span and child spans, all in the trace of `contexts.trace`."""
    trace = _trace(event)
    trace_id = _valid(trace.get("trace_id"), _HEX32)
    root_id = _valid(trace.get("span_id"), _HEX16)
    if not trace_id or not root_id:
        raise IngestError("Transaction without a valid contexts.trace trace_id and span_id.")
    tags = _tags(event.get("tags"))
    service = tags.get("service") or str(event.get("server_name") or "unknown_service")
    resource = {"service.name": service, "deployment.environment.name": event.get("environment")}
    start = _timestamp_ns(event.get("start_timestamp"), now_ns)
    spans = [
        Span(
            trace_id=trace_id,
            span_id=root_id,
            parent_span_id=_valid(trace.get("parent_span_id"), _HEX16),
            service=service,
            name=str(event.get("transaction") or trace.get("op") or "transaction"),
            kind="server",
            start_ns=start,
            end_ns=max(start, _timestamp_ns(event.get("timestamp"), start)),
            status_code=_status_code(trace.get("status")),
            status_message=str(trace.get("status") or ""),
            attributes={"sentry.op": trace.get("op"), **tags},
            resource=resource,
            scope="sentry",
            source="sentry",
        )
    ]
    for child in _array(event.get("spans")):
        if not isinstance(child, dict):
            continue
        span_id = _valid(child.get("span_id"), _HEX16)
        if not span_id:
            continue
        child_start = _timestamp_ns(child.get("start_timestamp"), start)
        spans.append(
            Span(
                trace_id=_valid(child.get("trace_id"), _HEX32) or trace_id,
                span_id=span_id,
                parent_span_id=_valid(child.get("parent_span_id"), _HEX16) or root_id,
                service=service,
                name=str(child.get("description") or child.get("op") or "span"),
                kind="internal",
                start_ns=child_start,
                end_ns=max(child_start, _timestamp_ns(child.get("timestamp"), child_start)),
                status_code=_status_code(child.get("status")),
                status_message=str(child.get("status") or ""),
                attributes={
                    "sentry.op": child.get("op"),
                    **_tags(child.get("tags")),
                    **_object(child.get("data")),
                },
                resource=resource,
                scope="sentry",
                source="sentry",
            )
        )
    return spans


def job_run(check_in: dict[str, Any], project_id: int, now_ns: int) -> JobRun:
    trace = _trace(check_in)
    duration = check_in.get("duration")
    return JobRun(
        check_in_id=str(check_in.get("check_in_id") or uuid.uuid4().hex),
        monitor=str(check_in.get("monitor_slug") or ""),
        status=str(check_in.get("status") or ""),
        ts_ns=now_ns,
        duration_s=_seconds(duration),
        environment=str(check_in.get("environment") or ""),
        project_id=project_id,
        trace_id=_valid(trace.get("trace_id"), _HEX32),
    )


@dataclass
class Intake:
    """What one envelope yields."""

    batch: Batch = field(default_factory=Batch)
    event_id: str = ""
    discarded: list[tuple[str, str, int]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def _payload_json(item: Item) -> dict[str, Any]:
    return _json_line(item.payload, f"{item.type} item")


def _event_size(size: int, limit: int | None) -> None:
    if limit is not None and size > limit:
        raise IngestError(
            f"An event of {size} bytes is over the {limit}-byte limit.",
            status=413,
            reason="event_too_large",
        )


def read_envelope(
    body: bytes, project_id: int, now_ns: int | None = None, max_event_bytes: int | None = None
) -> Intake:
    now = time.time_ns() if now_ns is None else now_ns
    envelope = parse_envelope(body)
    intake = Intake(event_id=str(envelope.headers.get("event_id") or ""))
    for item in envelope.items:
        if item.type in ("event", "transaction"):
            _event_size(len(item.payload), max_event_bytes)
        if item.type == "event":
            event = _payload_json(item)
            event_id = _event_id(event.get("event_id") or intake.event_id)
            intake.event_id = event_id
            intake.batch.events.append(error_event(event, project_id, event_id, now))
        elif item.type == "transaction":
            event = _payload_json(item)
            intake.event_id = _event_id(event.get("event_id") or intake.event_id)
            intake.batch.spans.extend(SpanColumns.of(transaction_spans(event, now)))
        elif item.type == "check_in":
            intake.batch.job_runs.append(job_run(_payload_json(item), project_id, now))
        elif item.type == "client_report":
            report = _payload_json(item)
            for entry in _array(report.get("discarded_events")):
                if isinstance(entry, dict):
                    intake.discarded.append(
                        (str(entry.get("reason")), str(entry.get("category")),
                         _quantity(entry.get("quantity")))
                    )  # fmt: skip
        else:
            intake.skipped.append(item.type or "unknown")
    return intake


def read_store(
    body: bytes, project_id: int, now_ns: int | None = None, max_event_bytes: int | None = None
) -> Intake:
    """`/store/`: one event as a bare JSON object."""
    now = time.time_ns() if now_ns is None else now_ns
    _event_size(len(body), max_event_bytes)
    event = _json_line(body, "event")
    intake = Intake(event_id=_event_id(event.get("event_id")))
    intake.batch.events.append(error_event(event, project_id, intake.event_id, now))
    return intake


def _event_id(value: Any) -> str:
    text = str(value or "").replace("-", "").lower()
    return text if _HEX32.fullmatch(text) else uuid.uuid4().hex
