"""Server configuration: one YAML file, then LOOKOUT_* variables, then flags (flags win).

Every key is validated with a message that names the key, the bad value and the fix;
`--check-config` reports the first problem and exits 2, `--print-config` shows the result
with secrets redacted.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lookout.errors import ConfigError
from lookout.ingest.limits import Limits, parse_limits, parse_size
from lookout.ingest.scrape import ScrapeConfig, parse_scrape_configs
from lookout.store import RetentionPolicy, parse_retention

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
    scrub_key: str = "lookout-insecure-default-key"  # DEFAULT_SCRUB_KEY
    self_observe_interval_s: float = 15.0
    registered_scrape_interval_s: float = 15.0  # targets registered via POST /api/targets
    trace_ingest: bool = False
    scrape_configs: tuple[ScrapeConfig, ...] = ()
    # Security: bearer tokens for OTLP, lines and Loki (token -> project id), and the query
    # credential (bearer tokens, or user -> password for basic auth) for reads and the UI.
    ingest_tokens: dict[str, int] = field(default_factory=dict)
    query_tokens: tuple[str, ...] = ()
    query_users: dict[str, str] = field(default_factory=dict)
    tls_cert: Path | None = None
    tls_key: Path | None = None
    scrub: bool = True
    decode_workers: int | None = None  # None: one per core, at most 4
    limits: Limits = field(default_factory=Limits)
    store_memory_limit: int = 1024 * 1024 * 1024  # DuckDB's memory_limit, in bytes
    retention: RetentionPolicy = field(default_factory=RetentionPolicy)
    # PromQL (server/prom_api.py): queries at once, their longest run, the lookback of an
    # instant selector, the samples one query may load, and the in-memory sample cache.
    query_concurrency: int = 4
    query_timeout: float = 30.0  # seconds
    query_lookback: float = 300.0  # seconds
    query_max_samples: int = 5_000_000
    query_cache_size: int = 512 * 1024 * 1024  # bytes


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
    "registered_scrape_interval_s": (
        "LOOKOUT_REGISTERED_SCRAPE_INTERVAL",
        "seconds between scrapes of targets registered through POST /api/targets (15)",
    ),
    "trace_ingest": (
        "LOOKOUT_TRACE_INGEST",
        "record spans of the ingest routes, straight to the store",
    ),
    "scrape_configs": (
        "LOOKOUT_SCRAPE_CONFIGS",
        "Prometheus `scrape_configs` (the subset in this page); the variable takes them as JSON",
    ),
    "ingest_tokens": (
        "LOOKOUT_INGEST_TOKENS",
        "bearer tokens for OTLP, lines and Loki, per project: `{1: [token]}`; the variable "
        "takes `1=token1,2=token2`",
    ),
    "query_tokens": (
        "LOOKOUT_QUERY_TOKENS",
        "bearer tokens for the read API, the Prometheus API and the UI (comma-separated)",
    ),
    "query_users": (
        "LOOKOUT_QUERY_USERS",
        "basic-auth users for the same, `{user: password}`; the variable takes `user:password,...`",
    ),
    "tls_cert": ("LOOKOUT_TLS_CERT", "PEM certificate file: serve HTTPS (with `tls_key`)"),
    "tls_key": ("LOOKOUT_TLS_KEY", "PEM private key file of `tls_cert`"),
    "scrub": (
        "LOOKOUT_SCRUB",
        "scrub secrets and personal data from every record before it is stored (true)",
    ),
    "decode_workers": (
        "LOOKOUT_DECODE_WORKERS",
        "processes that decode and scrub OTLP span and log requests (one per core, at most 4); "
        "0 decodes them in the server process",
    ),
    "limits": (
        "LOOKOUT_LIMITS",
        "ingest limits (the table below); the variable takes `name=value,...`",
    ),
    "store_memory_limit": (
        "LOOKOUT_STORE_MEMORY_LIMIT",
        "memory DuckDB may use for its buffers and queries, the startup check included, such "
        "as 512MiB (1GiB)",
    ),
    "retention": (
        "LOOKOUT_RETENTION",
        "age and byte caps per signal and for the data directory (see Retention); the "
        "variable takes `max_bytes=10GB,logs.max_age=3d,...`",
    ),
    "query_concurrency": (
        "LOOKOUT_QUERY_CONCURRENCY",
        "PromQL queries evaluated at once (4); more wait in a queue, within their timeout",
    ),
    "query_timeout": (
        "LOOKOUT_QUERY_TIMEOUT",
        "longest a PromQL query may queue and run, such as 30s or 2m (30s); over it, 503",
    ),
    "query_lookback": (
        "LOOKOUT_QUERY_LOOKBACK",
        "how far back an instant selector looks for a series' last sample (5m)",
    ),
    "query_max_samples": (
        "LOOKOUT_QUERY_MAX_SAMPLES",
        "samples one PromQL query may load (5000000); over it, 422",
    ),
    "query_cache_size": (
        "LOOKOUT_QUERY_CACHE_SIZE",
        "memory for recent samples grouped by series, which range queries read (512MiB)",
    ),
}
SECRET_KEYS = ("scrub_key", "ingest_tokens", "query_tokens", "query_users")
DEFAULT_SCRUB_KEY = "lookout-insecure-default-key"
DEFAULT_DSN_KEY = "lookout"


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


def _pairs(key: str, value: Any, separator: str) -> list[tuple[str, str]]:
    """`a<sep>b,c<sep>d` (a variable's form) as pairs; empty parts are refused."""
    pairs = []
    for part in (p.strip() for p in str(value).split(",")):
        left, sep, right = part.partition(separator)
        if not sep or not left.strip() or not right.strip():
            raise _fail(key, part or value, f"`NAME{separator}VALUE` pairs separated by commas")
        pairs.append((left.strip(), right.strip()))
    return pairs


def _ingest_tokens(value: Any) -> dict[str, int]:
    key = "ingest_tokens"
    if isinstance(value, str):
        grouped: dict[str, list[str]] = {}
        for project, token in _pairs(key, value, "="):
            grouped.setdefault(project, []).append(token)
        value = grouped
    if not isinstance(value, dict):
        raise _fail(key, value, "a mapping of project id to a list of tokens")
    tokens: dict[str, int] = {}
    for project, given in value.items():
        try:
            ident = int(str(project))
        except ValueError:
            raise _fail(f"{key}.{project}", project, "a numeric project id") from None
        listed = [given] if isinstance(given, str) else given
        if not isinstance(listed, list) or not listed:
            raise _fail(f"{key}.{project}", listed, "a list of tokens")
        for token in listed:
            if not isinstance(token, str) or len(token) < 16 or token.strip() != token:
                raise _fail(f"{key}.{project}", "***", "tokens of at least 16 characters")
            if token in tokens:
                raise _fail(f"{key}.{project}", "***", "a token no other project uses")
            tokens[token] = ident
    return tokens


def _query_tokens(value: Any) -> tuple[str, ...]:
    listed = [t.strip() for t in value.split(",")] if isinstance(value, str) else value
    if not isinstance(listed, list) or not all(isinstance(t, str) for t in listed):
        raise _fail("query_tokens", value, "a list of tokens")
    if any(len(t) < 16 for t in listed):
        raise _fail("query_tokens", "***", "tokens of at least 16 characters")
    return tuple(listed)


def _query_users(value: Any) -> dict[str, str]:
    if isinstance(value, str):
        value = dict(_pairs("query_users", value, ":"))
    if not isinstance(value, dict) or not all(
        isinstance(u, str) and isinstance(p, str) for u, p in value.items()
    ):
        raise _fail("query_users", value, "a mapping of user name to password")
    for user, password in value.items():
        if ":" in user or not user:
            raise _fail("query_users", user, "user names without `:`")
        if len(password) < 12:
            raise _fail(f"query_users.{user}", "***", "a password of at least 12 characters")
    return dict(value)


def _file(key: str, value: Any) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise _fail(key, str(path), "a readable PEM file")
    return path


def _count(key: str, value: Any) -> int:
    try:
        number = int(str(value).replace("_", ""))
    except ValueError:
        raise _fail(key, value, "a whole number above 0") from None
    if number <= 0 or isinstance(value, bool):
        raise _fail(key, value, "a whole number above 0")
    return number


def _workers(value: Any) -> int:
    try:
        number = int(str(value).replace("_", ""))
    except ValueError:
        raise _fail("decode_workers", value, "a whole number from 0 to 64") from None
    if not 0 <= number <= 64 or isinstance(value, bool):
        raise _fail("decode_workers", value, "a whole number from 0 to 64")
    return number


_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}


