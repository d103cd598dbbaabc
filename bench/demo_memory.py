"""The demo's memory: run `lookout demo` at its default load and, after `--minutes` (15),
sum the PSS of every process it started (server, supervisor, services, their `lookout run`
launchers, the load). PSS counts shared pages once across processes, so the sum is what
the demo really costs the machine. Also reports whether the default load fits the machine:
the journeys a second the load generator achieved against the 2 it aims at, the share that
failed, and the CPU cores the whole demo used over the run's second half.

    .venv/bin/python bench/demo_memory.py --json [--minutes 15] [--memory-limit 512MiB]

Prints progress to stderr and one JSON document to stdout; exits 1 when the sum is over
1.5 GB or data never flowed. Also reports the time to data flowing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

TARGET_BYTES = 1.5e9
LOAD_RATE = 2.0  # `lookout demo`'s default
RATE_TOLERANCE = 0.15  # achieved within 15 % of the rate
MAX_FAILED_SHARE = 0.01
ROOT = Path(__file__).resolve().parent.parent


def tree(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [root], [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        out.extend(children)
        frontier.extend(children)
    return out


def pss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time of `pids`, in seconds."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
    return total / ticks


def journeys(log: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return out
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "journey":
            out.append(record)
    return out


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return "?"
    parts = [p.decode(errors="replace") for p in raw.split(b"\0") if p]
    if "run" in parts and "--service" in parts:  # a launcher: `lookout run ... -- CMD`
        return "lookout run " + parts[parts.index("--service") + 1]
    if "busline" in parts and "service" in parts:
        return "service " + parts[parts.index("service") + 1]
    for word in ("server", "demo", "load", "up"):
        if word in parts:
            return word
    return " ".join(parts[:3])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--minutes", type=float, default=15.0)
    parser.add_argument("--memory-limit", default="512MiB")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="lookout-demo-bench-") as tmp:
        process = subprocess.Popen(
            [sys.executable, "-m", "lookout", "demo", "--data-dir", tmp, "--port", "0",
             "--memory-limit", args.memory_limit],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )  # fmt: skip
        lines: list[str] = []
        started = time.monotonic()
        flowing_at: list[float] = []

        def drain() -> None:
            assert process.stdout is not None
            for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip()
                lines.append(line)
                if "data flowing after" in line and not flowing_at:
                    flowing_at.append(time.monotonic() - started)

        threading.Thread(target=drain, daemon=True).start()
        end = started + args.minutes * 60
        half = started + args.minutes * 30
        cpu_mark: tuple[float, float] | None = None
        try:
            while time.monotonic() < end:
                if cpu_mark is None and time.monotonic() >= half:
                    cpu_mark = (time.monotonic(), cpu_seconds(tree(process.pid)))
                if process.poll() is not None:
                    print("\n".join(lines[-30:]), file=sys.stderr)
                    return 1
                left = end - time.monotonic()
                total = sum(pss_bytes(p) for p in tree(process.pid))
                print(f"\r{left / 60:5.1f} min left, PSS now {total / 1e6:7.0f} MB",
                      end="", file=sys.stderr, flush=True)  # fmt: skip
                time.sleep(min(10.0, max(0.0, left)))
            print(file=sys.stderr)
            pids = tree(process.pid)
            per: dict[str, int] = {}
            for pid in pids:
                name = cmdline(pid)
                per[name] = per.get(name, 0) + pss_bytes(pid)
            total = sum(per.values())
            if cpu_mark is None:
                cpu_mark = (started, 0.0)
            cores = (cpu_seconds(pids) - cpu_mark[1]) / (time.monotonic() - cpu_mark[0])
            done = journeys(Path(tmp) / "logs" / "load.log")
            load_s = max(1.0, end - (started + (flowing_at[0] if flowing_at else 0.0)))
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
    failed = sum(1 for j in done if j.get("result") == "failed")
    result: dict[str, Any] = {
        "minutes": args.minutes,
        "duckdb_memory_limit": args.memory_limit,
        "processes": len(pids),
        "pss_total_mb": round(total / 1e6, 1),
        "pss_by_process_mb": {k: round(v / 1e6, 1) for k, v in sorted(per.items())},
        "data_flowing_after_s": round(flowing_at[0], 1) if flowing_at else None,
        "target_mb": TARGET_BYTES / 1e6,
        "load": {
            "journeys": len(done),
            "rate_target_per_s": LOAD_RATE,
            "rate_achieved_per_s": round(len(done) / load_s, 2),
            "failed_share": round(failed / len(done), 4) if done else None,
            "by_kind": dict(sorted(Counter(str(j.get("journey")) for j in done).items())),
            "cpu_cores_used_second_half": round(cores, 2),
            "cpu_cores": os.cpu_count(),
        },
    }
    rate_ok = abs(len(done) / load_s - LOAD_RATE) <= RATE_TOLERANCE * LOAD_RATE
    failed_ok = bool(done) and failed / len(done) <= MAX_FAILED_SHARE
    result["met"] = total <= TARGET_BYTES and bool(flowing_at) and rate_ok and failed_ok
    print(json.dumps(result, indent=None if args.json else 2))
    return 0 if result["met"] else 1


if __name__ == "__main__":
    sys.exit(main())
