"""httpx client spans, the client duration histogram and header injection, sync and async."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from opentelemetry.trace import SpanKind, StatusCode

import lookout.sdk
from tests.sdk.conftest import Instrument
from tests.support import free_port, http_peer

PROPAGATION = {"traceparent", "tracestate", "baggage", "x-trace-id"}


def test_sync_client_span_metric_and_headers_to_an_allowed_host(instrument: Instrument) -> None:
    target = instrument(None, propagate_to=["127.0.0.1"])
    with http_peer() as (url, peer):
        with lookout.sdk.tracer().start_as_current_span("parent") as parent:
            httpx.get(f"{url}/quote?amount=5", timeout=5)
    (_, _, headers) = peer.requests[0]
    trace_id = format(parent.get_span_context().trace_id, "032x")
    assert headers["x-trace-id"] == trace_id
    assert headers["traceparent"].split("-")[1] == trace_id
    client_span = target.spans.named("GET 127.0.0.1")[0]
    assert client_span.kind == SpanKind.CLIENT
    assert headers["traceparent"].split("-")[2] == format(client_span.context.span_id, "016x")
    assert client_span.attributes is not None
    assert client_span.attributes["url.full"] == url + "/quote"
    assert client_span.attributes["http.response.status_code"] == 200
    assert (
        target.sample(
            "http_client_request_duration_seconds_count",
            http_request_method="GET",
            server_address="127.0.0.1",
            http_response_status_code="200",
            error_type="",
        )
        == 1.0
    )


def test_async_client_is_instrumented_too(instrument: Instrument) -> None:
    target = instrument(None, propagate_to=["127.0.0.1"])

    async def call(url: str) -> None:
        async with httpx.AsyncClient() as client:
            await client.post(f"{url}/x", json={})

    with http_peer(status=503) as (url, peer):
        with lookout.sdk.tracer().start_as_current_span("parent"):
            asyncio.run(call(url))
    assert "traceparent" in peer.requests[0][2]
    (span,) = target.spans.named("POST 127.0.0.1")
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "503"


def test_no_headers_reach_a_host_off_the_allow_list(instrument: Instrument) -> None:
    instrument(None, propagate_to=["auth"])
    with http_peer() as (url, peer), lookout.sdk.tracer().start_as_current_span("parent"):
        httpx.get(url, headers={"x-trace-id": "f" * 32, "baggage": "k=v"}, timeout=5)
    assert set(peer.requests[0][2]) & PROPAGATION == set()


def test_connection_refused_is_a_failed_client_span_with_error_type(
    instrument: Instrument,
) -> None:
    """How a provider being down looks from inside: the span and the metric say so."""
    target = instrument(None)
    port = free_port()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/stk", timeout=2)
    (span,) = target.spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "ConnectError"
    # httpx's error, then the socket's own reason under it.
    assert [event.name for event in span.events] == ["exception", "exception"]
    types = [(event.attributes or {}).get("exception.type") for event in span.events]
    assert types == ["httpx.ConnectError", "ConnectionRefusedError"]
    assert (
        target.sample(
            "http_client_request_duration_seconds_count",
            http_request_method="GET",
            server_address="127.0.0.1",
            http_response_status_code="",
            error_type="ConnectError",
        )
        == 1.0
    )


def test_credentials_and_query_never_reach_the_span(instrument: Instrument) -> None:
    target = instrument(None)
    with http_peer() as (url, _):
        authed = url.replace("http://", "http://user:secret@")
        httpx.get(f"{authed}/p?token=abc", timeout=5)
    (span,) = target.spans()
    assert span.attributes is not None
    assert "secret" not in str(span.attributes["url.full"])
    assert "token" not in str(span.attributes["url.full"])


def test_without_init_httpx_works_untouched() -> None:
    with http_peer() as (url, peer):
        assert httpx.get(url, timeout=5).status_code == 200
    assert set(peer.requests[0][2]) & PROPAGATION == set()
