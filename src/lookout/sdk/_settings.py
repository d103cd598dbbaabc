"""The one registry of environment variables the SDK reads, and their parsing.

Precedence for every setting: the keyword given to `init()`, then the variable, then
the default. A variable with a value the SDK cannot use is reported once on the
internal logger and replaced by its default; it never raises into the host.
docs/sdk.md documents every variable listed in `VARIABLES` (a test holds them equal).
"""

from __future__ import annotations

import ipaddress
import os
import re
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from lookout.errors import ConfigError
from lookout.sdk._guard import warn_once


@dataclass(frozen=True)
class Variable:
    """One environment variable: its name, default (as text) and meaning."""

    name: str
    default: str
    meaning: str


def _otlp_variables() -> list[Variable]:
    general = {
        "ENDPOINT": ("http://localhost:4318", "base URL; `/v1/traces` or `/v1/logs` is appended"),
        "HEADERS": ("", "`key=value,...` (values percent-encoded) sent with every export"),
        "TIMEOUT": ("10000", "export timeout in milliseconds"),
        "COMPRESSION": ("none", "`gzip`, `deflate` or `none`"),
        "PROTOCOL": ("http/protobuf", "only `http/protobuf` is supported; others warn"),
        "CERTIFICATE": ("", "CA bundle that verifies the collector's TLS certificate"),
        "CLIENT_KEY": ("", "client private key for mutual TLS"),
        "CLIENT_CERTIFICATE": ("", "client certificate for mutual TLS"),
    }
    out = [Variable(f"OTEL_EXPORTER_OTLP_{k}", d, m) for k, (d, m) in general.items()]
    for signal in ("TRACES", "LOGS"):
        for key, (_, meaning) in general.items():
            default = "" if key != "ENDPOINT" else f"(base)/v1/{signal.lower()}"
            extra = " (used as-is)" if key == "ENDPOINT" else ""
            out.append(
                Variable(
                    f"OTEL_EXPORTER_OTLP_{signal}_{key}",
                    default,
                    f"{signal.lower()} only: {meaning}{extra}; overrides the general one",
                )
            )
    return out


