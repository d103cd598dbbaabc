"""The timetable, pure: which trips the route network runs on a day, their deterministic
ids, departure and arrival times, seat labels, and the service window, all in Nairobi time.
No database and no clock: callers pass the day or `now`. Ticketing stores and sells these
trips.

Trips come from the route network (`busline.routes`) for today and the next six days, in
both directions: long intercity roads at 06:30, 09:00, 13:00 and a 21:00 night bus, shorter
ones every two hours from 06:00 to 18:00, city routes every 30 minutes from 06:00 to 21:00.
A trip id is `<route>-<out|back>-<YYYYMMDD>-<HHMM>` (`nairobi-mombasa-out-20261128-0900`),
so `parse_trip_id` gives back the trip a well-formed id names.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Literal

from busline import kit, routes

__all__ = [
    "CITY_DEPARTURES",
    "LONG_HAUL_DEPARTURES",
    "NAIROBI",
    "SHORT_HAUL_DEPARTURES",
    "WINDOW_DAYS",
    "Direction",
    "Trip",
    "departures",
    "local_time",
    "parse_trip_id",
    "seat_labels",
    "service_window",
    "trip_id_of",
    "trip_of",
    "trips_on",
]

NAIROBI = kit.NAIROBI
WINDOW_DAYS = 7

#: Departures (local time) of an intercity road taking four hours or more, with the night bus.
LONG_HAUL_DEPARTURES = ("06:30", "09:00", "13:00", "21:00")
#: Departures of a shorter intercity road.
SHORT_HAUL_DEPARTURES = ("06:00", "08:00", "10:00", "12:00", "14:00", "16:00", "18:00")
LONG_HAUL_MIN = 240
#: City routes: every 30 minutes from 06:00 to 21:00.
CITY_DEPARTURES = tuple(f"{m // 60:02d}:{m % 60:02d}" for m in range(6 * 60, 21 * 60 + 1, 30))

SEAT_LETTERS = "ABCD"


Direction = Literal["out", "back"]


@dataclass(frozen=True)
class Trip:
    trip_id: str
    route_id: str
    direction: Direction
    origin: str
    destination: str
    service_date: str
    departs_at: int
    arrives_at: int
    seats: int
    fare_kes: int


def departures(route: routes.Route) -> tuple[str, ...]:
    if route.kind == "city":
        return CITY_DEPARTURES
    return LONG_HAUL_DEPARTURES if route.duration_min >= LONG_HAUL_MIN else SHORT_HAUL_DEPARTURES


def trip_id_of(route_id: str, direction: Direction, day: date, hhmm: str) -> str:
    return f"{route_id}-{direction}-{day:%Y%m%d}-{hhmm.replace(':', '')}"


def trip_of(route: routes.Route, direction: Direction, day: date, hhmm: str) -> Trip:
    hour, minute = (int(part) for part in hhmm.split(":"))
    departs = datetime(day.year, day.month, day.day, hour, minute, tzinfo=NAIROBI)
    origin, destination = (
        (route.origin, route.destination)
        if direction == "out"
        else (route.destination, route.origin)
    )
    departs_at = int(departs.timestamp())
    return Trip(
        trip_id=trip_id_of(route.id, direction, day, hhmm),
        route_id=route.id,
        direction=direction,
        origin=origin,
        destination=destination,
        service_date=day.isoformat(),
        departs_at=departs_at,
        arrives_at=departs_at + route.duration_min * 60,
        seats=route.seats,
        fare_kes=route.fare_kes,
    )


def trips_on(day: date) -> list[Trip]:
    """Every trip of the network on `day`, both directions."""
    return [
        trip_of(route, direction, day, hhmm)
        for route in routes.ROUTES
        for direction in ("out", "back")
        for hhmm in departures(route)
    ]


def parse_trip_id(trip_id: str) -> Trip | None:
    """The trip a well-formed id names (whether or not it is in the database), else None."""
    parts = trip_id.rsplit("-", 3)
    if len(parts) != 4:
        return None
    route_id, direction, day_text, hhmm = parts
    route = routes.BY_ID.get(route_id)
    if route is None or direction not in ("out", "back") or len(hhmm) != 4:
        return None
    try:
        day = datetime.strptime(day_text, "%Y%m%d").date()
    except ValueError:
        return None
    time_text = f"{hhmm[:2]}:{hhmm[2:]}"
    if time_text not in departures(route):
        return None
    return trip_of(route, "out" if direction == "out" else "back", day, time_text)


def seat_labels(count: int) -> list[str]:
    """Seat names row by row, four to a row: 1A, 1B, 1C, 1D, 2A ..."""
    return [
        f"{n // len(SEAT_LETTERS) + 1}{SEAT_LETTERS[n % len(SEAT_LETTERS)]}" for n in range(count)
    ]


def service_window(now: float) -> list[date]:
    """Today (Nairobi) and the next six days: the dates trips can be searched and booked."""
    today = datetime.fromtimestamp(now, NAIROBI).date()
    return [today + timedelta(days=n) for n in range(WINDOW_DAYS)]


def local_time(epoch: float | None) -> str | None:
    if epoch is None:
        return None
    return datetime.fromtimestamp(epoch, NAIROBI).isoformat(timespec="seconds")
