"""Ticketing: trip search, seat holds, bookings, tickets, and the outbox that announces a
confirmed booking on the queue `booking.confirmed`.

- **Trips** are the timetable's (`busline.timetable`: the route network's departures for
  today and the next six days, Nairobi time, with deterministic ids); a day's trips are
  inserted when missing, so restarts and the day rolling over need nothing.
- **A seat hold** is a booking row in status `held` until `hold_expires_at`
  (`BUSLINE_HOLD_TTL_S`, default 600 s). A partial unique index on `(trip_id, seat)` over
  the bookings that are `held` or `confirmed` is what makes two holds of one seat
  impossible, whatever the interleaving. A hold past its TTL is expired by the sweeper
  (every `BUSLINE_SWEEP_INTERVAL_S`, default 60 s) or by the next hold on the same trip.
- **Confirming** (payments calls it when a payment succeeds) sets the booking `confirmed`
  and writes an outbox row in the same transaction, with the caller's W3C `traceparent`.
  A hold past its TTL is still confirmed while its seat is free: the customer paid. When
  the seat was taken by someone else meanwhile, the answer is 409 `hold_lost`, so payments
  can refund. A second confirm with the same payment answers the same booking and writes
  nothing.
- **The relay** publishes unsent outbox rows in order and marks them sent: woken right
  after a confirm commits, polling every second, and flushing leftovers at start. Delivery
  is at least once (a crash between the publish and the mark sends the row again); the
  payload's `event_id` lets the consumer drop a repeat.
- `BUSLINE_TEST_CRASH_AFTER_COMMIT=1` kills the process (exit status 137) right after a
  confirm commits and before anything is published, once per state directory: the test
  hook for "no confirmation is lost".
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager, suppress
from datetime import date
from typing import Any

import sqlalchemy as sa
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route as HttpRoute

from busline import db, features, kit, queue, routes
from busline.timetable import local_time, parse_trip_id, seat_labels, service_window, trips_on
from lookout import sdk

NAME = "ticketing"
TOPIC = "booking.confirmed"
HOLD_TTL_DEFAULT_S = 600.0
SWEEP_INTERVAL_DEFAULT_S = 60.0
RELAY_POLL_S = 1.0
RELAY_BATCH = 100
CRASH_EXIT_STATUS = 137
SWEEPER_JOB = "seat-hold-sweeper"

ACTIVE = ("held", "confirmed")
TOKEN = re.compile(r"^[A-Za-z0-9_.:-]{1,80}$")
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
OUTCOME = re.compile(r"^[a-z_]{1,40}$")

log = sdk.get_logger("busline.ticketing")
tickets_sold = sdk.counter("tickets_sold_total", "Tickets sold (confirmed bookings).", ["route"])
bookings_confirmed = sdk.counter(
    "bookings_confirmed_total", "Bookings confirmed after a successful payment.", ["route"]
)
seat_holds = sdk.counter(
    "seat_holds_total", "Seat holds by result: held, conflict, expired.", ["result"]
)
outbox_pending = sdk.gauge(
    "outbox_pending", "Outbox rows written but not yet published to the queue."
)
for _route in routes.ROUTES:
    tickets_sold.labels(route=_route.id)
    bookings_confirmed.labels(route=_route.id)
for _result in ("held", "conflict", "expired"):
    seat_holds.labels(result=_result)


# ---------------------------------------------------------------- request values


def is_token(value: str) -> bool:
    """An id we accept from a caller: 1-80 letters, digits or `_.:-`."""
    return TOKEN.match(value) is not None


# ---------------------------------------------------------------- the database

metadata = sa.MetaData()

trips = sa.Table(
    "trips",
    metadata,
    sa.Column("trip_id", sa.String(80), primary_key=True),
    sa.Column("route_id", sa.String(40), nullable=False),
    sa.Column("direction", sa.String(4), nullable=False),
    sa.Column("origin", sa.String(60), nullable=False),
    sa.Column("destination", sa.String(60), nullable=False),
    sa.Column("service_date", sa.String(10), nullable=False),
    sa.Column("departs_at", sa.BigInteger, nullable=False),
    sa.Column("arrives_at", sa.BigInteger, nullable=False),
    sa.Column("seats", sa.Integer, nullable=False),
    sa.Column("fare_kes", sa.Integer, nullable=False),
    sa.Index("trips_by_date", "service_date", "route_id"),
)

_ACTIVE_SQL = sa.text("status IN ('held', 'confirmed')")

bookings = sa.Table(
    "bookings",
    metadata,
    sa.Column("booking_id", sa.String(36), primary_key=True),
    sa.Column("trip_id", sa.String(80), sa.ForeignKey("trips.trip_id"), nullable=False),
    sa.Column("route_id", sa.String(40), nullable=False),
    sa.Column("seat", sa.String(4), nullable=False),
    sa.Column("user_id", sa.String(80), nullable=False),
    sa.Column("status", sa.String(12), nullable=False),
    sa.Column("amount_kes", sa.Integer, nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("hold_expires_at", sa.Float, nullable=False),
    sa.Column("expired_at", sa.Float),
    sa.Column("confirmed_at", sa.Float),
    sa.Column("payment_id", sa.String(80)),
    sa.Column("provider", sa.String(16)),
    sa.Column("payment_failures", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_failure", sa.String(80)),
    sa.Column("last_failed_payment_id", sa.String(80)),
    # The guarantee: one active (held or confirmed) booking per seat of a trip.
    sa.Index(
        "bookings_active_seat",
        "trip_id",
        "seat",
        unique=True,
        sqlite_where=_ACTIVE_SQL,
        postgresql_where=_ACTIVE_SQL,
    ),
    sa.Index("bookings_by_status", "status", "hold_expires_at"),
    sa.Index("bookings_by_user", "user_id"),
)

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("event_id", sa.String(36), nullable=False, unique=True),
    sa.Column("topic", sa.String(60), nullable=False),
    sa.Column("booking_id", sa.String(36), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),
    sa.Column("traceparent", sa.String(64)),
    sa.Column("tracestate", sa.String(512)),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("sent_at", sa.Float),
    sa.UniqueConstraint("topic", "booking_id", name="outbox_one_event_per_booking"),
    sa.Index("outbox_unsent", "sent_at", "id"),
)

MIGRATIONS: list[db.Migration] = [(1, db.create_tables(metadata, "trips", "bookings", "outbox"))]


def _insert_missing(engine: Engine, table: sa.Table) -> Any:
    """INSERT ... ON CONFLICT DO NOTHING on the primary key, in either dialect."""
    if db.is_postgres(engine):
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert(table).on_conflict_do_nothing()
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert(table).on_conflict_do_nothing()


# ---------------------------------------------------------------- errors


class RefusedError(Exception):
    """A request that is well formed but cannot be done (unknown, taken, not yet paid)."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field

    def response(self) -> JSONResponse:
        return kit.error(self.status, self.code, self.message, field=self.field)


