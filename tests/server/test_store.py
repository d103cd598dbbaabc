"""The store: built-in extensions, migrations, partitions, durability and idempotency."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from lookout.errors import StoreError
from lookout.model import Batch, ErrorEvent, Span
from lookout.selfmetrics import ServerMetrics
from lookout.store import SCHEMA_VERSION, Database, Writer
from lookout.store import db as store_db

DAY_NS = 86400 * 10**9


def _span(trace: str, span: str, start_ns: int) -> Span:
    return Span(trace * 16, span * 8, "", "svc", "op", "server", start_ns, start_ns + 1000)


def _event(event_id: str, ts_ns: int) -> ErrorEvent:
    return ErrorEvent(event_id, 1, ts_ns, "fp", "KeyError: x", "KeyError", "x", "error",
                      "svc", "prod", "1", "", "", {}, {}, {})  # fmt: skip


def open_store(path: Path) -> tuple[Database, Writer]:
    database = Database(path)
    writer = Writer(database, ServerMetrics())
    writer.start()
    return database, writer


def test_a_new_store_is_migrated_and_checkpointed(tmp_path: Path) -> None:
    database, writer = open_store(tmp_path)
    rows = database.connection.execute("SELECT version FROM schema_version ORDER BY 1").fetchall()
    assert rows == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    writer.stop()
    database.close()
    database, writer = open_store(tmp_path)  # reopening runs no migration twice
    count = database.connection.execute("SELECT count(*) FROM schema_version").fetchone()
    assert count == (SCHEMA_VERSION,)
    writer.stop()
    database.close()


def test_a_store_from_a_newer_lookout_is_refused_naming_both_versions(tmp_path: Path) -> None:
    database, writer = open_store(tmp_path)
    database.connection.execute("INSERT INTO schema_version VALUES (99, 0)")
    writer.stop()
    database.close()
    with pytest.raises(
        StoreError, match=rf"schema version 99, newer than this lookout's {SCHEMA_VERSION}"
    ):
        Database(tmp_path)


def test_startup_checks_the_built_in_extensions(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Negative control: a required extension that is not compiled in stops startup."""
    monkeypatch.setattr(store_db, "BUILTIN_EXTENSIONS", ("json", "parquet", "icu", "spatial"))
    with pytest.raises(StoreError, match="spatial"):
        Database(tmp_path)


def test_records_are_partitioned_by_signal_and_day(tmp_path: Path) -> None:
    database, writer = open_store(tmp_path)
    now = time.time_ns()
    writer.submit(Batch(spans=[_span("a", "1", now), _span("b", "2", now - DAY_NS)])).result(10)
    tables = {
        r[0] for r in database.connection.execute("SELECT table_name FROM partitions").fetchall()
    }
    assert len([t for t in tables if t.startswith("spans_d")]) == 2
    assert database.connection.execute("SELECT count(*) FROM spans").fetchone() == (2,)
    writer.stop()
    database.close()


def test_hot_tables_carry_no_indexes_or_unique_constraints(tmp_path: Path) -> None:
    database, writer = open_store(tmp_path)
    writer.submit(
        Batch(spans=[_span("a", "1", time.time_ns())], events=[_event("e" * 32, time.time_ns())])
    ).result(10)
    connection = database.connection
    assert connection.execute("SELECT count(*) FROM duckdb_indexes()").fetchone() == (0,)
    kinds = connection.execute(
        "SELECT DISTINCT constraint_type FROM duckdb_constraints()"
    ).fetchall()
    assert not {k for (k,) in kinds} & {"PRIMARY KEY", "UNIQUE", "FOREIGN KEY"}
    writer.stop()
    database.close()


def test_the_future_resolves_only_after_commit(tmp_path: Path) -> None:
    database, writer = open_store(tmp_path)
    future = writer.submit(Batch(spans=[_span("c", "3", time.time_ns())]))
    assert future.result(10) == 1
    reader = database.cursor()  # another connection sees the commit at once
    assert reader.execute("SELECT count(*) FROM spans").fetchone() == (1,)
    writer.stop()
    database.close()


