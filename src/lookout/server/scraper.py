"""The scraper: each target on its own interval, its samples and Prometheus's own
`up`, `scrape_duration_seconds`, `scrape_samples_scraped` and `scrape_series_added`
written to the store, staleness markers when a series or a target goes away.

Targets come from the `scrape_configs` of the server's config, and from the file_sd
files under `<data_dir>/file_sd/` that `POST /api/targets` (and `lookout run --scrape`)
write: one job per file, named after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from lookout.errors import StoreError
from lookout.ingest.scrape import (
    STALE_NAN,
    ScrapeConfig,
    SeriesCache,
    SeriesKey,
    Target,
    scrape_samples,
    targets_of,
)
from lookout.model import Batch, Sample
from lookout.server.runtime import ServerRuntime

ACCEPT = "application/openmetrics-text;version=1.0.0;q=0.9,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
REFRESH_S = 5.0
# The series every scrape writes about itself, as Prometheus does.
OWN_SERIES = ("up", "scrape_duration_seconds", "scrape_samples_scraped", "scrape_series_added")


@dataclass
class Health:
    health: str = "unknown"
    last_error: str = ""
    last_scrape_ns: int = 0
    last_duration_s: float = 0.0
    series: set[SeriesKey] = field(default_factory=set)
    cache: SeriesCache = field(default_factory=SeriesCache)


def file_sd_dir(runtime: ServerRuntime) -> Path:
    return runtime.config.data_dir / "file_sd"


def write_targets(
    runtime: ServerRuntime, job: str, targets: list[str], labels: dict[str, str]
) -> Path:
    """Register targets for `job` in a file_sd file (replacing that job's list)."""
    folder = file_sd_dir(runtime)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{job}.json"
    partial = path.with_suffix(".json.partial")
    partial.write_text(json.dumps([{"targets": targets, "labels": labels}]))
    partial.replace(path)
    return path


class Scraper:
    def __init__(self, runtime: ServerRuntime, configs: tuple[ScrapeConfig, ...]) -> None:
        self.runtime = runtime
        self.configs = configs
        self.health: dict[str, Health] = {}
        self.targets: dict[str, Target] = {}
        self.dropped: list[dict[str, str]] = []
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.client = httpx.AsyncClient(headers={"accept": ACCEPT}, follow_redirects=True)

    def _all_configs(self) -> list[ScrapeConfig]:
        folder = file_sd_dir(self.runtime)
        registered = sorted(folder.glob("*.json")) if folder.exists() else []
        return [
            *self.configs,
            *(
                ScrapeConfig(
                    job_name=path.stem,
                    scrape_interval=self.runtime.config.registered_scrape_interval_s,
                    scrape_timeout=min(10.0, self.runtime.config.registered_scrape_interval_s),
                    file_sd=(str(path),),
                )
                for path in registered
            ),
        ]

    async def run(self) -> None:
        try:
            while True:
                await self.refresh()
                await asyncio.sleep(REFRESH_S)
        finally:
            for task in self._tasks.values():
                task.cancel()
            await self.client.aclose()

    async def refresh(self) -> None:
        """Start loops for new targets; stop vanished ones and mark their series stale."""
        wanted: dict[str, Target] = {}
        dropped: list[dict[str, str]] = []
        for config in self._all_configs():
            active, lost = targets_of(config)
            dropped.extend(lost)
            for target in active:
                wanted[target.key] = target
        self.dropped = dropped
        for key in list(self._tasks):
            if key not in wanted:
                self._tasks.pop(key).cancel()
                gone = self.targets.pop(key)
                health = self.health.pop(key, Health())
                await self._write_stale(gone, health.series)
        for key, target in wanted.items():
            if key not in self._tasks:
                self.targets[key] = target
                self.health[key] = Health()
                self._tasks[key] = asyncio.create_task(self._loop(target))

    async def _loop(self, target: Target) -> None:
        interval = target.config.scrape_interval
        while True:
            began = time.monotonic()
            with contextlib.suppress(StoreError):
                await self.scrape_once(target)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - began)))

    async def scrape_once(self, target: Target) -> None:
        health = self.health.setdefault(target.key, Health())
        started_ns = time.time_ns()
        ts_ms = started_ns // 1_000_000
        began = time.perf_counter()
        samples: list[Sample] = []
        seen: set[SeriesKey] = set()
        try:
            response = await self.client.get(target.url, timeout=target.config.scrape_timeout)
            response.raise_for_status()
            # Off the event loop: a big target takes a while, and requests keep flowing.
            samples, seen = await asyncio.to_thread(
                scrape_samples,
                response.text,
                response.headers.get("content-type", ""),
                target,
                ts_ms,
                health.cache,
            )
            error = ""
        except (httpx.HTTPError, ValueError) as exc:
            error = str(exc) or type(exc).__name__
        duration = time.perf_counter() - began
        added = len(seen - health.series)
        vanished = health.series - seen
        health.series = seen
        health.health = "down" if error else "up"
        health.last_error = error
        health.last_scrape_ns = started_ns
        health.last_duration_s = duration
        values = (0.0 if error else 1.0, duration, float(len(samples)), float(added))
        own = [
            Sample(name, dict(target.labels), ts_ms, value)
            for name, value in zip(OWN_SERIES, values, strict=True)
        ]
        stale = self._stale_samples(vanished, ts_ms)
        await self.runtime.store(Batch(samples=[*samples, *own, *stale]))

    @staticmethod
    def _stale_samples(series: set[SeriesKey], ts_ms: int) -> list[Sample]:
        return [Sample(name, dict(labels), ts_ms, STALE_NAN) for name, labels in series]

    async def _write_stale(self, target: Target, series: set[SeriesKey]) -> None:
        """A vanished target: stale markers for its series and its own `up` and `scrape_*`."""
        ts_ms = time.time_ns() // 1_000_000
        samples = self._stale_samples(series, ts_ms)
        samples.extend(Sample(name, dict(target.labels), ts_ms, STALE_NAN) for name in OWN_SERIES)
        with contextlib.suppress(StoreError):
            await self.runtime.store(Batch(samples=samples))

    def targets_view(self) -> dict[str, Any]:
        """`/api/v1/targets` in Prometheus's shape."""
        active = []
        for key, target in self.targets.items():
            health = self.health.get(key, Health())
            last = (
                datetime.fromtimestamp(health.last_scrape_ns / 1e9, UTC)
                .isoformat()
                .replace("+00:00", "Z")
                if health.last_scrape_ns
                else "0001-01-01T00:00:00Z"
            )
            active.append({
                "discoveredLabels": target.discovered,
                "labels": target.labels,
                "scrapePool": target.job,
                "scrapeUrl": target.url,
                "globalUrl": target.url,
                "lastError": health.last_error,
                "lastScrape": last,
                "lastScrapeDuration": health.last_duration_s,
                "health": health.health,
                "scrapeInterval": f"{target.config.scrape_interval:g}s",
                "scrapeTimeout": f"{target.config.scrape_timeout:g}s",
            })  # fmt: skip
        dropped = [{"discoveredLabels": labels} for labels in self.dropped]
        return {"status": "success", "data": {"activeTargets": active, "droppedTargets": dropped}}