def env_seconds(name: str, default: float) -> float:
    return kit.env_number(os.environ, name, default, low=0.001, high=1e9, unit="seconds")


def _unsampled() -> otel_context.Context:
    """A context whose current span is not sampled: the relay's idle polling makes no trace."""
    span_context = trace.SpanContext(
        trace_id=uuid.uuid4().int >> 1 or 1,
        span_id=uuid.uuid4().int >> 65 or 1,
        is_remote=False,
        trace_flags=trace.TraceFlags(trace.TraceFlags.DEFAULT),
    )
    return trace.set_span_in_context(trace.NonRecordingSpan(span_context), otel_context.Context())


# ---------------------------------------------------------------- the service


class Ticketing:
    """The service's state (engine, settings, the relay's wake-up) and its operations.

    Operations take `now` and run one transaction each; the HTTP handlers at the bottom
    only read requests and shape answers."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.hold_ttl_s = env_seconds("BUSLINE_HOLD_TTL_S", HOLD_TTL_DEFAULT_S)
        self.sweep_interval_s = env_seconds("BUSLINE_SWEEP_INTERVAL_S", SWEEP_INTERVAL_DEFAULT_S)
        self.crash_after_commit = os.environ.get("BUSLINE_TEST_CRASH_AFTER_COMMIT") == "1"
        self._engine: Engine | None = None
        self._dates_ready: set[str] = set()
        self._dates_lock = threading.Lock()
        # Taken by a confirm from its transaction to the crash hook, and by the relay's read,
        # so that with the hook armed nothing can publish a row before the process dies.
        self._commit_gate = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise kit.Unavailable("ticketing's database is not open yet")
        return self._engine

    def open(self) -> None:
        engine = db.engine_for(NAME, pool_size=8, max_overflow=8)
        db.migrate(engine, MIGRATIONS)
        self._engine = engine
        for day in service_window(self.clock()):
            self.ensure_trips(day)

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()

    # -- trips -------------------------------------------------------------------------

    def ensure_trips(self, day: date) -> None:
        """Insert `day`'s trips that are missing (once per process and day)."""
        key = day.isoformat()
        if key in self._dates_ready:
            return
        with self._dates_lock:
            if key in self._dates_ready:
                return
            rows = [vars(trip) for trip in trips_on(day)]
            with self.engine.begin() as conn:
                existing = conn.execute(
                    sa.select(sa.func.count()).where(trips.c.service_date == key)
                ).scalar_one()
                if existing < len(rows):
                    conn.execute(_insert_missing(self.engine, trips), rows)
                    log.info("trips_generated", service_date=key, trips=len(rows) - existing)
            self._dates_ready.add(key)

    def search(self, origin: str, destination: str, day: date, now: float) -> dict[str, Any]:
        found = routes.find(origin, destination)
        if not found:
            cities = sorted(
                {r.origin for r in routes.ROUTES} | {r.destination for r in routes.ROUTES}
            )
            return {
                "trips": [],
                "message": f"No buses run between {origin} and {destination}. "
                f"Places served: {', '.join(cities)}.",
            }
        self.ensure_trips(day)
        wanted = origin.strip().lower()
        directions = [
            (route.id, "out" if route.origin.lower() == wanted else "back") for route in found
        ]
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(trips)
                .where(
                    trips.c.service_date == day.isoformat(),
                    trips.c.departs_at > now,
                    sa.tuple_(trips.c.route_id, trips.c.direction).in_(directions),
                )
                .order_by(trips.c.departs_at, trips.c.route_id)
            ).all()
            taken = self._taken_counts(conn, [row.trip_id for row in rows], now)
        return {"trips": [trip_view(row, row.seats - taken.get(row.trip_id, 0)) for row in rows]}

    def _taken_counts(self, conn: Connection, trip_ids: list[str], now: float) -> dict[str, int]:
        if not trip_ids:
            return {}
        counted = conn.execute(
            sa.select(bookings.c.trip_id, sa.func.count())
            .where(bookings.c.trip_id.in_(trip_ids), _occupying(now))
            .group_by(bookings.c.trip_id)
        ).all()
        return {trip_id: int(count) for trip_id, count in counted}

    def find_trip(self, trip_id: str, now: float) -> Any:
        """The trip's row; trips of the service window are generated on first sight."""
        parsed = parse_trip_id(trip_id)
        if parsed is None:
            return None
        day = date.fromisoformat(parsed.service_date)
        if day in service_window(now):
            self.ensure_trips(day)
        with self.engine.connect() as conn:
            return conn.execute(sa.select(trips).where(trips.c.trip_id == trip_id)).first()

    def trip_detail(self, trip_id: str, now: float) -> dict[str, Any]:
        row = self.find_trip(trip_id, now)
        if row is None:
            raise RefusedError(404, "unknown_trip", f"No trip {trip_id!r}.", field="trip_id")
        with self.engine.connect() as conn:
            occupied = conn.execute(
                sa.select(bookings.c.seat, bookings.c.status).where(
                    bookings.c.trip_id == trip_id, _occupying(now)
                )
            ).all()
        status = {seat: "booked" if state == "confirmed" else "held" for seat, state in occupied}
        seats = [{"seat": s, "status": status.get(s, "free")} for s in seat_labels(row.seats)]
        return {**trip_view(row, row.seats - len(status)), "seats": seats}

    # -- holds -------------------------------------------------------------------------

    def hold(self, user_id: str, trip_id: str, seat: str | None, now: float) -> dict[str, Any]:
        timetabled = parse_trip_id(trip_id)
        if timetabled is not None and timetabled.departs_at <= now:
            raise RefusedError(
                409, "departed", f"Trip {trip_id} left at {local_time(timetabled.departs_at)}."
            )
        trip = self.find_trip(trip_id, now)
        if trip is None:
            raise RefusedError(404, "unknown_trip", f"No trip {trip_id!r}.", field="trip_id")
        labels = seat_labels(trip.seats)
        if seat is not None and seat not in labels:
            raise kit.Invalid(
                "seat", f"no seat {seat!r} on this bus; seats are {labels[0]}..{labels[-1]}"
            )
        for _attempt in range(10):
            try:
                booking_id, chosen, expired = self._try_hold(user_id, trip, labels, seat, now)
            except IntegrityError:
                if seat is not None:
                    seat_holds.labels(result="conflict").inc()
                    log.info("seat_conflict", trip_id=trip_id, seat=seat)
                    raise RefusedError(
                        409, "seat_taken", f"Seat {seat} on {trip_id} is taken.", field="seat"
                    ) from None
                continue  # someone took the first free seat between our read and insert
            break
        else:
            raise RefusedError(409, "seat_taken", f"Could not hold a seat on {trip_id}; try again.")
        if expired:
            seat_holds.labels(result="expired").inc(expired)
        seat_holds.labels(result="held").inc()
        sdk.bind(booking_id=booking_id)
        log.info("seat_held", trip_id=trip_id, seat=chosen, route=trip.route_id)
        return self.booking(booking_id, user_id, now)

    def _try_hold(
        self, user_id: str, trip: Any, labels: list[str], seat: str | None, now: float
    ) -> tuple[str, str, int]:
        booking_id = str(uuid.uuid4())
        with self.engine.begin() as conn:
            # Holds past their TTL free their seats now, not only at the next sweep.
            expired = conn.execute(
                bookings.update()
                .where(
                    bookings.c.trip_id == trip.trip_id,
                    bookings.c.status == "held",
                    bookings.c.hold_expires_at <= now,
                )
                .values(status="expired", expired_at=now)
            ).rowcount
            chosen = seat
            if chosen is None:
                taken = set(
                    conn.execute(
                        sa.select(bookings.c.seat).where(
                            bookings.c.trip_id == trip.trip_id, bookings.c.status.in_(ACTIVE)
                        )
                    ).scalars()
                )
                free = [label for label in labels if label not in taken]
                if not free:
                    raise RefusedError(409, "sold_out", f"Trip {trip.trip_id} is full.")
                chosen = free[0]
            conn.execute(
                bookings.insert().values(
                    booking_id=booking_id,
                    trip_id=trip.trip_id,
                    route_id=trip.route_id,
                    seat=chosen,
                    user_id=user_id,
                    status="held",
                    amount_kes=trip.fare_kes,
                    created_at=now,
                    hold_expires_at=now + self.hold_ttl_s,
                    payment_failures=0,
                )
            )
        return booking_id, chosen, int(expired or 0)

    # -- bookings ----------------------------------------------------------------------

    def _booking_row(self, conn: Connection, booking_id: str, *, lock: bool = False) -> Any:
        query = (
            sa.select(bookings, trips.c.origin, trips.c.destination, trips.c.departs_at)
            .join(trips, trips.c.trip_id == bookings.c.trip_id)
            .where(bookings.c.booking_id == booking_id)
        )
        if lock:
            query = query.with_for_update(of=bookings)
        return conn.execute(query).first()

    def booking_row(self, booking_id: str, user_id: str | None) -> Any:
        """The booking; None when it does not exist or (with `user_id`) is someone else's."""
        with self.engine.connect() as conn:
            row = self._booking_row(conn, booking_id)
        if row is None or (user_id is not None and row.user_id != user_id):
            return None
        return row

    def booking(self, booking_id: str, user_id: str | None, now: float) -> dict[str, Any]:
        row = self.booking_row(booking_id, user_id)
        if row is None:
            raise RefusedError(404, "unknown_booking", f"No booking {booking_id!r}.")
        return booking_view(row, now)

    def ticket(self, booking_id: str, user_id: str, now: float) -> dict[str, Any]:
        row = self.booking_row(booking_id, user_id)
        if row is None:
            raise RefusedError(404, "unknown_booking", f"No booking {booking_id!r}.")
        if row.status != "confirmed":
            raise RefusedError(
                409,
                "not_confirmed",
                f"Booking {booking_id} is {status_of(row, now)}: "
                "a ticket is issued once it is paid.",
            )
        return {
            **booking_view(row, now),
            "ticket_code": "BL-" + row.booking_id.replace("-", "")[:10].upper(),
            "passenger": row.user_id,
            "arrives_at": local_time(row.departs_at + routes.BY_ID[row.route_id].duration_min * 60),
            "issued_at": local_time(row.confirmed_at),
        }

    def confirm(self, booking_id: str, payment: Mapping[str, Any], now: float) -> dict[str, Any]:
        """Confirm after a successful payment; idempotent per payment. See the module doc."""
        gate = self._commit_gate if self.crash_after_commit else None
        if gate is not None:
            gate.acquire()
        try:
            try:
                row, event_id = self._confirm_transaction(booking_id, payment, now)
            except IntegrityError:
                log.warning("hold_lost", payment_id=payment["payment_id"])
                raise RefusedError(
                    409,
                    "hold_lost",
                    f"The hold of booking {booking_id} expired and its seat was sold to "
                    "someone else; refund the payment.",
                ) from None
            if event_id is not None and self.crash_after_commit:
                self._crash_once()
        finally:
            if gate is not None:
                gate.release()
        if event_id is not None:
            tickets_sold.labels(route=row.route_id).inc()
            bookings_confirmed.labels(route=row.route_id).inc()
            log.info(
                "booking_confirmed",
                route=row.route_id,
                seat=row.seat,
                payment_id=payment["payment_id"],
                provider=payment["provider"],
                amount_kes=row.amount_kes,
                event_id=event_id,
            )
            self.wake_relay()
        return booking_view(row, now)

    def _confirm_transaction(
        self, booking_id: str, payment: Mapping[str, Any], now: float
    ) -> tuple[Any, str | None]:
        with self.engine.begin() as conn:
            row = self._booking_row(conn, booking_id, lock=True)
            if row is None:
                raise RefusedError(404, "unknown_booking", f"No booking {booking_id!r}.")
            if row.status == "confirmed":
                if row.payment_id == payment["payment_id"]:
                    return row, None
                raise RefusedError(
                    409,
                    "already_confirmed",
                    f"Booking {booking_id} was paid by payment {row.payment_id}; refund this one.",
                    field="payment_id",
                )
            if payment["amount_kes"] != row.amount_kes:
                raise RefusedError(
                    409,
                    "amount_mismatch",
                    f"Booking {booking_id} costs KES {row.amount_kes}, "
                    f"not {payment['amount_kes']}.",
                    field="amount_kes",
                )
            if row.departs_at <= now:
                raise RefusedError(409, "departed", f"The bus of booking {booking_id} has left.")
            conn.execute(
                bookings.update()
                .where(bookings.c.booking_id == booking_id)
                .values(
                    status="confirmed",
                    confirmed_at=now,
                    payment_id=payment["payment_id"],
                    provider=payment["provider"],
                )
            )
            event_id = str(uuid.uuid4())
            body = {
                "event_id": event_id,
                "booking_id": booking_id,
                "phone": payment["phone"],
                "route_id": row.route_id,
                "trip_id": row.trip_id,
                "origin": row.origin,
                "destination": row.destination,
                "seat": row.seat,
                "departs_at": local_time(row.departs_at),
                "amount_kes": row.amount_kes,
            }
            carrier = queue.trace_headers()
            conn.execute(
                outbox.insert().values(
                    event_id=event_id,
                    topic=TOPIC,
                    booking_id=booking_id,
                    payload=json.dumps(body, sort_keys=True),
                    traceparent=carrier.get("traceparent"),
                    tracestate=carrier.get("tracestate"),
                    created_at=now,
                    sent_at=None,
                )
            )
            confirmed = self._booking_row(conn, booking_id)
        return confirmed, event_id

    def _crash_once(self) -> None:
        marker = kit.state_dir() / "ticketing.crashed-after-commit"
        if marker.exists():
            return
        marker.write_text(str(self.clock()))
        log.warning("test_crash_after_commit", exit_status=CRASH_EXIT_STATUS)
        os._exit(CRASH_EXIT_STATUS)

    def payment_failed(
        self, booking_id: str, payment_id: str, result: str, now: float
    ) -> dict[str, Any]:
        with self.engine.begin() as conn:
            updated = conn.execute(
                bookings.update()
                .where(bookings.c.booking_id == booking_id)
                .values(
                    payment_failures=bookings.c.payment_failures + 1,
                    last_failure=result,
                    last_failed_payment_id=payment_id,
                )
            ).rowcount
        if not updated:
            raise RefusedError(404, "unknown_booking", f"No booking {booking_id!r}.")
        log.info("payment_failure_recorded", payment_id=payment_id, result=result)
        return self.booking(booking_id, None, now)

    # -- the seat-hold sweeper ---------------------------------------------------------

    def sweep(self, now: float) -> int:
        """Expire the holds past their TTL; how many."""
        with self.engine.begin() as conn:
            expired = conn.execute(
                bookings.update()
                .where(bookings.c.status == "held", bookings.c.hold_expires_at <= now)
                .values(status="expired", expired_at=now)
            ).rowcount
        count = int(expired or 0)
        if count:
            seat_holds.labels(result="expired").inc(count)
        log.info("seat_holds_swept", expired=count)
        return count

    async def sweeper(self) -> None:
        """Sweep at start and then every interval; a failed run is logged, never fatal."""
        interval_minutes = max(1, round(self.sweep_interval_s / 60))
        tracer = sdk.tracer()
        while True:
            wait = self.sweep_interval_s
            try:
                with (
                    sdk.job_run(SWEEPER_JOB, interval_minutes=interval_minutes),
                    tracer.start_as_current_span(
                        SWEEPER_JOB, context=otel_context.Context(), attributes={"job": SWEEPER_JOB}
                    ),
                ):
                    kit.job_preflight(SWEEPER_JOB)
                    await asyncio.to_thread(self.sweep, self.clock())
            except Exception as exc:  # one failed run must not stop the job
                log.exception("seat_hold_sweep_failed", error=f"{type(exc).__name__}: {exc}")
                sdk.capture_exception(exc)
                wait = min(wait, kit.job_retry_s())  # try again soon, not an interval later
            await asyncio.sleep(wait)

    # -- the outbox relay --------------------------------------------------------------

    def wake_relay(self) -> None:
        """From any thread: have the relay look at the outbox now."""
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            loop.call_soon_threadsafe(wake.set)

    def unsent(self, limit: int) -> tuple[list[Any], int]:
        """The oldest unsent outbox rows, and how many are unsent in all."""
        with self._commit_gate, self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(outbox)
                .where(outbox.c.sent_at.is_(None))
                .order_by(outbox.c.id)
                .limit(limit)
            ).all()
            pending = len(rows)
            if pending == limit:
                pending = conn.execute(
                    sa.select(sa.func.count()).where(outbox.c.sent_at.is_(None))
                ).scalar_one()
        return list(rows), int(pending)

    def mark_sent(self, outbox_id: int, now: float) -> None:
        with self.engine.begin() as conn:
            conn.execute(outbox.update().where(outbox.c.id == outbox_id).values(sent_at=now))

    async def relay_once(self, broker: queue.Broker) -> int:
        """Publish every unsent row, oldest first, stopping at the first failure; how many."""
        sent = 0
        while True:
            token = otel_context.attach(_unsampled())
            try:
                rows, pending = await asyncio.to_thread(self.unsent, RELAY_BATCH)
            finally:
                otel_context.detach(token)
            outbox_pending.set(pending)
            if not rows:
                return sent
            for row in rows:
                await self._publish(broker, row)
                sent += 1
                pending -= 1
                outbox_pending.set(pending)

    async def _publish(self, broker: queue.Broker, row: Any) -> None:
        carrier = {"traceparent": row.traceparent or "", "tracestate": row.tracestate or ""}
        parent = TraceContextTextMapPropagator().extract(
            {k: v for k, v in carrier.items() if v}, context=otel_context.Context()
        )
        token = otel_context.attach(parent)
        try:
            body = json.loads(row.payload)
            headers: dict[str, str] = {"message-id": row.event_id}
            # The broker opens the one PRODUCER span (`publish booking.confirmed`), a child
            # of the attached context: the trace of the payment that confirmed the booking.
            await broker.publish(row.topic, body, headers)
            await asyncio.to_thread(self.mark_sent, row.id, self.clock())
            log.info("outbox_published", event_id=row.event_id, topic=row.topic, outbox_id=row.id)
        finally:
            otel_context.detach(token)

    async def relay(self, open_broker: Callable[[], queue.Broker]) -> None:
        """Flush leftovers at once, then publish whenever woken, and every second."""
        assert self._wake is not None
        broker: queue.Broker | None = None
        failures = 0
        try:
            while True:
                self._wake.clear()  # before reading: a confirm committing meanwhile wakes us again
                try:
                    if broker is None:
                        # Opening the embedded broker touches its file: off the loop.
                        broker = await asyncio.to_thread(open_broker)
                    await self.relay_once(broker)
                    failures = 0
                except Exception as exc:  # the relay retries; the rows stay unsent
                    failures += 1
                    log.exception(
                        "outbox_publish_failed",
                        error=f"{type(exc).__name__}: {exc}",
                        consecutive_failures=failures,
                    )
                    if failures % 10 == 0:
                        sdk.capture_exception(exc)
                    await asyncio.sleep(min(30.0, 0.5 * 2 ** min(failures, 6)))
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), RELAY_POLL_S)
        finally:
            if broker is not None:
                await broker.close()

    @asynccontextmanager
    async def lifespan(self, _: Starlette) -> AsyncIterator[None]:
        with sdk.tracer().start_as_current_span(f"{NAME} startup", context=otel_context.Context()):
            await asyncio.to_thread(self.open)  # migrations and the week's trips: one trace
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        tasks = [
            asyncio.create_task(self.relay(open_queue), name="outbox-relay"),
            asyncio.create_task(self.sweeper(), name="seat-hold-sweeper"),
        ]
        log.info(
            "ticketing_started",
            hold_ttl_s=self.hold_ttl_s,
            sweep_interval_s=self.sweep_interval_s,
            crash_after_commit=self.crash_after_commit,
        )
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.close()


