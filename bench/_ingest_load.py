"""Load for bench/ingest.py: OTLP requests pre-encoded as the real exporter encodes them,
a sender process on keep-alive connections, and the no-HTTP ceiling of the same work.

A request body is built once with the OpenTelemetry SDK (512 spans or log records, 10
attributes each) and encoded by the OTLP exporter's own encoder. Each request sent is that
body with fresh random trace and span ids, fresh 16-hex-digit values where ids appear in
attributes and log bodies (so neither dedup nor the scrubber's cache sees a repeat), and
timestamps moved to now: patched in place, so the sender spends well under a millisecond
per request.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import itertools
import os
import random
import re
import statistics
import struct
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

PER_REQUEST = 512
ATTRIBUTES = 10
SPANS_PER_TRACE = 8
SLOT = re.compile(rb"QZ\d{14}")  # a slot for a fresh 16-hex-digit value; no real value has one
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")
CONTENT_TYPE = "application/x-protobuf"


# -- pre-encoded bodies ----------------------------------------------------------------
@dataclass
class Template:
    """One encoded request and where to patch it: id groups (every offset of one id, which
    gets one fresh random value), hex slots and fixed64 timestamps."""

    body: bytes
    records: int
    base_ns: int
    trace_groups: list[list[int]]
    span_groups: list[list[int]]
    hex_slots: list[int]
    timestamps: list[tuple[int, int]]  # (offset, value as built)

    def render(self, now_ns: int) -> tuple[bytes, list[str]]:
        """A body with fresh ids and values and timestamps moved to `now_ns`; and the
        trace ids in it, as hex."""
        buffer = bytearray(self.body)
        fresh = os.urandom(16 * len(self.trace_groups) + 8 * len(self.span_groups))
        traces = []
        at = 0
        for offsets in self.trace_groups:
            value = fresh[at : at + 16]
            at += 16
            traces.append(value.hex())
            for offset in offsets:
                buffer[offset : offset + 16] = value
        for offsets in self.span_groups:
            value = fresh[at : at + 8]
            at += 8
            for offset in offsets:
                buffer[offset : offset + 8] = value
        text = os.urandom(8 * len(self.hex_slots)).hex().encode()
        for index, offset in enumerate(self.hex_slots):
            buffer[offset : offset + 16] = text[16 * index : 16 * index + 16]
        shift = now_ns - self.base_ns
        pack = struct.pack_into
        for offset, stamp in self.timestamps:
            pack("<Q", buffer, offset, stamp + shift)
        return bytes(buffer), traces


def _slot(index: int) -> str:
    return f"QZ{index:014d}"


def _find_all(body: bytes, needle: bytes) -> list[int]:
    found, at = [], body.find(needle)
    while at >= 0:
        found.append(at)
        at = body.find(needle, at + 1)
    return found


def _locate(
    body: bytes,
    trace_ids: list[bytes],
    span_ids: list[bytes],
    stamps: list[bytes],
) -> tuple[list[list[int]], list[list[int]], list[int], list[tuple[int, int]]]:
    trace_groups = [_find_all(body, value) for value in dict.fromkeys(trace_ids)]
    span_groups = [_find_all(body, value) for value in dict.fromkeys(span_ids)]
    hex_slots = [found.start() for found in SLOT.finditer(body)]
    timestamps = [  # each stamp is a tag byte and 8 bytes little-endian
        (offset + 1, struct.unpack_from("<Q", tagged, 1)[0])
        for tagged in dict.fromkeys(stamps)
        for offset in _find_all(body, tagged)
    ]
    return trace_groups, span_groups, hex_slots, sorted(set(timestamps))


RESOURCE = {
    "service.name": "checkout",
    "service.version": "2.14.1",
    "service.instance.id": "checkout-7f9c6d5b8-x2kq4",
    "deployment.environment.name": "production",
    "host.name": "ip-10-0-3-17",
    "k8s.namespace.name": "shop",
    "k8s.pod.name": "checkout-7f9c6d5b8-x2kq4",
}
AGENT = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0"


def _span_attributes(kind: str, n: int) -> dict[str, Any]:
    """Ten attributes of a span of `kind`, as instrumentations set them; the slot values
    (ids, paths) are fresh on every request."""
    if kind == "server":
        return {
            "http.request.method": "POST", "http.route": "/api/orders/{id}",
            "url.path": f"/api/orders/{_slot(n)}", "url.scheme": "https",
            "http.response.status_code": 500 if n % 97 == 0 else 201,
            "server.address": "checkout.internal", "server.port": 8443,
            "client.address": f"10.0.{n % 8}.{n % 200}", "user_agent.original": AGENT,
            "order.id": _slot(n + 1),
        }  # fmt: skip
    if kind == "db":
        return {
            "db.system.name": "postgresql", "db.namespace": "orders",
            "db.operation.name": "SELECT", "db.collection.name": "orders",
            "db.query.text": "SELECT id, status, total FROM orders WHERE id = $1",
            "server.address": "pg.internal", "server.port": 5432,
            "db.response.returned_rows": n % 5, "network.peer.address": "10.0.9.4",
            "order.id": _slot(n),
        }  # fmt: skip
    if kind == "client":
        return {
            "http.request.method": "POST", "url.full": f"https://payments.internal/v1/charges/{_slot(n)}",
            "server.address": "payments.internal", "server.port": 443,
            "http.response.status_code": 200, "http.request.resend_count": 0,
            "network.protocol.version": "1.1", "payment.provider": "mpesa",
            "payment.amount": 1250 + n % 900, "customer.phone": f"+2547{n % 100:02d}123456",
        }  # fmt: skip
    return {
        "code.function.name": "reserve_stock", "code.file.path": "/app/checkout/stock.py",
        "code.line.number": 42 + n % 7, "thread.name": f"worker-{n % 4}",
        "app.items": n % 6 + 1, "app.warehouse": "nbo-1", "app.cache.hit": n % 3 == 0,
        "app.retry": 0, "app.tenant": "acme", "app.request_id": _slot(n),
    }  # fmt: skip


_CHILDREN = ("db", "internal", "db", "client", "internal", "db", "db")
_CHILD_NAMES = {"db": "SELECT orders", "internal": "reserve_stock", "client": "POST"}


def span_template(count: int = PER_REQUEST) -> Template:
    """`count` spans in traces of 8 (a server span and its children), encoded as
    opentelemetry-exporter-otlp-proto-http encodes a batch."""
    from opentelemetry import trace
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
    from opentelemetry.trace import SpanKind, Status, StatusCode

    exporter = InMemorySpanExporter()
    provider = TracerProvider(resource=Resource.create(RESOURCE))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("opentelemetry.instrumentation.asgi", "0.66b2")
    kinds = {"db": SpanKind.CLIENT, "client": SpanKind.CLIENT, "internal": SpanKind.INTERNAL}
    base = time.time_ns() - 3 * 10**9
    slot = 0
    for t in range(count // SPANS_PER_TRACE):
        start = base + t * 3_000_000 + 17 * t
        root = tracer.start_span(
            "POST /api/orders/{id}", kind=SpanKind.SERVER, start_time=start,
            attributes=_span_attributes("server", slot),
        )  # fmt: skip
        slot += 2
        context = trace.set_span_in_context(root)
        at = start + 50_000
        for c, kind in enumerate(_CHILDREN):
            child = tracer.start_span(
                _CHILD_NAMES[kind], context=context, kind=kinds[kind], start_time=at,
                attributes=_span_attributes(kind, slot),
            )  # fmt: skip
            slot += 1
            if kind == "client" and t % 50 == 0:
                child.set_status(Status(StatusCode.ERROR, "payment provider timed out"))
            at += 200_000 + 1_000 * c + t
            child.end(end_time=at)
            at += 10_000
        root.end(end_time=at + 100_000)
    finished = exporter.get_finished_spans()
    body = encode_spans(finished).SerializeToString()
    traces, spans, stamps = [], [], []
    for span in finished:
        assert span.context is not None
        assert span.start_time
        assert span.end_time
        traces.append(span.context.trace_id.to_bytes(16, "big"))
        spans.append(span.context.span_id.to_bytes(8, "big"))
        stamps += [b"\x39" + struct.pack("<Q", span.start_time)]
        stamps += [b"\x41" + struct.pack("<Q", span.end_time)]
    groups = _locate(body, traces, spans, stamps)
    template = Template(body, len(finished), base, *groups)
    _check(template, len(finished), len(finished) // SPANS_PER_TRACE, "traces")
    return template


_LOG_BODIES = (
    "order {0} paid: 3 items, total 1250 KES",
    "reserved stock for order {0} in warehouse nbo-1",
    "payment callback for order {0} from mpesa accepted",
    "cache miss for customer {0}; loaded profile in 12 ms",
    "order {0} receipt sent to {1}@example.com",
    "retrying payment for order {0} (attempt 2 of 3)",
    "order {0} shipped with courier sendy, tracking {1}",
    "slow query on orders for order {0}: 812 ms",
)


def log_template(count: int = PER_REQUEST) -> Template:
    """`count` log records of 10 attributes each, linked to spans, as the OTLP exporter
    encodes a batch from the logging handler."""
    import warnings

    from opentelemetry import trace
    from opentelemetry._logs import SeverityNumber
    from opentelemetry.exporter.otlp.proto.common._log_encoder import encode_logs
    from opentelemetry.sdk._logs import LoggerProvider
    from opentelemetry.sdk._logs.export import InMemoryLogRecordExporter, SimpleLogRecordProcessor
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    exporter = InMemoryLogRecordExporter()  # type: ignore[no-untyped-call]
    provider = LoggerProvider(resource=Resource.create(RESOURCE))
    provider.add_log_record_processor(SimpleLogRecordProcessor(exporter))
    logger = provider.get_logger("checkout.orders", "2.14.1")
    base = time.time_ns() - 3 * 10**9
    levels = [(SeverityNumber.INFO, "INFO")] * 13 + [
        (SeverityNumber.WARN, "WARNING"), (SeverityNumber.ERROR, "ERROR"),
        (SeverityNumber.DEBUG, "DEBUG"),
    ]  # fmt: skip
    trace_ids, span_ids, stamps = [], [], []
    slot = 0
    for n in range(count):
        trace_id = random.getrandbits(128) | 1
        span_id = random.getrandbits(64) | 1
        trace_ids.append(trace_id.to_bytes(16, "big"))
        span_ids.append(span_id.to_bytes(8, "big"))
        context = trace.set_span_in_context(
            NonRecordingSpan(
                SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(1))
            )
        )
        number, text = levels[n % len(levels)]
        body = _LOG_BODIES[n % len(_LOG_BODIES)].format(_slot(slot), _slot(slot + 1))
        slot += 2
        stamp = base + n * 1_000_003
        observed = stamp + 150_000 + n
        stamps += [b"\x09" + struct.pack("<Q", stamp), b"\x59" + struct.pack("<Q", observed)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            logger.emit(
                timestamp=stamp, observed_timestamp=observed, context=context,
                severity_number=number, severity_text=text, body=body,
                attributes={
                    "code.function.name": "pay_order", "code.file.path": "/app/checkout/pay.py",
                    "code.line.number": 88 + n % 11, "thread.name": f"worker-{n % 4}",
                    "logger.name": "checkout.orders", "order.id": _slot(slot),
                    "http.route": "/api/orders/{id}", "customer.tier": ("gold", "free")[n % 2],
                    "app.items": n % 6 + 1, "app.duration_ms": 12.5 + n % 40,
                },
            )  # fmt: skip
        slot += 1
    finished = exporter.get_finished_logs()
    body = encode_logs(finished).SerializeToString()
    template = Template(body, len(finished), base, *_locate(body, trace_ids, span_ids, stamps))
    _check(template, len(finished), len(finished), "logs")
    return template


def _check(template: Template, records: int, expected_traces: int, signal: str) -> None:
    """Every id found where the encoder put it, every timestamp found once per record, and
    a rendered body parses back into as many records."""
    from lookout.ingest import otlp

    if len(template.trace_groups) != expected_traces or any(
        not offsets for offsets in template.trace_groups + template.span_groups
    ):
        raise SystemExit("bench: an id of the template body was not found")
    if len(template.timestamps) != 2 * records:
        raise SystemExit("bench: a timestamp of the template body was not found")
    message: Any = otlp.decode(signal, template.render(time.time_ns())[0], CONTENT_TYPE)
    found = sum(
        len(scoped.spans) if signal == "traces" else len(scoped.log_records)
        for resource in getattr(message, f"resource_{'spans' if signal == 'traces' else 'logs'}")
        for scoped in getattr(resource, "scope_spans" if signal == "traces" else "scope_logs")
    )
    if found != records:
        raise SystemExit(f"bench: a rendered body holds {found} records, not {records}")


TEMPLATES: dict[str, Callable[[], Template]] = {"traces": span_template, "logs": log_template}


# -- a process's CPU and memory, from /proc ---------------------------------------------
def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def memory_mb(pid: int) -> tuple[float, float]:
    """(VmRSS, VmHWM) in MB: resident now, and the peak since the process started."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0]) / 1024
    return found["VmRSS"], found["VmHWM"]


