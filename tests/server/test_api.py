"""The read API: traces, logs (filters, text, phone numbers, cursor), errors, series, jobs,
and the one JSON error shape."""

from __future__ import annotations

import time
from typing import Any

import pytest

from lookout.model import (
    Batch,
    ErrorEvent,
    JobRun,
    LogColumns,
    LogRecord,
    Sample,
    Span,
    SpanColumns,
)
from lookout.sdk._scrub import Scrubber
from tests.server.conftest import InProcess

NOW = time.time_ns()
T1, T2 = "a1" * 16, "b2" * 16


def _span(
    trace: str,
    span: str,
    parent: str,
    service: str,
    name: str,
    ms: int,
    status: str = "unset",
    **attrs: Any,
) -> Span:
    start = NOW - 60 * 10**9
    return Span(trace, span, parent, service, name, "server", start, start + ms * 10**6, status,
                attributes=attrs)  # fmt: skip


@pytest.fixture
def seeded(served: InProcess) -> InProcess:
    phone_hash = Scrubber(b"test-key").scrub_text("STK push to 0712345678 failed")
    logs = [
        LogRecord(NOW - i * 10**9, "payments", "error" if i % 3 == 0 else "info", 9,
                  f"line {i}", T1 if i < 5 else "", attributes={"route": "nbo-mba" if i % 2 else "nbo-ksm"})
        for i in range(25)
    ] + [LogRecord(NOW - 30 * 10**9, "payments", "error", 17, phone_hash)]  # fmt: skip
    batch = Batch(
        spans=SpanColumns.of([
            _span(T1, "01" * 8, "", "gateway", "POST /api/book", 900, **{"http.route": "/api/book"}),
            _span(T1, "02" * 8, "01" * 8, "payments", "mpesa stk push", 850, "error"),
            _span(T2, "03" * 8, "", "gateway", "GET /api/trips", 20),
        ]),
        logs=LogColumns.of(logs),
        samples=[Sample("up", {"job": "ticketing", "instance": "a"}, NOW // 10**6 - 1000, 1.0),
                 Sample("up", {"job": "payments", "instance": "b"}, NOW // 10**6 - 1000, 0.0)],
        events=[ErrorEvent("e" * 32, 1, NOW - 10**9, "fp1", "ConnectionRefusedError: refused",
                           "ConnectionRefusedError", "refused", "error", "payments", "prod", "2.3.0",
                           T1, "02" * 8, {"id": "u-1"}, {}, {"k": 1})],
        job_runs=[JobRun("c1", "nightly-report", "error", NOW - 10**9, 3.5, "prod", 1)],
    )  # fmt: skip
    served.runtime.writer.submit(batch).result(10)
    return served


def test_trace_by_id_has_every_span_with_parents_and_timings(seeded: InProcess) -> None:
    trace = seeded.client.get(f"/api/lookout/traces/{T1}").json()
    assert trace["span_count"] == 2
    assert trace["services"] == ["gateway", "payments"]
    assert trace["error"] is True
    child = trace["spans"][1]
    assert (child["parent_span_id"], child["duration_ms"], child["status"]["code"]) == (
        "01" * 8,
        850.0,
        "error",
    )


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"service": "payments"}, [T1]),
        ({"status": "error"}, [T1]),
        ({"name": "GET /api/trips"}, [T2]),
        ({"min_duration_ms": "500"}, [T1]),
        ({"max_duration_ms": "100"}, [T2]),
        ({"attr": "http.route=/api/book"}, [T1]),
        ({"start": str((NOW + 10**9) / 1e9), "end": str((NOW + 10 * 10**9) / 1e9)}, []),
    ],
)
def test_trace_search_filters(
    seeded: InProcess, params: dict[str, str], expected: list[str]
) -> None:
    found = seeded.client.get("/api/lookout/traces", params=params).json()["traces"]
    assert [t["trace_id"] for t in found] == expected


def test_log_search_filters_and_pages_with_a_cursor(seeded: InProcess) -> None:
    pages, cursor = [], None
    while True:
        params = {"service": "payments", "limit": "7", **({"cursor": cursor} if cursor else {})}
        answer = seeded.client.get("/api/lookout/logs", params=params).json()
        pages.append(answer["logs"])
        cursor = answer["next_cursor"]
        if not cursor:
            break
    bodies = [r["body"] for page in pages for r in page]
    assert len(bodies) == 26 == len(set(bodies))
    assert [len(p) for p in pages] == [7, 7, 7, 5]
    by_trace = seeded.client.get("/api/lookout/logs", params={"trace_id": T1}).json()["logs"]
    assert len(by_trace) == 5
    errors = seeded.client.get(
        "/api/lookout/logs", params={"level": "error", "q": "LINE 1"}
    ).json()["logs"]
    assert {r["body"] for r in errors} == {"line 12", "line 15", "line 18"}
    by_attr = seeded.client.get(
        "/api/lookout/logs", params={"attr": "route=nbo-ksm", "q": "line 2"}
    ).json()
    assert {r["body"] for r in by_attr["logs"]} == {"line 2", "line 20", "line 22", "line 24"}


