"""A damaged store never stops startup: the damaged part moves to quarantine/, a CRITICAL
line names it, lookout_store_corruptions_total counts it, /readyz reports degraded until an
operator acknowledges, and acknowledged data everywhere else survives."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from lookout.model import Batch, ErrorEvent, LogColumns, LogRecord, Sample, Span, SpanColumns
from lookout.selfmetrics import ServerMetrics
from lookout.store import (
    Damage,
    Database,
    Quarantine,
    Writer,
    acknowledge,
    recovery,
    unacknowledged,
)
from lookout.store.schema import day_of
from tests.server.conftest import RunningServer, start_server
from tests.support import ROOT, free_port, wait_until

DAY_NS = 86_400 * 10**9
# What the built store holds, by log service: where each lives, and how many records.
CLOSED, HOT, WAL = "closed", "hot", "wal"  # a Parquet file, a day table, only the WAL
COUNTS = {CLOSED: 300, HOT: 20_000, WAL: 5 * 60}
SPANS = 50  # today's spans: a second day table, checkpointed


def build(data_dir: str) -> None:
    """Fill a store through the real writer, then die without a checkpoint (kill -9)."""
    database = Database(Path(data_dir))
    writer = Writer(database, ServerMetrics())
    writer.start()
    now = time.time_ns()
    old = now - 2 * DAY_NS

    def logs(service: str, count: int, ts_ns: int) -> LogColumns:
        body = f"{service} " + "x" * 200
        return LogColumns.of(
            LogRecord(ts_ns + i, service, "info", 9, f"{body} {i}") for i in range(count)
        )

    writer.submit(Batch(logs=logs(CLOSED, COUNTS[CLOSED], old))).result(30)
    sample = Sample("corruption_probe", {"job": "probe", "instance": "a"}, old // 10**6, 7.0)
    event = ErrorEvent("e" * 32, 1, old, "fp", "KeyError: seat", "KeyError", "seat", "error",
                       "booking", "prod", "1", "", "", {}, {}, {})  # fmt: skip
    writer.submit(Batch(samples=[sample], events=[event])).result(30)
    writer.flush(now).result(60)  # all of it to Parquet, with a series snapshot
    writer.submit(Batch(logs=logs(HOT, COUNTS[HOT], now))).result(60)
    spans = [
        Span("a" * 32, f"{i:016x}", "", "hot", "op", "server", now, now + 1) for i in range(SPANS)
    ]
    writer.submit(Batch(spans=SpanColumns.of(spans))).result(30)
    writer.checkpoint(now).result(60)  # the day tables into the database file
    for part in range(5):
        batch = logs(WAL, COUNTS[WAL] // 5, now + 10**9 + part * 1000)
        writer.submit(Batch(logs=batch)).result(30)  # acknowledged: in the WAL only
    os._exit(0)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    data_dir = tmp_path_factory.mktemp("built") / "data"
    code = f"from tests.server.test_corruption import build; build({str(data_dir)!r})"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, timeout=120)
    assert (data_dir / "lookout.duckdb.wal").exists()
    return data_dir


@pytest.fixture
def store(built: Path, tmp_path: Path) -> Path:
    """A copy of the built store for one test to damage."""
    return Path(shutil.copytree(built, tmp_path / "data"))


def start(data_dir: Path) -> RunningServer:
    """A real `lookout server`, waited for on /healthz (its /readyz may say degraded)."""
    return start_server(data_dir, env={"LOOKOUT_SELF_OBSERVE_INTERVAL": "1"}, probe="/healthz")


@pytest.fixture
def running() -> Iterator[list[RunningServer]]:
    servers: list[RunningServer] = []
    yield servers
    for server in servers:
        server.stop()


def serve(data_dir: Path, running: list[RunningServer]) -> RunningServer:
    server = start(data_dir)
    running.append(server)
    return server


def held(server: RunningServer) -> dict[str, int]:
    """Log records per service, spans, the probe series' samples and the issues."""
    now_s = int(time.time())
    window = {"start": str(now_s - 4 * 86400), "end": str(now_s + 3600)}
    counts = {}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for service in COUNTS:
            total, params = 0, {"service": service, "limit": "1000", **window}
            while True:
                page = client.get("/api/lookout/logs", params=params).json()
                total += len(page["logs"])
                if not page["next_cursor"]:
                    break
                params["cursor"] = page["next_cursor"]
            counts[service] = total
        trace = client.get(f"/api/lookout/traces/{'a' * 32}")
        counts["spans"] = trace.json()["span_count"] if trace.status_code == 200 else 0
        series = client.get(
            "/api/lookout/series", params={"match": "corruption_probe", **window}
        ).json()["series"]
        counts["probe_samples"] = sum(len(s["samples"]) for s in series)
        issues = client.get("/api/lookout/issues", params=window).json()["issues"]
        counts["issues"] = len(issues)
    return counts


