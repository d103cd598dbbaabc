"""fleet: buses moving along their routes in simulated time, their GPS feed and its
metrics; the service as a real process, the simulation driven directly."""

from __future__ import annotations

import re
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from busline.fleet import ACTIVE_FIX_WINDOW_S, Fleet, Road, Settings
from busline.routes import BY_ID, ROUTES
from tests.busline.conftest import Platform, Proc
from tests.support import wait_until

BUS_ID = re.compile(r"^KBX-\d{3}$")
FIELDS = {
    "bus_id",
    "route_id",
    "towards",
    "lat",
    "lon",
    "speed_kmh",
    "heading",
    "last_fix_at",
    "staleness_s",
}
PER_BUS = ("bus_latitude", "bus_longitude", "bus_speed_kmh", "bus_gps_staleness_seconds")


def buses(url: str, **params: str) -> list[dict[str, Any]]:
    answer = httpx.get(f"{url}/fleet/buses", params=params, timeout=5)
    assert answer.status_code == 200
    found: list[dict[str, Any]] = answer.json()["buses"]
    return found


def position(bus: dict[str, Any]) -> tuple[float, float]:
    return (bus["lat"], bus["lon"])


def bounding_box(route_id: str) -> tuple[float, float, float, float]:
    points = BY_ID[route_id].polyline
    lats, lons = [p[0] for p in points], [p[1] for p in points]
    return min(lats), max(lats), min(lons), max(lons)


def on_its_route(bus: dict[str, Any], slack: float = 1e-6) -> bool:
    low_lat, high_lat, low_lon, high_lon = bounding_box(bus["route_id"])
    return (
        low_lat - slack <= bus["lat"] <= high_lat + slack
        and low_lon - slack <= bus["lon"] <= high_lon + slack
    )


def scrape(proc: Proc) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    started = [line for line in proc.json_lines() if line.get("event") == "lookout_sdk_started"]
    assert started, "no lookout_sdk_started line"
    text = httpx.get(started[0]["metrics_url"], timeout=5).text
    families: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = tuple(sorted(sample.labels.items()))
            families.setdefault(sample.name, {})[key] = sample.value
    return families


# ---------------------------------------------------------------- the service


def test_at_least_30_buses_cover_every_route_with_more_on_intercity_roads(
    platform: Platform,
) -> None:
    platform.start("fleet")
    url = platform.url("fleet")
    fleet = buses(url)
    assert len(fleet) >= 30
    assert all(set(bus) == FIELDS for bus in fleet)
    ids = [bus["bus_id"] for bus in fleet]
    assert len(set(ids)) == len(ids)
    assert all(BUS_ID.match(bus_id) for bus_id in ids)
    per_route = {route.id: sum(b["route_id"] == route.id for b in fleet) for route in ROUTES}
    intercity = [per_route[r.id] for r in ROUTES if r.kind == "intercity"]
    city = [per_route[r.id] for r in ROUTES if r.kind == "city"]
    assert min(city) >= 1
    assert min(intercity) > max(city)

    routes = httpx.get(f"{url}/fleet/routes", timeout=5).json()["routes"]
    assert {r["route_id"] for r in routes} == {r.id for r in ROUTES}
    for route in routes:
        if route["kind"] == "intercity":
            assert (route["route_id"], len(route["polyline"]) >= 20) == (route["route_id"], True)

    one = httpx.get(f"{url}/fleet/buses/{ids[0]}", timeout=5)
    assert (one.status_code, one.json()["bus_id"]) == (200, ids[0])
    unknown = httpx.get(f"{url}/fleet/buses/KBX-999", timeout=5)
    assert (unknown.status_code, unknown.json()["error"], unknown.json()["field"]) == (
        404,
        "unknown_bus",
        "bus_id",
    )
    by_route = buses(url, route="cbd-jkia")
    assert {b["route_id"] for b in by_route} == {"cbd-jkia"}
    bad_route = httpx.get(f"{url}/fleet/buses", params={"route": "nairobi-moon"}, timeout=5)
    assert (bad_route.status_code, bad_route.json()["field"]) == (400, "route")


def test_buses_move_between_reads_and_stay_on_their_route(platform: Platform) -> None:
    """Positions change from one read to the next (each tick is at most 5 s; 1 s by
    default), the GPS feed is fresh, and every bus stays inside its route's bounding box."""
    platform.start("fleet")
    url = platform.url("fleet")
    first = {bus["bus_id"]: bus for bus in buses(url)}

    def moved() -> list[dict[str, Any]] | None:
        now = buses(url)
        changed = [b for b in now if position(b) != position(first[b["bus_id"]])]
        return now if len(changed) >= len(now) // 2 else None

    later = wait_until(moved, 10.0, "half the buses to move")
    for snapshot in (first.values(), later):
        for bus in snapshot:
            assert (bus["bus_id"], on_its_route(bus)) == (bus["bus_id"], True)
            assert 0.0 <= bus["speed_kmh"] <= BY_ID[bus["route_id"]].speed_kmh * 1.4
            assert 0.0 <= bus["heading"] < 360.0
            assert bus["staleness_s"] < 5.0
    assert any(bus["last_fix_at"] != first[bus["bus_id"]]["last_fix_at"] for bus in later)


