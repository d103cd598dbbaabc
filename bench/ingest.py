"""Ingest throughput of one server against the ceiling of the same work without HTTP.

    python bench/ingest.py --json [--quick] [--scale 10000000] [--seconds 20]

Requests are pre-encoded as the OTLP exporter encodes them (512 spans or log records of 10
attributes each) and sent from a separate process on keep-alive connections, 8 in flight,
each with fresh ids and values (bench/_ingest_load.py). Every default is on (scrubbing,
dedup, derived metrics) and DuckDB's memory limit is set explicitly (--memory-limit).

A. The ceiling: the server's decoder, scrubber, writer and derived metrics in one process,
   committing 10,000-row Arrow batches, no HTTP and no event loop; spans, then logs.
B. Spans as fast as a fresh server acknowledges them: accepted spans/s, p99 acknowledgement
   latency, server CPU and RSS; every acknowledged span is counted in the store after.
C. The same for logs.
D. Mixed: spans and logs at --mixed-share of B's and C's rates, 1,000 lines/s through
   `lookout run`, 5 scrape targets x 2,000 series every 5 s; samples/s stored and the p95
   freshness of a log record and of a span (found through the read API after its 2xx).
E. Scale: --scale spans loaded into a data directory through the ceiling's path and
   compacted as the server does hourly; then a server on it, taking 5,000 spans/s, answers
   trace-by-id for a few hundred random stored trace ids; its RSS, peak included.
Stretch: A, B and C again with LOOKOUT_SCRUB=false.

Targets: >= 15,000 spans/s and >= 40,000 log records/s; each >= 50 % of its ceiling; at
10 M spans, RSS <= 500 MB and trace-by-id p95 <= 50 ms while ingest holds 5,000 spans/s.
Progress goes to stderr. Exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import duckdb
import httpx

from _ingest_load import (
    ATTRIBUTES,
    PER_REQUEST,
    CeilingSpec,
    LoadSpec,
    ProcessWatch,
    ceiling,
    send_load,
)
from _server import isolated, lookout_server
from run_cost import CHILD as LINES_CHILD
from scrape_throughput import exposition, serve

TARGET_SPANS = 15_000
TARGET_LOGS = 40_000
TARGET_CEILING_SHARE = 0.5
TARGET_RSS_MB = 500
TARGET_TRACE_P95_MS = 50
FULL_SCALE = 10_000_000
SCALE_RATE = 5_000
IN_FLIGHT = 8
LINES_PER_S = 1_000
SCRAPE_TARGETS, SCRAPE_SERIES, SCRAPE_EVERY_S = 5, 2_000, 5
ROOT = Path(__file__).resolve().parent.parent


def progress(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def loadavg() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def server_env(memory_limit: str, scrub: bool, **extra: str) -> dict[str, str]:
    return {
        "LOOKOUT_STORE_MEMORY_LIMIT": memory_limit,
        "LOOKOUT_SCRUB": "true" if scrub else "false",
        **extra,
    }


def source_state() -> dict[str, Any]:
    """The commit measured, and how many files under src/ differed from it at the start."""

    def git(*words: str) -> str:
        return subprocess.run(
            ["git", *words], cwd=ROOT, capture_output=True, text=True, check=False
        ).stdout.strip()

    changed = [line for line in git("status", "--porcelain", "--", "src").splitlines() if line]
    return {"commit": git("rev-parse", "--short", "HEAD"), "src_files_uncommitted": len(changed)}


def count_rows(data_dir: Path, sql: str) -> int:
    with duckdb.connect(str(data_dir / "lookout.duckdb"), read_only=True) as connection:
        row = connection.execute(sql).fetchone()
        return int(row[0]) if row else 0


# -- phases ------------------------------------------------------------------------------
def phase_ceiling(signal: str, args: argparse.Namespace, scrub: bool) -> dict[str, Any]:
    progress(f"A: ceiling, {signal}, scrubbing {'on' if scrub else 'off'}, no HTTP")
    spec = CeilingSpec(signal, args.memory_limit, scrub=scrub, seconds=args.ceiling_seconds)
    result: dict[str, Any] = isolated(ceiling, spec).result()
    progress(f"   {result['records_per_s']:,.0f} {signal} records/s")
    return result


def phase_flat(signal: str, args: argparse.Namespace, scratch: Path, scrub: bool) -> dict[str, Any]:
    label = "B: spans" if signal == "traces" else "C: logs"
    progress(f"{label} as fast as the server acknowledges, scrubbing {'on' if scrub else 'off'}")
    loadavg_before = loadavg()
    data = Path(tempfile.mkdtemp(prefix=f"{signal}-", dir=scratch))
    with lookout_server(data, server_env(args.memory_limit, scrub)) as server:
        spec = LoadSpec(server.url, signal, args.seconds, IN_FLIGHT, server_pid=server.pid)
        result: dict[str, Any] = isolated(send_load, spec).result()
    table = "spans" if signal == "traces" else "logs"
    stored = count_rows(data, f"SELECT count(*) FROM {table} WHERE service = 'checkout'")
    result["stored_records"] = stored
    result["stored_equals_acknowledged"] = stored == result["acked_records_total"]
    result["records_per_server_cpu_s"] = round(  # the decoding workers' CPU included
        result["records_per_s"] * args.seconds / result["server_and_decoders_cpu_s"], 1
    )
    result["loadavg_1m"] = [loadavg_before, loadavg()]
    progress(
        f"   {result['records_per_s']:,.0f} records/s, ack p99 {result['ack_p99_ms']} ms, "
        f"server {result['server_cores']} cores ({result['server_and_decoders_cores']} with "
        f"its decoders), RSS max {result['server_rss_mb_max']} MB"
    )
    return result


def _probe_log(client: httpx.Client, url: str) -> float:
    marker = "".join(random.choices(string.ascii_lowercase, k=24))
    body = {"resourceLogs": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "probe"}}]},
        "scopeLogs": [{"logRecords": [{
            "timeUnixNano": str(time.time_ns()), "severityNumber": 9,
            "body": {"stringValue": f"probe {marker}"}}]}]}]}  # fmt: skip
    answer = client.post(f"{url}/v1/logs", json=body)
    acked = time.monotonic()
    if answer.status_code != 200:
        return float("inf")
    params = {"service": "probe", "q": marker, "limit": "1"}
    while time.monotonic() - acked < 30:
        if client.get(f"{url}/api/lookout/logs", params=params).json()["logs"]:
            return time.monotonic() - acked
        time.sleep(0.05)
    return float("inf")


def _probe_span(client: httpx.Client, url: str) -> float:
    trace_id, now = os.urandom(16).hex(), time.time_ns()
    body = {"resourceSpans": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "probe"}}]},
        "scopeSpans": [{"spans": [{"traceId": trace_id, "spanId": os.urandom(8).hex(),
                                   "name": "probe", "kind": 2,
                                   "startTimeUnixNano": str(now - 10**6),
                                   "endTimeUnixNano": str(now)}]}]}]}  # fmt: skip
    answer = client.post(f"{url}/v1/traces", json=body)
    acked = time.monotonic()
    if answer.status_code != 200:
        return float("inf")
    while time.monotonic() - acked < 30:
        if client.get(f"{url}/api/lookout/traces/{trace_id}").status_code == 200:
            return time.monotonic() - acked
        time.sleep(0.05)
    return float("inf")


def phase_mixed(
    args: argparse.Namespace, scratch: Path, spans_rate: float, logs_rate: float
) -> dict[str, Any]:
    spans_rate, logs_rate = spans_rate * args.mixed_share, logs_rate * args.mixed_share
    progress(
        f"D: mixed: {spans_rate:,.0f} spans/s, {logs_rate:,.0f} logs/s, {LINES_PER_S:,} lines/s "
        f"through lookout run, {SCRAPE_TARGETS} targets x {SCRAPE_SERIES:,} series every "
        f"{SCRAPE_EVERY_S} s; freshness probes"
    )
    loadavg_before = loadavg()
    targets = [serve(exposition(SCRAPE_SERIES, f"m{i}")) for i in range(SCRAPE_TARGETS)]
    jobs = [{"job_name": "mixed", "scrape_interval": f"{SCRAPE_EVERY_S}s",
             "static_configs": [{"targets": [address for address, _ in targets]}]}]  # fmt: skip
    env = server_env(args.memory_limit, scrub=True, LOOKOUT_SCRAPE_CONFIGS=json.dumps(jobs))
    data = Path(tempfile.mkdtemp(prefix="mixed-", dir=scratch))
    seconds = args.seconds * 1.5
    log_delays, span_delays = [], []
    with lookout_server(data, env) as server:
        began = time.monotonic()
        url = server.url
        senders = [
            isolated(send_load, LoadSpec(url, "traces", seconds, 4, spans_rate)),
            isolated(send_load, LoadSpec(url, "logs", seconds, 4, logs_rate)),
        ]
        runner = subprocess.Popen(
            [sys.executable, "-m", "lookout", "run", "--url", url, "--service", "bench-run",
             "--no-echo", "--", sys.executable, "-c", LINES_CHILD, str(LINES_PER_S),
             str(seconds + 2)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        time.sleep(2.0)  # the senders' warm-up
        with ProcessWatch(server.pid) as watch, httpx.Client(timeout=30) as client:
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                log_delays.append(_probe_log(client, url))
                span_delays.append(_probe_span(client, url))
                time.sleep(0.2)
        spans, logs = (sender.result() for sender in senders)
        runner.wait(timeout=60)
        time.sleep(1.0)  # the last lines batch
        lifetime = time.monotonic() - began
    samples = count_rows(
        data,
        "SELECT count(*) FROM samples JOIN series USING (series_id) "
        "WHERE name LIKE 'bench\\_m%\\_requests\\_total' ESCAPE '\\'",  # exposition()'s names
    )
    lines = count_rows(data, "SELECT count(*) FROM logs WHERE service = 'bench-run'")
    for _, target in targets:
        target.shutdown()
    result = {
        "seconds": round(seconds, 1),
        "spans": _brief(spans),
        "logs": _brief(logs),
        "lines_stored": lines,
        "lines_per_s_stored": round(lines / (seconds + 2), 1),
        "lines_per_s_sent": LINES_PER_S,
        "samples_per_s_stored": round(samples / lifetime, 1),
        "samples_per_s_scraped_nominal": SCRAPE_TARGETS * SCRAPE_SERIES / SCRAPE_EVERY_S,
        "freshness_log_p95_s": _round(_quantile(log_delays, 0.95)),
        "freshness_span_p95_s": _round(_quantile(span_delays, 0.95)),
        "freshness_log_p50_s": _round(_quantile(log_delays, 0.5)),
        "freshness_span_p50_s": _round(_quantile(span_delays, 0.5)),
        "probes": len(log_delays) + len(span_delays),
        **watch.figures(),
        "loadavg_1m": [loadavg_before, loadavg()],
    }
    progress(
        f"   freshness p95: logs {result['freshness_log_p95_s']} s, spans "
        f"{result['freshness_span_p95_s']} s; {result['samples_per_s_stored']:,.0f} samples/s"
    )
    return result


def phase_scale(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    progress(f"E: loading {args.scale:,} spans through the ceiling's path, then compacting")
    data = Path(tempfile.mkdtemp(prefix="scale-", dir=scratch))
    spec = CeilingSpec(
        "traces", args.memory_limit, seconds=None, records=args.scale, data_dir=str(data),
        sample_traces=args.queries * 2, compact=True, label="E load",
    )  # fmt: skip
    loaded: dict[str, Any] = isolated(ceiling, spec).result()
    trace_ids = loaded.pop("trace_ids")
    random.shuffle(trace_ids)
    progress(
        f"   loaded at {loaded['records_per_s']:,.0f} spans/s; compaction took "
        f"{loaded['compaction_s']} s; starting a server on it"
    )
    began = time.monotonic()
    loadavg_before = loadavg()
    latencies, wrong = [], 0
    env = server_env(args.memory_limit, scrub=True)
    with lookout_server(data, env, ready_timeout_s=900) as server:
        ready_s = time.monotonic() - began
        # The startup compaction and retention run on the writer first: a request's ack
        # waits for them, and the measurement starts after it.
        with httpx.Client(timeout=900) as client:
            _probe_span(client, server.url)
        first_ack_s = time.monotonic() - began - ready_s
        progress(
            f"   ready after {ready_s:.1f} s, first ack {first_ack_s:.1f} s later; "
            f"{SCALE_RATE:,} spans/s and trace-by-id queries"
        )
        query_seconds = args.seconds * 3
        sender = isolated(
            send_load, LoadSpec(server.url, "traces", query_seconds, 4, SCALE_RATE, warmup_s=3.0)
        )
        time.sleep(3.5)
        with ProcessWatch(server.pid) as watch, httpx.Client(timeout=60) as client:
            end = time.monotonic() + query_seconds - 1
            for trace_id in trace_ids[: args.queries]:
                if time.monotonic() > end:
                    break
                sent = time.monotonic()
                answer = client.get(f"{server.url}/api/lookout/traces/{trace_id}")
                latencies.append(time.monotonic() - sent)
                if answer.status_code != 200 or answer.json()["span_count"] != 8:
                    wrong += 1
        steady = sender.result()
    p95 = _quantile(latencies, 0.95)
    result = {
        "spans_stored": loaded["records"],
        "load_spans_per_s": loaded["records_per_s"],
        "compaction_s": loaded["compaction_s"],
        "compaction_error": loaded.get("compaction_error"),
        "server_ready_s": round(ready_s, 1),
        "server_first_ack_after_ready_s": round(first_ack_s, 1),
        "trace_queries": len(latencies),
        "trace_queries_wrong": wrong,
        "trace_by_id_p50_ms": _round(_quantile(latencies, 0.5), 1000),
        "trace_by_id_p95_ms": _round(p95, 1000),
        "trace_by_id_max_ms": _round(max(latencies, default=None), 1000),
        "ingest": _brief(steady),
        **watch.figures(),
        "loadavg_1m": [loadavg_before, loadavg()],
    }
    progress(
        f"   trace-by-id p95 {result['trace_by_id_p95_ms']} ms over {len(latencies)} queries; "
        f"RSS max {result['server_rss_mb_max']} MB, peak {result['server_rss_mb_peak_since_start']}"
    )
    return result


# -- report --------------------------------------------------------------------------------
def _quantile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(len(ordered) * share + 0.5) - 1))]


def _round(value: float | None, scale: float = 1.0) -> float | None:
    if value is None:
        return None
    return round(value * scale, 4) if value != float("inf") else float("inf")


def _brief(load: dict[str, Any]) -> dict[str, Any]:
    keep = ("records_per_s", "paced_records_per_s", "ack_p50_ms", "ack_p99_ms", "statuses",
            "first_error")  # fmt: skip
    return {key: load[key] for key in keep if key in load}


def _ratios(
    ceilings: dict[str, Any], spans: dict[str, Any], logs: dict[str, Any]
) -> dict[str, Any]:
    """Each phase's rate as a share of its ceiling's: per second of wall time (the target),
    and per CPU second (the server's, the ceiling process's), which contention moves less."""
    shares = {}
    for name, phase in (("spans", spans), ("logs", logs)):
        top = ceilings[name]
        shares[f"{name}_share_of_ceiling"] = round(phase["records_per_s"] / top["records_per_s"], 3)
        shares[f"{name}_share_of_ceiling_per_cpu_s"] = round(
            phase["records_per_server_cpu_s"] / top["records_per_cpu_s"], 3
        )
    return shares


def targets(report: dict[str, Any], *, full_scale: bool) -> dict[str, Any]:
    """Each target: the figure, what it must be, and whether it is; the scale targets are
    only met at full scale."""
    ratios, scale = report["ratios"], report["scale"]
    held = scale["ingest"]["records_per_s"] >= 0.95 * SCALE_RATE
    p95 = scale["trace_by_id_p95_ms"]
    # The server process's peak RSS, or its PSS with the decoding workers, the larger.
    peak = max(scale["server_rss_mb_peak_since_start"], scale["server_and_decoders_pss_mb_max"])
    stored = [report[name]["stored_equals_acknowledged"] for name in ("spans", "logs")]
    compaction = scale["compaction_error"]
    found = {
        "spans_per_s": (report["spans"]["records_per_s"], f">= {TARGET_SPANS:,}",
                        report["spans"]["records_per_s"] >= TARGET_SPANS),
        "log_records_per_s": (report["logs"]["records_per_s"], f">= {TARGET_LOGS:,}",
                              report["logs"]["records_per_s"] >= TARGET_LOGS),
        "spans_share_of_ceiling": (ratios["spans_share_of_ceiling"], f">= {TARGET_CEILING_SHARE}",
                                   ratios["spans_share_of_ceiling"] >= TARGET_CEILING_SHARE),
        "logs_share_of_ceiling": (ratios["logs_share_of_ceiling"], f">= {TARGET_CEILING_SHARE}",
                                  ratios["logs_share_of_ceiling"] >= TARGET_CEILING_SHARE),
        "rss_mb_at_scale": (peak, f"<= {TARGET_RSS_MB} (peak; decoders' PSS included) with "
                            f"{FULL_SCALE:,} spans stored",
                            peak <= TARGET_RSS_MB and full_scale),
        "trace_by_id_p95_ms_at_scale": (p95, f"<= {TARGET_TRACE_P95_MS} at {FULL_SCALE:,} spans, "
                                        f"ingest holding {SCALE_RATE:,} spans/s, every trace found",
                                        p95 is not None and p95 <= TARGET_TRACE_P95_MS and held
                                        and not scale["trace_queries_wrong"] and full_scale),
        "compaction_at_scale": (compaction or "ok", "the hourly compaction succeeds at the "
                                "memory limit", compaction is None),
        "every_acknowledged_record_stored": (stored, "stored == acknowledged (spans, logs)",
                                             all(stored)),
    }  # fmt: skip
    return {
        name: {"value": value, "target": text, "target_met": bool(met)}
        for name, (value, text, met) in found.items()
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    parser.add_argument("--quick", action="store_true", help="a short smoke run (scale 100,000)")
    parser.add_argument("--scale", type=int, default=None, help=f"spans stored ({FULL_SCALE:,})")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of phases B and C")
    parser.add_argument("--memory-limit", default="256MiB", help="DuckDB memory_limit (256MiB)")
    parser.add_argument("--queries", type=int, default=300, help="trace-by-id queries in E")
    parser.add_argument("--mixed-share", type=float, default=0.4,
                        help="D's span and log rates, as shares of B's and C's (0.4)")  # fmt: skip
    args = parser.parse_args()
    args.ceiling_seconds = 15.0
    if args.quick:
        args.seconds, args.ceiling_seconds, args.queries = 5.0, 4.0, 40
        args.scale = args.scale or 100_000
    args.scale = args.scale or FULL_SCALE
    began = time.monotonic()
    report: dict[str, Any] = {
        "benchmark": "ingest",
        "settings": {
            "records_per_request": PER_REQUEST, "attributes_per_record": ATTRIBUTES,
            "in_flight": IN_FLIGHT, "seconds": args.seconds, "memory_limit": args.memory_limit,
            "scale_spans": args.scale, "quick": args.quick, "cores": os.cpu_count(),
            "loadavg_1m_at_start": loadavg(), "source": source_state(),
        },
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="lookout-ingest-") as tmp:
        scratch = Path(tmp)
        report["ceiling"] = {
            "spans": phase_ceiling("traces", args, scrub=True),
            "logs": phase_ceiling("logs", args, scrub=True),
        }
        report["spans"] = phase_flat("traces", args, scratch, scrub=True)
        report["logs"] = phase_flat("logs", args, scratch, scrub=True)
        report["ratios"] = _ratios(report["ceiling"], report["spans"], report["logs"])
        report["mixed"] = phase_mixed(
            args, scratch, report["spans"]["records_per_s"], report["logs"]["records_per_s"]
        )
        progress("stretch: scrubbing off")
        off_ceiling = {
            "spans": phase_ceiling("traces", args, scrub=False),
            "logs": phase_ceiling("logs", args, scrub=False),
        }
        off_spans = phase_flat("traces", args, scratch, scrub=False)
        off_logs = phase_flat("logs", args, scratch, scrub=False)
        report["stretch_scrub_off"] = {
            "ceiling": off_ceiling, "spans": off_spans, "logs": off_logs,
            "ratios": _ratios(off_ceiling, off_spans, off_logs),
        }  # fmt: skip
        report["scale"] = phase_scale(args, scratch)
    report["targets"] = targets(report, full_scale=args.scale >= FULL_SCALE)
    report["target_met"] = all(t["target_met"] for t in report["targets"].values())
    report["settings"]["loadavg_1m_at_end"] = loadavg()
    report["settings"]["wall_s"] = round(time.monotonic() - began, 1)
    print(json.dumps(report, indent=2))
    return 0 if report["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
