"""`lookout demo`: `lookout server`, then busline (`python -m busline up`) sending it
everything, then customers buying tickets (`python -m busline load`). The terminal shows
one line per component with its URL, then a status line every 2 s saying whether data is
flowing: every service scraped with `up` = 1, and at least one span, one log record and one
sample from each in the store.

busline is started as a command and found through the port files it writes under its state
directory; nothing here imports it. Every child dies with the demo: Ctrl-C stops them, and
if the demo itself is killed, the kernel sends them SIGTERM (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx

#: The services whose data must flow (the providers simulator is not the company's).
SERVICES = ("gateway", "auth", "ticketing", "payments", "fleet", "notifier")
STATUS_EVERY_S = 2.0
STOP_GRACE_S = 8.0


def _pdeathsig() -> Callable[[], None] | None:
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG

    return preexec


PREEXEC = _pdeathsig()


def free_port(preferred: int) -> int:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", preferred))
        except OSError:
            sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Flow:
    """What the store holds per service: the demo's definition of data flowing."""

    up: dict[str, float] = field(default_factory=dict)
    spans: set[str] = field(default_factory=set)
    logs: set[str] = field(default_factory=set)
    samples: set[str] = field(default_factory=set)

    def missing(self) -> list[str]:
        out = []
        for service in SERVICES:
            lacks = [
                what
                for what, ok in (
                    ("up", self.up.get(service) == 1),
                    ("spans", service in self.spans),
                    ("logs", service in self.logs),
                    ("samples", service in self.samples),
                )
                if not ok
            ]
            if lacks:
                out.append(f"{service}: {'/'.join(lacks)}")
        return out

    @property
    def flowing(self) -> bool:
        return not self.missing()


