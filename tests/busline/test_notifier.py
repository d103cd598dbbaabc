"""busline.notifier as a real process: one SMS per confirmed booking through a real HTTP
SMS-gateway stand-in, exactly once from the customer's side, continuing the trace."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from busline import kit, notifier
from busline.queue import EmbeddedBroker, QueueStats, RabbitBroker
from lookout import sdk
from lookout.sdk import testing
from tests.busline.conftest import Platform, Proc
from tests.support import http_peer, wait_until

PHONE = "254712345678"
SPAN_KIND_CLIENT = 3
SPAN_KIND_CONSUMER = 5


@dataclass
class Gateway:
    """A real HTTP SMS gateway stand-in on the providers' host (127.0.0.2): it records
    every request, delivers each `client_ref` once, and can fail or be slow on demand."""

    url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)
    delivered: list[dict[str, Any]] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    delay_s: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def refs(self, of: list[dict[str, Any]]) -> list[str]:
        with self.lock:
            return [str(item["body"]["client_ref"]) for item in of]


def _handler(gateway: Gateway) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("content-length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            headers = {k.lower(): v for k, v in self.headers.items()}
            ref = str(body.get("client_ref"))
            with gateway.lock:
                gateway.requests.append({"path": self.path, "body": body, "headers": headers})
                failing = gateway.failures.get(ref, 0)
                replayed = ref in [str(d["body"]["client_ref"]) for d in gateway.delivered]
                if failing:
                    gateway.failures[ref] = failing - 1
                elif not replayed:
                    gateway.delivered.append({"body": body})
                delay = gateway.delay_s
            if self.path != "/sms/v1/messages":
                self._answer(404, {"error": "not_found"})
                return
            if failing:
                self._answer(503, {"error": "gateway_busy"})
                return
            time.sleep(delay)
            # As the real gateway (busline.providers): a repeated client_ref is not sent again.
            self._answer(201, {"message_id": f"sms-{ref}"}, replayed=replayed)

        def _answer(self, status: int, payload: dict[str, Any], replayed: bool = False) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            if replayed:
                self.send_header("Idempotent-Replayed", "true")
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *_: Any) -> None:
            return

    return Handler


@pytest.fixture
def gateway(platform: Platform) -> Iterator[Gateway]:
    """The stand-in, announced in the SMS gateway's port file `run/sms.json` in the shape
    `kit.report_listening` writes, so the notifier finds it with `kit.url_of`."""
    stand_in = Gateway()
    server = ThreadingHTTPServer(("127.0.0.2", 0), _handler(stand_in))
    host, port = server.server_address[:2]
    stand_in.url = f"http://{host}:{port}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    run = platform.state / "run"
    run.mkdir(parents=True, exist_ok=True)
    kit.write_atomically(
        run / "sms.json",
        {
            "service": "sms",
            "host": host,
            "port": port,
            "pid": os.getpid(),
            "version": "test",
            "started_at": time.time(),
        },
    )
    try:
        yield stand_in
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def spans() -> Iterator[testing.CapturedSpans]:
    """The SDK initialised in the test process (the publisher), its spans captured."""
    previous = signal.getsignal(signal.SIGTERM)
    testing.fresh_registry()
    sdk.init(service="ticketing-test", metrics_addr="off", traces_exporter="none", environ={})
    try:
        with testing.capture_spans() as captured:
            yield captured
    finally:
        testing.reset()
        signal.signal(signal.SIGTERM, previous)


def confirmation(booking: str, **fields: Any) -> dict[str, Any]:
    return {
        "event_id": f"evt-{uuid.uuid4().hex[:12]}",
        "booking_id": booking,
        "phone": PHONE,
        "route_id": "nairobi-mombasa",
        "seat": 12,
        "departs_at": "2026-12-01T08:00:00+03:00",
        "amount_kes": 1500,
        **fields,
    }


def broker_of(platform: Platform) -> EmbeddedBroker:
    return EmbeddedBroker(platform.state / "queue" / "broker.sqlite")


def publish(platform: Platform, *bodies: dict[str, Any]) -> None:
    """Publish as ticketing's relay does (the broker opens the PRODUCER span)."""

    async def send() -> None:
        broker = broker_of(platform)
        try:
            for body in bodies:
                await broker.publish(notifier.QUEUE, body, {})
        finally:
            await broker.close()

    asyncio.run(send())


