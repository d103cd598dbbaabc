"""Prometheus scraping: config subset, relabeling, exposition goldens, and a toy target
scraped end to end through going away (stale) and coming back (up)."""

from __future__ import annotations

import asyncio
import json
import math
import os
import struct
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server

from lookout.config import load
from lookout.errors import ConfigError
from lookout.ingest.scrape import (
    STALE_NAN,
    SeriesCache,
    parse_exposition,
    parse_scrape_configs,
    relabel,
    scrape_samples,
    targets_of,
    to_samples,
)
from lookout.server.scraper import Scraper
from tests.server.conftest import InProcess
from tests.support import free_port

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "exposition"
RECORD = os.environ.get("LOOKOUT_RECORD_FIXTURES") == "1"


def _is_stale(value: float) -> bool:
    return struct.pack("<d", value) == struct.pack("<d", STALE_NAN)


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("text.prom", "text/plain; version=0.0.4"),
        ("openmetrics.txt", "application/openmetrics-text; version=1.0.0"),
    ],
)
def test_exposition_goldens(name: str, content_type: str) -> None:
    parsed = parse_exposition((FIXTURES / name).read_text(), content_type)
    expected_path = FIXTURES / f"{name}.expected.json"
    rows = [[n, labels, "NaN" if math.isnan(v) else v, e] for n, labels, v, e in parsed]
    if RECORD:
        expected_path.write_text(json.dumps(rows, indent=1) + "\n")
    assert rows == json.loads(expected_path.read_text())


def test_config_subset_parses_and_names_bad_keys() -> None:
    (config,) = parse_scrape_configs([{
        "job_name": "busline", "scrape_interval": "5s", "scrape_timeout": "10s",
        "static_configs": [{"targets": ["127.0.0.1:9000"], "labels": {"tier": "web"}}],
        "relabel_configs": [{"source_labels": ["tier"], "regex": "web", "action": "keep"}],
    }])  # fmt: skip
    assert (config.scrape_interval, config.scrape_timeout) == (5.0, 5.0), (
        "timeout capped by interval"
    )
    for bad, key in [
        ([{"job_name": "a", "scrape_intervall": "5s"}], "scrape_configs[0].scrape_intervall"),
        ([{"job_name": "a", "scrape_interval": "often"}], "scrape_configs[0].scrape_interval"),
        ([{"job_name": "a"}, {"job_name": "a"}], "scrape_configs[1].job_name"),
        (
            [{"job_name": "a", "relabel_configs": [{"action": "hashmod"}]}],
            "scrape_configs[0].relabel_configs[0].action",
        ),
    ]:
        with pytest.raises(ConfigError) as caught:
            parse_scrape_configs(bad)
        assert caught.value.key == key


def test_scrape_configs_come_from_the_server_config_file(tmp_path: Path) -> None:
    path = tmp_path / "lookout.yaml"
    path.write_text(
        "scrape_configs:\n  - job_name: api\n    static_configs:\n      - targets: ['a:1']\n"
    )
    assert [c.job_name for c in load(path, {}, {}).scrape_configs] == ["api"]


def test_relabel_actions() -> None:
    base = {"__address__": "10.0.0.1:9100", "job": "node", "__meta_env": "prod"}
    rules = parse_scrape_configs([{"job_name": "x", "relabel_configs": [
        {"source_labels": ["__address__"], "regex": "([^:]+):.*", "target_label": "host", "replacement": "$1"},
        {"regex": "__meta_(.+)", "action": "labelmap"},
        {"source_labels": ["env"], "regex": "dev", "action": "drop"},
    ]}])[0].relabel  # fmt: skip
    assert relabel(base, rules) == {**base, "host": "10.0.0.1", "env": "prod"}
    assert relabel({**base, "__meta_env": "dev"}, rules) is None


def test_file_sd_targets_and_dropped_ones(tmp_path: Path) -> None:
    sd = tmp_path / "sd.json"
    sd.write_text(json.dumps([{"targets": ["a:1", "b:2"], "labels": {"team": "pay"}}]))
    (config,) = parse_scrape_configs([{"job_name": "j", "file_sd_configs": [{"files": [str(sd)]}],
        "relabel_configs": [{"source_labels": ["__address__"], "regex": "b:2", "action": "drop"}]}])  # fmt: skip
    active, dropped = targets_of(config)
    assert [t.labels for t in active] == [{"job": "j", "team": "pay", "instance": "a:1"}]
    assert active[0].url == "http://a:1/metrics"
    assert dropped[0]["__address__"] == "b:2"


