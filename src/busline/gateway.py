"""gateway: busline's only public entry.

It routes `/api/*` to the services, checks bearer sessions with auth, and closes features
for maintenance. It is instrumented as the edge (`trust_inbound_context=False`): a trace
starts here whatever a client sends, and every answer carries `X-Trace-Id`.

- Public routes are the table `ROUTES`; each belongs to one feature (auth, trips,
  bookings, payments, fleet). The control state's `maintenance` closes a feature, or
  every `/api/*` route with `global`, answering 503 with a friendly JSON body and
  `Retry-After`. `/healthz` is never closed.
- A route that needs a user validates `Authorization: Bearer <token>` with auth's
  `GET /internal/sessions/current`, then calls the service with `X-User-Id`. A client's
  own `X-User-Id` (or any header outside a short list) never reaches a service.
- Services are found by their port files, cached until a connection is refused (then
  looked up again: a restarted service may have moved). A service that cannot be reached
  answers 503 `upstream_unavailable` with `Retry-After`; one too slow, 504
  `upstream_timeout`; a broken answer, 502 `upstream_error`.
- Bodies are limited to 64 KiB (413).

Environment: `BUSLINE_GATEWAY_TIMEOUT_S` (default 10) is how long a service may take to
answer; connecting may take 2 s.
"""

from __future__ import annotations

import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import lookout.sdk
from busline import kit

NAME = "gateway"
MAX_BODY_BYTES = 64 * 1024
MAX_QUERY_CHARS = 2048
CONNECT_TIMEOUT_S = 2.0
DEFAULT_TIMEOUT_S = 10.0
MAINTENANCE_RETRY_AFTER_S = 300
UNAVAILABLE_RETRY_AFTER_S = 5
FEATURES = ("auth", "trips", "bookings", "payments", "fleet")

#: Headers of a service's answer that the client gets (the SDK adds X-Trace-Id).
ANSWER_HEADERS = ("content-type", "retry-after", "location", "cache-control", "www-authenticate")

log = lookout.sdk.get_logger("busline.gateway")


@dataclass(frozen=True)
class PublicRoute:
    """One public route: where it goes, which feature it belongs to, whether it needs a
    signed-in user, and which client headers (besides the body's type) it passes on."""

    method: str
    path: str
    service: str
    target: str
    feature: str
    needs_user: bool = False
    passes: tuple[str, ...] = ()


ROUTES: tuple[PublicRoute, ...] = (
    PublicRoute("POST", "/api/auth/register", "auth", "/auth/register", "auth"),
    PublicRoute("POST", "/api/auth/login", "auth", "/auth/login", "auth"),
    PublicRoute("GET", "/api/trips", "ticketing", "/trips", "trips"),
    PublicRoute("GET", "/api/trips/{trip_id}", "ticketing", "/trips/{trip_id}", "trips"),
    PublicRoute("POST", "/api/bookings", "ticketing", "/bookings", "bookings", needs_user=True),
    PublicRoute(
        "GET",
        "/api/bookings/{booking_id}",
        "ticketing",
        "/bookings/{booking_id}",
        "bookings",
        needs_user=True,
    ),
    PublicRoute(
        "GET",
        "/api/tickets/{booking_id}",
        "ticketing",
        "/tickets/{booking_id}",
        "bookings",
        needs_user=True,
    ),
    PublicRoute(
        "POST",
        "/api/payments",
        "payments",
        "/payments",
        "payments",
        needs_user=True,
        passes=("idempotency-key",),
    ),
    PublicRoute(
        "GET",
        "/api/payments/{payment_id}",
        "payments",
        "/payments/{payment_id}",
        "payments",
        needs_user=True,
    ),
    PublicRoute("GET", "/api/fleet/routes", "fleet", "/fleet/routes", "fleet"),
    PublicRoute("GET", "/api/fleet/buses", "fleet", "/fleet/buses", "fleet"),
    PublicRoute("GET", "/api/fleet/buses/{bus_id}", "fleet", "/fleet/buses/{bus_id}", "fleet"),
)

#: What a path parameter may be: an id, never a path of its own.
_PATH_PARAM = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,99}$")


