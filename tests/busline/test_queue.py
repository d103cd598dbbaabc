"""busline.queue: the embedded durable queue (one SQLite file shared by processes) and
RabbitMQ, behind one Broker interface, with one PRODUCER and one CONSUMER span each."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from busline import queue as busline_queue
from busline.queue import EmbeddedBroker, QueueStats, RabbitBroker, open_broker
from lookout import sdk
from lookout.sdk import testing
from tests.support import ROOT

CONSUMER = r"""
import asyncio, json, sys
from pathlib import Path
from busline.queue import open_broker

queue, out, mode = sys.argv[1], Path(sys.argv[2]), sys.argv[3]

async def handle(body, headers):
    with out.open("a") as f:
        f.write(json.dumps(body) + "\n")
    if mode == "hang":
        await asyncio.Event().wait()

async def main():
    await open_broker("test-consumer").consume(queue, handle, prefetch=1)

asyncio.run(main())
"""

PUBLISHER = r"""
import asyncio, sys
from busline.queue import open_broker

async def main():
    broker = open_broker("test-publisher")
    for n in range(int(sys.argv[2])):
        await broker.publish(sys.argv[1], {"n": n}, {"sent-by": "publisher"})
    await broker.close()

asyncio.run(main())
"""


@pytest.fixture
def state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "state"
    monkeypatch.setenv("BUSLINE_STATE", str(path))
    monkeypatch.delenv("BUSLINE_AMQP_URL", raising=False)
    return path


@pytest.fixture
def queue_name() -> str:
    return f"test.{uuid.uuid4().hex[:10]}"


@pytest.fixture
def spans() -> Iterator[testing.CapturedSpans]:
    """The SDK initialised in this process, its finished spans captured."""
    previous = signal.getsignal(signal.SIGTERM)
    testing.fresh_registry()
    sdk.init(service="queue-test", metrics_addr="off", traces_exporter="none", environ={})
    try:
        with testing.capture_spans() as captured:
            yield captured
    finally:
        testing.reset()
        signal.signal(signal.SIGTERM, previous)


def spawn(script: str, *args: str, log: Path, **env: str) -> subprocess.Popen[bytes]:
    """A real Python process running `script` with busline importable."""
    output = log.open("ab")
    try:
        return subprocess.Popen(
            [sys.executable, "-c", script, *args],
            cwd=ROOT,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env},
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    finally:
        output.close()


def lines(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line]
    except FileNotFoundError:
        return []


async def eventually(predicate: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


async def eventually_async(
    predicate: Callable[[], Awaitable[Any]], timeout_s: float, what: str
) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        result = await predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def consuming(
    broker: Any, queue: str, handler: Any, *, prefetch: int = 10
) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(broker.consume(queue, handler, prefetch=prefetch))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def rows(state: Path) -> list[tuple[Any, ...]]:
    """The embedded queue's messages as stored in its file."""
    with contextlib.closing(sqlite3.connect(state / "queue" / "broker.sqlite")) as db:
        return db.execute(
            "SELECT queue, body, delivery_count, lease_owner IS NOT NULL FROM messages"
        ).fetchall()


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)


# ---------------------------------------------------------------- the embedded queue


async def test_a_message_round_trips_and_its_ack_deletes_it(state: Path, queue_name: str) -> None:
    """The handler gets the body and headers; until it returns the message stays in the
    file, leased (negative control); once it returns (ack) the message is gone."""
    broker = EmbeddedBroker()
    received: list[tuple[dict[str, Any], dict[str, str]]] = []
    release = asyncio.Event()

    async def handle(body: dict[str, Any], headers: dict[str, str]) -> None:
        received.append((body, headers))
        await release.wait()

    await broker.publish(queue_name, {"booking_id": "b-1", "seat": 7}, {"x-source": "test"})
    async with consuming(broker, queue_name, handle):
        await eventually(lambda: received, 5, "the delivery")
        assert received == [({"booking_id": "b-1", "seat": 7}, {"x-source": "test"})]
        assert [(queue_name, '{"booking_id":"b-1","seat":7}', 1, 1)] == rows(state)
        assert QueueStats(queue_name, 0, 1, None) == await broker.stats(queue_name)
        release.set()
        await eventually(lambda: not rows(state), 5, "the ack to delete the message")
    assert QueueStats(queue_name, 0, 0, None) == await broker.stats(queue_name)
    await broker.close()


