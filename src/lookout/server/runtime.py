"""What one running server holds: its config, the store, the writer, the OTLP decoders and
its own metrics."""

from __future__ import annotations

import asyncio
import shutil
import time
from dataclasses import dataclass, field

from lookout.config import Project, ServerConfig
from lookout.errors import DiskFullError, StoreError
from lookout.ingest.limits import Limits
from lookout.ingest.scrub import BatchScrubber
from lookout.model import Batch
from lookout.sdk._scrub import Scrubber
from lookout.selfmetrics import ServerMetrics
from lookout.server.decoding import Decoders, DecodeSettings, auto_workers
from lookout.server.derived import DerivedMetrics
from lookout.store import Database, Writer

WAL_AUTOCHECKPOINT = "256MiB"  # a backstop only; see ServerRuntime.open


@dataclass
class ServerRuntime:
    config: ServerConfig
    database: Database
    writer: Writer
    metrics: ServerMetrics
    derived: DerivedMetrics = field(default_factory=DerivedMetrics)
    limits: Limits = field(default_factory=Limits)
    decoders: Decoders = field(default_factory=lambda: Decoders(DecodeSettings(), 0))
    started_ns: int = field(default_factory=time.time_ns)
    _scrub_batch: BatchScrubber | None = field(default=None, init=False, repr=False)
    _disk_checked_s: float = field(default=-1.0, init=False, repr=False)
    _disk_full: bool = field(default=False, init=False, repr=False)

    @classmethod
    def open(cls, config: ServerConfig, metrics: ServerMetrics | None = None) -> ServerRuntime:
        metrics = metrics or ServerMetrics()
        derived = DerivedMetrics()
        megabytes = max(64, config.store_memory_limit // (1024 * 1024))  # an int: not input
        database = Database(config.data_dir, f"{megabytes}MiB")
        # Checkpoints stall the writer (about a third of a second here, whatever the WAL
        # holds), so they happen on schedule (selfobserve.py, every 5 minutes) and not at
        # DuckDB's default 16 MB of WAL: at 5,000 spans/s that was one stall every 12 s,
        # and ingest's p99 acknowledgement time was that stall.
        database.connection.execute(f"SET wal_autocheckpoint = '{WAL_AUTOCHECKPOINT}'")
        writer = Writer(database, metrics, on_commit=derived.observe, limits=config.limits)
        writer.start()
        scrub = BatchScrubber(Scrubber(config.scrub_key.encode())) if config.scrub else None
        workers = auto_workers() if config.decode_workers is None else config.decode_workers
        settings = DecodeSettings(config.limits, config.scrub_key if config.scrub else None)
        decoders = Decoders(settings, workers, scrub)  # workers start at the first request
        runtime = cls(config, database, writer, metrics, derived, config.limits, decoders)
        runtime._scrub_batch = scrub
        return runtime

    @property
    def scrubber(self) -> Scrubber:
        """The SDK's scrubber with the shared key: how a phone-number search is hashed."""
        return Scrubber(self.config.scrub_key.encode())

    def project(self, project_id: int) -> Project | None:
        return next((p for p in self.config.projects if p.id == project_id), None)

    def ready(self) -> bool:
        return self.writer.alive

    async def store(self, batch: Batch, *, scrubbed: bool = False) -> int:
        """Scrub a request's records (unless the decoders did), write them and wait for
        the commit."""
        if not len(batch) and batch.dedup_key is None:
            return 0
        self.check_disk()
        if self._scrub_batch is not None and not scrubbed:
            self._scrub_batch(batch)
        future = self.writer.submit(batch)
        return await asyncio.wrap_future(future)

    def check_disk(self) -> None:
        """DiskFullError while the data directory's disk is fuller than the limit (looked
        at once a second at most)."""
        now = time.monotonic()
        if now - self._disk_checked_s >= 1.0:
            self._disk_checked_s = now
            try:
                usage = shutil.disk_usage(self.config.data_dir)
            except OSError:
                return
            ratio = usage.used / usage.total if usage.total else 0.0
            self._disk_full = ratio >= self.limits.disk_full_ratio
            self.metrics.disk_used_ratio.set(ratio)
            self.metrics.disk_full.set(1 if self._disk_full else 0)
        if self._disk_full:
            raise DiskFullError(
                f"The disk of {self.config.data_dir} is at least "
                f"{self.limits.disk_full_ratio:.0%} full; ingest resumes when space is freed "
                "(retention, or a larger disk)."
            )

    def close(self) -> None:
        self.decoders.close()
        self.writer.stop()
        try:
            self.database.close()
        except Exception as exc:
            raise StoreError(f"Closing the store failed: {exc}") from exc
