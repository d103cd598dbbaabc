"""The Prometheus HTTP API (`/api/v1/...`) of `lookout server`, in Prometheus's own shapes and
error shape, so Grafana, promtool and Prometheus client libraries work against it unchanged.

Every route takes GET and form-encoded POST, the parameters from the query string and the
body together, as Prometheus reads them. PromQL runs on the engine (query/promql/engine.py)
over the store (query/promql/store.py) in a small pool of threads, `query_concurrency` at a
time: the event loop, and with it ingest, never waits for a query. Queries beyond the limit
queue; one whose `timeout` (at most `query_timeout`) runs out while queued or running gets
503 `timeout`. docs/promql.md documents every endpoint, parameter and error.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime
from typing import Any, TypeVar
from urllib.parse import parse_qsl

import duckdb
import numpy as np
import numpy.typing as npt
import orjson
import promql_parser as pp
import pyarrow as pa
import pyarrow.compute as pc
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

import lookout.sdk
from lookout.errors import PromQLError
from lookout.query.promql.engine import Engine
from lookout.query.promql.model import Floats, Matcher, QueryResult, ResultSeries
from lookout.query.promql.store import MAX_TIME_MS, MIN_TIME_MS, SampleCache, StoreStorage
from lookout.server.runtime import ServerRuntime

T = TypeVar("T")
# The Prometheus API version Lookout answers as in /status/buildinfo: clients such as
# Grafana pick features by it. Lookout's own version is in `revision`.
PROMETHEUS_VERSION = "3.0.0"
MAX_POINTS = 11_000
MAX_FORM_BYTES = 4 * 1024 * 1024
# A query still running this long after its deadline (a DuckDB statement that does not see
# the engine's cooperative check) is answered 503 anyway; its thread is interrupted.
OVERRUN_S = 0.25
_DURATION = re.compile(
    r"(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?" r"(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?"
)
_DURATION_MS = (365 * 86_400_000, 7 * 86_400_000, 86_400_000, 3_600_000, 60_000, 1000, 1)
_MATCH_OPS: dict[str, Any] = {
    "MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~",
}  # fmt: skip
# Go's RFC 3339 renderings of Prometheus's own minimum and maximum times, which clients
# send to mean "all of time".
_GO_MIN_TIME = "-292273086-05-16T16:47:06Z"
_GO_MAX_TIME = "292277025-08-18T07:12:54.999999999Z"


# -- formatting, as Prometheus writes numbers ------------------------------------------------
def format_value(value: float) -> str:
    """A sample value as Prometheus's JSON writes it (jsonutil.MarshalFloat): Go's shortest
    'f' formatting, 'e' below 1e-6 or from 1e21 on, and NaN, +Inf, -Inf."""
    if value != value:  # noqa: PLR0124 - NaN
        return "NaN"
    if value in (math.inf, -math.inf):
        return "+Inf" if value > 0 else "-Inf"
    text = repr(value)
    if "e" in text:
        size = abs(value)
        if size < 1e-6 or size >= 1e21:
            return text  # Python's shortest repr matches Go's 'e' -1 here: 1e-07, 1.5e+21
        return np.format_float_positional(value, unique=True, trim="-")
    return text[:-2] if text.endswith(".0") else text


def format_time(ms: int) -> str:
    """A timestamp as Prometheus writes it (jsonutil.MarshalTimestamp): seconds, with the
    milliseconds as three digits when there are any."""
    sign = "-" if ms < 0 else ""
    whole, fraction = divmod(abs(ms), 1000)
    return f"{sign}{whole}.{fraction:03d}" if fraction else f"{sign}{whole}"


def _labels_json(labels: dict[str, str]) -> str:
    return orjson.dumps(labels, option=orjson.OPT_SORT_KEYS).decode()


def _point(ms: int, value: float) -> str:
    return f'[{format_time(ms)},"{format_value(value)}"]'


def render_result(result: QueryResult, time_ms: int) -> str:
    """The `data` object of a query answer, as JSON text. Points are formatted and joined
    by Arrow's string kernels, not one Python object each: a 5,000-series hour at a 15 s
    step is 1.2 million of them."""
    kind = result.result_type
    if kind == "string":
        body = f"[{format_time(time_ms)},{orjson.dumps(result.text).decode()}]"
    elif kind == "scalar":
        ms, value = result.series[0].points[0] if result.series else (time_ms, math.nan)
        body = _point(ms, value)
    else:
        series = [s for s in result.series if len(s.ts)]
        points = _points(series)
        key = "value" if kind == "vector" else "values"
        wrap = ("", "") if kind == "vector" else ("[", "]")
        body = (
            "["
            + ",".join(
                f'{{"metric":{_labels_json(s.labels)},"{key}":{wrap[0]}{text}{wrap[1]}}}'
                for s, text in zip(series, points, strict=True)
            )
            + "]"
        )
    return f'{{"resultType":"{kind}","result":{body}}}'


def _points(series: list[ResultSeries]) -> list[str]:
    """Each series' points as `[t,"v"],[t,"v"]...`, formatted as Prometheus formats them."""
    if not series:
        return []
    ts = np.concatenate([s.ts for s in series]).astype(np.int64, copy=False)
    values = np.concatenate([s.values for s in series]).astype(np.float64, copy=False)
    joined = pc.binary_join_element_wise("[", _times_text(ts), ',"', _values_text(values), '"]', "")
    offsets = np.concatenate(([0], np.cumsum([len(s.ts) for s in series])))
    lists = pa.ListArray.from_arrays(pa.array(offsets, pa.int64()), joined)
    return pc.binary_join(lists, ",").to_pylist()  # type: ignore[no-any-return]


