"""The ASGI middleware: one server span per request, route templates, errors, exclusions."""

from __future__ import annotations

import random
import string
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from opentelemetry.trace import SpanKind, StatusCode
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Mount, Route

from tests.sdk.conftest import Instrument


async def _hello(request: Request) -> PlainTextResponse:
    return PlainTextResponse(f"hello {request.path_params.get('name', '')}")


async def _boom(_: Request) -> PlainTextResponse:
    raise RuntimeError("kaput")


def starlette_app() -> Starlette:
    return Starlette(
        routes=[
            Route("/hello/{name}", _hello),
            Route("/boom", _boom),
            Route("/healthz", _hello),
            Mount("/api", routes=[Route("/trips/{trip_id}", _hello)]),
        ]
    )


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.get("/hello/{name}")
    async def hello(name: str) -> dict[str, str]:
        return {"hello": name}

    router = APIRouter(prefix="/v2")

    @router.get("/trips/{trip_id}")
    async def trip(trip_id: int) -> dict[str, int]:
        return {"trip": trip_id}

    app.include_router(router)
    return app


async def raw_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"raw"})


@pytest.mark.parametrize(
    ("make_app", "path", "route"),
    [
        (starlette_app, "/hello/ann", "/hello/{name}"),
        (starlette_app, "/api/trips/42", "/api/trips/{trip_id}"),
        (fastapi_app, "/hello/ann", "/hello/{name}"),
        (fastapi_app, "/v2/trips/7", "/v2/trips/{trip_id}"),
    ],
)
async def test_one_server_span_per_request_named_by_route_template(
    instrument: Instrument, make_app: Any, path: str, route: str
) -> None:
    """Starlette and FastAPI (its own telemetry off) give exactly one span per request."""
    target = instrument(make_app())
    async with target.client() as client:
        response = await client.get(path, headers={"user-agent": "pytest"})
    assert response.status_code == 200
    (span,) = target.spans()
    assert span.name == f"GET {route}"
    assert span.kind == SpanKind.SERVER
    attrs = dict(span.attributes or {})
    assert {
        "http.request.method": "GET",
        "http.route": route,
        "url.path": path,
        "url.scheme": "http",
        "http.response.status_code": 200,
        "user_agent.original": "pytest",
    }.items() <= attrs.items()
    assert response.headers["x-trace-id"] == format(span.context.trace_id, "032x")


async def test_raw_asgi_app_without_resolver_falls_into_unmatched(instrument: Instrument) -> None:
    target = instrument(raw_app)
    async with target.client() as client:
        await client.get("/anything/123")
    (span,) = target.spans()
    assert span.name == "GET"
    assert "http.route" not in (span.attributes or {})
    assert (
        target.sample(
            "http_server_request_duration_seconds_count",
            http_request_method="GET",
            http_route="unmatched",
            http_response_status_code="200",
            error_type="",
        )
        == 1.0
    )


async def test_raw_asgi_app_with_route_resolver(instrument: Instrument) -> None:
    def resolve(scope: dict[str, Any]) -> str | None:
        return "/anything/{id}" if scope["path"].startswith("/anything/") else None

    target = instrument(raw_app, route_resolver=resolve)
    async with target.client() as client:
        await client.get("/anything/123")
    (span,) = target.spans()
    assert span.name == "GET /anything/{id}"


async def test_a_raising_resolver_does_not_break_the_request(instrument: Instrument) -> None:
    def resolve(_: dict[str, Any]) -> str | None:
        raise ValueError("resolver bug")

    target = instrument(raw_app, route_resolver=resolve)
    async with target.client() as client:
        response = await client.get("/x")
    assert response.status_code == 200
    assert target.spans()[0].name == "GET"


async def test_fastapi_spans_are_kept_when_asked(instrument: Instrument) -> None:
    """framework_spans=True leaves FastAPI's own telemetry on: more than one span."""
    target = instrument(fastapi_app(), framework_spans=True)
    async with target.client() as client:
        await client.get("/hello/ann")
    assert len(target.spans()) > 1


def _random_path(rng: random.Random) -> str:
    parts = ["".join(rng.choices(string.ascii_lowercase + string.digits, k=8)) for _ in range(3)]
    return "/" + "/".join(parts)


@pytest.mark.parametrize("make_app", [starlette_app, lambda: raw_app])
async def test_ten_thousand_random_paths_add_at_most_one_series(
    instrument: Instrument, make_app: Any
) -> None:
    target = instrument(make_app(), access_log=False)
    rng = random.Random(7)

    def series() -> int:
        return sum(
            len(metric.samples)
            for metric in target.registry.collect()
            if metric.name == "http_server_request_duration_seconds"
        )

    async with target.client() as client:
        await client.get(_random_path(rng))
        before = series()
        for _ in range(10_000):
            await client.get(_random_path(rng))
    assert series() == before


async def test_negative_control_raw_paths_as_routes_explode_cardinality(
    instrument: Instrument,
) -> None:
    """A resolver that returns the raw path shows the scan above would catch a leak."""
    target = instrument(raw_app, route_resolver=lambda scope: scope["path"], access_log=False)
    rng = random.Random(7)
    async with target.client() as client:
        for _ in range(50):
            await client.get(_random_path(rng))
    routes = {
        sample.labels["http_route"]
        for metric in target.registry.collect()
        if metric.name == "http_server_request_duration_seconds"
        for sample in metric.samples
    }
    assert len(routes) == 50


