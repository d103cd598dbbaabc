"""Loki's push API: JSON and snappy protobuf goldens, structured metadata, tenants, dedup."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import cramjam
import pytest

from lookout.ingest.limits import Limits
from lookout.ingest.loki import PushRequest, parse_labels, read_push
from tests.server.conftest import InProcess

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "loki"
RECORD = os.environ.get("LOOKOUT_RECORD_FIXTURES") == "1"
# Goldens carry fixed timestamps; parse them as if "now" were just after them.
NOW_NS = 1_795_800_000_000_000_000


def _protobuf_body() -> bytes:
    request = PushRequest()
    stream = request.streams.add()
    stream.labels = '{service_name="notifier", level="warn", env="prod"}'
    entry = stream.entries.add()
    entry.timestamp.seconds, entry.timestamp.nanos = 1_795_799_990, 123
    entry.line = "SMS gateway slow"
    pair = entry.structuredMetadata.add()
    pair.name, pair.value = "trace_id", "ab" * 16
    second = stream.entries.add()
    second.timestamp.seconds = 1_795_799_991
    second.line = '{"event": "sms_sent", "level": "info", "to": "msisdn:abc…678"}'
    return bytes(cramjam.snappy.compress_raw(request.SerializeToString()))


def _records(body: bytes, content_type: str) -> list[dict[str, Any]]:
    outcome = read_push(body, content_type, "tenant-a", Limits(), NOW_NS)
    return [
        {"ts_ns": r.ts_ns, "service": r.service, "level": r.level, "body": r.body,
         "trace_id": r.trace_id, "attributes": r.attributes, "resource": r.resource}
        for r in outcome.records
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("name", "content_type"),
    [("push.json", "application/json"), ("push.pb.snappy", "application/x-protobuf")],
)
def test_golden_push_bodies_parse_to_their_expected_records(name: str, content_type: str) -> None:
    body_path = FIXTURES / name
    expected_path = FIXTURES / f"{name}.expected.json"
    if RECORD and name.endswith(".snappy"):
        body_path.write_bytes(_protobuf_body())
    records = _records(body_path.read_bytes(), content_type)
    if RECORD:
        expected_path.write_text(json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    assert records == json.loads(expected_path.read_text())


def test_stream_labels_parse() -> None:
    assert parse_labels('{a="1", b="x\\"y"}') == {"a": "1", "b": 'x"y'}
    with pytest.raises(Exception, match="labels"):
        parse_labels("job=x")


def test_push_over_http_with_tenant_and_dedup(served: InProcess) -> None:
    now = str(time.time_ns())
    body = json.dumps({"streams": [{"stream": {"job": "gateway", "level": "error"},
                                    "values": [[now, "upstream timeout"], [now, "upstream timeout"]]}]})  # fmt: skip
    headers = {"content-type": "application/json", "x-scope-orgid": "busline"}
    for _ in range(2):
        assert (
            served.client.post("/loki/api/v1/push", content=body, headers=headers).status_code
            == 204
        )
    (record,) = served.client.get("/api/lookout/logs", params={"service": "gateway"}).json()["logs"]
    assert (record["level"], record["body"]) == ("error", "upstream timeout")
    assert record["resource"]["lookout.tenant"] == "busline"


def test_snappy_protobuf_over_http(served: InProcess) -> None:
    request = PushRequest()
    stream = request.streams.add()
    stream.labels = '{app="fleet"}'
    entry = stream.entries.add()
    entry.timestamp.seconds = int(time.time())
    entry.line = "gps fix lost for KCA 123A"
    body = bytes(cramjam.snappy.compress_raw(request.SerializeToString()))
    response = served.client.post(
        "/loki/api/v1/push", content=body, headers={"content-type": "application/x-protobuf"}
    )
    assert response.status_code == 204
    (record,) = served.client.get("/api/lookout/logs", params={"service": "fleet"}).json()["logs"]
    assert record["body"] == "gps fix lost for KCA 123A"


@pytest.mark.parametrize(
    ("body", "content_type", "status"),
    [
        (b"not snappy", "application/x-protobuf", 400),
        (b'{"streams": 5}', "application/json", 400),
        (
            b'{"streams": [{"stream": {"a": "b"}, "values": [["soon", "x"]]}]}',
            "application/json",
            400,
        ),
        (b"x", "text/plain", 415),
    ],
)
def test_bad_pushes_are_4xx(served: InProcess, body: bytes, content_type: str, status: int) -> None:
    response = served.client.post(
        "/loki/api/v1/push", content=body, headers={"content-type": content_type}
    )
    assert response.status_code == status
