"""`lookout server`: one process, two ports, one store.

Both uvicorn servers run on one event loop. The process, not uvicorn, owns SIGINT and
SIGTERM, so one signal stops both servers, then the writer drains and the store closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from collections.abc import Iterator

import uvicorn

import lookout.sdk
from lookout.config import ServerConfig
from lookout.server import integrity
from lookout.server.app import main_app, otlp_app
from lookout.server.runtime import ServerRuntime
from lookout.server.scraper import Scraper
from lookout.server.selfobserve import compact_forever, observe_forever
from lookout.store import Retention

RETAIN_EVERY_S = 60.0


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to `serve()` below."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def retain_forever(runtime: ServerRuntime, every_s: float = RETAIN_EVERY_S) -> None:
    """Enforce `retention` now (after the startup compaction) and then every `every_s`."""
    log = lookout.sdk.get_logger("lookout.server")
    retention = Retention(runtime.database, runtime.config.retention, runtime.metrics)
    while True:
        try:
            report = await asyncio.wrap_future(retention.submit(runtime.writer, time.time()))
        except Exception as exc:  # noqa: BLE001 - a failed run is retried at the next
            log.warning("retention_failed", error=repr(exc))
        else:
            if report.closed:
                log.info("retention_closed_early", partitions=len(report.closed))
            for drop in report.dropped:
                log.info("retention_dropped", signal=drop.signal, day=drop.day,
                         reason=drop.reason, bytes=drop.bytes)  # fmt: skip
        await asyncio.sleep(every_s)


def _uvicorn(app: object, config: ServerConfig, port: int) -> _Server:
    tls = config.tls_cert is not None and config.tls_key is not None
    settings = uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=config.host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
        ssl_certfile=str(config.tls_cert) if tls else None,
        ssl_keyfile=str(config.tls_key) if tls else None,
    )
    return _Server(settings)


async def serve(config: ServerConfig) -> int:
    # The server's own logs: JSON lines on stdout, scrubbed with the configured key. Its
    # metrics and spans never go through its own ingest (see selfobserve.py).
    lookout.sdk.init(
        "lookout",
        metrics_addr="off",
        traces_exporter="none",
        access_log=False,
        environ={**os.environ, "LOOKOUT_SCRUB_KEY": config.scrub_key},
    )
    log = lookout.sdk.get_logger("lookout.server")
    runtime = ServerRuntime.open(config)
    startup = runtime.database.quarantine
    integrity.report(runtime, startup, startup.damages)  # CRITICAL, counted, /readyz degraded
    app = main_app(runtime)
    servers = [_uvicorn(app, config, config.port)]
    if config.otlp_port:
        servers.append(_uvicorn(otlp_app(runtime), config, config.otlp_port))
    loop = asyncio.get_running_loop()

    def stop() -> None:
        for server in servers:
            server.should_exit = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop)
    instance = f"{config.host}:{config.port}"
    observer = asyncio.create_task(observe_forever(runtime, instance))
    compactor = asyncio.create_task(compact_forever(runtime))
    retainer = asyncio.create_task(retain_forever(runtime))  # queued after the compaction
    verifier = asyncio.create_task(integrity.verify_parquet(runtime))
    scraper = Scraper(runtime, config.scrape_configs)
    app.state.scraper = scraper  # /api/v1/targets reads its view
    scraping = asyncio.create_task(scraper.run())
    scheme = "https" if config.tls_cert else "http"
    log.info(
        "lookout_server_started",
        url=f"{scheme}://{config.host}:{config.port}",
        otlp_url=f"{scheme}://{config.host}:{config.otlp_port}" if config.otlp_port else None,
        data_dir=str(config.data_dir),
        schema_version=runtime.database.schema_version,
    )
    try:
        await asyncio.gather(*(server.serve() for server in servers))
    finally:
        for task in (observer, compactor, retainer, verifier, scraping):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        runtime.close()
        log.info("lookout_server_stopped")
        lookout.sdk.shutdown(timeout_s=1.0)
    started = all(server.started for server in servers)
    return 0 if started else 1


# How often a thread that wants the GIL gets it from one that runs Python code. Python's
# 5 ms lets a PromQL evaluation hold back the event loop and the writer thread (what
# acknowledges ingest) for up to 5 ms at every handoff; 1 ms keeps acknowledgements prompt
# while queries run (bench/promql.py's load part) for a few per cent of query throughput.
GIL_SWITCH_INTERVAL_S = 0.001


def run(config: ServerConfig) -> int:
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    return asyncio.run(serve(config))
