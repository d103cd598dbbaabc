"""Opening the store after a crash or after damage: never refuse to start over a damaged
file, lose as little acknowledged data as possible, and say exactly what was lost.

The cheapest loss is tried first:

1. **The WAL** (`lookout.duckdb.wal`) holds what was committed since the last checkpoint.
   When DuckDB cannot replay it, the WAL alone is quarantined and the database file opens
   as of its last checkpoint. DuckDB treats a WAL whose damage looks like a torn last write
   as ended there, silently; so every commit also numbers itself (`store_commits`) and the
   writer keeps the last number it saw committed in `lookout.commit`. A replay that ends
   before that number lost acknowledged commits: the WAL as it was (copied aside before
   the replay) is quarantined.
2. **A table inside the database file.** Every table is read in full at startup. When some
   cannot be read, the readable ones are copied into a new database file, the old file is
   quarantined, and only the unreadable tables are lost.
3. **The database file.** When it cannot be opened at all it is quarantined whole and a
   new one is made. What the Parquet files of closed days need from it is rebuilt from files
   outside it: the file list from the files themselves, `series` from the snapshots written
   beside them (`series/*.parquet`), `issues` from the error events.

Parquet files are checked at startup (their framing) and their content digests, which are
part of their names, in the background (see server/integrity.py); a damaged one is
quarantined alone. Errors that are not damage (another process holds the lock, no
permission, no space, a newer DuckDB's file) still stop startup: quarantining a healthy
store would be worse.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from lookout.errors import StoreError
from lookout.store.quarantine import Damage, Quarantine
from lookout.store.schema import DAY_TABLES

COMMIT_MARK = "lookout.commit"
STAGED = ".before-replay"
SERIES_DIR = "series"
WAL_SUFFIXES = (".wal", ".checkpoint.wal", ".recovery.wal")
# Tables whose rows can be rebuilt from files outside the database file.
RESTORABLE = ("partitions", "partition_files", "series", "issues")
# Errors that say something about the machine, not about the file: never quarantine on them.
NOT_DAMAGE = (
    "could not set lock",
    "conflicting lock",
    "permission denied",
    "no space left",
    "read-only file system",
    "too many open files",
    "version number",
    "newer version",
)
LOST_WAL = "the transactions committed since the last checkpoint (at most 5 minutes of ingest)"
LOST_DATABASE = (
    "every record not yet moved to Parquet (at most about an hour of ingest, all signals); "
    "closed days stay readable"
)
_DAY_TABLE = re.compile(rf"({'|'.join(DAY_TABLES)})_d(\d{{8}})")
_PARQUET_NAME = re.compile(r"(\d{8})-(\d+)(?:-([0-9a-f]{16}))?\.parquet")


def connect(path: Path, memory_limit: str | None = None) -> duckdb.DuckDBPyConnection:
    # Nothing may be downloaded at run time: extensions come built in or not at all. No
    # progress bar: it would print into the server's JSON log lines on stdout. Parquet
    # footers are cached: every trace lookup opens each closed day's files. The memory
    # limit holds from the start: the startup check reads every table, and without it
    # DuckDB kept what it read (1.6 GB for a day table of 10 M spans; 419 MB with 256 MiB).
    config: dict[str, str | bool | int | float | list[str]] = {
        "autoinstall_known_extensions": False,
        "parquet_metadata_cache": True,
    }
    if memory_limit is not None:
        config["memory_limit"] = memory_limit
    connection = duckdb.connect(str(path), config=config)
    connection.execute("SET enable_progress_bar = false")
    return connection


def _quoted(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _is_damage(error: duckdb.Error) -> bool:
    text = str(error).lower()
    return not any(marker in text for marker in NOT_DAMAGE)


def _first_line(error: BaseException) -> str:
    return str(error).strip().splitlines()[0][:500] if str(error).strip() else repr(error)


# -- the commit mark --------------------------------------------------------------------


class CommitMark:
    """The number of the last commit the writer saw succeed, in a small file beside the
    database: 8 bytes of number, 8 of its hash. Written after each commit (no fsync: a
    stale mark is a lower one, which only weakens the check), fsynced when lowered."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    @staticmethod
    def _encode(seq: int) -> bytes:
        number = seq.to_bytes(8, "big")
        return number + hashlib.blake2b(number, digest_size=8).digest()

    def read(self) -> int | None:
        """The mark, or None when there is none (or it is itself damaged)."""
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        seq = int.from_bytes(data[:8], "big")
        return seq if len(data) == 16 and data == self._encode(seq) else None

    def write(self, seq: int, *, sync: bool = False) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        os.pwrite(self._fd, self._encode(seq), 0)
        if sync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class Commits:
    """Numbers the writer's transactions so that startup can tell the WAL lost some."""

    def __init__(self, mark: CommitMark, last: int) -> None:
        self.mark = mark
        self.last = last

    def commit(self, connection: duckdb.DuckDBPyConnection) -> int:
        """Record the open transaction's number in it (an append, cheap), then COMMIT."""
        seq = self.last + 1
        connection.execute("INSERT INTO store_commits VALUES (?)", [seq])
        connection.execute("COMMIT")
        return seq

    def committed(self, seq: int) -> None:
        """After COMMIT returned."""
        self.last = seq
        self.mark.write(seq)

    def prune(self, connection: duckdb.DuckDBPyConnection) -> None:
        """Keep only the last number (maintenance, between transactions)."""
        connection.execute("DELETE FROM store_commits WHERE seq < ?", [self.last])


