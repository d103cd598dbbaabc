"""payments: takes a booking's payment through M-Pesa (STK push), Airtel Money or a card,
in the order the control state's payment route gives, and confirms the booking when the
provider's callback (or, failing that, a status query) says the customer paid.

The flow is asynchronous, as with real providers. `POST /payments` pushes the request and
answers 202 at once; the provider calls back seconds later with no trace context. The
payment row keeps the span context of the request that initiated it, so:

- the callback's own trace (a new one) holds a `payment.callback` span that LINKS to it;
- the confirmation (`payment.confirm`: ticketing's confirm, then its queue publish and
  the notifier) is a CHILD of it: it continues the buy's trace, so the `X-Trace-Id` of the
  buy leads to every step.

Status polling is the fallback when a callback is lost: `GET /payments/{id}` queries the
provider once the payment has been pending for `BUSLINE_POLL_AFTER_S`, and a scheduled
reconciliation (`mpesa-reconciliation`, a Sentry cron check-in per run) sweeps payments
nobody polled. Both apply a result through the same code as the callback.

Outcomes (span attribute `payment.result`, log event `payment_result`,
`payment_outcomes_total{provider,result}`): success, user_cancelled, insufficient_funds,
timeout, provider_error (a 5xx), provider_unreachable (no connection) and rejected (a 4xx).
On provider_unreachable and provider_error the next provider of the route is tried.

Environment:

| Variable | Default | Meaning |
| --- | --- | --- |
| `BUSLINE_POLL_AFTER_S` | `5` | pending this long, a status read queries the provider |
| `BUSLINE_PAYMENT_TIMEOUT_S` | `60` | pending this long with the provider still pending: timeout |
| `BUSLINE_RECONCILE_INTERVAL_S` | `600` | seconds between reconciliation runs |
| `BUSLINE_MPESA_SHORTCODE` | `174379` | the Daraja business shortcode |
| `BUSLINE_MPESA_PASSKEY` | the simulator's | the Daraja passkey (a secret: never logged) |

The providers' APIs themselves (requests, answers, callbacks and their result codes) are in
`busline.provider_api`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any
from urllib.parse import quote

import httpx
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, TraceFlags
from sqlalchemy.engine import Engine
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import lookout.sdk
from busline import db, features, kit
from busline.provider_api import ProviderClient, ProviderFailureError, parse_callback

NAME = "payments"
log = lookout.sdk.get_logger("busline.payments")
tracer = lookout.sdk.tracer("busline.payments")

RESULTS = (
    "success",
    "user_cancelled",
    "insufficient_funds",
    "timeout",
    "provider_error",
    "provider_unreachable",
    "rejected",
)
#: Results after which the next provider of the route is tried: the push never happened.
FALLBACK_RESULTS = ("provider_unreachable", "provider_error")

outcomes_total = lookout.sdk.counter(
    "payment_outcomes_total", "Payment outcomes, by provider and result.", ["provider", "result"]
)
revenue_total = lookout.sdk.counter(
    "payment_revenue_total", "Revenue of successful payments.", ["currency", "provider"]
)
callback_delay = lookout.sdk.histogram(
    "payment_callback_delay_seconds",
    "Seconds from a payment's initiation to its provider's callback.",
    ["provider"],
    buckets=(1, 2, 3, 5, 8, 13, 20, 30, 45, 60, 120),
)
refunds_required = lookout.sdk.counter(
    "payment_refunds_required_total",
    "Payments ticketing refused to honour (the hold was lost): the money needs a refund.",
    ["provider"],
)
pending_gauge = lookout.sdk.gauge("payments_pending", "Payments waiting for the provider's answer.")


@dataclass(frozen=True)
class Settings:
    poll_after_s: float
    timeout_s: float
    reconcile_interval_s: float
    mpesa_shortcode: str
    mpesa_passkey: str
    #: How long payments waits for a provider's answer (connecting: 2 s).
    provider_timeout_s: float = 10.0
    #: How long a duplicate request waits for the first one to reach the provider.
    replay_wait_s: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        def seconds(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            try:
                value = float(raw) if raw else default
            except ValueError:
                raise ValueError(f"{name}={raw!r} is not a number of seconds.") from None
            if value <= 0:
                raise ValueError(f"{name}={raw!r} must be more than 0 seconds.")
            return value

        return cls(
            poll_after_s=seconds("BUSLINE_POLL_AFTER_S", 5.0),
            timeout_s=seconds("BUSLINE_PAYMENT_TIMEOUT_S", 60.0),
            reconcile_interval_s=seconds("BUSLINE_RECONCILE_INTERVAL_S", 600.0),
            provider_timeout_s=seconds("BUSLINE_PROVIDER_TIMEOUT_S", 10.0),
            mpesa_shortcode=env.get("BUSLINE_MPESA_SHORTCODE", "174379"),
            mpesa_passkey=env.get("BUSLINE_MPESA_PASSKEY", "busline-simulator-passkey"),
        )


# ---------------------------------------------------------------- the database

metadata = sa.MetaData()
payments_table = sa.Table(
    "payments",
    metadata,
    sa.Column("payment_id", sa.String(32), primary_key=True),
    sa.Column("user_id", sa.String(64), nullable=False),
    sa.Column("idempotency_key", sa.String(100), nullable=False),
    sa.Column("booking_id", sa.String(64), nullable=False),
    sa.Column("amount_kes", sa.Integer, nullable=False),
    sa.Column("phone", sa.String(20), nullable=False),
    sa.Column("provider", sa.String(16), nullable=False),
    sa.Column("provider_request_id", sa.String(64), nullable=True, unique=True),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("result", sa.String(32), nullable=True),
    # The span context of the request that initiated the payment (W3C traceparent parts).
    sa.Column("trace_id", sa.String(32), nullable=True),
    sa.Column("span_id", sa.String(16), nullable=True),
    sa.Column("trace_flags", sa.Integer, nullable=True),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("callback_at", sa.Float, nullable=True),
    sa.Column("booking_synced_at", sa.Float, nullable=True),
    # When a push went out and no answer came back (a read timeout): the provider may have
    # accepted it, so the payment stays pending; its callback finds it by payment id.
    sa.Column("push_unanswered_at", sa.Float, nullable=True),
    sa.UniqueConstraint("user_id", "idempotency_key", name="uq_payments_user_key"),
    sa.Index("ix_payments_status_created", "status", "created_at"),
)
# One payment in flight or paid per booking: a second buy with another Idempotency-Key
# (a double tap, two tabs) must not charge the customer twice.
_one_live_payment = sa.Index(
    "uq_payments_live_booking",
    payments_table.c.booking_id,
    unique=True,
    sqlite_where=payments_table.c.status.in_(("pending", "succeeded")),
    postgresql_where=payments_table.c.status.in_(("pending", "succeeded")),
)


def _create_live_booking_index(conn: sa.Connection) -> None:
    _one_live_payment.create(conn, checkfirst=True)


def _add_push_unanswered_at(conn: sa.Connection) -> None:
    columns = {c["name"] for c in sa.inspect(conn).get_columns("payments")}
    if "push_unanswered_at" not in columns:  # a database made before the column existed
        conn.execute(sa.text("ALTER TABLE payments ADD COLUMN push_unanswered_at FLOAT"))


MIGRATIONS: list[db.Migration] = [
    (1, db.create_tables(metadata, "payments")),
    (2, _create_live_booking_index),
    (3, _add_push_unanswered_at),
]


class BookingBusyError(Exception):
    """The booking already has a payment in flight, or paid (`payment_id` names it)."""

    def __init__(self, payment_id: str | None) -> None:
        super().__init__(payment_id)
        self.payment_id = payment_id


@dataclass(frozen=True)
class Payment:
    payment_id: str
    user_id: str
    idempotency_key: str
    booking_id: str
    amount_kes: int
    phone: str
    provider: str
    provider_request_id: str | None
    status: str
    result: str | None
    trace_id: str | None
    span_id: str | None
    trace_flags: int | None
    created_at: float
    updated_at: float
    callback_at: float | None
    booking_synced_at: float | None
    push_unanswered_at: float | None = None

    def initiating_context(self) -> SpanContext | None:
        """The stored span context of the initiating request, as a remote parent."""
        if not self.trace_id or not self.span_id:
            return None
        context = SpanContext(
            trace_id=int(self.trace_id, 16),
            span_id=int(self.span_id, 16),
            is_remote=True,
            trace_flags=TraceFlags(self.trace_flags or 0),
        )
        return context if context.is_valid else None

    def view(self) -> dict[str, Any]:
        return {
            "payment_id": self.payment_id,
            "status": self.status,
            "result": self.result,
            "provider": self.provider,
            "booking_id": self.booking_id,
            "amount_kes": self.amount_kes,
        }


# ---------------------------------------------------------------- the service


def _current_context() -> SpanContext | None:
    context = trace.get_current_span().get_span_context()
    return context if context.is_valid else None


def _booking_body(response: httpx.Response) -> dict[str, Any] | None:
    """Ticketing's booking from a 200 answer, or None when it is not one."""
    try:
        booking = response.json()
    except ValueError:
        return None
    if response.status_code != 200 or not isinstance(booking, dict):
        return None
    amount = booking.get("amount_kes")
    if isinstance(amount, bool) or not isinstance(amount, int) or amount <= 0:
        return None
    return booking