def _toy_target(registry: CollectorRegistry, port: int) -> Any:
    server, _ = start_http_server(port, addr="127.0.0.1", registry=registry)
    return server


def _series(served: InProcess, selector: str) -> list[dict[str, Any]]:
    return list(
        served.client.get("/api/lookout/series", params={"match": selector}).json()["series"]
    )


def test_a_toy_target_end_to_end_through_going_away_and_coming_back(served: InProcess) -> None:
    registry = CollectorRegistry()
    sold = Counter("tickets_sold", "Tickets.", ["route"], registry=registry)
    latency = Histogram("pay_seconds", "Pay.", registry=registry, buckets=(0.1, 1))
    sold.labels(route="nbo-mba").inc(3)
    latency.observe(0.05, {"trace_id": "ab" * 16})
    port = free_port()
    target = _toy_target(registry, port)
    (config,) = parse_scrape_configs([{"job_name": "toy", "scrape_interval": "1s",
                                       "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}])  # fmt: skip
    scraper = Scraper(served.runtime, (config,))
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scraper.refresh())
        for task in scraper._tasks.values():
            task.cancel()  # this test drives the scrapes itself, one by one
        (tgt,) = scraper.targets.values()
        loop.run_until_complete(scraper.scrape_once(tgt))
        (sold_series,) = _series(served, 'tickets_sold_total{job="toy"}')
        assert sold_series["labels"]["instance"] == f"127.0.0.1:{port}"
        assert sold_series["samples"][-1]["value"] == 3.0
        bucket = _series(served, 'pay_seconds_bucket{le="0.1"}')[0]
        assert bucket["samples"][-1]["exemplar"]["trace_id"] == "ab" * 16, (
            "exemplars are kept (OpenMetrics)"
        )
        for name, value in (
            ("up", 1.0),
            ("scrape_samples_scraped", None),
            ("scrape_series_added", None),
        ):
            (series,) = _series(served, f'{name}{{job="toy"}}')
            if value is not None:
                assert series["samples"][-1]["value"] == value
        assert _series(served, 'scrape_series_added{job="toy"}')[0]["samples"][-1]["value"] > 0
        view = scraper.targets_view()["data"]["activeTargets"][0]
        assert (view["health"], view["scrapePool"], view["lastError"]) == ("up", "toy", "")

        target.shutdown()
        target.server_close()
        loop.run_until_complete(scraper.scrape_once(tgt))
        assert _series(served, 'up{job="toy"}')[0]["samples"][-1]["value"] == 0.0
        stale = _series(served, 'tickets_sold_total{job="toy"}')[0]["samples"][-1]["value"]
        assert stale == "NaN", "a series of a target that went away is marked stale"
        assert scraper.targets_view()["data"]["activeTargets"][0]["health"] == "down"
        assert scraper.targets_view()["data"]["activeTargets"][0]["lastError"]

        target = _toy_target(registry, port)
        loop.run_until_complete(scraper.scrape_once(tgt))
        assert _series(served, 'up{job="toy"}')[0]["samples"][-1]["value"] == 1.0
        assert _series(served, 'tickets_sold_total{job="toy"}')[0]["samples"][-1]["value"] == 3.0
    finally:
        target.shutdown()
        target.server_close()
        loop.run_until_complete(scraper.client.aclose())
        loop.close()


def test_the_staleness_marker_is_prometheus_bit_pattern(served: InProcess) -> None:
    cursor = served.runtime.database.cursor()
    value = cursor.execute("SELECT ?::DOUBLE", [STALE_NAN]).fetchone()
    assert value is not None
    assert _is_stale(value[0])


def test_targets_registered_over_http_become_a_job(served: InProcess) -> None:
    response = served.client.post(
        "/api/targets",
        json={"job": "ticketing", "targets": ["127.0.0.1:9464"], "labels": {"env": "dev"}},
    )
    assert response.status_code == 201
    scraper = Scraper(served.runtime, ())
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scraper.refresh())
        (target,) = scraper.targets.values()
        assert target.labels == {"job": "ticketing", "env": "dev", "instance": "127.0.0.1:9464"}
        for task in scraper._tasks.values():
            task.cancel()
        loop.run_until_complete(scraper.client.aclose())
    finally:
        loop.close()
    bad = served.client.post("/api/targets", json={"job": "../x", "targets": ["a:1"]})
    assert bad.status_code == 400


def test_targets_endpoint_has_prometheus_shape_without_a_scraper(served: InProcess) -> None:
    assert served.client.get("/api/v1/targets").json() == {
        "status": "success",
        "data": {"activeTargets": [], "droppedTargets": []},
    }


@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("text.prom", "text/plain; version=0.0.4"),
        ("openmetrics.txt", "application/openmetrics-text; version=1.0.0"),
    ],
)
def test_the_fast_parser_agrees_with_prometheus_client(name: str, content_type: str) -> None:
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
    from prometheus_client.parser import text_string_to_metric_families as prom

    from lookout.ingest.scrape import _parse_simple

    text = (FIXTURES / name).read_text()
    library = [
        (s.name, dict(s.labels), s.value, None if getattr(s, "exemplar", None) is None
         else {**s.exemplar.labels, "value": s.exemplar.value})
        for family in (om if "openmetrics" in content_type else prom)(text)
        for s in family.samples
    ]  # fmt: skip
    fast = _parse_simple(text)

    def comparable(rows: Any) -> list[Any]:
        return [(n, labels, "NaN" if math.isnan(v) else v, e) for n, labels, v, e in rows]

    assert comparable(fast) == comparable(library)