def _commit_seq(connection: duckdb.DuckDBPyConnection) -> int | None:
    exists = connection.execute(
        "SELECT count(*) FROM duckdb_tables() WHERE database_name = current_database() "
        "AND table_name = 'store_commits'"
    ).fetchone()
    if not exists or not exists[0]:
        return None
    row = connection.execute("SELECT max(seq) FROM store_commits").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


# -- opening the database file ----------------------------------------------------------


@dataclass
class Opened:
    """The open connection, and what startup must still rebuild from outside the file."""

    connection: duckdb.DuckDBPyConnection
    commits: Commits
    restore: set[str] = field(default_factory=set)  # names from RESTORABLE


def open_database(path: Path, quarantine: Quarantine, memory_limit: str | None = None) -> Opened:
    """Open `path`, quarantining a damaged WAL, damaged tables or the damaged file;
    `memory_limit` is DuckDB's (such as `256MiB`), from the first statement on."""
    mark = CommitMark(path.with_name(COMMIT_MARK))
    for leftover in path.parent.glob(f"{path.name}*{STAGED}"):
        leftover.unlink()  # from a startup that died half way
    if not path.exists():
        restore = _missing(path, quarantine)
        connection = connect(path, memory_limit)
    else:
        wals = [w for w in (path.with_name(path.name + s) for s in WAL_SUFFIXES) if w.exists()]
        staged = _stage(wals)
        try:
            connection, restore = _open(
                path, quarantine, wals, staged, mark.read(), memory_limit=memory_limit
            )
        finally:
            for copy in staged.values():
                copy.unlink(missing_ok=True)
    seq = _commit_seq(connection) or 0
    mark.write(seq, sync=True)
    return Opened(connection, Commits(mark, seq), restore)


def _missing(path: Path, quarantine: Quarantine) -> set[str]:
    """A new store; or, when files of closed days exist, a database file that went missing:
    then they must be found again, not deleted as leftovers."""
    data_dir = path.parent
    outside = [data_dir / signal for signal in DAY_TABLES] + [data_dir / SERIES_DIR]
    if not any(p.suffix == ".parquet" for folder in outside for p in folder.glob("*")):
        return set()
    reason = "it is missing, while Parquet files of closed days are there"
    quarantine.record(Damage(path.name, "database", reason, LOST_DATABASE))
    for suffix in WAL_SUFFIXES:  # a WAL without its database cannot be replayed
        quarantine.move(path.with_name(path.name + suffix), None)
    return set(RESTORABLE)


def _stage(wals: list[Path]) -> dict[Path, Path]:
    """Copies of the WAL files as they were: DuckDB may consume them during replay."""
    staged = {}
    for wal in wals:
        copy = wal.with_name(wal.name + STAGED)
        shutil.copyfile(wal, copy)
        staged[wal] = copy
    return staged


def _open(
    path: Path,
    quarantine: Quarantine,
    wals: list[Path],
    staged: dict[Path, Path],
    acknowledged: int | None,
    *,
    memory_limit: str | None,
) -> tuple[duckdb.DuckDBPyConnection, set[str]]:
    try:
        connection = _connect_or_raise(path, memory_limit)
    except duckdb.Error as exc:
        if not wals:
            return _replace_database(path, quarantine, exc, memory_limit)
        for wal in wals:  # set aside first: the database file may open without it
            quarantine.move(wal, None)
        try:
            connection = _connect_or_raise(path, memory_limit)
        except duckdb.Error as again:  # the file itself: the WAL goes along with it
            return _replace_database(path, quarantine, again, memory_limit)
        reason = f"the store would not open with it: {_first_line(exc)}"
        quarantine.record(Damage(wals[0].name, "wal", reason, LOST_WAL))
    else:
        _check_replay(connection, quarantine, staged, acknowledged)
    return _verified(connection, path, quarantine, memory_limit)


