"""Message queues: one asyncio `Broker` interface, two brokers behind it.

- **RabbitMQ** (`BUSLINE_AMQP_URL` set), through aio-pika, in `busline.rabbit`: durable
  classic queues, persistent messages carrying an AMQP `timestamp` (so
  `rabbitmq_prometheus` can report the head message's age), publisher confirms, manual
  acks, a prefetch window, and a `nack` with requeue when a handler raises. A consumer
  whose connection drops reconnects with backoff; RabbitMQ redelivers what it had not
  acked. `RabbitBroker` is importable from here too; `busline.rabbit` is loaded on first use.
- **Embedded** (the default): one SQLite file, `$BUSLINE_STATE/queue/broker.sqlite` (WAL,
  busy timeout, synchronous=FULL), shared by every process of the platform: ticketing
  publishes, the notifier consumes, the supervisor reads the depth. A consumer claims a
  message with a lease (a visibility timeout, 30 s by default) tagged with its
  `host/pid/random` id and renews it while the handler runs; an ack deletes the message;
  a handler that raises releases it for redelivery after a short backoff (its delivery
  count grows). A consumer killed with `kill -9` leaves its leases behind: another
  consumer takes them back as soon as it sees that the owner's pid (on this host) is
  dead, or when the lease expires. The depth survives a restart: it is a file.

Spans. Every message gets exactly one PRODUCER span (`publish <queue>`) and one CONSUMER
span (`process <queue>`) on either broker, opened here with `lookout.sdk.publishing` and
`lookout.sdk.processing`; the consumer continues the producer's trace from the message
headers. So that aio-pika's own instrumentation (which `lookout.sdk.init` patches into
`Exchange.publish` and `Queue.consume`) does not add a second span, the RabbitMQ broker
publishes and consumes on the underlying aiormq channel. Callers do not wrap `publish` in
`lookout.sdk.publishing`; if one does anyway (the current span is a PRODUCER span for the
same queue), `publish` reuses that span rather than opening another. When no span is
current, a `traceparent` in the `headers` given to `publish` is the producer span's
parent: an outbox relay passes the context it stored with the row (`trace_headers()`
captures it) and the message continues the trace that wrote the row.

Stats. `stats(queue)` answers `QueueStats(ready, unacked, head_timestamp)` with RabbitMQ's
meanings: `ready` counts the messages waiting for a consumer, `unacked` those delivered and
not yet acked, `head_timestamp` is the enqueue time (epoch seconds) of the oldest *ready*
message, or None when none is waiting. The embedded broker answers all three from its
file; the supervisor calls the module's `stats_sync(queue)`, which needs no event loop and
writes nothing, and exports them under RabbitMQ's metric names. On RabbitMQ, `ready` comes
from a passive queue declare, and `unacked` and `head_timestamp` are None: the broker's
own `rabbitmq_prometheus` plugin exports `rabbitmq_queue_messages_unacked` and
`rabbitmq_queue_head_message_timestamp`, from the broker rather than from a client.

Limits. A body must be a JSON object of at most 256 KiB (with its headers); anything else
raises `ValueError` naming the queue, the problem and the fix.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import secrets
import socket
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from busline import kit
from lookout import sdk

if TYPE_CHECKING:
    from busline.rabbit import RabbitBroker

__all__ = [
    "MAX_MESSAGE_BYTES",
    "Broker",
    "BrokerError",
    "EmbeddedBroker",
    "Handler",
    "QueueStats",
    "RabbitBroker",
    "open_broker",
    "stats_sync",
    "trace_headers",
]

log = sdk.get_logger("busline.queue")

#: The largest message (JSON body plus headers, UTF-8) either broker takes.
MAX_MESSAGE_BYTES = 256 * 1024

#: How the handler of one message is called: `(body, headers)`; returning acks it.
Handler = Callable[[dict[str, Any], dict[str, str]], Awaitable[None]]

_QUEUE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,199}")
_TRACEPARENT = "traceparent"


@dataclass(frozen=True)
class QueueStats:
    """A queue's depth as its broker sees it (RabbitMQ's meanings; see the module doc)."""

    queue: str
    ready: int
    unacked: int | None
    head_timestamp: float | None


class BrokerError(Exception):
    """The broker did not take a message (a publisher-confirm nack, or it was returned)."""


class Broker(Protocol):
    """What ticketing publishes to and the notifier consumes from."""

    #: `messaging.system` on the spans: "rabbitmq" or "busline_sqlite".
    system: str

    async def publish(self, queue: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        """Send one message durably; returns once the broker has it."""
        ...

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 10) -> None:
        """Deliver messages to `handler` (up to `prefetch` at once) until cancelled (or the
        broker is closed): ack when it returns, redeliver when it raises or the consumer
        dies. When cancelled, it takes no new message, lets the running handlers finish
        (bounded), then raises CancelledError."""
        ...

    async def stats(self, queue: str) -> QueueStats: ...

    async def close(self) -> None: ...


def open_broker(service: str) -> Broker:
    """RabbitMQ when `BUSLINE_AMQP_URL` is set, else the embedded queue in the state dir."""
    url = os.environ.get("BUSLINE_AMQP_URL", "").strip()
    if url:
        from busline import rabbit  # lazily: busline.rabbit imports this module

        return rabbit.RabbitBroker(url, connection_name=service)
    return EmbeddedBroker()


if not TYPE_CHECKING:  # at run time only: mypy types RabbitBroker from the import above

    def __getattr__(name: str) -> Any:
        """`RabbitBroker` and its redelivery delay, from `busline.rabbit` on first use."""
        if name in ("RabbitBroker", "RABBIT_REDELIVERY_DELAY_S"):
            from busline import rabbit

            return getattr(rabbit, name)
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def trace_headers() -> dict[str, str]:
    """The current trace context as message headers (`traceparent`, `tracestate`), to
    store with an outbox row and give to `publish` later; empty when no span is current."""
    carrier: dict[str, str] = {}
    if trace.get_current_span().get_span_context().is_valid:
        TraceContextTextMapPropagator().inject(carrier)
    return carrier


# ---------------------------------------------------------------- validation and spans


def _check_queue(queue: object) -> str:
    if not isinstance(queue, str) or not _QUEUE_NAME.fullmatch(queue):
        raise ValueError(
            f"Queue name {queue!r} is not valid. Expected 1-200 characters of letters, "
            "digits, '.', '_', ':' or '-', starting with a letter or digit."
        )
    if queue.startswith("amq."):
        raise ValueError(f"Queue name {queue!r} starts with 'amq.', which RabbitMQ reserves.")
    return queue


def _check_prefetch(prefetch: object) -> int:
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or not 1 <= prefetch <= 1000:
        raise ValueError(f"prefetch {prefetch!r} is not valid. Expected an integer 1-1000.")
    return prefetch


def encode_message(
    queue: str, body: Mapping[str, Any], headers: Mapping[str, str]
) -> tuple[bytes, dict[str, str]]:
    """The body as compact UTF-8 JSON and a copy of the headers, or `ValueError` naming
    the queue and what is wrong (not a JSON object, not serialisable, too large)."""
    _check_queue(queue)
    if not isinstance(body, Mapping):
        raise ValueError(  # noqa: TRY004 - every bad message is a ValueError for callers
            f"Message body for queue {queue!r} is a {type(body).__name__}. "
            "Expected a JSON object (a dict)."
        )
    if not isinstance(headers, Mapping):
        raise ValueError(  # noqa: TRY004 - every bad message is a ValueError for callers
            f"Message headers for queue {queue!r} are a {type(headers).__name__}. "
            "Expected a dict of strings."
        )
    copied: dict[str, str] = {}
    for key, value in headers.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise ValueError(  # noqa: TRY004 - every bad message is a ValueError for callers
                f"Message header {key!r}={value!r} for queue {queue!r} is not text. "
                "Expected string keys and string values."
            )
        copied[key] = value
    try:
        payload = json.dumps(
            dict(body), separators=(",", ":"), ensure_ascii=False, allow_nan=False
        ).encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"Message body for queue {queue!r} is not JSON-serialisable: {exc}. "
            "Send only dicts, lists, strings, finite numbers, booleans and None."
        ) from None
    size = len(payload) + sum(len(k.encode()) + len(v.encode()) for k, v in copied.items())
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(
            f"Message for queue {queue!r} is {size} bytes. Expected at most "
            f"{MAX_MESSAGE_BYTES} bytes (256 KiB): send a reference to large data instead."
        )
    return payload, copied


def _decode_body(payload: bytes | str) -> dict[str, Any]:
    value = json.loads(payload)
    if not isinstance(value, dict):
        raise ValueError(  # noqa: TRY004 - json.loads' own failures are ValueErrors too
            f"message body is a {type(value).__name__}, not a JSON object"
        )
    return value


def _text_headers(raw: Mapping[str, Any] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in (raw or {}).items():
        text = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
        if isinstance(text, str):
            out[str(key)] = text
    return out


def _producing(queue: str) -> bool:
    """Whether the current span is already a PRODUCER span for `queue` (the caller
    wrapped `publish` in `lookout.sdk.publishing`)."""
    span = trace.get_current_span()
    if not span.is_recording() or getattr(span, "kind", None) is not SpanKind.PRODUCER:
        return False
    attributes = getattr(span, "attributes", None) or {}
    return bool(attributes.get("messaging.destination.name") == queue)


@contextlib.contextmanager
def _producer_span(queue: str, headers: dict[str, str], system: str) -> Iterator[None]:
    """Exactly one PRODUCER span around sending one message; writes its context into
    `headers`. Its parent is the current span, else the `traceparent` in `headers`."""
    if _producing(queue):
        yield
        return
    token = None
    if _TRACEPARENT in headers and not trace.get_current_span().get_span_context().is_valid:
        parent = TraceContextTextMapPropagator().extract(headers)
        token = otel_context.attach(parent)
    try:
        with sdk.publishing(queue, headers, system=system):
            yield
    finally:
        if token is not None:
            otel_context.detach(token)


async def _process(
    queue: str,
    handler: Handler,
    *,
    system: str,
    message_id: str,
    body: dict[str, Any],
    headers: dict[str, str],
    **failure: Any,
) -> None:
    """Run `handler` in the message's CONSUMER span. A failure is logged inside the span
    (so the line carries the trace), marked on it, and re-raised."""
    with sdk.processing(queue, headers, system=system) as span:
        if message_id:
            span.set_attribute("messaging.message.id", message_id)
        try:
            await handler(body, headers)
        except Exception as exc:
            log.warning(
                "message_handler_failed",
                queue=queue,
                message_id=message_id,
                error_type=type(exc).__qualname__,
                error=str(exc)[:300],
                **failure,
            )
            raise


async def _drain(running: set[asyncio.Task[None]], timeout_s: float) -> None:
    """Let the running handlers finish, at most `timeout_s`; cancel the rest."""
    if not running:
        return
    _, pending = await asyncio.wait(set(running), timeout=timeout_s)
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5.0)


# ---------------------------------------------------------------- the embedded broker

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        queue TEXT NOT NULL,
        body TEXT NOT NULL,
        headers TEXT NOT NULL,
        enqueued_at REAL NOT NULL,
        delivery_count INTEGER NOT NULL DEFAULT 0,
        lease_owner TEXT,
        lease_until REAL
    )""",
    "CREATE INDEX IF NOT EXISTS messages_by_queue ON messages (queue, id)",
    "CREATE INDEX IF NOT EXISTS messages_by_owner ON messages (lease_owner)",
    "CREATE TABLE IF NOT EXISTS queues (name TEXT PRIMARY KEY, declared_at REAL NOT NULL)",
)

