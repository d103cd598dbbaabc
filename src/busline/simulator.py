"""The providers simulator's state, with no HTTP in it: each provider's `Behaviour`
(latencies, declines, errors, lost callbacks), the `Ledger` of every payment and SMS, what a
provider reports about a transaction (its status views and callback bodies), and the
`Simulator` that opens transactions and delivers their callbacks, retrying failed ones.

`busline.providers` serves it over HTTP and tables the defaults and environment knobs.
Like providers, it stands outside the company: it imports nothing from `lookout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import secrets
import string
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from busline import kit

# The providers process's logger: its lines read as they did before the split.
log = logging.getLogger("busline.providers")

PAYMENT_PROVIDERS = ("mpesa", "airtel", "card")
DECLINES = ("user_cancelled", "insufficient_funds", "user_unreachable")
DEFAULT_DECLINE_SPLIT = {
    "user_cancelled": 0.6,
    "insufficient_funds": 0.25,
    "user_unreachable": 0.15,
}
DEFAULT_DECLINE_RATE = 0.05
RETRY_BACKOFF_S = (1.0, 3.0, 9.0)


# ---------------------------------------------------------------- behaviour


@dataclass(frozen=True)
class Lognormal:
    """A latency whose logarithm is normal: `median` seconds, spread `sigma`."""

    median_s: float
    sigma: float

    def draw(self, rng: random.Random) -> float:
        return math.exp(rng.gauss(math.log(self.median_s), self.sigma))


@dataclass
class Behaviour:
    """Everything a provider decides, in one place: the one object a fault changes."""

    request_latency: Lognormal
    query_latency: Lognormal
    callback_delay_s: tuple[float, float] = (3.0, 20.0)
    #: Extra wait between the customer's answer and the callback's delivery.
    callback_lag_s: float = 0.0
    callback_loss: float = 0.0
    decline_rate: float = DEFAULT_DECLINE_RATE
    decline_split: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_DECLINE_SPLIT))
    error_rate: float = 0.0
    latency_scale: float = 1.0

    def request_delay(self, rng: random.Random) -> float:
        return self.request_latency.draw(rng) * self.latency_scale

    def query_delay(self, rng: random.Random) -> float:
        return self.query_latency.draw(rng) * self.latency_scale

    def fails(self, rng: random.Random) -> bool:
        """Whether this call is answered with a 5xx."""
        return rng.random() < self.error_rate

    def outcome(self, rng: random.Random) -> str:
        """What the customer does: success, or one of `DECLINES`."""
        if rng.random() >= self.decline_rate:
            return "success"
        reasons = [r for r in DECLINES if self.decline_split.get(r, 0.0) > 0]
        if not reasons:
            return "user_cancelled"
        weights = [self.decline_split[r] for r in reasons]
        return rng.choices(reasons, weights=weights)[0]

    def answer_after(self, rng: random.Random) -> float:
        low, high = self.callback_delay_s
        return rng.uniform(low, high)

    def loses_callback(self, rng: random.Random) -> bool:
        return rng.random() < self.callback_loss

    def retry_wait(self, attempt: int) -> float:
        return RETRY_BACKOFF_S[attempt] * self.latency_scale


def _float_env(env: Mapping[str, str], name: str, default: float, low: float, high: float) -> float:
    return kit.env_number(env, name, default, low=low, high=high, unit="a number")


def _rates(env: Mapping[str, str], name: str) -> dict[str, float]:
    """`0.2` (every provider) or `mpesa=1,card=0.5` -> a rate per provider."""
    raw = env.get(name, "").strip()
    if not raw:
        return {}
    if "=" not in raw:
        rate = _float_env(env, name, 0.0, 0.0, 1.0)
        return dict.fromkeys((*PAYMENT_PROVIDERS, "sms"), rate)
    out: dict[str, float] = {}
    for part in raw.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in (*PAYMENT_PROVIDERS, "sms"):
            raise ValueError(f"{name} names provider {key!r}. Expected mpesa, airtel, card or sms.")
        out[key] = _float_env({name: value}, name, 0.0, 0.0, 1.0)
    return out


def _decline_split(env: Mapping[str, str]) -> dict[str, float]:
    raw = env.get("BUSLINE_DECLINE_SPLIT", "").strip()
    if not raw:
        return dict(DEFAULT_DECLINE_SPLIT)
    split = dict.fromkeys(DECLINES, 0.0)
    for part in raw.split(","):
        key, _, value = part.partition("=")
        key = key.strip()
        if key not in DECLINES:
            raise ValueError(
                f"BUSLINE_DECLINE_SPLIT names {key!r}. Expected {', '.join(DECLINES)}."
            )
        split[key] = _float_env({"v": value or "1"}, "v", 1.0, 0.0, 1000.0)
    return split


def behaviours_from_env(env: Mapping[str, str]) -> dict[str, Behaviour]:
    """Each provider's behaviour: the documented defaults, then the environment's knobs."""
    scale = _float_env(env, "BUSLINE_PROVIDERS_LATENCY_SCALE", 1.0, 0.0, 100.0)
    decline_rate = _float_env(env, "BUSLINE_DECLINE_RATE", DEFAULT_DECLINE_RATE, 0.0, 1.0)
    loss = _float_env(env, "BUSLINE_CALLBACK_LOSS", 0.0, 0.0, 1.0)
    split = _decline_split(env)
    errors = _rates(env, "BUSLINE_ERROR_RATE")
    delay: tuple[float, float] | None = None
    raw_delay = env.get("BUSLINE_CALLBACK_DELAY_S", "").strip()
    if raw_delay:
        try:
            low, high = (float(v) for v in raw_delay.split(","))
        except ValueError:
            raise ValueError(
                f"BUSLINE_CALLBACK_DELAY_S={raw_delay!r} is not 'low,high'. Expected e.g. 3,20."
            ) from None
        if not 0 <= low <= high:
            raise ValueError(f"BUSLINE_CALLBACK_DELAY_S={raw_delay!r} needs 0 <= low <= high.")
        delay = (low, high)
    defaults = {
        "mpesa": (Lognormal(0.6, 0.35), Lognormal(0.25, 0.3), (3.0, 20.0)),
        "airtel": (Lognormal(0.45, 0.4), Lognormal(0.2, 0.3), (2.0, 15.0)),
        "card": (Lognormal(0.9, 0.3), Lognormal(0.15, 0.3), (1.0, 6.0)),
        "sms": (Lognormal(0.15, 0.4), Lognormal(0.1, 0.3), (0.0, 0.0)),
    }
    return {
        name: Behaviour(
            request_latency=request,
            query_latency=query,
            callback_delay_s=delay or callback,
            callback_loss=loss,
            decline_rate=decline_rate,
            decline_split=dict(split),
            error_rate=errors.get(name, 0.0),
            latency_scale=scale,
        )
        for name, (request, query, callback) in defaults.items()
    }


# ---------------------------------------------------------------- the ledger


@dataclass
class Transaction:
    """One STK push, Airtel collection or card charge, and what became of it."""

    id: str
    provider: str
    amount: int
    currency: str
    phone: str
    reference: str
    callback_url: str
    requested_at: float
    answer_at: float
    result: str
    callback_lost: bool
    merchant_request_id: str = ""
    receipt: str = ""
    callback_attempts: list[dict[str, Any]] = field(default_factory=list)
    callback_delivered: bool = False

    def answered(self, now: float) -> bool:
        return now >= self.answer_at

    def callback_done(self) -> bool:
        """Delivered, lost, or every attempt spent."""
        spent = len(self.callback_attempts) > len(RETRY_BACKOFF_S)
        return self.callback_lost or self.callback_delivered or spent


@dataclass
class Sms:
    message_id: str
    to: str
    message: str
    client_ref: str
    sent_at: float
    duplicates: int = 0


class Ledger:
    """Every transaction and SMS, in memory and appended to a JSON-lines file (one full
    record per change; on load the last record of each id wins)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.transactions: dict[str, Transaction] = {}
        self.sms: dict[str, Sms] = {}
        self.sms_by_ref: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        try:
            lines = self.path.read_text().splitlines()
        except OSError:
            return
        for line in lines:
            try:
                record = json.loads(line)
                kind = record.pop("kind")
                if kind == "payment":
                    tx = Transaction(**record)
                    self.transactions[tx.id] = tx
                elif kind == "sms":
                    sms = Sms(**record)
                    self.sms[sms.message_id] = sms
                    if sms.client_ref:
                        self.sms_by_ref[sms.client_ref] = sms.message_id
            except (ValueError, TypeError, KeyError):
                log.warning("ledger_line_skipped: not a ledger record")

    def _append(self, record: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as out:
            out.write(json.dumps(record, sort_keys=True) + "\n")

    def save_transaction(self, tx: Transaction) -> None:
        self.transactions[tx.id] = tx
        self._append({"kind": "payment", **asdict(tx)})

    def save_sms(self, sms: Sms) -> None:
        self.sms[sms.message_id] = sms
        if sms.client_ref:
            self.sms_by_ref[sms.client_ref] = sms.message_id
        self._append({"kind": "sms", **asdict(sms)})

    def view(self, now: float) -> dict[str, Any]:
        payments = [
            {**asdict(tx), "status": "completed" if tx.answered(now) else "pending"}
            for tx in self.transactions.values()
        ]
        return {"payments": payments, "sms": [asdict(s) for s in self.sms.values()]}


# ---------------------------------------------------------------- what a provider reports

MPESA_RESULTS = {
    "success": (0, "The service request is processed successfully."),
    "user_cancelled": (1032, "Request cancelled by user"),
    "insufficient_funds": (1, "The balance is insufficient for the transaction"),
    "user_unreachable": (1037, "DS timeout user cannot be reached"),
}
AIRTEL_RESULTS = {
    "success": ("TS", "DP00800001001", "Transaction is successful"),
    "user_cancelled": ("TF", "DP00800001008", "The transaction was refused"),
    "insufficient_funds": ("TF", "DP00800001007", "Not enough balance"),
    "user_unreachable": ("TF", "DP00800001024", "Transaction timed out"),
}
CARD_FAILURES = {
    "user_cancelled": "authentication_abandoned",
    "insufficient_funds": "insufficient_funds",
    "user_unreachable": "authentication_timeout",
}


def mpesa_callback(tx: Transaction) -> dict[str, Any]:
    code, desc = MPESA_RESULTS[tx.result]
    callback: dict[str, Any] = {
        "MerchantRequestID": tx.merchant_request_id,
        "CheckoutRequestID": tx.id,
        "ResultCode": code,
        "ResultDesc": desc,
    }
    if tx.result == "success":
        stamp = datetime.fromtimestamp(tx.answer_at, kit.NAIROBI).strftime("%Y%m%d%H%M%S")
        callback["CallbackMetadata"] = {
            "Item": [
                {"Name": "Amount", "Value": tx.amount},
                {"Name": "MpesaReceiptNumber", "Value": tx.receipt},
                {"Name": "TransactionDate", "Value": int(stamp)},
                {"Name": "PhoneNumber", "Value": int(tx.phone)},
            ]
        }
    return {"Body": {"stkCallback": callback}}


def airtel_transaction(tx: Transaction, now: float) -> dict[str, Any]:
    if not tx.answered(now):
        return {
            "id": tx.id,
            "status": "TIP",
            "message": "Transaction in progress",
            "response_code": "DP00800001006",
            "airtel_money_id": "",
        }
    status, code, message = AIRTEL_RESULTS[tx.result]
    return {
        "id": tx.id,
        "status": status,
        "message": message,
        "response_code": code,
        "airtel_money_id": tx.receipt if tx.result == "success" else "",
    }


def airtel_callback(tx: Transaction) -> dict[str, Any]:
    view = airtel_transaction(tx, tx.answer_at)
    return {
        "transaction": {
            "id": view["id"],
            "message": view["message"],
            "status_code": view["status"],
            "response_code": view["response_code"],
            "airtel_money_id": view["airtel_money_id"],
        }
    }


def card_charge(tx: Transaction, now: float) -> dict[str, Any]:
    charge: dict[str, Any] = {
        "id": tx.id,
        "object": "charge",
        "amount": tx.amount * 100,
        "currency": tx.currency.lower(),
        "reference": tx.reference,
        "created": int(tx.requested_at),
        "status": "processing",
        "failure_code": None,
    }
    if tx.answered(now):
        charge["status"] = "succeeded" if tx.result == "success" else "failed"
        charge["failure_code"] = CARD_FAILURES.get(tx.result)
    return charge


def card_callback(tx: Transaction) -> dict[str, Any]:
    charge = card_charge(tx, tx.answer_at)
    return {
        "id": f"evt_{secrets.token_hex(12)}",
        "type": f"charge.{charge['status']}",
        "created": int(tx.answer_at),
        "data": {"object": charge},
    }


CALLBACK_BODIES: dict[str, Callable[[Transaction], dict[str, Any]]] = {
    "mpesa": mpesa_callback,
    "airtel": airtel_callback,
    "card": card_callback,
}


# ---------------------------------------------------------------- the simulator


def _receipt(rng: random.Random) -> str:
    return "".join(rng.choices(string.ascii_uppercase + string.digits, k=10))


class Simulator:
    """The providers' state: their behaviours, the ledger, the random source and the
    callbacks waiting to be delivered."""

    def __init__(
        self, behaviours: dict[str, Behaviour], ledger: Ledger, rng: random.Random
    ) -> None:
        self.behaviours = behaviours
        self.ledger = ledger
        self.rng = rng
        self.client: httpx.AsyncClient | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        #: A provider's faults in force: (latency factor, error rate, callback hold in s).
        self.faults: Callable[[str], tuple[float, float, float]] = lambda _: (1.0, 0.0, 0.0)

    async def latency(self, provider: str, *, query: bool = False) -> None:
        behaviour = self.behaviours[provider]
        delay = behaviour.query_delay(self.rng) if query else behaviour.request_delay(self.rng)
        await asyncio.sleep(delay * self.faults(provider)[0])

    def failing(self, provider: str) -> bool:
        if self.faults(provider)[1] > 0 and self.rng.random() < self.faults(provider)[1]:
            return True
        return self.behaviours[provider].fails(self.rng)

    def open_transaction(
        self,
        provider: str,
        *,
        tx_id: str,
        amount: int,
        currency: str,
        phone: str,
        reference: str,
        callback_url: str,
        merchant_request_id: str = "",
    ) -> Transaction:
        behaviour = self.behaviours[provider]
        now = time.time()
        tx = Transaction(
            id=tx_id,
            provider=provider,
            amount=amount,
            currency=currency,
            phone=phone,
            reference=reference,
            callback_url=callback_url,
            requested_at=now,
            answer_at=now + behaviour.answer_after(self.rng),
            result=behaviour.outcome(self.rng),
            callback_lost=behaviour.loses_callback(self.rng),
            merchant_request_id=merchant_request_id,
            receipt=_receipt(self.rng),
        )
        self.ledger.save_transaction(tx)
        log.info(
            "%s_accepted id=%s amount=%s result=%s answer_in_s=%.1f",
            provider,
            tx.id,
            amount,
            tx.result,
            tx.answer_at - now,
        )
        self.schedule_callback(tx)
        return tx

    def schedule_callback(self, tx: Transaction) -> None:
        if tx.callback_done():
            return
        task = asyncio.get_running_loop().create_task(self._deliver(tx))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, tx: Transaction) -> None:
        """POST the callback when the customer has answered; retry a failed delivery.

        Nothing here adds trace headers: this process has no instrumentation."""
        behaviour = self.behaviours[tx.provider]
        await asyncio.sleep(max(0.0, tx.answer_at - time.time()) + behaviour.callback_lag_s)
        held_since = time.monotonic()
        while 0 < time.monotonic() - held_since < self.faults(tx.provider)[2]:  # noqa: ASYNC110
            await asyncio.sleep(0.5)  # held while the fault lasts (a file poll), at most its hold
        body = CALLBACK_BODIES[tx.provider](tx)
        while not tx.callback_done():
            attempt: dict[str, Any] = {"at": time.time(), "status": None, "error": None}
            try:
                assert self.client is not None
                response = await self.client.post(tx.callback_url, json=body)
                attempt["status"] = response.status_code
            except httpx.HTTPError as exc:
                attempt["error"] = type(exc).__name__
            status = attempt["status"]
            # Anything but a 2xx is retried (even a 404: the receiver may not have
            # stored the push's request id yet), up to the last attempt.
            tx.callback_delivered = status is not None and 200 <= status < 300
            tx.callback_attempts.append(attempt)
            self.ledger.save_transaction(tx)
            log.info(
                "callback_attempt id=%s provider=%s status=%s error=%s",
                tx.id,
                tx.provider,
                status,
                attempt["error"],
            )
            if tx.callback_done():
                return
            await asyncio.sleep(behaviour.retry_wait(len(tx.callback_attempts) - 1))

    def resume_callbacks(self) -> None:
        """After a restart, deliver the callbacks the last process had not delivered."""
        for tx in self.ledger.transactions.values():
            self.schedule_callback(tx)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError):
                await task


__all__ = [
    "CALLBACK_BODIES",
    "MPESA_RESULTS",
    "Behaviour",
    "Ledger",
    "Lognormal",
    "Simulator",
    "Sms",
    "Transaction",
    "airtel_transaction",
    "behaviours_from_env",
    "card_charge",
]