def _verified(
    connection: duckdb.DuckDBPyConnection,
    path: Path,
    quarantine: Quarantine,
    memory_limit: str | None,
) -> tuple[duckdb.DuckDBPyConnection, set[str]]:
    """Read every table; salvage the readable ones when some are not."""
    try:
        damaged = _unreadable_tables(connection)
        if not damaged:
            return connection, set()
        return _salvage(connection, path, quarantine, damaged, memory_limit)
    except duckdb.Error as exc:  # the catalog, or DuckDB invalidated the database on a read
        with contextlib.suppress(duckdb.Error):
            connection.close()
        return _replace_database(path, quarantine, exc, memory_limit)


def _connect_or_raise(path: Path, memory_limit: str | None) -> duckdb.DuckDBPyConnection:
    """Connect; errors that are not damage become a StoreError that stops startup."""
    try:
        return connect(path, memory_limit)
    except duckdb.Error as exc:
        if not _is_damage(exc):
            raise StoreError(f"Cannot open the store {path}: {exc}") from exc
        raise


def _check_replay(
    connection: duckdb.DuckDBPyConnection,
    quarantine: Quarantine,
    staged: dict[Path, Path],
    acknowledged: int | None,
) -> None:
    """Quarantine the WAL as it was when its replay ended before the last acknowledged
    commit (DuckDB reads damage that looks like a torn write as the end of the log)."""
    if acknowledged is None:
        return
    try:
        replayed = _commit_seq(connection)
    except duckdb.Error:
        return  # store_commits itself is unreadable: the table check handles it
    if replayed is None or replayed >= acknowledged:
        return
    reason = (
        f"the WAL replayed up to commit {replayed}, but commit {acknowledged} had been "
        "acknowledged: the WAL is truncated or damaged"
    )
    lost = f"{acknowledged - replayed} acknowledged commits (ingest requests, grouped)"
    if not staged:
        quarantine.record(Damage("lookout.duckdb.wal", "wal", reason + " (it is missing)", lost))
    for wal, copy in staged.items():
        quarantine.move(copy, Damage(wal.name, "wal", reason, lost), keep_as=wal.name)


def _unreadable_tables(connection: duckdb.DuckDBPyConnection) -> dict[str, str]:
    """Read every table in full (every block is checksummed): name -> error."""
    names = [
        name
        for (name,) in connection.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "ORDER BY table_name"
        ).fetchall()
    ]
    damaged = {}
    for name in names:
        try:
            connection.execute(f"SELECT bit_xor(hash(COLUMNS(*))) FROM {_ident(name)}").fetchall()
        except duckdb.Error as exc:
            damaged[name] = _first_line(exc)
    return damaged


def _replace_database(
    path: Path, quarantine: Quarantine, error: duckdb.Error | str, memory_limit: str | None
) -> tuple[duckdb.DuckDBPyConnection, set[str]]:
    """Quarantine the database file (and what is left of its WAL); start a new one."""
    reason = error if isinstance(error, str) else _first_line(error)
    quarantine.move(path, Damage(path.name, "database", reason, LOST_DATABASE))
    for suffix in WAL_SUFFIXES:
        quarantine.move(path.with_name(path.name + suffix), None)
    return connect(path, memory_limit), set(RESTORABLE)


