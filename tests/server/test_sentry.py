"""Sentry intake: the real sentry-sdk, auth, encodings, item types, grouping."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
import time
import uuid
import zlib
from typing import Any

import brotli
import httpx
import pytest

from lookout.ingest.sentry import fingerprint, parse_envelope
from tests.server.conftest import DSN_KEY, InProcess, RunningServer
from tests.support import ROOT, wait_until

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
AUTH = {"x-sentry-auth": f"Sentry sentry_version=7, sentry_key={DSN_KEY}, sentry_client=test/1"}


def envelope(*items: tuple[dict[str, Any], Any], event_id: str | None = None) -> bytes:
    lines = [json.dumps({"event_id": event_id} if event_id else {}).encode()]
    for header, payload in items:
        body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        lines += [json.dumps({**header, "length": len(body)}).encode(), body]
    return b"\n".join(lines)


def event(message: str = "boom", **extra: Any) -> dict[str, Any]:
    return {
        "event_id": uuid.uuid4().hex,
        "timestamp": time.time(),
        "level": "error",
        "exception": {"values": [{"type": "KeyError", "value": message, "stacktrace": {"frames": [
            {"module": "busline.ticketing", "function": "book", "in_app": True}]}}]},
        **extra,
    }  # fmt: skip


def test_the_real_sentry_sdk_in_another_process(server: RunningServer) -> None:
    dsn = server.url.replace("http://", f"http://{DSN_KEY}@") + "/1"
    subprocess.run(
        [sys.executable, "-m", "tests.server.clients.sentry_client", dsn, TRACE_ID],
        cwd=ROOT, check=True, timeout=60, capture_output=True,
    )  # fmt: skip
    events = wait_until(
        lambda: (e := httpx.get(f"{server.url}/api/lookout/events",
                                params={"trace_id": TRACE_ID}, timeout=10).json()["events"])
        and len(e) == 2 and e,
        10, "two events for the trace",
    )  # fmt: skip
    first = events[0]
    frames = first["payload"]["exception"]["values"][0]["stacktrace"]["frames"]
    assert frames[-1]["function"] == "charge"
    assert frames[-1]["vars"]["amount_kes"] == "1500"
    assert first["user"] == {"id": "u-42"}
    assert first["tags"]["service"] == "payments"
    assert (first["release"], first["environment"], first["service"]) == (
        "2.3.0",
        "staging",
        "payments",
    )
    assert events[0]["issue_id"] == events[1]["issue_id"], "two identical exceptions, one issue"
    (issue,) = httpx.get(f"{server.url}/api/lookout/issues", timeout=10).json()["issues"]
    assert issue["events"] == 2
    assert issue["title"].startswith("ConnectionRefusedError: M-Pesa refused")
    runs = httpx.get(f"{server.url}/api/lookout/job-runs", timeout=10).json()["job_runs"]
    assert [(r["monitor"], r["status"]) for r in runs] == [("nightly-report", "error")]
    traces = httpx.get(
        f"{server.url}/api/lookout/traces", params={"name": "POST /pay"}, timeout=10
    ).json()["traces"]
    assert traces
    assert traces[0]["span_count"] == 2


@pytest.mark.parametrize(
    ("headers", "path", "status"),
    [
        ({}, "/api/1/envelope/", 401),
        ({"x-sentry-auth": "Sentry sentry_key=wrong"}, "/api/1/envelope/", 403),
        (AUTH, "/api/7/envelope/", 404),
        ({}, f"/api/1/envelope/?sentry_key={DSN_KEY}", 200),
    ],
)
def test_auth_is_a_dsn_key_per_project(
    served: InProcess, headers: dict[str, str], path: str, status: int
) -> None:
    response = served.client.post(
        path, content=envelope(({"type": "event"}, event())), headers=headers
    )
    assert response.status_code == status, response.text


@pytest.mark.parametrize(
    ("encoding", "compress"),
    [
        ("gzip", gzip.compress),
        ("deflate", zlib.compress),
        ("br", brotli.compress),
        ("", lambda b: b),
    ],
)
def test_bodies_may_be_gzip_deflate_or_br(served: InProcess, encoding: str, compress: Any) -> None:
    payload = event("encoded " + encoding)
    response = served.client.post(
        "/api/1/envelope/",
        content=compress(envelope(({"type": "event"}, payload))),
        headers={**AUTH, "content-encoding": encoding},
    )
    assert response.json() == {"id": payload["event_id"]}
    stored = served.client.get(
        "/api/lookout/events", params={"issue_id": _issue_of(served, payload)}
    )
    assert stored.status_code == 200


def _issue_of(served: InProcess, payload: dict[str, Any]) -> str:
    issues = served.client.get("/api/lookout/issues").json()["issues"]
    return next(
        i["issue_id"] for i in issues if payload["exception"]["values"][0]["value"] in i["title"]
    )


def test_store_endpoint_is_an_alias_for_one_event(served: InProcess) -> None:
    payload = event(
        "via store", contexts={"trace": {"trace_id": TRACE_ID, "span_id": "00f067aa0ba902b7"}}
    )
    response = served.client.post("/api/1/store/", content=json.dumps(payload), headers=AUTH)
    assert response.json() == {"id": payload["event_id"]}
    (stored,) = served.client.get("/api/lookout/events", params={"trace_id": TRACE_ID}).json()[
        "events"
    ]
    assert stored["span_id"] == "00f067aa0ba902b7"


def test_resent_events_are_stored_once(served: InProcess) -> None:
    body = envelope(({"type": "event"}, event("resent")))
    for _ in range(3):
        assert served.client.post("/api/1/envelope/", content=body, headers=AUTH).status_code == 200
    (issue,) = [
        i
        for i in served.client.get("/api/lookout/issues").json()["issues"]
        if "resent" in i["title"]
    ]
    assert issue["events"] == 1


def test_client_reports_and_unknown_items_are_counted(served: InProcess) -> None:
    report = {
        "discarded_events": [{"reason": "queue_overflow", "category": "error", "quantity": 3}]
    }
    body = envelope(
        ({"type": "client_report"}, report),
        ({"type": "session"}, {"sid": "x"}),
        ({"type": "attachment"}, b"raw bytes\nwith newline"),
    )
    assert served.client.post("/api/1/envelope/", content=body, headers=AUTH).status_code == 200
    registry = served.runtime.metrics.registry
    assert (
        registry.get_sample_value(
            "lookout_sdk_client_discarded_total", {"reason": "queue_overflow", "category": "error"}
        )
        == 3.0
    )
    assert (
        registry.get_sample_value("lookout_sentry_items_skipped_total", {"type": "session"}) == 1.0
    )
    assert (
        registry.get_sample_value("lookout_sentry_items_skipped_total", {"type": "attachment"})
        == 1.0
    )


@pytest.mark.parametrize(
    "body",
    [b"{not json", b'{}\n{"type": "event", "length": 999}\n{}', b'{}\n{"type":"event"}\n[1,2]'],
)
def test_malformed_envelopes_are_400_with_the_error_shape(served: InProcess, body: bytes) -> None:
    response = served.client.post("/api/1/envelope/", content=body, headers=AUTH)
    assert response.status_code == 400
    assert set(response.json()["error"]) == {"status", "code", "message"}


def test_implicit_length_items_parse() -> None:
    parsed = parse_envelope(
        b'{"event_id":"ab"}\n{"type":"event"}\n{"a":1}\n{"type":"check_in"}\n{"b":2}\n'
    )
    assert [(i.type, json.loads(i.payload)) for i in parsed.items] == [
        ("event", {"a": 1}),
        ("check_in", {"b": 2}),
    ]


def test_grouping_uses_the_sdk_fingerprint_else_type_and_in_app_frames() -> None:
    base = event("a")
    assert fingerprint(base) == fingerprint(event("a different message"))
    assert fingerprint({**base, "fingerprint": ["payments", "mpesa-down"]}) != fingerprint(base)
    other_frame = event("a")
    other_frame["exception"]["values"][0]["stacktrace"]["frames"][0]["function"] = "pay"
    assert fingerprint(other_frame) != fingerprint(base)