INTACT = {**COUNTS, "spans": SPANS, "probe_samples": 1, "issues": 1}


def readyz(server: RunningServer) -> tuple[int, dict[str, Any]]:
    answer = httpx.get(f"{server.url}/readyz", timeout=5)
    return answer.status_code, answer.json()


def critical_lines(server: RunningServer) -> list[dict[str, Any]]:
    lines = []
    for line in list(server.lines):
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict) and parsed.get("level") == "critical":
            lines.append(parsed)
    return lines


def corruptions(server: RunningServer) -> dict[str, float]:
    """lookout_store_corruptions_total by kind, as the server writes its own metrics."""

    def found() -> list[Any]:
        answer = httpx.get(
            f"{server.url}/api/lookout/series",
            params={"match": "lookout_store_corruptions_total"},
            timeout=10,
        )
        return list(answer.json()["series"])

    series = wait_until(found, 20, "the server's own corruption counter")
    return {s["labels"]["kind"]: s["samples"][-1]["value"] for s in series}


def assert_degraded(server: RunningServer, damaged: list[str], kinds: dict[str, float]) -> None:
    """Degraded naming the damaged files; CRITICAL lines; counted; /healthz still 200."""
    status, body = readyz(server)
    assert (status, body["status"], body["damaged"]) == (503, "degraded", damaged)
    (folder,) = body["quarantine"]
    assert (server.data_dir / folder / "report.json").exists()
    assert [line["file"] for line in critical_lines(server)] == damaged
    assert corruptions(server) == kinds
    assert httpx.get(f"{server.url}/healthz", timeout=5).status_code == 200