def check_flow(client: httpx.Client, server: str) -> Flow:
    """Ask the server, through its public read and Prometheus APIs, what it holds."""
    import httpx

    flow = Flow()
    try:
        up = client.get(f"{server}/api/v1/query", params={"query": "up"}, timeout=5).json()
        for row in up.get("data", {}).get("result", []):
            flow.up[row["metric"].get("job", "")] = float(row["value"][1])
        counted = client.get(
            f"{server}/api/v1/query",
            params={"query": "count by (job) (process_start_time_seconds)"},
            timeout=5,
        ).json()
        for row in counted.get("data", {}).get("result", []):
            if float(row["value"][1]) > 0:
                flow.samples.add(row["metric"].get("job", ""))
        for service in SERVICES:
            traces = client.get(
                f"{server}/api/lookout/traces",
                params={"service": service, "limit": 1},
                timeout=5,
            )
            if traces.status_code == 200 and traces.json().get("traces"):
                flow.spans.add(service)
            logs = client.get(
                f"{server}/api/lookout/logs",
                params={"service": service, "limit": 1},
                timeout=5,
            )
            if logs.status_code == 200 and logs.json().get("logs"):
                flow.logs.add(service)
    except (httpx.HTTPError, ValueError, KeyError, TypeError):
        pass
    return flow


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.root = Path(args.data_dir).resolve()
        self.state = self.root / "busline"
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.port = free_port(args.port)
        self.otlp_port = free_port(4318)  # OTLP/HTTP's standard port when free
        self.server = f"http://127.0.0.1:{self.port}"
        self.tty = sys.stdout.isatty()
        self.scrub_key = os.environ.get("LOOKOUT_SCRUB_KEY") or _scrub_key(self.root)

    def spawn(self, name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log: IO[bytes] = (self.logs / f"{name}.log").open("ab")
        process = subprocess.Popen(  # noqa: S603 - our own interpreter and modules
            command,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=PREEXEC,  # noqa: PLW1509 - one prctl call
            start_new_session=True,
        )
        log.close()
        self.children.append((name, process))
        return process

    def env(self) -> dict[str, str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.update(
            {
                "LOOKOUT_URL": self.server,
                "OTEL_EXPORTER_OTLP_ENDPOINT": self.server,
                "OTEL_BSP_SCHEDULE_DELAY": "1000",
                "SENTRY_DSN": self.server.replace("http://", "http://lookout@") + "/1",
                "LOOKOUT_ENVIRONMENT": "demo",
                "BUSLINE_STATE": str(self.state),
                # The same key as the server's: phone hashes match across the two.
                "LOOKOUT_SCRUB_KEY": self.scrub_key,
            }
        )
        return env

    def start(self) -> None:
        python = sys.executable
        server_env = {
            **os.environ,
            "LOOKOUT_STORE_MEMORY_LIMIT": self.args.memory_limit,
            # The fleet map and `up` move every 5 s, as the strategy's dashboards expect.
            "LOOKOUT_REGISTERED_SCRAPE_INTERVAL": "5",
            "LOOKOUT_SCRUB_KEY": self.scrub_key,
        }
        self.spawn(
            "server",
            [
                python,
                "-m",
                "lookout",
                "server",
                "--port",
                str(self.port),
                "--otlp-port",
                str(self.otlp_port),
                "--data-dir",
                str(self.root / "store"),
            ],
            server_env,
        )
        self.wait_server()
        busline = [
            python,
            "-m",
            "lookout",
            "run",
            "--service",
            "supervisor",
            "--scrape",
            "auto",
            "--no-echo",
            "--exit-grace",
            "0.5",
            "--",
            python,
            "-m",
            "busline",
            "up",
            "--state",
            str(self.state),
        ]
        if os.environ.get("BUSLINE_AMQP_URL"):
            enable_rabbitmq_prometheus()
        self.spawn("busline", busline, self.env())
        if self.args.rate > 0:
            self.spawn(
                "load",
                [python, "-m", "busline", "load", "--rate", str(self.args.rate)],
                self.env(),
            )

    def wait_server(self, deadline_s: float = 60.0) -> None:
        import httpx

        end = time.monotonic() + deadline_s
        while time.monotonic() < end:
            self.check_children()
            try:
                if httpx.get(f"{self.server}/readyz", timeout=1.0).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise SystemExit(f"lookout demo: the server did not start; see {self.logs}/server.log")

    def check_children(self) -> None:
        for name, process in self.children:
            if process.poll() is not None:
                raise SystemExit(
                    f"lookout demo: {name} exited with {process.returncode}; "
                    f"see {self.logs / (name + '.log')}"
                )

    def components(self) -> list[tuple[str, str]]:
        rows = [
            ("lookout", f"{self.server}  (read API /api/lookout, Prometheus API /api/v1)"),
            ("otlp", f"http://127.0.0.1:{self.otlp_port}  (OTLP/HTTP /v1/traces, /v1/logs)"),
        ]
        for name in ("gateway", "auth", "ticketing", "payments", "fleet", "providers"):
            found = _read_json(self.state / "run" / f"{name}.json")
            if found:
                rows.append((name, f"http://{found['host']}:{found['port']}"))
        if (found := _read_json(self.state / "run" / "notifier.json")) is not None:
            rows.append(("notifier", f"worker, pid {found['pid']}"))
        control = _read_json(self.state / "run" / "supervisor.json")
        if control:
            rows.append(("control", f"http://{control['host']}:{control['port']}/control/v1"))
        faults = _read_json(self.state / "run" / "faults.json")
        if faults:
            rows.append(
                (
                    "faults",
                    f"http://{faults['host']}:{faults['port']}/faults/v1  "
                    f"(BUSLINE_STATE={self.state} python -m busline fault ...)",
                )
            )
        return rows

    def all_reported(self) -> bool:
        """Whether every component has written its port file (busline's supervisor too)."""
        names = (*SERVICES, "providers", "supervisor")
        return all((self.state / "run" / f"{name}.json").exists() for name in names)

    def show_components(self) -> None:
        width = max(len(name) for name, _ in self.components())
        for name, url in self.components():
            print(f"{name.ljust(width)}  {url}", flush=True)

    def run(self) -> int:
        started = time.monotonic()
        print(f"lookout demo: starting (logs in {self.logs})", flush=True)
        self.start()
        import httpx

        with httpx.Client() as client:
            return self._watch(client, started)

    def _watch(self, client: httpx.Client, started: float) -> int:
        shown = False
        flowing_at: float | None = None
        last_plain = 0.0
        end = None if self.args.duration is None else started + self.args.duration
        while end is None or time.monotonic() < end:
            self.check_children()
            if not shown and self.all_reported():
                self.show_components()
                shown = True
            flow = check_flow(client, self.server)
            elapsed = time.monotonic() - started
            if flow.flowing and flowing_at is None:
                flowing_at = elapsed
                if self.tty:
                    print()
                print(
                    f"data flowing after {elapsed:.0f} s: every service is up and has "
                    "spans, logs and samples in the store",
                    flush=True,
                )
            missing = flow.missing()
            line = (
                f"[{elapsed:5.0f} s] data flowing"
                if not missing
                else f"[{elapsed:5.0f} s] waiting for " + "; ".join(missing)
            )
            if self.tty:
                print("\r" + line[:150].ljust(150), end="", flush=True)
            elif time.monotonic() - last_plain >= (10 if missing else 30):
                print(line, flush=True)
                last_plain = time.monotonic()
            time.sleep(STATUS_EVERY_S)
        if self.tty:
            print()
        return 0 if flowing_at is not None else 1

    def stop(self) -> None:
        """SIGTERM every child (busline's supervisor stops its own), SIGKILL stragglers."""
        for _, process in reversed(self.children):
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for _, process in self.children:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)


def _scrub_key(root: Path) -> str:
    """The demo's phone-hash key: random, made once per data directory and kept there, so
    hashes stay comparable across runs and nobody else knows it."""
    import secrets

    path = root / "scrub.key"
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        key = secrets.token_hex(32)
        path.write_text(key)
        path.chmod(0o600)
        return key


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def enable_rabbitmq_prometheus() -> None:
    """Queue depth and age come from the broker: its Prometheus plugin and management API."""
    import shutil

    plugins = shutil.which("rabbitmq-plugins")
    if plugins is not None:
        subprocess.run(  # noqa: S603
            [plugins, "-q", "enable", "rabbitmq_prometheus", "rabbitmq_management"],
            check=False,
            capture_output=True,
            timeout=60,
        )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data-dir", default=".lookout-demo", help="the store, busline's state and the logs"
    )
    parser.add_argument("--port", type=int, default=8686, help="server port (8686 when free)")
    parser.add_argument(
        "--rate",
        type=float,
        default=2.0,
        help="customers' journeys a second (browse, look, buy, ...); 0: no load (default 2)",
    )
    parser.add_argument("--duration", type=float, help="stop after this many seconds")
    parser.add_argument(
        "--memory-limit", default="512MiB", help="DuckDB's memory limit (default 512MiB)"
    )


def main(args: argparse.Namespace) -> int:
    if args.rate < 0 or (args.duration is not None and args.duration <= 0):
        print("lookout demo: --rate must be ≥ 0 and --duration > 0", file=sys.stderr)
        return 2
    demo = Demo(args)
    stop = False

    def on_signal(signum: int, _: object) -> None:
        nonlocal stop
        stop = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    try:
        return demo.run()
    except KeyboardInterrupt:
        print("\nlookout demo: stopping", flush=True)
        return 0 if stop else 130
    finally:
        demo.stop()
