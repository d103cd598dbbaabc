"""A separate process using the real OpenTelemetry Python exporters (OTLP/HTTP protobuf).

    python -m tests.server.clients.otel_client BASE_URL

Prints one JSON line: the trace id it made. Sends traces, logs and metrics, then flushes.
"""

from __future__ import annotations

import json
import logging
import sys

from opentelemetry import metrics, trace
from opentelemetry._logs import set_logger_provider
from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk._logs import LoggerProvider, LoggingHandler
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Status, StatusCode


def main() -> int:
    base = sys.argv[1]
    resource = Resource.create(
        {"service.name": "payments", "service.instance.id": "pay-1", "team": "core"}
    )
    tracer_provider = TracerProvider(resource=resource)
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{base}/v1/traces"))
    )
    trace.set_tracer_provider(tracer_provider)
    logger_provider = LoggerProvider(resource=resource)
    logger_provider.add_log_record_processor(
        BatchLogRecordProcessor(OTLPLogExporter(endpoint=f"{base}/v1/logs"))
    )
    set_logger_provider(logger_provider)
    logging.getLogger().addHandler(LoggingHandler(logger_provider=logger_provider))
    logging.getLogger().setLevel(logging.INFO)
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=f"{base}/v1/metrics"), export_interval_millis=60_000
    )
    meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
    metrics.set_meter_provider(meter_provider)
    meter = metrics.get_meter("payments")
    sold = meter.create_counter("tickets.sold", unit="{ticket}")
    duration = meter.create_histogram("http.server.request.duration", unit="s")

    tracer = trace.get_tracer("payments")
    with tracer.start_as_current_span("POST /pay", kind=trace.SpanKind.SERVER) as root:
        root.set_attribute("http.route", "/pay")
        with tracer.start_as_current_span("mpesa stk push", kind=trace.SpanKind.CLIENT) as child:
            child.add_event("retry", {"attempt": 1})
            child.set_status(Status(StatusCode.ERROR, "connection refused"))
            logging.getLogger("payments").error("Connection refused from M-Pesa API")
        sold.add(2, {"route": "nbo-mba"})
        duration.record(0.25, {"http.route": "/pay"})
        trace_id = format(root.get_span_context().trace_id, "032x")
    tracer_provider.shutdown()
    logger_provider.shutdown()
    meter_provider.shutdown()
    print(json.dumps({"trace_id": trace_id}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