def depth(platform: Platform) -> QueueStats:
    broker = broker_of(platform)
    try:
        return broker.stats_sync(notifier.QUEUE)
    finally:
        broker.close_sync()


def start_notifier(platform: Platform, **env: str) -> Proc:
    proc = platform.start("notifier", **env)

    def started() -> bool:
        if proc.process.poll() is not None:
            raise AssertionError("notifier exited early:\n" + "\n".join(proc.lines))
        return any(line.get("event") == "notifier_started" for line in proc.json_lines())

    wait_until(started, 30.0, "the notifier to start")
    return proc


def events(proc: Proc, name: str) -> list[dict[str, Any]]:
    return [line for line in proc.json_lines() if line.get("event") == name]


def sent_counts(proc: Proc) -> dict[str, float]:
    """`notifications_sent_total{channel="sms"}` by result, scraped from the notifier."""
    (started,) = events(proc, "lookout_sdk_started")
    text = httpx.get(str(started["metrics_url"]), timeout=5).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "notifications_sent_total" and sample.labels["channel"] == "sms":
                out[sample.labels["result"]] = sample.value
    return out


# ---------------------------------------------------------------- the message


def test_a_confirmation_is_checked_and_worded_for_the_customer() -> None:
    """Phones normalise to 2547XXXXXXXX and mask as 2547****5678; only the event, booking
    and phone are needed; a missing or malformed field is named."""
    parsed = notifier.parse_confirmation(confirmation("bk-1", phone="0712 345 678"))
    assert parsed.phone == PHONE
    assert kit.mask_phone(PHONE) == "2547****5678"
    assert parsed.sms_text() == (
        "Busline: booking bk-1 is confirmed. Nairobi to Mombasa, seat 12, departs "
        "2026-12-01T08:00:00+03:00. Paid KES 1,500. Safe travels!"
    )
    bare = {"event_id": "evt-1", "booking_id": "bk-2", "phone": PHONE, "departs_at": None}
    assert notifier.parse_confirmation(bare).sms_text() == (
        "Busline: booking bk-2 is confirmed. Safe travels!"
    )
    for bad, name in [
        ({"phone": "12345"}, "phone"),
        ({"event_id": None}, "event_id"),
        ({"amount_kes": -1}, "amount_kes"),
        ({"seat": True}, "seat"),
        ({"booking_id": "has spaces"}, "booking_id"),
    ]:
        with pytest.raises(kit.Invalid) as caught:
            notifier.parse_confirmation({**confirmation("bk-1"), **bad})
        assert caught.value.field == name


# ---------------------------------------------------------------- the worker


def test_a_confirmation_sends_exactly_one_sms_and_continues_the_trace(
    platform: Platform, gateway: Gateway, spans: testing.CapturedSpans
) -> None:
    """One message: one SMS at the gateway (client_ref = event_id), no trace header sent
    to the gateway (it is outside), the notifier's CONSUMER span a child of the
    publisher's PRODUCER span with the gateway call inside it, `sms_sent` logged with
    a masked phone, and `notifications_sent_total{result="sent"}` = 1."""
    body = confirmation("bk-trace")
    with sdk.tracer().start_as_current_span("confirm booking"):
        publish(platform, body)
    (producer,) = spans.named(f"publish {notifier.QUEUE}")
    trace_id = f"{producer.context.trace_id:032x}"
    producer_id = f"{producer.context.span_id:016x}"

    with http_peer() as (sink, recorder):
        proc = start_notifier(
            platform,
            OTEL_TRACES_EXPORTER="otlp",
            OTEL_EXPORTER_OTLP_ENDPOINT=sink,
            OTEL_BSP_SCHEDULE_DELAY="100",
            LOOKOUT_SCRUB="false",  # the masked phone is the notifier's own doing
        )
        wait_until(lambda: gateway.delivered, 15, "the SMS")
        wait_until(lambda: events(proc, "sms_sent"), 10, "sms_sent")

        def exported() -> list[Any]:
            with recorder.lock:
                return [s for s in recorder.spans if s.trace_id == trace_id]

        wait_until(lambda: [s for s in exported() if s.kind == SPAN_KIND_CONSUMER], 10, "the span")
        wait_until(lambda: depth(platform) == QueueStats(notifier.QUEUE, 0, 0, None), 5, "ack")

    assert gateway.refs(gateway.requests) == [body["event_id"]]
    (request,) = gateway.requests
    assert request["body"]["to"] == PHONE
    assert "traceparent" not in request["headers"]
    consumers = [s for s in exported() if s.kind == SPAN_KIND_CONSUMER]
    assert [(c.service, c.name, c.parent_span_id) for c in consumers] == [
        ("notifier", f"process {notifier.QUEUE}", producer_id)
    ]
    calls = [s for s in exported() if s.kind == SPAN_KIND_CLIENT and s.name.startswith("POST")]
    assert [c.parent_span_id for c in calls] == [consumers[0].span_id]
    (sent,) = events(proc, "sms_sent")
    assert (sent["booking_id"], sent["phone"], sent["trace_id"]) == (
        "bk-trace",
        "2547****5678",
        trace_id,
    )
    assert not [line for line in proc.lines if PHONE in line]
    assert sent_counts(proc) == {"sent": 1.0}


