"""Busline services as real processes: each test gets its own state directory (port files,
SQLite databases, the embedded queue) and starts the services it needs with
`python -m busline service NAME`, exactly as the supervisor does (without `lookout run`)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from sentry_sdk.envelope import Envelope

from lookout.ingest.bodies import decompress
from tests.support import ROOT, wait_until

#: Telemetry goes nowhere in service unit tests (the end-to-end tests run a real server).
QUIET = {
    "OTEL_TRACES_EXPORTER": "none",
    "OTEL_LOGS_EXPORTER": "none",
    "LOOKOUT_METRICS_ADDR": "127.0.0.1:0",
    "PYTHONUNBUFFERED": "1",
}


@dataclass
class Proc:
    name: str
    process: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def json_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                out.append(value)
        return out


class Platform:
    """Starts busline services in one state directory and finds them by their port files."""

    def __init__(self, state: Path, env: Mapping[str, str]) -> None:
        self.state = state
        self.env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), **QUIET, **env}
        self.env["BUSLINE_STATE"] = str(state)
        self.procs: dict[str, Proc] = {}

    def port_file(self, name: str) -> dict[str, Any] | None:
        try:
            data = json.loads((self.state / "run" / f"{name}.json").read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) else None

    def url(self, name: str) -> str:
        data = self.port_file(name)
        assert data is not None, f"{name} has no port file"
        return f"http://{data['host']}:{data['port']}"

    def start(self, name: str, *, wait: bool = True, **env: str) -> Proc:
        before = self.port_file(name)
        process = subprocess.Popen(
            [sys.executable, "-m", "busline", "service", name],
            cwd=ROOT,
            env={**self.env, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        proc = Proc(name, process)
        self.procs[name] = proc

        def drain() -> None:
            assert process.stdout is not None
            for raw in process.stdout:
                proc.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

        proc.reader = threading.Thread(target=drain, daemon=True)
        proc.reader.start()
        if wait and name != "notifier":

            def ready() -> bool:
                if process.poll() is not None:
                    time.sleep(0.2)
                    raise AssertionError(f"{name} exited early:\n" + "\n".join(proc.lines))
                data = self.port_file(name)
                if data is None or data == before or data.get("pid") != process.pid:
                    return False
                try:
                    httpx.get(f"http://{data['host']}:{data['port']}/healthz", timeout=0.5)
                except httpx.TransportError:
                    return False
                return True

            wait_until(ready, 30.0, f"{name} to listen")
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM) -> None:
        proc = self.procs.pop(name, None)
        if proc is None:
            return
        if proc.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.process.pid, sig)
            try:
                proc.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.process.pid, signal.SIGKILL)
                proc.process.wait(timeout=10)
        if proc.reader is not None:
            proc.reader.join(5)
        if proc.process.stdout is not None:
            proc.process.stdout.close()

    def stop_all(self) -> None:
        for name in list(self.procs):
            self.stop(name)


class Envelopes:
    """A Sentry envelope sink on a real socket: the check-ins it received."""

    def __init__(self) -> None:
        self.check_ins: list[dict[str, Any]] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length") or 0))
                headers = {k.lower(): v for k, v in self.headers.items()}
                body = decompress(body, headers.get("content-encoding", ""))
                for item in Envelope.deserialize(body).items:
                    if item.type == "check_in":
                        sink.check_ins.append(json.loads(item.payload.get_bytes()))
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *_: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.dsn = f"http://public@127.0.0.1:{self.server.server_address[1]}/1"
        threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True).start()

    def statuses(self, job: str | None = None) -> list[str]:
        """Final check-in statuses (ok, error), of `job` when given, in arrival order."""
        return [
            c["status"]
            for c in self.check_ins
            if c.get("status") != "in_progress" and job in (None, c.get("monitor_slug"))
        ]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def descendants(root: int) -> list[int]:
    """Every process whose ancestry leads to `root` (from /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [root]
    while frontier:
        pid = frontier.pop()
        children = [p for p, parent in parents.items() if parent == pid]
        out.extend(children)
        frontier.extend(children)
    return out


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Platform]:
    """Busline services on the embedded defaults (SQLite, the embedded queue)."""
    plat = Platform(tmp_path / "state", {})
    try:
        yield plat
    finally:
        plat.stop_all()


@pytest.fixture
def own_postgres(postgres_url: str) -> Iterator[str]:
    """A PostgreSQL database of this test's own (the session's `postgres_url` shows the
    server is there; this one is created and dropped around the test)."""
    import uuid

    import psycopg

    from tests.conftest import _postgres_admin_dsn

    admin = _postgres_admin_dsn()
    name = f"busline_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"{admin.rsplit('/', 1)[0]}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
