"""payments as a real process against the real providers simulator and a real in-test
HTTP stand-in for ticketing's internal routes: the async callback flow, idempotency, the
outcome taxonomy, the payment route's fallback, status polling, reconciliation and the
trace linkage between the buy, the callback and the confirmation."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.busline.conftest import Envelopes, Platform, Proc
from tests.support import ExportedSpan, http_peer, wait_until

PHONE = "254712345678"
FAST_PROVIDERS = {
    "BUSLINE_PROVIDERS_LATENCY_SCALE": "0.05",
    "BUSLINE_CALLBACK_DELAY_S": "0.3,0.5",
    "BUSLINE_DECLINE_RATE": "0",
}


class Ticketing:
    """A stand-in for ticketing's internal routes on a real socket (uvicorn in a thread),
    registered in the platform's port files as "ticketing"."""

    def __init__(self, state: Path) -> None:
        self.bookings: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str, dict[str, str], Any]] = []
        self.lock = threading.Lock()
        app = Starlette(
            routes=[
                Route("/healthz", self._health),
                Route("/internal/bookings/{booking_id}", self._booking),
                Route("/internal/bookings/{booking_id}/confirm", self._confirm, methods=["POST"]),
                Route(
                    "/internal/bookings/{booking_id}/payment-failed",
                    self._failed,
                    methods=["POST"],
                ),
            ]
        )
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_config=None, lifespan="off"))
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True
        )
        self.thread.start()
        wait_until(lambda: self.server.started, 10.0, "the ticketing stand-in")
        (state / "run").mkdir(parents=True, exist_ok=True)
        record = {
            "service": "ticketing",
            "host": "127.0.0.1",
            "port": port,
            "pid": os.getpid(),
            "version": "test",
            "started_at": time.time(),
        }
        (state / "run" / "ticketing.json").write_text(json.dumps(record))

    def add(self, user_id: str = "u1", amount: int = 1500, status: str = "held") -> str:
        booking_id = uuid.uuid4().hex
        self.bookings[booking_id] = {
            "booking_id": booking_id,
            "user_id": user_id,
            "amount_kes": amount,
            "status": status,
            "route_id": "nbo-mba",
            "trip_id": "t1",
        }
        return booking_id

    def calls_to(self, booking_id: str, action: str) -> list[tuple[dict[str, str], Any]]:
        path = f"/internal/bookings/{booking_id}/{action}"
        with self.lock:
            return [(h, body) for method, p, h, body in self.calls if p == path]

    async def _record(self, request: Request) -> Any:
        body = json.loads(await request.body() or b"null")
        with self.lock:
            self.calls.append(
                (request.method, request.url.path, dict(request.headers.items()), body)
            )
        return body

    async def _health(self, _: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def _booking(self, request: Request) -> JSONResponse:
        await self._record(request)
        booking = self.bookings.get(request.path_params["booking_id"])
        if booking is None:
            return JSONResponse({"error": "booking_not_found", "message": "no"}, status_code=404)
        return JSONResponse(booking)

    async def _confirm(self, request: Request) -> JSONResponse:
        await self._record(request)
        booking = self.bookings[request.path_params["booking_id"]]
        booking["status"] = "confirmed"
        return JSONResponse({"booking_id": booking["booking_id"], "status": "confirmed"})

    async def _failed(self, request: Request) -> JSONResponse:
        await self._record(request)
        booking = self.bookings[request.path_params["booking_id"]]
        return JSONResponse({"booking_id": booking["booking_id"], "status": booking["status"]})

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture
def ticketing(platform: Platform) -> Iterator[Ticketing]:
    stand_in = Ticketing(platform.state)
    try:
        yield stand_in
    finally:
        stand_in.close()


def pay(
    platform: Platform,
    booking_id: str,
    *,
    user: str = "u1",
    key: str | None = None,
    phone: str = PHONE,
    **extra: Any,
) -> httpx.Response:
    headers = {"X-User-Id": user, "Idempotency-Key": key or uuid.uuid4().hex}
    headers.update(extra.pop("headers", {}))
    body = {"booking_id": booking_id, "phone": phone, **extra}
    return httpx.post(
        platform.url("payments") + "/payments", json=body, headers=headers, timeout=30
    )


def status(platform: Platform, payment_id: str, user: str = "u1") -> dict[str, Any]:
    url = f"{platform.url('payments')}/payments/{payment_id}"
    answer: dict[str, Any] = httpx.get(url, headers={"X-User-Id": user}, timeout=30).json()
    return answer


def ledger(platform: Platform) -> list[dict[str, Any]]:
    payments: list[dict[str, Any]] = httpx.get(
        platform.url("providers") + "/_sim/ledger", timeout=10
    ).json()["payments"]
    return payments


def metric_samples(proc: Proc) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The process's metrics, read from the URL its `lookout_sdk_started` line gives."""
    started = [line for line in proc.json_lines() if line.get("event") == "lookout_sdk_started"]
    assert started, "no lookout_sdk_started line"
    text = httpx.get(started[0]["metrics_url"], timeout=5).text
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def outcomes(proc: Proc) -> dict[tuple[str, str], float]:
    return {
        (dict(labels)["provider"], dict(labels)["result"]): value
        for (name, labels), value in metric_samples(proc).items()
        if name == "payment_outcomes_total"
    }


def events(proc: Proc, event: str) -> list[dict[str, Any]]:
    return [line for line in proc.json_lines() if line.get("event") == event]


def settled(platform: Platform, ticketing: Ticketing, booking_id: str, action: str) -> Any:
    return wait_until(
        lambda: ticketing.calls_to(booking_id, action), 15.0, f"{action} of {booking_id}"
    )


# ---------------------------------------------------------------- the happy path


def test_a_payment_is_confirmed_once_through_the_providers_callback(
    platform: Platform, ticketing: Ticketing
) -> None:
    """POST /payments answers 202 pending at once; the M-Pesa callback seconds later makes
    ticketing's confirm happen exactly once with the booking's amount, and the business
    metrics and the `payment_result` log line follow."""
    platform.start("providers", **FAST_PROVIDERS)
    proc = platform.start("payments")
    booking_id = ticketing.add(amount=1500)
    answer = pay(platform, booking_id, phone="0712 345 678")
    assert answer.status_code == 202
    payment_id = answer.json()["payment_id"]
    assert answer.json() == {
        "payment_id": payment_id,
        "status": "pending",
        "result": None,
        "provider": "mpesa",
        "booking_id": booking_id,
        "amount_kes": 1500,
    }
    [(_, confirm)] = settled(platform, ticketing, booking_id, "confirm")
    assert confirm == {
        "payment_id": payment_id,
        "provider": "mpesa",
        "amount_kes": 1500,
        "phone": PHONE,
    }
    assert status(platform, payment_id) == {
        **answer.json(),
        "status": "succeeded",
        "result": "success",
    }
    # The callback was answered 200 once (so never retried) and payments confirms before
    # answering it: from here on no other confirm can come.
    [push] = wait_until(
        lambda: [p for p in ledger(platform) if p["callback_delivered"]], 10.0, "the delivery"
    )
    assert (push["amount"], push["phone"]) == (1500, PHONE)
    assert [a["status"] for a in push["callback_attempts"]] == [200]
    assert len(ticketing.calls_to(booking_id, "confirm")) == 1
    samples = metric_samples(proc)
    assert outcomes(proc) == {("mpesa", "success"): 1.0}
    assert samples[("payment_revenue_total", (("currency", "KES"), ("provider", "mpesa")))] == 1500
    assert samples[("payment_callback_delay_seconds_count", (("provider", "mpesa"),))] == 1
    assert samples[("payments_pending", ())] == 0
    [result] = events(proc, "payment_result")
    assert (result["payment_id"], result["result"], result["source"]) == (
        payment_id,
        "success",
        "callback",
    )
    assert not any(PHONE in line for line in proc.lines)


def test_a_push_whose_answer_never_came_stays_pending_and_its_callback_settles_it(
    platform: Platform, ticketing: Ticketing
) -> None:
    """M-Pesa takes the push but its answer comes after payments stopped waiting: the
    provider may be charging the customer, so the payment stays pending (not `timeout`,
    no fallback to another provider); the callback, found through the payment id in its
    URL, confirms the booking."""
    platform.start(
        "providers",
        BUSLINE_PROVIDERS_LATENCY_SCALE="6",  # pushes answered after about 3.6 s
        BUSLINE_CALLBACK_DELAY_S="0.5,0.5",
        BUSLINE_DECLINE_RATE="0",
    )
    proc = platform.start("payments", BUSLINE_PROVIDER_TIMEOUT_S="1")
    booking_id = ticketing.add(amount=900)
    answer = pay(platform, booking_id)
    assert answer.status_code == 202, answer.text
    assert (answer.json()["status"], answer.json()["result"]) == ("pending", None)
    [unanswered] = wait_until(
        lambda: events(proc, "payment_push_unanswered"), 10.0, "the unanswered push's line"
    )
    assert unanswered["provider"] == "mpesa"
    [(_, confirm)] = settled(platform, ticketing, booking_id, "confirm")
    assert confirm["payment_id"] == answer.json()["payment_id"]
    assert status(platform, answer.json()["payment_id"])["status"] == "succeeded"
    assert [p["provider"] for p in ledger(platform)] == ["mpesa"], "one push, no fallback"
    assert outcomes(proc) == {("mpesa", "success"): 1.0}


def test_a_success_after_the_payment_timed_out_is_a_refund_to_make(
    platform: Platform, ticketing: Ticketing
) -> None:
    """The customer pays after payments gave up (`timeout`): the late success is money
    without a ticket, counted in `payment_refunds_required_total` and logged as an error."""
    platform.start("providers", **{**FAST_PROVIDERS, "BUSLINE_CALLBACK_DELAY_S": "4,4"})
    proc = platform.start("payments", BUSLINE_PAYMENT_TIMEOUT_S="1", BUSLINE_POLL_AFTER_S="0.5")
    booking_id = ticketing.add()
    payment_id = pay(platform, booking_id).json()["payment_id"]
    wait_until(lambda: status(platform, payment_id)["result"] == "timeout", 10, "the timeout")
    wait_until(lambda: events(proc, "payment_result_conflict"), 15, "the late success")
    [conflict] = events(proc, "payment_result_conflict")
    assert (conflict["kept"], conflict["reported"], conflict["refund_required"]) == (
        "timeout",
        "success",
        True,
    )
    assert conflict["level"] == "error"
    refunds = metric_samples(proc)[("payment_refunds_required_total", (("provider", "mpesa"),))]
    assert refunds == 1


def test_bad_requests_are_4xx_naming_the_field(platform: Platform, ticketing: Ticketing) -> None:
    """Headers, body fields, someone else's booking, a booking not held, a reused key."""
    platform.start("providers", **FAST_PROVIDERS)
    platform.start("payments")
    mine = ticketing.add(user_id="u1")
    theirs = ticketing.add(user_id="u2")
    confirmed = ticketing.add(status="confirmed")
    url = platform.url("payments") + "/payments"

    def error(answer: httpx.Response) -> tuple[int, str, str | None]:
        body = answer.json()
        return answer.status_code, body["error"], body.get("field")

    body = {"booking_id": mine, "phone": PHONE}
    assert error(httpx.post(url, json=body, headers={"Idempotency-Key": "k"})) == (
        400,
        "invalid_request",
        "X-User-Id",
    )
    assert error(httpx.post(url, json=body, headers={"X-User-Id": "u1"})) == (
        400,
        "invalid_request",
        "Idempotency-Key",
    )
    assert error(pay(platform, mine, key="k" * 101)) == (400, "invalid_request", "Idempotency-Key")
    assert error(pay(platform, mine, phone="call me")) == (400, "invalid_request", "phone")
    assert error(pay(platform, mine, provider="paypal")) == (400, "invalid_request", "provider")
    assert error(pay(platform, "")) == (400, "invalid_request", "booking_id")
    assert error(pay(platform, "nope")) == (404, "booking_not_found", "booking_id")
    assert error(pay(platform, theirs)) == (404, "booking_not_found", "booking_id")
    assert error(pay(platform, confirmed)) == (409, "booking_not_payable", "booking_id")
    first = pay(platform, mine, key="same")
    assert first.status_code == 202
    assert error(pay(platform, theirs, key="same")) == (
        422,
        "idempotency_key_reused",
        "Idempotency-Key",
    )
    other = httpx.get(
        f"{platform.url('payments')}/payments/{first.json()['payment_id']}",
        headers={"X-User-Id": "u2"},
    )
    assert error(other) == (404, "payment_not_found", "payment_id")
    garbled = httpx.post(platform.url("payments") + "/callbacks/mpesa", json={"Body": {}})
    assert error(garbled) == (400, "invalid_request", "Body.stkCallback.CheckoutRequestID")


def test_a_callback_for_an_unknown_payment_is_404_and_logged(
    platform: Platform, ticketing: Ticketing
) -> None:
    """A well-formed callback nobody initiated: 404 `unknown_payment`, a warning line."""
    platform.start("providers", **FAST_PROVIDERS)
    proc = platform.start("payments")
    body = {
        "Body": {
            "stkCallback": {
                "MerchantRequestID": "1-2-3",
                "CheckoutRequestID": "ws_CO_forged",
                "ResultCode": 0,
                "ResultDesc": "ok",
            }
        }
    }
    answer = httpx.post(platform.url("payments") + "/callbacks/mpesa", json=body)
    assert (answer.status_code, answer.json()["error"]) == (404, "unknown_payment")
    warning = wait_until(lambda: events(proc, "unknown_payment"), 5.0, "the warning")
    assert (warning[0]["level"], warning[0]["provider_request_id"]) == ("warning", "ws_CO_forged")
    assert ticketing.calls == []


# ---------------------------------------------------------------- outcomes and the route


def test_every_outcome_of_the_taxonomy_is_produced_and_counted(
    platform: Platform, ticketing: Ticketing
) -> None:
    """Declines (cancelled, no funds, unreachable customer), a provider that never
    answers (timeout), 5xx on every provider (provider_error after the whole route),
    providers down (provider_unreachable) and an amount M-Pesa refuses (rejected): each is
    the payment's result, reaches ticketing's payment-failed, and is counted."""
    proc = platform.start("payments", BUSLINE_PAYMENT_TIMEOUT_S="1.5", BUSLINE_POLL_AFTER_S="0.5")

    def providers(**env: str) -> None:
        platform.stop("providers")
        platform.start("providers", **{**FAST_PROVIDERS, **env})

    found: dict[str, tuple[int, str | None]] = {}
    for decline, expected in [
        ("user_cancelled", "user_cancelled"),
        ("insufficient_funds", "insufficient_funds"),
        ("user_unreachable", "timeout"),
    ]:
        providers(BUSLINE_DECLINE_RATE="1", BUSLINE_DECLINE_SPLIT=f"{decline}=1")
        booking_id = ticketing.add()
        answer = pay(platform, booking_id)
        [(_, failed)] = settled(platform, ticketing, booking_id, "payment-failed")
        assert failed == {"payment_id": answer.json()["payment_id"], "result": expected}
        found[decline] = (
            answer.status_code,
            status(platform, answer.json()["payment_id"])["result"],
        )

    providers(BUSLINE_CALLBACK_DELAY_S="60,60")  # the customer never answers in time
    slow = pay(platform, ticketing.add()).json()["payment_id"]
    found["no answer"] = (
        202,
        wait_until(lambda: status(platform, slow)["result"], 10.0, "the payment to time out"),
    )

    providers(BUSLINE_ERROR_RATE="1")
    erroring = pay(platform, ticketing.add())
    found["5xx"] = (erroring.status_code, erroring.json()["result"])
    assert erroring.json()["error"] == "provider_error"

    # M-Pesa refuses an amount over its per-transaction limit (KES 250,000).
    rejected = pay(platform, ticketing.add(amount=300_000))
    found["rejected"] = (rejected.status_code, rejected.json()["result"])
    # A number that is not Kenyan mobile never reaches a provider (ticketing and the SMS
    # gateway could not use it either): 400 naming the field.
    foreign = pay(platform, ticketing.add(), phone="255712345678")
    assert foreign.status_code == 400
    assert foreign.json()["field"] == "phone"

    platform.stop("providers")
    down = pay(platform, ticketing.add())
    found["down"] = (down.status_code, down.json()["result"])

    assert found == {
        "user_cancelled": (202, "user_cancelled"),
        "insufficient_funds": (202, "insufficient_funds"),
        "user_unreachable": (202, "timeout"),
        "no answer": (202, "timeout"),
        "5xx": (502, "provider_error"),
        "rejected": (422, "rejected"),
        "down": (502, "provider_unreachable"),
    }
    assert outcomes(proc) == {
        ("mpesa", "user_cancelled"): 1,
        ("mpesa", "insufficient_funds"): 1,
        ("mpesa", "timeout"): 2,
        ("mpesa", "provider_error"): 1,
        ("airtel", "provider_error"): 1,
        ("card", "provider_error"): 1,
        ("mpesa", "rejected"): 1,
        ("mpesa", "provider_unreachable"): 1,
        ("airtel", "provider_unreachable"): 1,
        ("card", "provider_unreachable"): 1,
    }
    assert metric_samples(proc)[("payments_pending", ())] == 0


def test_the_payment_route_from_control_state_orders_primary_and_fallback(
    platform: Platform, ticketing: Ticketing
) -> None:
    """Route card -> airtel -> mpesa with the card acquirer erroring: the payment falls
    back to Airtel (never M-Pesa); an explicit provider is used alone, without fallback."""
    (platform.state / "control.json").write_text(
        json.dumps({"payment_route": {"primary": "card", "fallback": ["airtel", "mpesa"]}})
    )
    platform.start("providers", BUSLINE_ERROR_RATE="card=1", **FAST_PROVIDERS)
    proc = platform.start("payments")
    booking_id = ticketing.add()
    answer = pay(platform, booking_id)
    assert (answer.status_code, answer.json()["provider"]) == (202, "airtel")
    [(_, confirm)] = settled(platform, ticketing, booking_id, "confirm")
    assert confirm["provider"] == "airtel"
    assert [p["provider"] for p in ledger(platform)] == ["airtel"]

    explicit = pay(platform, ticketing.add(), provider="card")
    assert (explicit.status_code, explicit.json()["result"]) == (502, "provider_error")
    assert [p["provider"] for p in ledger(platform)] == ["airtel"]
    assert outcomes(proc) == {
        ("card", "provider_error"): 2,
        ("airtel", "success"): 1,
    }


async def test_twenty_concurrent_identical_requests_make_one_push(
    platform: Platform, ticketing: Ticketing
) -> None:
    """20 identical requests at once (one Idempotency-Key): one STK push in the provider's
    ledger, one payment id for all; a new key is a new push (the count can move)."""
    platform.start("providers", **FAST_PROVIDERS)
    platform.start("payments")
    booking_id = ticketing.add()
    headers = {"X-User-Id": "u1", "Idempotency-Key": "buy-once"}
    body = {"booking_id": booking_id, "phone": PHONE}
    async with httpx.AsyncClient(base_url=platform.url("payments"), timeout=30) as client:
        answers = await asyncio.gather(
            *(client.post("/payments", json=body, headers=headers) for _ in range(20))
        )
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["payment_id"] for a in answers}) == 1
    assert len(ledger(platform)) == 1
    settled(platform, ticketing, booking_id, "confirm")
    late = pay(platform, booking_id, key="buy-once")
    assert (late.status_code, late.json()["status"]) == (200, "succeeded")
    assert late.json()["payment_id"] == answers[0].json()["payment_id"]
    assert pay(platform, ticketing.add(), key="buy-twice").status_code == 202
    assert len(ledger(platform)) == 2
    # Another key for a booking whose payment is in flight (a second tab): refused,
    # nothing pushed; the database's partial unique index decides, not a check before it.
    platform.stop("providers")  # a customer slow to answer: the first payment stays pending
    platform.start("providers", **{**FAST_PROVIDERS, "BUSLINE_CALLBACK_DELAY_S": "20,30"})
    held = ticketing.add()
    first = pay(platform, held, key="tab-1")
    second = pay(platform, held, key="tab-2")
    assert first.status_code == 202
    assert second.status_code == 409, second.text
    assert second.json()["error"] == "booking_already_paying"
    assert second.json()["payment_id"] == first.json()["payment_id"]
    assert len(ledger(platform)) == 3


