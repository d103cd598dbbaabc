"""Error capture: sentry-sdk events over the real envelope protocol, linked to traces."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import lookout.sdk
from lookout.sdk import testing
from tests.support import Recorder, http_peer, wait_until


@pytest.fixture
def sentry() -> Iterator[tuple[str, Recorder]]:
    """A loopback receiver speaking the envelope endpoint; yields (dsn, recorder)."""
    with http_peer() as (url, recorder):
        yield url.replace("http://", "http://public@") + "/1", recorder


async def _pay(request: Request) -> PlainTextResponse:
    lookout.sdk.set_user(id="u-42", segment="gold")
    mpesa_pin = request.headers["x-mpesa-pin"]  # a local the event must not carry in clear
    amount = 1500
    logging.getLogger("payments").error("stk push failed for amount %s", amount)
    with lookout.sdk.tracer().start_as_current_span("charge mpesa"):
        raise ConnectionRefusedError(f"M-Pesa refused ({len(mpesa_pin)}-digit pin)")


def _app() -> Starlette:
    return Starlette(routes=[Route("/pay/{booking_id}", _pay, methods=["POST"])])


def _post(app: Any, path: str, headers: dict[str, str]) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://busline.test") as c:
            return await c.post(path, headers=headers)

    return asyncio.run(go())


def test_a_failing_request_makes_one_linked_scrubbed_event(
    sentry: tuple[str, Recorder],
) -> None:
    dsn, recorder = sentry
    app = lookout.sdk.init(
        "payments",
        app=_app(),
        dsn=dsn,
        version="2.3.0",
        environment="staging",
        metrics_addr="off",
        traces_exporter="none",
        environ={},
    )
    with testing.capture_spans() as spans:
        response = _post(
            app,
            "/pay/BK-1?msisdn=0712345678",
            {"authorization": "Bearer s3cr3t-token", "x-client": "android", "x-mpesa-pin": "4321"},
        )
    lookout.sdk.shutdown()
    assert response.status_code == 500
    trace_id = response.headers["x-trace-id"]
    (event,) = wait_until(lambda: list(recorder.events), 10, "the error event")
    assert recorder.envelope_items.count("event") == 1, "error logs are breadcrumbs only"
    assert "transaction" not in recorder.envelope_items, "sentry's own tracing stays off"

    (charge,) = [s for s in spans() if s.name == "charge mpesa"]
    assert event["contexts"]["trace"]["trace_id"] == trace_id
    assert event["contexts"]["trace"]["span_id"] == format(charge.context.span_id, "016x")
    assert event["release"] == "2.3.0"
    assert event["environment"] == "staging"
    assert event["tags"]["service"] == "payments"
    assert event["user"] == {"id": "u-42", "segment": "gold"}

    (exception,) = event["exception"]["values"]
    assert exception["type"] == "ConnectionRefusedError"
    frame = exception["stacktrace"]["frames"][-1]
    assert frame["function"] == "_pay"
    assert frame["vars"]["amount"] == "1500"
    assert frame["vars"]["mpesa_pin"] == "[Filtered]"
    assert "4321" not in str(event)

    request = event["request"]
    assert request["method"] == "POST"
    assert request["headers"]["authorization"] == "[Filtered]"
    assert request["headers"]["x-client"] == "android"
    assert "0712345678" not in request["query_string"]
    assert "s3cr3t" not in str(event)
    crumbs = [c["message"] for c in event["breadcrumbs"]["values"]]
    assert "stk push failed for amount 1500" in crumbs


def test_the_client_still_gets_a_500_with_x_trace_id(sentry: tuple[str, Recorder]) -> None:
    dsn, _ = sentry
    app = lookout.sdk.init(
        "payments", app=_app(), dsn=dsn, metrics_addr="off", traces_exporter="none", environ={}
    )
    response = _post(app, "/pay/BK-2", {"x-mpesa-pin": "1"})
    assert response.status_code == 500
    assert len(response.headers["x-trace-id"]) == 32


def test_worker_loop_errors_are_captured_with_the_message_trace(
    sentry: tuple[str, Recorder],
) -> None:
    dsn, recorder = sentry
    lookout.sdk.init("notifier", dsn=dsn, metrics_addr="off", traces_exporter="none", environ={})
    headers: dict[str, Any] = {}
    with lookout.sdk.publishing("sms", headers):
        pass
    with pytest.raises(TimeoutError):
        with lookout.sdk.processing("sms", headers) as span:
            raise TimeoutError("SMS gateway timed out")
    lookout.sdk.shutdown()
    (event,) = wait_until(lambda: list(recorder.events), 10, "the worker's event")
    assert event["contexts"]["trace"]["trace_id"] == headers["x-trace-id"]
    assert event["contexts"]["trace"]["span_id"] == format(span.get_span_context().span_id, "016x")


def _init_with_capture(service: str) -> None:
    """Error capture on, towards a port nobody listens on: capture_errors() intercepts."""
    lookout.sdk.init(
        service,
        dsn="http://k@127.0.0.1:9/1",
        metrics_addr="off",
        traces_exporter="none",
        environ={},
    )


def test_handled_errors_can_be_sent_explicitly() -> None:
    _init_with_capture("jobs")
    with testing.capture_errors() as events:
        with lookout.sdk.tracer().start_as_current_span("nightly report") as span:
            try:
                int("report failed")
            except ValueError as exc:
                lookout.sdk.capture_exception(exc)
    (event,) = events
    assert event["contexts"]["trace"]["trace_id"] == format(
        span.get_span_context().trace_id, "032x"
    )


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_unhandled_exceptions_in_threads_are_captured() -> None:
    _init_with_capture("fleet")

    def poll_gps() -> None:
        with lookout.sdk.tracer().start_as_current_span("poll gps"):
            raise RuntimeError("GPS feed closed")

    with testing.capture_errors() as events:
        thread = threading.Thread(target=poll_gps)
        thread.start()
        thread.join()
    (event,) = events
    assert event["exception"]["values"][0]["value"] == "GPS feed closed"
    assert len(event["contexts"]["trace"]["trace_id"]) == 32


def test_unhandled_exceptions_in_asyncio_tasks_are_captured() -> None:
    async def main() -> list[dict[str, Any]]:
        _init_with_capture("fleet")  # inside the loop, as a worker's main() does
        with testing.capture_errors() as events:

            async def ping_bus() -> None:
                raise LookupError("bus KCA 123A unknown")

            task = asyncio.create_task(ping_bus())
            await asyncio.wait([task])
        return events

    events = asyncio.run(main())
    assert [e["exception"]["values"][0]["type"] for e in events] == ["LookupError"]


def test_without_a_dsn_error_capture_is_off() -> None:
    lookout.sdk.init("svc", metrics_addr="off", traces_exporter="none", environ={})
    with pytest.raises(RuntimeError, match="dsn"):
        testing.capture_errors().__enter__()


def test_sentry_traces_sample_rate_turns_sentry_tracing_on(sentry: tuple[str, Recorder]) -> None:
    import sentry_sdk

    dsn, _ = sentry
    lookout.sdk.init(
        "svc",
        dsn=dsn,
        metrics_addr="off",
        traces_exporter="none",
        environ={"SENTRY_TRACES_SAMPLE_RATE": "1.0"},
    )
    assert sentry_sdk.get_client().options["traces_sample_rate"] == 1.0
    lookout.sdk.shutdown()
    lookout.sdk.init("svc", dsn=dsn, metrics_addr="off", traces_exporter="none", environ={})
    assert sentry_sdk.get_client().options["traces_sample_rate"] is None
