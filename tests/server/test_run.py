"""`lookout server` as a process: two ports, health, shutdown, and self-observation."""

from __future__ import annotations

import json
import time
from pathlib import Path

import duckdb
import httpx

from lookout.store import SCHEMA_VERSION
from tests.server.conftest import RunningServer, start_server
from tests.support import wait_until

SPAN = {
    "resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "svc"}}]},
        "scopeSpans": [{"spans": [{
            "traceId": "ab" * 16, "spanId": "cd" * 8, "name": "op", "kind": 1,
            "startTimeUnixNano": str(time.time_ns()), "endTimeUnixNano": str(time.time_ns()),
        }]}],
    }]
}  # fmt: skip


def test_the_main_port_serves_everything_and_the_otlp_port_only_v1(server: RunningServer) -> None:
    assert httpx.get(f"{server.url}/healthz", timeout=5).text == "ok"
    assert httpx.get(f"{server.url}/readyz", timeout=5).json() == {"status": "ready"}
    for base in (server.url, server.otlp_url):
        response = httpx.post(f"{base}/v1/traces", json=SPAN, timeout=5)
        assert response.status_code == 200, base
    assert httpx.get(f"{server.otlp_url}/api/lookout/logs", timeout=5).status_code == 404
    assert httpx.get(f"{server.otlp_url}/healthz", timeout=5).status_code == 404
    assert httpx.get(f"{server.url}/api/lookout/traces/{'ab' * 16}", timeout=5).status_code == 200


def test_one_sigterm_stops_both_ports_and_the_data_survives(tmp_path: Path) -> None:
    running = start_server(tmp_path / "data")
    httpx.post(f"{running.url}/v1/traces", json=SPAN, timeout=5).raise_for_status()
    assert running.stop() == 0
    for url in (running.url, running.otlp_url):
        try:
            httpx.get(f"{url}/healthz", timeout=1)
            raise AssertionError(f"{url} still answers")
        except httpx.TransportError:
            pass
    with duckdb.connect(str(tmp_path / "data" / "lookout.duckdb"), read_only=True) as connection:
        assert connection.execute("SELECT count(*) FROM spans").fetchone() == (1,)


def _self_samples(url: str) -> list[int]:
    """Samples per self-observation tick, from the server's own series. The window ends a
    few seconds ago: series are read one after another, so a tick committed during the
    reading would show in some series and not in others."""
    series = httpx.get(
        f"{url}/api/lookout/series",
        params={"match": '{job="lookout"}', "limit": "1000", "end": str(time.time() - 3)},
        timeout=10,
    ).json()["series"]
    per_tick: dict[int, int] = {}
    for item in series:
        for sample in item["samples"]:
            per_tick[sample["ts_ms"]] = per_tick.get(sample["ts_ms"], 0) + 1
    return [per_tick[t] for t in sorted(per_tick)]


def test_an_idle_server_observes_itself_at_a_constant_rate(tmp_path: Path) -> None:
    """30 ticks idle (0.5 s apart): after the first ticks settle, every tick writes the
    same number of samples (no feedback loop through its own ingest)."""
    running = start_server(tmp_path / "data", env={"LOOKOUT_SELF_OBSERVE_INTERVAL": "0.5"})
    try:
        time.sleep(18)
        counts = _self_samples(running.url)
        assert len(counts) >= 24, counts
        settled = counts[3:]
        assert len(set(settled)) == 1, counts
        spans = httpx.get(
            f"{running.url}/api/lookout/traces", params={"service": "lookout"}, timeout=10
        ).json()
        assert spans["traces"] == [], "ingest spans are off by default"
    finally:
        running.stop()


def test_ingest_spans_when_on_go_straight_to_the_store(tmp_path: Path) -> None:
    running = start_server(tmp_path / "data", env={"LOOKOUT_TRACE_INGEST": "true"})
    try:
        httpx.post(f"{running.url}/v1/traces", json=SPAN, timeout=5).raise_for_status()
        traces = wait_until(
            lambda: httpx.get(
                f"{running.url}/api/lookout/traces", params={"service": "lookout"}, timeout=5
            ).json()["traces"],
            10,
            "the server's own ingest span",
        )
        assert traces[0]["root_name"] == "POST /v1/traces"
        requests = [
            json.loads(line) for line in running.lines if line.startswith("{") and "POST" in line
        ]
        assert requests == [], "nothing went out over the wire to itself"
    finally:
        running.stop()


def test_a_store_from_a_newer_version_stops_startup_with_both_versions(tmp_path: Path) -> None:
    running = start_server(tmp_path / "data")
    running.stop()
    with duckdb.connect(str(tmp_path / "data" / "lookout.duckdb")) as connection:
        connection.execute("INSERT INTO schema_version VALUES (42, 0)")
    import subprocess
    import sys

    from tests.support import ROOT, free_port

    result = subprocess.run(
        [sys.executable, "-m", "lookout", "server", "--data-dir", str(tmp_path / "data"),
         "--port", str(free_port()), "--otlp-port", str(free_port())],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 1
    assert f"schema version 42, newer than this lookout's {SCHEMA_VERSION}" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_running_server_scrapes_its_configured_targets(tmp_path: Path) -> None:
    from prometheus_client import CollectorRegistry, Gauge, start_http_server

    from tests.support import free_port, wait_until

    registry = CollectorRegistry()
    Gauge("active_buses", "Buses.", registry=registry).set(12)
    port = free_port()
    target, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    jobs = [{"job_name": "fleet", "scrape_interval": "1s",
             "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}]  # fmt: skip
    running = start_server(tmp_path / "data", env={"LOOKOUT_SCRAPE_CONFIGS": json.dumps(jobs)})
    try:

        def scraped() -> list[dict[str, object]]:
            return list(httpx.get(f"{running.url}/api/lookout/series",
                                  params={"match": 'active_buses{job="fleet"}'}, timeout=5).json()["series"])  # fmt: skip

        (series,) = wait_until(scraped, 15, "the target's series")
        assert series["labels"]["instance"] == f"127.0.0.1:{port}"
        view = httpx.get(f"{running.url}/api/v1/targets", timeout=5).json()
        (active,) = view["data"]["activeTargets"]
        assert (active["health"], active["scrapePool"], active["scrapeUrl"]) == (
            "up",
            "fleet",
            f"http://127.0.0.1:{port}/metrics",
        )
    finally:
        running.stop()
        target.shutdown()
        target.server_close()
