"""OTLP decoding in worker processes (lookout.server.decoding): the same answers and the
same stored rows as decoding in the server process, and a dead worker costs one retry."""

from __future__ import annotations

import base64
import contextlib
import os
import pickle
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from google.protobuf import json_format
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from lookout import config
from lookout.errors import ConfigError, IngestError
from lookout.server.decoding import auto_workers
from tests.server.conftest import InProcess, config_for, in_process, start_server
from tests.support import wait_until

PROTOBUF = {"content-type": "application/x-protobuf"}


def _logs(count: int, marker: str) -> bytes:
    now = time.time_ns()
    records = [
        {
            "timeUnixNano": str(now + i),
            "severityNumber": 17 if i % 4 == 0 else 9,
            "body": {"stringValue": f"{marker} {i}: card 4111 1111 1111 1111 declined"},
            "traceId": f"{i + 1:032x}",
            "spanId": f"{i + 1:016x}",
            "attributes": [
                {"key": "password", "value": {"stringValue": "hunter2"}},
                {"key": "attempt", "value": {"intValue": str(i)}},
                {"key": "tags", "value": {"arrayValue": {"values": [{"stringValue": "a"}]}}},
            ],
        }
        for i in range(count)
    ]
    resource = {"attributes": [{"key": "service.name", "value": {"stringValue": "payments"}}]}
    request = {"resourceLogs": [{"resource": resource, "scopeLogs": [{"logRecords": records}]}]}
    message = ExportLogsServiceRequest()
    json_format.ParseDict(_base64_ids(request), message)
    return bytes(message.SerializeToString())


