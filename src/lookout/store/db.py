"""Opening the DuckDB store: checks, migrations, partitions and the views over them.

Only the writer thread writes (writer.py); readers use their own cursors (read.py).
"""

from __future__ import annotations

import itertools
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import duckdb

from lookout.errors import StoreError
from lookout.store import recovery
from lookout.store.quarantine import Damage, Quarantine
from lookout.store.schema import DAY_TABLES, MIGRATIONS, SCHEMA_VERSION, day_table

BUILTIN_EXTENSIONS = ("json", "parquet", "icu")
DB_FILE = "lookout.duckdb"
# Rows per Parquet row group: the unit a filter on its min/max statistics can skip. A trace
# lookup pays for every row group of every file, even one the statistics skip (about 0.1 ms
# for all the columns it reads), and reads the one it does not skip: with the page index
# (WRITE_PAGE_INDEX), the pages of its big columns that hold no match are skipped without
# being decompressed. At 10 M spans and 50,000 rows a group, a lookup took half the time
# it took at 20,000 rows without the index; 100,000 rows were no faster.
ROW_GROUP = 50_000
# Spans sorted by one COPY: a day table is cut into ranges of trace_key this size, one
# sorted file each. Sorting 2 M spans fits in a 256 MiB memory limit; 10 M in one sort
# does not (DuckDB runs out of memory instead of spilling).
SORTED_SPANS = 1_000_000


