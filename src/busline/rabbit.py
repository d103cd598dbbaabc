"""The RabbitMQ broker behind `busline.queue`'s `Broker` interface, through aio-pika.

Durable classic queues, persistent messages carrying an AMQP `timestamp` (so
`rabbitmq_prometheus` can report the head message's age), publisher confirms, manual acks,
a prefetch window, and a `nack` with requeue when a handler raises. A consumer whose
connection drops reconnects with backoff; RabbitMQ redelivers what it had not acked.

Publishing and consuming go through the underlying aiormq channel, so that aio-pika's own
instrumentation adds no second span: the PRODUCER and CONSUMER spans are `busline.queue`'s,
as for the embedded broker. `queue.open_broker` returns this broker when `BUSLINE_AMQP_URL`
is set, and `busline.queue.RabbitBroker` names this class; aio-pika itself is imported only
when a broker connects.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

from busline.queue import (
    BrokerError,
    Handler,
    QueueStats,
    _check_prefetch,
    _check_queue,
    _decode_body,
    _drain,
    _process,
    _producer_span,
    _text_headers,
    encode_message,
)
from lookout import sdk

__all__ = ["RABBIT_REDELIVERY_DELAY_S", "RabbitBroker"]

# The queue's logger: a RabbitMQ consumer's lines read as they did before the split.
log = sdk.get_logger("busline.queue")

#: How long a failed message waits before it is nacked back to the queue, so a handler
#: that always fails does not spin (RabbitMQ requeues at once, to the queue's head).
RABBIT_REDELIVERY_DELAY_S = 0.5


class RabbitBroker:
    """RabbitMQ through aio-pika (see the module doc)."""

    system = "rabbitmq"

    def __init__(
        self,
        url: str,
        *,
        connection_name: str = "busline",
        drain_s: float = 10.0,
        redelivery_delay_s: float = RABBIT_REDELIVERY_DELAY_S,
        connect_timeout_s: float = 10.0,
    ) -> None:
        if not url.startswith(("amqp://", "amqps://")):
            raise ValueError(
                f"AMQP URL {url.rsplit('@', maxsplit=1)[-1]!r} is not valid. "
                "Expected amqp://user:password@host:5672/vhost."
            )
        self.url = url
        self.connection_name = connection_name
        self.drain_s = drain_s
        self.redelivery_delay_s = redelivery_delay_s
        self.connect_timeout_s = connect_timeout_s
        self._connection: Any = None
        self._channel: Any = None
        self._stats_channel: Any = None
        self._declared: set[str] = set()
        self._connect_lock = asyncio.Lock()
        self._consumers: set[Any] = set()
        self._closed = False

    @property
    def closed(self) -> bool:
        return self._closed

    async def _connect(self, role: str) -> Any:
        import aio_pika

        return await aio_pika.connect(
            self.url,
            timeout=self.connect_timeout_s,
            client_properties={"connection_name": f"{self.connection_name}-{role}"},
        )

    async def _publish_channel(self) -> Any:
        """The publishing channel (publisher confirms on), reconnecting when closed."""
        async with self._connect_lock:
            if self._connection is None or self._connection.is_closed:
                self._connection = await self._connect("publisher")
                self._channel = None
                self._stats_channel = None
                self._declared.clear()
            if self._channel is None or self._channel.is_closed:
                self._channel = await self._connection.channel(publisher_confirms=True)
                self._declared.clear()
            return self._channel

    async def _declare(self, channel: Any, queue: str) -> None:
        if queue not in self._declared:
            await channel.declare_queue(queue, durable=True)
            self._declared.add(queue)

    async def publish(self, queue: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        import aio_pika
        from aiormq import spec

        payload, outgoing = encode_message(queue, body, headers)
        channel = await self._publish_channel()
        await self._declare(channel, queue)
        with _producer_span(queue, outgoing, self.system):
            message = aio_pika.Message(
                payload,
                headers=dict(outgoing),
                content_type="application/json",
                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                timestamp=time.time(),
                message_id=uuid.uuid4().hex,
            )
            # The underlying channel: aio-pika's instrumented Exchange.publish would add
            # a second PRODUCER span around this one.
            underlay = await channel.get_underlay_channel()
            confirmation = await underlay.basic_publish(
                message.body,
                exchange="",
                routing_key=queue,
                properties=message.properties,
                mandatory=True,
                timeout=self.connect_timeout_s,
            )
            if not isinstance(confirmation, spec.Basic.Ack):
                raise BrokerError(
                    f"RabbitMQ did not confirm a message to queue {queue!r} "
                    f"(answered {type(confirmation).__name__}); publish it again."
                )

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 10) -> None:
        import aiormq

        _check_queue(queue)
        _check_prefetch(prefetch)
        backoff_s = 0.5
        while not self._closed:
            try:
                await self._consume_connected(queue, handler, prefetch)
                backoff_s = 0.5
            except (aiormq.exceptions.AMQPError, OSError, ConnectionError) as exc:
                if self.closed:
                    return
                log.warning(
                    "queue_consumer_reconnecting",
                    queue=queue,
                    error_type=type(exc).__qualname__,
                    error=str(exc)[:300],
                    retry_in_s=backoff_s,
                )
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, 10.0)

    async def _consume_connected(self, queue: str, handler: Handler, prefetch: int) -> None:
        """Consume on one connection until it closes (raises ConnectionError) or the task
        is cancelled (stops deliveries, drains, raises CancelledError)."""
        import aio_pika
        from aiormq.abc import DeliveredMessage

        connection = await self._connect("consumer")
        self._consumers.add(connection)
        running: set[asyncio.Task[None]] = set()
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=prefetch)
            await channel.declare_queue(queue, durable=True)
            underlay = await channel.get_underlay_channel()

            async def on_message(delivered: DeliveredMessage) -> None:
                message = aio_pika.IncomingMessage(delivered, no_ack=False)
                task = asyncio.create_task(self._deliver(queue, message, handler))
                running.add(task)
                task.add_done_callback(running.discard)

            # The underlying channel: aio-pika's instrumented Queue.consume would wrap
            # each delivery in a CONSUMER span of its own.
            consume_ok = await underlay.basic_consume(queue, on_message, no_ack=False)
            log.info("queue_consumer_started", queue=queue, prefetch=prefetch)
            closed = [
                asyncio.ensure_future(channel.closed()),
                asyncio.ensure_future(connection.closed()),
            ]
            try:
                await asyncio.wait(closed, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                with contextlib.suppress(Exception):
                    await underlay.basic_cancel(consume_ok.consumer_tag)
                await _drain(running, self.drain_s)
                raise
            finally:
                for waiter in closed:
                    waiter.cancel()
            for task in list(running):
                task.cancel()
            raise ConnectionError(f"the RabbitMQ channel consuming {queue!r} closed")
        finally:
            self._consumers.discard(connection)
            with contextlib.suppress(Exception):
                await connection.close()

    async def _deliver(self, queue: str, message: Any, handler: Handler) -> None:
        headers = _text_headers(message.headers)
        try:
            body = _decode_body(message.body)
        except ValueError as exc:
            log.warning(
                "message_undecodable", queue=queue, message_id=message.message_id, error=str(exc)
            )
            with contextlib.suppress(Exception):
                await message.reject(requeue=False)
            return
        try:
            await _process(
                queue,
                handler,
                system=self.system,
                message_id=str(message.message_id or ""),
                body=body,
                headers=headers,
                redelivered=bool(message.redelivered),
                retry_in_s=self.redelivery_delay_s,
            )
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
            raise
        except Exception:  # noqa: BLE001 - any handler failure means redelivery (logged)
            await asyncio.sleep(self.redelivery_delay_s)
            with contextlib.suppress(Exception):
                await message.nack(requeue=True)
        else:
            try:
                await message.ack()
            except Exception as exc:  # noqa: BLE001 - the broker redelivers an unacked message
                log.warning("message_ack_failed", queue=queue, error=str(exc)[:300])

    async def stats(self, queue: str) -> QueueStats:
        """`ready` from a passive declare (0 when the queue does not exist yet); RabbitMQ's
        own exporter has `unacked` and the head timestamp."""
        import aiormq

        _check_queue(queue)
        await self._publish_channel()
        async with self._connect_lock:
            if self._stats_channel is None or self._stats_channel.is_closed:
                self._stats_channel = await self._connection.channel()
            channel = self._stats_channel
        try:
            declared = await channel.declare_queue(queue, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            self._stats_channel = None  # RabbitMQ closes a channel on a 404
            return QueueStats(queue=queue, ready=0, unacked=None, head_timestamp=None)
        count = declared.declaration_result.message_count
        return QueueStats(queue=queue, ready=int(count or 0), unacked=None, head_timestamp=None)

    async def close(self) -> None:
        self._closed = True
        for connection in list(self._consumers):
            with contextlib.suppress(Exception):
                await connection.close()
        connection, self._connection = self._connection, None
        self._channel = None
        self._stats_channel = None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.close()
