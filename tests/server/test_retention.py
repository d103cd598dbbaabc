"""Retention: the planner's rules, the `retention` config key, dropping partitions in the
store, the server's periodic run, and the data directory held under its cap."""

from __future__ import annotations

import asyncio
import contextlib
import random
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from lookout.config import load
from lookout.errors import ConfigError
from lookout.model import Batch, LogColumns, LogRecord, Span, SpanColumns
from lookout.selfmetrics import ServerMetrics
from lookout.server.run import retain_forever
from lookout.server.runtime import ServerRuntime
from lookout.store import Database, Retention, RetentionPolicy, Writer, parse_retention
from lookout.store.retention import (
    Drop,
    Partition,
    SignalRetention,
    disk_bytes,
    plan_closing,
    plan_drops,
)
from tests.server.conftest import config_for
from tests.server.retention_load import MB, run_load
from tests.support import ROOT, wait_until

DAY = 86400
NOW = datetime(2026, 11, 27, 12, 0, tzinfo=UTC).timestamp()  # today is 20261127


def policy(max_bytes: int | None = None, **signals: SignalRetention) -> RetentionPolicy:
    rules = {s: SignalRetention() for s in ("spans", "logs", "samples", "events", "job_runs")}
    return RetentionPolicy(max_bytes, {**rules, **signals})


def files(signal: str, day: str, size: int) -> Partition:
    return Partition(signal, day, file_bytes=size)


def table(signal: str, day: str, size: int) -> Partition:
    return Partition(signal, day, table_bytes=size, has_table=True)


# -- the planner: age ---------------------------------------------------------------------
def test_nothing_is_dropped_within_max_age_and_without_caps() -> None:
    parts = [
        files("logs", "20261121", 10),
        files("spans", "20261126", 10),
        table("logs", "20261127", 5),
    ]
    assert plan_drops(parts, 10**9, policy(), NOW) == []


def test_a_day_is_dropped_for_age_once_its_last_second_is_older_than_max_age() -> None:
    """20261119 ends at 20261120T00:00; with max_age 7d it goes at 20261127T00:00, not before."""
    parts = [files("logs", "20261119", 10), files("logs", "20261120", 20)]
    midnight = datetime(2026, 11, 27, tzinfo=UTC).timestamp()
    assert plan_drops(parts, 0, policy(), midnight - 1) == []
    assert plan_drops(parts, 0, policy(), midnight) == [Drop("logs", "20261119", "age", 10)]


def test_each_signal_has_its_own_max_age() -> None:
    parts = [
        files("logs", "20261124", 1),
        files("spans", "20261124", 2),
        table("samples", "20261110", 3),
    ]
    rules = policy(logs=SignalRetention(max_age_s=2 * DAY))
    assert plan_drops(parts, 0, rules, NOW) == [
        Drop("samples", "20261110", "age", 3),
        Drop("logs", "20261124", "age", 1),
    ]


# -- the planner: bytes per signal ---------------------------------------------------------
def test_a_signal_over_its_cap_drops_its_oldest_days_until_the_rest_fits() -> None:
    parts = [
        files("logs", "20261123", 40), files("logs", "20261124", 40),
        files("logs", "20261125", 40), table("logs", "20261127", 10),
        files("spans", "20261121", 500),
    ]  # fmt: skip
    rules = policy(logs=SignalRetention(max_bytes=70))
    assert plan_drops(parts, 0, rules, NOW) == [
        Drop("logs", "20261123", "bytes", 40),
        Drop("logs", "20261124", "bytes", 40),
    ]


def test_todays_partition_goes_for_bytes_only_when_older_days_are_not_enough() -> None:
    parts = [files("logs", "20261126", 30), Partition("logs", "20261127", 50, 20, has_table=True)]
    rules = policy(logs=SignalRetention(max_bytes=60))
    assert plan_drops(parts, 0, rules, NOW) == [
        Drop("logs", "20261126", "bytes", 30),
        Drop("logs", "20261127", "bytes", 70),
    ]
    assert plan_drops(parts, 0, policy(logs=SignalRetention(max_bytes=70)), NOW) == [
        Drop("logs", "20261126", "bytes", 30)
    ]


def test_a_day_after_today_counts_as_today() -> None:
    """Clock skew can file records under tomorrow: that partition is not the oldest."""
    parts = [files("logs", "20261128", 30), files("logs", "20261125", 30)]
    rules = policy(logs=SignalRetention(max_bytes=40))
    assert plan_drops(parts, 0, rules, NOW) == [Drop("logs", "20261125", "bytes", 30)]


