"""Run an instrumented app under one injected fault and report what the host saw.

    python -m tests.sdk.apps.faults CASE REQUESTS

Prints one JSON object on stderr (stdout may be the broken part): statuses, app
exceptions, log lines the SDK's plumbing emitted per cause, drops, RSS.
"""

from __future__ import annotations

import collections
import json
import os
import socket
import sys
import threading
import time
from typing import Any

CASES = (
    "exporter_raises",
    "encoder_raises",
    "processor_raises",
    "renderer_raises",
    "dns_failure",
    "stdout_closed",
    "stdout_pipe_full",
    "blackholed",
)


def blackhole() -> str:
    """A TCP port that accepts connections and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(128)
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            connection, _ = server.accept()
            held.append(connection)  # keep it open, read nothing, say nothing

    threading.Thread(target=accept, daemon=True).start()
    return f"127.0.0.1:{server.getsockname()[1]}"


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def inject(case: str) -> dict[str, str]:
    """Apply the fault; return the environment the SDK reads."""
    environ = {
        "OTEL_BSP_SCHEDULE_DELAY": "20",
        "OTEL_EXPORTER_OTLP_TIMEOUT": "500",
        "LOOKOUT_METRICS_ADDR": "off",
    }
    sink = os.environ.get("FAULT_SINK", "http://127.0.0.1:9")
    environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = sink
    if case == "exporter_raises":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        def explode(*_: Any, **__: Any) -> Any:
            raise RuntimeError("exporter exploded")

        OTLPSpanExporter.export = explode  # type: ignore[method-assign]
    elif case == "encoder_raises":
        import opentelemetry.exporter.otlp.proto.http.trace_exporter as module

        def bad_encode(*_: Any) -> Any:
            raise ValueError("cannot encode")

        module.encode_spans = bad_encode  # type: ignore[assignment]
    elif case == "processor_raises":
        from lookout.sdk._export import CountingBatchSpanProcessor

        def bad_on_end(*_: Any) -> None:
            raise RuntimeError("processor exploded")

        CountingBatchSpanProcessor.on_end = bad_on_end  # type: ignore[method-assign]
    elif case == "renderer_raises":
        import lookout.sdk._logs as logs

        class BrokenJson:
            @staticmethod
            def dumps(*_: Any, **__: Any) -> bytes:
                raise TypeError("cannot serialise")

        logs.orjson = BrokenJson  # type: ignore[assignment]
    elif case == "dns_failure":
        real = socket.getaddrinfo

        def no_dns(host: Any, *args: Any, **kw: Any) -> Any:
            if host == "collector.busline.invalid":
                raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
            return real(host, *args, **kw)

        socket.getaddrinfo = no_dns  # type: ignore[assignment]
        environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = "http://collector.busline.invalid:4318"
    elif case == "blackholed":
        hole = blackhole()
        environ["OTEL_EXPORTER_OTLP_ENDPOINT"] = f"http://{hole}"
        environ["SENTRY_DSN"] = f"http://public@{hole}/1"
    return environ


def main() -> int:
    case, requests = sys.argv[1], int(sys.argv[2])
    environ = inject(case)
    import lookout.sdk
    from lookout.sdk import _logs, testing

    plumbing: collections.Counter[str] = collections.Counter()
    original_emit = _logs.LogPipeline.emit_record

    def counting_emit(self: Any, record: Any) -> None:
        if record.name.startswith(
            ("lookout.sdk.internal", "opentelemetry", "sentry_sdk", "urllib3")
        ):
            plumbing[f"{record.name}:{record.msg}"] += 1
        original_emit(self, record)

    _logs.LogPipeline.emit_record = counting_emit  # type: ignore[method-assign]

    async def app(scope: Any, receive: Any, send: Any) -> None:
        lookout.sdk.get_logger("app").info("handled", msisdn="0712345678")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    registry = testing.fresh_registry()
    wrapped = lookout.sdk.init("faulty", app=app, environ=environ)
    statuses: collections.Counter[int] = collections.Counter()
    exceptions = 0
    warm = min(10_000, requests // 10)
    rss_warm = rss_bytes()
    begin = time.monotonic()
    done = 0
    while done < requests:
        batch = min(1000, requests - done)
        try:
            for status in testing.drive(wrapped, batch, "/pay"):
                statuses[status] += 1
        except Exception:
            exceptions += 1
        done += batch
        if done == warm:
            rss_warm = rss_bytes()
    elapsed = time.monotonic() - begin
    rss_end = rss_bytes()
    shutdown_begin = time.monotonic()
    lookout.sdk.shutdown(timeout_s=5.0)
    dropped = {
        f"{s.labels['signal']}/{s.labels['reason']}": s.value
        for m in registry.collect()
        if m.name == "lookout_sdk_dropped"
        for s in m.samples
        if s.name.endswith("_total")
    }
    report = {
        "case": case,
        "requests": requests,
        "statuses": {str(k): v for k, v in statuses.items()},
        "exceptions": exceptions,
        "plumbing": dict(plumbing),
        "dropped": dropped,
        "rss_warm": rss_warm,
        "rss_end": rss_end,
        "seconds": elapsed,
        "shutdown_seconds": time.monotonic() - shutdown_begin,
    }
    sys.stderr.write(json.dumps(report) + "\n")
    sys.stderr.flush()
    os._exit(0)  # daemon threads stuck on a dead backend must not hold the exit


if __name__ == "__main__":
    sys.exit(main())
