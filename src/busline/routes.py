"""The network: Kenyan intercity routes and Nairobi city routes, with the towns each road
passes through. A route's polyline follows those towns, densified to at least 20 points
for an intercity road, so a bus moving along it draws the road on a map.

Coordinates are the towns' own (WGS 84, decimal degrees). Fares are in KES.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

Point = tuple[float, float]  # (latitude, longitude)

# (route id, origin, destination, kind, ((town, lat, lon) ...), seats per bus, km/h on the road)
_Town = tuple[str, float, float]
_NETWORK: tuple[tuple[str, str, str, str, tuple[_Town, ...], int, float], ...] = (
    (
        "nairobi-mombasa", "Nairobi", "Mombasa", "intercity",
        (
            ("Nairobi", -1.2864, 36.8172), ("Athi River", -1.4561, 36.9783),
            ("Sultan Hamud", -2.0192, 37.3766), ("Emali", -2.0833, 37.4667),
            ("Kibwezi", -2.4167, 37.9667), ("Mtito Andei", -2.6900, 38.1667),
            ("Voi", -3.3961, 38.5561), ("Mackinnon Road", -3.7300, 39.0300),
            ("Mariakani", -3.8667, 39.4667), ("Mombasa", -4.0435, 39.6682),
        ),
        44, 75.0,
    ),
    (
        "nairobi-nakuru", "Nairobi", "Nakuru", "intercity",
        (
            ("Nairobi", -1.2864, 36.8172), ("Kikuyu", -1.2463, 36.6629),
            ("Limuru", -1.1136, 36.6422), ("Naivasha", -0.7167, 36.4333),
            ("Gilgil", -0.4989, 36.3197), ("Nakuru", -0.3031, 36.0800),
        ),
        44, 65.0,
    ),
    (
        "nairobi-kisumu", "Nairobi", "Kisumu", "intercity",
        (
            ("Nairobi", -1.2864, 36.8172), ("Limuru", -1.1136, 36.6422),
            ("Naivasha", -0.7167, 36.4333), ("Nakuru", -0.3031, 36.0800),
            ("Londiani", -0.1667, 35.6000), ("Kericho", -0.3689, 35.2863),
            ("Ahero", -0.1744, 34.9197), ("Kisumu", -0.0917, 34.7680),
        ),
        44, 70.0,
    ),
    (
        "nairobi-eldoret", "Nairobi", "Eldoret", "intercity",
        (
            ("Nairobi", -1.2864, 36.8172), ("Limuru", -1.1136, 36.6422),
            ("Naivasha", -0.7167, 36.4333), ("Nakuru", -0.3031, 36.0800),
            ("Salgaa", -0.2167, 35.8167), ("Timboroa", 0.0667, 35.5333),
            ("Burnt Forest", 0.2267, 35.4311), ("Eldoret", 0.5143, 35.2698),
        ),
        44, 70.0,
    ),
    (
        "nairobi-nyeri", "Nairobi", "Nyeri", "intercity",
        (
            ("Nairobi", -1.2864, 36.8172), ("Ruiru", -1.1460, 36.9609),
            ("Thika", -1.0333, 37.0693), ("Sagana", -0.6667, 37.2000),
            ("Karatina", -0.4833, 37.1333), ("Nyeri", -0.4167, 36.9500),
        ),
        44, 65.0,
    ),
    (
        "mombasa-malindi", "Mombasa", "Malindi", "intercity",
        (
            ("Mombasa", -4.0435, 39.6682), ("Mtwapa", -3.9500, 39.7500),
            ("Kilifi", -3.6305, 39.8499), ("Gede", -3.3097, 40.0178),
            ("Malindi", -3.2192, 40.1169),
        ),
        44, 60.0,
    ),
    (
        "nairobi-kitale", "Nairobi", "Kitale", "intercity",
        (
            ("Nairobi", -1.2864, 36.8172), ("Naivasha", -0.7167, 36.4333),
            ("Nakuru", -0.3031, 36.0800), ("Eldoret", 0.5143, 35.2698),
            ("Moi's Bridge", 0.8833, 35.1167), ("Kitale", 1.0157, 35.0062),
        ),
        44, 70.0,
    ),
    (
        "cbd-jkia", "Nairobi CBD", "JKIA", "city",
        (
            ("Kencom", -1.2856, 36.8250), ("Nyayo Stadium", -1.3050, 36.8250),
            ("Capital Centre", -1.3180, 36.8500), ("Cabanas", -1.3300, 36.8900),
            ("JKIA", -1.3192, 36.9278),
        ),
        33, 25.0,
    ),
    (
        "cbd-rongai", "Nairobi CBD", "Rongai", "city",
        (
            ("Railways", -1.2900, 36.8280), ("Nyayo Stadium", -1.3050, 36.8250),
            ("Langata", -1.3350, 36.7800), ("Galleria", -1.3600, 36.7640),
            ("Rongai", -1.3963, 36.7596),
        ),
        33, 22.0,
    ),
    (
        "cbd-kasarani", "Nairobi CBD", "Kasarani", "city",
        (
            ("Odeon", -1.2820, 36.8240), ("Pangani", -1.2660, 36.8380),
            ("Muthaiga", -1.2500, 36.8600), ("Roysambu", -1.2180, 36.8860),
            ("Kasarani", -1.2220, 36.9000),
        ),
        33, 22.0,
    ),
)  # fmt: skip

MIN_POLYLINE_POINTS = {"intercity": 20, "city": 8}


def distance_km(a: Point, b: Point) -> float:
    """Great-circle distance (haversine, Earth radius 6,371 km)."""
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = (
        math.sin((lat2 - lat1) / 2) ** 2
        + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    )
    return 2 * 6371.0 * math.asin(math.sqrt(h))


def densify(points: list[Point], at_least: int) -> list[Point]:
    """`points` with points added along each leg, in proportion to its length, until
    there are at least `at_least`; the towns themselves stay on the line."""
    legs = [distance_km(a, b) for a, b in pairwise(points)]
    total = sum(legs) or 1.0
    extra = max(0, at_least - len(points))
    out: list[Point] = [points[0]]
    for (a, b), leg in zip(pairwise(points), legs, strict=True):
        pieces = 1 + math.ceil(extra * leg / total)
        for i in range(1, pieces + 1):
            t = i / pieces
            out.append((round(a[0] + (b[0] - a[0]) * t, 5), round(a[1] + (b[1] - a[1]) * t, 5)))
    return out


@dataclass(frozen=True)
class Route:
    id: str
    origin: str
    destination: str
    kind: Literal["intercity", "city"]
    towns: tuple[str, ...]
    stops: tuple[Point, ...]  # where each town is, in the order of `towns`; on the polyline
    polyline: tuple[Point, ...]
    seats: int
    speed_kmh: float

    @property
    def distance_km(self) -> float:
        return sum(distance_km(a, b) for a, b in pairwise(self.polyline))

    @property
    def duration_min(self) -> int:
        return max(10, round(self.distance_km / self.speed_kmh * 60))

    @property
    def fare_kes(self) -> int:
        """About KES 3 a km on the road, KES 100 a ride in town; in steps of 50."""
        if self.kind == "city":
            return 100
        return max(200, round(self.distance_km * 3.0 / 50) * 50)


def _build() -> tuple[Route, ...]:
    routes = []
    for rid, origin, destination, kind, towns, seats, speed in _NETWORK:
        points = [(lat, lon) for _, lat, lon in towns]
        assert kind in ("intercity", "city")
        routes.append(
            Route(
                id=rid,
                origin=origin,
                destination=destination,
                kind=kind,  # type: ignore[arg-type]
                towns=tuple(name for name, _, _ in towns),
                stops=tuple(points),
                polyline=tuple(densify(points, MIN_POLYLINE_POINTS[kind])),
                seats=seats,
                speed_kmh=speed,
            )
        )
    return tuple(routes)


ROUTES: tuple[Route, ...] = _build()
BY_ID: dict[str, Route] = {route.id: route for route in ROUTES}


def find(origin: str, destination: str) -> list[Route]:
    """Routes from `origin` to `destination` (case-insensitive; either direction is served
    by the same road, so a reversed search finds the route reversed)."""
    o, d = origin.strip().lower(), destination.strip().lower()
    return [r for r in ROUTES if (r.origin.lower(), r.destination.lower()) in ((o, d), (d, o))]