async def test_an_unreadable_row_is_dropped_and_the_queue_goes_on(
    state: Path, queue_name: str
) -> None:
    """A row damaged on disk (not JSON) is logged and dropped; the good message behind it
    is still delivered: one bad row never stops a consumer."""
    import sqlite3

    broker = EmbeddedBroker()
    await broker.publish(queue_name, {"n": 1}, {})
    await broker.publish(queue_name, {"n": 2}, {})
    with sqlite3.connect(state / "queue" / "broker.sqlite") as db:
        db.execute(
            "UPDATE messages SET body = '{not json' WHERE id = (SELECT MIN(id) FROM messages)"
        )
    received: list[dict[str, Any]] = []

    async def handle(body: dict[str, Any], _: dict[str, str]) -> None:
        received.append(body)

    async with consuming(broker, queue_name, handle):
        await eventually(lambda: received, 5, "the good message")
        await eventually(lambda: not rows(state), 5, "both rows gone")
    assert received == [{"n": 2}]
    await broker.close()


async def test_a_handler_exception_redelivers_the_message(state: Path, queue_name: str) -> None:
    """A handler that raises releases the message: it comes back, its delivery count
    grows, and nothing is lost; the next success acks it."""
    broker = EmbeddedBroker()
    attempts: list[dict[str, Any]] = []

    async def handle(body: dict[str, Any], _: dict[str, str]) -> None:
        attempts.append(body)
        if len(attempts) < 3:
            raise RuntimeError("SMS gateway unreachable")

    await broker.publish(queue_name, {"n": 1}, {})
    async with consuming(broker, queue_name, handle):
        await eventually(lambda: len(attempts) == 3, 10, "two redeliveries")
        await eventually(lambda: not rows(state), 5, "the final ack")
    assert attempts == [{"n": 1}] * 3
    await broker.close()


async def test_a_consumer_killed_mid_message_is_redelivered_promptly(
    state: Path, queue_name: str, tmp_path: Path
) -> None:
    """A consumer process holds a message; while it lives (stopped), its 30 s lease keeps
    the message from others (negative control). Killed with SIGKILL (and not even reaped:
    a zombie), its lease is taken back at once: a new consumer gets it within 5 s."""
    broker = EmbeddedBroker(lease_s=30.0)
    await broker.publish(queue_name, {"n": 1}, {})
    held = tmp_path / "held.jsonl"
    env = {"BUSLINE_STATE": str(state)}
    first = spawn(CONSUMER, queue_name, str(held), "hang", log=tmp_path / "first.log", **env)
    received: list[dict[str, Any]] = []

    async def handle(body: dict[str, Any], _: dict[str, str]) -> None:
        received.append(body)

    try:
        await eventually(lambda: lines(held), 20, "the first consumer to take the message")
        os.kill(first.pid, signal.SIGSTOP)
        async with consuming(broker, queue_name, handle):
            await asyncio.sleep(1.5)  # a window in which nothing may arrive
            assert received == []
            assert QueueStats(queue_name, 0, 1, None) == await broker.stats(queue_name)
            first.send_signal(signal.SIGKILL)
            killed_at = time.monotonic()
            await eventually(lambda: received, 5, "the redelivery")
            assert time.monotonic() - killed_at < 5.0
        assert received == [{"n": 1}]
        assert lines(held) == [{"n": 1}]
        assert rows(state) == []
    finally:
        stop(first)
        await broker.close()