def test_resends_are_deduplicated_even_after_a_restart(tmp_path: Path) -> None:
    database, writer = open_store(tmp_path)
    now = time.time_ns()
    batch = Batch(spans=[_span("d", "4", now)], events=[_event("f" * 32, now)])
    assert writer.submit(batch).result(10) == 2
    assert writer.submit(batch).result(10) == 0
    writer.stop()
    database.close()
    database, writer = open_store(tmp_path)
    assert writer.submit(batch).result(10) == 0
    assert database.connection.execute("SELECT count(*) FROM spans").fetchone() == (1,)
    assert database.connection.execute("SELECT count(*) FROM events").fetchone() == (1,)
    writer.stop()
    database.close()


def test_one_bad_request_does_not_sink_its_neighbours(tmp_path: Path) -> None:
    database, writer = open_store(tmp_path)
    good = Batch(spans=[_span("e", "5", time.time_ns())])
    bad = Batch(spans=[Span("a" * 32, "b" * 16, "", "svc", "op", "server", 2**70, 2**70)])
    futures = [writer.submit(bad), writer.submit(good)]
    with pytest.raises(StoreError):
        futures[0].result(10)
    assert futures[1].result(10) == 1
    writer.stop()
    database.close()


def _day(ns: int) -> str:
    from lookout.store.schema import day_of

    return day_of("spans", ns)


def test_closed_days_move_to_parquet_and_stay_readable(tmp_path: Path) -> None:
    database, writer = open_store(tmp_path)
    now = time.time_ns()
    old = now - 3 * DAY_NS
    writer.submit(Batch(spans=[_span("a", "1", old), _span("b", "2", now)])).result(10)
    moved = writer.close_days_before(_day(now - DAY_NS)).result(10)
    assert moved == 1
    tables = {
        r[0] for r in database.connection.execute("SELECT table_name FROM partitions").fetchall()
    }
    assert tables == {f"spans_d{_day(now)}"}
    (path,) = [
        r[0] for r in database.connection.execute("SELECT path FROM partition_files").fetchall()
    ]
    assert (tmp_path / path).exists(), "paths are kept relative to the data directory"
    assert path.endswith(".parquet")
    assert database.connection.execute("SELECT count(*) FROM spans").fetchone() == (2,)
    # A late record for the closed day lands in a new table beside the file.
    writer.submit(Batch(spans=[_span("c", "3", old)])).result(10)
    assert database.connection.execute(
        "SELECT count(*) FROM spans WHERE start_ns = ?", [old]
    ).fetchone() == (2,)
    writer.stop()
    database.close()


def test_an_unlisted_parquet_file_from_a_crashed_compaction_is_removed(tmp_path: Path) -> None:
    database, writer = open_store(tmp_path)
    writer.stop()
    database.close()
    stray = tmp_path / "spans" / "20200101-1.parquet"
    stray.parent.mkdir()
    stray.write_bytes(b"PAR1 half written")
    database, writer = open_store(tmp_path)
    assert not stray.exists()
    assert database.connection.execute("SELECT count(*) FROM spans").fetchone() == (0,)
    writer.stop()
    database.close()


def test_an_older_store_is_migrated_forward_at_startup(tmp_path: Path) -> None:
    import duckdb

    from lookout.store.schema import MIGRATIONS

    with duckdb.connect(str(tmp_path / "lookout.duckdb")) as connection:
        connection.execute("CREATE TABLE schema_version (version INTEGER, applied_ns BIGINT)")
        MIGRATIONS[1](connection)
        connection.execute("INSERT INTO schema_version VALUES (1, 0)")
    database, writer = open_store(tmp_path)
    versions = database.connection.execute(
        "SELECT version FROM schema_version ORDER BY 1"
    ).fetchall()
    assert versions == [(v,) for v in range(1, SCHEMA_VERSION + 1)]
    assert database.connection.execute("SELECT count(*) FROM partition_files").fetchone() == (0,)
    writer.stop()
    database.close()
