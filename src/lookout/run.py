"""`lookout run -- CMD`: the container log driver. Starts CMD and ships every line it writes
on stdout and stderr to the server, the way a container runtime's log driver would.

The child is never held up: its pipes are drained continuously by reader threads; lines wait
in a bounded buffer (the oldest are dropped and counted when the server stays down); a
shipper thread sends numbered batches with retries and backoff. Signals are forwarded to the
child, and the exit code is the child's own, or 128+N when signal N killed it.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

import httpx

from lookout.sdk._stdout import StdoutSink

FORWARDED = (
    signal.SIGTERM,
    signal.SIGINT,
    signal.SIGHUP,
    signal.SIGQUIT,
    signal.SIGUSR1,
    signal.SIGUSR2,
)
BUFFER_LINES = 50_000
BATCH_LINES = 1000
BATCH_WAIT_S = 0.2
FLUSH_AT_EXIT_S = 5.0
MAX_BACKOFF_S = 10.0
MAX_LINE_BYTES = 256 * 1024


@dataclass
class Line:
    ts_ns: int
    stream: str
    text: str


@dataclass
class RunOptions:
    command: Sequence[str]
    url: str
    token: str | None = None
    service: str | None = None
    echo: bool = True
    buffer_lines: int = BUFFER_LINES
    scrape: str | None = None  # "auto": the SDK's reported metrics address; or a URL
    exit_grace_s: float = FLUSH_AT_EXIT_S  # after the child exits, delivery retries this long


class MultilineJoiner:
    """Joins a Python traceback (and other indented continuations) into one record.

    A line starting with whitespace continues the record before it; after a
    `Traceback (most recent call last):` block, the first unindented line (the exception
    itself) is part of the record too.
    """

    QUIET_S = 0.2

    def __init__(self) -> None:
        self._pending: Line | None = None
        self._in_traceback = False
        self._fed_at = 0.0
        self.lock = threading.Lock()

    def feed(self, line: Line) -> Line | None:
        """Add a line; return a record that is now complete, if any."""
        with self.lock:
            self._fed_at = time.monotonic()
            return self._feed(line)

    def flush_if_quiet(self) -> Line | None:
        """The record in progress once its stream has been quiet a moment: a last line
        must not wait for the next one to be shipped."""
        with self.lock:
            if self._pending is not None and time.monotonic() - self._fed_at >= self.QUIET_S:
                return self._flush()
            return None

    def _feed(self, line: Line) -> Line | None:
        text = line.text
        pending = self._pending
        if pending is not None and (text[:1] in (" ", "\t") or self._exception_line(text)):
            pending.text += "\n" + text
            if self._in_traceback and text[:1] not in (" ", "\t"):
                self._in_traceback = False
                self._pending = None
                return pending
            return None
        self._pending = line
        self._in_traceback = text.startswith("Traceback (most recent call last)")
        return pending

    def _exception_line(self, text: str) -> bool:
        return self._in_traceback and bool(text) and text[:1] not in (" ", "\t")

    def flush(self) -> Line | None:
        with self.lock:
            return self._flush()

    def _flush(self) -> Line | None:
        pending, self._pending = self._pending, None
        self._in_traceback = False
        return pending


@dataclass
class Buffer:
    """Lines waiting to be shipped; full means the oldest are dropped, and counted."""

    capacity: int
    lines: collections.deque[Line] = field(default_factory=collections.deque)
    dropped: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    ready: threading.Event = field(default_factory=threading.Event)

    def put(self, line: Line) -> None:
        with self.lock:
            if len(self.lines) >= self.capacity:
                self.lines.popleft()
                self.dropped += 1
            self.lines.append(line)
            if len(self.lines) >= BATCH_LINES:
                self.ready.set()

    def take(self, most: int) -> tuple[list[Line], int]:
        with self.lock:
            count = min(most, len(self.lines))
            taken = [self.lines.popleft() for _ in range(count)]
            dropped, self.dropped = self.dropped, 0
            self.ready.clear()
            return taken, dropped

    def give_back(self, lines: list[Line], dropped: int) -> None:
        """Return an unsent batch to the front, still within the bound."""
        with self.lock:
            room = self.capacity - len(self.lines)
            keep = lines[-room:] if room > 0 else []
            self.dropped += dropped + len(lines) - len(keep)
            self.lines.extendleft(reversed(keep))

    def __len__(self) -> int:
        return len(self.lines)


class Shipper:
    """Sends numbered batches to `POST /api/lookout/lines`, retrying with backoff."""

    def __init__(
        self,
        options: RunOptions,
        buffer: Buffer,
        service: str,
        joiners: Sequence[MultilineJoiner] = (),
    ) -> None:
        self.options = options
        self.joiners = joiners
        self.buffer = buffer
        self.service = service
        self.source = uuid.uuid4().hex
        self.seq = 0
        headers = {"authorization": f"Bearer {options.token}"} if options.token else {}
        self.client = httpx.Client(timeout=5.0, headers=headers)
        self.endpoint = options.url.rstrip("/") + "/api/lookout/lines"
        self.stopping = threading.Event()
        self.give_up_at = 0.0  # set by stop(): when undeliverable lines are given up
        self.sent_lines = 0
        self.warned_at = 0.0

    def run(self) -> None:
        backoff = 0.25
        while True:
            self.buffer.ready.wait(BATCH_WAIT_S)
            for joiner in self.joiners:
                done = joiner.flush_if_quiet()
                if done is not None:
                    self.buffer.put(done)
            if not len(self.buffer) and not self.buffer.dropped:
                if self.stopping.is_set():
                    return
                continue
            lines, dropped = self.buffer.take(BATCH_LINES)
            if self._send(lines, dropped):
                backoff = 0.25
                continue
            self.buffer.give_back(lines, dropped)
            if self.stopping.is_set():
                # The child has exited: keep trying until the grace period is over (a
                # server that is only now coming up still gets the last lines).
                left = self.give_up_at - time.monotonic()
                if left <= 0:
                    return
                time.sleep(min(backoff, left, 0.5))
            else:
                self.stopping.wait(backoff)
            backoff = min(backoff * 2, MAX_BACKOFF_S)

    def stop(self, grace_s: float) -> None:
        """Deliver what is left, retrying for up to `grace_s`, then stop."""
        self.give_up_at = time.monotonic() + grace_s
        self.stopping.set()

    def _send(self, lines: list[Line], dropped: int) -> bool:
        body = {
            "source": self.source,
            "seq": self.seq,
            "service": self.service,
            "dropped": dropped,
            "lines": [{"ts_ns": x.ts_ns, "stream": x.stream, "text": x.text} for x in lines],
        }
        try:
            response = self.client.post(self.endpoint, json=body)
        except httpx.HTTPError as exc:
            self.warn(f"cannot reach {self.endpoint}: {exc}")
            return False
        if response.status_code >= 500 or response.status_code == 429:
            self.warn(f"{self.endpoint} answered {response.status_code}; retrying")
            return False
        if response.status_code >= 400:
            # The batch itself is at fault (a line too long ...): retrying cannot help.
            self.warn(f"{self.endpoint} refused a batch: {response.text[:200]}")
        self.seq += 1
        self.sent_lines += len(lines)
        return True

    def warn(self, message: str) -> None:
        now = time.monotonic()
        if now - self.warned_at >= 60:
            self.warned_at = now
            print(f"lookout run: {message}", file=sys.stderr, flush=True)


class ScrapeRegistrar:
    """Registers the child's metrics endpoint as a scrape target (`POST /api/targets`).

    With `--scrape auto` it waits for the SDK's `lookout_sdk_started` line, which reports
    `metrics_url`; with `--scrape URL` it registers that URL at once.
    """

    def __init__(self, shipper: Shipper, mode: str | None) -> None:
        self.shipper = shipper
        self.auto = mode == "auto"
        self.done = mode is None
        if mode not in (None, "auto"):
            self.register(mode)

    def watch(self, text: str) -> None:
        if self.done or not self.auto or "lookout_sdk_started" not in text:
            return
        try:
            url = json.loads(text).get("metrics_url")
        except (ValueError, AttributeError):
            return
        if isinstance(url, str) and url:
            self.register(url)

    def register(self, url: str) -> None:
        address, labels = scrape_target(url)
        body = {"job": self.shipper.service, "targets": [address],
                "labels": {**labels, "lookout_run_source": self.shipper.source}}  # fmt: skip
        endpoint = self.shipper.options.url.rstrip("/") + "/api/targets"
        try:
            response = self.shipper.client.post(endpoint, json=body)
        except httpx.HTTPError as exc:
            self.shipper.warn(f"cannot register scrape target {url}: {exc}")
            return
        self.done = response.status_code < 300
        if not self.done:
            refusal = f"{response.status_code} {response.text[:200]}"
            self.shipper.warn(f"the server refused scrape target {url}: {refusal}")


def scrape_target(url: str) -> tuple[str, dict[str, str]]:
    """("host:port", file_sd labels keeping the URL's scheme and path) of a metrics URL;
    ValueError names what is wrong with it."""
    try:
        parsed = httpx.URL(url)
    except httpx.InvalidURL as exc:
        raise ValueError(f"{url!r} is not a URL: {exc}") from exc
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ValueError(f"{url!r} is not an http(s)://host[:port][/path] URL")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    path = parsed.raw_path.decode("ascii") if parsed.path not in ("", "/") else "/metrics"
    host = f"[{parsed.host}]" if ":" in parsed.host else parsed.host
    return f"{host}:{port}", {"__scheme__": parsed.scheme, "__metrics_path__": path}


def _reader(  # noqa: PLR0917 - a thread target takes its arguments positionally
    stream: IO[bytes],
    name: str,
    buffer: Buffer,
    echo: StdoutSink | None,
    joiner: MultilineJoiner,
    registrar: ScrapeRegistrar | None = None,
) -> None:
    """Drain one pipe of the child, as fast as it writes."""
    for raw in iter(stream.readline, b""):
        if echo is not None:
            # A stalled reader of our own output costs dropped echo lines, never a stall.
            echo.msg(raw.rstrip(b"\r\n"))
        text = raw[:MAX_LINE_BYTES].decode("utf-8", "replace").rstrip("\r\n")
        if registrar is not None:
            registrar.watch(text)
        done = joiner.feed(Line(time.time_ns(), name, text))
        if done is not None:
            buffer.put(done)
    done = joiner.flush()
    if done is not None:
        buffer.put(done)


def run(options: RunOptions) -> int:
    """Run the command to its end, shipping its output; return the exit code to use."""
    service = options.service or os.path.basename(options.command[0])
    buffer = Buffer(options.buffer_lines)
    joiners = (MultilineJoiner(), MultilineJoiner())
    shipper = Shipper(options, buffer, service, joiners)
    registrar = ScrapeRegistrar(shipper, options.scrape)
    env = {**os.environ, "OTEL_SERVICE_NAME": os.environ.get("OTEL_SERVICE_NAME", service)}
    try:
        child = subprocess.Popen(  # noqa: S603 - running the user's command is the point
            list(options.command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env
        )
    except OSError as exc:
        print(f"lookout run: cannot start {options.command[0]!r}: {exc.strerror}", file=sys.stderr)
        return 127 if isinstance(exc, FileNotFoundError) else 126

    def forward(signum: int, _: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    assert child.stdout is not None
    assert child.stderr is not None
    echoes: tuple[StdoutSink | None, StdoutSink | None] = (None, None)
    if options.echo:
        echoes = (
            StdoutSink(lambda _: None, stream="stdout"),
            StdoutSink(lambda _: None, stream="stderr"),
        )
    readers = [
        threading.Thread(
            target=_reader, args=(pipe, name, buffer, echo, joiner, registrar), daemon=True
        )
        for pipe, name, echo, joiner in (
            (child.stdout, "stdout", echoes[0], joiners[0]),
            (child.stderr, "stderr", echoes[1], joiners[1]),
        )
    ]
    shipping = threading.Thread(target=shipper.run, name="lookout-run-shipper", daemon=True)
    for thread in (*readers, shipping):
        thread.start()
    code = child.wait()
    for thread in readers:
        thread.join(options.exit_grace_s)
    for echo in echoes:
        if echo is not None:
            echo.close(1.0)
    shipper.stop(options.exit_grace_s)
    buffer.ready.set()
    shipping.join(options.exit_grace_s + 1.0)
    for signum, handler in previous.items():
        signal.signal(signum, handler)
    if len(buffer) or buffer.dropped:
        print(
            f"lookout run: {len(buffer)} lines not delivered, {buffer.dropped} dropped",
            file=sys.stderr,
        )
    return 128 - code if code < 0 else code