def open_queue() -> queue.Broker:
    return queue.open_broker(NAME)


# ---------------------------------------------------------------- views


def _occupying(now: float) -> sa.ColumnElement[bool]:
    """Bookings that take their seat: confirmed, or held and not past the TTL."""
    return sa.or_(
        bookings.c.status == "confirmed",
        sa.and_(bookings.c.status == "held", bookings.c.hold_expires_at > now),
    )


def trip_view(row: Any, seats_left: int) -> dict[str, Any]:
    route = routes.BY_ID[row.route_id]
    return {
        "trip_id": row.trip_id,
        "route_id": row.route_id,
        "kind": route.kind,
        "origin": row.origin,
        "destination": row.destination,
        "departs_at": local_time(row.departs_at),
        "arrives_at": local_time(row.arrives_at),
        "duration_min": route.duration_min,
        "fare_kes": row.fare_kes,
        "currency": "KES",
        "seats_total": row.seats,
        "seats_left": max(0, seats_left),
    }


def status_of(row: Any, now: float) -> str:
    """The booking's status as a customer sees it: a held booking past its TTL is expired."""
    if row.status == "held" and row.hold_expires_at <= now:
        return "expired"
    return str(row.status)


def booking_view(row: Any, now: float) -> dict[str, Any]:
    view = {
        "booking_id": row.booking_id,
        "user_id": row.user_id,
        "trip_id": row.trip_id,
        "route_id": row.route_id,
        "origin": row.origin,
        "destination": row.destination,
        "departs_at": local_time(row.departs_at),
        "seat": row.seat,
        "status": status_of(row, now),
        "amount_kes": row.amount_kes,
        "currency": "KES",
        "created_at": local_time(row.created_at),
        "hold_expires_at": local_time(row.hold_expires_at),
        "confirmed_at": local_time(row.confirmed_at),
        "payment_id": row.payment_id,
        "provider": row.provider,
        "payment_failures": row.payment_failures,
    }
    if row.last_failure:
        view["last_failure"] = row.last_failure
    return view


