"""The payment providers' APIs as payments speaks them: building M-Pesa STK push, Airtel
Money collection and card charge requests (and their status queries), reading the answers,
parsing the providers' callbacks, and mapping each provider's codes onto payments' outcome
taxonomy (`payments.RESULTS`). A failed call raises `ProviderFailureError` with its outcome.

`busline.payments` owns the flow (idempotency, fallbacks, confirmation); `busline.providers`
is the simulated other side of these APIs.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import httpx

from busline import kit

if TYPE_CHECKING:  # for annotations only: payments imports this module
    from busline.payments import Payment, Settings

__all__ = [
    "ProviderClient",
    "ProviderFailureError",
    "airtel_result",
    "card_result",
    "mpesa_result",
    "parse_callback",
]


class ProviderFailureError(Exception):
    """A call to a provider failed; `result` is its outcome in the taxonomy."""

    def __init__(self, result: str, detail: str) -> None:
        super().__init__(f"{result}: {detail}")
        self.result = result
        self.detail = detail


MPESA_RESULTS = {0: "success", 1032: "user_cancelled", 1: "insufficient_funds", 1037: "timeout"}
AIRTEL_RESULTS = {
    "DP00800001008": "user_cancelled",
    "DP00800001007": "insufficient_funds",
    "DP00800001024": "timeout",
}
CARD_RESULTS = {
    "authentication_abandoned": "user_cancelled",
    "insufficient_funds": "insufficient_funds",
    "authentication_timeout": "timeout",
}


def mpesa_result(code: Any) -> str:
    try:
        return MPESA_RESULTS.get(int(code), "provider_error")
    except (TypeError, ValueError):
        return "provider_error"


def airtel_result(status: Any, response_code: Any) -> str | None:
    """The outcome of an Airtel transaction status, or None while it is in progress."""
    if status == "TS":
        return "success"
    if status == "TF":
        return AIRTEL_RESULTS.get(str(response_code), "provider_error")
    return None


def card_result(status: Any, failure_code: Any) -> str | None:
    if status == "succeeded":
        return "success"
    if status == "failed":
        return CARD_RESULTS.get(str(failure_code), "provider_error")
    return None


def _invalid_callback(field: str) -> kit.Invalid:
    return kit.Invalid(field, "missing or not in the provider's callback shape")


def parse_callback(provider: str, body: Mapping[str, Any]) -> tuple[str, str | None]:
    """(provider request id, result or None for an interim status) of a callback body."""
    if provider == "mpesa":
        stk = (
            body.get("Body", {}).get("stkCallback") if isinstance(body.get("Body"), dict) else None
        )
        if not isinstance(stk, dict) or not isinstance(stk.get("CheckoutRequestID"), str):
            raise _invalid_callback("Body.stkCallback.CheckoutRequestID")
        if isinstance(stk.get("ResultCode"), bool) or not isinstance(stk.get("ResultCode"), int):
            raise _invalid_callback("Body.stkCallback.ResultCode")
        return stk["CheckoutRequestID"], mpesa_result(stk["ResultCode"])
    if provider == "airtel":
        tx = body.get("transaction")
        if not isinstance(tx, dict) or not isinstance(tx.get("id"), str):
            raise _invalid_callback("transaction.id")
        return tx["id"], airtel_result(tx.get("status_code"), tx.get("response_code"))
    data = body.get("data")
    charge = data.get("object") if isinstance(data, dict) else None
    if not isinstance(charge, dict) or not isinstance(charge.get("id"), str):
        raise _invalid_callback("data.object.id")
    return charge["id"], card_result(charge.get("status"), charge.get("failure_code"))


def socket_error(error: BaseException) -> OSError | None:
    """The socket's own error under an httpx error (ConnectionRefusedError, ...)."""
    pending = [error.__cause__, error.__context__]
    while pending:
        current = pending.pop(0)
        if current is None:
            continue
        if isinstance(current, OSError) and current.errno is not None:
            return current
        if isinstance(current, BaseExceptionGroup):
            pending.extend(current.exceptions)
        pending.extend((current.__cause__, current.__context__))
    return None


