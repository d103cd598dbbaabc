"""The one writer thread: requests queue up, each lands whole in a committed transaction,
and only then is its future resolved (so the HTTP answer goes out after the commit).

Requests that arrive together share one transaction (group commit); if that transaction
fails, each is retried alone so one bad request cannot sink its neighbours.

Resends create no duplicates: spans are keyed by trace_id + span_id, events by event_id,
checked against the keys committed in the last DEDUP_WINDOW (kept in memory, rebuilt from
the store at startup). Hot tables have no unique constraints, on purpose (schema.py).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import queue
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Any

from lookout.errors import StoreBusyError, StoreError
from lookout.model import Batch, ErrorEvent, JobRun, LogRecord, Sample, Span
from lookout.selfmetrics import ServerMetrics
from lookout.store.db import Database
from lookout.store.schema import DAY_TABLES, column_types, day_of, day_table

Job = Callable[[], int]
# Told what a transaction stored, after its commit: (spans, logs, events, job runs).
OnCommit = Callable[[list[Span], list[LogRecord], list[ErrorEvent], list[JobRun]], None]
DEDUP_WINDOW_S = 3600
QUEUE_REQUESTS = 1000
GROUP_MAX_ROWS = 20_000
SERIES_ID_CACHE = 1_000_000


def series_id(name: str, labels: dict[str, str]) -> int:
    """A stable 64-bit id for a metric name plus its label set."""
    text = json.dumps([name, sorted(labels.items())], separators=(",", ":"))
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def issue_id(project_id: int, fingerprint: str) -> str:
    return hashlib.sha1(f"{project_id}:{fingerprint}".encode(), usedforsecurity=False).hexdigest()[
        :16
    ]


def _json(value: Any) -> str:
    return json.dumps(value, default=str, separators=(",", ":"))


def _resolve(future: Future[int], result: int) -> None:
    """Resolve unless the caller gave up (a cancelled request must not kill the writer)."""
    if future.set_running_or_notify_cancel():
        future.set_result(result)


def _fail(future: Future[int], error: BaseException) -> None:
    if future.set_running_or_notify_cancel():
        future.set_exception(error)


class RecentKeys:
    """Keys committed recently, bounded by age and count, for resend detection."""

    def __init__(self, window_s: float = DEDUP_WINDOW_S, most: int = 2_000_000) -> None:
        self.window_ns = int(window_s * 1e9)
        self.most = most
        self._order: collections.deque[tuple[int, str]] = collections.deque()
        self._keys: set[str] = set()

    def __contains__(self, key: str) -> bool:
        return key in self._keys

    def add_all(self, keys: Iterable[str], now_ns: int) -> None:
        for key in keys:
            if key not in self._keys:
                self._keys.add(key)
                self._order.append((now_ns, key))
        horizon = now_ns - self.window_ns
        while self._order and (self._order[0][0] < horizon or len(self._order) > self.most):
            self._keys.discard(self._order.popleft()[1])


class Writer:
    """Owns all writes to the store; `submit()` is safe from any thread."""

    def __init__(
        self, database: Database, metrics: ServerMetrics, on_commit: OnCommit | None = None
    ) -> None:
        self.database = database
        self.metrics = metrics
        self.on_commit = on_commit
        self._queue: queue.Queue[tuple[Batch | Job, Future[int]] | None] = queue.Queue(
            QUEUE_REQUESTS
        )
        self._span_keys = RecentKeys()
        self._event_keys = RecentKeys(window_s=7 * 86400)
        self._batch_keys = RecentKeys(window_s=86400)
        self._entry_keys = RecentKeys()  # Loki entries: labels + timestamp + line
        self._series: set[int] = set()
        # (name, sorted labels) -> series id: hashing each scraped sample again is costly.
        self._series_ids: dict[tuple[str, tuple[tuple[str, str], ...]], int] = {}
        self._unnest = {
            signal: ", ".join(f"unnest(?::{kind}[])" for kind in column_types(signal))
            for signal in DAY_TABLES
        }
        self._issues: set[str] = set()
        self._load_known()
        self._thread = threading.Thread(target=self._run, name="lookout-writer", daemon=True)
        self.running = False

    def _load_known(self) -> None:
        connection = self.database.connection
        self._series = {
            int(r[0]) for r in connection.execute("SELECT series_id FROM series").fetchall()
        }
        self._issues = {r[0] for r in connection.execute("SELECT issue_id FROM issues").fetchall()}
        now = time.time_ns()
        since = now - self._span_keys.window_ns
        rows = connection.execute(
            "SELECT trace_id || span_id FROM spans WHERE ingested_ns >= ?", [since]
        ).fetchall()
        self._span_keys.add_all((r[0] for r in rows), now)
        rows = connection.execute(
            "SELECT event_id FROM events WHERE ingested_ns >= ?", [now - self._event_keys.window_ns]
        ).fetchall()
        self._event_keys.add_all((r[0] for r in rows), now)
        rows = connection.execute(
            "SELECT DISTINCT source FROM logs WHERE source LIKE 'run:%' AND ingested_ns >= ?",
            [now - self._batch_keys.window_ns],
        ).fetchall()
        self._batch_keys.add_all((r[0] for r in rows), now)
        rows = connection.execute(
            "SELECT source FROM logs WHERE source LIKE 'loki:%' AND ingested_ns >= ?",
            [now - self._entry_keys.window_ns],
        ).fetchall()
        self._entry_keys.add_all((r[0] for r in rows), now)

    # -- the public face ---------------------------------------------------------------
    def start(self) -> None:
        self.running = True
        self._thread.start()

    def submit(self, batch: Batch) -> Future[int]:
        """Queue a request's records; the future resolves to the rows written, after commit."""
        future: Future[int] = Future()
        if not self.running:
            future.set_exception(StoreError("The store's writer is not running."))
            return future
        try:
            self._queue.put_nowait((batch, future))
        except queue.Full as exc:
            raise StoreBusyError("The store's writer queue is full; retry shortly.") from exc
        self.metrics.queue_depth.set(self._queue.qsize())
        return future

    def run_job(self, job: Job) -> Future[int]:
        """Run `job` on the writer thread, between transactions (maintenance: compaction)."""
        future: Future[int] = Future()
        if not self.running:
            future.set_exception(StoreError("The store's writer is not running."))
            return future
        self._queue.put((job, future))
        return future

    def close_days_before(self, day: str) -> Future[int]:
        """Move every day older than `day` (YYYYMMDD) to Parquet; resolves to the rows moved."""

        def close() -> int:
            return sum(
                self.database.close_day(signal, closed)
                for signal, closed in self.database.closed_days(day)
            )

        return self.run_job(close)

    def stop(self, timeout_s: float = 10.0) -> None:
        if not self.running:
            return
        self._queue.put(None)
        self._thread.join(timeout_s)
        self.running = False

    # -- the thread --------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            try:
                if self._serve_next():
                    return
            except Exception:  # noqa: BLE001, S112 - the writer must outlive any one request
                continue

    def _serve_next(self) -> bool:
        """Write the next group of requests (or run the next job); True when told to stop."""
        first = self._queue.get()
        if first is None:
            return True
        payload, done = first
        if not isinstance(payload, Batch):
            self._run_job(payload, done)
            return False
        group: list[tuple[Batch, Future[int]]] = [(payload, done)]
        rows = len(payload)
        stop = False
        while rows < GROUP_MAX_ROWS:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            if not isinstance(item[0], Batch):
                self._commit(group)
                self._run_job(item[0], item[1])
                return False
            group.append((item[0], item[1]))
            rows += len(item[0])
        self.metrics.queue_depth.set(self._queue.qsize())
        self._commit(group)
        return stop

    @staticmethod
    def _run_job(job: Job, future: Future[int]) -> None:
        try:
            result = job()
        except Exception as exc:  # noqa: BLE001 - a failed job is reported to its caller
            _fail(future, exc)
            return
        _resolve(future, result)

    @property
    def alive(self) -> bool:
        """Running, with its thread alive: what /readyz reports."""
        return self.running and self._thread.is_alive()

    def _commit(self, group: Sequence[tuple[Batch, Future[int]]]) -> None:
        try:
            written = self._transaction([batch for batch, _ in group])
        except Exception as exc:  # noqa: BLE001 - retried one by one below, then reported
            if len(group) == 1:
                _fail(group[0][1], StoreError(f"Store write failed: {exc}"))
                return
            for item in group:
                self._commit([item])
            return
        for (_, future), rows in zip(group, written, strict=True):
            _resolve(future, rows)

    def _transaction(self, batches: Sequence[Batch]) -> list[int]:
        database = self.database
        connection = database.connection
        began = time.perf_counter()
        now = time.time_ns()
        new_partitions: dict[str, set[str]] = collections.defaultdict(set)
        staged_span_keys: list[str] = []
        staged_event_keys: list[str] = []
        staged_batch_keys: list[str] = []
        staged_entry_keys: list[str] = []
        new_series: set[int] = set()
        new_issues: set[str] = set()
        with database.lock:
            connection.execute("BEGIN TRANSACTION")
            try:
                written = []
                for batch in batches:
                    key = batch.dedup_key
                    if key is not None:
                        if key in self._batch_keys or key in staged_batch_keys:
                            self.metrics.duplicates.labels("batches").inc()
                            written.append(0)
                            continue
                        staged_batch_keys.append(key)
                    count = 0
                    count += self._write_spans(batch.spans, now, new_partitions, staged_span_keys)
                    count += self._write_logs(batch.logs, now, new_partitions, staged_entry_keys)
                    count += self._write_samples(batch.samples, now, new_partitions, new_series)
                    count += self._write_events(
                        batch.events, now, new_partitions, staged_event_keys, new_issues
                    )
                    count += self._write_job_runs(batch.job_runs, now, new_partitions)
                    written.append(count)
                if new_partitions:
                    database.refresh_views(set(new_partitions))
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                for signal, days in new_partitions.items():
                    database.forget_partitions(signal, days)
                self._series -= new_series
                self._issues -= new_issues
                if new_partitions:
                    database.refresh_views(set(new_partitions))
                raise
        self._span_keys.add_all(staged_span_keys, now)
        self._event_keys.add_all(staged_event_keys, now)
        self._notify(batches, written, set(staged_span_keys), set(staged_event_keys))
        self._batch_keys.add_all(staged_batch_keys, now)
        self._entry_keys.add_all(staged_entry_keys, now)
        total = sum(written)
        self.metrics.commit_batch_rows.observe(total)
        self.metrics.commit_seconds.observe(time.perf_counter() - began)
        return written

    def _notify(
        self,
        batches: Sequence[Batch],
        written: list[int],
        span_keys: set[str],
        event_keys: set[str],
    ) -> None:
        """Tell `on_commit` what was stored: resent batches, spans and events left out."""
        if self.on_commit is None:
            return
        kept = [b for b, n in zip(batches, written, strict=True) if n or b.dedup_key is None]
        with contextlib.suppress(Exception):  # derived counts must never fail a write
            self.on_commit(
                [s for b in kept for s in b.spans if s.trace_id + s.span_id in span_keys],
                [r for b in kept for r in b.logs],
                [e for b in kept for e in b.events if e.event_id in event_keys],
                [r for b in kept for r in b.job_runs],
            )

    def _insert(
        self,
        signal: str,
        rows: list[tuple[Any, ...]],
        days: list[str],
        new_partitions: dict[str, set[str]],
    ) -> None:
        by_day: dict[str, list[tuple[Any, ...]]] = collections.defaultdict(list)
        for day, row in zip(days, rows, strict=True):
            by_day[day].append(row)
        connection = self.database.connection
        for day, day_rows in by_day.items():
            if self.database.ensure_partition(signal, day):
                new_partitions[signal].add(day)
            # Columnar: one list parameter per column, zipped by unnest. Dozens of times
            # faster than executemany, which binds and runs one statement per row.
            columns = [list(values) for values in zip(*day_rows, strict=True)]
            table = day_table(signal, day)  # from our signal names and a date: not input
            connection.execute(f"INSERT INTO {table} SELECT {self._unnest[signal]}", columns)
        self.metrics.records.labels(signal).inc(len(rows))

    def _write_spans(
        self, spans: list[Span], now: int, parts: dict[str, set[str]], staged: list[str]
    ) -> int:
        rows, days = [], []
        seen = set(staged)
        for s in spans:
            key = s.trace_id + s.span_id
            if key in self._span_keys or key in seen:
                self.metrics.duplicates.labels("spans").inc()
                continue
            seen.add(key)
            staged.append(key)
            rows.append(
                (
                    s.trace_id,
                    s.span_id,
                    s.parent_span_id,
                    s.service,
                    s.name,
                    s.kind,
                    s.start_ns,
                    s.end_ns,
                    max(0, s.end_ns - s.start_ns),
                    s.status_code,
                    s.status_message,
                    _json(s.attributes),
                    _json(s.events),
                    _json(s.links),
                    _json(s.resource),
                    s.scope,
                    s.source,
                    now,
                )
            )
            days.append(day_of("spans", s.start_ns))
        if rows:
            self._insert("spans", rows, days, parts)
        return len(rows)

    def _write_logs(
        self, logs: list[LogRecord], now: int, parts: dict[str, set[str]], staged: list[str]
    ) -> int:
        seen = set(staged)
        kept = []
        for record in logs:
            if record.source.startswith("loki:"):
                if record.source in self._entry_keys or record.source in seen:
                    self.metrics.duplicates.labels("logs").inc()
                    continue
                seen.add(record.source)
                staged.append(record.source)
            kept.append(record)
        logs = kept
        rows = [
            (
                r.ts_ns,
                r.observed_ns or now,
                r.service,
                r.level,
                r.severity_number,
                r.body,
                r.trace_id,
                r.span_id,
                _json(r.attributes),
                _json(r.resource),
                r.source,
                now,
            )
            for r in logs
        ]
        if rows:
            self._insert("logs", rows, [day_of("logs", r.ts_ns) for r in logs], parts)
        return len(rows)

    def _write_samples(
        self, samples: list[Sample], now: int, parts: dict[str, set[str]], new_series: set[int]
    ) -> int:
        if not samples:
            return 0
        rows, days = [], []
        fresh: list[tuple[int, str, str, int]] = []
        ids = self._series_ids
        day_cache: dict[int, str] = {}
        for s in samples:
            # Unsorted: the same labels in another order only cost a second entry,
            # series_id() sorts.
            key = (s.name, tuple(s.labels.items()))
            sid = ids.get(key)
            if sid is None:
                sid = series_id(s.name, s.labels)
                if len(ids) < SERIES_ID_CACHE:
                    ids[key] = sid
            if sid not in self._series:
                fresh.append((sid, s.name, _json({"__name__": s.name, **s.labels}), now))
                self._series.add(sid)
                new_series.add(sid)
            rows.append(
                (sid, s.ts_ms, s.value, None if s.exemplar is None else _json(s.exemplar), now)
            )
            minute = s.ts_ms // 60_000  # one day lookup per minute of timestamps
            day = day_cache.get(minute)
            if day is None:
                day = day_cache[minute] = day_of("samples", s.ts_ms)
            days.append(day)
        if fresh:  # new series in one columnar insert, as the samples go
            columns = [list(values) for values in zip(*fresh, strict=True)]
            self.database.connection.execute(
                "INSERT INTO series SELECT unnest(?::UBIGINT[]), unnest(?::VARCHAR[]), "
                "unnest(?::JSON[]), unnest(?::BIGINT[])",
                columns,
            )
        self._insert("samples", rows, days, parts)
        return len(rows)

    def _write_events(
        self,
        events: list[ErrorEvent],
        now: int,
        parts: dict[str, set[str]],
        staged: list[str],
        new_issues: set[str],
    ) -> int:
        connection = self.database.connection
        rows, days = [], []
        seen = set(staged)
        for e in events:
            if e.event_id in self._event_keys or e.event_id in seen:
                self.metrics.duplicates.labels("events").inc()
                continue
            seen.add(e.event_id)
            staged.append(e.event_id)
            issue = issue_id(e.project_id, e.fingerprint)
            if issue not in self._issues:
                connection.execute(
                    "INSERT INTO issues VALUES (?, ?, ?, ?, ?, ?)",
                    [issue, e.project_id, e.fingerprint, e.title, e.exception_type, e.ts_ns],
                )
                self._issues.add(issue)
                new_issues.add(issue)
            rows.append(
                (
                    e.event_id,
                    e.project_id,
                    issue,
                    e.ts_ns,
                    e.fingerprint,
                    e.title,
                    e.exception_type,
                    e.message,
                    e.level,
                    e.service,
                    e.environment,
                    e.release,
                    e.trace_id,
                    e.span_id,
                    _json(e.user),
                    _json(e.tags),
                    _json(e.payload),
                    now,
                )
            )
            days.append(day_of("events", e.ts_ns))
        if rows:
            self._insert("events", rows, days, parts)
        return len(rows)

    def _write_job_runs(self, runs: list[JobRun], now: int, parts: dict[str, set[str]]) -> int:
        rows = [
            (
                r.check_in_id,
                r.monitor,
                r.status,
                r.ts_ns,
                r.duration_s,
                r.environment,
                r.project_id,
                r.trace_id,
                now,
            )
            for r in runs
        ]
        if rows:
            self._insert("job_runs", rows, [day_of("job_runs", r.ts_ns) for r in runs], parts)
        return len(rows)