async def test_the_depth_survives_a_restart(state: Path, queue_name: str) -> None:
    """Messages published before the broker closes are all there when it is reopened."""
    before = EmbeddedBroker()
    for n in range(3):
        await before.publish(queue_name, {"n": n}, {})
    first_at = (await before.stats(queue_name)).head_timestamp
    await before.close()

    after = EmbeddedBroker()
    assert QueueStats(queue_name, 3, 0, first_at) == await after.stats(queue_name)
    received: list[dict[str, Any]] = []

    async def handle(body: dict[str, Any], _: dict[str, str]) -> None:
        received.append(body)

    async with consuming(after, queue_name, handle, prefetch=1):
        await eventually(lambda: len(received) == 3, 5, "every message")
    assert received == [{"n": 0}, {"n": 1}, {"n": 2}]
    await after.close()


async def test_messages_published_by_one_process_are_consumed_by_another(
    state: Path, queue_name: str, tmp_path: Path
) -> None:
    """A publisher process writes and exits, the depth shows here, a consumer process
    takes them all, and the depth goes back to zero."""
    env = {"BUSLINE_STATE": str(state)}
    publisher = spawn(PUBLISHER, queue_name, "5", log=tmp_path / "publisher.log", **env)
    assert publisher.wait(timeout=30) == 0, (tmp_path / "publisher.log").read_text()
    broker = EmbeddedBroker()
    stats = await broker.stats(queue_name)
    assert (stats.ready, stats.unacked) == (5, 0)
    out = tmp_path / "consumed.jsonl"
    consumer = spawn(CONSUMER, queue_name, str(out), "ok", log=tmp_path / "consumer.log", **env)
    try:
        await eventually(lambda: len(lines(out)) == 5, 20, "the consumer process")
        await eventually_async(
            lambda: _stats_is(broker, queue_name, QueueStats(queue_name, 0, 0, None)),
            5,
            "the acks",
        )
        assert [{"n": n} for n in range(5)] == lines(out)
    finally:
        stop(consumer)
        await broker.close()


async def _stats_is(broker: Any, queue: str, expected: QueueStats) -> bool:
    return bool(expected == await broker.stats(queue))


async def test_stats_count_ready_and_unacked_and_date_the_oldest_ready_message(
    state: Path, queue_name: str
) -> None:
    """ready = waiting, unacked = leased by a consumer, head_timestamp = the enqueue time
    of the oldest *ready* message (RabbitMQ's meanings); the sync forms agree, and the
    supervisor's reader (module `stats_sync`) answers zeros before the file exists."""
    assert busline_queue.stats_sync(queue_name) == QueueStats(queue_name, 0, 0, None)
    assert not (state / "queue" / "broker.sqlite").exists()  # the reader wrote nothing
    stamps = iter([1000.0, 2000.0])
    publisher = EmbeddedBroker(clock=lambda: next(stamps, 3000.0))
    await publisher.publish(queue_name, {"n": 1}, {})
    await publisher.publish(queue_name, {"n": 2}, {})
    consumer = EmbeddedBroker()
    assert QueueStats(queue_name, 2, 0, 1000.0) == await consumer.stats(queue_name)
    release = asyncio.Event()
    held: list[dict[str, Any]] = []

    async def handle(body: dict[str, Any], _: dict[str, str]) -> None:
        held.append(body)
        await release.wait()

    async with consuming(consumer, queue_name, handle, prefetch=1):
        await eventually(lambda: held, 5, "the first message")
        assert QueueStats(queue_name, 1, 1, 2000.0) == await consumer.stats(queue_name)
        assert QueueStats(queue_name, 1, 1, 2000.0) == consumer.stats_sync(queue_name)
        assert QueueStats(queue_name, 1, 1, 2000.0) == busline_queue.stats_sync(queue_name)
        release.set()
        await eventually(lambda: len(held) == 2, 5, "the second message")
        await eventually(
            lambda: QueueStats(queue_name, 0, 0, None) == consumer.stats_sync(queue_name),
            5,
            "an empty queue",
        )
    assert [queue_name] == consumer.queues_sync()
    await publisher.close()
    await consumer.close()


