"""fleet: the buses on the road, simulated, with their GPS feed.

34 buses (`KBX-101` ... `KBX-134`: four on each intercity route, two on each city route)
drive up and down their route's polyline in simulated time. Nothing is stored: at start
each bus gets a place, a direction and a driver's pace drawn from `BUSLINE_SEED`, so a
restart with the same seed starts the same fleet.

- **Time.** A clock task advances the simulation every `BUSLINE_FLEET_TICK_S` seconds
  (default 1, at most 5 so a live map moves at least every 5 s) by the real time elapsed
  times `BUSLINE_FLEET_TIME_SCALE` (default 60: a simulated minute per real second, so a
  bus visibly moves; 1 is real time). Nairobi-Mombasa takes about 6.5 simulated hours:
  6.5 real minutes at the default scale.
- **Speed.** Each bus drifts around its route's `speed_kmh` (a slowly varying mood of
  about ±10 % and the driver's pace of ±10 %), eases in and out of changes over about
  30 simulated seconds, slows to 45 % within 2.5 km of a town on the road (the route's
  `stops`), and stops 20-60 s at each stop of a city route.
  At either end it waits 10-25 simulated minutes (3-8 on a city route) and turns round.
- **GPS.** Every tick each bus reports a fix: position, speed, heading and the time.
  A bus whose id is in `Fleet.stale` keeps driving but reports nothing, so its last fix
  ages: `bus_gps_staleness_seconds` grows and it drops out of `active_buses_count` (buses
  with a fix in the last 60 s). The fault injection of the next issue fills that set.

HTTP: `GET /fleet/buses[?route=ID]`, `GET /fleet/buses/{bus_id}`, `GET /fleet/routes`
(each route's polyline, to draw the map under the buses).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import random
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute

import lookout.sdk
from busline import kit
from busline.routes import ROUTES, Point, Route, distance_km

NAME = "fleet"

BUSES_PER_ROUTE = {"intercity": 4, "city": 2}
FIRST_BUS_NUMBER = 101
DEFAULT_TIME_SCALE = 60.0
DEFAULT_TICK_S = 1.0
MAX_TICK_S = 5.0
DEFAULT_SEED = 1
ACTIVE_FIX_WINDOW_S = 60.0
#: The longest simulated step taken at once; a tick is split into steps of at most this.
STEP_S = 10.0
TOWN_RADIUS_KM = 2.5
TOWN_FACTOR = 0.45
CITY_STOP_S = (20.0, 60.0)
TERMINUS_DWELL_S = {"intercity": (600.0, 1500.0), "city": (180.0, 480.0)}
ACCELERATION_TAU_S = 30.0
MOOD_TAU_S = 300.0
MOOD_SD = 0.10
MAX_SPEED_FACTOR = 1.35

log = lookout.sdk.get_logger("busline.fleet")
LABELS = ("bus", "route")
active_buses_count = lookout.sdk.gauge(
    "active_buses_count", "Buses that reported a GPS fix in the last minute."
)
bus_latitude = lookout.sdk.gauge(
    "bus_latitude", "Latitude of each bus's last GPS fix (WGS 84, degrees).", LABELS
)
bus_longitude = lookout.sdk.gauge(
    "bus_longitude", "Longitude of each bus's last GPS fix (WGS 84, degrees).", LABELS
)
bus_speed_kmh = lookout.sdk.gauge("bus_speed_kmh", "Speed at each bus's last GPS fix.", LABELS)
bus_gps_staleness_seconds = lookout.sdk.gauge(
    "bus_gps_staleness_seconds", "Seconds since each bus's last GPS fix.", LABELS
)


# ---------------------------------------------------------------- the road


def bearing_deg(a: Point, b: Point) -> float:
    """Initial great-circle bearing from `a` to `b`, degrees clockwise from north."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    y = math.sin(lon2 - lon1) * math.cos(lat2)
    x = math.cos(lat1) * math.sin(lat2) - math.sin(lat1) * math.cos(lat2) * math.cos(lon2 - lon1)
    return (math.degrees(math.atan2(y, x)) + 360.0) % 360.0


