"""OTLP span and log requests decoded, converted and scrubbed in worker processes.

Python runs one thread of a process at a time, and turning an OTLP body into scrubbed
records is most of what ingest costs: about 25 µs of a log record's 35 µs (docs/server.md,
"Measured figures"). So the traces and logs routes hand the body to a pool of worker
processes and get back a Batch ready for the writer, while the server process goes on
reading requests, answering queries and writing the store. The answer still waits for the
commit.

- Spans and logs come back as columns of plain values (SpanColumns, LogColumns), a few µs
  a record to send and receive. Metric samples are objects, which cost more to pickle and
  unpickle than to decode here (34 µs a span when spans were objects, measured); they are
  decoded in the server.
- `decode_workers` sets the pool's size: by default one per core (at most 4); 0 decodes
  in the server process, as before the pool. A worker waits on the server process between
  requests (a request's body in, its columns out, the commit before the next one comes),
  so one fewer than the cores left a core idle: on 2 cores, 2 workers took 20 % more log
  records a second than 1, side by side, and 23 % more spans (docs/server.md).
- The pool starts at the first span or log request, which waits about a second for it: a
  server that never takes OTLP spans or logs never pays its memory. The workers
  are forked from a forkserver that has imported this module (forking the server itself
  is unsafe: it runs threads), so a replacement worker starts in milliseconds.
- A client's mistake raised in a worker (IngestError, or a payload of the wrong shape)
  comes back as the same exception, and the route answers as it would have.
- A worker that dies (killed, out of memory) fails the requests it held with 503 and
  Retry-After; the pool is replaced and the next request goes to a new worker.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import select
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field

from lookout.errors import StoreError
from lookout.ingest import metrics as otlp_metrics
from lookout.ingest import otlp
from lookout.ingest.limits import Limits
from lookout.ingest.scrub import BatchScrubber
from lookout.model import Batch
from lookout.sdk._scrub import Scrubber

MAX_AUTO_WORKERS = 4
CONVERTERS = {"traces": otlp.spans, "logs": otlp.logs, "metrics": otlp_metrics.samples}
POOLED = frozenset({"traces", "logs"})  # the signals the workers decode


class DecoderLostError(StoreError):
    """A decoding worker died with the request: nothing of it was stored; retry."""


@dataclass(frozen=True)
class DecodeSettings:
    """What decoding needs from the server's config (sent to each worker)."""

    limits: Limits = field(default_factory=Limits)
    scrub_key: str | None = None  # None: scrubbing is off


@dataclass
class Decoded:
    """A request's batch, and what was rejected from it and why."""

    batch: Batch
    rejected: int
    reasons: dict[str, int]

    def outcome(self) -> otlp.Outcome:
        """The rejections, as otlp.encode_response() reports them."""
        return otlp.Outcome(rejected=self.rejected, reasons=self.reasons)


class _Decoder:
    """Decodes, converts and scrubs one body: the same in a worker and in the server."""

    def __init__(self, settings: DecodeSettings, scrub: BatchScrubber | None = None) -> None:
        self.limits = settings.limits
        key = settings.scrub_key
        if key is not None and scrub is None:
            scrub = BatchScrubber(Scrubber(key.encode()))
        self.scrub = scrub if key is not None else None

    def __call__(self, signal: str, body: bytes, content_type: str, now_ns: int) -> Decoded:
        message = otlp.decode(signal, body, content_type)
        outcome = CONVERTERS[signal](message, self.limits, now_ns)
        batch = Batch()
        if signal == "traces":
            batch.spans = outcome.spans
        elif signal == "logs":
            batch.logs = outcome.logs
        else:
            batch.samples = outcome.records
        if self.scrub is not None:
            self.scrub(batch)
        return Decoded(batch, outcome.rejected, outcome.reasons)


_WORKER: _Decoder | None = None  # in a worker process: its decoder


def _start_worker(settings: DecodeSettings, server_pid: int) -> None:
    global _WORKER  # noqa: PLW0603 - one decoder per worker process, made at its start
    _WORKER = _Decoder(settings)
    threading.Thread(target=_exit_with, args=(server_pid,), daemon=True).start()


def _exit_with(server_pid: int) -> None:
    """End this worker when the server process ends, `kill -9` included. A worker waits on
    its queue forever otherwise, and keeps the forkserver (which waits for its children),
    and the server's stdout, which both hold, open with it."""
    try:
        watched = os.pidfd_open(server_pid)
    except (AttributeError, OSError):  # no pidfd (not Linux 5.3+): look twice a second
        while _alive(server_pid):
            time.sleep(0.5)
    else:
        select.select([watched], [], [])  # readable when the process has ended
    os._exit(0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):  # gone, or its number reused by another
        return False
    return True


def _in_worker(signal: str, body: bytes, content_type: str, now_ns: int) -> Decoded:
    assert _WORKER is not None, "a decoding worker runs _start_worker first"
    return _WORKER(signal, body, content_type, now_ns)


def _ready() -> int:
    return os.getpid()


def auto_workers(cores: int | None = None) -> int:
    """The default pool size: one per core, at most MAX_AUTO_WORKERS."""
    return min(MAX_AUTO_WORKERS, cores or os.cpu_count() or 1)


class Decoders:
    """The OTLP decoders of one server: the pool for spans and logs (none with 0 workers),
    and the server process's own for the rest."""

    def __init__(
        self, settings: DecodeSettings, workers: int, scrub: BatchScrubber | None = None
    ) -> None:
        """`scrub`: the server's own scrubber, to share its cache with the other routes."""
        self.settings = settings
        self.workers = workers
        self._inline = _Decoder(settings, scrub)
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()
        self.replaced = 0  # pools replaced after a worker died

    def _executor(self) -> ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload([__name__])
                self._pool = ProcessPoolExecutor(
                    self.workers,
                    mp_context=context,
                    initializer=_start_worker,
                    initargs=(self.settings, os.getpid()),
                )
            return self._pool

    def start(self) -> list[int]:
        """Start every worker now, not at the first pooled request; the process ids that
        answered (one worker may answer for another still starting)."""
        if not self.workers:
            return []
        executor = self._executor()
        return [
            future.result() for future in [executor.submit(_ready) for _ in range(self.workers)]
        ]

    async def decode(self, signal: str, body: bytes, content_type: str, now_ns: int) -> Decoded:
        if not self.workers or signal not in POOLED:
            return self._inline(signal, body, content_type, now_ns)
        executor = self._executor()
        try:
            future = executor.submit(_in_worker, signal, body, content_type, now_ns)
            return await asyncio.wrap_future(future)
        except BrokenProcessPool as exc:
            self._replace(executor)
            raise DecoderLostError(
                "A decoding worker stopped while it held this request; nothing of it was "
                "stored. Retry."
            ) from exc

    def _replace(self, broken: ProcessPoolExecutor) -> None:
        """A new pool for the next requests (once, however many requests saw it break)."""
        with self._lock:
            if self._pool is broken:
                self._pool = None
                self.replaced += 1
        broken.shutdown(wait=False, cancel_futures=True)

    def pids(self) -> list[int]:
        """The worker processes running now."""
        pool = self._pool
        processes = getattr(pool, "_processes", None) or {}
        return sorted(pid for pid, process in processes.items() if process.is_alive())

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