def _base64_ids(node: Any) -> Any:
    """Hex ids as base64, which protobuf's JSON mapping wants for bytes."""
    if isinstance(node, dict):
        return {
            k: base64.b64encode(bytes.fromhex(v)).decode()
            if k in ("traceId", "spanId", "parentSpanId")
            else _base64_ids(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_base64_ids(v) for v in node]
    return node


@pytest.fixture(params=[0, 1], ids=["inline", "one-worker"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[InProcess]:
    with in_process(config_for(tmp_path / "data", decode_workers=request.param)) as served:
        yield served


def _rows(served: InProcess, marker: str) -> list[tuple[Any, ...]]:
    cursor = served.runtime.database.cursor()
    return cursor.execute(
        "SELECT ts_ns, level, severity_number, body, trace_id, span_id, attributes, resource "
        "FROM logs WHERE body LIKE ? ORDER BY ts_ns",
        [f"{marker}%"],
    ).fetchall()


def test_the_workers_decode_and_the_server_process_does_not(tmp_path: Path) -> None:
    with in_process(config_for(tmp_path / "data", decode_workers=2)) as served:
        decoders = served.runtime.decoders
        answered = decoders.start()  # as `lookout server` does at startup
        workers = decoders.pids()
        assert len(workers) == 2
        assert set(answered) <= set(workers)
        assert os.getpid() not in workers
        response = served.client.post("/v1/logs", content=_logs(20, "pooled"), headers=PROTOBUF)
        assert response.status_code == 200, response.text
        assert decoders.pids() == workers
        assert len(_rows(served, "pooled")) == 20


def _inline_then_pooled(
    tmp_path: Path, path: str, body: bytes, read: Callable[[InProcess], Any]
) -> list[Any]:
    """`body` posted to `path` of a server decoding in its own process, then of one with a
    worker: what `read` finds in each."""
    found = []
    for workers in (0, 1):
        config = config_for(tmp_path / f"data-{workers}", decode_workers=workers)
        with in_process(config) as served:
            response = served.client.post(path, content=body, headers=PROTOBUF)
            assert response.status_code == 200, response.text
            assert len(served.runtime.decoders.pids()) == workers  # the worker decoded it
            found.append(read(served))
    return found


def test_pooled_and_inline_decoding_store_the_same_rows(tmp_path: Path) -> None:
    stored = _inline_then_pooled(
        tmp_path, "/v1/logs", _logs(50, "same"), lambda served: _rows(served, "same")
    )
    assert len(stored[0]) == 50
    assert stored[0] == stored[1]
    body_text, attributes = stored[0][0][3], stored[0][0][6]
    assert "4111 1111 1111 1111" not in body_text  # scrubbed, in the worker
    assert "hunter2" not in attributes


def _spans(count: int, marker: str) -> bytes:
    """Spans with a secret in every column the scrubber looks at."""
    now = time.time_ns()
    card = {"key": "card", "value": {"stringValue": "4111 1111 1111 1111"}}
    spans = [
        {
            "traceId": f"{i + 1:032x}",
            "spanId": f"{i + 1:016x}",
            "parentSpanId": f"{i + 2:016x}" if i % 2 else "",
            "name": f"{marker} {i} charge user@example.com",
            "kind": 2 + i % 3,
            "startTimeUnixNano": str(now + i),
            "endTimeUnixNano": str(now + i + 10**6),
            "traceState": "ot=th:8" if i % 5 == 0 else "",
            "status": {"code": 2, "message": "Authorization: Bearer abcdefghijklmnop"},
            "attributes": [
                {"key": "password", "value": {"stringValue": "hunter2"}},
                {"key": "attempt", "value": {"intValue": str(i)}},
            ],
            "events": [{"name": "exception", "timeUnixNano": str(now + i), "attributes": [card]}],
            "links": [
                {"traceId": f"{i + 9:032x}", "spanId": f"{i + 9:016x}", "attributes": [card]}
            ],
        }
        for i in range(count)
    ]
    service = {"key": "service.name", "value": {"stringValue": "payments"}}
    token = {"key": "api.token", "value": {"stringValue": "s3cr3t-t0ken"}}
    resource = {"attributes": [service, token]}
    request = {"resourceSpans": [{"resource": resource, "scopeSpans": [{"spans": spans}]}]}
    message = ExportTraceServiceRequest()
    json_format.ParseDict(_base64_ids(request), message)
    return bytes(message.SerializeToString())


def _span_rows_and_calls(served: InProcess) -> tuple[list[tuple[Any, ...]], float]:
    """The stored spans marked "same", and the span metrics' calls counted for them."""
    rows = (
        served.runtime.database.cursor()
        .execute(
            "SELECT * EXCLUDE (ingested_ns) FROM spans WHERE name LIKE 'same%' ORDER BY start_ns"
        )
        .fetchall()
    )
    calls = sum(
        sample.value
        for family in served.runtime.derived.calls.collect()
        for sample in family.samples
        if sample.name.endswith("_total") and sample.labels["service_name"] == "payments"
    )
    return rows, calls


def test_pooled_and_inline_decoding_store_the_same_spans(tmp_path: Path) -> None:
    (stored_inline, calls_inline), (stored_pooled, calls_pooled) = _inline_then_pooled(
        tmp_path, "/v1/traces", _spans(40, "same"), _span_rows_and_calls
    )
    # A threshold of 8 keeps half: those 8 spans count twice.
    assert calls_inline == calls_pooled == 32 + 8 * 2
    assert len(stored_inline) == 40
    assert stored_inline == stored_pooled
    text = repr(stored_pooled)
    for secret in (
        "4111 1111 1111 1111",
        "user@example.com",
        "abcdefghijklmnop",
        "hunter2",
        "s3cr3t",
    ):
        assert secret not in text  # scrubbed in every column, in the worker too


@pytest.mark.parametrize(
    ("body", "content_type", "status", "reason"),
    [
        (b"\xff\xff\xff", "application/x-protobuf", 400, "malformed"),
        (b"{}", "text/plain", 415, "unsupported_media_type"),
        (b'{"resourceLogs": {"not": "a list"}}', "application/json", 400, "malformed"),
        (b"[1, 2]", "application/json", 400, "malformed"),
    ],
    ids=["bad-protobuf", "wrong-type", "wrong-shape", "not-an-object"],
)
def test_a_clients_mistake_gets_the_same_answer_from_a_worker(
    server: InProcess, body: bytes, content_type: str, status: int, reason: str
) -> None:
    response = server.client.post("/v1/logs", content=body, headers={"content-type": content_type})
    assert response.status_code == status, response.text
    metric = server.runtime.metrics.rejected.labels("otlp_logs", reason)
    assert metric._value.get() == 1


def test_an_ingest_error_keeps_its_status_and_reason_across_processes() -> None:
    error = IngestError("no such type", status=415, reason="unsupported_media_type")
    copy = pickle.loads(pickle.dumps(error))
    assert (str(copy), copy.status, copy.reason) == ("no such type", 415, "unsupported_media_type")


def test_a_dead_worker_costs_a_retry_and_a_new_worker_takes_over(tmp_path: Path) -> None:
    with in_process(config_for(tmp_path / "data", decode_workers=1)) as served:
        client, decoders = served.client, served.runtime.decoders
        assert client.post("/v1/logs", content=_logs(5, "before"), headers=PROTOBUF).is_success
        (pid,) = decoders.pids()
        os.kill(pid, signal.SIGKILL)
        statuses = []
        for attempt in range(5):  # a 503 with Retry-After, then a new worker answers
            response = client.post(
                "/v1/logs", content=_logs(5, f"after{attempt}"), headers=PROTOBUF
            )
            statuses.append(response.status_code)
            if response.status_code == 503:
                assert response.headers["retry-after"] == "1"
                assert "decoder_lost" in response.text
            if response.is_success:
                break
        assert statuses[-1] == 200, statuses
        assert statuses.count(503) <= 1, statuses
        assert decoders.replaced == statuses.count(503)
        wait_until(lambda: decoders.pids() and pid not in decoders.pids(), what="a new worker")
        acknowledged = ["before", *(f"after{i}" for i, s in enumerate(statuses) if s == 200)]
        assert all(len(_rows(served, marker)) == 5 for marker in acknowledged)


def test_the_default_is_one_worker_per_core_at_most_four() -> None:
    assert [auto_workers(cores) for cores in (1, 2, 3, 4, 8, 64)] == [1, 2, 3, 4, 4, 4]


@pytest.mark.parametrize("value", ["-1", "65", "two", "1.5"])
def test_a_bad_decode_workers_value_names_the_key(value: str) -> None:
    with pytest.raises(ConfigError, match="Config 'decode_workers' has value"):
        config.load(None, {"LOOKOUT_DECODE_WORKERS": value}, {})


def test_decode_workers_may_be_zero() -> None:
    assert config.load(None, {"LOOKOUT_DECODE_WORKERS": "0"}, {}).decode_workers == 0
    assert config.load(None, {}, {}).decode_workers is None  # auto


def _descendants(pid: int) -> set[int]:
    children: dict[int, set[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, set()).add(int(stat.parent.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), set()):
            found.add(child)
            todo.append(child)
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_no_decoder_outlives_a_server_killed_with_kill_9(tmp_path: Path) -> None:
    server = start_server(tmp_path / "data", env={"LOOKOUT_DECODE_WORKERS": "2"})
    helpers: set[int] = set()
    try:
        response = httpx.post(
            f"{server.url}/v1/logs", content=_logs(5, "killed"), headers=PROTOBUF, timeout=30
        )
        assert response.status_code == 200, response.text
        helpers = _descendants(server.process.pid)
        assert len(helpers) >= 3  # the forkserver and two workers (and a resource tracker)
        server.process.send_signal(signal.SIGKILL)
        server.process.wait(30)
        wait_until(lambda: not any(Path(f"/proc/{pid}").exists() for pid in helpers),
                   timeout_s=15, what="the decoders to end with the server")  # fmt: skip
    finally:
        for pid in helpers:  # after a failure: they hold the server's stdout open
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        server.stop()


def test_metrics_are_decoded_in_the_server_process(tmp_path: Path) -> None:
    """Samples come back from a worker as objects, slower to unpickle than to decode here."""
    now = time.time_ns()
    point = {"asInt": "3", "timeUnixNano": str(now)}
    metric = {"name": "jobs", "gauge": {"dataPoints": [point]}}
    metrics = {"resourceMetrics": [{"scopeMetrics": [{"metrics": [metric]}]}]}
    with in_process(config_for(tmp_path / "data", decode_workers=1)) as served:
        assert served.client.post("/v1/metrics", json=metrics).status_code == 200
        assert served.runtime.decoders.pids() == []  # no worker was needed
        assert served.client.post("/v1/traces", content=_spans(1, "x"), headers=PROTOBUF).is_success
        assert len(served.runtime.decoders.pids()) == 1
