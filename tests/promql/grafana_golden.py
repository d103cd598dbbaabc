"""The requests Grafana's Prometheus data source sends, each with the answer it expects.

Recorded from Grafana 10/11's Prometheus data source: the health check (buildinfo, then the
`1+1` query as a form POST), the label browser (labels, label values, series, each with the
dashboard's start and end), metadata for the query editor's hints, exemplars, and panel
queries as GET and form POST with a numeric step (`15`, as Grafana computes it from the panel
width) and a duration step (`1m`, a panel's "Min interval"). `$NOW`, `$START` and `$END`
stand for the seeded data's times (tests/promql/test_api.py); an entry's `shape` is matched
by `check_shape` below: literals must be equal, the markers stand for any value of a kind.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Each:
    """A non-empty list whose every item matches `shape`."""

    shape: Any


@dataclass(frozen=True)
class MapOf:
    """A non-empty object whose every value matches `shape`."""

    shape: Any


NUMBER = "<number>"  # a JSON number: Prometheus's timestamps
FLOAT_TEXT = "<float text>"  # a sample value as Prometheus writes it: "1.5", "NaN", "+Inf"
TEXT = "<text>"
LABELS = MapOf(TEXT)


@dataclass(frozen=True)
class Golden:
    name: str
    method: str
    path: str
    params: dict[str, str | list[str]]  # the query string of a GET, the form body of a POST
    status: int
    shape: Any
    headers: dict[str, str] = field(default_factory=dict)


FORM = {"Content-Type": "application/x-www-form-urlencoded"}
SUCCESS = "success"

GOLDEN: list[Golden] = [
    Golden("health: buildinfo probe", "GET", "/api/v1/status/buildinfo", {}, 200, {
        "status": SUCCESS,
        "data": {"version": "3.0.0", "revision": TEXT, "branch": TEXT, "buildUser": TEXT,
                 "buildDate": TEXT, "goVersion": TEXT},
    }),
    Golden("health: 1+1 as a form POST", "POST", "/api/v1/query",
           {"query": "1+1", "time": "$NOW"}, 200,
           {"status": SUCCESS, "data": {"resultType": "scalar", "result": [NUMBER, "2"]}},
           FORM),
    Golden("label browser: label names", "GET", "/api/v1/labels",
           {"start": "$START", "end": "$END"}, 200,
           {"status": SUCCESS, "data": ["__name__", "instance", "job"]}),
    Golden("label browser: metric names", "GET", "/api/v1/label/__name__/values",
           {"start": "$START", "end": "$END"}, 200,
           {"status": SUCCESS, "data": ["http_requests_total", "up"]}),
    Golden("label browser: values of a label for a metric", "GET", "/api/v1/label/instance/values",
           {"match[]": "http_requests_total", "start": "$START", "end": "$END"}, 200,
           {"status": SUCCESS, "data": ["a", "b"]}),
    Golden("label browser: series of a selector", "GET", "/api/v1/series",
           {"match[]": 'up{job="api"}', "start": "$START", "end": "$END"}, 200,
           {"status": SUCCESS, "data": [{"__name__": "up", "instance": "a", "job": "api"}]}),
    Golden("label browser: series as a form POST", "POST", "/api/v1/series",
           {"match[]": ["up", "http_requests_total"], "start": "$START", "end": "$END"}, 200,
           {"status": SUCCESS, "data": [
               {"__name__": "http_requests_total", "instance": "a", "job": "api"},
               {"__name__": "http_requests_total", "instance": "b", "job": "api"},
               {"__name__": "up", "instance": "a", "job": "api"},
           ]}, FORM),
    Golden("label browser: label names of a selector, form POST", "POST", "/api/v1/labels",
           {"match[]": "up", "start": "$START", "end": "$END"}, 200,
           {"status": SUCCESS, "data": ["__name__", "instance", "job"]}, FORM),
    Golden("query editor: metadata", "GET", "/api/v1/metadata", {}, 200, {
        "status": SUCCESS,
        "data": {"http_requests_total": [{"type": "counter", "help": "", "unit": ""}],
                 "up": [{"type": "unknown", "help": "", "unit": ""}]},
    }),
    Golden("panel: range query, numeric step, form POST", "POST", "/api/v1/query_range",
           {"query": "sum by (job) (rate(http_requests_total[1m]))", "start": "$START",
            "end": "$END", "step": "15"}, 200,
           {"status": SUCCESS, "data": {"resultType": "matrix", "result": Each(
               {"metric": {"job": "api"}, "values": Each([NUMBER, FLOAT_TEXT])})}},
           FORM),
    Golden("panel: range query, duration step, GET", "GET", "/api/v1/query_range",
           {"query": "http_requests_total", "start": "$START", "end": "$END", "step": "1m"}, 200,
           {"status": SUCCESS, "data": {"resultType": "matrix", "result": Each(
               {"metric": LABELS, "values": Each([NUMBER, FLOAT_TEXT])})}}),
    Golden("panel: instant query (table), form POST", "POST", "/api/v1/query",
           {"query": "up", "time": "$NOW"}, 200,
           {"status": SUCCESS, "data": {"resultType": "vector", "result": Each(
               {"metric": LABELS, "value": [NUMBER, FLOAT_TEXT]})}}, FORM),
    Golden("panel: exemplars", "GET", "/api/v1/query_exemplars",
           {"query": "up", "start": "$START", "end": "$END"}, 200,
           {"status": SUCCESS, "data": Each({"seriesLabels": LABELS, "exemplars": Each(
               {"labels": LABELS, "value": FLOAT_TEXT, "timestamp": NUMBER})})}),
    Golden("panel: a typo in the query", "POST", "/api/v1/query_range",
           {"query": "sum(rate(http_requests_total[1m])", "start": "$START", "end": "$END",
            "step": "15"}, 400,
           {"status": "error", "errorType": "bad_data", "error": TEXT}, FORM),
]  # fmt: skip


def check_shape(value: Any, shape: Any, where: str = "$") -> None:
    """Assert that `value` matches `shape`, naming the first place that does not."""
    if isinstance(shape, Each):
        assert isinstance(value, list), f"{where}: expected a list, {value!r}"
        assert value, f"{where}: expected a non-empty list"
        for number, item in enumerate(value):
            check_shape(item, shape.shape, f"{where}[{number}]")
    elif isinstance(shape, MapOf):
        assert isinstance(value, dict), f"{where}: expected an object, {value!r}"
        assert value, f"{where}: expected a non-empty object"
        for key, item in value.items():
            assert isinstance(key, str)
            check_shape(item, shape.shape, f"{where}.{key}")
    elif shape == NUMBER:
        assert isinstance(value, int | float), (where, value)
        assert not isinstance(value, bool), (where, value)
    elif shape == TEXT:
        assert isinstance(value, str), (where, value)
    elif shape == FLOAT_TEXT:
        assert isinstance(value, str), (where, value)
        assert value in ("NaN", "+Inf", "-Inf") or math.isfinite(float(value)), (where, value)
    elif isinstance(shape, dict):
        assert isinstance(value, dict), f"{where}: expected an object, {value!r}"
        assert set(value) == set(shape), f"{where}: keys {sorted(value)} != {sorted(shape)}"
        for key, item in shape.items():
            check_shape(value[key], item, f"{where}.{key}")
    elif isinstance(shape, list):
        assert isinstance(value, list), f"{where}: expected a list, {value!r}"
        assert len(value) == len(shape), f"{where}: {value!r} is not {shape!r}"
        for number, (item, expected) in enumerate(zip(value, shape, strict=True)):
            check_shape(item, expected, f"{where}[{number}]")
    else:
        assert value == shape, f"{where}: {value!r} != {shape!r}"