_BUSY_TIMEOUT_MS = 10_000


@dataclass(frozen=True)
class _Claimed:
    id: int
    body: dict[str, Any]
    headers: dict[str, str]
    enqueued_at: float
    delivery_count: int


def _owner_pid(owner: str, host: str) -> int | None:
    """The pid of a lease owner `host/pid/random` on this host, else None."""
    parts = owner.rsplit("/", 2)
    if len(parts) != 3 or parts[0] != host:
        return None
    try:
        return int(parts[1])
    except ValueError:
        return None


def _pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, killed but not yet reaped, is dead)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc (macOS): the signal check is all there is
    fields = stat.rsplit(")", 1)[-1].split()
    return not fields or fields[0] not in ("Z", "X")


def _retry_delay_s(delivery_count: int) -> float:
    """Backoff before a failed message is offered again: 0.25 s, doubling, at most 30 s."""
    return float(min(0.25 * 2 ** max(delivery_count - 1, 0), 30.0))


def _read_stats(db: sqlite3.Connection, queue: str, now: float) -> QueueStats:
    total, unacked, head = db.execute(
        "SELECT COUNT(*), "
        "COALESCE(SUM(lease_owner IS NOT NULL AND lease_until > :now), 0), "
        "MIN(CASE WHEN lease_owner IS NULL OR lease_until IS NULL "
        "OR lease_until <= :now THEN enqueued_at END) "
        "FROM messages WHERE queue = :queue",
        {"now": now, "queue": queue},
    ).fetchone()
    return QueueStats(
        queue=queue,
        ready=int(total) - int(unacked),
        unacked=int(unacked),
        head_timestamp=None if head is None else float(head),
    )


