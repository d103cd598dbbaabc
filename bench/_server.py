"""A `lookout server` process for a benchmark: started on a free port, stopped after."""

from __future__ import annotations

import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

SPAWN = multiprocessing.get_context("spawn")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class BenchServer:
    url: str
    data_dir: Path
    pid: int = 0


def wait_ready(
    url: str, process: subprocess.Popen[bytes], timeout_s: float, name: str, log: Path | None
) -> None:
    """Poll `url` until it answers 200; a process that exits or a deadline that passes ends
    the benchmark, quoting the end of the process's log when there is one."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-1500:] if log and log.exists() else ""
            raise SystemExit(f"bench: {name} did not become ready; its log ends:\n{tail}")
        time.sleep(0.1)


def stop(process: subprocess.Popen[bytes], timeout_s: float = 120.0) -> None:
    """SIGTERM, then wait; a process that does not stop in time is killed."""
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def lookout_server(
    data_dir: Path | None = None,
    env: Mapping[str, str] | None = None,
    ready_timeout_s: float = 30.0,
    log: Path | None = None,
) -> Iterator[BenchServer]:
    """Run `lookout server` until the block ends (SIGTERM, then wait): on a fresh store, or
    on `data_dir`; `env` adds LOOKOUT_* variables to the server's environment. With `log`,
    the server's output is kept there and quoted if it fails to start."""
    port = free_port()
    data = data_dir or Path(tempfile.mkdtemp(prefix="lookout-bench-"))
    with log.open("wb") if log else open(os.devnull, "wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "lookout", "server", "--data-dir", str(data),
             "--port", str(port), "--otlp-port", "0"],
            stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
        )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(f"{url}/readyz", process, ready_timeout_s, "lookout server", log)
        yield BenchServer(url, data, process.pid)
    finally:
        stop(process)


def _stdout_to_stderr() -> None:
    """In a helper process: stdout is the report's, so whatever a library prints there
    (DuckDB's progress bar) goes to stderr."""
    os.dup2(2, 1)


def isolated(function: Any, *args: Any) -> Future[Any]:
    """Run `function(*args)` in a fresh interpreter: a process of its own, as a sender is."""
    pool = ProcessPoolExecutor(1, mp_context=SPAWN, initializer=_stdout_to_stderr)
    future = pool.submit(function, *args)
    pool.shutdown(wait=False)
    return future