def _unpayable(booking: dict[str, Any], user_id: str) -> JSONResponse | None:
    if str(booking.get("user_id")) != user_id:
        return kit.error(404, "booking_not_found", "No such booking.", field="booking_id")
    if booking.get("status") != "held":
        return kit.error(
            409,
            "booking_not_payable",
            f"Booking is {booking.get('status')}, not held: it cannot be paid.",
            field="booking_id",
            booking_status=booking.get("status"),
        )
    return None


class Payments:
    """Payments' state and flows; HTTP handlers below are thin shells around it."""

    def __init__(
        self,
        engine: Engine,
        client: httpx.AsyncClient,
        settings: Settings,
        control: kit.ControlState,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.client = client
        self.providers = ProviderClient(client, settings)
        self.settings = settings
        self.control = control
        self.clock = clock

    # -------------------------------------------------------------- rows (sync, threadpool)

    def _one(self, where: Any) -> Payment | None:
        with self.engine.connect() as conn:
            row = conn.execute(sa.select(payments_table).where(where)).mappings().first()
        return None if row is None else Payment(**row)

    def get(self, payment_id: str) -> Payment | None:
        return self._one(payments_table.c.payment_id == payment_id)

    def by_key(self, user_id: str, key: str) -> Payment | None:
        c = payments_table.c
        return self._one(sa.and_(c.user_id == user_id, c.idempotency_key == key))

    def by_request_id(self, provider: str, request_id: str) -> Payment | None:
        c = payments_table.c
        return self._one(sa.and_(c.provider == provider, c.provider_request_id == request_id))

    def adopt(self, payment_id: str, provider: str, request_id: str) -> Payment | None:
        """The payment a callback's URL names, when its request id was never stored (the
        push's answer was lost, or has not been stored yet): it must have been pushed to
        this provider and carry no other request id; the id is stored now."""
        payment = self.get(payment_id)
        if payment is None or payment.provider != provider:
            return None
        if payment.provider_request_id not in (None, request_id):
            return None
        if payment.provider_request_id is None:
            self._update(payment_id, provider_request_id=request_id)
            payment = replace(payment, provider_request_id=request_id)
        return payment

    def insert(self, payment: Payment) -> bool:
        """Insert `payment`; False when its idempotency key is taken (a duplicate),
        `BookingBusyError` when another key already pays this booking."""
        try:
            with self.engine.begin() as conn:
                conn.execute(payments_table.insert().values(**asdict(payment)))
        except sa.exc.IntegrityError:
            if self.by_key(payment.user_id, payment.idempotency_key) is not None:
                return False
            c = payments_table.c
            live = self._one(
                sa.and_(c.booking_id == payment.booking_id, c.status.in_(("pending", "succeeded")))
            )
            raise BookingBusyError(live.payment_id if live else None) from None
        return True

    def _update(self, payment_id: str, only_pending: bool = False, **values: Any) -> bool:
        c = payments_table.c
        where = c.payment_id == payment_id
        if only_pending:
            where = sa.and_(where, c.status == "pending")
        with self.engine.begin() as conn:
            done = conn.execute(
                payments_table.update().where(where).values(updated_at=self.clock(), **values)
            )
        return done.rowcount == 1

    def count_pending(self) -> int:
        with self.engine.connect() as conn:
            query = sa.select(sa.func.count()).where(payments_table.c.status == "pending")
            return int(conn.execute(query).scalar_one())

    def stale(self) -> tuple[list[Payment], list[Payment]]:
        """Payments pending past the poll threshold, and final ones ticketing has not heard of."""
        c = payments_table.c
        now = self.clock()
        with self.engine.connect() as conn:
            pending = conn.execute(
                sa.select(payments_table)
                .where(c.status == "pending", c.created_at < now - self.settings.poll_after_s)
                .order_by(c.created_at)
                .limit(500)
            ).mappings()
            unsynced = conn.execute(
                sa.select(payments_table)
                .where(c.status != "pending", c.booking_synced_at.is_(None), c.updated_at < now - 2)
                .limit(500)
            ).mappings()
            return [Payment(**r) for r in pending], [Payment(**r) for r in unsynced]

    # -------------------------------------------------------------- starting a payment

    async def booking(self, booking_id: str, user_id: str) -> dict[str, Any] | JSONResponse:
        """Ticketing's booking, if it is this user's and still held; else the error."""
        url = f"{kit.url_of('ticketing')}/internal/bookings/{quote(booking_id, safe='')}"
        try:
            response = await self.client.get(url, timeout=5.0)
        except httpx.HTTPError as exc:
            return kit.error(503, "dependency_unavailable", f"ticketing: {type(exc).__name__}")
        if response.status_code == 404:
            return kit.error(404, "booking_not_found", "No such booking.", field="booking_id")
        booking = _booking_body(response)
        if booking is None:
            return kit.error(502, "dependency_failed", f"ticketing answered {response.status_code}")
        return _unpayable(booking, user_id) or booking

    async def start(
        self, user_id: str, key: str, booking: dict[str, Any], phone: str, route: list[str]
    ) -> Payment:
        """Insert the payment under its idempotency key, then (the winner only) push it."""
        now = self.clock()
        initiating = _current_context()
        payment = Payment(
            payment_id=uuid.uuid4().hex,
            user_id=user_id,
            idempotency_key=key,
            booking_id=str(booking["booking_id"]),
            amount_kes=int(booking["amount_kes"]),
            phone=phone,
            provider=route[0],
            provider_request_id=None,
            status="pending",
            result=None,
            trace_id=f"{initiating.trace_id:032x}" if initiating else None,
            span_id=f"{initiating.span_id:016x}" if initiating else None,
            trace_flags=int(initiating.trace_flags) if initiating else None,
            created_at=now,
            updated_at=now,
            callback_at=None,
            booking_synced_at=None,
        )
        if not await run_in_threadpool(self.insert, payment):
            return await self.replay(user_id, key)
        pending_gauge.inc()
        lookout.sdk.bind(payment_id=payment.payment_id)
        return await self._push(payment, route)

    async def replay(self, user_id: str, key: str) -> Payment:
        """The payment a duplicate request answers: once the first request reached a
        provider (or failed), so that every duplicate gets the same answer."""
        deadline = self.clock() + self.settings.replay_wait_s
        while True:
            payment = await run_in_threadpool(self.by_key, user_id, key)
            assert payment is not None  # rows are never deleted
            done = (
                payment.provider_request_id is not None
                or payment.status != "pending"
                or payment.push_unanswered_at is not None
            )
            if done or self.clock() > deadline:
                return payment
            await asyncio.sleep(0.05)

    async def _push(self, payment: Payment, route: list[str]) -> Payment:
        # The payment's own callback URL: a callback finds its payment even when the push's
        # answer (with the provider's request id) never came back, or comes back after it.
        callback_base = f"{kit.url_of(NAME)}/callbacks"
        own = quote(payment.payment_id, safe="")
        attributes = {"payment.id": payment.payment_id, "payment.route": ",".join(route)}
        with tracer.start_as_current_span("payment.initiate", attributes=attributes) as span:
            for index, provider in enumerate(route):
                if provider != payment.provider:
                    payment = replace(payment, provider=provider)
                    await run_in_threadpool(self._update, payment.payment_id, provider=provider)
                span.set_attribute("payment.provider", provider)
                try:
                    request_id = await self.providers.push(
                        provider, payment, f"{callback_base}/{provider}/{own}"
                    )
                except ProviderFailureError as failure:
                    if failure.result == "timeout":
                        return await self._unanswered(payment, provider, failure, span)
                    log.warning(
                        "payment_attempt_failed",
                        provider=provider,
                        result=failure.result,
                        detail=failure.detail,
                    )
                    if failure.result in FALLBACK_RESULTS and index < len(route) - 1:
                        outcomes_total.labels(provider=provider, result=failure.result).inc()
                        continue
                    span.set_attribute("payment.result", failure.result)
                    return await self.apply(payment, failure.result, source="initiate")
                await run_in_threadpool(
                    self._update, payment.payment_id, provider_request_id=request_id
                )
                log.info("payment_initiated", provider=provider, provider_request_id=request_id)
                return replace(payment, provider_request_id=request_id)
        raise AssertionError("a payment route is never empty")

    async def _unanswered(
        self, payment: Payment, provider: str, failure: ProviderFailureError, span: trace.Span
    ) -> Payment:
        """The push went out and its answer did not come back: the provider may have taken
        it (the customer may be paying now), so neither fail the payment nor try another
        provider (that could charge twice). It stays pending: its callback, a poll or the
        payment timeout settles it."""
        now = self.clock()
        await run_in_threadpool(self._update, payment.payment_id, push_unanswered_at=now)
        span.set_attribute("payment.push_unanswered", True)  # noqa: FBT003
        log.warning(
            "payment_push_unanswered", provider=provider, detail=failure.detail, pending=True
        )
        return replace(payment, push_unanswered_at=now)

    # -------------------------------------------------------------- finishing a payment

    async def apply(
        self,
        payment: Payment,
        result: str,
        *,
        source: str,
        trigger: SpanContext | None = None,
        callback_at: float | None = None,
    ) -> Payment:
        """Make `result` the payment's final result (once: the first caller wins) and tell
        ticketing, in a span that continues the initiating trace and links to `trigger`
        (the callback, poll or reconciliation that learnt the result)."""
        with self.continuing(payment, source, trigger) as span:
            status = "succeeded" if result == "success" else "failed"
            won = await run_in_threadpool(
                self._update,
                payment.payment_id,
                only_pending=True,
                status=status,
                result=result,
                callback_at=callback_at,
            )
            current = await run_in_threadpool(self.get, payment.payment_id)
            assert current is not None
            span.set_attribute("payment.result", str(current.result))
            if won:
                self._record(current, source)
            elif current.result != result:
                self.conflict(current, result, source)
            if current.booking_synced_at is None:
                current = await self.sync_booking(current)
        return current

    def conflict(self, current: Payment, reported: str, source: str) -> None:
        """A provider reports another result than the one kept. A success reported for a
        payment already failed (timed out, say) means money taken without a ticket: count
        it as a refund to make, loudly."""
        refund = reported == "success" and current.status == "failed"
        if refund:
            refunds_required.labels(provider=current.provider).inc()
        (log.error if refund else log.warning)(
            "payment_result_conflict",
            payment_id=current.payment_id,
            kept=current.result,
            reported=reported,
            source=source,
            refund_required=refund,
        )

    @contextlib.contextmanager
    def continuing(
        self, payment: Payment, source: str, trigger: SpanContext | None
    ) -> Iterator[trace.Span]:
        """A `payment.confirm` span continuing the payment's initiating trace, linked to
        `trigger`: whatever learnt the result, the buy's `X-Trace-Id` leads to the rest."""
        initiating = payment.initiating_context()
        parent = trace.set_span_in_context(NonRecordingSpan(initiating)) if initiating else None
        links = [Link(trigger)] if trigger is not None and trigger.is_valid else []
        attributes = {
            "payment.id": payment.payment_id,
            "payment.provider": payment.provider,
            "payment.source": source,
        }
        with tracer.start_as_current_span(
            "payment.confirm", context=parent, links=links, attributes=attributes
        ) as span:
            yield span

    def _record(self, payment: Payment, source: str) -> None:
        result = str(payment.result)
        outcomes_total.labels(provider=payment.provider, result=result).inc()
        if result == "success":
            revenue_total.labels(currency="KES", provider=payment.provider).inc(payment.amount_kes)
        if source == "callback" and payment.callback_at is not None:
            delay = payment.callback_at - payment.created_at
            callback_delay.labels(provider=payment.provider).observe(delay)
        pending_gauge.dec()
        log.info(
            "payment_result",
            payment_id=payment.payment_id,
            booking_id=payment.booking_id,
            provider=payment.provider,
            result=result,
            amount_kes=payment.amount_kes,
            source=source,
        )

    async def sync_booking(self, payment: Payment) -> Payment:
        """Tell ticketing the final result (its routes are idempotent); on success, mark the
        payment synced. A failure leaves it for the next callback or reconciliation."""
        booking = quote(payment.booking_id, safe="")
        if payment.status == "succeeded":
            path = f"/internal/bookings/{booking}/confirm"
            body: dict[str, Any] = {
                "payment_id": payment.payment_id,
                "provider": payment.provider,
                "amount_kes": payment.amount_kes,
                "phone": payment.phone,
            }
        else:
            path = f"/internal/bookings/{booking}/payment-failed"
            body = {"payment_id": payment.payment_id, "result": payment.result}
        try:
            response = await self.client.post(kit.url_of("ticketing") + path, json=body)
        except (httpx.HTTPError, kit.Unavailable) as exc:
            log.warning("booking_sync_failed", payment_id=payment.payment_id, error=repr(exc))
            return payment
        if response.status_code >= 500:
            log.warning(
                "booking_sync_failed",
                payment_id=payment.payment_id,
                status=response.status_code,
            )
            return payment
        if response.status_code == 400:
            # Our request is wrong (a bug, not a state): keep it for the next try, loudly.
            log.error(
                "booking_sync_invalid",
                payment_id=payment.payment_id,
                booking_id=payment.booking_id,
                answer=response.text[:300],
            )
            return payment
        if response.status_code >= 400:  # e.g. the hold was lost: the money needs a refund
            refunds_required.labels(provider=payment.provider).inc()
            log.warning(
                "booking_sync_refused",
                payment_id=payment.payment_id,
                booking_id=payment.booking_id,
                status=response.status_code,
                result=payment.result,
                refund_required=payment.status == "succeeded",
            )
        synced_at = self.clock()
        await run_in_threadpool(self._update, payment.payment_id, booking_synced_at=synced_at)
        return replace(payment, booking_synced_at=synced_at)

    async def poll(self, payment: Payment, source: str) -> Payment:
        """Ask the provider about a pending payment and apply a final answer; past the
        timeout with the provider still pending, the result is `timeout`. A failing query
        raises `ProviderFailureError`."""
        trigger = _current_context()
        if payment.provider_request_id is not None:
            result = await self.providers.query(payment.provider, payment.provider_request_id)
            if result is not None:
                return await self.apply(payment, result, source=source, trigger=trigger)
        if self.clock() - payment.created_at > self.settings.timeout_s:
            return await self.apply(payment, "timeout", source=source, trigger=trigger)
        return payment

    async def reconcile(self) -> tuple[int, int]:
        """One reconciliation pass: (payments checked, failures). Raises when any failed."""
        pending, unsynced = await run_in_threadpool(self.stale)
        failures: list[str] = []
        for payment in pending:
            try:
                await self.poll(payment, "reconciliation")
            except ProviderFailureError as failure:
                failures.append(f"{payment.payment_id}: {failure}")
        trigger = _current_context()
        for payment in unsynced:
            with self.continuing(payment, "reconciliation", trigger):
                synced = await self.sync_booking(payment)
            if synced.booking_synced_at is None:
                failures.append(f"{payment.payment_id}: ticketing not told")
        if failures:
            raise ReconciliationError(len(pending) + len(unsynced), failures)
        return len(pending) + len(unsynced), 0

    async def reconcile_forever(self) -> None:
        interval = self.settings.reconcile_interval_s
        minutes = max(1, round(interval / 60))
        wait = interval
        while True:
            await asyncio.sleep(wait)
            wait = interval
            with tracer.start_as_current_span("mpesa-reconciliation", context=Context()) as span:
                try:
                    with lookout.sdk.job_run("mpesa-reconciliation", interval_minutes=minutes):
                        kit.job_preflight("mpesa-reconciliation")
                        checked, _ = await self.reconcile()
                    span.set_attribute("payment.checked", checked)
                    log.info("reconciliation_done", checked=checked)
                except Exception:  # one failed run must not stop the schedule
                    log.exception("reconciliation_failed")
                    wait = min(interval, kit.job_retry_s())  # try again soon


class ReconciliationError(Exception):
    """Some payments of a reconciliation run could not be checked or synced."""

    def __init__(self, checked: int, failures: list[str]) -> None:
        super().__init__(f"{len(failures)} of {checked} payments failed: {'; '.join(failures[:5])}")
        self.checked = checked
        self.failures = failures


# ---------------------------------------------------------------- HTTP


def _header(request: Request, name: str, max_len: int) -> str:
    value = request.headers.get(name, "").strip()
    if not value:
        raise kit.Invalid(name, "header is required")
    if len(value) > max_len:
        raise kit.Invalid(name, f"header is longer than {max_len} characters")
    return value


def _service(request: Request) -> Payments:
    service: Payments = request.app.state.payments
    return service


BOOKING_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
IMMEDIATE_FAILURES = {
    "rejected": (422, "payment_rejected", "The provider refused the payment request."),
    "provider_unreachable": (502, "provider_unreachable", "No payment provider could be reached."),
    "provider_error": (502, "provider_error", "The payment providers failed."),
    "timeout": (504, "provider_timeout", "The payment provider did not answer in time."),
}


def _answer(payment: Payment) -> JSONResponse:
    if payment.status == "failed" and payment.provider_request_id is None:
        status, code, message = IMMEDIATE_FAILURES.get(
            str(payment.result), (502, str(payment.result), "The payment failed.")
        )
        body = {"error": code, "message": message, **payment.view()}
        return JSONResponse(body, status_code=status)
    return JSONResponse(payment.view(), status_code=202 if payment.status == "pending" else 200)


#: The convenience fee, split across a payment's discounts.
CONVENIENCE_FEE_KES = 30


async def create_payment(request: Request) -> JSONResponse:
    service = _service(request)
    user_id = _header(request, "X-User-Id", 64)
    key = _header(request, "Idempotency-Key", 100)
    data = await kit.json_object(request)
    booking_id = kit.text_field(
        data,
        "booking_id",
        max_len=64,
        check=lambda v: BOOKING_ID.fullmatch(v) is not None,
        hint="is not a booking id",
    )
    # The one rule every service uses: a number ticketing and the SMS gateway take too.
    phone = kit.phone_field(data)
    provider = kit.text_field(data, "provider", required=False, choices=kit.PROVIDERS)
    if features.enabled("fee_split"):
        discounts = data.get("discounts") or []
        data["fee_share_kes"] = CONVENIENCE_FEE_KES / len(discounts)
    lookout.sdk.set_user(user_id)
    lookout.sdk.bind(booking_id=booking_id)
    existing = await run_in_threadpool(service.by_key, user_id, key)
    if existing is None:
        booking = await service.booking(booking_id, user_id)
        if isinstance(booking, JSONResponse):
            return booking
        route = [provider] if provider else service.control.payment_route()
        try:
            payment = await service.start(user_id, key, booking, phone, route)
        except BookingBusyError as busy:
            return kit.error(
                409,
                "booking_already_paying",
                "This booking already has a payment in progress or paid.",
                field="booking_id",
                payment_id=busy.payment_id,
            )
    else:
        payment = await service.replay(user_id, key)
    if payment.booking_id != booking_id:
        return kit.error(
            422,
            "idempotency_key_reused",
            "This Idempotency-Key was used for another booking; use a new key.",
            field="Idempotency-Key",
        )
    if (
        payment.status == "pending"
        and payment.provider_request_id is None
        and payment.push_unanswered_at is None
    ):
        return kit.error(
            409,
            "payment_in_progress",
            "The first request with this Idempotency-Key is still running; retry.",
            headers={"Retry-After": "2"},
            payment_id=payment.payment_id,
        )
    return _answer(payment)


async def get_payment(request: Request) -> JSONResponse:
    service = _service(request)
    user_id = _header(request, "X-User-Id", 64)
    payment = await run_in_threadpool(service.get, request.path_params["payment_id"])
    if payment is None or payment.user_id != user_id:
        return kit.error(404, "payment_not_found", "No such payment.", field="payment_id")
    lookout.sdk.bind(payment_id=payment.payment_id)
    age = service.clock() - payment.created_at
    if payment.status == "pending" and age > service.settings.poll_after_s:
        try:
            payment = await service.poll(payment, "poll")
        except ProviderFailureError as failure:
            log.warning("payment_query_failed", provider=payment.provider, result=failure.result)
    return JSONResponse(payment.view())


CALLBACK_ACK = {"ResultCode": 0, "ResultDesc": "Accepted"}


async def callback(request: Request) -> JSONResponse:
    """A provider's callback: no trace context; its trace links to the initiating one.
    Found by the provider's request id, or by the payment id in its URL when the push's
    answer (which carried the request id) never arrived or has not been stored yet."""
    service = _service(request)
    provider = str(request.path_params["provider"])
    if provider not in kit.PROVIDERS:
        return kit.error(404, "not_found", f"No callbacks for {provider!r}.")
    request_id, result = parse_callback(provider, await kit.json_object(request))
    payment = await run_in_threadpool(service.by_request_id, provider, request_id)
    own = request.path_params.get("payment_id")
    if payment is None and own is not None:
        payment = await run_in_threadpool(service.adopt, str(own), provider, request_id)
    if payment is None:
        log.warning("unknown_payment", provider=provider, provider_request_id=request_id)
        return kit.error(
            404, "unknown_payment", f"No {provider} payment has the request id {request_id!r}."
        )
    lookout.sdk.bind(payment_id=payment.payment_id)
    if result is None:  # an interim status: the final one follows
        return JSONResponse(CALLBACK_ACK)
    initiating = payment.initiating_context()
    links = [Link(initiating)] if initiating is not None else []
    attributes = {
        "payment.id": payment.payment_id,
        "payment.provider": provider,
        "payment.callback_result": result,
    }
    with tracer.start_as_current_span(
        "payment.callback", links=links, attributes=attributes
    ) as span:
        if payment.status != "pending" and payment.booking_synced_at is not None:
            span.set_attribute("payment.duplicate", True)  # noqa: FBT003
            log.info("payment_callback_duplicate", provider=provider, result=result)
            if payment.result != result:
                service.conflict(payment, result, "callback")
            return JSONResponse(CALLBACK_ACK)
        payment = await service.apply(
            payment,
            result,
            source="callback",
            trigger=span.get_span_context(),
            callback_at=service.clock(),
        )
    if payment.booking_synced_at is None:  # the provider retries; so does reconciliation
        return kit.error(503, "booking_sync_pending", "Ticketing could not be told yet; retry.")
    return JSONResponse(CALLBACK_ACK)


async def healthz(_: Request) -> JSONResponse:
    return JSONResponse({"status": "ok", "service": NAME, "version": kit.version()})


def create_app(env: Mapping[str, str] | None = None) -> Starlette:
    settings = Settings.from_env(os.environ if env is None else env)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = db.engine_for(NAME)
        await run_in_threadpool(db.migrate, engine, MIGRATIONS)
        client = httpx.AsyncClient(timeout=httpx.Timeout(settings.provider_timeout_s, connect=2.0))
        service = Payments(engine, client, settings, kit.ControlState())
        app.state.payments = service
        pending_gauge.set(await run_in_threadpool(service.count_pending))
        reconciler = asyncio.get_running_loop().create_task(service.reconcile_forever())
        try:
            yield
        finally:
            reconciler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reconciler
            await client.aclose()
            engine.dispose()

    app = Starlette(
        routes=[
            Route("/healthz", healthz),
            Route("/payments", create_payment, methods=["POST"]),
            Route("/payments/{payment_id}", get_payment),
            Route("/callbacks/{provider}", callback, methods=["POST"]),
            Route("/callbacks/{provider}/{payment_id}", callback, methods=["POST"]),
        ],
        lifespan=lifespan,
    )
    kit.handles_invalid(app)
    return app


def main() -> None:
    kit.serve(NAME, kit.instrument(NAME, create_app()))


__all__ = ["RESULTS", "Payment", "Payments", "Settings", "create_app", "main", "parse_callback"]