# -- the planner: the total cap ------------------------------------------------------------
def test_the_total_cap_drops_the_oldest_days_across_signals_until_the_disk_fits() -> None:
    parts = [
        files("spans", "20261122", 30), files("logs", "20261122", 50),
        files("logs", "20261123", 50), files("samples", "20261124", 5),
        table("logs", "20261127", 20),
    ]  # fmt: skip
    # Measured: those 155 bytes plus 45 of DuckDB file and WAL. Cap 100: drop 100 of files.
    assert plan_drops(parts, 200, policy(max_bytes=100), NOW) == [
        Drop("logs", "20261122", "bytes", 50),
        Drop("spans", "20261122", "bytes", 30),
        Drop("logs", "20261123", "bytes", 50),
    ]


def test_a_day_table_without_files_is_not_dropped_for_the_total_cap() -> None:
    """Its blocks stay in the DuckDB file, so dropping it would free no disk."""
    parts = [table("logs", "20261120", 80), files("logs", "20261125", 30)]
    assert plan_drops(parts, 150, policy(max_bytes=130), NOW) == [
        Drop("logs", "20261125", "bytes", 30)
    ]


def test_what_age_and_signal_caps_drop_counts_toward_the_total_cap() -> None:
    parts = [
        files("logs", "20261101", 60), files("spans", "20261124", 30),
        files("spans", "20261125", 30), files("logs", "20261126", 30),
    ]  # fmt: skip
    rules = policy(max_bytes=100, spans=SignalRetention(max_bytes=30))
    assert plan_drops(parts, 150, rules, NOW) == [
        Drop("logs", "20261101", "age", 60),
        Drop("spans", "20261124", "bytes", 30),
    ]


def test_the_total_cap_takes_todays_files_last() -> None:
    parts = [Partition("logs", "20261127", 40, 10, has_table=True), files("spans", "20261126", 20)]
    assert plan_drops(parts, 100, policy(max_bytes=50), NOW) == [
        Drop("spans", "20261126", "bytes", 20),
        Drop("logs", "20261127", "bytes", 50),
    ]


def test_a_disk_that_cannot_fit_drops_every_file_and_stops() -> None:
    """Only a large DuckDB file is left: nothing more to drop, and no loop."""
    parts = [files("logs", "20261126", 10), table("logs", "20261127", 10)]
    assert plan_drops(parts, 500, policy(max_bytes=100), NOW) == [
        Drop("logs", "20261126", "bytes", 10)
    ]


# -- the planner: closing day tables early ---------------------------------------------------
def test_day_tables_over_a_quarter_of_the_total_cap_are_all_closed_today_included() -> None:
    parts = [
        table("logs", "20261127", 20),
        table("spans", "20261126", 6),
        files("logs", "20261125", 50),
    ]
    assert plan_closing(parts, policy(max_bytes=100), NOW) == [
        ("logs", "20261127"),
        ("spans", "20261126"),
    ]
    assert plan_closing(parts, policy(max_bytes=120), NOW) == []


def test_a_signals_tables_over_a_quarter_of_its_cap_are_closed() -> None:
    parts = [table("logs", "20261127", 30), table("spans", "20261127", 30)]
    rules = policy(logs=SignalRetention(max_bytes=100))
    assert plan_closing(parts, rules, NOW) == [("logs", "20261127")]


def test_without_byte_caps_or_with_expiring_tables_nothing_is_closed() -> None:
    assert plan_closing([table("logs", "20261127", 10**12)], policy(), NOW) == []
    expired = [table("logs", "20261101", 90), table("logs", "20261127", 10)]
    assert plan_closing(expired, policy(max_bytes=100), NOW) == []


# -- the config key ------------------------------------------------------------------------
def test_retention_defaults_to_seven_days_and_no_byte_cap() -> None:
    assert load(None, {}, {}).retention == policy()
    assert policy().of("logs") == SignalRetention(7 * DAY, None)


def test_retention_from_the_file_and_from_the_variable_are_the_same_policy(
    tmp_path: Path,
) -> None:
    path = tmp_path / "lookout.yaml"
    path.write_text(
        "retention:\n  max_bytes: 10GB\n  max_age: 14d\n  logs: 3d\n"
        "  spans: {max_age: 36h, max_bytes: 1GiB}\n"
    )
    expected = policy(
        10 * 10**9,
        spans=SignalRetention(36 * 3600, 2**30),
        logs=SignalRetention(3 * DAY),
        samples=SignalRetention(14 * DAY),
        events=SignalRetention(14 * DAY),
        job_runs=SignalRetention(14 * DAY),
    )
    assert load(path, {}, {}).retention == expected
    variable = "max_bytes=10GB,max_age=14d,logs=3d,spans.max_age=36h,spans.max_bytes=1GiB"
    assert load(None, {"LOOKOUT_RETENTION": variable}, {}).retention == expected


