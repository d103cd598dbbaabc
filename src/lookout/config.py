"""Server configuration: one YAML file, then LOOKOUT_* variables, then flags (flags win).

Every key is validated with a message that names the key, the bad value and the fix;
`--check-config` reports the first problem and exits 2, `--print-config` shows the result
with secrets redacted.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lookout.errors import ConfigError
from lookout.ingest.scrape import ScrapeConfig, parse_scrape_configs

REDACTED = "***"


@dataclass(frozen=True)
class Project:
    """A Sentry project: errors sent with one of its DSN keys land in it."""

    id: int
    name: str
    keys: tuple[str, ...]


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8686
    otlp_port: int = 4318
    data_dir: Path = Path("lookout-data")
    projects: tuple[Project, ...] = field(
        default_factory=lambda: (Project(1, "default", ("lookout",)),)
    )
    scrub_key: str = "lookout-insecure-default-key"
    self_observe_interval_s: float = 15.0
    trace_ingest: bool = False
    scrape_configs: tuple[ScrapeConfig, ...] = ()


# key -> (environment variable, meaning) for docs/server.md and --print-config.
KEYS: dict[str, tuple[str, str]] = {
    "host": ("LOOKOUT_HOST", "address to listen on (127.0.0.1 unless you need more)"),
    "port": ("LOOKOUT_PORT", "port of the API, the UI and /v1/* (8686)"),
    "otlp_port": (
        "LOOKOUT_OTLP_PORT",
        "port serving only /v1/* OTLP intake (4318); 0 turns it off",
    ),
    "data_dir": ("LOOKOUT_DATA_DIR", "where the store keeps its files (./lookout-data)"),
    "projects": (
        "LOOKOUT_SENTRY_KEYS",
        "Sentry projects and their DSN keys; the variable takes `1=key1,2=key2`",
    ),
    "scrub_key": (
        "LOOKOUT_SCRUB_KEY",
        "HMAC key of the SDK's phone-number hashes (the same on every service)",
    ),
    "self_observe_interval_s": (
        "LOOKOUT_SELF_OBSERVE_INTERVAL",
        "seconds between writes of the server's own metrics to its store (15)",
    ),
    "trace_ingest": (
        "LOOKOUT_TRACE_INGEST",
        "record spans of the ingest routes, straight to the store",
    ),
    "scrape_configs": (
        "LOOKOUT_SCRAPE_CONFIGS",
        "Prometheus `scrape_configs` (the subset in this page); the variable takes them as JSON",
    ),
}
SECRET_KEYS = ("scrub_key",)


def _fail(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(key, value, expected)


def _port(key: str, value: Any, *, allow_zero: bool = False) -> int:
    try:
        port = int(value)
    except (TypeError, ValueError):
        raise _fail(key, value, "a port number from 1 to 65535") from None
    if not (0 if allow_zero else 1) <= port <= 65535:
        raise _fail(key, value, "a port number from 1 to 65535")
    return port


def _bool(key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise _fail(key, value, "true or false")


def _positive(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise _fail(key, value, "a number of seconds such as 15") from None
    if number <= 0:
        raise _fail(key, value, "a number of seconds above 0")
    return number


def _projects(value: Any) -> tuple[Project, ...]:
    if isinstance(value, str):  # the variable's form: 1=key1,2=key2
        pairs = [p.strip() for p in value.split(",") if p.strip()]
        value = []
        for pair in pairs:
            number, sep, key = pair.partition("=")
            if not sep or not key:
                raise _fail("projects", pair, "`ID=KEY` pairs such as `1=abc123`")
            value.append({"id": number, "name": f"project-{number}", "keys": [key]})
    if not isinstance(value, list) or not value:
        raise _fail("projects", value, "a list of {id, name, keys}")
    projects = []
    for index, entry in enumerate(value):
        where = f"projects[{index}]"
        if not isinstance(entry, dict):
            raise _fail(where, entry, "a mapping with id, name and keys")
        try:
            ident = int(str(entry.get("id")))
        except (TypeError, ValueError):
            raise _fail(
                f"{where}.id", entry.get("id"), "a number (Sentry project ids are numeric)"
            ) from None
        if ident <= 0:
            raise _fail(f"{where}.id", ident, "a number above 0")
        keys = entry.get("keys")
        if isinstance(keys, str):
            keys = [keys]
        if (
            not isinstance(keys, list)
            or not keys
            or not all(isinstance(k, str) and k for k in keys)
        ):
            raise _fail(f"{where}.keys", keys, "a list of DSN public keys")
        projects.append(Project(ident, str(entry.get("name") or f"project-{ident}"), tuple(keys)))
    return tuple(projects)


_PARSERS: dict[str, Any] = {
    "host": str,
    "port": lambda v: _port("port", v),
    "otlp_port": lambda v: _port("otlp_port", v, allow_zero=True),
    "data_dir": lambda v: Path(str(v)).expanduser(),
    "projects": _projects,
    "scrub_key": str,
    "self_observe_interval_s": lambda v: _positive("self_observe_interval_s", v),
    "trace_ingest": lambda v: _bool("trace_ingest", v),
    "scrape_configs": lambda v: parse_scrape_configs(_json_or_value("scrape_configs", v)),
}


def _json_or_value(key: str, value: Any) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError as exc:
        raise ConfigError(key, value[:80], "a JSON list of scrape jobs") from exc


def _unknown(key: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(KEYS), n=1)
    hint = f"Did you mean '{close[0]}'?" if close else f"Known keys: {', '.join(KEYS)}."
    return ConfigError(key, key, f"a known key. {hint}")


def read_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError("--config", str(path), f"a readable file ({exc.strerror})") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError("--config", str(path), f"valid YAML ({exc})") from exc
    if not isinstance(data, dict):
        raise ConfigError("--config", str(path), "a YAML mapping of keys to values")
    return data


def load(
    file: Path | None = None,
    environ: Mapping[str, str] | None = None,
    flags: Mapping[str, Any] | None = None,
) -> ServerConfig:
    """Merge the file, the environment and the flags (in rising precedence) and validate."""
    environ = os.environ if environ is None else environ
    merged: dict[str, Any] = {}
    if file is not None:
        for key, value in read_file(file).items():
            if key not in KEYS:
                raise _unknown(str(key))
            merged[key] = value
    for key, (variable, _) in KEYS.items():
        if environ.get(variable):
            merged[key] = environ[variable]
    merged.update({k: v for k, v in (flags or {}).items() if v is not None})
    values: dict[str, Any] = {key: _PARSERS[key](value) for key, value in merged.items()}
    return ServerConfig(**values)


def redacted(config: ServerConfig) -> dict[str, Any]:
    """The effective config as plain data, secrets replaced by ***."""
    out: dict[str, Any] = {}
    for item in fields(config):
        value = getattr(config, item.name)
        if item.name in SECRET_KEYS:
            value = REDACTED
        elif item.name == "projects":
            value = [{"id": p.id, "name": p.name, "keys": [REDACTED] * len(p.keys)} for p in value]
        elif isinstance(value, Path):
            value = str(value)
        elif item.name == "scrape_configs":
            value = [c.job_name for c in value]
        out[item.name] = value
    return out
