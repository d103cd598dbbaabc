"""Lookout's PromQL against Prometheus 2.42 (Debian's), on the same data, in the same run.

    python bench/promql.py --json [--scale 200] [--scale 5000] [--work-dir DIR] [--no-load]

Data (bench/_promql_data.py): 200 and 5,000 series over 24 h scraped every 5 s (3.5 M and
86 M samples): request counters with resets, an 11-bucket latency histogram, gauges; every
series with its own non-round millisecond offset. Prometheus gets them through `promtool tsdb
create-blocks-from openmetrics`, Lookout straight into its store (day tables, then the
server's own flush into Parquet). Both are cached under --work-dir, keyed by scale, hours and
seed, and reused while younger than --max-cache-age-days.

Queries: a dashboard of 10 range queries over the last hour at a 15 s step (rates, `sum by`,
an error ratio, histogram_quantile P50/P95/P99, avg_over_time, increase, topk, a gauge's
`max by`), and one instant query, `rate(http_server_requests_total[5m])` (995 series at 5,000;
what exists at 200). A `prometheus` process and a `lookout server` process answer them over
HTTP (compression off on both), through one client. Each query runs once to warm up, then
--repeats times on each server, alternating; a query's time is the median, the set's time the
sum of its queries' medians, the ratio Lookout / Prometheus. Results are compared series by
series (labels), point by point (timestamps): the figure is the largest |a - b| / max(|a|, |b|),
both-NaN counting as equal, a series or point on one side only as a failure.

Load (`--no-load` skips it, `--load-only` runs only it): at the largest scale, on a server whose
sample cache one pass of the set has warmed, a sender process (bench/_ingest_load.py) posts
5,000 spans/s over OTLP/HTTP to /v1/traces, first alone for 15 s (the control), then for
--load-seconds while the query set loops against the same server; reported: p50/p99
acknowledgement latency, 429s and other errors, spans/s acknowledged, query-set loops completed.

Targets: the set <= 300 ms at 200 series and <= 1 s at 5,000 (the smaller for scales up to
200); the instant query <= 50 ms; max relative difference <= 1e-6 with no series or point
missing; under load, ack p99 <= 500 ms, no 429 and no error, >= 95 % of 5,000 spans/s.
Progress goes to stderr, the JSON report to stdout. Exits 1 when a target is missed (a query
Lookout cannot answer misses), 2 when prometheus or promtool is not installed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from _ingest_load import LoadSpec, send_load
from _promql_data import REQUESTS, disk_usage, free_gb, prepare, progress
from _promql_profile import profile
from _promql_servers import (
    Answer,
    ask,
    compare,
    fresh_copy,
    prometheus_server,
    prometheus_version,
    scratch_dir,
    wait_for_writer,
)
from _server import isolated, lookout_server

ROOT = Path(__file__).resolve().parent.parent
SCALES = (200, 5_000)
STEP_S = 15.0
WINDOW_S = 3600.0
MAX_REL_DIFF = 1e-6
TARGET_SET_MS = {200: 300.0, 5_000: 1000.0}
TARGET_INSTANT_MS = 50.0
LOAD_SPANS_PER_S = 5_000
LOAD_IN_FLIGHT = 4
CONTROL_S = 15.0
TARGET_ACK_P99_MS = 500.0
TARGET_LOAD_SHARE = 0.95

BUCKETS = "http_server_request_duration_seconds_bucket"
QUERIES: list[tuple[str, str]] = [
    ("rate_by_job", f"sum by (job) (rate({REQUESTS}[5m]))"),
    ("rate_by_route", f"sum by (job, route) (rate({REQUESTS}[5m]))"),
    ("error_ratio", f'sum by (job) (rate({REQUESTS}{{status=~"5.."}}[5m])) '
                    f"/ sum by (job) (rate({REQUESTS}[5m]))"),
    ("p50", f"histogram_quantile(0.5, sum by (job, le) (rate({BUCKETS}[5m])))"),
    ("p95", f"histogram_quantile(0.95, sum by (job, le) (rate({BUCKETS}[5m])))"),
    ("p99_by_route", f"histogram_quantile(0.99, sum by (job, route, le) (rate({BUCKETS}[5m])))"),
    ("active_avg", "avg by (job, route) (avg_over_time(http_server_active_requests[5m]))"),
    ("increase_1h", f"sum by (job, status) (increase({REQUESTS}[1h]))"),
    ("top5_routes", f"topk(5, sum by (job, route) (rate({REQUESTS}[5m])))"),
    ("memory_max", "max by (job) (process_resident_memory_bytes)"),
]  # fmt: skip
INSTANT = ("instant_rate", f"rate({REQUESTS}[5m])")


def _log_of(data: Path) -> Path:
    """Where a server's output is kept, beside its data directory (quoted if it fails)."""
    return data.parent / f"{data.name}.log"