# ---------------------------------------------------------------- HTTP


#: Seats by a customer's saved preference.
SEAT_PREFERENCES = {"window": "1A", "aisle": "1B"}


def _user(request: Request) -> str:
    user_id = request.headers.get("x-user-id", "").strip()
    if not user_id:
        raise RefusedError(
            401, "unauthenticated", "Send X-User-Id (the gateway sets it).", "X-User-Id"
        )
    if not TOKEN.match(user_id):
        raise kit.Invalid("X-User-Id", "must be 1-80 letters, digits or _.:-")
    return user_id


def _path_id(request: Request, name: str) -> str:
    value = str(request.path_params[name])
    if not TOKEN.match(value):
        raise kit.Invalid(name, "must be 1-80 letters, digits or _.:-")
    return value


def _search_date(request: Request, now: float) -> date:
    window = service_window(now)
    raw = request.query_params.get("date")
    if raw is None or raw == "":
        return window[0]
    if not DATE.match(raw):
        raise kit.Invalid("date", f"{raw!r} is not a date; use YYYY-MM-DD, such as {window[0]}")
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        raise kit.Invalid("date", f"{raw!r} is not a calendar date; use YYYY-MM-DD") from None
    if day not in window:
        raise kit.Invalid("date", f"must be between {window[0]} and {window[-1]} (Nairobi time)")
    return day


