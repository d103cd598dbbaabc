"""The store's schema: versioned migrations, and the per-day tables of each signal.

Hot tables carry no index, primary key or unique constraint: those are what make DuckDB's
WAL replay fail after a crash. Records are found by partition (signal and day) and by the
insertion order that keeps `ingested_ns` zone maps tight; duplicates are kept out by the
writer (see writer.py), not by constraints.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import duckdb

SCHEMA_VERSION = 4

# The columns of each partitioned signal, in table order.
DAY_TABLES: dict[str, str] = {
    "spans": """
        trace_id VARCHAR, span_id VARCHAR, parent_span_id VARCHAR, service VARCHAR,
        name VARCHAR, kind VARCHAR, start_ns BIGINT, end_ns BIGINT, duration_ns BIGINT,
        status_code VARCHAR, status_message VARCHAR, attributes JSON, events JSON,
        links JSON, resource JSON, scope VARCHAR, source VARCHAR, ingested_ns BIGINT,
        trace_key BIGINT
    """,
    "logs": """
        ts_ns BIGINT, observed_ns BIGINT, service VARCHAR, level VARCHAR,
        severity_number INTEGER, body VARCHAR, trace_id VARCHAR, span_id VARCHAR,
        attributes JSON, resource JSON, source VARCHAR, ingested_ns BIGINT
    """,
    "samples": """
        series_id UBIGINT, ts_ms BIGINT, value DOUBLE, exemplar JSON, ingested_ns BIGINT
    """,
    "events": """
        event_id VARCHAR, project_id INTEGER, issue_id VARCHAR, ts_ns BIGINT,
        fingerprint VARCHAR, title VARCHAR, exception_type VARCHAR, message VARCHAR,
        level VARCHAR, service VARCHAR, environment VARCHAR, release VARCHAR,
        trace_id VARCHAR, span_id VARCHAR, user_info JSON, tags JSON, payload JSON,
        ingested_ns BIGINT
    """,
    "job_runs": """
        check_in_id VARCHAR, monitor VARCHAR, status VARCHAR, ts_ns BIGINT,
        duration_s DOUBLE, environment VARCHAR, project_id INTEGER, trace_id VARCHAR,
        ingested_ns BIGINT
    """,
}


def column_names(signal: str) -> list[str]:
    """The column names of a signal's day table, in order."""
    return [part.split()[0] for part in DAY_TABLES[signal].split(",")]


def column_types(signal: str) -> list[str]:
    """The SQL type of each column of a signal's day table, in order."""
    return [part.split()[1] for part in DAY_TABLES[signal].split(",")]


# Which timestamp column decides a record's day partition.
DAY_COLUMN = {
    "spans": "start_ns",
    "logs": "ts_ns",
    "samples": "ts_ms",
    "events": "ts_ns",
    "job_runs": "ts_ns",
}


def day_of(signal: str, value: int) -> str:
    """The partition suffix (`20261127`) for a record's timestamp."""
    seconds = value / 1000 if signal == "samples" else value / 1e9
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y%m%d")


def days_of(signal: str, values: list[int]) -> list[str]:
    """day_of() of each timestamp, worked out once per minute of them (once in all, in
    the common case of a batch within one day)."""
    if not values:
        return []
    first = day_of(signal, min(values))
    if first == day_of(signal, max(values)):
        return [first] * len(values)
    per_minute = 60_000 if signal == "samples" else 60_000_000_000
    found: dict[int, str] = {}
    days = []
    for value in values:
        minute = value // per_minute
        day = found.get(minute)
        if day is None:
            day = found[minute] = day_of(signal, value)
        days.append(day)
    return days


def day_table(signal: str, day: str) -> str:
    return f"{signal}_d{day}"


def _v1(connection: duckdb.DuckDBPyConnection) -> None:
    connection.execute(
        "CREATE TABLE series (series_id UBIGINT, name VARCHAR, labels JSON, first_seen_ns BIGINT)"
    )
    connection.execute(
        """CREATE TABLE issues (issue_id VARCHAR, project_id INTEGER, fingerprint VARCHAR,
        title VARCHAR, exception_type VARCHAR, first_seen_ns BIGINT)"""
    )
    connection.execute("CREATE TABLE partitions (signal VARCHAR, day VARCHAR, table_name VARCHAR)")


def _v2(connection: duckdb.DuckDBPyConnection) -> None:
    """Closed days move to Parquet files; this table lists them."""
    connection.execute(
        """CREATE TABLE partition_files (signal VARCHAR, day VARCHAR, path VARCHAR,
        rows BIGINT, created_ns BIGINT)"""
    )


def _v3(connection: duckdb.DuckDBPyConnection) -> None:
    """Each write transaction appends its number, so startup can tell that the WAL lost
    acknowledged commits (store/recovery.py). Pruned to the last number hourly."""
    connection.execute("CREATE TABLE store_commits (seq UBIGINT)")


def trace_key(trace_id: str) -> int:
    """The first 15 hex digits of a trace id as a BIGINT: a trace-by-id lookup compares
    this fixed-width column first (several times faster than the 32-character text)."""
    return int(trace_id[:15], 16)


_TRACE_KEY_SQL = "CAST(('0x' || substr(trace_id, 1, 15)) AS BIGINT)"


def _v4(connection: duckdb.DuckDBPyConnection) -> None:
    """Spans get `trace_key` (see trace_key()); existing day tables are filled in. Closed
    days' Parquet files lack it and read as NULL, which the lookup allows for."""
    rows = connection.execute("SELECT table_name FROM partitions WHERE signal = 'spans'").fetchall()
    tables = [name for (name,) in rows]
    empty = connection.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE table_name = 'spans_empty'"
    ).fetchone()
    if empty and empty[0]:
        tables.append("spans_empty")
    for table in tables:  # names from our own bookkeeping, not input
        connection.execute(f"ALTER TABLE {table} ADD COLUMN trace_key BIGINT")
        connection.execute(f"UPDATE {table} SET trace_key = {_TRACE_KEY_SQL}")


MIGRATIONS: dict[int, Callable[[duckdb.DuckDBPyConnection], None]] = {
    1: _v1, 2: _v2, 3: _v3, 4: _v4,
}  # fmt: skip
assert max(MIGRATIONS) == SCHEMA_VERSION