def pss_mb(pid: int) -> float:
    """Proportional set size in MB: shared pages (a forked worker's) counted once in all."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def descendants(pid: int) -> list[int]:
    """Every process under `pid` (the decoding forkserver and its workers)."""
    children: dict[int, list[int]] = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class ProcessWatch:
    """A server's CPU over a window, and its memory: the server process alone (RSS, every
    0.5 s), and with its decoding workers (their CPU, and PSS in all, every 2 s)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.rss: list[float] = []
        self.tree_pss: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _tree_cpu(self) -> dict[int, float]:
        found = {}
        for pid in [self.pid, *descendants(self.pid)]:
            with contextlib.suppress(OSError):
                found[pid] = cpu_seconds(pid)
        return found

    def __enter__(self) -> ProcessWatch:
        self.began, self.began_cpu = time.monotonic(), self._tree_cpu()
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.wall = time.monotonic() - self.began
        ended = self._tree_cpu()
        self.cpu = ended[self.pid] - self.began_cpu[self.pid]
        self.tree_cpu = sum(cpu - self.began_cpu.get(pid, 0.0) for pid, cpu in ended.items())
        self.peak_mb = memory_mb(self.pid)[1]
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        """RSS every 0.5 s; the tree's PSS every 2 s, its processes found again every 5 s.
        Both walk more of /proc (and PSS the processes' page tables) than RSS does, in the
        load process, whose sender threads they would otherwise slow."""
        tree: list[int] = []
        for tick in itertools.count():
            if self._stop.wait(0.5):
                return
            try:
                self.rss.append(memory_mb(self.pid)[0])
                if tick % 10 == 0:
                    tree = [self.pid, *descendants(self.pid)]
                if tick % 4 == 0:
                    total = 0.0
                    for pid in tree:
                        with contextlib.suppress(OSError):
                            total += pss_mb(pid)
                    self.tree_pss.append(total)
            except (OSError, KeyError):
                return

    def figures(self) -> dict[str, Any]:
        def most(values: list[float]) -> float | None:
            return round(max(values), 1) if values else None

        return {
            "server_cpu_s": round(self.cpu, 2),
            "server_cores": round(self.cpu / self.wall, 3),
            "server_and_decoders_cpu_s": round(self.tree_cpu, 2),
            "server_and_decoders_cores": round(self.tree_cpu / self.wall, 3),
            "server_rss_mb_max": most(self.rss),
            "server_rss_mb_median": round(statistics.median(self.rss), 1) if self.rss else None,
            "server_rss_mb_peak_since_start": round(self.peak_mb, 1),
            "server_and_decoders_pss_mb_max": most(self.tree_pss),
        }


