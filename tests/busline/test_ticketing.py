"""Ticketing as a real process: trip search, seat holds (concurrent ones included), owner-only
reads, confirmation through the outbox onto the real embedded queue, the seat-hold sweeper,
and a crash between the commit and the publish that still publishes exactly once."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import threading
from datetime import datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from busline.queue import EmbeddedBroker
from tests.busline.conftest import Envelopes, Platform, Proc
from tests.support import http_peer, wait_until

NAIROBI = ZoneInfo("Africa/Nairobi")
TOPIC = "booking.confirmed"
SPAN_KIND_PRODUCER = 4
PHONE = "254712345678"


def day(offset: int) -> datetime:
    return datetime.now(NAIROBI) + timedelta(days=offset)


def trip(route: str, direction: str = "out", offset: int = 1, hhmm: str = "0900") -> str:
    return f"{route}-{direction}-{day(offset):%Y%m%d}-{hhmm}"


def user(name: str) -> dict[str, str]:
    return {"X-User-Id": name}


def payment(booking: dict[str, Any], payment_id: str = "pay-1") -> dict[str, Any]:
    return {
        "payment_id": payment_id,
        "provider": "mpesa",
        "amount_kes": booking["amount_kes"],
        "phone": "0712345678",
    }


def metric(proc: Proc, name: str, **labels: str) -> float | None:
    started = [line for line in proc.json_lines() if line.get("event") == "lookout_sdk_started"]
    text = httpx.get(started[-1]["metrics_url"], timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return None


def database(platform: Platform) -> sqlite3.Connection:
    connection = sqlite3.connect(platform.state / "db" / "ticketing.sqlite", timeout=10)
    connection.row_factory = sqlite3.Row
    return connection


def outbox_rows(platform: Platform) -> list[sqlite3.Row]:
    with database(platform) as connection:
        return connection.execute("SELECT * FROM outbox ORDER BY id").fetchall()


def broker(platform: Platform) -> EmbeddedBroker:
    return EmbeddedBroker(platform.state / "queue" / "broker.sqlite")


def queued(platform: Platform) -> int:
    embedded = broker(platform)
    try:
        return embedded.stats_sync(TOPIC).ready
    finally:
        embedded.close_sync()


def take_messages(platform: Platform, count: int) -> list[tuple[dict[str, Any], dict[str, str]]]:
    """Consume `count` messages from the embedded queue (acking them), as the notifier would."""

    async def run() -> list[tuple[dict[str, Any], dict[str, str]]]:
        embedded = broker(platform)
        got: list[tuple[dict[str, Any], dict[str, str]]] = []
        enough = asyncio.Event()

        async def handler(body: dict[str, Any], headers: dict[str, str]) -> None:
            got.append((body, headers))
            if len(got) >= count:
                enough.set()

        consumer = asyncio.create_task(embedded.consume(TOPIC, handler))
        try:
            await asyncio.wait_for(enough.wait(), 10)
        finally:
            consumer.cancel()
            await asyncio.gather(consumer, return_exceptions=True)
            await embedded.close()
        return got

    return asyncio.run(run())


def hold(url: str, trip_id: str, who: str = "alice", **extra: Any) -> httpx.Response:
    return httpx.post(f"{url}/bookings", json={"trip_id": trip_id, **extra}, headers=user(who))


def held(url: str, trip_id: str, who: str = "alice", **extra: Any) -> dict[str, Any]:
    response = hold(url, trip_id, who, **extra)
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def confirm(url: str, booking: dict[str, Any], **headers: str) -> httpx.Response:
    return httpx.post(
        f"{url}/internal/bookings/{booking['booking_id']}/confirm",
        json=payment(booking),
        headers=headers,
    )


# ---------------------------------------------------------------- search


def test_search_serves_intercity_roads_both_ways_and_city_routes(platform: Platform) -> None:
    """Six intercity roads from Nairobi (and Mombasa-Malindi) plus city routes answer trips
    with seats left; a reversed search runs the same road back; names are case-insensitive."""
    platform.start("ticketing")
    url = platform.url("ticketing")
    date = f"{day(1):%Y-%m-%d}"
    pairs = [
        ("Nairobi", "Mombasa"), ("Nairobi", "Kisumu"), ("Nairobi", "Nakuru"),
        ("Nairobi", "Eldoret"), ("Nairobi", "Nyeri"), ("Nairobi", "Kitale"),
        ("Mombasa", "Malindi"), ("Nairobi CBD", "JKIA"), ("Rongai", "Nairobi CBD"),
    ]  # fmt: skip
    for origin, destination in pairs:
        response = httpx.get(
            f"{url}/trips", params={"from": origin.upper(), "to": destination.lower(), "date": date}
        )
        assert response.status_code == 200, response.text
        trips = response.json()["trips"]
        assert trips, (origin, destination)
        assert {(t["origin"], t["destination"]) for t in trips} == {(origin, destination)}
        assert all(t["seats_left"] == t["seats_total"] for t in trips)
        assert all(t["departs_at"].startswith(date) for t in trips)

    mombasa = httpx.get(f"{url}/trips", params={"from": "Mombasa", "to": "Nairobi", "date": date})
    assert [t["departs_at"][11:16] for t in mombasa.json()["trips"]] == [
        "06:30", "09:00", "13:00", "21:00",
    ]  # fmt: skip
    assert mombasa.json()["trips"][1]["trip_id"] == trip("nairobi-mombasa", "back")
    jkia = httpx.get(f"{url}/trips", params={"from": "Nairobi CBD", "to": "JKIA", "date": date})
    times = [t["departs_at"][11:16] for t in jkia.json()["trips"]]
    assert (times[0], times[1], times[-1], len(times)) == ("06:00", "06:30", "21:00", 31)

    unknown = httpx.get(f"{url}/trips", params={"from": "Nairobi", "to": "Kampala"})
    assert unknown.status_code == 200
    assert unknown.json()["trips"] == []
    assert "Kampala" in unknown.json()["message"]


def test_bad_search_and_booking_requests_name_their_field(platform: Platform) -> None:
    """Every bad input answers 4xx with the error shape naming the field."""
    platform.start("ticketing")
    url = platform.url("ticketing")
    late = f"{day(9):%Y-%m-%d}"
    cases = [
        (httpx.get(f"{url}/trips", params={"to": "Mombasa"}), 400, "from"),
        (httpx.get(f"{url}/trips", params={"from": "Nairobi"}), 400, "to"),
        (httpx.get(f"{url}/trips", params={"from": "Nairobi", "to": "nairobi"}), 400, "to"),
        (httpx.get(f"{url}/trips?from=Nairobi&to=Mombasa&date=28-11-2026"), 400, "date"),
        (httpx.get(f"{url}/trips?from=Nairobi&to=Mombasa&date=2026-02-30"), 400, "date"),
        (httpx.get(f"{url}/trips?from=Nairobi&to=Mombasa&date={late}"), 400, "date"),
        (httpx.post(f"{url}/bookings", json={}, headers=user("a")), 400, "trip_id"),
        (httpx.post(f"{url}/bookings", json={"trip_id": 5}, headers=user("a")), 400, "trip_id"),
        (hold(url, trip("nairobi-mombasa"), seat="99Z"), 400, "seat"),
        (
            httpx.post(f"{url}/bookings", json={"trip_id": trip("nairobi-mombasa")}),
            401,
            "X-User-Id",
        ),
        (hold(url, "nairobi-mombasa-out-20991231-0900"), 404, "trip_id"),
        (httpx.get(f"{url}/trips/no-such-trip"), 404, "trip_id"),
        (
            httpx.post(
                f"{url}/bookings",
                content=b"{",
                headers={**user("a"), "content-type": "application/json"},
            ),
            400,
            "body",
        ),
    ]
    for response, status, field in cases:
        assert (response.status_code, response.json().get("field")) == (status, field), (
            response.text
        )
        assert set(response.json()) >= {"error", "message", "field"}

    gone = hold(url, trip("nairobi-mombasa", offset=-1))
    assert (gone.status_code, gone.json()["error"]) == (409, "departed")


# ---------------------------------------------------------------- holds


def test_concurrent_holds_of_one_seat_have_exactly_one_winner(platform: Platform) -> None:
    """Ten customers hold seat 7C of one bus at the same moment: one gets it, nine get 409
    `seat_taken`; the seat map and seats_left show one seat gone."""
    proc = platform.start("ticketing")
    url = platform.url("ticketing")
    trip_id = trip("nairobi-kisumu", offset=2, hhmm="1300")
    start = threading.Barrier(10)
    answers: list[httpx.Response] = []

    def attempt(n: int) -> None:
        with httpx.Client(timeout=30) as client:
            start.wait()
            answers.append(
                client.post(
                    f"{url}/bookings",
                    json={"trip_id": trip_id, "seat": "7c"},
                    headers=user(f"u{n}"),
                )
            )

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(10)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    statuses = sorted(r.status_code for r in answers)
    assert statuses == [201] + [409] * 9
    assert {r.json()["error"] for r in answers if r.status_code == 409} == {"seat_taken"}
    winner = next(r.json() for r in answers if r.status_code == 201)
    assert (winner["seat"], winner["status"], winner["amount_kes"]) == ("7C", "held", 900)

    detail = httpx.get(f"{url}/trips/{trip_id}").json()
    assert detail["seats_left"] == 43
    assert [s for s in detail["seats"] if s["status"] != "free"] == [
        {"seat": "7C", "status": "held"}
    ]
    assert metric(proc, "seat_holds_total", result="held") == 1.0
    assert metric(proc, "seat_holds_total", result="conflict") == 9.0

    first_free = held(url, trip_id, "late")
    assert first_free["seat"] == "1A"


def test_bookings_and_tickets_are_for_their_owner_only(platform: Platform) -> None:
    """Someone else's booking is a 404; a ticket is 409 `not_confirmed` until paid."""
    platform.start("ticketing")
    url = platform.url("ticketing")
    booking = held(url, trip("nairobi-nakuru", hhmm="1000"), "alice")
    path = f"/bookings/{booking['booking_id']}"

    assert httpx.get(f"{url}{path}", headers=user("alice")).json() == booking
    assert httpx.get(f"{url}{path}", headers=user("mallory")).status_code == 404
    assert httpx.get(f"{url}{path}").status_code == 401
    ticket = httpx.get(f"{url}/tickets/{booking['booking_id']}", headers=user("alice"))
    assert (ticket.status_code, ticket.json()["error"]) == (409, "not_confirmed")

    internal = httpx.get(f"{url}/internal/bookings/{booking['booking_id']}").json()
    assert {k: internal[k] for k in ("user_id", "amount_kes", "status", "route_id")} == {
        "user_id": "alice",
        "amount_kes": 450,
        "status": "held",
        "route_id": "nairobi-nakuru",
    }

    assert confirm(url, booking).status_code == 200
    ticket = httpx.get(f"{url}/tickets/{booking['booking_id']}", headers=user("alice"))
    assert ticket.status_code == 200
    assert (ticket.json()["status"], ticket.json()["seat"]) == ("confirmed", booking["seat"])
    assert ticket.json()["ticket_code"].startswith("BL-")
    assert (
        httpx.get(f"{url}/tickets/{booking['booking_id']}", headers=user("bob")).status_code == 404
    )