def test_confirmations_wait_in_the_queue_while_the_notifier_is_down(
    platform: Platform, gateway: Gateway
) -> None:
    """With no notifier the depth grows (and the oldest message's age shows); started,
    it sends every waiting confirmation once and the depth drops to zero."""
    bodies = [confirmation(f"bk-{n}") for n in range(3)]
    publish(platform, bodies[0])
    assert depth(platform).ready == 1
    publish(platform, *bodies[1:])
    waiting = depth(platform)
    assert (waiting.ready, waiting.unacked) == (3, 0)
    assert waiting.head_timestamp is not None
    assert gateway.requests == []

    proc = start_notifier(platform)
    wait_until(lambda: len(gateway.delivered) == 3, 15, "three SMS")
    wait_until(lambda: depth(platform) == QueueStats(notifier.QUEUE, 0, 0, None), 5, "acks")
    assert sorted(gateway.refs(gateway.delivered)) == sorted(b["event_id"] for b in bodies)
    assert len(gateway.requests) == 3
    wait_until(lambda: sent_counts(proc) == {"sent": 3.0}, 5, "the counter")


def test_a_failing_send_is_retried_without_holding_the_others(
    platform: Platform, gateway: Gateway
) -> None:
    """The gateway answers 503 twice for one message: it is redelivered and sent once,
    while the messages behind it go out meanwhile. A malformed message is acked and
    counted `invalid`, not redelivered."""
    stuck, others = confirmation("bk-stuck"), [confirmation("bk-a"), confirmation("bk-b")]
    gateway.failures[stuck["event_id"]] = 2
    publish(platform, stuck, *others, confirmation("bk-bad", phone="not a phone"))
    proc = start_notifier(platform)
    wait_until(lambda: len(gateway.delivered) == 3, 20, "three SMS")
    wait_until(lambda: depth(platform) == QueueStats(notifier.QUEUE, 0, 0, None), 5, "acks")
    delivered = gateway.refs(gateway.delivered)
    assert delivered[-1] == stuck["event_id"]
    assert sorted(delivered[:2]) == sorted(b["event_id"] for b in others)
    assert gateway.refs(gateway.requests).count(stuck["event_id"]) == 3
    wait_until(
        lambda: sent_counts(proc) == {"sent": 3.0, "failed": 2.0, "invalid": 1.0}, 5, "counts"
    )
    (invalid,) = events(proc, "notification_invalid")
    assert invalid["field"] == "phone"


