"""Shared fixtures: no global SDK state leaks between tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import uuid
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from lookout.sdk import testing

REQUIRE_REAL = os.environ.get("LOOKOUT_REQUIRE_REAL") == "1"


def require_real(what: str, *, available: bool, how: str) -> None:
    """Skip when a real part is missing on a laptop; fail when CI says it is required."""
    if available:
        return
    message = f"{what} is not available here ({how})"
    if REQUIRE_REAL:
        pytest.fail(f"LOOKOUT_REQUIRE_REAL=1 but {message}")
    pytest.skip(message)


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    require_real(name, available=path is not None, how=f"apt-get install {package}")
    assert path is not None
    return path


RUN_ID = uuid.uuid4().hex[:10]


def _postgres_admin_dsn() -> str:
    return os.environ.get("LOOKOUT_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A database of this test run's own on the machine's PostgreSQL (dropped afterwards)."""
    psycopg = pytest.importorskip("psycopg")
    admin = _postgres_admin_dsn()
    try:
        connection = psycopg.connect(admin, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        require_real("PostgreSQL", available=False, how=f"{admin}: {exc}".strip())
        raise
    name = f"lookout_test_{RUN_ID}"
    with connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    """A RabbitMQ vhost of this test run's own (deleted afterwards)."""
    ctl = shutil.which("rabbitmqctl")
    reachable = ctl is not None and _port_open("127.0.0.1", 5672)
    require_real(
        "RabbitMQ", available=reachable, how="rabbitmq-server on 127.0.0.1:5672 with rabbitmqctl"
    )
    assert ctl is not None
    vhost = f"lookout-test-{RUN_ID}"
    subprocess.run([ctl, "-q", "add_vhost", vhost], check=True, timeout=60)
    subprocess.run(
        [ctl, "-q", "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*"],
        check=True,
        timeout=60,
    )
    try:
        yield f"amqp://guest:guest@127.0.0.1:5672/{vhost}"
    finally:
        subprocess.run([ctl, "-q", "delete_vhost", vhost], check=False, timeout=60)


def _port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2):
            return True
    except OSError:
        return False


@pytest.fixture(autouse=True)
def _reset_sdk() -> Iterator[None]:
    testing.reset()
    yield
    testing.reset()


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh metrics registry the SDK declares on (taken before init())."""
    return testing.fresh_registry()