def create_app(clock: Callable[[], float] = time.time) -> Starlette:
    service = Ticketing(clock)

    def search_trips(request: Request) -> JSONResponse:
        now = clock()
        origin = kit.query_text(request, "from", max_len=60)
        destination = kit.query_text(request, "to", max_len=60)
        if origin.strip().lower() == destination.strip().lower():
            raise kit.Invalid("to", "must be a different place from `from`")
        day = _search_date(request, now)
        return JSONResponse(service.search(origin, destination, day, now))

    def get_trip(request: Request) -> JSONResponse:
        return JSONResponse(service.trip_detail(_path_id(request, "trip_id"), clock()))

    async def create_booking(request: Request) -> JSONResponse:
        user_id = _user(request)
        body = await kit.json_object(request)
        trip_id = kit.text_field(body, "trip_id", max_len=80)
        seat = kit.text_field(body, "seat", required=False, max_len=4).strip().upper() or None
        sdk.set_user(user_id)
        if features.enabled("seat_preferences"):
            seat = seat or SEAT_PREFERENCES[str(body.get("seat_preference", "any"))]
        booking = await asyncio.to_thread(service.hold, user_id, trip_id, seat, clock())
        return JSONResponse(booking, status_code=201)

    def get_booking(request: Request) -> JSONResponse:
        user_id = _user(request)
        return JSONResponse(service.booking(_path_id(request, "booking_id"), user_id, clock()))

    def get_ticket(request: Request) -> JSONResponse:
        user_id = _user(request)
        return JSONResponse(service.ticket(_path_id(request, "booking_id"), user_id, clock()))

    def internal_booking(request: Request) -> JSONResponse:
        now = clock()
        booking_id = _path_id(request, "booking_id")
        row = service.booking_row(booking_id, None)
        if row is None:
            raise RefusedError(404, "unknown_booking", f"No booking {booking_id!r}.")
        return JSONResponse(
            {
                "booking_id": row.booking_id,
                "user_id": row.user_id,
                "amount_kes": row.amount_kes,
                "status": status_of(row, now),
                "route_id": row.route_id,
                "trip_id": row.trip_id,
                "seat": row.seat,
                "departs_at": local_time(row.departs_at),
                "hold_expires_at": local_time(row.hold_expires_at),
                "payment_id": row.payment_id,
            }
        )

    async def confirm(request: Request) -> JSONResponse:
        booking_id = _path_id(request, "booking_id")
        body = await kit.json_object(request)
        normalised = kit.phone_field(body)
        payment = {
            "payment_id": kit.text_field(body, "payment_id", max_len=80, check=is_token),
            "provider": kit.text_field(body, "provider", choices=kit.PROVIDERS),
            "amount_kes": kit.int_field(body, "amount_kes", low=1, high=1_000_000),
            "phone": normalised,
        }
        sdk.bind(booking_id=booking_id, payment_id=payment["payment_id"])
        booking = await asyncio.to_thread(service.confirm, booking_id, payment, clock())
        return JSONResponse(booking)

    async def payment_failed(request: Request) -> JSONResponse:
        booking_id = _path_id(request, "booking_id")
        body = await kit.json_object(request)
        payment_id = kit.text_field(body, "payment_id", max_len=80, check=is_token)
        result = kit.text_field(
            body,
            "result",
            max_len=40,
            check=lambda value: OUTCOME.match(value) is not None,
            hint="must be an outcome such as user_cancelled",
        )
        sdk.bind(booking_id=booking_id, payment_id=payment_id)
        booking = await asyncio.to_thread(
            service.payment_failed, booking_id, payment_id, result, clock()
        )
        return JSONResponse(booking)

    async def on_refused(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RefusedError)
        return exc.response()

    app = Starlette(
        routes=[
            HttpRoute("/healthz", kit.healthz(NAME)),
            HttpRoute("/trips", search_trips),
            HttpRoute("/trips/{trip_id}", get_trip),
            HttpRoute("/bookings", create_booking, methods=["POST"]),
            HttpRoute("/bookings/{booking_id}", get_booking),
            HttpRoute("/tickets/{booking_id}", get_ticket),
            HttpRoute("/internal/bookings/{booking_id}", internal_booking),
            HttpRoute("/internal/bookings/{booking_id}/confirm", confirm, methods=["POST"]),
            HttpRoute(
                "/internal/bookings/{booking_id}/payment-failed", payment_failed, methods=["POST"]
            ),
        ],
        lifespan=service.lifespan,
    )
    kit.handles_invalid(app)
    app.add_exception_handler(RefusedError, on_refused)
    app.state.ticketing = service
    return app


def main() -> None:
    kit.serve(NAME, kit.instrument(NAME, create_app()))


__all__ = ["Ticketing", "create_app", "main", "parse_trip_id", "seat_labels", "trips_on"]
