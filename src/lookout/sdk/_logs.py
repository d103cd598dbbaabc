"""JSON logs on stdout through structlog, with the standard library routed into them.

One line per event: `timestamp` (RFC 3339, UTC), `level`, `event`, `logger`, `service`,
and `trace_id` / `span_id` whenever a span is current (sampled or not), then whatever
the caller bound or passed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, MutableMapping
from typing import Any

import orjson
import structlog
from opentelemetry import trace
from structlog.tracebacks import ExceptionDictTransformer

from lookout.sdk._guard import INTERNAL_LOGGER, OncePerMinute, warn_once
from lookout.sdk._scrub import Scrubber
from lookout.sdk._stdout import StdoutSink

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


def guarded(processor: Processor, *, renderer: bool = False) -> Processor:
    """A processor that cannot raise into the code that logged. On failure it reports once
    a minute and passes the event on; a failing renderer still puts out a minimal line."""
    if getattr(processor, "_lookout_guarded", False):
        return processor
    name = getattr(processor, "__name__", type(processor).__name__)

    def run(logger: Any, method: str, event: EventDict) -> Any:
        try:
            return processor(logger, method, event)
        except structlog.DropEvent:
            raise
        except Exception as exc:  # noqa: BLE001 - logging must never raise into the host
            warn_once(
                f"log processor {name}", "lookout.sdk: log processor %s failed: %r", name, exc
            )
            if not renderer:
                return event
            fallback = {
                "timestamp": str(event.get("timestamp", "")),
                "level": str(event.get("level", method)),
                "event": str(event.get("event", "")),
                "lookout_render_error": type(exc).__name__,
            }
            return json.dumps(fallback).encode()

    run._lookout_guarded = True  # type: ignore[attr-defined]
    return run


class _SinkFactory:
    def __init__(self, sink: StdoutSink) -> None:
        self.sink = sink

    def __call__(self, *_: Any) -> StdoutSink:
        return self.sink


class LogPipeline:
    """The processor chain shared by structlog calls and standard-library records."""

    def __init__(
        self, service: str, level: str, on_drop: Callable[[str], None], scrubber: Scrubber
    ) -> None:
        self.service = service
        self.level = getattr(logging, level)
        self.sink = StdoutSink(on_drop)
        self.scrubber = scrubber
        # One list, configured once and changed only in place: loggers bound earlier
        # (module-level ones, the access log) hold a reference to it, not a copy.
        self.chain: list[Processor] = [
            guarded(processor)
            for processor in (
                structlog.contextvars.merge_contextvars,
                structlog.processors.add_log_level,
                add_trace_ids,
                structlog.processors.TimeStamper(fmt="iso", utc=True, key="timestamp"),
                self._add_service,
                # Tracebacks as data, without locals (error events carry those, scrubbed).
                structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
                self._scrub,
            )
        ]
        self.chain.append(guarded(structlog.processors.JSONRenderer(_orjson_dumps), renderer=True))
        self._handler: StructlogHandler | None = None

    @property
    def renderer(self) -> Processor:
        """The last processor: it turns the event into the line (or ships it elsewhere)."""
        return self.chain[-1]

    @renderer.setter
    def renderer(self, processor: Processor) -> None:
        self.chain[-1] = guarded(processor, renderer=True)

    def _scrub(self, _: Any, __: str, event: EventDict) -> EventDict:
        """Secrets and personal data never reach the line (see _scrub.py for the rules)."""
        if not self.scrubber.enabled:
            return event
        scrub = self.scrubber.scrub_field
        for key, value in event.items():
            if not isinstance(value, bool | float) and value is not None:
                event[key] = scrub(key, value)
        return event

    def _add_service(self, _: Any, __: str, event: EventDict) -> EventDict:
        # `service` names the process that wrote the line (Lookout files the line under
        # it). A field of that name from the caller is about another service: keep it
        # as `peer_service` rather than let it pass the line off as that service's.
        given = event.get("service")
        if given is not None and given != self.service:
            event.setdefault("peer_service", given)
        event["service"] = self.service
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
        self._handler.addFilter(OncePerMinute())
        root.addHandler(self._handler)
        root.setLevel(self.level)
        logging.getLogger(INTERNAL_LOGGER).setLevel(logging.WARNING)
        # The batch processor warns on every span a full queue drops; the SDK counts those
        # in lookout_sdk_dropped_total instead.
        logging.getLogger("opentelemetry.sdk._shared_internal").setLevel(logging.ERROR)
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
