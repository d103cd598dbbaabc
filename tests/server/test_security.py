"""Security: no listening beyond loopback without credentials, 401/403 with a reason,
TLS, and server-side scrubbing checked byte by byte in the data directory."""

from __future__ import annotations

import base64
import json
import os
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import pytest

from tests.conftest import require_binary
from tests.server.conftest import (
    DSN_KEY,
    InProcess,
    RunningServer,
    config_for,
    in_process,
    start_server,
)
from tests.support import ROOT, free_port

INGEST_TOKEN = "ingest-token-project-1-abcdef"
QUERY_TOKEN = "query-token-for-grafana-123456"
USER, PASSWORD = "grafana", "grafana-password-1"
SECURE_ENV = {
    "LOOKOUT_INGEST_TOKENS": f"1={INGEST_TOKEN}",
    "LOOKOUT_QUERY_TOKENS": QUERY_TOKEN,
    "LOOKOUT_QUERY_USERS": f"{USER}:{PASSWORD}",
    "LOOKOUT_SENTRY_KEYS": f"1={DSN_KEY}",
    "LOOKOUT_SCRUB_KEY": "a-secret-hash-key",
}
CORPUS = json.loads((ROOT / "tests" / "fixtures" / "scrub" / "corpus.json").read_text())


def _server_command(
    data_dir: Path, *args: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LOOKOUT_")}
    return subprocess.run(
        [sys.executable, "-m", "lookout", "server", "--data-dir", str(data_dir), *args],
        cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "missing", ["LOOKOUT_INGEST_TOKENS", "LOOKOUT_QUERY_TOKENS", "LOOKOUT_SENTRY_KEYS",
                "LOOKOUT_SCRUB_KEY"],
)  # fmt: skip
def test_beyond_loopback_it_refuses_to_start_without_each_credential(
    tmp_path: Path, missing: str
) -> None:
    env = {k: v for k, v in SECURE_ENV.items() if k != missing}
    if missing == "LOOKOUT_QUERY_TOKENS":
        env.pop("LOOKOUT_QUERY_USERS")  # either query credential would do
    started = time.monotonic()
    port = str(free_port())
    result = _server_command(tmp_path / "data", "--host", "0.0.0.0", "--port", port, env=env)
    assert result.returncode == 2, result.stderr
    assert time.monotonic() - started < 30
    key = {"LOOKOUT_INGEST_TOKENS": "ingest_tokens", "LOOKOUT_QUERY_TOKENS": "query_tokens",
           "LOOKOUT_SENTRY_KEYS": "projects", "LOOKOUT_SCRUB_KEY": "scrub_key"}[missing]  # fmt: skip
    assert f"  {key}:" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "data").exists(), "it stops before opening the store"


def test_beyond_loopback_with_every_credential_the_config_passes(tmp_path: Path) -> None:
    result = _server_command(tmp_path / "d", "--host", "0.0.0.0", "--check-config", env=SECURE_ENV)
    assert (result.returncode, result.stdout.strip()) == (0, "config OK"), result.stderr
    loopback = _server_command(tmp_path / "d", "--host", "::1", "--check-config", env={})
    assert loopback.returncode == 0, "loopback needs no credentials"


@pytest.mark.parametrize(
    ("env", "key"),
    [
        ({"LOOKOUT_INGEST_TOKENS": "1=short"}, "ingest_tokens.1"),
        ({"LOOKOUT_INGEST_TOKENS": f"9={INGEST_TOKEN}"}, "ingest_tokens.9"),
        ({"LOOKOUT_QUERY_USERS": "grafana:short"}, "query_users.grafana"),
        ({"LOOKOUT_TLS_CERT": "/etc/hostname"}, "tls_key"),
        ({"LOOKOUT_TLS_KEY": "/nonexistent.pem"}, "tls_key"),
        ({"LOOKOUT_LIMITS": "max_body=lots"}, "limits.max_body"),
        ({"LOOKOUT_LIMITS": "max_bodies=1MiB"}, "limits.max_bodies"),
    ],
)
def test_bad_security_and_limit_settings_exit_2_naming_the_key(
    tmp_path: Path, env: dict[str, str], key: str
) -> None:
    result = _server_command(tmp_path / "d", "--check-config", env=env)
    assert result.returncode == 2
    assert key in result.stderr
    assert "Traceback" not in result.stderr