def server_env() -> dict[str, str]:
    # The cached samples may be days old: retention must not drop them.
    return {"LOOKOUT_RETENTION": "samples.max_age=3650d"}


def target_set_ms(scale: int) -> float:
    return TARGET_SET_MS[200] if scale <= 200 else TARGET_SET_MS[5_000]


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    if ours is None or theirs is None or theirs <= 0:
        return None
    return round(ours / theirs, 2)


# -- one query on both servers -----------------------------------------------------------------
def measure(
    client: httpx.Client,
    lookout: str,
    prometheus: str,
    name: str,
    query: str,
    *,
    repeats: int,
    time_s: float | None = None,
    span: tuple[float, float, float] | None = None,
) -> dict[str, Any]:
    """Warm up once on each, then `repeats` alternating runs; medians and the comparison."""
    theirs = ask(client, prometheus, query, time_s, span)
    ours = ask(client, lookout, query, time_s, span)
    first = {"lookout_first_ms": None if ours.error else _ms(ours.seconds),
             "prometheus_first_ms": _ms(theirs.seconds)}  # fmt: skip
    if ours.seconds > 5:  # a slow engine still gets measured, in fewer runs
        repeats = min(repeats, 2)
    our_times, their_times = [], []
    for _ in range(repeats):
        if ours.error is None:
            ours = ask(client, lookout, query, time_s, span)
            our_times.append(ours.seconds)
        theirs = ask(client, prometheus, query, time_s, span)
        their_times.append(theirs.seconds)
    entry: dict[str, Any] = {"name": name, "query": query}
    entry["lookout_ms"] = _ms(statistics.median(our_times)) if our_times else None
    entry["prometheus_ms"] = _ms(statistics.median(their_times)) if their_times else None
    entry["ratio"] = _ratio(entry["lookout_ms"], entry["prometheus_ms"])
    entry.update(first)
    entry.update(_checked(ours, theirs))
    return entry


def _checked(ours: Answer, theirs: Answer) -> dict[str, Any]:
    if theirs.error is not None:
        raise SystemExit(f"bench: Prometheus failed a query: {theirs.error}")
    if ours.error is not None or ours.result is None or theirs.result is None:
        return {"lookout_error": ours.error, "max_rel_diff": None, "ok": False,
                "series": len(theirs.result or {})}  # fmt: skip
    found = compare(ours.result, theirs.result)
    if ours.result_type != theirs.result_type:
        found.problems.insert(0, f"result type {ours.result_type!r}, "
                                 f"Prometheus {theirs.result_type!r}")  # fmt: skip
        found.max_rel_diff = math.inf
    out = found.to_json()
    out["ok"] = found.max_rel_diff <= MAX_REL_DIFF
    return out


def run_set(
    client: httpx.Client, lookout: str, prometheus: str, span: tuple[float, float, float],
    repeats: int,
) -> list[dict[str, Any]]:  # fmt: skip
    entries = []
    for name, query in QUERIES:
        entry = measure(client, lookout, prometheus, name, query, repeats=repeats, span=span)
        progress(
            f"    {name}: Lookout {_shown(entry['lookout_ms'])}, Prometheus "
            f"{entry['prometheus_ms']} ms, {entry['series']} series, max rel diff "
            f"{entry['max_rel_diff']}" + (f" ({entry['lookout_error']})"
                                         if entry.get("lookout_error") else "")
        )  # fmt: skip
        entries.append(entry)
    return entries


def _shown(ms: float | None) -> str:
    return "failed" if ms is None else f"{ms} ms"


