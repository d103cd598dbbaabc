"""notifier: one SMS to the customer for each confirmed booking.

A worker with no HTTP app. It consumes the queue `booking.confirmed` (messages
`{event_id, booking_id, phone, route_id, seat, departs_at, amount_kes}`, plus `origin` and
`destination` when ticketing sends them) and sends each through the SMS gateway of the
providers simulator: `POST {providers}/sms/v1/messages {to, message, client_ref}`. The
CONSUMER span of each message continues the trace of the payment that confirmed the
booking (the queue reads it from the message headers), and the gateway call is a client
span inside it; the gateway is outside the company, so no trace header goes to it.

Exactly once, from the customer's side, over an at-least-once queue:

- the notifier's own table `sent_notifications` (its database: `db.engine_for("notifier")`)
  records every event sent, so a message delivered again after it was sent (a relay that
  published twice, a notifier killed between the send and the ack) is acked without a call;
- `client_ref = event_id` makes the gateway idempotent, which covers the window between the
  gateway's answer and the row's commit (and two deliveries of one event at once).

A failed send (gateway unreachable, timeout, 5xx, 429) raises, so the queue redelivers the
message after a growing backoff while the other messages go on. A message the gateway
refuses for good (another 4xx) or one that is malformed is acked and counted, since
sending it again cannot help. `notifications_sent_total{channel="sms",result}` counts
`sent`, `duplicate`, `failed`, `rejected` and `invalid`. Logs carry the booking id and a
masked phone number (`2547****5678`), never the whole number.

SIGTERM (or Ctrl-C) stops taking messages, lets the ones being sent finish and ack, then
exits 0.
"""

from __future__ import annotations

import asyncio
import re
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import sqlalchemy as sa
from sqlalchemy.engine import Engine

from busline import db, kit, queue, routes
from lookout import sdk

NAME = "notifier"
QUEUE = "booking.confirmed"
CHANNEL = "sms"
PREFETCH = 10
SMS_PATH = "/sms/v1/messages"
#: The whole gateway call: a slow gateway costs a retry, never a stuck message.
SMS_TIMEOUT = httpx.Timeout(5.0, connect=2.0)

log = sdk.get_logger("busline.notifier")
notifications_sent = sdk.counter(
    "notifications_sent_total",
    "Customer notifications by channel and result (sent, duplicate, failed, rejected, invalid).",
    ["channel", "result"],
)

metadata = sa.MetaData()

sent_notifications = sa.Table(
    "sent_notifications",
    metadata,
    sa.Column("event_id", sa.String(100), primary_key=True),
    sa.Column("booking_id", sa.String(100), nullable=False),
    sa.Column("channel", sa.String(16), nullable=False),
    sa.Column("provider_message_id", sa.String(200), nullable=True),
    sa.Column("sent_at", sa.Float, nullable=False),
)

MIGRATIONS: list[db.Migration] = [(1, db.create_tables(metadata, "sent_notifications"))]


# ---------------------------------------------------------------- the message


_TOKEN = re.compile(r"[A-Za-z0-9_.:-]{1,100}")


@dataclass(frozen=True)
class Confirmation:
    """One `booking.confirmed` message, checked. Only the event, the booking and the phone
    are needed to send; the rest words the SMS when present."""

    event_id: str
    booking_id: str
    phone: str
    route_id: str | None = None
    seat: str | None = None
    departs_at: str | None = None
    amount_kes: int | None = None
    origin: str | None = None
    destination: str | None = None

    def sms_text(self) -> str:
        parts = [f"Busline: booking {self.booking_id} is confirmed."]
        trip = []
        if self.origin and self.destination:
            trip.append(f"{self.origin} to {self.destination}")
        if self.seat:
            trip.append(f"seat {self.seat}")
        if self.departs_at:
            trip.append(f"departs {self.departs_at}")
        if trip:
            parts.append(", ".join(trip) + ".")
        if self.amount_kes is not None:
            parts.append(f"Paid KES {self.amount_kes:,}.")
        parts.append("Safe travels!")
        return " ".join(parts)


