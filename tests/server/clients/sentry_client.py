"""A separate process using the real sentry-sdk against Lookout's envelope endpoint.

    python -m tests.server.clients.sentry_client DSN TRACE_ID

Raises the same exception twice (it must group into one issue), sends a cron check-in and
a transaction, and prints nothing.
"""

from __future__ import annotations

import sys

import sentry_sdk
from sentry_sdk.crons import capture_checkin


def charge(booking: str) -> None:
    amount_kes = 1500
    raise ConnectionRefusedError(f"M-Pesa refused booking {booking} ({amount_kes} KES)")


def main() -> int:
    dsn, trace_id = sys.argv[1], sys.argv[2]
    sentry_sdk.init(dsn=dsn, release="2.3.0", environment="staging", traces_sample_rate=1.0)
    sentry_sdk.set_user({"id": "u-42"})
    sentry_sdk.set_tag("service", "payments")
    for _ in range(2):
        with sentry_sdk.new_scope() as scope:
            scope.set_context("trace", {"trace_id": trace_id, "span_id": "00f067aa0ba902b7"})
            try:
                charge("BK-1")
            except ConnectionRefusedError as exc:
                sentry_sdk.capture_exception(exc)
    capture_checkin(monitor_slug="nightly-report", status="error", duration=3.5)
    with sentry_sdk.start_transaction(name="POST /pay", op="http.server"):
        with sentry_sdk.start_span(op="db", name="SELECT bookings"):
            pass
    sentry_sdk.flush(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
