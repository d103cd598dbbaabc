"""SQLAlchemy: statement spans and durations (sync and async), pool state, sanitising."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

import lookout.sdk
from lookout.sdk._sqlalchemy import MAX_STATEMENT, operation_of, sanitize
from tests.sdk.conftest import Instrument
from tests.support import wait_until


@pytest.mark.parametrize(
    ("statement", "expected"),
    [
        (
            "SELECT * FROM t WHERE msisdn = '0712345678' AND n = 42",
            "SELECT * FROM t WHERE msisdn = ? AND n = ?",
        ),
        ("insert into p values ('it''s', -3.5e2, x'ff')", "insert into p values (?, ?, ?)"),
        ("SELECT $tag$secret body$tag$, $1, :name, %(p)s", "SELECT ?, $1, :name, %(p)s"),
        (
            "select t1.c2 from t1 -- card 4111111111111111\n where id=7",
            "select t1.c2 from t1 where id=?",
        ),
        ("/* pin 1234 */ UPDATE s SET v = 1", "UPDATE s SET v = ?"),
    ],
)
def test_statements_lose_their_literals(statement: str, expected: str) -> None:
    assert sanitize(statement) == expected


def test_statement_text_is_at_most_one_kilobyte() -> None:
    long = "SELECT " + ", ".join(f"column_{i}" for i in range(500)) + " FROM t"
    assert len(sanitize(long).encode()) <= MAX_STATEMENT


@pytest.mark.parametrize(
    ("statement", "operation"),
    [("  select 1", "SELECT"), ("(SELECT 1)", "SELECT"), ("WITH x AS (SELECT 1) SELECT", "WITH"),
     ("-- hi\nINSERT INTO t", "INSERT"), ("frobnicate", "OTHER"), ("", "OTHER")],
)  # fmt: skip
def test_operation_is_the_first_keyword_from_a_bounded_set(statement: str, operation: str) -> None:
    assert operation_of(statement) == operation


def test_sync_engine_statements_are_client_spans_and_measured(instrument: Instrument) -> None:
    target = instrument(None)
    engine = lookout.sdk.instrument_sqlalchemy(create_engine("sqlite://"))
    with lookout.sdk.tracer().start_as_current_span("book seat") as parent:
        with engine.connect() as connection:
            connection.execute(text("SELECT 'KCA 123A', 42"))
    (span,) = [s for s in target.spans() if s.kind == SpanKind.CLIENT]
    assert span.parent is not None
    assert span.parent.span_id == parent.get_span_context().span_id
    assert span.name == "SELECT sqlite"
    assert dict(span.attributes or {}) == {
        "db.system.name": "sqlite",
        "db.operation.name": "SELECT",
        "db.query.text": "SELECT ?, ?",
    }
    assert (
        target.sample(
            "db_client_operation_duration_seconds_count",
            db_system_name="sqlite",
            db_operation_name="SELECT",
            error_type="",
        )
        == 1.0
    )


def test_a_failing_statement_is_an_error_span(instrument: Instrument) -> None:
    target = instrument(None)
    engine = lookout.sdk.instrument_sqlalchemy(create_engine("sqlite://"))
    with pytest.raises(Exception, match="no such table"), engine.connect() as connection:
        connection.execute(text("SELECT * FROM missing"))
    (span,) = target.spans()
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["error.type"] == "OperationalError"
    assert (
        target.sample(
            "db_client_operation_duration_seconds_count",
            db_system_name="sqlite",
            db_operation_name="SELECT",
            error_type="OperationalError",
        )
        == 1.0
    )


def test_instrumenting_twice_is_harmless(instrument: Instrument) -> None:
    target = instrument(None)
    engine = create_engine("sqlite://")
    lookout.sdk.instrument_sqlalchemy(engine)
    lookout.sdk.instrument_sqlalchemy(engine)
    with engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    assert len(target.spans()) == 1


def test_async_engine_on_postgresql(instrument: Instrument, postgres_url: str) -> None:
    target = instrument(None)
    url = postgres_url.replace("postgresql://", "postgresql+asyncpg://")

    async def run() -> None:
        engine = lookout.sdk.instrument_sqlalchemy(create_async_engine(url), pool_name="tickets")
        async with engine.connect() as connection:
            await connection.execute(text("SELECT pg_sleep(0.01), 'nbo-mba'"))
        await engine.dispose()

    asyncio.run(run())
    (span,) = [s for s in target.spans() if s.attributes and "db.query.text" in s.attributes]
    assert span.attributes is not None
    assert span.attributes["db.system.name"] == "postgresql"
    assert span.attributes["db.query.text"] == "SELECT pg_sleep(?), ?"
    assert span.attributes["db.namespace"] == postgres_url.rsplit("/", 1)[1]
    assert span.attributes["server.address"] == "127.0.0.1"
    assert (span.end_time or 0) - (span.start_time or 0) >= 10_000_000


def test_pool_exhaustion_shows_as_pending_requests(
    instrument: Instrument, postgres_url: str
) -> None:
    """pool_size=2, max_overflow=0 and 3 concurrent checkouts: one waits."""
    target = instrument(None)
    url = postgres_url.replace("postgresql://", "postgresql+psycopg://")
    engine = lookout.sdk.instrument_sqlalchemy(
        create_engine(url, pool_size=2, max_overflow=0, pool_timeout=30), pool_name="tickets"
    )
    release = threading.Event()
    held: list[Any] = []

    def hold() -> None:
        with engine.connect() as connection:
            held.append(connection)
            release.wait(30)

    holders = [threading.Thread(target=hold) for _ in range(3)]
    for thread in holders:
        thread.start()
    wait_until(lambda: len(held) == 2, 10, "two checked-out connections")
    wait_until(
        lambda: target.sample("db_client_connection_pending_requests", pool_name="tickets") == 1.0,
        10,
        "one pending checkout",
    )
    assert target.sample("db_client_connection_count", pool_name="tickets", state="used") == 2.0
    assert target.sample("db_client_connection_max", pool_name="tickets") == 2.0
    release.set()
    for thread in holders:
        thread.join(10)
    assert target.sample("db_client_connection_pending_requests", pool_name="tickets") == 0.0
    assert target.sample("db_client_connection_count", pool_name="tickets", state="idle") == 2.0
    assert target.sample("db_client_connection_wait_time_seconds_count", pool_name="tickets") == 3.0
    engine.dispose()


def test_instrumenting_before_init_warns_and_leaves_the_engine_alone() -> None:
    engine = create_engine("sqlite://")
    assert lookout.sdk.instrument_sqlalchemy(engine) is engine
    assert not getattr(engine, "_lookout_instrumented", False)
