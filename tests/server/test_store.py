"""The store: built-in extensions, migrations, partitions, durability and idempotency."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import pytest

from lookout.errors import StoreError
from lookout.model import Batch, ErrorEvent, Span, SpanColumns
from lookout.selfmetrics import ServerMetrics
from lookout.store import SCHEMA_VERSION, Database, Writer
from lookout.store import db as store_db
from lookout.store import writer as writer_module
from lookout.store.schema import day_of, day_table

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
    writer.submit(
        Batch(spans=SpanColumns.of([_span("a", "1", now), _span("b", "2", now - DAY_NS)]))
    ).result(10)
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
        Batch(
            spans=SpanColumns.of([_span("a", "1", time.time_ns())]),
            events=[_event("e" * 32, time.time_ns())],
        )
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
    future = writer.submit(Batch(spans=SpanColumns.of([_span("c", "3", time.time_ns())])))
    assert future.result(10) == 1
    reader = database.cursor()  # another connection sees the commit at once
    assert reader.execute("SELECT count(*) FROM spans").fetchone() == (1,)
    writer.stop()
    database.close()


def test_resends_are_deduplicated_even_after_a_restart(tmp_path: Path) -> None:
    database, writer = open_store(tmp_path)
    now = time.time_ns()
    batch = Batch(spans=SpanColumns.of([_span("d", "4", now)]), events=[_event("f" * 32, now)])
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


@pytest.mark.parametrize("keys_loaded", [2, 0], ids=["two-in-the-window", "none-in-the-window"])
def test_a_restart_remembers_the_span_keys_of_the_dedup_window_only(
    tmp_path: Path, keys_loaded: int
) -> None:
    database, writer = open_store(tmp_path)
    now = time.time_ns()
    spans = SpanColumns.of([_span(t * 2, t * 2, now) for t in "abc"])
    assert writer.submit(Batch(spans=spans)).result(10) == 3
    writer.stop()
    # Ingested two hours ago: outside the window, so not worth remembering after a restart.
    older = now - 2 * writer_module.DEDUP_WINDOW_S * 10**9
    table = day_table("spans", day_of("spans", now))
    database.connection.execute(
        f"UPDATE {table} SET ingested_ns = ? WHERE span_id >= ?",
        [older, "abc"[keys_loaded] * 16],
    )
    database.close()
    database, writer = open_store(tmp_path)
    remembered = [t * 32 + t * 16 in writer._span_keys for t in "abc"]
    assert remembered == [i < keys_loaded for i in range(3)]
    assert len(writer._span_keys) == keys_loaded
    writer.stop()
    database.close()


def test_one_bad_request_does_not_sink_its_neighbours(tmp_path: Path) -> None:
    database, writer = open_store(tmp_path)
    good = Batch(spans=SpanColumns.of([_span("e", "5", time.time_ns())]))
    bad = Batch(
        spans=SpanColumns.of([Span("a" * 32, "b" * 16, "", "svc", "op", "server", 2**70, 2**70)])
    )
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
    writer.submit(Batch(spans=SpanColumns.of([_span("a", "1", old), _span("b", "2", now)]))).result(
        10
    )
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
    writer.submit(Batch(spans=SpanColumns.of([_span("c", "3", old)]))).result(10)
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


def test_spans_stored_before_trace_key_existed_are_still_found_by_trace_id(
    tmp_path: Path,
) -> None:
    """A schema-3 store: a day table without `trace_key` (filled in by the migration) and
    a closed day's Parquet file without it (read as NULL) both answer a trace lookup."""
    import duckdb

    from lookout.query import read
    from lookout.store.schema import DAY_TABLES, MIGRATIONS

    old_columns = DAY_TABLES["spans"].replace(",\n        trace_key BIGINT", "")
    assert "trace_key" not in old_columns
    now = time.time_ns()
    row = "'{t}', '{s}', '', 'svc', 'op', 'server', {n}, {n}, 0, 'unset', '', '{{}}', '[]', '[]', '{{}}', '', 'otlp', {n}"
    with duckdb.connect(str(tmp_path / "lookout.duckdb")) as connection:
        connection.execute("CREATE TABLE schema_version (version INTEGER, applied_ns BIGINT)")
        for version in (1, 2, 3):
            MIGRATIONS[version](connection)
            connection.execute("INSERT INTO schema_version VALUES (?, 0)", [version])
        connection.execute(f"CREATE TABLE spans_d20260101 ({old_columns})")
        connection.execute("INSERT INTO partitions VALUES ('spans', '20260101', 'spans_d20260101')")
        connection.execute(
            f"INSERT INTO spans_d20260101 VALUES ({row.format(t='a' * 32, s='1' * 16, n=now)})"
        )
        (tmp_path / "spans").mkdir()
        connection.execute(f"CREATE TABLE old_day ({old_columns})")
        connection.execute(
            f"INSERT INTO old_day VALUES ({row.format(t='b' * 32, s='2' * 16, n=now)})"
        )
        parquet = tmp_path / "spans" / "20251231-1.parquet"
        connection.execute(f"COPY old_day TO '{parquet}' (FORMAT parquet)")
        connection.execute("DROP TABLE old_day")
        connection.execute(
            "INSERT INTO partition_files VALUES ('spans', '20251231', 'spans/20251231-1.parquet', 1, 0)"
        )
    database, writer = open_store(tmp_path)
    try:
        writer.submit(Batch(spans=SpanColumns.of([_span("cc", "33", now)]))).result(10)
        cursor = database.cursor()
        for trace in ("a", "b", "c"):
            found = read.trace(cursor, trace * 32)
            assert found is not None, trace
            assert found["span_count"] == 1
            assert "trace_key" not in found["spans"][0]
        assert read.trace(cursor, "d" * 32) is None
    finally:
        writer.stop()
        database.close()


