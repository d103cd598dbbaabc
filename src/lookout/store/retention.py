"""Retention: per signal by age and by bytes, plus a cap on the whole data directory, kept by
dropping whole partitions (one signal's day: its Parquet files and its day table, if open).

The decisions are pure (`plan_closing`, `plan_drops`); `Retention.enforce` measures the data
directory, plans and acts, on the writer thread (`Writer.run_job`), between transactions.

What the bytes are. The total cap bounds what `du` reports for the data directory: the
Parquet files, the DuckDB file and its WAL, each file counted at the larger of its size and
its allocated blocks. A signal's bytes are its Parquet files plus its day tables' blocks in
the DuckDB file. DuckDB never hands a dropped table's blocks back to the file system: it
reuses them for later writes, and the file shrinks only when its tail is free. So dropping a
day table frees no disk; only dropping Parquet files does. To keep the DuckDB file small, once
the day tables hold more than LIVE_SHARE of a cap they are closed into Parquet early (today's
included), and the blocks they leave are reused by the next writes.

Today's partition (or a later one, from clock skew) is dropped for bytes only when dropping
every older partition is not enough.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lookout.errors import ConfigError
from lookout.ingest import limits
from lookout.ingest.scrape import parse_duration
from lookout.store.schema import DAY_TABLES, day_table

if TYPE_CHECKING:
    from lookout.selfmetrics import ServerMetrics
    from lookout.store.db import Database
    from lookout.store.writer import Writer

SIGNALS = tuple(DAY_TABLES)
DEFAULT_MAX_AGE_S = 7 * 86400.0
# Day tables may fill this share of a byte cap before they are closed into Parquet early.
LIVE_SHARE = 0.25
MIN_BYTES = 1_000_000  # a smaller cap is a missing unit (`200` meant 200MB), not a wish
AGE, BYTES = "age", "bytes"


@dataclass(frozen=True)
class SignalRetention:
    """How long one signal is kept, and how many bytes it may hold (None: no cap)."""

    max_age_s: float = DEFAULT_MAX_AGE_S
    max_bytes: int | None = None


@dataclass(frozen=True)
class RetentionPolicy:
    """The config key `retention`: a cap on the data directory and one rule per signal."""

    max_bytes: int | None = None
    signals: dict[str, SignalRetention] = field(
        default_factory=lambda: {signal: SignalRetention() for signal in SIGNALS}
    )

    def of(self, signal: str) -> SignalRetention:
        return self.signals.get(signal, SignalRetention())


@dataclass(frozen=True)
class Partition:
    """One signal's day on disk: its Parquet files and, while open, its day table."""

    signal: str
    day: str  # YYYYMMDD, UTC
    file_bytes: int = 0
    table_bytes: int = 0
    has_table: bool = False

    @property
    def bytes(self) -> int:
        return self.file_bytes + self.table_bytes


@dataclass(frozen=True)
class Drop:
    """A partition to drop, and why: `age` or `bytes`."""

    signal: str
    day: str
    reason: str
    bytes: int


@dataclass(frozen=True)
class RetentionReport:
    """What one enforcement did, and the bytes on disk after it."""

    closed: tuple[tuple[str, str], ...]
    dropped: tuple[Drop, ...]
    disk_bytes: int
    signal_bytes: dict[str, int]


# -- the config key ----------------------------------------------------------------------
def parse_size(key: str, value: Any) -> int:
    """`200MB`, `1GiB` or a number of bytes, at least MIN_BYTES."""
    size = limits.parse_size(key, value)
    if size < MIN_BYTES:
        raise ConfigError(key, value, "at least 1MB, such as '200MB' (a bare number is bytes)")
    return size


def parse_age(key: str, value: Any) -> float:
    """A Prometheus duration such as `7d` or `36h`, above zero."""
    try:
        seconds = parse_duration(key, value)
    except ConfigError:
        raise ConfigError(key, value, "a duration such as '7d'") from None
    if seconds <= 0:
        raise ConfigError(key, value, "a duration above zero, such as '7d'")
    return seconds


def _pairs(text: str) -> dict[str, Any]:
    """LOOKOUT_RETENTION's form, `max_bytes=10GB,logs.max_age=3d`, as the file's mapping."""
    nested: dict[str, Any] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, sep, value = part.partition("=")
        if not sep or not name.strip():
            raise ConfigError(
                "retention", part, "`name=value` pairs such as `max_bytes=10GB,logs.max_age=3d`"
            )
        signal, dot, setting = name.strip().rpartition(".")
        if not dot:
            nested[setting] = value.strip()
            continue
        settings = nested.setdefault(signal, {})
        if not isinstance(settings, dict):  # `logs=3d` and `logs.max_bytes=1GB` together
            settings = nested[signal] = {"max_age": settings}
        settings[setting] = value.strip()
    return nested


def _unknown(key: str, name: str, known: Sequence[str]) -> ConfigError:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return ConfigError(key, name, f"one of {', '.join(known)}.{hint}")


