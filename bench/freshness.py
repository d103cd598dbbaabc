"""How soon a record is queryable after its 2xx, under sustained ingest.

    python bench/freshness.py --json [--seconds 20]

Measures, in one run: (1) the sustained OTLP log ingest rate of one `lookout server`
(8 senders, 200 records a request, as fast as it answers); then (2) at half that rate, how
long after each probe request's 2xx its record appears in the read API. Target: p95 <= 2 s.
Prints JSON and exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import uuid

import httpx

from _server import lookout_server

TARGET_P95_S = 2.0
SENDERS = 8
PER_REQUEST = 200


def batch(marker: str, count: int) -> bytes:
    now = time.time_ns()
    records = [
        {"timeUnixNano": str(now + i), "severityNumber": 9,
         "body": {"stringValue": f"{marker} record {i}"}}
        for i in range(count)
    ]  # fmt: skip
    return json.dumps({"resourceLogs": [{
        "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "fresh"}}]},
        "scopeLogs": [{"logRecords": records}]}]}).encode()  # fmt: skip


def load(url: str, seconds: float, per_second: float | None, sent: list[int]) -> None:
    """Send batches for `seconds`; paced to `per_second` records when given."""
    end = time.monotonic() + seconds
    with httpx.Client(timeout=10) as client:
        while time.monotonic() < end:
            began = time.monotonic()
            response = client.post(f"{url}/v1/logs", content=batch("load", PER_REQUEST),
                                   headers={"content-type": "application/json"})  # fmt: skip
            if response.status_code == 200:
                sent.append(PER_REQUEST)
            if per_second:
                pause = PER_REQUEST / (per_second / SENDERS) - (time.monotonic() - began)
                if pause > 0:
                    time.sleep(pause)


def run_load(
    url: str, seconds: float, per_second: float | None
) -> tuple[list[int], list[threading.Thread]]:
    sent: list[int] = []
    threads = [
        threading.Thread(target=load, args=(url, seconds, per_second, sent)) for _ in range(SENDERS)
    ]
    for thread in threads:
        thread.start()
    return sent, threads


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the JSON report")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    args = parser.parse_args()
    with lookout_server() as server:
        url = server.url
        print("phase 1: sustained rate", file=sys.stderr, flush=True)
        sent, threads = run_load(url, args.seconds, None)
        for thread in threads:
            thread.join()
        sustained = sum(sent) / args.seconds
        half = sustained / 2
        print(f"phase 2: freshness at {half:.0f} records/s", file=sys.stderr, flush=True)
        sent, threads = run_load(url, args.seconds, half)
        delays = []
        with httpx.Client(timeout=10) as client:
            end = time.monotonic() + args.seconds - 1
            while time.monotonic() < end:
                marker = uuid.uuid4().hex
                answer = client.post(f"{url}/v1/logs", content=batch(marker, 1),
                                     headers={"content-type": "application/json"})  # fmt: skip
                acked = time.monotonic()
                if answer.status_code != 200:
                    continue
                while True:
                    found = client.get(
                        f"{url}/api/lookout/logs",
                        params={"service": "fresh", "q": marker, "limit": "1"},
                    ).json()
                    if found["logs"]:
                        delays.append(time.monotonic() - acked)
                        break
                    if time.monotonic() - acked > 30:
                        delays.append(float("inf"))
                        break
                time.sleep(0.2)
        for thread in threads:
            thread.join()
    delays.sort()
    p95 = delays[int(len(delays) * 0.95) - 1] if delays else float("inf")
    report = {
        "benchmark": "freshness",
        "sustained_records_per_s": round(sustained, 1),
        "probe_rate_records_per_s": round(half, 1),
        "probes": len(delays),
        "p50_s": round(statistics.median(delays), 4) if delays else None,
        "p95_s": round(p95, 4),
        "target": f"p95 <= {TARGET_P95_S} s at half the sustained rate",
        "target_met": p95 <= TARGET_P95_S,
    }
    print(json.dumps(report, indent=2))
    return 0 if report["target_met"] else 1


if __name__ == "__main__":
    sys.exit(main())