class Road:
    """A route's polyline measured in kilometres from its origin."""

    def __init__(self, route: Route) -> None:
        self.route = route
        self.points = route.polyline
        self.at_km = [0.0]
        for a, b in zip(self.points, self.points[1:], strict=False):
            self.at_km.append(self.at_km[-1] + distance_km(a, b))
        self.length_km = self.at_km[-1]
        self.towns_km = self._towns()

    def _towns(self) -> list[float]:
        """Where the towns are, in km from the origin: each of the route's stops is a
        point of its polyline (densifying only adds points between them)."""
        marks = []
        for stop in self.route.stops:
            i = min(range(len(self.points)), key=lambda j: distance_km(self.points[j], stop))
            marks.append(self.at_km[i])
        return sorted(set(marks))

    def _segment(self, km: float) -> int:
        for i in range(len(self.at_km) - 1):
            if km <= self.at_km[i + 1]:
                return i
        return len(self.at_km) - 2

    def position(self, km: float) -> Point:
        km = min(max(km, 0.0), self.length_km)
        i = self._segment(km)
        span = self.at_km[i + 1] - self.at_km[i]
        t = 0.0 if span <= 0 else (km - self.at_km[i]) / span
        (lat1, lon1), (lat2, lon2) = self.points[i], self.points[i + 1]
        return (lat1 + (lat2 - lat1) * t, lon1 + (lon2 - lon1) * t)

    def heading(self, km: float, direction: int) -> float:
        i = self._segment(min(max(km, 0.0), self.length_km))
        a, b = self.points[i], self.points[i + 1]
        return bearing_deg(a, b) if direction > 0 else bearing_deg(b, a)

    def to_nearest_town_km(self, km: float) -> float:
        return min(abs(km - town) for town in self.towns_km)

    def towns_passed(self, start_km: float, end_km: float) -> bool:
        """Whether a town lies strictly between two places (either way round)."""
        low, high = sorted((start_km, end_km))
        return any(low < town < high for town in self.towns_km[1:-1])


# ---------------------------------------------------------------- the buses


@dataclass(frozen=True)
class Fix:
    """One GPS report."""

    lat: float
    lon: float
    speed_kmh: float
    heading: float
    at: float  # epoch seconds


@dataclass
class Bus:
    bus_id: str
    road: Road
    km: float
    direction: int  # +1 towards the route's destination, -1 back to its origin
    pace: float
    speed_kmh: float
    mood: float = 0.0
    dwell_s: float = 0.0
    fix: Fix | None = None

    @property
    def route_id(self) -> str:
        return self.road.route.id

    def report(self, now: float) -> Fix:
        lat, lon = self.road.position(self.km)
        return Fix(
            lat=lat,
            lon=lon,
            speed_kmh=self.speed_kmh,
            heading=self.road.heading(self.km, self.direction),
            at=now,
        )