# ---------------------------------------------------------------- confirmation and the outbox


def test_confirm_is_idempotent_and_publishes_one_message_in_the_payments_trace(
    platform: Platform,
) -> None:
    """Two confirms of one payment: one booking, one outbox row, one message on the queue
    with one PRODUCER span in the trace of the confirming request; tickets_sold moves once."""
    with http_peer() as (sink, recorder):
        proc = platform.start(
            "ticketing",
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_ENDPOINT=sink,
            OTEL_BSP_SCHEDULE_DELAY="100",
        )
        url = platform.url("ticketing")
        booking = held(url, trip("nairobi-mombasa"))
        trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
        traceparent = f"00-{trace_id}-00f067aa0ba902b7-01"

        first = confirm(url, booking, traceparent=traceparent)
        second = confirm(url, booking)
        assert first.status_code == second.status_code == 200
        assert first.json() == second.json()
        assert first.json()["status"] == "confirmed"

        wait_until(lambda: outbox_rows(platform)[0]["sent_at"] is not None, 10, "the relay")
        rows = outbox_rows(platform)
        assert len(rows) == 1
        assert rows[0]["traceparent"].split("-")[1] == trace_id
        assert queued(platform) == 1
        [(body, headers)] = take_messages(platform, 1)
        assert body == {
            "event_id": rows[0]["event_id"],
            "booking_id": booking["booking_id"],
            "phone": PHONE,
            "route_id": "nairobi-mombasa",
            "trip_id": booking["trip_id"],
            "origin": "Nairobi",
            "destination": "Mombasa",
            "seat": booking["seat"],
            "departs_at": booking["departs_at"],
            "amount_kes": 1350,
        }
        assert headers["traceparent"].split("-")[1] == trace_id

        assert metric(proc, "tickets_sold_total", route="nairobi-mombasa") == 1.0
        assert metric(proc, "bookings_confirmed_total", route="nairobi-mombasa") == 1.0
        assert metric(proc, "outbox_pending") == 0.0

        other = {**payment(booking), "payment_id": "pay-2"}
        again = httpx.post(f"{url}/internal/bookings/{booking['booking_id']}/confirm", json=other)
        assert (again.status_code, again.json()["error"]) == (409, "already_confirmed")

        platform.stop("ticketing")  # SIGTERM: the SDK flushes every span before it exits
        [span] = [s for s in recorder.spans if s.kind == SPAN_KIND_PRODUCER]
        assert (span.name, span.trace_id, span.service) == (
            "publish booking.confirmed",
            trace_id,
            "ticketing",
        )
        assert headers["traceparent"].split("-")[2] == span.span_id
        [server] = [
            s
            for s in recorder.spans
            if s.trace_id == trace_id and s.name == "POST /internal/bookings/{booking_id}/confirm"
        ]
        assert (server.parent_span_id, span.parent_span_id) == ("00f067aa0ba902b7", server.span_id)