# -- the sender process ------------------------------------------------------------------
@dataclass
class LoadSpec:
    url: str
    signal: str  # traces or logs
    seconds: float  # measured, after warmup_s
    in_flight: int
    rate: float | None = None  # records per second; None: as fast as the server answers
    warmup_s: float = 2.0
    server_pid: int = 0


@dataclass
class _Tally:
    latencies: list[float] = field(default_factory=list)
    accepted: int = 0
    acked_total: int = 0
    statuses: collections.Counter[str] = field(default_factory=collections.Counter)
    rejected: int = 0
    first_error: str | None = None


def _percentile(values: list[float], share: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, int(len(ordered) * share + 0.5) - 1))]


def send_load(spec: LoadSpec) -> dict[str, Any]:
    """Send `spec.signal` requests for warmup_s + seconds from `in_flight` threads, one
    keep-alive connection each; count what was acknowledged in the measured window."""
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    answer_type: Any = {
        "traces": trace_service_pb2.ExportTraceServiceResponse,
        "logs": logs_service_pb2.ExportLogsServiceResponse,
    }[spec.signal]
    template = TEMPLATES[spec.signal]()
    url = urlsplit(spec.url)
    host, port = url.hostname or "127.0.0.1", url.port
    path = f"/v1/{spec.signal}"
    begin = time.monotonic() + 0.2
    window = (begin + spec.warmup_s, begin + spec.warmup_s + spec.seconds)
    tally = _Tally()
    lock = threading.Lock()
    interval = template.records * spec.in_flight / spec.rate if spec.rate else 0.0

    def sender(index: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=120)
        due = begin + index * interval / spec.in_flight
        while True:
            if interval:
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                due += interval
            if time.monotonic() >= window[1]:
                break
            body, _ = template.render(time.time_ns())
            sent = time.monotonic()
            try:
                connection.request("POST", path, body, {"content-type": CONTENT_TYPE})
                response = connection.getresponse()
                content = response.read()
                status = str(response.status)
            except (OSError, http.client.HTTPException) as exc:
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=120)
                content, status = b"", type(exc).__name__
            done = time.monotonic()
            rejected = 0
            if status == "200" and content:
                partial = answer_type.FromString(content).partial_success
                rejected = partial.rejected_spans if spec.signal == "traces" else 0
                rejected = rejected or getattr(partial, "rejected_log_records", 0)
            with lock:
                if status == "200":
                    tally.acked_total += template.records - rejected
                elif tally.first_error is None:
                    tally.first_error = f"{status}: {content[:300]!r}"
            if not window[0] <= done <= window[1]:
                continue
            with lock:
                tally.statuses[status] += 1
                if status == "200":
                    tally.latencies.append(done - sent)
                    tally.accepted += template.records - rejected
                    tally.rejected += rejected
        connection.close()

    threads = [threading.Thread(target=sender, args=(i,)) for i in range(spec.in_flight)]
    watch = None
    own_cpu = time.process_time()
    for thread in threads:
        thread.start()
    if spec.server_pid:
        time.sleep(max(0.0, window[0] - time.monotonic()))
        watch = ProcessWatch(spec.server_pid).__enter__()
    for thread in threads:
        thread.join()
    if watch is not None:
        watch.__exit__()
    seconds = window[1] - window[0]
    result: dict[str, Any] = {
        "records_per_s": round(tally.accepted / seconds, 1),
        "requests": sum(tally.statuses.values()),
        "acked_records_total": tally.acked_total,
        "statuses": dict(tally.statuses),
        "rejected_records": tally.rejected,
        "first_error": tally.first_error,
        "ack_p50_ms": _ms(_percentile(tally.latencies, 0.50)),
        "ack_p99_ms": _ms(_percentile(tally.latencies, 0.99)),
        "sender_cores": round((time.process_time() - own_cpu) / (time.monotonic() - begin), 3),
    }
    if spec.rate:
        result["paced_records_per_s"] = spec.rate
    if watch is not None:
        result.update(watch.figures())
    return result


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