class Database:
    """The open store: one DuckDB connection, partition bookkeeping, view upkeep."""

    def __init__(self, data_dir: Path, memory_limit: str | None = None) -> None:
        """`memory_limit`: DuckDB's, such as `256MiB`, from the first statement on."""
        self.data_dir = data_dir
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot create data directory {data_dir}: {exc.strerror}.") from exc
        self.path = data_dir / DB_FILE
        # Damaged files never stop startup: they move to quarantine/ (see recovery.py).
        self.quarantine = Quarantine(data_dir, datetime.now(UTC))
        try:
            opened = recovery.open_database(self.path, self.quarantine, memory_limit)
        except duckdb.Error as exc:
            raise StoreError(f"Cannot open the store {self.path}: {exc}") from exc
        self.connection = opened.connection
        self.commits = opened.commits
        self.lock = threading.RLock()
        self.partitions: dict[str, set[str]] = {signal: set() for signal in DAY_TABLES}
        # Closed days, moved out of the database into Parquet files: signal -> day -> paths.
        self.files: dict[str, dict[str, list[str]]] = {signal: {} for signal in DAY_TABLES}
        self._check_extensions()
        self.schema_version = self._migrate()
        recovery.restore(self.connection, data_dir, opened.restore, self.quarantine)
        recovery.check_series_snapshots(self.connection, data_dir, self.quarantine, time.time_ns())
        self._load_partitions()
        self._refresh_views(set(DAY_TABLES))
        if "issues" in opened.restore:
            recovery.restore_issues(self.connection)

    def _check_extensions(self) -> None:
        rows = self.connection.execute(
            "SELECT extension_name FROM duckdb_extensions() WHERE loaded"
        ).fetchall()
        loaded = {name for (name,) in rows}
        missing = [name for name in BUILTIN_EXTENSIONS if name not in loaded]
        if missing:
            raise StoreError(
                f"DuckDB {duckdb.__version__} lacks built-in extensions {missing}; the store "
                "needs json, parquet and icu compiled in (nothing is downloaded at run time)."
            )

    def _migrate(self) -> int:
        connection = self.connection
        connection.execute(
            "CREATE TABLE IF NOT EXISTS schema_version (version INTEGER, applied_ns BIGINT)"
        )
        row = connection.execute("SELECT max(version) FROM schema_version").fetchone()
        current = int(row[0]) if row and row[0] is not None else 0
        if current > SCHEMA_VERSION:
            raise StoreError(
                f"The store in {self.data_dir} has schema version {current}, newer than this "
                f"lookout's {SCHEMA_VERSION}. Upgrade lookout, or point --data-dir elsewhere."
            )
        for version in range(current + 1, SCHEMA_VERSION + 1):
            connection.execute("BEGIN TRANSACTION")
            try:
                MIGRATIONS[version](connection)
                connection.execute(
                    "INSERT INTO schema_version VALUES (?, ?)", [version, time.time_ns()]
                )
                connection.execute("COMMIT")
            except duckdb.Error as exc:
                connection.execute("ROLLBACK")
                raise StoreError(f"Migration to schema version {version} failed: {exc}") from exc
        if current < SCHEMA_VERSION:
            connection.execute("CHECKPOINT")
        return SCHEMA_VERSION

    def _load_partitions(self) -> None:
        for signal, day in self.connection.execute("SELECT signal, day FROM partitions").fetchall():
            self.partitions[signal].add(day)
        listed = set()
        rows = self.connection.execute("SELECT signal, day, path FROM partition_files").fetchall()
        for signal, day, path in rows:
            problem = recovery.parquet_damage(self.data_dir / path)
            if problem is None:
                self.files[signal].setdefault(day, []).append(path)
            elif (self.data_dir / path).exists():  # damaged, not missing: set it aside
                self._unlist(path)
                damage = Damage(path, "parquet", problem, recovery.lost_in_file(path))
                self.quarantine.move(self.data_dir / path, damage)
            listed.add(path)
        # A file whose compaction never committed duplicates a table that is still there.
        # Paths are kept relative to the data directory, so a moved store still matches.
        for signal in DAY_TABLES:
            for found in (self.data_dir / signal).glob("*.parquet*"):
                if str(found.relative_to(self.data_dir)) not in listed:
                    found.unlink(missing_ok=True)

    def _unlist(self, path: str) -> None:
        self.connection.execute("DELETE FROM partition_files WHERE path = ?", [path])

    def quarantine_file(self, path: str, damage: Damage, quarantine: Quarantine) -> bool:
        """Take a damaged Parquet file out of its view and move it to `quarantine`
        (on the writer thread, between transactions); False when it is gone already."""
        if not (self.data_dir / path).exists():
            return False  # dropped by retention meanwhile
        with self.lock:
            signals = set()
            for signal, days in self.files.items():
                for day, paths in list(days.items()):
                    if path in paths:
                        paths.remove(path)
                        signals.add(signal)
                        if not paths:
                            del days[day]
            self.connection.execute("BEGIN TRANSACTION")
            try:
                self._unlist(path)
                self._refresh_views(signals)
                self.connection.execute("COMMIT")
            except BaseException:
                self.connection.execute("ROLLBACK")
                raise
        quarantine.move(self.data_dir / path, damage)
        return True

    def ensure_partition(self, signal: str, day: str) -> bool:
        """Create the day table inside the caller's transaction; True when it is new."""
        if day in self.partitions[signal]:
            return False
        table = day_table(signal, day)
        self.connection.execute(f"CREATE TABLE IF NOT EXISTS {table} ({DAY_TABLES[signal]})")
        self.connection.execute("INSERT INTO partitions VALUES (?, ?, ?)", [signal, day, table])
        self.partitions[signal].add(day)
        return True

    def forget_partitions(self, signal: str, days: set[str]) -> None:
        """Undo bookkeeping for partitions whose creating transaction rolled back."""
        self.partitions[signal] -= days

    def _refresh_views(self, signals: set[str]) -> None:
        for signal in signals:
            days = sorted(self.partitions[signal])
            parts = [f"SELECT * FROM {day_table(signal, day)}" for day in days]
            paths = sorted(
                str(self.data_dir / p)
                for day_paths in self.files[signal].values()
                for p in day_paths
            )
            if paths:
                listed = ", ".join("'" + p.replace("'", "''") + "'" for p in paths)
                parts.append(f"SELECT * FROM read_parquet([{listed}], union_by_name = true)")
            if parts:
                body = " UNION ALL BY NAME ".join(parts)
            else:
                columns = DAY_TABLES[signal]
                self.connection.execute(f"CREATE TABLE IF NOT EXISTS {signal}_empty ({columns})")
                body = f"SELECT * FROM {signal}_empty"
            self.connection.execute(f"CREATE OR REPLACE VIEW {signal} AS {body}")

    def refresh_views(self, signals: set[str]) -> None:
        self._refresh_views(signals)

    def close_day(self, signal: str, day: str) -> int:
        """Move a closed day's table into Parquet files; the rows it moved.

        The files are written and renamed into place first, then one transaction lists them,
        drops the table and swaps the view. A crash in between leaves unlisted files, which
        the next startup deletes; the table is still there, so nothing is lost. Each file's
        name carries its content digest, checked after each startup.
        """
        table = day_table(signal, day)
        folder = self.data_dir / signal
        folder.mkdir(exist_ok=True)
        connection = self.connection
        with self.lock:
            rows = connection.execute(f"SELECT count(*) FROM {table}").fetchone()
            count = int(rows[0]) if rows else 0
            written: list[tuple[Path, int]] = []  # each file, and the rows it holds
            partial: Path | None = None  # the file being written
            # One thread: a parallel COPY of a big table runs out of a small memory_limit
            # (seen at 2 M spans and 256 MiB).
            connection.execute("SET threads = 1")
            try:
                sort = signal == "spans"
                for where in self._key_ranges(table, count) if sort else [None]:
                    partial = folder / f"{day}-{time.time_ns()}.parquet.partial"
                    moved = self._copy(table, where, partial, sort=sort)
                    final = partial.with_name(
                        f"{partial.name.removesuffix('.parquet.partial')}-"
                        f"{recovery.file_digest(partial)}.parquet"
                    )
                    recovery.durable_rename(partial, final)
                    written.append((final, moved))
            except BaseException:
                if partial is not None:
                    partial.unlink(missing_ok=True)
                for final, _ in written:
                    final.unlink(missing_ok=True)
                raise
            finally:
                connection.execute("RESET threads")
            total = sum(moved for _, moved in written)
            if total != count:  # the ranges must cover the table: it is dropped next
                for final, _ in written:
                    final.unlink(missing_ok=True)
                raise StoreError(f"Compacting {table} wrote {total} of its {count} rows.")
            relatives = [str(final.relative_to(self.data_dir)) for final, _ in written]
            connection.execute("BEGIN TRANSACTION")
            try:
                for relative, (_, moved) in zip(relatives, written, strict=True):
                    connection.execute(
                        "INSERT INTO partition_files VALUES (?, ?, ?, ?, ?)",
                        [signal, day, relative, moved, time.time_ns()],
                    )
                connection.execute(
                    "DELETE FROM partitions WHERE signal = ? AND day = ?", [signal, day]
                )
                connection.execute(f"DROP TABLE {table}")
                self.partitions[signal].discard(day)
                self.files[signal].setdefault(day, []).extend(relatives)
                self._refresh_views({signal})
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                self.partitions[signal].add(day)
                day_files = self.files[signal].get(day, [])
                for relative in relatives:
                    if relative in day_files:
                        day_files.remove(relative)
                for final, _ in written:
                    final.unlink(missing_ok=True)
                raise
        return count

    def _key_ranges(self, table: str, count: int) -> list[str | None]:
        """WHERE clauses cutting a spans table into ranges of trace_key of about
        SORTED_SPANS spans each (None: the whole table), at its approximate quantiles, so
        ids that do not spread evenly (a timestamp prefix) still make even ranges."""
        parts = -(-count // SORTED_SPANS)
        if parts < 2:
            return [None]
        shares = [n / parts for n in range(1, parts)]
        row = self.connection.execute(
            f"SELECT approx_quantile(trace_key, {shares}) FROM {table}"
        ).fetchone()
        cuts = sorted({int(cut) for cut in row[0] if cut is not None}) if row and row[0] else []
        if not cuts:
            return [None]
        # A NULL key matches no range: those rows go with the first.
        ranges = [f"trace_key < {cuts[0]} OR trace_key IS NULL"]
        ranges += [f"trace_key >= {lo} AND trace_key < {hi}" for lo, hi in itertools.pairwise(cuts)]
        return [*ranges, f"trace_key >= {cuts[-1]}"]

    def _copy(self, table: str, where: str | None, partial: Path, *, sort: bool) -> int:
        """COPY the table's rows matching `where` to `partial`; the rows written. Spans are
        sorted by trace_key: a trace lookup reads the one row group whose min/max holds its
        key, and skips the others without a look at their bloom filters (which DuckDB only
        writes while a row group has few distinct keys). When the sort does not fit in the
        memory limit, the rows are written unsorted."""
        target = str(partial).replace("'", "''")
        options = f"FORMAT parquet, ROW_GROUP_SIZE {ROW_GROUP}, WRITE_PAGE_INDEX true"
        source = f"SELECT * FROM {table}" + (f" WHERE {where}" if where else "")
        if sort:
            try:
                return self._rows_copied(
                    f"COPY ({source} ORDER BY trace_key) TO '{target}' ({options})"
                )
            except duckdb.OutOfMemoryException:
                partial.unlink(missing_ok=True)
        return self._rows_copied(f"COPY ({source}) TO '{target}' ({options})")

    def _rows_copied(self, copy: str) -> int:
        row = self.connection.execute(copy).fetchone()
        return int(row[0]) if row else 0

    def drop_days(self, days: list[tuple[str, str]]) -> int:
        """Drop whole partitions, (signal, day): their day tables and Parquet files (retention).

        One transaction unlists the files, drops the tables and swaps the views; the files
        are deleted after the commit. A crash in between leaves unlisted files, which the
        next startup deletes. Returns the files deleted.
        """
        connection = self.connection
        signals = {signal for signal, _ in days}
        tables: set[tuple[str, str]] = set()
        files: dict[tuple[str, str], list[str]] = {}
        with self.lock:
            connection.execute("BEGIN TRANSACTION")
            try:
                for signal, day in days:
                    where = [signal, day]
                    connection.execute(
                        "DELETE FROM partition_files WHERE signal = ? AND day = ?", where
                    )
                    files[signal, day] = self.files[signal].pop(day, [])
                    if day in self.partitions[signal]:
                        connection.execute(
                            "DELETE FROM partitions WHERE signal = ? AND day = ?", where
                        )
                        connection.execute(f"DROP TABLE {day_table(signal, day)}")
                        self.partitions[signal].discard(day)
                        tables.add((signal, day))
                self._refresh_views(signals)
                connection.execute("COMMIT")
            except BaseException:
                connection.execute("ROLLBACK")
                for (signal, day), paths in files.items():
                    if paths:
                        self.files[signal][day] = paths
                for signal, day in tables:
                    self.partitions[signal].add(day)
                raise
        for paths in files.values():
            for path in paths:
                (self.data_dir / path).unlink(missing_ok=True)
        return sum(len(paths) for paths in files.values())

    def closed_days(self, before_day: str) -> list[tuple[str, str]]:
        """(signal, day) of every table partition older than `before_day`."""
        return sorted(
            (signal, day)
            for signal, days in self.partitions.items()
            for day in days
            if day < before_day
        )

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor of its own for a reader thread (no progress bar on stdout either)."""
        cursor = self.connection.cursor()
        cursor.execute("SET enable_progress_bar = false")
        return cursor

    def checkpoint(self, *, attempts: int = 3, pause_s: float = 0.01) -> bool:
        """CHECKPOINT, retried briefly when DuckDB refuses it because another connection's
        statement is running ("there are other write transactions active"; PromQL and the
        read API read all the time). It runs on the writer thread, so it never waits long:
        False when it did not get through; the WAL stays valid and the next checkpoint (or
        DuckDB's own, at the WAL size limit) takes it."""
        for attempt in range(attempts):
            try:
                self.connection.execute("CHECKPOINT")
            except duckdb.TransactionException:
                if attempt + 1 < attempts:
                    time.sleep(pause_s)
            else:
                return True
        return False

    def close(self) -> None:
        with self.lock:
            try:
                self.checkpoint()
            finally:
                self.connection.close()
                self.commits.mark.close()
