"""`python -m busline up`: run every busline service, keep them running, and serve the
control API.

Each company service runs as `lookout run --scrape auto --service NAME -- python -m
busline service NAME`, so its stdout reaches Lookout and its metrics endpoint is
registered for scraping. The providers simulator runs without `lookout run`: it plays
companies whose internals busline never sees, so its output goes to a file of its own.

A service that exits is started again after a backoff (1 s, doubling to 30 s, back to 1 s
once it has stayed up for a minute), on the port it had: the supervisor passes it in
`BUSLINE_PORT`. Restarts count in `busline_service_restarts_total{service}`. The embedded
queue's depth and oldest message come from its store, exported here under RabbitMQ's own
metric names (with RabbitMQ, its `rabbitmq_prometheus` plugin exports them).

If the supervisor dies, even by `kill -9`, its children get SIGTERM from the kernel
(PR_SET_PDEATHSIG), so nothing outlives it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import ctypes.util
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from busline import kit

BACKOFF_START_S = 1.0
BACKOFF_MAX_S = 30.0
HEALTHY_AFTER_S = 60.0
STOP_GRACE_S = 6.0  # one service asked to stop (restart, deploy)
STOP_ALL_GRACE_S = 2.0  # everything stopping
QUEUES = ("booking.confirmed",)
OUTSIDERS_NEVER_SEE = (
    "LOOKOUT_",
    "OTEL_",
    "SENTRY_",
    "BUSLINE_CONTROL_TOKEN",
    "BUSLINE_DATABASE_URL",
    "BUSLINE_AMQP_URL",
)
RABBITMQ_PROMETHEUS_PORT = 15692


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec function asking the kernel to SIGTERM the child when we die (Linux)."""
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    prctl = libc.prctl
    pr_set_pdeathsig = 1

    def preexec() -> None:
        prctl(pr_set_pdeathsig, signal.SIGTERM)

    return preexec


PREEXEC = _parent_death_signal()


@dataclass
class Child:
    name: str
    releases: list[str]
    process: subprocess.Popen[bytes] | None = None
    port: int | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff_s: float = BACKOFF_START_S
    start_at: float | None = None  # when a crashed child is due to start again
    last_exit: int | None = None
    intentional: bool = False  # stopped on purpose (restart, deploy): no backoff
    stop_sent_at: float | None = None  # SIGTERM sent; SIGKILL after the grace
    kicked: bool = False  # start again at once after this exit, not after a backoff

    @property
    def version(self) -> str:
        return self.releases[-1]


@dataclass
class Options:
    echo: bool = False
    lookout: bool = True
    control_host: str = "127.0.0.1"
    control_port: int = 0
    services: tuple[str, ...] = kit.SERVICES
    extra_env: dict[str, str] = field(default_factory=dict)


