"""Ingest limits: configurable, each rejection counted by reason, and decompression
bombs refused fast with bounded memory by a real server."""

from __future__ import annotations

import dataclasses
import json
import threading
import time
import zlib
from pathlib import Path

import httpx
import pytest

from lookout.errors import ConfigError
from lookout.ingest.limits import Limits, MiB, parse_limits
from lookout.model import Batch, Sample
from lookout.selfmetrics import ServerMetrics
from lookout.store import Database, Writer
from tests.server.conftest import DSN_KEY, InProcess, config_for, in_process, start_server

AUTH = {"x-sentry-auth": f"Sentry sentry_key={DSN_KEY}"}
AS_JSON = {"content-type": "application/json"}


def test_limits_parse_with_units_and_name_a_bad_one() -> None:
    limits = parse_limits("max_body=5MiB, max_line=1kb, max_age=2d, max_future=90s, disk_full=0.8")
    assert (limits.max_body_bytes, limits.max_line_bytes) == (5 * MiB, 1000)
    assert (limits.max_age_s, limits.max_future_s, limits.disk_full_ratio) == (172800, 90, 0.8)
    assert parse_limits({"max_series_per_metric": 5}).max_series_per_metric == 5
    assert parse_limits({}) == Limits()
    for bad, key in [("max_event=-1", "limits.max_event"), ("disk_full=2", "limits.disk_full"),
                     ("writer_queue=1.5", "limits.writer_queue"), ("nonsense", "limits")]:  # fmt: skip
        with pytest.raises(ConfigError, match=key):
            parse_limits(bad)


def _metric(served: InProcess, reason: str, signal: str | None = None) -> float:
    total = 0.0
    for metric in served.runtime.metrics.rejected.collect():
        for sample in metric.samples:
            labels = sample.labels
            wanted = signal is None or labels["signal"] == signal
            if sample.name.endswith("_total") and labels["reason"] == reason and wanted:
                total += sample.value
    return total


def test_a_sentry_event_over_the_limit_is_413(served: InProcess) -> None:
    big = {"event_id": "ab" * 16, "message": "x", "extra": {"blob": "y" * 1_000_001}}
    store = served.client.post("/api/1/store/", json=big, headers=AUTH)
    assert store.status_code == 413
    assert store.json()["error"]["code"] == "event_too_large"
    payload = json.dumps(big).encode()
    envelope = b"{}\n" + json.dumps({"type": "event", "length": len(payload)}).encode()
    response = served.client.post(
        "/api/1/envelope/", content=envelope + b"\n" + payload, headers=AUTH
    )
    assert response.status_code == 413
    big["extra"] = {"blob": "y" * 900_000}  # under the limit: stored
    assert served.client.post("/api/1/store/", json=big, headers=AUTH).status_code == 200
    assert _metric(served, "event_too_large") == 2


def test_a_log_line_over_the_limit_is_400_line_too_long(served: InProcess) -> None:
    line = "z" * (256 * 1024 + 1)
    now = time.time_ns()
    shipped = {"source": "s", "seq": 1, "lines": [{"ts_ns": now, "stream": "stdout", "text": line}]}
    response = served.client.post("/api/lookout/lines", json=shipped)
    assert (response.status_code, response.json()["error"]["code"]) == (400, "line_too_long")
    push = {"streams": [{"stream": {"a": "b"}, "values": [[str(now), line]]}]}
    response = served.client.post("/loki/api/v1/push", json=push)
    assert (response.status_code, response.json()["error"]["code"]) == (400, "line_too_long")


def test_each_metric_is_capped_in_series_and_the_excess_counted(tmp_path: Path) -> None:
    with in_process(
        config_for(tmp_path / "data", limits=Limits(max_series_per_metric=100))
    ) as served:
        now = time.time_ns()
        points = [{"timeUnixNano": str(now), "asDouble": 1.0,
                   "attributes": [{"key": "user", "value": {"stringValue": f"u{i}"}}]}
                  for i in range(150)]  # fmt: skip
        metrics = {"resourceMetrics": [{"scopeMetrics": [{"metrics": [
            {"name": "per_user", "gauge": {"dataPoints": points}},
            {"name": "other", "gauge": {"dataPoints": points[:10]}}]}]}]}  # fmt: skip
        for _ in range(2):  # the second time: the 100 known series still take samples
            response = served.client.post("/v1/metrics", json=metrics, headers=AS_JSON)
            assert response.status_code == 200
        series = served.client.get("/api/lookout/series", params={"match": "per_user"}).json()
        assert len(series["series"]) == 100
        assert all(len(s["samples"]) == 2 for s in series["series"])
        other = served.client.get("/api/lookout/series", params={"match": "other"}).json()
        assert len(other["series"]) == 10, "the cap is per metric name"
        assert _metric(served, "series_limit", "samples") == 100


