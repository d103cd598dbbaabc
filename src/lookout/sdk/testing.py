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

from collections.abc import Iterator, MutableMapping, Sequence
from contextlib import contextmanager
from typing import Any

import structlog
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prometheus_client import CollectorRegistry

from lookout import sdk
from lookout.sdk import _guard
from lookout.sdk._metrics import MetricRegistry
from lookout.sdk._runtime import Runtime

__all__ = ["CapturedSpans", "capture_logs", "capture_spans", "fresh_registry", "reset", "sample"]


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
    """Collect the spans this process finishes (sampled ones) while the block runs."""
    runtime = _runtime()
    if runtime.provider is None:
        raise RuntimeError("tracing is disabled (OTEL_SDK_DISABLED); there are no spans")
    exporter = InMemorySpanExporter()
    runtime.provider.add_span_processor(SimpleSpanProcessor(exporter))
    try:
        yield CapturedSpans(exporter)
    finally:
        exporter.shutdown()


def fresh_registry() -> CollectorRegistry:
    """Point the SDK's metric declarations at a new, empty registry; call before init()."""
    registry = CollectorRegistry()
    sdk._metrics = MetricRegistry(registry)
    return registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    """The current value of one sample, or None when it does not exist."""
    return registry.get_sample_value(name, labels)


def reset() -> None:
    """Shut the SDK down and forget its global state (use in an autouse fixture)."""
    sdk.shutdown(timeout_s=1.0)
    _guard.reset()
    structlog.contextvars.clear_contextvars()
