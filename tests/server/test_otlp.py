"""OTLP intake: the real OpenTelemetry exporters, JSON bodies, partial success, metrics."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
from typing import Any

from google.protobuf import json_format
from google.rpc import status_pb2
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceResponse

from lookout.ingest.metrics import metric_name
from tests.server.conftest import InProcess, RunningServer
from tests.support import ROOT, wait_until

NOW_NS = time.time_ns


def _span(trace_id: str, span_id: str, start_ns: int, name: str = "GET /trips") -> dict[str, Any]:
    return {
        "traceId": trace_id,
        "spanId": span_id,
        "name": name,
        "kind": 2,
        "startTimeUnixNano": str(start_ns),
        "endTimeUnixNano": str(start_ns + 5_000_000),
        "attributes": [{"key": "http.route", "value": {"stringValue": "/trips"}}],
    }


def _traces(*spans: dict[str, Any], service: str = "ticketing") -> dict[str, Any]:
    return {
        "resourceSpans": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": service}}]
                },
                "scopeSpans": [{"spans": list(spans)}],
            }
        ]
    }


def test_real_opentelemetry_exporters_in_another_process(server: RunningServer) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tests.server.clients.otel_client", server.otlp_url],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    trace_id = json.loads(result.stdout.strip().splitlines()[-1])["trace_id"]
    import httpx

    trace = httpx.get(f"{server.url}/api/lookout/traces/{trace_id}", timeout=10).json()
    assert {s["name"] for s in trace["spans"]} == {"POST /pay", "mpesa stk push"}
    child = next(s for s in trace["spans"] if s["name"] == "mpesa stk push")
    root = next(s for s in trace["spans"] if s["name"] == "POST /pay")
    assert child["parent_span_id"] == root["span_id"]
    assert child["status"] == {"code": "error", "message": "connection refused"}
    assert child["events"][0]["name"] == "retry"
    assert child["service"] == "payments"
    logs = httpx.get(
        f"{server.url}/api/lookout/logs", params={"trace_id": trace_id}, timeout=10
    ).json()["logs"]
    assert [(r["level"], r["body"]) for r in logs] == [
        ("error", "Connection refused from M-Pesa API")
    ]
    sold = httpx.get(
        f"{server.url}/api/lookout/series", params={"match": "tickets_sold_total"}, timeout=10
    ).json()["series"]
    assert sold[0]["labels"] == {
        "__name__": "tickets_sold_total", "route": "nbo-mba", "job": "payments", "instance": "pay-1",
    }  # fmt: skip
    assert sold[0]["samples"][-1]["value"] == 2.0
    buckets = httpx.get(
        f"{server.url}/api/lookout/series",
        params={"match": 'http_server_request_duration_seconds_bucket{le="+Inf"}'},
        timeout=10,
    ).json()["series"]
    assert buckets[0]["samples"][-1]["value"] == 1.0
    all_buckets = httpx.get(
        f"{server.url}/api/lookout/series",
        params={"match": "http_server_request_duration_seconds_bucket"},
        timeout=10,
    ).json()["series"]
    exemplars = [s["exemplar"] for b in all_buckets for s in b["samples"] if s["exemplar"]]
    assert [e["trace_id"] for e in exemplars] == [trace_id], "the exemplar links to the trace"
    info = httpx.get(
        f"{server.url}/api/lookout/series", params={"match": "target_info"}, timeout=10
    ).json()["series"]
    assert info[0]["labels"]["team"] == "core"


def test_json_bodies_with_hex_ids_and_gzip(served: InProcess) -> None:
    now = NOW_NS()
    body = gzip.compress(json.dumps(_traces(_span("ab" * 16, "cd" * 8, now))).encode())
    response = served.client.post(
        "/v1/traces",
        content=body,
        headers={"content-type": "application/json", "content-encoding": "gzip"},
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    trace = served.client.get(f"/api/lookout/traces/{'ab' * 16}").json()
    assert trace["spans"][0]["span_id"] == "cd" * 8
    assert trace["spans"][0]["attributes"] == {"http.route": "/trips"}


def test_bad_records_are_dropped_one_by_one_with_partial_success(served: InProcess) -> None:
    now = NOW_NS()
    good = _span("11" * 16, "22" * 8, now)
    zero_id = _span("00" * 16, "33" * 8, now)
    ancient = _span("44" * 16, "55" * 8, now - 30 * 86400 * 10**9)
    future = _span("66" * 16, "77" * 8, now + 3600 * 10**9)
    response = served.client.post(
        "/v1/traces",
        content=json.dumps(_traces(good, zero_id, ancient, future)),
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 200
    answer = json_format.Parse(response.text, ExportTraceServiceResponse())
    assert answer.partial_success.rejected_spans == 3
    assert "too far in the future" in answer.partial_success.error_message
    assert served.client.get(f"/api/lookout/traces/{'11' * 16}").status_code == 200
    assert served.client.get(f"/api/lookout/traces/{'66' * 16}").status_code == 404


def test_resending_a_request_creates_no_duplicates(served: InProcess) -> None:
    body = json.dumps(_traces(_span("99" * 16, "88" * 8, NOW_NS())))
    for _ in range(3):
        assert (
            served.client.post(
                "/v1/traces", content=body, headers={"content-type": "application/json"}
            ).status_code
            == 200
        )
    assert served.client.get(f"/api/lookout/traces/{'99' * 16}").json()["span_count"] == 1


def test_malformed_bodies_and_wrong_types_are_client_errors(served: InProcess) -> None:
    cases = [
        (b"\xff\x00garbage", "application/x-protobuf", None, 400),
        (b"{not json", "application/json", None, 400),
        (b'{"resourceSpans": [{"scopeSpans": [{"spans": [{"traceId": "zz"}]}]}]}', "application/json", None, 400),
        (b"<xml/>", "text/xml", None, 415),
        (b"x", "application/json", "lz77", 415),
        (b"not gzip", "application/json", "gzip", 400),
    ]  # fmt: skip
    for body, content_type, encoding, status in cases:
        headers = {"content-type": content_type}
        if encoding:
            headers["content-encoding"] = encoding
        response = served.client.post("/v1/traces", content=body, headers=headers)
        assert response.status_code == status, (body, response.text)
        # OTLP/HTTP: the error body is a google.rpc.Status, encoded like the request.
        if content_type == "application/json":
            assert response.headers["content-type"] == "application/json"
            error = json_format.Parse(response.text, status_pb2.Status())
        else:
            assert response.headers["content-type"] == "application/x-protobuf"
            error = status_pb2.Status.FromString(response.content)
        assert error.code == 3
        assert error.message


def _metric_request(metric: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceMetrics": [
            {
                "resource": {
                    "attributes": [{"key": "service.name", "value": {"stringValue": "fleet"}}]
                },
                "scopeMetrics": [{"metrics": [metric]}],
            }
        ]
    }


def test_delta_sums_and_exponential_histograms_are_rejected_per_point(served: InProcess) -> None:
    now = str(NOW_NS())
    delta = {
        "name": "gps.updates",
        "sum": {
            "aggregationTemporality": 1,
            "isMonotonic": True,
            "dataPoints": [
                {"timeUnixNano": now, "asInt": "3"},
                {"timeUnixNano": now, "asInt": "4"},
            ],
        },
    }
    exponential = {
        "name": "latency",
        "exponentialHistogram": {"aggregationTemporality": 2, "dataPoints": [{"timeUnixNano": now, "count": "1"}]},
    }  # fmt: skip
    for metric, rejected, reason in ((delta, 2, "delta"), (exponential, 1, "exponential")):
        response = served.client.post(
            "/v1/metrics",
            content=json.dumps(_metric_request(metric)),
            headers={"content-type": "application/json"},
        )
        partial = response.json()["partialSuccess"]
        assert int(partial["rejectedDataPoints"]) == rejected
        assert reason in partial["errorMessage"]


def test_gauges_and_non_monotonic_sums_keep_their_names(served: InProcess) -> None:
    now = str(NOW_NS())
    gauge = {
        "name": "fleet.buses.active",
        "unit": "{bus}",
        "gauge": {"dataPoints": [{"timeUnixNano": now, "asDouble": 42, "attributes": [
            {"key": "depot.name", "value": {"stringValue": "Nairobi"}}]}]},
    }  # fmt: skip
    served.client.post(
        "/v1/metrics", content=json.dumps(_metric_request(gauge)), headers={"content-type": "application/json"}
    )  # fmt: skip
    series = served.client.get(
        "/api/lookout/series", params={"match": "fleet_buses_active"}
    ).json()["series"]
    assert series[0]["labels"] == {
        "__name__": "fleet_buses_active",
        "depot_name": "Nairobi",
        "job": "fleet",
        "instance": "",
    }
    assert series[0]["samples"][0]["value"] == 42.0


def test_metric_names_follow_the_otel_prometheus_rules() -> None:
    assert metric_name("http.server.request.duration", "s", counter=False, gauge=False) == (
        "http_server_request_duration_seconds"
    )
    assert (
        metric_name("tickets.sold", "{ticket}", counter=True, gauge=False) == "tickets_sold_total"
    )
    assert metric_name("memory.usage", "By", counter=False, gauge=True) == "memory_usage_bytes"
    assert metric_name("cpu.utilization", "1", counter=False, gauge=True) == "cpu_utilization_ratio"
    assert metric_name("requests_total", "", counter=True, gauge=False) == "requests_total"
    assert metric_name("net.io", "By/s", counter=False, gauge=True) == "net_io_bytes_per_second"


def test_logs_over_otlp_json(served: InProcess) -> None:
    now = NOW_NS()
    request = {
        "resourceLogs": [{
            "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "notifier"}}]},
            "scopeLogs": [{"logRecords": [
                {"timeUnixNano": str(now), "severityNumber": 13, "body": {"stringValue": "sms retry"},
                 "traceId": "ab" * 16, "spanId": "cd" * 8,
                 "attributes": [{"key": "attempt", "value": {"intValue": "2"}}]},
                {"severityText": "INFO", "body": {"stringValue": "no timestamp"}},
            ]}],
        }]
    }  # fmt: skip
    response = served.client.post(
        "/v1/logs", content=json.dumps(request), headers={"content-type": "application/json"}
    )
    assert int(response.json()["partialSuccess"]["rejectedLogRecords"]) == 1
    (record,) = served.client.get("/api/lookout/logs", params={"service": "notifier"}).json()[
        "logs"
    ]
    assert (record["level"], record["body"], record["trace_id"]) == (
        "warning",
        "sms retry",
        "ab" * 16,
    )
    assert record["attributes"] == {"attempt": 2}


def test_the_writer_reports_batches_and_queue_depth(served: InProcess) -> None:
    served.client.post(
        "/v1/traces", content=json.dumps(_traces(_span("12" * 16, "34" * 8, NOW_NS()))),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    registry = served.runtime.metrics.registry
    assert registry.get_sample_value("lookout_store_commit_batch_rows_count") >= 1
    assert registry.get_sample_value("lookout_store_writer_queue_depth") is not None
    wait_until(
        lambda: registry.get_sample_value("lookout_ingest_records_total", {"signal": "spans"}), 5
    )


def test_chunked_bodies_are_read_whole(server: RunningServer) -> None:
    import httpx

    body = json.dumps(_traces(_span("5a" * 16, "6b" * 8, NOW_NS()))).encode()

    def chunks() -> Any:  # a generator body goes out with Transfer-Encoding: chunked
        for start in range(0, len(body), 7):
            yield body[start : start + 7]

    response = httpx.post(
        f"{server.otlp_url}/v1/traces", content=chunks(),
        headers={"content-type": "application/json"}, timeout=10,
    )  # fmt: skip
    assert response.status_code == 200
    assert httpx.get(f"{server.url}/api/lookout/traces/{'5a' * 16}", timeout=10).status_code == 200


def test_readyz_fails_when_the_writer_is_not_running(served: InProcess) -> None:
    assert served.client.get("/readyz").status_code == 200
    served.runtime.writer.stop()
    response = served.client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "not_ready"
    posted = served.client.post(
        "/v1/traces", content=json.dumps(_traces()), headers={"content-type": "application/json"}
    )
    assert posted.status_code == 200, "an empty request needs no writer"


def test_log_records_convert_column_by_column_as_they_were_sent() -> None:
    """A body of any kind, attribute values of every kind, cut at the limit; no body is an
    empty body (it was the text `null`)."""
    from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest

    from lookout.ingest import otlp
    from lookout.ingest.limits import Limits

    now = time.time_ns()
    attributes = [
        {"key": "s", "value": {"stringValue": "x" * 3000}},
        {"key": "empty", "value": {"stringValue": ""}},
        {"key": "i", "value": {"intValue": "7"}},
        {"key": "d", "value": {"doubleValue": 0.5}},
        {"key": "b", "value": {"boolValue": True}},
        {"key": "a", "value": {"arrayValue": {"values": [{"stringValue": "y"}]}}},
        {"key": "m", "value": {"kvlistValue": {"values": [{"key": "k", "value": {}}]}}},
        {"key": "unset", "value": {}},
    ]
    records = [
        {"timeUnixNano": str(now), "attributes": attributes},
        {
            "timeUnixNano": str(now),
            "body": {
                "kvlistValue": {"values": [{"key": "event", "value": {"stringValue": "paid"}}]}
            },
        },
        {"observedTimeUnixNano": str(now), "severityText": "WARN", "body": {"stringValue": "w"}},
        {"timeUnixNano": str(now - 8 * 86400 * 10**9), "body": {"stringValue": "too old"}},
    ]
    request = json_format.ParseDict(
        {"resourceLogs": [{"scopeLogs": [{"logRecords": records}]}]}, ExportLogsServiceRequest()
    )
    outcome = otlp.logs(request, Limits(), now)
    logs = outcome.logs
    assert logs.body == ["", '{"event": "paid"}', "w"]
    assert logs.level == ["unspecified", "unspecified", "warning"]
    assert logs.ts_ns == [now, now, now]
    assert logs.service == ["unknown_service"] * 3
    stored = json.loads(logs.attributes[0])
    assert len(stored["s"]) == 2048
    assert {k: v for k, v in stored.items() if k != "s"} == {
        "empty": "", "i": 7, "d": 0.5, "b": True, "a": ["y"], "m": {"k": None}, "unset": None,
    }  # fmt: skip
    assert outcome.reasons == {"older than the retention horizon": 1}


def test_spans_convert_column_by_column_as_they_were_sent() -> None:
    """Every span column as sent: ids as hex, a root's parent empty, an end before the start
    clamped, events and links as JSON, long values cut at the limit (event attributes too),
    the sampling threshold's adjusted count; an invalid span is rejected alone."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    from lookout.ingest import otlp
    from lookout.ingest.limits import Limits

    now = time.time_ns()
    long_value = {"key": "blob", "value": {"stringValue": "x" * 3000}}
    child = {
        **_span("ab" * 16, "cd" * 8, now, name="charge"),
        "parentSpanId": "ef" * 8,
        "endTimeUnixNano": str(now - 1),  # before its start
        "status": {"code": 2, "message": "declined"},
        "traceState": "ot=th:c",  # a threshold keeping a quarter: counts 4
        "attributes": [long_value, {"key": "n", "value": {"intValue": "3"}}],
        "events": [{"name": "retry", "timeUnixNano": str(now), "attributes": [long_value]}],
        "links": [{"traceId": "12" * 16, "spanId": "34" * 8}],
    }
    root = _span("ab" * 16, "ef" * 8, now)
    invalid = _span("00" * 16, "11" * 8, now)
    request = json_format.ParseDict(
        _base64(_traces(child, root, invalid)), ExportTraceServiceRequest()
    )
    outcome = otlp.spans(request, Limits(), now)
    spans = outcome.spans
    assert outcome.reasons == {"invalid trace_id or span_id": 1}
    assert spans.span_id == ["cd" * 8, "ef" * 8]
    assert spans.parent_span_id == ["ef" * 8, ""]
    assert spans.trace_id == ["ab" * 16] * 2
    assert spans.end_ns == [now, now + 5_000_000]  # clamped to the start
    assert spans.kind == ["server", "server"]
    assert (spans.status_code, spans.status_message) == (["error", "unset"], ["declined", ""])
    assert spans.adjusted_count == [4.0, 1.0]
    assert spans.service == ["ticketing"] * 2
    attributes = json.loads(spans.attributes[0])
    assert (len(attributes["blob"]), attributes["n"]) == (2048, 3)
    (event,) = json.loads(spans.events[0])
    assert (event["name"], len(event["attributes"]["blob"])) == ("retry", 2048)
    assert json.loads(spans.links[0]) == [
        {"trace_id": "12" * 16, "span_id": "34" * 8, "attributes": {}}
    ]
    assert (spans.events[1], spans.links[1]) == ("[]", "[]")
    assert json.loads(spans.resource[0]) == {"service.name": "ticketing"}


def _base64(node: Any) -> Any:
    """Hex ids as base64, which protobuf's JSON mapping wants for bytes."""
    import base64

    if isinstance(node, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode()
            if k in ("traceId", "spanId", "parentSpanId") and v
            else _base64(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_base64(v) for v in node]
    return node