def api_state(client: httpx.Client, lookout: str) -> str | None:
    """None when Lookout answers a trivial PromQL query; what is wrong otherwise."""
    answer = ask(client, lookout, "1", time_s=time.time())
    return answer.error


# -- one scale -----------------------------------------------------------------------------------
def run_scale(args: argparse.Namespace, scale: int, work: Path) -> dict[str, Any]:
    progress(f"scale {scale:,}: preparing the data (cache under {work})")
    folder, meta, reused = prepare(work, scale, args.seed, args.hours, args.max_cache_age_s)
    progress(f"  {'reused' if reused else 'built'} {folder.name}: {meta.samples:,} samples")
    scratch = scratch_dir(work)
    section: dict[str, Any] = {
        "series": meta.series,
        "samples": meta.samples,
        "hours": meta.hours,
        "scrape_interval_s": 5,
        "cache": {"reused": reused, "prepare_s": meta.prepare_s, "created": meta.created,
                  "lookout_mb": round(disk_usage(folder / "lookout") / 1e6, 1),
                  "prometheus_mb": round(disk_usage(folder / "prometheus") / 1e6, 1)},
    }  # fmt: skip
    end_s = meta.end_ms / 1000
    span = (end_s - WINDOW_S, end_s, STEP_S)
    section["range"] = {"start_ms": meta.end_ms - int(WINDOW_S * 1000), "end_ms": meta.end_ms,
                        "step_s": STEP_S, "steps": int(WINDOW_S / STEP_S) + 1}  # fmt: skip
    try:
        began = time.monotonic()
        data = fresh_copy(folder / "lookout", scratch, "lookout")
        copy_s = time.monotonic() - began
        began = time.monotonic()
        section["loadavg_1m_before"] = loadavg()
        with prometheus_server(folder / "prometheus") as prom, \
                lookout_server(data, server_env(), 300.0, _log_of(data)) as look:  # fmt: skip
            wait_for_writer(look.url)
            section["servers_ready_s"] = round(time.monotonic() - began, 1)
            section["lookout_copy_s"] = round(copy_s, 1)
            with httpx.Client(timeout=args.timeout) as client:
                problem = api_state(client, look.url)
                if problem is not None:
                    progress(f"  Lookout's PromQL API does not answer yet: {problem}")
                    section["lookout_api_error"] = problem
                progress(f"  {len(QUERIES)} range queries, last hour, step 15 s, "
                         f"1 warm-up + {args.repeats} runs each")  # fmt: skip
                entries = run_set(client, look.url, prom.url, span, args.repeats)
                name, query = INSTANT
                instant = measure(client, look.url, prom.url, name, query,
                                  repeats=args.repeats, time_s=end_s)  # fmt: skip
                progress(f"    instant ({instant['series']} series): Lookout "
                         f"{_shown(instant['lookout_ms'])}, Prometheus "
                         f"{instant['prometheus_ms']} ms, max rel diff "
                         f"{instant['max_rel_diff']}")  # fmt: skip
        section["loadavg_1m_after"] = loadavg()
        if args.profile and "lookout_api_error" not in section:
            progress("  profiling Lookout's side in process (cold, then warm runs; cProfile)")
            span_ms = (meta.end_ms - int(WINDOW_S * 1000), meta.end_ms, int(STEP_S * 1000))
            section["lookout_profile"] = found = profile(data, QUERIES, span_ms)
            if "slowest" in found:
                fetch, evaluate = found["sum_warm_fetch_ms"], found["sum_warm_evaluate_ms"]
                progress(f"    warm set in process: fetch {fetch} ms, evaluate {evaluate} ms, "
                         f"render {found['sum_warm_render_ms']} ms; slowest "
                         f"{found['slowest']}")  # fmt: skip
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    section["queries"] = entries
    ours = [e["lookout_ms"] for e in entries]
    theirs = [e["prometheus_ms"] for e in entries]
    set_ours = round(sum(ours), 2) if None not in ours else None
    set_theirs = round(sum(t for t in theirs if t is not None), 2)
    section["set"] = {
        "lookout_ms": set_ours,
        "prometheus_ms": set_theirs,
        "ratio": _ratio(set_ours, set_theirs),
        "how": f"sum of the per-query medians of {args.repeats} warm runs",
        "queries_failed": sum(not e["ok"] for e in entries),
    }
    instant["series_selected"] = instant["series"]
    section["instant"] = instant
    every = [*entries, instant]
    diffs = [e["max_rel_diff"] for e in every]
    numeric = [d if isinstance(d, float | int) else math.inf for d in diffs if d is not None]
    worst = max(numeric) if numeric and len(numeric) == len(diffs) else None
    section["max_rel_diff"] = worst if worst is None or math.isfinite(worst) else str(worst)
    limit = target_set_ms(scale)
    section["targets"] = {"set_ms": limit, "instant_ms": TARGET_INSTANT_MS,
                          "max_rel_diff": MAX_REL_DIFF}  # fmt: skip
    met = {
        "set": set_ours is not None and set_ours <= limit,
        "instant": instant["lookout_ms"] is not None and instant["lookout_ms"] <= TARGET_INSTANT_MS,
        "results_equal": all(e["ok"] for e in every),
    }
    section["met"] = met
    section["target_met"] = all(met.values())
    return section


