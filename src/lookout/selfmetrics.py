"""The server's measurements of itself, on a registry of its own.

They are written straight into the server's own store (see server/selfobserve.py), never
sent through its ingest endpoints, so observing itself cannot feed back into more ingest.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        registry = self.registry
        self.commit_batch_rows = Histogram(
            "lookout_store_commit_batch_rows",
            "Rows written by one commit of the store's writer.",
            buckets=(1, 10, 50, 100, 500, 1000, 5000, 10000, 50000),
            registry=registry,
        )
        self.commit_seconds = Histogram(
            "lookout_store_commit_duration_seconds",
            "Time one commit of the store's writer took.",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=registry,
        )
        self.queue_depth = Gauge(
            "lookout_store_writer_queue_depth",
            "Requests waiting for the store's writer.",
            registry=registry,
        )
        self.records = Counter(
            "lookout_ingest_records",
            "Records accepted, by signal.",
            ["signal"],
            registry=registry,
        )
        self.rejected = Counter(
            "lookout_ingest_rejected",
            "Records or requests rejected, by signal and reason.",
            ["signal", "reason"],
            registry=registry,
        )
        self.duplicates = Counter(
            "lookout_store_duplicates",
            "Records dropped as resends of records already stored.",
            ["signal"],
            registry=registry,
        )
        self.retention_dropped = Counter(
            "lookout_store_retention_dropped_partitions",
            "Partitions (a signal's day) dropped by retention, by signal and reason (age, bytes).",
            ["signal", "reason"],
            registry=registry,
        )
        self.signal_bytes = Gauge(
            "lookout_store_signal_bytes",
            "Bytes on disk of a signal: its Parquet files and its day tables' DuckDB blocks.",
            ["signal"],
            registry=registry,
        )
        self.data_dir_bytes = Gauge(
            "lookout_store_data_dir_bytes",
            "Bytes on disk under the data directory, as du counts them (retention.max_bytes).",
            registry=registry,
        )
        self.requests = Counter(
            "lookout_ingest_requests",
            "Ingest requests answered, by endpoint and status code.",
            ["endpoint", "code"],
            registry=registry,
        )
        self.client_discarded = Counter(
            "lookout_sdk_client_discarded",
            "Events sentry-sdk clients report they dropped (client reports), by reason.",
            ["reason", "category"],
            registry=registry,
        )
        self.shipper_dropped = Counter(
            "lookout_run_dropped_lines",
            "Lines `lookout run` dropped because its buffer was full (the server was down).",
            registry=registry,
        )
        self.disk_used_ratio = Gauge(
            "lookout_store_disk_used_ratio",
            "Used share of the disk holding the data directory.",
            registry=registry,
        )
        self.disk_full = Gauge(
            "lookout_store_disk_full",
            "1 while ingest answers 503 because the disk is past the disk_full limit.",
            registry=registry,
        )
        self.corruptions = Counter(
            "lookout_store_corruptions",
            "Damaged store files (or tables) moved to quarantine/, by kind: wal, database, "
            "table, parquet or series.",
            ["kind"],
            registry=registry,
        )
        self.skipped_items = Counter(
            "lookout_sentry_items_skipped",
            "Envelope items of types the server does not store, by type.",
            ["type"],
            registry=registry,
        )