def _times_text(ts: npt.NDArray[np.int64]) -> Any:
    """format_time() of every timestamp, as an Arrow string array."""
    size = np.abs(ts)
    text = pc.cast(pa.array(size // 1000), pa.string())
    fraction = size % 1000
    if bool(fraction.any()):
        padded = pc.utf8_lpad(pc.cast(pa.array(fraction), pa.string()), 3, "0")
        dotted = pc.binary_join_element_wise(text, padded, ".")
        text = pc.if_else(pa.array(fraction != 0), dotted, text)
    if bool((ts < 0).any()):
        text = pc.if_else(pa.array(ts < 0), pc.binary_join_element_wise("-", text, ""), text)
    return text


def _values_text(values: Floats) -> Any:
    """format_value() of every value, as an Arrow string array. Arrow writes the shortest
    digits that read back the same, as Go does, in the same notation from 1e-6 to 1e21
    except for some large round numbers; those, exponents and NaN and infinities (the
    texts with an `e` or an `n` in them) are redone one by one."""
    text = pc.cast(pa.array(values), pa.string())
    odd = pc.or_(pc.match_substring(text, "e"), pc.match_substring(text, "n"))
    where = np.flatnonzero(odd.to_numpy(zero_copy_only=False))
    if len(where):
        fixed = pa.array([format_value(float(v)) for v in values[where].tolist()], pa.string())
        text = pc.replace_with_mask(text, odd, fixed)
    return text


def success(data: Any, warnings: Sequence[str] = (), infos: Sequence[str] = ()) -> Response:
    """Prometheus's success envelope; `data` is a value, or JSON text already rendered."""
    text = data if isinstance(data, str) else orjson.dumps(data).decode()
    extra = ""
    if warnings:
        extra += ',"warnings":' + orjson.dumps(list(warnings)).decode()
    if infos:
        extra += ',"infos":' + orjson.dumps(list(infos)).decode()
    return Response(f'{{"status":"success","data":{text}{extra}}}', media_type="application/json")


def failure(error: PromQLError) -> Response:
    """Prometheus's error envelope: errorType and the status that goes with it."""
    body = {"status": "error", "errorType": error.error_type, "error": str(error)}
    return Response(orjson.dumps(body), status_code=error.status, media_type="application/json")


# -- parameters ------------------------------------------------------------------------------
class Params:
    """A request's parameters: the form body's first, then the query string's, as Go's
    `r.Form` holds them."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:
        self.pairs = pairs

    def get(self, name: str) -> str | None:
        return next((value for key, value in self.pairs if key == name), None)

    def getlist(self, name: str) -> list[str]:
        return [value for key, value in self.pairs if key == name]


async def read_params(request: Request) -> Params:
    pairs: list[tuple[str, str]] = []
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if request.method == "POST" and content_type == "application/x-www-form-urlencoded":
        body = b""
        async for chunk in request.stream():
            body += chunk
            if len(body) > MAX_FORM_BYTES:
                raise PromQLError(
                    f"error parsing form values: the body is over {MAX_FORM_BYTES} bytes"
                )
        try:
            pairs = parse_qsl(body.decode(), keep_blank_values=True, strict_parsing=False)
        except (UnicodeDecodeError, ValueError) as exc:
            raise PromQLError(f"error parsing form values: {exc}") from None
    pairs.extend(request.query_params.multi_items())
    return Params(pairs)


def _invalid(name: str, problem: str) -> PromQLError:
    return PromQLError(f'invalid parameter "{name}": {problem}', "bad_data")


def parse_time(name: str, text: str) -> int:
    """Unix seconds (fractions to the millisecond) or RFC 3339, as Prometheus takes them; ms."""
    if text == _GO_MIN_TIME:
        return MIN_TIME_MS
    if text == _GO_MAX_TIME:
        return MAX_TIME_MS
    number: float | None
    try:
        number = float(text) if "_" not in text else None
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number):
            raise _invalid(name, f"cannot parse {text!r} to a valid timestamp")
        return max(MIN_TIME_MS, min(MAX_TIME_MS, round(number * 1000)))
    try:
        moment = datetime.fromisoformat(text.replace("z", "Z"))
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise _invalid(name, f"cannot parse {text!r} to a valid timestamp")
    return round(moment.timestamp() * 1000)


def parse_duration(name: str, text: str) -> int:
    """Seconds as a number (`15`, `0.5`) or a Prometheus duration (`1m30s`); ms."""
    try:
        number = float(text) if "_" not in text else None
    except ValueError:
        number = None
    if number is not None:
        if not math.isfinite(number) or abs(number) * 1000 > MAX_TIME_MS:
            raise _invalid(name, f"cannot parse {text!r} to a valid duration. It overflows int64")
        return round(number * 1000)
    match = _DURATION.fullmatch(text)
    if text == "0":
        return 0
    if not text or match is None or not any(match.groups()):
        raise _invalid(name, f"cannot parse {text!r} to a valid duration")
    return sum(
        int(part or 0) * unit for part, unit in zip(match.groups(), _DURATION_MS, strict=True)
    )


def _time_param(params: Params, name: str, default: int) -> int:
    text = params.get(name)
    return default if text is None or text == "" else parse_time(name, text)


def parse_matchers(texts: list[str], name: str = "match[]") -> list[list[Matcher]]:
    """Each series selector of `match[]` as its matchers; bad_data naming the parameter."""
    sets = []
    for text in texts:
        try:
            node = pp.parse(text)
        except ValueError as exc:
            raise _invalid(name, f"parse error: {exc}") from None
        except BaseException as exc:  # promql-parser's Rust panics arrive as BaseException
            if isinstance(exc, KeyboardInterrupt | SystemExit):
                raise
            raise _invalid(name, f"parse error: {exc}") from None
        if not isinstance(node, pp.VectorSelector):
            raise _invalid(name, f'{text!r} is not a series selector such as up{{job="api"}}')
        sets.extend(_selector_matchers(node, name))
    return sets


def _selector_matchers(node: Any, name: str) -> list[list[Matcher]]:
    """A selector's matchers; `{a="1" or b="2"}` is one set per alternative."""
    base = [Matcher("__name__", "=", node.name)] if node.name else []
    groups = node.matchers.or_matchers or [node.matchers.matchers]
    out = []
    for group in groups:
        try:
            found = [Matcher(m.name, _MATCH_OPS[str(m.op)], m.value) for m in group]
        except ValueError as exc:
            raise _invalid(name, str(exc)) from None
        out.append(base + found)
    return out


def selectors_of(query: str) -> list[list[Matcher]]:
    """The matchers of every selector in a PromQL expression (for query_exemplars)."""
    try:
        expr = pp.parse(query)
    except ValueError as exc:
        raise _invalid("query", f"parse error: {exc}") from None
    except BaseException as exc:  # a Rust panic in the parser
        if isinstance(exc, KeyboardInterrupt | SystemExit):
            raise
        raise _invalid("query", f"parse error: {exc}") from None
    found: list[list[Matcher]] = []

    def visit(node: Any) -> bool:
        if isinstance(node, pp.VectorSelector):
            found.extend(_selector_matchers(node, "query"))
        return True

    pp.walk(expr, visit)
    return found


def _limit(params: Params) -> int | None:
    text = params.get("limit")
    if text is None or text == "":
        return None
    try:
        limit = int(text)
    except ValueError:
        raise _invalid("limit", f"cannot parse {text!r} to a valid limit") from None
    if limit < 0:
        raise _invalid("limit", "limit must be non-negative")
    return limit or None


def _window(params: Params) -> tuple[int, int]:
    start = _time_param(params, "start", MIN_TIME_MS)
    end = _time_param(params, "end", MAX_TIME_MS)
    if end < start:
        raise _invalid("end", "end timestamp must not be before start time")
    return start, end


def _truncated(items: list[T], limit: int | None) -> tuple[list[T], list[str]]:
    if limit is not None and len(items) > limit:
        return items[:limit], ["results truncated due to limit"]
    return items, []


# -- the API ---------------------------------------------------------------------------------
class PromAPI:
    """The routes, the query slots and the thread pool of one server."""

    def __init__(self, runtime: ServerRuntime) -> None:
        self.runtime = runtime
        config = runtime.config
        self.concurrency = config.query_concurrency
        self.timeout_s = config.query_timeout
        self.lookback_ms = round(config.query_lookback * 1000)
        self.max_samples = config.query_max_samples
        self.cache_bytes = config.query_cache_size
        self._slots: asyncio.Semaphore | None = None
        self._pool: ThreadPoolExecutor | None = None
        self.queued = 0  # queries waiting for a slot, and evaluating: for tests and metrics
        self.running = 0

    def routes(self) -> list[Route]:
        both = ["GET", "POST"]
        table: list[tuple[str, Callable[[Request], Awaitable[Response]]]] = [
            ("/api/v1/query", self.query),
            ("/api/v1/query_range", self.query_range),
            ("/api/v1/query_exemplars", self.query_exemplars),
            ("/api/v1/series", self.series),
            ("/api/v1/labels", self.labels),
            ("/api/v1/label/{name}/values", self.label_values),
            ("/api/v1/metadata", self.metadata),
            ("/api/v1/status/buildinfo", self.buildinfo),
            ("/api/v1/status/tsdb", self.tsdb),
            ("/api/v1/rules", self.rules),
            ("/api/v1/alerts", self.alerts),
        ]
        return [Route(path, _answering(handler), methods=both) for path, handler in table]

    # -- running queries ---------------------------------------------------------------------
    def _cache(self) -> SampleCache:
        return SampleCache.of(self.runtime.database, self.cache_bytes)

    def _timeout(self, params: Params) -> float:
        text = params.get("timeout")
        if text is None or text == "":
            return self.timeout_s
        asked = parse_duration("timeout", text) / 1000
        if asked <= 0:
            raise _invalid("timeout", "timeout must be positive")
        return min(asked, self.timeout_s)

    async def evaluate(self, run: Callable[[Engine], QueryResult], timeout_s: float) -> QueryResult:
        """Run `run` on an engine in the query pool: wait for one of the slots (503 when the
        wait outlasts the timeout), then give the engine what is left of it."""
        loop = asyncio.get_running_loop()
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.concurrency)
            self._pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix="lookout-promql")
        assert self._pool is not None
        deadline = loop.time() + timeout_s
        self.queued += 1
        try:
            await asyncio.wait_for(self._slots.acquire(), timeout_s)
        except TimeoutError:
            raise PromQLError("query timed out in query queue", "timeout") from None
        finally:
            self.queued -= 1
        left = deadline - loop.time()
        storages: list[StoreStorage] = []

        def work() -> QueryResult:
            storage = StoreStorage(self.runtime.database, cache=self._cache())
            storages.append(storage)
            try:
                engine = Engine(
                    storage,
                    lookback_ms=self.lookback_ms,
                    max_samples=self.max_samples,
                    timeout_s=max(left, 0.001),
                )
                return run(engine)
            except duckdb.InterruptException:
                raise PromQLError("query timed out in expression evaluation", "timeout") from None
            finally:
                storage.close()

        self.running += 1
        future: Future[QueryResult] = self._pool.submit(_translated, work)
        slots = self._slots

        def done() -> None:  # the slot is freed when the thread is, not when we stop waiting
            self.running -= 1
            slots.release()

        def finished(_: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the server stopped
                loop.call_soon_threadsafe(done)

        future.add_done_callback(finished)
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), max(left, 0) + OVERRUN_S)
        except PromQLError as exc:
            if exc.error_type == "bad_data" and not str(exc).startswith("invalid parameter"):
                raise _invalid("query", str(exc)) from None  # as Prometheus words it
            raise
        except TimeoutError:
            for storage in storages:
                with contextlib.suppress(Exception):
                    storage.interrupt()
            raise PromQLError("query timed out in expression evaluation", "timeout") from None

    async def _lookup(self, work: Callable[[StoreStorage], T]) -> T:
        """A series lookup on a cursor of its own in Starlette's thread pool."""

        def run() -> T:
            with StoreStorage(self.runtime.database, cache=self._cache()) as storage:
                return work(storage)

        return await run_in_threadpool(_translated, run)

    # -- the routes --------------------------------------------------------------------------
    async def query(self, request: Request) -> Response:
        params = await read_params(request)
        time_ms = _time_param(params, "time", round(time.time() * 1000))
        timeout = self._timeout(params)
        text = params.get("query") or ""
        result = await self.evaluate(
            lambda engine: engine.instant(text, time_ms, timeout_s=timeout), timeout
        )
        return success(render_result(result, time_ms), result.warnings, result.infos)

    async def query_range(self, request: Request) -> Response:
        params = await read_params(request)
        start = parse_time("start", params.get("start") or "")
        end = parse_time("end", params.get("end") or "")
        if end < start:
            raise _invalid("end", "end timestamp must not be before start time")
        step = parse_duration("step", params.get("step") or "")
        if step <= 0:
            raise _invalid(
                "step",
                "zero or negative query resolution step widths are not accepted. "
                "Try a positive integer",
            )
        if (end - start) // step > MAX_POINTS:
            raise PromQLError(
                "exceeded maximum resolution of 11,000 points per timeseries. "
                "Try decreasing the query resolution (?step=XX)"
            )
        timeout = self._timeout(params)
        text = params.get("query") or ""
        result = await self.evaluate(
            lambda engine: engine.range(text, start, end, step, timeout_s=timeout), timeout
        )
        return success(render_result(result, start), result.warnings, result.infos)

    async def query_exemplars(self, request: Request) -> Response:
        params = await read_params(request)
        start, end = _window(params)
        sets = selectors_of(params.get("query") or "")
        found = await self._lookup(lambda storage: storage.exemplars(sets, start, end))
        data = [
            {
                "seriesLabels": item["seriesLabels"],
                "exemplars": [
                    {
                        "labels": e["labels"],
                        "value": format_value(e["value"]),
                        "timestamp": _number(format_time(e["ts_ms"])),
                    }
                    for e in item["exemplars"]
                ],
            }
            for item in found
        ]
        return success(data)

    async def series(self, request: Request) -> Response:
        params = await read_params(request)
        texts = params.getlist("match[]")
        if not texts:
            raise PromQLError("no match[] parameter provided")
        start, end = _window(params)
        sets = parse_matchers(texts)
        limit = _limit(params)
        found = await self._lookup(lambda storage: storage.series(sets, start, end))
        found, warnings = _truncated(found, limit)
        return success(found, warnings)

    async def labels(self, request: Request) -> Response:
        params = await read_params(request)
        start, end = _window(params)
        sets = parse_matchers(params.getlist("match[]"))
        limit = _limit(params)
        names = await self._lookup(lambda storage: storage.label_names(sets, start, end))
        names, warnings = _truncated(names, limit)
        return success(names, warnings)

    async def label_values(self, request: Request) -> Response:
        params = await read_params(request)
        name = request.path_params["name"]
        if not name:
            raise PromQLError(f"invalid label name: {name!r}")
        start, end = _window(params)
        sets = parse_matchers(params.getlist("match[]"))
        limit = _limit(params)
        values = await self._lookup(lambda storage: storage.label_values(name, sets, start, end))
        values, warnings = _truncated(values, limit)
        return success(values, warnings)

    async def metadata(self, request: Request) -> Response:
        params = await read_params(request)
        limit = _limit(params)
        per_metric = params.get("limit_per_metric")
        if per_metric not in (None, ""):
            try:
                int(per_metric)
            except ValueError:
                raise _invalid("limit_per_metric", "limit_per_metric must be a number") from None
        metric = params.get("metric") or None
        found = await self._lookup(lambda storage: storage.metadata(metric))
        if limit is not None:
            found = dict(list(found.items())[:limit])
        return success(found)

    async def buildinfo(self, request: Request) -> Response:
        await read_params(request)
        python = ".".join(str(part) for part in sys.version_info[:3])
        return success({
            "version": PROMETHEUS_VERSION,
            "revision": f"lookout {lookout.__version__}",
            "branch": "lookout",
            "buildUser": "lookout",
            "buildDate": "",
            "goVersion": f"python{python}",
        })  # fmt: skip

    async def tsdb(self, request: Request) -> Response:
        params = await read_params(request)
        limit = _limit(params) or 10
        return success(await self._lookup(lambda storage: storage.tsdb_status(limit)))

    async def rules(self, request: Request) -> Response:
        params = await read_params(request)
        kind = (params.get("type") or "").lower()
        if kind not in ("", "alert", "record"):
            raise _invalid("type", f"not supported value {kind!r}")
        return success({"groups": []})

    async def alerts(self, request: Request) -> Response:
        await read_params(request)
        return success({"alerts": []})


