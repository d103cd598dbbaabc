"""Where Lookout's time goes on the benchmark's queries: the server's own objects in this
process (Database, SampleCache, StoreStorage, Engine, the API's JSON rendering), on a copy of
the data directory no server holds.

Each query runs once cold (an empty sample cache, as after a restart: the hour blocks are
read from Parquet), then `runs` times warm. Its time splits into:

- fetch: StoreStorage.select (the series index, the hour blocks, slicing out the window);
- evaluate: the rest of Engine.range (functions, aggregations, operators);
- render: the API's JSON text (prom_api.render_result).

The slowest query is also run under cProfile: its top functions by own time.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import statistics
import time
from pathlib import Path
from typing import Any


class _Timed:
    """A Storage that times the select calls of the one it wraps."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0
        self.series = 0
        self.samples = 0

    def select(self, matchers: Any, mint_ms: int, maxt_ms: int) -> Any:
        began = time.perf_counter()
        found = self.inner.select(matchers, mint_ms, maxt_ms)
        self.seconds += time.perf_counter() - began
        self.calls += 1
        self.series += len(found)
        self.samples += sum(len(s.ts) for s in found)
        return found

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def _run(cache: Any, database: Any, query: str, span_ms: tuple[int, int, int]) -> dict[str, float]:
    from lookout.query.promql.engine import Engine
    from lookout.query.promql.store import StoreStorage
    from lookout.server.prom_api import render_result

    with StoreStorage(database, cache=cache) as storage:
        timed = _Timed(storage)
        began = time.perf_counter()
        result = Engine(timed).range(query, *span_ms)
        evaluated = time.perf_counter()
        render_result(result, span_ms[1])
        rendered = time.perf_counter()
    total = evaluated - began
    return {
        "fetch_ms": timed.seconds * 1000,
        "evaluate_ms": (total - timed.seconds) * 1000,
        "render_ms": (rendered - evaluated) * 1000,
        "total_ms": (rendered - began) * 1000,
        "selects": timed.calls,
        "series_fetched": timed.series,
        "samples_fetched": timed.samples,
    }


def profile(
    data_dir: Path, queries: list[tuple[str, str]], span_ms: tuple[int, int, int], runs: int = 3,
    top: int = 15,
) -> dict[str, Any]:  # fmt: skip
    from lookout.query.promql.store import SampleCache
    from lookout.store import Database

    database = Database(data_dir)
    try:
        cache = SampleCache.of(database)
        split: dict[str, Any] = {}
        for name, query in queries:
            try:
                cold = _run(cache, database, query, span_ms)
                warm = [_run(cache, database, query, span_ms) for _ in range(runs)]
            except Exception as exc:  # an engine in progress: reported, not raised
                split[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                continue
            entry = {key: round(statistics.median(w[key] for w in warm), 2)
                     for key in ("fetch_ms", "evaluate_ms", "render_ms", "total_ms")}  # fmt: skip
            entry["cold_total_ms"] = round(cold["total_ms"], 2)
            entry["cold_fetch_ms"] = round(cold["fetch_ms"], 2)
            for key in ("selects", "series_fetched", "samples_fetched"):
                entry[key] = warm[-1][key]
            split[name] = entry
        timed = {name: entry for name, entry in split.items() if "error" not in entry}
        if not timed:
            return {"split": split}
        slowest = max(timed, key=lambda n: timed[n]["total_ms"])
        query = dict(queries)[slowest]
        profiler = cProfile.Profile()
        profiler.enable()
        _run(cache, database, query, span_ms)
        profiler.disable()
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text)
        stats.sort_stats("tottime").print_stats(top)
        lines = [line.rstrip() for line in text.getvalue().splitlines()]
        header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
        functions = [line for line in lines[header:] if line.strip()][: top + 1]
    finally:
        database.close()
    return {
        "how": f"in process, the server's objects; median of {runs} warm runs after a cold one",
        "split": split,
        "sum_warm_total_ms": round(sum(e["total_ms"] for e in timed.values()), 2),
        "sum_warm_fetch_ms": round(sum(e["fetch_ms"] for e in timed.values()), 2),
        "sum_warm_evaluate_ms": round(sum(e["evaluate_ms"] for e in timed.values()), 2),
        "sum_warm_render_ms": round(sum(e["render_ms"] for e in timed.values()), 2),
        "slowest": slowest,
        "slowest_top_functions_by_own_time": functions,
    }
