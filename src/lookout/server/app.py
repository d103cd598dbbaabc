"""The server's ASGI apps: the main port serves everything, the OTLP port only /v1/*."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry.trace import SpanKind
from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from lookout.errors import IngestError
from lookout.ingest.auth import Access, Credentials, access_of
from lookout.ingest.otlp import is_json
from lookout.server import api, intake
from lookout.server.errors import error_response
from lookout.server.prom_api import PromAPI, read_params
from lookout.server.runtime import ServerRuntime
from lookout.server.selfobserve import ingest_tracer_provider
from lookout.store import damages_in, unacknowledged

Endpoint = Callable[[Request], Awaitable[Response]]


async def healthz(_: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    runtime: ServerRuntime = request.app.state.runtime
    if not runtime.ready():
        return error_response(503, "not_ready", "The store's writer is not running.")
    data_dir = runtime.database.data_dir
    folders = unacknowledged(data_dir)
    if folders:  # damaged files were set aside: degraded until an operator acknowledges
        body = {
            "status": "degraded",
            "quarantine": [str(f.relative_to(data_dir)) for f in folders],
            "damaged": [d.path for f in folders for d in damages_in(f)],
            "message": "Damaged store files were moved to quarantine (see report.json in "
            "each folder). Acknowledge with `lookout store ack-corruption --data-dir "
            f"{data_dir}`.",
        }
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ready"})


def _traced(runtime: ServerRuntime, name: str, route: Endpoint) -> Endpoint:
    """With trace_ingest on, a span per ingest request, written straight to the store."""
    if not runtime.config.trace_ingest:
        return route
    tracer = ingest_tracer_provider(runtime).get_tracer("lookout.server")

    async def traced(request: Request) -> Response:
        with tracer.start_as_current_span(name, kind=SpanKind.SERVER) as span:
            response = await route(request)
            span.set_attribute("http.response.status_code", response.status_code)
            return response

    return traced


def _otlp_routes(runtime: ServerRuntime) -> list[Route]:
    return [
        Route(
            f"/v1/{signal}",
            _traced(runtime, f"POST /v1/{signal}", intake.otlp_route(signal)),
            methods=["POST"],
        )
        for signal in ("traces", "logs", "metrics")
    ]


async def _not_found(request: Request, _: Exception) -> Response:
    return error_response(404, "not_found", f"No route {request.method} {request.url.path}.")


async def _method_not_allowed(request: Request, _: Exception) -> Response:
    return error_response(405, "method_not_allowed", f"{request.method} is not allowed here.")


def _app(runtime: ServerRuntime, routes: list[Route]) -> Starlette:
    app = Starlette(
        routes=routes,
        exception_handlers={404: _not_found, 405: _method_not_allowed},
        middleware=[Middleware(Guard, runtime=runtime)],
    )
    app.state.runtime = runtime
    return app


class Guard:
    """Asks each request for the credential its path needs (ingest/auth.py) before any
    route runs; a refusal is 401 (none sent) or 403 (wrong one), counted by reason."""

    def __init__(self, app: ASGIApp, runtime: ServerRuntime) -> None:
        self.app = app
        self.runtime = runtime
        config = runtime.config
        self.credentials = Credentials(
            config.ingest_tokens, config.query_tokens, config.query_users
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        access = access_of(path)
        headers = Headers(scope=scope)
        try:
            project = self.credentials.check(access, headers.get("authorization"))
        except IngestError as exc:
            self.runtime.metrics.rejected.labels(access.value, exc.reason).inc()
            challenge = {"WWW-Authenticate": 'Bearer realm="lookout"'}
            if access is Access.QUERY and self.credentials.query_users:
                challenge = {"WWW-Authenticate": 'Basic realm="lookout", charset="UTF-8"'}
            extra = challenge if exc.status == 401 else {}
            if path.startswith("/v1/"):
                content_type = headers.get("content-type", "")
                response = intake.otlp_error(is_json(content_type))(
                    exc.status, exc.reason, str(exc), extra
                )
            else:
                response = error_response(exc.status, exc.reason, str(exc), extra)
            await response(scope, receive, send)
            return
        if project is not None:
            scope.setdefault("state", {})["project_id"] = project
        await self.app(scope, receive, send)


async def targets(request: Request) -> Response:
    """Prometheus's `/api/v1/targets`: each target's health, last error and last scrape;
    `state=active|dropped|any` (default any) as Prometheus takes it, by GET or form POST."""
    scraper = getattr(request.app.state, "scraper", None)
    view: dict[str, Any] = (
        scraper.targets_view()
        if scraper is not None
        else {"status": "success", "data": {"activeTargets": [], "droppedTargets": []}}
    )
    state = (await read_params(request)).get("state")  # the form's first, then the URL's
    if state == "active":
        view["data"]["droppedTargets"] = []
    elif state == "dropped":
        view["data"]["activeTargets"] = []
    return JSONResponse(view)


async def register_targets(request: Request) -> Response:
    """`POST /api/targets {"job", "targets": ["host:port"], "labels"}`: write a file_sd file."""
    from lookout.server.scraper import write_targets

    runtime: ServerRuntime = request.app.state.runtime
    try:
        body = await request.json()
    except ValueError:
        return error_response(400, "malformed", "The body must be JSON.")
    job, listed = (
        body.get("job") if isinstance(body, dict) else None,
        body.get("targets") if isinstance(body, dict) else None,
    )
    if not isinstance(job, str) or not job.replace("-", "").replace("_", "").isalnum():
        return error_response(400, "malformed", "`job` must be a name of letters, digits, - and _.")
    if not isinstance(listed, list) or not all(isinstance(t, str) and ":" in t for t in listed):
        return error_response(400, "malformed", "`targets` must be a list of host:port.")
    labels = body.get("labels") or {}
    if not isinstance(labels, dict):
        return error_response(400, "malformed", "`labels` must be a mapping.")
    write_targets(runtime, job, listed, {str(k): str(v) for k, v in labels.items()})
    return JSONResponse({"job": job, "targets": listed}, status_code=201)


def main_app(runtime: ServerRuntime) -> Starlette:
    """Port 8686: health, OTLP, Sentry and the read API (one port behind a proxy)."""
    sentry = [
        Route(
            "/api/{project_id:int}/envelope/",
            _traced(runtime, "POST /api/{project_id}/envelope/", intake.sentry_envelope),
            methods=["POST"],
        ),
        Route(
            "/api/{project_id:int}/store/",
            _traced(runtime, "POST /api/{project_id}/store/", intake.sentry_store),
            methods=["POST"],
        ),
    ]
    read = [
        Route("/api/lookout/traces", api.search_traces),
        Route("/api/lookout/traces/{trace_id}", api.get_trace),
        Route("/api/lookout/logs", api.search_logs),
        Route("/api/lookout/issues", api.list_issues),
        Route("/api/lookout/issues/{issue_id}", api.issue_events),
        Route("/api/lookout/events", api.list_events),
        Route("/api/lookout/series", api.raw_series),
        Route("/api/lookout/job-runs", api.list_job_runs),
    ]
    shipped = [
        Route("/api/lookout/lines", intake.shipped_lines, methods=["POST"]),
        Route("/loki/api/v1/push", intake.loki_push, methods=["POST"]),
    ]
    health = [Route("/healthz", healthz), Route("/readyz", readyz)]
    scraping = [
        Route("/api/v1/targets", targets, methods=["GET", "POST"]),
        Route("/api/targets", register_targets, methods=["POST"]),
    ]
    prometheus = PromAPI(runtime)  # /api/v1/query and the rest: docs/promql.md
    routes = [*health, *_otlp_routes(runtime), *sentry, *shipped, *scraping, *read]
    app = _app(runtime, [*routes, *prometheus.routes()])
    app.state.prometheus = prometheus
    return app


def otlp_app(runtime: ServerRuntime) -> Starlette:
    """Port 4318: OTLP intake only, as collectors and SDKs expect."""
    return _app(runtime, _otlp_routes(runtime))
