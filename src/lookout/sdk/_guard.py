"""The SDK never raises into its host: every hook runs inside `guard`.

Failures are reported on the internal logger `lookout.sdk.internal`, at most once per
cause per minute, so a broken exporter cannot flood the host's logs either.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

INTERNAL_LOGGER = "lookout.sdk.internal"
WARN_INTERVAL_S = 60.0

_log = logging.getLogger(INTERNAL_LOGGER)
_last_warned: dict[str, float] = {}
_lock = threading.Lock()
_clock: Callable[[], float] = time.monotonic


def warn_once(cause: str, message: str, *args: object, exc_info: bool = False) -> None:
    """Log `message` on the internal logger unless `cause` was reported in the last minute."""
    now = _clock()
    with _lock:
        last = _last_warned.get(cause)
        if last is not None and now - last < WARN_INTERVAL_S:
            return
        _last_warned[cause] = now
    try:
        _log.warning(message, *args, exc_info=exc_info)
    except Exception:  # noqa: BLE001 - a logging failure must not escape either
        return


@contextmanager
def guard(cause: str) -> Iterator[None]:
    """Swallow any exception raised inside the block and report it once per minute."""
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - this is the one place that catches everything
        warn_once(cause, "lookout.sdk: %s failed: %r", cause, exc)


# Libraries whose own failure logs are about the SDK's plumbing (an exporter retrying a
# dead backend, say): the host sees each distinct message at most once a minute.
PLUMBING_LOGGERS = ("opentelemetry", "sentry_sdk", "urllib3", "requests", INTERNAL_LOGGER)


class OncePerMinute(logging.Filter):
    """Passes a plumbing logger's record once per (logger, message) per minute."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith(PLUMBING_LOGGERS) or record.name == INTERNAL_LOGGER:
            return True  # the internal logger is rate-limited at the source by warn_once
        cause = f"{record.name}:{record.msg}"
        now = _clock()
        with _lock:
            last = _last_warned.get(cause)
            if last is not None and now - last < WARN_INTERVAL_S:
                return False
            _last_warned[cause] = now
        return True


def reset() -> None:
    """Forget which causes were reported (used between tests)."""
    with _lock:
        _last_warned.clear()
