"""A customer's journeys through the public gateway, as a real HTTP client: search, view a
trip, log in, hold a seat, pay, poll the payment, view the ticket, see where the bus is.

Each journey kind is one function with the same signature, `(gateway, http, customer, rng)
-> Journey`, that never raises: what failed is in the `Journey` it returns. `browse` only
searches, `look` also views a trip, `abandon` holds a seat and leaves, `buy` goes all the
way, and `check` is a returning customer looking at a ticket they bought. Customers log in
once and reuse their session, as people do. `busline.loadgen` runs them at a rate; the
end-to-end tests run one `buy` and follow its `X-Trace-Id` through Lookout.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from busline.routes import ROUTES

PAY_TIMEOUT_S = 90.0
POLL_EVERY_S = 2.0
#: How many of a customer's paid bookings they remember (the ones a `check` looks at).
KEPT_BOOKINGS = 10


@dataclass
class Customer:
    email: str
    password: str
    name: str
    phone: str
    token: str | None = None
    bookings: list[str] = field(default_factory=list)  # paid booking ids, newest last
    # One login at a time per customer: two journeys at once share the session.
    signing_in: asyncio.Lock = field(default_factory=asyncio.Lock, repr=False, compare=False)


@dataclass
class Journey:
    """What one journey did: each step's status, and the trace ids it was given."""

    steps: list[tuple[str, int, str]] = field(default_factory=list)  # (step, status, trace)
    booking_id: str | None = None
    payment_id: str | None = None
    buy_trace_id: str | None = None  # X-Trace-Id of the payment request
    result: str | None = None  # the payment's result, or "failed", "ok", "abandoned", ...
    error: str | None = None
    kind: str = "buy"
    #: Why it failed: http_4xx, http_5xx, timeout, connection, http or bad_response.
    error_kind: str | None = None
    #: "new" when the journey logged in, "reused" when the customer's session served.
    session: str | None = None

    def trace_of(self, step: str) -> str | None:
        for name, _, trace in self.steps:
            if name == step:
                return trace
        return None

    @property
    def trace_id(self) -> str | None:
        """The trace to look at: the failing step's when the journey failed, else the
        payment's for a buy, else the last step's."""
        last = (self.steps[-1][2] or None) if self.steps else None
        if self.result == "failed":
            return last
        return self.buy_trace_id or last


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
    """A step answered an HTTP error status."""

    def __init__(self, step: str, status: int, message: str) -> None:
        super().__init__(message)
        self.step = step
        self.status = status


def _ok(response: httpx.Response, step: str) -> Any:
    if response.status_code >= 400:
        raise JourneyError(
            step, response.status_code, f"{step}: {response.status_code} {response.text[:200]}"
        )
    return response.json()


async def sign_in(client: Client, customer: Customer) -> None:
    """Log in, registering first when the customer is new; the session is kept."""
    async with customer.signing_in:
        if customer.token:
            if client.journey.session is None:
                client.journey.session = "reused"
            return
        client.journey.session = "new"
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


