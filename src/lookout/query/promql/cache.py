"""What makes reading series from the store fast, kept in memory and shared by every query
of one store (store.py reads through it):

- **The series index.** Every series' labels (with `__name__`), by id and by metric name,
  loaded once from the `series` table and topped up when its row count grows (series are
  only ever added). Matchers run in Python on it, the metric name first.
- **Hour blocks** (blocks.py). The samples of one hour of one source, a Parquet file or a day
  table, regrouped by series. Files never change, so their blocks stay valid until evicted
  (least recently used first, within `cache_bytes`). A day table only grows: each select
  reads the rows committed since the last one (`ingested_ns` above the last seen) and
  appends them to the table's cached hours. When the hourly flush moves a table into a
  file of the same row count, its blocks move with it instead of being read again.

Each select runs in one DuckDB read transaction, begun under the cache's lock, so the
snapshots that move the cache forward come in order and never see a table's rows twice.
"""

from __future__ import annotations

import collections
import contextlib
import re
import threading
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, ClassVar

import duckdb
import numpy as np
import orjson
import pyarrow as pa

from lookout.query.promql import blocks
from lookout.query.promql.blocks import Block, Ids
from lookout.query.promql.model import Matcher
from lookout.store.db import Database

HOUR_MS = 3_600_000
DAY_MS = 86_400_000
DEFAULT_CACHE_BYTES = 512 * 1024 * 1024
# A table's appended pieces are merged when there are this many, and into the base once
# they hold a quarter of its rows: appends stay cheap, reads see few pieces.
MAX_PIECES = 8
# A select missing more hours of Parquet than this reads them for itself, filtered to its
# series, instead of caching them: a 24-hour panel over thousands of series would otherwise
# push every recent hour out of the cache, and pay for regrouping hours nobody asks again.
COLD_HOURS = 8
_TABLE = re.compile(r"samples_d\d{8}")
MIN_TIME_MS = -(2**62)
MAX_TIME_MS = 2**62

Labels = dict[str, str]


# -- the series index -----------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesIndex:
    """One moment's series: replaced whole when series are added, so readers never lock."""

    labels: dict[int, Labels] = field(default_factory=dict)
    by_name: dict[str, tuple[int, ...]] = field(default_factory=dict)
    rows: int = 0  # rows of the series table this was loaded from
    newest_ns: int = -1  # the largest first_seen_ns loaded

    def match(self, matchers: list[Matcher]) -> list[int]:
        """Ids of the series matching every matcher: name matchers run on the metric names
        alone (every series has one), the others once per distinct label value."""
        named = [m for m in matchers if m.name == "__name__"]
        others = [m for m in matchers if m.name != "__name__"]
        candidates: Any
        if named:
            equal = next((m.value for m in named if m.op == "="), None)
            names = [equal] if equal is not None else list(self.by_name)
            names = [n for n in names if n in self.by_name and all(m.matches(n) for m in named)]
            candidates = [sid for name in names for sid in self.by_name[name]]
        else:
            candidates = self.labels.keys()
        if not others:
            return list(candidates)
        memo: list[dict[str, bool]] = [{} for _ in others]
        chosen = []
        labels = self.labels
        for sid in candidates:
            series = labels[sid]
            for matcher, seen in zip(others, memo, strict=True):
                value = series.get(matcher.name, "")
                verdict = seen.get(value)
                if verdict is None:
                    verdict = seen[value] = matcher.matches(value)
                if not verdict:
                    break
            else:
                chosen.append(sid)
        return chosen

    def with_rows(self, rows: list[tuple[int, str, Any]], total: int, *, full: bool) -> SeriesIndex:
        """A new index with `rows` (id, name, labels JSON) added (or only them, with `full`)."""
        labels = {} if full else dict(self.labels)
        fresh: dict[str, list[int]] = collections.defaultdict(list)
        for raw_id, name, text in rows:
            sid = int(raw_id)
            if sid in labels:
                continue
            parsed = orjson.loads(text) if isinstance(text, str | bytes) else dict(text or {})
            parsed = {str(k): str(v) for k, v in parsed.items()}
            parsed.setdefault("__name__", name)
            labels[sid] = parsed
            fresh[parsed["__name__"]].append(sid)
        by_name = {} if full else dict(self.by_name)
        for name, ids in fresh.items():
            by_name[name] = by_name.get(name, ()) + tuple(ids)
        newest = self.newest_ns if not full else -1
        return SeriesIndex(labels, by_name, total, newest)


