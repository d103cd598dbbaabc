"""What `lookout run` itself costs in CPU while it ships lines.

    python bench/run_cost.py --json [--rate 1000] [--seconds 20]

Starts `lookout server`, then `lookout run -- CHILD` where CHILD prints `--rate` lines per
second for `--seconds`; samples the CPU time of the `lookout run` process alone (from
/proc, so the child and the server are not counted) and reports the share of one core it
used per 1,000 lines/s, next to the child's own CPU as the baseline measured in the same run.
Exits 1 when lookout run takes more than 10 % of a core per 1,000 lines/s, or loses lines.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from _server import lookout_server

ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
TARGET_CORE_SHARE = 0.10

CHILD = """
import json, sys, time
rate, seconds = int(sys.argv[1]), float(sys.argv[2])
interval, sent, start = 1.0 / rate, 0, time.monotonic()
while time.monotonic() - start < seconds:
    due = int((time.monotonic() - start) * rate)
    while sent < due:
        print(json.dumps({"event": "ticket_sold", "level": "info", "seq": sent, "route": "nbo"}))
        sent += 1
    sys.stdout.flush()
    time.sleep(interval * 10)
print(json.dumps({"event": "done", "sent": sent}), flush=True)
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    parser.add_argument("--rate", type=int, default=1000, help="lines per second")
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with lookout_server() as server:
        url = server.url
        runner = subprocess.Popen(
            [sys.executable, "-m", "lookout", "run", "--url", url, "--service", "bench",
             "--no-echo", "--", sys.executable, "-c", CHILD, str(args.rate), str(args.seconds)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        time.sleep(1.0)  # past interpreter start-up, which is not shipping work
        begin, begin_cpu = time.monotonic(), cpu_seconds(runner.pid)
        child_pid = None
        while runner.poll() is None and time.monotonic() - begin < args.seconds - 1.5:
            if child_pid is None:
                children = (
                    Path(f"/proc/{runner.pid}/task/{runner.pid}/children").read_text().split()
                )
                child_pid = int(children[0]) if children else None
                child_begin = cpu_seconds(child_pid) if child_pid else 0.0
            time.sleep(0.5)
        elapsed = time.monotonic() - begin
        run_cpu = cpu_seconds(runner.pid) - begin_cpu
        child_cpu = (cpu_seconds(child_pid) - child_begin) if child_pid else float("nan")
        runner.wait(timeout=args.seconds + 60)
        expected = None  # the child's own count of lines, plus its final "done" line
        deadline = time.monotonic() + 20
        while expected is None and time.monotonic() < deadline:
            params = {"service": "bench", "q": "done", "start": "0"}
            logs = httpx.get(f"{url}/api/lookout/logs", params=params, timeout=10).json()["logs"]
            if logs:
                expected = int(logs[0]["attributes"]["sent"]) + 1
            else:
                time.sleep(0.5)
    import duckdb

    with duckdb.connect(str(server.data_dir / "lookout.duckdb"), read_only=True) as connection:
        row = connection.execute("SELECT count(*) FROM logs WHERE service = 'bench'").fetchone()
        stored = int(row[0]) if row else 0
    share = run_cpu / elapsed
    per_thousand = share / (args.rate / 1000)
    report = {
        "benchmark": "run_cost",
        "rate_lines_per_s": args.rate,
        "seconds_measured": round(elapsed, 2),
        "lookout_run_cpu_s": round(run_cpu, 3),
        "child_cpu_s": round(child_cpu, 3),
        "lookout_run_core_share_per_1000_lines_s": round(per_thousand, 4),
        "child_core_share": round(child_cpu / elapsed, 4),
        "lines_expected": expected,
        "lines_stored": stored,
        "target": f"<= {TARGET_CORE_SHARE} of a core per 1,000 lines/s, no line lost",
    }
    met = per_thousand <= TARGET_CORE_SHARE and expected is not None and stored == expected
    report["target_met"] = met
    print(json.dumps(report, indent=2))
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