def _salvage(
    connection: duckdb.DuckDBPyConnection,
    path: Path,
    quarantine: Quarantine,
    damaged: dict[str, str],
    memory_limit: str | None,
) -> tuple[duckdb.DuckDBPyConnection, set[str]]:
    """Copy the readable tables into a new database file; quarantine the old file."""
    if "schema_version" in damaged:  # which migrations ran is unknown: start over
        raise duckdb.Error(damaged["schema_version"])
    rebuilt = path.with_name(path.name + ".rebuild")
    for leftover in (rebuilt, rebuilt.with_name(rebuilt.name + ".wal")):
        leftover.unlink(missing_ok=True)
    row = connection.execute("SELECT current_database()").fetchone()
    source = _ident(str(row[0])) if row else "main"
    tables = connection.execute(
        "SELECT table_name, sql FROM duckdb_tables() WHERE database_name = current_database()"
    ).fetchall()
    connection.execute(f"ATTACH {_quoted(str(rebuilt))} AS lookout_rebuild")
    connection.execute("USE lookout_rebuild")
    for _, sql in tables:
        connection.execute(sql)
    connection.execute(f"USE {source}")
    for name, _ in tables:
        if name in damaged:
            continue
        target = f"lookout_rebuild.main.{_ident(name)}"
        try:
            connection.execute(f"INSERT INTO {target} SELECT * FROM {source}.main.{_ident(name)}")
        except duckdb.Error as exc:
            damaged[name] = _first_line(exc)
            connection.execute(f"DELETE FROM {target}")
    for name in damaged:
        if _DAY_TABLE.fullmatch(name):
            connection.execute(f"DROP TABLE lookout_rebuild.main.{_ident(name)}")
    connection.execute("CHECKPOINT lookout_rebuild")
    connection.execute("DETACH lookout_rebuild")
    with contextlib.suppress(duckdb.Error):  # the damaged file goes to quarantine anyway
        connection.close()
    for name, reason in sorted(damaged.items()):
        quarantine.record(Damage(f"{path.name}#{name}", "table", reason, _lost_with(name)))
    for suffix in WAL_SUFFIXES:  # the old file's: never to be replayed into the new one
        quarantine.move(path.with_name(path.name + suffix), None)
    quarantine.keep(path)
    os.replace(rebuilt, path)  # a crash on either side of it leaves a whole database file
    return connect(path, memory_limit), {name for name in damaged if name in RESTORABLE} | {
        "partitions"
    }


def _lost_with(table: str) -> str:
    match = _DAY_TABLE.fullmatch(table)
    if match:
        return (
            f"the {match.group(1)} of {match.group(2)} not yet moved to Parquet "
            "(at most about an hour of that signal)"
        )
    if table == "series":
        return (
            "the names and labels of the series first seen in the last five minutes (their "
            "samples stay, unnamed); older ones are rebuilt from series/ snapshots"
        )
    if table in RESTORABLE:
        return "nothing acknowledged: rebuilt from the files outside the database"
    return "nothing acknowledged (bookkeeping)"


# -- rebuilding what the Parquet files need ---------------------------------------------


def restore(
    connection: duckdb.DuckDBPyConnection, data_dir: Path, tables: set[str], quarantine: Quarantine
) -> None:
    """Refill lost bookkeeping tables (after migrations; `issues` waits for the views)."""
    if "partitions" in tables:
        connection.execute("DELETE FROM partitions")
        for (name,) in connection.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database()"
        ).fetchall():
            match = _DAY_TABLE.fullmatch(name)
            if match:
                connection.execute(
                    "INSERT INTO partitions VALUES (?, ?, ?)", [match[1], match[2], name]
                )
    if "partition_files" in tables:
        connection.execute("DELETE FROM partition_files")
        for signal, day, relative, rows in discover_parquet(data_dir, quarantine):
            connection.execute(
                "INSERT INTO partition_files VALUES (?, ?, ?, ?, ?)",
                [signal, day, relative, rows, time.time_ns()],
            )
    if "series" in tables:
        restore_series(connection, data_dir, quarantine)


def discover_parquet(data_dir: Path, quarantine: Quarantine) -> list[tuple[str, str, str, int]]:
    """(signal, day, relative path, rows) of every intact Parquet file of closed days."""
    found = []
    for signal in DAY_TABLES:
        for path in sorted((data_dir / signal).glob("*.parquet")):
            match = _PARQUET_NAME.fullmatch(path.name)
            relative = str(path.relative_to(data_dir))
            problem = parquet_damage(path) if match else None
            if problem is not None:
                quarantine.move(path, Damage(relative, "parquet", problem, lost_in_file(relative)))
                continue
            if match is None:
                continue
            found.append((signal, match[1], relative, parquet_rows(path)))
    return found


def parquet_rows(path: Path) -> int:
    with duckdb.connect() as connection:
        row = connection.execute(
            "SELECT num_rows FROM parquet_file_metadata(?)", [str(path)]
        ).fetchone()
    return int(row[0]) if row else 0


def restore_series(
    connection: duckdb.DuckDBPyConnection, data_dir: Path, quarantine: Quarantine
) -> int:
    """Add the series of the snapshots that the table lacks; the rows added."""
    before = connection.execute("SELECT count(*) FROM series").fetchone()
    for path in sorted((data_dir / SERIES_DIR).glob("*.parquet")):
        relative = str(path.relative_to(data_dir))
        problem = parquet_damage(path)
        try:
            if problem is None:
                connection.execute(
                    "INSERT INTO series SELECT * FROM read_parquet(?) "
                    "WHERE series_id NOT IN (SELECT series_id FROM series)",
                    [str(path)],
                )
        except duckdb.Error as exc:
            problem = _first_line(exc)
        if problem is not None:
            lost = "the names and labels of the series it held (their samples stay, unnamed)"
            quarantine.move(path, Damage(relative, "series", problem, lost))
    after = connection.execute("SELECT count(*) FROM series").fetchone()
    return (after[0] if after else 0) - (before[0] if before else 0)


