"""A customer's journeys through the public gateway, as a real HTTP client: search, view a
trip, log in, hold a seat, pay, poll the payment, view the ticket, see where the bus is.

`python -m busline load` runs them at a steady rate; the end-to-end tests run one buy
journey and follow its `X-Trace-Id` through Lookout. Customers log in once and reuse their
session, as people do.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import httpx

from busline import kit
from busline.routes import ROUTES

PAY_TIMEOUT_S = 90.0


@dataclass
class Customer:
    email: str
    password: str
    name: str
    phone: str
    token: str | None = None


@dataclass
class Journey:
    """What one buy journey did: each step's status, and the trace ids it was given."""

    steps: list[tuple[str, int, str]] = field(default_factory=list)  # (step, status, trace)
    booking_id: str | None = None
    payment_id: str | None = None
    buy_trace_id: str | None = None  # X-Trace-Id of the payment request
    result: str | None = None  # the payment's result, or the step that failed
    error: str | None = None

    def trace_of(self, step: str) -> str | None:
        for name, _, trace in self.steps:
            if name == step:
                return trace
        return None


def new_customer(rng: random.Random) -> Customer:
    first = rng.choice(
        [
            "amina",
            "brian",
            "cynthia",
            "david",
            "esther",
            "felix",
            "grace",
            "hassan",
            "irene",
            "john",
            "kevin",
            "lucy",
            "mercy",
            "njeri",
            "otieno",
            "wanjiru",
        ]
    )
    tag = uuid.UUID(int=rng.getrandbits(128)).hex[:10]
    phone = "2547" + "".join(str(rng.randrange(10)) for _ in range(8))
    return Customer(f"{first}.{tag}@example.com", f"pw-{tag}-Kenya", first.title(), phone)


class Client:
    """A customer's browser: one HTTP client against the gateway."""

    def __init__(self, gateway: str, http: httpx.AsyncClient, journey: Journey) -> None:
        self.gateway = gateway.rstrip("/")
        self.http = http
        self.journey = journey

    async def call(
        self,
        step: str,
        method: str,
        path: str,
        *,
        customer: Customer | None = None,
        body: Any = None,
        headers: dict[str, str] | None = None,
    ) -> httpx.Response:
        sent = dict(headers or {})
        if customer is not None and customer.token:
            sent["Authorization"] = f"Bearer {customer.token}"
        response = await self.http.request(
            method, self.gateway + path, json=body, headers=sent, timeout=30.0
        )
        self.journey.steps.append(
            (step, response.status_code, response.headers.get("x-trace-id", ""))
        )
        return response


class JourneyError(Exception):
    pass


def _ok(response: httpx.Response, step: str) -> Any:
    if response.status_code >= 400:
        raise JourneyError(f"{step}: {response.status_code} {response.text[:200]}")
    return response.json()


async def sign_in(client: Client, customer: Customer) -> None:
    """Log in, registering first when the customer is new; the session is kept."""
    if customer.token:
        return
    login = {"email": customer.email, "password": customer.password}
    response = await client.call("login", "POST", "/api/auth/login", body=login)
    if response.status_code == 401:
        _ok(
            await client.call(
                "register",
                "POST",
                "/api/auth/register",
                body={
                    "email": customer.email,
                    "password": customer.password,
                    "name": customer.name,
                    "phone": customer.phone,
                },
            ),
            "register",
        )
        response = await client.call("login", "POST", "/api/auth/login", body=login)
    customer.token = _ok(response, "login")["token"]


