"""Every fault kind, injected into the whole platform on the embedded defaults and cleared,
with its symptom seen through Lookout's read and Prometheus APIs only (never by asking the
fault registry): the symptom table of docs/busline.md, checked. Then the sealing test: no
fault's kind or id reached anything Lookout stored.

One platform (`busline up` under a real `lookout server`) serves the whole module, with
the load generator running; each test injects one kind, waits for its symptom, stops it
and waits for the symptom to clear where it can.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from busline import fault_api, faults, journeys
from tests.busline.test_end_to_end import Up, busline_up, check_the_journey_through_lookout
from tests.server.conftest import DSN_KEY
from tests.support import ROOT, wait_until

ENV = {
    "BUSLINE_SWEEP_INTERVAL_S": "2",
    "BUSLINE_JOB_RETRY_S": "1",
    "BUSLINE_FAULT_MEMORY_CAP_MB": "80",
    "BUSLINE_HOLD_TTL_S": "30",
}


#: A signed-in route: 404 for a session auth accepts, 401 for one it refuses.
MISSING_BOOKING = "/api/bookings/bk-000000000000"


class Live:
    def __init__(self, up: Up) -> None:
        self.up = up
        self.server = up.server
        self.faults = fault_api.Client(up.url("faults"))
        self.started: list[str] = []
        self.token = ""

    # -- Lookout ------------------------------------------------------------------------

    def query(self, expr: str) -> float | None:
        """The value of an instant PromQL query (the sum of its series); None when empty."""
        body = httpx.get(
            f"{self.server.url}/api/v1/query", params={"query": expr}, timeout=10
        ).json()
        assert body["status"] == "success", (expr, body)
        result = body["data"]["result"]
        if not result:
            return None
        return sum(float(r["value"][1]) for r in result)

    def value(self, expr: str) -> float:
        return self.query(expr) or 0.0

    def rises(self, expr: str, by: float = 1.0, timeout: float = 45.0) -> None:
        before = self.value(expr)
        wait_until(lambda: self.value(expr) >= before + by, timeout, f"{expr} to rise by {by}")

    def logs(self, since_s: float, **params: str) -> list[dict[str, Any]]:
        found = httpx.get(
            f"{self.server.url}/api/lookout/logs",
            params={"start": str(since_s), "limit": "50", **params},
            timeout=10,
        )
        assert found.status_code == 200, found.text
        lines: list[dict[str, Any]] = found.json()["logs"]
        return lines

    def traces(self, since_s: float, **params: str) -> list[dict[str, Any]]:
        found = httpx.get(
            f"{self.server.url}/api/lookout/traces",
            params={"start": str(since_s), "limit": "50", **params},
            timeout=10,
        )
        assert found.status_code == 200, found.text
        traces: list[dict[str, Any]] = found.json()["traces"]
        return traces

    # -- busline --------------------------------------------------------------------------

    def start(self, kind: str, target: str, **kw: Any) -> dict[str, Any]:
        fault = self.faults.start(kind=kind, target=target, **{"for": "5m"}, **kw)
        self.started.append(str(fault["id"]))
        return fault

    def stop(self, fault: dict[str, Any]) -> None:
        active = {f["id"] for f in self.faults.list()["active"]}
        if fault["id"] in active:
            self.faults.stop(str(fault["id"]))

    def gateway(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        return httpx.request(
            method, self.up.url("gateway") + path, headers=headers, timeout=30, **kw
        )

    def sign_in(self) -> None:
        body = {
            "email": "fault.tester@example.com",
            "password": "pw-fault-tester-1",
            "name": "Tester",
            "phone": "254712000111",
        }
        self.gateway("POST", "/api/auth/register", json=body)
        answer = self.gateway("POST", "/api/auth/login", json=body)
        assert answer.status_code == 200, answer.text
        self.token = answer.json()["token"]

    def a_trip(self) -> str:
        trips = self.gateway("GET", "/api/trips", params={"from": "Nairobi", "to": "Mombasa"})
        open_trips = [t for t in trips.json()["trips"] if t["seats_left"] > 0]
        return str(open_trips[-1]["trip_id"])


def listening(host: str, port: int) -> bool:
    with contextlib.closing(socket.socket()) as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def port_of(live: Live, name: str) -> tuple[str, int]:
    data = live.up.port_file(name)
    assert data is not None
    return str(data["host"]), int(data["port"])


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    with busline_up(tmp_path_factory.mktemp("faults"), **ENV) as up:
        load = subprocess.Popen(
            [sys.executable, "-m", "busline", "load", "--rate", "2", "--seed", "9"],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src"), "BUSLINE_STATE": str(up.state)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        live = Live(up)
        try:
            live.sign_in()
            # Traffic reaches Lookout before the first fault.
            wait_until(
                lambda: live.value('sum(payment_outcomes_total{result="success"})') >= 1,
                90,
                "a first paid journey",
            )
            yield live
        finally:
            live.faults.close()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(load.pid, signal.SIGTERM)
            load.wait(10)


# ---------------------------------------------------------------- the providers


def test_provider_down_refuses_connections_and_payments_fall_back(live: Live) -> None:
    host, port = port_of(live, "mpesa")
    since = time.time()
    fault = live.start("provider-down", "mpesa")
    try:
        wait_until(lambda: not listening(host, port), 10, "M-Pesa's port to close")
        assert listening(*port_of(live, "airtel")), "only M-Pesa is down"
        live.rises('sum(payment_outcomes_total{provider="mpesa",result="provider_unreachable"})')
        wait_until(
            lambda: live.logs(since, service="payments", q="ConnectionRefusedError"),
            30,
            "payments' log line of the refused attempt",
        )

        def refused_client_span() -> bool:
            for summary in live.traces(since, service="payments", status="error")[:10]:
                trace = httpx.get(
                    f"{live.server.url}/api/lookout/traces/{summary['trace_id']}", timeout=10
                ).json()
                for span in trace["spans"]:
                    types = [e["attributes"].get("exception.type") for e in span["events"]]
                    if span["kind"] == "client" and "ConnectionRefusedError" in types:
                        return True
            return False

        wait_until(refused_client_span, 30, "a payments client span with ConnectionRefusedError")
    finally:
        live.stop(fault)
    wait_until(lambda: listening(host, port), 10, "M-Pesa to listen again")


def test_provider_slow_shows_in_payments_traces(live: Live) -> None:
    since = time.time()
    fault = live.start("provider-slow", "mpesa", intensity=6)
    try:
        wait_until(
            lambda: live.traces(since, service="payments", min_duration_ms="2500"),
            60,
            "a payments trace slower than 2.5 s",
        )
    finally:
        live.stop(fault)


def test_provider_errors_count_as_provider_errors(live: Live) -> None:
    fault = live.start("provider-errors", "mpesa", intensity=1.0)
    try:
        live.rises('sum(payment_outcomes_total{provider="mpesa",result="provider_error"})')
    finally:
        live.stop(fault)


def test_callback_delay_shows_in_the_callback_delay_histogram(live: Live) -> None:
    late = (
        'sum(payment_callback_delay_seconds_count{provider="mpesa"})'
        ' - sum(payment_callback_delay_seconds_bucket{provider="mpesa",le="13.0"})'
    )
    before = live.value(late)
    fault = live.start("callback-delay", "mpesa", intensity=15)
    try:
        wait_until(lambda: live.value(late) > before, 60, "an M-Pesa callback later than 13 s")
    finally:
        live.stop(fault)


# ---------------------------------------------------------------- databases and queues


def test_db_slow_shows_in_the_database_spans_of_that_service(live: Live) -> None:
    since = time.time()
    fault = live.start("db-slow", "ticketing", intensity=0.4)
    try:
        wait_until(
            lambda: live.traces(since, service="ticketing", min_duration_ms="400"),
            30,
            "a ticketing trace slower than 400 ms",
        )
        mean = (
            'sum(rate(db_client_operation_duration_seconds_sum{job="ticketing"}[15s]))'
            ' / sum(rate(db_client_operation_duration_seconds_count{job="ticketing"}[15s]))'
        )
        wait_until(lambda: live.value(mean) > 0.3, 40, "ticketing's statements to take > 0.3 s")
        assert live.value(mean.replace("ticketing", "auth")) < 0.3, "auth's database is fine"
    finally:
        live.stop(fault)
    time.sleep(0.5)
    began = time.monotonic()
    live.gateway("GET", "/api/trips", params={"from": "Nairobi", "to": "Eldoret"})
    assert time.monotonic() - began < 0.7, "statements are quick again (two took 0.8 s)"


def test_pool_exhaustion_leaves_requests_waiting_for_a_connection(live: Live) -> None:
    fault = live.start("pool-exhaustion", "auth")
    try:
        wait_until(
            lambda: live.value('max(db_client_connection_pending_requests{job="auth"})') >= 1,
            45,
            "a request waiting for one of auth's connections",
        )
    finally:
        live.stop(fault)
    wait_until(
        lambda: live.value('max(db_client_connection_pending_requests{job="auth"})') == 0,
        45,
        "auth's pool to recover",
    )


def backlog(live: Live, selector: str) -> float:
    """Messages the broker holds for the queue: ready, and delivered but not acknowledged."""
    return live.value(f"sum(rabbitmq_queue_messages_ready{selector})") + live.value(
        f"sum(rabbitmq_queue_messages_unacked{selector})"
    )


def test_consumer_stuck_grows_the_backlog_and_it_drains_after(live: Live) -> None:
    queue = '{queue="booking.confirmed"}'
    fault = live.start("consumer-stuck", "notifier")
    try:
        time.sleep(0.5)
        for seed in (21, 22):
            buy(live.up, seed)
        wait_until(lambda: backlog(live, queue) >= 2, 60, "two confirmations waiting")
    finally:
        live.stop(fault)
    wait_until(lambda: backlog(live, queue) == 0, 60, "the backlog to drain")


def test_consumer_slow_shows_in_message_processing_time(live: Live) -> None:
    since = time.time()
    fault = live.start("consumer-slow", "notifier", intensity=3)
    try:
        wait_until(
            lambda: live.traces(since, service="notifier", min_duration_ms="2500"),
            90,
            "a notifier trace slower than 2.5 s",
        )
    finally:
        live.stop(fault)


# ---------------------------------------------------------------- processes


def test_memory_leak_grows_resident_memory_up_to_its_cap_and_clears(live: Live) -> None:
    rss = 'process_resident_memory_bytes{job="fleet"}'
    wait_until(lambda: live.query(rss) is not None, 30, "fleet's memory")
    before = live.value(rss)
    fault = live.start("memory-leak", "fleet", intensity=900)
    try:
        wait_until(lambda: live.value(rss) >= before + 60e6, 45, "fleet to hold 60 MB more")
        time.sleep(3)
        assert live.value(rss) < before + 120e6, "the leak stops at its cap (80 MB here)"
    finally:
        live.stop(fault)
    wait_until(lambda: live.value(rss) < before + 30e6, 30, "fleet's memory to come back")


def test_cpu_hog_shows_as_cpu_time(live: Live) -> None:
    cpu = 'rate(process_cpu_seconds_total{job="auth"}[10s])'
    wait_until(lambda: live.query(cpu) is not None, 30, "auth's CPU time")
    before = live.value(cpu)  # logins hash passwords: auth is not idle
    fault = live.start("cpu-hog", "auth", intensity=90)
    try:
        # A 90 % duty cycle, on a machine the other tests share: at least a third more.
        wait_until(lambda: live.value(cpu) > before + 0.35, 45, "auth to burn CPU")
    finally:
        live.stop(fault)
    wait_until(lambda: live.value(cpu) < before + 0.2, 45, "auth's CPU to calm down")


def test_crash_loop_shows_restarts_and_the_service_comes_back(live: Live) -> None:
    restarts = 'sum(busline_service_restarts_total{service="fleet"})'
    before = live.value(restarts)
    fault = live.start("crash-loop", "fleet")
    try:
        wait_until(lambda: live.value(restarts) >= before + 2, 60, "fleet restarted twice")
    finally:
        live.stop(fault)
    host, port = port_of(live, "fleet")
    wait_until(lambda: listening(host, port), 30, "fleet to listen again")
    wait_until(lambda: live.value('up{job="fleet"}') == 1, 30, "fleet scraped again")


def test_service_unavailable_stops_listening_and_the_gateway_answers_503(live: Live) -> None:
    host, port = port_of(live, "fleet")
    failing = (
        'sum(http_server_request_duration_seconds_count{job="gateway",'
        'http_route=~"/api/fleet.*",http_response_status_code=~"5.."})'
    )
    before = live.value(failing)
    fault = live.start("service-unavailable", "fleet")
    try:
        wait_until(lambda: not listening(host, port), 10, "fleet's port to close")
        answer = live.gateway("GET", "/api/fleet/buses")
        assert answer.status_code in (502, 503), answer.text
        wait_until(lambda: live.value(failing) > before, 30, "the gateway's 5xx for fleet")
    finally:
        live.stop(fault)
    wait_until(lambda: listening(host, port), 10, "fleet to listen again")
    assert live.gateway("GET", "/api/fleet/buses").status_code == 200


def test_auth_failures_refuse_valid_sessions(live: Live) -> None:
    refused = (
        'sum(http_server_request_duration_seconds_count{job="auth",'
        'http_route="/internal/sessions/current",http_response_status_code="401"})'
    )
    before = live.value(refused)
    fault = live.start("auth-failures", "auth", intensity=1.0)
    try:
        time.sleep(0.5)
        answer = live.gateway("GET", MISSING_BOOKING)
        assert answer.status_code == 401, answer.text
        wait_until(lambda: live.value(refused) > before, 30, "auth's 401s on session checks")
    finally:
        live.stop(fault)
    time.sleep(0.5)
    assert live.gateway("GET", MISSING_BOOKING).status_code == 404, "signed in: not found"


def test_stale_gps_ages_the_positions_of_k_buses(live: Live) -> None:
    stale = "count(bus_gps_staleness_seconds > 6)"
    fault = live.start("stale-gps", "fleet", intensity=3)
    try:
        wait_until(lambda: live.value(stale) == 3, 45, "three buses with stale positions")
    finally:
        live.stop(fault)
    wait_until(lambda: live.value(stale) == 0, 45, "every bus reporting again")


def test_gateway_latency_slows_every_call_at_the_edge(live: Live) -> None:
    since = time.time()
    fault = live.start("gateway-latency", "gateway", intensity=1.0)
    try:
        time.sleep(0.5)
        began = time.monotonic()
        live.gateway("GET", "/api/trips", params={"from": "Nairobi", "to": "Nakuru"})
        assert time.monotonic() - began >= 1.0
        wait_until(
            lambda: live.traces(since, service="gateway", min_duration_ms="1000"),
            30,
            "a gateway trace over a second",
        )
    finally:
        live.stop(fault)
    time.sleep(0.5)
    began = time.monotonic()
    live.gateway("GET", "/api/trips", params={"from": "Nairobi", "to": "Nakuru"})
    assert time.monotonic() - began < 0.8, "the edge is quick again"


def test_traffic_surge_multiplies_the_gateway_request_rate(live: Live) -> None:
    rate = 'sum(rate(http_server_request_duration_seconds_count{job="gateway"}[20s]))'
    wait_until(lambda: live.value(rate) > 0, 30, "gateway traffic")
    time.sleep(20)  # a window of undisturbed traffic
    before = live.value(rate)
    fault = live.start("traffic-surge", "gateway", intensity=3)
    try:
        wait_until(lambda: live.value(rate) >= 1.6 * before, 60, "the request rate to surge")
    finally:
        live.stop(fault)


def test_buggy_release_deploys_a_new_version_whose_code_path_raises(live: Live) -> None:
    started = 'max(process_start_time_seconds{job="ticketing"})'
    wait_until(lambda: live.query(started) is not None, 30, "ticketing's start time")
    before = live.value(started)
    since = time.time()
    fault = live.start("buggy-release", "ticketing", intensity=1.0)
    version = fault["params"]["version"]
    try:
        wait_until(
            lambda: live.query(f'lookout_build_info{{job="ticketing",version="{version}"}}'),
            60,
            f"ticketing {version} in lookout_build_info",
        )
        assert live.value(started) > before, "a new process"
        answer = live.gateway("POST", "/api/bookings", json={"trip_id": live.a_trip()})
        assert answer.status_code >= 500, answer.text

        def the_error() -> bool:
            issues = httpx.get(
                f"{live.server.url}/api/lookout/issues",
                params={"service": "ticketing", "start": str(since)},
                timeout=10,
            ).json()["issues"]
            return any("KeyError" in str(i) for i in issues)

        wait_until(the_error, 30, "ticketing's KeyError as an issue in Lookout")
    finally:
        live.stop(fault)
    # Stopping the fault withdraws the release: the version before it runs again.
    wait_until(
        lambda: live.query(f'lookout_build_info{{job="ticketing",version="{version}"}}') is None,
        60,
        "the release withdrawn",
    )


def test_job_failure_fails_one_run_and_the_retry_succeeds(live: Live) -> None:
    since = time.time()
    fault = live.start("job-failure", "seat-hold-sweeper")

    def runs() -> list[str]:
        found = httpx.get(
            f"{live.server.url}/api/lookout/job-runs",
            params={"monitor": "seat-hold-sweeper", "start": str(since), "limit": "50"},
            timeout=10,
        ).json()
        return [r["status"] for r in sorted(found["job_runs"], key=lambda r: r["ts_ns"])]

    try:
        wait_until(lambda: "error" in runs(), 30, "a failed run of the sweeper")
        wait_until(lambda: "ok" in runs()[runs().index("error") :], 30, "a successful run after it")
        assert runs().count("error") == 1, runs()
    finally:
        live.stop(fault)


# ---------------------------------------------------------------- scenarios


def test_a_scenario_starts_its_faults_on_time_with_its_id_and_seed(
    live: Live, tmp_path: Path
) -> None:
    plan = tmp_path / "short.yaml"
    plan.write_text(
        "name: short\n"
        "faults:\n"
        "  - {at: 0s, kind: gateway-latency, target: gateway, intensity: 0.05, for: 2s}\n"
        "  - {at: 1s, kind: stale-gps, target: fleet, intensity: [1, 3], for: 2s}\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "BUSLINE_STATE": str(live.up.state)}
    began = time.time()
    done = subprocess.run(
        [sys.executable, "-m", "busline", "scenario", "run", str(plan), "--seed", "4"],
        env=env, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    mine = [r for r in faults.read_ground_truth(live.up.state / "ground_truth.jsonl")
            if (r.get("scenario_id") or "").startswith("short-4-")]  # fmt: skip
    assert [r["kind"] for r in mine] == ["gateway-latency", "stale-gps"]
    assert {r["seed"] for r in mine} == {4}
    assert len({r["scenario_id"] for r in mine}) == 1
    assert mine[1]["start_ms"] - mine[0]["start_ms"] >= 900, "the second starts a second later"
    assert all(r["end_ms"] for r in mine), "both ended before the run returned"
    assert mine[0]["start_ms"] >= began * 1000


# ---------------------------------------------------------------- sealing


def test_no_fault_kind_or_id_reached_lookout(live: Live) -> None:
    """Run last: every fault above has started and ended."""
    truth = faults.read_ground_truth(live.up.state / "ground_truth.jsonl")
    ids = [r["id"] for r in truth]
    assert len(ids) >= len(faults.KINDS), "the module ran every kind"
    assert all(r["end_ms"] for r in truth), "every fault ended"
    needles = [*faults.KINDS, *ids]
    since = str(min(r["start_ms"] for r in truth) / 1000 - 60)
    for needle in needles:
        assert live.logs(float(since), q=needle) == [], f"a log line names {needle}"
    labels = httpx.get(f"{live.server.url}/api/v1/labels", timeout=10).json()["data"]
    for label in labels:
        values = httpx.get(f"{live.server.url}/api/v1/label/{label}/values", timeout=30)
        text = values.text
        assert not [n for n in needles if n in text], f"label {label} names a fault"
    issues = httpx.get(
        f"{live.server.url}/api/lookout/issues", params={"start": since}, timeout=10
    ).json()["issues"]
    assert issues, "the faults above caused errors (the bad release's at least)"
    for issue in issues[:40]:
        # The whole events: stack frames with their source lines and local variables.
        events = httpx.get(
            f"{live.server.url}/api/lookout/issues/{issue['issue_id']}", timeout=10
        ).text
        leaked = [n for n in needles if n in events]
        assert not leaked, f"an error event of {issue['issue_id']} names {leaked}"
    for summary in live.traces(float(since), limit="100")[:40]:
        spans = httpx.get(
            f"{live.server.url}/api/lookout/traces/{summary['trace_id']}", timeout=10
        ).text
        assert not [n for n in needles if n in spans], "a span names a fault"
    # The positive control: a line that does name a fault is found by the same search.
    push = {
        "streams": [
            {"stream": {"service": "probe"}, "values": [[str(time.time_ns()), f"note {ids[0]}"]]}
        ]
    }
    posted = httpx.post(f"{live.server.url}/loki/api/v1/push", json=push, timeout=10)
    assert posted.status_code < 300, posted.text
    wait_until(lambda: live.logs(float(since), q=ids[0]) != [], 20, "the probe line")
    # ... and an error event that does, by the same walk over the issues' events.
    probe = {
        "event_id": uuid.uuid4().hex,
        "message": f"probe {ids[0]}",
        "level": "error",
        "platform": "python",
        "timestamp": time.time(),
    }
    sent = httpx.post(
        f"{live.server.url}/api/1/store/",
        json=probe,
        headers={"X-Sentry-Auth": f"Sentry sentry_version=7, sentry_key={DSN_KEY}"},
        timeout=10,
    )
    assert sent.status_code < 300, sent.text

    def probe_found() -> bool:
        found = httpx.get(
            f"{live.server.url}/api/lookout/issues", params={"start": since}, timeout=10
        ).json()["issues"]
        return any(
            ids[0]
            in httpx.get(f"{live.server.url}/api/lookout/issues/{i['issue_id']}", timeout=10).text
            for i in found
        )

    wait_until(probe_found, 20, "the probe event")


# ---------------------------------------------------------------- PostgreSQL and RabbitMQ


def buy(up: Up, seed: int, provider: str | None = None) -> journeys.Journey:
    async def go() -> journeys.Journey:
        rng = random.Random(seed)
        async with httpx.AsyncClient() as http:
            customer = journeys.new_customer(rng)
            return await journeys.buy(up.url("gateway"), http, customer, rng, provider)

    return asyncio.run(go())


def test_a_journey_and_three_faults_on_postgresql_and_rabbitmq(
    tmp_path: Path, own_postgres: str, amqp_url: str
) -> None:
    """The buy journey through Lookout on PostgreSQL and RabbitMQ, then provider-down,
    db-slow (PostgreSQL's own `pg_sleep`) and consumer-stuck (RabbitMQ's own backlog)."""
    with busline_up(tmp_path, BUSLINE_DATABASE_URL=own_postgres, BUSLINE_AMQP_URL=amqp_url) as up:
        journey = buy(up, 7)
        assert journey.result == "success", (journey.result, journey.error, journey.steps)
        check_the_journey_through_lookout(up, journey)
        live = Live(up)
        # The depth comes from the broker itself: rabbitmq_prometheus, scraped by Lookout.
        vhost = amqp_url.rsplit("/", 1)[1]
        depth = (
            f'rabbitmq_queue_messages_ready{{job="rabbitmq",vhost="{vhost}",'
            'queue="booking.confirmed"}'
        )
        wait_until(lambda: live.query(depth) is not None, 60, "the broker's own queue depth")

        fault = live.start("provider-down", "mpesa")
        try:
            unreachable = (
                'sum(payment_outcomes_total{provider="mpesa",result="provider_unreachable"})'
            )
            wait_until(lambda: not listening(*port_of(live, "mpesa")), 10, "M-Pesa closed")
            assert buy(up, 8).result == "success", "payments fell back to Airtel"
            wait_until(lambda: live.value(unreachable) >= 1, 30, "the refused attempt counted")
        finally:
            live.stop(fault)

        since = time.time()
        fault = live.start("db-slow", "ticketing", intensity=0.5)
        try:
            time.sleep(0.5)
            live.gateway("GET", "/api/trips", params={"from": "Nairobi", "to": "Kisumu"})
            wait_until(
                lambda: live.traces(since, service="ticketing", min_duration_ms="500"),
                30,
                "a ticketing span of 500 ms (pg_sleep)",
            )
        finally:
            live.stop(fault)

        fault = live.start("consumer-stuck", "notifier")
        selector = f'{{job="rabbitmq",vhost="{vhost}",queue="booking.confirmed"}}'
        try:
            time.sleep(0.5)
            assert buy(up, 9).result == "success"
            wait_until(lambda: backlog(live, selector) >= 1, 60, "a confirmation held in RabbitMQ")
        finally:
            live.stop(fault)
            live.faults.close()
        wait_until(lambda: backlog(live, selector) == 0, 60, "RabbitMQ's backlog to drain")