def test_unusual_text_falls_back_to_the_library_parser() -> None:
    text = 'm{path="/a}b"} 1\n'  # a `}` inside a label value: not the fast shape
    assert parse_exposition(text, "text/plain") == [("m", {"path": "/a}b"}, 1.0, None)]
    with pytest.raises(ValueError, match=r"\S"):
        parse_exposition("not an exposition at all {\n", "text/plain")


@pytest.mark.parametrize("honor_labels", [False, True])
@pytest.mark.parametrize(
    ("name", "content_type"),
    [
        ("text.prom", "text/plain; version=0.0.4"),
        ("openmetrics.txt", "application/openmetrics-text; version=1.0.0"),
        ("unusual", "text/plain"),  # the library parser's path
    ],
)
def test_a_scrape_through_the_series_cache_is_the_plain_parse(
    name: str, content_type: str, honor_labels: bool
) -> None:
    text = (
        'm{path="/a}b",job="theirs"} 1\nm{job="x"} 2\n'
        if name == "unusual"
        else (FIXTURES / name).read_text()
    )
    (config,) = parse_scrape_configs([{
        "job_name": "cached", "honor_labels": honor_labels,
        "static_configs": [{"targets": ["127.0.0.1:1"], "labels": {"instance": "theirs"}}],
    }])  # fmt: skip
    (target,), _ = targets_of(config)
    plain = to_samples(parse_exposition(text, content_type), target, 7)
    keys = {(s.name, tuple(sorted(s.labels.items()))) for s in plain}
    cache = SeriesCache(most=3)  # small: it fills and starts again on the way
    for _ in range(3):  # a cold cache, then warm ones
        samples, seen = scrape_samples(text, content_type, target, 7, cache)
        assert (repr(samples), seen) == (repr(plain), keys)  # repr: NaN equals NaN
    assert len(cache.entries) <= 3


def test_a_series_that_disappears_and_a_removed_target_are_marked_stale(
    served: InProcess, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    kept = Counter("kept", "Stays.", registry=registry)
    gone = Counter("gone", "Goes away.", registry=registry)
    kept.inc()
    gone.inc()
    port = free_port()
    target = _toy_target(registry, port)
    sd = tmp_path / "sd.json"
    sd.write_text(json.dumps([{"targets": [f"127.0.0.1:{port}"]}]))
    (config,) = parse_scrape_configs(
        [{"job_name": "toy", "file_sd_configs": [{"files": [str(sd)]}]}]
    )
    scraper = Scraper(served.runtime, (config,))
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(scraper.refresh())
        for task in scraper._tasks.values():
            task.cancel()
        (tgt,) = scraper.targets.values()
        loop.run_until_complete(scraper.scrape_once(tgt))
        registry.unregister(gone)
        loop.run_until_complete(scraper.scrape_once(tgt))
        assert _series(served, 'gone_total{job="toy"}')[0]["samples"][-1]["value"] == "NaN"
        assert _series(served, 'kept_total{job="toy"}')[0]["samples"][-1]["value"] == 1.0
        sd.write_text("[]")  # the target is removed from discovery
        loop.run_until_complete(scraper.refresh())
        assert scraper.targets == {}
        assert _series(served, 'kept_total{job="toy"}')[0]["samples"][-1]["value"] == "NaN"
        assert _series(served, 'up{job="toy"}')[0]["samples"][-1]["value"] == "NaN"
    finally:
        target.shutdown()
        target.server_close()
        loop.run_until_complete(scraper.client.aclose())
        loop.close()
