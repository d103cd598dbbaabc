"""The embedded DuckDB store: one writer thread, readers on their own cursors."""

from lookout.store.db import Database
from lookout.store.schema import SCHEMA_VERSION
from lookout.store.writer import Writer, issue_id, series_id

__all__ = ["SCHEMA_VERSION", "Database", "Writer", "issue_id", "series_id"]