# -- sources: the Parquet files and day tables the `samples` view reads ------------------------
@dataclass
class _File:
    path: str  # relative to the data directory
    day: str
    rows: int
    mint: int | None = None  # from the row groups' statistics, read once
    maxt: int | None = None


@dataclass
class _Table:
    """What the cache knows of one day table; `generation` tells a re-created one apart."""

    name: str
    day: str
    generation: int
    rows: int = 0
    watermark: int = -1  # the largest ingested_ns among `rows`


@dataclass
class _Chunk:
    """The cached hour of one source: a base block and the pieces appended since."""

    parts: list[Block]

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.parts)

    def append(self, block: Block) -> None:
        if not block.rows:
            return
        self.parts.append(block)
        pieces = self.parts[1:]
        if len(pieces) >= MAX_PIECES:
            self.parts = [self.parts[0], blocks.merge(pieces)]
            pieces = self.parts[1:]
        if sum(p.rows for p in pieces) * 4 >= self.parts[0].rows:
            self.parts = [blocks.merge(self.parts)]


@dataclass(frozen=True)
class TableView:
    """A day table as one select's snapshot saw it."""

    name: str
    day: str
    generation: int
    rows: int
    watermark: int


ChunkKey = tuple[str, str, int, int]  # ("file", path, 0, hour) or ("table", name, generation, hour)


def _day_start(day: str) -> int:
    return int(datetime.strptime(day, "%Y%m%d").replace(tzinfo=UTC).timestamp() * 1000)


