"""The OpenTelemetry tracer provider: resource, sampler, limits and OTLP/HTTP batch export."""

from __future__ import annotations

import contextvars
import random
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanLimits, SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.util.types import Attributes

from lookout import __version__
from lookout.sdk._export import (
    CountDrop,
    CountingBatchSpanProcessor,
    GuardedSpanProcessor,
    ScrubbingExporter,
)
from lookout.sdk._guard import guard, warn_once
from lookout.sdk._scrub import Scrubber
from lookout.sdk._settings import Settings

# A trace id chosen by the caller for the next root span (an inbound X-Trace-Id).
_forced_trace_id: contextvars.ContextVar[int | None] = contextvars.ContextVar(
    "lookout_forced_trace_id", default=None
)


class _InboundAwareIdGenerator(IdGenerator):
    """Random ids, except that a root span may take the trace id the caller was given."""

    def generate_span_id(self) -> int:
        return random.getrandbits(64) or 1

    def generate_trace_id(self) -> int:
        forced = _forced_trace_id.get()
        if forced:
            return forced
        return random.getrandbits(128) or 1

    def is_trace_id_random(self) -> bool:
        return True


@contextmanager
def root_trace_id(trace_id: int | None) -> Iterator[None]:
    """Within the block, a new root span takes `trace_id` (when given)."""
    token = _forced_trace_id.set(trace_id)
    try:
        yield
    finally:
        _forced_trace_id.reset(token)


def build_sampler(name: str, ratio: float) -> Sampler:
    samplers: dict[str, Sampler] = {
        "always_on": ALWAYS_ON,
        "always_off": ALWAYS_OFF,
        "traceidratio": TraceIdRatioBased(ratio),
        "parentbased_always_on": ParentBased(ALWAYS_ON),
        "parentbased_always_off": ParentBased(ALWAYS_OFF),
        "parentbased_traceidratio": ParentBased(TraceIdRatioBased(ratio)),
    }
    return samplers[name]


def build_resource(settings: Settings) -> Resource:
    attributes: dict[str, Any] = dict(settings.resource_attributes)
    attributes.update(
        {
            "service.name": settings.service,
            "service.version": settings.version,
            "service.instance.id": settings.instance_id,
            "deployment.environment.name": settings.environment,
            # The pre-1.27 name, which many dashboards and the strategy still use.
            "deployment.environment": settings.environment,
            "telemetry.sdk.name": "opentelemetry",
            "telemetry.sdk.language": "python",
            "telemetry.distro.name": "lookout",
            "telemetry.distro.version": __version__,
        }
    )
    return Resource(attributes)


def build_exporter_processor(
    settings: Settings, scrubber: Scrubber, count_drop: CountDrop
) -> SpanProcessor | None:
    """The batch processor feeding the OTLP/HTTP exporter, or None when export is off."""
    if settings.traces_exporter != "otlp":
        return None
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    target = settings.traces
    compression = {
        "gzip": Compression.Gzip,
        "deflate": Compression.Deflate,
        "none": Compression.NoCompression,
    }[target.compression]
    try:
        exporter = OTLPSpanExporter(
            endpoint=target.endpoint,
            certificate_file=target.certificate,
            client_key_file=target.client_key,
            client_certificate_file=target.client_certificate,
            headers=target.headers,
            timeout=target.timeout_s,
            compression=compression,
        )
        return CountingBatchSpanProcessor(
            ScrubbingExporter(exporter, scrubber, count_drop),
            count_drop,
            max_queue_size=settings.bsp_max_queue_size,
            schedule_delay_millis=settings.bsp_schedule_delay_ms,
            max_export_batch_size=min(
                settings.bsp_max_export_batch_size, settings.bsp_max_queue_size
            ),
            export_timeout_millis=settings.bsp_export_timeout_ms,
        )
    except Exception as exc:  # noqa: BLE001 - a bad exporter setting must not stop the host
        warn_once("trace exporter setup", "lookout.sdk: trace export is off: %r", exc)
        return None


def build_provider(
    settings: Settings,
    scrubber: Scrubber,
    count_drop: CountDrop,
    extra_processors: Sequence[SpanProcessor] = (),
) -> tuple[TracerProvider, bool]:
    """A TracerProvider configured only from Settings (it reads no variable itself),
    and whether it exports."""
    limits = SpanLimits(
        max_attributes=settings.span_attribute_count_limit,
        max_events=128,
        max_links=128,
        max_span_attributes=settings.span_attribute_count_limit,
        max_event_attributes=128,
        max_link_attributes=128,
        max_attribute_length=settings.attribute_value_length_limit,
        max_span_attribute_length=settings.attribute_value_length_limit,
    )
    provider = TracerProvider(
        sampler=build_sampler(settings.sampler, settings.sampler_arg),
        resource=build_resource(settings),
        id_generator=_InboundAwareIdGenerator(),
        span_limits=limits,
        shutdown_on_exit=False,
    )
    exporting = build_exporter_processor(settings, scrubber, count_drop)
    if exporting is not None:
        provider.add_span_processor(GuardedSpanProcessor(exporting))
    for processor in extra_processors:
        provider.add_span_processor(GuardedSpanProcessor(processor))
    return provider, exporting is not None


class _SwitchableTracerProvider(trace.TracerProvider):
    """The process-global provider: it forwards to whichever provider `init()` built last.

    OpenTelemetry lets the global provider be set once per process; tests and a second
    `init()` need to swap it, so the global is this forwarder instead.
    """

    def __init__(self) -> None:
        self.target: trace.TracerProvider = trace.NoOpTracerProvider()

    def get_tracer(
        self,
        instrumenting_module_name: str,
        instrumenting_library_version: str | None = None,
        schema_url: str | None = None,
        attributes: Attributes | None = None,
    ) -> trace.Tracer:
        return _SwitchableTracer(
            self, instrumenting_module_name, instrumenting_library_version, schema_url, attributes
        )


class _SwitchableTracer(trace.Tracer):
    def __init__(
        self,
        owner: _SwitchableTracerProvider,
        name: str,
        version: str | None,
        schema_url: str | None,
        attributes: Attributes | None,
    ) -> None:
        self._owner = owner
        self._args = (name, version, schema_url, attributes)
        self._target: trace.TracerProvider | None = None
        self._tracer: trace.Tracer = trace.NoOpTracer()

    def _current(self) -> trace.Tracer:
        target = self._owner.target
        if target is not self._target:
            name, version, schema_url, attributes = self._args
            self._tracer = target.get_tracer(name, version, schema_url, attributes)
            self._target = target
        return self._tracer

    def start_span(self, *args: Any, **kwargs: Any) -> trace.Span:
        return self._current().start_span(*args, **kwargs)

    def start_as_current_span(self, *args: Any, **kwargs: Any) -> Any:
        return self._current().start_as_current_span(*args, **kwargs)


GLOBAL_PROVIDER = _SwitchableTracerProvider()
_global_installed = False


def install_global(provider: trace.TracerProvider) -> None:
    """Make `provider` what `opentelemetry.trace.get_tracer()` hands out."""
    global _global_installed  # noqa: PLW0603 - one process-wide switch
    GLOBAL_PROVIDER.target = provider
    if not _global_installed:
        with guard("global tracer provider"):
            trace.set_tracer_provider(GLOBAL_PROVIDER)
        _global_installed = True
