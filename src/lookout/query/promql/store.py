"""The PromQL engine's Storage over the DuckDB store, and the series lookups of the
Prometheus API (series, label names and values, metadata, TSDB status, exemplars).

Series and samples come through the shared SampleCache (cache.py): the series index in
memory, samples from hour blocks regrouped by series. Each call runs in one short DuckDB read
transaction on the storage's own cursor.
"""

from __future__ import annotations

import collections
import contextlib
from typing import Any

import duckdb
import numpy as np
import orjson

from lookout.query.promql import blocks
from lookout.query.promql.cache import (
    MAX_TIME_MS,
    MIN_TIME_MS,
    Labels,
    Layout,
    SampleCache,
    SeriesIndex,
)
from lookout.query.promql.model import FlatSeries, Matcher, SeriesData
from lookout.store.db import Database

__all__ = ["MAX_TIME_MS", "MIN_TIME_MS", "SampleCache", "SeriesIndex", "StoreStorage"]


# -- the Storage ------------------------------------------------------------------------------
class StoreStorage:
    """model.Storage over the store, for one thread at a time (DuckDB cursors are per
    thread): make one per query, or per thread, and close it when done."""

    def __init__(
        self,
        database: Database,
        cursor: duckdb.DuckDBPyConnection | None = None,
        *,
        cache: SampleCache | None = None,
    ) -> None:
        self.database = database
        self.cache = cache or SampleCache.of(database)
        self._own_cursor = cursor is None
        self.cursor = database.cursor() if cursor is None else cursor

    def close(self) -> None:
        if self._own_cursor:
            self.cursor.close()

    def __enter__(self) -> StoreStorage:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def interrupt(self) -> None:
        """Stop the DuckDB statement running on this storage's cursor (from another thread)."""
        self.cursor.interrupt()

    def _snapshot(self) -> Layout:
        return self.cache.sync(self.cursor)

    def _end(self) -> None:
        """End the read transaction of `_snapshot()` (a failed statement aborted it)."""
        try:
            self.cursor.execute("COMMIT")
        except duckdb.Error:
            with contextlib.suppress(duckdb.Error):
                self.cursor.execute("ROLLBACK")

    def select(self, matchers: list[Matcher], mint_ms: int, maxt_ms: int) -> list[SeriesData]:
        flat = self.select_flat(matchers, mint_ms, maxt_ms)
        edges = flat.offsets.tolist()
        return [
            SeriesData(dict(labels), flat.ts[a:b], flat.values[a:b])
            for labels, a, b in zip(flat.labels, edges[:-1], edges[1:], strict=True)
        ]

    def select_flat(self, matchers: list[Matcher], mint_ms: int, maxt_ms: int) -> FlatSeries:
        """select() as flat arrays, for the engine: no array or dict per series. The label
        dicts are the index's own; the engine never changes a label dict in place."""
        layout = self._snapshot()
        try:
            ids = layout.index.match(matchers)
            want = np.array(sorted(ids), dtype=np.uint64)
            found = (
                self.cache.blocks_for(self.cursor, layout, mint_ms, maxt_ms, want) if ids else []
            )
        finally:
            self._end()
        owners, offsets, ts, values = blocks.gather_flat(found, want, mint_ms, maxt_ms)
        labels = layout.index.labels
        return FlatSeries(
            [labels[int(sid)] for sid in want[owners].tolist()],
            ts,
            values,
            offsets.astype(np.intp, copy=False),
        )

    # -- the lookups of the Prometheus API ---------------------------------------------------
    def series(self, matcher_sets: list[list[Matcher]], start_ms: int, end_ms: int) -> list[Labels]:
        """Label sets of the series matching any of the sets with samples near the window,
        sorted as Prometheus sorts them."""
        layout = self._snapshot()
        try:
            ids = self._matching(layout, matcher_sets, start_ms, end_ms)
        finally:
            self._end()
        found = [dict(sorted(layout.index.labels[sid].items())) for sid in ids]
        return sorted(found, key=lambda labels: list(labels.items()))

    def label_names(
        self, matcher_sets: list[list[Matcher]], start_ms: int, end_ms: int
    ) -> list[str]:
        layout = self._snapshot()
        try:
            ids = self._matching(layout, matcher_sets, start_ms, end_ms)
        finally:
            self._end()
        names: set[str] = set()
        for sid in ids:
            names.update(layout.index.labels[sid])
        return sorted(names)

    def label_values(
        self, name: str, matcher_sets: list[list[Matcher]], start_ms: int, end_ms: int
    ) -> list[str]:
        layout = self._snapshot()
        try:
            ids = self._matching(layout, matcher_sets, start_ms, end_ms)
        finally:
            self._end()
        labels = layout.index.labels
        if name == "__name__" and not matcher_sets and len(ids) == len(labels):
            return sorted(layout.index.by_name)
        values = {labels[sid].get(name) for sid in ids}
        values.discard(None)
        values.discard("")
        return sorted(v for v in values if v is not None)

    def _matching(
        self, layout: Layout, matcher_sets: list[list[Matcher]], start_ms: int, end_ms: int
    ) -> list[int]:
        if matcher_sets:
            chosen: set[int] = set()
            for matchers in matcher_sets:
                chosen.update(layout.index.match(matchers))
            ids = list(chosen)
        else:
            ids = list(layout.index.labels)
        present = self.cache.present(self.cursor, layout, start_ms, end_ms)
        if present is not None:
            ids = [sid for sid in ids if sid in present]
        return ids

    def metadata(self, metric: str | None = None) -> dict[str, list[dict[str, str]]]:
        """What can be said of each metric family without HELP or TYPE lines (the store
        keeps neither): the type by naming convention, help and unit empty."""
        layout = self._snapshot()
        self._end()
        index = layout.index
        histograms = {
            name[: -len("_bucket")]
            for name, ids in index.by_name.items()
            if name.endswith("_bucket") and any("le" in index.labels[s] for s in ids[:1])
        }
        summaries = {
            name
            for name, ids in index.by_name.items()
            if any("quantile" in index.labels[s] for s in ids[:1])
        }
        families: dict[str, str] = {}
        for name in index.by_name:
            family, kind = _family_of(name, histograms, summaries)
            families.setdefault(family, kind)
        if metric is not None:
            families = {k: v for k, v in families.items() if k == metric}
        return {
            name: [{"type": kind, "help": "", "unit": ""}]
            for name, kind in sorted(families.items())
        }

    def tsdb_status(self, limit: int = 10) -> dict[str, Any]:
        """Prometheus's /api/v1/status/tsdb figures, over every series the store knows."""
        layout = self._snapshot()
        try:
            bounds = [self.cache.file_range(self.cursor, file) for file in layout.files]
            for table in layout.tables:
                found = self.cursor.execute(
                    f"SELECT min(ts_ms), max(ts_ms) FROM {table.name}"  # noqa: S608 - checked name
                ).fetchall()[0]
                if found[0] is not None:
                    bounds.append((int(found[0]), int(found[1])))
        finally:
            self._end()
        low = min((b[0] for b in bounds), default=None)
        high = max((b[1] for b in bounds), default=None)
        index = layout.index
        by_name = collections.Counter({name: len(ids) for name, ids in index.by_name.items()})
        values: dict[str, set[str]] = collections.defaultdict(set)
        pairs: collections.Counter[str] = collections.Counter()
        for labels in index.labels.values():
            for key, value in labels.items():
                values[key].add(value)
                pairs[f"{key}={value}"] += 1

        def top(counter: collections.Counter[str]) -> list[dict[str, Any]]:
            ranked = sorted(counter.items(), key=lambda item: (-item[1], item[0]))
            return [{"name": name, "value": count} for name, count in ranked[:limit]]

        return {
            "headStats": {
                "numSeries": len(index.labels),
                "numLabelPairs": len(pairs),
                "chunkCount": 0,
                "minTime": int(low) if low is not None else 0,
                "maxTime": int(high) if high is not None else 0,
            },
            "seriesCountByMetricName": top(by_name),
            "labelValueCountByLabelName": top(
                collections.Counter({k: len(v) for k, v in values.items()})
            ),
            "memoryInBytesByLabelName": top(
                collections.Counter({k: sum(len(x) for x in v) for k, v in values.items()})
            ),
            "seriesCountByLabelValuePair": top(pairs),
        }

    def exemplars(
        self, matcher_sets: list[list[Matcher]], start_ms: int, end_ms: int
    ) -> list[dict[str, Any]]:
        """Exemplars stored with the matching series' samples in the window:
        [{"seriesLabels", "exemplars": [{"labels", "value", "ts_ms"}]}]."""
        layout = self._snapshot()
        try:
            chosen: set[int] = set()
            for matchers in matcher_sets:
                chosen.update(layout.index.match(matchers))
            if not chosen:
                return []
            rows = self.cursor.execute(
                "SELECT series_id, ts_ms, value, exemplar FROM samples "
                "WHERE exemplar IS NOT NULL AND ts_ms BETWEEN ? AND ? "
                "AND series_id IN (SELECT unnest(?::UBIGINT[])) ORDER BY series_id, ts_ms",
                [start_ms, end_ms, sorted(chosen)],
            ).fetchall()
        finally:
            self._end()
        grouped: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
        for sid, ts, value, text in rows:
            try:
                exemplar = orjson.loads(text) if isinstance(text, str | bytes) else text
            except orjson.JSONDecodeError:
                continue
            if not isinstance(exemplar, dict):
                continue
            own_value = exemplar.pop("value", value)
            own_ts = exemplar.pop("ts_ms", ts)
            grouped[int(sid)].append({
                "labels": {str(k): str(v) for k, v in exemplar.items()},
                "value": float(own_value) if own_value is not None else float(value),
                "ts_ms": int(own_ts) if isinstance(own_ts, int | float) else int(ts),
            })  # fmt: skip
        return [
            {
                "seriesLabels": dict(sorted(layout.index.labels[sid].items())),
                "exemplars": grouped[sid],
            }
            for sid in sorted(grouped, key=lambda s: sorted(layout.index.labels[s].items()))
        ]


def _family_of(name: str, histograms: set[str], summaries: set[str]) -> tuple[str, str]:
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in histograms:
            return base, "histogram"
    for suffix in ("_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in summaries:
            return base, "summary"
    if name in summaries:
        return name, "summary"
    if name.endswith("_total"):
        return name, "counter"
    return name, "unknown"
