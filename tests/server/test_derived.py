"""Every signal also becomes a metric: spanmetrics, error, log and job-run counts."""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from lookout.model import LogColumns, Span, SpanColumns
from lookout.server import derived as derived_module
from lookout.server.selfobserve import snapshot
from lookout.store import issue_id
from tests.server.conftest import DSN_KEY, InProcess

AUTH = {"x-sentry-auth": f"Sentry sentry_key={DSN_KEY}"}
DOC = (Path(__file__).resolve().parents[2] / "docs" / "metrics.md").read_text()


def _traces(*spans: dict[str, Any]) -> str:
    return json.dumps({"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "payments"}}]},
        "scopeSpans": [{"spans": list(spans)}]}]})  # fmt: skip


def _span(span_id: str, status: int = 0, trace_state: str = "", ms: int = 250) -> dict[str, Any]:
    now = time.time_ns()
    return {"traceId": "ab" * 16, "spanId": span_id, "name": "POST /pay", "kind": 2,
            "traceState": trace_state, "startTimeUnixNano": str(now),
            "endTimeUnixNano": str(now + ms * 10**6), "status": {"code": status}}  # fmt: skip


def _value(served: InProcess, name: str, **labels: str) -> float | None:
    return served.runtime.derived.registry.get_sample_value(name, labels)


def test_spans_become_spanmetrics_and_resends_do_not_count(served: InProcess) -> None:
    body = _traces(_span("01" * 8), _span("02" * 8, status=2))
    for _ in range(2):
        served.client.post("/v1/traces", content=body, headers={"content-type": "application/json"})
    labels = {"service_name": "payments", "span_name": "POST /pay", "span_kind": "server"}
    assert _value(served, "traces_span_metrics_calls_total", **labels, status_code="unset") == 1.0
    assert _value(served, "traces_span_metrics_calls_total", **labels, status_code="error") == 1.0
    assert _value(served, "traces_span_metrics_duration_seconds_bucket", **labels,
                  status_code="unset", le="0.25") == 1.0  # fmt: skip


def test_a_sampling_threshold_in_tracestate_scales_the_count(served: InProcess) -> None:
    # th:8 rejects half of the 56-bit space: probability 1/2, each span stands for 2.
    served.client.post("/v1/traces", content=_traces(_span("03" * 8, trace_state="ot=th:8")),
                       headers={"content-type": "application/json"})  # fmt: skip
    labels = {
        "service_name": "payments",
        "span_name": "POST /pay",
        "span_kind": "server",
        "status_code": "unset",
    }
    assert _value(served, "traces_span_metrics_calls_total", **labels) == 2.0


def test_logs_errors_and_check_ins_become_counts(served: InProcess) -> None:
    logs = {"resourceLogs": [{"resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "notifier"}}]},
            "scopeLogs": [{"logRecords": [{"timeUnixNano": str(time.time_ns()), "severityNumber": 17,
                                           "body": {"stringValue": "sms failed"}}]}]}]}  # fmt: skip
    served.client.post(
        "/v1/logs", content=json.dumps(logs), headers={"content-type": "application/json"}
    )
    assert _value(served, "lookout_log_records_total", service="notifier", level="error") == 1.0
    event = {"event_id": uuid.uuid4().hex, "tags": {"service": "payments"},
             "exception": {"values": [{"type": "KeyError", "value": "x"}]}}  # fmt: skip
    envelope = b"{}\n" + json.dumps({"type": "event"}).encode() + b"\n" + json.dumps(event).encode()
    served.client.post("/api/1/envelope/", content=envelope, headers=AUTH)
    issues = served.client.get("/api/lookout/issues").json()["issues"]
    assert (
        _value(
            served, "lookout_error_events_total", service="payments", issue=issues[0]["issue_id"]
        )
        == 1.0
    )
    for status in ("error", "ok"):
        check_in = {
            "check_in_id": uuid.uuid4().hex,
            "monitor_slug": "nightly-report",
            "status": status,
        }
        envelope = (
            b"{}\n"
            + json.dumps({"type": "check_in"}).encode()
            + b"\n"
            + json.dumps(check_in).encode()
        )
        served.client.post("/api/1/envelope/", content=envelope, headers=AUTH)
    assert _value(served, "lookout_job_runs_total", job="nightly-report", status="error") == 1.0
    last = _value(served, "lookout_job_last_success_timestamp_seconds", job="nightly-report")
    assert last is not None
    assert abs(last - time.time()) < 60


def test_each_family_caps_its_series_and_counts_what_it_drops(
    served: InProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(derived_module, "MAX_SERIES", 2)
    now = time.time_ns()
    spans = [
        Span("cd" * 16, f"{i:016x}", "", "svc", f"op-{i}", "server", now, now + 1)
        for i in range(1, 6)
    ]
    served.runtime.derived.observe(SpanColumns.of(spans), LogColumns(), [], [])
    assert (
        _value(served, "lookout_derived_series_dropped_total", metric="traces_span_metrics") == 3.0
    )


def test_derived_series_are_written_with_the_servers_own(served: InProcess) -> None:
    served.runtime.derived.observe(SpanColumns(), LogColumns(), [], [])
    names = {s.name for s in snapshot(served.runtime, "127.0.0.1:8686", 0)}
    assert "lookout_store_writer_queue_depth" in names
    served.client.post(
        "/v1/traces", content=_traces(_span("04" * 8)), headers={"content-type": "application/json"}
    )
    names = {s.name for s in snapshot(served.runtime, "127.0.0.1:8686", 0)}
    assert "traces_span_metrics_calls_total" in names


def test_derived_families_are_in_the_metric_table() -> None:
    families = {
        (f"{m.name}_total" if m.type == "counter" else m.name)
        for m in derived_module.DerivedMetrics().registry.collect()
    }
    documented = set(
        re.findall(r"^\| `([a-z_]+)` \|", DOC.split("## Derived by the server", 1)[1], re.M)
    )
    assert families == documented


def test_issue_labels_match_the_store() -> None:
    assert issue_id(1, "fp") == issue_id(1, "fp")
