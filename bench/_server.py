"""A `lookout server` process for a benchmark: started on a free port, stopped after."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
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
    pid: int = 0


@contextmanager
def lookout_server(
    data_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 30.0,
) -> Iterator[BenchServer]:
    """Run `lookout server` until the block ends (SIGTERM, then wait): on a fresh store, or
    on `data_dir`; `env` adds LOOKOUT_* variables to the server's environment."""
    port = free_port()
    data = data_dir or Path(tempfile.mkdtemp(prefix="lookout-bench-"))
    process = subprocess.Popen(
        [sys.executable, "-m", "lookout", "server", "--data-dir", str(data), "--port", str(port),
         "--otlp-port", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **(env or {})},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout_s
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise SystemExit("bench: lookout server did not become ready")
            time.sleep(0.1)
        yield BenchServer(url, data, process.pid)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
