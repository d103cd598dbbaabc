"""JSON logs on stdout through structlog, with the standard library routed into them.

One line per event: `timestamp` (RFC 3339, UTC), `level`, `event`, `logger`, `service`,
and `trace_id` / `span_id` whenever a span is current (sampled or not), then whatever
the caller bound or passed.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable, MutableMapping
from typing import Any

import orjson
import structlog
from opentelemetry import trace

from lookout.sdk._guard import INTERNAL_LOGGER

EventDict = MutableMapping[str, Any]
Processor = Callable[[Any, str, EventDict], Any]

# Keys a LogRecord always has; anything else on a record came from `extra=`.
_RECORD_KEYS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",  # uvicorn's ANSI-coloured copy of the message
}
_UVICORN_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.asgi")


def add_trace_ids(_: Any, __: str, event: EventDict) -> EventDict:
    """Stamp the current span's ids (lowercase hex), even for an unsampled span."""
    span_context = trace.get_current_span().get_span_context()
    if span_context.is_valid:
        event.setdefault("trace_id", format(span_context.trace_id, "032x"))
        event.setdefault("span_id", format(span_context.span_id, "016x"))
    return event


_LEADING_KEYS = ("timestamp", "level", "event", "logger", "service", "trace_id", "span_id")


def _orjson_dumps(event: EventDict, **_: Any) -> bytes:
    """One JSON object, the fixed fields first so lines read well in a terminal."""
    ordered = {key: event[key] for key in _LEADING_KEYS if key in event}
    ordered.update(event)
    return orjson.dumps(ordered, default=repr, option=orjson.OPT_NON_STR_KEYS)


class StdoutSink:
    """Writes rendered lines to the current sys.stdout; never raises into the caller."""

    def __init__(self, on_drop: Callable[[str], None]) -> None:
        self._lock = threading.Lock()
        self._on_drop = on_drop

    def msg(self, line: bytes) -> None:
        try:
            with self._lock:
                stream = sys.stdout
                buffer = getattr(stream, "buffer", None)
                if buffer is not None:
                    buffer.write(line + b"\n")
                else:
                    stream.write(line.decode("utf-8", "replace") + "\n")
                stream.flush()
        except (OSError, ValueError):
            # EPIPE, a closed stdout or a full non-blocking pipe: the line is lost, counted.
            self._on_drop("stdout_unavailable")

    log = debug = info = warning = warn = error = critical = exception = fatal = msg


class _SinkFactory:
    def __init__(self, sink: StdoutSink) -> None:
        self.sink = sink

    def __call__(self, *_: Any) -> StdoutSink:
        return self.sink


class LogPipeline:
    """The processor chain shared by structlog calls and standard-library records."""

    def __init__(self, service: str, level: str, on_drop: Callable[[str], None]) -> None:
        self.service = service
        self.level = getattr(logging, level)
        self.sink = StdoutSink(on_drop)
        # One list, configured once and changed only in place: loggers bound earlier
        # (module-level ones, the access log) hold a reference to it, not a copy.
        self.chain: list[Processor] = [
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            add_trace_ids,
            structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
            self._add_service,
            structlog.processors.dict_tracebacks,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
        self._handler: StructlogHandler | None = None

    @property
    def renderer(self) -> Processor:
        """The last processor: it turns the event into the line (or ships it elsewhere)."""
        return self.chain[-1]

    @renderer.setter
    def renderer(self, processor: Processor) -> None:
        self.chain[-1] = processor

    def _add_service(self, _: Any, __: str, event: EventDict) -> EventDict:
        event.setdefault("service", self.service)
        event.setdefault("logger", self.service)
        return event

    def install(self) -> None:
        """Configure structlog and route the root logger through the same chain."""
        structlog.configure(
            processors=self.chain,
            wrapper_class=structlog.make_filtering_bound_logger(self.level),
            logger_factory=_SinkFactory(self.sink),
            cache_logger_on_first_use=False,
        )
        root = logging.getLogger()
        for handler in list(root.handlers):
            root.removeHandler(handler)
        self._handler = StructlogHandler(self)
        root.addHandler(self._handler)
        root.setLevel(self.level)
        logging.getLogger(INTERNAL_LOGGER).setLevel(logging.WARNING)
        # httpx logs every request at INFO; the client span and metric already say it.
        for chatty in ("httpx", "httpcore"):
            logging.getLogger(chatty).setLevel(max(self.level, logging.WARNING))
        tame_uvicorn()

    def uninstall(self) -> None:
        if self._handler is not None:
            logging.getLogger().removeHandler(self._handler)
            self._handler = None
        structlog.reset_defaults()

    def emit_record(self, record: logging.LogRecord) -> None:
        """Send a standard-library record down the chain (called by StructlogHandler)."""
        event: dict[str, Any] = {
            "event": record.getMessage(),
            "logger": record.name,
        }
        event.update(
            (key, value)
            for key, value in vars(record).items()
            if key not in _RECORD_KEYS and not key.startswith("_")
        )
        if record.exc_info and record.exc_info[0] is not None:
            event["exc_info"] = record.exc_info
        method = record.levelname.lower()
        if method == "critical":
            method = "error"
        result: Any = event
        try:
            for processor in self.chain:
                result = processor(None, method, result)
        except structlog.DropEvent:
            return
        self.sink.msg(result)


class StructlogHandler(logging.Handler):
    """A logging.Handler that renders records with the SDK's structlog chain."""

    def __init__(self, pipeline: LogPipeline) -> None:
        super().__init__()
        self.pipeline = pipeline

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.pipeline.emit_record(record)
        except Exception:  # noqa: BLE001 - logging must never raise into the host
            self.handleError(record)


def tame_uvicorn() -> None:
    """Route uvicorn's loggers into ours and silence its access log, which the SDK replaces.

    uvicorn applies its own logging config when it starts, possibly after `init()`, so
    the ASGI middleware calls this again at lifespan startup and on the first request.
    """
    for name in _UVICORN_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True
    access = logging.getLogger("uvicorn.access")
    for handler in list(access.handlers):
        access.removeHandler(handler)
    access.propagate = False
    access.disabled = True
