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

SCHEMA_VERSION = 2

# The columns of each partitioned signal, in table order.
DAY_TABLES: dict[str, str] = {
    "spans": """
        trace_id VARCHAR, span_id VARCHAR, parent_span_id VARCHAR, service VARCHAR,
        name VARCHAR, kind VARCHAR, start_ns BIGINT, end_ns BIGINT, duration_ns BIGINT,
        status_code VARCHAR, status_message VARCHAR, attributes JSON, events JSON,
        links JSON, resource JSON, scope VARCHAR, source VARCHAR, ingested_ns BIGINT
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


MIGRATIONS: dict[int, Callable[[duckdb.DuckDBPyConnection], None]] = {1: _v1, 2: _v2}
assert max(MIGRATIONS) == SCHEMA_VERSION