# -- the ceiling: the server's own work without HTTP ---------------------------------------
@dataclass
class CeilingSpec:
    signal: str
    memory_limit: str
    scrub: bool = True
    seconds: float | None = 15.0  # measured time, or
    records: int | None = None  # a record count (the scale load)
    data_dir: str | None = None  # a fresh temporary directory when None
    batch_rows: int = 10_000
    sample_traces: int = 0  # trace ids to keep, chosen at random
    compact: bool = False  # end with the server's hourly compaction, timed
    label: str = "ceiling"


def ceiling(spec: CeilingSpec) -> dict[str, Any]:
    """Decode, convert, scrub and commit 10,000-row batches with the server's own objects
    (ServerRuntime: its scrubber, writer and derived metrics), timed stage by stage;
    the bodies are rendered outside the clock."""
    from lookout.config import ServerConfig
    from lookout.ingest import otlp
    from lookout.ingest.limits import parse_size
    from lookout.model import Batch
    from lookout.server.runtime import ServerRuntime

    template = TEMPLATES[spec.signal]()
    with tempfile.TemporaryDirectory(prefix="lookout-ceiling-") as scratch:
        data_dir = Path(spec.data_dir or scratch)
        config = ServerConfig(
            data_dir=data_dir,
            scrub=spec.scrub,
            store_memory_limit=parse_size("store_memory_limit", spec.memory_limit),
        )
        runtime = ServerRuntime.open(config)
        try:
            return _ceiling_run(spec, template, runtime, otlp, Batch)
        finally:
            runtime.close()