async def test_bad_messages_are_rejected_with_a_clear_value_error(
    state: Path, queue_name: str
) -> None:
    """Over 256 KiB, not JSON-serialisable, not an object, or with non-text headers:
    ValueError naming the queue, and nothing is stored. Just under the limit is taken
    (negative control)."""
    broker = EmbeddedBroker()
    with pytest.raises(ValueError, match=r"Expected at most 262144 bytes \(256 KiB\)"):
        await broker.publish(queue_name, {"blob": "x" * (256 * 1024)}, {})
    with pytest.raises(ValueError, match=f"queue '{queue_name}' is not JSON-serialisable"):
        await broker.publish(queue_name, {"when": object()}, {})
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        await broker.publish(queue_name, {"amount": float("nan")}, {})
    with pytest.raises(ValueError, match="Expected a JSON object"):
        await broker.publish(queue_name, ["not", "an", "object"], {})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="Expected string keys and string values"):
        await broker.publish(queue_name, {}, {"attempt": 1})  # type: ignore[dict-item]
    with pytest.raises(ValueError, match="Queue name 'no spaces' is not valid"):
        await broker.publish("no spaces", {}, {})
    assert QueueStats(queue_name, 0, 0, None) == await broker.stats(queue_name)
    await broker.publish(queue_name, {"blob": "x" * (256 * 1024 - 100)}, {})
    assert (await broker.stats(queue_name)).ready == 1
    await broker.close()


async def test_each_message_gets_one_producer_and_one_consumer_span_on_one_trace(
    state: Path, queue_name: str, spans: testing.CapturedSpans
) -> None:
    """Embedded: `publish <queue>` (PRODUCER) and `process <queue>` (CONSUMER), the
    consumer a child of the producer. A caller that wraps publish in
    `sdk.publishing` itself still gets one producer span (the guard against doubling)."""
    broker = EmbeddedBroker()
    handled: list[str] = []

    async def handle(body: dict[str, Any], _: dict[str, str]) -> None:
        handled.append(str(body["n"]))

    with sdk.tracer().start_as_current_span("confirm booking"):
        await broker.publish(queue_name, {"n": 1}, {})
        headers: dict[str, str] = {}
        with sdk.publishing(queue_name, headers, system="busline_sqlite"):
            await broker.publish(queue_name, {"n": 2}, headers)
    async with consuming(broker, queue_name, handle):
        await eventually(lambda: len(handled) == 2, 5, "both messages")
        await eventually(lambda: len(spans.named(f"process {queue_name}")) == 2, 5, "spans")
    producers = spans.named(f"publish {queue_name}")
    consumers = spans.named(f"process {queue_name}")
    root = spans.named("confirm booking")[0]
    assert len(producers) == 2
    assert len(consumers) == 2
    assert {root.context.trace_id} == {s.context.trace_id for s in producers + consumers}
    assert sorted(p.context.span_id for p in producers) == sorted(
        c.parent.span_id for c in consumers if c.parent is not None
    )
    assert {"busline_sqlite"} == {s.attributes["messaging.system"] for s in producers}
    await broker.close()


async def test_a_relay_publish_continues_the_trace_in_the_stored_headers(
    state: Path, queue_name: str, spans: testing.CapturedSpans
) -> None:
    """With no current span, the `traceparent` given to publish (as an outbox relay
    stored it with `trace_headers()`) is the parent of the producer span."""
    with sdk.tracer().start_as_current_span("confirm booking") as confirm:
        stored = busline_queue.trace_headers()
    assert busline_queue.trace_headers() == {}  # negative control: nothing current
    broker = EmbeddedBroker()
    await broker.publish(queue_name, {"n": 1}, stored)
    (producer,) = spans.named(f"publish {queue_name}")
    assert producer.parent is not None
    expected = (confirm.get_span_context().trace_id, confirm.get_span_context().span_id)
    assert expected == (producer.context.trace_id, producer.parent.span_id)
    await broker.close()