def test_confirm_and_payment_failed_validate_and_record(platform: Platform) -> None:
    """Bad confirm bodies name their field; a wrong amount is refused; a failed payment is
    recorded and the booking stays held."""
    platform.start("ticketing")
    url = platform.url("ticketing")
    booking = held(url, trip("nairobi-eldoret", hhmm="1000"))
    base = f"{url}/internal/bookings/{booking['booking_id']}"
    good = payment(booking)
    cases = [
        ({**good, "phone": "12345"}, 400, "phone"),
        ({**good, "provider": "paypal"}, 400, "provider"),
        ({**good, "amount_kes": "800"}, 400, "amount_kes"),
        ({k: v for k, v in good.items() if k != "payment_id"}, 400, "payment_id"),
        ({**good, "amount_kes": 1}, 409, "amount_kes"),
    ]
    for body, status, field in cases:
        response = httpx.post(f"{base}/confirm", json=body)
        assert (response.status_code, response.json().get("field")) == (status, field)
    missing = httpx.post(f"{url}/internal/bookings/nope/confirm", json=good)
    assert (missing.status_code, missing.json()["error"]) == (404, "unknown_booking")

    bad = httpx.post(f"{base}/payment-failed", json={"payment_id": "pay-9"})
    assert (bad.status_code, bad.json()["field"]) == (400, "result")
    failed = httpx.post(
        f"{base}/payment-failed", json={"payment_id": "pay-9", "result": "user_cancelled"}
    )
    assert failed.status_code == 200
    assert {k: failed.json()[k] for k in ("status", "payment_failures", "last_failure")} == {
        "status": "held",
        "payment_failures": 1,
        "last_failure": "user_cancelled",
    }
    assert outbox_rows(platform) == []
    assert confirm(url, booking).json()["status"] == "confirmed"