@dataclass
class Fleet:
    """The simulation: pure state, advanced by `advance(seconds, now)`."""

    buses: dict[str, Bus]
    rng: random.Random
    stale: set[str] = field(default_factory=set)

    @classmethod
    def start(cls, seed: int, now: float, routes: Iterable[Route] = ROUTES) -> Fleet:
        rng = random.Random(seed)  # noqa: S311 - a simulation, not a secret
        buses: dict[str, Bus] = {}
        number = FIRST_BUS_NUMBER
        for route in routes:
            road = Road(route)
            for _ in range(BUSES_PER_ROUTE[route.kind]):
                bus_id = f"KBX-{number}"
                number += 1
                pace = rng.uniform(0.9, 1.1)
                km = rng.uniform(0.0, road.length_km)
                bus = Bus(
                    bus_id=bus_id,
                    road=road,
                    km=km,
                    direction=rng.choice((1, -1)),
                    pace=pace,
                    speed_kmh=_target_speed(road, km, pace, 0.0),
                )
                bus.fix = bus.report(now)
                buses[bus_id] = bus
        return cls(buses=buses, rng=rng)

    def advance(self, seconds: float, now: float) -> None:
        """Drive every bus `seconds` of simulated time, then take each bus's GPS fix
        (except the stale ones', which keep their last)."""
        remaining = max(0.0, seconds)
        while remaining > 0:
            step = min(STEP_S, remaining)
            remaining -= step
            for bus in self.buses.values():
                self._drive(bus, step)
        for bus in self.buses.values():
            if bus.bus_id not in self.stale:
                bus.fix = bus.report(now)

    def _drive(self, bus: Bus, dt: float) -> None:
        rng = self.rng
        road = bus.road
        # The mood: an Ornstein-Uhlenbeck process around 0 (traffic, hills, the driver).
        decay = math.exp(-dt / MOOD_TAU_S)
        bus.mood = bus.mood * decay + MOOD_SD * math.sqrt(1 - decay * decay) * rng.gauss(0, 1)
        if bus.dwell_s > 0:
            bus.dwell_s -= dt
            bus.speed_kmh = 0.0
            return
        target = _target_speed(road, bus.km, bus.pace, bus.mood)
        bus.speed_kmh += (target - bus.speed_kmh) * min(1.0, dt / ACCELERATION_TAU_S)
        bus.speed_kmh = min(max(bus.speed_kmh, 0.0), road.route.speed_kmh * MAX_SPEED_FACTOR)
        start = bus.km
        bus.km += bus.direction * bus.speed_kmh * dt / 3600.0
        if bus.km >= road.length_km or bus.km <= 0.0:
            bus.km = min(max(bus.km, 0.0), road.length_km)
            bus.direction = -bus.direction
            bus.speed_kmh = 0.0
            bus.dwell_s = rng.uniform(*TERMINUS_DWELL_S[road.route.kind])
        elif road.route.kind == "city" and road.towns_passed(start, bus.km):
            bus.speed_kmh = 0.0
            bus.dwell_s = rng.uniform(*CITY_STOP_S)

    def active(self, now: float) -> int:
        return sum(
            1
            for bus in self.buses.values()
            if bus.fix is not None and now - bus.fix.at <= ACTIVE_FIX_WINDOW_S
        )

    def describe(self, bus: Bus, now: float) -> dict[str, Any]:
        """A bus as its last GPS fix shows it."""
        fix = bus.fix or bus.report(now)
        route = bus.road.route
        return {
            "bus_id": bus.bus_id,
            "route_id": route.id,
            "towards": route.destination if bus.direction > 0 else route.origin,
            "lat": round(fix.lat, 6),
            "lon": round(fix.lon, 6),
            "speed_kmh": round(fix.speed_kmh, 1),
            "heading": round(fix.heading, 1),
            "last_fix_at": iso(fix.at),
            "staleness_s": round(max(0.0, now - fix.at), 3),
        }


def _target_speed(road: Road, km: float, pace: float, mood: float) -> float:
    """A city route's speed is already a town speed; on the open road, towns are slow
    (traffic, matatus, speed bumps)."""
    base = road.route.speed_kmh * pace * (1.0 + mood)
    if road.route.kind == "intercity" and road.to_nearest_town_km(km) < TOWN_RADIUS_KM:
        base *= TOWN_FACTOR
    return max(base, 0.0)


def iso(epoch_s: float) -> str:
    stamp = datetime.fromtimestamp(epoch_s, UTC).isoformat(timespec="milliseconds")
    return stamp.replace("+00:00", "Z")


def publish(fleet: Fleet, now: float) -> None:
    """Set the gauges from each bus's last fix."""
    for bus in fleet.buses.values():
        if bus.fix is None:
            continue
        labels = {"bus": bus.bus_id, "route": bus.route_id}
        bus_latitude.labels(**labels).set(bus.fix.lat)
        bus_longitude.labels(**labels).set(bus.fix.lon)
        bus_speed_kmh.labels(**labels).set(bus.fix.speed_kmh)
        bus_gps_staleness_seconds.labels(**labels).set(max(0.0, now - bus.fix.at))
    active_buses_count.set(fleet.active(now))


# ---------------------------------------------------------------- settings and the clock