async def buy(
    gateway: str,
    http: httpx.AsyncClient,
    customer: Customer,
    rng: random.Random,
    provider: str | None = None,
) -> Journey:
    """One whole buy journey. Failures are recorded in the result, never raised."""
    journey = Journey()
    client = Client(gateway, http, journey)
    try:
        route = rng.choice([r for r in ROUTES if r.kind == "intercity"] * 3 + list(ROUTES))
        origin, destination = (
            (route.origin, route.destination)
            if rng.random() < 0.6
            else (route.destination, route.origin)
        )
        found = _ok(
            await client.call(
                "search",
                "GET",
                "/api/trips?" + str(httpx.QueryParams({"from": origin, "to": destination})),
            ),
            "search",
        )["trips"]
        open_trips = [t for t in found if t.get("seats_left", 0) > 0]
        if not open_trips:
            journey.result = "no_trip"
            return journey
        trip = rng.choice(open_trips[:6])
        _ok(await client.call("view_trip", "GET", f"/api/trips/{trip['trip_id']}"), "view_trip")
        await sign_in(client, customer)
        held = await client.call(
            "hold", "POST", "/api/bookings", customer=customer, body={"trip_id": trip["trip_id"]}
        )
        if held.status_code == 401:  # the session ended: log in again, once
            customer.token = None
            await sign_in(client, customer)
            held = await client.call(
                "hold",
                "POST",
                "/api/bookings",
                customer=customer,
                body={"trip_id": trip["trip_id"]},
            )
        booking = _ok(held, "hold")
        journey.booking_id = booking["booking_id"]
        pay_body: dict[str, Any] = {"booking_id": booking["booking_id"], "phone": customer.phone}
        if provider is not None:
            pay_body["provider"] = provider
        paid = await client.call(
            "pay",
            "POST",
            "/api/payments",
            customer=customer,
            body=pay_body,
            headers={"Idempotency-Key": uuid.UUID(int=rng.getrandbits(128)).hex},
        )
        journey.buy_trace_id = paid.headers.get("x-trace-id")
        payment = _ok(paid, "pay")
        journey.payment_id = payment["payment_id"]
        deadline = time.monotonic() + PAY_TIMEOUT_S
        while payment.get("status") == "pending" and time.monotonic() < deadline:
            await asyncio.sleep(2.0)
            payment = _ok(
                await client.call(
                    "poll", "GET", f"/api/payments/{journey.payment_id}", customer=customer
                ),
                "poll",
            )
        journey.result = str(payment.get("result") or payment.get("status"))
        if payment.get("status") == "succeeded":
            await asyncio.sleep(0.5)
            ticket = await client.call(
                "ticket", "GET", f"/api/tickets/{journey.booking_id}", customer=customer
            )
            if ticket.status_code >= 400:
                journey.error = f"ticket: {ticket.status_code}"
            # Where is my bus? Customers look at the live map of their route.
            await client.call(
                "track_bus", "GET", "/api/fleet/buses?" + str(httpx.QueryParams(
                    {"route": trip["route_id"]}))
            )  # fmt: skip
    except JourneyError as exc:
        journey.result = "failed"
        journey.error = str(exc)
    except httpx.HTTPError as exc:
        journey.result = "failed"
        journey.error = f"{type(exc).__name__}: {exc}"
    return journey


async def run_load(gateway: str, rate: float, duration_s: float | None, seed: int) -> int:
    """Start buy journeys as a Poisson process at `rate` a second, with a pool of returning
    customers; one JSON line per finished journey on stdout."""
    rng = random.Random(seed)  # noqa: S311 - a reproducible load, not secrets
    customers = [new_customer(rng) for _ in range(50)]
    started = time.monotonic()
    tasks: set[asyncio.Task[None]] = set()
    limits = httpx.Limits(max_connections=50, max_keepalive_connections=20)
    async with httpx.AsyncClient(limits=limits) as http:

        async def one(customer: Customer, journey_rng: random.Random) -> None:
            journey = await buy(gateway, http, customer, journey_rng)
            print(
                json.dumps(
                    {
                        "event": "journey",
                        "result": journey.result,
                        "trace_id": journey.buy_trace_id,
                        "error": journey.error,
                    }
                ),
                flush=True,
            )

        while duration_s is None or time.monotonic() - started < duration_s:
            customer = rng.choice(customers)
            journey_rng = random.Random(rng.getrandbits(64))  # noqa: S311 - not secrets
            task = asyncio.create_task(one(customer, journey_rng))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(rng.expovariate(rate))
        if tasks:
            await asyncio.wait(tasks, timeout=PAY_TIMEOUT_S)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m busline load", description=__doc__)
    parser.add_argument("--rate", type=float, default=0.5, help="journeys a second (default 0.5)")
    parser.add_argument("--duration", type=float, help="seconds to run (default: until stopped)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--gateway", help="gateway URL (default: from $BUSLINE_STATE)")
    args = parser.parse_args(argv)
    if not 0 < args.rate <= 100:
        parser.error("--rate must be in (0, 100]")
    gateway = args.gateway
    deadline = time.monotonic() + 60
    while gateway is None:
        try:
            gateway = kit.url_of("gateway")
        except kit.Unavailable:
            if time.monotonic() > deadline:
                print("busline load: the gateway has not started", file=sys.stderr)
                return 1
            time.sleep(0.5)
    try:
        return asyncio.run(run_load(gateway, args.rate, args.duration, args.seed))
    except KeyboardInterrupt:
        return 130