def test_recent_keys_remember_at_least_most_keys_or_the_window_in_bounded_memory() -> None:
    from lookout.store.writer import RecentKeys

    keys = RecentKeys(window_s=60, most=1000)
    keys.add_all((f"k{i}" for i in range(10_000)), now_ns=0)
    assert len(keys) <= 2 * 1000
    assert all(f"k{i}" in keys for i in range(9000, 10_000)), "the last `most` are kept"
    assert "k0" not in keys, "older ones are forgotten"
    later = RecentKeys(window_s=60, most=1000)
    later.add_all(["a"], now_ns=0)
    later.add_all(["b"], now_ns=61 * 10**9)  # a window later: "a" is in the old generation
    assert "a" in later
    assert "b" in later
    later.add_all(["c"], now_ns=122 * 10**9)  # two windows later: "a" is gone
    assert "a" not in later
    assert "c" in later


def test_a_big_day_of_spans_moves_to_files_sorted_by_trace_key_ranges(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lookout.query import read

    monkeypatch.setattr(store_db, "SORTED_SPANS", 8)  # 40 spans: five ranges
    database, writer = open_store(tmp_path)
    try:
        old = time.time_ns() - 3 * DAY_NS
        traces = [f"{n * 7919:032x}"[::-1] for n in range(1, 21)]  # keys spread unevenly
        spans = [
            Span(trace, f"{n:08x}{half:08x}", "", "svc", "op", "server", old + n, old + n + 1)
            for n, trace in enumerate(traces)
            for half in (0, 1)
        ]
        writer.submit(Batch(spans=SpanColumns.of(spans))).result(10)
        assert writer.close_days_before(_day(old + DAY_NS)).result(10) == 40
        rows = database.connection.execute(
            "SELECT path, rows FROM partition_files ORDER BY path"
        ).fetchall()
        assert len(rows) > 1
        assert sum(count for _, count in rows) == 40
        ranges = []
        for path, _ in rows:
            keys = [
                key
                for (key,) in database.connection.execute(
                    "SELECT trace_key FROM read_parquet(?)", [str(tmp_path / path)]
                ).fetchall()
            ]
            assert keys == sorted(keys), "each file is sorted by trace_key"
            ranges.append((keys[0], keys[-1]))
        ranges.sort()
        assert all(a[1] < b[0] for a, b in itertools.pairwise(ranges)), "the ranges do not overlap"
        cursor = database.cursor()
        for trace in traces:
            found = read.trace(cursor, trace)
            assert found is not None
            assert found["span_count"] == 2
    finally:
        writer.stop()
        database.close()


def test_traces_sharing_a_trace_key_stay_apart_in_tables_and_in_parquet(tmp_path: Path) -> None:
    from lookout.query import read

    database, writer = open_store(tmp_path)
    try:
        now = time.time_ns()
        first, second = "a" * 15 + "0" * 17, "a" * 15 + "1" * 17  # one trace_key
        spans = [
            Span(trace, f"{i:016x}", "", "svc", "op", "server", start, start + 1000)
            for i, (trace, start) in enumerate(
                [(first, now), (second, now), (first, now - 3 * DAY_NS), (second, now - 3 * DAY_NS)]
            )
        ]
        writer.submit(Batch(spans=SpanColumns.of(spans))).result(10)
        assert writer.close_days_before(_day(now - DAY_NS)).result(10) == 2
        cursor = database.cursor()
        for trace in (first, second):
            found = read.trace(cursor, trace)
            assert found is not None
            assert {s["trace_id"] for s in found["spans"]} == {trace}
            assert found["span_count"] == 2, "one span from the table, one from Parquet"
    finally:
        writer.stop()
        database.close()
