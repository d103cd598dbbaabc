"""Messaging: PRODUCER and CONSUMER spans, context carried in message headers, and the
messaging metrics. A generic hook for any queue, and aio-pika (AMQP) built on it.

    with lookout.sdk.publishing("sms", message_headers):      # before sending
        queue_client.send(body, headers=message_headers)
    with lookout.sdk.processing("sms", message.headers):       # around handling one message
        handle(message)

A queue is internal infrastructure, so message headers always carry `traceparent`,
`tracestate`, `baggage` and `X-Trace-Id`; the consumer continues the producer's trace.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from typing import Any

from opentelemetry import context, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from lookout.sdk import _errors
from lookout.sdk._guard import guard
from lookout.sdk._metrics import exemplar_for_current_span
from lookout.sdk._propagation import X_TRACE_ID, format_trace_id, parse_trace_id


def _headers_as_text(headers: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, raw in (headers or {}).items():
        value = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
        if isinstance(value, str):
            out[str(key).lower()] = value
    return out


@contextmanager
def publishing(
    runtime: Any, destination: str, headers: MutableMapping[str, Any], system: str
) -> Iterator[trace.Span]:
    """A PRODUCER span around sending one message; writes the context into `headers`."""
    span = runtime.tracer.start_span(
        f"publish {destination}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": system,
            "messaging.operation.name": "publish",
            "messaging.operation.type": "send",
            "messaging.destination.name": destination,
        },
    )
    with trace.use_span(span, end_on_exit=False, record_exception=False):
        with guard("message context injection"):
            carrier: dict[str, str] = {}
            for propagator in runtime.propagation.propagators:
                propagator.inject(carrier)
            if span.get_span_context().is_valid:
                carrier[X_TRACE_ID] = format_trace_id(span.get_span_context().trace_id)
            headers.update(carrier)
        try:
            yield span
        except BaseException as exc:
            _fail(span, exc)
            span.end()
            raise
    with guard("messaging metrics"):
        runtime.instruments.messages_sent.labels(destination).inc()
    span.end()


@contextmanager
def processing(
    runtime: Any, destination: str, headers: Mapping[str, Any] | None, system: str
) -> Iterator[trace.Span]:
    """A CONSUMER span around handling one message, continuing the producer's trace.

    An exception is recorded on the span, sent as an error event, and re-raised.
    """
    _errors.enable_asyncio()
    text = _headers_as_text(headers)
    parent = context.Context()
    for propagator in runtime.propagation.propagators:
        parent = propagator.extract(text, context=parent)
    root_id = None
    if not trace.get_current_span(parent).get_span_context().is_valid:
        root_id = parse_trace_id(text.get(X_TRACE_ID))
    from lookout.sdk._tracing import root_trace_id

    with root_trace_id(root_id):
        span = runtime.tracer.start_span(
            f"process {destination}",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": system,
                "messaging.operation.name": "process",
                "messaging.operation.type": "process",
                "messaging.destination.name": destination,
            },
        )
    token = context.attach(trace.set_span_in_context(span, parent))
    begin = time.perf_counter()
    error_type = ""
    try:
        yield span
    except Exception as exc:
        error_type = type(exc).__qualname__
        _fail(span, exc)
        _errors.capture(exc)
        raise
    finally:
        with guard("messaging metrics"):
            instruments = runtime.instruments
            instruments.messages_consumed.labels(destination).inc()
            instruments.process_duration.labels(destination, error_type).observe(
                time.perf_counter() - begin, exemplar_for_current_span()
            )
        span.end()
        context.detach(token)


def _fail(span: trace.Span, exc: BaseException) -> None:
    span.record_exception(exc)
    span.set_attribute("error.type", type(exc).__qualname__)
    span.set_status(Status(StatusCode.ERROR))


_aio_pika_installed = False


def install_aio_pika(get_runtime: Any) -> bool:
    """Wrap aio-pika's Exchange.publish and Queue.consume once; False if it is absent."""
    global _aio_pika_installed  # noqa: PLW0603 - patched once per process
    if _aio_pika_installed:
        return True
    try:
        import aio_pika
    except ImportError:
        return False
    original_publish = aio_pika.Exchange.publish
    original_consume = aio_pika.Queue.consume

    async def publish(self: Any, message: Any, routing_key: str, *args: Any, **kw: Any) -> Any:
        runtime = get_runtime()
        if runtime is None:
            return await original_publish(self, message, routing_key, *args, **kw)
        destination = self.name or routing_key
        if message.headers is None:
            message.headers = {}
        with publishing(runtime, destination, message.headers, "rabbitmq"):
            return await original_publish(self, message, routing_key, *args, **kw)

    async def consume(self: Any, callback: Any, *args: Any, **kw: Any) -> Any:
        queue_name = self.name

        async def traced(message: Any) -> Any:
            runtime = get_runtime()
            if runtime is None:
                return await callback(message)
            with processing(runtime, queue_name, message.headers, "rabbitmq"):
                return await callback(message)

        return await original_consume(self, traced, *args, **kw)

    aio_pika.Exchange.publish = publish  # type: ignore[method-assign]
    aio_pika.Queue.consume = consume  # type: ignore[method-assign]
    _aio_pika_installed = True
    return True
