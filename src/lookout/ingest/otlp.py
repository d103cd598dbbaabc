"""OTLP/HTTP intake: protobuf or JSON requests for traces, logs and metrics, into the model.

Invalid records, and records too far in the past or the future, are dropped one by one and
counted; the rest of the request is kept and the answer is a partial success. Metrics follow
the OpenTelemetry-to-Prometheus compatibility rules (metrics.py).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError, Message
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

from lookout.errors import IngestError
from lookout.ingest.jsonbody import load_json
from lookout.ingest.limits import NS_PER_S, Limits
from lookout.model import LogColumns, SpanColumns, json_text

SIGNALS: dict[str, tuple[type[Message], type[Message]]] = {
    "traces": (
        trace_service_pb2.ExportTraceServiceRequest,
        trace_service_pb2.ExportTraceServiceResponse,
    ),
    "logs": (logs_service_pb2.ExportLogsServiceRequest, logs_service_pb2.ExportLogsServiceResponse),
    "metrics": (
        metrics_service_pb2.ExportMetricsServiceRequest,
        metrics_service_pb2.ExportMetricsServiceResponse,
    ),
}
_HEX_ID_FIELDS = frozenset(
    {"traceId", "spanId", "parentSpanId", "trace_id", "span_id", "parent_span_id"}
)
_LONGEST_SPAN_NS = 7 * 86400 * 10**9
_INT64_MAX = 2**63 - 1
_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
_STATUS = {0: "unset", 1: "ok", 2: "error"}
_SCALARS = frozenset({"int_value", "double_value", "bool_value"})
_SEVERITY_LEVELS = (
    (21, "fatal"),
    (17, "error"),
    (13, "warning"),
    (9, "info"),
    (5, "debug"),
    (1, "trace"),
)


@dataclass
class Outcome:
    """What a request yielded: records kept, and how many were rejected and why."""

    records: list[Any] = field(default_factory=list)
    spans: SpanColumns = field(default_factory=SpanColumns)  # spans and logs come as columns
    logs: LogColumns = field(default_factory=LogColumns)
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)

    def reject(self, reason: str, count: int = 1) -> None:
        self.rejected += count
        self.reasons[reason] = self.reasons.get(reason, 0) + count

    def message(self) -> str:
        return "; ".join(f"{n} {reason}" for reason, n in sorted(self.reasons.items()))


def is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


def decode(signal: str, body: bytes, content_type: str) -> Message:
    """Parse a request body, protobuf or JSON by content type."""
    request_type = SIGNALS[signal][0]
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json":
        document = load_json(body or b"{}", "OTLP/JSON body")
        if not isinstance(document, dict):
            raise IngestError("OTLP/JSON body must be a JSON object.")
        try:
            return json_format.ParseDict(
                _hex_ids_to_base64(document), request_type(), ignore_unknown_fields=True
            )
        except (
            json_format.ParseError,
            ValueError,
            TypeError,
            RecursionError,
            OverflowError,  # an enum or integer field given as 1e999 (infinity)
        ) as exc:
            raise IngestError(
                f"OTLP/JSON body does not match {request_type.__name__}: {exc}"
            ) from exc
    if media in ("application/x-protobuf", "application/protobuf", ""):
        message = request_type()
        try:
            message.ParseFromString(body)
        except (DecodeError, ValueError) as exc:
            raise IngestError(f"OTLP protobuf body does not parse: {exc}") from exc
        return message
    raise IngestError(
        f"Content-Type {content_type!r} is not OTLP; send application/x-protobuf or "
        "application/json.",
        status=415,
        reason="unsupported_media_type",
    )


def _hex_ids_to_base64(node: Any) -> Any:
    """OTLP/JSON writes ids as hex; protobuf's JSON mapping wants base64 for bytes."""
    if isinstance(node, dict):
        out = {}
        for key, value in node.items():
            if key in _HEX_ID_FIELDS and isinstance(value, str):
                try:
                    out[key] = base64.b64encode(bytes.fromhex(value)).decode()
                except ValueError as exc:
                    raise IngestError(f"OTLP/JSON field {key} is not hex: {value[:40]!r}") from exc
            else:
                out[key] = _hex_ids_to_base64(value)
        return out
    if isinstance(node, list):
        return [_hex_ids_to_base64(item) for item in node]
    return node


