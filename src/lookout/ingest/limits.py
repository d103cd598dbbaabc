"""Ingest limits: what one request, record or metric may be, configurable under `limits`.

docs/server.md lists them (the table comes from LIMITS below); every rejection is counted
in `lookout_ingest_rejected_total{signal,reason}`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, fields, replace
from typing import Any

from lookout.errors import ConfigError

NS_PER_S = 1_000_000_000
MiB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 20 * MiB
    max_event_bytes: int = 1_000_000
    max_line_bytes: int = 256 * 1024
    max_attribute_bytes: int = 2048
    max_age_s: float = 7 * 86400
    max_future_s: float = 600
    max_series_per_metric: int = 10_000
    writer_queue_requests: int = 1000
    disk_full_ratio: float = 0.90

    def time_problem(self, ts_ns: int, now_ns: int) -> str | None:
        """Why a record's time is unacceptable, or None."""
        if ts_ns < now_ns - int(self.max_age_s * NS_PER_S):
            return "older than the retention horizon"
        if ts_ns > now_ns + int(self.max_future_s * NS_PER_S):
            return "too far in the future"
        return None

    def attributes(self, values: dict[str, Any]) -> dict[str, Any]:
        """Attribute values over the size limit are truncated."""
        return {
            key: self.text(value) if isinstance(value, str) else value
            for key, value in values.items()
        }

    def text(self, value: str) -> str:
        """`value` cut to max_attribute_bytes of UTF-8 (never inside a character)."""
        limit = self.max_attribute_bytes
        if len(value) * 4 <= limit:  # cannot be over, whatever its characters
            return value
        raw = value.encode()
        return raw[:limit].decode("utf-8", "ignore") if len(raw) > limit else value


# name -> (field, kind, meaning) for the config key `limits` and the docs' table.
LIMITS: dict[str, tuple[str, str, str]] = {
    "max_body": ("max_body_bytes", "bytes", "a request body after decompression; over it, 413"),
    "max_event": ("max_event_bytes", "bytes", "one Sentry event, decompressed; over it, 413"),
    "max_line": ("max_line_bytes", "bytes", "one log line; over it, 400 `line_too_long`"),
    "max_attribute": (
        "max_attribute_bytes",
        "bytes",
        "an attribute value; longer ones are truncated",
    ),
    "max_age": ("max_age_s", "duration", "records older than this are dropped one by one"),
    "max_future": ("max_future_s", "duration", "records further ahead are dropped one by one"),
    "max_series_per_metric": (
        "max_series_per_metric",
        "count",
        "series of one metric name; new series beyond it are dropped and counted",
    ),
    "writer_queue": (
        "writer_queue_requests",
        "count",
        "requests waiting for the store; beyond it, 503 with Retry-After",
    ),
    "disk_full": (
        "disk_full_ratio",
        "ratio",
        "used share of the data directory's disk at which ingest answers 503",
    ),
}
_UNITS = {
    "": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}  # fmt: skip
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)?")
_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _number(name: str, kind: str, value: Any) -> float:
    text = str(value).strip().lower().replace("_", "")
    if kind == "bytes":
        return parse_size(f"limits.{name}", value)
    if kind == "duration":
        match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?", text)
        if match:
            return float(match[1]) * _SECONDS[match[2] or "s"]
        expected = "a duration such as 10m, 7d or 600"
    elif kind == "ratio":
        try:
            ratio = float(text)
        except ValueError:
            ratio = -1.0
        if 0 < ratio <= 1:
            return ratio
        expected = "a share above 0 and at most 1, such as 0.9"
    else:
        if text.isdigit():
            return float(text)
        expected = "a whole number"
    raise ConfigError(f"limits.{name}", value, expected)


def parse_size(key: str, value: Any) -> int:
    """A size in bytes from `20MiB`, `1GB` or `262144`; ConfigError naming `key`."""
    text = str(value).strip().lower().replace("_", "")
    match = None if isinstance(value, bool) else _SIZE.fullmatch(text)
    if not match:
        raise ConfigError(key, value, "a size such as 20MiB, 1MB or 262144")
    return int(float(match[1]) * _UNITS[match[2] or ""])


def parse_limits(raw: Any) -> Limits:
    """`limits` from the config file (a mapping) or LOOKOUT_LIMITS (`name=value,...`)."""
    if isinstance(raw, str):
        pairs = {}
        for part in (p.strip() for p in raw.split(",") if p.strip()):
            name, sep, value = part.partition("=")
            if not sep:
                raise ConfigError("limits", part, "`name=value` pairs separated by commas")
            pairs[name.strip()] = value.strip()
        raw = pairs
    if not isinstance(raw, dict):
        raise ConfigError("limits", raw, "a mapping of limit names to values")
    changes: dict[str, Any] = {}
    types = {f.name: f.type for f in fields(Limits)}
    for name, value in raw.items():
        if name not in LIMITS:
            raise ConfigError(f"limits.{name}", name, f"one of {', '.join(LIMITS)}")
        field_name, kind, _ = LIMITS[name]
        number = _number(name, kind, value)
        if number <= 0:
            raise ConfigError(f"limits.{name}", value, "a value above 0")
        changes[field_name] = int(number) if types[field_name] == "int" else number
    return replace(Limits(), **changes)
