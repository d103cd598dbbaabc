"""The interim demo: `lookout server`, and two instances of the quick-start service (one
calling the other) sending it traces and errors, with a little traffic. Run it with
`python3 dev.py demo` (Ctrl-C stops it).

Each request prints its X-Trace-Id and the read-API link of its trace; the services' JSON
log lines carry the same trace_id in both processes. The store lives in `.lookout-demo/`.
The full demo (busline's services, load and faults) replaces this once busline exists.
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


def free_port(preferred: int = 0) -> int:
    """`preferred` when it is free, else any free port."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(service: str, port: int, seats_url: str | None, server: str) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "OTEL_SERVICE_NAME": service,
        "OTEL_EXPORTER_OTLP_ENDPOINT": server,
        "OTEL_BSP_SCHEDULE_DELAY": "500",
        "SENTRY_DSN": server.replace("http://", "http://lookout@") + "/1",
        "LOOKOUT_ENVIRONMENT": "dev",
        "PYTHONUNBUFFERED": "1",
    }
    if seats_url:
        env["SEATS_URL"] = seats_url
    cmd = [sys.executable, "-m", "uvicorn", "quickstart:app", "--port", str(port)]
    return subprocess.Popen(cmd, cwd=HERE, env=env)


def wait_ready(url: str, method: str = "POST", deadline_s: float = 30.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            httpx.request(method, url, timeout=1.0)
        except httpx.TransportError:
            time.sleep(0.1)
        else:
            return
    raise SystemExit(f"demo: {url} did not answer within {deadline_s:.0f}s")


def start_server(port: int) -> subprocess.Popen[bytes]:
    data = HERE.parent.parent / ".lookout-demo"
    cmd = [sys.executable, "-m", "lookout", "server", "--data-dir", str(data),
           "--port", str(port), "--otlp-port", "0"]  # fmt: skip
    return subprocess.Popen(cmd, env={**os.environ, "LOOKOUT_SCRUB_KEY": "demo"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=0.0, help="seconds (0: until Ctrl-C)")
    parser.add_argument("--rate", type=float, default=1.0, help="requests per second")
    args = parser.parse_args()
    server_port, seats_port, booking_port = free_port(8686), free_port(), free_port()
    server = f"http://127.0.0.1:{server_port}"
    seats_url = f"http://127.0.0.1:{seats_port}"
    procs = [start_server(server_port)]
    procs.append(start("seats", seats_port, None, server))
    procs.append(start("booking", booking_port, seats_url, server))
    booking = f"http://127.0.0.1:{booking_port}"
    try:
        wait_ready(f"{server}/readyz", "GET")
        wait_ready(f"{seats_url}/book/warmup")
        wait_ready(f"{booking}/book/warmup")
        print(f"demo: lookout server on {server}; booking on {booking} calls seats on "
              f"{seats_url}; Ctrl-C stops", flush=True)  # fmt: skip
        end = time.monotonic() + args.duration if args.duration else float("inf")
        while time.monotonic() < end:
            route = random.choice(ROUTES)
            response = httpx.post(f"{booking}/book/{route}", timeout=5.0)
            trace_id = response.headers.get("x-trace-id")
            print(f"demo: POST /book/{route} -> {response.status_code}  "
                  f"trace {server}/api/lookout/traces/{trace_id}", flush=True)  # fmt: skip
            time.sleep(1.0 / args.rate)
    except KeyboardInterrupt:
        pass
    finally:
        for proc in reversed(procs):  # services first, so their last spans reach the server
            proc.terminate()
            proc.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