# -- ingest under query load --------------------------------------------------------------------
def run_load(args: argparse.Namespace, scale: int, work: Path) -> dict[str, Any]:
    progress(f"load: {LOAD_SPANS_PER_S:,} spans/s over OTLP/HTTP while the query set loops "
             f"against Lookout ({scale:,} series), {args.load_seconds:.0f} s")  # fmt: skip
    folder, meta, _ = prepare(work, scale, args.seed, args.hours, args.max_cache_age_s)
    scratch = scratch_dir(work)
    end_s = meta.end_ms / 1000
    span = (end_s - WINDOW_S, end_s, STEP_S)
    loops: list[float] = []
    failed = 0
    try:
        data = fresh_copy(folder / "lookout", scratch, "lookout")
        with lookout_server(data, server_env(), 300.0, _log_of(data)) as look, \
                httpx.Client(timeout=args.timeout) as client:  # fmt: skip
            wait_for_writer(look.url)
            for _, query in QUERIES:  # the sample cache warm, as on a dashboard's server
                ask(client, look.url, query, span=span)
            progress(f"  control: the same spans for {CONTROL_S:.0f} s, no queries")
            control = isolated(send_load, LoadSpec(
                look.url, "traces", CONTROL_S, LOAD_IN_FLIGHT, float(LOAD_SPANS_PER_S),
                warmup_s=3.0)).result()  # fmt: skip
            progress(f"    ack p50 {control['ack_p50_ms']} ms, p99 {control['ack_p99_ms']} ms")
            progress(f"  spans and the query set looping, {args.load_seconds:.0f} s")
            before = loadavg()
            spec = LoadSpec(look.url, "traces", args.load_seconds, LOAD_IN_FLIGHT,
                            float(LOAD_SPANS_PER_S), warmup_s=3.0, server_pid=look.pid)  # fmt: skip
            sender = isolated(send_load, spec)
            while not sender.done():
                began = time.perf_counter()
                for _, query in QUERIES:
                    answer = ask(client, look.url, query, span=span)
                    failed += answer.error is not None
                    if sender.done():
                        break
                else:
                    loops.append(time.perf_counter() - began)
            sent = sender.result()
            after = loadavg()
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    statuses = {str(k): int(v) for k, v in sent.get("statuses", {}).items()}
    errors = sum(v for k, v in statuses.items() if k != "200")
    result: dict[str, Any] = {
        "series": scale,
        "seconds": args.load_seconds,
        "spans_per_s_paced": LOAD_SPANS_PER_S,
        "spans_per_s_acked": sent["records_per_s"],
        "ack_p50_ms": sent["ack_p50_ms"],
        "ack_p99_ms": sent["ack_p99_ms"],
        "requests": sent["requests"],
        "statuses": statuses,
        "http_429": statuses.get("429", 0),
        "errors": errors,
        "first_error": sent.get("first_error"),
        "query_set_loops": len(loops),
        "query_set_loop_ms_median": _ms(statistics.median(loops)) if loops else None,
        "query_errors": failed,
        "server_cores": sent.get("server_cores"),
        "server_rss_mb_max": sent.get("server_rss_mb_max"),
        "loadavg_1m": [before, after],
        "control_no_queries": {"seconds": CONTROL_S, "ack_p50_ms": control["ack_p50_ms"],
                               "ack_p99_ms": control["ack_p99_ms"],
                               "spans_per_s_acked": control["records_per_s"],
                               "statuses": control["statuses"]},
        "targets": {"ack_p99_ms": TARGET_ACK_P99_MS, "http_429": 0, "errors": 0,
                    "spans_per_s_min": TARGET_LOAD_SHARE * LOAD_SPANS_PER_S},
    }  # fmt: skip
    p99 = sent["ack_p99_ms"]
    result["target_met"] = (
        p99 is not None and p99 <= TARGET_ACK_P99_MS and errors == 0
        and sent["records_per_s"] >= TARGET_LOAD_SHARE * LOAD_SPANS_PER_S
    )  # fmt: skip
    progress(f"  acked {result['spans_per_s_acked']:,} spans/s, ack p50 {result['ack_p50_ms']} ms"
             f" p99 {p99} ms, {result['http_429']} x 429, {errors} errors; "
             f"{len(loops)} query-set loops ({failed} query errors)")  # fmt: skip
    return result