def encode_response(signal: str, outcome: Outcome, as_json: bool) -> bytes:
    """The answer, with partial success when anything was rejected."""
    response = SIGNALS[signal][1]()
    if outcome.rejected:
        partial = response.partial_success
        counter = {"traces": "rejected_spans", "logs": "rejected_log_records"}.get(
            signal, "rejected_data_points"
        )
        setattr(partial, counter, outcome.rejected)
        partial.error_message = outcome.message()
    if as_json:
        return bytes(json_format.MessageToJson(response, indent=None).encode())
    return bytes(response.SerializeToString())


def any_value(value: Any) -> Any:
    """An OTLP AnyValue as a plain Python value."""
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    if kind == "bytes_value":
        return base64.b64encode(value.bytes_value).decode()
    return getattr(value, kind)


def attributes(pairs: Any, limits: Limits | None = None) -> dict[str, Any]:
    """Key-value pairs as a dict; with `limits`, long strings are cut to the limit. The
    common cases first: a non-empty string (a oneof holding one is that), then a number or
    a bool; it runs for every attribute of every record."""
    out: dict[str, Any] = {}
    longest = limits.max_attribute_bytes // 4 if limits else 0  # cannot be over the limit
    for kv in pairs:
        value = kv.value
        string = value.string_value
        if string:
            out[kv.key] = (
                string if limits is None or len(string) <= longest else limits.text(string)
            )
            continue
        kind = value.WhichOneof("value")
        if kind in _SCALARS:
            out[kv.key] = getattr(value, kind)
        else:  # unset, an empty string, an array, a map, bytes
            found = any_value(value)
            out[kv.key] = limits.text(found) if limits and isinstance(found, str) else found
    return out


def service_of(resource: dict[str, Any]) -> str:
    return str(resource.get("service.name") or "unknown_service")


def spans(request: Any, limits: Limits, now_ns: int) -> Outcome:
    """Spans into `outcome.spans`, column by column (model.SpanColumns says why); the loop
    is written for speed, as logs() is."""
    outcome = Outcome()
    columns = outcome.spans
    trace_col, span_col, parent_col = columns.trace_id, columns.span_id, columns.parent_span_id
    service_col, name_col, kind_col = columns.service, columns.name, columns.kind
    start_col, end_col = columns.start_ns, columns.end_ns
    status_col, message_col = columns.status_code, columns.status_message
    attributes_col, events_col, links_col = columns.attributes, columns.events, columns.links
    resource_col, scope_col, source_col = columns.resource, columns.scope, columns.source
    count_col = columns.adjusted_count
    oldest = now_ns - int(limits.max_age_s * NS_PER_S)
    newest = now_ns + int(limits.max_future_s * NS_PER_S)
    for resource_spans in request.resource_spans:
        resource = attributes(resource_spans.resource.attributes)
        service = service_of(resource)
        resource_json = json_text(resource)
        for scope_spans in resource_spans.scope_spans:
            scope = scope_spans.scope.name
            for span in scope_spans.spans:
                trace_id, span_id = span.trace_id, span.span_id
                if len(trace_id) != 16 or len(span_id) != 8 or not (any(trace_id) and any(span_id)):
                    outcome.reject("invalid trace_id or span_id")
                    continue
                start = span.start_time_unix_nano
                if not start:
                    outcome.reject("missing start time")
                    continue
                if start < oldest or start > newest:
                    outcome.reject(limits.time_problem(start, now_ns) or "out of range")
                    continue
                parent = span.parent_span_id
                status = span.status
                trace_col.append(trace_id.hex())
                span_col.append(span_id.hex())
                parent_col.append(parent.hex() if len(parent) == 8 and any(parent) else "")
                service_col.append(service)
                name_col.append(span.name)
                kind_col.append(_KINDS.get(span.kind, "unspecified"))
                start_col.append(start)
                # An end before the start, or absurdly late, is clamped, not stored as is.
                end_col.append(min(max(span.end_time_unix_nano, start), start + _LONGEST_SPAN_NS))
                status_col.append(_STATUS.get(status.code, "unset"))
                message_col.append(status.message)
                attributes_col.append(json_text(attributes(span.attributes, limits)))
                events_col.append(_events(span.events, limits) if span.events else "[]")
                links_col.append(_links(span.links) if span.links else "[]")
                resource_col.append(resource_json)
                scope_col.append(scope)
                source_col.append("otlp")
                trace_state = span.trace_state
                count_col.append(adjusted_count(trace_state) if trace_state else 1.0)
    return outcome


