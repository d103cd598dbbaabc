"""Prometheus metrics: the RED families, build info, business metrics and the listener.

Names are public API (docs/metrics.md holds the frozen table; a test compares it with
what the registry exposes). Service identity comes from the scrape's `job` and
`instance`, so no series carries a service label.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterable, Iterator, Sequence
from typing import Any
from wsgiref.simple_server import WSGIServer

from opentelemetry import trace
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from lookout.errors import ConfigError
from lookout.sdk._guard import warn_once

DEFAULT_BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 30.0, 60.0,
)  # fmt: skip
UNMATCHED_ROUTE = "unmatched"


def exemplar_for_current_span() -> dict[str, str] | None:
    """`{"trace_id": ...}` when a sampled span is current, else None."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid and span_context.trace_flags.sampled:
        return {"trace_id": format(span_context.trace_id, "032x")}
    return None


class ExemplarHistogram(Histogram):
    """A Histogram whose observations inside a sampled span carry the trace id."""

    def observe(self, amount: float, exemplar: dict[str, str] | None = None) -> None:
        super().observe(amount, exemplar or exemplar_for_current_span())


class MetricRegistry:
    """The registry metrics are declared on, with idempotent declaration by name."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self._declared: dict[str, tuple[type, tuple[str, ...], Any]] = {}
        self._collectors: dict[str, tuple[Any, tuple[tuple[str, str, tuple[str, ...]], ...]]] = {}
        self._lock = threading.Lock()
        if registry is not REGISTRY:
            # The default registry has the process_* collectors already; a fresh one needs them.
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    def declare(
        self,
        kind: type,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        **kwargs: Any,
    ) -> Any:
        """Create a metric, or return the one already declared with the same shape."""
        labels = tuple(labelnames)
        with self._lock:
            existing = self._declared.get(name)
            if existing is not None:
                if existing[0] is not kind or existing[1] != labels:
                    raise ConfigError(
                        f"metric {name}",
                        f"{kind.__name__}{list(labels)}",
                        f"the same type and labels as its first declaration, "
                        f"{existing[0].__name__}{list(existing[1])}",
                    )
                return existing[2]
            metric = kind(name, documentation, labels, registry=self.registry, **kwargs)
            self._declared[name] = (kind, labels, metric)
            return metric

    def collector(
        self, key: str, collector: Any, families: Sequence[tuple[str, str, tuple[str, ...]]]
    ) -> Any:
        """Register a custom collector once; `families` describes what it exposes."""
        with self._lock:
            existing = self._collectors.get(key)
            if existing is not None:
                return existing[0]
            self.registry.register(collector)
            self._collectors[key] = (collector, tuple(families))
            return collector

    def declared(self) -> list[tuple[str, str, tuple[str, ...]]]:
        """(exposed name, type, label names) of every metric declared here."""
        kinds: dict[type, str] = {
            Counter: "counter",
            Gauge: "gauge",
            ExemplarHistogram: "histogram",
        }
        out = []
        for name, (kind, labels, _) in sorted(self._declared.items()):
            exposed = f"{name}_total" if kind is Counter and not name.endswith("_total") else name
            out.append((exposed, kinds.get(kind, kind.__name__.lower()), labels))
        for _, families in self._collectors.values():
            out.extend(families)
        return sorted(out)

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        metric: Counter = self.declare(Counter, name, documentation, labelnames)
        return metric

    def gauge(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        multiprocess_mode: str = "all",
    ) -> Gauge:
        """A gauge; `multiprocess_mode` says how workers' values combine (prometheus_client's
        modes: `all` keeps one series per pid, `livesum` adds live workers up ...)."""
        metric: Gauge = self.declare(
            Gauge, name, documentation, labelnames, multiprocess_mode=multiprocess_mode
        )
        return metric

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Iterable[float] = DEFAULT_BUCKETS,
    ) -> ExemplarHistogram:
        metric: ExemplarHistogram = self.declare(
            ExemplarHistogram, name, documentation, labelnames, buckets=tuple(buckets)
        )
        return metric


class PoolCollector:
    """Connection pool gauges, read from each instrumented pool at scrape time."""

    FAMILIES = (
        ("db_client_connection_count", "gauge", ("pool_name", "state")),
        ("db_client_connection_max", "gauge", ("pool_name",)),
    )

    def __init__(self) -> None:
        self._pools: weakref.WeakSet[Any] = weakref.WeakSet()

    def add(self, pool: Any) -> None:
        """`pool` has `pool_name` and `pool_state() -> (used, idle, max or None)`."""
        self._pools.add(pool)

    def collect(self) -> Iterator[Metric]:
        count = GaugeMetricFamily(
            "db_client_connection_count",
            "Connections in the pool, by state (used or idle).",
            labels=["pool_name", "state"],
        )
        limit = GaugeMetricFamily(
            "db_client_connection_max",
            "The most connections the pool opens.",
            labels=["pool_name"],
        )
        for pool in list(self._pools):
            try:
                used, idle, most = pool.pool_state()
            except Exception as exc:  # noqa: BLE001 - a broken pool must not break the scrape
                warn_once("pool metrics", "lookout.sdk: reading pool %s failed: %r", pool, exc)
                continue
            count.add_metric([pool.pool_name, "used"], used)
            count.add_metric([pool.pool_name, "idle"], idle)
            if most is not None:
                limit.add_metric([pool.pool_name], most)
        yield count
        yield limit


class Instruments:
    """The SDK's own metric families, declared once per registry."""

    def __init__(self, metrics: MetricRegistry, buckets: dict[str, Sequence[float]]) -> None:
        def buckets_for(name: str) -> Sequence[float]:
            return buckets.get(name, DEFAULT_BUCKETS)

        self.server_duration = metrics.histogram(
            "http_server_request_duration_seconds",
            "Duration of HTTP server requests.",
            ("http_request_method", "http_route", "http_response_status_code", "error_type"),
            buckets_for("http_server_request_duration_seconds"),
        )
        self.server_active = metrics.gauge(
            "http_server_active_requests",
            "Number of active HTTP server requests.",
            ("http_request_method",),
            multiprocess_mode="livesum",
        )
        self.client_duration = metrics.histogram(
            "http_client_request_duration_seconds",
            "Duration of HTTP client requests.",
            ("http_request_method", "server_address", "http_response_status_code", "error_type"),
            buckets_for("http_client_request_duration_seconds"),
        )
        self.build_info = metrics.gauge(
            "lookout_build_info",
            "Always 1; its labels name the running version and environment.",
            ("version", "environment"),
            multiprocess_mode="max",
        )
        self.db_duration = metrics.histogram(
            "db_client_operation_duration_seconds",
            "Duration of database statements.",
            ("db_system_name", "db_operation_name", "error_type"),
            buckets_for("db_client_operation_duration_seconds"),
        )
        self.db_pending = metrics.gauge(
            "db_client_connection_pending_requests",
            "Checkouts waiting for a connection from the pool.",
            ("pool_name",),
            multiprocess_mode="livesum",
        )
        self.db_wait = metrics.histogram(
            "db_client_connection_wait_time_seconds",
            "Time a checkout waited for a connection.",
            ("pool_name",),
            buckets_for("db_client_connection_wait_time_seconds"),
        )
        self.messages_sent = metrics.counter(
            "messaging_client_sent_messages",
            "Messages published.",
            ("messaging_destination_name",),
        )
        self.messages_consumed = metrics.counter(
            "messaging_client_consumed_messages",
            "Messages taken from a queue for processing.",
            ("messaging_destination_name",),
        )
        self.process_duration = metrics.histogram(
            "messaging_process_duration_seconds",
            "Duration of processing one message.",
            ("messaging_destination_name", "error_type"),
            buckets_for("messaging_process_duration_seconds"),
        )
        self.pools: PoolCollector = metrics.collector(
            "pools", PoolCollector(), PoolCollector.FAMILIES
        )
        self.workers = WorkerProcessGauges() if multiprocess_dir() else None
        self.dropped = metrics.counter(
            "lookout_sdk_dropped",
            "Telemetry the SDK dropped instead of blocking or failing its host.",
            ("signal", "reason"),
        )


