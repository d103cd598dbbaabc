"""What stands between a finished span and the wire: scrubbing, and counting drops.

Scrubbing runs in the exporter, on the batch processor's thread, so the request path
pays nothing for it. Every span that does not reach the backend is counted in
`lookout_sdk_dropped_total{signal="traces"}` by reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from opentelemetry.context import Context
from opentelemetry.sdk.trace import Event, ReadableSpan, Span, SpanProcessor
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Link

from lookout.sdk._guard import guard, warn_once
from lookout.sdk._scrub import Scrubber

CountDrop = Callable[[str, int], None]


def scrub_span(span: ReadableSpan, scrubber: Scrubber) -> ReadableSpan:
    """A copy of `span` whose attributes, event and link attributes are scrubbed."""
    return ReadableSpan(
        name=span.name,
        context=span.context,
        parent=span.parent,
        resource=span.resource,
        attributes=scrubber.scrub_mapping(span.attributes or {}),
        events=[
            Event(e.name, scrubber.scrub_mapping(e.attributes or {}), e.timestamp)
            for e in span.events
        ],
        links=[
            Link(link.context, scrubber.scrub_mapping(link.attributes or {})) for link in span.links
        ],
        kind=span.kind,
        status=span.status,
        start_time=span.start_time,
        end_time=span.end_time,
        instrumentation_scope=span.instrumentation_scope,
    )


class ScrubbingExporter(SpanExporter):
    """Scrubs spans, then hands them to `inner`; failed exports are counted as drops."""

    def __init__(self, inner: SpanExporter, scrubber: Scrubber, count_drop: CountDrop) -> None:
        self.inner = inner
        self.scrubber = scrubber
        self.count_drop = count_drop

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            cleaned = (
                [scrub_span(s, self.scrubber) for s in spans] if self.scrubber.enabled else spans
            )
            result = self.inner.export(cleaned)
        except Exception:  # noqa: BLE001 - an exporter failure is a drop, never a crash
            self.count_drop("export_error", len(spans))
            return SpanExportResult.FAILURE
        if result is not SpanExportResult.SUCCESS:
            self.count_drop("export_failed", len(spans))
        return result

    def shutdown(self) -> None:
        self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self.inner.force_flush(timeout_millis)


class GuardedSpanProcessor(SpanProcessor):
    """Runs a processor's hooks inside the guard: a failing processor never reaches the
    code that started or ended the span."""

    def __init__(self, inner: SpanProcessor) -> None:
        self.inner = inner

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        with guard("span processor on_start"):
            self.inner.on_start(span, parent_context=parent_context)

    def on_end(self, span: ReadableSpan) -> None:
        with guard("span processor on_end"):
            self.inner.on_end(span)

    def shutdown(self) -> None:
        with guard("span processor shutdown"):
            self.inner.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        try:
            return self.inner.force_flush(timeout_millis)
        except Exception as exc:  # noqa: BLE001 - a failing flush is a report, not a crash
            warn_once("span processor flush", "lookout.sdk: span flush failed: %r", exc)
            return False


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """OpenTelemetry's batch processor, counting the spans a full queue pushes out."""

    def __init__(self, exporter: SpanExporter, count_drop: CountDrop, **options: int) -> None:
        super().__init__(exporter, **options)  # type: ignore[arg-type]
        self._count_drop = count_drop
        self._capacity = options.get("max_queue_size", 2048)

    def on_end(self, span: ReadableSpan) -> None:
        queue = getattr(getattr(self, "_batch_processor", None), "_queue", None)
        if queue is not None and len(queue) >= self._capacity:
            self._count_drop("queue_full", 1)  # the deque discards its oldest span
        super().on_end(span)
