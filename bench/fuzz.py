"""Mutation-based fuzzing of every wire-format parser, at a scale CI cannot afford.

    python bench/fuzz.py --json [--examples N] [--http-examples M] [--jobs J] [--seed S]

Runs the properties of tests/fuzz (the same targets, mutators and allowed errors) with N
examples per parser (default: 1,000,000 across the parsers), in chunks of a fresh random seed
each, on J processes. Then posts M mutated requests per endpoint family to a real
`lookout server` and checks that it never answers 5xx and is ready and still takes a valid
request afterwards. Progress goes to stderr; the report is JSON. Exits 1 on any uncaught
exception, any input taking over 1 s (the best of three timings), any 5xx, or an unhealthy
server.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
TOTAL_EXAMPLES = 1_000_000
CHUNK = 2_000  # examples per hypothesis run: a fresh engine, bounded memory, a new seed
SLOWEST_KEPT = 5


@dataclass
class ChunkReport:
    """What one chunk of one target found."""

    target: str
    examples: int = 0
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    slowest: list[tuple[float, int, str]] = field(default_factory=list)  # (s, bytes, input)
    failures: list[str] = field(default_factory=list)
    harness_errors: list[str] = field(default_factory=list)  # the fuzzer's own bugs


def _size(value: Any) -> int:
    return len(value) if isinstance(value, bytes | str) else len(repr(value))


def run_chunk(name: str, examples: int, seed: int) -> ChunkReport:
    """`examples` examples of target `name` from hypothesis seed `seed` (in a worker)."""
    from hypothesis import seed as hypothesis_seed
    from tests.fuzz import targets

    report = ChunkReport(name)

    def observe(_: Any, value: Any, verdict: Any) -> None:
        report.examples += 1
        report.errors[verdict.error or "parsed"] += 1
        if len(report.slowest) < SLOWEST_KEPT or verdict.seconds > report.slowest[-1][0]:
            report.slowest.append((verdict.seconds, _size(value), repr(value)[:300]))
            report.slowest.sort(reverse=True)
            del report.slowest[SLOWEST_KEPT:]

    prop = targets.fuzz_property(
        targets.TARGETS[name], examples, observe=observe, derandomize=False, raise_slow=False
    )
    try:
        hypothesis_seed(seed)(prop)()
    except AssertionError as exc:  # UncaughtError, after hypothesis shrank the input
        report.failures.append(str(exc)[:2000])
    except Exception as exc:  # a mutator's bug: this chunk is lost, the others go on
        report.harness_errors.append(f"seed {seed}: {type(exc).__name__}: {str(exc)[:2000]}")
    return report


def parsers_phase(names: list[str], examples: int, jobs: int, seed: int) -> dict[str, Any]:
    chunks = [
        (name, min(CHUNK, examples - start), seed + index)
        for name in names
        for index, start in enumerate(range(0, examples, CHUNK))
    ]
    examples_by = collections.Counter[str]()
    errors_by: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    slowest: dict[str, list[tuple[float, int, str]]] = collections.defaultdict(list)
    failures: list[dict[str, str]] = []
    harness_errors: list[dict[str, str]] = []
    began = time.monotonic()
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(run_chunk, *chunk) for chunk in chunks]
        for done, future in enumerate(as_completed(futures), 1):
            part = future.result()
            examples_by[part.target] += part.examples
            errors_by[part.target].update(part.errors)
            slowest[part.target] = sorted([*slowest[part.target], *part.slowest], reverse=True)
            del slowest[part.target][SLOWEST_KEPT:]
            failures.extend({"target": part.target, "error": f} for f in part.failures)
            harness_errors.extend({"target": part.target, "error": e} for e in part.harness_errors)
            total = sum(examples_by.values())
            rate = total / max(time.monotonic() - began, 1e-9)
            print(f"[{done}/{len(chunks)}] {part.target}: {examples_by[part.target]:,} examples; "
                  f"{total:,} in all ({rate:,.0f}/s); {len(failures)} failures",
                  file=sys.stderr, flush=True)  # fmt: skip
    worst = max((s[0][0] for s in slowest.values() if s), default=0.0)
    slowest_inputs = [
        {"parser": name, "seconds": round(seconds, 4), "bytes": size, "input": shown}
        for name, kept in slowest.items()
        for seconds, size, shown in kept[:1]
    ]
    return {
        "examples_per_parser": dict(examples_by),
        "examples_total": sum(examples_by.values()),
        "failures": failures,
        "harness_errors": harness_errors,
        "slowest_input_s": round(worst, 4),
        "slowest_by_parser_s": {n: round(s[0][0], 4) for n, s in slowest.items() if s},
        "slowest_inputs": sorted(slowest_inputs, key=lambda row: -row["seconds"])[:SLOWEST_KEPT],
        "exceptions_by_type": {n: dict(c) for n, c in errors_by.items()},
    }


def http_phase(per_family: int, seed: int) -> dict[str, Any]:
    """Mutated requests to a real `lookout server`, then its health."""
    import httpx
    from hypothesis import seed as hypothesis_seed
    from tests.fuzz import http

    from _server import lookout_server

    # The server the bench starts takes Sentry project 1 with the key the requests carry.
    os.environ.setdefault("LOOKOUT_SENTRY_KEYS", f"1={http.DSN_KEY}")
    os.environ.setdefault("LOOKOUT_SCRUB_KEY", "bench-fuzz-key")
    statuses: dict[str, collections.Counter[int]] = {}
    failures: list[dict[str, str]] = []
    slowest = 0.0
    healthy = True
    with lookout_server() as server, httpx.Client(base_url=server.url, timeout=30) as client:
        for family in http.FAMILIES:
            counts = statuses[family] = collections.Counter()

            def observe(_: Any, answer: Any, counts: collections.Counter[int] = counts) -> None:
                nonlocal slowest
                counts[answer.status] += 1
                slowest = max(slowest, answer.seconds)

            now_ns = time.time_ns()
            prop = http.http_property(
                client, family, per_family, now_ns=now_ns, observe=observe, derandomize=False
            )
            try:
                hypothesis_seed(seed)(prop)()
            except AssertionError as exc:  # ServerError: a 5xx
                failures.append({"family": family, "error": str(exc)[:2000]})
            try:
                http.check_healthy(client, family, now_ns)
            except (AssertionError, httpx.HTTPError) as exc:
                healthy = False
                failures.append({"family": family, "error": f"unhealthy afterwards: {exc}"})
            print(f"http {family}: {sum(counts.values()):,} requests, {dict(counts)}",
                  file=sys.stderr, flush=True)  # fmt: skip
    return {
        "requests_per_family": {f: sum(c.values()) for f, c in statuses.items()},
        "status_counts": {
            f: {str(k): v for k, v in sorted(c.items())} for f, c in statuses.items()
        },
        "failures": failures,
        "slowest_request_s": round(slowest, 4),
        "healthy_afterwards": healthy,
    }


def main() -> int:
    sys.path.insert(0, str(ROOT))  # tests.fuzz holds the properties
    from tests.fuzz import targets

    names = targets.names()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    per_parser = math.ceil(TOTAL_EXAMPLES / len(names))
    parser.add_argument(
        "--examples", type=int, default=per_parser, help=f"examples per parser ({per_parser:,})"
    )
    parser.add_argument(
        "--http-examples", type=int, default=2000, help="requests per endpoint family; 0: none"
    )
    parser.add_argument("--parsers", default=",".join(names), help="comma-separated targets")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes")
    parser.add_argument("--seed", type=int, default=int(time.time()), help="first seed")
    args = parser.parse_args()
    chosen = [n for n in args.parsers.split(",") if n]
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        parser.error(f"unknown parsers {unknown}; known: {', '.join(names)}")
    began = time.monotonic()
    report: dict[str, Any] = {"benchmark": "fuzz", "seed": args.seed}
    report["parsers"] = parsers_phase(chosen, args.examples, args.jobs, args.seed)
    if args.http_examples:
        report["http"] = http_phase(args.http_examples, args.seed)
    parsers, http = report["parsers"], report.get("http")
    report["seconds"] = round(time.monotonic() - began, 1)
    report["target"] = "0 uncaught exceptions, no input over 1 s, no 5xx, a healthy server"
    report["target_met"] = (
        not parsers["failures"]
        and not parsers["harness_errors"]  # an incomplete run proves nothing
        and parsers["slowest_input_s"] <= targets.SLOWEST_S
        and (http is None or (not http["failures"] and http["healthy_afterwards"]))
    )
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(f"{parsers['examples_total']:,} examples over {len(chosen)} parsers, "
              f"{len(parsers['failures'])} failures, slowest input {parsers['slowest_input_s']} s"
              + (f"; {sum(http['requests_per_family'].values()):,} requests, "
                 f"{len(http['failures'])} failures" if http else "")
              + f"; target met: {report['target_met']}")  # fmt: skip
    return 0 if report["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