# ---------------------------------------------------------------- traces, polling, reconciliation


def spans_named(spans: list[ExportedSpan], name: str) -> list[ExportedSpan]:
    return [s for s in spans if s.name == name]


def tracing_env(endpoint: str) -> dict[str, str]:
    return {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
        "OTEL_BSP_SCHEDULE_DELAY": "200",
    }


def test_the_callback_links_to_the_buy_and_the_confirmation_continues_its_trace(
    platform: Platform, ticketing: Ticketing
) -> None:
    """The buy's trace T: POST /payments (span S) continues the caller's traceparent.
    The callback is a new trace whose `payment.callback` span links to exactly (T, S)
    (its own server span links to nothing: the link is the callback span's). The
    `payment.confirm` span is in T with parent S and links back to the callback span,
    and ticketing's confirm receives T in traceparent and X-Trace-Id."""
    trace_id, caller = uuid.uuid4().hex, uuid.uuid4().hex[:16]
    with http_peer() as (endpoint, recorder):
        platform.start("providers", **FAST_PROVIDERS)
        platform.start("payments", **tracing_env(endpoint))
        booking_id = ticketing.add()
        answer = pay(platform, booking_id, headers={"traceparent": f"00-{trace_id}-{caller}-01"})
        assert answer.headers["x-trace-id"] == trace_id
        [(headers, _)] = settled(platform, ticketing, booking_id, "confirm")

        def exported() -> list[ExportedSpan] | None:
            with recorder.lock:
                spans = list(recorder.spans)
            names = {s.name for s in spans}
            wanted = {
                "POST /payments",
                "payment.callback",
                "payment.confirm",
                "POST 127.0.0.1",
                # The callback's server span ends after its child: it may come a batch later.
                "POST /callbacks/{provider}/{payment_id}",
            }
            return spans if wanted <= names else None

        spans = wait_until(exported, 10.0, "the spans")
    [buy] = spans_named(spans, "POST /payments")
    assert (buy.trace_id, buy.parent_span_id) == (trace_id, caller)
    [callback_server] = spans_named(spans, "POST /callbacks/{provider}/{payment_id}")
    [callback] = spans_named(spans, "payment.callback")
    assert callback.trace_id != trace_id
    assert (callback.trace_id, callback.parent_span_id) == (
        callback_server.trace_id,
        callback_server.span_id,
    )
    assert callback.links == [(trace_id, buy.span_id)]
    assert callback_server.links == []
    [confirm] = spans_named(spans, "payment.confirm")
    assert (confirm.trace_id, confirm.parent_span_id) == (trace_id, buy.span_id)
    assert confirm.links == [(callback.trace_id, callback.span_id)]
    assert confirm.attributes["payment.result"] == "success"
    [to_ticketing] = [
        s for s in spans_named(spans, "POST 127.0.0.1") if s.parent_span_id == confirm.span_id
    ]
    assert headers["traceparent"] == f"00-{trace_id}-{to_ticketing.span_id}-01"
    assert headers["x-trace-id"] == trace_id
    [initiate] = spans_named(spans, "payment.initiate")
    assert (initiate.trace_id, initiate.parent_span_id) == (trace_id, buy.span_id)


