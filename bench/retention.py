"""Retention holds the data directory under its cap: a 200 MB cap, 1 GB ingested.

    python bench/retention.py --json

A week of telemetry (logs, spans, metric samples; 1 GB as JSON) is replayed through the
store's writer over 6 days ending today, with `retention: {max_bytes: 200MB}` enforced every
10 MB ingested (the server's 60 s period at ~170 kB/s) and the compaction run at each new day.
`du` of the data directory is read every 5 MB, each time just before an enforcement, four
ways (apparent and allocated sums over os.walk, `du -sb`, `du -s -B1`). Progress goes to
stderr. Exits 1 when any reading exceeds 220 MB. `--no-cap` is the negative control: the
same run without the cap, which must end above 220 MB.
(tests/server/test_retention.py runs the same replay at a tenth of the size.)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.server.retention_load import MB, DiskSample, run_load

from lookout.store import parse_retention

CAP = 200 * MB
LIMIT = 220 * MB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.add_argument("--total-mb", type=int, default=1000, help="MB to ingest (1000)")
    parser.add_argument("--no-cap", action="store_true", help="negative control: no max_bytes")
    args = parser.parse_args()

    def progress(sample: DiskSample) -> None:
        print(
            f"ingested {sample.ingested / MB:7.1f} MB   du -sb {sample.du_sb / MB:6.1f} MB   "
            f"du -s {sample.du_blocks / MB:6.1f} MB",
            file=sys.stderr,
        )

    policy = parse_retention({} if args.no_cap else {"max_bytes": CAP})
    with tempfile.TemporaryDirectory(prefix="lookout-retention-") as tmp:
        result = run_load(
            Path(tmp) / "data",
            policy,
            args.total_mb * MB,
            enforce_every=10 * MB,
            sample_every=5 * MB,
            progress=progress,
        )
    within = result.max_du <= LIMIT
    figures = {
        "cap_mb": None if args.no_cap else CAP / MB,
        "ingested_mb": round(result.ingested / MB, 1),
        "max_du_mb": round(result.max_du / MB, 1),
        "final_du_mb": round(result.samples[-1].most / MB, 1),
        "within_220_mb": within,
        "closed_early": result.closed,
        "dropped": {f"{s}/{r}": n for (s, r), n in sorted(result.dropped.items())},
        "seconds": round(result.seconds, 1),
        "enforce_runs": len(result.enforce_seconds),
        "enforce_median_s": round(statistics.median(result.enforce_seconds), 3),
        "enforce_max_s": round(max(result.enforce_seconds), 3),
        "du_mb_by_ingested_mb": [
            [round(s.ingested / MB), round(s.du_sb / MB, 1), round(s.du_blocks / MB, 1)]
            for s in result.samples
        ],
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        for key, value in figures.items():
            if key != "du_mb_by_ingested_mb":
                print(f"{key}: {value}")
    if args.no_cap:
        return 0 if not within else 1
    return 0 if within else 1


if __name__ == "__main__":
    sys.exit(main())