def _seconds(key: str, value: Any) -> float:
    """A duration: seconds as a number, or a number with ms, s, m or h (`30s`, `2m`)."""
    text = str(value).strip().lower()
    unit = next((u for u in ("ms", "s", "m", "h") if text.endswith(u)), "")
    try:
        number = float(text[: len(text) - len(unit)]) * _SECONDS.get(unit, 1)
    except ValueError:
        raise _fail(key, value, "a duration such as 30s, 2m or 45") from None
    if not 0 < number < 86400 * 365 or isinstance(value, bool):
        raise _fail(key, value, "a duration above 0 such as 30s, 2m or 45")
    return number


def _memory(value: Any) -> int:
    size = parse_size("store_memory_limit", value)
    if size < 64 * 1024 * 1024:
        raise _fail("store_memory_limit", value, "at least 64MiB")
    return size


_PARSERS: dict[str, Any] = {
    "host": str,
    "port": lambda v: _port("port", v),
    "otlp_port": lambda v: _port("otlp_port", v, allow_zero=True),
    "data_dir": lambda v: Path(str(v)).expanduser(),
    "projects": _projects,
    "scrub_key": str,
    "self_observe_interval_s": lambda v: _positive("self_observe_interval_s", v),
    "registered_scrape_interval_s": lambda v: _positive("registered_scrape_interval_s", v),
    "trace_ingest": lambda v: _bool("trace_ingest", v),
    "scrape_configs": lambda v: parse_scrape_configs(_json_or_value("scrape_configs", v)),
    "ingest_tokens": _ingest_tokens,
    "query_tokens": _query_tokens,
    "query_users": _query_users,
    "tls_cert": lambda v: _file("tls_cert", v),
    "tls_key": lambda v: _file("tls_key", v),
    "scrub": lambda v: _bool("scrub", v),
    "decode_workers": _workers,
    "limits": parse_limits,
    "store_memory_limit": _memory,
    "retention": parse_retention,
    "query_concurrency": lambda v: _count("query_concurrency", v),
    "query_timeout": lambda v: _seconds("query_timeout", v),
    "query_lookback": lambda v: _seconds("query_lookback", v),
    "query_max_samples": lambda v: _count("query_max_samples", v),
    "query_cache_size": lambda v: parse_size("query_cache_size", v),
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
    config = ServerConfig(**values)
    _check_together(config)
    return config


def _check_together(config: ServerConfig) -> None:
    """What no single key can tell: tokens name known projects, TLS comes as a pair."""
    known = {p.id for p in config.projects}
    for project in sorted(set(config.ingest_tokens.values()) - known):
        raise _fail(f"ingest_tokens.{project}", project, f"one of the projects {sorted(known)}")
    if (config.tls_cert is None) != (config.tls_key is None):
        missing = "tls_key" if config.tls_key is None else "tls_cert"
        raise _fail(missing, None, "set too: HTTPS needs both tls_cert and tls_key")


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def exposure_problems(config: ServerConfig) -> list[tuple[str, str]]:
    """(key, what to set) for each credential a server listening beyond loopback lacks."""
    if is_loopback(config.host):
        return []
    problems = []
    without = [p.id for p in config.projects if p.id not in set(config.ingest_tokens.values())]
    if without:
        problems.append((
            "ingest_tokens",
            f"a bearer token for each project (none for {without}): LOOKOUT_INGEST_TOKENS",
        ))  # fmt: skip
    if any(DEFAULT_DSN_KEY in p.keys for p in config.projects):
        problems.append(("projects", "DSN keys of your own, not the default `lookout`"))
    if not config.query_tokens and not config.query_users:
        problems.append((
            "query_tokens",
            "a query credential: LOOKOUT_QUERY_TOKENS (bearer) or LOOKOUT_QUERY_USERS (basic)",
        ))  # fmt: skip
    if config.scrub_key == DEFAULT_SCRUB_KEY:
        problems.append(("scrub_key", "a secret key for phone-number hashes: LOOKOUT_SCRUB_KEY"))
    return problems


def redacted(config: ServerConfig) -> dict[str, Any]:
    """The effective config as plain data, secrets replaced by ***."""
    out: dict[str, Any] = {}
    for item in fields(config):
        value = getattr(config, item.name)
        if item.name == "ingest_tokens":  # which projects have tokens, never the tokens
            value = {str(project): REDACTED for project in sorted(set(value.values()))}
        elif item.name == "query_tokens":
            value = [REDACTED] * len(value)
        elif item.name == "query_users":
            value = dict.fromkeys(value, REDACTED)
        elif item.name in SECRET_KEYS:
            value = REDACTED
        elif item.name == "projects":
            value = [{"id": p.id, "name": p.name, "keys": [REDACTED] * len(p.keys)} for p in value]
        elif isinstance(value, Path):
            value = str(value)
        elif item.name == "scrape_configs":
            value = [c.job_name for c in value]
        elif item.name in ("limits", "retention"):
            value = asdict(value)
        out[item.name] = value
    return out
