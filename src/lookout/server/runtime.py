"""What one running server holds: its config, the store, the writer and its own metrics."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from lookout.config import Project, ServerConfig
from lookout.errors import StoreError
from lookout.ingest.limits import Limits
from lookout.model import Batch
from lookout.sdk._scrub import Scrubber
from lookout.selfmetrics import ServerMetrics
from lookout.server.derived import DerivedMetrics
from lookout.store import Database, Writer


@dataclass
class ServerRuntime:
    config: ServerConfig
    database: Database
    writer: Writer
    metrics: ServerMetrics
    derived: DerivedMetrics = field(default_factory=DerivedMetrics)
    limits: Limits = field(default_factory=Limits)
    started_ns: int = field(default_factory=time.time_ns)

    @classmethod
    def open(cls, config: ServerConfig, metrics: ServerMetrics | None = None) -> ServerRuntime:
        metrics = metrics or ServerMetrics()
        derived = DerivedMetrics()
        database = Database(config.data_dir)
        writer = Writer(database, metrics, on_commit=derived.observe)
        writer.start()
        return cls(config, database, writer, metrics, derived)

    @property
    def scrubber(self) -> Scrubber:
        """The SDK's scrubber with the shared key: how a phone-number search is hashed."""
        return Scrubber(self.config.scrub_key.encode())

    def project(self, project_id: int) -> Project | None:
        return next((p for p in self.config.projects if p.id == project_id), None)

    def ready(self) -> bool:
        return self.writer.alive

    async def store(self, batch: Batch) -> int:
        """Write a request's records and wait for the commit."""
        if not len(batch) and batch.dedup_key is None:
            return 0
        future = self.writer.submit(batch)
        return await asyncio.wrap_future(future)

    def close(self) -> None:
        self.writer.stop()
        try:
            self.database.close()
        except Exception as exc:
            raise StoreError(f"Closing the store failed: {exc}") from exc