VARIABLES: tuple[Variable, ...] = (
    Variable("OTEL_SDK_DISABLED", "false", "`true` turns tracing and OTLP export off"),
    Variable("OTEL_SERVICE_NAME", "", "service name when `init(service=...)` is not given"),
    Variable(
        "OTEL_RESOURCE_ATTRIBUTES",
        "",
        "`k=v,...` resource attributes (percent-encoded); `service.version`, "
        "`deployment.environment.name` and `service.instance.id` are read from it",
    ),
    *_otlp_variables(),
    Variable("OTEL_TRACES_EXPORTER", "otlp", "`otlp` or `none`"),
    Variable(
        "OTEL_LOGS_EXPORTER",
        "none",
        "`none`: logs go to stdout as JSON lines; `otlp`: logs go over OTLP instead",
    ),
    Variable(
        "OTEL_TRACES_SAMPLER",
        "parentbased_always_on",
        "`always_on`, `always_off`, `traceidratio`, `parentbased_always_on`, "
        "`parentbased_always_off` or `parentbased_traceidratio`",
    ),
    Variable("OTEL_TRACES_SAMPLER_ARG", "1.0", "ratio 0..1 for the `traceidratio` samplers"),
    Variable(
        "OTEL_PROPAGATORS",
        "tracecontext,baggage",
        "`tracecontext`, `baggage` or `none`; `X-Trace-Id` is always propagated",
    ),
    Variable("OTEL_BSP_SCHEDULE_DELAY", "1000", "ms between span export batches"),
    Variable("OTEL_BSP_MAX_QUEUE_SIZE", "2048", "spans buffered; the oldest are dropped past it"),
    Variable("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "512", "spans per export request"),
    Variable("OTEL_BSP_EXPORT_TIMEOUT", "10000", "ms one export may take"),
    Variable("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "128", "attributes kept per span"),
    Variable("OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", "2048", "characters kept per attribute value"),
    Variable(
        "SENTRY_DSN",
        "",
        "where error events go: Lookout's server (`http://KEY@host:8686/PROJECT`) or a "
        "real Sentry; unset, error capture is off",
    ),
    Variable(
        "SENTRY_TRACES_SAMPLE_RATE",
        "",
        "turns sentry-sdk's own performance tracing on at this rate (off by default: "
        "OpenTelemetry traces already cover it)",
    ),
    Variable("SENTRY_RELEASE", "", "version, when neither `version=` nor `service.version` is set"),
    Variable("SENTRY_ENVIRONMENT", "", "environment, when no other source names one"),
    Variable(
        "LOOKOUT_ENVIRONMENT",
        "production",
        "deployment environment (`local`, `dev`, `staging`, `production` ...)",
    ),
    Variable(
        "LOOKOUT_DEBUG_ENVIRONMENTS",
        "local,dev,development",
        "environments where DEBUG logs are emitted; elsewhere the floor is INFO",
    ),
    Variable(
        "LOOKOUT_LOG_LEVEL",
        "INFO (DEBUG in a debug environment)",
        "`DEBUG`, `INFO`, `WARNING` or `ERROR`",
    ),
    Variable("LOOKOUT_ACCESS_LOG", "true", "one `http_request` log line per request"),
    Variable(
        "LOOKOUT_METRICS_ADDR",
        "127.0.0.1:0",
        "`host:port` of the separate metrics listener (port 0: any free port, "
        "reported at start); `off` disables it",
    ),
    Variable("LOOKOUT_METRICS_ON_APP", "false", "also serve `/metrics` from the app itself"),
    Variable(
        "LOOKOUT_EXCLUDED_PATHS",
        "/metrics,/healthz,/readyz",
        "paths left out of spans, access logs and RED metrics",
    ),
    Variable(
        "LOOKOUT_PROPAGATE_TO",
        "internal",
        "hosts that receive trace headers: `host`, `host:port`, `*.domain`, a CIDR, "
        "`internal` (loopback, single-label names, *.internal, *.local, *.svc, "
        "*.cluster.local) or `none`",
    ),
    Variable(
        "LOOKOUT_TRUST_INBOUND_CONTEXT",
        "true",
        "`false` at the edge: always start a new trace, keep a client's id as a link",
    ),
    Variable(
        "LOOKOUT_SCRUB",
        "true",
        "`false` turns scrubbing of logs, span attributes and error events off",
    ),
    Variable(
        "LOOKOUT_SCRUB_KEY",
        "lookout-insecure-default-key",
        "HMAC key for hashing phone numbers; the server must use the same one. Set it in "
        "production: with the default, a hash can be reversed by trying every number",
    ),
    Variable(
        "LOOKOUT_FRAMEWORK_SPANS",
        "false",
        "`true` keeps FastAPI's own telemetry (its server span, metrics and operation spans)",
    ),
)

_BY_NAME = {v.name: v for v in VARIABLES}
_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


def _invalid(name: str, value: str, expected: str) -> None:
    warn_once(
        f"env:{name}",
        "lookout.sdk: %s has value %r. Expected %s. Using the default instead.",
        name,
        value,
        expected,
    )


def env(name: str, environ: Mapping[str, str]) -> str | None:
    """The raw value of a registered variable, or None when unset or blank."""
    assert name in _BY_NAME, f"{name} is not in the SDK's variable registry"
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("true", "1", "yes", "on"):
        return True
    if lowered in ("false", "0", "no", "off"):
        return False
    raise ValueError(text)


def parse_key_values(text: str) -> dict[str, str]:
    """Parse W3C-baggage-style `k=v,k2=v2` with percent-encoded values."""
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(item)
        out[key.strip()] = unquote(value.strip())
    return out


def _typed(
    name: str, environ: Mapping[str, str], parse: Callable[[str], Any], expected: str
) -> Any:
    raw = env(name, environ)
    if raw is None:
        return None
    try:
        return parse(raw)
    except (ValueError, TypeError):
        _invalid(name, raw, expected)
        return None


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise ValueError(text)
    return value


def _ratio(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise ValueError(text)
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        lowered = text.lower()
        if lowered not in options:
            raise ValueError(text)
        return lowered

    return parse


def _matching(pattern: str) -> Callable[[str], str]:
    """A parser that accepts text matching `pattern` whole."""
    compiled = re.compile(pattern)

    def parse(text: str) -> str:
        if not compiled.fullmatch(text):
            raise ValueError(text)
        return text

    return parse


_http_url = _matching(r"https?://[^/\s?#]+(/\S*)?")
_dsn = _matching(r"https?://[^@/\s]+@[^/\s]+(/\S*)?/\d+")


@dataclass(frozen=True)
class OtlpTarget:
    """Where and how one signal is exported over OTLP/HTTP."""

    endpoint: str
    headers: dict[str, str]
    timeout_s: float
    compression: str
    certificate: str | None
    client_key: str | None
    client_certificate: str | None


def _otlp_target(signal: str, environ: Mapping[str, str], base: str | None) -> OtlpTarget:
    def pick(key: str) -> str | None:
        return env(f"OTEL_EXPORTER_OTLP_{signal}_{key}", environ) or env(
            f"OTEL_EXPORTER_OTLP_{key}", environ
        )

    def url(name: str) -> str | None:
        value = _typed(name, environ, _http_url, "an http(s) URL such as http://lookout:4318")
        return None if value is None else str(value)

    endpoint = url(f"OTEL_EXPORTER_OTLP_{signal}_ENDPOINT")
    if endpoint is None:
        root = base or url("OTEL_EXPORTER_OTLP_ENDPOINT") or "http://localhost:4318"
        endpoint = f"{root.rstrip('/')}/v1/{signal.lower()}"
    headers: dict[str, str] = {}
    for key in ("OTEL_EXPORTER_OTLP_HEADERS", f"OTEL_EXPORTER_OTLP_{signal}_HEADERS"):
        parsed = _typed(key, environ, parse_key_values, "`key=value,...`")
        headers.update(parsed or {})
    timeout_ms = None
    for key in (f"OTEL_EXPORTER_OTLP_{signal}_TIMEOUT", "OTEL_EXPORTER_OTLP_TIMEOUT"):
        timeout_ms = timeout_ms or _typed(key, environ, _positive_int, "milliseconds > 0")
    compression = None
    for key in (f"OTEL_EXPORTER_OTLP_{signal}_COMPRESSION", "OTEL_EXPORTER_OTLP_COMPRESSION"):
        compression = compression or _typed(
            key, environ, _choice(("gzip", "deflate", "none")), "gzip, deflate or none"
        )
    for key in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env(key, environ)
        if protocol is not None and protocol != "http/protobuf":
            _invalid(key, protocol, "http/protobuf (the only protocol this SDK speaks)")
    return OtlpTarget(
        endpoint=endpoint,
        headers=headers,
        timeout_s=(timeout_ms or 10_000) / 1000,
        compression=compression or "none",
        certificate=pick("CERTIFICATE"),
        client_key=pick("CLIENT_KEY"),
        client_certificate=pick("CLIENT_CERTIFICATE"),
    )


@dataclass(frozen=True)
class Settings:
    """Everything `init()` decided, after keywords, variables and defaults."""

    service: str
    version: str
    environment: str
    instance_id: str
    resource_attributes: dict[str, str]
    sdk_disabled: bool
    traces_exporter: str
    logs_exporter: str
    traces: OtlpTarget
    logs: OtlpTarget
    sampler: str
    sampler_arg: float
    propagators: tuple[str, ...]
    bsp_schedule_delay_ms: int
    bsp_max_queue_size: int
    bsp_max_export_batch_size: int
    bsp_export_timeout_ms: int
    span_attribute_count_limit: int
    attribute_value_length_limit: int
    log_level: str
    debug_environments: tuple[str, ...]
    access_log: bool
    metrics_addr: tuple[str, int] | None
    metrics_on_app: bool
    excluded_paths: frozenset[str]
    propagate_to: tuple[str, ...]
    trust_inbound_context: bool
    framework_spans: bool
    scrub: bool
    scrub_key: str
    sentry_dsn: str | None
    sentry_traces_sample_rate: float | None


def parse_addr(text: str) -> tuple[str, int] | None:
    """`host:port`, `:port` or `[v6]:port`; `off` means no listener."""
    if text.strip().lower() in ("off", "none", "false", "disabled"):
        return None
    host, sep, port_text = text.strip().rpartition(":")
    if not sep:
        raise ValueError(text)
    host = host.strip("[]") or "127.0.0.1"
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise ValueError(text)
    return host, port


def parse_list(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


def validate_host_pattern(pattern: str) -> str:
    """Check one LOOKOUT_PROPAGATE_TO entry and return it normalised."""
    lowered = pattern.strip().lower()
    if lowered in ("internal", "none"):
        return lowered
    if "/" in lowered:
        ipaddress.ip_network(lowered, strict=False)
        return lowered
    if not re.fullmatch(r"(\*\.)?[a-z0-9_.\-\[\]:]+", lowered):
        raise ValueError(pattern)
    return lowered


@dataclass(frozen=True)
class _Identity:
    service: str
    version: str
    environment: str
    instance_id: str
    attributes: dict[str, str]


def _identity(environ: Mapping[str, str], given: Mapping[str, Any]) -> _Identity:
    """Service name, version and environment, each from the first source that has it."""
    attrs = _typed("OTEL_RESOURCE_ATTRIBUTES", environ, parse_key_values, "`key=value,...`")
    attrs = dict(attrs or {})
    attrs.update({str(k): str(v) for k, v in (given.get("resource_attributes") or {}).items()})
    service = given.get("service") or env("OTEL_SERVICE_NAME", environ) or attrs.get("service.name")
    if not service:
        service = "unknown_service"
        warn_once("service", "lookout.sdk: no service name; pass init(service=...).")
    version = (
        given.get("version")
        or attrs.get("service.version")
        or env("SENTRY_RELEASE", environ)
        or "unknown"
    )
    environment = (
        given.get("environment")
        or env("LOOKOUT_ENVIRONMENT", environ)
        or attrs.get("deployment.environment.name")
        or attrs.get("deployment.environment")
        or env("SENTRY_ENVIRONMENT", environ)
        or "production"
    )
    instance_id = attrs.get("service.instance.id") or str(uuid.uuid4())
    return _Identity(str(service), str(version), str(environment), instance_id, attrs)


def _log_level(
    environ: Mapping[str, str], given: Mapping[str, Any], environment: str
) -> tuple[str, tuple[str, ...]]:
    """The effective level; DEBUG only in a debug environment, whatever was asked."""
    debug_envs = tuple(
        e.lower()
        for e in (
            given.get("debug_environments")
            or _typed("LOOKOUT_DEBUG_ENVIRONMENTS", environ, parse_list, "a list")
            or ("local", "dev", "development")
        )
    )
    is_debug_env = environment.lower() in debug_envs
    level = given.get("log_level")
    if level is not None and str(level).upper() not in _LEVELS:
        raise ConfigError("log_level", level, "one of DEBUG, INFO, WARNING, ERROR")
    level = level or _typed(
        "LOOKOUT_LOG_LEVEL",
        environ,
        _choice(tuple(x.lower() for x in _LEVELS)),
        "DEBUG, INFO, WARNING or ERROR",
    )
    level = str(level or ("debug" if is_debug_env else "info")).upper()
    if level == "DEBUG" and not is_debug_env:
        warn_once(
            "debug-floor",
            "lookout.sdk: DEBUG logs are emitted only in %s; environment is %r, using INFO.",
            ",".join(debug_envs),
            environment,
        )
        level = "INFO"
    return level, debug_envs


def _metrics_addr(environ: Mapping[str, str], given: Mapping[str, Any]) -> tuple[str, int] | None:
    if given.get("metrics_addr") is not None:
        try:
            return parse_addr(str(given["metrics_addr"]))
        except ValueError as exc:
            raise ConfigError(
                "metrics_addr", given["metrics_addr"], "'host:port' or 'off'"
            ) from exc
    raw = env("LOOKOUT_METRICS_ADDR", environ)
    if raw is not None:
        try:
            return parse_addr(raw)
        except ValueError:
            _invalid("LOOKOUT_METRICS_ADDR", raw, "'host:port' or 'off'")
    return ("127.0.0.1", 0)


def _propagate_to(environ: Mapping[str, str], given: Mapping[str, Any]) -> tuple[str, ...]:
    patterns = given.get("propagate_to")
    if patterns is not None:
        try:
            return tuple(validate_host_pattern(p) for p in patterns)
        except ValueError as exc:
            raise ConfigError(
                "propagate_to", patterns, "host patterns such as 'auth', '*.internal'"
            ) from exc
    parsed = _typed(
        "LOOKOUT_PROPAGATE_TO",
        environ,
        lambda t: tuple(validate_host_pattern(p) for p in parse_list(t)),
        "host patterns such as 'auth,*.internal,10.0.0.0/8,api:8080' or 'internal'",
    )
    return tuple(parsed) if parsed is not None else ("internal",)


def resolve(environ: Mapping[str, str] | None = None, **given: Any) -> Settings:
    """Merge keywords, variables and defaults into Settings.

    A keyword with a bad value is the caller's mistake in code, so it raises ConfigError;
    a bad variable is an operator's mistake at run time, so it warns and falls back.
    """
    environ = os.environ if environ is None else environ
    identity = _identity(environ, given)
    level, debug_envs = _log_level(environ, given, identity.environment)

    def flag(keyword: str, name: str, default: bool) -> bool:
        if given.get(keyword) is not None:
            return bool(given[keyword])
        value = _typed(name, environ, parse_bool, "true or false")
        return default if value is None else bool(value)

    def number(name: str, default: int, parse: Callable[[str], int] = _positive_int) -> int:
        value = _typed(name, environ, parse, "a whole number")
        return default if value is None else int(value)

    excluded = given.get("excluded_paths")
    if excluded is None:
        excluded = _typed("LOOKOUT_EXCLUDED_PATHS", environ, parse_list, "a list of paths")
    for keyword, options in (("sampler", _SAMPLERS), ("traces_exporter", ("otlp", "none"))):
        if given.get(keyword) is not None and given[keyword] not in options:
            raise ConfigError(keyword, given[keyword], "one of " + ", ".join(options))
    sampler = given.get("sampler") or _typed(
        "OTEL_TRACES_SAMPLER", environ, _choice(_SAMPLERS), " or ".join(_SAMPLERS)
    )
    sampler_arg = _typed("OTEL_TRACES_SAMPLER_ARG", environ, _ratio, "a ratio from 0 to 1")
    propagators = _typed(
        "OTEL_PROPAGATORS",
        environ,
        lambda t: tuple(_choice(("tracecontext", "baggage", "none"))(p) for p in parse_list(t)),
        "a list of tracecontext, baggage, none",
    )
    exporter = _choice(("otlp", "none"))
    endpoint = given.get("otlp_endpoint")
    return Settings(
        service=identity.service,
        version=identity.version,
        environment=identity.environment,
        instance_id=identity.instance_id,
        resource_attributes=identity.attributes,
        sdk_disabled=flag("sdk_disabled", "OTEL_SDK_DISABLED", default=False),
        traces_exporter=given.get("traces_exporter")
        or _typed("OTEL_TRACES_EXPORTER", environ, exporter, "otlp or none")
        or "otlp",
        logs_exporter=_typed("OTEL_LOGS_EXPORTER", environ, exporter, "otlp or none") or "none",
        traces=_otlp_target("TRACES", environ, endpoint),
        logs=_otlp_target("LOGS", environ, endpoint),
        sampler=sampler or "parentbased_always_on",
        sampler_arg=1.0 if sampler_arg is None else float(sampler_arg),
        propagators=propagators or ("tracecontext", "baggage"),
        bsp_schedule_delay_ms=number("OTEL_BSP_SCHEDULE_DELAY", 1000),
        bsp_max_queue_size=number("OTEL_BSP_MAX_QUEUE_SIZE", 2048),
        bsp_max_export_batch_size=number("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 512),
        bsp_export_timeout_ms=number("OTEL_BSP_EXPORT_TIMEOUT", 10_000),
        span_attribute_count_limit=number(
            "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", 128, _non_negative_int
        ),
        attribute_value_length_limit=number(
            "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT", 2048, _non_negative_int
        ),
        log_level=level,
        debug_environments=debug_envs,
        access_log=flag("access_log", "LOOKOUT_ACCESS_LOG", default=True),
        metrics_addr=_metrics_addr(environ, given),
        metrics_on_app=flag("metrics_on_app", "LOOKOUT_METRICS_ON_APP", default=False),
        excluded_paths=frozenset(
            excluded if excluded is not None else ("/metrics", "/healthz", "/readyz")
        ),
        propagate_to=_propagate_to(environ, given),
        trust_inbound_context=flag(
            "trust_inbound_context", "LOOKOUT_TRUST_INBOUND_CONTEXT", default=True
        ),
        framework_spans=flag("framework_spans", "LOOKOUT_FRAMEWORK_SPANS", default=False),
        scrub=flag("scrub", "LOOKOUT_SCRUB", default=True),
        scrub_key=_scrub_key(environ, identity.environment, debug_envs),
        sentry_dsn=given.get("dsn") or _typed("SENTRY_DSN", environ, _dsn, "a DSN URL"),
        sentry_traces_sample_rate=_typed(
            "SENTRY_TRACES_SAMPLE_RATE", environ, _ratio, "a ratio from 0 to 1"
        ),
    )


DEFAULT_SCRUB_KEY = "lookout-insecure-default-key"


def _scrub_key(environ: Mapping[str, str], environment: str, debug_envs: tuple[str, ...]) -> str:
    key = env("LOOKOUT_SCRUB_KEY", environ)
    if key is None:
        if environment.lower() not in debug_envs:
            warn_once(
                "scrub-key",
                "lookout.sdk: LOOKOUT_SCRUB_KEY is not set; phone-number hashes use the public "
                "default key in environment %r. Set the same secret key here and on the server.",
                environment,
            )
        return DEFAULT_SCRUB_KEY
    return key