def _events(events: Any, limits: Limits) -> str:
    return json_text(
        [
            {
                "name": event.name,
                "time_ns": event.time_unix_nano,
                "attributes": attributes(event.attributes, limits),
            }
            for event in events
        ]
    )


def _links(links: Any) -> str:
    return json_text(
        [
            {
                "trace_id": link.trace_id.hex(),
                "span_id": link.span_id.hex(),
                "attributes": attributes(link.attributes),
            }
            for link in links
        ]
    )


def adjusted_count(trace_state: str) -> float:
    """1/probability from OpenTelemetry's sampling threshold in tracestate (`ot=th:HEX`),
    else 1: the span counts as itself, as sampled."""
    for member in trace_state.split(","):
        key, _, value = member.strip().partition("=")
        if key != "ot":
            continue
        for field_ in value.split(";"):
            name, _, threshold = field_.partition(":")
            if name == "th" and threshold and len(threshold) <= 14:
                try:
                    rejected = int(threshold.ljust(14, "0"), 16)
                except ValueError:
                    return 1.0
                probability = (2**56 - rejected) / 2**56
                return 1.0 / probability if probability > 0 else 1.0
    return 1.0


def _level(severity_number: int, severity_text: str) -> str:
    if severity_text:
        text = severity_text.strip().lower()
        return {"warn": "warning", "err": "error", "critical": "fatal"}.get(text, text)
    for floor, name in _SEVERITY_LEVELS:
        if severity_number >= floor:
            return name
    return "unspecified"


def logs(request: Any, limits: Limits, now_ns: int) -> Outcome:
    """Log records into `outcome.logs`, column by column (LogColumns says why).

    The loop is written for speed: each field is read once, the common string cases are
    tested first, and what repeats (a level, a resource) is worked out once."""
    outcome = Outcome()
    columns = outcome.logs
    ts_col, observed_col = columns.ts_ns, columns.observed_ns
    service_col, level_col, number_col = columns.service, columns.level, columns.severity_number
    body_col, trace_col, span_col = columns.body, columns.trace_id, columns.span_id
    attributes_col, resource_col, source_col = columns.attributes, columns.resource, columns.source
    oldest = now_ns - int(limits.max_age_s * NS_PER_S)
    newest = now_ns + int(limits.max_future_s * NS_PER_S)
    longest_line, short_line = limits.max_line_bytes, limits.max_line_bytes // 4
    levels: dict[tuple[int, str], str] = {}
    for resource_logs in request.resource_logs:
        resource = attributes(resource_logs.resource.attributes)
        service = service_of(resource)
        resource_json = json_text(resource)
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                ts = record.time_unix_nano or record.observed_time_unix_nano
                if not ts:
                    outcome.reject("missing timestamp")
                    continue
                if ts < oldest or ts > newest:
                    outcome.reject(limits.time_problem(ts, now_ns) or "out of range")
                    continue
                value = record.body
                body = value.string_value
                if not body and value.WhichOneof("value") is not None:
                    found = any_value(value)
                    body = found if isinstance(found, str) else json.dumps(found, default=str)
                if len(body) > short_line and len(body.encode()) > longest_line:
                    outcome.reject("line_too_long")
                    continue
                number, severity_text = record.severity_number, record.severity_text
                level = levels.get((number, severity_text))
                if level is None:
                    level = levels[number, severity_text] = _level(number, severity_text)
                trace_id, span_id = record.trace_id, record.span_id
                ts_col.append(ts)
                observed_col.append(min(record.observed_time_unix_nano, _INT64_MAX))
                service_col.append(service)
                level_col.append(level)
                number_col.append(number)
                body_col.append(body)
                trace_col.append(trace_id.hex() if len(trace_id) == 16 and any(trace_id) else "")
                span_col.append(span_id.hex() if len(span_id) == 8 and any(span_id) else "")
                attributes_col.append(json_text(attributes(record.attributes, limits)))
                resource_col.append(resource_json)
                source_col.append("otlp")
    return outcome


Converter = Callable[[Any, Limits, int], Outcome]
