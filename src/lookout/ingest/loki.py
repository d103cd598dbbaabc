"""Loki's push API (`/loki/api/v1/push`): what Promtail and Alloy send by default.

Two bodies: JSON (`{"streams": [{"stream": {labels}, "values": [[ns, line, {metadata}]]}]}`)
and snappy-compressed protobuf (`logproto.PushRequest`). Each entry becomes a log record:
the stream's labels and the entry's structured metadata become attributes, `service_name`
(else `job`, else `app`) the service, `level` (or `detected_level`) the level; a JSON line
is parsed as `lookout run` parses it. Entries dedup on stream labels, nanosecond timestamp
and line, as Loki does.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError

from lookout.errors import IngestError
from lookout.ingest.jsonbody import load_json
from lookout.ingest.limits import Limits
from lookout.ingest.lines import parse_line
from lookout.ingest.otlp import Outcome

_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _push_request_class() -> Any:
    """logproto.PushRequest, built from its field numbers (the wire format is what matters)."""
    file = descriptor_pb2.FileDescriptorProto(name="lookout_logproto.proto", package="logproto")
    file.dependency.append("google/protobuf/timestamp.proto")
    kinds = descriptor_pb2.FieldDescriptorProto
    string, uint64, message, repeated = kinds.TYPE_STRING, kinds.TYPE_UINT64, kinds.TYPE_MESSAGE, 3
    optional = 1
    pair = file.message_type.add(name="LabelPairAdapter")
    pair.field.add(name="name", number=1, type=string, label=optional)
    pair.field.add(name="value", number=2, type=string, label=optional)
    entry = file.message_type.add(name="EntryAdapter")
    entry.field.add(name="timestamp", number=1, type=message, label=optional,
                    type_name=".google.protobuf.Timestamp")  # fmt: skip
    entry.field.add(name="line", number=2, type=string, label=optional)
    entry.field.add(name="structuredMetadata", number=3, type=message, label=repeated,
                    type_name=".logproto.LabelPairAdapter")  # fmt: skip
    stream = file.message_type.add(name="StreamAdapter")
    stream.field.add(name="labels", number=1, type=string, label=optional)
    stream.field.add(name="entries", number=2, type=message, label=repeated,
                     type_name=".logproto.EntryAdapter")  # fmt: skip
    stream.field.add(name="hash", number=3, type=uint64, label=optional)
    push = file.message_type.add(name="PushRequest")
    push.field.add(name="streams", number=1, type=message, label=repeated,
                   type_name=".logproto.StreamAdapter")  # fmt: skip
    pool = descriptor_pool.DescriptorPool()
    from google.protobuf import timestamp_pb2

    pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
    pool.Add(file)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("logproto.PushRequest"))


PushRequest = _push_request_class()


def parse_labels(text: str) -> dict[str, str]:
    """A Loki stream selector `{job="api", level="error"}` as a mapping."""
    body = text.strip()
    if not (body.startswith("{") and body.endswith("}")):
        raise IngestError(f'Stream labels {text[:80]!r} are not a {{name="value"}} set.')
    labels: dict[str, str] = {}
    position, inner = 0, body[1:-1]
    while position < len(inner):
        match = _LABEL.match(inner, position)
        if not match:
            raise IngestError(
                f"Stream labels {text[:80]!r} do not parse at {inner[position:][:40]!r}."
            )
        labels[match[1]] = re.sub(r"\\(.)", r"\1", match[2])
        position = match.end()
    return labels


def _entries_from_json(document: Any) -> list[tuple[dict[str, str], int, str, dict[str, str]]]:
    if not isinstance(document, dict) or not isinstance(document.get("streams"), list):
        raise IngestError('A Loki JSON push is {"streams": [...]}.')
    out = []
    for stream in document["streams"]:
        if not isinstance(stream, dict) or not isinstance(stream.get("stream"), dict):
            raise IngestError("Each stream needs a `stream` object of labels.")
        labels = {str(k): str(v) for k, v in stream["stream"].items()}
        values = stream.get("values") or []
        if not isinstance(values, list):
            raise IngestError(f"A stream's `values` must be a list, not {type(values).__name__}.")
        for value in values:
            if not isinstance(value, list) or len(value) < 2:
                raise IngestError('Each value is ["<unix ns>", "<line>", {metadata}?].')
            try:
                ts = int(value[0])
            except (TypeError, ValueError, OverflowError) as exc:  # OverflowError: 1e999
                raise IngestError(f"Timestamp {value[0]!r} is not Unix nanoseconds.") from exc
            metadata = value[2] if len(value) > 2 and isinstance(value[2], dict) else {}
            out.append((labels, ts, str(value[1]), {str(k): str(v) for k, v in metadata.items()}))
    return out


def _snappy_length(body: bytes) -> int:
    """The uncompressed length a raw snappy block declares (its leading varint)."""
    length = shift = 0
    for byte in body[:5]:
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            return length
        shift += 7
    raise IngestError("Body is not snappy-compressed: its length header is malformed.")


def _entries_from_protobuf(
    body: bytes, limit: int
) -> list[tuple[dict[str, str], int, str, dict[str, str]]]:
    import cramjam

    declared = _snappy_length(body)
    if declared > limit:  # refused before anything is allocated for it
        raise IngestError(
            f"Body would be {declared} bytes after decompression, over the {limit}-byte limit.",
            status=413,
            reason="too_large",
        )
    try:
        raw = bytes(cramjam.snappy.decompress_raw(body))
    except Exception as exc:
        raise IngestError(f"Body is not snappy-compressed: {exc}") from exc
    request = PushRequest()
    try:
        request.ParseFromString(raw)
    except (DecodeError, ValueError) as exc:
        raise IngestError(f"Body is not a logproto.PushRequest: {exc}") from exc
    out = []
    for stream in request.streams:
        labels = parse_labels(_text(stream.labels))
        for entry in stream.entries:
            ts = entry.timestamp.seconds * 1_000_000_000 + entry.timestamp.nanos
            metadata = {_text(pair.name): _text(pair.value) for pair in entry.structuredMetadata}
            out.append((labels, ts, _text(entry.line), metadata))
    return out


def _text(value: str | bytes) -> str:
    """A protobuf string field: protobuf hands over bytes when they are not UTF-8 (Loki's
    own Go code takes any bytes), so those are decoded with U+FFFD for each bad byte."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def read_push(
    body: bytes, content_type: str, tenant: str | None, limits: Limits, now_ns: int
) -> Outcome:
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "application/json":
        entries = _entries_from_json(load_json(body, "Loki JSON push"))
    elif media in ("application/x-protobuf", "application/protobuf", ""):
        entries = _entries_from_protobuf(body, limits.max_body_bytes)
    else:
        raise IngestError(
            f"Content-Type {content_type!r}: Loki push takes application/json or "
            "snappy-compressed application/x-protobuf.",
            status=415,
            reason="unsupported_media_type",
        )
    outcome = Outcome()
    for labels, ts, line, metadata in entries:
        if len(line.encode()) > limits.max_line_bytes:
            raise IngestError(
                f"A line is longer than {limits.max_line_bytes} bytes.", reason="line_too_long"
            )
        problem = limits.time_problem(ts, now_ns)
        if problem:
            outcome.reject(problem)
            continue
        service = (
            labels.get("service_name")
            or labels.get("job")
            or labels.get("app")
            or "unknown_service"
        )
        key = hashlib.blake2b(
            json.dumps([sorted(labels.items()), ts, line]).encode(), digest_size=12
        ).hexdigest()
        record = parse_line(line, ts_ns=ts, stream="stdout", service=service, source=f"loki:{key}")
        record.ts_ns = ts  # the entry's own time is Loki's truth, whatever the line says
        level = labels.get("level") or labels.get("detected_level") or metadata.get("level")
        if level:
            record.level = level.lower()
        trace_id = metadata.get("trace_id", "").lower()
        if re.fullmatch(r"[0-9a-f]{32}", trace_id) and not record.trace_id:
            record.trace_id = trace_id
        record.attributes = limits.attributes({**record.attributes, **labels, **metadata})
        record.attributes.pop("stream", None)
        if tenant:
            record.resource["lookout.tenant"] = tenant
        outcome.records.append(record)
    return outcome
