"""A `lookout server` process for a benchmark: started on a free port, stopped after."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class BenchServer:
    url: str
    data_dir: Path


@contextmanager
def lookout_server() -> Iterator[BenchServer]:
    """Run `lookout server` with a fresh store until the block ends (SIGTERM, then wait)."""
    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="lookout-bench-"))
    process = subprocess.Popen(
        [sys.executable, "-m", "lookout", "server", "--data-dir", str(data), "--port", str(port),
         "--otlp-port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit("bench: lookout server did not become ready")
            time.sleep(0.1)
        yield BenchServer(url, data)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=30)