class Supervisor:
    def __init__(self, options: Options) -> None:
        self.options = options
        self.state = kit.state_dir()
        self.logs = self.state / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.releases_path = self.state / "releases.json"
        saved = kit.read_json(self.releases_path, {})
        initial = [
            v.strip()
            for v in os.environ.get("BUSLINE_RELEASES", "1.4.1," + kit.version()).split(",")
            if v.strip()
        ]
        self.children = {
            name: Child(
                name,
                list(saved.get(name) or initial) if isinstance(saved, dict) else list(initial),
            )
            for name in options.services
        }
        self.stopping = False
        self._metrics: dict[str, Any] = {}
        self.faults: Any = None  # the fault registry, once `run()` serves its API

    # ------------------------------------------------------------ processes

    def command(self, name: str) -> list[str]:
        service = [sys.executable, "-m", "busline", "service", name]
        if name == "providers" or not self.options.lookout:
            return service
        launcher = [sys.executable, "-m", "lookout", "run", "--service", name, "--scrape", "auto"]
        if not self.options.echo:
            launcher.append("--no-echo")
        # When the platform stops, Lookout may be stopping too: one second of retries.
        launcher.extend(["--exit-grace", "1"])
        return [*launcher, "--", *service]

    def env(self, child: Child) -> dict[str, str]:
        env = {**os.environ, **self.options.extra_env}
        if child.name == "providers":
            # Outside the company: none of its telemetry settings or credentials.
            env = {k: v for k, v in env.items() if not k.startswith(OUTSIDERS_NEVER_SEE)}
        env["BUSLINE_STATE"] = str(self.state)
        env["BUSLINE_VERSION"] = child.version
        env["PYTHONUNBUFFERED"] = "1"
        env.pop("BUSLINE_PORT", None)
        if child.port is not None:
            env["BUSLINE_PORT"] = str(child.port)
        return env

    def start(self, child: Child) -> None:
        out: Any = None
        if child.name == "providers" or not self.options.lookout:
            # Its own log file: what the providers print is not the company's to see.
            out = (self.logs / f"{child.name}.log").open("ab")
        elif not self.options.echo:
            out = subprocess.DEVNULL
        try:
            child.process = subprocess.Popen(  # noqa: S603 - our own interpreter and module
                self.command(child.name),
                env=self.env(child),
                stdout=out,
                stderr=subprocess.STDOUT if out is not None else None,
                stdin=subprocess.DEVNULL,
                preexec_fn=PREEXEC,  # noqa: PLW1509 - a prctl call, no locks taken
                start_new_session=True,
            )
        finally:
            if out is not None and out is not subprocess.DEVNULL:
                out.close()
        child.started_at = time.monotonic()
        child.start_at = None
        child.intentional = False
        self._log(
            "service_started",
            target=child.name,
            version=child.version,
            pid=child.process.pid,
            port=child.port,
        )

    def stop(self, child: Child) -> None:
        """Ask `child` to stop (SIGTERM, which `lookout run` forwards); `check()` kills it
        after the grace and starts it again when it was stopped on purpose."""
        process = child.process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGTERM)
        child.stop_sent_at = time.monotonic()

    def learn_port(self, child: Child) -> None:
        if child.port is None:
            found = kit.listening(child.name)
            if found is not None and found.port and found.started_at >= time.time() - 3600:
                child.port = found.port

    def check(self) -> None:
        """One pass: note ports, start crashed children when their backoff is over."""
        now = time.monotonic()
        for child in self.children.values():
            self.learn_port(child)
            process = child.process
            if (
                process is not None
                and child.stop_sent_at is not None
                and process.poll() is None
                and now - child.stop_sent_at > STOP_GRACE_S
            ):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
            if process is not None and process.poll() is not None and child.start_at is None:
                child.stop_sent_at = None
                child.last_exit = process.returncode
                if child.intentional or child.kicked:
                    child.start_at = now
                    child.kicked = False
                else:
                    if now - child.started_at >= HEALTHY_AFTER_S:
                        child.backoff_s = BACKOFF_START_S
                    child.start_at = now + child.backoff_s
                    self._log(
                        "service_exited",
                        level="warning",
                        target=child.name,
                        exit_code=process.returncode,
                        restart_in_s=child.backoff_s,
                    )
                    child.backoff_s = min(BACKOFF_MAX_S, child.backoff_s * 2)
            if child.start_at is not None and now >= child.start_at and not self.stopping:
                child.restarts += 1
                self._count_restart(child.name)
                self.start(child)

    # ------------------------------------------------------------ control API's Services

    def releases(self, name: str) -> list[str]:
        return list(self.children[name].releases)

    def _save_releases(self) -> None:
        kit.write_atomically(self.releases_path, {n: c.releases for n, c in self.children.items()})

    def restart(self, name: str, reason: str) -> None:
        child = self.children[name]
        self._log("service_restart_requested", target=name, reason=reason)
        child.intentional = True
        self.stop(child)

    def deploy(self, name: str, version: str, reason: str) -> None:
        child = self.children[name]
        if len(child.releases) >= 2 and child.releases[-2] == version:
            child.releases.pop()
        else:
            child.releases.append(version)
        self._save_releases()
        self._log("service_deploy", target=name, version=version, reason=reason)
        child.intentional = True
        self.stop(child)

    def rollback(self, name: str, reason: str) -> str:
        child = self.children[name]
        child.releases.pop()
        self._save_releases()
        self._log("service_rollback", target=name, version=child.version, reason=reason)
        child.intentional = True
        self.stop(child)
        return child.version

    def end_due_faults(self) -> None:
        """End the faults whose time is up. Never fatal: the platform runs on."""
        try:
            self.faults.expire()
        except Exception as exc:  # noqa: BLE001 - noted in faults.log, not our logs
            self.faults.note("fault_expire_failed", error=f"{type(exc).__name__}: {exc}")

    def kick(self, name: str) -> None:
        """Start `name` now when it waits out a restart backoff (a crash loop was fixed)."""
        child = self.children.get(name)
        if child is None:
            return
        child.backoff_s = BACKOFF_START_S
        if child.start_at is not None:
            child.start_at = time.monotonic()
        elif child.process is not None and child.process.poll() is not None:
            child.kicked = True  # exited, and check() has not seen it yet

    def status(self) -> dict[str, Any]:
        out = {}
        for name, child in self.children.items():
            running = child.process is not None and child.process.poll() is None
            found = kit.listening(name)
            out[name] = {
                "status": "running" if running else ("restarting" if child.start_at else "down"),
                "version": child.version,
                "releases": list(child.releases),
                "port": child.port,
                "url": found.url if found is not None and name != "notifier" else None,
                "pid": found.pid if found is not None else None,
                "restarts": child.restarts,
                "last_exit": child.last_exit,
            }
        return out

    # ------------------------------------------------------------ metrics and logs

    def _log(self, event: str, level: str = "info", **fields: Any) -> None:
        """A line of the supervisor's own (the service it is about is `target`: `service`
        names whose line it is)."""
        log = self._metrics.get("log")
        if log is not None:
            getattr(log, level)(event, **fields)
        else:
            line = {"event": event, "level": level, "logger": "busline.supervisor", **fields}
            print(json.dumps(line), flush=True)

    def _count_restart(self, name: str) -> None:
        counter = self._metrics.get("restarts")
        if counter is not None:
            counter.labels(service=name).inc()

    def instrument(self) -> None:
        from lookout import sdk

        kit.instrument("supervisor")
        self._metrics["log"] = sdk.get_logger("busline.supervisor")
        restarts = sdk.counter(
            "busline_service_restarts_total",
            "Restarts of a busline service by its supervisor (crashes and requested).",
            ["service"],
        )
        for name in self.children:
            restarts.labels(service=name)  # every series exists from the start, at 0
        self._metrics["restarts"] = restarts
        self._metrics["head"] = sdk.gauge(
            "rabbitmq_queue_head_message_timestamp",
            "Unix time the oldest message in the queue was published; absent when empty.",
            ["queue"],
        )
        if not os.environ.get("BUSLINE_AMQP_URL"):
            self._metrics["ready"] = sdk.gauge(
                "rabbitmq_queue_messages_ready",
                "Messages ready for delivery in a queue of the embedded broker.",
                ["queue"],
            )
            self._metrics["unacked"] = sdk.gauge(
                "rabbitmq_queue_messages_unacked",
                "Messages delivered and not yet acknowledged (embedded broker).",
                ["queue"],
            )

    def export_queue_stats(self) -> None:
        """Depth and oldest message of each queue, from the broker: the embedded queue's
        store, or RabbitMQ's management API for the head timestamp (its
        `rabbitmq_prometheus` plugin, scraped by Lookout, gives the depth)."""
        for name in QUEUES:
            try:
                ready, unacked, head = self._queue_stats(name)
            except Exception as exc:  # noqa: BLE001 - a broker we cannot read is logged
                self._log("queue_stats_failed", level="warning", queue=name, error=str(exc))
                continue
            if "ready" in self._metrics:
                self._metrics["ready"].labels(queue=name).set(ready)
                self._metrics["unacked"].labels(queue=name).set(unacked)
            gauge = self._metrics["head"]
            if head is None:
                with contextlib.suppress(KeyError):
                    gauge.remove(name)
            else:
                gauge.labels(queue=name).set(head)

    def _queue_stats(self, name: str) -> tuple[int, int, float | None]:
        url = os.environ.get("BUSLINE_AMQP_URL")
        if not url:
            from busline import queue

            stats = queue.stats_sync(name)
            return stats.ready, stats.unacked or 0, stats.head_timestamp
        import urllib.parse

        import httpx

        parsed = httpx.URL(url)
        vhost = urllib.parse.unquote(parsed.path.lstrip("/")) or "/"
        api = os.environ.get(
            "BUSLINE_RABBITMQ_MANAGEMENT_URL", f"http://{parsed.host or '127.0.0.1'}:15672"
        )
        answer = httpx.get(
            f"{api}/api/queues/{urllib.parse.quote(vhost, safe='')}/"
            f"{urllib.parse.quote(name, safe='')}",
            auth=(
                urllib.parse.unquote(parsed.username or "guest"),
                urllib.parse.unquote(parsed.password or "guest"),
            ),
            timeout=5.0,
        )
        if answer.status_code == 404:
            return 0, 0, None
        answer.raise_for_status()
        body = answer.json()
        head = body.get("head_message_timestamp")
        return (
            int(body.get("messages_ready") or 0),
            int(body.get("messages_unacknowledged") or 0),
            float(head) if isinstance(head, (int, float)) else None,
        )

    def register_rabbitmq_metrics(self) -> None:
        """With RabbitMQ, have Lookout scrape the broker's own per-queue metrics."""
        url = os.environ.get("BUSLINE_AMQP_URL")
        lookout_url = os.environ.get("LOOKOUT_URL")
        if not url or not lookout_url or not self.options.lookout:
            return
        import httpx

        host = httpx.URL(url).host or "127.0.0.1"
        body = {
            "job": "rabbitmq",
            "targets": [f"{host}:{RABBITMQ_PROMETHEUS_PORT}"],
            "labels": {"__metrics_path__": "/metrics/per-object"},
        }
        token = os.environ.get("LOOKOUT_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        try:
            httpx.post(
                lookout_url.rstrip("/") + "/api/targets", json=body, headers=headers, timeout=5.0
            )
        except httpx.HTTPError as exc:
            self._log("rabbitmq_scrape_registration_failed", level="warning", error=str(exc))

    # ------------------------------------------------------------ the main loop

    async def run(self) -> int:
        import uvicorn

        from busline import control, fault_api, faults

        _QuietServer = _quiet_server_class()  # noqa: N806 - a class

        self.instrument()
        for child in self.children.values():
            self.start(child)
        self.register_rabbitmq_metrics()
        controls = control.Control(self)
        api = control.create_app(controls, token=os.environ.get("BUSLINE_CONTROL_TOKEN") or None)
        # Faults have their own API, port and token: whoever may act on busline (and
        # Lookout's diagnosis) may not read the ground truth.
        self.faults = faults.Registry(self, ReleasePipeline(controls))
        fault_app = fault_api.create_app(
            self.faults, token=os.environ.get("BUSLINE_FAULTS_TOKEN") or None
        )
        servers = []
        for name, app, port in (
            ("supervisor", api, self.options.control_port),
            ("faults", fault_app, 0),
        ):
            config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="off")
            sock = kit.bind(self.options.control_host, port)
            kit.write_atomically(
                kit.run_dir() / f"{name}.json",
                {
                    "service": name,
                    "host": self.options.control_host,
                    "port": sock.getsockname()[1],
                    "pid": os.getpid(),
                    "version": kit.version(),
                    "started_at": time.time(),
                },
            )
            server = _QuietServer(config)
            servers.append((server, asyncio.create_task(server.serve(sockets=[sock]))))
        done = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            loop.add_signal_handler(signum, done.set)
        last_stats = 0.0
        while not done.is_set():
            self.check()
            # On this thread, as the control and fault APIs' handlers are: one at a time.
            self.end_due_faults()
            if time.monotonic() - last_stats >= 5.0:
                last_stats = time.monotonic()
                await asyncio.to_thread(self.export_queue_stats)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout=0.5)
        self.stopping = True
        self._log("supervisor_stopping")
        try:
            self.faults.stop_all()
        except Exception as exc:  # noqa: BLE001 - stopping goes on regardless
            self.faults.note("fault_stop_all_failed", error=f"{type(exc).__name__}: {exc}")
        for server, _ in servers:
            server.should_exit = True
        await asyncio.to_thread(self.stop_all)
        for _, serving in servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(serving, timeout=1)
        # Our own last telemetry, briefly: Lookout may be stopping as well.
        from lookout import sdk

        sdk.shutdown(0.5)
        return 0

    def stop_all(self) -> None:
        """SIGTERM every child's process group at once (a service and its `lookout run`
        stop side by side, not one after the other), then SIGKILL what is left after the
        grace, so that the platform is down soon after a killed demo."""
        live = [
            c.process
            for c in self.children.values()
            if c.process is not None and c.process.poll() is None
        ]
        for process in live:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_ALL_GRACE_S
        for process in live:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
        for process in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=2)