async def authed(
    client: Client,
    customer: Customer,
    step: str,
    method: str,
    path: str,
    *,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    """A call in the customer's session; when the session has ended (401), log in again
    and retry, once."""
    await sign_in(client, customer)
    used = customer.token
    response = await client.call(step, method, path, customer=customer, body=body, headers=headers)
    if response.status_code == 401:
        async with customer.signing_in:
            if customer.token == used:
                customer.token = None
        await sign_in(client, customer)
        response = await client.call(
            step, method, path, customer=customer, body=body, headers=headers
        )
    return response


# ---------------------------------------------------------------- steps


async def search(client: Client, rng: random.Random) -> list[dict[str, Any]]:
    """Search a road (intercity ones more often, either direction): the trips with seats."""
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
    return [t for t in found if t.get("seats_left", 0) > 0]


async def view_trip(client: Client, rng: random.Random, trips: list[dict[str, Any]]) -> Any:
    """Open one of the first trips found."""
    trip = rng.choice(trips[:6])
    _ok(await client.call("view_trip", "GET", f"/api/trips/{trip['trip_id']}"), "view_trip")
    return trip


async def hold(client: Client, customer: Customer, trip: dict[str, Any]) -> Any:
    """Hold a seat on `trip` (logging in first when needed): the booking."""
    booking = _ok(
        await authed(
            client, customer, "hold", "POST", "/api/bookings", body={"trip_id": trip["trip_id"]}
        ),
        "hold",
    )
    client.journey.booking_id = booking["booking_id"]
    return booking


async def _guarded(journey: Journey, steps: Awaitable[None]) -> Journey:
    """Run a journey's steps; a failure is recorded in the journey, never raised."""
    try:
        await steps
    except JourneyError as exc:
        journey.result, journey.error = "failed", str(exc)
        journey.error_kind = "http_5xx" if exc.status >= 500 else "http_4xx"
    except httpx.TimeoutException as exc:
        journey.result, journey.error = "failed", f"{type(exc).__name__}: {exc}"
        journey.error_kind = "timeout"
    except httpx.TransportError as exc:
        journey.result, journey.error = "failed", f"{type(exc).__name__}: {exc}"
        journey.error_kind = "connection"
    except httpx.HTTPError as exc:
        journey.result, journey.error = "failed", f"{type(exc).__name__}: {exc}"
        journey.error_kind = "http"
    except (ValueError, KeyError, TypeError) as exc:  # an answer not shaped as documented
        journey.result, journey.error = "failed", f"{type(exc).__name__}: {exc}"
        journey.error_kind = "bad_response"
    return journey


# ---------------------------------------------------------------- journeys

JourneyFn = Callable[[str, httpx.AsyncClient, Customer, random.Random], Awaitable[Journey]]


async def browse(
    gateway: str, http: httpx.AsyncClient, customer: Customer, rng: random.Random
) -> Journey:
    """Search, and leave."""
    journey = Journey(kind="browse")
    client = Client(gateway, http, journey)

    async def steps() -> None:
        await search(client, rng)
        journey.result = "ok"

    return await _guarded(journey, steps())


async def look(
    gateway: str, http: httpx.AsyncClient, customer: Customer, rng: random.Random
) -> Journey:
    """Search, view a trip, and leave."""
    journey = Journey(kind="look")
    client = Client(gateway, http, journey)

    async def steps() -> None:
        trips = await search(client, rng)
        if not trips:
            journey.result = "no_trip"
            return
        await view_trip(client, rng, trips)
        journey.result = "ok"

    return await _guarded(journey, steps())


async def abandon(
    gateway: str, http: httpx.AsyncClient, customer: Customer, rng: random.Random
) -> Journey:
    """Search, view a trip, log in, hold a seat, and never pay (the hold expires)."""
    journey = Journey(kind="abandon")
    client = Client(gateway, http, journey)

    async def steps() -> None:
        trips = await search(client, rng)
        if not trips:
            journey.result = "no_trip"
            return
        trip = await view_trip(client, rng, trips)
        await hold(client, customer, trip)
        journey.result = "abandoned"

    return await _guarded(journey, steps())


async def check(
    gateway: str, http: httpx.AsyncClient, customer: Customer, rng: random.Random
) -> Journey:
    """A returning customer looks at one of their bookings and its ticket."""
    journey = Journey(kind="check")
    client = Client(gateway, http, journey)

    async def steps() -> None:
        if not customer.bookings:
            journey.result = "no_booking"
            return
        booking_id = rng.choice(customer.bookings)
        journey.booking_id = booking_id
        _ok(await authed(client, customer, "booking", "GET", f"/api/bookings/{booking_id}"),
            "booking")  # fmt: skip
        _ok(await authed(client, customer, "ticket", "GET", f"/api/tickets/{booking_id}"),
            "ticket")  # fmt: skip
        journey.result = "ok"

    return await _guarded(journey, steps())


async def buy(
    gateway: str,
    http: httpx.AsyncClient,
    customer: Customer,
    rng: random.Random,
    provider: str | None = None,
) -> Journey:
    """One whole buy journey: search, view, log in, hold, pay (with `provider`, else the
    platform's payment route: M-Pesa first), poll, the ticket, the bus on the map.
    Failures are recorded in the result, never raised."""
    journey = Journey(kind="buy")
    client = Client(gateway, http, journey)

    async def steps() -> None:
        trips = await search(client, rng)
        if not trips:
            journey.result = "no_trip"
            return
        trip = await view_trip(client, rng, trips)
        booking = await hold(client, customer, trip)
        pay_body: dict[str, Any] = {"booking_id": booking["booking_id"], "phone": customer.phone}
        if provider is not None:
            pay_body["provider"] = provider
        paid = await authed(
            client,
            customer,
            "pay",
            "POST",
            "/api/payments",
            body=pay_body,
            headers={"Idempotency-Key": uuid.UUID(int=rng.getrandbits(128)).hex},
        )
        journey.buy_trace_id = paid.headers.get("x-trace-id")
        payment = _ok(paid, "pay")
        journey.payment_id = payment["payment_id"]
        deadline = time.monotonic() + PAY_TIMEOUT_S
        while payment.get("status") == "pending" and time.monotonic() < deadline:
            await asyncio.sleep(POLL_EVERY_S)
            payment = _ok(
                await authed(
                    client, customer, "poll", "GET", f"/api/payments/{journey.payment_id}"
                ),
                "poll",
            )
        journey.result = str(payment.get("result") or payment.get("status"))
        if payment.get("status") == "succeeded":
            customer.bookings = [*customer.bookings, booking["booking_id"]][-KEPT_BOOKINGS:]
            await asyncio.sleep(0.5)
            ticket = await authed(
                client, customer, "ticket", "GET", f"/api/tickets/{journey.booking_id}"
            )
            if ticket.status_code >= 400:
                journey.error = f"ticket: {ticket.status_code}"
            # Where is my bus? Customers look at the live map of their route.
            await client.call(
                "track_bus", "GET", "/api/fleet/buses?" + str(httpx.QueryParams(
                    {"route": trip["route_id"]}))
            )  # fmt: skip

    return await _guarded(journey, steps())


#: Every journey kind by name (`buy` with the platform's payment route).
JOURNEYS: dict[str, JourneyFn] = {
    "browse": browse,
    "look": look,
    "abandon": abandon,
    "buy": buy,
    "check": check,
}
