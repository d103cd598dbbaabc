"""The whole platform under its supervisor, sending everything to a real `lookout server`,
checked only through Lookout's read and Prometheus APIs: one buy journey's `X-Trace-Id`
finds spans from gateway, ticketing, payments and notifier; the provider's callback trace
links to it; the business metrics move. Here on the embedded defaults (SQLite, the
embedded queue); tests/busline/test_fault_symptoms.py runs the same journey on PostgreSQL
and RabbitMQ, with three faults.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from busline import journeys
from tests.server.conftest import DSN_KEY, RunningServer, start_server
from tests.support import ROOT, wait_until

COMPANY = ("gateway", "auth", "ticketing", "payments", "fleet", "notifier")


class Up:
    """`python -m busline up` against a server, in its own state directory."""

    def __init__(self, state: Path, server: RunningServer, process: subprocess.Popen[bytes]):
        self.state = state
        self.server = server
        self.process = process
        self.lines: list[str] = []

    def port_file(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.state / "run" / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def url(self, name: str) -> str:
        data = self.port_file(name)
        assert data is not None, name
        return f"http://{data['host']}:{data['port']}"


@contextmanager
def busline_up(tmp_path: Path, **env: str) -> Iterator[Up]:
    server = start_server(tmp_path / "store", env={"LOOKOUT_REGISTERED_SCRAPE_INTERVAL": "1"})
    state = tmp_path / "busline"
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "PYTHONUNBUFFERED": "1",
        "LOOKOUT_URL": server.url,
        "OTEL_EXPORTER_OTLP_ENDPOINT": server.url,
        "OTEL_BSP_SCHEDULE_DELAY": "300",
        "SENTRY_DSN": server.url.replace("http://", f"http://{DSN_KEY}@") + "/1",
        "LOOKOUT_ENVIRONMENT": "test",
        "LOOKOUT_SCRUB_KEY": "test-key",  # the server's (tests/server/conftest.py)
        "BUSLINE_CALLBACK_DELAY_S": "1,2",
        "BUSLINE_DECLINE_RATE": "0",
        # Callbacks settle payments here: the status-polling fallback stays out of the way.
        "BUSLINE_POLL_AFTER_S": "60",
        **env,
    }
    process = subprocess.Popen(
        # As `lookout demo` runs it: the supervisor's own lines and metrics reach Lookout.
        [
            sys.executable,
            "-m",
            "lookout",
            "run",
            "--service",
            "supervisor",
            "--scrape",
            "auto",
            "--",
            sys.executable,
            "-m",
            "busline",
            "up",
            "--state",
            str(state),
        ],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    up = Up(state, server, process)

    def drain() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            up.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    threading.Thread(target=drain, daemon=True).start()

    def ready() -> bool:
        if process.poll() is not None:
            raise AssertionError("busline up exited:\n" + "\n".join(up.lines[-40:]))
        for name in ("gateway", "auth", "ticketing", "payments", "fleet", "providers"):
            data = up.port_file(name)
            if data is None:
                return False
            try:
                httpx.get(f"{up.url(name)}/healthz", timeout=1)
            except httpx.TransportError:
                return False
        return up.port_file("notifier") is not None

    try:
        wait_until(ready, 60, "every busline service to listen")
        yield up
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(10)
        assert process.stdout is not None
        process.stdout.close()
        server.stop()


def buy_one(up: Up) -> journeys.Journey:
    async def go() -> journeys.Journey:
        rng = random.Random(7)
        async with httpx.AsyncClient() as http:
            return await journeys.buy(up.url("gateway"), http, journeys.new_customer(rng), rng)

    journey = asyncio.run(go())
    assert journey.result == "success", (journey.result, journey.error, journey.steps)
    assert journey.buy_trace_id
    return journey


def trace(server: RunningServer, trace_id: str) -> list[dict[str, Any]]:
    response = httpx.get(f"{server.url}/api/lookout/traces/{trace_id}", timeout=10)
    if response.status_code == 404:
        return []
    response.raise_for_status()
    spans: list[dict[str, Any]] = response.json()["spans"]
    return spans


def promql(server: RunningServer, query: str) -> float:
    body = httpx.get(f"{server.url}/api/v1/query", params={"query": query}, timeout=10).json()
    result = body["data"]["result"]
    return sum(float(row["value"][1]) for row in result)


def check_the_journey_through_lookout(up: Up, journey: journeys.Journey) -> None:
    server = up.server
    assert journey.buy_trace_id is not None
    trace_id = journey.buy_trace_id

    def every_service_in_the_trace() -> set[str]:
        services = {span["service"] for span in trace(server, trace_id)}
        return services if {"gateway", "payments", "ticketing", "notifier"} <= services else set()

    services = wait_until(every_service_in_the_trace, 60, "the buy trace to reach the notifier")
    assert {"gateway", "payments", "ticketing", "notifier"} <= services

    # The provider's callback arrived with no context: its own trace, linked to this one.
    spans = trace(server, trace_id)
    confirm = [s for s in spans if s["name"] == "payment.confirm"]
    assert len(confirm) == 1, "one confirmation, continuing the buy's trace"
    linked = {link["trace_id"] for link in confirm[0].get("links") or []} - {trace_id}
    assert len(linked) == 1, "the confirmation links to the callback's own trace"
    callback_trace = linked.pop()
    callback_spans = wait_until(lambda: trace(server, callback_trace), 30, "the callback trace")
    callback = [s for s in callback_spans if s["name"] == "payment.callback"]
    assert len(callback) == 1
    assert callback[0]["service"] == "payments"
    assert [link["trace_id"] for link in callback[0]["links"]] == [trace_id], (
        "the callback's span links back to the buy"
    )

    # Business metrics moved, as scraped.
    wait_until(lambda: promql(server, "sum(tickets_sold_total)") >= 1, 60, "tickets_sold_total")
    wait_until(
        lambda: promql(server, 'sum(payment_outcomes_total{result="success"})') >= 1,
        60,
        "payment_outcomes_total",
    )
    assert promql(server, 'sum(payment_revenue_total{currency="KES"})') > 0
    wait_until(
        lambda: promql(server, 'sum(notifications_sent_total{result="sent"})') >= 1,
        60,
        "notifications_sent_total",
    )
    # Every company service is scraped and up.
    for service in COMPANY:
        wait_until(lambda s=service: promql(server, f'up{{job="{s}"}}') == 1, 60, f"{service} up")


def _present(server: RunningServer, query: str) -> bool:
    body = httpx.get(f"{server.url}/api/v1/query", params={"query": query}, timeout=10).json()
    return bool(body["data"]["result"])


def sms_for(up: Up, booking_id: str) -> list[dict[str, Any]]:
    ledger = httpx.get(f"{up.url('providers')}/_sim/ledger", timeout=5).json()
    return [m for m in ledger["sms"] if booking_id in json.dumps(m)]


def test_a_buy_journey_is_followed_through_lookout_on_the_embedded_defaults(
    tmp_path: Path,
) -> None:
    with busline_up(tmp_path) as up:
        journey = buy_one(up)
        check_the_journey_through_lookout(up, journey)
        assert journey.booking_id is not None
        wait_until(lambda: sms_for(up, str(journey.booking_id)), 30, "the SMS")
        # The providers stand outside the company: nothing of theirs reaches Lookout.
        for kind in ("traces", "logs"):
            found = httpx.get(f"{up.server.url}/api/lookout/{kind}",
                              params={"service": "providers", "start": "0"}, timeout=10).json()  # fmt: skip
            assert not found[kind], found
        assert not _present(up.server, '{job="providers"}')
        # The fleet reports its buses through Lookout too.
        wait_until(lambda: promql(up.server, "sum(active_buses_count)") >= 30, 60, "the fleet")
        # Queue depth comes from the embedded broker's store, exported by the supervisor.
        depth = 'rabbitmq_queue_messages_ready{job="supervisor",queue="booking.confirmed"}'
        wait_until(lambda: _present(up.server, depth), 60, "the queue depth")


def test_a_confirmation_survives_ticketing_dying_between_commit_and_publish(
    tmp_path: Path,
) -> None:
    """The outbox: ticketing is killed right after the booking's transaction commits and
    before it publishes; the supervisor restarts it, and the SMS arrives exactly once."""
    with busline_up(tmp_path, BUSLINE_TEST_CRASH_AFTER_COMMIT="1") as up:
        before = up.port_file("ticketing")
        assert before is not None
        journey = buy_one(up)
        assert journey.booking_id is not None
        wait_until(
            lambda: (up.port_file("ticketing") or {}).get("pid") != before["pid"],
            30,
            "ticketing to be restarted",
        )
        wait_until(lambda: sms_for(up, str(journey.booking_id)), 60, "the SMS after the crash")
        assert len(sms_for(up, str(journey.booking_id))) == 1
        # Exactly one send, counted by the notifier itself (the gateway's dedup on
        # client_ref would hide a second one from the ledger).
        wait_until(
            lambda: promql(up.server, 'sum(notifications_sent_total{result="sent"})') == 1,
            60,
            "the notifier's count",
        )
        assert promql(up.server, 'sum(notifications_sent_total{result="duplicate"})') == 0
        assert promql(up.server, 'sum(notifications_sent_total{result="failed"})') == 0
        after = up.port_file("ticketing")
        assert after is not None
        assert after["port"] == before["port"], "the port stays"
        wait_until(
            lambda: promql(up.server, 'busline_service_restarts_total{service="ticketing"}') >= 1,
            60,
            "the restart to be counted",
        )