def parse_confirmation(body: Mapping[str, Any]) -> Confirmation:
    """The message as a `Confirmation`, or `kit.Invalid` naming the bad field: a missing
    event, booking or phone, or any field present with the wrong shape."""
    event_id = kit.text_field(body, "event_id", max_len=100, check=_is_token, hint="is not an id")
    booking_id = kit.text_field(
        body, "booking_id", max_len=100, check=_is_token, hint="is not an id"
    )
    phone = kit.phone_field(body)
    seat = body.get("seat")
    if seat is not None and (
        isinstance(seat, bool) or not isinstance(seat, int | str) or not str(seat).strip()
    ):
        raise kit.Invalid("seat", "must be a seat number")
    amount = body.get("amount_kes")
    if isinstance(amount, float) and amount.is_integer():
        amount = int(amount)
    if amount is not None and (
        isinstance(amount, bool) or not isinstance(amount, int) or not 0 <= amount <= 10**7
    ):
        raise kit.Invalid("amount_kes", "must be a whole amount between 0 and 10000000")
    route_id = kit.text_field(body, "route_id", required=False, max_len=100) or None
    route = routes.BY_ID.get(route_id or "")
    origin = kit.text_field(body, "origin", required=False, max_len=60)
    destination = kit.text_field(body, "destination", required=False, max_len=60)
    return Confirmation(
        event_id=event_id,
        booking_id=booking_id,
        phone=phone,
        route_id=route_id,
        seat=None if seat is None else str(seat).strip()[:10],
        departs_at=kit.text_field(body, "departs_at", required=False, max_len=40) or None,
        amount_kes=amount,
        origin=origin or (route.origin if route else None),
        destination=destination or (route.destination if route else None),
    )


def _is_token(value: str) -> bool:
    return _TOKEN.fullmatch(value) is not None


# ---------------------------------------------------------------- the SMS gateway


