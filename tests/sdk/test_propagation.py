"""Inbound context rules (internal and edge), X-Trace-Id validation and the allow-list."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry import baggage

import lookout.sdk
from lookout.errors import ConfigError
from lookout.sdk._propagation import AllowList, parse_trace_id
from tests.sdk.conftest import Instrument, Instrumented

TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE}-{PARENT}-01"


def _app(seen: dict[str, Any]) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["baggage"] = dict(baggage.get_all())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    return app


def _call(target: Instrumented, headers: dict[str, str]) -> str:
    async def go() -> str:
        async with target.client() as client:
            return (await client.get("/x", headers=headers)).headers["x-trace-id"]

    return asyncio.run(go())


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        (TRACE, True),
        (TRACE.upper(), False),
        ("0" * 32, False),
        (TRACE[:-1], False),
        (TRACE + "0", False),
        ("abc-123", False),
        (f" {TRACE}", False),
        ("g" * 32, False),
        ("", False),
    ],
)
def test_x_trace_id_must_be_32_lowercase_hex_and_not_zero(value: str, valid: bool) -> None:
    assert (parse_trace_id(value) is not None) == valid


def test_internal_service_continues_an_inbound_traceparent(instrument: Instrument) -> None:
    seen: dict[str, Any] = {}
    target = instrument(_app(seen))
    returned = _call(target, {"traceparent": TRACEPARENT, "baggage": "tier=gold"})
    (span,) = target.spans()
    assert returned == TRACE
    assert span.parent is not None
    assert format(span.parent.span_id, "016x") == PARENT
    assert seen["baggage"] == {"tier": "gold"}


def test_internal_service_continues_a_valid_x_trace_id_without_traceparent(
    instrument: Instrument,
) -> None:
    target = instrument(_app({}))
    assert _call(target, {"x-trace-id": TRACE}) == TRACE
    (span,) = target.spans()
    assert span.parent is None, "a root span that takes the given trace id"
    assert format(span.context.trace_id, "032x") == TRACE


@pytest.mark.parametrize("bad", [TRACE.upper(), "0" * 32, "abc-123", TRACE[:30]])
def test_an_invalid_x_trace_id_starts_a_new_trace_and_is_kept_as_attribute(
    instrument: Instrument, bad: str
) -> None:
    target = instrument(_app({}))
    returned = _call(target, {"x-trace-id": bad})
    (span,) = target.spans()
    assert returned != bad.lower()
    assert span.attributes is not None
    assert span.attributes["http.request.header.x-trace-id"] == (bad,)


def test_traceparent_wins_over_a_different_x_trace_id(instrument: Instrument) -> None:
    target = instrument(_app({}))
    assert _call(target, {"traceparent": TRACEPARENT, "x-trace-id": "1" * 32}) == TRACE


@pytest.mark.parametrize(
    "headers",
    [
        {"traceparent": TRACEPARENT, "baggage": "user=alice"},
        {"x-trace-id": TRACE, "baggage": "user=alice"},
    ],
)
def test_edge_starts_a_new_trace_links_the_clients_id_and_drops_baggage(
    instrument: Instrument, headers: dict[str, str]
) -> None:
    seen: dict[str, Any] = {}
    target = instrument(_app(seen), trust_inbound_context=False)
    returned = _call(target, headers)
    (span,) = target.spans()
    assert returned != TRACE
    assert span.parent is None
    assert span.attributes is not None
    assert span.attributes["lookout.client_trace_id"] == TRACE
    assert [format(link.context.trace_id, "032x") for link in span.links] == [TRACE]
    assert seen["baggage"] == {}


def test_negative_control_a_trusting_edge_would_continue_the_clients_trace(
    instrument: Instrument,
) -> None:
    """The same request at a trusting service continues the client's trace: the edge
    assertions above detect the difference."""
    target = instrument(_app({}), trust_inbound_context=True)
    assert _call(target, {"traceparent": TRACEPARENT}) == TRACE


def test_edge_without_client_context_has_no_link(instrument: Instrument) -> None:
    target = instrument(_app({}), trust_inbound_context=False)
    _call(target, {})
    (span,) = target.spans()
    assert list(span.links) == []


def test_propagators_none_ignores_traceparent(instrument: Instrument) -> None:
    target = instrument(_app({}), environ={"OTEL_PROPAGATORS": "none"})
    assert _call(target, {"traceparent": TRACEPARENT}) != TRACE


@pytest.mark.parametrize(
    ("patterns", "host", "port", "allowed"),
    [
        (["internal"], "127.0.0.1", 8000, True),
        (["internal"], "::1", 8000, True),
        (["internal"], "localhost", 80, True),
        (["internal"], "payments", 80, True),
        (["internal"], "ticketing.busline.svc", 80, True),
        (["internal"], "auth.svc.cluster.local", 80, True),
        (["internal"], "db.internal", 5432, True),
        (["internal"], "api.safaricom.co.ke", 443, False),
        (["internal"], "10.1.2.3", 443, False),
        (["internal"], "8.8.8.8", 443, False),
        (["none"], "127.0.0.1", 80, False),
        (["127.0.0.1:8001"], "127.0.0.1", 8001, True),
        (["127.0.0.1:8001"], "127.0.0.1", 8002, False),
        (["[::1]:9000"], "::1", 9000, True),
        (["auth"], "auth", 1234, True),
        (["auth"], "auth2", 1234, False),
        (["*.corp.example"], "pay.corp.example", 443, True),
        (["*.corp.example"], "corp.example.evil.com", 443, False),
        (["10.0.0.0/8"], "10.9.9.9", 80, True),
        (["10.0.0.0/8"], "11.0.0.1", 80, False),
        (["AUTH"], "Auth.", 1, True),
    ],
)
def test_allow_list_patterns(patterns: list[str], host: str, port: int, allowed: bool) -> None:
    assert AllowList(patterns).permits(host, port) == allowed


def test_bad_allow_list_keyword_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="propagate_to"):
        lookout.sdk.init("svc", propagate_to=["bad pattern!"], environ={}, metrics_addr="off")


def test_bad_allow_list_variable_falls_back_to_internal() -> None:
    lookout.sdk.init("svc", environ={"LOOKOUT_PROPAGATE_TO": "bad pattern!"}, metrics_addr="off")
    runtime = lookout.sdk._runtime
    assert runtime is not None
    assert runtime.settings.propagate_to == ("internal",)
