"""The read API's queries: traces, logs, error issues and events, raw series, job runs.

Every function takes a DuckDB cursor of its own and plain parameters, and returns plain
data; the HTTP layer (server/api.py) only parses requests and shapes answers. Values always
go through bound parameters.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import dataclass
from typing import Any

import duckdb

from lookout.errors import QueryError
from lookout.store.schema import trace_key

MAX_LIMIT = 1000
_SELECTOR = re.compile(r"^\s*([a-zA-Z_:][a-zA-Z0-9_:]*)?\s*(?:\{(.*)\})?\s*$", re.S)
_MATCHER = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def _loads(text: Any) -> Any:
    return json.loads(text) if isinstance(text, str) else text


@dataclass(frozen=True)
class TimeRange:
    start_ns: int
    end_ns: int


def _rows(cursor: duckdb.DuckDBPyConnection, sql: str, params: list[Any]) -> list[dict[str, Any]]:
    result = cursor.execute(sql, params)
    names = [d[0] for d in result.description or []]
    return [dict(zip(names, row, strict=True)) for row in result.fetchall()]


# -- traces ---------------------------------------------------------------------------------
def _span_out(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "trace_id": row["trace_id"],
        "span_id": row["span_id"],
        "parent_span_id": row["parent_span_id"] or None,
        "service": row["service"],
        "name": row["name"],
        "kind": row["kind"],
        "start_ns": row["start_ns"],
        "end_ns": row["end_ns"],
        "duration_ms": row["duration_ns"] / 1e6,
        "status": {"code": row["status_code"], "message": row["status_message"]},
        "attributes": _loads(row["attributes"]),
        "events": _loads(row["events"]),
        "links": _loads(row["links"]),
        "resource": _loads(row["resource"]),
        "source": row["source"],
    }


def trace(cursor: duckdb.DuckDBPyConnection, trace_id: str) -> dict[str, Any] | None:
    # By trace_key alone: a fixed-width compare (and, in closed days' Parquet files sorted
    # by it, a skip of every other row group); the rare other trace sharing the key is
    # filtered out here. Files written before trace_key existed hold NULL there: their
    # rows are matched by the text. One scan, not a UNION ALL of two: each scan pays for
    # every row group of every Parquet file, even one its statistics skip (at 10 M spans,
    # the two took 53 ms where the one takes 37).
    rows = _rows(
        cursor,
        "SELECT * EXCLUDE (trace_key) FROM spans "
        "WHERE trace_key = ? OR (trace_key IS NULL AND trace_id = ?)",
        [trace_key(trace_id), trace_id],
    )
    rows = sorted(
        (r for r in rows if r["trace_id"] == trace_id), key=lambda r: (r["start_ns"], r["span_id"])
    )
    if not rows:
        return None
    spans = [_span_out(r) for r in rows]
    start = min(s["start_ns"] for s in spans)
    end = max(s["end_ns"] for s in spans)
    return {
        "trace_id": trace_id,
        "start_ns": start,
        "duration_ms": (end - start) / 1e6,
        "services": sorted({s["service"] for s in spans}),
        "span_count": len(spans),
        "error": any(s["status"]["code"] == "error" for s in spans),
        "spans": spans,
    }


def search_traces(
    cursor: duckdb.DuckDBPyConnection,
    window: TimeRange,
    *,
    service: str | None = None,
    name: str | None = None,
    status: str | None = None,
    min_duration_ms: float | None = None,
    max_duration_ms: float | None = None,
    attributes: dict[str, str] | None = None,
    limit: int = 20,
) -> list[dict[str, Any]]:
    """Traces with at least one span matching every filter, newest first."""
    where = ["start_ns BETWEEN ? AND ?"]
    params: list[Any] = [window.start_ns, window.end_ns]
    for column, value in (("service", service), ("name", name), ("status_code", status)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if min_duration_ms is not None:
        where.append("duration_ns >= ?")
        params.append(int(min_duration_ms * 1e6))
    if max_duration_ms is not None:
        where.append("duration_ns <= ?")
        params.append(int(max_duration_ms * 1e6))
    for key, value in (attributes or {}).items():
        where.append("json_extract_string(attributes, ?) = ?")
        params.extend([f"$.{json.dumps(key)}", value])
    params.append(limit)
    matched = f"""
        SELECT trace_id, max(start_ns) AS latest FROM spans WHERE {" AND ".join(where)}
        GROUP BY trace_id ORDER BY latest DESC LIMIT ?"""  # noqa: S608 - columns are ours
    sql = f"""
        WITH matched AS ({matched})
        SELECT s.trace_id, min(s.start_ns) AS start_ns, max(s.end_ns) AS end_ns,
               count(*) AS span_count, bool_or(s.status_code = 'error') AS error,
               arg_min(s.service, s.start_ns) AS root_service,
               arg_min(s.name, s.start_ns) AS root_name, list(DISTINCT s.service) AS services
        FROM spans s JOIN matched m USING (trace_id)
        GROUP BY s.trace_id ORDER BY max(m.latest) DESC"""  # noqa: S608
    return [
        {
            "trace_id": r["trace_id"],
            "start_ns": r["start_ns"],
            "duration_ms": (r["end_ns"] - r["start_ns"]) / 1e6,
            "span_count": r["span_count"],
            "error": r["error"],
            "root_service": r["root_service"],
            "root_name": r["root_name"],
            "services": sorted(r["services"]),
        }
        for r in _rows(cursor, sql, params)
    ]


# -- logs -----------------------------------------------------------------------------------
def encode_cursor(ts_ns: int, seen_at_ts: int) -> str:
    return base64.urlsafe_b64encode(f"{ts_ns}:{seen_at_ts}".encode()).decode()


def decode_cursor(cursor: str) -> tuple[int, int]:
    try:
        ts, seen = base64.urlsafe_b64decode(cursor.encode()).decode().split(":")
        position = int(ts), int(seen)
    except (ValueError, UnicodeDecodeError) as exc:
        raise QueryError(f"cursor {cursor!r} is not one this API gave out") from exc
    if position[1] < 0:
        raise QueryError(f"cursor {cursor!r} is not one this API gave out")
    return position


def search_logs(
    cursor: duckdb.DuckDBPyConnection,
    window: TimeRange,
    *,
    service: str | None = None,
    level: str | None = None,
    trace_id: str | None = None,
    text: str | None = None,
    attributes: dict[str, str] | None = None,
    limit: int = 100,
    page: str | None = None,
) -> dict[str, Any]:
    """Log records newest first, with a cursor for the next page."""
    where = ["ts_ns BETWEEN ? AND ?"]
    params: list[Any] = [window.start_ns, window.end_ns]
    for column, value in (("service", service), ("level", level), ("trace_id", trace_id)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if text:
        # DuckDB's LIKE has no escape character unless one is named.
        where.append(
            "(body ILIKE ? ESCAPE '\\' OR CAST(attributes AS VARCHAR) ILIKE ? ESCAPE '\\')"
        )
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        params.extend([pattern, pattern])
    for key, value in (attributes or {}).items():
        where.append("json_extract_string(attributes, ?) = ?")
        params.extend([f"$.{json.dumps(key)}", value])
    skip = 0
    if page:
        before, skip = decode_cursor(page)
        where.append("ts_ns <= ?")
        params.append(before)
    sql = f"""SELECT * FROM logs WHERE {" AND ".join(where)}
        ORDER BY ts_ns DESC, ingested_ns DESC, body, span_id LIMIT ? OFFSET ?"""  # noqa: S608
    rows = _rows(cursor, sql, [*params, limit + 1, skip])
    more = len(rows) > limit
    rows = rows[:limit]
    records = [
        {
            "ts_ns": r["ts_ns"],
            "service": r["service"],
            "level": r["level"],
            "body": r["body"],
            "trace_id": r["trace_id"] or None,
            "span_id": r["span_id"] or None,
            "attributes": _loads(r["attributes"]),
            "resource": _loads(r["resource"]),
        }
        for r in rows
    ]
    next_cursor = None
    if more and records:
        last_ts = records[-1]["ts_ns"]
        same = sum(1 for r in records if r["ts_ns"] == last_ts)
        already = skip if page and last_ts == decode_cursor(page)[0] else 0
        next_cursor = encode_cursor(last_ts, same + already)
    return {"logs": records, "next_cursor": next_cursor}


# -- errors ---------------------------------------------------------------------------------
def issues(
    cursor: duckdb.DuckDBPyConnection,
    window: TimeRange,
    *,
    project_id: int | None = None,
    service: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    where = ["e.ts_ns BETWEEN ? AND ?"]
    params: list[Any] = [window.start_ns, window.end_ns]
    if project_id is not None:
        where.append("e.project_id = ?")
        params.append(project_id)
    if service is not None:
        where.append("e.service = ?")
        params.append(service)
    sql = f"""
        SELECT i.issue_id, i.project_id, i.title, i.exception_type, i.first_seen_ns,
               max(e.ts_ns) AS last_seen_ns, count(*) AS events,
               arg_max(e.trace_id, e.ts_ns) AS last_trace_id,
               list(DISTINCT e.service) AS services
        FROM events e JOIN issues i USING (issue_id)
        WHERE {" AND ".join(where)}
        GROUP BY ALL ORDER BY last_seen_ns DESC LIMIT ?"""  # noqa: S608
    rows = _rows(cursor, sql, [*params, limit])
    for row in rows:
        row["services"] = sorted(s for s in row["services"] if s)
        row["last_trace_id"] = row["last_trace_id"] or None
    return rows


def events(
    cursor: duckdb.DuckDBPyConnection,
    *,
    issue_id: str | None = None,
    trace_id: str | None = None,
    limit: int = 50,
) -> list[dict[str, Any]]:
    where, params = [], []
    if issue_id is not None:
        where.append("issue_id = ?")
        params.append(issue_id)
    if trace_id is not None:
        where.append("trace_id = ?")
        params.append(trace_id)
    if not where:
        raise QueryError("give issue_id or trace_id")
    sql = f"SELECT * FROM events WHERE {' AND '.join(where)} ORDER BY ts_ns DESC LIMIT ?"  # noqa: S608
    return [
        {
            "event_id": r["event_id"],
            "issue_id": r["issue_id"],
            "project_id": r["project_id"],
            "ts_ns": r["ts_ns"],
            "title": r["title"],
            "exception_type": r["exception_type"],
            "message": r["message"],
            "level": r["level"],
            "service": r["service"],
            "environment": r["environment"],
            "release": r["release"],
            "trace_id": r["trace_id"] or None,
            "span_id": r["span_id"] or None,
            "user": _loads(r["user_info"]),
            "tags": _loads(r["tags"]),
            "payload": _loads(r["payload"]),
        }
        for r in _rows(cursor, sql, [*params, limit])
    ]


# -- raw series -----------------------------------------------------------------------------
def parse_selector(text: str) -> list[tuple[str, str, str]]:
    """`name{label="v", other=~"re"}` as (label, op, value) matchers."""
    match = _SELECTOR.match(text or "")
    if not match or not (match[1] or match[2]):
        raise QueryError(f'match {text!r} is not a series selector such as up{{job="api"}}')
    matchers = []
    if match[1]:
        matchers.append(("__name__", "=", match[1]))
    body = (match[2] or "").strip()
    position = 0
    while position < len(body):
        found = _MATCHER.match(body, position)
        if not found:
            raise QueryError(f"cannot read the label matchers in {text!r} at {body[position:]!r}")
        value = re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m[1], m[1]), found[3])
        matchers.append((found[1], found[2], value))
        position = found.end()
    for _, op, value in matchers:
        if op in ("=~", "!~"):
            try:
                re.compile(value)
            except re.error as exc:
                raise QueryError(f"bad regular expression {value!r}: {exc}") from exc
    return matchers


def _matches(labels: dict[str, str], matchers: list[tuple[str, str, str]]) -> bool:
    for name, op, value in matchers:
        actual = labels.get(name, "")
        if op == "=" and actual != value:
            return False
        if op == "!=" and actual == value:
            return False
        if op == "=~" and not re.fullmatch(value, actual):
            return False
        if op == "!~" and re.fullmatch(value, actual):
            return False
    return True


def series(
    cursor: duckdb.DuckDBPyConnection, selector: str, window: TimeRange, limit: int = 100
) -> list[dict[str, Any]]:
    """Series matching the selector, each with its samples in the window."""
    matchers = parse_selector(selector)
    names = [v for n, op, v in matchers if n == "__name__" and op == "="]
    sql, params = "SELECT series_id, labels FROM series", []
    if names:
        sql += " WHERE name = ?"
        params.append(names[0])
    chosen = []
    for row in cursor.execute(sql, params).fetchall():
        labels = _loads(row[1])
        if _matches(labels, matchers):
            chosen.append((int(row[0]), labels))
        if len(chosen) >= limit:
            break
    out = []
    for sid, labels in chosen:
        samples = cursor.execute(
            """SELECT ts_ms, value, exemplar FROM samples
               WHERE series_id = ? AND ts_ms BETWEEN ? AND ? ORDER BY ts_ms""",
            [sid, window.start_ns // 1_000_000, window.end_ns // 1_000_000],
        ).fetchall()
        out.append(
            {
                "labels": labels,
                "samples": [
                    {"ts_ms": ts, "value": value, "exemplar": _loads(exemplar)}
                    for ts, value, exemplar in samples
                ],
            }
        )
    return out


# -- job runs -------------------------------------------------------------------------------
def job_runs(
    cursor: duckdb.DuckDBPyConnection,
    window: TimeRange,
    *,
    monitor: str | None = None,
    status: str | None = None,
    limit: int = 100,
) -> list[dict[str, Any]]:
    where = ["ts_ns BETWEEN ? AND ?"]
    params: list[Any] = [window.start_ns, window.end_ns]
    for column, value in (("monitor", monitor), ("status", status)):
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    sql = f"""SELECT check_in_id, monitor, status, ts_ns, duration_s, environment, project_id,
              trace_id FROM job_runs WHERE {" AND ".join(where)} ORDER BY ts_ns DESC LIMIT ?"""  # noqa: S608
    rows = _rows(cursor, sql, [*params, limit])
    for row in rows:
        row["trace_id"] = row["trace_id"] or None
    return rows