@pytest.fixture
def secured(tmp_path: Path) -> Iterator[InProcess]:
    config = config_for(
        tmp_path / "data",
        ingest_tokens={INGEST_TOKEN: 1},
        query_tokens=(QUERY_TOKEN,),
        query_users={USER: PASSWORD},
    )
    with in_process(config) as server:
        yield server


def _basic(user: str, password: str) -> dict[str, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"authorization": f"Basic {token}"}


def _logs_body() -> bytes:
    record = {"timeUnixNano": str(time.time_ns()), "body": {"stringValue": "hello"}}
    return json.dumps({"resourceLogs": [{"scopeLogs": [{"logRecords": [record]}]}]}).encode()


def test_ingest_needs_a_project_token(secured: InProcess) -> None:
    json_body = {"content": _logs_body(), "headers": {"content-type": "application/json"}}
    missing = secured.client.post("/v1/logs", **json_body)  # type: ignore[arg-type]
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"].startswith("Bearer")
    assert "unauthenticated" in missing.json()["message"], "OTLP's own error shape"
    wrong = secured.client.post(
        "/v1/logs", content=_logs_body(),
        headers={"content-type": "application/json", "authorization": "Bearer not-a-token-at-all"},
    )  # fmt: skip
    assert wrong.status_code == 403
    assert "not one of this server's tokens" in wrong.json()["message"]
    right = secured.client.post(
        "/v1/logs", content=_logs_body(),
        headers={"content-type": "application/json", "authorization": f"Bearer {INGEST_TOKEN}"},
    )  # fmt: skip
    assert right.status_code == 200
    push = {"streams": [{"stream": {"app": "x"}, "values": [[str(time.time_ns()), "line"]]}]}
    loki = secured.client.post(
        "/loki/api/v1/push", json=push, headers=_basic("tenant-1", INGEST_TOKEN)
    )
    assert loki.status_code == 204, "Promtail's basic_auth: the token as the password"
    lines = secured.client.post("/api/lookout/lines", json={"lines": []})
    assert lines.status_code == 401
    # `lookout run --scrape auto` registers its child's endpoint with its ingest token.
    registration = {"job": "x", "targets": ["127.0.0.1:9"]}
    assert secured.client.post("/api/targets", json=registration).status_code == 401
    token = {"authorization": f"Bearer {INGEST_TOKEN}"}
    assert secured.client.post("/api/targets", json=registration, headers=token).status_code == 201
    rejected = secured.runtime.metrics.rejected
    assert rejected.labels("ingest", "unauthenticated")._value.get() == 3
    assert rejected.labels("ingest", "forbidden")._value.get() == 1


def test_reads_need_the_query_credential_by_bearer_or_basic(secured: InProcess) -> None:
    for path in ("/api/lookout/logs", "/api/v1/targets", "/api/lookout/nothing-here"):
        missing = secured.client.get(path)
        assert missing.status_code == 401, path
        assert missing.json()["error"]["code"] == "unauthenticated"
        assert missing.headers["www-authenticate"].startswith("Basic")
    assert secured.client.get("/api/lookout/logs", headers=_basic(USER, "wrong")).status_code == 403
    ingest_token = {"authorization": f"Bearer {INGEST_TOKEN}"}
    assert secured.client.get("/api/lookout/logs", headers=ingest_token).status_code == 403, (
        "an ingest token reads nothing"
    )
    bearer = {"authorization": f"Bearer {QUERY_TOKEN}"}
    assert secured.client.get("/api/lookout/logs", headers=bearer).status_code == 200
    assert (
        secured.client.get("/api/lookout/logs", headers=_basic(USER, PASSWORD)).status_code == 200
    )
    for path in ("/healthz", "/readyz"):
        assert secured.client.get(path).status_code == 200, "probes stay open"


def test_sentry_keeps_its_dsn_key_and_needs_no_bearer(secured: InProcess) -> None:
    event = {"event_id": "ab" * 16, "message": "boom", "level": "error"}
    url = "/api/1/store/"
    assert secured.client.post(url, json=event).status_code == 401
    assert (
        secured.client.post(
            url, json=event, headers={"x-sentry-auth": "Sentry sentry_key=wrong"}
        ).status_code
        == 403
    )
    ok = secured.client.post(
        url, json=event, headers={"x-sentry-auth": f"Sentry sentry_key={DSN_KEY}"}
    )
    assert ok.status_code == 200


