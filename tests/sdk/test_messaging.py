"""Messaging: PRODUCER/CONSUMER spans, context in headers, metrics; aio-pika on RabbitMQ."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.trace import SpanKind, StatusCode

import lookout.sdk
from tests.sdk.conftest import Instrument


def test_generic_hooks_carry_the_trace_from_producer_to_consumer(instrument: Instrument) -> None:
    target = instrument(None)
    headers: dict[str, Any] = {}
    with lookout.sdk.tracer().start_as_current_span("confirm booking"):
        with lookout.sdk.publishing("sms", headers, system="redis"):
            pass
    with lookout.sdk.processing("sms", headers, system="redis"):
        lookout.sdk.get_logger().info("sms_sent")
    producer = target.spans.named("publish sms")[0]
    consumer = target.spans.named("process sms")[0]
    assert producer.kind == SpanKind.PRODUCER
    assert consumer.kind == SpanKind.CONSUMER
    assert consumer.context.trace_id == producer.context.trace_id
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id
    assert headers["x-trace-id"] == format(producer.context.trace_id, "032x")
    assert headers["traceparent"].split("-")[1] == headers["x-trace-id"]
    (line,) = [line for line in target.logs if line["event"] == "sms_sent"]
    assert line["trace_id"] == headers["x-trace-id"]
    assert (
        target.sample("messaging_client_sent_messages_total", messaging_destination_name="sms")
        == 1.0
    )
    assert (
        target.sample("messaging_client_consumed_messages_total", messaging_destination_name="sms")
        == 1.0
    )
    assert (
        target.sample(
            "messaging_process_duration_seconds_count",
            messaging_destination_name="sms",
            error_type="",
        )
        == 1.0
    )


def test_a_message_with_only_x_trace_id_continues_that_trace(instrument: Instrument) -> None:
    target = instrument(None)
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    with lookout.sdk.processing("sms", {"x-trace-id": trace_id.encode()}):
        pass
    (span,) = target.spans()
    assert format(span.context.trace_id, "032x") == trace_id


def test_a_failing_handler_is_an_error_span_and_the_exception_propagates(
    instrument: Instrument,
) -> None:
    target = instrument(None)
    with pytest.raises(KeyError), lookout.sdk.processing("sms", {}):
        raise KeyError("template")
    (span,) = target.spans()
    assert span.status.status_code == StatusCode.ERROR
    assert (
        target.sample(
            "messaging_process_duration_seconds_count",
            messaging_destination_name="sms",
            error_type="KeyError",
        )
        == 1.0
    )


def test_hooks_before_init_are_inert() -> None:
    headers: dict[str, Any] = {}
    with lookout.sdk.publishing("sms", headers), lookout.sdk.processing("sms", headers):
        pass
    assert headers == {}


def test_aio_pika_publish_and_consume_on_rabbitmq(instrument: Instrument, amqp_url: str) -> None:
    aio_pika = pytest.importorskip("aio_pika")
    target = instrument(None)

    async def run() -> dict[str, Any]:
        received: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        connection = await aio_pika.connect_robust(amqp_url)
        async with connection:
            channel = await connection.channel()
            queue = await channel.declare_queue("notifications", auto_delete=True)

            async def on_message(message: Any) -> None:
                async with message.process():
                    lookout.sdk.get_logger().info("notification_sent")
                    await received.put(dict(message.headers))

            await queue.consume(on_message)
            with lookout.sdk.tracer().start_as_current_span("confirm booking"):
                await channel.default_exchange.publish(
                    aio_pika.Message(body=b'{"booking": "BK-1"}'), routing_key="notifications"
                )
            return await asyncio.wait_for(received.get(), 10)

    headers = asyncio.run(run())
    producer = target.spans.named("publish notifications")[0]
    consumer = target.spans.named("process notifications")[0]
    assert consumer.context.trace_id == producer.context.trace_id
    assert consumer.parent is not None
    assert consumer.parent.span_id == producer.context.span_id
    assert headers["x-trace-id"] == format(producer.context.trace_id, "032x")
    assert consumer.attributes is not None
    assert consumer.attributes["messaging.system"] == "rabbitmq"
    (line,) = [line for line in target.logs if line["event"] == "notification_sent"]
    assert line["trace_id"] == headers["x-trace-id"]
    assert (
        target.sample(
            "messaging_client_sent_messages_total", messaging_destination_name="notifications"
        )
        == 1.0
    )
    assert (
        target.sample(
            "messaging_client_consumed_messages_total", messaging_destination_name="notifications"
        )
        == 1.0
    )
