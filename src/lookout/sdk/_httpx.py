"""httpx client instrumentation: a CLIENT span, the client duration histogram and
propagation headers (only to allow-listed hosts) for every request, sync and async.

It wraps httpx's real network transports, so every Client and AsyncClient that talks
over the network is covered, whoever created it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
from opentelemetry import context, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from lookout.sdk._guard import guard
from lookout.sdk._metrics import exemplar_for_current_span

RuntimeGetter = Callable[[], Any]

_original_sync = httpx.HTTPTransport.handle_request
_original_async = httpx.AsyncHTTPTransport.handle_async_request
_installed = False


class _Call:
    """The telemetry of one outgoing request, from span start to metric."""

    def __init__(self, runtime: Any, request: httpx.Request) -> None:
        self.runtime = runtime
        self.request = request
        self.method = request.method if request.method in _METHODS else "_OTHER"
        url = request.url
        self.host = url.host
        self.port = url.port or (443 if url.scheme == "https" else 80)
        attributes: dict[str, Any] = {
            "http.request.method": self.method,
            "server.address": self.host,
            "server.port": self.port,
            "url.full": str(url.copy_with(username=None, password=None, query=None)),
        }
        self.span = runtime.tracer.start_span(
            f"{self.method} {self.host}", kind=SpanKind.CLIENT, attributes=attributes
        )
        self.token = context.attach(trace.set_span_in_context(self.span))
        with guard("httpx propagation"):
            runtime.propagation.inject(request.headers, self.host, url.port)
        self.begin = time.perf_counter()

    def finish(self, status: int | None, error: BaseException | None) -> None:
        duration = time.perf_counter() - self.begin
        with guard("httpx telemetry"):
            error_type = ""
            if error is not None:
                error_type = type(error).__qualname__
                self.span.record_exception(error)
                cause = os_error_under(error)
                if cause is not None:
                    # httpx says ConnectError; the socket said why (refused, unreachable,
                    # reset): record that too, or it is lost in a truncated stack trace.
                    self.span.record_exception(cause)
            elif status is not None and status >= 400:
                error_type = str(status)
            if status is not None:
                self.span.set_attribute("http.response.status_code", status)
            if error_type:
                self.span.set_attribute("error.type", error_type)
                self.span.set_status(Status(StatusCode.ERROR))
            self.runtime.instruments.client_duration.labels(
                self.method, self.host, "" if status is None else str(status), error_type
            ).observe(duration, exemplar_for_current_span())
            self.span.end()
        context.detach(self.token)


def os_error_under(error: BaseException) -> OSError | None:
    """The operating system's error that `error` wraps (`ConnectionRefusedError: [Errno
    111] ...`), through causes, contexts and exception groups; None when there is none."""
    pending: list[BaseException] = [error]
    seen: set[int] = set()
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if current is not error and isinstance(current, OSError) and current.errno is not None:
            return current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


_METHODS = frozenset(
    ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH", "QUERY")
)


def install(get_runtime: RuntimeGetter) -> None:
    """Wrap httpx's transports once per process; they consult `get_runtime()` per call."""
    global _installed  # noqa: PLW0603 - patched once per process
    if _installed:
        return
    _installed = True

    def handle_request(self: httpx.HTTPTransport, request: httpx.Request) -> httpx.Response:
        runtime = get_runtime()
        call = None
        if runtime is not None:
            with guard("httpx span start"):
                call = _Call(runtime, request)
        if call is None:
            return _original_sync(self, request)
        try:
            response = _original_sync(self, request)
        except BaseException as exc:
            call.finish(None, exc)
            raise
        call.finish(response.status_code, None)
        return response

    async def handle_async_request(
        self: httpx.AsyncHTTPTransport, request: httpx.Request
    ) -> httpx.Response:
        runtime = get_runtime()
        call = None
        if runtime is not None:
            with guard("httpx span start"):
                call = _Call(runtime, request)
        if call is None:
            return await _original_async(self, request)
        try:
            response = await _original_async(self, request)
        except BaseException as exc:
            call.finish(None, exc)
            raise
        call.finish(response.status_code, None)
        return response

    httpx.HTTPTransport.handle_request = handle_request  # type: ignore[method-assign]
    httpx.AsyncHTTPTransport.handle_async_request = handle_async_request  # type: ignore[method-assign]


def uninstall() -> None:
    global _installed  # noqa: PLW0603 - patched once per process
    httpx.HTTPTransport.handle_request = _original_sync  # type: ignore[method-assign]
    httpx.AsyncHTTPTransport.handle_async_request = _original_async  # type: ignore[method-assign]
    _installed = False