def test_open_broker_picks_rabbitmq_only_when_an_amqp_url_is_set(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedded = open_broker("ticketing")
    assert isinstance(embedded, EmbeddedBroker)
    assert state / "queue" / "broker.sqlite" == embedded.path
    embedded.close_sync()
    monkeypatch.setenv("BUSLINE_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/x")
    assert isinstance(open_broker("ticketing"), RabbitBroker)


# ---------------------------------------------------------------- RabbitMQ


@pytest.mark.real("rabbitmq")
async def test_rabbitmq_round_trip_persists_and_spans_once_each(
    amqp_url: str, queue_name: str, spans: testing.CapturedSpans
) -> None:
    """A persistent, timestamped message makes the round trip with one PRODUCER and one
    CONSUMER span on one trace. The SDK's aio-pika patch is live (negative control: a raw
    `Exchange.publish` gets a span from it), yet the broker's messages are not doubled."""
    import aio_pika

    broker = RabbitBroker(amqp_url)
    with sdk.tracer().start_as_current_span("confirm booking"):
        await broker.publish(queue_name, {"booking_id": "b-9"}, {"x-source": "test"})
    assert QueueStats(queue_name, 1, None, None) == await broker.stats(queue_name)

    connection = await aio_pika.connect(amqp_url)
    async with connection:
        channel = await connection.channel()
        raw = await channel.declare_queue(queue_name, durable=True, passive=True)
        peeked = await raw.get(timeout=5)
        assert peeked is not None
        assert peeked.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert peeked.timestamp is not None
        assert abs(peeked.timestamp.timestamp() - time.time()) < 60
        await peeked.nack(requeue=True)
        await channel.default_exchange.publish(aio_pika.Message(b"{}"), routing_key="other")
    assert len(spans.named("publish other")) == 1

    received: list[tuple[dict[str, Any], str]] = []

    async def handle(body: dict[str, Any], headers: dict[str, str]) -> None:
        received.append((body, headers["x-source"]))

    async with consuming(broker, queue_name, handle):
        await eventually(lambda: received, 10, "the delivery")
        await eventually(lambda: spans.named(f"process {queue_name}"), 5, "the consumer span")
        await eventually_async(
            lambda: _stats_is(broker, queue_name, QueueStats(queue_name, 0, None, None)),
            10,
            "the ack",
        )
    assert received == [({"booking_id": "b-9"}, "test")]
    (producer,) = spans.named(f"publish {queue_name}")
    (consumer,) = spans.named(f"process {queue_name}")
    assert consumer.parent is not None
    assert (producer.context.trace_id, producer.context.span_id) == (
        consumer.context.trace_id,
        consumer.parent.span_id,
    )
    assert consumer.attributes["messaging.system"] == "rabbitmq"
    await broker.close()


@pytest.mark.real("rabbitmq")
async def test_rabbitmq_redelivers_after_a_handler_error_and_a_killed_consumer(
    amqp_url: str, queue_name: str, tmp_path: Path
) -> None:
    """A handler exception nacks the message back; a consumer process killed with SIGKILL
    mid-message loses its connection and RabbitMQ hands the message to the next one."""
    broker = RabbitBroker(amqp_url, redelivery_delay_s=0.1)
    await broker.publish(queue_name, {"n": 1}, {})
    attempts: list[dict[str, Any]] = []

    async def flaky(body: dict[str, Any], _: dict[str, str]) -> None:
        attempts.append(body)
        if len(attempts) == 1:
            raise RuntimeError("SMS gateway unreachable")

    async with consuming(broker, queue_name, flaky):
        await eventually(lambda: len(attempts) == 2, 10, "the redelivery")
    assert attempts == [{"n": 1}, {"n": 1}]

    await broker.publish(queue_name, {"n": 2}, {})
    held = tmp_path / "held.jsonl"
    env = {"BUSLINE_AMQP_URL": amqp_url, "BUSLINE_STATE": str(tmp_path / "state")}
    first = spawn(CONSUMER, queue_name, str(held), "hang", log=tmp_path / "first.log", **env)
    received: list[dict[str, Any]] = []

    async def handle(body: dict[str, Any], _: dict[str, str]) -> None:
        received.append(body)

    try:
        await eventually(lambda: lines(held), 20, "the first consumer to take the message")
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=10)
        async with consuming(broker, queue_name, handle):
            await eventually(lambda: received, 5, "the redelivery to a new consumer")
        assert received == [{"n": 2}]
    finally:
        stop(first)
        await broker.close()