def _signal_rule(signal: str, value: Any, default_age: float) -> SignalRetention:
    key = f"retention.{signal}"
    if value is None:
        return SignalRetention(default_age)
    if not isinstance(value, dict):  # the short form: `logs: 3d` is the signal's max_age
        return SignalRetention(parse_age(key, value))
    age, cap = default_age, None
    for setting, given in value.items():
        if setting == "max_age":
            age = parse_age(f"{key}.max_age", given)
        elif setting == "max_bytes":
            cap = parse_size(f"{key}.max_bytes", given)
        else:
            raise _unknown(f"{key}.{setting}", str(setting), ("max_age", "max_bytes"))
    return SignalRetention(age, cap)


def parse_retention(raw: Any) -> RetentionPolicy:
    """`retention` from the config file (a mapping) or LOOKOUT_RETENTION (`name=value,...`)."""
    if isinstance(raw, str):
        raw = _pairs(raw)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("retention", raw, "a mapping such as {max_bytes: 10GB, logs: 3d}")
    total: int | None = None
    default_age = DEFAULT_MAX_AGE_S
    given: dict[str, Any] = {}
    for name, value in raw.items():
        if name == "max_bytes":
            total = parse_size("retention.max_bytes", value)
        elif name == "max_age":
            default_age = parse_age("retention.max_age", value)
        elif name in SIGNALS:
            given[name] = value
        else:
            raise _unknown(f"retention.{name}", str(name), ("max_age", "max_bytes", *SIGNALS))
    signals = {s: _signal_rule(s, given.get(s), default_age) for s in SIGNALS}
    return RetentionPolicy(total, signals)


# -- the decisions (pure) ---------------------------------------------------------------
def _day_of(now_s: float) -> str:
    return datetime.fromtimestamp(now_s, UTC).strftime("%Y%m%d")


def _expired(partition: Partition, policy: RetentionPolicy, now_s: float) -> bool:
    """True once the partition's newest possible record is older than its signal's max_age."""
    start = datetime.strptime(partition.day, "%Y%m%d").replace(tzinfo=UTC)
    end_s = (start + timedelta(days=1)).timestamp()
    return end_s + policy.of(partition.signal).max_age_s <= now_s


def _drop_order(today: str) -> Callable[[Partition], tuple[bool, str, int, str]]:
    """Older days first, today (and later) last; within a day the biggest first."""
    return lambda p: (p.day >= today, p.day, -p.bytes, p.signal)


def plan_closing(
    partitions: Sequence[Partition], policy: RetentionPolicy, now_s: float
) -> list[tuple[str, str]]:
    """(signal, day) of the day tables to close into Parquet now, today's included.

    All of them once day tables hold more than LIVE_SHARE of the total cap; a signal's once
    its tables hold more than LIVE_SHARE of its own cap. Tables about to expire are left to
    be dropped.
    """
    live = [
        p
        for p in partitions
        if p.has_table and p.table_bytes > 0 and not _expired(p, policy, now_s)
    ]
    closing: set[tuple[str, str]] = set()
    total = policy.max_bytes
    if total is not None and sum(p.table_bytes for p in live) > total * LIVE_SHARE:
        closing.update((p.signal, p.day) for p in live)
    for signal in SIGNALS:
        cap = policy.of(signal).max_bytes
        mine = [p for p in live if p.signal == signal]
        if cap is not None and sum(p.table_bytes for p in mine) > cap * LIVE_SHARE:
            closing.update((p.signal, p.day) for p in mine)
    return sorted(closing)


def plan_drops(
    partitions: Sequence[Partition], measured: int, policy: RetentionPolicy, now_s: float
) -> list[Drop]:
    """The partitions to drop, oldest first, each with its reason.

    1. `age`: every partition whose day ended more than its signal's max_age ago.
    2. `bytes`, per signal: the oldest of a signal's partitions until the rest fit its cap.
    3. `bytes`, total: the oldest partitions with Parquet files until `measured` (the data
       directory's bytes) minus the files dropped fits the total cap. A day table frees
       no disk when dropped (its blocks stay in the DuckDB file), so one with no files is
       passed over here.
    In 2 and 3, today's partitions (and later ones) come last.
    """
    today = _day_of(now_s)
    order = _drop_order(today)
    drops: dict[tuple[str, str], Drop] = {}
    for p in partitions:
        if _expired(p, policy, now_s):
            drops[p.signal, p.day] = Drop(p.signal, p.day, AGE, p.bytes)
    for signal in SIGNALS:
        cap = policy.of(signal).max_bytes
        if cap is None:
            continue
        kept = [p for p in partitions if p.signal == signal and (p.signal, p.day) not in drops]
        held = sum(p.bytes for p in kept)
        for p in sorted(kept, key=order):
            if held <= cap:
                break
            drops[p.signal, p.day] = Drop(p.signal, p.day, BYTES, p.bytes)
            held -= p.bytes
    if policy.max_bytes is not None:
        disk = measured - sum(p.file_bytes for p in partitions if (p.signal, p.day) in drops)
        for p in sorted(partitions, key=order):
            if disk <= policy.max_bytes:
                break
            if (p.signal, p.day) in drops or p.file_bytes == 0:
                continue
            drops[p.signal, p.day] = Drop(p.signal, p.day, BYTES, p.bytes)
            disk -= p.file_bytes
    return sorted(drops.values(), key=lambda d: (d.day, d.signal))


