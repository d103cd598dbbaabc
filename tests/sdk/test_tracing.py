"""The tracer provider: resource, sampler, limits, OTLP/HTTP export and worker mode."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

import lookout.sdk
from lookout.sdk import testing
from tests.support import http_peer, wait_until

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _get(app: Any, headers: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/", headers=headers or {})

    return asyncio.run(go())


def test_spans_are_exported_over_otlp_http_with_the_resource() -> None:
    with http_peer() as (sink, recorder):
        app = lookout.sdk.init(
            "payments",
            app=_ok,
            version="1.4.2",
            environment="staging",
            metrics_addr="off",
            environ={
                "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
                "OTEL_RESOURCE_ATTRIBUTES": "service.instance.id=pay-1,team=core",
                "OTEL_BSP_SCHEDULE_DELAY": "20",
            },
        )
        trace_id = _get(app).headers["x-trace-id"]
        (span,) = wait_until(lambda: list(recorder.spans), 10, "the exported span")
    assert span.trace_id == trace_id
    assert {
        "service.name": "payments",
        "service.version": "1.4.2",
        "deployment.environment.name": "staging",
        "deployment.environment": "staging",
        "service.instance.id": "pay-1",
        "team": "core",
    }.items() <= span.resource.items()
    assert recorder.requests[0][2]["content-type"] == "application/x-protobuf"


def test_exporter_headers_are_sent() -> None:
    with http_peer() as (sink, recorder):
        app = lookout.sdk.init(
            "svc",
            app=_ok,
            metrics_addr="off",
            environ={
                "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
                "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20t0k",
                "OTEL_BSP_SCHEDULE_DELAY": "20",
            },
        )
        _get(app)
        wait_until(lambda: recorder.spans, 10, "an export")
    assert recorder.requests[0][2]["authorization"] == "Bearer t0k"


def test_shutdown_flushes_every_buffered_span() -> None:
    with http_peer() as (sink, recorder):
        lookout.sdk.init(
            "worker",
            metrics_addr="off",
            environ={"OTEL_EXPORTER_OTLP_ENDPOINT": sink, "OTEL_BSP_SCHEDULE_DELAY": "60000"},
        )
        tracer = lookout.sdk.tracer()
        for i in range(300):
            with tracer.start_as_current_span(f"job-{i}"):
                pass
        assert recorder.spans == []
        lookout.sdk.shutdown()
        assert len(recorder.spans) == 300


def test_worker_mode_sets_up_logs_metrics_and_traces_without_an_app() -> None:
    assert lookout.sdk.init("notifier", environ={}, traces_exporter="none") is None
    url = lookout.sdk.metrics_url()
    assert url is not None
    assert "lookout_build_info" in httpx.get(url, timeout=5).text
    with testing.capture_spans() as spans, testing.capture_logs() as logs:
        with lookout.sdk.tracer("notifier").start_as_current_span("consume sms"):
            lookout.sdk.get_logger().info("sms_sent")
    (span,) = spans()
    assert logs[0]["trace_id"] == format(span.context.trace_id, "032x")


@pytest.mark.parametrize(
    ("sampler", "parent_flags", "recorded"),
    [
        ("parentbased_always_on", "01", True),
        ("parentbased_always_on", "00", False),
        ("always_on", "00", True),
        ("always_off", "01", False),
        ("parentbased_traceidratio", "01", True),
    ],
)
def test_samplers_follow_the_otel_names(sampler: str, parent_flags: str, recorded: bool) -> None:
    app = lookout.sdk.init(
        "svc",
        app=_ok,
        metrics_addr="off",
        traces_exporter="none",
        environ={"OTEL_TRACES_SAMPLER": sampler, "OTEL_TRACES_SAMPLER_ARG": "0.0"},
    )
    with testing.capture_spans() as spans:
        response = _get(app, {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-{parent_flags}"})
    assert response.headers["x-trace-id"] == TRACE
    assert bool(spans()) == recorded


def test_default_sampler_is_parent_based_always_on() -> None:
    lookout.sdk.init("svc", metrics_addr="off", traces_exporter="none", environ={})
    runtime = lookout.sdk._runtime
    assert runtime is not None
    assert runtime.settings.sampler == "parentbased_always_on"


def test_attribute_values_are_truncated_to_the_limit() -> None:
    lookout.sdk.init(
        "svc",
        metrics_addr="off",
        traces_exporter="none",
        environ={"OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "16"},
    )
    with testing.capture_spans() as spans:
        with lookout.sdk.tracer().start_as_current_span("s") as span:
            span.set_attribute("big", "x" * 100)
    assert spans()[0].attributes == {"big": "x" * 16}


def test_logs_go_over_otlp_instead_of_stdout_when_asked(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with http_peer() as (sink, recorder):
        lookout.sdk.init(
            "notifier",
            metrics_addr="off",
            traces_exporter="none",
            environ={"OTEL_LOGS_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": sink},
        )
        capsys.readouterr()
        with lookout.sdk.tracer().start_as_current_span("send") as span:
            lookout.sdk.get_logger("sms").warning("sms_retry", attempt=2)
        lookout.sdk.shutdown()
        assert capsys.readouterr().out == ""
        record = next(r for r in recorder.logs if r["body"] == "sms_retry")
    assert record["severity_text"] == "WARNING"
    assert record["trace_id"] == format(span.get_span_context().trace_id, "032x")
    assert record["attributes"]["attempt"] == 2
    assert record["attributes"]["logger"] == "sms"
    assert record["service"] == "notifier"


def test_user_spans_from_the_global_api_join_the_request_trace() -> None:
    from opentelemetry import trace

    async def app(scope: Any, receive: Any, send: Any) -> None:
        with trace.get_tracer("my.module").start_as_current_span("price lookup"):
            await _ok(scope, receive, send)

    wrapped = lookout.sdk.init("svc", app=app, metrics_addr="off", traces_exporter="none")
    with testing.capture_spans() as spans:
        _get(wrapped)
    inner, server = spans()
    assert inner.name == "price lookup"
    assert inner.parent is not None
    assert inner.parent.span_id == server.context.span_id
