"""Damaged store files: moved under `<data_dir>/quarantine/<time>/`, reported, acknowledged.

A file the store cannot read is never deleted and never stops startup. It moves into a
quarantine folder of its own (one per event), with `report.json` saying what each file was,
why it was set aside and what acknowledged data losing it cost. The server reports degraded
(`/readyz` 503) while any folder lacks `acknowledged.json`; `lookout store ack-corruption`
writes one. The folders are the operator's to inspect, keep or delete.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

QUARANTINE_DIR = "quarantine"
REPORT = "report.json"
ACKNOWLEDGED = "acknowledged.json"


@dataclass(frozen=True)
class Damage:
    """One damaged part of the store, and what losing it cost."""

    path: str  # relative to the data directory (a table: `lookout.duckdb#logs_d20261127`)
    kind: str  # wal, database, table, parquet or series
    reason: str  # the error that gave it away
    lost: str  # the acknowledged data it cost, in words


class Quarantine:
    """The quarantine folder of one event, created when the first damaged file moves in."""

    def __init__(self, data_dir: Path, now: datetime) -> None:
        self.data_dir = data_dir
        self.stamp = now.strftime("%Y%m%dT%H%M%S.%fZ")
        self.folder = data_dir / QUARANTINE_DIR / self.stamp
        self.damages: list[Damage] = []

    def move(self, path: Path, damage: Damage | None, keep_as: str | None = None) -> None:
        """Move `path` (if it exists) under the folder, at its path relative to the data
        directory (or `keep_as`), and report `damage` (None: it goes along with another)."""
        if path.exists():
            target = self.folder / (keep_as or path.relative_to(self.data_dir))
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(path, target)
        if damage is not None:
            self.record(damage)

    def keep(self, path: Path) -> None:
        """Put a copy of `path` under the folder (a hard link when it can), leaving it in
        place: the caller replaces it atomically, so a whole file is always there."""
        target = self.folder / path.relative_to(self.data_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, target)
        except OSError:
            shutil.copy2(path, target)

    def record(self, damage: Damage) -> None:
        """Report a loss with no file of its own (a table inside the database file)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        self.damages.append(damage)
        self._write_report()

    def _write_report(self) -> None:
        report = {
            "quarantined_at": self.stamp,
            "damaged": [asdict(d) for d in self.damages],
            "acknowledge_with": f"lookout store ack-corruption --data-dir {self.data_dir}",
        }
        partial = self.folder / (REPORT + ".partial")
        partial.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(partial, self.folder / REPORT)


def unacknowledged(data_dir: Path) -> list[Path]:
    """Quarantine folders nobody has acknowledged yet, oldest first."""
    root = data_dir / QUARANTINE_DIR
    try:
        folders = sorted(p for p in root.iterdir() if p.is_dir())
    except OSError:
        return []
    return [p for p in folders if (p / REPORT).exists() and not (p / ACKNOWLEDGED).exists()]


def acknowledge(data_dir: Path, now: datetime, by: str) -> list[Path]:
    """Mark every unacknowledged quarantine folder as seen; the folders it marked."""
    folders = unacknowledged(data_dir)
    for folder in folders:
        note = {"acknowledged_at": now.isoformat(), "by": by}
        (folder / ACKNOWLEDGED).write_text(json.dumps(note) + "\n")
    return folders


def damages_in(folder: Path) -> list[Damage]:
    """The damages a quarantine folder's report lists (none when it cannot be read)."""
    try:
        report = json.loads((folder / REPORT).read_text())
        return [Damage(**d) for d in report["damaged"]]
    except (OSError, ValueError, TypeError, KeyError):
        return []