@pytest.mark.parametrize(
    ("raw", "key", "hint"),
    [
        ({"logs": "7x"}, "retention.logs", "a duration such as '7d'"),
        ({"max_age": "0d"}, "retention.max_age", "above zero"),
        ({"spans": {"max_age": "soon"}}, "retention.spans.max_age", "a duration such as '7d'"),
        ({"max_bytes": "200"}, "retention.max_bytes", "at least 1MB"),
        ({"max_bytes": "lots"}, "retention.max_bytes", "a size such as"),
        ({"logs": {"max_bytes": "2PB"}}, "retention.logs.max_bytes", "a size such as"),
        ({"logz": "3d"}, "retention.logz", "Did you mean 'logs'?"),
        ({"logs": {"max_size": "1GB"}}, "retention.logs.max_size", "one of max_age, max_bytes"),
        (["7d"], "retention", "a mapping"),
        ("max_bytes", "retention", "`name=value` pairs"),
    ],
)
def test_a_bad_retention_value_names_the_key_and_the_fix(raw: object, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_retention(raw)
    assert (caught.value.key, hint in str(caught.value)) == (key, True)


def test_a_bad_retention_variable_stops_startup_with_exit_2(tmp_path: Path) -> None:
    found = subprocess.run(
        [sys.executable, "-m", "lookout", "server", "--check-config"],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={"PATH": "/usr/bin:/bin", "LOOKOUT_RETENTION": "logs.max_age=7x"},
    )  # fmt: skip
    assert found.returncode == 2
    assert "Config 'retention.logs.max_age' has value '7x'. Expected a duration such as '7d'." in (
        found.stderr
    )
    assert "Traceback" not in found.stderr


# -- the store -------------------------------------------------------------------------------
def _log(ts_ns: int, body: str = "x") -> LogRecord:
    return LogRecord(ts_ns, "svc", "info", 9, body)


def _span(ts_ns: int, ident: int) -> Span:
    return Span(f"{ident:032x}", f"{ident:016x}", "", "svc", "op", "server", ts_ns, ts_ns + 1)


def _open(path: Path) -> tuple[Database, Writer]:
    database = Database(path)
    writer = Writer(database, ServerMetrics())
    writer.start()
    return database, writer


def _count(database: Database, view: str) -> int:
    row = database.connection.execute(f"SELECT count(*) FROM {view}").fetchone()
    return int(row[0]) if row else -1


def test_dropped_days_lose_tables_files_and_listing_and_stay_gone_after_a_restart(
    tmp_path: Path,
) -> None:
    now = time.time_ns()
    database, writer = _open(tmp_path)
    old, older = now - 3 * DAY * 10**9, now - 4 * DAY * 10**9
    writer.submit(Batch(logs=LogColumns.of([_log(older), _log(old), _log(now)]))).result(10)
    writer.close_days_before(datetime.fromtimestamp(now / 1e9, UTC).strftime("%Y%m%d")).result(10)
    writer.submit(Batch(logs=LogColumns.of([_log(old, "late")]))).result(
        10
    )  # a table beside the file
    day = datetime.fromtimestamp(old / 1e9, UTC).strftime("%Y%m%d")
    listed = list(database.files["logs"][day])
    assert writer.run_job(lambda: database.drop_days([("logs", day)])).result(10) == 1
    assert (day in database.partitions["logs"], day in database.files["logs"]) == (False, False)
    assert [(tmp_path / p).exists() for p in listed] == [False]
    assert _count(database, "logs") == 2  # the older day's and today's
    writer.stop()
    database.close()
    database, writer = _open(tmp_path)
    assert (day in database.partitions["logs"], day in database.files["logs"]) == (False, False)
    assert _count(database, "logs") == 2
    writer.stop()
    database.close()


def test_enforcing_drops_expired_days_counts_them_and_reports_bytes(tmp_path: Path) -> None:
    now = time.time_ns()
    database, writer = _open(tmp_path)
    expired = now - 9 * DAY * 10**9
    batch = Batch(
        logs=LogColumns.of([_log(expired), _log(now)]),
        spans=SpanColumns.of([_span(expired, 1), _span(now, 2)]),
    )
    writer.submit(batch).result(10)
    metrics = ServerMetrics()
    rules = policy(spans=SignalRetention(max_age_s=30 * DAY))
    report = Retention(database, rules, metrics).submit(writer, time.time()).result(30)
    day = datetime.fromtimestamp(expired / 1e9, UTC).strftime("%Y%m%d")
    assert report.dropped == (Drop("logs", day, "age", report.dropped[0].bytes),)
    assert (_count(database, "logs"), _count(database, "spans")) == (1, 2)
    value = metrics.registry.get_sample_value
    labels = {"signal": "logs", "reason": "age"}
    assert value("lookout_store_retention_dropped_partitions_total", labels) == 1
    assert value("lookout_store_data_dir_bytes") == report.disk_bytes
    assert report.disk_bytes == disk_bytes(tmp_path) > 0
    assert value("lookout_store_signal_bytes", {"signal": "spans"}) == report.signal_bytes["spans"]
    writer.stop()
    database.close()


def test_day_tables_are_closed_into_parquet_early_under_a_byte_cap(tmp_path: Path) -> None:
    now = time.time_ns()
    database, writer = _open(tmp_path)
    rng = random.Random(1)
    logs = [_log(now + i, f"{rng.getrandbits(2048):0512x}") for i in range(20_000)]
    writer.submit(Batch(logs=LogColumns.of(logs))).result(30)  # about 6 MB in today's table
    rules = policy(max_bytes=20 * MB)  # tables may hold 5 MB
    report = Retention(database, rules, ServerMetrics()).submit(writer, time.time()).result(60)
    today = datetime.fromtimestamp(now / 1e9, UTC).strftime("%Y%m%d")
    assert (report.closed, report.dropped) == ((("logs", today),), ())
    assert (today in database.partitions["logs"], len(database.files["logs"][today])) == (False, 1)
    assert _count(database, "logs") == 20_000
    writer.stop()
    database.close()


def test_the_server_enforces_retention_at_startup_and_periodically(tmp_path: Path) -> None:
    runtime = ServerRuntime.open(config_for(tmp_path, retention=policy()))
    expired = time.time_ns() - 8 * DAY * 10**9
    runtime.writer.submit(Batch(logs=LogColumns.of([_log(expired)]))).result(10)
    value = runtime.metrics.registry.get_sample_value
    labels = {"signal": "logs", "reason": "age"}

    async def run() -> None:
        task = asyncio.create_task(retain_forever(runtime, every_s=0.05))
        await asyncio.to_thread(
            wait_until,
            lambda: value("lookout_store_retention_dropped_partitions_total", labels) == 1,
        )
        # A late record brings the dropped day back; a later run drops it again.
        await asyncio.to_thread(
            runtime.writer.submit(Batch(logs=LogColumns.of([_log(expired)]))).result, 10
        )
        await asyncio.to_thread(
            wait_until,
            lambda: value("lookout_store_retention_dropped_partitions_total", labels) == 2,
        )
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    try:
        asyncio.run(run())
        assert _count(runtime.database, "logs") == 0
    finally:
        runtime.close()


# -- the requirement: a cap holds while data keeps coming -------------------------------------
# Scaled a tenth from the requirement (200 MB cap, 1 GB ingested, du <= 220 MB), which
# bench/retention.py runs in full with the same replay.
SCALED_CAP, SCALED_TOTAL = 20 * MB, 100 * MB


def test_du_of_the_data_directory_stays_within_ten_percent_of_the_cap(tmp_path: Path) -> None:
    result = run_load(
        tmp_path / "data", policy(SCALED_CAP), SCALED_TOTAL,
        enforce_every=2 * MB, sample_every=MB // 2,
    )  # fmt: skip
    over = [s for s in result.samples if s.most > SCALED_CAP * 1.1]
    assert over == []
    assert len(result.samples) >= 100  # du read after every batch, before each run
    assert result.dropped[("logs", "bytes")] >= 1  # the cap was reached, and held
    assert result.ingested >= SCALED_TOTAL


def test_negative_control_without_a_cap_the_same_replay_exceeds_it(tmp_path: Path) -> None:
    result = run_load(
        tmp_path / "data", policy(), SCALED_TOTAL, enforce_every=2 * MB, sample_every=MB // 2
    )
    assert result.samples[-1].most > SCALED_CAP * 1.1
    assert not result.dropped
