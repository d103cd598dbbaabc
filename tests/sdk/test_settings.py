"""Configuration: keyword > variable > default, the version chain, and bad values."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import httpx
import pytest

import lookout.sdk
from lookout.errors import ConfigError
from lookout.sdk import testing
from lookout.sdk._settings import VARIABLES, resolve
from tests.support import http_peer

# A value each typed variable cannot use; free-text variables get NASTY instead.
INVALID = {
    "OTEL_SDK_DISABLED": "maybe",
    "OTEL_RESOURCE_ATTRIBUTES": "no-equals-sign,=novalue",
    "OTEL_TRACES_EXPORTER": "zipkin",
    "OTEL_LOGS_EXPORTER": "loki",
    "OTEL_TRACES_SAMPLER": "sometimes",
    "OTEL_TRACES_SAMPLER_ARG": "1.5",
    "OTEL_PROPAGATORS": "b3,xray",
    "OTEL_BSP_SCHEDULE_DELAY": "-5",
    "OTEL_BSP_MAX_QUEUE_SIZE": "lots",
    "OTEL_BSP_MAX_EXPORT_BATCH_SIZE": "0",
    "OTEL_BSP_EXPORT_TIMEOUT": "1e3",
    "OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT": "-1",
    "OTEL_ATTRIBUTE_VALUE_LENGTH_LIMIT": "many",
    "LOOKOUT_LOG_LEVEL": "TRACE",
    "LOOKOUT_ACCESS_LOG": "perhaps",
    "LOOKOUT_METRICS_ADDR": "nowhere",
    "LOOKOUT_METRICS_ON_APP": "2",
    "LOOKOUT_PROPAGATE_TO": "bad pattern!,1.2.3.4/99",
    "LOOKOUT_TRUST_INBOUND_CONTEXT": "nah",
    "LOOKOUT_FRAMEWORK_SPANS": "yes please",
}
NASTY = "\x00\n\t" + "é" * 3000 + "%zz"
for _var in VARIABLES:
    if _var.name.endswith(("_TIMEOUT",)) and _var.name not in INVALID:
        INVALID[_var.name] = "soon"
    elif _var.name.endswith("_COMPRESSION"):
        INVALID[_var.name] = "lz4"
    elif _var.name.endswith("_PROTOCOL"):
        INVALID[_var.name] = "grpc"
    elif _var.name.endswith("_ENDPOINT"):
        INVALID[_var.name] = "not a url"
    elif _var.name.endswith("_HEADERS"):
        INVALID[_var.name] = "novalue,=x"
    elif _var.name.endswith(("_CERTIFICATE", "_CLIENT_KEY")):
        INVALID[_var.name] = "/nonexistent/cert.pem"


async def _ok(scope: Any, receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("name", [v.name for v in VARIABLES])
def test_every_variable_with_a_bad_value_never_breaks_the_host(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """init() and 1,000 requests succeed whatever the value, and each cause is reported at
    most once on the internal logger."""
    caplog.set_level(logging.WARNING, logger="lookout.sdk.internal")
    environ = {name: INVALID.get(name, NASTY)}
    with http_peer() as (sink, _):
        if "ENDPOINT" not in name:  # a live sink keeps shutdown quick
            environ.setdefault("OTEL_EXPORTER_OTLP_ENDPOINT", sink)
        app = lookout.sdk.init("svc", app=_ok, environ=environ, metrics_addr="off")
        assert testing.drive(app, 1000) == [200] * 1000
        lookout.sdk.shutdown(timeout_s=0.5)
    internal = [r.getMessage() for r in caplog.records if r.name == "lookout.sdk.internal"]
    assert len(internal) == len(set(internal)), internal


# Certificate and key paths are free text here; a missing file is the exporter's report.
TYPED = sorted(n for n in INVALID if not n.endswith(("CERTIFICATE", "CLIENT_KEY")))


@pytest.mark.parametrize("name", TYPED)
def test_a_bad_typed_variable_is_reported_once_and_replaced_by_its_default(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="lookout.sdk.internal")
    resolve({name: INVALID[name]}, service="svc")
    resolve({name: INVALID[name]}, service="svc")
    warnings = [r for r in caplog.records if name in r.getMessage()]
    assert len(warnings) == 1, [r.getMessage() for r in caplog.records]
    assert "Expected" in warnings[0].getMessage()


def test_keyword_beats_variable_beats_default() -> None:
    environ = {"OTEL_SERVICE_NAME": "from-env", "LOOKOUT_ENVIRONMENT": "staging"}
    assert resolve(environ, service="from-kw").service == "from-kw"
    assert resolve(environ).service == "from-env"
    assert resolve(environ).environment == "staging"
    assert resolve({}, service="s").environment == "production"
    assert resolve({"OTEL_RESOURCE_ATTRIBUTES": "service.name=from-attrs"}).service == (
        "from-attrs"
    )


@pytest.mark.parametrize(
    ("kw", "environ", "expected"),
    [
        (
            "1.0.0",
            {"OTEL_RESOURCE_ATTRIBUTES": "service.version=2.0.0", "SENTRY_RELEASE": "3"},
            "1.0.0",
        ),
        (
            None,
            {"OTEL_RESOURCE_ATTRIBUTES": "service.version=2.0.0", "SENTRY_RELEASE": "3"},
            "2.0.0",
        ),
        (None, {"SENTRY_RELEASE": "3.0.0"}, "3.0.0"),
        (None, {}, "unknown"),
    ],
)
def test_one_version_from_keyword_then_resource_attributes_then_sentry_release(
    kw: str | None, environ: dict[str, str], expected: str
) -> None:
    assert resolve(environ, service="s", version=kw).version == expected


def test_resource_attribute_values_are_percent_decoded() -> None:
    settings = resolve({"OTEL_RESOURCE_ATTRIBUTES": "team=pay%20ments,region=ke"}, service="s")
    assert settings.resource_attributes == {"team": "pay ments", "region": "ke"}


@pytest.mark.parametrize(
    ("environ", "traces_endpoint"),
    [
        ({}, "http://localhost:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://lookout:4318/"}, "http://lookout:4318/v1/traces"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://lookout:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://t.example/custom",
            },
            "https://t.example/custom",
        ),
    ],
)
def test_otlp_endpoint_base_gets_the_signal_path_and_per_signal_is_used_as_is(
    environ: dict[str, str], traces_endpoint: str
) -> None:
    assert resolve(environ, service="s").traces.endpoint == traces_endpoint


def test_per_signal_headers_timeout_and_compression_override_the_general_ones() -> None:
    settings = resolve(
        {
            "OTEL_EXPORTER_OTLP_HEADERS": "authorization=Bearer%20abc,x-a=1",
            "OTEL_EXPORTER_OTLP_TRACES_HEADERS": "x-a=2",
            "OTEL_EXPORTER_OTLP_TIMEOUT": "5000",
            "OTEL_EXPORTER_OTLP_TRACES_TIMEOUT": "2500",
            "OTEL_EXPORTER_OTLP_COMPRESSION": "gzip",
            "OTEL_EXPORTER_OTLP_LOGS_COMPRESSION": "none",
        },
        service="s",
    )
    assert settings.traces.headers == {"authorization": "Bearer abc", "x-a": "2"}
    assert settings.traces.timeout_s == 2.5
    assert settings.logs.timeout_s == 5.0
    assert settings.traces.compression == "gzip"
    assert settings.logs.compression == "none"


@pytest.mark.parametrize(
    ("keyword", "value"),
    [
        ("sampler", "sometimes"),
        ("log_level", "TRACE"),
        ("metrics_addr", "nowhere"),
        ("traces_exporter", "zipkin"),
    ],
)
def test_a_bad_keyword_is_a_config_error_naming_it(keyword: str, value: str) -> None:
    with pytest.raises(ConfigError, match=keyword):
        resolve({}, service="s", **{keyword: value})


def test_sdk_disabled_turns_tracing_off_but_keeps_logs_and_metrics() -> None:
    app = lookout.sdk.init(
        "svc", app=_ok, environ={"OTEL_SDK_DISABLED": "true"}, metrics_addr="off"
    )

    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            return await client.get("/")

    response = asyncio.run(call())
    assert response.status_code == 200
    assert "x-trace-id" not in response.headers
    runtime = lookout.sdk._runtime
    assert runtime is not None
    assert runtime.provider is None