# -- the report -------------------------------------------------------------------------------
def machine(version: str) -> dict[str, Any]:
    def git(*words: str) -> str:
        return subprocess.run(["git", *words], cwd=ROOT, capture_output=True, text=True,
                              check=False).stdout.strip()  # fmt: skip

    changed = [line for line in git("status", "--porcelain", "--", "src").splitlines() if line]
    model = next((line.split(":", 1)[1].strip()
                  for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "unknown")  # fmt: skip
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9, 1),
        "prometheus": version,
        "commit": git("rev-parse", "--short", "HEAD"),
        "src_files_uncommitted": len(changed),
        "loadavg_1m_at_start": loadavg(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    parser.add_argument("--scale", type=int, action="append",
                        help="series (200 and 5000 unless given; repeatable)")  # fmt: skip
    parser.add_argument("--hours", type=int, default=24, help="hours of data (24)")
    parser.add_argument("--seed", type=int, default=1, help="data seed (1)")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/lookout-bench-promql"),
                        help="cache and scratch directory (/tmp/lookout-bench-promql)")  # fmt: skip
    parser.add_argument("--max-cache-age-days", type=float, default=5.0,
                        help="rebuild a cache older than this (5)")  # fmt: skip
    parser.add_argument("--repeats", type=int, default=5, help="warm runs per query (5)")
    parser.add_argument("--timeout", type=float, default=300.0, help="per request, s (300)")
    parser.add_argument("--load-seconds", type=float, default=30.0, help="load part length (30)")
    parser.add_argument("--no-load", action="store_true", help="skip the load part")
    parser.add_argument("--load-only", action="store_true", help="only the load part")
    parser.add_argument("--profile", action="store_true",
                        help="also split Lookout's time (fetch, evaluate, render) in process, "
                             "and cProfile its slowest query")  # fmt: skip
    args = parser.parse_args()
    args.max_cache_age_s = args.max_cache_age_days * 86400
    scales = sorted(set(args.scale or SCALES))
    version = prometheus_version()
    if version is None:
        print("bench: prometheus and promtool are needed (apt-get install prometheus; "
              "Debian's 2.42 is what the figures compare against)", file=sys.stderr)  # fmt: skip
        return 2
    work = args.work_dir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    progress(f"{version}; work dir {work} ({free_gb(work):.0f} GB free)")
    report: dict[str, Any] = {"benchmark": "promql", "machine": machine(version), "scales": {}}
    if not args.load_only:
        for scale in scales:
            report["scales"][str(scale)] = run_scale(args, scale, work)
    if not args.no_load:
        report["load"] = run_load(args, max(scales), work)
    report["machine"]["loadavg_1m_at_end"] = loadavg()
    parts = [s["target_met"] for s in report["scales"].values()]
    if "load" in report:
        parts.append(report["load"]["target_met"])
    report["target_met"] = all(parts)
    print(json.dumps(report, indent=2 if args.json else None))
    return 0 if report["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
