"""The embedded DuckDB store: one writer thread, readers on their own cursors."""

from lookout.store.db import Database
from lookout.store.quarantine import Damage, Quarantine, acknowledge, damages_in, unacknowledged
from lookout.store.recovery import digest_damage
from lookout.store.retention import Retention, RetentionPolicy, RetentionReport, parse_retention
from lookout.store.schema import SCHEMA_VERSION
from lookout.store.writer import Writer, issue_id, series_id

__all__ = [
    "SCHEMA_VERSION",
    "Damage",
    "Database",
    "Quarantine",
    "Retention",
    "RetentionPolicy",
    "RetentionReport",
    "Writer",
    "acknowledge",
    "damages_in",
    "digest_damage",
    "issue_id",
    "parse_retention",
    "series_id",
    "unacknowledged",
]