def test_a_server_without_credentials_on_loopback_is_open(served: InProcess) -> None:
    assert served.client.get("/api/lookout/logs").status_code == 200


def _self_signed(folder: Path) -> tuple[Path, Path]:
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


def test_tls_serves_https_with_the_given_certificate(tmp_path: Path) -> None:
    require_binary("openssl", "openssl")
    cert, key = _self_signed(tmp_path)
    server = start_server(
        tmp_path / "data", "--tls-cert", str(cert), "--tls-key", str(key), verify=str(cert)
    )
    try:
        https = server.url.replace("http://", "https://")
        trusted = ssl.create_default_context(cafile=str(cert))
        assert httpx.get(f"{https}/readyz", verify=trusted, timeout=5).status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"{server.url}/readyz", timeout=5)  # plain HTTP is not spoken
    finally:
        assert server.stop() == 0


# -- server-side scrubbing ----------------------------------------------------------------


def _attributes(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [{"key": k, "value": {"stringValue": v}} for k, v in pairs]


def _send_corpus(server: RunningServer) -> None:
    """Every seeded secret through every way in: OTLP spans and logs, shipped lines, Loki,
    a Sentry event and metric labels, each raw, with no SDK scrubbing it first."""
    now = time.time_ns()
    pairs = [(p["key"], p["value"]) for p in CORPUS["positives"]]
    free = " | ".join(p["value"] for p in CORPUS["positives"] if p["kind"] != "key")
    resource = {"attributes": _attributes([("service.name", "raw-service")])}
    span = {"traceId": "ab" * 16, "spanId": "cd" * 8, "name": "POST /pay", "kind": 2,
            "startTimeUnixNano": str(now), "endTimeUnixNano": str(now + 1000),
            "attributes": _attributes(pairs), "status": {"code": 2, "message": free}}  # fmt: skip
    traces = {"resourceSpans": [{"resource": resource, "scopeSpans": [{"spans": [span]}]}]}
    record = {"timeUnixNano": str(now), "body": {"stringValue": free},
              "attributes": _attributes(pairs)}  # fmt: skip
    logs = {"resourceLogs": [{"resource": resource, "scopeLogs": [{"logRecords": [record]}]}]}
    points = [{"timeUnixNano": str(now), "asDouble": 1.0, "attributes": _attributes([pair])}
              for pair in pairs]  # fmt: skip
    metric = {"name": "raw_payments", "gauge": {"dataPoints": points}}
    metrics = {"resourceMetrics": [{"resource": resource,
                                    "scopeMetrics": [{"metrics": [metric]}]}]}  # fmt: skip
    as_json = {"content-type": "application/json"}
    for path, body in (("/v1/traces", traces), ("/v1/logs", logs), ("/v1/metrics", metrics)):
        response = httpx.post(f"{server.url}{path}", json=body, headers=as_json, timeout=30)
        assert response.status_code == 200, response.text
    line = json.dumps({"event": free, **dict(pairs)})
    shipped = {"source": "s1", "seq": 1, "service": "raw-service",
               "lines": [{"ts_ns": now, "stream": "stdout", "text": line},
                         {"ts_ns": now, "stream": "stderr", "text": free}]}  # fmt: skip
    response = httpx.post(f"{server.url}/api/lookout/lines", json=shipped, timeout=30)
    assert response.status_code == 200, response.text
    push = {"streams": [{"stream": {"app": "raw"},
                         "values": [[str(now), free, dict(pairs[:20])]]}]}  # fmt: skip
    assert httpx.post(f"{server.url}/loki/api/v1/push", json=push, timeout=30).status_code == 204
    event = {"event_id": "ef" * 16, "message": free, "level": "error",
             "extra": dict(pairs), "user": {"email": "wanjiku@example.co.ke"},
             "request": {"headers": dict(pairs[:10]), "url": "https://x.test/pay?" + free[:200]}}  # fmt: skip
    response = httpx.post(
        f"{server.url}/api/1/store/", json=event,
        headers={"x-sentry-auth": f"Sentry sentry_key={DSN_KEY}"}, timeout=30,
    )  # fmt: skip
    assert response.status_code == 200, response.text


def _needles(secrets: list[str], shortest: int) -> set[str]:
    """The lines of each secret (a PEM body is stored with its newline escaped) that are
    at least `shortest` long: a 3-digit CVV occurs in any binary file by chance."""
    return {line for s in secrets for line in s.split("\n") if len(line) >= shortest}


def _found_on_disk(data_dir: Path, needles: set[str]) -> dict[str, list[str]]:
    """needle -> files under data_dir whose bytes hold it."""
    found: dict[str, list[str]] = {}
    for path in (p for p in data_dir.rglob("*") if p.is_file()):
        raw = path.read_bytes()
        for needle in needles:
            if needle.encode() in raw:
                found.setdefault(needle, []).append(path.name)
    return found


def _stored(data_dir: Path) -> tuple[str, list[dict[str, Any]]]:
    """All stored text read back through DuckDB (compression undone), and the attribute
    maps of the stored spans and logs."""
    with duckdb.connect(str(data_dir / "lookout.duckdb"), read_only=True) as connection:
        text = "\n".join(
            str(row)
            for view in ("spans", "logs", "events", "series")
            for row in connection.execute(f"SELECT * FROM {view}").fetchall()
        )
        maps = [
            json.loads(raw)
            for view in ("spans", "logs")
            for (raw,) in connection.execute(f"SELECT attributes FROM {view}").fetchall()
        ]
    return text, maps


@pytest.mark.parametrize("scrub", [True, False], ids=["scrubbed", "negative-control-off"])
def test_seeded_secrets_never_reach_the_data_directory(tmp_path: Path, scrub: bool) -> None:
    secrets = sorted({p["secret"] for p in CORPUS["positives"]})
    data_dir = tmp_path / "data"
    server = start_server(data_dir, env={"LOOKOUT_SCRUB": str(scrub).lower()})
    try:
        _send_corpus(server)
    finally:
        assert server.stop() == 0
    on_disk = _found_on_disk(data_dir, _needles(secrets, 8))
    text, maps = _stored(data_dir)
    in_text = {n for n in _needles(secrets, 6) if n in text}
    # Short secrets (PINs, CVVs) where they were put: under their key.
    short = {p["key"]: p["secret"] for p in CORPUS["positives"] if len(p["secret"]) < 6}
    under_key = {
        secret
        for key, secret in short.items()
        for attributes in maps
        if secret in str(attributes.get(key, ""))
    }
    if scrub:
        assert on_disk == {}, f"{len(on_disk)} secrets found on disk: {sorted(on_disk)[:5]}"
        assert in_text == set()
        assert under_key == set()
    else:  # the same checks see them when scrubbing is off: they can fail
        assert on_disk
        assert in_text == _needles(secrets, 6)
        assert under_key == set(short.values())


def test_real_clients_against_a_server_listening_beyond_loopback(tmp_path: Path) -> None:
    """The OpenTelemetry exporters with OTEL_EXPORTER_OTLP_HEADERS, then reads by bearer
    and by basic auth, against a real server on 0.0.0.0."""
    server = start_server(tmp_path / "data", "--host", "0.0.0.0", env=SECURE_ENV)
    try:
        client_env = {
            **os.environ,
            "OTEL_EXPORTER_OTLP_HEADERS": f"Authorization=Bearer {INGEST_TOKEN}",
        }
        result = subprocess.run(
            [sys.executable, "-m", "tests.server.clients.otel_client", server.otlp_url],
            cwd=ROOT, env=client_env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        trace_id = json.loads(result.stdout.strip().splitlines()[-1])["trace_id"]
        url = f"{server.url}/api/lookout/traces/{trace_id}"
        assert httpx.get(url, timeout=10).status_code == 401
        bearer = {"authorization": f"Bearer {QUERY_TOKEN}"}
        assert len(httpx.get(url, headers=bearer, timeout=10).json()["spans"]) == 2
        assert httpx.get(url, auth=(USER, PASSWORD), timeout=10).status_code == 200
        assert httpx.get(f"{server.url}/readyz", timeout=10).status_code == 200
    finally:
        assert server.stop() == 0
