"""The Lookout exception tree, grouped by cause.

Foreign errors (duckdb, httpx, OS errors) are translated into these at the boundary,
and every exception keeps its data as attributes so callers never parse messages.
"""

from __future__ import annotations

from typing import ClassVar


class LookoutError(Exception):
    """Base class of every error Lookout raises on purpose."""


class ConfigError(LookoutError):
    """A setting has a value Lookout cannot use."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(f"Config '{key}' has value {value!r}. Expected {expected}.")


class UsageError(LookoutError):
    """The command line was called with words it does not take."""


class StoreError(LookoutError):
    """The store cannot be opened, migrated or written."""


class StoreBusyError(StoreError):
    """The writer's queue is full; the client should retry later."""


class DiskFullError(StoreError):
    """The data directory's disk is past the `disk_full` limit; ingest waits for space."""


class IngestError(LookoutError):
    """An ingest request is malformed; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400, reason: str = "malformed") -> None:
        self.status = status
        self.reason = reason
        super().__init__(message)

    def __reduce__(self) -> tuple[type[IngestError], tuple[str, int, str]]:
        """Whole across processes (a decoding worker raises it): status and reason too."""
        return type(self), (str(self), self.status, self.reason)


class QueryError(LookoutError):
    """A read request names a bad parameter."""

    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


class PromQLError(QueryError):
    """A PromQL query failed; `error_type` is the Prometheus API's errorType for it
    (`bad_data` 400, `execution` 422, `timeout` 503, `unavailable` 503)."""

    STATUS: ClassVar[dict[str, int]] = {
        "bad_data": 400,
        "execution": 422,
        "timeout": 503,
        "unavailable": 503,
    }

    def __init__(self, message: str, error_type: str = "bad_data") -> None:
        self.error_type = error_type
        super().__init__(message, self.STATUS[error_type])