class ProviderClient:
    """The three payment APIs of the outside world, as payments speaks them."""

    def __init__(self, client: httpx.AsyncClient, settings: Settings) -> None:
        self.client = client
        self.settings = settings

    async def _send(self, method: str, path: str, body: Any = None, **kw: Any) -> httpx.Response:
        try:
            # Each provider listens on its own port (`/mpesa/...` -> `run/mpesa.json`).
            base = kit.url_of(path.split("/")[1])
        except kit.Unavailable as exc:
            raise ProviderFailureError("provider_unreachable", str(exc)) from None
        try:
            response = await self.client.request(method, base + path, json=body, **kw)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            # The socket's own reason (ConnectionRefusedError ...) goes into the log line.
            cause = socket_error(exc)
            detail = type(exc).__name__ if cause is None else f"{type(cause).__name__}: {cause}"
            raise ProviderFailureError("provider_unreachable", detail) from None
        except httpx.TimeoutException as exc:
            raise ProviderFailureError("timeout", type(exc).__name__) from None
        except httpx.TransportError as exc:
            raise ProviderFailureError("provider_error", type(exc).__name__) from None
        return response

    @staticmethod
    def _check(response: httpx.Response) -> dict[str, Any]:
        detail = response.text[:200]
        if response.status_code >= 500:
            raise ProviderFailureError("provider_error", f"{response.status_code} {detail}")
        if response.status_code >= 400:
            raise ProviderFailureError("rejected", f"{response.status_code} {detail}")
        try:
            value = response.json()
        except ValueError:
            raise ProviderFailureError("provider_error", "answer is not JSON") from None
        if not isinstance(value, dict):
            raise ProviderFailureError("provider_error", "answer is not a JSON object")
        return value

    def _mpesa_auth(self) -> dict[str, str]:
        stamp = datetime.now(kit.NAIROBI).strftime("%Y%m%d%H%M%S")  # Daraja: Kenyan time
        code = self.settings.mpesa_shortcode
        password = base64.b64encode(f"{code}{self.settings.mpesa_passkey}{stamp}".encode())
        return {"BusinessShortCode": code, "Password": password.decode(), "Timestamp": stamp}

    async def push(self, provider: str, payment: Payment, callback_url: str) -> str:
        """Ask the customer to pay; the provider's request id."""
        if provider == "mpesa":
            body = {
                **self._mpesa_auth(),
                "TransactionType": "CustomerPayBillOnline",
                "Amount": payment.amount_kes,
                "PartyA": payment.phone,
                "PartyB": self.settings.mpesa_shortcode,
                "PhoneNumber": payment.phone,
                "CallBackURL": callback_url,
                "AccountReference": f"BL{payment.booking_id[:10]}",
                "TransactionDesc": "Bus ticket",
            }
            answer = self._check(await self._send("POST", "/mpesa/stkpush/v1/processrequest", body))
            request_id = answer.get("CheckoutRequestID")
        elif provider == "airtel":
            phone = payment.phone
            msisdn = phone[3:] if phone.startswith("254") and len(phone) == 12 else phone
            body = {
                "reference": f"Bus ticket {payment.booking_id[:20]}",
                "subscriber": {"country": "KE", "currency": "KES", "msisdn": msisdn},
                "transaction": {
                    "amount": payment.amount_kes,
                    "country": "KE",
                    "currency": "KES",
                    "id": payment.payment_id,
                },
                "callback_url": callback_url,
            }
            headers = {"X-Country": "KE", "X-Currency": "KES"}
            response = await self._send(
                "POST", "/airtel/merchant/v1/payments/", body, headers=headers
            )
            answer = self._check(response)
            request_id = answer.get("data", {}).get("transaction", {}).get("id")
        else:
            body = {
                "amount": payment.amount_kes * 100,
                "currency": "KES",
                "reference": payment.payment_id,
                "customer": {"phone": payment.phone},
                "callback_url": callback_url,
            }
            request_id = self._check(await self._send("POST", "/card/v1/charges", body)).get("id")
        if not isinstance(request_id, str) or not request_id:
            raise ProviderFailureError(
                "provider_error", f"{provider} answered without a request id"
            )
        return request_id

    async def query(self, provider: str, request_id: str) -> str | None:
        """The final result the provider reports, or None while it is still pending."""
        if provider == "mpesa":
            body = {**self._mpesa_auth(), "CheckoutRequestID": request_id}
            response = await self._send("POST", "/mpesa/stkpushquery/v1/query", body)
            if response.status_code == 500 and "500.001.1001" in response.text:
                return None  # Daraja's "The transaction is being processed"
            return mpesa_result(self._check(response).get("ResultCode"))
        if provider == "airtel":
            path = f"/airtel/standard/v1/payments/{quote(request_id, safe='')}"
            response = await self._send("GET", path, headers={"X-Country": "KE"})
            tx = self._check(response).get("data", {}).get("transaction", {})
            return airtel_result(tx.get("status"), tx.get("response_code"))
        response = await self._send("GET", f"/card/v1/charges/{quote(request_id, safe='')}")
        charge = self._check(response)
        return card_result(charge.get("status"), charge.get("failure_code"))