def test_metrics_give_each_bus_one_bounded_series(platform: Platform) -> None:
    """active_buses_count, and for each bus exactly one series of latitude, longitude,
    speed and GPS staleness, labelled with its id and route (a fixed set)."""
    proc = platform.start("fleet")
    url = platform.url("fleet")
    fleet = {bus["bus_id"]: bus for bus in buses(url)}
    expected = {(("bus", bus_id), ("route", bus["route_id"])) for bus_id, bus in fleet.items()}
    families = scrape(proc)
    assert families["active_buses_count"] == {(): float(len(fleet))}
    for name in PER_BUS:
        assert (name, set(families[name])) == (name, expected)
    for labels, latitude in families["bus_latitude"].items():
        bus = {**fleet[labels[0][1]], "lat": latitude}
        bus["lon"] = families["bus_longitude"][labels]
        assert on_its_route(bus)
        assert 0.0 <= families["bus_gps_staleness_seconds"][labels] < 5.0


def test_the_start_is_deterministic_given_the_seed(platform: Platform) -> None:
    """Frozen time (scale 0): the same seed places every bus at the same spot; another
    seed does not."""

    def places(seed: str) -> dict[str, tuple[float, float]]:
        platform.start("fleet", BUSLINE_SEED=seed, BUSLINE_FLEET_TIME_SCALE="0")
        found = {b["bus_id"]: (b["lat"], b["lon"]) for b in buses(platform.url("fleet"))}
        platform.stop("fleet")
        return found

    assert places("7") == places("7")
    assert places("7") != places("8")


# ---------------------------------------------------------------- the simulation


def test_a_stale_bus_keeps_driving_but_its_fix_ages() -> None:
    """A bus in `stale` reports nothing: its last fix stays where it was, its staleness
    grows, and after a minute it no longer counts as active; the others stay fresh."""
    start = 1_000_000.0
    fleet = Fleet.start(seed=3, now=start)
    total = len(fleet.buses)
    frozen = fleet.describe(fleet.buses["KBX-101"], start)
    fleet.stale.add("KBX-101")
    for second in range(1, 91):
        fleet.advance(60.0, start + second)
    now = start + 90
    stale = fleet.describe(fleet.buses["KBX-101"], now)
    assert (stale["lat"], stale["lon"]) == (frozen["lat"], frozen["lon"])
    assert stale["staleness_s"] == 90.0
    assert fleet.describe(fleet.buses["KBX-102"], now)["staleness_s"] == 0.0
    assert fleet.active(now) == total - 1
    assert ACTIVE_FIX_WINDOW_S == 60.0


def test_buses_turn_round_at_the_ends_and_slow_down_in_towns() -> None:
    """Over two simulated days every bus stays on its road, reaches an end and turns
    back; on intercity roads the average speed near towns is well below the open road's."""
    fleet = Fleet.start(seed=11, now=0.0)
    directions = {bus_id: {bus.direction} for bus_id, bus in fleet.buses.items()}
    near_town: list[float] = []
    open_road: list[float] = []
    for tick in range(1, 2 * 24 * 60 + 1):
        fleet.advance(60.0, float(tick))
        for bus_id, bus in fleet.buses.items():
            road = bus.road
            assert 0.0 <= bus.km <= road.length_km
            directions[bus_id].add(bus.direction)
            if road.route.kind == "intercity" and bus.dwell_s <= 0 and bus.speed_kmh > 0:
                close = road.to_nearest_town_km(bus.km) < 1.0
                (near_town if close else open_road).append(bus.speed_kmh / road.route.speed_kmh)
    assert all(seen == {1, -1} for seen in directions.values())
    assert sum(near_town) / len(near_town) < 0.75 * sum(open_road) / len(open_road)


def test_every_intercity_road_has_at_least_20_points_and_its_towns() -> None:
    for route in ROUTES:
        road = Road(route)
        if route.kind == "intercity":
            assert len(route.polyline) >= 20
        assert road.towns_km[0] == 0.0
        assert road.towns_km[-1] == road.length_km
        assert len(road.towns_km) >= 4


def test_settings_are_checked() -> None:
    assert Settings.from_env({}) == Settings(time_scale=60.0, tick_s=1.0, seed=1)
    with pytest.raises(ValueError, match="BUSLINE_FLEET_TICK_S has value '9'"):
        Settings.from_env({"BUSLINE_FLEET_TICK_S": "9"})
    with pytest.raises(ValueError, match="BUSLINE_FLEET_TIME_SCALE"):
        Settings.from_env({"BUSLINE_FLEET_TIME_SCALE": "fast"})
