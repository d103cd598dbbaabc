"""The outside world, simulated: M-Pesa (Daraja STK push, its callback and its status
query), Airtel Money, a card acquirer and an SMS gateway, in one process on a host of its
own (127.0.0.2, off the SDK's propagation allow-list).

It stands outside the company, so it is not instrumented: no `lookout` import, no trace
context read or written, its logs and metrics never shipped. Provider health is seen only
from inside, through payments' client spans and metrics.

Every decision (how long a call takes, whether it fails, what the customer does, when the
callback comes) goes through the provider's one `Behaviour`. The defaults:

| Call | Distribution |
| --- | --- |
| M-Pesa STK push request | lognormal, median 600 ms, sigma 0.35 (p95 about 1.1 s) |
| M-Pesa STK push query | lognormal, median 250 ms, sigma 0.3 |
| M-Pesa customer answers, then the callback | uniform 3-20 s after the push |
| Airtel collection request | lognormal, median 450 ms, sigma 0.4 |
| Airtel status query | lognormal, median 200 ms, sigma 0.3 |
| Airtel customer answers, then the callback | uniform 2-15 s |
| Card charge request | lognormal, median 900 ms, sigma 0.3 |
| Card charge status | lognormal, median 150 ms, sigma 0.3 |
| Card 3-D Secure done, then the webhook | uniform 1-6 s |
| SMS send | lognormal, median 150 ms, sigma 0.4 |
| Callback retries (a failed delivery) | after 1 s, 3 s and 9 s: 4 attempts |

Business declines: with no fault active, `BUSLINE_DECLINE_RATE` (0.05) of pushes and
charges are declined, split 60 % cancelled by the customer (M-Pesa 1032), 25 % insufficient
funds (1) and 15 % customer unreachable (1037), or the split in `BUSLINE_DECLINE_SPLIT`.
Until the customer answers, a status query says the transaction is still being processed.

Environment (each a `Behaviour` default; tests use short delays and a latency scale):

| Variable | Default | Meaning |
| --- | --- | --- |
| `BUSLINE_CALLBACK_DELAY_S` | per provider | `low,high`: seconds from a push to the answer |
| `BUSLINE_DECLINE_RATE` | `0.05` | fraction of pushes and charges declined |
| `BUSLINE_DECLINE_SPLIT` | 0.6, 0.25, 0.15 | e.g. `user_cancelled=1,insufficient_funds=1` |
| `BUSLINE_PROVIDERS_SEED` | (random) | seed of every random decision |
| `BUSLINE_PROVIDERS_LATENCY_SCALE` | `1.0` | multiplies request latencies and retry waits |
| `BUSLINE_ERROR_RATE` | `0` | fraction answered 5xx: `0.2` for all, or `mpesa=1,card=0.5` |
| `BUSLINE_CALLBACK_LOSS` | `0` | fraction of callbacks never sent (queries still answer) |

The ledger (`GET /_sim/ledger`) holds every push or charge, its result and each callback
delivery attempt, and every SMS; it is appended to `$BUSLINE_STATE/providers/ledger.jsonl`,
so it survives a restart (and undelivered callbacks are delivered after one).

This module is the HTTP side: each API's request checks, its refusals in the provider's
own error shape, the handlers and the app. The simulation they drive (`Behaviour`, the
`Ledger`, the `Simulator`) is in `busline.simulator`.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import random
import re
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from busline import kit
from busline.simulator import (
    MPESA_RESULTS,
    PAYMENT_PROVIDERS,
    Behaviour,
    Ledger,
    Lognormal,
    Simulator,
    Sms,
    airtel_transaction,
    behaviours_from_env,
    card_charge,
)

NAME = "providers"
log = logging.getLogger("busline.providers")

#: The shortcode and passkey of the simulated Daraja sandbox (payments uses the same pair:
#: `Password` is base64(shortcode + passkey + timestamp)).
MPESA_SHORTCODE = "174379"
MPESA_PASSKEY = "busline-simulator-passkey"


# ---------------------------------------------------------------- refusals and request checks


class RefusedError(Exception):
    """A request the provider refuses, answered in the provider's own error shape."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        super().__init__(json.dumps(body))
        self.status = status
        self.body = body


