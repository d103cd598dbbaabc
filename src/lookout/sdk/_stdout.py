"""Writing log lines to stdout without ever holding up the host.

A terminal or a file takes a write at once, so lines go straight out. A pipe or a
socket (a container's log driver, `lookout run`) can fill up when its reader stalls;
there a writer thread owns the blocking write and the request path only appends to a
bounded queue. A full queue drops the oldest line; a closed stdout drops the line;
both are counted.
"""

from __future__ import annotations

import collections
import os
import stat
import sys
import threading
import time
from collections.abc import Callable

QUEUE_LINES = 10_000
_EPIPE_LIKE = (BrokenPipeError, ConnectionResetError, ValueError)


def _stdout_is_a_pipe(name: str = "stdout") -> int | None:
    """The fd of sys.stdout (or sys.stderr) when it is a pipe or socket, else None."""
    try:
        fd = getattr(sys, name).fileno()
        mode = os.fstat(fd).st_mode
    except (AttributeError, OSError, ValueError):
        return None
    return fd if stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode) else None


class StdoutSink:
    """`msg(line)` writes one line; it never blocks on a full pipe and never raises."""

    def __init__(
        self,
        on_drop: Callable[[str], None],
        *,
        queue_lines: int = QUEUE_LINES,
        stream: str = "stdout",
    ) -> None:
        self._on_drop = on_drop
        self._stream = stream
        self._lock = threading.Lock()
        self._queue: collections.deque[bytes] = collections.deque(maxlen=queue_lines)
        self._wake = threading.Condition(threading.Lock())
        self._fd = _stdout_is_a_pipe(stream)
        self._closed = False
        self._writing = False
        self._thread: threading.Thread | None = None
        if self._fd is not None:
            self._start_writer()
            os.register_at_fork(after_in_child=self._after_fork)

    # -- the request path ---------------------------------------------------------------
    def msg(self, line: bytes) -> None:
        if self._fd is None:
            self._write_now(line)
            return
        if len(self._queue) == self._queue.maxlen:
            self._on_drop("queue_full")  # the deque discards its oldest line
        self._queue.append(line + b"\n")
        with self._wake:
            self._wake.notify()

    log = debug = info = warning = warn = error = critical = exception = fatal = msg

    def _write_now(self, line: bytes) -> None:
        try:
            with self._lock:
                stream = getattr(sys, self._stream)
                buffer = getattr(stream, "buffer", None)
                if buffer is not None:
                    buffer.write(line + b"\n")
                else:
                    stream.write(line.decode("utf-8", "replace") + "\n")
                stream.flush()
        except (OSError, ValueError):
            self._on_drop("stdout_unavailable")

    # -- the writer thread --------------------------------------------------------------
    def _start_writer(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lookout-stdout", daemon=True)
        self._thread.start()

    def _after_fork(self) -> None:
        self._wake = threading.Condition(threading.Lock())
        self._queue.clear()
        if self._fd is not None and not self._closed:
            self._start_writer()

    def _run(self) -> None:
        while not self._closed:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait(0.5)
            self._drain()

    def _drain(self) -> None:
        assert self._fd is not None
        while self._queue:
            self._writing = True
            try:
                line = self._queue.popleft()
            except IndexError:
                self._writing = False
                return
            view = memoryview(line)
            try:
                while view:
                    written = os.write(self._fd, view)
                    view = view[written:]
            except (OSError, *_EPIPE_LIKE):
                self._on_drop("stdout_unavailable")
            finally:
                self._writing = False

    def flush(self, timeout_s: float) -> bool:
        """Wait until queued lines are written (True) or the time is up (False)."""
        deadline = time.monotonic() + timeout_s
        while (self._queue or self._writing) and time.monotonic() < deadline:
            with self._wake:
                self._wake.notify()
            time.sleep(0.005)
        return not self._queue

    def close(self, timeout_s: float) -> None:
        self.flush(timeout_s)
        self._closed = True
        with self._wake:
            self._wake.notify()