def _ceiling_run(
    spec: CeilingSpec, template: Template, runtime: Any, otlp: Any, batch_type: Any
) -> dict[str, Any]:
    from lookout.model import LogColumns, SpanColumns

    writer = runtime.writer
    stages = dict.fromkeys(("decode", "convert", "scrub", "commit", "derived"), 0.0)
    observe = writer.on_commit

    def timed_observe(*args: Any) -> None:
        began = time.perf_counter()
        observe(*args)
        stages["derived"] += time.perf_counter() - began

    writer.on_commit = timed_observe
    convert = otlp.spans if spec.signal == "traces" else otlp.logs
    limits = runtime.limits
    pending: Any = SpanColumns() if spec.signal == "traces" else LogColumns()
    stored = 0
    requests = 0
    samples: list[str] = []
    expected_requests = (spec.records or 1) / template.records
    clock, cpu, cpu_s = time.perf_counter, time.process_time, 0.0
    last_report = time.monotonic()
    while True:
        busy = sum(stages.values()) - stages["derived"]
        if spec.seconds is not None and busy >= spec.seconds:
            break
        if spec.records is not None and stored + len(pending) >= spec.records:
            break
        body, traces = template.render(time.time_ns())
        requests += 1
        if spec.sample_traces and random.random() < spec.sample_traces / expected_requests:
            samples.append(random.choice(traces))
        c0, t0 = cpu(), clock()
        message = otlp.decode(spec.signal, body, CONTENT_TYPE)
        t1 = clock()
        outcome = convert(message, limits, time.time_ns())
        pending.extend(outcome.spans if spec.signal == "traces" else outcome.logs)
        t2 = clock()
        stages["decode"] += t1 - t0
        stages["convert"] += t2 - t1
        while len(pending) >= spec.batch_rows:
            batch, pending = _cut(pending, spec.batch_rows)
            stored += _commit(runtime, batch_type, spec.signal, batch, stages)
        cpu_s += cpu() - c0
        if spec.records and time.monotonic() - last_report > 15:
            last_report = time.monotonic()
            print(f"  {spec.label}: {stored:,} of {spec.records:,} {spec.signal} records stored",
                  file=sys.stderr, flush=True)  # fmt: skip
    if pending:
        c0 = cpu()
        stored += _commit(runtime, batch_type, spec.signal, pending, stages)
        cpu_s += cpu() - c0
    stages["commit"] -= stages["derived"]  # derived runs inside the commit: apart
    busy = sum(stages.values())
    result: dict[str, Any] = {
        "records_per_s": round(stored / busy, 1),
        "records_per_cpu_s": round(stored / cpu_s, 1),
        "records": stored,
        "seconds": round(busy, 2),
        "cpu_s": round(cpu_s, 2),
        "stage_share": {k: round(v / busy, 3) for k, v in stages.items()},
        "stage_us_per_record": {k: round(v / stored * 1e6, 2) for k, v in stages.items()},
    }
    if spec.compact:  # the hourly compaction; a failure is a finding, reported
        began = time.monotonic()
        try:
            writer.flush(time.time_ns()).result()
        except Exception as exc:
            result["compaction_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        result["compaction_s"] = round(time.monotonic() - began, 1)
    if spec.sample_traces:
        result["trace_ids"] = samples
    return result


def _cut(records: Any, rows: int) -> tuple[Any, Any]:
    """The first `rows` records (SpanColumns or LogColumns) and the rest."""
    return records.take(range(rows)), records.take(range(rows, len(records)))


def _commit(
    runtime: Any, batch_type: Any, signal: str, records: Any, stages: dict[str, float]
) -> int:
    batch = batch_type(spans=records) if signal == "traces" else batch_type(logs=records)
    began = time.perf_counter()
    if runtime._scrub_batch is not None:  # the server's own scrubber
        runtime._scrub_batch(batch)
    scrubbed = time.perf_counter()
    written = runtime.writer._transaction([batch])  # no queue, no thread
    stages["scrub"] += scrubbed - began
    stages["commit"] += time.perf_counter() - scrubbed
    return int(sum(written))
