"""The gateway as a real process in front of real auth and fleet processes, and of small
real HTTP stand-ins for ticketing and payments (registered by their port files, as
`kit.report_listening` writes them): routing, sessions, maintenance, failures, the edge."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.busline.conftest import Platform
from tests.support import wait_until

CLIENT_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
SPOOFED_USER = "0123456789abcdef0123456789abcdef"


# ---------------------------------------------------------------- stand-ins


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes


@dataclass
class StandIn:
    """A real HTTP server playing a service: it records each request and echoes it."""

    name: str
    server: ThreadingHTTPServer
    seen: list[Seen] = field(default_factory=list)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])


def register_port(platform: Platform, service: str, port: int) -> None:
    """A port file as `kit.report_listening` writes it."""
    run = platform.state / "run"
    run.mkdir(parents=True, exist_ok=True)
    record = {
        "service": service,
        "host": "127.0.0.1",
        "port": port,
        "pid": os.getpid(),
        "version": "1.4.2",
        "started_at": time.time(),
    }
    (run / f"{service}.json").write_text(json.dumps(record))


def start_stand_in(platform: Platform, name: str) -> StandIn:
    seen: list[Seen] = []

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            seen.append(Seen(self.command, self.path, headers, body))
            if self.path.endswith("/slow"):
                time.sleep(3)
            status = 201 if self.command == "POST" else 200
            if self.path.endswith("/missing"):
                status = 404
            payload = json.dumps(
                {
                    "service": name,
                    "method": self.command,
                    "path": self.path,
                    "user_id": self.headers.get("x-user-id"),
                    "idempotency_key": self.headers.get("idempotency-key"),
                    "body": json.loads(body) if body else None,
                }
            ).encode()
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.send_header("x-internal-secret", "never-forwarded")
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _answer

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stand_in = StandIn(name, server, seen)
    register_port(platform, name, stand_in.port)
    return stand_in


@pytest.fixture
def stand_ins(platform: Platform) -> Iterator[dict[str, StandIn]]:
    """ticketing and payments, played by stand-ins."""
    servers = {name: start_stand_in(platform, name) for name in ("ticketing", "payments")}
    try:
        yield servers
    finally:
        for stand_in in servers.values():
            stand_in.server.shutdown()
            stand_in.server.server_close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# ---------------------------------------------------------------- helpers


def sign_up(gateway: str, email: str) -> str:
    """Register and log in through the gateway; the bearer token."""
    body = {"email": email, "password": "safari-njema-7", "name": "Amani", "phone": "0711222333"}
    assert httpx.post(f"{gateway}/api/auth/register", json=body).status_code == 201
    login = httpx.post(
        f"{gateway}/api/auth/login", json={"email": email, "password": body["password"]}
    )
    assert login.status_code == 200
    return str(login.json()["token"])


def trace_id_of(traceparent: str) -> str:
    return traceparent.split("-")[1]


def set_maintenance(platform: Platform, scopes: dict[str, str]) -> None:
    path = platform.state / "control.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"maintenance": scopes}))
    os.replace(tmp, path)


def eventually(check: Callable[[], bool], what: str) -> None:
    wait_until(check, 10.0, what)


# ---------------------------------------------------------------- tests


def test_routes_reach_their_services_with_the_signed_in_user(
    platform: Platform, stand_ins: dict[str, StandIn]
) -> None:
    """Every public route reaches its service: auth and fleet for real, ticketing and
    payments as stand-ins. Signed-in routes carry the session's user as X-User-Id, never
    the one the client sent; payments get the Idempotency-Key; services continue the
    gateway's trace."""
    platform.start("auth")
    platform.start("fleet")
    platform.start("gateway")
    gw = platform.url("gateway")
    token = sign_up(gw, "amani@example.com")
    me = httpx.get(
        f"{platform.url('auth')}/internal/sessions/current",
        headers={"Authorization": f"Bearer {token}"},
    ).json()["user_id"]
    signed_in = {"Authorization": f"Bearer {token}", "X-User-Id": SPOOFED_USER}

    search = httpx.get(f"{gw}/api/trips", params={"from": "Nairobi", "to": "Mombasa"})
    assert search.status_code == 200
    assert search.json()["path"] == "/trips?from=Nairobi&to=Mombasa"
    assert search.json()["user_id"] is None
    assert "x-internal-secret" not in search.headers
    ticketing = stand_ins["ticketing"].seen[-1]
    assert trace_id_of(ticketing.headers["traceparent"]) == search.headers["x-trace-id"]

    expected = [
        ("GET", "/api/trips/T-42", "ticketing", "/trips/T-42", 200),
        ("POST", "/api/bookings", "ticketing", "/bookings", 201),
        ("GET", "/api/bookings/b1", "ticketing", "/bookings/b1", 200),
        ("GET", "/api/tickets/b1", "ticketing", "/tickets/b1", 200),
        ("POST", "/api/payments", "payments", "/payments", 201),
        ("GET", "/api/payments/p1", "payments", "/payments/p1", 200),
    ]
    for method, public, service, private, status in expected:
        body = {"trip_id": "T-42"} if method == "POST" else None
        answer = httpx.request(
            method, gw + public, json=body, headers={**signed_in, "Idempotency-Key": "k-1"}
        )
        assert (public, answer.status_code) == (public, status)
        echoed = answer.json()
        assert (echoed["service"], echoed["path"]) == (service, private)
        assert echoed["body"] == body
        user = None if public.startswith("/api/trips") else me
        assert (public, echoed["user_id"]) == (public, user)
        key = "k-1" if public == "/api/payments" else None
        assert (public, echoed["idempotency_key"]) == (public, key)
    for stand_in in stand_ins.values():
        for request in stand_in.seen:
            assert "authorization" not in request.headers

    buses = httpx.get(f"{gw}/api/fleet/buses")
    assert buses.status_code == 200
    assert len(buses.json()["buses"]) >= 30
    one = httpx.get(f"{gw}/api/fleet/buses/KBX-101")
    assert (one.status_code, one.json()["bus_id"]) == (200, "KBX-101")
    unknown = httpx.get(f"{gw}/api/fleet/buses/KBX-999")
    assert (unknown.status_code, unknown.json()["error"]) == (404, "unknown_bus")
    assert "x-trace-id" in unknown.headers


