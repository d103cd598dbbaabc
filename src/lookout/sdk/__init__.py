"""`lookout.sdk`: one call instruments a service.

    app = lookout.sdk.init(service="ticketing", app=app)

gives JSON logs carrying `trace_id`, RED and business metrics for Prometheus,
OpenTelemetry traces with W3C `traceparent` and `X-Trace-Id` propagation, and
instrumented httpx clients. Without `app=`, `init()` sets up a worker process.
Every keyword has an environment variable; see docs/sdk.md.
"""

from __future__ import annotations

import atexit
import threading
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import structlog
from opentelemetry import trace
from prometheus_client import Counter, Gauge, disable_created_metrics
from structlog._config import BoundLoggerLazyProxy

from lookout.sdk import _httpx
from lookout.sdk._asgi import LookoutMiddleware, RouteResolver
from lookout.sdk._guard import guard, warn_once
from lookout.sdk._metrics import DEFAULT_BUCKETS, ExemplarHistogram, MetricRegistry
from lookout.sdk._runtime import TRACER_NAME, Runtime
from lookout.sdk._settings import resolve

__all__ = [
    "DEFAULT_BUCKETS",
    "bind",
    "counter",
    "gauge",
    "get_logger",
    "histogram",
    "init",
    "metrics_url",
    "shutdown",
    "tracer",
    "unbind",
]

_lock = threading.RLock()
_runtime: Runtime | None = None
_metrics: MetricRegistry | None = None


def _metric_registry() -> MetricRegistry:
    global _metrics  # noqa: PLW0603 - the process's one registry
    with _lock:
        if _metrics is None:
            _metrics = MetricRegistry()
        return _metrics


def _current_runtime() -> Runtime | None:
    return _runtime


def init(
    service: str | None = None,
    *,
    app: Any = None,
    version: str | None = None,
    environment: str | None = None,
    resource_attributes: Mapping[str, str] | None = None,
    log_level: str | None = None,
    debug_environments: Sequence[str] | None = None,
    access_log: bool | None = None,
    metrics_addr: str | None = None,
    metrics_on_app: bool | None = None,
    excluded_paths: Iterable[str] | None = None,
    propagate_to: Iterable[str] | None = None,
    trust_inbound_context: bool | None = None,
    route_resolver: RouteResolver | None = None,
    buckets: Mapping[str, Sequence[float]] | None = None,
    sampler: str | None = None,
    otlp_endpoint: str | None = None,
    traces_exporter: str | None = None,
    framework_spans: bool | None = None,
    sdk_disabled: bool | None = None,
    environ: Mapping[str, str] | None = None,
) -> Any:
    """Instrument this process once; with `app=`, return the instrumented ASGI app.

    Every keyword overrides the matching environment variable (docs/sdk.md lists them);
    `buckets` maps a histogram name to its bucket bounds in seconds; `environ` replaces
    `os.environ` as the source of variables (tests use it).
    """
    global _runtime  # noqa: PLW0603 - one runtime per process
    settings = resolve(
        environ,
        service=service,
        version=version,
        environment=environment,
        resource_attributes=resource_attributes,
        log_level=log_level,
        debug_environments=debug_environments,
        access_log=access_log,
        metrics_addr=metrics_addr,
        metrics_on_app=metrics_on_app,
        excluded_paths=tuple(excluded_paths) if excluded_paths is not None else None,
        propagate_to=tuple(propagate_to) if propagate_to is not None else None,
        trust_inbound_context=trust_inbound_context,
        sampler=sampler,
        otlp_endpoint=otlp_endpoint,
        traces_exporter=traces_exporter,
        framework_spans=framework_spans,
        sdk_disabled=sdk_disabled,
    )
    disable_created_metrics()  # type: ignore[no-untyped-call] # `_created` series double the series count for no use here
    with _lock:
        if _runtime is not None:
            warn_once("init-twice", "lookout.sdk: init() called again; replacing the setup.")
            _runtime.shutdown()
        runtime = Runtime(settings, _metric_registry(), dict(buckets or {}))
        runtime.start()
        _runtime = runtime
        _register_exit_flush()
    _httpx.install(_current_runtime)
    get_logger("lookout.sdk").info(
        "lookout_sdk_started",
        version=settings.version,
        environment=settings.environment,
        metrics_url=runtime.metrics_url,
        traces_endpoint=settings.traces.endpoint if runtime.exporting_traces else None,
    )
    if app is None:
        return None
    if not settings.framework_spans:
        _quiet_fastapi(app)
    return LookoutMiddleware(app, runtime, route_resolver)


_EXIT_FLUSH_S = 3.0
_exit_registered = False


def _register_exit_flush() -> None:
    """Flush at interpreter exit, bounded so that a dead backend cannot stall a SIGTERM."""
    global _exit_registered  # noqa: PLW0603 - registered once per process
    if not _exit_registered:
        atexit.register(shutdown, _EXIT_FLUSH_S)
        _exit_registered = True


def _quiet_fastapi(app: Any) -> None:
    """Turn off FastAPI's own telemetry: the SDK's server span and metrics replace it."""
    config = getattr(app, "_telemetry", None)
    if isinstance(config, dict):
        with guard("fastapi telemetry"):
            config.update(tracing=False, metrics=False, logs=False, operation_spans=False)


def shutdown(timeout_s: float = 5.0) -> None:
    """Flush buffered spans (waiting at most `timeout_s`) and stop the SDK."""
    global _runtime
    with _lock:
        runtime, _runtime = _runtime, None
    if runtime is not None:
        runtime.shutdown(timeout_s)


def metrics_url() -> str | None:
    """Where the metrics listener serves `/metrics`, or None when it is off."""
    return None if _runtime is None else _runtime.metrics_url


def get_logger(name: str | None = None, **initial: Any) -> Any:
    """A structlog logger whose lines carry `logger=name` and the `initial` fields."""
    if name is not None:
        initial["logger"] = name
    # A lazy proxy: it resolves the configuration at each call, so a module-level
    # logger created before init() still logs through the SDK's pipeline.
    # (`logger` cannot go through structlog.get_logger(): it is a parameter name there.)
    return BoundLoggerLazyProxy(None, initial_values=initial, logger_factory_args=())


def bind(**fields: Any) -> None:
    """Add fields (user_id, payment_id ...) to every log line of the current request or task."""
    structlog.contextvars.bind_contextvars(**fields)


def unbind(*keys: str) -> None:
    """Remove fields added with `bind()`."""
    structlog.contextvars.unbind_contextvars(*keys)


def tracer(name: str = TRACER_NAME) -> trace.Tracer:
    """A tracer on the SDK's provider, for spans of your own."""
    return trace.get_tracer(name)


def counter(name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
    """Declare a business counter, such as `tickets_sold_total` (idempotent by name)."""
    return _metric_registry().counter(name, documentation, labelnames)


def gauge(name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
    """Declare a business gauge, such as `active_buses` (idempotent by name)."""
    return _metric_registry().gauge(name, documentation, labelnames)


def histogram(
    name: str,
    documentation: str,
    labelnames: Sequence[str] = (),
    buckets: Iterable[float] = DEFAULT_BUCKETS,
) -> ExemplarHistogram:
    """Declare a business histogram; observations in a sampled span carry an exemplar."""
    return _metric_registry().histogram(name, documentation, labelnames, buckets)