@dataclass(frozen=True)
class Settings:
    time_scale: float
    tick_s: float
    seed: int

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        return cls(
            time_scale=kit.env_number(
                environ,
                "BUSLINE_FLEET_TIME_SCALE",
                DEFAULT_TIME_SCALE,
                low=0.0,
                high=3600.0,
                unit="a factor",
            ),
            tick_s=kit.env_number(
                environ,
                "BUSLINE_FLEET_TICK_S",
                DEFAULT_TICK_S,
                low=0.05,
                high=MAX_TICK_S,
                unit="seconds",
            ),
            seed=int(
                kit.env_number(
                    environ, "BUSLINE_SEED", DEFAULT_SEED, low=0, high=2**53, unit="an integer"
                )
            ),
        )


async def run_clock(fleet: Fleet, settings: Settings) -> None:
    """Advance the fleet every tick by the real time elapsed, scaled; runs until
    cancelled. A failing tick is reported and the next one tried."""
    from busline import fault_agent

    agent = fault_agent.agent()
    frozen: set[str] = set()  # buses whose GPS feed a fault stopped
    last = time.monotonic()
    while True:
        await asyncio.sleep(settings.tick_s)
        mono = time.monotonic()
        try:
            now = time.time()
            feed_down = agent.stale_buses(fleet.buses)
            if feed_down != frozen:
                fleet.stale = (fleet.stale - frozen) | feed_down
                frozen = feed_down
            fleet.advance((mono - last) * settings.time_scale, now)
            publish(fleet, now)
        except Exception as exc:
            log.exception("fleet_tick_failed")
            lookout.sdk.capture_exception(exc)
        last = mono


# ---------------------------------------------------------------- HTTP


def _fleet(request: Request) -> Fleet:
    fleet: Fleet = request.app.state.fleet
    return fleet


async def list_buses(request: Request) -> Response:
    route_id = kit.query_text(request, "route", required=False)
    known = {route.id for route in ROUTES}
    if route_id and route_id not in known:
        raise kit.Invalid("route", f"unknown route; one of {', '.join(sorted(known))}")
    fleet, now = _fleet(request), time.time()
    buses = [
        fleet.describe(bus, now)
        for bus in fleet.buses.values()
        if not route_id or bus.route_id == route_id
    ]
    return JSONResponse({"buses": buses, "active": fleet.active(now)})


async def one_bus(request: Request) -> Response:
    bus_id = str(request.path_params["bus_id"])
    bus = _fleet(request).buses.get(bus_id)
    if bus is None:
        return kit.error(404, "unknown_bus", f"no bus {bus_id[:20]!r}", field="bus_id")
    return JSONResponse(_fleet(request).describe(bus, time.time()))


async def list_routes(_: Request) -> Response:
    return JSONResponse(
        {
            "routes": [
                {
                    "route_id": route.id,
                    "origin": route.origin,
                    "destination": route.destination,
                    "kind": route.kind,
                    "speed_kmh": route.speed_kmh,
                    "distance_km": round(route.distance_km, 1),
                    "polyline": [list(point) for point in route.polyline],
                }
                for route in ROUTES
            ]
        }
    )


def create_app(environ: Mapping[str, str] | None = None) -> Starlette:
    """fleet's app; the fleet starts, and its clock runs, from lifespan startup."""
    settings = Settings.from_env(os.environ if environ is None else environ)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        now = time.time()
        fleet = Fleet.start(settings.seed, now)
        publish(fleet, now)
        app.state.fleet = fleet
        log.info(
            "fleet_started",
            buses=len(fleet.buses),
            seed=settings.seed,
            time_scale=settings.time_scale,
            tick_s=settings.tick_s,
        )
        clock = asyncio.create_task(run_clock(fleet, settings), name="fleet-clock")
        try:
            yield
        finally:
            clock.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await clock

    app = Starlette(
        routes=[
            HttpRoute("/healthz", kit.healthz(NAME), methods=["GET"]),
            HttpRoute("/fleet/buses", list_buses, methods=["GET"]),
            HttpRoute("/fleet/buses/{bus_id}", one_bus, methods=["GET"]),
            HttpRoute("/fleet/routes", list_routes, methods=["GET"]),
        ],
        lifespan=lifespan,
    )
    kit.handles_invalid(app)
    return app


def main() -> None:
    app = create_app()
    kit.serve(NAME, kit.instrument(NAME, app))