def test_signed_in_routes_need_a_valid_session(
    platform: Platform, stand_ins: dict[str, StandIn]
) -> None:
    """Without a bearer token, or with a bad one, a signed-in route answers 401 JSON
    (with X-Trace-Id) and the service is never called, whatever X-User-Id says."""
    platform.start("auth")
    platform.start("gateway")
    gw = platform.url("gateway")
    for headers in (
        {"X-User-Id": SPOOFED_USER},
        {"Authorization": "Bearer not-a-session", "X-User-Id": SPOOFED_USER},
        {"Authorization": "Basic YWxhZGRpbjpvcGVuc2VzYW1l"},
    ):
        answer = httpx.post(f"{gw}/api/bookings", json={"trip_id": "T-1"}, headers=headers)
        assert answer.status_code == 401
        assert answer.json()["error"] in ("unauthorized", "invalid_token")
        assert answer.json()["field"] == "authorization"
        assert len(answer.headers["x-trace-id"]) == 32
    assert stand_ins["ticketing"].seen == []


def test_maintenance_closes_a_feature_or_everything(
    platform: Platform, stand_ins: dict[str, StandIn]
) -> None:
    """A feature in maintenance answers 503 with a friendly JSON body, Retry-After and
    X-Trace-Id while the others work; `global` closes every /api route; /healthz stays
    open; lifting it reopens."""
    platform.start("gateway")
    gw = platform.url("gateway")
    payments_paused = "M-Pesa payments are paused for an upgrade; back in 5 minutes."
    set_maintenance(platform, {"payments": payments_paused})

    def paying() -> httpx.Response:
        return httpx.get(f"{gw}/api/payments/p1", headers={"Authorization": "Bearer t"})

    eventually(lambda: paying().status_code == 503, "payments to close")
    closed = paying()
    assert closed.json() == {
        "error": "maintenance",
        "message": payments_paused,
        "feature": "payments",
        "scope": "payments",
    }
    assert closed.headers["retry-after"] == "300"
    assert len(closed.headers["x-trace-id"]) == 32
    assert httpx.get(f"{gw}/api/trips/T-1").status_code == 200
    assert stand_ins["payments"].seen == []

    set_maintenance(platform, {"global": "Busline is upgrading; back soon."})
    eventually(lambda: httpx.get(f"{gw}/api/trips/T-1").status_code == 503, "everything to close")
    for method, path in (("GET", "/api/trips/T-1"), ("POST", "/api/auth/login"), ("GET", "/api/x")):
        answer = httpx.request(method, gw + path, json={})
        assert (path, answer.status_code, answer.json()["error"]) == (path, 503, "maintenance")
        assert answer.json()["scope"] == "global"
        assert answer.headers["retry-after"] == "300"
        assert "x-trace-id" in answer.headers
    health = httpx.get(f"{gw}/healthz")
    assert (health.status_code, health.json()["service"]) == (200, "gateway")

    set_maintenance(platform, {})
    eventually(lambda: httpx.get(f"{gw}/api/trips/T-1").status_code == 200, "reopening")


