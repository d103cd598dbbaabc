"""Hostile and odd inputs found in review: each gets a 4xx or is stored, never a 500,
a hang, unbounded memory, or a dead writer."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path

import pytest

from lookout.ingest.metrics import metric_name
from lookout.model import Batch, Span, SpanColumns
from lookout.selfmetrics import ServerMetrics
from lookout.store import Database, Writer
from tests.server.conftest import DSN_KEY, InProcess

AUTH = {"x-sentry-auth": f"Sentry sentry_key={DSN_KEY}"}


def _envelope(item_type: str, payload: object) -> bytes:
    body = json.dumps(payload).encode()
    return b"\n".join([b"{}", json.dumps({"type": item_type, "length": len(body)}).encode(), body])


def test_a_body_over_the_limit_is_refused_before_it_is_read_whole(served: InProcess) -> None:
    served.runtime.limits = dataclasses.replace(served.runtime.limits, max_body_bytes=1000)
    response = served.client.post(
        "/v1/traces", content=b"x" * 5000, headers={"content-type": "application/x-protobuf"}
    )
    assert response.status_code == 413


def test_nan_and_infinity_in_stored_data_render_as_strings(served: InProcess) -> None:
    now = str(time.time_ns())
    request = {"resourceMetrics": [{"scopeMetrics": [{"metrics": [{
        "name": "odd", "gauge": {"dataPoints": [{"timeUnixNano": now, "asDouble": "NaN"}]}}]}]}]}  # fmt: skip
    served.client.post(
        "/v1/metrics", content=json.dumps(request), headers={"content-type": "application/json"}
    )
    response = served.client.get("/api/lookout/series", params={"match": "odd"})
    assert response.status_code == 200
    assert response.json()["series"][0]["samples"][0]["value"] == "NaN"
    run = {"check_in_id": "c", "monitor_slug": "m", "status": "ok", "duration": math.inf}
    served.client.post(
        "/api/1/envelope/",
        content=_envelope("check_in", run),
        headers=AUTH,
    )
    assert served.client.get("/api/lookout/job-runs").status_code == 200


@pytest.mark.parametrize(
    "event",
    [
        {"contexts": [1]},
        {"contexts": {"trace": "x"}},
        {"logentry": "x"},
        {"exception": 5},
        {"exception": {"values": [{"type": "E", "stacktrace": [1]}]}},
        {"exception": {"values": [{"type": "E", "stacktrace": {"frames": 3}}]}},
        {"timestamp": "9999-12-31T00:00:00Z"},
        {"timestamp": 1e300},
        {"tags": 5},
        {"user": [1, 2]},
    ],
)
def test_odd_sentry_event_shapes_are_stored_or_refused_with_4xx(
    served: InProcess, event: dict[str, object]
) -> None:
    response = served.client.post(
        "/api/1/envelope/", content=_envelope("event", event), headers=AUTH
    )
    assert response.status_code in (200, 400), response.text


def test_an_out_of_range_sentry_timestamp_is_clamped_to_now(served: InProcess) -> None:
    event = {"event_id": "ab" * 16, "timestamp": "0001-01-01T00:00:00Z", "message": "clock"}
    assert (
        served.client.post(
            "/api/1/envelope/", content=_envelope("event", event), headers=AUTH
        ).status_code
        == 200
    )
    issues = served.client.get("/api/lookout/issues").json()["issues"]
    assert [i["title"] for i in issues] == ["clock"]


def test_deeply_nested_json_is_a_400(served: InProcess) -> None:
    deep = "[" * 100_000 + "]" * 100_000
    for path, headers in (
        ("/v1/traces", {"content-type": "application/json"}),
        ("/api/1/store/", AUTH),
    ):
        response = served.client.post(path, content=deep, headers=headers)
        assert response.status_code == 400, path


@pytest.mark.parametrize(
    "query",
    ["start=inf", "end=1e300", "min_duration_ms=nan", "start=-inf"],
)
def test_non_finite_query_numbers_are_400(served: InProcess, query: str) -> None:
    assert served.client.get(f"/api/lookout/traces?{query}").status_code == 400


def test_selector_values_keep_non_ascii_text(served: InProcess) -> None:
    from lookout.model import Sample

    served.runtime.writer.submit(
        Batch(samples=[Sample("m", {"job": "café"}, time.time_ns() // 10**6, 1.0)])
    ).result(10)
    found = served.client.get("/api/lookout/series", params={"match": 'm{job="café"}'}).json()[
        "series"
    ]
    assert [s["labels"]["job"] for s in found] == ["café"]


def test_a_cancelled_request_does_not_kill_the_writer(tmp_path: Path) -> None:
    database = Database(tmp_path)
    writer = Writer(database, ServerMetrics())
    writer.start()
    with database.lock:  # hold the writer back so the caller gives up first
        future = writer.submit(
            Batch(
                spans=SpanColumns.of(
                    [
                        Span(
                            "a" * 32,
                            "b" * 16,
                            "",
                            "s",
                            "n",
                            "server",
                            time.time_ns(),
                            time.time_ns(),
                        )
                    ]
                )
            )
        )
        future.cancel()
    later = writer.submit(
        Batch(
            spans=SpanColumns.of(
                [Span("c" * 32, "d" * 16, "", "s", "n", "server", time.time_ns(), time.time_ns())]
            )
        )
    )
    assert later.result(10) == 1
    assert writer.alive
    writer.stop()
    database.close()


def test_a_store_opened_by_another_spelling_of_its_path_keeps_its_parquet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    database = Database(Path("data"))
    writer = Writer(database, ServerMetrics())
    writer.start()
    old = time.time_ns() - 3 * 86400 * 10**9
    writer.submit(
        Batch(spans=SpanColumns.of([Span("e" * 32, "f" * 16, "", "s", "n", "server", old, old)]))
    ).result(10)
    assert writer.close_days_before("99991231").result(10) == 1
    writer.stop()
    database.close()
    reopened = Database((tmp_path / "data").resolve())
    assert reopened.connection.execute("SELECT count(*) FROM spans").fetchone() == (1,)
    reopened.close()


def test_metric_name_rules_from_review() -> None:
    assert metric_name("errors", "1", counter=True, gauge=False) == "errors_total"
    assert metric_name("requests_total", "s", counter=True, gauge=False) == "requests_seconds_total"
    assert metric_name("power", "W/Cel", counter=False, gauge=True) == "power_watts_per_celsius"
    assert metric_name("speed", "m/s", counter=False, gauge=True) == "speed_meters_per_second"
