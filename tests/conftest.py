"""Shared fixtures: no global SDK state leaks between tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry

from lookout.sdk import testing

REQUIRE_REAL = os.environ.get("LOOKOUT_REQUIRE_REAL") == "1"


def require_real(what: str, available: bool, how: str) -> None:
    """Skip when a real part is missing on a laptop; fail when CI says it is required."""
    if available:
        return
    message = f"{what} is not available here ({how})"
    if REQUIRE_REAL:
        pytest.fail(f"LOOKOUT_REQUIRE_REAL=1 but {message}")
    pytest.skip(message)


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name)
    require_real(name, path is not None, f"apt-get install {package}")
    assert path is not None
    return path


@pytest.fixture(autouse=True)
def _reset_sdk() -> Iterator[None]:
    testing.reset()
    yield
    testing.reset()


@pytest.fixture
def registry() -> CollectorRegistry:
    """A fresh metrics registry the SDK declares on (taken before init())."""
    return testing.fresh_registry()
