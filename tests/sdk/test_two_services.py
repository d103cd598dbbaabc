"""Two services over real HTTP on loopback: one trace across both, the edge's distrust of
its clients, and no trace headers reaching a third party."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import httpx

from tests.support import Recorder, Service, free_port, http_peer, uvicorn_app, wait_until

CLIENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CLIENT_TRACEPARENT = f"00-{CLIENT_TRACE}-00f067aa0ba902b7-01"
PROPAGATION = {"traceparent", "tracestate", "baggage", "x-trace-id"}


@dataclass
class Chain:
    edge: Service
    internal: Service
    sink: Recorder
    third_party: Recorder


@contextmanager
def chain() -> Iterator[Chain]:
    with ExitStack() as stack:
        sink_url, sink = stack.enter_context(http_peer())
        third_url, third_party = stack.enter_context(http_peer())
        common = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink_url,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "LOOKOUT_METRICS_ADDR": "127.0.0.1:0",
        }
        internal_port = free_port()
        internal = stack.enter_context(
            uvicorn_app(
                "tests.sdk.apps.chain",
                {
                    **common,
                    "CHAIN_ROLE": "internal",
                    "CHAIN_THIRD_PARTY": third_url,
                    "LOOKOUT_PROPAGATE_TO": "auth,*.svc",  # not the third party
                },
                port=internal_port,
            )
        )
        edge = stack.enter_context(
            uvicorn_app(
                "tests.sdk.apps.chain",
                {
                    **common,
                    "CHAIN_ROLE": "edge",
                    "CHAIN_NEXT": internal.url,
                    "LOOKOUT_PROPAGATE_TO": f"127.0.0.1:{internal_port}",
                },
            )
        )
        yield Chain(edge, internal, sink, third_party)


def test_one_trace_crosses_both_services_and_the_edge_starts_it() -> None:
    """The edge ignores the client's context (link only), the internal service continues
    the edge's trace, both log with that trace id, and the third party gets no headers."""
    with chain() as c:
        response = httpx.get(
            f"{c.edge.url}/api/book/nbo-mba",
            headers={
                "traceparent": CLIENT_TRACEPARENT,
                "x-trace-id": CLIENT_TRACE,
                "baggage": "user=alice",
            },
            timeout=10,
        )
        assert response.status_code == 200
        trace_id = response.headers["x-trace-id"]
        assert trace_id != CLIENT_TRACE
        spans = wait_until(
            lambda: len(c.sink.spans) >= 4 and list(c.sink.spans), 15, "4 exported spans"
        )
        edge_logs = [line for line in c.edge.json_lines() if line.get("trace_id") == trace_id]
        internal_logs = wait_until(
            lambda: [line for line in c.internal.json_lines() if line.get("trace_id") == trace_id],
            5,
            "internal logs",
        )

    by_name = {(s.service, s.name): s for s in spans}
    edge_server = by_name[("chain-edge", "GET /api/book/{trip}")]
    edge_client = by_name[("chain-edge", "POST 127.0.0.1")]
    internal_server = by_name[("chain-internal", "POST /book/{trip}")]
    internal_client = by_name[("chain-internal", "POST 127.0.0.1")]
    assert {s.trace_id for s in spans} == {trace_id}
    assert edge_server.parent_span_id == ""
    assert edge_server.links == [(CLIENT_TRACE, "00f067aa0ba902b7")]
    assert edge_server.attributes["lookout.client_trace_id"] == CLIENT_TRACE
    assert internal_server.parent_span_id == edge_client.span_id
    assert internal_client.parent_span_id == internal_server.span_id

    inbound = response.json()["internal"]["headers"]
    assert inbound["traceparent"].split("-")[1] == trace_id
    assert inbound["x-trace-id"] == trace_id
    assert "baggage" not in inbound, "the edge must drop a client's baggage"

    (third_party_request,) = c.third_party.requests
    assert set(third_party_request[2]) & PROPAGATION == set()

    assert {line["event"] for line in edge_logs} >= {"edge_booked", "http_request"}
    assert {line["event"] for line in internal_logs} >= {"internal_booked", "http_request"}
    assert all(line["trip"] == "nbo-mba" for line in internal_logs if "trip" in line)
    for service in (c.edge, c.internal):
        access = [line for line in service.json_lines() if line["event"] == "http_request"]
        assert len(access) == 1, "one access line per request, and none from uvicorn"
        assert not any(line.get("logger") == "uvicorn.access" for line in service.json_lines())


def test_negative_control_an_open_allow_list_leaks_headers_to_the_third_party() -> None:
    """With every loopback host allowed (`internal`), the same check sees the third party
    receive trace headers: the assertion above is able to fail."""
    with ExitStack() as stack:
        third_url, third_party = stack.enter_context(http_peer())
        internal = stack.enter_context(
            uvicorn_app(
                "tests.sdk.apps.chain",
                {
                    "CHAIN_ROLE": "internal",
                    "CHAIN_THIRD_PARTY": third_url,
                    "LOOKOUT_PROPAGATE_TO": "internal",
                    "OTEL_TRACES_EXPORTER": "none",
                },
            )
        )
        httpx.post(f"{internal.url}/book/x", timeout=10).raise_for_status()
        (request,) = third_party.requests
        assert set(request[2]) & PROPAGATION == {"traceparent", "x-trace-id"}
