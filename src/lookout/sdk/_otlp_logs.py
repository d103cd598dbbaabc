"""OTLP log export, the alternative to JSON lines on stdout (OTEL_LOGS_EXPORTER=otlp).

Only one path is on at a time, so a record is never delivered twice: with OTLP on, the
structlog chain ends here instead of in the JSON renderer.
"""

from __future__ import annotations

import time
from collections.abc import MutableMapping
from datetime import datetime
from typing import Any

import orjson
import structlog
from opentelemetry import context
from opentelemetry._logs import SeverityNumber
from opentelemetry.sdk._logs import LoggerProvider
from opentelemetry.sdk._logs.export import BatchLogRecordProcessor
from opentelemetry.sdk.resources import Resource

from lookout import __version__
from lookout.sdk._guard import guard
from lookout.sdk._settings import Settings

_SEVERITY = {
    "debug": SeverityNumber.DEBUG,
    "info": SeverityNumber.INFO,
    "warning": SeverityNumber.WARN,
    "error": SeverityNumber.ERROR,
    "critical": SeverityNumber.FATAL,
}
# Fields that become parts of the OTLP record rather than attributes.
_RECORD_FIELDS = ("timestamp", "level", "event", "trace_id", "span_id")


def build_log_provider(settings: Settings, resource: Resource) -> LoggerProvider | None:
    from opentelemetry.exporter.otlp.proto.http import Compression
    from opentelemetry.exporter.otlp.proto.http._log_exporter import OTLPLogExporter

    target = settings.logs
    provider: LoggerProvider | None = None
    with guard("log exporter setup"):
        exporter = OTLPLogExporter(
            endpoint=target.endpoint,
            certificate_file=target.certificate,
            client_key_file=target.client_key,
            client_certificate_file=target.client_certificate,
            headers=target.headers,
            timeout=target.timeout_s,
            compression={
                "gzip": Compression.Gzip,
                "deflate": Compression.Deflate,
                "none": Compression.NoCompression,
            }[target.compression],
        )
        provider = LoggerProvider(resource=resource, shutdown_on_exit=False)
        provider.add_log_record_processor(BatchLogRecordProcessor(exporter))
    return provider


def _attribute(value: Any) -> Any:
    if isinstance(value, str | bool | int | float):
        return value
    return orjson.dumps(value, default=repr).decode()


class OtlpLogEmitter:
    """The last structlog processor when logs go over OTLP: emit, then drop the event."""

    def __init__(self, provider: LoggerProvider) -> None:
        self._logger = provider.get_logger("lookout.sdk", __version__)

    def __call__(self, _: Any, __: str, event: MutableMapping[str, Any]) -> Any:
        level = str(event.get("level", "info"))
        stamp = event.get("timestamp")
        try:
            nanos = int(datetime.fromisoformat(str(stamp)).timestamp() * 1e9)
        except ValueError:
            nanos = time.time_ns()
        attributes = {
            str(key): _attribute(value) for key, value in event.items() if key not in _RECORD_FIELDS
        }
        self._logger.emit(
            timestamp=nanos,
            context=context.get_current(),
            severity_text=level.upper(),
            severity_number=_SEVERITY.get(level, SeverityNumber.INFO),
            body=str(event.get("event", "")),
            attributes=attributes,
        )
        raise structlog.DropEvent
