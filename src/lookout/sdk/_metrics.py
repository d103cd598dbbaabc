"""Prometheus metrics: the RED families, build info, business metrics and the listener.

Names are public API (docs/metrics.md holds the frozen table; a test compares it with
what the registry exposes). Service identity comes from the scrape's `job` and
`instance`, so no series carries a service label.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Sequence
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
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

from lookout.errors import ConfigError

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
        return out

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        metric: Counter = self.declare(Counter, name, documentation, labelnames)
        return metric

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        metric: Gauge = self.declare(Gauge, name, documentation, labelnames)
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
        )
        self.dropped = metrics.counter(
            "lookout_sdk_dropped",
            "Telemetry the SDK dropped instead of blocking or failing its host.",
            ("signal", "reason"),
        )


def start_listener(registry: CollectorRegistry, host: str, port: int) -> WSGIServer:
    """Serve `registry` on its own thread; Prometheus text or OpenMetrics by Accept."""
    from prometheus_client import start_http_server

    server, _thread = start_http_server(port, addr=host, registry=registry)
    return server