class ReleasePipeline:
    """How a release reaches busline: a deploy (and its withdrawal) through the control
    API's actions, so each is in the audit log like any other change."""

    ACTOR = "release-pipeline"

    def __init__(self, controls: Any) -> None:
        self.controls = controls

    def deploy_release(self, name: str, version: str) -> None:
        from busline.control import Caller

        self.controls.deploy(Caller(self.ACTOR, f"release {version}", dry_run=False), name, version)

    def withdraw_release(self, name: str, version: str) -> None:
        from busline.control import Caller

        caller = Caller(self.ACTOR, f"release {version} withdrawn", dry_run=False)
        self.controls.rollback(caller, name)


def _quiet_server_class() -> Any:
    import uvicorn

    class QuietServer(uvicorn.Server):
        """uvicorn without its signal handlers: the supervisor's loop owns the signals."""

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            yield

    return QuietServer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--state", type=Path, help="state directory (default: $BUSLINE_STATE)")
    parser.add_argument(
        "--echo", action="store_true", help="copy the services' output to ours (off: --no-echo)"
    )
    parser.add_argument(
        "--without-lookout",
        action="store_true",
        help="run the services directly, not through `lookout run` (their lines go to logs/)",
    )
    parser.add_argument("--control-port", type=int, default=0, help="control API port (0: any)")
    parser.add_argument(
        "--services",
        default=",".join(kit.SERVICES),
        help="comma-separated services to run (default: all)",
    )


def up(args: argparse.Namespace) -> int:
    if args.state is not None:
        os.environ["BUSLINE_STATE"] = str(args.state)
    names = tuple(n.strip() for n in str(args.services).split(",") if n.strip())
    unknown = [n for n in names if n not in kit.SERVICES]
    if unknown or not names:
        print(
            f"busline up: unknown service(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(kit.SERVICES)}",
            file=sys.stderr,
        )
        return 2
    if not 0 <= args.control_port <= 65535:
        print("busline up: --control-port must be 0..65535", file=sys.stderr)
        return 2
    options = Options(
        echo=args.echo,
        lookout=not args.without_lookout,
        control_port=args.control_port,
        services=names,
    )
    return asyncio.run(Supervisor(options).run())