def timeout_from_env(environ: Mapping[str, str]) -> float:
    raw = environ.get("BUSLINE_GATEWAY_TIMEOUT_S", "").strip()
    if not raw:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.1 <= value <= 120:
        raise ValueError(
            f"BUSLINE_GATEWAY_TIMEOUT_S has value {raw!r}. Expected seconds between 0.1 and 120."
        )
    return value


# ---------------------------------------------------------------- answers


def maintenance_answer(message: str, feature: str, scope: str) -> Response:
    return kit.error(
        503,
        "maintenance",
        message,
        feature=feature,
        scope=scope,
        headers={"Retry-After": str(MAINTENANCE_RETRY_AFTER_S)},
    )


def upstream_answer(status: int, code: str, service: str, message: str) -> Response:
    headers = {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)} if status == 503 else None
    return kit.error(status, code, message, service=service, headers=headers)


class UpstreamFailedError(Exception):
    """A service could not be reached or did not answer properly; carries the answer."""

    def __init__(self, answer: Response) -> None:
        super().__init__("upstream failed")
        self.answer = answer


# ---------------------------------------------------------------- the services


class Upstreams:
    """Calls to the services over one pooled client. Each service's URL comes from its
    port file and is kept until a connection to it fails."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self.client = client
        self._urls: dict[str, str] = {}

    def _url(self, service: str, *, fresh: bool = False) -> str:
        if fresh or service not in self._urls:
            self._urls[service] = kit.url_of(service)
        return self._urls[service]

    async def call(
        self,
        service: str,
        method: str,
        path: str,
        *,
        query: str = "",
        headers: Mapping[str, str] | None = None,
        content: bytes | None = None,
    ) -> httpx.Response:
        """The service's answer, or `UpstreamFailedError` with the answer for the client.
        A refused connection is retried once at a freshly read port (nothing was sent)."""
        url = None
        for attempt in range(2):
            try:
                fresh_url = self._url(service, fresh=attempt > 0)
            except kit.Unavailable:
                raise UpstreamFailedError(
                    upstream_answer(
                        503, "upstream_unavailable", service, f"{service} is not running"
                    )
                ) from None
            if fresh_url == url:
                break  # the port file still names the address that refused us
            url = fresh_url
            target = url + path + (f"?{query}" if query else "")
            try:
                return await self.client.request(
                    method, target, headers=dict(headers or {}), content=content
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                log.warning("upstream_unreachable", upstream=service, error=type(exc).__name__)
                continue
            except httpx.TimeoutException as exc:
                log.warning("upstream_timeout", upstream=service, error=type(exc).__name__)
                raise UpstreamFailedError(
                    upstream_answer(
                        504, "upstream_timeout", service, f"{service} did not answer in time"
                    )
                ) from None
            except httpx.TransportError as exc:
                log.warning("upstream_broken", upstream=service, error=type(exc).__name__)
                raise UpstreamFailedError(
                    upstream_answer(
                        502, "upstream_error", service, f"{service} broke off its answer"
                    )
                ) from None
        raise UpstreamFailedError(
            upstream_answer(503, "upstream_unavailable", service, f"{service} is unreachable")
        )


# ---------------------------------------------------------------- requests


async def read_body(request: Request, limit: int = MAX_BODY_BYTES) -> bytes:
    """The request body, or 413 as soon as it passes `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise kit.Invalid("body", f"larger than {limit} bytes", status=413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise kit.Invalid("body", f"larger than {limit} bytes", status=413)
        chunks.append(chunk)
    return b"".join(chunks)


def target_path(route: PublicRoute, params: Mapping[str, Any]) -> str:
    values = {}
    for name, value in params.items():
        text = str(value)
        if not _PATH_PARAM.match(text):
            raise kit.Invalid(name, "is not a valid id")
        values[name] = quote(text, safe="")
    return route.target.format(**values)


def relay(answer: httpx.Response) -> Response:
    """A service's answer, as the client gets it."""
    headers = {k: v for k, v in answer.headers.items() if k.lower() in ANSWER_HEADERS}
    return Response(answer.content, status_code=answer.status_code, headers=headers)


async def signed_in_user(request: Request, upstreams: Upstreams) -> str | Response:
    """The user id of the request's bearer session (checked with auth), or the 401 (or
    503) answer to send instead."""
    authorization = request.headers.get("authorization", "")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return kit.error(
            401,
            "unauthorized",
            "sign in and send Authorization: Bearer <token>",
            field="authorization",
            headers={"WWW-Authenticate": "Bearer"},
        )
    try:
        answer = await upstreams.call(
            "auth",
            "GET",
            "/internal/sessions/current",
            headers={"authorization": authorization},
        )
    except UpstreamFailedError as failed:
        return failed.answer
    if answer.status_code == 200:
        try:
            user_id = answer.json()["user_id"]
        except (ValueError, KeyError, TypeError):
            user_id = None
        if isinstance(user_id, str) and user_id:
            return user_id
    if answer.status_code in (401, 403):
        return relay(answer)
    log.warning("session_check_failed", status=answer.status_code)
    return upstream_answer(502, "upstream_error", "auth", "auth could not check the session")


Endpoint = Callable[[Request], Awaitable[Response]]


def endpoint(route: PublicRoute) -> Endpoint:
    async def forward(request: Request) -> Response:
        control: kit.ControlState = request.app.state.control
        message = control.maintenance(route.feature)
        if message is not None:
            scope = "global" if control.maintenance("global") else route.feature
            return maintenance_answer(message, route.feature, scope)
        upstreams: Upstreams = request.app.state.upstreams
        path = target_path(route, request.path_params)
        headers: dict[str, str] = {"accept": "application/json"}
        if route.needs_user:
            user = await signed_in_user(request, upstreams)
            if isinstance(user, Response):
                return user
            headers["x-user-id"] = user
            lookout.sdk.set_user(id=user)
        content = None
        if route.method == "POST":
            content = await read_body(request)
            headers["content-type"] = request.headers.get("content-type", "application/json")
        for name in route.passes:
            value = request.headers.get(name)
            if value is not None:
                if len(value) > 200:
                    raise kit.Invalid(name, "longer than 200 characters")
                headers[name] = value
        query = request.url.query if route.method == "GET" else ""
        if len(query) > MAX_QUERY_CHARS:
            raise kit.Invalid("query", f"longer than {MAX_QUERY_CHARS} characters", status=414)
        try:
            answer = await upstreams.call(
                route.service, route.method, path, query=query, headers=headers, content=content
            )
        except UpstreamFailedError as failed:
            return failed.answer
        return relay(answer)

    forward.__name__ = f"{route.method.lower()}_{route.path}"
    return forward


async def http_error(request: Request, exc: Exception) -> Response:
    """No route, or the wrong method: JSON errors (and maintenance when everything is
    closed)."""
    assert isinstance(exc, HTTPException)
    if request.url.path.startswith("/api/"):
        control: kit.ControlState = request.app.state.control
        message = control.maintenance("global")
        if message is not None:
            return maintenance_answer(message, "global", "global")
    if exc.status_code == 404:
        return kit.error(
            404,
            "not_found",
            f"no route {request.method} {request.url.path}",
            field="path",
        )
    if exc.status_code == 405:
        return kit.error(
            405,
            "method_not_allowed",
            f"{request.method} is not allowed on {request.url.path}",
            field="method",
            headers=exc.headers,
        )
    return kit.error(exc.status_code, "http_error", str(exc.detail), headers=exc.headers)


def create_app(environ: Mapping[str, str] | None = None) -> Starlette:
    """The gateway app; its client to the services opens at lifespan startup."""
    read_timeout = timeout_from_env(os.environ if environ is None else environ)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with httpx.AsyncClient(
            timeout=httpx.Timeout(read_timeout, connect=CONNECT_TIMEOUT_S),
            limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
            trust_env=False,
            follow_redirects=False,
        ) as client:
            app.state.upstreams = Upstreams(client)
            log.info("gateway_ready", routes=len(ROUTES), timeout_s=read_timeout)
            yield

    app = Starlette(
        routes=[
            Route("/healthz", kit.healthz(NAME), methods=["GET"]),
            *(Route(r.path, endpoint(r), methods=[r.method]) for r in ROUTES),
        ],
        lifespan=lifespan,
    )
    app.state.control = kit.ControlState()
    kit.handles_invalid(app)
    app.add_exception_handler(HTTPException, http_error)
    return app


def main() -> None:
    app = create_app()
    kit.serve(NAME, kit.instrument(NAME, app, edge=True))
