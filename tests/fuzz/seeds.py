"""Valid payloads the mutators start from: the golden fixtures, plus OTLP requests and Sentry
envelopes built here (the envelopes serialized by the real sentry-sdk, with `length` headers).

Every builder takes `now_ns`, so that the HTTP properties can send records the server keeps
(not records it rejects as too old) and the parser properties can use a fixed clock.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import cramjam
from sentry_sdk.envelope import Envelope

from lookout.ingest import otlp
from lookout.ingest.loki import PushRequest

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
# The goldens' clock (tests/server/test_lines.py and test_loki.py use the same).
NOW_NS = 1_795_800_000_000_000_000
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPAN_ID = "00f067aa0ba902b7"


def _value(value: Any) -> dict[str, Any]:
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    if isinstance(value, float):
        return {"doubleValue": value}
    if isinstance(value, list):
        return {"arrayValue": {"values": [_value(v) for v in value]}}
    if isinstance(value, dict):
        return {"kvlistValue": {"values": _attributes(value)["attributes"]}}
    return {"stringValue": str(value)}


def _attributes(values: dict[str, Any]) -> dict[str, Any]:
    return {"attributes": [{"key": k, "value": _value(v)} for k, v in values.items()]}


def _resource(service: str) -> dict[str, Any]:
    return _attributes({
        "service.name": service, "service.namespace": "busline", "service.instance.id": "pay-1",
        "deployment.environment.name": "prod",
    })  # fmt: skip


def otlp_traces(now_ns: int) -> dict[str, Any]:
    start = now_ns - 60_000_000_000
    root = {
        "traceId": TRACE_ID, "spanId": SPAN_ID, "name": "POST /pay", "kind": 2,
        "startTimeUnixNano": str(start), "endTimeUnixNano": str(start + 5_000_000),
        "traceState": "ot=th:c", "status": {"code": 2, "message": "connection refused"},
        **_attributes({"http.route": "/pay", "retries": 2, "ratio": 0.5, "ok": False,
                       "tags": ["a", "b"], "nested": {"k": "v"}}),
        "events": [{"name": "retry", "timeUnixNano": str(start + 1000),
                    **_attributes({"attempt": 1})}],
        "links": [{"traceId": "ab" * 16, "spanId": "cd" * 8, **_attributes({"link": "yes"})}],
    }  # fmt: skip
    child = {
        "traceId": TRACE_ID, "spanId": "b7ad6b7169203331", "parentSpanId": SPAN_ID,
        "name": "mpesa stk push", "kind": 3, "startTimeUnixNano": str(start + 1_000_000),
        "endTimeUnixNano": str(start), "status": {"code": 1},
    }  # fmt: skip
    return {"resourceSpans": [{
        "resource": _resource("payments"),
        "scopeSpans": [{"scope": {"name": "payments", "version": "1.0"}, "spans": [root, child]}],
    }]}  # fmt: skip


def otlp_logs(now_ns: int) -> dict[str, Any]:
    records = [
        {"timeUnixNano": str(now_ns - 1_000_000_000), "severityNumber": 17,
         "severityText": "ERROR", "body": {"stringValue": "Connection refused from M-Pesa API"},
         "traceId": TRACE_ID, "spanId": SPAN_ID, **_attributes({"code.lineno": 42})},
        {"observedTimeUnixNano": str(now_ns - 2_000_000_000), "severityNumber": 9,
         "body": _value({"event": "ticket_sold", "seats": [1, 2]})},
        {"timeUnixNano": str(now_ns - 3_000_000_000), "severityText": "warn",
         "body": {"bytesValue": "aGVsbG8="}, "flags": 1},
    ]  # fmt: skip
    return {"resourceLogs": [{
        "resource": _resource("payments"),
        "scopeLogs": [{"scope": {"name": "payments.logger"}, "logRecords": records}],
    }]}  # fmt: skip


def otlp_metrics(now_ns: int) -> dict[str, Any]:
    ts = str(now_ns - 1_000_000_000)
    start = str(now_ns - 61_000_000_000)
    exemplar = {"timeUnixNano": ts, "asDouble": 0.042, "traceId": TRACE_ID, "spanId": SPAN_ID}
    metrics = [
        {"name": "tickets.sold", "unit": "{ticket}", "sum": {
            "aggregationTemporality": 2, "isMonotonic": True, "dataPoints": [
                {"startTimeUnixNano": start, "timeUnixNano": ts, "asInt": "17",
                 **_attributes({"route": "nbo-mba", "http.method": "GET"}),
                 "exemplars": [exemplar]}]}},
        {"name": "queue.depth", "unit": "1", "gauge": {"dataPoints": [
            {"timeUnixNano": ts, "asDouble": 0.25}, {"timeUnixNano": ts, "flags": 1}]}},
        {"name": "balance", "unit": "By", "sum": {"aggregationTemporality": 1, "dataPoints": [
            {"timeUnixNano": ts, "asDouble": 3.5}]}},
        {"name": "http.server.request.duration", "unit": "s", "histogram": {
            "aggregationTemporality": 2, "dataPoints": [
                {"startTimeUnixNano": start, "timeUnixNano": ts, "count": "42", "sum": 1.5,
                 "bucketCounts": ["41", "1", "0"], "explicitBounds": [0.1, 1.0],
                 "exemplars": [exemplar], **_attributes({"http.route": "/api/trips"})}]}},
        {"name": "latency", "unit": "ms", "summary": {"dataPoints": [
            {"timeUnixNano": ts, "count": "3", "sum": 12.0, "quantileValues": [
                {"quantile": 0.5, "value": 4.0}, {"quantile": 1.0, "value": 6.0}]}]}},
        {"name": "sizes", "unit": "By", "exponentialHistogram": {
            "aggregationTemporality": 2, "dataPoints": [
                {"timeUnixNano": ts, "count": "2", "scale": 3, "zeroCount": "0",
                 "positive": {"offset": 1, "bucketCounts": ["1", "1"]}}]}},
        {"name": "empty"},
    ]  # fmt: skip
    return {"resourceMetrics": [{
        "resource": _resource("payments"), "scopeMetrics": [{"metrics": metrics}],
    }]}  # fmt: skip


OTLP_BUILDERS = {"traces": otlp_traces, "logs": otlp_logs, "metrics": otlp_metrics}


def otlp_json(signal: str, now_ns: int) -> list[bytes]:
    """OTLP/JSON requests of `signal`: a full one, and an empty one."""
    document = OTLP_BUILDERS[signal](now_ns)
    return [json.dumps(document).encode(), b"{}"]


def otlp_protobuf(signal: str, now_ns: int) -> list[bytes]:
    """The same requests in protobuf, encoded by the generated OTLP classes."""
    return [
        otlp.decode(signal, body, "application/json").SerializeToString()
        for body in otlp_json(signal, now_ns)
    ]


def _event(now_ns: int, message: str) -> dict[str, Any]:
    return {
        "event_id": "ab" * 16, "timestamp": now_ns / 1e9, "level": "error", "platform": "python",
        "server_name": "pay-1", "release": "2.3.0", "environment": "staging",
        "exception": {"values": [{"type": "ConnectionRefusedError", "value": message,
                                  "stacktrace": {"frames": [
                                      {"module": "busline.payments", "function": "charge",
                                       "in_app": True, "lineno": 12},
                                      {"filename": "httpx/_client.py", "function": "send"}]}}]},
        "contexts": {"trace": {"trace_id": TRACE_ID, "span_id": SPAN_ID}},
        "tags": {"service": "payments"}, "user": {"id": "u-42"},
        "logentry": {"message": "charge %s", "formatted": "charge BK-1"},
    }  # fmt: skip


def _transaction(now_ns: int) -> dict[str, Any]:
    start = now_ns / 1e9 - 1
    return {
        "type": "transaction", "event_id": "cd" * 16, "transaction": "POST /pay",
        "start_timestamp": start, "timestamp": "2026-11-27T16:00:00Z",
        "contexts": {"trace": {"trace_id": TRACE_ID, "span_id": SPAN_ID, "op": "http.server",
                               "status": "internal_error", "parent_span_id": "ef" * 8}},
        "tags": [["service", "payments"], ["region", "nbo"]],
        "spans": [{"span_id": "b7ad6b7169203331", "parent_span_id": SPAN_ID, "op": "db",
                   "description": "SELECT bookings", "start_timestamp": start,
                   "timestamp": start + 0.2, "status": "ok", "data": {"db.system": "postgresql"},
                   "tags": {"shard": "1"}}],
    }  # fmt: skip


def sentry_envelopes(now_ns: int) -> list[bytes]:
    """Envelopes as sentry-sdk writes them (every item with `length`), and one without."""
    full = Envelope(headers={"event_id": "ab" * 16, "sent_at": "2026-11-27T16:00:00Z"})
    full.add_event(_event(now_ns, "M-Pesa refused booking BK-1"))
    full.add_transaction(_transaction(now_ns))
    full.add_checkin({"check_in_id": "ef" * 16, "monitor_slug": "nightly-report",
                      "status": "error", "duration": 3.5, "environment": "prod",
                      "contexts": {"trace": {"trace_id": TRACE_ID}}})  # fmt: skip
    report = {"timestamp": now_ns / 1e9, "discarded_events": [
        {"reason": "queue_overflow", "category": "error", "quantity": 3}]}  # fmt: skip
    attachment = b"raw bytes\nwith a newline\x00\xff"
    implicit = b"\n".join([
        b'{"event_id":"' + b"12" * 16 + b'"}',
        b'{"type":"event"}', json.dumps(_event(now_ns, "implicit")).encode(),
        b'{"type":"client_report"}', json.dumps(report).encode(),
        b'{"type":"attachment","length":' + str(len(attachment)).encode() + b"}", attachment,
        b'{"type":"session"}', b'{"sid":"x","status":"ok"}',
    ]) + b"\n"  # fmt: skip
    return [full.serialize(), implicit]


def sentry_store_events(now_ns: int) -> list[bytes]:
    return [json.dumps(_event(now_ns, "stored")).encode(), b'{"message": "plain"}']


def lines_batches(now_ns: int) -> list[bytes]:
    """The golden batch, with its timestamps moved to `now_ns`."""
    document = json.loads((FIXTURES / "lines" / "batch.json").read_text())
    for index, line in enumerate(document["lines"]):
        line["ts_ns"] = now_ns - 10_000_000_000 + index
    return [json.dumps(document).encode()]


def loki_json(now_ns: int) -> list[bytes]:
    """The golden JSON push, with its timestamps moved to `now_ns`."""
    document = json.loads((FIXTURES / "loki" / "push.json").read_text())
    for stream in document["streams"]:
        for index, value in enumerate(stream["values"]):
            value[0] = str(now_ns - 10_000_000_000 + index)
    return [json.dumps(document).encode()]


def loki_protobuf(now_ns: int) -> list[bytes]:
    """The golden snappy protobuf push, with its timestamps moved to `now_ns`."""
    request = PushRequest()
    raw = cramjam.snappy.decompress_raw((FIXTURES / "loki" / "push.pb.snappy").read_bytes())
    request.ParseFromString(bytes(raw))
    for stream in request.streams:
        for index, entry in enumerate(stream.entries):
            entry.timestamp.seconds = now_ns // 1_000_000_000 - 10 + index
    return [bytes(cramjam.snappy.compress_raw(request.SerializeToString()))]


def loki_push_request(raw: bytes) -> bytes:
    """An uncompressed PushRequest, snappy-compressed as Promtail sends it."""
    return bytes(cramjam.snappy.compress_raw(raw))


def loki_raw(body: bytes) -> bytes:
    """A snappy push's PushRequest bytes."""
    return bytes(cramjam.snappy.decompress_raw(body))


def exposition(name: str) -> str:
    return (FIXTURES / "exposition" / name).read_text()


SCRAPE_CONFIGS: list[Any] = [
    [{"job_name": "busline", "scrape_interval": "5s", "scrape_timeout": "10s",
      "metrics_path": "/metrics", "scheme": "http", "honor_labels": True,
      "static_configs": [{"targets": ["127.0.0.1:9000", "[::1]:9001"],
                          "labels": {"tier": "web"}}],
      "relabel_configs": [
          {"source_labels": ["tier"], "regex": "web", "action": "keep"},
          {"source_labels": ["__address__"], "regex": "([^:]+):.*", "target_label": "host",
           "replacement": "$1"},
          {"regex": "__meta_(.+)", "action": "labelmap"},
          {"source_labels": ["env"], "regex": "dev", "action": "drop"}]}],
    [{"job_name": "node", "scrape_interval": "1m30s",
      "file_sd_configs": [{"files": ["/nonexistent/lookout-fuzz-sd.json"]}]},
     {"job_name": "api", "static_configs": [{"targets": ["api:8000"]}]}],
    None,
]  # fmt: skip
