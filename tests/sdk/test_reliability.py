"""The SDK never hurts its host: faults, bounded memory, shutdown, several workers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.sdk.apps.faults import CASES
from tests.support import ROOT, free_port, http_peer, uvicorn_app, wait_until


def run_fault(
    case: str, requests: int, *, stdout: Any, env: dict[str, str] | None = None
) -> dict[str, Any]:
    process = subprocess.Popen(
        [sys.executable, "-m", "tests.sdk.apps.faults", case, str(requests)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        stdout=stdout,
        stderr=subprocess.PIPE,
    )
    _, err = process.communicate(timeout=180)
    lines = [line for line in err.decode().splitlines() if line.startswith('{"case"')]
    assert lines, f"no report from {case}:\n{err.decode()[-3000:]}"
    return json.loads(lines[-1])


def _stdout_for(case: str) -> tuple[Any, Any]:
    """(what the child's stdout is, what to close after) for the stdout cases."""
    if case == "stdout_closed":
        read_end, write_end = os.pipe()
        os.close(read_end)  # every write now fails with EPIPE
        return write_end, None
    if case == "stdout_pipe_full":
        read_end, write_end = os.pipe()  # nobody reads: it fills after 64 KiB
        return write_end, read_end
    return subprocess.DEVNULL, None


@pytest.mark.parametrize("case", CASES)
def test_a_thousand_requests_under_each_fault_see_no_exception(case: str) -> None:
    """Each fault: 1,000 requests, all answered, no exception reaches the app, and each
    cause is reported at most once (the run lasts well under the 60 s window)."""
    stdout, keep_open = _stdout_for(case)
    try:
        report = run_fault(case, 1000, stdout=stdout)
    finally:
        for fd in (stdout, keep_open):
            if isinstance(fd, int) and fd >= 0:
                os.close(fd)
    assert report["exceptions"] == 0
    assert report["statuses"] == {"200": 1000}
    assert all(count <= 1 for count in report["plumbing"].values()), report["plumbing"]
    assert report["shutdown_seconds"] < 10


@contextmanager
def stdout_nobody_reads() -> Iterator[int]:
    """The write end of a pipe whose reader never reads: it fills after 64 KiB."""
    read_end, write_end = os.pipe()
    try:
        yield write_end
    finally:
        os.close(write_end)
        os.close(read_end)


def test_drops_are_counted_by_reason() -> None:
    with stdout_nobody_reads() as stdout:
        report = run_fault("blackholed", 20_000, stdout=stdout)
    assert report["dropped"].get("logs/queue_full", 0) > 0, report["dropped"]
    assert report["dropped"].get("traces/queue_full", 0) > 0, report["dropped"]


def test_memory_stays_bounded_with_every_backend_black_holed() -> None:
    """100,000 requests, OTLP and Sentry black-holed, stdout a pipe nobody reads:
    RSS grows by at most 50 MB after warm-up."""
    with stdout_nobody_reads() as stdout:
        report = run_fault("blackholed", 100_000, stdout=stdout)
    assert report["statuses"] == {"200": 100_000}
    growth_mb = (report["rss_end"] - report["rss_warm"]) / 2**20
    assert growth_mb <= 50, report


def _sigterm_and_time(process: subprocess.Popen[bytes]) -> float:
    begin = time.monotonic()
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=30)
    return time.monotonic() - begin


def test_sigterm_with_black_holed_backends_exits_within_five_seconds() -> None:
    from tests.sdk.apps.faults import blackhole

    hole = blackhole()
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": f"http://{hole}",
        "SENTRY_DSN": f"http://public@{hole}/1",
        "OTEL_BSP_SCHEDULE_DELAY": "60000",
        "CHAIN_ROLE": "internal",
        "CHAIN_THIRD_PARTY": f"http://{hole}",
    }
    with uvicorn_app("tests.sdk.apps.chain", env) as service:
        for _ in range(20):
            httpx.get(f"{service.url}/healthz", timeout=5)
            httpx.post(f"{service.url}/nope", timeout=5)
        assert _sigterm_and_time(service.process) <= 5.0


def test_clean_shutdown_delivers_every_buffered_span() -> None:
    with http_peer() as (sink, recorder):
        env = {
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
            "OTEL_BSP_SCHEDULE_DELAY": "60000",  # nothing leaves before shutdown
            "CHAIN_ROLE": "edge",
            "CHAIN_NEXT": "http://127.0.0.1:9",
        }
        with uvicorn_app("tests.sdk.apps.chain", env) as service:
            for _ in range(150):
                httpx.get(f"{service.url}/api/nothing/here", timeout=5)
            assert recorder.spans == []
            _sigterm_and_time(service.process)
        assert len(recorder.spans) == 150
        assert len({s.span_id for s in recorder.spans}) == 150


def _scrape(url: str) -> str:
    return httpx.get(url, timeout=10).text


def _sum_counts(text: str, family: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith(f"{family}_count"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def _pids(text: str, family: str) -> set[str]:
    return {
        line.split('pid="', 1)[1].split('"', 1)[0]
        for line in text.splitlines()
        if line.startswith(family + "{") and 'pid="' in line
    }


@pytest.mark.parametrize("server", ["uvicorn", "gunicorn"])
def test_two_workers_share_one_scrape_and_each_span_arrives_once(
    server: str, tmp_path: Path
) -> None:
    metrics_port = free_port()
    port = free_port()
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    with http_peer() as (sink, recorder):
        env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "PROMETHEUS_MULTIPROC_DIR": str(multiproc),
            "LOOKOUT_METRICS_ADDR": f"127.0.0.1:{metrics_port}",
            "OTEL_EXPORTER_OTLP_ENDPOINT": sink,
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "CHAIN_ROLE": "edge",
            "CHAIN_NEXT": "http://127.0.0.1:9",
        }
        app = "tests.sdk.apps.chain:app"
        command = {
            "uvicorn": [
                sys.executable, "-m", "uvicorn", app, "--workers", "2", "--port", str(port),
            ],
            "gunicorn": [
                sys.executable, "-m", "gunicorn", "--preload", "-w", "2",
                "-k", "uvicorn.workers.UvicornWorker", "-b", f"127.0.0.1:{port}", app,
            ],
        }[server]  # fmt: skip
        process = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        try:
            url = f"http://127.0.0.1:{port}"

            def up() -> bool:
                try:
                    return httpx.get(f"{url}/healthz", timeout=1).status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(up, 60, f"{server} to serve")
            # A fresh connection per request: with --workers, uvicorn's keep-alive responses
            # stall ~40 ms each on delayed ACKs (a plain app shows the same).
            fresh = httpx.Limits(max_keepalive_connections=0)
            with httpx.Client(timeout=10, limits=fresh) as client:
                for _ in range(1000):
                    assert client.get(f"{url}/api/x/y").status_code == 404
            metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
            text = wait_until(
                lambda: (
                    (t := _scrape(metrics_url))
                    and _sum_counts(t, "http_server_request_duration_seconds") == 1000
                    and t
                ),
                20,
                "one scrape summing to 1,000 requests",
            )
            assert len(_pids(text, "process_resident_memory_bytes")) >= 2
            assert len(_pids(text, "process_cpu_seconds_total")) >= 2
            spans = wait_until(
                lambda: len(recorder.spans) >= 1000 and list(recorder.spans), 30, "1,000 spans"
            )
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
    assert len(spans) == 1000
    assert len({(s.trace_id, s.span_id) for s in spans}) == 1000