def test_log_text_search_takes_underscores_and_percent_signs_literally(served: InProcess) -> None:
    """`_` and `%` are LIKE's wildcards: a search for them must find them, and only them."""
    bodies = ["payment_attempt_failed", "paymentXattemptXfailed", "done 100% of it", "done 1000"]
    logs = [
        LogRecord(NOW - i * 10**9, "payments", "info", 9, body) for i, body in enumerate(bodies)
    ]
    served.runtime.writer.submit(Batch(logs=LogColumns.of(logs))).result(10)

    def found(text: str) -> set[str]:
        answer = served.client.get("/api/lookout/logs", params={"q": text}).json()["logs"]
        return {r["body"] for r in answer}

    assert found("payment_attempt_failed") == {"payment_attempt_failed"}
    assert found("100%") == {"done 100% of it"}
    assert found("t_a") == {"payment_attempt_failed"}


def test_a_phone_number_search_matches_through_the_msisdn_hash(seeded: InProcess) -> None:
    for form in ("0712345678", "+254 712 345 678", "254712345678"):
        found = seeded.client.get("/api/lookout/logs", params={"phone": form}).json()["logs"]
        assert [r["level"] for r in found] == ["error"], form
    free_text = seeded.client.get("/api/lookout/logs", params={"q": "0712345678"}).json()["logs"]
    assert len(free_text) == 1
    assert (
        seeded.client.get("/api/lookout/logs", params={"phone": "0799999999"}).json()["logs"] == []
    )


def test_issues_and_their_events_and_the_events_of_a_trace(seeded: InProcess) -> None:
    (issue,) = seeded.client.get("/api/lookout/issues").json()["issues"]
    assert (issue["events"], issue["last_trace_id"], issue["services"]) == (1, T1, ["payments"])
    events = seeded.client.get(f"/api/lookout/issues/{issue['issue_id']}").json()["events"]
    assert events[0]["user"] == {"id": "u-1"}
    by_trace = seeded.client.get("/api/lookout/events", params={"trace_id": T1}).json()["events"]
    assert [e["event_id"] for e in by_trace] == ["e" * 32]


def test_raw_series_by_matchers(seeded: InProcess) -> None:
    def jobs(selector: str) -> list[str]:
        found = seeded.client.get("/api/lookout/series", params={"match": selector}).json()[
            "series"
        ]
        return sorted(s["labels"]["job"] for s in found)

    assert jobs("up") == ["payments", "ticketing"]
    assert jobs('up{job="payments"}') == ["payments"]
    assert jobs('up{job!="payments"}') == ["ticketing"]
    assert jobs('up{job=~"pay.*"}') == ["payments"]
    assert jobs('up{job!~"pay.*"}') == ["ticketing"]
    assert jobs('{__name__="up", instance="a"}') == ["ticketing"]


def test_job_runs(seeded: InProcess) -> None:
    runs = seeded.client.get("/api/lookout/job-runs", params={"status": "error"}).json()["job_runs"]
    assert [(r["monitor"], r["duration_s"]) for r in runs] == [("nightly-report", 3.5)]


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/api/lookout/nope", 404, "not_found"),
        ("GET", f"/api/lookout/traces/{'0' * 31}z", 400, "bad_request"),
        ("GET", f"/api/lookout/traces/{'c' * 32}", 404, "not_found"),
        ("GET", "/api/lookout/logs?limit=0", 400, "bad_request"),
        ("GET", "/api/lookout/logs?start=yesterday", 400, "bad_request"),
        ("GET", "/api/lookout/logs?cursor=bogus", 400, "bad_request"),
        ("GET", "/api/lookout/traces?status=broken", 400, "bad_request"),
        ("GET", "/api/lookout/series?match=up{job", 400, "bad_request"),
        ("GET", '/api/lookout/series?match=up{job=~"("}', 400, "bad_request"),
        ("GET", "/api/lookout/events", 400, "bad_request"),
        ("DELETE", "/api/lookout/logs", 405, "method_not_allowed"),
        ("GET", "/v1/traces", 405, "method_not_allowed"),
        ("POST", "/api/1/envelope/", 401, "unauthenticated"),
    ],
)
def test_every_error_has_the_one_json_shape(
    seeded: InProcess, method: str, path: str, status: int, code: str
) -> None:
    response = seeded.client.request(method, path, headers={"content-type": "text/plain"})
    assert response.status_code == status
    body = response.json()
    assert list(body) == ["error"]
    assert list(body["error"]) == ["status", "code", "message"]
    assert (body["error"]["status"], body["error"]["code"]) == (status, code)
    assert body["error"]["message"]