def _number(text: str) -> float | int:
    return float(text) if "." in text else int(text)


def _translated(work: Callable[[], T]) -> T:
    """Run `work`, turning what the engine and the store raise into PromQLError: what a
    client sent wrong is `bad_data`; everything else says what failed, never a bare 500."""
    try:
        return work()
    except PromQLError:
        raise
    except duckdb.InterruptException:
        raise PromQLError("query timed out in expression evaluation", "timeout") from None
    except (duckdb.OutOfMemoryException, MemoryError):
        raise PromQLError(
            "the query needs more memory than the store allows (store_memory_limit)", "execution"
        ) from None
    except duckdb.Error as exc:
        raise PromQLError(f"the store cannot answer now: {exc}", "unavailable") from None
    except Exception as exc:  # a bug: Prometheus answers its engine's panics the same way
        log = lookout.sdk.get_logger("lookout.server")
        log.exception("promql_failed", error=repr(exc))
        raise PromQLError(f"unexpected error: {exc!r}", "execution") from None


def _answering(
    handler: Callable[[Request], Awaitable[Response]],
) -> Callable[[Request], Awaitable[Response]]:
    """Answer a PromQLError in Prometheus's error shape."""

    async def route(request: Request) -> Response:
        try:
            return await handler(request)
        except PromQLError as exc:
            return failure(exc)

    return route
