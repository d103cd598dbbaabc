"""Per-record limits applied at ingest (the hardening issue makes them configurable)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

NS_PER_S = 1_000_000_000


@dataclass(frozen=True)
class Limits:
    max_age_s: float = 7 * 86400
    max_future_s: float = 600
    max_attribute_bytes: int = 2048
    max_line_bytes: int = 256 * 1024
    max_body_bytes: int = 20 * 1024 * 1024

    def time_problem(self, ts_ns: int, now_ns: int) -> str | None:
        """Why a record's time is unacceptable, or None."""
        if ts_ns < now_ns - int(self.max_age_s * NS_PER_S):
            return "older than the retention horizon"
        if ts_ns > now_ns + int(self.max_future_s * NS_PER_S):
            return "too far in the future"
        return None

    def attributes(self, values: dict[str, Any]) -> dict[str, Any]:
        """Attribute values over the size limit are truncated."""
        limit = self.max_attribute_bytes
        return {
            key: value.encode()[:limit].decode("utf-8", "ignore")
            if isinstance(value, str) and len(value) > limit
            else value
            for key, value in values.items()
        }

    def line(self, text: str) -> str:
        if len(text) > self.max_line_bytes:
            return text.encode()[: self.max_line_bytes].decode("utf-8", "ignore")
        return text