# ---------------------------------------------------------------- the sweeper


def test_sweeper_expires_holds_survives_a_failed_run_and_lost_holds_are_refused(
    platform: Platform,
) -> None:
    """With a 1 s TTL and a 0.3 s sweep: a failing sweep run is logged and the next one
    expires the hold; an expired hold whose seat is free can still be confirmed; one whose
    seat was sold meanwhile answers 409 `hold_lost`."""
    sink = Envelopes()
    proc = platform.start(
        "ticketing",
        BUSLINE_HOLD_TTL_S="1",
        BUSLINE_SWEEP_INTERVAL_S="0.3",
        SENTRY_DSN=sink.dsn,
    )
    url = platform.url("ticketing")
    trip_id = trip("nairobi-nyeri", hhmm="1400")

    with database(platform) as connection:
        connection.execute(
            "CREATE TRIGGER sweeper_fault BEFORE UPDATE OF status ON bookings "
            "WHEN NEW.status = 'expired' BEGIN SELECT RAISE(ABORT, 'injected fault'); END"
        )
    first = held(url, trip_id, "alice", seat="2B")

    def failed_runs() -> list[dict[str, Any]]:
        return [line for line in proc.json_lines() if line.get("event") == "seat_hold_sweep_failed"]

    wait_until(failed_runs, 10, "a failed sweep run")
    # Each run is a Sentry check-in: the failed one says error, so Lookout can alert on it.
    wait_until(lambda: "error" in sink.statuses("seat-hold-sweeper"), 10, "an error check-in")
    with database(platform) as connection:
        connection.execute("DROP TRIGGER sweeper_fault")
    errors = len(sink.statuses("seat-hold-sweeper"))
    wait_until(
        lambda: "ok" in sink.statuses("seat-hold-sweeper")[errors:], 10, "an ok check-in after"
    )
    sink.close()

    def stored_status(booking_id: str) -> str:
        with database(platform) as connection:
            row = connection.execute(
                "SELECT status FROM bookings WHERE booking_id = ?", (booking_id,)
            ).fetchone()
        return str(row["status"])

    wait_until(lambda: stored_status(first["booking_id"]) == "expired", 10, "the sweep")
    assert metric(proc, "seat_holds_total", result="expired") == 1.0
    seat_map = httpx.get(f"{url}/trips/{trip_id}").json()
    assert {s["status"] for s in seat_map["seats"]} == {"free"}

    late_but_free = confirm(url, first)
    assert (late_but_free.status_code, late_but_free.json()["status"]) == (200, "confirmed")

    second = held(url, trip_id, "bob", seat="3A")
    wait_until(lambda: stored_status(second["booking_id"]) == "expired", 10, "the sweep")
    thief = held(url, trip_id, "carol", seat="3A")
    assert confirm(url, thief).status_code == 200
    lost = confirm(url, second)
    assert (lost.status_code, lost.json()["error"]) == (409, "hold_lost")
    assert stored_status(second["booking_id"]) == "expired"
    assert len(outbox_rows(platform)) == 2


