"""The interim demo: two instances of the quick-start service, one calling the other,
with a little traffic. Run it with `python3 dev.py demo` (Ctrl-C stops it).

Each request prints its X-Trace-Id; the services' JSON log lines for it carry the same
trace_id in both processes, and each process serves Prometheus metrics on the URL its
`lookout_sdk_started` line reports. The full demo (lookout server plus busline) replaces
this once those exist.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

HERE = Path(__file__).resolve().parent
ROUTES = ("nairobi-mombasa", "nairobi-kisumu", "nairobi-nakuru", "nairobi-eldoret")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(service: str, port: int, seats_url: str | None) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "OTEL_SERVICE_NAME": service,
        "OTEL_TRACES_EXPORTER": "none",  # no trace backend yet: spans stay in-process
        "LOOKOUT_ENVIRONMENT": "dev",
        "PYTHONUNBUFFERED": "1",
    }
    if seats_url:
        env["SEATS_URL"] = seats_url
    cmd = [sys.executable, "-m", "uvicorn", "quickstart:app", "--port", str(port), "--no-access-log"]
    return subprocess.Popen(cmd, cwd=HERE, env=env)


def wait_ready(url: str, deadline_s: float = 20.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            httpx.post(url, timeout=1.0)
            return
        except httpx.TransportError:
            time.sleep(0.1)
    raise SystemExit(f"demo: {url} did not answer within {deadline_s:.0f}s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=0.0, help="seconds (0: until Ctrl-C)")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second")
    args = parser.parse_args()
    seats_port, booking_port = free_port(), free_port()
    seats_url = f"http://127.0.0.1:{seats_port}"
    procs = [start("seats", seats_port, None)]
    procs.append(start("booking", booking_port, seats_url))
    booking = f"http://127.0.0.1:{booking_port}"
    try:
        wait_ready(f"{seats_url}/book/warmup")
        wait_ready(f"{booking}/book/warmup")
        print(f"demo: booking on {booking} calls seats on {seats_url}; Ctrl-C stops", flush=True)
        end = time.monotonic() + args.duration if args.duration else float("inf")
        while time.monotonic() < end:
            route = random.choice(ROUTES)
            response = httpx.post(f"{booking}/book/{route}", timeout=5.0)
            print(f"demo: POST /book/{route} -> {response.status_code} "
                  f"X-Trace-Id {response.headers.get('x-trace-id')}", flush=True)
            time.sleep(1.0 / args.rate)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