def multiprocess_dir() -> str | None:
    """PROMETHEUS_MULTIPROC_DIR when set: metrics then live in files shared by workers."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def exposition_registry(metrics: MetricRegistry, pools: PoolCollector) -> CollectorRegistry:
    """What a scrape sees: this process's registry, or every worker's files aggregated."""
    if multiprocess_dir() is None:
        return metrics.registry
    from prometheus_client import multiprocess

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
    registry.register(pools)
    return registry


class WorkerProcessGauges:
    """With several workers, each one's CPU and memory, as series labelled by `pid`.

    The process_* collector reports only the process that answers the scrape, so each
    worker writes its own values to the shared files every few seconds.
    """

    def __init__(self) -> None:
        # Not registered: in multiprocess mode values live in the files, and the names
        # would clash with the process collector of the default registry.
        self.cpu = Gauge(
            "process_cpu_seconds_total",
            "CPU time of each worker process.",
            registry=None,
            multiprocess_mode="liveall",
        )
        self.rss = Gauge(
            "process_resident_memory_bytes",
            "Resident memory of each worker process.",
            registry=None,
            multiprocess_mode="liveall",
        )
        self._stop = threading.Event()

    def update(self) -> None:
        for family in ProcessCollector(registry=None).collect():
            for sample in family.samples:
                if sample.name == "process_cpu_seconds_total":
                    self.cpu.set(sample.value)
                elif sample.name == "process_resident_memory_bytes":
                    self.rss.set(sample.value)

    def start(self, interval_s: float = 2.0) -> None:
        def run() -> None:
            while not self._stop.wait(interval_s):
                self.update()

        self.update()
        threading.Thread(target=run, name="lookout-worker-metrics", daemon=True).start()
        os.register_at_fork(after_in_child=lambda: self.start(interval_s))

    def stop(self) -> None:
        self._stop.set()


def start_listener(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve `registry` on its own thread; Prometheus text or OpenMetrics by Accept."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
