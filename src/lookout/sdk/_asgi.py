"""The ASGI middleware: one server span, RED metrics and one access log line per request.

It wraps any ASGI app (Starlette, FastAPI or plain). The route template comes from the
router's `scope["route"]` (Starlette and FastAPI set it), from a `route_resolver` given
to `init()`, or else is the single value `unmatched`, so raw paths never become labels.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import structlog
from opentelemetry import context, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from lookout.sdk import _errors, _tracing
from lookout.sdk._guard import guard, warn_once
from lookout.sdk._logs import tame_uvicorn
from lookout.sdk._metrics import UNMATCHED_ROUTE, exemplar_for_current_span
from lookout.sdk._propagation import format_trace_id
from lookout.sdk._runtime import Runtime

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
RouteResolver = Callable[[Scope], "str | None"]

_NO_ROOT_ID = contextlib.nullcontext()  # reusable: most requests bring no X-Trace-Id alone
KNOWN_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY")
)


def route_template(scope: Scope, root_path: str, resolver: RouteResolver | None) -> str | None:
    """The matched route's template, or None when no route matched."""
    if resolver is not None:
        try:
            return resolver(scope)
        except Exception as exc:  # noqa: BLE001 - a user's resolver must not break requests
            warn_once("route resolver", "lookout.sdk: route_resolver raised %r", exc)
            return None
    route = scope.get("route")
    path = getattr(route, "path", None)
    if not isinstance(path, str):
        return None
    if hasattr(route, "routes") or type(route).__name__ == "Mount":
        # A Mount with no inner router (static files, a sub-app): keep the template.
        return f"{path}/{{path:path}}"
    mount_prefix = str(scope.get("root_path", ""))[len(root_path) :]
    return f"{mount_prefix}{path}"