async def test_unhandled_exception_gives_500_with_trace_id_and_error_span(
    instrument: Instrument,
) -> None:
    target = instrument(starlette_app())
    async with target.client() as client:
        response = await client.get("/boom")
    assert response.status_code == 500
    (span,) = target.spans()
    assert response.headers["x-trace-id"] == format(span.context.trace_id, "032x")
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "RuntimeError"
    assert [e.name for e in span.events] == ["exception"]
    (access,) = [line for line in target.logs if line["event"] == "http_request"]
    assert access["level"] == "error"
    assert access["error_type"] == "RuntimeError"
    assert access["exception"][0]["exc_type"] == "RuntimeError"
    assert (
        target.sample(
            "http_server_request_duration_seconds_count",
            http_request_method="GET",
            http_route="/boom",
            http_response_status_code="500",
            error_type="RuntimeError",
        )
        == 1.0
    )


async def test_raw_app_exception_before_response_still_answers_500(
    instrument: Instrument,
) -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        raise KeyError("missing")

    target = instrument(failing)
    async with target.client() as client:
        response = await client.get("/x")
    assert response.status_code == 500
    assert len(response.headers["x-trace-id"]) == 32


async def test_4xx_leaves_the_server_span_status_unset(instrument: Instrument) -> None:
    target = instrument(starlette_app())
    async with target.client() as client:
        response = await client.get("/no/such/route")
    assert response.status_code == 404
    (span,) = target.spans()
    assert span.status.status_code == StatusCode.UNSET
    assert span.name == "GET"


@pytest.mark.parametrize("path", ["/healthz", "/metrics", "/readyz"])
async def test_excluded_paths_make_no_span_log_or_metric(instrument: Instrument, path: str) -> None:
    async def ok(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    target = instrument(ok)
    async with target.client() as client:
        response = await client.get(path)
    assert response.status_code == 200
    assert target.spans() == ()
    assert [line for line in target.logs if line["event"] == "http_request"] == []
    assert "x-trace-id" not in response.headers
    collected = [m for m in target.registry.collect() if m.name.startswith("http_server_request")]
    assert all(s.name.endswith("_created") or s.value == 0 for m in collected for s in m.samples)


async def test_excluded_paths_are_configurable(instrument: Instrument) -> None:
    target = instrument(starlette_app(), excluded_paths=["/hello/ann"])
    async with target.client() as client:
        await client.get("/hello/ann")
        await client.get("/healthz")
    assert [s.name for s in target.spans()] == ["GET /healthz"]


async def test_metrics_are_mounted_on_the_app_only_when_asked(instrument: Instrument) -> None:
    target = instrument(raw_app, metrics_on_app=True)
    async with target.client() as client:
        text = await client.get("/metrics")
        openmetrics = await client.get(
            "/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}
        )
    assert "lookout_build_info" in text.text
    assert text.headers["content-type"].startswith("text/plain")
    assert openmetrics.text.endswith("# EOF\n")


async def test_metrics_path_is_the_apps_own_unless_mounted(instrument: Instrument) -> None:
    target = instrument(raw_app)
    async with target.client() as client:
        response = await client.get("/metrics")
    assert response.text == "raw"


async def test_active_requests_gauge_counts_in_flight_requests(instrument: Instrument) -> None:
    seen: list[float | None] = []
    holder: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append(
            holder["target"].sample("http_server_active_requests", http_request_method="GET")
        )
        await raw_app(scope, receive, send)

    target = instrument(app)
    holder["target"] = target
    async with target.client() as client:
        await client.get("/x")
    assert seen == [1.0]
    assert target.sample("http_server_active_requests", http_request_method="GET") == 0.0


async def test_unknown_method_is_other(instrument: Instrument) -> None:
    target = instrument(raw_app)
    async with target.client() as client:
        await client.request("FOO", "/x")
    (span,) = target.spans()
    assert span.name == "HTTP"
    assert span.attributes is not None
    assert span.attributes["http.request.method"] == "_OTHER"
    assert span.attributes["http.request.method_original"] == "FOO"


async def test_lifespan_passes_through(instrument: Instrument) -> None:
    events: list[str] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            events.append(message["type"])
            await send({"type": "lifespan.startup.complete"})
            return
        await raw_app(scope, receive, send)

    target = instrument(app)
    messages = iter([{"type": "lifespan.startup"}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await target.app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert events == ["lifespan.startup"]
    assert sent == [{"type": "lifespan.startup.complete"}]


async def test_json_response_app_keeps_its_own_headers(instrument: Instrument) -> None:
    async def handler(_: Request) -> JSONResponse:
        return JSONResponse({"a": 1}, headers={"x-custom": "yes", "x-trace-id": "spoofed"})

    target = instrument(Starlette(routes=[Route("/j", handler)]))
    async with target.client() as client:
        response = await client.get("/j")
    assert response.headers["x-custom"] == "yes"
    assert response.headers.get_list("x-trace-id") == [
        format(target.spans()[0].context.trace_id, "032x")
    ]


def _lifespan_messages() -> tuple[Any, Any, list[dict[str, Any]]]:
    incoming = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(incoming)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    return receive, send, sent


async def test_an_app_without_lifespan_support_is_answered_for_and_flushes(
    instrument: Instrument,
) -> None:
    """uvicorn re-raises SIGTERM after shutdown, so lifespan shutdown is when spans leave."""

    async def no_lifespan(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"

    target = instrument(no_lifespan)
    flushed: list[bool] = []
    target.app.on_shutdown = lambda: flushed.append(True)
    receive, send, sent = _lifespan_messages()
    await target.app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert flushed == [True]


async def test_a_failing_startup_is_left_to_the_server(instrument: Instrument) -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.failed", "message": "db down"})
        raise RuntimeError("db down")

    target = instrument(failing)
    receive, send, sent = _lifespan_messages()
    with pytest.raises(RuntimeError, match="db down"):
        await target.app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert sent == [{"type": "lifespan.startup.failed", "message": "db down"}]
