"""Metric names are public API: the frozen table, buckets, exemplars, exposition."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

import lookout.sdk
from lookout.errors import ConfigError
from lookout.sdk._metrics import DEFAULT_BUCKETS
from tests.sdk.conftest import Instrument

DOC = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
ROW = re.compile(r"^\| `(?P<name>[a-z_:]+)` \| (?P<type>\w+) \|(?P<labels>[^|]*)\|")


def documented_table() -> set[tuple[str, str, tuple[str, ...]]]:
    rows = set()
    sdk_part = DOC.read_text().split("## Derived by the server", 1)[0]
    for line in sdk_part.splitlines():
        match = ROW.match(line)
        if match:
            labels = tuple(re.findall(r"`([a-z_]+)`", match["labels"]))
            rows.add((match["name"], match["type"], labels))
    return rows


def exposed_table(registry: CollectorRegistry) -> set[tuple[str, str, tuple[str, ...]]]:
    """Every family the registry exposes, with label names from the SDK's declarations
    (empty families have no samples to read them from) or from the samples."""
    metrics = lookout.sdk._metric_registry()
    declared = {name: (kind, labels) for name, kind, labels in metrics.declared()}
    rows = set()
    for family in registry.collect():
        exposed = f"{family.name}_total" if family.type == "counter" else family.name
        if exposed in declared:
            kind, labels = declared[exposed]
            rows.add((exposed, kind, labels))
            continue
        names: list[str] = []
        for sample in family.samples:
            names += [key for key in sample.labels if key not in names and key != "le"]
        rows.add((exposed, family.type, tuple(sorted(names))))
    return rows


def test_registry_matches_the_frozen_table_in_docs(registry: CollectorRegistry) -> None:
    lookout.sdk.init("svc", metrics_addr="off", traces_exporter="none", environ={})
    assert exposed_table(registry) == documented_table()


def test_negative_control_an_extra_metric_breaks_the_table(registry: CollectorRegistry) -> None:
    lookout.sdk.init("svc", metrics_addr="off", traces_exporter="none", environ={})
    lookout.sdk.counter("undocumented_total", "Not in the table.")
    assert exposed_table(registry) != documented_table()


def test_default_buckets_are_the_documented_ones() -> None:
    assert DEFAULT_BUCKETS == (
        0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10, 30, 60,
    )  # fmt: skip


def _bucket_bounds(registry: CollectorRegistry, family: str) -> list[str]:
    return sorted(
        {
            s.labels["le"]
            for m in registry.collect()
            if m.name == family
            for s in m.samples
            if s.name.endswith("_bucket")
        },
        key=float,
    )


def test_buckets_can_be_overridden_per_metric(instrument: Instrument) -> None:
    target = instrument(_ok_app, buckets={"http_server_request_duration_seconds": [0.2, 1.0]})

    async def call() -> None:
        async with target.client() as client:
            await client.get("/")

    asyncio.run(call())
    assert _bucket_bounds(target.registry, "http_server_request_duration_seconds") == [
        "0.2",
        "1.0",
        "+Inf",
    ]


async def _ok_app(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b""})


def test_listener_serves_text_and_openmetrics_with_exemplars(registry: CollectorRegistry) -> None:
    app = lookout.sdk.init("svc", app=_ok_app, traces_exporter="none", environ={})
    url = lookout.sdk.metrics_url()
    assert url is not None
    assert re.fullmatch(r"http://127\.0\.0\.1:\d+/metrics", url)

    async def call() -> str:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return (await client.get("/")).headers["x-trace-id"]

    trace_id = asyncio.run(call())
    text = httpx.get(url, timeout=5)
    openmetrics = httpx.get(
        url, headers={"accept": "application/openmetrics-text; version=1.0.0"}, timeout=5
    )
    assert text.headers["content-type"].startswith("text/plain")
    assert "# EOF" not in text.text
    assert "trace_id" not in text.text
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.endswith("# EOF\n")
    assert f'# {{trace_id="{trace_id}"}}' in openmetrics.text
    assert 'lookout_build_info{environment="production",version="unknown"} 1.0' in text.text
    assert "process_start_time_seconds " in text.text


def test_no_exemplar_outside_a_sampled_span(instrument: Instrument) -> None:
    target = instrument(_ok_app, sampler="always_off")

    async def call() -> None:
        async with target.client() as client:
            await client.get("/")

    asyncio.run(call())
    from prometheus_client.openmetrics.exposition import generate_latest

    assert b"trace_id" not in generate_latest(target.registry)


def test_build_info_carries_version_and_environment(registry: CollectorRegistry) -> None:
    lookout.sdk.init(
        "svc", metrics_addr="off", environ={"SENTRY_RELEASE": "2.4.1"}, environment="staging"
    )
    assert (
        registry.get_sample_value(
            "lookout_build_info", {"version": "2.4.1", "environment": "staging"}
        )
        == 1.0
    )


def test_metrics_listener_binds_the_configured_address(registry: CollectorRegistry) -> None:
    lookout.sdk.init("svc", environ={"LOOKOUT_METRICS_ADDR": "127.0.0.1:0"})
    url = lookout.sdk.metrics_url()
    assert url is not None
    assert httpx.get(url, timeout=5).status_code == 200


def test_metrics_listener_can_be_off(registry: CollectorRegistry) -> None:
    lookout.sdk.init("svc", environ={"LOOKOUT_METRICS_ADDR": "off"})
    assert lookout.sdk.metrics_url() is None


def test_business_metrics_declared_through_the_sdk(registry: CollectorRegistry) -> None:
    sold = lookout.sdk.counter("tickets_sold_total", "Tickets sold.", ["route"])
    buses = lookout.sdk.gauge("active_buses", "Buses reporting.")
    fare = lookout.sdk.histogram("ticket_fare_kes", "Fare.", ["route"], buckets=[100, 1000])
    lookout.sdk.init("svc", metrics_addr="off", environ={})
    sold.labels(route="nbo-mba").inc()
    buses.set(12)
    with lookout.sdk.tracer().start_as_current_span("sale"):
        fare.labels(route="nbo-mba").observe(1500)
    assert registry.get_sample_value("tickets_sold_total", {"route": "nbo-mba"}) == 1.0
    assert registry.get_sample_value("active_buses") == 12.0
    assert (
        registry.get_sample_value("ticket_fare_kes_bucket", {"route": "nbo-mba", "le": "+Inf"})
        == 1.0
    )
    from prometheus_client.openmetrics.exposition import generate_latest

    assert b'ticket_fare_kes_bucket{le="+Inf",route="nbo-mba"} 1.0 # {trace_id=' in (
        generate_latest(registry)
    )


def test_declaring_the_same_metric_twice_returns_the_first(registry: CollectorRegistry) -> None:
    first = lookout.sdk.counter("orders_total", "Orders.", ["kind"])
    assert lookout.sdk.counter("orders_total", "Orders.", ["kind"]) is first


def test_a_conflicting_declaration_is_a_config_error(registry: CollectorRegistry) -> None:
    lookout.sdk.counter("orders_total", "Orders.", ["kind"])
    with pytest.raises(ConfigError, match="orders_total"):
        lookout.sdk.gauge("orders_total", "Orders.", ["kind"])


def test_no_series_carries_a_service_label(instrument: Instrument) -> None:
    target = instrument(_ok_app)

    async def call() -> None:
        async with target.client() as client:
            await client.get("/")

    asyncio.run(call())
    labels = {k for m in target.registry.collect() for s in m.samples for k in s.labels}
    assert "service" not in labels
    assert "job" not in labels
