"""The per-process SDK state that `init()` builds and `shutdown()` tears down."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

from opentelemetry import trace
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

from lookout import __version__
from lookout.sdk import _errors, _tracing
from lookout.sdk._guard import guard
from lookout.sdk._logs import LogPipeline
from lookout.sdk._metrics import (
    Instruments,
    MetricRegistry,
    exposition_registry,
    start_listener,
)
from lookout.sdk._otlp_logs import OtlpLogEmitter, build_log_provider
from lookout.sdk._propagation import Propagation
from lookout.sdk._scrub import Scrubber
from lookout.sdk._settings import Settings

TRACER_NAME = "lookout.sdk"


class Runtime:
    """Everything one initialised process holds: settings, logs, metrics and tracing."""

    def __init__(
        self,
        settings: Settings,
        metrics: MetricRegistry,
        buckets: dict[str, Sequence[float]],
        extra_processors: Sequence[SpanProcessor] = (),
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.instruments = Instruments(metrics, buckets)
        self.scrubber = Scrubber(settings.scrub_key.encode(), enabled=settings.scrub)
        self.logs = LogPipeline(
            settings.service, settings.log_level, self.count_drop_logs, self.scrubber
        )
        self.propagation = Propagation(settings.propagators, settings.propagate_to)
        self.provider: TracerProvider | None = None
        self.exporting_traces = False
        self.tracer: trace.Tracer = trace.NoOpTracer()
        if not settings.sdk_disabled:
            self.provider, self.exporting_traces = _tracing.build_provider(
                settings, self.scrubber, self.count_drop_spans, extra_processors
            )
            self.tracer = self.provider.get_tracer(TRACER_NAME, __version__)
        self.log_provider: LoggerProvider | None = None
        if not settings.sdk_disabled and settings.logs_exporter == "otlp":
            self.log_provider = build_log_provider(settings, _tracing.build_resource(settings))
            if self.log_provider is not None:
                self.logs.renderer = OtlpLogEmitter(self.log_provider)
        self.exposition = exposition_registry(self.metrics, self.instruments.pools)
        self.listener: WSGIServer | None = None
        self.metrics_url: str | None = None
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def start(self) -> None:
        """Install logging, the global tracer provider and the metrics listener."""
        self.logs.install()
        if self.provider is not None:
            _tracing.install_global(self.provider)
        with guard("error capture setup"):
            _errors.start(self.settings, self.scrubber)
        self.instruments.build_info.labels(
            version=self.settings.version, environment=self.settings.environment
        ).set(1)
        if self.instruments.workers is not None:
            self.instruments.workers.start()
        if self.settings.metrics_addr is not None:
            host, port = self.settings.metrics_addr
            with guard("metrics listener"):
                self.listener = start_listener(self.exposition, host, port)
                bound_port = self.listener.server_address[1]
                shown = f"[{host}]" if ":" in host else host
                self.metrics_url = f"http://{shown}:{bound_port}/metrics"

    def count_drop_logs(self, reason: str) -> None:
        self.instruments.dropped.labels(signal="logs", reason=reason).inc()

    def count_drop_spans(self, reason: str, count: int) -> None:
        self.instruments.dropped.labels(signal="traces", reason=reason).inc(count)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush and stop everything within `timeout_s` in all, however dead the backends.

        The exporters flush in parallel, each on its own daemon thread, and the wait for
        them ends at the deadline: a SIGTERM grace period is never overrun.
        """
        deadline = time.monotonic() + timeout_s
        flushing = [threading.Thread(target=_errors.stop, args=(timeout_s,), daemon=True)]
        flushing.extend(
            threading.Thread(target=self._stop_provider, args=(provider,), daemon=True)
            for provider in (self.provider, self.log_provider)
            if provider is not None
        )
        for thread in flushing:
            thread.start()
        for thread in flushing:
            thread.join(max(0.0, deadline - time.monotonic()))
        if self.provider is not None:
            _tracing.GLOBAL_PROVIDER.target = trace.NoOpTracerProvider()
        if self.instruments.workers is not None:
            self.instruments.workers.stop()
        if self.listener is not None:
            with guard("metrics listener shutdown"):
                if os.getpid() == self._pid:
                    self.listener.shutdown()  # waits for its thread, which a fork does not copy
                self.listener.server_close()
        self.logs.uninstall()
        self.logs.sink.close(max(0.0, deadline - time.monotonic()))

    @staticmethod
    def _stop_provider(provider: TracerProvider | LoggerProvider) -> None:
        with guard("exporter shutdown"):
            provider.force_flush()
            provider.shutdown()