def _mpesa_error(code: str, message: str, status: int = 400) -> RefusedError:
    return RefusedError(
        status, {"requestId": _request_id(), "errorCode": code, "errorMessage": message}
    )


def _airtel_error(status: int, message: str, result_code: str = "ESB000008") -> RefusedError:
    return RefusedError(
        status,
        {
            "status": {
                "code": str(status),
                "message": message,
                "result_code": result_code,
                "success": False,
            }
        },
    )


def _card_error(param: str, message: str, code: str = "parameter_invalid") -> RefusedError:
    return RefusedError(
        400,
        {
            "error": {
                "type": "invalid_request_error",
                "code": code,
                "param": param,
                "message": message,
            }
        },
    )


def _request_id() -> str:
    return f"{secrets.randbelow(90000) + 10000}-{secrets.randbelow(9 * 10**7) + 10**7}-1"


MPESA_PHONE = re.compile(r"254[17]\d{8}")
AIRTEL_MSISDN = re.compile(r"[17]\d{8}")
URL = re.compile(r"https?://[^\s/]+(/\S*)?")


def _daraja_amount(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and 1 <= value <= 250_000:
        return value
    return None


def _daraja_text(value: Any) -> str:
    return (
        str(value).strip() if isinstance(value, str | int) and not isinstance(value, bool) else ""
    )


def validate_stk_push(body: Mapping[str, Any]) -> tuple[int, str]:
    """The amount and phone of a valid Daraja STK push request, or `RefusedError` as Daraja
    words it (`400.002.02 Bad Request - Invalid <Field>`)."""

    def invalid(name: str) -> RefusedError:
        return _mpesa_error("400.002.02", f"Bad Request - Invalid {name}")

    shortcode = _daraja_text(body.get("BusinessShortCode"))
    if not re.fullmatch(r"\d{5,7}", shortcode):
        raise invalid("BusinessShortCode")
    timestamp = _daraja_text(body.get("Timestamp"))
    try:
        datetime.strptime(timestamp, "%Y%m%d%H%M%S")  # Daraja's local time
    except ValueError:
        raise invalid("Timestamp") from None
    password = _daraja_text(body.get("Password"))
    try:
        decoded = base64.b64decode(password, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        decoded = ""
    if decoded != f"{shortcode}{MPESA_PASSKEY}{timestamp}":
        raise invalid("Password")
    if body.get("TransactionType") not in ("CustomerPayBillOnline", "CustomerBuyGoodsOnline"):
        raise invalid("TransactionType")
    amount = _daraja_amount(body.get("Amount"))
    if amount is None:
        raise invalid("Amount")
    phone = _daraja_text(body.get("PhoneNumber"))
    if not MPESA_PHONE.fullmatch(phone):
        raise invalid("PhoneNumber")
    if _daraja_text(body.get("PartyA")) != phone:
        raise invalid("PartyA")
    if not re.fullmatch(r"\d{5,7}", _daraja_text(body.get("PartyB"))):
        raise invalid("PartyB")
    if not URL.fullmatch(_daraja_text(body.get("CallBackURL"))):
        raise invalid("CallBackURL")
    reference = _daraja_text(body.get("AccountReference"))
    if not 1 <= len(reference) <= 12:
        raise invalid("AccountReference")
    if not 1 <= len(_daraja_text(body.get("TransactionDesc"))) <= 13:
        raise invalid("TransactionDesc")
    return amount, phone


Handler = Callable[[Request], Awaitable[JSONResponse]]


def _answers_rejections(handler: Handler) -> Handler:
    async def wrapped(request: Request) -> JSONResponse:
        try:
            return await handler(request)
        except RefusedError as exc:
            return JSONResponse(exc.body, status_code=exc.status)

    return wrapped


async def _body(request: Request, bad: RefusedError) -> dict[str, Any]:
    try:
        value = json.loads(await request.body())
    except ValueError:
        raise bad from None
    if not isinstance(value, dict):
        raise bad
    return value


def _sim(request: Request) -> Simulator:
    sim: Simulator = request.app.state.simulator
    return sim


# ---------------------------------------------------------------- M-Pesa


async def stk_push(request: Request) -> JSONResponse:
    sim = _sim(request)
    body = await _body(request, _mpesa_error("400.002.02", "Bad Request - Invalid JSON"))
    await sim.latency("mpesa")
    amount, phone = validate_stk_push(body)
    if sim.failing("mpesa"):
        raise _mpesa_error("500.003.1001", "Internal Server Error", status=500)
    stamp = datetime.now(kit.NAIROBI).strftime("%d%m%Y%H%M%S")  # Daraja: Kenyan time
    tx = sim.open_transaction(
        "mpesa",
        tx_id=f"ws_CO_{stamp}{secrets.randbelow(10**9):09d}",
        amount=amount,
        currency="KES",
        phone=phone,
        reference=_daraja_text(body["AccountReference"]),
        callback_url=_daraja_text(body["CallBackURL"]),
        merchant_request_id=_request_id(),
    )
    message = "Success. Request accepted for processing"
    return JSONResponse(
        {
            "MerchantRequestID": tx.merchant_request_id,
            "CheckoutRequestID": tx.id,
            "ResponseCode": "0",
            "ResponseDescription": message,
            "CustomerMessage": message,
        }
    )


async def stk_query(request: Request) -> JSONResponse:
    sim = _sim(request)
    body = await _body(request, _mpesa_error("400.002.02", "Bad Request - Invalid JSON"))
    await sim.latency("mpesa", query=True)
    if sim.failing("mpesa"):
        raise _mpesa_error("500.003.1001", "Internal Server Error", status=500)
    tx = sim.ledger.transactions.get(_daraja_text(body.get("CheckoutRequestID")))
    if tx is None or tx.provider != "mpesa":
        raise _mpesa_error("400.002.02", "Bad Request - Invalid CheckoutRequestID")
    if not tx.answered(time.time()):
        raise _mpesa_error("500.001.1001", "The transaction is being processed", status=500)
    code, desc = MPESA_RESULTS[tx.result]
    return JSONResponse(
        {
            "ResponseCode": "0",
            "ResponseDescription": "The service request has been accepted successsfully",
            "MerchantRequestID": tx.merchant_request_id,
            "CheckoutRequestID": tx.id,
            "ResultCode": str(code),
            "ResultDesc": desc,
        }
    )


# ---------------------------------------------------------------- Airtel Money


async def airtel_collect(request: Request) -> JSONResponse:
    sim = _sim(request)
    body = await _body(request, _airtel_error(400, "Request body is not valid JSON"))
    await sim.latency("airtel")
    if request.headers.get("x-country") != "KE" or request.headers.get("x-currency") != "KES":
        raise _airtel_error(400, "X-Country must be KE and X-Currency KES")
    subscriber = body.get("subscriber")
    transaction = body.get("transaction")
    if not isinstance(subscriber, dict) or not isinstance(transaction, dict):
        raise _airtel_error(400, "subscriber and transaction are required")
    msisdn = _daraja_text(subscriber.get("msisdn"))
    if not AIRTEL_MSISDN.fullmatch(msisdn):
        raise _airtel_error(400, "Invalid msisdn: 9 digits without the country code")
    amount = _daraja_amount(transaction.get("amount"))
    if amount is None:
        raise _airtel_error(400, "Invalid amount")
    tx_id = _daraja_text(transaction.get("id"))
    if not 1 <= len(tx_id) <= 64:
        raise _airtel_error(400, "Invalid transaction id")
    if tx_id in sim.ledger.transactions:
        raise _airtel_error(400, "Duplicate transaction id", result_code="ESB000041")
    callback_url = _daraja_text(body.get("callback_url"))
    if not URL.fullmatch(callback_url):
        raise _airtel_error(400, "Invalid callback_url")
    if sim.failing("airtel"):
        raise _airtel_error(500, "Internal error", result_code="ESB000001")
    sim.open_transaction(
        "airtel",
        tx_id=tx_id,
        amount=amount,
        currency="KES",
        phone=f"254{msisdn}",
        reference=_daraja_text(body.get("reference"))[:64],
        callback_url=callback_url,
    )
    return JSONResponse(
        {
            "data": {"transaction": {"id": tx_id, "status": "Success."}},
            "status": {
                "code": "200",
                "message": "Success.",
                "result_code": "ESB000010",
                "response_code": "DP00800001006",
                "success": True,
            },
        }
    )


async def airtel_status(request: Request) -> JSONResponse:
    sim = _sim(request)
    await sim.latency("airtel", query=True)
    if sim.failing("airtel"):
        raise _airtel_error(500, "Internal error", result_code="ESB000001")
    tx = sim.ledger.transactions.get(request.path_params["tx_id"])
    if tx is None or tx.provider != "airtel":
        raise _airtel_error(404, "Transaction not found", result_code="ESB000011")
    view = airtel_transaction(tx, time.time())
    return JSONResponse(
        {
            "data": {"transaction": view},
            "status": {
                "code": "200",
                "message": "SUCCESS",
                "result_code": "ESB000010",
                "response_code": view["response_code"],
                "success": True,
            },
        }
    )


# ---------------------------------------------------------------- the card acquirer


async def card_create(request: Request) -> JSONResponse:
    sim = _sim(request)
    body = await _body(request, _card_error("body", "Request body is not a JSON object"))
    await sim.latency("card")
    amount = body.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int):
        raise _card_error("amount", "amount must be an integer in minor units (cents)")
    if not 100 <= amount <= 100_000_000 or amount % 100:
        raise _card_error("amount", "amount must be whole shillings between 1 and 1,000,000")
    if body.get("currency") not in ("KES", "kes"):
        raise _card_error("currency", "currency must be KES")
    reference = _daraja_text(body.get("reference"))
    if not 1 <= len(reference) <= 64:
        raise _card_error("reference", "reference is required (at most 64 characters)")
    callback_url = _daraja_text(body.get("callback_url"))
    if not URL.fullmatch(callback_url):
        raise _card_error("callback_url", "callback_url must be an http(s) URL")
    customer = body.get("customer") or {}
    phone = _daraja_text(customer.get("phone")) if isinstance(customer, dict) else ""
    if sim.failing("card"):
        raise RefusedError(500, {"error": {"type": "api_error", "message": "Internal error"}})
    tx = sim.open_transaction(
        "card",
        tx_id=f"ch_{secrets.token_hex(12)}",
        amount=amount // 100,
        currency="KES",
        phone=phone,
        reference=reference,
        callback_url=callback_url,
    )
    return JSONResponse(card_charge(tx, time.time()), status_code=202)


async def card_status(request: Request) -> JSONResponse:
    sim = _sim(request)
    await sim.latency("card", query=True)
    if sim.failing("card"):
        raise RefusedError(500, {"error": {"type": "api_error", "message": "Internal error"}})
    tx = sim.ledger.transactions.get(request.path_params["charge_id"])
    if tx is None or tx.provider != "card":
        raise RefusedError(
            404,
            {
                "error": {
                    "type": "invalid_request_error",
                    "code": "resource_missing",
                    "param": "id",
                    "message": "No such charge",
                }
            },
        )
    return JSONResponse(card_charge(tx, time.time()))


# ---------------------------------------------------------------- the SMS gateway


def _sms_error(status: int, code: str, message: str) -> RefusedError:
    return RefusedError(status, {"status": "error", "code": code, "message": message})


async def sms_send(request: Request) -> JSONResponse:
    sim = _sim(request)
    body = await _body(request, _sms_error(400, "invalid_body", "send a JSON object"))
    await sim.latency("sms")
    to = body.get("to")
    if not isinstance(to, str) or not re.fullmatch(r"\+?\d{9,15}", to):
        raise _sms_error(400, "invalid_to", "to must be a phone number (9 to 15 digits)")
    message = body.get("message")
    if not isinstance(message, str) or not 1 <= len(message) <= 918:
        raise _sms_error(400, "invalid_message", "message must be 1 to 918 characters")
    client_ref = body.get("client_ref", "")
    if not isinstance(client_ref, str) or len(client_ref) > 100:
        raise _sms_error(400, "invalid_client_ref", "client_ref must be at most 100 characters")
    if sim.failing("sms"):
        raise _sms_error(503, "unavailable", "gateway busy, retry")
    if client_ref and client_ref in sim.ledger.sms_by_ref:
        sms = sim.ledger.sms[sim.ledger.sms_by_ref[client_ref]]
        sms.duplicates += 1
        sim.ledger.save_sms(sms)
        log.info("sms_duplicate message_id=%s", sms.message_id)
        return JSONResponse(
            {"message_id": sms.message_id, "status": "queued"},
            status_code=201,
            headers={"Idempotent-Replayed": "true"},
        )
    sms = Sms(
        message_id=f"ATXid_{secrets.token_hex(16)}",
        to=to,
        message=message,
        client_ref=client_ref,
        sent_at=time.time(),
    )
    sim.ledger.save_sms(sms)
    log.info("sms_sent message_id=%s length=%d", sms.message_id, len(message))
    return JSONResponse({"message_id": sms.message_id, "status": "queued"}, status_code=201)


# ---------------------------------------------------------------- the app


async def ledger_view(request: Request) -> JSONResponse:
    return JSONResponse(_sim(request).ledger.view(time.time()))


async def healthz(_: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "service": NAME, "version": kit.version()})