def _hours(mint: int, maxt: int) -> range:
    return range(mint // HOUR_MS * HOUR_MS, maxt + 1, HOUR_MS)


def _arrow_rows(table: pa.Table) -> tuple[Ids, Any, Any]:
    def column(name: str) -> Any:
        return table.column(name).combine_chunks().to_numpy(zero_copy_only=False)

    return (
        column("series_id").astype(np.uint64, copy=False),
        column("ts_ms").astype(np.int64, copy=False),
        column("value").astype(np.float64, copy=False),
    )


class SampleCache:
    """The series index and hour blocks of one store, shared by all its queries."""

    _registry: ClassVar[weakref.WeakKeyDictionary[Database, SampleCache]] = (
        weakref.WeakKeyDictionary()
    )
    _registry_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, database: Database, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.database = database
        self.cache_bytes = cache_bytes
        self.index = SeriesIndex()
        self._lock = threading.Lock()
        self._build_lock = threading.Lock()
        self._chunks: collections.OrderedDict[ChunkKey, _Chunk] = collections.OrderedDict()
        self._bytes = 0
        self._files: dict[str, _File] = {}
        self._tables: dict[str, _Table] = {}
        self._generation = 0
        self._summaries: dict[str, Ids] = {}  # file path -> its series (for label lookups)

    @classmethod
    def of(cls, database: Database, cache_bytes: int | None = None) -> SampleCache:
        """The one cache of `database` (made on first use; `cache_bytes` sets its size then)."""
        with cls._registry_lock:
            found = cls._registry.get(database)
            if found is None:
                found = cls(database, cache_bytes or DEFAULT_CACHE_BYTES)
                cls._registry[database] = found
            return found

    @property
    def cached_bytes(self) -> int:
        return self._bytes

    # -- moving forward, under the lock, inside the caller's transaction -------------------
    def sync(self, cursor: duckdb.DuckDBPyConnection) -> Layout:
        """Begin a read transaction on `cursor` and bring the index and the sources up to
        its snapshot; the caller commits."""
        with self._lock:
            cursor.execute("BEGIN TRANSACTION")
            try:
                return self._sync(cursor)
            except BaseException:
                with contextlib.suppress(duckdb.Error):
                    cursor.execute("ROLLBACK")
                raise

    def _sync(self, cursor: duckdb.DuckDBPyConnection) -> Layout:
        self._sync_index(cursor)
        files = {
            str(path): _File(str(path), str(day), int(rows or 0))
            for day, path, rows in cursor.execute(
                "SELECT day, path, rows FROM partition_files WHERE signal = 'samples'"
            ).fetchall()
        }
        tables = {
            str(name): str(day)
            for day, name in cursor.execute(
                "SELECT day, table_name FROM partitions WHERE signal = 'samples'"
            ).fetchall()
            if _TABLE.fullmatch(str(name))
        }
        self._sync_files(files)
        for name in [n for n in self._tables if n not in tables]:
            self._forget_table(name)
        for name, day in tables.items():
            self._sync_table(cursor, name, day)
        views = [
            TableView(t.name, t.day, t.generation, t.rows, t.watermark)
            for t in (self._tables[n] for n in tables)
        ]
        return Layout(self.index, [self._files[p] for p in files], views)

    def _sync_index(self, cursor: duckdb.DuckDBPyConnection) -> None:
        found = cursor.execute("SELECT count(*), max(first_seen_ns) FROM series").fetchall()
        rows, newest = found[0]
        rows, newest = int(rows), int(newest if newest is not None else -1)
        index = self.index
        if rows == index.rows and newest == index.newest_ns:
            return
        if index.rows and rows > index.rows:
            added = cursor.execute(
                "SELECT series_id, name, labels FROM series WHERE first_seen_ns >= ?",
                [index.newest_ns],
            ).fetchall()
            grown = index.with_rows(added, rows, full=False)
            if len(grown.labels) == rows:
                self.index = SeriesIndex(grown.labels, grown.by_name, rows, newest)
                return
        everything = cursor.execute("SELECT series_id, name, labels FROM series").fetchall()
        full = index.with_rows(everything, rows, full=True)
        self.index = SeriesIndex(full.labels, full.by_name, rows, newest)

    def _sync_files(self, listed: dict[str, _File]) -> None:
        for path in [p for p in self._files if p not in listed]:  # dropped by retention
            del self._files[path]
            self._summaries.pop(path, None)
            self._drop(lambda key, path=path: key[0] == "file" and key[1] == path)
        for path, file in listed.items():
            if path in self._files:
                continue
            self._files[path] = file
            # A flushed table: its blocks become the file's when nothing was missed.
            table = next(
                (t for t in self._tables.values() if t.day == file.day and t.rows == file.rows),
                None,
            )
            if table is not None and file.rows:
                owned = ("table", table.name, table.generation)
                for key in [k for k in self._chunks if k[:3] == owned]:
                    self._chunks[("file", path, 0, key[3])] = self._chunks.pop(key)
                self._forget_table(table.name)
            else:
                for table in [t for t in self._tables.values() if t.day == file.day]:
                    self._forget_table(table.name)

    def _forget_table(self, name: str) -> None:
        table = self._tables.pop(name, None)
        if table is not None:
            self._drop(lambda key: key[:3] == ("table", table.name, table.generation))

    def _sync_table(self, cursor: duckdb.DuckDBPyConnection, name: str, day: str) -> None:
        rows, newest = cursor.execute(
            f"SELECT count(*), max(ingested_ns) FROM {name}"  # noqa: S608 - a checked table name
        ).fetchall()[0]
        rows, newest = int(rows), int(newest if newest is not None else -1)
        table = self._tables.get(name)
        if table is not None and rows == table.rows and newest == table.watermark:
            return
        if table is not None and rows > table.rows:
            owned = ("table", name, table.generation)
            if not any(key[:3] == owned for key in self._chunks):
                # Nothing of it is cached: later reads of its hours see the new rows anyway.
                table.rows, table.watermark = rows, newest
                return
            arrow = cursor.sql(
                f"SELECT series_id, ts_ms, value FROM {name} WHERE ingested_ns > ?",  # noqa: S608
                params=[table.watermark],
            ).to_arrow_table()
            if table.rows + arrow.num_rows == rows:
                delta = blocks.from_rows(*_arrow_rows(arrow))
                for hour in _hours(delta.mint, delta.maxt) if delta.rows else ():
                    chunk = self._chunks.get(("table", name, table.generation, hour))
                    if chunk is not None:
                        piece = _slice(delta, hour, hour + HOUR_MS - 1)
                        self._bytes -= chunk.nbytes
                        chunk.append(piece)
                        self._bytes += chunk.nbytes
                table.rows, table.watermark = rows, newest
                self._evict()
                return
        self._forget_table(name)
        self._generation += 1
        self._tables[name] = _Table(name, day, self._generation, rows, newest)

    def _drop(self, doomed: Any) -> None:
        for key in [k for k in self._chunks if doomed(k)]:
            self._bytes -= self._chunks.pop(key).nbytes

    def _evict(self, keep: frozenset[ChunkKey] = frozenset()) -> None:
        for key in list(self._chunks):
            if self._bytes <= self.cache_bytes:
                return
            if key not in keep:
                self._bytes -= self._chunks.pop(key).nbytes

    # -- the blocks of a window -----------------------------------------------------------
    def blocks_for(
        self, cursor: duckdb.DuckDBPyConnection, layout: Layout, mint: int, maxt: int, want: Ids
    ) -> list[Block]:
        """The blocks holding the samples of `want` (sorted ids) in [mint, maxt], oldest
        first. Missing hours are read now: a day table's under the lock, so appends cannot
        race them; a file's outside it, or, past COLD_HOURS, straight from the file for the
        wanted series only and not cached."""
        wanted: list[tuple[ChunkKey, str, int]] = []  # key, source to read, hour
        views = {t.name: t for t in layout.tables}
        for file in layout.files:
            low, high = self.file_range(cursor, file)
            if high < mint or low > maxt:
                continue
            wanted.extend(
                (("file", file.path, 0, hour), file.path, hour)
                for hour in _hours(max(mint, low), min(maxt, high))
            )
        for table in layout.tables:
            start = _day_start(table.day)
            if start + DAY_MS <= mint or start > maxt or not table.rows:
                continue
            wanted.extend(
                (("table", table.name, table.generation, hour), table.name, hour)
                for hour in _hours(max(mint, start), min(maxt, start + DAY_MS - 1))
            )
        found: list[Block] = []
        missing = []
        with self._lock:
            for key, source, hour in wanted:
                chunk = self._chunks.get(key)
                if chunk is None:
                    missing.append((key, source, hour))
                    continue
                self._chunks.move_to_end(key)
                found.extend(chunk.parts)
            for key, source, hour in [m for m in missing if m[0][0] == "table"]:
                block = self._read(cursor, source, hour, table=True)
                found.append(block)
                # Kept only when no later select moved the table on since this one's sync:
                # appends after that snapshot would otherwise be missing from it for good.
                seen, known = views[source], self._tables.get(source)
                if known is not None and (known.generation, known.watermark) == (
                    seen.generation,
                    seen.watermark,
                ):
                    self._keep(key, block)
        cold = [m for m in missing if m[0][0] == "file"]
        if len(cold) > COLD_HOURS:
            found.extend(self._read_direct(cursor, cold, mint, maxt, want))
            cold = []
        for key, source, hour in cold:
            with self._build_lock:
                with self._lock:
                    chunk = self._chunks.get(key)
                if chunk is not None:
                    found.extend(chunk.parts)
                    continue
                block = self._read(cursor, source, hour, table=False)
            found.append(block)
            with self._lock:
                if key[1] in self._files:
                    self._keep(key, block)
        found.sort(key=lambda b: (b.mint, b.maxt))
        return found

    def _read_direct(
        self,
        cursor: duckdb.DuckDBPyConnection,
        cold: list[tuple[ChunkKey, str, int]],
        mint: int,
        maxt: int,
        want: Ids,
    ) -> list[Block]:
        """One uncached block of the missing hours' samples of the wanted series, in one
        query over their files. (Where a file's other hours are cached, those samples come
        twice; gather() keeps one of each.)"""
        paths = sorted({str(self.database.data_dir / source) for _, source, _ in cold})
        hours = [hour for _, _, hour in cold]
        low, high = max(mint, min(hours)), min(maxt, max(hours) + HOUR_MS - 1)
        try:
            arrow = cursor.sql(
                "SELECT series_id, ts_ms, value FROM read_parquet(?::VARCHAR[]) "
                "WHERE ts_ms BETWEEN ? AND ? AND series_id IN (SELECT unnest(?::UBIGINT[]))",
                params=[paths, low, high, want.tolist()],
            ).to_arrow_table()
        except duckdb.IOException:
            return []  # retention deleted a file after this select began: its data is gone
        return [blocks.from_rows(*_arrow_rows(arrow))]

    def _keep(self, key: ChunkKey, block: Block) -> None:
        old = self._chunks.pop(key, None)
        if old is not None:
            self._bytes -= old.nbytes
        chunk = _Chunk([block])
        self._chunks[key] = chunk
        self._bytes += chunk.nbytes
        self._evict(frozenset({key}))

    def _read(
        self, cursor: duckdb.DuckDBPyConnection, source: str, hour: int, *, table: bool
    ) -> Block:
        if table:
            relation = f"{source}"  # a checked table name
            params: list[Any] = [hour, hour + HOUR_MS]
        else:
            relation = "read_parquet(?)"
            params = [str(self.database.data_dir / source), hour, hour + HOUR_MS]
        try:
            arrow = cursor.sql(
                f"SELECT series_id, ts_ms, value FROM {relation} WHERE ts_ms >= ? AND ts_ms < ?",  # noqa: S608
                params=params,
            ).to_arrow_table()
        except duckdb.IOException:
            return blocks.empty_block()  # a file retention deleted after this select began
        return blocks.from_rows(*_arrow_rows(arrow))

    def file_range(self, cursor: duckdb.DuckDBPyConnection, file: _File) -> tuple[int, int]:
        if file.mint is None or file.maxt is None:
            start = _day_start(file.day)
            low, high = start, start + DAY_MS - 1
            try:
                row = cursor.execute(
                    "SELECT min(TRY_CAST(stats_min_value AS BIGINT)), "
                    "max(TRY_CAST(stats_max_value AS BIGINT)) FROM parquet_metadata(?) "
                    "WHERE path_in_schema = 'ts_ms'",
                    [str(self.database.data_dir / file.path)],
                ).fetchall()[0]
            except duckdb.Error:
                row = (None, None)
            if row[0] is not None and row[1] is not None:
                low, high = int(row[0]), int(row[1])
            file.mint, file.maxt = low, high
        return file.mint, file.maxt

    # -- which series have samples in a window (for the label lookups) --------------------
    def present(
        self, cursor: duckdb.DuckDBPyConnection, layout: Layout, mint: int, maxt: int
    ) -> set[int] | None:
        """Series with samples in a source overlapping [mint, maxt], the granularity at which
        Prometheus answers too (its blocks); None when the window covers all time."""
        if mint <= MIN_TIME_MS and maxt >= MAX_TIME_MS:
            return None
        found: set[int] = set()
        for file in layout.files:
            low, high = self.file_range(cursor, file)
            if high < mint or low > maxt:
                continue
            ids = self._summaries.get(file.path)
            if ids is None:
                try:
                    ids = cursor.execute(
                        "SELECT DISTINCT series_id FROM read_parquet(?)",
                        [str(self.database.data_dir / file.path)],
                    ).fetchnumpy()["series_id"]
                except duckdb.IOException:
                    continue
                self._summaries[file.path] = ids
            found.update(ids.tolist())
        for table in layout.tables:
            rows = cursor.execute(
                f"SELECT DISTINCT series_id FROM {table.name} WHERE ts_ms BETWEEN ? AND ?",  # noqa: S608
                [mint, maxt],
            ).fetchnumpy()["series_id"]
            found.update(rows.tolist())
        return found


def _slice(block: Block, mint: int, maxt: int) -> Block:
    """The part of `block` in [mint, maxt], as a block of its own."""
    if block.mint >= mint and block.maxt <= maxt:
        return block
    got = blocks.gather([block], block.sids, mint, maxt)
    if not got:
        return blocks.empty_block()
    indexes = sorted(got)
    sids = block.sids[indexes]
    counts = [len(got[i][0]) for i in indexes]
    return blocks.from_rows(
        np.repeat(sids, counts),
        np.concatenate([got[i][0] for i in indexes]),
        np.concatenate([got[i][1] for i in indexes]),
    )


@dataclass(frozen=True)
class Layout:
    """What one select's snapshot holds: the series index and the sources of samples."""

    index: SeriesIndex
    files: list[_File]
    tables: list[TableView]
