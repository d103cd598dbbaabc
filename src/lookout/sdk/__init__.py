"""`lookout.sdk`: one call instruments a service.

    app = lookout.sdk.init(service="ticketing", app=app)

gives JSON logs carrying `trace_id`, RED and business metrics for Prometheus,
OpenTelemetry traces with W3C `traceparent` and `X-Trace-Id` propagation, and
instrumented httpx clients. Without `app=`, `init()` sets up a worker process.
Every keyword has an environment variable; see docs/sdk.md.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
from collections.abc import Iterable, Iterator, Mapping, MutableMapping, Sequence
from typing import Any

import structlog
from opentelemetry import trace
from prometheus_client import Counter, Gauge, disable_created_metrics
from structlog._config import BoundLoggerLazyProxy

from lookout.sdk import _errors, _httpx, _messaging, _sqlalchemy
from lookout.sdk._asgi import LookoutMiddleware, RouteResolver
from lookout.sdk._guard import guard, warn_once
from lookout.sdk._metrics import DEFAULT_BUCKETS, ExemplarHistogram, MetricRegistry
from lookout.sdk._runtime import TRACER_NAME, Runtime
from lookout.sdk._settings import resolve

__all__ = [
    "DEFAULT_BUCKETS",
    "bind",
    "capture_exception",
    "counter",
    "gauge",
    "get_logger",
    "histogram",
    "init",
    "instrument_sqlalchemy",
    "job_run",
    "metrics_url",
    "processing",
    "publishing",
    "set_user",
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
    dsn: str | None = None,
    scrub: bool | None = None,
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
        dsn=dsn,
        scrub=scrub,
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
    _messaging.install_aio_pika(_current_runtime)
    get_logger("lookout.sdk").info(
        "lookout_sdk_started",
        version=settings.version,
        environment=settings.environment,
        metrics_url=runtime.metrics_url,
        traces_endpoint=settings.traces.endpoint if runtime.exporting_traces else None,
    )
    if app is None:
        _flush_on_sigterm()
        return None
    if not settings.framework_spans:
        _quiet_fastapi(app)
    return LookoutMiddleware(app, runtime, route_resolver, _flush_at_exit)


_EXIT_FLUSH_S = 2.0
_exit_registered = False


def _flush_at_exit() -> None:
    shutdown(_EXIT_FLUSH_S)


def _flush_on_sigterm() -> None:
    """In a worker process that left SIGTERM at its default (die at once), flush first.

    Only the main thread can set handlers, and a handler the host installed is left alone.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def on_sigterm(signum: int, _: Any) -> None:
        shutdown(_EXIT_FLUSH_S)
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    with guard("SIGTERM handler"):
        signal.signal(signal.SIGTERM, on_sigterm)


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


def gauge(
    name: str, documentation: str, labelnames: Sequence[str] = (), multiprocess_mode: str = "all"
) -> Gauge:
    """Declare a business gauge, such as `active_buses` (idempotent by name).

    With several workers (PROMETHEUS_MULTIPROC_DIR), `multiprocess_mode` says how their
    values combine: `all` (a series per pid), `livesum`, `max`, `mostrecent` ..."""
    return _metric_registry().gauge(name, documentation, labelnames, multiprocess_mode)


def histogram(
    name: str,
    documentation: str,
    labelnames: Sequence[str] = (),
    buckets: Iterable[float] = DEFAULT_BUCKETS,
) -> ExemplarHistogram:
    """Declare a business histogram; observations in a sampled span carry an exemplar."""
    return _metric_registry().histogram(name, documentation, labelnames, buckets)


def capture_exception(exc: BaseException) -> None:
    """Send an error event for `exc` (a worker loop's failure, say), linked to its trace.

    Unhandled exceptions in requests, threads, asyncio tasks and `processing()` blocks are
    captured already; this is for errors you handle yourself but still want to see.
    """
    with guard("capture_exception"):
        _errors.capture(exc)


@contextlib.contextmanager
def job_run(job: str, *, interval_minutes: int | None = None) -> Iterator[None]:
    """Around one run of a scheduled job: a check-in when it starts, then `ok` or `error`
    with its duration, so a failed or missed run can alert. An exception in the block
    propagates. `interval_minutes` tells the server how often the job should run."""
    with _errors.job_run(job, interval_minutes):
        yield


def set_user(id: str | int | None = None, **fields: Any) -> None:
    """Name the user of the current request or task: error events carry it, and log lines
    carry `user_id`. Extra fields (`username`, `segment` ...) go to error events only."""
    with guard("set_user"):
        if id is not None:
            bind(user_id=str(id))
        _errors.set_user({**fields, **({"id": str(id)} if id is not None else {})})


def instrument_sqlalchemy(engine: Any, *, pool_name: str | None = None) -> Any:
    """Trace and measure every statement of a sync or async SQLAlchemy engine, and export
    its pool's state; returns the engine. Call after `init()`."""
    runtime = _runtime
    if runtime is None:
        warn_once("sqlalchemy-before-init", "lookout.sdk: instrument_sqlalchemy() before init()")
        return engine
    with guard("instrument_sqlalchemy"):
        _sqlalchemy.instrument(runtime, engine, pool_name)
    return engine


@contextlib.contextmanager
def publishing(
    destination: str, headers: MutableMapping[str, Any], *, system: str = "custom"
) -> Iterator[trace.Span]:
    """Wrap the sending of one message to `destination`: a PRODUCER span, the context
    written into `headers` (send them with the message), and the sent-messages count."""
    runtime = _runtime
    if runtime is None:
        yield trace.INVALID_SPAN
        return
    with _messaging.publishing(runtime, destination, headers, system) as span:
        yield span


@contextlib.contextmanager
def processing(
    destination: str, headers: Mapping[str, Any] | None, *, system: str = "custom"
) -> Iterator[trace.Span]:
    """Wrap the handling of one message from `destination`: a CONSUMER span continuing the
    producer's trace from `headers`, the consumed count, the processing duration, and an
    error event if the block raises (the exception propagates)."""
    runtime = _runtime
    if runtime is None:
        yield trace.INVALID_SPAN
        return
    with _messaging.processing(runtime, destination, headers, system) as span:
        yield span