def create_app(env: Mapping[str, str] | None = None) -> Starlette:
    """The simulator app; its knobs come from `env` (default `os.environ`)."""
    env = os.environ if env is None else env
    seed = env.get("BUSLINE_PROVIDERS_SEED", "").strip()
    rng = random.Random(int(seed)) if seed else random.Random()  # noqa: S311 - simulation, not secrets
    ledger_path = kit.state_dir() / "providers" / "ledger.jsonl"
    simulator = Simulator(behaviours_from_env(env), Ledger(ledger_path), rng)
    # Faults reach the simulator through its agent (it reads busline's fault state, and
    # logs nothing: no lookout here either).
    from busline import fault_agent

    simulator.faults = fault_agent.start(NAME).provider

    @asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        simulator.client = httpx.AsyncClient(timeout=httpx.Timeout(5.0, connect=2.0))
        simulator.resume_callbacks()
        try:
            yield
        finally:
            await simulator.close()
            await simulator.client.aclose()

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route(
                "/mpesa/stkpush/v1/processrequest", _answers_rejections(stk_push), methods=["POST"]
            ),
            Route("/mpesa/stkpushquery/v1/query", _answers_rejections(stk_query), methods=["POST"]),
            Route(
                "/airtel/merchant/v1/payments/",
                _answers_rejections(airtel_collect),
                methods=["POST"],
            ),
            Route("/airtel/standard/v1/payments/{tx_id}", _answers_rejections(airtel_status)),
            Route("/card/v1/charges", _answers_rejections(card_create), methods=["POST"]),
            Route("/card/v1/charges/{charge_id}", _answers_rejections(card_status)),
            Route("/sms/v1/messages", _answers_rejections(sms_send), methods=["POST"]),
            Route("/_sim/ledger", ledger_view),
        ],
        lifespan=lifespan,
    )
    app.state.simulator = simulator
    return app


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s providers %(message)s")
    # One port per provider (and the SMS gateway), as separate companies have: one can
    # go down while the others answer.
    kit.serve(NAME, create_app(), host=kit.providers_host(), also=(*PAYMENT_PROVIDERS, "sms"))


__all__ = [
    "Behaviour",
    "Ledger",
    "Lognormal",
    "Simulator",
    "behaviours_from_env",
    "create_app",
    "main",
]
