"""StoreStorage: the engine's series come out of the store exactly as stored (sorted, each
timestamp once), whether they sit in a day table, in Parquet after a flush, or both, while
writes, flushes and retention carry on; and the hour blocks behind it (blocks.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lookout.model import Batch, Sample
from lookout.query.promql import blocks
from lookout.query.promql.model import STALE_NAN, Matcher, SeriesData, is_stale
from lookout.query.promql.store import SampleCache, StoreStorage
from lookout.selfmetrics import ServerMetrics
from lookout.store import Database, Writer
from lookout.store.schema import day_of

HOUR = 3_600_000
# Three hours ago, on a whole hour: samples span hour blocks and stay clear of the future.
BASE = (int(time.time() * 1000) // HOUR - 3) * HOUR


class Store:
    def __init__(self, data_dir: Path, cache_bytes: int | None = None) -> None:
        self.database = Database(data_dir)
        self.writer = Writer(self.database, ServerMetrics())
        self.writer.start()
        self.cache = SampleCache(self.database, cache_bytes or 512 * 1024 * 1024)
        self.storage = StoreStorage(self.database, cache=self.cache)
        self.truth: dict[tuple[str, tuple[tuple[str, str], ...]], dict[int, float]] = {}

    def write(self, samples: list[Sample]) -> None:
        self.writer.submit(Batch(samples=samples)).result(10)
        for s in samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            self.truth.setdefault(key, {}).setdefault(s.ts_ms, s.value)  # the first one stays

    def flush(self) -> None:
        """The hourly flush. With `readers` running, DuckDB refuses a CHECKPOINT while
        another connection's statement is active; Database.checkpoint() retries it, so the
        flush itself must never fail for that."""
        self.writer.flush(time.time_ns()).result(60)

    def close(self) -> None:
        self.storage.close()
        self.writer.stop()
        self.database.close()

    def expected(self, name: str, mint: int, maxt: int) -> dict[tuple[tuple[str, str], ...], list[tuple[int, float]]]:  # fmt: skip
        out = {}
        for (series, labels), points in self.truth.items():
            if series != name:
                continue
            inside = sorted((t, v) for t, v in points.items() if mint <= t <= maxt)
            if inside:
                out[tuple(sorted({"__name__": name, **dict(labels)}.items()))] = inside
        return out


def _got(found: list[SeriesData]) -> dict[tuple[tuple[str, str], ...], list[tuple[int, float]]]:
    out = {}
    for s in found:
        assert s.ts.dtype == np.int64
        assert s.values.dtype == np.float64
        assert bool(np.all(np.diff(s.ts) > 0)), "ascending, each timestamp once"
        out[tuple(sorted(s.labels.items()))] = list(
            zip(s.ts.tolist(), s.values.tolist(), strict=True)
        )
    return out


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = Store(tmp_path / "data")
    try:
        yield opened
    finally:
        opened.close()


def _counters(hosts: int, start: int, count: int, every: int = 15_000) -> list[Sample]:
    return [
        Sample("requests_total", {"host": f"h{h}", "zone": "a" if h % 2 else "b"},
               start + k * every, float(k + h))
        for k in range(count)
        for h in range(hosts)
    ]  # fmt: skip


NAME = [Matcher("__name__", "=", "requests_total")]


def _check(store: Store, mint: int, maxt: int, matchers: list[Matcher] = NAME) -> None:
    assert _got(store.storage.select(matchers, mint, maxt)) == store.expected(
        "requests_total", mint, maxt
    )


def test_select_returns_each_series_window_from_the_day_table(store: Store) -> None:
    store.write(_counters(5, BASE, 400))  # 100 minutes: two hour blocks
    for mint, maxt in [(BASE, BASE + 6_000_000), (BASE + 1000, BASE + 30_000),
                       (BASE + HOUR - 15_000, BASE + HOUR + 15_000), (BASE - 10, BASE),
                       (BASE + 10**9, BASE + 2 * 10**9)]:  # fmt: skip
        _check(store, mint, maxt)


def test_rows_written_between_selects_are_appended(store: Store) -> None:
    store.write(_counters(3, BASE, 100))
    _check(store, BASE, BASE + 3 * HOUR)
    for part in range(1, 12):  # more than one merge of appended pieces
        store.write(_counters(3, BASE + part * 1_500_000, 100))
        _check(store, BASE, BASE + 3 * HOUR)
    store.write(_counters(9, BASE + 5000, 10))  # new series, and between existing samples
    _check(store, BASE, BASE + 3 * HOUR)


def test_a_flush_moves_the_blocks_to_parquet_and_answers_stay_the_same(store: Store) -> None:
    store.write(_counters(4, BASE, 300))
    _check(store, BASE, BASE + 2 * HOUR)
    store.flush()
    assert not store.database.partitions["samples"]
    _check(store, BASE, BASE + 2 * HOUR)
    assert {key[0] for key in store.cache._chunks} == {"file"}, "adopted, not read again"
    store.write(_counters(4, BASE + 300 * 15_000, 20))  # a new day table after the flush
    _check(store, BASE, BASE + 3 * HOUR)


def test_late_and_repeated_samples_come_out_sorted_and_once(store: Store) -> None:
    store.write(_counters(2, BASE, 200))
    store.flush()
    _check(store, BASE, BASE + HOUR)  # the file's blocks are cached now
    late = [Sample("requests_total", {"host": "h0", "zone": "b"}, BASE + 7_500, -1.0)]
    again = [Sample("requests_total", {"host": "h1", "zone": "a"}, BASE + 15_000, 99.0)]
    store.write(late + again)  # a sample between two flushed ones, and a repeated timestamp
    _check(store, BASE, BASE + HOUR)
    store.flush()
    _check(store, BASE, BASE + HOUR)


def test_a_block_read_in_an_older_snapshot_is_not_kept(store: Store) -> None:
    """Select A syncs, rows arrive, select B syncs past them, then A reads the hour: A's
    block lacks those rows, so it serves A only and is not cached for later selects."""
    store.write(_counters(2, BASE, 10))
    older, newer = store.database.cursor(), store.database.cursor()
    try:
        seen = store.cache.sync(older)
        store.write(_counters(2, BASE + 10 * 15_000, 10))
        store.cache.sync(newer)
        newer.execute("COMMIT")
        want = np.array(sorted(seen.index.labels), np.uint64)
        (mine,) = store.cache.blocks_for(older, seen, BASE, BASE + HOUR - 1, want)
        older.execute("COMMIT")
    finally:
        older.close()
        newer.close()
    assert mine.rows == 20
    _check(store, BASE, BASE + HOUR)


def test_a_long_cold_window_reads_the_files_directly_without_caching(store: Store) -> None:
    """Twelve hours of Parquet nobody asked for yet: read for this select only (COLD_HOURS)."""
    start = BASE - 10 * HOUR
    store.write(_counters(3, start, 12 * 240, every=15_000))
    store.flush()
    _check(store, start, start + 12 * HOUR)
    assert not [key for key in store.cache._chunks if key[0] == "file"]
    _check(store, start + 11 * HOUR, start + 12 * HOUR)  # an hour or two: cached as usual
    assert [key for key in store.cache._chunks if key[0] == "file"]


def test_retention_dropping_a_day_drops_its_series_samples(store: Store) -> None:
    store.write(_counters(2, BASE, 10))
    store.flush()
    _check(store, BASE, BASE + HOUR)
    day = day_of("samples", BASE)
    store.writer.run_job(lambda: store.database.drop_days([("samples", day)])).result(10)
    assert store.storage.select(NAME, BASE, BASE + HOUR) == []
    assert not [key for key in store.cache._chunks if key[0] == "file"]


def test_a_tiny_cache_evicts_and_still_answers(tmp_path: Path) -> None:
    small = Store(tmp_path / "data", cache_bytes=1)
    try:
        small.write(_counters(3, BASE, 500))
        small.flush()
        small.write(_counters(3, BASE + 500 * 15_000, 50))
        for _ in range(2):
            _check(small, BASE, BASE + 3 * HOUR)
        assert small.cache.cached_bytes <= max(c.nbytes for c in small.cache._chunks.values())
    finally:
        small.close()


@pytest.mark.parametrize(
    ("matchers", "hosts"),
    [
        ([Matcher("host", "=", "h1")], {"h1"}),
        ([Matcher("__name__", "=~", "requests_.*"), Matcher("zone", "=", "a")], {"h1", "h3"}),
        ([Matcher("__name__", "!~", "other.*"), Matcher("host", "!=", "h0")], {"h1", "h2", "h3"}),
        ([Matcher("host", "=~", "h[02]")], {"h0", "h2"}),
        ([Matcher("__name__", "=", "requests_total"), Matcher("zone", "=", "")], set()),
        ([Matcher("__name__", "=", "requests_total"), Matcher("missing", "=", "")],
         {"h0", "h1", "h2", "h3"}),
        ([Matcher("__name__", "=", "nothing")], set()),
    ],
)  # fmt: skip
def test_matchers_run_on_the_series_index(
    store: Store, matchers: list[Matcher], hosts: set[str]
) -> None:
    store.write(_counters(4, BASE, 3))
    found = store.storage.select(matchers, BASE, BASE + HOUR)
    assert {s.labels["host"] for s in found} == hosts
    assert all(s.labels["__name__"] == "requests_total" for s in found)


def test_staleness_markers_are_kept_bit_for_bit(store: Store) -> None:
    store.write([Sample("up", {}, BASE, 1.0), Sample("up", {}, BASE + 15_000, STALE_NAN)])
    (series,) = store.storage.select([Matcher("__name__", "=", "up")], BASE, BASE + HOUR)
    assert series.values[0] == 1.0
    assert is_stale(float(series.values[1]))


def test_writing_into_an_answer_leaves_the_cache_alone(store: Store) -> None:
    store.write(_counters(1, BASE, 3))
    (series,) = store.storage.select(NAME, BASE, BASE + HOUR)
    series.values[0] = 5.0
    (again,) = store.storage.select(NAME, BASE, BASE + HOUR)
    assert again.values.tolist() == [0.0, 1.0, 2.0]


def test_selects_stay_right_while_writes_and_flushes_go_on(store: Store) -> None:
    """Readers in threads of their own, a writer and two flushes: every answer holds each
    series' samples ascending, once, and only samples that were written."""
    store.write(_counters(4, BASE, 50))
    written = {
        (k, h): float(k + h) for k in range(300) for h in range(4)
    }  # every sample the writer below can write
    stop = threading.Event()
    problems: list[str] = []

    def read() -> None:
        with StoreStorage(store.database, cache=store.cache) as storage:
            while not stop.is_set():
                for s in storage.select(NAME, BASE, BASE + 3 * HOUR):
                    host = int(s.labels["host"][1:])
                    if not bool(np.all(np.diff(s.ts) > 0)):
                        problems.append("not ascending")
                    for t, v in zip(s.ts.tolist(), s.values.tolist(), strict=True):
                        if written.get(((t - BASE) // 15_000, host)) != v:
                            problems.append(f"unexpected sample {t} {v}")

    readers = [threading.Thread(target=read) for _ in range(3)]
    for reader in readers:
        reader.start()
    try:
        for part in range(1, 6):
            store.write(_counters(4, BASE, 50 * (part + 1))[-200:])
            if part in (2, 4):
                store.flush()  # with readers running
    finally:
        stop.set()
        for reader in readers:
            reader.join(30)
    assert problems[:3] == []
    _check(store, BASE, BASE + 3 * HOUR)


# -- blocks ----------------------------------------------------------------------------------
def test_blocks_gather_windows_across_overlapping_blocks() -> None:
    """Random series split over three blocks, in and out of time order, with repeats."""
    rng = np.random.default_rng(7)
    for trial in range(30):
        ids = rng.integers(0, 2**63, 12, dtype=np.uint64)
        rows = [
            (sid, int(t))
            for sid in ids
            for t in rng.choice(1000, rng.integers(1, 30), replace=False)
        ]
        rows += rows[:3]  # repeated samples
        order = rng.permutation(len(rows))
        sids = np.array([rows[i][0] for i in order], np.uint64)
        ts = np.array([rows[i][1] for i in order], np.int64)
        values = ts / 7
        part = rng.integers(0, 3, len(ts)) if trial % 2 else np.digitize(ts, [333, 666])
        made = sorted((blocks.from_rows(sids[part == p], ts[part == p], values[part == p])
                       for p in range(3)), key=lambda b: (b.mint, b.maxt))  # fmt: skip
        want = np.sort(ids[:8])
        for mint, maxt in [(0, 1000), (200, 500), (500, 500), (-5, 2)]:
            for group in (made, [blocks.merge(made)]):
                got = blocks.gather(group, want, mint, maxt)
                for index, sid in enumerate(want.tolist()):
                    inside = sorted({t for s, t in rows if s == sid and mint <= t <= maxt})
                    if not inside:
                        assert index not in got
                        continue
                    assert got[index][0].tolist() == inside
                    assert got[index][1].tolist() == [t / 7 for t in inside]
