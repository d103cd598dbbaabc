"""Data for bench/promql.py: dashboard-like metrics over 24 h, the same samples loaded into a
Lookout store and into Prometheus TSDB blocks.

Families, as a fleet of HTTP services exposes them (the busline platform's shape):

- `http_server_requests_total{job,instance,route,method,status}`: counters, integer counts
  with a diurnal request rate, error bursts, and a reset whenever an instance restarts;
- `http_server_request_duration_seconds_{bucket,sum,count}{job,instance,route,method}`: a
  classic histogram, 11 buckets, latency lognormal per route with slow spells;
- `http_server_active_requests{job,instance,route,method}`: a float gauge;
- `process_resident_memory_bytes{job,instance}`: an integer gauge, dropping at a restart.

The series budget is met exactly: jobs x instances targets, each serving the same
route-method pairs, each pair 4 to 6 families' worth of series (13 histogram series, a gauge
and 2 to 4 status counters); the status counters absorb the remainder.

Every series has its own non-round millisecond offset inside the 5 s scrape interval (the
histogram's series share one, as one scrape writes them), a few ms of jitter per scrape, and no
timestamp on a whole second: query steps and window edges (whole seconds) never coincide with a
sample, so Prometheus 2's closed and Prometheus 3's left-open range windows select the same
samples. Values are integers or multiples of 1/1000 written with exactly three decimals, so the
text Prometheus parses and the float Lookout stores are the same double. About 1 scrape in 500
is missed (never near a restart: see target_series), so windows hold 58 to 61 samples.

Outputs, in a cache directory: `lookout/` (a data directory, every day already compacted to
Parquet as the server's hourly flush leaves it), `prometheus/` (blocks from `promtool tsdb
create-blocks-from openmetrics`) and `meta.json`, written last.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

GEN_VERSION = 2
SCRAPE_MS = 5_000
HOURS = 24
JOBS = ("api", "checkout", "payments")
ROUTES = (
    "/api/v1/orders", "/api/v1/orders/{id}", "/api/v1/cart", "/api/v1/cart/items",
    "/api/v1/payments", "/api/v1/payments/{id}/callback", "/api/v1/users/{id}",
    "/api/v1/search", "/api/v1/catalog/{sku}", "/api/v1/routes/{id}/stops", "/healthz",
    "/api/v1/tickets", "/api/v1/tickets/{id}", "/api/v1/sessions",
)  # fmt: skip
METHODS = ("GET", "POST", "PUT", "DELETE")
STATUSES = ("200", "500", "404", "503")  # every pair has the first two
LE = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
LE_TEXT = ("0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1.0", "2.5", "5.0", "+Inf")
PER_PAIR_FIXED = len(LE_TEXT) + 2 + 1  # buckets, _sum, _count, the active-requests gauge
SLOW = (1.0, 2.5)  # latency factor outside and inside a slow spell
LATENCY_SIGMA = 0.6
REQUESTS = "http_server_requests_total"
DURATION = "http_server_request_duration_seconds"
ACTIVE = "http_server_active_requests"
MEMORY = "process_resident_memory_bytes"


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- the series ---------------------------------------------------------------------------
@dataclass
class Pair:
    """One route-method pair of one target: the series a histogram, a gauge and its
    status counters make."""

    job: str
    instance: str
    route: str
    method: str
    statuses: tuple[str, ...]


@dataclass
class Topology:
    scale: int
    instances_per_job: int
    pairs_per_job: int
    pairs: list[Pair] = field(default_factory=list)

    @property
    def targets(self) -> list[tuple[str, str]]:
        return [(job, _instance(j, i)) for j, job in enumerate(JOBS)
                for i in range(self.instances_per_job)]  # fmt: skip

    def series_count(self) -> int:
        return len(self.targets) + sum(PER_PAIR_FIXED + len(p.statuses) for p in self.pairs)


def _instance(job_index: int, index: int) -> str:
    return f"10.0.{job_index + 1}.{11 + 7 * index}:8080"


def topology(scale: int, rng: np.random.Generator) -> Topology:
    """Jobs x instances targets and route-method pairs that make exactly `scale` series."""
    instances = max(1, scale // 1000)
    targets = len(JOBS) * instances
    per_pair_max = PER_PAIR_FIXED + len(STATUSES)
    pairs_per_job = math.ceil((scale - targets) / per_pair_max / targets)
    pair_count = pairs_per_job * targets
    extra = scale - targets - pair_count * (PER_PAIR_FIXED + 2)
    if not 0 <= extra <= 2 * pair_count:
        raise SystemExit(f"bench: cannot split {scale} series into this topology")
    choices = [(route, method) for route in ROUTES for method in METHODS[:2]]
    if pairs_per_job > len(choices):
        raise SystemExit(f"bench: scale {scale} needs more route-method pairs than defined")
    top = Topology(scale, instances, pairs_per_job)
    per_job = {job: [choices[i] for i in rng.permutation(len(choices))[:pairs_per_job]]
               for job in JOBS}  # fmt: skip
    for job, instance in top.targets:
        for route, method in per_job[job]:
            top.pairs.append(Pair(job, instance, route, method, STATUSES[:2]))
    # The remainder: a 404 counter for the first pairs, then a 503 counter.
    order = rng.permutation(pair_count)
    for n in range(extra):
        pair = top.pairs[int(order[n % pair_count])]
        pair.statuses = STATUSES[: len(pair.statuses) + 1]
    assert top.series_count() == scale, (top.series_count(), scale)
    return top


# -- the values ------------------------------------------------------------------------------
def _smooth(rng: np.random.Generator, n: int, width: int, scale: float) -> np.ndarray:
    """Slowly varying noise: white noise averaged over `width` scrapes."""
    noise = rng.normal(0.0, scale, n + width)
    kernel = np.ones(width) / math.sqrt(width)
    return np.convolve(noise, kernel, mode="valid")[:n]


def _spells(rng: np.random.Generator, n: int, count: int, longest: int, late: bool) -> np.ndarray:
    """A mask of `count` spells of up to `longest` scrapes; with `late`, one in the last hour."""
    mask = np.zeros(n, dtype=bool)
    starts = list(rng.integers(0, n, count))
    if late:
        starts.append(n - int(rng.integers(longest, 720)))
    for start in starts:
        mask[start : start + int(rng.integers(longest // 4, longest + 1))] = True
    return mask


def _cumulative(increments: np.ndarray, restarts: np.ndarray) -> np.ndarray:
    """Counter values: running sums of `increments` along axis 0, back to 0 at each restart."""
    total = np.cumsum(increments, axis=0)
    if not len(restarts):
        return total
    segment = np.searchsorted(restarts, np.arange(len(increments)), side="right")
    base = np.concatenate([np.zeros((1, *total.shape[1:]), total.dtype), total[restarts - 1]])
    counts: np.ndarray = total - base[segment]
    return counts


def _bucket_shares(median_s: float) -> np.ndarray:
    """P(latency in each bucket's slice), for each slow factor: shape (len(SLOW), 11)."""
    rows = []
    for factor in SLOW:
        mu = math.log(median_s * factor)
        cdf = [0.5 * (1 + math.erf((math.log(le) - mu) / (LATENCY_SIGMA * math.sqrt(2))))
               for le in LE]  # fmt: skip
        shares = np.diff([0.0, *cdf, 1.0])
        rows.append(np.clip(shares, 0.0, None) / np.clip(shares, 0.0, None).sum())
    return np.array(rows)


@dataclass
class SeriesValues:
    name: str
    labels: dict[str, str]
    ts_ms: np.ndarray  # int64, ascending
    value: np.ndarray  # int64: the value, or the value x 1000 when milli
    milli: bool = False


def _timestamps(
    rng: np.random.Generator, start_ms: int, keep: np.ndarray, end_ms: int
) -> tuple[np.ndarray, np.ndarray]:
    """One series' (or one histogram's) scrape times: a non-round offset, a few ms of jitter,
    never on a whole second; and which scrape slots they are."""
    n = len(keep)
    offset = int(rng.integers(1, SCRAPE_MS))
    ts = start_ms + offset + SCRAPE_MS * np.arange(n, dtype=np.int64) + rng.integers(-40, 41, n)
    ts += ts % 1000 == 0
    slots = np.flatnonzero(keep & (ts < end_ms))
    return ts[slots], slots


def target_series(
    rng: np.random.Generator, top: Topology, target: tuple[str, str], start_ms: int, end_ms: int
) -> list[SeriesValues]:
    """Every series of one target (job, instance) over the whole span."""
    job, instance = target
    n = (end_ms - start_ms) // SCRAPE_MS
    hours = (start_ms + SCRAPE_MS * np.arange(n)) / 3_600_000.0
    # Restarts: about one a day, the first target always once in the last hour; between two
    # scrapes, so the next scrape finds the counters back near 0.
    restarts = sorted(int(r) for r in rng.integers(720, max(721, n - 720), rng.poisson(1.0)))
    if (job, instance) == top.targets[0]:
        restarts.append(n - int(rng.integers(120, 600)))
    restarts = [r for r in restarts if 3 <= r < n]
    restarts_arr = np.array(sorted(set(restarts)), dtype=np.int64)
    # A scrape missed now and then, but none from just before a restart to 2 h after it:
    # there, a window starting in a gap could begin with a counter's first samples after the
    # reset, where Prometheus 2.42 and 3 extrapolate rate() differently (the zero-point clamp
    # moved after the 1.1-interval threshold in 2.51, prometheus/prometheus#13725).
    keep = rng.random(n) >= 0.002
    for restart in restarts_arr:
        keep[restart - 2 : restart + 1440] = True
    out: list[SeriesValues] = []
    base = {"job": job, "instance": instance}
    diurnal_phase = rng.uniform(0, 2 * math.pi)
    for pair in (p for p in top.pairs if (p.job, p.instance) == (job, instance)):
        labels = {**base, "route": pair.route, "method": pair.method}
        mean_rate = float(rng.lognormal(math.log(3.0), 1.0))  # requests/s
        rate = mean_rate * (1 + 0.4 * np.sin(2 * math.pi * hours / 24 + diurnal_phase))
        rate *= np.exp(_smooth(rng, n, 60, 0.05))
        requests = rng.poisson(rate * SCRAPE_MS / 1000)
        burst = _spells(rng, n, int(rng.integers(1, 4)), 240, late=bool(rng.random() < 0.5))
        p500 = np.where(burst, 0.05, 0.002)
        p503 = np.where(burst, 0.02, 0.001) if "503" in pair.statuses else np.zeros(n)
        p404 = np.full(n, 0.02) if "404" in pair.statuses else np.zeros(n)
        shares = np.stack([1 - p500 - p503 - p404, p500, p404, p503], axis=1)
        by_status = rng.multinomial(requests, shares)
        for s, status in enumerate(pair.statuses):
            ts, slots = _timestamps(rng, start_ms, keep, end_ms)
            values = _cumulative(by_status[:, s], restarts_arr)[slots]
            out.append(SeriesValues(REQUESTS, {**labels, "status": status}, ts, values))
        # The histogram: one timestamp for all its series, as one scrape writes them.
        median_s = float(rng.lognormal(math.log(0.04), 0.8))
        slow = _spells(rng, n, int(rng.integers(1, 3)), 360, late=bool(rng.random() < 0.5))
        level = slow.astype(np.int64)
        slices = rng.multinomial(requests, _bucket_shares(median_s)[level])
        ts, slots = _timestamps(rng, start_ms, keep, end_ms)
        buckets = _cumulative(np.cumsum(slices, axis=1), restarts_arr)[slots]
        for b, le in enumerate(LE_TEXT):
            out.append(SeriesValues(f"{DURATION}_bucket", {**labels, "le": le}, ts, buckets[:, b]))
        mean_ms = median_s * np.array(SLOW)[level] * math.exp(LATENCY_SIGMA**2 / 2) * 1000
        noise = np.clip(rng.normal(1.0, 0.1, n), 0.5, 1.5)
        sum_ms = np.rint(requests * mean_ms * noise).astype(np.int64)
        sums = _cumulative(sum_ms, restarts_arr)[slots]
        out.append(SeriesValues(f"{DURATION}_sum", labels, ts, sums, milli=True))
        out.append(SeriesValues(f"{DURATION}_count", labels, ts, buckets[:, -1].copy()))
        ts, slots = _timestamps(rng, start_ms, keep, end_ms)
        active = rate * mean_ms / 1000 * np.clip(rng.normal(1.0, 0.2, n), 0.0, None)
        milli = np.rint(active[slots] * 1000).astype(np.int64)
        out.append(SeriesValues(ACTIVE, labels, ts, milli, milli=True))
    ts, slots = _timestamps(rng, start_ms, keep, end_ms)
    memory = 150e6 + np.cumsum(rng.normal(2e3, 5e4, n))
    for restart in restarts_arr:
        memory[restart:] -= memory[restart] - 120e6  # a fresh process
    out.append(SeriesValues(MEMORY, base, ts, np.rint(memory[slots]).astype(np.int64)))
    return out


# -- writing: OpenMetrics text and the staging Parquet for Lookout ----------------------------
FAMILY_TYPE = {REQUESTS: ("http_server_requests", "counter"), ACTIVE: (ACTIVE, "gauge"),
               MEMORY: (MEMORY, "gauge")}  # fmt: skip


def _family(name: str) -> tuple[str, str]:
    if name.startswith(DURATION):
        return DURATION, "histogram"
    return FAMILY_TYPE[name]


def _label_text(labels: dict[str, str]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in labels.items())


def openmetrics_lines(series: SeriesValues) -> memoryview:
    """The series' samples as OpenMetrics lines: `name{labels} value seconds.millis`."""
    prefix = f"{series.name}{{{_label_text(series.labels)}}} "
    values = pa.array(series.value)
    if series.milli:
        whole = pc.cast(pa.array(series.value // 1000), pa.string())
        frac = pc.utf8_lpad(pc.cast(pa.array(series.value % 1000), pa.string()), 3, "0")
        text = pc.binary_join_element_wise(whole, ".", frac, "")
    else:
        text = pc.cast(values, pa.string())
    seconds = pc.cast(pa.array(series.ts_ms // 1000), pa.string())
    millis = pc.utf8_lpad(pc.cast(pa.array(series.ts_ms % 1000), pa.string()), 3, "0")
    lines = pc.binary_join_element_wise(prefix, text, " ", seconds, ".", millis, "\n", "")
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)
    begin, end = int(offsets[lines.offset]), int(offsets[lines.offset + len(lines)])
    return memoryview(lines.buffers()[2])[begin:end]


def float_values(series: SeriesValues) -> np.ndarray:
    """The doubles a parser makes of the text: k / 1000 is correctly rounded, as parsing is."""
    values = series.value.astype(np.float64)
    return values / 1000.0 if series.milli else values


STAGING_SCHEMA = pa.schema([("series_id", pa.uint64()), ("ts_ms", pa.int64()),
                            ("value", pa.float64())])  # fmt: skip


@dataclass
class Meta:
    scale: int
    seed: int
    hours: int
    start_ms: int
    end_ms: int
    series: int
    samples: int
    counters: int
    prepare_s: dict[str, float]
    gen_version: int = GEN_VERSION
    created: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def cache_dir(work: Path, scale: int, seed: int, hours: int) -> Path:
    return work / f"promql-s{scale}-h{hours}-seed{seed}-v{GEN_VERSION}"


def load_meta(folder: Path) -> Meta | None:
    try:
        raw = json.loads((folder / "meta.json").read_text())
        return Meta(**raw)
    except (OSError, ValueError, TypeError):
        return None


def prepare(
    work: Path, scale: int, seed: int, hours: int, max_age_s: float, *, keep_text: bool = False
) -> tuple[Path, Meta, bool]:
    """The cache for (scale, seed, hours): reused when complete and younger than `max_age_s`,
    built otherwise. (folder, meta, reused)."""
    folder = cache_dir(work, scale, seed, hours)
    meta = load_meta(folder)
    if meta is not None and time.time() - meta.end_ms / 1000 < max_age_s:
        return folder, meta, True
    if folder.exists():
        progress(f"  removing the stale or partial cache {folder}")
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    began = time.monotonic()
    end_ms = int(time.time() // 15) * 15_000  # a multiple of the 15 s query step
    start_ms = end_ms - hours * 3_600_000
    rng = np.random.default_rng(seed)
    top = topology(scale, rng)
    text_path, staging = folder / "data.om", folder / "staging.parquet"
    progress(f"  generating {scale:,} series x {hours} h every {SCRAPE_MS // 1000} s "
             f"({len(top.targets)} targets, {len(top.pairs)} route-method pairs)")  # fmt: skip
    series_rows, samples, counters = generate(rng, top, (start_ms, end_ms), text_path, staging)
    timings = {"generate": time.monotonic() - began}
    progress(f"  {samples:,} samples; OpenMetrics text {text_path.stat().st_size / 1e9:.2f} GB "
             f"in {timings['generate']:.0f} s")  # fmt: skip
    began = time.monotonic()
    load_lookout(folder / "lookout", series_rows, staging, start_ms, end_ms)
    timings["lookout_load"] = time.monotonic() - began
    progress(f"  Lookout store loaded in {timings['lookout_load']:.0f} s")
    staging.unlink()
    began = time.monotonic()
    create_blocks(text_path, folder / "prometheus")
    timings["promtool"] = time.monotonic() - began
    progress(f"  Prometheus blocks created in {timings['promtool']:.0f} s")
    if not keep_text:
        text_path.unlink()
    meta = Meta(scale, seed, hours, start_ms, end_ms, scale, samples, counters,
                {k: round(v, 1) for k, v in timings.items()},
                created=datetime.now(UTC).isoformat(timespec="seconds"))  # fmt: skip
    (folder / "meta.json").write_text(json.dumps(meta.to_json(), indent=2))
    return folder, meta, False


def generate(
    rng: np.random.Generator,
    top: Topology,
    span_ms: tuple[int, int],
    text_path: Path,
    staging: Path,
) -> tuple[list[tuple[int, str, str]], int, int]:
    """Write the OpenMetrics text and the staging Parquet; (series rows, samples, counters)."""
    import orjson

    from lookout.store import series_id

    rows: list[tuple[int, str, str]] = []
    samples = counters = 0
    typed: set[str] = set()
    writer = pq.ParquetWriter(staging, STAGING_SCHEMA, compression="zstd")
    with text_path.open("wb", buffering=1 << 22) as text:
        for number, (job, instance) in enumerate(top.targets):
            for series in target_series(rng, top, (job, instance), *span_ms):
                family, kind = _family(series.name)
                if family not in typed:  # once: a family's lines may follow other families'
                    text.write(f"# TYPE {family} {kind}\n".encode())
                    typed.add(family)
                text.write(openmetrics_lines(series))
                sid = series_id(series.name, series.labels)
                labels = orjson.dumps({"__name__": series.name, **series.labels}).decode()
                rows.append((sid, series.name, labels))
                n = len(series.ts_ms)
                writer.write_table(pa.table(
                    [pa.array(np.full(n, sid, dtype=np.uint64)), pa.array(series.ts_ms),
                     pa.array(float_values(series))], schema=STAGING_SCHEMA))  # fmt: skip
                samples += n
                counters += series.name == REQUESTS
            if number % max(1, len(top.targets) // 10) == 0:
                progress(f"    target {number + 1} of {len(top.targets)}: {samples:,} samples")
        text.write(b"# EOF\n")
    writer.close()
    return rows, samples, counters


# -- Lookout: straight into the store, as the writer and the hourly flush leave it ---------
CHUNK_MS = 3 * 3_600_000


def load_lookout(
    data_dir: Path, series_rows: list[tuple[int, str, str]], staging: Path, start_ms: int,
    end_ms: int,
) -> None:  # fmt: skip
    """Series rows, then the samples in time order (ts-major: tight zone maps on ts_ms), a
    few hours per transaction, through the store's own bookkeeping (partitions, views,
    commit numbers); then the server's flush moves every day to Parquet."""
    from lookout.selfmetrics import ServerMetrics
    from lookout.store import Database, Writer
    from lookout.store.schema import day_of, day_table

    database = Database(data_dir)
    connection = database.connection
    connection.execute("SET memory_limit = '4GiB'")
    now = time.time_ns()
    connection.execute("BEGIN TRANSACTION")
    connection.execute(
        "INSERT INTO series SELECT unnest(?::UBIGINT[]), unnest(?::VARCHAR[]), "
        "unnest(?::JSON[]), unnest(?::BIGINT[])",
        [[r[0] for r in series_rows], [r[1] for r in series_rows], [r[2] for r in series_rows],
         [now] * len(series_rows)],
    )  # fmt: skip
    database.commits.committed(database.commits.commit(connection))
    bounds = set(range(start_ms, end_ms + CHUNK_MS, CHUNK_MS))
    day_ms = 86_400_000
    bounds |= set(range((start_ms // day_ms + 1) * day_ms, end_ms + 1, day_ms))
    edges = sorted(b for b in bounds if b <= end_ms + CHUNK_MS)
    source = str(staging).replace("'", "''")
    for low, high in itertools.pairwise(edges):
        day = day_of("samples", low)
        with database.lock:
            connection.execute("BEGIN TRANSACTION")
            new = database.ensure_partition("samples", day)
            if new:
                database.refresh_views({"samples"})
            connection.execute(
                f"INSERT INTO {day_table('samples', day)} SELECT series_id, ts_ms, value, "
                f"NULL, {now} FROM read_parquet('{source}') WHERE ts_ms >= ? AND ts_ms < ? "
                "ORDER BY ts_ms, series_id",
                [low, high],
            )
            database.commits.committed(database.commits.commit(connection))
    progress("    samples inserted; compacting the day tables into Parquet (the server's flush)")
    writer = Writer(database, ServerMetrics())
    writer.start()
    try:
        writer.flush(time.time_ns()).result()
    finally:
        writer.stop(timeout_s=600)
        database.close()


# -- Prometheus: blocks from the OpenMetrics text ------------------------------------------
def create_blocks(text_path: Path, out: Path) -> None:
    """`promtool tsdb create-blocks-from openmetrics`: it parses the whole file once per
    block window, so the windows are made large (162 h): one or two passes, not twelve."""
    out.mkdir()
    command = ["promtool", "tsdb", "create-blocks-from", "openmetrics", "--quiet",
               "--max-block-duration=162h", str(text_path), str(out)]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench: promtool failed ({done.returncode}): {done.stderr[-2000:]}")


def disk_usage(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def free_gb(path: Path) -> float:
    usage = shutil.disk_usage(path)
    return usage.free / 1e9


def environment_note() -> str:
    return f"{os.cpu_count()} cores, {os.uname().machine}"
