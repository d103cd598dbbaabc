"""Real parts for tests: an OTLP/HTTP sink, free ports, polling and uvicorn processes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
from opentelemetry.proto.collector.logs.v1.logs_service_pb2 import ExportLogsServiceRequest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], Any], timeout_s: float = 10.0, what: str = "it") -> Any:
    """Poll `predicate` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.02)


@dataclass
class ExportedSpan:
    service: str
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    resource: dict[str, Any]


@dataclass
class Recorder:
    """What an HTTP peer received: request headers per path, and decoded OTLP spans."""

    requests: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    spans: list[ExportedSpan] = field(default_factory=list)
    logs: list[dict[str, Any]] = field(default_factory=list)
    events: list[dict[str, Any]] = field(default_factory=list)
    envelope_items: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _value(any_value: Any) -> Any:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [_value(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


def _decode(body: bytes) -> list[ExportedSpan]:
    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    out = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                out.append(
                    ExportedSpan(
                        service=str(resource.get("service.name")),
                        name=span.name,
                        kind=span.kind,
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        attributes={a.key: _value(a.value) for a in span.attributes},
                        links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
                        resource=resource,
                    )
                )
    return out


def _decode_envelope(body: bytes, headers: dict[str, str]) -> list[tuple[str, Any]]:
    """(item type, JSON payload) of every item of a Sentry envelope."""
    from sentry_sdk.envelope import Envelope

    from lookout.ingest.bodies import decompress

    body = decompress(body, headers.get("content-encoding", ""))  # br once brotli is installed
    envelope = Envelope.deserialize(body)
    return [(item.type or "", item.payload.json) for item in envelope.items]


def _decode_logs(body: bytes) -> list[dict[str, Any]]:
    request = ExportLogsServiceRequest()
    request.ParseFromString(body)
    out = []
    for resource_logs in request.resource_logs:
        resource = {a.key: _value(a.value) for a in resource_logs.resource.attributes}
        for scope_logs in resource_logs.scope_logs:
            for record in scope_logs.log_records:
                out.append(
                    {
                        "service": resource.get("service.name"),
                        "body": _value(record.body),
                        "severity_text": record.severity_text,
                        "severity_number": record.severity_number,
                        "trace_id": record.trace_id.hex(),
                        "span_id": record.span_id.hex(),
                        "time_unix_nano": record.time_unix_nano,
                        "attributes": {a.key: _value(a.value) for a in record.attributes},
                    }
                )
    return out


@contextmanager
def http_peer(status: int = 200) -> Iterator[tuple[str, Recorder]]:
    """A loopback HTTP server that records every request; POST /v1/traces is decoded."""
    recorder = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {k.lower(): v for k, v in self.headers.items()}
            with recorder.lock:
                recorder.requests.append((self.command, self.path, headers))
                if self.path == "/v1/traces":
                    recorder.spans.extend(_decode(body))
                elif self.path == "/v1/logs":
                    recorder.logs.extend(_decode_logs(body))
                elif re.fullmatch(r"/api/\d+/envelope/", self.path):
                    for kind, payload in _decode_envelope(body, headers):
                        recorder.envelope_items.append(kind)
                        if kind == "event":
                            recorder.events.append(payload)
            payload = b'{"ok":true}'
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = _handle

        def log_message(self, *_: Any) -> None:
            return

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", recorder
    finally:
        server.shutdown()
        server.server_close()


@dataclass
class Service:
    """A uvicorn process on loopback, with every line it printed collected."""

    url: str
    process: subprocess.Popen[bytes]
    lines: list[str] = field(default_factory=list)

    def json_lines(self) -> list[dict[str, Any]]:
        out = []
        for line in list(self.lines):
            try:
                parsed = json.loads(line)
            except ValueError:
                continue
            if isinstance(parsed, dict):
                out.append(parsed)
        return out


@contextmanager
def uvicorn_app(
    module: str, env: Mapping[str, str], *extra_args: str, port: int | None = None
) -> Iterator[Service]:
    """Run `uvicorn module:app` on loopback (a free port unless given) until the block ends."""
    port = port or free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", f"{module}:app", "--port", str(port), *extra_args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    service = Service(f"http://127.0.0.1:{port}", process)

    def drain() -> None:  # a full pipe would block the service: read it continuously
        assert process.stdout is not None
        for raw in process.stdout:
            service.lines.append(raw.decode("utf-8", "replace").rstrip("\n"))

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()

    def ready() -> bool:
        if process.poll() is not None:
            time.sleep(0.2)
            output = "\n".join(service.lines)
            raise AssertionError(f"{module} exited early:\n{output}")
        try:
            httpx.get(f"{service.url}/healthz", timeout=0.5)
        except httpx.TransportError:
            return False
        return True

    try:
        wait_until(ready, 30.0, f"{module} to listen")
        yield service
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        drainer.join(5)
        if process.stdout is not None:
            process.stdout.close()