def test_an_unreachable_or_slow_service_is_a_json_5xx(platform: Platform) -> None:
    """A service with no port file, or one whose port refuses connections, answers 503
    `upstream_unavailable` naming it, with Retry-After; a service slower than the timeout
    answers 504; all carry X-Trace-Id."""
    platform.start("gateway", BUSLINE_GATEWAY_TIMEOUT_S="1")
    gw = platform.url("gateway")

    not_started = httpx.get(f"{gw}/api/fleet/buses")
    assert not_started.status_code == 503
    assert not_started.json()["error"] == "upstream_unavailable"
    assert not_started.json()["service"] == "fleet"
    assert not_started.headers["retry-after"] == "5"
    assert "x-trace-id" in not_started.headers

    register_port(platform, "ticketing", closed_port())
    refused = httpx.get(f"{gw}/api/trips", params={"from": "Nairobi", "to": "Kisumu"})
    assert (refused.status_code, refused.json()["service"]) == (503, "ticketing")
    assert refused.json()["error"] == "upstream_unavailable"
    assert "x-trace-id" in refused.headers

    no_auth = httpx.get(f"{gw}/api/bookings/b1", headers={"Authorization": "Bearer abc"})
    assert (no_auth.status_code, no_auth.json()["service"]) == (503, "auth")

    # The service comes back on another port: the gateway finds it without a restart.
    stand_in = start_stand_in(platform, "ticketing")
    try:
        back = httpx.get(f"{gw}/api/trips", params={"from": "Nairobi", "to": "Kisumu"})
        assert (back.status_code, back.json()["service"]) == (200, "ticketing")
        slow = httpx.get(f"{gw}/api/trips/slow", timeout=10)
        assert slow.status_code == 504
        assert (slow.json()["error"], slow.json()["service"]) == ("upstream_timeout", "ticketing")
        assert "x-trace-id" in slow.headers
    finally:
        stand_in.server.shutdown()
        stand_in.server.server_close()


def test_the_edge_does_not_trust_a_client_trace(
    platform: Platform, stand_ins: dict[str, StandIn]
) -> None:
    """A client's traceparent and X-Trace-Id do not become the trace: the gateway starts
    its own, answers its id, and passes that one (not the client's) to the service."""
    platform.start("gateway")
    gw = platform.url("gateway")
    answer = httpx.get(
        f"{gw}/api/trips/T-7",
        headers={
            "traceparent": f"00-{CLIENT_TRACE_ID}-00f067aa0ba902b7-01",
            "X-Trace-Id": CLIENT_TRACE_ID,
        },
    )
    assert answer.status_code == 200
    ours = answer.headers["x-trace-id"]
    assert len(ours) == 32
    assert ours != CLIENT_TRACE_ID
    seen = stand_ins["ticketing"].seen[-1].headers
    assert trace_id_of(seen["traceparent"]) == ours
    assert seen["x-trace-id"] == ours


def test_unknown_paths_wrong_methods_and_big_bodies_are_json_errors(
    platform: Platform, stand_ins: dict[str, StandIn]
) -> None:
    platform.start("gateway")
    gw = platform.url("gateway")
    cases = [
        (httpx.get(f"{gw}/api/nowhere"), 404, "path"),
        (httpx.get(f"{gw}/elsewhere"), 404, "path"),
        (httpx.delete(f"{gw}/api/trips"), 405, "method"),
        (httpx.get(f"{gw}/api/trips/%3Cscript%3E"), 400, "trip_id"),
        (httpx.post(f"{gw}/api/auth/login", content=b"x" * (65 * 1024)), 413, "body"),
    ]
    for answer, status, field_name in cases:
        assert (answer.status_code, answer.json()["field"]) == (status, field_name)
        assert "x-trace-id" in answer.headers
    relayed = httpx.get(f"{gw}/api/trips/missing")
    assert (relayed.status_code, relayed.json()["service"]) == (404, "ticketing")
    assert [request.path for request in stand_ins["ticketing"].seen] == ["/trips/missing"]