def check_series_snapshots(
    connection: duckdb.DuckDBPyConnection, data_dir: Path, quarantine: Quarantine, now_ns: int
) -> None:
    """Quarantine snapshots whose framing is broken, and write a complete one in their place."""
    damaged = False
    for path in sorted((data_dir / SERIES_DIR).glob("*.parquet")):
        problem = parquet_damage(path)
        if problem is not None:
            relative = str(path.relative_to(data_dir))
            lost = "nothing: a complete snapshot was written in its place"
            quarantine.move(path, Damage(relative, "series", problem, lost))
            damaged = True
    if damaged:
        snapshot_series(connection, data_dir, now_ns, full=True)


def restore_issues(connection: duckdb.DuckDBPyConnection) -> None:
    """Rebuild `issues` from the error events (call once the views exist)."""
    connection.execute(
        """INSERT INTO issues
        SELECT issue_id, any_value(project_id), any_value(fingerprint), arg_min(title, ts_ns),
               arg_min(exception_type, ts_ns), min(ts_ns)
        FROM events WHERE issue_id NOT IN (SELECT issue_id FROM issues) GROUP BY issue_id"""
    )


def snapshot_series(
    connection: duckdb.DuckDBPyConnection, data_dir: Path, now_ns: int, *, full: bool = False
) -> int:
    """Write the series first seen since the last snapshot (all of them with `full`) to
    `series/<upto>-<now>.parquet` (maintenance, on the writer thread): the Parquet samples
    stay nameable without the database file. The rows written."""
    folder = data_dir / SERIES_DIR
    folder.mkdir(exist_ok=True)
    upto = -1
    if not full:
        upto = max(
            (int(p.name.split("-")[0]) for p in folder.glob("*.parquet") if p.name[0].isdigit()),
            default=-1,
        )
    row = connection.execute(
        "SELECT count(*), max(first_seen_ns) FROM series WHERE first_seen_ns > ?", [upto]
    ).fetchone()
    if not row or not row[0]:
        return 0
    final = folder / f"{row[1]}-{now_ns}.parquet"
    partial = final.with_name(final.name + ".partial")
    connection.execute(
        f"COPY (SELECT * FROM series WHERE first_seen_ns > ? ORDER BY first_seen_ns) "
        f"TO {_quoted(str(partial))} (FORMAT parquet)",
        [upto],
    )
    durable_rename(partial, final)
    return int(row[0])


# -- Parquet files ----------------------------------------------------------------------


def file_digest(path: Path) -> str:
    """The 16-hex digest a Parquet file carries in its name."""
    digest = hashlib.blake2b(digest_size=8)
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def named_digest(path: str) -> str | None:
    """The digest in a Parquet file's name (files written before digests have none)."""
    match = _PARQUET_NAME.fullmatch(Path(path).name)
    return match[3] if match else None


def digest_damage(data_dir: Path, relative: str) -> Damage | None:
    """A Damage when the file's content no longer matches the digest in its name (None for
    a file without one, or gone). Reads the whole file: call it off the event loop."""
    expected = named_digest(relative)
    if expected is None:
        return None
    try:
        actual = file_digest(data_dir / relative)
    except FileNotFoundError:
        return None  # retention dropped it meanwhile
    if actual == expected:
        return None
    reason = f"its content digest is {actual}, its name says {expected}"
    return Damage(relative, "parquet", reason, lost_in_file(relative))


def parquet_damage(path: Path) -> str | None:
    """Why the file's framing is broken (a cheap check: magic and footer length), or None."""
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(4)
            handle.seek(max(size - 8, 0))
            tail = handle.read(8)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    if size < 12 or head != b"PAR1" or tail[4:] != b"PAR1":
        return f"not a whole Parquet file ({size} bytes; truncated or overwritten)"
    footer = int.from_bytes(tail[:4], "little")
    if footer + 12 > size:
        return f"its footer claims {footer} bytes of a {size}-byte file"
    return None


def lost_in_file(relative: str) -> str:
    signal, name = relative.split("/", 1) if "/" in relative else ("?", relative)
    span = "at most an hour of them" if named_digest(relative) else "up to the whole day"
    return f"the {signal} of {name[:8]} that this file held ({span})"


def durable_rename(partial: Path, final: Path) -> None:
    """fsync the file, rename it into place, fsync the folder: it survives power loss too."""
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, final)
    folder = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)