def overwrite(path: Path, offset: int, count: int = 256) -> None:
    with path.open("r+b") as handle:
        handle.seek(offset)
        handle.write(bytes(reversed(range(256))) * (count // 256 or 1))


# -- the tests -----------------------------------------------------------------------------


def test_a_crash_with_an_intact_wal_loses_nothing_and_quarantines_nothing(
    store: Path, running: list[RunningServer]
) -> None:
    server = serve(store, running)
    assert readyz(server) == (200, {"status": "ready"})
    assert held(server) == INTACT
    assert not (store / "quarantine").exists()


def test_an_overwritten_wal_is_quarantined_alone(store: Path, running: list[RunningServer]) -> None:
    """DuckDB refuses the replay: the WAL goes, the database opens as of its checkpoint."""
    wal = store / "lookout.duckdb.wal"
    overwrite(wal, wal.stat().st_size // 2)
    server = serve(store, running)
    assert_degraded(server, ["lookout.duckdb.wal"], {"wal": 1.0})
    assert held(server) == {**INTACT, WAL: 0}  # only what was not yet checkpointed


def test_a_truncated_wal_is_caught_by_the_commit_mark(
    store: Path, running: list[RunningServer]
) -> None:
    """DuckDB takes a truncated WAL for a torn last write and replays what it can, silently;
    the commit mark says acknowledged commits are missing."""
    wal = store / "lookout.duckdb.wal"
    os.truncate(wal, wal.stat().st_size // 2)
    server = serve(store, running)
    assert_degraded(server, ["lookout.duckdb.wal"], {"wal": 1.0})
    counts = held(server)
    assert counts[WAL] < COUNTS[WAL]
    assert counts[WAL] % (COUNTS[WAL] // 5) == 0, "requests land whole or not at all"
    assert {**counts, WAL: 0} == {**INTACT, WAL: 0}
    report = json.loads((store / readyz(server)[1]["quarantine"][0] / "report.json").read_text())
    assert "commit" in report["damaged"][0]["reason"]


def _blocks_of_only(data_dir: Path, table_prefix: str) -> list[int]:
    """Blocks of the database file that hold the table and nothing else (read-only)."""
    connection = duckdb.connect(str(data_dir / "lookout.duckdb"), read_only=True)
    try:
        tables = [
            t for (t,) in connection.execute("SELECT table_name FROM duckdb_tables()").fetchall()
        ]
        blocks: dict[str, set[int]] = {}
        for table in tables:
            rows = connection.execute(
                "SELECT block_id FROM pragma_storage_info(?) WHERE persistent", [table]
            ).fetchall()
            blocks[table] = {int(b) for (b,) in rows if b is not None and b >= 0}
    finally:
        connection.close()
    (target,) = [t for t in tables if t.startswith(table_prefix)]
    others = set().union(*(b for t, b in blocks.items() if t != target))
    return sorted(blocks[target] - others)


def test_a_damaged_day_table_costs_that_table_only(
    store: Path, running: list[RunningServer]
) -> None:
    """A checksum failure in one table's block: the readable tables are copied into a new
    database file, the old file goes to quarantine, only that table is lost."""
    today = day_of("logs", time.time_ns())
    (block, *_) = _blocks_of_only(store, f"logs_d{today}")
    header, block_size = 3 * 4096, 256 * 1024
    overwrite(store / "lookout.duckdb", header + block * block_size + 4096, 4096)
    server = serve(store, running)
    assert_degraded(server, [f"lookout.duckdb#logs_d{today}"], {"table": 1.0})
    # Today's logs were that table (checkpointed and in the WAL); the rest survives.
    assert held(server) == {**INTACT, HOT: 0, WAL: 0}


def test_an_unreadable_database_file_keeps_every_closed_day(
    store: Path, running: list[RunningServer]
) -> None:
    """The whole file goes (and its WAL with it); the closed days' Parquet files are found
    again, their series named from the snapshots, their issues rebuilt from the events."""
    os.truncate(store / "lookout.duckdb", 5000)
    server = serve(store, running)
    assert_degraded(server, ["lookout.duckdb"], {"database": 1.0})
    assert held(server) == {**INTACT, HOT: 0, WAL: 0, "spans": 0}


def test_a_missing_database_file_is_not_taken_for_a_new_store(
    store: Path, running: list[RunningServer]
) -> None:
    """The Parquet files beside it are found again, not deleted as compaction leftovers."""
    (store / "lookout.duckdb").unlink()
    server = serve(store, running)
    assert_degraded(server, ["lookout.duckdb"], {"database": 1.0})
    assert held(server) == {**INTACT, HOT: 0, WAL: 0, "spans": 0}


def test_a_truncated_parquet_file_is_quarantined_alone(
    store: Path, running: list[RunningServer]
) -> None:
    (closed,) = (store / "logs").glob("*.parquet")
    os.truncate(closed, closed.stat().st_size // 2)
    server = serve(store, running)
    assert_degraded(server, [str(closed.relative_to(store))], {"parquet": 1.0})
    assert held(server) == {**INTACT, CLOSED: 0}


def test_an_overwritten_parquet_file_is_caught_by_the_digest_in_its_name(
    store: Path, running: list[RunningServer]
) -> None:
    """Its framing is whole, so startup serves it; the digest check that follows startup
    takes it out of the view and quarantines it."""
    (closed,) = (store / "logs").glob("*.parquet")
    overwrite(closed, closed.stat().st_size // 3, 512)
    server = serve(store, running)
    wait_until(lambda: readyz(server)[0] == 503, 20, "/readyz to report degraded")
    assert_degraded(server, [str(closed.relative_to(store))], {"parquet": 1.0})
    assert held(server) == {**INTACT, CLOSED: 0}


def test_acknowledging_makes_the_server_ready_again_and_keeps_the_files(
    store: Path, running: list[RunningServer]
) -> None:
    (closed,) = (store / "logs").glob("*.parquet")
    os.truncate(closed, 100)
    server = serve(store, running)
    folder = store / readyz(server)[1]["quarantine"][0]
    acked = subprocess.run(
        [sys.executable, "-m", "lookout", "store", "ack-corruption", "--data-dir", str(store)],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert (acked.returncode, acked.stdout.split()[:2]) == (0, ["acknowledged", str(folder)])
    assert readyz(server) == (200, {"status": "ready"})
    assert (folder / closed.relative_to(store)).exists()
    server.stop()
    running.clear()
    assert readyz(serve(store, running)) == (200, {"status": "ready"}), "it stays acknowledged"


def test_a_second_server_on_the_same_store_is_refused_not_quarantined(
    store: Path, running: list[RunningServer]
) -> None:
    """A held lock is not damage: the second server exits 1 and the store is untouched."""
    serve(store, running)
    second = subprocess.run(
        [sys.executable, "-m", "lookout", "server", "--data-dir", str(store),
         "--port", str(free_port()), "--otlp-port", "0"],
        cwd=ROOT, capture_output=True, text=True, check=False, timeout=60,
    )  # fmt: skip
    assert second.returncode == 1
    assert "lock" in second.stderr
    assert not (store / "quarantine").exists()


# -- the parts, in process -------------------------------------------------------------------


def test_the_flush_moves_today_too_so_the_database_file_holds_at_most_an_hour(
    tmp_path: Path,
) -> None:
    """What the hourly flush leaves: no day table, Parquet files named by their digest, and
    a series snapshot that names every series their samples use."""
    database = Database(tmp_path)
    writer = Writer(database, ServerMetrics())
    writer.start()
    now = time.time_ns()
    sample = Sample("flushed_probe", {"job": "probe"}, now // 10**6, 1.0)
    writer.submit(
        Batch(samples=[sample], logs=LogColumns.of([LogRecord(now, "svc", "info", 9, "x")]))
    ).result(10)
    assert writer.flush(now).result(30) == 2
    assert database.partitions == {signal: set() for signal in database.partitions}
    for paths in (p for days in database.files.values() for p in days.values()):
        for path in paths:
            assert recovery.named_digest(path) == recovery.file_digest(tmp_path / path)
    (snapshot,) = (tmp_path / recovery.SERIES_DIR).glob("*.parquet")
    names = duckdb.sql(f"SELECT name FROM read_parquet('{snapshot}')").fetchall()
    assert names == [("flushed_probe",)]
    writer.stop()
    database.close()


def test_a_damaged_commit_mark_is_ignored_not_believed(tmp_path: Path) -> None:
    mark = recovery.CommitMark(tmp_path / recovery.COMMIT_MARK)
    mark.write(41)
    mark.write(42, sync=True)
    assert mark.read() == 42
    mark.close()
    overwrite(mark.path, 0, 4)
    assert mark.read() is None


def test_acknowledging_marks_each_quarantine_folder_once(tmp_path: Path) -> None:
    first = Quarantine(tmp_path, datetime(2026, 11, 27, 10, tzinfo=UTC))
    first.record(Damage("lookout.duckdb.wal", "wal", "checksum", "5 minutes"))
    assert unacknowledged(tmp_path) == [first.folder]
    assert acknowledge(tmp_path, datetime(2026, 11, 27, 11, tzinfo=UTC), "ops") == [first.folder]
    assert unacknowledged(tmp_path) == []
    assert acknowledge(tmp_path, datetime(2026, 11, 27, 12, tzinfo=UTC), "ops") == []
