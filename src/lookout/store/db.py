"""Opening the DuckDB store: checks, migrations, partitions and the views over them.

Only the writer thread writes (writer.py); readers use their own cursors (read.py).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import duckdb

from lookout.errors import StoreError
from lookout.store.schema import DAY_TABLES, MIGRATIONS, SCHEMA_VERSION, day_table

BUILTIN_EXTENSIONS = ("json", "parquet", "icu")
DB_FILE = "lookout.duckdb"


class Database:
    """The open store: one DuckDB connection, partition bookkeeping, view upkeep."""

    def __init__(self, data_dir: Path) -> None:
        self.data_dir = data_dir
        try:
            data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"Cannot create data directory {data_dir}: {exc.strerror}.") from exc
        self.path = data_dir / DB_FILE
        try:
            # Nothing may be downloaded at run time: extensions come built in or not at all.
            self.connection = duckdb.connect(
                str(self.path), config={"autoinstall_known_extensions": False}
            )
        except duckdb.Error as exc:
            raise StoreError(f"Cannot open the store {self.path}: {exc}") from exc
        self.lock = threading.RLock()
        self.partitions: dict[str, set[str]] = {signal: set() for signal in DAY_TABLES}
        self._check_extensions()
        self.schema_version = self._migrate()
        self._load_partitions()
        self._refresh_views(set(DAY_TABLES))

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
            if days:
                body = " UNION ALL BY NAME ".join(
                    f"SELECT * FROM {day_table(signal, day)}" for day in days
                )
            else:
                columns = DAY_TABLES[signal]
                self.connection.execute(f"CREATE TABLE IF NOT EXISTS {signal}_empty ({columns})")
                body = f"SELECT * FROM {signal}_empty"
            self.connection.execute(f"CREATE OR REPLACE VIEW {signal} AS {body}")

    def refresh_views(self, signals: set[str]) -> None:
        self._refresh_views(signals)

    def cursor(self) -> duckdb.DuckDBPyConnection:
        """A cursor of its own for a reader thread."""
        return self.connection.cursor()

    def close(self) -> None:
        with self.lock:
            try:
                self.connection.execute("CHECKPOINT")
            finally:
                self.connection.close()
