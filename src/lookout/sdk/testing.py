"""Test helpers that services use with `lookout.sdk`, as structlog.testing and OTel's
InMemorySpanExporter are used with those libraries.

    from lookout.sdk import testing

    registry = testing.fresh_registry()     # before init(): metrics go to a new registry
    app = lookout.sdk.init(service="svc", app=app, metrics_addr="off", traces_exporter="none")
    with testing.capture_logs() as logs, testing.capture_spans() as spans:
        ...
    testing.reset()                          # between tests
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import structlog
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from lookout import sdk
from lookout.sdk import _errors, _guard
from lookout.sdk._export import ScrubbingExporter
from lookout.sdk._metrics import MetricRegistry
from lookout.sdk._runtime import Runtime

__all__ = [
    "CapturedSpans",
    "call_asgi",
    "capture_errors",
    "capture_logs",
    "capture_spans",
    "drive",
    "fresh_registry",
    "reset",
    "sample",
]


def _runtime() -> Runtime:
    runtime = sdk._runtime
    if runtime is None:
        raise RuntimeError("lookout.sdk.init() has not been called in this process")
    return runtime


@contextmanager
def capture_logs() -> Iterator[list[dict[str, Any]]]:
    """Collect every log event (structlog and standard library) as a dict, unrendered.

    The events pass through the same processors as in production (trace ids,
    timestamp, service ...); only the JSON rendering and the write are skipped.
    """
    runtime = _runtime()
    pipeline = runtime.logs
    captured: list[dict[str, Any]] = []

    def keep(_: Any, __: str, event: MutableMapping[str, Any]) -> Any:
        captured.append(dict(event))
        raise structlog.DropEvent

    original = pipeline.renderer
    pipeline.renderer = keep
    try:
        yield captured
    finally:
        pipeline.renderer = original


class CapturedSpans:
    """Finished spans, in the order they ended."""

    def __init__(self, exporter: InMemorySpanExporter) -> None:
        self._exporter = exporter

    def __call__(self) -> Sequence[ReadableSpan]:
        return self._exporter.get_finished_spans()

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self() if s.name == name]

    def clear(self) -> None:
        self._exporter.clear()


@contextmanager
def capture_spans() -> Iterator[CapturedSpans]:
    """Collect the spans this process finishes (sampled ones) while the block runs, as
    they would be exported: scrubbed."""
    runtime = _runtime()
    if runtime.provider is None:
        raise RuntimeError("tracing is disabled (OTEL_SDK_DISABLED); there are no spans")
    exporter = InMemorySpanExporter()
    scrubbed = ScrubbingExporter(exporter, runtime.scrubber, runtime.count_drop_spans)
    runtime.provider.add_span_processor(SimpleSpanProcessor(scrubbed))
    try:
        yield CapturedSpans(exporter)
    finally:
        exporter.shutdown()


@contextmanager
def capture_errors() -> Iterator[list[dict[str, Any]]]:
    """Collect error events as they would be sent (scrubbed, with trace ids) instead of
    sending them. Needs `init(dsn=...)`; any DSN will do, nothing is sent."""
    if not _errors.enabled():
        raise RuntimeError("error capture is off: pass init(dsn=...) or set SENTRY_DSN")
    captured: list[dict[str, Any]] = []
    _errors.captured = captured
    try:
        yield captured
    finally:
        _errors.captured = None


def fresh_registry() -> CollectorRegistry:
    """Point the SDK's metric declarations at a new, empty registry; call before init()."""
    registry = CollectorRegistry()
    sdk._metrics = MetricRegistry(registry)
    return registry


async def call_asgi(
    app: Any, path: str = "/", *, method: str = "GET", headers: Sequence[tuple[str, str]] = ()
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Call an ASGI app once in-process (no server, no socket): (status, headers, body)."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path.split("?", 1)[0],
        "raw_path": path.encode(),
        "query_string": path.split("?", 1)[1].encode() if "?" in path else b"",
        "root_path": "",
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    sent: list[MutableMapping[str, Any]] = []
    received = False

    async def receive() -> dict[str, Any]:
        nonlocal received
        if received:
            return {"type": "http.disconnect"}
        received = True
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return int(start["status"]), list(start.get("headers", [])), body


def drive(app: Any, requests: int, path: str = "/", **options: Any) -> list[int]:
    """Call an ASGI app `requests` times in-process; the status of each call."""

    async def run() -> list[int]:
        return [(await call_asgi(app, path, **options))[0] for _ in range(requests)]

    return asyncio.run(run())


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """The current value of one sample, or None when it does not exist."""
    return registry.get_sample_value(name, labels)


def reset() -> None:
    """Shut the SDK down and forget its global state (use in an autouse fixture)."""
    sdk.shutdown(timeout_s=1.0)
    _guard.reset()
    structlog.contextvars.clear_contextvars()