class SmsError(Exception):
    """The SMS gateway did not take a message."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SmsUnavailableError(SmsError):
    """The gateway could not take the message now (unreachable, timeout, 5xx, 429): retry."""


class SmsRejectedError(SmsError):
    """The gateway refused the message for good (a 4xx): sending it again cannot help."""


class SmsGateway:
    """The providers simulator's SMS API, found through its port file at each send (so a
    restarted simulator on a new port is found)."""

    def __init__(
        self,
        client: httpx.AsyncClient,
        base_url: Callable[[], str] = lambda: kit.url_of("sms"),
    ) -> None:
        self._client = client
        self._base_url = base_url

    async def send(self, to: str, message: str, client_ref: str) -> tuple[str, bool]:
        """Send one SMS: (the gateway's message id, whether the gateway had sent it already
        under this `client_ref`). `SmsUnavailableError` or `SmsRejectedError`."""
        try:
            url = self._base_url() + SMS_PATH
        except kit.Unavailable as exc:
            raise SmsUnavailableError(f"the SMS gateway is not running: {exc}") from None
        try:
            response = await self._client.post(
                url, json={"to": to, "message": message, "client_ref": client_ref}
            )
        except httpx.TimeoutException as exc:
            raise SmsUnavailableError(f"the SMS gateway timed out ({type(exc).__name__})") from None
        except httpx.TransportError as exc:
            raise SmsUnavailableError(f"the SMS gateway is unreachable: {exc}") from None
        status = response.status_code
        if status >= 500 or status in (408, 429):
            raise SmsUnavailableError(f"the SMS gateway answered {status}", status=status)
        if status >= 400:
            raise SmsRejectedError(
                f"the SMS gateway refused the message: {status} {response.text[:200]}",
                status=status,
            )
        try:
            data = response.json()
        except ValueError:
            data = {}
        message_id = data.get("message_id") if isinstance(data, dict) else None
        replayed = response.headers.get("idempotent-replayed", "").lower() == "true"
        return (str(message_id) if message_id is not None else ""), replayed


# ---------------------------------------------------------------- the worker


class Notifier:
    """Handles one `booking.confirmed` message at a time (the queue runs several)."""

    def __init__(
        self, engine: Engine, gateway: SmsGateway, clock: Callable[[], float] = time.time
    ) -> None:
        self.engine = engine
        self.gateway = gateway
        self.clock = clock

    def already_sent(self, event_id: str) -> bool:
        with self.engine.connect() as conn:
            found = conn.execute(
                sa.select(sent_notifications.c.event_id).where(
                    sent_notifications.c.event_id == event_id
                )
            ).first()
        return found is not None

    def record_sent(self, confirmation: Confirmation, message_id: str) -> None:
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    sent_notifications.insert().values(
                        event_id=confirmation.event_id,
                        booking_id=confirmation.booking_id,
                        channel=CHANNEL,
                        provider_message_id=message_id or None,
                        sent_at=self.clock(),
                    )
                )
        except sa.exc.IntegrityError:
            pass  # another delivery of the same event recorded it first

    async def handle(self, body: dict[str, Any], _headers: dict[str, str]) -> None:
        """Send the SMS of one confirmation, at most once per event."""
        try:
            confirmation = parse_confirmation(body)
        except kit.Invalid as exc:
            self._drop_invalid(body, exc)
            return
        sdk.bind(booking_id=confirmation.booking_id, event_id=confirmation.event_id)
        masked = kit.mask_phone(confirmation.phone)
        if await asyncio.to_thread(self.already_sent, confirmation.event_id):
            notifications_sent.labels(CHANNEL, "duplicate").inc()
            log.info("sms_already_sent", booking_id=confirmation.booking_id, phone=masked)
            return
        try:
            message_id, replayed = await self.gateway.send(
                confirmation.phone, confirmation.sms_text(), confirmation.event_id
            )
        except SmsRejectedError as exc:
            self._drop_rejected(confirmation, exc)
            return
        except SmsUnavailableError as exc:
            notifications_sent.labels(CHANNEL, "failed").inc()
            log.warning(
                "sms_failed",
                booking_id=confirmation.booking_id,
                phone=masked,
                status=exc.status,
                error=str(exc),
            )
            raise
        await asyncio.to_thread(self.record_sent, confirmation, message_id)
        # A replay (we died after sending, before recording it): the customer got one SMS.
        notifications_sent.labels(CHANNEL, "duplicate" if replayed else "sent").inc()
        log.info(
            "sms_already_sent" if replayed else "sms_sent",
            booking_id=confirmation.booking_id,
            phone=masked,
            route_id=confirmation.route_id,
            message_id=message_id,
        )

    @staticmethod
    def _drop_invalid(body: Mapping[str, Any], exc: kit.Invalid) -> None:
        """A malformed message is acked and counted: no redelivery can fix it."""
        notifications_sent.labels(CHANNEL, "invalid").inc()
        event_id = body.get("event_id")
        log.error(
            "notification_invalid",
            field=exc.field,
            problem=exc.message,
            event_id=event_id if isinstance(event_id, str) else None,
        )

    @staticmethod
    def _drop_rejected(confirmation: Confirmation, exc: SmsRejectedError) -> None:
        """A message the gateway refuses for good is acked and counted."""
        notifications_sent.labels(CHANNEL, "rejected").inc()
        log.error(
            "sms_rejected",
            booking_id=confirmation.booking_id,
            phone=kit.mask_phone(confirmation.phone),
            status=exc.status,
            error=str(exc),
        )


async def run(broker: queue.Broker, engine: Engine) -> None:
    """Consume `booking.confirmed` until SIGTERM or SIGINT, then drain and return."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    async with httpx.AsyncClient(timeout=SMS_TIMEOUT) as client:
        notifier = Notifier(engine, SmsGateway(client))
        from busline import fault_agent

        handle = fault_agent.agent().gated(notifier.handle)
        consumer = asyncio.create_task(broker.consume(QUEUE, handle, prefetch=PREFETCH))

        def stop(signum: int) -> None:
            if stopping.is_set():
                return  # a second signal while draining (a process group's): once is enough
            log.info("notifier_stopping", signal=signal.Signals(signum).name)
            stopping.set()
            consumer.cancel()

        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop, signum)
        log.info("notifier_started", queue=QUEUE, broker=broker.system, prefetch=PREFETCH)
        try:
            await consumer
        except asyncio.CancelledError:
            if not stopping.is_set():
                raise
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
    log.info("notifier_stopped", queue=QUEUE)


def main() -> None:
    """`python -m busline service notifier`."""
    kit.instrument(NAME)
    engine = db.engine_for(NAME)
    db.migrate(engine, MIGRATIONS)
    broker = queue.open_broker(NAME)
    kit.report_worker(NAME)

    async def serve() -> None:
        try:
            await run(broker, engine)
        finally:
            await broker.close()

    try:
        asyncio.run(serve())
    finally:
        engine.dispose()