def test_polling_applies_the_result_when_the_callback_is_lost(
    platform: Platform, ticketing: Ticketing
) -> None:
    """Every callback lost: a status read past BUSLINE_POLL_AFTER_S queries M-Pesa, and
    the result goes through the same confirmation, in the buy's trace, linked to the
    poll's request."""
    with http_peer() as (endpoint, recorder):
        platform.start("providers", BUSLINE_CALLBACK_LOSS="1", **FAST_PROVIDERS)
        platform.start("payments", BUSLINE_POLL_AFTER_S="1", **tracing_env(endpoint))
        booking_id = ticketing.add()
        answer = pay(platform, booking_id)
        payment_id = answer.json()["payment_id"]
        assert status(platform, payment_id)["status"] == "pending"  # not yet polled
        final = wait_until(
            lambda: (
                status(platform, payment_id)["status"] != "pending" and status(platform, payment_id)
            ),
            10.0,
            "the poll to settle the payment",
        )
        assert (final["status"], final["result"]) == ("succeeded", "success")
        assert len(ticketing.calls_to(booking_id, "confirm")) == 1
        [push] = ledger(platform)
        assert (push["callback_lost"], push["callback_attempts"]) == (True, [])

        def exported() -> list[ExportedSpan] | None:
            with recorder.lock:
                spans = list(recorder.spans)
            return spans if spans_named(spans, "payment.confirm") else None

        spans = wait_until(exported, 10.0, "the confirm span")
    [buy] = spans_named(spans, "POST /payments")
    [confirm] = spans_named(spans, "payment.confirm")
    assert (confirm.trace_id, confirm.parent_span_id) == (buy.trace_id, buy.span_id)
    polls = {(s.trace_id, s.span_id) for s in spans_named(spans, "GET /payments/{payment_id}")}
    assert len(confirm.links) == 1
    assert confirm.links[0] in polls
    assert confirm.links[0][0] != buy.trace_id


