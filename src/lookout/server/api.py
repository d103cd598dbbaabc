"""The read API, JSON under /api/lookout/: what the UI, PromQL, diagnosis and tests read
through. docs/server.md documents every route and parameter."""

from __future__ import annotations

import re
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import duckdb
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from lookout.errors import QueryError
from lookout.query import read
from lookout.server.errors import FiniteJSONResponse, error_response
from lookout.server.runtime import ServerRuntime

DEFAULT_WINDOW_S = 3600
_HEX32 = re.compile(r"[0-9a-f]{32}")


def _time_ns(name: str, text: str | None, default: int) -> int:
    """RFC 3339 or Unix seconds, as Prometheus takes them."""
    if text is None or text == "":
        return default
    try:
        number = float(text)
    except ValueError:
        number = None
    if number is not None:
        if not -1e11 < number < 1e11:  # also refuses nan and inf
            raise QueryError(f"{name}={text!r} is not a time in range")
        return int(number * 1e9)
    try:
        return int(datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp() * 1e9)
    except ValueError:
        raise QueryError(f"{name}={text!r} is not a time; give RFC 3339 or Unix seconds") from None


def _window(request: Request) -> read.TimeRange:
    now = time.time_ns()
    end = _time_ns("end", request.query_params.get("end"), now)
    start = _time_ns("start", request.query_params.get("start"), end - DEFAULT_WINDOW_S * 10**9)
    if start > end:
        raise QueryError("start is after end")
    return read.TimeRange(start, end)


def _limit(request: Request, default: int) -> int:
    text = request.query_params.get("limit")
    if text is None:
        return default
    try:
        limit = int(text)
    except ValueError:
        raise QueryError(f"limit={text!r} is not a whole number") from None
    if not 1 <= limit <= read.MAX_LIMIT:
        raise QueryError(f"limit must be from 1 to {read.MAX_LIMIT}")
    return limit


def _number(request: Request, name: str) -> float | None:
    text = request.query_params.get(name)
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        raise QueryError(f"{name}={text!r} is not a number") from None
    if not -1e15 < number < 1e15:  # also refuses nan and inf
        raise QueryError(f"{name}={text!r} is not a finite number in range")
    return number


def _attributes(request: Request) -> dict[str, str]:
    """Repeated `attr=key=value` parameters."""
    out = {}
    for item in request.query_params.getlist("attr"):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise QueryError(f"attr={item!r} should read key=value")
        out[key] = value
    return out


def _trace_id(text: str | None) -> str | None:
    if text is None:
        return None
    lowered = text.lower()
    if not _HEX32.fullmatch(lowered):
        raise QueryError(f"trace_id {text!r} is not 32 hex digits")
    return lowered


Handler = Callable[[Request, Any], Any]


def endpoint(handler: Handler) -> Callable[[Request], Awaitable[Response]]:
    """Run a query handler on a cursor of its own in the thread pool; shape errors."""

    async def route(request: Request) -> Response:
        runtime: ServerRuntime = request.app.state.runtime

        def run() -> Any:
            cursor = runtime.database.cursor()
            try:
                return handler(request, cursor)
            finally:
                cursor.close()

        try:
            result = await run_in_threadpool(run)
        except QueryError as exc:
            code = "bad_request" if exc.status == 400 else "not_found"
            return error_response(exc.status, code, str(exc))
        except (ValueError, OverflowError, duckdb.Error) as exc:
            return error_response(400, "bad_request", f"The query cannot run: {exc}"[:500])
        if isinstance(result, Response):
            return result
        return FiniteJSONResponse(result)

    return route


@endpoint
def get_trace(request: Request, cursor: Any) -> Any:
    trace_id = _trace_id(request.path_params["trace_id"])
    assert trace_id is not None
    found = read.trace(cursor, trace_id)
    if found is None:
        raise QueryError(f"no trace {trace_id}", status=404)
    return found


@endpoint
def search_traces(request: Request, cursor: Any) -> Any:
    params = request.query_params
    status = params.get("status")
    if status is not None and status not in ("ok", "error", "unset"):
        raise QueryError("status must be ok, error or unset")
    return {
        "traces": read.search_traces(
            cursor,
            _window(request),
            service=params.get("service"),
            name=params.get("name"),
            status=status,
            min_duration_ms=_number(request, "min_duration_ms"),
            max_duration_ms=_number(request, "max_duration_ms"),
            attributes=_attributes(request),
            limit=_limit(request, 20),
        )
    }


@endpoint
def search_logs(request: Request, cursor: Any) -> Any:
    params = request.query_params
    runtime: ServerRuntime = request.app.state.runtime
    text = params.get("q")
    phone = params.get("phone")
    if phone:
        # Stored lines hold the SDK's keyed hash of a number, never the number.
        text = runtime.scrubber.hash_msisdn(phone)
    elif text:
        text = runtime.scrubber.scrub_text(text)
    return read.search_logs(
        cursor,
        _window(request),
        service=params.get("service"),
        level=params.get("level"),
        trace_id=_trace_id(params.get("trace_id")),
        text=text,
        attributes=_attributes(request),
        limit=_limit(request, 100),
        page=params.get("cursor"),
    )


@endpoint
def list_issues(request: Request, cursor: Any) -> Any:
    project = request.query_params.get("project")
    try:
        project_id = int(project) if project is not None else None
    except ValueError:
        raise QueryError(f"project={project!r} is not a project id") from None
    return {
        "issues": read.issues(
            cursor,
            _window(request),
            project_id=project_id,
            service=request.query_params.get("service"),
            limit=_limit(request, 50),
        )
    }


@endpoint
def issue_events(request: Request, cursor: Any) -> Any:
    found = read.events(cursor, issue_id=request.path_params["issue_id"], limit=_limit(request, 50))
    if not found:
        raise QueryError(f"no issue {request.path_params['issue_id']}", status=404)
    return {"issue_id": request.path_params["issue_id"], "events": found}


@endpoint
def list_events(request: Request, cursor: Any) -> Any:
    return {
        "events": read.events(
            cursor,
            issue_id=request.query_params.get("issue_id"),
            trace_id=_trace_id(request.query_params.get("trace_id")),
            limit=_limit(request, 50),
        )
    }


@endpoint
def raw_series(request: Request, cursor: Any) -> Any:
    selector = request.query_params.get("match")
    if not selector:
        raise QueryError('give match=<selector>, such as match=up{job="api"}')
    return {"series": read.series(cursor, selector, _window(request), _limit(request, 100))}


@endpoint
def list_job_runs(request: Request, cursor: Any) -> Any:
    return {
        "job_runs": read.job_runs(
            cursor,
            _window(request),
            monitor=request.query_params.get("monitor"),
            status=request.query_params.get("status"),
            limit=_limit(request, 100),
        )
    }