def test_the_series_cap_counts_series_already_stored(tmp_path: Path) -> None:
    """At the default of 10,000; a restart knows the series it has (no fresh allowance)."""
    metrics = ServerMetrics()

    def write(names: range) -> None:
        database = Database(tmp_path / "data")
        writer = Writer(database, metrics)
        writer.start()
        samples = [Sample("wide", {"id": str(i)}, time.time_ns() // 10**6, 1.0) for i in names]
        writer.submit(Batch(samples=samples)).result(30)
        writer.stop()
        database.close()

    write(range(6000))
    write(range(6000, 12_000))
    rejected = metrics.rejected.labels("samples", "series_limit")._value.get()
    assert rejected == 2000


def test_a_full_writer_queue_is_503_with_retry_after(tmp_path: Path) -> None:
    with in_process(
        config_for(tmp_path / "data", limits=Limits(writer_queue_requests=1))
    ) as served:
        release = threading.Event()
        served.runtime.writer.run_job(lambda: int(release.wait(30)))  # the writer is busy
        queued = served.runtime.writer.run_job(lambda: 0)  # and its queue of one is full
        record = {"timeUnixNano": str(time.time_ns()), "body": {"stringValue": "x"}}
        body = {"resourceLogs": [{"scopeLogs": [{"logRecords": [record]}]}]}
        try:
            response = served.client.post("/v1/logs", json=body, headers=AS_JSON)
        finally:
            release.set()
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert _metric(served, "busy") == 1
        queued.result(30)  # the queue has drained: the same request now lands
        assert served.client.post("/v1/logs", json=body, headers=AS_JSON).status_code == 200


@pytest.mark.parametrize("full", [True, False], ids=["full", "negative-control-room"])
def test_a_full_disk_is_503_and_a_metric_says_why(tmp_path: Path, full: bool) -> None:
    # The share of this disk in use is above 0 % and below 100 %: a limit of 0.0001 is
    # passed, one of 1.0 never is.
    ratio = 0.0001 if full else 1.0
    with in_process(config_for(tmp_path / "data", limits=Limits(disk_full_ratio=ratio))) as served:
        record = {"timeUnixNano": str(time.time_ns()), "body": {"stringValue": "x"}}
        body = {"resourceLogs": [{"scopeLogs": [{"logRecords": [record]}]}]}
        response = served.client.post("/v1/logs", json=body, headers=AS_JSON)
        gauge = served.runtime.metrics.disk_full._value.get()
        if full:
            assert response.status_code == 503
            assert response.headers["retry-after"] == "60"
            assert "full" in response.json()["message"]
            assert gauge == 1
            assert _metric(served, "disk_full") == 1
        else:
            assert response.status_code == 200
            assert gauge == 0
        assert served.runtime.metrics.disk_used_ratio._value.get() > 0


def test_records_out_of_the_time_window_are_dropped_one_by_one(served: InProcess) -> None:
    now = time.time_ns()
    times = [now, now - 8 * 86400 * 10**9, now + 3600 * 10**9]
    records = [
        {"timeUnixNano": str(t), "body": {"stringValue": f"r{i}"}} for i, t in enumerate(times)
    ]
    body = {"resourceLogs": [{"scopeLogs": [{"logRecords": records}]}]}
    answer = served.client.post("/v1/logs", json=body, headers=AS_JSON).json()
    assert answer["partialSuccess"]["rejectedLogRecords"] == "2"
    logs = served.client.get("/api/lookout/logs", params={"q": "r"}).json()["logs"]
    assert [r["body"] for r in logs] == ["r0"]


def test_long_attribute_values_are_truncated(served: InProcess) -> None:
    value = "é" * 3000  # 6,000 bytes
    record = {"timeUnixNano": str(time.time_ns()), "body": {"stringValue": "long"},
              "attributes": [{"key": "blob", "value": {"stringValue": value}}]}  # fmt: skip
    body = {"resourceLogs": [{"scopeLogs": [{"logRecords": [record]}]}]}
    assert served.client.post("/v1/logs", json=body, headers=AS_JSON).status_code == 200
    stored = served.client.get("/api/lookout/logs", params={"q": "long"}).json()["logs"][0]
    assert len(stored["attributes"]["blob"].encode()) <= 2048
    assert stored["attributes"]["blob"] == "é" * 1024


# -- decompression bombs, against a real server ------------------------------------------


def _gzip_bomb(gib: int) -> bytes:
    """A multi-member gzip body expanding to `gib` GiB of zeros (about 1 MB per GiB)."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    zeros = bytes(MiB)
    member = b"".join([*(compressor.compress(zeros) for _ in range(1024)), compressor.flush()])
    return member * gib


def _br_bomb(gib: int) -> bytes:
    import brotli

    compressor = brotli.Compressor(quality=0)
    zeros = bytes(MiB)
    return b"".join([*(compressor.process(zeros) for _ in range(1024 * gib)), compressor.finish()])


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(field)


@pytest.fixture(scope="module")
def bombs() -> dict[str, bytes]:
    return {"gzip": _gzip_bomb(10), "br": _br_bomb(10)}


@pytest.mark.parametrize(
    ("encoding", "limit"),
    [("gzip", None), ("br", None), ("gzip", "512MiB")],
    ids=["gzip", "br", "negative-control-512MiB-limit"],
)
def test_a_ten_gigabyte_bomb_is_413_within_a_second_in_bounded_memory(
    tmp_path: Path, bombs: dict[str, bytes], encoding: str, limit: str | None
) -> None:
    # The negative control raises the limit to 512 MiB: the server then holds that much
    # before refusing, and the memory check sees it.
    env = {"LOOKOUT_LIMITS": f"max_body={limit}"} if limit else {}
    server = start_server(tmp_path / "data", env=env)
    try:
        pid = server.process.pid
        for _ in range(3):  # warm: imports and first allocations are not the bomb's
            httpx.post(f"{server.url}/v1/logs", content=b"{}", headers=AS_JSON, timeout=10)
        before = _kib(pid, "VmRSS")
        started = time.monotonic()
        response = httpx.post(
            f"{server.url}/v1/logs", content=bombs[encoding],
            headers={**AS_JSON, "content-encoding": encoding}, timeout=30,
        )  # fmt: skip
        elapsed = time.monotonic() - started
        peak = _kib(pid, "VmHWM")
        assert response.status_code == 413
        limit_kib = Limits().max_body_bytes // 1024
        if limit is None:
            assert elapsed < 1.0
            assert peak - before <= 2 * limit_kib, f"RSS rose {(peak - before) // 1024} MiB"
        else:
            assert peak - before > 2 * limit_kib, "the memory check can fail"
        assert httpx.get(f"{server.url}/readyz", timeout=5).status_code == 200
    finally:
        assert server.stop() == 0


def test_a_multi_member_gzip_body_is_read_whole(served: InProcess) -> None:
    """`cat a.gz b.gz` is one valid gzip body: every member counts, none is dropped."""
    now = time.time_ns()
    text = json.dumps({"resourceLogs": [{"scopeLogs": [{"logRecords": [
        {"timeUnixNano": str(now), "body": {"stringValue": "both members"}}]}]}]}).encode()  # fmt: skip
    cut = len(text) // 2
    body = b"".join(
        zlib.compress(part, wbits=16 + zlib.MAX_WBITS) for part in (text[:cut], text[cut:])
    )
    response = served.client.post(
        "/v1/logs", content=body, headers={**AS_JSON, "content-encoding": "gzip"}
    )
    assert response.status_code == 200, response.text
    logs = served.client.get("/api/lookout/logs", params={"q": "both members"}).json()["logs"]
    assert len(logs) == 1


def test_a_truncated_gzip_body_is_400_not_a_partial_store(served: InProcess) -> None:
    text = json.dumps({"resourceLogs": []}).encode()
    body = zlib.compress(text, wbits=16 + zlib.MAX_WBITS)[:-6]
    response = served.client.post(
        "/v1/logs", content=body, headers={**AS_JSON, "content-encoding": "gzip"}
    )
    assert response.status_code == 400
    assert "cut short" in response.json()["message"]


def test_limits_come_from_the_config(tmp_path: Path) -> None:
    from lookout.config import load

    config = load(environ={"LOOKOUT_LIMITS": "max_body=1MiB,max_series_per_metric=7"})
    assert (config.limits.max_body_bytes, config.limits.max_series_per_metric) == (MiB, 7)
    with in_process(dataclasses.replace(config, data_dir=tmp_path / "data")) as served:
        body = b"x" * (MiB + 1)
        response = served.client.post("/v1/logs", content=body, headers=AS_JSON)
        assert response.status_code == 413


def test_an_otlp_log_record_over_the_line_limit_is_rejected_alone(served: InProcess) -> None:
    now = str(time.time_ns())
    records = [{"timeUnixNano": now, "body": {"stringValue": "kept"}},
               {"timeUnixNano": now, "body": {"stringValue": "é" * (128 * 1024 + 1)}}]  # fmt: skip
    body = {"resourceLogs": [{"scopeLogs": [{"logRecords": records}]}]}
    answer = served.client.post("/v1/logs", json=body, headers=AS_JSON).json()
    assert answer["partialSuccess"]["rejectedLogRecords"] == "1"
    assert "line_too_long" in answer["partialSuccess"]["errorMessage"]
    logs = served.client.get("/api/lookout/logs").json()["logs"]
    assert [r["body"] for r in logs] == ["kept"]


def test_the_documented_limits_are_the_code(tmp_path: Path) -> None:
    from lookout.ingest.limits import LIMITS
    from tests.support import ROOT

    docs = (ROOT / "docs" / "server.md").read_text()
    for name, (_, _, meaning) in LIMITS.items():
        assert f"| `{name}` |" in docs, name
        assert meaning in docs, name