# ---------------------------------------------------------------- a crash after the commit


def test_crash_between_commit_and_publish_still_publishes_exactly_once(
    platform: Platform,
) -> None:
    """The test hook kills ticketing right after a confirm commits; the restarted process
    publishes the outbox row it left, once, and a retried confirm adds nothing."""
    env = {"BUSLINE_TEST_CRASH_AFTER_COMMIT": "1"}
    proc = platform.start("ticketing", **env)
    url = platform.url("ticketing")
    booking = held(url, trip("nairobi-kitale"))

    with pytest.raises(httpx.TransportError):
        confirm(url, booking)
    assert proc.process.wait(timeout=10) == 137
    [row] = outbox_rows(platform)
    assert row["sent_at"] is None
    assert queued(platform) == 0
    platform.stop("ticketing", signal.SIGKILL)

    restarted = platform.start("ticketing", **env)
    wait_until(lambda: outbox_rows(platform)[0]["sent_at"] is not None, 10, "the relay")
    retried = confirm(platform.url("ticketing"), booking)
    assert (retried.status_code, retried.json()["status"]) == (200, "confirmed")
    assert restarted.process.poll() is None
    assert len(outbox_rows(platform)) == 1
    assert queued(platform) == 1
    [(body, _)] = take_messages(platform, 1)
    assert (body["event_id"], body["booking_id"]) == (row["event_id"], booking["booking_id"])
    assert queued(platform) == 0


# ---------------------------------------------------------------- PostgreSQL


def test_holds_and_confirmation_on_postgresql(platform: Platform, own_postgres: str) -> None:
    """The same code on PostgreSQL: concurrent holds of a seat have one winner, and the
    confirmation is published from the outbox."""
    platform.start("ticketing", BUSLINE_DATABASE_URL=own_postgres)
    url = platform.url("ticketing")
    trip_id = trip("mombasa-malindi", "back", offset=5, hhmm="1600")
    start = threading.Barrier(6)
    answers: list[httpx.Response] = []

    def attempt(n: int) -> None:
        with httpx.Client(timeout=30) as client:
            start.wait()
            answers.append(
                client.post(
                    f"{url}/bookings",
                    json={"trip_id": trip_id, "seat": "11D"},
                    headers=user(f"pg{n}"),
                )
            )

    threads = [threading.Thread(target=attempt, args=(n,)) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in answers) == [201] + [409] * 5
    booking = next(r.json() for r in answers if r.status_code == 201)

    assert confirm(url, booking).json()["status"] == "confirmed"
    assert confirm(url, booking).json()["status"] == "confirmed"
    wait_until(lambda: queued(platform) == 1, 10, "the relay to publish")
    [(body, _)] = take_messages(platform, 1)
    assert (body["booking_id"], body["seat"], body["phone"]) == (
        booking["booking_id"],
        "11D",
        PHONE,
    )
    assert httpx.get(f"{url}/trips/{trip_id}").json()["seats_left"] == 43
