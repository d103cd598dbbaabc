"""kill -9 trials: does any acknowledged request get lost, or any request half-stored?

    python bench/crash.py --json [--trials 100] [--seed N]

Runs the trials of tests/server/test_crash.py (bench/_crash.py) against one `lookout server`
data directory: SIGKILL at a random moment with at least 8 requests in flight and 1,000
acknowledged records, restart, count every marker's records. Progress goes to stderr, the
JSON report to stdout. Exits 1 when an acknowledged marker lost records or a marker was
stored in part, in any trial or in the final store.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from _crash import Trial, count_markers, rejudge, run_trials, start_lookout


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    parser.add_argument("--trials", type=int, default=100, help="how many kills (100)")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="base seed")
    parser.add_argument("--keep", action="store_true", help="keep the data directory")
    parser.add_argument(
        "--negative-control",
        action="store_true",
        help="start the server with the test-only switch that acknowledges before committing "
        "(the run must then fail)",
    )
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="lookout-crash-")) / "data"
    began = time.monotonic()

    def progress(trial: Trial) -> None:
        print(f"{trial.summary()} in {trial.seconds:.1f}s", file=sys.stderr, flush=True)

    print(f"{args.trials} trials, base seed {args.seed}, store {data}", file=sys.stderr)
    env = {"LOOKOUT_TEST_ACK_BEFORE_COMMIT": "1"} if args.negative_control else {}
    trials = run_trials(data, args.trials, args.seed, start_lookout, env=env, progress=progress)
    final = rejudge(trials, count_markers(data))
    elapsed = time.monotonic() - began
    report = {
        "benchmark": "crash",
        "trials": len(trials),
        "base_seed": args.seed,
        "negative_control": args.negative_control,
        "requests_sent": sum(len(t.sent) for t in trials),
        "acknowledged_markers": sum(len(t.acked) for t in trials),
        "acknowledged_records": sum(t.acked_records for t in trials),
        "min_acknowledged_records_per_trial": min(t.acked_records for t in trials),
        "min_in_flight_at_kill": min(t.in_flight_at_kill for t in trials),
        "lost": sum(len(t.lost) for t in trials),
        "partial": sum(len(t.partial) for t in trials),
        "violating_trial_seeds": [t.seed for t in trials if not t.ok],
        "final_store_violations": final,
        "seconds": round(elapsed, 1),
        "seconds_per_trial": round(elapsed / max(len(trials), 1), 2),
    }
    ok = not report["lost"] and not report["partial"] and not final
    report["target_met"] = ok
    if args.json:
        print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(data.parent, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
