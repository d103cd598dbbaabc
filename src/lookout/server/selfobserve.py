"""The server observes itself without a feedback loop.

Its own metrics go straight into its own store as samples (job="lookout"), never through
its ingest endpoints; the write itself moves only counters that already exist, so an idle
server writes the same number of samples every interval. Spans of the ingest routes are
off by default; when on (`trace_ingest`), they too go straight to the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import lookout.sdk
from lookout.errors import StoreError
from lookout.model import Batch, Sample, Span, SpanColumns
from lookout.server.runtime import ServerRuntime

SELF_JOB = "lookout"


def snapshot(runtime: ServerRuntime, instance: str, now_ms: int) -> list[Sample]:
    """The server's registry as samples, labelled as a scrape of job="lookout" would be."""
    samples = []
    families = [*runtime.metrics.registry.collect(), *runtime.derived.registry.collect()]
    for family in families:
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = {**sample.labels, "job": SELF_JOB, "instance": instance}
            samples.append(Sample(sample.name, labels, now_ms, float(sample.value)))
    return samples


async def observe_forever(runtime: ServerRuntime, instance: str) -> None:
    """Write a snapshot every `self_observe_interval_s`, until cancelled."""
    interval = runtime.config.self_observe_interval_s
    while True:
        with contextlib.suppress(StoreError):
            await runtime.store(Batch(samples=snapshot(runtime, instance, time.time_ns() // 10**6)))
        await asyncio.sleep(interval)


class StoreSpanExporter(SpanExporter):
    """Spans of the server's own ingest routes, written straight to its store."""

    def __init__(self, runtime: ServerRuntime) -> None:
        self.runtime = runtime

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        batch = Batch(spans=SpanColumns.of(_span(s) for s in spans if s.context is not None))
        try:
            self.runtime.writer.submit(batch)
        except StoreError:
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS


def _span(span: ReadableSpan) -> Span:
    context = span.context
    assert context is not None
    attributes: dict[str, Any] = dict(span.attributes or {})
    return Span(
        trace_id=format(context.trace_id, "032x"),
        span_id=format(context.span_id, "016x"),
        parent_span_id=format(span.parent.span_id, "016x") if span.parent else "",
        service=SELF_JOB,
        name=span.name,
        kind=span.kind.name.lower(),
        start_ns=span.start_time or 0,
        end_ns=span.end_time or span.start_time or 0,
        status_code=span.status.status_code.name.lower(),
        attributes=attributes,
        resource={"service.name": SELF_JOB},
        scope="lookout.server",
        source="self",
    )


def ingest_tracer_provider(runtime: ServerRuntime) -> TracerProvider:
    provider = TracerProvider(shutdown_on_exit=False)
    provider.add_span_processor(SimpleSpanProcessor(StoreSpanExporter(runtime)))
    return provider


COMPACT_EVERY_S = 3600.0
CHECKPOINT_EVERY_S = 300.0


def yesterday(now_s: float) -> str:
    """The UTC day before `now_s`, as a partition suffix: days before it are closed."""
    return datetime.fromtimestamp(now_s - 86400, UTC).strftime("%Y%m%d")


async def compact_forever(runtime: ServerRuntime) -> None:
    """At startup and then every hour, move every day table to Parquet, today's too; in
    between, checkpoint the WAL every five minutes. Both on the writer thread. They bound
    what a damaged database file (an hour) or WAL (five minutes) can cost: see recovery.py."""
    log = lookout.sdk.get_logger("lookout.server")
    while True:
        try:
            await asyncio.wrap_future(runtime.writer.flush(time.time_ns()))
        except Exception as exc:  # noqa: BLE001 - a failed compaction is retried next hour
            log.warning("compaction_failed", error=repr(exc))
        for _ in range(round(COMPACT_EVERY_S / CHECKPOINT_EVERY_S)):
            await asyncio.sleep(CHECKPOINT_EVERY_S)
            try:
                await asyncio.wrap_future(runtime.writer.checkpoint(time.time_ns()))
            except Exception as exc:  # noqa: BLE001 - retried five minutes later
                log.warning("checkpoint_failed", error=repr(exc))