# -- measuring and acting (the writer thread) -------------------------------------------
def _file_bytes(path: Path) -> int:
    """A file as `du` counts it: the larger of its size and its allocated blocks."""
    try:
        stat = path.lstat()
    except FileNotFoundError:
        return 0
    return max(stat.st_size, stat.st_blocks * 512)


def disk_bytes(path: Path) -> int:
    """Bytes on disk under `path`, directories included, as `du` counts them."""
    total = _file_bytes(path)
    for root, dirs, files in os.walk(path):
        total += sum(_file_bytes(Path(root, name)) for name in (*dirs, *files))
    return total


class Retention:
    """Enforces a policy on one store; `enforce` runs on the writer thread only."""

    def __init__(self, database: Database, policy: RetentionPolicy, metrics: ServerMetrics) -> None:
        self.database = database
        self.policy = policy
        self.metrics = metrics

    def submit(self, writer: Writer, now_s: float) -> Future[RetentionReport]:
        """Queue an enforcement on the writer; the future resolves to its report."""
        done: Future[RetentionReport] = Future()

        def job() -> int:
            report = self.enforce(now_s)
            if not done.done():  # the caller may have given up waiting
                done.set_result(report)
            return len(report.dropped)

        def failed(outer: Future[int]) -> None:
            error = outer.exception()
            if error is not None and not done.done():
                done.set_exception(error)

        writer.run_job(job).add_done_callback(failed)
        return done

    def enforce(self, now_s: float) -> RetentionReport:
        """Close day tables early if they hold too much, then drop what the policy says."""
        database = self.database
        with database.lock:
            if self._sizes_matter(disk_bytes(database.data_dir)):
                self._checkpoint()  # the WAL into the file: table blocks become countable
            partitions = self.partitions()
            closing = plan_closing(partitions, self.policy, now_s)
            for signal, day in closing:
                database.close_day(signal, day)
            if closing:
                self._checkpoint()  # the closed tables' blocks become free for reuse
                partitions = self.partitions()
            drops = plan_drops(partitions, disk_bytes(database.data_dir), self.policy, now_s)
            if drops:
                database.drop_days([(d.signal, d.day) for d in drops])
                self._checkpoint()
                partitions = self.partitions()
            disk = disk_bytes(database.data_dir)
        for drop in drops:
            self.metrics.retention_dropped.labels(drop.signal, drop.reason).inc()
        signal_bytes = {s: sum(p.bytes for p in partitions if p.signal == s) for s in SIGNALS}
        for signal, held in signal_bytes.items():
            self.metrics.signal_bytes.labels(signal).set(held)
        self.metrics.data_dir_bytes.set(disk)
        return RetentionReport(tuple(closing), tuple(drops), disk, signal_bytes)

    def partitions(self) -> list[Partition]:
        """Every partition with its bytes: Parquet file sizes, and table blocks."""
        database = self.database
        row = database.connection.execute("SELECT block_size FROM pragma_database_size()")
        block_size = int(row.fetchone()[0])  # type: ignore[index]
        found = []
        for signal in SIGNALS:
            tables = database.partitions[signal]
            files = database.files[signal]
            for day in sorted(tables | set(files)):
                file_bytes = sum(_file_bytes(database.data_dir / p) for p in files.get(day, []))
                blocks = self._blocks(day_table(signal, day)) if day in tables else 0
                found.append(Partition(signal, day, file_bytes, blocks * block_size, day in tables))
        return found

    def _blocks(self, table: str) -> int:
        row = self.database.connection.execute(
            "SELECT count(DISTINCT block_id) + coalesce(sum(len(additional_block_ids)), 0) "
            "FROM pragma_storage_info(?) WHERE persistent",
            [table],
        ).fetchone()
        return int(row[0]) if row else 0

    def _sizes_matter(self, disk: int) -> bool:
        """Whether a byte cap is close enough that day tables must be measured exactly now.
        Measuring takes a CHECKPOINT, which stalls ingest for a moment (a third of a second
        here); the scheduled one every 5 minutes is enough while the whole data directory,
        WAL included, is far below every cap."""
        caps = [self.policy.max_bytes, *(self.policy.of(s).max_bytes for s in SIGNALS)]
        return any(cap is not None and disk >= cap * LIVE_SHARE for cap in caps)

    def _checkpoint(self) -> None:
        self.database.checkpoint()
