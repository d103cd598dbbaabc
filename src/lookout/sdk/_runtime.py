"""The per-process SDK state that `init()` builds and `shutdown()` tears down."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from wsgiref.simple_server import WSGIServer

from opentelemetry import trace
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

from lookout import __version__
from lookout.sdk import _tracing
from lookout.sdk._guard import guard
from lookout.sdk._logs import LogPipeline
from lookout.sdk._metrics import Instruments, MetricRegistry, start_listener
from lookout.sdk._otlp_logs import OtlpLogEmitter, build_log_provider
from lookout.sdk._propagation import Propagation
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
        self.logs = LogPipeline(settings.service, settings.log_level, self.count_drop_logs)
        self.propagation = Propagation(settings.propagators, settings.propagate_to)
        self.provider: TracerProvider | None = None
        self.exporting_traces = False
        self.tracer: trace.Tracer = trace.NoOpTracer()
        if not settings.sdk_disabled:
            self.provider, self.exporting_traces = _tracing.build_provider(
                settings, extra_processors
            )
            self.tracer = self.provider.get_tracer(TRACER_NAME, __version__)
        self.log_provider: LoggerProvider | None = None
        if not settings.sdk_disabled and settings.logs_exporter == "otlp":
            self.log_provider = build_log_provider(settings, _tracing.build_resource(settings))
            if self.log_provider is not None:
                self.logs.renderer = OtlpLogEmitter(self.log_provider)
        self.listener: WSGIServer | None = None
        self.metrics_url: str | None = None
        self._lock = threading.Lock()

    def start(self) -> None:
        """Install logging, the global tracer provider and the metrics listener."""
        self.logs.install()
        if self.provider is not None:
            _tracing.install_global(self.provider)
        self.instruments.build_info.labels(
            version=self.settings.version, environment=self.settings.environment
        ).set(1)
        if self.settings.metrics_addr is not None:
            host, port = self.settings.metrics_addr
            with guard("metrics listener"):
                self.listener = start_listener(self.metrics.registry, host, port)
                bound_port = self.listener.server_address[1]
                shown = f"[{host}]" if ":" in host else host
                self.metrics_url = f"http://{shown}:{bound_port}/metrics"

    def count_drop_logs(self, reason: str) -> None:
        self.instruments.dropped.labels(signal="logs", reason=reason).inc()

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush and stop exporters within `timeout_s`, stop the listener, restore logging."""
        if self.provider is not None:
            with guard("tracer shutdown"):
                self._shutdown_provider(self.provider, timeout_s)
            _tracing.GLOBAL_PROVIDER.target = trace.NoOpTracerProvider()
        if self.log_provider is not None:
            with guard("log exporter shutdown"):
                self._shutdown_provider(self.log_provider, timeout_s)
        if self.listener is not None:
            with guard("metrics listener shutdown"):
                self.listener.shutdown()
                self.listener.server_close()
        self.logs.uninstall()

    @staticmethod
    def _shutdown_provider(provider: TracerProvider | LoggerProvider, timeout_s: float) -> None:
        # TracerProvider.shutdown() can wait for a dead backend far longer than a
        # SIGTERM grace period; run it on a daemon thread and stop waiting at the deadline.
        done = threading.Event()

        def run() -> None:
            with guard("tracer shutdown"):
                provider.force_flush(int(timeout_s * 1000))
                provider.shutdown()
            done.set()

        threading.Thread(target=run, name="lookout-shutdown", daemon=True).start()
        done.wait(timeout_s)