def test_a_redelivered_message_already_sent_is_acked_without_a_call(
    platform: Platform, gateway: Gateway
) -> None:
    """The same event delivered again after it was sent (a relay that published twice)
    finds the notifier's own sent row: acked, counted `duplicate`, no gateway call."""
    body = confirmation("bk-dup")
    proc = start_notifier(platform)
    publish(platform, body)
    wait_until(lambda: events(proc, "sms_sent"), 15, "the first SMS")
    publish(platform, body)
    wait_until(lambda: events(proc, "sms_already_sent"), 15, "the duplicate")
    wait_until(lambda: depth(platform) == QueueStats(notifier.QUEUE, 0, 0, None), 5, "acks")
    assert gateway.refs(gateway.requests) == [body["event_id"]]
    assert gateway.refs(gateway.delivered) == [body["event_id"]]
    wait_until(lambda: sent_counts(proc) == {"sent": 1.0, "duplicate": 1.0}, 5, "counts")


def test_sigterm_finishes_the_current_sms_and_sigkill_relies_on_client_ref(
    platform: Platform, gateway: Gateway
) -> None:
    """SIGTERM mid-send: the SMS completes, the message is acked, exit status 0. SIGKILL
    mid-send (the negative control): the message stays unacked, the next notifier sends
    it again with the same client_ref, and the gateway still delivers it only once."""
    gateway.delay_s = 1.5
    calm = confirmation("bk-term")
    proc = start_notifier(platform)
    publish(platform, calm)
    wait_until(lambda: gateway.requests, 15, "the send to start")
    platform.stop("notifier", signal.SIGTERM)
    assert proc.process.returncode == 0, "\n".join(proc.lines)
    assert [e["event"] for e in proc.json_lines() if e["event"].startswith("sms_")] == ["sms_sent"]
    assert events(proc, "notifier_stopped")
    assert depth(platform) == QueueStats(notifier.QUEUE, 0, 0, None)

    killed = confirmation("bk-kill")
    proc = start_notifier(platform)
    publish(platform, killed)
    wait_until(lambda: killed["event_id"] in gateway.refs(gateway.requests), 15, "the send")
    platform.stop("notifier", signal.SIGKILL)
    assert depth(platform).unacked == 1
    gateway.delay_s = 0.0
    proc = start_notifier(platform)
    # The gateway had sent it before the kill: the redelivery is a replay, counted as such.
    wait_until(lambda: events(proc, "sms_already_sent"), 15, "the redelivered send")
    wait_until(lambda: sent_counts(proc) == {"duplicate": 1.0}, 5, "the replay counted")
    wait_until(lambda: depth(platform) == QueueStats(notifier.QUEUE, 0, 0, None), 5, "acks")
    sends = [calm["event_id"], killed["event_id"], killed["event_id"]]
    assert gateway.refs(gateway.requests) == sends
    assert gateway.refs(gateway.delivered) == [calm["event_id"], killed["event_id"]]


@pytest.mark.real("rabbitmq")
def test_on_rabbitmq_a_confirmation_sends_one_sms(
    platform: Platform, gateway: Gateway, amqp_url: str
) -> None:
    """With BUSLINE_AMQP_URL the notifier consumes from RabbitMQ: a confirmation waiting
    in the durable queue before it starts is sent once and acked."""
    import aio_pika

    body = confirmation("bk-rabbit")

    async def publish_on_rabbitmq() -> None:
        connection = await aio_pika.connect(amqp_url)
        async with connection:
            channel = await connection.channel()
            declared = await channel.declare_queue(notifier.QUEUE, durable=True)
            await declared.purge()  # the vhost is the session's: start from an empty queue
        broker = RabbitBroker(amqp_url)
        try:
            await broker.publish(notifier.QUEUE, body, {})
        finally:
            await broker.close()

    async def ready() -> int:
        broker = RabbitBroker(amqp_url)
        try:
            return (await broker.stats(notifier.QUEUE)).ready
        finally:
            await broker.close()

    asyncio.run(publish_on_rabbitmq())
    assert asyncio.run(ready()) == 1
    proc = start_notifier(platform, BUSLINE_AMQP_URL=amqp_url)
    wait_until(lambda: events(proc, "sms_sent"), 15, "the SMS")
    assert gateway.refs(gateway.requests) == [body["event_id"]]
    (started,) = events(proc, "notifier_started")
    assert started["broker"] == "rabbitmq"
    platform.stop("notifier", signal.SIGTERM)
    assert proc.process.returncode == 0, "\n".join(proc.lines)
    assert asyncio.run(ready()) == 0  # acked: an unacked message would be ready again now