class LookoutMiddleware:
    """Instruments one ASGI app with the process's Runtime."""

    def __init__(
        self,
        app: ASGIApp,
        runtime: Runtime,
        route_resolver: RouteResolver | None,
        on_shutdown: Callable[[], None] = lambda: None,
    ) -> None:
        self.app = app
        self.on_shutdown = on_shutdown
        self.runtime = runtime
        self.route_resolver = route_resolver
        self._tamed = False
        settings = runtime.settings
        self._excluded = settings.excluded_paths
        self._trust = settings.trust_inbound_context
        self._access_log = settings.access_log
        self._metrics_on_app = settings.metrics_on_app
        # Bound now, after init() configured structlog, so the hot path skips the lazy proxy.
        self._log = structlog.get_logger().bind(logger="lookout.access")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if kind != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path", "")
        if self._metrics_on_app and path == "/metrics":
            await self._serve_metrics(scope, send)
            return
        if path in self._excluded:
            await self.app(scope, receive, send)
            return
        if not self._tamed:
            self._tamed = True
            tame_uvicorn()
            _errors.enable_asyncio()
        if _errors.enabled():
            with _errors.request_scope():
                await self._instrumented(scope, receive, send)
        else:
            await self._instrumented(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the lifespan through, and flush telemetry when the server shuts down.

        uvicorn re-raises SIGTERM after a graceful shutdown, so atexit never runs there:
        lifespan shutdown is the last moment buffered spans can still leave.
        """
        tame_uvicorn()
        _errors.enable_asyncio()
        answered = False

        async def send_and_flush(message: Message) -> None:
            nonlocal answered
            answered = True
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                self.on_shutdown()
            await send(message)

        try:
            await self.app(scope, receive, send_and_flush)
        except Exception:
            if answered:
                raise  # the app speaks lifespan and failed in it: that is the server's to see
            # The app does not speak lifespan: answer for it, and still flush at the end.
            await _minimal_lifespan(receive, send, self.on_shutdown)

    async def _instrumented(  # noqa: PLR0915 - one flat hot path, no per-request calls
        self, scope: Scope, receive: Receive, send: Send
    ) -> None:
        runtime = self.runtime
        instruments = runtime.instruments
        original_method = scope.get("method", "GET")
        method = original_method if original_method in KNOWN_METHODS else "_OTHER"
        headers = _decode_headers(scope.get("headers", ()))
        inbound = runtime.propagation.extract(headers, trust=self._trust)
        attributes = _server_attributes(scope, method, original_method, headers)
        attributes.update(inbound.attributes)
        taking_id = (
            _NO_ROOT_ID
            if inbound.root_trace_id is None
            else _tracing.root_trace_id(inbound.root_trace_id)
        )
        with taking_id:
            span = runtime.tracer.start_span(
                "HTTP" if method == "_OTHER" else method,
                context=inbound.parent,
                kind=SpanKind.SERVER,
                attributes=attributes,
                links=inbound.links,
            )
        token = context.attach(trace.set_span_in_context(span, inbound.parent))
        structlog.contextvars.clear_contextvars()
        span_context = span.get_span_context()
        trace_header = (
            (b"x-trace-id", format_trace_id(span_context.trace_id).encode())
            if span_context.is_valid
            else None
        )
        root_path = str(scope.get("root_path", ""))
        status = 500
        started = finished = False
        error_type = ""
        active = instruments.server_active.labels(method)
        active.inc()
        begin = time.perf_counter()

        async def send_with_trace_id(message: Message) -> None:
            nonlocal status, started, finished
            if message["type"] == "http.response.body" and not message.get("more_body"):
                finished = True
            elif message["type"] == "http.response.start":
                started = True
                status = int(message["status"])
                if trace_header is not None:
                    message["headers"] = [
                        *(h for h in message.get("headers", ()) if h[0].lower() != b"x-trace-id"),
                        trace_header,
                    ]
            await send(message)

        failure: BaseException | None = None
        try:
            await self.app(scope, receive, send_with_trace_id)
        except Exception as exc:
            failure = exc
            error_type = type(exc).__qualname__
            span.record_exception(exc)
            _errors.capture(exc, _request_info(scope, headers))
            if started and not finished:
                raise  # mid-body: only the server can abort the connection
            # The client gets (or already got, from Starlette) a 500 carrying X-Trace-Id.
            # The error is logged here with its trace id, so the server need not log it
            # again without one.
            if not started:
                status = 500
                with guard("error response"):
                    await _send_500(send_with_trace_id)
        finally:
            duration = time.perf_counter() - begin
            try:  # the guard, spelled out: this is the hot path
                route = route_template(scope, root_path, self.route_resolver)
                self._finish(
                    span=span,
                    method=method,
                    route=route,
                    status=status,
                    error_type=error_type,
                    duration=duration,
                    scope=scope,
                    failure=failure,
                )
            except Exception as exc:  # noqa: BLE001 - telemetry must never fail a request
                warn_once("request telemetry", "lookout.sdk: request telemetry failed: %r", exc)
            active.dec()
            context.detach(token)

    def _finish(
        self,
        *,
        span: trace.Span,
        method: str,
        route: str | None,
        status: int,
        error_type: str,
        duration: float,
        scope: Scope,
        failure: BaseException | None,
    ) -> None:
        if not error_type and status >= 500:
            error_type = str(status)
        span.set_attribute("http.response.status_code", status)
        if route is not None:
            span.set_attribute("http.route", route)
            span.update_name(f"{'HTTP' if method == '_OTHER' else method} {route}")
        if error_type:
            span.set_attribute("error.type", error_type)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        self.runtime.instruments.server_duration.labels(
            method, route or UNMATCHED_ROUTE, str(status), error_type
        ).observe(duration, exemplar_for_current_span())
        if self._access_log:
            fields = {
                "http_method": method,
                "http_route": route or UNMATCHED_ROUTE,
                "url_path": scope.get("path", ""),
                "status": status,
                "duration_ms": round(duration * 1000, 3),
            }
            if status >= 500:
                self._log.error("http_request", error_type=error_type, exc_info=failure, **fields)
            else:
                self._log.info("http_request", **fields)
        span.end()

    async def _serve_metrics(self, scope: Scope, send: Send) -> None:
        from prometheus_client.exposition import choose_encoder

        headers = _decode_headers(scope.get("headers", ()))
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = encoder(self.runtime.exposition)
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", content_type.encode()),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})


def _decode_headers(raw: Any) -> dict[str, str]:
    headers: dict[str, str] = {}
    for name, value in raw:
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]},{text}" if key in headers else text
    return headers


def _server_attributes(
    scope: Scope, method: str, original_method: str, headers: dict[str, str]
) -> dict[str, Any]:
    attributes: dict[str, Any] = {
        "http.request.method": method,
        "url.path": scope.get("path", ""),
        "url.scheme": scope.get("scheme", "http"),
        "network.protocol.version": scope.get("http_version", "1.1"),
    }
    if method != original_method:
        attributes["http.request.method_original"] = original_method
    server = scope.get("server")
    if server:
        attributes["server.address"] = str(server[0])
        if server[1] is not None:
            attributes["server.port"] = int(server[1])
    client = scope.get("client")
    if client:
        attributes["client.address"] = str(client[0])
    agent = headers.get("user-agent")
    if agent:
        attributes["user_agent.original"] = agent
    return attributes


async def _minimal_lifespan(receive: Receive, send: Send, on_shutdown: Callable[[], None]) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            on_shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


def _request_info(scope: Scope, headers: dict[str, str]) -> dict[str, Any]:
    """The request as an error event shows it (the scrubber runs before it is sent)."""
    host = headers.get("host", "")
    query = scope.get("query_string", b"").decode("latin-1")
    return {
        "method": scope.get("method"),
        "url": f"{scope.get('scheme', 'http')}://{host}{scope.get('path', '')}",
        "query_string": query,
        "headers": headers,
        "env": {"REMOTE_ADDR": (scope.get("client") or ("",))[0]},
    }


async def _send_500(send: Send) -> None:
    body = b"Internal Server Error"
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [
                (b"content-type", b"text/plain; charset=utf-8"),
                (b"content-length", str(len(body)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