def stats_sync(queue: str, path: Path | None = None) -> QueueStats:
    """The embedded queue's stats read from its file without an event loop and without
    writing to it (the supervisor's exporter calls this every few seconds); all zero
    while no process has created the file yet."""
    _check_queue(queue)
    path = path or kit.state_dir() / "queue" / "broker.sqlite"
    if not path.exists():
        return QueueStats(queue=queue, ready=0, unacked=0, head_timestamp=None)
    db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    try:
        db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        try:
            return _read_stats(db, queue, time.time())
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):
                raise
            return QueueStats(queue=queue, ready=0, unacked=0, head_timestamp=None)
    finally:
        db.close()


class EmbeddedBroker:
    """The durable queue in one SQLite file, shared across processes (see the module doc)."""

    system = "busline_sqlite"

    def __init__(
        self,
        path: Path | None = None,
        *,
        lease_s: float = 30.0,
        poll_s: float = 0.1,
        max_poll_s: float = 0.5,
        drain_s: float = 10.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = path or kit.state_dir() / "queue" / "broker.sqlite"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lease_s = lease_s
        self.poll_s = poll_s
        self.max_poll_s = max_poll_s
        self.drain_s = drain_s
        self._clock = clock
        self._host = socket.gethostname()
        #: Lease owner id of this broker's consumers: host/pid/random.
        self.owner = f"{self._host}/{os.getpid()}/{secrets.token_hex(4)}"
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = sqlite3.connect(
            self.path,
            timeout=_BUSY_TIMEOUT_MS / 1000,
            isolation_level=None,
            check_same_thread=False,
        )
        self._db.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        with self._transaction() as db:
            for statement in _SCHEMA:
                db.execute(statement)

    # -- the SQLite side (sync; the async API runs it with asyncio.to_thread)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            if self._db is None:
                raise RuntimeError(f"the queue broker at {self.path} is closed")
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            db.execute("COMMIT")

    def _declare(self, queue: str) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO queues (name, declared_at) VALUES (?, ?)",
                (queue, self._clock()),
            )

    def _insert(self, queue: str, payload: bytes, headers: dict[str, str]) -> int:
        now = self._clock()
        with self._transaction() as db:
            db.execute(
                "INSERT OR IGNORE INTO queues (name, declared_at) VALUES (?, ?)", (queue, now)
            )
            cursor = db.execute(
                "INSERT INTO messages (queue, body, headers, enqueued_at) VALUES (?, ?, ?, ?)",
                (queue, payload.decode("utf-8"), json.dumps(headers), now),
            )
            return int(cursor.lastrowid or 0)

    def _reclaim_dead(self, db: sqlite3.Connection) -> None:
        """Release the leases of consumers on this host whose process is gone."""
        owners = [
            str(row[0])
            for row in db.execute(
                "SELECT DISTINCT lease_owner FROM messages "
                "WHERE lease_owner IS NOT NULL AND lease_owner != ?",
                (self.owner,),
            )
        ]
        for owner in owners:
            pid = _owner_pid(owner, self._host)
            if pid is None or pid == os.getpid() or _pid_alive(pid):
                continue
            cursor = db.execute(
                "UPDATE messages SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
                (owner,),
            )
            log.warning("queue_leases_reclaimed", owner_pid=pid, messages=cursor.rowcount)

    def _claim(self, queue: str, limit: int) -> list[_Claimed]:
        now = self._clock()
        with self._transaction() as db:
            self._reclaim_dead(db)
            rows = db.execute(
                "SELECT id, body, headers, enqueued_at, delivery_count FROM messages "
                "WHERE queue = ? AND (lease_until IS NULL OR lease_until <= ?) "
                "ORDER BY id LIMIT ?",
                (queue, now, limit),
            ).fetchall()
            db.executemany(
                "UPDATE messages SET lease_owner = ?, lease_until = ?, "
                "delivery_count = delivery_count + 1 WHERE id = ?",
                [(self.owner, now + self.lease_s, row[0]) for row in rows],
            )
        claimed = []
        for row in rows:
            try:
                claimed.append(
                    _Claimed(
                        id=int(row[0]),
                        body=_decode_body(row[1]),
                        headers=_text_headers(json.loads(row[2])),
                        enqueued_at=float(row[3]),
                        delivery_count=int(row[4]) + 1,
                    )
                )
            except (ValueError, TypeError, RecursionError) as exc:
                # Publish checks every message, so only a damaged file gets here: a row no
                # consumer can ever read would stop the queue. Drop it, loudly.
                log.error(  # noqa: TRY400 - the row is the news, not a traceback
                    "queue_message_unreadable", queue=queue, message_id=row[0], error=str(exc)
                )
                self._ack(int(row[0]))
        return claimed

    def _ack(self, message_id: int) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM messages WHERE id = ?", (message_id,))

    def _release(self, message_id: int, delay_s: float) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE messages SET lease_owner = NULL, lease_until = ? "
                "WHERE id = ? AND lease_owner = ?",
                (self._clock() + delay_s if delay_s > 0 else None, message_id, self.owner),
            )

    def _renew(self) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE messages SET lease_until = ? WHERE lease_owner = ?",
                (self._clock() + self.lease_s, self.owner),
            )

    def stats_sync(self, queue: str) -> QueueStats:
        """`stats` without an event loop."""
        _check_queue(queue)
        with self._lock:
            if self._db is None:
                raise RuntimeError(f"the queue broker at {self.path} is closed")
            return _read_stats(self._db, queue, self._clock())

    def queues_sync(self) -> list[str]:
        """Every queue published to or consumed from, by name (for the exporter)."""
        with self._lock:
            if self._db is None:
                raise RuntimeError(f"the queue broker at {self.path} is closed")
            rows = self._db.execute("SELECT name FROM queues ORDER BY name").fetchall()
        return [str(row[0]) for row in rows]

    def close_sync(self) -> None:
        """Give back this broker's leases and close the file (idempotent)."""
        with self._lock:
            db, self._db = self._db, None
        if db is None:
            return
        try:
            db.execute(
                "UPDATE messages SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = ?",
                (self.owner,),
            )
        finally:
            db.close()

    # -- the Broker interface

    async def publish(self, queue: str, body: dict[str, Any], headers: dict[str, str]) -> None:
        payload, outgoing = encode_message(queue, body, headers)
        with _producer_span(queue, outgoing, self.system):
            await asyncio.to_thread(self._insert, queue, payload, outgoing)

    async def consume(self, queue: str, handler: Handler, *, prefetch: int = 10) -> None:
        _check_queue(queue)
        _check_prefetch(prefetch)
        await asyncio.to_thread(self._declare, queue)
        running: set[asyncio.Task[None]] = set()
        idle_s = self.poll_s
        renew_every = self.lease_s / 3
        renew_at = time.monotonic() + renew_every
        try:
            while self._db is not None:
                try:
                    claimed = await self._claim_safely(queue, prefetch - len(running))
                except sqlite3.OperationalError as exc:
                    # The file is busy past its timeout (or briefly unreadable): a consumer
                    # waits and tries again, it never stops.
                    log.warning("queue_claim_failed", queue=queue, error=str(exc))
                    await asyncio.sleep(min(5.0, idle_s * 4))
                    continue
                for message in claimed:
                    task = asyncio.create_task(self._deliver(queue, message, handler))
                    running.add(task)
                    task.add_done_callback(running.discard)
                if running and time.monotonic() >= renew_at:
                    try:
                        await asyncio.to_thread(self._renew)
                    except sqlite3.OperationalError as exc:
                        log.warning("queue_lease_renewal_failed", queue=queue, error=str(exc))
                    renew_at = time.monotonic() + renew_every
                if claimed:
                    idle_s = self.poll_s
                    if len(running) < prefetch:
                        continue
                if running:
                    await asyncio.wait(
                        set(running), timeout=idle_s, return_when=asyncio.FIRST_COMPLETED
                    )
                else:
                    await asyncio.sleep(idle_s)
                if not claimed:
                    idle_s = min(idle_s * 1.5, self.max_poll_s)
        except asyncio.CancelledError:
            await _drain(running, self.drain_s)
            raise

    async def _claim_safely(self, queue: str, limit: int) -> list[_Claimed]:
        """Claim up to `limit` messages; if cancelled meanwhile, give back what the
        (uncancellable) SQLite thread claimed before re-raising."""
        if limit <= 0:
            return []
        claim = asyncio.ensure_future(asyncio.to_thread(self._claim, queue, limit))
        try:
            return await asyncio.shield(claim)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                for message in await claim:
                    await asyncio.to_thread(self._release, message.id, 0.0)
            raise

    async def _deliver(self, queue: str, message: _Claimed, handler: Handler) -> None:
        delay = _retry_delay_s(message.delivery_count)
        try:
            await _process(
                queue,
                handler,
                system=self.system,
                message_id=str(message.id),
                body=message.body,
                headers=message.headers,
                delivery_count=message.delivery_count,
                retry_in_s=delay,
            )
        except asyncio.CancelledError:
            await asyncio.to_thread(self._release, message.id, 0.0)
            raise
        except Exception:  # noqa: BLE001 - any handler failure means redelivery (logged)
            await asyncio.to_thread(self._release, message.id, delay)
        else:
            await asyncio.to_thread(self._ack, message.id)

    async def stats(self, queue: str) -> QueueStats:
        return await asyncio.to_thread(self.stats_sync, queue)

    async def close(self) -> None:
        await asyncio.to_thread(self.close_sync)