def test_reconciliation_settles_unpolled_payments_and_survives_a_failed_run(
    platform: Platform, ticketing: Ticketing
) -> None:
    """Callbacks lost and nobody polling: the scheduled reconciliation queries M-Pesa and
    confirms the booking (check-in ok). With the provider down, a run fails (check-in
    error, a `reconciliation_failed` line) and the schedule goes on: once the provider is
    back, the next run settles the payment."""
    sink = Envelopes()
    try:
        platform.start("providers", BUSLINE_CALLBACK_LOSS="1", **FAST_PROVIDERS)
        proc = platform.start(
            "payments",
            BUSLINE_RECONCILE_INTERVAL_S="1",
            BUSLINE_POLL_AFTER_S="0.5",
            SENTRY_DSN=sink.dsn,
        )
        first = ticketing.add()
        pay(platform, first)
        settled(platform, ticketing, first, "confirm")
        wait_until(lambda: "ok" in sink.statuses(), 10.0, "an ok check-in")

        second = ticketing.add()
        pay(platform, second)
        platform.stop("providers", signal.SIGKILL)
        wait_until(lambda: "error" in sink.statuses(), 10.0, "an error check-in")
        wait_until(lambda: events(proc, "reconciliation_failed"), 10, "the failed run logged")
        platform.start("providers", **FAST_PROVIDERS)
        settled(platform, ticketing, second, "confirm")
        errors_seen = sink.statuses().index("error")
        wait_until(lambda: "ok" in sink.statuses()[errors_seen:], 10.0, "ok after the error")
        assert {c["monitor_slug"] for c in sink.check_ins} == {"mpesa-reconciliation"}
        assert not [
            line
            for line in proc.json_lines()
            if line.get("event") == "payment_result" and line.get("source") != "reconciliation"
        ]
    finally:
        sink.close()
