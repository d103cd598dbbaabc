"""Fixtures for server tests: an in-process server (fast) and a real `lookout server`."""

from __future__ import annotations

import contextlib
import os
import signal
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from lookout.config import Project, ServerConfig
from lookout.server.app import main_app
from lookout.server.runtime import ServerRuntime
from tests.support import ROOT, free_port, wait_until

DSN_KEY = "test-public-key"


def config_for(data_dir: Path, **overrides: object) -> ServerConfig:
    values: dict[str, object] = {
        "data_dir": data_dir,
        "projects": (Project(1, "busline", (DSN_KEY,)),),
        "scrub_key": "test-key",
    }
    values.update(overrides)
    return ServerConfig(**values)  # type: ignore[arg-type]


@dataclass
class InProcess:
    runtime: ServerRuntime
    client: httpx.Client


@pytest.fixture
def served(tmp_path: Path) -> Iterator[InProcess]:
    """The main app over ASGI in this process, with a store in tmp_path."""
    with in_process(config_for(tmp_path / "data")) as server:
        yield server


@contextlib.contextmanager
def in_process(config: ServerConfig) -> Iterator[InProcess]:
    """The main app of a server with `config` over ASGI in this process."""
    runtime = ServerRuntime.open(config)
    transport = httpx.ASGITransport(app=main_app(runtime))  # type: ignore[arg-type]
    import asyncio

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    class SyncTransport(httpx.BaseTransport):
        def handle_request(self, request: httpx.Request) -> httpx.Response:
            async def go() -> httpx.Response:
                response = await transport.handle_async_request(request)
                body = await response.aread()
                return httpx.Response(response.status_code, headers=response.headers, content=body)

            return asyncio.run_coroutine_threadsafe(go(), loop).result(30)

    with httpx.Client(transport=SyncTransport(), base_url="http://lookout.test") as client:
        yield InProcess(runtime, client)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    loop.close()
    runtime.close()


@dataclass
class RunningServer:
    url: str
    otlp_url: str
    data_dir: Path
    process: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)
    drainer: threading.Thread | None = None

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        if self.drainer is not None:
            self.drainer.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()
        return code


def start_server(
    data_dir: Path,
    *args: str,
    env: dict[str, str] | None = None,
    verify: str | None = None,
    probe: str = "/readyz",
) -> RunningServer:
    """A real `lookout server`; `verify` is the CA file when it serves HTTPS; `probe` is
    the path waited for (`/healthz` for a store whose /readyz may say degraded). A port
    that another process took between `free_port()` and the bind is tried again with new
    ports (twice at most); any other start failure fails at once."""
    for attempt in range(3):
        try:
            return _start_server(data_dir, *args, env=env, verify=verify, probe=probe)
        except PortTakenError:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


class PortTakenError(AssertionError):
    """The server could not bind the port it was given: someone took it meanwhile."""


def _start_server(
    data_dir: Path,
    *args: str,
    env: dict[str, str] | None,
    verify: str | None,
    probe: str,
) -> RunningServer:
    port, otlp_port = free_port(), free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "lookout", "server", "--data-dir", str(data_dir),
         "--port", str(port), "--otlp-port", str(otlp_port), *args],
        cwd=ROOT,
        env={**os.environ, "LOOKOUT_SENTRY_KEYS": f"1={DSN_KEY}", "LOOKOUT_SCRUB_KEY": "test-key",
             **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # fmt: skip
    server = RunningServer(
        f"http://127.0.0.1:{port}", f"http://127.0.0.1:{otlp_port}", data_dir, process
    )

    def drain() -> None:
        assert process.stdout is not None
        for raw in process.stdout:
            server.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    drainer = threading.Thread(target=drain, daemon=True)
    server.drainer = drainer
    drainer.start()

    def ready() -> bool:
        if process.poll() is not None:
            drainer.join(5)
            output = "\n".join(server.lines)
            if "address already in use" in output:
                raise PortTakenError(output[-2000:])
            raise AssertionError("lookout server exited:\n" + "\n".join(server.lines[-60:]))
        try:
            if verify is not None:
                url = server.url.replace("http://", "https://")
                trusted = ssl.create_default_context(cafile=verify)
                return httpx.get(f"{url}{probe}", timeout=1, verify=trusted).status_code == 200
            return httpx.get(f"{server.url}{probe}", timeout=1).status_code == 200
        except httpx.TransportError:
            return False

    try:
        wait_until(ready, 30, f"lookout server to answer {probe}")
    except BaseException:
        process.kill()  # never leave a server behind a failed start, nor its pipe open
        process.wait(10)
        drainer.join(5)
        if process.stdout is not None:
            process.stdout.close()
        raise
    return server


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RunningServer]:
    running = start_server(tmp_path / "data")
    try:
        yield running
    finally:
        running.stop()
