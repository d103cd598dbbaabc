"""Records as columns (lookout.model): sealed columns, as a decoding worker sends them, store
and behave as the lists they were."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pyarrow as pa

from lookout.model import Batch, LogColumns, LogRecord, Span, SpanColumns
from lookout.selfmetrics import ServerMetrics
from lookout.store import Database, Writer

DAY_NS = 86400 * 10**9


def _logs(now: int, count: int, marker: str) -> LogColumns:
    return LogColumns.of(
        LogRecord(now - (i % 2) * DAY_NS, "svc", "info", 9, f"{marker} {i}", f"{i:032x}",
                  f"{i:016x}", {"n": i}, {"service.name": "svc"})
        for i in range(count)
    )  # fmt: skip


def test_sealed_columns_are_arrow_arrays_and_the_rest_stay_lists() -> None:
    logs = _logs(time.time_ns(), 4, "x")
    logs.seal()
    for name in LogColumns.SEALED:
        assert isinstance(getattr(logs, name), pa.ChunkedArray), name
    assert isinstance(logs.ts_ns, list)
    assert isinstance(logs.service, list)
    assert len(logs) == 4
    again = pickle.loads(pickle.dumps(logs))  # as it crosses from a worker
    assert again.body.to_pylist() == [f"x {i}" for i in range(4)]


def test_extend_and_take_mix_sealed_and_plain_columns() -> None:
    now = time.time_ns()
    plain, sealed = _logs(now, 3, "a"), _logs(now, 2, "b")
    sealed.seal()
    plain.extend(sealed)
    assert len(plain) == 5
    assert plain.body.to_pylist() == ["a 0", "a 1", "a 2", "b 0", "b 1"]
    assert plain.ts_ns == [now, now - DAY_NS, now, now, now - DAY_NS]
    picked = plain.take([4, 0])
    assert picked.body.to_pylist() == ["b 1", "a 0"]
    assert picked.service == ["svc", "svc"]
    empty = LogColumns()
    empty.extend(sealed)
    assert empty.body.to_pylist() == ["b 0", "b 1"]


def test_sealed_records_spanning_two_days_are_stored_as_plain_ones(tmp_path: Path) -> None:
    now = time.time_ns()
    spans = SpanColumns.of(
        Span(f"{i:032x}", f"{i:016x}", "", "svc", "op", "server", now - (i % 2) * DAY_NS,
             now - (i % 2) * DAY_NS + 1000, attributes={"i": i})
        for i in range(6)
    )  # fmt: skip
    logs = _logs(now, 6, "sealed")
    spans.seal()
    logs.seal()
    database = Database(tmp_path)
    writer = Writer(database, ServerMetrics())
    writer.start()
    try:
        assert writer.submit(Batch(spans=spans, logs=logs)).result(10) == 12
        connection = database.connection
        assert connection.execute(
            "SELECT count(*), count(DISTINCT attributes) FROM spans"
        ).fetchone() == (6, 6)
        stored = connection.execute("SELECT body, ts_ns FROM logs ORDER BY body").fetchall()
        assert stored == [(f"sealed {i}", now - (i % 2) * DAY_NS) for i in range(6)]
        assert len(database.partitions["logs"]) == 2  # two days
    finally:
        writer.stop()
        database.close()
