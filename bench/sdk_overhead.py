"""What lookout.sdk adds to a request, against what users assemble today.

    python bench/sdk_overhead.py --json [--rounds 5] [--requests 20000]

A trivial Starlette route is driven in-process (no sockets), one subprocess per scenario,
scenarios interleaved round by round so machine noise hits them alike:

  a         the bare app
  b         the app with lookout.sdk, every pillar on, exporting to a local sink
  c         the stack users assemble: OpenTelemetryMiddleware (exclude_spans receive/send),
            prometheus-fastapi-instrumentator defaults, a structlog+orjson access-log
            middleware, sentry-sdk with its default integrations
  floor     what (b) does per request, written directly against the libraries, through
            (b)'s own TracerProvider, processor and exporter
  b_refused, b_blackholed   (b) with its backends refusing, or accepting and never answering

Targets, on the medians of rounds: (b-a)/(c-a) <= 0.4; (b-a)/(floor-a) <= 2; b's p99 with
backends up, refused and black-holed within max(5 %, 0.3 ms) of each other. Prints JSON
and exits 1 when a target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("a", "b", "c", "floor", "b_refused", "b_blackholed")
WARMUP = 2000


# -- the child: one scenario, one round ------------------------------------------------------
def bare_app() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    async def trip(request: Any) -> PlainTextResponse:
        return PlainTextResponse("ok")

    return Starlette(routes=[Route("/trips/{trip_id}", trip)])


def lookout_app(endpoint: str) -> Any:
    import lookout.sdk

    return lookout.sdk.init(
        "bench",
        app=bare_app(),
        environ={
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
            "SENTRY_DSN": endpoint.replace("http://", "http://public@") + "/1",
            "LOOKOUT_METRICS_ADDR": "127.0.0.1:0",
            "LOOKOUT_SCRUB_KEY": "bench",
        },
    )


def assembled_app(endpoint: str) -> Any:
    """(c): exactly the libraries a user wires together by hand."""
    import orjson
    import sentry_sdk
    import structlog
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from prometheus_fastapi_instrumentator import Instrumentator

    sentry_sdk.init(dsn=endpoint.replace("http://", "http://public@") + "/1")
    provider = TracerProvider(resource=Resource.create({"service.name": "bench"}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{endpoint}/v1/traces"))
    )
    trace.set_tracer_provider(provider)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        logger_factory=structlog.BytesLoggerFactory(),
    )
    log = structlog.get_logger()

    class AccessLog:
        def __init__(self, app: Any) -> None:
            self.app = app

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                await self.app(scope, receive, send)
                return
            begin = time.perf_counter()
            status = 500

            async def capture(message: Any) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            await self.app(scope, receive, capture)
            log.info(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=(time.perf_counter() - begin) * 1000,
            )

    app = bare_app()
    Instrumentator().instrument(app)
    app.add_middleware(AccessLog)
    return OpenTelemetryMiddleware(app, exclude_spans=["receive", "send"])


def floor_app(endpoint: str) -> Any:
    """What (b) does per request, written directly with the libraries, through the
    TracerProvider, processor and exporter lookout.sdk.init() built."""
    import sentry_sdk
    import structlog
    from opentelemetry import context, trace
    from opentelemetry.trace import SpanKind

    import lookout.sdk

    lookout_app(endpoint)  # builds the same provider, registry and log pipeline
    runtime = lookout.sdk._runtime
    assert runtime is not None
    tracer = runtime.tracer
    instruments = runtime.instruments
    log = structlog.get_logger().bind(logger="lookout.access")
    app = bare_app()

    async def floor(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        with sentry_sdk.isolation_scope():  # (b) isolates each request's user and crumbs
            await floor_request(scope, receive, send)

    async def floor_request(scope: Any, receive: Any, send: Any) -> None:
        span = tracer.start_span(
            "GET",
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": "GET",
                "url.path": scope["path"],
                "url.scheme": "http",
            },
        )
        token = context.attach(trace.set_span_in_context(span))
        active = instruments.server_active.labels("GET")
        active.inc()
        begin = time.perf_counter()
        status = 500
        trace_id = format(span.get_span_context().trace_id, "032x").encode()

        async def capture(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-trace-id", trace_id)]
            await send(message)

        await app(scope, receive, capture)
        duration = time.perf_counter() - begin
        route = scope["route"].path
        span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        span.update_name(f"GET {route}")
        instruments.server_duration.labels("GET", route, str(status), "").observe(
            duration, {"trace_id": trace_id.decode()}
        )
        log.info("http_request", http_method="GET", http_route=route, url_path=scope["path"],
                 status=status, duration_ms=round(duration * 1000, 3))  # fmt: skip
        span.end()
        active.dec()
        context.detach(token)

    return floor


def build(scenario: str, endpoint: str) -> Any:
    if scenario == "a":
        return bare_app()
    if scenario == "c":
        return assembled_app(endpoint)
    if scenario == "floor":
        return floor_app(endpoint)
    return lookout_app(endpoint)


async def measure(app: Any, requests: int) -> list[int]:
    """Nanoseconds per request, each request timed on its own."""
    scope_base = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
        "scheme": "http", "root_path": "", "query_string": b"", "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"bench"), (b"user-agent", b"bench/1.0")],
    }  # fmt: skip

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    times = []
    for index in range(requests + WARMUP):
        path = f"/trips/{index % 50}"
        scope = {**scope_base, "path": path, "raw_path": path.encode()}
        begin = time.perf_counter_ns()
        await app(scope, receive, send)
        elapsed = time.perf_counter_ns() - begin
        if index >= WARMUP:
            times.append(elapsed)
    return times


def child(scenario: str, endpoint: str, requests: int, result_fd: int) -> None:
    app = build(scenario, endpoint)
    times = asyncio.run(measure(app, requests))
    times.sort()
    result = {
        "scenario": scenario,
        "median_us": times[len(times) // 2] / 1000,
        "p99_us": times[int(len(times) * 0.99)] / 1000,
    }
    os.write(result_fd, (json.dumps(result) + "\n").encode())
    os._exit(0)  # a black-holed exporter must not hold the exit


# -- the parent: sinks, rounds, ratios ---------------------------------------------------------
def sink() -> tuple[str, ThreadingHTTPServer]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            try:
                self.rfile.read(int(self.headers.get("content-length") or 0))
                self.send_response(200)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"{}")
            except OSError:
                return  # a child exiting mid-export: nothing to answer

        def log_message(self, *_: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


def blackhole() -> str:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(512)
    held = []

    def accept() -> None:
        while True:
            held.append(server.accept()[0])

    threading.Thread(target=accept, daemon=True).start()
    return f"http://127.0.0.1:{server.getsockname()[1]}"


def refused() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def run_child(scenario: str, endpoint: str, requests: int) -> dict[str, Any]:
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [sys.executable, __file__, "--child", scenario, "--endpoint", endpoint,
         "--requests", str(requests), "--result-fd", str(write_end)],
        pass_fds=(write_end,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT / "src")}, cwd=ROOT,
    )  # fmt: skip
    os.close(write_end)
    with os.fdopen(read_end) as results:
        line = results.readline()
    process.wait(timeout=600)
    if not line:
        raise SystemExit(
            f"bench: scenario {scenario} produced no result (exit {process.returncode})"
        )
    return json.loads(line)


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--json", action="store_true", help="print the JSON report (progress goes to stderr)"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--child", choices=SCENARIOS, help=argparse.SUPPRESS)
    parser.add_argument("--endpoint", help=argparse.SUPPRESS)
    parser.add_argument("--result-fd", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.endpoint, args.requests, args.result_fd)
        return 0
    if args.rounds < 5 or args.requests < 20_000:
        print("bench: at least 5 rounds of 20,000 requests", file=sys.stderr)
        return 2
    up, _server = sink()
    endpoints = {"b_refused": refused(), "b_blackholed": blackhole()}
    results: dict[str, list[dict[str, Any]]] = {s: [] for s in SCENARIOS}
    for round_index in range(args.rounds):
        for scenario in SCENARIOS:
            result = run_child(scenario, endpoints.get(scenario, up), args.requests)
            results[scenario].append(result)
            # Progress on stderr; the report alone goes to stdout.
            print(f"round {round_index + 1}/{args.rounds} {scenario:13} "
                  f"median {result['median_us']:8.1f} us  p99 {result['p99_us']:8.1f} us",
                  file=sys.stderr, flush=True)  # fmt: skip
    median = {s: statistics.median(r["median_us"] for r in results[s]) for s in SCENARIOS}
    p99 = {s: statistics.median(r["p99_us"] for r in results[s]) for s in SCENARIOS}
    added_b = median["b"] - median["a"]
    added_c = median["c"] - median["a"]
    floor = median["floor"] - median["a"]
    p99s = [p99["b"], p99["b_refused"], p99["b_blackholed"]]
    p99_spread = max(p99s) - min(p99s)
    p99_allowed = max(0.05 * min(p99s), 300.0)
    ratios = {
        "b_vs_c": added_b / added_c if added_c > 0 else None,
        "b_vs_floor": added_b / floor if floor > 0 else None,
    }
    targets = {
        "b_vs_c <= 0.4": ratios["b_vs_c"] is not None and ratios["b_vs_c"] <= 0.4,
        "b_vs_floor <= 2": ratios["b_vs_floor"] is not None and ratios["b_vs_floor"] <= 2,
        "p99 up/refused/blackholed within max(5%, 0.3 ms)": p99_spread <= p99_allowed,
    }
    report = {
        "benchmark": "sdk_overhead",
        "git_sha": git_sha(),
        "rounds": args.rounds,
        "requests_per_round": args.requests,
        "median_us": median,
        "p99_us": p99,
        "added_us": {"b": added_b, "c": added_c, "floor": floor},
        "ratios": ratios,
        "p99_spread_us": p99_spread,
        "p99_allowed_us": p99_allowed,
        "targets_met": targets,
        "per_round": results,
    }
    print(json.dumps(report, indent=2))
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
